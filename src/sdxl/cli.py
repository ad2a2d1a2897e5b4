"""The `sdxl` command.

    sdxl generate "a red circle above a blue square"          # the shipped miniature model
    sdxl generate "a cat" --model sd_xl_base_1.0.safetensors --steps 30 --seed 1 --out cat.png
    sdxl inspect sd_xl_base_1.0.safetensors
    sdxl convert sd_xl_base_1.0.safetensors out_dir --to diffusers --dtype fp16
    sdxl info image.png

Every error a user can cause ends in one line on stderr and a non-zero exit code, never a traceback.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
import typing
from inspect import Parameter, Signature
from pathlib import Path
from typing import Any

import typer

from .assets import DEFAULT_NAME, default_model_path
from .errors import BadName, CheckpointError, Interrupted, NameNotFound, NumericsError, RequestError
from .files import atomic_write_bytes, resolve_in_folder
from .metadata import read_info, write_png
from .request import GenerationRequest, LoraSpec, RunOptions, iteration_seeds
from .version import __version__

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
    import torch  # lazy: torch loads only for commands that run a model (`sdxl --help` stays fast)

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
        import tomllib  # lazy: read only when a config file exists
    except ImportError:  # Python 3.10
        import tomli as tomllib  # lazy: Python 3.10's tomllib

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
    """A model the user named: "default" (or nothing: the shipped model), a path, or a name (with or without
    .safetensors) inside --models-dir."""
    if name is None or name == DEFAULT_NAME:
        p = default_model_path(kind)
        if not p.exists():
            fail(f"no --model given and the shipped default {kind} model is missing ({p})")
        return p
    p = Path(name).expanduser()
    if p.exists():
        return p
    flag = "--model" if kind == "base" else "--refiner"
    if models_dir is None:
        fail(f"{flag} {name!r}: no such file or folder")
    try:
        return resolve_in_folder(models_dir, name, "model", (".safetensors",))
    except (BadName, NameNotFound):
        fail(f"{flag} {name!r}: no such file or folder (also looked in {models_dir})")
    raise AssertionError


def _device(device: str | None) -> str:
    """The device to run on; a device this PyTorch build cannot use is a one-line error."""
    import torch  # lazy: `sdxl --help` and the argument checks run without loading torch

    if not device:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        fail(f"--device {device!r}: not a device (cpu, cuda, cuda:1, mps)")
    if dev.type == "cuda" and not torch.cuda.is_available():
        fail(f"--device {device}: this PyTorch ({torch.__version__}) has no usable CUDA; install the CUDA "
             "build of torch, or use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        fail(f"--device {device}: there are {torch.cuda.device_count()} CUDA devices")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        fail(f"--device {device}: MPS is not available in this PyTorch build or on this machine")
    return device


# ------------------------------------------------------------------------------------------------- generate
# `sdxl generate`'s options are built from GenerationRequest's fields (name, type, help), so every field is
# reachable and a new field needs no CLI edit. The options below are the CLI's own: how to run, and
# conveniences that set several fields at once.
_CLI_OPTIONS: dict[str, tuple[Any, Any]] = {
    "prompt": (str | None, typer.Argument(None, help="What to draw (A1111 prompt syntax).",
                                          show_default=False)),
    "model": (str | None, typer.Option(None, "--model", "-m", help="Checkpoint file/folder, a name in "
                                       "--models-dir, or 'default' (the shipped miniature).")),
    "refiner": (str | None, typer.Option(None, help="Refiner checkpoint ('default' = the shipped refiner).")),
    "unet": (str | None, typer.Option(None, help="A UNet-only file (SDXL-Lightning, Turbo, DMD2) used in "
                                      "place of --model's UNet; text encoders and VAE come from --model.")),
    "models_dir": (Path | None, typer.Option(None, help="Folder searched for model names.")),
    "embeddings": (Path | None, typer.Option(None, help="Folder of textual-inversion embeddings "
                                             "(safetensors), "
                                             "used in prompts by file name.")),
    "n": (int, typer.Option(1, "--n", help="Number of batches to run one after another.")),
    "out": (Path | None, typer.Option(None, "--out", "-o",
                                      help="Output PNG (numbered if several) or folder.")),
    "from_image": (Path | None, typer.Option(None, "--from", help="Repeat the request stored in this PNG.")),
    "lora": (list[str], typer.Option([], "--lora",
                                     help="LoRA file/name with weight, e.g. style.safetensors:0.8")),
    "original_size": (str | None, typer.Option(None, help="Micro-conditioning original size WxH.")),
    "target_size": (str | None, typer.Option(None, help="Micro-conditioning target size WxH.")),
    "negative_original_size": (str | None, typer.Option(None, help="Negative-branch original size WxH.")),
    "negative_target_size": (str | None, typer.Option(None, help="Negative-branch target size WxH.")),
    "dtype": (str, typer.Option("fp32", help="fp32, fp16 or bf16 for the UNet and text encoders.")),
    "vae_dtype": (str | None, typer.Option(None, help="VAE dtype (default: same as --dtype).")),
    "device": (str | None, typer.Option(None, help="cpu, cuda, cuda:1, mps (default: cuda if available).")),
    "threads": (int | None, typer.Option(None, help="CPU threads for PyTorch (default: PyTorch's choice).")),
    "fast": (bool, typer.Option(True, "--fast/--no-fast", help="Exact speed-ups: fused projections, "
                                "channels_last, oneDNN linears on CPU, the best attention kernel.")),
    "compile": (bool, typer.Option(False, "--compile", help="torch.compile the UNet (cached on disk; the "
                                   "first "
                                   "run compiles, later runs start fast).")),
    "save_latents": (Path | None, typer.Option(None, help="Also write the final latents (safetensors).")),
    "allow_pickle": (bool, typer.Option(False, help="Allow .ckpt pickle files (weights-only loading).")),
    "quiet": (bool, typer.Option(False, "--quiet", "-q", help="No progress bar, no seed line.")),
    # control units: --controlnet and --control-image are paired in order; each --control-* option is given
    # once (every unit) or once per unit (in order)
    "controlnet": (list[str], typer.Option(
        [], "--controlnet", help="Control model FILE[:WEIGHT[:START:END]] (ControlNet, union, Control-LoRA "
        "or T2I-Adapter; a path or a name in --controlnet-dir; START/END: fractions of the steps); "
        "repeatable, paired in order with --control-image.", show_default=False)),
    "control_image": (list[Path], typer.Option(
        [], "--control-image", help="The control image of each --controlnet, in order (the map itself, or "
        "the input of --control-preprocessor).", show_default=False)),
    "control_type": (list[str], typer.Option(
        [], "--control-type", help="Union models: the control type (canny, depth, openpose, ...). Once for "
        "every unit or once per unit.", show_default=False)),
    "control_mode": (list[str], typer.Option(
        [], "--control-mode", help="balanced, prompt (my prompt is more important) or control (ControlNet is "
        "more important); once for every unit or once per unit.", show_default=False)),
    "control_resize": (list[str], typer.Option(
        [], "--control-resize", help="resize (stretch), crop (cover, centre crop; the default) or fill (fit "
        "inside, padded); once for every unit or once per unit.", show_default=False)),
    "control_preprocessor": (list[str], typer.Option(
        [], "--control-preprocessor", help="none (the image is the map), canny, threshold, scribble, invert, "
        "tile, blur; once for every unit or once per unit.", show_default=False)),
    "control_threshold": (list[str], typer.Option(
        [], "--control-threshold", help="The preprocessor's A[:B] (canny: LOW:HIGH on 0..255, default "
        "100:200); once for every unit or once per unit.", show_default=False)),
    "controlnet_dir": (Path | None, typer.Option(None, help="Folder searched for --controlnet names.")),
    "ip_adapter": (list[str], typer.Option(
        [], "--ip-adapter", help="IP-Adapter FILE[:SCALE[:START:END]] (a path or a name in "
        "--ip-adapter-dir); repeatable.", show_default=False)),
    "ip_image": (list[Path], typer.Option(
        [], "--ip-image", help="Reference image: with one --ip-adapter every --ip-image is its; with "
        "several, one per adapter, in order.", show_default=False)),
    "image_encoder": (str | None, typer.Option(None, help="The CLIP vision tower for --ip-adapter (a folder "
                                               "or file; default: the one found beside the adapter).")),
    "ip_adapter_dir": (Path | None, typer.Option(None, help="Folder searched for --ip-adapter names and "
                                                 "their image encoders.")),
}
_SIZE_PAIRS = {  # convenience option -> (width field, height field)
    "original_size": ("original_width", "original_height"),
    "target_size": ("target_width", "target_height"),
    "negative_original_size": ("negative_original_width", "negative_original_height"),
    "negative_target_size": ("negative_target_width", "negative_target_height"),
}


def _field_flags(f: dataclasses.Field) -> tuple[str, ...]:
    return tuple(f.metadata.get("flags") or ()) or ("--" + f.name.replace("_", "-"),)


def _request_fields() -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(GenerationRequest) if f.metadata.get("cli", True)]


def _field_option(f: dataclasses.Field, hint: Any) -> tuple[Any, Any]:
    """(type, typer.Option) for a request field: every option defaults to None = not given."""
    flags = _field_flags(f)
    if typing.get_origin(hint) is tuple:  # several images (region masks): a repeatable path option
        return list[Path] | None, typer.Option(None, *flags, help=f.metadata["help"], show_default=False)
    base = next((a for a in typing.get_args(hint) if a is not type(None)), hint)
    if base is bool:
        long = flags[0]
        return bool | None, typer.Option(None, f"{long}/--no-{long[2:]}", *flags[1:], help=f.metadata["help"],
                                         show_default=False)
    if base is Any:  # images: a path on the command line
        base = Path
    return base | None, typer.Option(None, *flags, help=f.metadata["help"], show_default=False)


def _flagged(message: str) -> str:
    """A request error in the CLI's words: field names become the flags that set them."""
    names = {f.name: _field_flags(f)[0] for f in _request_fields()}
    head, sep, rest = message.partition(":")
    for name, flag in names.items():
        rest = re.sub(rf"\b{name}\b", flag, rest) if "_" in name else rest
    head = " ".join(names.get(w, w) for w in head.split("/")) if sep else head
    return head.replace(" --", "/--") + sep + rest


