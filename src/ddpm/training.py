"""The Algorithm-1 training loop: AdamW, warm-up, gradient clipping, EMA, precision, logging,
periodic samples and exact, crash-safe resume.

Everything random in a step comes from generators whose states are checkpointed: the data order
(a permutation and a cursor), the timesteps and noise (one generator on the training device) and
dropout (torch's global generator). A run resumed from a checkpoint therefore takes exactly the
steps an uninterrupted run would have taken. Every step draws the whole global batch's examples,
timesteps and noise, so the batch does not depend on how it is split into micro-batches or over
processes: under torchrun each process trains on its slice of the global batch (see distributed.py)
and N processes take the same steps as one.

    result = train(build_config("square"), "runs/square")
"""

from __future__ import annotations

import copy
import json
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ddpm import checkpoint as ckpt
from ddpm import distributed
from ddpm.config import Config, config_from_dict, config_to_dict
from ddpm.data import DATASETS, Dataset, host_to_device, load_dataset, random_hflip
from ddpm.diffusion import per_example_loss, sample_timesteps, training_loss
from ddpm.models import build_model, model_config_dict, preset_config, use_channels_last
from ddpm.models.mlp import ResidualMLPConfig
from ddpm.sampling import sample
from ddpm.schedule import NoiseSchedule
from ddpm.visualize import save_grid, scatter_png

__all__ = [
    "train", "TrainResult", "TrainingStopped", "Interrupted", "NonFiniteLoss", "ProcessGroupFailed", "RunDirError",
    "resolve_device", "build_schedule", "build_model_for", "build_optimizer", "wants_channels_last",
    "load_training_data", "DataOrder",
    "RESUMABLE_FIELDS",
]

FORMAT_VERSION = 1

# Fields a resumed run may change: they decide when to stop and what to write, not what is computed
# (grad_accum, like the number of processes, changes only the order in which gradients are added;
# data_dir says only where the data files are, e.g. on another machine).
RESUMABLE_FIELDS = {
    "train.steps", "train.log_every", "train.eval_every", "train.checkpoint_every", "train.keep_checkpoints",
    "train.sample_every", "train.tensorboard", "train.wandb", "train.device", "train.compile", "train.grad_accum",
    "train.channels_last", "train.fused_optimizer", "data.data_dir",
    "sample.sampler", "sample.sample_steps", "sample.eta", "sample.clip", "sample.num_samples",
}


class TrainingStopped(Exception):
    """Training ended early; ``exit_code`` is what the command line exits with."""

    exit_code = 1


class Interrupted(TrainingStopped):
    def __init__(self, signum: int, step: int, checkpoint: Path):
        name = signal.Signals(signum).name
        super().__init__(f"stopped by {name} at step {step}; checkpoint written to {checkpoint}; "
                         f"continue with: ddpm train --resume --out {checkpoint.parent.parent}")
        self.exit_code = 128 + signum


class NonFiniteLoss(TrainingStopped):
    def __init__(self, step: int, value: float, last_good: Path | None):
        kept = (f"the last good checkpoint {last_good} is intact" if last_good is not None
                else "no checkpoint had been written yet")
        super().__init__(f"training stopped: the loss became {value} at step {step}; {kept}; "
                         f"try a lower --lr or --grad-clip")


class ProcessGroupFailed(TrainingStopped):
    """A collective failed: another process died or hung, or the network broke."""

    def __init__(self, step: int, rank: int, error: BaseException, last_checkpoint: Path | None):
        first_line = distributed.describe(error)
        kept = (f"the last checkpoint is {last_checkpoint}; continue with: ddpm train --resume --out "
                f"{last_checkpoint.parent.parent}" if last_checkpoint is not None
                else "no checkpoint had been written yet")
        super().__init__(f"process group failed at step {step} on rank {rank} (a process died?): {first_line}; {kept}")


class RunDirError(ValueError):
    """The run directory cannot be used as asked (one line for the user)."""


@dataclass(frozen=True)
class TrainResult:
    run_dir: Path
    step: int  # optimiser steps done
    checkpoint: Path  # the final checkpoint
    loss: float  # mean training loss over the last logging window
    seconds: float  # wall time of this invocation


# --- building the pieces --------------------------------------------------------------------------

def resolve_device(name: str, world: distributed.World = distributed.SINGLE, *,
                   setting: str = "train.device") -> torch.device:
    """The device ``name`` (given as ``setting``, which errors name) stands for; under torchrun "auto"
    and "cuda" mean this process's GPU."""
    if world.active and name in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda", world.local_rank)  # one GPU per process
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"{_given(setting, name)} is not a device; use cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{_given(setting, name)}, but CUDA is not available here; use cpu or auto")
    return device


