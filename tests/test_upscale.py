"""Model upscalers through spandrel (`sdxl.upscale_models`), the `sdxl upscale` command and the A1111
upscaler routes, on tiny random-weight models built with spandrel's own architecture classes: ESRGAN
(RRDBNet, one block, 8 features, x2), Real-ESRGAN Compact (SRVGGNetCompact, two convs, x4) and SwinIR (one
stage, 12 features, x2)."""

from __future__ import annotations

import base64
import io
import json
import pickle
import sys

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from safetensors.torch import save_file
from typer.testing import CliRunner

from sdxl.cli import app
from sdxl.errors import CheckpointError
from sdxl.upscale_models import load_upscaler, read_state_dict

# The `upscale` extra: spandrel needs torchvision, whose PyPI wheels pin a CUDA torch of their own, so CI
# (pinned CPU torch 2.13) cannot install it. These tests run where the extra is installed, e.g.
#   python -m venv /tmp/venv-up && /tmp/venv-up/bin/pip install -e ".[test,serve,upscale]"
#   /tmp/venv-up/bin/python -m pytest tests/test_upscale.py
spandrel = pytest.importorskip("spandrel", reason="the upscale extra (spandrel, torchvision) is missing")
ModelLoader = spandrel.ModelLoader
from spandrel.architectures.Compact import Compact  # noqa: E402
from spandrel.architectures.ESRGAN import ESRGAN  # noqa: E402
from spandrel.architectures.SwinIR import SwinIR  # noqa: E402

runner = CliRunner()


def _esrgan() -> torch.nn.Module:
    torch.manual_seed(0)
    return ESRGAN(in_nc=3, out_nc=3, num_filters=8, num_blocks=1, scale=2).eval()


def _compact() -> torch.nn.Module:
    torch.manual_seed(1)
    net = Compact(num_feat=8, num_conv=2, upscale=4).eval()
    with torch.no_grad():  # random PReLU slopes, so the activations are not all the default 0.25
        for p in net.parameters():
            if p.ndim == 1 and p.numel() == 8:
                p.uniform_(0.0, 0.5)
    return net


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("upscalers")
    esr, cmp = _esrgan(), _compact()
    esr_sd = {k: v.contiguous() for k, v in esr.state_dict().items()}
    cmp_sd = {k: v.contiguous() for k, v in cmp.state_dict().items()}
    save_file(esr_sd, root / "4x_tiny_esrgan.safetensors")
    torch.save(esr_sd, root / "tiny_esrgan.pth")
    save_file(cmp_sd, root / "tiny_compact.safetensors")
    torch.save({"params_ema": cmp_sd}, root / "tiny_compact.pth")  # Real-ESRGAN's wrapping
    save_file({"foo.weight": torch.randn(4, 4), "bar.bias": torch.randn(4)}, root / "unknown.safetensors")
    return {"root": root, "esrgan": esr, "compact": cmp}


def _image(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


def _spandrel_untiled(net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """spandrel's own output for the whole image at once (its descriptor clamps to [0, 1])."""
    with torch.no_grad():
        return ModelLoader().load_from_state_dict(net.state_dict())(x)


def _tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]


@pytest.mark.parametrize("name, arch, scale", [
    ("4x_tiny_esrgan.safetensors", "ESRGAN", 2), ("tiny_esrgan.pth", "ESRGAN", 2),
    ("tiny_compact.safetensors", "RealESRGAN Compact", 4), ("tiny_compact.pth", "RealESRGAN Compact", 4),
])
def test_architecture_and_scale_are_read_from_the_file(files, name, arch, scale):
    up = load_upscaler(files["root"] / name)
    assert (up.architecture, up.scale) == (arch, scale)
    out = up.upscale(_image(10, 7))
    assert out.size == (10 * scale, 7 * scale)


def test_one_tile_is_exactly_the_untiled_model(files):
    up = load_upscaler(files["root"] / "4x_tiny_esrgan.safetensors")
    x = _tensor(_image(40, 24))
    ref = _spandrel_untiled(files["esrgan"], x)
    assert torch.equal(up.upscale_tensor(x, tile=64), ref)
    assert torch.equal(up.upscale_tensor(x, tile=0), ref)


def test_tiles_blend_to_the_untiled_output(files):
    """Compact's receptive field is 4 input pixels (four 3x3 convs), within a quarter of the overlap (5 of
    20): every output pixel is then taken only from tiles that saw all of its field, so the 4x3 tiles
    match the untiled model to float rounding. ESRGAN's field is wider on paper, but in this random-weight
    model (residual branches scaled by 0.2) pixels past a quarter of the overlap change the output by
    under 1e-6 (measured: max 1.0e-7 at tile 48 / overlap 32; equal weights instead of the ramps: 0.03)."""
    x = _tensor(_image(100, 72, seed=3))
    seen = []
    up = load_upscaler(files["root"] / "tiny_compact.pth")
    tiled = up.upscale_tensor(x, tile=40, overlap=20, progress=lambda d, t: seen.append((d, t)))
    ref = _spandrel_untiled(files["compact"], x)
    assert seen[-1] == (12, 12) and len(seen) == 12  # starts 0, 20, 40, 60 (100 px) x 0, 20, 32 (72 px)
    torch.testing.assert_close(tiled, ref, atol=1e-5, rtol=0)

    esr = load_upscaler(files["root"] / "tiny_esrgan.pth")
    tiled = esr.upscale_tensor(x, tile=48, overlap=32)
    ref = _spandrel_untiled(files["esrgan"], x)
    torch.testing.assert_close(tiled, ref, atol=1e-5, rtol=0)


def test_a_pickle_that_is_not_a_state_dict_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"weight": Evil()}, f)  # a plain pickle, as old torch.save wrote
    torch.save({"conv.weight": torch.zeros(1), "payload": Evil()}, tmp_path / "evil2.pth")
    for p in (path, tmp_path / "evil2.pth"):
        with pytest.raises(CheckpointError) as e:
            read_state_dict(p)
        msg = str(e.value)
        assert str(p) in msg and "\n" not in msg
        assert "refused to unpickle" in msg or "not a readable torch file" in msg
    assert str(e.value).endswith("refused to unpickle it (Unsupported global: GLOBAL io.open)")  # evil2
    assert not marker.exists()


