# The decoder-only VAE recipe of curriculum stage 0 (docs/CURRICULUM.md), sourced by scripts/stage0_vae.sh and
# scripts/train_default.sh (step 2d): the frozen encoder's cached latents (the latent space stays), edge-weighted
# L1, lr 2e-4 cosine to 10% after 50 warm-up steps, EMA 0.995, at 256 px in 32 px buckets. Callers add the data,
# output, steps, batch, patch size, the VAE to start from and where the latent cache lives.
decoder_recipe=(--task vae --seed 0 --resolution 256 --lr 2e-4 --set data.bucket_step=32 --set train.progress=false
                --set model.config="$here/configs/mini/base.json" --set vae.decoder_only=true
                --set data.cache_latents=true --set vae.edge_weight=4 --set optim.warmup_steps=50
                --set optim.schedule=cosine --set optim.min_lr_ratio=0.1 --set ema.enabled=true --set ema.decay=0.995)
