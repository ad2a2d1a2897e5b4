"""Autoencoder training (`train.task = "vae"`): the KL-regularised VAE of SDXL section 2.4, on the shared
loop.

The objective is sgm's `GeneralLPIPSWithDiscriminator` without LPIPS (it needs pretrained VGG weights, which a
from-scratch project does not have), written per pixel:

    z      = mean + exp(logvar / 2) * n,  n ~ N(0, I)          (reparameterised posterior sample)
    rec    = mean |x - decode(z)|   (or squared, `vae.reconstruction = "l2"`)
             with `vae.edge_weight` = e: mean(w |x - decode(z)|) / mean(w), w = 1 + e * edges(x)  (`edge_map`)
    kl     = 0.5 * sum(mean^2 + exp(logvar) - 1 - logvar) / (number of pixel values)
    loss   = rec + kl_weight * kl  [+ gan_weight * (-mean D(decode(z)))   after `gan_start` steps]

sgm sums both terms over the image instead of averaging; dividing both by the same pixel count keeps the
ratio, so `kl_weight` means what it means there (1e-6 in the SDXL autoencoder config).

The optional discriminator is taming-transformers' PatchGAN (`NLayerDiscriminator`) with GroupNorm in place of
BatchNorm (so its output does not depend on how a batch is split over processes), trained with the hinge loss
after `gan_start` steps on the same batches, with its own AdamW (betas 0.5, 0.9 as in taming). Its weights and
optimizer state are part of the training checkpoint.

At export, `vae.update_scale_factor` sets the latent scale factor to 1 / std of the latents of a few training
images, the rule behind SD's 0.18215 and SDXL's 0.13025: the diffusion model then sees unit-variance latents.
The export is a VAE-only official-layout file `<output>/vae.safetensors` (keys `first_stage_model.*`,
config in the metadata) that `model.vae` of a diffusion run, `sdxl inspect` and the pipeline read.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.buckets import BucketBatchSampler, scaled_buckets
from ..data.dataset import ImageCaptionDataset, collate
from ..data.images import tensor_to_pil
from ..models.config import ModelConfig
from ..models.vae import AutoencoderKL
from ..weights.checkpoint import Checkpoint, write_single_file
from ..weights.detect import check_config
from . import checkpointing as C
from .config import ConfigError, TrainingError
from .distributed import all_true, barrier, ddp, full_tensor
from .feed import BatchStream, LatentFeed
from .loop import TrainerBase
from .losses import sample_generator
from .models import autocast_context, load_models

log = logging.getLogger("sdxl.train")


_SOBEL_X = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])


def edge_map(x: Tensor) -> Tensor:
    """Edge strength of images in [-1, 1], [B, C, H, W] -> [B, 1, H, W] in [0, 1]: the Sobel gradient
    magnitude of each channel (replicate padding), the largest over the channels, divided by 8 (a full
    -1 -> 1 step) and clipped at 1. Two palette colours side by side give about 0.3-0.7; flat areas 0."""
    c = x.shape[1]
    kx = _SOBEL_X.to(x.device, x.dtype).expand(c, 1, 3, 3)
    ky = _SOBEL_X.t().to(x.device, x.dtype).expand(c, 1, 3, 3)
    xp = F.pad(x, (1, 1, 1, 1), mode="replicate")
    gx, gy = F.conv2d(xp, kx, groups=c), F.conv2d(xp, ky, groups=c)
    return (gx.square() + gy.square()).sqrt().amax(1, keepdim=True).div(8.0).clamp(max=1.0)


class PatchDiscriminator(nn.Module):
    """PatchGAN: strided 4x4 convs down to a map of real/fake logits, one per overlapping image patch."""

    def __init__(self, in_channels: int = 3, channels: int = 64, layers: int = 3):
        super().__init__()
        mods: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        ch = channels
        for i in range(1, layers + 1):
            out = channels * min(2**i, 8)
            stride = 2 if i < layers else 1
            mods += [nn.Conv2d(ch, out, 4, stride, 1, bias=False), nn.GroupNorm(min(32, out // 4), out),
                     nn.LeakyReLU(0.2)]
            ch = out
        mods.append(nn.Conv2d(ch, 1, 4, 1, 1))
        self.net = nn.Sequential(*mods)
        for m in self.modules():  # taming's weights_init: N(0, 0.02) convs
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class VAEModule(nn.Module):
    """What DDP wraps: encode, sample the posterior with the given standard-normal noise, decode.

    With `boxes` (decoder-only training, encoder frozen) the whole image is encoded and only the latent
    squares `(top, left, side)` (latent pixels, one per image) are decoded; `moments` are the frozen encoder's
    (mean, logvar) of `x` when they are already known (the latent cache), so `x` is not encoded again.
    """

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, x: Tensor, noise: Tensor | None, boxes: list[tuple[int, int, int]] | None = None,
                moments: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor, Tensor]:
        mean, logvar = self.vae.encode(x) if moments is None else moments
        z = mean if noise is None else mean + (0.5 * logvar).exp() * noise
        if boxes is not None:
            z = torch.stack([zi[:, t:t + s, left:left + s] for zi, (t, left, s) in zip(z, boxes)])
        return self.vae.decode(z), mean, logvar


class FrozenEncoder(nn.Module):
    """The encoder half of a VAE as the latent cache sees it: `encode` of the whole VAE, while the cache's
    fingerprint covers only the encoder's weights (the decoder changes during decoder-only training)."""

    def __init__(self, vae: AutoencoderKL):
        super().__init__()
        self.encoder = vae.encoder
        self.quant_conv = vae.quant_conv
        self.encode = vae.encode