def _given(setting: str, value: str) -> str:
    return f"{setting} {value}" if setting.startswith("--") else f"{setting} = {value!r}"


def build_schedule(config: Config) -> NoiseSchedule:
    d = config.diffusion
    return NoiseSchedule(d.schedule, d.num_steps, beta_start=d.beta_start, beta_end=d.beta_end)


def build_model_for(config: Config, dataset_kind: str, sample_shape: tuple[int, ...], *,
                    seed: int | None = None) -> nn.Module:
    """The network of ``config.model`` sized for the data (channels, image size) and for T."""
    preset = config.model.preset
    base = preset_config(preset)
    fields = set(vars(base))
    takes_points = isinstance(base, ResidualMLPConfig)
    if takes_points != (dataset_kind == "points"):
        wanted = "points (B, D): use --model mlp-2d" if dataset_kind == "points" else "images: use a U-Net or mlp-toy"
        raise ValueError(f"model {preset!r} takes {'points' if takes_points else 'images'}, "
                         f"but the data {config.data.source!r} is {wanted}")
    fill: dict[str, Any] = {}
    if takes_points:
        fill["data_dim"] = sample_shape[0]
    else:
        channels, height, width = sample_shape
        if height != width:
            raise ValueError(f"the images are {height}x{width}; the models take square images: "
                             f"set --image-size to resize and centre-crop them")
        fill["in_channels" if "in_channels" in fields else "channels"] = channels
        fill["image_size"] = height
    if "num_steps" in fields:
        fill["num_steps"] = config.diffusion.num_steps
    overrides = dict(config.model.overrides)
    for key, value in fill.items():
        if key in overrides and overrides[key] != value:
            raise ValueError(f"model.overrides sets {key} = {overrides[key]!r}, but the data and schedule "
                             f"need {key} = {value!r}")
    if config.model.dropout is not None:
        if "dropout" not in fields:
            raise ValueError(f"model {preset!r} has no dropout; leave --dropout unset")
        fill["dropout"] = config.model.dropout
    return build_model(preset, seed=seed, **{**overrides, **fill})


def load_training_data(config: Config) -> tuple[Dataset, Tensor | None, list[str]]:
    """The training set, a held-out set (or None) and notes for the user.

    Built-in sets (MNIST and CIFAR-10 by name included) hold out from their test split; a path (a
    folder, an array file, MNIST files given by path) holds out a random tenth (at most
    ``data.heldout`` examples) of its own examples.
    """
    d = config.data
    common = dict(image_size=d.image_size, channels=d.channels, seed=config.train.seed, data_dir=d.data_dir)
    dataset = load_dataset(d.source, n=d.num_examples, **common)
    notes = list(dataset.notes)
    if len(dataset) == 0:
        raise ValueError(f"the data {d.source!r} holds no examples")
    if d.hflip and dataset.kind != "image":
        raise ValueError("data.hflip flips images; the data is points")
    if d.heldout == 0:
        return dataset, None, notes
    if d.source in DATASETS:  # every built-in set has a test split
        heldout = load_dataset(d.source, n=d.heldout, split="test", **common).data
        return dataset, heldout, notes
    count = min(d.heldout, len(dataset) // 10)
    if count == 0:
        notes.append(f"{len(dataset)} examples are too few to hold any out; no held-out loss")
        return dataset, None, notes
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(config.train.seed))
    keep, out = order[count:].sort().values, order[:count].sort().values
    labels = dataset.labels[keep] if dataset.labels is not None else None
    train_set = Dataset(dataset.data[keep], dataset.kind, dataset.name, labels, dataset.notes, dataset.skipped)
    return train_set, dataset.data[out], notes


class DataOrder:
    """Epochs of random permutations of N examples, read off in order: exactly resumable.

    The state is the current permutation, the cursor into it and the generator that draws the next.
    """

    def __init__(self, num_examples: int, seed: int):
        self.num_examples = num_examples
        self.generator = torch.Generator().manual_seed(seed)
        self.perm = torch.randperm(num_examples, generator=self.generator)
        self.cursor = 0
        self.epoch = 0

    def next(self, count: int) -> Tensor:
        """The next ``count`` example indices (crossing into new epochs as needed)."""
        parts, needed = [], count
        while needed:
            if self.cursor == self.num_examples:
                self.perm = torch.randperm(self.num_examples, generator=self.generator)
                self.cursor, self.epoch = 0, self.epoch + 1
            take = min(needed, self.num_examples - self.cursor)
            parts.append(self.perm[self.cursor:self.cursor + take])
            self.cursor += take
            needed -= take
        return torch.cat(parts)

    def state(self) -> tuple[dict[str, Tensor], dict[str, int]]:
        return ({"data.perm": self.perm, "rng.data": self.generator.get_state()},
                {"data_cursor": self.cursor, "data_epoch": self.epoch})

    def load_state(self, tensors: dict[str, Tensor], state: dict[str, Any]) -> None:
        if tensors["data.perm"].numel() != self.num_examples:
            raise ckpt.CheckpointError(f"the checkpoint's data order covers {tensors['data.perm'].numel()} examples, "
                                       f"the data now has {self.num_examples}; resume with the same data")
        self.perm = tensors["data.perm"].clone()
        self.generator.set_state(tensors["rng.data"])
        self.cursor, self.epoch = int(state["data_cursor"]), int(state["data_epoch"])


