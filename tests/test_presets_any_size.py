"""End-to-end: a training preset's network trains on images of a size other than its native one.

A model preset states attention by level (an index into channel_mult), not by pixel size, so it
works at any square size its levels divide. Before, unet-mnist put attention "at 7" and unet "at 14",
and `ddpm train` on 16x16 or 48x48 images stopped with "attention_resolutions=(7,): 7 is never reached".
Each run here is `ddpm train` through ddpm.cli.main on a few images written in tmp_path, T = 20 and
one or two steps: a few seconds.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

import ddpm
from ddpm.cli import main
from ddpm.models.unet import AttentionBlock

FAST = ["--num-steps", "20", "--batch-size", "4", "--num-samples", "1", "--sampler", "ddim",
        "--sample-steps", "2", "--heldout", "0", "--log-every", "1", "--eval-every", "0", "--sample-every", "0",
        "--no-tensorboard", "--quiet"]


def write_grayscale_pngs(folder: Path, size: int, count: int = 6) -> Path:
    """``count`` random size x size grayscale PNGs in ``folder``."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8), mode="L").save(folder / f"{i}.png")
    return folder


def train(tmp_path: Path, size: int, steps: int, *extra: str) -> ddpm.Run:
    """`ddpm train --preset mnist` on size x size images; checks it exits 0 and loads the checkpoint
    it wrote at the end."""
    data = write_grayscale_pngs(tmp_path / f"images{size}", size)
    run_dir = tmp_path / "run"
    code = main(["train", "--preset", "mnist", "--data", str(data), "--image-size", str(size),
                 "--steps", str(steps), "--out", str(run_dir), *FAST, *extra])
    assert code == 0
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{steps:07d}"
    return ddpm.load(run_dir)


def test_mnist_preset_trains_on_16x16_images(tmp_path):
    # unet-mnist's attention at level 2 (which the mnist preset turns off; put back here) is 4x4 here
    # (7x7 at its native 28x28).
    run = train(tmp_path, 16, 2, "--model-overrides", '{"attention_levels": [2]}')
    config = run.model.config
    assert config.image_size == 16 and config.attention_levels == (2,)
    assert isinstance(run.model.up[0].attn_blocks[0], AttentionBlock)  # up[0] is the coarsest level


def test_mnist_preset_trains_the_unet_model_on_48x48_images(tmp_path):
    # unet: attention at level 1, 24x24 here (14x14 at its native 28x28); made narrow to keep it quick.
    run = train(tmp_path, 48, 1, "--model", "unet", "--model-overrides", '{"ch": 8, "num_groups": 4}')
    config = run.model.config
    assert config.image_size == 48 and config.attention_levels == (1,)
    assert isinstance(run.model.down[1].attn_blocks[0], AttentionBlock)
