"""Hugging Face diffusers folders (``UNet2DModel``, ``DDPMPipeline``, ``DDIMPipeline``) in and out, without
diffusers: the format is JSON plus safetensors.

    import_diffusers("ddpm-cifar10-32", "runs/cifar10-paper")    # a ddpm run: ddpm sample / eval / load
    export_diffusers(ddpm.load("runs/mnist"), "mnist-diffusers")  # DDPMPipeline.from_pretrained reads it

ddpm's U-Net reproduces UNet2DModel exactly for the configs it accepts (tests/test_interop.py compares
them on random weights): the two share one structure, and the settings where they differ are fields of
``UNetConfig`` (norm_eps, time_freq_shift, downsample_padding, attention_head_dim). diffusers' order of
the sinusoidal embedding's halves (flip_sin_to_cos) is a permutation of the first time layer's inputs,
and its separate q, k, v projections are ddpm's packed ``qkv``. What ddpm's U-Net cannot express is
refused in one line naming the config key and its value.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from ddpm import checkpoint as ckpt
from ddpm.models.unet import UNetConfig

__all__ = ["InteropError", "DiffusersFolder", "read_diffusers", "unet_config_from_diffusers", "weights_from_diffusers",
           "schedule_from_diffusers", "diffusers_unet_config", "weights_to_diffusers", "diffusers_scheduler_config"]

WEIGHTS = "diffusion_pytorch_model.safetensors"
LEGACY_WEIGHTS = "diffusion_pytorch_model.bin"

# UNet2DModel's defaults in diffusers 0.42.1: a key missing from a config.json means this value there.
UNET_DEFAULTS: dict[str, Any] = {
    "sample_size": None, "in_channels": 3, "out_channels": 3, "center_input_sample": False,
    "time_embedding_type": "positional", "time_embedding_dim": None, "freq_shift": 0, "flip_sin_to_cos": True,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"],
    "mid_block_type": "UNetMidBlock2D", "up_block_types": ["AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [224, 448, 672, 896], "layers_per_block": 2, "mid_block_scale_factor": 1,
    "downsample_padding": 1, "downsample_type": "conv", "upsample_type": "conv", "dropout": 0.0, "act_fn": "silu",
    "attention_head_dim": 8, "norm_num_groups": 32, "attn_norm_num_groups": None, "norm_eps": 1e-5,
    "resnet_time_scale_shift": "default", "add_attention": True, "class_embed_type": None, "num_class_embeds": None,
    "num_train_timesteps": None,
}
# Settings ddpm's U-Net has no counterpart for: each must have this value.
_FIXED = {"center_input_sample": False, "time_embedding_type": "positional", "time_embedding_dim": None,
          "mid_block_type": "UNetMidBlock2D", "mid_block_scale_factor": 1, "downsample_type": "conv",
          "upsample_type": "conv", "act_fn": "silu", "resnet_time_scale_shift": "default", "add_attention": True,
          "class_embed_type": None}
SCHEDULER_DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
    "trained_betas": None, "variance_type": "fixed_small", "clip_sample": True, "prediction_type": "epsilon",
    "thresholding": False, "dynamic_thresholding_ratio": 0.995, "clip_sample_range": 1.0, "sample_max_value": 1.0,
    "timestep_spacing": "leading", "steps_offset": 0, "rescale_betas_zero_snr": False,
}
_SCHEDULES = {"linear": "linear", "squaredcos_cap_v2": "cosine"}
_PREDICTIONS = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}
# ddpm's own name for its class table's last row ("no class"), so that a round trip keeps it.
_NO_CLASS_KEY = "_ddpm_no_class_row"


class InteropError(ValueError):
    """A folder or config that cannot be converted (one line for the user)."""


class DiffusersFolder(NamedTuple):
    """What a diffusers folder holds: the UNet's config (with diffusers' defaults filled in), its weights
    (float32, current key names), the scheduler's config (defaults filled in; None if there is none)."""

    unet_config: dict[str, Any]
    weights: dict[str, Tensor]
    scheduler: dict[str, Any] | None
    unet_dir: Path


