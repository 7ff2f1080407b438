"""Every script in examples/ runs from the checkout and writes its figures (smallest settings: these
check that the scripts work, docs/examples.md shows what their full runs produce)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import MNIST_DIR

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

SMOKE = {
    "untrained_sampling": ["--size", "32", "--num-steps", "4"],
    "square": ["--steps", "3"],
    "gradients": ["--steps", "3"],
    "mnist": ["--steps", "2", "--data-dir", str(MNIST_DIR), "--sample-steps", "3"],
    "clipping": ["--steps", "3", "--num", "4"],
}


def test_every_example_has_a_smoke_run():
    assert sorted(SMOKE) == sorted(p.stem for p in EXAMPLES.glob("*.py") if not p.stem.startswith("_"))


@pytest.mark.parametrize("name", SMOKE)
def test_example_runs_and_writes_pictures(name, tmp_path):
    out = tmp_path / name
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(EXAMPLES / f"{name}.py"), *SMOKE[name], "--out", str(out)],
                            capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    pictures = list(out.rglob("*.png")) + list(out.rglob("*.gif"))
    assert pictures, f"{name} wrote no picture; stdout: {result.stdout[-1000:]}"
    assert all(p.stat().st_size > 100 for p in pictures)
