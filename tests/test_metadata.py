"""PNG metadata (sdxl.metadata): the A1111 infotext both ways, our JSON record, other tools' PNGs, hashes.

The sample chunks below follow each tool's documented writer: A1111's create_infotext (1.10 and the
pre-1.9 "DPM++ 2M Karras" form; the 1.6 line is verbatim from A1111 issue #12836), ComfyUI's SaveImage
(`prompt` API graph + `workflow`), Fooocus's meta_parser (JSON scheme and A1111 scheme, with the
`fooocus_scheme` chunk), InvokeAI's `invokeai_metadata` (3.x and 4.x) and the older `sd-metadata`/`Dream`.
"""

from __future__ import annotations

import hashlib
import json
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from sdxl.metadata import (
    addnet_hash,
    embedding_hash,
    format_a1111,
    hashes,
    info_from_chunks,
    legacy_hash,
    lora_hash,
    parse_a1111,
    read_info,
    request_infotext,
    sha256_file,
    short_hash,
    write_png,
)
from sdxl.request import GenerationRequest, LoraSpec
from sdxl.sampling.names import A1111_SAMPLER_NAMES, A1111_SCHEDULE_NAMES, parse_sampler_label


@pytest.fixture(autouse=True)
def private_hash_cache(tmp_path, monkeypatch):
    """Each test gets its own hash cache (never the user's), and an empty in-memory one."""
    monkeypatch.setenv("SDXL_CACHE_DIR", str(tmp_path / "user-cache"))
    monkeypatch.setattr(hashes, "_memory", {})


A1111_110 = (
    "a photo of an astronaut riding a horse, <lora:film_grain:0.6>, (masterpiece:1.2)\n"
    "Negative prompt: blurry, lowres\n"
    "Steps: 30, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1234567890, Size: 1024x1024, "
    "Model hash: 31e35c80fc, Model: sd_xl_base_1.0, VAE hash: 551eac7037, VAE: sdxl_vae.safetensors, "
    "Denoising strength: 0.35, Clip skip: 3, Hires upscale: 1.5, Hires steps: 15, "
    "Hires upscaler: 4x-UltraSharp, "
    'Lora hashes: "film_grain: 8a1b2c3d4e5f", TI hashes: "negativeXL: 1e2d3c4b5a69", '
    "Refiner: sd_xl_refiner_1.0 [7440042bbd], Refiner switch at: 0.8, Version: v1.10.1"
)
A1111_16 = (  # verbatim from https://github.com/AUTOMATIC1111/stable-diffusion-webui/issues/12836
    "dog\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 2012761744, Size: 1024x1024, "
    "Model hash: 31e35c80fc, Model: sd_xl_base_1.0, VAE hash: 551eac7037, VAE: sdxl_vae.safetensors, "
    "Version: v1.6.0-RC-28-ga0af2852"
)
A1111_OLD_SAMPLER = (
    "castle on a hill\nline two of the prompt\nNegative prompt: fog\nmore fog\n"
    "Steps: 25, Sampler: DPM++ 2M Karras, CFG scale: 6.5, Seed: 42, Size: 832x1216, Model hash: 31e35c80fc, "
    'Hires prompt: "castle, sharp", Hires resize: 1664x2432, Version: v1.5.1'
)


# ---------------------------------------------------------------------------------------------------------
# A1111 infotext
# ---------------------------------------------------------------------------------------------------------


def test_format_exact_layout_and_order():
    params = {  # deliberately out of A1111's order: the fixed fields are put back in it
        "version": "v1",
        "model": "name",
        "seed": 123,
        "prompt": "a cat",
        "negative_prompt": "blurry",
        "cfg": 7.0,
        "width": 1024,
        "height": 1024,
        "model_hash": "abcdef1234",
        "steps": 30,
        "sampler": "dpmpp_2m",
        "schedule": "karras",
        "Hires upscaler": "Latent",
    }
    assert format_a1111(params) == (
        "a cat\nNegative prompt: blurry\n"
        "Steps: 30, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 123, Size: 1024x1024, "
        "Model hash: abcdef1234, Model: name, Hires upscaler: Latent, Version: v1"
    )


def test_format_quotes_and_omissions():
    text = format_a1111(
        {
            "prompt": "p",
            "negative_prompt": "",
            "steps": 4,
            "cfg": 7.5,
            "seed": 1,
            "clip_skip": 1,
            "model": 'odd, "name": v2',
            "vae": None,
            "refiner": "ref",
            "refiner_hash": "7440042bbd",
            "lora_hashes": {"a:b,c": "123456789abc"},
        }
    )
    assert text == (
        'p\nSteps: 4, CFG scale: 7.5, Seed: 1, Model: "odd, \\"name\\": v2", Refiner: ref [7440042bbd], '
        'Lora hashes: "abc: 123456789abc"'
    )
    with pytest.raises(ValueError):
        format_a1111({"width": 512})
    with pytest.raises(ValueError):
        format_a1111({"bad, key": 1})


