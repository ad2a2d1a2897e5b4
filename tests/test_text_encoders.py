"""CLIP text towers: parity with transformers, clip skip, SDXL assembly, and the weight-name conversions.

Parity tolerance: max |ours - HF| / max |HF| <= 1e-5 in float32 (both run the same maths; the residual is
float rounding from different attention kernels). Weights are random at tiny sizes (tiny_config() towers),
with non-trivial LayerNorm affine parameters so that every tensor's placement matters.
"""

from __future__ import annotations

import pytest
import torch

from sdxl.models.config import TextConfig, tiny_config
from sdxl.models.text import CLIPTextTower, TextEncoders, expected_num_parameters, quick_gelu
from sdxl.weights.text_layout import (
    BIGG_PREFIX,
    CLIP_L_PREFIX,
    DEFAULT_LOGIT_SCALE,
    hf_clip_to_ours,
    openclip_to_ours,
    ours_to_hf_clip,
    ours_to_openclip,
    text_from_official,
    text_to_official,
)

transformers = pytest.importorskip("transformers")

TOL = 1e-5
CFG = tiny_config()
CFG_L, CFG_G = CFG.text_l, CFG.text_g


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def random_tower(cfg: TextConfig, seed: int) -> CLIPTextTower:
    torch.manual_seed(seed)
    tower = CLIPTextTower(cfg).eval()
    with torch.no_grad():
        for name, p in tower.named_parameters():
            if "layer_norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.1 * torch.randn_like(p))
    return tower


def hf_model(cfg: TextConfig, eos_token_id: int = 2):
    """transformers' model for `cfg` (eager attention, an independent implementation of the maths).

    eos_token_id=2 makes HF pick the pooled position by argmax of the ids (the legacy rule, = open_clip's);
    any other value picks the first position equal to it.
    """
    hf_cfg = transformers.CLIPTextConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.width,
        intermediate_size=cfg.mlp_dim,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        max_position_embeddings=cfg.max_positions,
        hidden_act=cfg.act,
        layer_norm_eps=cfg.eps,
        projection_dim=cfg.projection_dim or cfg.width,
        eos_token_id=eos_token_id,
        bos_token_id=49406,
        pad_token_id=cfg.pad_token,
        attn_implementation="eager",
    )
    cls = transformers.CLIPTextModelWithProjection if cfg.projection_dim else transformers.CLIPTextModel
    return cls(hf_cfg).eval()


def loaded_pair(cfg: TextConfig, seed: int, eos_token_id: int = 2):
    ours = random_tower(cfg, seed)
    hf = hf_model(cfg, eos_token_id)
    flat = not cfg.projection_dim  # transformers 5 CLIPTextModel has no `text_model.` prefix
    if flat and any(k.startswith("text_model.") for k in hf.state_dict()):
        flat = False  # older transformers
    hf.load_state_dict(ours_to_hf_clip(ours.state_dict(), text_model_prefix=not flat, position_ids=False))
    return ours, hf


