"""Training under torchrun (gloo, 2 processes on the CPU) against one process: the same weights, resume
across a change of process count, agreement on stopping, and a clean end when a process dies.

Why two processes equal one: every process draws the whole global batch from the shared generators and
trains on its half; each process's gradient is scaled by 2 and averaged by DistributedDataParallel
(x 2 / 2 is exact in floating point), so the update is g_first_half + g_second_half, the very sum one
process forms with --grad-accum 2. The runs below are therefore bitwise equal to one process with
--grad-accum 2, and within a few float32 ulps of one process summing the whole batch in one backward
(the same sum, added in another order)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import ddpm

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "ddpm"]
SINGLE = [sys.executable, "-m", "ddpm"]
QUIET = ["--sample-steps", "5", "--num-samples", "8", "--sample-every", "0", "--no-tensorboard", "--quiet"]
# toy2d: a small residual MLP on 2-D points, T = 50, held-out loss logged.
POINTS = ["--preset", "toy2d", "--model-overrides", '{"hidden_dim": 32, "num_blocks": 1}', "--num-examples", "512",
          "--heldout", "64", "--num-steps", "50", "--batch-size", "32", "--eval-every", "10", "--log-every", "5",
          "--checkpoint-every", "10", *QUIET]
# Two image presets: the default small U-Net on the 8x8 square, and the tutorial's MLP on 3x5x5 gradients.
IMAGES = {
    "square-fast": ["--preset", "square-fast", "--model-overrides", '{"channels": [8, 16, 32]}', "--num-steps", "50",
                    "--batch-size", "16", "--eval-every", "6", "--log-every", "6", "--checkpoint-every", "12", *QUIET],
    "gradients": ["--preset", "gradients", "--num-examples", "256", "--heldout", "32", "--batch-size", "16",
                  "--eval-every", "6", "--log-every", "6", "--checkpoint-every", "12", *QUIET],
}


@pytest.fixture(scope="module", autouse=True)
def _torchrun_temporary_files(tmp_path_factory):
    """torchrun leaves a torchelastic_* folder in the temporary directory at every launch: keep them
    in pytest's temporary tree, which pytest prunes, instead of /tmp."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(ENV, "TMPDIR", str(tmp_path_factory.mktemp("torchrun")))
        yield


