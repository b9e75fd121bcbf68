"""The noise-prediction network eps_theta(x_t, t, y): a class-conditional U-Net.

* sinusoidal time embedding -> MLP, plus a learned class embedding with one extra "null" class
  (index ``num_classes``) for classifier-free guidance; every residual block takes their sum
  through SiLU and a projection to a per-channel scale and shift of its normalised feature maps
  (``conditioning="scale_shift"``, ADM's scale-shift norm), or added to them (``silu_add``, ``add``);
* an encoder of residual blocks and stride-2 downsampling, a middle block, and a decoder that
  concatenates the encoder's feature maps (skip connections) before each of its residual blocks;
* multi-head self-attention in the middle block (lowest resolution) and in the encoder and
  decoder blocks at the resolutions listed in ``attention_resolutions``.

Sizes halve exactly at each level (28 -> 14 -> 7, 32 -> 16 -> 8) and nearest-neighbour upsampling
doubles them back, so the output has the input's shape with no padding or cropping.

``patch_size`` p > 1 folds each p x p patch of pixels into channels first (``pixel_unshuffle``:
1x28x28 -> 4x14x14 for p = 2) and unfolds the output the same way (``pixel_shuffle``), so the U-Net
runs at 14 -> 7 instead of 28 -> 14 -> 7. This is lossless (the fold is a permutation) and removes
the full-resolution convolutions, which take most of the FLOPs and time of a small U-Net on CPU
(measured in bench/scaling.py --levers).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# Which down-path outputs feed the up path through a skip connection (:class:`UNet`): ``all``, as in
# DDPM and diffusers (the input conv, every residual block and every downsampling conv; the up path then
# has num_res_blocks + 1 blocks per level), or ``blocks`` (the residual blocks' outputs only: one up
# block fewer per level).
SKIPS = ("all", "blocks")

# How a residual block takes the time + class embedding (:class:`ResBlock`).
CONDITIONINGS = ("add", "silu_add", "scale_shift")


def unet_resolutions(size: int, levels: int) -> list[int] | None:
    """Feature-map sizes of a U-Net with ``levels`` levels on ``size``x``size`` inputs.

    Returns None when the image cannot be halved ``levels - 1`` times evenly (the decoder's
    upsampling would then not return to the input size, e.g. 7 -> 4 -> 8).
    """
    out = [size]
    for _ in range(levels - 1):
        if out[-1] % 2:
            return None
        out.append(out[-1] // 2)
    return out


def sinusoidal_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Transformer-style embedding of (integer) timesteps: [B] -> [B, dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, with the time + class embedding brought in between the two.

    ``conditioning`` says how: ``add`` projects the embedding linearly and adds it to the feature
    maps (each block then sees a class offset that is the same at every t); ``silu_add`` applies SiLU
    first (DDPM's and diffusers' blocks), so time and class combine non-linearly; ``scale_shift``
    applies SiLU and projects to a per-channel scale and shift of the second GroupNorm's output,
    h = norm(h) (1 + scale) + shift (ADM's ``use_scale_shift_norm``, diffusers' "scale_shift").
    """

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, groups: int, dropout: float, conditioning: str = "add") -> None:
        super().__init__()
        if conditioning not in CONDITIONINGS:
            raise ValueError(f"conditioning must be one of {list(CONDITIONINGS)}, got {conditioning!r}")
        self.conditioning = conditioning
        self.norm1 = nn.GroupNorm(groups, in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * out_ch if conditioning == "scale_shift" else out_ch)
        self.norm2 = nn.GroupNorm(groups, out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def project(self, emb: torch.Tensor) -> torch.Tensor:
        """The embedding as this block uses it: [B, out_ch] to add, or [B, 2 out_ch] = (scale, shift)."""
        return self.emb(emb if self.conditioning == "add" else F.silu(emb))

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        e = self.project(emb)[:, :, None, None]  # time + class conditioning on every block
        if self.conditioning == "scale_shift":
            scale, shift = e.chunk(2, dim=1)
            h = torch.addcmul(shift, self.norm2(h), 1 + scale)
        else:
            h = self.norm2(h + e)
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class SelfAttention(nn.Module):
    def __init__(self, ch: int, heads: int, groups: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(groups, ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w).unbind(1)
        out = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


def check_geometry(image_size: int, patch_size: int, channel_mult, attention_resolutions, skips: str) -> list[int]:
    """The feature-map size of each level of a :class:`UNet` with these settings; ValueError naming
    the setting that does not fit the image size."""
    if image_size % patch_size:
        raise ValueError(f"patch_size {patch_size} does not divide the image size {image_size}")
    resolutions = unet_resolutions(image_size // patch_size, len(channel_mult))
    if resolutions is None:
        raise ValueError(
            f"channel_mult: {image_size // patch_size}x{image_size // patch_size} cannot be halved "
            f"{len(channel_mult) - 1} times evenly"
        )
    for r in attention_resolutions:
        if r not in resolutions:
            raise ValueError(f"attention_resolutions: {r} is not one of this network's resolutions {resolutions}")
    if skips not in SKIPS:
        raise ValueError(f"skips must be one of {SKIPS}, got {skips!r}")
    return resolutions


class UNet(nn.Module):
    def __init__(
        self,
        in_channels: int = 1,
        image_size: int = 28,
        num_classes: int = 10,
        base_channels: int = 32,
        channel_mult: tuple[int, ...] | list[int] = (1, 2, 2),
        num_res_blocks: int = 1,
        attention_resolutions: tuple[int, ...] | list[int] = (7,),
        num_heads: int = 4,
        time_embed_mult: int = 4,
        dropout: float = 0.0,
        norm_groups: int = 8,
        patch_size: int = 1,
        conditioning: str = "add",
        skips: str = "all",
    ) -> None:
        super().__init__()
        resolutions = check_geometry(image_size, patch_size, channel_mult, attention_resolutions, skips)
        self.in_channels = in_channels
        self.image_size = image_size
        self.patch_size = patch_size
        self.num_classes = num_classes
        self.resolutions = resolutions
        self.base_channels = base_channels
        emb_dim = base_channels * time_embed_mult
        self.emb_dim = emb_dim
        self.time_mlp = nn.Sequential(nn.Linear(base_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.class_emb = nn.Embedding(num_classes + 1, emb_dim)  # last index = null class
        widths = [base_channels * m for m in channel_mult]

        def block(in_ch: int, out_ch: int, res: int) -> nn.ModuleList:  # a residual block, with attention at the listed sizes
            layers = nn.ModuleList([ResBlock(in_ch, out_ch, emb_dim, norm_groups, dropout, conditioning)])
            if res in attention_resolutions:
                layers.append(SelfAttention(out_ch, num_heads, norm_groups))
            return layers

        self.skips = skips
        every = skips == "all"  # the input conv and each downsampling conv also feed a skip (and an up block)
        folded = in_channels * patch_size * patch_size  # channels after pixel_unshuffle
        self.conv_in = nn.Conv2d(folded, base_channels, 3, padding=1)
        self.io_layers = ("conv_in", "conv_out")  # read the input / write the output: AdamW's under train.optimizer muon
        self.down = nn.ModuleList()
        skip_chs = [base_channels] if every else []
        self.down_skips: list[bool] = []  # per down block: whether its output feeds a skip
        ch = base_channels
        for level, (res, width) in enumerate(zip(resolutions, widths)):
            for _ in range(num_res_blocks):
                self.down.append(block(ch, width, res))
                self.down_skips.append(True)
                ch = width
                skip_chs.append(ch)
            if level < len(widths) - 1:
                self.down.append(nn.ModuleList([nn.Conv2d(ch, ch, 3, stride=2, padding=1)]))
                self.down_skips.append(every)
                if every:
                    skip_chs.append(ch)

        self.mid1 = ResBlock(ch, ch, emb_dim, norm_groups, dropout, conditioning)
        self.mid_attn = SelfAttention(ch, num_heads, norm_groups)  # always: the middle block sees the whole image
        self.mid2 = ResBlock(ch, ch, emb_dim, norm_groups, dropout, conditioning)

        self.up = nn.ModuleList()
        for level in reversed(range(len(widths))):
            res, width = resolutions[level], widths[level]
            for _ in range(num_res_blocks + every):
                self.up.append(block(ch + skip_chs.pop(), width, res))
                ch = width
            if level > 0:
                self.up.append(nn.ModuleList([nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(ch, ch, 3, padding=1)]))

        self.norm_out = nn.GroupNorm(norm_groups, ch)
        self.conv_out = nn.Conv2d(ch, folded, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)
        self.channels_last = False

    def set_channels_last(self, enabled: bool) -> "UNet":
        """Keep convolution weights and activations channels-last (NHWC) instead of NCHW.

        Same maths, another memory layout (which one is faster depends on the device and the
        arithmetic: :func:`diffusion_core.runtime.use_channels_last`). Returns self.
        """
        self.channels_last = enabled
        return self.to(memory_format=torch.channels_last if enabled else torch.contiguous_format)

    def embed(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.time_mlp(sinusoidal_embedding(t, self.base_channels)) + self.class_emb(y)

    @staticmethod
    def _run(block: nn.ModuleList, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for layer in block:
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
        return h

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """eps (or v) prediction for noisy images x [B, C, H, W] at timesteps t [B] with labels y [B]."""
        emb = self.embed(t, y)
        if self.patch_size > 1:
            x = F.pixel_unshuffle(x, self.patch_size)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        h = self.conv_in(x)
        hs = [h] if self.skips == "all" else []
        for block, skip in zip(self.down, self.down_skips):
            h = self._run(block, h, emb)
            if skip:
                hs.append(h)
        h = self.mid2(self.mid_attn(self.mid1(h, emb)), emb)
        for block in self.up:
            if isinstance(block[0], ResBlock):
                h = torch.cat([h, hs.pop()], dim=1)
            h = self._run(block, h, emb)
        out = self.conv_out(F.silu(self.norm_out(h)))
        return F.pixel_shuffle(out, self.patch_size) if self.patch_size > 1 else out

    def describe(self) -> list[dict]:
        """The architecture as table rows (one per stage), built from the modules themselves."""
        rows = []

        def add(stage: str, module: nn.Module, res: int) -> None:
            convs = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
            rows.append(
                {
                    "stage": stage,
                    "resolution": f"{res}x{res}",
                    "out_channels": convs[-1].out_channels if convs else None,
                    "attention": any(isinstance(m, SelfAttention) for m in module.modules()),
                    "params": sum(p.numel() for p in module.parameters()),
                }
            )

        res = self.image_size // self.patch_size
        rows.append(
            {
                "stage": f"time + class embedding ({self.num_classes}+1 classes)",
                "resolution": "-",
                "out_channels": self.emb_dim,
                "attention": False,
                "params": sum(p.numel() for p in [*self.time_mlp.parameters(), *self.class_emb.parameters()]),
            }
        )
        if self.patch_size > 1:
            p = self.patch_size
            rows.append({"stage": f"pixel_unshuffle {p}x{p} ({self.in_channels} -> {self.in_channels * p * p} channels)",
                         "resolution": f"{res}x{res}", "out_channels": self.in_channels * p * p, "attention": False, "params": 0})
        add("conv_in", self.conv_in, res)
        for i, block in enumerate(self.down):
            if isinstance(block[0], ResBlock):
                add(f"down.{i} resblock", block, res)
            else:
                res //= 2
                add(f"down.{i} downsample", block, res)
        add("middle", nn.ModuleList([self.mid1, self.mid_attn, self.mid2]), res)
        for i, block in enumerate(self.up):
            if isinstance(block[0], ResBlock):
                add(f"up.{i} resblock", block, res)
            else:
                res *= 2
                add(f"up.{i} upsample", block, res)
        add("conv_out", nn.ModuleList([self.norm_out, self.conv_out]), res)
        if self.patch_size > 1:
            rows.append({"stage": f"pixel_shuffle {self.patch_size}x{self.patch_size}", "resolution": f"{self.image_size}x{self.image_size}",
                         "out_channels": self.in_channels, "attention": False, "params": 0})
        return rows


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
