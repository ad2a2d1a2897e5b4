"""T2I-Adapter: our modules against diffusers' `T2IAdapter` and `UNet2DConditionModel`'s
`down_intrablock_additional_residuals`, on tiny random weights in diffusers' key layout.

Tolerances: adapter features and UNet outputs to 1e-5 relative (max |ours - ref| / max |ref|), fp32.
"""

from __future__ import annotations

import pytest
import torch

from reference import randomize
from sdxl.errors import CheckpointError
from sdxl.models.conditioning import micro_conditioning
from sdxl.models.config import tiny_config
from sdxl.models.t2i_adapter import T2IAdapter, config_from_tensors, is_t2i_adapter, t2i_adapter_from_tensors
from sdxl.models.unet import UNet, UNetControl

REL_TOL = 1e-5


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def diffusers_adapter(adapter_type: str, channels, downscale: int, seed: int = 0, in_channels: int = 3):
    from diffusers import T2IAdapter as RefAdapter

    ref = RefAdapter(in_channels=in_channels, channels=list(channels), num_res_blocks=2,
                     downscale_factor=downscale, adapter_type=adapter_type)
    return randomize(ref, seed).eval()


def diffusers_unet(ours: UNet):
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    from sdxl.weights.diffusers_layout import unet_diffusers_config

    config = unet_diffusers_config(ours.cfg)
    ref = UNet2DConditionModel.from_config(config).eval()
    sd = {"model.diffusion_model." + k: v for k, v in ours.state_dict().items()}
    ref.load_state_dict(convert_ldm_unet_checkpoint(sd, config), strict=True)
    return ref


@pytest.fixture(scope="module")
def unets():
    cfg = tiny_config().unet  # channels 32 / 64 / 128, attention on levels 1 and 2, as SDXL
    ours = randomize(UNet(cfg), 0).eval()
    return ours, diffusers_unet(ours)


def unet_inputs(cfg, h: int, w: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, cfg.in_channels, h, w, generator=g)
    t = torch.tensor([17.0, 803.5])
    context = torch.randn(2, 7, cfg.context_dim, generator=g)
    pooled = torch.randn(2, cfg.adm_in_channels - 6 * 256, generator=g)
    numbers = torch.tensor([[512.0, 512.0, 0.0, 0.0, 512.0, 512.0], [256.0, 384.0, 8.0, 0.0, 256.0, 384.0]])
    return x, t, context, pooled, numbers


