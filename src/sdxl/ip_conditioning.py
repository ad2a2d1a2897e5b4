"""IP-Adapter in a generation: reference images -> image tokens appended to the text conditioning.

For each `IPAdapterUnit` of a request (in order): the adapter file is resolved and loaded (cached on the
model), its image encoder found, the reference images encoded and projected to tokens, as diffusers'
`StableDiffusionXLPipeline` with `load_ip_adapter` does:

- plain: image_embeds of the CLIP vision tower -> ImageProjModel; the negative branch projects zeros in
  place of the image embeddings;
- plus / plus-face: the tower's penultimate hidden states -> Resampler; the negative branch encodes an
  all-zero (already normalised) image;
- FaceID: the given face embeddings (512 numbers each, e.g. insightface's `normed_embedding`) -> MLPProjModel;
  the negative branch projects zeros (diffusers' documented usage).

Several images of one unit: each is projected alone and their tokens are concatenated (one softmax over all
of them), as diffusers does with a list of images for one adapter.

The tokens go at the end of every context of both conditioning schedules (the cond side of a composable
prompt too), unit after unit, and every cross-attention is swapped for `IPAttention`, which reads them
back from there (`sdxl.models.ip_adapter`). Start / end: unit u applies on sampler step i (0-based) of n when
start <= i / n <= end (sd-webui-controlnet's rule for its units); on the other steps its tokens are zeros in
both branches, which adds exactly nothing. The FaceID file's LoRA (if any) is hooked onto the UNet for the
whole run at weight 1, as diffusers loads it.

Control models see only the text: `text_context(pipe, context)` drops the image tokens (their count is
`pipe.ip_files.image_tokens` while a request runs, 0 otherwise).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from .data.images import load_image
from .errors import BadName, CheckpointError, NameNotFound, RequestError
from .files import resolve_in_folder
from .models.clip_vision import CLIPVisionTower, preprocess
from .models.ip_adapter import IPAdapter, IPState, apply_ip_adapters, check_fits, cross_attentions
from .request import GenerationRequest, IPAdapterUnit
from .sampling.guidance import Composable
from .weights.ip_adapter import encoder_output_dims, fits_encoder, load_image_encoder, load_ip_adapter
from .weights.lora import Lora, LoraSet, apply, lora_models

log = logging.getLogger(__name__)

ADAPTER_SUFFIXES = (".safetensors", ".bin")
ENCODER_SUFFIXES = (".safetensors", ".bin", ".pth")
ENCODER_FOLDERS = ("image_encoder", "clip_vision")  # sub-folders searched for image encoders


@dataclass
class IPAdapterFiles:
    """Where a model looks up IP-Adapter files and image encoders, and what it has loaded (`SDXL.ip_files`).

    dirs: folders of adapter files (names are looked up there; their `image_encoder/` and `clip_vision/`
      sub-folders hold encoders). image_encoder: the encoder to use when a unit names none (a path).
    allow_paths: accept file paths as well as names (the CLI and Python API; the server turns it off).
    allow_pickle: read `.bin` files (weights-only). image_tokens: image tokens at the end of every context
    while a request runs."""

    dirs: list[Path] = field(default_factory=list)
    image_encoder: str | None = None
    allow_paths: bool = True
    allow_pickle: bool = False
    image_tokens: int = 0
    adapters: dict[tuple[str, int], IPAdapter] = field(default_factory=dict)
    encoders: dict[tuple[str, int], CLIPVisionTower] = field(default_factory=dict)
    encoder_dims: dict[tuple[str, int], tuple[int, int]] = field(default_factory=dict)

    def dims(self, path: Path) -> tuple[int, int]:
        """(projection_dim, width) of an image encoder, read once per file and modification time."""
        key = (str(path.resolve()), _mtime(path))
        if key not in self.encoder_dims:
            self.encoder_dims[key] = encoder_output_dims(path, self.allow_pickle)
        return self.encoder_dims[key]


def text_context(pipe, context: torch.Tensor) -> torch.Tensor:
    """`context` without the IP-Adapter image tokens the running request appended (what a ControlNet gets)."""
    n = pipe.ip_files.image_tokens if getattr(pipe, "ip_files", None) is not None else 0
    return context[:, : context.shape[1] - n] if n else context


# ------------------------------------------------------------------------------------------ finding files
def _resolve(files: IPAdapterFiles, name: str, where: str, what: str, suffixes: tuple[str, ...],
             folders_ok: bool = False, subdirs: tuple[str, ...] = ("",)) -> Path:
    p = Path(name).expanduser()
    if files.allow_paths and p.exists():
        return p
    for d in files.dirs:
        for sub in subdirs:
            try:
                return resolve_in_folder(Path(d) / sub if sub else Path(d), name, what, suffixes,
                                         files_only=not folders_ok)
            except NameNotFound:
                continue
            except BadName as e:
                raise RequestError(f"{where}: {e}") from None
    places = ", ".join(str(d) for d in files.dirs)
    raise RequestError(f"{where}: {what} {name!r} not found" + (f" in {places}" if places else ""))


def _mtime(p: Path) -> int:
    target = p / "model.safetensors" if p.is_dir() else p
    try:
        return target.stat().st_mtime_ns
    except OSError:
        return 0


def _encoder_candidates(files: IPAdapterFiles, adapter_path: Path) -> list[Path]:
    """Where an adapter's encoder may be when none is named: beside the file (h94/IP-Adapter's
    `sdxl_models/image_encoder`, and `models/image_encoder` one level up, where the ViT-H of the plus models
    is), then in the adapter folders' image_encoder/ and clip_vision/ sub-folders. Without `allow_paths` only
    candidates inside the adapter folders count."""
    here = adapter_path.resolve().parent
    out = [here / "image_encoder", here.parent / "models" / "image_encoder"]
    for d in files.dirs:
        for sub in ENCODER_FOLDERS:
            folder = Path(d) / sub
            out.append(folder)
            if folder.is_dir():
                out += sorted(x for x in folder.iterdir()
                              if x.is_dir() or x.suffix.lower() in ENCODER_SUFFIXES)
    roots = [Path(d).resolve() for d in files.dirs]
    seen, unique = set(), []
    for c in out:
        if c in seen or not (c.is_file() or (c / "model.safetensors").is_file()
                             or (c / "pytorch_model.bin").is_file()):
            continue
        if not files.allow_paths and not any(c.resolve().is_relative_to(r) for r in roots):
            continue  # names only (the server): nothing outside the configured folders
        seen.add(c)
        unique.append(c)
    return unique


def _find_encoder(files: IPAdapterFiles, unit: IPAdapterUnit, adapter: IPAdapter, adapter_path: Path,
                  where: str) -> Path:
    spec = adapter.spec
    need = "width" if spec.kind == "plus" else "projection_dim"
    explicit = unit.image_encoder or files.image_encoder
    if explicit is not None:
        field_name = f"{where}.image_encoder"
        path = _resolve(files, explicit, field_name, "image encoder", ENCODER_SUFFIXES, folders_ok=True,
                        subdirs=("", *ENCODER_FOLDERS))
        try:
            dims = files.dims(path)
        except CheckpointError as e:
            raise RequestError(f"{field_name}: {e}") from None
        if not fits_encoder(spec, dims):
            got = dims[1] if spec.kind == "plus" else dims[0]
            raise RequestError(f"{field_name}: {path} gives {need} {got}, the adapter {adapter_path.name} "
                               f"needs {spec.embed_dim}")
        return path
    tried = []
    for cand in _encoder_candidates(files, adapter_path):
        try:
            dims = files.dims(cand)
        except CheckpointError:
            continue
        tried.append(str(cand))
        if fits_encoder(spec, dims):
            return cand
    hint = f" (tried {', '.join(tried)})" if tried else ""
    raise RequestError(f"{where}.image_encoder: no image encoder found for {adapter_path.name} (it needs a "
                       f"CLIP vision tower with {need} {spec.embed_dim}){hint}; name one with image_encoder "
                       "or --image-encoder")


def _home(pipe) -> torch.device:
    """Where loaded adapters and encoders live: the storage memory under CPU offload, else the device."""
    return pipe.offload_storage if getattr(pipe, "offload_storage", None) is not None else pipe.device


def load_unit_adapter(pipe, unit: IPAdapterUnit, where: str) -> tuple[IPAdapter, Path]:
    """The unit's adapter (loaded once per file and modification time), checked against the UNet."""
    files: IPAdapterFiles = pipe.ip_files
    path = _resolve(files, unit.model, f"{where}.model", "IP-Adapter", ADAPTER_SUFFIXES)
    key = (str(path.resolve()), _mtime(path))
    if key not in files.adapters:
        try:
            files.adapters[key] = load_ip_adapter(path, _home(pipe), pipe.dtype, files.allow_pickle)
        except CheckpointError as e:
            raise RequestError(f"{where}.model: {e}") from None
    adapter = files.adapters[key]
    why = check_fits(pipe.unet, adapter)
    if why is not None:
        raise RequestError(f"{where}.model: {path.name} does not fit this model: {why}")
    return adapter, path


