"""Aspect buckets: the paper's table, scaling, nearest bucket, and the one-bucket-per-batch sampler."""

import math

import numpy as np
import pytest

from sdxl.data.buckets import SDXL_BUCKETS_1024, BucketBatchSampler, nearest_bucket, scaled_buckets


def test_paper_table_has_40_entries_sorted_and_on_the_64_grid():
    t = SDXL_BUCKETS_1024
    assert len(t) == 40 and len(set(t)) == 40
    assert all(h % 64 == 0 and w % 64 == 0 for h, w in t)
    ratios = [h / w for h, w in t]
    assert ratios == sorted(ratios)
    # spot values from Appendix I (H, W)
    assert t[0] == (512, 2048) and t[-1] == (2048, 512)
    for hw in [(512, 1984), (576, 1664), (704, 1344), (768, 1344), (832, 1216), (1024, 1024), (1024, 960),
               (1216, 832), (1344, 768), (1472, 704), (1600, 640), (1792, 576), (1856, 512)]:  # fmt: skip
        assert hw in t
    # pixel count kept near 1024^2 (the smallest is 576 x 1664 = 0.91 of it)
    assert all(0.9 < h * w / 1024**2 <= 1.0 for h, w in t)


def test_paper_table_is_not_symmetric():
    # SDXL_SPEC §7: 704x1344 (0.52) exists but 1344x704 (1.91) does not.
    assert (704, 1344) in SDXL_BUCKETS_1024
    assert (1344, 704) not in SDXL_BUCKETS_1024
    asym = [(h, w) for h, w in SDXL_BUCKETS_1024 if (w, h) not in SDXL_BUCKETS_1024]
    assert asym == [(704, 1344)]


def test_scaled_buckets_at_1024_reproduce_the_table():
    assert scaled_buckets(1024, 64) == list(SDXL_BUCKETS_1024)
    assert scaled_buckets(1024, 8) == list(SDXL_BUCKETS_1024)


