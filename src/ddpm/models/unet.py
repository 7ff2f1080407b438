"""U-Net noise predictors: the DDPM paper's network and the tutorials' small U-Net.

Both are called as ``model(x_t, t)`` with x_t (B, C, H, W) and t a LongTensor (B,) of timesteps in
0..T-1 (index 0 the least noisy step), and return the predicted noise, shaped like x_t.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ddpm.models._checks import check_input_shapes
from ddpm.models.embeddings import ClassEmbedding, SinusoidalEmbedding
from ddpm.validation import check_fields, check_range, require_positive


# --------------------------------------------------------------------------------------------------
# The tutorials' small U-Net
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SmallUNetConfig:
    """The "unet-small" network: plain conv blocks, max-pooling, transposed convs, a learned t table."""

    in_channels: int = 1  # C of the input images
    out_channels: int | None = None  # C of the output; None: the same as in_channels (predicted noise)
    image_size: int = 28  # H = W the network is built for; divisible by 2 ** (len(channels) - 1)
    channels: tuple[int, ...] = (16, 32, 64)  # conv channels per level, coarsest last (the bottleneck)
    embed_dim: int = 16  # width of the learned timestep embedding
    num_steps: int = 1000  # T: rows of the timestep-embedding table, one per step
    num_classes: int = 0  # classes of a class-conditional network (0: unconditional; ClassEmbedding)

    def __post_init__(self) -> None:
        check_fields(self)
        require_positive(self, "in_channels", "image_size", "channels", "embed_dim", "num_steps")
        check_range("num_classes", self.num_classes, minimum=0)
        if self.out_channels is not None:
            require_positive(self, "out_channels")
        if len(self.channels) < 2:
            raise ValueError(f"channels must list at least 2 levels (encoder and bottleneck), got {self.channels!r}")
        _check_divisible(self.image_size, len(self.channels), f"channels={self.channels!r}")


class ConvBlock(nn.Module):
    """conv3x3, + a Linear projection of the timestep embedding, ReLU, conv3x3, ReLU.

    x: (B, in_ch, H, W); temb: (B, embed_dim). Returns (B, out_ch, H, W).
    """

    def __init__(self, in_ch: int, out_ch: int, embed_dim: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.temb_proj = nn.Linear(embed_dim, out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        # One bias per channel and sample: the block's features shift with the noise level.
        h = F.relu(self.conv1(x) + self.temb_proj(temb)[:, :, None, None])
        return F.relu(self.conv2(h))


class SmallUNet(nn.Module):
    """The tutorials' small U-Net.

    Encoder: a ConvBlock per level then 2x2 max-pooling; a ConvBlock bottleneck; decoder: a
    transposed conv (kernel 2, stride 2) back up, concatenation with the encoder's features at that
    resolution, a ConvBlock; a final 1x1 conv. The timestep is a row of a learned table
    ``nn.Embedding(T, embed_dim)``, so t must be an integer tensor in 0..T-1.

    x_t: (B, in_channels, H, W) with H, W divisible by 2 ** (levels - 1) (4 for the default three
    levels); t: (B,). Returns (B, out_channels, H, W).
    """

    preset = "unet-small"

    def __init__(self, config: SmallUNetConfig) -> None:
        super().__init__()
        self.config = config
        self.downsample_factor = 2 ** (len(config.channels) - 1)
        chans = config.channels
        self.time_embed = nn.Embedding(config.num_steps, config.embed_dim)
        self.encoder = nn.ModuleList()
        c = config.in_channels
        for c_out in chans[:-1]:
            self.encoder.append(ConvBlock(c, c_out, config.embed_dim))
            c = c_out
        self.bottleneck = ConvBlock(c, chans[-1], config.embed_dim)
        self.upsamplers = nn.ModuleList()
        self.decoder = nn.ModuleList()
        for c_in, c_out in zip(reversed(chans[1:]), reversed(chans[:-1])):
            self.upsamplers.append(nn.ConvTranspose2d(c_in, c_out, kernel_size=2, stride=2))
            # Input: the upsampled features and the encoder's skip, both c_out channels.
            self.decoder.append(ConvBlock(2 * c_out, c_out, config.embed_dim))
        self.output_conv = nn.Conv2d(chans[0], config.out_channels or config.in_channels, kernel_size=1)
        # Made last, so that the other weights are those of the unconditional network of the same seed.
        self.class_embed = ClassEmbedding(config.num_classes, config.embed_dim) if config.num_classes else None

    def forward(self, x_t: Tensor, t: Tensor, labels: Tensor | None = None) -> Tensor:
        """labels: (B,) class indices of a conditional network (num_classes: no class; None: no class for all)."""
        check_input_shapes(x_t, t, (self.config.in_channels, None, None), self.downsample_factor, labels,
                           self.config.num_classes)
        temb = self.time_embed(t)  # (B, embed_dim)
        if self.class_embed is not None:
            temb = temb + self.class_embed(labels, x_t.shape[0])
        skips = []
        h = x_t
        for block in self.encoder:
            h = block(h, temb)
            skips.append(h)
            h = F.max_pool2d(h, 2)
        h = self.bottleneck(h, temb)
        for upsample, block in zip(self.upsamplers, self.decoder):
            h = block(torch.cat([upsample(h), skips.pop()], dim=1), temb)
        return self.output_conv(h)


# --------------------------------------------------------------------------------------------------
# The DDPM paper's U-Net (Ho et al. 2020, App. B)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UNetConfig:
    """The paper's U-Net: a PixelCNN++-like backbone of residual blocks, with self-attention.

    Level i works at resolution image_size / 2**i with ch * channel_mult[i] channels. Attention is
    placed by level (attention_levels), so one config serves every image_size its levels divide;
    attention_resolutions names levels by their size in pixels instead, and a level listed in either
    gets attention (attention_at). The defaults are a mid-sized 28x28x1 model; the presets
    "unet-cifar10" and "unet-mnist" override them.
    """

    in_channels: int = 1  # C of the input images
    out_channels: int | None = None  # C of the output; None: the same as in_channels (predicted noise)
    image_size: int = 28  # H = W the network is built for; divisible by 2 ** (len(channel_mult) - 1)
    ch: int = 64  # base channel count; also the size of the sinusoidal timestep embedding
    channel_mult: tuple[int, ...] = (1, 2, 2)  # channels of each level as multiples of ch, finest first
    num_res_blocks: int = 2  # residual blocks per level in the encoder (the decoder has one more)
    attention_levels: tuple[int, ...] = (1,)  # indices into channel_mult with self-attention; (1,): at half resolution
    attention_resolutions: tuple[int, ...] = ()  # the same by feature-map size H in pixels; either one adds attention
    dropout: float = 0.1  # dropout rate inside each residual block, before its second conv
    num_groups: int = 32  # GroupNorm groups; must divide every channel count
    zero_init: bool = True  # zero the last conv of each residual and attention block and the output conv
    num_classes: int = 0  # classes of a class-conditional network (0: unconditional; ClassEmbedding)
    # Where implementations differ (diffusers' UNet2DModel names in brackets); the defaults are ddpm's own,
    # google/ddpm-cifar10-32 (the paper's TensorFlow model) has 1e-6, 1, 0 and None.
    norm_eps: float = 1e-5  # epsilon of every GroupNorm [norm_eps]
    time_freq_shift: float = 0.0  # timestep frequencies 10000 ** (-i / (ch / 2 - shift)) [freq_shift]
    downsample_padding: int = 1  # 1: a pixel on every side; 0: on the right and bottom only (TF's "SAME") [same]
    attention_head_dim: int | None = None  # channels per attention head; None: one head [attention_head_dim]

    def __post_init__(self) -> None:
        check_fields(self)
        require_positive(self, "in_channels", "image_size", "ch", "channel_mult", "num_res_blocks", "num_groups")
        check_range("num_classes", self.num_classes, minimum=0)
        check_range("norm_eps", self.norm_eps, above=0.0)
        check_range("time_freq_shift", self.time_freq_shift, minimum=0.0, below=self.ch // 2)
        if self.downsample_padding not in (0, 1):
            raise ValueError(f"downsample_padding={self.downsample_padding!r}: use 1 (every side) or 0 (right and "
                             "bottom only)")
        if self.attention_head_dim is not None:
            require_positive(self, "attention_head_dim")
            widths = sorted({self.ch * self.channel_mult[level] for level in range(len(self.channel_mult))
                             if self.attention_at(level)} | {self.ch * self.channel_mult[-1]})
            if any(c % self.attention_head_dim for c in widths):
                raise ValueError(f"attention_head_dim={self.attention_head_dim} must divide the channels of every "
                                 f"attention block: {', '.join(map(str, widths))}")
        if self.out_channels is not None:
            require_positive(self, "out_channels")
        if not self.channel_mult:
            raise ValueError("channel_mult must list at least one level, got ()")
        check_range("dropout", self.dropout, minimum=0.0, below=1.0)
        num_levels = len(self.channel_mult)
        _check_divisible(self.image_size, num_levels, f"channel_mult={self.channel_mult!r}")
        for level in self.attention_levels:
            if not 0 <= level < num_levels:
                raise ValueError(
                    f"attention_levels={self.attention_levels!r}: {level} is not a level; channel_mult="
                    f"{self.channel_mult!r} gives {num_levels} levels, numbered 0 to {num_levels - 1}")
        resolutions = self.resolutions
        for r in self.attention_resolutions:
            if r not in resolutions:
                raise ValueError(
                    f"attention_resolutions={self.attention_resolutions!r}: {r} is never reached; with "
                    f"image_size={self.image_size} and {num_levels} levels this U-Net works at "
                    f"resolutions {', '.join(map(str, resolutions))}")
        channels = sorted({self.ch * m for m in (1, *self.channel_mult)})
        if any(c % self.num_groups for c in channels):
            suggestion = math.gcd(*channels)
            raise ValueError(
                f"num_groups={self.num_groups} must divide every channel count, but ch={self.ch} with "
                f"channel_mult={self.channel_mult!r} gives channels {', '.join(map(str, channels))}; "
                f"a divisor of {suggestion} works (e.g. num_groups={_largest_divisor_at_most(suggestion, 32)})")

    @property
    def resolutions(self) -> tuple[int, ...]:
        """The feature-map size H of each level, finest first: (28, 14, 7) for 28x28 and three levels."""
        return tuple(self.image_size // 2**i for i in range(len(self.channel_mult)))

    def attention_at(self, level: int) -> bool:
        """Whether the residual blocks of ``level`` (an index into channel_mult) are followed by
        self-attention: the level is in attention_levels or its resolution in attention_resolutions."""
        return level in self.attention_levels or self.resolutions[level] in self.attention_resolutions


class Dropout(nn.Module):
    """Dropout (Srivastava et al. 2014): in training, zero each element with probability p and scale
    the rest by 1 / (1 - p); the identity in eval mode. Same law as ``nn.Dropout``, cheaper mask.

    The mask is a U[0, 1) draw compared with p (seeded by the global generator, as nn.Dropout),
    which on a CPU costs less than half of the Bernoulli sampler nn.Dropout uses (54 against 129 ms
    over 3 unet-mnist steps; that sampler took 10% of a step, docs/performance.md). The masks differ
    from nn.Dropout's, their law does not (tests/test_models.py). The draw is float32 whatever x's
    dtype: PyTorch's bf16 draws (rand_like of a bf16 activation under autocast) are multiples of
    1/256, so P(u >= 0.1) would be 230/256 = 0.898 instead of 0.9.
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = torch.rand_like(x, dtype=torch.float32) >= self.p  # P(keep) = 1 - p exactly: U[0, 1) >= p
        return x * keep / (1.0 - self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class ResidualBlock(nn.Module):
    """The paper's residual block: GroupNorm, SiLU, conv3x3, + W SiLU(temb), GroupNorm, SiLU, dropout, conv3x3.

    The timestep enters between the two convs as a per-channel bias, ``temb_proj(SiLU(temb))``; the
    skip path is a 1x1 conv when the channel count changes. x: (B, in_ch, H, W); temb_bias:
    (B, out_ch), this block's projection of the timestep embedding (the U-Net computes those of all
    its blocks in one matrix product, UNet.timestep_biases). Returns (B, out_ch, H, W).
    """

    def __init__(self, in_ch: int, out_ch: int, temb_dim: int, num_groups: int, dropout: float,
                 zero_init: bool, eps: float = 1e-5) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(num_groups, in_ch, eps=eps)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.temb_proj = nn.Linear(temb_dim, out_ch)
        self.norm2 = nn.GroupNorm(num_groups, out_ch, eps=eps)
        self.dropout = Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()
        if zero_init:
            # The block starts as the identity (or the 1x1 skip), so a deep stack starts well conditioned.
            _zero(self.conv2)

    def forward(self, x: Tensor, temb_bias: Tensor) -> Tensor:
        # The two additions are made in place on conv outputs, which no backward pass needs: one
        # fresh activation less each (the convs keep their inputs, norm2 its input after the add).
        h = self.conv1(F.silu(self.norm1(x)))
        h += temb_bias[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return h.add_(self.skip(x))


class AttentionBlock(nn.Module):
    """Self-attention over the H*W positions, with a residual connection: one head (the paper's), or
    C / head_dim heads, each a contiguous slice of head_dim channels of q, k and v.

    GroupNorm, a 1x1 conv to queries, keys and values, softmax(q k^T / sqrt(d)) v through
    ``F.scaled_dot_product_attention`` (d: the head's channels), a 1x1 output projection.
    x: (B, C, H, W) -> (B, C, H, W).

    The 1x1 convs are applied as matrix products over the tokens (the same weights, kept as conv
    weights so checkpoints do not change). That leaves q, k and v with a contiguous last dimension,
    which the fused attention kernels need; from a channels_last input no copy is made at all.
    """

    def __init__(self, channels: int, num_groups: int, zero_init: bool, eps: float = 1e-5,
                 head_dim: int | None = None) -> None:
        super().__init__()
        self.heads = 1 if head_dim is None else channels // head_dim
        self.norm = nn.GroupNorm(num_groups, channels, eps=eps)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)
        if zero_init:
            _zero(self.proj_out)

    def forward(self, x: Tensor) -> Tensor:
        b, c, height, width = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # (B, H*W, C): one token per position
        qkv = F.linear(tokens, self.qkv.weight.flatten(1), self.qkv.bias)  # (B, H*W, 3C)
        if self.heads == 1:
            q, k, v = qkv[:, None].chunk(3, dim=-1)  # each (B, 1 head, H*W, C)
            h = F.scaled_dot_product_attention(q, k, v)[:, 0]  # (B, H*W, C); default scale is 1/sqrt(C)
        else:
            q, k, v = qkv.unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)  # each (B, heads, H*W, d)
            h = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)  # (B, H*W, C); scale 1/sqrt(d)
        h = F.linear(h, self.proj_out.weight.flatten(1), self.proj_out.bias)  # (B, H*W, C)
        return x + h.transpose(1, 2).reshape(b, c, height, width)