def _encoder(pipe, path: Path, where: str) -> CLIPVisionTower:
    files: IPAdapterFiles = pipe.ip_files
    key = (str(path.resolve()), _mtime(path))
    if key not in files.encoders:
        try:
            files.encoders[key] = load_image_encoder(path, _home(pipe), pipe.dtype, files.allow_pickle)
        except CheckpointError as e:
            raise RequestError(f"{where}.image_encoder: {e}") from None
    return files.encoders[key]


def _images(unit: IPAdapterUnit, where: str) -> list[Image.Image]:
    out = []
    for k, im in enumerate(unit.images):
        if isinstance(im, Image.Image):
            out.append(im.convert("RGB"))
            continue
        if not isinstance(im, (str, Path)):
            raise RequestError(f"{where}.images[{k}]: {type(im).__name__} is not an image or a path")
        try:
            out.append(load_image(im))
        except (OSError, ValueError) as e:
            raise RequestError(f"{where}.images[{k}]: {e}") from None
    return out


# ------------------------------------------------------------------------------------------ tokens
@dataclass
class UnitTokens:
    """One unit's image tokens for the cond and uncond branches ([1, n, C]) and its step rule."""

    cond: torch.Tensor
    uncond: torch.Tensor
    scale: float
    start: float
    end: float

    def active(self, step: int, steps: int) -> bool:
        frac = step / max(steps, 1)
        return self.start <= frac <= self.end