def test_parse_a1111_110():
    p = parse_a1111(A1111_110)
    assert p["prompt"] == "a photo of an astronaut riding a horse, <lora:film_grain:0.6>, (masterpiece:1.2)"
    assert p["negative_prompt"] == "blurry, lowres"
    expected = {
        "steps": 30,
        "sampler": "dpmpp_2m",
        "schedule": "karras",
        "cfg": 7.0,
        "seed": 1234567890,
        "width": 1024,
        "height": 1024,
        "model_hash": "31e35c80fc",
        "model": "sd_xl_base_1.0",
        "vae_hash": "551eac7037",
        "vae": "sdxl_vae.safetensors",
        "denoising_strength": 0.35,
        "clip_skip": 2,  # A1111's 3: one layer before SDXL's usual penultimate one
        "hires_upscale": 1.5,
        "hires_steps": 15,
        "hires_upscaler": "4x-UltraSharp",
        "lora_hashes": {"film_grain": "8a1b2c3d4e5f"},
        "ti_hashes": {"negativeXL": "1e2d3c4b5a69"},
        "refiner": "sd_xl_refiner_1.0",
        "refiner_hash": "7440042bbd",
        "refiner_switch": 0.8,
        "version": "v1.10.1",
    }
    assert {k: p[k] for k in expected} == expected
    assert format_a1111(p) == A1111_110  # a real A1111 text survives a round trip byte for byte


def test_parse_a1111_16_and_old_combined_sampler():
    p = parse_a1111(A1111_16)
    assert (p["prompt"], p["negative_prompt"], p["sampler"], p["steps"]) == ("dog", "", "euler_a", 20)
    assert "schedule" not in p and p["version"] == "v1.6.0-RC-28-ga0af2852"
    old = parse_a1111(A1111_OLD_SAMPLER)
    assert old["prompt"] == "castle on a hill\nline two of the prompt"
    assert old["negative_prompt"] == "fog\nmore fog"
    assert (old["sampler"], old["schedule"], old["cfg"]) == ("dpmpp_2m", "karras", 6.5)
    assert (old["hires_width"], old["hires_height"], old["hires_prompt"]) == (1664, 2432, "castle, sharp")
    assert format_a1111(old).endswith(
        "Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 42, "
        'Size: 832x1216, Model hash: 31e35c80fc, Hires prompt: "castle, sharp", '
        "Hires resize: 1664x2432, Version: v1.5.1"
    )


def test_clip_skip_counts_like_the_request():
    # A1111 counts from the last layer (its 2 is SDXL's usual penultimate layer); GenerationRequest from 1.
    assert parse_a1111("x\nSteps: 1, Seed: 2, Clip skip: 2")["clip_skip"] == 1
    assert (
        parse_a1111("x\nSteps: 1, Seed: 2, Clip skip: 1")["Clip skip"] == "1"
    )  # no equivalent: kept as text
    assert format_a1111({"steps": 1, "clip_skip": 1}) == "Steps: 1"
    assert format_a1111({"steps": 1, "clip_skip": 2}) == "Steps: 1, Clip skip: 3"


def test_sampler_labels_accept_comfyui_names():
    assert format_a1111({"sampler": "euler_ancestral", "schedule": "ddim_uniform", "steps": 1}) == (
        "Steps: 1, Sampler: Euler a, Schedule type: DDIM"
    )
    assert format_a1111({"sampler": "dpmpp_2m_sde_gpu"}) == "Sampler: DPM++ 2M SDE"


def test_parse_a1111_lenient():
    assert parse_a1111("just a prompt, with: one colon") == {
        "prompt": "just a prompt, with: one colon",
        "negative_prompt": "",
    }
    p = parse_a1111("x\nSteps: many, Seed: 1, CFG scale: high, Sampler: Mystery sampler")
    assert p["Steps"] == "many" and p["CFG scale"] == "high" and p["seed"] == 1
    assert p["sampler"] == "Mystery sampler"  # unknown names pass through


prompt_text = st.text(alphabet="abcxyz ,.:()[]<>'\"\\", min_size=1, max_size=30).map(str.strip).filter(bool)
value_text = st.text(alphabet="abcXYZ01 _-.,:\"'\\/", min_size=1, max_size=20).map(str.strip).filter(bool)


@settings(max_examples=150, deadline=None)
@given(
    st.fixed_dictionaries(
        {
            "prompt": prompt_text,
            "negative_prompt": prompt_text,
            "steps": st.integers(1, 150),
            # every name whose label reads back to it (unipc_bh1 shares "UniPC" with unipc)
            "sampler": st.sampled_from(
                sorted(n for n, label in A1111_SAMPLER_NAMES.items() if parse_sampler_label(label)[0] == n)
            ),
            "schedule": st.sampled_from(sorted(A1111_SCHEDULE_NAMES)),
            "cfg": st.sampled_from([1.0, 4.5, 7.0, 7.25, 12.0]),
            "seed": st.integers(0, 2**64 - 1),
            "width": st.integers(8, 512).map(lambda x: x * 8),
            "height": st.integers(8, 512).map(lambda x: x * 8),
            "model": value_text,
            "model_hash": st.text(alphabet="0123456789abcdef", min_size=10, max_size=10),
            "refiner_switch": st.sampled_from([0.5, 0.8]),
            "lora_hashes": st.dictionaries(
                st.text(alphabet="abc_-", min_size=1, max_size=8),
                st.text("0123456789abcdef", min_size=12, max_size=12),
            ),
            "ADM Guidance": value_text,
        }
    )
)
def test_format_parse_round_trip(params):
    if not params["lora_hashes"]:
        del params["lora_hashes"]
    assert parse_a1111(format_a1111(params)) == params


