"""Fault injection: what a hostile or unlucky user does to a run directory, and what ddpm must do
then: refuse in one line, exit non-zero, and lose nothing of theirs.

Each test here failed on the code before the run-directory safety work (the comment says how)."""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import ddpm

TINY = ["--num-steps", "50", "--batch-size", "16", "--sample-steps", "3", "--num-samples", "2",
        "--sample-every", "0", "--eval-every", "0", "--log-every", "2", "--no-tensorboard", "--quiet"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def ddpm_cli(*args: str, cwd: Path, limit_bytes: int | None = None, timeout: float = 120,
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`ddpm ARGS` in ``cwd``; with ``limit_bytes``, under that file-size limit (RLIMIT_FSIZE)."""
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    result = subprocess.run([sys.executable, "-m", "ddpm", *args], cwd=cwd, env=env or ENV, capture_output=True,
                            text=True, timeout=timeout, preexec_fn=limit if limit_bytes else None)
    assert "internal error" not in result.stderr and "Traceback" not in result.stderr, result.stderr
    return result


def one_line_error(result: subprocess.CompletedProcess, code: int, *texts: str) -> str:
    """The one error line of ``result`` (notes printed before it, such as "resuming ...", may stand above)."""
    lines = [line for line in result.stderr.splitlines() if "error" in line]
    assert result.returncode == code, result.stderr
    assert len(lines) == 1, result.stderr
    for text in texts:
        assert text in lines[0], lines[0]
    return lines[0]


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes (but the lock file, which the run keeps for its writers)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".ddpm-lock"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A tiny finished run: 4 steps, checkpoints at 2 and 4."""
    cwd = tmp_path_factory.mktemp("trained")
    assert ddpm_cli("train", "--out", "run", "--steps", "4", "--checkpoint-every", "2", *TINY, cwd=cwd).returncode == 0
    return cwd / "run"


def copy_of(run: Path, tmp_path: Path) -> Path:
    target = tmp_path / "run"
    shutil.copytree(run, target)
    (target / ".ddpm-lock").unlink(missing_ok=True)
    return target


# --- --overwrite deletes only what ddpm wrote ------------------------------------------------------

def test_overwrite_refuses_a_project_folder_that_holds_a_foreign_config_json(tmp_path):
    # Before: any folder with a config.json was a run, and --overwrite deleted proj/src/thesis.tex.
    project = tmp_path / "proj"
    (project / "src").mkdir(parents=True)
    (project / "config.json").write_text('{"name": "app"}')
    (project / "src" / "thesis.tex").write_text("years of work")
    before = tree(project)
    result = ddpm_cli("train", "--preset", "toy2d", "--out", "proj", "--overwrite", "--steps", "2", cwd=tmp_path)
    one_line_error(result, 2, "is not one, so nothing was deleted")
    assert tree(project) == before and not (project / ".ddpm-lock").exists()


def test_overwrite_refuses_a_run_holding_files_ddpm_did_not_write(trained, tmp_path):
    run = copy_of(trained, tmp_path)
    (run / "notes.md").write_text("mine")
    (run / "samples").mkdir(exist_ok=True)
    (run / "samples" / "figure.svg").write_text("mine too")
    before = tree(run)
    result = ddpm_cli("train", "--out", "run", "--overwrite", "--steps", "2", *TINY, cwd=tmp_path)
    one_line_error(result, 2, "holds files ddpm did not write", "notes.md", "samples/figure.svg", "Nothing was deleted")
    assert tree(run) == before


def test_overwrite_never_deletes_the_data_it_is_about_to_train_on(trained, tmp_path):
    # Before: `--overwrite --data runs/r/mydata.npy` deleted mydata.npy with the old run.
    run = copy_of(trained, tmp_path)
    data = torch.rand(64, 1, 8, 8).numpy() * 2 - 1
    import numpy as np

    np.save(run / "mydata.npy", data)
    before = tree(run)
    result = ddpm_cli("train", "--out", "run", "--overwrite", "--data", "run/mydata.npy", "--steps", "2", *TINY,
                      cwd=tmp_path)
    assert result.returncode == 2
    assert "mydata.npy" in result.stderr
    assert tree(run) == before


def test_overwrite_replaces_a_run_of_ddpms_files_and_keeps_the_lock(trained, tmp_path):
    run = copy_of(trained, tmp_path)
    assert ddpm_cli("sample", "run", "--num", "2", "--steps", "2", "--quiet", cwd=tmp_path).returncode == 0
    assert ddpm_cli("train", "--out", "run", "--overwrite", "--steps", "2", "--checkpoint-every", "2", *TINY,
                    cwd=tmp_path).returncode == 0
    assert sorted(p.name for p in run.iterdir()) == [".ddpm-lock", "checkpoints", "config.json", "metrics.jsonl",
                                                      "samples"]
    assert [p.name for p in (run / "samples").iterdir()] == ["step_0000002.png"]  # sample-0.png went with the old run
    assert json.loads((run / "config.json").read_text())["format"] == "ddpm run"


# --- one writer per run -------------------------------------------------------------------------------

def start_training(cwd: Path, *args: str) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-m", "ddpm", "train", "--out", "run", "--steps", "100000",
                                "--checkpoint-every", "3", "--keep-checkpoints", "1", *args, *TINY],
                               cwd=cwd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    latest = cwd / "run" / "checkpoints" / "latest"
    deadline = time.monotonic() + 90
    while not latest.exists() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    assert latest.exists(), process.communicate(timeout=30)[1] if process.poll() is not None else "no checkpoint"
    return process


def test_a_second_writer_is_refused_naming_the_first_and_the_lock_dies_with_it(tmp_path):
    # Before: two `ddpm train --out runs/x` both ran and interleaved metrics.jsonl.
    first = start_training(tmp_path)
    try:
        for extra in ([], ["--resume"], ["--overwrite"]):
            result = ddpm_cli("train", "--out", "run", "--steps", "5", *extra, *TINY, cwd=tmp_path)
            one_line_error(result, 2, "is being written by another ddpm process", f"PID {first.pid}")
        # Readers take no lock.
        assert ddpm.load(tmp_path / "run").step >= 3
    finally:
        first.kill()  # kill -9: no handler runs, the OS drops the lock
        first.communicate(timeout=30)
    step = ddpm.load(tmp_path / "run").step
    resumed = ddpm_cli("train", "--out", "run", "--resume", "--steps", str(step + 1), *TINY, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr


def test_sampling_in_a_loop_while_the_run_trains_never_fails(tmp_path):
    # Before: about a third of the loads failed with "model weights is missing" (pruned under the reader).
    writer = start_training(tmp_path, "--checkpoint-every", "1")
    try:
        steps = []
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            run = ddpm.load(tmp_path / "run")
            steps.append(run.step)
            assert run.sample(1, steps=2).isfinite().all()
        assert len(steps) >= 20 and len(set(steps)) >= 5, steps  # many loads, across many checkpoints
    finally:
        writer.kill()
        writer.communicate(timeout=30)


# --- honest resume --------------------------------------------------------------------------------------

def test_resume_refuses_a_run_whose_checkpoints_are_gone(trained, tmp_path):
    # Before: it restarted from step 0 without a word and truncated metrics.jsonl.
    run = copy_of(trained, tmp_path)
    shutil.rmtree(run / "checkpoints")
    before = tree(run)
    result = ddpm_cli("train", "--out", "run", "--resume", *TINY, cwd=tmp_path)
    one_line_error(result, 2, "logged step 4", "checkpoints/ is gone; nothing was changed")
    assert tree(run) == before


def test_resume_refuses_checkpoints_that_are_an_unreadable_link(trained, tmp_path):
    run = copy_of(trained, tmp_path)
    shutil.rmtree(run / "checkpoints")
    (run / "checkpoints").symlink_to(tmp_path / "nowhere")
    result = ddpm_cli("train", "--out", "run", "--resume", *TINY, cwd=tmp_path)
    one_line_error(result, 2, "holds no complete checkpoint", "nothing was changed")
    assert (run / "metrics.jsonl").read_text() == (trained / "metrics.jsonl").read_text()


def test_resume_drops_a_torn_last_line_of_the_metrics(trained, tmp_path):
    # Before: the torn line counted as step 0 and stayed for ever.
    run = copy_of(trained, tmp_path)
    with open(run / "metrics.jsonl", "a") as file:
        file.write('{"step": 5, "loss": 0.')  # killed in the middle of a write
    assert ddpm_cli("train", "--out", "run", "--resume", "--steps", "6", "--checkpoint-every", "2", *TINY,
                    cwd=tmp_path).returncode == 0
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [2, 4, 6]


def test_a_failed_rewrite_of_the_metrics_leaves_them_whole(trained, tmp_path):
    # Before: resume truncated metrics.jsonl in place, so a failed write (here a file-size limit below
    # the file's size) cut the history.
    run = copy_of(trained, tmp_path)
    before = (run / "metrics.jsonl").read_bytes()
    result = ddpm_cli("train", "--out", "run", "--resume", *TINY, cwd=tmp_path, limit_bytes=len(before) - 1)
    one_line_error(result, 1, "metrics.jsonl", "File too large", "ulimit -f")
    assert (run / "metrics.jsonl").read_bytes() == before


# --- I/O failures: one line, exit 1, the last good checkpoint intact -----------------------------------------

def test_a_file_size_limit_during_a_checkpoint_is_one_line_and_keeps_the_last_one(trained, tmp_path):
    # Before: SIGXFSZ killed the process; with disk full it read "internal error: SafetensorError".
    run = copy_of(trained, tmp_path)
    model_bytes = (run / "checkpoints" / "step_0000004" / "model.safetensors").stat().st_size
    result = ddpm_cli("train", "--out", "run", "--resume", "--steps", "6", "--checkpoint-every", "2", *TINY,
                      cwd=tmp_path, limit_bytes=model_bytes // 2)
    one_line_error(result, 1, "could not write", "step_0000006", "ulimit -f",
                   "the last complete checkpoint, step_0000004, is intact")
    assert ddpm.load(run).step == 4
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".tmp")]


def test_disk_full_during_a_checkpoint_is_one_line_and_keeps_the_last_one(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(disk)],
                                           capture_output=True).returncode != 0:
        pytest.skip("needs root to mount a small tmpfs (the file-size-limit test covers the same path)")
    try:
        result = ddpm_cli("train", "--out", "run", "--steps", "100", "--checkpoint-every", "2",
                          "--keep-checkpoints", "5", *TINY, cwd=disk)
        line = one_line_error(result, 1, "could not write", "No space left on device", "free some space")
        kept = line.split("the last complete checkpoint, ")[1].split(",")[0]
        assert ddpm.load(disk / "run").checkpoint.name == kept
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_an_unwritable_output_is_one_line_naming_it(trained, tmp_path):
    (tmp_path / "locked").mkdir(mode=0o500)
    try:
        if os.access(tmp_path / "locked", os.W_OK):  # root writes anywhere: use a read-only path instead
            target = "/proc/ddpm-samples.npz"
        else:
            target = str(tmp_path / "locked" / "x.npz")
        result = ddpm_cli("sample", str(trained), "--num", "1", "--steps", "2", "--quiet", "--out", target,
                          cwd=tmp_path)
        one_line_error(result, 1, "could not", "ddpm-samples.npz" if target.startswith("/proc") else "x.npz")
    finally:
        (tmp_path / "locked").chmod(0o700)


