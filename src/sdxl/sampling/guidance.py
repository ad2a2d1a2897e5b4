"""Classifier-free guidance as a model function for `ModelDenoiser`: both branches in one batch, guidance
rescale, CFG limited to a range of steps, per-step conditioning (A1111 prompt editing), and
perturbed-attention guidance (PAG: a third, perturbed cond branch in the same batch; `sdxl.models.pag`
perturbs the layers).

A conditioning schedule is a list of (end_step, context, y) entries: entry k applies to the steps before
`end_step` (1-based, inclusive). The step a UNet call belongs to is read off its timestep, so the
intermediate evaluations of second-order samplers count as their step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ..models.pag import PerturbState

Schedule = Sequence[tuple[int, Tensor, Tensor]]


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
    cond: Schedule,
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
) -> Callable[[Tensor, Tensor], Tensor]:
    """A model function (x, t) -> output for `ModelDenoiser`.

    cfg_steps: guidance applies on steps first <= step < last; other steps (and scale 1) run the cond
    branch alone. extra_channels: concatenated to x (an inpainting UNet's [mask | masked-image latents]).
    pag_scale, pag_state: with a scale > 0 and the state of `sdxl.models.pag.perturb_self_attention` (the
    UNet's layers already swapped), every step also runs the cond branch perturbed, last in the batch.
    """
    first, last = cfg_steps
    pag = pag_state is not None and pag_scale > 0

    def run(x: Tensor, tt: Tensor, context: Tensor, y: Tensor, branches: int) -> list[Tensor]:
        """The UNet on `branches` copies of x with the given per-branch (already batched) conditioning;
        with PAG the cond branch is repeated last and perturbed."""
        b = x.shape[0]
        if pag:
            context = torch.cat([context, context[-b:]])
            y = torch.cat([y, y[-b:]])
            branches += 1
            pag_state.rows = b
        try:
            out = unet(torch.cat([x] * branches), torch.cat([tt] * branches), context, y).float()
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
                return unet(x, tt, context, y).float()
            out_cond, out_ptb = run(x, tt, context, y, 1)
            return cfg_combine(None, out_cond, scale, perturbed=out_ptb, pag_scale=pag_scale)
        ncontext, ny = conditioning_at(uncond, step)
        outs = run(x, tt, torch.cat([ncontext, context]), torch.cat([ny, y]), 2)
        return cfg_combine(outs[0], outs[1], scale, rescale, perturbed=outs[2] if pag else None,
                           pag_scale=pag_scale)

    return model_fn
