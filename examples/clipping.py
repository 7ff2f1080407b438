"""Sampling with and without clipping the predicted x0 to [-1, 1], from the same noise.

Reproduces the clipping tutorial (reference 004): at every step of Algorithm 2 the model's noise
prediction gives an estimate of x0 (eq. 4 solved for x0); the clipped variant clamps that estimate
to the data range [-1, 1] and steps to the posterior mean of eq. 7 at the clamped x0, the plain
variant uses Algorithm 2's mean as written. Both walks here start from the same x_T and draw the
same noise at every step (one seed), so every difference comes from the clipping.

It writes side-by-side samples and a curve of how often the model's x0 estimate leaves [-1, 1] at
each step, and prints the share of final values outside [-1, 1] before they are clamped for display.
The model is trained here (the `gradients` preset by default, under a minute on 2 CPU cores), or
taken from an existing run with --run.

The tutorial's own formulas for the two means are right. The library implements both in one step
function (``ddpm.sample(..., clip_denoised=True|False)``): the posterior mean at the predicted x0,
which for an unclipped noise prediction equals Algorithm 2's 1/sqrt(alpha_t) (x_t - beta_t /
sqrt(1 - alpha_bar_t) eps) exactly, with the noise scaled by sigma_t (not sigma_t^2) and no noise on
the last step.
"""

from __future__ import annotations

from pathlib import Path

import torch

import ddpm
from _common import parser, wrote
from ddpm.config import build_config
from ddpm.diffusion import denoise
from ddpm.build import load_training_data
from ddpm.training import train
from ddpm.visualize import plot_curves, save_grid


def outside(x: torch.Tensor) -> float:
    """The share of values of x outside [-1, 1]."""
    return (x.abs() > 1).float().mean().item()


def nearest_distance(samples: torch.Tensor, data: torch.Tensor) -> str:
    """Median and max over samples of the RMS distance to the closest training image, both as
    displayed (clamped to [-1, 1]): small when a sample looks like some training image."""
    distances = torch.cdist(samples.clamp(-1, 1).flatten(1), data.flatten(1)).min(dim=1).values
    rms = distances / samples[0].numel() ** 0.5
    return f"{rms.median():.3f} ({rms.max():.3f})"


def sample_and_watch(run: ddpm.Run, noise: torch.Tensor, clip: bool, seed: int) -> tuple[torch.Tensor, list]:
    """Sample from ``noise`` (x_T); also return, per step, (t, share of the model's raw x0 estimate
    outside [-1, 1]), read from the model's output before any clipping."""
    shares = []

    prediction = run.config.diffusion.prediction

    def watched(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        output = run.ema_model(x_t, t)
        shares.append((int(t[0]), outside(denoise(run.schedule, output, x_t, t, prediction).pred_x0)))
        return output

    x0 = ddpm.sample(watched, run.schedule, tuple(noise.shape), noise=noise, clip_denoised=clip,
                     prediction=prediction, generator=torch.Generator().manual_seed(seed))
    return x0, shares


def main() -> None:
    p = parser("clipping", __doc__)
    p.add_argument("--run", type=Path, help="sample from this trained run folder instead of training one")
    p.add_argument("--preset", default="gradients", help="training preset when no --run is given")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the preset's)")
    p.add_argument("--num", type=int, default=32, help="samples per variant")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    if args.run is None:
        train_fields = {"seed": args.seed, "tensorboard": False}
        if args.steps is not None:
            train_fields["steps"] = args.steps
        result = train(build_config(args.preset, {"train": train_fields}), args.out / "run", overwrite=True)
        print(f"trained {args.preset} for {result.step} steps in {result.seconds:.0f} s")
        args.run = result.run_dir
    run = ddpm.load(args.run)
    if run.kind != "image":
        raise SystemExit(f"{args.run} holds points; clipping to [-1, 1] is for images")

    noise = torch.randn((args.num, *run.sample_shape), generator=torch.Generator().manual_seed(args.seed))
    plain, plain_shares = sample_and_watch(run, noise, clip=False, seed=args.seed)
    clipped, clipped_shares = sample_and_watch(run, noise, clip=True, seed=args.seed)
    print(f"values of x_0 outside [-1, 1] before the display clamp: without clipping {outside(plain):.2%}, "
          f"with clipping {outside(clipped):.2%}; x_0 ranges [{plain.min():.2f}, {plain.max():.2f}] and "
          f"[{clipped.min():.2f}, {clipped.max():.2f}]; mean |difference| {(plain - clipped).abs().mean():.3f}")
    data = load_training_data(run.config)[0].data
    print(f"RMS distance of the displayed samples to the nearest training image, median (max): without clipping "
          f"{nearest_distance(plain, data)}, with clipping {nearest_distance(clipped, data)}")

    columns = min(8, args.num)
    save_grid(torch.cat([plain[:columns], clipped[:columns]]).clamp(-1, 1), args.out / "samples.png", nrow=columns,
              scale=max(2, 64 // run.sample_shape[-1]))
    wrote(args.out / "samples.png", "top row: without clipping; bottom row: with clipping (same x_T and noise)")
    plot_curves({"without clipping": plain_shares, "with clipping": clipped_shares}, args.out / "outside.png",
                title="model's x0 estimate outside [-1, 1]", xlabel="timestep t (sampling runs right to left)",
                ylabel="share of values")
    wrote(args.out / "outside.png", "per step, the share of the model's x0 estimate outside [-1, 1]")


if __name__ == "__main__":
    main()
