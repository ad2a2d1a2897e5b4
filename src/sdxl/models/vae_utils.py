"""VAE helpers the pipeline uses: scaling, fp16 overflow fallback, tiled decode/encode.

The SDXL VAE overflows in fp16 (activations beyond 65504 -> Inf -> NaN -> black images). We decode in the
VAE's dtype, check the result, and redo the decode in float32 when it is not finite (logged), so a half-
precision VAE can never return a NaN or black image. Tiling decodes overlapping latent tiles and blends them
with linear ramps, so memory is bounded and no seam is visible.
"""

from __future__ import annotations

import logging

import torch

from ..errors import NumericsError

log = logging.getLogger(__name__)

TILE_LATENT = 64  # latent tile side (512 px)
TILE_OVERLAP = 16  # latent overlap between tiles
AUTO_TILE_PIXELS = 2048 * 2048  # decode larger images tiled unless asked otherwise


def _ramp(n: int, overlap: int, at_start: bool, at_end: bool, device) -> torch.Tensor:
    """1-D blend weights: linear ramps over the overlap on sides that touch another tile."""
    w = torch.ones(n, device=device)
    r = torch.linspace(0, 1, overlap + 2, device=device)[1:-1]
    if not at_start and overlap:
        w[:overlap] = r
    if not at_end and overlap:
        w[-overlap:] = r.flip(0)
    return w


def _tiles(size: int, tile: int, overlap: int) -> list[int]:
    if size <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, size - tile, stride)) + [size - tile]
    return sorted(set(starts))


def tiled_apply(
    fn, x: torch.Tensor, tile: int, overlap: int, scale: float, out_channels: int
) -> torch.Tensor:
    """Apply an image-to-image map `fn` (spatial scale `scale`) tile by tile with blended overlaps."""
    B, _, H, W = x.shape
    oh, ow = int(H * scale), int(W * scale)
    out = None
    weight = torch.zeros(1, 1, oh, ow, device=x.device)
    ys, xs = _tiles(H, tile, overlap), _tiles(W, tile, overlap)
    for y0 in ys:
        for x0 in xs:
            y1, x1 = min(y0 + tile, H), min(x0 + tile, W)
            part = fn(x[:, :, y0:y1, x0:x1]).float()
            if out is None:
                out = torch.zeros(B, out_channels, oh, ow, device=x.device)
            Y0, Y1, X0, X1 = int(y0 * scale), int(y1 * scale), int(x0 * scale), int(x1 * scale)
            ov_y, ov_x = int(overlap * scale), int(overlap * scale)
            wy = _ramp(Y1 - Y0, ov_y, y0 == 0, y1 == H, x.device)
            wx = _ramp(X1 - X0, ov_x, x0 == 0, x1 == W, x.device)
            w = (wy[:, None] * wx[None, :])[None, None]
            out[:, :, Y0:Y1, X0:X1] += part * w
            weight[:, :, Y0:Y1, X0:X1] += w
    return out / weight


