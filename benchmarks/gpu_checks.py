"""What ddpm does only on a CUDA device, checked there (the CPU tests cannot): run by gpu_check.sh.

    python benchmarks/gpu_checks.py          # exits 1 if a check fails; prints one line per check

1. ``ddpm.sample`` with its CUDA-graph replay gives the numbers of the plain loop (DDPM with x0
   clipping, DDIM with eta 0 and 0.5) and leaves the generator where the plain loop leaves it.
2. A CUDA-graph walk is faster than the plain one (DDIM-50, the small U-Net, batch 16), and a model
   that cannot be recorded (it reads a value on the host) gets an error that says what to do.
3. A training step makes no host sync: ``ddpm.train`` of 6 and of 30 steps (logging, checkpoints
   and samples only at the end) make the same number of them, counted as the CPU test counts them
   and as torch.cuda.set_sync_debug_mode("warn") reports them (which sees pageable copies too).
4. ``ddpm train`` keeps the dataset on the GPU.
5. Every preset network, conditional and guided too, records as a graph with the plain walk's numbers,
   and ``ddpm sample`` of a conditional run trained on the GPU, whose default there is the graph,
   writes what ``--no-cuda-graph`` writes.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import ddpm
from ddpm.config import build_config
from ddpm.guidance import guided
from ddpm.models import use_channels_last
from ddpm.training import train

FAILED: list[str] = []


def check(name: str, ok: bool, detail: str) -> None:
    print(f"{'ok  ' if ok else 'FAIL'} {name}: {detail}", flush=True)
    if not ok:
        FAILED.append(name)


def small_unet(device: torch.device) -> torch.nn.Module:
    model = ddpm.models.build_model("unet-mnist", seed=0, attention_resolutions=(14,)).to(device).eval()
    with torch.no_grad():  # the last conv starts at zero: give every weight a value
        for p in model.parameters():
            p.normal_(0.0, 0.05)
    return use_channels_last(model)  # as ddpm.load gives it


def graph_gives_plain_numbers(device: torch.device) -> None:
    model = small_unet(device)
    schedule = ddpm.NoiseSchedule("linear", 1000).to(device)
    for options in (dict(sampler="ddpm", steps=50, clip_denoised=True), dict(sampler="ddim", steps=50),
                    dict(sampler="ddim", steps=50, eta=0.5)):
        out = {}
        for graph in (False, True):
            g = torch.Generator(device).manual_seed(0)
            seen = []
            x = ddpm.sample(model, schedule, (16, 1, 28, 28), generator=g, cuda_graph=graph,
                            callback=seen.append, **options)
            out[graph] = x, g.get_state(), seen
        diff = (out[True][0] - out[False][0]).abs().max().item()
        same_rng = torch.equal(out[True][1], out[False][1])
        # Every step's tensors the callback kept, although the graph's own are overwritten each step.
        steps_diff = max((getattr(a, name) - getattr(b, name)).abs().max().item()
                         for a, b in zip(out[True][2], out[False][2]) for name in ("x_t", "pred_x0", "x_prev"))
        check(f"graph = plain, {options}", diff <= 1e-5 and steps_diff <= 1e-5 and same_rng,
              f"max |difference| {diff:.3g}, over every step's callback tensors {steps_diff:.3g} "
              f"(allowed 1e-5), generator states equal: {same_rng}")
    # Sampling made once without a callback too: the walk's result alone.
    g = [torch.Generator(device).manual_seed(1) for _ in range(2)]
    a, b = (ddpm.sample(model, schedule, (16, 1, 28, 28), sampler="ddim", steps=50, generator=g[i], cuda_graph=flag)
            for i, flag in enumerate((False, True)))
    check("graph = plain, DDIM-50 without a callback", (a - b).abs().max().item() <= 1e-5,
          f"max |difference| {(a - b).abs().max().item():.3g}")


def graph_is_faster(device: torch.device) -> None:
    model = small_unet(device)
    schedule = ddpm.NoiseSchedule("linear", 1000).to(device)
    seconds = {}
    for graph in (False, True, False, True, False, True):
        torch.cuda.synchronize()
        start = time.perf_counter()
        ddpm.sample(model, schedule, (16, 1, 28, 28), sampler="ddim", steps=50, cuda_graph=graph,
                    generator=torch.Generator(device).manual_seed(0))
        torch.cuda.synchronize()
        seconds.setdefault(graph, []).append(time.perf_counter() - start)
    plain, graph = min(seconds[False]), min(seconds[True])
    check("graph is faster", graph < plain,
          f"DDIM-50, batch 16: {plain * 1e3:.1f} ms plain, {graph * 1e3:.1f} ms with the graph "
          f"({plain / graph:.2f}x; best of 3 each, the first including the capture)")


def uncapturable_model_gets_a_clear_error(device: torch.device) -> None:
    # A model that reads a value on the host cannot be recorded: the error must say what to do, and
    # the GPU must still work afterwards (the same walk without the graph).
    def model(x, t):
        return x * float(x.abs().max())  # .item(): a sync, not allowed while recording

    schedule = ddpm.NoiseSchedule("linear", 1000).to(device)
    try:
        ddpm.sample(model, schedule, (2, 1, 4, 4), sampler="ddim", steps=5, cuda_graph=True)
        message = "no error"
    except RuntimeError as error:
        message = str(error)
    after = ddpm.sample(model, schedule, (2, 1, 4, 4), sampler="ddim", steps=5, cuda_graph=False)
    # The syncing model is refused in the warm-up, before recording: graphs still work afterwards.
    torch.cuda.empty_cache()
    good = small_unet(device)
    plain, graphed = (ddpm.sample(good, schedule, (4, 1, 28, 28), sampler="ddim", steps=10, cuda_graph=flag,
                                  generator=torch.Generator(device).manual_seed(0)) for flag in (False, True))
    ok = "cuda_graph=False" in message and bool(after.isfinite().all()) and (plain - graphed).abs().max() <= 1e-5
    check("clear error for a model a graph cannot record", ok,
          f"message: {message[:160]!r}; afterwards the plain walk ran and a graph walk matched the plain one "
          f"to {(plain - graphed).abs().max().item():.3g}")


class HostSyncs(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


def tiny_config(steps: int):
    return build_config("square-fast", {
        "diffusion": {"num_steps": 50},
        "train": {"steps": steps, "log_every": steps, "checkpoint_every": steps, "sample_every": 0,
                  "eval_every": 0, "tensorboard": False, "device": "cuda"},
        "sample": {"steps": 5, "num_samples": 4}})


def training_makes_no_host_sync(root: Path) -> None:
    # Two counts: the operations that read a value (.item() and the like, as the CPU test counts
    # them), and every synchronizing call CUDA's sync-debug mode reports, copies from pageable
    # memory included. Neither may grow with the number of steps.
    counts, reported = {}, {}
    for steps in (6, 30):
        with HostSyncs() as syncs:
            train(tiny_config(steps), root / f"sync{steps}", progress=False, log=lambda m: None)
        counts[steps] = syncs.count
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                train(tiny_config(steps), root / f"debug{steps}", progress=False, log=lambda m: None)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        reported[steps] = [f"{Path(w.filename).name}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)]
    check("no host sync per step (value reads)", counts[6] == counts[30],
          f"{counts[6]} in a 6-step run, {counts[30]} in a 30-step run")
    check("no host sync per step (sync-debug mode)", len(reported[6]) == len(reported[30]),
          f"{len(reported[6])} in a 6-step run, {len(reported[30])} in a 30-step run; "
          f"from: {', '.join(sorted(set(reported[30]))) or 'nowhere'}")


def data_stays_on_the_gpu(root: Path) -> None:
    seen = []
    original = ddpm.training.draw_batch

    def spy(data, *args, **kwargs):
        seen.append(data.device.type)
        return original(data, *args, **kwargs)

    ddpm.training.draw_batch = spy
    try:
        train(tiny_config(3), root / "data", progress=False, log=lambda m: None)
    finally:
        ddpm.training.draw_batch = original
    check("dataset on the GPU", seen == ["cuda"] * 3, f"devices of the dataset each step: {seen}")


# Each preset at a size that records in a second; the U-Nets keep their own attention placement.
NETWORKS = {"unet-mnist": dict(), "unet-cifar10": dict(), "unet": dict(ch=32),
            "unet-small": dict(image_size=8), "mlp-toy": dict(image_size=8, hidden_dim=32), "mlp-2d": dict()}


def every_network_records(device: torch.device) -> None:
    schedule = ddpm.NoiseSchedule("linear", 1000).to(device)
    for preset, options in NETWORKS.items():
        for classes in (0, 3):
            model = ddpm.models.build_model(preset, seed=0, num_classes=classes, **options).to(device).eval()
            with torch.no_grad():
                for p in model.parameters():
                    p.normal_(0.0, 0.05)
            model = use_channels_last(model)
            config = model.config
            channels = getattr(config, "in_channels", getattr(config, "channels", None))
            shape = (4, 2) if preset == "mlp-2d" else (4, channels, config.image_size, config.image_size)
            labels = torch.tensor([0, 1, 2, 0], device=device)  # on the device, as Run.sample passes them
            net = model if not classes else guided(model, labels, 2.0, classes)
            plain, graphed = (ddpm.sample(net, schedule, shape, sampler="ddim", steps=5, cuda_graph=flag,
                                          generator=torch.Generator(device).manual_seed(0)) for flag in (False, True))
            diff = (plain - graphed).abs().max().item()
            name = preset + (", conditional, guidance 2" if classes else "")
            check(f"graph = plain, {name}", diff <= 1e-5, f"DDIM-5, max |difference| {diff:.3g}")


def cli_samples_a_conditional_run_with_the_graph(root: Path) -> None:
    import numpy as np

    images = np.zeros((24, 8, 8), dtype=np.uint8)
    images[:12, 2:6, 2:6] = 255  # squares, then crosses
    images[12:, 3:5, :] = images[12:, :, 3:5] = 255
    np.savez(root / "shapes.npz", data=images, labels=np.array(["square"] * 12 + ["cross"] * 12))
    ddpm_cli = [sys.executable, "-m", "ddpm"]
    subprocess.run([*ddpm_cli, "train", "--data", str(root / "shapes.npz"), "--conditional", "--out", str(root / "run"),
                    "--steps", "4", "--batch-size", "8", "--num-steps", "50", "--sample-steps", "3", "--num-samples",
                    "2", "--eval-every", "0", "--no-tensorboard", "--quiet", "--device", "cuda"], check=True)
    outputs = {}
    for flags in ((), ("--no-cuda-graph",)):
        out = root / f"samples{len(flags)}.npz"
        subprocess.run([*ddpm_cli, "sample", str(root / "run"), "--num", "6", "--class", "cross", "--guidance", "3",
                        "--steps", "10", "--out", str(out), "--quiet", "--device", "cuda", *flags], check=True)
        outputs[flags] = np.load(out)["arr_0"]
    same = np.array_equal(outputs[()], outputs[("--no-cuda-graph",)])
    check("ddpm sample, a conditional run on the GPU: graph (the default) = --no-cuda-graph", same,
          f"6 guided samples, uint8 arrays equal: {same}")


def main() -> int:
    if not torch.cuda.is_available():
        print("gpu_checks.py needs a CUDA device; this torch sees none", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    print(f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}", flush=True)
    graph_gives_plain_numbers(device)
    graph_is_faster(device)
    with tempfile.TemporaryDirectory() as root:
        training_makes_no_host_sync(Path(root))
        data_stays_on_the_gpu(Path(root))
    every_network_records(device)
    with tempfile.TemporaryDirectory() as root:
        cli_samples_a_conditional_run_with_the_graph(Path(root))
    uncapturable_model_gets_a_clear_error(device)  # last, in case a refused model leaves the GPU odd
    print(f"{len(FAILED)} check(s) failed" if FAILED else "all checks passed")
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
