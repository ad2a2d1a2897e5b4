"""The procedural shapes dataset, its detector / prompt scoring, and the Frechet distance."""

import json

import numpy as np
import pytest
from PIL import Image

from sdxl.data.buckets import scaled_buckets
from sdxl.data.dataset import ImageCaptionDataset
from sdxl.data.evaluate import (
    _hull_area,
    background_colours,
    connected_components,
    detect_objects,
    detector_accuracy_on_renders,
    frechet_distance,
    image_features,
    nearest_palette,
    prompt_accuracy,
)
from sdxl.data.shapes import (
    COLORS,
    HELD_OUT,
    OUTLINE_BODY,
    PALETTE,
    SHADES,
    SHAPES,
    caption,
    eval_prompts,
    generate_shapes_dataset,
    random_scene,
    relation_between,
    render_mask,
    render_scene,
)


# ---------------------------------------------------------------------------------------------- generator
def test_generator_is_deterministic_by_seed(tmp_path):
    a = generate_shapes_dataset(5, tmp_path / "a", seed=7, small_fraction=0.4, crop_fraction=0.4)
    generate_shapes_dataset(5, tmp_path / "b", seed=7, small_fraction=0.4, crop_fraction=0.4)
    generate_shapes_dataset(3, tmp_path / "c", seed=7, small_fraction=0.4, crop_fraction=0.4)
    generate_shapes_dataset(5, tmp_path / "d", seed=8, small_fraction=0.4, crop_fraction=0.4)
    assert a["count"] == 5
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    expected = [f"{i:06d}.{e}" for i in range(5) for e in ("png", "txt", "mask.png")]
    expected += ["metadata.jsonl", "scenes.jsonl", "summary.json"]
    assert names == sorted(expected)
    for name in names:
        if name == "summary.json":  # names its own folder
            continue
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    for i in range(3):  # image i depends on (seed, i) only
        name = f"{i:06d}.png"
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "c" / name).read_bytes()
    assert any(
        (tmp_path / "a" / f"{i:06d}.png").read_bytes() != (tmp_path / "d" / f"{i:06d}.png").read_bytes()
        for i in range(5)
    )


def test_metadata_captions_and_scenes_agree(tmp_path):
    out = tmp_path / "s"
    generate_shapes_dataset(12, out, seed=1, step=32, small_fraction=0.3, crop_fraction=0.2)
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    scenes = [json.loads(line) for line in (out / "scenes.jsonl").read_text().splitlines()]
    sizes = set(scaled_buckets(256, 32))
    assert len(rows) == len(scenes) == 12
    for row, sc in zip(rows, scenes):
        scene = row["scene"]
        assert sc == {"path": row["path"], "scene": scene}
        assert row["caption"] == caption(scene) == (out / row["path"]).with_suffix(".txt").read_text().strip()
        with Image.open(out / row["path"]) as im:
            assert (im.height, im.width) == tuple(row["size"]) and tuple(row["size"]) in sizes
        for obj in scene["objects"]:
            assert f"{obj['size']} {obj['color']} {obj['shape']}" in row["caption"]
        assert scene["background"]["color"] in row["caption"]
        colours = [o["color"] for o in scene["objects"]]
        assert len(set(colours)) == len(colours) and scene["background"]["color"] not in colours
        for i, rel, j in scene["relations"]:
            assert relation_between(scene["objects"][i], scene["objects"][j], scene["aspect"]) == rel
            assert f" {rel} " in row["caption"]


def test_masks_cover_the_objects_and_train_through_the_dataset(tmp_path):
    """Each scene's loss mask covers its objects (every object pixel and the hole of a ring are inside it),
    leaves most of the background out, and reaches the trainer's dataset through the manifest."""
    out = tmp_path / "s"
    generate_shapes_dataset(16, out, seed=3, small_fraction=0.3, crop_fraction=0.0)
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    for row in rows:
        mask = np.asarray(Image.open(out / row["mask"]))
        assert mask.shape == tuple(row["size"])
        if row["small"]:
            continue  # upscaled: the object edges are soft in the image and the mask alike
        scene = row["scene"]
        objects = np.asarray(render_scene({**scene, "background": {"color": "black", "texture": "plain"}},
                                          *row["size"])).max(-1)
        assert (mask[objects > 128] > 200).all()  # every object pixel has (nearly) full weight
        assert 0.002 < (mask > 128).mean() < 0.6
    ds = ImageCaptionDataset(out, resolution=256, step=32, masks=True, crop="center")
    assert ds.stats["missing_masks"] == 0
    item = ds[0]
    assert item["mask"].shape == (1, *item["pixels"].shape[1:])
    assert 0.0 <= float(item["mask"].min()) < 0.5 < float(item["mask"].max()) <= 1.0


