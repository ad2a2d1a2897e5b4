"""Samplers on an analytic problem, plus the plumbing (seeds, callback, options) and the name registry.

Data x0 ~ N(mu, s^2) per element. Its exact denoiser is D(x, sigma) = (s^2 x + sigma^2 mu) / (s^2 + sigma^2),
and the probability-flow ODE maps x at sigma_a to mu + (x - mu) sqrt(s^2 + sigma_b^2) / sqrt(s^2 + sigma_a^2)
at sigma_b, so every deterministic sampler has an exact answer to converge to, and every stochastic one an
exact output distribution, N(mu, s^2).
"""

from __future__ import annotations

import inspect
import math

import numpy as np
import pytest
import torch

from sdxl.errors import RequestError
from sdxl.sampling import names as N
from sdxl.sampling import samplers as S
from sdxl.sampling import schedules as sch
from sdxl.sampling.denoiser import DiscreteSchedule

MU, S_DATA = 0.3, 0.5


@pytest.fixture(scope="module")
def schedule() -> DiscreteSchedule:
    return DiscreteSchedule()


def gaussian_denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    s = sigma.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)
    return (S_DATA**2 * x + s**2 * MU) / (S_DATA**2 + s**2)


def consistency_denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The exact consistency function (ODE solution at sigma = 0) of the Gaussian: what an LCM learns."""
    s = sigma.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)
    return MU + (x - MU) * S_DATA / (S_DATA**2 + s**2) ** 0.5


def exact_ode(x: torch.Tensor, sigma_from: float, sigma_to: float) -> torch.Tensor:
    return MU + (x - MU) * math.sqrt(S_DATA**2 + sigma_to**2) / math.sqrt(S_DATA**2 + sigma_from**2)


# --------------------------------------------------------------------------------------- convergence order
# (sampler, options, minimum fitted order). The order is the slope of log(error) against log(steps) for
# Karras schedules of 16, 32, 64 steps, run from sigma_max to sigma_min (no final step to 0: that step is
# the same fixed-size first-order step for every n and would hide the order). Expected orders, minus a
# margin of 0.3:
#   1: Euler, DDIM (= Euler), the ancestral samplers at eta = 0 built on Euler.
#   2: Heun, DPM2, DPM++ 2M / 2S / SDE (eta = 0), 2M SDE (eta = 0, midpoint and heun).
#   2: DPM++ 3M SDE (eta = 0): third order per step, but its first step is first order, which caps the global
#      order at 2 (the same holds for every multistep method); it must still beat 2M clearly (test below).
#   LMS (order 4) and UniPC (predictor + corrector) converge faster than 2 over this range (measured 3.3-3.7
#      for LMS, 2.8-3.4 for UniPC); they are held to >= 2.7 and >= 2.5.
ORDER_CASES = [
    ("euler", {}, 0.7),
    ("ddim", {}, 0.7),
    ("euler_a", {"eta": 0.0}, 0.7),
    ("heun", {}, 1.7),
    ("dpm_2", {}, 1.7),
    ("dpm_2_a", {"eta": 0.0}, 1.7),
    ("dpmpp_2m", {}, 1.7),
    ("dpmpp_2s_a", {"eta": 0.0}, 1.7),
    ("dpmpp_sde", {"eta": 0.0}, 1.7),
    ("dpmpp_2m_sde", {"eta": 0.0}, 1.7),
    ("dpmpp_2m_sde_heun", {"eta": 0.0}, 1.7),
    ("dpmpp_3m_sde", {"eta": 0.0}, 1.7),
    ("lms", {}, 2.7),
    ("unipc", {}, 2.5),
    ("unipc", {"order": 3}, 2.5),
    ("unipc_bh1", {}, 2.5),
]


def _error(name: str, options: dict, n: int, schedule: DiscreteSchedule, x: torch.Tensor) -> float:
    sigmas = sch.karras(n, schedule)[:-1].double()
    out = S.SAMPLERS[name](gaussian_denoiser, x.clone(), sigmas, **options)
    return float((out - exact_ode(x, float(sigmas[0]), float(sigmas[-1]))).abs().max())


@pytest.fixture(scope="module")
def start() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return MU + math.sqrt(S_DATA**2 + 14.6146**2) * torch.randn(8, 16, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("name,options,min_order", ORDER_CASES,
                         ids=[f"{c[0]}{c[1] or ''}" for c in ORDER_CASES])
def test_convergence_order(schedule, start, name, options, min_order):
    steps = np.array([16, 32, 64])
    errors = np.array([_error(name, options, int(n), schedule, start) for n in steps])
    order = -np.polyfit(np.log(steps), np.log(errors), 1)[0]
    assert order >= min_order, f"{name}: measured order {order:.2f}, errors {errors}"
    assert errors[-1] < (0.05 if min_order < 1 else 0.005)  # at 64 steps (start values up to ~50)


def test_third_order_multistep_beats_second_order(schedule, start):
    """DPM++ 3M (eta 0) extrapolates from three x0 estimates: at 32 steps at least 3x as accurate as 2M."""
    e3 = _error("dpmpp_3m_sde", {"eta": 0.0}, 32, schedule, start)
    e2 = _error("dpmpp_2m", {}, 32, schedule, start)
    assert e3 < e2 / 3


@pytest.mark.parametrize("name", ["euler", "heun", "dpm_2", "lms", "dpmpp_2m", "ddim", "unipc", "unipc_bh1"])
def test_full_run_to_zero(schedule, start, name):
    """Down to sigma = 0 (the usual schedule): within 0.01 of the exact x0 at 64 steps (Euler/DDIM, first
    order: 0.05). The final step to 0 is the model's x0 estimate for the multistep samplers."""
    sigmas = sch.karras(64, schedule).double()
    out = S.SAMPLERS[name](gaussian_denoiser, start.clone(), sigmas)
    err = float((out - exact_ode(start, float(sigmas[0]), 0.0)).abs().max())
    assert err < (0.05 if name in ("euler", "ddim") else 0.01)


