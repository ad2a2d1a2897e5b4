"""DiscreteSchedule, sigma <-> timestep conversion, ModelDenoiser and the schedule functions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sdxl.sampling import schedules as sch
from sdxl.sampling.denoiser import DiscreteSchedule, ModelDenoiser


@pytest.fixture(scope="module")
def schedule() -> DiscreteSchedule:
    return DiscreteSchedule()


def _t(sigmas: torch.Tensor, schedule: DiscreteSchedule) -> list[float]:
    """Timesteps of the nonzero sigmas."""
    return schedule.sigma_to_t(sigmas[:-1]).tolist()


# --------------------------------------------------------------------------------------- DiscreteSchedule
def test_discrete_schedule_values(schedule):
    """SDXL_SPEC §6 [V] values (abs tolerance 1e-6 / 1e-5 on the printed digits)."""
    assert schedule.sigmas.shape == (1000,) and schedule.sigmas.dtype == torch.float32
    assert schedule.sigma_min == pytest.approx(0.029167, abs=1e-6)
    assert schedule.sigma_max == pytest.approx(14.614641, abs=1e-5)
    assert float(schedule.alphas_cumprod[999]) == pytest.approx(0.004660, abs=1e-6)
    assert float(schedule.sigmas[199]) == pytest.approx(0.56928, abs=1e-5)
    assert (schedule.sigmas[1:] > schedule.sigmas[:-1]).all()


def test_float32_schedule_is_close_to_float64():
    """diffusers' float32 cumprod differs from the float64 one by at most ~1.3e-5 relative (at t = 0)."""
    a, b = DiscreteSchedule(dtype=torch.float32).sigmas, DiscreteSchedule().sigmas
    rel = ((a - b).abs() / b).max()
    assert 0 < rel < 2e-5


def test_table_sigmas_map_to_exact_integer_timesteps(schedule):
    """Every training sigma maps back to exactly its own integer timestep (both interpolations)."""
    t = torch.arange(1000, dtype=torch.float32)
    assert torch.equal(schedule.sigma_to_t(schedule.sigmas), t)
    assert torch.equal(schedule.sigma_to_t(schedule.sigmas, interpolation="linear"), t)
    assert torch.equal(schedule.t_to_sigma(torch.arange(1000)), schedule.sigmas)


def test_fractional_timesteps_round_trip(schedule):
    """t -> sigma -> t for fractional t, with both interpolations (tolerance 1e-3 in t: float32 sigmas)."""
    t = torch.tensor([0.25, 3.5, 17.75, 500.5, 998.9])
    for interpolation in ("log", "linear"):
        back = schedule.sigma_to_t(schedule.t_to_sigma(t, interpolation), interpolation=interpolation)
        torch.testing.assert_close(back, t, atol=1e-3, rtol=0)
    # log interpolation: the log-sigma at t = 500.5 is the mean of its neighbours' log-sigmas
    mid = schedule.t_to_sigma(torch.tensor(500.5))
    assert float(mid) == pytest.approx(math.sqrt(float(schedule.sigmas[500]) * float(schedule.sigmas[501])))


def test_quantize_and_clamping(schedule):
    """quantize picks the nearest level in log sigma; sigmas beyond the table clamp to t = 0 / 999."""
    s10, s11 = float(schedule.sigmas[10]), float(schedule.sigmas[11])
    just_below_mid = math.exp(0.49 * math.log(s11) + 0.51 * math.log(s10))
    assert float(schedule.sigma_to_t(just_below_mid, quantize=True)) == 10.0
    assert float(schedule.sigma_to_t(math.sqrt(s10 * s11) * 1.001, quantize=True)) == 11.0
    assert schedule.sigma_to_t(torch.tensor([1e-4, 100.0])).tolist() == [0.0, 999.0]


# --------------------------------------------------------------------------------------------- ModelDenoiser
class RecordingModel:
    def __init__(self, out: torch.Tensor):
        self.out = out
        self.seen = []

    def __call__(self, x_in, t, **cond):
        self.seen.append((x_in, t, cond))
        return self.out


def test_model_denoiser_eps(schedule):
    """eps: UNet input x / sqrt(sigma^2 + 1), integer t for a table sigma, x0 = x - sigma * eps."""
    x = torch.randn(2, 4, 3, 3)
    eps = torch.randn(2, 4, 3, 3)
    model = RecordingModel(eps)
    sigma = float(schedule.sigmas[500])
    x0 = ModelDenoiser(model, schedule)(x, torch.full((2,), sigma), context="c")
    x_in, t, cond = model.seen[0]
    torch.testing.assert_close(x_in, x / math.sqrt(sigma**2 + 1))
    assert t.tolist() == [500.0, 500.0] and cond == {"context": "c"}
    torch.testing.assert_close(x0, x - sigma * eps)