def test_scaled_buckets_256_step_8_is_the_quarter_table():
    b = scaled_buckets(256, step=8)
    assert b == [(h // 4, w // 4) for h, w in SDXL_BUCKETS_1024]
    assert all(h % 8 == 0 and w % 8 == 0 for h, w in b)
    assert all(abs(h * w / 256**2 - 1) < 0.1 for h, w in b)


def test_scaled_buckets_256_step_64_dedups_coarse_sizes():
    b = scaled_buckets(256, step=64)
    assert b == [(128, 512), (128, 448), (192, 384), (192, 320), (256, 320), (256, 256),
                 (320, 256), (320, 192), (384, 192), (448, 128), (512, 128)]  # fmt: skip
    assert len(set(b)) == len(b)
    assert all(h % 64 == 0 and w % 64 == 0 for h, w in b)
    ratios = [h / w for h, w in b]
    assert ratios == sorted(ratios)


def test_scaled_buckets_min_max_filter():
    b = scaled_buckets(256, step=8, min_size=160, max_size=400)
    assert b and all(160 <= min(hw) and max(hw) <= 400 for hw in b)
    assert len(b) < 40


def test_nearest_bucket_by_log_aspect():
    b = list(SDXL_BUCKETS_1024)
    assert b[nearest_bucket(1000, 1000, b)] == (1024, 1024)
    assert b[nearest_bucket(100, 1000, b)] == (512, 2048)  # beyond the table: the extreme bucket
    assert b[nearest_bucket(1216, 832, b)] == (1216, 832)  # exact ratio
    rng = np.random.default_rng(0)
    for _ in range(200):
        h, w = (int(v) for v in rng.integers(16, 4000, size=2))
        k = nearest_bucket(h, w, b)
        best = min(abs(math.log(h / w) - math.log(bh / bw)) for bh, bw in b)
        assert abs(math.log(h / w) - math.log(b[k][0] / b[k][1])) == pytest.approx(best)


def _bucket_of(n: int, n_buckets: int, seed: int = 0) -> list[int]:
    return [int(x) for x in np.random.default_rng(seed).integers(0, n_buckets, size=n)]


def test_sampler_batches_are_single_bucket_and_cover_the_epoch():
    bucket_of = _bucket_of(103, 5)
    s = BucketBatchSampler(bucket_of, batch_size=4, seed=1)
    batches = list(s)
    assert len(batches) == sum(math.ceil(bucket_of.count(b) / 4) for b in range(5))
    for batch in batches:
        assert 1 <= len(batch) <= 4
        assert len({bucket_of[i] for i in batch}) == 1
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(103))


def test_sampler_drop_last_gives_full_batches_and_skips_negative_ids():
    bucket_of = _bucket_of(50, 3)
    bucket_of[7] = -1
    s = BucketBatchSampler(bucket_of, batch_size=4, seed=0, drop_last=True)
    batches = list(s)
    assert all(len(b) == 4 for b in batches)
    assert all(7 not in b for b in batches)


def test_sampler_is_deterministic_per_seed_and_epoch():
    bucket_of = _bucket_of(60, 4)
    a = BucketBatchSampler(bucket_of, 3, seed=5)
    b = BucketBatchSampler(bucket_of, 3, seed=5)
    e0, e1 = list(a), list(a)  # iterating advances the epoch
    assert e0 == list(b) and e1 == list(b)
    assert e0 != e1
    assert list(BucketBatchSampler(bucket_of, 3, seed=6)) != e0
    c = BucketBatchSampler(bucket_of, 3, seed=5)
    c.set_epoch(1)
    assert list(c) == e1


def test_sampler_no_shuffle_is_in_bucket_order():
    bucket_of = [1, 0, 1, 0, 0]
    assert list(BucketBatchSampler(bucket_of, 2, shuffle=False)) == [[1, 3], [4], [0, 2]]


def test_sampler_resume_continues_the_same_order():
    bucket_of = _bucket_of(80, 4)
    ref = BucketBatchSampler(bucket_of, 3, seed=2)
    full = list(ref) + list(ref)  # two epochs

    run = BucketBatchSampler(bucket_of, 3, seed=2)
    it = iter(run)
    first = [next(it) for _ in range(7)]
    state = run.state_dict()
    assert state["epoch"] == 0 and state["batch_index"] == 7

    resumed = BucketBatchSampler(bucket_of, 3, seed=2)
    resumed.load_state_dict(state)
    rest = list(resumed) + list(resumed)
    assert first + rest == full

    with pytest.raises(ValueError):
        BucketBatchSampler(bucket_of, 3, seed=3).load_state_dict(state)


@pytest.mark.parametrize("drop_last", [True, False])
def test_sampler_ddp_sharding(drop_last):
    bucket_of = _bucket_of(101, 4, seed=3)
    ws = 3
    shards = [list(BucketBatchSampler(bucket_of, 4, seed=9, drop_last=drop_last, rank=r, world_size=ws))
              for r in range(ws)]  # fmt: skip
    # same number of steps on every rank, each batch from one bucket
    assert len({len(s) for s in shards}) == 1
    assert all(len({bucket_of[i] for i in b}) == 1 for s in shards for b in s)
    assert len(shards[0]) == len(BucketBatchSampler(bucket_of, 4, seed=9, drop_last=drop_last, world_size=ws))
    single = list(BucketBatchSampler(bucket_of, 4, seed=9, drop_last=drop_last))
    union = [tuple(b) for s in shards for b in s]
    if drop_last:
        # disjoint batches and indices; together exactly the single-process batches minus the cut tail
        flat = [i for b in union for i in b]
        assert len(flat) == len(set(flat))
        assert sorted(union) == sorted(tuple(b) for b in single[: len(single) // ws * ws])
    else:
        # every index is seen; only the padding batches (fewer than world_size) are repeated
        assert {i for b in union for i in b} == set(range(101))
        assert len(union) - len(set(union)) < ws
        assert set(union) == {tuple(b) for b in single}
