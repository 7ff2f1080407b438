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
import functools
import json
import math
import tomllib
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ddpm.catalog import is_generated
from ddpm.validation import (
    SEED_LIMIT, SettingError, check_choice, check_fields, check_seed, check_value, choices_of, duration_seconds,
    options_of,
)

__all__ = [
    "Config", "ModelConfig", "DiffusionConfig", "DataConfig", "TrainConfig", "SampleConfig",
    "TRAINING_PRESETS", "DEFAULT_PRESET", "build_config", "config_to_dict", "config_from_dict",
    "read_config_file", "flag_fields", "sample_flag_fields", "FlagField", "resumable_fields", "check_seed",
    "SEED_LIMIT",
]


def _field(default: Any, help: str, *, flag: str | None = None, resumable: bool = False,
           used_by: tuple[str, ...] | None = None, train_only: bool = False, **bounds: float) -> Any:
    """A dataclass field with its help line and what the checks and the command line read from it:
    flag: its `ddpm train` flag when not --field-name; resumable: a resumed run may change it (it
    decides when to stop and what to write, not what is computed); used_by: the samplers that read it
    (a sampling option); train_only: a [sample] field that is not a sampling option (no `ddpm sample`
    flag); bounds: minimum / maximum (inclusive), above / below (exclusive), checked by check_fields."""
    metadata = {"help": help, "resumable": resumable, "train_only": train_only, **bounds}
    metadata |= ({"flag": flag} if flag else {}) | ({"used_by": used_by} if used_by else {})
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class ModelConfig:
    """Which network predicts the noise; the data shape and T are filled in from the other sections."""

    preset: str = _field("unet-small", "model preset (see `ddpm presets`)", flag="model")
    dropout: float | None = _field(None, "dropout inside residual blocks; None keeps the preset's",
                                   minimum=0.0, below=1.0)
    overrides: dict = _field({}, "other model config fields, e.g. {\"ch\": 64} (JSON on the command line; added to "
                                 "the preset's own)",
                             flag="model-overrides")
    conditional: bool = _field(False, "condition the network on the data's class labels (MNIST, CIFAR-10, a folder "
                                      "with a subfolder per class, an .npz with labels), for --class and --guidance")

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass(frozen=True)
class DiffusionConfig:
    """The forward process and what the network is trained to predict."""

    schedule: Literal["linear", "cosine", "sigmoid"] = _field("linear", "beta schedule")
    num_steps: int = _field(1000, "T, the number of diffusion steps", minimum=1)
    beta_start: float = _field(1e-4, "first beta of the linear schedule")
    beta_end: float = _field(0.02, "last beta of the linear schedule")
    prediction: Literal["eps", "x0", "v"] = _field("eps", "what the network predicts")
    weighting: Literal["none", "min_snr", "edm"] = _field(
        "none", "loss weighting: the paper's simple loss, Min-SNR-5, or EDM's (its log-normal density of noise "
                "levels and its weight of the denoising error)")

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass(frozen=True)
class DataConfig:
    """Where the training data comes from and its shape."""

    source: str = _field("square", "a built-in dataset (see `ddpm datasets`) or a path to images or arrays",
                         flag="data")
    image_size: int | None = _field(None, "H = W of the images; None keeps the source's own", minimum=1)
    channels: Literal[1, 3] | None = _field(None, "1 (grayscale) or 3 (RGB); None keeps the source's own")
    num_examples: int | None = _field(None, "use this many examples (generated sets: how many to draw)", minimum=1)
    hflip: bool = _field(False, "random horizontal flips of images")
    heldout: int = _field(512, "examples held out for the held-out loss (from the test split where there is one)",
                          minimum=0)
    data_dir: str | None = _field(None, "where the MNIST / CIFAR-10 files are, or should be downloaded to",
                                  resumable=True)

    def __post_init__(self) -> None:
        check_fields(self)
        if not self.source.strip():
            raise SettingError("source", self.source, "name a built-in dataset (`ddpm datasets`) or a path")


