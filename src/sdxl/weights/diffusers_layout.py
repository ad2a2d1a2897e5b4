"""Official (sgm) <-> diffusers key layouts for the UNet and the VAE, and their config.json files.

Both directions are driven by one table of block prefixes built from the config, e.g.

    input_blocks.4.0        <-> down_blocks.1.resnets.0        (ResBlock: internal names differ)
    input_blocks.4.1        <-> down_blocks.1.attentions.0     (transformer: internal names identical)
    output_blocks.2.2.conv  <-> up_blocks.0.upsamplers.0.conv

and a small rename table for the inside of a ResBlock / VAE attention block. The same table read
backwards gives the reverse conversion, so sgm -> diffusers -> sgm is the identity by construction.
Tensors are passed through untouched except the VAE mid-attention q/k/v/proj_out weights, which are
1x1 convs ([C, C, 1, 1]) in the official file and Linear ([C, C]) in diffusers.

The state dicts here carry no prefix (`model.diffusion_model.` / `first_stage_model.` are stripped
by the caller). Nothing in this module imports diffusers.
"""

from __future__ import annotations

from collections.abc import Mapping

from sdxl.models.config import UNetConfig, VAEConfig

# inside a ResBlock: sgm suffix -> diffusers suffix
_UNET_RESNET = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
_VAE_RESNET = {
    "norm1": "norm1",
    "conv1": "conv1",
    "norm2": "norm2",
    "conv2": "conv2",
    "nin_shortcut": "conv_shortcut",
}
_VAE_ATTN = {
    "norm": "group_norm",
    "q": "to_q",
    "k": "to_k",
    "v": "to_v",
    "proj_out": "to_out.0",
}
# the suffix is the same on both sides (transformers, plain convs and linears)
_SAME = None


# ---------------------------------------------------------------------------------------------------------
# generic machinery
# ---------------------------------------------------------------------------------------------------------


def _rename_suffix(suffix: str, table: dict[str, str] | None, key: str) -> str:
    if table is None:
        return suffix
    for old, new in table.items():
        if suffix == old or suffix.startswith(old + "."):
            return new + suffix[len(old):]
    raise KeyError(f"unexpected key {key!r}: no rule for {suffix!r}")


def _convert(sd: Mapping, pairs: list[tuple[str, str, dict | None]], reverse: bool) -> dict:
    """Rename every key of `sd` through the prefix table `pairs` of (sgm, diffusers, suffix table).

    Keys are matched on whole dotted components, longest prefix first. A key that matches nothing
    raises KeyError: silently dropping weights is how conversions go wrong.
    """
    lookup: dict[str, tuple[str, dict | None]] = {}
    for sgm, dif, table in pairs:
        if reverse:
            inverse = None if table is None else {v: k for k, v in table.items()}
            lookup[dif] = (sgm, inverse)
        else:
            lookup[sgm] = (dif, table)
    out = {}
    for key, value in sd.items():
        parts = key.split(".")
        for cut in range(len(parts) - 1, 0, -1):
            prefix = ".".join(parts[:cut])
            if prefix in lookup:
                new_prefix, table = lookup[prefix]
                suffix = ".".join(parts[cut:])
                new_key = new_prefix + "." + _rename_suffix(suffix, table, key)
                break
        else:
            raise KeyError(f"unexpected key {key!r} for this config")
        if new_key in out:
            raise KeyError(f"two keys map to {new_key!r}")
        out[new_key] = value
    return out


# ---------------------------------------------------------------------------------------------------------
# UNet
# ---------------------------------------------------------------------------------------------------------


