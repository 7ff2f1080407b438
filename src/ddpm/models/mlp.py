"""Multilayer-perceptron noise predictors: the tutorials' toy image MLP and a residual MLP for points.

Both are called as ``model(x_t, t)`` and return a tensor shaped like x_t (the predicted noise);
t is a LongTensor (B,) of timesteps in 0..T-1, index 0 the least noisy step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from ddpm.models._checks import check_input_shapes
from ddpm.models.embeddings import ClassEmbedding, SinusoidalEmbedding
from ddpm.validation import check_fields, check_range, require_positive


@dataclass(frozen=True)
class ToyMLPConfig:
    """The "mlp-toy" network: one hidden layer over the flattened image and t/T."""

    channels: int = 1  # C of the (B, C, H, W) images
    image_size: int = 28  # H = W of the images
    hidden_dim: int = 512  # width of the single hidden layer
    num_steps: int = 1000  # T, to scale t to t/T in [0, 1)
    num_classes: int = 0  # classes of a class-conditional network (0: unconditional; ClassEmbedding)

    def __post_init__(self) -> None:
        check_fields(self)
        require_positive(self, "channels", "image_size", "hidden_dim", "num_steps")
        check_range("num_classes", self.num_classes, minimum=0)


class ToyMLP(nn.Module):
    """The toy diffuser of the tutorials: Linear-ReLU-Linear on [flatten(x_t), t/T], reshaped back.

    x_t: (B, C, H, W) with the configured C, H = W = image_size; t: (B,) in 0..T-1.
    Returns (B, C, H, W). The timestep enters as the single scalar feature t/T: crude (a network
    fed a raw integer t would see inputs up to 999), but normalised, and it is what the tutorial does.
    """

    preset = "mlp-toy"  # the preset this class implements with its config's defaults

    def __init__(self, config: ToyMLPConfig) -> None:
        super().__init__()
        self.config = config
        data_dim = config.channels * config.image_size**2
        self.net = nn.Sequential(
            nn.Linear(data_dim + 1, config.hidden_dim),
            nn.ReLU(),
            nn.Linear(config.hidden_dim, data_dim),
        )
        # A class adds its own bias to the hidden layer (as a one-hot input feature would).
        self.class_embed = ClassEmbedding(config.num_classes, config.hidden_dim) if config.num_classes else None

    def forward(self, x_t: Tensor, t: Tensor, labels: Tensor | None = None) -> Tensor:
        """labels: (B,) class indices of a conditional network (num_classes: no class; None: no class for all)."""
        c, s = self.config.channels, self.config.image_size
        check_input_shapes(x_t, t, (c, s, s), labels=labels, num_classes=self.config.num_classes)
        # Divide in float32: half precision cannot hold every integer t up to T exactly.
        t_feature = (t.to(torch.float32)[:, None] / self.config.num_steps).to(x_t.dtype)  # (B, 1)
        h = torch.cat([x_t.flatten(1), t_feature], dim=1)  # (B, C*H*W + 1)
        if self.class_embed is None:
            return self.net(h).view_as(x_t)
        first, activation, last = self.net
        hidden = first(h) + self.class_embed(labels, x_t.shape[0]).to(h.dtype)
        return last(activation(hidden)).view_as(x_t)


@dataclass(frozen=True)
class ResidualMLPConfig:
    """The "mlp-2d" network: a residual MLP with a sinusoidal timestep embedding, for (B, D) points."""

    data_dim: int = 2  # D of the (B, D) points
    hidden_dim: int = 256  # width of the residual stream
    num_blocks: int = 3  # residual blocks, each two Linear layers
    time_embed_dim: int = 64  # size of the sinusoidal embedding of t, before its MLP
    norm: Literal["layer", "none"] = "layer"  # LayerNorm at the start of each block and before the output, or none
    num_classes: int = 0  # classes of a class-conditional network (0: unconditional; ClassEmbedding)

    def __post_init__(self) -> None:
        check_fields(self)
        require_positive(self, "data_dim", "hidden_dim", "num_blocks", "time_embed_dim")
        check_range("num_classes", self.num_classes, minimum=0)


class ResidualMLPBlock(nn.Module):
    """h + Linear(SiLU(Linear(SiLU(norm(h))) + W temb)): the U-Net's residual block with Linear for conv.

    h: (B, hidden_dim); temb: (B, hidden_dim), already passed through SiLU. Returns (B, hidden_dim).
    """

    def __init__(self, hidden_dim: int, norm: str) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden_dim) if norm == "layer" else nn.Identity()
        self.linear1 = nn.Linear(hidden_dim, hidden_dim)
        self.temb_proj = nn.Linear(hidden_dim, hidden_dim)
        self.linear2 = nn.Linear(hidden_dim, hidden_dim)

    def forward(self, h: Tensor, temb: Tensor) -> Tensor:
        z = self.linear1(nn.functional.silu(self.norm(h))) + self.temb_proj(temb)
        return h + self.linear2(nn.functional.silu(z))


class ResidualMLP(nn.Module):
    """Noise predictor for point data: input Linear, residual blocks conditioned on t, output Linear.

    x_t: (B, D); t: (B,) in 0..T-1, embedded sinusoidally then by a two-layer MLP (as in the U-Net),
    so no schedule length is needed. Returns (B, D), unbounded.
    """

    preset = "mlp-2d"

    def __init__(self, config: ResidualMLPConfig) -> None:
        super().__init__()
        self.config = config
        hidden = config.hidden_dim
        self.time_embed = SinusoidalEmbedding(config.time_embed_dim)
        self.time_mlp = nn.Sequential(nn.Linear(config.time_embed_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.input_proj = nn.Linear(config.data_dim, hidden)
        self.blocks = nn.ModuleList(ResidualMLPBlock(hidden, config.norm) for _ in range(config.num_blocks))
        self.output_norm = nn.LayerNorm(hidden) if config.norm == "layer" else nn.Identity()
        self.output_proj = nn.Linear(hidden, config.data_dim)
        # Made last, so that the other weights are those of the unconditional network of the same seed.
        self.class_embed = ClassEmbedding(config.num_classes, hidden) if config.num_classes else None

    def forward(self, x_t: Tensor, t: Tensor, labels: Tensor | None = None) -> Tensor:
        """labels: (B,) class indices of a conditional network (num_classes: no class; None: no class for all)."""
        check_input_shapes(x_t, t, (self.config.data_dim,), labels=labels, num_classes=self.config.num_classes)
        # The embedding is computed in float32 (exact for integer t) and cast to the model's dtype.
        temb = self.time_mlp(self.time_embed(t).to(x_t.dtype))  # (B, hidden)
        if self.class_embed is not None:  # the class joins the timestep, as in the U-Net
            temb = temb + self.class_embed(labels, x_t.shape[0]).to(temb.dtype)
        # SiLU once here rather than in every block: each block projects SiLU(temb).
        temb = nn.functional.silu(temb)
        h = self.input_proj(x_t)
        for block in self.blocks:
            h = block(h, temb)
        return self.output_proj(nn.functional.silu(self.output_norm(h)))