def _channel_stats(cfg, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (1, -1) + (1,) * (like.ndim - 2)
    mean = torch.tensor(cfg.latents_mean, dtype=like.dtype, device=like.device).view(shape)
    std = torch.tensor(cfg.latents_std, dtype=like.dtype, device=like.device).view(shape)
    return mean, std


def latents_to_vae(latents: torch.Tensor, cfg) -> torch.Tensor:
    """The diffusion model's latents -> the VAE's: latents / scale_factor + shift_factor, or with per-channel
    statistics (Playground v2.5) latents * std / scale_factor + mean."""
    if cfg.latents_mean is None:
        return latents / cfg.scale_factor + cfg.shift_factor
    mean, std = _channel_stats(cfg, latents)
    return latents * std / cfg.scale_factor + mean


def vae_to_latents(z: torch.Tensor, cfg) -> torch.Tensor:
    """The inverse of `latents_to_vae`."""
    if cfg.latents_mean is None:
        return (z - cfg.shift_factor) * cfg.scale_factor
    mean, std = _channel_stats(cfg, z)
    return (z - mean) * cfg.scale_factor / std


def _decode_raw(vae, z: torch.Tensor, tiled: bool, cfg) -> torch.Tensor:
    if tiled:
        return tiled_apply(vae.decode, z, TILE_LATENT, TILE_OVERLAP, cfg.downscale, cfg.out_channels)
    return vae.decode(z).float()


def vae_decode(pipe, latents: torch.Tensor, tiled: bool | None = None) -> torch.Tensor:
    """Scaled latents -> float32 images in [-1, 1]-ish. Falls back to float32 if the VAE overflows."""
    vae, cfg = pipe.vae, pipe.config.vae
    z = latents_to_vae(latents, cfg)
    if tiled is None:
        tiled = z.shape[-1] * z.shape[-2] * cfg.downscale**2 > AUTO_TILE_PIXELS
    dtype = next(vae.parameters()).dtype
    img = _decode_raw(vae, z.to(dtype), tiled, cfg)
    if not torch.isfinite(img).all():
        if dtype == torch.float32:

            raise NumericsError("non-finite values (NaN/Inf) in the VAE decoder output (float32)")
        log.warning("VAE decode overflowed in %s; decoding again in float32", dtype)
        vae.float()
        try:
            img = _decode_raw(vae, z.float(), tiled, cfg)
        finally:
            vae.to(dtype)
        if not torch.isfinite(img).all():  # not an overflow after all: NaN weights or NaN latents

            raise NumericsError(
                f"non-finite values (NaN/Inf) in the VAE decoder output, in {dtype} and again in float32"
            )
    return img


def vae_encode(
    pipe, images: torch.Tensor, generator=None, sample: bool = False, tiled: bool | None = None
) -> torch.Tensor:
    """Images in [-1, 1] -> scaled latents. Falls back to float32 if the encoder overflows.

    The posterior mean, or with `sample` a draw mean + std * eps from it (diffusers' `latent_dist.sample`),
    eps drawn in float32 on the CPU from `generator`: one generator for the whole batch, or a list of
    generators, one per output latent, each drawing [1, C, h, w] in turn (diffusers' pipelines with a list
    of generators); a single image is then shared by all of them (encoded once)."""
    vae, cfg = pipe.vae, pipe.config.vae
    dtype = next(vae.parameters()).dtype
    if tiled is None:
        tiled = images.shape[-1] * images.shape[-2] > AUTO_TILE_PIXELS
    gens = generator if isinstance(generator, (list, tuple)) else None
    if sample and gens is not None and images.shape[0] not in (1, len(gens)):
        raise ValueError(f"{len(gens)} generators for a batch of {images.shape[0]} images")

    def moments(x: torch.Tensor) -> torch.Tensor:
        mean, logvar = vae.encode(x)
        return torch.cat([mean, logvar], dim=1)

    def run(dt):
        x = images.to(dt)
        if tiled:
            f = cfg.downscale
            m = tiled_apply(moments, x, TILE_LATENT * f, TILE_OVERLAP * f, 1 / f, 2 * cfg.embed_dim)
        else:
            m = moments(x).float()
        return m

    m = run(dtype)
    if not torch.isfinite(m).all() and dtype != torch.float32:
        log.warning("VAE encode overflowed in %s; encoding again in float32", dtype)
        vae.float()
        try:
            m = run(torch.float32)
        finally:
            vae.to(dtype)
    if not torch.isfinite(m).all():

        raise NumericsError(f"non-finite values (NaN/Inf) in the VAE encoder output ({dtype}, float32 tried)")
    mean, logvar = m.chunk(2, dim=1)
    z = mean
    if sample:
        std = torch.exp(0.5 * logvar.clamp(-30, 20))
        if gens is None:
            eps = torch.randn(mean.shape, generator=generator, dtype=torch.float32)
        else:
            one = (1, *mean.shape[1:])
            eps = torch.cat([torch.randn(one, generator=g, dtype=torch.float32) for g in gens])
        z = mean + std * eps.to(mean.device)
    return vae_to_latents(z, cfg)