@dataclass(frozen=True)
class TrainConfig:
    """The Algorithm-1 loop: optimiser, schedule of the learning rate, EMA, precision, bookkeeping."""

    steps: int = _field(3000, "optimiser steps to train for", minimum=1, resumable=True)
    batch_size: int = _field(128, "global batch size (all processes together)", minimum=1)
    # grad_accum, like the number of processes, changes only the order in which gradients are added.
    grad_accum: int = _field(1, "split each batch into this many sequential micro-batches", minimum=1,
                             resumable=True)
    lr: float = _field(1e-4, "AdamW learning rate", above=0.0, below=math.inf)  # inf is no learning rate
    warmup: int = _field(0, "steps of linear learning-rate warm-up from 0", minimum=0)
    lr_decay: Literal["constant", "cosine", "linear"] = _field(
        "constant", "after the warm-up: keep lr (as the paper), or decay it towards 0 at the end of train.steps "
                    "along a half cosine or a line")
    time_budget: str | None = _field(
        None, "train for this wall-clock time (\"90s\", \"20m\", \"1.5h\"): the step time is measured over the "
              "first steps and train.steps is fixed from it (and saved), so that the lr decay ends on time")
    weight_decay: float = _field(0.0, "AdamW weight decay", minimum=0.0)
    grad_clip: float | None = _field(1.0, "clip the gradient norm to this; None: no clipping", above=0.0)
    ema_decay: float = _field(0.999, "decay of the exponential moving average of the weights", minimum=0.0,
                              below=1.0)
    ema_warmup: bool = _field(True, "use min(decay, (1 + n) / (10 + n)) so early EMA weights are not stale")
    label_dropout: float = _field(0.1, "conditional runs: the probability that a label is replaced by 'no class', "
                                       "so one network learns the unconditional noise too (for --guidance)",
                                  minimum=0.0, maximum=1.0)
    precision: Literal["fp32", "bf16", "auto"] = _field(
        "fp32", "bf16 runs the model under bf16 autocast; auto: bf16 on a CPU with bf16 instructions "
                "(AVX512-BF16 or AMX), fp32 elsewhere")
    compile: bool = _field(False, "torch.compile the model", resumable=True)
    channels_last: bool = _field(True, "lay U-Nets out channels-last (faster; same up to rounding; not bf16 on CPU)",
                                 resumable=True)
    fused_optimizer: bool = _field(True, "AdamW's fused kernel (fewer passes over the weights; equal up to rounding)",
                                   resumable=True)
    seed: int = _field(0, "seed of weights, data order, timesteps and noise")
    device: str = _field("auto", "cpu, cuda, cuda:N or auto", resumable=True)
    log_every: int = _field(50, "write metrics.jsonl every this many steps", minimum=1, resumable=True)
    eval_every: int = _field(500, "held-out loss every this many steps (0: never)", minimum=0, resumable=True)
    checkpoint_every: int = _field(1000, "checkpoint every this many steps (and at the end)", minimum=1,
                                   resumable=True)
    keep_checkpoints: int = _field(3, "how many recent checkpoints to keep", minimum=1, resumable=True)
    sample_every: int = _field(1000, "save a sample grid every this many steps (0: only at the end)", minimum=0,
                               resumable=True)
    eval_metric: Literal["auto", "fid-mnist", "energy", "square", "gradient"] | None = _field(
        None, "log sample quality during training: auto (the data's own: fid-mnist for MNIST, energy for points, "
              "...) or a metric's name; None: off", resumable=True)
    eval_metric_every: int = _field(1000, "measure --eval-metric every this many steps (and at the end)", minimum=1,
                                    resumable=True)
    eval_metric_num: int = _field(200, "samples per --eval-metric measurement, drawn with the run's [sample] options",
                                  minimum=2, resumable=True)
    tensorboard: bool = _field(True, "also write TensorBoard event files (needs the tensorboard package)",
                               resumable=True)
    wandb: bool = _field(False, "log to Weights & Biases (WANDB_MODE=offline works)", resumable=True)

    def __post_init__(self) -> None:
        check_fields(self)
        check_seed(self.seed, "seed")
        if self.time_budget is not None:
            duration_seconds("time_budget", self.time_budget)
        if self.batch_size % self.grad_accum:
            raise SettingError("batch_size", self.batch_size, f"it must be divisible by grad_accum = {self.grad_accum}")


