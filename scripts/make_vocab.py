"""Extract the CLIP BPE merges file from the open_clip wheel into `src/sdxl/assets/`.

Usage (from the repository root):

    pip download --no-deps open_clip_torch==3.3.0 -d /tmp/oc
    python scripts/make_vocab.py /tmp/oc/open_clip_torch-3.3.0-py3-none-any.whl

The merges file `bpe_simple_vocab_16e6.txt.gz` was published by OpenAI with CLIP (MIT licence) and is shipped
unchanged inside the open_clip_torch wheel. A wheel is a zip archive, so we only read one member out of it;
open_clip itself is never installed or imported. The gzip bytes are copied as they are (not re-compressed), so
the asset is byte-identical to the file every other CLIP implementation uses.

Writes:
  src/sdxl/assets/clip_bpe_16e6.txt.gz   the merges (1,356,917 bytes for open_clip_torch 3.3.0)
  src/sdxl/assets/CLIP_LICENSE.txt       OpenAI CLIP's MIT licence + the licence found in the wheel
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import sys
import zipfile
from pathlib import Path

MEMBER = "open_clip/bpe_simple_vocab_16e6.txt.gz"
ASSETS = Path(__file__).resolve().parent.parent / "src" / "sdxl" / "assets"

OPENAI_CLIP_LICENSE = """MIT License

Copyright (c) 2021 OpenAI

Permission is hereby granted, free of charge, to any person obtaining a copy
of this software and associated documentation files (the "Software"), to deal
in the Software without restriction, including without limitation the rights
to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
copies of the Software, and to permit persons to whom the Software is
furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all
copies or substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE
SOFTWARE.
"""


def find_licence(zf: zipfile.ZipFile) -> tuple[str, str] | None:
    """The wheel's own licence file (`*.dist-info/**/LICENSE*`), if it ships one: (member name, text)."""
    for name in zf.namelist():
        if ".dist-info/" in name and Path(name).name.upper().startswith("LICENSE"):
            return name, zf.read(name).decode("utf-8")
    return None


def licence_text(wheel_name: str, wheel_licence: tuple[str, str] | None) -> str:
    parts = [
        "clip_bpe_16e6.txt.gz is OpenAI CLIP's byte-pair-encoding merges file",
        "(bpe_simple_vocab_16e6.txt.gz), released by OpenAI under the MIT licence below.",
        "This copy was extracted unchanged from",
        f"{wheel_name} (open_clip, also MIT licensed; its licence follows the OpenAI one).",
        "",
        "=" * 78,
        "OpenAI CLIP (https://github.com/openai/CLIP)",
        "=" * 78,
        OPENAI_CLIP_LICENSE,
    ]
    if wheel_licence is not None:
        member, text = wheel_licence
        parts += ["=" * 78, f"open_clip ({member} in {wheel_name})", "=" * 78, text.rstrip() + "\n"]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("wheel", type=Path, help="path to open_clip_torch-*.whl")
    parser.add_argument("--out", type=Path, default=ASSETS, help=f"output folder (default {ASSETS})")
    args = parser.parse_args(argv)

    with zipfile.ZipFile(args.wheel) as zf:
        data = zf.read(MEMBER)
        wheel_licence = find_licence(zf)

    # Sanity check before writing: a version line (`"bpe_simple_vocab_16e6.txt#version: 0.2`) then at least
    # the 48,894 merges CLIP uses (the file holds more; the tokenizer reads only the first 48,894).
    lines = gzip.decompress(data).decode("utf-8").split("\n")
    if len(lines) < 48895 or "#version" not in lines[0]:
        print(f"{MEMBER} does not look like the CLIP merges file ({len(lines)} lines)", file=sys.stderr)
        return 1

    args.out.mkdir(parents=True, exist_ok=True)
    vocab_path = args.out / "clip_bpe_16e6.txt.gz"
    vocab_path.write_bytes(data)
    licence_path = args.out / "CLIP_LICENSE.txt"
    licence_path.write_text(licence_text(args.wheel.name, wheel_licence), encoding="utf-8")
    print(f"wrote {vocab_path} ({len(data)} bytes, sha256 {hashlib.sha256(data).hexdigest()})")
    print(f"wrote {licence_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
