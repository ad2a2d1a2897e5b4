"""The training configuration: one dataclass per TOML section, every key documented where it is declared.

A run is described by a TOML file (`sdxl train --config run.toml`) whose tables mirror the dataclasses below,
plus command-line flags for the common keys. Example:

    [model]
    init = "sd_xl_base_1.0.safetensors"

    [data]
    path = "my_images/"
    resolution = 1024

    [train]
    output = "runs/my-finetune"
    steps = 2000
    batch_size = 4

    [optim]
    lr = 1e-5

Every key's documentation lives in its field's `metadata["doc"]`; `reference_markdown()` renders the table
that docs/TRAINING.md carries, and a test checks the two agree. Unknown keys are an error (a typo must not
silently fall back to a default), and so are values of the wrong type.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


class ConfigError(ValueError):
    """A training configuration that cannot be used; the message names the key."""


class TrainingError(RuntimeError):
    """A run that cannot go on (bad data, NaN losses, an unusable checkpoint); the message says why."""


def _f(default: Any, doc: str, choices: tuple | None = None) -> Any:
    """A field with its documentation (and, for string options, the allowed values)."""
    md = {"doc": doc}
    if choices is not None:
        md["choices"] = choices
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=md)
    return field(default=default, metadata=md)


@dataclass
class ModelSection:
    """[model]: what network to train and where its starting weights come from."""

    init: str = _f("", "Checkpoint to start from: an official-layout single file or a diffusers folder "
                       "(anything `sdxl inspect` reads). Empty: train from scratch with `preset` or "
                       "`config`.")
    preset: str = _f("", "From-scratch architecture when `init` is empty: `tiny`, `tiny-refiner` (test "
                         "sizes), `base`, `refiner` (the official sizes).",
                         ("", "tiny", "tiny-refiner", "base", "refiner"))
    config: str = _f("", "From-scratch architecture from a JSON or TOML file holding a `ModelConfig` "
                         "dictionary (keys kind, unet, vae, text_l, text_g, prediction, ...). Wins over "
                         "`preset`.")
    vae: str = _f("", "Take the VAE from this checkpoint instead (e.g. one trained with "
                      "`task = \"vae\"`). Its config, including scale_factor, replaces the model's VAE "
                      "config.")
    prediction: str = _f("", "Override what the UNet predicts: `eps` or `v`. Empty: keep the model's own "
                             "(recorded in the output file's metadata).", ("", "eps", "v"))
    zero_terminal_snr: bool = _f(False, "Train on the noise schedule rescaled to zero terminal SNR (the "
                                        "last timestep is pure noise; Lin et al. 2024; kohya's "
                                        "`--zero_terminal_snr`); needs v-prediction. Recorded in the output "
                                        "file, so samplers use the same schedule. A model trained with it "
                                        "keeps it.")
    allow_pickle: bool = _f(False, "Allow a pickle `.ckpt` as `init` (loaded with "
                                   "torch.load(weights_only=True)).")


@dataclass
class DataSection:
    """[data]: the images, their buckets, augmentation and caching."""

    path: str = _f("", "Image folder with same-name .txt captions (kohya convention), a folder with a "
                       "metadata.jsonl, or a .jsonl manifest (path, caption, optional aesthetic_score, "
                       "original_size).")
    resolution: int = _f(1024, "Base side of the bucket area: buckets hold about resolution^2 pixels.")
    bucket_step: int = _f(64, "Bucket sides are multiples of this (64 for SDXL; 8 for small experiments).")
    min_bucket_side: int = _f(0, "Drop buckets with a side below this (0: keep all).")
    max_bucket_side: int = _f(0, "Drop buckets with a side above this (0: keep all).")
    min_size: int = _f(0, "Leave out images whose shorter ORIGINAL side is below this (the paper's filter; 0"
                          " keeps all).")
    upscale: bool = _f(True, "False: leave out images that would have to be enlarged to cover their bucket.")
    crop: str = _f("random", "`random` (the paper) or `center` crop to the bucket. Latent caching only pays "
                             "off across epochs with `center`.", ("random", "center"))
    flip_prob: float = _f(0.0, "Probability of a horizontal flip (the crop coordinate is mirrored).")
    ucg: float = _f(0.1, "Caption dropout probability: the sample gets the all-zero text context and pooled "
                         "vector, SDXL's null conditioning (the paper: 10%).")
    shuffle_caption: bool = _f(False, "Shuffle comma-separated caption tags (kohya `shuffle_caption`).")
    keep_tokens: int = _f(0, "With `shuffle_caption`: number of leading tags kept in place.")
    caption_separator: str = _f(",", "Tag separator for `shuffle_caption`.")
    caption_tag_dropout_rate: float = _f(0.0, "Drop each tag of the caption with this probability (kohya "
                                              "`caption_tag_dropout_rate`; seeded per image and epoch). "
                                              "Kept tags (`keep_tokens`, or the parts outside "
                                              "`keep_tokens_separator`) are never dropped.")
    keep_tokens_separator: str = _f("", "kohya `keep_tokens_separator`, e.g. \"|||\": in a caption holding "
                                        "it, the tags before it stay first and are never shuffled or "
                                        "dropped (instead of `keep_tokens`); a second occurrence marks tags "
                                        "kept at the end. Empty: off.")
    size_conditioning: bool = _f(True, "False records original size = target size (ablation: no size "
                                       "conditioning).")
    crop_conditioning: bool = _f(True, "False records crop = (0, 0) (ablation: no crop conditioning).")
    shuffle: bool = _f(True, "Shuffle the sample order every epoch (seeded). False: buckets in order.")
    drop_last: bool = _f(True, "Drop each bucket's last incomplete batch (and, with several processes, the "
                               "batches that do not divide evenly among them).")
    num_workers: int = _f(0, "DataLoader worker processes (0: load in the training process).")
    default_aesthetic_score: float = _f(6.0, "Aesthetic score for refiner samples whose manifest entry has "
                                             "none.")
    cache_latents: bool = _f(False, "Cache VAE latent moments on disk, keyed by the SHA-256 of the prepared "
                                    "pixels and of the VAE weights.")
    cache_text: bool = _f(False, "Cache text-encoder outputs on disk, keyed by the SHA-256 of the caption, "
                                 "of the encoder weights and the clip skip. Ignored when the text encoders "
                                 "train.")
    cache_dir: str = _f("", "Where caches live. Empty: `<output>/cache`.")

    def cache_folder(self, output: Path, kind: str) -> Path:
        """Where the `kind` cache ("latents", "text") of a run writing to `output` lives."""
        return (Path(self.cache_dir) if self.cache_dir else output / "cache") / kind


@dataclass
class TrainSection:
    """[train]: the loop."""

    task: str = _f("diffusion", "`diffusion` (UNet, optionally text encoders; full or LoRA) or `vae` "
                                "(autoencoder training, see [vae]).", ("diffusion", "vae"))
    output: str = _f("runs/train", "Output folder: model.safetensors or lora.safetensors, checkpoints/, "
                                   "samples/, log.jsonl, config.toml.")
    steps: int = _f(1000, "Optimizer steps to train for (the total, also when resuming).")
    stop_at: int = _f(0, "Save and stop after this step as if interrupted, to split a run into sessions (the"
                         " LR schedule still spans `steps`; resume with checkpoint.resume). 0: run to "
                         "`steps`.")
    batch_size: int = _f(1, "Images per micro-batch per process. The global batch is batch_size x grad_accum"
                            " x number of processes.")
    grad_accum: int = _f(1, "Micro-batches accumulated per optimizer step.")
    seed: int = _f(0, "Seed of the data order, augmentation, noise, timesteps and from-scratch weights.")
    device: str = _f("auto", "`auto` (cuda if available, else cpu), `cpu`, `cuda`, `cuda:1`, ...")
    mixed_precision: str = _f("no", "`no` (float32), `bf16` or `fp16` autocast; fp16 uses a GradScaler. "
                                    "Weights and optimizer state stay float32.", ("no", "bf16", "fp16"))
    gradient_checkpointing: bool = _f(False, "Recompute UNet blocks in the backward pass (less memory, ~30% "
                                             "slower).")
    max_grad_norm: float = _f(1.0, "Clip the global gradient norm to this (0: no clipping).")
    train_unet: bool = _f(True, "Train the UNet (False with `train_text_encoders` trains only the towers).")
    train_text_encoders: bool = _f(False, "Train both text towers jointly with the UNet, at `optim.text_lr`.")
    clip_skip: int = _f(1, "Text hidden state used as context, counted back from the last layer (1 = the "
                           "penultimate layer, SDXL's choice).")
    max_nan_steps: int = _f(5, "Stop with an error after this many CONSECUTIVE steps with a NaN/Inf loss or "
                               "gradient (each such step is skipped and counted).")
    log_every: int = _f(10, "Write a log line (loss, lr, images/s) every N steps.")
    tensorboard: str = _f("auto", "Scalars to TensorBoard in `<output>/tb` as well: `auto` (when the "
                                  "`tensorboard` package is installed), `on` (required: a configuration "
                                  "error without it), `off`.", ("auto", "on", "off"))
    progress: bool = _f(True, "Show a progress bar (loss, it/s, ETA) on the first process.")
    deterministic: bool = _f(False, "torch.use_deterministic_algorithms(True): bitwise repeatable runs on "
                                    "one machine, slower on GPUs.")
    save_dtype: str = _f("fp32", "dtype of the exported model.safetensors: `fp32`, `fp16` or `bf16`.",
                                 ("fp32", "fp16", "bf16"))


@dataclass
class LossSection:
    """[loss]: the diffusion objective."""

    timestep_min: int = _f(0, "Timesteps are drawn uniformly from [timestep_min, timestep_max).")
    timestep_max: int = _f(0, "Exclusive upper bound; 0 = automatic: 200 for a refiner (the paper's 200 "
                              "lowest noise levels), 1000 otherwise.")
    timestep_sampling: str = _f("uniform", "How t is drawn in [timestep_min, timestep_max): `uniform` "
                                           "(SDXL), or `logit_normal` (SD3; kohya's `--timestep_sampling "
                                           "logit_normal`): the fraction of the range is sigmoid(loc + scale "
                                           "* N(0, 1)), which trains the middle noise levels, where layouts "
                                           "and shapes are decided, more than the ends.",
                                ("uniform", "logit_normal"))
    timestep_loc: float = _f(0.0, "logit_normal: mean of the normal (0 = centred on the middle of the range; "
                                  "positive = noisier).")
    timestep_scale: float = _f(1.0, "logit_normal: standard deviation of the normal (SD3: 1).")
    offset_noise: float = _f(0.0, "Offset-noise level (the paper's 1024^2 stage: 0.05; keep 0 when fine-"
                                  "tuning a model trained without it).")
    offset_noise_mode: str = _f("channel", "`channel`: one offset per sample AND channel ([B,C,1,1], sgm "
                                           "HEAD); `sample`: one offset per sample shared by all channels "
                                           "([B,1,1,1], sgm at the SDXL release).", ("channel", "sample"))
    min_snr_gamma: float = _f(0.0, "Min-SNR-gamma loss weighting (Hang et al. 2023); 5 is the usual value; 0"
                                   " off.")
    min_snr_floor: float = _f(0.0, "With min_snr_gamma: also clamp the SNR from below, so the weight of the "
                                   "x0 error is clamp(SNR, floor, gamma) instead of min(SNR, gamma). Plain "
                                   "min-SNR gives the noisiest steps a weight of about SNR (below 0.06 "
                                   "for t >= 700, 0 at t = 999 under zero terminal SNR), so the steps that "
                                   "decide a picture's layout are barely trained; 1 gives them the weight "
                                   "of plain x0 loss. 0 off.")
    latent_sample: bool = _f(True, "Sample latents from the VAE posterior (sgm) instead of using its mean.")
    masked: bool = _f(False, "Weight the loss by a per-image mask (kohya's `masked_loss`): `NAME.mask.png` "
                             "beside `NAME.png` (or a \"mask\" path in metadata.jsonl), greyscale, white = "
                             "full weight, area-averaged to the latent grid; each sample's loss is the "
                             "mask-weighted mean. Images without a mask get weight 1 everywhere.")
    mask_floor: float = _f(0.0, "With `masked`: the weight of a black mask pixel, so the weight is floor + "
                                "(1 - floor) * mask. 0 = kohya (unmasked pixels do not train); e.g. 0.2 "
                                "trains the whole image and the masked part 5x as much.")
    multires_noise_iterations: int = _f(0, "Multi-resolution (pyramid) noise, kohya's "
                                           "`multires_noise_iterations` (6-10 usual; 0 off): level i adds "
                                           "noise drawn at 1/r^i of the latent size (r uniform in [2, 4)), "
                                           "bilinearly upsampled and scaled by discount^i, then each "
                                           "sample's noise is divided by its standard deviation.")
    multires_noise_discount: float = _f(0.3, "Discount per pyramid level (kohya's "
                                             "`multires_noise_discount`).")
    debiased_estimation: bool = _f(False, "Debiased estimation loss (kohya's `debiased_estimation_loss`): "
                                          "weight 1 / sqrt(SNR) (eps) or 1 / (SNR + 1) (v), with the SNR "
                                          "capped at 1000. Multiplies with min-SNR-gamma if both are on.")


@dataclass
class OptimSection:
    """[optim]: optimizer and learning-rate schedule."""

    name: str = _f("adamw", "`adamw` (torch.optim.AdamW), `adafactor` (torch.optim.Adafactor), `adamw8bit` "
                            "(bitsandbytes' 8-bit AdamW; needs that package), `prodigy` (the prodigyopt "
                            "package; it finds the step size itself: set `lr` = 1, and every group must "
                            "share that lr or use 0).",
                            ("adamw", "adafactor", "adamw8bit", "prodigy"))
    lr: float = _f(0.0001, "Peak learning rate of the UNet (or LoRA) parameters.")
    text_lr: float = _f(0.0, "Learning rate of the text towers (0: same as `lr`).")
    lr_text_l: float = _f(0.0, "Learning rate of the CLIP-L tower or its adapters (kohya's "
                               "`learning_rate_te1`; 0: `text_lr`).")
    lr_text_g: float = _f(0.0, "Learning rate of the bigG tower or its adapters (kohya's "
                               "`learning_rate_te2`; 0: `text_lr`).")
    block_lr: list = _f([], "Block-wise UNet learning rates (kohya's `block_lr`): 23 numbers for time and "
                            "label embeddings, input_blocks 0-8, middle_block 0-2, output_blocks 0-8 and the "
                            "output layer, in that order; 0 leaves a block unchanged. Empty: `lr` for all.")
    prodigy_d_coef: float = _f(1.0, "Prodigy: multiplier of the estimated step size (d_coef).")
    prodigy_use_bias_correction: bool = _f(False, "Prodigy: Adam's bias correction (use_bias_correction).")
    prodigy_safeguard_warmup: bool = _f(False, "Prodigy: leave lr out of the D estimate's denominator "
                                               "during warm-up (safeguard_warmup).")
    betas: list = _f([0.9, 0.999], "Adam betas.")
    weight_decay: float = _f(0.01, "Decoupled weight decay.")
    eps: float = _f(1e-08, "Adam epsilon.")
    warmup_steps: int = _f(0, "Linear warm-up from 0 to the peak over this many steps.")
    schedule: str = _f("constant", "After warm-up: `constant`, `cosine` or `linear` decay to min_lr_ratio x "
                                   "lr.", ("constant", "cosine", "linear"))
    min_lr_ratio: float = _f(0.0, "Final learning rate of the cosine/linear schedules, as a fraction of the "
                                  "peak.")


@dataclass
class EMASection:
    """[ema]: exponential moving average of the trained weights."""

    enabled: bool = _f(False, "Keep an EMA of the trained parameters (float32 copy).")
    decay: float = _f(0.9999, "EMA decay; the effective decay is min(decay, (1 + n) / (10 + n)) after n "
                              "updates (sgm LitEma / diffusers EMAModel).")
    start_step: int = _f(0, "The average starts (as a copy of the weights) after this optimizer step.")
    export: bool = _f(True, "Write the EMA weights (not the raw ones) into model.safetensors / "
                            "lora.safetensors.")


@dataclass
class LoRASection:
    """[lora]: low-rank adapters instead of a full fine-tune."""

    rank: int = _f(0, "LoRA rank; 0 trains the full weights.")
    alpha: float = _f(0.0, "LoRA alpha; the update is scaled by alpha / rank (0: alpha = rank).")
    dropout: float = _f(0.0, "Dropout on the LoRA branch input during training.")
    conv: bool = _f(False, "Also adapt the UNet's 3x3 convolutions (LoCon), at `conv_rank` / `conv_alpha`.")
    conv_rank: int = _f(0, "Rank of the 3x3-conv adapters (0: `rank`).")
    conv_alpha: float = _f(0.0, "Alpha of the 3x3-conv adapters (0: conv rank).")
    text_encoders: bool = _f(False, "Also put adapters on both text towers (trained at `optim.text_lr`).")
    algo: str = _f("lora", "Adapter kind: `lora` (kohya LoRA / LoCon) or `lokr` (LyCORIS LoKr: a Kronecker "
                           "product of `lokr_w1` and `lokr_w2`, the latter split as `lokr_w2_a @ lokr_w2_b` "
                           "when rank < half its larger side; saved under LyCORIS' kohya key names).",
                   ("lora", "lokr"))
    factor: int = _f(-1, "LoKr: split each layer side as factor x (side / factor) when `factor` divides it; "
                         "-1: the most balanced split (LyCORIS' `factor`).")
    dora: bool = _f(False, "DoRA (weight-decomposed LoRA, LyCORIS `dora_wd`): also train one magnitude per "
                           "output channel, initialised to the base weight's row norms and saved as kohya "
                           "`dora_scale` [out, 1(, 1, 1)]. Needs `algo = \"lora\"`.")
    loraplus_lr_ratio: float = _f(0.0, "LoRA+ (kohya `loraplus_lr_ratio`): the `lora_up` (B) matrices, and "
                                       "LoKr's zero-initialised `lokr_w2` / `lokr_w2_b`, train at lr x this "
                                       "ratio in their own parameter groups (16 is the paper's value). 0: "
                                       "off.")
    loraplus_unet_lr_ratio: float = _f(0.0, "LoRA+ ratio of the UNet adapters (0: `loraplus_lr_ratio`).")
    loraplus_text_encoder_lr_ratio: float = _f(0.0, "LoRA+ ratio of the text-tower adapters (0: "
                                                    "`loraplus_lr_ratio`).")


@dataclass
class CheckpointSection:
    """[checkpoint]: training state that survives crashes and signals."""

    every: int = _f(500, "Save the training state every N optimizer steps (0: only at the end and on a "
                         "signal).")
    keep: int = _f(2, "Complete checkpoints kept; older ones are deleted after a newer one is committed.")
    resume: bool = _f(False, "Continue from the newest complete checkpoint in `<output>/checkpoints` (the "
                             "`--resume` flag). Starts fresh if there is none.")


@dataclass
class SampleSection:
    """[sample]: images generated from the current weights during training."""

    every: int = _f(0, "Generate sample images every N steps (0: never) into `<output>/samples`.")
    prompts: list = _f([], "Prompts, one image each.")
    negative_prompt: str = _f("", "Negative prompt (empty: the base model's zero embedding).")
    steps: int = _f(20, "Sampler steps.")
    cfg: float = _f(5.0, "Classifier-free guidance scale.")
    sampler: str = _f("euler", "Sampler name (see `sdxl generate --help`).")
    schedule: str = _f("normal", "Sigma schedule name.")
    width: int = _f(0, "Sample width (0: data.resolution).")
    height: int = _f(0, "Sample height (0: data.resolution).")
    seed: int = _f(0, "Seed of the first prompt; prompt k uses seed + k.")


@dataclass
class ValidationSection:
    """[validation]: a loss on held-out images at fixed timesteps and noise."""

    path: str = _f("", "Folder (or .jsonl manifest) of validation images with captions, never trained on.")
    fraction: float = _f(0.0, "Instead of `path`: hold out this fraction of data.path (chosen with "
                              "train.seed) from training and validate on it.")
    every: int = _f(0, "Compute the validation loss every N optimizer steps (0: never); logged as "
                       "`val_loss` (and `val_loss_t<T>` per timestep) to log.jsonl, TensorBoard and the "
                       "console.")
    timesteps: list = _f([100, 300, 500, 700, 900], "The timesteps each image is noised to; the loss is the "
                                                    "mean over images and timesteps.")
    seed: int = _f(0, "Seed of the fixed noise (one draw per image and timestep, the same every time).")
    shapes_n: int = _f(0, "Shapes models: at every `validation.every` steps also generate this many "
                          "held-out prompts per list in `shapes_lists` (with the [sample] steps, cfg, "
                          "sampler, schedule, at data.resolution) and score them with the detector; logged "
                          "as "
                          "`eval_<list>_<metric>` with `_lo` / `_hi` Wilson 95% bounds. 0: off. A small "
                          "sample to watch a stage; its gate is checked with `sdxl eval shapes --n 100`.")
    shapes_lists: list = _f(["single", "pair"], "Prompt lists of `shapes_n` (single, pair, single_novel, "
                                                "pair_novel).")
    shapes_level: str = _f("", "Draw the `shapes_n` prompts from this curriculum level (easy, mid, multi, "
                               "vae; empty: the shipped model's lists).")


@dataclass
class DistSection:
    """[dist]: several processes (launched with torchrun)."""

    strategy: str = _f("ddp", "`ddp`: DistributedDataParallel (replicated weights); `fsdp`: fully sharded "
                              "(torch.distributed.fsdp.fully_shard) for full fine-tunes too big for one GPU.",
                              ("ddp", "fsdp"))
    backend: str = _f("auto", "Process-group backend: `auto` (nccl on GPUs, gloo on CPU), `nccl`, `gloo`.",
                              ("auto", "nccl", "gloo"))
    timeout: float = _f(1800.0, "Seconds a collective waits for the other processes before this one stops "
                                "with an error, so a hung process never blocks the others for ever (torch's "
                                "default; it must outlast rank 0 writing a checkpoint).")


@dataclass
class VAESection:
    """[vae]: autoencoder training (`train.task = "vae"`)."""

    reconstruction: str = _f("l1", "Pixel reconstruction loss: `l1` or `l2`.", ("l1", "l2"))
    edge_weight: float = _f(0.0, "Edge-weighted reconstruction: each pixel's error counts 1 + edge_weight x "
                                 "the target's Sobel edge strength (0..1, 1 at a full black-white step), "
                                 "normalised by the mean weight, so object outlines (where shapes differ) "
                                 "weigh up to 1 + edge_weight times the flat areas. 0: off.")
    kl_weight: float = _f(1e-06, "Weight of the KL term (sgm's SDXL autoencoder config: 1e-6).")
    patch_size: int = _f(0, "Train on one random square patch of this side per image, cut from the image at "
                            "its bucket size (sgm trains its autoencoder on 256 px crops). A multiple of the "
                            "VAE's downscale factor; 0: whole images.")
    gan: bool = _f(False, "Add a PatchGAN discriminator (hinge loss) after `gan_start` steps.")
    gan_start: int = _f(1000, "Step from which the discriminator trains and its loss enters the generator "
                              "loss.")
    gan_weight: float = _f(0.5, "Weight of the generator's adversarial loss.")
    disc_lr: float = _f(0.0, "Discriminator learning rate (0: optim.lr).")
    disc_channels: int = _f(64, "Width of the discriminator's first layer.")
    disc_layers: int = _f(3, "Strided conv layers of the discriminator.")
    update_scale_factor: bool = _f(True, "At export, set the latent scale_factor to 1 / std of the latents "
                                         "of a few training batches (how SD chose 0.18215).")
    decoder_only: bool = _f(False, "Train only the decoder (and post_quant_conv) on the frozen encoder's "
                                   "latents of whole images (with `patch_size`, a random patch of them is "
                                   "decoded): the latent space stays, so diffusion models trained on it keep "
                                   "working with the new decoder (how SD's ft-MSE / ft-EMA decoders were "
                                   "made). The scale_factor is kept.")
    decoder_ch_mult: list = _f([], "With `decoder_only`: a new decoder of these width multipliers of the "
                                   "VAE's `ch` (one per level, e.g. [1, 2, 4, 4], SDXL's), trained from its "
                                   "initialisation on the kept encoder when the loaded one has other "
                                   "widths. Empty: train the loaded decoder.")


SECTIONS: dict[str, type] = {
    "model": ModelSection,
    "data": DataSection,
    "train": TrainSection,
    "loss": LossSection,
    "optim": OptimSection,
    "ema": EMASection,
    "lora": LoRASection,
    "checkpoint": CheckpointSection,
    "sample": SampleSection,
    "validation": ValidationSection,
    "dist": DistSection,
    "vae": VAESection,
}


@dataclass
class TrainConfig:
    """A whole training run: one attribute per TOML table."""

    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    loss: LossSection = field(default_factory=LossSection)
    optim: OptimSection = field(default_factory=OptimSection)
    ema: EMASection = field(default_factory=EMASection)
    lora: LoRASection = field(default_factory=LoRASection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    sample: SampleSection = field(default_factory=SampleSection)
    validation: ValidationSection = field(default_factory=ValidationSection)
    dist: DistSection = field(default_factory=DistSection)
    vae: VAESection = field(default_factory=VAESection)

    # ------------------------------------------------------------------ building
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Build from nested dicts ({"train": {"steps": 10}, ...}); unknown tables/keys raise ConfigError."""
        cfg = cls()
        for section, values in d.items():
            if section not in SECTIONS:
                raise ConfigError(f"unknown table [{section}] (known: {', '.join(SECTIONS)})")
            if not isinstance(values, dict):
                raise ConfigError(f"[{section}] must be a table")
            for key, value in values.items():
                cfg.set(f"{section}.{key}", value)
        cfg.validate()
        return cfg

    @classmethod
    def load(cls, path: str | Path) -> TrainConfig:
        path = Path(path)
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such config file") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: not valid TOML ({e})") from None
        return cls.from_dict(data)

    def set(self, dotted: str, value: Any) -> None:
        """Set `section.key` with type checking (ints are accepted for floats; lists stay lists)."""
        if "." not in dotted:
            raise ConfigError(f"config keys are `table.key`, got {dotted!r}")
        section, key = dotted.split(".", 1)
        if section not in SECTIONS:
            raise ConfigError(f"unknown table [{section}] in {dotted!r}")
        obj = getattr(self, section)
        fields = {f.name: f for f in dataclasses.fields(obj)}
        if key not in fields:
            raise ConfigError(f"unknown key {dotted!r} (known in [{section}]: {', '.join(fields)})")
        expected = get_type_hints(type(obj))[key]
        setattr(obj, key, _coerce(dotted, value, expected))

    def _validate_adapters_and_tags(self) -> None:
        """LoRA+ ratios, DoRA / LoKr options and the tag-caption keys."""
        lc, d = self.lora, self.data
        for key in ("loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio"):
            if not getattr(lc, key) >= 0:
                raise ConfigError(f"lora.{key} must be >= 0 (0: off), got {getattr(lc, key)}")
        if lc.factor == 0 or lc.factor < -1:
            raise ConfigError(f"lora.factor must be -1 (balanced) or a positive integer, got {lc.factor}")
        if lc.dora and lc.algo != "lora":
            raise ConfigError(f"lora.dora needs lora.algo = \"lora\", got {lc.algo!r}")
        if not 0.0 <= d.caption_tag_dropout_rate <= 1.0:
            raise ConfigError(f"data.caption_tag_dropout_rate must be in [0, 1], got "
                              f"{d.caption_tag_dropout_rate}")
        if d.keep_tokens < 0:
            raise ConfigError(f"data.keep_tokens must be >= 0, got {d.keep_tokens}")
        if not d.caption_separator:
            raise ConfigError("data.caption_separator must not be empty")
        sep = d.keep_tokens_separator
        if sep and (sep.strip() == "" or sep in d.caption_separator or d.caption_separator in sep):
            raise ConfigError(f"data.keep_tokens_separator = {sep!r} must be visible text that neither holds "
                              f"nor is part of data.caption_separator {d.caption_separator!r}")

    def validate(self) -> None:
        """Check choices and ranges; raises ConfigError naming the key."""
        for section in SECTIONS:
            obj = getattr(self, section)
            for f in dataclasses.fields(obj):
                choices = f.metadata.get("choices")
                value = getattr(obj, f.name)
                if choices is not None and value not in choices:
                    raise ConfigError(f"{section}.{f.name} = {value!r}: must be one of {list(choices)}")
        t, lo = self.train, self.loss
        for key, value in (("train.steps", t.steps), ("train.batch_size", t.batch_size),
                           ("train.grad_accum", t.grad_accum), ("data.resolution", self.data.resolution),
                           ("data.bucket_step", self.data.bucket_step), ("train.log_every", t.log_every),
                           ("train.max_nan_steps", t.max_nan_steps)):
            if value <= 0:
                raise ConfigError(f"{key} must be positive, got {value}")
        if lo.timestep_scale <= 0:
            raise ConfigError(f"loss.timestep_scale = {lo.timestep_scale} must be > 0")
        if lo.min_snr_floor < 0 or (lo.min_snr_floor > 0 and lo.min_snr_floor > lo.min_snr_gamma):
            raise ConfigError(f"loss.min_snr_floor = {lo.min_snr_floor} must lie in [0, loss.min_snr_gamma = "
                              f"{lo.min_snr_gamma}]")
        if not 0.0 <= lo.mask_floor <= 1.0:
            raise ConfigError(f"loss.mask_floor must be in [0, 1], got {lo.mask_floor}")
        if not 0 <= lo.timestep_min < (lo.timestep_max or 1000) <= 1000:
            raise ConfigError(f"loss.timestep_min/max must satisfy 0 <= min < max <= 1000, got "
                              f"[{lo.timestep_min}, {lo.timestep_max})")
        if not 0.0 <= self.data.ucg <= 1.0:
            raise ConfigError(f"data.ucg must be in [0, 1], got {self.data.ucg}")
        if len(self.optim.betas) != 2:
            raise ConfigError(f"optim.betas needs two numbers, got {self.optim.betas}")
        if self.lora.rank < 0:
            raise ConfigError("lora.rank must be >= 0")
        self._validate_adapters_and_tags()
        if self.vae.patch_size < 0 or self.vae.patch_size % 8:
            raise ConfigError(
                f"vae.patch_size must be 0 or a positive multiple of 8, got {self.vae.patch_size}")
        if self.vae.edge_weight < 0:
            raise ConfigError(f"vae.edge_weight must be >= 0, got {self.vae.edge_weight}")
        if not 0.0 <= self.ema.decay < 1.0:
            raise ConfigError(f"ema.decay must be in [0, 1), got {self.ema.decay}")
        if not self.dist.timeout > 0:
            raise ConfigError(f"dist.timeout must be > 0 seconds, got {self.dist.timeout}")
        self._validate_options()

    def _validate_options(self) -> None:
        """Learning rates, Prodigy, pyramid noise and validation keys."""
        o, lo, v = self.optim, self.loss, self.validation
        for key in ("lr", "text_lr", "lr_text_l", "lr_text_g"):
            if not getattr(o, key) >= 0:
                raise ConfigError(f"optim.{key} must be >= 0, got {getattr(o, key)}")
        if o.block_lr:
            if len(o.block_lr) != 23:
                raise ConfigError(f"optim.block_lr needs 23 values (embeddings, input_blocks 0-8, "
                                  f"middle_block 0-2, output_blocks 0-8, out), got {len(o.block_lr)}")
            for i, x in enumerate(o.block_lr):
                if isinstance(x, bool) or not isinstance(x, (int, float)) or not x >= 0:
                    raise ConfigError(f"optim.block_lr[{i}] = {x!r}: must be a number >= 0")
            o.block_lr = [float(x) for x in o.block_lr]
        if not o.prodigy_d_coef > 0:
            raise ConfigError(f"optim.prodigy_d_coef must be > 0, got {o.prodigy_d_coef}")
        if lo.multires_noise_iterations < 0:
            raise ConfigError(f"loss.multires_noise_iterations must be >= 0, got "
                              f"{lo.multires_noise_iterations}")
        if not lo.multires_noise_discount > 0:
            raise ConfigError(f"loss.multires_noise_discount must be > 0, got {lo.multires_noise_discount}")
        if not 0.0 <= v.fraction < 1.0:
            raise ConfigError(f"validation.fraction must be in [0, 1), got {v.fraction}")
        if v.path and v.fraction:
            raise ConfigError("validation.path and validation.fraction are exclusive: give one")
        if v.every < 0:
            raise ConfigError(f"validation.every must be >= 0, got {v.every}")
        if (v.every or v.path or v.fraction) and self.train.task != "diffusion":
            raise ConfigError("[validation] is for train.task = \"diffusion\"")
        if v.every and not (v.path or v.fraction or v.shapes_n):
            raise ConfigError("validation.every needs validation.path, validation.fraction or "
                              "validation.shapes_n")
        if v.shapes_n < 0 or (v.shapes_n and self.train.task != "diffusion"):
            raise ConfigError(f"validation.shapes_n must be >= 0 (diffusion runs only), got {v.shapes_n}")
        if bad := [x for x in v.shapes_lists if x not in ("single", "pair", "single_novel", "pair_novel")]:
            raise ConfigError(f"validation.shapes_lists: unknown list {bad[0]!r}")
        if v.shapes_n and v.shapes_level:
            from ..data.shapes import make_level  # lazy: numpy and the renderer, only when the key is set

            try:
                make_level(v.shapes_level)
            except ValueError as e:
                raise ConfigError(f"validation.shapes_level: {e}") from None
        if not v.timesteps:
            raise ConfigError("validation.timesteps is empty")
        for x in v.timesteps:
            if isinstance(x, bool) or not isinstance(x, int) or not 0 <= x < 1000:
                raise ConfigError(f"validation.timesteps: {x!r} is not an integer in [0, 1000)")

    # ------------------------------------------------------------------ output
    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}

    def to_toml(self) -> str:
        """The config as TOML (what `load` reads back); written to `<output>/config.toml` by every run."""
        lines = []
        for section, values in self.to_dict().items():
            lines.append(f"[{section}]")
            for key, value in values.items():
                lines.append(f"{key} = {_toml_value(value)}")
            lines.append("")
        return "\n".join(lines)