def _generate(**opts: Any) -> None:
    """Generate images from a text prompt (txt2img; img2img with --init-image; inpaint with --mask)."""
    run = RunOptions(model=opts["model"], unet=opts["unet"], refiner=opts["refiner"], device=opts["device"],
                     dtype=opts["dtype"], vae_dtype=opts["vae_dtype"], threads=opts["threads"],
                     fast=opts["fast"], compile=opts["compile"], allow_pickle=opts["allow_pickle"])
    base: dict = _stored_request(opts["from_image"]) if opts["from_image"] is not None else {}
    given = {f.name: opts[f.name] for f in _request_fields() if opts.get(f.name) not in (None, [], ())}
    for option, (wf, hf) in _SIZE_PAIRS.items():
        w, h = _size(opts[option], "--" + option.replace("_", "-"))
        given.update({k: v for k, v in ((wf, w), (hf, h)) if v is not None})
    for key in ("init_image", "mask_image"):
        if key in given:
            given[key] = str(given[key])
    if "region_masks" in given:
        given["region_masks"] = [str(p) for p in given["region_masks"]]
    if opts["prompt"] is not None:
        given["prompt"] = opts["prompt"]
    if opts["lora"]:
        given["loras"] = [_lora_spec(spec) for spec in opts["lora"]]
    given.update(_control_fields(opts, base))
    if given.get("seed") is not None and given["seed"] < 0:  # A1111 convention: -1 = random
        given["seed"] = None
    if "prompt" not in given and "prompt" not in base:
        fail("a prompt is required (or --from IMAGE)")
    # precedence: the command line, then the request stored in --from IMAGE, then the user's config file
    user = user_defaults()
    models_dir = opts["models_dir"]
    if models_dir is None and user.get("models_dir"):
        models_dir = Path(user["models_dir"]).expanduser()
    model = run.model or base.pop("model", None) or user.get("model")
    base.pop("refiner", None)
    defaults = {k: v for k, v in user.items() if k not in ("model", "models_dir", "dtype", "device")}
    try:  # reject a bad request before loading gigabytes of weights
        req = GenerationRequest.from_dict({**defaults, **base, **given}).validate()
    except RequestError as e:
        fail(_flagged(_unit_flags(str(e))))
    model_path = resolve_model(model, models_dir)
    refiner_path = resolve_model(run.refiner, models_dir, "refiner") if run.refiner else None
    if opts["ip_adapter_dir"] is not None:
        run = dataclasses.replace(run, ip_adapter_dir=str(opts["ip_adapter_dir"]))
    run_generate(req, dataclasses.replace(run, model=str(model_path),
                                          refiner=str(refiner_path) if refiner_path else None),
                 out=opts["out"], n=opts["n"], save_latents=opts["save_latents"], quiet=opts["quiet"],
                 embeddings=opts["embeddings"])


