"""T2I-Adapter (diffusers' `T2IAdapter`): a small conv net that turns the control image into one feature map
per UNet level, added inside the UNet's down path.

Parameter names are diffusers' (`adapter.conv_in`, `adapter.body.N.in_conv`,
`adapter.body.N.resnets.M.block1`, ...), so a TencentARC `t2i-adapter-*-sdxl-1.0` folder's
`diffusion_pytorch_model.safetensors` loads with `load_state_dict`. Three layouts (diffusers' `adapter_type`):

    full_adapter_xl  PixelUnshuffle(16), conv_in, 4 AdapterBlocks; only the third halves the size.
                     Features at 1/16, 1/16, 1/32, 1/32 of the image: SDXL's levels 0, 1, 2 and the middle.
    full_adapter     PixelUnshuffle(8), conv_in, 4 AdapterBlocks, each after the first halving the size
                     (SD 1.5's four levels; does not fit SDXL).
    light_adapter    PixelUnshuffle(8), 4 LightAdapterBlocks (in_conv to a quarter width, resnets, out_conv),
                     each after the first halving the size (SD 1.5's layout; does not fit SDXL either).

Where the features go (diffusers' UNet2DConditionModel with `down_intrablock_additional_residuals`): feature k
belongs to down level k. On a level with cross-attention it is added after the level's last ResBlock +
transformer, before the downsampler; on a plain level after the whole level, downsampler included. Either way
the sum is what the level keeps as its skip connection and passes down. A feature left over after the levels
is added after the middle block when its shape matches (how the fourth XL feature is used). In our
`UNet.input_blocks` numbering (0 = conv_in, then per level `num_res_blocks` ResBlocks and a downsampler but on
the last level) SDXL's three features go to input blocks 3, 5 and 8 and the fourth to the middle, the
places sd-webui-controlnet's hook uses for SDXL adapters too.

The features depend on the control image alone, so `T2IAdapter.forward` keeps the last few per hint tensor.
A unit's weight is diffusers' `adapter_conditioning_scale`; diffusers' `adapter_conditioning_factor` f (the
adapter applies on steps i < int(n * f) of n) is a unit with start 0 and an end in
[(int(n * f) - 1) / n, int(n * f) / n) under the pipeline's A1111 rule (start <= i / n <= end).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sdxl.errors import CheckpointError
from sdxl.models.config import UNetConfig
from sdxl.models.unet import UNetControl

ADAPTER_TYPES = ("full_adapter_xl", "full_adapter", "light_adapter")
# sd-webui-controlnet's per-feature adapter weights under soft injection (its hook.py)
SOFT_INJECTION_SCALES = (0.25, 0.62, 0.825, 1.0)


@dataclass(frozen=True)
class T2IAdapterConfig:
    """diffusers' T2IAdapter config fields (config.json), with diffusers' full_adapter_xl defaults."""

    adapter_type: str = "full_adapter_xl"
    in_channels: int = 3
    channels: tuple[int, ...] = (320, 640, 1280, 1280)
    num_res_blocks: int = 2
    downscale_factor: int = 16

    def __post_init__(self):
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        if self.adapter_type not in ADAPTER_TYPES:
            raise ValueError(f"unknown T2I-Adapter type {self.adapter_type!r} "
                             f"(known: {', '.join(ADAPTER_TYPES)})")

    def downs(self) -> tuple[bool, ...]:
        """Whether each body block halves the size before its convs."""
        n = len(self.channels)
        if self.adapter_type == "full_adapter_xl":
            return tuple(i == 2 for i in range(n))
        if self.adapter_type == "full_adapter":
            return tuple(i > 0 for i in range(n))
        return tuple(i > 0 for i in range(n + 1))  # light: one block per width plus a last one

    def feature_channels(self) -> tuple[int, ...]:
        if self.adapter_type == "light_adapter":
            return self.channels + (self.channels[-1],)
        return self.channels

    def feature_strides(self) -> tuple[int, ...]:
        """Image pixels per feature pixel, per feature."""
        out, stride = [], self.downscale_factor
        for down in self.downs():
            stride *= 2 if down else 1
            out.append(stride)
        return tuple(out)


# ---------------------------------------------------------------------------------------------------------
# Blocks
# ---------------------------------------------------------------------------------------------------------


class AdapterResnetBlock(nn.Module):
    """x + block2(relu(block1(x))): block1 3x3; block2 1x1 (full adapters) or 3x3 (light adapter)."""

    def __init__(self, channels: int, kernel2: int = 1):
        super().__init__()
        self.block1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.act = nn.ReLU()
        self.block2 = nn.Conv2d(channels, channels, kernel2, padding=kernel2 // 2)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.block2(self.act(self.block1(x)))


def _downsample() -> nn.Module:
    # ceil_mode: an odd size rounds up, as the UNet's stride-2 conv does
    return nn.AvgPool2d(kernel_size=2, stride=2, ceil_mode=True)


class AdapterBlock(nn.Module):
    """[2x2 average pool] -> [1x1 in_conv where the width changes] -> resnets."""

    def __init__(self, in_channels: int, out_channels: int, num_res_blocks: int, down: bool):
        super().__init__()
        self.downsample = _downsample() if down else None
        self.in_conv = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None
        self.resnets = nn.Sequential(*[AdapterResnetBlock(out_channels) for _ in range(num_res_blocks)])

    def forward(self, x: Tensor) -> Tensor:
        if self.downsample is not None:
            x = self.downsample(x)
        if self.in_conv is not None:
            x = self.in_conv(x)
        return self.resnets(x)


class LightAdapterBlock(nn.Module):
    """[2x2 average pool] -> 1x1 in_conv to out/4 channels -> resnets (3x3, 3x3) -> 1x1 out_conv."""

    def __init__(self, in_channels: int, out_channels: int, num_res_blocks: int, down: bool):
        super().__init__()
        mid = out_channels // 4
        self.downsample = _downsample() if down else None
        self.in_conv = nn.Conv2d(in_channels, mid, 1)
        self.resnets = nn.Sequential(*[AdapterResnetBlock(mid, kernel2=3) for _ in range(num_res_blocks)])
        self.out_conv = nn.Conv2d(mid, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        if self.downsample is not None:
            x = self.downsample(x)
        return self.out_conv(self.resnets(self.in_conv(x)))


class AdapterBody(nn.Module):
    """PixelUnshuffle, [conv_in], body blocks; returns every block's output (the features)."""

    def __init__(self, cfg: T2IAdapterConfig):
        super().__init__()
        ch = cfg.channels
        nrb = cfg.num_res_blocks
        unshuffled = cfg.in_channels * cfg.downscale_factor**2
        self.unshuffle = nn.PixelUnshuffle(cfg.downscale_factor)
        downs = cfg.downs()
        blocks: list[nn.Module] = []
        if cfg.adapter_type == "light_adapter":
            self.conv_in = None
            widths = (unshuffled,) + ch + (ch[-1],)
            for i in range(len(ch) + 1):
                blocks.append(LightAdapterBlock(widths[i], widths[i + 1], nrb, downs[i]))
        else:
            self.conv_in = nn.Conv2d(unshuffled, ch[0], 3, padding=1)
            for i in range(len(ch)):
                blocks.append(AdapterBlock(ch[max(i - 1, 0)], ch[i], nrb, downs[i]))
        self.body = nn.ModuleList(blocks)

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self.unshuffle(x)
        if self.conv_in is not None:
            x = self.conv_in(x)
        features = []
        for block in self.body:
            x = block(x)
            features.append(x)
        return features


