"""ControlNet and union ControlNet for SDXL: components and whole generations against diffusers, the control
modes, and the one-line errors.

References: diffusers 0.42's ControlNetModel / ControlNetUnionModel built `from_unet` of the tiny UNet (the
tiny official-layout base file of tests/conftest.py through diffusers' own converters, tests/reference.py),
with random weights in the zero-initialised layers too, saved with `save_pretrained` (a diffusers folder; its
safetensors file alone is the single-file case). Tolerances: residuals to 1e-5 in fp32; images PSNR >= 40 dB
on 8 bits against StableDiffusionXLControlNetPipeline (Euler, leading, seed 42, negative_prompt None).
"""

from __future__ import annotations

import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from reference import diffusers_components, euler_scheduler, psnr, to_uint8
from sdxl.control import ActiveUnit, make_control_fn
from sdxl.errors import CheckpointError, RequestError
from sdxl.models.conditioning import micro_conditioning
from sdxl.request import ControlUnit, GenerationRequest
from sdxl.weights.control import load_control_model
from sdxl.weights.io import save_safetensors

pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]

PROMPT = "a red circle"
W = H = 64
CONTROL_STD = 1.0  # random weights of the zero-initialised layers: strong enough to change the image


def _randomize(model: torch.nn.Module, seed: int, std: float = 0.05) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


@pytest.fixture(scope="module")
def refs(tiny_files, tmp_path_factory):
    """diffusers components of the tiny base file, a ControlNet (folder + single file) and a union model."""
    from diffusers import ControlNetModel, ControlNetUnionModel

    d = tmp_path_factory.mktemp("controlnets")
    comps = diffusers_components(tiny_files["base"], d)
    cn = ControlNetModel.from_unet(comps["unet"])
    torch.manual_seed(0)
    with torch.no_grad():  # the zero-initialised layers get random weights, so the control shows
        for m in [*cn.controlnet_down_blocks, cn.controlnet_mid_block, cn.controlnet_cond_embedding.conv_out]:
            _randomize(m, 1 + len(list(m.parameters())), CONTROL_STD)
    cn.eval().save_pretrained(d / "cn")
    shutil.copy(d / "cn" / "diffusion_pytorch_model.safetensors", d / "cn.safetensors")
    # union: widths scaled to the tiny UNet (the token width must equal conv_in's width, 32 here)
    u = ControlNetUnionModel.from_unet(comps["unet"])
    cfg = {k: v for k, v in u.config.items() if not k.startswith("_")}
    cfg.update(num_trans_channel=32, num_proj_channel=32, num_trans_head=2, num_control_type=8)
    union = ControlNetUnionModel.from_config(cfg)
    _randomize(union, 2)
    union.eval().save_pretrained(d / "union")
    return {"comps": comps, "cn": cn, "union": union, "dir": d}


def _inputs(b: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 4, H // 8, W // 8, generator=g)
    t = torch.tensor([700.0] * b)
    ctx = torch.randn(b, 77, 96, generator=g)
    pooled = torch.randn(b, 64, generator=g)
    time_ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * b)
    hint = torch.rand(1, 3, H, W, generator=g)
    y = micro_conditioning(pooled, time_ids, 256)
    return x, t, ctx, pooled, time_ids, y, hint


def _max_err(ref, ours) -> float:
    down, mid = ref
    assert len(down) == len(ours.skips) == 9  # SDXL: conv_in + 3 levels x 2 ResBlocks + 2 downsamplers
    errs = [(a - b).abs().max().item() for a, b in zip(down, ours.skips)]
    return max(errs + [(mid - ours.middle).abs().max().item()])


@pytest.mark.parametrize("layout", ["folder", "single-file"])
def test_controlnet_matches_diffusers(refs, tiny_files, layout):
    from sdxl.weights.checkpoint import read_checkpoint

    path = refs["dir"] / ("cn" if layout == "folder" else "cn.safetensors")
    model = load_control_model(path, read_checkpoint(tiny_files["base"]).config.unet)
    assert model.kind == "controlnet"
    x, t, ctx, pooled, time_ids, y, hint = _inputs()
    with torch.no_grad():
        ref = refs["cn"](x, t, ctx, hint.expand(2, -1, -1, -1), added_cond_kwargs={
            "text_embeds": pooled, "time_ids": time_ids}, return_dict=False)
        ours = model(x, t, ctx, y, hint)
    assert ref[1].abs().max() > 0.01  # the residuals are not trivially zero
    assert _max_err(ref, ours) < 1e-5


