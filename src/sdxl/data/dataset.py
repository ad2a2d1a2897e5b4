"""Image + caption training data with SDXL's size / crop / target conditioning.

Two sources are read:
  - a folder of images with same-name caption files, `cat.png` + `cat.txt` (or `cat.caption`), the
    kohya sd-scripts convention; sub-folders are searched too;
  - a JSONL manifest, one object per line: {"path": ..., "caption": ..., "aesthetic_score": ...,
    "original_size": [h, w]}; only "path" is required ("file_name", the Hugging Face imagefolder key,
    is accepted too; relative paths are relative to the manifest's folder). A folder that contains a
    `metadata.jsonl` (what `sdxl.data.shapes` writes) is read through that manifest.
    "original_size" is the TRUE size before any resizing that happened before the file was written (the
    shapes dataset renders some images small and upscales them); when present it is the recorded size
    conditioning, otherwise the file's own size is.

Scanning reads only the image headers (size, EXIF orientation) to assign each image to the bucket with
the nearest aspect ratio; pixels are decoded in `__getitem__`. Files whose header cannot be read, that
are smaller than `min_size`, or (with `upscale=False`) that would need enlarging, are left out at scan
time and counted in `stats`.

Corrupt pixel data found later (a truncated file passes the header scan) must not crash a run: the item
is logged, counted (`stats["load_failures"]`) and replaced by the next good item of the SAME bucket
(wrapping around), so a batch from `BucketBatchSampler` still has one shape. The returned dict's `index`
and `path` name the item actually returned. (With DataLoader workers each worker counts and remembers
its own failures; the main process's `stats` only holds the scan counts.)

Crop coordinates are pixels of the file's image after the resize to the bucket, also when the manifest
gives a smaller true `original_size` (that size only replaces the size conditioning).

Randomness (caption dropout, tag shuffle, flip, crop offset) comes from a generator seeded with
(seed, epoch, index), so an item is the same whenever and wherever (any DataLoader worker) it is loaded
and a resumed run reproduces the same samples. Call `set_epoch(epoch)` before iterating each epoch (with
DataLoader workers: before creating the iterator, so the workers get the new value).
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from sdxl.data.buckets import nearest_bucket, scaled_buckets
from sdxl.data.images import (
    DEFAULT_MAX_PIXELS,
    ImageError,
    cover_size,
    image_size,
    load_image,
    load_mask,
    prepare,
    prepare_mask,
)

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
CAPTION_EXTENSIONS = (".txt", ".caption")
MANIFEST_NAME = "metadata.jsonl"
MASK_SUFFIX = ".mask.png"  # `cat.png` -> `cat.mask.png`; such files are never scanned as images


def mask_path_for(image_path: str) -> str:
    """Where the loss mask of an image is looked for when its manifest line names none."""
    return os.path.splitext(image_path)[0] + MASK_SUFFIX


@dataclass
class Record:
    """One usable image found by the scan."""

    path: str
    caption: str
    file_size: tuple[int, int]  # (h, w) of the file as displayed (EXIF applied)
    original_size: tuple[int, int]  # (h, w) to record as size conditioning
    aesthetic_score: float | None
    bucket: int
    mask: str | None = None  # loss-mask file (only looked up with masks=True)


def read_caption_file(path: str | os.PathLike) -> tuple[str, bool]:
    """Text of a caption file and whether it had to be decoded with replacement characters.

    UTF-8 (a byte-order mark is dropped); bytes that are not UTF-8 become U+FFFD instead of failing.
    The first non-empty line is the caption (kohya reads one caption per file the same way).
    """
    raw = Path(path).read_bytes()
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    try:
        text, bad = raw.decode("utf-8"), False
    except UnicodeDecodeError:
        text, bad = raw.decode("utf-8", errors="replace"), True
    for line in text.splitlines():
        if line.strip():
            return line.strip(), bad
    return "", bad


def shuffle_tags(caption: str, rng: np.random.Generator, keep_tokens: int = 0, separator: str = ",") -> str:
    """kohya's `shuffle_caption`: split on `separator`, keep the first `keep_tokens` tags in place (e.g. a
    trigger word), shuffle the rest, join with `separator + " "`. Empty tags are dropped."""
    tags = [t.strip() for t in caption.split(separator)]
    tags = [t for t in tags if t]
    fixed, rest = tags[:keep_tokens], tags[keep_tokens:]
    rest = [rest[int(j)] for j in rng.permutation(len(rest))]
    return (separator + " ").join(fixed + rest)


def process_tags(
    caption: str,
    rng: np.random.Generator,
    shuffle: bool = False,
    keep_tokens: int = 0,
    separator: str = ",",
    tag_dropout: float = 0.0,
    keep_separator: str = "",
) -> str:
    """kohya's tag processing (`process_caption`): shuffle and / or drop tags, keeping some in place.

    The caption is split on `separator` (tags stripped, empty ones dropped). When `keep_separator` (kohya
    `keep_tokens_separator`, e.g. "|||") occurs in it, the tags before its first occurrence are kept first
    and the tags after a second occurrence are kept last; otherwise the first `keep_tokens` tags are kept
    first. Only the tags in between are shuffled (a permutation from `rng`) and then each dropped with
    probability `tag_dropout` (one `rng.random()` per tag, in the shuffled order; none drawn when it is 0).
    The result joins kept + remaining + kept-last with `separator + " "`; the keep separator itself never
    reaches the text encoder.
    """
    def split(text: str) -> list[str]:
        return [t for t in (x.strip() for x in text.split(separator)) if t]

    suffix: list[str] = []
    if keep_separator and keep_separator in caption:
        head, flex_text = caption.split(keep_separator, 1)
        if keep_separator in flex_text:
            flex_text, tail = flex_text.split(keep_separator, 1)
            suffix = split(tail.replace(keep_separator, separator))
        fixed, flex = split(head), split(flex_text)
    else:
        tags = split(caption)
        fixed, flex = tags[:keep_tokens], tags[keep_tokens:]
    if shuffle:
        flex = [flex[int(j)] for j in rng.permutation(len(flex))]
    if tag_dropout > 0:
        flex = [t for t in flex if rng.random() >= tag_dropout]
    return (separator + " ").join(fixed + flex + suffix)


class ImageCaptionDataset(Dataset):
    """Images + captions, bucketed by aspect ratio, returning pixels and SDXL's conditioning.

    Args:
        source: a folder (sidecar captions, or a `metadata.jsonl` inside it) or a `.jsonl` manifest.
        resolution: base side of the bucket area (1024 for SDXL, 256 / 512 for the early stages).
        buckets: explicit list of (H, W); default `scaled_buckets(resolution, step)` (at 1024 / 64 the
            paper's table).
        step: side granularity of the default buckets (64 for SDXL; 8 is fine for small experiments).
        seed: seed of every random choice (with epoch and index).
        crop: "random" (paper) or "center".
        flip_prob: probability of a horizontal flip. Default 0: SDXL is trained without flips; captions
            with "left"/"right" (the shapes dataset) become wrong when the image is flipped.
        ucg: caption dropout probability. A dropped item has `caption == ""` and `drop_caption == True`;
            the trainer then uses the all-zero text embedding, which is SDXL's unconditional input
            (sgm's ucg_rate 0.1, paper Appendix C "10% of the time").
        shuffle_caption / keep_tokens / caption_separator: kohya tag shuffling (see `process_tags`).
        caption_tag_dropout_rate / keep_tokens_separator: kohya tag dropout and kept-tag markup (see
            `process_tags`), seeded like the other choices by (seed, epoch, index).
        size_conditioning: False records original_size = target_size (ablation: "no size conditioning").
        crop_conditioning: False records crop_top_left = (0, 0) (ablation: "no crop conditioning").
        min_size: leave out images whose shorter original side is below this (paper: this filter at 256
            would drop 39% of their data; size conditioning is the alternative). 0 keeps everything.
        upscale: False leaves out images that would have to be enlarged to cover their bucket
            (they are not moved to a smaller bucket: every batch must have one of the listed sizes).
        max_pixels: images declaring more pixels are rejected unread (decompression bombs).
        caption_extensions: sidecar caption extensions, tried in order.
        default_caption: caption for images without one.
        masks: also return each image's loss mask as "mask" [1, H, W] in [0, 1] (kohya's `masked_loss`):
            the manifest's "mask" path, else `cat.mask.png` beside `cat.png`; an image without one gets
            an all-ones mask (counted in `stats["missing_masks"]`).
    """

    def __init__(
        self,
        source: str | os.PathLike,
        resolution: int = 1024,
        buckets: Sequence[tuple[int, int]] | None = None,
        step: int = 64,
        seed: int = 0,
        crop: str = "random",
        flip_prob: float = 0.0,
        ucg: float = 0.1,
        shuffle_caption: bool = False,
        keep_tokens: int = 0,
        caption_separator: str = ",",
        caption_tag_dropout_rate: float = 0.0,
        keep_tokens_separator: str = "",
        size_conditioning: bool = True,
        crop_conditioning: bool = True,
        min_size: int = 0,
        upscale: bool = True,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        caption_extensions: Sequence[str] = CAPTION_EXTENSIONS,
        default_caption: str = "",
        masks: bool = False,
    ):
        if crop not in ("random", "center"):
            raise ValueError(f"crop must be 'random' or 'center', got {crop!r}")
        self.source = Path(source)
        self.resolution = int(resolution)
        self.buckets: list[tuple[int, int]] = (
            [(int(h), int(w)) for h, w in buckets]
            if buckets is not None
            else scaled_buckets(resolution, step)
        )
        self.seed = int(seed)
        self.epoch = 0
        self.crop = crop
        self.flip_prob = float(flip_prob)
        self.ucg = float(ucg)
        self.shuffle_caption = bool(shuffle_caption)
        self.keep_tokens = int(keep_tokens)
        self.caption_separator = caption_separator
        self.caption_tag_dropout_rate = float(caption_tag_dropout_rate)
        self.keep_tokens_separator = keep_tokens_separator
        self.size_conditioning = bool(size_conditioning)
        self.crop_conditioning = bool(crop_conditioning)
        self.min_size = int(min_size)
        self.upscale = bool(upscale)
        self.max_pixels = int(max_pixels)
        self.caption_extensions = tuple(caption_extensions)
        self.default_caption = default_caption
        self.masks = bool(masks)
        self.stats: Counter[str] = Counter()
        self._bad: set[int] = set()
        self.records: list[Record] = self._scan()
        self._members: dict[int, list[int]] = {}  # bucket id -> item indices, ascending
        self._position: list[int] = []  # item index -> its position in its bucket's member list
        for i, r in enumerate(self.records):
            members = self._members.setdefault(r.bucket, [])
            self._position.append(len(members))
            members.append(i)
        if not self.records:
            log.warning("no usable images in %s (%s)", self.source, dict(self.stats))

    # ---------------------------------------------------------------- scanning
    def _entries(self) -> list[dict[str, Any]]:
        """(path, caption?, original_size?, aesthetic_score?) entries from the folder or manifest."""
        src = self.source
        manifest = src / MANIFEST_NAME if src.is_dir() else src
        if manifest.is_file() and manifest.suffix == ".jsonl":
            return self._manifest_entries(manifest)
        if not src.is_dir():
            raise FileNotFoundError(f"{src} is neither a folder nor a .jsonl manifest")
        files = sorted(
            p
            for p in src.rglob("*")
            if p.is_file()
            and p.suffix.lower() in IMAGE_EXTENSIONS
            and not p.name.lower().endswith(MASK_SUFFIX)
        )
        return [{"path": str(p)} for p in files]

    def _manifest_entries(self, manifest: Path) -> list[dict[str, Any]]:
        out = []
        with open(manifest, encoding="utf-8", errors="replace") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    rel = row.get("path", row.get("file_name"))
                    if not isinstance(rel, str):
                        raise ValueError("no 'path'")
                except (json.JSONDecodeError, ValueError, AttributeError) as e:
                    self.stats["manifest_bad_lines"] += 1
                    log.warning("%s:%d: skipped manifest line (%s)", manifest, lineno, e)
                    continue
                p = Path(rel)
                entry: dict[str, Any] = {"path": str(p if p.is_absolute() else manifest.parent / p)}
                caption = row.get("caption", row.get("text"))
                if isinstance(caption, str):
                    entry["caption"] = caption
                if row.get("original_size") is not None:
                    entry["original_size"] = (int(row["original_size"][0]), int(row["original_size"][1]))
                if row.get("aesthetic_score") is not None:
                    entry["aesthetic_score"] = float(row["aesthetic_score"])
                if isinstance(row.get("mask"), str):
                    m = Path(row["mask"])
                    entry["mask"] = str(m if m.is_absolute() else manifest.parent / m)
                out.append(entry)
        return out

    def _sidecar_caption(self, image_path: str) -> str:
        stem = os.path.splitext(image_path)[0]
        for ext in self.caption_extensions:
            cap = stem + ext
            if os.path.isfile(cap):
                text, bad = read_caption_file(cap)
                if bad:
                    self.stats["caption_decode_errors"] += 1
                    log.warning("%s: caption is not valid UTF-8, decoded with replacement characters", cap)
                return text
        self.stats["missing_captions"] += 1
        return self.default_caption

    def _scan(self) -> list[Record]:
        records = []
        for entry in self._entries():
            self.stats["scanned"] += 1
            path = entry["path"]
            try:
                file_size = image_size(path, self.max_pixels)
            except ImageError as e:
                self.stats["skipped_unreadable"] += 1
                log.warning("skipped image: %s", e)
                continue
            original = entry.get("original_size", file_size)
            if min(original) < self.min_size:
                self.stats["skipped_small"] += 1
                continue
            bucket = nearest_bucket(file_size[0], file_size[1], self.buckets)
            if not self.upscale:
                rh, rw = cover_size(file_size[0], file_size[1], self.buckets[bucket])
                if rh > file_size[0] or rw > file_size[1]:
                    self.stats["skipped_upscale"] += 1
                    continue
            caption = entry["caption"] if "caption" in entry else self._sidecar_caption(path)
            mask = None
            if self.masks:
                mask = entry.get("mask") or mask_path_for(path)
                if not os.path.isfile(mask):
                    self.stats["missing_masks"] += 1
                    mask = None
            records.append(
                Record(
                    path=path,
                    caption=caption,
                    file_size=file_size,
                    original_size=original,
                    aesthetic_score=entry.get("aesthetic_score"),
                    bucket=bucket,
                    mask=mask,
                )
            )
        self.stats["usable"] = len(records)
        if self.stats["missing_masks"]:
            log.warning(
                "%d of %d images have no loss mask (all-ones used)", self.stats["missing_masks"], len(records)
            )
        return records

    # ---------------------------------------------------------------- access
    @property
    def bucket_of(self) -> list[int]:
        """Bucket id of every item (input for `BucketBatchSampler`)."""
        return [r.bucket for r in self.records]

    def bucket_counts(self) -> dict[tuple[int, int], int]:
        """How many items each used bucket holds, keyed by (H, W)."""
        return {self.buckets[b]: len(m) for b, m in sorted(self._members.items())}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.records)

    def _load(self, index: int) -> dict[str, Any]:
        rec = self.records[index]
        rng = np.random.default_rng([self.seed, self.epoch, index])
        # Draw in a fixed order so each choice depends only on (seed, epoch, index).
        drop = bool(rng.random() < self.ucg)
        flip = bool(rng.random() < self.flip_prob)
        caption = rec.caption
        if self.shuffle_caption or self.caption_tag_dropout_rate > 0 or self.keep_tokens_separator:
            caption = process_tags(caption, rng, self.shuffle_caption, self.keep_tokens,
                                   self.caption_separator, self.caption_tag_dropout_rate,
                                   self.keep_tokens_separator)
        if drop:
            caption = ""
        image = load_image(rec.path, self.max_pixels)
        pixels, cond = prepare(
            image,
            self.buckets[rec.bucket],
            crop=self.crop,
            flip=flip,
            rng=rng,
            upscale=self.upscale,
            original_size=rec.original_size,
        )
        original_size = cond["original_size"] if self.size_conditioning else cond["target_size"]
        crop_top_left = cond["crop_top_left"] if self.crop_conditioning else (0, 0)
        extra = {}
        if self.masks:
            if rec.mask is None:
                extra["mask"] = torch.ones(1, *pixels.shape[1:])
            else:
                extra["mask"] = prepare_mask(load_mask(rec.mask, image.size[::-1], self.max_pixels), cond)
        return {
            **extra,
            "pixels": pixels,
            "caption": caption,
            "drop_caption": drop,
            "original_size": original_size,
            "crop_top_left": crop_top_left,
            "target_size": cond["target_size"],
            "aesthetic_score": rec.aesthetic_score,
            "flipped": flip,
            "path": rec.path,
            "index": index,
        }

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        if not 0 <= index < len(self.records):
            raise IndexError(index)
        members = self._members[self.records[index].bucket]
        start = self._position[index]
        for k in range(len(members)):
            j = members[(start + k) % len(members)]
            if j in self._bad:
                continue
            try:
                return self._load(j)
            except ImageError as e:
                self._bad.add(j)
                self.stats["load_failures"] += 1
                log.warning("unusable image replaced by the next one of its bucket: %s", e)
        raise RuntimeError(
            f"every image of bucket {self.buckets[self.records[index].bucket]} failed to load "
            f"({len(members)} files, e.g. {self.records[index].path})"
        )


def collate(items: Sequence[dict[str, Any]], default_aesthetic_score: float = 6.0) -> dict[str, Any]:
    """Stack items of one bucket into a batch.

    pixels [B, 3, H, W] float; original_size / crop_top_left / target_size [B, 2] long (h/top first, the
    order of SDXL's add_time_ids); drop_caption / flipped [B] bool; aesthetic_score [B] float with
    `default_aesthetic_score` (sgm's refiner default 6.0) where the data has none; caption / path lists;
    index [B] long.
    """
    if not items:
        raise ValueError("empty batch")
    shapes = {tuple(it["pixels"].shape) for it in items}
    if len(shapes) != 1:
        raise ValueError(f"a batch must come from one bucket, got pixel shapes {sorted(shapes)}")

    def pairs(key: str) -> torch.Tensor:
        return torch.tensor([list(it[key]) for it in items], dtype=torch.long)

    return {
        "pixels": torch.stack([it["pixels"] for it in items]),
        "caption": [it["caption"] for it in items],
        "drop_caption": torch.tensor([bool(it["drop_caption"]) for it in items]),
        "original_size": pairs("original_size"),
        "crop_top_left": pairs("crop_top_left"),
        "target_size": pairs("target_size"),
        "aesthetic_score": torch.tensor(
            [
                default_aesthetic_score if it["aesthetic_score"] is None else it["aesthetic_score"]
                for it in items
            ],
            dtype=torch.float32,
        ),
        "flipped": torch.tensor([bool(it.get("flipped", False)) for it in items]),
        "path": [it["path"] for it in items],
        "index": torch.tensor([int(it["index"]) for it in items], dtype=torch.long),
        **({"mask": torch.stack([it["mask"] for it in items])} if all("mask" in it for it in items) else {}),
    }