def _unet_pairs(cfg: UNetConfig) -> list[tuple[str, str, dict | None]]:
    """(sgm prefix, diffusers prefix, suffix rename table) for every module of the UNet."""
    pairs: list[tuple[str, str, dict | None]] = [
        ("time_embed.0", "time_embedding.linear_1", _SAME),
        ("time_embed.2", "time_embedding.linear_2", _SAME),
        ("label_emb.0.0", "add_embedding.linear_1", _SAME),
        ("label_emb.0.2", "add_embedding.linear_2", _SAME),
        ("input_blocks.0.0", "conv_in", _SAME),
        ("out.0", "conv_norm_out", _SAME),
        ("out.2", "conv_out", _SAME),
    ]
    n = cfg.num_levels
    nrb = cfg.num_res_blocks

    idx = 1
    for level in range(n):
        for j in range(nrb):
            pairs.append((f"input_blocks.{idx}.0", f"down_blocks.{level}.resnets.{j}", _UNET_RESNET))
            if cfg.transformer_depth[level * nrb + j] > 0:
                pairs.append((f"input_blocks.{idx}.1", f"down_blocks.{level}.attentions.{j}", _SAME))
            idx += 1
        if level != n - 1:
            pairs.append((f"input_blocks.{idx}.0.op", f"down_blocks.{level}.downsamplers.0.conv", _SAME))
            idx += 1

    pairs.append(("middle_block.0", "mid_block.resnets.0", _UNET_RESNET))
    if cfg.transformer_depth_middle >= 0:
        pairs.append(("middle_block.1", "mid_block.attentions.0", _SAME))
        pairs.append(("middle_block.2", "mid_block.resnets.1", _UNET_RESNET))

    idx = 0
    for up in range(n):  # diffusers up_blocks.0 is the deepest level
        for j in range(nrb + 1):
            pairs.append((f"output_blocks.{idx}.0", f"up_blocks.{up}.resnets.{j}", _UNET_RESNET))
            slot = 1
            if cfg.transformer_depth_output[idx] > 0:
                pairs.append((f"output_blocks.{idx}.1", f"up_blocks.{up}.attentions.{j}", _SAME))
                slot = 2
            if up != n - 1 and j == nrb:
                pairs.append((f"output_blocks.{idx}.{slot}.conv", f"up_blocks.{up}.upsamplers.0.conv", _SAME))
            idx += 1
    return pairs


def unet_sgm_to_diffusers(sd: Mapping, cfg: UNetConfig) -> dict:
    """Official UNet state dict (without `model.diffusion_model.`) -> diffusers UNet2DConditionModel keys."""
    return _convert(sd, _unet_pairs(cfg), reverse=False)


def unet_diffusers_to_sgm(sd: Mapping, cfg: UNetConfig) -> dict:
    """diffusers UNet2DConditionModel state dict -> official sgm keys (what `sdxl.models.unet.UNet` uses)."""
    return _convert(sd, _unet_pairs(cfg), reverse=True)


# ---------------------------------------------------------------------------------------------------------
# VAE
# ---------------------------------------------------------------------------------------------------------


def _vae_pairs(cfg: VAEConfig) -> list[tuple[str, str, dict | None]]:
    n = len(cfg.ch_mult)
    pairs: list[tuple[str, str, dict | None]] = [
        ("quant_conv", "quant_conv", _SAME),
        ("post_quant_conv", "post_quant_conv", _SAME),
    ]
    for part in ("encoder", "decoder"):
        pairs += [
            (f"{part}.conv_in", f"{part}.conv_in", _SAME),
            (f"{part}.conv_out", f"{part}.conv_out", _SAME),
            (f"{part}.norm_out", f"{part}.conv_norm_out", _SAME),
            (f"{part}.mid.block_1", f"{part}.mid_block.resnets.0", _VAE_RESNET),
            (f"{part}.mid.attn_1", f"{part}.mid_block.attentions.0", _VAE_ATTN),
            (f"{part}.mid.block_2", f"{part}.mid_block.resnets.1", _VAE_RESNET),
        ]
    for i in range(n):
        for j in range(cfg.num_res_blocks):
            pairs.append((f"encoder.down.{i}.block.{j}", f"encoder.down_blocks.{i}.resnets.{j}", _VAE_RESNET))
        if i != n - 1:
            pairs.append(
                (f"encoder.down.{i}.downsample.conv", f"encoder.down_blocks.{i}.downsamplers.0.conv", _SAME)
            )
    for up in range(n):  # diffusers numbers decoder blocks deepest first, sgm by level
        level = n - 1 - up
        for j in range(cfg.num_res_blocks + 1):
            pairs.append(
                (f"decoder.up.{level}.block.{j}", f"decoder.up_blocks.{up}.resnets.{j}", _VAE_RESNET)
            )
        if level != 0:
            pairs.append(
                (f"decoder.up.{level}.upsample.conv", f"decoder.up_blocks.{up}.upsamplers.0.conv", _SAME)
            )
    return pairs


