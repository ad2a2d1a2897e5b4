"""The CLIP byte-level BPE tokenizer, in the two flavours SDXL's text encoders were used with.

SDXL has two text towers and, in the reference code, two different tokenizer implementations over the same
vocabulary (OpenAI's `bpe_simple_vocab_16e6`, shipped in `sdxl/assets/`):

- CLIP-L was driven by transformers' `CLIPTokenizer` (style "openai_hf"): pads with <|endoftext|> (49407).
  Its text normalisation is Unicode NFC, every whitespace run -> one space, per-character lower case.
  The literal strings "<|startoftext|>" / "<|endoftext|>" in a prompt become the special ids.
- OpenCLIP bigG was driven by `open_clip.tokenize` (style "open_clip"): pads with 0 (which decodes as "!").
  Its normalisation runs `ftfy.fix_text` (straightens curly quotes, folds full-width letters, ...), then
  unescapes HTML entities twice, collapses whitespace and lower-cases. Its special strings are
  "<start_of_text>" / "<end_of_text>" (matched case-insensitively).

So "&amp;", "'curly quotes'" or "ＡＢＣ" give different ids for the two encoders; each style reproduces its
own reference exactly (see tests/data/clip_token_ids.json). After normalisation both split the text with the
same CLIP regex and run the same BPE.

How the BPE works: text is split into words (letter runs, single digits, punctuation runs, a few English
contractions). Each word's UTF-8 bytes are mapped to printable stand-in characters (so that every byte has a
vocabulary entry), the last one is marked with "</w>" (end of word), and then the two adjacent symbols whose
merge has the lowest rank in the merges file are fused, again and again, until no listed merge applies. The
resulting symbols are looked up in the vocabulary.
"""

from __future__ import annotations

import gzip
import html
import json
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

import ftfy
import regex
import torch

VOCAB_FILE = "clip_bpe_16e6.txt.gz"
NUM_MERGES = 49152 - 256 - 2  # CLIP uses the first 48,894 merges of the file: 2*256 + 48,894 + 2 = 49,408 ids
BOS_ID = 49406
EOS_ID = 49407
VOCAB_SIZE = 49408
END_OF_WORD = "</w>"
STYLES = ("openai_hf", "open_clip")

# One "word" of CLIP: a handful of contractions, a run of letters, ONE digit, or a run of anything that is
# neither whitespace, letter nor digit. Whitespace is dropped (it is implied by the "</w>" markers).
_WORD_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""

# open_clip puts its special strings in front of the same pattern and compiles it case-insensitively.
_OPEN_CLIP_SPECIAL = {"<start_of_text>": BOS_ID, "<end_of_text>": EOS_ID}
_OPEN_CLIP_SPLIT = regex.compile(
    "|".join(regex.escape(s) for s in _OPEN_CLIP_SPECIAL) + "|" + _WORD_PATTERN, regex.IGNORECASE
)

# transformers cuts the raw text at its (case-sensitive) special strings before normalising the pieces.
_HF_SPECIAL = {"<|startoftext|>": BOS_ID, "<|endoftext|>": EOS_ID}
_HF_SPECIAL_SPLIT = regex.compile("(" + "|".join(regex.escape(s) for s in _HF_SPECIAL) + ")")
_HF_WORDS = regex.compile(_WORD_PATTERN)
_WHITESPACE_RUN = regex.compile(r"\s+")


def bytes_to_unicode() -> dict[int, str]:
    """Map every byte 0..255 to a printable character (the alphabet the BPE works on).

    Bytes that are already printable Latin-1 characters stand for themselves; the 68 others (control
    characters, space, soft hyphen, ...) are given the code points 256, 257, ... in byte order. The insertion
    order of the dict matters: it is the order of the first 256 vocabulary ids (id 0 is "!", byte 33).
    """
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    )
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


@dataclass(frozen=True)
class _Vocab:
    token_to_id: dict[str, int]
    id_to_token: list[str]
    merge_rank: dict[tuple[str, str], int]
    byte_to_char: dict[int, str]
    char_to_byte: dict[str, int]