# ------------------------------------------------------------------------------------ stochastic samplers
# (sampler, options, denoiser, steps, variance tolerance). 20000 samples: the standard error of the sample
# mean is 0.0035 and of var/s^2 0.01. The first-order ancestral samplers (Euler a, DDIM eta 1) still carry a
# discretisation bias of ~3% at 400 steps; the others are within ~1.5% at 100 steps.
STOCHASTIC_CASES = [
    ("euler_a", {}, gaussian_denoiser, 400, 0.06),
    ("ddim", {"eta": 1.0}, gaussian_denoiser, 400, 0.06),
    ("dpm_2_a", {}, gaussian_denoiser, 100, 0.04),
    ("dpmpp_2s_a", {}, gaussian_denoiser, 100, 0.04),
    ("dpmpp_sde", {}, gaussian_denoiser, 100, 0.04),
    ("dpmpp_2m_sde", {}, gaussian_denoiser, 100, 0.04),
    ("dpmpp_2m_sde_heun", {}, gaussian_denoiser, 100, 0.04),
    ("dpmpp_3m_sde", {}, gaussian_denoiser, 100, 0.04),
    ("lcm", {}, consistency_denoiser, 8, 0.04),  # exact for a true consistency function, at any step count
]


@pytest.mark.parametrize("name,options,denoiser,n,var_tol", STOCHASTIC_CASES,
                         ids=[f"{c[0]}{c[1] or ''}" for c in STOCHASTIC_CASES])
def test_stochastic_samplers_sample_the_data_distribution(schedule, name, options, denoiser, n, var_tol):
    """Started from the exact noisy marginal N(mu, s^2 + sigma_max^2), the output has mean mu (+- 0.02) and
    variance s^2 (relative tolerance per sampler, see STOCHASTIC_CASES)."""
    sigmas = sch.karras(n, schedule)
    g = torch.Generator().manual_seed(1234)
    x = MU + math.sqrt(S_DATA**2 + float(sigmas[0]) ** 2) * torch.randn(1, 20000, generator=g)
    out = S.SAMPLERS[name](denoiser, x, sigmas, generator=g, **options)
    assert abs(float(out.mean()) - MU) < 0.02
    assert abs(float(out.var()) / S_DATA**2 - 1) < var_tol


STOCHASTIC = ["euler_a", "dpm_2_a", "dpmpp_2s_a", "dpmpp_sde", "dpmpp_2m_sde", "dpmpp_2m_sde_heun",
              "dpmpp_3m_sde", "lcm", "tcd"]