def wants_channels_last(config: Config, device: torch.device) -> bool:
    """Whether training lays the U-Nets out channels-last: ``train.channels_last``, except for bf16 on
    a CPU, where torch 2.13's channels-last GroupNorm in bf16 is about 10x slower than the default
    layout's and outweighs the faster convolutions (docs/performance.md)."""
    return config.train.channels_last and not (device.type == "cpu" and config.train.precision == "bf16")


def build_optimizer(model: nn.Module, config: Config) -> torch.optim.AdamW:
    """AdamW over ``model``'s parameters; with ``train.fused_optimizer`` its fused kernel, which
    updates every parameter in one pass instead of a dozen element-wise passes per tensor."""
    t_cfg = config.train
    return torch.optim.AdamW(model.parameters(), lr=t_cfg.lr, weight_decay=t_cfg.weight_decay,
                             fused=True if t_cfg.fused_optimizer else None)


# --- the run directory ----------------------------------------------------------------------------

def prepare_run_dir(run_dir: Path, *, resume: bool, overwrite: bool) -> bool:
    """Check the run directory may be used; returns True when an existing run is to be resumed.

    With ``overwrite`` an existing run is only checked here: it is deleted when the new run's first
    file is written (``_start_run_dir``), so a setting or data that fails on the way loses nothing."""
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"--out {run_dir} is a file; give a directory")
    occupied = run_dir.is_dir() and any(run_dir.iterdir())
    if resume:
        if occupied and not (run_dir / "config.json").is_file():
            raise RunDirError(f"--resume: {run_dir} is not a ddpm run directory (no config.json); nothing to resume")
        return occupied
    if not occupied:
        return False
    if not overwrite:
        raise RunDirError(f"{run_dir} is not empty; add --resume to continue that run, --overwrite to replace "
                          f"it, or choose another --out")
    if not (run_dir / "config.json").is_file():
        raise RunDirError(f"--overwrite replaces only a ddpm run directory (one with config.json); {run_dir} "
                          f"is not one, so nothing was deleted")
    return False


def _start_run_dir(run_dir: Path, metadata: dict[str, Any], *, overwrite: bool) -> None:
    """Write a new run's config.json, replacing the run prepare_run_dir let ``overwrite`` replace."""
    if overwrite and (run_dir / "config.json").is_file():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt.write_json(run_dir / "config.json", metadata)


def run_metadata(config: Config, model: nn.Module, dataset: Dataset) -> dict[str, Any]:
    """What config.json holds: the config and what was resolved from it (architecture, data shape)."""
    return {"format_version": FORMAT_VERSION, "config": config_to_dict(config), "model": model_config_dict(model),
            "data": {"kind": dataset.kind, "sample_shape": list(dataset.sample_shape), "name": dataset.name}}


def check_resume_config(saved: Config, asked: Config, changed: set[str]) -> Config:
    """The saved config with the allowed changes of ``asked`` applied; other changes are an error.

    changed: the fields the user set ("train.steps", ...), and "preset" when a preset was named."""
    saved_dict, asked_dict = config_to_dict(saved), config_to_dict(asked)
    if "preset" in changed and saved.preset != asked.preset:
        raise RunDirError(f"cannot change the preset when resuming (the run was trained with preset "
                          f"{saved.preset!r}); leave --preset out to continue it")
    for name in sorted(changed - {"preset"}):
        section, key = name.split(".")
        if saved_dict[section][key] != asked_dict[section][key] and name not in RESUMABLE_FIELDS:
            raise RunDirError(f"cannot change {name} when resuming (the run has {saved_dict[section][key]!r}); "
                              f"resumable changes: {', '.join(sorted(RESUMABLE_FIELDS))}")
        saved_dict[section][key] = asked_dict[section][key]
    return config_from_dict(saved_dict)


# --- logging --------------------------------------------------------------------------------------