def token_rows(pad: int, batch: int = 3, length: int = 77, seed: int = 0) -> torch.Tensor:
    """BOS, random BPE ids, EOS at different positions, then padding (like the tokenizer's output)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((batch, length), pad, dtype=torch.long)
    for b, n in enumerate([5, 30, length - 2][:batch]):
        ids[b, 0] = 49406
        ids[b, 1 : n + 1] = torch.randint(0, 49406, (n,), generator=g)
        ids[b, n + 1] = 49407
    return ids


# ------------------------------------------------------------------------------------------- parity
def test_clip_l_hidden_matches_transformers():
    ours, hf = loaded_pair(CFG_L, seed=1)
    ids = token_rows(pad=49407)
    with torch.no_grad():
        ref = hf(ids, output_hidden_states=True).hidden_states
        hidden, pooled = ours(ids)
        skip2, _ = ours(ids, skip=2)
    assert pooled is None  # CLIP-L has no projection; SDXL does not use its pooled output
    assert hidden.shape == (3, 77, CFG_L.width)
    assert rel_err(hidden, ref[-2]) <= TOL
    assert rel_err(skip2, ref[-3]) <= TOL


@pytest.mark.parametrize("pad, eos_token_id", [(0, 2), (49407, 49407)])
def test_bigg_hidden_and_pooled_match_transformers(pad, eos_token_id):
    """pad 0 (open_clip) with HF's argmax rule; pad 49407 with HF's first-EOS rule: same position."""
    ours, hf = loaded_pair(CFG_G, seed=2, eos_token_id=eos_token_id)
    ids = token_rows(pad=pad, seed=3)
    with torch.no_grad():
        out = hf(ids, output_hidden_states=True)
        hidden, pooled = ours(ids)
    assert pooled.shape == (3, CFG_G.projection_dim)
    assert rel_err(hidden, out.hidden_states[-2]) <= TOL
    assert rel_err(pooled, out.text_embeds) <= TOL


def test_clip_skip_counts_back_from_the_last_layer():
    ours, hf = loaded_pair(CFG_G, seed=4)
    ids = token_rows(pad=0, seed=5)
    with torch.no_grad():
        ref = hf(ids, output_hidden_states=True).hidden_states
        for skip in range(0, CFG_G.layers + 1):
            hidden, pooled = ours(ids, skip=skip)
            assert rel_err(hidden, ref[-(skip + 1)]) <= TOL, skip
            assert pooled is not None  # the pooled output never depends on skip
    with pytest.raises(ValueError):
        ours(ids, skip=CFG_G.layers + 1)


def test_quick_gelu_and_gelu_are_used_as_configured():
    x = torch.linspace(-4, 4, 101)
    assert torch.allclose(quick_gelu(x), x * torch.sigmoid(1.702 * x))
    # Swapping the activation must change the output (the config value is really used).
    ours = random_tower(CFG_L, seed=6)
    other = CLIPTextTower(TextConfig.clip_l(width=32, layers=2, head_dim=16, act="gelu")).eval()
    other.load_state_dict(ours.state_dict())
    ids = token_rows(pad=49407)
    with torch.no_grad():
        assert rel_err(ours(ids)[0], other(ids)[0]) > 1e-4
    with pytest.raises(ValueError):
        CLIPTextTower(TextConfig(act="relu2"))


def test_injected_embeddings():
    ours = random_tower(CFG_G, seed=7)
    ids = token_rows(pad=0, seed=8)
    with torch.no_grad():
        ref_h, ref_p = ours(ids)
        emb = ours.embed_tokens(ids)
        h, p = ours(ids, embeds=emb)
        assert torch.equal(h, ref_h) and torch.equal(p, ref_p)
        emb[:, 3] += 1.0  # e.g. a textual-inversion vector at position 3
        h2, _ = ours(ids, embeds=emb)
    # Causal attention: positions before 3 are untouched, position 3 onwards changes.
    assert torch.equal(h2[:, :3], ref_h[:, :3])
    assert (h2[:, 3:] - ref_h[:, 3:]).abs().amax(dim=(1, 2)).min() > 0
    with pytest.raises(ValueError):
        ours(ids, embeds=emb[:, :10])


def test_padding_after_eos_does_not_change_what_sdxl_reads():
    """Causal mask: the 0- vs 49407-padding affects only the padded positions (and never pooled)."""
    ours = random_tower(CFG_G, seed=9)
    a, b = token_rows(pad=0, seed=10), token_rows(pad=49407, seed=10)
    with torch.no_grad():
        ha, pa = ours(a)
        hb, pb = ours(b)
    assert torch.allclose(pa, pb, rtol=0, atol=1e-6)
    assert torch.allclose(ha[0, :7], hb[0, :7], rtol=0, atol=1e-6)
    assert not torch.allclose(ha[0, 7:], hb[0, 7:])


# ------------------------------------------------------------------------------------------- assembly
def test_text_encoders_base_and_refiner():
    torch.manual_seed(0)
    enc = TextEncoders.from_config(CFG).eval()
    ids_l, ids_g = token_rows(pad=49407, batch=2), token_rows(pad=0, batch=2)
    with torch.no_grad():
        ctx, pooled = enc.encode(ids_l, ids_g)
        h_l, _ = enc.clip_l(ids_l)
        h_g, p_g = enc.clip_g(ids_g)
    assert ctx.shape == (2, 77, CFG_L.width + CFG_G.width) == (2, 77, CFG.unet.context_dim)
    assert enc.context_dim == CFG.unet.context_dim
    assert torch.equal(ctx[..., : CFG_L.width], h_l) and torch.equal(ctx[..., CFG_L.width :], h_g)
    assert torch.equal(pooled, p_g) and pooled.shape == (2, CFG_G.projection_dim)

    ref = tiny_config("refiner")
    enc_r = TextEncoders.from_config(ref).eval()
    assert enc_r.clip_l is None
    with torch.no_grad():
        ctx_r, pooled_r = enc_r.encode(None, ids_g)
    assert ctx_r.shape == (2, 77, ref.unet.context_dim) and pooled_r.shape == (2, ref.text_g.projection_dim)
    with pytest.raises(ValueError):
        enc.encode(None, ids_g)
    with pytest.raises(ValueError):
        TextEncoders().encode(ids_l, ids_g)


def test_text_encoders_accept_built_towers():
    tl, tg = random_tower(CFG_L, 11), random_tower(CFG_G, 12)
    enc = TextEncoders(tl, tg)
    assert enc.clip_l is tl and enc.clip_g is tg
    assert set(enc.state_dict()) == {"clip_l." + k for k in tl.state_dict()} | {
        "clip_g." + k for k in tg.state_dict()
    }


# ------------------------------------------------------------------------------------------- sizes
def test_full_size_parameter_counts():
    """SDXL_SPEC section 4: CLIP-L 123,060,480 (HF CLIPTextModel, no projection); bigG 694,659,840 (HF
    CLIPTextModelWithProjection incl. the 1280x1280 projection; open_clip adds 1 for logit_scale)."""
    with torch.device("meta"):
        clip_l = CLIPTextTower(TextConfig.clip_l())
        bigg = CLIPTextTower(TextConfig.bigg())
    assert clip_l.num_parameters() == expected_num_parameters(clip_l.cfg) == 123_060_480
    assert bigg.num_parameters() == expected_num_parameters(bigg.cfg) == 694_659_840
    assert clip_l.text_projection is None and bigg.text_projection.weight.shape == (1280, 1280)


def test_full_size_official_key_counts_and_shapes():
    with torch.device("meta"):
        clip_l = CLIPTextTower(TextConfig.clip_l())
        bigg = CLIPTextTower(TextConfig.bigg())
    official = text_to_official(clip_l.state_dict(), bigg.state_dict(), "base")
    keys_l = [k for k in official if k.startswith(CLIP_L_PREFIX + "text_model.")]
    keys_g = [k for k in official if k.startswith(BIGG_PREFIX["base"])]
    assert len(keys_l) == 197 and len(keys_g) == 390 and len(official) == 587
    g = BIGG_PREFIX["base"]
    shapes = {
        g + "token_embedding.weight": (49408, 1280),
        g + "positional_embedding": (77, 1280),
        g + "transformer.resblocks.31.attn.in_proj_weight": (3840, 1280),
        g + "transformer.resblocks.0.attn.in_proj_bias": (3840,),
        g + "transformer.resblocks.9.mlp.c_fc.weight": (5120, 1280),
        g + "transformer.resblocks.9.mlp.c_proj.bias": (1280,),
        g + "ln_final.weight": (1280,),
        g + "text_projection": (1280, 1280),
        g + "logit_scale": (),
        CLIP_L_PREFIX + "text_model.embeddings.position_ids": (1, 77),
        CLIP_L_PREFIX + "text_model.encoder.layers.11.mlp.fc1.weight": (3072, 768),
        CLIP_L_PREFIX + "text_model.final_layer_norm.bias": (768,),
    }
    for key, shape in shapes.items():
        assert tuple(official[key].shape) == shape, key
    pos = official[CLIP_L_PREFIX + "text_model.embeddings.position_ids"]
    assert pos.dtype == torch.int64 and torch.equal(pos, torch.arange(77)[None])

    refiner = text_to_official(None, bigg.state_dict(), "refiner")
    assert len(refiner) == 390 and all(k.startswith(BIGG_PREFIX["refiner"]) for k in refiner)
    back_l, back_g = text_from_official(official, "base")
    assert set(back_l) == set(clip_l.state_dict()) and set(back_g) == set(bigg.state_dict())
    assert text_from_official(refiner, "refiner")[0] is None


# ------------------------------------------------------------------------------------------- layouts
def test_openclip_round_trip_is_lossless():
    sd = random_tower(CFG_G, 13).state_dict()
    oc = ours_to_openclip(sd)
    back = openclip_to_ours(oc)
    assert set(back) == set(sd)
    assert all(torch.equal(back[k], sd[k]) for k in sd)
    again = ours_to_openclip(back)
    assert set(again) == set(oc) and all(torch.equal(again[k], oc[k]) for k in oc)
    assert oc["logit_scale"].item() == pytest.approx(DEFAULT_LOGIT_SCALE)  # ln(100) = 4.6052
    assert "logit_scale" not in ours_to_openclip(sd, logit_scale=None)


def test_openclip_semantics():
    """in_proj rows are q, k, v; text_projection is P with pooled = x @ P."""
    tower = random_tower(CFG_G, 14)
    sd = tower.state_dict()
    oc = ours_to_openclip(sd)
    w = CFG_G.width
    in_proj = oc["transformer.resblocks.1.attn.in_proj_weight"]
    assert torch.equal(in_proj[:w], sd["encoder.layers.1.self_attn.q_proj.weight"])
    assert torch.equal(in_proj[w : 2 * w], sd["encoder.layers.1.self_attn.k_proj.weight"])
    assert torch.equal(in_proj[2 * w :], sd["encoder.layers.1.self_attn.v_proj.weight"])
    x = torch.randn(4, w)
    assert torch.allclose(x @ oc["text_projection"], tower.text_projection(x), atol=1e-6)
    # A file that already carries a Linear-oriented `text_projection.weight` is taken as is.
    alt = {k: v for k, v in oc.items() if k != "text_projection"}
    alt["text_projection.weight"] = sd["text_projection.weight"]
    assert torch.equal(openclip_to_ours(alt)["text_projection.weight"], sd["text_projection.weight"])
    with pytest.raises(ValueError, match="not part of"):
        openclip_to_ours({**oc, "visual.proj": torch.zeros(1)})
    # split q/k/v tensors must not share storage (safetensors refuses to save shared tensors)
    back = openclip_to_ours(oc)
    assert back["encoder.layers.0.self_attn.q_proj.weight"].untyped_storage().data_ptr() != (
        back["encoder.layers.0.self_attn.k_proj.weight"].untyped_storage().data_ptr()
    )


def test_openclip_conversion_agrees_with_diffusers():
    """diffusers' own single-file converter gives the same HF tensors from our OpenCLIP export."""
    single_file_utils = pytest.importorskip("diffusers.loaders.single_file_utils")
    ours = random_tower(CFG_G, 15)
    prefix = BIGG_PREFIX["base"]
    ckpt = {prefix + k: v for k, v in ours_to_openclip(ours.state_dict()).items()}
    theirs = single_file_utils.convert_open_clip_checkpoint(hf_model(CFG_G), ckpt, prefix=prefix)
    mine = ours_to_hf_clip(ours.state_dict(), position_ids=False)
    assert set(theirs) == set(mine)
    assert all(torch.equal(theirs[k], mine[k]) for k in mine)


