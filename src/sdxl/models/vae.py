"""The SDXL autoencoder (sgm `AutoencoderKL`, same architecture as the SD 1/2 VAE).

Parameter names are the official ones (prefix `first_stage_model.` in a single-file checkpoint):

    encoder.conv_in
    encoder.down.{i}.block.{j}.{norm1,conv1,norm2,conv2,nin_shortcut}   i = level (0 = full resolution)
    encoder.down.{i}.downsample.conv                                    every level but the last
    encoder.mid.{block_1, attn_1.{norm,q,k,v,proj_out}, block_2}
    encoder.norm_out, encoder.conv_out                                  -> 2 * z_channels (mean, logvar)
    quant_conv, post_quant_conv                                         1x1 convs around the latent
    decoder.conv_in, decoder.mid...
    decoder.up.{i}.block.{j}, decoder.up.{i}.upsample.conv              i = level, so the decoder runs
                                                                        up.{n-1} first (REVERSE order)
    decoder.norm_out, decoder.conv_out

`encode` returns the *unscaled* latent moments and `decode` takes unscaled latents: multiplying by
`VAEConfig.scale_factor` (0.13025 for SDXL) is the caller's job, so this module matches the file 1:1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sdxl.models.config import VAEConfig


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    """Two GroupNorm-SiLU-conv3x3 stages plus a residual (1x1 `nin_shortcut` when the width changes)."""

    def __init__(self, in_channels: int, out_channels: int, groups: int = 32):
        super().__init__()
        self.norm1 = _norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels, groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)
        else:
            self.nin_shortcut = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels; q/k/v/proj_out are 1x1 convs as in the official file."""

    def __init__(self, channels: int, groups: int = 32):
        super().__init__()
        self.norm = _norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        hn = self.norm(x)
        # [B, C, H, W] -> [B, 1 head, H*W tokens, C]
        q = self.q(hn).reshape(b, 1, c, h * w).transpose(2, 3)
        k = self.k(hn).reshape(b, 1, c, h * w).transpose(2, 3)
        v = self.v(hn).reshape(b, 1, c, h * w).transpose(2, 3)
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(2, 3).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """sgm/LDM VAE downsampler: pad right and bottom by one, then a 3x3 stride-2 conv without padding.

    (Not the same as a conv with padding=1: the asymmetric pad shifts the sampling grid.)
    """

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


class Upsample(nn.Module):
    """Nearest-neighbour x2 then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    """ResnetBlock -> AttnBlock -> ResnetBlock at the lowest resolution (encoder and decoder alike)."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups)
        self.attn_1 = AttnBlock(channels, groups)
        self.block_2 = ResnetBlock(channels, channels, groups)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class EncoderLevel(nn.Module):
    """One encoder resolution: `block` (ResnetBlocks) and an optional `downsample`."""

    def __init__(self, in_ch: int, out_ch: int, num_blocks: int, groups: int, downsample: bool):
        super().__init__()
        self.block = nn.ModuleList(
            [ResnetBlock(in_ch if j == 0 else out_ch, out_ch, groups) for j in range(num_blocks)]
        )
        self.downsample = Downsample(out_ch) if downsample else None

    def forward(self, x: Tensor) -> Tensor:
        for block in self.block:
            x = block(x)
        if self.downsample is not None:
            x = self.downsample(x)
        return x


class DecoderLevel(nn.Module):
    """One decoder resolution: `block` (ResnetBlocks) and an optional `upsample`."""

    def __init__(self, in_ch: int, out_ch: int, num_blocks: int, groups: int, upsample: bool):
        super().__init__()
        self.block = nn.ModuleList(
            [ResnetBlock(in_ch if j == 0 else out_ch, out_ch, groups) for j in range(num_blocks)]
        )
        self.upsample = Upsample(out_ch) if upsample else None

    def forward(self, x: Tensor) -> Tensor:
        for block in self.block:
            x = block(x)
        if self.upsample is not None:
            x = self.upsample(x)
        return x


class Encoder(nn.Module):
    """Image [B, in_channels, H, W] -> [B, 2 * z_channels, H/f, W/f] (mean and logvar stacked)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        n = len(widths)
        g = cfg.norm_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        in_ch = cfg.ch
        for i, out_ch in enumerate(widths):
            self.down.append(EncoderLevel(in_ch, out_ch, cfg.num_res_blocks, g, downsample=i != n - 1))
            in_ch = out_ch
        self.mid = MidBlock(in_ch, g)
        self.norm_out = _norm(in_ch, g)
        self.conv_out = nn.Conv2d(in_ch, 2 * cfg.z_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent [B, z_channels, h, w] -> image [B, out_channels, h*f, w*f].

    The decoder has num_res_blocks + 1 ResnetBlocks per level. `up` is indexed by level (up.0 is the
    full-resolution level), and runs from the last index down to 0, as in sgm.
    """

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        widths = cfg.decoder_widths
        n = len(widths)
        g = cfg.norm_groups
        in_ch = widths[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, in_ch, 3, padding=1)
        self.mid = MidBlock(in_ch, g)
        deepest_first = []
        for i in reversed(range(n)):
            deepest_first.append(DecoderLevel(in_ch, widths[i], cfg.num_res_blocks + 1, g, upsample=i != 0))
            in_ch = widths[i]
        self.up = nn.ModuleList(deepest_first[::-1])  # stored by level index: up.0 = full resolution
        self.norm_out = _norm(in_ch, g)
        self.conv_out = nn.Conv2d(in_ch, cfg.out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.conv_in(z)
        h = self.mid(h)
        for i in reversed(range(len(self.up))):
            h = self.up[i](h)
        return self.conv_out(F.silu(self.norm_out(h)))


class AutoencoderKL(nn.Module):
    """KL autoencoder: `encode(image) -> (mean, logvar)`, `decode(latent) -> image`, both unscaled.

    Images are [-1, 1]; the decoder output is not clamped (callers clamp when converting to pixels).
    """

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)

    @property
    def dtype(self) -> torch.dtype:
        return self.quant_conv.weight.dtype

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Image -> (mean, logvar) of the latent Gaussian, each [B, embed_dim, H/f, W/f].

        logvar is clamped to [-30, 20] like sgm's `DiagonalGaussianDistribution`, so
        `mean + exp(0.5 * logvar) * noise` is a faithful sample.
        """
        moments = self.quant_conv(self.encoder(x.to(self.dtype)))
        mean, logvar = moments.chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z: Tensor) -> Tensor:
        """Unscaled latent -> image in (roughly) [-1, 1]."""
        return self.decoder(self.post_quant_conv(z.to(self.dtype)))

    def forward(self, x: Tensor) -> Tensor:
        """Reconstruct with the posterior mean (no sampling)."""
        mean, _ = self.encode(x)
        return self.decode(mean)