class Metrics:
    """metrics.jsonl, plus TensorBoard and wandb when asked for and installed."""

    def __init__(self, run_dir: Path, config: Config, resume_step: int, notes: list[str]):
        self.path = run_dir / "metrics.jsonl"
        resumed = self.path.exists()  # a new run's directory has none
        if resumed:
            # Drop what a killed run logged after its last checkpoint (all of it if it had none yet):
            # those steps are redone.
            kept = [line for line in self.path.read_text(encoding="utf-8").splitlines()
                    if line.strip() and _line_step(line) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        self.file = open(self.path, "a", encoding="utf-8")
        self.tensorboard = None
        self.wandb = None
        if config.train.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tensorboard = SummaryWriter(str(run_dir / "tensorboard"),
                                                 purge_step=resume_step if resumed else None)
            except ImportError:
                notes.append("TensorBoard logging skipped: the tensorboard package is not installed "
                             "(pip install tensorboard); metrics are in metrics.jsonl")
        if config.train.wandb:
            try:
                import wandb
            except ImportError:
                raise ValueError("--wandb needs the wandb package: pip install wandb") from None
            self.wandb = wandb.init(project="ddpm", name=run_dir.name, dir=str(run_dir),
                                    config=config_to_dict(config), resume="allow")

    def log(self, step: int, values: dict[str, float]) -> None:
        record = {"step": step, **{k: round(v, 7) if isinstance(v, float) else v for k, v in values.items()}}
        self.file.write(json.dumps(ckpt.strict_json(record), allow_nan=False) + "\n")
        self.file.flush()
        if self.tensorboard is not None:
            for key, value in values.items():
                self.tensorboard.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def close(self) -> None:
        self.file.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()


def _line_step(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (json.JSONDecodeError, AttributeError, TypeError, ValueError):
        return 0


class _StopSignals:
    """Turns SIGINT/SIGTERM into a flag the loop checks after each step (main thread only)."""

    def __init__(self, world: distributed.World = distributed.SINGLE) -> None:
        self.world = world
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "_StopSignals":
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = signum

    def __exit__(self, exc_type: Any, error: BaseException | None, traceback: Any) -> None:
        # When a collective failed, the launcher (torchrun) is already stopping the other processes with
        # SIGTERM. Restoring the default handler would let that signal kill this process before it has
        # reported the failure in one line, so from here on the signals are ignored: the process exits by
        # itself right after its report (and torchrun kills it anyway if it ever hung).
        ending = error is not None and self.world.active and distributed.is_failure(error)
        for signum, handler in self._previous.items():
            signal.signal(signum, signal.SIG_IGN if ending else handler)


# --- one step -------------------------------------------------------------------------------------

def learning_rate(config: Config, step: int) -> float:
    """Linear warm-up from 0 to lr over ``warmup`` steps, then constant (as the paper)."""
    warmup = config.train.warmup
    return config.train.lr * min(1.0, (step + 1) / warmup) if warmup else config.train.lr


def ema_decay(config: Config, updates: int) -> float:
    decay = config.train.ema_decay
    return min(decay, (1 + updates) / (10 + updates)) if config.train.ema_warmup else decay


@torch.no_grad()
def update_ema(ema_model: nn.Module, model: nn.Module, decay: float) -> None:
    ema_params = list(ema_model.parameters())
    torch._foreach_lerp_(ema_params, [p.detach() for p in model.parameters()], 1.0 - decay)
    for ema_buffer, buffer in zip(ema_model.buffers(), model.buffers()):
        ema_buffer.copy_(buffer)


def draw_batch(data: Tensor, order: DataOrder, noise_generator: torch.Generator, schedule: NoiseSchedule,
               batch_size: int, hflip: bool) -> tuple[Tensor, Tensor, Tensor]:
    """The global batch: examples x0, timesteps t ~ U{0..T-1} (Algorithm 1, line 3) and noise eps."""
    indices = host_to_device(order.next(batch_size), data.device)
    x0 = data.index_select(0, indices)
    if hflip:
        x0 = random_hflip(x0, order.generator)
    device = noise_generator.device
    t = sample_timesteps(schedule, batch_size, device=device, generator=noise_generator)
    noise = torch.randn(x0.shape, generator=noise_generator, device=device)
    return x0.to(device), t, noise


# --- the loop -------------------------------------------------------------------------------------

def train(config: Config, run_dir: str | Path, *, resume: bool = False, overwrite: bool = False,
          changed: set[str] | None = None, progress: bool = True,
          log: Callable[[str], None] = lambda message: print(message, file=sys.stderr)) -> TrainResult:
    """Train ``config`` into ``run_dir`` (Algorithm 1); with ``resume`` continue its latest checkpoint.

    changed: the config fields the user set explicitly; on resume only ``RESUMABLE_FIELDS`` may differ
    from the saved run. Raises Interrupted on SIGINT/SIGTERM (after writing a checkpoint),
    NonFiniteLoss on a nan/inf loss (writing nothing), ValueError for unusable settings. Under torchrun
    every process calls this; rank 0 alone writes, and ProcessGroupFailed says when another process died.
    """
    world = distributed.World.from_env()
    device = resolve_device(config.train.device, world)
    with distributed.process_group(world, device):  # none for a single process
        return _train(config, Path(run_dir), world, device, resume=resume, overwrite=overwrite,
                      changed=changed, progress=progress and world.is_main,
                      log=log if world.is_main else lambda message: None)


class _Setup(NamedTuple):
    """What a run trains with, built (or restored from its latest checkpoint) before the first step."""

    config: Config  # the saved run's when resuming
    dataset: Dataset
    heldout: Tensor | None
    data: Tensor  # dataset.data on the training device
    schedule: NoiseSchedule
    model: nn.Module
    ema_model: nn.Module
    optimizer: torch.optim.AdamW
    order: DataOrder
    noise_generator: torch.Generator
    metadata: dict[str, Any]  # config.json
    step: int  # steps already taken
    checkpoint: Path | None  # the one restored
    notes: list[str]  # for the user, once everything is set up


def _set_up(config: Config, run_dir: Path, world: distributed.World, device: torch.device, *, resume: bool,
            overwrite: bool, changed: set[str] | None) -> _Setup:
    _check_shares(config, world)
    resuming = world.on_main(lambda: prepare_run_dir(run_dir, resume=resume, overwrite=overwrite), device)
    checkpoint = None
    notes: list[str] = []  # shown once everything is set up, so a failing setup prints one line only
    if resuming:
        saved = ckpt.read_json(run_dir / "config.json", "the run's config.json")
        config = check_resume_config(config_from_dict(saved["config"], where=str(run_dir / "config.json")),
                                     config, changed or set())
        checkpoint = ckpt.latest_checkpoint(run_dir)
        _check_shares(config, world)
    elif resume:
        notes.append(f"nothing to resume in {run_dir}: starting a new run")

    # Each machine's first process loads (and downloads) the data before the others: one download per machine.
    dataset, heldout, data_notes = world.machine_first(lambda: load_training_data(config), device)
    notes += data_notes
    t_cfg = config.train
    model = build_model_for(config, dataset.kind, dataset.sample_shape, seed=t_cfg.seed).to(device)
    if wants_channels_last(config, device):
        use_channels_last(model)
    ema_model = copy.deepcopy(model).eval().requires_grad_(False)
    optimizer = build_optimizer(model, config)
    order = DataOrder(len(dataset), t_cfg.seed)
    noise_generator = torch.Generator(device).manual_seed(t_cfg.seed + 1)
    torch.manual_seed(t_cfg.seed + 2)  # dropout
    metadata = run_metadata(config, model, dataset)
    step = 0
    if checkpoint is not None:
        step = _restore(checkpoint, model, ema_model, optimizer, order, noise_generator, device)
        notes.append(f"resuming {run_dir} from {checkpoint.name}")
    if step > t_cfg.steps:
        raise RunDirError(f"the run is already at step {step}, past train.steps = {t_cfg.steps}; "
                          f"give a larger --steps to train longer")
    if world.active:
        notes.append(f"{world.size} processes, {t_cfg.batch_size // world.size} examples each per step "
                     f"(global batch {t_cfg.batch_size})")
    if not resuming and world.is_main:
        _start_run_dir(run_dir, metadata, overwrite=overwrite)
    return _Setup(config, dataset, heldout, dataset.data.to(device), build_schedule(config).to(device), model,
                  ema_model, optimizer, order, noise_generator, metadata, step, checkpoint, notes)


def _train(config: Config, run_dir: Path, world: distributed.World, device: torch.device, *, resume: bool,
           overwrite: bool, changed: set[str] | None, progress: bool, log: Callable[[str], None]) -> TrainResult:
    started = time.perf_counter()
    run = _set_up(config, run_dir, world, device, resume=resume, overwrite=overwrite, changed=changed)
    config, t_cfg, step, last_checkpoint = run.config, run.config.train, run.step, run.checkpoint
    metrics = Metrics(run_dir, config, step, run.notes) if world.is_main else _NoMetrics()
    for note in run.notes:
        log(note)
    shared_model = world.wrap(run.model, device)  # sums gradients over the processes in backward
    train_model = torch.compile(shared_model) if t_cfg.compile else shared_model
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=t_cfg.precision == "bf16")
    window = _Window(device)
    bar = tqdm(total=t_cfg.steps, initial=step, desc="training", unit="step", disable=not progress,
               dynamic_ncols=True, file=sys.stderr)

    def due(every: int) -> bool:
        return (every > 0 and step % every == 0) or step == t_cfg.steps

    def save() -> Path:
        window.raise_if_non_finite(last_checkpoint)  # a checkpoint never holds weights a bad step made
        if world.is_main:
            tensors, state = _training_state(run.optimizer, run.order, run.noise_generator)
            ckpt.save_checkpoint(run_dir, step, model=run.model, ema_model=run.ema_model, tensors=tensors,
                                 state={**state, "step": step}, config=run.metadata, keep=t_cfg.keep_checkpoints)
        world.barrier()  # no process leaves (or is stopped by torchrun) while rank 0 is writing
        return run_dir / "checkpoints" / ckpt.checkpoint_name(step)

    try:
        with _StopSignals(world) as stop:
            run.model.train()
            while step < t_cfg.steps:
                losses, t, grad_norm = _step(run, step, shared_model, train_model, autocast, world)
                step += 1
                # No host sync in a step: the loss stays on the device and is checked for nan/inf
                # before anything is logged, sampled or saved.
                window.add(step, losses, t, run.schedule.num_steps, grad_norm, t_cfg.batch_size, world)
                bar.update(1)

                if due(t_cfg.log_every):
                    window.raise_if_non_finite(last_checkpoint)
                    values = window.flush(t_cfg.batch_size, world)
                    bar.set_postfix(loss=f"{values['loss']:.4f}", refresh=False)
                    values["lr"] = run.optimizer.param_groups[0]["lr"]
                    if t_cfg.eval_every and run.heldout is not None and due(t_cfg.eval_every):
                        values.update(heldout_losses(run.model, run.ema_model, run.schedule, run.heldout, config))
                        run.model.train()
                    metrics.log(step, values)
                if due(t_cfg.checkpoint_every):
                    last_checkpoint = save()
                if due(t_cfg.sample_every):
                    window.raise_if_non_finite(last_checkpoint)  # on every process, as they all know the loss
                    if world.is_main:
                        save_samples(run.ema_model, run.schedule, config, run.dataset,
                                     run_dir / "samples" / f"{ckpt.checkpoint_name(step)}.png")
                stop_signal = world.agree_signal(stop.received)  # every process stops at the same step
                if stop_signal is not None:
                    if last_checkpoint is None or last_checkpoint.name != ckpt.checkpoint_name(step):
                        last_checkpoint = save()
                    raise Interrupted(stop_signal, step, last_checkpoint)
            if last_checkpoint is None or last_checkpoint.name != ckpt.checkpoint_name(step):
                last_checkpoint = save()  # e.g. resuming a run that was already complete
    except Exception as error:
        if world.active and distributed.is_failure(error):
            raise ProcessGroupFailed(step, world.rank, error, last_checkpoint) from None
        raise
    finally:
        bar.close()
        metrics.close()
    return TrainResult(run_dir, step, last_checkpoint, window.last_loss, time.perf_counter() - started)


def _step(run: _Setup, step: int, shared_model: nn.Module, train_model: nn.Module, autocast: torch.autocast,
          world: distributed.World) -> tuple[Tensor, Tensor, Tensor | None]:
    """Training step ``step`` (Algorithm 1) on this process's slice of the global batch, in
    train.grad_accum micro-batches, then the EMA update. Returns the slice's per-example losses
    (detached), its timesteps, and the gradient norm before clipping (None without train.grad_clip)."""
    config, t_cfg = run.config, run.config.train
    x0, t, noise = draw_batch(run.data, run.order, run.noise_generator, run.schedule, t_cfg.batch_size,
                              config.data.hflip)
    mine = world.share(t_cfg.batch_size)  # every process drew the global batch; it trains on its slice
    x0, t, noise = x0[mine], t[mine], noise[mine]
    for param_group in run.optimizer.param_groups:
        param_group["lr"] = learning_rate(config, step)
    micro = t_cfg.batch_size // (world.size * t_cfg.grad_accum)
    per_example = []
    for i in range(t_cfg.grad_accum):
        part = slice(i * micro, (i + 1) * micro)
        with autocast, world.accumulating(shared_model, last=i == t_cfg.grad_accum - 1):
            losses = per_example_loss(train_model, run.schedule, x0[part], t[part], noise[part],
                                      prediction=config.diffusion.prediction, weighting=loss_weighting(config))
            # The processes' gradients are averaged: scaling by their number makes it the global sum.
            (losses.sum() * world.size / t_cfg.batch_size).backward()
        per_example.append(losses.detach())
    grad_norm = (nn.utils.clip_grad_norm_(run.model.parameters(), t_cfg.grad_clip)
                 if t_cfg.grad_clip is not None else None)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    update_ema(run.ema_model, run.model, ema_decay(config, step))
    return torch.cat(per_example), t, grad_norm


def _check_shares(config: Config, world: distributed.World) -> None:
    t_cfg = config.train
    if t_cfg.batch_size % (world.size * t_cfg.grad_accum):
        raise ValueError(f"train.batch_size = {t_cfg.batch_size} (the global batch) must be divisible by the number "
                         f"of processes times train.grad_accum = {world.size} x {t_cfg.grad_accum}")


class _NoMetrics:
    """What processes other than rank 0 log to: nothing."""

    def log(self, step: int, values: dict[str, float]) -> None:
        pass

    def close(self) -> None:
        pass


class _Window:
    """Sums over a logging window and the run's first non-finite loss, kept on the device so that a
    training step needs no host sync; ``raise_if_non_finite`` and ``flush`` read them (one sync each)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.last_loss = float("nan")
        self.bad_step = torch.zeros((), dtype=torch.long, device=device)  # 0: every loss so far was finite
        self.bad_loss = torch.zeros((), device=device)
        self._reset()
        self._clock = time.perf_counter()

    def _reset(self) -> None:
        self.loss_sum = torch.zeros((), device=self.device)
        self.quarter_sum = torch.zeros(4, device=self.device)
        self.quarter_count = torch.zeros(4, device=self.device)
        self.grad_norm_sum = torch.zeros((), device=self.device)
        self.steps = 0

    def add(self, step: int, losses: Tensor, t: Tensor, num_steps: int, grad_norm: Tensor | None,
            batch_size: int, world: distributed.World = distributed.SINGLE) -> None:
        """losses, t: this process's examples of step ``step``'s global batch of ``batch_size``."""
        losses = losses.float()
        loss = world.sum_(losses.sum() / batch_size)  # the global batch's mean loss
        self.loss_sum += loss
        newly_bad = ~torch.isfinite(loss) & (self.bad_step == 0)
        self.bad_step = torch.where(newly_bad, step, self.bad_step)
        self.bad_loss = torch.where(newly_bad, loss, self.bad_loss)
        quarter = (t * 4 // num_steps).clamp(max=3)
        self.quarter_sum.index_add_(0, quarter, losses)
        self.quarter_count.index_add_(0, quarter, torch.ones_like(losses))
        if grad_norm is not None:
            self.grad_norm_sum += grad_norm.float()  # the same on every process (of the summed gradient)
        self.steps += 1

    def raise_if_non_finite(self, last_good: Path | None) -> None:
        """NonFiniteLoss naming the first step whose loss was nan or inf, if there was one."""
        bad_step = int(self.bad_step)
        if bad_step:
            raise NonFiniteLoss(bad_step, float(self.bad_loss), last_good)

    def flush(self, batch_size: int, world: distributed.World = distributed.SINGLE) -> dict[str, float]:
        """The window's means over the global batches (the quarters summed over the processes: one all-reduce)."""
        sums = world.sum_(torch.cat([self.quarter_sum, self.quarter_count]))
        loss_sum, quarter_sum, quarter_count = self.loss_sum, sums[:4], sums[4:]
        elapsed = time.perf_counter() - self._clock
        loss = (loss_sum / self.steps).item()
        quarters = (quarter_sum / quarter_count.clamp(min=1)).tolist()
        values = {"loss": loss, **{f"loss_q{i}": q for i, q in enumerate(quarters) if quarter_count[i] > 0},
                  "grad_norm": (self.grad_norm_sum / self.steps).item(),
                  "examples_per_s": self.steps * batch_size / max(elapsed, 1e-9)}
        self.last_loss = loss
        self._reset()
        self._clock = time.perf_counter()
        return values


def loss_weighting(config: Config) -> str | None:
    """The weighting ``training_loss`` takes for the config's ``diffusion.weighting`` (None: the simple loss)."""
    return None if config.diffusion.weighting == "none" else config.diffusion.weighting


@torch.no_grad()
def heldout_losses(model: nn.Module, ema_model: nn.Module, schedule: NoiseSchedule, heldout: Tensor,
                   config: Config) -> dict[str, float]:
    """The loss on held-out data with fixed timesteps and noise (the same at every evaluation),
    weighted as the training loss is, so that the two can be compared."""
    generator = torch.Generator().manual_seed(config.train.seed + 3)
    x0 = heldout.to(schedule.device)
    t = sample_timesteps(schedule, x0.shape[0], device="cpu", generator=generator).to(schedule.device)
    noise = torch.randn(x0.shape, generator=generator).to(schedule.device)
    model.eval()
    out = {}
    for name, net in (("heldout_loss", model), ("heldout_loss_ema", ema_model)):
        total = 0.0
        for start in range(0, x0.shape[0], 1024):
            part = slice(start, start + 1024)
            losses = training_loss(net, schedule, x0[part], t=t[part], noise=noise[part],
                                   prediction=config.diffusion.prediction, weighting=loss_weighting(config),
                                   reduction="none")
            total += losses.sum().item()
        out[name] = total / x0.shape[0]
    return out


def save_samples(ema_model: nn.Module, schedule: NoiseSchedule, config: Config, dataset: Dataset,
                 path: Path) -> None:
    """A grid of EMA samples (images) or a scatter of samples beside data (points; of their first two
    coordinates when there are more), from fixed noise. One-dimensional points get no picture."""
    if dataset.kind == "points" and dataset.sample_shape[0] < 2:
        return
    s = config.sample
    generator = torch.Generator(schedule.device).manual_seed(config.train.seed + 4)
    shape = (s.num_samples, *dataset.sample_shape)
    x = sample(ema_model, schedule, shape, sampler=s.sampler, steps=s.sample_steps, eta=s.eta,
               clip_denoised=s.clip and dataset.kind == "image", prediction=config.diffusion.prediction,
               generator=generator)
    path.parent.mkdir(parents=True, exist_ok=True)
    if dataset.kind == "image":
        save_grid(x.clamp(-1, 1).cpu(), path)
    else:
        dims = "" if dataset.sample_shape[0] == 2 else f" (coordinates 0, 1 of {dataset.sample_shape[0]})"
        scatter_png([dataset.data[: s.num_samples, :2].cpu(), x[:, :2].cpu()], path,
                    titles=["data" + dims, path.stem.replace("_", " ") + dims])


def _training_state(optimizer: torch.optim.Optimizer, order: DataOrder,
                    noise_generator: torch.Generator) -> tuple[dict[str, Tensor], dict[str, Any]]:
    tensors, optimizer_meta = ckpt.optimizer_state_to_tensors(optimizer)
    data_tensors, data_state = order.state()
    tensors.update(data_tensors)
    tensors["rng.noise"] = noise_generator.get_state()
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    return tensors, {"format_version": FORMAT_VERSION, "optimizer": optimizer_meta, **data_state}


def _restore(checkpoint: Path, model: nn.Module, ema_model: nn.Module, optimizer: torch.optim.Optimizer,
             order: DataOrder, noise_generator: torch.Generator, device: torch.device) -> int:
    ckpt.load_weights(model, checkpoint / "model.safetensors", "model weights")
    ckpt.load_weights(ema_model, checkpoint / "ema.safetensors", "EMA weights")
    tensors = ckpt.load_tensors(checkpoint / "state.safetensors", "training state")
    state = ckpt.read_json(checkpoint / "state.json", "training state")
    required = ("data.perm", "rng.data", "rng.noise", "rng.torch")
    missing = [k for k in required if k not in tensors] + [k for k in ("step", "optimizer", "data_cursor")
                                                             if k not in state]
    if missing:
        raise ckpt.CheckpointError(f"{checkpoint} is not a ddpm training checkpoint ({missing[0]} missing)")
    try:
        # The optimiser moves its moments to the parameters' device itself.
        optimizer.load_state_dict(ckpt.optimizer_state_from_tensors(tensors, state["optimizer"]))
    except (ValueError, KeyError, RuntimeError) as error:
        raise ckpt.CheckpointError(f"{checkpoint}: the optimiser state does not fit the model ({error})") from None
    for group in optimizer.param_groups:  # the checkpoint's groups carry its run's choice; keep this run's
        group["fused"] = optimizer.defaults["fused"]
    _lay_out_like_parameters(optimizer)
    order.load_state(tensors, state)
    noise_generator.set_state(tensors["rng.noise"])
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and device.type == "cuda":
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    return int(state["step"])


def _lay_out_like_parameters(optimizer: torch.optim.Optimizer) -> None:
    """Give each moment tensor its parameter's memory layout (checkpoints store them contiguous).

    Fused AdamW on a CPU walks a parameter and its moments as flat memory: a channels-last weight
    with contiguous moments pairs each weight with another weight's moments, silently (seen with
    torch 2.13: updates off by 0.3 at lr 0.1). Matching layouts also make a resumed run bitwise
    identical to an uninterrupted one.
    """
    for param, state in optimizer.state.items():
        for key, value in state.items():
            if isinstance(value, Tensor) and value.shape == param.shape and value.stride() != param.stride():
                state[key] = torch.empty_like(param, dtype=value.dtype).copy_(value)
