"""Run-directory I/O: safetensors weights, JSON config and training state, atomic writes.

    runs/NAME/
      config.json                    the run's Config plus the resolved model architecture
      checkpoints/step_0001000/      model.safetensors, ema.safetensors, state.safetensors, state.json, config.json
      checkpoints/latest             the name of the newest complete checkpoint
      samples/step_0001000.png
      metrics.jsonl

A checkpoint is written into a temporary folder, every file flushed to disk, then renamed into place;
only after that is ``latest`` replaced (by another rename). A crash at any moment leaves ``latest``
naming a complete checkpoint. Nothing is read with pickle: tensors come from safetensors, the rest
from JSON.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ddpm.models import unwrap_model as _unwrap

__all__ = [
    "CheckpointError", "CHECKPOINT_FILES", "checkpoint_name", "strict_json", "write_json", "read_json",
    "save_checkpoint", "latest_checkpoint", "list_checkpoints", "load_weights", "load_tensors",
    "optimizer_state_to_tensors", "optimizer_state_from_tensors", "find_run_files", "FORMAT_VERSION",
    "training_state", "restore_training_state",
]

FORMAT_VERSION = 1  # of config.json and state.json
CHECKPOINT_FILES = ("model.safetensors", "ema.safetensors", "state.safetensors", "state.json", "config.json")
_STEP_DIR = re.compile(r"^step_(\d{7,})$")


class CheckpointError(ValueError):
    """A run directory or checkpoint that cannot be used; the message is one line for the user."""


def checkpoint_name(step: int) -> str:
    return f"step_{step:07d}"


# --- atomic files ---------------------------------------------------------------------------------

def _fsync_dir(path: Path) -> None:
    # Makes a rename inside ``path`` durable; not possible (nor needed) on some platforms.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def strict_json(data: Any) -> Any:
    """``data`` with every nan or inf float replaced by None: JSON has no such numbers, and Python's
    NaN / Infinity extension breaks strict readers (jq, JavaScript, most other languages)."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {key: strict_json(value) for key, value in data.items()}
    if isinstance(data, (list, tuple)):
        return [strict_json(value) for value in data]
    return data


def write_json(path: str | Path, data: Any) -> None:
    """Write ``data`` as JSON to ``path`` atomically (temporary file, flush, rename); nan and inf as null."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(strict_json(data), f, indent=2, sort_keys=False, allow_nan=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def read_json(path: str | Path, what: str) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{what} is missing: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{what} is damaged (not valid JSON): {path}") from None


# --- optimiser state as tensors + JSON ------------------------------------------------------------

def optimizer_state_to_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into named tensors and a JSON-able rest."""
    state = optimizer.state_dict()
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, entries in state["state"].items():
        for key, value in entries.items():
            if isinstance(value, Tensor):
                tensors[f"optimizer.{index}.{key}"] = value.detach().contiguous()
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def optimizer_state_from_tensors(tensors: Mapping[str, Tensor], meta: Mapping[str, Any]) -> dict[str, Any]:
    """Rebuild the ``optimizer.state_dict()`` that :func:`optimizer_state_to_tensors` split."""
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optimizer."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = value
    for index, entries in meta.get("scalars", {}).items():
        state.setdefault(int(index), {}).update(entries)
    return {"state": state, "param_groups": meta["param_groups"]}


# --- writing a checkpoint -------------------------------------------------------------------------