# ---------------------------------------------------------------------------------------------------------
# writing our PNGs
# ---------------------------------------------------------------------------------------------------------


def test_write_png_round_trip(tmp_path):
    image = Image.new("RGB", (16, 8), (10, 20, 30))
    request = {
        "prompt": "ein Würfel 猫, <lora:cube:0.5>",
        "negative_prompt": "",
        "steps": 4,
        "cfg": 5.0,
        "sampler": "dpmpp_2m",
        "schedule": "karras",
        "seed": 7,
        "width": 16,
        "height": 8,
        "loras": [{"name": "cube", "weight": 0.5}],
        "crop_top": 0,
    }
    record = {"request": request, "model": "tiny", "model_hash": "0123456789", "version": "0.1.0"}
    parameters = request_infotext(request, model="tiny", model_hash="0123456789")
    path = write_png(image, tmp_path / "out" / "img.png", parameters, record)
    assert sorted(os.listdir(tmp_path / "out")) == ["img.png"]  # no temporary file left behind
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # ordinary permissions, not a temp file's 0600

    with Image.open(path) as reopened:
        assert reopened.size == (16, 8) and reopened.getpixel((0, 0)) == (10, 20, 30)
        assert reopened.text["parameters"] == parameters  # what A1111's PNG Info reads
    info = read_info(path)
    assert info["source"] == "sdxl"
    assert (
        info["parameters"]["prompt"] == request["prompt"] and info["parameters"]["model_hash"] == "0123456789"
    )
    assert info["parameters"]["loras"] == [{"name": "cube", "weight": 0.5}]
    assert json.loads(info["raw"]["sdxl"]) == record
    data = path.read_bytes()
    assert b"iTXtsdxl" in data and b"iTXtparameters" in data  # the non-Latin-1 prompt forces iTXt
    assert parse_a1111(info["raw"]["parameters"])["model"] == "tiny"


def test_write_png_ascii_parameters_use_text_chunk(tmp_path):
    path = write_png(Image.new("L", (4, 4)), tmp_path / "a.png", "cat\nSteps: 1, Seed: 2, CFG scale: 3", {})
    assert b"tEXtparameters" in path.read_bytes()


def test_write_png_failure_keeps_old_file(tmp_path):
    target = tmp_path / "keep.png"
    target.write_bytes(b"old")
    with pytest.raises(OSError):
        write_png(Image.new("F", (4, 4)), target, "x", {})  # Pillow cannot write mode F as PNG
    with pytest.raises(ValueError):
        write_png(Image.new("RGB", (4, 4)), target, "x", {"cfg": float("nan")})
    assert target.read_bytes() == b"old" and sorted(os.listdir(tmp_path)) == ["keep.png"]


def test_request_infotext_adds_each_lora_tag_once():
    params = request_infotext(
        {
            "prompt": "a <lora:a:1>",
            "loras": [{"name": "a", "weight": 1.0}, {"name": "b", "weight": 0.25}],
            "steps": 3,
            "init_image": None,
            "strength": 0.5,
            "refiner_switch": 0.7,
        },
        refiner="r",
        version="x",
    )
    assert params == "a <lora:a:1> <lora:b:0.25>\nSteps: 3, Refiner: r, Refiner switch at: 0.7, Version: x"


def test_request_infotext_of_a_request():
    """What the pipeline writes for one image: every field A1111 shows, in its order; LoRAs named by their
    file stem, once; the refiner switch only where the refiner finishes the base schedule."""
    req = GenerationRequest(
        prompt="a cat <lora:film:0.5>",
        negative_prompt="dog",
        steps=20,
        sampler="dpmpp_2m",
        schedule="karras",
        cfg=6.0,
        width=832,
        height=1216,
        clip_skip=2,
        guidance_rescale=0.7,
        init_image="in.png",
        strength=0.4,
        loras=(LoraSpec("film", 0.5), LoraSpec("loras/grain.safetensors", 0.8)),
    )
    text = request_infotext(
        req,
        seed=42,
        model="base",
        model_hash="0123456789",
        refiner="ref",
        refiner_hash="abcdef0123",
        lora_hashes={"film": "111111111111", "grain": "222222222222"},
        version="sdxl 0.1.0",
    )
    assert text == (
        "a cat <lora:film:0.5> <lora:grain:0.8>\nNegative prompt: dog\n"
        "Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6, Seed: 42, Size: 832x1216, "
        "Model hash: 0123456789, Model: base, Denoising strength: 0.4, Clip skip: 3, CFG rescale phi: 0.7, "
        'Refiner: ref [abcdef0123], Refiner switch at: 0.8, Lora hashes: "film: 111111111111, '
        'grain: 222222222222", Version: sdxl 0.1.0'
    )
    sdedit = request_infotext(req.replace(refiner_mode="sdedit", init_image=None), seed=1, refiner="ref")
    assert sdedit.endswith(", Refiner: ref") and "Refiner switch at" not in sdedit
    assert "Denoising" not in sdedit
    assert request_infotext(req.to_dict(), seed=42, refiner="ref").split("\n")[0] == (
        "a cat <lora:film:0.5> <lora:grain:0.8>"
    )  # a request's to_dict() works the same


