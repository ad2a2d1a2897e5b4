"""The SDXL UNet, written out module by module.

Every parameter carries the official Stability-AI `sgm` name, so the UNet part of an official
single-file checkpoint loads with `load_state_dict` after stripping `model.diffusion_model.`:

    time_embed.{0,2}                      timestep MLP (model_channels -> 4x -> 4x)
    label_emb.0.{0,2}                     MLP over the micro-conditioning vector y (added to time_embed)
    input_blocks.0.0                      conv_in
    input_blocks.N.0                      ResBlock (in_layers / emb_layers / out_layers / skip_connection)
    input_blocks.N.1                      SpatialTransformer, only where that block's depth > 0
    input_blocks.N.0.op                   Downsample conv (stride 2), at the end of every level but the last
    middle_block.{0,1,2}                  ResBlock, SpatialTransformer, ResBlock (only middle_block.0 when the
                                          config's middle depth is -1, as in SSD-1B / Vega)
    output_blocks.N.0 / .1                ResBlock (on [h | skip]) and optional SpatialTransformer
    output_blocks.N.{1 or 2}.conv         Upsample conv; its index is 1 when the block has no transformer
    out.{0,2}                             GroupNorm, conv_out

All sizes come from `UNetConfig`; the per-block transformer depths in the config describe the base,
the refiner and the distilled variants with the same code.

`UNetControl` is what control models add to one call: ControlNet residuals on the skip connections and the
middle block's output, T2I-Adapter features inside the down path.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from sdxl.models.conditioning import timestep_embedding
from sdxl.models.config import UNetConfig


def _use_checkpoint(module: nn.Module) -> bool:
    """Recompute in the backward pass only when it saves something: training with autograd on."""
    return module.gradient_checkpointing and module.training and torch.is_grad_enabled()


# ---------------------------------------------------------------------------------------------------------
# Convolutional pieces
# ---------------------------------------------------------------------------------------------------------


class ResBlock(nn.Module):
    """sgm ResBlock without scale-shift norm: the projected timestep embedding is added between the convs.

    out = skip(x) + out_layers(in_layers(x) + emb_layers(emb))
    `skip_connection` is a 1x1 conv when the channel count changes, identity otherwise (no parameters).
    """

    def __init__(self, channels: int, emb_channels: int, out_channels: int, norm_groups: int = 32):
        super().__init__()
        self.in_layers = nn.Sequential(
            nn.GroupNorm(norm_groups, channels, eps=1e-5),
            nn.SiLU(),
            nn.Conv2d(channels, out_channels, 3, padding=1),
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            nn.GroupNorm(norm_groups, out_channels, eps=1e-5),
            nn.SiLU(),
            nn.Dropout(0.0),  # sgm keeps a dropout slot here; it shifts the conv to index 3
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        if channels == out_channels:
            self.skip_connection = nn.Identity()
        else:
            self.skip_connection = nn.Conv2d(channels, out_channels, 1)
        self.gradient_checkpointing = False

    def _forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.in_layers(x)
        h = h + self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        h = self.out_layers(h)
        return self.skip_connection(x) + h

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        if _use_checkpoint(self):
            return checkpoint(self._forward, x, emb, use_reentrant=False)
        return self._forward(x, emb)


class Downsample(nn.Module):
    """Halve the resolution with a 3x3 stride-2 conv (symmetric padding 1, unlike the VAE's)."""

    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Nearest-neighbour upsampling then a 3x3 conv.

    `size` is the spatial size of the skip connection this output will meet. For even sizes it is
    exactly 2x; for odd latent sizes (a stride-2 conv rounds up) it keeps the shapes matching.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor, size: tuple[int, int] | None = None) -> Tensor:
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=size, mode="nearest")
        return self.conv(x)


# ---------------------------------------------------------------------------------------------------------
# Attention pieces
# ---------------------------------------------------------------------------------------------------------


