"""The SDXL ControlNet (Zhang et al. 2023), plain and union/ProMax (xinsir), written out module by module.

A ControlNet is a trainable copy of the UNet's encoder and middle block whose features, through 1x1
"zero" convs, are added to the UNet's skip connections and middle block output. Parameter names are the
sgm/ldm ControlNet keys (what sd-webui-controlnet and ComfyUI convert diffusers files to):

    time_embed.{0,2}, label_emb.0.{0,2}   as the UNet's
    input_blocks.N, middle_block          as the UNet's (the encoder and the middle only)
    input_hint_block.{0,2,...}            the hint encoder: pixels [B, 3, H*8, W*8] -> [B, C, H, W] (C the
                                          model width), a conv stack with three stride-2 convs and SiLUs
                                          between (indices skip the SiLUs); its last conv starts at zero
    zero_convs.N.0                        1x1 conv on input block N's output -> UNet skip residual N
    middle_block_out.0                    1x1 conv on the middle block's output -> middle residual

The hint's features are added to the output of input block 0 (conv_in). Union models (diffusers'
`ControlNetUnionModel`) add, under the same names as ComfyUI's conversion:

    task_embedding [T, 320]                 one vector per control type
    control_add_embedding.linear_{1,2}      MLP over the sinusoidal embedding of the one-hot control type
                                            vector (each of the T entries embedded in 256 features), added
                                            to the time embedding
    transformer_layes.N (attn.in_proj, attn.out_proj, ln_1, mlp.c_fc, mlp.c_proj, ln_2)
                                            a CLIP-style block over the hint token (the hint features'
                                            spatial mean + the type's task embedding)
    spatial_ch_projs                        Linear: the block's output -> a per-channel offset added to the
                                            hint features

Union hint tokens are attended per row, as ComfyUI does. diffusers' block runs `nn.MultiheadAttention` on
[batch, tokens, C] in its default sequence-first layout, so it attends across the rows of the batch
instead, with the latents' own mean as a second token whose output is unused; when every row has the same
hint (CFG's two halves, a batch sharing one control image) both read the hint token alone and agree.

`forward` returns the residuals unscaled (`UNetControl`); weights and control modes are the pipeline's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..control_names import UNION_TYPE_NAMES, union_type_id
from ..errors import RequestError
from .conditioning import timestep_embedding
from .config import UNetConfig
from .unet import TimestepEmbedSequential, UNetControl, down_path, embedding_mlps, middle_block

SOFT_INJECTION_BASE = 0.825  # sd-webui-controlnet's soft injection: weight * 0.825 ** (12 - k)


def union_type_index(name: str | None, num_types: int, where: str = "control_type") -> int:
    """The id of a union control type name (any case, spaces/dashes as underscores), or a one-line
    RequestError naming it and the types this model knows."""
    known = ", ".join(f"{i} {UNION_TYPE_NAMES[i]}" for i in range(min(num_types, len(UNION_TYPE_NAMES))))
    if name is None:
        raise RequestError(f"{where}: missing; a union ControlNet needs the unit's control type "
                           f"(known: {known})")
    idx = union_type_id(name)
    if idx is None or idx >= num_types:
        raise RequestError(f"{where}: {name!r} is not a control type of this union model (known: {known})")
    return idx


@dataclass(frozen=True)
class ControlNetConfig:
    """Sizes of a ControlNet: the UNet encoder + middle it copies (`unet`; its output depths are unused),
    the hint encoder's widths, and for union models the number of control types."""

    unet: UNetConfig = field(default_factory=UNetConfig)
    hint_channels: tuple[int, ...] = (16, 32, 96, 256)
    hint_in_channels: int = 3
    union_types: int = 0  # 0: a plain ControlNet; xinsir union 6, ProMax 8
    union_width: int = 320  # task embedding / hint token width
    union_heads: int = 8
    union_layers: int = 1
    union_type_dim: int = 256  # sinusoidal features per control type entry

    @property
    def is_union(self) -> bool:
        return self.union_types > 0