@dataclass(frozen=True)
class SampleConfig:
    """How samples are drawn: the one carrier of sampling options. It is a run's [sample] section (the
    grids drawn during training and the defaults of `ddpm sample` and `ddpm eval`), the flags of those
    two commands, and what ``ddpm.sample`` checks its arguments with. A field with ``used_by`` is read by
    those samplers only; any other sampler refuses a value other than its default."""

    # The default walk is the best at its cost in the MNIST table (docs/results.md): Heun on the trailing
    # grid, 10 calls (9 used), FID-MNIST 45 against DDIM-50's 75 at 1000 samples.
    sampler: Literal["ddpm", "ddim", "euler", "heun", "ipndm", "dpm++2m", "dpm++3m"] = _field(
        "heun", "ddpm (Algorithm 2), ddim (eq. 12) or an ODE solver (docs/sampling.md)", resumable=True)
    steps: int | None = _field(None, "network calls the walk may make (heun: 2 a step); None: the sampler's own "
                                     "(T for ddpm and ddim, 10 for the ODE solvers)", flag="sample-steps",
                               minimum=1, resumable=True)
    eta: float = _field(0.0, "DDIM noise: 0 deterministic, 1 like DDPM", used_by=("ddim",), minimum=0.0,
                        maximum=1.0, resumable=True)
    variance: Literal["fixed_small", "fixed_large"] = _field(
        "fixed_small", "sigma_t^2 of DDPM's reverse steps: beta tilde_t or beta_t", used_by=("ddpm",), resumable=True)
    spacing: Literal["uniform", "leading", "trailing", "quadratic", "logsnr", "karras"] | None = _field(
        None, "the timestep grid a shorter walk visits; None: the sampler's own", resumable=True)
    clip: bool = _field(True, "clip the predicted x0 to [-1, 1] (images only)", resumable=True)
    threshold: float | None = _field(None, "dynamic thresholding: clip x0 at this quantile of |x0| (e.g. 0.995) "
                                     "and rescale into [-1, 1]; replaces clip (images only)", above=0.0, maximum=1.0,
                                     resumable=True)
    # 1.5 measured best on the conditional mnist preset's run (docs/results.md): 98.1% of samples the
    # asked digit and FID-MNIST 20.1, against 90.3% and 19.0 at w = 1 and 99.5% and 42.9 at w = 2.
    guidance: float = _field(1.5, "classifier-free guidance w of a conditional run: eps_uncond + w (eps_cond - "
                                  "eps_uncond); 0 unconditional, 1 plainly conditional, more: closer to the class",
                             minimum=0.0, below=math.inf, resumable=True)
    num_samples: int = _field(16, "images in each sample grid drawn during training", minimum=1, resumable=True,
                              train_only=True)

    def __post_init__(self) -> None:
        check_fields(self)
        for f in dataclasses.fields(self):
            used_by = f.metadata.get("used_by")
            if used_by and self.sampler not in used_by and getattr(self, f.name) != f.default:
                raise SettingError(f.name, getattr(self, f.name),
                                   f"it applies to sampler {' or '.join(used_by)} only, not {self.sampler}")

    def for_sampler(self, sampler: str) -> SampleConfig:
        """These options for ``sampler``: the same when it is this one's; for another, the options that
        belong to a walk (steps, the grid and those only this sampler reads) go back to their defaults."""
        if sampler == self.sampler:
            return self
        check_choice("sampler", sampler, choices_of(_SAMPLE_HINTS["sampler"]))
        reset = {f.name: f.default for f in dataclasses.fields(self)
                 if f.name in ("steps", "spacing") or "used_by" in f.metadata}
        return dataclasses.replace(self, sampler=sampler, **reset)

    def unbounded(self) -> SampleConfig:
        """These options for data without a bounded range (points): no clipping, no thresholding."""
        return dataclasses.replace(self, clip=False, threshold=None)

    def replace(self, **asked: Any) -> SampleConfig:
        """These options with those in ``asked`` that are not None (as flags and keyword arguments come),
        switching sampler first (``for_sampler``); checked like any SampleConfig."""
        base = self.for_sampler(asked["sampler"]) if asked.get("sampler") is not None else self
        return dataclasses.replace(base, **{k: v for k, v in asked.items() if v is not None and k != "sampler"})


