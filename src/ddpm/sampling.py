"""Samplers: DDPM (Algorithm 2, optionally with x0 clipping) and DDIM (Song et al. 2021, eq. 12).

Each sampler is a visible loop over (t, t_prev) pairs of a timestep sequence, which is data made by
one function (``timestep_sequence``) and always ends at t = 0 (t_prev = -1 stands for the clean data,
alpha_bar = 1). The model is any callable ``model(x_t, t) -> Tensor`` shaped like x_t; samplers
never own it and know nothing about it.
"""

from __future__ import annotations

from typing import Callable, Literal, NamedTuple, get_args

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ddpm.diffusion import PREDICTIONS, VARIANCES, Model, Prediction, Variance, check_choice, denoise
from ddpm.schedule import NoiseSchedule, posterior_coefficients

Sampler = Literal["ddpm", "ddim"]
SAMPLERS: tuple[str, ...] = get_args(Sampler)
Spacing = Literal["uniform", "leading"]
SPACINGS: tuple[str, ...] = get_args(Spacing)


def timestep_sequence(num_steps: int, steps: int | None = None, spacing: Spacing = "uniform") -> list[int]:
    """The trained timesteps a sampler visits, in the order it visits them (descending).

    num_steps: T; steps: how many to visit (None: all T); spacing:
      "uniform": evenly spaced from T-1 down to 0 inclusive (rounded), so the walk starts at the
                 noisiest trained step and ends at the cleanest;
      "leading": 0, T//S, 2*T//S, ... as in the DDIM paper's code; never starts at T-1.
    Always ends at t = 0, except that a single step (steps=1) is taken from t = T-1.
    """
    check_choice("spacing", spacing, SPACINGS)
    steps = num_steps if steps is None else steps
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= num_steps:
        raise ValueError(f"steps must be an integer in 1..{num_steps} (T={num_steps}); got {steps!r}")
    if steps == 1:
        return [num_steps - 1]
    if spacing == "uniform":
        grid = torch.linspace(0, num_steps - 1, steps, dtype=torch.float64).round().long()
    else:
        grid = torch.arange(steps, dtype=torch.long) * (num_steps // steps)
    return grid.flip(0).tolist()


class StepCoefficients(NamedTuple):
    """Coefficients for walking a timestep sequence, one entry per step i (t_i -> t_{i+1}); each (S,).

    alpha_bar: alpha_bar at t_i; alpha_bar_prev: at t_{i+1} (1 after the last step);
    posterior_coef1/2 and posterior_variance: q(x_{t_{i+1}} | x_{t_i}, x0) (eq. 6-7, merged steps);
    beta: 1 - alpha_bar / alpha_bar_prev, the variance of the merged forward step (sigma^2 = beta_t).
    """
    alpha_bar: Tensor
    alpha_bar_prev: Tensor
    posterior_coef1: Tensor
    posterior_coef2: Tensor
    posterior_variance: Tensor
    beta: Tensor


def step_coefficients(schedule: NoiseSchedule, timesteps: list[int]) -> StepCoefficients:
    """Per-step coefficients for ``timesteps`` (descending), computed in float64 on the CPU once and
    stored as float32 on the schedule's device. With all T steps they equal the schedule's tables."""
    table = schedule.alphas_cumprod_float64()
    t = torch.tensor(timesteps, dtype=torch.long)
    alpha_bar = table[t]
    alpha_bar_prev = torch.cat([table[t[1:]], torch.ones(1, dtype=torch.float64)])
    coef1, coef2, variance = posterior_coefficients(alpha_bar, alpha_bar_prev)
    beta = 1.0 - alpha_bar / alpha_bar_prev
    return StepCoefficients(*(c.to(schedule.device, torch.float32)
                              for c in (alpha_bar, alpha_bar_prev, coef1, coef2, variance, beta)))


class SamplerStep(NamedTuple):
    """What a sampler hands its callback after step ``index``: t (int), x_t (the input of the step),
    pred_x0 (the model's estimate of the clean sample) and x_prev (the output); tensors (B, ...)."""
    index: int
    t: int
    x_t: Tensor
    pred_x0: Tensor
    x_prev: Tensor


def ddpm_step(x_t: Tensor, pred_x0: Tensor, coef1: Tensor, coef2: Tensor, variance: Tensor,
              noise: Tensor | None) -> Tensor:
    """One step of Algorithm 2: x_{t-1} = mu(x_t, x0_hat) + sigma_t z.

    The mean is the posterior mean of eq. 7 at the predicted x0; for an eps model without clipping it
    equals Algorithm 2's 1/sqrt(alpha_t) (x_t - beta_t / sqrt(1 - alpha_bar_t) eps) exactly.
    ``variance`` is sigma_t^2; the noise is scaled by its square root. ``noise=None`` on the last step.
    """
    mean = coef1 * pred_x0 + coef2 * x_t
    return mean if noise is None else mean + variance.sqrt() * noise


def ddim_step(pred_x0: Tensor, pred_eps: Tensor, alpha_bar_prev: Tensor, sigma: Tensor,
              noise: Tensor | None) -> Tensor:
    """One step of DDIM (Song et al. 2021, eq. 12):
    x_prev = sqrt(alpha_bar_prev) x0_hat + sqrt(1 - alpha_bar_prev - sigma^2) eps_hat + sigma z."""
    direction = (1.0 - alpha_bar_prev - sigma.square()).clamp(min=0.0).sqrt() * pred_eps
    x_prev = alpha_bar_prev.sqrt() * pred_x0 + direction
    return x_prev if noise is None else x_prev + sigma * noise


def _check_options(schedule: NoiseSchedule, sampler: str, eta: float, variance: str,
                   prediction: str) -> None:
    if not isinstance(schedule, NoiseSchedule):
        raise ValueError(f"schedule must be a ddpm.NoiseSchedule; got {type(schedule).__name__} "
                         f"(e.g. NoiseSchedule('linear', 1000))")
    check_choice("sampler", sampler, SAMPLERS)
    check_choice("variance", variance, VARIANCES)
    check_choice("prediction", prediction, PREDICTIONS)
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be a number in [0, 1]; got {eta!r}")
    if sampler == "ddpm" and eta != 0.0:
        raise ValueError(f"eta applies to sampler='ddim' only (DDPM is DDIM with eta=1); got eta={eta}")
    if sampler == "ddim" and variance != "fixed_small":
        raise ValueError(f"variance applies to sampler='ddpm' only; got variance={variance!r} with ddim")


def _check_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    try:
        dims = tuple(shape)
    except TypeError:  # e.g. a bare int
        dims = ()
    if len(dims) < 2 or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in dims):
        raise ValueError(f"shape must be (B, D) or (B, C, H, W) with positive integers; got {shape!r}")
    return dims


