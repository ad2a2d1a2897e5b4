"""LoRA+ (Hayou et al. 2024; kohya's `loraplus_lr_ratio`): the adapters' B matrices train at a higher rate.

`loraplus_groups` splits every optimizer parameter group: the parameters named as an adapter's B side, the
kohya `lora_up` weights (and LoKr's zero-initialised `lokr_w2` / `lokr_w2_b`), move to a group of their own
at the group's lr x ratio; everything else (`lora_down`, `lokr_w1`, `lokr_w2_a`, DoRA magnitudes, full
weights) keeps its group and lr. The UNet's adapters use `loraplus_unet_lr_ratio`, the text towers'
`loraplus_text_encoder_lr_ratio`, each falling back to `loraplus_lr_ratio`; 0 everywhere changes nothing.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .config import LoRASection

B_SUFFIXES = (".lora_up.weight", ".lokr_w2", ".lokr_w2_b")
TEXT_PREFIXES = ("lora.te1.", "lora.te2.", "text.")


def loraplus_ratio(name: str, lc: LoRASection) -> float:
    """The lr multiplier of the parameter called `name` in the trained module (1 for non-B parameters)."""
    if not name.endswith(B_SUFFIXES):
        return 1.0
    own = lc.loraplus_text_encoder_lr_ratio if name.startswith(TEXT_PREFIXES) else lc.loraplus_unet_lr_ratio
    return own or lc.loraplus_lr_ratio or 1.0


def loraplus_groups(groups: list[dict[str, Any]], module: nn.Module, lc: LoRASection) -> list[dict[str, Any]]:
    """`groups` with each group's B parameters split off at lr x ratio (see the module docstring).

    The split groups follow their source group, which keeps its other settings; a group left empty is
    dropped. Without any ratio set the groups come back unchanged.
    """
    if not (lc.loraplus_lr_ratio or lc.loraplus_unet_lr_ratio or lc.loraplus_text_encoder_lr_ratio):
        return groups
    names = {id(p): n for n, p in module.named_parameters()}
    out: list[dict[str, Any]] = []
    for group in groups:
        by_ratio: dict[float, list] = {}
        for p in group["params"]:
            by_ratio.setdefault(loraplus_ratio(names.get(id(p), ""), lc), []).append(p)
        for ratio in sorted(by_ratio):
            g = {**group, "params": by_ratio[ratio]}
            if ratio != 1.0:
                g["lr"] = group["lr"] * ratio
            out.append(g)
    return out
