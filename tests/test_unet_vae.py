"""Parity of our UNet / VAE / conditioning with diffusers, on tiny random models (float32, CPU).

The weights are put into diffusers through diffusers' OWN single-file converter applied to our state
dict under the official `model.diffusion_model.` / `first_stage_model.` prefixes: if our parameter
names were not the official sgm names, that converter would drop or misplace them and the outputs
would differ. Our converter (`sdxl.weights.diffusers_layout`) is checked against the same outputs.

Tolerance: max|ours - diffusers| / max|diffusers| <= 1e-5 (float32; the two implementations order some
float operations differently, e.g. SDPA vs. explicit attention, so exact equality is not expected).
"""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("diffusers")

from diffusers import AutoencoderKL as DiffusersVAE  # noqa: E402
from diffusers import UNet2DConditionModel  # noqa: E402
from diffusers.loaders.single_file_utils import (  # noqa: E402
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
)
from diffusers.models.embeddings import Timesteps  # noqa: E402

from reference import randomize as randomize_
from sdxl.models.conditioning import fourier_features, micro_conditioning, timestep_embedding  # noqa: E402
from sdxl.models.config import UNetConfig, VAEConfig, tiny_config  # noqa: E402
from sdxl.models.unet import UNet  # noqa: E402
from sdxl.models.vae import AutoencoderKL  # noqa: E402
from sdxl.weights.diffusers_layout import (  # noqa: E402
    unet_config_from_diffusers,
    unet_diffusers_config,
    unet_diffusers_to_sgm,
    unet_sgm_to_diffusers,
    vae_config_from_diffusers,
    vae_diffusers_config,
    vae_diffusers_to_sgm,
    vae_sgm_to_diffusers,
)

