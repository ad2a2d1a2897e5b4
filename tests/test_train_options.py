"""Trainer options users bring from kohya configs (tiny models, CPU, seconds each): the Prodigy optimizer,
multi-resolution (pyramid) noise, the debiased estimation loss, per-tower and block-wise learning rates, a
validation loss on held-out images, and sample images in TensorBoard."""

from __future__ import annotations

import io
import json
import logging
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from sdxl.sampling.denoiser import DiscreteSchedule
from sdxl.train import losses as TL
from sdxl.train import runner as TR
from sdxl.train import trainer as T
from sdxl.train.config import ConfigError, TrainConfig
from trainsets import coloured_squares


def tiny_run(tmp: Path, images: Path, steps: int, **sections) -> TrainConfig:
    d = {
        "model": {"preset": "tiny"},
        "data": {"path": str(images), "resolution": 32, "bucket_step": 8, "ucg": 0.0},
        "train": {"output": str(tmp), "steps": steps, "batch_size": 4, "progress": False, "log_every": 1,
                  "tensorboard": "off"},
        "optim": {"lr": 2e-3},
        "checkpoint": {"every": 0},
    }
    for name, values in sections.items():
        d.setdefault(name, {}).update(values)
    return TrainConfig.from_dict(d)


def trainer_for(cfg: TrainConfig) -> T.Trainer:
    tr = TR.make_trainer(cfg)
    tr.setup()
    return tr


def fall_factor(losses: list[float], k: int = 10) -> float:
    return (sum(losses[:k]) / k) / (sum(losses[-k:]) / k)


