"""Prompt text -> the UNet's context and pooled vector, with A1111 weighting and long prompts.

A prompt is parsed (`sdxl.prompts`), cut into 75-token chunks (each framed by BOS/EOS and padded to 77), every
chunk runs through both text towers, and the chunks are concatenated along the token axis (77*k tokens).
Per-token weights multiply the hidden states ("original" mode then restores the mean, as A1111 does). The
pooled vector comes from the first chunk of the bigG tower. A prompt without any syntax gives exactly the
plain tokenisation (one chunk, all weights 1), i.e. the reference implementations' result.

Prompt editing (`[from:to:when]`, `[a|b]`) gives one text per range of steps: `encode_schedule` encodes each
distinct text once and returns (end_step, context, pooled) entries for the sampler to switch between.
"""

from __future__ import annotations

import torch

from .prompts import PromptChunks, apply_weights, build_input_embeddings, prepare_prompt

CHUNK = 77


def _plain(text: str) -> bool:
    return not any(c in text for c in "()[]<>\\:|") and "BREAK" not in text


def _tower(pipe, which: str, text: str, clip_skip: int, emphasis: str):
    """Hidden states [1, 77*k, W] and pooled [1, P] (first chunk) for one tower."""
    tower = pipe.text.clip_l if which == "clip_l" else pipe.text.clip_g
    tok = pipe.tok_l if which == "clip_l" else pipe.tok_g
    dev = next(tower.parameters()).device
    library = getattr(pipe, "embeddings", None)
    if _plain(text) and library is None:
        return tower(tok([text]).to(dev), skip=clip_skip)
    chunks = PromptChunks.from_text(text, tok, embeddings=library, emphasis=emphasis != "none")
    return _encode_chunks(
        tower, chunks, library, which, clip_skip, emphasis, build_input_embeddings, apply_weights
    )


def _encode_chunks(tower, chunks, library, key, clip_skip, emphasis, build_input_embeddings, apply_weights):
    dev = next(tower.parameters()).device
    ids = torch.tensor(chunks.ids, dtype=torch.long, device=dev)  # [k, 77]
    embeds = None
    if chunks.overrides:
        embeds = build_input_embeddings(chunks, tower.embeddings.token_embedding, library, key)
    hidden, pooled = tower(ids, skip=clip_skip, embeds=embeds)
    hidden = hidden.reshape(1, -1, hidden.shape[-1])
    pooled = pooled[:1] if pooled is not None else None
    weights = torch.tensor([w for ws in chunks.weights for w in ws], device=dev)
    if emphasis not in ("none",) and bool((weights != 1).any()):
        hidden = apply_weights(hidden, weights[None], mode=emphasis)
    return hidden, pooled


def _pad_chunks(x: torch.Tensor, n: int) -> torch.Tensor:
    """Pad [B, 77*k, C] to [B, n, C] by repeating the last chunk (an almost-empty chunk in practice)."""
    if x.shape[1] >= n:
        return x
    return torch.cat([x, x[:, -CHUNK:].repeat(1, (n - x.shape[1]) // CHUNK, 1)], dim=1)


def encode_text(
    pipe, p1: str, p2: str | None = None, clip_skip: int = 1, emphasis: str = "original"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(context [1, 77*k, C_l + C_g], pooled [1, P]) for one prompt (p2 = the bigG prompt, default p1)."""
    p2 = p1 if p2 is None else p2
    parts, pooled = [], None
    if pipe.text.clip_l is not None:
        h, _ = _tower(pipe, "clip_l", p1, clip_skip, emphasis)
        parts.append(h)
    if pipe.text.clip_g is not None:
        h, pooled = _tower(pipe, "clip_g", p2, clip_skip, emphasis)
        parts.append(h)
    if not parts:
        raise ValueError("this checkpoint has no text encoders; it cannot encode a prompt")
    n = max(x.shape[1] for x in parts)
    return torch.cat([_pad_chunks(x, n) for x in parts], dim=-1), pooled


def encode_weighted(
    pipe, prompts: list[str], prompts_2: list[str], clip_skip: int = 1, emphasis: str = "original"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched `encode_text`: (context [B, 77*k, C], pooled [B, P])."""
    out = [encode_text(pipe, a, b, clip_skip, emphasis) for a, b in zip(prompts, prompts_2)]
    n = max(c.shape[1] for c, _ in out)
    return torch.cat([_pad_chunks(c, n) for c, _ in out]), torch.cat([p for _, p in out])


def encode_schedule(
    pipe, prompt: str, prompt_2: str | None, steps: int, clip_skip: int = 1, emphasis: str = "original"
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
            cache[(t1, t2)] = encode_text(pipe, t1, t2, clip_skip, emphasis)
        out.append((end, *cache[(t1, t2)]))
    return out