# ---------------------------------------------------------------------------------------------------------
# Placement on the UNet
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Placement:
    """Where each adapter feature goes: an input block index, or None for the middle block's output."""

    targets: tuple[int | None, ...]


def unet_feature_slots(unet: UNetConfig) -> list[tuple[int | None, int, int]]:
    """(input block index or None for the middle, channels, latent pixels per activation pixel) per slot,
    in the order diffusers hands out `down_intrablock_additional_residuals`: one per down level, then the
    middle."""
    slots: list[tuple[int | None, int, int]] = []
    nrb = unet.num_res_blocks
    index = 0  # input_blocks.0 is conv_in
    stride = 1
    for level, mult in enumerate(unet.channel_mult):
        ch = unet.model_channels * mult
        first = index + 1
        last_res = first + nrb - 1
        has_down = level != unet.num_levels - 1
        has_attn = unet.transformer_depth[level * nrb + nrb - 1] > 0
        if has_attn or not has_down:
            slots.append((last_res, ch, stride))
        else:
            slots.append((last_res + 1, ch, stride * 2))
        index = last_res + (1 if has_down else 0)
        stride *= 2 if has_down else 1
    slots.append((None, unet.model_channels * unet.channel_mult[-1], stride))
    return slots


def place_features(cfg: T2IAdapterConfig, unet: UNetConfig, latent_scale: int = 8,
                   name: str = "T2I-Adapter") -> Placement:
    """Match the adapter's features to `unet`'s slots as diffusers does; a level whose feature has the wrong
    width or scale is a CheckpointError (diffusers would fail on the addition); a spare feature that does not
    fit the middle block is dropped (diffusers skips it)."""
    slots = unet_feature_slots(unet)
    targets: list[int | None] = []
    for k, (ch, stride) in enumerate(zip(cfg.feature_channels(), cfg.feature_strides())):
        if k >= len(slots):
            break
        index, want_ch, want_stride = slots[k]
        fits = ch == want_ch and stride == want_stride * latent_scale
        if index is None:
            if fits:
                targets.append(None)
            break
        if not fits:
            raise CheckpointError(
                f"{name}: a {cfg.adapter_type} adapter whose feature {k} ({ch} channels at 1/{stride} of the "
                f"image) does not fit this UNet's level {k} ({want_ch} channels at "
                f"1/{want_stride * latent_scale}); it is not an SDXL T2I-Adapter"
            )
        targets.append(index)
    return Placement(tuple(targets))