def _stored_request(path: Path) -> dict:
    """The request an sdxl PNG carries (for --from)."""
    try:
        info = read_info(path)
    except (OSError, ValueError) as e:
        fail(f"--from {path}: {e}")
    record = info.get("raw", {}).get("sdxl")
    if not record:
        fail(f"--from {path}: the image carries no sdxl request record")
    stored = json.loads(record) if isinstance(record, str) else dict(record)
    return dict(stored.get("request", stored))


def _lora_spec(spec: str) -> LoraSpec:
    name, _, w = spec.rpartition(":") if ":" in spec else (spec, "", "1")
    try:
        return LoraSpec(name or spec, float(w))
    except ValueError:
        fail(f"--lora {spec!r}: expected NAME or NAME:WEIGHT")
    raise AssertionError


# ------------------------------------------------------------------------------------------------- control
_UNIT_FLAGS = {  # request field of a unit -> the flag that sets it
    "controls": {"model": "--controlnet", "weight": "--controlnet", "start": "--controlnet",
                 "end": "--controlnet", "image": "--control-image", "control_type": "--control-type",
                 "control_mode": "--control-mode", "resize_mode": "--control-resize",
                 "preprocessor": "--control-preprocessor", "threshold_a": "--control-threshold",
                 "threshold_b": "--control-threshold"},
    "ip_adapters": {"model": "--ip-adapter", "scale": "--ip-adapter", "start": "--ip-adapter",
                    "end": "--ip-adapter", "images": "--ip-image", "image_encoder": "--image-encoder",
                    "face_embeddings": "--ip-image"},
}  # fmt: skip
_UNIT_FIELD = re.compile(r"^(controls|ip_adapters)\[(\d+)\]\.(\w+)(\[\d+\])?")


def _unit_flags(message: str) -> str:
    """'controls[1].control_mode: ...' -> '--control-mode (unit 2): ...', in the CLI's words."""
    m = _UNIT_FIELD.match(message)
    if not m or m.group(3) not in _UNIT_FLAGS[m.group(1)]:
        return message
    return f"{_UNIT_FLAGS[m.group(1)][m.group(3)]} (unit {int(m.group(2)) + 1})" + message[m.end():]


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _unit_spec(spec: str, flag: str, what: str) -> tuple[str, list[float]]:
    """FILE, FILE:W or FILE:W:START:END -> (FILE, numbers); numbers are read from the right, so a path
    holding ':' (C:\\models\\x.safetensors) stays whole."""
    parts = spec.split(":")
    k = 0
    while k < len(parts) - 1 and _is_number(parts[-1 - k]):
        k += 1
    k = min(k, 3)
    if k == 2:
        fail(f"{flag} {spec!r}: expected FILE, FILE:{what} or FILE:{what}:START:END")
    name = ":".join(parts[: len(parts) - k])
    if not name:
        fail(f"{flag} {spec!r}: no file given")
    return name, [float(x) for x in parts[len(parts) - k:]]


