"""Typed configuration of a training run, and the named training presets.

A run is described by one :class:`Config`, made of one frozen dataclass per concern. Every field has
a default and a help line (its ``metadata["help"]``); the command line's flags are derived from these
fields (``--batch-size`` sets ``train.batch_size``), so nothing is written out twice. Values come, in
increasing priority, from the dataclass defaults, a training preset, a TOML/JSON file, then flags.

    config = build_config("mnist", {"train": {"steps": 2000}})
    config.train.batch_size       # 64, the mnist preset's
    config_to_dict(config)        # JSON-able; config_from_dict(...) reads it back, checking every key
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import tomllib
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

__all__ = [
    "Config", "ModelConfig", "DiffusionConfig", "DataConfig", "TrainConfig", "SampleConfig",
    "TRAINING_PRESETS", "DEFAULT_PRESET", "build_config", "config_to_dict", "config_from_dict",
    "read_config_file", "flag_fields", "FlagField", "check_seed", "SEED_LIMIT",
]


def _field(default: Any, help: str, *, flag: str | None = None) -> Any:
    """A dataclass field with its help line (and its command-line flag when not --field-name)."""
    metadata = {"help": help} | ({"flag": flag} if flag else {})
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class ModelConfig:
    """Which network predicts the noise; the data shape and T are filled in from the other sections."""

    preset: str = _field("unet-small", "model preset (see `ddpm presets`)", flag="model")
    dropout: float | None = _field(None, "dropout inside residual blocks; None keeps the preset's")
    overrides: dict = _field({}, "other model config fields, e.g. {\"ch\": 64} (JSON on the command line)",
                             flag="model-overrides")


@dataclass(frozen=True)
class DiffusionConfig:
    """The forward process and what the network is trained to predict."""

    schedule: Literal["linear", "cosine", "sigmoid"] = _field("linear", "beta schedule")
    num_steps: int = _field(1000, "T, the number of diffusion steps")
    beta_start: float = _field(1e-4, "first beta of the linear schedule")
    beta_end: float = _field(0.02, "last beta of the linear schedule")
    prediction: Literal["eps", "x0", "v"] = _field("eps", "what the network predicts")
    weighting: Literal["none", "min_snr"] = _field("none", "loss weighting: the paper's simple loss, or Min-SNR-5")


@dataclass(frozen=True)
class DataConfig:
    """Where the training data comes from and its shape."""

    source: str = _field("square", "a built-in dataset (see `ddpm datasets`) or a path to images or arrays",
                         flag="data")
    image_size: int | None = _field(None, "H = W of the images; None keeps the source's own")
    channels: int | None = _field(None, "1 (grayscale) or 3 (RGB); None keeps the source's own")
    num_examples: int | None = _field(None, "use this many examples (generated sets: how many to draw)")
    hflip: bool = _field(False, "random horizontal flips of images")
    heldout: int = _field(512, "examples held out for the held-out loss (from the test split where there is one)")
    data_dir: str | None = _field(None, "where the MNIST / CIFAR-10 files are, or should be downloaded to")


@dataclass(frozen=True)
class TrainConfig:
    """The Algorithm-1 loop: optimiser, schedule of the learning rate, EMA, precision, bookkeeping."""

    steps: int = _field(3000, "optimiser steps to train for")
    batch_size: int = _field(128, "global batch size (all processes together)")
    grad_accum: int = _field(1, "split each batch into this many sequential micro-batches")
    lr: float = _field(1e-4, "AdamW learning rate")
    warmup: int = _field(0, "steps of linear learning-rate warm-up from 0")
    weight_decay: float = _field(0.0, "AdamW weight decay")
    grad_clip: float | None = _field(1.0, "clip the gradient norm to this; None: no clipping")
    ema_decay: float = _field(0.999, "decay of the exponential moving average of the weights")
    ema_warmup: bool = _field(True, "use min(decay, (1 + n) / (10 + n)) so early EMA weights are not stale")
    precision: Literal["fp32", "bf16"] = _field("fp32", "bf16 runs the model under bf16 autocast")
    compile: bool = _field(False, "torch.compile the model")
    channels_last: bool = _field(True, "lay U-Nets out channels-last (faster; same up to rounding; not bf16 on CPU)")
    fused_optimizer: bool = _field(True, "AdamW's fused kernel (fewer passes over the weights; equal up to rounding)")
    seed: int = _field(0, "seed of weights, data order, timesteps and noise")
    device: str = _field("auto", "cpu, cuda, cuda:N or auto")
    log_every: int = _field(50, "write metrics.jsonl every this many steps")
    eval_every: int = _field(500, "held-out loss every this many steps (0: never)")
    checkpoint_every: int = _field(1000, "checkpoint every this many steps (and at the end)")
    keep_checkpoints: int = _field(3, "how many recent checkpoints to keep")
    sample_every: int = _field(1000, "save a sample grid every this many steps (0: only at the end)")
    tensorboard: bool = _field(True, "also write TensorBoard event files (needs the tensorboard package)")
    wandb: bool = _field(False, "log to Weights & Biases (WANDB_MODE=offline works)")


@dataclass(frozen=True)
class SampleConfig:
    """How sample grids are drawn during training, and the defaults of `ddpm sample`."""

    sampler: Literal["ddpm", "ddim"] = _field("ddpm", "ddpm (Algorithm 2) or ddim (eq. 12)")
    sample_steps: int | None = _field(None, "timesteps to visit; None: all T")
    eta: float = _field(0.0, "DDIM noise: 0 deterministic, 1 like DDPM")
    clip: bool = _field(True, "clip the predicted x0 to [-1, 1] (images only)")
    num_samples: int = _field(16, "images in each sample grid")


@dataclass(frozen=True)
class Config:
    """Everything needed to rebuild the model, schedule, data and training of a run."""

    preset: str = "square-fast"
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    def __post_init__(self) -> None:
        _check_values(self)


SECTIONS: dict[str, type] = {
    "model": ModelConfig, "diffusion": DiffusionConfig, "data": DataConfig, "train": TrainConfig,
    "sample": SampleConfig,
}

# --- training presets: what differs from the defaults above ---------------------------------------

_Preset = tuple[str, dict[str, dict[str, Any]]]

TRAINING_PRESETS: dict[str, _Preset] = {
    "square": (
        "the tutorials' fix: overfit one 8x8 grayscale square, T=1000, batch 128, lr 1e-4, small U-Net, 10k steps",
        {"model": {"preset": "unet-small"},
         "data": {"source": "square", "image_size": 8, "channels": 1, "heldout": 1},
         "train": {"steps": 10_000, "batch_size": 128, "lr": 1e-4, "sample_every": 2000, "eval_every": 1000,
                   "checkpoint_every": 2000}}),
    "square-fast": (
        "the 8x8 square in under a minute: as square, but lr 1e-3 with 100 warm-up steps, 3000 steps",
        {"model": {"preset": "unet-small"},
         "data": {"source": "square", "image_size": 8, "channels": 1, "heldout": 1},
         "train": {"steps": 3000, "batch_size": 128, "lr": 1e-3, "warmup": 100, "sample_every": 1000,
                   "eval_every": 500, "checkpoint_every": 1000}}),
    "gradients": (
        "the toy tutorial: 3x5x5 colour gradients, T=100 (betas scaled by 1000/T), Linear-ReLU-Linear (d 128), lr 1e-3",
        # The tutorial keeps betas 1e-4..0.02 with few steps, which leaves alpha_bar_T = 0.36: x_T is far
        # from the N(0, I) that sampling starts from. Scaling both ends by 1000/T gives alpha_bar_T ~ 4e-5.
        {"model": {"preset": "mlp-toy", "overrides": {"hidden_dim": 128}},
         "diffusion": {"num_steps": 100, "beta_start": 1e-3, "beta_end": 0.2},
         "data": {"source": "gradients", "image_size": 5, "num_examples": 50_000, "heldout": 1000},
         "train": {"steps": 4000, "batch_size": 128, "lr": 1e-3, "ema_decay": 0.99, "sample_every": 1000}}),
    "toy2d": (
        "2-D points (8 Gaussians by default; --data moons|swissroll|checkerboard), residual MLP, T=1000",
        {"model": {"preset": "mlp-2d"},
         "data": {"source": "8gaussians", "num_examples": 100_000, "heldout": 2000},
         "train": {"steps": 4000, "batch_size": 512, "lr": 1e-3, "ema_decay": 0.995, "sample_every": 2000},
         "sample": {"num_samples": 2000, "clip": False}}),
    "mnist": (
        "MNIST digits 1x28x28, the small paper-style U-Net (1.1M), batch 64, lr 5e-4, 3000 steps (about an hour on 2 CPU cores)",
        {"model": {"preset": "unet-mnist"},
         "data": {"source": "mnist", "heldout": 1000},
         "train": {"steps": 3000, "batch_size": 64, "lr": 5e-4, "warmup": 200, "ema_decay": 0.9995,
                   "checkpoint_every": 500, "sample_every": 500, "eval_every": 500},
         "sample": {"sampler": "ddim", "sample_steps": 50}}),
    "cifar10": (
        "the paper's CIFAR-10 recipe: 35.7M U-Net, lr 2e-4, warm-up 5000, batch 128, dropout 0.1, EMA 0.9999, flips, 800k steps",
        {"model": {"preset": "unet-cifar10"},
         "data": {"source": "cifar10", "hflip": True, "heldout": 1000},
         "train": {"steps": 800_000, "batch_size": 128, "lr": 2e-4, "warmup": 5000, "ema_decay": 0.9999,
                   "ema_warmup": False, "checkpoint_every": 5000, "sample_every": 10_000},
         "sample": {"sampler": "ddim", "sample_steps": 100, "num_samples": 64}}),
}
DEFAULT_PRESET = "square-fast"
# torch's generators take 64-bit seeds, and a run derives seeds + 1, + 2 (and the test split's) from its own.
SEED_LIMIT = 2**62


def check_seed(value: Any, name: str) -> int:
    """``value`` as an int seed torch can take with room for the seeds derived from it, else a
    ValueError that names ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} = {value!r} is not an integer")
    if not abs(value) < SEED_LIMIT:
        raise ValueError(f"{name} = {value!r} is out of range; a seed lies between -2**62 and 2**62")
    return int(value)


