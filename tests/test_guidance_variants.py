"""FreeU and perturbed-attention guidance (PAG) against diffusers, on the tiny random official-layout file.

References: diffusers' `UNet2DConditionModel.enable_freeu` (FreeU; UNet output compared in fp32) and
`StableDiffusionXLPAGPipeline` (PAG with CFG; final latents compared), both built from the same file through
diffusers' own single-file converters (tests/reference.py).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from reference import diffusers_base_pipeline, diffusers_components

SDXL_FREEU = {"b1": 1.3, "b2": 1.4, "s1": 0.9, "s2": 0.2}


@pytest.fixture(scope="module")
def pipe(tiny_files):
    from sdxl.pipeline import load

    return load(tiny_files["base"], fast=False)


def _unet_inputs(cfg, h: int, w: int, seed: int = 0):
    """Random latents, timesteps and text tokens; y from a pooled embedding and real micro-conditioning
    numbers (what diffusers' UNet takes as text_embeds and time_ids)."""
    from sdxl.models.conditioning import micro_conditioning

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, cfg.unet.in_channels, h, w, generator=g)
    t = torch.tensor([700.0, 150.0])
    context = torch.randn(2, 77, cfg.unet.context_dim, generator=g)
    pooled = torch.randn(2, cfg.text_g.projection_dim, generator=g)
    numbers = torch.tensor([[64.0, 96.0, 0.0, 0.0, 64.0, 96.0], [128.0, 64.0, 8.0, 0.0, 64.0, 64.0]])
    return x, t, context, pooled, numbers, micro_conditioning(pooled, numbers)


@pytest.mark.parametrize("h,w,params", [
    (8, 8, SDXL_FREEU),
    (8, 12, SDXL_FREEU),  # odd sizes at the lower levels (4x6, 2x3)
    (8, 12, {"b1": 3.0, "b2": 4.0, "s1": 0.3, "s2": 2.5}),  # no zero: diffusers treats a 0 as "FreeU off"
])
def test_freeu_unet_matches_diffusers(pipe, tiny_files, tmp_path, h, w, params):
    """Our FreeU hooks give diffusers' enable_freeu output to 1e-5 (fp32). On random weights FreeU moves the
    output by only ~1e-5..1e-4, so the change itself (FreeU minus plain) is compared too, to 0.5% of its
    size: a wrong channel half, stage or filter window fails that."""
    from sdxl.models.freeu import apply_freeu

    ref = diffusers_components(tiny_files["base"], tmp_path)["unet"]
    ours = pipe.unet
    x, t, context, pooled, numbers, y = _unet_inputs(pipe.config, h, w)
    with torch.no_grad():
        plain = ours(x, t, context, y)
        handle = apply_freeu(ours, **params)
        try:
            freeu = ours(x, t, context, y)
        finally:
            handle.remove()
        after = ours(x, t, context, y)
        cond = {"text_embeds": pooled, "time_ids": numbers}
        ref_plain = ref(x, t, context, added_cond_kwargs=cond).sample
        ref.enable_freeu(**params)
        expected = ref(x, t, context, added_cond_kwargs=cond).sample
    torch.testing.assert_close(freeu, expected, rtol=1e-5, atol=1e-5)
    change, ref_change = freeu - plain, expected - ref_plain
    assert ref_change.abs().max() > 1e-6, "FreeU should change diffusers' output"
    assert (change - ref_change).abs().max() <= 5e-3 * ref_change.abs().max()
    assert torch.equal(after, plain), "remove() must restore the plain UNet exactly"


def _request(**kw):
    from sdxl.request import GenerationRequest

    base = dict(prompt="a photo of a red cat", width=64, height=64, steps=4, cfg=5.0, seed=42,
                sampler="euler", schedule="leading")
    return GenerationRequest(**{**base, **kw})


def _load_clip_l(text_encoder, path) -> None:
    """Load CLIP-L's weights into the reference text encoder strictly. `reference.diffusers_components` loads
    them with strict=False under a "text_model." prefix this transformers version's CLIPTextModel does not
    use, so its CLIP-L stays at random init (invisible with the shared fixture's std-0.02 UNet)."""
    from safetensors.torch import load_file

    prefix = "conditioner.embedders.0.transformer.text_model."
    sd = {k[len(prefix):]: v for k, v in load_file(str(path)).items() if k.startswith(prefix)}
    sd.pop("embeddings.position_ids", None)
    keys = text_encoder.state_dict().keys()
    if all(k.startswith("text_model.") for k in keys):
        sd = {"text_model." + k: v for k, v in sd.items()}
    text_encoder.load_state_dict(sd, strict=True)


