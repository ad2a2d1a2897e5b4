"""The diffusion objective (SDXL paper section 2.5 and appendix C; sgm `StandardDiffusionLoss` with
`EpsWeighting`):

    t     ~ U{timestep_min, ..., timestep_max - 1}         (1000 discrete DDPM levels; [0, 200) for a refiner)
            or, with `loss.timestep_sampling = "logit_normal"` (SD3, Esser et al. 2024), t = t_min + floor(
            (t_max - t_min) * sigmoid(loc + scale * N(0, 1))): more of the steps where the picture takes shape
    eps   ~ N(0, I)  (+ offset_noise * N(0, 1) per sample[, channel], broadcast over the pixels)
    x_t   = sqrt(abar_t) * x0 + sqrt(1 - abar_t) * eps       (variance preserving)
    loss  = w_t * || UNet(x_t, t, context, y) - target ||^2
    target = eps, or v = sqrt(abar) eps - sqrt(1 - abar) x0 with `prediction = "v"`

x_t is exactly what the sampler feeds the UNet: in sigma space x = x0 + sigma * eps and the UNet sees
c_in * x = (x0 + sigma eps) / sqrt(1 + sigma^2); with sigma^2 = (1 - abar) / abar that is the line above.
w_t = 1, or the min-SNR-gamma weight min(SNR, gamma) / SNR (eps) or min(SNR, gamma) / (SNR + 1) (v), times
kohya's debiased estimation weight 1 / sqrt(SNR) (eps) or 1 / (SNR + 1) (v) when `loss.debiased_estimation` is
on. With `loss.multires_noise_iterations` eps is kohya's pyramid noise (`pyramid_noise`).

Every random number of a sample (posterior noise, timestep, noise, offset) comes from a generator seeded with
(seed, optimizer step, epoch, dataset index), so results do not depend on how the global batch is split over
processes and accumulation steps (a 2-process run equals a 1-process run with the same global batch) and a
resumed run draws the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


def sample_generator(seed: int, step: int, epoch: int, index: int) -> torch.Generator:
    """The CPU generator of one sample: a pure function of (seed, optimizer step, epoch, dataset index).

    Nothing about the batch layout enters, so batch 4 on one process, batch 2 on two processes and batch 2
    with two accumulation steps draw the same numbers for the same images.
    """
    state = np.random.SeedSequence([seed, step, epoch, index]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator("cpu").manual_seed(int(state))


@dataclass
class NoiseDraw:
    """The random numbers of a batch, drawn per sample in a fixed order: posterior noise, t, eps, offset."""

    posterior: Tensor  # [B, C, h, w] standard normal, for sampling the VAE posterior
    t: Tensor  # [B] long
    noise: Tensor  # [B, C, h, w], offset noise included


def draw_timestep(g: torch.Generator, t_min: int, t_max: int, sampling: str = "uniform", loc: float = 0.0,
                  scale: float = 1.0) -> Tensor:
    """One training timestep in [t_min, t_max): uniform, or logit-normal (SD3's density over the range)."""
    if sampling == "uniform":
        return torch.randint(t_min, t_max, (1,), generator=g)
    u = torch.sigmoid(loc + scale * torch.randn((1,), generator=g, dtype=torch.float64))
    return (t_min + torch.floor(u * (t_max - t_min))).long().clamp(t_min, t_max - 1)


def pyramid_noise(noise: Tensor, g: torch.Generator, iterations: int, discount: float) -> Tensor:
    """kohya's `pyramid_noise_like` (multi-resolution noise) for one sample [C, h, w].

    Level i (i = 0 .. iterations - 1) adds N(0, 1) noise drawn at (int(h / r^i), int(w / r^i)) (at least 1),
    r uniform in [2, 4) per level, bilinearly upsampled to (h, w) and scaled by discount^i; the pyramid stops
    after the first level that reaches a side of 1. The sum is divided by its standard deviation. kohya
    divides by the std of the whole batch; here each sample is normalised alone (kohya at batch size 1), so a
    sample's noise does not depend on its batch neighbours. Level 0 is a full-size draw added to `noise`.
    """
    c, h, w = noise.shape
    out = noise.clone()
    for i in range(iterations):
        r = float(torch.rand((), generator=g, dtype=torch.float64)) * 2 + 2
        hn, wn = max(1, int(h / r**i)), max(1, int(w / r**i))
        level = torch.randn((1, c, hn, wn), generator=g)
        out += F.interpolate(level, size=(h, w), mode="bilinear", align_corners=False)[0] * discount**i
        if hn == 1 or wn == 1:
            break
    return out / out.std()


def draw_noise(gens: list[torch.Generator], shape: tuple[int, ...], t_min: int, t_max: int,
               offset_level: float = 0.0, offset_mode: str = "channel",
               t_sampling: tuple[str, float, float] = ("uniform", 0.0, 1.0),
               multires: tuple[int, float] = (0, 0.3)) -> NoiseDraw:
    posterior, ts, noises = [], [], []
    c = shape[0]
    for g in gens:
        posterior.append(torch.randn(shape, generator=g))
        ts.append(draw_timestep(g, t_min, t_max, *t_sampling))
        eps = torch.randn(shape, generator=g)
        if offset_level > 0:
            # sgm StandardDiffusionLoss: noise + level * N(0, 1) broadcast over the pixels; "sample" shares
            # one number across the channels ([B,1,1,1], the 2023 release), "channel" draws one per channel
            # ([B,C,1,1], sgm's later code).
            offset = torch.randn((c if offset_mode == "channel" else 1, 1, 1), generator=g)
            eps = eps + offset_level * offset
        if multires[0] > 0:  # kohya: the pyramid after the offset; drawn after the sample's other numbers
            eps = pyramid_noise(eps, g, multires[0], multires[1])
        noises.append(eps)
    return NoiseDraw(torch.stack(posterior), torch.cat(ts), torch.stack(noises))


def add_noise(x0: Tensor, noise: Tensor, t: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, computed in float32 with abar from the float64 table."""
    abar = alphas_cumprod.to(x0.device)[t].to(torch.float32).reshape(-1, 1, 1, 1)
    return abar.sqrt() * x0 + (1 - abar).sqrt() * noise


def prediction_target(x0: Tensor, noise: Tensor, t: Tensor, alphas_cumprod: Tensor,
                      prediction: str) -> Tensor:
    if prediction == "eps":
        return noise
    abar = alphas_cumprod.to(x0.device)[t].to(torch.float32).reshape(-1, 1, 1, 1)
    return abar.sqrt() * noise - (1 - abar).sqrt() * x0  # v (Salimans & Ho 2022)


def loss_weights(t: Tensor, alphas_cumprod: Tensor, prediction: str, min_snr_gamma: float,
                 floor: float = 0.0) -> Tensor:
    """Per-sample weights [B]: 1, or min-SNR-gamma (Hang et al. 2023) with SNR = abar / (1 - abar).

    The weight of the x0 error is min(SNR, gamma) (clamp(SNR, floor, gamma) with a floor); the eps and v
    losses already weigh it by SNR and SNR + 1, so those are divided out.
    """
    if min_snr_gamma <= 0:
        return torch.ones(t.shape[0], device=t.device)
    abar = alphas_cumprod.to(t.device)[t].to(torch.float32)
    snr = abar / (1 - abar)
    clipped = snr.clamp(min=floor, max=min_snr_gamma)
    if prediction == "eps":  # min(snr, g) / snr, which tends to 1 as snr -> 0 (zero terminal SNR)
        return torch.where(snr > 0, clipped / snr.clamp(min=1e-30), torch.ones_like(snr))
    return clipped / (snr + 1)


def debiased_weights(t: Tensor, alphas_cumprod: Tensor, prediction: str) -> Tensor:
    """kohya's debiased estimation loss weights [B]: 1 / sqrt(SNR) for eps, 1 / (SNR + 1) for v-prediction,
    with SNR = abar / (1 - abar) capped at 1000 (t = 0 would otherwise give a near-infinite SNR)."""
    abar = alphas_cumprod.to(t.device)[t].to(torch.float32)
    snr = (abar / (1 - abar)).clamp(max=1000.0)
    if prediction == "eps":
        return 1.0 / snr.sqrt()
    return 1.0 / (snr + 1)


def per_sample_error(pred: Tensor, target: Tensor, mask: Tensor | None = None,
                     mask_floor: float = 0.0) -> Tensor:
    """Mean squared error of each sample [B], in float32.

    With a loss mask (kohya's masked loss, [B, 1, H, W] at image resolution) the mask, averaged down to the
    latent grid and lifted to at least `mask_floor`, weights the error: sum(w * err) / sum(w).
    """
    err = F.mse_loss(pred.float(), target, reduction="none")
    if mask is None:
        return err.mean(dim=(1, 2, 3))
    m = F.adaptive_avg_pool2d(mask.to(err.device, torch.float32), err.shape[-2:])
    m = mask_floor + (1.0 - mask_floor) * m
    return (err * m).sum(dim=(1, 2, 3)) / (m.sum(dim=(1, 2, 3)) * err.shape[1]).clamp_min(1e-8)
