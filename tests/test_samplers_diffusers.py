"""Parity with diffusers' schedulers (diffusers is a test-only reference; nothing in src/ imports it).

Each test runs the same toy eps-model `eps = tanh(W x_in + b) * (1 + t / 1000)` (W: a fixed random 1x1
conv over the 4 latent channels) through a diffusers scheduler loop (set_timesteps, scale_model_input,
model, step) and through our schedule + ModelDenoiser + sampler, and compares
  - the final latents (relative error = max|ours - theirs| / max|theirs| <= 1e-5),
  - every model call: the same number of calls, the same timestep (exactly for integer timesteps, to 1e-3 for
    the continuous ones of Karras schedules: both sides interpolate log sigma, diffusers in float32), and the
    same model input x * c_in (relative error <= 1e-5).
Our DiscreteSchedule is built with dtype=float32, the precision diffusers computes alphas_cumprod in.

Samplers in variance-preserving form (DDIM, DPM-Solver++, UniPC, LCM) keep x_vp = x / sqrt(1 + sigma^2) and
start from unit noise; ours starts from the same noise times sqrt(1 + sigma_0^2), and at sigma = 0 the two
coincide. Stochastic schedulers (Euler ancestral, DDIM with eta > 0, DPM-Solver++ SDE, LCM) are compared
draw for draw: diffusers draws one `randn(shape, generator)` per step in the same order as ours (its extra
draw after the last step multiplies a zero), so with equally seeded CPU generators the noise is identical.

Not compared, because exact parity is impossible: DPMSolverSDEScheduler (torchsde Brownian tree, ours draws
independent gaussians), KDPM2AncestralDiscreteScheduler (indexes sigma_down/sigma_up one step off from
k-diffusion's DPM2 ancestral, which ours follows).
"""

from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from sdxl.sampling import samplers as S  # noqa: E402
from sdxl.sampling import schedules as sch  # noqa: E402
from sdxl.sampling.denoiser import DiscreteSchedule, ModelDenoiser  # noqa: E402

SDXL_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="epsilon",
    timestep_spacing="leading",
    steps_offset=1,
)
RTOL = 1e-5
# diffusers 0.42 + numpy 2 warn about np.array(tensor) inside set_timesteps; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
SHAPE = (2, 4, 8, 8)


@pytest.fixture(scope="module")
def schedule() -> DiscreteSchedule:
    return DiscreteSchedule(dtype=torch.float32)