def save_checkpoint(
    run_dir: str | Path,
    step: int,
    *,
    model: nn.Module,
    ema_model: nn.Module,
    tensors: Mapping[str, Tensor],
    state: Mapping[str, Any],
    config: Mapping[str, Any],
    keep: int,
) -> Path:
    """Write checkpoint ``step`` of ``run_dir`` atomically, point ``latest`` at it, keep the last ``keep``.

    tensors: the training state's tensors (optimiser moments, RNG states, data order), saved with
    safetensors; state: its JSON-able rest; config: the run's config.json content.
    """
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_writes(root)
    name = checkpoint_name(step)
    final = root / name
    tmp = root / f".tmp-{name}-{os.getpid()}"
    if tmp.exists():  # left by an earlier process with this pid
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file(_cpu_state(model), tmp / "model.safetensors")
    save_file(_cpu_state(ema_model), tmp / "ema.safetensors")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp / "state.safetensors")
    for file in ("model.safetensors", "ema.safetensors", "state.safetensors"):
        _fsync_file(tmp / file)
    write_json(tmp / "state.json", dict(state))
    write_json(tmp / "config.json", dict(config))
    _fsync_dir(tmp)
    if final.exists():  # the same step written again (e.g. a resumed run stopping where it resumed)
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    latest_tmp = root / f".latest.tmp-{os.getpid()}"
    with open(latest_tmp, "w", encoding="utf-8") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(latest_tmp, root / "latest")
    _fsync_dir(root)
    # The last ``keep`` written are this one and those of the steps before it; folders of later
    # steps (left by a run resumed from an earlier checkpoint) are replaced when the run reaches them.
    earlier = [p for p in list_checkpoints(run_dir) if _step_of(p) < step]
    for old in earlier[:max(len(earlier) - (keep - 1), 0)]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _step_of(checkpoint: Path) -> int:
    return int(_STEP_DIR.match(checkpoint.name).group(1))


def _remove_abandoned_writes(root: Path) -> None:
    """Delete the temporary folders and files of checkpoint writes whose process is gone (killed
    mid-write): each is a whole checkpoint's size and nothing reads it."""
    for path in root.glob(".*tmp-*"):
        pid = path.name.rsplit("-", 1)[-1]
        if not pid.isdigit() or int(pid) == os.getpid() or _process_exists(int(pid)):
            continue
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _cpu_state(model: nn.Module) -> dict[str, Tensor]:
    model = _unwrap(model)
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


# --- reading --------------------------------------------------------------------------------------

def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """The complete-looking checkpoint folders of a run, oldest first (temporary folders excluded)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name)]
    return sorted(found, key=_step_of)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint ``latest`` names, or None when the run has none yet.

    Without ``latest`` (lost, or a kill between a first checkpoint's folder and its pointer) it is
    the newest complete checkpoint folder, which is what ``latest`` is written to name."""
    root = Path(run_dir) / "checkpoints"
    pointer = root / "latest"
    if not pointer.exists():
        complete = [p for p in list_checkpoints(run_dir) if not _missing_files(p)]
        return complete[-1] if complete else None
    name = pointer.read_text(encoding="utf-8").strip()
    if not _STEP_DIR.match(name):
        raise CheckpointError(f"{pointer} is damaged: it should name a step_NNNNNNN folder, not {name[:40]!r}")
    return _require_complete(root / name)


def _missing_files(checkpoint: Path) -> list[str]:
    return [f for f in CHECKPOINT_FILES if not (checkpoint / f).is_file()]


def _require_complete(path: Path) -> Path:
    missing = _missing_files(path)
    if missing:
        raise CheckpointError(f"checkpoint {path} is incomplete: {', '.join(missing)} missing")
    return path


def find_run_files(path: str | Path) -> Path:
    """A run directory or one of its checkpoint folders -> the checkpoint folder to load."""
    if not isinstance(path, (str, os.PathLike)):
        raise CheckpointError(f"a run is a path to its directory or a checkpoint folder; got {type(path).__name__}")
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"no such run directory or checkpoint: {path}")
    if (path / "model.safetensors").is_file() or _STEP_DIR.match(path.name):
        return _require_complete(path)
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a run directory or a checkpoint folder")
    checkpoint = latest_checkpoint(path)
    if checkpoint is None:
        raise CheckpointError(f"{path} holds no checkpoint (no checkpoints/latest); train it first")
    return checkpoint


def load_tensors(path: str | Path, what: str) -> dict[str, Tensor]:
    """Read a safetensors file (never pickle), with a one-line error when it is damaged."""
    path = Path(path)
    try:
        return load_file(path)
    except FileNotFoundError:
        raise CheckpointError(f"{what} is missing: {path}") from None
    except (SafetensorError, OSError, ValueError) as error:
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise CheckpointError(f"{what} is damaged or truncated ({first_line}): {path}") from None


