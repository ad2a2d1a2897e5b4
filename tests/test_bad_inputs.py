"""Bad input files and bad command lines: each is converted or refused with one clear line, never a traceback.

Images go through `load_image` (the one decoder the CLI, the server and the dataset share) and through
`sdxl generate --init-image`: awkward but valid ones (CMYK, 16-bit, palette transparency, alpha, EXIF
rotation, animation, float TIFF) come out as upright 8-bit RGB with the expected pixels; broken or hostile
ones (decompression bombs, truncated files, non-images) raise `ImageError`, which the CLI prints as one
`error:` line with a non-zero exit, writing nothing to --out. Captions that are not UTF-8 are decoded with
replacement characters and counted. Bad checkpoints, sizes, samplers and options end the same way.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import subprocess
import sys
import zlib
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile
from typer.testing import CliRunner

from sdxl.cli import app
from sdxl.data.dataset import ImageCaptionDataset
from sdxl.data.images import ImageError, load_image
from sdxl.weights.io import open_tensors, save_safetensors

runner = CliRunner()
# Pillow warns about the 144-megapixel bomb before our own limit refuses it: expected, not a problem.
pytestmark = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")


# ------------------------------------------------------------------------------------------ image files
def _chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def raw_png(width: int, height: int, bit_depth: int, color_type: int, rows: bytes) -> bytes:
    """A PNG written by hand, so it can claim any size and hold any (even too little) pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", ihdr)
        + _chunk(b"IDAT", zlib.compress(rows))
        + _chunk(b"IEND", b"")
    )


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _noise_rgb(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _exif_rotated_jpeg() -> bytes:
    """40x20 stored image, left half red, right half blue, EXIF orientation 6 ("rotate 90 CW to view")."""
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (20, 0, 40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    return _save(img, "JPEG", quality=95, exif=exif.tobytes())


def _palette_with_transparency() -> bytes:
    img = Image.new("P", (8, 8), 0)
    img.putpalette([0, 255, 0] + [255, 0, 0] + [0, 0, 0] * 254)  # index 0 green (transparent), 1 red
    img.paste(1, (4, 0, 8, 8))
    return _save(img, "PNG", transparency=0)


def _animated_gif() -> bytes:
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 0, 255))]
    return _save(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)


def _float_tiff() -> bytes:
    return _save(Image.fromarray(np.full((8, 8), 0.5, dtype=np.float32), mode="F"), "TIFF")


def _rgba_half_transparent() -> bytes:
    return _save(Image.new("RGBA", (8, 8), (255, 0, 0, 128)), "PNG")


def _la() -> bytes:
    img = Image.new("LA", (8, 8), (0, 255))
    img.paste((0, 0), (0, 0, 4, 8))  # left half fully transparent
    return _save(img, "PNG")


def _grey16() -> bytes:
    return _save(Image.fromarray(np.full((8, 8), 40000, dtype=np.uint16)), "PNG")


def _rgb48() -> bytes:
    """16 bits per channel RGB (PNG color type 2, depth 16): (65535, 0, 32768) everywhere."""
    pixel = struct.pack(">HHH", 65535, 0, 32768)
    return raw_png(8, 8, 16, 2, b"".join(b"\0" + pixel * 8 for _ in range(8)))


def _cmyk_jpeg() -> bytes:
    return _save(Image.new("CMYK", (16, 16), (255, 0, 0, 0)), "JPEG", quality=95)  # pure cyan


def _truncated(data: bytes, keep: float = 0.5) -> bytes:
    return data[: int(len(data) * keep)]


def _near(pixel, rgb, tolerance: int) -> bool:
    return int(np.abs(pixel.astype(int) - np.array(rgb)).max()) <= tolerance


