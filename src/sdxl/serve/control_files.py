"""The server's control models folder: where ControlNet / T2I-Adapter / Control-LoRA files (and, as A1111
keeps them, IP-Adapter files) are looked up, and how sd-webui-controlnet lists them ("name [hash]"); and
`strip_title`, the name in such a title (A1111 titles checkpoints the same way)."""

from __future__ import annotations

import hashlib
import io
import os
import re
from pathlib import Path
from typing import Any

from PIL import Image

from ..metadata.hashes import legacy_hash

CONTROL_MODEL_SUFFIXES = (".safetensors", ".pt", ".pth", ".ckpt", ".bin")  # the extension's CN_MODEL_EXTS
# A1111 titles look like "sd_xl_base_1.0.safetensors [31e35c80fc]": the part in brackets is a hash.
_TITLE_HASH = re.compile(r"\s*\[[0-9a-fA-F]{8,64}\]\s*$")


def control_dirs(settings: Any, existing: bool = True) -> list[Path]:
    """The folders of control models (ControlNet, T2I-Adapter, Control-LoRA and, as A1111 keeps them,
    IP-Adapter files): `controlnet_dir` / `ipadapter_dir` when the server has them, and
    `<models_dir>/ControlNet`. `existing`: only those that are folders now."""
    dirs = [getattr(settings, "controlnet_dir", None), getattr(settings, "ipadapter_dir", None)]
    models_dir = getattr(settings, "models_dir", None)
    if models_dir is not None:
        dirs += [Path(models_dir) / "ControlNet", Path(models_dir) / "controlnet"]
    out: list[Path] = []
    for d in dirs:
        if d is not None and (Path(d).is_dir() or not existing) and Path(d).resolve() not in [
                x.resolve() for x in out]:
            out.append(Path(d))
    return out


def control_model_files(dirs: list[Path]) -> list[Path]:
    """Control model files (any of the extension's suffixes, in sub-folders too) and diffusers folders
    (config.json beside diffusion_pytorch_model.*), sorted by name; image encoder folders left out."""
    found: dict[str, Path] = {}
    for root in dirs:
        for p in sorted(root.rglob("*")):
            rel = p.relative_to(root)
            if any(part in ("image_encoder", "clip_vision") for part in rel.parts):
                continue
            if p.is_file() and p.suffix.lower() in CONTROL_MODEL_SUFFIXES and not (
                    p.parent / "config.json").is_file():
                found.setdefault(p.stem.lower(), p)
            elif p.is_dir() and (p / "config.json").is_file() and any(p.glob("diffusion_pytorch_model.*")):
                found.setdefault(p.name.lower(), p)
    return sorted(found.values(), key=lambda p: (p.stem if p.is_file() else p.name).lower())


def control_model_title(path: Path) -> str:
    """'name [hash]' as the extension lists a model: the stem and A1111's 8-digit legacy hash of the file
    (of a diffusers folder's weights file)."""
    weights = path
    if path.is_dir():
        weights = sorted(path.glob("diffusion_pytorch_model.*"))[0]
    return f"{path.stem if path.is_file() else path.name} [{legacy_hash(weights)}]"


def strip_title(name: str) -> str:
    """'model.safetensors [31e35c80fc]' -> 'model.safetensors'."""
    return _TITLE_HASH.sub("", name).strip()


def store_image(folder: str | os.PathLike, image: Image.Image) -> str:
    """A decoded control / reference image saved as PNG in the server's inputs folder, named by its content;
    its absolute path is what the request holds, so a queued job can be stored and run after a restart."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    data = buf.getvalue()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"control-{hashlib.sha256(data).hexdigest()[:24]}.png"
    if not path.exists():
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    return str(path.resolve())