def _file_in(name: str, folder: Path | None, flag: str, suffixes: tuple[str, ...]) -> str:
    """A file or folder given as a path, or a name in `folder`: its absolute path (what the PNG records)."""
    p = Path(name).expanduser()
    if p.exists():
        return str(p.resolve())
    if folder is not None:
        try:
            return str(resolve_in_folder(folder, name, flag.lstrip("-"), suffixes))
        except (BadName, NameNotFound):
            pass
    where = f" (nor in {folder})" if folder is not None else ""
    fail(f"{flag} {name}: no such file or folder{where}")
    raise AssertionError


def _per_unit(opts: dict, key: str, n: int) -> list[Any]:
    """A --control-* option for n units: given once (every unit), n times (in order), or not at all."""
    values = list(opts.get(key) or ())
    if not values:
        return [None] * n
    if len(values) == 1:
        return values * n
    if len(values) != n:
        flag = "--" + key.replace("_", "-")
        fail(f"{flag}: given {len(values)} times for {n} units (give it once for every unit, or once per "
             "unit)")
    return values


def _image_path(path: Path, flag: str) -> str:
    if not path.is_file():
        fail(f"{flag} {path}: no such file")
    return str(path.resolve())


def _control_fields(opts: dict, base: dict) -> dict[str, Any]:
    """The request's `controls` and `ip_adapters` from the control flags. --controlnet / --ip-adapter
    replace the units of --from's request; without them, --control-image / --ip-image and the --control-*
    options change the stored units."""
    out: dict[str, Any] = {}
    images = [_image_path(p, "--control-image") for p in opts["control_image"]]
    if opts["controlnet"]:
        if len(images) != len(opts["controlnet"]):
            fail(f"--control-image: {len(images)} given for {len(opts['controlnet'])} --controlnet units "
                 "(one per unit, in order)")
        units = []
        for spec, image in zip(opts["controlnet"], images):
            name, nums = _unit_spec(spec, "--controlnet", "WEIGHT")
            unit: dict[str, Any] = {"model": _file_in(name, opts["controlnet_dir"], "--controlnet",
                                                      (".safetensors", ".pth", ".bin")), "image": image}
            unit.update(zip(("weight", "start", "end"), nums))
            units.append(unit)
    else:
        units = [dict(u) for u in base.get("controls") or ()]
        if images:
            if len(images) != len(units):
                fail(f"--control-image: {len(images)} given for {len(units)} control units (add --controlnet "
                     "FILE for each)")
            for unit, image in zip(units, images):
                unit["image"] = image
    for key, field in (("control_type", "control_type"), ("control_mode", "control_mode"),
                       ("control_resize", "resize_mode"), ("control_preprocessor", "preprocessor")):
        if opts[key] and not units:
            fail(f"--{key.replace('_', '-')}: no control unit (add --controlnet FILE --control-image IMG)")
        for unit, value in zip(units, _per_unit(opts, key, len(units))):
            if value is not None:
                unit[field] = value
    for unit, value in zip(units, _per_unit(opts, "control_threshold", len(units))):
        if value is not None:
            a, sep, b = value.partition(":")
            if not _is_number(a) or (sep and not _is_number(b)):
                fail(f"--control-threshold {value!r}: expected A or A:B (numbers)")
            unit["threshold_a"] = float(a)
            unit["threshold_b"] = float(b) if sep else None
    for i, unit in enumerate(units):
        if unit.get("image") in (None, "<image>"):
            fail(f"--control-image: unit {i + 1} has no stored control image (it was uploaded, not a file); "
                 "give it with --control-image")
    if opts["controlnet"] or units != list(base.get("controls") or ()):
        out["controls"] = units
    out.update(_ip_fields(opts, base))
    return out


def _ip_fields(opts: dict, base: dict) -> dict[str, Any]:
    images = [_image_path(p, "--ip-image") for p in opts["ip_image"]]
    encoder = opts["image_encoder"]
    if encoder is not None:
        encoder = _file_in(encoder, None, "--image-encoder", ())
    if opts["ip_adapter"]:
        n = len(opts["ip_adapter"])
        if n == 1:
            per = [images]
        elif len(images) == n:
            per = [[im] for im in images]
        else:
            fail(f"--ip-image: {len(images)} given for {n} --ip-adapter units (one per adapter, in order; "
                 "with one adapter, any number)")
        units = []
        for spec, imgs in zip(opts["ip_adapter"], per):
            name, nums = _unit_spec(spec, "--ip-adapter", "SCALE")
            unit: dict[str, Any] = {"model": _file_in(name, opts["ip_adapter_dir"], "--ip-adapter",
                                                      (".safetensors", ".bin")), "images": imgs}
            unit.update(zip(("scale", "start", "end"), nums))
            units.append(unit)
    else:
        units = [dict(u) for u in base.get("ip_adapters") or ()]
        if images:
            if len(units) != 1:
                fail(f"--ip-image: {len(units)} IP-Adapters to give it to (add --ip-adapter FILE)")
            units[0]["images"] = images
    if encoder is not None:
        if not units:
            fail("--image-encoder: no IP-Adapter (add --ip-adapter FILE --ip-image IMG)")
        for unit in units:
            unit["image_encoder"] = encoder
    for i, unit in enumerate(units):
        if "<image>" in (unit.get("images") or ()):
            fail(f"--ip-image: IP-Adapter {i + 1} has a reference image that was not stored (it was "
                 "uploaded); give them with --ip-image")
    changed = opts["ip_adapter"] or units != list(base.get("ip_adapters") or ())
    return {"ip_adapters": units} if changed else {}


