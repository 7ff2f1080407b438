"""The rules of a run directory: when one may be created, resumed or replaced, what its config.json
holds, and which settings a resumed run may change (the fields marked resumable in ddpm.config)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from torch import nn

from ddpm import checkpoint as ckpt
from ddpm.config import Config, config_from_dict, config_to_dict, resumable_fields
from ddpm.data import Dataset
from ddpm.models import model_config_dict

__all__ = ["RunDirError", "prepare_run_dir", "start_run_dir", "run_metadata", "check_resume_config"]


class RunDirError(ValueError):
    """The run directory cannot be used as asked (one line for the user)."""


def prepare_run_dir(run_dir: Path, *, resume: bool, overwrite: bool) -> bool:
    """Check the run directory may be used; returns True when an existing run is to be resumed.

    With ``overwrite`` an existing run is only checked here: it is deleted when the new run's first
    file is written (``start_run_dir``), so a setting or data that fails on the way loses nothing."""
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"--out {run_dir} is a file; give a directory")
    occupied = run_dir.is_dir() and any(run_dir.iterdir())
    if resume:
        if occupied and not (run_dir / "config.json").is_file():
            raise RunDirError(f"--resume: {run_dir} is not a ddpm run directory (no config.json); nothing to resume")
        return occupied
    if not occupied:
        return False
    if not overwrite:
        raise RunDirError(f"{run_dir} is not empty; add --resume to continue that run, --overwrite to replace "
                          f"it, or choose another --out")
    if not (run_dir / "config.json").is_file():
        raise RunDirError(f"--overwrite replaces only a ddpm run directory (one with config.json); {run_dir} "
                          f"is not one, so nothing was deleted")
    return False


def start_run_dir(run_dir: Path, metadata: dict[str, Any], *, overwrite: bool) -> None:
    """Write a new run's config.json, replacing the run prepare_run_dir let ``overwrite`` replace."""
    if overwrite and (run_dir / "config.json").is_file():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt.write_json(run_dir / "config.json", metadata)


def run_metadata(config: Config, model: nn.Module, dataset: Dataset) -> dict[str, Any]:
    """What config.json holds: the config and what was resolved from it (architecture, data shape)."""
    return {"format_version": ckpt.FORMAT_VERSION, "config": config_to_dict(config), "model": model_config_dict(model),
            "data": {"kind": dataset.kind, "sample_shape": list(dataset.sample_shape), "name": dataset.name}}


def check_resume_config(saved: Config, asked: Config, changed: set[str]) -> Config:
    """The saved config with the allowed changes of ``asked`` applied; other changes are an error.

    changed: the fields the user set ("train.steps", ...), and "preset" when a preset was named."""
    saved_dict, asked_dict = config_to_dict(saved), config_to_dict(asked)
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
