"""How much memory there is, and a one-line refusal of what clearly cannot fit in it.

Sizes are estimated before anything is allocated (a model's parameter count, T's tables, a dataset's
bytes from an .npy header or an image's size), so that a setting asking for 100 GB fails at once with
a line that names it, instead of after minutes of swapping or with the kernel's OOM killer.

    check_fits("the training data", 4 * n * c * h * w, "lower --image-size")
"""

from __future__ import annotations

import os

__all__ = ["memory_bytes", "check_fits", "ResourceError", "human_bytes"]


class ResourceError(ValueError):
    """A setting that asks for more memory than the machine has (one line naming the setting)."""


def memory_bytes(device: str = "cpu") -> int:
    """The memory of ``device``: physical RAM for "cpu" (what the OS reports), the GPU's total memory
    for a CUDA device. DDPM_MEMORY_BYTES overrides it (for tests, or to leave room for other work)."""
    override = os.environ.get("DDPM_MEMORY_BYTES")
    if override:
        return int(override)
    if str(device).startswith("cuda"):
        import torch

        return int(torch.cuda.get_device_properties(torch.device(device)).total_memory)
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not reported on this platform: assume it fits
        return 2**62


def human_bytes(count: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB", "PB"):
        if count < 1000 or unit == "PB":
            return f"{count:.0f} {unit}" if unit == "bytes" else f"{count:.1f} {unit}"
        count /= 1000
    raise AssertionError("unreachable")


def check_fits(what: str, needed: float, advice: str, device: str = "cpu",
               error: type[ValueError] = ResourceError) -> None:
    """Raise ``error`` (a ResourceError unless given, e.g. a DataError for the loaders) when ``needed``
    bytes for ``what`` exceed the memory of ``device``; ``advice`` says what to change."""
    available = memory_bytes(device)
    if needed > available:
        place = "this machine's memory" if not str(device).startswith("cuda") else f"{device}'s memory"
        raise error(f"{what} would need {human_bytes(needed)}, more than {place} ({human_bytes(available)}); "
                    f"{advice}")