def _install_generate() -> None:
    params, annotations = [], {}
    hints = typing.get_type_hints(GenerationRequest)
    options = dict(_CLI_OPTIONS)
    for f in _request_fields():
        options[f.name] = _field_option(f, hints[f.name])
    for name, (tp, default) in options.items():
        params.append(Parameter(name, Parameter.POSITIONAL_OR_KEYWORD, default=default, annotation=tp))
        annotations[name] = tp
    _generate.__signature__ = Signature(params)
    _generate.__annotations__ = annotations
    app.command("generate")(_generate)


_install_generate()


def load_for_run(run: RunOptions, path: str, kind: str = "base"):
    """Load a model for `run` (device, dtypes, speed switches); a bad file is a one-line error."""
    import torch  # lazy: torch and the models load only to run; --help and bad flags do not need them

    from .pipeline import SDXL  # lazy: the pipeline pulls torch and the models

    if run.threads is not None:
        if run.threads < 1:
            fail(f"--threads {run.threads}: must be at least 1")
        torch.set_num_threads(run.threads)
    speed = {} if run.fast and not run.compile else {"fast": run.fast, "compile": run.compile}
    try:
        unet = {"unet": run.unet} if run.unet and kind == "base" else {}  # --unet replaces the base's UNet
        return SDXL.load(path, device=_device(run.device), dtype=_dtype(run.dtype),
                         vae_dtype=_dtype(run.vae_dtype) if run.vae_dtype else None,
                         allow_pickle=run.allow_pickle, **speed, **unet)
    except CheckpointError as e:
        fail(str(e))


def run_generate(
    req: GenerationRequest,
    run: RunOptions,
    *,
    out: Path | None = None,
    n: int = 1,
    save_latents: Path | None = None,
    quiet: bool = False,
    embeddings: Path | None = None,
) -> None:
    """Load the model(s), then run `req` `n` times (seeds advancing by the batch), writing PNGs."""
    # lazy: rich's progress bar, torch and the pipeline load only to run
    from rich.progress import (  # lazy: as above
        BarColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from .upscale import is_upscaler, resolve_model_upscaler  # lazy: torch
    from .weights.io import save_safetensors  # lazy: torch

    if n < 1:
        fail(f"--n {n}: must be at least 1")
    pipe = load_for_run(run, run.model)
    ref = load_for_run(run, run.refiner, "refiner") if run.refiner else None
    if run.ip_adapter_dir and getattr(pipe, "ip_files", None) is not None:
        pipe.ip_files.dirs = [Path(run.ip_adapter_dir)]  # adapter names, and encoders in its sub-folders
    if embeddings is not None:
        if not embeddings.is_dir():
            fail(f"--embeddings {embeddings}: not a folder")
        try:
            pipe.load_embeddings(embeddings)
        except (ValueError, OSError) as e:
            fail(f"--embeddings {embeddings}: {e}")
    try:
        req = req.resolve(pipe.config)
        if req.hires and not is_upscaler(req.hires_upscaler):  # a model upscaler: its file must exist
            resolve_model_upscaler(req.hires_upscaler, pipe.upscaler_dirs, pipe.allow_lora_paths)
    except RequestError as e:
        fail(_flagged(str(e)))
    if not quiet:
        typer.echo(f"seed: {req.seed}", err=True)
    paths = []
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

            for i, seed in enumerate(iteration_seeds(req.seed, req.batch, n)):
                bar.reset(step_task)
                result = pipe.generate(req.replace(seed=seed), callback=on_step, refiner=ref)
                for j, (img, info) in enumerate(zip(result.images, result.infos)):
                    k = i * req.batch + j
                    path = _out_path(out, k, n * req.batch, result.seeds[j])
                    record = {
                        "request": {**result.request.to_dict(), "seed": result.seeds[j], "batch": 1},
                        "model": run.model,
                        "refiner": run.refiner,
                        "sdxl_version": __version__,
                    }
                    write_png(img, path, info, record)
                    paths.append(path)
                    if images_task is not None:
                        bar.advance(images_task)
                if save_latents is not None:
                    lp = (
                        save_latents
                        if n == 1
                        else save_latents.with_name(f"{save_latents.stem}-{i:04d}.safetensors")
                    )
                    save_safetensors({"latents": result.latents.float().cpu()}, lp, {"seed": str(seed)})
    except RequestError as e:
        fail(_flagged(str(e)))
    except ValueError as e:
        fail(str(e))
    except Interrupted as e:
        fail(str(e), code=130)
    except NumericsError as e:
        fail(str(e), code=3)
    for p in paths:
        typer.echo(str(p))


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
    from .weights.checkpoint import read_checkpoint  # lazy: torch

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
    from rich.console import Console  # lazy: rich's renderers load only when printing
    from rich.table import Table  # lazy: rich's renderers load only when printing

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
    vae: Path | None = typer.Option(None, "--vae", help="Bake this VAE into the output in place of the "
                                    "model's own (a whole model or a VAE-only file, e.g. a fine-tuned "
                                    "decoder); its latent channels and downscale must match."),
):
    """Convert between the official single-file layout and diffusers folders (lossless unless --dtype)."""
    from .weights.checkpoint import read_checkpoint, write_diffusers, write_single_file  # lazy: torch

    if to not in ("single-file", "diffusers"):
        fail(f"--to {to!r}: choose single-file or diffusers")
    dt = _dtype(dtype) if dtype else None
    try:
        ck = read_checkpoint(src, allow_pickle=allow_pickle)
        if dst.resolve() == src.resolve():
            fail("destination is the source; choose another path")
        if vae is not None:
            ck = _bake_vae(ck, vae, allow_pickle)
        out = write_single_file(ck, dst, dt) if to == "single-file" else write_diffusers(ck, dst, dt)
    except CheckpointError as e:
        fail(str(e))
    typer.echo(str(out))


