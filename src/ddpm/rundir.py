"""The rules of a run directory: which folders are ddpm's, who may write one, when one may be created,
resumed or replaced, what its config.json holds, and which settings a resumed run may change (the
fields marked resumable in ddpm.config).

A folder is a ddpm run when its config.json says so (``"format": "ddpm run"``; runs written before
that field are recognised by their config.json's structure). ``--overwrite`` replaces only such a
folder, only when every file in it is one ddpm writes, never while another process writes it, never
when the new run's data lies inside it, and only once the new run is ready to write its config.json.
One process writes a run at a time: it holds an OS lock (``flock``) on RUN_DIR/.ddpm-lock for its whole
life, which the OS drops when the process ends, however it ends. Readers take no lock.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from torch import nn

from ddpm import checkpoint as ckpt
from ddpm.config import Config, config_from_dict, config_to_dict, resumable_fields
from ddpm.data import DATASETS
from ddpm.metrics_log import line_step
from ddpm.models import model_config_dict

try:
    import fcntl
except ImportError:  # not on Windows: no lock there
    fcntl = None

__all__ = ["RunDirError", "RunLock", "LOCK_NAME", "is_ddpm_run", "files_ddpm_did_not_write", "prepare_run_dir",
           "start_run_dir", "run_metadata", "check_resume_config", "check_nothing_was_lost"]

LOCK_NAME = ".ddpm-lock"


class RunDirError(ValueError):
    """The run directory cannot be used as asked (one line for the user)."""


class RunLock:
    """The exclusive lock of a run directory, held by the one process that writes it."""

    def __init__(self, run_dir: Path, fd: int | None, created: bool, new_file: bool = False):
        self.run_dir, self._fd, self._created, self._new_file = run_dir, fd, created, new_file
        self._confirmed = False

    @classmethod
    def acquire(cls, run_dir: Path) -> "RunLock":
        """Lock ``run_dir`` (made if missing), or a RunDirError naming the process that holds it."""
        if run_dir.exists() and not run_dir.is_dir():
            raise RunDirError(f"--out {run_dir} is a file; give a directory")
        created = not run_dir.exists()
        if fcntl is None or (_occupied(run_dir) and not is_ddpm_run(run_dir)):
            return cls(run_dir, None, False)  # a folder that is not a run gets no lock file: it is refused
        run_dir.mkdir(parents=True, exist_ok=True)
        new_file = not (run_dir / LOCK_NAME).exists()
        fd = os.open(run_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _lock_holder(fd)
            os.close(fd)
            raise RunDirError(f"{run_dir} is being written by another ddpm process (PID {holder}); wait for it "
                              f"to finish or stop it, or choose another --out") from None
        return cls(run_dir, fd, created, new_file)

    def confirm(self) -> None:
        """The run is to be written: the lock file stays with it."""
        self._confirmed = True

    def release(self) -> None:
        """Unlock. A command refused before it could write leaves the folder as it found it: a lock
        file it made is removed, and so is a folder it made for a run that never started."""
        if self._new_file and not self._confirmed:
            (self.run_dir / LOCK_NAME).unlink(missing_ok=True)
        if self._created and not (self.run_dir / "config.json").exists():
            (self.run_dir / LOCK_NAME).unlink(missing_ok=True)
            try:
                self.run_dir.rmdir()
            except OSError:
                pass
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _lock_holder(fd: int) -> str:
    """The PID holding the flock on ``fd``'s file, from Linux's /proc/locks ("unknown" elsewhere). The
    lock file itself stays empty, so a refused writer changes nothing in it."""
    st = os.fstat(fd)
    file_id = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        with open("/proc/locks", encoding="ascii", errors="replace") as locks:
            for line in locks:
                fields = line.split()
                if len(fields) > 5 and fields[1] == "FLOCK" and fields[5] == file_id:
                    return fields[4]
    except OSError:
        pass
    return "unknown"


def is_ddpm_run(run_dir: Path) -> bool:
    """Whether ``run_dir``'s config.json marks it as a run ddpm made."""
    try:
        metadata = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return False
    if not isinstance(metadata, dict):
        return False
    if metadata.get("format") == ckpt.RUN_FORMAT:
        return True
    # Runs written before the format field: the exact top-level keys ddpm wrote, with their types.
    return (set(metadata) == {"format_version", "config", "model", "data"} and metadata["format_version"] == 1
            and all(isinstance(metadata[k], dict) for k in ("config", "model", "data"))
            and "train" in metadata["config"] and "preset" in metadata["model"])


