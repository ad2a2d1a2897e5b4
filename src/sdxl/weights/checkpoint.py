"""Checkpoints in, checkpoints out: the official single-file layout and diffusers folders.

`read_checkpoint(path)` returns the detected `ModelConfig` and each component's tensors in *our* naming
(sgm names for the UNet and VAE, HF CLIP names without `text_model.` for both text towers), still backed by
the memory map. `build_module` turns those into a module with one copy of the weights in RAM.
`write_single_file` / `write_diffusers` go the other way.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from ..models.config import ModelConfig, TextConfig
from ..models.factory import build_modules, randomize_
from ..tokenizer import write_hf_tokenizer_files
from ..version import __version__
from . import detect as D
from .diffusers_layout import (
    unet_config_from_diffusers,
    unet_diffusers_config,
    unet_diffusers_to_sgm,
    unet_sgm_to_diffusers,
    vae_config_from_diffusers,
    vae_diffusers_config,
    vae_diffusers_to_sgm,
    vae_sgm_to_diffusers,
)
from .io import CheckpointError, open_tensors, save_safetensors
from .text_layout import hf_clip_to_ours, openclip_to_ours, ours_to_hf_clip, ours_to_openclip

log = logging.getLogger(__name__)

# Tensors the official files carry that have no parameter in our modules.
IGNORED_EXTRA = {"text_l": {"embeddings.position_ids"}, "text_g": {"logit_scale"}}


@dataclass
class Checkpoint:
    path: Path
    config: ModelConfig
    parts: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    layout: str = "single-file"  # or "diffusers"


def _sub(f: Mapping, prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: f[k] for k in f.keys() if k.startswith(prefix)}


def read_checkpoint(path: str | Path, allow_pickle: bool = False) -> Checkpoint:
    """Open an SDXL-family checkpoint (single file or diffusers folder). Raises CheckpointError."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    if path.is_dir():
        return read_diffusers(path)
    f = open_tensors(path, allow_pickle=allow_pickle)
    metadata = dict(getattr(f, "metadata", {}) or {})
    config = D.detect(f, metadata, name=str(path))
    prefixes = D.split_components(f.keys())
    parts: dict[str, dict[str, torch.Tensor]] = {}
    if "unet" in prefixes and config.unet is not None:
        parts["unet"] = _sub(f, prefixes["unet"])
    if "vae" in prefixes and config.vae is not None:
        parts["vae"] = _sub(f, prefixes["vae"])
    try:
        if "text_l" in prefixes and config.text_l is not None:
            parts["text_l"] = hf_clip_to_ours(_sub(f, prefixes["text_l"]))
        if "text_g" in prefixes and config.text_g is not None:
            parts["text_g"] = openclip_to_ours(_sub(f, prefixes["text_g"]))
    except (ValueError, IndexError, RuntimeError) as e:  # names or shapes that no text tower has
        raise CheckpointError(f"{path}: {e}") from None
    return Checkpoint(path=path, config=config, parts=parts, metadata=metadata)


# ---------------------------------------------------------------------------------------------- diffusers
# diffusers' scheduler prediction_type -> ours, and back
DIFFUSERS_PREDICTIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
PREDICTION_TO_DIFFUSERS = {v: k for k, v in DIFFUSERS_PREDICTIONS.items()}

_WEIGHT_NAMES = ("diffusion_pytorch_model", "model")


