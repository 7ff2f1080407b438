"""Building what a run trains or samples with, from its Config or from what it saved: the device,
the noise schedule, the network and the data. Training, ``ddpm.load``, the command line and
evaluation all build through here, so a run is rebuilt the way it was built.

    device = resolve_device("auto")
    schedule = build_schedule(config)
    dataset, heldout, notes = load_training_data(config)
    model = build_model_for(config, dataset.kind, dataset.sample_shape, seed=0)
    saved = load_saved("runs/mnist")        # config, both networks, schedule, data shape, step (on the CPU)
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from ddpm import checkpoint as ckpt
from ddpm import distributed
from ddpm.config import Config, config_from_dict
from ddpm.data import DATASETS, Dataset, load_dataset
from ddpm.data.folder import IMAGE_SUFFIXES
from ddpm.models import build_model, build_model_from_dict, preset_config, use_channels_last
from ddpm.models.mlp import ResidualMLPConfig
from ddpm.resources import ResourceError, check_fits
from ddpm.schedule import NoiseSchedule
from ddpm.validation import SettingError

__all__ = ["resolve_device", "build_schedule", "build_model_for", "load_training_data", "wants_channels_last",
           "Saved", "load_saved"]


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
        raise SettingError(setting, name, "use cpu, cuda, cuda:N or auto") from None
    if device.type not in ("cpu", "cuda"):  # e.g. meta, which holds no values
        raise SettingError(setting, name, "use cpu, cuda, cuda:N or auto")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SettingError(setting, name, "CUDA is not available here; use cpu or auto")
    return device


def build_schedule(config: Config) -> NoiseSchedule:
    d = config.diffusion
    # About 30 tables of T float64 or float32 numbers while they are made.
    check_fits(f"the noise schedule's tables (T = {d.num_steps})", 30 * 8.0 * d.num_steps,
               "change diffusion.num_steps")
    return NoiseSchedule(d.schedule, d.num_steps, beta_start=d.beta_start, beta_end=d.beta_end)


def build_model_for(config: Config, dataset_kind: str, sample_shape: tuple[int, ...], *,
                    seed: int | None = None, num_classes: int = 0) -> nn.Module:
    """The network of ``config.model`` sized for the data (channels, image size) and for T, and, for a
    conditional run (``config.model.conditional``), for the data's ``num_classes``."""
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
    if config.model.conditional:
        fill["num_classes"] = num_classes
    overrides = dict(config.model.overrides)
    for key, value in fill.items():
        if key in overrides and overrides[key] != value:
            raise ValueError(f"model.overrides sets {key} = {overrides[key]!r}, but the data and schedule "
                             f"need {key} = {value!r}")
    if config.model.dropout is not None:
        if "dropout" not in fields:
            raise ValueError(f"model {preset!r} has no dropout; leave --dropout unset")
        fill["dropout"] = config.model.dropout
    settings = {**overrides, **fill}
    setting = "model.preset or model.overrides" + (" (or diffusion.num_steps: the network keeps a row per "
                                                    "timestep)" if "num_steps" in fields else "")
    check_model_fits(build_model(preset, device="meta", **settings), TRAINING_COPIES, setting, config.train.device)
    return build_model(preset, seed=seed, **settings)


# A training run keeps 5 float32 copies of the weights' size (weights, gradients, EMA, AdamW's two
# moments); a loaded run 2 (weights and EMA). Activations come on top: this only refuses what
# clearly cannot fit.
TRAINING_COPIES, LOADED_COPIES = 5, 2


def check_model_fits(model: nn.Module, copies: int, setting: str, device: str = "cpu") -> None:
    """Refuse, in one line naming ``setting``, a network (built on the meta device: shapes only) whose
    ``copies`` float32 copies exceed the memory of ``device``."""
    count = sum(p.numel() for p in model.parameters())
    check_fits(f"the model ({count:,} parameters, {copies} copies)", 4.0 * count * copies, f"change {setting}",
               "cpu" if device == "auto" else device)


def load_training_data(config: Config) -> tuple[Dataset, Dataset | None, list[str]]:
    """The training set, a held-out set (or None) and notes for the user.

    Built-in sets (MNIST and CIFAR-10 by name included) hold out from their test split; a path (a
    folder, an array file, MNIST files given by path) holds out a random tenth (at most
    ``data.heldout`` examples) of its own examples. A conditional run's data must have class labels.
    """
    d = config.data
    common = dict(image_size=d.image_size, channels=d.channels, seed=config.train.seed, data_dir=d.data_dir)
    dataset = load_dataset(d.source, n=d.num_examples, **common)
    notes = list(dataset.notes)
    if dataset.kind == "image" and d.source not in DATASETS and (d.image_size is None or d.channels is None):
        c, h, w = dataset.sample_shape
        notes.append(f"training on {d.source} at {c}x{h}x{w}, its own "
                     + " and ".join(w for w, v in (("size", d.image_size), ("channels", d.channels)) if v is None)
                     + " (set --image-size / --channels to choose)")
    if len(dataset) == 0:
        raise ValueError(f"the data {d.source!r} holds no examples")
    if config.model.conditional:
        _check_labelled(dataset, d.source)
    if d.hflip and dataset.kind != "image":
        raise ValueError("data.hflip flips images; the data is points")
    if d.heldout == 0:
        return dataset, None, notes
    if d.source in DATASETS:  # every built-in set has a test split
        heldout = load_dataset(d.source, n=d.heldout, split="test", **common)
        return dataset, heldout, notes
    count = min(d.heldout, len(dataset) // 10)
    if count == 0:
        notes.append(f"{len(dataset)} examples are too few to hold any out; no held-out loss")
        return dataset, None, notes
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(config.train.seed))
    keep, out = order[count:].sort().values, order[:count].sort().values
    return dataset.subset(keep), dataset.subset(out), notes