def test_sgm_layout_file_loads_the_same(refs, tmp_path):
    """Our names under `control_model.` (sd-webui-controlnet's layout) give the same model."""
    model = load_control_model(refs["dir"] / "cn.safetensors")
    sd = {"control_model." + k: v for k, v in model.state_dict().items()}
    save_safetensors(sd, tmp_path / "sgm.safetensors", {})
    again = load_control_model(tmp_path / "sgm.safetensors")
    x, t, ctx, _, _, y, hint = _inputs(1)
    with torch.no_grad():
        a, b = model(x, t, ctx, y, hint), again(x, t, ctx, y, hint)
    assert all(torch.equal(p, q) for p, q in zip(a.skips + [a.middle], b.skips + [b.middle]))


def test_union_matches_diffusers(refs):
    model = load_control_model(refs["dir"] / "union")  # head width from its config.json
    assert model.kind == "union" and model.cfg.union_types == 8
    x, t, ctx, pooled, time_ids, y, hint = _inputs()
    for name, idx in (("canny", 3), ("depth", 1), ("tile", 6)):
        control_type = torch.zeros(2, 8)
        control_type[:, idx] = 1
        with torch.no_grad():
            ref = refs["union"](x, t, ctx, [hint.expand(2, -1, -1, -1)], control_type, [idx],
                                added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids},
                                return_dict=False)
            ours = model(x, t, ctx, y, hint, control_type=name)
        assert _max_err(ref, ours) < 1e-5, name
    with pytest.raises(RequestError, match=r"'bogus' is not a control type.*0 openpose.*7 repaint"):
        model(x, t, ctx, y, hint, control_type="bogus")