def _coerce(key: str, value: Any, expected: Any) -> Any:
    """Check `value` against the annotated type (the annotations are strings: 'int', 'float', ...)."""
    name = expected if isinstance(expected, str) else getattr(expected, "__name__", str(expected))
    if name == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
    elif name == "int":
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
    elif name == "float":
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif name == "str":
        if isinstance(value, str):
            return value
        if isinstance(value, Path):
            return str(value)
    elif name == "list":
        if isinstance(value, (list, tuple)):
            return list(value)
        if isinstance(value, str):  # command line: a JSON list, or one item
            try:
                parsed = json.loads(value)
            except json.JSONDecodeError:
                parsed = [value]
            return parsed if isinstance(parsed, list) else [parsed]
    raise ConfigError(f"{key}: expected {name}, got {value!r}")


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a valid TOML basic string
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {v!r} as TOML")


# Command-line flags of `sdxl train` and the keys they set (flags override the TOML file).
CLI_FLAGS: dict[str, str] = {
    "data": "data.path",
    "init": "model.init",
    "preset": "model.preset",
    "output": "train.output",
    "steps": "train.steps",
    "batch_size": "train.batch_size",
    "grad_accum": "train.grad_accum",
    "resolution": "data.resolution",
    "lr": "optim.lr",
    "lora_rank": "lora.rank",
    "seed": "train.seed",
    "mixed_precision": "train.mixed_precision",
    "device": "train.device",
    "resume": "checkpoint.resume",
    "save_every": "checkpoint.every",
    "task": "train.task",
}