# ---------------------------------------------------------------------------------------------------------
# other tools' PNGs
# ---------------------------------------------------------------------------------------------------------


def png_with(tmp_path, chunks: dict[str, str], name: str = "in.png"):
    info = PngInfo()
    for key, value in chunks.items():
        info.add_text(key, value)
    path = tmp_path / name
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    return path


def test_read_a1111_png(tmp_path):
    info = read_info(png_with(tmp_path, {"parameters": A1111_110}))
    assert info["source"] == "a1111"
    p = info["parameters"]
    assert (p["steps"], p["sampler"], p["schedule"], p["cfg"], p["seed"]) == (
        30,
        "dpmpp_2m",
        "karras",
        7.0,
        1234567890,
    )
    assert p["loras"] == [{"name": "film_grain", "weight": 0.6}]
    assert info["raw"] == {"parameters": A1111_110}


def test_read_a1111_jpeg_exif(tmp_path):
    image = Image.new("RGB", (8, 8))
    exif = Image.Exif()
    exif.get_ifd(0x8769)[0x9286] = b"UNICODE\x00" + A1111_16.encode("utf-16-be")
    path = tmp_path / "a.jpg"
    image.save(path, exif=exif)
    info = read_info(path)
    assert info["source"] == "a1111" and info["parameters"]["seed"] == 2012761744


COMFY_BASE_REFINER = {  # ComfyUI's SDXL base + refiner example graph (API format), as SaveImage writes it
    "4": {
        "inputs": {"ckpt_name": "sd_xl_base_1.0.safetensors"},
        "class_type": "CheckpointLoaderSimple",
        "_meta": {"title": "Load Checkpoint - BASE"},
    },
    "5": {"inputs": {"width": 1024, "height": 1024, "batch_size": 1}, "class_type": "EmptyLatentImage"},
    "6": {
        "inputs": {
            "text": "evening sunset scenery blue sky nature, glass bottle with a galaxy in it",
            "clip": ["4", 1],
        },
        "class_type": "CLIPTextEncode",
    },
    "7": {"inputs": {"text": "text, watermark", "clip": ["4", 1]}, "class_type": "CLIPTextEncode"},
    "10": {
        "inputs": {
            "add_noise": "enable",
            "noise_seed": 721897303308196,
            "steps": 25,
            "cfg": 8,
            "sampler_name": "euler",
            "scheduler": "normal",
            "start_at_step": 0,
            "end_at_step": 20,
            "return_with_leftover_noise": "enable",
            "model": ["4", 0],
            "positive": ["6", 0],
            "negative": ["7", 0],
            "latent_image": ["5", 0],
        },
        "class_type": "KSamplerAdvanced",
    },
    "11": {
        "inputs": {
            "add_noise": "disable",
            "noise_seed": 0,
            "steps": 25,
            "cfg": 8,
            "sampler_name": "euler",
            "scheduler": "normal",
            "start_at_step": 20,
            "end_at_step": 10000,
            "return_with_leftover_noise": "disable",
            "model": ["12", 0],
            "positive": ["15", 0],
            "negative": ["16", 0],
            "latent_image": ["10", 0],
        },
        "class_type": "KSamplerAdvanced",
    },
    "12": {"inputs": {"ckpt_name": "sd_xl_refiner_1.0.safetensors"}, "class_type": "CheckpointLoaderSimple"},
    "15": {
        "inputs": {
            "text": "evening sunset scenery blue sky nature, glass bottle with a galaxy in it",
            "clip": ["12", 1],
        },
        "class_type": "CLIPTextEncode",
    },
    "16": {"inputs": {"text": "text, watermark", "clip": ["12", 1]}, "class_type": "CLIPTextEncode"},
    "17": {"inputs": {"samples": ["11", 0], "vae": ["12", 2]}, "class_type": "VAEDecode"},
    "19": {"inputs": {"filename_prefix": "ComfyUI", "images": ["17", 0]}, "class_type": "SaveImage"},
}

