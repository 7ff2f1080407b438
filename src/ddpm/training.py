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
import dataclasses
import functools
import math
import signal
import sys
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
from ddpm.build import (build_model_for, build_schedule, load_training_data, resolve_device, training_precision,
                        wants_channels_last)
from ddpm.config import Config, config_from_dict, config_to_dict
from ddpm.validation import SettingError, duration_seconds
from ddpm.data import DataOrder, Dataset, host_to_device, random_hflip
from ddpm.diffusion import per_example_loss, sample_timesteps, training_loss
from ddpm.guidance import guided
from ddpm.metrics_log import Metrics, NoMetrics
from ddpm.models import use_channels_last
from ddpm.rundir import (
    RunDirError, RunLock, check_nothing_was_lost, check_resume_config, data_paths, prepare_run_dir, run_metadata,
    start_run_dir,
)
from ddpm.run import Run
from ddpm.sampling import network_calls, sample_with, walk_timesteps
from ddpm.schedule import NoiseSchedule
from ddpm.visualize import save_grid, scatter_png

__all__ = [
    "train", "TrainResult", "TrainingStopped", "Interrupted", "NonFiniteLoss", "ProcessGroupFailed",
    "build_optimizer", "DataOrder",
]


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


@dataclass(frozen=True)
class TrainResult:
    run_dir: Path
    step: int  # optimiser steps done
    checkpoint: Path  # the final checkpoint
    loss: float  # mean training loss over the last logging window (nan when this invocation took no step)
    seconds: float  # wall time of this invocation
    start_step: int = 0  # the step this invocation started from (a resumed run's checkpoint)


# --- the pieces only the loop needs ----------------------------------------------------------------

def build_optimizer(model: nn.Module, config: Config) -> torch.optim.AdamW:
    """AdamW over ``model``'s parameters; with ``train.fused_optimizer`` its fused kernel, which
    updates every parameter in one pass instead of a dozen element-wise passes per tensor."""
    t_cfg = config.train
    return torch.optim.AdamW(model.parameters(), lr=t_cfg.lr, weight_decay=t_cfg.weight_decay,
                             fused=True if t_cfg.fused_optimizer else None)


# --- one step -------------------------------------------------------------------------------------

def learning_rate(config: Config, step: int) -> float:
    """The learning rate of step ``step`` (0-based): a linear warm-up from 0 to lr over ``warmup`` steps,
    then lr (as the paper), or lr decayed along a half cosine or a line to 0, which it reaches just
    after the last step."""
    t_cfg = config.train
    if step < t_cfg.warmup:
        return t_cfg.lr * (step + 1) / t_cfg.warmup
    if t_cfg.lr_decay == "constant":
        return t_cfg.lr
    left = 1.0 - min((step - t_cfg.warmup) / max(t_cfg.steps - t_cfg.warmup, 1), 1.0)
    return t_cfg.lr * (left if t_cfg.lr_decay == "linear" else 0.5 * (1.0 - math.cos(math.pi * left)))


def ema_decay(config: Config, updates: int) -> float:
    decay = config.train.ema_decay
    return min(decay, (1 + updates) / (10 + updates)) if config.train.ema_warmup else decay


@torch.no_grad()
def update_ema(ema_model: nn.Module, model: nn.Module, decay: float) -> None:
    ema_params = list(ema_model.parameters())
    torch._foreach_lerp_(ema_params, [p.detach() for p in model.parameters()], 1.0 - decay)
    for ema_buffer, buffer in zip(ema_model.buffers(), model.buffers()):
        ema_buffer.copy_(buffer)


class Batch(NamedTuple):
    """One global batch of Algorithm 1: examples, timesteps, noise and (conditional runs) labels."""

    x0: Tensor
    t: Tensor
    noise: Tensor
    labels: Tensor | None  # class indices, "no class" (num_classes) where dropped; None: unconditional

    def part(self, index: slice | Tensor) -> "Batch":
        """The examples at ``index`` of every tensor."""
        return Batch(*(None if v is None else v[index] for v in self))