_SAMPLE_HINTS = typing.get_type_hints(SampleConfig)


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
        steps, num_steps = self.sample.steps, self.diffusion.num_steps
        if steps is not None and steps > num_steps:
            raise SettingError("sample.steps", steps, f"it must be in 1..{num_steps} (diffusion.num_steps)")


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
         # Points: DDPM on all T steps. With the exact noise predictor on a 2-D mixture, the best ODE solver
         # at 10 calls is twice as far from the data law as DDPM-1000, and only one solver-grid pair of 30
         # matches it at 20 (docs/sampling.md); an MLP's 1000 calls cost seconds.
         "sample": {"sampler": "ddpm", "num_samples": 2000, "clip": False}}),
    "mnist": (
        "MNIST digits 1x28x28, the small U-Net at width 24 (0.6M) without attention or dropout, batch 64, lr 2e-3 "
        "decayed to 0 "
        "(linearly), Min-SNR-5, bf16 where the CPU has it: the best of the 20-minute CPU ablation, 4000 steps "
        "(--time-budget 20m fits another machine)",
        # docs/results.md, "Quality per compute": at a 4-minute budget each of lr 2e-3, no dropout and Min-SNR-5
        # beat the earlier recipe (lr 5e-4 constant, dropout 0.1, the simple loss), and together more (FID-MNIST
        # 239 against 478); a cosine schedule, v prediction and EDM's weighting each made it worse. At 20
        # minutes, bf16 (on a CPU with AVX512-BF16) and then no attention took the steps from 2037 to 4140
        # and FID-MNIST from 48.8 to 31.0; a linear decay then beat the cosine on two seeds (30.6 and 36.0
        # against 38.2 and 48.6), and width 24 (0.60M parameters, against 32's 1.06M) beat width 32 on two
        # seeds (27.5 and 33.2 against 30.6 and 36.0), taking about 1.4 times the steps. From width 24, no
        # change beat it on both FID-MNIST and the confident share at 20 minutes: dropout, two residual
        # blocks a level, batch 128, EDM's weighting, the cosine beta schedule.
        {"model": {"preset": "unet-mnist", "dropout": 0.0, "overrides": {"attention_levels": [], "ch": 24}},
         "diffusion": {"weighting": "min_snr"},
         "data": {"source": "mnist", "heldout": 1000},
         "train": {"steps": 4000, "batch_size": 64, "lr": 2e-3, "warmup": 200, "lr_decay": "linear",
                   "ema_decay": 0.9995, "precision": "auto", "checkpoint_every": 500, "sample_every": 500,
                   "eval_every": 500}}),
    "cifar10": (
        "the paper's CIFAR-10 recipe: 35.7M U-Net, lr 2e-4, warm-up 5000, batch 128, dropout 0.1, EMA 0.9999, flips, 800k steps",
        {"model": {"preset": "unet-cifar10"},
         "data": {"source": "cifar10", "hflip": True, "heldout": 1000},
         "train": {"steps": 800_000, "batch_size": 128, "lr": 2e-4, "warmup": 5000, "ema_decay": 0.9999,
                   "ema_warmup": False, "checkpoint_every": 5000, "sample_every": 10_000},
         "sample": {"num_samples": 64}}),
}
DEFAULT_PRESET = "square-fast"


def build_config(preset: str = DEFAULT_PRESET, *layers: Mapping[str, Any]) -> Config:
    """The config of a training preset with ``layers`` (nested dicts, later ones winning) on top."""
    if preset not in TRAINING_PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from: {', '.join(TRAINING_PRESETS)}")
    merged: dict[str, Any] = {"preset": preset}
    for layer in layers:
        for name in SECTIONS:
            if name in layer and not isinstance(layer[name], Mapping):  # or it would replace the whole section
                raise SettingError(f"[{name}]", layer[name], "a section is a table of fields")
    layers = tuple(map(_current_names, layers))
    for layer in (TRAINING_PRESETS[preset][1], *layers):
        merged = _merge(merged, layer)
    return config_from_dict(_without_stale_preset_settings(merged, TRAINING_PRESETS[preset][1], layers))