class TokenAttention(nn.Module):
    """Self-attention over a row's tokens with one packed q/k/v projection (`in_proj`) and `out_proj`."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj = nn.Linear(dim, dim * 3)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        q, k, v = self.in_proj(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, c))


class TokenMLP(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.c_fc = nn.Linear(dim, dim * 4)
        self.c_proj = nn.Linear(dim * 4, dim)

    def forward(self, x: Tensor) -> Tensor:
        h = self.c_fc(x)
        return self.c_proj(h * torch.sigmoid(1.702 * h))  # QuickGELU


class UnionBlock(nn.Module):
    """The union model's pre-norm transformer block over hint tokens (CLIP's ResidualAttentionBlock)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.attn = TokenAttention(dim, heads)
        self.ln_1 = nn.LayerNorm(dim)
        self.mlp = TokenMLP(dim)
        self.ln_2 = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class ControlAddEmbedding(nn.Module):
    """The union model's control type embedding: one-hot type vector -> sinusoidal features -> MLP."""

    def __init__(self, type_dim: int, num_types: int, out_dim: int):
        super().__init__()
        self.type_dim, self.num_types = type_dim, num_types
        self.linear_1 = nn.Linear(type_dim * num_types, out_dim)
        self.linear_2 = nn.Linear(out_dim, out_dim)

    def forward(self, index: int, device, dtype) -> Tensor:
        onehot = torch.zeros(self.num_types, device=device)
        onehot[index] = 1.0
        feats = timestep_embedding(onehot, self.type_dim).reshape(1, -1).to(dtype)
        return self.linear_2(F.silu(self.linear_1(feats)))


def _hint_block(cfg: ControlNetConfig, width: int) -> TimestepEmbedSequential:
    """conv(in -> c0), then per width step conv(c_i -> c_i), conv(c_i -> c_{i+1}, stride 2), then
    conv(-> width); a SiLU after every conv but the last (sgm's index layout: convs at even indices)."""
    ch = cfg.hint_channels
    layers: list[nn.Module] = [nn.Conv2d(cfg.hint_in_channels, ch[0], 3, padding=1), nn.SiLU()]
    for a, b in zip(ch[:-1], ch[1:]):
        layers += [nn.Conv2d(a, a, 3, padding=1), nn.SiLU(),
                   nn.Conv2d(a, b, 3, padding=1, stride=2), nn.SiLU()]
    layers.append(nn.Conv2d(ch[-1], width, 3, padding=1))
    return TimestepEmbedSequential(*layers)


