"""The toy diffusion model on colour gradients: forward process, reconstruction, training, sampling.

Reproduces the toy-model tutorial (reference 001), one figure per part:

1. forward.png, forward-histogram.png: the forward process step by step (eq. 2,
   ``ddpm.q_sample_iterative``) and in closed form (eq. 4, ``ddpm.q_sample``) on the same 3x16x16
   gradient over T = 200 steps. Single draws differ (the noise differs); their distributions agree,
   which the histogram and the printed moments over 2000 draws show.
2. reconstruction.png: an image noised to step t, then x0 recovered from x_t and the true noise by
   solving eq. 4 for x0 (``ddpm.diffusion.predict_x0_from_eps``).
3. loss.png: training the tutorial's Linear-ReLU-Linear network (d 128, fed t/T) on 50,000 3x5x5
   gradients, T = 100, batch 128, lr 1e-3: the `gradients` preset, run for the tutorial's 20 epochs
   (7820 steps; the preset's own default is 4000).
4. samples.png, denoising.png: Algorithm 2 from the trained model, and 8 samples followed from x_T
   to x_0 (the tutorial's sequential-denoising plot).

The tutorial's mistakes and how this avoids them: it samples with noise beta_t * z where Algorithm 2
has sigma_t * z with sigma_t^2 = beta_t (``ddpm.sample`` scales by the square root; this script
uses sigma_t^2 = beta_t, variance="fixed_large", as the tutorial meant); it trains on t drawn from
randint(1, T), never t = 0 yet samples it (the library draws 0..T-1); and its betas, 1e-4..0.02 over
100 or 200 steps, leave alpha_bar_T = 0.36 or 0.13, so x_T is far from the N(0, I) that sampling
starts from. Here both ends are scaled by 1000/T (_common.scaled_linear, and the `gradients`
preset), which brings alpha_bar_T to 2e-5 (T = 100) or 3e-5 (T = 200).
"""

from __future__ import annotations

import json
import time

import torch

import ddpm
from _common import Trajectory, parser, scaled_linear, wrote
from ddpm.config import build_config
from ddpm.data import make_gradients, nearest_gradient_distance
from ddpm.diffusion import predict_x0_from_eps
from ddpm.training import train
from ddpm.visualize import denoising_strip, plot_curves, save_grid

FORWARD_T = 200  # the tutorial's schedule for parts 1 and 2
SHOWN_STEPS = [0, 10, 25, 50, 100, 199]  # timesteps t (0 = after the first noising step)
TUTORIAL_STEPS = 7820  # 20 epochs of 50,000 images in batches of 128 (391 batches each)


def forward_process(out, seed: int) -> None:
    schedule = scaled_linear(FORWARD_T)
    x0 = make_gradients(1, seed=seed, image_size=16)  # (1, 3, 16, 16)
    gen = torch.Generator().manual_seed(seed)
    rows = {"eq. 2": [], "eq. 4": []}
    for t in SHOWN_STEPS:
        t_batch = torch.tensor([t])
        rows["eq. 2"].append(ddpm.q_sample_iterative(schedule, x0, t_batch, generator=gen))
        rows["eq. 4"].append(ddpm.q_sample(schedule, x0, t_batch, torch.randn(x0.shape, generator=gen)))
    save_grid(torch.cat(rows["eq. 2"] + rows["eq. 4"]).clamp(-1, 1), out / "forward.png",
              nrow=len(SHOWN_STEPS), scale=6)
    wrote(out / "forward.png", f"top: eq. 2 step by step, bottom: eq. 4 closed form, at t = {SHOWN_STEPS}")

    # 2000 draws of x_t for one image: per-pixel mean and std against sqrt(alpha_bar) x0 and sqrt(1 - alpha_bar).
    draws = x0.expand(2000, -1, -1, -1)
    print("t    alpha_bar | mean error eq.2  eq.4  (standard error) | std eq.2  eq.4  expected")
    histograms: dict[str, torch.Tensor] = {}
    for t in SHOWN_STEPS[1:]:
        t_batch = torch.full((draws.shape[0],), t)
        by_steps = ddpm.q_sample_iterative(schedule, draws, t_batch, generator=gen)
        closed = ddpm.q_sample(schedule, draws, t_batch, torch.randn(draws.shape, generator=gen))
        ab = schedule.alphas_cumprod[t]
        expected_mean = ab.sqrt() * x0[0]
        cells = [f"{t:<4d} {ab:9.3g} |"]
        cells += [f"{(x.mean(0) - expected_mean).abs().mean():13.4f}" for x in (by_steps, closed)]
        cells += [f"({((1 - ab) / draws.shape[0]).sqrt():.4f}) |"]
        cells += [f"{x.std(0).mean():8.4f}" for x in (by_steps, closed)] + [f"{(1 - ab).sqrt():8.4f}"]
        print(" ".join(cells))
        if t in (25, 100):
            histograms |= {f"eq. 2, t = {t}": by_steps, f"eq. 4, t = {t}": closed}
    edges = torch.linspace(-3, 3, 61)  # histograms of every pixel value of the 2000 draws
    centres = (edges[1:] + edges[:-1]) / 2
    curves = {}
    for name, x in histograms.items():
        counts = torch.histc(x.flatten(), bins=60, min=-3, max=3)
        density = counts / (x.numel() * (edges[1] - edges[0]))
        curves[name] = list(zip(centres.tolist(), density.tolist()))
    plot_curves(curves, out / "forward-histogram.png", title="pixel values of 2000 draws of x_t (one image)",
                xlabel="pixel value", ylabel="density")
    wrote(out / "forward-histogram.png", "histograms of x_t drawn by eq. 2 and by eq. 4")