def _check_labelled(dataset: Dataset, source: str) -> None:
    """Refuse, in one line, a conditional run on data without class labels (or with only one class)."""
    if dataset.labels is None:
        path = Path(source).expanduser()
        loose = ([p for p in sorted(path.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
                 if source not in DATASETS and path.is_dir() else [])
        hint = (f"an image folder is labelled when every image lies in a subfolder named after its class "
                f"({source}/CLASS/IMAGE), and {loose[0].name} does not" if loose else
                "MNIST, CIFAR-10, an image folder with one subfolder per class and an .npz with a 'labels' array "
                "have them")
        raise SettingError("model.conditional", True, f"the data {source!r} has no class labels; {hint}")
    if len(dataset.classes or ()) < 2:
        raise SettingError("model.conditional", True, f"the data {source!r} has one class only "
                                                      f"({', '.join(dataset.classes or ())}); it needs two or more")


def training_precision(config: Config, device: torch.device) -> str:
    """``train.precision`` as training on ``device`` runs it. "auto" is bf16 on a CPU with bf16
    instructions, where it makes the mnist preset's step about 1.5x faster (docs/results.md, "Quality
    per compute"), and fp32 elsewhere: on CPUs without them bf16 is emulated and slower, and bf16 on a
    GPU has not been measured here."""
    if config.train.precision != "auto":
        return config.train.precision
    return "bf16" if device.type == "cpu" and cpu_has_bf16() else "fp32"


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX-BF16)."""
    capabilities = torch.cpu.get_capabilities()
    return bool(capabilities.get("avx512_bf16") or capabilities.get("amx_bf16"))


def wants_channels_last(config: Config, device: torch.device) -> bool:
    """Whether training lays the U-Nets out channels-last: ``train.channels_last``, except for bf16 on
    a CPU, where torch 2.13's channels-last GroupNorm in bf16 is about 10x slower than the default
    layout's and outweighs the faster convolutions (docs/performance.md)."""
    return config.train.channels_last and not (device.type == "cpu" and training_precision(config, device) == "bf16")


class Saved(NamedTuple):
    """A saved run's pieces, rebuilt on the CPU from its config.json and safetensors files."""

    config: Config
    model: nn.Module  # the raw weights
    ema_model: nn.Module  # their moving average
    schedule: NoiseSchedule
    kind: str  # "image" or "points"
    sample_shape: tuple[int, ...]  # (C, H, W) or (D,)
    step: int  # training steps behind these weights
    checkpoint: Path
    classes: tuple[str, ...] | None  # a conditional run's class names (label i is classes[i]); else None


def load_saved(path: str | Path) -> Saved:
    """A run directory (its latest checkpoint) or one checkpoint folder, rebuilt on the CPU. Reads only
    JSON and safetensors: nothing pickled is ever executed.

    A run that is training may replace and prune its checkpoints while they are read: a checkpoint
    that vanishes under the reader is read again from what ``latest`` names then."""
    for attempt in range(_READ_ATTEMPTS):
        named = _latest_name(path)
        try:
            return _load_checkpoint(ckpt.find_run_files(path))
        except ckpt.CheckpointError:
            moved = named is not None and (_latest_name(path) != named
                                           or not (Path(path) / "checkpoints" / named).is_dir())
            if not moved or attempt == _READ_ATTEMPTS - 1:
                raise
            time.sleep(0.02 * (attempt + 1))  # the writer moved on: read what latest names now
    raise AssertionError("unreachable")


def _latest_name(path: str | Path) -> str | None:
    """What a run directory's checkpoints/latest names now (None for a checkpoint folder, or none yet)."""
    try:
        return (Path(path) / "checkpoints" / "latest").read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError, TypeError):
        return None


_READ_ATTEMPTS = 10


def _load_checkpoint(checkpoint: Path) -> Saved:
    # One consistent snapshot, read before anything is built (the optimiser's state is not needed here).
    files = ckpt.read_checkpoint(checkpoint, ("config.json", "model.safetensors", "ema.safetensors", "state.json"))
    where = checkpoint / "config.json"
    metadata = ckpt.read_run_config(where, files["config.json"])
    config = config_from_dict(metadata["config"], where=str(where))
    kind, sample_shape = metadata["data"]["kind"], tuple(metadata["data"]["sample_shape"])
    try:
        check_model_fits(build_model_from_dict(metadata["model"], device="meta"), LOADED_COPIES,
                         f"the 'model' of {where}")
        model = build_model_from_dict(metadata["model"])
        ema_model = build_model_from_dict(metadata["model"])
    except ResourceError:
        raise
    except ValueError as error:
        raise ckpt.CheckpointError(f"{where}: cannot rebuild the model ({error})") from None
    ckpt.load_weights(model, checkpoint / "model.safetensors", "model weights", files["model.safetensors"])
    ckpt.load_weights(ema_model, checkpoint / "ema.safetensors", "EMA weights", files["ema.safetensors"])
    if config.train.channels_last:  # sampling runs in fp32, where channels-last is the faster layout
        use_channels_last(model)
        use_channels_last(ema_model)
    state = ckpt.check_state(ckpt.read_json(checkpoint / "state.json", "training state", files["state.json"]),
                             checkpoint / "state.json")
    classes = metadata["data"].get("classes")
    return Saved(config, model.eval(), ema_model.eval().requires_grad_(False), build_schedule(config), kind,
                 sample_shape, state["step"], checkpoint, tuple(classes) if classes is not None else None)
