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

import errno
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
from safetensors.torch import load as load_safetensors
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ddpm.models import unwrap_model as _unwrap

__all__ = [
    "CheckpointError", "StorageError", "describe_os_error", "write_text", "CHECKPOINT_FILES", "RUN_FORMAT",
    "checkpoint_name", "strict_json", "write_json", "read_json",
    "save_checkpoint", "latest_checkpoint", "list_checkpoints", "load_weights", "load_tensors",
    "optimizer_state_to_tensors", "optimizer_state_from_tensors", "find_run_files", "FORMAT_VERSION",
    "training_state", "restore_training_state", "read_checkpoint", "read_run_config", "check_state",
]

FORMAT_VERSION = 1  # of config.json and state.json; a file with a larger one was written by a newer ddpm
RUN_FORMAT = "ddpm run"  # config.json's "format": what marks a folder as a run directory ddpm made
CHECKPOINT_FILES = ("model.safetensors", "ema.safetensors", "state.safetensors", "state.json", "config.json")
_STEP_DIR = re.compile(r"^step_(\d{7,})$")


class CheckpointError(ValueError):
    """A run directory or checkpoint that cannot be used; the message is one line for the user."""


class StorageError(OSError):
    """A file ddpm could not write (or read): one line naming the path, the cause and what to do."""


# What to do about the usual causes, by errno.
_HINTS = {
    errno.ENOSPC: "free some space on that disk, or write elsewhere",
    errno.EDQUOT: "free some of your disk quota, or write elsewhere",
    errno.EFBIG: "the file-size limit (ulimit -f) is lower than the file; raise it",
    errno.EACCES: "you may not write there; choose a folder you can write to",
    errno.EPERM: "you may not write there; choose a folder you can write to",
    errno.EROFS: "that file system is read-only; choose another folder",
}


def describe_os_error(error: BaseException, path: str | Path | None = None, doing: str = "write") -> str:
    """One line for an OSError (or a safetensors error wrapping one): what failed where, and what to do."""
    where = path if path is not None else getattr(error, "filename", None)
    cause = getattr(error, "strerror", None) or " ".join(str(error).split()) or type(error).__name__
    code = getattr(error, "errno", None)
    if code is None:  # safetensors reports the OS's message only as text
        code = next((number for number, text in ((errno.ENOSPC, "No space left"), (errno.EFBIG, "File too large"),
                                                 (errno.EDQUOT, "quota"), (errno.EROFS, "Read-only"),
                                                 (errno.EACCES, "Permission denied")) if text in cause), None)
    hint = _HINTS.get(code)
    return f"could not {doing} {where}: {cause}" + (f"; {hint}" if hint else "")


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


def write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (temporary file, flush, rename). A failed write leaves
    ``path`` as it was and raises a StorageError naming it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        raise StorageError(describe_os_error(error, path)) from None
    _fsync_dir(path.parent)


def write_json(path: str | Path, data: Any) -> None:
    """Write ``data`` as JSON to ``path`` atomically (``write_text``); nan and inf as null."""
    write_text(path, json.dumps(strict_json(data), indent=2, sort_keys=False, allow_nan=False) + "\n")


def read_json(path: str | Path, what: str, data: bytes | None = None) -> Any:
    """The JSON in ``path`` (or in ``data``, its bytes read already); a missing, unreadable or damaged
    file is a one-line CheckpointError."""
    path = Path(path)
    try:
        return json.loads(path.read_bytes() if data is None else data)
    except FileNotFoundError:
        raise CheckpointError(f"{what} is missing: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{what} is damaged (not valid JSON): {path}") from None
    except RecursionError:
        raise CheckpointError(f"{what} is damaged (JSON nested too deeply): {path}") from None
    except OSError as error:
        raise CheckpointError(f"{what} cannot be read: {describe_os_error(error, path, 'read')}") from None


# --- checking what is read back -------------------------------------------------------------------

def read_run_config(path: str | Path, data: bytes | None = None) -> dict[str, Any]:
    """A run's (or a checkpoint's) config.json, checked: a table with a known format_version, a
    'config' table, a 'model' table naming its preset, and 'data' with its kind and sample shape.
    Each problem is a one-line CheckpointError naming the file and the key."""
    path = Path(path)
    metadata = read_json(path, "the run's config.json", data)
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{path} is not a ddpm run config (a JSON {type(metadata).__name__}, not a table)")
    _check_format_version(metadata, path)
    for key in ("config", "model", "data"):
        if not isinstance(metadata.get(key), dict):
            raise CheckpointError(f"{path}: key {key!r} should be a table, got {_shown(metadata.get(key))}")
    if not isinstance(metadata["model"].get("preset"), str):
        raise CheckpointError(f"{path}: key 'model.preset' should be a model preset name, "
                              f"got {_shown(metadata['model'].get('preset'))}")
    data = metadata["data"]
    if data.get("kind") not in ("image", "points"):
        raise CheckpointError(f"{path}: key 'data.kind' should be 'image' or 'points', got {_shown(data.get('kind'))}")
    shape = data.get("sample_shape")
    wanted = 3 if data["kind"] == "image" else 1
    if (not isinstance(shape, list) or len(shape) != wanted
            or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in shape)):
        raise CheckpointError(f"{path}: key 'data.sample_shape' should be {wanted} positive integers for "
                              f"{data['kind']} data, got {_shown(shape)}")
    classes, num_classes = data.get("classes"), metadata["model"].get("num_classes", 0)
    if classes is not None or num_classes:
        if not (isinstance(classes, list) and all(isinstance(c, str) for c in classes) and len(classes) == num_classes
                and len(set(classes)) == len(classes)):
            raise CheckpointError(f"{path}: key 'data.classes' should be the {num_classes} distinct class names of "
                                  f"'model.num_classes', got {_shown(classes)}")
    return metadata