def log_rows(folder: Path) -> list[dict]:
    return [json.loads(x) for x in (folder / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return coloured_squares(tmp_path_factory.mktemp("squares"))


# ------------------------------------------------------------------------------------------------ Prodigy
def test_prodigy_overfits_and_its_errors(tmp_path, data, monkeypatch):
    """optim.name = prodigy (prodigyopt): the step size estimate d grows from d0 = 1e-6 and the loss on the
    four squares, measured at fixed timesteps and noise (the validation loss on the training folder), falls
    (measured 1.7x in 60 steps). With d_coef = 1 this tiny model overshoots (d reaches 2e-3 and the loss
    climbs back), hence d_coef = 0.5. Groups with different non-zero rates and a missing package are
    one-line ConfigErrors."""
    from prodigyopt import Prodigy

    cfg = tiny_run(tmp_path / "p", data, 60, validation={"path": str(data)},
                   optim={"name": "prodigy", "lr": 1.0, "weight_decay": 0.0, "prodigy_d_coef": 0.5})
    tr = trainer_for(cfg)
    assert isinstance(tr.optimizer, Prodigy)
    assert tr.optimizer.param_groups[0]["d_coef"] == 0.5
    before = tr.validation_loss()["val_loss"]
    tr.train()
    assert tr.optimizer.param_groups[0]["d"] > 1e-4
    after = tr.validation_loss()["val_loss"]
    assert before / after > 1.3, (before, after)

    two_rates = tiny_run(tmp_path / "q", data, 1, train={"train_text_encoders": True},
                         optim={"name": "prodigy", "lr": 1.0, "text_lr": 0.5})
    with pytest.raises(ConfigError, match="prodigy: every parameter group needs the same learning rate"):
        trainer_for(two_rates)
    monkeypatch.setitem(sys.modules, "prodigyopt", None)
    with pytest.raises(ConfigError, match="pip install prodigyopt"):
        trainer_for(tiny_run(tmp_path / "r", data, 1, optim={"name": "prodigy", "lr": 1.0}))


def test_prodigy_resumes_exactly(tmp_path, data):
    """Prodigy's state lives partly in its parameter groups (d, d_max, d_numerator, k, ...): 4 steps + resume
    + 4 steps equal 8 straight steps, and the restored d is the saved one."""
    def cfg(out, **kw):
        return tiny_run(tmp_path / out, data, 8, optim={"name": "prodigy", "lr": 1.0, "prodigy_d_coef": 0.5},
                        checkpoint={"every": 4, **kw.pop("checkpoint", {})}, **kw)

    straight = TR.run(cfg("straight"))
    first = TR.run(cfg("split", train={"stop_at": 4}))
    assert first.interrupted and first.step == 4
    resumed = trainer_for(cfg("split", checkpoint={"resume": True}))
    assert resumed.step == 4 and resumed.optimizer.param_groups[0]["k"] == 4
    assert resumed.optimizer.param_groups[0]["d"] > 1e-6
    second = resumed.train()
    assert second.losses == straight.losses[4:]


# ------------------------------------------------------------------------------------------ pyramid noise
def kohya_pyramid_noise_like(noise, iterations, discount, rand):
    """kohya sd-scripts' pyramid_noise_like, with its `random.random()` and `torch.randn` taken from `rand`
    (a generator) so the test can replay the trainer's draws."""
    b, c, w, h = noise.shape
    u = torch.nn.Upsample(size=(w, h), mode="bilinear")
    for i in range(iterations):
        r = float(torch.rand((), generator=rand, dtype=torch.float64)) * 2 + 2
        wn, hn = max(1, int(w / (r**i))), max(1, int(h / (r**i)))
        noise += u(torch.randn(b, c, wn, hn, generator=rand)) * discount**i
        if wn == 1 or hn == 1:
            break
    return noise / noise.std()


def test_pyramid_noise_matches_kohya_and_changes_the_noise():
    shape = (4, 16, 12)
    plain = TL.draw_noise([TL.sample_generator(0, 2, 0, 7)], shape, 0, 1000)
    pyr = TL.draw_noise([TL.sample_generator(0, 2, 0, 7)], shape, 0, 1000, multires=(6, 0.3))
    assert torch.equal(plain.t, pyr.t) and torch.equal(plain.posterior, pyr.posterior)
    # replay: posterior, t, eps, then kohya's pyramid on the same generator
    g = TL.sample_generator(0, 2, 0, 7)
    torch.randn(shape, generator=g)
    torch.randint(0, 1000, (1,), generator=g)
    eps = torch.randn(shape, generator=g)
    assert torch.equal(eps, plain.noise[0])
    expected = kohya_pyramid_noise_like(eps.clone()[None], 6, 0.3, g)[0]
    torch.testing.assert_close(pyr.noise[0], expected, rtol=1e-5, atol=1e-6)
    assert (pyr.noise - plain.noise).abs().max() > 0.1
    assert abs(float(pyr.noise.std()) - 1.0) < 1e-4
    # low frequencies are boosted: the 8x8-pooled noise varies more than white noise's
    big = [TL.sample_generator(1, 0, 0, i) for i in range(4)]
    white = TL.draw_noise(big, (4, 64, 64), 0, 1000).noise
    pink = TL.draw_noise([TL.sample_generator(1, 0, 0, i) for i in range(4)], (4, 64, 64), 0, 1000,
                         multires=(6, 0.8)).noise
    assert F.avg_pool2d(pink, 8).std() > 2 * F.avg_pool2d(white, 8).std()


def test_pyramid_noise_reaches_the_training_loss(tmp_path, data, monkeypatch):
    seen = {}
    real = T.draw_noise

    def spy(*args, **kw):
        d = real(*args, **kw)
        seen.setdefault("draws", []).append((args, kw, d))
        return d

    monkeypatch.setattr(T, "draw_noise", spy)
    for iters in (0, 4):
        tr = trainer_for(tiny_run(tmp_path / f"m{iters}", data, 1,
                                  loss={"multires_noise_iterations": iters, "multires_noise_discount": 0.5}))
        tr.compute_loss(tr.stream.next(), 0)
    (_, kw0, d0), (_, kw1, d1) = seen["draws"]
    assert seen["draws"][1][0][-1] == (4, 0.5)
    assert torch.equal(d0.t, d1.t) and not torch.allclose(d0.noise, d1.noise)


# ------------------------------------------------------------------------------------- debiased estimation
def test_debiased_weights_are_inverse_sqrt_snr_clamped():
    ac = DiscreteSchedule().alphas_cumprod
    t = torch.tensor([0, 1, 10, 250, 500, 999])
    snr = (ac[t] / (1 - ac[t])).float()
    assert snr[0] > 1000  # t = 0 hits kohya's cap
    w = TL.debiased_weights(t, ac, "eps")
    torch.testing.assert_close(w, 1 / snr.clamp(max=1000).sqrt())
    assert w[0] == pytest.approx(1000**-0.5)
    torch.testing.assert_close(TL.debiased_weights(t, ac, "v"), 1 / (snr.clamp(max=1000) + 1))


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_debiased_estimation_weights_the_training_loss(tmp_path, data, monkeypatch, prediction):
    """With per-sample errors of 1 the loss is the mean weight of the batch's timesteps."""
    drawn = []
    real = T.draw_noise
    monkeypatch.setattr(T, "draw_noise", lambda *a, **k: drawn.append(real(*a, **k)) or drawn[-1])
    monkeypatch.setattr(T, "per_sample_error", lambda pred, target, *a: torch.ones(pred.shape[0]))
    ac = DiscreteSchedule().alphas_cumprod
    for on in (False, True):
        tr = trainer_for(tiny_run(tmp_path / f"d{on}{prediction}", data, 1, model={"prediction": prediction},
                                  loss={"debiased_estimation": on}))
        loss, _ = tr.compute_loss(tr.stream.next(), 0)
        t = drawn[-1].t
        snr = (ac[t] / (1 - ac[t])).float().clamp(max=1000)
        expected = (1 / snr.sqrt() if prediction == "eps" else 1 / (snr + 1)).mean() if on else 1.0
        assert float(loss) == pytest.approx(float(expected), rel=1e-5)


# ------------------------------------------------------------------------------------- learning rates
BLOCK_LR = [round((i + 1) * 1e-5, 8) for i in range(23)]


def expected_block(name: str) -> int:
    n = name.removeprefix("unet.")
    if n.startswith(("time_embed.", "label_emb.")):
        return 0
    if n.startswith("input_blocks."):
        return 1 + int(n.split(".")[1])
    if n.startswith("middle_block."):
        return 10 + int(n.split(".")[1])
    if n.startswith("output_blocks."):
        return 13 + int(n.split(".")[1])
    assert n.startswith("out."), n
    return 22


def lr_of(tr) -> dict[str, float]:
    names = {id(p): n for n, p in tr.module.named_parameters()}
    out = {}
    for g in tr.optimizer.param_groups:
        for p in g["params"]:
            assert names[id(p)] not in out
            out[names[id(p)]] = g["lr"]
    assert set(out) == {n for n, p in tr.module.named_parameters() if p.requires_grad}
    return out


def test_tower_and_block_learning_rates_are_parameter_groups(tmp_path, data):
    cfg = tiny_run(tmp_path / "g", data, 1, train={"train_text_encoders": True},
                   optim={"lr_text_l": 1e-4, "lr_text_g": 3e-4, "block_lr": BLOCK_LR})
    lrs = lr_of(trainer_for(cfg))
    blocks_seen = set()
    for n, lr in lrs.items():
        if n.startswith("text.clip_l."):
            assert lr == 1e-4, n
        elif n.startswith("text.clip_g."):
            assert lr == 3e-4, n
        else:
            i = expected_block(n)
            blocks_seen.add(i)
            assert lr == BLOCK_LR[i], (n, lr)
    assert blocks_seen == set(range(23))
    # without block_lr the UNet is at optim.lr; text_lr is the towers' fallback
    plain = lr_of(trainer_for(tiny_run(tmp_path / "h", data, 1, train={"train_text_encoders": True},
                                       optim={"text_lr": 5e-4, "lr_text_g": 3e-4})))
    assert {lr for n, lr in plain.items() if n.startswith("unet.")} == {2e-3}
    assert {lr for n, lr in plain.items() if n.startswith("text.clip_l.")} == {5e-4}
    assert {lr for n, lr in plain.items() if n.startswith("text.clip_g.")} == {3e-4}


def test_block_and_tower_rates_for_lora(tmp_path, data):
    cfg = tiny_run(tmp_path / "l", data, 1, lora={"rank": 2, "text_encoders": True},
                   optim={"lr_text_l": 1e-4, "lr_text_g": 3e-4, "block_lr": BLOCK_LR})
    lrs = lr_of(trainer_for(cfg))
    for n, lr in lrs.items():
        if n.startswith("lora.te1."):
            assert lr == 1e-4
        elif n.startswith("lora.te2."):
            assert lr == 3e-4
        else:
            m = re.match(r"lora\.unet\.lora_unet_(input_blocks|middle_block|output_blocks)_(\d+)_", n)
            assert m, n  # the tiny UNet's adapters sit in the numbered blocks
            assert lr == BLOCK_LR[expected_block(f"{m.group(1)}.{m.group(2)}.")], n


def test_a_zero_block_rate_leaves_the_block_unchanged(tmp_path, data):
    rates = [0.0] * 22 + [2e-3]  # only the output layer trains
    tr = trainer_for(tiny_run(tmp_path / "z", data, 2, optim={"block_lr": rates, "weight_decay": 0.1}))
    before = {n: p.detach().clone() for n, p in tr.module.named_parameters()}
    tr.train()
    after = dict(tr.module.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n].detach())}
    assert changed and all(n.startswith("unet.out.") for n in changed), sorted(changed)[:5]