def test_outline_masks_weigh_the_edges_most(tmp_path):
    """style "outline": the band across each edge (also a ring's inner edge) is white, the disc around the
    object grey (OUTLINE_BODY), the background black; a dataset written with it keeps the same images."""
    def scene(shape):
        return {"aspect": 1.0, "background": {"color": "black", "texture": "plain"}, "relations": [],
                "cropped": False, "objects": [{"shape": shape, "color": "red", "size": "large", "x": 0.5,
                                               "y": 0.5, "r": 0.2, "rotation": 0.0}]}

    r = 0.2 * 200  # pixels
    at = lambda m, d: int(m[100, round(100 + d * r)])  # noqa: E731  (along the row through the centre)
    circle = np.asarray(render_mask(scene("circle"), 200, 200, style="outline"))
    assert at(circle, 1.0) == 255 and at(circle, 0.9) == 255 and at(circle, 1.1) == 255
    assert abs(at(circle, 0.0) - OUTLINE_BODY) <= 1 and abs(at(circle, 0.5) - OUTLINE_BODY) <= 1
    assert at(circle, 1.6) == 0 and int(circle[0, 0]) == 0
    ring = np.asarray(render_mask(scene("ring"), 200, 200, style="outline"))
    assert at(ring, 0.55) == 255 and at(ring, 1.0) == 255 and abs(at(ring, 0.0) - OUTLINE_BODY) <= 1
    disc = np.asarray(render_mask(scene("ring"), 200, 200))
    assert at(disc, 0.0) == 255 and at(disc, 0.55) == 255  # the default style: one white disc
    square = np.asarray(render_mask(scene("square"), 200, 200, style="outline"))
    assert at(square, 0.82) == 255 and abs(at(square, 0.3) - OUTLINE_BODY) <= 1
    with pytest.raises(ValueError, match="mask style"):
        render_mask(scene("circle"), 32, 32, style="blob")

    a, b = tmp_path / "disc", tmp_path / "outline"
    generate_shapes_dataset(3, a, seed=4, small_fraction=0.0)
    generate_shapes_dataset(3, b, seed=4, small_fraction=0.0, mask_style="outline")
    for i in range(3):
        assert (a / f"{i:06d}.png").read_bytes() == (b / f"{i:06d}.png").read_bytes()
        ma, mb = (np.asarray(Image.open(d / f"{i:06d}.mask.png")) for d in (a, b))
        assert ma.shape == mb.shape and (mb == 255).any() and ((mb > 80) & (mb < 110)).any()
        assert ((mb > 0) | (ma == 0)).all()  # everything the disc mask weighs, the outline mask weighs too


def test_caption_wording():
    scene = {
        "aspect": 1.0,
        "background": {"color": "green", "texture": "stripes", "period": 0.1, "angle": 0.0, "noise_seed": 0},
        "objects": [
            {"shape": "circle", "color": "red", "size": "large", "x": 0.5, "y": 0.25, "r": 0.18},
            {"shape": "square", "color": "blue", "size": "small", "x": 0.5, "y": 0.75, "r": 0.09},
        ],
        "relations": [[0, "above", 1]],
        "cropped": False,
    }
    assert caption(scene) == "a large red circle above a small blue square on a striped green background"
    one = {**scene, "objects": scene["objects"][:1], "relations": []}
    one["background"] = {**scene["background"], "texture": "plain"}
    assert caption(one) == "a large red circle on a green background"


def test_small_renders_record_true_size_and_dataset_reads_it(tmp_path):
    out = tmp_path / "s"
    generate_shapes_dataset(6, out, seed=2, small_fraction=1.0, crop_fraction=0.0)
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    for row in rows:
        h, w = row["size"]
        oh, ow = row["original_size"]
        assert row["small"] and 64 <= min(oh, ow) <= 128 and (oh, ow) != (h, w)
        assert abs(oh / ow - h / w) < 0.05  # same aspect ratio, just rendered small
    ds = ImageCaptionDataset(out, resolution=256, step=32, ucg=0.0)
    assert len(ds) == 6
    by_path = {r["path"]: r for r in rows}
    for i in range(len(ds)):
        item = ds[i]
        row = by_path[item["path"].rsplit("/", 1)[-1]]
        assert item["original_size"] == tuple(row["original_size"])  # the true pre-upscale size
        assert item["caption"] == row["caption"]
        assert item["target_size"] == tuple(row["size"])  # same table: no resize, no crop
        assert item["crop_top_left"] == (0, 0)


