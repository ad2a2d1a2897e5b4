"""Fine-tune only the VAE decoder on the encoder's posterior means (the encoder, hence the latent space the
UNet is trained in, stays frozen; the same idea as the ft-MSE decoders released for SD 1.x).

    python scripts/finetune_vae_decoder.py VAE_IN.safetensors DATA_DIR VAE_OUT.safetensors [--steps N]

Used for the shipped miniature: the VAE is first trained end to end (sdxl train --task vae), then its decoder
is sharpened here while the UNet trains on the frozen encoder's latents.
"""

from __future__ import annotations

import argparse
import math
import random

import torch

from sdxl.data.buckets import BucketBatchSampler
from sdxl.data.dataset import ImageCaptionDataset, collate
from sdxl.models.vae import AutoencoderKL
from sdxl.weights.checkpoint import Checkpoint, build_module, read_checkpoint, write_single_file


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("vae_in")
    ap.add_argument("data")
    ap.add_argument("vae_out")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    torch.manual_seed(a.seed)
    random.seed(a.seed)
    ck = read_checkpoint(a.vae_in)
    vae = build_module(AutoencoderKL, ck.config.vae, ck.parts["vae"], "cpu", torch.float32, a.vae_in)
    vae.requires_grad_(False)
    vae.decoder.requires_grad_(True)
    vae.post_quant_conv.requires_grad_(True)
    params = [p for p in vae.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.0)
    ds = ImageCaptionDataset(a.data, resolution=a.resolution, step=32, seed=a.seed, ucg=0.0)
    sampler = BucketBatchSampler(ds.bucket_of, a.batch_size, seed=a.seed, drop_last=True)
    step = 0
    vae.train()
    while step < a.steps:
        for idx in sampler:
            x = collate([ds[i] for i in idx])["pixels"]
            with torch.no_grad():
                mean, _ = vae.encode(x)
            y = vae.decode(mean)
            loss = (y - x).pow(2).mean() + 0.5 * (y - x).abs().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            for g in opt.param_groups:  # cosine decay to 10%
                g["lr"] = a.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * step / a.steps)))
            opt.step()
            step += 1
            if step % 10 == 0:
                print(f"step {step} loss {loss.item():.4f}", flush=True)
            if step >= a.steps:
                break
    vae.eval()
    sd = {k: v.detach() for k, v in vae.state_dict().items()}
    write_single_file(Checkpoint(path=None, config=ck.config, parts={"vae": sd}, metadata={}), a.vae_out)
    print("wrote", a.vae_out)


if __name__ == "__main__":
    main()
