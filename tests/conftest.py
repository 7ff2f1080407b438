"""Fixtures shared by several test files."""

from __future__ import annotations

from pathlib import Path

import pytest

# The real MNIST files in ../shared beside the checkout (CI provides them; a missing folder fails loudly).
MNIST_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist"


@pytest.fixture(scope="session")
def classifier_cache(tmp_path_factory) -> Path:
    """A cache folder holding the FID-MNIST classifier, trained once by the real recipe on real MNIST
    (about 35 s) for every test that needs it."""
    from ddpm.evaluation.classifier import load_mnist_classifier

    folder = tmp_path_factory.mktemp("classifier-cache")
    load_mnist_classifier(data_dir=MNIST_DIR, cache_dir=folder, progress=False)
    return folder
