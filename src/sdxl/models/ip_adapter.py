"""IP-Adapter (Ye et al. 2023): image prompts through decoupled cross-attention.

An adapter has two parts. Its image projection turns what the CLIP vision tower says about a reference image
into a few tokens of the UNet's context width:

    plain (ImageProjModel)     image_embeds [B, P] -> Linear -> [B, T, C] -> LayerNorm           (T = 4)
    plus / plus-face (Resampler) penultimate hidden states [B, 257, W] -> perceiver over T learned latents
    FaceID (MLPProjModel)      a 512-d face-recognition embedding -> Linear, GELU, Linear -> [B, T, C] -> LN

and, for every cross-attention of the UNet, its own key and value projections of those tokens (`to_k_ip`,
`to_v_ip`, bias-free). The attention output becomes

    attention(q, to_k(text), to_v(text)) + scale * attention(q, to_k_ip(image), to_v_ip(image))

before the output projection. Parameter names are the original IP-Adapter files' (`image_proj.*`, and
`ip_adapter.N.to_k_ip.weight` numbered over all of the UNet's attention modules in diffusers' order: down
blocks, up blocks, then the middle block, attn1 and attn2 of each transformer block, so attn2 gets the odd
numbers).

The image tokens ride on the text context: `apply_ip_adapters` swaps each attn2 for an `IPAttention` that
reads the last `sum(state.tokens)` tokens of its context as the adapters' image tokens, in adapter order. Zero
image tokens contribute exactly nothing (to_v_ip has no bias, so the values are zero), which is how an
adapter is switched off outside its steps. `undo()` puts the original modules back.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .unet import SpatialTransformer, UNet

RESAMPLER_HEAD_DIM = 64  # the original Resampler's dim_head (diffusers assumes it too)


# ---------------------------------------------------------------------------------------------------------
# Image projections
# ---------------------------------------------------------------------------------------------------------


class ImageProjModel(nn.Module):
    """Plain IP-Adapter: one Linear from the CLIP image embedding to `tokens` context tokens, LayerNorm."""

    def __init__(self, embed_dim: int, context_dim: int, tokens: int = 4):
        super().__init__()
        self.tokens = tokens
        self.context_dim = context_dim
        self.proj = nn.Linear(embed_dim, tokens * context_dim)
        self.norm = nn.LayerNorm(context_dim)

    def forward(self, embeds: Tensor) -> Tensor:
        x = self.proj(embeds.to(self.proj.weight.dtype))
        return self.norm(x.reshape(-1, self.tokens, self.context_dim))


class PerceiverAttention(nn.Module):
    """The latents attend to [image features | latents]; both inputs layer-normed first (norm1: features,
    norm2: latents); bias-free to_q / to_kv / to_out."""

    def __init__(self, dim: int, heads: int, dim_head: int = RESAMPLER_HEAD_DIM):
        super().__init__()
        inner = heads * dim_head
        self.heads, self.dim_head = heads, dim_head
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x: Tensor, latents: Tensor) -> Tensor:
        x, latents = self.norm1(x), self.norm2(latents)
        b, n, _ = latents.shape
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat([x, latents], dim=1)).chunk(2, dim=-1)

        def heads(t: Tensor) -> Tensor:
            return t.reshape(b, t.shape[1], self.heads, self.dim_head).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(q), heads(k), heads(v))
        return self.to_out(out.transpose(1, 2).reshape(b, n, self.heads * self.dim_head))


class Resampler(nn.Module):
    """IP-Adapter plus: `queries` learned latents read the projected image features through `depth`
    perceiver blocks (attention, then a bias-free GELU MLP, each residual), then proj_out and norm_out.
    Names as the original: latents, proj_in, layers.i.0 (attention), layers.i.1 (LN, Linear, GELU, Linear),
    proj_out, norm_out."""

    def __init__(self, embed_dim: int, dim: int, context_dim: int, depth: int, heads: int, queries: int,
                 ff_mult: int = 4):
        super().__init__()
        self.latents = nn.Parameter(torch.zeros(1, queries, dim))
        self.proj_in = nn.Linear(embed_dim, dim)
        self.proj_out = nn.Linear(dim, context_dim)
        self.norm_out = nn.LayerNorm(context_dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([
                PerceiverAttention(dim, heads),
                nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim * ff_mult, bias=False), nn.GELU(),
                              nn.Linear(dim * ff_mult, dim, bias=False)),
            ])
            for _ in range(depth)
        )

    @property
    def tokens(self) -> int:
        return self.latents.shape[1]

    def forward(self, x: Tensor) -> Tensor:
        latents = self.latents.expand(x.shape[0], -1, -1)
        x = self.proj_in(x.to(self.proj_in.weight.dtype))
        for attn, ff in self.layers:
            latents = attn(x, latents) + latents
            latents = ff(latents) + latents
        return self.norm_out(self.proj_out(latents))


class MLPProjModel(nn.Module):
    """IP-Adapter FaceID: a face-recognition embedding (512-d, insightface's) through Linear, GELU, Linear
    to `tokens` context tokens, LayerNorm."""

    def __init__(self, id_dim: int, hidden: int, context_dim: int, tokens: int = 4):
        super().__init__()
        self.tokens = tokens
        self.context_dim = context_dim
        self.proj = nn.Sequential(nn.Linear(id_dim, hidden), nn.GELU(),
                                  nn.Linear(hidden, tokens * context_dim))
        self.norm = nn.LayerNorm(context_dim)

    def forward(self, embeds: Tensor) -> Tensor:
        x = self.proj(embeds.to(self.proj[0].weight.dtype))
        return self.norm(x.reshape(-1, self.tokens, self.context_dim))


# ---------------------------------------------------------------------------------------------------------
# The adapter
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class IPAdapterSpec:
    """What an adapter file holds, read off its tensors (`sdxl.weights.ip_adapter.adapter_spec`)."""

    kind: str  # "plain" | "plus" | "faceid"
    embed_dim: int  # plain: the vision tower's projection_dim; plus: its width; faceid: the face embedding's
    context_dim: int  # the UNet's cross-attention width
    tokens: int  # image tokens per reference image
    layers: tuple[int, ...]  # to_k_ip / to_v_ip output width of each cross-attention, diffusers' order
    resampler: tuple[int, int, int] | None = None  # plus: (dim, depth, heads)
    hidden: int | None = None  # faceid: the MLP's hidden width
    has_lora: bool = False  # faceid: the file carries LoRA weights for the UNet's attention


class IPAdapter(nn.Module):
    """An adapter's image projection (`image_proj`) and the ip key / value projections of every
    cross-attention (`to_k_ip[i]`, `to_v_ip[i]`, i counting cross-attentions in diffusers' order)."""

    def __init__(self, spec: IPAdapterSpec):
        super().__init__()
        self.spec = spec
        if spec.kind == "plain":
            self.image_proj: nn.Module = ImageProjModel(spec.embed_dim, spec.context_dim, spec.tokens)
        elif spec.kind == "plus":
            dim, depth, heads = spec.resampler
            self.image_proj = Resampler(spec.embed_dim, dim, spec.context_dim, depth, heads, spec.tokens)
        elif spec.kind == "faceid":
            self.image_proj = MLPProjModel(spec.embed_dim, spec.hidden, spec.context_dim, spec.tokens)
        else:
            raise ValueError(f"unknown IP-Adapter kind {spec.kind!r}")
        self.to_k_ip = nn.ModuleList(nn.Linear(spec.context_dim, w, bias=False) for w in spec.layers)
        self.to_v_ip = nn.ModuleList(nn.Linear(spec.context_dim, w, bias=False) for w in spec.layers)
        self.lora: dict[str, Tensor] = {}  # faceid: diffusers-named LoRA tensors for the UNet (see weights)

    @property
    def kind(self) -> str:
        return self.spec.kind

    @property
    def tokens(self) -> int:
        return self.spec.tokens

    @property
    def uses_hidden_states(self) -> bool:
        """Whether the projection reads the vision tower's penultimate hidden states (plus) rather than its
        projected image embedding (plain)."""
        return self.spec.kind == "plus"

    def project(self, embeds: Tensor) -> Tensor:
        """Image embeddings of n reference images ([n, P] or [n, 257, W]) -> their tokens concatenated,
        [1, n * tokens, context_dim]: several images are attended to together, as diffusers does."""
        tokens = self.image_proj(embeds)
        return tokens.reshape(1, -1, tokens.shape[-1])


# ---------------------------------------------------------------------------------------------------------
# Decoupled cross-attention
# ---------------------------------------------------------------------------------------------------------


def cross_attentions(unet: UNet) -> list[tuple[nn.Module, str]]:
    """Every (BasicTransformerBlock, module name) of the UNet in diffusers' attention-processor order: the
    down path's transformers (our input_blocks, in order), then the up path's (output_blocks), then the middle
    block's. The k-th block's attn2 is attention processor 2k + 1 of diffusers (attn1 is 2k)."""
    found = []
    groups = [(f"input_blocks.{i}", b) for i, b in enumerate(unet.input_blocks)]
    groups += [(f"output_blocks.{i}", b) for i, b in enumerate(unet.output_blocks)]
    groups += [("middle_block", unet.middle_block)]
    for prefix, block in groups:
        for j, layer in enumerate(block):
            if isinstance(layer, SpatialTransformer):
                for k, tb in enumerate(layer.transformer_blocks):
                    found.append((tb, f"{prefix}.{j}.transformer_blocks.{k}"))
    return found


@dataclass
class IPState:
    """The adapters in use for one request: their image token counts (in context order) and scales."""

    tokens: list[int] = field(default_factory=list)
    scales: list[float] = field(default_factory=list)
    swapped: list[tuple[nn.Module, nn.Module]] = field(default_factory=list)  # (transformer block, attn2)

    @property
    def image_tokens(self) -> int:
        """How many tokens at the end of every context are image tokens (the text is the rest)."""
        return sum(self.tokens)

    def undo(self) -> None:
        """Put the original cross-attention modules back (idempotent)."""
        for block, original in reversed(self.swapped):
            block.attn2 = original
        self.swapped.clear()


class IPAttention(nn.Module):
    """A cross-attention with the adapters' decoupled image attention. `inner` is the UNet's own module
    (plain or fused; its to_q / to_k / to_v / to_out are called as modules, so LoRA hooks on them apply)."""

    def __init__(self, inner: nn.Module, state: IPState, to_k_ip: list[nn.Linear], to_v_ip: list[nn.Linear]):
        super().__init__()
        self.inner = inner
        self.state = state
        self.to_k_ip = nn.ModuleList(to_k_ip)
        self.to_v_ip = nn.ModuleList(to_v_ip)

    def _attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        heads, dim_head = self.inner.heads, self.inner.dim_head
        b, n, _ = q.shape

        def split(t: Tensor) -> Tensor:
            return t.reshape(b, t.shape[1], heads, dim_head).transpose(1, 2)

        out = F.scaled_dot_product_attention(split(q), split(k), split(v))
        return out.transpose(1, 2).reshape(b, n, heads * dim_head)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        n_image = self.state.image_tokens
        if context is None or n_image == 0:
            return self.inner(x, context)
        inner = self.inner
        text_len = context.shape[1] - n_image
        text = context[:, :text_len]
        if not any(self.state.scales):  # every adapter at scale 0: the plain cross-attention on the text
            return inner(x, text)
        q = inner.to_q(x)
        h = self._attend(q, inner.to_k(text), inner.to_v(text))
        start = text_len
        for n, scale, to_k, to_v in zip(self.state.tokens, self.state.scales, self.to_k_ip, self.to_v_ip):
            image = context[:, start:start + n]
            start += n
            if scale == 0:
                continue
            h = h + scale * self._attend(q, to_k(image), to_v(image))
        return inner.to_out(h)


def check_fits(unet: UNet, adapter: IPAdapter) -> str | None:
    """Why `adapter` cannot run on `unet` (None: it fits): context width and every cross-attention's width."""
    blocks = cross_attentions(unet)
    spec = adapter.spec
    if spec.context_dim != unet.cfg.context_dim:
        return (f"its image tokens are {spec.context_dim} wide, this model's context is "
                f"{unet.cfg.context_dim} (an adapter for another model family)")
    if len(spec.layers) != len(blocks):
        return (f"it has ip projections for {len(spec.layers)} cross-attention layers, this model has "
                f"{len(blocks)}")
    for i, ((tb, name), width) in enumerate(zip(blocks, spec.layers)):
        want = tb.attn2.to_q.out_features if hasattr(tb.attn2, "to_q") else None
        if want is not None and want != width:
            return f"its ip projection {2 * i + 1} is {width} wide, the model's {name}.attn2 is {want}"
    return None


def apply_ip_adapters(unet: UNet, adapters: list[IPAdapter], scales: list[float],
                      tokens: list[int]) -> IPState:
    """Swap every cross-attention of `unet` for an `IPAttention` holding the adapters' ip projections;
    `tokens[i]`: how many image tokens adapter i has at the end of the context (in adapter order), `scales[i]`
    its scale. Raises ValueError when an adapter does not fit. Call `undo()` on the result to restore the
    UNet."""
    for a in adapters:
        why = check_fits(unet, a)
        if why is not None:
            raise ValueError(why)
    state = IPState(tokens=list(tokens), scales=list(scales))
    blocks = cross_attentions(unet)
    for i, (tb, _) in enumerate(blocks):
        wrapper = IPAttention(tb.attn2, state, [a.to_k_ip[i] for a in adapters],
                              [a.to_v_ip[i] for a in adapters])
        state.swapped.append((tb, tb.attn2))
        tb.attn2 = wrapper
    return state