def _control_image() -> Image.Image:
    small = np.random.default_rng(3).integers(0, 255, (H // 8, W // 8, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((W, H), Image.NEAREST)


@pytest.fixture(scope="module")
def ours(tiny_files):
    import sdxl

    return sdxl.load(tiny_files["base"])


@pytest.mark.parametrize("layout,weight,start,end",
                         [("folder", 1.0, 0.0, 1.0), ("single-file", 0.5, 0.2, 0.5)])
def test_pipeline_matches_diffusers(refs, ours, layout, weight, start, end):
    """A1111's step rule (start <= i/n <= end) equals diffusers' (i/n >= start, (i+1)/n <= end) with
    diffusers' end one step later: 5 steps, 0.2..0.5 here is steps 1 and 2, diffusers' 0.2..0.7."""
    from diffusers import StableDiffusionXLControlNetPipeline

    path = refs["dir"] / ("cn" if layout == "folder" else "cn.safetensors")
    c = refs["comps"]
    pipe = StableDiffusionXLControlNetPipeline(
        vae=c["vae"], text_encoder=c["text_encoder"], text_encoder_2=c["text_encoder_2"],
        tokenizer=c["tokenizer"], tokenizer_2=c["tokenizer_2"], unet=c["unet"], controlnet=refs["cn"],
        scheduler=euler_scheduler(), add_watermarker=False)
    image = _control_image()
    args = dict(negative_prompt=None, num_inference_steps=5, guidance_scale=5.0, width=W, height=H,
                control_guidance_start=start, control_guidance_end=end + 0.2 if end < 1 else end)
    with torch.no_grad():
        ref = {kind: pipe(PROMPT, image=image, generator=torch.Generator("cpu").manual_seed(42),
                          output_type=kind, controlnet_conditioning_scale=weight, **args).images
               for kind in ("np", "latent")}
        ref_plain = pipe(PROMPT, image=image, generator=torch.Generator("cpu").manual_seed(42),
                         output_type="latent", controlnet_conditioning_scale=0.0, **args).images
    req = GenerationRequest(prompt=PROMPT, width=W, height=H, steps=5, cfg=5.0, seed=42, sampler="euler",
                            schedule="leading")
    unit = ControlUnit(model=str(path), image=image, weight=weight, start=start, end=end)
    result = ours.generate(req.replace(controls=(unit,)))
    plain = ours.generate(req)
    assert psnr(np.asarray(result.images[0]), to_uint8(ref["np"])[0]) >= 40.0
    # A random tiny UNet predicts small noise, so the image is mostly the seed's; the control's own effect on
    # the final latents is compared too, relative to its size
    effect, ref_effect = result.latents - plain.latents, ref["latent"] - ref_plain
    assert ref_effect.norm() > 1e-3 * ref_plain.norm()
    assert (effect - ref_effect).norm() < 1e-3 * ref_effect.norm()


def _units(model, mode: str, hint) -> list[ActiveUnit]:
    return [ActiveUnit(model, hint, None, 0.7, 0.0, 1.0, mode != "balanced", mode == "control")]


def test_control_modes(refs):
    """balanced: weight on every output and row; prompt: 0.825 ** (12 - k) soft weights; control: the same
    on the cond rows, nothing on the uncond rows (they come first)."""
    model = load_control_model(refs["dir"] / "cn.safetensors")
    x, t, ctx, _, _, y, hint = _inputs(3)
    with torch.no_grad():
        raw = model(x, t, ctx, y, hint)
        outs = {mode: make_control_fn(None, _units(model, mode, hint), 10)(x, t, ctx, y, 4, 1)
                for mode in ("balanced", "prompt", "control")}
    soft = model.output_scales(0.7, 10, True)
    assert soft[0] == pytest.approx(0.7 * 0.825 ** 12) and soft[-1] == pytest.approx(0.7 * 0.825 ** 3)
    for k, r in enumerate(raw.skips + [raw.middle]):
        got = {m: (o.skips + [o.middle])[k] for m, o in outs.items()}
        torch.testing.assert_close(got["balanced"], r * 0.7)
        torch.testing.assert_close(got["prompt"], r * soft[k])
        assert not got["control"][:1].any()  # the uncond row: untouched
        torch.testing.assert_close(got["control"][1:], r[1:] * soft[k], rtol=1e-4, atol=1e-6)
    # several units sum: 0.3 + 0.4 balanced is 0.7 balanced
    two = [ActiveUnit(model, hint, None, w, 0.0, 1.0, False, False) for w in (0.3, 0.4)]
    with torch.no_grad():
        summed = make_control_fn(None, two, 10)(x, t, ctx, y, 4, 1)
    for a, b in zip(summed.skips + [summed.middle], outs["balanced"].skips + [outs["balanced"].middle]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # IP-Adapter image tokens at the end of the context (pipe.ip_files.image_tokens while a request runs) are
    # not the ControlNet's: it sees the text tokens only
    pipe = SimpleNamespace(ip_files=SimpleNamespace(image_tokens=4))
    with torch.no_grad():
        with_images = make_control_fn(pipe, _units(model, "balanced", hint), 10)(
            x, t, torch.cat([ctx, torch.randn(3, 4, 96)], dim=1), y, 4, 1)
    torch.testing.assert_close(with_images.middle, outs["balanced"].middle)
    # outside start..end nothing is added
    late = [ActiveUnit(model, hint, None, 1.0, 0.5, 1.0, False, False)]
    assert make_control_fn(None, late, 10)(x, t, ctx, y, 4, 1) is None


def test_inpainting_and_hires_run_with_control(refs, tiny_files, monkeypatch):
    """A 9-channel inpainting UNet: the ControlNet reads the 4 latent channels (its conv_in takes no more) and
    changes the result; the hires pass prepares the hint at its own size."""
    import sdxl
    import sdxl.control

    sizes = []
    prepare = sdxl.control.prepare_control_image
    monkeypatch.setattr(sdxl.control, "prepare_control_image",
                        lambda image, *a: sizes.append(a[-2:]) or prepare(image, *a))
    pipe = sdxl.load(tiny_files["inpaint"])
    unit = ControlUnit(model=str(refs["dir"] / "cn.safetensors"), image=_control_image())
    req = GenerationRequest(prompt=PROMPT, width=W, height=H, steps=3, seed=1, init_image=_control_image(),
                            mask_image=Image.new("L", (W, H), 255), strength=1.0)
    a = pipe.generate(req).latents
    b = pipe.generate(req.replace(controls=(unit,))).latents
    assert (a - b).norm() > 1e-4 * a.norm()
    hires = GenerationRequest(prompt=PROMPT, width=W, height=H, steps=2, seed=1, hires_scale=1.5,
                              hires_upscaler="Latent", hires_steps=2, controls=(unit,))
    assert sdxl.load(tiny_files["base"]).generate(hires).images[0].size == (96, 96)
    assert sizes == [(W, H), (W, H), (96, 96)]


def test_refiner_gets_no_control(refs, tiny_files, ours):
    """Control applies to the base only: the refiner (bigG-only context, 64 wide) could not even run this
    ControlNet (text width 96), and the base's share of the schedule is controlled."""
    unit = ControlUnit(model=str(refs["dir"] / "cn.safetensors"), image=_control_image())
    req = GenerationRequest(prompt=PROMPT, width=W, height=H, steps=4, seed=1,
                            refiner=str(tiny_files["refiner"]), refiner_switch=0.5)
    a = ours.generate(req).latents
    b = ours.generate(req.replace(controls=(unit,))).latents
    assert (a - b).norm() > 1e-4 * a.norm()


def test_model_names_resolve_in_the_control_folder(refs, tmp_path):
    """Names (A1111's "name [hash]" too) resolve inside the folder; paths only where allowed."""
    from sdxl.control import resolve_control_model

    shutil.copy(refs["dir"] / "cn.safetensors", tmp_path / "canny_xl.safetensors")
    found = resolve_control_model("canny_xl [a1b2c3d4]", [tmp_path], allow_paths=False)
    assert found == (tmp_path / "canny_xl.safetensors").resolve()
    with pytest.raises(RequestError, match=r"controls\[0\]\.model: .*'\.\./x'"):
        resolve_control_model("../x", [tmp_path], allow_paths=False)
    with pytest.raises(RequestError, match="not a path"):
        resolve_control_model(str(refs["dir"] / "cn.safetensors"), [tmp_path], allow_paths=False)


def test_bad_inputs_are_one_line(refs, tiny_files, ours):
    from typer.testing import CliRunner

    import sdxl
    from sdxl.cli import app

    res = CliRunner().invoke(app, ["generate", "x", "--model", str(refs["dir"] / "cn.safetensors"),
                                   "--steps", "1", "--quiet"])
    assert res.exit_code != 0
    msg = res.output.strip()
    assert "ControlNet" in msg and "cn.safetensors" in msg and len(msg.splitlines()) == 1, msg
    with pytest.raises(CheckpointError, match=r"cn: is a ControlNetModel folder, not an SDXL checkpoint"):
        sdxl.load(refs["dir"] / "cn")
    with pytest.raises(CheckpointError, match=r"base\.safetensors: not a ControlNet.*SDXL checkpoint") as e:
        load_control_model(tiny_files["base"])
    assert "\n" not in str(e.value)
    req = GenerationRequest(prompt=PROMPT, width=W, height=H, steps=1,
                            controls=[{"model": str(tiny_files["base"]), "image": _control_image()}])
    with pytest.raises(RequestError, match=r"controls\[0\]\.model: .*not a ControlNet") as e:
        ours.generate(req)
    assert "\n" not in str(e.value)
    req = req.replace(controls=(ControlUnit(model=str(refs["dir"] / "union"), image=_control_image(),
                                            control_type="sketchy"),))
    with pytest.raises(RequestError, match=r"controls\[0\]\.control_type: 'sketchy' is not a control type"):
        ours.generate(req)
    with pytest.raises(RequestError, match=r"known: openpose, depth, .*repaint\)$"):  # before any model loads
        req.validate()
