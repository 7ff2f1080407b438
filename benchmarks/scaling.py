"""How a ddpm training step's time and memory grow with batch size and image size (docs/performance.md).

    python benchmarks/scaling.py [--threads 2] [--device cpu] [--json FILE] [--plots DIR] [--quick]

The network is unet-mnist's architecture (ch 32, mult (1, 2, 2), one block per level, attention at
the coarsest level) on 1-channel images, laid out and optimised as `ddpm train` does by default
(channels-last, fused AdamW, fp32, malloc keeping freed memory). Two sweeps: batch size at 28x28,
and image size at batch 16.

Each point runs in a fresh process, so memory readings do not mix: one warm-up step, then the median
of --steps timed steps. Memory is the growth of the process's peak resident set over what it held
with the model, optimiser and batch built (on a GPU: torch.cuda.max_memory_allocated), so it counts
activations kept for backward, gradients and AdamW's two moments.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

BATCHES = [4, 8, 16, 32, 64, 128]
SIZES = [16, 28, 32, 48, 64]  # divisible by 4: three levels
SIZE_BATCH = 16


def measure(batch: int, size: int, steps: int, device: str) -> dict[str, float]:
    """One point, in this process: seconds per step (median) and memory growth in MiB."""
    import torch

    import ddpm
    from ddpm.allocator import keep_freed_memory
    from ddpm.config import build_config
    from ddpm.models import build_model, use_channels_last
    from ddpm.training import build_optimizer
    from model_table import median_seconds  # a sibling script: benchmarks/ is on sys.path

    keep_freed_memory()  # as the `ddpm` command does
    model = use_channels_last(build_model("unet-mnist", seed=0, image_size=size,
                                          attention_resolutions=(size // 4,))).to(device).train()
    optimizer = build_optimizer(model, build_config("mnist"))
    schedule = ddpm.NoiseSchedule("linear", 1000).to(device)
    g = torch.Generator().manual_seed(0)
    x0 = (torch.rand(batch, 1, size, size, generator=g) * 2 - 1).to(device)
    t = torch.randint(0, 1000, (batch,), generator=g).to(device)
    noise = torch.randn(x0.shape, generator=g).to(device)

    def step() -> None:
        ddpm.training_loss(model, schedule, x0, t=t, noise=noise).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    seconds = median_seconds(step, warmup=1, repeats=steps)
    if device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"batch": batch, "size": size, "seconds_per_step": seconds, "images_per_s": batch / seconds,
            "memory_mib": (peak - base) / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per point (default 3)")
    parser.add_argument("--json", type=Path, help="write every point to this JSON file")
    parser.add_argument("--plots", type=Path, help="write scaling-batch.png and scaling-size.png here")
    parser.add_argument("--quick", action="store_true", help="three small points: a smoke test")
    parser.add_argument("--point", nargs=2, type=int, help=argparse.SUPPRESS)  # batch size: run one point
    args = parser.parse_args()
    if args.point:
        import torch
        torch.set_num_threads(args.threads)
        print(json.dumps(measure(*args.point, args.steps, args.device)))
        return

    batches, sizes = ([4, 8], [16]) if args.quick else (BATCHES, SIZES)
    plan = [("batch", b, 28) for b in batches] + [("size", SIZE_BATCH if not args.quick else 4, s) for s in sizes]
    points = []
    for sweep, batch, size in plan:
        command = [sys.executable, __file__, "--point", str(batch), str(size), "--steps", str(args.steps),
                   "--threads", str(args.threads), "--device", args.device]
        out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        point = {"sweep": sweep, **json.loads(out.strip().splitlines()[-1])}
        points.append(point)
        print(f"{sweep:5s} batch {batch:4d} {size:3d}x{size:<3d} {point['seconds_per_step'] * 1e3:8.1f} ms/step "
              f"{point['images_per_s']:7.1f} img/s {point['memory_mib']:8.1f} MiB", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"device": args.device, "threads": args.threads, "points": points},
                                        indent=2) + "\n")
    if args.plots:
        from ddpm.visualize import plot_curves

        args.plots.mkdir(parents=True, exist_ok=True)
        by_batch = [p for p in points if p["sweep"] == "batch"]
        by_size = [p for p in points if p["sweep"] == "size"]
        plot_curves({"ms per step": [(p["batch"], 1e3 * p["seconds_per_step"]) for p in by_batch],
                     "MiB": [(p["batch"], p["memory_mib"]) for p in by_batch]},
                    args.plots / "scaling-batch.png", title="unet-mnist training step, 28x28, by batch size",
                    xlabel="batch size", ylabel="ms per step / MiB", log_y=True)
        plot_curves({"ms per step": [(p["size"], 1e3 * p["seconds_per_step"]) for p in by_size],
                     "MiB": [(p["size"], p["memory_mib"]) for p in by_size]},
                    args.plots / "scaling-size.png",
                    title=f"unet-mnist training step, batch {by_size[0]['batch']}, by image size",
                    xlabel="image side (pixels)", ylabel="ms per step / MiB", log_y=True)


if __name__ == "__main__":
    main()
