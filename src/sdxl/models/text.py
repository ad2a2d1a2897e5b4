"""The CLIP text transformer, used twice by SDXL: OpenAI CLIP ViT-L/14 and OpenCLIP ViT-bigG/14.

Both towers are the same pre-norm causal transformer and differ only in size, activation (quick_gelu for
CLIP-L, exact GELU for bigG) and whether the pooled output is projected. Parameter names follow transformers'
`CLIPTextModel` without its `text_model.` prefix, so a diffusers `text_encoder/` file or the CLIP-L part of an
official checkpoint loads after stripping a prefix (see `sdxl.weights.text_layout` for the OpenCLIP names).

What SDXL reads from a tower (SDXL_SPEC section 4):
- the *penultimate* layer's output, WITHOUT the final layer norm, for all 77 positions (cross-attention
  context);
- from bigG only, the pooled vector: final layer norm of the last layer's output at the end-of-text position,
  multiplied by the text projection.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from sdxl.models.config import ModelConfig, TextConfig


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """OpenAI CLIP's sigmoid approximation of GELU; CLIP-L was trained with it, so it must be used as is."""
    return x * torch.sigmoid(1.702 * x)


def activation(name: str):
    if name == "quick_gelu":
        return quick_gelu
    if name == "gelu":
        return F.gelu  # exact (erf) GELU, as open_clip's nn.GELU()
    raise ValueError(f"unknown text encoder activation {name!r} (expected 'quick_gelu' or 'gelu')")


class CLIPEmbeddings(nn.Module):
    """Token embedding + learned absolute position embedding."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.position_embedding = nn.Embedding(cfg.max_positions, cfg.width)

    def forward(self, ids: torch.Tensor | None = None, embeds: torch.Tensor | None = None) -> torch.Tensor:
        """`embeds` (token embeddings [B, T, W]) replaces the lookup of `ids` when given."""
        if embeds is None:
            embeds = self.token_embedding(ids)
        positions = torch.arange(embeds.shape[1], device=embeds.device)
        return embeds + self.position_embedding(positions)[None].to(embeds.dtype)


class CLIPAttention(nn.Module):
    """Multi-head self-attention with separate q/k/v projections (all with bias): causal in the text towers,
    over all tokens in the vision tower (`models.clip_vision`). `cfg`: any config with width and heads."""

    def __init__(self, cfg: TextConfig, causal: bool = True):
        super().__init__()
        self.heads = cfg.heads
        self.causal = causal
        self.q_proj = nn.Linear(cfg.width, cfg.width)
        self.k_proj = nn.Linear(cfg.width, cfg.width)
        self.v_proj = nn.Linear(cfg.width, cfg.width)
        self.out_proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, w = x.shape

        def split_heads(y: torch.Tensor) -> torch.Tensor:  # [B, T, W] -> [B, heads, T, head_dim]
            return y.view(b, t, self.heads, w // self.heads).transpose(1, 2)

        q, k, v = split_heads(self.q_proj(x)), split_heads(self.k_proj(x)), split_heads(self.v_proj(x))
        # Causal (text): position i only sees positions <= i. This is why padding after EOS never changes
        # the outputs at or before EOS, and why the EOS position "summarises" the prompt.
        out = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.out_proj(out.transpose(1, 2).reshape(b, t, w))


class CLIPMLP(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.width, cfg.mlp_dim)
        self.fc2 = nn.Linear(cfg.mlp_dim, cfg.width)
        self.act = activation(cfg.act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    """Pre-norm transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, cfg: TextConfig, causal: bool = True):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.self_attn = CLIPAttention(cfg, causal)
        self.layer_norm2 = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.mlp = CLIPMLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, cfg: TextConfig, causal: bool = True):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(cfg, causal) for _ in range(cfg.layers))