def test_unknown_architecture_is_one_line_naming_the_file(files):
    path = files["root"] / "unknown.safetensors"
    with pytest.raises(CheckpointError) as e:
        load_upscaler(path)
    msg = str(e.value)
    assert msg == f"{path}: not an upscaler architecture spandrel knows"
    r = runner.invoke(app, ["upscale", str(files["root"] / "x.png"), "--model", str(path)])
    assert r.exit_code != 0


def test_cli_upscale_writes_png_with_extras_infotext(files, tmp_path):
    src = tmp_path / "in.png"
    info = PngInfo()
    params = "a cat\nNegative prompt: dog\nSteps: 20, Sampler: Euler, Seed: 5, Size: 24x20"
    info.add_text("parameters", params)
    _image(24, 20).save(src, pnginfo=info)
    model = files["root"] / "4x_tiny_esrgan.safetensors"
    r = runner.invoke(app, ["upscale", str(src), "--model", str(model), "--scale", "3", "--tile", "16",
                            "--out", str(tmp_path / "out"), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    written = sorted((tmp_path / "out").glob("*.png"))
    assert len(written) == 1
    with Image.open(written[0]) as im:
        assert im.size == (72, 60)
        text = im.text["parameters"]
    assert text == f"{params}, Postprocess upscale by: 3, Postprocess upscaler: 4x_tiny_esrgan"

    bad = runner.invoke(app, ["upscale", str(src), "--model", str(files["root"] / "unknown.safetensors")])
    assert bad.exit_code == 2
    assert bad.output.strip().splitlines() == [
        f"error: {files['root'] / 'unknown.safetensors'}: not an upscaler architecture spandrel knows"]


def test_png_round_trip_keeps_chunks():
    from sdxl.upscale_models import png_bytes, text_chunks, upscaled_chunks

    data = png_bytes(_image(4, 4), upscaled_chunks({"sdxl": "{}", "parameters": "p"}, "m", 2))
    with Image.open(io.BytesIO(data)) as im:
        assert text_chunks(im) == {"sdxl": "{}", "parameters": "p, Postprocess upscale by: 2, "
                                                               "Postprocess upscaler: m"}


def test_a1111_lists_upscaler_files_and_extra_single_image_upscales(files, tmp_path):
    import shutil

    from sdxl.serve.app import create_app
    from sdxl.serve.settings import ServeSettings

    models = tmp_path / "models"
    (models / "upscalers").mkdir(parents=True)
    shutil.copy(files["root"] / "4x_tiny_esrgan.safetensors", models / "upscalers")
    shutil.copy(files["root"] / "tiny_compact.pth", models / "upscalers")
    shutil.copy(files["root"] / "unknown.safetensors", models / "upscalers")
    settings = ServeSettings(data_dir=tmp_path / "data", models_dir=models, device="cpu", dtype="fp32")
    with TestClient(create_app(settings), base_url="http://127.0.0.1") as client:
        listed = client.get("/sdapi/v1/upscalers").json()
        assert [u["name"] for u in listed] == ["None", "Lanczos", "Nearest", "4x_tiny_esrgan", "tiny_compact",
                                               "unknown"]
        assert listed[3] == {"name": "4x_tiny_esrgan", "model_name": "4x_tiny_esrgan",
                             "model_path": str(models / "upscalers" / "4x_tiny_esrgan.safetensors"),
                             "model_url": None, "scale": 4.0}
        assert "upscalers" not in json.dumps(client.get("/sdapi/v1/sd-models").json())

        src = _image(20, 16, seed=5)
        buf = io.BytesIO()
        info = PngInfo()
        info.add_text("parameters", "a dog\nSteps: 4, Seed: 7, Size: 20x16")
        src.save(buf, format="PNG", pnginfo=info)
        b64 = base64.b64encode(buf.getvalue()).decode()
        r = client.post("/sdapi/v1/extra-single-image",
                        json={"image": b64, "upscaler_1": "4x_tiny_esrgan", "upscaling_resize": 2})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["html_info"] == "Postprocess upscale by: 2, Postprocess upscaler: 4x_tiny_esrgan"
        with Image.open(io.BytesIO(base64.b64decode(body["image"]))) as im:
            got = np.asarray(im.convert("RGB"))
            assert im.text["parameters"] == f"a dog\nSteps: 4, Seed: 7, Size: 20x16, {body['html_info']}"
        want = ModelLoader().load_from_state_dict(files["esrgan"].state_dict())(_tensor(src))
        want = (want[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        assert np.array_equal(got, want)

        r = client.post("/sdapi/v1/extra-single-image",
                        json={"image": b64, "upscaler_1": "tiny_compact", "resize_mode": 1,
                              "upscaling_resize_w": 60, "upscaling_resize_h": 60})  # x4 covers, then crops
        assert r.status_code == 200, r.text
        with Image.open(io.BytesIO(base64.b64decode(r.json()["image"]))) as im:
            assert im.size == (60, 60)
        r = client.post("/sdapi/v1/extra-single-image", json={"image": b64, "upscaler_1": "Lanczos"})
        assert r.status_code == 200 and r.json()["html_info"].endswith("Postprocess upscaler: Lanczos")

        bad = client.post("/sdapi/v1/extra-single-image", json={"image": b64, "upscaler_1": "unknown"})
        assert bad.status_code == 400 and "not an upscaler architecture spandrel knows" in bad.text
        missing = client.post("/sdapi/v1/extra-single-image", json={"image": b64, "upscaler_1": "nope"})
        assert missing.status_code == 404 and "nope" in missing.text
        escape = client.post("/sdapi/v1/extra-single-image", json={"image": b64, "upscaler_1": "../x.pth"})
        assert escape.status_code == 400


def test_swinir_is_detected_and_one_tile_is_spandrels_output(tmp_path):
    torch.manual_seed(2)
    net = SwinIR(img_size=16, embed_dim=12, depths=[1], num_heads=[2], window_size=4, mlp_ratio=2.0,
                 upscale=2, upsampler="pixelshuffle", resi_connection="1conv").eval()
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, tmp_path / "swinir_x2.safetensors")
    up = load_upscaler(tmp_path / "swinir_x2.safetensors")
    assert (up.architecture, up.scale) == ("SwinIR", 2)
    x = _tensor(_image(20, 18, seed=4))
    assert torch.equal(up.upscale_tensor(x, tile=32), _spandrel_untiled(net, x))


def test_without_spandrel_the_error_names_the_extra(files, monkeypatch):
    monkeypatch.setitem(sys.modules, "spandrel", None)  # import spandrel now raises ImportError
    with pytest.raises(CheckpointError) as e:
        load_upscaler(files["root"] / "tiny_esrgan.pth")
    assert "pip install 'sdxl[upscale]'" in str(e.value) and "\n" not in str(e.value)


def test_upscale_image_takes_model_upscalers_from_a_folder(files):
    from sdxl.errors import NameNotFound
    from sdxl.upscale import upscale_image

    img = _image(12, 10, seed=6)
    want = load_upscaler(files["root"] / "tiny_compact.safetensors").upscale(img, 2)
    got = upscale_image(img, "tiny_compact", 2, upscalers_dir=files["root"])
    assert got.size == (24, 20) and np.array_equal(np.asarray(got), np.asarray(want))
    assert upscale_image(img, "Lanczos", 2, upscalers_dir=files["root"]).size == (24, 20)
    with pytest.raises(NameNotFound):
        upscale_image(img, "nope", 2, upscalers_dir=files["root"])
