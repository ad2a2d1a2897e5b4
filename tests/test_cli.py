"""Every `sdxl` command runs; help is there; user config defaults apply; numbered outputs; --from."""

from __future__ import annotations

import json

from PIL import Image
from typer.testing import CliRunner

from sdxl.cli import app

runner = CliRunner()


def test_help_for_every_command():
    res = runner.invoke(app, ["--help"])
    assert res.exit_code == 0
    for cmd in ("generate", "inspect", "convert", "info", "train", "serve", "bench", "data", "eval"):
        assert cmd in res.output
    for cmd in (["generate"], ["inspect"], ["convert"], ["info"], ["data", "shapes"], ["eval", "shapes"]):
        r = runner.invoke(app, [*cmd, "--help"])
        assert r.exit_code == 0 and "Usage" in r.output, cmd
    for cmd in ("train", "serve", "bench"):  # argparse-based: their own --help
        r = runner.invoke(app, [cmd, "--help"])
        assert r.exit_code == 0 and "usage" in r.output.lower(), cmd


def test_numbered_outputs_and_from(tiny_files, tmp_path):
    out = tmp_path / "img.png"
    args = [
        "generate",
        "a (red:1.2) cat",
        "--model",
        str(tiny_files["base"]),
        "-W",
        "64",
        "-H",
        "64",
        "--steps",
        "3",
        "--seed",
        "5",
        "--batch",
        "2",
        "--n",
        "2",
        "--out",
        str(out),
        "--quiet",
    ]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    paths = res.output.split()
    assert [p.rsplit("-", 1)[-1] for p in paths] == ["0001.png", "0002.png", "0003.png", "0004.png"]
    info = json.loads(runner.invoke(app, ["info", paths[3]]).output)
    assert info["source"] == "sdxl" and info["parameters"]["seed"] == 8
    again = tmp_path / "again.png"
    res = runner.invoke(
        app,
        ["generate", "--from", paths[3], "--model", str(tiny_files["base"]), "--out", str(again), "--quiet"],
    )
    assert res.exit_code == 0, res.output
    # image 4 came from a batch of 2; alone it matches up to batched-vs-single float rounding
    import numpy as np

    a = np.asarray(Image.open(again).convert("RGB"), dtype=np.float64)
    b = np.asarray(Image.open(paths[3]).convert("RGB"), dtype=np.float64)
    mse = ((a - b) ** 2).mean()
    assert mse == 0 or 10 * np.log10(255**2 / mse) >= 40


def test_user_config_defaults(tiny_files, tmp_path, monkeypatch):
    cfg = tmp_path / "config.toml"
    cfg.write_text(
        f'[generate]\nmodels_dir = "{tiny_files["base"].parent}"\nmodel = "base"\nsteps = 2\n'
        'width = 64\nheight = 64\nsampler = "Euler a"\n'
    )
    monkeypatch.setenv("SDXL_CONFIG", str(cfg))
    out = tmp_path / "c.png"
    res = runner.invoke(app, ["generate", "a cat", "--seed", "1", "--out", str(out), "--quiet"])
    assert res.exit_code == 0, res.output
    params = json.loads(runner.invoke(app, ["info", str(out)]).output)["parameters"]
    assert params["steps"] == 2 and params["sampler"] == "euler_a" and params["width"] == 64


def test_data_shapes_command(tmp_path):
    res = runner.invoke(app, ["data", "shapes", "--n", "6", "--out", str(tmp_path / "d"), "--seed", "3"])
    assert res.exit_code == 0, res.output
    assert len(list((tmp_path / "d").glob("*[0-9].png"))) == 6
    assert len(list((tmp_path / "d").glob("*.mask.png"))) == 6  # the loss masks (loss.masked)
    assert (tmp_path / "d" / "metadata.jsonl").is_file()


def test_eval_shapes_refuses_a_single_prompt(tiny_files):
    res = runner.invoke(app, ["eval", "shapes", "--model", str(tiny_files["base"]), "--n", "1"])
    assert res.exit_code != 0 and "--n must be at least 2" in res.output and "Traceback" not in res.output


def test_eval_shapes_command(tiny_files, tmp_path):
    res = runner.invoke(
        app,
        [
            "eval",
            "shapes",
            "--model",
            str(tiny_files["base"]),
            "--n",
            "2",
            "--kinds",
            "single",
            "--steps",
            "2",
            "--size",
            "64",
            "--detector-check",
            "4",
            "--json",
            "--save",
            str(tmp_path / "imgs"),
        ],
    )
    assert res.exit_code == 0, res.output
    data = json.loads(res.output[res.output.index("{") :])
    assert data["results"][0]["n"] == 2 and 0.0 <= data["results"][0]["all_ok"] <= 1.0
    # --save: every image, with the request that made it and its scores (the table's counts add up)
    from sdxl.metadata import read_info

    saved = sorted((tmp_path / "imgs").glob("*.png"))
    assert [p.name for p in saved] == ["single_000.png", "single_001.png"]
    infos = [read_info(p) for p in saved]
    assert all(i["source"] == "sdxl" for i in infos)
    params = [i["parameters"] for i in infos]
    assert all(p["steps"] == 2 and p["width"] == 64 for p in params)
    assert sum(p["eval"]["scores"]["all_ok"] for p in params) == round(2 * data["results"][0]["all_ok"])


def test_align_your_steps_and_tcd_from_the_cli(tiny_files, tmp_path):
    """`--schedule align_your_steps --sampler tcd --eta 0.5` runs on the tiny model; the PNG's A1111 infotext
    names both by A1111's labels, our record keeps the names and TCD's gamma, and `--from` repeats the image
    pixel for pixel (one image, same seed, CPU)."""
    import numpy as np

    out = tmp_path / "ays.png"
    common = ["--model", str(tiny_files["base"]), "--quiet"]
    res = runner.invoke(app, ["generate", "a cat", "-W", "64", "-H", "64", "--steps", "3", "--seed", "11",
                              "--schedule", "align_your_steps", "--sampler", "tcd", "--eta", "0.5",
                              "--out", str(out), *common])
    assert res.exit_code == 0, res.output
    with Image.open(out) as im:
        infotext = im.info["parameters"]
        first = np.asarray(im.convert("RGB"))
    assert "Sampler: TCD, Schedule type: Align Your Steps," in infotext
    params = json.loads(runner.invoke(app, ["info", str(out)]).output)["parameters"]
    assert (params["sampler"], params["schedule"], params["eta"]) == ("tcd", "align_your_steps", 0.5)
    again = tmp_path / "again.png"
    res = runner.invoke(app, ["generate", "--from", str(out), "--out", str(again), *common])
    assert res.exit_code == 0, res.output
    with Image.open(again) as im:
        assert "Sampler: TCD, Schedule type: Align Your Steps," in im.info["parameters"]
        assert np.array_equal(np.asarray(im.convert("RGB")), first)
    # another gamma gives another image (the eta reached the sampler)
    other = tmp_path / "other.png"
    res = runner.invoke(app, ["generate", "--from", str(out), "--eta", "0.1", "--out", str(other), *common])
    assert res.exit_code == 0, res.output
    with Image.open(other) as im:
        assert not np.array_equal(np.asarray(im.convert("RGB")), first)
