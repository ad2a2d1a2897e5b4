"""The `sdxl` command.

    sdxl generate "a red circle above a blue square"          # the shipped miniature model
    sdxl generate "a cat" --model sd_xl_base_1.0.safetensors --steps 30 --seed 1 --out cat.png
    sdxl inspect sd_xl_base_1.0.safetensors
    sdxl convert sd_xl_base_1.0.safetensors out_dir --to diffusers --dtype fp16
    sdxl info image.png

Every error a user can cause ends in one line on stderr and a non-zero exit code, never a traceback.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

from .assets import default_model_path

app = typer.Typer(
    help="Stable Diffusion XL: generate images, inspect and convert checkpoints, train, serve.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Datasets: generate the procedural shapes dataset.", no_args_is_help=True)
eval_app = typer.Typer(help="Evaluate models.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(eval_app, name="eval")

DTYPES = {
    "fp32": "float32",
    "float32": "float32",
    "fp16": "float16",
    "float16": "float16",
    "half": "float16",
    "bf16": "bfloat16",
    "bfloat16": "bfloat16",
}


def fail(msg: str, code: int = 2) -> None:
    """Print `error: <first line of msg>` on stderr and exit. Only the first line: some messages carry
    context below it (a PromptError points at the character with a caret), and the first line already
    says what and where."""
    lines = str(msg).strip().splitlines() or ["unknown error"]
    typer.echo(f"error: {lines[0]}", err=True)
    raise typer.Exit(code)


def _dtype(name: str):
    import torch

    if name not in DTYPES:
        fail(f"--dtype {name!r}: choose one of fp32, fp16, bf16")
    return getattr(torch, DTYPES[name])


def _size(text: str | None, flag: str) -> tuple[int | None, int | None]:
    if not text:
        return None, None
    try:
        w, h = text.lower().split("x")
        return int(w), int(h)
    except ValueError:
        fail(f"{flag} {text!r}: expected WIDTHxHEIGHT, e.g. 1024x1024")
    return None, None


def config_path() -> Path:
    """The user's defaults file: $SDXL_CONFIG, else $XDG_CONFIG_HOME/sdxl/config.toml
    (~/.config/sdxl/config.toml)."""
    import os

    if os.environ.get("SDXL_CONFIG"):
        return Path(os.environ["SDXL_CONFIG"])
    root = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return root / "sdxl" / "config.toml"


def user_defaults() -> dict:
    """The [generate] table of the user's config file: any request field, plus model and models_dir.

    [generate]
    model = "sd_xl_base_1.0"
    models_dir = "~/models"
    steps = 30
    sampler = "DPM++ 2M Karras"
    """
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib

    p = config_path()
    if not p.is_file():
        return {}
    try:
        data = tomllib.loads(p.read_text())
    except (OSError, ValueError) as e:
        fail(f"{p}: unreadable config file ({e})")
    gen = data.get("generate", {})
    if not isinstance(gen, dict):
        fail(f"{p}: [generate] must be a table")
    return gen


def resolve_model(name: str | None, models_dir: Path | None, kind: str = "base") -> Path:
    """A model name: a path, a name (with or without .safetensors) in --models-dir, or 'default'."""
    if name is None or name == "default":
        p = default_model_path(kind)
        if not p.exists():
            fail(f"no --model given and the shipped default {kind} model is missing ({p})")
        return p
    p = Path(name).expanduser()
    if p.exists():
        return p
    for d in [models_dir] if models_dir else []:
        for cand in (d / name, d / f"{name}.safetensors"):
            if cand.exists():
                return cand
    fail(
        f"model {name!r}: no such file or folder" + (f" (also looked in {models_dir})" if models_dir else "")
    )
    raise AssertionError


def _device(device: str | None) -> str:
    import torch

    if device:
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


@app.command()
def generate(
    prompt: str | None = typer.Argument(None, help="What to draw (A1111 prompt syntax)."),
    negative_prompt: str | None = typer.Option(None, "--negative-prompt", "-N", help="What to avoid."),
    prompt_2: str | None = typer.Option(None, help="Separate prompt for the bigG encoder."),
    negative_prompt_2: str | None = typer.Option(None, help="Separate negative prompt for bigG."),
    model: str | None = typer.Option(
        None, "--model", "-m", help="Checkpoint file/folder or name; default: shipped."
    ),
    models_dir: Path | None = typer.Option(None, help="Folder searched for model names."),
    width: int = typer.Option(None, "--width", "-W", help="Image width in pixels (multiple of 8)."),
    height: int = typer.Option(None, "--height", "-H", help="Image height in pixels (multiple of 8)."),
    steps: int = typer.Option(None, help="Sampler steps."),
    cfg: float = typer.Option(None, help="Classifier-free guidance scale."),
    seed: int | None = typer.Option(None, help="Seed (random if omitted; printed and saved)."),
    sampler: str = typer.Option(None, help="euler, euler_a, dpmpp_2m, ... or an A1111/ComfyUI name."),
    schedule: str = typer.Option(None, help="normal, leading, trailing, karras, exponential, ..."),
    batch: int | None = typer.Option(None, help="Images per batch (image i uses seed+i)."),
    n: int = typer.Option(1, "--n", help="Number of batches to run one after another."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Output PNG (numbered if several) or folder."),
    init_image: Path | None = typer.Option(None, help="img2img: start from this image."),
    strength: float = typer.Option(None, help="img2img/inpaint: how much to change (0..1)."),
    mask: Path | None = typer.Option(None, help="inpaint: mask image, white = repaint."),
    original_size: str | None = typer.Option(None, help="Micro-conditioning original size WxH."),
    target_size: str | None = typer.Option(None, help="Micro-conditioning target size WxH."),
    crop_top: int | None = typer.Option(None, help="Micro-conditioning crop top (pixels)."),
    crop_left: int | None = typer.Option(None, help="Micro-conditioning crop left (pixels)."),
    negative_original_size: str | None = typer.Option(None, help="Negative-branch original size WxH."),
    negative_target_size: str | None = typer.Option(None, help="Negative-branch target size WxH."),
    guidance_rescale: float | None = typer.Option(None, help="CFG rescale phi (0..1)."),
    cfg_start: float | None = typer.Option(None, help="Apply CFG from this fraction of the steps."),
    cfg_end: float | None = typer.Option(None, help="Apply CFG until this fraction of the steps."),
    clip_skip: int | None = typer.Option(None, help="1 = SDXL's penultimate layer; 2 = one earlier."),
    refiner: str | None = typer.Option(None, help="Refiner checkpoint ('default' = shipped refiner)."),
    refiner_mode: str | None = typer.Option(None, help="ensemble (finish the schedule) or sdedit."),
    refiner_switch: float | None = typer.Option(
        None, help="ensemble: fraction of the schedule the base runs."
    ),
    refiner_strength: float | None = typer.Option(None, help="sdedit: fraction re-noised."),
    aesthetic_score: float | None = typer.Option(None, help="Refiner aesthetic score."),
    negative_aesthetic_score: float | None = typer.Option(None, help="Refiner negative aesthetic score."),
    lora: list[str] = typer.Option(
        [], "--lora", help="LoRA file/name with weight, e.g. style.safetensors:0.8"
    ),
    eta: float | None = typer.Option(None, help="Noise multiplier for ancestral/SDE samplers."),
    prediction: str | None = typer.Option(None, help="Force eps or v prediction."),
    zsnr: bool | None = typer.Option(
        None, "--zsnr/--no-zsnr", help="Force the zero-terminal-SNR schedule on or off (default: the file's)."
    ),
    from_image: Path | None = typer.Option(None, "--from", help="Repeat the request stored in this PNG."),
    dtype: str = typer.Option("fp32", help="fp32, fp16 or bf16 for the UNet and text encoders."),
    vae_dtype: str | None = typer.Option(None, help="VAE dtype (default: same as --dtype)."),
    device: str | None = typer.Option(None, help="cpu, cuda, cuda:1, mps (default: cuda if available)."),
    vae_tiling: bool | None = typer.Option(None, "--vae-tiling/--no-vae-tiling", help="Tiled VAE decode."),
    save_latents: Path | None = typer.Option(None, help="Also write the final latents (safetensors)."),
    allow_pickle: bool = typer.Option(False, help="Allow .ckpt pickle files (weights-only loading)."),
    watermark: bool | None = typer.Option(
        None, "--watermark/--no-watermark", help="Add the official invisible watermark."
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
):
    """Generate images from a text prompt (txt2img; img2img with --init-image; inpaint with --mask)."""
    from .request import GenerationRequest, LoraSpec, RequestError

    base: dict = {}
    if from_image is not None:
        from .metadata import read_info

        try:
            info = read_info(from_image)
        except (OSError, ValueError) as e:
            fail(f"--from {from_image}: {e}")
        record = info.get("raw", {}).get("sdxl")
        if not record:
            fail(f"--from {from_image}: the image carries no sdxl request record")
        base = json.loads(record) if isinstance(record, str) else dict(record)
        base = base.get("request", base)
    if prompt is None and "prompt" not in base:
        fail("a prompt is required (or --from IMAGE)")
    ow, oh = _size(original_size, "--original-size")
    tw, th = _size(target_size, "--target-size")
    now, noh = _size(negative_original_size, "--negative-original-size")
    ntw, nth = _size(negative_target_size, "--negative-target-size")
    loras = []
    for spec in lora:
        name, _, w = spec.rpartition(":") if ":" in spec else (spec, "", "1")
        try:
            loras.append(LoraSpec(name or spec, float(w)))
        except ValueError:
            fail(f"--lora {spec!r}: expected NAME or NAME:WEIGHT")
    overrides = dict(
        prompt=prompt,
        negative_prompt=negative_prompt,
        prompt_2=prompt_2,
        negative_prompt_2=negative_prompt_2,
        width=width,
        height=height,
        steps=steps,
        cfg=cfg,
        seed=seed,
        sampler=sampler,
        schedule=schedule,
        strength=strength,
        init_image=str(init_image) if init_image else None,
        mask_image=str(mask) if mask else None,
        batch=batch,
        original_width=ow,
        original_height=oh,
        target_width=tw,
        target_height=th,
        crop_top=crop_top,
        crop_left=crop_left,
        negative_original_width=now,
        negative_original_height=noh,
        negative_target_width=ntw,
        negative_target_height=nth,
        guidance_rescale=guidance_rescale,
        cfg_start=cfg_start,
        cfg_end=cfg_end,
        clip_skip=clip_skip,
        refiner_mode=refiner_mode,
        refiner_switch=refiner_switch,
        refiner_strength=refiner_strength,
        aesthetic_score=aesthetic_score,
        negative_aesthetic_score=negative_aesthetic_score,
        eta=eta,
        prediction=prediction,
        zero_terminal_snr=zsnr,
        vae_tiling=vae_tiling,
        watermark=watermark,
        loras=loras or None,
    )
    # options given on the command line win over the request stored in --from IMAGE
    overrides = {k: v for k, v in overrides.items() if v is not None}
    # defaults from the user's config file, under the stored request and the command line
    user = user_defaults()
    models_dir = models_dir or (Path(user["models_dir"]).expanduser() if user.get("models_dir") else None)
    model = model or user.get("model")
    base = {**{k: v for k, v in user.items() if k not in ("model", "models_dir", "dtype", "device")}, **base}
    try:
        req = GenerationRequest.from_dict({**base, **overrides})
    except (RequestError, TypeError) as e:
        fail(str(e))
    size_given = "width" in base or width is not None or height is not None
    if req.seed is not None and req.seed < 0:  # A1111 convention: -1 = random
        req.seed = None
    try:  # reject a bad request before loading gigabytes of weights
        import copy

        copy.copy(req).validate()
    except RequestError as e:
        fail(str(e))
    model_path = resolve_model(model or base.get("model"), models_dir)
    run_generate(
        req,
        model_path,
        refiner,
        models_dir,
        out,
        n,
        dtype,
        vae_dtype,
        device,
        save_latents,
        allow_pickle,
        quiet,
        size_given,
    )


def run_generate(
    req,
    model_path: Path,
    refiner_name,
    models_dir,
    out,
    n,
    dtype,
    vae_dtype,
    device,
    save_latents,
    allow_pickle,
    quiet,
    size_given=True,
):
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from .metadata import write_png
    from .pipeline import SDXL, Interrupted, NumericsError
    from .request import RequestError
    from .weights.io import CheckpointError

    dev = _device(device)
    try:
        pipe = SDXL.load(
            model_path,
            device=dev,
            dtype=_dtype(dtype),
            vae_dtype=_dtype(vae_dtype) if vae_dtype else None,
            allow_pickle=allow_pickle,
        )
        ref = None
        if refiner_name:
            rp = resolve_model(refiner_name, models_dir, kind="refiner")
            ref = SDXL.load(rp, device=dev, dtype=_dtype(dtype), allow_pickle=allow_pickle)
            req.refiner = str(rp)
    except CheckpointError as e:
        fail(str(e))
    req.model = str(model_path)
    if not size_given:  # the model's native size (1024 for SDXL, 256 for the shipped miniature)
        req.width = req.height = pipe.config.sample_size
    paths = []
    seed0 = req.resolved_seed()
    try:
        with Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            disable=quiet,
            transient=False,
        ) as bar:
            images_task = bar.add_task("images", total=n * req.batch) if n * req.batch > 1 else None
            step_task = bar.add_task("steps", total=req.steps)

            def on_step(p):
                bar.update(step_task, total=p.total, completed=p.step, description=p.stage)

            for i in range(n):
                req.seed = seed0 + i * req.batch
                bar.reset(step_task)
                result = pipe.generate(req, callback=on_step, refiner=ref)
                for j, (img, info) in enumerate(zip(result.images, result.infos)):
                    k = i * req.batch + j
                    path = _out_path(out, k, n * req.batch, result.seeds[j])
                    record = {
                        "request": {**req.to_dict(), "seed": result.seeds[j], "batch": 1},
                        "sdxl_version": _version(),
                    }
                    write_png(img, path, info, record)
                    paths.append(path)
                    if images_task is not None:
                        bar.advance(images_task)
                if save_latents is not None:
                    from .weights.io import save_safetensors

                    lp = (
                        save_latents
                        if n == 1
                        else save_latents.with_name(f"{save_latents.stem}-{i:04d}.safetensors")
                    )
                    save_safetensors({"latents": result.latents.float().cpu()}, lp, {"seed": str(req.seed)})
    except (RequestError, ValueError) as e:
        fail(str(e))
    except Interrupted as e:
        fail(str(e), code=130)
    except NumericsError as e:
        fail(str(e), code=3)
    for p in paths:
        typer.echo(str(p))


def _version() -> str:
    from . import __version__

    return __version__


def _out_path(out: Path | None, k: int, total: int, seed: int) -> Path:
    if out is None:
        out = Path("outputs")
    if out.suffix.lower() != ".png":  # a folder: numbered files inside
        out.mkdir(parents=True, exist_ok=True)
        existing = sorted(out.glob("[0-9][0-9][0-9][0-9][0-9]-*.png"))
        nxt = int(existing[-1].name[:5]) + 1 if existing else 0
        return out / f"{nxt:05d}-{seed}.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    if total == 1:
        return out
    return out.with_name(f"{out.stem}-{k + 1:04d}{out.suffix}")


@app.command()
def inspect(
    path: Path = typer.Argument(..., help="Checkpoint file or diffusers folder."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    allow_pickle: bool = typer.Option(False, help="Allow .ckpt pickle files (weights-only loading)."),
):
    """Detect what a checkpoint is: kind, every config number, parameters per component and dtypes."""
    from .weights.checkpoint import read_checkpoint
    from .weights.io import CheckpointError

    try:
        ck = read_checkpoint(path, allow_pickle=allow_pickle)
    except CheckpointError as e:
        fail(str(e))
    comps = {}
    for name, sd in ck.parts.items():
        dtypes: dict[str, int] = {}
        params = 0
        for t in sd.values():
            params += t.numel()
            dt = str(t.dtype).replace("torch.", "")
            dtypes[dt] = dtypes.get(dt, 0) + 1
        comps[name] = {"tensors": len(sd), "parameters": params, "dtypes": dtypes}
    info = {
        "path": str(path),
        "layout": ck.layout,
        "kind": ck.config.kind,
        "prediction": ck.config.prediction,
        "config": ck.config.to_dict(),
        "components": comps,
    }
    if as_json:
        typer.echo(json.dumps(info, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    con = Console()
    con.print(
        f"[bold]{path}[/bold]  layout: {ck.layout}  kind: [bold]{ck.config.kind}[/bold]  "
        f"prediction: {ck.config.prediction}"
        + ("  schedule: zero terminal SNR" if ck.config.zero_terminal_snr else "")
    )
    t = Table("component", "tensors", "parameters", "dtypes")
    for name, c in comps.items():
        t.add_row(
            name,
            str(c["tensors"]),
            f"{c['parameters']:,}",
            ", ".join(f"{k}: {v}" for k, v in c["dtypes"].items()),
        )
    con.print(t)
    for name, sub in info["config"].items():
        if isinstance(sub, dict):
            con.print(f"[bold]{name}[/bold]: " + ", ".join(f"{k}={v}" for k, v in sub.items()))


@app.command()
def convert(
    src: Path = typer.Argument(..., help="Checkpoint file or diffusers folder."),
    dst: Path = typer.Argument(..., help="Output .safetensors file or folder."),
    to: str = typer.Option("single-file", "--to", help="single-file or diffusers."),
    dtype: str | None = typer.Option(None, help="Store floats as fp32, fp16 or bf16 (default: unchanged)."),
    allow_pickle: bool = typer.Option(False, help="Allow .ckpt pickle files (weights-only loading)."),
):
    """Convert between the official single-file layout and diffusers folders (lossless unless --dtype)."""
    from .weights.checkpoint import read_checkpoint, write_diffusers, write_single_file
    from .weights.io import CheckpointError

    if to not in ("single-file", "diffusers"):
        fail(f"--to {to!r}: choose single-file or diffusers")
    dt = _dtype(dtype) if dtype else None
    try:
        ck = read_checkpoint(src, allow_pickle=allow_pickle)
        if dst.resolve() == src.resolve():
            fail("destination is the source; choose another path")
        out = write_single_file(ck, dst, dt) if to == "single-file" else write_diffusers(ck, dst, dt)
    except CheckpointError as e:
        fail(str(e))
    typer.echo(str(out))


@app.command()
def info(image: Path = typer.Argument(..., help="A PNG from sdxl, A1111, ComfyUI, Fooocus or InvokeAI.")):
    """Show how an image was made (its generation parameters)."""
    from .metadata import read_info

    if not image.exists():
        fail(f"{image}: no such file")
    try:
        data = read_info(image)
    except (OSError, ValueError) as e:
        fail(f"{image}: {e}")
    try:
        from PIL import Image

        from .watermark import WatermarkUnavailable, detect_watermark

        with Image.open(image) as im:
            data["watermark"] = detect_watermark(im)
    except WatermarkUnavailable as e:
        data["watermark"] = {"verdict": f"not checked ({e})"}
    except OSError:
        pass
    typer.echo(json.dumps({k: v for k, v in data.items() if k != "raw"}, indent=2, default=str))


@data_app.command("shapes")
def data_shapes(
    out: Path = typer.Option(..., "--out", help="Output folder (images, captions, metadata.jsonl)."),
    n: int = typer.Option(1000, "--n", help="Number of images."),
    seed: int = typer.Option(0, help="Seed: the same seed gives the same dataset."),
    base: int = typer.Option(256, help="Base resolution of the aspect buckets."),
    step: int = typer.Option(32, help="Bucket sides are multiples of this."),
    mask: str = typer.Option("disc", "--mask", help="Loss masks (NNNNNN.mask.png): `disc` (a disc around "
                             "each object) or `outline` (the object's edges weigh most, then its disc)."),
):
    """Render the procedural shapes dataset (captioned scenes of 1-3 objects, many aspect ratios)."""
    from .data.shapes import MASK_STYLES, generate_shapes_dataset

    if n < 1:
        fail("--n must be at least 1")
    if mask not in MASK_STYLES:
        fail(f"--mask must be one of {', '.join(MASK_STYLES)}, got {mask!r}")
    summary = generate_shapes_dataset(n, out, seed=seed, base=base, step=step, mask_style=mask)
    typer.echo(json.dumps(summary, indent=2, default=str))


@eval_app.command("shapes")
def eval_shapes(
    model: str | None = typer.Option(None, "--model", "-m", help="Model (default: the shipped one)."),
    refiner: str | None = typer.Option(None, help="Refiner to finish the schedule with."),
    n: int = typer.Option(50, "--n", help="Prompts per list."),
    kinds: str = typer.Option("single,pair,single_novel,pair_novel", help="Prompt lists to run."),
    seed: int = typer.Option(0, help="Seed for prompts and sampling."),
    steps: int = typer.Option(20, help="Sampler steps."),
    cfg: float = typer.Option(5.0, help="CFG scale."),
    sampler: str = typer.Option("dpmpp_2m", help="Sampler."),
    schedule: str = typer.Option(
        "automatic", help="Schedule (automatic: the sampler's, trailing on a zero-terminal-SNR model)."
    ),
    detector_check: int = typer.Option(50, help="First report the detector's accuracy on this many renders."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    device: str | None = typer.Option(None, help="Device."),
    size: int | None = typer.Option(None, help="Image side (default: the model's native size)."),
    original_size: int | None = typer.Option(None, help="Micro-conditioning original size (square)."),
    guidance_rescale: float = typer.Option(0.0, help="CFG rescale (Lin et al. 2024), 0..1."),
    save: Path | None = typer.Option(
        None, help="Folder to save every generated image in (KIND_NNN.png, with its request and scores)."
    ),
):
    """Prompt accuracy (detector) and Frechet distance of a shapes model on held-out prompts."""
    from rich.console import Console

    from .data.evaluate import detector_accuracy_on_renders
    from .eval_shapes import evaluate_pipe, format_table
    from .pipeline import SDXL
    from .weights.io import CheckpointError

    con = Console(stderr=True)
    if n < 2:
        fail("--n must be at least 2 (the Frechet distance needs two images per list)")
    det = detector_accuracy_on_renders(detector_check, seed=seed + 999) if detector_check else None
    if det is not None and not as_json:
        con.print(f"detector accuracy on {detector_check} real renders: {det}")
    try:
        pipe = SDXL.load(resolve_model(model, None), device=_device(device))
        ref = SDXL.load(resolve_model(refiner, None, "refiner"), device=_device(device)) if refiner else None
    except CheckpointError as e:
        fail(str(e))
    ceiling = None
    if detector_check and pipe.vae is not None:
        from .pipeline import from_pil, to_pil

        side = size or pipe.config.sample_size

        def roundtrip(img):
            x = from_pil(img, side, side).to(pipe.device, pipe.dtype)
            return to_pil(pipe.decode(pipe.encode(x)))[0]

        ceiling = detector_accuracy_on_renders(detector_check, seed + 999, side, roundtrip=roundtrip)
        if not as_json:
            con.print(f"detector accuracy on the same renders through the model's VAE: {ceiling}")
    results = evaluate_pipe(
        pipe,
        [k.strip() for k in kinds.split(",") if k.strip()],
        n=n,
        seed=seed,
        steps=steps,
        cfg=cfg,
        sampler=sampler,
        schedule=schedule,
        refiner=ref,
        size=size,
        original_size=original_size,
        guidance_rescale=guidance_rescale,
        save_dir=save,
        progress=lambda k, i, t: con.print(f"{k}: {i}/{t}", end="\r"),
    )
    if as_json:
        record = {"detector": det, "detector_after_vae": ceiling, "results": [r.as_dict() for r in results]}
        typer.echo(json.dumps(record, indent=2))
    else:
        typer.echo(format_table(results))


_PASS = {"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []}


@app.command(context_settings=_PASS, add_help_option=False)
def train(ctx: typer.Context):
    """Train: full fine-tune, LoRA, refiner, text encoders, VAE (`sdxl train --help` lists the flags).

    One line trains: sdxl train --data DIR --init FILE --output DIR --steps N --batch-size N --resolution N
    --lr F [--lora-rank R] [--resume] [--config FILE.toml]. Several GPUs:
    torchrun --nproc_per_node N -m sdxl train --config FILE.toml
    """
    from .train.__main__ import main as train_cli

    raise typer.Exit(train_cli(list(ctx.args)))


@app.command(context_settings=_PASS, add_help_option=False)
def serve(ctx: typer.Context):
    """HTTP API (A1111-compatible + job queue) and web UI (`sdxl serve --help` lists the options).

    sdxl serve --host 127.0.0.1 --port 7860 [--model FILE] [--models-dir DIR] [--api-key KEY]
    """
    from .serve.__main__ import main as serve_cli

    raise typer.Exit(serve_cli(list(ctx.args)))


@app.command(context_settings=_PASS, add_help_option=False)
def bench(ctx: typer.Context):
    """Benchmark UNet step, text encoding, VAE decode, 30-step end to end and memory, ours vs diffusers
    (`sdxl bench --help`)."""
    from .bench import main as bench_cli

    raise typer.Exit(bench_cli(list(ctx.args)))


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
