"""What a user can choose by name, in one line each: the built-in datasets, the model presets and the
metrics. Importable without torch, so `ddpm presets`, `ddpm datasets` and `ddpm --help` answer at
once; the modules that build these things take their names and descriptions from here.
"""

from __future__ import annotations

__all__ = ["DATASETS", "GENERATED", "is_generated", "MODEL_PRESETS", "METRICS"]

DATASETS: dict[str, str] = {
    "square": "the tutorials' 8x8 square (1 channel, or 3), a single image to overfit",
    "gradients": "two-colour linear gradients along random directions, 3x16x16, generated from a seed",
    "moons": "2-D points: two interleaved half circles",
    "swissroll": "2-D points: a spiral of one and a half turns",
    "8gaussians": "2-D points: 8 well-separated Gaussians on a circle",
    "checkerboard": "2-D points: uniform on the dark cells of a 4x4 checkerboard",
    "mnist": "handwritten digits, 1x28x28, 60000 train / 10000 test (local IDX files or a checked download)",
    "cifar10": "colour photos in 10 classes, 3x32x32, 50000 train / 10000 test (local batches or a checked download)",
}

# Sets drawn from a seed (their size is a choice), not stored data.
GENERATED = frozenset({"square", "gradients", "moons", "swissroll", "8gaussians", "checkerboard"})


def is_generated(source: str) -> bool:
    """Whether ``source`` names a set drawn from a seed (its size is a choice), not stored data."""
    return source in GENERATED


MODEL_PRESETS: dict[str, str] = {
    "mlp-toy": (
        "the tutorials' toy diffuser: Linear-ReLU-Linear on the flattened image and t/T (any C, H = W)"),
    "mlp-2d": (
        "residual MLP for (B, D) points with a sinusoidal timestep embedding (D = 2, width 256, 3 blocks)"),
    "unet-small": (
        "the tutorials' small U-Net: conv blocks 16/32/64, max-pool, transposed convs, learned t table (0.14M)"),
    "unet": (
        "the DDPM paper's U-Net at a mid size: 1x28x28, ch 64, mult (1,2,2), 2 blocks, attention at 1/2 "
        "resolution (6.5M)"),
    "unet-cifar10": (
        "the paper's CIFAR-10 U-Net: 3x32x32, ch 128, mult (1,2,2,2), 2 blocks, attention at 1/2 resolution (35.7M)"),
    "unet-mnist": (
        "small paper-style U-Net for 1x28x28 on a CPU: ch 32, mult (1,2,2), 1 block, attention at 1/4 resolution "
        "(1.1M)"),
}

METRICS: dict[str, str] = {
    "bpd": "bits per dimension of held-out data: the variational bound (eq. 5), 8-bit decoder for images",
    "fid": "Frechet distance of InceptionV3 pool features, samples vs held-out images (needs the weights file)",
    "fid-mnist": "Frechet distance of ddpm's MNIST classifier features, and what the classifier sees in samples",
    "energy": "energy distance of point samples to held-out data, beside that of two data draws (noise floor)",
    "gradient": "RMS distance of each sample to the nearest exact colour gradient",
    "square": "RMS error of each sample to the 8x8 square",
}
