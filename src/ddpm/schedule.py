"""Noise schedules: the betas of the forward process and every table derived from them.

Timesteps are indexed t in {0, ..., T-1}; index t here is step t+1 of the paper, so
``alphas_cumprod[0] = 1 - betas[0]`` and ``alphas_cumprod_prev[0] = 1`` (the clean data).
Tables are computed in float64 and stored as float32 tensors.
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch
from torch import Tensor

ScheduleKind = Literal["linear", "cosine", "sigmoid"]
SCHEDULE_KINDS: tuple[str, ...] = get_args(ScheduleKind)


def linear_betas(num_steps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """Betas evenly spaced from beta_start to beta_end (Ho et al. 2020, sec. 4: 1e-4 to 0.02 for T=1000)."""
    return torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64)


def betas_from_alpha_bar(alpha_bar: Tensor, max_beta: float = 0.999) -> Tensor:
    """Betas of a schedule given by alpha_bar on the grid 0, 1/T, ..., 1 (T+1 values).

    beta_t = 1 - alpha_bar(t+1) / alpha_bar(t), capped at ``max_beta`` so the last steps do
    not destroy the signal in a single jump (Nichol & Dhariwal 2021, sec. 3.2).
    """
    betas = 1.0 - alpha_bar[1:] / alpha_bar[:-1]
    return betas.clamp(min=0.0, max=max_beta)


def cosine_alpha_bar(u: Tensor, s: float = 0.008) -> Tensor:
    """alpha_bar(u) = f(u) / f(0) with f(u) = cos^2((u + s) / (1 + s) * pi / 2), u = t/T in [0, 1]."""
    f = torch.cos((u + s) / (1 + s) * (math.pi / 2)) ** 2
    f0 = math.cos(s / (1 + s) * (math.pi / 2)) ** 2
    return f / f0


def cosine_betas(num_steps: int, s: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """The cosine schedule of Nichol & Dhariwal 2021 (eq. 17), with beta capped at ``max_beta``."""
    u = torch.linspace(0.0, 1.0, num_steps + 1, dtype=torch.float64)
    return betas_from_alpha_bar(cosine_alpha_bar(u, s), max_beta)


def sigmoid_alpha_bar(u: Tensor, start: float = -3.0, end: float = 3.0, tau: float = 1.0) -> Tensor:
    """A sigmoid-shaped alpha_bar(u), u in [0, 1], from 1 at u=0 to 0 at u=1 (Chen 2023, "On the
    importance of noise scheduling for diffusion models", Algorithm 1)."""
    v_start = torch.sigmoid(torch.tensor(start / tau, dtype=torch.float64))
    v_end = torch.sigmoid(torch.tensor(end / tau, dtype=torch.float64))
    v = torch.sigmoid((u * (end - start) + start) / tau)
    return (v_end - v) / (v_end - v_start)


def sigmoid_betas(num_steps: int, start: float = -3.0, end: float = 3.0, tau: float = 1.0,
                  max_beta: float = 0.999) -> Tensor:
    """Betas of the sigmoid schedule, capped at ``max_beta``."""
    u = torch.linspace(0.0, 1.0, num_steps + 1, dtype=torch.float64)
    return betas_from_alpha_bar(sigmoid_alpha_bar(u, start, end, tau), max_beta)


def posterior_coefficients(alpha_bar_t: Tensor, alpha_bar_prev: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Mean coefficients and variance of q(x_prev | x_t, x0) between any two noise levels (eq. 6-7).

    With beta = 1 - alpha_bar_t / alpha_bar_prev (one step, or several steps merged):
        mean = coef1 * x0 + coef2 * x_t,
        coef1 = sqrt(alpha_bar_prev) * beta / (1 - alpha_bar_t),
        coef2 = sqrt(1 - beta) * (1 - alpha_bar_prev) / (1 - alpha_bar_t),
        variance = (1 - alpha_bar_prev) / (1 - alpha_bar_t) * beta.
    The same function builds the schedule's tables and the sampler's coefficients for skipped steps.
    """
    beta = 1.0 - alpha_bar_t / alpha_bar_prev
    coef1 = alpha_bar_prev.sqrt() * beta / (1.0 - alpha_bar_t)
    coef2 = (1.0 - beta).sqrt() * (1.0 - alpha_bar_prev) / (1.0 - alpha_bar_t)
    variance = (1.0 - alpha_bar_prev) / (1.0 - alpha_bar_t) * beta
    return coef1, coef2, variance


class NoiseSchedule:
    """The forward-process variances beta_t and every table derived from them.

    ``NoiseSchedule("linear", 1000)`` is the paper's schedule; ``NoiseSchedule(betas=...)`` takes
    explicit betas (then ``kind`` is "custom", and kind and num_steps are left out). All tables have
    shape (T,) and are indexed by t in {0, ..., T-1}; use ``extract`` to broadcast them against a batch.

    Attributes (float32 tensors of shape (T,)):
        betas, alphas (1 - beta), alphas_cumprod (alpha_bar_t), alphas_cumprod_prev (alpha_bar_{t-1},
        1 at t=0), sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, sqrt_recip_alphas_cumprod,
        sqrt_recipm1_alphas_cumprod, posterior_variance (beta tilde, eq. 7; 0 at t=0),
        posterior_log_variance_clipped (log of beta tilde with the t=0 entry replaced by t=1's, so it
        stays finite), posterior_mean_coef1 / posterior_mean_coef2 (eq. 7), snr (alpha_bar / (1 - alpha_bar)).
    """

    _TABLES = (
        "betas", "alphas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
        "sqrt_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
        "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1",
        "posterior_mean_coef2", "snr",
    )

    def __init__(
        self,
        kind: ScheduleKind | None = None,
        num_steps: int | None = None,
        *,
        betas: Tensor | list[float] | None = None,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        cosine_s: float = 0.008,
        max_beta: float = 0.999,
    ) -> None:
        if betas is not None:
            betas64 = torch.as_tensor(betas, dtype=torch.float64).cpu()
            if betas64.dim() != 1 or betas64.numel() < 1:
                raise ValueError(f"explicit betas must be a 1-D sequence of at least one value (one per step); "
                                 f"got shape {tuple(betas64.shape)}")
            if kind not in (None, "custom") or num_steps not in (None, betas64.numel()):
                raise ValueError(f"betas= gives the schedule itself: leave out kind and num_steps (got "
                                 f"kind={kind!r}, num_steps={num_steps!r} with {betas64.numel()} betas)")
            kind = "custom"
            num_steps = betas64.numel()
        else:
            kind = "linear" if kind is None else kind
            num_steps = 1000 if num_steps is None else num_steps
            if kind not in SCHEDULE_KINDS:
                raise ValueError(f"unknown schedule kind {kind!r}; allowed: {', '.join(SCHEDULE_KINDS)} "
                                 "(or pass betas=...)")
            if not isinstance(num_steps, int) or isinstance(num_steps, bool) or num_steps < 1:
                raise ValueError(f"num_steps must be an integer >= 1; got {num_steps!r}")
            if kind == "linear":
                if not 0.0 < beta_start <= beta_end < 1.0:
                    raise ValueError("linear schedule needs 0 < beta_start <= beta_end < 1; "
                                     f"got beta_start={beta_start}, beta_end={beta_end}")
                betas64 = linear_betas(num_steps, beta_start, beta_end)
            elif kind == "cosine":
                betas64 = cosine_betas(num_steps, cosine_s, max_beta)
            else:
                betas64 = sigmoid_betas(num_steps, max_beta=max_beta)
        if not bool(torch.isfinite(betas64).all()) or not bool(((betas64 > 0) & (betas64 < 1)).all()):
            raise ValueError("every beta must lie in the open interval (0, 1); "
                             f"got min {betas64.min().item():.3g}, max {betas64.max().item():.3g}")
        self.kind = kind
        self._betas64 = betas64
        self._set_tables(_tables_from_betas(betas64))

    def _set_tables(self, tables: dict[str, Tensor]) -> None:
        for name in self._TABLES:
            setattr(self, name, tables[name])

    @property
    def num_steps(self) -> int:
        """T, the number of diffusion steps."""
        return self.betas.shape[0]

    def alphas_cumprod_float64(self) -> Tensor:
        """alpha_bar_t in float64 on the CPU, for coefficients between non-adjacent steps, where
        1 - alpha_bar_t / alpha_bar_s computed from float32 values would lose digits."""
        return torch.cumprod(1.0 - self._betas64, dim=0)

    @property
    def device(self) -> torch.device:
        return self.betas.device

    def to(self, device: torch.device | str) -> "NoiseSchedule":
        """A copy of this schedule with every table on ``device`` (the original is unchanged)."""
        moved = object.__new__(NoiseSchedule)
        moved.kind = self.kind
        moved._betas64 = self._betas64
        moved._set_tables({name: getattr(self, name).to(device) for name in self._TABLES})
        return moved

    def __repr__(self) -> str:
        return f"NoiseSchedule(kind={self.kind!r}, num_steps={self.num_steps}, device={str(self.device)!r})"


def _tables_from_betas(betas: Tensor) -> dict[str, Tensor]:
    """Every table of a schedule from float64 betas of shape (T,); returned as float32."""
    alphas = 1.0 - betas
    alphas_cumprod = torch.cumprod(alphas, dim=0)
    # alpha_bar before the first step is 1 (clean data): never read alphas_cumprod[t - 1] at t = 0,
    # which in Python silently wraps round to the last, noisiest entry.
    alphas_cumprod_prev = torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
    coef1, coef2, posterior_variance = posterior_coefficients(alphas_cumprod, alphas_cumprod_prev)
    # beta tilde is 0 at t = 0; its log is clipped to the t = 1 value to stay finite (as in the
    # official implementation). With T = 1 there is no t = 1, and beta_0 stands in.
    first = posterior_variance[1:2] if betas.numel() > 1 else betas[:1]
    posterior_log_variance_clipped = torch.log(torch.cat([first, posterior_variance[1:]]))
    tables = {
        "betas": betas,
        "alphas": alphas,
        "alphas_cumprod": alphas_cumprod,
        "alphas_cumprod_prev": alphas_cumprod_prev,
        "sqrt_alphas_cumprod": alphas_cumprod.sqrt(),
        "sqrt_one_minus_alphas_cumprod": (1.0 - alphas_cumprod).sqrt(),
        "sqrt_recip_alphas_cumprod": alphas_cumprod.rsqrt(),
        "sqrt_recipm1_alphas_cumprod": (1.0 / alphas_cumprod - 1.0).sqrt(),
        "posterior_variance": posterior_variance,
        "posterior_log_variance_clipped": posterior_log_variance_clipped,
        "posterior_mean_coef1": coef1,
        "posterior_mean_coef2": coef2,
        "snr": alphas_cumprod / (1.0 - alphas_cumprod),
    }
    return {name: table.to(torch.float32) for name, table in tables.items()}


def extract(table: Tensor, t: Tensor, shape: torch.Size | tuple[int, ...]) -> Tensor:
    """Gather ``table[t]`` and reshape it to (B, 1, ..., 1) so it broadcasts against ``shape``.

    table: (T,); t: LongTensor (B,); shape: the shape of the batch, (B, ...). Works the same for
    points (B, D) and images (B, C, H, W).
    """
    out = table.gather(0, t)
    return out.reshape(t.shape[0], *([1] * (len(shape) - 1)))


def check_timesteps(schedule: NoiseSchedule, t: Tensor, batch_size: int | None = None) -> None:
    """Raise ValueError unless t is an integer tensor of shape (B,) with values in 0..T-1."""
    if not isinstance(t, Tensor) or t.dtype.is_floating_point or t.dtype == torch.bool or t.dtype.is_complex:
        raise ValueError(f"t must be an integer tensor of timesteps; got {type(t).__name__}"
                         + (f" of dtype {t.dtype}" if isinstance(t, Tensor) else ""))
    if t.dim() != 1 or (batch_size is not None and t.shape[0] != batch_size):
        raise ValueError(f"t must have shape ({batch_size if batch_size is not None else 'B'},); "
                         f"got {tuple(t.shape)}")
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= schedule.num_steps):
        raise ValueError(f"timesteps must lie in 0..{schedule.num_steps - 1} (T={schedule.num_steps}); "
                         f"got values from {int(t.min())} to {int(t.max())}")