def load_weights(model: nn.Module, path: str | Path, what: str = "weights") -> None:
    """Load a safetensors state dict into ``model``; a different architecture is a one-line error."""
    tensors = load_tensors(path, what)
    target = _unwrap(model)
    expected = target.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = sorted(k for k in set(expected) & set(tensors) if expected[k].shape != tensors[k].shape)
    if missing or unexpected or wrong:
        detail = (f"missing {missing[0]!r}" if missing else f"unexpected {unexpected[0]!r}" if unexpected
                  else f"{wrong[0]!r} has shape {tuple(tensors[wrong[0]].shape)}, "
                       f"the model needs {tuple(expected[wrong[0]].shape)}")
        raise CheckpointError(f"{path} was made for a different architecture ({detail}, "
                              f"{len(missing) + len(unexpected) + len(wrong)} mismatches)")
    target.load_state_dict(tensors)


# --- training state: optimiser, data order, RNG ---------------------------------------------------

def training_state(optimizer: torch.optim.Optimizer, order: Any,
                   noise_generator: torch.Generator) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """What a checkpoint's state.safetensors and state.json hold besides the step: the optimiser's
    moments, the data order (``order.state()``, a training.DataOrder) and every generator's state."""
    tensors, optimizer_meta = optimizer_state_to_tensors(optimizer)
    data_tensors, data_state = order.state()
    tensors.update(data_tensors)
    tensors["rng.noise"] = noise_generator.get_state()
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    return tensors, {"format_version": FORMAT_VERSION, "optimizer": optimizer_meta, **data_state}


def restore_training_state(checkpoint: Path, model: nn.Module, ema_model: nn.Module,
                           optimizer: torch.optim.Optimizer, order: Any, noise_generator: torch.Generator,
                           device: torch.device) -> int:
    """Load a checkpoint into the pieces of a training run (weights, optimiser, data order, generators);
    returns its step. Every generator continues where the checkpointed run left it."""
    load_weights(model, checkpoint / "model.safetensors", "model weights")
    load_weights(ema_model, checkpoint / "ema.safetensors", "EMA weights")
    tensors = load_tensors(checkpoint / "state.safetensors", "training state")
    state = read_json(checkpoint / "state.json", "training state")
    required = ("data.perm", "rng.data", "rng.noise", "rng.torch")
    missing = [k for k in required if k not in tensors] + [k for k in ("step", "optimizer", "data_cursor")
                                                             if k not in state]
    if missing:
        raise CheckpointError(f"{checkpoint} is not a ddpm training checkpoint ({missing[0]} missing)")
    try:
        # The optimiser moves its moments to the parameters' device itself.
        optimizer.load_state_dict(optimizer_state_from_tensors(tensors, state["optimizer"]))
    except (ValueError, KeyError, RuntimeError) as error:
        raise CheckpointError(f"{checkpoint}: the optimiser state does not fit the model ({error})") from None
    for group in optimizer.param_groups:  # the checkpoint's groups carry its run's choice; keep this run's
        group["fused"] = optimizer.defaults["fused"]
    _lay_out_like_parameters(optimizer)
    order.load_state(tensors, state)
    noise_generator.set_state(tensors["rng.noise"])
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and device.type == "cuda":
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    return int(state["step"])


def _lay_out_like_parameters(optimizer: torch.optim.Optimizer) -> None:
    """Give each moment tensor its parameter's memory layout (checkpoints store them contiguous).

    Fused AdamW on a CPU walks a parameter and its moments as flat memory: a channels-last weight
    with contiguous moments pairs each weight with another weight's moments, silently (seen with
    torch 2.13: updates off by 0.3 at lr 0.1). Matching layouts also make a resumed run bitwise
    identical to an uninterrupted one.
    """
    for param, state in optimizer.state.items():
        for key, value in state.items():
            if isinstance(value, Tensor) and value.shape == param.shape and value.stride() != param.stride():
                state[key] = torch.empty_like(param, dtype=value.dtype).copy_(value)