def _bake_vae(ck, vae: Path, allow_pickle: bool):
    """`ck` with the VAE (weights and config) of the file `vae`; refused where the latents would not fit."""
    from .weights.checkpoint import read_checkpoint  # lazy: torch

    try:
        vck = read_checkpoint(vae, allow_pickle=allow_pickle)
    except CheckpointError as e:
        fail(f"--vae: {e}")
    new = vck.config.vae
    if "vae" not in vck.parts or new is None:
        fail(f"--vae: {vae} holds no VAE")
    old = ck.config.vae
    if old is not None and (new.embed_dim, new.downscale) != (old.embed_dim, old.downscale):
        fail(f"--vae: {vae} makes {new.embed_dim}-channel latents at 1/{new.downscale} scale; "
             f"{ck.path} uses {old.embed_dim} channels at 1/{old.downscale}")
    parts = {**ck.parts, "vae": vck.parts["vae"]}
    return dataclasses.replace(ck, config=dataclasses.replace(ck.config, vae=new), parts=parts)


@app.command()
def info(image: Path = typer.Argument(..., help="A PNG from sdxl, A1111, ComfyUI, Fooocus or InvokeAI.")):
    """Show how an image was made (its generation parameters)."""

    if not image.exists():
        fail(f"{image}: no such file")
    try:
        data = read_info(image)
    except (OSError, ValueError) as e:
        fail(f"{image}: {e}")
    try:
        from PIL import Image  # lazy: Pillow loads only to read an image

        from .watermark import WatermarkUnavailable, detect_watermark  # lazy: torch (the watermark decoder)

        with Image.open(image) as im:
            data["watermark"] = detect_watermark(im)
    except WatermarkUnavailable as e:
        data["watermark"] = {"verdict": f"not checked ({e})"}
    except OSError:
        pass
    typer.echo(json.dumps({k: v for k, v in data.items() if k != "raw"}, indent=2, default=str))


@app.command()
def upscale(
    image: Path = typer.Argument(..., help="The image to upscale."),
    model: Path = typer.Option(..., "--model", help="Upscaler file (.safetensors, or .pth/.pt state dict)."),
    scale: float | None = typer.Option(None, help="Upscale by this factor (default: the model's)."),
    tile: int = typer.Option(512, help="Tile size in input pixels (0: no tiling)."),
    out: Path = typer.Option(Path("."), "--out", help="Output folder."),
    device: str | None = typer.Option(None, help="cuda, cuda:1, mps or cpu (default: cuda if available)."),
    dtype: str = typer.Option("fp32", help="fp32, fp16 or bf16."),
):
    """Upscale an image with a model upscaler (ESRGAN, Real-ESRGAN, SwinIR, ...; needs sdxl[upscale])."""
    from PIL import Image  # lazy: Pillow and torch load only for commands that run a model

    from .upscale_models import load_upscaler, png_bytes, text_chunks, upscaled_chunks  # lazy: torch

    if not image.is_file():
        fail(f"{image}: no such file")
    if scale is not None and not 0 < scale <= 16:
        fail(f"--scale {scale}: must be above 0 and at most 16")
    if tile < 0:
        fail(f"--tile {tile}: must be 0 (no tiling) or a tile size in pixels")
    dt = _dtype(dtype)
    try:
        up = load_upscaler(model, _device(device), dt)
    except CheckpointError as e:
        fail(str(e))
    try:
        with Image.open(image) as im:
            im.load()
            src = im
    except OSError as e:
        fail(f"{image}: not an image ({e})")
    by = scale if scale is not None else float(up.scale)

    def progress(done: int, total: int) -> None:
        if total > 1:
            typer.echo(f"tile {done}/{total}", err=True)

    result = up.upscale(src, by, tile=tile, progress=progress)
    data = png_bytes(result, upscaled_chunks(text_chunks(src), up.name, by))
    dest = out / f"{image.stem}-{up.name}-x{by:g}.png"
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(dest, data)
    typer.echo(str(dest))


