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


class _HookedAdapter(nn.Module):
    """What every trained adapter layer shares: it runs as a forward hook on its target layer (`_handle`),
    holding some attention modules off their fused-qkv path (`_held`) while attached."""

    _handle = None
    _held: list[nn.Module]

    def remove(self) -> None:
        """Detach from the target layer (it computes its plain output again)."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
            release_unfused(self._held)
            self._held = []


class LoRALayer(_HookedAdapter):
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
        dora: bool = False,
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
        self.register_parameter("dora_scale", None)
        if dora:
            # DoRA magnitude, one per output channel: the row norms of the base weight (kohya / LyCORIS
            # `dora_scale` shape [out, 1] or [out, 1, 1, 1]; PEFT's initialisation)
            w = target.weight.detach().float()
            norm = w.flatten(1).norm(dim=1).reshape(w.shape[0], *[1] * (w.ndim - 1))
            self.dora_scale = nn.Parameter(norm.to(device))
        self._handle = target.register_forward_hook(self._hook)

    @property
    def is_kxk(self) -> bool:
        """True when the target is a k x k convolution (k > 1): LoCon's conv rank applies."""
        return isinstance(self.lora_down, nn.Conv2d) and tuple(self.lora_down.kernel_size) != (1, 1)

    def forward(self, x: Tensor) -> Tensor:
        """The branch's output for the target's input x."""
        h = self.lora_down(x.to(self.lora_down.weight.dtype))
        if self.dropout and self.training:
            h = F.dropout(h, p=self.dropout)
        return self.lora_up(h) * (self.multiplier * self.scale)

    def _hook(self, module: nn.Module, args: tuple, output: Tensor) -> Tensor:
        if self.dora_scale is None:
            return output + self(args[0]).to(output.dtype)
        return self._dora_output(module, args[0], output)

    def dense_update(self) -> Tensor:
        """scale * up @ down as a float32 [out, in * kh * kw] matrix (without the multiplier)."""
        up, down = self.lora_up.weight.float().flatten(1), self.lora_down.weight.float().flatten(1)
        return self.scale * (up @ down)

    def _dora_output(self, module: nn.Module, x: Tensor, output: Tensor) -> Tensor:
        """DoRA: W' = m * (W + dW) / (||W + dW|| + eps), the norm per output channel; since that is a
        per-channel factor r, W'x = r * (Wx + dW x). Blended as W + multiplier * (W' - W), as the reader
        applies the saved file."""
        w = module.weight.detach().float()
        norm = (w.flatten(1) + self.dense_update()).norm(dim=1) + torch.finfo(torch.float32).eps
        r = self.dora_scale.flatten() / norm
        bias = module.bias
        base = output.float()
        if bias is not None:
            base = base - self._channels(bias.detach().float(), output)
        branch = self.lora_up(self._dropped(self.lora_down(x.to(self.lora_down.weight.dtype)))).float()
        merged = self._channels(r, output) * (base + self.scale * branch)
        return (output.float() + self.multiplier * (merged - base)).to(output.dtype)

    def _dropped(self, h: Tensor) -> Tensor:
        return F.dropout(h, p=self.dropout) if self.dropout and self.training else h

    @staticmethod
    def _channels(v: Tensor, output: Tensor) -> Tensor:
        """A per-output-channel vector shaped to broadcast over `output` ([..., out] or [B, out, H, W])."""
        return v.reshape(-1, 1, 1) if output.ndim == 4 else v

    def file_tensors(self, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
        """The kohya tensors of this layer, by key suffix (`dtype` for the weights; alpha stays float32)."""
        out = {"lora_down.weight": self.lora_down.weight.detach(),
               "lora_up.weight": self.lora_up.weight.detach()}
        if self.dora_scale is not None:
            out["dora_scale"] = self.dora_scale.detach()
        out = {k: (t.to(dtype) if dtype else t) for k, t in out.items()}
        out["alpha"] = self.alpha.detach().float().cpu()
        return out



def lokr_factors(dimension: int, factor: int = -1) -> tuple[int, int]:
    """Split `dimension` into (m, n), m <= n, m * n = dimension, for a LoKr layer (LyCORIS' rule).

    factor > 0 that divides `dimension`: (factor, dimension / factor), smaller first. Otherwise the divisor
    pair whose smaller member is as large as possible while not above `factor` (any, for factor -1), going
    up from (1, dimension) while m + n does not grow: the most balanced split allowed.
    """
    if factor > 0 and dimension % factor == 0:
        m, n = factor, dimension // factor
        return (m, n) if m <= n else (n, m)
    limit = dimension if factor <= 0 else factor
    m, n = 1, dimension
    for cand in range(2, dimension + 1):
        if dimension % cand:
            continue
        other = dimension // cand
        if cand > other or cand > limit or cand + other > m + n:
            break
        m, n = cand, other
    return m, n


class LoKrLayer(_HookedAdapter):
    """A trainable LoKr (Kronecker product) update hung on one Linear / Conv2d with a forward hook:

        out = layer(x) + multiplier * scale * (kron(lokr_w1, w2) applied to x)

    with the weight shape [out, in(, kh, kw)] split as out = out_l * out_k, in = in_m * in_n
    (`lokr_factors(dim, factor)`): lokr_w1 [out_l, in_m]; w2 is either whole, lokr_w2 [out_k, in_n(, kh, kw)],
    or, when rank < max(out_k, in_n) / 2, decomposed as lokr_w2_a [out_k, rank] @ lokr_w2_b
    [rank, in_n * kh * kw]. LyCORIS' initialisation: lokr_w1 and lokr_w2_a Kaiming-uniform, lokr_w2 /
    lokr_w2_b zero (the model starts unchanged); scale = alpha / rank when w2 is decomposed, else 1 (as
    LyCORIS and our reader apply the saved `lokr_w1`, `lokr_w2(_a/_b)`, `alpha` keys).
    """

    def __init__(
        self,
        target: nn.Module,
        rank: int,
        alpha: float | None = None,
        factor: int = -1,
        dropout: float = 0.0,
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        if not isinstance(target, (nn.Linear, nn.Conv2d)):
            raise LoraError(f"LoKr needs a Linear or Conv2d layer, got {type(target).__name__}")
        w = target.weight
        device = w.device
        out_dim, in_dim, kernel = w.shape[0], w.shape[1], tuple(w.shape[2:])
        out_l, out_k = lokr_factors(out_dim, factor)
        in_m, in_n = lokr_factors(in_dim, factor)
        self.lokr_w1 = nn.Parameter(torch.empty(out_l, in_m, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.lokr_w1, a=math.sqrt(5))
        self.decomposed = rank < max(out_k, in_n) / 2
        if self.decomposed:
            ksize = math.prod(kernel) if kernel else 1
            self.lokr_w2_a = nn.Parameter(torch.empty(out_k, rank, device=device, dtype=dtype))
            self.lokr_w2_b = nn.Parameter(torch.zeros(rank, in_n * ksize, device=device, dtype=dtype))
            nn.init.kaiming_uniform_(self.lokr_w2_a, a=math.sqrt(5))
        else:
            self.lokr_w2 = nn.Parameter(torch.zeros(out_k, in_n, *kernel, device=device, dtype=dtype))
        alpha = float(rank) if not alpha else float(alpha)
        self.register_buffer("alpha", torch.tensor(alpha, dtype=torch.float32))
        self.rank = rank
        self.scale = alpha / rank if self.decomposed else 1.0
        self.factor = factor
        self.dropout = dropout
        self.multiplier = 1.0
        self.is_kxk = isinstance(target, nn.Conv2d) and kernel != (1, 1)
        self._target = [target]
        self._held: list[nn.Module] = []
        self._handle = target.register_forward_hook(self._hook)

    def dense_update(self) -> Tensor:
        """scale * kron(w1, w2) shaped as the target's weight, float32 (without the multiplier)."""
        weight = self._target[0].weight
        w2 = self.lokr_w2_a.float() @ self.lokr_w2_b.float() if self.decomposed else self.lokr_w2.float()
        dw = torch.kron(self.lokr_w1.float(), w2.flatten(1))
        return self.scale * dw.reshape(weight.shape)

    def _hook(self, module: nn.Module, args: tuple, output: Tensor) -> Tensor:
        x = args[0]
        if self.dropout and self.training:
            x = F.dropout(x, p=self.dropout)
        dw = self.dense_update().to(x.dtype)
        if isinstance(module, nn.Linear):
            delta = F.linear(x, dw)
        else:
            delta = F.conv2d(x, dw, None, module.stride, module.padding, module.dilation, module.groups)
        return output + (self.multiplier * delta).to(output.dtype)

    def file_tensors(self, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
        """The LyCORIS / kohya tensors of this layer, by key suffix."""
        names = ("lokr_w1", "lokr_w2_a", "lokr_w2_b") if self.decomposed else ("lokr_w1", "lokr_w2")
        out = {n: getattr(self, n).detach() for n in names}
        out = {k: (t.to(dtype) if dtype else t) for k, t in out.items()}
        out["alpha"] = self.alpha.detach().float().cpu()
        return out



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
    algo: str = "lora",
    dora: bool = False,
    factor: int = -1,
) -> dict[str, LoRALayer | LoKrLayer]:
    """Hang trainable `LoRALayer`s on the kohya default targets of our UNet or of ONE text tower.

    Returns {layer name relative to `module`: LoRALayer}; those names are what `save_kohya` writes, so call it
    on the UNet itself and on each `CLIPTextTower` (not on a wrapper). The base weights are not frozen here.
    Attention modules that fuse q/k/v into one matmul are switched to separate projections, because that
    path would bypass the hooks. conv=True adds the ResBlock / Down- / Upsample layers (LoCon); their k x k
    convs use conv_rank / conv_alpha (default: rank / alpha). algo "lokr" hangs `LoKrLayer`s (split by
    `factor`) instead; dora=True gives each `LoRALayer` a trained DoRA magnitude.
    """
    if algo not in ("lora", "lokr"):
        raise ValueError(f"unknown adapter algo {algo!r}; choose lora or lokr")
    if dora and algo != "lora":
        raise ValueError("DoRA is trained on lora adapters only")
    layers: dict[str, LoRALayer | LoKrLayer] = {}
    for name, (layer, is_kxk) in _lora_targets(module, targets, conv).items():
        r = (conv_rank or rank) if is_kxk else rank
        a = (alpha if conv_alpha is None else conv_alpha) if is_kxk else alpha
        if algo == "lokr":
            lora_layer = LoKrLayer(layer, r, a, factor, dropout, dtype)
        else:
            lora_layer = LoRALayer(layer, r, a, dropout, dtype, dora=dora)
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
    """The kohya tensors: <name>.lora_down.weight / .lora_up.weight (+ .dora_scale with DoRA), or LoKr's
    <name>.lokr_w1 / .lokr_w2 (or .lokr_w2_a / .lokr_w2_b), in `dtype` if given, and <name>.alpha."""
    out: dict[str, Tensor] = {}
    for part, layers in (("unet", layers_unet), ("te1", layers_te1), ("te2", layers_te2)):
        for name, layer in (layers or {}).items():
            k = kohya_name(part, name)
            for suffix, t in layer.file_tensors(dtype).items():
                out[f"{k}.{suffix}"] = t
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
    is_kxk = [lay.is_kxk for lay in all_layers]
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
    args: dict[str, str] = {}
    if kxk:
        conv_rank = Counter(lay.rank for lay in kxk).most_common(1)[0][0]
        conv_alpha = Counter(float(lay.alpha) for lay in kxk).most_common(1)[0][0]
        args.update(conv_dim=str(conv_rank), conv_alpha=str(conv_alpha))
    lokr = [lay for lay in all_layers if isinstance(lay, LoKrLayer)]
    dora = any(getattr(lay, "dora_scale", None) is not None for lay in all_layers)
    if lokr or dora:  # LyCORIS' kohya network module writes these (its algo and options)
        meta["ss_network_module"] = "lycoris.kohya"
        args["algo"] = "lokr" if lokr else "lora"
        if lokr:
            args["factor"] = str(lokr[0].factor)
        if dora:
            args["dora_wd"] = "True"
    if args:
        meta["ss_network_args"] = json.dumps(args)
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
            wanted = {s: t for s, t in layer.state_dict().items() if s != "alpha"}
            keys = {s: f"{k}.{s}" for s in wanted}
            if any(key not in tensors for key in keys.values()):
                missing.append(k)
                continue
            for sub, target in wanted.items():
                t = tensors[keys[sub]]
                if tuple(t.shape) != tuple(target.shape):
                    raise LoraError(
                        f"{keys[sub]} has shape {tuple(t.shape)}, the layer {tuple(target.shape)}")
                target.copy_(t)
            if f"{k}.alpha" in tensors:
                alpha = float(tensors[f"{k}.alpha"].float().reshape(-1)[0]) or float(layer.rank)
                layer.alpha.fill_(alpha)
                if getattr(layer, "decomposed", True):
                    layer.scale = alpha / layer.rank
    return missing


