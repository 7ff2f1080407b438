"""Where the time of a training or sampling step goes, in ddpm and in diffusers, on the same work.

    pip install -c constraints.txt -e '.[bench]'
    python benchmarks/step_breakdown.py [--work mnist cifar ddim] [--precision fp32|bf16] [--steps 4]
                                        [--rounds 7] [--threads 2] [--json FILE]

For each work of benchmarks/compare_diffusers.py (the same models, batches, optimisers and
layouts), it runs a few steps of each side under torch.profiler and adds up each operator's own CPU
time by kind: convolutions, attention, other matrix products, normalisation, activations, random
numbers (dropout masks, noise), copies and concatenation, other element-wise work, the optimiser,
and the rest (autograd and Python between the operators). It prints milliseconds per step per kind
for both sides, and the step's wall time measured without the profiler.

The last line is a bound. Convolutions, attention and matrix products are kernels both libraries
share (oneDNN, PyTorch's flash attention, MKL); the calls one step makes to them are recorded with
their arguments and replayed back to back, with nothing in between, which times them without the
profiler's overhead. ddpm's replay set against diffusers' whole step is the largest speed-up any
change outside those kernels can give: everything else would have to cost nothing. A "step" of ddim
is one network evaluation and one DDIM update, batch 16.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

import compare_diffusers as cd  # sibling scripts: benchmarks/ is on sys.path
import ddpm
from ddpm.allocator import keep_freed_memory
from model_table import median_seconds

# (kind, substrings of a profiler event's name), first match wins. Events are aten operators and
# the few records autograd and the optimiser add; an operator's own time excludes its children.
KINDS = [
    ("convolution", ("conv",)),
    ("attention", ("scaled_dot_product", "flash_attention")),
    ("matrix products", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")),
    ("normalisation", ("group_norm", "layer_norm")),
    ("activations", ("silu", "sigmoid", "relu", "gelu")),
    ("random numbers", ("uniform_", "bernoulli", "normal_", "random_", "aten::rand")),
    ("copies and concatenation", ("copy_", "aten::cat", "contiguous", "clone")),
    ("optimiser", ("Optimizer.", "_fused_adam", "_foreach_")),
    ("other element-wise", ("aten::add", "aten::mul", "aten::div", "aten::sub", "aten::where", "aten::ge",
                            "aten::lt", "aten::sqrt", "aten::pow", "aten::sum", "aten::mean", "aten::neg",
                            "aten::fill_", "aten::zero_", "aten::clamp", "mse_loss", "aten::exp", "aten::cos",
                            "aten::sin", "upsample", "aten::gather", "aten::index")),
]
SHARED_KERNELS = ("convolution", "attention", "matrix products")


def kind_of(name: str) -> str:
    for kind, keys in KINDS:
        if any(key in name for key in keys):
            return kind
    return "rest"


def breakdown(step: Callable[[], None], steps: int) -> dict[str, float]:
    """Milliseconds of own CPU time per step, by kind, over ``steps`` profiled steps."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    ms = defaultdict(float)
    for event in prof.events():
        # Whatever runs inside optimizer.step() is the optimiser's, even plain element-wise kernels
        # (PyTorch's default AdamW on a CPU updates parameter by parameter with add_, mul_, lerp_, ...).
        kind = "optimiser" if _inside_optimizer_step(event) else kind_of(event.name)
        ms[kind] += event.self_cpu_time_total / 1e3 / steps
    return dict(ms)


def _inside_optimizer_step(event: Any) -> bool:
    while event is not None:
        if event.name.startswith("Optimizer.step"):
            return True
        event = event.cpu_parent
    return False


class _Recorder(TorchDispatchMode):
    """Keeps every call of a shared kernel (with its real arguments) made while it is active."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[Any, tuple, dict]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if kind_of(func.name()) in SHARED_KERNELS:
            self.calls.append((func, args, kwargs))
        return func(*args, **kwargs)


def shared_kernels_ms(step: Callable[[], None], repeats: int) -> float:
    """Wall time of one step's convolutions, attention and matrix products alone, in milliseconds.

    The calls of one step (forward and backward) are recorded with their arguments and replayed
    back to back, so nothing else runs between them; the median of ``repeats`` replays."""
    recorder = _Recorder()
    with recorder:
        step()
    with torch.no_grad():
        return 1e3 * median_seconds(lambda: [func(*args, **kwargs) for func, args, kwargs in recorder.calls],
                                    warmup=1, repeats=repeats)


def wall_ms(ours: Callable[[], None], theirs: Callable[[], None], rounds: int) -> tuple[float, float]:
    result = cd.alternate(ours, theirs, warmup=1, rounds=rounds)
    return 1e3 * statistics.median(result.ddpm_s), 1e3 * statistics.median(result.diffusers_s)


def training_steps(work: str, precision: str, settings: cd.Settings) -> tuple[Callable[[], None], Callable[[], None]]:
    """compare_diffusers.py's training steps of ``work`` (mnist or cifar) for both sides."""
    if work == "mnist":
        ours, theirs = cd.ddpm_unet("unet-mnist", precision, **cd.DDPM_MNIST), cd.diffusers_unet(cd.DIFFUSERS_MNIST, 0)
        shape = (settings.mnist_batch, 1, 28, 28)
    else:
        ours, theirs = cd.ddpm_unet("unet-cifar10", precision), cd.diffusers_unet(cd.DIFFUSERS_CIFAR10, 0)
        shape = (settings.cifar_batch, 3, 32, 32)
    return cd.training_steps(ours, theirs, shape, precision)