def test_model_denoiser_v(schedule):
    """v: x0 = x / (sigma^2 + 1) - sigma / sqrt(sigma^2 + 1) * v; and a scalar sigma is broadcast per sample.
    Checked against the VP definition v = alpha eps - sigma_vp x0 on a constructed example."""
    x0_true = torch.randn(3, 4, 2, 2)
    eps = torch.randn(3, 4, 2, 2)
    sigma = 2.5
    alpha, sigma_vp = 1 / math.sqrt(1 + sigma**2), sigma / math.sqrt(1 + sigma**2)
    v = alpha * eps - sigma_vp * x0_true
    model = RecordingModel(v)
    x = x0_true + sigma * eps
    x0 = ModelDenoiser(model, schedule, prediction="v")(x, sigma)
    torch.testing.assert_close(x0, x0_true, atol=1e-5, rtol=1e-5)
    assert model.seen[0][1].shape == (3,)


def test_model_denoiser_timestep_modes(schedule):
    """Between two levels: continuous t by default, the rounded t with quantize=True."""
    sigma = float(schedule.t_to_sigma(torch.tensor(300.3)))
    assert float(ModelDenoiser(None, schedule).timestep(sigma)) == pytest.approx(300.3, abs=1e-3)
    assert float(ModelDenoiser(None, schedule, quantize=True).timestep(sigma)) == 300.0
    with pytest.raises(ValueError):
        ModelDenoiser(None, schedule, prediction="sample")  # diffusers' word for x0: not ours


