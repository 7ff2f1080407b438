"""Class accuracy and FID-MNIST against the classifier-free guidance weight, on one conditional MNIST run,
beside an unconditional run of the same budget (docs/results.md).

    python benchmarks/guidance_table.py COND_RUN --json FILE [--unconditional RUN] [--num 1000]
        [--guidance 0,1,1.5,2,3,5] [--sampler heun] [--steps 10] [--seed 0] [--picture FILE --picture-guidance 1.5]
        [--sweep-picture FILE]

Every row draws --num samples from the same seed, the classes in turn (0, 1, ..., 9, 0, ...), with the
same walk (the conditional run's sampler, calls and grid, unless given); rows differ only by the
guidance. The unconditional row draws as many samples from the other run with that same walk. Each finished row is added to --json at once and rows already there are skipped, so
a stopped table resumes. --picture draws one row per digit at --picture-guidance; --sweep-picture the
digits 0-9 from the same noise at every guidance weight of the table.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import torch

import ddpm
from ddpm.evaluation import EvalOptions, evaluate_run
from ddpm.config import SampleConfig
from ddpm.guidance import guided
from ddpm.sampling import network_calls, sample_with, walk_budget, walk_grid, walk_timesteps
from ddpm.visualize import save_labelled_rows


def evaluations_per_sample(calls: int, guidance: float | None) -> int:
    """Network evaluations per sample: guidance other than 0 and 1 runs each call on two halves."""
    return calls * (1 if guidance in (None, 0.0, 1.0) else 2)


def measure(run: ddpm.Run, walk: SampleConfig, guidance: float | None, args: argparse.Namespace) -> dict:
    """One row: ``run`` sampled with the walk (sampler, calls, grid) of ``walk`` and ``guidance``."""
    options = run.sample_options(sampler=walk.sampler, steps=walk.steps, spacing=walk.spacing, guidance=guidance)
    calls = network_calls(options, walk_timesteps(run.schedule, options))
    started = time.perf_counter()
    result = evaluate_run(run, ["fid-mnist"], EvalOptions(num=args.num, sample=options, seed=args.seed,
                                                          data_dir=args.data_dir, progress=True))["fid-mnist"]
    row = {"guidance": guidance, "sampler": options.sampler, "calls": calls,
           "evaluations": evaluations_per_sample(calls, guidance), "fid": result["fid"],
           "fid_of_real_digits": result["fid_of_real_digits"], "confident_fraction": result["confident_fraction"],
           "seconds": time.perf_counter() - started}
    for name in ("class_accuracy", "fid_per_class", "fid_per_class_mean"):
        if name in result:
            row[name] = result[name]
    return row


def markdown(row: dict) -> str:
    w = "unconditional run" if row["guidance"] is None else f"{row['guidance']:g}"
    accuracy = f"{100 * row['class_accuracy']:.1f}%" if "class_accuracy" in row else "-"
    per_class = f"{row['fid_per_class_mean']:.1f}" if "fid_per_class_mean" in row else "-"
    return (f"| {w} | {row['evaluations']} | {accuracy} | {row['fid']:.1f} | {per_class} | "
            f"{100 * row['confident_fraction']:.1f}% | {row['seconds']:.0f} s |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="a conditional MNIST run")
    parser.add_argument("--json", required=True, help="rows are added here as they finish (and skipped if there)")
    parser.add_argument("--unconditional", help="an unconditional MNIST run of the same budget, for comparison")
    parser.add_argument("--num", type=int, default=1000)
    parser.add_argument("--guidance", default="0,1,1.5,2,3,5", help="comma-separated weights w")
    parser.add_argument("--sampler", default=None, help="default: the run's own")
    parser.add_argument("--steps", type=int, default=None, help="network calls; default: the sampler's own")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", default=None, help="the MNIST files, if not where the runs were trained")
    parser.add_argument("--picture", help="a PNG with one row per digit at --picture-guidance")
    parser.add_argument("--picture-guidance", type=float, default=1.5)
    parser.add_argument("--sweep-picture", help="a PNG with one row per guidance weight, digits 0-9 from the same noise")
    args = parser.parse_args()

    run = ddpm.load(args.run)
    if not run.conditional:
        raise SystemExit(f"{args.run} is not a conditional run (train it with --conditional)")
    out = Path(args.json)
    table = json.loads(out.read_text()) if out.exists() else {
        "run": args.run, "step": run.step, "num": args.num, "seed": args.seed, "machine": platform.processor()
        or platform.machine(), "threads": torch.get_num_threads(), "rows": []}
    done = {row["guidance"] for row in table["rows"]}
    wanted = [float(w) for w in args.guidance.split(",")] + ([None] if args.unconditional else [])
    walk = run.sample_options(sampler=args.sampler, steps=args.steps)  # the same walk for every row
    walk = walk.replace(steps=walk_budget(run.schedule, walk), spacing=walk_grid(walk))
    for guidance in wanted:
        if guidance in done:
            continue
        measured = ddpm.load(args.unconditional) if guidance is None else run
        table["rows"].append(measure(measured, walk, guidance, args))
        out.write_text(json.dumps(table, indent=1) + "\n")
        print(markdown(table["rows"][-1]), flush=True)
    table["rows"].sort(key=lambda row: math.inf if row["guidance"] is None else row["guidance"])
    out.write_text(json.dumps(table, indent=1) + "\n")
    print("| w | network evaluations | class accuracy | FID-MNIST | FID-MNIST per class (mean) | confident | time |")
    print("|---|---|---|---|---|---|---|")
    for row in table["rows"]:
        print(markdown(row))
    if args.picture:
        digits = torch.arange(10).repeat_interleave(10)
        x = run.sample(100, labels=digits, sampler=args.sampler, steps=args.steps, guidance=args.picture_guidance,
                       seed=args.seed)
        save_labelled_rows({run.classes[d]: x[10 * d:10 * d + 10] for d in range(10)}, args.picture)
        print(f"wrote {args.picture}")
    if args.sweep_picture:
        noise = torch.randn(10, *run.sample_shape, generator=torch.Generator().manual_seed(args.seed))
        rows = {}
        for w in [float(w) for w in args.guidance.split(",")]:
            model = guided(run.ema_model, torch.arange(10), w, len(run.classes))
            rows[f"w = {w:g}"] = sample_with(model, run.schedule, noise.shape, walk.replace(guidance=w),
                                             prediction=run.config.diffusion.prediction, noise=noise)
        save_labelled_rows(rows, args.sweep_picture)
        print(f"wrote {args.sweep_picture}")


if __name__ == "__main__":
    main()
