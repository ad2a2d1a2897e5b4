"""One config dataclass per model. Every size in the model code is read from here.

The presets (`UNetConfig.base()`, `.refiner()`, ...) hold the numbers of the official SDXL files;
`sdxl.weights.detect` reads the same numbers back off a checkpoint's tensor shapes.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any


def _tuple(x) -> tuple:
    return tuple(x) if isinstance(x, (list, tuple)) else (x,)


@dataclass(frozen=True)
class UNetConfig:
    """The SDXL UNet (sgm `UNetModel`), sizes only.

    Transformer depths are stored per block, as ComfyUI does, so distilled models that drop
    blocks (SSD-1B, Segmind Vega) are described exactly:
      - `transformer_depth`: one entry per input ResBlock (levels * num_res_blocks), 0 = no attention;
      - `transformer_depth_output`: one entry per output block, in `output_blocks.{i}` order (the deepest
        level first), levels * (num_res_blocks + 1) entries;
      - `transformer_depth_middle`: depth of the middle SpatialTransformer; -1 = the middle block is a
        single ResBlock (`middle_block.0` only, diffusers' UNetMidBlock2D), as in SSD-1B and Vega.
    """

    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4)
    num_res_blocks: int = 2
    transformer_depth: tuple[int, ...] = (0, 0, 2, 2, 10, 10)
    transformer_depth_output: tuple[int, ...] = (10, 10, 10, 2, 2, 2, 0, 0, 0)
    transformer_depth_middle: int = 10
    context_dim: int = 2048
    adm_in_channels: int = 2816
    head_dim: int = 64  # channels per attention head (64 in every SDXL-family model)
    norm_groups: int = 32
    time_embed_mult: int = 4  # time_embed_dim = model_channels * 4

    def __post_init__(self):
        object.__setattr__(self, "channel_mult", _tuple(self.channel_mult))
        object.__setattr__(self, "transformer_depth", _tuple(self.transformer_depth))
        object.__setattr__(self, "transformer_depth_output", _tuple(self.transformer_depth_output))
        n = len(self.channel_mult)
        if len(self.transformer_depth) != n * self.num_res_blocks:
            raise ValueError(
                f"transformer_depth needs {n * self.num_res_blocks} entries (one per input ResBlock), "
                f"got {len(self.transformer_depth)}"
            )
        if len(self.transformer_depth_output) != n * (self.num_res_blocks + 1):
            raise ValueError(
                f"transformer_depth_output needs {n * (self.num_res_blocks + 1)} entries, "
                f"got {len(self.transformer_depth_output)}"
            )

    @property
    def time_embed_dim(self) -> int:
        return self.model_channels * self.time_embed_mult

    @property
    def num_levels(self) -> int:
        return len(self.channel_mult)

    @staticmethod
    def per_level(depths_per_level, num_res_blocks: int = 2):
        """Expand per-level depths like (0, 2, 10) to the per-block tuples (input, output)."""
        inp = tuple(d for d in depths_per_level for _ in range(num_res_blocks))
        out = tuple(d for d in reversed(depths_per_level) for _ in range(num_res_blocks + 1))
        return inp, out

    @classmethod
    def base(cls, **kw) -> UNetConfig:
        return cls(**kw)

    @classmethod
    def refiner(cls, **kw) -> UNetConfig:
        inp, out = cls.per_level((0, 4, 4, 0))
        d = dict(
            model_channels=384,
            channel_mult=(1, 2, 4, 4),
            transformer_depth=inp,
            transformer_depth_output=out,
            transformer_depth_middle=4,
            context_dim=1280,
            adm_in_channels=2560,
        )
        d.update(kw)
        return cls(**d)

    @classmethod
    def inpaint(cls, **kw) -> UNetConfig:
        return cls(**{"in_channels": 9, **kw})

    @classmethod
    def ssd_1b(cls, **kw) -> UNetConfig:
        """Segmind SSD-1B: blocks dropped from the base (as ComfyUI describes it)."""
        d = dict(
            transformer_depth=(0, 0, 2, 2, 4, 4),
            transformer_depth_output=(4, 4, 10, 2, 1, 1, 0, 0, 0),
            transformer_depth_middle=-1,
        )
        d.update(kw)
        return cls(**d)

    @classmethod
    def vega(cls, **kw) -> UNetConfig:
        """Segmind Vega: a smaller distillation of the base."""
        d = dict(
            transformer_depth=(0, 0, 1, 1, 2, 2),
            transformer_depth_output=(2, 2, 2, 1, 1, 1, 0, 0, 0),
            transformer_depth_middle=-1,
        )
        d.update(kw)
        return cls(**d)


@dataclass(frozen=True)
class VAEConfig:
    """AutoencoderKL (f = 2 ** (len(ch_mult) - 1))."""

    in_channels: int = 3
    out_channels: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 4
    embed_dim: int = 4
    norm_groups: int = 32
    scale_factor: float = 0.13025
    shift_factor: float = 0.0
    # per-channel latent statistics (Playground v2.5): latents = (z - mean) * scale_factor / std
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    # a decoder wider than the encoder (same number of levels): None is ch_mult, as in every SD VAE
    decoder_ch_mult: tuple[int, ...] | None = None

    def __post_init__(self):
        object.__setattr__(self, "ch_mult", _tuple(self.ch_mult))
        for name in ("latents_mean", "latents_std", "decoder_ch_mult"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, _tuple(value))
        if self.decoder_ch_mult is not None and len(self.decoder_ch_mult) != len(self.ch_mult):
            raise ValueError(f"vae: decoder_ch_mult {list(self.decoder_ch_mult)} needs as many levels as "
                             f"ch_mult {list(self.ch_mult)}")

    @property
    def downscale(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def decoder_widths(self) -> list[int]:
        """Channels of each decoder level, full resolution first."""
        return [self.ch * m for m in (self.decoder_ch_mult or self.ch_mult)]


@dataclass(frozen=True)
class TextConfig:
    """A CLIP text transformer (OpenAI CLIP-L or OpenCLIP bigG)."""

    vocab_size: int = 49408
    max_positions: int = 77
    width: int = 768
    layers: int = 12
    head_dim: int = 64
    mlp_ratio: float = 4.0
    act: str = "quick_gelu"  # "quick_gelu" (CLIP-L) or "gelu" (bigG)
    projection_dim: int | None = None  # bigG: 1280 (pooled output projected); CLIP-L: unused by SDXL
    pad_token: int = 49407  # CLIP-L pads with <|endoftext|>; open_clip bigG pads with 0
    eps: float = 1e-5

    @property
    def heads(self) -> int:
        return self.width // self.head_dim

    @property
    def mlp_dim(self) -> int:
        return int(self.width * self.mlp_ratio)

    @classmethod
    def clip_l(cls, **kw) -> TextConfig:
        return cls(**kw)

    @classmethod
    def bigg(cls, **kw) -> TextConfig:
        d = dict(width=1280, layers=32, act="gelu", projection_dim=1280, pad_token=0)
        d.update(kw)
        return cls(**d)


@dataclass(frozen=True)
class ModelConfig:
    """A whole SDXL-family checkpoint: which parts it has and their sizes.

    kind: "base" (CLIP-L + bigG, size/crop/target conditioning), "refiner" (bigG only,
    size/crop/aesthetic conditioning), or "inpaint" (base with a 9-channel UNet).
    """

    kind: str = "base"
    unet: UNetConfig | None = field(default_factory=UNetConfig)
    vae: VAEConfig | None = field(default_factory=VAEConfig)
    text_l: TextConfig | None = field(default_factory=TextConfig.clip_l)
    text_g: TextConfig | None = field(default_factory=TextConfig.bigg)
    prediction: str = "eps"  # "eps", "v" or "x0" (SDXL-Lightning 1-step: the UNet outputs the clean latent)
    zero_terminal_snr: bool = False  # trained on the schedule rescaled to pure noise at t=999 (needs v)
    # Continuous EDM noise (Playground v2.5, CosXL): (sigma_min, sigma_max, sigma_data); None = SDXL's
    # discrete DDPM schedule. See sdxl.sampling.denoiser.EDMSchedule.
    edm: tuple[float, float, float] | None = None
    fourier_dim: int = 256  # features per micro-conditioning number
    sample_size: int = 1024  # the native image side, used when a request gives no size

    def __post_init__(self):
        if self.edm is not None:
            object.__setattr__(self, "edm", _tuple(self.edm))

    @classmethod
    def base(cls) -> ModelConfig:
        return cls()

    @classmethod
    def refiner(cls) -> ModelConfig:
        return cls(kind="refiner", unet=UNetConfig.refiner(), text_l=None)

    # ---- (de)serialisation: files this project writes record their config in the metadata ----
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        def sub(klass, v):
            return None if v is None else klass(**v)

        return cls(
            kind=d.get("kind", "base"),
            unet=sub(UNetConfig, d.get("unet")),
            vae=sub(VAEConfig, d.get("vae")),
            text_l=sub(TextConfig, d.get("text_l")),
            text_g=sub(TextConfig, d.get("text_g")),
            prediction=d.get("prediction", "eps"),
            zero_terminal_snr=d.get("zero_terminal_snr", False),
            edm=d.get("edm"),
            fourier_dim=d.get("fourier_dim", 256),
            sample_size=d.get("sample_size", 1024),
        )

    @classmethod
    def from_json(cls, s: str) -> ModelConfig:
        return cls.from_dict(json.loads(s))


def tiny_config(kind: str = "base") -> ModelConfig:
    """A miniature SDXL with the official structure, for tests (seconds on a CPU).

    Same layout rules as the real thing (attention only at the lower levels, two text towers whose
    outputs are concatenated, 256 Fourier features per micro-conditioning number) at small widths.
    """
    text_l = TextConfig.clip_l(width=32, layers=2, head_dim=16)
    text_g = TextConfig.bigg(width=64, layers=2, head_dim=16, projection_dim=64)
    vae = VAEConfig(ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1)
    if kind == "refiner":
        inp, out = UNetConfig.per_level((0, 1, 1, 0))
        unet = UNetConfig(
            model_channels=32,
            channel_mult=(1, 2, 2, 2),
            transformer_depth=inp,
            transformer_depth_output=out,
            transformer_depth_middle=1,
            context_dim=text_g.width,
            head_dim=16,
            adm_in_channels=text_g.projection_dim + 5 * 256,
        )
        return ModelConfig(kind="refiner", unet=unet, vae=vae, text_l=None, text_g=text_g)
    inp, out = UNetConfig.per_level((0, 1, 2))
    unet = UNetConfig(
        in_channels=9 if kind == "inpaint" else 4,
        model_channels=32,
        channel_mult=(1, 2, 4),
        transformer_depth=inp,
        transformer_depth_output=out,
        transformer_depth_middle=2,
        context_dim=text_l.width + text_g.width,
        head_dim=16,
        adm_in_channels=text_g.projection_dim + 6 * 256,
    )
    return ModelConfig(kind=kind, unet=unet, vae=vae, text_l=text_l, text_g=text_g)
