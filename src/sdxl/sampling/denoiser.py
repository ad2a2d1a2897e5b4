"""SDXL's discrete noise schedule, and the wrapper that turns the UNet into a denoiser in sigma space.

Sampling works in the k-diffusion / EDM formulation: a noisy latent is `x = x0 + sigma * eps` and a
denoiser maps `(x, sigma) -> x0_hat`. SDXL itself was trained as a discrete-time DDPM (1000 steps, variance
preserving): its UNet sees `x_vp = sqrt(alphabar_t) * x0 + sqrt(1 - alphabar_t) * eps` and an integer
timestep `t`, and predicts `eps` (or `v`). The two views are the same thing up to a scale: with
`sigma_t = sqrt((1 - alphabar_t) / alphabar_t)`, `x_vp = x / sqrt(sigma_t^2 + 1)`. So the UNet is called on
`c_in * x` with `c_in = 1 / sqrt(sigma^2 + 1)` and the timestep whose training sigma is `sigma`.

`DiscreteSchedule` holds the 1000 training sigmas and converts between sigma and timestep.
`ModelDenoiser` wraps a UNet-like `model_fn(x_in, t, **cond)` into a denoiser.

Which timestep the UNet sees for a sigma between two training levels is a convention, and the tools differ:
  - sgm (the reference code) and A1111 with "quantization" on: the nearest training level (an integer).
  - k-diffusion, ComfyUI and diffusers' Euler/Heun/LMS/DPM2 (for Karras and other sigma-defined schedules):
    the continuous `t` found by interpolating linearly in log sigma between the two neighbouring levels.
  - diffusers' DPM-Solver++ / UniPC with Karras sigmas: that continuous `t`, rounded (= the nearest level in
    log sigma), which is `quantize=True` here.
  - diffusers' "linspace" timestep spacing: fractional timesteps whose sigmas were interpolated linearly in
    *sigma* (numpy `interp`); `interpolation="linear"` inverts exactly that.
For sigmas that are training levels (every "leading"/"trailing" schedule, sgm's `normal`, ComfyUI's `simple`)
all conventions give the same integer timestep, exactly: a float32 sigma taken from the table maps back to its
own index with no rounding error (see `sigma_to_t`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

Tensor = torch.Tensor


def rescale_zero_terminal_snr(alphas_cumprod: Tensor) -> Tensor:
    """alphabar rescaled so sqrt(alphabar) keeps its first value and ends at exactly 0 (Lin et al. 2024)."""
    s = alphas_cumprod.sqrt()
    first, last = s[0].clone(), s[-1].clone()
    return ((s - last) * first / (first - last)) ** 2


class DiscreteSchedule:
    """The DDPM training schedule of SDXL: 1000 "scaled linear" betas from 0.00085 to 0.012.

    betas = linspace(sqrt(beta_start), sqrt(beta_end), N)^2, alphabar_t = prod_{s<=t}(1 - beta_s),
    sigma_t = sqrt((1 - alphabar_t) / alphabar_t); sigma_0 = 0.0292, sigma_999 = 14.6146.

    `dtype` is the precision of the cumulative product. float64 is what sgm, k-diffusion (via ldm), A1111 and
    ComfyUI compute; diffusers computes in float32, which moves the small sigmas by up to 1.3e-5 (relative).
    Pass `dtype=torch.float32` to reproduce diffusers' numbers exactly. Either way the table `sigmas` is
    stored as float32, the precision schedules hand out.

    `zero_terminal_snr=True` rescales the schedule so that the last timestep is pure noise (Lin et al. 2024,
    "Common Diffusion Noise Schedules and Sample Steps are Flawed", Algorithm 1): sqrt(alphabar) is shifted
    and scaled so that its first value is kept and its last becomes 0. The standard schedule leaves
    sqrt(alphabar_999) = 0.068 of the image in the last training step, so a model learns to read the image's
    layout out of the "noise"; at sampling time pure noise has no layout, and the model then invents one
    from the noise's own low frequencies (e.g. several objects where the prompt asks for one). Training
    uses alphabar_999 = 0 exactly (x_t is pure noise, v = -x0: needs v-prediction); for sampling the last
    sigma must be finite, so the sigma table uses alphabar_999 = 2^-24 (sigma_max = 4096), as diffusers'
    `rescale_betas_zero_snr` and ComfyUI's `zsnr` do.
    """

    def __init__(
        self,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        num_timesteps: int = 1000,
        dtype: torch.dtype = torch.float64,
        zero_terminal_snr: bool = False,
    ):
        self.beta_start = beta_start
        self.beta_end = beta_end
        self.num_timesteps = num_timesteps
        self.dtype = dtype
        self.zero_terminal_snr = zero_terminal_snr
        self.betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=dtype) ** 2
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)
        abar = self.alphas_cumprod
        if zero_terminal_snr:
            self.alphas_cumprod = rescale_zero_terminal_snr(self.alphas_cumprod)
            self.betas = 1.0 - self.alphas_cumprod / torch.cat([self.alphas_cumprod.new_ones(1),
                                                                self.alphas_cumprod[:-1]])
            abar = self.alphas_cumprod.clone()
            abar[-1] = 2.0**-24  # a finite sigma_max (4096) for the samplers
        # sigmas[t] for t = 0..N-1, ascending.
        self.sigmas = (((1.0 - abar) / abar) ** 0.5).to(torch.float32)
        # Logs of the float32 table, in float64: a float32 sigma equal to a table entry then has exactly the
        # same log as that entry, so it maps back to its integer timestep with no rounding error.
        self.log_sigmas = self.sigmas.to(torch.float64).log()

    def __repr__(self) -> str:
        return (
            f"DiscreteSchedule(beta_start={self.beta_start}, beta_end={self.beta_end}, "
            f"num_timesteps={self.num_timesteps}, dtype={self.dtype}, "
            f"zero_terminal_snr={self.zero_terminal_snr})"
        )

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def sigma_to_t(self, sigma, quantize: bool = False, interpolation: str = "log") -> Tensor:
        """The (continuous) timestep of each sigma, as a float32 tensor shaped like `sigma`.

        interpolation "log": interpolate linearly in log sigma between the two neighbouring training levels
        (k-diffusion, ComfyUI, diffusers' `_sigma_to_t`); "linear": interpolate in sigma (the inverse of the
        numpy `interp` diffusers uses for "linspace" spacing). Sigmas outside the table clamp to t = 0 / N-1.
        quantize=True returns the nearest integer timestep: `round` of the log-interpolated t, i.e. the
        training level nearest in log sigma (k-diffusion's quantize, diffusers' DPM-Solver/UniPC Karras
        rounding). sgm picks the level nearest in sigma itself; the two differ only for sigmas in a sliver
        between the log- and the linear midpoint of two neighbouring levels, never for training levels.
        """
        sigma = torch.as_tensor(sigma)
        # On the CPU in float64 (a few numbers a step; MPS lacks float64); returned on sigma's device.
        s = sigma.detach().to("cpu", torch.float64)
        if interpolation == "log":
            table = self.log_sigmas
            value = s.clamp(min=1e-10).log()
        elif interpolation == "linear":
            table = self.sigmas.to(torch.float64)
            value = s
        else:
            raise ValueError(f"interpolation must be 'log' or 'linear', got {interpolation!r}")
        # low: the last table entry <= value (the table is ascending), kept in [0, N-2] so `low + 1` exists.
        low = torch.searchsorted(table, value.reshape(-1), right=True).reshape(value.shape) - 1
        low = low.clamp(0, self.num_timesteps - 2)
        lo, hi = table[low], table[low + 1]
        w = ((value - lo) / (hi - lo)).clamp(0.0, 1.0)
        t = low.to(torch.float64) + w
        if quantize:
            t = t.round()
        return t.to(device=sigma.device, dtype=torch.float32)

    def t_to_sigma(self, t, interpolation: str = "log") -> Tensor:
        """The sigma of each (possibly fractional) timestep, float32; integer t give table entries exactly.

        "log" interpolates log sigma (k-diffusion, ComfyUI's `sigma(t)`); "linear" interpolates sigma
        (diffusers' numpy `interp` over the timestep spacing).
        """
        t = torch.as_tensor(t)
        device = t.device
        t = t.detach().to("cpu", torch.float64).clamp(0, self.num_timesteps - 1)
        low = t.floor().long().clamp(max=self.num_timesteps - 2)
        w = t - low.to(torch.float64)
        if interpolation == "log":
            table = self.log_sigmas
            return ((1 - w) * table[low] + w * table[low + 1]).exp().to(device=device, dtype=torch.float32)
        if interpolation == "linear":
            table = self.sigmas.to(torch.float64)
            return ((1 - w) * table[low] + w * table[low + 1]).to(device=device, dtype=torch.float32)
        raise ValueError(f"interpolation must be 'log' or 'linear', got {interpolation!r}")


class EDMSchedule(DiscreteSchedule):
    """A continuous EDM noise range (Karras et al. 2022): Playground v2.5 (sigma 0.002..80, sigma_data 0.5)
    and CosXL-style `edm_vpred` models (0.002..120, sigma_data 1), as ComfyUI's ModelSamplingContinuousEDM.

    The model sees `c_in * x` with c_in = 1 / sqrt(sigma^2 + sigma_data^2) and the noise conditioning
    c_noise = 0.25 * log(sigma) in place of a timestep (`noise_conditioning`). For the schedules that work on
    a table (normal, simple, ...), `sigmas` holds 1000 levels evenly spaced in log sigma from sigma_min to
    sigma_max, as ComfyUI builds them, and timesteps index that table; Karras and exponential span
    [sigma_min, sigma_max] directly.
    """

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0, sigma_data: float = 0.5,
                 num_timesteps: int = 1000):
        if not 0 < sigma_min < sigma_max or sigma_data <= 0:
            raise ValueError(f"EDM needs 0 < sigma_min < sigma_max and sigma_data > 0, got "
                             f"{sigma_min}, {sigma_max}, {sigma_data}")
        self.sigma_data = float(sigma_data)
        self.num_timesteps = num_timesteps
        self.dtype = torch.float64
        self.zero_terminal_snr = False
        logs = torch.linspace(math.log(sigma_min), math.log(sigma_max), num_timesteps, dtype=torch.float64)
        self.sigmas = logs.exp().to(torch.float32)
        self.log_sigmas = self.sigmas.to(torch.float64).log()
        self.alphas_cumprod = 1.0 / (1.0 + self.sigmas.to(torch.float64) ** 2)
        self.betas = 1.0 - self.alphas_cumprod / torch.cat([self.alphas_cumprod.new_ones(1),
                                                            self.alphas_cumprod[:-1]])
        self._range = (float(sigma_min), float(sigma_max))

    def __repr__(self) -> str:
        lo, hi = self._range
        return f"EDMSchedule(sigma_min={lo}, sigma_max={hi}, sigma_data={self.sigma_data})"

    @property
    def sigma_min(self) -> float:
        return self._range[0]

    @property
    def sigma_max(self) -> float:
        return self._range[1]

    @staticmethod
    def noise_conditioning(sigma: Tensor) -> Tensor:
        """c_noise = 0.25 * log(sigma), what EDM models take in place of a timestep (float32)."""
        return (0.25 * torch.as_tensor(sigma, dtype=torch.float64).clamp(min=1e-10).log()).to(torch.float32)


def schedule_for_config(config) -> DiscreteSchedule:
    """The noise schedule a ModelConfig's model was trained on: its EDM range, or the discrete SDXL table."""
    edm = getattr(config, "edm", None)
    if edm is not None:
        return EDMSchedule(*edm)
    return DiscreteSchedule(zero_terminal_snr=bool(getattr(config, "zero_terminal_snr", False)))


def _per_sample(sigma, x: Tensor) -> Tensor:
    """sigma (float, 0-d or [B] tensor) -> a float32 [B] tensor on x's device."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1)
    if sigma.numel() == 1:
        sigma = sigma.expand(x.shape[0])
    return sigma


class ModelDenoiser:
    """Wrap an eps-, v- or x0-predicting UNet `model_fn(x_in, t, **cond)` into a denoiser
    `denoiser(x, sigma, **cond) -> x0`.

    The UNet is called on `x_in = x / sqrt(sigma^2 + 1)` (the variance-preserving latent it was trained on)
    with `t = schedule.sigma_to_t(sigma, quantize, interpolation)` as a float32 [B] tensor, and its output is
    turned into x0:
      - eps: x0 = x - sigma * eps
      - v:   x0 = c_skip * x + c_out * v, with c_skip = 1 / (sigma^2 + 1), c_out = -sigma / sqrt(sigma^2 + 1)
             (v = alpha * eps - sigma_vp * x0 in the VP variables; rearranged in sigma space).
      - x0:  x0 = the output (diffusers' prediction_type "sample"; SDXL-Lightning's 1-step UNet).

    On an `EDMSchedule` the UNet sees `x / sqrt(sigma^2 + sigma_data^2)` and c_noise = 0.25 log(sigma), and
    x0 = c_skip * x + c_out * out with c_skip = sigma_data^2 / (sigma^2 + sigma_data^2) and
    c_out = +-sigma * sigma_data / sqrt(sigma^2 + sigma_data^2): "+" for eps (EDM's own preconditioning, which
    diffusers' EDM schedulers call "epsilon" and ComfyUI's model type EDM: Playground v2.5), "-" for v
    (CosXL); x0 again takes the output as it is.

    Timesteps: for sigmas that are training levels the UNet sees the integer timestep, exactly as diffusers
    passes it for "leading"/"trailing" spacing; with the defaults (log interpolation, no quantization) it sees
    the continuous timestep diffusers' Euler-family schedulers pass for Karras/exponential sigmas;
    `quantize=True` gives the rounded timestep of diffusers' DPM-Solver++/UniPC with Karras sigmas (and sgm's
    nearest-level convention), `interpolation="linear"` the fractional timesteps of diffusers' "linspace"
    spacing.
    See the module docstring.
    """

    def __init__(
        self,
        model_fn: Callable[..., Tensor],
        schedule: DiscreteSchedule | None = None,
        prediction: str = "eps",
        quantize: bool = False,
        interpolation: str = "log",
    ):
        if prediction not in ("eps", "v", "x0"):
            raise ValueError(f"prediction must be 'eps', 'v' or 'x0', got {prediction!r}")
        self.model_fn = model_fn
        self.schedule = schedule if schedule is not None else DiscreteSchedule()
        self.prediction = prediction
        self.quantize = quantize
        self.interpolation = interpolation

    def timestep(self, sigma) -> Tensor:
        """The timestep the UNet sees for `sigma` (float32, shaped like `sigma`): c_noise on EDM models."""
        if isinstance(self.schedule, EDMSchedule):
            return self.schedule.noise_conditioning(sigma).to(torch.as_tensor(sigma).device)
        return self.schedule.sigma_to_t(sigma, quantize=self.quantize, interpolation=self.interpolation)

    def __call__(self, x: Tensor, sigma, **cond) -> Tensor:
        sigma = _per_sample(sigma, x)
        s = sigma.reshape(-1, *([1] * (x.ndim - 1)))
        if isinstance(self.schedule, EDMSchedule):
            sd = self.schedule.sigma_data
            norm = (s**2 + sd**2) ** 0.5
            out = self.model_fn(x / norm, self.timestep(sigma), **cond)
            if self.prediction == "x0":
                return out
            c_out = s * sd / norm
            return x * (sd**2 / norm**2) + (c_out if self.prediction == "eps" else -c_out) * out
        c_in = 1.0 / (s**2 + 1.0) ** 0.5
        out = self.model_fn(x * c_in, self.timestep(sigma), **cond)
        if self.prediction == "x0":
            return out
        if self.prediction == "eps":
            return x - s * out
        c_skip = 1.0 / (s**2 + 1.0)
        c_out = -s / (s**2 + 1.0) ** 0.5
        return c_skip * x + c_out * out


# diffusers' multistep solvers (DPM-Solver++, UniPC, DDIM, LCM, TCD) round sigma to the nearest training
# timestep before calling the UNet (as sgm does); its Euler-family schedulers pass the interpolated timestep.
QUANTIZED_SAMPLERS = frozenset(
    {"dpmpp_2m", "dpmpp_2m_sde", "dpmpp_2m_sde_heun", "dpmpp_3m_sde", "unipc", "unipc_bh1", "ddim", "lcm",
     "tcd"}
)


def quantizes_timesteps(sampler: str) -> bool:
    """Whether `sampler` (canonical name) calls the UNet at rounded timesteps (see QUANTIZED_SAMPLERS)."""
    return sampler in QUANTIZED_SAMPLERS