def test_hf_layouts():
    sd = random_tower(CFG_L, 16).state_dict()
    for prefixed in (True, False):
        hf = ours_to_hf_clip(sd, text_model_prefix=prefixed)
        pos_key = ("text_model." if prefixed else "") + "embeddings.position_ids"
        assert pos_key in hf and len(hf) == len(sd) + 1
        back = hf_clip_to_ours(hf)  # drops position_ids
        assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
    # diffusers text_encoder_2: text_model.* plus a top-level text_projection.weight
    sd_g = random_tower(CFG_G, 17).state_dict()
    hf_g = ours_to_hf_clip(sd_g)
    assert "text_projection.weight" in hf_g and "text_model.text_projection.weight" not in hf_g
    # a full CLIPModel file: the vision side is ignored
    extra = {**hf_g, "vision_model.post_layernorm.weight": torch.ones(2), "logit_scale": torch.tensor(1.0),
             "visual_projection.weight": torch.ones(2, 2)}
    assert set(hf_clip_to_ours(extra)) == set(sd_g)
    with pytest.raises(ValueError):
        both = {"text_model.final_layer_norm.bias": torch.ones(1), "final_layer_norm.bias": torch.ones(2)}
        hf_clip_to_ours(both)


def test_hf_state_dict_loads_into_ours():
    """The reverse direction: transformers' own state dict -> our tower, same outputs."""
    _, hf = loaded_pair(CFG_G, seed=18)
    ours = CLIPTextTower(CFG_G).eval()
    ours.load_state_dict(hf_clip_to_ours(hf.state_dict()))
    ids = token_rows(pad=0, seed=19)
    with torch.no_grad():
        out = hf(ids, output_hidden_states=True)
        hidden, pooled = ours(ids)
    assert rel_err(hidden, out.hidden_states[-2]) <= TOL and rel_err(pooled, out.text_embeds) <= TOL
