# Usage: python scripts/latent_probe.py VAE_FILE N_SCENES   (docs/CURRICULUM.md, third session)
"""Is a small object's shape in the latent? A CNN probe classifies the shape of the single small object of
`eval_prompts("single")` scenes at 256 px from (a) the rendered pixels around it, (b) the frozen encoder's
latent mean around it, (c) the pixels after encode + decode. Same probe family, same train/test split."""

import json
import sys

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from sdxl.data.shapes import SHAPES, eval_prompts, render_scene
from sdxl.models.vae import AutoencoderKL
from sdxl.weights.checkpoint import read_checkpoint

torch.manual_seed(0)
vae_path, n_scenes = sys.argv[1], int(sys.argv[2])
ck = read_checkpoint(vae_path)
vae = AutoencoderKL(ck.config.vae)
vae.load_state_dict({k: v.float() for k, v in ck.parts["vae"].items()})
vae.eval()
X_pix, X_lat, X_dec, Y = [], [], [], []
W = 64  # pixel window; latent window W / 8
specs = [s for _, s in eval_prompts("single", n_scenes, seed=4242)]
specs = [s for s in specs if s["objects"][0]["size"] == "small"]
with torch.no_grad():
    for i in range(0, len(specs), 16):
        chunk = specs[i : i + 16]
        x = torch.stack(
            [
                torch.from_numpy(
                    np.asarray(render_scene(s, 256, 256).convert("RGB"), dtype=np.float32) / 127.5 - 1
                ).permute(2, 0, 1)
                for s in chunk
            ]
        )
        mean, _ = vae.encode(x)
        dec = vae.decode(mean).clamp(-1, 1)
        for s, xi, zi, di in zip(chunk, x, mean, dec):
            o = s["objects"][0]
            cx, cy = int(round(o["x"] * 256)), int(round(o["y"] * 256))
            cx = min(max(cx, W // 2), 256 - W // 2)
            cy = min(max(cy, W // 2), 256 - W // 2)
            X_pix.append(xi[:, cy - W // 2 : cy + W // 2, cx - W // 2 : cx + W // 2])
            X_dec.append(di[:, cy - W // 2 : cy + W // 2, cx - W // 2 : cx + W // 2])
            lx, ly = cx // 8, cy // 8
            X_lat.append(zi[:, ly - 4 : ly + 4, lx - 4 : lx + 4])
            Y.append(SHAPES.index(o["shape"]))
Y = torch.tensor(Y)
n = len(Y)
n_test = n // 4
print(f"{n} small objects, test {n_test}", flush=True)


def probe(X, pixel):
    X = torch.stack(X)
    X = (X - X[n_test:].mean((0, 2, 3), keepdim=True)) / X[n_test:].std((0, 2, 3), keepdim=True)
    layers = (
        [
            nn.Conv2d(3, 32, 3, 2, 1),
            nn.SiLU(),
            nn.Conv2d(32, 64, 3, 2, 1),
            nn.SiLU(),
            nn.Conv2d(64, 64, 3, 2, 1),
            nn.SiLU(),
        ]
        if pixel
        else [nn.Conv2d(4, 64, 3, 1, 1), nn.SiLU()]
    )
    net = nn.Sequential(
        *layers,
        nn.Conv2d(64, 128, 3, 1, 1),
        nn.SiLU(),
        nn.Conv2d(128, 128, 3, 1, 1),
        nn.SiLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(128, len(SHAPES)),
    )
    opt = torch.optim.AdamW(net.parameters(), 2e-3, weight_decay=1e-2)
    tr, te = slice(n_test, n), slice(0, n_test)
    steps = 3000
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3, total_steps=steps)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(n_test, n, (64,), generator=g)
        xb = X[idx]
        # augmentation the shapes allow: flips (every shape class is closed under them)
        if torch.rand(1, generator=g) < 0.5:
            xb = xb.flip(3)
        if torch.rand(1, generator=g) < 0.5:
            xb = xb.flip(2)
        loss = F.cross_entropy(net(xb), Y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    net.eval()
    with torch.no_grad():
        acc = (net(X[te]).argmax(1) == Y[te]).float().mean().item()
        tr_acc = (net(X[tr]).argmax(1) == Y[tr]).float().mean().item()
    return acc, tr_acc


out = {}
for name, X, pixel in (("pixels", X_pix, True), ("latent", X_lat, False), ("decoded", X_dec, True)):
    acc, tr_acc = probe(X, pixel)
    k = round(acc * n_test)
    from sdxl.data.evaluate import wilson

    out[name] = {"test_acc": acc, "ci95": wilson(k, n_test), "train_acc": tr_acc}
    print(name, out[name], flush=True)
print(json.dumps({"vae": vae_path, "n_small": n, "n_test": n_test, **out}))