def _diffusers_weights(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of one diffusers component folder (single or sharded, fp32 or .fp16 variant)."""
    for stem in _WEIGHT_NAMES:
        for variant in ("", ".fp16"):
            single = folder / f"{stem}{variant}.safetensors"
            if single.is_file():
                f = open_tensors(single)
                return {k: f[k] for k in f.keys()}
            index = folder / f"{stem}.safetensors.index{variant}.json"
            if not index.is_file():
                index = folder / f"{stem}{variant}.safetensors.index.json"
            if index.is_file():
                try:
                    weight_map = json.loads(index.read_text())["weight_map"]
                except (ValueError, KeyError) as e:
                    raise CheckpointError(f"{index}: unreadable shard index ({e})") from None
                out: dict[str, torch.Tensor] = {}
                for shard in sorted(set(weight_map.values())):
                    if "/" in shard or "\\" in shard or shard.startswith(".."):
                        raise CheckpointError(f"{index}: shard name {shard!r} points outside the folder")
                    f = open_tensors(folder / shard)
                    out.update({k: f[k] for k in f.keys()})
                return out
    if any(folder.glob("*.bin")):
        raise CheckpointError(f"{folder}: only pickle (.bin) weights found; safetensors are required")
    raise CheckpointError(f"{folder}: no safetensors weights found")


def _json(p: Path) -> dict:
    try:
        return json.loads(p.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{p}: missing") from None
    except ValueError as e:
        raise CheckpointError(f"{p}: not valid JSON ({e})") from None


def text_config_from_hf(d: dict, projection: bool) -> TextConfig:
    width = d["hidden_size"]
    act = d.get("hidden_act", "quick_gelu")
    return TextConfig(
        vocab_size=d.get("vocab_size", 49408),
        max_positions=d.get("max_position_embeddings", 77),
        width=width,
        layers=d["num_hidden_layers"],
        head_dim=width // d["num_attention_heads"],
        mlp_ratio=d["intermediate_size"] / width,
        act="gelu" if act == "gelu" else "quick_gelu",
        projection_dim=d.get("projection_dim", width) if projection else None,
        pad_token=0 if projection else 49407,
        eps=d.get("layer_norm_eps", 1e-5),
    )


def text_config_to_hf(cfg: TextConfig, projection: bool) -> dict:
    d = {
        "architectures": ["CLIPTextModelWithProjection" if projection else "CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_positions,
        "hidden_size": cfg.width,
        "intermediate_size": cfg.mlp_dim,
        "num_hidden_layers": cfg.layers,
        "num_attention_heads": cfg.heads,
        "hidden_act": cfg.act,
        "layer_norm_eps": cfg.eps,
        "bos_token_id": 49406,
        "eos_token_id": 49407,
        "pad_token_id": cfg.pad_token,
        "projection_dim": cfg.projection_dim or cfg.width,
        "torch_dtype": "float32",
    }
    return d


def read_diffusers(folder: Path) -> Checkpoint:
    subs = [s for s in ("unet", "vae", "text_encoder", "text_encoder_2") if (folder / s).is_dir()]
    if not subs:
        cls = _json(folder / "config.json").get("_class_name") if (folder / "config.json").is_file() else None
        if isinstance(cls, str) and ("ControlNet" in cls or "Adapter" in cls):  # a control model's folder
            raise CheckpointError(f"{folder}: is a {cls} folder, not an SDXL checkpoint; use it as a control "
                                  "unit (--controlnet FOLDER with --control-image)")
        raise CheckpointError(
            f"{folder}: not a model folder (expected diffusers subfolders unet/, vae/, text_encoder/, "
            "text_encoder_2/)"
        )
    parts: dict[str, dict[str, torch.Tensor]] = {}
    unet = vae = text_l = text_g = None
    if (folder / "unet").is_dir():
        unet = unet_config_from_diffusers(_json(folder / "unet" / "config.json"))
        parts["unet"] = unet_diffusers_to_sgm(_diffusers_weights(folder / "unet"), unet)
    if (folder / "vae").is_dir():
        vd = _json(folder / "vae" / "config.json")
        vae = vae_config_from_diffusers(vd)
        if vd.get("latents_mean") is not None and vd.get("latents_std") is not None:  # Playground v2.5
            vae = replace(vae, latents_mean=tuple(vd["latents_mean"]), latents_std=tuple(vd["latents_std"]))
        parts["vae"] = vae_diffusers_to_sgm(_diffusers_weights(folder / "vae"), vae)
    te = [s for s in ("text_encoder", "text_encoder_2") if (folder / s).is_dir()]
    for sub in te:
        d = _json(folder / sub / "config.json")
        projection = "CLIPTextModelWithProjection" in d.get("architectures", []) or sub == "text_encoder_2"
        cfg = text_config_from_hf(d, projection)
        sd = hf_clip_to_ours(_diffusers_weights(folder / sub))
        if projection:
            text_g, parts["text_g"] = cfg, sd
        else:
            text_l, parts["text_l"] = cfg, sd
    index = {}
    if (folder / "model_index.json").is_file():
        index = _json(folder / "model_index.json")
    kind = "base"
    if text_l is None and text_g is not None or index.get("requires_aesthetics_score"):
        kind = "refiner"
    if unet is not None:
        pooled = text_g.projection_dim if text_g else None
        if pooled is not None and unet.adm_in_channels - pooled == 5 * 256:
            kind = "refiner"
        if unet.in_channels == 9:
            kind = "inpaint"
    prediction = "eps"
    sched = folder / "scheduler" / "scheduler_config.json"
    zsnr = False
    edm = None
    if sched.is_file():
        sc = _json(sched)
        prediction = DIFFUSERS_PREDICTIONS.get(sc.get("prediction_type"), "eps")
        zsnr = sc.get("rescale_betas_zero_snr") is True
        if str(sc.get("_class_name", "")).startswith("EDM"):  # EDMDPMSolverMultistep / EDMEuler schedulers
            edm = (float(sc.get("sigma_min", 0.002)), float(sc.get("sigma_max", 80.0)),
                   float(sc.get("sigma_data", 0.5)))
    cfg = ModelConfig(kind=kind, unet=unet, vae=vae, text_l=text_l, text_g=text_g, prediction=prediction,
                      zero_terminal_snr=zsnr, edm=edm)
    try:
        D.check_config(cfg, widths=False)
    except ValueError as e:
        raise CheckpointError(f"{folder}: {e}") from None
    return Checkpoint(path=folder, config=cfg, parts=parts, layout="diffusers")


# ---------------------------------------------------------------------------------------------- UNet override
class _Shapes:
    """keys() / shape() over a dict of tensors (what `detect` reads)."""

    def __init__(self, sd: Mapping[str, torch.Tensor]):
        self.sd = sd

    def keys(self):
        return self.sd.keys()

    def shape(self, k: str) -> tuple[int, ...]:
        return tuple(self.sd[k].shape)


def read_unet_override(path: str | Path, base: ModelConfig) -> dict[str, torch.Tensor]:
    """The UNet of a UNet-only file (SDXL-Lightning, Turbo, DMD2 publish these) in our naming, checked against
    the base model's UNet architecture. The layout is read off the tensor names: official
    (`model.diffusion_model.*`, or bare `input_blocks.*`) or diffusers (`conv_in.*`, `down_blocks.*`, as in
    `unet/diffusion_pytorch_model.safetensors`, optionally under `unet.`). Raises CheckpointError naming
    the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file (--unet needs a .safetensors UNet file)")
    if base.unet is None:
        raise CheckpointError(f"{path}: the base model has no UNet to replace")
    f = open_tensors(path)
    keys = list(f.keys())
    official = D.split_components(keys).get("unet")
    diffusers_prefix = next((p for p in ("", "unet.") if p + "conv_in.weight" in keys
                             and any(k.startswith(p + "down_blocks.") for k in keys)), None)
    if official is not None:
        sd = _sub(f, official)
    elif diffusers_prefix is not None:
        try:
            sd = unet_diffusers_to_sgm(_sub(f, diffusers_prefix), base.unet)
        except (KeyError, ValueError) as e:
            raise CheckpointError(f"{path}: a diffusers UNet of another architecture than the base model "
                                  f"({str(e).strip(chr(34))[:160]})") from None
    else:
        sample = ", ".join(sorted(keys)[:3]) or "no tensors"
        raise CheckpointError(f"{path}: not a UNet file (no model.diffusion_model.* or diffusers UNet "
                              f"tensors; found {sample} ...)")
    try:
        found = D.detect_unet(D._View(_Shapes(sd), ""))
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    except (KeyError, IndexError, ZeroDivisionError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: inconsistent UNet tensors ({e})") from None
    # head width and norm groups are not in the tensors: the base's are the ones that count
    found = replace(found, head_dim=base.unet.head_dim, norm_groups=base.unet.norm_groups)
    if found != base.unet:
        diff = [f"{k} {getattr(found, k)} vs {getattr(base.unet, k)}" for k in found.__dataclass_fields__
                if getattr(found, k) != getattr(base.unet, k)]
        raise CheckpointError(f"{path}: a UNet of another architecture than the base model's "
                              f"({'; '.join(diff[:3])})")
    return sd


# ---------------------------------------------------------------------------------------------- modules
def build_module(cls, cfg, sd: Mapping[str, torch.Tensor], device="cpu", dtype=torch.float32, name="model"):
    """Instantiate `cls(cfg)` without allocating random weights, then take the checkpoint's tensors.

    Strict: a missing tensor or a shape mismatch is a CheckpointError naming it. Peak memory is one copy.
    """
    try:
        with torch.device("meta"):
            module = cls(cfg)
    except (ValueError, TypeError, ZeroDivisionError, RuntimeError) as e:  # a config no module can have
        raise CheckpointError(f"{name}: cannot build the model this file describes ({e})") from None
    expected = module.state_dict()
    missing = sorted(set(expected) - set(sd))
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise CheckpointError(f"{name}: missing tensor(s) {', '.join(missing[:3])}{more}")
    unexpected = sorted(set(sd) - set(expected))
    if unexpected:
        log.warning("%s: %d unexpected tensors ignored (e.g. %s)", name, len(unexpected), unexpected[:3])
    new = {}
    for k, ref in expected.items():
        t = sd[k]
        if tuple(t.shape) != tuple(ref.shape):
            raise CheckpointError(
                f"{name}: tensor {k} has shape {tuple(t.shape)}, expected {tuple(ref.shape)}"
            )
        target = dtype if t.is_floating_point() and dtype is not None else ref.dtype
        new[k] = t.to(device=device, dtype=target, copy=True)
    module.load_state_dict(new, assign=True)
    for n, b in module.named_buffers():
        if b.is_meta:
            raise RuntimeError(f"{name}: buffer {n} was not restored from the checkpoint")
    return module.eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------- writing
def single_file_state(
    config: ModelConfig, parts: Mapping[str, Mapping[str, torch.Tensor]], dtype=None
) -> dict:
    """Our per-component state dicts -> one official-layout state dict."""
    def cast(t):
        return t.to(dtype) if dtype is not None and t.is_floating_point() else t

    out: dict[str, torch.Tensor] = {}
    if "unet" in parts:
        out.update({D.UNET_PREFIX + k: cast(v) for k, v in parts["unet"].items()})
    if "vae" in parts:
        out.update({D.VAE_PREFIX + k: cast(v) for k, v in parts["vae"].items()})
    if "text_l" in parts:
        out.update({D.CLIP_L_PREFIX + k: cast(v) for k, v in ours_to_hf_clip(parts["text_l"]).items()})
    if "text_g" in parts:
        prefix = D.BIGG_BASE_PREFIX if config.text_l is not None else D.BIGG_REFINER_PREFIX
        out.update({prefix + k: cast(v) for k, v in ours_to_openclip(parts["text_g"]).items()})
    return out


def config_metadata(config: ModelConfig, extra: dict | None = None) -> dict[str, str]:
    md = {
        D.CONFIG_METADATA_KEY: config.to_json(),
        "sdxl.version": __version__,
        "modelspec.architecture": {
            "base": "stable-diffusion-xl-v1-base",
            "refiner": "stable-diffusion-xl-v1-refiner",
            "inpaint": "stable-diffusion-xl-v1-base/inpaint",
        }.get(config.kind, config.kind),
        "modelspec.prediction_type": {"v": "v", "x0": "x0"}.get(config.prediction, "epsilon"),
    }
    md.update(extra or {})
    return md


def write_single_file(ckpt: Checkpoint, dst: str | Path, dtype=None, record_config: bool = True) -> Path:
    state = single_file_state(ckpt.config, ckpt.parts, dtype)
    md = config_metadata(ckpt.config) if record_config else {}
    return save_safetensors(state, dst, md)


def write_diffusers(ckpt: Checkpoint, dst: str | Path, dtype=None) -> Path:
    """A diffusers-format folder (loads with `StableDiffusionXLPipeline.from_pretrained`)."""
    dst = Path(dst)
    cfg = ckpt.config
    if cfg.unet is not None:  # a UNet diffusers cannot express fails here, before anything is written
        try:
            unet_diffusers_config(cfg.unet)
        except ValueError as e:
            raise CheckpointError(f"{dst}: this model has no diffusers equivalent ({e})") from None
    dst.mkdir(parents=True, exist_ok=True)

    def cast(sd):
        return {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v) for k, v in sd.items()}

    def put(sub: str, config: dict, weights_name: str, sd: dict):
        (dst / sub).mkdir(exist_ok=True)
        (dst / sub / "config.json").write_text(json.dumps(config, indent=2))
        save_safetensors(cast(sd), dst / sub / weights_name, {"format": "pt"})

    index = {"_class_name": "StableDiffusionXLPipeline", "_diffusers_version": "0.42.1"}
    if cfg.kind == "refiner":
        index["_class_name"] = "StableDiffusionXLImg2ImgPipeline"
        index["requires_aesthetics_score"] = True
        index["force_zeros_for_empty_prompt"] = False
    elif cfg.kind == "inpaint":
        index["_class_name"] = "StableDiffusionXLInpaintPipeline"
    if "unet" in ckpt.parts:
        put(
            "unet",
            unet_diffusers_config(cfg.unet),
            "diffusion_pytorch_model.safetensors",
            unet_sgm_to_diffusers(dict(ckpt.parts["unet"]), cfg.unet),
        )
        index["unet"] = ["diffusers", "UNet2DConditionModel"]
    if "vae" in ckpt.parts:
        vae_config = vae_diffusers_config(cfg.vae)
        if cfg.vae.latents_mean is not None:
            vae_config.update(latents_mean=list(cfg.vae.latents_mean), latents_std=list(cfg.vae.latents_std))
        put(
            "vae",
            vae_config,
            "diffusion_pytorch_model.safetensors",
            vae_sgm_to_diffusers(dict(ckpt.parts["vae"]), cfg.vae),
        )
        index["vae"] = ["diffusers", "AutoencoderKL"]
    for part, sub, tok, proj in (
        ("text_l", "text_encoder", "tokenizer", False),
        ("text_g", "text_encoder_2", "tokenizer_2", True),
    ):
        if part in ckpt.parts:
            tcfg = getattr(cfg, part)
            put(sub, text_config_to_hf(tcfg, proj), "model.safetensors", ours_to_hf_clip(ckpt.parts[part]))
            write_hf_tokenizer_files(dst / tok, pad="!" if proj else "<|endoftext|>")
            index[sub] = ["transformers", "CLIPTextModelWithProjection" if proj else "CLIPTextModel"]
            index[tok] = ["transformers", "CLIPTokenizer"]
    (dst / "scheduler").mkdir(exist_ok=True)
    scheduler = None
    if cfg.edm is not None:
        scheduler = {
            "_class_name": "EDMDPMSolverMultistepScheduler",
            "sigma_min": cfg.edm[0],
            "sigma_max": cfg.edm[1],
            "sigma_data": cfg.edm[2],
            "sigma_schedule": "karras",
            "num_train_timesteps": 1000,
            "prediction_type": PREDICTION_TO_DIFFUSERS[cfg.prediction],
        }
    (dst / "scheduler" / "scheduler_config.json").write_text(
        json.dumps(
            scheduler or {
                "_class_name": "EulerDiscreteScheduler",
                "beta_start": 0.00085,
                "beta_end": 0.012,
                "beta_schedule": "scaled_linear",
                "num_train_timesteps": 1000,
                "steps_offset": 1,
                "timestep_spacing": "leading",
                "interpolation_type": "linear",
                "use_karras_sigmas": False,
                "prediction_type": PREDICTION_TO_DIFFUSERS[cfg.prediction],
                "rescale_betas_zero_snr": cfg.zero_terminal_snr,
            },
            indent=2,
        )
    )
    index["scheduler"] = ["diffusers", scheduler["_class_name"] if scheduler else "EulerDiscreteScheduler"]
    (dst / "model_index.json").write_text(json.dumps(index, indent=2))
    return dst


def random_checkpoint(config: ModelConfig, seed: int = 0, std: float = 0.02) -> Checkpoint:
    """A `Checkpoint` with random weights in our naming (tests, benchmarks); write it with
    `write_single_file`."""
    mods = build_modules(config)
    parts = {}
    for i, (name, m) in enumerate(mods.items()):
        randomize_(m, seed * 100 + i, std)
        parts[name] = m.state_dict()
    return Checkpoint(path=None, config=config, parts=parts)