def read_diffusers(path: str | Path) -> DiffusersFolder:
    """Read a pipeline folder (model_index.json, unet/, scheduler/) or a model folder (config.json and the
    weights at its root, a scheduler_config.json beside them or none). Weights come from the safetensors
    file, or from the legacy .bin by ``torch.load(weights_only=True)``: never pickled code."""
    root = Path(path)
    if not root.is_dir():
        raise InteropError(f"{root} is not a folder; give a diffusers pipeline or model folder")
    unet_dir = root / "unet" if (root / "model_index.json").is_file() or (root / "unet").is_dir() else root
    if (root / "model_index.json").is_file():
        index = _read_json(root / "model_index.json")
        unet = index.get("unet")
        if not (isinstance(unet, list) and unet[-1:] == ["UNet2DModel"]):
            raise InteropError(f"{root / 'model_index.json'}: 'unet' is {unet!r}; ddpm imports UNet2DModel pipelines "
                               f"(DDPMPipeline, DDIMPipeline)")
    config_path = unet_dir / "config.json"
    if not config_path.is_file():
        raise InteropError(f"{root} is not a diffusers folder: no {config_path.relative_to(root)} "
                           f"(a pipeline has model_index.json, unet/ and scheduler/; a model config.json and weights)")
    config = _read_json(config_path)
    if config.get("format") == "ddpm run":
        raise InteropError(f"{root} is a ddpm run directory, not a diffusers folder: ddpm sample and ddpm eval use it "
                           "as it is")
    name = config.get("_class_name")
    if name is None:
        raise InteropError(f"{config_path} has no _class_name: it is not a diffusers model config")
    if name != "UNet2DModel":
        raise InteropError(f"{config_path}: _class_name = {name!r}; ddpm imports UNet2DModel only")
    unet_config = {**UNET_DEFAULTS, **{k: v for k, v in config.items() if not k.startswith("_")},
                   **{k: v for k, v in config.items() if k == _NO_CLASS_KEY}}
    weights = _read_weights(unet_dir)
    scheduler = None
    for candidate in (root / "scheduler" / "scheduler_config.json", unet_dir / "scheduler_config.json"):
        if candidate.is_file():
            scheduler = {**SCHEDULER_DEFAULTS, **_read_json(candidate)}
            break
    return DiffusersFolder(unet_config, weights, scheduler, unet_dir)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as error:
        raise InteropError(f"cannot read {path}: {error}") from None
    if not isinstance(data, dict):
        raise InteropError(f"{path} holds a JSON {type(data).__name__}, not a table of settings")
    return data


def _read_weights(folder: Path) -> dict[str, Tensor]:
    if (folder / WEIGHTS).is_file():
        try:
            weights = load_file(folder / WEIGHTS)
        except Exception as error:  # safetensors raises its own error types for damaged files
            raise InteropError(f"cannot read {folder / WEIGHTS}: {error}") from None
    elif (folder / LEGACY_WEIGHTS).is_file():
        try:
            weights = torch.load(folder / LEGACY_WEIGHTS, map_location="cpu", weights_only=True)
        except Exception as error:  # weights_only refuses anything but tensors and plain containers
            raise InteropError(f"cannot read {folder / LEGACY_WEIGHTS} without running pickled code: {error}") from None
        if not isinstance(weights, dict) or not all(isinstance(v, Tensor) for v in weights.values()):
            raise InteropError(f"{folder / LEGACY_WEIGHTS} is not a state dict of tensors")
    else:
        raise InteropError(f"{folder} has no weights: expected {WEIGHTS} (or the legacy {LEGACY_WEIGHTS})")
    return {_current_name(k): v.float() for k, v in weights.items()}


def _current_name(key: str) -> str:
    """diffusers' attention weights before its Attention refactor: query/key/value/proj_attn."""
    for old, new in ((".query.", ".to_q."), (".key.", ".to_k."), (".value.", ".to_v."), (".proj_attn.", ".to_out.0.")):
        key = key.replace(old, new)
    return key


# --- the U-Net's config ---------------------------------------------------------------------------