# --- every file read back is checked: one line naming the file and the key ----------------------------------

def edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def latest(run: Path) -> Path:
    return run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()


CRAFTED = {
    "step is null": (lambda run: edit_json(latest(run) / "state.json", lambda d: d.update(step=None)),
                     "state.json: key 'step' should be a whole number >= 0, got None"),
    "step is a string": (lambda run: edit_json(latest(run) / "state.json", lambda d: d.update(step="4")),
                         "key 'step' should be a whole number"),
    "cursor out of range": (lambda run: edit_json(latest(run) / "state.json", lambda d: d.update(data_cursor=10**9)),
                            "'data_cursor' = 1000000000 lies outside"),
    "model is 5": (lambda run: edit_json(latest(run) / "config.json", lambda d: d.update(model=5)),
                   "config.json: key 'model' should be a table, got 5"),
    "no config key": (lambda run: edit_json(latest(run) / "config.json", lambda d: d.pop("config")),
                      "config.json: key 'config' should be a table, got None"),
    "deeply nested": (lambda run: (latest(run) / "config.json").write_text("[" * 100_000 + "]" * 100_000),
                      "nested too deeply"),
    "unknown format_version": (lambda run: edit_json(latest(run) / "config.json",
                                                     lambda d: d.update(format_version=7)),
                               "format_version 7 is not one this ddpm reads"),
    "sample shape": (lambda run: edit_json(latest(run) / "config.json",
                                           lambda d: d["data"].update(sample_shape=[1, -8, 8])),
                     "key 'data.sample_shape' should be 3 positive integers"),
    "integer weights": (lambda run: save_file({k: v.to(torch.int64) for k, v in
                                               load_file(latest(run) / "ema.safetensors").items()},
                                              latest(run) / "ema.safetensors"),
                        "ema.safetensors: tensor", "is int64, the model needs float32"),
    "generator state": (lambda run: save_file({**load_file(latest(run) / "state.safetensors"),
                                               "rng.noise": torch.zeros(3)}, latest(run) / "state.safetensors"),
                        "tensor 'rng.noise' is not a generator state"),
    "latest names a folder that is not one": (lambda run: (run / "checkpoints" / "latest").write_text("../../etc\n"),
                                              "latest is damaged: it should name a step_NNNNNNN folder"),
    "huge model": (lambda run: edit_json(latest(run) / "config.json",
                                         lambda d: d["model"].update(channels=[4096, 8192, 16384])),
                   "the model (", "more than this machine's memory"),
}