def sample(
    model: Model,
    schedule: NoiseSchedule,
    shape: tuple[int, ...],
    *,
    sampler: Sampler = "ddpm",
    steps: int | None = None,
    eta: float = 0.0,
    variance: Variance = "fixed_small",
    clip_denoised: bool = False,
    prediction: Prediction = "eps",
    spacing: Spacing = "uniform",
    generator: torch.Generator | None = None,
    noise: Tensor | None = None,
    callback: Callable[[SamplerStep], None] | None = None,
    progress: bool = False,
    cuda_graph: bool | None = None,
) -> Tensor:
    """Draw samples of ``shape`` (B, ...) from the reverse process of a trained model.

    sampler: "ddpm" is Algorithm 2 with sigma_t^2 = beta tilde_t ("fixed_small") or beta_t
      ("fixed_large"); on fewer than T steps it uses the merged steps' posterior (respacing).
      "ddim" is eq. 12 with sigma = eta * sqrt(beta tilde); eta=0 is deterministic, and eta=1 on all
      T steps is the same walk as DDPM with fixed_small.
    steps: how many of the T trained timesteps to visit (None: all), chosen by ``spacing``.
    clip_denoised: clip the predicted x0 to [-1, 1] before using it (the x0-clipped variant).
    noise: the starting x_T (default: drawn from ``generator``). Returns x_0, shape ``shape``.
    The callback receives a ``SamplerStep`` after every step.
    cuda_graph: record one step (network, x0/eps and the update) as a CUDA graph and replay it for
      every later step, which removes the per-kernel launch cost; same numbers as without. None (the
      default): on a CUDA device, not elsewhere. True elsewhere runs the graph's fixed-buffer walk
      without a graph (what the CPU tests check); False never.
    """
    _check_options(schedule, sampler, eta, variance, prediction)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator or None; got {type(generator).__name__} "
                         f"(for a seed, pass torch.Generator(device).manual_seed(seed))")
    if cuda_graph is not None and not isinstance(cuda_graph, bool):
        raise ValueError(f"cuda_graph must be True, False or None; got {cuda_graph!r}")
    # Inference mode: no autograd bookkeeping at all. The result is cloned outside it, so the caller
    # gets an ordinary tensor (an inference tensor cannot be changed in place afterwards).
    with torch.inference_mode():
        shape = _check_shape(shape)
        timesteps = timestep_sequence(schedule.num_steps, steps, spacing)
        coefs = step_coefficients(schedule, timesteps)
        if sampler == "ddim":
            noise_std = eta * coefs.posterior_variance.sqrt()
        elif variance == "fixed_small":
            noise_std = coefs.posterior_variance.sqrt()
        else:
            noise_std = coefs.beta.sqrt()
        device = schedule.device
        if noise is None:
            x = torch.randn(shape, generator=generator, device=device)
        elif tuple(noise.shape) != shape:
            raise ValueError(f"noise must have shape {shape}; got {tuple(noise.shape)}")
        else:
            x = noise.to(device, torch.float32)
        stochastic = sampler == "ddpm" or eta > 0.0
        # One row of step coefficients per step: what the update of step i reads besides x_t and z.
        if sampler == "ddpm":
            rows = torch.stack([coefs.posterior_coef1, coefs.posterior_coef2, noise_std.square()], dim=1)
        else:
            rows = torch.stack([coefs.alpha_bar_prev, noise_std], dim=1)

        def step(x: Tensor, t_batch: Tensor, row: Tensor, z: Tensor | None) -> tuple[Tensor, Tensor]:
            pred_x0, pred_eps = denoise(schedule, model(x, t_batch), x, t_batch, prediction, clip_denoised)
            if sampler == "ddpm":
                return pred_x0, ddpm_step(x, pred_x0, row[0], row[1], row[2], z)
            return pred_x0, ddim_step(pred_x0, pred_eps, row[0], row[1], z)

        fixed = (_FixedBuffers(step, x, rows.shape[1], stochastic, capture=device.type == "cuda")
                 if cuda_graph or (cuda_graph is None and device.type == "cuda") else None)
        for i, t in enumerate(tqdm(timesteps, desc=f"sampling ({sampler})", disable=not progress)):
            t_batch = torch.full((shape[0],), t, device=device, dtype=torch.long)
            last = i == len(timesteps) - 1
            # Algorithm 2, line 3: no noise is added on the final step (t = 0 here, t = 1 in the paper).
            z = torch.randn(shape, generator=generator, device=device) if stochastic and not last else None
            pred_x0, x_prev = (fixed or step)(x, t_batch, rows[i], z)
            if callback is not None:
                x_t = x
                if fixed is not None:  # the next step overwrites its tensors
                    x_t, pred_x0, x_prev = fixed.x.clone(), pred_x0.clone(), x_prev.clone()
                callback(SamplerStep(i, t, x_t, pred_x0, x_prev))
            x = x_prev
    return x.clone()


