"""The ``ddpm`` command: parses, calls the library, reports every error in one line.

    ddpm train [--preset NAME] [--data PATH] [--out RUN_DIR] [--steps N] ... [--resume] [--overwrite]
    ddpm sample RUN_DIR|CHECKPOINT [--num N] [--sampler ddpm|ddim] [--steps S] [--out FILE|DIR/|FILE.npz]
    ddpm eval RUN_DIR|CHECKPOINT [--metric bpd|fid|fid-mnist|energy|gradient|square] [--num N] [--json FILE]
    ddpm presets | ddpm datasets

Exit codes: 0 success, 1 training failed (non-finite loss) or an unexpected error, 2 bad input,
130/143 stopped by SIGINT/SIGTERM after writing a checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

__all__ = ["main"]

BAD_INPUT = 2


class UsageError(ValueError):
    """A command-line problem, reported in one line with exit code 2 as "PROG: error: MESSAGE"."""

    def __init__(self, message: str, prog: str = "ddpm"):
        super().__init__(message)
        self.prog = prog  # "ddpm", or the subcommand's "ddpm sample" for argparse's own errors


class _Parser(argparse.ArgumentParser):
    """argparse, but its errors are one line (no usage block) and exit 2."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message, self.prog)


# --- ddpm train -----------------------------------------------------------------------------------