# What ddpm writes in a run directory: top-level names, and inside its folders the names each holds
# (a name -> None means anything may be inside: a folder another library fills at ddpm's request).
_TMP = r"\.[\w.]+\.tmp-\d+"
_RUN_FILES = re.compile(rf"config\.json|metrics\.jsonl|{re.escape(LOCK_NAME)}|{_TMP}")
_FOLDERS = {
    "checkpoints": re.compile(r"step_\d{7,}|latest|\.latest\.tmp-\d+|\.tmp-step_\d{7,}-\d+"),
    "samples": re.compile(r"step_\d{7,}\.png|sample--?\d+(-\d+)?\.(png|npz)"),
    "eval": re.compile(rf"step_\d{{7,}}(-\d+)?\.json|{_TMP}"),
    "tensorboard": re.compile(r"events\.out\.tfevents\..+"),
    "wandb": None,
}
_CHECKPOINT_FILES = re.compile("|".join(map(re.escape, ckpt.CHECKPOINT_FILES)) + f"|{_TMP}")


def files_ddpm_did_not_write(run_dir: Path) -> list[Path]:
    """The files and folders in ``run_dir`` that are not among those ddpm writes there."""
    foreign = []
    for entry in sorted(run_dir.iterdir()):
        name = entry.name
        if name in _FOLDERS and entry.is_dir() and not entry.is_symlink():
            pattern = _FOLDERS[name]
            if pattern is not None:
                foreign += [p for p in sorted(entry.iterdir()) if not _written_inside(p, pattern)]
        elif not (_RUN_FILES.fullmatch(name) and entry.is_file() and not entry.is_symlink()):
            foreign.append(entry)
    return foreign


def _written_inside(path: Path, pattern: re.Pattern) -> bool:
    if path.is_symlink() or not pattern.fullmatch(path.name):
        return False
    if path.parent.name == "checkpoints" and path.name.startswith("step_"):  # a checkpoint: its files only
        return path.is_dir() and all(_CHECKPOINT_FILES.fullmatch(p.name) and p.is_file() for p in path.iterdir())
    return path.is_dir() == path.name.startswith(".tmp-step_")  # files, except an abandoned write's folder


def _occupied(run_dir: Path) -> bool:
    return run_dir.is_dir() and any(p.name != LOCK_NAME for p in run_dir.iterdir())


def prepare_run_dir(run_dir: Path, *, resume: bool, overwrite: bool, reads: tuple[Path, ...] = ()) -> bool:
    """Check the run directory may be used (its lock held); returns True when a run is to be resumed.

    reads: the files and folders the new run reads (its data): --overwrite never deletes them. With
    ``overwrite`` an existing run is only checked here: it is deleted when the new run's first file
    is written (``start_run_dir``), so a setting or data that fails on the way loses nothing."""
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"--out {run_dir} is a file; give a directory")
    occupied = _occupied(run_dir)
    if resume:
        if occupied and not is_ddpm_run(run_dir):
            raise RunDirError(f"--resume: {run_dir} is not a ddpm run directory (no ddpm config.json); "
                              f"nothing to resume")
        return occupied
    if not occupied:
        return False
    if not overwrite:
        raise RunDirError(f"{run_dir} is not empty; add --resume to continue that run, --overwrite to replace "
                          f"it, or choose another --out")
    if not is_ddpm_run(run_dir):
        raise RunDirError(f"--overwrite replaces only a run directory ddpm made (its config.json says so); "
                          f"{run_dir} is not one, so nothing was deleted")
    foreign = files_ddpm_did_not_write(run_dir)
    if foreign:
        shown = ", ".join(str(p.relative_to(run_dir)) for p in foreign[:3])
        more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
        raise RunDirError(f"--overwrite: {run_dir} holds files ddpm did not write ({shown}{more}); move them "
                          f"out first, or choose another --out. Nothing was deleted")
    inside = [p for p in reads if _is_within(p, run_dir)]
    if inside:
        raise RunDirError(f"--overwrite would delete the data this run reads: {inside[0]} lies inside {run_dir}; "
                          f"move it out first, or choose another --out. Nothing was deleted")
    return False


