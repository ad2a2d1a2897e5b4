"""Samplers: small functions that walk a denoiser down a list of sigmas (k-diffusion style, written anew).

Every sampler has the signature

    fn(denoiser, x, sigmas, *, generator=None, callback=None, extra=None, **options) -> x

- `denoiser(x, sigma, **extra) -> x0_hat` works in sigma space: x = x0 + sigma * eps (see `denoiser.py`);
  `sigma` is passed as a float32 [B] tensor.
- `x` is the starting sample at noise level sigmas[0] (for txt2img: unit noise * sqrt(1 + sigmas[0]^2) or
  * sigmas[0], depending on the convention being reproduced).
- `sigmas` is a descending 1-D sequence (see `schedules.py`); n = len(sigmas) - 1 steps. The result is the
  sample at sigmas[-1] (0 for a full run: the clean latent).
- `callback(i, sigma, x, denoised)` runs after step i (0-based): `x` is the sample now at noise level
  `sigma` = sigmas[i + 1], `denoised` the step's last x0 estimate. If it returns "stop", or raises
  `Interrupted`, sampling stops by raising `Interrupted`, which carries the step, x and denoised at that
  point.
- Stochastic samplers draw their noise as `torch.randn(shape, generator=generator, device=generator.device,
  dtype=float32)` and then move it to x's device and dtype, so a seeded CPU generator reproduces an image on
  any device. Without a generator the global CPU RNG is used. Noise is drawn only for steps that add noise
  (never for the final step to sigma = 0).
- The options `eta` and `s_noise` are accepted by every sampler so that callers can pass them uniformly;
  samplers without noise ignore them. Other unknown options are a TypeError.

Where a sampler can be written in the k-diffusion form, it is the same method as k-diffusion's `sample_*`
function of that name (same update formulas, same step structure), so results match k-diffusion / A1111 /
ComfyUI given the same sigmas and the same noise. The noise itself differs for the DPM++ SDE samplers:
k-diffusion (and A1111, ComfyUI) query a seeded Brownian tree there; here the increments of the same Brownian
motion are drawn as plain seeded gaussians (independent across steps, correlated within a `dpmpp_sde` step
exactly as the tree's are). Same distribution, different draws, so those images differ from the UIs' for the
same seed. ComfyUI's "_gpu" variants only move that tree to the GPU and resolve to the same samplers here.

`ddim` is DDIM (Song et al. 2021) written in sigma space: with eta = 0 it is exactly Euler on the
probability-flow ODE, and DDIM's eta-noise splits each step exactly like an ancestral step (derived in
`ddim`'s docstring). `unipc` is UniPC (Zhao et al. 2023) in its data-prediction multistep form with the UniC
corrector, as diffusers' UniPCMultistepScheduler runs it. `lcm` is the Latent Consistency Model sampler
(jump to the model's x0 estimate, re-noise to the next sigma); `tcd` the Trajectory Consistency Distillation
sampler (its `eta` is TCD's gamma), which steps on the model's discrete timesteps and, like diffusers and
ComfyUI, ends on the first training level (t = 0) rather than at sigma = 0.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import Interrupted, RequestError
from .denoiser import DiscreteSchedule
from .names import A1111_SAMPLER_NAMES

Tensor = torch.Tensor
Denoiser = Callable[..., Tensor]
Callback = Callable[[int, float, Tensor, Tensor], object]

# Options every sampler accepts; a sampler whose body does not use them ignores them.
_UNIVERSAL_OPTIONS = ("eta", "s_noise")



# ------------------------------------------------------------------------------------------- shared plumbing
class _Run:
    """The parts every sampler shares: sigmas as floats, calling the denoiser, drawing noise, the callback."""

    def __init__(self, denoiser: Denoiser, sigmas, generator, callback, extra):
        sig = torch.as_tensor(sigmas).detach().reshape(-1).to("cpu", torch.float64)
        if sig.numel() < 1:
            raise ValueError("sigmas is empty")
        if (sig < 0).any() or (sig[1:] > sig[:-1]).any():
            raise ValueError(f"sigmas must be non-negative and descending, got {sig.tolist()}")
        # Python floats: the step coefficients are computed in double precision on the host, so the maths does
        # not depend on the device, and no device tensor needs synchronising per step.
        self.sigmas: list[float] = sig.tolist()
        self.steps = len(self.sigmas) - 1
        self.denoiser = denoiser
        self.generator = generator
        self.callback = callback
        self.extra = dict(extra or {})

    def denoise(self, x: Tensor, sigma: float) -> Tensor:
        s = torch.full((x.shape[0],), sigma, dtype=torch.float32, device=x.device)
        return self.denoiser(x, s, **self.extra)

    def noise(self, like: Tensor) -> Tensor:
        """Unit gaussian noise shaped like `like`, drawn on the generator's device in float32 (module doc)."""
        device = self.generator.device if self.generator is not None else torch.device("cpu")
        n = torch.randn(like.shape, generator=self.generator, device=device, dtype=torch.float32)
        return n.to(device=like.device, dtype=like.dtype)

    def done(self, i: int, x: Tensor, denoised: Tensor) -> None:
        """Step i has finished; x is at sigmas[i + 1]. Calls the callback and stops if it asks to."""
        if self.callback is None:
            return
        try:
            answer = self.callback(i, self.sigmas[i + 1], x, denoised)
        except Interrupted as e:
            e.step = i if e.step is None else e.step
            e.x = x if e.x is None else e.x
            e.denoised = denoised if e.denoised is None else e.denoised
            raise
        if answer == "stop":
            raise Interrupted(f"sampling stopped by the callback after step {i + 1}/{self.steps}",
                              step=i, x=x, denoised=denoised)


