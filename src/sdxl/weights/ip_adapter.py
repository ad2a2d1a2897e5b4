"""Reading IP-Adapter files and the CLIP vision towers they need.

Adapter files (h94/IP-Adapter and the FaceID releases): `.safetensors` with flat keys `image_proj.*` and
`ip_adapter.N.to_k_ip.weight` / `.to_v_ip.weight`, or the same as a pickled `.bin` holding
{"image_proj": {...}, "ip_adapter": {...}}, read only with `allow_pickle` and then only through
`torch.load(weights_only=True)` (the project's rule for pickles, as `open_tensors`). Which projection the file
has is read off its tensors (`adapter_spec`): `proj.weight` plain, `latents` plus / plus-face, `proj.0` +
`norm` FaceID. FaceID files also carry LoRA weights for the UNet's attention (`N.to_q_lora.down.weight`, ...):
they are kept on the adapter (`IPAdapter.lora`) under diffusers' module names.

Image encoders: a diffusers / transformers `image_encoder/` folder (config.json + model.safetensors, or
pytorch_model.bin with `allow_pickle`), a single transformers-keyed file (`vision_model.*`,
`visual_projection.weight`: ComfyUI's clip_vision files) or an open_clip file (`visual.*`, a whole CLIP model
or just its tower). Sizes come from config.json where there is one, otherwise from the tensors (heads: 16 for
the ViT-L/H/bigG widths, 12 for ViT-B's 768, else width / 64).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from ..errors import CheckpointError
from ..models.clip_vision import CLIPVisionTower, VisionConfig
from ..models.ip_adapter import RESAMPLER_HEAD_DIM, IPAdapter, IPAdapterSpec
from .checkpoint import build_module
from .io import PICKLE_SUFFIXES, open_tensors

KNOWN_HEADS = {768: 12, 1024: 16, 1280: 16, 1664: 16}
_IP_KEY = re.compile(r"(\d+)\.(to_k_ip|to_v_ip)\.weight")
_LORA_KEY = re.compile(r"(\d+)\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight")


# ------------------------------------------------------------------------------------------------ adapters
def _load_pickle(path: Path, allow_pickle: bool, what: str) -> dict:
    if not allow_pickle:
        raise CheckpointError(f"{path}: a pickle {what} can run code when loaded and is refused; use its "
                              ".safetensors release, or pass --allow-pickle to read it with "
                              "torch.load(weights_only=True)")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure here is a bad file
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: could not be read as a weights-only pickle ({first})") from None
    if not isinstance(sd, dict):
        raise CheckpointError(f"{path}: holds a {type(sd).__name__}, not a state dict")
    return sd


def read_adapter_tensors(path: str | Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """The file's tensors with flat keys (`image_proj.x`, `ip_adapter.N.y`)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such IP-Adapter file")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        sd = _load_pickle(path, allow_pickle, "IP-Adapter")
        flat = {}
        for part in ("image_proj", "ip_adapter"):
            sub = sd.get(part)
            if isinstance(sub, dict):
                flat.update({f"{part}.{k}": v for k, v in sub.items() if isinstance(v, torch.Tensor)})
        flat.update({k: v for k, v in sd.items() if isinstance(v, torch.Tensor)})
        return flat
    f = open_tensors(path)
    return {k: f[k] for k in f}


