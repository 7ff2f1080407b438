"""Several processes under torchrun: the process group, this process's rank, its share of the batch,
and the few points where the processes must agree.

    torchrun --standalone --nproc_per_node=8 -m ddpm train --preset cifar10 --batch-size 128

Every process draws the whole global batch (examples, timesteps, noise) from the shared seeded
generators and trains on its contiguous slice, so the batch does not depend on the number of
processes. Gradients are summed over the processes (DistributedDataParallel averages, so each process
scales its loss by the world size), which makes the update the one a single process would compute, up
to the order of floating-point additions.

Without torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) no process group is created and every
helper here does nothing: a single process runs exactly as it always did.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = ["World", "SINGLE", "launched", "process_group", "is_failure", "StopSignals", "DEFAULT_TIMEOUT_S"]

# How long a collective waits for a slow process before failing. It bounds how long the others wait
# for a process that hangs (a process that dies is noticed at once by gloo, and torchrun stops the
# others); it must exceed the longest thing one process does alone (writing a checkpoint).
DEFAULT_TIMEOUT_S = 1800
T = TypeVar("T")
# A gloo group over the same processes for the one exchange every step makes (the stop signal): on the
# host, so that under NCCL no step waits for its GPU. Made on CPUs too (where the main group is gloo
# already), so that the CPU tests run the code GPUs run. None outside a process group.
_host_group: dist.ProcessGroup | None = None
_host_group_of: dist.ProcessGroup | None = None  # the main group it was made beside


class ElsewhereError(ValueError):
    """Another process failed at a step every process waits for; that process prints the reason."""


class RankError(ValueError):
    """This process (not rank 0) failed where the others did not: reported by this process itself."""


@dataclass(frozen=True)
class World:
    """This process's place among the processes of one training job."""

    rank: int = 0  # 0 .. size-1 over all machines; rank 0 writes checkpoints, logs and samples
    size: int = 1  # number of processes (torchrun's WORLD_SIZE)
    local_rank: int = 0  # index on this machine: the GPU this process uses
    active: bool = False  # a process group exists (launched by torchrun, even with one process)

    @staticmethod
    def from_env() -> "World":
        if not launched():
            return SINGLE
        return World(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]),
                     int(os.environ.get("LOCAL_RANK", "0")), active=True)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, batch_size: int) -> slice:
        """This process's contiguous slice of a global batch of ``batch_size`` examples."""
        per_process = batch_size // self.size
        return slice(self.rank * per_process, (self.rank + 1) * per_process)

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        """The model whose backward sums gradients over the processes (the model itself when alone)."""
        if not self.active:
            return model
        # The buffers never change in training (every rank holds the same), so they are not re-sent each step.
        return nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None,
                                                   forward_sync_buffers=False)

    def accumulating(self, model: nn.Module, last: bool) -> contextlib.AbstractContextManager:
        """Around a micro-batch's forward and backward: gradients are exchanged only after the last."""
        if self.active and not last:
            return model.no_sync()
        return contextlib.nullcontext()

    def sum_(self, tensor: Tensor) -> Tensor:
        """Sum ``tensor`` over the processes, in place."""
        if self.active:
            dist.all_reduce(tensor)
        return tensor

    def agree_signal(self, received: int | None) -> int | None:
        """The stop signal any process received (the same answer on every process), or None."""
        if not self.active:
            return received
        flag = torch.tensor(received or 0)  # a host tensor: agreeing needs no wait for the GPU
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=_host_group)
        return int(flag.item()) or None

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def on_main(self, task: Callable[[], bool], device: torch.device) -> bool:
        """Run ``task`` on rank 0 alone (e.g. preparing the run directory); every process gets its answer."""
        if not self.active:
            return task()
        return bool(self._together(task, self.is_main, device))

    def machine_first(self, task: Callable[[], T], device: torch.device) -> T:
        """``task`` (e.g. loading data, which may download it) on each machine's first process, then on the others."""
        if not self.active:
            return task()
        first = self._together(task, self.local_rank == 0, device)
        return first if self.local_rank == 0 else task()

    def _together(self, task: Callable[[], T], runs_it: bool, device: torch.device) -> T | None:
        """``task()`` where ``runs_it``; when it fails on any process, every process raises at once
        (instead of waiting at the next collective), and rank 0's answer (0 or 1) reaches every process."""
        result, error = None, None
        if runs_it:
            try:
                result = task()
            except Exception as failure:  # re-raised below, once the others know
                error = failure
        # [1 + the rank that failed, rank 0's answer]; MAX over the processes
        state = torch.tensor([self.rank + 1 if error is not None else 0,
                              int(bool(result)) if self.is_main else 0], device=device)
        dist.all_reduce(state, op=dist.ReduceOp.MAX)
        failed, answer = (int(v) for v in state.tolist())
        if error is not None:
            if self.is_main:
                raise error
            raise RankError(f"rank {self.rank}: {' '.join(str(error).split()) or type(error).__name__}") from error
        if failed:
            raise ElsewhereError(f"rank {failed - 1} failed; its message says why")
        return result if self.is_main or runs_it else answer  # type: ignore[return-value]