def _sampler(body: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """Turn `body(run, x, **options)` into the public `fn(denoiser, x, sigmas, *, generator, callback, extra,
    **options)`, with a signature that lists the real options (for help() and for callers that inspect it)."""
    body_params = list(inspect.signature(body).parameters.values())[2:]  # drop (run, x)
    accepted = {p.name for p in body_params}

    @functools.wraps(body)
    def sample(denoiser, x, sigmas, *, generator=None, callback=None, extra=None, **options):
        for name in _UNIVERSAL_OPTIONS:
            if name in options and name not in accepted:
                del options[name]
        unknown = sorted(set(options) - accepted)
        if unknown:
            raise TypeError(f"{body.__name__}() got unknown options {unknown}; it accepts {sorted(accepted)}")
        run = _Run(denoiser, sigmas, generator, callback, extra)
        return body(run, x, **options)

    P = inspect.Parameter
    sample.__signature__ = inspect.Signature(
        [
            P("denoiser", P.POSITIONAL_OR_KEYWORD),
            P("x", P.POSITIONAL_OR_KEYWORD, annotation="Tensor"),
            P("sigmas", P.POSITIONAL_OR_KEYWORD, annotation="Tensor"),
            P("generator", P.KEYWORD_ONLY, default=None, annotation="torch.Generator | None"),
            P("callback", P.KEYWORD_ONLY, default=None, annotation="Callback | None"),
            P("extra", P.KEYWORD_ONLY, default=None, annotation="dict | None"),
            *body_params,
        ],
        return_annotation="Tensor",
    )
    del sample.__wrapped__  # so inspect.signature reports the public signature above, not the body's
    return sample


def _derivative(x: Tensor, denoised: Tensor, sigma: float) -> Tensor:
    """dx/dsigma of the probability-flow ODE: (x - D(x, sigma)) / sigma."""
    return (x - denoised) / sigma


def _exp_step(x: Tensor, denoised: Tensor, sigma: float, sigma_to: float) -> Tensor:
    """The first-order exponential-integrator step (DDIM / DPM-Solver-1) from sigma to sigma_to, holding the
    x0 estimate fixed: x keeps its noise direction and scales it to the new level,
    x0 + (sigma_to / sigma)(x - x0). Algebraically the same as an Euler step in sigma; written this way it
    is also exact for sigma_to = 0."""
    return denoised + (sigma_to / sigma) * (x - denoised)


def ancestral_split(sigma: float, sigma_next: float, eta: float = 1.0) -> tuple[float, float]:
    """Split a step sigma -> sigma_next into a deterministic part down to sigma_down and fresh noise sigma_up.

    sigma_up = min(sigma_next, eta * sqrt(sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2)),
    sigma_down = sqrt(sigma_next^2 - sigma_up^2), so sigma_down^2 + sigma_up^2 = sigma_next^2: the sample
    ends at noise level sigma_next. eta = 1 is the DDPM ancestral step, eta = 0 no noise.
    """
    if eta == 0 or sigma_next == 0:
        return sigma_next, 0.0
    up = min(sigma_next, eta * math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2))
    down = math.sqrt(max(sigma_next**2 - up**2, 0.0))
    return down, up