class _FixedBuffers:
    """A sampler step that reads and writes the same tensors at every call, so that on CUDA it can be
    recorded once as a CUDA graph and replayed (``capture``). Without ``capture`` it does what a
    replay does, eagerly: the step's results are copied into the same output tensors every time,
    which is what the tests compare with the plain loop.

    Each call copies x_t, t, the step's coefficient row and the noise into the fixed inputs (no noise
    is drawn inside: the generator stays where the plain loop leaves it) and returns the fixed
    outputs (pred_x0, x_prev), which the next call overwrites. When capturing, the first call runs
    the step for real on a side stream (the warm-up CUDA graphs need) and the graph is then recorded
    on that stream; if the GPU has no memory left for the graph's pool, the walk goes on eagerly.
    """

    def __init__(self, step: Callable[[Tensor, Tensor, Tensor, Tensor | None], tuple[Tensor, Tensor]],
                 x: Tensor, row_size: int, stochastic: bool, capture: bool):
        self.step, self.capture = step, capture
        self.x = torch.empty_like(x)
        self.t = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
        self.row = torch.empty(row_size, device=x.device)
        # A step without noise (the last one) gets z = 0: x_prev + sigma * 0 is x_prev exactly.
        self.z = torch.empty_like(x) if stochastic else None
        self.graph: torch.cuda.CUDAGraph | None = None
        self.outputs: tuple[Tensor, Tensor] | None = None

    def __call__(self, x: Tensor, t: Tensor, row: Tensor, z: Tensor | None) -> tuple[Tensor, Tensor]:
        self.x.copy_(x)
        self.t.copy_(t)
        self.row.copy_(row)
        if self.z is not None and z is not None:
            self.z.copy_(z)
        elif self.z is not None:
            self.z.zero_()
        if self.graph is not None:
            self.graph.replay()
            return self.outputs
        if self.capture:
            return self._warm_up_and_record()
        results = self.step(self.x, self.t, self.row, self.z)
        if self.outputs is None:
            self.outputs = (results[0].clone(), results[1].clone())
        else:
            for fixed, result in zip(self.outputs, results):
                fixed.copy_(result)
        return self.outputs

    def _warm_up_and_record(self) -> tuple[Tensor, Tensor]:
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
                    first = self.step(self.x, self.t, self.row, self.z)
                except RuntimeError as error:
                    raise _not_recordable(error) from error
                finally:
                    torch.cuda.set_sync_debug_mode(mode)
                graph, outputs = self._record()
            current.wait_stream(side)
            for tensor in first:
                tensor.record_stream(current)  # made on the side stream, used and freed on this one
        if graph is None:  # no memory for the graph's own pool: this walk goes on without one
            self.capture = False
        self.graph, self.outputs = graph, outputs
        return first

    def _record(self) -> tuple[torch.cuda.CUDAGraph | None, tuple[Tensor, Tensor] | None]:
        """The step recorded on the current (warm-up) stream, where libraries' per-stream handles and
        workspaces exist now; (None, None) if the graph's memory pool could not be allocated.
        capture_begin/end rather than torch.cuda.graph, whose synchronize and empty_cache at every
        sampling call would also slow whatever runs next."""
        graph = torch.cuda.CUDAGraph()
        graph.capture_begin()
        try:
            outputs = self.step(self.x, self.t, self.row, self.z)
        except BaseException as error:  # the capture must end whatever happened, or the stream stays in it
            try:
                graph.capture_end()
            except RuntimeError:
                pass  # the capture is invalid already; the step's error is the one to report
            if isinstance(error, torch.cuda.OutOfMemoryError):
                return None, None
            if isinstance(error, RuntimeError):
                raise _not_recordable(error) from error
            raise
        try:
            graph.capture_end()
        except RuntimeError as error:
            raise _not_recordable(error) from error
        return graph, outputs


