"""The training loop every trainer shares (`TrainerBase`): gradient accumulation, clipping, mixed precision,
NaN skipping, EMA, LR schedule, logging (log.jsonl, TensorBoard, a progress bar), periodic and
signal-triggered checkpoints, and exact resume.
"""

from __future__ import annotations

import abc
import contextlib
import json
import logging
import math
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import Tensor, nn

from ..errors import CheckpointError
from . import checkpointing as C
from .config import ConfigError, TrainConfig, TrainingError
from .distributed import DistInfo, all_true, any_true, assign_full, ddp, full_tensor, shard_fsdp
from .feed import BatchStream
from .loraplus import loraplus_groups
from .optim import EMA, build_optimizer, build_scheduler

log = logging.getLogger("sdxl.train")

SAVE_DTYPES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}  # train.save_dtype


def tensorboard_writer(mode: str):
    """`torch.utils.tensorboard.SummaryWriter` for `train.tensorboard` = `auto` / `on`, or None (`off`, or
    `auto` without the package). `on` without the package is a ConfigError."""
    if mode == "off":
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter  # lazy: optional package (tensorboard)
    except ImportError as e:
        if mode == "on":
            raise ConfigError(f"train.tensorboard = \"on\" needs the tensorboard package ({e}): pip "
                              "install tensorboard (or sdxl[train]), or set train.tensorboard to auto or "
                              "off") from None
        return None
    return SummaryWriter


class MetricsLog:
    """Scalars to `<output>/log.jsonl` (always) and to TensorBoard (`<output>/tb`) through `writer` (the
    class `tensorboard_writer` returns; None: no TensorBoard)."""

    def __init__(self, folder: Path, enabled: bool, writer=None):
        self.enabled = enabled
        self.path = folder / "log.jsonl"
        self.tb = writer(str(folder / "tb")) if enabled and writer is not None else None

    def write(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        row = {"step": step, "time": round(time.time(), 3), **values}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, step)

    def image(self, tag: str, image, step: int) -> None:
        """An [H, W, 3] uint8 image to TensorBoard (nothing without it)."""
        if self.enabled and self.tb is not None:
            self.tb.add_image(tag, image, step, dataformats="HWC")

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


class StopSignal:
    """SIGINT / SIGTERM set a flag; the loop finishes its step, saves and exits normally (status 0).

    A second SIGINT while saving falls through to Python's default handler (KeyboardInterrupt), so an
    impatient user can still break out; the checkpoint being written is then left as a `.tmp-*` folder and
    ignored.
    """

    def __init__(self):
        self.requested = False
        self.signal_name = ""
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)
        self.requested = True
        self.signal_name = signal.Signals(signum).name
        log.warning("%s received: finishing this step, saving, then exiting", self.signal_name)

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _progress_bar(enabled: bool, total: int, start: int):
    if not enabled:
        return None
    bar = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[ips]:.2f} it/s"),
                   TextColumn("ETA"), TimeRemainingColumn())
    bar.start()
    bar.add_task("train", total=total, completed=start, loss=float("nan"), ips=0.0)
    return bar


@dataclass
class TrainResult:
    """What a finished (or interrupted) run reports."""

    output: Path
    step: int
    exported: Path | None
    interrupted: bool = False
    stop_reason: str = ""  # "SIGINT" / "SIGTERM" / "stop_at" when interrupted
    nan_steps: int = 0
    losses: list[float] = field(default_factory=list)  # mean loss of every optimizer step of THIS process run
    images_per_second: float = 0.0


