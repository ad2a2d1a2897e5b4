"""GenerationRequest: immutable, validated without side effects, resolved once against the loaded model; the
CLI reaches every field and speaks in flags. Each test here failed on the code before the one-path change."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

from sdxl.cli import _field_flags, _request_fields, app
from sdxl.errors import RequestError
from sdxl.models.config import ModelConfig, tiny_config
from sdxl.request import GenerationRequest, LoraSpec, iteration_seeds

runner = CliRunner()


def test_request_is_immutable_and_validate_changes_nothing():
    req = GenerationRequest(prompt="x", sampler="DPM++ 2M Karras", schedule="Automatic")
    with pytest.raises(dataclasses.FrozenInstanceError):
        req.seed = 3  # type: ignore[misc]
    assert req.validate() is req
    assert (req.sampler, req.schedule, req.seed, req.width) == ("DPM++ 2M Karras", "Automatic", None, None)


def test_resolve_is_pure_and_fills_everything_from_the_model():
    zsnr = dataclasses.replace(tiny_config(), prediction="v", zero_terminal_snr=True, sample_size=256)
    req = GenerationRequest(prompt="x", width=384, sampler="DPM++ 2M", seed=5)
    r = req.resolve(zsnr)
    assert (r.width, r.height) == (384, 256)  # the side not given is the model's native size
    assert (r.sampler, r.schedule, r.prediction, r.zero_terminal_snr) == ("dpmpp_2m", "trailing", "v", True)
    assert r.resolve(zsnr) == r  # resolving twice changes nothing
    assert req.width == 384 and req.height is None and req.schedule == "automatic"  # the input is untouched
    plain = req.resolve(ModelConfig())
    assert (plain.height, plain.schedule, plain.prediction) == (1024, "karras", "eps")
    assert GenerationRequest(prompt="x").resolve(zsnr).seed is not None


@pytest.mark.parametrize("field, value", [("cfg", float("nan")), ("aesthetic_score", float("inf")),
                                          ("eta", float("nan")), ("mask_blur", -1), ("refiner_steps", 0)])
def test_non_finite_and_out_of_range_values_are_refused(field, value):
    with pytest.raises(RequestError, match=field):
        GenerationRequest(prompt="x", **{field: value}).validate()


def test_loras_become_lora_specs_from_any_container():
    for given in ([{"name": "a", "weight": 0.5}], ({"name": "a", "weight": 0.5},), [("a", 0.5)]):
        assert GenerationRequest(prompt="x", loras=given).loras == (LoraSpec("a", 0.5),)


def test_iteration_seeds():
    assert iteration_seeds(10, 4, 3) == [10, 14, 18]


def test_every_request_field_is_a_cli_option():
    """The CLI builds its options from the fields, so none can be missing (emphasis, mask_blur,
    refiner_steps and the negative crops could not be set before)."""
    command = typer.main.get_command(app).commands["generate"]
    flags = {opt for param in command.params for opt in param.opts}
    for f in _request_fields():
        assert _field_flags(f)[0] in flags, f.name
    hidden = {f.name for f in dataclasses.fields(GenerationRequest)} - {f.name for f in _request_fields()}
    # positional, --lora, --model, --refiner, --controlnet with --control-image, --ip-adapter with --ip-image
    assert hidden == {"prompt", "loras", "model", "refiner", "controls", "ip_adapters"}


def test_cli_sets_the_fields_it_used_to_drop(tiny_files, tmp_path):
    out = tmp_path / "x.png"
    res = runner.invoke(app, [
        "generate", "a cat", "--model", str(tiny_files["base"]), "-W", "32", "-H", "32", "--steps", "2",
        "--seed", "3", "--emphasis", "no_norm", "--refiner-steps", "5", "--negative-crop-top", "8",
        "--mask-blur", "2", "--out", str(out), "--quiet",
    ])
    assert res.exit_code == 0, res.output
    stored = json.loads(Image.open(out).info["sdxl"])["request"]
    got = tuple(stored[k] for k in ("emphasis", "refiner_steps", "negative_crop_top", "mask_blur"))
    assert got == ("no_norm", 5, 8, 2)


def test_one_side_keeps_the_models_native_size(tmp_path):
    """-W 384 alone on the 256 px shipped model: 384 x 256 (it gave 384 x 1024)."""
    out = tmp_path / "w.png"
    res = runner.invoke(app, ["generate", "a red circle", "-W", "64", "--steps", "1", "--seed", "1",
                              "--out", str(out), "--quiet"])
    assert res.exit_code == 0, res.output
    assert Image.open(out).size == (64, 256)


def test_random_seed_is_printed_and_stored(tiny_files, tmp_path):
    out = tmp_path / "s.png"
    res = runner.invoke(app, ["generate", "a cat", "--model", str(tiny_files["base"]), "-W", "32", "-H", "32",
                              "--steps", "1", "--out", str(out)])
    assert res.exit_code == 0, res.output
    seed = json.loads(Image.open(out).info["sdxl"])["request"]["seed"]
    assert f"seed: {seed}" in res.output


@pytest.mark.parametrize("args, message", [
    (["--mask", "m.png"], "error: --mask: inpainting needs --init-image too"),
    (["--cfg", "nan"], "error: --cfg: nan is not a finite number"),
    (["--refiner-mode", "x"], "error: --refiner-mode: 'x' is not 'ensemble' or 'sdedit'"),
])
def test_request_errors_name_flags(args, message):
    res = runner.invoke(app, ["generate", "a cat", *args])
    assert res.exit_code == 2
    assert res.output.strip().splitlines()[-1] == message


def test_cuda_on_a_cpu_build_is_one_line(tmp_path):
    """`--device cuda` where torch has no CUDA: one line naming the flag, not a 40-line traceback."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "sdxl", "generate", "a cat", "--device", "cuda", "--steps", "1",
           "--out", str(tmp_path / "c.png")]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 2
    lines = [x for x in res.stderr.strip().splitlines() if not x.startswith("seed")]
    assert len(lines) == 1 and lines[0].startswith("error: --device cuda:"), res.stderr


