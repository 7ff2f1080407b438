"""A newcomer's first hour: quick help, defaults that follow their data, honest messages, and a bar
or a line for every wait."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import ddpm
from ddpm.cli import main

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
OPTIONS = ["--batch-size", "4", "--num-steps", "20", "--sample-steps", "2", "--sampler", "ddim", "--num-samples", "2",
           "--eval-every", "0", "--no-tensorboard", "--quiet"]
SMALL = ["--steps", "2", *OPTIONS]


@pytest.mark.parametrize("args", [["--help"], ["presets"], ["datasets"], ["train", "--help"], ["sample", "--help"],
                                  ["eval", "--help"]])
def test_help_and_listings_do_not_import_torch(args):
    # `ddpm --help` took about 4 s, all of it `import torch`.
    script = ("import sys\nfrom ddpm.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
              "assert 'torch' not in sys.modules, 'torch was imported'\n")
    done = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, env=ENV)
    assert done.returncode == 0, done.stderr


def test_the_lists_behind_the_listings_match_what_builds():
    from ddpm.catalog import DATASETS, GENERATED, MODEL_PRESETS
    from ddpm.data.registry import _GENERATED
    from ddpm.models import PRESETS

    assert set(MODEL_PRESETS) == set(PRESETS) and GENERATED == set(_GENERATED) and GENERATED <= set(DATASETS)


def test_help_lists_the_choices_of_choice_flags(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for choices in ("one of: linear, cosine, sigmoid", "one of: fp32, bf16", "one of: ddpm, ddim",
                    "one of: eps, x0, v", "one of: none, min_snr"):
        assert choices in text, choices
    # The default preset's 8x8 applies to its own data only, and the help says so.
    assert "default 8 for the preset's own data, None for other --data" in text


def rgb_folder(folder: Path, size: int = 32, count: int = 12) -> Path:
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray((rng.random((size, size, 3)) * 255).astype(np.uint8)).save(folder / f"{i}.png")
    return folder


def test_the_default_preset_trains_a_colour_folder_at_its_own_size_and_says_so(tmp_path, capsys):
    # Before: the default preset's 8x8 gray square resized every photo to 1x8x8.
    folder = rgb_folder(tmp_path / "photos")
    assert main(["train", "--data", str(folder), "--out", str(tmp_path / "run"), *SMALL]) == 0
    err = capsys.readouterr().err
    assert "at 3x32x32, its own size and channels" in err
    assert ddpm.load(tmp_path / "run").sample_shape == (3, 32, 32)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())["config"]["data"]
    assert saved["image_size"] is None and saved["channels"] is None and saved["heldout"] == 512


def test_resume_messages_say_what_this_invocation_did_and_keep_a_new_step_count(tmp_path, capsys):
    run = str(tmp_path / "run")
    assert main(["train", "--out", run, "--steps", "2", *OPTIONS]) == 0
    assert main(["train", "--resume", "--out", run, "--steps", "4", *OPTIONS]) == 0
    assert "trained 2 steps (steps 2 to 4)" in capsys.readouterr().out
    # The new --steps is saved: a plain --resume continues to it and says there is nothing left.
    assert json.loads((tmp_path / "run" / "config.json").read_text())["config"]["train"]["steps"] == 4
    assert main(["train", "--resume", "--out", run, "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "already at step 4 of 4: nothing to train" in out and "nan" not in out


def test_sampling_in_batches_shows_one_bar_over_all_of_them(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path / "run"), *SMALL]) == 0
    run = ddpm.load(tmp_path / "run")
    capsys.readouterr()
    run.sample(6, batch_size=2, sampler="ddim", steps=3, progress=True)
    err = capsys.readouterr().err
    assert "sampling 6 (ddim, 3 calls)" in err and "9/9" in err  # 3 batches x 3 steps, one bar
    assert "sampling (ddim)" not in err  # no bar per batch


def test_the_sample_grid_and_held_out_loss_of_training_show_bars(tmp_path, capsys):
    from ddpm.config import build_config
    from ddpm.training import heldout_losses, save_samples

    config = build_config("square-fast", {"diffusion": {"num_steps": 20}, "sample": {"steps": 4}})
    model = ddpm.build.build_model_for(config, "image", (1, 8, 8), seed=0).eval()
    schedule = ddpm.build.build_schedule(config)
    dataset = ddpm.data.load_dataset("square", image_size=8, channels=1)
    save_samples(model, schedule, config, dataset, tmp_path / "grid.png", progress=True)
    heldout_losses(model, model, schedule, dataset.data, config, progress=True)
    err = capsys.readouterr().err
    # the default sampler, Heun: a budget of 4 calls walks 2 levels with 3 (two on the first step)
    assert "sample grid (16 image, heun-3)" in err and "0/2" in err
    assert "held-out loss" in err and (tmp_path / "grid.png").is_file()


def test_fid_mnist_says_before_it_trains_its_classifier_once_and_where_it_is_cached(tmp_path, monkeypatch, capsys):
    from ddpm.evaluation import classifier

    trained = []

    def quick(data_dir, progress):  # the real recipe takes about a minute; the message is what is tested
        trained.append(True)
        return classifier.MnistClassifier(), {"test_accuracy": 0.5}

    monkeypatch.setattr(classifier, "_train_and_measure", quick)
    cache = tmp_path / "cache"
    classifier.load_mnist_classifier(cache_dir=cache, progress=True)
    err = capsys.readouterr().err
    assert "training ddpm's MNIST classifier for FID-MNIST (once" in err
    assert str(classifier.classifier_cache_dir(cache)) in err and trained == [True]


def test_the_training_bar_shows_examples_per_second(tmp_path, capsys):
    options = [a for a in OPTIONS if a != "--quiet"]
    assert main(["train", "--out", str(tmp_path / "run"), "--steps", "4", "--log-every", "2", *options]) == 0
    assert "ex_per_s=" in capsys.readouterr().err


def test_feature_passes_of_eval_show_a_bar(capsys):
    from ddpm.evaluation.classifier import MnistClassifier, mnist_features

    features = mnist_features(MnistClassifier(), torch.zeros(30, 1, 28, 28), batch_size=10,
                              progress="FID-MNIST features (samples)")
    assert features.shape[0] == 30 and "FID-MNIST features (samples)" in capsys.readouterr().err
    mnist_features(MnistClassifier(), torch.zeros(3, 1, 28, 28))
    assert capsys.readouterr().err == ""  # no label, no bar


def test_a_download_that_lasts_shows_a_bar(tmp_path, capsys, monkeypatch):
    import hashlib
    import time

    from ddpm.data import download
    from ddpm.data.download import download_file

    source = tmp_path / "served.bin"
    source.write_bytes(b"x" * 100_000)
    monkeypatch.setattr(download, "_CHUNK", 1000)  # slowed down, so that the bar (shown after 1 s) appears
    real_urlopen = download.urlopen

    class Slow:
        def __init__(self, response):
            self.response, self.headers = response, response.headers

        def read(self, size):
            time.sleep(0.02)
            return self.response.read(size)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.response.close()

    monkeypatch.setattr(download, "urlopen", lambda url, timeout=None: Slow(real_urlopen(url, timeout=timeout)))
    target = download_file([source.as_uri()], tmp_path / "got" / "file.bin",
                           hashlib.md5(source.read_bytes()).hexdigest())
    assert target.read_bytes() == source.read_bytes()
    assert "downloading file.bin" in capsys.readouterr().err
