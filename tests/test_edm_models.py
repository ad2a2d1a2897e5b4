"""Model formats beyond SDXL's eps/v on the discrete schedule: continuous-EDM models (Playground v2.5's
`edm_mean`/`edm_std`, CosXL's `edm_vpred.*`), x0-prediction (SDXL-Lightning 1-step), and UNet-only override
files (`--unet`), on tiny random-weight files in the real layouts.

References: diffusers' EDMDPMSolverMultistepScheduler inside StableDiffusionXLPipeline (VAE config with
latents_mean/latents_std, as Playground's diffusers folder has) and EulerDiscreteScheduler with
prediction_type="sample". Tolerances (fp32): latents within 1e-4, 8-bit images PSNR >= 40 dB.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from reference import diffusers_base_pipeline, psnr, to_uint8

MEAN = (-1.6574, 1.886, -1.383, 2.5155)
STD = (8.4927, 5.9022, 6.5498, 5.2299)
PROMPT = "a photo of a red cat"


def _write(path, ck, extra=None, record_config=True):
    from sdxl.weights.checkpoint import config_metadata, single_file_state
    from sdxl.weights.io import save_safetensors

    state = single_file_state(ck.config, ck.parts)
    state.update(extra or {})
    return save_safetensors(state, path, config_metadata(ck.config) if record_config else {})


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from sdxl.models.config import tiny_config
    from sdxl.weights.checkpoint import random_checkpoint
    from sdxl.weights.diffusers_layout import unet_sgm_to_diffusers
    from sdxl.weights.io import save_safetensors

    d = tmp_path_factory.mktemp("edm_models")
    base = random_checkpoint(tiny_config("base"), seed=31)
    other = random_checkpoint(tiny_config("base"), seed=32)  # the "Lightning" UNet
    refiner = random_checkpoint(tiny_config("refiner"), seed=33)
    out = {"base": _write(d / "base.safetensors", base)}
    out["playground"] = _write(d / "playground.safetensors", base, {
        "edm_mean": torch.tensor(MEAN).view(1, 4, 1, 1), "edm_std": torch.tensor(STD).view(1, 4, 1, 1)})
    out["cosxl"] = _write(d / "cosxl.safetensors", base, {
        "edm_vpred.sigma_max": torch.tensor(120.0), "edm_vpred.sigma_min": torch.tensor(0.002)})
    unet = {"model.diffusion_model." + k: v for k, v in other.parts["unet"].items()}
    out["unet_official"] = save_safetensors(unet, d / "unet_official.safetensors", {})
    out["unet_diffusers"] = save_safetensors(
        unet_sgm_to_diffusers(dict(other.parts["unet"]), other.config.unet), d / "unet_diffusers.safetensors",
        {"format": "pt"})
    merged = random_checkpoint(tiny_config("base"), seed=31)
    merged.parts["unet"] = other.parts["unet"]
    out["merged"] = _write(d / "merged.safetensors", merged)
    out["refiner_unet"] = save_safetensors(
        {"model.diffusion_model." + k: v for k, v in refiner.parts["unet"].items()},
        d / "refiner_unet.safetensors", {})
    out["vae_only"] = save_safetensors({"first_stage_model." + k: v for k, v in base.parts["vae"].items()},
                                       d / "vae_only.safetensors", {})
    out["junk"] = save_safetensors({"foo.weight": torch.zeros(3)}, d / "junk.safetensors", {})
    return out


# ------------------------------------------------------------------------------------------------ detection
def test_playground_detected_as_edm_with_latent_statistics(files):
    from sdxl.weights.checkpoint import read_checkpoint

    cfg = read_checkpoint(files["playground"]).config
    assert cfg.edm == (0.002, 80.0, 0.5)
    assert cfg.prediction == "eps"
    assert cfg.vae.scale_factor == 0.5
    assert cfg.vae.latents_mean == pytest.approx(MEAN) and cfg.vae.latents_std == pytest.approx(STD)
    plain = read_checkpoint(files["base"]).config
    assert plain.edm is None and plain.vae.latents_mean is None and plain.vae.scale_factor == 0.13025


def test_cosxl_edm_vpred_detected_as_v_on_edm(files):
    from sdxl.sampling.denoiser import EDMSchedule, schedule_for_config
    from sdxl.weights.checkpoint import read_checkpoint

    cfg = read_checkpoint(files["cosxl"]).config
    assert cfg.prediction == "v"
    assert cfg.edm == pytest.approx((0.002, 120.0, 1.0))
    assert cfg.vae.latents_mean is None  # CosXL keeps SDXL's latent scale
    sched = schedule_for_config(cfg)
    assert isinstance(sched, EDMSchedule)
    assert sched.sigma_max == pytest.approx(120.0) and sched.sigma_min == pytest.approx(0.002)


def test_edm_config_round_trips_through_our_metadata(files, tmp_path):
    from sdxl.weights.checkpoint import read_checkpoint, write_single_file

    ck = read_checkpoint(files["playground"])
    out = write_single_file(ck, tmp_path / "copy.safetensors")
    assert read_checkpoint(out).config == ck.config


def test_bad_edm_marker_is_one_line_error(files, tmp_path):
    from sdxl.weights.checkpoint import read_checkpoint
    from sdxl.weights.io import CheckpointError

    ck = read_checkpoint(files["base"])
    bad = _write(tmp_path / "bad.safetensors", ck, {"edm_vpred.sigma_max": torch.tensor(float("nan"))})
    with pytest.raises(CheckpointError, match=r"bad\.safetensors: tensor edm_vpred\.sigma_max") as e:
        read_checkpoint(bad)
    assert "\n" not in str(e.value)


# ------------------------------------------------------------------------------------------------ denoisers
@pytest.mark.parametrize("prediction,diffusers_type,sigma_data",
                         [("eps", "epsilon", 0.5), ("v", "v_prediction", 1.0)])
def test_edm_preconditioning_matches_diffusers(prediction, diffusers_type, sigma_data):
    """c_in, c_noise, c_skip, c_out of our EDM denoiser = EDMDPMSolverMultistepScheduler's precondition_*."""
    from diffusers import EDMDPMSolverMultistepScheduler

    from sdxl.sampling.denoiser import EDMSchedule, ModelDenoiser

    sched = EDMDPMSolverMultistepScheduler(sigma_min=0.002, sigma_max=80.0, sigma_data=sigma_data,
                                           prediction_type=diffusers_type)
    seen = {}

    def model_fn(x_in, t):
        seen["x_in"], seen["t"] = x_in, t
        return torch.sin(3 * x_in) + 0.1 * t.view(-1, 1, 1, 1)

    den = ModelDenoiser(model_fn, EDMSchedule(0.002, 80.0, sigma_data), prediction=prediction)
    x = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(0)) * 5
    for sigma in (0.01, 0.7, 14.0, 80.0):
        ours = den(x, sigma)
        s = torch.tensor(sigma)
        x_in = sched.precondition_inputs(x, s)
        t = sched.precondition_noise(s)
        ref = sched.precondition_outputs(x, model_fn(x_in, t.expand(2)), s)
        torch.testing.assert_close(seen["x_in"], x_in, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(seen["t"], t.expand(2).float(), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_x0_prediction_returns_the_model_output():
    from sdxl.sampling.denoiser import DiscreteSchedule, EDMSchedule, ModelDenoiser

    x = torch.randn(1, 4, 2, 2)
    for sched in (DiscreteSchedule(), EDMSchedule()):
        den = ModelDenoiser(lambda x_in, t: x_in * 2 + 1, sched, prediction="x0")
        c_in = 1 / (3.0**2 + (0.25 if isinstance(sched, EDMSchedule) else 1.0)) ** 0.5
        torch.testing.assert_close(den(x, 3.0), x * c_in * 2 + 1)


# ------------------------------------------------------------------------------------------------ sampling
def _ours(path, tmp_path, extra, name="ours", unet=None):
    from sdxl.cli import app

    out, lat = tmp_path / f"{name}.png", tmp_path / f"{name}.safetensors"
    args = ["generate", PROMPT, "--model", str(path), "--width", "64", "--height", "64", "--cfg", "5",
            "--seed", "42", "--out", str(out), "--save-latents", str(lat), "--quiet", *extra]
    if unet is not None:
        args += ["--unet", str(unet)]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    from sdxl.weights.io import open_tensors

    return np.asarray(Image.open(out).convert("RGB")), open_tensors(lat)["latents"].clone()


def test_playground_sampling_matches_diffusers_edm_dpmsolver(files, tmp_path):
    """`sdxl generate` on the Playground-layout file (automatic schedule = Karras on [0.002, 80], dpmpp_2m)
    = StableDiffusionXLPipeline with EDMDPMSolverMultistepScheduler and the VAE's latents_mean/std."""
    from diffusers import EDMDPMSolverMultistepScheduler

    ours, ours_lat = _ours(files["playground"], tmp_path, ["--steps", "6", "--sampler", "dpmpp_2m"])
    sched = EDMDPMSolverMultistepScheduler(sigma_min=0.002, sigma_max=80.0, sigma_data=0.5,
                                           sigma_schedule="karras", prediction_type="epsilon",
                                           algorithm_type="dpmsolver++", solver_order=2,
                                           final_sigmas_type="zero")
    pipe = diffusers_base_pipeline(files["playground"], tmp_path, scheduler=sched)
    pipe.vae.register_to_config(latents_mean=list(MEAN), latents_std=list(STD), scaling_factor=0.5)
    # both start from noise * sqrt(sigma_max^2 + 1) (diffusers' init_noise_sigma, ComfyUI's max_denoise)
    kw = dict(negative_prompt=None, num_inference_steps=6, guidance_scale=5.0, width=64, height=64)
    with torch.no_grad():
        ref_lat = pipe(PROMPT, output_type="latent", generator=torch.Generator().manual_seed(42), **kw).images
        ref = pipe(PROMPT, output_type="np", generator=torch.Generator().manual_seed(42), **kw).images
    torch.testing.assert_close(ours_lat, ref_lat, rtol=0, atol=1e-4)
    assert ours.std() > 1.0
    assert psnr(ours, to_uint8(ref)[0]) >= 40.0


def test_x0_prediction_matches_diffusers_sample_prediction(files, tmp_path):
    """--prediction x0 with Euler on trailing timesteps (how SDXL-Lightning runs) = diffusers'
    EulerDiscreteScheduler(prediction_type="sample")."""
    from diffusers import EulerDiscreteScheduler

    for steps in (1, 2):
        ours, ours_lat = _ours(files["base"], tmp_path, ["--steps", str(steps), "--sampler", "euler",
                                                         "--schedule", "trailing", "--prediction", "x0"])
        sched = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       num_train_timesteps=1000, timestep_spacing="trailing",
                                       prediction_type="sample")
        pipe = diffusers_base_pipeline(files["base"], tmp_path, scheduler=sched)
        kw = dict(negative_prompt=None, num_inference_steps=steps, guidance_scale=5.0, width=64, height=64,
                  generator=torch.Generator("cpu").manual_seed(42))
        with torch.no_grad():
            ref_lat = pipe(PROMPT, output_type="latent", **kw).images
            kw["generator"] = torch.Generator("cpu").manual_seed(42)
            ref = pipe(PROMPT, output_type="np", **kw).images
        torch.testing.assert_close(ours_lat, ref_lat, rtol=0, atol=1e-4)
        assert psnr(ours, to_uint8(ref)[0]) >= 40.0
        eps, _ = _ours(files["base"], tmp_path, ["--steps", str(steps), "--sampler", "euler",
                                                 "--schedule", "trailing"], name="eps")
        assert psnr(ours, eps) < 40.0  # the prediction type changes the image


def test_x0_recorded_in_metadata(files, tmp_path):
    from sdxl.weights.checkpoint import read_checkpoint, write_single_file

    ck = read_checkpoint(files["base"])
    ck.config = replace(ck.config, prediction="x0")
    out = write_single_file(ck, tmp_path / "x0.safetensors")
    assert read_checkpoint(out).config.prediction == "x0"


# ------------------------------------------------------------------------------------------------ --unet
@pytest.mark.parametrize("layout", ["unet_official", "unet_diffusers"])
def test_unet_override_equals_hand_merged_checkpoint(files, layout):
    from sdxl.pipeline import SDXL

    merged = SDXL.load(files["merged"], fast=False)
    over = SDXL.load(files["base"], unet=files[layout], fast=False)
    base = SDXL.load(files["base"], fast=False)
    for k, v in merged.unet.state_dict().items():
        assert torch.equal(over.unet.state_dict()[k], v), k
    assert any(not torch.equal(base.unet.state_dict()[k], v) for k, v in merged.unet.state_dict().items())
    for k, v in merged.vae.state_dict().items():
        assert torch.equal(over.vae.state_dict()[k], v), k


def test_unet_override_cli_equals_merged(files, tmp_path):
    extra = ["--steps", "2", "--sampler", "euler", "--schedule", "trailing"]
    _, merged = _ours(files["merged"], tmp_path, extra, name="merged")
    _, over = _ours(files["base"], tmp_path, extra, name="over", unet=files["unet_diffusers"])
    _, plain = _ours(files["base"], tmp_path, extra, name="plain")
    assert torch.equal(over, merged)
    assert not torch.allclose(over, plain)


@pytest.mark.parametrize("bad,message", [
    ("vae_only", "not a UNet file"),
    ("junk", "not a UNet file"),
    ("refiner_unet", "another architecture"),
    ("missing", "no such file"),
])
def test_bad_unet_override_is_one_line_error(files, tmp_path, bad, message):
    from sdxl.cli import app

    path = files.get(bad, tmp_path / "missing.safetensors")
    res = CliRunner().invoke(app, ["generate", PROMPT, "--model", str(files["base"]), "--unet", str(path),
                                   "--width", "64", "--height", "64", "--steps", "1", "--quiet",
                                   "--out", str(tmp_path / "x.png")])
    assert res.exit_code != 0
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(path) in lines[0], res.output
    assert message in lines[0]
    assert not (tmp_path / "x.png").exists()


def test_diffusers_unet_of_other_architecture_is_refused(files, tmp_path):
    from sdxl.models.config import tiny_config
    from sdxl.weights.checkpoint import random_checkpoint, read_checkpoint, read_unet_override
    from sdxl.weights.diffusers_layout import unet_sgm_to_diffusers
    from sdxl.weights.io import CheckpointError, save_safetensors

    ref = random_checkpoint(tiny_config("refiner"), seed=1)
    path = save_safetensors(unet_sgm_to_diffusers(dict(ref.parts["unet"]), ref.config.unet),
                            tmp_path / "ref_unet.safetensors", {})
    with pytest.raises(CheckpointError, match="another architecture") as e:
        read_unet_override(path, read_checkpoint(files["base"]).config)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_edm_survives_a_diffusers_folder(files, tmp_path):
    """write_diffusers records the EDM scheduler and the VAE's latents_mean/std; read_diffusers reads them."""
    import json

    from sdxl.weights.checkpoint import read_checkpoint, write_diffusers

    ck = read_checkpoint(files["playground"])
    folder = write_diffusers(ck, tmp_path / "pg")
    sched = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert sched["_class_name"] == "EDMDPMSolverMultistepScheduler" and sched["sigma_data"] == 0.5
    assert json.loads((folder / "vae" / "config.json").read_text())["latents_std"] == pytest.approx(STD)
    back = read_checkpoint(folder).config
    assert back.edm == ck.config.edm and back.vae.latents_mean == pytest.approx(MEAN)
    assert back.vae.scale_factor == 0.5 and back.prediction == "eps"