def sampling_steps(settings: cd.Settings, steps_per_run: int) -> tuple[Callable[[], None], Callable[[], None]]:
    """Runs of ``steps_per_run`` DDIM steps (of a 50-step walk), batch 16, on each side."""
    ours, theirs = cd.ddpm_unet("unet-mnist", **cd.DDPM_MNIST).eval(), cd.diffusers_unet(cd.DIFFUSERS_MNIST, 0).eval()
    shape = (settings.sample_batch, 1, 28, 28)
    schedule = ddpm.NoiseSchedule("linear", cd.NUM_STEPS)
    return (cd.ddpm_sampler(ours, schedule, shape, "ddim", settings.ddim_steps, steps_per_run),
            cd.diffusers_sampler(theirs, shape, "ddim", settings.ddim_steps, steps_per_run))


def report(work: str, ours: dict[str, float], theirs: dict[str, float], wall: tuple[float, float],
           shared: tuple[float, float]) -> dict:
    kinds = [kind for kind, _ in KINDS] + ["rest"]
    lines = [f"\n{work}: ms per step (own CPU time under the profiler)",
             "| kind | ddpm | diffusers |", "|---|---:|---:|"]
    for kind in kinds:
        lines.append(f"| {kind} | {ours.get(kind, 0.0):.1f} | {theirs.get(kind, 0.0):.1f} |")
    lines.append(f"| total under the profiler | {sum(ours.values()):.1f} | {sum(theirs.values()):.1f} |")
    lines.append(f"| wall time without the profiler | {wall[0]:.1f} | {wall[1]:.1f} |")
    lines.append(f"| wall time of the {', '.join(SHARED_KERNELS)} alone, replayed | "
                 f"{shared[0]:.1f} | {shared[1]:.1f} |")
    print("\n".join(lines))
    print(f"speed-up now {wall[1] / wall[0]:.2f}x; ddpm's {', '.join(SHARED_KERNELS)} alone take {shared[0]:.1f} ms, "
          f"so with all else free the speed-up would be at most {wall[1] / shared[0]:.2f}x")
    return {"work": work, "ddpm_ms": ours, "diffusers_ms": theirs, "wall_ms_ddpm": wall[0],
            "wall_ms_diffusers": wall[1], "shared_kernels_ms_ddpm": shared[0],
            "shared_kernels_ms_diffusers": shared[1], "bound": wall[1] / shared[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", nargs="+", choices=("mnist", "cifar", "ddim"), default=["mnist", "ddim"],
                        help="which steps to break down (default: mnist ddim)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                        help="of the training steps, as in compare_diffusers.py (default fp32); ddim is fp32")
    parser.add_argument("--steps", type=int, default=4, help="profiled steps per side (default 4)")
    parser.add_argument("--rounds", type=int, default=7, help="alternating rounds for the wall times (default 7)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--json", type=Path, help="also write the numbers to this JSON file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    keep_freed_memory()  # as `ddpm train` and compare_diffusers.py do; the same for both sides
    settings = cd.FULL
    rows = []
    for work in args.work:
        if work == "ddim":
            # One profiled run of `steps` DDIM steps; wall times of single-step runs would carry the
            # set-up of a run, so runs of 10 steps are timed and divided by 10.
            ours, theirs = sampling_steps(settings, args.steps)
            ours()  # warm-up outside the profile
            theirs()
            ms = [{k: v / args.steps for k, v in breakdown(side, 1).items()} for side in (ours, theirs)]
            ten = sampling_steps(settings, 10)
            wall = tuple(w / 10 for w in wall_ms(*ten, args.rounds))
            shared = tuple(shared_kernels_ms(side, args.rounds) / 10 for side in ten)
        else:
            ours, theirs = training_steps(work, args.precision, settings)
            for side in (ours, theirs):  # warm-up outside the profile
                side()
                side()
            ms = [breakdown(side, args.steps) for side in (ours, theirs)]
            wall = wall_ms(ours, theirs, args.rounds)
            shared = tuple(shared_kernels_ms(side, args.rounds) for side in (ours, theirs))
        name = work if work == "ddim" else f"{work} {args.precision}"
        rows.append(report(name, *ms, wall, shared))
    if args.json:
        args.json.write_text(json.dumps({"threads": args.threads, "torch": torch.__version__, "results": rows},
                                        indent=2) + "\n")


if __name__ == "__main__":
    main()
