"""ddpm against Hugging Face diffusers on the same work, side by side in one process (docs/performance.md).

    pip install -c constraints.txt -e '.[bench]'      # diffusers, for this script only
    python benchmarks/compare_diffusers.py [--threads 2] [--only mnist cifar sampling]
                                           [--precision fp32 bf16] [--allocator ddpm|default]
                                           [--device cpu|cuda] [--compile] [--train-batch N]
                                           [--json FILE] [--quick]

What is compared (each pair has the same parameter count; the script prints both FLOP counts):
  mnist     training steps of a small U-Net on 1x28x28, batch 64: diffusers' UNet2DModel with block
            channels (32, 64, 64), one layer per block, attention at 14x14 (1.1M parameters) against
            ddpm's `unet-mnist` with attention moved from 7x7 to 14x14 to match it;
  cifar     training steps of the paper's CIFAR-10 U-Net on 3x32x32, batch 32: diffusers' UNet2DModel
            with the google/ddpm-cifar10-32 config against ddpm's `unet-cifar10` (both 35.7M);
  sampling  the small U-Net, batch 16: DDIM with 50 steps (eta 0, diffusers' DDIMScheduler loop
            against ddpm.sample), and DDPM with 1000 steps, of which only the first --ddpm-steps are
            run and the time is extrapolated to 1000 (every step does the same work).

A training step is what each library's documentation writes: noise the clean batch at the drawn
timesteps (diffusers: scheduler.add_noise; ddpm: the loss `ddpm train` computes), forward, MSE against the
noise, backward, AdamW step, zero the gradients. Both sides get the same batches, timesteps and
noise, train mode (dropout 0.1 on both) and the same AdamW settings; bf16 puts forward and loss
under torch.autocast("cpu", torch.bfloat16) on both sides.

Timing: each side is warmed up, then the two alternate for --rounds rounds (A then B, then B then
A, ...), so that a change in the machine's load hits both alike; each round times one training step
or one whole sampling run per side. Reported: the median per side, the spread (min-max) and the
speed-up ddpm/diffusers = diffusers' median time / ddpm's (above 1: ddpm is faster).

FLOPs per training step come from torch.utils.flop_counter.FlopCounterMode on one step of each model
(convolutions, matmuls and attention; norms, activations and the optimiser are not counted). torch
2.13 has no formula for the CPU flash-attention kernel that diffusers' attention runs on, so this
script adds one (the one torch uses for the other attention kernels); without it diffusers' attention
would count as zero. The machine's peak is measured in the same run, in fp32 and in bf16, before and
after the comparison: the best of several large matrix products, each done two ways (torch.mm, which
runs in MKL, and a 1x1 convolution, which runs in oneDNN like the networks' convolutions); each
training step's achieved FLOP/s is shown as a fraction of the best of these in its precision.

ddpm's side is laid out and optimised as `ddpm train` does by default: channels-last U-Nets (except
in bf16 on a CPU), fused AdamW; diffusers' side as its training example does: default layout and
PyTorch's default AdamW. The process's malloc is set up as the `ddpm` command sets it
(ddpm.allocator.keep_freed_memory) unless --allocator default; either way both sides share it.

--device cuda runs the same comparison on a GPU, with larger training batches (128; the paper's for
CIFAR-10), ten steps per timed round, every timing between two torch.cuda.synchronize() calls, the
whole 1000-step DDPM walk (no extrapolation), and the peak from 8192x8192 products (fp32 as TF32,
the arithmetic cuDNN gives fp32 convolutions by default). There ddpm samples with its defaults (no
CUDA graph), and the sampling rows are also run with ddpm's opt-in cuda_graph=True to show what the
graph gives. --compile wraps both sides' networks in torch.compile for the training rows. With --json the
file is rewritten after every row ("complete": false until the end), so a stopped run keeps its rows.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

import ddpm
from ddpm.allocator import keep_freed_memory
from ddpm.config import build_config
from ddpm.diffusion import per_example_loss
from ddpm.models import build_model, use_channels_last
from ddpm.build import wants_channels_last
from ddpm.training import build_optimizer

# The small U-Net of the comparison (UNet2DModel keyword arguments). Besides what the issue fixes
# (block channels, one layer per block, attention at 14x14), the choices follow google/ddpm-cifar10-32:
# single-head attention, positional embedding without flip and with freq_shift 1, eps 1e-6. Eight
# GroupNorm groups as in ddpm's unet-mnist (groups change neither parameters nor FLOPs).
DIFFUSERS_MNIST = dict(
    sample_size=28, in_channels=1, out_channels=1, block_out_channels=(32, 64, 64), layers_per_block=1,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=None, norm_num_groups=8, norm_eps=1e-6, freq_shift=1, flip_sin_to_cos=False,
    downsample_padding=0, dropout=0.1, time_embedding_type="positional", act_fn="silu")
# ddpm's side: the unet-mnist preset (the same architecture and parameter count) with attention at
# 14x14 like the diffusers model above, instead of the preset's 7x7.
DDPM_MNIST = dict(attention_resolutions=(14,))

# google/ddpm-cifar10-32's UNet2DModel config (its config.json on the Hugging Face Hub), with the
# paper's dropout 0.1 (the Hub file says 0.0 since it holds weights for inference).
DIFFUSERS_CIFAR10 = dict(
    sample_size=32, in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 256), layers_per_block=2,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=None, norm_num_groups=32, norm_eps=1e-6, freq_shift=1, flip_sin_to_cos=False,
    downsample_padding=0, dropout=0.1, time_embedding_type="positional", act_fn="silu", mid_block_scale_factor=1)

NUM_STEPS = 1000  # T, both sides: linear betas 1e-4 .. 0.02
LR = 2e-4


class Settings(NamedTuple):
    mnist_batch: int
    cifar_batch: int
    sample_batch: int
    ddim_steps: int
    ddpm_steps: int  # steps of the 1000-step DDPM walk actually run
    warmup: int
    rounds: int
    sampling_rounds: int
    matmul_size: int
    steps_per_round: int = 1  # training steps timed together as one round


FULL = Settings(mnist_batch=64, cifar_batch=32, sample_batch=16, ddim_steps=50, ddpm_steps=100,
                warmup=2, rounds=7, sampling_rounds=3, matmul_size=2048)
QUICK = Settings(mnist_batch=8, cifar_batch=2, sample_batch=2, ddim_steps=5, ddpm_steps=5,
                 warmup=1, rounds=2, sampling_rounds=2, matmul_size=512)
# On a GPU a step takes milliseconds: bigger batches, more rounds, ten steps per timed round.
CUDA = Settings(mnist_batch=128, cifar_batch=128, sample_batch=16, ddim_steps=50, ddpm_steps=1000,
                warmup=3, rounds=11, sampling_rounds=5, matmul_size=8192, steps_per_round=10)


# --- FLOPs and the machine's peak ------------------------------------------------------------------

# The CPU flash-attention kernel (what F.scaled_dot_product_attention runs on a CPU when the last
# dimension of q, k, v is contiguous) has no formula in torch 2.13's flop counter; its shapes and
# arithmetic are those of the other fused attention kernels. (The counter passes shapes for tensors.)
def _flash_cpu_flops(query, key, value, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    return sdpa_flop_count(query, key, value)


def _flash_cpu_backward_flops(grad_out, query, key, value, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


_ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _flash_cpu_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _flash_cpu_backward_flops,
}


def count_flops(fn: Callable[[], Any]) -> int:
    with FlopCounterMode(display=False, custom_mapping=_ATTENTION_FLOPS) as counter:
        fn()
    return counter.get_total_flops()


def matmul_peak(n: int, dtype: torch.dtype, device: torch.device, repeats: int = 10) -> float:
    """FLOP/s of the fastest of ``repeats`` (n x n) @ (n x n) products in ``dtype``."""
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(n, n, generator=g).to(device, dtype) for _ in range(2))
    for _ in range(2):
        torch.mm(a, b)
    best = min(_seconds(lambda: torch.mm(a, b)) for _ in range(repeats))
    return 2 * n**3 / best


def conv_peak(n: int, dtype: torch.dtype, device: torch.device, repeats: int = 10) -> float:
    """FLOP/s of the fastest of ``repeats`` 1x1 convolutions from n to n channels over 8x32x32 positions:
    the same matrix product as torch.mm, but run by oneDNN, the library behind CPU convolutions
    (torch.mm runs in MKL, which on some CPUs, AMD's among them, does not reach the machine's peak)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, n, 32, 32, generator=g).to(device, dtype).contiguous(memory_format=torch.channels_last)
    w = torch.randn(n, n, 1, 1, generator=g).to(device, dtype).contiguous(memory_format=torch.channels_last)
    for _ in range(2):
        F.conv2d(x, w)
    best = min(_seconds(lambda: F.conv2d(x, w)) for _ in range(repeats))
    return 2 * 8 * 32 * 32 * n * n / best


