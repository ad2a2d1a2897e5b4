"""Aspect-ratio buckets and a sampler that draws every batch from one bucket.

SDXL's last training stage (paper §2.3, Appendix I) trains on images of many aspect ratios. Images are
grouped into "buckets": a fixed list of (height, width) sizes, all with roughly the same pixel count
(1024 x 1024) and sides that are multiples of 64. Each image goes to the bucket whose aspect ratio is
closest to its own, is resized to cover the bucket and cropped to it, and every batch is drawn from a
single bucket so the batch can be stacked into one tensor. The bucket size is passed to the model as the
`target_size` conditioning.

This module holds the paper's table, a rule to scale the same aspect ratios to another pixel area
(256 x 256 for small experiments), the nearest-bucket rule, and `BucketBatchSampler`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from torch.utils.data import Sampler

# The paper's Appendix I bucket table for a 1024^2 pixel area, as (height, width), sorted by aspect ratio
# h / w. The table is not symmetric: (704, 1344) is present but (1344, 704) is not.
SDXL_BUCKETS_1024: tuple[tuple[int, int], ...] = (
    (512, 2048), (512, 1984), (512, 1920), (512, 1856),
    (576, 1792), (576, 1728), (576, 1664),
    (640, 1600), (640, 1536),
    (704, 1472), (704, 1408), (704, 1344),
    (768, 1344), (768, 1280),
    (832, 1216), (832, 1152),
    (896, 1152), (896, 1088),
    (960, 1088), (960, 1024),
    (1024, 1024),
    (1024, 960),
    (1088, 960), (1088, 896),
    (1152, 896), (1152, 832),
    (1216, 832),
    (1280, 768),
    (1344, 768),
    (1408, 704), (1472, 704),
    (1536, 640), (1600, 640),
    (1664, 576), (1728, 576), (1792, 576),
    (1856, 512), (1920, 512), (1984, 512), (2048, 512),
)  # fmt: skip


def _log_aspect(h: float, w: float) -> float:
    return math.log(h / w)


def scaled_buckets(
    base_resolution: int,
    step: int = 64,
    min_size: int | None = None,
    max_size: int | None = None,
) -> list[tuple[int, int]]:
    """The paper's aspect ratios, re-sized to a pixel area of about `base_resolution ** 2`.

    Both sides of every (H, W) of `SDXL_BUCKETS_1024` are multiplied by `base_resolution / 1024` (this
    keeps the aspect ratio and scales the area, which is within a few percent of 1024^2 in the table) and
    rounded to the nearest multiple of `step` (at least one step). Buckets that collapse to the same size
    (common at small areas with a coarse step) are kept once. Buckets with a side below `min_size` or
    above `max_size` are dropped. The result is sorted by aspect ratio h / w, like the table.

    With base 1024 and a step that divides 64 this returns the paper's table exactly. At base 256 step 8
    keeps all 40 ratios (the table divided by 4); step 64 gives 11 coarse buckets (128 x 512 ... 512 x 128)
    whose areas are off by up to 25% because of the rounding.
    """
    if base_resolution <= 0 or step <= 0:
        raise ValueError("base_resolution and step must be positive")
    scale = base_resolution / 1024.0
    seen: set[tuple[int, int]] = set()
    out: list[tuple[int, int]] = []
    for h0, w0 in SDXL_BUCKETS_1024:
        # floor(x + 0.5) rounds halves up; Python's round() would round them to even.
        h = max(step, int(math.floor(h0 * scale / step + 0.5)) * step)
        w = max(step, int(math.floor(w0 * scale / step + 0.5)) * step)
        if min_size is not None and min(h, w) < min_size:
            continue
        if max_size is not None and max(h, w) > max_size:
            continue
        if (h, w) not in seen:
            seen.add((h, w))
            out.append((h, w))
    out.sort(key=lambda hw: (hw[0] / hw[1], hw[0] * hw[1]))
    return out


def nearest_bucket(h: int, w: int, buckets: Sequence[tuple[int, int]]) -> int:
    """Index of the bucket whose aspect ratio is closest to h / w.

    The distance is |log(h / w) - log(H / W)|, so a 2:1 image is as far from 1:1 as a 1:2 image is.
    Ties go to the earlier bucket in the list.
    """
    if h <= 0 or w <= 0:
        raise ValueError(f"image size must be positive, got {(h, w)}")
    if not buckets:
        raise ValueError("empty bucket list")
    target = _log_aspect(h, w)
    dists = [abs(_log_aspect(bh, bw) - target) for bh, bw in buckets]
    return int(np.argmin(dists))


class BucketBatchSampler(Sampler[list[int]]):
    """Yields batches of dataset indices; every batch comes from ONE bucket.

    `bucket_of[i]` is the bucket id of dataset item i (a negative id leaves the item out).

    Order of one epoch, a pure function of (seed, epoch, bucket_of, batch_size, drop_last, shuffle):
      1. the indices of each bucket are shuffled (a numpy generator seeded with [seed, epoch]);
      2. each bucket is cut into batches of `batch_size`; a bucket's last, smaller batch is kept unless
         `drop_last`;
      3. the batches of all buckets are shuffled together, so consecutive steps usually see different
         buckets (the paper alternates buckets every step; a random order is the common approximation);
      4. DDP sharding: rank r takes batches r, r + world_size, ... . Every rank must run the same number of
         steps, so the list is first made a multiple of `world_size`: with `drop_last` the tail is cut
         (ranks then hold disjoint batches), otherwise the first batches are repeated as padding (as
         torch's DistributedSampler does; only the padding batches appear twice).
    With `shuffle=False` steps 1 and 3 are skipped (buckets in id order, indices ascending).

    Resuming: the sampler remembers (epoch, batch_index), the next batch of this rank to yield.
    `state_dict()` / `load_state_dict()` save and restore it; the next iteration continues the same
    order from that batch. When an iteration runs to the end the sampler moves to the next epoch.
    Note: a DataLoader asks for batches ahead of the training loop (prefetching), so `state_dict()` may
    be a few batches ahead of what the trainer consumed; a trainer that counts its own steps can instead
    call `load_state_dict({"epoch": e, "batch_index": steps_done_in_epoch})`.

    `len(sampler)` is the number of batches this rank gets in a full epoch.
    """

    def __init__(
        self,
        bucket_of: Sequence[int],
        batch_size: int,
        seed: int = 0,
        drop_last: bool = False,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ):
        if batch_size <= 0:
            raise ValueError("batch_size must be positive")
        if world_size <= 0 or not 0 <= rank < world_size:
            raise ValueError(f"bad rank/world_size: {rank}/{world_size}")
        self.bucket_of = [int(b) for b in bucket_of]
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.shuffle = bool(shuffle)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.epoch = 0
        self.batch_index = 0

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` from its first batch."""
        self.epoch = int(epoch)
        self.batch_index = 0

    def _all_batches(self, epoch: int) -> list[list[int]]:
        """Every batch of the epoch, all ranks, before sharding."""
        rng = np.random.default_rng([self.seed, epoch])
        groups: dict[int, list[int]] = {}
        for i, b in enumerate(self.bucket_of):
            if b >= 0:
                groups.setdefault(b, []).append(i)
        batches: list[list[int]] = []
        for b in sorted(groups):
            idx = np.asarray(groups[b], dtype=np.int64)
            if self.shuffle:
                idx = idx[rng.permutation(len(idx))]
            for start in range(0, len(idx), self.batch_size):
                chunk = idx[start : start + self.batch_size]
                if len(chunk) < self.batch_size and self.drop_last:
                    continue
                batches.append([int(i) for i in chunk])
        if self.shuffle and batches:
            batches = [batches[int(j)] for j in rng.permutation(len(batches))]
        return batches

    def batches_for_rank(self, epoch: int) -> list[list[int]]:
        """The batches this rank yields in `epoch`, in order."""
        batches = self._all_batches(epoch)
        ws = self.world_size
        if ws > 1:
            if self.drop_last:
                batches = batches[: len(batches) // ws * ws]
            elif batches and len(batches) % ws:
                pad = ws - len(batches) % ws
                batches = batches + [batches[j % len(batches)] for j in range(pad)]
        return batches[self.rank :: ws]

    def __len__(self) -> int:
        return len(self.batches_for_rank(self.epoch))

    def __iter__(self) -> Iterator[list[int]]:
        batches = self.batches_for_rank(self.epoch)
        while self.batch_index < len(batches):
            batch = batches[self.batch_index]
            self.batch_index += 1
            yield batch
        self.epoch += 1
        self.batch_index = 0

    def state_dict(self) -> dict[str, Any]:
        """Position (epoch, next batch) plus the settings that define the order, for checking on load."""
        return {
            "epoch": self.epoch,
            "batch_index": self.batch_index,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the position. Refuses a state saved with a different seed/batch size/world size,
        because the same position would then point into a different order."""
        for key in ("seed", "batch_size", "world_size"):
            if key in state and int(state[key]) != getattr(self, key):
                raise ValueError(
                    f"sampler state has {key}={state[key]}, this sampler has {getattr(self, key)}"
                )
        self.epoch = int(state["epoch"])
        self.batch_index = int(state["batch_index"])