def draw_batch(data: Tensor, order: DataOrder, noise_generator: torch.Generator, schedule: NoiseSchedule,
               batch_size: int, hflip: bool, labels: Tensor | None = None, num_classes: int = 0,
               label_dropout: float = 0.0, weighting: str | None = None) -> Batch:
    """The global batch: examples x0, timesteps t ~ U{0..T-1} (Algorithm 1, line 3; EDM's density for
    weighting "edm", see diffusion.sample_timesteps) and noise eps; with
    ``labels`` (N,), those of the examples, each replaced by "no class" (index num_classes) with
    probability label_dropout. The drops are drawn after the noise, so an unconditional run draws
    exactly what it drew before conditional runs existed."""
    indices = host_to_device(order.next(batch_size), data.device)
    x0 = data.index_select(0, indices)
    if hflip:
        x0 = random_hflip(x0, order.generator)
    device = noise_generator.device
    t = sample_timesteps(schedule, batch_size, device=device, generator=noise_generator, weighting=weighting)
    noise = torch.randn(x0.shape, generator=noise_generator, device=device)
    y = None
    if labels is not None:
        y = labels.index_select(0, indices).to(device)
        dropped = torch.rand(batch_size, generator=noise_generator, device=device) < label_dropout
        y = y.masked_fill(dropped, num_classes)
    return Batch(x0.to(device), t, noise, y)


# --- the loop -------------------------------------------------------------------------------------

def train(config: Config, run_dir: str | Path, *, resume: bool = False, overwrite: bool = False,
          changed: set[str] | None = None, progress: bool = True,
          log: Callable[[str], None] = lambda message: print(message, file=sys.stderr)) -> TrainResult:
    """Train ``config`` into ``run_dir`` (Algorithm 1); with ``resume`` continue its latest checkpoint.

    changed: the config fields the user set explicitly; on resume only the resumable ones
    (config.resumable_fields) may differ from the saved run. Raises Interrupted on SIGINT/SIGTERM
    (after writing a checkpoint), NonFiniteLoss on a nan/inf loss (writing nothing), ValueError for
    unusable settings. Under torchrun
    every process calls this; rank 0 alone writes, and ProcessGroupFailed says when another process died.
    """
    world = distributed.World.from_env()
    device = resolve_device(config.train.device, world)
    locks: list[RunLock] = []  # rank 0's lock on the run directory, held until training ends
    with distributed.process_group(world, device):  # none for a single process
        try:
            return _train(config, Path(run_dir), world, device, resume=resume, overwrite=overwrite,
                          changed=changed, progress=progress and world.is_main,
                          log=log if world.is_main else lambda message: None, locks=locks)
        finally:
            for lock in locks:
                lock.release()


class _Setup(NamedTuple):
    """What a run trains with, built (or restored from its latest checkpoint) before the first step."""

    config: Config  # the saved run's when resuming
    dataset: Dataset
    heldout: Dataset | None
    data: Tensor  # dataset.data on the training device
    classes: tuple[str, ...] | None  # a conditional run's class names; None: unconditional
    labels: Tensor | None  # a conditional run's dataset.labels on the training device
    schedule: NoiseSchedule
    model: nn.Module
    ema_model: nn.Module
    optimizer: torch.optim.AdamW
    order: DataOrder
    noise_generator: torch.Generator
    metadata: dict[str, Any]  # config.json
    step: int  # steps already taken
    budget: float | None  # --time-budget in seconds while train.steps is still to be fixed from it; else None
    checkpoint: Path | None  # the one restored
    notes: list[str]  # for the user, once everything is set up


