"""Model upscalers (ESRGAN, Real-ESRGAN, SwinIR, SPAN, ...) loaded through the `spandrel` library.

spandrel knows the architectures: given a state dict it detects which one it is and builds the network with
the right sizes and scale. What this module adds:

- Loading a file safely: `.safetensors` directly; `.pth` / `.pt` only through `torch.load(weights_only=True)`,
  which refuses any pickle that is not plain tensors and containers (so a file cannot run code on load);
  spandrel's own file loader is not used (it would also try TorchScript for `.pt`). The state dict is then
  handed to `spandrel.ModelLoader().load_from_state_dict`. Every failure is a one-line `CheckpointError`
  naming the file.
- Tiled inference (`Upscaler.upscale_tensor`): the image is cut into `tile` x `tile` tiles overlapping by
  `overlap` pixels, each tile is upscaled on its own, and the results are blended with weights that are 0 in
  the quarter of the overlap nearest a tile's inner edge (where the tile's zero padding changes the result)
  and rise linearly to 1 across the middle half. So where the model's receptive field is under a quarter of
  the overlap, the tiled output equals the untiled one up to float rounding.
- Scales other than the model's: the model runs again while the image is smaller than asked (as A1111
  does), and the result is resized to the exact size with Lanczos.

spandrel is an optional dependency (`pip install 'sdxl[upscale]'`); without it, loading a model upscaler is
a one-line error saying so.
"""

from __future__ import annotations

import io
import math
import os
import pickle
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from .errors import CheckpointError

UPSCALER_SUFFIXES = (".safetensors", ".pth", ".pt")
DEFAULT_TILE = 512
DEFAULT_OVERLAP = 32
INSTALL_HINT = "pip install 'sdxl[upscale]'"

Progress = Callable[[int, int], None]  # (tiles done, tiles in all)


def _spandrel() -> Any:
    try:
        import spandrel  # lazy: optional dependency, only needed for model upscalers
    except ImportError as e:
        raise CheckpointError(f"model upscalers need the spandrel package ({e}): {INSTALL_HINT}") from None
    return spandrel


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of an upscaler file, on the CPU. Pickled files (`.pth`, `.pt`) are read with
    `torch.load(weights_only=True)` only; anything else in them is refused without running it."""
    path = Path(path)
    suffix = path.suffix.lower()
    if not path.is_file():
        raise CheckpointError(f"{path}: no such upscaler file")
    if suffix == ".safetensors":
        from safetensors.torch import load_file  # lazy: only this format needs it

        try:
            sd: Any = load_file(str(path), device="cpu")
        except Exception as e:  # noqa: BLE001 - any reader error is a bad file
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    elif suffix in (".pth", ".pt"):
        try:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise CheckpointError(f"{path}: not a plain state dict; refused to unpickle it "
                                  f"({_unpickle_reason(str(e))})") from None
        except Exception as e:  # noqa: BLE001 - truncated zip, not a torch file, ...
            raise CheckpointError(f"{path}: not a readable torch file ({type(e).__name__}: {e})") from None
    else:
        kinds = ", ".join(UPSCALER_SUFFIXES)
        raise CheckpointError(f"{path}: not an upscaler file (expected one of {kinds})")
    if not isinstance(sd, dict):
        raise CheckpointError(f"{path}: holds a {type(sd).__name__}, not a state dict")
    sd = _spandrel().canonicalize_state_dict(sd)
    tensors = {k: v for k, v in sd.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{path}: holds no tensors")
    return tensors


def _unpickle_reason(message: str) -> str:
    """The reason in torch's weights_only refusal ("Unsupported global: GLOBAL io.open", ...), one line."""
    m = re.search(r"WeightsUnpickler error:\s*(.+?)(?: was not an allowed global|\.?\s*(?:\n|$))", message)
    return m.group(1).strip() if m else "not tensors and plain containers"


