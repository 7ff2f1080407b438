"""Sample quality for a fixed wall-clock training budget: ddpm's mnist preset against diffusers' recipe
on MNIST, one after the other on the same (idle) machine (docs/results.md, "Quality per compute").

    pip install -c constraints.txt -e '.[bench]'      # diffusers, for this script only
    python benchmarks/budget.py --data-dir ../shared/data/mnist --budget 20m --json docs/results/budget.json
        [--only ddpm diffusers] [--num 1000] [--seed 0] [--threads 2] [--runs DIR] [--set train.lr=1e-3 ...]

The two sides, each in its own process, as their users run them:
  ddpm       `ddpm train --preset mnist --time-budget BUDGET`: the preset measures its step time over
             its first steps and fixes the step count so that its learning-rate decay ends on time
             (every periodic sample grid, held-out loss and checkpoint of the preset included). It then
             samples the way `ddpm sample` does by default (the run's own sampler and calls).
  diffusers  the recipe of diffusers' unconditional training example (examples/unconditional_image_generation),
             written with diffusers 0.42.1 on the small U-Net of benchmarks/compare_diffusers.py (UNet2DModel,
             block channels 32-64-64, one layer per block, attention at 14x14; 1.1M parameters, the
             size of ddpm's unet-mnist at its width 32, which the mnist preset narrows to 24; the
             example's dropout, none): DDPMScheduler (T = 1000, linear betas),
             batch 64, AdamW lr 5e-4 with betas (0.95, 0.999), weight decay 1e-6, eps 1e-8, gradient norm
             clipped to 1, the example's cosine learning-rate schedule with 500 warm-up steps, EMAModel
             with decay 0.995 and its warm-up (inv_gamma 1, power 3/4), epochs of shuffled data. The
             example plans its cosine decay from a number of epochs; here it is planned, as for ddpm,
             from the step time of its first steps, so that the decay ends on time too. It trains until
             the planned steps are done or the budget is spent, whichever is first, and samples with
             DDIMPipeline, 50 steps (eta 0, its default clipping).

Both sides draw --num samples from --seed and are scored by ddpm's FID-MNIST (`ddpm eval`'s: features of
ddpm's MNIST classifier against the 10,000 test digits) and the share of samples the classifier gives a
class with p >= 0.9. diffusers' training time is its loop's (data loaded and network built before the
clock starts); ddpm's is the whole `ddpm train` command's, start-up, data loading and the preset's
periodic sample grids, held-out losses and checkpoints included. Sampling time is reported beside it.
ddpm's command sets glibc's malloc to keep freed memory (ddpm/allocator.py), as it does for every user;
diffusers runs with the C library's defaults, as its users do. Each finished side is
added to --json at once and sides already there are skipped (delete the file to measure again), so a
stopped comparison resumes. --set changes the ddpm side's recipe (config fields, as `ddpm train` takes
them); benchmarks/ablation.py uses this script's functions for its rows.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F

from compare_diffusers import DIFFUSERS_MNIST, load_average, machine
from guidance_table import evaluations_per_sample

from ddpm import load
from ddpm.data import load_dataset
from ddpm.evaluation import score_mnist
from ddpm.validation import duration_seconds

# diffusers' unconditional training example, with the settings the issue gives for MNIST (batch 64,
# lr 5e-4, EMA 0.995, DDIM-50); the rest are the example's defaults.
DIFFUSERS_RECIPE = dict(batch_size=64, lr=5e-4, adam_betas=(0.95, 0.999), weight_decay=1e-6, adam_eps=1e-8,
                        lr_warmup_steps=500, ema_decay=0.995, ema_inv_gamma=1.0, ema_power=0.75, grad_clip=1.0,
                        num_train_timesteps=1000, ddim_steps=50)
PROBE = (10, 40)  # diffusers' side: its step time is measured over these steps, as ddpm's --time-budget does


def train_diffusers(budget: float, data: torch.Tensor, seed: int, progress: bool = True) -> dict[str, Any]:
    """diffusers' recipe on ``data`` (N, 1, 28, 28) in [-1, 1] for ``budget`` seconds of training.
    Returns the EMA network ("unet"), the scheduler config, the steps taken and the seconds spent."""
    from diffusers import DDPMScheduler, UNet2DModel
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel
    from tqdm.auto import tqdm

    r = DIFFUSERS_RECIPE
    torch.manual_seed(seed)
    unet = UNet2DModel(**{**DIFFUSERS_MNIST, "dropout": 0.0})
    noise_scheduler = DDPMScheduler(num_train_timesteps=r["num_train_timesteps"], beta_schedule="linear")
    optimizer = torch.optim.AdamW(unet.parameters(), lr=r["lr"], betas=r["adam_betas"],
                                  weight_decay=r["weight_decay"], eps=r["adam_eps"])
    ema = EMAModel(unet.parameters(), decay=r["ema_decay"], use_ema_warmup=True, inv_gamma=r["ema_inv_gamma"],
                   power=r["ema_power"], model_cls=UNet2DModel, model_config=unet.config)
    # Until the step count is planned, the example's warm-up (the cosine schedule's first 500 steps are
    # the same linear ramp whatever the total).
    lr_scheduler = get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=r["lr_warmup_steps"])
    generator = torch.Generator().manual_seed(seed)
    order, cursor = torch.randperm(len(data), generator=generator), 0
    planned, step, probe_started = None, 0, 0.0
    bar = tqdm(desc="diffusers training", unit="step", disable=not progress, dynamic_ncols=True)
    started = time.perf_counter()
    unet.train()
    while time.perf_counter() - started < budget and (planned is None or step < planned):
        if cursor + r["batch_size"] > len(order):  # a new epoch (the example's DataLoader drops nothing; close enough)
            order, cursor = torch.randperm(len(data), generator=generator), 0
        clean = data[order[cursor:cursor + r["batch_size"]]]
        cursor += r["batch_size"]
        noise = torch.randn(clean.shape, generator=generator)
        timesteps = torch.randint(0, r["num_train_timesteps"], (len(clean),), generator=generator)
        noisy = noise_scheduler.add_noise(clean, noise, timesteps)
        loss = F.mse_loss(unet(noisy, timesteps).sample, noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), r["grad_clip"])
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad()
        ema.step(unet.parameters())
        step += 1
        bar.update(1)
        if step == PROBE[0]:
            probe_started = time.perf_counter()
        if step == PROBE[1]:
            per_step = (time.perf_counter() - probe_started) / (PROBE[1] - PROBE[0])
            planned = step + int((budget - (time.perf_counter() - started)) / per_step)
            bar.total = planned
            lr_scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=r["lr_warmup_steps"],
                                         num_training_steps=planned)
            for _ in range(step):  # to where the run is (the same warm-up values so far)
                lr_scheduler.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    seconds = time.perf_counter() - started
    bar.close()
    ema.copy_to(unet.parameters())
    return {"unet": unet.eval(), "scheduler_config": dict(noise_scheduler.config), "steps": step,
            "planned_steps": planned, "train_seconds": seconds, "final_loss": loss.item()}


@torch.no_grad()
def sample_diffusers(unet: torch.nn.Module, scheduler_config: dict[str, Any], num: int, seed: int,
                     batch_size: int = 250) -> torch.Tensor:
    """``num`` samples of DDIMPipeline (DDIM-50, eta 0), mapped back from its [0, 1] to [-1, 1]."""
    from diffusers import DDIMPipeline, DDIMScheduler

    pipeline = DDIMPipeline(unet=unet, scheduler=DDIMScheduler.from_config(scheduler_config))
    pipeline.set_progress_bar_config(leave=False)
    generator = torch.Generator().manual_seed(seed)
    parts = []
    for start in range(0, num, batch_size):
        images = pipeline(batch_size=min(batch_size, num - start), generator=generator, eta=0.0,
                          num_inference_steps=DIFFUSERS_RECIPE["ddim_steps"], output_type="np").images
        parts.append(torch.from_numpy(images).permute(0, 3, 1, 2) * 2 - 1)
    return torch.cat(parts)


def diffusers_side(budget: float, args: argparse.Namespace) -> dict[str, Any]:
    data = load_dataset("mnist", split="train", data_dir=args.data_dir).data
    trained = train_diffusers(budget, data, args.seed)
    started = time.perf_counter()
    samples = sample_diffusers(trained["unet"], trained["scheduler_config"], args.num, args.seed)
    sample_seconds = time.perf_counter() - started
    scores = score_mnist(samples, data_dir=args.data_dir, seed=args.seed, progress=True).report
    return {"recipe": "diffusers: unconditional example, 1.1M U-Net, batch 64, lr 5e-4 cosine, EMA 0.995",
            "steps": trained["steps"], "planned_steps": trained["planned_steps"],
            "train_seconds": trained["train_seconds"], "final_loss": trained["final_loss"],
            "sampler": "DDIMPipeline, 50 steps", "evaluations": DIFFUSERS_RECIPE["ddim_steps"],
            "sample_seconds": sample_seconds, **kept_scores(scores)}


def ddpm_side(budget: str, args: argparse.Namespace, overrides: dict[str, dict[str, Any]] | None = None,
              name: str = "ddpm") -> dict[str, Any]:
    """`ddpm train --preset mnist --time-budget BUDGET` (with ``overrides`` as a --config file) in a process of
    its own, as a user runs it, then its default samples."""
    out = Path(args.runs) / name
    out.parent.mkdir(parents=True, exist_ok=True)
    layer = overrides or {}
    config_file = out.parent / f"{name}.json"
    config_file.write_text(json.dumps(layer))
    command = [sys.executable, "-m", "ddpm", "train", "--preset", "mnist", "--time-budget", budget, "--config",
               str(config_file), "--seed", str(args.seed), "--out", str(out), "--overwrite"]
    if args.data_dir:
        command += ["--data-dir", args.data_dir]
    started = time.perf_counter()
    subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
    train_seconds = time.perf_counter() - started
    run = load(out)
    options = run.sample_options()
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    losses = [m for m in metrics if "loss" in m]
    trained = {"overrides": layer, "steps": run.step, "train_seconds": train_seconds,
               "final_loss": losses[-1]["loss"] if losses else None,
               "heldout_loss_ema": next((m["heldout_loss_ema"] for m in reversed(metrics) if "heldout_loss_ema" in m),
                                        None)}
    if run.conditional:  # every class as often, with each guidance weight asked for (the run's own first)
        return {"recipe": f"ddpm: mnist preset, --conditional, --time-budget {budget}", **trained,
                **conditional_scores(run, options, args)}
    started = time.perf_counter()
    samples = run.sample(args.num, seed=args.seed, batch_size=250, progress=True)
    sample_seconds = time.perf_counter() - started
    scores = score_mnist(samples, data_dir=args.data_dir, seed=args.seed, progress=True).report
    return {"recipe": f"ddpm: mnist preset, --time-budget {budget}", **trained,
            "sampler": walk_name(run, options), "evaluations": evaluations(run, options),
            "sample_seconds": sample_seconds, **kept_scores(scores)}


def conditional_scores(run: Any, options: Any, args: argparse.Namespace) -> dict[str, Any]:
    """A conditional run's --num samples, the classes in turn, scored once per guidance weight of --guidance
    (default: the run's own): the first weight's scores, and every weight's under "by_guidance". A weight
    other than 0 and 1 evaluates the network twice a call (both halves in one batch), which the count says."""
    labels = torch.arange(args.num) % len(run.classes)
    rows = []
    for weight in args.guidance or [options.guidance]:
        started = time.perf_counter()
        samples = run.sample(args.num, labels=labels, guidance=weight, seed=args.seed, batch_size=250, progress=True)
        sample_seconds = time.perf_counter() - started
        scores = score_mnist(samples, data_dir=args.data_dir, seed=args.seed, progress=True).report
        rows.append({"guidance": weight, "evaluations": evaluations_per_sample(evaluations(run, options), weight),
                     "sample_seconds": sample_seconds, **kept_scores(scores)})
    return {"sampler": walk_name(run, options) + f", the {len(run.classes)} classes in turn", **rows[0],
            "by_guidance": rows}


def evaluations(run: Any, options: Any) -> int:
    """Network evaluations a sample of ``run`` costs when drawn with ``options``."""
    from ddpm.sampling import network_calls, walk_timesteps

    return network_calls(options, walk_timesteps(run.schedule, options))


def walk_name(run: Any, options: Any) -> str:
    """How ``run`` is drawn with ``options``, in words: "heun, 9 calls, trailing grid"."""
    return (f"{options.sampler}, {evaluations(run, options)} calls" + (f", eta {options.eta:g}" if options.eta else "")
            + (f", {options.spacing} grid" if options.spacing else ""))


def kept_scores(report: dict[str, Any]) -> dict[str, Any]:
    """The scores of an MNIST report that a result file keeps."""
    keep = ("fid", "fid_of_real_digits", "confident_fraction", "mean_max_prob", "class_histogram", "samples")
    return {key: report[key] for key in keep}


def merged(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``update``'s values put in, tables within tables merged the same way."""
    out = dict(base)
    for key, value in update.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def parse_settings(settings: list[str]) -> dict[str, dict[str, Any]]:
    """["train.lr=1e-3", "model.overrides={\"ch\": 48}"] -> {"train": {"lr": 0.001}, "model": {...}}: values
    are JSON where they parse as JSON, else strings."""
    out: dict[str, dict[str, Any]] = {}
    for setting in settings:
        key, sep, text = setting.partition("=")
        section, dot, name = key.partition(".")
        if not sep or not dot:
            raise SystemExit(f"--set {setting!r}: write SECTION.FIELD=VALUE, e.g. train.lr=1e-3")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        out.setdefault(section, {})[name] = value
    return out


def table(budget: str, rows: dict[str, dict[str, Any]]) -> str:
    lines = ["| recipe | budget | steps reached | training s | sampler | evaluations | FID-MNIST | confident | "
             "FID ratio diffusers / this |",
             "|---|---|---:|---:|---|---:|---:|---:|---:|"]
    theirs = rows.get("diffusers", {}).get("fid")
    entries = [{**row, **guided, "recipe": row["recipe"] + (f", guidance {guided['guidance']:g}" if guided else "")}
               for row in rows.values() for guided in row.get("by_guidance", [{}])]
    for row in entries:
        ratio = f"{theirs / row['fid']:.1f}x" if theirs else "-"
        lines.append(f"| {row['recipe']} | {budget} | {row['steps']} | {row['train_seconds']:.0f} | {row['sampler']} | "
                     f"{row['evaluations']} | {row['fid']:.1f} | {100 * row['confident_fraction']:.1f}% | {ratio} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", default="20m", help="training time of each side: 90s, 20m, 1h, ...")
    parser.add_argument("--only", nargs="+", choices=("ddpm", "diffusers"), default=("diffusers", "ddpm"))
    parser.add_argument("--data-dir", default=None, help="where the MNIST files are")
    parser.add_argument("--num", type=int, default=1000, help="samples each side draws and is scored on")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", default="runs/budget", help="where ddpm's run is written (replaced)")
    parser.add_argument("--set", nargs="*", default=[], metavar="SECTION.FIELD=VALUE", help="change ddpm's recipe")
    parser.add_argument("--json", type=Path, default=None, help="add the results to this file")
    parser.add_argument("--guidance", type=float, nargs="+", default=None,
                        help="a conditional ddpm run (--set model.conditional=true): the guidance weights to "
                             "sample and score it with (default: the run's own)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    budget = duration_seconds("--budget", args.budget)
    results = json.loads(args.json.read_text()) if args.json and args.json.exists() else {}
    results.setdefault("rows", {})
    results |= {"budget": args.budget, "budget_seconds": budget, "num": args.num, "seed": args.seed,
                "machine": machine(), "python": platform.python_version()}
    for side in args.only:
        if side in results["rows"]:
            print(f"{side}: already in {args.json}; skipped")
            continue
        load = load_average()
        print(f"{side}: load average before {load}")
        row = (diffusers_side(budget, args) if side == "diffusers"
               else ddpm_side(args.budget, args, parse_settings(args.set)))
        row["load_average_before"] = load
        results["rows"][side] = row
        print(json.dumps({k: v for k, v in row.items() if k not in ("class_histogram", "by_guidance")}, indent=1))
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(results, indent=1) + "\n")
    print(table(args.budget, results["rows"]))


if __name__ == "__main__":
    main()