class Attention(nn.Module):
    """Multi-head attention with bias-free q/k/v projections (sgm `CrossAttention`).

    Self-attention when `context` is None, cross-attention otherwise. The softmax attention itself is
    `F.scaled_dot_product_attention` (scale 1/sqrt(dim_head)), which picks a flash / memory-efficient
    kernel when one is available. `sdxl.models.fast.fuse_qkv` swaps these modules for a subclass that runs
    the projections reading the same input as one matmul (same parameters, same names).
    """

    def __init__(self, query_dim: int, heads: int, dim_head: int, context_dim: int | None = None):
        super().__init__()
        inner = heads * dim_head
        kv_dim = query_dim if context_dim is None else context_dim
        self.heads = heads
        self.dim_head = dim_head
        self.is_cross_attention = context_dim is not None
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(kv_dim, inner, bias=False)
        self.to_v = nn.Linear(kv_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim))  # to_out.0, as in sgm

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        kv_in = x if context is None else context
        return self.attend(self.to_q(x), self.to_k(kv_in), self.to_v(kv_in))

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """softmax(q k^T / sqrt(dim_head)) v per head, then the output projection."""
        b, n, _ = q.shape
        # [B, tokens, heads * dim_head] -> [B, heads, tokens, dim_head] (views, no copies)
        q = q.reshape(b, n, self.heads, self.dim_head).transpose(1, 2)
        k = k.reshape(b, k.shape[1], self.heads, self.dim_head).transpose(1, 2)
        v = v.reshape(b, v.shape[1], self.heads, self.dim_head).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(1, 2).reshape(b, n, self.heads * self.dim_head)
        return self.to_out(out)


class GEGLU(nn.Module):
    """Gated GELU: one Linear to twice the width, then value * gelu(gate) (value half first)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: Tensor) -> Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU MLP with a 4x hidden width: net.0.proj (d -> 8d), net.2 (4d -> d)."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        inner = dim * mult
        self.net = nn.Sequential(GEGLU(dim, inner), nn.Dropout(0.0), nn.Linear(inner, dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm block: self-attention, cross-attention on the text tokens, GEGLU feed-forward."""

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int):
        super().__init__()
        self.attn1 = Attention(dim, heads, dim_head)
        self.ff = FeedForward(dim)
        self.attn2 = Attention(dim, heads, dim_head, context_dim=context_dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        self.gradient_checkpointing = False

    def _forward(self, x: Tensor, context: Tensor) -> Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        x = x + self.ff(self.norm3(x))
        return x

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        if _use_checkpoint(self):
            return checkpoint(self._forward, x, context, use_reentrant=False)
        return self._forward(x, context)


class SpatialTransformer(nn.Module):
    """Run `depth` transformer blocks over the pixels of a feature map (SDXL: linear proj_in/proj_out).

    GroupNorm (eps 1e-6) -> [B, H*W, C] tokens -> proj_in -> blocks -> proj_out -> back to [B, C, H, W],
    plus the input as a residual.
    """

    def __init__(self, channels: int, heads: int, dim_head: int, depth: int, context_dim: int,
                 norm_groups: int = 32):
        super().__init__()
        inner = heads * dim_head
        self.norm = nn.GroupNorm(norm_groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, inner)
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(inner, heads, dim_head, context_dim) for _ in range(depth)]
        )
        self.proj_out = nn.Linear(inner, channels)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        b, c, h, w = x.shape
        x_in = x
        x = self.norm(x)
        x = x.permute(0, 2, 3, 1).reshape(b, h * w, c)
        x = self.proj_in(x)
        for block in self.transformer_blocks:
            x = block(x, context)
        x = self.proj_out(x)
        x = x.reshape(b, h, w, -1).permute(0, 3, 1, 2)
        return x_in + x


class TimestepEmbedSequential(nn.Sequential):
    """A UNet block: layers in order, each fed what it needs (emb for ResBlocks, context for transformers)."""

    def forward(self, x: Tensor, emb: Tensor, context: Tensor,
                upsample_size: tuple[int, int] | None = None) -> Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            elif isinstance(layer, Upsample):
                x = layer(x, upsample_size)
            else:
                x = layer(x)
        return x


# ---------------------------------------------------------------------------------------------------------
# The UNet
# ---------------------------------------------------------------------------------------------------------