PAG_LAYERS = [
    ("mid", ["mid"]),
    ("down.2, up.0.1", ["down_blocks.2", "up_blocks.0.attentions.1"]),
]


@pytest.fixture(scope="module")
def loud_file(tmp_path_factory):
    """A tiny base file whose UNet has weights of std 0.1: with the shared fixture's 0.02 every attention's
    contribution vanishes below float32 rounding, and PAG's effect with it. The text encoders and VAE keep
    the shared std 0.02."""
    from sdxl.models.config import tiny_config
    from sdxl.weights.checkpoint import random_checkpoint, write_single_file

    d = tmp_path_factory.mktemp("loud")
    ck = random_checkpoint(tiny_config("base"), seed=3)
    ck.parts["unet"] = random_checkpoint(tiny_config("base"), seed=3, std=LOUD_STD).parts["unet"]
    return write_single_file(ck, d / "loud.safetensors")


LOUD_STD = 0.1


@pytest.mark.parametrize("ours_layers,diffusers_layers", PAG_LAYERS)
def test_pag_guidance_matches_diffusers(loud_file, tmp_path, ours_layers, diffusers_layers):
    """One guided UNet evaluation: our `guided_model` with PAG (layers swapped by `perturb_self_attention`)
    against diffusers' UNet with its PAG attention processors on the batch [uncond, cond, cond] and its
    `_apply_perturbed_attention_guidance`, to 1e-5 (fp32; measured 4.6e-6 on outputs up to 0.73), and the
    change itself (PAG minus plain CFG, up to 0.27 here) to 0.5% of its size."""
    from diffusers import StableDiffusionXLPAGPipeline

    from sdxl.models.conditioning import micro_conditioning
    from sdxl.models.pag import perturb_self_attention
    from sdxl.pipeline import load
    from sdxl.sampling.guidance import guided_model

    pipe = load(loud_file, fast=False)
    ref = diffusers_base_pipeline(loud_file, tmp_path, cls=StableDiffusionXLPAGPipeline)
    ref.set_pag_applied_layers(diffusers_layers)
    ref._pag_scale, ref._pag_adaptive_scale = 3.0, 0.0
    x, t, context, pooled, numbers, _ = _unet_inputs(pipe.config, 8, 8)
    x, t = x[:1], t[:1]
    ctx, nctx = context[:1], context[1:]
    y, ny = micro_conditioning(pooled[:1], numbers[:1]), micro_conditioning(pooled[1:], numbers[:1])

    def ours(pag_scale):
        state = perturb_self_attention(pipe.unet, ours_layers) if pag_scale else None
        try:
            fn = guided_model(pipe.unet, [(1, ctx, y)], [(1, nctx, ny)], scale=5.0, cfg_steps=(0, 1),
                              step_of=lambda _: 0, pag_scale=pag_scale, pag_state=state)
            return fn(x, t)
        finally:
            if state is not None:
                state.undo()

    with torch.no_grad():
        got, got_plain = ours(3.0), ours(0.0)
        time_ids = torch.cat([numbers[:1]] * 3)
        ref._set_pag_attn_processor(ref.pag_applied_layers, True)
        out = ref.unet(torch.cat([x] * 3), torch.cat([t] * 3), torch.cat([nctx, ctx, ctx]),
                       added_cond_kwargs={"text_embeds": torch.cat([pooled[1:], pooled[:1], pooled[:1]]),
                                          "time_ids": time_ids}).sample
        expected = ref._apply_perturbed_attention_guidance(out, True, 5.0, t)
        uncond, cond, _ = out.chunk(3)
        expected_plain = uncond + 5.0 * (cond - uncond)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    change, ref_change = got - got_plain, expected - expected_plain
    assert ref_change.abs().max() > 1e-6, "PAG should change diffusers' output"
    assert (change - ref_change).abs().max() <= 5e-3 * ref_change.abs().max()
    assert not any(type(m).__name__ == "PerturbedAttention" for m in pipe.unet.modules()), "undo() restores"


