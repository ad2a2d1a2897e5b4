"""Checkpoints that never lose work: exact resume, SIGKILL while a checkpoint is written, SIGTERM, damage."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from sdxl.train import checkpointing as C
from sdxl.train import runner as TR
from sdxl.train.config import TrainConfig
from sdxl.weights.io import open_tensors
from trainsets import coloured_squares

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return coloured_squares(tmp_path_factory.mktemp("data"))


def config_dict(out: Path, data: Path, steps: int, **sections) -> dict:
    d = {
        "model": {"preset": "tiny"},
        "data": {"path": str(data), "resolution": 32, "bucket_step": 8, "ucg": 0.3},
        "train": {"output": str(out), "steps": steps, "batch_size": 2, "grad_accum": 2, "progress": False},
        "optim": {"lr": 1e-3, "warmup_steps": 2, "schedule": "cosine"},
        "ema": {"enabled": True, "decay": 0.9},
        "checkpoint": {"every": 2},
    }
    for name, values in sections.items():
        d.setdefault(name, {}).update(values)
    return d


def same_tensors(a: Path, b: Path) -> bool:
    A, B = open_tensors(a), open_tensors(b)
    return set(A.keys()) == set(B.keys()) and all(torch.equal(A[k], B[k]) for k in A.keys())


# ---------------------------------------------------------------------------------------------- units
def test_flatten_roundtrip_keeps_types():
    state = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(2, 3)}},
             "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.999), "params": [0], "foreach": None}],
             "inf": float("inf")}
    tensors: dict = {}
    tree = C.flatten(state, tensors, "opt")
    back = C.unflatten(json.loads(json.dumps(tree)), tensors)
    assert back["param_groups"][0]["betas"] == (0.9, 0.999) and list(back["state"]) == [0]
    assert torch.equal(back["state"][0]["exp_avg"], state["state"][0]["exp_avg"])
    assert back["inf"] == float("inf")


def test_rng_state_roundtrip():
    saved = C.rng_state()
    a = (torch.rand(3), np.random.rand(3), random.random())
    C.set_rng_state(saved)
    b = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


def test_damaged_or_partial_checkpoints_are_never_picked(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (1, 2, 3):
        state = C.TrainingState(step=step, model={"w": torch.full((4,), float(step))}, rng=[C.rng_state()],
                                scalars={"data": {"epoch": 0, "batch_index": step}})
        C.save_checkpoint(root, state, keep=3)
    assert C.find_checkpoint(root).name == "step-00000003"
    # truncate the newest model file: its size no longer matches state.json -> fall back to step 2
    f = root / "step-00000003" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-4])
    assert C.find_checkpoint(root).name == "step-00000002"
    # a half-written save (temp folder) and a folder without state.json are ignored too
    (root / ".tmp-step-00000004").mkdir()
    (root / ".tmp-step-00000004" / "model.safetensors").write_bytes(b"partial")
    (root / "step-00000005").mkdir()
    (root / "step-00000005" / "model.safetensors").write_bytes(b"x" * 16)
    assert C.find_checkpoint(root).name == "step-00000002"
    assert torch.equal(C.load_checkpoint(C.find_checkpoint(root)).model["w"], torch.full((4,), 2.0))
    # keep: saving step 6 with keep=2 leaves the two newest complete ones and removes the temp debris
    C.save_checkpoint(root, C.TrainingState(step=6, model={"w": torch.zeros(1)}, rng=[]), keep=2)
    names = sorted(p.name for p in root.iterdir())
    assert "step-00000006" in names and ".tmp-step-00000004" not in names and "step-00000001" not in names
    assert (root / "latest").read_text().strip() == "step-00000006"


# ---------------------------------------------------------------------------------------------- exact resume
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_resume_is_bitwise_exact(tmp_path, data, lora):
    """8 steps straight == 4 steps, stop, resume, 4 more: same weights and EMA bit for bit (CPU, workers = 0).

    Covers: model, EMA, AdamW state, warm-up + cosine LR schedule, step, data position (grad accumulation, 2
    epochs), caption dropout, RNG states (the LoRA dropout draws from the global torch RNG).
    """
    extra = {"lora": {"rank": 4, "dropout": 0.2, "text_encoders": True}} if lora else {}
    straight = TR.run(TrainConfig.from_dict(config_dict(tmp_path / "a", data, 8, **extra)))
    first = TR.run(TrainConfig.from_dict(config_dict(tmp_path / "b", data, 8, train={"stop_at": 4}, **extra)))
    assert first.interrupted and first.stop_reason == "stop_at" and first.step == 4
    second = TR.run(TrainConfig.from_dict(config_dict(tmp_path / "b", data, 8, checkpoint={"resume": True},
                                                      **extra)))
    assert second.step == 8 and len(second.losses) == 4
    assert second.losses == straight.losses[4:]
    name = "lora.safetensors" if lora else "model.safetensors"
    assert same_tensors(tmp_path / "a" / name, tmp_path / "b" / name)
    for f in ("ema", "optimizer"):
        assert same_tensors(tmp_path / "a" / "checkpoints" / "step-00000008" / f"{f}.safetensors",
                            tmp_path / "b" / "checkpoints" / "step-00000008" / f"{f}.safetensors")


# ---------------------------------------------------------------------------------------------- processes
def _write_config(path: Path, d: dict) -> Path:
    cfg = TrainConfig.from_dict(d)
    path.write_text(cfg.to_toml())
    return path


def _env(**extra) -> dict:
    # the same thread count as this process: it changes the order of float additions, and the subprocess
    # results are compared bit for bit with runs made here
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()), PYTHONPATH=str(ROOT / "src"))
    env.update(extra)
    return env


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    t0 = time.time()
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"trainer exited early: {proc.communicate()}")
        if time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError(f"timed out waiting for {path}")
        time.sleep(0.05)


def test_sigkill_during_checkpoint_write_resumes_from_previous(tmp_path, data):
    """SIGKILL while checkpoint 4 is half-written: resume picks checkpoint 2, and the finished run equals an
    uninterrupted one bit for bit."""
    steps = 6
    ref = TR.run(TrainConfig.from_dict(config_dict(tmp_path / "ref", data, steps)))
    cfg = _write_config(tmp_path / "run.toml", config_dict(tmp_path / "out", data, steps))
    cmd = [sys.executable, "-m", "sdxl.train", "--config", str(cfg)]
    proc = subprocess.Popen(cmd, env=_env(**{C.SLEEP_HOOK_ENV: "4:60"}), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    ckpts = tmp_path / "out" / "checkpoints"
    _wait_for(ckpts / ".save-hook-4", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert (ckpts / ".tmp-step-00000004" / "model.safetensors").is_file()  # the half-written checkpoint
    assert not (ckpts / "step-00000004").exists()
    assert C.find_checkpoint(ckpts).name == "step-00000002"

    done = subprocess.run(cmd + ["--resume"], env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resumed from" in done.stderr and "step-00000002" in done.stderr
    assert same_tensors(ref.exported, tmp_path / "out" / "model.safetensors")
    assert not (ckpts / ".tmp-step-00000004").exists()  # debris removed by the next save


def test_sigterm_finishes_the_step_saves_and_exits_0(tmp_path, data):
    """SIGTERM mid-run: the step finishes, a checkpoint and the model are saved, exit code 0; `--resume`
    continues from that checkpoint, and 2 steps later the weights, EMA and optimizer state equal those of a
    run that was never stopped, bit for bit."""
    d = config_dict(tmp_path / "out", data, 1000, checkpoint={"every": 0}, train={"log_every": 1})
    cfg = _write_config(tmp_path / "run.toml", d)
    proc = subprocess.Popen([sys.executable, "-m", "sdxl.train", str(cfg)], env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(tmp_path / "out" / "log.jsonl", proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    assert "SIGTERM" in out
    ckpts = tmp_path / "out" / "checkpoints"
    ckpt = C.find_checkpoint(ckpts)
    state = C.load_checkpoint(ckpt)
    assert 1 <= state.step < 1000 and ckpt.name == C.step_name(state.step)
    assert (tmp_path / "out" / "model.safetensors").is_file()

    until = state.step + 2
    done = subprocess.run([sys.executable, "-m", "sdxl.train", str(cfg), "--resume",
                           "--set", f"train.stop_at={until}"], env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resumed from" in done.stderr and ckpt.name in done.stderr
    assert C.find_checkpoint(ckpts).name == C.step_name(until)
    d["train"].update(output=str(tmp_path / "straight"), stop_at=until)
    TR.run(TrainConfig.from_dict(d))
    for f in ("model", "ema", "optimizer"):
        assert same_tensors(tmp_path / "straight" / "checkpoints" / C.step_name(until) / f"{f}.safetensors",
                            ckpts / C.step_name(until) / f"{f}.safetensors"), f
