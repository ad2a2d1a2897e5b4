"""Control-LoRA (stabilityai/control-lora): a tiny random file in the real key layout (sgm ControlNet names,
a `lora_controlnet` marker, `<layer>.up` / `<layer>.down` pairs for the weights the ControlNet shares with the
UNet, biases / norms / hint encoder / zero convs in full) is loaded on a tiny base UNet and its effective
ControlNet weights are compared with the documented key maths computed here by hand:

    weight = base UNet weight + up.flatten(1) @ down.flatten(1) (reshaped), other tensors: the file's, else
    the base UNet's.

Tolerance: 1e-6 absolute on float32 weights (the same float32 matmul on both sides).
"""

from __future__ import annotations

import pytest
import torch

from reference import randomize
from sdxl.errors import CheckpointError
from sdxl.models.config import tiny_config
from sdxl.models.controlnet import ControlNet, ControlNetConfig
from sdxl.models.unet import UNet
from sdxl.weights.control_lora import MARKER, is_control_lora, load_control_lora
from sdxl.weights.io import open_tensors, save_safetensors

RANK = 4
HINT = (16, 32, 96, 256)  # the published files' hint encoder widths (sgm cldm)


def make_control_lora(base: UNet, seed: int = 7, omit_full=()) -> dict[str, torch.Tensor]:
    """A Control-LoRA in the published layout for `base`'s architecture: low-rank pairs for every shared
    Linear / Conv2d weight (conv: up [out, r, 1, 1], down [r, in, k, k]; linear: up [out, r], down [r, in]),
    every shared bias / norm tensor in full (but those in `omit_full`), the ControlNet-only tensors in
    full."""
    g = torch.Generator().manual_seed(seed)
    cn = ControlNet(ControlNetConfig(unet=base.cfg, hint_channels=HINT))
    shared = base.state_dict()
    out: dict[str, torch.Tensor] = {MARKER: torch.tensor([])}
    for key, p in cn.state_dict().items():
        layer, _, leaf = key.rpartition(".")
        if key in shared and leaf == "weight" and p.ndim >= 2:
            if p.ndim == 4:
                up = torch.randn(p.shape[0], RANK, 1, 1, generator=g) * 0.1
                down = torch.randn(RANK, *p.shape[1:], generator=g) * 0.1
            else:
                up = torch.randn(p.shape[0], RANK, generator=g) * 0.1
                down = torch.randn(RANK, p.shape[1], generator=g) * 0.1
            out[f"{layer}.up"], out[f"{layer}.down"] = up, down
        elif key not in omit_full:
            out[key] = torch.randn(p.shape, generator=g) * 0.05 + (1.0 if "norm" in key or "layers.0" in key
                                                                    else 0.0) * (leaf == "weight")
    return out


@pytest.fixture(scope="module")
def base():
    return randomize(UNet(tiny_config().unet), 0).eval()


def test_effective_weights_follow_the_key_maths(base, tmp_path):
    omit = ("label_emb.0.0.bias", "input_blocks.4.1.norm.weight")  # these come from the base UNet
    tensors = make_control_lora(base, omit_full=omit)
    path = save_safetensors(tensors, tmp_path / "control-lora-canny-rank4.safetensors")
    f = open_tensors(path)
    assert is_control_lora(f.keys())
    cn = load_control_lora(f, base, name=path.name)
    assert cn.kind == "controlnet"
    base_sd = base.state_dict()
    got = cn.state_dict()
    n_lora = n_full = n_base = 0
    for key, value in got.items():
        layer, _, leaf = key.rpartition(".")
        if f"{layer}.up" in tensors and leaf == "weight":
            w = base_sd[key]
            up, down = tensors[f"{layer}.up"].flatten(1), tensors[f"{layer}.down"].flatten(1)
            by_hand = w + (up @ down).reshape(w.shape)
            n_lora += 1
        elif key in tensors:
            by_hand = tensors[key]
            n_full += 1
        else:
            by_hand = base_sd[key]
            n_base += 1
        assert torch.allclose(value, by_hand, atol=1e-6, rtol=0), key
    assert n_base == len(omit)
    assert n_lora > 50 and n_full > 50
    # the pieces the UNet lacks are the file's own
    assert torch.equal(got["input_hint_block.14.weight"], tensors["input_hint_block.14.weight"])
    assert torch.equal(got["middle_block_out.0.bias"], tensors["middle_block_out.0.bias"])
    # and a LoRA layer really moved off the base weight
    assert not torch.allclose(got["input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"],
                              base_sd["input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"])

    x = torch.randn(2, 4, 8, 8)
    context = torch.randn(2, 7, base.cfg.context_dim)
    y = torch.randn(2, base.cfg.adm_in_channels)
    hint = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        control = cn(x, torch.tensor([10.0, 900.0]), context, y, hint)
        plain = base(x, torch.tensor([10.0, 900.0]), context, y)
        out = base(x, torch.tensor([10.0, 900.0]), context, y, control=control)
    assert len(control.skips) == len(base.input_blocks)
    assert torch.isfinite(out).all() and (out - plain).abs().max() > 1e-3


def test_bad_files_one_line(base, tmp_path):
    tensors = make_control_lora(base)
    with pytest.raises(CheckpointError, match="needs the base model's UNet"):
        load_control_lora(tensors, None, name="cl.safetensors")
    # a file for another base model: its updates do not fit this UNet's layers
    other = randomize(UNet(tiny_config("refiner").unet), 1)
    with pytest.raises(CheckpointError, match="cl.safetensors") as e:
        load_control_lora(tensors, other, name="cl.safetensors")
    assert "\n" not in str(e.value)
    broken = dict(tensors)
    broken["output_blocks.0.0.in_layers.2.up"] = torch.zeros(1, 1)
    with pytest.raises(CheckpointError, match="match no ControlNet layer"):
        load_control_lora(broken, base, name="cl.safetensors")
    broken = {k: v for k, v in tensors.items() if not k.startswith("zero_convs.3.")}
    with pytest.raises(CheckpointError, match="zero_convs.3.0"):
        load_control_lora(broken, base, name="cl.safetensors")