def _churn(run: _Run, x: Tensor, i: int, s_churn: float, s_tmin: float, s_tmax: float, s_noise: float):
    """Karras et al.'s "churn": raise the noise level from sigma to sigma_hat = sigma (1 + gamma) by adding
    fresh noise before the step. Returns (x, sigma_hat); a no-op (and no noise drawn) when gamma = 0."""
    sigma = run.sigmas[i]
    gamma = min(s_churn / run.steps, 2**0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0
    if gamma <= 0:
        return x, sigma
    sigma_hat = sigma * (1 + gamma)
    x = x + run.noise(x) * s_noise * math.sqrt(sigma_hat**2 - sigma**2)
    return x, sigma_hat


# ---------------------------------------------------------------------------------------------- ODE samplers
@_sampler
def euler(run: _Run, x: Tensor, *, s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = math.inf,
          s_noise: float = 1.0) -> Tensor:
    """Euler's method on dx/dsigma = (x - D(x, sigma)) / sigma (Karras et al. 2022, Alg. 2; churn off by
    default). First order; one model evaluation per step."""
    for i in range(run.steps):
        x, sigma_hat = _churn(run, x, i, s_churn, s_tmin, s_tmax, s_noise)
        denoised = run.denoise(x, sigma_hat)
        x = x + _derivative(x, denoised, sigma_hat) * (run.sigmas[i + 1] - sigma_hat)
        run.done(i, x, denoised)
    return x


@_sampler
def heun(run: _Run, x: Tensor, *, s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = math.inf,
         s_noise: float = 1.0) -> Tensor:
    """Heun's method (trapezoidal rule): an Euler predictor, then the average of the slopes at both ends.
    Second order; two evaluations per step, one for the final step to sigma = 0 (plain Euler there)."""
    for i in range(run.steps):
        x, sigma_hat = _churn(run, x, i, s_churn, s_tmin, s_tmax, s_noise)
        sigma_next = run.sigmas[i + 1]
        denoised = run.denoise(x, sigma_hat)
        d = _derivative(x, denoised, sigma_hat)
        dt = sigma_next - sigma_hat
        if sigma_next == 0:
            x = x + d * dt
        else:
            x_pred = x + d * dt
            denoised = run.denoise(x_pred, sigma_next)
            d_next = _derivative(x_pred, denoised, sigma_next)
            x = x + (d + d_next) / 2 * dt
        run.done(i, x, denoised)
    return x


@_sampler
def dpm_2(run: _Run, x: Tensor, *, s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = math.inf,
          s_noise: float = 1.0) -> Tensor:
    """DPM-Solver-2 as in k-diffusion (Karras et al.'s midpoint variant): an Euler half-step to the geometric
    midpoint sigma_mid = sqrt(sigma * sigma_next), then the full step with the slope found there. Second
    order; two evaluations per step (Euler for the final step to 0)."""
    for i in range(run.steps):
        x, sigma_hat = _churn(run, x, i, s_churn, s_tmin, s_tmax, s_noise)
        sigma_next = run.sigmas[i + 1]
        denoised = run.denoise(x, sigma_hat)
        d = _derivative(x, denoised, sigma_hat)
        if sigma_next == 0:
            x = x + d * (sigma_next - sigma_hat)
        else:
            sigma_mid = math.exp(0.5 * (math.log(sigma_hat) + math.log(sigma_next)))
            x_mid = x + d * (sigma_mid - sigma_hat)
            denoised = run.denoise(x_mid, sigma_mid)
            x = x + _derivative(x_mid, denoised, sigma_mid) * (sigma_next - sigma_hat)
        run.done(i, x, denoised)
    return x


def _lms_coefficient(sig: list[float], i: int, j: int, order: int) -> float:
    """Weight of the derivative at sigma_{i-j} in the linear multistep step sigma_i -> sigma_{i+1}: the
    integral over [sigma_i, sigma_{i+1}] of the Lagrange basis polynomial through sigma_i, ...,
    sigma_{i-order+1} that is 1 at sigma_{i-j}. The polynomial is integrated exactly (its coefficients
    expanded in tau - sigma_i)."""
    base = sig[i]
    poly = [1.0]  # coefficients of the basis polynomial in u = tau - sigma_i, lowest degree first
    for k in range(order):
        if k == j:
            continue
        root = sig[i - k] - base
        scale = sig[i - j] - sig[i - k]
        grown = [0.0] * (len(poly) + 1)
        for p, c in enumerate(poly):  # multiply by (u - root) / scale
            grown[p + 1] += c / scale
            grown[p] -= c * root / scale
        poly = grown
    end = sig[i + 1] - base
    return sum(c * end ** (p + 1) / (p + 1) for p, c in enumerate(poly))


@_sampler
def lms(run: _Run, x: Tensor, *, order: int = 4) -> Tensor:
    """Linear multistep (Adams-Bashforth in sigma) over the last `order` derivatives, with the coefficients
    of the actual (uneven) sigma spacing. Lower order while warming up; one evaluation per step."""
    derivatives: list[Tensor] = []
    for i in range(run.steps):
        denoised = run.denoise(x, run.sigmas[i])
        derivatives.append(_derivative(x, denoised, run.sigmas[i]))
        derivatives = derivatives[-order:]
        current = len(derivatives)
        for j in range(current):  # derivatives[-1 - j] was taken at sigma_{i-j}
            x = x + _lms_coefficient(run.sigmas, i, j, current) * derivatives[-1 - j]
        run.done(i, x, denoised)
    return x


@_sampler
def dpmpp_2m(run: _Run, x: Tensor) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022): a multistep exponential integrator in lambda = -log(sigma) that
    extrapolates the x0 estimate from the current and previous step. Second order, one evaluation per step;
    first order on the first step and on the final step to sigma = 0."""
    old_denoised = None
    h_last = 0.0
    for i in range(run.steps):
        sigma, sigma_next = run.sigmas[i], run.sigmas[i + 1]
        denoised = run.denoise(x, sigma)
        if sigma_next == 0:
            x = denoised
        else:
            h = math.log(sigma) - math.log(sigma_next)
            if old_denoised is None:
                target = denoised
            else:
                r = h_last / h
                target = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = _exp_step(x, target, sigma, sigma_next)
            h_last = h
        old_denoised = denoised
        run.done(i, x, denoised)
    return x


# --------------------------------------------------------------------------------------- stochastic samplers
@_sampler
def euler_a(run: _Run, x: Tensor, *, eta: float = 1.0, s_noise: float = 1.0) -> Tensor:
    """Euler ancestral: an Euler step down to sigma_down, then fresh noise of size sigma_up (see
    `ancestral_split`). One evaluation per step."""
    for i in range(run.steps):
        sigma, sigma_next = run.sigmas[i], run.sigmas[i + 1]
        denoised = run.denoise(x, sigma)
        sigma_down, sigma_up = ancestral_split(sigma, sigma_next, eta)
        x = x + _derivative(x, denoised, sigma) * (sigma_down - sigma)
        if sigma_next > 0 and sigma_up > 0:
            x = x + run.noise(x) * s_noise * sigma_up
        run.done(i, x, denoised)
    return x


@_sampler
def dpm_2_a(run: _Run, x: Tensor, *, eta: float = 1.0, s_noise: float = 1.0) -> Tensor:
    """Ancestral DPM-Solver-2: the `dpm_2` midpoint step down to sigma_down, then noise of size sigma_up."""
    for i in range(run.steps):
        sigma, sigma_next = run.sigmas[i], run.sigmas[i + 1]
        denoised = run.denoise(x, sigma)
        sigma_down, sigma_up = ancestral_split(sigma, sigma_next, eta)
        d = _derivative(x, denoised, sigma)
        if sigma_down == 0:
            x = x + d * (sigma_down - sigma)
        else:
            sigma_mid = math.exp(0.5 * (math.log(sigma) + math.log(sigma_down)))
            x_mid = x + d * (sigma_mid - sigma)
            denoised = run.denoise(x_mid, sigma_mid)
            x = x + _derivative(x_mid, denoised, sigma_mid) * (sigma_down - sigma)
        if sigma_next > 0 and sigma_up > 0:
            x = x + run.noise(x) * s_noise * sigma_up
        run.done(i, x, denoised)
    return x


@_sampler
def dpmpp_2s_a(run: _Run, x: Tensor, *, eta: float = 1.0, s_noise: float = 1.0) -> Tensor:
    """Ancestral DPM-Solver++(2S): a single-step second-order exponential integrator down to sigma_down
    (the x0 estimate is re-evaluated at the log-midpoint), then noise of size sigma_up. Two evaluations per
    step."""
    for i in range(run.steps):
        sigma, sigma_next = run.sigmas[i], run.sigmas[i + 1]
        denoised = run.denoise(x, sigma)
        sigma_down, sigma_up = ancestral_split(sigma, sigma_next, eta)
        if sigma_down == 0:
            x = denoised
        else:
            sigma_mid = math.sqrt(sigma * sigma_down)  # lambda halfway between the two levels
            x_mid = _exp_step(x, denoised, sigma, sigma_mid)
            denoised = run.denoise(x_mid, sigma_mid)
            x = _exp_step(x, denoised, sigma, sigma_down)
        if sigma_next > 0 and sigma_up > 0:
            x = x + run.noise(x) * s_noise * sigma_up
        run.done(i, x, denoised)
    return x


@_sampler
def dpmpp_sde(run: _Run, x: Tensor, *, eta: float = 1.0, s_noise: float = 1.0, r: float = 0.5) -> Tensor:
    """DPM-Solver++ SDE (k-diffusion's `sample_dpmpp_sde`): a stochastic single-step second-order solver. An
    ancestral exponential step to the intermediate level sigma_s = sigma^(1-r) sigma_next^r, a second x0
    estimate there, then the full ancestral step from sigma with the blended estimate. Two evaluations a step.

    Noise: k-diffusion draws it from a Brownian tree W(sigma): the sub-step gets the normalised increment over
    [sigma_s, sigma] and the full step the one over [sigma_next, sigma], which contains it, so the two are
    correlated. Here the same Brownian motion is sampled directly with two fresh gaussians per step
    (A = W(sigma) - W(sigma_s), B = W(sigma_s) - W(sigma_next)): the same joint distribution, other draws.
    """
    for i in range(run.steps):
        sigma, sigma_next = run.sigmas[i], run.sigmas[i + 1]
        denoised = run.denoise(x, sigma)
        if sigma_next == 0:
            x = x + _derivative(x, denoised, sigma) * (sigma_next - sigma)
        else:
            sigma_s = sigma ** (1 - r) * sigma_next**r  # lambda = -log(sigma) a fraction r of the way
            noise_s = noise_next = None
            if eta:
                z_a, z_b = run.noise(x), run.noise(x)
                span_a, span_b = sigma - sigma_s, sigma_s - sigma_next
                noise_s = z_a  # increment over [sigma_s, sigma], normalised
                noise_next = (math.sqrt(span_a) * z_a + math.sqrt(span_b) * z_b) / math.sqrt(span_a + span_b)
            down, up = ancestral_split(sigma, sigma_s, eta)
            x_s = _exp_step(x, denoised, sigma, down)
            if up > 0:
                x_s = x_s + noise_s * s_noise * up
            denoised_s = run.denoise(x_s, sigma_s)
            fac = 1 / (2 * r)
            target = (1 - fac) * denoised + fac * denoised_s
            down, up = ancestral_split(sigma, sigma_next, eta)
            x = _exp_step(x, target, sigma, down)
            if up > 0:
                x = x + noise_next * s_noise * up
            denoised = denoised_s
        run.done(i, x, denoised)
    return x


def _dpmpp_2m_sde_run(run: _Run, x: Tensor, eta: float, s_noise: float, solver_type: str) -> Tensor:
    if solver_type not in ("midpoint", "heun"):
        raise ValueError(f"solver_type must be 'midpoint' or 'heun', got {solver_type!r}")
    old_denoised = None
    h_last = 0.0
    for i in range(run.steps):
        sigma, sigma_next = run.sigmas[i], run.sigmas[i + 1]
        denoised = run.denoise(x, sigma)
        if sigma_next == 0:
            x = denoised
        else:
            h = math.log(sigma) - math.log(sigma_next)
            eta_h = eta * h
            keep = -math.expm1(-h - eta_h)  # 1 - e^(-(1 + eta) h): weight of the x0 estimate
            x = (sigma_next / sigma) * math.exp(-eta_h) * x + keep * denoised
            if old_denoised is not None:
                r = h_last / h
                if solver_type == "midpoint":
                    weight = 0.5 * keep
                else:  # "heun": the exact integral of a linear-in-lambda x0 estimate
                    weight = 1 - keep / (h + eta_h)
                x = x + weight * (1 / r) * (denoised - old_denoised)
            if eta:
                x = x + run.noise(x) * sigma_next * math.sqrt(-math.expm1(-2 * eta_h)) * s_noise
            h_last = h
        old_denoised = denoised
        run.done(i, x, denoised)
    return x


@_sampler
def dpmpp_2m_sde(run: _Run, x: Tensor, *, eta: float = 1.0, s_noise: float = 1.0,
                 solver_type: str = "midpoint") -> Tensor:
    """DPM-Solver++(2M) SDE: the multistep solver of `dpmpp_2m` for the reverse SDE. With step
    h = log(sigma / sigma_next), the sample keeps a factor (sigma_next/sigma) e^(-eta h) of its noise and
    gets fresh noise sigma_next sqrt(1 - e^(-2 eta h)); solver_type "midpoint" (also diffusers' default) or
    "heun" picks the second-order correction. One evaluation per step; eta = 0 gives `dpmpp_2m`."""
    return _dpmpp_2m_sde_run(run, x, eta, s_noise, solver_type)


@_sampler
def dpmpp_2m_sde_heun(run: _Run, x: Tensor, *, eta: float = 1.0, s_noise: float = 1.0) -> Tensor:
    """`dpmpp_2m_sde` with solver_type="heun" (A1111's "DPM++ 2M SDE Heun", ComfyUI's dpmpp_2m_sde_heun)."""
    return _dpmpp_2m_sde_run(run, x, eta, s_noise, "heun")


@_sampler
def dpmpp_3m_sde(run: _Run, x: Tensor, *, eta: float = 1.0, s_noise: float = 1.0) -> Tensor:
    """DPM-Solver++(3M) SDE: like `dpmpp_2m_sde` but extrapolating the x0 estimate from the last three steps
    (first and second divided differences in lambda), with phi-function weights. One evaluation per step."""
    history: list[Tensor] = []  # previous x0 estimates, most recent first
    steps_h: list[float] = []  # their step sizes, most recent first
    for i in range(run.steps):
        sigma, sigma_next = run.sigmas[i], run.sigmas[i + 1]
        denoised = run.denoise(x, sigma)
        if sigma_next == 0:
            x = denoised
        else:
            h = math.log(sigma) - math.log(sigma_next)
            h_eta = h * (eta + 1)
            x = math.exp(-h_eta) * x - math.expm1(-h_eta) * denoised
            phi_2 = math.expm1(-h_eta) / h_eta + 1
            if len(history) >= 2:
                r0, r1 = steps_h[0] / h, steps_h[1] / h
                d1_0 = (denoised - history[0]) / r0
                d1_1 = (history[0] - history[1]) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_3 = phi_2 / h_eta - 0.5
                x = x + phi_2 * d1 - phi_3 * d2
            elif len(history) == 1:
                r = steps_h[0] / h
                x = x + phi_2 * (denoised - history[0]) / r
            if eta:
                x = x + run.noise(x) * sigma_next * math.sqrt(-math.expm1(-2 * h * eta)) * s_noise
            steps_h = [h, *steps_h][:2]
        history = [denoised, *history][:2]
        run.done(i, x, denoised)
    return x


@_sampler
def ddim(run: _Run, x: Tensor, *, eta: float = 0.0, s_noise: float = 1.0) -> Tensor:
    """DDIM (Song et al. 2021) in sigma space. Default eta = 0: deterministic.

    With alphabar = 1 / (1 + sigma^2) and x_vp = x / sqrt(1 + sigma^2), DDIM's update
    x_vp' = sqrt(alphabar') x0 + sqrt(1 - alphabar' - s^2) eps + s z, with
    s^2 = eta^2 (1 - alphabar')/(1 - alphabar) (1 - alphabar/alphabar'), becomes, divided by sqrt(alphabar'),
    x' = x0 + sqrt(sigma'^2 - u^2) eps + u z with u^2 = eta^2 sigma'^2 (sigma^2 - sigma'^2) / sigma^2:
    exactly `ancestral_split`'s sigma_up. So DDIM is an ancestral step with that eta, and Euler for eta = 0.
    """
    for i in range(run.steps):
        sigma, sigma_next = run.sigmas[i], run.sigmas[i + 1]
        denoised = run.denoise(x, sigma)
        sigma_down, sigma_up = ancestral_split(sigma, sigma_next, eta)
        x = _exp_step(x, denoised, sigma, sigma_down)
        if sigma_next > 0 and sigma_up > 0:
            x = x + run.noise(x) * s_noise * sigma_up
        run.done(i, x, denoised)
    return x


@_sampler
def lcm(run: _Run, x: Tensor, *, s_noise: float = 1.0) -> Tensor:
    """Latent Consistency Model sampling: jump to the model's x0 estimate, then re-noise it to the next
    sigma with fresh noise (none after the last step). For LCM-distilled models (or LCM LoRAs) with a few
    steps; with an ordinary model it is a very noisy sampler."""
    for i in range(run.steps):
        sigma_next = run.sigmas[i + 1]
        denoised = run.denoise(x, run.sigmas[i])
        x = denoised
        if sigma_next > 0:
            x = x + run.noise(x) * s_noise * sigma_next
        run.done(i, x, denoised)
    return x


@_sampler
def tcd(run: _Run, x: Tensor, *, eta: float = 0.3, s_noise: float = 1.0,
        schedule: DiscreteSchedule | None = None) -> Tensor:
    """Trajectory Consistency Distillation sampling (Zheng et al. 2024, "strategic stochastic sampling"), as
    diffusers' TCDScheduler and the ComfyUI-TCD node's sample_tcd run it; meant for TCD-distilled models
    (TCD LoRAs) at 2-8 steps.

    `eta` is TCD's gamma, in [0, 1], default 0.3 (a request's `eta` field carries it). Each step takes the
    model's x0 and noise estimates, goes back along the noise estimate only to the lower level
    sigma_s = sigma(floor((1 - gamma) t_next)), t_next the timestep of the next sigma, and tops the noise
    up with fresh noise: x' = x0 + sigma_s eps + sqrt(sigma_next^2 - sigma_s^2) z. gamma = 0 is
    deterministic (sigma_s = sigma_next: DDIM); gamma = 1 re-noises x0 (plus sigma(t=0) eps) every step.
    Timesteps are read off `schedule`, the model's discrete noise table (default: the denoiser's own
    `.schedule`, else SDXL's), in float32 as both references compute them.

    Like both references, the final step to sigma = 0 ends on the first training level t = 0, not on
    sigma = 0: it returns x0 + sigma(0) eps scaled by 1 / sqrt(1 + sigma(0)^2), the variance-preserving
    sample at t = 0 they decode (sigma(0) = 0.029).
    """
    if not 0.0 <= eta <= 1.0:
        raise RequestError(f"eta: {eta:g} is outside 0..1 (the TCD sampler's gamma)")
    table = schedule if schedule is not None else getattr(run.denoiser, "schedule", None)
    if not isinstance(table, DiscreteSchedule):
        table = DiscreteSchedule()
    sigma_t0 = float(table.sigmas[0])
    for i in range(run.steps):
        sigma, sigma_next = run.sigmas[i], run.sigmas[i + 1]
        denoised = run.denoise(x, sigma)
        eps = (x - denoised) / sigma
        if sigma_next == 0:
            x = (denoised + sigma_t0 * eps) / math.sqrt(1.0 + sigma_t0**2)
        elif eta == 0:
            x = denoised + sigma_next * eps
        else:
            # (1 - gamma) * t in float32, then floor, as both references do (float64 differs near integers:
            # gamma 0.07, t 500 -> 465 in float32, 464 in float64).
            t_next = table.sigma_to_t(torch.tensor(sigma_next, dtype=torch.float64))
            sigma_s = float(table.sigmas[int(torch.floor((1.0 - eta) * t_next))])
            x = denoised + sigma_s * eps
            x = x + run.noise(x) * s_noise * math.sqrt(max(sigma_next**2 - sigma_s**2, 0.0))
        run.done(i, x, denoised)
    return x


# ---------------------------------------------------------------------------------------------------- UniPC
def _unipc_weights(rks: list[float], hh: float, variant: str) -> tuple[np.ndarray, np.ndarray, float, float]:
    """The UniPC linear system for a step of size hh = -h (data prediction): R[k][m] = rks[m]^k and
    b[k] = (k+1)! phi_{k+2}(hh) / B(h), where phi are the exponential-integrator phi-functions
    (h_phi_1 = e^hh - 1, next = previous / hh - 1/(k+1)!) and B(h) = hh ("bh1") or e^hh - 1 ("bh2").
    Returns (R, b, h_phi_1, B_h)."""
    h_phi_1 = math.expm1(hh)
    B_h = hh if variant == "bh1" else math.expm1(hh)
    order = len(rks)
    R = np.array([[rk**k for rk in rks] for k in range(order)], dtype=np.float64)
    b = np.zeros(order, dtype=np.float64)
    h_phi_k = h_phi_1 / hh - 1
    factorial = 1
    for k in range(order):
        b[k] = h_phi_k * factorial / B_h
        factorial *= k + 2
        h_phi_k = h_phi_k / hh - 1 / factorial
    return R, b, h_phi_1, B_h


def _weighted(weights, tensors: list[Tensor]) -> Tensor | float:
    return sum(float(w) * t for w, t in zip(weights, tensors)) if tensors else 0.0


def _unipc_predict(x: Tensor, sig: list[float], i: int, outputs: list[Tensor], order: int,
                   variant: str) -> Tensor:
    """UniP: from sig[i] to sig[i+1] using the x0 estimates at points i, i-1, ..., i-order+1
    (outputs[-1] is at point i)."""
    sigma, sigma_next = sig[i], sig[i + 1]
    if sigma_next == 0:
        return outputs[-1]  # the data-prediction step to sigma = 0 is the x0 estimate itself
    lam = [-math.log(s) for s in sig[max(i - order + 1, 0): i + 2]]  # lambda at points i-order+1 .. i+1
    lam_i, lam_next = lam[-2], lam[-1]
    h = lam_next - lam_i
    m0 = outputs[-1]
    rks, d1s = [], []
    for k in range(1, order):
        rk = (lam[-2 - k] - lam_i) / h
        rks.append(rk)
        d1s.append((outputs[-1 - k] - m0) / rk)
    R, b, h_phi_1, B_h = _unipc_weights([*rks, 1.0], -h, variant)
    if order == 1:
        rhos = []
    elif order == 2:
        rhos = [0.5]
    else:
        rhos = np.linalg.solve(R[:-1, :-1], b[:-1]).tolist()
    return (sigma_next / sigma) * x - h_phi_1 * m0 - B_h * _weighted(rhos, d1s)


def _unipc_correct(x_prev: Tensor, model_t: Tensor, sig: list[float], i: int, outputs: list[Tensor],
                   order: int, variant: str) -> Tensor:
    """UniC: recompute the sample at point i from the one at point i-1 (x_prev), now also using the x0
    estimate at point i itself (model_t). `outputs` still ends with the estimate at point i-1; `order` is the
    order of the predictor step i-1 -> i."""
    lam = [-math.log(s) for s in sig[max(i - order, 0): i + 1]]  # lambda at points i-order .. i
    lam_prev, lam_t = lam[-2], lam[-1]
    h = lam_t - lam_prev
    m0 = outputs[-1]
    rks, d1s = [], []
    for k in range(1, order):
        rk = (lam[-2 - k] - lam_prev) / h
        rks.append(rk)
        d1s.append((outputs[-1 - k] - m0) / rk)
    R, b, h_phi_1, B_h = _unipc_weights([*rks, 1.0], -h, variant)
    rhos = [0.5] if order == 1 else np.linalg.solve(R, b).tolist()
    correction = _weighted(rhos[:-1], d1s) + rhos[-1] * (model_t - m0)
    return (sig[i] / sig[i - 1]) * x_prev - h_phi_1 * m0 - B_h * correction


def _unipc_run(run: _Run, x: Tensor, order: int, variant: str, corrector: bool) -> Tensor:
    if variant not in ("bh1", "bh2"):
        raise ValueError(f"variant must be 'bh1' or 'bh2', got {variant!r}")
    if order < 1:
        raise ValueError(f"order must be >= 1, got {order}")
    outputs: list[Tensor] = []  # the last `order` x0 estimates, the current point's last
    x_prev = None  # the (corrected) sample at the previous point
    prev_order = 0
    for i in range(run.steps):
        denoised = run.denoise(x, run.sigmas[i])
        if corrector and x_prev is not None:
            x = _unipc_correct(x_prev, denoised, run.sigmas, i, outputs, prev_order, variant)
        outputs = [*outputs, denoised][-order:]
        this_order = min(order, i + 1, run.steps - i)
        x_prev = x
        x = _unipc_predict(x, run.sigmas, i, outputs, this_order, variant)
        prev_order = this_order
        run.done(i, x, denoised)
    return x


@_sampler
def unipc(run: _Run, x: Tensor, *, order: int = 2, variant: str = "bh2", corrector: bool = True) -> Tensor:
    """UniPC (Zhao et al. 2023), data prediction, multistep, as diffusers' UniPCMultistepScheduler runs it.

    Each step evaluates the model once at the current point. Before predicting onward, the UniC corrector
    re-derives the current sample from the previous one using that new evaluation too (no extra model call);
    then the UniP predictor of order min(order, steps done + 1, steps left) moves to the next sigma (so the
    order drops near the end, and the final step to sigma = 0 is the x0 estimate). `variant` "bh2" (diffusers'
    default) or "bh1" picks B(h); `order` 1..3 (2 is diffusers' default and its advice for guided sampling).
    """
    return _unipc_run(run, x, order, variant, corrector)


@_sampler
def unipc_bh1(run: _Run, x: Tensor, *, order: int = 2, corrector: bool = True) -> Tensor:
    """UniPC with B(h) = h ("bh1": ComfyUI's "uni_pc", A1111's default UniPC variant). See `unipc`."""
    return _unipc_run(run, x, order, "bh1", corrector)



# -------------------------------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class SamplerInfo:
    """What callers need to know about a sampler besides its function. Names and labels: `names.py`."""

    name: str
    fn: Callable[..., Tensor]
    stochastic: bool  # draws noise (uses the generator)
    evaluations_per_step: int  # model calls per step (the final step to sigma = 0 may use fewer)
    uses_schedule: bool = False  # takes the model's discrete noise table as the option `schedule`

    @property
    def label(self) -> str:
        """A1111's display name (written into PNG metadata)."""
        return A1111_SAMPLER_NAMES[self.name]


SAMPLER_INFO: dict[str, SamplerInfo] = {
    info.name: info
    for info in [
        SamplerInfo("euler", euler, False, 1),
        SamplerInfo("euler_a", euler_a, True, 1),
        SamplerInfo("heun", heun, False, 2),
        SamplerInfo("dpm_2", dpm_2, False, 2),
        SamplerInfo("dpm_2_a", dpm_2_a, True, 2),
        SamplerInfo("lms", lms, False, 1),
        SamplerInfo("dpmpp_2m", dpmpp_2m, False, 1),
        SamplerInfo("dpmpp_2m_sde", dpmpp_2m_sde, True, 1),
        SamplerInfo("dpmpp_2m_sde_heun", dpmpp_2m_sde_heun, True, 1),
        SamplerInfo("dpmpp_3m_sde", dpmpp_3m_sde, True, 1),
        SamplerInfo("dpmpp_sde", dpmpp_sde, True, 2),
        SamplerInfo("dpmpp_2s_a", dpmpp_2s_a, True, 2),
        SamplerInfo("ddim", ddim, False, 1),
        SamplerInfo("unipc", unipc, False, 1),
        SamplerInfo("unipc_bh1", unipc_bh1, False, 1),
        SamplerInfo("lcm", lcm, True, 1),
        SamplerInfo("tcd", tcd, True, 1, uses_schedule=True),
    ]
}

SAMPLERS: dict[str, Callable[..., Tensor]] = {name: info.fn for name, info in SAMPLER_INFO.items()}


# ------------------------------------------------------------------------------------------ cutting schedules
def img2img_sigmas(sigmas: Tensor, strength: float) -> Tensor:
    """img2img: keep the last int(n * strength) steps of an n-step schedule (diffusers' semantics).

    The sampler then starts at the returned sigmas[0]; the caller noises the encoded image to that level.
    strength 1 keeps the whole schedule; a strength below 1/n keeps no step (only the final sigma).
    """
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    n = len(sigmas) - 1
    kept = min(int(n * strength), n)
    return sigmas[n - kept:]


def split_sigmas(sigmas: Tensor, switch_fraction: float, schedule: DiscreteSchedule) -> tuple[Tensor, Tensor]:
    """Split a schedule for a base -> refiner "ensemble of experts" (diffusers' denoising_end/_start).

    The cut-off timestep is round(N - switch_fraction * N) (200 for 0.8): the base makes every step whose
    starting timestep is >= the cut-off, the refiner the rest. Returns (high, low) with high[-1] == low[0], so
    the refiner continues exactly where the base stopped, without new noise. Steps are whole steps, so for
    second-order samplers the split always falls after a full step (diffusers needs a +1 for that).
    Timesteps are read off the sigmas with `schedule`, the model's own noise table (log-interpolated): on a
    zero-terminal-SNR model the standard table would put the cut one step late.
    """
    if not 0.0 <= switch_fraction <= 1.0:
        raise ValueError(f"switch_fraction must be in [0, 1], got {switch_fraction}")
    N = schedule.num_timesteps
    cutoff = round(N - switch_fraction * N)
    t = schedule.sigma_to_t(torch.as_tensor(sigmas[:-1]).detach().cpu())
    k = int((t >= cutoff).sum())
    return sigmas[: k + 1], sigmas[k:]


def discard_penultimate_sigma(sigmas: Tensor) -> Tensor:
    """Drop the next-to-last sigma. A1111 (DPM2, DPM2 a, DPM++ 3M SDE) and ComfyUI (dpm_2, dpm_2_ancestral,
    uni_pc) build those samplers' schedules for steps + 1 and then drop it, to avoid a tiny final step."""
    return torch.cat([sigmas[:-2], sigmas[-1:]])