@lru_cache(maxsize=1)
def _vocab() -> _Vocab:
    """Read the merges file once (lazily, on first use) and build the 49,408-entry vocabulary.

    Id layout (fixed by CLIP's training): the 256 byte characters, the same 256 with "</w>", one id per merge
    (the concatenation of its two halves), then <start_of_text> (49406) and <end_of_text> (49407).
    """
    raw = resources.files("sdxl").joinpath("assets", VOCAB_FILE).read_bytes()
    lines = gzip.decompress(raw).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]  # line 0 is a version header
    byte_to_char = bytes_to_unicode()
    tokens = list(byte_to_char.values())
    tokens += [c + END_OF_WORD for c in byte_to_char.values()]
    tokens += [a + b for a, b in merges]
    tokens += ["<start_of_text>", "<end_of_text>"]
    assert len(tokens) == VOCAB_SIZE, len(tokens)
    return _Vocab(
        token_to_id={t: i for i, t in enumerate(tokens)},
        id_to_token=tokens,
        merge_rank={(a, b): i for i, (a, b) in enumerate(merges)},
        byte_to_char=byte_to_char,
        char_to_byte={c: b for b, c in byte_to_char.items()},
    )


@lru_cache(maxsize=1 << 16)
def _bpe(word: str) -> tuple[int, ...]:
    """Token ids of one word (already in the byte alphabet). Cached: prompts repeat the same words a lot."""
    vocab = _vocab()
    symbols = list(word[:-1]) + [word[-1] + END_OF_WORD]
    ranks = vocab.merge_rank
    while len(symbols) > 1:
        # The adjacent pair that was merged earliest during BPE training wins.
        best_rank, best_pair = None, None
        for pair in zip(symbols[:-1], symbols[1:]):
            rank = ranks.get(pair)
            if rank is not None and (best_rank is None or rank < best_rank):
                best_rank, best_pair = rank, pair
        if best_pair is None:
            break
        # Fuse every occurrence of that pair, scanning left to right without overlaps ("aaa" -> "aa", "a").
        first, second = best_pair
        merged: list[str] = []
        i = 0
        while i < len(symbols):
            if i + 1 < len(symbols) and symbols[i] == first and symbols[i + 1] == second:
                merged.append(first + second)
                i += 2
            else:
                merged.append(symbols[i])
                i += 1
        symbols = merged
    return tuple(vocab.token_to_id[s] for s in symbols)


def _lower_per_char(text: str) -> str:
    """Lower case one character at a time, like the `tokenizers` Lowercase normaliser.

    Python's `str.lower()` looks at context for the Greek capital sigma ("ΟΔΟΣ" -> "οδος" with a final
    "ς"); transformers lower-cases each character on its own ("οδοσ"). Only the openai_hf style needs this.
    """
    return "".join(c.lower() for c in text)


