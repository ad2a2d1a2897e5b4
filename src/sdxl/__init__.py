"""sdxl: Stable Diffusion XL from scratch."""

__version__ = "0.1.0"