def _add_train(commands: argparse._SubParsersAction) -> None:
    from ddpm.config import DEFAULT_PRESET, PRESET_DATA_SHAPE, TRAINING_PRESETS, flag_fields

    parser = commands.add_parser(
        "train", help="train a model (Algorithm 1) into a run directory",
        description="Train a noise-prediction network. Values come from the preset, then --config, then flags. "
                    f"The defaults shown are those of the default preset, {DEFAULT_PRESET}; every preset sets "
                    "its own (`ddpm presets`).",
        argument_default=argparse.SUPPRESS)
    parser.add_argument("--preset", choices=list(TRAINING_PRESETS),
                        help=f"training preset (default {DEFAULT_PRESET}); see `ddpm presets`")
    parser.add_argument("--config", metavar="FILE", help="a TOML or JSON file of [section] fields")
    parser.add_argument("--out", metavar="RUN_DIR", help="run directory (default: runs/PRESET, numbered if taken)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    parser.add_argument("--overwrite", action="store_true", help="replace the run already in --out")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    groups: dict[str, argparse._ArgumentGroup] = {}
    preset = TRAINING_PRESETS[DEFAULT_PRESET][1]
    for f in flag_fields():
        group = groups.setdefault(f.section, parser.add_argument_group(f"[{f.section}]"))
        default = preset.get(f.section, {}).get(f.name, f.default)
        text = f"default {default}"
        if f.section == "data" and f.name in PRESET_DATA_SHAPE and default != f.default:
            text = f"default {default} for the preset's own data, {f.default} for other --data"
        _add_flag(group, f, f"{f.section}.{f.name}", text, parse=False)


def _add_flag(group: argparse._ArgumentGroup, f: Any, dest: str, default_text: str, *, parse: bool) -> None:
    """A config field's flag: on/off for a bool, else a value (its choices in the help). With ``parse``
    argparse converts and checks the value; else it stays text (train parses it with its layers)."""
    help = f"{f.help} ({default_text}" + (f"; one of: {', '.join(f.choices)}" if f.choices else "") + ")"
    if f.annotation is bool:
        group.add_argument(f.flag, dest=dest, action=argparse.BooleanOptionalAction, help=help)
    else:
        group.add_argument(f.flag, dest=dest, metavar=f.name.upper(), help=help,
                           type=_checked(f.parse) if parse else str)


def _checked(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """``parse`` as an argparse type: its ValueError becomes argparse's one-line error."""
    def checked(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
    return checked


def _train(args: argparse.Namespace) -> int:
    from ddpm.config import DEFAULT_PRESET, build_config, flag_fields, read_config_file
    from ddpm.training import ProcessGroupFailed, TrainingStopped, train
    from ddpm.validation import SettingError

    given = vars(args)
    if given.get("resume") and "out" not in given:
        raise UsageError("--resume needs --out RUN_DIR: the run to continue")
    if given.get("resume") and given.get("overwrite"):
        raise UsageError("--resume and --overwrite contradict each other; give one")
    file_layer = read_config_file(given["config"]) if "config" in given else {}
    preset = given.get("preset", file_layer.get("preset", DEFAULT_PRESET))
    flags: dict[str, dict[str, Any]] = {}
    changed = set()
    for f in flag_fields():
        key = f"{f.section}.{f.name}"
        if key in given:
            value = given[key] if f.annotation is bool else f.parse(given[key])
            flags.setdefault(f.section, {})[f.name] = value
            changed.add(key)
    changed |= {f"{section}.{name}" for section, values in file_layer.items() if isinstance(values, dict)
                for name in values}
    if "preset" in given or "preset" in file_layer:
        changed.add("preset")
    if {"train.steps", "train.time_budget"} <= changed:
        raise UsageError("--steps and --time-budget both set how long to train; give one")
    try:
        config = build_config(preset, {k: v for k, v in file_layer.items() if k != "preset"}, flags)
        out = Path(given["out"]) if "out" in given else _fresh_run_dir(Path("runs") / preset)
        result = train(config, out, resume=given.get("resume", False), overwrite=given.get("overwrite", False),
                       changed=changed, progress=not given.get("quiet", False))
    except TrainingStopped as stop:
        if _is_main_process() or isinstance(stop, ProcessGroupFailed):  # a failure each survivor reports
            print(f"ddpm: {stop}", file=sys.stderr)
        return stop.exit_code
    except SettingError as error:
        raise _as_typed(error, flags, file_layer, given.get("config")) from None
    if _is_main_process():
        pictures = result.run_dir / "samples"
        taken = result.step - result.start_step
        if taken == 0:
            done = (f"the run was already at step {result.step} of {result.step}: nothing to train "
                    f"(give a larger --steps)")
        else:
            since = f" (steps {result.start_step} to {result.step})" if result.start_step else ""
            done = f"trained {taken} steps{since} in {result.seconds:.0f} s; last loss {result.loss:.4f}"
        print(f"{done}; checkpoint {result.checkpoint}" + (f"; samples in {pictures}" if pictures.is_dir() else ""))
    return 0


def _is_main_process() -> bool:
    """False in the processes torchrun starts besides rank 0: they stay quiet about what every process
    agrees on (the result, a stop, a bad setting), so the user reads each message once."""
    return os.environ.get("RANK", "0") == "0" or "MASTER_ADDR" not in os.environ  # as distributed.launched()


def _fresh_run_dir(base: Path) -> Path:
    """runs/PRESET, or runs/PRESET-2, -3, ... when it is taken: a default never reuses a run."""
    return _fresh_path(base, taken=lambda p: p.exists() and (not p.is_dir() or any(p.iterdir())))


# --- ddpm sample ----------------------------------------------------------------------------------

def _add_sample(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "sample", help="draw samples from a trained run",
        description="Sample from a run directory (its latest checkpoint) or a checkpoint folder, with EMA weights.")
    parser.add_argument("run", metavar="RUN_DIR|CHECKPOINT")
    parser.add_argument("--num", type=_whole_number("--num"), default=16,
                        help="how many samples (default 16); with --class all, how many of each class")
    parser.add_argument("--class", dest="class_", metavar="NAME|INDEX|all",
                        help="conditional runs: draw this class (a name or an index), or 'all': a grid with one row "
                             "per class (default: no class, the unconditional model)")
    _add_sampling_flags(parser)
    parser.add_argument("--batch-size", type=_whole_number("--batch-size"), default=256,
                        help="samples drawn at once (default 256)")
    parser.add_argument("--seed", type=_seed, default=0, help="seed of the starting noise (default 0)")
    parser.add_argument("--out", metavar="FILE|DIR/", default=None,
                        help="x.png: a grid; DIR/: one PNG per image; x.npz: arr_0, uint8 (N, H, W, C) "
                             "(float32 (N, D) for points). Default RUN_DIR/samples/sample-SEED.png")
    parser.add_argument("--trajectory", metavar="FILE.png|FILE.gif",
                        help="also save the denoising of the first images as a strip (.png) or animation (.gif)")
    parser.add_argument("--raw", action="store_true", help="use the raw weights instead of the EMA weights")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    parser.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=None,
                        help="replay the network as a CUDA graph (default: on for a CUDA device, where it "
                             "samples the same numbers 4-6x faster)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace --out if it exists (a folder: its numbered PNGs from an earlier run)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_sampling_flags(parser: argparse.ArgumentParser) -> None:
    """The sampling options (config.SampleConfig) as flags: --sampler, --steps, --eta, ..."""
    from ddpm.config import sample_flag_fields

    group = parser.add_argument_group(
        "sampling", "Each option defaults to the run's [sample] setting; another --sampler than the run's "
                    "starts from that sampler's defaults (T network calls, its own grid, eta 0).")
    for f in sample_flag_fields():
        _add_flag(group, f, f.name, "default: the run's", parse=True)


def _sample_options(args: argparse.Namespace, run: Any) -> Any:
    """The run's sampling options with the flags given on top (config.SampleConfig), errors naming the flag."""
    from ddpm.config import sample_flag_fields
    from ddpm.validation import SettingError

    flags = {f.name: f.flag for f in sample_flag_fields()}
    try:
        return run.sample_options(**{name: getattr(args, name) for name in flags})
    except SettingError as error:
        raise UsageError(str(error.renamed(flags.get(error.name, error.name)))) from None


def _as_typed(error: Any, flags: dict[str, dict[str, Any]], file_layer: dict[str, Any], file: str | None) -> Exception:
    """A config field's error named where the user wrote the value: as the flag ("--lr -1.0 is not
    allowed"), or in the config file ("c.toml: train.lr = -1.0 ..."); an on/off flag or a preset's value
    keeps the field's name."""
    from ddpm.config import flag_fields
    from ddpm.validation import SettingError

    typed = {f"{f.section}.{f.name}": f.flag for f in flag_fields()
             if f.name in flags.get(f.section, {}) and f.annotation is not bool}
    section, _, name = error.name.partition(".")
    if error.name in typed:
        return SettingError(typed[error.name], repr(error.value) if isinstance(error.value, str) else error.value,
                            error.rule)
    if file and isinstance(file_layer.get(section), dict) and name in file_layer[section]:
        return ValueError(f"config file {file!r}: {error}")
    return error


def _whole_number(flag: str) -> Callable[[str], int]:
    """An argparse type for a whole number >= 1 given as ``flag``."""
    from ddpm.validation import whole_number

    return _checked(lambda text: whole_number(flag, _integer(flag, text)))


def _seed(text: str) -> int:
    from ddpm.validation import check_seed

    return _checked(lambda text: check_seed(_integer("--seed", text), "--seed"))(text)


def _integer(flag: str, text: str) -> int:
    from ddpm.validation import SettingError

    try:
        return int(text)
    except ValueError:
        raise SettingError(flag, repr(text), "use a whole number") from None


_TRAJECTORY_IMAGES = 8  # rows of a trajectory picture (images); point clouds keep every point
_GIF_FRAMES = 60


def _sample(args: argparse.Namespace) -> int:
    import torch

    import ddpm
    from ddpm.build import resolve_device
    from ddpm.checkpoint import StorageError, describe_os_error

    run_path = Path(args.run)
    out = _sample_output(args, run_path)
    trajectory = Path(args.trajectory) if args.trajectory else None
    if trajectory is not None:
        if trajectory.suffix.lower() not in (".png", ".gif"):
            raise UsageError(f"--trajectory {trajectory}: use a .png (strip) or .gif (animation) file")
        if trajectory.resolve() == out.resolve():
            raise UsageError(f"--trajectory {trajectory} is also --out; give the two pictures different names")
        _refuse_existing(trajectory, args.overwrite, "--trajectory")
    run = ddpm.load(run_path, device=resolve_device(args.device, setting="--device"))
    options = _sample_options(args, run)
    asked, per_row = _asked_classes(args, run)
    if run.kind == "points" and _is_dir_target(args.out):
        raise UsageError("point samples cannot be written as one PNG per sample; use x.png (scatter) or x.npz")
    if run.kind == "points" and trajectory is not None and trajectory.suffix.lower() != ".png":
        raise UsageError(f"--trajectory {trajectory}: the trajectory of points is a .png of six scatter panels")
    if run.kind == "points" and run.sample_shape[0] == 1:  # no scatter for one coordinate: numbers only
        if trajectory is not None or (args.out is not None and out.suffix.lower() != ".npz"):
            raise UsageError("this run's points have one coordinate, which makes no picture; use --out x.npz")
        if args.out is None:
            out = _fresh_path(out.with_name(f"sample-{args.seed}.npz"))
    frames: list[torch.Tensor] = []
    labels: list[str] = []  # the noise level of each frame, for point-cloud panels
    keep = _TRAJECTORY_IMAGES if run.kind == "image" else None
    batches_seen = 0

    def record(step: ddpm.sampling.SamplerStep) -> None:
        # Keep the first batch's first images only: x_T, then every x_{t_prev}.
        nonlocal batches_seen
        batches_seen += step.index == 0
        if batches_seen == 1:
            if step.index == 0:
                frames.append(step.x_t[:keep].cpu())
                labels.append(f"x_T (t = {step.t})")
            frames.append(step.x_prev[:keep].cpu())
            labels.append(f"after t = {step.t}")

    num = args.num if asked is None else len(asked)
    samples = run.sample(num, labels=asked, options=options, ema=not args.raw, batch_size=args.batch_size,
                         seed=args.seed, progress=not args.quiet, callback=record if trajectory is not None else None,
                         cuda_graph=args.cuda_graph)
    try:
        _write_samples(samples, out, args, run.kind, asked, per_row)
        if trajectory is not None:
            _save_trajectory(frames, labels, trajectory, run.kind)
    except OSError as error:
        raise StorageError(describe_os_error(error, getattr(error, "filename", None) or out)) from None
    walk = ddpm.sampling.walk_timesteps(run.schedule, options)
    calls = ddpm.sampling.network_calls(options, walk)
    grid = ddpm.sampling.walk_grid(options)
    what = f"{len(samples)} samples ({options.sampler}, {calls} network calls on the {grid} grid, seed {args.seed})"
    if run.conditional:
        which = ("one row per class" if args.class_ == "all" else f"class {run.classes[int(asked[0])]!r}"
                 if asked is not None else "no class (the unconditional model)")
        what += f", {which}" + (f", guidance {options.guidance:g}" if asked is not None else "")
    print(f"wrote {what} to {out}" + (f"; trajectory to {trajectory}" if trajectory else ""))
    return 0


def _asked_classes(args: argparse.Namespace, run: Any) -> tuple[Any, int | None]:
    """The labels --class asks for (None: none asked), and the samples a grid row holds (--class all)."""
    import torch

    from ddpm.guidance import class_labels

    if args.class_ is None:
        return None, None
    if not run.conditional:
        raise UsageError(f"--class {args.class_}: {args.run} is an unconditional run (trained without --conditional); "
                         "it has no classes")
    if args.class_ == "all":
        return torch.arange(len(run.classes)).repeat_interleave(args.num), args.num
    try:
        return class_labels(args.class_, run.classes, args.num), None
    except ValueError as error:
        raise UsageError(f"--{error}") from None


def _write_samples(samples: Any, out: Path, args: argparse.Namespace, kind: str, labels: Any = None,
                   per_row: int | None = None) -> None:
    """Write samples as --out asks; an .npz also holds a conditional run's class indices as "labels"."""
    import numpy as np

    from ddpm.visualize import save_grid, save_images, scatter_png, to_uint8

    out.parent.mkdir(parents=True, exist_ok=True)
    if _is_dir_target(args.out):
        for earlier in out.glob("*.png") if out.is_dir() else ():
            if re.fullmatch(r"\d{6}\.png", earlier.name):  # what save_images names; other files stay
                earlier.unlink()
        save_images(samples.clamp(-1, 1), out)
    elif out.suffix.lower() == ".npz":
        array = to_uint8(samples.clamp(-1, 1)).numpy() if kind == "image" else samples.float().numpy()
        extra = {} if labels is None else {"labels": labels.numpy()}
        with open(out, "wb") as file:  # by name, np.savez would add ".npz" to "x.NPZ"
            np.savez(file, arr_0=array, **extra)
    elif kind == "image":
        save_grid(samples.clamp(-1, 1), out, nrow=per_row)
    else:
        scatter_png([samples[:, :2]], out, titles=[f"{len(samples)} samples"])


def _is_dir_target(text: str | None) -> bool:
    return text is not None and (text.endswith(("/", os.sep)) or Path(text).is_dir())


def _sample_output(args: argparse.Namespace, run_path: Path) -> Path:
    if args.out is None:
        base = run_path if (run_path / "config.json").is_file() and not (run_path / "model.safetensors").exists() \
            else run_path.resolve().parent.parent  # a checkpoint folder (even ".") is RUN/checkpoints/step_N
        return _fresh_path(base / "samples" / f"sample-{args.seed}.png")  # a default never replaces a file
    out = Path(args.out)
    if _is_dir_target(args.out):
        if out.is_dir() and any(out.iterdir()) and not args.overwrite:
            raise UsageError(f"--out {out} is a folder that is not empty; add --overwrite or choose another")
        return out
    if out.suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp", ".npz"):
        raise UsageError(f"--out {out}: use a .png/.jpg/.webp grid, a folder ending in /, or a .npz file")
    _refuse_existing(out, args.overwrite, "--out")
    return out


def _refuse_existing(path: Path, overwrite: bool, flag: str) -> None:
    if path.exists() and not overwrite:
        raise UsageError(f"{flag} {path} already exists; add --overwrite to replace it")


def _save_trajectory(frames: list, labels: list[str], path: Path, kind: str) -> None:
    from ddpm.visualize import denoising_strip, save_animation, scatter_png

    if kind == "points":  # six panels from x_T to x_0 (a .png: _sample refuses other names)
        chosen = sorted({round(i * (len(frames) - 1) / 5) for i in range(6)})
        scatter_png([frames[i][:, :2] for i in chosen], path,
                    titles=[labels[i] for i in chosen[:-1]] + ["x_0"])
        return
    frames = [f.clamp(-1, 1) for f in frames]
    if path.suffix.lower() == ".gif":
        stride = max(1, len(frames) // _GIF_FRAMES)
        chosen = frames[::stride] + ([frames[-1]] if (len(frames) - 1) % stride else [])
        save_animation(chosen, path, duration_ms=60, nrow=min(len(frames[0]), 4))
    else:
        denoising_strip(frames, path, columns=11)


# --- ddpm eval ------------------------------------------------------------------------------------

def _add_eval(commands: argparse._SubParsersAction) -> None:
    from ddpm.catalog import METRICS

    parser = commands.add_parser(
        "eval", help="measure a trained run: bits/dim, FID, distances on the built-in sets",
        description="Measure a run (EMA weights) with metrics that need no download: "
                    + "; ".join(f"{name}: {text}" for name, text in METRICS.items()) + ".")
    parser.add_argument("run", metavar="RUN_DIR|CHECKPOINT")
    parser.add_argument("--metric", action="append", choices=list(METRICS),
                        help="a metric to compute (repeat for several; default: those that suit the run's data)")
    parser.add_argument("--num", type=_whole_number("--num"), default=1000,
                        help="samples to draw for sample-based metrics (default 1000)")
    parser.add_argument("--heldout", type=_whole_number("--heldout"), default=100,
                        help="held-out examples for bpd; each costs T network calls (default 100)")
    _add_sampling_flags(parser)
    parser.add_argument("--batch-size", type=_whole_number("--batch-size"), default=250,
                        help="samples drawn at once (default 250)")
    parser.add_argument("--seed", type=_seed, default=0, help="seed of samples and held-out choice (default 0)")
    parser.add_argument("--bound-variance", choices=["fixed_large", "fixed_small"], default="fixed_large",
                        help="sigma_t^2 of the bound's reverse steps: beta_t (default, the tighter bound) or beta tilde")
    parser.add_argument("--data-dir", help="where the MNIST / CIFAR-10 files are, if not where the run was trained")
    parser.add_argument("--inception-weights", metavar="PATH",
                        help="pt_inception-2015-12-05-6726825d.pth for --metric fid (or set DDPM_INCEPTION_WEIGHTS)")
    parser.add_argument("--json", metavar="FILE", help="write the results here (default RUN_DIR/eval/step_N.json)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    parser.add_argument("--overwrite", action="store_true", help="replace --json if it exists")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _eval(args: argparse.Namespace) -> int:
    import ddpm
    from ddpm.checkpoint import write_json
    from ddpm.build import resolve_device
    from ddpm.evaluation.evaluate import EvalOptions, default_metrics, evaluate_run

    if args.json is not None:
        _refuse_existing(Path(args.json), args.overwrite, "--json")
        if Path(args.json).suffix.lower() != ".json":
            raise UsageError(f"--json {args.json}: the file name must end in .json")
    run = ddpm.load(args.run, device=resolve_device(args.device, setting="--device"))
    metrics = list(dict.fromkeys(args.metric)) if args.metric else default_metrics(run)
    options = EvalOptions(num=args.num, heldout=args.heldout, sample=_sample_options(args, run),
                          batch_size=args.batch_size, seed=args.seed, bound_variance=args.bound_variance,
                          data_dir=args.data_dir, inception_weights=args.inception_weights, progress=not args.quiet)
    report = evaluate_run(run, metrics, options)
    run_dir = run.checkpoint.resolve().parent.parent
    out = Path(args.json) if args.json else _fresh_path(run_dir / "eval" / f"step_{run.step:07d}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, {"run": str(args.run), "checkpoint": str(run.checkpoint), "step": run.step,
                     "options": {k: v for k, v in dataclasses.asdict(options).items() if k != "progress"},
                     "metrics": report})
    print(f"{args.run} at step {run.step} (EMA weights)")
    print(_table(report))
    print(f"wrote {out}")
    return 0


def _fresh_path(path: Path, taken: Callable[[Path], bool] = Path.exists) -> Path:
    """path, or NAME-2.EXT, NAME-3.EXT, ... beside it: the first that is not ``taken``."""
    candidate, number = path, 1
    while taken(candidate):
        number += 1
        candidate = path.with_name(f"{path.stem}-{number}{path.suffix}")
    return candidate


def _table(report: dict[str, dict[str, Any]]) -> str:
    """metric, quantity, value: one row per quantity, numbers to 4 significant figures."""
    def shown(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        if isinstance(value, list):
            return " ".join(map(str, value))
        return str(value)

    rows = [("metric", "quantity", "value")]
    for metric, values in report.items():
        rows += [(metric if i == 0 else "", key, shown(value)) for i, (key, value) in enumerate(values.items())]
    widths = [max(len(row[i]) for row in rows) for i in range(2)]
    return "\n".join(f"{a:<{widths[0]}}  {b:<{widths[1]}}  {c}" for a, b, c in rows)


# --- ddpm import / export ------------------------------------------------------------------------

def _add_import(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "import", help="make a run directory of a Hugging Face diffusers UNet2DModel / DDPMPipeline folder",
        description="Convert a diffusers folder (model_index.json with unet/ and scheduler/, or config.json, "
                    "scheduler_config.json and the weights at its root, as google/ddpm-cifar10-32) into a ddpm run "
                    "that ddpm sample, ddpm eval and ddpm.load use. Reads JSON and safetensors (a legacy .bin only "
                    "with torch.load(weights_only=True)); diffusers itself is not needed.")
    parser.add_argument("path", metavar="FOLDER")
    parser.add_argument("--out", required=True, metavar="RUN_DIR", help="the run directory to write (new or empty)")
    parser.add_argument("--data", help="the dataset the model was trained on, for ddpm eval (e.g. cifar10)")
    parser.add_argument("--data-dir", help="where that dataset's files are (MNIST / CIFAR-10)")


def _import(args: argparse.Namespace) -> int:
    from ddpm.interop import import_diffusers

    out = import_diffusers(args.path, args.out, data=args.data, data_dir=args.data_dir)
    print(f"imported {args.path} into {out}: ddpm sample {out} / ddpm eval {out}")
    return 0


def _add_export(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "export", help="write a run as a folder other tools load (diffusers' DDPMPipeline)",
        description="Write a run's network and noise schedule as a diffusers DDPMPipeline folder: "
                    "DDPMPipeline.from_pretrained(FOLDER) loads it. The EMA weights unless --raw.")
    parser.add_argument("run", metavar="RUN_DIR|CHECKPOINT")
    parser.add_argument("--out", required=True, metavar="FOLDER", help="the folder to write (new or empty)")
    parser.add_argument("--format", choices=["diffusers"], default="diffusers", help="diffusers (default; the only one)")
    parser.add_argument("--raw", action="store_true", help="export the raw weights instead of the EMA weights")


def _export(args: argparse.Namespace) -> int:
    import ddpm
    from ddpm.interop import export_diffusers

    out = export_diffusers(ddpm.load(args.run), args.out, ema=not args.raw)
    print(f"wrote {out}: diffusers.DDPMPipeline.from_pretrained({str(out)!r})")
    return 0


# --- listings -------------------------------------------------------------------------------------

def _presets(args: argparse.Namespace) -> int:
    from ddpm.catalog import MODEL_PRESETS as PRESETS
    from ddpm.config import DEFAULT_PRESET, TRAINING_PRESETS

    width = max(map(len, [*TRAINING_PRESETS, *PRESETS]))
    for name, (description, _) in TRAINING_PRESETS.items():
        default = " (default)" if name == DEFAULT_PRESET else ""
        print(f"{name:<{width}}  train   {description}{default}")
    for name, description in PRESETS.items():
        print(f"{name:<{width}}  model   {description}")
    return 0


def _datasets(args: argparse.Namespace) -> int:
    from ddpm.catalog import DATASETS as datasets

    width = max(map(len, datasets))
    for name, description in datasets.items():
        print(f"{name:<{width}}  {description}")
    print(f"{'PATH':<{width}}  a folder of images (PNG/JPEG/WebP, recursive) or a .npy/.npz array")
    return 0


# --- entry point ----------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    from ddpm import __version__

    parser = _Parser(prog="ddpm", description="Denoising diffusion probabilistic models: train, sample, inspect.")
    parser.add_argument("--version", action="version", version=f"ddpm {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    _add_train(commands)
    _add_sample(commands)
    _add_eval(commands)
    _add_import(commands)
    _add_export(commands)
    commands.add_parser("presets", help="list the training and model presets, one line each")
    commands.add_parser("datasets", help="list the built-in datasets, one line each")
    return parser


_COMMANDS = {"train": _train, "sample": _sample, "eval": _eval, "import": _import, "export": _export,
             "presets": _presets, "datasets": _datasets}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``ddpm`` command; returns the exit code (errors are printed in one line)."""
    from ddpm.allocator import keep_freed_memory

    keep_freed_memory()  # fewer page faults in every step of training and sampling (ddpm/allocator.py)
    if hasattr(signal, "SIGXFSZ"):  # past the file-size limit a write fails (EFBIG) instead of killing us
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    code = _run(argv)
    distributed = sys.modules.get("ddpm.distributed")  # imported (with torch) only by work that may need it
    if distributed is not None and distributed.launched():
        # Under torchrun, once everything is written, flushed and the process group is gone, the
        # process ends here without running the interpreter's teardown: there, torch's C++ objects
        # left from a gloo group occasionally abort the process ("terminate called without an
        # active exception", SIGABRT) after a run that succeeded, turning its exit code into a failure.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _run(argv: Sequence[str] | None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if args.command is None:
            build_parser().print_help()
            return BAD_INPUT
        return _COMMANDS[args.command](args)
    except ValueError as error:  # UsageError, SettingError, CheckpointError, DataError, ...
        distributed = sys.modules.get("ddpm.distributed")
        from_a_rank = distributed is not None and isinstance(error, distributed.RankError)
        if _is_main_process() or from_a_rank:  # what every process raises, rank 0 says
            print(f"{getattr(error, 'prog', 'ddpm')}: error: {_one_line(error)}", file=sys.stderr)
        return BAD_INPUT
    except KeyboardInterrupt:
        print("ddpm: interrupted", file=sys.stderr)
        return 130
    except OSError as error:  # a file that could not be written or read: where, why, what to do
        from ddpm.checkpoint import StorageError, describe_os_error

        text = str(error) if isinstance(error, StorageError) else describe_os_error(error, doing="use")
        print(f"ddpm: error: {_one_line(text)}", file=sys.stderr)
        return 1
    except Exception as error:  # a bug: say so in one line, keep the traceback for those who ask
        if os.environ.get("DDPM_DEBUG"):
            raise
        print(f"ddpm: internal error: {type(error).__name__}: {_one_line(error)} "
              f"(set DDPM_DEBUG=1 to see the traceback)", file=sys.stderr)
        return 1


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text or type(error).__name__


if __name__ == "__main__":
    sys.exit(main())
