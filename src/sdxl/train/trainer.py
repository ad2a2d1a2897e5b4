"""The diffusion trainer (`Trainer`): full fine-tunes and LoRAs of the UNet, the text towers jointly with it,
refiners on the low noise levels, and models from scratch, on the loop of `TrainerBase` (loop.py).

Conditioning per sample, as the paper defines it: the text context (CLIP-L penultimate | bigG penultimate) and
y = [pooled bigG | fourier(orig h, w, crop top, left, target h, w)] for the base, [... | fourier(orig h, w,
crop top, left, aesthetic score)] for the refiner (`sdxl.models.conditioning.conditioning_numbers`). A
dropped caption (probability `data.ucg`) multiplies the context AND the pooled vector by zero: the all-zero
embedding is SDXL's null condition, what the official base uses as the negative branch.

The objective and its random numbers are in losses.py, the batches and frozen encoders in feed.py, the
networks in models.py.
"""

from __future__ import annotations

import functools
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..data.buckets import BucketBatchSampler, scaled_buckets
from ..data.dataset import ImageCaptionDataset, collate
from ..data.evaluate import score_generated, tallies_to_log
from ..data.shapes import make_level
from ..errors import RequestError
from ..pipeline import SDXL
from ..request import GenerationRequest
from ..sampling.denoiser import DiscreteSchedule
from ..weights.checkpoint import Checkpoint, write_single_file
from .config import ConfigError, TrainingError
from .distributed import barrier, full_tensor
from .feed import BatchStream, LatentFeed, TextFeed, batch_conditioning_numbers
from .loop import TrainerBase
from .losses import (
    add_noise,
    debiased_weights,
    draw_noise,
    loss_weights,
    per_sample_error,
    prediction_target,
    sample_generator,
)
from .models import (
    FSDP_BLOCKS,
    DiffusionModel,
    autocast_context,
    inject_lora_network,
    load_models,
    unused_text_parameters,
)

log = logging.getLogger("sdxl.train")

# kohya's block_lr order (sdxl_train.py get_block_params_to_optimize): 0 time/label embeddings, 1-9
# input_blocks 0-8, 10-12 middle_block 0-2, 13-21 output_blocks 0-8, 22 the output layer
_BLOCK = re.compile(r"^(?:unet\.|lora\.unet\.lora_unet_)(time_embed|label_emb|input_blocks|middle_block|"
                    r"output_blocks|out)[._](\d+)")
_BLOCK_BASE = {"time_embed": 0, "label_emb": 0, "input_blocks": 1, "middle_block": 10, "output_blocks": 13,
               "out": 22}


def unet_block_index(name: str) -> int:
    """kohya's block_lr index (0-22) of a trained UNet parameter: `unet.<name>` or a LoRA's
    `lora.unet.lora_unet_<name>`."""
    m = _BLOCK.match(name)
    if m is None:
        raise ConfigError(f"optim.block_lr: cannot place UNet parameter {name!r} in a block")
    kind, k = m.group(1), int(m.group(2))
    return _BLOCK_BASE[kind] if kind in ("time_embed", "label_emb", "out") else _BLOCK_BASE[kind] + k