@pytest.mark.parametrize("name", STOCHASTIC)
def test_seeds(schedule, name):
    """Same seed -> identical output; another seed -> different; float64 latents get the same (float32-drawn)
    noise, so the result agrees with the float32 run to float32 precision."""
    sigmas = sch.karras(6, schedule)
    x = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0)) * 14.6

    def run(seed, x=x):
        return S.SAMPLERS[name](gaussian_denoiser, x, sigmas, generator=torch.Generator().manual_seed(seed))

    a, b, c = run(1), run(1), run(2)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    torch.testing.assert_close(run(1, x.double()), a.double(), rtol=1e-4, atol=1e-4)
    assert S.SAMPLER_INFO[name].stochastic


def test_no_generator_uses_the_global_cpu_rng(schedule):
    sigmas = sch.karras(5, schedule)
    x = torch.zeros(1, 16) + 3.0
    torch.manual_seed(5)
    a = S.euler_a(gaussian_denoiser, x, sigmas)
    torch.manual_seed(5)
    assert torch.equal(a, S.euler_a(gaussian_denoiser, x, sigmas))


@pytest.mark.parametrize("name", sorted(set(S.SAMPLERS) - set(STOCHASTIC)))
def test_deterministic_samplers_ignore_generator_and_eta(schedule, name):
    """ODE samplers draw nothing: generator and the universal eta/s_noise options change nothing."""
    sigmas = sch.karras(6, schedule)
    x = torch.randn(1, 32, generator=torch.Generator().manual_seed(3)) * 14.6
    base = S.SAMPLERS[name](gaussian_denoiser, x, sigmas)
    if name == "ddim":  # ddim's eta is real (see test_ddim_is_euler_and_ancestral)
        other = S.SAMPLERS[name](gaussian_denoiser, x, sigmas, generator=torch.Generator().manual_seed(9))
    else:
        other = S.SAMPLERS[name](gaussian_denoiser, x, sigmas, generator=torch.Generator().manual_seed(9),
                                 eta=0.7, s_noise=2.0)
    assert torch.equal(base, other)
    assert not S.SAMPLER_INFO[name].stochastic


# --------------------------------------------------------------------------------------- equivalences
def test_ddim_is_euler_and_ancestral(schedule):
    """DDIM with eta 0 is Euler; with eta 1 it is Euler ancestral (same noise draws), see ddim's docstring."""
    sigmas = sch.leading(20, schedule)
    x = torch.randn(2, 8, generator=torch.Generator().manual_seed(0)) * 13.0
    torch.testing.assert_close(S.ddim(gaussian_denoiser, x, sigmas), S.euler(gaussian_denoiser, x, sigmas))
    g1, g2 = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    torch.testing.assert_close(S.ddim(gaussian_denoiser, x, sigmas, generator=g1, eta=1.0),
                               S.euler_a(gaussian_denoiser, x, sigmas, generator=g2))


def test_tcd_gamma_zero_is_ddim_then_ends_at_t0(schedule):
    """TCD with gamma 0 is DDIM (= Euler) on every step that ends above sigma = 0; its final step returns
    (x0 + sigma(0) eps) / sqrt(1 + sigma(0)^2), the VP sample at t = 0, as diffusers' TCDScheduler does."""
    sigmas = sch.leading(12, schedule)
    x = torch.randn(2, 8, generator=torch.Generator().manual_seed(0)) * 14.6
    torch.testing.assert_close(S.tcd(gaussian_denoiser, x, sigmas[:-1], eta=0.0),
                               S.ddim(gaussian_denoiser, x, sigmas[:-1]))
    seen = {}
    out = S.tcd(gaussian_denoiser, x, sigmas, eta=0.0,
                callback=lambda i, sig, xi, d: seen.update({i: (xi, d)}))
    before, last = seen[10][0], float(sigmas[-2])
    x0 = gaussian_denoiser(before, torch.full((2,), last))
    s0 = schedule.sigma_min
    torch.testing.assert_close(out, (x0 + s0 * (before - x0) / last) / math.sqrt(1 + s0**2))
    assert torch.equal(out, seen[11][0])


