"""Prompt text -> the UNet's context and pooled vector, with A1111 weighting and long prompts.

A prompt is parsed (`sdxl.prompts`), cut into 75-token chunks (each framed by BOS/EOS and padded to 77), every
chunk runs through both text towers, and the chunks are concatenated along the token axis (77*k tokens).
Per-token weights multiply the hidden states ("original" mode then restores the mean, as A1111 does). The
pooled vector comes from the first chunk of the bigG tower. A prompt without any syntax gives exactly the
plain tokenisation (one chunk, all weights 1), i.e. the reference implementations' result. The towers run
through `TextEncoders.encode`, the same call the trainer makes.

Prompt editing (`[from:to:when]`, `[a|b]`) gives one text per range of steps: `encode_schedule` encodes each
distinct text once and returns (end_step, context, pooled) entries for the sampler to switch between.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .models.text import TextEncoders
from .prompts import (
    EmbeddingLibrary,
    PromptChunks,
    align_chunks,
    apply_weights,
    build_input_embeddings,
    prepare_prompt,
)

CHUNK = 77


@dataclass(frozen=True)
class TextStack:
    """What turns a prompt into conditioning: the text towers, their tokenizers (CLIP-L pads with EOS,
    bigG with 0) and the textual-inversion library."""

    encoders: TextEncoders
    tok_l: Any
    tok_g: Any
    library: EmbeddingLibrary | None = None


def _pad_chunks(x: torch.Tensor, n: int) -> torch.Tensor:
    """Pad [B, 77*k, C] to [B, n, C] by repeating the last chunk (an almost-empty chunk in practice)."""
    if x.shape[1] >= n:
        return x
    return torch.cat([x, x[:, -CHUNK:].repeat(1, (n - x.shape[1]) // CHUNK, 1)], dim=1)


def encode_text(
    stack: TextStack, p1: str, p2: str | None = None, clip_skip: int = 1, emphasis: str = "original"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(context [1, 77*k, C_l + C_g], pooled [1, P]) for one prompt (p2 = the bigG prompt, default p1).

    Each tower's prompt is cut into chunks (`PromptChunks`), the two padded to the same count with empty
    chunks (as A1111 and ComfyUI do), and all chunks run through `TextEncoders.encode` as one batch, with
    the prompt weights applied per tower before the channels are joined."""
    enc = stack.encoders
    if enc.clip_l is None and enc.clip_g is None:
        raise ValueError("this checkpoint has no text encoders; it cannot encode a prompt")
    p2 = p1 if p2 is None else p2
    towers = {key: (tower, tok, text)
              for key, tower, tok, text in (("clip_l", enc.clip_l, stack.tok_l, p1),
                                            ("clip_g", enc.clip_g, stack.tok_g, p2))
              if tower is not None}  # fmt: skip
    chunked = [PromptChunks.from_text(text, tok, embeddings=stack.library, emphasis=emphasis != "none")
               for _, tok, text in towers.values()]  # fmt: skip
    chunks = dict(zip(towers, align_chunks(*chunked)))
    dev = next(enc.parameters()).device
    ids = {k: torch.tensor(c.ids, dtype=torch.long, device=dev) for k, c in chunks.items()}  # [k, 77]
    embeds = {
        k: build_input_embeddings(c, towers[k][0].embeddings.token_embedding, stack.library, k)
        for k, c in chunks.items()
        if c.overrides
    }
    weights = {k: torch.tensor(c.flat_weights, device=dev) for k, c in chunks.items()}

    def reweight(key: str, hidden: torch.Tensor) -> torch.Tensor:  # [k, 77, W] -> [1, 77 * k, W]
        hidden = hidden.reshape(1, -1, hidden.shape[-1])
        if emphasis != "none" and bool((weights[key] != 1).any()):
            hidden = apply_weights(hidden, weights[key][None], mode=emphasis)
        return hidden

    context, pooled = enc.encode(ids.get("clip_l"), ids.get("clip_g"), clip_skip, embeds.get("clip_l"),
                                 embeds.get("clip_g"), reweight=reweight)  # fmt: skip
    return context, pooled[:1] if pooled is not None else None


def encode_weighted(
    stack: TextStack, prompts: list[str], prompts_2: list[str], clip_skip: int = 1, emphasis: str = "original"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched `encode_text`: (context [B, 77*k, C], pooled [B, P])."""
    out = [encode_text(stack, a, b, clip_skip, emphasis) for a, b in zip(prompts, prompts_2)]
    n = max(c.shape[1] for c, _ in out)
    return torch.cat([_pad_chunks(c, n) for c, _ in out]), torch.cat([p for _, p in out])


def encode_schedule(
    stack: TextStack,
    prompt: str,
    prompt_2: str | None,
    steps: int,
    clip_skip: int = 1,
    emphasis: str = "original",
) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    """[(end_step, context, pooled)] for a prompt with A1111 prompt editing; LoRA tags are removed."""
    plan = prepare_prompt(prompt, steps)
    plan2 = prepare_prompt(prompt_2, steps) if prompt_2 is not None else None
    ends = sorted({e for e, _ in plan.schedule} | ({e for e, _ in plan2.schedule} if plan2 else set()))
    cache: dict[tuple[str, str | None], tuple[torch.Tensor, torch.Tensor]] = {}
    out = []
    for end in ends:
        t1 = next(t for e, t in plan.schedule if e >= end)
        t2 = next(t for e, t in plan2.schedule if e >= end) if plan2 else None
        if (t1, t2) not in cache:
            cache[(t1, t2)] = encode_text(stack, t1, t2, clip_skip, emphasis)
        out.append((end, *cache[(t1, t2)]))
    return out