def _set_up(config: Config, run_dir: Path, world: distributed.World, device: torch.device, *, resume: bool,
            overwrite: bool, changed: set[str] | None, locks: list[RunLock]) -> _Setup:
    _check_shares(config, world)

    def lock_and_prepare() -> bool:  # on rank 0, which writes the run and holds its lock until the end
        locks.append(RunLock.acquire(run_dir))
        resuming = prepare_run_dir(run_dir, resume=resume, overwrite=overwrite, reads=data_paths(config))
        locks[-1].confirm()  # the run is to be written: a lock file made now stays with it
        return resuming

    resuming = world.on_main(lock_and_prepare, device)
    checkpoint = None
    notes: list[str] = []  # shown once everything is set up, so a failing setup prints one line only
    if resuming:
        saved = ckpt.read_run_config(run_dir / "config.json")
        config = check_resume_config(config_from_dict(saved["config"], where=str(run_dir / "config.json")),
                                     config, changed or set())
        checkpoint = ckpt.latest_checkpoint(run_dir)
        if checkpoint is not None:
            _refuse_imported(run_dir, checkpoint)
        if checkpoint is None:
            check_nothing_was_lost(run_dir, config)
            notes.append(f"{run_dir} stopped before its first checkpoint: training it again from step 0")
        _check_shares(config, world)
    elif resume:
        notes.append(f"nothing to resume in {run_dir}: starting a new run")

    schedule = build_schedule(config)  # before the data and model: T's tables are checked to fit first
    # Each machine's first process loads (and downloads) the data before the others: one download per machine.
    dataset, heldout, data_notes = world.machine_first(lambda: load_training_data(config), device)
    notes += data_notes
    t_cfg = config.train
    classes = dataset.classes if config.model.conditional else None
    model = build_model_for(config, dataset.kind, dataset.sample_shape, seed=t_cfg.seed,
                            num_classes=len(classes or ())).to(device)
    if wants_channels_last(config, device):
        use_channels_last(model)
    ema_model = copy.deepcopy(model).eval().requires_grad_(False)
    optimizer = build_optimizer(model, config)
    order = DataOrder(len(dataset), t_cfg.seed)
    noise_generator = torch.Generator(device).manual_seed(t_cfg.seed + 1)
    torch.manual_seed(t_cfg.seed + 2)  # dropout
    metadata = run_metadata(config, model, dataset.kind, dataset.sample_shape, dataset.name, classes)
    planned = saved.get("time_budget") if resuming else None  # the step count a --time-budget fixed
    if planned is not None:
        metadata["time_budget"] = planned
    budget = duration_seconds("time_budget", t_cfg.time_budget) if t_cfg.time_budget and not planned else None
    step = 0
    if checkpoint is not None:
        step = ckpt.restore_training_state(checkpoint, model, ema_model, optimizer, order, noise_generator, device)
        notes.append(f"resuming {run_dir} from {checkpoint.name}")
    if budget is not None:  # train.steps is provisional until the step time is measured (_BudgetPlan)
        probe_end = max(step + BUDGET_PROBE[1], t_cfg.warmup)
        config = dataclasses.replace(config, train=dataclasses.replace(t_cfg, steps=max(t_cfg.steps, probe_end)))
        t_cfg = config.train
    if step > t_cfg.steps:
        raise RunDirError(f"the run is already at step {step}, past train.steps = {t_cfg.steps}; "
                          f"give a larger --steps to train longer")
    if t_cfg.precision == "auto":
        notes.append(f"train.precision auto: {training_precision(config, device)} here")
    if world.active:
        notes.append(f"{world.size} processes, {t_cfg.batch_size // world.size} examples each per step "
                     f"(global batch {t_cfg.batch_size})")
    if t_cfg.eval_metric is not None:  # refused now, not after hours of training (nor with a run folder made)
        check_eval_metric(Run(config, model, ema_model, schedule, dataset.kind, dataset.sample_shape, step, None,
                              classes))
    if not resuming and world.is_main:
        start_run_dir(run_dir, metadata, overwrite=overwrite)
    elif world.is_main and saved["config"] != metadata["config"]:
        ckpt.write_json(run_dir / "config.json", metadata)  # a changed --steps and the like hold for later resumes
    labels = dataset.labels.to(device) if classes else None
    return _Setup(config, dataset, heldout, dataset.data.to(device), classes, labels, schedule.to(device), model,
                  ema_model, optimizer, order, noise_generator, metadata, step, budget, checkpoint, notes)


