"""Image loading, the resize/crop transform and its conditioning, and ImageCaptionDataset."""

import json
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from sdxl.data.buckets import BucketBatchSampler, scaled_buckets
from sdxl.data.dataset import ImageCaptionDataset, collate, read_caption_file, shuffle_tags
from sdxl.data.images import ImageError, cover_size, image_size, load_image, prepare, tensor_to_pil


# ---------------------------------------------------------------------------------------------- loading
def test_load_rgba_composited_on_white(tmp_path):
    p = tmp_path / "a.png"
    a = np.zeros((4, 4, 4), np.uint8)
    a[..., 0] = 255
    a[:, :2, 3] = 255  # opaque red
    a[:, 2:, 3] = 128  # half-transparent red
    Image.fromarray(a, "RGBA").save(p)
    img = load_image(p)
    assert img.mode == "RGB"
    arr = np.asarray(img).astype(int)
    assert (arr[:, :2] == [255, 0, 0]).all()
    assert np.abs(arr[:, 2:] - [255, 127, 127]).max() <= 1


def test_load_la_and_palette_transparency(tmp_path):
    la = np.zeros((2, 2, 2), np.uint8)
    la[0, :, 1] = 255  # top row opaque black, bottom row fully transparent
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    arr = np.asarray(load_image(tmp_path / "la.png"))
    assert (arr[0] == 0).all() and (arr[1] == 255).all()

    p = Image.new("P", (4, 4), 0)
    p.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    p.paste(1, (0, 0, 2, 4))
    p.save(tmp_path / "p.png", transparency=0)
    arr = np.asarray(load_image(tmp_path / "p.png"))
    assert (arr[:, :2] == [0, 0, 255]).all()  # palette entry 1: blue
    assert (arr[:, 2:] == 255).all()  # transparent entry 0 -> white

    p2 = Image.new("P", (2, 2), 1)
    p2.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    p2.save(tmp_path / "p2.png")
    assert (np.asarray(load_image(tmp_path / "p2.png")) == [10, 200, 30]).all()


def test_load_16bit_grey_is_scaled_not_clipped(tmp_path):
    a = np.full((6, 6), 65535, np.uint16)
    a[:, 3:] = 32768
    Image.fromarray(a).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    arr = np.asarray(load_image(tmp_path / "g16.png"))
    assert (arr[:, :3] == 255).all()
    assert (arr[:, 3:] == 128).all()  # 32768 / 257 = 127.5 -> 128; PIL's convert would give 255


def test_load_cmyk(tmp_path):
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "c.jpg", quality=95)
    assert Image.open(tmp_path / "c.jpg").mode == "CMYK"
    arr = np.asarray(load_image(tmp_path / "c.jpg")).astype(int)
    assert np.abs(arr - [255, 0, 0]).max() <= 8


def test_load_applies_exif_rotation(tmp_path):
    img = Image.new("RGB", (30, 20), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 5, 5))  # marker at the stored top-left
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    img.save(tmp_path / "r.png", exif=exif)
    assert image_size(tmp_path / "r.png") == (30, 20)  # (h, w) as displayed, from the header only
    out = load_image(tmp_path / "r.png")
    assert out.size == (20, 30)
    assert (np.asarray(out) == np.asarray(img.transpose(Image.Transpose.ROTATE_270))).all()
    assert tuple(np.asarray(out)[0, -1]) == (255, 0, 0)  # marker now top-right


