"""PAG layer names (diffusers' `pag_applied_layers` blocks), torch-free so the request can check them.

"mid", "down.N" / "up.N" (every transformer of that diffusers down/up block), "down.N.M" / "up.N.M" (its M-th
attention); diffusers' module-name spellings ("mid_block", "down_blocks.2", "up_blocks.0.attentions.1") too.
`sdxl.models.pag` maps them onto the UNet's modules.
"""

from __future__ import annotations

import re

_LAYER = re.compile(r"(mid)(?:_block)?|(down|up)(?:_blocks)?\.(\d{1,3})(?:\.(?:attentions\.)?(\d{1,3}))?")


def parse_layer(name: str) -> tuple[str, int | None, int | None] | None:
    """'mid' -> ('mid', None, None); 'up.0.1' or 'up_blocks.0.attentions.1' -> ('up', 0, 1); 'down.2' ->
    ('down', 2, None); anything else -> None."""
    m = _LAYER.fullmatch(name.strip())
    if m is None:
        return None
    if m.group(1):
        return ("mid", None, None)
    return (m.group(2), int(m.group(3)), None if m.group(4) is None else int(m.group(4)))


def split_layers(text: str) -> list[str]:
    """'mid, up.0.1' -> ['mid', 'up.0.1'] (comma-separated, blanks dropped)."""
    return [part.strip() for part in text.split(",") if part.strip()]