def test_tcd_step_goes_down_to_t_s_and_renoises(schedule):
    """One TCD step, gamma 0.3, from t = 999 to t = 759 on a denoiser whose x0 estimate is 0: x = eps, so the
    result is sigma(531) eps + sqrt(sigma(759)^2 - sigma(531)^2) z with z the generator's first draw
    (531 = floor(0.7 * 759))."""
    sigmas = torch.stack([schedule.sigmas[999], schedule.sigmas[759]])
    x = torch.randn(1, 64, generator=torch.Generator().manual_seed(1)) * float(sigmas[0])
    out = S.tcd(lambda x, sigma: torch.zeros_like(x), x, sigmas, eta=0.3,
                generator=torch.Generator().manual_seed(2))
    z = torch.randn(1, 64, generator=torch.Generator().manual_seed(2))
    s_s, s_next = float(schedule.sigmas[531]), float(sigmas[1])
    expected = s_s * x / float(sigmas[0]) + math.sqrt(s_next**2 - s_s**2) * z
    torch.testing.assert_close(out, expected)


def test_tcd_reads_the_noise_table_and_checks_gamma(schedule):
    """The table comes from the `schedule` option, else the denoiser's `.schedule`: on a zero-terminal-SNR
    table the same sigmas land on other timesteps, so the result differs. gamma outside [0, 1] is a request
    error naming eta."""
    sigmas = sch.karras(6, schedule)
    x = torch.randn(1, 32, generator=torch.Generator().manual_seed(3)) * 14.6

    def run(**kw):
        return S.tcd(gaussian_denoiser, x, sigmas, generator=torch.Generator().manual_seed(4), **kw)

    zsnr = DiscreteSchedule(zero_terminal_snr=True)
    assert torch.equal(run(), run(schedule=DiscreteSchedule()))
    assert not torch.allclose(run(), run(schedule=zsnr))

    class WithTable:
        schedule = zsnr

        def __call__(self, x, sigma):
            return gaussian_denoiser(x, sigma)

    own = S.tcd(WithTable(), x, sigmas, generator=torch.Generator().manual_seed(4))
    assert torch.equal(own, run(schedule=zsnr))
    with pytest.raises(RequestError, match="eta: 1.5 is outside 0..1"):
        run(eta=1.5)
    assert S.SAMPLER_INFO["tcd"].uses_schedule and not S.SAMPLER_INFO["lcm"].uses_schedule


def test_sde_samplers_at_eta_zero(schedule):
    """DPM++ 2M SDE with eta 0 is DPM++ 2M; the named heun variant equals solver_type="heun"."""
    sigmas = sch.karras(12, schedule)
    x = torch.randn(2, 8, generator=torch.Generator().manual_seed(0)) * 14.6
    torch.testing.assert_close(S.dpmpp_2m_sde(gaussian_denoiser, x, sigmas, eta=0.0),
                               S.dpmpp_2m(gaussian_denoiser, x, sigmas))
    g1, g2 = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    assert torch.equal(S.dpmpp_2m_sde_heun(gaussian_denoiser, x, sigmas, generator=g1),
                       S.dpmpp_2m_sde(gaussian_denoiser, x, sigmas, generator=g2, solver_type="heun"))
    assert torch.equal(S.unipc_bh1(gaussian_denoiser, x, sigmas), S.unipc(gaussian_denoiser, x, sigmas,
                                                                           variant="bh1"))


def test_lms_coefficients_sum_to_the_step():
    """The Lagrange basis sums to 1, so the LMS weights of any order sum to sigma_{i+1} - sigma_i; order 1 is
    Euler."""
    sig = [14.6, 9.0, 5.5, 3.1, 1.7, 0.9]
    for order in (1, 2, 3, 4):
        i = 4
        total = sum(S._lms_coefficient(sig, i, j, order) for j in range(order))
        assert total == pytest.approx(sig[i + 1] - sig[i], rel=1e-12)
    assert S._lms_coefficient(sig, 2, 0, 1) == pytest.approx(sig[3] - sig[2])


def test_ancestral_split():
    down, up = S.ancestral_split(2.0, 1.0, eta=1.0)
    assert down**2 + up**2 == pytest.approx(1.0)
    assert up == pytest.approx(math.sqrt(1.0 * (4.0 - 1.0) / 4.0))
    assert S.ancestral_split(2.0, 1.0, eta=0.0) == (1.0, 0.0)
    assert S.ancestral_split(2.0, 0.0) == (0.0, 0.0)