def _is_vae_attn_weight(key: str) -> bool:
    """The projection weights of a VAE mid attention (either layout), not its norm and not biases."""
    if ".mid.attn_1." in key:
        return key.rsplit(".", 2)[-2] in ("q", "k", "v", "proj_out") and key.endswith(".weight")
    if ".mid_block.attentions.0." in key:
        return key.endswith((".to_q.weight", ".to_k.weight", ".to_v.weight", ".to_out.0.weight"))
    return False


def vae_sgm_to_diffusers(sd: Mapping, cfg: VAEConfig) -> dict:
    """Official VAE state dict (no `first_stage_model.` prefix) -> diffusers AutoencoderKL keys."""
    out = _convert(sd, _vae_pairs(cfg), reverse=False)
    for key, value in out.items():
        if _is_vae_attn_weight(key) and value.ndim == 4:  # [C, C, 1, 1] conv -> [C, C] linear
            out[key] = value.reshape(value.shape[0], value.shape[1])
    return out


def vae_diffusers_to_sgm(sd: Mapping, cfg: VAEConfig) -> dict:
    """diffusers AutoencoderKL state dict -> official sgm keys (what `sdxl.models.vae.AutoencoderKL` uses)."""
    out = _convert(sd, _vae_pairs(cfg), reverse=True)
    for key, value in out.items():
        if _is_vae_attn_weight(key) and value.ndim == 2:  # [C, C] linear -> [C, C, 1, 1] conv
            out[key] = value.reshape(value.shape[0], value.shape[1], 1, 1)
    return out


# ---------------------------------------------------------------------------------------------------------
# config.json <-> our configs
# ---------------------------------------------------------------------------------------------------------


def _level_depths(depths: tuple[int, ...], level: int, per_level: int) -> list[int]:
    return list(depths[level * per_level:(level + 1) * per_level])


def _compact(values: list[int]) -> int | list[int]:
    """One int when every block of the level has the same depth, the per-block list otherwise."""
    return values[0] if len(set(values)) == 1 else values


