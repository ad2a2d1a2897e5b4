"""The data curriculum of `sdxl data shapes` (levels, object sizes in latent pixels, shares, the summary), the
evaluation with intervals (`render_ceiling`, `score_generated`, `sdxl eval vae-ceiling`), and the VAE
trainer's edge-weighted reconstruction loss."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from sdxl.cli import app
from sdxl.data.evaluate import Tally, ceiling_table, render_ceiling, score_generated, tallies_to_log, wilson
from sdxl.data.shapes import (
    LEVELS,
    PALETTE,
    caption,
    curriculum_scene,
    eval_prompts,
    generate_shapes_dataset,
    make_level,
    parse_counts,
    parse_shares,
    parse_sizes,
    plan_dataset,
    render_scene,
)
from sdxl.eval_shapes import KindResult, format_table, vae_roundtrip
from sdxl.train.vae_trainer import edge_map

runner = CliRunner()

# a silhouette's area in units of r^2 (r: the object's radius), from the outlines `sdxl.data.shapes` draws
AREA_FACTOR = {
    "circle": math.pi,
    "ring": math.pi * (1 - 0.55**2),
    "square": (2 * 0.82) ** 2,
    "diamond": 2 * 1.1**2,
    "triangle": 3 * math.sqrt(3) / 4 * 1.15**2,
    "star": 5 * 1.15 * (0.45 * 1.15) * math.sin(math.radians(36)),
    "cross": 8 * 0.36 - 4 * 0.36**2,
}


def _object_pixels(img: Image.Image, colour: str) -> int:
    arr = np.asarray(img.convert("RGB"), dtype=np.float64)
    pal = np.array(list(PALETTE.values()), dtype=np.float64)
    nearest = ((arr[:, :, None, :] - pal[None, None]) ** 2).sum(-1).argmin(-1)
    return int((nearest == list(PALETTE).index(colour)).sum())


# ---------------------------------------------------------------------------------------------- sizes
@pytest.mark.parametrize(
    "level, side",
    [
        (make_level("easy"), 128),
        (make_level("mid", objects={1: 1.0}, backgrounds={"plain": 1.0}), 128),
        (make_level("multi", objects={1: 1.0}, backgrounds={"plain": 1.0}, square=True), 256),
        (make_level("multi", objects={1: 1.0}, sizes={"small": (3.0, 4.0)}, backgrounds={"plain": 1.0}), 256),
    ],
)
def test_circles_measure_the_latent_size_asked(level, side):
    """A circle's rendered area gives its diameter; / 8 it lies in the level's range for its size word."""
    rng = np.random.default_rng(5)
    seen = set()
    for _ in range(8):
        scene = curriculum_scene(rng, level, combos=[("red", "circle")])
        obj = scene["objects"][0]
        d = 2 * math.sqrt(_object_pixels(render_scene(scene, side, side), "red") / math.pi) / 8
        lo, hi = level.sizes[obj["size"]]
        scale = side / level.reference_side  # rendered at `side`, asked at the reference side
        assert lo * scale - 0.15 <= d <= hi * scale + 0.15, (obj, d)
        seen.add(obj["size"])
    assert seen == set(level.sizes)


def test_dataset_objects_have_the_sizes_its_summary_states(tmp_path):
    """Every object of an easy dataset, measured from its silhouette's area (any shape), is 8.6-11.5 latent px
    across (2 r) at 128 px, as the experiment's easy set, and the summary reports the same range."""
    summary = generate_shapes_dataset(12, tmp_path / "e", seed=3, level=LEVELS["easy"])
    rows = [json.loads(x) for x in (tmp_path / "e" / "metadata.jsonl").read_text().splitlines()]
    measured = []
    for row in rows:
        assert row["size"] == [128, 128] and not row["small"] and not row["scene"]["cropped"]
        (obj,) = row["scene"]["objects"]
        assert row["scene"]["background"]["texture"] == "plain" and obj["size"] == "large"
        area = _object_pixels(Image.open(tmp_path / "e" / row["path"]), obj["color"])
        d = 2 * math.sqrt(area / AREA_FACTOR[obj["shape"]]) / 8
        assert d == pytest.approx(2 * obj["r"] * 128 / 8, rel=0.05), obj
        assert 8.6 - 0.25 <= d <= 11.5 + 0.25
        measured.append(d)
    stats = summary["object_latent_px"]["large"]
    assert stats["n"] == 12 and 8.6 <= stats["min"] <= stats["max"] <= 11.5
    on_disk = json.loads((tmp_path / "e" / "summary.json").read_text())
    assert on_disk["object_latent_px"] == summary["object_latent_px"]