class CLIPTextTower(nn.Module):
    """One CLIP text transformer (CLIP-L or bigG), sizes from a `TextConfig`."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        if cfg.width % cfg.head_dim != 0:
            raise ValueError(f"width {cfg.width} is not a multiple of head_dim {cfg.head_dim}")
        self.cfg = cfg
        self.embeddings = CLIPEmbeddings(cfg)
        self.encoder = CLIPEncoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.text_projection = (
            nn.Linear(cfg.width, cfg.projection_dim, bias=False) if cfg.projection_dim is not None else None
        )

    @property
    def dtype(self) -> torch.dtype:
        return self.final_layer_norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.final_layer_norm.weight.device

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings [B, T, W] (no positions); replace rows to inject textual-inversion vectors."""
        return self.embeddings.token_embedding(ids)

    def forward(
        self, ids: torch.Tensor, skip: int = 1, embeds: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Encode token ids [B, T] (T <= max_positions).

        skip: which hidden state to return, counted back from the last layer. skip=1 (SDXL) is the
          penultimate layer's output = HF hidden_states[-2]; skip=k is hidden_states[-(k+1)], so diffusers'
          `clip_skip=c` is skip=c+1. skip=0 is the last layer's output (still without the final norm).
        embeds: optional token embeddings [B, T, W] used instead of looking up `ids` (textual inversion);
          `ids` is still needed to locate the end-of-text token.

        Returns (hidden [B, T, W] without final layer norm, pooled [B, projection_dim] or None).
        pooled = text_projection(final_layer_norm(last layer output)[EOS position]), EOS position = argmax of
        the ids (<end_of_text> = 49407 is the largest id). It is None for a tower without projection, and
        then the layers after the requested hidden state are not run at all.
        """
        n_layers = len(self.encoder.layers)
        if not 0 <= skip <= n_layers:
            raise ValueError(f"skip must be in [0, {n_layers}], got {skip}")
        if ids.shape[-1] > self.cfg.max_positions:
            raise ValueError(f"at most {self.cfg.max_positions} tokens, got {ids.shape[-1]}")
        if embeds is not None and embeds.shape[:2] != ids.shape:
            raise ValueError(f"embeds {tuple(embeds.shape)} does not match ids {tuple(ids.shape)}")

        x = self.embeddings(ids, embeds)
        keep_at = n_layers - skip  # number of layers applied before the returned hidden state
        last = n_layers if self.text_projection is not None else keep_at
        hidden = x  # keep_at == 0: the embeddings themselves
        for i in range(last):
            x = self.encoder.layers[i](x)
            if i + 1 == keep_at:
                hidden = x
        if self.text_projection is None:
            return hidden, None
        eos = ids.to(torch.long).argmax(dim=-1)
        pooled = self.final_layer_norm(x[torch.arange(x.shape[0], device=x.device), eos])
        return hidden, self.text_projection(pooled)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


class TextEncoders(nn.Module):
    """SDXL's text conditioning: CLIP-L (base only) and OpenCLIP bigG, run side by side.

    context = [CLIP-L hidden | bigG hidden] along the channel axis ([B, 77, 768 + 1280] for the base,
    [B, 77, 1280] for the refiner, which has no CLIP-L); pooled = bigG's projected pooled output [B, 1280].

    clip_l / clip_g: a built tower, a `TextConfig` to build one from, or None (no such tower; a model
    without any tower, e.g. a UNet-only file, can be held but not asked to encode).
    """

    def __init__(
        self,
        clip_l: CLIPTextTower | TextConfig | None = None,
        clip_g: CLIPTextTower | TextConfig | None = None,
    ):
        super().__init__()
        self.clip_l = CLIPTextTower(clip_l) if isinstance(clip_l, TextConfig) else clip_l
        self.clip_g = CLIPTextTower(clip_g) if isinstance(clip_g, TextConfig) else clip_g

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> TextEncoders:
        return cls(cfg.text_l, cfg.text_g)

    @property
    def context_dim(self) -> int:
        return sum(t.cfg.width for t in (self.clip_l, self.clip_g) if t is not None)

    def encode(
        self,
        ids_l: torch.Tensor | None,
        ids_g: torch.Tensor | None,
        skip: int = 1,
        embeds_l: torch.Tensor | None = None,
        embeds_g: torch.Tensor | None = None,
        reweight: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(context [B, T, W_l + W_g], pooled [B, P] from bigG, or None without a projected bigG tower).

        ids_l is ignored (may be None) when there is no CLIP-L tower. `skip` applies to both towers, as
        A1111/diffusers clip skip does for SDXL. embeds_* are optional textual-inversion token embeddings.
        reweight(key, hidden) -> hidden, if given, transforms each tower's hidden states ("clip_l",
        "clip_g") before they are joined: prompt emphasis is applied per tower, as A1111 does.
        """
        if self.clip_l is None and self.clip_g is None:
            raise ValueError("no text tower loaded: cannot encode a prompt")
        parts = []
        pooled = None
        if self.clip_l is not None:
            if ids_l is None:
                raise ValueError("this model has a CLIP-L tower: ids_l is required")
            hidden_l = self.clip_l(ids_l, skip=skip, embeds=embeds_l)[0]
            parts.append(reweight("clip_l", hidden_l) if reweight is not None else hidden_l)
        if self.clip_g is not None:
            if ids_g is None:
                raise ValueError("this model has a bigG tower: ids_g is required")
            hidden_g, pooled = self.clip_g(ids_g, skip=skip, embeds=embeds_g)
            parts.append(reweight("clip_g", hidden_g) if reweight is not None else hidden_g)
        if len(parts) == 2 and parts[0].shape[:2] != parts[1].shape[:2]:
            raise ValueError(
                f"CLIP-L and bigG outputs differ in batch/length: {parts[0].shape} vs {parts[1].shape}"
            )
        context = torch.cat([p.to(parts[-1].dtype) for p in parts], dim=-1)
        return context, pooled

    def forward(
        self, ids_l: torch.Tensor | None, ids_g: torch.Tensor | None, skip: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.encode(ids_l, ids_g, skip=skip)


def expected_num_parameters(cfg: TextConfig) -> int:
    """Parameter count of `CLIPTextTower(cfg)` from the config alone (checked against the module in tests).

    Per layer: 4 attention projections (W*W + W each), fc1/fc2 (W*M + M, M*W + W), two LayerNorms (2W each).
    """
    w, m = cfg.width, cfg.mlp_dim
    per_layer = 4 * (w * w + w) + (w * m + m) + (m * w + w) + 2 * (2 * w)
    total = cfg.vocab_size * w + cfg.max_positions * w + cfg.layers * per_layer + 2 * w
    if cfg.projection_dim is not None:
        total += w * cfg.projection_dim
    return total


