"""Order of convergence of ddpm's ODE solvers and of diffusers' DPM-Solver++, on an exact answer.

    python benchmarks/solver_order.py [--json FILE]        (needs the `bench` extra: diffusers)

For Gaussian data N(m, s^2) the probability-flow ODE's solution is known in closed form: with
y = x / alpha and v = sigma / alpha, (y - m) / sqrt(s^2 + v^2) is constant along a trajectory. Each
solver is fed the exact denoiser and walks from the noisiest level (v = 157 for the linear schedule)
to the cleanest trained level (v = 0.01) on levels even in lambda = -log v; its RMS error against the
closed form is measured as the number of steps doubles. The local slope log2(e_N / e_2N) tends to the
order. diffusers walks its own continuous lambda-even levels (use_lu_lambdas) with its float32 sigma
table; ddpm walks snapped trained timesteps of a fine schedule (T = 20000, the same process), as in
tests/test_solvers.py. Both in float64 otherwise.
"""

from __future__ import annotations

import argparse
import json
import math
import warnings
from pathlib import Path

import torch

from ddpm import NoiseSchedule
from ddpm.config import SampleConfig
from ddpm.diffusion import Denoised
from ddpm.grids import timestep_grid
from ddpm.sampling import SAMPLERS

MEAN, STD = torch.tensor([0.3, -0.4], dtype=torch.float64), torch.tensor([0.5, 0.2], dtype=torch.float64)
STEPS = [10, 20, 40, 80, 160]


def closed_form(x_start: torch.Tensor, v_start: float, v_end: float) -> torch.Tensor:
    """x at noise level v_end on the trajectory through x_start at v_start (x = y / sqrt(1 + v^2))."""
    y = x_start * math.sqrt(1 + v_start**2)
    y_end = MEAN + (y - MEAN) * (STD**2 + v_end**2).sqrt() / (STD**2 + v_start**2).sqrt()
    return y_end / math.sqrt(1 + v_end**2)


def exact_x0(x: torch.Tensor, v: float) -> torch.Tensor:
    alpha = 1 / math.sqrt(1 + v * v)
    a = alpha * alpha
    return MEAN + alpha * STD**2 / (a * STD**2 + 1 - a) * (x - alpha * MEAN)


def ddpm_errors(name: str, x_start: torch.Tensor) -> list[float]:
    schedule = NoiseSchedule("linear", 20_000, beta_start=5e-6, beta_end=1e-3)
    table = schedule.alphas_cumprod_float64()
    v_of = lambda t: math.sqrt((1 - float(table[t])) / float(table[t]))  # noqa: E731
    errors = []
    for steps in STEPS:
        timesteps = timestep_grid(table, steps + 1, "logsnr")  # steps + 1 levels: steps moves between them

        def denoiser(x, t):
            x0 = exact_x0(x, v_of(t))
            a = float(table[t])
            return Denoised(x0, (x - math.sqrt(a) * x0) / math.sqrt(1 - a))

        seen = []
        SAMPLERS[name].walk(denoiser, x_start.clone(), schedule, timesteps, SampleConfig(sampler=name, clip=False),
                            callback=seen.append)
        exact = closed_form(x_start, v_of(timesteps[0]), v_of(timesteps[-1]))
        errors.append(float((seen[-1].x_t - exact).square().mean().sqrt()))
    return errors


def diffusers_errors(order: int, x_start: torch.Tensor) -> list[float]:
    from diffusers import DPMSolverMultistepScheduler

    errors = []
    for steps in STEPS:
        scheduler = DPMSolverMultistepScheduler(
            num_train_timesteps=1000, beta_schedule="linear", solver_order=order, algorithm_type="dpmsolver++",
            lower_order_final=False, final_sigmas_type="sigma_min", use_lu_lambdas=True)
        scheduler.set_timesteps(steps + 1)
        v = scheduler.sigmas.double().tolist()  # its last step goes from v_min to v_min: left out
        x = x_start.clone()
        for i, t in enumerate(scheduler.timesteps[:-1]):
            alpha = 1 / math.sqrt(1 + v[i] ** 2)
            x0 = exact_x0(x, v[i])
            eps = (x - alpha * x0) / (alpha * v[i])
            x = scheduler.step(eps, t, x).prev_sample
        errors.append(float((x - closed_form(x_start, v[0], v[-2])).square().mean().sqrt()))
    return errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    x_start = torch.randn(256, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    rows = {f"ddpm {name}": ddpm_errors(name, x_start) for name in ["ddim", "heun", "dpm++2m", "dpm++3m"]}
    rows |= {f"diffusers DPMSolverMultistep order {order}": diffusers_errors(order, x_start) for order in (2, 3)}
    print("RMS error at the cleanest level after S steps, and the local slope log2(e_S / e_2S)\n")
    print("| solver | " + " | ".join(f"S = {s}" for s in STEPS) + " | slopes |")
    print("|---|" + "---|" * len(STEPS) + "---|")
    for name, errors in rows.items():
        slopes = [math.log2(a / b) for a, b in zip(errors, errors[1:])]
        print(f"| {name} | " + " | ".join(f"{e:.2e}" for e in errors) + " | "
              + ", ".join(f"{s:.2f}" for s in slopes) + " |")
    if args.json:
        args.json.write_text(json.dumps({"steps": STEPS, "errors": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
