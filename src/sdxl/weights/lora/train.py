"""Training LoRAs: trainable `LoRALayer`s hung on the kohya default targets (`inject_lora`), saved and
loaded under kohya names with the `ss_*` metadata A1111 / ComfyUI / kohya tools read."""

from __future__ import annotations

import datetime
import json
import math
import os
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...models.text import CLIPMLP, CLIPAttention
from ...models.unet import Downsample, ResBlock, SpatialTransformer, Upsample
from ..io import open_tensors, save_safetensors, tensor_data_sha256
from .patch import hold_unfused, qkv_parents, release_unfused
from .read import LoraError

# ---------------------------------------------------------------------------------------------------------
# Training: inject trainable LoRA layers, save / load them in kohya format
# ---------------------------------------------------------------------------------------------------------


class LoRALayer(nn.Module):
    """A trainable low-rank branch hung on one Linear / Conv2d with a forward hook (kohya `LoRAModule` maths):

        out = layer(x) + multiplier * (alpha / rank) * lora_up(dropout(lora_down(x)))

    lora_down: Linear(in, rank) or Conv2d(in, rank, the layer's kernel / stride / padding); lora_up:
    Linear(rank, out) or a 1x1 Conv2d, zero-initialised so that training starts from the unchanged model. The
    layer itself is not a child of the target, so the base model's state dict keeps its names; collect the
    layers (the dict `inject_lora` returns) for the optimiser, `.to()` and saving.
    """

    def __init__(
        self,
        target: nn.Module,
        rank: int,
        alpha: float | None = None,
        dropout: float = 0.0,
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        device = target.weight.device
        if isinstance(target, nn.Linear):
            self.lora_down = nn.Linear(target.in_features, rank, bias=False, device=device, dtype=dtype)
            self.lora_up = nn.Linear(rank, target.out_features, bias=False, device=device, dtype=dtype)
        elif isinstance(target, nn.Conv2d):
            self.lora_down = nn.Conv2d(
                target.in_channels,
                rank,
                target.kernel_size,
                target.stride,
                target.padding,
                target.dilation,
                bias=False,
                device=device,
                dtype=dtype,
            )
            self.lora_up = nn.Conv2d(rank, target.out_channels, 1, bias=False, device=device, dtype=dtype)
        else:
            raise LoraError(f"LoRA needs a Linear or Conv2d layer, got {type(target).__name__}")
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)
        alpha = float(rank) if not alpha else float(alpha)  # kohya: alpha 0 / None = rank (scale 1)
        self.register_buffer("alpha", torch.tensor(alpha, dtype=torch.float32))
        self.rank = rank
        self.scale = alpha / rank
        self.dropout = dropout
        self.multiplier = 1.0
        self._target = [target]  # a list, so that the target is not registered as a submodule
        self._held: list[nn.Module] = []  # attention modules kept off their fused-qkv path (see inject_lora)
        self._handle = target.register_forward_hook(self._hook)

    def forward(self, x: Tensor) -> Tensor:
        """The branch's output for the target's input x."""
        h = self.lora_down(x.to(self.lora_down.weight.dtype))
        if self.dropout and self.training:
            h = F.dropout(h, p=self.dropout)
        return self.lora_up(h) * (self.multiplier * self.scale)

    def _hook(self, module: nn.Module, args: tuple, output: Tensor) -> Tensor:
        return output + self(args[0]).to(output.dtype)

    def remove(self) -> None:
        """Detach from the target layer (it computes its plain output again)."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
            release_unfused(self._held)
            self._held = []


_TARGET_KINDS = ("attn", "ff", "mlp", "proj")


def _lora_targets(root: nn.Module, targets: Iterable[str], conv: bool) -> dict[str, tuple[nn.Module, bool]]:
    """name -> (layer, is_conv_kind) for the kohya targets of our UNet / text tower.

    UNet: inside each SpatialTransformer, attn1/attn2 q/k/v/out ("attn"), ff.net.0.proj / ff.net.2 ("ff"),
    proj_in / proj_out ("proj"); with conv=True also every layer of the ResBlocks, Downsamples and Upsamples
    (as kohya's conv_dim: the 3x3 convs get the conv rank, emb_layers / 1x1 skip the normal rank).
    Text: self_attn q/k/v/out_proj ("attn") and mlp fc1 / fc2 ("ff" or "mlp").
    """
    targets = set(targets)
    unknown = targets - set(_TARGET_KINDS)
    if unknown:
        raise ValueError(f"unknown LoRA targets {sorted(unknown)}; choose from {_TARGET_KINDS}")
    want_ff = bool(targets & {"ff", "mlp"})
    found: dict[str, tuple[nn.Module, bool]] = {}
    for cname, container in root.named_modules():
        prefix = cname + "." if cname else ""
        if isinstance(container, SpatialTransformer):
            for child, layer in container.named_modules():
                if not isinstance(layer, (nn.Linear, nn.Conv2d)):
                    continue
                leaf = child.split(".")
                if child in ("proj_in", "proj_out"):
                    kind = "proj"
                elif "attn1" in leaf or "attn2" in leaf:
                    kind = "attn"
                elif "ff" in leaf:
                    kind = "ff"
                else:
                    continue
                if kind in targets or (kind == "ff" and want_ff):
                    found[prefix + child] = (layer, False)
        elif isinstance(container, (CLIPAttention, CLIPMLP)):
            kind = "attn" if isinstance(container, CLIPAttention) else "ff"
            if kind in targets or (kind == "ff" and want_ff):
                for child, layer in container.named_modules():
                    if isinstance(layer, nn.Linear):
                        found[prefix + child] = (layer, False)
        elif conv and isinstance(container, (ResBlock, Downsample, Upsample)):
            for child, layer in container.named_modules():
                if isinstance(layer, (nn.Linear, nn.Conv2d)):
                    is_kxk = isinstance(layer, nn.Conv2d) and tuple(layer.kernel_size) != (1, 1)
                    found[prefix + child] = (layer, is_kxk)
    return found


def inject_lora(
    module: nn.Module,
    rank: int,
    alpha: float,
    dropout: float = 0.0,
    targets: Iterable[str] = ("attn", "ff", "proj"),
    conv: bool = False,
    conv_rank: int | None = None,
    conv_alpha: float | None = None,
    dtype: torch.dtype = torch.float32,
) -> dict[str, LoRALayer]:
    """Hang trainable `LoRALayer`s on the kohya default targets of our UNet or of ONE text tower.

    Returns {layer name relative to `module`: LoRALayer}; those names are what `save_kohya` writes, so call it
    on the UNet itself and on each `CLIPTextTower` (not on a wrapper). The base weights are not frozen here.
    Attention modules that fuse q/k/v into one matmul are switched to separate projections, because that
    path would bypass the hooks. conv=True adds the ResBlock / Down- / Upsample layers (LoCon); their k x k
    convs use conv_rank / conv_alpha (default: rank / alpha).
    """
    layers: dict[str, LoRALayer] = {}
    for name, (layer, is_kxk) in _lora_targets(module, targets, conv).items():
        r = (conv_rank or rank) if is_kxk else rank
        a = (alpha if conv_alpha is None else conv_alpha) if is_kxk else alpha
        lora_layer = LoRALayer(layer, r, a, dropout, dtype)
        lora_layer._held = qkv_parents(module, [name])
        hold_unfused(lora_layer._held)
        layers[name] = lora_layer
    return layers


def kohya_name(part: str, name: str) -> str:
    """Our layer name -> kohya's: lora_unet_<sgm name>, lora_te1_text_model_<tower name>, "." -> "_"."""
    if part == "unet":
        full, prefix = name, "lora_unet"
    elif part in ("te1", "te2"):
        full = name if name.startswith("text_model.") or name == "text_projection" else "text_model." + name
        prefix = "lora_" + part
    else:
        raise ValueError(f"unknown LoRA part {part!r}")
    return prefix + "_" + full.replace(".", "_")


def kohya_state_dict(
    layers_unet: Mapping[str, LoRALayer] | None = None,
    layers_te1: Mapping[str, LoRALayer] | None = None,
    layers_te2: Mapping[str, LoRALayer] | None = None,
    dtype: torch.dtype | None = None,
) -> dict[str, Tensor]:
    """The kohya tensors: <name>.lora_down.weight / .lora_up.weight (in `dtype` if given) and <name>.alpha."""
    out: dict[str, Tensor] = {}
    for part, layers in (("unet", layers_unet), ("te1", layers_te1), ("te2", layers_te2)):
        for name, layer in (layers or {}).items():
            k = kohya_name(part, name)
            down, up = layer.lora_down.weight.detach(), layer.lora_up.weight.detach()
            out[f"{k}.lora_down.weight"] = down.to(dtype) if dtype else down
            out[f"{k}.lora_up.weight"] = up.to(dtype) if dtype else up
            out[f"{k}.alpha"] = layer.alpha.detach().float().cpu()
    return out


def save_kohya(
    layers_unet: Mapping[str, LoRALayer] | None,
    layers_te1: Mapping[str, LoRALayer] | None,
    layers_te2: Mapping[str, LoRALayer] | None,
    path: str | os.PathLike,
    metadata: Mapping[str, object] | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write the layers as a kohya LoRA .safetensors (atomic), with the `ss_*` and `modelspec.*` metadata.

    `metadata` entries are added last (values turned into strings) and override the defaults.
    """
    tensors = kohya_state_dict(layers_unet, layers_te1, layers_te2, dtype)
    if not tensors:
        raise LoraError("no LoRA layers to save")
    all_layers = [lay for d in (layers_unet, layers_te1, layers_te2) if d for lay in d.values()]
    is_kxk = [
        isinstance(lay.lora_down, nn.Conv2d) and tuple(lay.lora_down.kernel_size) != (1, 1)
        for lay in all_layers
    ]
    linear = [lay for lay, k in zip(all_layers, is_kxk) if not k]
    kxk = [lay for lay, k in zip(all_layers, is_kxk) if k]
    main = linear or kxk
    rank = Counter(lay.rank for lay in main).most_common(1)[0][0]
    alpha = Counter(float(lay.alpha) for lay in main).most_common(1)[0][0]
    path = Path(path)
    meta: dict[str, str] = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(alpha),
        "ss_base_model_version": "sdxl_base_v1-0",
        "ss_v2": "False",
        "ss_network_train_unet_only": str(not (layers_te1 or layers_te2)),
        "ss_network_train_text_encoder_only": str(not layers_unet),
        "ss_output_name": path.stem,
        "sshs_model_hash": tensor_data_sha256(tensors),  # kohya's "addnet" hash
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
        "modelspec.title": path.stem,
        "modelspec.resolution": "1024x1024",
        "modelspec.date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S"),
    }
    dropouts = {lay.dropout for lay in all_layers}
    if dropouts != {0.0}:
        meta["ss_network_dropout"] = str(max(dropouts))
    if kxk:
        conv_rank = Counter(lay.rank for lay in kxk).most_common(1)[0][0]
        conv_alpha = Counter(float(lay.alpha) for lay in kxk).most_common(1)[0][0]
        meta["ss_network_args"] = json.dumps({"conv_dim": str(conv_rank), "conv_alpha": str(conv_alpha)})
    for k, v in (metadata or {}).items():
        meta[str(k)] = v if isinstance(v, str) else json.dumps(v) if isinstance(v, (dict, list)) else str(v)
    return save_safetensors(tensors, path, meta)


@torch.no_grad()
def load_lora_layers(
    source: str | os.PathLike | Mapping[str, Tensor],
    layers_unet: Mapping[str, LoRALayer] | None = None,
    layers_te1: Mapping[str, LoRALayer] | None = None,
    layers_te2: Mapping[str, LoRALayer] | None = None,
) -> list[str]:
    """Load a kohya file (or tensors) such as `save_kohya` writes into injected layers, to resume training.

    Returns the kohya names of the layers the source has no tensors for; raises `LoraError` on a shape
    mismatch.
    """
    tensors = source if isinstance(source, Mapping) else open_tensors(source)
    missing = []
    for part, layers in (("unet", layers_unet), ("te1", layers_te1), ("te2", layers_te2)):
        for name, layer in (layers or {}).items():
            k = kohya_name(part, name)
            if f"{k}.lora_down.weight" not in tensors or f"{k}.lora_up.weight" not in tensors:
                missing.append(k)
                continue
            for sub, target in (("lora_down", layer.lora_down.weight), ("lora_up", layer.lora_up.weight)):
                t = tensors[f"{k}.{sub}.weight"]
                if tuple(t.shape) != tuple(target.shape):
                    raise LoraError(
                        f"{k}.{sub}.weight has shape {tuple(t.shape)}, the layer {tuple(target.shape)}"
                    )
                target.copy_(t)
            if f"{k}.alpha" in tensors:
                alpha = float(tensors[f"{k}.alpha"].float().reshape(-1)[0]) or float(layer.rank)
                layer.alpha.fill_(alpha)
                layer.scale = alpha / layer.rank
    return missing