def check_state(state: Any, path: Path) -> dict[str, Any]:
    """A checkpoint's state.json, checked: step, data cursor and epoch whole numbers >= 0, the optimiser
    a table, a known format_version."""
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} is not a ddpm training state (a JSON {type(state).__name__}, not a table)")
    _check_format_version(state, path)
    for key in ("step", "data_cursor", "data_epoch"):
        value = state.get(key)
        if key in state or key == "step":
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise CheckpointError(f"{path}: key {key!r} should be a whole number >= 0, got {_shown(value)}")
    if "optimizer" in state and not (isinstance(state["optimizer"], dict)
                                     and isinstance(state["optimizer"].get("param_groups"), list)):
        raise CheckpointError(f"{path}: key 'optimizer' should be a table with 'param_groups', "
                              f"got {_shown(state['optimizer'])}")
    return state


def _check_format_version(data: dict[str, Any], path: Path) -> None:
    version = data.get("format_version", FORMAT_VERSION)
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {_shown(version)} is not one this ddpm reads (1.."
                              f"{FORMAT_VERSION}); it was written by another version of ddpm, or damaged")


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


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
    name = checkpoint_name(step)
    final = root / name
    tmp = root / f".tmp-{name}-{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        _remove_abandoned_writes(root)
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
    except (OSError, SafetensorError) as error:  # disk full, file-size limit, permissions...
        shutil.rmtree(tmp, ignore_errors=True)
        kept = _pointer_name(root)
        raise StorageError(describe_os_error(error, final) + "; " + (
            f"the last complete checkpoint, {kept}, is intact" if kept else "no checkpoint had been written yet")
        ) from None
    # The last ``keep`` written are this one and those of the steps before it; folders of later
    # steps (left by a run resumed from an earlier checkpoint) are replaced when the run reaches them.
    earlier = [p for p in list_checkpoints(run_dir) if _step_of(p) < step]
    for old in earlier[:max(len(earlier) - (keep - 1), 0)]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _pointer_name(root: Path) -> str | None:
    """What ``latest`` names, if it can be read (for messages only)."""
    try:
        return (root / "latest").read_text(encoding="utf-8").strip() or None
    except (OSError, UnicodeDecodeError):
        return None


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
    try:
        name = pointer.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{pointer} cannot be read ({getattr(error, 'strerror', None) or error})") from None
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


def read_checkpoint(checkpoint: Path, read: tuple[str, ...] = CHECKPOINT_FILES) -> dict[str, bytes]:
    """The bytes of the files ``read`` of a complete checkpoint, as they were at one moment: every file
    is opened before any is read, so a writer that prunes the folder meanwhile (an open file outlives
    its name) cannot leave the reader with half a checkpoint. A file missing then is a CheckpointError."""
    handles = {}
    try:
        for name in CHECKPOINT_FILES:
            handles[name] = open(checkpoint / name, "rb")
        return {name: handles[name].read() for name in read}
    except FileNotFoundError as error:
        raise CheckpointError(f"checkpoint {checkpoint} is incomplete: {Path(error.filename).name} missing") from None
    except OSError as error:
        raise CheckpointError(f"checkpoint {checkpoint} cannot be read: "
                              f"{describe_os_error(error, doing='read')}") from None
    finally:
        for handle in handles.values():
            handle.close()


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


def load_tensors(path: str | Path, what: str, data: bytes | None = None) -> dict[str, Tensor]:
    """Read a safetensors file (never pickle), or ``data``, its bytes read already; a one-line error
    when it is missing or damaged."""
    path = Path(path)
    try:
        return load_file(path) if data is None else load_safetensors(data)
    except FileNotFoundError:
        raise CheckpointError(f"{what} is missing: {path}") from None
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:  # safetensors' own, or torch's
        if not path.exists():  # removed while it was opened (a writer pruning its checkpoints)
            raise CheckpointError(f"{what} is missing: {path}") from None
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise CheckpointError(f"{what} is damaged or truncated ({first_line}): {path}") from None


def load_weights(model: nn.Module, path: str | Path, what: str = "weights", data: bytes | None = None) -> None:
    """Load a safetensors state dict (the file, or ``data``, its bytes) into ``model``; a different
    architecture or dtype is a one-line error."""
    tensors = load_tensors(path, what, data)
    target = _unwrap(model)
    expected = target.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = sorted(k for k in set(expected) & set(tensors) if expected[k].shape != tensors[k].shape)
    other_type = sorted(k for k in set(expected) & set(tensors) if expected[k].dtype != tensors[k].dtype)
    if other_type and not (missing or unexpected or wrong):  # e.g. integers, which would load as truncated values
        key = other_type[0]
        got, needed = (str(t[key].dtype).removeprefix("torch.") for t in (tensors, expected))
        raise CheckpointError(f"{path}: tensor {key!r} is {got}, the model needs {needed} "
                              f"({len(other_type)} such tensors)")
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
    state = check_state(read_json(checkpoint / "state.json", "training state"), checkpoint / "state.json")
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
    generators = [("rng.noise", noise_generator.set_state), ("rng.torch", torch.set_rng_state)]
    if "rng.cuda" in tensors and device.type == "cuda":
        generators.append(("rng.cuda", torch.cuda.set_rng_state))
    for key, set_state in generators:
        try:
            set_state(tensors[key])
        except (RuntimeError, TypeError, ValueError):
            raise CheckpointError(f"{checkpoint / 'state.safetensors'}: tensor {key!r} is not a generator state "
                                  f"({str(tensors[key].dtype).removeprefix('torch.')}, {tuple(tensors[key].shape)})"
                                  ) from None
    return state["step"]


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