class Trainer(TrainerBase):
    """UNet training (full or LoRA), optionally with the text towers, for base and refiner models."""

    def build(self) -> None:
        cfg = self.cfg
        device = self.info.device
        self.models = models = load_models(cfg, device)
        mc = models.config
        if mc.kind == "inpaint":
            raise TrainingError("training inpainting models (9-channel UNet) is not supported")
        self.kind = mc.kind
        # float64, as sgm (last entry 0 with zero terminal SNR)
        self.alphas_cumprod = DiscreteSchedule(zero_terminal_snr=mc.zero_terminal_snr).alphas_cumprod
        self.t_max = cfg.loss.timestep_max or (200 if mc.kind == "refiner" else 1000)
        if cfg.loss.timestep_min >= self.t_max:
            raise ConfigError(f"loss.timestep_min = {cfg.loss.timestep_min} leaves no timestep below "
                              f"{self.t_max}")
        self.lora_net = None
        train_text = cfg.train.train_text_encoders
        if cfg.lora.rank > 0:
            if cfg.dist.strategy == "fsdp" and self.info.distributed:
                raise ConfigError("dist.strategy = fsdp is for full fine-tunes; use ddp for LoRA")
            models.unet.requires_grad_(False)
            models.text.requires_grad_(False)
            self.lora_net = inject_lora_network(models, cfg.lora, cfg.train.clip_skip)
            train_text = cfg.lora.text_encoders
        else:
            models.unet.requires_grad_(cfg.train.train_unet)
            if train_text:
                models.text.requires_grad_(True)
                unused = set(unused_text_parameters(models.text, cfg.train.clip_skip))
                for n, p in models.text.named_parameters():
                    if n in unused:
                        p.requires_grad_(False)
        self.train_text = train_text
        if cfg.train.gradient_checkpointing:
            models.unet.gradient_checkpointing = True
        self.module = DiffusionModel(models.unet, models.text if train_text else None, mc.fourier_dim,
                                     cfg.train.clip_skip, self.lora_net).to(device)
        if not any(p.requires_grad for p in self.module.parameters()):
            raise ConfigError("nothing to train: train.train_unet and train.train_text_encoders are both "
                              "false")

        self.latents = LatentFeed(models.vae, mc.vae, device, cfg.data.cache_folder(self.output, "latents")
                                  if cfg.data.cache_latents else None)
        self.texts = TextFeed(models.text, mc, device, cfg.train.clip_skip, cfg.train.mixed_precision,
                              cfg.data.cache_folder(self.output, "text")
                              if cfg.data.cache_text and not train_text else None)
        if cfg.sample.every:
            self.sample_requests()
        self.build_data()
        self.build_validation()

    def build_data(self) -> None:
        d = self.cfg.data
        if not d.path:
            raise ConfigError("data.path is empty: give a folder of images with captions or a .jsonl "
                              "manifest")
        buckets = scaled_buckets(d.resolution, d.bucket_step, d.min_bucket_side or None,
                                 d.max_bucket_side or None)
        if not buckets:
            raise ConfigError("no buckets left after data.min_bucket_side / max_bucket_side")
        try:
            self.dataset = ImageCaptionDataset(
                d.path, resolution=d.resolution, buckets=buckets, seed=self.cfg.train.seed, crop=d.crop,
                flip_prob=d.flip_prob, ucg=d.ucg, shuffle_caption=d.shuffle_caption,
                keep_tokens=d.keep_tokens, caption_separator=d.caption_separator,
                caption_tag_dropout_rate=d.caption_tag_dropout_rate,
                keep_tokens_separator=d.keep_tokens_separator,
                size_conditioning=d.size_conditioning,
                crop_conditioning=d.crop_conditioning, min_size=d.min_size, upscale=d.upscale,
                masks=self.cfg.loss.masked)
        except FileNotFoundError as e:
            raise TrainingError(f"data.path: {e}") from None
        if len(self.dataset) == 0:
            raise TrainingError(f"data.path: no usable images in {d.path} ({dict(self.dataset.stats)})")
        if self.cfg.loss.masked and self.dataset.stats["missing_masks"] == len(self.dataset):
            raise TrainingError(f"loss.masked: no image in {d.path} has a loss mask (`NAME.mask.png` beside "
                                "`NAME.png`, or a \"mask\" path in metadata.jsonl)")
        bucket_of = self.dataset.bucket_of
        self.held_out = self.held_out_indices(len(self.dataset))
        for i in self.held_out:
            bucket_of[i] = -1  # the sampler skips negative buckets
        self.sampler = BucketBatchSampler(bucket_of, self.cfg.train.batch_size,
                                          seed=self.cfg.train.seed, drop_last=d.drop_last, shuffle=d.shuffle,
                                          rank=self.info.rank, world_size=self.info.world_size)
        collate_fn = functools.partial(collate, default_aesthetic_score=d.default_aesthetic_score)
        self.stream = BatchStream(self.dataset, self.sampler, collate_fn, d.num_workers)
        if self.info.is_main:
            log.info("data: %d images in %d buckets, %d batches per epoch per process (%s)",
                     len(self.dataset), len(self.dataset.bucket_counts()), len(self.sampler),
                     dict(self.dataset.stats))

    def param_groups(self) -> list[dict[str, Any]]:
        """UNet (or UNet LoRA) parameters at `optim.lr` (or per block at `optim.block_lr`), tower (or tower
        LoRA) parameters at `lr_text_l` / `lr_text_g` (each falling back to `text_lr`, then `lr`); one text
        group when the two towers share a rate."""
        o = self.cfg.optim
        text_lr = o.text_lr or o.lr
        lr_l, lr_g = o.lr_text_l or text_lr, o.lr_text_g or text_lr
        groups: dict[str, dict[str, Any]] = {}
        for n, p in self.module.named_parameters():
            if not p.requires_grad:
                continue
            if n.startswith(("text.clip_l.", "lora.te1.")):
                key, lr = ("text", lr_l) if lr_l == lr_g else ("text_l", lr_l)
            elif n.startswith(("text.", "lora.te2.")):
                key, lr = ("text", lr_g) if lr_l == lr_g else ("text_g", lr_g)
            elif o.block_lr:
                i = unet_block_index(n)
                key, lr = f"unet_block_{i:02d}", o.block_lr[i]
            else:
                key, lr = "unet", o.lr
            groups.setdefault(key, {"params": [], "lr": lr})["params"].append(p)
        order = sorted(groups, key=lambda k: (k.startswith("text"), k))  # UNet first, as before
        return [groups[k] for k in order]

    # ------------------------------------------------------------------ validation
    def held_out_indices(self, n: int) -> list[int]:
        """The images of data.path held out for `validation.fraction` (a seeded choice; at least one)."""
        frac = self.cfg.validation.fraction
        if not frac:
            return []
        k = max(1, round(frac * n))
        if k >= n:
            raise ConfigError(f"validation.fraction = {frac} leaves no training image of {n}")
        perm = np.random.default_rng([self.cfg.train.seed, 0x7A1]).permutation(n)
        return sorted(int(i) for i in perm[:k])

    def build_validation(self) -> None:
        """The validation images: `validation.path`, or the held-out part of data.path, centre-cropped with no
        flip, caption dropout or tag shuffling, so every evaluation sees the same pixels and captions."""
        v, d = self.cfg.validation, self.cfg.data
        self.val_dataset, self.val_indices = None, []
        if not (v.path or v.fraction):
            return
        source = v.path or d.path
        buckets = scaled_buckets(d.resolution, d.bucket_step, d.min_bucket_side or None,
                                 d.max_bucket_side or None)
        try:
            ds = ImageCaptionDataset(source, resolution=d.resolution, buckets=buckets, seed=v.seed,
                                     crop="center", flip_prob=0.0, ucg=0.0,
                                     size_conditioning=d.size_conditioning,
                                     crop_conditioning=d.crop_conditioning, min_size=d.min_size,
                                     upscale=d.upscale)
        except FileNotFoundError as e:
            raise TrainingError(f"validation.path: {e}") from None
        self.val_indices = self.held_out if v.fraction else list(range(len(ds)))
        if not self.val_indices:
            raise TrainingError(f"validation.path: no usable images in {source}")
        self.val_dataset = ds

    @torch.no_grad()
    def validation_loss(self) -> dict[str, float]:
        """Mean squared error of the prediction on the validation images at each `validation.timesteps`, with
        the latent mean (no posterior sampling) and noise drawn from (validation.seed, image, timestep): the
        same inputs at every evaluation, so only the weights change the number. Unweighted (no min-SNR,
        debiased or mask weights). {"val_loss": mean, "val_loss_t<T>": per timestep}."""
        v = self.cfg.validation
        dev = self.info.device
        vae_cfg = self.models.config.vae
        pred_kind = self.models.config.prediction
        was_training = self.module.training
        self.module.eval()
        per_t = {t: [] for t in v.timesteps}
        try:
            for i in self.val_indices:
                batch = collate([self.val_dataset[i]], self.cfg.data.default_aesthetic_score)
                mean, _ = self.latents.moments(batch["pixels"])
                x0 = (mean - vae_cfg.shift_factor) * vae_cfg.scale_factor
                numbers = batch_conditioning_numbers(batch, self.kind).to(dev)
                keep = torch.ones(1, device=dev)
                if self.train_text:
                    ids_l, ids_g = self.texts.tokenize(batch["caption"])
                    text_kw = {"ids_l": ids_l, "ids_g": ids_g}
                else:
                    context, pooled = self.texts.frozen(batch["caption"])
                    text_kw = {"context": context, "pooled": pooled}
                for t_val in v.timesteps:
                    g = torch.Generator("cpu").manual_seed(
                        int(np.random.SeedSequence([v.seed, i, t_val]).generate_state(1, np.uint64)[0]))
                    noise = torch.randn(tuple(x0.shape), generator=g).to(dev)
                    t = torch.full((1,), t_val, dtype=torch.long, device=dev)
                    x_t = add_noise(x0, noise, t, self.alphas_cumprod)
                    target = prediction_target(x0, noise, t, self.alphas_cumprod, pred_kind)
                    with autocast_context(dev, self.cfg.train.mixed_precision):
                        pred = self.module(x_t, t, numbers, keep, **text_kw)
                    per_t[t_val].append(float(per_sample_error(pred, target).mean()))
        finally:
            self.module.train(was_training)
        out = {f"val_loss_t{t}": sum(x) / len(x) for t, x in per_t.items()}
        out["val_loss"] = sum(out.values()) / len(out)
        return out

    def validate(self) -> None:
        if self.cfg.validation.shapes_n:
            self.shapes_eval()
        if self.val_dataset is None:
            return
        values = self.validation_loss()
        if self.info.is_main:
            log.info("step %d: validation loss %.6f", self.step, values["val_loss"])
        self.log.write(self.step, values)

    def fsdp_units(self, module: nn.Module) -> list[nn.Module]:
        return [m for m in module.modules() if isinstance(m, FSDP_BLOCKS)]

    def frozen_state(self) -> dict[str, Tensor]:
        """From-scratch frozen parts (random VAE or towers, a LoRA's base UNet) have no file to come back
        from: checkpoint them."""
        out: dict[str, Tensor] = {}
        m = self.models
        frozen: dict[str, nn.Module | None] = {"vae": m.vae}
        if self.lora_net is not None:
            frozen["unet"] = m.unet
        if not self.train_text or self.lora_net is not None:
            frozen["text_l"] = getattr(m.text, "clip_l", None)
            frozen["text_g"] = getattr(m.text, "clip_g", None)
        for part, module in frozen.items():
            if module is not None and part not in m.from_file:
                out.update({f"{part}.{k}": v.detach().cpu() for k, v in module.state_dict().items()})
        return out

    def load_frozen_state(self, tensors: dict[str, Tensor]) -> None:
        m = self.models
        targets = {"vae": m.vae, "unet": m.unet, "text_l": getattr(m.text, "clip_l", None),
                   "text_g": getattr(m.text, "clip_g", None)}
        for part, module in targets.items():
            sd = {k[len(part) + 1:]: v for k, v in tensors.items() if k.startswith(part + ".")}
            if sd and module is not None:
                module.load_state_dict(sd, strict=True)

    # ------------------------------------------------------------------ data -> loss
    @property
    def stats(self) -> dict[str, int]:
        """How many images and captions went through the frozen encoders (cache misses)."""
        return {"vae_encodes": self.latents.encodes, "text_encodes": self.texts.encodes}

    def compute_loss(self, batch: dict[str, Any], step: int) -> tuple[Tensor, dict[str, float]]:
        cfg = self.cfg
        dev = self.info.device
        vae_cfg = self.models.config.vae
        mean, logvar = self.latents.moments(batch["pixels"])
        gens = [sample_generator(cfg.train.seed, step, batch["epoch"], int(i)) for i in batch["index"]]
        lo = cfg.loss
        draw = draw_noise(gens, tuple(mean.shape[1:]), lo.timestep_min, self.t_max, lo.offset_noise,
                          lo.offset_noise_mode, (lo.timestep_sampling, lo.timestep_loc, lo.timestep_scale),
                          (lo.multires_noise_iterations, lo.multires_noise_discount))
        z = mean + (0.5 * logvar).exp() * draw.posterior.to(dev) if cfg.loss.latent_sample else mean
        x0 = (z - vae_cfg.shift_factor) * vae_cfg.scale_factor
        t = draw.t.to(dev)
        noise = draw.noise.to(dev)
        x_t = add_noise(x0, noise, t, self.alphas_cumprod)
        target = prediction_target(x0, noise, t, self.alphas_cumprod, self.models.config.prediction)
        numbers = batch_conditioning_numbers(batch, self.kind).to(dev)
        keep = (~batch["drop_caption"]).to(dev, torch.float32)
        with autocast_context(dev, cfg.train.mixed_precision):
            if self.train_text:
                ids_l, ids_g = self.texts.tokenize(batch["caption"])
                pred = self.wrapped(x_t, t, numbers, keep, ids_l=ids_l, ids_g=ids_g)
            else:
                context, pooled = self.texts.frozen(batch["caption"])
                pred = self.wrapped(x_t, t, numbers, keep, context=context, pooled=pooled)
        per_sample = per_sample_error(pred, target, batch.get("mask"), cfg.loss.mask_floor)
        w = loss_weights(t, self.alphas_cumprod, self.models.config.prediction, cfg.loss.min_snr_gamma,
                         cfg.loss.min_snr_floor)
        if cfg.loss.debiased_estimation:
            w = w * debiased_weights(t, self.alphas_cumprod, self.models.config.prediction)
        loss = (per_sample * w).mean()
        return loss, {}

    # ------------------------------------------------------------------ outputs
    def _current_parts(self, use_ema: bool) -> dict[str, dict[str, Tensor]]:
        """Every component's state dict (our naming), with the EMA weights substituted if asked."""
        m = self.models
        ema = self.ema.state_dict() if (use_ema and self.ema is not None) else {}
        trained = {n: full_tensor(p.detach()).cpu() for n, p in self.trainable().items()}
        trained.update(ema)
        parts: dict[str, dict[str, Tensor]] = {}
        unet_sd = {k: full_tensor(v).cpu() for k, v in m.unet.state_dict().items()}
        parts["unet"] = {k: trained.get(f"unet.{k}", v) for k, v in unet_sd.items()}
        if m.vae is not None:
            parts["vae"] = {k: v.cpu() for k, v in m.vae.state_dict().items()}
        for part, attr in (("text_l", "clip_l"), ("text_g", "clip_g")):
            tower = getattr(m.text, attr, None)
            if tower is not None:
                sd = {k: full_tensor(v).cpu() for k, v in tower.state_dict().items()}
                parts[part] = {k: trained.get(f"text.{attr}.{k}", v) for k, v in sd.items()}
        return parts

    def export(self) -> Path | None:
        """`model.safetensors` (official single-file layout), or `lora.safetensors` (kohya format)."""
        use_ema = self.cfg.ema.enabled and self.cfg.ema.export
        if self.lora_net is not None:
            path = self.output / "lora.safetensors"
            if self.info.is_main:
                self._save_lora(path, use_ema)
            barrier(self.info)
            return path
        parts = self._current_parts(use_ema)  # collective under FSDP
        path = self.output / "model.safetensors"
        if self.info.is_main:
            ckpt = Checkpoint(path=path, config=self.models.config, parts=parts)
            write_single_file(ckpt, path, dtype=self.save_dtype())
            log.info("wrote %s", path)
        barrier(self.info)
        return path

    @torch.no_grad()
    def _save_lora(self, path: Path, use_ema: bool) -> Path:
        """kohya file of the adapters; with EMA export the averaged weights are swapped in for the write."""
        params = dict(self.module.named_parameters())
        saved = {}
        if use_ema and self.ema is not None:
            for n, t in self.ema.shadow.items():
                saved[n] = params[n].detach().clone()
                params[n].copy_(t)
        try:
            version = "sdxl_refiner_v1-0" if self.kind == "refiner" else "sdxl_base_v1-0"
            meta = {"ss_base_model_version": version,
                    "ss_training_steps": self.step, "ss_seed": self.cfg.train.seed,
                    "ss_learning_rate": self.cfg.optim.lr, "ss_resolution": str(self.cfg.data.resolution),
                    "ss_sd_model_name": Path(self.cfg.model.init).name if self.cfg.model.init else ""}
            return self.lora_net.save(path, meta, self.save_dtype())
        finally:
            for n, t in saved.items():
                params[n].copy_(t)

    def sample_requests(self) -> list:
        """One validated `GenerationRequest` per `[sample]` prompt (bad settings fail at setup, not later)."""
        s = self.cfg.sample
        size = self.cfg.data.resolution
        out = []
        for k, prompt in enumerate(s.prompts):
            req = GenerationRequest(prompt=prompt, negative_prompt=s.negative_prompt or None,
                                    width=s.width or size, height=s.height or size, steps=s.steps, cfg=s.cfg,
                                    sampler=s.sampler, schedule=s.schedule, seed=s.seed + k)
            try:
                out.append(req.validate())
            except RequestError as e:
                raise ConfigError(f"[sample]: {e}") from None
        return out

    @torch.no_grad()
    def shapes_eval(self) -> None:
        """`validation.shapes_n`: the shapes detector's scores on held-out prompts from the current weights
        (`score_generated`), into log.jsonl (first process only)."""
        if not self.info.is_main:
            barrier(self.info)
            return
        v, s, m = self.cfg.validation, self.cfg.sample, self.models
        level = make_level(v.shapes_level) if v.shapes_level else None
        side = self.cfg.data.resolution
        modes = {mod: mod.training for mod in (m.unet, m.text) if mod is not None}
        m.unet.eval()
        pipe = SDXL(m.config, unet=m.unet, vae=m.vae, text=m.text, device=self.info.device,
                    dtype=torch.float32)

        def generate(prompt: str, seed: int):
            req = GenerationRequest(prompt=prompt, width=side, height=side, steps=s.steps, cfg=s.cfg,
                                    sampler=s.sampler, schedule=s.schedule, seed=seed)
            return pipe.generate(req).images[0]

        try:
            values = tallies_to_log(score_generated(generate, tuple(v.shapes_lists), v.shapes_n, 0, level))
        finally:
            for mod, training in modes.items():
                mod.train(training)
        log.info("step %d: %s", self.step, ", ".join(f"{k} {x:.0%}" for k, x in values.items()
                                                    if k.endswith("shape_ok") or k.endswith("all_ok")))
        self.log.write(self.step, values)
        barrier(self.info)

    @torch.no_grad()
    def sample(self) -> None:
        """Images from the current weights via the pipeline (`SDXL.generate`), into `<output>/samples`."""
        requests = self.sample_requests()
        if not requests:
            return
        sharded = self.info.distributed and self.cfg.dist.strategy == "fsdp"
        if not (self.info.is_main or sharded):
            barrier(self.info)
            return
        m = self.models
        m.unet.eval()
        pipe = SDXL(m.config, unet=m.unet, vae=m.vae, text=m.text, device=self.info.device,
                    dtype=torch.float32)
        folder = self.output / "samples"
        folder.mkdir(parents=True, exist_ok=True)
        for k, req in enumerate(requests):
            result = pipe.generate(req)
            if self.info.is_main:
                result.images[0].save(folder / f"step-{self.step:08d}-{k}.png")
                self.log.image(f"sample/{k}", np.asarray(result.images[0].convert("RGB")), self.step)
        barrier(self.info)