def build_config(options: dict[str, Any]) -> TrainConfig:
    """A TrainConfig from command-line style options.

    `options["config"]` (optional) is a TOML file; the other keys are `CLI_FLAGS` names or dotted keys
    (`"loss.offset_noise"`), applied on top. None values are ignored (flags that were not given).
    """
    options = dict(options)
    path = options.pop("config", None)
    cfg = TrainConfig.load(path) if path else TrainConfig()
    for name, value in options.items():
        if value is None:
            continue
        key = CLI_FLAGS.get(name, name)
        if name == "resume" and value is False:
            continue  # an absent --resume flag must not undo `resume = true` in the file
        cfg.set(key, value)
    cfg.validate()
    return cfg


def reference_markdown() -> str:
    """The key reference table of docs/TRAINING.md, generated from the field docs."""
    out = []
    for section, klass in SECTIONS.items():
        out.append(f"### [{section}]\n")
        desc = (klass.__doc__ or "").split(":", 1)[-1].strip()
        out.append(desc[:1].upper() + desc[1:] + "\n")
        out.append("| key | default | meaning |")
        out.append("|---|---|---|")
        for f in dataclasses.fields(klass):
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            doc = f.metadata["doc"].replace("|", "\\|")
            out.append(f"| `{f.name}` | `{_toml_value(default)}` | {doc} |")
        out.append("")
    return "\n".join(out)