class ToyModel:
    """A fixed random eps-model that records what it is called with."""

    def __init__(self, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.w = torch.randn(4, 4, generator=g) / 2
        self.b = torch.randn(4, generator=g) * 0.1
        self.calls: list[tuple[torch.Tensor, float]] = []

    def __call__(self, x_in: torch.Tensor, t) -> torch.Tensor:
        t = torch.as_tensor(t).to(torch.float32).reshape(-1)
        self.calls.append((x_in.detach().clone(), float(t[0])))
        h = torch.einsum("oc,bchw->bohw", self.w, x_in) + self.b.view(1, -1, 1, 1)
        return torch.tanh(h) * (1 + t.view(-1, 1, 1, 1) / 1000)


def _noise(seed: int = 1) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def run_diffusers(scheduler, n: int, noise: torch.Tensor, seed: int | None = None, **step_kwargs):
    model = ToyModel()
    if seed is not None:  # only the stochastic schedulers' step() takes a generator
        step_kwargs["generator"] = torch.Generator().manual_seed(seed)
    scheduler.set_timesteps(n)
    x = noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        x_in = scheduler.scale_model_input(x, t)
        eps = model(x_in, t)
        x = scheduler.step(eps, t, x, **step_kwargs).prev_sample
    return x, model.calls


def run_ours(sampler: str, sigmas: torch.Tensor, x: torch.Tensor, schedule: DiscreteSchedule,
             seed: int | None = None, prediction: str = "eps", wrap=None, **options):
    model = ToyModel()
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    quantize = options.pop("quantize", False)
    interpolation = options.pop("interpolation", "log")
    denoiser = ModelDenoiser(model, schedule, prediction=prediction, quantize=quantize,
                             interpolation=interpolation)
    if wrap is not None:
        denoiser = wrap(denoiser)
    out = S.SAMPLERS[sampler](denoiser, x, sigmas, generator=generator, **options)
    return out, model.calls


def assert_same_run(ours, theirs, integer_timesteps: bool):
    (x_ours, calls_ours), (x_theirs, calls_theirs) = ours, theirs
    assert len(calls_ours) == len(calls_theirs)
    for i, ((xi_o, t_o), (xi_t, t_t)) in enumerate(zip(calls_ours, calls_theirs)):
        if integer_timesteps:
            assert t_o == t_t, f"call {i}: timestep {t_o} != {t_t}"
        else:
            assert abs(t_o - t_t) <= 1e-3, f"call {i}: timestep {t_o} != {t_t}"
        assert _rel(xi_o, xi_t) <= RTOL, f"call {i}: model input differs by {_rel(xi_o, xi_t):.2e}"
    assert _rel(x_ours, x_theirs) <= RTOL, f"final latents differ by {_rel(x_ours, x_theirs):.2e}"


def _sigmas_from_timesteps(timesteps, schedule: DiscreteSchedule) -> torch.Tensor:
    """Integer diffusers timesteps -> our sigmas (exact table values) + the final 0."""
    sig = schedule.t_to_sigma(torch.as_tensor(timesteps, dtype=torch.float64))
    return torch.cat([sig, sig.new_zeros(1)])


# ----------------------------------------------------------------------------------------------- schedules
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("n", [1, 7, 25, 50])
def test_spacing_sigmas_match_euler_scheduler(schedule, spacing, n):
    """Our leading/trailing/linspace sigmas are EulerDiscreteScheduler's (float32-exact, rtol 1e-6)."""
    ref = diffusers.EulerDiscreteScheduler(**{**SDXL_CONFIG, "timestep_spacing": spacing})
    ref.set_timesteps(n)
    ours = sch.get_sigmas(spacing, n, schedule)
    torch.testing.assert_close(ours, ref.sigmas, rtol=1e-6, atol=0)


def test_karras_sigmas_match_dpm_solver(schedule):
    """karras(n) over the model's sigma range == DPMSolverMultistepScheduler(use_karras_sigmas), rtol 1e-6."""
    ref = diffusers.DPMSolverMultistepScheduler(**SDXL_CONFIG, use_karras_sigmas=True)
    ref.set_timesteps(20)
    torch.testing.assert_close(sch.karras(20, schedule), ref.sigmas, rtol=1e-6, atol=0)


def test_exponential_sigmas_match_dpm_solver(schedule):
    """exponential(n) is DPMSolverMultistepScheduler(use_exponential_sigmas) (rtol 1e-6)."""
    ref = diffusers.DPMSolverMultistepScheduler(**SDXL_CONFIG, use_exponential_sigmas=True)
    ref.set_timesteps(15)
    torch.testing.assert_close(sch.exponential(15, schedule), ref.sigmas, rtol=1e-6, atol=0)


# ------------------------------------------------------------------------------------- Euler-family loops
@pytest.mark.parametrize("n", [30, 50])
def test_euler_leading(schedule, n):
    """Euler + leading == EulerDiscreteScheduler with SDXL's default config (timesteps 981, 961, ...)."""
    ref = diffusers.EulerDiscreteScheduler(**SDXL_CONFIG)
    noise = _noise()
    theirs = run_diffusers(ref, n, noise)
    sigmas = sch.leading(n, schedule)
    ours = run_ours("euler", sigmas, noise * (1 + sigmas[0] ** 2) ** 0.5, schedule)
    assert_same_run(ours, theirs, integer_timesteps=True)


def test_euler_v_prediction(schedule):
    """The v-prediction branch of ModelDenoiser == EulerDiscreteScheduler(prediction_type="v_prediction")."""
    ref = diffusers.EulerDiscreteScheduler(**{**SDXL_CONFIG, "prediction_type": "v_prediction"})
    noise = _noise()
    theirs = run_diffusers(ref, 20, noise)
    sigmas = sch.leading(20, schedule)
    ours = run_ours("euler", sigmas, noise * (1 + sigmas[0] ** 2) ** 0.5, schedule, prediction="v")
    assert_same_run(ours, theirs, integer_timesteps=True)


def test_zero_terminal_snr_schedule_matches_diffusers():
    """DiscreteSchedule(zero_terminal_snr=True) == diffusers' rescale_zero_terminal_snr (alphabar, rtol 1e-5,
    last entry exactly 0) and EulerDiscreteScheduler(rescale_betas_zero_snr=True)'s sigma table (its last
    alphabar is 2^-24, so sigma_max = 4096; rtol 5e-5: diffusers goes from the rescaled alphabar back to betas
    and takes a float32 cumulative product of them again, which moves the smallest sigmas by up to 2.2e-5)."""
    from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr

    ours = DiscreteSchedule(dtype=torch.float32, zero_terminal_snr=True)
    plain = DiscreteSchedule(dtype=torch.float32)
    betas = rescale_zero_terminal_snr(plain.betas.clone())
    theirs = torch.cumprod(1.0 - betas, dim=0)
    assert ours.alphas_cumprod[-1] == 0 and theirs[-1] == 0
    torch.testing.assert_close(ours.alphas_cumprod, theirs, rtol=1e-5, atol=1e-9)
    assert abs(float(ours.alphas_cumprod[0]) - float(plain.alphas_cumprod[0])) < 1e-7  # first level kept
    ref = diffusers.EulerDiscreteScheduler(**{**SDXL_CONFIG, "rescale_betas_zero_snr": True})
    torch.testing.assert_close(ours.sigmas, ref.sigmas[:-1].flip(0), rtol=5e-5, atol=0)
    assert abs(ours.sigma_max - 4096.0) < 1e-2 and ours.sigma_min == plain.sigma_min


def test_euler_trailing_zero_terminal_snr_v():
    """A v-prediction, zero-terminal-SNR model: Euler + trailing == EulerDiscreteScheduler(
    rescale_betas_zero_snr=True, timestep_spacing="trailing") (the configuration Lin et al. recommend). The
    first call is at t = 999, pure noise."""
    schedule = DiscreteSchedule(dtype=torch.float32, zero_terminal_snr=True)
    ref = diffusers.EulerDiscreteScheduler(**{**SDXL_CONFIG, "timestep_spacing": "trailing",
                                              "rescale_betas_zero_snr": True,
                                              "prediction_type": "v_prediction"})
    noise = _noise()
    theirs = run_diffusers(ref, 12, noise)
    sigmas = sch.trailing(12, schedule)
    ours = run_ours("euler", sigmas, noise * sigmas[0], schedule, prediction="v")
    assert ours[1][0][1] == 999.0
    assert_same_run(ours, theirs, integer_timesteps=True)


def test_euler_trailing(schedule):
    """Euler + trailing == EulerDiscreteScheduler(timestep_spacing="trailing"); its init noise is
    sigma_max."""
    ref = diffusers.EulerDiscreteScheduler(**{**SDXL_CONFIG, "timestep_spacing": "trailing"})
    noise = _noise()
    theirs = run_diffusers(ref, 25, noise)
    sigmas = sch.trailing(25, schedule)
    ours = run_ours("euler", sigmas, noise * sigmas[0], schedule)
    assert_same_run(ours, theirs, integer_timesteps=True)


def test_euler_linspace(schedule):
    """Euler + linspace == EulerDiscreteScheduler(timestep_spacing="linspace"): fractional timesteps,
    which the denoiser recovers by inverting diffusers' linear-in-sigma interpolation
    (interpolation="linear")."""
    ref = diffusers.EulerDiscreteScheduler(**{**SDXL_CONFIG, "timestep_spacing": "linspace"})
    noise = _noise()
    theirs = run_diffusers(ref, 20, noise)
    sigmas = sch.linspace(20, schedule)
    ours = run_ours("euler", sigmas, noise * sigmas[0], schedule, interpolation="linear")
    assert_same_run(ours, theirs, integer_timesteps=False)


def test_euler_karras(schedule):
    """Euler + Karras == EulerDiscreteScheduler(use_karras_sigmas=True). diffusers' Euler ramps between the
    sigmas of its leading timesteps (t=981 .. 1), so those are passed as sigma_max/min; the model sees the
    continuous log-interpolated timestep."""
    ref = diffusers.EulerDiscreteScheduler(**SDXL_CONFIG, use_karras_sigmas=True)
    noise = _noise()
    theirs = run_diffusers(ref, 20, noise)
    spaced = sch.leading(20, schedule)
    sigmas = sch.karras(20, schedule, sigma_min=float(spaced[-2]), sigma_max=float(spaced[0]))
    ours = run_ours("euler", sigmas, noise * (1 + sigmas[0] ** 2) ** 0.5, schedule)
    assert_same_run(ours, theirs, integer_timesteps=False)


def test_euler_ancestral_same_noise(schedule):
    """Euler a + leading == EulerAncestralDiscreteScheduler, draw for draw with equally seeded generators."""
    ref = diffusers.EulerAncestralDiscreteScheduler(**SDXL_CONFIG)
    noise = _noise()
    theirs = run_diffusers(ref, 25, noise, seed=7)
    sigmas = sch.leading(25, schedule)
    ours = run_ours("euler_a", sigmas, noise * (1 + sigmas[0] ** 2) ** 0.5, schedule, seed=7)
    assert_same_run(ours, theirs, integer_timesteps=True)


def test_heun(schedule):
    """Heun + leading == HeunDiscreteScheduler: 2n - 1 model calls, the corrector at the next timestep."""
    ref = diffusers.HeunDiscreteScheduler(**SDXL_CONFIG)
    noise = _noise()
    theirs = run_diffusers(ref, 15, noise)
    sigmas = sch.leading(15, schedule)
    ours = run_ours("heun", sigmas, noise * (1 + sigmas[0] ** 2) ** 0.5, schedule)
    assert len(theirs[1]) == 2 * 15 - 1
    assert_same_run(ours, theirs, integer_timesteps=True)


def test_dpm_2(schedule):
    """DPM2 + leading == KDPM2DiscreteScheduler: midpoint calls at the continuous timestep of sqrt(s s')."""
    ref = diffusers.KDPM2DiscreteScheduler(**SDXL_CONFIG)
    noise = _noise()
    theirs = run_diffusers(ref, 12, noise)
    sigmas = sch.leading(12, schedule)
    ours = run_ours("dpm_2", sigmas, noise * (1 + sigmas[0] ** 2) ** 0.5, schedule)
    assert_same_run(ours, theirs, integer_timesteps=False)


def test_lms(schedule):
    """LMS (order 4) + leading == LMSDiscreteScheduler (its scipy-quad coefficients vs our exact
    integrals)."""
    ref = diffusers.LMSDiscreteScheduler(**SDXL_CONFIG)
    noise = _noise()
    theirs = run_diffusers(ref, 20, noise)
    sigmas = sch.leading(20, schedule)
    ours = run_ours("lms", sigmas, noise * (1 + sigmas[0] ** 2) ** 0.5, schedule)
    assert_same_run(ours, theirs, integer_timesteps=True)


# --------------------------------------------------------------------------------- VP-form schedulers
def _vp_start(noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """diffusers' VP schedulers start from unit noise x_vp; the same point in sigma space is x_vp *
    sqrt(1+s^2)."""
    return noise * (1 + sigmas[0] ** 2) ** 0.5


@pytest.mark.parametrize("n", [10, 20])
@pytest.mark.parametrize("flags", [{}, {"lower_order_final": False}, {"euler_at_final": True}])
def test_dpmpp_2m_karras(schedule, n, flags):
    """DPM++ 2M Karras == DPMSolverMultistepScheduler(dpmsolver++, order 2, use_karras_sigmas). diffusers
    rounds the Karras timesteps (quantize=True). With a final sigma of 0 diffusers always makes the last step
    first order, whatever lower_order_final / euler_at_final say, as ours does."""
    ref = diffusers.DPMSolverMultistepScheduler(
        **SDXL_CONFIG, algorithm_type="dpmsolver++", solver_order=2, use_karras_sigmas=True, **flags
    )
    noise = _noise()
    theirs = run_diffusers(ref, n, noise)
    sigmas = sch.karras(n, schedule)
    ours = run_ours("dpmpp_2m", sigmas, _vp_start(noise, sigmas), schedule, quantize=True)
    assert_same_run(ours, theirs, integer_timesteps=True)


def test_dpmpp_2m_own_leading_spacing(schedule):
    """DPM-Solver's own "leading" spacing (1000 // (n + 1), unlike Euler's); sigmas from its timesteps."""
    ref = diffusers.DPMSolverMultistepScheduler(**SDXL_CONFIG, algorithm_type="dpmsolver++", solver_order=2)
    ref.set_timesteps(20)
    sigmas = _sigmas_from_timesteps(ref.timesteps, schedule)
    torch.testing.assert_close(sigmas, ref.sigmas, rtol=1e-6, atol=0)
    noise = _noise()
    theirs = run_diffusers(ref, 20, noise)
    ours = run_ours("dpmpp_2m", sigmas, _vp_start(noise, sigmas), schedule)
    assert_same_run(ours, theirs, integer_timesteps=True)


def test_dpmpp_2m_sde_karras_same_noise(schedule):
    """DPM++ 2M SDE Karras == DPMSolverMultistepScheduler(sde-dpmsolver++, midpoint), draw for draw."""
    ref = diffusers.DPMSolverMultistepScheduler(
        **SDXL_CONFIG, algorithm_type="sde-dpmsolver++", solver_order=2, use_karras_sigmas=True
    )
    noise = _noise()
    theirs = run_diffusers(ref, 20, noise, seed=3)
    sigmas = sch.karras(20, schedule)
    ours = run_ours("dpmpp_2m_sde", sigmas, _vp_start(noise, sigmas), schedule, seed=3, quantize=True)
    assert_same_run(ours, theirs, integer_timesteps=True)


@pytest.mark.parametrize("set_alpha_to_one", [True, False])
def test_ddim(schedule, set_alpha_to_one):
    """DDIM (eta 0) + leading == DDIMScheduler. With set_alpha_to_one=False (SDXL's config) diffusers'
    last step goes to alphabar_0, i.e. sigma(t=0) = 0.029 instead of 0; the schedule is adjusted the same
    way and the result compared in VP scale."""
    ref = diffusers.DDIMScheduler(**SDXL_CONFIG, set_alpha_to_one=set_alpha_to_one, clip_sample=False)
    noise = _noise()
    x_vp, calls = run_diffusers(ref, 25, noise)
    sigmas = sch.leading(25, schedule)
    if not set_alpha_to_one:
        sigmas[-1] = schedule.sigmas[0]
    x, ours_calls = run_ours("ddim", sigmas, _vp_start(noise, sigmas), schedule)
    x_ours_vp = x / (1 + sigmas[-1] ** 2) ** 0.5
    assert_same_run((x_ours_vp, ours_calls), (x_vp, calls), integer_timesteps=True)


def test_ddim_eta_same_noise(schedule):
    """DDIM with eta = 1 == DDIMScheduler.step(eta=1), draw for draw (DDIM's eta-noise is
    our ancestral split)."""
    ref = diffusers.DDIMScheduler(**SDXL_CONFIG, set_alpha_to_one=True, clip_sample=False)
    noise = _noise()
    theirs = run_diffusers(ref, 25, noise, seed=5, eta=1.0)
    sigmas = sch.leading(25, schedule)
    ours = run_ours("ddim", sigmas, _vp_start(noise, sigmas), schedule, seed=5, eta=1.0)
    assert_same_run(ours, theirs, integer_timesteps=True)


@pytest.mark.parametrize("order", [2, 3])
def test_unipc_karras(schedule, order):
    """UniPC (bh2) Karras == UniPCMultistepScheduler(use_karras_sigmas, predict_x0, corrector on), orders 2
    and 3."""
    ref = diffusers.UniPCMultistepScheduler(**SDXL_CONFIG, solver_order=order, use_karras_sigmas=True)
    noise = _noise()
    theirs = run_diffusers(ref, 15, noise)
    sigmas = sch.karras(15, schedule)
    ours = run_ours("unipc", sigmas, _vp_start(noise, sigmas), schedule, quantize=True, order=order)
    assert_same_run(ours, theirs, integer_timesteps=True)


def test_unipc_bh1_karras(schedule):
    """UniPC bh1 == UniPCMultistepScheduler(solver_type="bh1") up to the last step. diffusers' bh1 step to
    sigma = 0 computes B(h) * 0 with B(h) = h = -inf and returns NaN, so the final latents cannot be compared:
    the sample before the last step is (in VP scale), every model call is, and our last step must return the
    last x0 estimate (the data-prediction step to sigma = 0)."""
    n = 15
    ref = diffusers.UniPCMultistepScheduler(**SDXL_CONFIG, solver_type="bh1", use_karras_sigmas=True)
    noise = _noise()
    model = ToyModel()
    ref.set_timesteps(n)
    x_vp = noise
    for t in ref.timesteps[:-1]:
        x_vp = ref.step(model(ref.scale_model_input(x_vp, t), t), t, x_vp).prev_sample
    sigmas = sch.karras(n, schedule)
    seen = {}

    def callback(i, sigma, x, denoised):
        seen[i] = (x, denoised)

    ours_model = ToyModel()
    denoiser = ModelDenoiser(ours_model, schedule, quantize=True)
    out = S.unipc_bh1(denoiser, _vp_start(noise, sigmas), sigmas, callback=callback)
    assert len(ours_model.calls) == n
    for (xi_o, t_o), (xi_t, t_t) in zip(ours_model.calls, model.calls):
        assert t_o == t_t and _rel(xi_o, xi_t) <= RTOL
    before_last = seen[n - 2][0] / (1 + sigmas[n - 1] ** 2) ** 0.5
    assert _rel(before_last, x_vp) <= RTOL
    assert torch.equal(out, seen[n - 1][1])


def test_unipc_own_leading_spacing(schedule):
    """UniPC (order 2, bh2) on UniPCMultistepScheduler's own leading timesteps."""
    ref = diffusers.UniPCMultistepScheduler(**SDXL_CONFIG)
    ref.set_timesteps(12)
    sigmas = _sigmas_from_timesteps(ref.timesteps, schedule)
    noise = _noise()
    theirs = run_diffusers(ref, 12, noise)
    ours = run_ours("unipc", sigmas, _vp_start(noise, sigmas), schedule)
    assert_same_run(ours, theirs, integer_timesteps=True)


def test_lcm_same_noise(schedule):
    """LCM == LCMScheduler, draw for draw, on LCMScheduler's own timesteps. diffusers applies the LCM boundary
    condition (c_skip, c_out at 10 t) inside the scheduler; k-diffusion, ComfyUI and A1111 (and ours) treat it
    as part of the model, so the test wraps the denoiser with the same scalings. What is checked is the
    sampler: jump to x0, re-noise to the next level, no noise after the last step."""
    ref = diffusers.LCMScheduler(**SDXL_CONFIG)
    ref.set_timesteps(4)
    sigmas = _sigmas_from_timesteps(ref.timesteps, schedule)

    def with_boundary_condition(denoiser):
        def d(x, sigma):
            t = schedule.sigma_to_t(sigma).reshape(-1, 1, 1, 1).to(torch.float64)
            scaled = t * 10.0
            c_skip = 0.25 / (scaled**2 + 0.25)
            c_out = scaled / (scaled**2 + 0.25) ** 0.5
            x_vp = x / (1 + sigma.reshape(-1, 1, 1, 1) ** 2) ** 0.5
            return (c_out * denoiser(x, sigma) + c_skip * x_vp).to(torch.float32)

        return d

    noise = _noise()
    theirs = run_diffusers(ref, 4, noise, seed=11)
    ours = run_ours("lcm", sigmas, _vp_start(noise, sigmas), schedule, seed=11, wrap=with_boundary_condition)
    assert_same_run(ours, theirs, integer_timesteps=True)


@pytest.mark.parametrize("gamma", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("n", [4, 8])
def test_tcd_same_noise(schedule, gamma, n):
    """TCD == TCDScheduler.step(eta=gamma), draw for draw, on TCDScheduler's own timesteps (n = 4:
    999, 759, 499, 259). Every model input (the latents entering each step, in VP scale) and the final
    latents agree to rtol 1e-5; the timesteps exactly. gamma 0.3 sends step 999 -> 759 through
    t_s = floor(0.7 * 759) = 531 and re-noises to 759; the last step ends, like diffusers', on the VP sample
    at t = 0 (both sides start from the same unit noise, ours scaled to sigma space)."""
    ref = diffusers.TCDScheduler(**SDXL_CONFIG)
    ref.set_timesteps(n)
    sigmas = _sigmas_from_timesteps(ref.timesteps, schedule)
    if n == 4:
        assert ref.timesteps.tolist() == [999, 759, 499, 259]
    noise = _noise()
    theirs = run_diffusers(ref, n, noise, seed=13, eta=gamma)
    ours = run_ours("tcd", sigmas, _vp_start(noise, sigmas), schedule, seed=13, quantize=True, eta=gamma)
    assert_same_run(ours, theirs, integer_timesteps=True)


@pytest.mark.parametrize(("prediction", "gamma", "timesteps"), [
    ("v", 0.5, [999, 850, 700, 500, 301, 120]),
    ("eps", 0.07, [999, 700, 500, 250]),  # t_s = floor(0.93 * 500): 465 in float32 (464 in float64)
])
def test_tcd_custom_timesteps(schedule, prediction, gamma, timesteps):
    """TCD with custom timesteps (TCDScheduler.set_timesteps(timesteps=...)), on a v-prediction model and on
    a gamma whose t_s depends on computing (1 - gamma) t in float32 as diffusers does: the same run,
    rtol 1e-5."""
    kind = {"v": "v_prediction", "eps": "epsilon"}[prediction]
    ref = diffusers.TCDScheduler(**{**SDXL_CONFIG, "prediction_type": kind})
    model = ToyModel()
    ref.set_timesteps(timesteps=timesteps)
    g = torch.Generator().manual_seed(21)
    noise = _noise()
    x = noise
    for t in ref.timesteps:
        x = ref.step(model(x, t), t, x, eta=gamma, generator=g).prev_sample
    sigmas = _sigmas_from_timesteps(timesteps, schedule)
    ours = run_ours("tcd", sigmas, _vp_start(noise, sigmas), schedule, seed=21, prediction=prediction,
                    quantize=True, eta=gamma)
    assert_same_run(ours, (x, model.calls), integer_timesteps=True)


def test_refiner_split_matches_denoising_end(schedule):
    """split_sigmas(0.8) cuts where diffusers' denoising_end=0.8 does: 50 leading steps -> base 40, refiner 10
    (cut-off timestep 200; base keeps t >= 200)."""
    ref = diffusers.EulerDiscreteScheduler(**SDXL_CONFIG)
    ref.set_timesteps(50)
    cutoff = round(1000 - 0.8 * 1000)
    base_steps = int((ref.timesteps >= cutoff).sum())
    high, low = S.split_sigmas(sch.leading(50, schedule), 0.8, schedule)
    assert (len(high) - 1, len(low) - 1) == (base_steps, 50 - base_steps) == (40, 10)
