"""Noise schedules: functions that pick the sigmas a sampler walks through.

Every schedule is `fn(n, schedule: DiscreteSchedule, **options) -> Tensor` and returns n + 1 float32 sigmas,
descending, the last one 0 (so a first-order sampler makes n model evaluations). Two ComfyUI schedules can
return fewer or more, exactly as ComfyUI does: `beta` drops repeated timesteps (only for large n) and
`ddim_uniform` returns one extra step when 1000 is not a multiple of n.

What each one reproduces:
  normal       sgm (the SDXL reference code): timesteps linspace(999, 0, n, endpoint=False) truncated to
               integers, e.g. n=50 -> t = 999, 979, ..., 39, 19. (ComfyUI's and A1111's "Normal" are close
               but not equal: they use fractional t = linspace(999, 0, n), see `uniform`.)
  uniform      k-diffusion `get_sigmas` = A1111's "Uniform" and the fallback of its "Automatic", and
               ComfyUI's / A1111's "normal": t = linspace(999, 0, n), log-interpolated sigmas.
  leading      diffusers `timestep_spacing="leading"` with steps_offset=1 (SDXL's diffusers default):
               t = (arange(n) * (1000 // n)) + 1 reversed, e.g. n=50 -> 981, 961, ..., 1.
  trailing     diffusers "trailing": t = round(1000 - k * 1000 / n) - 1, e.g. n=4 -> 999, 749, 499, 249.
  linspace     diffusers "linspace": t = linspace(0, 999, n) reversed, sigmas interpolated linearly in sigma.
  karras       Karras et al. (2022) rho=7 ramp between the model's sigma_min and sigma_max (k-diffusion).
  exponential  sigmas evenly spaced in log sigma between sigma_max and sigma_min (k-diffusion).
  sgm_uniform  ComfyUI: t = linspace(999, 0, n + 1)[:-1], log-interpolated sigmas.
  simple       ComfyUI: every (1000 / n)-th training sigma from the top.
  ddim_uniform ComfyUI: every (1000 // n)-th training sigma from t = 1 upwards.
  beta         ComfyUI (Lee et al. 2024, "Beta Sampling is All You Need"): timesteps at the quantiles of a
               Beta(0.6, 0.6) distribution, which crowds steps at both ends of the schedule.
  align_your_steps
               NVIDIA's "Align Your Steps" (Sabour et al. 2024) 10-step sigmas for SDXL, log-linearly
               interpolated to n steps exactly as ComfyUI's AlignYourStepsScheduler (model_type SDXL) does.
  kl_optimal   ComfyUI's kl_optimal (A1111 "KL Optimal"): evenly spaced in arctan(sigma).
  polyexponential
               k-diffusion's get_sigmas_polyexponential (A1111 "Polyexponential", rho = 1 by default, which
               is `exponential`): log sigma follows a power rho of a linear ramp.

The diffusers spacings follow diffusers' EulerDiscreteScheduler (Euler, Heun, LMS, DPM2 use the same code);
DPM-Solver and UniPC compute "leading" differently (1000 // (n + 1)) and are not reproduced by `leading`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from .denoiser import DiscreteSchedule

Tensor = torch.Tensor


def _append_zero(sigmas) -> Tensor:
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
    return torch.cat([sigmas, sigmas.new_zeros(1)]).to(torch.float32)


def _check_n(n: int) -> None:
    if int(n) != n or n < 1:
        raise ValueError(f"the number of steps must be a positive integer, got {n!r}")


def _table(schedule: DiscreteSchedule) -> np.ndarray:
    """The float32 training sigmas as numpy, index = timestep (ascending)."""
    return schedule.sigmas.numpy()


# ---------------------------------------------------------------------------------- timestep-based schedules
def normal(n: int, schedule: DiscreteSchedule) -> Tensor:
    """sgm's LegacyDDPMDiscretization: integer timesteps that always start at t = N - 1 (999)."""
    _check_n(n)
    N = schedule.num_timesteps
    if n > N:
        raise ValueError(f"normal: at most {N} steps, got {n}")
    # numpy's linspace arithmetic exactly as sgm uses it, so the truncation to int never lands differently.
    t = np.linspace(N - 1, 0, n, endpoint=False).astype(int)
    return _append_zero(_table(schedule)[t].astype(np.float64))


