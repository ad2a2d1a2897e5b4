"""Zero terminal SNR (Lin et al. 2024) end to end: the trainer's noising and loss weights, sampling with an
oracle model, the flag in every file layout and in requests, and decoder-only VAE training (which keeps a
latent space, hence the diffusion models trained on it). The schedule's and Euler's parity with diffusers are
in test_samplers_diffusers.py."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from sdxl.models.config import tiny_config
from sdxl.request import GenerationRequest, RequestError
from sdxl.sampling.denoiser import DiscreteSchedule
from sdxl.sampling.names import A1111_SCHEDULE_NAMES, automatic_schedule
from sdxl.train import losses as TL
from sdxl.train import runner as TR
from sdxl.train.config import ConfigError, TrainConfig
from test_train import make_images, tiny_run


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_images(tmp_path_factory.mktemp("data"))


def test_last_training_step_is_pure_noise_and_v_is_minus_x0():
    zs = DiscreteSchedule(zero_terminal_snr=True)
    x0, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = torch.tensor([999, 999])
    assert torch.equal(TL.add_noise(x0, eps, t, zs.alphas_cumprod), eps)
    torch.testing.assert_close(TL.prediction_target(x0, eps, t, zs.alphas_cumprod, "v"), -x0)
    # the standard schedule leaves 6.8% of the image in its last step: what the rescaling removes
    plain = DiscreteSchedule()
    assert 0.06 < float(plain.alphas_cumprod[-1].sqrt()) < 0.07
    # the SNR falls monotonically to exactly 0 and the betas stay valid probabilities
    assert bool((zs.alphas_cumprod[1:] < zs.alphas_cumprod[:-1]).all())
    assert bool(((zs.betas > 0) & (zs.betas <= 1)).all()) and float(zs.betas[-1]) == 1.0


def test_min_snr_floor_weights():
    """clamp(SNR, floor, gamma) in x0 units: the noisiest steps get weight `floor` instead of ~SNR (0 at
    t = 999 under zero terminal SNR); eps weights stay finite at SNR = 0."""
    ac = DiscreteSchedule(zero_terminal_snr=True).alphas_cumprod
    t = torch.tensor([0, 300, 800, 999])
    snr = (ac[t] / (1 - ac[t])).float()
    plain = TL.loss_weights(t, ac, "v", 5.0)
    floored = TL.loss_weights(t, ac, "v", 5.0, floor=1.0)
    torch.testing.assert_close(floored, snr.clamp(1.0, 5.0) / (snr + 1))
    assert plain[3] == 0 and plain[2] < 0.02 and floored[3] == 1.0 and floored[2] > 0.98
    assert floored[0] == plain[0]  # low noise: gamma rules either way
    eps = TL.loss_weights(t, ac, "eps", 5.0)
    assert torch.isfinite(eps).all() and eps[3] == 1.0
    with pytest.raises(ConfigError, match="min_snr_floor"):
        TrainConfig.from_dict({"loss": {"min_snr_gamma": 5.0, "min_snr_floor": 6.0}})


def test_oracle_samples_its_target_under_zero_terminal_snr():
    """A UNet that outputs the exact v target of a one-point data set (trainer's alphabar, 0 at t = 999) makes
    the pipeline, which reads the flag from the config, return that point: the first step at sigma = 4096
    is handled, and training and sampling agree on the rescaled schedule. With the flag off the sampler
    walks the other schedule and misses."""
    from sdxl.models.text import TextEncoders
    from sdxl.models.vae import AutoencoderKL
    from sdxl.pipeline import SDXL

    mc = dataclasses.replace(tiny_config(), prediction="v", zero_terminal_snr=True)
    ac = DiscreteSchedule(zero_terminal_snr=True).alphas_cumprod
    x0 = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    seen: list[float] = []

    class Oracle(nn.Module):
        dtype = torch.float32

        def forward(self, x, t, context, y):
            ti = torch.as_tensor(t).reshape(-1).round().long().expand(x.shape[0])
            seen.append(float(ti[0]))
            abar = ac[ti].float().reshape(-1, 1, 1, 1)
            eps = (x - abar.sqrt() * x0) / (1 - abar).sqrt()
            return TL.prediction_target(x0.expand_as(x), eps, ti, ac, "v")

    pipe = SDXL(mc, unet=Oracle(), vae=AutoencoderKL(mc.vae), text=TextEncoders(mc.text_l, mc.text_g))
    assert pipe.schedule.zero_terminal_snr
    for sampler, schedule in (("euler", "trailing"), ("dpmpp_2m", "karras")):
        seen.clear()
        req = GenerationRequest(prompt="x", width=32, height=32, steps=8, cfg=1.0, sampler=sampler,
                                schedule=schedule, seed=1)
        out = pipe.generate(req)
        assert seen[0] == 999.0
        assert (out.latents - x0).abs().max() < 1e-4
    off = pipe.generate(GenerationRequest(prompt="x", width=32, height=32, steps=8, cfg=1.0, sampler="euler",
                                          schedule="trailing", seed=1, zero_terminal_snr=False))
    assert (off.latents - x0).abs().max() > 1e-2


def test_flag_survives_every_file_layout(tmp_path):
    from sdxl.weights.checkpoint import random_checkpoint, read_checkpoint, write_diffusers, write_single_file
    from sdxl.weights.detect import detect

    mc = dataclasses.replace(tiny_config(), prediction="v", zero_terminal_snr=True)
    ck = random_checkpoint(mc, seed=0)
    single = write_single_file(ck, tmp_path / "m.safetensors")
    assert read_checkpoint(single).config.zero_terminal_snr
    folder = write_diffusers(ck, tmp_path / "diffusers")
    sched = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert sched["rescale_betas_zero_snr"] is True and sched["prediction_type"] == "v_prediction"
    back = read_checkpoint(folder).config
    assert back.zero_terminal_snr and back.prediction == "v"
    # a community file without our metadata: the empty "v_pred" / "ztsnr" marker tensors (ComfyUI's rule)
    plain = write_single_file(ck, tmp_path / "plain.safetensors", record_config=False)
    from sdxl.weights.io import open_tensors

    assert not detect(open_tensors(plain), {}).zero_terminal_snr
    tensors = {k: open_tensors(plain).get(k) for k in open_tensors(plain).keys()}
    save_file({**tensors, "v_pred": torch.zeros(0), "ztsnr": torch.zeros(0)}, tmp_path / "zsnr.safetensors")
    cfg = read_checkpoint(tmp_path / "zsnr.safetensors").config
    assert cfg.zero_terminal_snr and cfg.prediction == "v"


def test_request_field_is_checked():
    assert GenerationRequest(prompt="x", zero_terminal_snr=True).validate().zero_terminal_snr is True
    with pytest.raises(RequestError, match="zero_terminal_snr"):
        GenerationRequest(prompt="x", zero_terminal_snr="yes").validate()
    with pytest.raises(RequestError, match="zero_terminal_snr"):
        GenerationRequest(prompt="x", zero_terminal_snr=1).validate()


def test_automatic_schedule_is_trailing_on_a_zero_terminal_snr_model(tmp_path, tiny_files):
    """The request's default schedule, "automatic", is the sampler's own (Karras for DPM++ 2M) on a standard
    model and "trailing" on a zero-terminal-SNR one (the file's flag or the request's); a named schedule, or
    one implied by an A1111 sampler name, is kept. The resolved name is what the image records."""
    from sdxl.pipeline import SDXL
    from sdxl.weights.checkpoint import random_checkpoint, write_single_file

    assert GenerationRequest().schedule == "automatic"
    zs = write_single_file(random_checkpoint(dataclasses.replace(tiny_config(), prediction="v",
                                                                 zero_terminal_snr=True), seed=0),
                           tmp_path / "zs.safetensors")
    plain, zpipe = SDXL.load(tiny_files["base"]), SDXL.load(zs)

    def run(pipe, **kw):
        req = GenerationRequest(prompt="x", width=32, height=32, steps=2, seed=1, **kw)
        result = pipe.generate(req)
        assert req.schedule == (kw.get("schedule") or "automatic")  # the caller's request is unchanged
        return result.request.schedule, result.infos[0]

    schedule, info = run(zpipe)
    assert schedule == "trailing"
    assert f"Schedule type: {A1111_SCHEDULE_NAMES.get('trailing', 'trailing')}," in info
    assert run(plain)[0] == "karras"
    assert run(plain, zero_terminal_snr=True)[0] == "trailing"
    assert run(zpipe, zero_terminal_snr=False)[0] == "karras"
    assert run(zpipe, schedule="exponential")[0] == "exponential"
    assert run(zpipe, sampler="DPM++ 2M Karras")[0] == "karras"
    assert run(zpipe, sampler="euler")[0] == "trailing"
    assert run(plain, sampler="euler")[0] == automatic_schedule("euler")


def test_training_with_zero_terminal_snr_records_it(tmp_path, data):
    """model.zero_terminal_snr trains on the rescaled schedule (the trainer's alphabar ends at 0) and the
    exported file says so; eps-prediction is refused before anything is built."""
    from sdxl.weights.checkpoint import read_checkpoint

    with pytest.raises(ConfigError, match="v-prediction"):
        TR.run(tiny_run(tmp_path / "eps", data, 1, model={"preset": "tiny", "zero_terminal_snr": True}))
    cfg = tiny_run(tmp_path / "out", data, 3, model={"preset": "tiny", "zero_terminal_snr": True,
                                                      "prediction": "v"},
                   loss={"min_snr_gamma": 5.0, "min_snr_floor": 1.0, "timestep_min": 990})
    result = TR.run(cfg)
    assert all(torch.isfinite(torch.tensor(result.losses)))
    mc = read_checkpoint(result.exported).config
    assert mc.zero_terminal_snr and mc.prediction == "v"


def test_decoder_only_vae_training_keeps_the_latent_space(tmp_path, data):
    """vae.decoder_only: the encoder (hence every latent) and the scale factor are unchanged, the decoder
    learns (loss falls), and the patch path decodes a crop of the whole image's latents."""
    from sdxl.weights.checkpoint import read_checkpoint
    from sdxl.weights.io import open_tensors

    first = TR.run(tiny_run(tmp_path / "vae", data, 4, train={"task": "vae"}))
    start = open_tensors(first.exported)
    cfg = tiny_run(tmp_path / "dec", data, 30, train={"task": "vae"}, model={"preset": "tiny",
                   "vae": str(first.exported)}, vae={"decoder_only": True, "patch_size": 16})
    result = TR.run(cfg)
    end = open_tensors(result.exported)
    enc = [k for k in start.keys() if ".encoder." in k or k.endswith(("quant_conv.weight", "quant_conv.bias"))
           and "post_quant" not in k]
    dec = [k for k in start.keys() if ".decoder." in k]
    assert enc and dec
    assert all(torch.equal(start.get(k), end.get(k)) for k in enc)
    assert sum(not torch.equal(start.get(k), end.get(k)) for k in dec) > len(dec) // 2
    assert sum(result.losses[:5]) > 1.2 * sum(result.losses[-5:]), result.losses
    sf = read_checkpoint(first.exported).config.vae.scale_factor
    assert read_checkpoint(result.exported).config.vae.scale_factor == sf


def test_decoder_only_vae_training_reads_the_frozen_encoders_latents_from_the_cache(tmp_path, data):
    """vae.decoder_only + data.cache_latents: each image is encoded once, later steps read its moments back,
    and the losses are those of encoding every step (the same posterior, the same noise)."""
    first = TR.run(tiny_run(tmp_path / "vae", data, 4, train={"task": "vae"}))

    def run(name: str, cache: bool):
        return TR.run(tiny_run(tmp_path / name, data, 12, train={"task": "vae"},
                               model={"preset": "tiny", "vae": str(first.exported)},
                               data={"cache_latents": cache, "flip_prob": 0.0},
                               vae={"decoder_only": True, "patch_size": 16}))

    plain, cached = run("plain", False), run("cached", True)
    entries = list((tmp_path / "cached" / "cache" / "latents").rglob("*.safetensors"))
    n_images = len(list(Path(data).glob("*.png")))
    assert len(entries) == n_images  # one entry per prepared image, however many steps saw it
    assert torch.allclose(torch.tensor(plain.losses), torch.tensor(cached.losses), rtol=1e-4, atol=1e-6), \
        (plain.losses, cached.losses)


def test_decoder_only_training_can_widen_the_decoder(tmp_path, data):
    """vae.decoder_ch_mult: a fresh, wider decoder learns on the kept encoder; the export records its widths,
    detection reads them back off the tensors alone, and a diffusers folder (one width list) is refused."""
    from sdxl.weights.checkpoint import read_checkpoint, write_diffusers, write_single_file
    from sdxl.weights.io import open_tensors

    first = TR.run(tiny_run(tmp_path / "vae", data, 4, train={"task": "vae"}))
    narrow = read_checkpoint(first.exported).config.vae
    with pytest.raises(ConfigError, match="decoder_only"):
        TR.run(tiny_run(tmp_path / "bad", data, 1, train={"task": "vae"},
                        vae={"decoder_ch_mult": [1, 2, 4, 4]},
                        model={"preset": "tiny", "vae": str(first.exported)}))
    for bad in ([1, 2, 4], [1, 2.5, 4, 4], [1, 0, 4, 4]):  # a level missing, not whole numbers >= 1
        with pytest.raises(ConfigError, match=r"vae.decoder_ch_mult \["):
            TR.run(tiny_run(tmp_path / "bad", data, 1, train={"task": "vae"},
                            vae={"decoder_only": True, "decoder_ch_mult": bad},
                            model={"preset": "tiny", "vae": str(first.exported)}))
    result = TR.run(tiny_run(tmp_path / "wide", data, 30, train={"task": "vae"},
                             model={"preset": "tiny", "vae": str(first.exported)},
                             vae={"decoder_only": True, "patch_size": 16, "decoder_ch_mult": [1, 2, 4, 4]}))
    assert sum(result.losses[:5]) > 1.2 * sum(result.losses[-5:]), result.losses
    ck = read_checkpoint(result.exported)
    wide = ck.config.vae
    assert wide.decoder_ch_mult == (1, 2, 4, 4) and wide.ch_mult == narrow.ch_mult
    assert wide.decoder_widths == [narrow.ch * m for m in (1, 2, 4, 4)]
    assert wide.decoder_widths != [narrow.ch * m for m in narrow.ch_mult]
    start, end = open_tensors(first.exported), open_tensors(result.exported)
    enc = [k for k in start.keys() if ".encoder." in k or k.endswith(("first_stage_model.quant_conv.weight",
                                                                         "first_stage_model.quant_conv.bias"))]
    assert enc and all(torch.equal(start.get(k), end.get(k)) for k in enc)
    bare = write_single_file(ck, tmp_path / "bare.safetensors", record_config=False)
    assert read_checkpoint(bare).config.vae.decoder_ch_mult == (1, 2, 4, 4)
    with pytest.raises(ValueError, match="wider"):
        write_diffusers(ck, tmp_path / "diffusers")
