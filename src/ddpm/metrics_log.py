"""Where a training run's numbers go: metrics.jsonl, and TensorBoard and Weights & Biases when asked
for. Only rank 0 logs; the other processes get ``NoMetrics``."""

from __future__ import annotations

import json
from pathlib import Path

from ddpm import checkpoint as ckpt
from ddpm.config import Config, config_to_dict

__all__ = ["Metrics", "NoMetrics"]


class Metrics:
    """metrics.jsonl, plus TensorBoard and wandb when asked for and installed."""

    def __init__(self, run_dir: Path, config: Config, resume_step: int, notes: list[str]):
        self.path = run_dir / "metrics.jsonl"
        resumed = self.path.exists()  # a new run's directory has none
        if resumed:
            # Drop what a killed run logged after its last checkpoint (all of it if it had none yet):
            # those steps are redone.
            kept = [line for line in self.path.read_text(encoding="utf-8").splitlines()
                    if line.strip() and _line_step(line) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        self.file = open(self.path, "a", encoding="utf-8")
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
        self.file.write(json.dumps(ckpt.strict_json(record), allow_nan=False) + "\n")
        self.file.flush()
        if self.tensorboard is not None:
            for key, value in values.items():
                self.tensorboard.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def close(self) -> None:
        self.file.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()


def _line_step(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (json.JSONDecodeError, AttributeError, TypeError, ValueError):
        return 0


class NoMetrics:
    """What processes other than rank 0 log to: nothing."""

    def log(self, step: int, values: dict[str, float]) -> None:
        pass

    def close(self) -> None:
        pass