def uniform(n: int, schedule: DiscreteSchedule) -> Tensor:
    """k-diffusion's get_sigmas: fractional timesteps linspace(N-1, 0, n), sigma interpolated in log space."""
    _check_n(n)
    t = torch.linspace(schedule.num_timesteps - 1, 0, n, dtype=torch.float64)
    return _append_zero(schedule.t_to_sigma(t, interpolation="log"))


def _diffusers_sigmas(t: np.ndarray, schedule: DiscreteSchedule) -> Tensor:
    """diffusers: np.interp of the float32 table at the (float32) timesteps, then append 0."""
    table = _table(schedule)
    return _append_zero(np.interp(t, np.arange(len(table)), table))


def leading(n: int, schedule: DiscreteSchedule, steps_offset: int = 1) -> Tensor:
    """diffusers "leading" spacing: t = k * (N // n) + steps_offset, k = n-1 .. 0."""
    _check_n(n)
    ratio = schedule.num_timesteps // n
    if ratio < 1:
        raise ValueError(f"leading: at most {schedule.num_timesteps} steps, got {n}")
    t = (np.arange(0, n) * ratio).round()[::-1].astype(np.float32) + steps_offset
    return _diffusers_sigmas(t, schedule)


def trailing(n: int, schedule: DiscreteSchedule) -> Tensor:
    """diffusers "trailing" spacing: t = round(N - k * N / n) - 1, k = 0 .. n-1; always starts at t = N - 1.

    diffusers builds these with a float `np.arange(N, 0, -N / n)`, which for a few n (61, 103, 121, ...)
    yields one extra value (t = -1, clamped to sigma_min) because of rounding; here there are always n steps.
    """
    _check_n(n)
    N = schedule.num_timesteps
    ratio = N / n
    t = (N - np.arange(n) * ratio).round().astype(np.float32) - 1
    return _diffusers_sigmas(t, schedule)


def linspace(n: int, schedule: DiscreteSchedule) -> Tensor:
    """diffusers "linspace" spacing: t = linspace(0, N-1, n) reversed (fractional), sigma interpolated
    linearly in sigma."""
    _check_n(n)
    t = np.linspace(0, schedule.num_timesteps - 1, n, dtype=np.float32)[::-1].copy()
    return _diffusers_sigmas(t, schedule)


def sgm_uniform(n: int, schedule: DiscreteSchedule) -> Tensor:
    """ComfyUI's sgm_uniform: t = linspace(N-1, 0, n + 1) without its last point, log-interpolated."""
    _check_n(n)
    t = torch.linspace(schedule.num_timesteps - 1, 0, n + 1, dtype=torch.float64)[:-1]
    return _append_zero(schedule.t_to_sigma(t, interpolation="log"))


def simple(n: int, schedule: DiscreteSchedule) -> Tensor:
    """ComfyUI's simple: the training sigmas at t = N - 1 - int(k * N / n), k = 0 .. n-1."""
    _check_n(n)
    table = _table(schedule)
    N = len(table)
    step = N / n
    t = [N - 1 - int(k * step) for k in range(n)]
    return _append_zero(table[t].astype(np.float64))


