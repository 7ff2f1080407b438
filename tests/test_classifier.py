"""Tests of ddpm.evaluation.classifier: the MNIST classifier behind FID-MNIST and the classifier's view.

The real recipe is trained once, through load_mnist_classifier, on the real MNIST in
../shared/data/mnist, and must reach 99% test accuracy (about 40 s on two busy cores). Training is
also checked for bitwise determinism on a 2,000-image subset. The cache is exercised with a recipe
shrunk to a few steps: round trip, damaged files, stale recipes and interrupted writes.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
from pathlib import Path

import pytest
import torch
from torch import Tensor

import ddpm.evaluation.classifier as classifier
from ddpm.checkpoint import CheckpointError
from ddpm.data import load_dataset
from ddpm.evaluation.classifier import (
    FEATURE_DIM, RECIPE, ClassifierView, MnistClassifier, classifier_accuracy, classifier_cache_dir,
    classifier_view, load_classifier, load_mnist_classifier, mnist_features, recipe_hash, save_classifier,
    train_mnist_classifier,
)

MNIST_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist"
SUBSET = 2000  # training images for the fast tests


@pytest.fixture(scope="module")
def mnist_train():
    return load_dataset("mnist", data_dir=MNIST_DIR, split="train")


@pytest.fixture(scope="module")
def mnist_test():
    return load_dataset("mnist", data_dir=MNIST_DIR, split="test")


@pytest.fixture(scope="module")
def small_model(mnist_train) -> MnistClassifier:
    """A classifier trained for one epoch on the first 2,000 training images (31 steps)."""
    return train_mnist_classifier(mnist_train.data[:SUBSET], mnist_train.labels[:SUBSET], epochs=1,
                                  progress=False)


def weights_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


class Logits(torch.nn.Module):
    """A stand-in classifier whose "images" (N, 10) are already its logits."""

    def forward(self, x: Tensor) -> Tensor:
        return x


# --- training ---------------------------------------------------------------------------------

def test_model_init_is_seeded_and_leaves_global_rng_alone():
    before = torch.get_rng_state()
    a = MnistClassifier(torch.Generator().manual_seed(3))
    b = MnistClassifier(torch.Generator().manual_seed(3))
    c = MnistClassifier(torch.Generator().manual_seed(4))
    assert torch.equal(torch.get_rng_state(), before)
    assert weights_equal(a, b) and not weights_equal(a, c)
    assert weights_equal(MnistClassifier(), MnistClassifier())  # None means seed 0
    assert sum(p.numel() for p in a.parameters()) == 80_202


def test_training_is_bitwise_deterministic_and_leaves_global_rng_alone(mnist_train):
    images, labels = mnist_train.data[:SUBSET], mnist_train.labels[:SUBSET]
    before = torch.get_rng_state()
    first = train_mnist_classifier(images, labels, seed=0, epochs=0.5, progress=False)
    second = train_mnist_classifier(images, labels, seed=0, epochs=0.5, progress=False)
    other = train_mnist_classifier(images, labels, seed=1, epochs=0.5, progress=False)
    assert torch.equal(torch.get_rng_state(), before)
    assert weights_equal(first, second)
    assert not weights_equal(first, other)
    assert not first.training


def test_training_runs_on_one_thread_and_restores_the_setting(mnist_train):
    images, labels = mnist_train.data[:SUBSET], mnist_train.labels[:SUBSET]
    seen: list[int] = []  # the thread count each forward pass ran with
    handle = torch.nn.modules.module.register_module_forward_pre_hook(
        lambda module, args: seen.append(torch.get_num_threads()))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        train_mnist_classifier(images, labels, epochs=0.05, progress=False)
        assert torch.get_num_threads() == 2
    finally:
        handle.remove()
        torch.set_num_threads(before)
    assert seen and set(seen) == {1}


def test_training_rejects_bad_inputs(mnist_train):
    images, labels = mnist_train.data[:10], mnist_train.labels[:10]
    with pytest.raises(ValueError, match="28"):
        train_mnist_classifier(images[:, :, :27], labels, progress=False)
    with pytest.raises(ValueError, match="labels"):
        train_mnist_classifier(images, labels[:9], progress=False)
    with pytest.raises(ValueError, match="epochs"):
        train_mnist_classifier(images, labels, epochs=0, progress=False)


def test_learning_rate_warms_up_then_decays_to_zero():
    lr = [classifier._learning_rate(s, 100, 1.0, 0.1) for s in range(100)]
    assert lr[0] == pytest.approx(0.1) and lr[9] == pytest.approx(1.0)
    assert lr[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lr[10:], lr[11:]))
    assert lr[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * 89 / 90)))


# --- features, accuracy, the classifier's view ------------------------------------------------

def test_features_are_batched_float32_and_feed_the_head(mnist_test):
    model = MnistClassifier()
    images = mnist_test.data[:37]
    features = mnist_features(model, images, batch_size=10)
    assert features.shape == (37, FEATURE_DIM) and features.dtype == torch.float32
    assert not features.requires_grad and not features.is_inference()
    with torch.no_grad():
        direct = model.features(images)
        assert torch.allclose(features, direct, atol=1e-5)
        assert torch.allclose(model(images), model.head(torch.relu(direct)), atol=1e-5)
    assert mnist_features(model, images[:0]).shape == (0, FEATURE_DIM)


def test_features_refuse_other_image_shapes():
    model = MnistClassifier()
    for shape in [(2, 1, 32, 32), (2, 3, 28, 28), (1, 28, 28)]:
        with pytest.raises(ValueError, match=r"\(B, 1, 28, 28\)"):
            model(torch.zeros(shape))


def test_classifier_accuracy_counts_argmax_hits():
    logits = torch.eye(10)[[0, 1, 2, 3]]
    labels = torch.tensor([0, 1, 2, 9])
    assert classifier_accuracy(Logits(), logits, labels, batch_size=3) == 0.75


def test_classifier_view_known_answer():
    p_high = math.exp(20) / (math.exp(20) + 9)  # softmax of a logit 20 against nine zeros
    logits = torch.zeros(4, 10)
    logits[0, 0] = 20.0                            # digit 0, certain
    logits[1] = math.log(0.5 / 9)
    logits[1, 7] = math.log(0.5)                   # digit 7 at p = 0.5
    logits[2, 7] = 20.0                            # digit 7, certain
    logits[3] = math.log(0.2 / 9)
    logits[3, 2] = math.log(0.8)                   # digit 2 at p = 0.8
    view = classifier_view(Logits(), logits, batch_size=3)
    assert isinstance(view, ClassifierView)
    assert view.confident_fraction == 0.5          # default threshold 0.9: rows 0 and 2
    assert torch.allclose(view.class_histogram, torch.tensor([0.25, 0, 0.25, 0, 0, 0, 0, 0.5, 0, 0],
                                                             dtype=torch.float64))
    assert view.mean_max_prob == pytest.approx((2 * p_high + 0.5 + 0.8) / 4, abs=1e-6)
    assert view.entropy_of_histogram == pytest.approx(1.5 * math.log(2))
    assert classifier_view(Logits(), logits, threshold=0.75).confident_fraction == 0.75
    assert classifier_view(Logits(), logits, threshold=0.45).confident_fraction == 1.0


def test_classifier_view_of_every_digit_once_has_entropy_log_10():
    view = classifier_view(Logits(), 5 * torch.eye(10))
    assert torch.equal(view.class_histogram, torch.full((10,), 0.1, dtype=torch.float64))
    assert view.entropy_of_histogram == pytest.approx(math.log(10))


def test_classifier_view_refuses_bad_arguments():
    with pytest.raises(ValueError, match="threshold"):
        classifier_view(Logits(), torch.eye(10), threshold=0.0)
    with pytest.raises(ValueError, match="at least one"):
        classifier_view(Logits(), torch.zeros(0, 10))


# --- the cache --------------------------------------------------------------------------------

def test_cache_dir_argument_then_env_then_data_cache_parent(monkeypatch, tmp_path):
    folder = f"mnist-classifier-v{classifier.RECIPE_VERSION}"
    monkeypatch.delenv("DDPM_CACHE", raising=False)
    monkeypatch.setenv("DDPM_DATA", str(tmp_path / "root" / "data"))
    assert classifier_cache_dir() == tmp_path / "root" / folder
    monkeypatch.setenv("DDPM_CACHE", str(tmp_path / "env"))
    assert classifier_cache_dir() == tmp_path / "env" / folder
    assert classifier_cache_dir(tmp_path / "arg") == tmp_path / "arg" / folder


def test_recipe_hash_follows_every_field():
    assert recipe_hash(RECIPE) == recipe_hash(dataclasses.replace(RECIPE))
    for field in dataclasses.fields(RECIPE):
        value = getattr(RECIPE, field.name)
        changed = dataclasses.replace(RECIPE, **{field.name: value + 1})
        assert recipe_hash(changed) != recipe_hash(RECIPE), field.name


def test_save_then_load_gives_the_same_model(small_model, mnist_test, tmp_path):
    info = {"test_accuracy": 0.5, "note": "tiny"}
    written = save_classifier(small_model, info, tmp_path / "cache")
    assert written["weights_sha256"] and written["note"] == "tiny"
    model, loaded_info = load_classifier(tmp_path / "cache")
    assert loaded_info == written
    assert weights_equal(model, small_model) and not model.training
    images = mnist_test.data[:100]
    with torch.no_grad():
        assert torch.equal(model(images), small_model(images))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]  # no temporary folders left


def test_load_classifier_detects_damage(small_model, tmp_path):
    folder = tmp_path / "cache"
    save_classifier(small_model, {}, folder)
    weights = folder / "model.safetensors"
    good = weights.read_bytes()

    weights.write_bytes(good[: len(good) // 2])          # truncated
    with pytest.raises(CheckpointError):
        load_classifier(folder)
    flipped = bytearray(good)
    flipped[-1] ^= 0xFF                                    # one bit pattern changed in a weight
    weights.write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match="sha256"):
        load_classifier(folder)
    weights.write_bytes(good)
    load_classifier(folder)
    (folder / "info.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="JSON"):
        load_classifier(folder)
    (folder / "info.json").write_text("[]")
    with pytest.raises(CheckpointError, match="weights_sha256"):
        load_classifier(folder)
    weights.unlink()
    with pytest.raises(CheckpointError):
        load_classifier(folder)


def test_interrupted_write_keeps_the_old_cache(small_model, monkeypatch, tmp_path):
    folder = tmp_path / "cache"
    save_classifier(small_model, {"version": "old"}, folder)

    def crash(path, data):
        raise OSError("disk full")

    monkeypatch.setattr(classifier, "write_json", crash)  # fails after the weights file is written
    with pytest.raises(OSError, match="disk full"):
        save_classifier(MnistClassifier(), {"version": "new"}, folder)
    with pytest.raises(OSError, match="disk full"):
        save_classifier(MnistClassifier(), {}, tmp_path / "fresh")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]
    model, info = load_classifier(folder)
    assert info["version"] == "old" and weights_equal(model, small_model)


def test_load_mnist_classifier_trains_once_then_reuses_repairs_and_renews(monkeypatch, tmp_path):
    # A recipe of 0.3 epoch (9 steps on 2,000 images) stands in for the real one; changing RECIPE
    # is also what makes an existing cache stale.
    monkeypatch.setattr(classifier, "RECIPE", dataclasses.replace(RECIPE, epochs=0.3))
    calls = []
    real_train = classifier.train_mnist_classifier

    def counting_train(*args, **kwargs):
        calls.append(kwargs)
        return real_train(*args, **kwargs)

    monkeypatch.setattr(classifier, "train_mnist_classifier", counting_train)
    # 2,000 images of each split keep the four trainings and measurements quick.
    real_load_dataset = classifier.load_dataset
    monkeypatch.setattr(classifier, "load_dataset",
                        lambda *args, **kwargs: real_load_dataset(*args, n=2000, **kwargs))

    def load() -> tuple[MnistClassifier, dict]:
        return load_mnist_classifier(data_dir=MNIST_DIR, cache_dir=tmp_path, progress=False)

    model, info = load()
    assert len(calls) == 1 and calls[0]["epochs"] == 0.3
    folder = classifier_cache_dir(tmp_path)
    assert sorted(p.name for p in folder.iterdir()) == ["info.json", "model.safetensors"]
    assert info["recipe_hash"] == recipe_hash(classifier.RECIPE) and info["epochs"] == 0.3
    assert 0.0 <= info["test_accuracy"] <= 1.0 and info["train_seconds"] > 0
    assert info["feature_dim"] == FEATURE_DIM and info["parameters"] == 80_202
    assert not model.training and not any(p.requires_grad for p in model.parameters())

    again, info_again = load()                             # from the cache
    assert len(calls) == 1 and info_again == info and weights_equal(again, model)

    (folder / "model.safetensors").write_bytes(b"garbage")  # damaged: trained again, not an error
    repaired, _ = load()
    assert len(calls) == 2 and weights_equal(repaired, model)

    shutil.rmtree(folder)
    folder.write_text("not a folder")
    load()
    assert len(calls) == 3 and folder.is_dir()

    monkeypatch.setattr(classifier, "RECIPE", dataclasses.replace(RECIPE, epochs=0.3, seed=1))
    renewed, renewed_info = load()                         # stale recipe: trained again
    assert len(calls) == 4 and renewed_info["seed"] == 1 and not weights_equal(renewed, model)
    assert load()[1] == renewed_info and len(calls) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == [folder.name]


# --- the real recipe --------------------------------------------------------------------------

def test_real_recipe_on_real_mnist_reaches_99_percent(classifier_cache, mnist_test):
    model, info = load_mnist_classifier(data_dir=MNIST_DIR, cache_dir=classifier_cache, progress=False)
    assert info["recipe_hash"] == recipe_hash(RECIPE) and info["epochs"] == RECIPE.epochs
    assert info["test_accuracy"] >= 0.99, info
    # Real test digits, as a generator should make them: confident, every digit about as common.
    view = classifier_view(model, mnist_test.data)
    assert view.confident_fraction >= 0.95 and view.mean_max_prob >= 0.97
    assert view.entropy_of_histogram >= 2.29  # log(10) = 2.3026; the test labels' own is 2.3007
