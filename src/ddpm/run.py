"""A trained run, ready to sample from: ``run = ddpm.load("runs/square")``.

    run = ddpm.load("runs/mnist")                     # or a checkpoint folder
    x = run.sample(16, sampler="ddim", steps=50)      # (16, 1, 28, 28) in [-1, 1], EMA weights
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ddpm import checkpoint as ckpt
from ddpm.config import Config, check_seed, config_from_dict
from ddpm.models import build_model_from_dict, use_channels_last
from ddpm.sampling import SamplerStep, sample
from ddpm.schedule import NoiseSchedule

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

    def sample(self, n: int, *, sampler: str | None = None, steps: int | None = None, eta: float | None = None,
               clip: bool | None = None, ema: bool = True, batch_size: int | None = None, seed: int = 0,
               generator: torch.Generator | None = None,
               callback: Callable[[SamplerStep], None] | None = None, progress: bool = False,
               cuda_graph: bool | None = None) -> Tensor:
        """Draw ``n`` samples (n, *sample_shape) on the CPU; options default to the run's [sample] config
        (its steps and eta only with its own sampler: another sampler gets all T steps and eta 0).

        batch_size: how many to draw at once (default all n). seed: used when no generator is given.
        clip applies to images only (points have no bounded range). cuda_graph: as in ``ddpm.sample``
        (default: replay each step as a CUDA graph on a CUDA device).
        """
        n = _count("n", n, "ask for at least 1 sample")
        s = self.config.sample
        sampler = s.sampler if sampler is None else sampler
        steps = self.default_steps(sampler) if steps is None else steps
        eta = (s.eta if sampler == s.sampler else 0.0) if eta is None else eta  # the run's eta is its DDIM's
        clip = (s.clip if clip is None else clip) and self.kind == "image"
        batch_size = n if batch_size is None else _count("batch_size", batch_size, "it must be at least 1")
        if generator is None:
            generator = torch.Generator(self.schedule.device).manual_seed(check_seed(seed, "seed"))
        model = self.ema_model if ema else self.model.eval()
        parts = []
        for start in range(0, n, batch_size):
            count = min(batch_size, n - start)
            parts.append(sample(model, self.schedule, (count, *self.sample_shape), sampler=sampler, steps=steps,
                                eta=eta, clip_denoised=clip, prediction=self.config.diffusion.prediction,
                                generator=generator, callback=callback, progress=progress,
                                cuda_graph=cuda_graph).cpu())
        return torch.cat(parts)

    def default_steps(self, sampler: str) -> int | None:
        """The run's [sample] steps when ``sampler`` is the run's own sampler, else None (all T)."""
        return self.config.sample.sample_steps if sampler == self.config.sample.sampler else None

    def to(self, device: torch.device | str) -> "Run":
        """Move the networks and the schedule to ``device`` (in place; returns self)."""
        self.model.to(device)
        self.ema_model.to(device)
        self.schedule = self.schedule.to(device)
        return self


def load(path: str | Path, *, device: torch.device | str = "cpu") -> Run:
    """Load a run directory (its latest checkpoint) or one checkpoint folder. Reads only JSON and
    safetensors: nothing pickled is ever executed."""
    from ddpm.training import build_schedule, resolve_device  # training imports heavy things only it needs

    if not isinstance(device, torch.device):
        device = resolve_device(device, setting="device")
    checkpoint = ckpt.find_run_files(path)
    metadata = ckpt.read_json(checkpoint / "config.json", "the checkpoint's config.json")
    try:
        config = config_from_dict(metadata["config"], where=str(checkpoint / "config.json"))
        architecture: dict[str, Any] = metadata["model"]
        kind, sample_shape = metadata["data"]["kind"], tuple(metadata["data"]["sample_shape"])
    except (KeyError, TypeError):
        raise ckpt.CheckpointError(f"{checkpoint / 'config.json'} is not a ddpm run config") from None
    try:
        model = build_model_from_dict(architecture)
        ema_model = build_model_from_dict(architecture)
    except ValueError as error:
        raise ckpt.CheckpointError(f"{checkpoint / 'config.json'}: cannot rebuild the model ({error})") from None
    ckpt.load_weights(model, checkpoint / "model.safetensors", "model weights")
    ckpt.load_weights(ema_model, checkpoint / "ema.safetensors", "EMA weights")
    if config.train.channels_last:  # sampling runs in fp32, where channels-last is the faster layout
        use_channels_last(model)
        use_channels_last(ema_model)
    state = ckpt.read_json(checkpoint / "state.json", "training state")
    run = Run(config, model.eval(), ema_model.eval().requires_grad_(False), build_schedule(config), kind,
              sample_shape, int(state.get("step", 0)), checkpoint)
    return run.to(device)


def _count(name: str, value: Any, allowed: str) -> int:
    """``value`` as an int when it is a whole number >= 1 (numpy's included), else a ValueError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} = {value!r} is not allowed; {allowed}")
    return int(value)