def machine_peak(n: int, device: torch.device) -> dict[str, dict[str, float]]:
    """The best matmul FLOP/s per precision: {"fp32": {"mm": ..., "conv1x1": ...}, "bf16": {...}}.

    On CUDA "fp32" is measured with TF32 tensor cores allowed for both products: cuDNN runs fp32
    convolutions in TF32 by default, so that is the arithmetic fp32 training gets there."""
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = device.type == "cuda"
    try:
        return {p: {"mm": matmul_peak(n, d, device), "conv1x1": conv_peak(n // 2, d, device)}
                for p, d in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32


def _synchronize() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()  # a GPU's work is timed when it is done, not when it is queued


def _seconds(fn: Callable[[], Any]) -> float:
    _synchronize()
    start = time.perf_counter()
    fn()
    _synchronize()
    return time.perf_counter() - start


# --- the two sides ---------------------------------------------------------------------------------

def ddpm_unet(preset: str, precision: str = "fp32", device: torch.device = torch.device("cpu"),
              **overrides: Any) -> nn.Module:
    """ddpm's network laid out as `ddpm train` does by default for ``precision`` on ``device``
    (build.wants_channels_last: channels-last, except in bf16 on a CPU); `ddpm.load` samples
    channels-last."""
    model = build_model(preset, seed=0, **overrides).to(device)
    config = build_config("mnist", {"train": {"precision": precision}})
    return use_channels_last(model) if wants_channels_last(config, device) else model


def diffusers_unet(config: dict[str, Any], seed: int, device: torch.device = torch.device("cpu")) -> nn.Module:
    from diffusers import UNet2DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UNet2DModel(**config).to(device)


class Batch(NamedTuple):
    x0: Tensor  # (B, C, H, W) in [-1, 1]
    t: Tensor  # (B,) in 0..T-1
    noise: Tensor  # (B, C, H, W)


def batches(shape: tuple[int, ...], count: int, device: torch.device, seed: int = 0) -> list[Batch]:
    g = torch.Generator().manual_seed(seed)
    return [Batch(*(x.to(device) for x in (torch.rand(shape, generator=g) * 2 - 1,
                                          torch.randint(0, NUM_STEPS, (shape[0],), generator=g),
                                          torch.randn(shape, generator=g))))
            for _ in range(count)]


def ddpm_train_step(model: nn.Module, schedule: ddpm.NoiseSchedule, optimizer: torch.optim.Optimizer,
                    batch: Batch, autocast: torch.autocast) -> None:
    # As `ddpm train` does: the loss without training_loss's check of t's values, which would wait
    # for a GPU at every step (on a CPU the two are the same).
    with autocast:
        loss = per_example_loss(model, schedule, batch.x0, batch.t, batch.noise).mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def diffusers_train_step(model: nn.Module, scheduler: Any, optimizer: torch.optim.Optimizer,
                         batch: Batch, autocast: torch.autocast) -> None:
    # As in diffusers' unconditional training example.
    noisy = scheduler.add_noise(batch.x0, batch.noise, batch.t)
    with autocast:
        pred = model(noisy, batch.t, return_dict=False)[0]
        loss = F.mse_loss(pred.float(), batch.noise)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def ddpm_sampler(model: nn.Module, schedule: ddpm.NoiseSchedule, shape: tuple[int, ...], sampler: str,
                 steps: int, run_steps: int, cuda_graph: bool = False) -> Callable[[], None]:
    """One sampling run of ``steps`` steps, stopped after the first ``run_steps`` of them."""

    class Enough(Exception):
        pass

    def stop_early(step: ddpm.sampling.SamplerStep) -> None:
        if step.index + 1 == run_steps:
            raise Enough

    def run() -> None:
        g = torch.Generator(schedule.device).manual_seed(1)
        try:
            ddpm.sample(model, schedule, shape, sampler=sampler, steps=steps, generator=g, cuda_graph=cuda_graph,
                        clip_denoised=sampler == "ddpm", callback=stop_early if run_steps < steps else None)
        except Enough:
            pass
    return run


def diffusers_sampler(model: nn.Module, shape: tuple[int, ...], sampler: str, steps: int,
                      run_steps: int, device: torch.device = torch.device("cpu")) -> Callable[[], None]:
    """The loop of diffusers' DDPMPipeline / DDIMPipeline, over the first ``run_steps`` of ``steps``."""
    from diffusers import DDIMScheduler, DDPMScheduler

    if sampler == "ddim":
        scheduler = DDIMScheduler(num_train_timesteps=NUM_STEPS, beta_schedule="linear", clip_sample=False)
    else:
        scheduler = DDPMScheduler(num_train_timesteps=NUM_STEPS, beta_schedule="linear", clip_sample=True)

    @torch.no_grad()
    def run() -> None:
        g = torch.Generator(device).manual_seed(1)
        scheduler.set_timesteps(steps)
        x = torch.randn(shape, generator=g, device=device)
        for t in scheduler.timesteps[:run_steps]:
            eps = model(x, t).sample
            if sampler == "ddim":
                x = scheduler.step(eps, t, x, eta=0.0, generator=g).prev_sample
            else:
                x = scheduler.step(eps, t, x, generator=g).prev_sample
    return run


# --- timing ----------------------------------------------------------------------------------------

class Comparison(NamedTuple):
    ddpm_s: list[float]  # seconds per timed unit, one per round
    diffusers_s: list[float]

    @property
    def speedup(self) -> float:
        return statistics.median(self.diffusers_s) / statistics.median(self.ddpm_s)


def alternate(ours: Callable[[], Any], theirs: Callable[[], Any], warmup: int, rounds: int) -> Comparison:
    """Warm both up, then time them in alternating order: ours first in even rounds, theirs in odd."""
    for _ in range(warmup):
        ours()
        theirs()
    ours_s, theirs_s = [], []
    for i in range(rounds):
        if i % 2 == 0:
            ours_s.append(_seconds(ours))
            theirs_s.append(_seconds(theirs))
        else:
            theirs_s.append(_seconds(theirs))
            ours_s.append(_seconds(ours))
    return Comparison(ours_s, theirs_s)


# --- the comparisons -------------------------------------------------------------------------------

def training_steps(ours: nn.Module, theirs: nn.Module, shape: tuple[int, ...], precision: str,
                   device: torch.device = torch.device("cpu"), compile: bool = False,
                   steps: int = 1) -> tuple[Callable[[], None], Callable[[], None]]:
    """``steps`` training steps of each side per call, on the same batches, timesteps and noise;
    ``compile``: through torch.compile'd networks (the optimisers update the same parameters)."""
    from diffusers import DDPMScheduler

    schedule = ddpm.NoiseSchedule("linear", NUM_STEPS).to(device)
    scheduler = DDPMScheduler(num_train_timesteps=NUM_STEPS, beta_schedule="linear")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    ours.train()
    theirs.train()
    # Each side's optimiser as its training code builds it: ddpm's (fused AdamW by default) and
    # PyTorch's default AdamW in diffusers' examples; the same hyper-parameters on both sides.
    opt_ours = build_optimizer(ours, build_config("mnist", {"train": {"lr": LR, "weight_decay": 0.01}}))
    opt_theirs = torch.optim.AdamW(theirs.parameters(), lr=LR, weight_decay=0.01)
    data = batches(shape, 4, device)
    next_ours, next_theirs = (itertools.cycle(data) for _ in range(2))  # both sides see the same sequence
    net_ours, net_theirs = (torch.compile(ours), torch.compile(theirs)) if compile else (ours, theirs)

    def step_ours() -> None:
        for _ in range(steps):
            ddpm_train_step(net_ours, schedule, opt_ours, next(next_ours), autocast)

    def step_theirs() -> None:
        for _ in range(steps):
            diffusers_train_step(net_theirs, scheduler, opt_theirs, next(next_theirs), autocast)

    return step_ours, step_theirs


def compare_training(name: str, ours: nn.Module, theirs: nn.Module, shape: tuple[int, ...],
                     precision: str, settings: Settings, device: torch.device = torch.device("cpu"),
                     compile: bool = False) -> dict[str, Any]:
    k = settings.steps_per_round
    flops_ours, flops_theirs = (count_flops(step) for step in training_steps(ours, theirs, shape, precision, device))
    step_ours, step_theirs = training_steps(ours, theirs, shape, precision, device, compile, steps=k)
    result = alternate(step_ours, step_theirs, settings.warmup, settings.rounds)
    return {
        "work": f"train {name}", "precision": precision, "batch": shape[0], "unit": "images/s",
        "params_ddpm": _params(ours), "params_diffusers": _params(theirs),
        "flops_per_image_ddpm": flops_ours / shape[0], "flops_per_image_diffusers": flops_theirs / shape[0],
        "steps_per_round": k, "compile": compile, "seconds_ddpm": [s / k for s in result.ddpm_s],
        "seconds_diffusers": [s / k for s in result.diffusers_s], "speedup": result.speedup,
        **({"step_memory_mib": _step_memory(device, step_ours, step_theirs)} if device.type == "cuda" else {}),
    }


def _step_memory(device: torch.device, *steps: Callable[[], None]) -> list[float]:
    """The GPU memory each step allocates at its peak beyond what is resident before it (both sides'
    weights and optimiser states, which exist after the timed rounds), MiB."""
    extra = []
    for step in steps:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        resident = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        extra.append((torch.cuda.max_memory_allocated(device) - resident) / 2**20)
    return extra


def compare_sampling(sampler: str, steps: int, run_steps: int, ours: nn.Module, theirs: nn.Module,
                     shape: tuple[int, ...], settings: Settings,
                     device: torch.device = torch.device("cpu")) -> dict[str, Any]:
    ours.eval()
    theirs.eval()
    schedule = ddpm.NoiseSchedule("linear", NUM_STEPS).to(device)
    result = alternate(ddpm_sampler(ours, schedule, shape, sampler, steps, run_steps),
                       diffusers_sampler(theirs, shape, sampler, steps, run_steps, device),
                       1, settings.sampling_rounds)
    scale = steps / run_steps  # extrapolation from the steps run to the whole walk
    row = {
        "work": f"sample {sampler.upper()}-{steps}", "precision": "fp32", "batch": shape[0], "unit": "s/image",
        "steps_run": run_steps, "steps": steps,
        "seconds_ddpm": [s * scale for s in result.ddpm_s],
        "seconds_diffusers": [s * scale for s in result.diffusers_s], "speedup": result.speedup,
    }
    if device.type == "cuda" and run_steps == steps:
        # ddpm with its opt-in CUDA-graph replay against ddpm without it.
        graph = alternate(ddpm_sampler(ours, schedule, shape, sampler, steps, run_steps, cuda_graph=True),
                          ddpm_sampler(ours, schedule, shape, sampler, steps, run_steps, cuda_graph=False),
                          1, settings.sampling_rounds)
        row.update(seconds_ddpm_graph=graph.ddpm_s, seconds_ddpm_no_graph=graph.diffusers_s,
                   cuda_graph_speedup=graph.speedup)
    return row


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --- report ----------------------------------------------------------------------------------------

def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu in ("", platform.machine()):
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = line
                break
    except OSError:
        pass
    features = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f" {f}" in flags]
    return {"cpu": cpu, "features": features, "torch": torch.__version__, "threads": torch.get_num_threads()}


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def table(rows: list[dict[str, Any]], peak: dict[str, float]) -> str:
    lines = ["| work | precision | batch | ddpm | diffusers | speed-up ddpm/diffusers | GFLOP/img ddpm / diffusers "
             "| % of matmul peak ddpm / diffusers |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        med = {side: statistics.median(row[f"seconds_{side}"]) for side in ("ddpm", "diffusers")}
        if row["unit"] == "images/s":
            cells = {side: _rate(row["batch"], row[f"seconds_{side}"]) + " img/s" for side in med}
            flops = {side: row[f"flops_per_image_{side}"] for side in med}
            gflop = f"{flops['ddpm'] / 1e9:.3f} / {flops['diffusers'] / 1e9:.3f}"
            frac = " / ".join(f"{100 * flops[s] * row['batch'] / med[s] / peak[row['precision']]:.0f}%" for s in med)
        else:
            cells = {side: _per_image(row["batch"], row[f"seconds_{side}"]) + " s/img" for side in med}
            gflop = frac = ""
        lines.append(f"| {row['work']} | {row['precision']} | {row['batch']} | {cells['ddpm']} | "
                     f"{cells['diffusers']} | **{row['speedup']:.2f}x** | {gflop} | {frac} |")
    return "\n".join(lines)


def _rate(batch: int, seconds: list[float]) -> str:
    rates = sorted(batch / s for s in seconds)
    return f"{statistics.median(rates):.1f} ({rates[0]:.1f}-{rates[-1]:.1f})"


def _per_image(batch: int, seconds: list[float]) -> str:
    per = sorted(s / batch for s in seconds)
    return f"{statistics.median(per):.3f} ({per[0]:.3f}-{per[-1]:.3f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--only", nargs="+", choices=("mnist", "cifar", "sampling"),
                        default=["mnist", "cifar", "sampling"], help="which comparisons (default: all)")
    parser.add_argument("--precision", nargs="+", choices=("fp32", "bf16"), default=["fp32", "bf16"],
                        help="training precisions (default: both); sampling is fp32")
    parser.add_argument("--rounds", type=int, help="alternating timed rounds per training comparison (default 7)")
    parser.add_argument("--ddpm-steps", type=int, help="steps of the 1000-step DDPM walk to run (default 100; all on CUDA)")
    parser.add_argument("--allocator", choices=("ddpm", "default"), default="ddpm",
                        help="ddpm (default): glibc's malloc set up as the `ddpm` command does "
                             "(ddpm.allocator.keep_freed_memory), for both sides; default: as it comes")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where both sides run (default cpu); cuda: batch 128, 10 steps per round")
    parser.add_argument("--compile", action="store_true", help="torch.compile both networks for the training rows")
    parser.add_argument("--train-batch", type=int,
                        help="batch of both training comparisons (default 64 and 32 on a CPU, 128 on CUDA)")
    parser.add_argument("--json", type=Path, help="also write every measurement to this JSON file")
    parser.add_argument("--quick", action="store_true",
                        help="tiny batches and rounds: a smoke test of the script, not a measurement")
    args = parser.parse_args()
    try:
        import diffusers
    except ImportError:
        parser.exit(2, "compare_diffusers.py needs diffusers: pip install -c constraints.txt -e '.[bench]'\n")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.exit(2, "--device cuda: this torch sees no CUDA device\n")
    settings = QUICK if args.quick else CUDA if device.type == "cuda" else FULL
    if args.rounds is not None:
        settings = settings._replace(rounds=args.rounds)
    if args.ddpm_steps is not None:
        settings = settings._replace(ddpm_steps=args.ddpm_steps)
    if args.train_batch is not None:
        if args.train_batch < 1:
            parser.error(f"--train-batch {args.train_batch}: use a positive number of images")
        settings = settings._replace(mnist_batch=args.train_batch, cifar_batch=args.train_batch)
    torch.set_num_threads(args.threads)
    allocator = "keep_freed_memory" if args.allocator == "ddpm" and keep_freed_memory() else "default"
    info = {**machine(), "diffusers": diffusers.__version__, "settings": settings._asdict(),
            "allocator": allocator, "loadavg_before": load_average(), "device": args.device,
            "compile": args.compile}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    print(f"{info.get('gpu', info['cpu'])}: {info['cpu']} ({', '.join(info['features'])}), torch {info['torch']}, "
          f"diffusers {info['diffusers']}, {info['threads']} threads, malloc {allocator}"
          f"{', torch.compile' if args.compile else ''}; load average before: {info['loadavg_before']}"
          + ("; --quick: a smoke test, not a measurement" if args.quick else ""), flush=True)

    peaks_before = machine_peak(settings.matmul_size, device)
    rows = []
    mnist_shape = (1, 28, 28)

    def done(row: dict[str, Any]) -> None:
        rows.append(row)
        print(f"  done: {row['work']} {row['precision']}", flush=True)
        if args.json:  # the rows so far, in case the run is stopped before the end
            args.json.write_text(json.dumps({"machine": info, "results": rows, "complete": False}, indent=2) + "\n")

    if "mnist" in args.only:
        for precision in args.precision:
            done(compare_training(
                "unet-mnist (1.1M)", ddpm_unet("unet-mnist", precision, device, **DDPM_MNIST),
                diffusers_unet(DIFFUSERS_MNIST, 0, device), (settings.mnist_batch, *mnist_shape), precision,
                settings, device, args.compile))
    if "cifar" in args.only:
        for precision in args.precision:
            done(compare_training(
                "unet-cifar10 (35.7M)", ddpm_unet("unet-cifar10", precision, device),
                diffusers_unet(DIFFUSERS_CIFAR10, 0, device), (settings.cifar_batch, 3, 32, 32), precision,
                settings, device, args.compile))
    if "sampling" in args.only:
        ours = ddpm_unet("unet-mnist", device=device, **DDPM_MNIST)
        theirs = diffusers_unet(DIFFUSERS_MNIST, 0, device)
        shape = (settings.sample_batch, *mnist_shape)
        done(compare_sampling("ddim", settings.ddim_steps, settings.ddim_steps, ours, theirs, shape, settings, device))
        done(compare_sampling("ddpm", NUM_STEPS, settings.ddpm_steps, ours, theirs, shape, settings, device))
    peaks_after = machine_peak(settings.matmul_size, device)
    peak = {p: max(*peaks_before[p].values(), *peaks_after[p].values()) for p in peaks_before}
    info.update(loadavg_after=load_average(), matmul_peak_before=peaks_before, matmul_peak_after=peaks_after)

    print()
    print(table(rows, peak))
    print()
    n = settings.matmul_size
    print(f"Matmul peak (best of 10; torch.mm {n}x{n} / oneDNN 1x1 conv {n // 2} channels on 8x32x32), "
          "before, after: " + "; ".join(
              f"{p} " + ", ".join(f"{b['mm'] / 1e9:.0f} / {b['conv1x1'] / 1e9:.0f}"
                                  for b in (peaks_before[p], peaks_after[p]))
              + " GFLOP/s" for p in peak)
          + ". The % of peak column uses the best of these"
          + ("; on CUDA the fp32 figures are TF32's (cuDNN's default arithmetic for fp32 convolutions)"
             if device.type == "cuda" else "") + f". Load average after: {info['loadavg_after']}.")
    described = set()
    for row in rows:
        if row["work"] in described:
            continue
        described.add(row["work"])
        if "params_ddpm" in row:
            print(f"{row['work']}: parameters ddpm {row['params_ddpm']:,}, diffusers {row['params_diffusers']:,}; "
                  f"FLOPs per image per step ddpm/diffusers = "
                  f"{row['flops_per_image_ddpm'] / row['flops_per_image_diffusers']:.4f}")
        else:
            print(f"{row['work']}: {row['steps_run']} of {row['steps']} steps run, times scaled by "
                  f"{row['steps'] / row['steps_run']:g}")
        if "cuda_graph_speedup" in row:
            print(f"{row['work']}: ddpm with its CUDA-graph replay against without: {row['cuda_graph_speedup']:.2f}x "
                  f"({statistics.median(row['seconds_ddpm_no_graph']) * 1e3:.1f} -> "
                  f"{statistics.median(row['seconds_ddpm_graph']) * 1e3:.1f} ms per run)")
    for row in rows:
        if "step_memory_mib" in row:
            print(f"{row['work']} {row['precision']}: GPU memory a step needs beyond the resident weights and "
                  f"optimiser states: ddpm {row['step_memory_mib'][0]:.0f} MiB, "
                  f"diffusers {row['step_memory_mib'][1]:.0f} MiB")
    by_precision = {(row["work"], row["precision"]): row for row in rows if "params_ddpm" in row}
    for (work, precision), row in by_precision.items():
        fp32 = by_precision.get((work, "fp32"))
        if precision == "bf16" and fp32 is not None:
            # ddpm with bf16 autocast against diffusers as it trains by default (fp32).
            cross = statistics.median(fp32["seconds_diffusers"]) / statistics.median(row["seconds_ddpm"])
            print(f"{work}: ddpm bf16 against diffusers fp32: {cross:.2f}x")
    print("Cells: median (min-max) over the alternating rounds; speed-up = diffusers' median time / ddpm's.")
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "results": rows, "complete": True}, indent=2) + "\n")


if __name__ == "__main__":
    main()