@pytest.mark.parametrize("case", sorted(CRAFTED))
def test_crafted_or_damaged_run_files_are_one_line_naming_file_and_key(trained, tmp_path, case):
    run = copy_of(trained, tmp_path)
    damage, *texts = CRAFTED[case]
    damage(run)
    command = ("train", "--out", "run", "--resume", "--steps", "6", *TINY) if "state" in texts[0] or "rng" in \
        texts[0] or "cursor" in case else ("sample", "run", "--num", "1", "--steps", "2", "--quiet")
    one_line_error(ddpm_cli(*command, cwd=tmp_path), 2, *texts)


@pytest.mark.parametrize("args, text", [
    (["--data", ""], "--data '' is not allowed"),
    (["--lr", "-1"], "--lr -1.0 is not allowed; it must be in (0, inf)"),
    (["--num-steps", "1000000000"], "the noise schedule's tables (T = 1000000000) would need"),
    (["--model-overrides", '{"channels": [2048, 4096, 8192]}'], "more than this machine's memory"),
    (["--device", "meta"], "--device 'meta' is not allowed"),
])
def test_settings_that_cannot_work_are_refused_before_anything_is_written(tmp_path, args, text):
    result = ddpm_cli("train", "--out", "run", "--steps", "2", *TINY, *args, cwd=tmp_path)
    one_line_error(result, 2, text)
    assert not (tmp_path / "run").exists()


def test_a_bad_value_from_a_config_file_is_named_as_its_field_not_a_flag(tmp_path):
    (tmp_path / "c.json").write_text('{"train": {"lr": -1}}')
    one_line_error(ddpm_cli("train", "--config", "c.json", "--out", "run", "--steps", "2", *TINY, cwd=tmp_path), 2,
                   "config file 'c.json': train.lr = -1.0 is not allowed")
    assert not (tmp_path / "run").exists()


def test_a_config_file_holding_a_json_list_is_one_line(tmp_path):
    (tmp_path / "c.json").write_text("[1, 2]")
    one_line_error(ddpm_cli("train", "--config", "c.json", "--out", "run", cwd=tmp_path), 2, "c.json")
    assert not (tmp_path / "run").exists()
