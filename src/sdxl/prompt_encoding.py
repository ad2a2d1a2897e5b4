"""Prompt text -> the UNet's context and pooled vector, with A1111 weighting and long prompts.

A prompt is parsed (`sdxl.prompts`), cut into 75-token chunks (each framed by BOS/EOS and padded to 77), every
chunk runs through both text towers, and the chunks are concatenated along the token axis (77*k tokens).
Per-token weights multiply the hidden states ("original" mode then restores the mean, as A1111 does). The
pooled vector comes from the first chunk of the bigG tower. A prompt without any syntax gives exactly the
plain tokenisation (one chunk, all weights 1), i.e. the reference implementations' result.
"""

from __future__ import annotations

import torch


def _plain(text: str) -> bool:
    return not any(c in text for c in "()[]<>\\:|") and "BREAK" not in text


def encode_weighted(pipe, prompts: list[str], prompts_2: list[str], clip_skip: int = 1,
                    emphasis: str = "original") -> tuple[torch.Tensor, torch.Tensor]:
    """(context [B, 77*k, C], pooled [B, P]) for a batch of prompts."""
    ctxs, pools = [], []
    for p1, p2 in zip(prompts, prompts_2):
        c, p = _encode_one(pipe, p1, p2, clip_skip, emphasis)
        ctxs.append(c)
        pools.append(p)
    n = max(c.shape[1] for c in ctxs)
    ctxs = [torch.cat([c, c[:, -77:].repeat(1, (n - c.shape[1]) // 77, 1)], 1) if c.shape[1] < n else c
            for c in ctxs]
    return torch.cat(ctxs), torch.cat(pools)


def _tower_chunks(tower, tok, text: str, clip_skip: int, emphasis: str, device):
    """Hidden states [1, 77*k, W] and pooled [1, P] (first chunk) for one tower."""
    from .prompts import PromptChunks, apply_weights

    if _plain(text):
        ids = tok([text]).to(device)
        hidden, pooled = tower(ids, skip=clip_skip)
        return hidden, pooled
    chunks = PromptChunks.from_text(text, tok)
    hs, pooled = [], None
    for ids, _weights in chunks:
        h, p = tower(torch.tensor([ids], device=device), skip=clip_skip)
        hs.append(h)
        pooled = p if pooled is None else pooled
    hidden = torch.cat(hs, dim=1)
    weights = torch.tensor([w for _, ws in chunks for w in ws], device=device, dtype=hidden.dtype)
    return apply_weights(hidden, weights[None], mode=emphasis), pooled


def _encode_one(pipe, p1: str, p2: str, clip_skip: int, emphasis: str):
    dev = pipe.device
    parts, pooled = [], None
    if pipe.text.clip_l is not None:
        h, _ = _tower_chunks(pipe.text.clip_l, pipe.tok_l, p1, clip_skip, emphasis, dev)
        parts.append(h)
    if pipe.text.clip_g is not None:
        h, pooled = _tower_chunks(pipe.text.clip_g, pipe.tok_g, p2, clip_skip, emphasis, dev)
        parts.append(h)
    if not parts:
        raise ValueError("this checkpoint has no text encoders; it cannot encode a prompt")
    n = max(x.shape[1] for x in parts)
    parts = [torch.cat([x, x[:, -77:].repeat(1, (n - x.shape[1]) // 77, 1)], 1) if x.shape[1] < n else x
             for x in parts]
    return torch.cat(parts, dim=-1), pooled