def test_load_default_gives_the_shipped_models():
    import sdxl

    base, refiner = sdxl.load("default"), sdxl.load("default", kind="refiner")
    assert (base.kind, refiner.kind) == ("base", "refiner")
    assert base.path.name == "base.safetensors" and refiner.path.name == "refiner.safetensors"


def test_vae_tiling_is_read(tiny_files, monkeypatch):
    """--vae-tiling reached the request and was never read; now the decode receives it."""
    import sdxl
    from sdxl import pipeline

    seen = []
    real = pipeline.vae_decode
    monkeypatch.setattr(pipeline, "vae_decode",
                        lambda pipe, x, tiled: seen.append(tiled) or real(pipe, x, tiled))
    pipe = sdxl.load(tiny_files["base"])
    for tiling in (True, False, None):
        pipe.generate(GenerationRequest(prompt="x", width=32, height=32, steps=1, seed=1, vae_tiling=tiling))
    assert seen == [True, False, None]


def test_textual_inversion_reaches_the_prompt(tiny_files, tmp_path):
    """pipe.embeddings was read and never set; load_embeddings makes the library reachable."""
    import torch
    from safetensors.torch import save_file

    import sdxl

    pipe = sdxl.load(tiny_files["base"])
    wl, wg = pipe.config.text_l.width, pipe.config.text_g.width
    g = torch.Generator().manual_seed(0)
    save_file({"clip_l": torch.randn(2, wl, generator=g), "clip_g": torch.randn(2, wg, generator=g)},
              tmp_path / "mystyle.safetensors")
    req = GenerationRequest(prompt="a cat, mystyle", width=32, height=32, steps=1, seed=1)
    before = pipe.encode_prompt("a cat, mystyle")[0]
    assert pipe.load_embeddings(tmp_path) == ["mystyle"]
    after = pipe.encode_prompt("a cat, mystyle")[0]
    assert not torch.allclose(before, after)
    pipe.generate(req)