def _train(config: Config, run_dir: Path, world: distributed.World, device: torch.device, *, resume: bool,
           overwrite: bool, changed: set[str] | None, progress: bool, log: Callable[[str], None],
           locks: list[RunLock]) -> TrainResult:
    started = time.perf_counter()
    run = _set_up(config, run_dir, world, device, resume=resume, overwrite=overwrite, changed=changed, locks=locks)
    config, t_cfg, step, last_checkpoint = run.config, run.config.train, run.step, run.checkpoint
    metrics = Metrics(run_dir, config, step, run.notes) if world.is_main else NoMetrics()
    for note in run.notes:
        log(note)
    shared_model = world.wrap(run.model, device)  # sums gradients over the processes in backward
    train_model = torch.compile(shared_model) if t_cfg.compile else shared_model
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=training_precision(config, device) == "bf16")
    window = _Window(device)
    plan = _BudgetPlan(run.budget, step, t_cfg.warmup, device) if run.budget is not None else None
    bar = tqdm(total=t_cfg.steps, initial=step, desc="training", unit="step", disable=not progress,
               dynamic_ncols=True, file=sys.stderr)

    def due(every: int) -> bool:
        return (every > 0 and step % every == 0) or step == t_cfg.steps

    def save() -> Path:
        window.raise_if_non_finite(last_checkpoint)  # a checkpoint never holds weights a bad step made
        if world.is_main:
            tensors, state = ckpt.training_state(run.optimizer, run.order, run.noise_generator)
            ckpt.save_checkpoint(run_dir, step, model=run.model, ema_model=run.ema_model, tensors=tensors,
                                 state={**state, "step": step}, config=run.metadata, keep=t_cfg.keep_checkpoints)
        world.barrier()  # no process leaves (or is stopped by torchrun) while rank 0 is writing
        return run_dir / "checkpoints" / ckpt.checkpoint_name(step)

    def heldout() -> dict[str, float]:
        values = heldout_losses(run.model, run.ema_model, run.schedule, run.heldout.data, config,
                                labels=run.heldout.labels if run.classes else None, progress=progress)
        run.model.train()
        return values

    def quality() -> None:
        if world.is_main:
            metrics.log(step, sample_quality(run, config, step, progress=progress))
            run.model.train()

    def samples() -> None:
        if world.is_main:
            save_samples(run.ema_model, run.schedule, config, run.dataset,
                         run_dir / "samples" / f"{ckpt.checkpoint_name(step)}.png", progress=progress,
                         conditional=run.classes is not None)

    # The work done every so many steps besides logging and checkpoints (and at the last step): its
    # period in steps (0: the last step only) and the job.
    periodic: dict[str, tuple[int, Callable[[], Any]]] = {"samples": (t_cfg.sample_every, samples)}
    if t_cfg.eval_every and run.heldout is not None:
        periodic["heldout"] = (math.lcm(t_cfg.eval_every, t_cfg.log_every), lambda: metrics.log(step, heldout()))
    if t_cfg.eval_metric is not None:
        periodic["quality"] = (t_cfg.eval_metric_every, quality)

    try:
        with distributed.StopSignals(world) as stop:
            run.model.train()
            while step < t_cfg.steps:
                losses, t, grad_norm = _step(run, step, shared_model, train_model, autocast, world)
                step += 1
                # No host sync in a step: the loss stays on the device and is checked for nan/inf
                # before anything is logged, sampled or saved.
                window.add(step, losses, t, run.schedule.num_steps, grad_norm, t_cfg.batch_size, world)
                bar.update(1)
                if plan is not None and (measured := plan.steps_after(step, world)) is not None:
                    # The periodic work comes on top of the steps: it is done once now and timed, so
                    # that the steps and their periodic work together fill the budget.
                    window.raise_if_non_finite(last_checkpoint)
                    costs = plan.time_jobs({name: job for name, (every, job) in periodic.items()}, world)
                    fixed = plan.fix(step, measured, {name: (every, costs[name]) for name, (every, _) in periodic.items()},
                                     world)
                    run, plan = _fix_steps(run, run_dir, fixed, world), None
                    config, t_cfg = run.config, run.config.train
                    bar.total = t_cfg.steps
                    log(f"time budget {t_cfg.time_budget}: {fixed['seconds_per_step']:.3f} s a step; training for "
                        f"{t_cfg.steps} steps (saved in config.json)")

                if due(t_cfg.log_every):
                    window.raise_if_non_finite(last_checkpoint)
                    values = window.flush(t_cfg.batch_size, world)
                    bar.set_postfix(loss=f"{values['loss']:.4f}", ex_per_s=f"{values['examples_per_s']:.0f}",
                                    refresh=False)
                    values["lr"] = run.optimizer.param_groups[0]["lr"]
                    if "heldout" in periodic and due(t_cfg.eval_every):
                        values.update(heldout())
                    metrics.log(step, values)
                if due(t_cfg.checkpoint_every):
                    last_checkpoint = save()
                if "quality" in periodic and due(t_cfg.eval_metric_every):
                    window.raise_if_non_finite(last_checkpoint)
                    quality()
                if due(t_cfg.sample_every):
                    window.raise_if_non_finite(last_checkpoint)  # on every process, as they all know the loss
                    samples()
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
    return TrainResult(run_dir, step, last_checkpoint, window.last_loss, time.perf_counter() - started, run.step)