@pytest.mark.parametrize("ours_layers,diffusers_layers", PAG_LAYERS)
def test_pag_matches_diffusers_pipeline(loud_file, tmp_path, ours_layers, diffusers_layers):
    """The whole run: our final latents against StableDiffusionXLPAGPipeline's (Euler, leading, 4 steps,
    pag_scale 3, CFG 5, the zero negative embedding) to 1e-4 absolute; PAG itself moves them by 1.5-2."""
    from diffusers import StableDiffusionXLPAGPipeline

    from sdxl.pipeline import load

    ref = diffusers_base_pipeline(loud_file, tmp_path, cls=StableDiffusionXLPAGPipeline)
    _load_clip_l(ref.text_encoder, loud_file)
    ref.set_pag_applied_layers(diffusers_layers)

    def reference(pag_scale):
        return ref("a photo of a red cat", negative_prompt=None, num_inference_steps=4, guidance_scale=5.0,
                   pag_scale=pag_scale, width=64, height=64, generator=torch.Generator("cpu").manual_seed(42),
                   output_type="latent").images

    with torch.no_grad():
        expected, expected_plain = reference(3.0), reference(0.0)
    ours = load(loud_file, fast=False).generate(_request(pag_scale=3.0, pag_layers=ours_layers)).latents
    assert (expected - expected_plain).abs().max() > 0.1, "PAG should change diffusers' latents"
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-4)  # measured 2.4e-5 (latents up to ~11)


def test_off_is_plain_and_hooks_are_removed(pipe):
    """pag_scale 0 and freeu off give exactly the plain result whatever the other PAG/FreeU fields hold, and
    a run with both on leaves the UNet as it was (the next plain run is bit-identical)."""
    plain = pipe.generate(_request()).latents
    off = pipe.generate(_request(pag_scale=0.0, pag_layers="up.0", freeu=False, freeu_b1=2.0)).latents
    assert torch.equal(off, plain)
    on = pipe.generate(_request(pag_scale=3.0, freeu=True)).latents
    assert not torch.equal(on, plain)
    assert torch.equal(pipe.generate(_request()).latents, plain)
    assert not any(type(m).__name__ == "PerturbedAttention" for m in pipe.unet.modules())
    assert all(not b._forward_pre_hooks for b in pipe.unet.output_blocks)


def test_pag_layer_names(pipe):
    from sdxl.errors import RequestError
    from sdxl.models.pag import self_attention_layers

    names = [name for _, name in self_attention_layers(pipe.unet, "mid")]
    assert names == ["middle_block.1.transformer_blocks.0.attn1", "middle_block.1.transformer_blocks.1.attn1"]
    assert [n for _, n in self_attention_layers(pipe.unet, "up_blocks.0.attentions.1")] == [
        n for _, n in self_attention_layers(pipe.unet, "up.0.1")] != []
    assert self_attention_layers(pipe.unet, "down.0") == []  # SDXL's first level has no attention
    with pytest.raises(RequestError, match="pag_layers: 'down.0' names no self-attention"):
        pipe.generate(_request(pag_scale=1.0, pag_layers="down.0"))
    with pytest.raises(RequestError, match="pag_layers: 'middle'"):
        _request(pag_scale=1.0, pag_layers="mid, middle").validate()


def test_cli_records_and_repeats(tiny_files, tmp_path):
    """`sdxl generate --pag-scale 3 --freeu` writes both to the infotext, and --from repeats the pixels."""
    from sdxl.cli import app
    from sdxl.metadata import parse_a1111

    def generate(out, *extra):
        args = ["generate", "--model", str(tiny_files["base"]), "--out", str(out), "--quiet", *extra]
        res = CliRunner().invoke(app, args)
        assert res.exit_code == 0, res.output
        return np.asarray(Image.open(out).convert("RGB"))

    common = ["-W", "64", "-H", "64", "--steps", "3", "--seed", "7", "--sampler", "euler"]
    first = generate(tmp_path / "a.png", "a red cat", *common, "--pag-scale", "3",
                     "--pag-layers", "mid, up.0", "--freeu", "--freeu-b1", "1.5")
    text = Image.open(tmp_path / "a.png").info["parameters"]
    assert 'PAG scale: 3, PAG layers: "mid, up.0", FreeU: b1=1.5 b2=1.4 s1=0.9 s2=0.2' in text
    params = parse_a1111(text)
    assert (params["pag_scale"], params["pag_layers"], params["freeu"], params["freeu_b1"]) == (
        3.0, "mid, up.0", True, 1.5)
    again = generate(tmp_path / "b.png", "--from", str(tmp_path / "a.png"))
    assert np.array_equal(again, first)
    plain = generate(tmp_path / "c.png", "a red cat", *common)
    assert "PAG" not in Image.open(tmp_path / "c.png").info["parameters"]
    assert not np.array_equal(plain, first)