def _exif_rotated_png() -> bytes:
    """The same picture as `_exif_rotated_jpeg`, as a PNG with an eXIf chunk (lossless: exact colours)."""
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (20, 0, 40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    return _save(img, "PNG", exif=exif.tobytes())


def _upright_red_over_blue(a) -> bool:
    """40 high, 20 wide after rotation; the stored left (red) half is now on top."""
    return a.shape[:2] == (40, 20) and _near(a[2, 10], (255, 0, 0), 40) and _near(a[37, 10], (0, 0, 255), 40)


# name -> (maker of the file's bytes, suffix, check of the loaded 8-bit RGB array)
GOOD_IMAGES = {
    "cmyk_jpeg": (_cmyk_jpeg, ".jpg", lambda a: _near(a[8, 8], (0, 255, 255), 12)),
    "grey_16bit_png": (_grey16, ".png", lambda a: (a == 156).all()),  # 40000 / 257: scaled, not clipped
    "rgb_48bit_png": (_rgb48, ".png", lambda a: (a[0, 0] == (255, 0, 128)).all()),
    "palette_transparency": (
        _palette_with_transparency,
        ".png",
        lambda a: (a[0, 0] == (255, 255, 255)).all() and (a[0, 7] == (255, 0, 0)).all(),
    ),
    "la_alpha": (_la, ".png", lambda a: (a[0, 0] == 255).all() and (a[0, 7] == 0).all()),
    "rgba_half_alpha": (_rgba_half_transparent, ".png", lambda a: _near(a[0, 0], (255, 127, 127), 1)),
    "exif_rotated_jpeg": (_exif_rotated_jpeg, ".jpg", _upright_red_over_blue),
    "exif_rotated_png": (_exif_rotated_png, ".png", _upright_red_over_blue),
    "animated_gif_first_frame": (_animated_gif, ".gif", lambda a: (a[0, 0] == (255, 0, 0)).all()),
    "float_tiff": (_float_tiff, ".tif", lambda a: (a == 128).all()),
}


def _bomb(side: int) -> bytes:
    return raw_png(side, side, 8, 0, b"\0" * 1000)


def _cut_png() -> bytes:
    return _truncated(_save(_noise_rgb(64, 64), "PNG"))


def _cut_jpeg() -> bytes:
    return _truncated(_save(_noise_rgb(64, 64), "JPEG"))


# name -> (maker of the file's bytes, suffix, regex the error must match)
BAD_IMAGES = {
    "bomb_2500_megapixels": (lambda: _bomb(50_000), ".png", "pixels|DecompressionBomb"),
    "bomb_144_megapixels": (lambda: _bomb(12_000), ".png", "max_pixels"),
    "truncated_png": (_cut_png, ".png", "truncated|cannot decode"),
    "truncated_jpeg": (_cut_jpeg, ".jpg", "truncated|cannot decode"),
    "header_only_png": (lambda: _save(_noise_rgb(64, 64), "PNG")[:33], ".png", "cannot"),
    "text_file_named_png": (lambda: b"<html>not an image</html>", ".png", "cannot read image header"),
    "empty_file": (lambda: b"", ".png", "cannot read image header"),
}


def _write(tmp_path: Path, name: str, maker, suffix: str) -> Path:
    path = tmp_path / f"{name}{suffix}"
    path.write_bytes(maker())
    return path


def test_pillow_truncated_image_switch_is_off():
    """A truncated file must be an error, not a half-grey picture: nothing may flip Pillow's global."""
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


@pytest.mark.parametrize("name", sorted(GOOD_IMAGES))
def test_load_image_converts_awkward_images(tmp_path, name):
    maker, suffix, check = GOOD_IMAGES[name]
    img = load_image(_write(tmp_path, name, maker, suffix))
    assert img.mode == "RGB"
    assert check(np.asarray(img)), np.asarray(img)[:2, :2]


@pytest.mark.parametrize("name", sorted(BAD_IMAGES))
def test_load_image_refuses_broken_images(tmp_path, name):
    maker, suffix, words = BAD_IMAGES[name]
    path = _write(tmp_path, name, maker, suffix)
    with pytest.raises(ImageError, match=words) as info:
        load_image(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_load_image_missing_file_and_folder(tmp_path):
    with pytest.raises(ImageError, match="cannot read image header"):
        load_image(tmp_path / "nope.png")
    with pytest.raises(ImageError):
        load_image(tmp_path)


def test_bomb_is_refused_without_decoding(tmp_path, monkeypatch):
    """The size check reads the header only: a bomb never reaches the decoder."""
    path = _write(tmp_path, "bomb", BAD_IMAGES["bomb_144_megapixels"][0], ".png")
    monkeypatch.setattr(Image.Image, "load", lambda self: pytest.fail("decoded a decompression bomb"))
    with pytest.raises(ImageError, match="max_pixels"):
        load_image(path)


# ------------------------------------------------------------------------------------------------- CLI
def one_line_error(result) -> str:
    """The CLI contract for a user's mistake: exit code not 0, exactly one line `error: ...`, no traceback
    (CliRunner keeps an unhandled exception in `result.exception` instead of printing it)."""
    assert result.exit_code not in (0, None), result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def nothing_written(out: Path) -> bool:
    return not out.exists() or not any(out.iterdir())


def generate(model: Path, out: Path, *extra: str):
    args = ["generate", "a red circle", "--model", str(model), "--steps", "2", "-W", "64", "-H", "64"]
    return runner.invoke(app, [*args, "--seed", "1", "-q", "--out", str(out), *extra])


@pytest.mark.parametrize("name", sorted(GOOD_IMAGES))
def test_cli_init_image_awkward_but_valid(tiny_files, tmp_path, name):
    maker, suffix, _ = GOOD_IMAGES[name]
    init = _write(tmp_path, name, maker, suffix)
    out = tmp_path / "out"
    result = generate(tiny_files["base"], out, "--init-image", str(init), "--strength", "0.5")
    assert result.exit_code == 0, result.output
    (written,) = list(out.iterdir())
    with Image.open(written) as img:
        assert img.size == (64, 64) and img.mode == "RGB"


@pytest.mark.parametrize("name", sorted(BAD_IMAGES))
def test_cli_init_image_broken(tiny_files, tmp_path, name):
    maker, suffix, _ = BAD_IMAGES[name]
    init = _write(tmp_path, name, maker, suffix)
    out = tmp_path / "out"
    line = one_line_error(generate(tiny_files["base"], out, "--init-image", str(init)))
    assert str(init) in line
    assert nothing_written(out)


def test_cli_mask_image_broken_and_missing_init(tiny_files, tmp_path):
    out = tmp_path / "out"
    bad = _write(tmp_path, "bad_mask", BAD_IMAGES["truncated_png"][0], ".png")
    good = _write(tmp_path, "init", lambda: _save(_noise_rgb(64, 64), "PNG"), ".png")
    assert "bad_mask" in one_line_error(
        generate(tiny_files["base"], out, "--init-image", str(good), "--mask", str(bad))
    )
    assert "--init-image" in one_line_error(generate(tiny_files["base"], out, "--mask", str(good)))
    assert "nope.png" in one_line_error(
        generate(tiny_files["base"], out, "--init-image", str(tmp_path / "nope.png"))
    )
    assert nothing_written(out)


def test_cli_bad_init_image_in_a_real_process_prints_no_traceback(tiny_files, tmp_path):
    """Once through the installed entry point (`main()`), with stderr captured separately."""
    init = _write(tmp_path, "trunc", BAD_IMAGES["truncated_jpeg"][0], ".jpg")
    out = tmp_path / "out"
    code = "import sys; from sdxl.cli import main; sys.argv[0] = 'sdxl'; main()"
    args = ["generate", "x", "--model", str(tiny_files["base"]), "--steps", "1", "-W", "64", "-H", "64", "-q"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", code, *args, "--init-image", str(init), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "trunc.jpg" in lines[0], proc.stderr
    assert nothing_written(out)


# ----------------------------------------------------------------------------------- CLI: checkpoints
def test_cli_model_that_does_not_exist(tmp_path):
    out = tmp_path / "out"
    line = one_line_error(generate(tmp_path / "nope.safetensors", out))
    assert "no such file" in line and nothing_written(out)


def test_cli_truncated_checkpoint(tiny_files, tmp_path):
    data = tiny_files["base"].read_bytes()
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(data[: len(data) // 3])
    out = tmp_path / "out"
    assert "truncated" in one_line_error(generate(bad, out)) and nothing_written(out)


def test_cli_checkpoint_with_lying_header(tmp_path):
    head = json.dumps({"w": {"dtype": "F32", "shape": [1000, 1000], "data_offsets": [0, 4_000_000]}}).encode()
    bad = tmp_path / "lies.safetensors"
    bad.write_bytes(struct.pack("<Q", len(head)) + head + b"\0" * 64)
    out = tmp_path / "out"
    assert "truncated" in one_line_error(generate(bad, out)) and nothing_written(out)


def test_cli_unknown_checkpoint_of_random_tensors(tmp_path):
    g = torch.Generator().manual_seed(0)
    model = save_safetensors(
        {f"net.{i}.weight": torch.randn(16, 16, generator=g) for i in range(4)}, tmp_path / "m.safetensors"
    )
    out = tmp_path / "out"
    assert "not an SDXL checkpoint" in one_line_error(generate(model, out)) and nothing_written(out)


def test_cli_pickle_named_safetensors(tmp_path):
    model = tmp_path / "sneaky.safetensors"
    torch.save({"state_dict": {"a": torch.zeros(1)}}, model)
    out = tmp_path / "out"
    assert "pickle" in one_line_error(generate(model, out)) and nothing_written(out)


def test_cli_checkpoint_whose_shapes_no_sdxl_model_has(tiny_files, tmp_path):
    """The tiny model without its config metadata: detection reads it off the shapes with SDXL's 64-wide
    attention heads, which its 32-wide text tower cannot have. Loading must say so in one line."""
    f = open_tensors(tiny_files["base"])
    stripped = save_safetensors({k: f[k] for k in f}, tmp_path / "no_metadata.safetensors")
    out = tmp_path / "out"
    line = one_line_error(generate(stripped, out))
    assert "head" in line and nothing_written(out)


def test_cli_checkpoint_with_a_missing_tensor_names_it(tiny_files, tmp_path):
    f = open_tensors(tiny_files["base"])
    gone = "model.diffusion_model.middle_block.1.proj_out.weight"
    model = save_safetensors({k: f[k] for k in f if k != gone}, tmp_path / "holey.safetensors", f.metadata)
    out = tmp_path / "out"
    assert "middle_block.1.proj_out.weight" in one_line_error(generate(model, out)) and nothing_written(out)


# ---------------------------------------------------------------------------------- CLI: bad options
BAD_OPTIONS = [
    (["-W", "7"], "width: 7"),
    (["-W", "0"], "width: 0"),
    (["-H", "1000000"], "pixels"),
    (["-W", "1000000", "-H", "1000000"], "pixels"),
    (["-W", "-64"], "width"),
    (["--sampler", "warp_drive"], "warp_drive"),
    (["--schedule", "sideways"], "sideways"),
    (["--steps", "0"], "steps"),
    (["--steps", "100000"], "steps"),
    (["--cfg", "nan"], "cfg"),
    (["--strength", "2"], "strength"),
    (["--original-size", "1024"], "--original-size"),
    (["--original-size", "axb"], "--original-size"),
    (["--original-size", "1024x"], "--original-size"),
    (["--original-size", "1x2x3"], "--original-size"),
    (["--target-size", "x1024"], "--target-size"),
    (["--dtype", "fp8"], "--dtype"),
    (["--lora", "style:strong"], "--lora"),
    (["--lora", "no_such_lora:0.5"], "no_such_lora"),
    (["--seed", str(2**64)], "seed"),
    (["--clip-skip", "0"], "--clip-skip"),
    (["--prediction", "epsilon"], "prediction"),
]


@pytest.mark.parametrize("extra,words", BAD_OPTIONS, ids=[" ".join(e) for e, _ in BAD_OPTIONS])
def test_cli_bad_options(tiny_files, tmp_path, extra, words):
    out = tmp_path / "out"
    line = one_line_error(generate(tiny_files["base"], out, *extra))
    assert words in line
    assert nothing_written(out)


def test_cli_bad_prompts(tiny_files, tmp_path):
    out = tmp_path / "out"
    base = ["generate", "--model", str(tiny_files["base"]), "--steps", "1", "-W", "64", "-H", "64", "-q"]
    too_long = one_line_error(runner.invoke(app, [*base, "x" * 5000, "--out", str(out)]))
    assert "prompt" in too_long and "5000" in too_long
    # PromptError messages carry the prompt and a caret on further lines; the CLI prints the first one
    bad_weight = one_line_error(runner.invoke(app, [*base, "a cat <lora:film:zero>", "--out", str(out)]))
    assert "zero" in bad_weight and "character 17" in bad_weight
    bad_editing = one_line_error(runner.invoke(app, [*base, "[a:b:1.5.5]", "--out", str(out)]))
    assert "1.5.5" in bad_editing
    assert "prompt is required" in one_line_error(runner.invoke(app, [*base, "--out", str(out)]))
    assert nothing_written(out)


def test_cli_unusual_but_valid_prompts_generate(tiny_files, tmp_path):
    """Unicode, control characters, emoji, unbalanced brackets A1111 tolerates: all generate."""
    out = tmp_path / "out"
    for prompt in ["çà 猫 🐱 \u200b\x00\x1b[31m", "((((unclosed", "a \\( literal \\) b", "BREAK BREAK", " "]:
        args = [
            "generate",
            prompt,
            "--model",
            str(tiny_files["base"]),
            "--steps",
            "1",
            "-W",
            "64",
            "-H",
            "64",
        ]
        result = runner.invoke(app, [*args, "-q", "--seed", "3", "--out", str(out)])
        assert result.exit_code == 0, (prompt, result.output)
    assert len(list(out.iterdir())) == 5


def test_cli_from_image_without_a_record(tmp_path):
    plain = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(plain)
    not_image = tmp_path / "x.png"
    not_image.write_text("hello")
    assert "no sdxl request record" in one_line_error(runner.invoke(app, ["generate", "--from", str(plain)]))
    assert "x.png" in one_line_error(runner.invoke(app, ["generate", "--from", str(not_image)]))
    assert "x.png" in one_line_error(runner.invoke(app, ["info", str(not_image)]))


# ---------------------------------------------------------------------------------------- dataset side
def test_non_utf8_captions_are_decoded_with_replacement_and_counted(tmp_path, caplog):
    captions = {
        "latin1": b"caf\xe9 au lait",
        "utf16": "a cat".encode("utf-16"),  # BOM FF FE: not UTF-8
        "garbage": bytes(range(128, 256)),
        "utf8": "un caf\u00e9 \U0001f431".encode(),
        "bom_utf8": b"\xef\xbb\xbfplain",
    }
    for i, (name, data) in enumerate(captions.items()):
        _noise_rgb(64, 64, seed=i).save(tmp_path / f"{name}.png")
        (tmp_path / f"{name}.txt").write_bytes(data)
    with caplog.at_level(logging.WARNING):
        ds = ImageCaptionDataset(tmp_path, resolution=64, step=8, seed=0, ucg=0.0)
    assert ds.stats["caption_decode_errors"] == 3
    assert sum("not valid UTF-8" in r.getMessage() for r in caplog.records) == 3
    by_name = {Path(r.path).stem: r.caption for r in ds.records}
    assert by_name["latin1"] == "caf\ufffd au lait"
    assert "\ufffd" in by_name["utf16"] and "\ufffd" in by_name["garbage"]
    assert by_name["utf8"] == "un caf\u00e9 \U0001f431" and by_name["bom_utf8"] == "plain"
    assert all(ds[i]["pixels"].shape == (3, 64, 64) for i in range(len(ds)))


def test_manifest_with_non_utf8_bytes_and_broken_lines(tmp_path):
    _noise_rgb(64, 64).save(tmp_path / "a.png")
    _noise_rgb(64, 64, seed=1).save(tmp_path / "b.png")
    lines = [
        b'{"path": "a.png", "caption": "caf\xe9"}',  # raw latin-1 byte inside the JSON text
        b"{not json",
        b'{"caption": "no path"}',
        b'{"path": "b.png", "caption": "fine"}',
    ]
    (tmp_path / "metadata.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    ds = ImageCaptionDataset(tmp_path, resolution=64, step=8, seed=0, ucg=0.0)
    assert ds.stats["manifest_bad_lines"] == 2
    assert sorted(r.caption for r in ds.records) == ["caf\ufffd", "fine"]


def test_dataset_skips_and_counts_every_bad_image(tmp_path, caplog):
    """The training side of the image table: header-level failures are skipped at scan time, pixel-level
    ones (truncation) when the item is loaded, each counted and logged; convertible images are used."""
    for name, (maker, suffix, _) in GOOD_IMAGES.items():
        _write(tmp_path, name, maker, suffix)
    bad_at_scan = [
        "bomb_2500_megapixels",
        "bomb_144_megapixels",
        "text_file_named_png",
        "empty_file",
        "header_only_png",
    ]
    for name in [*bad_at_scan, "truncated_png", "truncated_jpeg"]:
        _write(tmp_path, name, BAD_IMAGES[name][0], BAD_IMAGES[name][1])
    with caplog.at_level(logging.WARNING):
        ds = ImageCaptionDataset(tmp_path, resolution=64, step=8, seed=0, ucg=0.0, default_caption="x")
        items = [ds[i] for i in range(len(ds))]
    names = {Path(r.path).stem for r in ds.records}
    assert not names & set(bad_at_scan)
    assert ds.stats["skipped_unreadable"] == len(bad_at_scan)
    assert ds.stats["load_failures"] == 2  # the two truncated files, replaced by a neighbour of their bucket
    assert all(torch.isfinite(it["pixels"]).all() for it in items)
    assert {Path(it["path"]).stem for it in items}.isdisjoint({"truncated_png", "truncated_jpeg"})
    assert sum("skipped image" in r.getMessage() for r in caplog.records) == len(bad_at_scan)


def test_convert_to_diffusers_refuses_a_unet_diffusers_cannot_express(tmp_path):
    """The shipped miniature has a middle block shallower than its last level, which diffusers' UNet config
    cannot say: one line, and no half-written folder."""
    from sdxl.cli import default_model_path

    dst = tmp_path / "out"
    args = ["convert", str(default_model_path()), str(dst), "--to", "diffusers"]
    line = one_line_error(runner.invoke(app, args))
    assert "no diffusers equivalent" in line and "middle depth" in line
    assert not dst.exists()