# ------------------------------------------------------------------------------------------------ schedules
ALL = list(sch.SCHEDULES)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("n", [1, 2, 10, 20, 50])
def test_schedule_shape(schedule, name, n):
    """n + 1 float32 sigmas (ddim_uniform: +1 step when 1000 % n != 0), strictly descending, last 0, the first
    at most sigma_max and at least the sigma of t = 1000 - 1000 // n (diffusers' "leading" and ComfyUI's
    ddim_uniform start one stride below the top; the others start at sigma_max, see the next test)."""
    sig = sch.get_sigmas(name, n, schedule)
    expected = n + 1 if not (name == "ddim_uniform" and 1000 % n) else n + 2
    assert sig.dtype == torch.float32 and sig.shape == (expected,)
    assert sig[-1] == 0
    assert (sig[1:] < sig[:-1]).all()
    assert float(sig[0]) <= schedule.sigma_max * (1 + 1e-6)
    if n > 1:  # one step: "leading" is t = 1 and "linspace" t = 0, as in diffusers
        assert float(sig[0]) >= float(schedule.sigmas[1000 - 1000 // n])


@pytest.mark.parametrize("name", ["normal", "uniform", "trailing", "linspace", "karras", "exponential",
                                  "sgm_uniform", "simple", "beta", "align_your_steps", "kl_optimal",
                                  "polyexponential"])
def test_schedules_starting_at_sigma_max(schedule, name):
    assert float(sch.get_sigmas(name, 30, schedule)[0]) == pytest.approx(schedule.sigma_max, rel=1e-6)


def test_normal_is_sgm(schedule):
    """SDXL_SPEC §6: n=50 -> t = 999, 979, ..., 39, 19; n=40 -> 999, 974, ..., 24 (integers, exact sigmas)."""
    t50 = _t(sch.normal(50, schedule), schedule)
    assert t50[:3] == [999, 979, 959] and t50[-2:] == [39, 19]
    assert t50 == np.linspace(999, 0, 50, endpoint=False).astype(int).tolist()
    t40 = _t(sch.normal(40, schedule), schedule)
    assert t40[:2] == [999, 974] and t40[-1] == 24
    assert torch.equal(sch.normal(1000, schedule)[:-1], schedule.sigmas.flip(0))


def test_uniform_and_sgm_uniform_timesteps(schedule):
    torch.testing.assert_close(torch.tensor(_t(sch.uniform(10, schedule), schedule)),
                               torch.linspace(999, 0, 10), atol=1e-3, rtol=0)
    torch.testing.assert_close(torch.tensor(_t(sch.sgm_uniform(10, schedule), schedule)),
                               torch.linspace(999, 0, 11)[:-1], atol=1e-3, rtol=0)


def test_diffusers_spacings(schedule):
    """leading: 981, 961, ..., 1 for 50 steps (SDXL_SPEC §6); trailing: 999, 749, 499, 249 for 4."""
    lead = _t(sch.leading(50, schedule), schedule)
    assert lead[0] == 981 and lead[-1] == 1 and np.all(np.diff(lead) == -20)
    assert _t(sch.trailing(4, schedule), schedule) == [999, 749, 499, 249]
    assert len(sch.trailing(61, schedule)) == 62  # diffusers' float arange would give 62 timesteps here
    lin = _t(sch.linspace(4, schedule), schedule)
    assert lin[0] == 999 and lin[-1] == 0


def test_comfy_simple_and_ddim_uniform(schedule):
    assert _t(sch.simple(10, schedule), schedule) == list(range(999, 0, -100))
    assert _t(sch.ddim_uniform(10, schedule), schedule) == list(range(901, 0, -100))
    assert _t(sch.ddim_uniform(30, schedule), schedule) == list(range(1, 1000, 33))[::-1]  # 31 steps


def test_karras_and_exponential(schedule):
    """Karras: endpoints = the model's sigma range, sigma^(1/7) evenly spaced. Exponential: constant ratio."""
    k = sch.karras(12, schedule).double()
    assert float(k[0]) == pytest.approx(schedule.sigma_max, rel=1e-6)
    assert float(k[-2]) == pytest.approx(schedule.sigma_min, rel=1e-6)
    steps = np.diff(k[:-1].numpy() ** (1 / 7))
    np.testing.assert_allclose(steps, steps[0], rtol=1e-5)
    custom = sch.karras(5, schedule, sigma_min=0.1, sigma_max=10.0, rho=3.0)
    assert float(custom[0]) == pytest.approx(10.0) and float(custom[-2]) == pytest.approx(0.1)
    e = sch.exponential(12, schedule).double()
    ratios = (e[1:-1] / e[:-2]).numpy()
    np.testing.assert_allclose(ratios, ratios[0], rtol=1e-5)
    assert float(e[-2]) == pytest.approx(schedule.sigma_min, rel=1e-6)


@pytest.mark.parametrize("n", [5, 10, 30, 50, 200])
def test_beta_matches_comfyui_with_scipy(schedule, n):
    """ComfyUI's beta scheduler (scipy.stats.beta.ppf, alpha = beta = 0.6, repeats dropped) == ours, whose ppf
    is bisection on our own incomplete beta function (scipy is test-only)."""
    stats = pytest.importorskip("scipy.stats")
    ts = np.rint(stats.beta.ppf(1 - np.linspace(0, 1, n, endpoint=False), 0.6, 0.6) * 999).astype(int)
    keep = [t for i, t in enumerate(ts) if i == 0 or t != ts[i - 1]]
    expected = torch.cat([schedule.sigmas[keep], torch.zeros(1)])
    assert torch.equal(sch.beta(n, schedule), expected)
    assert sch.beta_ppf(0.5, 0.6, 0.6) == pytest.approx(0.5, abs=1e-12)


def test_get_sigmas_rejects_unknown_and_bad_n(schedule):
    with pytest.raises(ValueError, match="valid: normal"):
        sch.get_sigmas("nope", 10, schedule)
    with pytest.raises(ValueError):
        sch.get_sigmas("karras", 0, schedule)
    assert torch.equal(sch.get_sigmas("karras", 8), sch.karras(8, DiscreteSchedule()))


# ----------------------------------------------------------- Align Your Steps, KL-optimal, polyexponential
# NVIDIA's published 10-step SDXL sigmas (research.nvidia.com/labs/toronto-ai/AlignYourSteps/howto.html), as
# ComfyUI's AlignYourStepsScheduler carries them.
AYS_SDXL = [14.6146412293, 6.3184485287, 3.7681790315, 2.1811480769, 1.3405244945, 0.8620721141,
            0.5550693289, 0.3798540708, 0.2332364134, 0.1114188177, 0.0291671582]


def test_align_your_steps_is_the_published_list_at_10_steps(schedule):
    """10 steps: the 10 published sigmas above sigma_min, as float32, then 0 (ComfyUI replaces the last,
    0.0292, by 0). Exact."""
    expected = torch.tensor(AYS_SDXL[:10] + [0.0], dtype=torch.float32)
    assert torch.equal(sch.align_your_steps(10, schedule), expected)
    assert torch.equal(sch.get_sigmas("align_your_steps", 10), expected)


@pytest.mark.parametrize("n", [1, 2, 7, 11, 20, 33])
def test_align_your_steps_interpolation(schedule, n):
    """Other step counts: ComfyUI's loglinear_interp of the 11 sigmas to n + 1 points, last one set to 0.
    Computed here point by point: point k sits at position 10 k / n of the published list and takes the
    geometric interpolation of its two neighbours (rtol 1e-6: float32 output)."""
    logs = np.log(np.array(AYS_SDXL))
    expected = []
    for k in range(n + 1):
        pos = 10.0 * k / n
        j = min(int(math.floor(pos)), 9)
        frac = pos - j
        expected.append(math.exp((1 - frac) * logs[j] + frac * logs[j + 1]))
    expected[-1] = 0.0
    torch.testing.assert_close(sch.align_your_steps(n, schedule), torch.tensor(expected, dtype=torch.float32),
                               rtol=1e-6, atol=0)


def test_align_your_steps_keeps_the_knots_at_20_steps(schedule):
    """20 steps: every other sigma is a published one (to float32 rounding); the ones between are their
    geometric means, e.g. sqrt(14.6146 * 6.3184) = 9.6095."""
    sig = sch.align_your_steps(20, schedule).double()
    knots = torch.tensor(AYS_SDXL[:10], dtype=torch.float64)
    torch.testing.assert_close(sig[0:20:2], knots, rtol=1e-6, atol=0)
    mids = [math.sqrt(a * b) for a, b in zip(AYS_SDXL[:-1], AYS_SDXL[1:])]
    torch.testing.assert_close(sig[1:20:2], torch.tensor(mids, dtype=torch.float64), rtol=1e-6, atol=0)
    assert float(sig[1]) == pytest.approx(9.6095, abs=1e-4)


@pytest.mark.parametrize("n", [1, 2, 9, 30])
def test_kl_optimal_formula(schedule, n):
    """sigma_i = tan(t_i atan(sigma_min) + (1 - t_i) atan(sigma_max)), t = linspace(0, 1, n), then 0
    (ComfyUI's kl_optimal; one step = sigma_max). rtol 1e-6; the arctans are evenly spaced."""
    lo, hi = schedule.sigma_min, schedule.sigma_max
    t = [i / (n - 1) for i in range(n)] if n > 1 else [0.0]
    expected = [math.tan(ti * math.atan(lo) + (1 - ti) * math.atan(hi)) for ti in t] + [0.0]
    sig = sch.kl_optimal(n, schedule)
    torch.testing.assert_close(sig, torch.tensor(expected, dtype=torch.float32), rtol=1e-6, atol=0)
    if n > 2:
        steps = np.diff(np.arctan(sig[:-1].double().numpy()))
        np.testing.assert_allclose(steps, steps[0], rtol=1e-4)
    custom = sch.kl_optimal(4, schedule, sigma_min=0.5, sigma_max=5.0)
    assert float(custom[0]) == pytest.approx(5.0) and float(custom[-2]) == pytest.approx(0.5)


def test_kl_optimal_matches_comfyui_float32_arithmetic(schedule):
    """ComfyUI computes kl_optimal in float32 torch ops (arange / (n - 1), atan of the float sigmas, tan_);
    ours in float64 rounded once: equal to float32 precision (rtol 2e-6)."""
    n = 25
    lo, hi = schedule.sigma_min, schedule.sigma_max
    adj = torch.arange(n, dtype=torch.float32).div_(n - 1)
    comfy = torch.zeros(n + 1)
    comfy[:-1] = (adj * math.atan(lo) + (1 - adj) * math.atan(hi)).tan_()
    torch.testing.assert_close(sch.kl_optimal(n, schedule), comfy, rtol=2e-6, atol=0)


@pytest.mark.parametrize("rho", [0.5, 1.0, 2.0, 3.0])
def test_polyexponential_formula(schedule, rho):
    """k-diffusion's get_sigmas_polyexponential: log sigma = log min + linspace(1, 0, n)^rho (log max -
    log min), then 0 (rtol 1e-6). rho = 1 (A1111's default) is `exponential`."""
    n = 12
    lo, hi = schedule.sigma_min, schedule.sigma_max
    ramp = [(1 - i / (n - 1)) ** rho for i in range(n)]
    expected = [math.exp(r * (math.log(hi) - math.log(lo)) + math.log(lo)) for r in ramp] + [0.0]
    sig = sch.polyexponential(n, schedule, rho=rho)
    torch.testing.assert_close(sig, torch.tensor(expected, dtype=torch.float32), rtol=1e-6, atol=0)
    if rho == 1.0:
        torch.testing.assert_close(sig, sch.exponential(n, schedule), rtol=1e-6, atol=0)
    assert torch.equal(sch.get_sigmas("polyexponential", n, schedule, rho=rho), sig)