class TrainerBase(abc.ABC):
    """The loop every trainer shares: gradient accumulation, clipping, mixed precision, NaN skipping, EMA,
    LR schedule, logging, periodic and signal-triggered checkpoints, and exact resume.

    Subclasses provide `build()` (models, `self.module` holding every trained parameter, the data) and
    `compute_loss(batch, step)`, and may override `export()`, `sample()`, `extra_state()`,
    `load_extra_state()` and `after_optimizer_step()`.
    """

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.info = DistInfo()
        self.output = Path(cfg.train.output)
        self.module: nn.Module | None = None  # unwrapped training module
        self.wrapped: nn.Module | None = None  # DDP / FSDP view of it (or the module itself)
        self.dataset = None
        self.sampler = None
        self.stream: BatchStream | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler = None
        self.scaler = None
        self.ema: EMA | None = None
        self.step = 0
        self.nan_steps = 0
        self.consecutive_nan = 0
        self.samples_seen = 0
        self.log = None

    # ------------------------------------------------------------------ hooks
    @abc.abstractmethod
    def build(self) -> None:
        """Models, `self.module` (every trained parameter), `self.dataset`, `self.sampler`, `self.stream`."""

    @abc.abstractmethod
    def param_groups(self) -> list[dict[str, Any]]:
        """Optimizer parameter groups (each with its learning rate)."""

    @abc.abstractmethod
    def compute_loss(self, batch: dict[str, Any], step: int) -> tuple[Tensor, dict[str, float]]:
        """Loss of one micro-batch of optimizer step `step` (0-based); `batch["epoch"]` is its epoch."""

    def after_optimizer_step(self, batch: dict[str, Any]) -> dict[str, float]:
        return {}

    def extra_state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """(more tensors for model.safetensors, more JSON scalars) to checkpoint; collective-safe."""
        return {}, {}

    def load_extra_state(self, tensors: dict[str, Tensor], scalars: dict[str, Any]) -> None:  # noqa: B027
        """Restore what `extra_state` saved (nothing by default)."""

    def frozen_state(self) -> dict[str, Tensor]:
        """Frozen weights with no file to reload them from (checkpointed under `frozen.`)."""
        return {}

    def load_frozen_state(self, tensors: dict[str, Tensor]) -> None:  # noqa: B027
        """Restore what `frozen_state` saved (nothing by default)."""

    def export(self) -> Path | None:
        return None

    def save_dtype(self) -> torch.dtype | None:
        """The dtype of the exported weights (`train.save_dtype`; None keeps float32)."""
        return SAVE_DTYPES[self.cfg.train.save_dtype]

    def sample(self) -> None:  # noqa: B027
        """Write sample images (nothing by default)."""

    def validate(self) -> None:  # noqa: B027
        """Log a validation loss (nothing by default); every process calls it at `validation.every`."""

    # ------------------------------------------------------------------ setup
    def trainable(self) -> dict[str, Tensor]:
        return {n: p for n, p in self.module.named_parameters() if p.requires_grad}

    def wrap(self) -> None:
        """DDP or FSDP around `self.module` when several processes run; the module itself otherwise."""
        if not self.info.distributed:
            self.wrapped = self.module
            return
        if self.cfg.dist.strategy == "fsdp":
            self.wrapped = shard_fsdp(self.module, self.fsdp_units(self.module))
        else:
            self.wrapped = ddp(self.module, self.info)

    def fsdp_units(self, module: nn.Module) -> list[nn.Module]:
        """The blocks FSDP shards one by one before the root (none: the root alone)."""
        return []

    def setup(self) -> None:
        cfg = self.cfg
        if cfg.train.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
        tb_writer = tensorboard_writer(cfg.train.tensorboard)  # before the (slow) model build
        self.build()
        self.wrap()
        self.optimizer = build_optimizer(loraplus_groups(self.param_groups(), self.module, cfg.lora), cfg)
        self.scheduler = build_scheduler(self.optimizer, cfg)
        if cfg.train.mixed_precision == "fp16":
            self.scaler = torch.amp.GradScaler(self.info.device.type)
        if cfg.ema.enabled:
            self.ema = EMA(self.trainable(), cfg.ema.decay)
        self.log = MetricsLog(self.output, self.info.is_main, tb_writer)
        if self.info.is_main:
            self.output.mkdir(parents=True, exist_ok=True)
            (self.output / "config.toml").write_text(cfg.to_toml())
        if cfg.checkpoint.resume:
            path = C.find_checkpoint(self.output / "checkpoints")
            if path is not None:
                self.resume(path)
            elif self.info.is_main:
                log.info("resume: no complete checkpoint in %s, starting fresh", self.output / "checkpoints")

    # ------------------------------------------------------------------ checkpoints
    def gather_state(self) -> C.TrainingState | None:
        """Collect the full training state on rank 0 (collectives: every process calls this)."""
        from torch.distributed.checkpoint.state_dict import (  # lazy: ~0.7 s of import, at the first save
            StateDictOptions,
            get_optimizer_state_dict,
        )

        model = {n: full_tensor(p.detach()).to("cpu").clone() for n, p in self.trainable().items()}
        extra_tensors, extra_scalars = self.extra_state()
        model.update(extra_tensors)
        model.update({f"frozen.{k}": v for k, v in self.frozen_state().items()})
        ema = self.ema.state_dict() if self.ema is not None else None
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        optim = get_optimizer_state_dict(self.module, self.optimizer, options=opts)
        rng = [C.rng_state()]
        if self.info.distributed:
            everyone: list[Any] = [None] * self.info.world_size
            dist.all_gather_object(everyone, rng[0])
            rng = everyone
        if not self.info.is_main:
            return None
        scalars = {
            "data": self.stream.state_dict() if self.stream is not None else {},
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "nan_steps": self.nan_steps,
            "consecutive_nan": self.consecutive_nan,
            "samples_seen": self.samples_seen,
            "ema_updates": self.ema.updates if self.ema is not None else 0,
            "world_size": self.info.world_size,
            "config": self.cfg.to_dict(),
            **extra_scalars,
        }
        return C.TrainingState(step=self.step, model=model, ema=ema, optimizer=optim, rng=rng,
                               scalars=scalars)

    def save(self) -> Path | None:
        state = self.gather_state()
        path, error = None, None
        if self.info.is_main:
            try:
                path = C.save_checkpoint(self.output / "checkpoints", state, keep=self.cfg.checkpoint.keep)
                log.info("saved %s", path)
            except C.CheckpointWriteError as e:  # a full disk: every rank stops; nothing half-written is left
                error = e
        if not all_true(error is None, self.info):  # the barrier, and every rank learns of a failed save
            raise TrainingError(
                str(error) if error else "rank 0 could not write the checkpoint (see its log)")
        return path

    def resume(self, path: Path) -> None:
        from torch.distributed.checkpoint.state_dict import (  # lazy: ~0.7 s of import, on resume only
            StateDictOptions,
            set_optimizer_state_dict,
        )

        try:
            st = C.load_checkpoint(path)
        except CheckpointError as e:
            raise TrainingError(f"resume: {e}") from None
        params = self.trainable()
        missing = sorted(set(params) - set(st.model))
        if missing:
            raise TrainingError(f"resume: {path} lacks trained tensors {missing[:3]} (a different setup?)")
        for n, p in params.items():
            if tuple(st.model[n].shape) != tuple(p.shape):
                raise TrainingError(f"resume: {n} has shape {tuple(st.model[n].shape)} in {path}, "
                                    f"{tuple(p.shape)} here")
            assign_full(p, st.model[n])
        frozen = {k[len("frozen."):]: v for k, v in st.model.items() if k.startswith("frozen.")}
        self.load_frozen_state(frozen)
        extra = {k: v for k, v in st.model.items() if k not in params and not k.startswith("frozen.")}
        if self.ema is not None:
            if st.ema is None:
                log.warning("resume: %s has no EMA; starting the EMA from the current weights", path)
            else:
                self.ema.load_state_dict(st.ema)
                self.ema.updates = int(st.scalars.get("ema_updates", 0))
        if st.optimizer is not None:
            opts = StateDictOptions(full_state_dict=True)
            set_optimizer_state_dict(self.module, self.optimizer, optim_state_dict=st.optimizer, options=opts)
        self.scheduler.load_state_dict(st.scalars["scheduler"])
        if self.scaler is not None and st.scalars.get("scaler"):
            self.scaler.load_state_dict(st.scalars["scaler"])
        self.load_extra_state(extra, st.scalars)
        self.step = st.step
        self.nan_steps = int(st.scalars.get("nan_steps", 0))
        self.consecutive_nan = int(st.scalars.get("consecutive_nan", 0))
        self.samples_seen = int(st.scalars.get("samples_seen", 0))
        if self.stream is not None and st.scalars.get("data"):
            self.stream.load_state_dict(st.scalars["data"])
        saved_ws = int(st.scalars.get("world_size", 1))
        if saved_ws == self.info.world_size and len(st.rng) == self.info.world_size:
            C.set_rng_state(st.rng[self.info.rank])
        else:
            log.warning("resume: saved with %d processes, running with %d: the data position and the RNG "
                        "states do not carry over exactly", saved_ws, self.info.world_size)
        if self.info.is_main:
            log.info("resumed from %s at step %d", path, self.step)

    # ------------------------------------------------------------------ the loop
    def optimizer_step(self) -> float:
        """Unscale, clip, step; returns the gradient norm before clipping (NaN/Inf means skip)."""
        cfg = self.cfg
        params = [p for p in self.module.parameters() if p.requires_grad]
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        max_norm = cfg.train.max_grad_norm if cfg.train.max_grad_norm > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        norm = float(full_tensor(norm))
        if self.scaler is not None:
            self.scaler.step(self.optimizer)  # skips the update itself on inf/NaN gradients
            self.scaler.update()
        elif math.isfinite(norm):
            self.optimizer.step()
        return norm

    def accumulate(self) -> tuple[bool, float, dict[str, float], dict[str, Any]]:
        """Forward and backward over `grad_accum` micro-batches: (all finite, mean loss, metrics, last batch).

        Every process decides together whether the loss is finite (a NaN on one rank skips the step on all).
        After a non-finite micro-batch the rest of the step's batches are still taken from the data, so the
        data position stays `step * grad_accum` batches.
        """
        accum = self.cfg.train.grad_accum
        finite, loss_sum, metrics, batch = True, 0.0, {}, {}
        for micro in range(accum):
            batch = self.stream.next()
            self.samples_seen += len(batch["index"]) * self.info.world_size
            if not finite:
                continue
            # DDP: all-reduce the gradients only on the last micro-batch of the step
            sync = micro == accum - 1 or not hasattr(self.wrapped, "no_sync")
            with contextlib.nullcontext() if sync else self.wrapped.no_sync():
                loss, m = self.compute_loss(batch, self.step)
                finite = all_true(bool(torch.isfinite(loss).item()), self.info)
                if finite:
                    scaled = loss / accum
                    (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
                    loss_sum += float(loss.detach()) / accum
                    for k, v in m.items():
                        metrics[k] = metrics.get(k, 0.0) + v / accum
        return finite, loss_sum, metrics, batch

    def skipped_step(self) -> None:
        """Count a step whose loss or gradient was not finite; stop after too many in a row."""
        limit = self.cfg.train.max_nan_steps
        self.nan_steps += 1
        self.consecutive_nan += 1
        log.warning("step %d: non-finite loss or gradient, update skipped (%d so far, %d in a row)",
                    self.step, self.nan_steps, self.consecutive_nan)
        if self.consecutive_nan >= limit:
            self.save()
            raise TrainingError(
                f"training stopped at step {self.step}: {self.consecutive_nan} consecutive steps had a "
                f"NaN/Inf loss or gradient ({self.nan_steps} in total; train.max_nan_steps = {limit}). The "
                "weights are those of the last good step and were saved. Lower the learning rate, use bf16 "
                "instead of fp16, or check the data.")

    def train(self) -> TrainResult:
        """Run from `self.step` to `train.steps` (or a signal / `train.stop_at`), then export the model."""
        cfg = self.cfg
        result = TrainResult(output=self.output, step=self.step, exported=None)
        meter = _Meter(self.step, self.samples_seen)
        run_start, run_start_images = time.perf_counter(), self.samples_seen
        bar = _progress_bar(cfg.train.progress and self.info.is_main, cfg.train.steps, self.step)
        self.wrapped.train()
        try:
            with StopSignal() as stop:
                while self.step < cfg.train.steps:
                    finite, loss, metrics, batch = self.accumulate()
                    grad_norm = self.optimizer_step() if finite else float("nan")
                    finite = finite and (math.isfinite(grad_norm) or self.scaler is not None)
                    self.optimizer.zero_grad(set_to_none=True)
                    self.scheduler.step()
                    self.step += 1
                    if finite:
                        self.consecutive_nan = 0
                        if self.ema is not None and self.step > cfg.ema.start_step:
                            self.ema.update(self.trainable())
                        metrics.update(self.after_optimizer_step(batch))
                        result.losses.append(loss)
                        meter.losses.append(loss)
                    else:
                        self.skipped_step()

                    if bar is not None:
                        shown = loss if finite else float("nan")
                        bar.update(bar.task_ids[0], completed=self.step, loss=shown,
                                   ips=meter.steps_per_second(self.step))
                    if self.step % cfg.train.log_every == 0 or self.step == cfg.train.steps:
                        row = meter.row(self.step, self.samples_seen)
                        self.log.write(self.step, {**row, "lr": self.scheduler.get_last_lr()[0],
                                                   "grad_norm": grad_norm, "nan_steps": self.nan_steps,
                                                   **metrics})
                    if cfg.sample.every and self.step % cfg.sample.every == 0:
                        self.sample()
                        self.wrapped.train()
                    if cfg.validation.every and self.step % cfg.validation.every == 0:
                        self.validate()
                    signalled = any_true(stop.requested, self.info)
                    stopping = signalled or self.step == cfg.train.stop_at
                    if stopping or (cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0):
                        self.save()
                    if stopping:
                        result.interrupted = True
                        result.stop_reason = (stop.signal_name or "signal") if signalled else "stop_at"
                        break
                else:
                    if not cfg.checkpoint.every or self.step % cfg.checkpoint.every:
                        self.save()
        finally:
            if bar is not None:
                bar.stop()
        elapsed = time.perf_counter() - run_start
        result.images_per_second = (self.samples_seen - run_start_images) / max(elapsed, 1e-9)
        result.exported = self.export()
        result.step = self.step
        result.nan_steps = self.nan_steps
        self.log.close()
        return result


class _Meter:
    """Loss average and speed since the last log line."""

    def __init__(self, step: int, images: int):
        self.time, self.step, self.images = time.perf_counter(), step, images
        self.losses: list[float] = []

    def steps_per_second(self, step: int) -> float:
        return (step - self.step) / max(time.perf_counter() - self.time, 1e-9)

    def row(self, step: int, images: int) -> dict[str, float]:
        now = time.perf_counter()
        dt = max(now - self.time, 1e-9)
        row = {"loss": sum(self.losses) / len(self.losses) if self.losses else float("nan"),
               "steps_per_s": (step - self.step) / dt, "images_per_s": (images - self.images) / dt}
        self.time, self.step, self.images, self.losses = now, step, images, []
        return row
