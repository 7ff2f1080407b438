"""Checkpoint folders: which ones pruning keeps, what stands in for a lost ``latest``, and the
leftovers of writes that were killed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

from ddpm import checkpoint as ckpt


def _save(run: Path, step: int, keep: int) -> Path:
    model = nn.Linear(2, 2)
    return ckpt.save_checkpoint(run, step, model=model, ema_model=model, tensors={"x": torch.zeros(1)},
                                state={"step": step}, config={"config": {}}, keep=keep)


def _steps(run: Path) -> list[str]:
    return [p.name for p in ckpt.list_checkpoints(run)]


def test_pruning_keeps_the_last_written_even_after_a_rewind(tmp_path):
    for step in (5, 10, 15, 20):
        _save(tmp_path, step, keep=2)
    assert _steps(tmp_path) == ["step_0000015", "step_0000020"]
    # A run resumed from an earlier checkpoint writes step 16: it is kept (it is the one just
    # written); step 20, from before the rewind, stays until the run reaches step 20 again.
    _save(tmp_path, 16, keep=1)
    assert _steps(tmp_path) == ["step_0000016", "step_0000020"]
    assert ckpt.latest_checkpoint(tmp_path).name == "step_0000016"
    _save(tmp_path, 25, keep=1)
    assert _steps(tmp_path) == ["step_0000025"]


def test_without_latest_the_newest_complete_checkpoint_stands_in(tmp_path):
    assert ckpt.latest_checkpoint(tmp_path) is None
    for step in (3, 6):
        _save(tmp_path, step, keep=5)
    (tmp_path / "checkpoints" / "step_0000009").mkdir()  # a folder a crash left empty
    (tmp_path / "checkpoints" / "latest").unlink()
    assert ckpt.latest_checkpoint(tmp_path).name == "step_0000006"


def test_a_killed_writes_leftovers_are_removed_and_a_live_ones_kept(tmp_path):
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(done.stdout)  # a process that has exited
    root = tmp_path / "checkpoints"
    (root / f".tmp-step_0000004-{dead}").mkdir(parents=True)
    (root / f".tmp-step_0000004-{dead}" / "model.safetensors").write_bytes(b"half")
    (root / f".latest.tmp-{dead}").write_text("step_0000004")
    (root / ".tmp-step_0000008-1").mkdir()  # pid 1 is alive: another process may be writing
    _save(tmp_path, 2, keep=3)
    assert sorted(p.name for p in root.iterdir()) == [".tmp-step_0000008-1", "latest", "step_0000002"]
