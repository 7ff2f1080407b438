"""This checkout's ddpm against an earlier commit's, side by side in one process: did a change slow
sampling or training down?

    python benchmarks/ab_versions.py --old a497117 [--rounds 20] [--work ddim ddpm mnist cifar]

The earlier commit's src/ddpm is taken with `git archive` into a temporary folder and renamed
``ddpm_old`` (its imports rewritten), so both versions load in one process and their runs alternate,
the order turned around every round. The same weights go into both networks. Works: DDIM-50 and
DDPM-100 sampling of unet-mnist (batch 16, attention at 14 as in compare_diffusers.py) and fp32
training steps of unet-mnist (batch 64) and unet-cifar10 (batch 32), channels-last, fused AdamW.
Prints old / new per work (median over rounds, with the rounds' range): above 1 when new is faster.
"""

from __future__ import annotations

import argparse
import io
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch

import ddpm
from ddpm.allocator import keep_freed_memory


def import_old(rev: str, folder: Path):
    """The package of commit ``rev`` as ``ddpm_old``."""
    archive = subprocess.run(["git", "archive", "--format=tar", rev, "src/ddpm"], capture_output=True, check=True,
                             cwd=Path(__file__).resolve().parents[1]).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(folder, filter="data")
    package = folder / "ddpm_old"
    (folder / "src" / "ddpm").rename(package)
    for path in package.rglob("*.py"):
        text = re.sub(r"\bfrom ddpm([. ])", r"from ddpm_old\1", path.read_text())
        path.write_text(re.sub(r"\bimport ddpm\b", "import ddpm_old", text))
    sys.path.insert(0, str(folder))
    import ddpm_old

    return ddpm_old


def sampling(pkg, model, sampler: str, steps: int):
    schedule = pkg.NoiseSchedule("linear", 1000)
    extra = {"cuda_graph": False}

    def run() -> None:
        pkg.sample(model, schedule, (16, 1, 28, 28), sampler=sampler, steps=steps, clip_denoised=sampler == "ddpm",
                   generator=torch.Generator().manual_seed(1), **extra)
    return run


def training(pkg, model, shape):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    schedule = pkg.NoiseSchedule("linear", 1000)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.rand(shape, generator=g) * 2 - 1, torch.randn(shape, generator=g)
    t = torch.randint(0, 1000, (shape[0],), generator=g)

    def run() -> None:
        pkg.diffusion.per_example_loss(model, schedule, x0, t, noise).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return run


def networks(old, preset: str, **settings):
    new_net = ddpm.models.use_channels_last(ddpm.models.build_model(preset, seed=0, **settings))
    with torch.no_grad():  # weights with values everywhere (the last convs start at zero)
        for p in new_net.parameters():
            p.normal_(0.0, 0.02, generator=torch.Generator().manual_seed(p.numel()))
    old_net = old.models.use_channels_last(old.models.build_model(preset, seed=0, **settings))
    old_net.load_state_dict(new_net.state_dict())
    return new_net, old_net


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", required=True, help="the earlier commit")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--work", nargs="+", default=["ddim", "ddpm", "mnist", "cifar"])
    args = parser.parse_args()
    keep_freed_memory()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as folder:
        old = import_old(args.old, Path(folder))
        works = []
        if {"ddim", "ddpm"} & set(args.work):
            new_net, old_net = networks(old, "unet-mnist", attention_resolutions=(14,))
            new_net.eval(), old_net.eval()
            for sampler, steps in (("ddim", 50), ("ddpm", 100)):
                if sampler in args.work:
                    works.append((f"sample {sampler.upper()}-{steps}", sampling(ddpm, new_net, sampler, steps),
                                  sampling(old, old_net, sampler, steps), args.rounds))
        trainings = (("mnist", "unet-mnist", (64, 1, 28, 28)), ("cifar", "unet-cifar10", (32, 3, 32, 32)))
        for name, preset, shape in trainings:
            if name in args.work:
                new_net, old_net = networks(old, preset)
                works.append((f"train {preset} fp32, batch {shape[0]}", training(ddpm, new_net.train(), shape),
                               training(old, old_net.train(), shape), args.rounds if name == "mnist" else
                               max(args.rounds // 2, 2)))
        for work, new, previous, rounds in works:
            new(), previous(), new(), previous()
            seconds = {"new": [], "old": []}
            for i in range(rounds):
                for name, fn in (("new", new), ("old", previous)) if i % 2 == 0 else (("old", previous), ("new", new)):
                    start = time.perf_counter()
                    fn()
                    seconds[name].append(time.perf_counter() - start)
            ratios = [o / n for o, n in zip(seconds["old"], seconds["new"])]
            print(f"{work}: new {statistics.median(seconds['new']):.3f} s, old ({args.old}) "
                  f"{statistics.median(seconds['old']):.3f} s; old / new {statistics.median(ratios):.3f}x "
                  f"(rounds {min(ratios):.3f}-{max(ratios):.3f}, {rounds} rounds)", flush=True)


if __name__ == "__main__":
    main()
