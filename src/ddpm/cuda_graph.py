"""Replaying a network as a CUDA graph: on by default for a run's own sampling on a CUDA device
(``Run.sample``, ``ddpm sample``; ``--no-cuda-graph`` turns it off), opt-in for ``ddpm.sample`` with a
model of your own (``cuda_graph=True``). Measured by ``benchmarks/gpu_check.sh`` on an H200: the plain
walk's numbers bit for bit, DDIM-50 4.1x and DDPM-1000 6.3x faster (docs/performance.md).

A sampler calls its network once per step with tensors of the same shapes. Recorded once as a CUDA
graph, every later call is one replay instead of hundreds of kernel launches, which is what small
networks on a GPU spend their time on. The wrapper is a model like any other, ``model(x_t, t)``, so
every sampler gets it without knowing.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ddpm.diffusion import Model

__all__ = ["GraphedModel"]


class GraphedModel:
    """``model(x_t, t)`` called through fixed input and output tensors, recorded as a CUDA graph on the
    first call when ``capture`` (on CUDA) and replayed after. Without ``capture`` it does what a replay
    does, eagerly: inputs copied into the same tensors, the output copied into the same tensor, which is
    what the CPU tests compare with the plain model.

    Each call returns a copy of the fixed output, so a sampler may keep outputs across steps (multistep
    solvers do). If the GPU has no memory left for the graph's pool, the calls go on eagerly. A model
    that reads a value on the host (.item()) cannot be recorded: its error names cuda_graph=False.
    """

    def __init__(self, model: Model, *, capture: bool):
        self.model, self.capture = model, capture
        self.x: Tensor | None = None
        self.t: Tensor | None = None
        self.output: Tensor | None = None
        self.graph: torch.cuda.CUDAGraph | None = None

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        if self.x is None:
            self.x, self.t = torch.empty_like(x), torch.empty_like(t)
        elif self.x.shape != x.shape:
            raise ValueError(f"a graphed model takes one shape; recorded {tuple(self.x.shape)}, got {tuple(x.shape)}")
        self.x.copy_(x)
        self.t.copy_(t)
        if self.graph is not None:
            self.graph.replay()
        elif self.capture:
            return self._warm_up_and_record().clone()
        elif self.output is None:
            self.output = self.model(self.x, self.t).clone()
        else:
            self.output.copy_(self.model(self.x, self.t))
        return self.output.clone()

    def _warm_up_and_record(self) -> Tensor:
        device = self.x.device  # not necessarily the current device: streams and graph go there
        with torch.cuda.device(device):
            current = torch.cuda.current_stream(device)
            side = torch.cuda.Stream(device)
            side.wait_stream(current)
            with torch.cuda.stream(side):  # restores the current stream however the block ends
                # The warm-up with host syncs forbidden: a model that reads a value on the host (.item())
                # fails here, before recording, which such a model would invalidate for good.
                mode = torch.cuda.get_sync_debug_mode()
                torch.cuda.set_sync_debug_mode("error")
                try:
                    first = self.model(self.x, self.t)
                except RuntimeError as error:
                    raise _not_recordable(error) from error
                finally:
                    torch.cuda.set_sync_debug_mode(mode)
                self.graph, self.output = self._record()
            current.wait_stream(side)
            first.record_stream(current)  # made on the side stream, used and freed on this one
        if self.graph is None:  # no memory for the graph's own pool: the calls go on without one
            self.capture = False
        return first

    def _record(self) -> tuple[torch.cuda.CUDAGraph | None, Tensor | None]:
        """The call recorded on the current (warm-up) stream, where libraries' per-stream handles and
        workspaces exist now; (None, None) if the graph's memory pool could not be allocated.
        capture_begin/end rather than torch.cuda.graph, whose synchronize and empty_cache at every
        sampling call would also slow whatever runs next."""
        graph = torch.cuda.CUDAGraph()
        graph.capture_begin()
        try:
            output = self.model(self.x, self.t)
        except BaseException as error:  # the capture must end whatever happened, or the stream stays in it
            try:
                graph.capture_end()
            except RuntimeError:
                pass  # the capture is invalid already; the model's error is the one to report
            if isinstance(error, torch.cuda.OutOfMemoryError):
                return None, None
            if isinstance(error, RuntimeError):
                raise _not_recordable(error) from error
            raise
        try:
            graph.capture_end()
        except RuntimeError as error:
            raise _not_recordable(error) from error
        return graph, output


def _not_recordable(error: RuntimeError) -> RuntimeError:
    text = str(error).strip()
    first_line = text.splitlines()[0] if text else type(error).__name__
    return RuntimeError(f"this model cannot be recorded as a CUDA graph ({first_line}); "
                        f"sample with cuda_graph=False (ddpm sample --no-cuda-graph)")
