"""Checkpoint I/O: official layout key sets, detection, inspect/convert round trips, bad files."""

from __future__ import annotations

import dataclasses
import json
import os
import struct

import pytest
import torch
from typer.testing import CliRunner

from sdxl.cli import app
from sdxl.metadata import addnet_hash
from sdxl.models.config import ModelConfig, TextConfig, UNetConfig, VAEConfig
from sdxl.models.vae import AutoencoderKL
from sdxl.weights.checkpoint import Checkpoint, read_checkpoint, single_file_state, write_single_file
from sdxl.weights.detect import detect
from sdxl.weights.io import CheckpointError, ShapeDict, open_tensors, save_safetensors, tensor_data_sha256

runner = CliRunner()


def meta_official_state(config: ModelConfig) -> dict:
    from sdxl.models.factory import build_modules

    mods = build_modules(config, device="meta")
    return single_file_state(config, {k: m.state_dict() for k, m in mods.items()})


def test_full_size_base_key_set_and_detection():
    """The official base file holds 2515 tensors (1680 UNet); detection reads the config back from shapes."""
    sd = meta_official_state(ModelConfig.base())
    assert len(sd) == 2515
    assert sum(k.startswith("model.diffusion_model.") for k in sd) == 1680
    assert sum(k.startswith("first_stage_model.") for k in sd) == 248
    assert sd["model.diffusion_model.label_emb.0.0.weight"].shape == (1280, 2816)
    assert sd["conditioner.embedders.1.model.text_projection"].shape == (1280, 1280)
    unet_params = sum(v.numel() for k, v in sd.items() if k.startswith("model.diffusion_model."))
    assert unet_params == 2_567_463_684
    cfg = detect(ShapeDict(sd), {})
    assert cfg.kind == "base"
    assert cfg.unet == UNetConfig.base()
    assert cfg.vae == VAEConfig()
    assert cfg.text_l == TextConfig.clip_l()
    assert cfg.text_g == TextConfig.bigg()


def test_full_size_refiner_key_set_and_detection():
    sd = meta_official_state(ModelConfig.refiner())
    unet_keys = [k for k in sd if k.startswith("model.diffusion_model.")]
    assert len(unet_keys) == 1220
    assert sum(sd[k].numel() for k in unet_keys) == 2_259_526_660
    assert not any(k.startswith("conditioner.embedders.1.") for k in sd)
    cfg = detect(ShapeDict(sd), {})
    assert cfg.kind == "refiner" and cfg.text_l is None
    assert cfg.unet == UNetConfig.refiner()


@pytest.mark.parametrize(
    "unet",
    [UNetConfig.ssd_1b(), UNetConfig.vega(), UNetConfig.inpaint()],
    ids=["ssd-1b", "vega", "inpaint"],
)
def test_detect_distilled_and_inpaint_unet_only(unet):
    """UNet-only files: per-block depths (distilled models) and the 9-channel inpainting UNet."""
    sd = meta_official_state(ModelConfig(unet=unet, vae=None, text_l=None, text_g=None))
    cfg = detect(ShapeDict(sd), {})
    assert cfg.unet == unet
    assert cfg.kind == ("inpaint" if unet.in_channels == 9 else "base")


def test_detect_vae_only_file():
    sd = meta_official_state(ModelConfig(unet=None, vae=VAEConfig(), text_l=None, text_g=None))
    bare = ShapeDict({k[len("first_stage_model.") :]: v for k, v in sd.items()})
    assert detect(bare, {}).vae == VAEConfig()


