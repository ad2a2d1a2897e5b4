"""LyCORIS LoHa / LoKr and DoRA files applied to our models (issue 18 item 3).

(1) The applied (fused) weight equals the documented formula, written out here independently of the loader:
    LoHa  dW = (w1a @ w1b) * (w2a @ w2b) * alpha / rank  (Tucker: t x1 wa x2 wb per factor)
    LoKr  dW = kron(w1 or w1a @ w1b, w2 or w2a @ w2b) * (alpha / rank if a factor is decomposed else 1)
    DoRA  W' = m * (W + dW) / ||W + dW|| (per output channel, or per input channel for a [1, in] dora_scale),
          blended W + multiplier * (W' - W)
    on random weights in the real SDXL kohya / diffusers key layouts of the tiny models, to 1e-6 (float32).
(2) Against PEFT's own merged weights for LoHa / LoKr / DoRA layers it built and initialised (1e-5).
(3) End to end: `sdxl generate --lora FILE:0.8` with a LoHa file equals generating from a checkpoint whose
    weights were merged by hand, and a bad factor shape is a one-line error naming the key.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from sdxl.errors import CheckpointError
from sdxl.models.config import tiny_config
from sdxl.models.text import CLIPTextTower
from sdxl.models.unet import UNet
from sdxl.weights import lora as L
from sdxl.weights.diffusers_layout import unet_sgm_to_diffusers

CFG = tiny_config()
TOL = 1e-6  # our fused float32 weight against the float64 formula, relative to the largest entry
PEFT_TOL = 1e-5  # against PEFT's merge (both float32, different summation orders)
MULT = 0.8

# one layer of each kind the tiny SDXL models have: UNet attention Linear, UNet 3x3 conv, both text towers
LAYERS = (
    ("unet", "input_blocks.4.1.transformer_blocks.0.attn2.to_q"),
    ("unet", "input_blocks.1.0.in_layers.2"),
    ("te1", "encoder.layers.0.self_attn.q_proj"),
    ("te2", "encoder.layers.0.mlp.fc1"),
)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def randomize_(module: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (p[0].numel() ** -0.5 if p.ndim >= 2 else 0.1))
    return module


def make_models() -> dict[str, nn.Module]:
    return {
        "unet": randomize_(UNet(CFG.unet), 0).eval(),
        "te1": randomize_(CLIPTextTower(CFG.text_l), 1).eval(),
        "te2": randomize_(CLIPTextTower(CFG.text_g), 2).eval(),
    }


def rnd(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(shape, generator=g) * 0.3


def split(n: int) -> tuple[int, int]:
    """n = a * b with a small (LyCORIS' factorisation of LoKr dimensions)."""
    a = 4 if n % 4 == 0 else 2
    return a, n // a


# ---------------------------------------------------------------------------------------------------------
# factor files and the formulas, written independently of the loader
# ---------------------------------------------------------------------------------------------------------


def loha_layer(key: str, shape, g, rank=3, alpha=2.0, tucker=False) -> tuple[dict, torch.Tensor]:
    """Tensors of one LoHa layer and its dW (float64, alpha / rank applied)."""
    out, inn = shape[0], shape[1]
    k = shape[2:] if len(shape) == 4 else ()
    t = {f"{key}.alpha": torch.tensor(alpha)}
    if tucker:
        for i in ("1", "2"):
            t[f"{key}.hada_t{i}"] = rnd(g, rank, rank, *k)
            t[f"{key}.hada_w{i}_a"] = rnd(g, rank, out)
            t[f"{key}.hada_w{i}_b"] = rnd(g, rank, inn)
        d = [
            torch.einsum(
                "ijkl,ip,jr->prkl", *(t[f"{key}.hada_{n}"].double() for n in (f"t{i}", f"w{i}_a", f"w{i}_b"))
            )
            for i in ("1", "2")
        ]
        return t, d[0] * d[1] * alpha / rank
    flat_in = inn * int(np.prod(k)) if k else inn
    for i in ("1", "2"):
        t[f"{key}.hada_w{i}_a"] = rnd(g, out, rank)
        t[f"{key}.hada_w{i}_b"] = rnd(g, rank, flat_in)
    p1 = t[f"{key}.hada_w1_a"].double() @ t[f"{key}.hada_w1_b"].double()
    p2 = t[f"{key}.hada_w2_a"].double() @ t[f"{key}.hada_w2_b"].double()
    return t, (p1 * p2 * alpha / rank).reshape(shape)


def lokr_layer(key: str, shape, g, decomposed: bool, rank=2, alpha=3.0) -> tuple[dict, torch.Tensor]:
    """Tensors of one LoKr layer and its dW: whole factors (scale 1) or both decomposed (alpha / rank)."""
    (a, b), (c, d) = split(shape[0]), split(shape[1])
    k = tuple(shape[2:])
    t = {f"{key}.alpha": torch.tensor(alpha)}
    if decomposed:
        t[f"{key}.lokr_w1_a"], t[f"{key}.lokr_w1_b"] = rnd(g, a, rank), rnd(g, rank, c)
        t[f"{key}.lokr_w2_a"], t[f"{key}.lokr_w2_b"] = rnd(g, b, rank), rnd(g, rank, d * int(np.prod(k)))
        w1 = t[f"{key}.lokr_w1_a"].double() @ t[f"{key}.lokr_w1_b"].double()
        w2 = (t[f"{key}.lokr_w2_a"].double() @ t[f"{key}.lokr_w2_b"].double()).reshape(b, d, *k)
        scale = alpha / rank
    else:
        t[f"{key}.lokr_w1"], t[f"{key}.lokr_w2"] = rnd(g, a, c), rnd(g, b, d, *k)
        w1, w2 = t[f"{key}.lokr_w1"].double(), t[f"{key}.lokr_w2"].double()
        scale = 1.0
    # kron by hand: dW[i*b + j, m*d + n, ...] = w1[i, m] * w2[j, n, ...]
    dw = torch.einsum("im,jn...->ijmn...", w1, w2).reshape(shape)
    return t, dw * scale


def lora_dw(down: torch.Tensor, up: torch.Tensor, shape) -> torch.Tensor:
    return (up.double().flatten(1) @ down.double().flatten(1)).reshape(shape)


def dora_weight(w: torch.Tensor, dw: torch.Tensor, m: torch.Tensor, axis: str, eps: float, mult: float):
    """W + mult * (m * (W + dW) / (||W + dW|| + eps) - W), float64."""
    w, m = w.double(), m.double()
    merged = w + dw
    if axis == "out":
        norm = torch.sqrt((merged**2).flatten(1).sum(1)).reshape(-1, *[1] * (w.ndim - 1))
    else:
        norm = torch.sqrt((merged**2).transpose(0, 1).flatten(1).sum(1)).reshape(1, -1, *[1] * (w.ndim - 2))
    return w + mult * (m.reshape(norm.shape) * merged / (norm + eps) - w)


def fused_weights(models, tensors: dict, mult: float = MULT) -> dict[tuple[str, str], torch.Tensor]:
    lora = L.Lora.from_state_dict(tensors, name="f")
    patch = L.apply(models, [(lora, mult)])
    assert patch.reports[0].ok, patch.reports[0].summary()
    assert patch.matched_modules == len(LAYERS)
    patch.fuse()
    got = {(p, n): models[p].get_submodule(n).weight.detach().clone() for p, n in LAYERS}
    patch.remove()
    return got


def diffusers_key(part: str, name: str) -> str:
    if part == "unet":
        (converted,) = unet_sgm_to_diffusers({f"{name}.weight": None}, CFG.unet)
        return "unet." + converted[: -len(".weight")]
    return ("text_encoder." if part == "te1" else "text_encoder_2.") + "text_model." + name


# ---------------------------------------------------------------------------------------------------------
# (1) the documented formulas
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["loha", "loha_tucker", "lokr_decomposed", "lokr_whole"])
def test_loha_lokr_applied_weight_is_the_formula(variant):
    models = make_models()
    g = torch.Generator().manual_seed(3)
    tensors, want = {}, {}
    for part, name in LAYERS:
        w = models[part].get_submodule(name).weight
        key = L.kohya_name(part, name)
        if variant.startswith("loha"):
            tucker = variant == "loha_tucker" and w.ndim == 4  # Tucker is the conv layout
            t, dw = loha_layer(key, tuple(w.shape), g, tucker=tucker)
        else:
            t, dw = lokr_layer(key, tuple(w.shape), g, decomposed=variant == "lokr_decomposed")
        tensors.update(t)
        want[(part, name)] = w.detach().double() + MULT * dw
    before = {k: models[k[0]].get_submodule(k[1]).weight.detach().clone() for k in want}
    got = fused_weights(models, tensors)
    for k in want:
        assert rel_err(got[k], want[k]) <= TOL, (k, rel_err(got[k], want[k]))
        assert rel_err(got[k], before[k]) > 1e-3  # the update is not negligible
    assert all(torch.equal(models[p].get_submodule(n).weight, before[(p, n)]) for p, n in want)