@data_app.command("shapes")
def data_shapes(
    out: Path = typer.Option(..., "--out", help="Output folder (images, captions, metadata.jsonl, "
                             "summary.json)."),
    n: int = typer.Option(1000, "--n", help="Number of images (all distinct scenes)."),
    seed: int = typer.Option(0, help="Seed: the same seed gives the same dataset."),
    base: int | None = typer.Option(None, help="Image side (square levels) or base resolution of the aspect "
                                    "buckets (default: the level's; 256 for `full`)."),
    step: int = typer.Option(32, help="Bucket sides are multiples of this."),
    mask: str = typer.Option("disc", "--mask", help="Loss masks (NNNNNN.mask.png): `disc` (a disc around "
                             "each object) or `outline` (the object's edges weigh most, then its disc)."),
    level: str = typer.Option("full", help="Curriculum level: easy (one large object, plain, 128 px), mid "
                              "(1-2 objects at 128 px at their 256 px latent sizes, all backgrounds), multi "
                              "(256 px buckets, 1-3 objects), vae (more small objects, every texture), full "
                              "(the shipped model's data, as before levels). docs/CURRICULUM.md."),
    objects: str | None = typer.Option(None, help="Objects per scene: N, MIN-MAX, N,M or N=SHARE,..."),
    object_latent_px: str | None = typer.Option(
        None, help="Object diameter in latent px (f=8) at --at-res: MIN:MAX or small=MIN:MAX,large=MIN:MAX."
    ),
    at_res: int | None = typer.Option(None, help="Shorter side (px) at which --object-latent-px holds "
                                      "(default: --base)."),
    backgrounds: str | None = typer.Option(
        None, help="Background shares: plain=S,gradient=S,stripes=S,checker=S,noise=S (textured=S: "
        "checker+noise)."
    ),
    soft_upscales: float | None = typer.Option(None, help="Share rendered small and upscaled (soft)."),
    crops: float | None = typer.Option(None, help="Share zoomed in so objects are cut by the border."),
    relations: float | None = typer.Option(None, help="Share of multi-object captions that state relations."),
    square: bool | None = typer.Option(None, "--square/--buckets", help="Square images or aspect buckets."),
):
    """Render the procedural shapes dataset (captioned scenes of 1-3 objects) at a curriculum level."""
    from .data import shapes as S  # lazy: numpy and the renderer

    if n < 1:
        fail("--n must be at least 1")
    if mask not in S.MASK_STYLES:
        fail(f"--mask must be one of {', '.join(S.MASK_STYLES)}, got {mask!r}")
    try:
        overrides = {
            "objects": S.parse_counts(objects) if objects is not None else None,
            "sizes": S.parse_sizes(object_latent_px) if object_latent_px is not None else None,
            "backgrounds": S.parse_shares(backgrounds) if backgrounds is not None else None,
            "at_res": at_res, "soft_upscales": soft_upscales, "crops": crops, "relations": relations,
            "square": square,
        }
        if base is not None and (level != "full" or any(v is not None for v in overrides.values())):
            overrides["base"] = base  # `--level full` alone keeps the legacy draw, at this base
        cur = S.make_level(level, **overrides)
    except ValueError as e:  # "field: message" -> "--flag: message"
        field, _, msg = str(e).partition(": ")
        flag = {"sizes": "object-latent-px"}.get(field, field.replace("_", "-"))
        fail(f"--{flag}: {msg}")
    summary = S.generate_shapes_dataset(n, out, seed=seed, base=base or 256, step=step, mask_style=mask,
                                        level=cur)
    typer.echo(json.dumps(summary, indent=2, default=str))


def _eval_level(level: str | None):
    """`--level NAME` of the eval commands -> a Curriculum (None: the shipped model's prompt lists)."""
    from .data.shapes import make_level  # lazy: numpy and the renderer

    if level is None or level == "full":
        return None
    try:
        return make_level(level)
    except ValueError as e:
        fail(f"--{e}")


def _eval_lists(lists: str, level=None, default: bool = False) -> list[str]:
    """`--lists` -> names; with a level that has no two-object scenes (easy) the pair lists are dropped when
    they came from the default, and refused when asked for."""
    from .data.shapes import EVAL_KINDS  # lazy: numpy and the renderer

    out = [k.strip() for k in lists.split(",") if k.strip()]
    if not out or any(k not in EVAL_KINDS for k in out):
        fail(f"--lists: each of {', '.join(EVAL_KINDS)}, got {lists!r}")
    if level is not None and not level.objects.get(2):
        if not default and any(k.startswith("pair") for k in out):
            fail(f"--lists: level {level.name} has no two-object scenes; ask for single lists only")
        out = [k for k in out if not k.startswith("pair")]
    return out