def test_euler_churn_adds_noise(schedule):
    """s_churn > 0 draws noise (reproducibly); 0 keeps Euler deterministic."""
    sigmas = sch.karras(10, schedule)
    x = torch.randn(1, 64, generator=torch.Generator().manual_seed(0)) * 14.6
    a = S.euler(gaussian_denoiser, x, sigmas, s_churn=5.0, generator=torch.Generator().manual_seed(1))
    b = S.euler(gaussian_denoiser, x, sigmas, s_churn=5.0, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.allclose(a, S.euler(gaussian_denoiser, x, sigmas))


# ----------------------------------------------------------------------------------------------- plumbing
def test_callback_sees_every_step(schedule):
    sigmas = sch.karras(7, schedule)
    seen = []
    out = S.heun(gaussian_denoiser, torch.ones(1, 4) * 14.6, sigmas,
                 callback=lambda i, sigma, x, den: seen.append((i, sigma, x.clone(), den)))
    assert [i for i, *_ in seen] == list(range(7))
    assert [s for _, s, *_ in seen] == pytest.approx(sigmas[1:].tolist())
    assert torch.equal(seen[-1][2], out)


def test_callback_stop_raises_interrupted_with_state(schedule):
    sigmas = sch.karras(10, schedule)
    calls = []

    def denoiser(x, sigma):
        calls.append(float(sigma[0]))
        return gaussian_denoiser(x, sigma)

    with pytest.raises(S.Interrupted) as info:
        S.dpmpp_2m(denoiser, torch.ones(1, 4) * 14.6, sigmas,
                   callback=lambda i, *a: "stop" if i == 2 else None)
    assert info.value.step == 2 and len(calls) == 3
    assert info.value.x.shape == (1, 4) and info.value.denoised is not None


def test_interrupted_raised_by_callback_or_denoiser_propagates(schedule):
    sigmas = sch.karras(5, schedule)

    def cb(i, sigma, x, denoised):
        raise S.Interrupted("user pressed stop")

    with pytest.raises(S.Interrupted, match="user pressed stop") as info:
        S.euler(gaussian_denoiser, torch.ones(1, 4), sigmas, callback=cb)
    assert info.value.step == 0 and info.value.x is not None

    def bad_denoiser(x, sigma):
        raise S.Interrupted("from the model")

    with pytest.raises(S.Interrupted, match="from the model"):
        S.lms(bad_denoiser, torch.ones(1, 4), sigmas)


def test_options_and_signature(schedule):
    sigmas = sch.karras(3, schedule)
    with pytest.raises(TypeError, match="unknown options"):
        S.euler(gaussian_denoiser, torch.ones(1, 4), sigmas, rho=3)
    params = inspect.signature(S.dpmpp_2m_sde).parameters
    assert list(params)[:3] == ["denoiser", "x", "sigmas"]
    assert {"generator", "callback", "extra", "eta", "s_noise", "solver_type"} <= set(params)
    with pytest.raises(ValueError, match="descending"):
        S.euler(gaussian_denoiser, torch.ones(1, 4), torch.tensor([1.0, 2.0, 0.0]))


def test_extra_reaches_the_denoiser(schedule):
    seen = []

    def denoiser(x, sigma, context=None, y=None):
        seen.append((context, y, sigma.shape))
        return gaussian_denoiser(x, sigma)

    S.dpmpp_2s_a(denoiser, torch.ones(3, 4), sch.karras(2, schedule), extra={"context": "c", "y": 1})
    assert seen and all(s == ("c", 1, (3,)) for s in seen)


# ------------------------------------------------------------------------------------- names and registry
@pytest.mark.parametrize(
    "name,expected",
    [
        ("euler", ("euler", None)),
        ("Euler a", ("euler_a", None)),
        ("euler_ancestral", ("euler_a", None)),
        ("k_euler_a", ("euler_a", None)),
        ("DPM++ 2M", ("dpmpp_2m", None)),
        ("DPM++ 2M Karras", ("dpmpp_2m", "karras")),
        ("dpm++ 2m  karras", ("dpmpp_2m", "karras")),
        ("DPM++ 2M SDE Karras", ("dpmpp_2m_sde", "karras")),
        ("DPM++ 2M SDE Exponential", ("dpmpp_2m_sde", "exponential")),
        ("DPM++ 2M SDE Heun", ("dpmpp_2m_sde_heun", None)),
        ("DPM++ 3M SDE Exponential", ("dpmpp_3m_sde", "exponential")),
        ("DPM++ SDE", ("dpmpp_sde", None)),
        ("DPM++ SDE Karras", ("dpmpp_sde", "karras")),
        ("DPM++ 2S a Karras", ("dpmpp_2s_a", "karras")),
        ("DPM2 a", ("dpm_2_a", None)),
        ("DPM2 Karras", ("dpm_2", "karras")),
        ("LMS", ("lms", None)),
        ("LMS Karras", ("lms", "karras")),
        ("Heun", ("heun", None)),
        ("DDIM", ("ddim", None)),
        ("UniPC", ("unipc", None)),
        ("LCM", ("lcm", None)),
        ("Euler SGM Uniform", ("euler", "sgm_uniform")),
        ("k_dpmpp_2m_ka", ("dpmpp_2m", "karras")),
        ("k_dpmpp_2m_sde_exp", ("dpmpp_2m_sde", "exponential")),
        ("dpm_2_ancestral", ("dpm_2_a", None)),
        ("dpmpp_2s_ancestral", ("dpmpp_2s_a", None)),
        ("dpmpp_sde_gpu", ("dpmpp_sde", None)),
        ("dpmpp_2m_sde_gpu", ("dpmpp_2m_sde", None)),
        ("dpmpp_3m_sde", ("dpmpp_3m_sde", None)),
        ("uni_pc", ("unipc_bh1", None)),
        ("uni_pc_bh2", ("unipc", None)),
        ("lcm", ("lcm", None)),
        ("TCD", ("tcd", None)),
        ("tcd", ("tcd", None)),
        ("Euler Align Your Steps", ("euler", "align_your_steps")),
        ("DPM++ 2M KL Optimal", ("dpmpp_2m", "kl_optimal")),
    ],
)
def test_resolve_sampler(name, expected):
    assert N.resolve_sampler(name) == expected


def test_resolve_sampler_unknown_lists_valid_names():
    with pytest.raises(ValueError, match="valid: .*euler.*DPM\\+\\+ 2M"):
        N.resolve_sampler("PLMS")


@pytest.mark.parametrize(
    "name,expected",
    [("karras", "karras"), ("Karras", "karras"), ("Exponential", "exponential"),
     ("SGM Uniform", "sgm_uniform"), ("SGMUniform", "sgm_uniform"), ("Simple", "simple"),
     ("Normal", "normal"), ("Beta", "beta"),
     ("Uniform", "uniform"), ("DDIM", "ddim_uniform"), ("ddim_uniform", "ddim_uniform"),
     ("leading", "leading"), ("trailing", "trailing"), ("linspace", "linspace"),
     ("Align Your Steps", "align_your_steps"), ("align_your_steps", "align_your_steps"),
     ("AYS", "align_your_steps"), ("KL Optimal", "kl_optimal"), ("kl_optimal", "kl_optimal"),
     ("Polyexponential", "polyexponential"), ("polyexponential", "polyexponential")],
)
def test_resolve_schedule(name, expected):
    assert N.resolve_schedule(name) == expected


def test_new_names_as_infotexts_write_and_read_them():
    """A1111's labels for the schedules and TCD, both ways (what the PNG infotext holds and --from reads)."""
    for name, label in [("align_your_steps", "Align Your Steps"), ("kl_optimal", "KL Optimal"),
                        ("polyexponential", "Polyexponential")]:
        assert N.schedule_label(name) == label and N.parse_schedule_label(label) == name
    assert N.sampler_label("tcd") == "TCD" and N.parse_sampler_label("TCD") == ("tcd", None)
    assert N.automatic_schedule("tcd") == "uniform"


def test_automatic_schedule():
    """A1111's "Automatic": the sampler's preferred schedule, else the model's default (uniform)."""
    assert N.resolve_schedule("Automatic", "DPM++ 2M") == "karras"
    assert N.resolve_schedule(None, "dpmpp_2m_sde") == "exponential"
    assert N.resolve_schedule("", "dpmpp_3m_sde") == "exponential"
    assert N.resolve_schedule("automatic", "Euler a") == "uniform"
    assert N.resolve_schedule("Automatic") == "uniform"
    with pytest.raises(ValueError, match="valid: normal"):
        N.resolve_schedule("polyexponential-ish")


def test_registry_is_complete():
    """Every sampler is registered with an A1111 name and a callable of the standard signature; every schedule
    has a display name; display names resolve back."""
    required = {"euler", "euler_a", "heun", "dpm_2", "dpm_2_a", "lms", "dpmpp_2m", "dpmpp_2m_sde",
                "dpmpp_3m_sde", "dpmpp_sde", "dpmpp_2s_a", "ddim", "unipc", "lcm"}
    assert required <= set(S.SAMPLERS)
    for name, fn in S.SAMPLERS.items():
        assert list(inspect.signature(fn).parameters)[:3] == ["denoiser", "x", "sigmas"]
        label = N.A1111_SAMPLER_NAMES[name]
        assert N.resolve_sampler(label)[0] == (name if name != "unipc_bh1" else "unipc")
    for name in sch.SCHEDULES:
        assert N.resolve_schedule(N.A1111_SCHEDULE_NAMES[name]) == name
    # names.py's `runnable` columns are exactly the registries
    assert N.RUNNABLE_SAMPLERS == tuple(S.SAMPLER_INFO)
    assert set(N.RUNNABLE_SCHEDULES) == set(sch.SCHEDULES)


def test_a1111_samplers_we_cannot_run_are_named_not_run():
    """PLMS, DPM fast, ...: known labels (infotexts read back), refused by requests. Every A1111 schedule
    type runs."""
    assert N.parse_sampler_label("PLMS") == ("plms", None)
    assert N.parse_sampler_label("DPM adaptive") == ("dpm_adaptive", None)
    assert N.sampler_label("restart") == "Restart"
    with pytest.raises(ValueError, match="does not implement"):
        N.resolve_sampler("DPM fast")
    assert set(N.A1111_SCHEDULE_NAMES) - {"automatic"} == set(N.RUNNABLE_SCHEDULES)
    assert N.parse_sampler_label("Mystery Karras") == ("Mystery", "karras")
    assert N.parse_sampler_label("Mystery") == ("Mystery", None)


# ---------------------------------------------------------------------------------- cutting schedules
def test_img2img_sigmas(schedule):
    sigmas = sch.leading(50, schedule)
    kept = S.img2img_sigmas(sigmas, 0.3)
    assert len(kept) == 16 and torch.equal(kept, sigmas[35:])
    assert torch.equal(S.img2img_sigmas(sigmas, 1.0), sigmas)
    assert S.img2img_sigmas(sigmas, 0.0).tolist() == [0.0]
    with pytest.raises(ValueError):
        S.img2img_sigmas(sigmas, 1.5)


def test_split_sigmas(schedule):
    """SDXL_SPEC §8: 50 leading steps at 0.8 -> base 40, refiner 10, handing over at t = 201 -> 181."""
    high, low = S.split_sigmas(sch.leading(50, schedule), 0.8, schedule)
    assert (len(high) - 1, len(low) - 1) == (40, 10)
    assert high[-1] == low[0]
    assert schedule.sigma_to_t(low[0]).item() == 181
    k_high, k_low = S.split_sigmas(sch.karras(30, schedule), 0.8, schedule)
    assert (schedule.sigma_to_t(k_high[:-1]) >= 200).all() and (schedule.sigma_to_t(k_low[:-1]) < 200).all()


def test_split_falls_after_full_heun_steps(schedule):
    """Running Heun on the base part and then on the refiner part is exactly one Heun run: no half step."""
    sigmas = sch.karras(20, schedule)
    x = torch.randn(1, 16, generator=torch.Generator().manual_seed(0)) * 14.6
    high, low = S.split_sigmas(sigmas, 0.8, schedule)
    two_stage = S.heun(gaussian_denoiser, S.heun(gaussian_denoiser, x, high), low)
    assert torch.equal(two_stage, S.heun(gaussian_denoiser, x, sigmas))


def test_discard_penultimate_sigma(schedule):
    sigmas = sch.karras(11, schedule)
    d = S.discard_penultimate_sigma(sigmas)
    assert len(d) == 11 and d[-1] == 0 and torch.equal(d[:-1], sigmas[:-2])