def unet_config_from_diffusers(config: dict[str, Any], where: str = "config.json") -> UNetConfig:
    """The UNetConfig of the network a UNet2DModel config describes, or an InteropError naming the first
    key whose value ddpm's U-Net cannot express."""
    def refuse(key: str, why: str) -> InteropError:
        return InteropError(f"{where}: {key} = {json.dumps(config.get(key))} cannot be imported: {why}")

    for key, wanted in _FIXED.items():
        if config.get(key) != wanted:
            raise refuse(key, f"ddpm's U-Net has only {json.dumps(wanted)}")
    channels = config["block_out_channels"]
    if not (isinstance(channels, list) and channels and all(isinstance(c, int) and c > 0 for c in channels)):
        raise refuse("block_out_channels", "expected a list of positive channel counts")
    ch = channels[0]
    if any(c % ch for c in channels):
        raise refuse("block_out_channels", f"every level's channels must be a multiple of the first ({ch})")
    down, up = config["down_block_types"], config["up_block_types"]
    allowed_down, allowed_up = {"DownBlock2D": False, "AttnDownBlock2D": True}, {"UpBlock2D": False, "AttnUpBlock2D": True}
    for key, blocks, allowed in (("down_block_types", down, allowed_down), ("up_block_types", up, allowed_up)):
        if not isinstance(blocks, list) or len(blocks) != len(channels) or any(b not in allowed for b in blocks):
            raise refuse(key, f"expected one of {', '.join(allowed)} per level ({len(channels)} levels)")
    attention = [allowed_down[b] for b in down]
    if attention != [allowed_up[b] for b in reversed(up)]:
        raise refuse("up_block_types", "the decoder must have attention at the levels the encoder has it")
    groups = config["norm_num_groups"]
    if config.get("attn_norm_num_groups") not in (None, groups):
        raise refuse("attn_norm_num_groups", f"ddpm's attention uses the residual blocks' norm_num_groups ({groups})")
    size = config["sample_size"]
    size = size[0] if isinstance(size, list) and len(size) == 2 and size[0] == size[1] else size
    if not isinstance(size, int):
        raise refuse("sample_size", "expected the (square) image size")
    head_dim = config["attention_head_dim"]
    widths = {c for c, a in zip(channels, attention) if a} | {channels[-1]}
    if head_dim is not None and head_dim in widths and len(widths) == 1:
        head_dim = None  # one head of all the channels is the single-head attention
    num_classes = config["num_class_embeds"] or 0
    if num_classes and config.get(_NO_CLASS_KEY):
        num_classes -= 1  # a ddpm export: the last row is its "no class"
    try:
        return UNetConfig(
            in_channels=config["in_channels"], out_channels=config["out_channels"], image_size=size, ch=ch,
            channel_mult=tuple(c // ch for c in channels), num_res_blocks=config["layers_per_block"],
            attention_levels=tuple(i for i, a in enumerate(attention) if a), attention_resolutions=(),
            dropout=float(config["dropout"]), num_groups=groups, zero_init=False, num_classes=num_classes,
            norm_eps=float(config["norm_eps"]), time_freq_shift=float(config["freq_shift"]),
            downsample_padding=config["downsample_padding"], attention_head_dim=head_dim)
    except ValueError as error:
        raise InteropError(f"{where}: cannot be imported: {error}") from None


def diffusers_unet_config(config: UNetConfig) -> dict[str, Any]:
    """The UNet2DModel config.json of a ddpm U-Net, every key written (a missing key would mean diffusers'
    default, which differs from ddpm's for several)."""
    attention = [config.attention_at(level) for level in range(len(config.channel_mult))]
    return {
        "_class_name": "UNet2DModel", **UNET_DEFAULTS, **_FIXED,
        "sample_size": config.image_size, "in_channels": config.in_channels,
        "out_channels": config.out_channels or config.in_channels, "freq_shift": config.time_freq_shift,
        "flip_sin_to_cos": False, "down_block_types": ["AttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        "up_block_types": ["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)],
        "block_out_channels": [config.ch * m for m in config.channel_mult], "layers_per_block": config.num_res_blocks,
        "downsample_padding": config.downsample_padding, "dropout": config.dropout,
        "attention_head_dim": config.attention_head_dim, "norm_num_groups": config.num_groups,
        "norm_eps": config.norm_eps, "num_class_embeds": config.num_classes + 1 if config.num_classes else None,
        **({_NO_CLASS_KEY: True} if config.num_classes else {}),
    }


# --- the weights ----------------------------------------------------------------------------------

