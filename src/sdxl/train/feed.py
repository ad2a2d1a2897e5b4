"""From the data to the tensors a step consumes: the endless batch stream, the micro-conditioning numbers
of a batch, and the frozen encoders (VAE posterior, text towers) behind an optional disk cache.

The caches are keyed by content: a latent entry by the SHA-256 of the prepared pixels, a text entry by the
caption, each salted with a fingerprint of the frozen encoder's weights, so a changed encoder never reads a
stale entry.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from ..errors import CheckpointError
from ..models.conditioning import conditioning_numbers
from ..models.config import ModelConfig, VAEConfig
from ..tokenizer import CLIPTokenizer
from ..weights.io import open_tensors, save_safetensors
from .config import TrainingError
from .models import autocast_context


class BatchStream:
    """Endless batches from a DataLoader over a `BucketBatchSampler`, counting its own position.

    The position (epoch, batches consumed in it) counts what the TRAINING LOOP took, not what the loader
    prefetched, so a checkpoint records exactly where to continue.
    """

    def __init__(self, dataset, sampler, collate_fn, num_workers: int = 0):
        self.dataset = dataset
        self.sampler = sampler
        self.collate_fn = collate_fn
        self.num_workers = num_workers
        self.epoch = 0
        self.batch_index = 0
        self._it = None

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch_index": self.batch_index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch = int(state["epoch"])
        self.batch_index = int(state["batch_index"])
        self._it = None

    def _start(self):
        self.dataset.set_epoch(self.epoch)
        self.sampler.load_state_dict({"epoch": self.epoch, "batch_index": self.batch_index})
        loader = DataLoader(self.dataset, batch_sampler=self.sampler, collate_fn=self.collate_fn,
                            num_workers=self.num_workers,
                            # its own generator: creating an iterator must not draw from the global RNG
                            generator=torch.Generator().manual_seed(self.epoch))
        return iter(loader)

    def next(self) -> dict[str, Any]:
        for _ in range(2):
            if self._it is None:
                self._it = self._start()
            try:
                batch = next(self._it)
            except StopIteration:
                self._it = None
                self.epoch += 1
                self.batch_index = 0
                continue
            self.batch_index += 1
            batch["epoch"] = self.epoch
            return batch
        raise TrainingError("the data yields no batches (fewer usable images than batch_size, with "
                            "drop_last?)")


def batch_conditioning_numbers(batch: dict[str, Any], kind: str) -> Tensor:
    """The micro-conditioning numbers of every sample of a collated batch, float32 [B, 6] (base) or [B, 5]
    (refiner), in the layout of `sdxl.models.conditioning.conditioning_numbers`."""
    n = len(batch["original_size"])
    targets = batch["target_size"].tolist() if kind != "refiner" else [None] * n
    scores = batch["aesthetic_score"].tolist() if kind == "refiner" else [None] * n
    rows = [conditioning_numbers(kind, original, crop, target_size=target, aesthetic_score=score)
            for original, crop, target, score in zip(batch["original_size"].tolist(),
                                                     batch["crop_top_left"].tolist(), targets, scores)]
    return torch.tensor(rows, dtype=torch.float32)


def fingerprint(module: nn.Module | None, extra: str = "") -> str:
    """SHA-256 of a module's weights (names, dtypes, shapes, bytes): the identity of a frozen encoder."""
    h = hashlib.sha256(extra.encode())
    if module is not None:
        for name, t in sorted(module.state_dict().items()):
            t = t.detach().to("cpu").contiguous()
            h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class DiskCache:
    """A folder of small safetensors files addressed by a hex key (atomic writes; damaged entries miss)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.hits = 0
        self.misses = 0

    def path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.safetensors"

    def get(self, key: str) -> dict[str, Tensor] | None:
        p = self.path(key)
        if not p.is_file():
            self.misses += 1
            return None
        try:
            f = open_tensors(p)
            out = {k: f[k].clone() for k in f.keys()}
        except CheckpointError:
            self.misses += 1
            return None
        self.hits += 1
        return out

    def put(self, key: str, tensors: dict[str, Tensor]) -> None:
        save_safetensors(tensors, self.path(key))


def pixels_key(pixels: Tensor, salt: str) -> str:
    """Cache key of one prepared image: SHA-256 of its float pixels (crop, flip and resize are part of it)."""
    h = hashlib.sha256(salt.encode())
    h.update(pixels.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def caption_key(caption: str, salt: str) -> str:
    return hashlib.sha256((salt + "\0" + caption).encode("utf-8", errors="surrogatepass")).hexdigest()


class LatentFeed:
    """VAE posterior (mean, logvar) of prepared images, cached per image in `cache_folder` if given."""

    def __init__(self, vae: nn.Module, vae_config: VAEConfig, device: torch.device,
                 cache_folder: Path | None = None):
        self.vae = vae
        self.device = device
        self.cache = DiskCache(cache_folder) if cache_folder is not None else None
        self.salt = "latents:" + fingerprint(vae, repr(vae_config)) if self.cache is not None else ""
        self.encodes = 0  # images that went through the VAE (cache misses)

    @torch.no_grad()
    def moments(self, pixels: Tensor) -> tuple[Tensor, Tensor]:
        """(mean, logvar), unscaled, float32 on the device."""
        vae = self.vae
        dev = self.device
        if self.cache is None:
            self.encodes += pixels.shape[0]
            mean, logvar = vae.encode(pixels.to(dev))
            return mean.float(), logvar.float()
        keys = [pixels_key(p, self.salt) for p in pixels]
        entries: list[dict[str, Tensor] | None] = [self.cache.get(k) for k in keys]
        todo = [i for i, e in enumerate(entries) if e is None]
        if todo:
            self.encodes += len(todo)
            mean, logvar = vae.encode(pixels[todo].to(dev))
            for j, i in enumerate(todo):
                entries[i] = {"mean": mean[j].float().cpu(), "logvar": logvar[j].float().cpu()}
                self.cache.put(keys[i], entries[i])
        mean = torch.stack([e["mean"] for e in entries]).to(dev)
        logvar = torch.stack([e["logvar"] for e in entries]).to(dev)
        return mean, logvar


class TextFeed:
    """Captions to token ids (for towers that train) or to the frozen towers' (context, pooled), cached per
    caption in `cache_folder` if given."""

    def __init__(self, text: nn.Module, config: ModelConfig, device: torch.device, clip_skip: int,
                 mixed_precision: str, cache_folder: Path | None = None):
        self.text = text
        self.device = device
        self.clip_skip = clip_skip
        self.mixed_precision = mixed_precision
        self.tok_l = CLIPTokenizer.clip_l() if config.text_l is not None else None
        self.tok_g = CLIPTokenizer.bigg() if config.text_g is not None else None
        self.cache = DiskCache(cache_folder) if cache_folder is not None else None
        self.salt = f"text:skip={clip_skip}:" + fingerprint(text) if self.cache is not None else ""
        self.encodes = 0  # captions that went through the frozen towers (cache misses)

    def tokenize(self, captions: list[str]) -> tuple[Tensor | None, Tensor | None]:
        dev = self.device
        ids_l = self.tok_l(captions).to(dev) if self.tok_l is not None else None
        ids_g = self.tok_g(captions).to(dev) if self.tok_g is not None else None
        return ids_l, ids_g

    @torch.no_grad()
    def frozen(self, captions: list[str]) -> tuple[Tensor, Tensor]:
        """(context, pooled) from the frozen towers, float32 on the device."""
        text = self.text
        if self.cache is None:
            self.encodes += len(captions)
            ids_l, ids_g = self.tokenize(captions)
            with autocast_context(self.device, self.mixed_precision):
                ctx, pooled = text.encode(ids_l, ids_g, skip=self.clip_skip)
            return ctx.float(), pooled.float()
        found: dict[str, dict[str, Tensor]] = {}
        missing = []
        for c in dict.fromkeys(captions):
            hit = self.cache.get(caption_key(c, self.salt))
            if hit is None:
                missing.append(c)
            else:
                found[c] = hit
        if missing:
            self.encodes += len(missing)
            ids_l, ids_g = self.tokenize(missing)
            ctx, pooled = text.encode(ids_l, ids_g, skip=self.clip_skip)
            for i, c in enumerate(missing):
                entry = {"context": ctx[i].float().cpu(), "pooled": pooled[i].float().cpu()}
                self.cache.put(caption_key(c, self.salt), entry)
                found[c] = entry
        dev = self.device
        context = torch.stack([found[c]["context"] for c in captions]).to(dev)
        pooled = torch.stack([found[c]["pooled"] for c in captions]).to(dev)
        return context, pooled