def unet_diffusers_config(cfg: UNetConfig) -> dict:
    """The diffusers `unet/config.json` (UNet2DConditionModel) describing the same network as `cfg`.

    diffusers describes transformer depths per level: `transformer_layers_per_block` for the down
    levels (an int, or a list per block), `reverse_transformer_layers_per_block` for the up levels
    when they are not the mirror image of the down levels (SSD-1B), and the middle depth is the
    last down level's. A level whose blocks mix depth 0 and depth > 0 cannot be expressed (ValueError).
    Its `attention_head_dim` holds the NUMBER of heads per level (a historical misnomer).
    """
    n = cfg.num_levels
    nrb = cfg.num_res_blocks
    widths = [cfg.model_channels * m for m in cfg.channel_mult]

    down_types, down_depths, has_attn = [], [], []
    for level in range(n):
        d = _level_depths(cfg.transformer_depth, level, nrb)
        if any(x > 0 for x in d) and not all(x > 0 for x in d):
            raise ValueError(f"down level {level} mixes blocks with and without attention: {d}")
        has_attn.append(d[0] > 0)
        down_types.append("CrossAttnDownBlock2D" if d[0] > 0 else "DownBlock2D")
        down_depths.append(_compact(d) if d[0] > 0 else 1)  # 1 = placeholder, as in the official configs

    up_types, up_depths = [], []
    for up in range(n):
        d = _level_depths(cfg.transformer_depth_output, up, nrb + 1)
        if any(x > 0 for x in d) and not all(x > 0 for x in d):
            raise ValueError(f"up level {up} mixes blocks with and without attention: {d}")
        up_types.append("CrossAttnUpBlock2D" if d[0] > 0 else "UpBlock2D")
        up_depths.append(_compact(d) if d[0] > 0 else 1)

    # diffusers mirrors the down depths onto the up path unless told otherwise
    mirrored = all(
        (up_types[up] == "CrossAttnUpBlock2D") == has_attn[n - 1 - up]
        and (up_types[up] == "UpBlock2D" or up_depths[up] == down_depths[n - 1 - up])
        for up in range(n)
    )

    # the middle block: diffusers takes its depth from the last down level's entry
    if cfg.transformer_depth_middle < 0:
        mid_type = "UNetMidBlock2D"
    else:
        mid_type = "UNetMidBlock2DCrossAttn"
        if not has_attn[-1]:
            # the last level has no attention, so its placeholder entry is free to carry the middle depth
            down_depths[-1] = cfg.transformer_depth_middle
        else:
            last = down_depths[-1]
            mid_from_down = last[0] if isinstance(last, list) else last
            if mid_from_down != cfg.transformer_depth_middle:
                raise ValueError(
                    f"diffusers takes the middle depth from the last down level ({mid_from_down}), "
                    f"but the config has {cfg.transformer_depth_middle}"
                )

    heads = [w // cfg.head_dim for w in widths]
    config = {
        "_class_name": "UNet2DConditionModel",
        "sample_size": 128,
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "center_input_sample": False,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "down_block_types": down_types,
        "mid_block_type": mid_type,
        "up_block_types": up_types,
        "only_cross_attention": False,
        "block_out_channels": widths,
        "layers_per_block": nrb,
        "downsample_padding": 1,
        "mid_block_scale_factor": 1,
        "dropout": 0.0,
        "act_fn": "silu",
        "norm_num_groups": cfg.norm_groups,
        "norm_eps": 1e-5,
        "cross_attention_dim": cfg.context_dim,
        "transformer_layers_per_block": down_depths,
        "reverse_transformer_layers_per_block": None if mirrored else up_depths,
        "attention_head_dim": heads,
        "use_linear_projection": True,
        "upcast_attention": False,
        "class_embed_type": None,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 256,
        "projection_class_embeddings_input_dim": cfg.adm_in_channels,
        "time_embedding_type": "positional",
        "resnet_time_scale_shift": "default",
    }
    if cfg.time_embed_mult != 4:
        config["time_embedding_dim"] = cfg.time_embed_dim
    return config


def _per_block(value, level: int, count: int, key: str) -> list[int]:
    """Expand one level's entry of a diffusers depth field (int or per-block list) to `count` ints."""
    if isinstance(value, int):
        return [value] * count
    value = list(value)
    if len(value) != count:
        raise ValueError(f"{key}[{level}] has {len(value)} entries, the level has {count} blocks")
    return [int(v) for v in value]


def unet_config_from_diffusers(d: Mapping) -> UNetConfig:
    """Read a diffusers UNet2DConditionModel config.json (SDXL family) into a `UNetConfig`.

    Raises ValueError for features the SDXL UNet does not have (conv proj_in, class embeddings,
    per-level head sizes, ...), rather than building a subtly different network.
    """
    def need(key, expected, default=None):
        if d.get(key, default) != expected:
            raise ValueError(f"unsupported diffusers UNet config: {key}={d.get(key, default)!r}")

    need("use_linear_projection", True, False)
    need("addition_embed_type", "text_time")
    need("addition_time_embed_dim", 256)
    need("flip_sin_to_cos", True, True)
    need("freq_shift", 0, 0)
    need("class_embed_type", None)
    need("time_embedding_type", "positional", "positional")
    need("resnet_time_scale_shift", "default", "default")
    need("num_attention_heads", None)
    need("encoder_hid_dim_type", None)

    widths = list(d["block_out_channels"])
    n = len(widths)
    mc = widths[0]
    if any(w % mc for w in widths):
        raise ValueError(f"block_out_channels {widths} are not multiples of the first width")
    nrb = d.get("layers_per_block", 2)
    if not isinstance(nrb, int):
        raise ValueError("per-level layers_per_block is not supported")

    heads = d.get("attention_head_dim", 8)
    heads = [heads] * n if isinstance(heads, int) else list(heads)
    down_types = list(d["down_block_types"])
    up_types = list(d["up_block_types"])
    attn_down = [t == "CrossAttnDownBlock2D" for t in down_types]
    attn_up = [t == "CrossAttnUpBlock2D" for t in up_types]
    for t in down_types + up_types:
        if t not in ("CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"):
            raise ValueError(f"unsupported block type {t!r}")
    head_dims = {widths[i] // heads[i] for i in range(n) if attn_down[i]}
    head_dims |= {widths[n - 1 - u] // heads[n - 1 - u] for u in range(n) if attn_up[u]}
    if len(head_dims) > 1:
        raise ValueError(f"attention head sizes differ between levels: {sorted(head_dims)}")
    head_dim = head_dims.pop() if head_dims else 64

    tl = d.get("transformer_layers_per_block", 1)
    tl = [tl] * n if isinstance(tl, int) else list(tl)
    rtl = d.get("reverse_transformer_layers_per_block")
    rtl = list(reversed(tl)) if rtl is None else list(rtl)

    depth_in: list[int] = []
    for level in range(n):
        depth_in += _per_block(tl[level], level, nrb, "transformer_layers_per_block") if attn_down[level] \
            else [0] * nrb
    depth_out: list[int] = []
    for up in range(n):
        depth_out += _per_block(rtl[up], up, nrb + 1, "reverse_transformer_layers_per_block") if attn_up[up] \
            else [0] * (nrb + 1)

    mid_type = d.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    if mid_type == "UNetMidBlock2DCrossAttn":
        last = tl[-1]
        depth_mid = int(last if isinstance(last, int) else last[0])
    elif mid_type == "UNetMidBlock2D":
        depth_mid = -1
    else:
        raise ValueError(f"unsupported mid_block_type {mid_type!r}")

    context_dim = d.get("cross_attention_dim", 1280)
    if not isinstance(context_dim, int):
        if len(set(context_dim)) != 1:
            raise ValueError(f"per-level cross_attention_dim {context_dim} is not supported")
        context_dim = context_dim[0]

    ted = d.get("time_embedding_dim") or mc * 4
    if ted % mc:
        raise ValueError(f"time_embedding_dim {ted} is not a multiple of {mc}")

    return UNetConfig(
        in_channels=d.get("in_channels", 4),
        out_channels=d.get("out_channels", 4),
        model_channels=mc,
        channel_mult=tuple(w // mc for w in widths),
        num_res_blocks=nrb,
        transformer_depth=tuple(depth_in),
        transformer_depth_output=tuple(depth_out),
        transformer_depth_middle=depth_mid,
        context_dim=context_dim,
        adm_in_channels=d["projection_class_embeddings_input_dim"],
        head_dim=head_dim,
        norm_groups=d.get("norm_num_groups", 32),
        time_embed_mult=ted // mc,
    )


def vae_diffusers_config(cfg: VAEConfig) -> dict:
    """The diffusers `vae/config.json` (AutoencoderKL) for `cfg`."""
    if cfg.z_channels != cfg.embed_dim:
        raise ValueError("diffusers' AutoencoderKL needs z_channels == embed_dim")
    if cfg.decoder_ch_mult not in (None, cfg.ch_mult):
        raise ValueError("diffusers' AutoencoderKL has one block_out_channels for encoder and decoder; this "
                         f"VAE's decoder is wider ({list(cfg.decoder_ch_mult)} x {cfg.ch})")
    n = len(cfg.ch_mult)
    return {
        "_class_name": "AutoencoderKL",
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "up_block_types": ["UpDecoderBlock2D"] * n,
        "block_out_channels": [cfg.ch * m for m in cfg.ch_mult],
        "layers_per_block": cfg.num_res_blocks,
        "act_fn": "silu",
        "latent_channels": cfg.z_channels,
        "norm_num_groups": cfg.norm_groups,
        "sample_size": 1024,
        "scaling_factor": cfg.scale_factor,
        "shift_factor": cfg.shift_factor or None,
        "force_upcast": True,
        "use_quant_conv": True,
        "use_post_quant_conv": True,
        "mid_block_add_attention": True,
    }


def vae_config_from_diffusers(d: Mapping) -> VAEConfig:
    """Read a diffusers AutoencoderKL config.json into a `VAEConfig`."""
    for key in ("use_quant_conv", "use_post_quant_conv", "mid_block_add_attention"):
        if not d.get(key, True):
            raise ValueError(f"unsupported diffusers VAE config: {key}=False")
    if d.get("act_fn", "silu") != "silu":
        raise ValueError(f"unsupported act_fn {d.get('act_fn')!r}")
    widths = list(d["block_out_channels"])
    ch = widths[0]
    if any(w % ch for w in widths):
        raise ValueError(f"block_out_channels {widths} are not multiples of the first width")
    latent = d.get("latent_channels", 4)
    return VAEConfig(
        in_channels=d.get("in_channels", 3),
        out_channels=d.get("out_channels", 3),
        ch=ch,
        ch_mult=tuple(w // ch for w in widths),
        num_res_blocks=d.get("layers_per_block", 2),
        z_channels=latent,
        embed_dim=latent,
        norm_groups=d.get("norm_num_groups", 32),
        scale_factor=d.get("scaling_factor", 0.18215),
        shift_factor=d.get("shift_factor") or 0.0,
    )