def _step(run: _Setup, step: int, shared_model: nn.Module, train_model: nn.Module, autocast: torch.autocast,
          world: distributed.World) -> tuple[Tensor, Tensor, Tensor | None]:
    """Training step ``step`` (Algorithm 1) on this process's slice of the global batch, in
    train.grad_accum micro-batches, then the EMA update. Returns the slice's per-example losses
    (detached), its timesteps, and the gradient norm before clipping (None without train.grad_clip)."""
    config, t_cfg = run.config, run.config.train
    batch = draw_batch(run.data, run.order, run.noise_generator, run.schedule, t_cfg.batch_size, config.data.hflip,
                       run.labels, len(run.classes or ()), t_cfg.label_dropout, loss_weighting(config))
    batch = batch.part(world.share(t_cfg.batch_size))  # every process drew the global batch; it trains on its slice
    for param_group in run.optimizer.param_groups:
        param_group["lr"] = learning_rate(config, step)
    micro = t_cfg.batch_size // (world.size * t_cfg.grad_accum)
    per_example = []
    for i in range(t_cfg.grad_accum):
        x0, t, noise, labels = batch.part(slice(i * micro, (i + 1) * micro))
        net = train_model if labels is None else functools.partial(train_model, labels=labels)
        with autocast, world.accumulating(shared_model, last=i == t_cfg.grad_accum - 1):
            losses = per_example_loss(net, run.schedule, x0, t, noise,
                                      prediction=config.diffusion.prediction, weighting=loss_weighting(config))
            # The processes' gradients are averaged: scaling by their number makes it the global sum.
            (losses.sum() * world.size / t_cfg.batch_size).backward()
        per_example.append(losses.detach())
    grad_norm = (nn.utils.clip_grad_norm_(run.model.parameters(), t_cfg.grad_clip)
                 if t_cfg.grad_clip is not None else None)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    update_ema(run.ema_model, run.model, ema_decay(config, step))
    return torch.cat(per_example), batch.t, grad_norm


BUDGET_PROBE = (10, 40)  # --time-budget: the step time is measured from step 10 (the first are slower), to 40 at least