def test_controlnet_matches_diffusers_control_lora_loader(base):
    """Independent check of the names and maths: diffusers' `ControlNetModel.from_unet` + `load_lora_adapter`
    on the same file gives the same residuals (1e-5 relative, fp32). One difference is bridged by hand:
    diffusers' PEFT path keeps the base UNet's biases on the low-rank layers, while the file stores them in
    full and ComfyUI (whose loader came with the files) uses the file's; the reference's base UNet gets the
    file's biases for those layers."""
    import copy
    import warnings

    from diffusers import ControlNetModel

    from sdxl.models.conditioning import micro_conditioning
    from test_t2i_adapter import diffusers_unet

    tensors = make_control_lora(base, seed=11)
    cn = load_control_lora(tensors, base)
    with_biases = copy.deepcopy(base)
    sd = with_biases.state_dict()
    lora_biases = [k for k in sd if k.endswith(".bias") and f"{k[:-5]}.up" in tensors]
    assert len(lora_biases) > 50
    with_biases.load_state_dict({**sd, **{k: tensors[k] for k in lora_biases}})
    ref = ControlNetModel.from_unet(diffusers_unet(with_biases), conditioning_embedding_out_channels=HINT)
    with warnings.catch_warnings():  # PEFT: target name conv_in also matches the hint encoder's conv_in
        warnings.simplefilter("ignore")
        ref.load_lora_adapter({k: v.clone() for k, v in tensors.items()}, prefix=None)
    ref.eval()

    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 8, 6, generator=g)
    t = torch.tensor([10.0, 900.0])
    context = torch.randn(2, 7, base.cfg.context_dim, generator=g)
    pooled = torch.randn(2, base.cfg.adm_in_channels - 6 * 256, generator=g)
    numbers = torch.tensor([[512.0, 384.0, 0.0, 0.0, 512.0, 384.0]] * 2)
    hint = torch.rand(1, 3, 64, 48, generator=g)
    with torch.no_grad():
        ours = cn(x, t, context, micro_conditioning(pooled, numbers), hint)
        down, mid = ref(x, t, encoder_hidden_states=context, controlnet_cond=hint.expand(2, -1, -1, -1),
                        added_cond_kwargs={"text_embeds": pooled, "time_ids": numbers}, return_dict=False)
    assert len(ours.skips) == len(down)
    for a, b in zip(list(ours.skips) + [ours.middle], list(down) + [mid]):
        assert ((a - b).abs().max() / b.abs().max()).item() <= 1e-5


def test_load_control_model_needs_the_unet(base, tmp_path):
    """load_control_model reads the kind off the marker; with the UNet it builds the ControlNet, with only
    the UNet's config it is a one-line error."""
    from sdxl.weights.control import detect_control_kind, load_control_model

    tensors = make_control_lora(base, seed=5)
    path = save_safetensors(tensors, tmp_path / "control-lora-depth-rank4.safetensors")
    assert detect_control_kind(tensors.keys()) == "control-lora"
    cn = load_control_model(path, base)
    assert isinstance(cn, ControlNet) and cn.kind == "controlnet"
    direct = load_control_lora(tensors, base)
    for k, v in direct.state_dict().items():
        assert torch.equal(cn.state_dict()[k], v), k
    with pytest.raises(CheckpointError, match="needs the base model's UNet") as e:
        load_control_model(path, base.cfg)
    assert path.name in str(e.value) and "\n" not in str(e.value)


def test_controlled_generation_runs(tmp_path):
    """A Control-LoRA unit through the pipeline: its ControlNet is built on the loaded model's own UNet and
    changes the result; at weight 0 the result is the plain one."""
    import dataclasses

    from PIL import Image

    from conftest import tiny_pipeline
    from sdxl.request import ControlUnit, GenerationRequest

    pipe = tiny_pipeline(seed=4)
    randomize(pipe.unet, 4)  # full-scale weights, so the control shows
    path = save_safetensors(make_control_lora(pipe.unet, seed=6), tmp_path / "control-lora-canny.safetensors")
    image = Image.linear_gradient("L").convert("RGB").resize((64, 64))
    req = GenerationRequest(prompt="a cat", width=64, height=64, steps=3, cfg=5.0, seed=3, sampler="euler")
    plain = pipe.generate(req).latents
    unit = ControlUnit(model=str(path), image=image, weight=0.8, resize_mode="resize")
    controlled = pipe.generate(req.replace(controls=(unit,))).latents
    off = pipe.generate(req.replace(controls=(dataclasses.replace(unit, weight=0.0),))).latents
    assert torch.isfinite(controlled).all()
    assert (controlled - plain).abs().max() > 1e-2 * plain.abs().max()
    torch.testing.assert_close(off, plain, rtol=0, atol=1e-6)

    # another UNet on the same pipeline (a --unet override): the Control-LoRA is built again on it, not
    # taken from the cache built on the first one
    first = next(iter(pipe._control_cache.values()))
    pipe.unet = randomize(type(pipe.unet)(pipe.unet.cfg), 5).eval()
    pipe.generate(req.replace(controls=(unit,)))
    assert len(pipe._control_cache) == 1
    rebuilt = next(iter(pipe._control_cache.values()))
    assert rebuilt is not first
    name = "input_blocks.1.0.in_layers.2.weight"  # a low-rank layer: base + up @ down
    assert not torch.equal(rebuilt.state_dict()[name], first.state_dict()[name])