# ---------------------------------------------------------------------------------------------- shares
@pytest.mark.parametrize("name", ["mid", "vae"])
def test_shares_match_the_level_at_n400(name):
    """Object counts, background kinds, soft upscales and crops within 0.075 (3 sd at n = 400) of the
    level."""
    level = LEVELS[name]
    from sdxl.data.shapes import dataset_summary

    lv, items = plan_dataset(400, seed=11, level=level)
    got = dataset_summary(items, lv)["shares"]
    for k, share in level.objects.items():
        assert abs(got["objects"].get(str(k), 0.0) - share) < 0.075, (k, got["objects"])
    for k, share in level.backgrounds.items():
        assert abs(got["backgrounds"].get(k, 0.0) - share) < 0.075, (k, got["backgrounds"])
    assert abs(got["soft_upscales"] - level.soft_upscales) < 0.075
    assert got["crops"] <= level.crops + 0.075 and got["crops"] >= level.crops - 0.075
    assert got["relations_stated_of_multi"] == 1.0


def test_relations_share_and_captions_without_relations():
    level = make_level("multi", objects={2: 1.0}, relations=0.5)
    _, items = plan_dataset(400, seed=2, level=level)
    stated = [bool(it["scene"]["relations"]) for it in items]
    assert abs(np.mean(stated) - 0.5) < 0.075
    plain = next(it for it, s in zip(items, stated) if not s)
    a, b = plain["scene"]["objects"]
    assert plain["caption"].startswith(f"a {a['size']} {a['color']} {a['shape']} and a {b['size']} "
                                       f"{b['color']}")
    assert any(rel in next(it for it, s in zip(items, stated) if s)["caption"]
               for rel in ("left of", "right of", "above", "below"))


def test_levels_are_reproducible_from_the_seed(tmp_path):
    generate_shapes_dataset(3, tmp_path / "a", seed=4, level=LEVELS["mid"])
    generate_shapes_dataset(3, tmp_path / "b", seed=4, level=LEVELS["mid"])
    for f in sorted((tmp_path / "a").iterdir()):
        if f.name != "summary.json":  # holds its own folder's name
            assert f.read_bytes() == (tmp_path / "b" / f.name).read_bytes(), f.name
    _, five = plan_dataset(5, seed=4, level=LEVELS["mid"])
    _, other = plan_dataset(5, seed=5, level=LEVELS["mid"])
    meta = [json.loads(x) for x in (tmp_path / "a" / "metadata.jsonl").read_text().splitlines()]
    assert [m["scene"] for m in meta] == [it["scene"] for it in five[:3]]  # item i depends on (seed, i) only
    assert [it["caption"] for it in five] != [it["caption"] for it in other]


def test_full_level_is_the_shipped_models_data():
    """`--level full` (the default) draws exactly what `sdxl data shapes` drew before levels: the shipped
    recipe's 6000 scenes stay the same (captions of seed 0 recorded before the curriculum existed)."""
    _, legacy = plan_dataset(3, seed=0)
    _, full = plan_dataset(3, seed=0, level=make_level("full"))
    assert legacy == full and make_level("full").legacy and not make_level("full", crops=0.0).legacy
    assert [it["caption"] for it in legacy] == [
        "a small purple ring above a large black cross on a red background",
        "a large blue circle above a small red cross, and a small black ring left of the red cross, on a "
        "noisy green background",
        "a small red star on a black background",
    ]


def test_gradient_background_keeps_its_colour_for_the_detector():
    """The ramp is visible, yet every background pixel is nearest to the background's palette colour (what
    the detector's colour segmentation needs), and the object keeps its size."""
    from sdxl.data.evaluate import nearest_palette

    level = make_level("easy", backgrounds={"gradient": 1.0})
    rng = np.random.default_rng(0)
    for _ in range(4):
        scene = curriculum_scene(rng, level)
        img = render_scene(scene, 128, 128)
        arr = np.asarray(img, dtype=np.float64)
        assert np.abs(arr[0, 0] - arr[-1, -1]).max() > 10 or np.abs(arr[0, -1] - arr[-1, 0]).max() > 10
        assert "gradient" in caption(scene)
        labels = nearest_palette(np.asarray(img))
        obj = scene["objects"][0]
        ys, xs = np.mgrid[0:128, 0:128]
        far = np.hypot(xs + 0.5 - obj["x"] * 128, ys + 0.5 - obj["y"] * 128) > 1.3 * obj["r"] * 128
        assert np.all(labels[far] == list(PALETTE).index(scene["background"]["color"]))