def build_config(preset: str = DEFAULT_PRESET, *layers: Mapping[str, Any]) -> Config:
    """The config of a training preset with ``layers`` (nested dicts, later ones winning) on top."""
    if preset not in TRAINING_PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from: {', '.join(TRAINING_PRESETS)}")
    merged: dict[str, Any] = {"preset": preset}
    for layer in (TRAINING_PRESETS[preset][1], *layers):
        merged = _merge(merged, layer)
    return config_from_dict(_without_stale_preset_settings(merged, TRAINING_PRESETS[preset][1], layers))


def _without_stale_preset_settings(merged: dict[str, Any], preset: Mapping[str, Any],
                                   layers: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Settings a preset made for one of its choices stay behind when a layer makes another choice,
    unless the layer sets them too: the model overrides are for the preset's own model, and the
    example count is how many examples to draw of a generated set (a file, a folder or MNIST /
    CIFAR-10 is used whole)."""
    from ddpm.data.registry import is_generated

    def asked(section: str, name: str) -> bool:
        return any(name in _section(layer, section) for layer in layers)

    model, data = merged.get("model"), merged.get("data")
    if (isinstance(model, Mapping) and not asked("model", "overrides")
            and model.get("preset") != _section(preset, "model").get("preset")):
        merged["model"] = {**model, "overrides": {}}
    if (isinstance(data, Mapping) and not asked("data", "num_examples")
            and not is_generated(str(data.get("source", DataConfig.source)))):
        merged["data"] = {**data, "num_examples": None}
    return merged


def _section(layer: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    """A layer's section ``name``, or nothing (a malformed one is config_from_dict's to refuse)."""
    section = layer.get(name)
    return section if isinstance(section, Mapping) else {}


def _merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping) and key in SECTIONS:
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def config_to_dict(config: Config) -> dict[str, Any]:
    """A JSON-able nested dict of every field (so later default changes never alter a saved run)."""
    return dataclasses.asdict(config)


def config_from_dict(data: Mapping[str, Any], *, where: str = "config") -> Config:
    """Rebuild a :class:`Config` from nested dicts, checking every key and value type."""
    if not isinstance(data, Mapping):
        raise ValueError(f"{where}: expected a table of sections, got {type(data).__name__}")
    unknown = sorted(set(data) - {"preset", *SECTIONS})
    if unknown:
        raise ValueError(f"{where}: unknown key {unknown[0]!r}; allowed: preset, {', '.join(SECTIONS)}")
    sections = {}
    for name, cls in SECTIONS.items():
        values = data.get(name, {})
        if not isinstance(values, Mapping):
            raise ValueError(f"{where}: [{name}] must be a table of fields, got {values!r}")
        allowed = {f.name: f for f in dataclasses.fields(cls)}
        for key, value in values.items():
            if key not in allowed:
                raise ValueError(f"{where}: unknown key {name}.{key}; allowed in [{name}]: {', '.join(allowed)}")
            _check_type(f"{name}.{key}", value, _field_type(cls, key))
        sections[name] = cls(**values)
    preset = data.get("preset", DEFAULT_PRESET)
    if preset not in TRAINING_PRESETS:
        raise ValueError(f"{where}: unknown preset {preset!r}; choose from: {', '.join(TRAINING_PRESETS)}")
    return Config(preset=preset, **sections)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML (.toml) or JSON (.json) config file into nested dicts (checked when applied)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {str(path)!r} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".toml":
            return tomllib.loads(text)
        if path.suffix == ".json":
            return json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"config file {str(path)!r} is not valid {path.suffix[1:].upper()}: {error}") from None
    raise ValueError(f"config file {str(path)!r}: use a .toml or .json file")


# --- types and values -----------------------------------------------------------------------------

def _field_type(cls: type, name: str) -> Any:
    return typing.get_type_hints(cls)[name]


def _check_type(name: str, value: Any, annotation: Any) -> None:
    """Raise a ValueError unless ``value`` fits ``annotation`` (int, float, bool, str, None, Literal, dict)."""
    if _fits(value, annotation):
        return
    raise ValueError(f"{name} = {value!r} is not allowed; expected {_describe(annotation)}")


def _options(annotation: Any) -> tuple[Any, ...]:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return typing.get_args(annotation)
    return (annotation,)


def _fits(value: Any, annotation: Any) -> bool:
    for option in _options(annotation):
        if option is type(None) and value is None:
            return True
        if typing.get_origin(option) is Literal and value in typing.get_args(option):
            return True
        if option is bool and isinstance(value, bool):
            return True
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return True
        if option is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return True
        if option in (str, dict) and isinstance(value, option):
            return True
    return False


def _describe(annotation: Any) -> str:
    words = []
    for option in _options(annotation):
        if option is type(None):
            words.append("none")
        elif typing.get_origin(option) is Literal:
            words.append(" | ".join(repr(v) for v in typing.get_args(option)))
        else:
            words.append({int: "an integer", float: "a number", bool: "true or false", str: "a string",
                          dict: "a table"}[option])
    return " or ".join(words)


def _check_values(config: Config) -> None:
    """Values every run needs; the model and data checks come when they are built."""
    t, d, s = config.train, config.diffusion, config.sample
    positive = {"train.steps": t.steps, "train.batch_size": t.batch_size, "train.grad_accum": t.grad_accum,
                "diffusion.num_steps": d.num_steps, "train.log_every": t.log_every,
                "train.checkpoint_every": t.checkpoint_every, "train.keep_checkpoints": t.keep_checkpoints,
                "sample.num_samples": s.num_samples}
    for name, value in positive.items():
        if value < 1:
            raise ValueError(f"{name} = {value} is not allowed; it must be at least 1")
    for name, value in {"train.eval_every": t.eval_every, "train.sample_every": t.sample_every,
                        "train.warmup": t.warmup, "data.heldout": config.data.heldout}.items():
        if value < 0:
            raise ValueError(f"{name} = {value} is not allowed; it must be 0 or more")
    if t.batch_size % t.grad_accum:
        raise ValueError(f"train.batch_size = {t.batch_size} must be divisible by train.grad_accum = {t.grad_accum}")
    check_seed(t.seed, "train.seed")
    if not (t.lr > 0 and math.isfinite(t.lr)):
        raise ValueError(f"train.lr = {t.lr} is not allowed; it must be a positive number")
    if not 0.0 <= t.ema_decay < 1.0:
        raise ValueError(f"train.ema_decay = {t.ema_decay} is not allowed; it must be in [0, 1)")
    if t.grad_clip is not None and not t.grad_clip > 0:
        raise ValueError(f"train.grad_clip = {t.grad_clip} is not allowed; it must be positive or none")
    if t.weight_decay < 0:
        raise ValueError(f"train.weight_decay = {t.weight_decay} is not allowed; it must be 0 or more")
    if not 0.0 <= s.eta <= 1.0:
        raise ValueError(f"sample.eta = {s.eta} is not allowed; it must be in [0, 1]")
    if s.sampler == "ddpm" and s.eta != 0.0:
        raise ValueError(f"sample.eta = {s.eta} applies to sample.sampler = 'ddim' only (DDPM is DDIM with "
                         f"eta 1); add --sampler ddim, or leave eta at 0")
    if s.sample_steps is not None and not 1 <= s.sample_steps <= d.num_steps:
        raise ValueError(f"sample.sample_steps = {s.sample_steps} is not allowed; it must be in 1..{d.num_steps}")
    if config.data.image_size is not None and config.data.image_size < 1:
        raise ValueError(f"data.image_size = {config.data.image_size} is not allowed; it must be at least 1")
    if config.data.channels not in (None, 1, 3):
        raise ValueError(f"data.channels = {config.data.channels} is not allowed; choose 1 or 3")
    if config.data.num_examples is not None and config.data.num_examples < 1:
        raise ValueError(f"data.num_examples = {config.data.num_examples} is not allowed; it must be at least 1")
    if config.model.dropout is not None and not 0.0 <= config.model.dropout < 1.0:
        raise ValueError(f"model.dropout = {config.model.dropout} is not allowed; it must be in [0, 1)")


# --- command-line flags, derived from the fields --------------------------------------------------

@dataclass(frozen=True)
class FlagField:
    """One config field as a command-line flag."""

    flag: str  # e.g. "--batch-size"
    section: str  # e.g. "train"
    name: str  # e.g. "batch_size"
    annotation: Any
    default: Any
    help: str

    def parse(self, text: str) -> Any:
        """The value of the flag's text, checked against the field's type."""
        value = _parse_text(text, self.annotation, self.flag)
        _check_type(self.flag, value, self.annotation)
        return value


def flag_fields() -> list[FlagField]:
    """Every config field as a flag, in section order."""
    out = []
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            flag = "--" + f.metadata.get("flag", f.name.replace("_", "-"))
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            out.append(FlagField(flag, section, f.name, _field_type(cls, f.name), default, f.metadata["help"]))
    return out


def _parse_text(text: str, annotation: Any, flag: str) -> Any:
    options = _options(annotation)
    lowered = text.strip().lower()
    if type(None) in options and lowered in ("none", "null"):
        return None
    for option in options:
        if option is bool:
            if lowered in ("true", "yes", "1", "on"):
                return True
            if lowered in ("false", "no", "0", "off"):
                return False
        elif option is int:
            try:
                return int(text)
            except ValueError:
                pass
        elif option is float:
            try:
                return float(text)
            except ValueError:
                pass
        elif option is dict:
            try:
                value = json.loads(text)
            except json.JSONDecodeError:
                raise ValueError(f"{flag} {text!r} is not a JSON object like '{{\"ch\": 64}}'") from None
            return value
    return text  # str and Literal: checked by the caller
