"""Training on a full disk: the checkpoint being written when the disk fills is removed, the previous complete
checkpoint is untouched, the run stops with one message naming the folder, the errno text and the free
space, and `--resume` after freeing space finishes with the weights of an uninterrupted run, bit for bit.

Policy (docs/RELIABILITY.md, section 7): a failed checkpoint write STOPS the run (exit code 1). Going on
without checkpoints would risk losing unbounded work and the final export would meet the same full disk; a
stop loses at most `checkpoint.every` steps, which the resumed run redoes identically.

The full disk is made two ways:
  - always (any user, CI): `Disk` wraps the one write path, `sdxl.files.atomic_write` (used by
    `save_safetensors` and `atomic_write_bytes`, so by every checkpoint file and `latest`) and raises
    OSError(ENOSPC) once a byte budget is used up, after writing the bytes that still fit, as a kernel does;
  - as root, where `mount -t tmpfs` works (CI runs as root): a real tmpfs a checkpoint and a half in size,
    remounted larger to "free space". Elsewhere the same CLI test runs with `Disk` in the subprocess.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
import torch

import sdxl.files as atomic_files
from sdxl.train import checkpointing as C
from sdxl.train import runner as TR
from sdxl.train.config import TrainConfig, TrainingError
from sdxl.weights.io import open_tensors
from trainsets import coloured_squares

ROOT = Path(__file__).resolve().parents[1]
STEPS = 6
REAL_ATOMIC_WRITE = atomic_files.atomic_write


class Disk:
    """The bytes written through `sdxl.files.atomic_write`, per file, and an optional capacity beyond
    which a write fails with ENOSPC (the real `atomic_write` then deletes its temp file)."""

    def __init__(self, capacity: int | None = None):
        self.capacity = capacity
        self.used = 0
        self.files: dict[str, int] = defaultdict(int)

    def install(self, setattr_=None) -> None:
        real = REAL_ATOMIC_WRITE
        disk = self

        class File:
            def __init__(self, f, path):
                self.f, self.path = f, str(path)

            def write(self, data) -> int:
                n = len(data)
                room = n if disk.capacity is None else max(0, disk.capacity - disk.used)
                if n > room:
                    self.f.write(bytes(data[:room]))
                    disk.used += room
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.path)
                disk.used += n
                disk.files[self.path] += n
                return self.f.write(data)

            def __getattr__(self, name):  # flush, fileno, ...
                return getattr(self.f, name)

        def atomic_write(path, write):
            return real(path, lambda f: write(File(f, path)))

        (setattr_ or setattr)(atomic_files, "atomic_write", atomic_write)


def config(out: Path, data: Path, resume: bool = False) -> TrainConfig:
    return TrainConfig.from_dict({
        "model": {"preset": "tiny"},
        "data": {"path": str(data), "resolution": 32, "bucket_step": 8, "ucg": 0.3},
        "train": {"output": str(out), "steps": STEPS, "batch_size": 2, "progress": False},
        "optim": {"lr": 1e-3, "warmup_steps": 2, "schedule": "cosine"},
        "ema": {"enabled": True, "decay": 0.9},
        "checkpoint": {"every": 2, "keep": 3, "resume": resume},
    })


def same_tensors(a: Path, b: Path) -> bool:
    A, B = open_tensors(a), open_tensors(b)
    return set(A.keys()) == set(B.keys()) and all(torch.equal(A[k], B[k]) for k in A.keys())


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run on an unlimited `Disk`: its exported model and the size of one checkpoint."""
    tmp = tmp_path_factory.mktemp("full_disk_ref")
    data = coloured_squares(tmp / "data")
    disk = Disk()
    with pytest.MonkeyPatch.context() as mp:
        disk.install(mp.setattr)
        result = TR.run(config(tmp / "ref", data))
    ckpt_bytes = sum(n for p, n in disk.files.items() if f"{C.TMP_PREFIX}step-00000002" in p)
    return data, result, tmp / "ref", ckpt_bytes


def check_after_failure(ckpts: Path, ref_dir: Path) -> None:
    """Nothing of checkpoint 4 is left, checkpoint 2 is intact (byte-identical to the reference's) and is
    what resume picks."""
    names = sorted(p.name for p in ckpts.iterdir())
    assert names == ["latest", "step-00000002"], names  # no .tmp-step-00000004, no temp file of `latest`
    assert (ckpts / "latest").read_text().strip() == "step-00000002"
    assert C.find_checkpoint(ckpts).name == "step-00000002"
    ours, theirs = ckpts / "step-00000002", ref_dir / "checkpoints" / "step-00000002"
    assert sorted(p.name for p in ours.iterdir()) == sorted(p.name for p in theirs.iterdir())
    for name in ("model", "ema", "optimizer", "scalars"):
        if (theirs / f"{name}.safetensors").exists():
            a, b = (d / f"{name}.safetensors" for d in (ours, theirs))
            assert a.read_bytes() == b.read_bytes(), name
    # state.json: equal but for the time of the save, the output folder inside the saved config and the RNG
    # states (a subprocess has drawn other numbers from python's `random` while importing; the resumed run's
    # final weights show that the RNG states saved are the right ones)
    a, b = (json.loads((d / "state.json").read_text()) for d in (ours, theirs))
    for doc in (a, b):
        del doc["saved_at"], doc["rng"], doc["files"]["rng.safetensors"]
        del doc["scalars"]["__dict__"]["config"]["__dict__"]["train"]["__dict__"]["output"]
    assert a == b


