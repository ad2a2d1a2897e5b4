"""Classifier-free guidance as a model function for `ModelDenoiser`: both branches in one batch, guidance
rescale, CFG limited to a range of steps, per-step conditioning (A1111 prompt editing), and
perturbed-attention guidance (PAG: a third, perturbed cond branch in the same batch; `sdxl.models.pag`
perturbs the layers), and A1111's composable `AND` prompts with optional region masks (`Composable`).

A conditioning schedule is a list of (end_step, context, y) entries: entry k applies to the steps before
`end_step` (1-based, inclusive). The step a UNet call belongs to is read off its timestep, so the
intermediate evaluations of second-order samplers count as their step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..models.pag import PerturbState
from ..models.unet import UNetControl

Schedule = Sequence[tuple[int, Tensor, Tensor]]

# control(x, t, context, y, step, uncond_rows) -> what control models add to this UNet call (or None): called
# with the batch the UNet is about to see, whose first `uncond_rows` rows are the unconditional branch.
ControlFn = Callable[[Tensor, Tensor, Tensor, Tensor, int, int], "UNetControl | None"]


def call_unet(unet: Callable[..., Tensor], x: Tensor, t: Tensor, context: Tensor, y: Tensor,
              control: ControlFn | None, step: int, uncond_rows: int) -> Tensor:
    """One UNet call, with what `control` adds for it (the UNet is called exactly as before without one)."""
    added = control(x, t, context, y, step, uncond_rows) if control is not None else None
    if added is None:
        return unet(x, t, context, y)
    return unet(x, t, context, y, control=added)


def cfg_combine(uncond: Tensor | None, cond: Tensor, scale: float, rescale: float = 0.0,
                perturbed: Tensor | None = None, pag_scale: float = 0.0) -> Tensor:
    """uncond + scale * (cond - uncond) [+ pag_scale * (cond - perturbed)], then guidance rescale (Lin et al.
    2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed", eq. 15-16): match the guided
    output's std to the cond branch's and blend with weight `rescale`.

    PAG (Ahn et al. 2024) adds pag_scale * (cond - perturbed), as diffusers' PAG pipelines do; `uncond` None
    means no CFG (cond + pag_scale * (cond - perturbed), no rescale)."""
    guided = cond if uncond is None else uncond + scale * (cond - uncond)
    if perturbed is not None:
        guided = guided + pag_scale * (cond - perturbed)
    if uncond is None:
        return guided
    if rescale > 0:
        dims = list(range(1, cond.ndim))
        rescaled = guided * (cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
        guided = rescale * rescaled + (1 - rescale) * guided
    return guided


@dataclass
class Composable:
    """The cond side of a composable prompt ("a cat AND a dog :0.7"): one schedule per distinct sub-prompt
    text (`parts`, each encoded once, as A1111 does) and, per sub-prompt in prompt order, (index into
    `parts`, weight). The first term is the base sub-prompt."""

    parts: list[Schedule]
    terms: list[tuple[int, float]]

    def entries(self) -> list[tuple[int, Tensor, Tensor]]:
        return [entry for part in self.parts for entry in part]


def region_coverage(masks: Tensor) -> Tensor:
    """Per-pixel shares a_i [n, 1, h, w] of n sub-prompts from their masks m_i [n, 1, h, w] in [0, 1]
    (white = the sub-prompt applies there), summing to 1 at every pixel:

        s = sum_i m_i;   a_i = m_i / max(s, 1);   then a_1 += max(1 - s, 0)

    Where masks overlap (s > 1) they share the pixel in proportion; where they cover less than the whole
    pixel (s < 1, e.g. no mask at all) the rest goes to the first (base) sub-prompt."""
    m = masks.float().clamp(0, 1)
    total = m.sum(dim=0, keepdim=True)
    a = m / total.clamp(min=1.0)
    a[0:1] = a[0:1] + (1 - total).clamp(min=0.0)
    return a


def composable_combine(uncond: Tensor | None, conds: Sequence[Tensor], weights: Sequence[float], scale: float,
                       coverage: Tensor | None = None, rescale: float = 0.0, perturbed: Tensor | None = None,
                       pag_scale: float = 0.0) -> Tensor:
    """A1111's composable-diffusion CFG (Liu et al. 2022), with optional region shares.

    conds: the UNet output of each sub-prompt in prompt order (repeats allowed), weights w_i its weight,
    coverage a_i [n, 1, h, w] from `region_coverage` (None: a_i = 1 everywhere, plain composable diffusion):

        guided = u + scale * sum_i a_i * w_i * (c_i - u)

    With one sub-prompt of weight 1 and no coverage this is `cfg_combine`'s u + scale * (c - u).
    `uncond` None (a step outside the CFG range) puts the reference r = c_1 (no coverage; A1111's "skip
    uncond" uses the first cond output in place of uncond) or r = sum_i a_i c_i (with coverage: each region's
    own prompt) in u's place, so a region covered by one sub-prompt of weight 1 gets that prompt's output.
    Guidance rescale matches the std of the scale-1 combination u + sum_i a_i w_i (c_i - u) (the cond output
    itself for one prompt); PAG adds pag_scale * (c_1 - perturbed), the base sub-prompt perturbed."""
    shares = [1.0] * len(conds) if coverage is None else list(coverage)
    if uncond is not None:
        ref = uncond
    elif coverage is None:
        ref = conds[0]
    else:
        ref = sum(a * c for a, c in zip(shares, conds))
    delta = sum((a * w) * (c - ref) for a, w, c in zip(shares, weights, conds))
    guided = ref + scale * delta
    if perturbed is not None:
        guided = guided + pag_scale * (conds[0] - perturbed)
    if uncond is not None and rescale > 0:
        target = ref + delta
        dims = list(range(1, target.ndim))
        rescaled = guided * (target.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
        guided = rescale * rescaled + (1 - rescale) * guided
    return guided


def conditioning_at(schedule: Schedule, step: int) -> tuple[Tensor, Tensor]:
    """(context, y) of the entry that covers 0-based `step`."""
    for end, context, y in schedule:
        if step + 1 <= end:
            return context, y
    return schedule[-1][1], schedule[-1][2]


def step_finder(timesteps: Sequence[float]) -> Callable[[float], int]:
    """t -> the 0-based index of the sampler step whose starting timestep is the last one >= t."""
    ts = list(timesteps)

    def step_of(t: float) -> int:
        return max(sum(1 for s in ts if s >= t - 1e-4) - 1, 0)

    return step_of


def guided_model(
    unet: Callable[..., Tensor],
    cond: Schedule | Composable,
    uncond: Schedule,
    *,
    scale: float,
    rescale: float = 0.0,
    cfg_steps: tuple[int, int],
    step_of: Callable[[float], int],
    dtype: torch.dtype = torch.float32,
    extra_channels: Tensor | None = None,
    pag_scale: float = 0.0,
    pag_state: PerturbState | None = None,
    region_masks: Tensor | None = None,
    control: ControlFn | None = None,
) -> Callable[[Tensor, Tensor], Tensor]:
    """A model function (x, t) -> output for `ModelDenoiser`.

    cfg_steps: guidance applies on steps first <= step < last; other steps (and scale 1) run the cond
    branch alone. extra_channels: concatenated to x (an inpainting UNet's [mask | masked-image latents]).
    pag_scale, pag_state: with a scale > 0 and the state of `sdxl.models.pag.perturb_self_attention` (the
    UNet's layers already swapped), every step also runs the cond branch perturbed, last in the batch.
    cond a `Composable`: see `composable_model` (region_masks [n, 1, h, w]: one latent-sized mask per
    sub-prompt). control: see `ControlFn` (ControlNet, T2I-Adapter).
    """
    first, last = cfg_steps
    pag = pag_state is not None and pag_scale > 0
    if isinstance(cond, Composable):
        return composable_model(unet, cond, uncond, scale=scale, rescale=rescale, cfg_steps=cfg_steps,
                                step_of=step_of, dtype=dtype, extra_channels=extra_channels,
                                pag_scale=pag_scale if pag else 0.0, pag_state=pag_state if pag else None,
                                region_masks=region_masks, control=control)

    def run(x: Tensor, tt: Tensor, context: Tensor, y: Tensor, branches: int, step: int) -> list[Tensor]:
        """The UNet on `branches` copies of x with the given per-branch (already batched) conditioning;
        with PAG the cond branch is repeated last and perturbed. With 2 branches the first is uncond."""
        b = x.shape[0]
        uncond_rows = b if branches == 2 else 0
        if pag:
            context = torch.cat([context, context[-b:]])
            y = torch.cat([y, y[-b:]])
            branches += 1
            pag_state.rows = b
        try:
            out = call_unet(unet, torch.cat([x] * branches), torch.cat([tt] * branches), context, y, control,
                            step, uncond_rows).float()
        finally:
            if pag:
                pag_state.rows = 0
        return list(out.split(b))

    def model_fn(x: Tensor, t: Tensor) -> Tensor:
        x = x.to(dtype)
        if extra_channels is not None:
            x = torch.cat([x, extra_channels.to(x)], dim=1)
        tt = t.to(x.device).reshape(-1).expand(x.shape[0])
        step = step_of(float(tt[0]))
        context, y = conditioning_at(cond, step)
        if scale == 1.0 or not first <= step < last:
            if not pag:
                return call_unet(unet, x, tt, context, y, control, step, 0).float()
            out_cond, out_ptb = run(x, tt, context, y, 1, step)
            return cfg_combine(None, out_cond, scale, perturbed=out_ptb, pag_scale=pag_scale)
        ncontext, ny = conditioning_at(uncond, step)
        outs = run(x, tt, torch.cat([ncontext, context]), torch.cat([ny, y]), 2, step)
        return cfg_combine(outs[0], outs[1], scale, rescale, perturbed=outs[2] if pag else None,
                           pag_scale=pag_scale)

    return model_fn


def composable_model(
    unet: Callable[..., Tensor],
    cond: Composable,
    uncond: Schedule,
    *,
    scale: float,
    rescale: float = 0.0,
    cfg_steps: tuple[int, int],
    step_of: Callable[[float], int],
    dtype: torch.dtype = torch.float32,
    extra_channels: Tensor | None = None,
    pag_scale: float = 0.0,
    pag_state: PerturbState | None = None,
    region_masks: Tensor | None = None,
    control: ControlFn | None = None,
) -> Callable[[Tensor, Tensor], Tensor]:
    """`guided_model` for a composable prompt: one UNet batch holds the uncond branch (on CFG steps; at
    scale 1 too, as A1111 runs it), each distinct sub-prompt once, and with PAG the base sub-prompt again,
    perturbed, last. The outputs are combined by `composable_combine`, with `region_coverage(region_masks)`
    when masks are given (their count must equal the number of sub-prompts)."""
    first, last = cfg_steps
    pag = pag_state is not None and pag_scale > 0
    n = len(cond.terms)
    coverage = None
    if region_masks is not None:
        if region_masks.shape[0] != n:
            raise ValueError(f"{region_masks.shape[0]} region masks for {n} sub-prompts")
        coverage = region_coverage(region_masks)
    weights = [w for _, w in cond.terms]
    base = cond.terms[0][0]

    def model_fn(x: Tensor, t: Tensor) -> Tensor:
        x = x.to(dtype)
        if extra_channels is not None:
            x = torch.cat([x, extra_channels.to(x)], dim=1)
        b = x.shape[0]
        tt = t.to(x.device).reshape(-1).expand(b)
        step = step_of(float(tt[0]))
        guided = first <= step < last
        branches = [conditioning_at(part, step) for part in cond.parts]
        if guided:
            branches.insert(0, conditioning_at(uncond, step))
        if pag:
            branches.append(branches[base + guided])
        context = torch.cat([c for c, _ in branches])
        y = torch.cat([v for _, v in branches])
        if pag:
            pag_state.rows = b
        try:
            out = call_unet(unet, torch.cat([x] * len(branches)), torch.cat([tt] * len(branches)), context, y,
                            control, step, b if guided else 0).float()
        finally:
            if pag:
                pag_state.rows = 0
        outs = list(out.split(b))
        u = outs.pop(0) if guided else None
        perturbed = outs.pop() if pag else None
        conds = [outs[i] for i, _ in cond.terms]
        cov = None if coverage is None else coverage.to(conds[0])
        return composable_combine(u, conds, weights, scale, cov, rescale if guided else 0.0, perturbed,
                                  pag_scale)

    return model_fn
