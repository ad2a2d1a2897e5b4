"""The SDXL trainer: one loop for full fine-tunes, LoRA, text-encoder training, the refiner and from-scratch
runs.

Read it top to bottom: distributed setup, models, the diffusion loss, caching, optimizer / schedule / EMA, the
loop machinery shared with the VAE trainer (`TrainerBase`), then the diffusion trainer itself (`Trainer`).

The objective (SDXL paper section 2.5 and appendix C; sgm `StandardDiffusionLoss` with `EpsWeighting`):

    t     ~ U{timestep_min, ..., timestep_max - 1}         (1000 discrete DDPM levels; [0, 200) for a refiner)
            or, with `loss.timestep_sampling = "logit_normal"` (SD3, Esser et al. 2024), t = t_min + floor(
            (t_max - t_min) * sigmoid(loc + scale * N(0, 1))): more of the steps where the picture takes shape
    eps   ~ N(0, I)  (+ offset_noise * N(0, 1) per sample[, channel], broadcast over the pixels)
    x_t   = sqrt(abar_t) * x0 + sqrt(1 - abar_t) * eps       (variance preserving)
    loss  = w_t * || UNet(x_t, t, context, y) - target ||^2
    target = eps, or v = sqrt(abar) eps - sqrt(1 - abar) x0 with `prediction = "v"`

x_t is exactly what the sampler feeds the UNet: in sigma space x = x0 + sigma * eps and the UNet sees
c_in * x = (x0 + sigma eps) / sqrt(1 + sigma^2); with sigma^2 = (1 - abar) / abar that is the line above.
w_t = 1, or the min-SNR-gamma weight min(SNR, gamma) / SNR (eps) or min(SNR, gamma) / (SNR + 1) (v).

Conditioning per sample, as the paper defines it: the text context (CLIP-L penultimate | bigG penultimate) and
y = [pooled bigG | fourier(orig h, w, crop top, left, target h, w)] for the base, [... | fourier(orig h, w,
crop top, left, aesthetic score)] for the refiner. A dropped caption (probability `data.ucg`) multiplies the
context AND the pooled vector by zero: the all-zero embedding is SDXL's null condition, what the official base
uses as the negative branch.

Every random number of a sample (posterior noise, timestep, noise, offset) comes from a generator seeded with
(seed, optimizer step, epoch, dataset index), so results do not depend on how the global batch is split over
processes and accumulation steps (a 2-process run equals a 1-process run with the same global batch) and a
resumed run draws the same numbers.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import datetime
import functools
import hashlib
import json
import logging
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from ..models.conditioning import micro_conditioning
from ..models.config import ModelConfig, tiny_config
from ..sampling.denoiser import DiscreteSchedule
from ..weights.io import CheckpointError, open_tensors, save_safetensors
from . import checkpointing as C
from .config import ConfigError, TrainConfig, build_config

log = logging.getLogger("sdxl.train")


class TrainingError(RuntimeError):
    """A run that cannot go on (bad data, NaN losses, an unusable checkpoint); the message says why."""


# =============================================================================================== distributed
@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False  # this run created the process group (and destroys it at the end)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup_distributed(cfg: TrainConfig) -> DistInfo:
    """Join the process group torchrun describes in the environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*).

    One process without those variables is an ordinary single-device run. The backend is nccl on GPUs and
    gloo on CPUs unless `dist.backend` says otherwise.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    want = cfg.train.device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(want)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    info = DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device)
    if world_size > 1 and not dist.is_initialized():
        backend = cfg.dist.backend
        if backend == "auto":
            backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=cfg.dist.timeout))
        info.owns_group = True
    return info