class VAETrainer(TrainerBase):
    """Reconstruction + KL (+ PatchGAN) training of `AutoencoderKL`."""

    def build(self) -> None:
        cfg = self.cfg
        device = self.info.device
        models = load_models(cfg, device, need=("vae",))
        self.model_config = models.config
        self.vae = models.vae
        if cfg.vae.decoder_ch_mult:
            self.widen_decoder(tuple(cfg.vae.decoder_ch_mult))
        self.vae = self.vae.requires_grad_(True).train()
        if cfg.vae.decoder_only:  # the latent space (and every diffusion model trained on it) stays as it is
            self.vae.encoder.requires_grad_(False)
            self.vae.quant_conv.requires_grad_(False)
        self.module = VAEModule(self.vae)
        self.disc = None
        self.disc_wrapped = None
        self.disc_opt = None
        v = cfg.vae
        if v.gan:
            self.disc = PatchDiscriminator(self.model_config.vae.out_channels, v.disc_channels,
                                           v.disc_layers).to(device)
            self.disc_wrapped = self.disc
            if self.info.distributed:
                self.disc_wrapped = ddp(self.disc, self.info)
            self.disc_opt = torch.optim.AdamW(self.disc.parameters(), lr=v.disc_lr or cfg.optim.lr,
                                              betas=(0.5, 0.9), weight_decay=0.0)
        self._last: tuple[Tensor, Tensor] | None = None
        # decoder-only with data.cache_latents: the frozen encoder's moments of each prepared image are
        # computed once and read back from disk, so a step costs only the decoder on its patch
        self.latents = None
        if cfg.vae.decoder_only and cfg.data.cache_latents:
            self.latents = LatentFeed(FrozenEncoder(self.vae), self.model_config.vae, device,
                                      cfg.data.cache_folder(self.output, "latents"))
        self.build_data()

    def widen_decoder(self, mult: tuple[int, ...]) -> None:
        """Give the VAE a fresh decoder of widths `ch * mult` (seeded by train.seed), keeping the encoder,
        quant_conv and post_quant_conv (whose shapes do not depend on the widths): the latent space stays."""
        vc = self.model_config.vae
        if not self.cfg.vae.decoder_only:
            raise ConfigError("vae.decoder_ch_mult needs vae.decoder_only = true (the encoder is kept)")
        if tuple(vc.decoder_ch_mult or vc.ch_mult) == mult:
            return  # already this decoder (e.g. continuing an export of a widened run)
        try:  # the checks every model file's config passes: whole numbers, levels, GroupNorm groups
            wide = dataclasses.replace(vc, decoder_ch_mult=mult)
            check_config(dataclasses.replace(self.model_config, vae=wide))
        except ValueError as e:
            raise ConfigError(f"vae.decoder_ch_mult {list(mult)}: {e}") from None
        torch.manual_seed(self.cfg.train.seed)
        new = AutoencoderKL(wide).to(self.info.device)
        kept = {k: t for k, t in self.vae.state_dict().items() if not k.startswith("decoder.")}
        new.load_state_dict(kept, strict=False)
        log.info("vae: a new decoder of widths %s on the kept encoder (%s)", wide.decoder_widths,
                 [vc.ch * m for m in vc.ch_mult])
        self.model_config = dataclasses.replace(self.model_config, vae=wide)
        self.vae = new

    def build_data(self) -> None:
        d = self.cfg.data
        if not d.path:
            raise ConfigError("data.path is empty: give a folder of images (captions are not needed)")
        buckets = scaled_buckets(d.resolution, d.bucket_step, d.min_bucket_side or None,
                                 d.max_bucket_side or None)
        self.dataset = ImageCaptionDataset(d.path, resolution=d.resolution, buckets=buckets,
                                           seed=self.cfg.train.seed, crop=d.crop, flip_prob=d.flip_prob,
                                           ucg=0.0, min_size=d.min_size, upscale=d.upscale)
        if len(self.dataset) == 0:
            raise TrainingError(f"data.path: no usable images in {d.path} ({dict(self.dataset.stats)})")
        self.sampler = BucketBatchSampler(self.dataset.bucket_of, self.cfg.train.batch_size,
                                          seed=self.cfg.train.seed, drop_last=d.drop_last, shuffle=d.shuffle,
                                          rank=self.info.rank, world_size=self.info.world_size)
        self.stream = BatchStream(self.dataset, self.sampler, functools.partial(collate), d.num_workers)

    def param_groups(self) -> list[dict[str, Any]]:
        return [{"params": [p for p in self.module.parameters() if p.requires_grad], "lr": self.cfg.optim.lr}]

    def patch_boxes(self, batch: dict[str, Any], step: int,
                    grid: int = 1) -> list[tuple[int, int, int]] | None:
        """One random `vae.patch_size` square (top, left, side) per image, seeded per sample, with its corner
        on multiples of `grid` pixels; None without patches."""
        x = batch["pixels"]
        p = self.cfg.vae.patch_size
        if not p:
            return None
        h, w = x.shape[2], x.shape[3]
        if p > min(h, w):
            raise TrainingError(f"vae.patch_size {p} is larger than the bucket {h}x{w}")
        boxes = []
        for i in batch["index"]:
            g = sample_generator(self.cfg.train.seed + 1, step, batch["epoch"], int(i))
            top = int(torch.randint(0, (h - p) // grid + 1, (1,), generator=g)) * grid
            left = int(torch.randint(0, (w - p) // grid + 1, (1,), generator=g)) * grid
            boxes.append((top, left, p))
        return boxes

    def gan_active(self) -> bool:
        return self.disc is not None and self.step >= self.cfg.vae.gan_start

    def compute_loss(self, batch: dict[str, Any], step: int) -> tuple[Tensor, dict[str, float]]:
        cfg = self.cfg
        dev = self.info.device
        f = self.model_config.vae.downscale
        pixels = batch["pixels"].to(dev)
        # decoder-only: the whole image is encoded (as the latents a diffusion model makes) and a patch of its
        # latents decoded, so patch corners sit on the latent grid
        pix = self.patch_boxes(batch, step, grid=f if cfg.vae.decoder_only else 1)
        x = pixels if pix is None else torch.stack([img[:, t:t + p, left:left + p]
                                                    for img, (t, left, p) in zip(pixels, pix)])
        x_in, boxes = x, None
        if cfg.vae.decoder_only:
            x_in = pixels
            boxes = None if pix is None else [(t // f, left // f, p // f) for t, left, p in pix]
        noise = None
        if cfg.loss.latent_sample:
            shape = (self.model_config.vae.embed_dim, x_in.shape[2] // f, x_in.shape[3] // f)
            gens = [sample_generator(cfg.train.seed, step, batch["epoch"], int(i)) for i in batch["index"]]
            noise = torch.stack([torch.randn(shape, generator=g) for g in gens]).to(dev)
        moments = self.latents.moments(x_in) if self.latents is not None else None
        with autocast_context(dev, cfg.train.mixed_precision):
            recon, mean, logvar = self.wrapped(x_in, noise, boxes, moments)
        recon, mean, logvar = recon.float(), mean.float(), logvar.float()
        diff = recon - x
        err = diff.abs() if cfg.vae.reconstruction == "l1" else diff.pow(2)
        metrics: dict[str, float] = {}
        if cfg.vae.edge_weight > 0:  # object outlines weigh more; normalised so `rec` keeps its scale
            w = 1.0 + cfg.vae.edge_weight * edge_map(x)
            rec = (err * w).mean() / w.mean()
            metrics["rec_plain"] = float(err.mean().detach())
        else:
            rec = err.mean()
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).sum() / x.numel()
        loss = rec + cfg.vae.kl_weight * kl
        metrics.update(rec=float(rec.detach()), kl=float(kl.detach()))
        if self.gan_active():
            self.disc.requires_grad_(False)  # the generator step must not accumulate discriminator gradients
            g_loss = -self.disc(recon).mean()
            self.disc.requires_grad_(True)
            loss = loss + cfg.vae.gan_weight * g_loss
            metrics["g_loss"] = float(g_loss.detach())
        self._last = (x.detach(), recon.detach())
        return loss, metrics

    def after_optimizer_step(self, batch: dict[str, Any]) -> dict[str, float]:
        """One discriminator update (hinge loss) on the last micro-batch's real images and reconstructions."""
        if not self.gan_active() or self._last is None:
            return {}
        real, fake = self._last
        self.disc_opt.zero_grad(set_to_none=True)
        d_loss = F.relu(1.0 - self.disc_wrapped(real)).mean() + F.relu(1.0 + self.disc_wrapped(fake)).mean()
        if all_true(bool(torch.isfinite(d_loss).item()), self.info):
            d_loss.backward()
            self.disc_opt.step()
        self.disc_opt.zero_grad(set_to_none=True)
        return {"d_loss": float(d_loss.detach())}

    def extra_state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        if self.disc is None:
            return {}, {}
        tensors = {f"disc.{k}": v.detach().cpu().clone() for k, v in self.disc.state_dict().items()}
        opt_tensors: dict[str, Tensor] = {}
        tree = C.flatten(self.disc_opt.state_dict(), opt_tensors, "disc_optimizer")
        tensors.update(opt_tensors)
        return tensors, {"disc_optimizer": tree}

    def load_extra_state(self, tensors: dict[str, Tensor], scalars: dict[str, Any]) -> None:
        if self.disc is None:
            return
        sd = {k[len("disc."):]: v for k, v in tensors.items() if k.startswith("disc.")}
        if not sd:
            log.warning("resume: the checkpoint has no discriminator; it starts fresh")
            return
        self.disc.load_state_dict(sd)
        self.disc_opt.load_state_dict(C.unflatten(scalars["disc_optimizer"], tensors))

    # ------------------------------------------------------------------ outputs
    @torch.no_grad()
    def latent_std(self, vae: nn.Module, max_images: int = 16) -> float:
        """Std of posterior samples over the first images of the data (deterministic noise)."""
        values = []
        g = torch.Generator("cpu").manual_seed(self.cfg.train.seed)
        for i in range(min(max_images, len(self.dataset))):
            x = self.dataset[i]["pixels"][None].to(self.info.device)
            mean, logvar = vae.encode(x)
            z = mean + (0.5 * logvar).exp() * torch.randn(mean.shape, generator=g).to(mean.device)
            values.append(z.float().flatten().cpu())
        return float(torch.cat(values).std())

    def export(self) -> Path | None:
        """`<output>/vae.safetensors`: a VAE-only official-layout file (EMA weights if `ema.export`)."""
        sd = {k: full_tensor(v).detach().cpu() for k, v in self.vae.state_dict().items()}
        if self.cfg.ema.enabled and self.cfg.ema.export and self.ema is not None:
            ema = self.ema.state_dict()
            sd = {k: ema.get(f"vae.{k}", v) for k, v in sd.items()}
        path = self.output / "vae.safetensors"
        if self.info.is_main:
            vae_cfg = self.model_config.vae
            if self.cfg.vae.update_scale_factor and not self.cfg.vae.decoder_only:
                probe = AutoencoderKL(vae_cfg).to(self.info.device)
                probe.load_state_dict(sd)
                std = self.latent_std(probe.eval())
                if std > 0:
                    vae_cfg = dataclasses.replace(vae_cfg, scale_factor=round(1.0 / std, 5))
                    log.info("latent std %.4f: scale_factor set to %.5f", std, vae_cfg.scale_factor)
            mc = ModelConfig(kind="base", unet=None, vae=vae_cfg, text_l=None, text_g=None)
            ckpt = Checkpoint(path=path, config=mc, parts={"vae": sd})
            write_single_file(ckpt, path, dtype=self.save_dtype())
            log.info("wrote %s", path)
        barrier(self.info)
        return path

    @torch.no_grad()
    def sample(self) -> None:
        """Input | reconstruction pairs of the first images into `<output>/samples` (first process only)."""
        if not self.info.is_main:
            barrier(self.info)
            return
        folder = self.output / "samples"
        folder.mkdir(parents=True, exist_ok=True)
        self.vae.eval()
        for i in range(min(4, len(self.dataset))):
            x = self.dataset[i]["pixels"][None].to(self.info.device)
            with autocast_context(self.info.device, self.cfg.train.mixed_precision):
                recon = self.vae.decode(self.vae.encode(x)[0]).float()
            pair = torch.cat([x[0].cpu(), recon[0].cpu()], dim=2)
            tensor_to_pil(pair).save(folder / f"step-{self.step:08d}-{i}.png")
        self.vae.train()
        barrier(self.info)