class Downsample(nn.Module):
    """Halve H and W with a stride-2 conv3x3. (B, C, H, W) -> (B, C, H/2, W/2). padding 1 pads every
    side; 0 pads one pixel on the right and bottom only, as TensorFlow's "SAME" (the paper's code)."""

    def __init__(self, channels: int, padding: int = 1) -> None:
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=padding)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x if self.padding else F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour 2x, then conv3x3. (B, C, H, W) -> (B, C, 2H, 2W)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UNetLevel(nn.Module):
    """One resolution of the encoder or the decoder: residual blocks, each followed by self-attention
    where the level has it, then an optional resampling layer (Downsample, Upsample or None)."""

    def __init__(self, res_blocks: list[ResidualBlock], attention: list[nn.Module],
                 resample: nn.Module | None) -> None:
        super().__init__()
        self.res_blocks = nn.ModuleList(res_blocks)
        self.attn_blocks = nn.ModuleList(attention)  # nn.Identity where the level has no attention
        self.resample = resample


class UNet(nn.Module):
    """The DDPM U-Net (Ho et al. 2020, App. B; the official TensorFlow model's structure).

    Timestep: a sinusoidal embedding of size ch, then Linear(ch, 4ch), SiLU, Linear(4ch, 4ch); every
    residual block adds its own Linear projection of it. Encoder: a conv3x3 to ch channels, then per
    level num_res_blocks residual blocks (with attention at the chosen levels) and a stride-2 conv
    down, except at the last level. Middle: residual block, attention, residual block. Decoder:
    per level num_res_blocks + 1 residual blocks, each taking the concatenation of the previous
    output and one encoder activation (every encoder output is used exactly once, last in first out),
    then nearest 2x + conv3x3 up, except at the finest level. Output: GroupNorm, SiLU, conv3x3.

    x_t: (B, in_channels, H, W) with H, W divisible by 2 ** (levels - 1); H, W need not equal
    image_size (which only turns attention_resolutions into levels). t: (B,) integer timesteps (a
    float t also works, the embedding being sinusoidal). Returns (B, out_channels, H, W), unbounded.
    """

    preset = "unet"

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = config
        num_levels = len(config.channel_mult)
        self.downsample_factor = 2 ** (num_levels - 1)
        temb_dim = 4 * config.ch

        def res_block(c_in: int, c_out: int) -> ResidualBlock:
            return ResidualBlock(c_in, c_out, temb_dim, config.num_groups, config.dropout, config.zero_init,
                                 config.norm_eps)

        def attention(c: int, level: int) -> nn.Module:
            if config.attention_at(level):
                return AttentionBlock(c, config.num_groups, config.zero_init, config.norm_eps, config.attention_head_dim)
            return nn.Identity()

        self.time_embed = SinusoidalEmbedding(config.ch, shift=config.time_freq_shift)
        self.time_mlp = nn.Sequential(nn.Linear(config.ch, temb_dim), nn.SiLU(), nn.Linear(temb_dim, temb_dim))
        self.input_conv = nn.Conv2d(config.in_channels, config.ch, 3, padding=1)

        # Encoder. skip_channels tracks the channels of every activation the decoder will concatenate.
        level_channels = [config.ch * m for m in config.channel_mult]
        skip_channels = [config.ch]
        c = config.ch
        self.down = nn.ModuleList()
        for i, c_out in enumerate(level_channels):
            blocks, attns = [], []
            for _ in range(config.num_res_blocks):
                blocks.append(res_block(c, c_out))
                attns.append(attention(c_out, i))
                c = c_out
                skip_channels.append(c)
            downsample = Downsample(c, config.downsample_padding) if i < num_levels - 1 else None
            if downsample is not None:
                skip_channels.append(c)
            self.down.append(UNetLevel(blocks, attns, downsample))

        self.mid_block1 = res_block(c, c)
        self.mid_attn = AttentionBlock(c, config.num_groups, config.zero_init, config.norm_eps,
                                       config.attention_head_dim)
        self.mid_block2 = res_block(c, c)

        # Decoder: one block more per level than the encoder, to use the downsampled activations too.
        self.up = nn.ModuleList()
        for i in reversed(range(num_levels)):
            c_out = level_channels[i]
            blocks, attns = [], []
            for _ in range(config.num_res_blocks + 1):
                blocks.append(res_block(c + skip_channels.pop(), c_out))
                attns.append(attention(c_out, i))
                c = c_out
            self.up.append(UNetLevel(blocks, attns, Upsample(c) if i > 0 else None))
        assert not skip_channels, "every encoder activation is used exactly once"

        # Every residual block in the order forward() runs them, for timestep_biases.
        self.res_blocks_in_order = [
            *(b for level in self.down for b in level.res_blocks), self.mid_block1, self.mid_block2,
            *(b for level in self.up for b in level.res_blocks)]

        self.output_norm = nn.GroupNorm(config.num_groups, c, eps=config.norm_eps)
        self.output_conv = nn.Conv2d(c, config.out_channels or config.in_channels, 3, padding=1)
        if config.zero_init:
            # The network starts by predicting eps = 0, the mean of the target, instead of a random field.
            _zero(self.output_conv)
        # Made last, so that the other weights are those of the unconditional network of the same seed.
        self.class_embed = ClassEmbedding(config.num_classes, temb_dim) if config.num_classes else None

    def forward(self, x_t: Tensor, t: Tensor, labels: Tensor | None = None) -> Tensor:
        """labels: (B,) class indices of a conditional network (num_classes: no class; None: no class for all)."""
        check_input_shapes(x_t, t, (self.config.in_channels, None, None), self.downsample_factor, labels,
                           self.config.num_classes)
        # The embedding is computed in float32 (exact for integer t) and cast to the model's dtype.
        temb = self.time_mlp(self.time_embed(t).to(x_t.dtype))  # (B, 4ch)
        if self.class_embed is not None:  # the class joins the timestep (improved-diffusion's way)
            temb = temb + self.class_embed(labels, x_t.shape[0]).to(temb.dtype)
        # SiLU once here rather than in every block: each block projects SiLU(temb).
        temb = F.silu(temb)
        biases = iter(self.timestep_biases(temb))  # one (B, C) bias per residual block, in order
        h = self.input_conv(x_t)
        skips = [h]
        for level in self.down:
            for block, attn in zip(level.res_blocks, level.attn_blocks):
                h = attn(block(h, next(biases)))
                skips.append(h)
            if level.resample is not None:
                h = level.resample(h)
                skips.append(h)
        h = self.mid_block1(h, next(biases))
        h = self.mid_block2(self.mid_attn(h), next(biases))
        for level in self.up:
            for block, attn in zip(level.res_blocks, level.attn_blocks):
                h = attn(block(torch.cat([h, skips.pop()], dim=1), next(biases)))
            if level.resample is not None:
                h = level.resample(h)
        return self.output_conv(F.silu(self.output_norm(h)))

    def timestep_biases(self, temb: Tensor) -> tuple[Tensor, ...]:
        """Each residual block's ``temb_proj(temb)``, in the order of res_blocks_in_order.

        One matrix product with the blocks' Linear weights stacked, instead of one small product per
        block (15-21 of them, each too small to keep two cores busy). The weights stay in their
        blocks, so checkpoints do not change. temb: (B, 4ch) -> tuple of (B, out_ch) per block.
        """
        projections = [block.temb_proj for block in self.res_blocks_in_order]
        weight = torch.cat([p.weight for p in projections])
        bias = torch.cat([p.bias for p in projections])
        return F.linear(temb, weight, bias).split([p.out_features for p in projections], dim=1)


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------


def _check_divisible(image_size: int, num_levels: int, levels_from: str) -> None:
    factor = 2 ** (num_levels - 1)
    if image_size % factor:
        raise ValueError(
            f"image_size={image_size} must be divisible by {factor}: {levels_from} gives {num_levels} "
            f"levels, so the resolution is halved {num_levels - 1} times")


def _largest_divisor_at_most(n: int, limit: int) -> int:
    return max(d for d in range(1, min(n, limit) + 1) if n % d == 0)


def _zero(layer: nn.Conv2d) -> None:
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