def test_option_parsing_and_checks():
    assert parse_counts("1-3") == {1: 1 / 3, 2: 1 / 3, 3: 1 / 3}
    assert parse_counts("1=0.2,2=0.8") == {1: 0.2, 2: 0.8}
    assert parse_shares("plain=0.5,textured=0.5") == {"plain": 0.5, "checker": 0.25, "noise": 0.25}
    assert parse_sizes("8.6:11.5") == {"large": (8.6, 11.5)}
    assert parse_sizes("small=3:5,large=9:12") == {"small": (3.0, 5.0), "large": (9.0, 12.0)}
    for bad in (lambda: make_level("easy", objects={2: 1.0}),  # two large objects do not fit 128 px
                lambda: make_level("easy", sizes={"huge": (1.0, 2.0)}),
                lambda: make_level("mid", crops=1.5), lambda: make_level("nope")):
        with pytest.raises(ValueError):
            bad()


def test_cli_data_shapes_levels_and_one_line_errors(tmp_path):
    res = runner.invoke(app, ["data", "shapes", "--out", str(tmp_path / "d"), "--n", "3", "--level", "easy",
                              "--object-latent-px", "6:7", "--backgrounds", "plain=0.5,gradient=0.5"])
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "d" / "summary.json").read_text())
    assert summary["level"] == "easy+custom" and summary["spec"]["sizes"] == {"large": [6.0, 7.0]}
    large = summary["object_latent_px"]["large"]
    assert 6.0 <= large["min"] <= large["max"] <= 7.0
    for args, flag in ((["--objects", "5"], "--objects"), (["--object-latent-px", "x"], "--object-latent-px"),
                       (["--backgrounds", "wood=1"], "--backgrounds"), (["--level", "hard"], "--level")):
        res = runner.invoke(app, ["data", "shapes", "--out", str(tmp_path / "x"), "--n", "1", *args])
        assert res.exit_code != 0 and flag in res.output and "Traceback" not in res.output, res.output


# ---------------------------------------------------------------------------------------------- evaluation
def test_render_ceiling_splits_by_size_and_every_rate_has_an_interval():
    exact = render_ceiling(12, seed=1, size=128)
    assert exact["single"].n == exact["pair"].n == 12
    assert exact["single_small"].n + exact["single_large"].n == 12
    assert exact["single"].rate("all_ok") == 1.0  # real renders: the detector reads them all

    def smear(img):  # a roundtrip that destroys small shapes
        return img.resize((16, 16), Image.Resampling.BOX).resize(img.size, Image.Resampling.BILINEAR)

    smeared = render_ceiling(12, seed=1, size=128, roundtrip=smear, lists=("single",))
    assert smeared["single"].rate("shape_ok") < 0.8 and "pair" not in smeared
    table = ceiling_table(smeared)
    rows = [r for r in table.splitlines() if r.startswith("| single")]
    assert len(rows) == 3 and all(r.count("%)") >= 4 for r in rows) and "not met" in rows[0]
    lo, hi = smeared["single"].interval("shape_ok")
    assert (lo, hi) == wilson(smeared["single"].correct["shape_ok"], 12)
    assert lo < smeared["single"].rate("shape_ok")


def test_score_generated_and_format_table_report_intervals():
    specs = {p: s for p, s in eval_prompts("single", 6, seed=0)}
    good = score_generated(lambda prompt, seed: render_scene(specs[prompt], 96, 96), ("single",), 6, 0)
    white = Image.new("RGB", (96, 96), (245, 245, 245))
    blank = score_generated(lambda prompt, seed: white, ("single",), 6, 0)
    assert good["single"].rate("all_ok") == 1.0 and blank["single"].rate("shape_ok") == 0.0
    log = tallies_to_log(good)
    assert log["eval_single_all_ok"] == 1.0 and log["eval_single_all_ok_lo"] == pytest.approx(wilson(6, 6)[0])
    counts = {"all_ok": 3, "colour_ok": 9, "shape_ok": 4, "count_ok": 5, "relation_ok": 6}
    res = KindResult("pair", 10, counts)
    row = format_table([res]).splitlines()[-1]
    assert row.count("%)") == 5 and "60% (31%-83%)" in row  # relation 6/10 with its Wilson interval
    t = Tally()
    t.add({"a": True})
    assert t.as_dict()["a_ci95"] == list(wilson(1, 1))


def test_level_prompts_follow_the_level():
    easy = eval_prompts("single", 10, seed=0, level=LEVELS["easy"])
    assert all(s["background"]["texture"] == "plain" and s["objects"][0]["size"] == "large" for _, s in easy)
    assert eval_prompts("single", 10, seed=0, level=LEVELS["easy"]) == easy
    assert eval_prompts("single", 10, seed=0) != easy
    pairs = eval_prompts("pair", 5, seed=0, level=LEVELS["mid"])
    assert all(len(s["objects"]) == 2 and s["relations"] for _, s in pairs)
    with pytest.raises(ValueError):
        eval_prompts("pair", 2, seed=0, level=LEVELS["easy"])


