"""LoRA: read the common SDXL LoRA files, apply them exactly, and train / save kohya-format LoRAs.

A LoRA stores, for some Linear / Conv2d layers of the UNet and the text towers, a low-rank update

    W' = W + multiplier * scale * up @ down          scale = alpha / rank

(`down` is [rank, in], `up` is [out, rank]; for a k x k convolution `down` is a k x k conv to `rank`
channels and `up` a 1x1 conv, and LyCORIS' "Tucker" variant puts a k x k `mid` conv between two 1x1s).
The files differ only in how they name the layer and the three tensors:

    kohya / A1111     lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight,
                      .lora_up.weight, .alpha; the UNet part also appears with diffusers names
                      (lora_unet_down_blocks_1_attentions_0_...); text: lora_te1_text_model_encoder_...
                      and lora_te2_... (lora_te_ = SD1's single encoder, mapped to CLIP-L as diffusers does)
    diffusers / PEFT  unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight / lora_B,
                      text_encoder.(text_model.)encoder..., text_encoder_2...; alpha from the
                      `lora_adapter_metadata` JSON in the file header (lora_alpha, alpha_pattern,
                      use_rslora), else alpha = rank (scale 1)
    old diffusers     unet.down_blocks...attn1.processor.to_q_lora.down.weight, ...to_q.lora.down.weight,
                      text_encoder...mlp.fc1.lora_linear_layer.down.weight
    ComfyUI           diffusion_model.input_blocks.4.1...lora_down.weight (sgm names with dots)

Reading (`load_lora`) only sorts the file's keys into per-layer `LoraModule`s. Matching them to our
modules happens in `apply`, against the real models: every Linear / Conv2d gets its sgm name, the diffusers
name (through `sdxl.weights.diffusers_layout`, the one sgm <-> diffusers table of the project) and the
HF text names, each with dots and with underscores. Whatever does not match (unknown layer, wrong shape,
OFT / IA3 / GLoRA, a part the model lacks) is listed in a `LoraReport`, key by key, with the reason.

LyCORIS files (kohya `lora_unet_` / `lora_te1_` / `lora_te2_` names, or `lycoris_` + diffusers UNet names)
are applied too: LoHa dW = (w1a @ w1b) * (w2a @ w2b) * alpha / rank (Tucker conv: t x wa x wb per
factor), LoKr dW = kron(w1 or w1a @ w1b, w2 or w2a @ w2b) * scale (alpha / rank when a factor is
decomposed, else 1), and DoRA on any of them (`dora_scale`, PEFT's `lora_magnitude_vector`):
W' = m * (W + dW) / ||W + dW||, blended as W + multiplier * (W' - W). Factors that cannot form an update
are a one-line `CheckpointError` naming the key, raised when the file is read.

`apply` adds the update with forward hooks: the stored weights are never touched, a weight of 0 registers
nothing (bit-identical outputs), several LoRAs on one layer add up. `LoraPatch.fuse()` bakes the updates
into the weights for speed and keeps a copy of the originals, so `unfuse()` restores them bit for bit.

Training: `inject_lora` hangs trainable `LoRALayer`s (zero-initialised `lora_up`, so the model starts
unchanged) on the kohya default targets (with a trained DoRA magnitude, `dora=True`, or as `LoKrLayer`s,
`algo="lokr"`), and `save_kohya` writes them under kohya names with the `ss_*`
metadata A1111 / ComfyUI / kohya tools read.

Modules: `read` (files -> LoraModules), `patch` (matching, hooks, fuse / unfuse: inference), `train`
(LoRALayer, inject_lora, kohya save / load: training).
"""

from .patch import LoraPatch, LoraReport, LoraSet, MatchedLayer, apply, lora_models, match_lora
from .read import PARTS, Lora, LoraError, LoraModule, load_lora
from .train import (
    LoKrLayer,
    LoRALayer,
    inject_lora,
    kohya_name,
    kohya_state_dict,
    load_lora_layers,
    save_kohya,
)

__all__ = [
    "PARTS",
    "Lora",
    "LoraError",
    "LoraModule",
    "LoraPatch",
    "LoraReport",
    "LoraSet",
    "LoKrLayer",
    "LoRALayer",
    "MatchedLayer",
    "apply",
    "inject_lora",
    "kohya_name",
    "kohya_state_dict",
    "load_lora",
    "load_lora_layers",
    "lora_models",
    "match_lora",
    "save_kohya",
]