SINGLE = World()


def launched() -> bool:
    """Whether torchrun (or srun with the same variables) started this process."""
    return all(name in os.environ for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


@contextlib.contextmanager
def process_group(world: World, device: torch.device) -> Iterator[None]:
    """The process group for ``world`` (NCCL on CUDA, gloo on CPU) while the block runs; nothing when
    alone. Inside a group the caller made, only the host group is added (once)."""
    global _host_group, _host_group_of
    if not world.active:
        yield
        return
    timeout = timedelta(seconds=float(os.environ.get("DDPM_DIST_TIMEOUT", DEFAULT_TIMEOUT_S)))
    if dist.is_initialized():
        if _host_group is None or _host_group_of is not dist.group.WORLD:  # every process is here too
            _host_group, _host_group_of = dist.new_group(backend="gloo", timeout=timeout), dist.group.WORLD
        yield
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timeout)
    _host_group, _host_group_of = dist.new_group(backend="gloo", timeout=timeout), dist.group.WORLD
    try:
        yield
    except BaseException as error:
        # After a failed collective the group may not shut down cleanly; exiting frees it. Any other
        # error may have struck this process alone, so it does not wait for the others either.
        if not (is_failure(error) or (error.__context__ is not None and is_failure(error.__context__))):
            dist.destroy_process_group()
        _host_group = _host_group_of = None
        raise
    # Every process finished: tear the group down together. Without the barrier a process that is done
    # first closes its connections while a peer may still be finishing its last collective, and gloo
    # may abort that peer at exit ("terminate called without an active exception": 2 of 20 two-process
    # runs on this machine; 1 of 160 with the barrier; cli.main's os._exit does the rest, see
    # docs/distributed.md).
    dist.barrier()
    dist.destroy_process_group()  # every group, the host group too
    _host_group = _host_group_of = None


def is_failure(error: BaseException) -> bool:
    """Whether ``error`` is a collective that failed: a process died, hung past the timeout, or the network broke."""
    if isinstance(error, dist.DistError):
        return True
    # Some backends raise a plain RuntimeError; theirs start with the source location in the backend.
    text = str(error)
    return isinstance(error, RuntimeError) and any(
        sign in text for sign in ("gloo", "Gloo", "NCCL", "Connection closed", "Connection reset", "Timed out"))


def describe(error: BaseException) -> str:
    """The gist of a backend's error in one short line: no source location, no advice paragraph."""
    text = " ".join(str(error).split()) or type(error).__name__
    text = re.sub(r"^\[[^\]]*\.(cc|cpp|h):\d+\]\s*", "", text)  # "[/…/gloo/transport/tcp/pair.cc:537] "
    first = re.split(r"(?<=[.!])\s", text, maxsplit=1)[0].rstrip(".")
    return first[:200]


class StopSignals:
    """Turns SIGINT/SIGTERM into a flag the loop checks after each step (main thread only)."""

    def __init__(self, world: World = SINGLE) -> None:
        self.world = world
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = signum

    def __exit__(self, exc_type: Any, error: BaseException | None, traceback: Any) -> None:
        # When a collective failed, the launcher (torchrun) is already stopping the other processes with
        # SIGTERM. Restoring the default handler would let that signal kill this process before it has
        # reported the failure in one line, so from here on the signals are ignored: the process exits by
        # itself right after its report (and torchrun kills it anyway if it ever hung).
        ending = error is not None and self.world.active and is_failure(error)
        for signum, handler in self._previous.items():
            signal.signal(signum, signal.SIG_IGN if ending else handler)