def _renames(config: UNetConfig) -> list[tuple[str, str]]:
    """(diffusers prefix, ddpm prefix) for every block, finest level first."""
    pairs = [("conv_in.", "input_conv."), ("time_embedding.linear_1.", "time_mlp.0."),
             ("time_embedding.linear_2.", "time_mlp.2."), ("conv_norm_out.", "output_norm."),
             ("conv_out.", "output_conv."), ("class_embedding.", "class_embed.table."),
             ("mid_block.resnets.0.", "mid_block1."), ("mid_block.resnets.1.", "mid_block2."),
             ("mid_block.attentions.0.", "mid_attn.")]
    levels = len(config.channel_mult)
    for i in range(levels):
        pairs += [(f"down_blocks.{i}.resnets.", f"down.{i}.res_blocks."),
                  (f"down_blocks.{i}.attentions.", f"down.{i}.attn_blocks."),
                  (f"down_blocks.{i}.downsamplers.0.", f"down.{i}.resample."),
                  (f"up_blocks.{i}.resnets.", f"up.{i}.res_blocks."),
                  (f"up_blocks.{i}.attentions.", f"up.{i}.attn_blocks."),
                  (f"up_blocks.{i}.upsamplers.0.", f"up.{i}.resample.")]
    return pairs


_INNER = [(".time_emb_proj.", ".temb_proj."), (".conv_shortcut.", ".skip."), (".group_norm.", ".norm."),
          (".to_out.0.", ".proj_out.")]


def weights_from_diffusers(weights: dict[str, Tensor], config: UNetConfig, flip_sin_to_cos: bool,
                           where: str = "weights") -> dict[str, Tensor]:
    """A UNet2DModel state dict (current key names) as the state dict of ddpm's UNet of ``config``."""
    out: dict[str, Tensor] = {}
    packed: dict[str, dict[str, Tensor]] = {}
    renames = _renames(config)
    for key, value in weights.items():
        name = next((ours + key[len(theirs):] for theirs, ours in renames if key.startswith(theirs)), None)
        if name is None:
            raise InteropError(f"{where}: tensor {key!r} has no place in ddpm's U-Net")
        name = "." + name
        for theirs, ours in _INNER:
            name = name.replace(theirs, ours)
        name = name[1:]
        for part in ("to_q", "to_k", "to_v"):
            if f".{part}." in name:
                block, kind = name.split(f".{part}.")
                packed.setdefault(f"{block}.qkv.{kind}", {})[part] = value
                break
        else:
            out[name] = value[:, :, None, None] if name.endswith("proj_out.weight") else value
    for name, parts in packed.items():
        if set(parts) != {"to_q", "to_k", "to_v"}:
            raise InteropError(f"{where}: attention {name.rsplit('.qkv', 1)[0]} lacks {', '.join(sorted({'to_q', 'to_k', 'to_v'} - set(parts)))}")
        stacked = torch.cat([parts["to_q"], parts["to_k"], parts["to_v"]])
        out[name] = stacked[:, :, None, None] if name.endswith("weight") else stacked
    if flip_sin_to_cos and "time_mlp.0.weight" in out:  # diffusers' [cos, sin] inputs are ddpm's [sin, cos]
        w, half = out["time_mlp.0.weight"], config.ch // 2
        out["time_mlp.0.weight"] = torch.cat([w[:, half:2 * half], w[:, :half], w[:, 2 * half:]], 1)
    if config.num_classes and out.get("class_embed.table.weight") is not None:
        table = out["class_embed.table.weight"]
        if table.shape[0] == config.num_classes:  # diffusers' table has no "no class" row: an untrained zero one
            out["class_embed.table.weight"] = torch.cat([table, torch.zeros_like(table[:1])])
    return out


def weights_to_diffusers(state: dict[str, Tensor], config: UNetConfig) -> dict[str, Tensor]:
    """ddpm's UNet state dict as UNet2DModel's (current key names, flip_sin_to_cos False)."""
    renames = _renames(config)
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        name = next(theirs + key[len(ours):] for theirs, ours in renames if key.startswith(ours))
        name = "." + name
        for theirs, ours in _INNER:
            name = name.replace(ours, theirs)
        name = name[1:]
        if ".qkv." in name:
            block, kind = name.split(".qkv.")
            flat = value.flatten(1) if kind == "weight" else value
            for part, chunk in zip(("to_q", "to_k", "to_v"), flat.chunk(3)):
                out[f"{block}.{part}.{kind}"] = chunk.contiguous()
        elif name.endswith("to_out.0.weight"):
            out[name] = value.flatten(1).contiguous()
        else:
            out[name] = value.contiguous()
    return out