@torch.no_grad()
def unit_tokens(pipe, unit: IPAdapterUnit, where: str) -> tuple[IPAdapter, UnitTokens]:
    """Load the unit's adapter (and encoder) and compute its cond / uncond image tokens. With CPU offload the
    adapter and the encoder are kept in the storage memory and visit the device for this (`on_device`)."""
    adapter, path = load_unit_adapter(pipe, unit, where)
    if adapter.kind == "faceid":
        if unit.images and not unit.face_embeddings:
            raise RequestError(f"{where}.face_embeddings: {path.name} is a FaceID adapter; it takes face "
                               "embeddings (512 numbers each, from a face-recognition model), not images")
        for k, e in enumerate(unit.face_embeddings):
            if len(e) != adapter.spec.embed_dim:
                raise RequestError(f"{where}.face_embeddings[{k}]: {len(e)} numbers, {path.name} takes "
                                   f"{adapter.spec.embed_dim}")
        emb = torch.tensor([list(e) for e in unit.face_embeddings], dtype=torch.float32)
        with pipe.on_device(adapter):
            emb = emb.to(pipe.device, pipe.dtype)
            cond, uncond = adapter.project(emb), adapter.project(torch.zeros_like(emb))
    else:
        if unit.face_embeddings:
            raise RequestError(f"{where}.face_embeddings: {path.name} is not a FaceID adapter; give images")
        if not unit.images:
            raise RequestError(f"{where}.images: none given")
        images = _images(unit, where)
        encoder = _encoder(pipe, _find_encoder(pipe.ip_files, unit, adapter, path, where), where)
        pixels = preprocess(images, encoder.cfg.image_size)
        with pipe.on_device(encoder):
            pixels = pixels.to(pipe.device, encoder.dtype)
            if adapter.uses_hidden_states:
                embeds = encoder(pixels, penultimate=True)
                negative = encoder(torch.zeros_like(pixels), penultimate=True)  # diffusers: a zero image
            else:
                embeds = encoder(pixels)
                negative = torch.zeros_like(embeds)  # diffusers: zero image embeddings
        with pipe.on_device(adapter):
            cond, uncond = adapter.project(embeds), adapter.project(negative)
    return adapter, UnitTokens(cond.to(pipe.device, pipe.dtype), uncond.to(pipe.device, pipe.dtype),
                               float(unit.scale), float(unit.start), float(unit.end))


def extend_schedule(schedule: list, units: list[UnitTokens], steps: int, negative: bool) -> list:
    """A conditioning schedule [(end_step, context [B, L, C], y), ...] with every unit's tokens appended to
    each context (zeros on the steps where a unit is off); entries are split where a unit switches."""
    if not units:
        return list(schedule)
    ends = {end for end, _, _ in schedule}
    for i in range(1, steps):
        if any(u.active(i, steps) != u.active(i - 1, steps) for u in units):
            ends.add(i)
    last = max(max(ends), steps)
    ends = sorted(e for e in ends if e > 0) or [last]
    if ends[-1] < last:
        ends.append(last)
    out, prev = [], 0
    for end in ends:
        step = prev
        context, y = schedule[-1][1], schedule[-1][2]
        for e, c, yy in schedule:
            if step + 1 <= e:
                context, y = c, yy
                break
        parts = [context]
        for u in units:
            t = u.uncond if negative else u.cond
            if not u.active(min(step, steps - 1), steps):
                t = torch.zeros_like(t)
            parts.append(t.to(context).expand(context.shape[0], -1, -1))
        out.append((end, torch.cat(parts, dim=1), y))
        prev = end
    return out