@pytest.mark.parametrize("key,value,match", [
    ("optim.lr", -1e-4, "optim.lr must be >= 0"),
    ("optim.lr_text_l", -1.0, "optim.lr_text_l must be >= 0"),
    ("optim.text_lr", -1.0, "optim.text_lr must be >= 0"),
    ("optim.block_lr", [1e-4] * 22, "optim.block_lr needs 23 values"),
    ("optim.block_lr", [1e-4] * 22 + [-1.0], r"optim.block_lr\[22\]"),
    ("optim.prodigy_d_coef", 0.0, "optim.prodigy_d_coef"),
    ("loss.multires_noise_iterations", -1, "loss.multires_noise_iterations"),
    ("loss.multires_noise_discount", 0.0, "loss.multires_noise_discount"),
    ("validation.fraction", 1.0, "validation.fraction"),
    ("validation.timesteps", [100, 1000], "validation.timesteps"),
    ("validation.every", 5,
     "validation.every needs validation.path, validation.fraction or validation.shapes_n"),
])
def test_bad_values_name_the_key(key, value, match):
    section, name = key.split(".")
    with pytest.raises(ConfigError, match=match):
        TrainConfig.from_dict({section: {name: value}})


def test_validation_is_for_diffusion_training():
    with pytest.raises(ConfigError, match=r"\[validation\] is for train.task"):
        TrainConfig.from_dict({"train": {"task": "vae"}, "validation": {"path": "x"}})


