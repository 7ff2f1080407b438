"""Do two speed tricks of the core path still pay? Each against the plain way, in one process.

    python benchmarks/speed_tricks.py [--rounds 12] [--batch 64] [--json FILE]

1. Dropout masks drawn on every CPU thread (``ddpm.models.unet.uniform_like``) against a plain
   ``torch.rand_like``: unet-mnist training steps (batch 64, dropout 0.1, channels-last, fused AdamW:
   what `ddpm train --preset mnist` runs), and the largest mask of a step alone (64x64x28x28). At
   one thread (as under OMP_NUM_THREADS=1) ``uniform_like`` is ``rand_like`` already, so that row
   only shows the switch costs nothing there.
2. Sampling in ``torch.inference_mode`` (what ``ddpm.sample`` does) against ``torch.no_grad``: one
   DDIM-50 walk of unet-mnist, batch 16, through the same registered sampler.

Each pair alternates, the order turned around every round, at 2 threads and at 1. Ratios are medians
over rounds of plain / trick: above 1 when the trick helps.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import ddpm
from ddpm.allocator import keep_freed_memory
from ddpm.config import SampleConfig
from ddpm.diffusion import denoise, per_example_loss
from ddpm.models import build_model, use_channels_last
from ddpm.models import unet as unet_module
from ddpm.sampling import SAMPLERS, timestep_sequence


def _plain(x: torch.Tensor) -> torch.Tensor:
    return torch.rand_like(x, dtype=torch.float32)


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _alternate(variants: dict[str, callable], rounds: int) -> dict[str, list[float]]:
    """Each variant once per round, the order turned around every round; two warm-up rounds first."""
    names = list(variants)
    for _ in range(2):
        for name in names:
            variants[name]()
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for i in range(rounds):
        for name in (names if i % 2 == 0 else names[::-1]):
            seconds[name].append(_seconds(variants[name]))
    return seconds


def _with_draw(draw, fn):
    def run():
        unet_module.uniform_like = draw
        try:
            fn()
        finally:
            unet_module.uniform_like = THREADED
    return run


THREADED = unet_module.uniform_like


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    keep_freed_memory()  # as the ddpm command runs

    model = use_channels_last(build_model("unet-mnist", seed=0)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    schedule = ddpm.NoiseSchedule("linear", 1000)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(args.batch, 1, 28, 28, generator=g) * 2 - 1
    t = torch.randint(0, 1000, (args.batch,), generator=g)
    noise = torch.randn(x0.shape, generator=g)

    def step() -> None:
        per_example_loss(model, schedule, x0, t, noise).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    mask = torch.empty(64, 64, 28, 28).contiguous(memory_format=torch.channels_last)
    ema = use_channels_last(build_model("unet-mnist", seed=1)).eval()
    options = SampleConfig(sampler="ddim", steps=50, clip=False)
    timesteps = timestep_sequence(1000, 50)

    def denoiser(x: torch.Tensor, t: int):
        t_batch = torch.full((x.shape[0],), t, dtype=torch.long)
        return denoise(schedule, ema(x, t_batch), x, t_batch)

    def walk(mode) -> callable:
        def run() -> None:
            with mode():
                x = torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(0))
                SAMPLERS["ddim"](denoiser, x, schedule, timesteps, options)
        return run

    rows = []
    for threads in (2, 1):
        torch.set_num_threads(threads)
        pairs = (("training step", "uniform_like", _with_draw(THREADED, step), "rand_like", _with_draw(_plain, step),
                  args.rounds),
                 ("draw 64x64x28x28", "uniform_like", _with_draw(THREADED, lambda: unet_module.uniform_like(mask)),
                  "rand_like", _with_draw(_plain, lambda: unet_module.uniform_like(mask)), args.rounds * 20),
                 ("DDIM-50, batch 16", "inference_mode", walk(torch.inference_mode), "no_grad", walk(torch.no_grad),
                  max(args.rounds // 3, 2)))
        for work, trick_name, trick, plain_name, plain, rounds in pairs:
            seconds = _alternate({"trick": trick, "plain": plain}, rounds)
            ratios = [p / q for p, q in zip(seconds["plain"], seconds["trick"])]
            row = {"threads": threads, "work": work, "trick": trick_name, "plain": plain_name,
                   "trick_ms": statistics.median(seconds["trick"]) * 1e3,
                   "plain_ms": statistics.median(seconds["plain"]) * 1e3, "speedup": statistics.median(ratios),
                   "speedup_min": min(ratios), "speedup_max": max(ratios), "rounds": rounds}
            rows.append(row)
            print(f"{threads} thread{'s' if threads > 1 else ''}, {work}: {trick_name} {row['trick_ms']:.2f} ms, "
                  f"{plain_name} {row['plain_ms']:.2f} ms; {plain_name} / {trick_name} {row['speedup']:.3f}x "
                  f"(rounds {min(ratios):.3f}-{max(ratios):.3f})", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"torch": torch.__version__, "batch": args.batch, "rows": rows}, indent=2)
                             + "\n")


if __name__ == "__main__":
    main()
