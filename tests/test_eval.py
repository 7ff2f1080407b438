"""``ddpm eval`` end to end on tiny runs: which metrics each kind of run gets, the JSON it writes,
and one-line errors for what a run cannot be measured with."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ddpm
from ddpm.cli import main
from ddpm.config import build_config
from ddpm.evaluation.evaluate import EvalOptions, evaluate_run
from ddpm.evaluation.metrics import square_error
from ddpm.training import train

TINY_TRAIN = {"steps": 4, "batch_size": 16, "checkpoint_every": 4, "sample_every": 0, "eval_every": 0,
              "tensorboard": False}


def _train(root: Path, preset: str, **layers) -> Path:
    config = build_config(preset, {"train": TINY_TRAIN, **layers})
    return train(config, root / preset, progress=False, log=lambda message: None).run_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    return {
        "gradients": _train(root, "gradients", diffusion={"num_steps": 20, "beta_start": 5e-3, "beta_end": 0.5}),
        "square": _train(root, "square-fast", diffusion={"num_steps": 20}),
        "toy2d": _train(root, "toy2d", model={"overrides": {"hidden_dim": 32, "num_blocks": 1}},
                        data={"num_examples": 256, "heldout": 0}, diffusion={"num_steps": 20}),
    }


def _eval(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["eval", *args, "--quiet"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_gradients_run_gets_gradient_distance_and_bpd(runs, capsys):
    code, out, err = _eval(capsys, str(runs["gradients"]), "--num", "32", "--heldout", "8")
    assert code == 0, err
    saved = json.loads((runs["gradients"] / "eval" / "step_0000004.json").read_text())
    assert list(saved["metrics"]) == ["gradient", "bpd"]
    gradient, bpd = saved["metrics"]["gradient"], saved["metrics"]["bpd"]
    assert gradient["samples"] == 32 and 0 <= gradient["real_data_mean"] < 0.01 < gradient["mean"]
    assert bpd["examples"] == 8 and bpd["decoder_kind"].startswith("discretized")
    assert bpd["bpd"] == pytest.approx(bpd["prior"] + bpd["decoder"] + bpd["kl_terms"], rel=1e-9)
    assert "gradient" in out and "bpd" in out and "wrote" in out
    # A second evaluation never overwrites the first.
    assert _eval(capsys, str(runs["gradients"]), "--metric", "gradient", "--num", "4")[0] == 0
    assert (runs["gradients"] / "eval" / "step_0000004-2.json").is_file()


def _refuse_constant(name: str):
    raise AssertionError(f"{name} in a JSON file: not JSON, strict readers refuse it")


def test_one_heldout_example_has_no_standard_error_and_the_file_stays_json(runs, capsys, tmp_path):
    code, out, err = _eval(capsys, str(runs["square"]), "--metric", "bpd", "--heldout", "1",
                           "--json", str(tmp_path / "e.json"))
    assert code == 0, err
    bpd = json.loads((tmp_path / "e.json").read_text(), parse_constant=_refuse_constant)["metrics"]["bpd"]
    assert bpd["examples"] == 1 and bpd["standard_error"] is None and math.isfinite(bpd["bpd"])


def test_square_metric_is_the_error_of_the_samples_it_draws(runs):
    """The metric measures the run's own samples: the same seed gives the same draw, clipped and
    rounded to 8 bits, and its RMS error to the square is what the report says."""
    run = ddpm.load(runs["square"])
    options = EvalOptions(num=6, sample=run.sample_options(sampler="ddim", steps=5), progress=False)
    report = evaluate_run(run, ["square"], options)
    x = run.sample(6, sampler="ddim", steps=5, seed=0, batch_size=250)
    x = ((x.clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1
    target = torch.full((1, 8, 8), -1.0)
    target[:, 2:6, 2:6] = 1.0
    errors = square_error(x, target)
    assert report["square"]["mean"] == pytest.approx(float(errors.mean()), rel=1e-6)
    assert report["square"]["sampler"] == "ddim, 5 steps"


def test_points_run_gets_energy_distance_beside_its_noise_floor(runs, capsys, tmp_path):
    out_json = tmp_path / "toy.json"
    code, out, err = _eval(capsys, str(runs["toy2d"]), "--num", "400", "--heldout", "16", "--sampler", "ddim",
                           "--steps", "5", "--json", str(out_json))
    assert code == 0, err
    metrics = json.loads(out_json.read_text())["metrics"]
    assert list(metrics) == ["energy", "bpd"]
    energy = metrics["energy"]
    # Four training steps make a blob, not 8 Gaussians: clearly farther than two draws of the data
    # (whose distance, the noise floor, fluctuates by about 0.01 at 400 points).
    assert abs(energy["noise_floor"]) < 0.03 and energy["energy_distance"] > energy["noise_floor"] + 0.04
    assert metrics["bpd"]["decoder_kind"].startswith("gaussian") and math.isfinite(metrics["bpd"]["bpd"])


def test_the_energy_noise_floor_compares_disjoint_points_of_a_small_file(tmp_path, capsys, monkeypatch):
    import numpy as np

    from ddpm.evaluation import evaluate

    np.save(tmp_path / "p.npy", np.random.default_rng(0).normal(size=(50, 2)).astype(np.float32))
    run = _train(tmp_path, "toy2d", model={"overrides": {"hidden_dim": 16, "num_blocks": 1}},
                 data={"source": str(tmp_path / "p.npy"), "heldout": 0}, diffusion={"num_steps": 20})
    calls = []
    monkeypatch.setattr(evaluate, "energy_distance", lambda x, y: calls.append((x, y)) or 0.0)
    code, out, err = _eval(capsys, str(run), "--metric", "energy", "--num", "100", "--steps", "5")
    assert code == 0, err
    (samples, data), (other, data_again) = calls
    # As many samples as held-out points on each side (25 of the 100 drawn), so both biases match.
    assert len(samples) == 25 and data is data_again and len(data) == len(other) == 25
    assert not (other[:, None, :] == data[None, :, :]).all(-1).any(), "a point in both sets"
    code, out, err = _eval(capsys, str(run), "--metric", "energy", "--num", "1")
    assert code == 2 and "at least 2 samples" in err and "--num 1" in err


def test_fid_with_an_inception_weights_file(runs, capsys, tmp_path):
    """The Inception pipeline end to end with a weights file of the right layout (random weights:
    the real file cannot be downloaded here, so the number means nothing but must be finite)."""
    from safetensors.torch import save_file

    from ddpm.evaluation.inception import FIDInceptionV3

    torch.manual_seed(0)
    weights = tmp_path / "inception.safetensors"
    save_file({k: v.contiguous() for k, v in FIDInceptionV3().state_dict().items()}, str(weights))
    code, out, err = _eval(capsys, str(runs["gradients"]), "--metric", "fid", "--num", "4",
                           "--inception-weights", str(weights), "--json", str(tmp_path / "fid.json"))
    assert code == 0, err
    fid = json.loads((tmp_path / "fid.json").read_text())["metrics"]["fid"]
    assert math.isfinite(fid["fid"]) and fid["fid"] >= 0 and fid["samples"] == 4


@pytest.mark.parametrize("args, message", [
    (["--metric", "energy"], "compares point sets"),
    (["--metric", "fid-mnist"], "needs a run trained on mnist"),
    (["--metric", "square"], "needs a run trained on square"),
    (["--metric", "fid"], "DDPM_INCEPTION_WEIGHTS"),
    (["--metric", "nonsense"], "invalid choice"),
    (["--steps", "500"], "this run has T = 20"),
    (["--num", "0"], "--num 0 is not allowed; use an integer >= 1"),
    (["--eta", "2"], "--eta 2.0 is not allowed; it must be in [0, 1]"),
    (["--json", "x.txt"], "must end in .json"),
])
def test_bad_eval_input_is_one_line(runs, capsys, args, message, monkeypatch):
    monkeypatch.delenv("DDPM_INCEPTION_WEIGHTS", raising=False)
    before = sorted(p.name for p in runs["gradients"].rglob("*"))
    code, out, err = _eval(capsys, str(runs["gradients"]), *args)
    assert code == 2
    assert err.count("\n") == 1 and message in err, err
    assert sorted(p.name for p in runs["gradients"].rglob("*")) == before


def test_eval_refuses_to_overwrite_a_json_file(runs, capsys, tmp_path):
    existing = tmp_path / "kept.json"
    existing.write_text("{}")
    code, _, err = _eval(capsys, str(runs["gradients"]), "--json", str(existing))
    assert code == 2 and "already exists" in err and existing.read_text() == "{}"


def test_eval_through_the_real_command(runs, tmp_path):
    """The installed entry point: a missing run is one line and exit 2, no traceback."""
    result = subprocess.run([sys.executable, "-m", "ddpm", "eval", str(tmp_path / "missing")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_fid_mnist_on_an_mnist_run(tmp_path, capsys, monkeypatch, classifier_cache):
    """An MNIST run barely trained (2 steps) is far from the digits: its FID-MNIST is well above the
    FID of as many real training digits, and the classifier is sure of few of its samples."""
    from conftest import MNIST_DIR

    monkeypatch.setenv("DDPM_CACHE", str(classifier_cache))
    config = build_config("mnist", {"data": {"data_dir": str(MNIST_DIR), "heldout": 0},
                                    "train": {**TINY_TRAIN, "steps": 2, "checkpoint_every": 2, "warmup": 0}})
    run_dir = train(config, tmp_path / "mnist", progress=False, log=lambda message: None).run_dir
    code, out, err = _eval(capsys, str(run_dir), "--metric", "fid-mnist", "--num", "64", "--sampler", "ddim",
                           "--steps", "4", "--json", str(tmp_path / "fid.json"))
    assert code == 0, err
    fid = json.loads((tmp_path / "fid.json").read_text())["metrics"]["fid-mnist"]
    assert fid["classifier_test_accuracy"] >= 0.99 and fid["samples"] == 64
    assert fid["fid"] > 10 * fid["fid_of_real_digits"] > 0
    assert len(fid["class_histogram"]) == 10 and sum(fid["class_histogram"]) == pytest.approx(1.0, abs=1e-3)
    assert 0 <= fid["confident_fraction"] < 0.5


def test_cifar10_preset_run_gets_bpd_on_its_test_split(tmp_path, capsys):
    """The cifar10 preset (its network shrunk, T = 20) on stand-in CIFAR-10 batches: eval defaults to
    bits/dim, read from the test batch, and measures exactly the examples it holds (3 of them)."""
    from test_data import _write_cifar

    _write_cifar(tmp_path / "cifar")
    config = build_config("cifar10", {
        "data": {"data_dir": str(tmp_path / "cifar"), "heldout": 2},
        "model": {"overrides": {"ch": 16, "channel_mult": [1, 2], "num_res_blocks": 1, "attention_resolutions": [],
                                "num_groups": 8}},
        "diffusion": {"num_steps": 20}, "sample": {"steps": 5, "num_samples": 4},
        "train": {**TINY_TRAIN, "steps": 2, "checkpoint_every": 2, "warmup": 0}})
    run_dir = train(config, tmp_path / "run", progress=False, log=lambda message: None).run_dir
    code, out, err = _eval(capsys, str(run_dir), "--heldout", "50", "--json", str(tmp_path / "e.json"))
    assert code == 0, err
    bpd = json.loads((tmp_path / "e.json").read_text())["metrics"]["bpd"]
    assert list(json.loads((tmp_path / "e.json").read_text())["metrics"]) == ["bpd"]
    assert bpd["examples"] == 3 and 0 < bpd["bpd"] < 30


# --- sample quality logged during training (--eval-metric) -------------------------------------------

def _metric_lines(run_dir: Path, prefix: str) -> dict[int, dict]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {line["step"]: line for line in lines if any(key.startswith(prefix) for key in line)}


def test_eval_metric_logs_the_datas_own_metric_during_training(tmp_path):
    """--eval-metric auto on the square: the error to the square every 3 steps and at the end, in
    metrics.jsonl and TensorBoard, equal to what `ddpm eval` measures with the same options afterwards."""
    config = build_config("square-fast", {"diffusion": {"num_steps": 50},
                                          "train": {**TINY_TRAIN, "steps": 7, "checkpoint_every": 7,
                                                    "tensorboard": True, "eval_metric": "auto",
                                                    "eval_metric_every": 3, "eval_metric_num": 12},
                                          "sample": {"sampler": "dpm++2m", "steps": 6}})
    run_dir = train(config, tmp_path / "run", progress=False, log=lambda message: None).run_dir
    logged = _metric_lines(run_dir, "square/")
    assert sorted(logged) == [3, 6, 7] and logged[7]["square/samples"] == 12
    run = ddpm.load(run_dir)
    again = evaluate_run(run, ["square"], EvalOptions(num=12, seed=0, progress=False))["square"]
    assert logged[7]["square/mean"] == pytest.approx(again["mean"], rel=1e-5)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("square/mean")] == [3, 6, 7]


def test_eval_metric_fid_mnist_on_an_mnist_run(tmp_path, monkeypatch, classifier_cache):
    from conftest import MNIST_DIR

    monkeypatch.setenv("DDPM_CACHE", str(classifier_cache))
    config = build_config("mnist", {"data": {"data_dir": str(MNIST_DIR), "heldout": 0},
                                    "train": {**TINY_TRAIN, "steps": 2, "checkpoint_every": 2, "warmup": 0,
                                              "eval_metric": "fid-mnist", "eval_metric_every": 2,
                                              "eval_metric_num": 16},
                                    "sample": {"sampler": "dpm++2m", "steps": 5}})
    run_dir = train(config, tmp_path / "mnist", progress=False, log=lambda message: None).run_dir
    logged = _metric_lines(run_dir, "fid-mnist/")[2]
    assert logged["fid-mnist/fid"] > logged["fid-mnist/fid_of_real_digits"] > 0 and logged["fid-mnist/samples"] == 16


def test_an_eval_metric_the_data_cannot_have_is_refused_before_the_run_folder_is_made(tmp_path, capsys):
    code = main(["train", "--out", str(tmp_path / "run"), "--steps", "2", "--num-steps", "20", "--quiet",
                 "--eval-metric", "fid-mnist"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "fid-mnist metric needs a run trained on mnist" in err
    assert not (tmp_path / "run").exists()