REL_TOL = 1e-5
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max|a - b| / max|b| (b is the reference)."""
    return ((a - b).abs().max() / b.abs().max()).item()


def distilled_tiny() -> UNetConfig:
    """An SSD-1B-like miniature: per-block depths that differ inside a level and between the down and up
    paths, and a middle block without transformer (-1)."""
    base = tiny_config().unet
    return UNetConfig(
        model_channels=base.model_channels, channel_mult=base.channel_mult, head_dim=base.head_dim,
        context_dim=base.context_dim, adm_in_channels=base.adm_in_channels,
        transformer_depth=(0, 0, 1, 2, 2, 2),
        transformer_depth_output=(2, 2, 3, 2, 1, 1, 0, 0, 0),
        transformer_depth_middle=-1,
    )


UNET_CASES = {
    "base": (lambda: tiny_config("base").unet, 6),
    "refiner": (lambda: tiny_config("refiner").unet, 5),
    "inpaint": (lambda: tiny_config("inpaint").unet, 6),
    "distilled": (distilled_tiny, 6),
}


def unet_inputs(cfg: UNetConfig, n_numbers: int, h: int, w: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, cfg.in_channels, h, w, generator=g)
    t = torch.tensor([17.0, 803.5])
    context = torch.randn(2, 11, cfg.context_dim, generator=g)
    pooled = torch.randn(2, cfg.adm_in_channels - 256 * n_numbers, generator=g)
    numbers = torch.tensor(
        [[1024.0, 768.0, 0.0, 32.0, 1024.0, 1024.0], [512.0, 896.0, 64.0, 0.0, 768.0, 1344.0]]
    )
    if n_numbers == 5:  # refiner: size, crop, aesthetic score
        numbers = torch.tensor([[1024.0, 768.0, 0.0, 32.0, 6.0], [512.0, 896.0, 64.0, 0.0, 2.5]])
    return x, t, context, pooled, numbers


def diffusers_unet_from_ours(ours: UNet, cfg: UNetConfig, converter: str) -> UNet2DConditionModel:
    config = unet_diffusers_config(cfg)
    ref = UNet2DConditionModel.from_config(config).eval()
    if converter == "diffusers":
        sd = convert_ldm_unet_checkpoint({UNET_PREFIX + k: v for k, v in ours.state_dict().items()}, config)
    else:
        sd = unet_sgm_to_diffusers(ours.state_dict(), cfg)
    ref.load_state_dict(sd, strict=True)  # strict: every diffusers tensor must be provided, none left over
    return ref


# ---------------------------------------------------------------------------------------------------------
# conditioning
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dim", [320, 256, 384])
def test_timestep_embedding_matches_diffusers(dim):
    t = torch.tensor([0.0, 1.0, 17.5, 999.0, 1024.0, 4096.0])
    ref = Timesteps(dim, flip_sin_to_cos=True, downscale_freq_shift=0)(t)
    ours = timestep_embedding(t, dim)
    assert ours.dtype == torch.float32
    assert ours.shape == (6, dim)
    assert torch.allclose(ours, ref, atol=1e-6, rtol=0)
    # integer timesteps embed exactly like the same float values
    assert torch.equal(timestep_embedding(torch.tensor([0, 1, 999]), dim), ours[[0, 1, 3]])


def test_timestep_embedding_layout_cos_first():
    e = timestep_embedding(torch.tensor([1024]), 256)[0]
    assert abs(e[0].item() - math.cos(1024)) < 1e-5  # 0.98735
    assert abs(e[128].item() - math.sin(1024)) < 1e-5  # -0.15853
    assert abs(e[0].item() - 0.98735) < 1e-5 and abs(e[128].item() + 0.15853) < 1e-5
    # the last frequency is max_period ** (-(half - 1) / half)
    assert abs(e[127].item() - math.cos(1024 * 10000 ** (-127 / 128))) < 1e-5


def test_timestep_embedding_half_precision_input_computed_in_float32():
    t16 = torch.tensor([999.0], dtype=torch.float16)
    assert timestep_embedding(t16, 320).dtype == torch.float32
    assert torch.equal(timestep_embedding(t16, 320), timestep_embedding(torch.tensor([999.0]), 320))
    assert timestep_embedding(torch.tensor(5.0), 320).shape == (1, 320)  # scalar -> one row


def test_fourier_features_layout():
    values = torch.tensor([[1024.0, 768.0, 3.0], [0.0, 64.0, 6.5]])
    f = fourier_features(values, 256)
    assert f.shape == (2, 3 * 256)
    for b in range(2):
        for i in range(3):  # each number's 256 features are contiguous, numbers in column order
            assert torch.equal(f[b, i * 256:(i + 1) * 256], timestep_embedding(values[b, i:i + 1], 256)[0])


def test_micro_conditioning_matches_diffusers_add_time_proj():
    pooled = torch.randn(2, 1280)
    numbers = torch.tensor(
        [[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0], [832.0, 1216.0, 16.0, 8.0, 832.0, 1216.0]]
    )
    y = micro_conditioning(pooled, numbers)
    assert y.shape == (2, 2816)
    assert torch.equal(y[:, :1280], pooled)
    # diffusers: add_time_proj(time_ids.flatten()).reshape(B, -1), placed after the pooled text embedding
    ref = Timesteps(256, True, 0)(numbers.flatten()).reshape(2, -1)
    assert torch.allclose(y[:, 1280:], ref, atol=1e-6, rtol=0)
    # a shared [N] vector broadcasts over the batch; dtype follows the pooled embedding
    y1 = micro_conditioning(pooled.half(), numbers[0])
    assert y1.dtype == torch.float16 and y1.shape == (2, 2816)
    assert torch.equal(y1[1, 1280:], y1[0, 1280:])


# ---------------------------------------------------------------------------------------------------------
# UNet
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(16, 16), (16, 24)], ids=["square", "nonsquare"])
@pytest.mark.parametrize("case", list(UNET_CASES))
def test_unet_parity_with_diffusers(case, size):
    make_cfg, n_numbers = UNET_CASES[case]
    cfg = make_cfg()
    ours = randomize_(UNet(cfg), seed=0).eval()
    x, t, context, pooled, numbers = unet_inputs(cfg, n_numbers, *size)

    with torch.no_grad():
        out = ours(x, t, context, micro_conditioning(pooled, numbers))
        assert out.shape == (2, cfg.out_channels, *size)
        assert out.abs().max() > 1e-2  # random weights everywhere: a real, non-trivial output
        for converter in ("diffusers", "ours"):
            ref_model = diffusers_unet_from_ours(ours, cfg, converter)
            ref = ref_model(x, t, encoder_hidden_states=context,
                            added_cond_kwargs={"text_embeds": pooled, "time_ids": numbers}).sample
            err = rel_err(out, ref)
            assert err <= REL_TOL, f"{case} {size} via {converter} converter: rel err {err:.2e}"


def test_unet_parity_odd_latent_size():
    """Latent sizes that do not halve evenly (15x17): upsamplers land on the skip sizes, as in diffusers."""
    cfg = tiny_config().unet
    ours = randomize_(UNet(cfg), seed=3).eval()
    x, t, context, pooled, numbers = unet_inputs(cfg, 6, 15, 17)
    ref_model = diffusers_unet_from_ours(ours, cfg, "diffusers")
    with torch.no_grad():
        out = ours(x, t, context, micro_conditioning(pooled, numbers))
        ref = ref_model(x, t, encoder_hidden_states=context,
                        added_cond_kwargs={"text_embeds": pooled, "time_ids": numbers}).sample
    assert out.shape == (2, 4, 15, 17)
    assert rel_err(out, ref) <= REL_TOL


def test_our_converter_equals_diffusers_converter():
    """Same keys, same tensors, for every config (stronger than output parity)."""
    for case, (make_cfg, _) in UNET_CASES.items():
        cfg = make_cfg()
        sd = UNet(cfg).state_dict()
        prefixed = {UNET_PREFIX + k: v for k, v in sd.items()}
        theirs = convert_ldm_unet_checkpoint(prefixed, unet_diffusers_config(cfg))
        ours = unet_sgm_to_diffusers(sd, cfg)
        assert set(ours) == set(theirs), case
        assert all(ours[k] is theirs[k] for k in ours), case


@pytest.mark.parametrize("case", list(UNET_CASES))
def test_unet_round_trip_sgm_diffusers_sgm(case):
    cfg = UNET_CASES[case][0]()
    sd = randomize_(UNet(cfg), seed=5).state_dict()
    back = unet_diffusers_to_sgm(unet_sgm_to_diffusers(sd, cfg), cfg)
    assert set(back) == set(sd)
    assert all(torch.equal(back[k], sd[k]) for k in sd)
    # and the diffusers config describes the same network
    assert unet_config_from_diffusers(unet_diffusers_config(cfg)) == cfg


def test_unet_converter_rejects_unknown_keys():
    cfg = tiny_config().unet
    sd = dict(UNet(cfg).state_dict())
    sd["input_blocks.99.0.in_layers.0.weight"] = torch.zeros(1)
    with pytest.raises(KeyError):
        unet_sgm_to_diffusers(sd, cfg)


def test_unet_timesteps_scalar_int_float():
    cfg = tiny_config().unet
    unet = randomize_(UNet(cfg), seed=7).eval()
    x, _, context, pooled, numbers = unet_inputs(cfg, 6, 8, 8)
    y = micro_conditioning(pooled, numbers)
    with torch.no_grad():
        a = unet(x, torch.tensor([500, 500]), context, y)
        b = unet(x, torch.tensor(500.0), context, y)  # scalar -> broadcast
        c = unet(x, 500, context, y)  # python number
        d = unet(x, torch.tensor([500.0, 250.0]), context, y)
    assert torch.equal(a, b) and torch.equal(a, c)
    assert torch.allclose(a[0], d[0], rtol=0, atol=1e-6)  # per-sample timesteps: row 0 is the same t
    assert not torch.allclose(a[1], d[1], rtol=0, atol=1e-3)  # row 1 is not


def test_gradient_checkpointing_same_values_and_grads():
    cfg = tiny_config().unet
    unet = randomize_(UNet(cfg), seed=13).train()
    x, t, context, pooled, numbers = unet_inputs(cfg, 6, 8, 8)
    y = micro_conditioning(pooled, numbers)

    def run():
        unet.zero_grad(set_to_none=True)
        out = unet(x, t, context, y)
        out.square().mean().backward()
        return out.detach(), {n: p.grad.clone() for n, p in unet.named_parameters()}

    out_a, grads_a = run()
    unet.gradient_checkpointing = True
    assert unet.gradient_checkpointing and unet.input_blocks[4][0].gradient_checkpointing
    out_b, grads_b = run()
    assert torch.allclose(out_a, out_b, rtol=0, atol=1e-6)
    assert all(torch.allclose(grads_a[n], grads_b[n], rtol=1e-4, atol=1e-7) for n in grads_a)


def test_unet_bfloat16_runs_in_parameter_dtype():
    cfg = tiny_config().unet
    unet = randomize_(UNet(cfg), seed=17).eval()
    x, t, context, pooled, numbers = unet_inputs(cfg, 6, 8, 8)
    y = micro_conditioning(pooled, numbers)
    with torch.no_grad():
        ref = unet(x, t, context, y)
        unet.to(torch.bfloat16)
        out = unet(x, t, context, y)  # fp32 inputs are cast to the parameter dtype inside
        out16 = unet(x.bfloat16(), t, context.bfloat16(), y.bfloat16())
    assert out.dtype == torch.float32 and out16.dtype == torch.bfloat16
    assert rel_err(out, ref) < 0.1  # bf16 has 8 mantissa bits; this only catches broken dtype handling


def test_channels_last_same_output():
    cfg = tiny_config().unet
    unet = randomize_(UNet(cfg), seed=19).eval()
    x, t, context, pooled, numbers = unet_inputs(cfg, 6, 16, 16)
    y = micro_conditioning(pooled, numbers)
    with torch.no_grad():
        ref = unet(x, t, context, y)
        unet.use_channels_last()
        assert unet.input_blocks[0][0].weight.is_contiguous(memory_format=torch.channels_last)
        out = unet(x, t, context, y)
    # NHWC convolutions accumulate in a different order: float32 rounding only
    assert rel_err(out, ref) <= REL_TOL


# ---------------------------------------------------------------------------------------------------------
# VAE
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(32, 32), (32, 48)], ids=["square", "nonsquare"])
def test_vae_parity_with_diffusers(size):
    cfg = tiny_config().vae
    ours = randomize_(AutoencoderKL(cfg), seed=23).eval()
    config = vae_diffusers_config(cfg)
    g = torch.Generator().manual_seed(29)
    img = torch.rand(2, 3, *size, generator=g) * 2 - 1
    f = cfg.downscale
    z = torch.randn(2, cfg.embed_dim, size[0] // f, size[1] // f, generator=g)

    with torch.no_grad():
        mean, logvar = ours.encode(img)
        dec = ours.decode(z)
        assert mean.shape == (2, cfg.embed_dim, size[0] // f, size[1] // f)
        assert dec.shape == (2, 3, *size)
        for converter in ("diffusers", "ours"):
            ref = DiffusersVAE.from_config(config).eval()
            if converter == "diffusers":
                prefixed = {VAE_PREFIX + k: v for k, v in ours.state_dict().items()}
                sd = convert_ldm_vae_checkpoint(prefixed, config)
            else:
                sd = vae_sgm_to_diffusers(ours.state_dict(), cfg)
            ref.load_state_dict(sd, strict=True)
            dist = ref.encode(img).latent_dist
            assert rel_err(mean, dist.mean) <= REL_TOL, converter
            assert rel_err(logvar, dist.logvar) <= REL_TOL, converter
            assert rel_err(dec, ref.decode(z).sample) <= REL_TOL, converter


def test_vae_round_trip_and_attention_reshape():
    for cfg in (tiny_config().vae, VAEConfig(ch=32, ch_mult=(1, 2, 4), num_res_blocks=2)):
        sd = randomize_(AutoencoderKL(cfg), seed=31).state_dict()
        dif = vae_sgm_to_diffusers(sd, cfg)
        prefixed = {VAE_PREFIX + k: v for k, v in sd.items()}
        theirs = convert_ldm_vae_checkpoint(prefixed, vae_diffusers_config(cfg))
        assert set(dif) == set(theirs)
        assert all(torch.equal(dif[k], theirs[k]) for k in dif)
        assert dif["encoder.mid_block.attentions.0.to_q.weight"].ndim == 2
        assert sd["encoder.mid.attn_1.q.weight"].ndim == 4
        back = vae_diffusers_to_sgm(dif, cfg)
        assert set(back) == set(sd)
        assert all(back[k].shape == sd[k].shape and torch.equal(back[k], sd[k]) for k in sd)
        assert vae_config_from_diffusers(vae_diffusers_config(cfg)) == cfg
