"""Algorithm 2 from an untrained network, at 512x512x3: what sampling gives before any training.

Reproduces part A of the sampling tutorial (reference 000): draw x_T ~ N(0, I) of shape
(1, 3, 512, 512) and walk the reverse process down to x_0 with a freshly initialised noise
predictor. Without training the predicted noise is meaningless, so x_0 is not an image of anything.

Settings: the tutorial's schedule at this point is 24 steps long (its part C lengthens it to 1000);
its network for part A is not shown, so this script uses the small U-Net it introduces in part C
(`unet-small`, 3 channels, a learned table of 24 timestep embeddings). At 512x512 one forward pass
of it takes 0.5 to 1 s on 2 shared CPU cores, so 24 steps take under a minute; 1000 would take 10 to 20.
The betas are the paper's 1e-4..0.02 scaled by 1000/T (see _common.scaled_linear), so that x_T of
the forward process really is close to N(0, I) after 24 steps.

The tutorial's mistakes and how this avoids them: its text gives the posterior variance as
(1 - alpha_bar_t) / sqrt(1 - alpha_bar_t) * beta_t, and its code reads alpha_bar[t - 1] at t = 0,
which wraps round to the last, noisiest entry. ``ddpm.sample`` uses beta tilde_t =
(1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) * beta_t (eq. 7) with alpha_bar_{-1} = 1, and adds no
noise on the last step.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

import ddpm
from _common import Trajectory, parser, scaled_linear, wrote
from ddpm.models import build_model
from ddpm.visualize import denoising_strip, save_grid


def main() -> None:
    p = parser("untrained_sampling", __doc__)
    p.add_argument("--size", type=int, default=512, help="height = width of the sample (a multiple of 4)")
    p.add_argument("--num-steps", type=int, default=24, help="T, the length of the noise schedule")
    args = p.parse_args()

    schedule = scaled_linear(args.num_steps)
    model = build_model("unet-small", in_channels=3, image_size=args.size, num_steps=args.num_steps,
                        seed=args.seed).eval()
    trajectory = Trajectory()
    started = time.perf_counter()
    x0 = ddpm.sample(model, schedule, (1, 3, args.size, args.size), sampler="ddpm",
                     generator=torch.Generator().manual_seed(args.seed), callback=trajectory, progress=True)
    seconds = time.perf_counter() - started

    outside = (x0.abs() > 1).float().mean().item()
    print(f"{args.num_steps} steps at {args.size}x{args.size}x3 in {seconds:.1f} s; x_0 ranges from "
          f"{x0.min().item():.3g} to {x0.max().item():.3g} (std {x0.std().item():.3g}), "
          f"{outside:.1%} of its values outside [-1, 1] (shown clamped)")
    print("channel means of x_0:", ", ".join(f"{m:.3g}" for m in x0.mean(dim=(0, 2, 3)).tolist()))

    args.out.mkdir(parents=True, exist_ok=True)
    save_grid(x0.clamp(-1, 1), args.out / "sample.png", scale=1)
    wrote(args.out / "sample.png", f"x_0 at {args.size}x{args.size}, clamped to [-1, 1]")
    # A strip at a quarter of the resolution (4x4 average pooling of what the PNG shows) keeps it small.
    small = [F.avg_pool2d(frame.clamp(-1, 1), 4) for frame in trajectory.frames]
    denoising_strip(small, args.out / "denoising.png", columns=7, scale=1)
    wrote(args.out / "denoising.png", f"x_T to x_0 in {min(7, len(small))} of {len(small)} frames, 4x4-average-pooled")


if __name__ == "__main__":
    main()