COMFY_LORA_SDXL = {  # KSampler, two LoRA loaders, CLIPTextEncodeSDXL, a ControlNet between prompt and sampler
    "1": {"inputs": {"ckpt_name": "juggernautXL_v9.safetensors"}, "class_type": "CheckpointLoaderSimple"},
    "2": {
        "inputs": {
            "lora_name": "xl/detail.safetensors",
            "strength_model": 0.8,
            "strength_clip": 1,
            "model": ["1", 0],
            "clip": ["1", 1],
        },
        "class_type": "LoraLoader",
    },
    "3": {
        "inputs": {
            "lora_name": "film.safetensors",
            "strength_model": 0.5,
            "strength_clip": 0.5,
            "model": ["2", 0],
            "clip": ["2", 1],
        },
        "class_type": "LoraLoader",
    },
    "4": {"inputs": {"value": "a red fox in snow"}, "class_type": "PrimitiveString"},
    "5": {
        "inputs": {
            "width": 2048,
            "height": 2048,
            "crop_w": 0,
            "crop_h": 0,
            "target_width": 1024,
            "target_height": 1024,
            "text_g": ["4", 0],
            "text_l": "fox, snow",
            "clip": ["3", 1],
        },
        "class_type": "CLIPTextEncodeSDXL",
    },
    "6": {"inputs": {"text": "lowres", "clip": ["3", 1]}, "class_type": "CLIPTextEncode"},
    "7": {
        "inputs": {
            "strength": 0.6,
            "start_percent": 0,
            "end_percent": 1,
            "positive": ["5", 0],
            "negative": ["6", 0],
            "control_net": ["8", 0],
            "image": ["9", 0],
        },
        "class_type": "ControlNetApplyAdvanced",
    },
    "10": {"inputs": {"width": 896, "height": 1152, "batch_size": 2}, "class_type": "EmptyLatentImage"},
    "11": {
        "inputs": {
            "seed": 5,
            "steps": 30,
            "cfg": 6.5,
            "sampler_name": "dpmpp_2m_sde",
            "scheduler": "karras",
            "denoise": 1,
            "model": ["3", 0],
            "positive": ["7", 0],
            "negative": ["7", 1],
            "latent_image": ["10", 0],
        },
        "class_type": "KSampler",
    },
}


def test_read_comfyui_base_refiner(tmp_path):
    path = png_with(
        tmp_path, {"prompt": json.dumps(COMFY_BASE_REFINER), "workflow": json.dumps({"nodes": []})}
    )
    info = read_info(path)
    assert info["source"] == "comfyui"
    assert info["parameters"] == {
        "prompt": "evening sunset scenery blue sky nature, glass bottle with a galaxy in it",
        "negative_prompt": "text, watermark",
        "seed": 721897303308196,
        "steps": 25,
        "cfg": 8.0,
        "sampler": "euler",
        "schedule": "normal",
        "model": "sd_xl_base_1.0",
        "model_file": "sd_xl_base_1.0.safetensors",
        "width": 1024,
        "height": 1024,
        "refiner": "sd_xl_refiner_1.0",
        "refiner_switch": 0.8,
    }


def test_read_comfyui_loras_sdxl_encoder_and_controlnet():
    p = info_from_chunks({"prompt": json.dumps(COMFY_LORA_SDXL)})["parameters"]
    assert (p["prompt"], p["prompt_2"], p["negative_prompt"]) == ("fox, snow", "a red fox in snow", "lowres")
    assert (p["original_width"], p["target_width"], p["crop_top"]) == (2048, 1024, 0)
    assert p["loras"] == [{"name": "detail", "weight": 0.8}, {"name": "film", "weight": 0.5}]
    assert (p["model"], p["width"], p["height"], p["seed"], p["sampler"]) == (
        "juggernautXL_v9",
        896,
        1152,
        5,
        "dpmpp_2m_sde",
    )
    assert "denoising_strength" not in p and "refiner" not in p


def test_read_comfyui_workflow_only():
    info = info_from_chunks({"workflow": json.dumps({"nodes": [], "links": []})})
    assert info["source"] == "comfyui" and info["parameters"] == {}


FOOOCUS_JSON = {  # FooocusMetadataParser.to_string: sorted keys, metadata_scheme "fooocus"
    "adm_guidance": "(1.5, 0.8, 0.3)",
    "base_model": "juggernautXL_v8Rundiffusion",
    "base_model_hash": "aeb7e9e689",
    "full_negative_prompt": ["(worst quality, low quality:1.4)"],
    "full_prompt": ["a cat, highly detailed"],
    "guidance_scale": 4,
    "loras": [["sd_xl_offset_example-lora_1.0", 0.1, "4852686128"]],
    "metadata_scheme": "fooocus",
    "negative_prompt": "",
    "performance": "Speed",
    "prompt": "a cat",
    "prompt_expansion": "a cat, highly detailed",
    "refiner_model": "None",
    "refiner_switch": 0.5,
    "resolution": "(1152, 896)",
    "sampler": "dpmpp_2m_sde_gpu",
    "scheduler": "karras",
    "seed": "5707301957541209845",
    "sharpness": 2,
    "steps": 30,
    "styles": "['Fooocus V2', 'Fooocus Enhance', 'Fooocus Sharp']",
    "vae": "Default (model)",
    "version": "Fooocus v2.5.5",
}
FOOOCUS_A1111 = (
    "a cat, highly detailed\nNegative prompt: (worst quality, low quality:1.4)\n"
    "Steps: 30, Sampler: DPM++ 2M SDE Karras, Seed: 5707301957541209845, Size: 1152x896, CFG scale: 4, "
    'Sharpness: 2, ADM Guidance: "(1.5, 0.8, 0.3)", Model: juggernautXL_v8Rundiffusion, '
    "Model hash: aeb7e9e689, "
    "Performance: Speed, Scheduler: karras, VAE: Default (model), Raw prompt: a cat, Raw negative prompt: , "
    'Lora hashes: "sd_xl_offset_example-lora_1.0: 4852686128", '
    'Lora weights: "sd_xl_offset_example-lora_1.0: 0.1", '
    "Version: Fooocus v2.5.5"
)


