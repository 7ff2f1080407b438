"""Small pieces the example scripts share: their common flags and a recorder for sampler trajectories.

Not part of the library: the scripts import it as a sibling file (``python examples/NAME.py`` puts
this folder on the import path).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import ddpm

EXAMPLES = Path(__file__).resolve().parent


def parser(name: str, doc: str | None) -> argparse.ArgumentParser:
    """An argument parser with the flags every example has: --out (default examples/out/NAME/) and --seed."""
    first_paragraph = (doc or "").strip().split("\n\n")[0]
    p = argparse.ArgumentParser(prog=f"examples/{name}.py", description=first_paragraph,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, default=EXAMPLES / "out" / name, help="folder for the figures")
    p.add_argument("--seed", type=int, default=0, help="seed of weights, data order, noise and samples")
    return p


def scaled_linear(num_steps: int) -> ddpm.NoiseSchedule:
    """The paper's linear schedule (1e-4 to 0.02 over 1000 steps) with both ends scaled by 1000/T.

    A short schedule with the paper's betas never reaches noise: over 100 steps alpha_bar_T is 0.36,
    while sampling starts from N(0, I). Scaled, the total noise matches the paper's at any T.
    Below T = 21 the scaled beta_end would reach 1; it is capped at 0.999 there.
    """
    scale = 1000 / num_steps
    return ddpm.NoiseSchedule("linear", num_steps, beta_start=1e-4 * scale, beta_end=min(0.02 * scale, 0.999))


class Trajectory:
    """A sampler callback keeping the first ``keep`` images of x_T and of every x_{t-1} after it.

    ``frames`` ends up holding S + 1 tensors (keep, ...) on the CPU, from x_T to x_0.
    """

    def __init__(self, keep: int | None = None):
        self.keep = keep
        self.frames: list[torch.Tensor] = []

    def __call__(self, step: ddpm.sampling.SamplerStep) -> None:
        if step.index == 0:
            self.frames.append(step.x_t[: self.keep].cpu())
        self.frames.append(step.x_prev[: self.keep].cpu())


def wrote(path: Path, what: str) -> None:
    """Tell the user where a figure went (paths relative to the current folder where possible)."""
    try:
        shown = path.resolve().relative_to(Path.cwd())
    except ValueError:
        shown = path
    print(f"wrote {shown}: {what}")
