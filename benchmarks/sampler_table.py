"""Sample quality against network calls for every sampler and grid, on one trained run (docs/results.md).

    python benchmarks/sampler_table.py RUN_DIR --json FILE [--num 200] [--metric fid-mnist]
        [--walks all | SAMPLER:CALLS[:GRID],...] [--picture FILE --picture-calls 10]

--walks all is every sampler on its own grid at 5, 10, 15, 20 and 50 network calls, DDPM on all T
steps, and every ODE solver on every grid at 10 calls. Every walk draws the same number of samples
from the same seed, so rows differ only by the walk. Each finished row is added to --json at once and
rows already there are skipped, so a stopped table resumes (and several processes can share one
list of walks by giving each its own part). Prints a markdown row per walk with its wall time
(sampling and the metric together); --picture draws the same 8 seeds with every sampler.
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
from ddpm.grids import GRIDS
from ddpm.sampling import SAMPLERS, network_calls, walk_grid, walk_timesteps
from ddpm.visualize import save_labelled_rows

HEADLINE = {"fid-mnist": "fid", "fid": "fid", "energy": "energy_distance", "gradient": "mean", "square": "mean"}
FLOOR = {"fid-mnist": "fid_of_real_digits", "energy": "noise_floor", "gradient": "real_data_mean"}
ODE_SOLVERS = ["euler", "heun", "ipndm", "dpm++2m", "dpm++3m"]


def all_walks(num_steps: int) -> list[tuple[str, int, str | None]]:
    walks = [(name, calls, None) for name in ["ddim", *ODE_SOLVERS] for calls in (5, 10, 15, 20, 50)]
    walks += [(name, 10, grid) for name in ODE_SOLVERS for grid in GRIDS if grid != SAMPLERS[name].grid]
    return walks + [("ddpm", num_steps, None)]


def parse_walks(text: str, num_steps: int) -> list[tuple[str, int, str | None]]:
    if text == "all":
        return all_walks(num_steps)
    walks = []
    for item in text.split(","):
        sampler, calls, *grid = item.split(":")
        if sampler not in SAMPLERS or not calls.isdigit() or len(grid) > 1 or (grid and grid[0] not in GRIDS):
            raise SystemExit(f"--walks: {item!r} is not SAMPLER:CALLS[:GRID] with SAMPLER one of {', '.join(SAMPLERS)} "
                             f"and GRID one of {', '.join(GRIDS)}")
        walks.append((sampler, int(calls), grid[0] if grid else None))
    return walks


def key(row: dict) -> tuple[str, int, str]:
    return row["sampler"], row["calls"], row["grid"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run")
    parser.add_argument("--json", type=Path, required=True, help="rows are added here (and read back to resume)")
    parser.add_argument("--num", type=int, default=200, help="samples per walk (default 200)")
    parser.add_argument("--metric", default="fid-mnist", choices=[m for m in METRICS if m != "bpd"])
    parser.add_argument("--walks", default="all")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--picture", type=Path, help="also save the same seeds drawn by every sampler here")
    parser.add_argument("--picture-calls", type=int, default=10)
    args = parser.parse_args()

    run = ddpm.load(args.run)
    table = json.loads(args.json.read_text()) if args.json.exists() else {
        "run": args.run, "step": run.step, "num": args.num, "seed": args.seed, "metric": args.metric, "rows": []}
    done = {key(row) for row in table["rows"]}
    print(f"{args.run} at step {run.step}; {args.num} samples per walk, seed {args.seed}; "
          f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"| sampler | grid | calls | {args.metric} | floor | other | wall time |")
    print("|---|---|---|---|---|---|---|")
    for sampler, calls, grid in parse_walks(args.walks, run.schedule.num_steps):
        options = run.sample_options(sampler=sampler, steps=calls, spacing=grid)
        grid = walk_grid(options)
        used = network_calls(options, walk_timesteps(run.schedule, options))
        if (sampler, used, grid) in done:
            continue
        start = time.perf_counter()
        result = evaluate_run(run, [args.metric], EvalOptions(num=args.num, sample=options, seed=args.seed,
                                                               progress=False))[args.metric]
        seconds = time.perf_counter() - start
        row = {**result, "walk": result.get("sampler"), "sampler": sampler, "grid": grid, "calls": used,
               "clip": options.clip, "seconds": seconds, "threads": torch.get_num_threads()}
        table["rows"].append(row)
        done.add(key(row))
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(table, indent=2) + "\n")
        floor = result.get(FLOOR.get(args.metric, ""), float("nan"))
        other = f"confident {result['confident_fraction']:.3f}" if "confident_fraction" in result else ""
        print(f"| {sampler} | {grid} | {used} | {result[HEADLINE[args.metric]]:.4g} | {floor:.4g} | {other} | "
              f"{seconds:.0f} s |", flush=True)
    if args.picture:
        noise = torch.randn(8, *run.sample_shape, generator=torch.Generator().manual_seed(args.seed))
        rows = {}
        walks = [(name, args.picture_calls) for name in ["ddim", *ODE_SOLVERS]]
        for sampler, calls in walks + [("ddim", 50), ("ddpm", run.schedule.num_steps)]:
            options = run.sample_options(sampler=sampler, steps=calls)
            x = ddpm.sampling.sample_with(run.ema_model, run.schedule, tuple(noise.shape), options,
                                          prediction=run.config.diffusion.prediction, noise=noise)
            used = network_calls(options, walk_timesteps(run.schedule, options))
            rows[f"{sampler}, {walk_grid(options)}, {used} calls"] = x.clamp(-1, 1)
        save_labelled_rows(rows, args.picture)
        print(f"wrote {args.picture}")


if __name__ == "__main__":
    main()