class _BudgetPlan:
    """--time-budget: the step time measured from step 10 of the invocation to the end of the
    learning-rate warm-up (step 40 at least; sooner where a tenth of the budget would pass first), and
    from it the step count that fills the budget, counted from the invocation's start. During the
    warm-up the learning rate does not depend on the step count, so fixing it then changes no step
    already taken; a longer measurement is steadier against a machine whose speed varies. The clock is
    read (and on a GPU, the queued work waited for) three times: at step 10, at step 40, where the end
    of the measurement is chosen, and at that end."""

    def __init__(self, seconds: float, first_step: int, warmup: int, device: torch.device):
        self.seconds, self.device = seconds, device
        self.first, self.end = first_step + BUDGET_PROBE[0], max(first_step + BUDGET_PROBE[1], warmup)
        self.started = self.probe_started = time.perf_counter()

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the steps queued so far have run
        return time.perf_counter()

    def _measured(self, step: int, world: distributed.World) -> list[float]:
        """Seconds a step since step 10, and since the start: the processes' mean, the same on every process."""
        now = self._now()
        mine = torch.tensor([(now - self.probe_started) / (step - self.first), now - self.started],
                            dtype=torch.float64, device=self.device)
        return (world.sum_(mine) / world.size).tolist()

    def steps_after(self, step: int, world: distributed.World) -> float | None:
        """After step ``step``: the seconds a step once the measurement is over (the processes' mean,
        the same on every process); else None."""
        if step == self.first:
            self.probe_started = self._now()
        elif step == self.first + BUDGET_PROBE[1] - BUDGET_PROBE[0]:  # where the measurement ends
            per_step, elapsed = self._measured(step, world)
            tenth = step + math.floor(max(0.0, self.seconds / 10 - elapsed) / per_step)
            self.end = min(self.end, tenth)
        if step != self.end:
            return None
        return self._measured(step, world)[0]

    def time_jobs(self, jobs: dict[str, Callable[[], Any]], world: distributed.World) -> dict[str, float]:
        """Does each job once and returns the seconds it took on the main process, which does them all
        (the others wait for it at the next step), the same on every process."""
        seconds = []
        for job in jobs.values():
            started = self._now()
            job()
            seconds.append(self._now() - started if world.is_main else 0.0)
        return dict(zip(jobs, world.sum_(torch.tensor(seconds, dtype=torch.float64, device=self.device)).tolist()))

    def fix(self, step: int, per_step: float, periodic: dict[str, tuple[int, float]],
            world: distributed.World) -> dict[str, Any]:
        """The plan: the most steps that, with the periodic work due on the way (each job's period and
        seconds; a period of 0 is the last step only), end within the budget counted from the start."""
        elapsed = self._measured(step, world)[1]

        def seconds(steps: int) -> float:
            jobs = sum(cost * (1 if every <= 0 else steps // every - step // every + (steps % every != 0))
                       for every, cost in periodic.values())
            return elapsed + (steps - step) * per_step + jobs

        steps = step + max(0, math.floor((self.seconds - elapsed) / per_step))
        while steps > step and seconds(steps) > self.seconds:
            steps -= 1
        return {"seconds": self.seconds, "seconds_per_step": per_step, "measured_over_steps": [self.first, step],
                "periodic_seconds": {name: cost for name, (_, cost) in periodic.items()}, "steps": steps}


def _fix_steps(run: _Setup, run_dir: Path, plan: dict[str, Any], world: distributed.World) -> _Setup:
    """``run`` with train.steps fixed by a --time-budget ``plan``, written to config.json (and so into every
    later checkpoint), so that a resumed run trains the same steps without measuring again."""
    config = dataclasses.replace(run.config, train=dataclasses.replace(run.config.train, steps=plan["steps"]))
    metadata = {**run.metadata, "config": config_to_dict(config), "time_budget": plan}
    if world.is_main:
        ckpt.write_json(run_dir / "config.json", metadata)
    return run._replace(config=config, metadata=metadata, budget=None)


def _refuse_imported(run_dir: Path, checkpoint: Path) -> None:
    """A run made by `ddpm import` holds weights but no training state (optimiser, data order): refused."""
    state = ckpt.read_json(checkpoint / "state.json", "training state")
    if isinstance(state, dict) and state.get("imported_from"):
        raise RunDirError(f"{run_dir} was made by ddpm import (from {state['imported_from']}): it holds weights to "
                          "sample and evaluate, but no training state to resume")


def _check_shares(config: Config, world: distributed.World) -> None:
    t_cfg = config.train
    if t_cfg.batch_size % (world.size * t_cfg.grad_accum):
        raise ValueError(f"train.batch_size = {t_cfg.batch_size} (the global batch) must be divisible by the number "
                         f"of processes times train.grad_accum = {world.size} x {t_cfg.grad_accum}")


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


# Held-out examples a forward pass: on 2 CPU threads, 1000 examples through unet-mnist took 3.6 s in
# chunks of 128 and 5.5 s in chunks of 1024 (activations that large leave the caches).
HELDOUT_CHUNK = 128


@torch.no_grad()
def heldout_losses(model: nn.Module, ema_model: nn.Module, schedule: NoiseSchedule, heldout: Tensor,
                   config: Config, labels: Tensor | None = None, progress: bool = False) -> dict[str, float]:
    """The loss on held-out data with fixed timesteps and noise (the same at every evaluation),
    weighted as the training loss is, so that the two can be compared. labels: a conditional run's
    held-out labels, which the loss is conditioned on (never dropped)."""
    generator = torch.Generator().manual_seed(config.train.seed + 3)
    x0 = heldout.to(schedule.device)
    t = sample_timesteps(schedule, x0.shape[0], device="cpu", generator=generator,
                         weighting=loss_weighting(config)).to(schedule.device)
    noise = torch.randn(x0.shape, generator=generator).to(schedule.device)
    model.eval()
    out = {}
    chunks = range(0, x0.shape[0], HELDOUT_CHUNK)
    bar = tqdm(total=2 * len(chunks), desc="held-out loss", unit="batch", disable=not progress, leave=False,
               dynamic_ncols=True, file=sys.stderr)
    for name, net in (("heldout_loss", model), ("heldout_loss_ema", ema_model)):
        total = 0.0
        for start in chunks:
            bar.update(1)
            part = slice(start, start + HELDOUT_CHUNK)
            conditioned = net if labels is None else functools.partial(net, labels=labels[part].to(schedule.device))
            losses = training_loss(conditioned, schedule, x0[part], t=t[part], noise=noise[part],
                                   prediction=config.diffusion.prediction, weighting=loss_weighting(config),
                                   reduction="none")
            total += losses.sum().item()
        out[name] = total / x0.shape[0]
    bar.close()
    return out


def sample_quality(run: _Setup, config: Config, step: int, progress: bool = False) -> dict[str, float]:
    """The run's --eval-metric on samples of its EMA weights drawn with its [sample] options, as
    {"METRIC/quantity": value} (e.g. "fid-mnist/fid"), the way `ddpm eval` would measure it now."""
    from ddpm.evaluation import EvalOptions, evaluate_run

    view = Run(config, run.model, run.ema_model, run.schedule, run.dataset.kind, run.dataset.sample_shape, step,
               None, run.classes)
    metric = eval_metric_of(view)
    options = EvalOptions(num=config.train.eval_metric_num, sample=view.sample_options(), seed=config.train.seed,
                          data_dir=config.data.data_dir, progress=progress)
    result = evaluate_run(view, [metric], options)[metric]
    return {f"{metric}/{name}": float(value) for name, value in result.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)}