def test_inspect_and_convert_round_trip(tiny_files, tmp_path):
    base = tiny_files["base"]
    res = runner.invoke(app, ["inspect", str(base), "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.output)
    assert info["kind"] == "base"
    assert set(info["components"]) == {"unet", "vae", "text_l", "text_g"}
    assert info["config"]["unet"]["model_channels"] == 32

    diff_dir = tmp_path / "diffusers"
    back = tmp_path / "back.safetensors"
    assert runner.invoke(app, ["convert", str(base), str(diff_dir), "--to", "diffusers"]).exit_code == 0
    assert (diff_dir / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert runner.invoke(app, ["convert", str(diff_dir), str(back)]).exit_code == 0
    a, b = open_tensors(base), open_tensors(back)
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k

    half = tmp_path / "half.safetensors"
    assert runner.invoke(app, ["convert", str(base), str(half), "--dtype", "fp16"]).exit_code == 0
    h = open_tensors(half)
    assert h["model.diffusion_model.out.2.weight"].dtype == torch.float16
    assert read_checkpoint(half).config == read_checkpoint(base).config


def test_diffusers_folder_loads_in_diffusers(tiny_files, tmp_path):
    """Our diffusers export is a real diffusers folder (test-only import of diffusers)."""
    from diffusers import StableDiffusionXLPipeline

    d = tmp_path / "d"
    assert (
        runner.invoke(app, ["convert", str(tiny_files["base"]), str(d), "--to", "diffusers"]).exit_code == 0
    )
    pipe = StableDiffusionXLPipeline.from_pretrained(d, local_files_only=True)
    assert pipe.unet.config.cross_attention_dim == 96


def _bad(tmp_path, name: str, data: bytes):
    p = tmp_path / name
    p.write_bytes(data)
    return p


def _one_line_error(args):
    res = runner.invoke(app, args)
    assert res.exit_code != 0
    lines = [line for line in res.output.strip().splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("error:"), res.output
    return lines[0]


def test_bad_files_give_one_line_errors(tiny_files, tmp_path):
    good = tiny_files["base"].read_bytes()
    truncated = _bad(tmp_path, "trunc.safetensors", good[: len(good) // 2])
    assert "truncated" in _one_line_error(["inspect", str(truncated)])

    # a file with one UNet tensor missing
    f = open_tensors(tiny_files["base"])
    sd = {k: f[k] for k in f if k != "model.diffusion_model.out.2.bias"}
    missing = tmp_path / "missing.safetensors"
    save_safetensors(sd, missing, f.metadata)
    msg = _one_line_error(["generate", "x", "--model", str(missing), "--steps", "1", "-W", "64", "-H", "64"])
    assert "out.2.bias" in msg

    pickled = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"a": torch.zeros(1)}}, pickled)
    assert "pickle" in _one_line_error(["inspect", str(pickled)])

    folder = tmp_path / "not_a_model"
    folder.mkdir()
    (folder / "readme.txt").write_text("hi")
    assert "not a model folder" in _one_line_error(["inspect", str(folder)])

    junk = _bad(tmp_path, "junk.safetensors", b"hello world, not safetensors")
    _one_line_error(["inspect", str(junk)])
    _one_line_error(["inspect", str(tmp_path / "nope.safetensors")])


def test_pickle_only_with_flag_and_weights_only(tiny_files, tmp_path):
    f = open_tensors(tiny_files["base"])
    ck = tmp_path / "m.ckpt"
    torch.save({"state_dict": {k: f[k].clone() for k in f}}, ck)
    res = runner.invoke(app, ["inspect", str(ck), "--allow-pickle", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["kind"] == "base"


def _header_file(tmp_path, header: dict, data: bytes = b"\0" * 64):
    head = json.dumps(header).encode()
    return _bad(tmp_path, "h.safetensors", struct.pack("<Q", len(head)) + head + data)


@pytest.mark.parametrize(
    "header,needle",
    [
        ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}, "spans"),
        (
            {
                "a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]},
            },
            "overlap",
        ),
        ({"a": {"dtype": "Q4", "shape": [4], "data_offsets": [0, 16]}}, "dtype"),
        ({"a": {"dtype": "F32", "shape": [64], "data_offsets": [0, 256]}}, "truncated"),
        ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, "shape"),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [8, 4]}}, "data_offsets"),
    ],
)
def test_lying_headers_are_refused(tmp_path, header, needle):
    p = _header_file(tmp_path, header)
    with pytest.raises(CheckpointError, match=needle):
        open_tensors(p)


def test_saved_files_hash_as_their_tensors_and_get_ordinary_permissions(tmp_path, monkeypatch):
    """`tensor_data_sha256` (kohya's sshs_model_hash, computed before writing) equals the addnet hash of the
    file `save_safetensors` writes, whatever the metadata; the file gets what open() gives under the umask."""
    monkeypatch.setenv("SDXL_CACHE_DIR", str(tmp_path / "cache"))
    tensors = {"b": torch.arange(6, dtype=torch.float16).reshape(2, 3), "a": torch.ones(4),
               "e": torch.zeros(0)}
    path = save_safetensors(tensors, tmp_path / "w.safetensors", {"note": "x"})
    other = save_safetensors(tensors, tmp_path / "v.safetensors", {"note": "y" * 100})
    assert tensor_data_sha256(tensors) == addnet_hash(path) == addnet_hash(other)
    assert tensor_data_sha256({"a": torch.ones(4)}) != tensor_data_sha256(tensors)
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["v.safetensors", "w.safetensors"]


def test_convert_bakes_in_another_vae(tiny_files, tmp_path):
    """`sdxl convert --vae FILE`: the output holds FILE's VAE (weights and config) and the source's other
    parts unchanged; a VAE whose latents would not fit is refused in one line naming --vae."""
    base = tiny_files["base"]
    src = read_checkpoint(base)
    other = {k: torch.randn_like(v) for k, v in src.parts["vae"].items()}
    vae_cfg = dataclasses.replace(src.config.vae, scale_factor=0.25)
    vae_file = tmp_path / "vae.safetensors"
    def vae_only(cfg: VAEConfig) -> ModelConfig:
        return ModelConfig(kind="base", unet=None, vae=cfg, text_l=None, text_g=None)

    write_single_file(Checkpoint(path=vae_file, config=vae_only(vae_cfg), parts={"vae": other}), vae_file)
    out = tmp_path / "baked.safetensors"
    res = runner.invoke(app, ["convert", str(base), str(out), "--vae", str(vae_file)])
    assert res.exit_code == 0, res.output
    baked = read_checkpoint(out)
    assert baked.config.vae.scale_factor == 0.25 and baked.config.unet == src.config.unet
    assert all(torch.equal(baked.parts["vae"][k], other[k]) for k in other)
    assert all(torch.equal(baked.parts["unet"][k], v) for k, v in src.parts["unet"].items())

    wide = dataclasses.replace(src.config.vae, embed_dim=8)
    wide_file = tmp_path / "wide.safetensors"
    wide_parts = {"vae": AutoencoderKL(wide).state_dict()}
    write_single_file(Checkpoint(path=wide_file, config=vae_only(wide), parts=wide_parts), wide_file)
    x = tmp_path / "x.safetensors"
    res = runner.invoke(app, ["convert", str(base), str(x), "--vae", str(wide_file)])
    assert res.exit_code != 0 and "--vae" in res.output and "8-channel" in res.output, res.output
    assert not x.exists()
    res = runner.invoke(app, ["convert", str(base), str(tmp_path / "y.safetensors"), "--vae", str(x)])
    assert res.exit_code != 0 and res.output.count("\n") <= 2 and "--vae" in res.output, res.output
