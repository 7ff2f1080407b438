"""What makes the best MNIST samples for a fixed wall-clock training budget: one change at a time from a
base recipe, each trained with `ddpm train --preset mnist --time-budget BUDGET` and scored as
benchmarks/budget.py scores it (docs/results.md, "Quality per compute").

    python benchmarks/ablation.py --data-dir ../shared/data/mnist --budget 4m --json docs/results/ablation-4m.json
        [--rows NAME ...] [--seeds 0 1] [--samplers RUN_DIR] [--num 1000] [--threads 2] [--runs runs/ablation]

Each row is a change (config fields, as `ddpm train --config` takes them) from the row it names as its
base; the first rows change the mnist preset as it was before (row "preset"), the later ones the best
of those. Rows run one after
the other (never two at once), each finished row is added to --json at once and rows already there
are skipped, so a stopped table resumes. --seeds trains a row once per seed (--seed of `ddpm train`,
which also seeds its samples and the real digits of the FID floor). --samplers RUN_DIR draws that run
(1000 samples from seed 0) with each walk of SAMPLER_ROWS instead of training anything.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from budget import ddpm_side, evaluations, kept_scores, load_average, machine, merged, walk_name

from ddpm import load
from ddpm.evaluation import score_mnist

# name: (base row or None for the preset, the change, what it tests)
ROWS: dict[str, tuple[str | None, dict[str, dict[str, Any]], str]] = {
    # The mnist preset as it was before this ablation chose its new recipe (its settings spelled out, so that
    # the rows mean the same whatever the preset holds now).
    "preset": (None, {"model": {"dropout": 0.1, "overrides": {"attention_levels": [2], "ch": 32}}, "diffusion": {"weighting": "none"},
                      "train": {"lr": 5e-4, "warmup": 200, "lr_decay": "constant", "batch_size": 64, "ema_decay": 0.9995,
                                "precision": "fp32"}},
               "the earlier mnist preset: lr 5e-4 constant after 200 warm-up steps, dropout 0.1, batch 64, EMA 0.9995"),
    "cosine": ("preset", {"train": {"lr_decay": "cosine"}}, "lr decayed to 0 along a half cosine"),
    "linear": ("preset", {"train": {"lr_decay": "linear"}}, "lr decayed to 0 along a line"),
    "lr-1e-3": ("cosine", {"train": {"lr": 1e-3}}, "lr 1e-3"),
    "lr-2e-3": ("cosine", {"train": {"lr": 2e-3}}, "lr 2e-3"),
    "batch-32": ("cosine", {"train": {"batch_size": 32}}, "batch 32 (twice the steps)"),
    "batch-128": ("cosine", {"train": {"batch_size": 128}}, "batch 128 (half the steps)"),
    "ema-long": ("cosine", {"train": {"ema_decay": 0.999, "ema_warmup": False}},
                 "EMA 0.999 without warm-up (the warm-up caps the decay at (1 + n) / (10 + n))"),
    "min-snr": ("cosine", {"diffusion": {"weighting": "min_snr"}}, "Min-SNR-5 loss weighting"),
    "edm": ("cosine", {"diffusion": {"weighting": "edm"}}, "EDM's log-normal noise levels and loss weighting"),
    "cosine-schedule": ("cosine", {"diffusion": {"schedule": "cosine"}}, "cosine beta schedule"),
    "v": ("cosine", {"diffusion": {"prediction": "v"}}, "v prediction"),
    "no-dropout": ("cosine", {"model": {"dropout": 0.0}}, "no dropout (the preset's network has 0.1)"),
    "min-snr-v": ("cosine", {"diffusion": {"weighting": "min_snr", "prediction": "v"}}, "Min-SNR-5 with v prediction"),
    "ch-48": ("cosine", {"model": {"overrides": {"ch": 48}}}, "width 48 (32 in the rows before)"),
    "no-attention": ("cosine", {"model": {"overrides": {"attention_levels": []}}}, "no attention (at 7x7 in the preset)"),
    "combined": ("lr-2e-3", {"model": {"dropout": 0.0}, "diffusion": {"weighting": "min_snr"}},
                 "lr 2e-3, no dropout and Min-SNR-5 together (the winners of their rows)"),
    "two-blocks": ("cosine", {"model": {"overrides": {"num_res_blocks": 2}}}, "two residual blocks a level (one in the preset)"),
    # Changes from the combined recipe (the mnist preset since this ablation).
    "combined-bf16": ("combined", {"train": {"precision": "bf16"}}, "bf16 autocast (a third faster a step on this CPU)"),
    "combined-no-attention": ("combined", {"model": {"overrides": {"attention_levels": []}}}, "no attention"),
    "combined-lr-3e-3": ("combined", {"train": {"lr": 3e-3}}, "lr 3e-3"),
    "bf16-no-attention": ("combined-bf16", {"model": {"overrides": {"attention_levels": []}}}, "no attention"),
    # Changes from bf16 without attention (the mnist preset since these rows).
    "fast-batch-128": ("bf16-no-attention", {"train": {"batch_size": 128}}, "batch 128 (half the steps)"),
    "fast-ema-long": ("bf16-no-attention", {"train": {"ema_decay": 0.999, "ema_warmup": False}},
                      "EMA 0.999 without warm-up"),
    "fast-two-blocks": ("bf16-no-attention", {"model": {"overrides": {"num_res_blocks": 2}}},
                        "two residual blocks a level"),
    "fast-batch-32": ("bf16-no-attention", {"train": {"batch_size": 32}}, "batch 32 (twice the steps)"),
    "fast-constant": ("bf16-no-attention", {"train": {"lr_decay": "constant"}}, "constant lr after the warm-up"),
    "fast-linear": ("bf16-no-attention", {"train": {"lr_decay": "linear"}}, "lr decayed to 0 along a line"),
    "fast-no-min-snr": ("bf16-no-attention", {"diffusion": {"weighting": "none"}}, "no loss weighting (the simple loss)"),
    "fast-v": ("bf16-no-attention", {"diffusion": {"prediction": "v"}}, "v prediction (with Min-SNR-5)"),
    # Changes from the linear decay (the mnist preset since the rows above; fast-constant is one of them too).
    "linear-ema-short": ("fast-linear", {"train": {"ema_decay": 0.99}}, "EMA 0.99 (with its warm-up)"),
    "linear-ch-24": ("fast-linear", {"model": {"overrides": {"ch": 24}}}, "width 24 (32 in the rows before; the mnist preset since)"),
    "linear-dropout": ("fast-linear", {"model": {"dropout": 0.1}}, "dropout 0.1"),
    "linear-batch-128": ("fast-linear", {"train": {"batch_size": 128}}, "batch 128 (half the steps)"),
    "linear-two-blocks": ("fast-linear", {"model": {"overrides": {"num_res_blocks": 2}}}, "two residual blocks a level"),
    "linear-edm": ("fast-linear", {"diffusion": {"weighting": "edm"}}, "EDM's log-normal noise levels and loss weighting"),
    "linear-cosine-schedule": ("fast-linear", {"diffusion": {"schedule": "cosine"}}, "cosine beta schedule"),
    # Changes from width 24 (the mnist preset since the rows above): the changes the 4-minute rows rejected,
    # to be run at 20 minutes.
    "w24-preset": ("linear-ch-24", {}, "none: the mnist preset now (linear-ch-24 again, on another day)"),
    "w24-edm": ("linear-ch-24", {"diffusion": {"weighting": "edm"}}, "EDM's log-normal noise levels and loss weighting"),
    "w24-dropout": ("linear-ch-24", {"model": {"dropout": 0.1}}, "dropout 0.1"),
    "w24-two-blocks": ("linear-ch-24", {"model": {"overrides": {"num_res_blocks": 2}}}, "two residual blocks a level"),
    "w24-batch-128": ("linear-ch-24", {"train": {"batch_size": 128}}, "batch 128 (half the steps)"),
    "w24-cosine-schedule": ("linear-ch-24", {"diffusion": {"schedule": "cosine"}},
                            "cosine beta schedule (the ODE walks start at t = 994, s = 128)"),
}

# Walks to draw one trained run with (`ddpm sample` options): at most 20 network calls, and DDIM-50.
SAMPLER_ROWS = [
    {"sampler": "heun", "steps": 10}, {"sampler": "heun", "steps": 20}, {"sampler": "dpm++2m", "steps": 10},
    {"sampler": "dpm++2m", "steps": 20}, {"sampler": "ddim", "steps": 20}, {"sampler": "ddim", "steps": 20, "eta": 1.0},
    {"sampler": "ddpm", "steps": 20}, {"sampler": "ddim", "steps": 50},
    {"sampler": "dpm++3m", "steps": 10}, {"sampler": "heun", "steps": 10, "spacing": "karras"},
]


def overrides_of(name: str) -> dict[str, dict[str, Any]]:
    """Row ``name``'s whole change from the preset (its base's, then its own)."""
    base, change, _ = ROWS[name]
    return merged(overrides_of(base) if base else {}, change)


def sampler_rows(run_dir: Path, args: argparse.Namespace, results: dict[str, Any]) -> None:
    run = load(run_dir)
    for asked in SAMPLER_ROWS:
        key = " ".join(f"{k}={v}" for k, v in asked.items())
        if key in results["samplers"]:
            continue
        options = run.sample_options(**asked)
        started = time.perf_counter()
        samples = run.sample(args.num, options=options, seed=0, batch_size=250, progress=True)
        seconds = time.perf_counter() - started
        scores = score_mnist(samples, data_dir=args.data_dir, seed=0).report
        results["samplers"][key] = {"run": str(run_dir), "steps": run.step, "walk": walk_name(run, options),
                                    "evaluations": evaluations(run, options), "sample_seconds": seconds,
                                    **kept_scores(scores)}
        print(key, f"FID {scores['fid']:.1f}, confident {scores['confident_fraction']:.3f}")
        _save(args, results)


def _save(args: argparse.Namespace, results: dict[str, Any]) -> None:
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1) + "\n")


def table(results: dict[str, Any]) -> str:
    lines = ["| row | change | from | seed | steps | FID-MNIST | confident | held-out loss (EMA) |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for key, row in results["rows"].items():
        name = row["row"]
        base, _, what = ROWS[name]
        lines.append(f"| {name} | {what} | {base or '-'} | {row['seed']} | {row['steps']} | {row['fid']:.1f} | "
                     f"{100 * row['confident_fraction']:.1f}% | {row['heldout_loss_ema'] or float('nan'):.4f} |")
    if results.get("samplers"):
        lines += ["", "| walk | evaluations | FID-MNIST | confident | seconds |", "|---|---:|---:|---:|---:|"]
    for row in results.get("samplers", {}).values():
        lines.append(f"| {row['walk']} | {row['evaluations']} | {row['fid']:.1f} | {100 * row['confident_fraction']:.1f}% | "
                     f"{row['sample_seconds']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", default="20m")
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--samplers", type=Path, default=None, metavar="RUN_DIR",
                        help="draw this trained run with every walk of SAMPLER_ROWS instead of training")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--num", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", default="runs/ablation")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = json.loads(args.json.read_text()) if args.json and args.json.exists() else {}
    results.setdefault("rows", {})
    results.setdefault("samplers", {})
    results |= {"budget": args.budget, "num": args.num, "machine": machine()}
    if args.samplers:
        sampler_rows(args.samplers, args, results)
    else:
        for name in args.rows:
            for seed in args.seeds:
                key = f"{name}-seed{seed}"
                if key in results["rows"]:
                    continue
                before = load_average()
                args.seed = seed
                row = ddpm_side(args.budget, args, overrides_of(name), name=key)
                results["rows"][key] = {"row": name, "seed": seed, "load_average_before": before, **row}
                print(key, f"steps {row['steps']}, FID {row['fid']:.1f}, confident {row['confident_fraction']:.3f}")
                _save(args, results)
    print(table(results))


if __name__ == "__main__":
    main()
