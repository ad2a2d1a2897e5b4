"""LoRA: kohya / PEFT / old-diffusers files, exact application, fuse / unfuse, training layers, kohya saving.

Models are the tiny SDXL (`tiny_config()`) with random weights, float32 on the CPU.

Tolerances (all relative: max|a - b| / max|b|):
- our hooked model vs. a copy whose weights were set to W + w * alpha / rank * up @ down (float64 maths):
  1e-5 (the two compute the same sum in a different order);
- ours vs. diffusers + PEFT loading a PEFT file: 1e-5 (brief); vs. diffusers loading our kohya file: 1e-4;
- where the same tensors go through the same code (weight 0, unfuse, key-spelling variants): bit-exact.
"""

from __future__ import annotations

import copy
import hashlib
import json
import struct

import pytest
import torch
from torch import nn

from reference import randomize as randomize_
from sdxl.metadata import addnet_hash
from sdxl.models import fast
from sdxl.models.config import tiny_config
from sdxl.models.text import CLIPTextTower
from sdxl.models.unet import UNet
from sdxl.weights import lora as L
from sdxl.weights.diffusers_layout import unet_diffusers_config, unet_sgm_to_diffusers
from sdxl.weights.io import CheckpointError, open_tensors, save_safetensors

CFG = tiny_config()
REL_TOL = 1e-5


# ---------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def make_models(seed: int = 0) -> dict[str, nn.Module]:
    return {
        "unet": randomize_(UNet(CFG.unet), seed).eval(),
        "te1": randomize_(CLIPTextTower(CFG.text_l), seed + 1).eval(),
        "te2": randomize_(CLIPTextTower(CFG.text_g), seed + 2).eval(),
    }


def inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, CFG.unet.in_channels, 16, 16, generator=g)
    t = torch.tensor([17.0, 803.0])
    context = torch.randn(2, 9, CFG.unet.context_dim, generator=g)
    y = torch.randn(2, CFG.unet.adm_in_channels, generator=g)
    ids = torch.randint(1, 49000, (2, 12), generator=g)
    ids[:, 7] = 49407  # end of text (the largest id: the pooled position)
    return x, t, context, y, ids


@torch.no_grad()
def outputs(models: dict[str, nn.Module]) -> list[torch.Tensor]:
    x, t, context, y, ids = inputs()
    h1, _ = models["te1"](ids)
    h2, pooled = models["te2"](ids)
    return [models["unet"](x, t, context, y), h1, h2, pooled]


def assert_close(got: list[torch.Tensor], want: list[torch.Tensor], tol: float = REL_TOL) -> None:
    for a, b in zip(got, want):
        assert rel_err(a, b) <= tol, rel_err(a, b)