def test_vae_ceiling_command_on_a_tiny_vae(tiny_files):
    rt = vae_roundtrip(tiny_files["base"])
    assert rt(Image.new("RGB", (64, 64), (200, 10, 10))).size == (64, 64)
    res = runner.invoke(app, ["eval", "vae-ceiling", "--vae", str(tiny_files["base"]), "--n", "2",
                              "--size", "64", "--json"])
    assert res.exit_code == 0, res.output
    record = json.loads(res.output[res.output.index("{"):])
    assert record["ceiling"]["single"]["n"] == 2 and "shape_ok_ci95" in record["ceiling"]["pair"]
    res = runner.invoke(app, ["eval", "vae-ceiling", "--level", "easy", "--lists", "pair", "--n", "2"])
    assert res.exit_code != 0 and "--lists" in res.output and "Traceback" not in res.output


# ---------------------------------------------------------------------------------------------- VAE loss
def test_edge_map_marks_outlines_only():
    x = -torch.ones(1, 3, 16, 16)
    assert edge_map(x).abs().max() == 0  # flat
    x[..., 8:] = 1.0  # a black-white step between columns 7 and 8
    e = edge_map(x)[0, 0]
    assert torch.all(e[:, 7:9] == 1.0) and e[:, :6].abs().max() == 0 and e[:, 10:].abs().max() == 0
    red = torch.tensor([220, 40, 40]) / 127.5 - 1
    blue = torch.tensor([40, 70, 220]) / 127.5 - 1
    y = torch.cat([red.view(1, 3, 1, 1).expand(1, 3, 8, 4), blue.view(1, 3, 1, 1).expand(1, 3, 8, 4)], dim=3)
    assert 0.3 < float(edge_map(y)[0, 0, :, 3].mean()) < 1.0


def test_vae_trainer_with_edge_weight_trains(tmp_path):
    from sdxl.train import runner as TR
    from sdxl.train.config import ConfigError, TrainConfig

    data = tmp_path / "d"
    generate_shapes_dataset(4, data, seed=0, level=make_level("easy", base=64, at_res=128))
    d = {"model": {"preset": "tiny"}, "data": {"path": str(data), "resolution": 32, "bucket_step": 8},
         "train": {"task": "vae", "output": str(tmp_path / "o"), "steps": 3, "batch_size": 4,
                   "progress": False, "log_every": 1},
         "optim": {"lr": 1e-3}, "checkpoint": {"every": 0},
         "vae": {"edge_weight": 4.0, "update_scale_factor": False}}
    result = TR.run(TrainConfig.from_dict(d))
    rows = [json.loads(x) for x in (tmp_path / "o" / "log.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(math.isfinite(r["rec"]) and r["rec"] != r["rec_plain"] for r in rows)
    assert result.exported is not None and result.exported.is_file()
    d["vae"]["edge_weight"] = -1.0
    with pytest.raises(ConfigError, match="edge_weight"):
        TrainConfig.from_dict(d)


def test_diffusion_trainer_scores_shapes_every_k_steps(tmp_path):
    """`validation.shapes_n`: at every `validation.every` steps the detector's scores on held-out prompts
    (with Wilson bounds) go to log.jsonl; the UNet is back in training mode afterwards."""
    from sdxl.train import runner as TR
    from sdxl.train.config import ConfigError, TrainConfig

    data = tmp_path / "d"
    generate_shapes_dataset(4, data, seed=0, level=make_level("easy", base=64, at_res=128))
    d = {"model": {"preset": "tiny"}, "data": {"path": str(data), "resolution": 32, "bucket_step": 8},
         "train": {"output": str(tmp_path / "o"), "steps": 2, "batch_size": 2, "progress": False,
                   "log_every": 1},
         "optim": {"lr": 1e-3}, "checkpoint": {"every": 0}, "sample": {"steps": 2},
         "validation": {"every": 2, "shapes_n": 2, "shapes_lists": ["single"], "shapes_level": "easy"}}
    TR.run(TrainConfig.from_dict(d))
    rows = [json.loads(x) for x in (tmp_path / "o" / "log.jsonl").read_text().splitlines()]
    scored = [r for r in rows if "eval_single_shape_ok" in r]
    assert len(scored) == 1 and scored[0]["step"] == 2
    r = scored[0]
    assert 0.0 <= r["eval_single_shape_ok_lo"] <= r["eval_single_shape_ok"] <= r["eval_single_shape_ok_hi"]
    for key, bad in (("shapes_level", "hard"), ("shapes_lists", ["triple"])):
        with pytest.raises(ConfigError, match=key):
            TrainConfig.from_dict({**d, "validation": {**d["validation"], key: bad}})
