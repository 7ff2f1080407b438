"""Size, FLOPs and speed of every model preset, as a Markdown table (results in docs/models.md).

    python benchmarks/model_table.py [--compile] [--threads 2] [--repeats 5] [--presets unet-mnist unet]

For each preset at its natural input size: parameters; FLOPs per image for a forward pass and for
forward + backward (torch.utils.flop_counter: matmuls, convolutions and attention; norms and
activations are not counted); the median time per batch of a forward pass (eval mode, no_grad: the
cost of one sampling step) and of forward + backward (train mode, dropout on: the cost of one
training step without the optimiser). With --compile, also whether torch.compile(fullgraph=True)
compiles and runs forward + backward, and how long compiling took (from cold: caches disabled).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
import warnings
from typing import NamedTuple

import torch
from torch.utils.flop_counter import FlopCounterMode

from ddpm.models import build_model


class Case(NamedTuple):
    preset: str
    overrides: dict  # config overrides that set the input size
    sample_shape: tuple[int, ...]  # one sample: (C, H, W) or (D,)
    batch: int


CASES = [
    Case("mlp-toy", {"channels": 3, "image_size": 16}, (3, 16, 16), 64),
    Case("mlp-2d", {}, (2,), 256),
    Case("unet-small", {}, (1, 28, 28), 64),
    Case("unet-mnist", {}, (1, 28, 28), 64),
    Case("unet", {}, (1, 28, 28), 16),
    Case("unet-cifar10", {}, (3, 32, 32), 8),
]


def inputs(case: Case) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(case.batch, *case.sample_shape, generator=g)
    t = torch.randint(0, 1000, (case.batch,), generator=g)
    return x, t


def forward_backward(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor) -> None:
    model.zero_grad(set_to_none=True)
    # The training loss of Algorithm 1 is this MSE against the noise; any scalar serves for timing.
    torch.nn.functional.mse_loss(model(x, t), x).backward()


def count_flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def median_seconds(fn, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def try_compile(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor) -> str:
    """'yes (N s)' if torch.compile(fullgraph=True) compiles and runs forward + backward, else the error."""
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    start = time.perf_counter()
    try:
        forward_backward(compiled, x, t)
    except Exception as error:  # noqa: BLE001 - any failure is the answer being reported
        return f"no: {type(error).__name__}: {str(error).splitlines()[0][:80]}"
    return f"yes ({time.perf_counter() - start:.0f} s)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compile", action="store_true", help="also check torch.compile(fullgraph=True)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs before timing (default 2)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs; the median is reported (default 5)")
    parser.add_argument("--presets", nargs="*", help="only these presets")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.compile:
        # Inductor caches compiled graphs on disk; without this a second run reports near-zero times.
        torch.compiler.config.force_disable_caches = True
        warnings.filterwarnings("ignore", message="dynamo_pgo force disabled")  # says just that, per model

    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, float32, CPU\n")
    header = ["preset", "input", "batch", "parameters", "GFLOP/img fwd", "GFLOP/img fwd+bwd",
              "fwd ms/batch", "fwd+bwd ms/batch"]
    if args.compile:
        header.append("compile(fullgraph)")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" if i < 2 else "---:" for i in range(len(header))) + "|")
    for case in CASES:
        if args.presets and case.preset not in args.presets:
            continue
        model = build_model(case.preset, seed=0, **case.overrides)
        x, t = inputs(case)
        params = sum(p.numel() for p in model.parameters())

        model.train()
        flops_train = count_flops(lambda: forward_backward(model, x, t))
        train_s = median_seconds(lambda: forward_backward(model, x, t), args.warmup, args.repeats)
        model.eval()
        with torch.no_grad():
            flops_fwd = count_flops(lambda: model(x, t))
            fwd_s = median_seconds(lambda: model(x, t), args.warmup, args.repeats)

        row = [
            f"`{case.preset}`", "x".join(map(str, case.sample_shape)), str(case.batch), f"{params:,}",
            f"{flops_fwd / case.batch / 1e9:.4f}", f"{flops_train / case.batch / 1e9:.4f}",
            f"{fwd_s * 1e3:.1f}", f"{train_s * 1e3:.1f}",
        ]
        if args.compile:
            model.train()
            row.append(try_compile(model, x, t))
        print("| " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