def save_diffusers_weights(weights: dict[str, Tensor], folder: Path) -> None:
    save_file({k: v.detach().cpu().float().contiguous() for k, v in weights.items()}, folder / WEIGHTS,
              metadata={"format": "pt"})


# --- the scheduler --------------------------------------------------------------------------------

class Schedule(NamedTuple):
    """The [diffusion] and [sample] settings a scheduler config stands for."""

    diffusion: dict[str, Any]
    sample: dict[str, Any]


def schedule_from_diffusers(scheduler: dict[str, Any], where: str = "scheduler_config.json") -> Schedule:
    """ddpm's diffusion and sampling settings of a DDPMScheduler / DDIMScheduler config, or an InteropError
    naming the first key ddpm cannot follow."""
    def refuse(key: str, why: str) -> InteropError:
        return InteropError(f"{where}: {key} = {json.dumps(scheduler.get(key))} cannot be imported: {why}")

    if scheduler["beta_schedule"] not in _SCHEDULES:
        raise refuse("beta_schedule", f"ddpm has {', '.join(_SCHEDULES)}")
    if scheduler.get("trained_betas") is not None:
        raise refuse("trained_betas", "ddpm's schedules are linear, cosine or sigmoid by name")
    if scheduler["prediction_type"] not in _PREDICTIONS:
        raise refuse("prediction_type", f"ddpm has {', '.join(_PREDICTIONS)}")
    if scheduler.get("rescale_betas_zero_snr"):
        raise refuse("rescale_betas_zero_snr", "ddpm's schedules are not rescaled")
    if scheduler.get("thresholding"):
        raise refuse("thresholding", "use ddpm's --threshold when sampling instead")
    if scheduler.get("clip_sample") and scheduler.get("clip_sample_range", 1.0) != 1.0:
        raise refuse("clip_sample_range", "ddpm clips x0 to [-1, 1]")
    variance = scheduler.get("variance_type", "fixed_small")
    if variance not in ("fixed_small", "fixed_large"):
        raise refuse("variance_type", "ddpm has fixed_small and fixed_large")
    diffusion = {"schedule": _SCHEDULES[scheduler["beta_schedule"]], "num_steps": scheduler["num_train_timesteps"],
                 "prediction": _PREDICTIONS[scheduler["prediction_type"]]}
    if diffusion["schedule"] == "linear":
        diffusion |= {"beta_start": scheduler["beta_start"], "beta_end": scheduler["beta_end"]}
    # The pipeline's own walk: DDPM (with the scheduler's variance) for a DDPMScheduler, DDIM for a
    # DDIMScheduler, on all T steps; --sampler heun --steps 10 and the like from there.
    sample: dict[str, Any] = {"clip": bool(scheduler.get("clip_sample", True))}
    kind = scheduler.get("_class_name", "DDPMScheduler")
    if kind == "DDPMScheduler":
        sample |= {"sampler": "ddpm", "variance": variance}
    elif kind == "DDIMScheduler":
        sample |= {"sampler": "ddim"}
    return Schedule(diffusion, sample)


def diffusers_scheduler_config(diffusion: Any, sample: Any) -> dict[str, Any]:
    """The DDPMScheduler config of ddpm's [diffusion] and [sample] settings, or an InteropError."""
    schedules = {v: k for k, v in _SCHEDULES.items()}
    if diffusion.schedule not in schedules:
        raise InteropError(f"diffusion.schedule = {diffusion.schedule!r} cannot be exported: diffusers' schedulers "
                           f"name {', '.join(schedules)} (its 'sigmoid' is another schedule)")
    return {"_class_name": "DDPMScheduler", **SCHEDULER_DEFAULTS, "num_train_timesteps": diffusion.num_steps,
            "beta_start": diffusion.beta_start, "beta_end": diffusion.beta_end,
            "beta_schedule": schedules[diffusion.schedule],
            "prediction_type": {v: k for k, v in _PREDICTIONS.items()}[diffusion.prediction],
            "variance_type": sample.variance, "clip_sample": sample.clip}


# --- whole folders --------------------------------------------------------------------------------

DIFFUSERS_VERSION = "0.42.1"  # the version whose format this writes (and the tests read it with)


