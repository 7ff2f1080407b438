"""How far each sampler's output law is from the data law when the model is perfect (docs/equations.md).

    python benchmarks/walk_bias.py [--samples 20000]

Data are 1-D Gaussian, x0 ~ N(0, s^2), and the model is the exact noise predictor E[eps | x_t]. Every
sampler step is then affine in x_t, so the output is Gaussian and its variance follows in closed form
(tests/exact.py: walk_moments, written from the papers' equations, not from ddpm.sampling). Printed:
Var(sampler output) / s^2 for the paper's linear schedule, T = 1000. 1 means the sampler reproduces
the data exactly; the gap is the sampler's own error, not a model error.

With --samples N, each cell is also measured by running ddpm.sample on N draws with the exact model
(analytic.optimal_eps_model), as a check that the library walks the law the closed form describes.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from exact import walk_moments  # noqa: E402  (tests/exact.py: the closed-form walk law)

from ddpm import NoiseSchedule, sample, timestep_sequence  # noqa: E402
from ddpm.analytic import GaussianMixture, optimal_eps_model  # noqa: E402

T = 1000
STDS = (0.5, 0.2, 0.1)
# (row label, sampler options); steps=None visits all T timesteps.
ROWS = [
    ("DDPM fixed_small", dict(sampler="ddpm", variance="fixed_small")),
    ("DDPM fixed_large", dict(sampler="ddpm", variance="fixed_large")),
    ("DDIM eta=0", dict(sampler="ddim", eta=0.0)),
    ("DDIM eta=1", dict(sampler="ddim", eta=1.0)),
]
STEPS = (T, 100)


def closed_form_ratio(schedule: NoiseSchedule, steps: int, s: float, options: dict) -> float:
    """Var(output) / s^2 of the walk over ``steps`` uniformly spaced timesteps, from tests/exact.py."""
    _, var = walk_moments(schedule.alphas_cumprod, timestep_sequence(T, steps), 0.0, s, **options)
    return var / (s * s)


def sampled_ratio(schedule: NoiseSchedule, steps: int, s: float, options: dict, n: int) -> float:
    """Var(output) / s^2 measured from n draws of ddpm.sample with the exact eps-model."""
    model = optimal_eps_model(GaussianMixture.create([1.0], [[0.0]], [s]), schedule)
    x = sample(model, schedule, (n, 1), steps=steps, generator=torch.Generator().manual_seed(0), **options)
    return x.double().var().item() / (s * s)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=0, help="also measure each cell from this many draws")
    args = parser.parse_args()
    schedule = NoiseSchedule("linear", T)

    header = "| sampler | steps | " + " | ".join(f"data std {s}" for s in STDS) + " |"
    print(header)
    print("|" + "---|" * (2 + len(STDS)))
    for label, options in ROWS:
        for steps in STEPS:
            cells = []
            for s in STDS:
                cell = f"{closed_form_ratio(schedule, steps, s, options):.4f}"
                if args.samples:
                    se = math.sqrt(2 / (args.samples - 1))  # standard error of a Gaussian variance ratio
                    cell += f" (sampled {sampled_ratio(schedule, steps, s, options, args.samples):.4f} ± {se:.4f})"
                cells.append(cell)
            print(f"| {label} | {steps} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