@pytest.mark.parametrize("layout", ["kohya_out", "kohya_in", "peft"])
def test_dora_applied_weight_is_the_formula(layout):
    models = make_models()
    g = torch.Generator().manual_seed(4)
    rank, alpha = 2, 3.0
    tensors, want = {}, {}
    for part, name in LAYERS:
        w = models[part].get_submodule(name).weight
        shape = tuple(w.shape)
        k = shape[2:]
        down, up = rnd(g, rank, shape[1], *k), rnd(g, shape[0], rank, *[1] * len(k))
        if layout == "peft":  # PEFT: magnitude [out] (Linear) / [1, out, 1, 1] (conv), no eps; no alpha
            key = diffusers_key(part, name)  # stored and no metadata: scale 1
            m = 1 + rnd(g, *((1, shape[0], 1, 1) if k else (shape[0],))).abs()
            tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"] = down, up
            tensors[f"{key}.lora_magnitude_vector"] = m
            want[(part, name)] = dora_weight(w.detach(), lora_dw(down, up, shape), m, "out", 0.0, MULT)
            continue
        dw = lora_dw(down, up, shape) * alpha / rank
        key = L.kohya_name(part, name)
        axis = layout.split("_")[1]
        ones = [1] * len(k)
        m_shape = (shape[0], 1, *ones) if axis == "out" else (1, shape[1], *ones)
        m = 1 + rnd(g, *m_shape).abs()
        tensors[f"{key}.lora_down.weight"], tensors[f"{key}.lora_up.weight"] = down, up
        tensors[f"{key}.alpha"], tensors[f"{key}.dora_scale"] = torch.tensor(alpha), m
        want[(part, name)] = dora_weight(w.detach(), dw, m, axis, torch.finfo(torch.float32).eps, MULT)
    got = fused_weights(models, tensors)
    for k in want:
        assert rel_err(got[k], want[k]) <= TOL, (k, rel_err(got[k], want[k]))