def run(launcher: list[str], *args: str, cwd: Path, check: bool = True,
        timeout: float = 120) -> subprocess.CompletedProcess:
    result = subprocess.run([*launcher, "train", *args], cwd=cwd, env=ENV, capture_output=True, text=True,
                            timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {result.returncode}: {result.stderr[-3000:]}")
    return result


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    checkpoint = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
    return {f"{name}/{key}": value for name in ("model", "ema")
            for key, value in load_file(checkpoint / f"{name}.safetensors").items()}


def max_difference(a: Path, b: Path) -> float:
    wa, wb = final_weights(a), final_weights(b)
    assert wa.keys() == wb.keys()
    return max((wa[k] - wb[k]).abs().max().item() for k in wa)


def metrics(run_dir: Path) -> list[dict[str, float]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def points(tmp_path_factory) -> Path:
    """20 steps of toy2d: one process, one process with --grad-accum 2, two processes."""
    cwd = tmp_path_factory.mktemp("points")
    run(SINGLE, "--out", "one", "--steps", "20", *POINTS, cwd=cwd)
    run(SINGLE, "--out", "accum", "--steps", "20", "--grad-accum", "2", *POINTS, cwd=cwd)
    run(TORCHRUN, "--out", "two", "--steps", "20", *POINTS, cwd=cwd)
    return cwd


def test_two_processes_train_the_weights_of_one(points):
    # Bitwise: the same two half-batch gradients added once.
    assert max_difference(points / "two", points / "accum") == 0.0
    # One backward over the whole batch adds in another order: a float32 ulp or so at weights of size ~1.
    assert max_difference(points / "two", points / "one") < 1e-6
    # Rank 0 alone wrote, and what it logged describes the global batch.
    two, one = metrics(points / "two"), metrics(points / "one")
    assert [r["step"] for r in two] == [r["step"] for r in one] == [5, 10, 15, 20]
    for a, b in zip(two, one):
        for key in ("loss", "loss_q0", "loss_q3", "grad_norm", "heldout_loss", "heldout_loss_ema"):
            if key in b:
                assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (a["step"], key)
    assert sorted(p.name for p in (points / "two" / "checkpoints").iterdir()) == sorted(
        p.name for p in (points / "one" / "checkpoints").iterdir())
    assert ddpm.load(points / "two").step == 20


def test_training_inside_a_process_group_the_caller_made(points):
    # A script that starts its own gloo group and then trains: ddpm adds only its host group for the
    # stop signal, and the weights are those of the run in ddpm's own group.
    script = points / "own_group.py"
    script.write_text("import sys\nimport torch.distributed as dist\nfrom ddpm.cli import main\n"
                      "dist.init_process_group('gloo')\nsys.exit(main(sys.argv[1:]))\n")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    run(launcher, "--out", "own", "--steps", "20", *POINTS, cwd=points)
    assert max_difference(points / "own", points / "two") == 0.0


@pytest.mark.parametrize("preset", list(IMAGES))
def test_two_processes_train_the_weights_of_one_on_images(preset, tmp_path):
    run(SINGLE, "--out", "accum", "--steps", "12", "--grad-accum", "2", *IMAGES[preset], cwd=tmp_path)
    run(TORCHRUN, "--out", "two", "--steps", "12", *IMAGES[preset], cwd=tmp_path)
    assert max_difference(tmp_path / "two", tmp_path / "accum") == 0.0
    assert (tmp_path / "two" / "samples" / "step_0000012.png").is_file()


def test_checkpoint_on_two_processes_resumes_on_one_and_the_reverse(points, tmp_path):
    # --steps and --grad-accum may change on resume; neither changes what a step computes.
    run(TORCHRUN, "--out", "two_then_one", "--steps", "10", *POINTS, cwd=tmp_path)
    run(SINGLE, "--out", "two_then_one", "--resume", "--steps", "20", "--grad-accum", "2", *POINTS, cwd=tmp_path)
    run(SINGLE, "--out", "one_then_two", "--steps", "10", "--grad-accum", "2", *POINTS, cwd=tmp_path)
    run(TORCHRUN, "--out", "one_then_two", "--resume", "--steps", "20", "--grad-accum", "1", *POINTS, cwd=tmp_path)
    for name in ("two_then_one", "one_then_two"):
        assert max_difference(tmp_path / name, points / "accum") == 0.0, name
        assert [r["step"] for r in metrics(tmp_path / name)] == [5, 10, 15, 20]


def test_a_global_batch_the_processes_cannot_share_is_refused_in_one_line(tmp_path):
    result = run(TORCHRUN, "--out", "run", "--steps", "2", *POINTS, "--batch-size", "30", "--grad-accum", "2",
                 cwd=tmp_path, check=False)
    assert result.returncode != 0
    ours = [line for line in result.stderr.splitlines() if line.startswith("ddpm:")]
    assert len(ours) == 1 and "divisible" in ours[0] and "2 x 2" in ours[0], result.stderr[-2000:]
    assert not (tmp_path / "run").exists()


def _start_and_wait_for_a_checkpoint(cwd: Path) -> tuple[subprocess.Popen, dict[int, int]]:
    """A long 2-process run, once its first checkpoint exists; returns it and its workers' pids by rank."""
    process = subprocess.Popen([*TORCHRUN, "train", "--out", "run", "--steps", "100000", *POINTS], cwd=cwd, env=ENV,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    latest = cwd / "run" / "checkpoints" / "latest"
    deadline = time.monotonic() + 60
    while not latest.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert latest.exists(), "no checkpoint within 60 s"
    return process, _workers(process.pid)


def _workers(parent: int) -> dict[int, int]:
    """The pids of torchrun's worker processes (its children), by their RANK, read from /proc."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
            ppid = int(next(line.split()[1] for line in status.splitlines() if line.startswith("PPid:")))
            if ppid != parent:
                continue
            environ = dict(item.split("=", 1) for item in (entry / "environ").read_bytes().decode().split("\0")
                           if "=" in item)
        except (OSError, StopIteration, ValueError):
            continue
        if "RANK" in environ:
            found[int(environ["RANK"])] = int(entry.name)
    assert sorted(found) == [0, 1], found
    return found


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the worker processes through /proc")
def test_killing_one_process_ends_the_job_in_one_line_and_the_checkpoint_resumes(tmp_path):
    process, workers = _start_and_wait_for_a_checkpoint(tmp_path)
    killed = time.monotonic()
    os.kill(workers[1], signal.SIGKILL)
    _, stderr = process.communicate(timeout=60)
    elapsed = time.monotonic() - killed
    assert process.returncode != 0 and elapsed < 60
    ours = [line for line in stderr.splitlines() if line.startswith("ddpm:")]
    assert len(ours) == 1 and "process group failed at step" in ours[0] and "on rank 0" in ours[0], stderr[-3000:]
    latest = (tmp_path / "run" / "checkpoints" / "latest").read_text().strip()
    assert f"the last checkpoint is {Path('run') / 'checkpoints' / latest}" in ours[0]
    # The checkpoint is whole: one process carries on from it.
    step = int(latest.split("_")[1])
    run(SINGLE, "--out", "run", "--resume", "--steps", str(step + 4), *POINTS, cwd=tmp_path)
    assert ddpm.load(tmp_path / "run").step == step + 4


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the worker processes through /proc")
def test_sigterm_to_one_process_stops_both_at_the_same_step_with_a_checkpoint(tmp_path):
    process, workers = _start_and_wait_for_a_checkpoint(tmp_path)
    os.kill(workers[1], signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode != 0
    ours = [line for line in stderr.splitlines() if line.startswith("ddpm:")]
    assert len(ours) == 1 and "stopped by SIGTERM at step" in ours[0], stderr[-3000:]  # rank 0 says it, once
    step = int(ours[0].split(" at step ")[1].split(";")[0])
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == f"step_{step:07d}"
    assert ddpm.load(tmp_path / "run").step == step


def test_a_conditional_run_on_two_processes_trains_the_weights_of_one(tmp_path):
    # Labels and their dropout are drawn for the whole global batch, like the examples and the noise.
    import numpy as np

    generator = np.random.default_rng(0)
    classes = generator.integers(0, 3, 512)
    points = np.stack([np.cos(2.1 * classes), np.sin(2.1 * classes)], 1) + 0.1 * generator.standard_normal((512, 2))
    np.savez(tmp_path / "labelled.npz", data=points.astype(np.float32), labels=np.array(["a", "b", "c"])[classes])
    conditional = ["--data", str(tmp_path / "labelled.npz"), "--conditional", "--label-dropout", "0.3"]
    run(SINGLE, "--out", "accum", "--steps", "20", "--grad-accum", "2", *POINTS, *conditional, cwd=tmp_path)
    run(TORCHRUN, "--out", "two", "--steps", "20", *POINTS, *conditional, cwd=tmp_path)
    assert max_difference(tmp_path / "two", tmp_path / "accum") == 0.0
    assert ddpm.load(tmp_path / "two").classes == ("a", "b", "c")


def test_a_time_budget_on_two_processes_is_one_plan_for_both(tmp_path):
    # The processes time the same steps and periodic work and must agree on one step count (a process
    # that planned more steps would wait forever in a collective the other never joins); rank 0
    # records the count, and the run ends there.
    run(TORCHRUN, "--out", "two", "--time-budget", "6s", *POINTS, "--checkpoint-every", "1000", "--eval-every", "100",
        cwd=tmp_path)
    saved = json.loads((tmp_path / "two" / "config.json").read_text())
    plan = saved["time_budget"]
    assert plan["steps"] == saved["config"]["train"]["steps"] == ddpm.load(tmp_path / "two").step > 40
    assert set(plan["periodic_seconds"]) == {"samples", "heldout"}
    assert metrics(tmp_path / "two")[-1]["step"] == plan["steps"]
