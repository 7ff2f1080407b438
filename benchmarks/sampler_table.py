"""Sample quality against the number of sampling steps, on one trained run (docs/results.md).

    python benchmarks/sampler_table.py RUN_DIR [--num 200] [--json FILE] [--metric fid-mnist]
        [--walks ddim:10,ddim:20,ddim:50,ddim:100,ddpm:1000]

The shape of the DDIM paper's Table 1 (quality after S steps of DDIM, eta = 0, against DDPM on all
T steps), measured with ``ddpm eval``'s metrics: every walk draws the same number of samples from the
same starting seed, so the rows differ only by the sampler. Prints a markdown table with the wall
time of each row (sampling and the metric together) and writes every number to --json.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

import ddpm
from ddpm.evaluation import METRICS, EvalOptions, evaluate_run

HEADLINE = {"fid-mnist": "fid", "fid": "fid", "energy": "energy_distance", "gradient": "mean", "square": "mean"}
FLOOR = {"fid-mnist": "fid_of_real_digits", "energy": "noise_floor", "gradient": "real_data_mean"}


def parse_walks(text: str) -> list[tuple[str, int]]:
    walks = []
    for item in text.split(","):
        sampler, _, steps = item.partition(":")
        if sampler not in ("ddpm", "ddim") or not steps.isdigit():
            raise SystemExit(f"--walks: {item!r} is not SAMPLER:STEPS with SAMPLER ddpm or ddim")
        walks.append((sampler, int(steps)))
    return walks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run")
    parser.add_argument("--num", type=int, default=200, help="samples per walk (default 200)")
    parser.add_argument("--metric", default="fid-mnist", choices=[m for m in METRICS if m != "bpd"])
    parser.add_argument("--walks", default="ddim:10,ddim:20,ddim:50,ddim:100,ddpm:1000")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write the rows here")
    args = parser.parse_args()

    run = ddpm.load(args.run)
    rows = []
    print(f"{args.run} at step {run.step}; {args.num} samples per walk, seed {args.seed}; "
          f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"| sampler | steps | {args.metric} | floor (real data) | other | wall time |")
    print("|---|---|---|---|---|---|")
    for sampler, steps in parse_walks(args.walks):
        options = EvalOptions(num=args.num, sample=run.sample_options(sampler=sampler, steps=steps), seed=args.seed,
                              progress=False)
        start = time.perf_counter()
        result = evaluate_run(run, [args.metric], options)[args.metric]
        seconds = time.perf_counter() - start
        rows.append({"sampler": sampler, "steps": steps, "seconds": seconds, **result})
        floor = result.get(FLOOR.get(args.metric, ""), float("nan"))
        other = f"confident {result['confident_fraction']:.3f}" if "confident_fraction" in result else ""
        print(f"| {sampler.upper()} | {steps} | {result[HEADLINE[args.metric]]:.4g} | {floor:.4g} | {other} | "
              f"{seconds:.0f} s |", flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"run": args.run, "step": run.step, "num": args.num, "seed": args.seed,
                                         "threads": torch.get_num_threads(), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
