"""A trained run, ready to sample from: ``run = ddpm.load("runs/square")``.

    run = ddpm.load("runs/mnist")                     # or a checkpoint folder
    x = run.sample(16, sampler="ddim", steps=50)      # (16, 1, 28, 28) in [-1, 1], EMA weights
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ddpm.build import load_saved, resolve_device
from ddpm.config import Config, SampleConfig
from ddpm.guidance import class_labels, guided
from ddpm.sampling import SamplerStep, network_calls, sample_with, walk_timesteps
from ddpm.schedule import NoiseSchedule
from ddpm.validation import SettingError, check_seed, whole_number

__all__ = ["Run", "load"]


@dataclass
class Run:
    """The pieces of a trained run. ``model`` has the raw weights, ``ema_model`` their moving average."""

    config: Config
    model: nn.Module
    ema_model: nn.Module
    schedule: NoiseSchedule
    kind: str  # "image" or "points"
    sample_shape: tuple[int, ...]  # (C, H, W) or (D,)
    step: int  # training steps behind these weights
    checkpoint: Path
    classes: tuple[str, ...] | None = None  # a conditional run's class names (label i is classes[i])

    @property
    def conditional(self) -> bool:
        return self.classes is not None

    def sample_options(self, **asked: Any) -> SampleConfig:
        """The sampling options of this run: its [sample] config, with those in ``asked`` (sampler,
        steps, eta, variance, spacing, clip, threshold, guidance; None: the run's) on top. Another sampler than
        the run's starts from its defaults (T calls, eta 0, ...), not from the run's walk. clip and
        threshold apply to images only (points have no bounded range)."""
        if asked.get("guidance") is not None and not self.conditional:
            raise SettingError("guidance", asked["guidance"], "this run is unconditional (trained without "
                                                              "--conditional): it has no classes to guide towards")
        options = self.config.sample.replace(**asked)
        if options.steps is not None and options.steps > self.schedule.num_steps:
            raise SettingError("steps", options.steps, f"this run has T = {self.schedule.num_steps}, "
                                                       f"so use 1..{self.schedule.num_steps}")
        return options if self.kind == "image" else options.unbounded()

    def sample(self, n: int, *, labels: int | str | Sequence[int | str] | Tensor | None = None,
               guidance: float | None = None, sampler: str | None = None, steps: int | None = None,
               eta: float | None = None, clip: bool | None = None, spacing: str | None = None,
               threshold: float | None = None, options: SampleConfig | None = None, ema: bool = True,
               batch_size: int | None = None, seed: int = 0, generator: torch.Generator | None = None,
               callback: Callable[[SamplerStep], None] | None = None, progress: bool = False,
               cuda_graph: bool | None = None) -> Tensor:
        """Draw ``n`` samples (n, *sample_shape) on the CPU with ``options`` (default: this run's
        ``sample_options(sampler=..., steps=..., eta=..., clip=..., spacing=..., threshold=...,
        guidance=...)``; give either those keywords or ``options``, not both).

        labels: a conditional run's class for every sample (a name of ``classes`` or an index) or one
        per sample (a sequence or an (n,) tensor); None draws from the unconditional model.
        guidance: the classifier-free guidance weight w (``ddpm.guidance``; None: the run's own).
        batch_size: how many to draw at once (default all n); one progress bar covers them all.
        seed: used when no generator is given.
        cuda_graph: replay the network as a CUDA graph (``ddpm.cuda_graph``); None (default): on when the
        run is on a CUDA device, where it gave the plain walk's numbers bit for bit and ran DDIM-50 4.1x
        and DDPM-1000 6.3x faster on an H200 (docs/performance.md, "On a GPU").
        """
        n = whole_number("n", n)
        if labels is not None and not self.conditional:
            raise ValueError("labels given, but this run is unconditional (trained without --conditional): it has "
                             "no classes to ask for")
        asked = dict(sampler=sampler, steps=steps, eta=eta, clip=clip, spacing=spacing, threshold=threshold,
                     guidance=guidance)
        if options is None:
            options = self.sample_options(**asked)
        elif any(value is not None for value in asked.values()):
            raise ValueError("give the sampling options either as options= or as keywords, not both")
        if self.conditional:
            wanted = (class_labels(labels, self.classes, n) if labels is not None
                      else torch.full((n,), len(self.classes), dtype=torch.long))  # "no class": unconditional
            # On the network's device once: a copy from the host at every call would stop a CUDA graph.
            wanted = wanted.to(self.schedule.device)
            # With no class asked, both halves of guidance would be the "no class" network: call it once.
            weight = options.guidance if labels is not None else 0.0
        batch_size = n if batch_size is None else whole_number("batch_size", batch_size)
        if cuda_graph is None:
            cuda_graph = self.schedule.device.type == "cuda"
        if generator is None:
            generator = torch.Generator(self.schedule.device).manual_seed(check_seed(seed, "seed"))
        model = self.ema_model if ema else self.model.eval()
        batches = range(0, n, batch_size)
        walk = walk_timesteps(self.schedule, options)
        calls = network_calls(options, walk)
        with tqdm(total=len(batches) * len(walk), desc=f"sampling {n} ({options.sampler}, {calls} calls)",
                  unit="step", disable=not progress, dynamic_ncols=True) as bar:
            def each_step(step: SamplerStep) -> None:
                bar.update(1)
                if callback is not None:
                    callback(step)

            parts = []
            for start in batches:
                count = min(batch_size, n - start)
                net = (guided(model, wanted[start:start + count], weight, len(self.classes))
                       if self.conditional else model)
                parts.append(sample_with(net, self.schedule, (count, *self.sample_shape), options,
                                         prediction=self.config.diffusion.prediction, generator=generator,
                                         callback=each_step if progress else callback, cuda_graph=cuda_graph).cpu())
        return torch.cat(parts)

    def to(self, device: torch.device | str) -> "Run":
        """Move the networks and the schedule to ``device`` (in place; returns self)."""
        self.model.to(device)
        self.ema_model.to(device)
        self.schedule = self.schedule.to(device)
        return self


def load(path: str | Path, *, device: torch.device | str = "cpu") -> Run:
    """Load a run directory (its latest checkpoint) or one checkpoint folder. Reads only JSON and
    safetensors: nothing pickled is ever executed."""
    if not isinstance(device, torch.device):
        device = resolve_device(device, setting="device")
    return Run(*load_saved(path)).to(device)