def test_read_fooocus_json_scheme(tmp_path):
    info = read_info(
        png_with(tmp_path, {"parameters": json.dumps(FOOOCUS_JSON), "fooocus_scheme": "fooocus"})
    )
    assert info["source"] == "fooocus"
    p = info["parameters"]
    assert (p["prompt"], p["steps"], p["width"], p["height"], p["cfg"]) == ("a cat", 30, 1152, 896, 4.0)
    assert (p["sampler"], p["schedule"], p["seed"]) == ("dpmpp_2m_sde_gpu", "karras", 5707301957541209845)
    assert (p["model"], p["model_hash"]) == ("juggernautXL_v8Rundiffusion", "aeb7e9e689")
    assert p["loras"] == [{"name": "sd_xl_offset_example-lora_1.0", "weight": 0.1}]
    assert "refiner" not in p and p["version"] == "Fooocus v2.5.5"
    older = dict(FOOOCUS_JSON, lora_combined_1="sd_xl_offset_example-lora_1.0.safetensors : 0.1", loras=None)
    del older["steps"]  # older versions: steps follow from the performance preset
    q = info_from_chunks({"parameters": json.dumps(older)})["parameters"]
    assert q["steps"] == 30 and q["loras"] == p["loras"]


def test_read_fooocus_a1111_scheme():
    info = info_from_chunks({"parameters": FOOOCUS_A1111, "fooocus_scheme": "a1111"})
    assert info["source"] == "fooocus"
    p = info["parameters"]
    assert (p["sampler"], p["schedule"], p["cfg"], p["width"]) == ("dpmpp_2m_sde", "karras", 4.0, 1152)
    assert p["seed"] == 5707301957541209845 and p["Raw prompt"] == "a cat"
    assert p["lora_hashes"] == {"sd_xl_offset_example-lora_1.0": "4852686128"}


INVOKE_4 = {
    "generation_mode": "sdxl_txt2img",
    "positive_prompt": "a lighthouse on a cliff at dusk",
    "negative_prompt": "blurry",
    "width": 1024,
    "height": 1024,
    "seed": 3423543,
    "rand_device": "cpu",
    "cfg_scale": 7.5,
    "cfg_rescale_multiplier": 0,
    "steps": 30,
    "scheduler": "dpmpp_2m_k",
    "model": {
        "key": "e7b9c1",
        "hash": "blake3:7a2b9f",
        "name": "stable-diffusion-xl-base-1-0",
        "base": "sdxl",
        "type": "main",
    },
    "positive_style_prompt": "oil painting",
    "negative_style_prompt": "blurry",
    "loras": [
        {
            "model": {
                "key": "aa",
                "hash": "blake3:01",
                "name": "pixel-art-xl",
                "base": "sdxl",
                "type": "lora",
            },
            "weight": 0.75,
        }
    ],
    "refiner_model": {"key": "r1", "name": "sdxl-refiner", "base": "sdxl-refiner", "type": "main"},
    "refiner_cfg_scale": 7.5,
    "refiner_steps": 20,
    "refiner_scheduler": "euler",
    "refiner_positive_aesthetic_score": 6,
    "refiner_negative_aesthetic_score": 2.5,
    "refiner_start": 0.8,
    "app_version": "4.2.9",
}
INVOKE_3 = {  # 3.3: model names under "model_name"
    "app_version": "3.3.0post3",
    "generation_mode": "txt2img",
    "positive_prompt": "landscape",
    "negative_prompt": "low quality",
    "width": 768,
    "height": 432,
    "seed": 356120443,
    "rand_device": "cpu",
    "cfg_scale": 7.5,
    "steps": 50,
    "scheduler": "euler_a",
    "clip_skip": 0,
    "model": {"model_name": "amixx_3Prunedfp16", "base_model": "sd-1", "model_type": "main"},
    "controlnets": [],
    "loras": [],
    "vae": {"model_name": "sd-vae-ft-mse", "base_model": "sd-1"},
}