def test_cropped_scenes_cut_objects():
    rng = np.random.default_rng(0)
    n_cut = 0
    for _ in range(20):
        s = random_scene(rng, aspect=0.75, cropped=True)
        W, H = (1 / 0.75, 1.0)
        for o in s["objects"]:
            assert 0 <= o["x"] <= 1 and 0 <= o["y"] <= 1  # centres stay in view
        if s["cropped"]:
            n_cut += any(
                o["x"] * W - 1.2 * o["r"] < 0 or o["x"] * W + 1.2 * o["r"] > W
                or o["y"] * H - 1.2 * o["r"] < 0 or o["y"] * H + 1.2 * o["r"] > H
                for o in s["objects"]
            )  # fmt: skip
    assert n_cut >= 15


def test_training_scenes_avoid_held_out_combos_and_render_many_aspects():
    rng = np.random.default_rng(1)
    combos = set()
    for h, w in scaled_buckets(256, 64):
        for _ in range(15):
            s = random_scene(rng, aspect=h / w)
            combos |= {(o["color"], o["shape"]) for o in s["objects"]}
    assert not combos & set(HELD_OUT)
    assert len(combos) > 30
    s = random_scene(np.random.default_rng(2), aspect=0.25, n_objects=3)
    img = render_scene(s, 128, 512)
    assert img.size == (512, 128) and img.mode == "RGB"


def test_render_is_antialiased_and_textures_keep_their_colour():
    s = random_scene(np.random.default_rng(3), n_objects=1, texture="stripes")
    arr = np.asarray(render_scene(s, 128, 128)).reshape(-1, 3)
    pure = {PALETTE[c] for c in COLORS} | {SHADES[c] for c in COLORS}
    blended = sum(tuple(p) not in pure for p in arr)
    assert blended > 50  # edge pixels are mixtures (supersampled), not only palette colours
    shades = np.array([[SHADES[c] for c in COLORS]], dtype=np.uint8)
    assert [COLORS[k] for k in nearest_palette(shades)[0]] == list(COLORS)


def test_eval_prompts():
    single = eval_prompts("single", 10, seed=0)
    assert single == eval_prompts("single", 10, seed=0)
    assert single != eval_prompts("single", 10, seed=1)
    assert all(len(spec["objects"]) == 1 and prompt == caption(spec) for prompt, spec in single)
    pairs = eval_prompts("pair", 10, seed=0)
    assert all(len(spec["objects"]) == 2 and len(spec["relations"]) == 1 for _, spec in pairs)
    novel = eval_prompts("single_novel", 10, seed=0)
    assert all((s["objects"][0]["color"], s["objects"][0]["shape"]) in HELD_OUT for _, s in novel)
    pn = eval_prompts("pair_novel", 10, seed=0)
    assert all(any((o["color"], o["shape"]) in HELD_OUT for o in s["objects"]) for _, s in pn)
    with pytest.raises(ValueError):
        eval_prompts("triple", 1)


# ---------------------------------------------------------------------------------------------- detector
def test_connected_components_match_scipy():
    ndimage = pytest.importorskip("scipy.ndimage")
    rng = np.random.default_rng(0)
    for _ in range(5):
        mask = rng.random((40, 50)) < 0.45
        ours, n = connected_components(mask)
        ref, n_ref = ndimage.label(mask, structure=np.ones((3, 3)))
        assert n == n_ref
        # same partition: a one-to-one map between the label sets
        pairs = set(zip(ours[mask].tolist(), ref[mask].tolist()))
        assert len(pairs) == n and len({a for a, _ in pairs}) == n and len({b for _, b in pairs}) == n


def test_hull_area_matches_scipy():
    spatial = pytest.importorskip("scipy.spatial")
    pts = np.random.default_rng(1).normal(size=(200, 2))
    assert _hull_area(pts) == pytest.approx(spatial.ConvexHull(pts).volume, rel=1e-9)


def test_detector_reads_single_shapes():
    rng = np.random.default_rng(10)
    for shape in SHAPES:
        for k in range(2):
            color = COLORS[(SHAPES.index(shape) + 3 * k) % len(COLORS)]
            spec = random_scene(rng, combos=[(color, shape)], hold_out=False)
            dets = detect_objects(render_scene(spec, 192, 192))
            assert [(d.color, d.shape) for d in dets] == [(color, shape)]


def test_detector_accuracy_on_fresh_renders():
    acc = detector_accuracy_on_renders(n=40, seed=123, size=256)
    print(
        f"\ndetector on renders: single all_ok {acc['single_all_ok']:.3f}, "
        f"pair all_ok {acc['pair_all_ok']:.3f}, pair relation_ok {acc['pair_relation_ok']:.3f}"
    )
    assert acc["single_all_ok"] >= 0.95
    assert acc["pair_relation_ok"] >= 0.9 and acc["pair_all_ok"] >= 0.9