def test_dora_hooks_match_fused_and_zero_is_no_change():
    models = make_models()
    g = torch.Generator().manual_seed(5)
    part, name = LAYERS[1]  # the conv
    w = models[part].get_submodule(name).weight
    key = L.kohya_name(part, name)
    tensors = {
        f"{key}.lora_down.weight": rnd(g, 2, w.shape[1], 3, 3),
        f"{key}.lora_up.weight": rnd(g, w.shape[0], 2, 1, 1),
        f"{key}.dora_scale": 1 + rnd(g, w.shape[0], 1, 1, 1).abs(),
    }
    lora = L.Lora.from_state_dict(tensors)
    x = torch.randn(1, w.shape[1], 8, 8, generator=g)
    conv = models[part].get_submodule(name)
    with torch.no_grad():
        plain = conv(x)
        with L.apply(models, [(lora, 0.0)]):
            assert torch.equal(conv(x), plain)
        with L.apply(models, [(lora, 1.0)]) as patch:
            hooked = conv(x)
            patch.fuse()
            fused = conv(x)
    assert rel_err(hooked, fused) <= 1e-5 and rel_err(hooked, plain) > 1e-3


def test_lycoris_prefix_and_bad_factor_shapes():
    models = make_models()
    g = torch.Generator().manual_seed(6)
    part, name = LAYERS[0]
    w = models[part].get_submodule(name).weight
    (converted,) = unet_sgm_to_diffusers({f"{name}.weight": None}, CFG.unet)
    lyco_key = "lycoris_" + converted[: -len(".weight")].replace(".", "_")  # LyCORIS wrapper on diffusers
    t, dw = loha_layer(lyco_key, tuple(w.shape), g)
    before = w.detach().clone()
    patch = L.apply(models, L.Lora.from_state_dict(t))
    assert patch.reports[0].ok and patch.matched_modules == 1
    patch.fuse()
    assert rel_err(w.detach(), before.double() + dw) <= TOL
    patch.remove()

    bad = dict(t)
    bad[f"{lyco_key}.hada_w2_b"] = rnd(g, 4, w.shape[1])  # rank 4 against hada_w2_a's rank 3
    with pytest.raises(CheckpointError, match=r"hada_w2_a.*dimension 1 does not match") as e:
        L.Lora.from_state_dict(bad, name="broken")
    assert "\n" not in str(e.value) and "broken" in str(e.value)
    key = L.kohya_name(*LAYERS[2])
    lokr = {f"{key}.lokr_w1": rnd(g, 2, 2), f"{key}.lokr_w2_a": rnd(g, 16, 2)}
    lokr[f"{key}.lokr_w2_b"] = rnd(g, 3, 16)  # rank 3 against lokr_w2_a's 2
    with pytest.raises(CheckpointError, match="lokr_w2_a"):
        L.Lora.from_state_dict(lokr)
    wrong_layer = {f"{key}.lokr_w1": rnd(g, 2, 2), f"{key}.lokr_w2": rnd(g, 8, 8)}  # 16 x 16, layer 32 x 32
    report = L.apply(models, L.Lora.from_state_dict(wrong_layer)).reports[0]
    assert "shape mismatch" in report.reasons[f"{key}.lokr_w1"]