def _is_within(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
    except ValueError:
        return False
    return True


def data_paths(config: Config) -> tuple[Path, ...]:
    """The files and folders a config's data is read from (none for a generated set)."""
    d = config.data
    named = [d.data_dir] if d.data_dir else []
    if d.source not in DATASETS:
        named.append(d.source)
    return tuple(Path(p).expanduser() for p in named)


def start_run_dir(run_dir: Path, metadata: dict[str, Any], *, overwrite: bool) -> None:
    """Write a new run's config.json, first deleting the run prepare_run_dir let ``overwrite`` replace
    (every entry but the lock this process holds)."""
    if overwrite and is_ddpm_run(run_dir):
        if files_ddpm_did_not_write(run_dir):  # put there while the new run was set up
            raise RunDirError(f"--overwrite: {run_dir} now holds files ddpm did not write; nothing was deleted")
        for entry in run_dir.iterdir():
            if entry.name == LOCK_NAME:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt.write_json(run_dir / "config.json", metadata)


def check_nothing_was_lost(run_dir: Path, config: Config) -> None:
    """For a resumed run with no complete checkpoint: refuse when it once had one (its checkpoints are
    gone or unreadable, and starting over would overwrite the run); a run stopped before its first
    checkpoint may start again."""
    root = run_dir / "checkpoints"
    if os.path.lexists(root):
        raise RunDirError(f"--resume: {root} holds no complete checkpoint to continue from; nothing was changed. "
                          f"Restore the checkpoints, or start the run again with --overwrite")
    first = min(config.train.checkpoint_every, config.train.steps)
    logged = max((step for step in map(line_step, _lines(run_dir / "metrics.jsonl")) if step is not None),
                 default=0)
    if logged > first:  # step `first` is logged just before its checkpoint is written
        raise RunDirError(f"--resume: {run_dir} logged step {logged}, so it wrote a checkpoint at step {first}, but "
                          f"checkpoints/ is gone; nothing was changed. Restore it, or start again with --overwrite")


def _lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8", errors="replace").splitlines()
    except FileNotFoundError:
        return []


def run_metadata(config: Config, model: nn.Module, kind: str, sample_shape: tuple[int, ...], name: str,
                 classes: tuple[str, ...] | None = None) -> dict[str, Any]:
    """What config.json holds: the config and what was resolved from it (architecture; the data's kind,
    sample shape and name; the class names of a conditional run, label i being classes[i])."""
    data = {"kind": kind, "sample_shape": list(sample_shape), "name": name}
    return {"format": ckpt.RUN_FORMAT, "format_version": ckpt.FORMAT_VERSION, "config": config_to_dict(config),
            "model": model_config_dict(model), "data": data | ({"classes": list(classes)} if classes else {})}


def check_resume_config(saved: Config, asked: Config, changed: set[str]) -> Config:
    """The saved config with the allowed changes of ``asked`` applied; other changes are an error.

    changed: the fields the user set ("train.steps", ...), and "preset" when a preset was named."""
    saved_dict, asked_dict = dataclasses.asdict(saved), dataclasses.asdict(asked)
    if "preset" in changed and saved.preset != asked.preset:
        raise RunDirError(f"cannot change the preset when resuming (the run was trained with preset "
                          f"{saved.preset!r}); leave --preset out to continue it")
    resumable = resumable_fields()
    for name in sorted(changed - {"preset"}):
        section, key = name.split(".")
        if saved_dict[section][key] != asked_dict[section][key] and name not in resumable:
            raise RunDirError(f"cannot change {name} when resuming (the run has {saved_dict[section][key]!r}); "
                              f"resumable changes: {', '.join(sorted(resumable))}")
        saved_dict[section][key] = asked_dict[section][key]
    return config_from_dict(saved_dict)