def test_detector_measures_the_background_it_is_given():
    """An autoencoder shifts the light shade of red stripes towards orange: those stripes are background
    (the detector measures the border's two colours), while an orange object on them is still found."""
    rng = np.random.default_rng(5)
    spec = random_scene(rng, n_objects=2, combos=[("purple", "circle"), ("orange", "square")], hold_out=False)
    spec["background"] = {"color": "red", "texture": "stripes", "period": 0.15, "angle": 0.0, "noise_seed": 1}
    arr = np.asarray(render_scene(spec, 192, 192)).copy()
    expected = [("orange", "square"), ("purple", "circle")]
    assert sorted((d.color, d.shape) for d in detect_objects(arr)) == expected
    shade = np.array(SHADES["red"], dtype=np.float32)
    near_shade = ((arr.astype(np.float32) - shade) ** 2).sum(-1) < 30**2
    assert near_shade.mean() > 0.2
    arr[near_shade] = (232, 118, 70)  # nearer to orange (245, 135, 30) than to red (220, 40, 40)
    assert COLORS[nearest_palette(np.array([[[232, 118, 70]]], dtype=np.uint8))[0, 0]] == "orange"
    assert sorted((d.color, d.shape) for d in detect_objects(arr)) == expected
    # an object cut by the border is not taken for a background colour, on plain or striped ground, even
    # when it covers more of the border than the largest object of the dataset can (r = 0.3 at the edge)
    for texture in ("plain", "stripes"):
        edge = {**spec, "objects": [{**spec["objects"][0], "x": 0.04, "y": 0.5, "r": 0.3}], "relations": []}
        edge["background"] = {**spec["background"], "texture": texture}
        img = np.asarray(render_scene(edge, 192, 192))
        assert [d.color for d in detect_objects(img)] == ["purple"]
        if texture == "plain":
            assert np.abs(background_colours(img) - np.array(PALETTE["red"])).max() < 2  # red only


def test_prompt_accuracy_catches_wrong_images():
    prompt, spec = eval_prompts("pair", 1, seed=4)[0]
    assert prompt_accuracy(render_scene(spec, 224, 224), spec)["all_ok"]
    a, b = spec["objects"]
    # wrong shape for object 0 (same colour)
    other = next(s for s in ("circle", "square", "star") if s != a["shape"])
    wrong_shape = {**spec, "objects": [{**a, "shape": other, "rotation": 0.0}, b]}
    r = prompt_accuracy(render_scene(wrong_shape, 224, 224), spec)
    assert r["colour_ok"] and not r["shape_ok"] and not r["all_ok"]
    # one object missing
    r = prompt_accuracy(render_scene({**spec, "objects": [a], "relations": []}, 224, 224), spec)
    assert not r["count_ok"] and not r["colour_ok"] and not r["relation_ok"]
    # positions swapped: the relation is reversed
    swapped = {**spec, "objects": [{**a, "x": b["x"], "y": b["y"]}, {**b, "x": a["x"], "y": a["y"]}]}
    r = prompt_accuracy(render_scene(swapped, 224, 224), spec)
    assert r["shape_ok"] and r["count_ok"] and not r["relation_ok"]


# ---------------------------------------------------------------------------------------------- FD
def test_frechet_distance_matches_scipy_formula():
    linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(0)
    a = rng.normal(size=(300, 6))
    b = rng.normal(size=(250, 6)) @ rng.normal(size=(6, 6)) * 0.5 + 0.3
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    ref = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(ca + cb) - 2 * np.trace(linalg.sqrtm(ca @ cb).real)
    assert frechet_distance(a, b) == pytest.approx(ref, rel=1e-6)


def test_frechet_distance_is_zero_for_same_set_and_grows_with_perturbation():
    rng = np.random.default_rng(1)
    feats = np.stack([image_features(render_scene(random_scene(rng), 96, 96)) for _ in range(24)])
    assert feats.shape == (24, 123)
    assert frechet_distance(feats, feats) < 1e-6
    noise = rng.normal(size=feats.shape)
    d = [frechet_distance(feats, feats + s * noise) for s in (0.01, 0.05, 0.2)]
    assert 0 < d[0] < d[1] < d[2]
    # a visibly different image set (washed-out colours) is farther than a fresh set of real renders
    fresh = np.stack([image_features(render_scene(random_scene(rng), 96, 96)) for _ in range(24)])
    faded = []
    for _ in range(24):
        arr = np.asarray(render_scene(random_scene(rng), 96, 96)).astype(float)
        faded.append(image_features(np.uint8(arr * 0.5 + 100)))
    assert frechet_distance(feats, fresh) < frechet_distance(feats, np.stack(faded))