@dataclass
class IPRun:
    """The request's IP-Adapters, prepared: `extend` puts their tokens into the conditioning schedules."""

    units: list[UnitTokens]
    state: IPState | None = None

    @property
    def image_tokens(self) -> int:
        return sum(u.cond.shape[1] for u in self.units)

    def extend(self, cond, uncond, steps: int):
        """(cond, uncond) schedules from `text_conditioning` with the image tokens appended; `steps`: the
        sampler steps this pass runs (the step index the guidance sees)."""
        if not self.units:
            return cond, uncond
        if isinstance(cond, Composable):
            cond = Composable([extend_schedule(p, self.units, steps, False) for p in cond.parts], cond.terms)
        else:
            cond = extend_schedule(cond, self.units, steps, False)
        return cond, extend_schedule(uncond, self.units, steps, True)


def _faceid_lora(pipe, adapters: list[IPAdapter]):
    """Hook FaceID adapters' LoRA weights onto the UNet (weight 1); returns the patch or None."""
    with_lora = [a for a in adapters if a.lora]
    if not with_lora:
        return None
    loras = LoraSet()
    for a in with_lora:
        loras.add(faceid_lora(pipe.unet, a), 1.0, None)
    patch = apply(lora_models(pipe.unet, None), loras)
    for report in patch.reports:
        if not report.ok:
            log.warning("%s", report.summary())
    return patch


def faceid_lora(unet, adapter: IPAdapter) -> Lora:
    """The FaceID file's attention LoRA as a `Lora` over our UNet's module names: key N counts attn1 / attn2
    of the transformer blocks in diffusers' order (2k: attn1, 2k + 1: attn2 of block k); up @ down is
    added at scale 1 (no alpha), as the original LoRAIPAttnProcessor and diffusers' conversion do. Names
    are those the layers have now (PAG may have wrapped a self-attention: `...attn1.inner.to_q`)."""
    blocks = cross_attentions(unet)
    names = {id(m): n for n, m in unet.named_modules()}
    tensors = {}
    for key, v in adapter.lora.items():
        n_str, proj_lora, direction, _ = key.split(".")  # "N.to_q_lora.down.weight"
        n = int(n_str)
        if n // 2 >= len(blocks):
            continue
        attn = getattr(blocks[n // 2][0], f"attn{1 + n % 2}")
        attn = getattr(attn, "inner", attn)  # PAG's / IP's wrappers keep the projections on `inner`
        proj = proj_lora.removesuffix("_lora")
        layer = attn.to_out[0] if proj == "to_out" else getattr(attn, proj)
        tensors[f"unet.{names[id(layer)]}.lora.{direction}.weight"] = v
    return Lora.from_state_dict(tensors, {}, "FaceID LoRA")


@contextlib.contextmanager
def ip_adapters(pipe, req: GenerationRequest):
    """The request's IP-Adapters on the base UNet for the duration: yields an `IPRun` (no units: nothing is
    swapped) whose `extend` adds the image tokens to the schedules; the UNet is restored on exit."""
    if not req.ip_adapters:
        yield IPRun([])
        return
    adapters, units = [], []
    for i, unit in enumerate(req.ip_adapters):
        adapter, tokens = unit_tokens(pipe, unit, f"ip_adapters[{i}]")
        adapters.append(adapter)
        units.append(tokens)
    run = IPRun(units)
    files: IPAdapterFiles = pipe.ip_files
    lora = _faceid_lora(pipe, adapters)  # before the swap: the LoRA matches the UNet's own module names
    try:
        run.state = apply_ip_adapters(pipe.unet, adapters, [u.scale for u in units],
                                      [u.cond.shape[1] for u in units])
        files.image_tokens = run.image_tokens
        yield run
    finally:
        files.image_tokens = 0
        if run.state is not None:
            run.state.undo()
        if lora is not None:
            lora.remove()


__all__ = ["IPAdapterFiles", "IPRun", "extend_schedule", "ip_adapters", "text_context"]