def test_truncated_and_garbage_files_raise_image_error(tmp_path):
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    for ext in ("png", "jpg"):
        full = tmp_path / f"full.{ext}"
        noise.save(full)
        data = full.read_bytes()
        cut = tmp_path / f"cut.{ext}"
        cut.write_bytes(data[: len(data) // 2])
        with pytest.raises(ImageError) as e:
            load_image(cut)
        assert str(cut) in str(e.value) and e.value.path == str(cut)
        assert isinstance(e.value, ValueError)
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"this is not an image")
    with pytest.raises(ImageError):
        load_image(junk)
    with pytest.raises(ImageError):
        image_size(junk)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def test_decompression_bomb_is_refused_before_decoding(tmp_path):
    # A tiny file declaring 100000 x 100000 RGB pixels (30 GB decoded).
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\0" * 16))
    data += _png_chunk(b"IEND", b"")
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(data)
    assert bomb.stat().st_size < 100
    with pytest.raises(ImageError):
        load_image(bomb)
    # the limit is configurable and applies to ordinary files as well
    Image.new("RGB", (40, 30)).save(tmp_path / "ok.png")
    with pytest.raises(ImageError, match="max_pixels"):
        load_image(tmp_path / "ok.png", max_pixels=1000)
    assert load_image(tmp_path / "ok.png", max_pixels=1200).size == (40, 30)


# ---------------------------------------------------------------------------------------------- prepare
def _noise(h, w, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _to_uint8(t):
    return np.asarray(tensor_to_pil(t))


@pytest.mark.parametrize("hw,bucket", [((64, 200), (64, 128)), ((300, 96), (192, 96))])
def test_prepare_crop_matches_pixels_exactly_without_resize(hw, bucket):
    # the image already fits the bucket on one side: no resize, so the crop can be checked pixel-exactly
    img = _noise(*hw)
    src = np.asarray(img)
    seen = set()
    for seed in range(6):
        pix, cond = prepare(img, bucket, crop="random", rng=np.random.default_rng(seed))
        assert pix.shape == (3, *bucket) and pix.dtype == torch.float32
        assert -1.0 <= pix.min() and pix.max() <= 1.0
        top, left = cond["crop_top_left"]
        assert cond["original_size"] == hw and cond["target_size"] == bucket
        assert cond["resized_size"] == hw
        assert (top == 0) or (left == 0)  # only the axis with excess is cropped
        assert (_to_uint8(pix) == src[top : top + bucket[0], left : left + bucket[1]]).all()
        seen.add((top, left))
        # flipped: the pixels are the mirror image and the crop is the mirrored window
        fpix, fcond = prepare(img, bucket, crop="random", flip=True, rng=np.random.default_rng(seed))
        ftop, fleft = fcond["crop_top_left"]
        assert ftop == top and fleft == hw[1] - bucket[1] - left
        assert (_to_uint8(fpix) == _to_uint8(pix)[:, ::-1]).all()
        assert (_to_uint8(fpix) == src[:, ::-1][ftop : ftop + bucket[0], fleft : fleft + bucket[1]]).all()
    assert len(seen) > 1  # the offset is random
    _, c = prepare(img, bucket, crop="center")
    ex_h, ex_w = hw[0] - bucket[0], hw[1] - bucket[1]
    assert c["crop_top_left"] == (ex_h // 2, ex_w // 2)


def test_prepare_records_original_size_before_resize_and_crop_after():
    # horizontal gradient: the red channel encodes the x coordinate of the RESIZED image linearly,
    # so the left offset of the crop can be read back from the returned pixels
    h, w = 150, 500
    x = np.linspace(0, 255, w)
    arr = np.zeros((h, w, 3), np.uint8)
    arr[..., 0] = np.round(x)[None, :]
    arr[..., 1] = 100
    img = Image.fromarray(arr)
    bucket = (96, 160)
    for seed in range(5):
        pix, cond = prepare(img, bucket, rng=np.random.default_rng(seed))
        assert cond["original_size"] == (150, 500)  # before any resizing
        rh, rw = cond["resized_size"]
        assert (rh, rw) == cover_size(150, 500, bucket) == (96, 320)
        top, left = cond["crop_top_left"]
        assert top == 0 and 0 <= left <= rw - bucket[1]
        red = _to_uint8(pix)[..., 0].astype(float).mean(0)  # per output column
        # column j of the crop is column left + j of the resized image, whose red is 255 * x / (rw - 1)
        est_left = np.median(red[2:-2] / 255.0 * (rw - 1) - np.arange(2, bucket[1] - 2))
        assert abs(est_left - left) <= 1.5


def test_prepare_upscale_guard_and_original_size_override():
    small = _noise(40, 50)
    with pytest.raises(ImageError):
        prepare(small, (64, 64), upscale=False)
    pix, cond = prepare(small, (64, 64), crop="center", original_size=(20, 25))
    assert pix.shape == (3, 64, 64)
    assert cond["original_size"] == (20, 25)
    assert cond["resized_size"] == (64, 80) and cond["crop_top_left"] == (0, 8)


# ---------------------------------------------------------------------------------------------- captions
def test_caption_helpers(tmp_path):
    p = tmp_path / "c.txt"
    p.write_bytes(b"\xef\xbb\xbf\n  first line  \nsecond\n")
    assert read_caption_file(p) == ("first line", False)
    p.write_bytes(b"caf\xe9 au lait")  # latin-1, not UTF-8
    text, bad = read_caption_file(p)
    assert bad and text == "caf\ufffd au lait"
    rng = np.random.default_rng(0)
    outs = {shuffle_tags("trigger, a, b, c, d, e", rng, keep_tokens=1) for _ in range(20)}
    assert all(o.startswith("trigger, ") for o in outs)
    assert all(sorted(o.split(", ")[1:]) == ["a", "b", "c", "d", "e"] for o in outs)
    assert len(outs) > 1


# ---------------------------------------------------------------------------------------------- dataset
RES, STEP = 64, 8  # buckets: the paper's ratios at 64^2 pixels (32 x 128 ... 128 x 32)


def _write_folder(root, n=40, seed=0):
    """Random-size PNGs with sidecar captions, plus the awkward cases."""
    rng = np.random.default_rng(seed)
    sizes = {}
    for i in range(n):
        h, w = (int(v) for v in rng.integers(48, 200, size=2))
        _noise(h, w, seed=i).save(root / f"img{i:03d}.png")
        sizes[f"img{i:03d}.png"] = (h, w)
        if i % 10 == 1:
            (root / f"img{i:03d}.caption").write_text(f"caption {i}", encoding="utf-8")
        elif i % 10 == 2:
            pass  # no caption
        elif i % 10 == 3:
            (root / f"img{i:03d}.txt").write_bytes(b"na\xefve tag, other")  # not UTF-8
        else:
            (root / f"img{i:03d}.txt").write_text(f"tag{i}, red, blue, green", encoding="utf-8")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")  # unreadable header
    (root / "notes.md").write_text("not an image")
    return sizes


def test_folder_scan_counts_and_every_batch_is_one_bucket(tmp_path):
    sizes = _write_folder(tmp_path)
    ds = ImageCaptionDataset(tmp_path, resolution=RES, step=STEP, seed=0, ucg=0.0)
    assert ds.buckets == scaled_buckets(RES, STEP)
    assert len(ds) == 40
    assert ds.stats["skipped_unreadable"] == 1
    assert ds.stats["missing_captions"] == 4
    assert ds.stats["caption_decode_errors"] == 4
    assert len(ds.bucket_counts()) > 3  # many aspect ratios

    sampler = BucketBatchSampler(ds.bucket_of, batch_size=3, seed=0)
    loader = DataLoader(ds, batch_sampler=sampler, collate_fn=collate, num_workers=0)
    n_items = 0
    for batch in loader:
        b = len(batch["caption"])
        n_items += b
        H, W = batch["pixels"].shape[-2:]
        assert batch["pixels"].shape == (b, 3, H, W)
        assert (batch["target_size"] == torch.tensor([H, W])).all()
        for k in range(b):
            name = batch["path"][k].rsplit("/", 1)[-1]
            assert tuple(batch["original_size"][k].tolist()) == sizes[name]
            top, left = batch["crop_top_left"][k].tolist()
            assert top == 0 or left == 0
        assert batch["aesthetic_score"].tolist() == [6.0] * b  # none in the data: the default
    assert n_items == 40

    by_name = {ds.records[i].path.rsplit("/", 1)[-1]: ds[i] for i in range(len(ds))}
    assert by_name["img001.png"]["caption"] == "caption 1"
    assert by_name["img002.png"]["caption"] == ""
    assert "\ufffd" in by_name["img003.png"]["caption"]
    assert by_name["img004.png"]["caption"] == "tag4, red, blue, green"


def test_items_are_deterministic_per_seed_epoch_index(tmp_path):
    _write_folder(tmp_path, n=12)
    kw = dict(resolution=RES, step=STEP, seed=3, ucg=0.3, shuffle_caption=True, keep_tokens=1, flip_prob=0.5)
    a = ImageCaptionDataset(tmp_path, **kw)
    b = ImageCaptionDataset(tmp_path, **kw)
    for i in range(len(a)):
        x, y = a[i], b[i]
        assert torch.equal(x["pixels"], y["pixels"])
        for key in ("caption", "drop_caption", "crop_top_left", "flipped"):
            assert x[key] == y[key]
    before = [a[i] for i in range(len(a))]
    a.set_epoch(1)
    after = [a[i] for i in range(len(a))]
    changed = sum(
        (p["caption"], p["crop_top_left"], p["flipped"]) != (q["caption"], q["crop_top_left"], q["flipped"])
        for p, q in zip(before, after)
    )
    assert changed > 0
    a.set_epoch(0)
    assert all(torch.equal(a[i]["pixels"], before[i]["pixels"]) for i in range(len(a)))


def test_caption_dropout_flag(tmp_path):
    _write_folder(tmp_path, n=10)
    all_drop = ImageCaptionDataset(tmp_path, resolution=RES, step=STEP, ucg=1.0)
    assert all(it["drop_caption"] and it["caption"] == "" for it in (all_drop[i] for i in range(10)))
    none = ImageCaptionDataset(tmp_path, resolution=RES, step=STEP, ucg=0.0)
    assert not any(none[i]["drop_caption"] for i in range(10))
    half = ImageCaptionDataset(tmp_path, resolution=RES, step=STEP, ucg=0.5)
    drops = []
    for e in range(8):
        half.set_epoch(e)
        drops += [half[i]["drop_caption"] for i in range(10)]
    assert 0.25 < np.mean(drops) < 0.75
    assert collate([all_drop[0]])["drop_caption"].tolist() == [True]


def test_conditioning_ablation_switches(tmp_path):
    _write_folder(tmp_path, n=10)
    ds = ImageCaptionDataset(
        tmp_path, resolution=RES, step=STEP, size_conditioning=False, crop_conditioning=False
    )
    for i in range(len(ds)):
        it = ds[i]
        assert it["original_size"] == it["target_size"] == tuple(it["pixels"].shape[-2:])
        assert it["crop_top_left"] == (0, 0)


def test_min_size_and_no_upscale_filters(tmp_path):
    for i, (h, w) in enumerate([(40, 40), (100, 100), (30, 120), (200, 90)]):
        _noise(h, w, i).save(tmp_path / f"{i}.png")
    ds = ImageCaptionDataset(tmp_path, resolution=RES, step=STEP, min_size=50)
    assert len(ds) == 2 and ds.stats["skipped_small"] == 2
    ds = ImageCaptionDataset(tmp_path, resolution=RES, step=STEP, upscale=False)
    # 40x40 -> bucket 64x64 would need enlarging, 30x120 -> 32x128 too
    assert sorted(r.file_size for r in ds.records) == [(100, 100), (200, 90)]
    assert ds.stats["skipped_upscale"] == 2


def test_truncated_image_is_replaced_by_next_of_same_bucket(tmp_path):
    for i in range(4):
        _noise(64, 64, i).save(tmp_path / f"{i}.png")
        (tmp_path / f"{i}.txt").write_text(f"image {i}")
    data = (tmp_path / "1.png").read_bytes()
    (tmp_path / "1.png").write_bytes(data[: len(data) // 2])  # header fine, pixels cut
    ds = ImageCaptionDataset(tmp_path, resolution=RES, step=STEP, ucg=0.0)
    assert len(ds) == 4  # passes the header scan
    it = ds[1]
    assert it["index"] == 2 and it["caption"] == "image 2" and it["path"].endswith("2.png")
    assert ds.stats["load_failures"] == 1
    ds[1]
    assert ds.stats["load_failures"] == 1  # remembered, not retried
    batch = collate([ds[i] for i in range(4)])
    assert batch["pixels"].shape == (4, 3, 64, 64)


def test_manifest_with_original_size_and_aesthetic_score(tmp_path):
    (tmp_path / "imgs").mkdir()
    _noise(128, 96, 0).save(tmp_path / "imgs" / "a.png")
    _noise(80, 80, 1).save(tmp_path / "imgs" / "b.png")
    (tmp_path / "imgs" / "b.txt").write_text("from sidecar")
    rows = [
        {"path": "imgs/a.png", "caption": "a photo", "aesthetic_score": 5.25, "original_size": [32, 24]},
        {"file_name": "imgs/b.png"},
        {"path": "imgs/missing.png", "caption": "gone"},
    ]
    man = tmp_path / "train.jsonl"
    man.write_text("\n".join(json.dumps(r) for r in rows) + "\nnot json\n")
    ds = ImageCaptionDataset(man, resolution=RES, step=STEP, ucg=0.0)
    assert len(ds) == 2
    assert ds.stats["skipped_unreadable"] == 1 and ds.stats["manifest_bad_lines"] == 1
    a, b = ds[0], ds[1]
    assert a["caption"] == "a photo" and a["original_size"] == (32, 24) and a["aesthetic_score"] == 5.25
    assert b["caption"] == "from sidecar" and b["original_size"] == (80, 80) and b["aesthetic_score"] is None
    assert collate([b])["aesthetic_score"].tolist() == [6.0]
    # min_size uses the true original size from the manifest
    assert len(ImageCaptionDataset(man, resolution=RES, step=STEP, min_size=64)) == 1


def test_collate_refuses_mixed_shapes(tmp_path):
    _noise(64, 64).save(tmp_path / "sq.png")
    _noise(32, 128).save(tmp_path / "wide.png")
    ds = ImageCaptionDataset(tmp_path, resolution=RES, step=STEP)
    with pytest.raises(ValueError, match="one bucket"):
        collate([ds[0], ds[1]])


# ------------------------------------------------------------------------------------------- loss masks
def test_masks_get_the_images_own_crop_and_flip(tmp_path):
    """A mask equal to its image's red channel stays equal to it through the random crop, the flip and a
    resize (up to the two resamplers' difference), so the weights land on the pixels they were drawn for."""
    for i, hw in enumerate([(64, 200), (300, 96), (70, 90)]):
        img = _noise(*hw, seed=i)
        img.save(tmp_path / f"im{i}.png")
        Image.fromarray(np.asarray(img)[..., 0]).save(tmp_path / f"im{i}.mask.png")
        (tmp_path / f"im{i}.txt").write_text("x")
    buckets = [(64, 128), (192, 96), (64, 64)]
    for flip in (0.0, 1.0):
        ds = ImageCaptionDataset(tmp_path, buckets=buckets, ucg=0.0, flip_prob=flip, masks=True, seed=3)
        assert len(ds) == 3  # the .mask.png files are not training images
        for k in range(3):
            it = ds[k]
            red = (it["pixels"][0] + 1) / 2
            assert it["mask"].shape == (1, *it["pixels"].shape[1:]) and it["flipped"] == bool(flip)
            err = (it["mask"][0] - red).abs()
            if it["path"].endswith("im2.png"):  # 70x90 -> 64x82: resized (Lanczos vs bilinear)
                assert float(err.mean()) < 0.06
            else:  # no resize: exact up to 8-bit rounding
                assert float(err.max()) < 1 / 255 + 1e-6
        batch = collate([ds[0]])
        assert batch["mask"].shape == (1, 1, *batch["pixels"].shape[2:])


def test_missing_manifest_and_mismatched_masks(tmp_path):
    """No mask: all ones, counted. A manifest's "mask" path is used. A mask of the wrong size makes the
    item unusable like a corrupt image (replaced by the next of its bucket), never a silent misfit."""
    for name in ("a", "b", "c", "d"):
        _noise(64, 64, seed=ord(name)).save(tmp_path / f"{name}.png")
    Image.new("L", (64, 64), 0).save(tmp_path / "masks_a.png")
    Image.new("L", (32, 64), 255).save(tmp_path / "b.mask.png")  # wrong size
    rows = [{"path": "a.png", "caption": "a", "mask": "masks_a.png"}, {"path": "b.png", "caption": "b"},
            {"path": "c.png", "caption": "c"}, {"path": "d.png", "caption": "d"}]
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = ImageCaptionDataset(tmp_path, resolution=RES, step=STEP, ucg=0.0, masks=True)
    assert ds.stats["missing_masks"] == 2
    a = ds[0]
    assert a["caption"] == "a" and float(a["mask"].max()) == 0.0
    b = ds[1]
    assert b["caption"] == "c" and ds.stats["load_failures"] == 1 and float(b["mask"].min()) == 1.0
    plain = ImageCaptionDataset(tmp_path, resolution=RES, step=STEP, ucg=0.0)
    assert "mask" not in plain[0] and "mask" not in collate([plain[0]])