def test_read_invokeai(tmp_path):
    info = read_info(png_with(tmp_path, {"invokeai_metadata": json.dumps(INVOKE_4), "invokeai_graph": "{}"}))
    assert info["source"] == "invokeai"
    p = info["parameters"]
    assert (p["prompt"], p["prompt_2"], p["negative_prompt"]) == (
        "a lighthouse on a cliff at dusk",
        "oil painting",
        "blurry",
    )
    assert "negative_prompt_2" not in p  # the style prompt equals the prompt: nothing extra
    assert (p["sampler"], p["schedule"], p["cfg"], p["steps"], p["seed"]) == (
        "dpmpp_2m",
        "karras",
        7.5,
        30,
        3423543,
    )
    assert (p["model"], p["model_hash"], p["refiner"], p["refiner_switch"]) == (
        "stable-diffusion-xl-base-1-0",
        "blake3:7a2b9f",
        "sdxl-refiner",
        0.8,
    )
    assert (p["aesthetic_score"], p["negative_aesthetic_score"]) == (6.0, 2.5)
    assert p["loras"] == [{"name": "pixel-art-xl", "weight": 0.75}]
    old = info_from_chunks({"invokeai_metadata": json.dumps(INVOKE_3)})["parameters"]
    assert (old["model"], old["vae"], old["sampler"], old["clip_skip"]) == (
        "amixx_3Prunedfp16",
        "sd-vae-ft-mse",
        "euler_a",
        1,
    )


def test_read_invokeai_legacy_formats():
    legacy = {
        "model": "stable diffusion",
        "model_weights": "stable-diffusion-1.5",
        "model_hash": "cc6cb27103",
        "app_id": "invoke-ai/InvokeAI",
        "app_version": "2.2.5",
        "image": {
            "prompt": [{"prompt": "a fantasy castle", "weight": 1.0}],
            "steps": 50,
            "cfg_scale": 7.5,
            "height": 512,
            "width": 512,
            "seed": 3058281592,
            "type": "txt2img",
            "sampler": "k_lms",
        },
    }
    p = info_from_chunks({"sd-metadata": json.dumps(legacy)})["parameters"]
    assert (p["prompt"], p["steps"], p["sampler"], p["model"], p["seed"]) == (
        "a fantasy castle",
        50,
        "lms",
        "stable-diffusion-1.5",
        3058281592,
    )
    dream = info_from_chunks(
        {"Dream": '"a fantasy castle" -s 50 -S 3058281592 -W 512 -H 512 -C 7.5 -A k_euler_a'}
    )
    assert dream["source"] == "invokeai"
    assert dream["parameters"] == {
        "prompt": "a fantasy castle",
        "steps": 50,
        "seed": 3058281592,
        "width": 512,
        "height": 512,
        "cfg": 7.5,
        "sampler": "euler_a",
    }


def test_unknown_and_malformed():
    assert info_from_chunks({"Software": "GIMP"}) == {
        "source": "unknown",
        "parameters": {},
        "raw": {"Software": "GIMP"},
    }
    broken = info_from_chunks({"sdxl": "{not json", "parameters": A1111_16})
    assert broken["source"] == "sdxl" and "error" in broken and broken["parameters"]["seed"] == 2012761744
    assert "error" in info_from_chunks({"invokeai_metadata": "[1, 2]"})
    deep = info_from_chunks({"prompt": "[" * 100000})  # a JSON bomb is not a ComfyUI graph
    assert deep["source"] == "unknown"


chunk_values = st.one_of(
    st.text(max_size=80),
    st.recursive(
        st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=10)),
        lambda inner: (
            st.lists(inner, max_size=4)
            | st.dictionaries(
                st.sampled_from(
                    [
                        "class_type",
                        "inputs",
                        "seed",
                        "steps",
                        "model",
                        "positive",
                        "latent_image",
                        "text",
                        "loras",
                        "resolution",
                        "prompt",
                        "image",
                        "1",
                        "2",
                    ]
                ),
                inner,
                max_size=5,
            )
        ),
        max_leaves=20,
    ).map(json.dumps),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.dictionaries(
        st.sampled_from(
            [
                "parameters",
                "sdxl",
                "prompt",
                "workflow",
                "fooocus_scheme",
                "invokeai_metadata",
                "sd-metadata",
                "Dream",
                "other",
            ]
        ),
        chunk_values,
        max_size=4,
    )
)
def test_fuzz_readers_never_raise(chunks):
    info = info_from_chunks(chunks)
    assert info["source"] in ("sdxl", "a1111", "comfyui", "fooocus", "invokeai", "unknown")
    assert isinstance(info["parameters"], dict) and info["raw"] == chunks


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_fuzz_parse_a1111_never_raises(text):
    assert isinstance(parse_a1111(text)["prompt"], str)


# ---------------------------------------------------------------------------------------------------------
# hashes
# ---------------------------------------------------------------------------------------------------------


def test_hashes(tmp_path):
    data = os.urandom((1 << 20) + 100_000)
    path = tmp_path / "model.safetensors.bin"
    path.write_bytes(data)
    full = hashlib.sha256(data).hexdigest()
    assert sha256_file(path) == full and short_hash(path) == full[:10]
    assert embedding_hash(path) == full[:12] and lora_hash(path) == full[:12]  # not .safetensors: whole file
    assert legacy_hash(path) == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]


