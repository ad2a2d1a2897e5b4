"""IP-Adapter: the CLIP vision tower, the adapter files and the whole pipeline against diffusers and
transformers.

References: transformers' CLIPVisionModelWithProjection and CLIPImageProcessor (tiny random tower, 1e-5 in
fp32); diffusers' StableDiffusionXLPipeline + load_ip_adapter from local files (a tiny random adapter in the
real h94/IP-Adapter key layout, a local image_encoder/ folder), euler / leading, seed 42: PSNR >= 40 dB on the
8-bit image. The tiny checkpoint's UNet is drawn with std 0.1 (the conftest files' 0.02 leaves the image
almost independent of the context: the adapter would move it by < 1 dB and the parity test would prove
nothing); here the adapter moves the image to ~20 dB from the one without it.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from reference import diffusers_base_pipeline, psnr, to_uint8
from sdxl.errors import CheckpointError, RequestError
from sdxl.ip_conditioning import text_context
from sdxl.models.clip_vision import preprocess
from sdxl.models.config import tiny_config
from sdxl.models.ip_adapter import IPAttention, cross_attentions
from sdxl.models.unet import UNet
from sdxl.pipeline import SDXL
from sdxl.request import GenerationRequest, IPAdapterUnit
from sdxl.weights.checkpoint import random_checkpoint, write_single_file
from sdxl.weights.ip_adapter import load_image_encoder, load_ip_adapter

ENC = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2, image_size=32,
           patch_size=8, projection_dim=48, hidden_act="gelu")
GEN = dict(prompt="a photo of a red cat", width=64, height=64, steps=5, cfg=5.0, seed=42, sampler="euler",
           schedule="leading")


def _hf_encoder(seed: int = 0):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    return CLIPVisionModelWithProjection(CLIPVisionConfig(**ENC)).eval()


def _open_clip_keys(sd: dict) -> dict:
    """transformers CLIPVisionModelWithProjection names -> open_clip's `visual.*` (what open_clip saves)."""
    out = {}
    v = {k.removeprefix("vision_model."): t for k, t in sd.items()}
    out["visual.class_embedding"] = v["embeddings.class_embedding"]
    out["visual.positional_embedding"] = v["embeddings.position_embedding.weight"]
    out["visual.conv1.weight"] = v["embeddings.patch_embedding.weight"]
    for a, b in (("pre_layrnorm", "ln_pre"), ("post_layernorm", "ln_post")):
        for p in ("weight", "bias"):
            out[f"visual.{b}.{p}"] = v[f"{a}.{p}"]
    out["visual.proj"] = v["visual_projection.weight"].t().contiguous()
    for i in range(ENC["num_hidden_layers"]):
        src, dst = f"encoder.layers.{i}.", f"visual.transformer.resblocks.{i}."
        for p in ("weight", "bias"):
            out[dst + f"attn.in_proj_{p}"] = torch.cat([v[src + f"self_attn.{n}_proj.{p}"] for n in "qkv"])
            out[dst + f"attn.out_proj.{p}"] = v[src + f"self_attn.out_proj.{p}"]
            out[dst + f"ln_1.{p}"] = v[src + f"layer_norm1.{p}"]
            out[dst + f"ln_2.{p}"] = v[src + f"layer_norm2.{p}"]
            out[dst + f"mlp.c_fc.{p}"] = v[src + f"mlp.fc1.{p}"]
            out[dst + f"mlp.c_proj.{p}"] = v[src + f"mlp.fc2.{p}"]
    out["positional_embedding"] = torch.zeros(77, 8)  # a whole CLIP model's text part is ignored
    return out


def _image(seed: int, h: int, w: int) -> Image.Image:
    return Image.fromarray((np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8))