def _without_stale_preset_settings(merged: dict[str, Any], preset: Mapping[str, Any],
                                   layers: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Settings a preset made for one of its choices stay behind when a layer makes another choice,
    unless the layer sets them too: the model overrides are for the preset's own model, and the
    example count is how many examples to draw of a generated set (a file, a folder or MNIST /
    CIFAR-10 is used whole)."""
    def asked(section: str, name: str) -> bool:
        return any(name in _section(layer, section) for layer in layers)

    model, data = merged.get("model"), merged.get("data")
    if isinstance(model, Mapping) and model.get("preset") != _section(preset, "model").get("preset"):
        own = functools.reduce(_merge, (_section(layer, "model") for layer in layers), {})  # the layers' alone
        merged["model"] = {**model, "overrides": own.get("overrides", {})}
    if (isinstance(data, Mapping) and not asked("data", "num_examples")
            and not is_generated(str(data.get("source", DataConfig.source)))):
        merged["data"] = {**data, "num_examples": None}
    if isinstance(data, Mapping) and data.get("source") != _section(preset, "data").get("source", DataConfig.source):
        # Another source than the preset's: its size, channels and held-out count were chosen for the
        # preset's own data (the default preset's 8x8 gray square), so the new data's own apply.
        names = PRESET_DATA_SHAPE if not is_generated(str(data.get("source"))) else ("image_size", "channels")
        merged["data"] = {**merged["data"], **{name: DATA_DEFAULTS[name] for name in names
                                                if not asked("data", name)}}
    return merged


PRESET_DATA_SHAPE = ("image_size", "channels", "heldout")  # a preset's settings for its own data only
DATA_DEFAULTS = {f.name: f.default for f in dataclasses.fields(DataConfig)}


def _section(layer: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    """A layer's section ``name``, or nothing (a malformed one is config_from_dict's to refuse)."""
    section = layer.get(name)
    return section if isinstance(section, Mapping) else {}


def _merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``update``'s settings put in; sections and the model overrides merge key by key (a
    layer's {"ch": 48} keeps the preset's other overrides)."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping) and key in (*SECTIONS, "overrides"):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def config_to_dict(config: Config) -> dict[str, Any]:
    """A JSON-able nested dict of every field (so later default changes never alter a saved run), except
    the fields a run does not use: those only conditional runs read, for an unconditional run, and
    those added later, at their defaults. A run that uses none of them writes the config.json it
    wrote before they existed."""
    out = dataclasses.asdict(config)
    unused = [*(CONDITIONAL_ONLY if not config.model.conditional else ()),
              *(key for key, default in LATER_FIELDS.items() if out[key[0]][key[1]] == default)]
    for section, name in unused:
        del out[section][name]
    return out


CONDITIONAL_ONLY = (("model", "conditional"), ("train", "label_dropout"), ("sample", "guidance"))
LATER_FIELDS = {("train", "lr_decay"): "constant", ("train", "time_budget"): None}  # (section, name): default


# Keys that earlier versions wrote under another name: (section, old) -> new.
_RENAMED = {("sample", "sample_steps"): "steps"}


def config_from_dict(data: Mapping[str, Any], *, where: str = "config") -> Config:
    """Rebuild a :class:`Config` from nested dicts, checking every key and value (errors name ``where``
    and the field, e.g. "config.json: sample.eta = 2 is not allowed; ...")."""
    if not isinstance(data, Mapping):
        raise ValueError(f"{where}: expected a table of sections, got {type(data).__name__}")
    unknown = sorted(set(data) - {"preset", *SECTIONS}, key=str)
    if unknown:
        raise ValueError(f"{where}: unknown key {unknown[0]!r}; allowed: preset, {', '.join(SECTIONS)}")
    sections = {}
    data = _current_names(data)
    for name, cls in SECTIONS.items():
        values = data.get(name, {})
        if not isinstance(values, Mapping):
            raise ValueError(f"{where}: [{name}] must be a table of fields, got {values!r}")
        allowed = [f.name for f in dataclasses.fields(cls)]
        for key in values:
            if key not in allowed:
                raise ValueError(f"{where}: unknown key {name}.{key}; allowed in [{name}]: {', '.join(allowed)}")
        try:
            sections[name] = cls(**values)
        except SettingError as error:
            raise _in_file(error.renamed(f"{name}.{error.name}"), where) from None
    preset = data.get("preset", DEFAULT_PRESET)
    if preset not in TRAINING_PRESETS:
        raise ValueError(f"{where}: unknown preset {preset!r}; choose from: {', '.join(TRAINING_PRESETS)}")
    try:
        return Config(preset=preset, **sections)
    except SettingError as error:
        raise _in_file(error, where) from None


def _current_names(layer: Mapping[str, Any]) -> dict[str, Any]:
    """``layer`` with the keys earlier versions wrote renamed (what is not a table is left as it is)."""
    out = dict(layer)
    for (section, old), new in _RENAMED.items():
        values = out.get(section)
        if isinstance(values, Mapping) and old in values:
            out[section] = {(new if key == old else key): value for key, value in values.items()}
    return out


def _in_file(error: SettingError, where: str) -> ValueError:
    """The error as read from ``where`` (not said for a config built from presets and flags)."""
    return error if where == "config" else ValueError(f"{where}: {error}")


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML (.toml) or JSON (.json) config file into nested dicts (checked when applied)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {str(path)!r} does not exist")
    if path.suffix not in (".toml", ".json"):
        raise ValueError(f"config file {str(path)!r}: use a .toml or .json file")
    try:
        text = path.read_text(encoding="utf-8")
        layer = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError, RecursionError) as error:
        raise ValueError(f"config file {str(path)!r} is not valid {path.suffix[1:].upper()}: {error}") from None
    if not isinstance(layer, dict):
        raise ValueError(f"config file {str(path)!r} holds a {type(layer).__name__}; it must be a table of "
                         f"[section] fields, e.g. {{\"train\": {{\"steps\": 100}}}}")
    return layer


def resumable_fields() -> set[str]:
    """The fields ("train.steps", ...) a resumed run may change: those marked resumable."""
    return {f"{section}.{f.name}" for section, cls in SECTIONS.items() for f in dataclasses.fields(cls)
            if f.metadata["resumable"]}


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

    @property
    def choices(self) -> list[str] | None:
        """The allowed values of a Literal field, as the command line spells them."""
        choices = choices_of(self.annotation)
        return None if choices is None else [str(c) for c in choices]

    def parse(self, text: str) -> Any:
        """The value of the flag's text, checked against the field's type."""
        return check_value(self.flag, _parse_text(text, self.annotation, self.flag), self.annotation)


def flag_fields() -> list[FlagField]:
    """Every config field as a `ddpm train` flag, in section order."""
    return [_flag(section, f, f.metadata.get("flag", f.name)) for section, cls in SECTIONS.items()
            for f in dataclasses.fields(cls)]


def sample_flag_fields() -> list[FlagField]:
    """The sampling options as flags of `ddpm sample` and `ddpm eval` (--sampler, --steps, --eta, ...)."""
    return [_flag("sample", f, f.name) for f in dataclasses.fields(SampleConfig) if not f.metadata["train_only"]]


def _flag(section: str, f: dataclasses.Field, name: str) -> FlagField:
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    return FlagField("--" + name.replace("_", "-"), section, f.name, _field_type(SECTIONS[section], f.name),
                     default, f.metadata["help"])


def _field_type(cls: type, name: str) -> Any:
    return typing.get_type_hints(cls)[name]


def _parse_text(text: str, annotation: Any, flag: str) -> Any:
    options = options_of(annotation)
    lowered = text.strip().lower()
    if type(None) in options and lowered in ("none", "null"):
        return None
    for option in options:
        if typing.get_origin(option) is Literal:
            for value in typing.get_args(option):
                if str(value) == text.strip():
                    return value
        elif option is bool:
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
    return text  # str, and what fits no option: checked by the caller