@eval_app.command("shapes")
def eval_shapes(
    model: str | None = typer.Option(None, "--model", "-m", help="Model (default: the shipped one)."),
    refiner: str | None = typer.Option(None, help="Refiner to finish the schedule with."),
    n: int = typer.Option(100, "--n", help="Prompts per list (claims need >= 100: Wilson intervals about "
                          "+-9 points)."),
    kinds: str = typer.Option("single,pair,single_novel,pair_novel", "--lists", "--kinds",
                              help="Prompt lists to run (single, pair, single_novel, pair_novel)."),
    level: str | None = typer.Option(None, help="Draw the prompts from this curriculum level (easy, mid, "
                                     "multi, vae; default: the shipped model's lists); --size defaults to "
                                     "its base."),
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
    """Prompt accuracy (detector) and Frechet distance of a shapes model on held-out prompts; every rate
    with its Wilson 95% interval."""
    from rich.console import Console  # lazy: rich's renderers load only when printing

    from .data.evaluate import ceiling_table, render_ceiling  # lazy: numpy and the renderer
    from .eval_shapes import evaluate_pipe, format_table  # lazy: torch
    from .pipeline import SDXL  # lazy: the pipeline pulls torch and the models

    con = Console(stderr=True)
    if n < 2:
        fail("--n must be at least 2 (the Frechet distance needs two images per list)")
    cur = _eval_level(level)
    lists = _eval_lists(kinds, cur, default=kinds == "single,pair,single_novel,pair_novel")
    if cur is not None and size is None:
        size = cur.base

    def flat(tallies):  # {"single_shape_ok": rate, ...} for the two whole lists
        return {f"{k}_{m}": t.rate(m) for k, t in tallies.items() if k in ("single", "pair")
                for m in t.correct}

    det_lists = ("single", "pair") if cur is None or cur.objects.get(2) else ("single",)
    det_t = None
    if detector_check:
        det_t = render_ceiling(detector_check, seed + 999, size or 256, lists=det_lists, level=cur)
    if det_t is not None and not as_json:
        typer.echo(f"detector on {detector_check} real renders per list:\n{ceiling_table(det_t)}", err=True)
    try:
        pipe = SDXL.load(resolve_model(model, None), device=_device(device))
        ref = SDXL.load(resolve_model(refiner, None, "refiner"), device=_device(device)) if refiner else None
    except CheckpointError as e:
        fail(str(e))
    ceil_t = None
    if detector_check and pipe.vae is not None:
        from .pipeline import from_pil, to_pil  # lazy: the pipeline pulls torch and the models

        side = size or pipe.config.sample_size

        def roundtrip(img):
            x = from_pil(img, side, side).to(pipe.device, pipe.dtype)
            return to_pil(pipe.decode(pipe.encode(x)))[0]

        ceil_t = render_ceiling(detector_check, seed + 999, side, roundtrip=roundtrip, lists=det_lists,
                                level=cur)
        if not as_json:
            typer.echo(f"the same renders through the model's VAE:\n{ceiling_table(ceil_t)}", err=True)
    results = evaluate_pipe(
        pipe,
        lists,
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
        level=cur,
        progress=lambda k, i, t: con.print(f"{k}: {i}/{t}", end="\r"),
    )
    if as_json:
        record = {
            "level": level or "full",
            "detector": flat(det_t) if det_t else None,
            "detector_after_vae": flat(ceil_t) if ceil_t else None,
            "detector_ci95": {k: t.as_dict() for k, t in det_t.items()} if det_t else None,
            "detector_after_vae_ci95": {k: t.as_dict() for k, t in ceil_t.items()} if ceil_t else None,
            "results": [r.as_dict() for r in results],
        }
        typer.echo(json.dumps(record, indent=2))
    else:
        typer.echo(format_table(results))


@eval_app.command("vae-ceiling")
def eval_vae_ceiling(
    vae: str | None = typer.Option(None, "--vae", help="A file holding a VAE (a whole model or a VAE-only "
                                   "export of `sdxl train --task vae`; default: the shipped base)."),
    n: int = typer.Option(100, "--n", help="Renders per list."),
    lists: str = typer.Option("single,pair", "--lists", help="Prompt lists (single, pair, single_novel, "
                              "pair_novel)."),
    level: str | None = typer.Option(None, help="Draw the scenes from this curriculum level (default: the "
                                     "evaluation lists of `sdxl eval shapes`)."),
    size: int | None = typer.Option(None, help="Render side (default: 256, or the level's base)."),
    seed: int = typer.Option(999, help="Seed of the scenes (999: the renders `sdxl eval shapes` checks)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    device: str | None = typer.Option(None, help="Device."),
):
    """The detector's scores on real renders after encode + decode through a VAE: the ceiling it puts on any
    model using it, per list and per object size, every rate with its Wilson 95% interval. Gate (issue 16):
    shape >= 95% on single objects, >= 85% on pairs."""
    from .data.evaluate import ceiling_table, render_ceiling  # lazy: numpy and the renderer
    from .eval_shapes import vae_roundtrip  # lazy: torch

    if n < 1:
        fail("--n must be at least 1")
    cur = _eval_level(level)
    chosen = _eval_lists(lists, cur, default=lists == "single,pair")
    side = size or (cur.base if cur is not None else 256)
    path = vae or str(resolve_model(None, None))
    try:
        roundtrip = vae_roundtrip(path, _device(device) or "cpu")
    except CheckpointError as e:
        fail(f"--vae: {e}")
    tallies = render_ceiling(n, seed, side, roundtrip=roundtrip, lists=tuple(chosen), level=cur)
    if as_json:
        record = {"vae": path, "size": side, "seed": seed, "level": level or "full",
                  "ceiling": {k: t.as_dict() for k, t in tallies.items()}}
        typer.echo(json.dumps(record, indent=2))
    else:
        typer.echo(f"VAE {path}, {side} px renders, seed {seed}:")
        typer.echo(ceiling_table(tallies))


_PASS = {"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []}


@app.command(context_settings=_PASS, add_help_option=False)
def train(ctx: typer.Context):
    """Train: full fine-tune, LoRA, refiner, text encoders, VAE (`sdxl train --help` lists the flags).

    One line trains: sdxl train --data DIR --init FILE --output DIR --steps N --batch-size N --resolution N
    --lr F [--lora-rank R] [--resume] [--config FILE.toml]. Several GPUs:
    torchrun --nproc_per_node N -m sdxl train --config FILE.toml
    """
    from .train.__main__ import main as train_cli  # lazy: the trainer and torch

    raise typer.Exit(train_cli(list(ctx.args)))


@app.command(context_settings=_PASS, add_help_option=False)
def serve(ctx: typer.Context):
    """HTTP API (A1111-compatible + job queue) and web UI (`sdxl serve --help` lists the options).

    sdxl serve --host 127.0.0.1 --port 7860 [--model FILE] [--models-dir DIR] [--api-key KEY]
    """
    from .serve.__main__ import main as serve_cli  # lazy: the optional server extra (fastapi, uvicorn)

    raise typer.Exit(serve_cli(list(ctx.args)))


@app.command(context_settings=_PASS, add_help_option=False)
def bench(ctx: typer.Context):
    """Benchmark UNet step, text encoding, VAE decode, 30-step end to end and memory, ours vs diffusers
    (`sdxl bench --help`)."""
    from .bench import main as bench_cli  # lazy: the benchmark and torch

    raise typer.Exit(bench_cli(list(ctx.args)))


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