def test_addnet_hash_ignores_the_header(tmp_path):
    import torch
    from safetensors.torch import save_file

    tensors = {"lora_unet_x.lora_down.weight": torch.arange(12.0).reshape(3, 4)}
    save_file(tensors, str(tmp_path / "a.safetensors"), metadata={"ss_network_dim": "4"})
    save_file(tensors, str(tmp_path / "b.safetensors"), metadata={"ss_network_dim": "4", "note": "edited"})
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    assert sha256_file(a) != sha256_file(b)
    assert (
        addnet_hash(a) == addnet_hash(b) == hashlib.sha256(torch.arange(12.0).numpy().tobytes()).hexdigest()
    )
    assert lora_hash(a) == addnet_hash(a)[:12]
    (tmp_path / "bad.safetensors").write_bytes((10**9).to_bytes(8, "little") + b"{}")
    with pytest.raises(ValueError):
        addnet_hash(tmp_path / "bad.safetensors")


def test_hash_cache_file(tmp_path):
    path, cache = tmp_path / "m.bin", tmp_path / "cache" / "hashes.json"
    path.write_bytes(b"abc")
    real = hashlib.sha256(b"abc").hexdigest()
    assert sha256_file(path, cache_file=cache) == real
    stored = json.loads(cache.read_text())
    entry = stored[f"sha256:{path.resolve()}"]
    assert entry["sha256"] == real and entry["size"] == 3
    # The cache file is trusted while size and mtime match: prove it is read (not recomputed) ...
    entry["sha256"] = "f" * 64
    cache.write_text(json.dumps(stored))
    hashes._memory.clear()
    assert sha256_file(path, cache_file=cache) == "f" * 64
    # ... and ignored once the file changes.
    path.write_bytes(b"abcd")
    os.utime(path, ns=(1, 1))
    hashes._memory.clear()
    assert sha256_file(path, cache_file=cache) == hashlib.sha256(b"abcd").hexdigest()
    cache.write_text("not json")
    hashes._memory.clear()
    assert short_hash(path, cache_file=cache) == hashlib.sha256(b"abcd").hexdigest()[:10]


class CountingOpen:
    """Counts the opens of one file by `sdxl.metadata.hashes` (monkeypatched over its `open`)."""

    def __init__(self, target):
        self.target, self.count = str(target.resolve()), 0

    def __call__(self, file, *args, **kwargs):
        if str(file) == self.target:
            self.count += 1
        return open(file, *args, **kwargs)


def test_model_hash_is_cached_on_disk_per_file_version(tmp_path, monkeypatch):
    """`short_hash` (the PNG's "Model hash") reads a file once per version, also across processes: the
    second call, and a call with an empty memory (a new process), answer from `$SDXL_CACHE_DIR/hashes.json`
    without opening the file; a touched file (new mtime) is hashed again."""
    monkeypatch.setenv("SDXL_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"weights" * 1000)
    opens = CountingOpen(path)
    monkeypatch.setattr(hashes, "open", opens, raising=False)
    expected = hashlib.sha256(path.read_bytes()).hexdigest()[:10]

    assert short_hash(path) == expected and opens.count == 1
    assert short_hash(path) == expected and opens.count == 1  # from memory
    assert hashes.hash_cache_file() == tmp_path / "cache" / "hashes.json"
    assert hashes.hash_cache_file().is_file()
    hashes._memory.clear()  # a new process
    assert short_hash(path) == expected and opens.count == 1  # from the file, not re-read

    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # touched, same content
    assert short_hash(path) == expected and opens.count == 2
    hashes._memory.clear()
    assert short_hash(path) == expected and opens.count == 2  # the new version is cached too

    umask = os.umask(0)
    os.umask(umask)
    assert hashes.hash_cache_file().stat().st_mode & 0o777 == 0o666 & ~umask


@pytest.mark.parametrize(
    "content", ["not json", "[1, 2]", '{"sha256:x": 3}', "\udcff", '{"sha256:/x": {"sha256": 1}}']
)
def test_a_corrupt_hash_cache_is_recomputed_and_replaced(tmp_path, monkeypatch, content):
    monkeypatch.setenv("SDXL_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "model.bin"
    path.write_bytes(b"abc")
    cache = hashes.hash_cache_file()
    cache.parent.mkdir()
    cache.write_text(content, errors="surrogateescape")
    assert sha256_file(path) == hashlib.sha256(b"abc").hexdigest()
    assert list(json.loads(cache.read_text())) == [f"sha256:{path.resolve()}"]  # rewritten, valid


def test_hash_cache_forgets_deleted_files_and_survives_a_read_only_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("SDXL_CACHE_DIR", str(tmp_path / "cache"))
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    a.write_bytes(b"a")
    b.write_bytes(b"b")
    sha256_file(a)
    a.unlink()
    sha256_file(b)
    assert list(json.loads(hashes.hash_cache_file().read_text())) == [f"sha256:{b.resolve()}"]
    monkeypatch.setenv("SDXL_CACHE_DIR", str(b / "not-a-folder"))  # the cache cannot be written
    b.write_bytes(b"bb")
    assert sha256_file(b) == hashlib.sha256(b"bb").hexdigest()
