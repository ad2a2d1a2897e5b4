"""Reference pipelines: diffusers/transformers built from one of our official-layout files.

This is what `StableDiffusionXLPipeline.from_single_file` does, minus the hub download of configs: the
weights go through diffusers' OWN single-file converters (so a naming mistake on our side would show up
as a load failure or a mismatch), the configs are derived from our `ModelConfig`.
"""

from __future__ import annotations

from pathlib import Path

import torch


def _strip(sd: dict, prefix: str) -> dict:
    return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}


def diffusers_components(path: str | Path, tok_dir: Path):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
    )
    from safetensors.torch import load_file
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from sdxl.tokenizer import write_hf_tokenizer_files
    from sdxl.weights.checkpoint import read_checkpoint, text_config_to_hf
    from sdxl.weights.diffusers_layout import unet_diffusers_config, vae_diffusers_config

    cfg = read_checkpoint(path).config
    sd = load_file(str(path))
    ucfg = unet_diffusers_config(cfg.unet)
    unet = UNet2DConditionModel.from_config(ucfg)
    unet.load_state_dict(convert_ldm_unet_checkpoint(sd, ucfg), strict=True)
    vcfg = vae_diffusers_config(cfg.vae)
    vae = AutoencoderKL.from_config(vcfg)
    vae.load_state_dict(convert_ldm_vae_checkpoint(sd, vcfg), strict=True)
    out = {"unet": unet.eval(), "vae": vae.eval(), "config": cfg}
    if cfg.text_l is not None:
        te = CLIPTextModel(CLIPTextConfig(**text_config_to_hf(cfg.text_l, False)))
        sd_l = _strip(sd, "conditioner.embedders.0.transformer.")
        if not any(k.startswith("text_model.") for k in te.state_dict()):  # transformers 5 drops the prefix
            sd_l = {k.removeprefix("text_model."): v for k, v in sd_l.items()}
        missing, unexpected = te.load_state_dict(sd_l, strict=False)
        assert not [k for k in missing + unexpected if "position_ids" not in k], (missing, unexpected)
        out["text_encoder"] = te.eval()
        write_hf_tokenizer_files(tok_dir / "tokenizer", pad="<|endoftext|>")
        out["tokenizer"] = CLIPTokenizer.from_pretrained(tok_dir / "tokenizer")
    prefix = "conditioner.embedders.1.model." if cfg.text_l is not None else "conditioner.embedders.0.model."
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(**text_config_to_hf(cfg.text_g, True)))
    missing, unexpected = te2.load_state_dict(
        convert_open_clip_checkpoint(te2, sd, prefix=prefix), strict=False
    )
    assert not [k for k in missing if "position_ids" not in k], missing
    out["text_encoder_2"] = te2.eval()
    write_hf_tokenizer_files(tok_dir / "tokenizer_2", pad="!")
    out["tokenizer_2"] = CLIPTokenizer.from_pretrained(tok_dir / "tokenizer_2")
    return out


def euler_scheduler():
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        steps_offset=1,
        timestep_spacing="leading",
        prediction_type="epsilon",
    )


def dpmpp_2m_karras_scheduler():
    """diffusers' DPM-Solver++ 2M with Karras sigmas, configured as our dpmpp_2m + karras."""
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        steps_offset=1,
        use_karras_sigmas=True,
        algorithm_type="dpmsolver++",
        solver_order=2,
        final_sigmas_type="zero",
        lower_order_final=True,
        euler_at_final=False,
    )


def diffusers_base_pipeline(path, tok_dir: Path, scheduler=None, cls=None):
    """A stock diffusers SDXL pipeline (`cls`, default StableDiffusionXLPipeline) on our file's weights."""
    from diffusers import StableDiffusionXLPipeline

    c = diffusers_components(path, tok_dir)
    return (cls or StableDiffusionXLPipeline)(
        vae=c["vae"],
        text_encoder=c["text_encoder"],
        text_encoder_2=c["text_encoder_2"],
        tokenizer=c["tokenizer"],
        tokenizer_2=c["tokenizer_2"],
        unet=c["unet"],
        scheduler=scheduler or euler_scheduler(),
        add_watermarker=False,
    )


def diffusers_refiner_pipeline(path, tok_dir: Path, scheduler=None):
    from diffusers import StableDiffusionXLImg2ImgPipeline

    c = diffusers_components(path, tok_dir)
    return StableDiffusionXLImg2ImgPipeline(
        vae=c["vae"],
        text_encoder=None,
        text_encoder_2=c["text_encoder_2"],
        tokenizer=None,
        tokenizer_2=c["tokenizer_2"],
        unet=c["unet"],
        scheduler=scheduler or euler_scheduler(),
        requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=False,
        add_watermarker=False,
    )


def psnr(a, b) -> float:
    import numpy as np

    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    mse = ((a - b) ** 2).mean()
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def to_uint8(images) -> np.ndarray:  # noqa: F821
    import numpy as np

    if isinstance(images, torch.Tensor):
        images = images.permute(0, 2, 3, 1).numpy()
    return (np.clip(images, 0, 1) * 255).round().astype(np.uint8)


def randomize(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Give EVERY parameter random values, the zero-initialised output layers included: matrices std
    1/sqrt(fan_in) (activations stay O(1) through the depth), norm weights 1 + 0.1 N(0, 1), biases
    0.05 N(0, 1), so outputs are far from trivial and every tensor influences them (parity tests)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * p[0].numel() ** -0.5)
            elif name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return module