class CLIPTokenizer:
    """CLIP BPE tokenizer producing fixed-length id rows for one of SDXL's text encoders.

    pad_token: id written after <end_of_text> (49407 for CLIP-L, 0 for OpenCLIP bigG).
    style: "openai_hf" (normalise like transformers' CLIPTokenizer) or "open_clip" (like open_clip.tokenize).
    """

    bos_id: int = BOS_ID
    eos_id: int = EOS_ID
    vocab_size: int = VOCAB_SIZE

    def __init__(self, pad_token: int = EOS_ID, style: str = "openai_hf"):
        if style not in STYLES:
            raise ValueError(f"style must be one of {STYLES}, got {style!r}")
        if not 0 <= pad_token < VOCAB_SIZE:
            raise ValueError(f"pad_token must be a vocabulary id, got {pad_token}")
        self.pad_token = pad_token
        self.style = style

    @classmethod
    def clip_l(cls) -> CLIPTokenizer:
        """The tokenizer SDXL's CLIP-L (text_encoder / conditioner.embedders.0) was used with."""
        return cls(pad_token=EOS_ID, style="openai_hf")

    @classmethod
    def bigg(cls) -> CLIPTokenizer:
        """The tokenizer of SDXL's OpenCLIP bigG (text_encoder_2 / embedders.1, refiner embedders.0)."""
        return cls(pad_token=0, style="open_clip")

    def __repr__(self) -> str:
        return f"CLIPTokenizer(pad_token={self.pad_token}, style={self.style!r})"

    # ---- text -> ids ----
    def _word_ids(self, word: str) -> Iterable[int]:
        byte_to_char = _vocab().byte_to_char
        return _bpe("".join(byte_to_char[b] for b in word.encode("utf-8")))

    def _encode_open_clip(self, text: str) -> list[int]:
        text = ftfy.fix_text(text)
        text = html.unescape(html.unescape(text)).strip()
        text = " ".join(text.split()).lower()
        ids: list[int] = []
        for word in _OPEN_CLIP_SPLIT.findall(text):
            special = _OPEN_CLIP_SPECIAL.get(word)
            ids.extend((special,) if special is not None else self._word_ids(word))
        return ids

    def _encode_openai_hf(self, text: str) -> list[int]:
        ids: list[int] = []
        # The capture group keeps the special strings in the list, at odd positions.
        for k, piece in enumerate(_HF_SPECIAL_SPLIT.split(text)):
            if k % 2 == 1:
                ids.append(_HF_SPECIAL[piece])
                continue
            piece = unicodedata.normalize("NFC", piece)
            piece = _lower_per_char(_WHITESPACE_RUN.sub(" ", piece))
            for word in _HF_WORDS.findall(piece):
                ids.extend(self._word_ids(word))
        return ids

    def encode(self, text: str) -> list[int]:
        """BPE ids of `text`, WITHOUT <start_of_text>/<end_of_text> and without truncation.

        Prompt-weighting code uses this to cut long prompts into 75-token chunks.
        """
        if self.style == "open_clip":
            return self._encode_open_clip(text)
        return self._encode_openai_hf(text)

    def wrap(self, ids: Sequence[int], length: int = 77) -> list[int]:
        """[BOS] + ids + [EOS], truncated and padded to `length` (EOS always survives truncation)."""
        if length < 2:
            raise ValueError(f"length must be at least 2 (BOS and EOS), got {length}")
        row = [BOS_ID, *list(ids)[: length - 2], EOS_ID]
        return row + [self.pad_token] * (length - len(row))

    def __call__(self, texts: str | Sequence[str], length: int = 77) -> torch.Tensor:
        """Token ids, LongTensor [B, length]: BOS, BPE ids (truncated to length-2), EOS, then padding."""
        if isinstance(texts, str):
            texts = [texts]
        rows = [self.wrap(self.encode(t), length) for t in texts]
        return torch.tensor(rows, dtype=torch.long).reshape(len(rows), length)

    # ---- ids -> text ----
    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special: bool = True) -> str:
        """Text of a row of ids. Word ends ("</w>") become spaces.

        With skip_special (default) <start_of_text> is dropped and decoding stops at the first <end_of_text>,
        so a padded row decodes to its prompt whatever the pad id is (the bigG pad 0 would read as "!").
        Otherwise special tokens are written out as "<start_of_text>" / "<end_of_text>".
        """
        if isinstance(ids, torch.Tensor):
            ids = ids.reshape(-1).tolist()
        vocab = _vocab()
        out = bytearray()
        for i in ids:
            i = int(i)
            if skip_special and i == BOS_ID:
                continue
            if skip_special and i == EOS_ID:
                break
            token = vocab.id_to_token[i]
            if i in (BOS_ID, EOS_ID):
                out += token.encode("utf-8")
                continue
            word_end = token.endswith(END_OF_WORD)
            if word_end:
                token = token[: -len(END_OF_WORD)]
            out += bytes(vocab.char_to_byte[c] for c in token)
            if word_end:
                out += b" "
        return out.decode("utf-8", errors="replace").strip()


# ---- files for transformers / diffusers folders ----
HF_SPECIAL_NAMES = {BOS_ID: "<|startoftext|>", EOS_ID: "<|endoftext|>"}


def hf_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """The vocabulary as transformers' CLIPTokenizer files hold it: (vocab.json dict, merges.txt lines).

    Same ids as ours; only the two special tokens are spelled the HF way ("<|startoftext|>", "<|endoftext|>").
    The merges are the first 48,894 lines after the version header, each "left right".
    """
    vocab = _vocab()
    tokens = list(vocab.id_to_token)
    for i, name in HF_SPECIAL_NAMES.items():
        tokens[i] = name
    merges = [f"{a} {b}" for a, b in sorted(vocab.merge_rank, key=vocab.merge_rank.__getitem__)]
    return {t: i for i, t in enumerate(tokens)}, merges


def write_hf_tokenizer_files(folder: str | Path, pad: str = "<|endoftext|>") -> Path:
    """Write a transformers CLIPTokenizer folder (diffusers `tokenizer/` or `tokenizer_2/`).

    pad: "<|endoftext|>" for CLIP-L's `tokenizer/`, "!" for bigG's `tokenizer_2/` (as in the official
    diffusers SDXL repository: id 0, the same padding as open_clip; note that transformers then also maps
    a literal "!" in a prompt to that special id).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = hf_vocab_and_merges()
    if pad not in vocab:
        raise ValueError(f"pad token {pad!r} is not in the vocabulary")
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    special = {
        "bos_token": HF_SPECIAL_NAMES[BOS_ID],
        "eos_token": HF_SPECIAL_NAMES[EOS_ID],
        "unk_token": HF_SPECIAL_NAMES[EOS_ID],
        "pad_token": pad,
    }
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2), encoding="utf-8")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": 77,
        "do_lower_case": True,
        "add_prefix_space": False,
        "errors": "replace",
        **special,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return folder