def _strip(sd: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def adapter_spec(sd: Mapping[str, torch.Tensor], name: str = "IP-Adapter") -> IPAdapterSpec:
    """What the adapter file holds, read off its tensors; CheckpointError naming the file otherwise."""
    proj, ip = _strip(sd, "image_proj."), _strip(sd, "ip_adapter.")
    if not proj or not ip:
        what = "a ControlNet or T2I-Adapter" if any(k.startswith(("controlnet", "control_model", "adapter."))
                                                    for k in sd) else "something else"
        raise CheckpointError(f"{name}: not an IP-Adapter file (no image_proj.* and ip_adapter.* tensors; it "
                              f"looks like {what})")
    pairs: dict[int, dict[str, torch.Tensor]] = {}
    has_lora = False
    for k, v in ip.items():
        m = _IP_KEY.fullmatch(k)
        if m:
            pairs.setdefault(int(m.group(1)), {})[m.group(2)] = v
        elif _LORA_KEY.fullmatch(k):
            has_lora = True
    if not pairs:
        raise CheckpointError(f"{name}: no ip_adapter.N.to_k_ip.weight tensors")
    ids = sorted(pairs)
    if ids != [2 * i + 1 for i in range(len(ids))] or any(len(p) != 2 for p in pairs.values()):
        raise CheckpointError(f"{name}: ip_adapter tensors are not numbered 1, 3, 5, ... with to_k_ip and "
                              "to_v_ip each (an adapter for another architecture?)")
    layers = []
    context = None
    for i in ids:
        k, v = pairs[i]["to_k_ip"], pairs[i]["to_v_ip"]
        if k.ndim != 2 or tuple(k.shape) != tuple(v.shape) or (context is not None and k.shape[1] != context):
            raise CheckpointError(f"{name}: ip_adapter.{i} to_k_ip {tuple(k.shape)} / to_v_ip "
                                  f"{tuple(v.shape)} do not fit together")
        context = k.shape[1]
        layers.append(int(k.shape[0]))
    try:
        if "proj.weight" in proj:
            w = proj["proj.weight"]
            c = proj["norm.weight"].shape[0]
            return IPAdapterSpec("plain", w.shape[1], c, w.shape[0] // c, tuple(layers))
        if "latents" in proj:
            lat = proj["latents"]
            depth = len({k.split(".")[1] for k in proj if re.fullmatch(r"layers\.\d+\.0\.to_q\.weight", k)})
            heads = proj["layers.0.0.to_q.weight"].shape[0] // RESAMPLER_HEAD_DIM
            return IPAdapterSpec("plus", proj["proj_in.weight"].shape[1], proj["proj_out.weight"].shape[0],
                                 lat.shape[1], tuple(layers), resampler=(lat.shape[2], depth, heads))
        if "perceiver_resampler.proj_in.weight" in proj:
            raise CheckpointError(f"{name}: IP-Adapter FaceID plus (face embedding + CLIP image) is not "
                                  "supported; use FaceID or plus-face")
        if "proj.3.weight" in proj:
            raise CheckpointError(f"{name}: IP-Adapter full-face (SD 1.5) is not supported")
        if "proj.0.weight" in proj and "norm.weight" in proj:
            c = proj["norm.weight"].shape[0]
            return IPAdapterSpec("faceid", proj["proj.0.weight"].shape[1], c,
                                 proj["proj.2.weight"].shape[0] // c, tuple(layers),
                                 hidden=proj["proj.0.weight"].shape[0], has_lora=has_lora)
    except KeyError as e:
        raise CheckpointError(f"{name}: image_proj lacks {e.args[0]}") from None
    raise CheckpointError(f"{name}: unknown IP-Adapter image projection (keys: "
                          f"{', '.join(sorted(proj)[:4])}, ...)")


def load_ip_adapter(path: str | Path, device="cpu", dtype=torch.float32,
                    allow_pickle: bool = False) -> IPAdapter:
    """An `IPAdapter` from a file (see the module docstring); CheckpointError naming the file otherwise."""
    name = str(path)
    sd = read_adapter_tensors(path, allow_pickle)
    spec = adapter_spec(sd, name)
    state = {}
    for k, v in _strip(sd, "image_proj.").items():
        state[f"image_proj.{k}"] = v
    for i in range(len(spec.layers)):
        for which in ("to_k_ip", "to_v_ip"):
            state[f"{which}.{i}.weight"] = sd[f"ip_adapter.{2 * i + 1}.{which}.weight"]
    adapter = build_module(IPAdapter, spec, state, device, dtype, f"{name} (IP-Adapter)")
    if spec.has_lora:
        adapter.lora = {k: v.to(device=device, dtype=dtype) for k, v in _strip(sd, "ip_adapter.").items()
                        if _LORA_KEY.fullmatch(k)}
    return adapter


# ------------------------------------------------------------------------------------------ image encoders
def _hf_config(cfg: dict) -> dict:
    """The vision part of a transformers config.json (CLIPVisionConfig, or CLIPConfig's vision_config)."""
    return cfg.get("vision_config", cfg) if isinstance(cfg, dict) else {}


def _from_open_clip(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """open_clip `visual.*` names -> ours (q/k/v split off in_proj, the projection transposed)."""
    out = {}
    for k, v in sd.items():
        if not k.startswith("visual."):
            continue
        k = k[len("visual."):]
        m = re.fullmatch(r"transformer\.resblocks\.(\d+)\.(.+)", k)
        if m:
            pre, rest = f"encoder.layers.{m.group(1)}.", m.group(2)
            if rest.startswith("attn.in_proj_"):
                kind = rest.rsplit("_", 1)[1]  # weight | bias
                for name, part in zip(("q_proj", "k_proj", "v_proj"), v.chunk(3, dim=0)):
                    out[f"{pre}self_attn.{name}.{kind}"] = part
                continue
            rest = (rest.replace("ln_1.", "layer_norm1.").replace("ln_2.", "layer_norm2.")
                    .replace("attn.out_proj.", "self_attn.out_proj.").replace("mlp.c_fc.", "mlp.fc1.")
                    .replace("mlp.c_proj.", "mlp.fc2."))
            out[pre + rest] = v
            continue
        simple = {"class_embedding": "embeddings.class_embedding",
                  "positional_embedding": "embeddings.position_embedding.weight",
                  "conv1.weight": "embeddings.patch_embedding.weight"}
        if k in simple:
            out[simple[k]] = v
        elif k == "proj":
            out["visual_projection.weight"] = v.t()
        elif k.startswith("ln_pre."):
            out["pre_layrnorm." + k[len("ln_pre."):]] = v
        elif k.startswith("ln_post."):
            out["post_layernorm." + k[len("ln_post."):]] = v
    return out


def encoder_state(sd: Mapping[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    """Any supported key layout -> our CLIPVisionTower names."""
    keys = list(sd)
    if any(k.startswith("visual.") for k in keys):
        return _from_open_clip(sd)
    for prefix in ("vision_model.", "clip_vision.vision_model.", ""):
        if any(k.startswith(prefix + "embeddings.patch_embedding") for k in keys):
            out = _strip(sd, prefix)
            head = prefix[: -len("vision_model.")] if prefix.endswith("vision_model.") else prefix
            proj = sd.get(head + "visual_projection.weight")
            if proj is not None:
                out["visual_projection.weight"] = proj
            return {k: v for k, v in out.items() if not k.endswith("position_ids")}
    raise CheckpointError(f"{name}: not a CLIP vision tower (no vision_model.* or visual.* tensors)")


def vision_config(sd: Mapping[str, torch.Tensor], hf: dict | None, name: str) -> VisionConfig:
    """Sizes from config.json where given, the rest from the tensors (our names)."""
    hf = _hf_config(hf or {})
    try:
        width = sd["embeddings.class_embedding"].shape[0]
        patch = sd["embeddings.patch_embedding.weight"].shape[-1]
        positions = sd["embeddings.position_embedding.weight"].shape[0]
        layers = len({k.split(".")[2] for k in sd if k.startswith("encoder.layers.")})
        mlp = sd["encoder.layers.0.mlp.fc1.weight"].shape[0]
        proj = sd["visual_projection.weight"].shape[0]
    except KeyError as e:
        raise CheckpointError(f"{name}: CLIP vision tower lacks {e.args[0]} (a tower without its "
                              "projection cannot encode images for IP-Adapter)") from None
    grid = round((positions - 1) ** 0.5)
    heads = hf.get("num_attention_heads") or KNOWN_HEADS.get(width) or max(width // 64, 1)
    act = hf.get("hidden_act", "gelu")
    if act not in ("gelu", "quick_gelu"):
        raise CheckpointError(f"{name}: activation {act!r} is not supported (gelu or quick_gelu)")
    return VisionConfig(width=width, layers=layers, heads=int(heads), mlp_dim=mlp, patch_size=patch,
                        image_size=grid * patch, projection_dim=proj, act=act,
                        eps=float(hf.get("layer_norm_eps", 1e-5)))


def read_encoder(path: str | Path, allow_pickle: bool = False) -> tuple[dict[str, torch.Tensor], dict | None]:
    """(tensors, config.json or None) of an image-encoder folder or file."""
    path = Path(path)
    hf = None
    if path.is_dir():
        cfg_file = path / "config.json"
        if cfg_file.is_file():
            try:
                hf = json.loads(cfg_file.read_text())
            except (OSError, ValueError) as e:
                raise CheckpointError(f"{cfg_file}: not readable JSON ({e})") from None
        for fname in ("model.safetensors", "pytorch_model.bin"):
            if (path / fname).is_file():
                path = path / fname
                break
        else:
            raise CheckpointError(f"{path}: no model.safetensors in this image-encoder folder")
    elif not path.is_file():
        raise CheckpointError(f"{path}: no such image encoder")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        sd = _load_pickle(path, allow_pickle, "image encoder")
        sd = sd.get("state_dict", sd) if isinstance(sd.get("state_dict"), dict) else sd
        return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}, hf
    f = open_tensors(path)
    return {k: f[k] for k in f}, hf


def encoder_output_dims(path: str | Path, allow_pickle: bool = False) -> tuple[int, int]:
    """(projection_dim, width) of an image encoder, read off its tensor shapes."""
    sd, hf = read_encoder(path, allow_pickle)
    cfg = vision_config(encoder_state(sd, str(path)), hf, str(path))
    return cfg.projection_dim, cfg.width


def load_image_encoder(path: str | Path, device="cpu", dtype=torch.float32,
                       allow_pickle: bool = False) -> CLIPVisionTower:
    """A `CLIPVisionTower` from a folder or single file; CheckpointError naming it otherwise."""
    name = str(path)
    sd, hf = read_encoder(path, allow_pickle)
    state = encoder_state(sd, name)
    cfg = vision_config(state, hf, name)
    return build_module(CLIPVisionTower, cfg, state, device, dtype, f"{name} (image encoder)")


def fits_encoder(spec: IPAdapterSpec, dims: tuple[int, int]) -> bool:
    """Whether an encoder with (projection_dim, width) feeds the adapter: plain reads the projected embedding,
    plus the hidden states."""
    projection_dim, width = dims
    return spec.embed_dim == (width if spec.kind == "plus" else projection_dim)
