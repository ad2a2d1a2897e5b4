"""Generation: txt2img, img2img, inpainting and the refiner, all driven by one `GenerationRequest`.

    pipe = sdxl.load("sd_xl_base_1.0.safetensors", device="cuda", dtype=torch.float16)
    result = pipe.generate(GenerationRequest(prompt="a photo of a cat", seed=1))
    result.images[0].save("cat.png")

The stages, each a method you can call alone: `encode_prompt` (tokenise, run both text towers, concatenate),
`conditioning_vector` (pooled text + Fourier micro-conditioning = the UNet's `y`), `denoise` (a sampler over a
classifier-free-guided denoiser), `decode` (VAE, with an fp16 overflow fallback and tiling).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageFilter

from .assets import DEFAULT_NAME, default_model_path
from .control import request_control, resolve_control_model
from .data.images import load_image
from .errors import BadName, Interrupted, NameNotFound, NumericsError
from .files import resolve_in_folder
from .ip_conditioning import IPAdapterFiles, ip_adapters
from .metadata import lora_hash, request_infotext, short_hash
from .metadata.infotext import control_model_hash
from .models.conditioning import conditioning_numbers, micro_conditioning
from .models.config import ModelConfig
from .models.fast import speed_up
from .models.freeu import apply_freeu
from .models.pag import PerturbState, perturb_self_attention
from .models.text import CLIPTextTower, TextEncoders
from .models.unet import UNet
from .models.vae import AutoencoderKL
from .models.vae_utils import vae_decode, vae_encode
from .prompt_encoding import TextStack, encode_schedule, encode_text, encode_weighted
from .prompts import EmbeddingLibrary, compose_prompts, extract_loras
from .request import GenerationRequest, RequestError
from .sampling import samplers as S
from .sampling.denoiser import DiscreteSchedule, ModelDenoiser, quantizes_timesteps, schedule_for_config
from .sampling.guidance import Composable, guided_model, step_finder
from .sampling.schedules import get_sigmas
from .tokenizer import CLIPTokenizer
from .upscale import (
    is_latent,
    is_upscaler,
    resolve_model_upscaler,
    upscale_image,
    upscale_latents,
    upscale_with_model,
)
from .version import __version__
from .watermark import apply_watermark
from .weights.checkpoint import build_module, read_checkpoint, read_unet_override
from .weights.lora import LoraSet, apply, load_lora, lora_models

log = logging.getLogger(__name__)


@dataclass
class GenerationResult:
    images: list[Image.Image]
    latents: torch.Tensor
    seeds: list[int]
    request: GenerationRequest
    infos: list[str] = field(default_factory=list)  # A1111 "parameters" text per image


def _check_finite(t: torch.Tensor, what: str) -> None:
    if not torch.isfinite(t).all():
        raise NumericsError(f"non-finite values (NaN/Inf) in {what}")


def _check_conditioning(cond, uncond, model: str) -> None:
    """Every context and conditioning vector of both CFG branches (all prompt-editing ranges). The pooled
    text enters the UNet only through `y`: unchecked, NaN there would be blamed on the UNet at step 1."""
    for _, context, y in (cond.entries() if isinstance(cond, Composable) else list(cond)) + list(uncond):
        _check_finite(context, f"the {model} text encoders' output (the prompt context)")
        _check_finite(y, f"the {model} text encoders' pooled output (the UNet's conditioning vector y)")


# ------------------------------------------------------------------------------------------------- model
class SDXL:
    """A loaded SDXL-family model: UNet, VAE, text towers and tokenizers, on one device."""

    def __init__(
        self,
        config: ModelConfig,
        unet=None,
        vae=None,
        text=None,
        *,
        device="cpu",
        dtype=torch.float32,
        vae_dtype=None,
        path: str | Path | None = None,
    ):
        self.config = config
        self.unet = unet
        self.vae = vae
        self.text = text if text is not None else TextEncoders(None, None)
        self.device = torch.device(device)
        self.dtype = dtype
        self.vae_dtype = vae_dtype or dtype
        self.path = Path(path) if path is not None else None
        self.tok_l = CLIPTokenizer.clip_l() if config.text_l is not None else None
        self.tok_g = CLIPTokenizer.bigg() if config.text_g is not None else None
        self.schedule = schedule_for_config(config)  # discrete DDPM, or continuous EDM (Playground, CosXL)
        self.lora_dirs: list[Path] = []  # where LoRA names are looked up
        self.allow_lora_paths = True  # the server turns this off: names only, inside lora_dirs
        self.upscaler_dirs: list[Path] = []  # where model upscaler names (hires fix) are looked up
        self.embeddings = None  # an EmbeddingLibrary of textual inversions (`load_embeddings`)
        self.offload_storage: torch.device | None = None  # set by enable_cpu_offload
        self._hash: str | None = None
        self._lora_cache: dict[tuple[str, int], Any] = {}
        self._refiners: dict[str, SDXL] = {}  # refiners named by requests, loaded once
        self.control_dirs: list[Path] = []  # where control model (ControlNet) names are looked up
        self.ip_files = IPAdapterFiles()  # IP-Adapter folders, image encoder, loaded adapters

    # ---------------------------------------------------------------- loading
    @classmethod
    def load(
        cls,
        path: str | Path,
        device="cpu",
        dtype=torch.float32,
        vae_dtype=None,
        allow_pickle: bool = False,
        fast: bool = True,
        compile: bool = False,
        unet: str | Path | None = None,
    ) -> SDXL:
        """Load a checkpoint (official single file or diffusers folder) onto `device`.

        `unet`: a UNet-only file (SDXL-Lightning, Turbo, DMD2; official or diffusers key layout) that replaces
        the checkpoint's UNet, which must have the same architecture; the other parts come from `path`.

        fast=True (the default) applies the speed switches that change nothing but float rounding
        (`sdxl.models.fast.speed_up`: fused q/k/v projections, channels_last, oneDNN linears on a CPU, the
        best attention kernel); fast=False keeps the literal modules. compile=True also compiles the UNet
        with torch.compile, keeping Inductor's kernels in an on-disk cache so the next start skips compiling.
        """
        ck = read_checkpoint(path, allow_pickle=allow_pickle)
        cfg = ck.config
        name = str(path)
        unet_name = name
        if unet is not None:
            ck.parts["unet"] = read_unet_override(unet, cfg)
            unet_name = str(unet)
        unet = vae = tl = tg = None
        if "unet" in ck.parts:
            unet = build_module(UNet, cfg.unet, ck.parts["unet"], device, dtype, f"{unet_name} (UNet)")
        if "vae" in ck.parts:
            vae = build_module(
                AutoencoderKL, cfg.vae, ck.parts["vae"], device, vae_dtype or dtype, f"{name} (VAE)"
            )
        if "text_l" in ck.parts:
            tl = build_module(
                CLIPTextTower, cfg.text_l, ck.parts["text_l"], device, dtype, f"{name} (CLIP-L)"
            )
        if "text_g" in ck.parts:
            tg = build_module(CLIPTextTower, cfg.text_g, ck.parts["text_g"], device, dtype, f"{name} (bigG)")
        text = TextEncoders(tl, tg)
        switches = speed_up(unet, text, vae, exact=fast, compile=compile)
        log.debug("%s: speed switches %s", name, ", ".join(switches) or "none")
        pipe = cls(cfg, unet, vae, text, device=device, dtype=dtype, vae_dtype=vae_dtype, path=path)
        pipe.ip_files.allow_pickle = allow_pickle  # IP-Adapter .bin files follow the checkpoint's rule
        return pipe

    # ---------------------------------------------------------------- memory
    def enable_cpu_offload(self, storage: str = "cpu") -> SDXL:
        """Keep every component in `storage` memory and move only the running one to `self.device`
        (text towers, then the UNet for sampling, then the VAE). Peak GPU memory is the largest component."""
        self.offload_storage = torch.device(storage)
        for m in (self.unet, self.vae, self.text):
            if m is not None:
                m.to(self.offload_storage)
        return self

    @contextlib.contextmanager
    def on_device(self, module):
        """Run a block with `module` on the execution device (a no-op unless CPU offload is on)."""
        storage = self.offload_storage
        if storage is None or module is None:
            yield module
            return
        module.to(self.device)
        try:
            yield module
        finally:
            module.to(storage)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def model_hash(self) -> str | None:
        """A1111's short model hash (first 10 hex of the file's SHA-256), computed once."""
        if self._hash is None and self.path is not None and self.path.is_file():
            self._hash = short_hash(self.path)
        return self._hash

    def load_embeddings(self, folder: str | Path) -> list[str]:
        """Add every textual-inversion embedding (safetensors: `clip_l`, `clip_g`) in `folder`; prompts then
        use them by file stem, as in A1111. Returns the names added."""
        if self.embeddings is None:
            towers = (("clip_l", self.config.text_l), ("clip_g", self.config.text_g))
            widths = {key: cfg.width for key, cfg in towers if cfg is not None}
            self.embeddings = EmbeddingLibrary(widths=widths)
        return [e.name for e in self.embeddings.load_dir(folder)]

    @property
    def kind(self) -> str:
        return self.config.kind

    # ---------------------------------------------------------------- text
    def encode_prompt(
        self, prompt: str | list[str], prompt_2: str | list[str] | None = None, clip_skip: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Context [B, 77*k, C] (CLIP-L penultimate ‖ bigG penultimate) and pooled bigG [B, P]."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        prompts_2 = (
            prompts if prompt_2 is None else ([prompt_2] if isinstance(prompt_2, str) else list(prompt_2))
        )
        return encode_weighted(self.text_stack(), prompts, prompts_2, clip_skip)

    def text_stack(self) -> TextStack:
        return TextStack(self.text, self.tok_l, self.tok_g, self.embeddings)

    def zero_text(self, batch: int, length: int = 77) -> tuple[torch.Tensor, torch.Tensor]:
        ctx = torch.zeros(batch, length, self.config.unet.context_dim, device=self.device, dtype=self.dtype)
        pooled = torch.zeros(batch, self.config.text_g.projection_dim, device=self.device, dtype=self.dtype)
        return ctx, pooled

    def conditioning_vector(
        self,
        pooled: torch.Tensor,
        req: GenerationRequest,
        negative: bool = False,
        aesthetic: float | None = None,
    ) -> torch.Tensor:
        """y = [pooled | fourier(original h, w | crop top, left | target h, w)]; the refiner has the aesthetic
        score in place of the target size."""
        mc = req.micro_conditioning(negative)
        score = req.negative_aesthetic_score if negative else req.aesthetic_score
        nums = conditioning_numbers(self.kind, mc["original_size"], mc["crop_top_left"], mc["target_size"],
                                    score if aesthetic is None else aesthetic)
        numbers = torch.tensor([nums], dtype=torch.float32, device=self.device).expand(pooled.shape[0], -1)
        return micro_conditioning(pooled.float(), numbers, self.config.fourier_dim).to(self.dtype)

    def text_conditioning(self, req: GenerationRequest, batch: int, steps: int | None = None):
        """Conditioning schedules for the cond and uncond branches: lists of (end_step, context, y), one
        entry per range of steps (several only with A1111 prompt editing), tensors [batch, ...]. A prompt
        with AND (A1111's composable diffusion) gives a `Composable` cond: one schedule per distinct
        sub-prompt text, all padded to the same length as the uncond branch."""
        steps = steps or req.steps
        stack = self.text_stack()
        subprompts = compose_prompts(req.prompt, req.prompt_2)  # None: no AND
        parts, terms, index = [], [], {}
        for t1, t2, weight in subprompts or ():
            if (t1, t2) not in index:
                index[(t1, t2)] = len(parts)
                parts.append(encode_schedule(stack, t1, t2, steps, req.clip_skip, req.emphasis))
            terms.append((index[(t1, t2)], weight))
        if subprompts is None:
            parts = [encode_schedule(stack, req.prompt, req.prompt_2, steps, req.clip_skip, req.emphasis)]
        cond = parts[0]  # the prompt, or the base (first) sub-prompt
        if self.kind != "refiner" and not req.negative_prompt and not req.negative_prompt_2:
            # the official base behaviour: the unconditional branch is all zeros (text and pooled)
            uncond = [(steps, *self.zero_text(1, cond[0][1].shape[1]))]
        else:
            uncond = encode_schedule(
                stack, req.negative_prompt or "", req.negative_prompt_2, steps, req.clip_skip, req.emphasis
            )
        n = max(c.shape[1] for _, c, _ in [e for part in parts for e in part] + uncond)
        rep = lambda t: t.expand(batch, *t.shape[1:]) if t.shape[0] == 1 else t  # noqa: E731
        empty = None

        def pad(c):  # shorter contexts get empty-prompt chunks (zeros for the zero uncond), as A1111 does
            nonlocal empty
            if c.shape[1] == n:
                return c
            if not c.abs().any():
                return torch.cat([c, c.new_zeros(c.shape[0], n - c.shape[1], c.shape[2])], dim=1)
            if empty is None:
                empty = encode_text(stack, "", None, req.clip_skip, req.emphasis)[0][:, :77]
            return torch.cat([c, empty.repeat(c.shape[0], (n - c.shape[1]) // 77, 1)], dim=1)

        def finish(entries, negative):
            return [
                (end, rep(pad(c)), rep(self.conditioning_vector(p, req, negative=negative)))
                for end, c, p in entries
            ]

        if subprompts is None:
            return finish(cond, False), finish(uncond, True)
        return Composable([finish(part, False) for part in parts], terms), finish(uncond, True)

    # ---------------------------------------------------------------- images <-> latents
    @torch.no_grad()
    def decode(self, latents: torch.Tensor, tiled: bool | None = None) -> torch.Tensor:
        """Scaled latents -> images in [-1, 1] (float32). fp16 overflow falls back to float32."""
        return vae_decode(self, latents, tiled)

    @torch.no_grad()
    def encode(
        self,
        images: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None = None,
        sample: bool = False,
    ) -> torch.Tensor:
        """Images in [-1, 1] -> scaled latents: the posterior mean, or with `sample` a posterior sample drawn
        from `generator` (a list: one latent per generator, as diffusers' pipelines draw; see vae_encode)."""
        return vae_encode(self, images, generator, sample)

    # ---------------------------------------------------------------- denoising
    def make_denoiser(
        self,
        cond,
        uncond,
        req: GenerationRequest,
        sigmas: torch.Tensor,
        extra_channels: torch.Tensor | None = None,
        pag_state: PerturbState | None = None,
        control=None,
    ) -> ModelDenoiser:
        """A denoiser D(x, sigma) with classifier-free guidance (both branches in one batch), guidance
        rescale, CFG limited to a range of steps, and per-step conditioning (prompt editing).

        `cond`/`uncond` are schedules from `text_conditioning`; see `sampling.guidance`. Needs a resolved
        request. `pag_state`: the UNet's PAG layers swapped (`guidance_variants`); then the request's
        pag_scale applies. `control`: the request's `ControlFn` (`control.request_control`).
        """
        prediction = req.prediction or self.config.prediction
        den = ModelDenoiser(
            None, self.schedule_for(req), prediction=prediction, quantize=quantizes_timesteps(req.sampler)
        )
        n = max(len(sigmas) - 1, 1)
        den.model_fn = guided_model(
            self.unet,
            cond,
            uncond,
            scale=req.cfg,
            rescale=req.guidance_rescale,
            cfg_steps=(int(round(req.cfg_start * n)), int(round(req.cfg_end * n))),
            step_of=step_finder(den.timestep(sigmas[:-1].float().cpu()).tolist()),
            dtype=self.dtype,
            extra_channels=extra_channels,
            pag_scale=req.pag_scale if pag_state is not None else 0.0,
            pag_state=pag_state,
            region_masks=(self.region_masks(req) if isinstance(cond, Composable) and req.region_masks
                          else None),
            control=control,
        )
        return den

    def region_masks(self, req: GenerationRequest) -> torch.Tensor:
        """The request's region masks [n, 1, h, w] at latent size: each image grey-scaled (white = 1),
        resized to the image size (Lanczos), then averaged over each f x f block (f = the VAE's downscale)."""
        f = self.config.vae.downscale
        size = (req.height // f, req.width // f)
        masks = [_load_mask(m, req.width, req.height, 0) for m in req.region_masks]
        return torch.nn.functional.interpolate(torch.cat(masks), size=size, mode="area").to(self.device)

    def schedule_for(self, req: GenerationRequest) -> DiscreteSchedule:
        """The training schedule, rescaled to zero terminal SNR when the checkpoint or the request says so
        (an EDM model's continuous schedule as it is)."""
        if self.config.edm is not None:
            return self.schedule
        zsnr = self.config.zero_terminal_snr if req.zero_terminal_snr is None else req.zero_terminal_snr
        if zsnr == self.schedule.zero_terminal_snr:
            return self.schedule
        return DiscreteSchedule(zero_terminal_snr=zsnr)

    def sigmas_for(self, req: GenerationRequest, steps: int | None = None) -> torch.Tensor:
        return get_sigmas(req.schedule, steps or req.steps, self.schedule_for(req))

    # ---------------------------------------------------------------- the whole job
    @torch.no_grad()
    def generate(
        self, req: GenerationRequest, callback=None, refiner: SDXL | None = None
    ) -> GenerationResult:
        """Run a request. `callback(p)` gets a `Progress` after every step; returning "stop" interrupts
        (raising `Interrupted`, which carries the latents reached). `refiner`: a loaded refiner, used when
        the request names one or `refiner` is given. The result's request is the resolved one."""
        req = req.resolve(self.config)
        if refiner is None and req.refiner is not None:
            refiner = self.refiner_named(req.refiner)
        return run_generation(self, req, callback=callback, refiner=refiner)

    def refiner_named(self, name: str) -> SDXL:
        """A refiner a request names (a file, or "default" for the shipped one), loaded once per name on
        this model's device and dtypes."""
        if name not in self._refiners:
            self._refiners[name] = load(name, device=self.device, dtype=self.dtype, vae_dtype=self.vae_dtype,
                                        kind="refiner")
        return self._refiners[name]


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """[-1, 1] NCHW -> 8-bit RGB PIL images (round half to even, as diffusers' numpy path does)."""
    arr = ((images.float().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).cpu().numpy()
    arr = (arr * 255).round().astype(np.uint8)
    return [Image.fromarray(a) for a in arr]


def from_pil(image: Image.Image | str | Path, width: int, height: int) -> torch.Tensor:
    """A PIL image (or path) -> [1, 3, H, W] in [-1, 1], resized to (width, height) if needed."""
    if not isinstance(image, Image.Image):
        image = load_image(image)
    image = image.convert("RGB")
    if image.size != (width, height):
        image = image.resize((width, height), Image.LANCZOS)
    arr = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1)[None]


def load(
    path: str | Path,
    device: str = "cpu",
    dtype=torch.float32,
    *,
    kind: str = "base",
    fast: bool = True,
    compile: bool = False,
    **kw: Any,
) -> SDXL:
    """Load an SDXL-family checkpoint (official single file or diffusers folder). "default" is the
    miniature model shipped in the package (`kind`: "base" or "refiner"). `fast` (exact speed switches, on
    by default) and `compile` (torch.compile with an on-disk cache) as in `SDXL.load`."""
    if str(path) == DEFAULT_NAME:
        path = default_model_path(kind)
    return SDXL.load(path, device=device, dtype=dtype, fast=fast, compile=compile, **kw)


__all__ = ["SDXL", "GenerationResult", "Interrupted", "NumericsError", "RequestError", "load", "to_pil"]


# ------------------------------------------------------------------------------------------------- running
@dataclass
class Progress:
    """What a progress callback receives after each sampler step."""

    stage: str  # "base", "refiner", "hires"
    step: int  # 1-based within the stage
    total: int
    sigma: float
    denoised: torch.Tensor  # current x0 estimate (scaled latents), for previews


def _randn(gens: list[torch.Generator], shape: tuple[int, ...], device) -> torch.Tensor:
    """Unit noise [len(gens), *shape]: row i drawn from gens[i] (CPU, float32), as diffusers' `randn_tensor`
    does with a list of generators, so image i of a batch equals the same seed generated alone."""
    return torch.cat([torch.randn((1, *shape), generator=g, dtype=torch.float32) for g in gens]).to(device)


def _noise(seeds: list[int], shape: tuple[int, ...], device) -> torch.Tensor:
    """Unit noise from fresh generators, one CPU float32 generator per seed."""
    return _randn([torch.Generator("cpu").manual_seed(s) for s in seeds], shape, device)


def _load_mask(mask, width: int, height: int, blur: int) -> torch.Tensor:
    """White = repaint. Returns [1, 1, H, W] in [0, 1]: grey levels, resized (Lanczos, as diffusers'
    VaeImageProcessor) and Gaussian-blurred by `blur` pixels (A1111's mask blur). This soft mask is the one
    the final paste uses; the latents see it thresholded at 0.5 (`_latent_mask`)."""
    if not isinstance(mask, Image.Image):
        mask = load_image(mask)
    m = mask.convert("L")
    if m.size != (width, height):
        m = m.resize((width, height), Image.LANCZOS)
    if blur > 0:
        m = m.filter(ImageFilter.GaussianBlur(blur))
    return torch.from_numpy(np.asarray(m, dtype=np.float32) / 255.0)[None, None]


def _latent_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The pixel mask thresholded at 0.5 and sampled at latent resolution (nearest: the top-left pixel of
    each 8x8 block), as diffusers' inpainting pipelines prepare it; A1111 also rounds its latent mask."""
    hard = (mask >= 0.5).float()
    return torch.nn.functional.interpolate(hard, size=size, mode="nearest")


@dataclass
class StartLatents:
    """What sampling starts from (`prepare_latents`)."""

    x: torch.Tensor  # the sampler's input at sigmas[0], [B, C, h, w]
    noise: torch.Tensor  # the unit noise in x, [B, C, h, w]
    sigmas: torch.Tensor  # the schedule, cut to the strength for img2img / inpaint
    generator: torch.Generator  # goes on to the sampler's stochastic steps
    init: torch.Tensor | None = None  # the init image's latents (one posterior sample per seed)
    pixels: torch.Tensor | None = None  # the init image in [-1, 1], [1, 3, H, W]
    mask: torch.Tensor | None = None  # soft pixel mask [1, 1, H, W] (white = repaint), for the final paste
    lat_mask: torch.Tensor | None = None  # binary latent mask [B, 1, h, w], for a 4-channel UNet's blend
    extra: torch.Tensor | None = None  # an inpainting UNet's extra channels [B, 1 + C, h, w]


def prepare_latents(
    pipe: SDXL, req: GenerationRequest, seeds: list[int], lat_shape: tuple[int, ...], sigmas: torch.Tensor
) -> StartLatents:
    """The starting latents, drawn as diffusers' SDXL pipelines draw them with one CPU generator per seed
    (`generator=[torch.Generator("cpu").manual_seed(s) for s in seeds]`). Each seed's generator draws, in
    this order:

    1. img2img and inpainting: the init image's latents, a sample mean + std * eps of the VAE posterior
       (skipped by an inpainting UNet at strength 1, which starts from pure noise);
    2. the unit noise;
    3. inpainting: the masked image's posterior sample. Only a 9-channel inpainting UNet uses it, but it is
       drawn for every model, as diffusers does, so that the generator's stream stays the same;

    and then the first seed's generator goes on to drive the sampler's stochastic steps (for one image, as
    diffusers' scheduler.step(..., generator) continues the same stream).

    x = noise * sqrt(1 + sigma_0^2) for txt2img and for inpainting at strength 1 (diffusers'
    `is_strength_max`), otherwise init + noise * sigma_0, sigma_0 the first sigma of the last
    int(steps * strength) steps. An inpainting UNet without a mask repaints everything (mask 1, masked image
    0, as A1111 does)."""
    gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    B, dev, size = len(seeds), pipe.device, tuple(lat_shape[1:])
    nine = pipe.config.unet.in_channels == 9
    start = StartLatents(x=None, noise=None, sigmas=sigmas, generator=gens[0])
    pixels = None
    if req.init_image is not None:
        pixels = start.pixels = from_pil(req.init_image, req.width, req.height).to(dev)
        start.sigmas = S.img2img_sigmas(sigmas, req.strength)
    masked = req.mask_image is not None or nine
    if req.mask_image is not None:
        start.mask = _load_mask(req.mask_image, req.width, req.height, req.mask_blur).to(dev)
        start.lat_mask = _latent_mask(start.mask, size).expand(B, -1, -1, -1)
    pure_noise = pixels is None or (masked and req.strength >= 1.0)
    if pixels is not None and not (nine and pure_noise):
        with pipe.on_device(pipe.vae):
            start.init = pipe.encode(pixels, generator=gens, sample=True)
        _check_finite(start.init, "the VAE encoder output (the init image's latents)")
    start.noise = _randn(gens, lat_shape, dev)
    sigma0 = start.sigmas[0]
    start.x = start.noise * torch.sqrt(1 + sigma0**2) if pure_noise else start.init + start.noise * sigma0
    if masked:
        if start.mask is None:  # an inpainting UNet without a mask: repaint everything
            hard = torch.ones(1, 1, lat_shape[1] * pipe.config.vae.downscale,
                              lat_shape[2] * pipe.config.vae.downscale, device=dev)
            lat_hard = torch.ones(1, 1, *size, device=dev)
        else:
            hard = (start.mask >= 0.5).float()
            lat_hard = start.lat_mask[:1]
        base = pixels if pixels is not None else torch.zeros_like(hard).expand(-1, 3, -1, -1)
        with pipe.on_device(pipe.vae):
            masked_lat = pipe.encode(base * (1 - hard), generator=gens, sample=True)
        _check_finite(masked_lat, "the VAE encoder output (the masked image's latents)")
        if nine:  # inpainting UNet: [latents | mask | masked-image latents]
            start.extra = torch.cat([lat_hard.expand(B, -1, -1, -1), masked_lat], dim=1)
    return start


def _run_sampler(pipe: SDXL, denoiser, x, sigmas, req: GenerationRequest, generator, stage: str, callback):
    total = len(sigmas) - 1
    sampler = S.SAMPLERS[req.sampler]

    def cb(i, sigma, x_i, denoised):
        if not torch.isfinite(denoised).all():
            raise NumericsError(
                f"non-finite values (NaN/Inf) in the {stage} UNet output at step {i + 1}/{total}"
            )
        if callback is not None:
            r = callback(Progress(stage, i + 1, total, float(sigma), denoised))
            if r == "stop":
                return "stop"
        return None

    try:
        opts = {} if req.eta is None else {"eta": req.eta}
        if S.SAMPLER_INFO[req.sampler].uses_schedule:  # TCD: this checkpoint's noise table (zero-SNR or not)
            opts["schedule"] = pipe.schedule_for(req)
        return sampler(denoiser, x, sigmas, generator=generator, callback=cb, **opts)
    except Interrupted as e:
        raise Interrupted(
            f"interrupted during {stage} sampling", step=e.step, x=e.x, denoised=e.denoised
        ) from None


def resolve_lora(name: str, dirs: list[Path], allow_paths: bool = True) -> Path:
    """A LoRA name -> file, inside one of `dirs` (`files.resolve_in_folder`: no absolute paths, no `..`,
    no symlinks out). `allow_paths` (CLI, Python API) also accepts an existing file path; the server turns
    it off, except for a path it resolved inside its own folder."""
    p = Path(name).expanduser()
    if allow_paths and p.is_file():
        return p
    roots = [Path(d).resolve() for d in dirs]
    if p.is_absolute() and p.is_file() and any(p.resolve().is_relative_to(r) for r in roots):
        return p.resolve()  # already resolved inside an allowed folder (the server does this)
    for d in dirs:
        try:
            return resolve_in_folder(Path(d), name, "LoRA", (".safetensors",), files_only=True)
        except NameNotFound:
            continue
        except BadName as e:
            raise RequestError(str(e)) from None
    raise RequestError(f"LoRA {name!r}: not found" + (f" in {', '.join(map(str, dirs))}" if dirs else ""))


def _apply_loras(pipe: SDXL, req: GenerationRequest, inline: list):
    """Hook the request's LoRAs (and the prompt's `<lora:name:w>` tags) onto the models; returns the patch."""
    specs = [(x.name, x.weight, None) for x in req.loras]
    specs += [(x.name, x.weight, None) for x in inline]
    if not specs:
        return None
    cache = pipe._lora_cache
    loras = LoraSet()
    for name, weight, text_weight in specs:
        path = resolve_lora(name, pipe.lora_dirs, pipe.allow_lora_paths)
        key = (str(path), path.stat().st_mtime_ns)
        if key not in cache:
            cache[key] = load_lora(path)
        loras.add(cache[key], weight, text_weight)
    patch = apply(lora_models(pipe.unet, pipe.text), loras)
    for report in patch.reports:
        if not report.ok:
            log.warning("%s", report.summary())
    return patch


def run_generation(pipe: SDXL, req: GenerationRequest, callback=None, refiner: SDXL | None = None):
    """Run a resolved request (`req.resolve(pipe.config)`), with its LoRAs hooked on for the duration."""
    _, inline = extract_loras(req.prompt)
    patch = _apply_loras(pipe, req, inline)
    try:
        return _run_generation(pipe, req, callback, refiner)
    finally:
        if patch is not None:
            patch.remove()


def refiner_request(req: GenerationRequest, refiner: SDXL) -> GenerationRequest:
    """`req` (resolved against the base) as the refiner runs it: with the refiner checkpoint's own prediction
    type and noise table. The hand-off is by sigma, the noise level both tables share."""
    cfg = refiner.config
    return replace(req, prediction=cfg.prediction, zero_terminal_snr=cfg.zero_terminal_snr)


def _run_generation(pipe: SDXL, req: GenerationRequest, callback=None, refiner: SDXL | None = None):
    if pipe.unet is None or pipe.vae is None:
        raise RequestError(f"model {pipe.path}: needs a UNet and a VAE to generate (this file lacks one)")
    seed = req.seed
    B = req.batch
    seeds = [seed + i for i in range(B)]
    f = pipe.config.vae.downscale
    if req.width % f or req.height % f:
        raise RequestError(f"size: width and height must be multiples of {f}")
    lat_shape = (pipe.config.vae.embed_dim, req.height // f, req.width // f)
    if req.hires and not is_upscaler(req.hires_upscaler):  # a model upscaler's file: found before any work
        resolve_model_upscaler(req.hires_upscaler, pipe.upscaler_dirs, pipe.allow_lora_paths)
    with pipe.on_device(pipe.text):
        cond, uncond = pipe.text_conditioning(req, B)
    _check_conditioning(cond, uncond, "base")
    start = prepare_latents(pipe, req, seeds, lat_shape, pipe.sigmas_for(req).to(pipe.device))
    x, noise, sigmas, generator = start.x, start.noise, start.sigmas, start.generator
    init, mask, lat_mask, extra = start.init, start.mask, start.lat_mask, start.extra
    init_pixels = start.pixels

    base_sigmas, ref_sigmas = sigmas, None
    if refiner is not None and req.refiner_mode == "ensemble":
        base_sigmas, ref_sigmas = S.split_sigmas(sigmas, req.refiner_switch, pipe.schedule_for(req))

    # FreeU, PAG and IP-Adapters: the base model only
    # control units: the base model, step fractions of the whole schedule (the base's share with a refiner)
    with guidance_variants(pipe.unet, req) as pag_state, ip_adapters(pipe, req) as ip, \
            request_control(pipe, req, req.width, req.height, len(sigmas) - 1) as control:
        cond, uncond = ip.extend(cond, uncond, len(sigmas) - 1)  # fractions of the whole schedule
        denoiser = pipe.make_denoiser(cond, uncond, req, base_sigmas, extra_channels=extra,
                                      pag_state=pag_state, control=control)
        if mask is not None and extra is None and init is not None:
            denoiser = _masked(denoiser, init, noise, lat_mask, first_sigma=float(base_sigmas[0]))
        with pipe.on_device(pipe.unet):
            x = _run_sampler(pipe, denoiser, x, base_sigmas, req, generator, "base", callback)

    if refiner is not None:
        rreq = refiner_request(req, refiner)
        with refiner.on_device(refiner.text):
            rcond, runcond = refiner.text_conditioning(rreq, B)
        _check_conditioning(rcond, runcond, "refiner")
        if ref_sigmas is None:  # SDEdit: re-noise the finished latents and denoise the tail
            ref_sigmas = S.img2img_sigmas(
                refiner.sigmas_for(rreq, req.refiner_steps).to(pipe.device), req.refiner_strength
            )
            x = x + _noise([s + 1 for s in seeds], lat_shape, pipe.device) * ref_sigmas[0]
        rden = refiner.make_denoiser(rcond, runcond, rreq, ref_sigmas)
        if mask is not None and extra is None and init is not None:
            rden = _masked(rden, init, noise, lat_mask)
        with refiner.on_device(refiner.unet):
            x = x.to(refiner.device)
            x = _run_sampler(refiner, rden, x, ref_sigmas, rreq, generator, "refiner", callback)

    if req.hires:
        x = hires_pass(pipe, req, x, seeds, callback)

    _check_finite(x, "the final latents")
    with pipe.on_device(pipe.vae):
        images = pipe.decode(x, tiled=req.vae_tiling)
    if mask is not None and init_pixels is not None:  # keep the untouched pixels exactly
        m = mask.to(images)
        images = images * m + init_pixels.to(images) * (1 - m)
    pil = to_pil(images)
    if req.watermark:
        pil = [apply_watermark(im) for im in pil]
    result = GenerationResult(images=pil, latents=x, seeds=seeds, request=req)
    result.infos = [a1111_parameters(pipe, req, s, refiner) for s in seeds]
    return result


def hires_request(req: GenerationRequest) -> GenerationRequest:
    """The hires fix's second pass as a request of its own: img2img at the upscaled size, with the hires
    steps (0: the first pass's), strength, sampler, schedule and prompts (None: the first pass's)."""
    _, _, width, height = req.hires_size()
    return replace(
        req,
        width=width,
        height=height,
        steps=req.hires_steps or req.steps,
        strength=req.hires_strength,
        sampler=req.hires_sampler or req.sampler,
        schedule=req.hires_schedule or req.schedule,
        prompt=req.prompt if req.hires_prompt is None else req.hires_prompt,
        negative_prompt=(req.negative_prompt if req.hires_negative_prompt is None
                         else req.hires_negative_prompt),
        hires_scale=0.0, hires_width=0, hires_height=0,
    )


def hires_latents(pipe: SDXL, req: GenerationRequest, x: torch.Tensor, gens: list[torch.Generator]):
    """The first pass's latents `x` upscaled for the second pass, as A1111's hires fix: a latent mode
    interpolates the latents to the upscaled size; a pixel upscaler decodes, upscales the image, resizes it
    to the upscaled size (Lanczos) where the upscaler's own factor missed it, and encodes it again (a
    posterior sample from `gens`, as img2img). A model upscaler (a file in `pipe.upscaler_dirs`, or a path
    where paths are allowed) runs like a pixel one. Then the excess over the target box is cropped,
    centred."""
    up_w, up_h, width, height = req.hires_size()
    f = pipe.config.vae.downscale
    model_file = None
    if not is_upscaler(req.hires_upscaler):  # found before the first pass's images are decoded
        model_file = resolve_model_upscaler(req.hires_upscaler, pipe.upscaler_dirs, pipe.allow_lora_paths)
    if is_latent(req.hires_upscaler):
        up = upscale_latents(x.float(), req.hires_upscaler, (up_h // f, up_w // f)).to(x.dtype)
    else:
        with pipe.on_device(pipe.vae):
            images = pipe.decode(x, tiled=req.vae_tiling)
        _check_finite(images, "the first pass's images")
        size = (up_w // f * f, up_h // f * f)
        pixels = []
        for im in to_pil(images):
            if model_file is None:
                big = upscale_image(im, req.hires_upscaler, up_w / req.width)
            else:
                try:
                    big = upscale_with_model(im, model_file, up_w / req.width, pipe.device, pipe.dtype)
                except ValueError as e:  # CheckpointError (not an upscaler, spandrel missing): one line
                    raise RequestError(f"hires_upscaler: {model_file.name}: {e}") from None
            pixels.append(from_pil(big, *size))  # Lanczos to the exact size where needed
        with pipe.on_device(pipe.vae):
            up = pipe.encode(torch.cat(pixels).to(pipe.device), generator=gens, sample=True)
        _check_finite(up, "the VAE encoder output (the upscaled image's latents)")
    th, tw = up.shape[2] - height // f, up.shape[3] - width // f
    return up[:, :, th // 2 : th // 2 + height // f, tw // 2 : tw // 2 + width // f]


def hires_sigmas(pipe: SDXL, hreq: GenerationRequest) -> torch.Tensor:
    """The second pass's schedule, as A1111 runs a hires pass (img2img with its steps given): exactly
    `hreq.steps` steps, the last ones of a schedule of int(steps / min(strength, 0.999)) steps."""
    n = hreq.steps
    return pipe.sigmas_for(hreq, int(n / min(hreq.strength, 0.999)))[-(n + 1):].to(pipe.device)


def hires_pass(pipe: SDXL, req: GenerationRequest, x: torch.Tensor, seeds: list[int], callback=None):
    """The hires fix's second pass on the first pass's latents `x`: upscale (`hires_latents`), then img2img
    at the upscaled size (`hires_request`) with the base model. Each seed's CPU generator draws, in order,
    the upscaled image's posterior sample (pixel upscalers only), then the unit noise; the first seed's
    generator goes on to the sampler, as in `prepare_latents`. x = upscaled + noise * sigma_0, sigma_0 the
    first of `hires_sigmas`. Progress reports as the stage "hires"."""
    hreq = hires_request(req)
    gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    init = hires_latents(pipe, req, x, gens)
    with pipe.on_device(pipe.text):
        cond, uncond = pipe.text_conditioning(hreq, len(seeds))
    _check_conditioning(cond, uncond, "base")
    sigmas = hires_sigmas(pipe, hreq)
    noise = _randn(gens, tuple(init.shape[1:]), pipe.device)
    x = init.to(noise) + noise * sigmas[0]
    with guidance_variants(pipe.unet, hreq) as pag_state, ip_adapters(pipe, hreq) as ip, \
            request_control(pipe, hreq, hreq.width, hreq.height, len(sigmas) - 1, hires=True) as control:
        cond, uncond = ip.extend(cond, uncond, len(sigmas) - 1)
        denoiser = pipe.make_denoiser(cond, uncond, hreq, sigmas, pag_state=pag_state, control=control)
        with pipe.on_device(pipe.unet):
            return _run_sampler(pipe, denoiser, x, sigmas, hreq, gens[0], "hires", callback)


@contextlib.contextmanager
def guidance_variants(unet: UNet, req: GenerationRequest):
    """FreeU hooked onto `unet` when the request asks for it, and the request's PAG layers swapped when its
    pag_scale > 0 (yields their `PerturbState`, else None); both removed on exit, whatever happens."""
    freeu = apply_freeu(unet, req.freeu_b1, req.freeu_b2, req.freeu_s1, req.freeu_s2) if req.freeu else None
    pag = None
    try:
        if req.pag_scale > 0:
            try:
                pag = perturb_self_attention(unet, req.pag_layers)
            except ValueError as e:
                raise RequestError(f"pag_layers: {e}") from None
        yield pag
    finally:
        if pag is not None:
            pag.undo()
        if freeu is not None:
            freeu.remove()


def _masked(denoiser, init: torch.Tensor, noise: torch.Tensor, mask: torch.Tensor, first_sigma=None):
    """Inpainting with an ordinary UNet, as diffusers' StableDiffusionXLInpaintPipeline does it: outside the
    binary latent `mask` the latents follow the original image's noising path, init + noise * sigma.

    diffusers blends after every step, `(1 - mask) * add_noise(init, noise, sigma_next) + mask * latents`.
    Here each UNet call sees x with the outside replaced by init + noise * sigma (what that blend left there),
    except at `first_sigma`, where diffusers has not blended yet (x is then init + noise * sigma anyway,
    unless inpainting at strength 1 started from pure noise). The x0 estimate outside is replaced by init,
    so a first-order or multistep sampler steps exactly onto init + noise * sigma_next there and ends on
    init, and previews show the original outside the mask."""

    def d(x, sigma, **kw):
        s = sigma.reshape(-1, 1, 1, 1) if torch.is_tensor(sigma) else sigma
        if first_sigma is None or float(torch.as_tensor(sigma).max()) < first_sigma * (1 - 1e-6):
            x = x * mask + (init + noise * s) * (1 - mask)
        return denoiser(x, sigma, **kw) * mask + init * (1 - mask)

    return d


def a1111_parameters(pipe: SDXL, req: GenerationRequest, seed: int, refiner: SDXL | None = None) -> str:
    """The A1111 `parameters` text for one image: `metadata.request_infotext` with the files' names and
    hashes."""
    model_hash = pipe.model_hash()
    lora_hashes = {}
    for x in req.loras:
        try:
            path = resolve_lora(x.name, pipe.lora_dirs, pipe.allow_lora_paths)
            lora_hashes[Path(x.name).stem] = lora_hash(path)
        except (RequestError, OSError):
            pass
    used_refiner = refiner is not None and refiner.path is not None
    control_hashes = {}  # control units named by a name in the control models folder: their files' hashes
    for u in req.controls:
        try:
            path = resolve_control_model(u.model, pipe.control_dirs, pipe.allow_lora_paths)
        except RequestError:
            continue
        digest = control_model_hash(path)
        if digest:
            control_hashes[u.model] = digest
    return request_infotext(
        req,
        seed=seed,
        model=pipe.path.stem if model_hash else None,
        model_hash=model_hash,
        refiner=refiner.path.stem if used_refiner else None,
        refiner_hash=refiner.model_hash() if used_refiner else None,
        lora_hashes=lora_hashes,
        version=f"sdxl {__version__}",
        control_hashes=control_hashes,
    )
