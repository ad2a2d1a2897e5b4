"""The networks a run trains: the architecture of a from-scratch run and its initialisation, loading from
`model.init` / `model.vae`, the text towers (which of their parameters can reach the loss, LoRA adapters on
them), and the modules that DDP / FSDP wrap (`DiffusionModel`, `LoRANetwork`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import CheckpointError
from ..models.conditioning import micro_conditioning
from ..models.config import ModelConfig, tiny_config
from ..models.text import CLIPEncoderLayer, CLIPTextTower, TextEncoders
from ..models.unet import ResBlock, SpatialTransformer, UNet
from ..models.vae import AutoencoderKL
from ..weights.checkpoint import build_module, read_checkpoint
from ..weights.lora import inject_lora, kohya_name, save_kohya
from .config import ConfigError, LoRASection, TrainConfig, TrainingError, tomllib

# the units FSDP shards one by one (then the root): every residual block of the UNet and the towers
FSDP_BLOCKS = (ResBlock, SpatialTransformer, CLIPEncoderLayer)


def autocast_context(device: torch.device, mixed_precision: str):
    """`torch.autocast` for `train.mixed_precision` = bf16 / fp16; a no-op context for `no`."""
    if mixed_precision == "no":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if mixed_precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


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


class DiffusionModel(nn.Module):
    """What DDP/FSDP wraps: the UNet (and the text towers when they train) with the conditioning assembly.

    forward(x_t, t, numbers, keep, context | (ids_l, ids_g)) -> the UNet's prediction.
    `keep` [B] is 0 for a dropped caption: context and pooled are multiplied by it (the null condition).
    Text towers live here only when they train; frozen towers run outside (or come from the cache).
    """

    def __init__(self, unet: nn.Module, text: nn.Module | None, fourier_dim: int, clip_skip: int,
                 lora: nn.Module | None = None):
        super().__init__()
        self.unet = unet
        self.text = text
        self.lora = lora  # LoRANetwork: the adapters act through hooks on unet / text layers
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
        super().__init__()
        self.layers = layers
        for part, named in layers.items():
            self.add_module(part, nn.ModuleDict({kohya_name(part, n): layer for n, layer in named.items()}))

    def save(self, path: Path, metadata: dict[str, Any], dtype: torch.dtype | None = None) -> Path:
        return save_kohya(self.layers.get("unet"), self.layers.get("te1"), self.layers.get("te2"), path,
                          metadata, dtype)


def inject_lora_network(models: Models, lc: LoRASection, clip_skip: int) -> LoRANetwork:
    """LoRA layers on the UNet (and, with `lora.text_encoders`, both towers) via `sdxl.weights.lora`.

    Adapters on CLIP-L layers that never run (those after the `clip_skip` hidden state) are removed again:
    they would get no gradient and only confuse DDP and the saved file.
    """
    kw = dict(rank=lc.rank, alpha=lc.alpha or float(lc.rank), dropout=lc.dropout, algo=lc.algo, dora=lc.dora,
              factor=lc.factor)
    layers: dict[str, dict[str, nn.Module]] = {
        "unet": inject_lora(models.unet, conv=lc.conv, conv_rank=lc.conv_rank or lc.rank,
                            conv_alpha=lc.conv_alpha or float(lc.conv_rank or lc.rank), **kw),
    }
    if lc.text_encoders:
        for part, attr in (("te1", "clip_l"), ("te2", "clip_g")):
            tower = getattr(models.text, attr, None)
            if tower is None:
                continue
            named = inject_lora(tower, **kw)
            if tower.text_projection is None:
                first_unused = len(tower.encoder.layers) - clip_skip
                for name in list(named):
                    if name.startswith("encoder.layers.") and int(name.split(".")[2]) >= first_unused:
                        named.pop(name).remove()
            layers[part] = named
    return LoRANetwork(layers)