def _not_recordable(error: RuntimeError) -> RuntimeError:
    text = str(error).strip()
    first_line = text.splitlines()[0] if text else type(error).__name__
    return RuntimeError(f"this model's step cannot be recorded as a CUDA graph ({first_line}); "
                        f"sample with cuda_graph=False (ddpm sample --no-cuda-graph)")


def ddim_invert(
    model: Model,
    schedule: NoiseSchedule,
    x0: Tensor,
    *,
    steps: int | None = None,
    prediction: Prediction = "eps",
    spacing: Spacing = "uniform",
    callback: Callable[[SamplerStep], None] | None = None,
    progress: bool = False,
) -> Tensor:
    """Map data x0 (B, ...) to its DDIM latent x_T by running the eta=0 sampler backwards.

    Walks the same timesteps as ``sample(..., sampler="ddim", steps=steps)`` in ascending order; at
    each step the noise is predicted at the next (noisier) timestep from the current point, the usual
    approximation eps(x_t, t) ~ eps(x_{t_prev}, t) that becomes exact as steps shrink.
    ``sample(..., sampler="ddim", noise=ddim_invert(...))`` reconstructs x0.
    """
    check_choice("prediction", prediction, PREDICTIONS)
    with torch.inference_mode():  # as in sample()
        timesteps = timestep_sequence(schedule.num_steps, steps, spacing)[::-1]
        table = schedule.alphas_cumprod_float64()
        x = x0.to(schedule.device, torch.float32)
        alpha_bar_prev = torch.ones((), dtype=torch.float64)
        zero = torch.zeros((), device=schedule.device)
        for i, t in enumerate(tqdm(timesteps, desc="DDIM inversion", disable=not progress)):
            t_batch = torch.full((x.shape[0],), t, device=schedule.device, dtype=torch.long)
            pred_eps = denoise(schedule, model(x, t_batch), x, t_batch, prediction).pred_eps
            # x0 estimate at the current level alpha_bar_prev (eq. 4 solved for x0), then eq. 12 with
            # sigma = 0 towards the noisier level alpha_bar_t.
            a_prev = alpha_bar_prev.to(schedule.device, torch.float32)
            pred_x0 = (x - (1.0 - a_prev).sqrt() * pred_eps) / a_prev.sqrt()
            x_next = ddim_step(pred_x0, pred_eps, table[t].to(schedule.device, torch.float32), zero, None)
            if callback is not None:
                callback(SamplerStep(i, t, x, pred_x0, x_next))
            x, alpha_bar_prev = x_next, table[t]
    return x.clone()


def slerp(z0: Tensor, z1: Tensor, weight: float) -> Tensor:
    """Spherical interpolation between latents z0 and z1 (B, ...), each example on its own great
    circle: weight 0 gives z0, 1 gives z1. Gaussian latents keep their typical norm along the way,
    which linear interpolation would shrink (DDIM paper, sec. 5.3)."""
    if z0.shape != z1.shape:
        raise ValueError(f"slerp needs latents of one shape; got {tuple(z0.shape)} and {tuple(z1.shape)}")
    a, b = z0.flatten(1).double(), z1.flatten(1).double()
    cos = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))
    theta = cos.clamp(-1.0, 1.0).acos().unsqueeze(1)
    sin = theta.sin()
    # Nearly parallel latents: the spherical weights tend to the linear ones.
    parallel = sin.abs() < 1e-6
    w0 = torch.where(parallel, 1.0 - weight, ((1.0 - weight) * theta).sin() / sin.where(~parallel, 1.0))
    w1 = torch.where(parallel, torch.full_like(theta, weight), (weight * theta).sin() / sin.where(~parallel, 1.0))
    return (w0 * a + w1 * b).to(z0.dtype).reshape(z0.shape)
