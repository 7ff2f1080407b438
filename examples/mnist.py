"""MNIST: train a noise predictor on handwritten digits and draw a 4x4 grid of samples.

Reproduces the MNIST tutorial (reference 003): T = 1000 with betas 1e-4..0.02, batch 64, the MSE
between true and predicted noise, then Algorithm 2 over all 1000 steps for 16 samples, shown 4x4.

Settings: the `mnist` training preset, which keeps the tutorial's schedule and batch size but trains
the paper-style U-Net `unet-mnist` (1.1M parameters) for 3000 steps at lr 5e-4 with 200 warm-up
steps and an EMA of the weights; the tutorial trains its own small network 5 epochs (4690 steps) at
lr 1e-4. On 2 CPU cores the 3000 steps take 30-50 minutes, so --run draws the grid from a run that
is already trained (a run folder of `ddpm train` or of this script), and --steps shortens training.

The tutorial's mistakes and how this avoids them: its network ends in a sigmoid, so its "noise"
prediction can only lie in (0, 1) while the noise it must predict is N(0, 1) (unet-mnist's output is
unbounded); and it feeds the raw integer t (up to 999) to a Linear layer (unet-mnist embeds t
sinusoidally, as the paper does). Its images also stay in [0, 1]; the library maps them to [-1, 1],
the range the schedule is built for.
"""

from __future__ import annotations

import time
from pathlib import Path

import ddpm
from _common import Trajectory, parser, wrote
from ddpm.config import build_config
from ddpm.training import train
from ddpm.visualize import denoising_strip, save_animation, save_grid

# The four MNIST files kept beside a checkout of this repository (../shared/data/mnist), if present.
LOCAL_MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"


def main() -> None:
    p = parser("mnist", __doc__)
    p.add_argument("--data-dir", type=Path, default=LOCAL_MNIST if LOCAL_MNIST.is_dir() else None,
                   help="folder with the MNIST IDX files (default: downloaded, md5-checked, to a cache)")
    p.add_argument("--steps", type=int, default=3000, help="training steps (the mnist preset's)")
    p.add_argument("--run", type=Path, help="skip training: sample from this trained run (or checkpoint) folder")
    p.add_argument("--sample-steps", type=int, default=None, help="timesteps to walk when sampling (default: all T)")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    if args.run is None:
        data_dir = None if args.data_dir is None else str(args.data_dir)
        config = build_config("mnist", {"data": {"data_dir": data_dir},
                                        "train": {"steps": args.steps, "seed": args.seed, "tensorboard": False}})
        result = train(config, args.out / "run", overwrite=True)
        print(f"trained {result.step} steps in {result.seconds:.0f} s; loss over the last steps {result.loss:.4f}")
        args.run = result.run_dir
    run = ddpm.load(args.run)

    trajectory = Trajectory()
    started = time.perf_counter()
    # Algorithm 2 as the tutorial runs it: DDPM, all T steps unless asked otherwise, x0 not clipped.
    x0 = run.sample(16, sampler="ddpm", steps=args.sample_steps, clip=False, seed=args.seed,
                    callback=trajectory, progress=True)
    print(f"sampled 16 images from {run.checkpoint} (step {run.step}, EMA weights) over "
          f"{len(trajectory.frames) - 1} steps in {time.perf_counter() - started:.0f} s; "
          f"{(x0.abs() > 1).float().mean():.2%} of pixel values outside [-1, 1] before clamping")

    save_grid(x0.clamp(-1, 1), args.out / "samples.png", nrow=4)
    wrote(args.out / "samples.png", "16 samples, 4x4")
    frames = [f.clamp(-1, 1) for f in trajectory.frames]
    denoising_strip([f[:8] for f in frames], args.out / "denoising.png", columns=11)
    wrote(args.out / "denoising.png", "8 of the samples from x_T (left) to x_0 (right)")
    # About 45 frames, denser near the end where the digits form: every 25th step, then every 5th of
    # the last 25, then x_0 held for ten frames.
    chosen = frames[:-25:25] + frames[-25::5] + [frames[-1]] * 10
    save_animation(chosen, args.out / "denoising.gif", duration_ms=80, nrow=4, scale=2)
    wrote(args.out / "denoising.gif", "the 16 samples forming, x_T to x_0 (held on x_0 at the end)")


if __name__ == "__main__":
    main()