# ------------------------------------------------------------------------------------------- validation
def test_validation_loss_is_repeatable_and_follows_the_weights(tmp_path, data, caplog):
    """A held-out image (validation.fraction) never trains; the validation loss at fixed timesteps and noise
    is identical across two runs with the same seed, and changes with the weights (later steps, another
    learning rate, a perturbed weight)."""
    val = {"fraction": 0.25, "every": 2, "timesteps": [100, 500, 900], "seed": 3}

    def run(name, lr=2e-3):
        tr = trainer_for(tiny_run(tmp_path / name, data, 4, validation=val, train={"batch_size": 1},
                                  optim={"lr": lr}))
        return tr, tr.train()

    with caplog.at_level(logging.INFO, logger="sdxl.train"):
        tr, _ = run("a")
    assert "validation loss" in caplog.text
    assert len(tr.held_out) == 1 and tr.val_indices == tr.held_out
    trained = {i for e in range(3) for b in tr.sampler.batches_for_rank(e) for i in b}
    assert trained == set(range(4)) - set(tr.held_out)
    _, _ = run("b")
    rows = lambda name: [r for r in log_rows(tmp_path / name) if "val_loss" in r]  # noqa: E731
    a, b = rows("a"), rows("b")
    assert [r["step"] for r in a] == [2, 4]
    assert {"val_loss_t100", "val_loss_t500", "val_loss_t900"} <= set(a[0])
    assert [r["val_loss"] for r in a] == [r["val_loss"] for r in b]  # same seed: bitwise equal
    assert a[0]["val_loss"] != a[1]["val_loss"]  # the weights changed between steps 2 and 4
    _, _ = run("c", lr=5e-4)
    assert rows("c")[1]["val_loss"] != a[1]["val_loss"]

    first = tr.validation_loss()
    assert tr.validation_loss() == first
    assert first["val_loss"] == pytest.approx(a[1]["val_loss"])
    with torch.no_grad():
        tr.models.unet.out[-1].bias.add_(0.05)
    assert tr.validation_loss()["val_loss"] != first["val_loss"]


def test_validation_folder(tmp_path, data):
    """validation.path: every image of another folder, none held out of the training data."""
    other = coloured_squares(tmp_path / "val")
    tr = trainer_for(tiny_run(tmp_path / "o", data, 2, validation={"path": str(other), "every": 1}))
    assert tr.held_out == [] and tr.val_indices == [0, 1, 2, 3]
    tr.train()
    assert [r["step"] for r in log_rows(tmp_path / "o") if "val_loss" in r] == [1, 2]


# ---------------------------------------------------------------------------------------- TensorBoard
def test_sample_images_are_logged_to_tensorboard(tmp_path, data):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = tiny_run(tmp_path / "tb", data, 2, train={"tensorboard": "on"},
                   sample={"every": 2, "prompts": ["a red square", "a blue square"], "steps": 2})
    TR.run(cfg)
    acc = EventAccumulator(str(tmp_path / "tb" / "tb"), size_guidance={"images": 0})
    acc.Reload()
    assert {"sample/0", "sample/1"} <= set(acc.Tags()["images"])
    for k in (0, 1):
        (event,) = acc.Images(f"sample/{k}")
        assert event.step == 2 and (event.width, event.height) == (32, 32)
        logged = np.asarray(Image.open(io.BytesIO(event.encoded_image_string)).convert("RGB"))
        saved = np.asarray(Image.open(tmp_path / "tb" / "samples" / f"step-00000002-{k}.png").convert("RGB"))
        assert np.array_equal(logged, saved)