# ---------------------------------------------------------------------------------------------------------
# The control model
# ---------------------------------------------------------------------------------------------------------


class T2IAdapter(nn.Module):
    """A T2I-Adapter bound to a UNet layout (default: SDXL's).

    forward(x, t, context, y, hint, control_type=None) -> UNetControl with `intrablock` (and `middle` for the
    fourth XL feature), unscaled (weight 1); `scaled(control, weight, soft)` applies a unit's weight.
    hint: [1 or B, 3, H, W] in [0, 1], H x W the image size (8x the latent's); one-channel adapters get the
    mean of the hint's channels. A hint whose size is not a multiple of the adapter's unshuffle factor (an
    odd latent size) is stretched up to the next multiple, so the features land on the UNet's rounded-up
    sizes.
    """

    kind = "t2i-adapter"
    cache_size = 4

    def __init__(self, cfg: T2IAdapterConfig, unet_config: UNetConfig | None = None,
                 name: str = "T2I-Adapter"):
        super().__init__()
        self.cfg = cfg
        self.name = name
        self.adapter = AdapterBody(cfg)
        self.placement = place_features(cfg, unet_config or UNetConfig.base(), name=name)
        self._cache: list[tuple[Tensor, int, torch.dtype, list[Tensor]]] = []

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def bind(self, unet_config: UNetConfig) -> T2IAdapter:
        """Place the features on another UNet layout (CheckpointError where they do not fit)."""
        self.placement = place_features(self.cfg, unet_config, name=self.name)
        return self

    def _load_from_state_dict(self, *args, **kwargs):
        self._cache.clear()  # new weights: the cached features are stale
        super()._load_from_state_dict(*args, **kwargs)

    def features(self, hint: Tensor) -> list[Tensor]:
        """The adapter's feature maps for `hint` (the last `cache_size` hints' results are kept: the same
        hint tensor, not modified in place since, gives the same list; an inference-mode tensor, which keeps
        no version count, is computed every time)."""
        if hint.is_inference():
            return self._compute(hint)
        for cached_hint, version, dtype, feats in self._cache:
            if cached_hint is hint and version == hint._version and dtype == self.dtype:
                return feats
        feats = self._compute(hint)
        # the hint itself is kept so that its id cannot be reused by another tensor while cached
        self._cache = [(hint, hint._version, self.dtype, feats)] + self._cache[: self.cache_size - 1]
        return feats

    @torch.no_grad()
    def _compute(self, hint: Tensor) -> list[Tensor]:
        x = hint.to(device=next(self.parameters()).device, dtype=self.dtype)
        if self.cfg.in_channels == 1 and x.shape[1] != 1:
            x = x.mean(dim=1, keepdim=True)
        elif x.shape[1] != self.cfg.in_channels:
            raise ValueError(f"{self.name}: a {x.shape[1]}-channel control image for a "
                             f"{self.cfg.in_channels}-channel adapter")
        f = self.cfg.downscale_factor
        h, w = x.shape[-2:]
        if h % f or w % f:
            x = F.interpolate(x, size=(-(-h // f) * f, -(-w // f) * f), mode="bilinear", align_corners=False)
        return self.adapter(x)

    @property
    def in_channels(self) -> int:
        """The latent channels it is given (it reads none of them: its features depend on the hint alone)."""
        return 4

    def encode_hint(self, hint: Tensor, control_type: str | int | None = None) -> list[Tensor]:
        """The feature maps for `hint` (the ControlNet interface's name for `features`)."""
        return self.features(hint)

    def forward(self, x: Tensor, t: Tensor, context: Tensor, y: Tensor, hint: Tensor | None = None,
                control_type: str | int | None = None,
                hint_features: list[Tensor] | None = None) -> UNetControl:
        """The features for `hint` (or `hint_features`, `encode_hint`'s result) placed on the UNet, expanded
        to x's batch where the hint has one row; x, t, context and y are not read."""
        if hint_features is None:
            if hint is None:
                raise ValueError(f"{self.name}: needs a hint image (or its features)")
            hint_features = self.features(hint)
        b = x.shape[0]
        intrablock: dict[int, Tensor] = {}
        middle = None
        for target, feat in zip(self.placement.targets, hint_features):
            if feat.shape[0] == 1 and b > 1:
                feat = feat.expand(b, *feat.shape[1:])
            if target is None:
                middle = feat
            else:
                intrablock[target] = feat
        return UNetControl(intrablock=intrablock, middle=middle)

    def output_scales(self, weight: float, soft: bool = False) -> list[float]:
        """The scale of each feature, in feature order: the weight, or with soft injection ("My prompt is
        more important", "ControlNet is more important") sd-webui-controlnet's adapter table
        weight * (0.25, 0.62, 0.825, 1.0)."""
        n = len(self.placement.targets)
        if not soft:
            return [weight] * n
        return [weight * k for k in SOFT_INJECTION_SCALES[:n]]

    def scaled(self, control: UNetControl, weight: float, soft: bool = False) -> UNetControl:
        """`control` (this model's output) with every feature times its `output_scales` entry."""
        scales = dict(zip(self.placement.targets, self.output_scales(weight, soft)))
        intrablock = {k: v * scales[k] for k, v in (control.intrablock or {}).items()}
        middle = None if control.middle is None else control.middle * scales[None]
        return UNetControl(intrablock=intrablock, middle=middle)


# ---------------------------------------------------------------------------------------------------------
# Building from tensors
# ---------------------------------------------------------------------------------------------------------


def is_t2i_adapter(keys) -> bool:
    """diffusers T2IAdapter tensors (with or without the `adapter.` prefix)."""
    keys = set(keys)
    return any(k.endswith("body.0.resnets.0.block1.weight") for k in keys) and not any(
        k.startswith(("input_blocks.", "control_model.", "down_blocks.")) for k in keys
    )


def _unshuffle_factor(width: int, in_channels: int | None) -> tuple[int, int]:
    """(image channels, unshuffle factor) with channels * factor^2 == width (3 channels preferred)."""
    for c in ((in_channels,) if in_channels else (3, 1)):
        f = round((width / c) ** 0.5)
        if c * f * f == width:
            return c, f
    raise ValueError(f"the first conv's {width} input channels are no image channels x factor^2")


def config_from_tensors(sd, config: dict | None = None) -> T2IAdapterConfig:
    """The T2IAdapterConfig for diffusers-layout tensors (prefix `adapter.` stripped), sizes read off the
    tensors; `config` (a diffusers config.json dict) settles the type and factor where given."""
    config = dict(config or {})
    light = "body.0.out_conv.weight" in sd
    n = 0
    while f"body.{n}.resnets.0.block1.weight" in sd:
        n += 1
    if n == 0:
        raise ValueError("no adapter body blocks")
    nrb = 0
    while f"body.0.resnets.{nrb}.block1.weight" in sd:
        nrb += 1
    if light:
        width = sd["body.0.in_conv.weight"].shape[1]
        channels = tuple(sd[f"body.{i}.out_conv.weight"].shape[0] for i in range(n - 1))
        adapter_type = "light_adapter"
    else:
        width = sd["conv_in.weight"].shape[1]
        channels = tuple(sd[f"body.{i}.resnets.0.block1.weight"].shape[0] for i in range(n))
        adapter_type = None
    in_channels, factor = _unshuffle_factor(width, config.get("in_channels"))
    if adapter_type is None:
        # the XL body and SD 1.5's have the same tensors; the unshuffle factor tells them apart
        adapter_type = config.get("adapter_type") or ("full_adapter_xl" if factor == 16 else "full_adapter")
    return T2IAdapterConfig(adapter_type=adapter_type, in_channels=in_channels, channels=channels,
                            num_res_blocks=nrb, downscale_factor=factor)


def t2i_adapter_from_tensors(tensors, config: dict | None = None, unet_config: UNetConfig | None = None,
                             name: str = "T2I-Adapter", dtype: torch.dtype = torch.float32,
                             device: torch.device | str = "cpu") -> T2IAdapter:
    """Build and load a T2IAdapter from diffusers-layout tensors (a mapping; keys with or without the
    `adapter.` prefix). CheckpointError naming `name` on any mismatch."""
    sd = {k.removeprefix("adapter."): v for k, v in tensors.items()}
    try:
        cfg = config_from_tensors(sd, config)
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"{name}: inconsistent T2I-Adapter tensors or config.json ({e})") from None
    model = T2IAdapter(cfg, unet_config, name=name)
    want = model.adapter.state_dict()
    missing = sorted(set(want) - set(sd))
    unexpected = sorted(set(sd) - set(want))
    if missing or unexpected:
        raise CheckpointError(f"{name}: T2I-Adapter tensors do not match a {cfg.adapter_type} adapter "
                              f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    for k, v in want.items():
        if tuple(sd[k].shape) != tuple(v.shape):
            raise CheckpointError(f"{name}: {k} has shape {tuple(sd[k].shape)}, expected {tuple(v.shape)}")
    model.adapter.load_state_dict({k: sd[k] for k in want}, strict=True)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)
