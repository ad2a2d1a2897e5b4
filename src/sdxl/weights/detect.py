"""Read the architecture off a checkpoint's tensor names and shapes (as ComfyUI does).

Works on anything with `keys()` and `.shape(key)` (a `SafetensorsFile` reads only the header, so detecting a
7 GB file takes milliseconds). Head counts are not stored in the files: heads are 64 channels wide in every
SDXL-family model. Files this project writes carry their full config in the metadata (`sdxl.config`),
which then wins.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping

from ..models.conditioning import CONDITIONING_NUMBERS
from ..models.config import ModelConfig, TextConfig, UNetConfig, VAEConfig
from .io import CheckpointError

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_L_PREFIX = "conditioner.embedders.0.transformer."  # + text_model.*
BIGG_BASE_PREFIX = "conditioner.embedders.1.model."
BIGG_REFINER_PREFIX = "conditioner.embedders.0.model."
CONFIG_METADATA_KEY = "sdxl.config"


class _View:
    """The keys of `f` under `prefix`, with the prefix stripped."""

    def __init__(self, f, prefix: str):
        self.f, self.prefix = f, prefix
        self.keys = {k[len(prefix) :] for k in f.keys() if k.startswith(prefix)}

    def __contains__(self, k: str) -> bool:
        return k in self.keys

    def shape(self, k: str) -> tuple[int, ...]:
        if k not in self.keys:
            raise CheckpointError(f"missing tensor {self.prefix}{k}")
        return tuple(self.f.shape(self.prefix + k))

    def count(self, pattern: str) -> int:
        """Number of distinct integers N for which some key matches pattern with {N}."""
        rx = re.compile("^" + re.escape(pattern).replace(r"\{N\}", r"(\d+)") + r"(\.|$)")
        return len({m.group(1) for k in self.keys if (m := rx.match(k))})


# control model kinds (`control_kind`) as error messages name them
CONTROL_KIND_NAMES = {"controlnet": "ControlNet", "union": "union ControlNet (ControlNetUnionModel)",
                      "control-lora": "Control-LoRA", "t2i-adapter": "T2I-Adapter"}


def control_kind(keys) -> str | None:
    """"controlnet", "union", "control-lora" or "t2i-adapter" when the tensor names are a control model's
    (diffusers layout, or sgm layout bare or under `control_model.`), else None."""
    keys = set(keys)
    if "lora_controlnet" in keys:
        return "control-lora"
    union = ("control_add_embedding.", "control_model.control_add")
    if any(k.endswith("task_embedding") or k.startswith(union) for k in keys):
        return "union"
    if "controlnet_cond_embedding.conv_in.weight" in keys or any(
            k.startswith(("input_hint_block.", "control_model.input_hint_block.")) for k in keys):
        return "controlnet"
    if any(k.startswith("adapter.") for k in keys) or (
            "conv_in.weight" in keys and any(k.startswith("body.") for k in keys)):
        return "t2i-adapter"
    return None


def split_components(keys) -> dict[str, str]:
    """Which components a file holds, and under which prefix (official single-file layout, or bare parts)."""
    keys = list(keys)
    has = lambda p: any(k.startswith(p) for k in keys)  # noqa: E731
    out: dict[str, str] = {}
    if has(UNET_PREFIX):
        out["unet"] = UNET_PREFIX
    elif "input_blocks.0.0.weight" in keys:
        out["unet"] = ""
    if has(VAE_PREFIX):
        out["vae"] = VAE_PREFIX
    elif "encoder.conv_in.weight" in keys and "decoder.conv_in.weight" in keys and "unet" not in out:
        out["vae"] = ""
    if has(CLIP_L_PREFIX):
        out["text_l"] = CLIP_L_PREFIX
        if has(BIGG_BASE_PREFIX):
            out["text_g"] = BIGG_BASE_PREFIX
    elif has(BIGG_REFINER_PREFIX):
        out["text_g"] = BIGG_REFINER_PREFIX
    elif has(BIGG_BASE_PREFIX):
        out["text_g"] = BIGG_BASE_PREFIX
    return out


def detect_unet(v: _View) -> UNetConfig:
    if "label_emb.0.0.weight" not in v:
        raise CheckpointError(
            "UNet has no label_emb.0.0.weight (the size/pooled-text embedding): not an SDXL-family UNet "
            "(SD 1.x / 2.x checkpoints are not supported)"
        )
    mc, in_ch = v.shape("input_blocks.0.0.weight")[:2]
    out_ch = v.shape("out.2.weight")[0]
    temb = v.shape("time_embed.0.weight")[0]
    adm = v.shape("label_emb.0.0.weight")[1]
    n_in = v.count("input_blocks.{N}")
    # walk the input blocks: ResBlocks until a Downsample ends a level
    mult, depths, level_blocks, nres = [], [], 0, None
    context_dim = None
    for i in range(1, n_in):
        p = f"input_blocks.{i}."
        if p + "0.op.weight" in v:
            if nres is None:
                nres = level_blocks
            elif level_blocks != nres:
                raise CheckpointError("UNet levels have different numbers of ResBlocks")
            level_blocks = 0
            continue
        if p + "0.in_layers.0.weight" not in v:
            raise CheckpointError(f"UNet input block {i} is neither a ResBlock nor a Downsample")
        ch = v.shape(p + "0.out_layers.3.weight")[0]
        if level_blocks == 0:
            mult.append(ch // mc)
        level_blocks += 1
        d = v.count(p + "1.transformer_blocks.{N}")
        if d and v.shape(p + "1.proj_in.weight").__len__() != 2:
            raise CheckpointError("UNet transformers use conv proj_in: not an SDXL-family UNet")
        if d and context_dim is None:
            context_dim = v.shape(p + "1.transformer_blocks.0.attn2.to_k.weight")[1]
        depths.append(d)
    nres = level_blocks if nres is None else nres
    if level_blocks != nres:
        raise CheckpointError("UNet levels have different numbers of ResBlocks")
    n_out = v.count("output_blocks.{N}")
    if n_out != len(mult) * (nres + 1):
        raise CheckpointError(f"UNet has {n_out} output blocks, expected {len(mult) * (nres + 1)}")
    out_depths = []
    for i in range(n_out):
        p = f"output_blocks.{i}."
        if p + "0.in_layers.0.weight" not in v:
            raise CheckpointError(f"UNet output block {i} has no ResBlock")
        d = v.count(p + "1.transformer_blocks.{N}")
        if d and context_dim is None:
            context_dim = v.shape(p + "1.transformer_blocks.0.attn2.to_k.weight")[1]
        out_depths.append(d)
    if "middle_block.1.proj_in.weight" in v:
        mid = v.count("middle_block.1.transformer_blocks.{N}")
        if context_dim is None:
            context_dim = v.shape("middle_block.1.transformer_blocks.0.attn2.to_k.weight")[1]
    else:
        mid = -1
    if context_dim is None:
        raise CheckpointError("UNet has no cross-attention at all: not an SDXL-family UNet")
    return UNetConfig(
        in_channels=in_ch,
        out_channels=out_ch,
        model_channels=mc,
        channel_mult=tuple(mult),
        num_res_blocks=nres,
        transformer_depth=tuple(depths),
        transformer_depth_output=tuple(out_depths),
        transformer_depth_middle=mid,
        context_dim=context_dim,
        adm_in_channels=adm,
        time_embed_mult=temb // mc,
    )


def detect_vae(v: _View) -> VAEConfig:
    for k in (
        "encoder.conv_in.weight",
        "decoder.conv_in.weight",
        "quant_conv.weight",
        "post_quant_conv.weight",
    ):
        if k not in v:
            raise CheckpointError(f"VAE is missing {v.prefix}{k}")
    ch, in_ch = v.shape("encoder.conv_in.weight")[:2]
    levels = v.count("encoder.down.{N}")
    mult = [v.shape(f"encoder.down.{i}.block.0.conv1.weight")[0] // ch for i in range(levels)]
    dec_mult = [v.shape(f"decoder.up.{i}.block.0.conv1.weight")[0] // ch for i in range(levels)]
    return VAEConfig(
        in_channels=in_ch,
        out_channels=v.shape("decoder.conv_out.weight")[0],
        ch=ch,
        ch_mult=tuple(mult),
        num_res_blocks=v.count("encoder.down.0.block.{N}"),
        z_channels=v.shape("encoder.conv_out.weight")[0] // 2,
        embed_dim=v.shape("quant_conv.weight")[0] // 2,
        decoder_ch_mult=tuple(dec_mult) if dec_mult != mult else None,
    )


def detect_clip_l(v: _View) -> TextConfig:
    p = "text_model." if "text_model.embeddings.token_embedding.weight" in v else ""
    vocab, width = v.shape(p + "embeddings.token_embedding.weight")
    mlp = v.shape(p + "encoder.layers.0.mlp.fc1.weight")[0]
    return TextConfig(
        vocab_size=vocab,
        max_positions=v.shape(p + "embeddings.position_embedding.weight")[0],
        width=width,
        layers=v.count(p + "encoder.layers.{N}"),
        mlp_ratio=mlp / width,
        act="quick_gelu",
        projection_dim=None,
        pad_token=49407,
    )


def detect_bigg(v: _View) -> TextConfig:
    vocab, width = v.shape("token_embedding.weight")
    mlp = v.shape("transformer.resblocks.0.mlp.c_fc.weight")[0]
    return TextConfig(
        vocab_size=vocab,
        max_positions=v.shape("positional_embedding")[0],
        width=width,
        layers=v.count("transformer.resblocks.{N}"),
        mlp_ratio=mlp / width,
        act="gelu",
        projection_dim=v.shape("text_projection")[1] if "text_projection" in v else None,
        pad_token=0,
    )


# Config fields that may be 0 or -1 (transformer depths: 0 = no attention, middle -1 = a single ResBlock;
# token id 0 is bigG's padding); every other number in a config is a size and must be positive, except
# the VAE's shift_factor, any finite number.
_MAY_BE_ZERO = {"transformer_depth", "transformer_depth_output", "pad_token"}
_MAY_BE_MINUS_ONE = {"transformer_depth_middle"}


def check_config(config: ModelConfig, widths: bool = True) -> ModelConfig:
    """Type- and range-check a ModelConfig read from a file's metadata (untrusted JSON).

    `ModelConfig.from_json` takes whatever the JSON holds; a string where a width belongs, or a zero
    head size, would only fail later inside model construction with an arbitrary exception. With
    `widths`, also the divisibility the modules need (GroupNorm groups, attention heads). Raises
    ValueError naming the first bad field; returns the config unchanged.
    """
    if config.kind not in ("base", "refiner", "inpaint"):
        raise ValueError(f"kind {config.kind!r} is not base, refiner or inpaint")
    if config.prediction not in ("eps", "v", "x0"):
        raise ValueError(f"prediction {config.prediction!r} is not eps, v or x0")
    if config.edm is not None:
        edm = config.edm
        if len(edm) != 3 or not all(_is_positive(x) for x in edm) or edm[0] >= edm[1]:
            raise ValueError(f"edm {edm!r} is not (sigma_min, sigma_max, sigma_data) with 0 < min < max")
    if config.vae is not None:
        _check_latent_stats(config.vae)
    if not isinstance(config.zero_terminal_snr, bool):
        raise ValueError(f"zero_terminal_snr {config.zero_terminal_snr!r} is not true or false")
    parts = {"": config, "unet.": config.unet, "vae.": config.vae}
    parts.update({"text_l.": config.text_l, "text_g.": config.text_g})
    for prefix, part in parts.items():
        if part is None:
            continue
        for fld in dataclasses.fields(part):
            value = getattr(part, fld.name)
            if fld.name in ("unet", "vae", "text_l", "text_g", "kind", "prediction", "zero_terminal_snr",
                            "edm", "latents_mean", "latents_std"):
                continue
            where = prefix + fld.name
            low = -1 if fld.name in _MAY_BE_MINUS_ONE else 0 if fld.name in _MAY_BE_ZERO else 1
            if fld.name == "act":
                if value not in ("gelu", "quick_gelu"):
                    raise ValueError(f"{where} {value!r} is not gelu or quick_gelu")
            elif fld.name in ("projection_dim", "decoder_ch_mult") and value is None:
                continue
            elif isinstance(value, tuple):
                if not value or not all(_is_int(v) and v >= low for v in value):
                    raise ValueError(f"{where} {value!r} must be integers >= {low}")
            elif isinstance(fld.default, float):
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                    raise ValueError(f"{where} {value!r} is not a finite number")
                if value <= 0 and fld.name != "shift_factor":
                    raise ValueError(f"{where} {value!r} must be positive")
            elif not _is_int(value) or value < low:
                raise ValueError(f"{where} {value!r} must be an integer >= {low}")
    if widths:
        _check_widths(config)
    return config


def _check_widths(config: ModelConfig) -> None:
    """The divisibility the modules need (GroupNorm groups, attention heads), checked up front so that a
    file whose shapes or metadata break it fails detection with a reason, not model construction."""
    u, v = config.unet, config.vae
    if u is not None:
        widths = [u.model_channels * m for m in u.channel_mult]
        for ch in [u.model_channels, *widths]:
            if ch % u.norm_groups:
                raise ValueError(f"unet: {ch} channels do not split into {u.norm_groups} groups")
        n, levels = u.num_res_blocks, len(widths)
        attention = {widths[i // n] for i, d in enumerate(u.transformer_depth) if d}
        out_depths = enumerate(u.transformer_depth_output)  # output blocks run deepest level first
        attention |= {widths[levels - 1 - i // (n + 1)] for i, d in out_depths if d}
        if u.transformer_depth_middle >= 0:
            attention.add(widths[-1])
        for ch in sorted(attention):
            if ch % u.head_dim:
                raise ValueError(f"unet: {ch} channels are not a whole number of {u.head_dim}-wide heads")
    if v is not None:
        for ch in [v.ch] + [v.ch * m for m in v.ch_mult] + v.decoder_widths:
            if ch % v.norm_groups:
                raise ValueError(f"vae: {ch} channels do not split into {v.norm_groups} groups")
    for name, t in (("text_l", config.text_l), ("text_g", config.text_g)):
        if t is not None and t.width % t.head_dim:
            raise ValueError(f"{name}: width {t.width} is not a whole number of {t.head_dim}-wide heads")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _is_positive(x) -> bool:
    return _is_number(x) and x > 0


def _check_latent_stats(vae: VAEConfig) -> None:
    """Per-channel latent mean and std: both or neither, one finite number per latent channel (std > 0)."""
    mean, std = vae.latents_mean, vae.latents_std
    if (mean is None) != (std is None):
        raise ValueError("vae.latents_mean and vae.latents_std must be given together")
    if mean is None:
        return
    for name, values, check in (("latents_mean", mean, _is_number), ("latents_std", std, _is_positive)):
        if not isinstance(values, tuple) or len(values) != vae.embed_dim or not all(map(check, values)):
            raise ValueError(f"vae.{name} {values!r} is not {vae.embed_dim} finite numbers"
                             + (" > 0" if name == "latents_std" else ""))


# Playground v2.5's latent statistics (diffusers' vae config, ComfyUI's SDXL_Playground_2_5), used when a file
# marks itself with edm_mean / edm_std tensors of another size than the latent channels.
PLAYGROUND_LATENTS_MEAN = (-1.6574, 1.886, -1.383, 2.5155)
PLAYGROUND_LATENTS_STD = (8.4927, 5.9022, 6.5498, 5.2299)
PLAYGROUND_EDM = (0.002, 80.0, 0.5)  # sigma_min, sigma_max, sigma_data (ComfyUI and diffusers agree)
EDM_VPRED_DEFAULTS = (0.002, 120.0, 1.0)  # ComfyUI's ModelSamplingContinuousEDM defaults


def _scalar(f, key: str) -> float:
    try:
        value = float(f[key].float().reshape(-1)[0])
    except (IndexError, RuntimeError, ValueError, TypeError) as e:
        raise CheckpointError(f"tensor {key} is not a number ({e})") from None
    if not math.isfinite(value) or value <= 0:
        raise CheckpointError(f"tensor {key} is {value}, not a positive number")
    return value


def detect_edm(f, vae: VAEConfig | None):
    """(edm, vae) for the EDM markers ComfyUI reads: Playground v2.5's `edm_mean`/`edm_std` (EDM
    preconditioning with sigma_data 0.5, per-channel latent statistics, latent scale 0.5) and CosXL's
    `edm_vpred.sigma_max` / `edm_vpred.sigma_min` (v-prediction on a continuous EDM schedule, sigma_data 1).
    Returns (None, vae) for an ordinary SDXL file."""
    keys = set(f.keys())
    if "edm_mean" in keys and "edm_std" in keys:
        if vae is not None:
            channels = vae.embed_dim
            mean = f["edm_mean"].float().reshape(-1)
            std = f["edm_std"].float().reshape(-1)
            if mean.numel() == channels and std.numel() == channels:
                stats = (tuple(float(x) for x in mean), tuple(float(x) for x in std))
            else:
                stats = (PLAYGROUND_LATENTS_MEAN, PLAYGROUND_LATENTS_STD)
            vae = dataclasses.replace(vae, scale_factor=0.5, shift_factor=0.0, latents_mean=stats[0],
                                      latents_std=stats[1])
        return PLAYGROUND_EDM, vae
    if "edm_vpred.sigma_max" in keys:
        lo, hi, data = EDM_VPRED_DEFAULTS
        hi = _scalar(f, "edm_vpred.sigma_max")
        if "edm_vpred.sigma_min" in keys:
            lo = _scalar(f, "edm_vpred.sigma_min")
        if lo >= hi:
            raise CheckpointError(f"edm_vpred.sigma_min {lo} is not below edm_vpred.sigma_max {hi}")
        return (lo, hi, data), vae
    return None, vae


def detect(f: Mapping, metadata: dict[str, str] | None = None, name: str = "checkpoint") -> ModelConfig:
    """The ModelConfig of an official-layout (or bare component) file. Raises CheckpointError."""
    metadata = metadata if metadata is not None else getattr(f, "metadata", {}) or {}
    if CONFIG_METADATA_KEY in metadata:
        try:
            config = check_config(ModelConfig.from_json(metadata[CONFIG_METADATA_KEY]))
        # a JSON list instead of an object gives AttributeError; deep nesting RecursionError
        except (TypeError, ValueError, AttributeError, KeyError, RecursionError) as e:
            raise CheckpointError(
                f"{name}: unreadable {CONFIG_METADATA_KEY} metadata ({str(e)[:200]})"
            ) from None
        if config.edm is None:  # EDM marker tensors added to one of our files (e.g. merged in by hand)
            try:
                edm, vae = detect_edm(f, config.vae)
            except CheckpointError as e:
                raise CheckpointError(f"{name}: {e}") from None
            if edm is not None:
                prediction = "v" if "edm_vpred.sigma_max" in f else config.prediction
                config = dataclasses.replace(config, edm=edm, vae=vae, prediction=prediction)
        return config
    kind = control_kind(f.keys())
    if kind is not None:
        raise CheckpointError(f"{name}: is a {CONTROL_KIND_NAMES[kind]} file, not an SDXL checkpoint; use it "
                              "as a control unit (--controlnet FILE with --control-image)")
    parts = split_components(f.keys())
    if not parts:
        sample = ", ".join(sorted(f.keys())[:3]) or "no tensors"
        raise CheckpointError(
            f"{name}: not an SDXL checkpoint: no UNet, VAE or text encoder found ({sample} ...)"
        )
    try:
        unet = detect_unet(_View(f, parts["unet"])) if "unet" in parts else None
        vae = detect_vae(_View(f, parts["vae"])) if "vae" in parts else None
        text_l = detect_clip_l(_View(f, parts["text_l"])) if "text_l" in parts else None
        text_g = detect_bigg(_View(f, parts["text_g"])) if "text_g" in parts else None
    except CheckpointError as e:
        raise CheckpointError(f"{name}: {e}") from None
    # a tensor with fewer dimensions than expected fails to unpack (ValueError); a config built from
    # nonsense shapes fails its own checks (ValueError)
    except (KeyError, IndexError, ZeroDivisionError, ValueError, TypeError) as e:
        raise CheckpointError(f"{name}: inconsistent tensors ({e})") from None
    kind = "base"
    if unet is not None:
        n_numbers = None
        pooled = text_g.projection_dim if text_g is not None else None
        if pooled is not None:
            n_numbers, rem = divmod(unet.adm_in_channels - pooled, 256)
            if rem:
                raise CheckpointError(
                    f"{name}: UNet conditioning width {unet.adm_in_channels} does not fit the pooled text "
                    f"width {pooled} plus 256 per micro-conditioning number"
                )
        else:  # UNet-only file: the refiner's context is bigG alone, whose width is also the pooled width
            refiner_numbers = CONDITIONING_NUMBERS["refiner"]
            is_refiner = unet.adm_in_channels - refiner_numbers * 256 == unet.context_dim
            n_numbers = CONDITIONING_NUMBERS["refiner" if is_refiner else "base"]
        if n_numbers == CONDITIONING_NUMBERS["refiner"]:
            kind = "refiner"
        elif n_numbers != CONDITIONING_NUMBERS["base"]:
            raise CheckpointError(
                f"{name}: UNet expects {n_numbers} micro-conditioning numbers (5 or 6 known)"
            )
        if unet.in_channels == 9:
            kind = "inpaint"
        ctx = (text_l.width if text_l else 0) + (text_g.width if text_g else 0)
        if (text_l or text_g) and ctx != unet.context_dim:
            raise CheckpointError(
                f"{name}: text encoders give {ctx} context channels but the UNet expects {unet.context_dim}"
            )
    elif text_l is None and text_g is not None:
        kind = "refiner"
    prediction = "eps"
    if "v_pred" in f or str(metadata.get("modelspec.prediction_type", "")).lower() in ("v", "v_prediction"):
        prediction = "v"
    # community zero-terminal-SNR files (e.g. v-prediction anime fine-tunes) carry an empty "ztsnr" tensor as
    # a marker, as they carry "v_pred"; ComfyUI reads both the same way
    zsnr = "ztsnr" in f
    try:
        edm, vae = detect_edm(f, vae)
    except CheckpointError as e:
        raise CheckpointError(f"{name}: {e}") from None
    if edm is not None and "edm_vpred.sigma_max" in f:
        prediction = "v"
    elif str(metadata.get("modelspec.prediction_type", "")).lower() in ("x0", "sample"):
        prediction = "x0"
    config = ModelConfig(kind=kind, unet=unet, vae=vae, text_l=text_l, text_g=text_g, prediction=prediction,
                         zero_terminal_snr=zsnr, edm=edm)
    try:  # sizes only: head widths are an assumption here (64), which the modules check when built
        return check_config(config, widths=False)
    except ValueError as e:  # e.g. a zero-size dimension
        raise CheckpointError(f"{name}: inconsistent tensors ({e})") from None
