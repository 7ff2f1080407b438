"""Where a training run's numbers go: metrics.jsonl, and TensorBoard and Weights & Biases when asked
for. Only rank 0 logs; the other processes get ``NoMetrics``."""

from __future__ import annotations

import json
from pathlib import Path

from ddpm import checkpoint as ckpt
from ddpm.config import Config, config_to_dict

__all__ = ["Metrics", "NoMetrics", "line_step"]


class Metrics:
    """metrics.jsonl, plus TensorBoard and wandb when asked for and installed."""

    def __init__(self, run_dir: Path, config: Config, resume_step: int, notes: list[str]):
        self.path = run_dir / "metrics.jsonl"
        resumed = self.path.exists()  # a new run's directory has none
        if resumed:
            _cut_back(self.path, resume_step)
        try:
            self.file = open(self.path, "a", encoding="utf-8")
        except OSError as error:
            raise ckpt.StorageError(ckpt.describe_os_error(error, self.path)) from None
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
        try:
            self.file.write(json.dumps(ckpt.strict_json(record), allow_nan=False) + "\n")
            self.file.flush()
        except OSError as error:
            raise ckpt.StorageError(ckpt.describe_os_error(error, self.path)) from None
        if self.tensorboard is not None:
            for key, value in values.items():
                self.tensorboard.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def close(self) -> None:
        try:
            self.file.close()  # every line was flushed when it was logged
        except OSError:
            pass
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()


def _cut_back(path: Path, resume_step: int) -> None:
    """Drop what a killed run logged after its last checkpoint (all of it if it had none yet: those
    steps are redone) and any torn or damaged line, by writing the kept lines to a new file and
    renaming it over the old one: a failed write (disk full) leaves the history as it was."""
    kept = [line for line in path.read_text(encoding="utf-8", errors="replace").splitlines()
            if (step := line_step(line)) is not None and step <= resume_step]
    ckpt.write_text(path, "".join(line + "\n" for line in kept))


def line_step(line: str) -> int | None:
    """The step of a whole metrics line; None for a torn or damaged one."""
    try:
        record = json.loads(line)
    except (ValueError, RecursionError):
        return None
    step = record.get("step") if isinstance(record, dict) else None
    return step if isinstance(step, int) and not isinstance(step, bool) else None


class NoMetrics:
    """What processes other than rank 0 log to: nothing."""

    def log(self, step: int, values: dict[str, float]) -> None:
        pass

    def close(self) -> None:
        pass