@dataclass
class UNetControl:
    """Additions to one UNet call, each shaped like the activation it is added to (batch included).

    skips: one entry per input block (None = nothing), added to the skip connection that block keeps, after
        it is kept and before the up path reads it (ControlNet; diffusers' down_block_additional_residuals).
    middle: added to the middle block's output (ControlNet; mid_block_additional_residual).
    intrablock: input block index -> added to that block's output before it is kept as a skip and passed on
        down (T2I-Adapter; diffusers' down_intrablock_additional_residuals).
    """

    skips: Sequence[Tensor | None] | None = None
    middle: Tensor | None = None
    intrablock: dict[int, Tensor] | None = None

    def __add__(self, other: UNetControl) -> UNetControl:
        """The sum of two controls (several units on one call): entries present in either, added."""

        def add(a, b):
            return b if a is None else a if b is None else a + b

        skips = None
        if self.skips is not None or other.skips is not None:
            n = max(len(self.skips or ()), len(other.skips or ()))
            mine = list(self.skips or ()) + [None] * (n - len(self.skips or ()))
            theirs = list(other.skips or ()) + [None] * (n - len(other.skips or ()))
            skips = [add(a, b) for a, b in zip(mine, theirs)]
        intra = None
        if self.intrablock or other.intrablock:
            intra = dict(self.intrablock or {})
            for k, v in (other.intrablock or {}).items():
                intra[k] = add(intra.get(k), v)
        return UNetControl(skips, add(self.middle, other.middle), intra)


def transformer(cfg: UNetConfig, ch: int, depth: int) -> SpatialTransformer:
    """A SpatialTransformer of `depth` blocks at width `ch`, with the config's head size and context."""
    if ch % cfg.head_dim:
        raise ValueError(f"width {ch} is not a multiple of head_dim {cfg.head_dim}")
    return SpatialTransformer(ch, ch // cfg.head_dim, cfg.head_dim, depth, cfg.context_dim, cfg.norm_groups)


def embedding_mlps(cfg: UNetConfig) -> tuple[nn.Sequential, nn.Sequential]:
    """`time_embed` (timestep features -> 4x width) and `label_emb` (the vector y -> the same width)."""
    mc, ted = cfg.model_channels, cfg.time_embed_dim
    time_embed = nn.Sequential(nn.Linear(mc, ted), nn.SiLU(), nn.Linear(ted, ted))
    label_emb = nn.Sequential(
        nn.Sequential(nn.Linear(cfg.adm_in_channels, ted), nn.SiLU(), nn.Linear(ted, ted))
    )
    return time_embed, label_emb


def down_path(cfg: UNetConfig) -> tuple[nn.ModuleList, list[int]]:
    """The input blocks (conv_in; per level ResBlocks with their transformers, then a Downsample but on the
    last level) and each block's output width, i.e. the widths of the skip connections. The UNet and the
    ControlNet's trainable copy build theirs here."""
    mc, ted, groups = cfg.model_channels, cfg.time_embed_dim, cfg.norm_groups
    blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(cfg.in_channels, mc, 3, padding=1))])
    widths = [mc]
    ch = mc
    block_index = 0
    for level, mult in enumerate(cfg.channel_mult):
        for _ in range(cfg.num_res_blocks):
            layers: list[nn.Module] = [ResBlock(ch, ted, mc * mult, groups)]
            ch = mc * mult
            depth = cfg.transformer_depth[block_index]
            block_index += 1
            if depth > 0:
                layers.append(transformer(cfg, ch, depth))
            blocks.append(TimestepEmbedSequential(*layers))
            widths.append(ch)
        if level != cfg.num_levels - 1:
            blocks.append(TimestepEmbedSequential(Downsample(ch)))
            widths.append(ch)
    return blocks, widths


def middle_block(cfg: UNetConfig, ch: int) -> TimestepEmbedSequential:
    """ResBlock, SpatialTransformer, ResBlock at width `ch`; depth -1 leaves a single ResBlock (how SSD-1B /
    Vega files are laid out)."""
    ted, groups = cfg.time_embed_dim, cfg.norm_groups
    middle: list[nn.Module] = [ResBlock(ch, ted, ch, groups)]
    if cfg.transformer_depth_middle >= 0:
        middle.append(transformer(cfg, ch, cfg.transformer_depth_middle))
        middle.append(ResBlock(ch, ted, ch, groups))
    return TimestepEmbedSequential(*middle)


