"""The CLIP vision transformer IP-Adapter reads reference images with (OpenCLIP ViT-H/14, ViT-bigG/14).

A pre-norm ViT: 14x14 patches -> tokens, a class token in front, learned positions, a layer norm before the
blocks (`pre_layrnorm`, transformers' spelling), the text tower's blocks (`models.text.CLIPEncoder`) without
the causal mask, then on the class token a final layer norm and a bias-free projection. Parameter names follow
transformers' `CLIPVisionModelWithProjection` without its `vision_model.` prefix (`sdxl.weights.ip_adapter`
maps those files and open_clip's `visual.*` names onto these).

What IP-Adapter reads (diffusers' `encode_image`):
- `image_embeds`: visual_projection(post_layernorm(last layer output[:, 0])), [B, projection_dim] (plain
  IP-Adapter);
- the penultimate layer's output, all tokens, without any final norm, [B, 1 + patches, width]
  (transformers' hidden_states[-2]: plus / plus-face).

`preprocess` is CLIPImageProcessor's: shortest side to 224 (bicubic), centre crop 224x224, /255, CLIP
mean / std.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from .text import CLIPEncoder

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class VisionConfig:
    """Sizes of a CLIP vision tower (defaults: OpenCLIP ViT-H/14, the encoder of the plus adapters)."""

    width: int = 1280
    layers: int = 32
    heads: int = 16
    mlp_dim: int = 5120
    patch_size: int = 14
    image_size: int = 224
    projection_dim: int = 1024
    act: str = "gelu"
    eps: float = 1e-5

    @property
    def positions(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1

    @classmethod
    def vit_h(cls) -> VisionConfig:
        return cls()

    @classmethod
    def vit_bigg(cls) -> VisionConfig:
        return cls(width=1664, layers=48, heads=16, mlp_dim=8192, projection_dim=1280)


class VisionEmbeddings(nn.Module):
    """Patch embedding (a bias-free conv with stride = patch size), class token in front, positions added."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.zeros(cfg.width))
        self.patch_embedding = nn.Conv2d(3, cfg.width, cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.position_embedding = nn.Embedding(cfg.positions, cfg.width)

    def forward(self, pixels: Tensor) -> Tensor:
        patches = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype))
        patches = patches.flatten(2).transpose(1, 2)  # [B, grid * grid, W], row-major over the grid
        cls = self.class_embedding.to(patches.dtype).expand(patches.shape[0], 1, -1)
        x = torch.cat([cls, patches], dim=1)
        if x.shape[1] != self.position_embedding.num_embeddings:
            raise ValueError(f"{x.shape[1] - 1} patches, the tower was trained on "
                             f"{self.position_embedding.num_embeddings - 1}")
        return x + self.position_embedding.weight[None].to(x.dtype)


class CLIPVisionTower(nn.Module):
    """One CLIP vision transformer with its projection (transformers' CLIPVisionModelWithProjection)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        if cfg.width % cfg.heads:
            raise ValueError(f"width {cfg.width} is not a multiple of {cfg.heads} heads")
        self.cfg = cfg
        self.embeddings = VisionEmbeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.encoder = CLIPEncoder(cfg, causal=False)  # the text tower's blocks, attending to all tokens
        self.post_layernorm = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.visual_projection = nn.Linear(cfg.width, cfg.projection_dim, bias=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.post_layernorm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.post_layernorm.weight.device

    def forward(self, pixels: Tensor, penultimate: bool = False) -> Tensor:
        """pixels [B, 3, S, S] (`preprocess`d) -> image_embeds [B, projection_dim]; with `penultimate`, the
        penultimate layer's output [B, 1 + patches, width] instead (the last layer is then not run)."""
        x = self.pre_layrnorm(self.embeddings(pixels))
        layers = self.encoder.layers
        if penultimate:
            for layer in layers[:-1]:
                x = layer(x)
            return x
        for layer in layers:
            x = layer(x)
        return self.visual_projection(self.post_layernorm(x[:, 0]))

    def image_embeds(self, pixels: Tensor) -> Tensor:
        return self(pixels)

    def penultimate_hidden(self, pixels: Tensor) -> Tensor:
        return self(pixels, penultimate=True)


def preprocess(images: list[Image.Image], size: int = 224) -> Tensor:
    """CLIPImageProcessor's preprocessing: RGB, shortest side to `size` (PIL bicubic, the longer side
    int(size * long / short)), centre crop size x size (offsets floor((side - size) / 2)), x/255, then
    (x - mean) / std per channel. Returns [N, 3, size, size] float32."""
    out = []
    mean = np.asarray(CLIP_MEAN, dtype=np.float32)
    std = np.asarray(CLIP_STD, dtype=np.float32)
    for im in images:
        im = im.convert("RGB")
        w, h = im.size
        short, long = (w, h) if w <= h else (h, w)
        new_long = int(size * long / short)
        new = (size, new_long) if w <= h else (new_long, size)
        if new != (w, h):
            im = im.resize(new, Image.BICUBIC)
        w, h = im.size
        if w < size or h < size:  # cannot happen after the resize above; kept for odd rounding
            raise ValueError(f"image of {w}x{h} is smaller than the {size}x{size} crop")
        top, left = int((h - size) / 2), int((w - size) / 2)
        im = im.crop((left, top, left + size, top + size))
        arr = np.asarray(im, dtype=np.float32) * np.float32(1 / 255)
        arr = (arr - mean) / std
        out.append(torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))))
    return torch.stack(out)