class ControlNet(nn.Module):
    """The SDXL ControlNet (plain or union) of `ControlNetConfig`; see the module docstring for the names.

    forward(x, t, context, y, hint, control_type=None) -> UNetControl(skips: one residual per UNet input
    block, in the UNet's order; middle), unscaled, in the model's dtype.
    """

    def __init__(self, cfg: ControlNetConfig):
        super().__init__()
        self.cfg = cfg
        u = cfg.unet
        mc, ted = u.model_channels, u.time_embed_dim
        self.kind = "union" if cfg.is_union else "controlnet"

        def zero_conv(ch: int) -> TimestepEmbedSequential:
            return TimestepEmbedSequential(nn.Conv2d(ch, ch, 1))

        # the trainable copy of the UNet's encoder: built as the UNet builds its own
        self.time_embed, self.label_emb = embedding_mlps(u)
        self.input_blocks, widths = down_path(u)
        self.zero_convs = nn.ModuleList(zero_conv(w) for w in widths)  # one per skip connection
        ch = widths[-1]
        self.middle_block = middle_block(u, ch)
        self.middle_block_out = zero_conv(ch)
        self.input_hint_block = _hint_block(cfg, mc)
        if cfg.is_union:
            w = cfg.union_width
            self.task_embedding = nn.Parameter(torch.zeros(cfg.union_types, w))
            self.control_add_embedding = ControlAddEmbedding(cfg.union_type_dim, cfg.union_types, ted)
            self.transformer_layes = nn.ModuleList([UnionBlock(w, cfg.union_heads)
                                                    for _ in range(cfg.union_layers)])
            self.spatial_ch_projs = nn.Linear(w, mc)

    @property
    def dtype(self) -> torch.dtype:
        return self.time_embed[0].weight.dtype

    @property
    def in_channels(self) -> int:
        return self.cfg.unet.in_channels

    def type_index(self, control_type: str | None, where: str = "control_type") -> int | None:
        """The control type id a union model gets for `control_type` (None for a plain ControlNet)."""
        return union_type_index(control_type, self.cfg.union_types, where) if self.cfg.is_union else None

    @staticmethod
    def output_scales(weight: float, n_outputs: int, soft: bool = False) -> list[float]:
        """The scale of each output [skip 0, ..., skip N-1, middle]: the weight, or with soft injection
        ("My prompt is more important", "ControlNet is more important") sd-webui-controlnet's
        weight * 0.825 ** (12 - k), its 13-entry table cut to the model's outputs (SDXL: the middle gets
        0.825 ** 3)."""
        if not soft:
            return [weight] * n_outputs
        return [weight * SOFT_INJECTION_BASE ** float(12 - k) for k in range(n_outputs)]

    def scaled(self, control: UNetControl, weight: float, soft: bool = False) -> UNetControl:
        """`control` (this model's fresh output, scaled in place: no second copy of the residuals) with every
        residual times its `output_scales` entry."""
        scales = self.output_scales(weight, len(control.skips) + 1, soft)
        for s, k in zip(control.skips, scales):
            s.mul_(k)
        control.middle.mul_(scales[-1])
        return control

    def encode_hint(self, hint: Tensor, control_type: str | int | None = None) -> Tensor:
        """The hint's features, added to conv_in's output: [B or 1, model width, H, W] from pixels in [0, 1].
        They do not depend on the latents or the step (callers may keep them for a whole sampling run)."""
        feats = self.input_hint_block(hint.to(self.dtype), None, None)
        if not self.cfg.is_union:
            return feats
        idx = control_type if isinstance(control_type, int) else self.type_index(control_type)
        token = (feats.mean(dim=(2, 3)) + self.task_embedding[idx])[:, None]  # [B, 1, width]
        for layer in self.transformer_layes:
            token = layer(token)
        return feats + self.spatial_ch_projs(token[:, 0])[:, :, None, None]

    def forward(self, x: Tensor, timesteps: Tensor | float, context: Tensor, y: Tensor,
                hint: Tensor | None = None, control_type: str | int | None = None,
                hint_features: Tensor | None = None) -> UNetControl:
        """x [B, in_channels, H, W], DDPM timesteps [B] or scalar, context [B, tokens, context_dim], y
        [B, adm_in_channels], hint [B or 1, 3, 8H, 8W] in [0, 1] (or its `encode_hint` as hint_features)."""
        dtype = self.dtype
        b = x.shape[0]
        timesteps = torch.as_tensor(timesteps, device=x.device)
        if timesteps.ndim == 0:
            timesteps = timesteps[None]
        if timesteps.shape[0] == 1 and b > 1:
            timesteps = timesteps.expand(b)
        emb = self.time_embed(timestep_embedding(timesteps, self.cfg.unet.model_channels).to(dtype))
        idx = None
        if self.cfg.is_union:
            idx = control_type if isinstance(control_type, int) else self.type_index(control_type)
            emb = emb + self.control_add_embedding(idx, x.device, dtype)
        emb = emb + self.label_emb(y.to(dtype))
        context = context.to(dtype)
        if hint_features is None:
            if hint is None:
                raise ValueError("ControlNet: needs a hint image (or its features)")
            hint_features = self.encode_hint(hint, idx)
        h = x.to(dtype)
        skips = []
        for i, (block, zero_conv) in enumerate(zip(self.input_blocks, self.zero_convs)):
            h = block(h, emb, context)
            if i == 0:
                h = h + hint_features.to(dtype)
            skips.append(zero_conv(h, emb, context))
        h = self.middle_block(h, emb, context)
        return UNetControl(skips=skips, middle=self.middle_block_out(h, emb, context))