class UNet(nn.Module):
    """SDXL UNet (sgm `UNetModel` with num_classes="sequential" and linear transformers).

    forward(x, timesteps, context, y) -> the model's raw prediction (eps or v, whatever it was trained
    for), same shape as x with `out_channels` channels.
    """

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        mc = cfg.model_channels
        ted = cfg.time_embed_dim
        groups = cfg.norm_groups

        self.time_embed, self.label_emb = embedding_mlps(cfg)
        # ---- down path: every block's output is kept as a skip connection ----
        self.input_blocks, skip_channels = down_path(cfg)
        ch = skip_channels[-1]
        self.middle_block = middle_block(cfg, ch)

        # ---- up path: each block eats one skip; the last block of a level (but the top one) upsamples ----
        self.output_blocks = nn.ModuleList()
        block_index = 0
        for level in reversed(range(cfg.num_levels)):
            mult = cfg.channel_mult[level]
            for i in range(cfg.num_res_blocks + 1):
                layers = [ResBlock(ch + skip_channels.pop(), ted, mc * mult, groups)]
                ch = mc * mult
                depth = cfg.transformer_depth_output[block_index]
                block_index += 1
                if depth > 0:
                    layers.append(transformer(cfg, ch, depth))
                if level > 0 and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            nn.GroupNorm(groups, ch, eps=1e-5),
            nn.SiLU(),
            nn.Conv2d(mc, cfg.out_channels, 3, padding=1),
        )
        self._channels_last = False

    # ---- options ----
    @property
    def dtype(self) -> torch.dtype:
        return self.time_embed[0].weight.dtype

    def set_gradient_checkpointing(self, enabled: bool = True) -> UNet:
        """Recompute ResBlocks and transformer blocks in the backward pass (saves activation memory)."""
        for m in self.modules():
            if isinstance(m, (ResBlock, BasicTransformerBlock)):
                m.gradient_checkpointing = enabled
        return self

    @property
    def gradient_checkpointing(self) -> bool:
        blocks = [m for m in self.modules() if isinstance(m, (ResBlock, BasicTransformerBlock))]
        return any(m.gradient_checkpointing for m in blocks)

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, enabled: bool) -> None:
        self.set_gradient_checkpointing(enabled)

    def use_channels_last(self, enabled: bool = True) -> UNet:
        """Store conv weights and feed activations NHWC; faster convolutions on recent GPUs (cuDNN)."""
        self.to(memory_format=torch.channels_last if enabled else torch.contiguous_format)
        self._channels_last = enabled
        return self

    # ---- forward ----
    def forward(self, x: Tensor, timesteps: Tensor | float, context: Tensor, y: Tensor,
                control: UNetControl | None = None) -> Tensor:
        """Predict for latents x [B, in_channels, H, W] at DDPM timesteps [B] or scalar (int or float),
        with text tokens context [B, tokens, context_dim] and the micro-conditioning vector y
        [B, adm_in_channels], plus what control models add (`UNetControl`). Returns [B, out_channels, H, W]
        in x's dtype.
        """
        if y is None:
            raise ValueError("the SDXL UNet needs y (pooled text embedding + micro-conditioning features)")
        dtype = self.dtype
        b = x.shape[0]
        timesteps = torch.as_tensor(timesteps, device=x.device)
        if timesteps.ndim == 0:
            timesteps = timesteps[None]
        if timesteps.shape[0] == 1 and b > 1:
            timesteps = timesteps.expand(b)

        t_emb = timestep_embedding(timesteps, self.cfg.model_channels).to(dtype)
        emb = self.time_embed(t_emb) + self.label_emb(y.to(dtype))
        context = context.to(dtype)

        h = x.to(dtype)
        if self._channels_last:
            h = h.contiguous(memory_format=torch.channels_last)
        intrablock = (control.intrablock or {}) if control is not None else {}
        skips = []
        for i, block in enumerate(self.input_blocks):
            h = block(h, emb, context)
            if i in intrablock:
                h = h + intrablock[i].to(h.dtype)
            skips.append(h)
        h = self.middle_block(h, emb, context)
        if control is not None:
            if control.middle is not None:
                h = h + control.middle.to(h.dtype)
            if control.skips is not None:
                if len(control.skips) != len(skips):
                    raise ValueError(f"control: {len(control.skips)} skip residuals for {len(skips)} "
                                     "input blocks")
                skips = [s if c is None else s + c.to(s.dtype) for s, c in zip(skips, control.skips)]
        for block in self.output_blocks:
            h = torch.cat([h, skips.pop()], dim=1)
            # an upsampler in this block must land on the size of the next skip connection
            next_size = tuple(skips[-1].shape[-2:]) if skips else None
            h = block(h, emb, context, next_size)
        return self.out(h).to(x.dtype)