def assert_equal(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def assert_state(models: dict[str, nn.Module], state: dict[str, dict[str, torch.Tensor]]) -> None:
    """Every tensor of every model is bit-identical to the saved state."""
    for part, saved in state.items():
        now = models[part].state_dict()
        assert now.keys() == saved.keys()
        for k, v in saved.items():
            assert torch.equal(now[k], v), (part, k)


def assert_differ(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    for a, b in zip(got, want):
        assert rel_err(a, b) > 1e-3  # the LoRA really changes every output


def train_layers(
    models: dict[str, nn.Module], seed: int, rank: int = 4, alpha: float = 2.0, conv: bool = True
):
    """Inject kohya layers in all three models and give lora_up random values (it starts at zero)."""
    layers = {
        "unet": L.inject_lora(models["unet"], rank, alpha, conv=conv, conv_rank=2, conv_alpha=3.0),
        "te1": L.inject_lora(models["te1"], rank, alpha),
        "te2": L.inject_lora(models["te2"], rank, alpha),
    }
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for d in layers.values():
            for layer in d.values():
                w = layer.lora_up.weight
                w.copy_(torch.randn(w.shape, generator=g) * 0.3)
    return layers


def remove_layers(layers) -> None:
    for d in layers.values():
        for layer in d.values():
            layer.remove()


def write_kohya(tmp_path, seed: int, name: str = "lora.safetensors", conv: bool = True) -> tuple:
    """A kohya LoRA written by our trainer path (inject, randomise, save_kohya): path, tensors, metadata."""
    scratch = make_models(seed=100 + seed)  # the layers only need the shapes
    layers = train_layers(scratch, seed, conv=conv)
    path = L.save_kohya(layers["unet"], layers["te1"], layers["te2"], tmp_path / name)
    f = open_tensors(path)
    return path, {k: f[k].clone() for k in f}, dict(f.metadata)


@torch.no_grad()
def merged_reference(models: dict[str, nn.Module], files: list[tuple[dict, float]]) -> dict[str, nn.Module]:
    """A copy of the models with W + sum w * alpha / rank * up @ down written into the weights (float64),
    the kohya file read by name here (independently of the loader)."""
    ref = copy.deepcopy(models)
    for part, model in ref.items():
        for name, module in model.named_modules():
            if not isinstance(module, (nn.Linear, nn.Conv2d)):
                continue
            key = L.kohya_name(part, name)
            delta = torch.zeros(module.weight.shape, dtype=torch.float64)
            for tensors, weight in files:
                if f"{key}.lora_down.weight" not in tensors:
                    continue
                down = tensors[f"{key}.lora_down.weight"].double()
                up = tensors[f"{key}.lora_up.weight"].double()
                scale = tensors[f"{key}.alpha"].item() / down.shape[0]
                if down.ndim == 2:
                    d = up @ down
                else:  # [out, r, 1, 1] x [r, in, kh, kw]
                    d = (up.flatten(1) @ down.flatten(1)).reshape(module.weight.shape)
                delta += weight * scale * d
            module.weight.copy_((module.weight.double() + delta).float())
    return ref


# ---------------------------------------------------------------------------------------------------------
# training side: inject_lora / save_kohya
# ---------------------------------------------------------------------------------------------------------


def test_inject_targets_zero_init_and_kohya_names(tmp_path):
    models = make_models()
    before = outputs(models)
    layers = {
        "unet": L.inject_lora(models["unet"], 4, 2.0),
        "te1": L.inject_lora(models["te1"], 4, 2.0),
        "te2": L.inject_lora(models["te2"], 4, 2.0),
    }
    # lora_up starts at zero: the model is unchanged, bit for bit
    assert_equal(outputs(models), before)

    # kohya's default SDXL targets: per SpatialTransformer proj_in/out + 10 linears per transformer block
    depths = [d for d in CFG.unet.transformer_depth + CFG.unet.transformer_depth_output if d > 0]
    depths.append(CFG.unet.transformer_depth_middle)
    assert len(layers["unet"]) == sum(2 + 10 * d for d in depths)
    assert len(layers["te1"]) == 6 * CFG.text_l.layers and len(layers["te2"]) == 6 * CFG.text_g.layers
    assert "input_blocks.4.1.transformer_blocks.0.attn2.to_out.0" in layers["unet"]
    assert not any("in_layers" in n or "op" in n.split(".") for n in layers["unet"])  # no convs by default
    assert set(L.inject_lora(copy.deepcopy(models["te1"]), 2, 1.0, targets=("attn",))) == {
        f"encoder.layers.{i}.self_attn.{p}_proj" for i in range(CFG.text_l.layers) for p in "qkv"
    } | {f"encoder.layers.{i}.self_attn.out_proj" for i in range(CFG.text_l.layers)}

    path = L.save_kohya(
        layers["unet"],
        layers["te1"],
        layers["te2"],
        tmp_path / "x.safetensors",
        metadata={"ss_training_comment": "test", "ss_num_epochs": 3},
    )
    f = open_tensors(path)
    base = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    for suffix, shape in ((".lora_down.weight", (4, 64)), (".lora_up.weight", (64, 4)), (".alpha", ())):
        assert f.shape(base + suffix) == shape
    for k in (
        "lora_unet_input_blocks_4_1_proj_in",
        "lora_unet_middle_block_1_transformer_blocks_1_ff_net_0_proj",
        "lora_unet_output_blocks_0_1_transformer_blocks_1_ff_net_2",
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
        "lora_te2_text_model_encoder_layers_1_mlp_fc2",
    ):
        assert k + ".lora_down.weight" in f
    assert f["lora_te2_text_model_encoder_layers_1_mlp_fc2.alpha"].item() == 2.0
    assert len(f) == 3 * sum(len(d) for d in layers.values())

    m = f.metadata
    assert m["ss_network_module"] == "networks.lora"
    assert m["ss_network_dim"] == "4" and float(m["ss_network_alpha"]) == 2.0
    assert m["ss_base_model_version"] == "sdxl_base_v1-0"
    assert m["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert m["ss_training_comment"] == "test" and m["ss_num_epochs"] == "3"
    assert "ss_network_args" not in m  # no conv layers
    # sshs_model_hash = sha256 of everything after the header, as A1111 computes it from the file
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert m["sshs_model_hash"] == hashlib.sha256(raw[8 + n :]).hexdigest()
    assert m["sshs_model_hash"] == addnet_hash(path)  # what the PNG's "Lora hashes" use (first 12 digits)


def test_conv_layers_locon_shapes_and_metadata(tmp_path):
    models = make_models()
    layers = L.inject_lora(models["unet"], 4, 2.0, conv=True, conv_rank=2, conv_alpha=3.0)
    path = L.save_kohya(layers, None, None, tmp_path / "c.safetensors")
    f = open_tensors(path)
    # a 3x3 ResBlock conv: down is a 3x3 conv to the conv rank, up a 1x1 conv
    assert f.shape("lora_unet_input_blocks_1_0_in_layers_2.lora_down.weight") == (2, 32, 3, 3)
    assert f.shape("lora_unet_input_blocks_1_0_in_layers_2.lora_up.weight") == (32, 2, 1, 1)
    assert f["lora_unet_input_blocks_1_0_in_layers_2.alpha"].item() == 3.0
    # the Downsample (stride 2) and Upsample convs, the timestep projection and the 1x1 skip (normal rank)
    assert f.shape("lora_unet_input_blocks_3_0_op.lora_down.weight") == (2, 32, 3, 3)
    assert f.shape("lora_unet_output_blocks_2_2_conv.lora_down.weight") == (2, 128, 3, 3)
    assert f.shape("lora_unet_input_blocks_1_0_emb_layers_1.lora_down.weight") == (4, 128)
    assert f.shape("lora_unet_input_blocks_4_0_skip_connection.lora_down.weight") == (4, 32, 1, 1)
    assert json.loads(f.metadata["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "3.0"}
    assert f.metadata["ss_network_train_unet_only"] == "True"


def test_training_gradients_reach_only_lora_and_resume(tmp_path):
    models = make_models()
    unet = models["unet"].requires_grad_(False).train()
    layers = L.inject_lora(unet, 4, 4.0, dropout=0.1)
    params = [p for layer in layers.values() for p in layer.parameters()]
    assert len(params) == 2 * len(layers) and all(p.requires_grad for p in params)
    x, t, context, y, _ = inputs()
    unet(x, t, context, y).square().mean().backward()
    assert all(p.grad is None for p in unet.parameters())
    ups = [layer.lora_up.weight.grad for layer in layers.values()]
    assert all(g is not None for g in ups) and sum(g.abs().sum() for g in ups) > 0

    with torch.no_grad():
        for p in params:
            p.add_(0.01 * torch.randn_like(p))
    path = L.save_kohya(layers, None, None, tmp_path / "r.safetensors")
    fresh = L.inject_lora(make_models()["unet"], 4, 4.0)
    assert L.load_lora_layers(path, layers_unet=fresh) == []
    for name, layer in layers.items():
        assert torch.equal(fresh[name].lora_down.weight, layer.lora_down.weight)
        assert torch.equal(fresh[name].lora_up.weight, layer.lora_up.weight)
    assert L.load_lora_layers(path, layers_te1=L.inject_lora(make_models()["te1"], 4, 4.0)) != []


# ---------------------------------------------------------------------------------------------------------
# applying: exactness, weight 0, fuse / unfuse, several LoRAs
# ---------------------------------------------------------------------------------------------------------


def test_kohya_roundtrip_matches_analytic_weights(tmp_path):
    models = make_models()
    # the trainer's own forward (hooks of the injected layers) ...
    layers = train_layers(models, seed=5)
    trained = outputs(models)
    path = L.save_kohya(layers["unet"], layers["te1"], layers["te2"], tmp_path / "k.safetensors")
    remove_layers(layers)
    original = outputs(models)
    assert_differ(trained, original)

    lora = L.load_lora(path)
    assert lora.format == "kohya" and not lora.problems
    f = open_tensors(path)
    reference = outputs(merged_reference(models, [({k: f[k] for k in f}, 0.8)]))
    with L.apply(models, L.LoraSet().add(lora, 0.8)) as patch:
        assert patch.reports[0].ok
        assert patch.matched_modules == sum(len(d) for d in layers.values())
        got = outputs(models)
        assert_close(got, reference)
    assert_equal(outputs(models), original)  # removed: exactly the original model again

    with L.apply(models, lora):  # weight 1 reproduces the trainer's forward
        assert_close(outputs(models), trained)


def test_weight_zero_is_exactly_no_change(tmp_path):
    models = make_models()
    path, _, _ = write_kohya(tmp_path, seed=1)
    original = outputs(models)
    with L.apply(models, L.LoraSet().add(path, 0.0)) as patch:
        assert patch.reports[0].matched_modules > 0
        assert_equal(outputs(models), original)
        assert all(not m._forward_hooks for model in models.values() for m in model.modules())
    # text weight 0 alone: text outputs untouched, UNet changed
    with L.apply(models, L.LoraSet().add(path, 1.0, text_weight=0.0)):
        got = outputs(models)
        assert_equal(got[1:], original[1:])
        assert rel_err(got[0], original[0]) > 1e-3


def test_fuse_unfuse_restores_weights_bitwise(tmp_path):
    models = make_models()
    path, tensors, _ = write_kohya(tmp_path, seed=2)
    state = {part: {k: v.clone() for k, v in m.state_dict().items()} for part, m in models.items()}
    original = outputs(models)
    patch = L.apply(models, L.LoraSet().add(path, 1.3))
    hooked = outputs(models)
    assert_state(models, state)

    patch.fuse()
    assert patch.state == "fused"
    assert all(not m._forward_hooks for model in models.values() for m in model.modules())
    fused_unet = models["unet"].state_dict()
    changed = [k for k, v in state["unet"].items() if not torch.equal(fused_unet[k], v)]
    n_unet_layers = sum(k.startswith("lora_unet_") and k.endswith(".lora_down.weight") for k in tensors)
    assert len(changed) == n_unet_layers and all(k.endswith(".weight") for k in changed)
    assert_close(outputs(models), hooked)

    patch.unfuse()
    assert patch.state == "hooked"
    assert_state(models, state)
    assert_equal(outputs(models), hooked)

    patch.fuse()
    patch.remove()  # remove while fused: unfuse then unhook
    assert_state(models, state)
    assert_equal(outputs(models), original)


def test_several_loras_add(tmp_path):
    models = make_models()
    path_a, tensors_a, _ = write_kohya(tmp_path, seed=3, name="a.safetensors")
    path_b, tensors_b, _ = write_kohya(tmp_path, seed=4, name="b.safetensors", conv=False)
    original = outputs(models)
    loras = L.LoraSet().add(path_a, 0.7).add(path_b, -0.4, text_weight=0.25)
    with L.apply(models, loras) as patch:
        assert len(patch.reports) == 2 and all(r.ok for r in patch.reports)
        got = outputs(models)
        patch.fuse()
        fused = outputs(models)
    assert_equal(outputs(models), original)

    ref_unet = merged_reference(models, [(tensors_a, 0.7), (tensors_b, -0.4)])
    ref_text = merged_reference(models, [(tensors_a, 0.7), (tensors_b, 0.25)])
    want = outputs({"unet": ref_unet["unet"], "te1": ref_text["te1"], "te2": ref_text["te2"]})
    assert_close(got, want)
    assert_close(fused, want)


def test_fused_qkv_attention_still_gets_the_lora(tmp_path):
    models = make_models()
    path, _, _ = write_kohya(tmp_path, seed=6)
    lora = L.load_lora(path)
    with L.apply(models, lora):
        want = outputs(models)
    fast.fuse_qkv(models["unet"])
    attn = models["unet"].input_blocks[4][1].transformer_blocks[0].attn1
    assert isinstance(attn, fast.FusedAttention)
    with L.apply(models, lora):
        assert attn.fused_qkv is False  # held off: the fused path would skip the q/k/v hooks
        assert_close(outputs(models), want)
    assert attn.fused_qkv is True


def test_half_precision_models_and_text_encoders_helper(tmp_path):
    """bf16 towers: the update runs in the layer's dtype, fuse rounds once, unfuse restores bit for bit."""
    from sdxl.models.text import TextEncoders

    path, _, _ = write_kohya(tmp_path, seed=8)
    text = TextEncoders.from_config(CFG)
    parts = L.lora_models(None, text)
    assert parts["te1"] is text.clip_l and parts["te2"] is text.clip_g and parts["unet"] is None
    full = {p: randomize_(m, 11) for p, m in parts.items() if m is not None}
    ids = inputs()[-1]
    with torch.no_grad(), L.apply(full, path) as patch:  # a path works as well as a Lora
        reasons = patch.reports[0].reasons.values()
        assert reasons and all("no unet model" in r for r in reasons)
        want = [full["te1"](ids)[0], *full["te2"](ids)]
    half = {p: copy.deepcopy(m).to(torch.bfloat16) for p, m in full.items()}
    state = {p: {k: v.clone() for k, v in m.state_dict().items()} for p, m in half.items()}
    with torch.no_grad(), L.apply(half, path) as patch:
        hooked = [half["te1"](ids)[0], *half["te2"](ids)]
        patch.fuse()
        fused = [half["te1"](ids)[0], *half["te2"](ids)]
        patch.unfuse()
        assert_state(half, state)
    for got in (hooked, fused):
        assert all(g.dtype == torch.bfloat16 for g in got)
        assert_close([g.float() for g in got], want, tol=5e-2)  # bf16 keeps ~3 significant digits


# ---------------------------------------------------------------------------------------------------------
# file formats
# ---------------------------------------------------------------------------------------------------------


def diffusers_name(part: str, name: str) -> str:
    if part == "unet":
        (converted,) = unet_sgm_to_diffusers({name + ".weight": None}, CFG.unet)
        return converted[: -len(".weight")]
    return "text_model." + name


def respell(tensors: dict, style: str) -> tuple[dict, dict]:
    """The same kohya LoRA under another naming scheme (tensors shared), with its metadata."""
    out: dict = {}
    meta: dict = {}
    prefixes = {"unet": "unet.", "te1": "text_encoder.", "te2": "text_encoder_2."}
    models = make_models()
    for part, model in models.items():
        for name, _ in model.named_modules():
            key = L.kohya_name(part, name)
            if f"{key}.lora_down.weight" not in tensors:
                continue
            down, up, alpha = (tensors[f"{key}.{s}"] for s in ("lora_down.weight", "lora_up.weight", "alpha"))
            dname = diffusers_name(part, name)
            if style == "kohya_diffusers_names":
                k = {"unet": "lora_unet_", "te1": "lora_te1_", "te2": "lora_te2_"}[part] + dname.replace(
                    ".", "_"
                )
                out.update({f"{k}.lora_down.weight": down, f"{k}.lora_up.weight": up, f"{k}.alpha": alpha})
            elif style == "peft":  # alpha in the header, as diffusers' save_lora_weights stores it
                k = prefixes[part] + dname
                out.update({f"{k}.lora_A.weight": down, f"{k}.lora_B.weight": up})
                part_meta = meta.setdefault(part, {"lora_alpha": 2.0, "alpha_pattern": {}})
                if alpha.item() != part_meta["lora_alpha"]:  # the conv layers (alpha 3)
                    part_meta["alpha_pattern"][dname] = alpha.item()
            elif style == "old_diffusers":
                k = prefixes[part] + dname
                leaf = dname.rsplit(".", 2)
                if part == "unet" and leaf[-1] in ("to_q", "to_k", "to_v") or dname.endswith("to_out.0"):
                    attn = dname[: dname.rindex(".to_")]
                    proj = dname[len(attn) + 1 :].replace(".0", "")
                    k = f"{prefixes[part]}{attn}.processor.{proj}_lora"
                    out.update({f"{k}.down.weight": down, f"{k}.up.weight": up})
                    out[f"{prefixes[part]}{dname}.alpha"] = alpha
                elif part != "unet" and "self_attn" in dname:
                    proj = {"q_proj": "to_q", "k_proj": "to_k", "v_proj": "to_v", "out_proj": "to_out"}[
                        leaf[-1]
                    ]
                    k = f"{prefixes[part]}{dname.rsplit('.', 1)[0]}.{proj}_lora"
                    out.update({f"{k}.down.weight": down, f"{k}.up.weight": up})
                    out[f"{prefixes[part]}{dname}.alpha"] = alpha
                else:
                    mid = ".lora_linear_layer" if part != "unet" else ".lora"
                    out.update(
                        {f"{k}{mid}.down.weight": down, f"{k}{mid}.up.weight": up, f"{k}.alpha": alpha}
                    )
            elif style == "comfy":
                if part != "unet":
                    continue
                k = "diffusion_model." + name
                out.update({f"{k}.lora_down.weight": down, f"{k}.lora_up.weight": up, f"{k}.alpha": alpha})
    names = {"unet": "unet", "te1": "text_encoder", "te2": "text_encoder_2"}
    flat = {f"{names[part]}.{k}": v for part, d in meta.items() for k, v in d.items()}
    return out, ({"lora_adapter_metadata": json.dumps(flat)} if flat else {})


@pytest.mark.parametrize("style", ["kohya_diffusers_names", "peft", "old_diffusers", "comfy"])
def test_key_spellings_give_identical_results(tmp_path, style):
    models = make_models()
    _, tensors, _ = write_kohya(tmp_path, seed=7)
    with L.apply(models, L.Lora.from_state_dict(tensors, name="kohya")):
        want = outputs(models)
    variant, meta = respell(tensors, style)
    path = save_safetensors(variant, tmp_path / f"{style}.safetensors", meta)
    lora = L.load_lora(path)
    assert not lora.problems and lora.format == ("kohya" if style.startswith("kohya") else "diffusers")
    with L.apply(models, lora) as patch:
        assert patch.reports[0].ok
        n_parts = 1 if style == "comfy" else 3
        assert patch.matched_modules == len(lora.modules) and len({m.part for m in lora.modules}) == n_parts
        got = outputs(models)
    if style == "comfy":
        assert torch.equal(got[0], want[0])
    else:
        assert_equal(got, want)


def test_peft_alpha_pattern_and_rslora_scales():
    g = torch.Generator().manual_seed(0)
    down, up = torch.randn(4, 64, generator=g), torch.randn(64, 4, generator=g)
    base = "unet.down_blocks.1.attentions.0"
    tensors = {
        f"{base}.proj_in.lora_A.weight": down,
        f"{base}.proj_in.lora_B.weight": up,
        f"{base}.proj_out.lora_A.weight": down,
        f"{base}.proj_out.lora_B.weight": up,
    }
    meta = {"unet.r": 4, "unet.lora_alpha": 8, "unet.alpha_pattern": {"proj_out": 2}}
    lora = L.Lora.from_state_dict(tensors, {"lora_adapter_metadata": json.dumps(meta)})
    scales = {m.name.rsplit(".", 1)[1]: m.scale for m in lora.modules}
    assert scales == {"proj_in": 2.0, "proj_out": 0.5}
    meta["unet.use_rslora"] = True
    lora = L.Lora.from_state_dict(tensors, {"lora_adapter_metadata": json.dumps(meta)})
    assert {m.name.rsplit(".", 1)[1]: m.scale for m in lora.modules} == {"proj_in": 4.0, "proj_out": 1.0}
    # no metadata, no alpha: scale 1 (diffusers / PEFT convention); kohya alpha 0 also means scale 1
    assert {m.scale for m in L.Lora.from_state_dict(tensors).modules} == {1.0}
    kohya = {
        "lora_unet_input_blocks_4_1_proj_in.lora_down.weight": down,
        "lora_unet_input_blocks_4_1_proj_in.lora_up.weight": up,
        "lora_unet_input_blocks_4_1_proj_in.alpha": torch.tensor(0.0),
    }
    assert L.Lora.from_state_dict(kohya).modules[0].scale == 1.0


def test_lycoris_tucker_conv_and_stride():
    """LyCORIS LoCon with a Tucker core (1x1 down, 3x3 mid, 1x1 up) on a stride-2 conv and a ResBlock conv."""
    models = make_models()
    g = torch.Generator().manual_seed(3)
    tensors = {}
    for name, cin, cout in (("input_blocks_3_0_op", 32, 32), ("input_blocks_4_0_in_layers_2", 32, 64)):
        tensors[f"lora_unet_{name}.lora_down.weight"] = torch.randn(3, cin, 1, 1, generator=g) * 0.3
        tensors[f"lora_unet_{name}.lora_mid.weight"] = torch.randn(3, 3, 3, 3, generator=g) * 0.3
        tensors[f"lora_unet_{name}.lora_up.weight"] = torch.randn(cout, 3, 1, 1, generator=g) * 0.3
        tensors[f"lora_unet_{name}.alpha"] = torch.tensor(1.5)
    original = outputs(models)
    ref = copy.deepcopy(models)
    with torch.no_grad():
        for name, module in (
            ("input_blocks_3_0_op", ref["unet"].input_blocks[3][0].op),
            ("input_blocks_4_0_in_layers_2", ref["unet"].input_blocks[4][0].in_layers[2]),
        ):
            down, mid, up = (
                tensors[f"lora_unet_{name}.lora_{s}.weight"].double() for s in ("down", "mid", "up")
            )
            # delta[o, i, h, w] = sum_ab up[o, a] mid[a, b, h, w] down[b, i]
            delta = torch.einsum("oa,abhw,bi->oihw", up[:, :, 0, 0], mid, down[:, :, 0, 0]) * (1.5 / 3)
            module.weight.copy_((module.weight.double() + delta).float())
    want = outputs(ref)
    with L.apply(models, L.Lora.from_state_dict(tensors)) as patch:
        assert patch.matched_modules == 2
        got = outputs(models)
        patch.fuse()
        fused = outputs(models)
    assert rel_err(got[0], original[0]) > 1e-3
    assert_close(got, want)
    assert_close(fused, want)


def test_unmatched_and_unsupported_keys_are_reported():
    models = make_models()
    g = torch.Generator().manual_seed(0)

    def pair(key, r, cin, cout):
        return {
            f"{key}.lora_down.weight": torch.randn(r, cin, generator=g),
            f"{key}.lora_up.weight": torch.randn(cout, r, generator=g),
        }

    good = pair("lora_unet_input_blocks_4_1_proj_in", 2, 64, 64)
    unknown_layer = pair("lora_unet_input_blocks_99_1_proj_in", 2, 64, 64)
    wrong_shape = pair("lora_unet_input_blocks_4_1_proj_out", 2, 63, 64)
    oft = {f"lora_unet_input_blocks_5_1_proj_in.oft_{w}": torch.zeros(2, 2) for w in ("blocks", "diag")}
    dora = {  # a DoRA magnitude that fits neither axis of the 64 x 64 layer
        **pair("lora_unet_input_blocks_5_1_proj_out", 2, 64, 64),
        "lora_unet_input_blocks_5_1_proj_out.dora_scale": torch.ones(1, 63),
    }
    stray = {"model.first_stage_model.decoder.conv_in.weight": torch.zeros(1)}
    incomplete = {"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(2, 32)}
    refiner_te = pair("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", 2, 32, 32)
    tensors = {**good, **unknown_layer, **wrong_shape, **oft, **dora, **stray, **incomplete, **refiner_te}
    lora = L.Lora.from_state_dict(tensors, name="messy")
    no_te1 = {**models, "te1": None}
    patch = L.apply(no_te1, lora)
    report = patch.reports[0]
    assert report.matched_modules == 1 and not report.ok
    assert set(report.unmatched_keys) == set(tensors) - set(good)
    why = report.reasons
    assert "no layer named" in why["lora_unet_input_blocks_99_1_proj_in.lora_down.weight"]
    assert "shape mismatch" in why["lora_unet_input_blocks_4_1_proj_out.lora_up.weight"]
    assert "OFT" in why["lora_unet_input_blocks_5_1_proj_in.oft_blocks"]
    assert "DoRA" in why["lora_unet_input_blocks_5_1_proj_out.lora_down.weight"]
    assert "unknown prefix" in why["model.first_stage_model.decoder.conv_in.weight"]
    assert "incomplete" in why["lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"]
    assert "no te1 model" in why["lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight"]
    assert f"and {len(report.unmatched_keys) - 10} more" in report.summary()
    patch.remove()

    original = outputs(models)
    with pytest.raises(L.LoraError, match="messy"):
        L.apply(models, lora, strict=True)
    assert all(not m._forward_hooks for model in models.values() for m in model.modules())
    assert_equal(outputs(models), original)


def test_pickle_files_are_refused(tmp_path):
    p = tmp_path / "lora.ckpt"
    torch.save({"lora_unet_x.lora_down.weight": torch.zeros(1)}, p)
    with pytest.raises(CheckpointError, match="pickle"):
        L.load_lora(p)


# ---------------------------------------------------------------------------------------------------------
# parity with diffusers + PEFT (test-only references)
# ---------------------------------------------------------------------------------------------------------


def _diffusers_models(models):
    pytest.importorskip("peft")
    diffusers = pytest.importorskip("diffusers")
    transformers = pytest.importorskip("transformers")
    unet = diffusers.UNet2DConditionModel.from_config(unet_diffusers_config(CFG.unet)).eval()
    unet.load_state_dict(unet_sgm_to_diffusers(models["unet"].state_dict(), CFG.unet), strict=True)

    def text(tc, ours, with_projection):
        config = transformers.CLIPTextConfig(
            vocab_size=tc.vocab_size,
            hidden_size=tc.width,
            intermediate_size=tc.mlp_dim,
            num_hidden_layers=tc.layers,
            num_attention_heads=tc.heads,
            max_position_embeddings=tc.max_positions,
            hidden_act=tc.act,
            layer_norm_eps=tc.eps,
            projection_dim=tc.projection_dim or tc.width,
        )
        cls = transformers.CLIPTextModelWithProjection if with_projection else transformers.CLIPTextModel
        model = cls(config).eval()
        sd = ours.state_dict()
        expected = set(model.state_dict())
        if "text_model.final_layer_norm.weight" in expected:  # the class that keeps the `text_model.` level
            sd = {(k if k.startswith("text_projection") else "text_model." + k): v for k, v in sd.items()}
        model.load_state_dict(sd, strict=True)
        return model

    return (unet, text(CFG.text_l, models["te1"], False), text(CFG.text_g, models["te2"], True))


@torch.no_grad()
def _diffusers_outputs(unet, te1, te2):
    x, t, context, y, ids = inputs()
    n_pooled = CFG.unet.adm_in_channels - 6 * 256  # diffusers builds y = [text_embeds | Fourier(time_ids)]
    out_u = unet(
        x,
        t,
        encoder_hidden_states=context,
        added_cond_kwargs={"text_embeds": y[:, :n_pooled], "time_ids": torch.zeros(2, 6)},
    ).sample
    h1 = te1(ids, output_hidden_states=True).hidden_states[-2]
    o2 = te2(ids, output_hidden_states=True)
    return [out_u, h1, o2.hidden_states[-2], o2.text_embeds]


@torch.no_grad()
def _our_outputs_with_diffusers_y(models):
    """Our outputs, with the UNet's y built as diffusers builds it from (text_embeds, zero time_ids)."""
    from diffusers.models.embeddings import Timesteps

    x, t, context, y, ids = inputs()
    n_pooled = CFG.unet.adm_in_channels - 6 * 256
    fourier = Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)(torch.zeros(12)).reshape(2, -1)
    y = torch.cat([y[:, :n_pooled], fourier], dim=-1)
    h1, _ = models["te1"](ids)
    h2, pooled = models["te2"](ids)
    return [models["unet"](x, t, context, y), h1, h2, pooled]


def test_peft_file_saved_by_diffusers_matches_diffusers(tmp_path):
    models = make_models()
    unet, te1, te2 = _diffusers_models(models)
    from diffusers import StableDiffusionXLPipeline
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    assert_close(
        _our_outputs_with_diffusers_y(models), _diffusers_outputs(unet, te1, te2)
    )  # same base models
    torch.manual_seed(0)  # init_lora_weights=False: random lora_B, so the adapters change the outputs
    unet_cfg = LoraConfig(
        r=4,
        lora_alpha=8,
        init_lora_weights=False,
        alpha_pattern={"proj_out": 2.0},
        target_modules=[
            "to_q",
            "to_k",
            "to_v",
            "to_out.0",
            "proj_in",
            "proj_out",
            "ff.net.0.proj",
            "ff.net.2",
            "conv1",
            "time_emb_proj",
        ],
    )
    text_cfg = LoraConfig(
        r=2,
        lora_alpha=4,
        init_lora_weights=False,
        target_modules=["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    )
    unet.add_adapter(unet_cfg)  # diffusers' own PEFT integration
    # transformers' add_adapter wants peft >= 0.22 (the newest installable here is 0.21.2): inject directly
    te1 = inject_adapter_in_model(text_cfg, te1)
    te2 = inject_adapter_in_model(text_cfg, te2)
    StableDiffusionXLPipeline.save_lora_weights(
        tmp_path,
        unet_lora_layers=get_peft_model_state_dict(unet),
        text_encoder_lora_layers=get_peft_model_state_dict(te1),
        text_encoder_2_lora_layers=get_peft_model_state_dict(te2),
        unet_lora_adapter_metadata=unet_cfg.to_dict(),
        text_encoder_lora_adapter_metadata=text_cfg.to_dict(),
        text_encoder_2_lora_adapter_metadata=text_cfg.to_dict(),
    )
    want = _diffusers_outputs(unet, te1, te2)

    original = _our_outputs_with_diffusers_y(models)
    lora = L.load_lora(tmp_path / "pytorch_lora_weights.safetensors")
    assert lora.format == "diffusers" and {m.part for m in lora.modules} == {"unet", "te1", "te2"}
    with L.apply(models, lora) as patch:
        assert patch.reports[0].ok, patch.reports[0].summary()
        got = _our_outputs_with_diffusers_y(models)
    assert_differ(got, original)
    assert_close(got, want)


def test_our_kohya_file_loads_in_diffusers_with_the_same_effect(tmp_path):
    models = make_models()
    unet, te1, te2 = _diffusers_models(models)
    from diffusers import StableDiffusionXLPipeline

    path, _, _ = write_kohya(tmp_path, seed=9)
    ours_before = _our_outputs_with_diffusers_y(models)
    with L.apply(models, L.load_lora(path)):
        ours_after = _our_outputs_with_diffusers_y(models)

    theirs_before = _diffusers_outputs(unet, te1, te2)
    # what `StableDiffusionXLPipeline.load_lora_weights` does, without building a whole pipeline
    state, alphas = StableDiffusionXLPipeline.lora_state_dict(str(path), unet_config=unet.config)
    StableDiffusionXLPipeline.load_lora_into_unet(state, alphas, unet=unet)
    StableDiffusionXLPipeline.load_lora_into_text_encoder(
        state, alphas, text_encoder=te1, prefix="text_encoder"
    )
    StableDiffusionXLPipeline.load_lora_into_text_encoder(
        state, alphas, text_encoder=te2, prefix="text_encoder_2"
    )
    theirs_after = _diffusers_outputs(unet, te1, te2)

    assert_differ(theirs_after, theirs_before)
    for a0, a1, b0, b1 in zip(ours_before, ours_after, theirs_before, theirs_after):
        assert rel_err(a1 - a0, b1 - b0) <= 1e-4  # the change the LoRA makes
        assert rel_err(a1, b1) <= 1e-4