def test_vision_tower_matches_transformers(tmp_path):
    """Folder (config.json + model.safetensors), transformers-keyed single file and open_clip file:
    image_embeds and the penultimate hidden states equal transformers' to 1e-5."""
    hf = _hf_encoder()
    hf.save_pretrained(tmp_path / "image_encoder")
    sd = hf.state_dict()
    save_file({k: t.contiguous() for k, t in sd.items()}, tmp_path / "clip_vision.safetensors")
    save_file(_open_clip_keys(sd), tmp_path / "open_clip.safetensors")
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = hf(pixels, output_hidden_states=True)
    for path in ("image_encoder", "clip_vision.safetensors", "open_clip.safetensors"):
        tower = load_image_encoder(tmp_path / path)
        assert tower.cfg.heads == 2 and tower.cfg.layers == 2 and tower.cfg.image_size == 32
        with torch.no_grad():
            torch.testing.assert_close(tower(pixels), ref.image_embeds, rtol=0, atol=1e-5)
            hidden = tower(pixels, penultimate=True)
            torch.testing.assert_close(hidden, ref.hidden_states[-2], rtol=0, atol=1e-5)


def test_preprocess_matches_clip_image_processor():
    from transformers import CLIPImageProcessor

    proc = CLIPImageProcessor(size=224, crop_size=224)
    images = [_image(1, 300, 200), _image(2, 100, 333), _image(3, 224, 224), _image(4, 57, 61)]
    ref = proc(images, return_tensors="pt").pixel_values
    torch.testing.assert_close(preprocess(images, 224), ref, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------- adapter files
def _plain_proj(g, c: int, embed: int) -> dict:
    return {"image_proj.proj.weight": torch.randn(4 * c, embed, generator=g) * 0.2,
            "image_proj.proj.bias": torch.randn(4 * c, generator=g) * 0.1,
            "image_proj.norm.weight": 1 + 0.1 * torch.randn(c, generator=g),
            "image_proj.norm.bias": 0.1 * torch.randn(c, generator=g)}


def _plus_proj(g, c: int, embed: int, dim: int = 64, queries: int = 6) -> dict:
    """The original Resampler's names; depth 4 and dim_head 64, which diffusers' converter assumes."""
    sd = {"image_proj.latents": torch.randn(1, queries, dim, generator=g) / dim**0.5,
          "image_proj.proj_in.weight": torch.randn(dim, embed, generator=g) * 0.1,
          "image_proj.proj_in.bias": torch.randn(dim, generator=g) * 0.1,
          "image_proj.proj_out.weight": torch.randn(c, dim, generator=g) * 0.1,
          "image_proj.proj_out.bias": torch.randn(c, generator=g) * 0.1,
          "image_proj.norm_out.weight": 1 + 0.1 * torch.randn(c, generator=g),
          "image_proj.norm_out.bias": 0.1 * torch.randn(c, generator=g)}
    for i in range(4):
        p = f"image_proj.layers.{i}."
        for n in ("0.norm1", "0.norm2", "1.0"):
            sd[p + n + ".weight"] = 1 + 0.1 * torch.randn(dim, generator=g)
            sd[p + n + ".bias"] = 0.1 * torch.randn(dim, generator=g)
        sd[p + "0.to_q.weight"] = torch.randn(64, dim, generator=g) * 0.1
        sd[p + "0.to_kv.weight"] = torch.randn(128, dim, generator=g) * 0.1
        sd[p + "0.to_out.weight"] = torch.randn(dim, 64, generator=g) * 0.1
        sd[p + "1.1.weight"] = torch.randn(4 * dim, dim, generator=g) * 0.1
        sd[p + "1.3.weight"] = torch.randn(dim, 4 * dim, generator=g) * 0.1
    return sd


def _ip_layers(g, unet: UNet, c: int, skip_last: bool = False) -> dict:
    sd = {}
    blocks = cross_attentions(unet)
    for k, (tb, _) in enumerate(blocks[:-1] if skip_last else blocks):
        w = tb.attn2.to_q.out_features
        sd[f"ip_adapter.{2 * k + 1}.to_k_ip.weight"] = torch.randn(w, c, generator=g) * 0.3
        sd[f"ip_adapter.{2 * k + 1}.to_v_ip.weight"] = torch.randn(w, c, generator=g) * 0.3
    return sd


@pytest.fixture(scope="module")
def ip_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("ip")
    ck = random_checkpoint(tiny_config(), seed=10)
    ck.parts["unet"] = random_checkpoint(tiny_config(), seed=11, std=0.1).parts["unet"]
    base = write_single_file(ck, d / "base.safetensors")
    _hf_encoder().save_pretrained(d / "image_encoder")
    unet = UNet(tiny_config().unet)
    c = tiny_config().unet.context_dim
    g = torch.Generator().manual_seed(1)
    save_file({**_plain_proj(g, c, ENC["projection_dim"]), **_ip_layers(g, unet, c)},
              d / "ip_plain.safetensors")
    save_file({**_plus_proj(g, c, ENC["hidden_size"]), **_ip_layers(g, unet, c)}, d / "ip_plus.safetensors")
    return {"dir": d, "base": base, "plain": d / "ip_plain.safetensors", "plus": d / "ip_plus.safetensors",
            "encoder": d / "image_encoder"}


@pytest.fixture(scope="module")
def ours(ip_files):
    return SDXL.load(ip_files["base"])


@pytest.fixture(scope="module")
def reference(ip_files):
    return diffusers_base_pipeline(ip_files["base"], ip_files["dir"])


def _run_reference(ref, weights: list[str], images: list, scales, steps_active=None):
    """diffusers with `weights` loaded; `steps_active(i)` -> the scales to use on step i (set after step i - 1
    through callback_on_step_end, the pipeline's hook for that)."""
    if getattr(ref.unet, "encoder_hid_proj", None) is not None:
        ref.unload_ip_adapter()
    ref.load_ip_adapter(str(weights[0].parent), subfolder="", weight_name=[w.name for w in weights],
                        image_encoder_folder="image_encoder")
    ref.set_ip_adapter_scale(steps_active(0) if steps_active else scales)

    def callback(pipe, i, t, kwargs):
        if steps_active is not None:
            pipe.set_ip_adapter_scale(steps_active(i + 1))
        return {}

    with torch.no_grad():
        out = ref(GEN["prompt"], negative_prompt=None, num_inference_steps=GEN["steps"],
                  guidance_scale=GEN["cfg"], width=GEN["width"], height=GEN["height"],
                  ip_adapter_image=images,
                  generator=torch.Generator("cpu").manual_seed(GEN["seed"]), output_type="np",
                  callback_on_step_end=callback).images
    return to_uint8(out)[0]


def test_plain_matches_diffusers(ip_files, ours, reference):
    img = _image(5, 40, 56)
    unit = IPAdapterUnit(model=str(ip_files["plain"]), images=(img,), image_encoder=str(ip_files["encoder"]))
    got = np.asarray(ours.generate(GenerationRequest(**GEN, ip_adapters=(unit,))).images[0])
    plain = np.asarray(ours.generate(GenerationRequest(**GEN)).images[0])
    ref = _run_reference(reference, [ip_files["plain"]], [img], 1.0)
    assert psnr(got, ref) >= 40.0
    assert psnr(got, plain) < 30.0, "the adapter should change this image"


def test_plain_and_plus_with_steps_match_diffusers(ip_files, ours, reference):
    """Two adapters at once (their tokens one after the other), plus with two reference images (tokens
    concatenated), the plus unit on steps 2 and 3 of 5 only (start 0.4, end 0.6): diffusers with the plus
    scale switched by callback_on_step_end."""
    a, b1, b2 = _image(5, 40, 56), _image(6, 48, 32), _image(7, 32, 32)
    units = (IPAdapterUnit(model=str(ip_files["plain"]), images=(a,), scale=0.7),
             IPAdapterUnit(model=str(ip_files["plus"]), images=(b1, b2), start=0.4, end=0.6))
    # no image_encoder named: both find the image_encoder/ folder beside them (h94/IP-Adapter's layout)
    got = np.asarray(ours.generate(GenerationRequest(**GEN, ip_adapters=units)).images[0])
    ref = _run_reference(reference, [ip_files["plain"], ip_files["plus"]], [a, [b1, b2]], None,
                         steps_active=lambda i: [0.7, 1.0 if 2 <= i <= 3 else 0.0])
    assert psnr(got, ref) >= 40.0


def _faceid_file(path, unet: UNet, c: int, lora: bool) -> None:
    """A FaceID adapter (MLPProjModel over a 32-d face embedding, 4 tokens) and, with `lora`, the LoRA of the
    UNet's attention its files carry: keys N.to_q_lora.down.weight ... with N over attn1 (2k) and attn2
    (2k + 1) of every transformer block."""
    g = torch.Generator().manual_seed(2)
    sd = {"image_proj.proj.0.weight": torch.randn(64, 32, generator=g) * 0.2,
          "image_proj.proj.0.bias": torch.randn(64, generator=g) * 0.1,
          "image_proj.proj.2.weight": torch.randn(4 * c, 64, generator=g) * 0.2,
          "image_proj.proj.2.bias": torch.randn(4 * c, generator=g) * 0.1,
          "image_proj.norm.weight": 1 + 0.1 * torch.randn(c, generator=g),
          "image_proj.norm.bias": 0.1 * torch.randn(c, generator=g), **_ip_layers(g, unet, c)}
    for k, (tb, _) in enumerate(cross_attentions(unet) if lora else ()):
        w = tb.attn2.to_q.out_features
        for n, cross in ((2 * k, False), (2 * k + 1, True)):
            for p in ("to_q", "to_k", "to_v", "to_out"):
                width_in = c if cross and p in ("to_k", "to_v") else w
                sd[f"ip_adapter.{n}.{p}_lora.down.weight"] = torch.randn(4, width_in, generator=g) * 0.1
                sd[f"ip_adapter.{n}.{p}_lora.up.weight"] = torch.randn(w, 4, generator=g) * 0.1
    save_file(sd, path)


def test_faceid_with_lora_matches_diffusers(ip_files, ours, reference, tmp_path):
    """FaceID: face embeddings given (two of them), the negative branch projects zeros (diffusers' documented
    ip_adapter_image_embeds usage); the file's LoRA is on the UNet during the run (diffusers loads it through
    PEFT at weight 1) and off afterwards."""
    c = ours.config.unet.context_dim
    faceid = ip_files["dir"] / "faceid.safetensors"
    _faceid_file(faceid, UNet(tiny_config().unet), c, lora=True)
    _faceid_file(tmp_path / "faceid_nolora.safetensors", UNet(tiny_config().unet), c, lora=False)
    emb = torch.randn(2, 32, generator=torch.Generator().manual_seed(9))
    faces = tuple(tuple(e.tolist()) for e in emb)
    got = ours.generate(GenerationRequest(**GEN, ip_adapters=(IPAdapterUnit(model=str(faceid),
                                                                            face_embeddings=faces),)))
    no_lora = ours.generate(GenerationRequest(**GEN, ip_adapters=(IPAdapterUnit(
        model=str(tmp_path / "faceid_nolora.safetensors"), face_embeddings=faces),)))
    reference.unload_ip_adapter()
    reference.load_ip_adapter(str(ip_files["dir"]), subfolder="", weight_name="faceid.safetensors",
                              image_encoder_folder=None)
    try:
        with torch.no_grad():
            ref = reference(GEN["prompt"], negative_prompt=None, num_inference_steps=GEN["steps"],
                            guidance_scale=GEN["cfg"], width=GEN["width"], height=GEN["height"],
                            ip_adapter_image_embeds=[torch.cat([torch.zeros_like(emb[None]), emb[None]])],
                            generator=torch.Generator("cpu").manual_seed(GEN["seed"]),
                            output_type="np").images
    finally:
        reference.unload_lora_weights()
    got8 = np.asarray(got.images[0])
    assert psnr(got8, to_uint8(ref)[0]) >= 40.0
    assert psnr(got8, np.asarray(no_lora.images[0])) < 35.0, "the FaceID LoRA should change this image"
    assert not any(hasattr(m, "_lora_unfused_holds") and m._lora_unfused_holds for m in ours.unet.modules())


def test_scale_zero_and_undo(ip_files, ours):
    """Scale 0 gives the image without the adapter (bit for bit), and the UNet is restored after a request."""
    img = _image(5, 40, 56)
    gen = {**GEN, "steps": 2}
    plain = ours.generate(GenerationRequest(**gen)).latents
    unit = IPAdapterUnit(model=str(ip_files["plain"]), images=(img,), scale=0.0,
                         image_encoder=str(ip_files["encoder"]))
    zero = ours.generate(GenerationRequest(**gen, ip_adapters=(unit,))).latents
    torch.testing.assert_close(zero, plain, rtol=0, atol=0)
    assert not any(isinstance(tb.attn2, IPAttention) for tb, _ in cross_attentions(ours.unet))
    assert ours.ip_files.image_tokens == 0
    assert torch.equal(ours.generate(GenerationRequest(**gen)).latents, plain)


def test_zero_tokens_add_nothing(ip_files, ours):
    """Outside its steps an adapter's tokens are zeros: IPAttention then equals the plain cross-attention on
    the text (to_v_ip has no bias), and text_context strips the image tokens."""
    from sdxl.models.ip_adapter import apply_ip_adapters

    adapter = load_ip_adapter(ip_files["plain"])
    tb, _ = cross_attentions(ours.unet)[0]
    attn = tb.attn2
    x = torch.randn(2, 16, attn.to_q.in_features)
    text = torch.randn(2, 77, ours.config.unet.context_dim)
    state = apply_ip_adapters(ours.unet, [adapter], [1.0], [4])
    try:
        ours.ip_files.image_tokens = 4
        ctx = torch.cat([text, torch.zeros(2, 4, text.shape[2])], dim=1)
        assert torch.equal(text_context(ours, ctx), text)
        with torch.no_grad():
            torch.testing.assert_close(tb.attn2(x, ctx), attn(x, text), rtol=0, atol=1e-6)
            moved = tb.attn2(x, torch.cat([text, torch.randn(2, 4, text.shape[2])], dim=1))
        assert (moved - attn(x, text)).abs().max() > 1e-3
    finally:
        ours.ip_files.image_tokens = 0
        state.undo()
    assert tb.attn2 is attn


def test_bad_inputs(ip_files, ours, tmp_path):
    img = _image(5, 40, 56)

    def err(unit) -> str:
        with pytest.raises(RequestError) as e:
            ours.generate(GenerationRequest(**{**GEN, "steps": 2}, ip_adapters=(unit,)))
        msg = str(e.value)
        assert "\n" not in msg and "Traceback" not in msg
        return msg

    # no encoder named and none beside the adapter
    lone = tmp_path / "lone" / "ip.safetensors"
    lone.parent.mkdir()
    lone.write_bytes(ip_files["plain"].read_bytes())
    msg = err(IPAdapterUnit(model=str(lone), images=(img,)))
    assert "ip_adapters[0].image_encoder" in msg and "no image encoder found" in msg
    # an encoder whose output does not feed the adapter, and a file that is no encoder
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    CLIPVisionModelWithProjection(CLIPVisionConfig(**{**ENC, "projection_dim": 40})).save_pretrained(
        tmp_path / "enc40")
    msg = err(IPAdapterUnit(model=str(ip_files["plain"]), images=(img,),
                            image_encoder=str(tmp_path / "enc40")))
    assert msg.startswith("ip_adapters[0].image_encoder:")
    assert "projection_dim 40" in msg and "needs 48" in msg
    msg = err(IPAdapterUnit(model=str(ip_files["plus"]), images=(img,), image_encoder=str(lone)))
    assert msg.startswith("ip_adapters[0].image_encoder:") and "not a CLIP vision tower" in msg
    # an adapter made for another UNet: one cross-attention short, and another context width
    c = ours.config.unet.context_dim
    g = torch.Generator().manual_seed(3)
    short = tmp_path / "short.safetensors"
    save_file({**_plain_proj(g, c, 48), **_ip_layers(g, ours.unet, c, skip_last=True)}, short)
    msg = err(IPAdapterUnit(model=str(short), images=(img,), image_encoder=str(ip_files["encoder"])))
    assert "short.safetensors does not fit this model" in msg and "cross-attention" in msg
    # a non-image and a missing file
    text_file = tmp_path / "notes.png"
    text_file.write_text("not an image")
    msg = err(IPAdapterUnit(model=str(ip_files["plain"]), images=(str(text_file),),
                            image_encoder=str(ip_files["encoder"])))
    assert msg.startswith("ip_adapters[0].images[0]:") and "notes.png" in msg
    assert "not found" in err(IPAdapterUnit(model=str(tmp_path / "nope.safetensors"), images=(img,)))
    with pytest.raises(RequestError, match=r"ip_adapters\[0\]\.images\[0\]: .* is not an image or a path"):
        GenerationRequest(**GEN, ip_adapters=(IPAdapterUnit(model="x", images=(3,)),)).validate()
    # the checkpoint given as an adapter; a pickle without allow_pickle
    with pytest.raises(CheckpointError, match="not an IP-Adapter file"):
        load_ip_adapter(ip_files["base"])
    # the original .bin layout ({"image_proj": {...}, "ip_adapter": {...}}): refused without allow_pickle,
    # then read weights-only into the same adapter as the .safetensors release
    from safetensors.torch import load_file

    flat = load_file(ip_files["plain"])
    pickled = tmp_path / "ip.bin"
    torch.save({part: {k[len(part) + 1:]: v for k, v in flat.items() if k.startswith(part + ".")}
                for part in ("image_proj", "ip_adapter")}, pickled)
    with pytest.raises(CheckpointError, match="refused"):
        load_ip_adapter(pickled)
    a, b = load_ip_adapter(pickled, allow_pickle=True), load_ip_adapter(ip_files["plain"])
    assert a.spec == b.spec and all(torch.equal(x, y) for x, y in zip(a.state_dict().values(),
                                                                       b.state_dict().values()))


def test_with_pag_composable_prompt_editing_and_hires(ip_files, ours, tmp_path, caplog):
    """Image tokens ride on every context: AND sub-prompts, prompt editing, PAG's perturbed rows, a batch,
    and the hires pass all run with three adapters at once; the FaceID LoRA finds its layers under PAG's
    wrapper (no unmatched keys) and the UNet comes back plain."""
    faceid = tmp_path / "faceid.safetensors"
    _faceid_file(faceid, UNet(tiny_config().unet), ours.config.unet.context_dim, lora=True)
    img = _image(5, 40, 56)
    units = (IPAdapterUnit(model=str(ip_files["plain"]), images=(img,), scale=0.5),
             IPAdapterUnit(model=str(ip_files["plus"]), images=(img, img), start=0.5),
             IPAdapterUnit(model=str(faceid), face_embeddings=(tuple([0.1] * 32),), end=0.5))
    req = GenerationRequest(prompt="a [cat:dog:0.5] AND a tree :0.5", width=64, height=64, steps=2, seed=1,
                            batch=2, pag_scale=2.0, pag_layers="mid", hires_scale=1.5, hires_steps=2,
                            ip_adapters=units)
    with caplog.at_level("WARNING"):
        r = ours.generate(req)
    assert r.latents.shape == (2, 4, 12, 12) and torch.isfinite(r.latents).all()
    assert "FaceID LoRA" not in caplog.text
    assert not any(isinstance(tb.attn2, IPAttention) for tb, _ in cross_attentions(ours.unet))


def test_names_in_folders(ip_files, ours, tmp_path):
    """Server mode (names only): an adapter by stem inside the IP-Adapter folder, its encoder found in the
    folder's image_encoder/; a path or '..' is a one-line error naming the field; an encoder outside the
    folders is not picked up."""
    from sdxl.ip_conditioning import unit_tokens

    files = ours.ip_files
    files.dirs, files.allow_paths = [ip_files["dir"]], False
    try:
        adapter, tokens = unit_tokens(ours, IPAdapterUnit(model="ip_plain", images=(_image(5, 40, 56),)),
                                      "ip_adapters[0]")
        assert adapter.kind == "plain" and tokens.cond.shape == (1, 4, ours.config.unet.context_dim)
        for bad in (str(ip_files["plain"]), "../ip/ip_plain"):
            with pytest.raises(RequestError, match=r"^ip_adapters\[0\]\.model: "):
                unit_tokens(ours, IPAdapterUnit(model=bad, images=(_image(5, 40, 56),)), "ip_adapters[0]")
        # h94's layout puts the plus models' encoder in ../models/image_encoder: here that is outside the
        # adapter folder, so only a run that allows paths may use it
        (tmp_path / "adapters").mkdir()
        (tmp_path / "adapters" / "lone.safetensors").write_bytes(ip_files["plain"].read_bytes())
        shutil.copytree(ip_files["encoder"], tmp_path / "models" / "image_encoder")
        files.dirs = [tmp_path / "adapters"]
        unit = IPAdapterUnit(model="lone", images=(_image(5, 40, 56),))
        with pytest.raises(RequestError, match="no image encoder found"):
            unit_tokens(ours, unit, "ip_adapters[0]")
        files.allow_paths = True
        assert unit_tokens(ours, unit, "ip_adapters[0]")[1].cond.shape[1] == 4
    finally:
        files.dirs, files.allow_paths = [], True