def import_diffusers(path: str | Path, out: str | Path, *, data: str | None = None,
                     data_dir: str | None = None) -> Path:
    """Write the diffusers folder at ``path`` as a ddpm run directory ``out`` (its only checkpoint, step 0,
    holds the imported weights as both the raw and the EMA weights). data, data_dir: the dataset the
    model was trained on, for ``ddpm eval`` (e.g. "cifar10"); default: none named."""
    from ddpm.config import DEFAULT_PRESET, config_from_dict
    from ddpm.models import model_from_config
    from ddpm.rundir import run_metadata

    path, out = Path(path), Path(out)
    _refuse_occupied(out)
    folder = read_diffusers(path)
    config = unet_config_from_diffusers(folder.unet_config, str(folder.unet_dir / "config.json"))
    if folder.scheduler is None:
        raise InteropError(f"{path} has no scheduler config (scheduler/scheduler_config.json or "
                           "scheduler_config.json): the noise schedule the model was trained with is unknown")
    schedule = schedule_from_diffusers(folder.scheduler)
    network = model_from_config(config, "unet").eval()
    weights = weights_from_diffusers(folder.weights, config, bool(folder.unet_config["flip_sin_to_cos"]),
                                     str(folder.unet_dir / WEIGHTS))
    missing, unexpected = network.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise InteropError(f"{folder.unet_dir / WEIGHTS}: " + (f"lacks {missing[0]!r} ({len(missing)} missing)"
                                                               if missing else f"has no place for {unexpected[0]!r}"))
    run_config = config_from_dict({
        "preset": DEFAULT_PRESET,
        "model": {"preset": "unet", "conditional": bool(config.num_classes)},
        "diffusion": schedule.diffusion,
        "data": {"source": data or f"imported from {path}", "data_dir": data_dir, "image_size": config.image_size,
                 "channels": config.in_channels if config.in_channels in (1, 3) else None},
        "sample": schedule.sample}, where=str(path))
    shape = (config.in_channels, config.image_size, config.image_size)
    classes = tuple(str(i) for i in range(config.num_classes)) or None
    metadata = run_metadata(run_config, network, "image", shape, f"imported from {path}", classes)
    out.mkdir(parents=True, exist_ok=True)
    ckpt.write_json(out / "config.json", metadata)
    ckpt.save_checkpoint(out, 0, model=network, ema_model=network, tensors={},
                         state={"step": 0, "imported_from": str(path)}, config=metadata, keep=1)
    return out


def export_diffusers(run: Any, out: str | Path, *, ema: bool = True) -> Path:
    """Write a ddpm run (``ddpm.load``'s Run) as a DDPMPipeline folder: model_index.json, unet/ (config.json,
    safetensors weights: the EMA weights unless ``ema`` is False) and scheduler/scheduler_config.json."""
    from ddpm.models import UNet, unwrap_model

    out = Path(out)
    network = unwrap_model(run.ema_model if ema else run.model)
    if not isinstance(network, UNet):
        raise InteropError(f"the run's network is {network.preset!r}, which diffusers' UNet2DModel cannot express; "
                           "runs of the paper's U-Net (unet, unet-mnist, unet-cifar10) can be exported")
    scheduler = diffusers_scheduler_config(run.config.diffusion, run.config.sample)
    _refuse_occupied(out)
    (out / "unet").mkdir(parents=True, exist_ok=True)
    (out / "scheduler").mkdir(exist_ok=True)
    version = {"_diffusers_version": DIFFUSERS_VERSION}
    ckpt.write_json(out / "model_index.json", {"_class_name": "DDPMPipeline", **version,
                                               "scheduler": ["diffusers", "DDPMScheduler"],
                                               "unet": ["diffusers", "UNet2DModel"]})
    config = diffusers_unet_config(network.config)
    ckpt.write_json(out / "unet" / "config.json", {"_class_name": config.pop("_class_name"), **version, **config})
    save_diffusers_weights(weights_to_diffusers(network.state_dict(), network.config), out / "unet")
    ckpt.write_json(out / "scheduler" / "scheduler_config.json",
                    {"_class_name": scheduler.pop("_class_name"), **version, **scheduler})
    return out


def _refuse_occupied(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InteropError(f"--out {out} exists and is not an empty folder; choose another (nothing was written)")