def all_true(flag: bool, info: DistInfo) -> bool:
    """True only if `flag` is true on every process (the decision every rank must take together)."""
    if not info.distributed:
        return flag
    t = torch.tensor([0 if flag else 1], dtype=torch.int32,
                     device=info.device if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return int(t.item()) == 0


def any_true(flag: bool, info: DistInfo) -> bool:
    return not all_true(not flag, info)


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def _full(t: Tensor) -> Tensor:
    """A plain tensor from a (possibly FSDP-sharded DTensor) parameter; a collective under FSDP."""
    full_tensor = getattr(t, "full_tensor", None)
    return full_tensor() if full_tensor is not None else t


def _assign(param: Tensor, value: Tensor) -> None:
    """Copy a full tensor into a parameter or EMA buffer that may be an FSDP shard."""
    with torch.no_grad():
        mesh = getattr(param, "device_mesh", None)
        if mesh is not None:
            from torch.distributed.tensor import distribute_tensor

            value = distribute_tensor(value.to(param.device, param.dtype), mesh, param.placements)
        param.copy_(value.to(param.dtype))


# =============================================================================================== models
def model_config_from(cfg: TrainConfig) -> ModelConfig:
    """The architecture of a from-scratch run (`model.config` file or `model.preset`)."""
    m = cfg.model
    if m.config:
        path = Path(m.config)
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise ConfigError(f"model.config: {path} does not exist") from None
        if path.suffix == ".toml":
            from .config import tomllib

            data = tomllib.loads(text)
            data = data.get("model", data)
        else:
            data = json.loads(text)
        return ModelConfig.from_dict(data)
    presets = {
        "tiny": lambda: tiny_config("base"),
        "tiny-refiner": lambda: tiny_config("refiner"),
        "base": ModelConfig.base,
        "refiner": ModelConfig.refiner,
    }
    if m.preset not in presets:
        raise ConfigError("set model.init (a checkpoint), model.preset or model.config")
    return presets[m.preset]()


def sgm_init_unet(unet: nn.Module) -> None:
    """sgm's from-scratch initialisation: the layers that write into a residual stream start at zero.

    `zero_module` in sgm's openaimodel.py / attention.py zeroes the UNet's output conv, the second conv of
    every ResBlock and the output projection of every SpatialTransformer, so each block starts as the identity
    and the untrained UNet predicts 0. Other weights keep PyTorch's default init.
    """
    from ..models.unet import ResBlock, SpatialTransformer

    with torch.no_grad():
        for m in unet.modules():
            if isinstance(m, ResBlock):
                nn.init.zeros_(m.out_layers[-1].weight)
                nn.init.zeros_(m.out_layers[-1].bias)
            elif isinstance(m, SpatialTransformer):
                nn.init.zeros_(m.proj_out.weight)
                if m.proj_out.bias is not None:
                    nn.init.zeros_(m.proj_out.bias)
        nn.init.zeros_(unet.out[-1].weight)
        nn.init.zeros_(unet.out[-1].bias)


def clip_init_text(tower: nn.Module) -> None:
    """CLIP's initialisation for a from-scratch text tower (the std values of OpenAI CLIP / open_clip).

    PyTorch's default N(0, 1) embeddings would dwarf the residual stream; CLIP uses 0.02 for tokens and 0.01
    for positions, width^-0.5 scaled projections, and unit LayerNorms.
    """
    cfg = tower.cfg
    width, layers = cfg.width, cfg.layers
    proj_std = width**-0.5 * (2 * layers) ** -0.5
    attn_std = width**-0.5
    fc_std = (2 * width) ** -0.5
    with torch.no_grad():
        nn.init.normal_(tower.embeddings.token_embedding.weight, std=0.02)
        nn.init.normal_(tower.embeddings.position_embedding.weight, std=0.01)
        for layer in tower.encoder.layers:
            for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                nn.init.normal_(lin.weight, std=attn_std)
                nn.init.zeros_(lin.bias)
            nn.init.normal_(layer.self_attn.out_proj.weight, std=proj_std)
            nn.init.zeros_(layer.self_attn.out_proj.bias)
            nn.init.normal_(layer.mlp.fc1.weight, std=fc_std)
            nn.init.zeros_(layer.mlp.fc1.bias)
            nn.init.normal_(layer.mlp.fc2.weight, std=proj_std)
            nn.init.zeros_(layer.mlp.fc2.bias)
        if tower.text_projection is not None:
            nn.init.normal_(tower.text_projection.weight, std=attn_std)


@dataclass
class Models:
    """The networks of one SDXL-family model and where each came from."""

    config: ModelConfig
    unet: nn.Module | None
    vae: nn.Module | None
    text: nn.Module  # TextEncoders (either tower may be None)
    from_file: set[str] = field(default_factory=set)  # parts read from a file ("unet", "vae", "text_l", ...)


def load_models(cfg: TrainConfig, device: torch.device,
                need: tuple[str, ...] = ("unet", "vae", "text")) -> Models:
    """Build the model from `model.init` (any checkpoint `sdxl inspect` reads) or from scratch.

    From scratch, the weights are drawn after `torch.manual_seed(train.seed)`, so every process (and a resumed
    run) builds the same ones. `model.vae` replaces the VAE (and its config) with another file's.
    """
    from ..models.text import CLIPTextTower, TextEncoders
    from ..models.unet import UNet
    from ..models.vae import AutoencoderKL
    from ..weights.checkpoint import build_module, read_checkpoint

    m = cfg.model
    from_file: set[str] = set()
    torch.manual_seed(cfg.train.seed)
    if m.init:
        try:
            ck = read_checkpoint(m.init, allow_pickle=m.allow_pickle)
        except CheckpointError as e:
            raise TrainingError(f"model.init: {e}") from None
        mc = ck.config
        parts = ck.parts
    else:
        mc = model_config_from(cfg)
        parts = {}
    if m.prediction:
        mc = dataclasses.replace(mc, prediction=m.prediction)
    if m.zero_terminal_snr:
        mc = dataclasses.replace(mc, zero_terminal_snr=True)
    if mc.zero_terminal_snr and mc.prediction != "v":
        raise ConfigError("model.zero_terminal_snr needs v-prediction (set model.prediction = \"v\"): at "
                          "pure noise an eps-prediction says nothing about the image")
    vae_parts = parts.get("vae")
    if m.vae:
        try:
            vck = read_checkpoint(m.vae, allow_pickle=m.allow_pickle)
        except CheckpointError as e:
            raise TrainingError(f"model.vae: {e}") from None
        if "vae" not in vck.parts:
            raise TrainingError(f"model.vae: {m.vae} holds no VAE")
        mc = dataclasses.replace(mc, vae=vck.config.vae)
        vae_parts = vck.parts["vae"]

    def build(cls, sub_cfg, part: str, sd, init_fn=None):
        if sd is not None:
            from_file.add(part)
            return build_module(cls, sub_cfg, sd, device, torch.float32, f"{m.init or m.vae} ({part})")
        if m.init and part != "vae":
            raise TrainingError(f"model.init: {m.init} has no {part} weights")
        module = cls(sub_cfg)
        if init_fn is not None:
            init_fn(module)
        return module.to(device).eval().requires_grad_(False)

    unet = vae = None
    tl = tg = None
    if "unet" in need:
        if mc.unet is None:
            raise TrainingError("the model has no UNet")
        unet = build(UNet, mc.unet, "unet", parts.get("unet"), sgm_init_unet)
    if "vae" in need:
        if mc.vae is None:
            raise TrainingError("the model has no VAE config (set model.vae to a file with one)")
        if vae_parts is None and m.init:
            raise TrainingError(f"model.init: {m.init} has no VAE; set model.vae to a checkpoint holding one")
        vae = build(AutoencoderKL, mc.vae, "vae", vae_parts)
    if "text" in need:
        if mc.text_l is not None:
            tl = build(CLIPTextTower, mc.text_l, "text_l", parts.get("text_l"), clip_init_text)
        if mc.text_g is not None:
            tg = build(CLIPTextTower, mc.text_g, "text_g", parts.get("text_g"), clip_init_text)
    text = TextEncoders(tl, tg) if (tl is not None or tg is not None) else nn.Module()
    return Models(config=mc, unet=unet, vae=vae, text=text, from_file=from_file)


def conditioning_numbers(batch: dict[str, Any], kind: str) -> Tensor:
    """The micro-conditioning numbers per sample, [B, 6] (base) or [B, 5] (refiner), float32.

    base:    (orig h, orig w, crop top, crop left, target h, target w)
    refiner: (orig h, orig w, crop top, crop left, aesthetic score)
    """
    parts = [batch["original_size"].float(), batch["crop_top_left"].float()]
    if kind == "refiner":
        parts.append(batch["aesthetic_score"].float()[:, None])
    else:
        parts.append(batch["target_size"].float())
    return torch.cat(parts, dim=1)


class DiffusionModel(nn.Module):
    """What DDP/FSDP wraps: the UNet (and the text towers when they train) with the conditioning assembly.

    forward(x_t, t, numbers, keep, context | (ids_l, ids_g)) -> the UNet's prediction.
    `keep` [B] is 0 for a dropped caption: context and pooled are multiplied by it (the null condition).
    Text towers live here only when they train; frozen towers run outside (or come from the cache).
    """

    def __init__(self, unet: nn.Module, text: nn.Module | None, kind: str, fourier_dim: int, clip_skip: int,
                 lora: nn.Module | None = None):
        super().__init__()
        self.unet = unet
        self.text = text
        self.lora = lora  # LoRANetwork: the adapters act through hooks on unet / text layers
        self.kind = kind
        self.fourier_dim = fourier_dim
        self.clip_skip = clip_skip

    def forward(self, x_t: Tensor, t: Tensor, numbers: Tensor, keep: Tensor, context: Tensor | None = None,
                pooled: Tensor | None = None, ids_l: Tensor | None = None,
                ids_g: Tensor | None = None) -> Tensor:
        if context is None:
            context, pooled = self.text.encode(ids_l, ids_g, skip=self.clip_skip)
        context = context * keep[:, None, None].to(context.dtype)
        pooled = pooled * keep[:, None].to(pooled.dtype)
        y = micro_conditioning(pooled.float(), numbers, self.fourier_dim)
        return self.unet(x_t, t, context, y)


class LoRANetwork(nn.Module):
    """The trainable LoRA layers of `sdxl.weights.lora.inject_lora`, registered under one module.

    The layers act on the UNet / tower layers through forward hooks and are not children of them, so they are
    collected here (keyed by their kohya names) where DDP, the optimizer and the checkpoints see them.
    `layers[part]` keeps the {our layer name: LoRALayer} dicts that `save_kohya` takes.
    """

    def __init__(self, layers: dict[str, dict[str, nn.Module]]):
        from ..weights.lora import kohya_name

        super().__init__()
        self.layers = layers
        for part, named in layers.items():
            self.add_module(part, nn.ModuleDict({kohya_name(part, n): layer for n, layer in named.items()}))

    def save(self, path: Path, metadata: dict[str, Any], dtype: torch.dtype | None = None) -> Path:
        from ..weights.lora import save_kohya

        return save_kohya(self.layers.get("unet"), self.layers.get("te1"), self.layers.get("te2"), path,
                          metadata, dtype)


def unused_text_parameters(text: nn.Module, clip_skip: int) -> list[str]:
    """Names (relative to the TextEncoders) of tower parameters that never reach the loss.

    A tower without a projection (CLIP-L) only gives its hidden state `clip_skip` layers before the end: its
    last `clip_skip` layers and its final LayerNorm are never run. bigG runs to the end for the pooled output.
    They are frozen so DDP does not wait for gradients that never come.
    """
    names = []
    for tower_name in ("clip_l", "clip_g"):
        tower = getattr(text, tower_name, None)
        if tower is None or tower.text_projection is not None:
            continue
        n = len(tower.encoder.layers)
        for name, _ in tower.named_parameters():
            layer_idx = None
            if name.startswith("encoder.layers."):
                layer_idx = int(name.split(".")[2])
            if name.startswith("final_layer_norm.") or (layer_idx is not None and layer_idx >= n - clip_skip):
                names.append(f"{tower_name}.{name}")
    return names


# =============================================================================================== the loss
def sample_generator(seed: int, step: int, epoch: int, index: int) -> torch.Generator:
    """The CPU generator of one sample: a pure function of (seed, optimizer step, epoch, dataset index).

    Nothing about the batch layout enters, so batch 4 on one process, batch 2 on two processes and batch 2
    with two accumulation steps draw the same numbers for the same images.
    """
    state = np.random.SeedSequence([seed, step, epoch, index]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator("cpu").manual_seed(int(state))


@dataclass
class NoiseDraw:
    """The random numbers of a batch, drawn per sample in a fixed order: posterior noise, t, eps, offset."""

    posterior: Tensor  # [B, C, h, w] standard normal, for sampling the VAE posterior
    t: Tensor  # [B] long
    noise: Tensor  # [B, C, h, w], offset noise included


def draw_timestep(g: torch.Generator, t_min: int, t_max: int, sampling: str = "uniform", loc: float = 0.0,
                  scale: float = 1.0) -> Tensor:
    """One training timestep in [t_min, t_max): uniform, or logit-normal (SD3's density over the range)."""
    if sampling == "uniform":
        return torch.randint(t_min, t_max, (1,), generator=g)
    u = torch.sigmoid(loc + scale * torch.randn((1,), generator=g, dtype=torch.float64))
    return (t_min + torch.floor(u * (t_max - t_min))).long().clamp(t_min, t_max - 1)


def draw_noise(gens: list[torch.Generator], shape: tuple[int, ...], t_min: int, t_max: int,
               offset_level: float = 0.0, offset_mode: str = "channel",
               t_sampling: tuple[str, float, float] = ("uniform", 0.0, 1.0)) -> NoiseDraw:
    posterior, ts, noises = [], [], []
    c = shape[0]
    for g in gens:
        posterior.append(torch.randn(shape, generator=g))
        ts.append(draw_timestep(g, t_min, t_max, *t_sampling))
        eps = torch.randn(shape, generator=g)
        if offset_level > 0:
            # sgm StandardDiffusionLoss: noise + level * N(0, 1) broadcast over the pixels; "sample" shares
            # one number across the channels ([B,1,1,1], the 2023 release), "channel" draws one per channel
            # ([B,C,1,1], sgm's later code).
            offset = torch.randn((c if offset_mode == "channel" else 1, 1, 1), generator=g)
            eps = eps + offset_level * offset
        noises.append(eps)
    return NoiseDraw(torch.stack(posterior), torch.cat(ts), torch.stack(noises))


def add_noise(x0: Tensor, noise: Tensor, t: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, computed in float32 with abar from the float64 table."""
    abar = alphas_cumprod.to(x0.device)[t].to(torch.float32).reshape(-1, 1, 1, 1)
    return abar.sqrt() * x0 + (1 - abar).sqrt() * noise


def prediction_target(x0: Tensor, noise: Tensor, t: Tensor, alphas_cumprod: Tensor,
                      prediction: str) -> Tensor:
    if prediction == "eps":
        return noise
    abar = alphas_cumprod.to(x0.device)[t].to(torch.float32).reshape(-1, 1, 1, 1)
    return abar.sqrt() * noise - (1 - abar).sqrt() * x0  # v (Salimans & Ho 2022)


def loss_weights(t: Tensor, alphas_cumprod: Tensor, prediction: str, min_snr_gamma: float,
                 floor: float = 0.0) -> Tensor:
    """Per-sample weights [B]: 1, or min-SNR-gamma (Hang et al. 2023) with SNR = abar / (1 - abar).

    The weight of the x0 error is min(SNR, gamma) (clamp(SNR, floor, gamma) with a floor); the eps and v
    losses already weigh it by SNR and SNR + 1, so those are divided out.
    """
    if min_snr_gamma <= 0:
        return torch.ones(t.shape[0], device=t.device)
    abar = alphas_cumprod.to(t.device)[t].to(torch.float32)
    snr = abar / (1 - abar)
    clipped = snr.clamp(min=floor, max=min_snr_gamma)
    if prediction == "eps":  # min(snr, g) / snr, which tends to 1 as snr -> 0 (zero terminal SNR)
        return torch.where(snr > 0, clipped / snr.clamp(min=1e-30), torch.ones_like(snr))
    return clipped / (snr + 1)


# =============================================================================================== caching
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


# =============================================================================================== optimisation
def build_optimizer(groups: list[dict[str, Any]], cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW (torch), Adafactor (torch.optim.Adafactor) or 8-bit AdamW (bitsandbytes, when importable)."""
    o = cfg.optim
    name = o.name
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                                 weight_decay=o.weight_decay)
    if name == "adafactor":
        return torch.optim.Adafactor(groups, lr=o.lr, weight_decay=o.weight_decay)
    if name == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ConfigError("optim.name = adamw8bit needs the bitsandbytes package") from None
        return bnb.optim.AdamW8bit(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                                   weight_decay=o.weight_decay)
    raise ConfigError(f"unknown optimizer {name!r}")


def lr_factor(step: int, total: int, warmup: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of the peak learning rate for optimizer step `step` (0-based)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, max(0.0, (step - warmup) / max(1, total - warmup)))
    if schedule == "cosine":
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "linear":
        return 1.0 - (1 - min_ratio) * progress
    raise ConfigError(f"unknown schedule {schedule!r}")


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    o = cfg.optim
    fn = functools.partial(lr_factor, total=cfg.train.steps, warmup=o.warmup_steps, schedule=o.schedule,
                           min_ratio=o.min_lr_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)


class EMA:
    """Exponential moving average of named parameters, kept in float32 (sharded like them under FSDP).

    After n updates the decay used is min(decay, (1 + n) / (10 + n)), sgm's LitEma rule, so early averages
    are not dominated by the random or pretrained starting point. The first update copies the weights (the
    average starts at `ema.start_step`, not at the weights the run started from).
    """

    def __init__(self, params: dict[str, Tensor], decay: float):
        self.decay = decay
        self.updates = 0
        self.shadow = {n: p.detach().clone().to(torch.float32) for n, p in params.items()}

    @torch.no_grad()
    def update(self, params: dict[str, Tensor]) -> None:
        d = min(self.decay, (1 + self.updates) / (10 + self.updates)) if self.updates else 0.0
        for n, p in params.items():
            self.shadow[n].lerp_(p.detach().to(torch.float32), 1.0 - d)
        self.updates += 1

    def state_dict(self) -> dict[str, Tensor]:
        """Full tensors on the CPU (a collective under FSDP: call on every process)."""
        return {n: _full(t).detach().to("cpu").clone() for n, t in self.shadow.items()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        missing = set(self.shadow) - set(state)
        if missing:
            raise TrainingError(f"EMA state lacks {sorted(missing)[:3]}")
        for n, t in self.shadow.items():
            _assign(t, state[n])


# ============================================================================================== loop plumbing
def tensorboard_writer(mode: str):
    """`torch.utils.tensorboard.SummaryWriter` for `train.tensorboard` = `auto` / `on`, or None (`off`, or
    `auto` without the package). `on` without the package is a ConfigError."""
    if mode == "off":
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
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
        import threading

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
        from torch.utils.data import DataLoader

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


def autocast_context(device: torch.device, mixed_precision: str):
    if mixed_precision == "no":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if mixed_precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def _progress_bar(enabled: bool, total: int, start: int):
    if not enabled:
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

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

    def sample(self) -> None:  # noqa: B027
        """Write sample images (nothing by default)."""

    # ------------------------------------------------------------------ setup
    def trainable(self) -> dict[str, Tensor]:
        return {n: p for n, p in self.module.named_parameters() if p.requires_grad}

    def wrap(self) -> None:
        """DDP or FSDP around `self.module` when several processes run; the module itself otherwise."""
        if not self.info.distributed:
            self.wrapped = self.module
            return
        if self.cfg.dist.strategy == "fsdp":
            self.wrapped = self.shard_fsdp(self.module)
            return
        from torch.nn.parallel import DistributedDataParallel as DDP

        device_ids = [self.info.device.index] if self.info.device.type == "cuda" else None
        self.wrapped = DDP(self.module, device_ids=device_ids)

    def shard_fsdp(self, module: nn.Module) -> nn.Module:
        """FSDP2: shard each block, then the root (torch.distributed.fsdp.fully_shard)."""
        from torch.distributed.fsdp import fully_shard

        for sub in self.fsdp_units(module):
            fully_shard(sub)
        fully_shard(module)
        return module

    def fsdp_units(self, module: nn.Module) -> list[nn.Module]:
        return []

    def setup(self) -> None:
        cfg = self.cfg
        if cfg.train.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
        tb_writer = tensorboard_writer(cfg.train.tensorboard)  # before the (slow) model build
        self.build()
        self.wrap()
        self.optimizer = build_optimizer(self.param_groups(), cfg)
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
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        model = {n: _full(p.detach()).to("cpu").clone() for n, p in self.trainable().items()}
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
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

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
            _assign(p, st.model[n])
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
        norm = float(_full(norm))
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


# =============================================================================================== diffusion
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
        self.schedule = DiscreteSchedule(zero_terminal_snr=mc.zero_terminal_snr)
        self.alphas_cumprod = self.schedule.alphas_cumprod  # float64, as sgm (last entry 0 with zero SNR)
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
            self.lora_net = self._inject_lora(models)
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
        self.module = DiffusionModel(models.unet, models.text if train_text else None, mc.kind,
                                     mc.fourier_dim, cfg.train.clip_skip, self.lora_net).to(device)
        if not any(p.requires_grad for p in self.module.parameters()):
            raise ConfigError("nothing to train: train.train_unet and train.train_text_encoders are both "
                              "false")

        # tokenizers and caches
        from ..tokenizer import CLIPTokenizer

        self.tok_l = CLIPTokenizer.clip_l() if mc.text_l is not None else None
        self.tok_g = CLIPTokenizer.bigg() if mc.text_g is not None else None
        cache_root = Path(cfg.data.cache_dir) if cfg.data.cache_dir else self.output / "cache"
        self.latent_cache = self.text_cache = None
        if cfg.data.cache_latents:
            self.latent_cache = DiskCache(cache_root / "latents")
            self.latent_salt = "latents:" + fingerprint(models.vae, mc.vae.__repr__())
        if cfg.data.cache_text and not train_text:
            self.text_cache = DiskCache(cache_root / "text")
            self.text_salt = f"text:skip={cfg.train.clip_skip}:" + fingerprint(models.text)
        self.stats = {"vae_encodes": 0, "text_encodes": 0}
        if cfg.sample.every:
            self.sample_requests()
        self.build_data()

    def build_data(self) -> None:
        from ..data.buckets import BucketBatchSampler, scaled_buckets
        from ..data.dataset import ImageCaptionDataset, collate

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
        self.sampler = BucketBatchSampler(self.dataset.bucket_of, self.cfg.train.batch_size,
                                          seed=self.cfg.train.seed, drop_last=d.drop_last, shuffle=d.shuffle,
                                          rank=self.info.rank, world_size=self.info.world_size)
        collate_fn = functools.partial(collate, default_aesthetic_score=d.default_aesthetic_score)
        self.stream = BatchStream(self.dataset, self.sampler, collate_fn, d.num_workers)
        if self.info.is_main:
            log.info("data: %d images in %d buckets, %d batches per epoch per process (%s)",
                     len(self.dataset), len(self.dataset.bucket_counts()), len(self.sampler),
                     dict(self.dataset.stats))

    def _inject_lora(self, models: Models) -> LoRANetwork:
        """LoRA layers on the UNet (and, with `lora.text_encoders`, both towers) via `sdxl.weights.lora`.

        Adapters on CLIP-L layers that never run (those after the `clip_skip` hidden state) are removed again:
        they would get no gradient and only confuse DDP and the saved file.
        """
        from ..weights.lora import inject_lora

        lc = self.cfg.lora
        kw = dict(rank=lc.rank, alpha=lc.alpha or float(lc.rank), dropout=lc.dropout)
        layers: dict[str, dict[str, nn.Module]] = {
            "unet": inject_lora(models.unet, conv=lc.conv, conv_rank=lc.conv_rank or lc.rank,
                                conv_alpha=lc.conv_alpha or float(lc.conv_rank or lc.rank), **kw),
        }
        if lc.text_encoders:
            skip = self.cfg.train.clip_skip
            for part, attr in (("te1", "clip_l"), ("te2", "clip_g")):
                tower = getattr(models.text, attr, None)
                if tower is None:
                    continue
                named = inject_lora(tower, **kw)
                if tower.text_projection is None:
                    first_unused = len(tower.encoder.layers) - skip
                    for name in list(named):
                        if name.startswith("encoder.layers.") and int(name.split(".")[2]) >= first_unused:
                            named.pop(name).remove()
                layers[part] = named
        return LoRANetwork(layers)

    def param_groups(self) -> list[dict[str, Any]]:
        """UNet (or UNet LoRA) parameters at `optim.lr`, tower (or tower LoRA) parameters at `text_lr`."""
        text_lr = self.cfg.optim.text_lr or self.cfg.optim.lr
        unet_params, text_params = [], []
        for n, p in self.module.named_parameters():
            if p.requires_grad:
                is_text = n.startswith(("text.", "lora.te1.", "lora.te2."))
                (text_params if is_text else unet_params).append(p)
        groups = []
        if unet_params:
            groups.append({"params": unet_params, "lr": self.cfg.optim.lr})
        if text_params:
            groups.append({"params": text_params, "lr": text_lr})
        return groups

    def fsdp_units(self, module: nn.Module) -> list[nn.Module]:
        from ..models.text import CLIPEncoderLayer
        from ..models.unet import ResBlock, SpatialTransformer

        blocks = (ResBlock, SpatialTransformer, CLIPEncoderLayer)
        return [m for m in module.modules() if isinstance(m, blocks)]

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

    # ------------------------------------------------------------------ data -> tensors
    def tokenize(self, captions: list[str]) -> tuple[Tensor | None, Tensor | None]:
        dev = self.info.device
        ids_l = self.tok_l(captions).to(dev) if self.tok_l is not None else None
        ids_g = self.tok_g(captions).to(dev) if self.tok_g is not None else None
        return ids_l, ids_g

    @torch.no_grad()
    def frozen_text(self, captions: list[str]) -> tuple[Tensor, Tensor]:
        """(context, pooled) from the frozen towers, through the disk cache when enabled."""
        text = self.models.text
        if self.text_cache is None:
            self.stats["text_encodes"] += len(captions)
            ids_l, ids_g = self.tokenize(captions)
            with autocast_context(self.info.device, self.cfg.train.mixed_precision):
                ctx, pooled = text.encode(ids_l, ids_g, skip=self.cfg.train.clip_skip)
            return ctx.float(), pooled.float()
        found: dict[str, dict[str, Tensor]] = {}
        missing = []
        for c in dict.fromkeys(captions):
            hit = self.text_cache.get(caption_key(c, self.text_salt))
            if hit is None:
                missing.append(c)
            else:
                found[c] = hit
        if missing:
            self.stats["text_encodes"] += len(missing)
            ids_l, ids_g = self.tokenize(missing)
            ctx, pooled = text.encode(ids_l, ids_g, skip=self.cfg.train.clip_skip)
            for i, c in enumerate(missing):
                entry = {"context": ctx[i].float().cpu(), "pooled": pooled[i].float().cpu()}
                self.text_cache.put(caption_key(c, self.text_salt), entry)
                found[c] = entry
        dev = self.info.device
        context = torch.stack([found[c]["context"] for c in captions]).to(dev)
        pooled = torch.stack([found[c]["pooled"] for c in captions]).to(dev)
        return context, pooled

    @torch.no_grad()
    def latent_moments(self, pixels: Tensor) -> tuple[Tensor, Tensor]:
        """VAE posterior (mean, logvar), unscaled, float32 on the device; cached per prepared image if on."""
        vae = self.models.vae
        dev = self.info.device
        if self.latent_cache is None:
            self.stats["vae_encodes"] += pixels.shape[0]
            mean, logvar = vae.encode(pixels.to(dev))
            return mean.float(), logvar.float()
        keys = [pixels_key(p, self.latent_salt) for p in pixels]
        entries: list[dict[str, Tensor] | None] = [self.latent_cache.get(k) for k in keys]
        todo = [i for i, e in enumerate(entries) if e is None]
        if todo:
            self.stats["vae_encodes"] += len(todo)
            mean, logvar = vae.encode(pixels[todo].to(dev))
            for j, i in enumerate(todo):
                entries[i] = {"mean": mean[j].float().cpu(), "logvar": logvar[j].float().cpu()}
                self.latent_cache.put(keys[i], entries[i])
        mean = torch.stack([e["mean"] for e in entries]).to(dev)
        logvar = torch.stack([e["logvar"] for e in entries]).to(dev)
        return mean, logvar

    def compute_loss(self, batch: dict[str, Any], step: int) -> tuple[Tensor, dict[str, float]]:
        cfg = self.cfg
        dev = self.info.device
        vae_cfg = self.models.config.vae
        mean, logvar = self.latent_moments(batch["pixels"])
        gens = [sample_generator(cfg.train.seed, step, batch["epoch"], int(i)) for i in batch["index"]]
        lo = cfg.loss
        draw = draw_noise(gens, tuple(mean.shape[1:]), lo.timestep_min, self.t_max, lo.offset_noise,
                          lo.offset_noise_mode, (lo.timestep_sampling, lo.timestep_loc, lo.timestep_scale))
        z = mean + (0.5 * logvar).exp() * draw.posterior.to(dev) if cfg.loss.latent_sample else mean
        x0 = (z - vae_cfg.shift_factor) * vae_cfg.scale_factor
        t = draw.t.to(dev)
        noise = draw.noise.to(dev)
        x_t = add_noise(x0, noise, t, self.alphas_cumprod)
        target = prediction_target(x0, noise, t, self.alphas_cumprod, self.models.config.prediction)
        numbers = conditioning_numbers(batch, self.kind).to(dev)
        keep = (~batch["drop_caption"]).to(dev, torch.float32)
        with autocast_context(dev, cfg.train.mixed_precision):
            if self.train_text:
                ids_l, ids_g = self.tokenize(batch["caption"])
                pred = self.wrapped(x_t, t, numbers, keep, ids_l=ids_l, ids_g=ids_g)
            else:
                context, pooled = self.frozen_text(batch["caption"])
                pred = self.wrapped(x_t, t, numbers, keep, context=context, pooled=pooled)
        err = F.mse_loss(pred.float(), target, reduction="none")
        if "mask" in batch:  # kohya's masked loss: the mask, at latent resolution, weights the error
            m = F.adaptive_avg_pool2d(batch["mask"].to(dev, torch.float32), err.shape[-2:])
            m = cfg.loss.mask_floor + (1.0 - cfg.loss.mask_floor) * m
            per_sample = (err * m).sum(dim=(1, 2, 3)) / (m.sum(dim=(1, 2, 3)) * err.shape[1]).clamp_min(1e-8)
        else:
            per_sample = err.mean(dim=(1, 2, 3))
        w = loss_weights(t, self.alphas_cumprod, self.models.config.prediction, cfg.loss.min_snr_gamma,
                         cfg.loss.min_snr_floor)
        loss = (per_sample * w).mean()
        return loss, {}

    # ------------------------------------------------------------------ outputs
    def _current_parts(self, use_ema: bool) -> dict[str, dict[str, Tensor]]:
        """Every component's state dict (our naming), with the EMA weights substituted if asked."""
        m = self.models
        ema = self.ema.state_dict() if (use_ema and self.ema is not None) else {}
        trained = {n: _full(p.detach()).cpu() for n, p in self.trainable().items()}
        trained.update(ema)
        parts: dict[str, dict[str, Tensor]] = {}
        unet_sd = {k: _full(v).cpu() for k, v in m.unet.state_dict().items()}
        parts["unet"] = {k: trained.get(f"unet.{k}", v) for k, v in unet_sd.items()}
        if m.vae is not None:
            parts["vae"] = {k: v.cpu() for k, v in m.vae.state_dict().items()}
        for part, attr in (("text_l", "clip_l"), ("text_g", "clip_g")):
            tower = getattr(m.text, attr, None)
            if tower is not None:
                sd = {k: _full(v).cpu() for k, v in tower.state_dict().items()}
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
        from ..weights.checkpoint import Checkpoint, write_single_file

        parts = self._current_parts(use_ema)  # collective under FSDP
        path = self.output / "model.safetensors"
        if self.info.is_main:
            dtype = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[self.cfg.train.save_dtype]
            ckpt = Checkpoint(path=path, config=self.models.config, parts=parts)
            write_single_file(ckpt, path, dtype=dtype)
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
            dtype = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[self.cfg.train.save_dtype]
            return self.lora_net.save(path, meta, dtype)
        finally:
            for n, t in saved.items():
                params[n].copy_(t)

    def sample_requests(self) -> list:
        """One validated `GenerationRequest` per `[sample]` prompt (bad settings fail at setup, not later)."""
        from ..request import GenerationRequest, RequestError

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
    def sample(self) -> None:
        """Images from the current weights via the pipeline (`SDXL.generate`), into `<output>/samples`."""
        requests = self.sample_requests()
        if not requests:
            return
        sharded = self.info.distributed and self.cfg.dist.strategy == "fsdp"
        if not (self.info.is_main or sharded):
            barrier(self.info)
            return
        from ..pipeline import SDXL

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
        barrier(self.info)


# =============================================================================================== entry points
def make_trainer(cfg: TrainConfig) -> TrainerBase:
    if cfg.train.task == "vae":
        from .vae_trainer import VAETrainer

        return VAETrainer(cfg)
    return Trainer(cfg)


def run(cfg: TrainConfig) -> TrainResult:
    """Train according to `cfg` (single process, or one rank of a torchrun job). Returns what was done."""
    info = setup_distributed(cfg)
    trainer = make_trainer(cfg)
    trainer.info = info
    try:
        trainer.setup()
        return trainer.train()
    except RuntimeError as e:
        if not info.distributed or isinstance(e, TrainingError) or not _lost_contact(e):
            raise
        detail = str(e).strip().splitlines()[0].split("] ", 1)[-1].split(". ")[0]
        raise TrainingError(
            f"rank {info.rank} of {info.world_size} lost contact with the other training processes "
            f"({detail}); a process died or hung (see dist.timeout): restart all of them with --resume to "
            "continue from the newest complete checkpoint") from e
    finally:
        if info.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _lost_contact(e: RuntimeError) -> bool:
    """A collective that failed because another process died (connection reset) or hung (timeout)."""
    text = str(e)
    words = ("gloo", "NCCL", "Connection reset", "Connection closed", "Timed out", "timed out")
    return isinstance(e, dist.DistError) or any(w in text for w in words)


def train_main(options: dict[str, Any]) -> int:
    """The `sdxl train` command: options as `config.build_config` takes them. Returns the exit status.

    0: finished, or stopped by SIGINT/SIGTERM after saving; 1: a training error (printed as one line);
    2: a configuration error.
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = build_config(options)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        result = run(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if int(os.environ.get("RANK", "0")) == 0:
        what = f"stopped ({result.stop_reason}; continue with --resume)" if result.interrupted else "finished"
        print(f"{what} at step {result.step}; output in {result.output}"
              + (f"; model: {result.exported}" if result.exported else ""))
    return 0