def reconstruction(out, seed: int) -> None:
    schedule = scaled_linear(FORWARD_T)
    x0 = make_gradients(4, seed=seed + 1, image_size=16)
    t = torch.tensor([10, 50, 100, 199])
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    x_t = ddpm.q_sample(schedule, x0, t, noise)
    x0_back = predict_x0_from_eps(schedule, x_t, t, noise)
    print(f"reconstruction at t = {t.tolist()}: max |x0 - x0_reconstructed| = {(x0_back - x0).abs().max():.2e}")
    # Columns: original, noise, x_t, reconstruction; one row per image and t.
    grid = torch.stack([x0, noise.clamp(-1, 1), x_t.clamp(-1, 1), x0_back.clamp(-1, 1)], dim=1).flatten(0, 1)
    save_grid(grid, out / "reconstruction.png", nrow=4, scale=6)
    wrote(out / "reconstruction.png", f"per row (t = {t.tolist()}): x0, noise, x_t, x0 rebuilt from x_t and the noise")


def train_and_sample(out, steps: int, seed: int) -> None:
    config = build_config("gradients", {"train": {"steps": steps, "seed": seed, "tensorboard": False,
                                                  "eval_every": 250}})
    started = time.perf_counter()
    result = train(config, out / "run", overwrite=True)
    print(f"trained {result.step} steps in {time.perf_counter() - started:.0f} s; final loss {result.loss:.4f}")
    lines = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    curves = {"training loss": [(m["step"], m["loss"]) for m in lines if "loss" in m],
              "held-out loss (EMA)": [(m["step"], m["heldout_loss_ema"]) for m in lines if "heldout_loss_ema" in m]}
    plot_curves(curves, out / "loss.png", title="toy MLP on 3x5x5 gradients", xlabel="step", ylabel="MSE", log_y=True)
    wrote(out / "loss.png", "training and held-out loss")

    run = ddpm.load(result.run_dir)
    trajectory = Trajectory(keep=8)
    # Algorithm 2 with sigma_t^2 = beta_t (what the tutorial meant), no clipping, all T = 100 steps.
    x0 = ddpm.sample(run.ema_model, run.schedule, (64, *run.sample_shape), variance="fixed_large",
                     generator=torch.Generator().manual_seed(seed), callback=trajectory)
    real = make_gradients(64, seed=seed + 2, image_size=5)
    print(f"RMS distance to the nearest affine (gradient-like) image: samples "
          f"{nearest_gradient_distance(x0).mean():.3f}, real gradients {nearest_gradient_distance(real).mean():.3f}, "
          f"N(0, I) noise {nearest_gradient_distance(torch.randn(64, 3, 5, 5)).mean():.3f}; "
          f"{(x0.abs() > 1).float().mean():.1%} of sample values outside [-1, 1]")
    save_grid(torch.cat([x0[:16], real[:16]]).clamp(-1, 1), out / "samples.png", nrow=8, scale=8)
    wrote(out / "samples.png", "rows 1-2: 16 samples; rows 3-4: 16 real gradients")
    denoising_strip([f.clamp(-1, 1) for f in trajectory.frames], out / "denoising.png", columns=11, scale=6)
    wrote(out / "denoising.png", "8 samples from x_T (left) to x_0 (right), every 10th step")


def main() -> None:
    p = parser("gradients", __doc__)
    p.add_argument("--steps", type=int, default=TUTORIAL_STEPS, help="training steps")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    forward_process(args.out, args.seed)
    reconstruction(args.out, args.seed)
    train_and_sample(args.out, args.steps, args.seed)


if __name__ == "__main__":
    main()
