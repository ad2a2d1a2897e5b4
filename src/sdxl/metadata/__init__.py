"""PNG metadata: write our images so every tool can read them, and read back what other tools wrote.

Each PNG we write carries two text chunks:
- `parameters`: the A1111 "infotext" (prompt, `Negative prompt:` line, `Steps: .., Sampler: ..` line). This
  is what Civitai, A1111's PNG Info, Forge, SD.Next and many image browsers read.
- `sdxl`: a JSON record of the whole request (every field, micro-conditioning, refiner, LoRAs with their
  hashes, the library version), so `sdxl generate --from IMAGE` can rebuild the request exactly.

`read_info` recognises our own files and those of AUTOMATIC1111 (and its forks), ComfyUI, Fooocus and
InvokeAI, and maps each tool's fields onto one normalised dictionary with our request's names (prompt,
negative_prompt, steps, sampler, schedule, cfg, seed, width, height, model, model_hash, loras, ...). A1111
sampler and schedule labels become the names `GenerationRequest` uses ("DPM++ 2M" -> "dpmpp_2m", "Euler a"
-> "euler_a", "Karras" -> "karras"; the table is `sdxl.sampling.names`); ComfyUI, Fooocus and InvokeAI
names are kept as written (the request's resolver accepts them), and a name we do not know is passed
through unchanged.

Metadata is untrusted input: every reader here returns what it could understand and never raises on a
malformed chunk (it reports the problem under "error" instead).

Modules:
  infotext   the A1111 infotext: format, parse, and `request_infotext` (what an image we made says)
  png        writing our PNGs, `read_info` (which tool wrote an image, and its reader)
  comfyui, fooocus, invokeai   the readers of those tools' metadata
  hashes     A1111's model / LoRA / embedding hashes, cached on disk per file version
  values     helpers for untrusted values
"""

from .hashes import (
    addnet_hash,
    embedding_hash,
    hash_cache_file,
    legacy_hash,
    lora_hash,
    sha256_file,
    short_hash,
)
from .infotext import format_a1111, parse_a1111, request_infotext
from .png import PARAMETERS_CHUNK, RECORD_CHUNK, info_from_chunks, read_info, write_png

__all__ = [
    "PARAMETERS_CHUNK",
    "RECORD_CHUNK",
    "addnet_hash",
    "embedding_hash",
    "format_a1111",
    "hash_cache_file",
    "info_from_chunks",
    "legacy_hash",
    "lora_hash",
    "parse_a1111",
    "read_info",
    "request_infotext",
    "sha256_file",
    "short_hash",
    "write_png",
]