@pytest.mark.parametrize("adapter_type,channels,downscale", [
    ("full_adapter_xl", (32, 64, 128, 128), 16),
    ("full_adapter", (32, 64, 128, 128), 8),
    ("light_adapter", (32, 64, 128), 8),
])
def test_features_match_diffusers(adapter_type, channels, downscale):
    """Same tensors, same features; the type and sizes are read off the tensors (no config.json)."""
    ref = diffusers_adapter(adapter_type, channels, downscale, seed=3)
    sd = ref.state_dict()
    assert is_t2i_adapter(sd.keys())
    cfg = config_from_tensors({k.removeprefix("adapter."): v for k, v in sd.items()})
    assert (cfg.adapter_type, cfg.channels, cfg.downscale_factor, cfg.in_channels) == (
        adapter_type, channels, downscale, 3)
    unet_cfg = tiny_config().unet
    if adapter_type != "full_adapter_xl":
        # SD 1.5 layouts: their features do not land on SDXL's levels (diffusers fails on the addition)
        with pytest.raises(CheckpointError, match="not an SDXL T2I-Adapter") as e:
            t2i_adapter_from_tensors(sd, unet_config=unet_cfg, name="sd15.safetensors")
        assert "\n" not in str(e.value) and "sd15.safetensors" in str(e.value)
        model = T2IAdapter(cfg, unet_cfg.__class__(**{**unet_cfg.__dict__, "channel_mult": (1, 2, 4, 4),
                                                     "transformer_depth": (1,) * 8,
                                                     "transformer_depth_output": (1,) * 12}))
        model.adapter.load_state_dict({k.removeprefix("adapter."): v for k, v in sd.items()})
    else:
        model = t2i_adapter_from_tensors(sd, unet_config=unet_cfg)
    hint = torch.rand(1, 3, 128, 96, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = ref(hint)
    got = model.features(hint)
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert a.shape == b.shape
        assert rel_err(a, b) <= REL_TOL


@pytest.mark.parametrize("size", [(8, 8), (12, 6)], ids=["square", "nonsquare"])
def test_unet_with_adapter_matches_diffusers(unets, size):
    """Our UNet with the adapter's UNetControl (x 0.7) equals diffusers' UNet with
    down_intrablock_additional_residuals = 0.7 x features: the features land at input blocks 3 (after level
    0's downsampler), 5 (level 1's last ResBlock + transformer, before its downsampler), 8 (level 2) and the
    middle block's output."""
    ours, ref_unet = unets
    ref = diffusers_adapter("full_adapter_xl", (32, 64, 128, 128), 16, seed=4)
    adapter = t2i_adapter_from_tensors(ref.state_dict(), unet_config=ours.cfg)
    x, t, context, pooled, numbers = unet_inputs(ours.cfg, *size)
    hint = torch.rand(1, 3, size[0] * 8, size[1] * 8, generator=torch.Generator().manual_seed(6))
    control = adapter(x, t, context, None, hint)
    assert sorted(control.intrablock) == [3, 5, 8] and control.middle is not None and control.skips is None
    scaled = UNetControl(intrablock={k: 0.7 * v for k, v in control.intrablock.items()},
                         middle=0.7 * control.middle)
    with torch.no_grad():
        plain = ours(x, t, context, micro_conditioning(pooled, numbers))
        out = ours(x, t, context, micro_conditioning(pooled, numbers), control=scaled)
        # batch 2 as the pipeline hands them (diffusers adds the middle feature only on an exact shape match)
        feats = [0.7 * f.expand(2, -1, -1, -1) for f in ref(hint)]
        expected = ref_unet(x, t, encoder_hidden_states=context,
                            added_cond_kwargs={"text_embeds": pooled, "time_ids": numbers},
                            down_intrablock_additional_residuals=feats).sample
    assert rel_err(out, plain) > 1e-2  # the adapter changes the output
    assert rel_err(out, expected) <= REL_TOL


def test_features_cached_per_hint():
    ref = diffusers_adapter("full_adapter_xl", (32, 64, 128, 128), 16, seed=1)
    adapter = t2i_adapter_from_tensors(ref.state_dict(), unet_config=tiny_config().unet)
    hint = torch.rand(1, 3, 64, 64)
    first = adapter.features(hint)
    assert adapter.features(hint) is first
    assert adapter.features(hint.clone()) is not first  # another tensor: computed again
    hint.mul_(0.5)  # modified in place: stale
    again = adapter.features(hint)
    assert again is not first and not torch.equal(again[0], first[0])
    with torch.inference_mode():  # no version count: computed each time, same values
        frozen = hint.clone()
        assert torch.equal(adapter.features(frozen)[2], again[2])


def test_odd_latent_size_and_batch():
    """Latent 5 x 7 (hint 40 x 56, not a multiple of 16): the hint is stretched to 48 x 64 and the features
    land on the UNet's rounded-up sizes; a one-image hint serves a batch of 3."""
    cfg = tiny_config().unet
    unet = randomize(UNet(cfg), 2).eval()
    ref = diffusers_adapter("full_adapter_xl", (32, 64, 128, 128), 16, seed=2)
    adapter = t2i_adapter_from_tensors(ref.state_dict(), unet_config=cfg)
    x = torch.randn(3, 4, 5, 7)
    context = torch.randn(3, 7, cfg.context_dim)
    y = torch.randn(3, cfg.adm_in_channels)
    control = adapter(x, torch.tensor(500.0), context, y, torch.rand(1, 3, 40, 56))
    assert control.intrablock[3].shape == (3, 32, 3, 4)
    assert control.intrablock[8].shape == (3, 128, 2, 2)
    with torch.no_grad():
        out = unet(x, torch.tensor(500.0), context, y, control=control)
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_bad_tensors_one_line():
    ref = diffusers_adapter("full_adapter_xl", (32, 64, 128, 128), 16)
    sd = dict(ref.state_dict())
    sd.pop("adapter.body.1.in_conv.weight")
    with pytest.raises(CheckpointError, match="adapter.safetensors") as e:
        t2i_adapter_from_tensors(sd, unet_config=tiny_config().unet, name="adapter.safetensors")
    assert "\n" not in str(e.value)


def test_load_control_model_folder_and_file(tmp_path):
    """A diffusers folder (save_pretrained: config.json + diffusion_pytorch_model.safetensors) and the bare
    safetensors file load through load_control_model as "t2i-adapter", with diffusers' features."""
    from sdxl.weights.control import detect_control_kind, load_control_model
    from sdxl.weights.io import save_safetensors

    ref = diffusers_adapter("full_adapter_xl", (32, 64, 128, 128), 16, seed=8)
    ref.save_pretrained(tmp_path / "t2i-adapter-canny-sdxl")
    save_safetensors({k: v.contiguous() for k, v in ref.state_dict().items()},
                     tmp_path / "adapter.safetensors")
    assert detect_control_kind(ref.state_dict().keys()) == "t2i-adapter"
    hint = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        expected = ref(hint)
    cfg = tiny_config().unet
    for path in (tmp_path / "t2i-adapter-canny-sdxl", tmp_path / "adapter.safetensors"):
        model = load_control_model(path, cfg)
        assert model.kind == "t2i-adapter" and model.cfg.adapter_type == "full_adapter_xl"
        for a, b in zip(model.encode_hint(hint), expected):
            assert rel_err(a, b) <= REL_TOL


def test_weights_and_soft_injection():
    """A unit's weight scales every feature; soft injection uses sd-webui-controlnet's adapter table
    weight * (0.25, 0.62, 0.825, 1.0) over [level 0, level 1, level 2, middle]."""
    ref = diffusers_adapter("full_adapter_xl", (32, 64, 128, 128), 16, seed=9)
    adapter = t2i_adapter_from_tensors(ref.state_dict(), unet_config=tiny_config().unet)
    x = torch.zeros(2, 4, 8, 8)
    hint = torch.rand(1, 3, 64, 64)
    out = adapter(x, None, None, None, hint)
    assert torch.equal(adapter(x, None, None, None, hint_features=adapter.encode_hint(hint)).intrablock[5],
                       out.intrablock[5])
    bal = adapter.scaled(out, 0.7)
    soft = adapter.scaled(out, 0.7, soft=True)
    for k, s in zip((3, 5, 8), (0.25, 0.62, 0.825)):
        assert torch.allclose(bal.intrablock[k], 0.7 * out.intrablock[k])
        assert torch.allclose(soft.intrablock[k], 0.7 * s * out.intrablock[k])
    assert torch.allclose(soft.middle, 0.7 * out.middle)


def test_pipeline_matches_diffusers_adapter_pipeline(tmp_path):
    """End to end: a T2I-Adapter unit (weight 0.7, end 0.5 on 5 steps: steps 0, 1, 2) gives the image of
    diffusers' StableDiffusionXLAdapterPipeline (adapter_conditioning_scale 0.7, adapter_conditioning_factor
    0.6: steps i < int(5 * 0.6)) on a tiny model, Euler, same seed: PSNR >= 40 dB on the 8-bit images. The
    tiny model's UNet has full-scale random weights (the conftest file's 0.02 std UNet lets no control show in
    the pixels); the control image is exactly the output size, so both sides get the same hint."""
    import numpy as np
    from diffusers import StableDiffusionXLAdapterPipeline
    from PIL import Image

    import sdxl
    from reference import diffusers_components, euler_scheduler, psnr, to_uint8
    from sdxl.request import ControlUnit, GenerationRequest
    from sdxl.weights.checkpoint import random_checkpoint, write_single_file
    from sdxl.weights.io import save_safetensors

    cfg = tiny_config()
    ck = random_checkpoint(cfg, seed=10)
    ck.parts["unet"] = randomize(UNet(cfg.unet), 3).state_dict()
    model = write_single_file(ck, tmp_path / "tiny.safetensors")
    ref = diffusers_adapter("full_adapter_xl", (32, 64, 128, 128), 16, seed=12)
    path = save_safetensors({k: v.contiguous() for k, v in ref.state_dict().items()},
                            tmp_path / "t2i-adapter-tiny.safetensors")
    rng = np.random.default_rng(0)
    hint_img = Image.fromarray(rng.integers(0, 256, (64, 96, 3), dtype=np.uint8))
    hint = torch.from_numpy(np.asarray(hint_img, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]

    pipe = sdxl.load(model, device="cpu", dtype=torch.float32)
    req = dict(prompt="a photo of a red cat", width=96, height=64, steps=5, cfg=5.0, seed=42, sampler="euler",
               schedule="leading")
    unit = ControlUnit(model=str(path), image=hint_img, weight=0.7, start=0.0, end=0.5, resize_mode="resize")
    ours = np.asarray(pipe.generate(GenerationRequest(**req, controls=(unit,))).images[0].convert("RGB"))
    plain = np.asarray(pipe.generate(GenerationRequest(**req)).images[0].convert("RGB"))

    c = diffusers_components(model, tmp_path)
    dpipe = StableDiffusionXLAdapterPipeline(
        vae=c["vae"], text_encoder=c["text_encoder"], text_encoder_2=c["text_encoder_2"],
        tokenizer=c["tokenizer"], tokenizer_2=c["tokenizer_2"], unet=c["unet"], adapter=ref,
        scheduler=euler_scheduler())
    with torch.no_grad():
        expected = dpipe("a photo of a red cat", image=hint, negative_prompt=None, num_inference_steps=5,
                         guidance_scale=5.0, width=96, height=64, adapter_conditioning_scale=0.7,
                         adapter_conditioning_factor=0.6, generator=torch.Generator("cpu").manual_seed(42),
                         output_type="np").images
    expected = to_uint8(expected)[0]
    assert psnr(plain, ours) < 30.0, "the adapter must change the image for the comparison to mean anything"
    assert psnr(ours, expected) >= 40.0
