"""The main job end to end: `ddpm train` and `ddpm sample` through the real command line, exact resume
after SIGKILL, clean stops on SIGINT/SIGTERM and non-finite losses, `ddpm.load`, and the config."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import ddpm
from ddpm.config import TRAINING_PRESETS, build_config, config_from_dict, config_to_dict, flag_fields
from ddpm.training import DataOrder, learning_rate

# A few-second image run: the default preset's small U-Net on the 8x8 square, T = 50.
TINY = ["--num-steps", "50", "--batch-size", "16", "--sample-steps", "5", "--num-samples", "4",
        "--sample-every", "0", "--eval-every", "0", "--log-every", "5", "--no-tensorboard", "--quiet"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def ddpm_cli(*args: str, cwd: Path, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "ddpm", *args], cwd=cwd, env=ENV, capture_output=True,
                            text=True, timeout=timeout)
    assert "internal error" not in result.stderr, result.stderr  # a bug report, not an error message
    if check and result.returncode != 0:
        raise AssertionError(f"ddpm {' '.join(args)} exited {result.returncode}: {result.stderr}")
    return result


def weights_bytes(run: Path) -> dict[str, bytes]:
    checkpoint = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    return {name: (checkpoint / name).read_bytes()
            for name in ("model.safetensors", "ema.safetensors", "state.safetensors")}


# --- config ---------------------------------------------------------------------------------------

def test_every_config_field_has_one_flag_and_flags_set_fields():
    flags = [f.flag for f in flag_fields()]
    assert len(flags) == len(set(flags)), "two fields share a flag"
    for required in ("--data", "--steps", "--batch-size", "--lr", "--image-size", "--channels",
                     "--checkpoint-every", "--sample-every", "--seed"):
        assert required in flags
    by_flag = {f.flag: f for f in flag_fields()}
    assert by_flag["--batch-size"].parse("64") == 64
    assert by_flag["--lr"].parse("3e-4") == pytest.approx(3e-4)
    assert by_flag["--grad-clip"].parse("none") is None
    assert by_flag["--model-overrides"].parse('{"ch": 64}') == {"ch": 64}
    with pytest.raises(ValueError, match="--batch-size"):
        by_flag["--batch-size"].parse("sixty")
    with pytest.raises(ValueError, match="--schedule"):
        by_flag["--schedule"].parse("quadratic")


def test_train_help_shows_the_default_presets_values(capsys):
    from ddpm.cli import main
    from ddpm.config import DEFAULT_PRESET

    with pytest.raises(SystemExit) as stopped:
        main(["train", "--help"])
    assert stopped.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # unwrapped
    config = build_config(DEFAULT_PRESET)
    for flag, value in (("--lr", config.train.lr), ("--warmup", config.train.warmup),
                        ("--steps", config.train.steps), ("--heldout", config.data.heldout)):
        assert re.search(rf"{flag} [A-Z_]+ (?:(?! --).)*\(default {value}[ )]", text), f"{flag}: {value} not shown"
    assert f"default preset, {DEFAULT_PRESET}" in text


def test_config_round_trips_through_json_and_rejects_unknown_keys():
    for preset in TRAINING_PRESETS:
        config = build_config(preset)
        assert config_from_dict(json.loads(json.dumps(config_to_dict(config)))) == config
    with pytest.raises(ValueError, match="train.stepz"):
        build_config("square", {"train": {"stepz": 3}})
    with pytest.raises(ValueError, match="train.steps = 0"):
        build_config("square", {"train": {"steps": 0}})
    with pytest.raises(ValueError, match="batch_size"):
        build_config("square", {"train": {"batch_size": -4}})
    with pytest.raises(ValueError, match=r"train.seed = 9223372036854775808 is not allowed; a seed lies between"):
        build_config("square", {"train": {"seed": 2**63}})  # torch would fail with "Overflow when unpacking"


def test_a_presets_model_overrides_stay_with_its_model():
    assert build_config("gradients").model.overrides == {"hidden_dim": 128}
    assert build_config("gradients", {"model": {"preset": "mlp-toy"}}).model.overrides == {"hidden_dim": 128}
    assert build_config("gradients", {"model": {"preset": "unet-small"}}).model.overrides == {}
    asked = build_config("gradients", {"model": {"preset": "unet-small", "overrides": {"channels": [8, 16]}}})
    assert asked.model.overrides == {"channels": [8, 16]}
    # On the preset's own model, a layer's overrides add to the preset's; a key it names replaces its value.
    assert build_config("gradients", {"model": {"overrides": {"num_blocks": 1}}}).model.overrides == {
        "hidden_dim": 128, "num_blocks": 1}
    assert build_config("mnist", {"model": {"overrides": {"ch": 48}}}, {"model": {"overrides": {"ch": 40}}}
                        ).model.overrides == {"attention_levels": [], "ch": 40}
    assert build_config("mnist", {"model": {"overrides": {"attention_levels": [2]}}}).model.overrides == {
        "attention_levels": [2], "ch": 24}


def test_a_presets_example_count_applies_to_generated_sets_only():
    assert build_config("toy2d").data.num_examples == 100_000
    assert build_config("toy2d", {"data": {"source": "moons"}}).data.num_examples == 100_000
    for source in ("points.npy", "photos/", "mnist"):  # stored data is used whole
        assert build_config("toy2d", {"data": {"source": source}}).data.num_examples is None
    asked = build_config("toy2d", {"data": {"source": "points.npy"}}, {"data": {"num_examples": 50}})
    assert asked.data.num_examples == 50


def test_paper_cifar10_recipe():
    config = build_config("cifar10")
    assert (config.model.preset, config.train.lr, config.train.warmup, config.train.batch_size,
            config.train.ema_decay, config.data.hflip, config.train.steps) == (
        "unet-cifar10", 2e-4, 5000, 128, 0.9999, True, 800_000)
    square = build_config("square")
    assert (square.diffusion.num_steps, square.train.batch_size, square.train.lr, square.data.channels,
            square.model.preset) == (1000, 128, 1e-4, 1, "unet-small")


def test_warmup_is_linear_then_constant():
    config = build_config("square", {"train": {"lr": 1e-3, "warmup": 10}})
    assert [learning_rate(config, s) for s in (0, 4, 9, 10, 500)] == pytest.approx([1e-4, 5e-4, 1e-3, 1e-3, 1e-3])


def test_data_order_visits_every_example_once_per_epoch_and_resumes_exactly():
    order = DataOrder(10, seed=3)
    first_epoch = torch.cat([order.next(4), order.next(4), order.next(2)])
    assert sorted(first_epoch.tolist()) == list(range(10))
    tensors, state = order.state()
    expected = torch.cat([order.next(7) for _ in range(3)])
    resumed = DataOrder(10, seed=99)
    resumed.load_state(tensors, state)
    assert torch.equal(torch.cat([resumed.next(7) for _ in range(3)]), expected)


# --- training through the CLI ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    cwd = tmp_path_factory.mktemp("tiny")
    ddpm_cli("train", "--out", "run", "--steps", "12", "--checkpoint-every", "4", "--keep-checkpoints", "2",
             "--num-steps", "50", "--batch-size", "16", "--sample-steps", "5", "--num-samples", "4",
             "--sample-every", "6", "--eval-every", "6", "--log-every", "5", "--no-tensorboard", "--quiet", cwd=cwd)
    return cwd / "run"


def test_run_directory_layout(tiny_run):
    checkpoints = tiny_run / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step_0000008", "step_0000012"]
    assert (checkpoints / "latest").read_text().strip() == "step_0000012"
    for name in ("model.safetensors", "ema.safetensors", "state.safetensors", "state.json", "config.json"):
        assert (checkpoints / "step_0000012" / name).is_file()
    assert sorted(p.name for p in (tiny_run / "samples").iterdir()) == ["step_0000006.png", "step_0000012.png"]
    records = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [5, 10, 12]
    assert {"loss", "loss_q0", "lr", "grad_norm", "examples_per_s"} <= set(records[0])
    assert "heldout_loss" in records[-1] and "heldout_loss_ema" in records[-1]
    saved = json.loads((tiny_run / "config.json").read_text())
    assert saved["config"]["train"]["steps"] == 12 and saved["data"]["sample_shape"] == [1, 8, 8]
    assert saved["model"]["preset"] == "unet-small" and saved["model"]["num_steps"] == 50


def test_a_runs_eta_goes_with_its_own_sampler_only(tiny_run):
    run = ddpm.load(tiny_run)
    run.config = dataclasses.replace(run.config, sample=dataclasses.replace(run.config.sample, sampler="ddim",
                                                                            eta=0.5, steps=5))
    # The run's DDIM draws with its eta 0.5; DDPM, asked for by name, gets all T steps and no eta.
    assert torch.equal(run.sample(2), run.sample(2, sampler="ddim", steps=5, eta=0.5))
    assert torch.equal(run.sample(2, sampler="ddpm"), run.sample(2, sampler="ddpm", steps=50, eta=0.0))
    with pytest.raises(ValueError, match="sample.eta = 0.5 is not allowed; it applies to sampler ddim only"):
        build_config("square", {"sample": {"sampler": "ddpm", "eta": 0.5}})


def test_load_gives_the_trained_weights_and_samples(tiny_run):
    run = ddpm.load(tiny_run)
    assert run.step == 12 and run.schedule.num_steps == 50 and run.sample_shape == (1, 8, 8)
    x = run.sample(3, sampler="ddim", steps=5)
    assert x.shape == (3, 1, 8, 8) and torch.isfinite(x).all()
    assert torch.equal(x, run.sample(3, sampler="ddim", steps=5)), "same seed, same samples"
    assert torch.equal(run.sample(5, sampler="ddim", steps=5, batch_size=2)[:2],
                       run.sample(2, sampler="ddim", steps=5)), "deterministic DDIM: batching changes nothing"
    assert torch.equal(run.sample(np.int64(2), sampler="ddim", steps=5, batch_size=np.int32(2)),
                       run.sample(2, sampler="ddim", steps=5)), "numpy integers are counts too"
    for bad, message in (({"n": True}, "n = True"), ({"n": 2, "batch_size": True}, "batch_size = True"),
                         ({"n": 2, "seed": 2**70}, "seed = 1180591620717411303424"),
                         ({"n": 2, "seed": "a"}, "seed = 'a'")):
        with pytest.raises(ValueError, match=message):
            run.sample(**bad)
    with pytest.raises(ValueError, match="a run is a path to its directory or a checkpoint folder; got int"):
        ddpm.load(3)
    with pytest.raises(ValueError, match="device = 'gpu0' is not allowed; use cpu, cuda"):
        ddpm.load(tiny_run, device="gpu0")
    from safetensors.torch import load_file
    saved = load_file(tiny_run / "checkpoints" / "step_0000012" / "ema.safetensors")
    assert all(torch.equal(saved[k], v) for k, v in run.ema_model.state_dict().items())
    # a checkpoint folder loads too
    older = ddpm.load(tiny_run / "checkpoints" / "step_0000008")
    assert older.step == 8


def test_sample_command_writes_grid_folder_npz_and_trajectories(tiny_run, tmp_path):
    ddpm_cli("sample", str(tiny_run), "--num", "6", "--sampler", "ddim", "--steps", "10", "--out", "grid.png",
             "--trajectory", "strip.png", "--quiet", cwd=tmp_path)
    assert Image.open(tmp_path / "grid.png").size[0] >= 256
    width, height = Image.open(tmp_path / "strip.png").size  # 6 rows (images), 11 columns (x_T .. x_0)
    assert width > 1.5 * height
    ddpm_cli("sample", str(tiny_run), "--num", "5", "--steps", "5", "--out", "each/", "--quiet", cwd=tmp_path)
    assert sorted(p.name for p in (tmp_path / "each").iterdir()) == [f"{i:06d}.png" for i in range(5)]
    ddpm_cli("sample", str(tiny_run), "--num", "7", "--batch-size", "3", "--sampler", "ddim", "--steps", "5",
             "--out", "x.npz", "--trajectory", "anim.gif", "--quiet", cwd=tmp_path)
    arr = np.load(tmp_path / "x.npz")["arr_0"]
    assert arr.shape == (7, 8, 8, 1) and arr.dtype == np.uint8
    gif = Image.open(tmp_path / "anim.gif")
    assert gif.is_animated and gif.n_frames > 2
    # The npz holds exactly what ddpm.load samples, quantised as the evaluation suites expect.
    expected = ddpm.load(tiny_run).sample(7, sampler="ddim", steps=5, batch_size=3, clip=True)
    assert np.array_equal(arr, ddpm.visualize.to_uint8(expected.clamp(-1, 1)).numpy())


def test_sample_command_takes_cuda_graph_on_and_off(tiny_run, tmp_path):
    # Off CUDA, --cuda-graph runs the fixed-buffer walk a graph would replay: the same samples.
    for flag in ("--cuda-graph", "--no-cuda-graph"):
        ddpm_cli("sample", str(tiny_run), "--num", "3", "--steps", "5", "--out", f"{flag[2:]}.npz", flag, "--quiet",
                 cwd=tmp_path)
    graph, plain = (np.load(tmp_path / f"{flag}.npz")["arr_0"] for flag in ("cuda-graph", "no-cuda-graph"))
    assert graph.shape == (3, 8, 8, 1) and np.array_equal(graph, plain)


def test_sample_writes_where_it_says_and_replaces_only_its_own_files(tiny_run, tmp_path):
    # --out X.NPZ is that file (np.savez given a name would write X.NPZ.npz), a second run refuses it.
    ddpm_cli("sample", str(tiny_run), "--num", "2", "--steps", "2", "--out", "UP.NPZ", "--quiet", cwd=tmp_path)
    assert np.load(tmp_path / "UP.NPZ")["arr_0"].shape == (2, 8, 8, 1) and not (tmp_path / "UP.NPZ.npz").exists()
    assert ddpm_cli("sample", str(tiny_run), "--out", "UP.NPZ", "--quiet", cwd=tmp_path, check=False).returncode == 2
    # A trailing slash asks for a folder of PNGs, whatever the name.
    ddpm_cli("sample", str(tiny_run), "--num", "2", "--steps", "2", "--out", "x.npz/", "--quiet", cwd=tmp_path)
    assert sorted(p.name for p in (tmp_path / "x.npz").iterdir()) == ["000000.png", "000001.png"]
    # --overwrite into a folder removes the numbered PNGs of an earlier run, and nothing else.
    (tmp_path / "x.npz" / "notes.txt").write_text("mine")
    ddpm_cli("sample", str(tiny_run), "--num", "1", "--steps", "2", "--out", "x.npz/", "--overwrite", "--quiet",
             cwd=tmp_path)
    assert sorted(p.name for p in (tmp_path / "x.npz").iterdir()) == ["000000.png", "notes.txt"]
    # Run inside a checkpoint folder, the default output goes to the run's samples/, not into the checkpoint.
    run = shutil.copytree(tiny_run, tmp_path / "run")
    checkpoint = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    before = sorted(p.name for p in checkpoint.iterdir())
    ddpm_cli("sample", ".", "--num", "1", "--steps", "2", "--seed", "77", "--quiet", cwd=checkpoint)
    assert sorted(p.name for p in checkpoint.iterdir()) == before
    assert (run / "samples" / "sample-77.png").is_file()
    # The default name is never reused: a second run gets sample-77-2.png.
    first = (run / "samples" / "sample-77.png").read_bytes()
    ddpm_cli("sample", str(run), "--num", "1", "--steps", "2", "--seed", "77", "--quiet", cwd=tmp_path)
    assert (run / "samples" / "sample-77-2.png").is_file() and (run / "samples" / "sample-77.png").read_bytes() == first


def test_point_runs_write_float_npz_and_scatter(tmp_path):
    ddpm_cli("train", "--preset", "toy2d", "--out", "pts", "--steps", "5", "--checkpoint-every", "5",
             "--model-overrides", '{"hidden_dim": 32, "num_blocks": 1}', "--num-examples", "500", "--heldout", "50",
             *TINY, cwd=tmp_path)
    ddpm_cli("sample", "pts", "--num", "9", "--sampler", "ddim", "--steps", "5", "--out", "p.npz", "--quiet",
             cwd=tmp_path)
    arr = np.load(tmp_path / "p.npz")["arr_0"]
    assert arr.shape == (9, 2) and arr.dtype == np.float32
    ddpm_cli("sample", "pts", "--num", "50", "--steps", "5", "--out", "p.png", "--trajectory", "t.png", "--quiet",
             cwd=tmp_path)
    assert Image.open(tmp_path / "p.png").size[0] > 100 and (tmp_path / "t.png").is_file()
    gif = ddpm_cli("sample", "pts", "--out", "q.png", "--trajectory", "t.gif", "--quiet", cwd=tmp_path, check=False)
    assert gif.returncode == 2 and "six scatter panels" in gif.stderr and not (tmp_path / "q.png").exists()


def test_overwrite_replaces_the_whole_run(tmp_path):
    ddpm_cli("train", "--out", "run", "--steps", "4", "--checkpoint-every", "2", *TINY, cwd=tmp_path)
    ddpm_cli("sample", "run", "--num", "2", "--steps", "2", "--quiet", cwd=tmp_path)  # samples/sample-0.png
    ddpm_cli("train", "--out", "run", "--overwrite", "--steps", "3", "--checkpoint-every", "3", "--lr", "3e-4",
             *TINY, cwd=tmp_path)
    run = tmp_path / "run"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step_0000003"]
    assert not (run / "samples" / "sample-0.png").exists()
    assert json.loads((run / "config.json").read_text())["config"]["train"]["lr"] == 3e-4
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1  # the new run's step 3 only


def test_runs_on_points_of_three_coordinates_save_scatters_of_the_first_two(tmp_path):
    points = np.random.default_rng(0).normal(size=(200, 3)).astype(np.float32)
    np.save(tmp_path / "p3.npy", points)
    # Without --num-examples: toy2d's 100000 is for its generated points, a file is used whole.
    ddpm_cli("train", "--preset", "toy2d", "--data", "p3.npy", "--out", "run",
             "--steps", "4", "--checkpoint-every", "4", "--model-overrides", '{"hidden_dim": 16, "num_blocks": 1}', "--heldout", "20",
             *TINY, cwd=tmp_path)
    grid = tmp_path / "run" / "samples" / "step_0000004.png"
    assert grid.is_file() and Image.open(grid).size[0] > Image.open(grid).size[1]  # two panels side by side
    ddpm_cli("sample", "run", "--num", "5", "--steps", "5", "--out", "p.npz", "--quiet", cwd=tmp_path)
    assert np.load(tmp_path / "p.npz")["arr_0"].shape == (5, 3)


def test_points_of_one_coordinate_are_sampled_to_npz(tmp_path):
    np.save(tmp_path / "p1.npy", np.random.default_rng(0).normal(size=(200, 1)).astype(np.float32))
    trained = ddpm_cli("train", "--preset", "toy2d", "--data", "p1.npy", "--out", "run", "--steps", "4",
                       "--checkpoint-every", "4", "--model-overrides", '{"hidden_dim": 16, "num_blocks": 1}',
                       "--heldout", "20", *TINY, cwd=tmp_path)
    assert "samples in" not in trained.stdout  # one coordinate makes no picture, so there is no folder
    ddpm_cli("sample", "run", "--num", "5", "--steps", "5", "--quiet", cwd=tmp_path)
    assert np.load(tmp_path / "run" / "samples" / "sample-0.npz")["arr_0"].shape == (5, 1)
    refused = ddpm_cli("sample", "run", "--out", "x.png", "--quiet", cwd=tmp_path, check=False)
    assert refused.returncode == 2 and "--out x.npz" in refused.stderr and not (tmp_path / "x.png").exists()


def test_sigkill_then_resume_is_bitwise_identical_to_an_uninterrupted_run(tmp_path):
    args = ["--steps", "40", "--checkpoint-every", "3", "--eval-every", "0", "--num-steps", "50",
            "--batch-size", "16", "--sample-steps", "5", "--num-samples", "2", "--sample-every", "0",
            "--no-tensorboard", "--quiet", "--model-overrides", '{"channels": [8, 16, 32]}']
    ddpm_cli("train", "--out", "straight", *args, cwd=tmp_path)

    process = subprocess.Popen([sys.executable, "-m", "ddpm", "train", "--out", "killed", *args], cwd=tmp_path,
                               env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = tmp_path / "killed" / "checkpoints" / "latest"
    deadline = time.monotonic() + 60
    while not latest.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(random.Random().uniform(0.0, 0.3))  # an arbitrary moment: mid-step, mid-checkpoint...
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed; make it longer"
    killed_at = (tmp_path / "killed" / "checkpoints" / "latest").read_text().strip()
    assert killed_at != "step_0000040"

    ddpm_cli("train", "--resume", "--out", "killed", *args, cwd=tmp_path)
    assert weights_bytes(tmp_path / "killed") == weights_bytes(tmp_path / "straight")
    # The metrics of the redone steps are not doubled.
    steps = [json.loads(line)["step"] for line in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps))


def test_resuming_a_run_killed_before_its_first_checkpoint_logs_each_step_once(tmp_path):
    args = ["--out", "run", "--steps", "10", "--checkpoint-every", "10", *TINY]
    ddpm_cli("train", *args, cwd=tmp_path)
    shutil.rmtree(tmp_path / "run" / "checkpoints")  # as if killed after logging steps 5 and 10
    # Resumed from step 0, with the data now somewhere else (data_dir may change on resume).
    ddpm_cli("train", "--resume", *args, "--data-dir", str(tmp_path / "elsewhere"), cwd=tmp_path)
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [5, 10]


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_sigint_and_sigterm_write_a_checkpoint_and_exit_with_one_line(tmp_path, signum, code):
    process = subprocess.Popen(
        [sys.executable, "-m", "ddpm", "train", "--out", "run", "--steps", "100000", "--checkpoint-every", "100000",
         *TINY], cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.monotonic() + 60
    while not (metrics.exists() and metrics.stat().st_size > 0) and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == code
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and signal.Signals(signum).name in lines[0] and "Traceback" not in stderr
    run = ddpm.load(tmp_path / "run")
    assert run.step >= 5 and f"step_{run.step:07d}" in lines[0]


def test_a_non_finite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    result = ddpm_cli("train", "--out", "run", "--steps", "50", "--checkpoint-every", "1", "--lr", "1e30",
                      "--grad-clip", "none", *TINY, cwd=tmp_path, check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    message = result.stderr.strip()
    assert "\n" not in message and ("nan" in message or "inf" in message)
    bad_step = int(message.split(" at step ")[1].split(";")[0])
    latest = (tmp_path / "run" / "checkpoints" / "latest").read_text().strip()
    assert latest == f"step_{bad_step - 1:07d}" and latest in message
    run = ddpm.load(tmp_path / "run")
    assert all(torch.isfinite(p).all() for p in run.model.parameters())


def test_resume_of_a_finished_run_extends_it_to_more_steps(tiny_run, tmp_path):
    import shutil
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    ddpm_cli("train", "--resume", "--out", str(run), "--steps", "14", "--quiet", cwd=tmp_path)
    assert ddpm.load(run).step == 14


def test_the_training_loop_draws_every_timestep_including_0():
    # Mistake 4 of the tutorials, checked where the loop draws its batch, not only in the helper.
    from ddpm.training import draw_batch
    schedule = ddpm.NoiseSchedule("linear", 4)
    data = torch.zeros(10, 2)
    t = draw_batch(data, DataOrder(10, 0), torch.Generator().manual_seed(0), schedule, 4000, hflip=False)[1]
    counts = torch.bincount(t, minlength=4)
    assert counts.sum() == 4000 and t.min() == 0 and t.max() == 3
    assert ((counts - 1000).abs() < 120).all(), counts  # about 4 standard deviations of a binomial


def _tiny_points_config(**train):
    return build_config("toy2d", {
        "model": {"overrides": {"hidden_dim": 32, "num_blocks": 1}},
        "data": {"num_examples": 256, "heldout": 0},
        "diffusion": {"num_steps": 50},
        "train": {"steps": 6, "batch_size": 32, "checkpoint_every": 6, "sample_every": 0, "eval_every": 0,
                  "log_every": 3, "tensorboard": False, **train},
        "sample": {"steps": 5, "num_samples": 8}})


class _HostSyncs(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the operations that make the host wait for a tensor's value (.item(), float(), bool())."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_training_steps_make_no_host_sync_between_logs_and_checkpoints(tmp_path):
    # The syncs come from logging, checkpoints and samples, which happen at the end here: training 6 or
    # 24 steps must make the same number of them, so a step itself makes none.
    from ddpm import training
    counts = {}
    for steps in (6, 24):
        config = _tiny_points_config(steps=steps, log_every=steps, checkpoint_every=steps)
        with _HostSyncs() as syncs:
            training.train(config, tmp_path / str(steps), progress=False, log=lambda m: None)
        counts[steps] = syncs.count
    assert counts[6] == counts[24] > 0


def _loss_goes_bad_at_step_5(monkeypatch, value: float) -> list[None]:
    """Makes the training loop's per-example losses of step 5 ``value`` (nan or inf); the list it
    returns grows by one per step the loop computes."""
    from ddpm import training
    calls = []
    original = training.per_example_loss

    def loss(*args, **kwargs):
        losses = original(*args, **kwargs)
        calls.append(None)
        return losses * value if len(calls) == 5 else losses

    monkeypatch.setattr(training, "per_example_loss", loss)
    return calls


def test_a_non_finite_loss_between_checks_is_reported_at_its_step_and_saves_nothing(tmp_path, monkeypatch):
    # The loss of step 5 is made nan; it is read only at the next log (step 8) or checkpoint, which must
    # then stop naming step 5 and leave the checkpoint of step 4 as the latest.
    from ddpm import training
    calls = _loss_goes_bad_at_step_5(monkeypatch, float("nan"))
    config = _tiny_points_config(steps=12, log_every=8, checkpoint_every=4)
    with pytest.raises(training.NonFiniteLoss, match=r"became nan at step 5; the last good checkpoint .*step_0000004"):
        training.train(config, tmp_path / "run", progress=False, log=lambda m: None)
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "step_0000004"
    assert len(calls) == 8  # it ran on to the check at step 8, which wrote nothing
    assert not (tmp_path / "run" / "checkpoints" / "step_0000008").exists()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(row["step"] < 5 for row in rows)


def test_a_non_finite_loss_is_caught_before_a_sample_grid_too(tmp_path, monkeypatch):
    # No log or checkpoint before step 12; the sample grid of step 6 is the first thing written.
    from ddpm import training
    calls = _loss_goes_bad_at_step_5(monkeypatch, float("inf"))
    config = _tiny_points_config(steps=12, log_every=12, checkpoint_every=12, sample_every=6)
    with pytest.raises(training.NonFiniteLoss, match="became inf at step 5; no checkpoint had been written yet"):
        training.train(config, tmp_path / "run", progress=False, log=lambda m: None)
    assert len(calls) == 6 and not (tmp_path / "run" / "samples").exists()


def test_heldout_loss_is_weighted_as_the_training_loss():
    # With Min-SNR weighting the held-out loss must be the weighted loss on the held-out batch, as the
    # training loss is: the mean over examples of w(t) * ||eps - eps_theta||^2, w = min(SNR, 5) / SNR.
    from ddpm import training
    from ddpm.schedule import NoiseSchedule
    config = build_config("toy2d", {"model": {"overrides": {"hidden_dim": 16, "num_blocks": 1}},
                                    "diffusion": {"num_steps": 50, "weighting": "min_snr"}})
    model = ddpm.build.build_model_for(config, "points", (2,), seed=0)
    schedule = NoiseSchedule("linear", 50)
    heldout = torch.randn(300, 2, generator=torch.Generator().manual_seed(1))
    grad_enabled = []  # the evaluation records no autograd graph
    model.register_forward_hook(lambda module, args, out: grad_enabled.append(torch.is_grad_enabled()))
    got = training.heldout_losses(model, model, schedule, heldout, config)["heldout_loss"]
    assert grad_enabled and not any(grad_enabled)
    generator = torch.Generator().manual_seed(config.train.seed + 3)  # the draws heldout_losses makes
    t = ddpm.diffusion.sample_timesteps(schedule, 300, device="cpu", generator=generator)
    noise = torch.randn(heldout.shape, generator=generator)
    with torch.no_grad():
        snr = schedule.alphas_cumprod[t] / (1 - schedule.alphas_cumprod[t])
        x_t = schedule.alphas_cumprod[t].sqrt()[:, None] * heldout + (1 - schedule.alphas_cumprod[t]).sqrt()[:, None] * noise
        mse = (model(x_t, t) - noise).square().mean(dim=1)
    expected = (snr.clamp(max=5.0) / snr * mse).mean().item()
    assert got == pytest.approx(expected, rel=1e-5)
    assert abs(got - mse.mean().item()) > 1e-3 * got  # the weighting changes it, so the test can tell


def test_gradient_accumulation_gives_the_same_weights(tmp_path, monkeypatch):
    from ddpm import training
    sizes = []
    original = training.per_example_loss
    monkeypatch.setattr(training, "per_example_loss",
                        lambda model, schedule, x0, *args, **kw: sizes.append(len(x0)) or original(model, schedule, x0, *args, **kw))
    whole = training.train(_tiny_points_config(), tmp_path / "a", progress=False, log=lambda m: None)
    assert sizes == [32] * 6
    sizes.clear()
    split = training.train(_tiny_points_config(grad_accum=4), tmp_path / "b", progress=False, log=lambda m: None)
    assert sizes == [8] * 24
    a, b = ddpm.load(whole.run_dir), ddpm.load(split.run_dir)
    for (name, p), q in zip(a.model.named_parameters(), b.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    assert split.step == whole.step == 6


def test_config_file_sets_fields_and_flags_win(tmp_path):
    (tmp_path / "run.toml").write_text('preset = "toy2d"\n[train]\nsteps = 4\nbatch_size = 16\n'
                                       '[model.overrides]\nhidden_dim = 16\nnum_blocks = 1\n'
                                       '[data]\nnum_examples = 100\nheldout = 0\n')
    ddpm_cli("train", "--config", "run.toml", "--out", "run", "--batch-size", "8", "--checkpoint-every", "4",
             "--num-steps", "20", "--sample-steps", "2", "--num-samples", "4", "--sample-every", "0",
             "--eval-every", "0", "--no-tensorboard", "--quiet", cwd=tmp_path)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["config"]["preset"] == "toy2d" and saved["config"]["train"]["steps"] == 4
    assert saved["config"]["train"]["batch_size"] == 8 and saved["model"]["hidden_dim"] == 16


def test_bf16_autocast_trains_and_tracks_fp32(tmp_path):
    from ddpm import training
    losses = {}
    for precision in ("fp32", "bf16"):
        config = _tiny_points_config(precision=precision, steps=30, log_every=30, lr=3e-3)
        losses[precision] = training.train(config, tmp_path / precision, progress=False, log=lambda m: None).loss
    assert all(math.isfinite(v) for v in losses.values())
    assert abs(losses["bf16"] - losses["fp32"]) < 0.1 * losses["fp32"], losses
    assert losses["bf16"] != losses["fp32"], "bf16 autocast changed nothing: was it on?"


@pytest.mark.parametrize("cpu_has_bf16", [True, False])
def test_auto_precision_is_bf16_on_a_cpu_with_bf16_instructions_only(tmp_path, monkeypatch, cpu_has_bf16):
    from ddpm import training
    from ddpm.build import training_precision, wants_channels_last
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_bf16": cpu_has_bf16, "amx_bf16": False})
    expected = "bf16" if cpu_has_bf16 else "fp32"
    config = build_config("mnist", {"train": {"precision": "auto"}})
    assert training_precision(config, torch.device("cpu")) == expected
    assert training_precision(config, torch.device("cuda")) == "fp32"  # bf16 on a GPU is not measured here
    assert wants_channels_last(config, torch.device("cpu")) == (not cpu_has_bf16)
    # Training with auto is training with what it resolves to, loss for loss, and says which it chose.
    losses, notes = {}, []
    for precision in ("auto", expected):
        config = _tiny_points_config(precision=precision, steps=30, log_every=30, lr=3e-3)
        losses[precision] = training.train(config, tmp_path / precision, progress=False, log=notes.append).loss
    assert losses["auto"] == losses[expected]
    assert f"train.precision auto: {expected} here" in notes


def test_resume_into_a_folder_that_is_not_a_run_touches_nothing(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    result = ddpm_cli("train", "--resume", "--out", "mine", *TINY, cwd=tmp_path, check=False)
    assert result.returncode == 2 and "not a ddpm run directory" in result.stderr
    assert [p.name for p in folder.iterdir()] == ["notes.txt"] and (folder / "notes.txt").read_text() == "keep me"


def test_tensorboard_events_hold_the_logged_metrics(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from ddpm import training
    result = training.train(_tiny_points_config(tensorboard=True), tmp_path / "run", progress=False,
                            log=lambda m: None)
    events = EventAccumulator(str(result.run_dir / "tensorboard"))
    events.Reload()
    loss = events.Scalars("loss")
    assert [e.step for e in loss] == [3, 6]
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [e.value for e in loss] == pytest.approx([r["loss"] for r in records], rel=1e-5)
    assert "loss_q0" in events.Tags()["scalars"]


def test_compiled_training_matches_plain_training(tmp_path):
    # torch.compile of the training forward (about 25 s of compiling on 2 CPU cores) changes rounding only.
    from ddpm import training
    runs = {flag: training.train(_tiny_points_config(compile=flag), tmp_path / str(flag), progress=False,
                                 log=lambda m: None).run_dir for flag in (False, True)}
    plain, compiled = ddpm.load(runs[False]), ddpm.load(runs[True])
    for (name, p), q in zip(plain.model.named_parameters(), compiled.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)


def _wandb_history(path: Path) -> list[dict[str, float]]:
    """The history rows of an offline wandb run file. The file is a LevelDB-style log (a 7-byte file
    header, then records in 32 KiB blocks, each chunk with a 7-byte header: crc32, length, type), each
    record a wandb_internal_pb2.Record protobuf."""
    from wandb.proto import wandb_internal_pb2

    raw, position, pending, rows = path.read_bytes(), 7, b"", []
    while position + 7 <= len(raw):
        if 32768 - position % 32768 < 7:  # a block's tail too short for a header is padding
            position += 32768 - position % 32768
            continue
        _, length, kind = struct.unpack("<IHB", raw[position:position + 7])
        pending += raw[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return rows


def test_wandb_offline_logs_what_metrics_jsonl_holds(tmp_path, monkeypatch):
    """--wandb with WANDB_MODE=offline writes an offline run inside the run directory whose history
    rows are the metrics.jsonl rows, step for step."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    from ddpm import training
    result = training.train(_tiny_points_config(wandb=True), tmp_path / "run", progress=False, log=lambda m: None)
    files = list((result.run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1, files
    # wandb's own service process writes the file; on a busy machine it may still be writing when
    # finish() has returned (seen once in a full CI run), so give it up to 30 s to catch up.
    deadline = time.monotonic() + 30
    while len(rows := _wandb_history(files[0])) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    logged = {int(row["_step"]): row for row in rows}
    written = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert sorted(logged) == [row["step"] for row in written] == [3, 6]
    for row in written:
        for key, value in row.items():
            if key != "step":
                assert logged[row["step"]][key] == pytest.approx(value, abs=1e-6), key


def test_fast_path_trains_the_weights_of_the_plain_path(tmp_path):
    # channels-last activations and fused AdamW (the defaults) against PyTorch's default layout and
    # AdamW's per-tensor loop: other kernels, other rounding, the same training. Dropout is off, since
    # its masks come from the same generator but are drawn for differently laid-out tensors.
    from ddpm import training

    def config(fast: bool):
        return build_config("square-fast", {
            "model": {"preset": "unet", "dropout": 0.0,
                      "overrides": {"ch": 16, "channel_mult": [1, 2], "num_res_blocks": 1, "num_groups": 8,
                                    "attention_resolutions": [4]}},
            "diffusion": {"num_steps": 50},
            "train": {"steps": 8, "batch_size": 16, "warmup": 0, "checkpoint_every": 8, "sample_every": 0,
                      "eval_every": 0, "log_every": 4, "tensorboard": False,
                      "channels_last": fast, "fused_optimizer": fast},
            "sample": {"steps": 5, "num_samples": 4}})

    runs = {fast: training.train(config(fast), tmp_path / str(fast), progress=False, log=lambda m: None)
            for fast in (False, True)}
    plain, fast = ddpm.load(runs[False].run_dir), ddpm.load(runs[True].run_dir)
    assert fast.model.mid_block1.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert not plain.model.mid_block1.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    moved = 0.0
    initial = ddpm.models.build_model_from_dict(json.loads((runs[False].run_dir / "config.json").read_text())["model"],
                                                seed=0)
    for (name, p), q, p0 in zip(plain.model.named_parameters(), fast.model.parameters(), initial.parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=2e-5, msg=name)
        moved = max(moved, (p - p0).abs().max().item())
    assert moved > 1e-3, "the weights hardly moved: the comparison says nothing"
    assert runs[True].loss == pytest.approx(runs[False].loss, rel=1e-4)


def test_channels_last_is_the_default_except_bf16_on_a_cpu():
    from ddpm.build import wants_channels_last
    cpu, cuda = torch.device("cpu"), torch.device("cuda")  # a device object needs no GPU
    assert wants_channels_last(build_config("mnist", {"train": {"precision": "fp32"}}), cpu)
    assert not wants_channels_last(build_config("mnist", {"train": {"precision": "bf16"}}), cpu)
    assert wants_channels_last(build_config("mnist", {"train": {"precision": "bf16"}}), cuda)
    assert not wants_channels_last(build_config("mnist", {"train": {"channels_last": False}}), cuda)
