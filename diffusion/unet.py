"""U-Net noise predictor (the DDPM architecture of Ho et al. 2020). It knows nothing of diffusion: it maps
(x, t, y) to a tensor of x's shape, with t an integer timestep per image and y an optional class label."""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from diffusion.errors import ConfigError

GROUPS = 8


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Transformer-style sinusoidal embedding of (integer) timesteps: [B] -> [B, dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(GROUPS, in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_dim, out_ch)
        self.norm2 = nn.GroupNorm(GROUPS, out_ch)
        self.dropout = nn.Dropout(dropout)
        # Zero-initialised last conv: every block starts as the identity, which keeps early training stable.
        self.conv2 = _zero(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(F.silu(emb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class SelfAttention(nn.Module):
    def __init__(self, channels: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm = nn.GroupNorm(GROUPS, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = _zero(nn.Conv2d(channels, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.num_heads, c // self.num_heads, h * w).unbind(1)
        out = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest upsampling to the encoder's size at that level (7 -> 14 as well as 4 -> 7), then a conv."""

    def __init__(self, channels: int, size: int) -> None:
        super().__init__()
        self.size = size
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, size=(self.size, self.size), mode="nearest"))


class Level(nn.Module):
    """The blocks of one resolution: residual blocks, each followed by attention where asked."""

    def __init__(self, blocks: list[ResBlock], attention: list[nn.Module]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.attention = nn.ModuleList(attention)


class UNet(nn.Module):
    """DDPM U-Net for square images of a fixed size.

    Args:
        in_channels: image channels (1 for MNIST, 3 for CIFAR-10); linked from the data in the CLI.
        image_size: image height and width; linked from the data in the CLI.
        base_channels: channels at full resolution.
        channel_mults: one multiplier of ``base_channels`` per resolution level; each level after the first
            halves the resolution (28 -> 14 -> 7 -> 4; 32 -> 16 -> 8 -> 4).
        num_res_blocks: residual blocks per level in the encoder; the decoder has one more.
        attention_resolutions: resolutions (in pixels, e.g. ``[7]`` or ``[16]``) that get self-attention.
        num_heads: attention heads.
        dropout: dropout inside the residual blocks.
        time_embed_dim: size of the sinusoidal timestep embedding (an MLP maps it to 4 x base_channels).
        num_classes: 0 for an unconditional net; otherwise a learnt embedding per class is added to the
            timestep embedding, plus one more for "no label" (index ``num_classes``, the null label of
            classifier-free guidance), used wherever ``y`` is None.
    """

    def __init__(
        self,
        in_channels: int = 1,
        image_size: int = 28,
        base_channels: int = 64,
        channel_mults: Sequence[int] = (1, 2, 4, 4),
        num_res_blocks: int = 2,
        attention_resolutions: Sequence[int] = (7,),
        num_heads: int = 4,
        dropout: float = 0.0,
        time_embed_dim: int = 128,
        num_classes: int = 0,
    ) -> None:
        super().__init__()
        channel_mults = list(channel_mults)
        attention_resolutions = list(attention_resolutions)
        self._validate(in_channels, image_size, base_channels, channel_mults, num_res_blocks, num_heads, dropout)
        self.in_channels = in_channels
        self.image_size = image_size
        self.time_embed_dim = time_embed_dim
        if num_classes < 0:
            raise ConfigError(f"num_classes must be >= 0 (0: unconditional), got {num_classes}.")
        self.num_classes = num_classes

        resolutions = [image_size]
        for _ in channel_mults[1:]:
            resolutions.append((resolutions[-1] + 1) // 2)  # a stride-2 conv with padding 1 rounds up
        if resolutions[-1] < 2:
            raise ConfigError(
                f"image_size {image_size} is too small for {len(channel_mults)} resolution levels "
                f"({' -> '.join(map(str, resolutions))}): use fewer channel_mults or larger images."
            )
        unknown = sorted(set(attention_resolutions) - set(resolutions))
        if unknown:
            raise ConfigError(
                f"attention_resolutions {unknown} are not resolutions of this U-Net; for {image_size}x{image_size} "
                f"images its levels are {resolutions}."
            )
        self.resolutions = resolutions

        emb_dim = 4 * base_channels
        self.time_mlp = nn.Sequential(nn.Linear(time_embed_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        # Zero-initialised, so a conditional net starts as the unconditional one and learns what labels add.
        self.label_emb: nn.Embedding | None = None
        if num_classes:
            self.label_emb = nn.Embedding(num_classes + 1, emb_dim)
            nn.init.zeros_(self.label_emb.weight)
        self.conv_in = nn.Conv2d(in_channels, base_channels, 3, padding=1)

        def level(in_ch: int, out_ch: int, n: int, res: int, skip_chs: list[int] | None) -> Level:
            blocks, attn = [], []
            for j in range(n):
                extra = skip_chs.pop() if skip_chs is not None else 0
                blocks.append(ResBlock((in_ch if j == 0 else out_ch) + extra, out_ch, emb_dim, dropout))
                use_attn = res in attention_resolutions
                attn.append(SelfAttention(out_ch, num_heads) if use_attn else nn.Identity())
            return Level(blocks, attn)

        ch = base_channels
        skip_chs = [ch]
        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        for i, mult in enumerate(channel_mults):
            out_ch = base_channels * mult
            self.down.append(level(ch, out_ch, num_res_blocks, resolutions[i], None))
            ch = out_ch
            skip_chs += [ch] * num_res_blocks
            if i < len(channel_mults) - 1:
                self.downsample.append(Downsample(ch))
                skip_chs.append(ch)

        self.mid1 = ResBlock(ch, ch, emb_dim, dropout)
        self.mid_attn = SelfAttention(ch, num_heads)
        self.mid2 = ResBlock(ch, ch, emb_dim, dropout)

        self.up = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for i, mult in reversed(list(enumerate(channel_mults))):
            out_ch = base_channels * mult
            self.up.append(level(ch, out_ch, num_res_blocks + 1, resolutions[i], skip_chs))
            ch = out_ch
            if i > 0:
                self.upsample.append(Upsample(ch, resolutions[i - 1]))
        assert not skip_chs

        self.norm_out = nn.GroupNorm(GROUPS, ch)
        self.conv_out = _zero(nn.Conv2d(ch, in_channels, 3, padding=1))

    def _labels(self, y: Tensor | None, batch: int, device: torch.device) -> Tensor:
        if y is None:
            return torch.full((batch,), self.null_label, device=device, dtype=torch.long)
        if y.shape != (batch,):
            raise ConfigError(f"y must hold one class label per image, shape [{batch}], got {list(y.shape)}.")
        # Their range is checked where labels enter (data setup, `sample`), not here: that would cost a host
        # sync at every network call.
        return y.long()

    @staticmethod
    def _validate(in_channels, image_size, base_channels, channel_mults, num_res_blocks, num_heads, dropout):
        if in_channels < 1 or image_size < 1:
            raise ConfigError(f"in_channels and image_size must be positive, got {in_channels} and {image_size}.")
        if not channel_mults or any(m < 1 for m in channel_mults):
            raise ConfigError(f"channel_mults must be a non-empty list of positive integers, got {channel_mults}.")
        for mult in channel_mults:
            ch = base_channels * mult
            if ch % GROUPS or ch % num_heads:
                raise ConfigError(
                    f"Every level's channels must divide by GroupNorm's {GROUPS} groups and by num_heads="
                    f"{num_heads}; base_channels={base_channels} x {mult} = {ch} does not."
                )
        if num_res_blocks < 1:
            raise ConfigError(f"num_res_blocks must be at least 1, got {num_res_blocks}.")
        if not 0 <= dropout < 1:
            raise ConfigError(f"dropout must be in [0, 1), got {dropout}.")

    @property
    def null_label(self) -> int:
        return self.num_classes

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        if x.ndim != 4 or x.shape[1:] != (self.in_channels, self.image_size, self.image_size):
            raise ConfigError(
                f"This U-Net was built for images of shape [B, {self.in_channels}, {self.image_size}, "
                f"{self.image_size}], got {list(x.shape)}: set the model's in_channels/image_size to match the data."
            )
        if t.shape != (x.shape[0],):
            raise ConfigError(f"t must hold one timestep per image, shape [{x.shape[0]}], got {list(t.shape)}.")
        emb = self.time_mlp(timestep_embedding(t, self.time_embed_dim).to(x.dtype))
        if self.label_emb is not None:
            emb = emb + self.label_emb(self._labels(y, x.shape[0], x.device)).to(emb.dtype)
        elif y is not None:
            raise ConfigError("Class labels were given to an unconditional U-Net: set num_classes to train with labels.")

        h = self.conv_in(x)
        skips = [h]
        for i, lvl in enumerate(self.down):
            for block, attn in zip(lvl.blocks, lvl.attention):
                h = attn(block(h, emb))
                skips.append(h)
            if i < len(self.downsample):
                h = self.downsample[i](h)
                skips.append(h)

        h = self.mid2(self.mid_attn(self.mid1(h, emb)), emb)

        for i, lvl in enumerate(self.up):
            for block, attn in zip(lvl.blocks, lvl.attention):
                h = attn(block(torch.cat([h, skips.pop()], dim=1), emb))
            if i < len(self.upsample):
                h = self.upsample[i](h)
        return self.conv_out(F.silu(self.norm_out(h)))
