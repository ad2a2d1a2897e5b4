"""The perturbed branch of perturbed-attention guidance (Ahn et al. 2024, "Self-Rectifying Diffusion Sampling
with Perturbed-Attention Guidance"): chosen self-attention layers with the attention map replaced by the
identity, so each token's output is its own value, to_out(to_v(x)).

`perturb_self_attention(unet, layers)` swaps the chosen `attn1` modules for `PerturbedAttention` wrappers
(per request; `undo()` puts the originals back). A wrapper perturbs only the LAST `state.rows` rows of the
batch it sees, so one UNet call can carry [uncond, cond, cond-perturbed] as diffusers' PAG pipelines do;
with `state.rows = 0` it is the plain attention.

Layer names follow diffusers' `pag_applied_layers` blocks: "mid", "down.N" / "up.N" (every transformer of
that diffusers down/up block), "down.N.M" / "up.N.M" (its M-th attention). diffusers' module-name spellings
("mid_block", "down_blocks.2", "up_blocks.0.attentions.1") are accepted too.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .pag_layers import parse_layer, split_layers
from .unet import SpatialTransformer, UNet


def self_attention_layers(unet: UNet, layer: str) -> list[tuple[nn.Module, str]]:
    """The (BasicTransformerBlock, its module name) pairs whose `attn1` the layer name chooses ([] for none).

    Our input_blocks[0] is conv_in and every level has num_res_blocks (+1 downsampler) blocks, so diffusers'
    down_blocks.N.attentions.M is input_blocks[1 + N (R + 1) + M].1, up_blocks.N.attentions.M is
    output_blocks[N (R + 1) + M].1 and the mid block's transformer is middle_block.1."""
    parsed = parse_layer(layer)
    if parsed is None:
        return []
    kind, n, m = parsed
    r = unet.cfg.num_res_blocks
    if kind == "mid":
        candidates = [("middle_block", unet.middle_block)]
    elif kind == "down":
        idx = [1 + n * (r + 1) + j for j in range(r)] if m is None else [1 + n * (r + 1) + m]
        ok = n < unet.cfg.num_levels and (m is None or m < r)
        candidates = [(f"input_blocks.{i}", unet.input_blocks[i]) for i in idx] if ok else []
    else:
        idx = [n * (r + 1) + j for j in range(r + 1)] if m is None else [n * (r + 1) + m]
        ok = n < unet.cfg.num_levels and (m is None or m <= r)
        candidates = [(f"output_blocks.{i}", unet.output_blocks[i]) for i in idx] if ok else []
    found = []
    for prefix, block in candidates:
        for i, layer_module in enumerate(block):
            if isinstance(layer_module, SpatialTransformer):
                for k, tb in enumerate(layer_module.transformer_blocks):
                    found.append((tb, f"{prefix}.{i}.transformer_blocks.{k}.attn1"))
    return found


@dataclass
class PerturbState:
    """How many rows at the end of the batch the perturbed layers treat with identity attention."""

    rows: int = 0
    swapped: list[tuple[nn.Module, nn.Module]] = field(default_factory=list)  # (transformer block, original)

    def undo(self) -> None:
        """Put the original attention modules back (idempotent)."""
        for block, original in reversed(self.swapped):
            block.attn1 = original
        self.swapped.clear()


class PerturbedAttention(nn.Module):
    """Wraps a self-attention module: rows [-state.rows:] of the batch get to_out(to_v(x)), the others the
    wrapped module's ordinary attention."""

    def __init__(self, attn: nn.Module, state: PerturbState):
        super().__init__()
        self.inner = attn
        self.state = state

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        n = self.state.rows
        if n <= 0:
            return self.inner(x, context)
        identity = self.inner.to_out(self.inner.to_v(x[-n:]))
        if n >= x.shape[0]:
            return identity
        return torch.cat([self.inner(x[:-n], context), identity])


def perturb_self_attention(unet: UNet, layers: str) -> PerturbState:
    """Swap the self-attention of the chosen layers (comma-separated names, see `parse_layer`) for
    `PerturbedAttention`; raises ValueError naming a layer that is malformed or holds no self-attention in
    this UNet. Call `undo()` on the result to restore the UNet."""
    state = PerturbState()
    chosen: dict[int, nn.Module] = {}
    for name in split_layers(layers):
        found = self_attention_layers(unet, name)
        if not found:
            raise ValueError(f"{name!r} names no self-attention layer of this model")
        for block, _ in found:
            chosen[id(block)] = block
    for block in chosen.values():
        state.swapped.append((block, block.attn1))
        block.attn1 = PerturbedAttention(block.attn1, state)
    return state
