"""Trainer options, second half of the kohya set: LoRA+ parameter groups, DoRA and LoKr training saved in
the kohya / LyCORIS formats (read back and applied by our own reader), tag dropout and
`keep_tokens_separator` for tag captions, and the configuration errors of these keys."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from sdxl.data.dataset import ImageCaptionDataset, process_tags
from sdxl.train import runner as TR
from sdxl.train.config import ConfigError, TrainConfig
from sdxl.weights import lora as L
from sdxl.weights.io import open_tensors
from trainsets import coloured_squares


def tiny_cfg(tmp: Path, images: Path, steps: int, **sections) -> TrainConfig:
    d = {
        "model": {"preset": "tiny"},
        "data": {"path": str(images), "resolution": 32, "bucket_step": 8, "ucg": 0.0},
        "train": {"output": str(tmp), "steps": steps, "batch_size": 4, "progress": False, "log_every": 1,
                  "tensorboard": "off"},
        "optim": {"lr": 1e-2},
        "checkpoint": {"every": 0},
    }
    for name, values in sections.items():
        d.setdefault(name, {}).update(values)
    return TrainConfig.from_dict(d)


def fall_factor(losses: list[float], k: int = 10) -> float:
    return (sum(losses[:k]) / k) / (sum(losses[-k:]) / k)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return coloured_squares(tmp_path_factory.mktemp("squares"))


@pytest.fixture(scope="module")
def base_file(tmp_path_factory) -> Path:
    """A tiny random-weight single file, so that the saved adapters can be applied to the same base."""
    from sdxl.models.config import tiny_config
    from sdxl.models.text import CLIPTextTower
    from sdxl.models.unet import UNet
    from sdxl.models.vae import AutoencoderKL
    from sdxl.weights.checkpoint import Checkpoint, write_single_file

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("base") / "base.safetensors"
    mc = tiny_config()
    parts = {"unet": UNet(mc.unet).state_dict(), "vae": AutoencoderKL(mc.vae).state_dict(),
             "text_l": CLIPTextTower(mc.text_l).state_dict(), "text_g": CLIPTextTower(mc.text_g).state_dict()}
    write_single_file(Checkpoint(path=path, config=mc, parts=parts), path)
    return path


# ------------------------------------------------------------------------------------------------ LoRA+
def _lr_by_name(trainer) -> dict[str, float]:
    names = {id(p): n for n, p in trainer.module.named_parameters()}
    out = {}
    for g in trainer.optimizer.param_groups:
        for p in g["params"]:
            out[names[id(p)]] = g["lr"]
    return out


def test_loraplus_groups_scale_exactly_the_up_weights(tmp_path, data):
    """loraplus_unet_lr_ratio / loraplus_text_encoder_lr_ratio: every lora_up weight (and only those) is in
    a group at lr x its part's ratio; lora_down weights keep lr / text_lr; every trained parameter is in
    exactly one group. loraplus_lr_ratio alone covers both parts."""
    lc = {"rank": 4, "text_encoders": True, "loraplus_unet_lr_ratio": 16, "loraplus_text_encoder_lr_ratio": 4}
    cfg = tiny_cfg(tmp_path / "a", data, 1, lora=lc, optim={"lr": 1e-3, "text_lr": 5e-4})
    trainer = TR.make_trainer(cfg)
    trainer.setup()
    lrs = _lr_by_name(trainer)
    trained = [n for n, p in trainer.module.named_parameters() if p.requires_grad]
    assert sorted(lrs) == sorted(trained)
    assert sum(len(g["params"]) for g in trainer.optimizer.param_groups) == len(trained)
    ups = [n for n in trained if n.endswith("lora_up.weight")]
    assert any(n.startswith("lora.te1.") for n in ups) and any(n.startswith("lora.unet.") for n in ups)
    for n in trained:
        text = n.startswith(("lora.te1.", "lora.te2."))
        base = 5e-4 if text else 1e-3
        want = base * (4 if text else 16) if n.endswith("lora_up.weight") else base
        assert math.isclose(lrs[n], want, rel_tol=1e-12), (n, lrs[n], want)

    cfg = tiny_cfg(tmp_path / "b", data, 1, lora={"rank": 4, "loraplus_lr_ratio": 8}, optim={"lr": 1e-3})
    trainer = TR.make_trainer(cfg)
    trainer.setup()
    lrs = _lr_by_name(trainer)
    assert {lr for n, lr in lrs.items() if n.endswith("lora_up.weight")} == {8e-3}
    assert {lr for n, lr in lrs.items() if not n.endswith("lora_up.weight")} == {1e-3}

    cfg = tiny_cfg(tmp_path / "c", data, 1, lora={"rank": 4}, optim={"lr": 1e-3})
    trainer = TR.make_trainer(cfg)
    trainer.setup()
    assert set(_lr_by_name(trainer).values()) == {1e-3}  # no ratio: one rate, as before


# ------------------------------------------------------------------------------------------ DoRA / LoKr
def _check_file_reproduces_trained_unet(trainer, exported: Path, base_file: Path) -> None:
    from sdxl.pipeline import SDXL

    lora = L.load_lora(exported)
    assert not lora.problems, lora.problems
    pipe = SDXL.load(base_file)
    patch = L.apply(L.lora_models(pipe.unet, pipe.text), [(lora, 1.0)])
    assert all(r.ok for r in patch.reports), [r.summary() for r in patch.reports]
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(1, 4, 4, 4, generator=g), torch.randn(1, 77, 96, generator=g)
    y = torch.randn(1, 1600, generator=g)
    t = torch.tensor([500])
    with torch.no_grad():
        ours = pipe.unet(x, t, ctx, y)
        trained = trainer.models.unet.eval()(x, t, ctx, y)
        patch.remove()
        untouched = pipe.unet(x, t, ctx, y)
    assert (trained - untouched).abs().max() > 1e-3, "training changed nothing: the check would be empty"
    torch.testing.assert_close(ours, trained, rtol=1e-5, atol=1e-5)


def test_dora_training_overfits_and_saves_kohya_dora_scale(tmp_path, data, base_file):
    """lora.dora: the loss falls on the overfit set; the file has lora_down / lora_up / alpha / dora_scale
    ([out, 1] for Linear, [out, 1, 1, 1] for conv: LyCORIS' per-output-channel layout) under kohya names, the
    magnitudes moved from their initial row norms, and the file applied by our reader at weight 1 gives the
    trained model's UNet output."""
    cfg = tiny_cfg(tmp_path, data, 40, model={"preset": "", "init": str(base_file)},
                   lora={"rank": 4, "alpha": 4.0, "conv": True, "dora": True})
    trainer = TR.make_trainer(cfg)
    trainer.setup()
    params = dict(trainer.module.named_parameters())
    init_norms = {n: p.detach().clone() for n, p in params.items() if n.endswith("dora_scale")}
    result = trainer.train()
    assert fall_factor(result.losses) > 1.2, result.losses
    f = open_tensors(result.exported)
    scales = [k for k in f if k.endswith(".dora_scale")]
    assert scales and all(k.startswith("lora_unet_") for k in scales)
    for k in scales:
        stem = k[: -len(".dora_scale")]
        up = f[stem + ".lora_up.weight"]
        assert stem + ".lora_down.weight" in f and stem + ".alpha" in f
        assert tuple(f[k].shape) == (up.shape[0],) + (1,) * (up.ndim - 1)
    assert any(f[k].ndim == 4 for k in scales) and any(f[k].ndim == 2 for k in scales)
    moved = [n for n, m in init_norms.items() if not torch.equal(params[n], m)]
    assert moved, "the DoRA magnitudes did not train"
    _check_file_reproduces_trained_unet(trainer, result.exported, base_file)


def test_dora_layer_starts_as_the_base_layer():
    """At initialisation m = ||W|| row-wise and up = 0, so the DoRA layer's output is the base output."""
    torch.manual_seed(0)
    lin, conv = torch.nn.Linear(12, 6), torch.nn.Conv2d(4, 6, 3, padding=1)
    for layer, x in ((lin, torch.randn(2, 5, 12)), (conv, torch.randn(2, 4, 5, 5))):
        with torch.no_grad():
            plain = layer(x)
        d = L.LoRALayer(layer, 2, 2.0, dora=True)
        assert tuple(d.dora_scale.shape) == (6,) + (1,) * (layer.weight.ndim - 1)
        with torch.no_grad():
            torch.testing.assert_close(layer(x), plain, rtol=1e-6, atol=1e-6)
        d.remove()


@pytest.mark.parametrize("rank,factor,whole", [(4, -1, False), (1000, 4, True)])
def test_lokr_training_overfits_and_saves_lycoris_keys(tmp_path, data, base_file, rank, factor, whole):
    """lora.algo = lokr: the loss falls; the file holds lokr_w1 and lokr_w2 (whole, for a rank at least
    half the factor's side) or lokr_w2_a / lokr_w2_b, and alpha, under kohya names, and applied by our
    reader at weight 1 reproduces the trained model's UNet output."""
    cfg = tiny_cfg(tmp_path, data, 40, model={"preset": "", "init": str(base_file)},
                   lora={"rank": rank, "alpha": float(rank), "conv": True, "algo": "lokr", "factor": factor})
    trainer = TR.make_trainer(cfg)
    trainer.setup()
    result = trainer.train()
    assert fall_factor(result.losses) > 1.2, result.losses
    f = open_tensors(result.exported)
    w1 = [k for k in f if k.endswith(".lokr_w1")]
    assert w1 and all(k.startswith("lora_unet_") for k in w1)
    assert not any("lora_down" in k or "lora_up" in k for k in f)
    layouts = set()
    for k in w1:
        stem = k[: -len(".lokr_w1")]
        assert stem + ".alpha" in f
        split = stem + ".lokr_w2_a" in f
        assert split == (stem + ".lokr_w2_b" in f) != (stem + ".lokr_w2" in f)
        layouts.add(split)
    assert layouts == ({False} if whole else {False, True})  # rank 4 splits w2 on the wider layers only
    if factor > 0:
        assert all(4 in tuple(f[k].shape) or min(f[k].shape) < 4 for k in w1)
    _check_file_reproduces_trained_unet(trainer, result.exported, base_file)


def test_lokr_factors():
    assert L.train.lokr_factors(320, -1) == (16, 20)
    assert L.train.lokr_factors(320, 4) == (4, 80)
    assert L.train.lokr_factors(320, 8) == (8, 40)
    assert L.train.lokr_factors(96, 5) == (4, 24)  # 5 does not divide 96: the largest split with m <= 5
    assert L.train.lokr_factors(7, -1) == (1, 7)


# --------------------------------------------------------------------------------------------- tag captions
CAPTION = "trigger, 1girl ||| red hair, smile, outdoors, sky, tree, hat, dress, cat ||| masterpiece, best"


def test_tags_deterministic_for_a_seed_and_kept_parts_fixed():
    runs = [process_tags(CAPTION, np.random.default_rng([7, i]), shuffle=True, tag_dropout=0.4,
                         keep_separator="|||") for i in range(50)]
    again = [process_tags(CAPTION, np.random.default_rng([7, i]), shuffle=True, tag_dropout=0.4,
                          keep_separator="|||") for i in range(50)]
    assert runs == again
    assert len(set(runs)) > 10  # shuffled and dropped differently per draw
    flex = {"red hair", "smile", "outdoors", "sky", "tree", "hat", "dress", "cat"}
    for out in runs:
        tags = out.split(", ")
        assert "|||" not in out
        assert tags[:2] == ["trigger", "1girl"] and tags[-2:] == ["masterpiece", "best"]
        assert set(tags[2:-2]) <= flex and len(tags[2:-2]) == len(set(tags[2:-2]))
    # keep_tokens without a separator in the caption: the first N tags stay, never dropped
    for i in range(50):
        out = process_tags("a, b, c, d, e, f", np.random.default_rng(i), shuffle=True, keep_tokens=2,
                           tag_dropout=0.9, keep_separator="|||")
        assert out.split(", ")[:2] == ["a", "b"]
    # no shuffle, no dropout: the separator is removed and the order kept
    assert process_tags("x ||| y, z", np.random.default_rng(0), keep_separator="|||") == "x, y, z"


def test_tag_dropout_rate_is_binomial():
    """Over 2000 captions of 8 droppable tags, the dropped fraction lies within 4 standard deviations of the
    rate (binomial, n = 16000), for 0.1 and 0.5; rate 0 drops none, rate 1 drops all droppable tags."""
    flex = ", ".join(f"t{j}" for j in range(8))
    for rate in (0.1, 0.5):
        kept = 0
        for i in range(2000):
            out = process_tags("keep ||| " + flex, np.random.default_rng([3, i]), tag_dropout=rate,
                               keep_separator="|||")
            tags = out.split(", ")
            assert tags[0] == "keep"
            kept += len(tags) - 1
        n = 2000 * 8
        dropped = 1 - kept / n
        assert abs(dropped - rate) < 4 * math.sqrt(rate * (1 - rate) / n), (rate, dropped)
    assert process_tags("keep ||| " + flex, np.random.default_rng(0), tag_dropout=1.0,
                        keep_separator="|||") == "keep"
    assert process_tags(flex, np.random.default_rng(0), tag_dropout=0.0) == flex


def test_dataset_tag_dropout_is_seeded(tmp_path):
    """The dataset draws tag dropout from (seed, epoch, index): same seed -> same captions, other epoch or
    seed -> different ones; the kept part leads every caption."""
    folder = coloured_squares(tmp_path / "imgs")
    for i in range(4):
        (folder / f"img{i}.txt").write_text(f"sq{i} ||| " + ", ".join(f"tag{j}" for j in range(12)))

    def captions(seed: int, epoch: int) -> list[str]:
        ds = ImageCaptionDataset(folder, resolution=32, step=8, seed=seed, ucg=0.0, shuffle_caption=True,
                                 caption_tag_dropout_rate=0.3, keep_tokens_separator="|||")
        ds.set_epoch(epoch)
        return [ds[i]["caption"] for i in range(len(ds))]

    a = captions(1, 0)
    assert a == captions(1, 0)
    assert a != captions(1, 1) and a != captions(2, 0)
    for i, c in enumerate(a):
        assert c.startswith(f"sq{i}, ") and "|||" not in c


# ------------------------------------------------------------------------------------------- config errors
@pytest.mark.parametrize("key,value", [
    ("lora.loraplus_lr_ratio", -1.0),
    ("lora.loraplus_unet_lr_ratio", -2.0),
    ("lora.loraplus_text_encoder_lr_ratio", float("nan")),
    ("lora.factor", 0),
    ("lora.factor", -3),
    ("lora.algo", "loha"),
    ("data.caption_tag_dropout_rate", 1.5),
    ("data.caption_tag_dropout_rate", -0.1),
    ("data.keep_tokens_separator", ","),
    ("data.keep_tokens_separator", "  "),
    ("data.keep_tokens", -1),
])
def test_bad_values_name_the_key(key, value):
    section, name = key.split(".")
    with pytest.raises(ConfigError, match=name):
        TrainConfig.from_dict({section: {name: value}})


def test_dora_needs_lora_algo():
    with pytest.raises(ConfigError, match="lora.dora"):
        TrainConfig.from_dict({"lora": {"rank": 4, "dora": True, "algo": "lokr"}})
