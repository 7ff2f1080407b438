"""Noise-prediction networks behind one factory.

Every model is called as ``model(x_t, t)``: x_t float32 (B, C, H, W) images or (B, D) points, t a
LongTensor (B,) of timesteps in 0..T-1 (index 0 the least noisy step). It returns a tensor shaped
like x_t, unbounded (the predicted noise by default) and knows nothing of the noise schedule.

    model = build_model("unet-mnist", dropout=0.0, seed=0)
    config = model_config_dict(model)      # {"preset": "unet-mnist", "in_channels": 1, ...}, JSON-able
    same = build_model_from_dict(config)   # same architecture; load the weights into it

Each model keeps its frozen config dataclass as ``model.config`` and its preset name as ``model.preset``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from ddpm.catalog import MODEL_PRESETS
from ddpm.models.embeddings import SinusoidalEmbedding, sinusoidal_embedding
from ddpm.models.mlp import ResidualMLP, ResidualMLPConfig, ToyMLP, ToyMLPConfig
from ddpm.models.unet import SmallUNet, SmallUNetConfig, UNet, UNetConfig

__all__ = [
    "PRESETS", "build_model", "build_model_from_dict", "model_config_dict", "preset_config", "model_from_config",
    "unwrap_model", "use_channels_last",
    "ToyMLP", "ToyMLPConfig", "ResidualMLP", "ResidualMLPConfig", "SmallUNet", "SmallUNetConfig",
    "UNet", "UNetConfig", "SinusoidalEmbedding", "sinusoidal_embedding",
]

ModelConfig = ToyMLPConfig | ResidualMLPConfig | SmallUNetConfig | UNetConfig

# config class -> the module it configures
_ARCHITECTURES: dict[type, type[nn.Module]] = {
    ToyMLPConfig: ToyMLP,
    ResidualMLPConfig: ResidualMLP,
    SmallUNetConfig: SmallUNet,
    UNetConfig: UNet,
}


@dataclasses.dataclass(frozen=True)
class _Preset:
    description: str  # one line, for `ddpm presets`
    config_class: type  # the config dataclass (and so the architecture)
    defaults: Mapping[str, Any]  # values that differ from the config class's own defaults


_PRESETS: dict[str, _Preset] = {
    "mlp-toy": _Preset(
        MODEL_PRESETS["mlp-toy"],
        ToyMLPConfig, {}),
    "mlp-2d": _Preset(
        MODEL_PRESETS["mlp-2d"],
        ResidualMLPConfig, {}),
    "unet-small": _Preset(
        MODEL_PRESETS["unet-small"],
        SmallUNetConfig, {}),
    "unet": _Preset(
        MODEL_PRESETS["unet"],
        UNetConfig, {}),
    "unet-cifar10": _Preset(
        MODEL_PRESETS["unet-cifar10"],
        UNetConfig,
        dict(in_channels=3, image_size=32, ch=128, channel_mult=(1, 2, 2, 2), num_res_blocks=2,
             attention_levels=(1,), dropout=0.1, num_groups=32)),
    "unet-mnist": _Preset(
        MODEL_PRESETS["unet-mnist"],
        UNetConfig,
        dict(in_channels=1, image_size=28, ch=32, channel_mult=(1, 2, 2), num_res_blocks=1,
             attention_levels=(2,), dropout=0.1, num_groups=8)),
}

# Where a U-Net puts attention is one choice, stated by level or in pixels: an override of either field
# replaces the preset's choice rather than adding to it, so {"attention_resolutions": [14]} means attention
# at 14 only. That is also what config.json files written before attention_levels existed say (they hold
# attention_resolutions alone), and they must rebuild the network they were trained with.
_ATTENTION_FIELDS = frozenset({"attention_levels", "attention_resolutions"})

PRESETS: Mapping[str, str] = MappingProxyType({name: p.description for name, p in sorted(_PRESETS.items())})
"""Preset name -> one-line description (read-only)."""


def preset_config(preset: str, **overrides: Any) -> ModelConfig:
    """The validated config of ``preset`` with ``overrides`` applied; no model is built.

    A U-Net override of attention_levels or attention_resolutions replaces the preset's attention
    placement (the other field starts empty; see _ATTENTION_FIELDS). Raises ValueError for an
    unknown preset, an unknown override or a bad value, saying what was given and what is allowed.
    """
    if preset not in _PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from: {', '.join(PRESETS)}")
    spec = _PRESETS[preset]
    allowed = [f.name for f in dataclasses.fields(spec.config_class)]
    unknown = sorted(set(overrides) - set(allowed))
    if unknown:
        raise ValueError(f"unknown option{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} "
                         f"for preset {preset!r}; allowed: {', '.join(allowed)}")
    defaults = dict(spec.defaults)
    if spec.config_class is UNetConfig and not _ATTENTION_FIELDS.isdisjoint(overrides):
        defaults.update(attention_levels=(), attention_resolutions=())
    try:
        return spec.config_class(**{**defaults, **overrides})
    except ValueError as error:
        raise ValueError(f"preset {preset!r}: {error}") from None


def model_from_config(config: ModelConfig, preset: str | None = None) -> nn.Module:
    """Build the module a config describes; ``preset`` (default: the architecture's base preset)
    is recorded as ``model.preset`` for ``model_config_dict``."""
    if type(config) not in _ARCHITECTURES:
        raise ValueError(f"not a model config: {type(config).__name__}; "
                         f"allowed: {', '.join(c.__name__ for c in _ARCHITECTURES)}")
    model = _ARCHITECTURES[type(config)](config)
    if preset is not None:
        model.preset = preset
    return model


def build_model(preset: str, *, seed: int | None = None, device: torch.device | str | None = None,
                **overrides: Any) -> nn.Module:
    """Build the network of a named preset (see ``PRESETS``), with any config field overridden.

    seed: if given, the initial weights are drawn from ``torch.manual_seed(seed)`` inside a forked
        RNG, so the caller's global RNG state is left untouched; otherwise from the global RNG.
    device: where the parameters live. Weights are always initialised on the CPU and then moved, so
        a seed gives the same weights on every device; "meta" builds shapes only (to count parameters).
    overrides: config fields, e.g. ``build_model("unet", ch=32, channel_mult=(1, 2))``; lists are
        accepted for tuples (as they come back from JSON).
    """
    config = preset_config(preset, **overrides)
    if device is not None and torch.device(device).type == "meta":
        with torch.device("meta"):
            return model_from_config(config, preset)
    if seed is None:
        model = model_from_config(config, preset)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = model_from_config(config, preset)
    return model if device is None else model.to(device)


def model_config_dict(model: nn.Module) -> dict[str, Any]:
    """A plain JSON-able dict that rebuilds ``model``'s architecture with ``build_model_from_dict``.

    {"preset": name, **every config field}, tuples as lists. Every field is written out, so later
    changes to a preset's defaults do not change a saved model; the fields added later (num_classes and those
    where implementations differ) only when they are not at their defaults. Accepts a model wrapped by
    torch.compile or DistributedDataParallel.
    """
    model = unwrap_model(model)
    if not dataclasses.is_dataclass(getattr(model, "config", None)) or type(model.config) not in _ARCHITECTURES:
        raise ValueError(f"{type(model).__name__} is not a ddpm.models network (no model config on it)")
    fields = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(model.config).items()}
    for name, default in _LATER_FIELDS.items():  # at their defaults, a network is described as it was before them
        if name in fields and fields[name] == default:
            del fields[name]
    return {"preset": model.preset, **fields}


# Fields added after runs were first saved, written only when they differ from these values: a network
# that does not use them has the config.json it had before they existed.
_LATER_FIELDS = {"num_classes": 0, "norm_eps": 1e-5, "time_freq_shift": 0.0, "downsample_padding": 1,
                 "attention_head_dim": None}


def build_model_from_dict(config: Mapping[str, Any], *, seed: int | None = None,
                          device: torch.device | str | None = None) -> nn.Module:
    """Rebuild a model from ``model_config_dict``'s output (e.g. read back from config.json).

    A U-Net dict from before attention_levels existed (attention_resolutions alone) rebuilds the
    network it described: attention at those resolutions only (see preset_config)."""
    if "preset" not in config:
        raise ValueError(f"a model config dict needs a 'preset' key; got keys: {', '.join(config) or '(none)'}")
    fields = {k: v for k, v in config.items() if k != "preset"}
    return build_model(config["preset"], seed=seed, device=device, **fields)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The network inside a torch.compile or DistributedDataParallel wrapper (or the model itself)."""
    # torch.compile keeps the original as _orig_mod; DistributedDataParallel as module.
    while True:
        if isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        else:
            return model


def use_channels_last(model: nn.Module) -> nn.Module:
    """Store a U-Net's weights channels-last (NHWC), in place; other networks are left as they are.

    Convolutions then run in the layout oneDNN (CPU) and cuDNN's tensor-core kernels (GPU) work in,
    without a conversion before and after each one: a first convolution with channels-last weights
    returns channels-last activations, and every later layer keeps them so. Inputs need no change.
    Outputs equal those of the default layout up to float rounding (tests/test_models.py).
    """
    if isinstance(unwrap_model(model), (UNet, SmallUNet)):
        model.to(memory_format=torch.channels_last)
    return model