def test_enospc_while_writing_a_checkpoint_stops_cleanly_and_resume_continues(reference, tmp_path,
                                                                             monkeypatch):
    data, ref, ref_dir, ckpt_bytes = reference
    assert ckpt_bytes > 10_000  # the tiny model's checkpoint: weights, EMA, AdamW state
    # room for checkpoint 2 and `latest` (a few bytes), then the disk fills half-way through checkpoint 4
    disk = Disk(capacity=ckpt_bytes + 64 + ckpt_bytes // 2)
    disk.install(monkeypatch.setattr)
    out = tmp_path / "out"
    ckpts = out / "checkpoints"
    with pytest.raises(TrainingError) as info:
        TR.run(config(out, data))
    message = str(info.value)
    assert "\n" not in message
    for part in ("cannot write checkpoint step-00000004", str(ckpts), "No space left on device", "MiB free",
                 "newest complete one is step-00000002", "--resume"):
        assert part in message, message
    assert disk.used == disk.capacity  # it really wrote until the disk was full
    check_after_failure(ckpts, ref_dir)
    assert not (out / "model.safetensors").exists()  # no export from a failed run

    Disk().install(monkeypatch.setattr)  # space freed (replaces the limited one)
    done = TR.run(config(out, data, resume=True))
    assert done.step == STEPS and done.losses == ref.losses[2:]
    assert same_tensors(ref.exported, out / "model.safetensors")
    for f in ("model", "ema", "optimizer"):
        assert same_tensors(ref_dir / "checkpoints" / "step-00000006" / f"{f}.safetensors",
                            ckpts / "step-00000006" / f"{f}.safetensors")


@contextlib.contextmanager
def small_tmpfs(path: Path, size: int):
    """A real tmpfs of `size` bytes at `path` and a function that enlarges it ("free space"), or None where
    mounting is not allowed (not root)."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        yield None
        return
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                             capture_output=True).returncode == 0

    def grow(new_size: int) -> None:
        subprocess.run(["mount", "-o", f"remount,size={new_size}", "tmpfs", str(path)], check=True)
        assert shutil.disk_usage(path).total >= new_size  # rounded up to whole pages

    try:
        yield grow if mounted else None
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(path)], check=False)


# the subprocess trainer with `Disk` installed first (where no tmpfs can be mounted)
INJECT = ("import sys; sys.path.insert(0, {tests!r}); from test_train_full_disk import Disk; "
          "Disk(capacity={capacity}).install(); from sdxl.train.__main__ import main; "
          "sys.exit(main(sys.argv[1:]))")


def test_full_disk_in_a_real_process_prints_one_line_and_resume_finishes(reference, tmp_path):
    """Through `python -m sdxl.train`: exit code 1 and one `error:` line, no traceback; then `--resume`."""
    data, ref, ref_dir, ckpt_bytes = reference
    mnt = tmp_path / "mnt"
    # tmpfs counts whole 4 KiB pages for every file (config.toml, log.jsonl, latest): a bit of slack
    with small_tmpfs(mnt, size=ckpt_bytes + ckpt_bytes // 2 + 16 * 4096) as grow:
        out = mnt / "out"
        cfg_path = tmp_path / "run.toml"
        cfg_path.write_text(config(out, data).to_toml())
        env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()), PYTHONPATH=str(ROOT / "src"))
        if grow is not None:  # a real full filesystem: the kernel says ENOSPC
            cmd = [sys.executable, "-m", "sdxl.train"]
        else:
            code = INJECT.format(tests=str(ROOT / "tests"), capacity=ckpt_bytes + 64 + ckpt_bytes // 2)
            cmd = [sys.executable, "-c", code]
        failed = subprocess.run(cmd + ["--config", str(cfg_path)], env=env, capture_output=True, text=True,
                                timeout=300)
        assert failed.returncode == 1, failed.stderr[-3000:]
        assert "Traceback" not in failed.stderr
        errors = [line for line in failed.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "No space left on device" in errors[0], failed.stderr[-3000:]
        assert "step-00000004" in errors[0] and "step-00000002" in errors[0] and str(out) in errors[0]
        check_after_failure(out / "checkpoints", ref_dir)

        if grow is not None:
            grow(4 * ckpt_bytes + 2**20)  # free space: three checkpoints (keep = 3) and the exported model
            cmd = [sys.executable, "-m", "sdxl.train"]  # `Disk` no longer limits anything
        else:
            cmd = [sys.executable, "-c", INJECT.format(tests=str(ROOT / "tests"), capacity=None)]
        done = subprocess.run(cmd + ["--config", str(cfg_path), "--resume"], env=env, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "resumed from" in done.stderr and "step-00000002" in done.stderr
        assert same_tensors(ref.exported, out / "model.safetensors")
        print("real tmpfs" if grow is not None else "injected ENOSPC (no tmpfs here)")