def check_eval_metric(view: Run) -> None:
    """Refuse an --eval-metric this run cannot have (e.g. fid-mnist on other data than MNIST)."""
    from ddpm.evaluation.evaluate import check_metrics

    metric = eval_metric_of(view)
    try:
        check_metrics(view, [metric])
    except ValueError as error:
        raise SettingError("train.eval_metric", metric, str(error)) from None


def eval_metric_of(run: Run) -> str:
    """The metric --eval-metric names for this run ("auto": the data's own sample metric)."""
    from ddpm.evaluation import default_metrics

    asked = run.config.train.eval_metric
    own = [m for m in default_metrics(run) if m != "bpd"]
    if asked != "auto":
        return asked
    if not own:
        raise SettingError("train.eval_metric", asked, f"{run.config.data.source!r} has no sample metric of its "
                                                         "own; name one (fid-mnist, energy, square, gradient)")
    return own[0]


def save_samples(ema_model: nn.Module, schedule: NoiseSchedule, config: Config, dataset: Dataset,
                 path: Path, progress: bool = False, conditional: bool = False) -> None:
    """A grid of EMA samples (images) or a scatter of samples beside data (points; of their first two
    coordinates when there are more), from fixed noise. One-dimensional points get no picture. A
    conditional run's grid has one row per class (num_samples / classes a row, at least one), drawn
    with its [sample] guidance; its points are drawn for the classes in turn."""
    if dataset.kind == "points" and dataset.sample_shape[0] < 2:
        return
    s = config.sample
    generator = torch.Generator(schedule.device).manual_seed(config.train.seed + 4)
    num, model, per_row = s.num_samples, ema_model, None
    if conditional:
        num_classes = len(dataset.classes)
        per_row = -(-num // num_classes) if dataset.kind == "image" else None
        labels = (torch.arange(num_classes).repeat_interleave(per_row) if per_row
                  else torch.arange(num) % num_classes)
        num, model = len(labels), guided(ema_model, labels, s.guidance, num_classes)
    shape = (num, *dataset.sample_shape)
    options = s if dataset.kind == "image" else s.unbounded()  # points have no bounded range
    walk = walk_timesteps(schedule, options)
    calls = network_calls(options, walk)
    with tqdm(total=len(walk), desc=f"sample grid ({num} {dataset.kind}, {options.sampler}-{calls})",
              unit="step", disable=not progress, leave=False, dynamic_ncols=True, file=sys.stderr) as bar:
        x = sample_with(model, schedule, shape, options, prediction=config.diffusion.prediction,
                        generator=generator, callback=lambda step: bar.update(1))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if dataset.kind == "image":
            save_grid(x.clamp(-1, 1).cpu(), path, nrow=per_row)
        else:
            dims = "" if dataset.sample_shape[0] == 2 else f" (coordinates 0, 1 of {dataset.sample_shape[0]})"
            scatter_png([dataset.data[: s.num_samples, :2].cpu(), x[:, :2].cpu()], path,
                        titles=["data" + dims, path.stem.replace("_", " ") + dims])
    except OSError as error:
        raise ckpt.StorageError(ckpt.describe_os_error(error, path)) from None