@dataclass
class Upscaler:
    """A loaded model upscaler; `model` is spandrel's ImageModelDescriptor (takes [B, C, H, W] in [0, 1])."""

    name: str
    path: Path
    model: Any
    architecture: str
    scale: int
    device: torch.device
    dtype: torch.dtype

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.model(x.to(self.device, self.dtype)).float()

    def upscale_tensor(self, x: torch.Tensor, tile: int = DEFAULT_TILE, overlap: int = DEFAULT_OVERLAP,
                       progress: Progress | None = None) -> torch.Tensor:
        """One pass of the model over [B, C, H, W] (values in [0, 1]) -> [B, C', H*scale, W*scale], fp32 on
        the CPU. Tiled when the image is larger than `tile` on a side (`tile` <= 0: never)."""
        _, _, h, w = x.shape
        if tile <= 0 or (h <= tile and w <= tile):
            out = self._run(x).cpu()
            if progress:
                progress(1, 1)
            return out
        overlap = max(0, min(overlap, tile // 2))
        ys, xs = _starts(h, tile, overlap), _starts(w, tile, overlap)
        s = self.scale
        out: torch.Tensor | None = None
        weight = torch.zeros(1, 1, h * s, w * s)
        total, done = len(ys) * len(xs), 0
        for y0 in ys:
            for x0 in xs:
                th, tw = min(tile, h - y0), min(tile, w - x0)
                y = self._run(x[:, :, y0:y0 + th, x0:x0 + tw]).cpu()
                if out is None:
                    out = torch.zeros(x.shape[0], y.shape[1], h * s, w * s)
                wy = _ramp(th * s, s, overlap, y0 > 0, y0 + th < h)
                wx = _ramp(tw * s, s, overlap, x0 > 0, x0 + tw < w)
                win = wy[:, None] * wx[None, :]
                out[:, :, y0 * s:(y0 + th) * s, x0 * s:(x0 + tw) * s] += y * win
                weight[:, :, y0 * s:(y0 + th) * s, x0 * s:(x0 + tw) * s] += win
                done += 1
                if progress:
                    progress(done, total)
        assert out is not None
        return out / weight

    def upscale(self, image: Image.Image, scale: float | None = None, tile: int = DEFAULT_TILE,
                overlap: int = DEFAULT_OVERLAP, progress: Progress | None = None) -> Image.Image:
        """`image` made `scale` times larger (default: the model's scale; each side rounded down). The model
        runs until the image is at least that large; a different size is then reached with Lanczos."""
        scale = float(self.scale) if scale is None else float(scale)
        if not math.isfinite(scale) or scale <= 0:
            raise ValueError(f"upscale by {scale}: must be a positive number")
        w, h = image.size
        target = (max(1, int(w * scale)), max(1, int(h * scale)))
        has_alpha = image.mode in ("RGBA", "LA") or "transparency" in image.info
        alpha = image.convert("RGBA").getchannel("A") if has_alpha else None
        current = image.convert("RGB")
        passes = 0
        while (current.width < target[0] or current.height < target[1]) and self.scale > 1 and passes < 4:
            x = torch.from_numpy(np.asarray(current, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
            y = self.upscale_tensor(x, tile, overlap, progress)
            arr = (y[0, :3].clamp(0, 1).permute(1, 2, 0).numpy() * 255.0).round().astype(np.uint8)
            current = Image.fromarray(arr, "RGB")
            passes += 1
        if current.size != target:
            current = current.resize(target, Image.LANCZOS)
        if alpha is not None:
            current.putalpha(alpha.resize(target, Image.LANCZOS))
        return current


def _starts(n: int, tile: int, overlap: int) -> list[int]:
    """Tile origins along a side of `n` pixels: every `tile - overlap`, the last one flush with the end."""
    if n <= tile:
        return [0]
    step = tile - overlap
    starts = list(range(0, n - tile, step))
    starts.append(n - tile)
    return starts


def _ramp(n_out: int, scale: int, overlap: int, inner_start: bool, inner_end: bool) -> torch.Tensor:
    """Blend weights along one side of a tile's output (`n_out` pixels, `scale` per input pixel): 0 within a
    quarter of the overlap of an inner edge, rising linearly to 1 across the next half of the overlap."""
    d = (torch.arange(n_out, dtype=torch.float32) + 0.5) / scale  # distance from the start, input pixels
    w = torch.ones(n_out)
    if overlap <= 0:
        return w
    lo, span = overlap / 4, overlap / 2

    def ramp(dist: torch.Tensor) -> torch.Tensor:
        return ((dist - lo) / span).clamp(0, 1)

    if inner_start:
        w = w * ramp(d)
    if inner_end:
        w = w * ramp(n_out / scale - d)
    return w


def load_upscaler(path: str | os.PathLike, device: str | torch.device = "cpu",
                  dtype: torch.dtype = torch.float32, name: str | None = None) -> Upscaler:
    """Load an upscaler file: detect its architecture and scale with spandrel, on `device` in `dtype` (fp32
    when the architecture does not support the dtype asked). Raises CheckpointError naming the file."""
    path = Path(path)
    spandrel = _spandrel()
    sd = read_state_dict(path)
    try:
        desc = spandrel.ModelLoader(device="cpu").load_from_state_dict(sd)
    except spandrel.UnsupportedModelError:
        raise CheckpointError(f"{path}: not an upscaler architecture spandrel knows") from None
    except Exception as e:  # noqa: BLE001 - a known architecture whose tensors do not fit it
        raise CheckpointError(f"{path}: could not build the upscaler ({type(e).__name__}: {e})") from None
    if not isinstance(desc, spandrel.ImageModelDescriptor):
        raise CheckpointError(f"{path}: a {desc.architecture.name} model ({desc.purpose}), not an upscaler")
    if desc.input_channels != 3 or desc.output_channels != 3:
        raise CheckpointError(f"{path}: a {desc.architecture.name} model for {desc.input_channels}-channel "
                              "images; upscalers here take RGB")
    if (dtype == torch.float16 and not desc.supports_half) or \
            (dtype == torch.bfloat16 and not desc.supports_bfloat16):
        dtype = torch.float32
    device = torch.device(device)
    desc.to(device)
    desc.to(dtype)
    desc.eval()
    return Upscaler(name=name or path.stem, path=path, model=desc, architecture=desc.architecture.name,
                    scale=int(desc.scale), device=device, dtype=dtype)


def list_upscaler_files(folder: str | os.PathLike | None) -> list[Path]:
    """Upscaler files in `folder` and its sub-folders (relative paths, sorted); [] without a folder."""
    if folder is None:
        return []
    root = Path(folder)
    if not root.is_dir():
        return []
    return sorted(p.relative_to(root) for p in root.rglob("*")
                  if p.is_file() and p.suffix.lower() in UPSCALER_SUFFIXES)


def scale_from_name(name: str) -> float | None:
    """The scale a file name announces, as A1111 reads it ("4x-UltraSharp", "RealESRGAN_x4plus"), or None."""
    m = re.search(r"(?:^|[^a-z0-9])(\d)x(?:[^a-z0-9]|$)", name.lower()) or \
        re.search(r"x(\d)(?:[^0-9]|$)", name.lower())
    return float(m.group(1)) if m else None


def postprocess_text(name: str, scale: float) -> str:
    """A1111's extras fields for an upscale, as its postprocessing appends them to the infotext."""
    return f"Postprocess upscale by: {scale:g}, Postprocess upscaler: {name}"


def upscaled_chunks(chunks: dict[str, str], name: str, scale: float) -> dict[str, str]:
    """The text chunks for an upscaled image: the source image's chunks (its generation parameters and our
    JSON record stay as they were), with A1111's extras fields appended to the `parameters` infotext."""
    out = dict(chunks)
    extras = postprocess_text(name, scale)
    params = out.get("parameters", "").rstrip()
    out["parameters"] = f"{params}, {extras}" if params else extras
    return out


def png_bytes(image: Image.Image, chunks: dict[str, str]) -> bytes:
    """`image` as PNG bytes carrying `chunks` as text chunks."""
    info = PngInfo()
    for key, value in chunks.items():
        info.add_text(key, value)
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def text_chunks(image: Image.Image) -> dict[str, str]:
    """The string text chunks of an opened image (PNG tEXt/zTXt/iTXt)."""
    found = getattr(image, "text", None)
    items = found if isinstance(found, dict) else image.info
    return {str(k): v for k, v in items.items() if isinstance(v, str)}