def ddim_uniform(n: int, schedule: DiscreteSchedule) -> Tensor:
    """ComfyUI's ddim_uniform: the training sigmas at t = 1, 1 + N//n, 1 + 2 N//n, ... (< N), descending.

    Like ComfyUI this gives ceil((N - 1) / (N // n)) steps, one more than n when N is not a multiple of n.
    """
    _check_n(n)
    table = _table(schedule)
    stride = max(len(table) // n, 1)
    t = list(range(1, len(table), stride))[::-1]
    return _append_zero(table[t].astype(np.float64))


def karras(
    n: int,
    schedule: DiscreteSchedule,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    rho: float = 7.0,
) -> Tensor:
    """Karras et al. (2022): sigma_i = (max^(1/rho) + i/(n-1) (min^(1/rho) - max^(1/rho)))^rho, then 0.

    sigma_min/max default to the model's (0.0292, 14.6146), as k-diffusion, A1111 and ComfyUI use them.
    (diffusers' Euler with use_karras_sigmas ramps between the sigmas of its spaced timesteps instead; pass
    those to reproduce it.)
    """
    _check_n(n)
    lo = schedule.sigma_min if sigma_min is None else sigma_min
    hi = schedule.sigma_max if sigma_max is None else sigma_max
    ramp = np.linspace(0, 1, n)
    lo_inv, hi_inv = lo ** (1 / rho), hi ** (1 / rho)
    return _append_zero((hi_inv + ramp * (lo_inv - hi_inv)) ** rho)


def exponential(
    n: int, schedule: DiscreteSchedule, sigma_min: float | None = None, sigma_max: float | None = None
) -> Tensor:
    """Evenly spaced in log sigma from sigma_max down to sigma_min, then 0 (k-diffusion)."""
    _check_n(n)
    lo = schedule.sigma_min if sigma_min is None else sigma_min
    hi = schedule.sigma_max if sigma_max is None else sigma_max
    return _append_zero(np.exp(np.linspace(math.log(hi), math.log(lo), n)))


# ------------------------------------------------------------ Align Your Steps, KL-optimal, polyexponential
# Align Your Steps (Sabour, Fidler, Kreis 2024): the optimised 10-step schedule NVIDIA published for SDXL
# (research.nvidia.com/labs/toronto-ai/AlignYourSteps/howto.html), 11 sigmas from sigma_max to sigma_min.
AYS_SDXL_SIGMAS: tuple[float, ...] = (
    14.6146412293, 6.3184485287, 3.7681790315, 2.1811480769, 1.3405244945, 0.8620721141,
    0.5550693289, 0.3798540708, 0.2332364134, 0.1114188177, 0.0291671582,
)  # fmt: skip


def _loglinear_interp(values: np.ndarray, count: int) -> np.ndarray:
    """`count` points of a descending list, interpolated linearly in log value over an even grid on [0, 1]
    (both lists spread evenly over [0, 1]), computed on the ascending reversal as np.interp needs."""
    xs = np.linspace(0.0, 1.0, len(values))
    ys = np.log(values[::-1])
    return np.exp(np.interp(np.linspace(0.0, 1.0, count), xs, ys))[::-1].copy()


def align_your_steps(n: int, schedule: DiscreteSchedule) -> Tensor:
    """Align Your Steps for SDXL, as ComfyUI's AlignYourStepsScheduler computes it: the 11 published sigmas
    (n = 10 uses them as they are), otherwise log-linearly interpolated to n + 1 points; the last point
    (sigma_min) is then replaced by 0. The sigmas are absolute (the model's own table is not used).

    A1111's "Align Your Steps" differs: it rounds the constants to 3 decimals and interpolates to n points
    ending at sigma_min before appending 0 (so its last step goes from 0.029 to 0, ComfyUI's does not visit
    0.029).
    """
    _check_n(n)
    sigmas = np.asarray(AYS_SDXL_SIGMAS, dtype=np.float64)
    if n + 1 != len(sigmas):
        sigmas = _loglinear_interp(sigmas, n + 1)
    return _append_zero(sigmas[:-1])


def kl_optimal(
    n: int, schedule: DiscreteSchedule, sigma_min: float | None = None, sigma_max: float | None = None
) -> Tensor:
    """The KL-optimal schedule (ComfyUI's kl_optimal, A1111's "KL Optimal"): with t_i = i / (n - 1),
    sigma_i = tan(t_i atan(sigma_min) + (1 - t_i) atan(sigma_max)), i = 0 .. n-1, then 0.

    sigma_min/max default to the model's. One step gives sigma_max (ComfyUI divides by n - 1 = 0 there).
    A1111's version returns n + 1 sigmas ending at sigma_min instead of 0.
    """
    _check_n(n)
    lo = schedule.sigma_min if sigma_min is None else sigma_min
    hi = schedule.sigma_max if sigma_max is None else sigma_max
    t = np.linspace(0.0, 1.0, n) if n > 1 else np.zeros(1)
    return _append_zero(np.tan(t * math.atan(lo) + (1.0 - t) * math.atan(hi)))


def polyexponential(
    n: int,
    schedule: DiscreteSchedule,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    rho: float = 1.0,
) -> Tensor:
    """k-diffusion's polyexponential schedule (A1111's "Polyexponential", whose default rho is 1):
    log sigma_i = log sigma_min + r_i^rho (log sigma_max - log sigma_min), r = linspace(1, 0, n), then 0.
    rho = 1 is `exponential`; rho > 1 spends more steps at low noise."""
    _check_n(n)
    lo = schedule.sigma_min if sigma_min is None else sigma_min
    hi = schedule.sigma_max if sigma_max is None else sigma_max
    ramp = np.linspace(1.0, 0.0, n) ** rho
    return _append_zero(np.exp(ramp * (math.log(hi) - math.log(lo)) + math.log(lo)))


# --------------------------------------------------------------------------------------------- beta schedule
def _betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b), by its continued fraction (modified Lentz).

    The fraction converges fast for x < (a + 1) / (a + b + 2); above that the symmetry
    I_x(a, b) = 1 - I_{1-x}(b, a) is used.
    """
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    if x > (a + 1.0) / (a + b + 2.0):
        return 1.0 - _betainc(b, a, 1.0 - x)
    log_front = a * math.log(x) + b * math.log1p(-x) - (math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b))
    tiny = 1e-300
    # Continued fraction 1 / (1 + d1 / (1 + d2 / (1 + ...))) with
    # d_{2m+1} = -(a+m)(a+b+m) x / ((a+2m)(a+2m+1)),  d_{2m} = m (b-m) x / ((a+2m-1)(a+2m)).
    f, c, d = 1.0, 1.0, 0.0
    for i in range(0, 400):
        m = i // 2
        if i == 0:
            num = 1.0
        elif i % 2 == 0:
            num = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        else:
            num = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        d = 1.0 + num * d
        d = tiny if abs(d) < tiny else d
        c = 1.0 + num / c
        c = tiny if abs(c) < tiny else c
        d = 1.0 / d
        f *= c * d
        if abs(1.0 - c * d) < 1e-15:
            break
    # f now holds 1 + 1/(1 + d1/(...)) - 1 ... the first term (num = 1) turns it into the fraction itself.
    return math.exp(log_front) * (f - 1.0) / a


def beta_ppf(q: float, a: float, b: float) -> float:
    """The quantile function (inverse CDF) of Beta(a, b), by bisection on `_betainc` (to ~1e-15)."""
    if q <= 0.0:
        return 0.0
    if q >= 1.0:
        return 1.0
    lo, hi = 0.0, 1.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if _betainc(a, b, mid) < q:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-15:
            break
    return 0.5 * (lo + hi)


def beta(n: int, schedule: DiscreteSchedule, alpha: float = 0.6, beta: float = 0.6) -> Tensor:
    """ComfyUI's beta scheduler: t_k = rint(ppf(1 - k/n) * (N - 1)), k = 0 .. n-1, repeats dropped."""
    _check_n(n)
    table = _table(schedule)
    top = len(table) - 1
    picked: list[int] = []
    for k in range(n):
        t = int(np.rint(beta_ppf(1.0 - k / n, alpha, beta) * top))
        if not picked or picked[-1] != t:
            picked.append(t)
    return _append_zero(table[picked].astype(np.float64))


# -------------------------------------------------------------------------------------------------- registry
SCHEDULES: dict[str, Callable[..., Tensor]] = {
    "normal": normal,
    "uniform": uniform,
    "leading": leading,
    "trailing": trailing,
    "linspace": linspace,
    "karras": karras,
    "exponential": exponential,
    "sgm_uniform": sgm_uniform,
    "simple": simple,
    "ddim_uniform": ddim_uniform,
    "beta": beta,
    "align_your_steps": align_your_steps,
    "kl_optimal": kl_optimal,
    "polyexponential": polyexponential,
}


def get_sigmas(name: str, n: int, schedule: DiscreteSchedule | None = None, **options) -> Tensor:
    """The sigmas of schedule `name` (a canonical name, see SCHEDULES) for n steps."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; valid: {', '.join(SCHEDULES)}")
    return SCHEDULES[name](n, schedule if schedule is not None else DiscreteSchedule(), **options)
