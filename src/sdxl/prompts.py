"""The AUTOMATIC1111 prompt language: weights, BREAK, LoRA tags, prompt editing, alternation, embeddings.

Prompts copied from Civitai are written for A1111, so this module reproduces what A1111 does with them:

    "a (cat:1.3) on a [mat], <lora:film:0.8> [sunny:rainy:0.5] BREAK 35mm"

The text goes through four stages, each a plain function that can be used (and tested) on its own:

1. `extract_networks` removes every `<kind:args>` tag and returns the LoRAs (`<lora:..>`, `<lyco:..>`).
2. `schedule_prompt` resolves prompt editing `[from:to:when]` and alternation `[a|b]` into one plain text per
   range of sampling steps. The pipeline encodes each text once and switches conditioning between steps.
3. `parse_prompt_attention` turns one plain text into (fragment, weight) pairs: `(x)` x1.1, `[x]` /1.1,
   `(x:w)`, escapes, and BREAK markers.
4. `PromptChunks.build` tokenises the fragments into 75-token chunks (77 with BOS/EOS), one weight per
   token, and marks where textual-inversion vectors go.

After the text towers ran, `apply_weights` applies the per-token weights to the hidden states ("original":
multiply, then restore the chunk's mean, A1111's default; "no_norm": multiply only).

Everything except `apply_weights` and `build_input_embeddings` is pure Python, so parsing never imports
torch. Errors in the parts of the language that A1111 rejects (a bad number in a weight, a step, or a LoRA
tag) raise `PromptError`, which carries the character position. Everything else is lenient exactly where
A1111 is lenient: an unclosed `(` weights the rest of the prompt, a stray `)` is plain text.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

if TYPE_CHECKING:
    import torch  # lazy: parsing prompts (PNG readers, request checks) needs no torch

CHUNK_TOKENS = 75  # prompt tokens per chunk
CHUNK_LENGTH = CHUNK_TOKENS + 2  # with BOS and EOS: the 77 positions of the CLIP text towers
PLACEHOLDER_ID = 0  # token id written where textual-inversion vectors go (A1111 uses 0 too)
ROUND_MULTIPLIER = 1.1
SQUARE_MULTIPLIER = 1 / 1.1  # multiplied, not divided, so the floats equal A1111's to the last bit
BREAK_MARKER: tuple[str, float] = ("BREAK", -1.0)  # how parse_prompt_attention reports a BREAK (as A1111)
MAX_NESTING = 100  # deeper bracket nesting is refused (PromptError) rather than hitting Python's stack


class PromptError(ValueError):
    """A prompt that cannot be understood. `position` is the 0-based character offset in `text`."""

    def __init__(self, message: str, text: str = "", position: int | None = None):
        self.message = message
        self.text = text
        self.position = position
        super().__init__(self._describe())

    def _describe(self) -> str:
        if self.position is None:
            return self.message
        start = max(0, self.position - 30)
        window = self.text[start : self.position + 30].replace("\n", " ").replace("\t", " ")
        caret = " " * (self.position - start) + "^"
        return f"{self.message} (at character {self.position})\n  {window}\n  {caret}"


def _parse_number(token: str, text: str, position: int, what: str) -> float:
    """float(token), or a PromptError pointing at the token. Infinite values are refused too."""
    try:
        value = float(token)
    except ValueError:
        raise PromptError(f"{what}: {token!r} is not a number", text, position) from None
    if not math.isfinite(value):
        raise PromptError(f"{what}: {token!r} is out of range", text, position)
    return value


# ---------------------------------------------------------------------------------------------------------
# 1. extra networks: <lora:name:weight>
# ---------------------------------------------------------------------------------------------------------

# A1111's extra-network tag: a word, a colon, then anything up to the closing '>'.
_NETWORK_TAG = re.compile(r"<(\w+):([^>]+)>")
LORA_KINDS = ("lora", "lyco")


class LoraRef(NamedTuple):
    """One LoRA named in a prompt: (name, weight)."""

    name: str
    weight: float = 1.0


@dataclass
class ExtraNetworks:
    """What `extract_networks` found. `text` is the prompt with every tag removed (as A1111 does)."""

    text: str
    loras: list[LoraRef] = field(default_factory=list)
    # A separate UNet multiplier, by LoRA name, where the tag gave one (`<lora:name:te:unet>`); the LoRA's
    # `weight` is then the text-encoder multiplier only.
    unet_weights: dict[str, float] = field(default_factory=dict)
    other: list[tuple[str, str]] = field(default_factory=list)  # (kind, args) of non-LoRA tags, e.g. hypernet


def extract_networks(text: str) -> ExtraNetworks:
    """Remove every `<kind:args>` tag from `text` and return the LoRAs in order of appearance.

    `<lora:name>` has weight 1.0; `<lora:name:0.8>` 0.8; `<lora:name:0.8:0.5>` uses 0.8 for the text
    encoders and 0.5 for the UNet (reported in `unet_weights`); `te=`/`unet=` name them explicitly.
    `<lyco:..>` is the LyCORIS extension's spelling and means the same. Other kinds (`<hypernet:..>`) are
    removed too, since A1111 never sends a tag to the text encoder, and are returned in `other` so callers
    can warn about them.
    """
    # No tag can end after the last '>'. Stopping the scan there keeps it linear: otherwise every '<' of
    # a text like "<a:<a:<a:..." scans to the end for a '>' (300 KB of PNG metadata took minutes).
    end = text.rfind(">") + 1
    found = ExtraNetworks(text=_NETWORK_TAG.sub("", text[:end]) + text[end:])
    for m in _NETWORK_TAG.finditer(text, 0, end):
        kind, args = m.group(1), m.group(2)
        if kind.lower() not in LORA_KINDS:
            found.other.append((kind, args))
            continue
        name, weight, unet = _parse_lora_args(args, text, m.start(2))
        found.loras.append(LoraRef(name, weight))
        if unet is not None:
            found.unet_weights[name] = unet
    return found


def extract_loras(text: str) -> tuple[str, list[LoraRef]]:
    """Shorthand for `extract_networks`: (text without any tag, LoRAs)."""
    found = extract_networks(text)
    return found.text, found.loras


def _parse_lora_args(args: str, text: str, start: int) -> tuple[str, float, float | None]:
    """Parse 'name[:te[:unet]]' with optional 'te=..'/'unet=..' items (A1111's positional/named split)."""
    items = args.split(":")
    positional: list[tuple[str, int]] = []
    named: dict[str, tuple[str, int]] = {}
    offset = start
    for item in items:
        if "=" in item:
            key, _, value = item.partition("=")
            named[key.strip()] = (value.strip(), offset + item.index("=") + 1)
        else:
            positional.append((item, offset))
        offset += len(item) + 1
    name = positional[0][0].strip() if positional else ""
    if not name:
        raise PromptError("LoRA tag without a name", text, start)

    def number(token: tuple[str, int] | None) -> float | None:
        if token is None:
            return None
        return _parse_number(token[0].strip(), text, token[1], "LoRA weight")

    te = number(named.get("te", positional[1] if len(positional) > 1 else None))
    unet = number(named.get("unet", positional[2] if len(positional) > 2 else None))
    return name, 1.0 if te is None else te, unet


# ---------------------------------------------------------------------------------------------------------
# 2. prompt editing and alternation
# ---------------------------------------------------------------------------------------------------------


class _Unparseable(Exception):
    """The scheduling grammar does not match; A1111 then uses the prompt unchanged for every step."""


@dataclass
class _Scheduled:
    """`[before:after:when]` (before is None for `[after:when]`)."""

    before: list[Any] | None
    after: list[Any]
    when: str  # the number as written: whether it is a fraction can depend on the '.'
    step: int = 0  # filled in by schedule_prompt


@dataclass
class _Alternate:
    """`[a|b|c]`: option (step - 1) % n is used at sampling step `step`."""

    options: list[list[Any]]


# lark's SIGNED_NUMBER, which A1111's grammar uses for `when`: 3, 3., .5, 0.5, 1e3, -2.
_WHEN_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?)")
# Text that was meant as a number but is not a valid one ("1.2.3", "1e"): reported, not taken literally.
_NUMBER_LIKE = re.compile(r"[+-]?[0-9.]*[0-9][0-9.eE+-]*")
_SPECIAL = "[]():|\\"


class _ScheduleParser:
    """Recursive descent over A1111's prompt-editing grammar (a lark grammar in A1111):

        start:       (prompt | stray '[', ']', '(', ')' or ':')*
        prompt:      (emphasized | scheduled | alternate | plain)*
        emphasized:  "(" prompt ")" | "(" prompt ":" prompt ")" | "[" prompt "]"
        scheduled:   "[" [prompt ":"] prompt ":" NUMBER "]"
        alternate:   "[" prompt ("|" [prompt])+ "]"
        plain:       characters other than \\ [ ] ( ) : |, or a backslash and any character

    Emphasis is kept as text here (it is parse_prompt_attention's job). A '|' outside an alternation or a
    backslash at the very end does not fit the grammar: A1111 then leaves the whole prompt unscheduled, and
    so do we. `prompt` is greedy and deterministic, so results are memoised by position, which keeps the
    parse linear even for long runs of unclosed brackets.
    """

    def __init__(self, text: str):
        self.text = text
        self.memo: dict[int, tuple[list[Any], int]] = {}

    def parse(self) -> list[Any]:
        text, n = self.text, len(self.text)
        nodes: list[Any] = []
        pos = 0
        while pos < n:
            part, pos = self.prompt(pos, 0)
            nodes.extend(part)
            if pos >= n:
                break
            if text[pos] in "[]():":  # a bracket that opens or closes nothing: plain text at the top level
                nodes.append(text[pos])
                pos += 1
            else:  # '|' outside an alternation
                raise _Unparseable
        return nodes

    def prompt(self, pos: int, depth: int) -> tuple[list[Any], int]:
        if depth > MAX_NESTING:
            raise PromptError(f"brackets nested deeper than {MAX_NESTING} levels", self.text, pos)
        if pos in self.memo:
            return self.memo[pos]
        text, n = self.text, len(self.text)
        nodes: list[Any] = []
        i = pos
        while i < n:
            c = text[i]
            if c == "(" or c == "[":
                found = self.round(i, depth + 1) if c == "(" else self.square(i, depth + 1)
                if found is None:
                    break
                part, i = found
                nodes.extend(part)
            elif c in ")]:|":
                break
            else:
                j = self.plain_end(i)
                nodes.append(text[i:j])
                i = j
        self.memo[pos] = (nodes, i)
        return nodes, i

    def plain_end(self, i: int) -> int:
        text, n = self.text, len(self.text)
        while i < n:
            c = text[i]
            if c == "\\":
                if i + 1 >= n or text[i + 1] == "\n":
                    raise _Unparseable
                i += 2
            elif c in _SPECIAL:
                break
            else:
                i += 1
        return i

    def round(self, i: int, depth: int) -> tuple[list[Any], int] | None:
        text, n = self.text, len(self.text)
        inner, j = self.prompt(i + 1, depth)
        if j < n and text[j] == ")":
            return ["(", *inner, ")"], j + 1
        if j < n and text[j] == ":":
            weight, k = self.prompt(j + 1, depth)
            if k < n and text[k] == ")":
                return ["(", *inner, ":", *weight, ")"], k + 1
        return None

    def square(self, i: int, depth: int) -> tuple[list[Any], int] | None:
        text, n = self.text, len(self.text)
        first, j = self.prompt(i + 1, depth)
        if j >= n:
            return None
        if text[j] == "]":
            return ["[", *first, "]"], j + 1
        if text[j] == "|":
            options = [first]
            k = j
            while k < n and text[k] == "|":
                option, k = self.prompt(k + 1, depth)
                options.append(option)
            if k < n and text[k] == "]":
                return [_Alternate(options)], k + 1
            return None
        if text[j] == ":":
            when = self.when(j + 1)
            if when is not None:  # [to:when]
                return [_Scheduled(None, first, when[0])], when[1]
            second, k = self.prompt(j + 1, depth)
            if k < n and text[k] == ":":
                when = self.when(k + 1)
                if when is not None:  # [from:to:when]
                    return [_Scheduled(first, second, when[0])], when[1]
        return None

    def when(self, pos: int) -> tuple[str, int] | None:
        """The NUMBER "]" at the end of a scheduled part: (number as written, position after ']')."""
        text = self.text
        end = text.find("]", pos)
        if end < 0:
            return None
        candidate = text[pos:end]
        stripped = candidate.strip()
        if any(c in _SPECIAL for c in candidate) or not stripped:
            return None
        start = pos + (len(candidate) - len(candidate.lstrip()))
        if not _WHEN_NUMBER.fullmatch(stripped):
            if _NUMBER_LIKE.fullmatch(stripped):
                raise PromptError(f"prompt editing: {stripped!r} is not a step or a fraction", text, start)
            return None
        if float(stripped) < 0:
            raise PromptError(f"prompt editing: the step {stripped!r} is negative", text, start)
        return stripped, end + 1


def _walk(nodes: list[Any]) -> Iterable[_Scheduled | _Alternate]:
    for node in nodes:
        if isinstance(node, _Scheduled):
            yield node
            if node.before is not None:
                yield from _walk(node.before)
            yield from _walk(node.after)
        elif isinstance(node, _Alternate):
            yield node
            for option in node.options:
                yield from _walk(option)


def _render(nodes: list[Any], step: int) -> str:
    out: list[str] = []
    for node in nodes:
        if isinstance(node, str):
            out.append(node)
        elif isinstance(node, _Scheduled):
            chosen = (node.before or []) if step <= node.step else node.after
            out.append(_render(chosen, step))
        else:
            out.append(_render(node.options[(step - 1) % len(node.options)], step))
    return "".join(out)


def schedule_prompt(text: str, steps: int, *, decimal_means_fraction: bool = False) -> list[tuple[int, str]]:
    """Resolve prompt editing and alternation: [(end_step, text), ...] sorted by end_step.

    `[from:to:when]` uses `from` up to step `when` and `to` after it; `[to:when]` adds `to` after `when`;
    `[from::when]` removes `from` after `when`. `when` below 1 is a fraction of `steps`, otherwise a step
    number (A1111's documented rule; with `decimal_means_fraction=True` any number written with a '.' is a
    fraction, which is the rule A1111 1.6+ applies, so `1.0` means the end). Fractions are truncated to
    whole steps. `[a|b|c]` switches option on every step. Nested constructs work.

    `text` at entry i is used while `step <= end_step` (see `schedule_index`); steps count from 1 in the
    grammar, and the last entry always ends at `steps`. Example (10 steps): "a [b:c:0.5] d" ->
    [(5, "a b d"), (10, "a c d")]. Emphasis brackets and escapes are kept as written for
    `parse_prompt_attention`. A prompt the grammar does not fit (a stray '|') is returned unchanged, as A1111
    does; a malformed or negative `when` raises PromptError.
    """
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    try:
        tree = _ScheduleParser(text).parse()
    except _Unparseable:
        return [(steps, text)]

    boundaries = {steps}
    for node in _walk(tree):
        if isinstance(node, _Alternate):
            boundaries.update(range(1, steps + 1))
            continue
        value = float(node.when)
        if decimal_means_fraction:
            value = value * steps if "." in node.when else value
        elif value < 1:
            value = value * steps
        node.step = int(min(float(steps), value))
        if node.step >= 1:
            boundaries.add(node.step)
    return [(step, _render(tree, step)) for step in sorted(boundaries)]


def schedule_index(schedule: Sequence[tuple[int, str]], step: int) -> int:
    """Which schedule entry conditions sampler step `step` (0-based, as A1111's denoiser counts): the first
    entry with `step <= end_step`, else the last. This reproduces A1111 exactly, including that the first
    entry is also used for step 0 (so `[a:b:3]` shows `a` for four sampler steps)."""
    for i, (end_step, _) in enumerate(schedule):
        if step <= end_step:
            return i
    return len(schedule) - 1


@dataclass
class PromptPlan:
    """A prompt ready for the text encoders: LoRAs pulled out, one text per range of steps."""

    text: str  # the prompt without <..> tags
    loras: list[LoraRef]
    other_networks: list[tuple[str, str]]
    schedule: list[tuple[int, str]]


def prepare_prompt(text: str, steps: int, *, decimal_means_fraction: bool = False) -> PromptPlan:
    """extract_networks, then schedule_prompt: the order A1111 uses (tags never take part in editing)."""
    networks = extract_networks(text)
    schedule = schedule_prompt(networks.text, steps, decimal_means_fraction=decimal_means_fraction)
    return PromptPlan(networks.text, networks.loras, networks.other, schedule)


# ---------------------------------------------------------------------------------------------------------
# composable diffusion: "a cat AND a dog :0.7"
# ---------------------------------------------------------------------------------------------------------

# A1111 splits on the word AND (upper case, a whole word: `\bAND\b`), wherever it stands, brackets included:
# "(a AND b)" is the two sub-prompts "(a" and " b)". Lower-case "and", "ANDROID", "_AND_" do not split.
_AND = re.compile(r"\bAND\b")
# A sub-prompt's optional trailing weight: ':' and a plain decimal number (no exponent), spaces allowed
# around the colon and after the number. The text is the shortest prefix that leaves only that (or only
# spaces) after it, so the text keeps its leading spaces and, without a weight, its trailing ones are
# dropped.
_SUBPROMPT_WEIGHT = re.compile(r"^(.*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$", re.S)


class SubPrompt(NamedTuple):
    """One part of a composable prompt: its text (still in the prompt language) and its weight."""

    text: str
    weight: float = 1.0


def has_and(text: str) -> bool:
    """Whether `text` holds the word AND, i.e. is a composable prompt."""
    return _AND.search(text) is not None


def split_subprompts(text: str) -> list[SubPrompt]:
    """A1111's composable-diffusion split (Liu et al. 2022; A1111's `get_multicond_prompt_list`).

    "a cat AND a dog :0.7" -> [SubPrompt("a cat", 1.0), SubPrompt(" a dog", 0.7)]. The text is cut at every
    whole upper-case word AND; each part may end in `:weight` (default 1; negative weights are allowed and
    subtract that part). Call it on the prompt with its `<lora:..>` tags already removed, as A1111 does.
    A text without AND gives one part; the pipeline does not split such prompts at all (the whole text,
    a trailing ':number' included, is encoded as before).
    """
    out = []
    for part in _AND.split(text):
        m = _SUBPROMPT_WEIGHT.match(part)
        # the pattern matches every string; the guard keeps a type checker and a future edit honest
        body, weight = (m.group(1), m.group(2)) if m is not None else (part, None)
        out.append(SubPrompt(body, 1.0 if weight is None else float(weight)))
    return out


def compose_prompts(prompt: str, prompt_2: str | None = None) -> list[tuple[str, str | None, float]] | None:
    """The sub-prompts a request's prompts make: [(text, bigG text or None, weight)], or None when the
    prompt (its `<..>` tags removed) has no AND, i.e. is not composable.

    The weights are the prompt's. `prompt_2` (the bigG prompt) is split only when it holds AND too; it must
    then have as many parts as the prompt, paired in order (its own `:weight` suffixes are removed and not
    used); without AND it goes unchanged with every part. Raises PromptError for unequal counts."""
    text = extract_networks(prompt).text
    if not has_and(text):
        return None
    parts = split_subprompts(text)
    seconds: list[str | None] = [prompt_2] * len(parts)
    if prompt_2 is not None:
        text_2 = extract_networks(prompt_2).text
        if has_and(text_2):
            parts_2 = split_subprompts(text_2)
            if len(parts_2) != len(parts):
                raise PromptError(f"prompt_2 has {len(parts_2)} sub-prompts (split by AND), the prompt "
                                  f"{len(parts)}; give as many, or none")
            seconds = [p.text for p in parts_2]
    return [(p.text, t2, p.weight) for p, t2 in zip(parts, seconds)]


# ---------------------------------------------------------------------------------------------------------
# 3. attention weights
# ---------------------------------------------------------------------------------------------------------

# One token of the attention syntax per match, tried in this order (the order matters: `\(` before `(`,
# and `:1.2)` before a plain `:`).
_ATTENTION_TOKEN = re.compile(
    r"""
      \\[()\[\]\\:]             # an escaped bracket, backslash or colon: that character, literally
    | \\                        # any other backslash is dropped
    | \(
    | \[
    | :\s*([+-]?[.\d]+)\s*\)    # ':1.3)': closes a round bracket with an explicit weight
    | \)
    | \]
    | [^\\()\[\]:]+             # plain text (may contain BREAK)
    | :
    """,
    re.VERBOSE,
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*")


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """Split a plain prompt into (fragment, weight) pairs, merging neighbours of equal weight.

    `(x)` multiplies by 1.1, `[x]` by 1/1.1, `(x:1.3)` by 1.3 (spaces around the number allowed), and
    nesting multiplies. `\\(` `\\)` `\\[` `\\]` `\\\\` `\\:` are literal characters; any other backslash is
    dropped. A bracket left open weights the rest of the prompt; a closing bracket with no opener is text.
    `BREAK` (upper case, a separate word) becomes `BREAK_MARKER` = ("BREAK", -1.0), A1111's own marker.

    Matches A1111's `parse_prompt_attention` (its doctests are in tests/test_prompts.py) except in three
    corners, all deliberate: `\\:` is a literal colon even before a number (A1111 reads `(a\\:2)` as weight
    2), a BREAK inside brackets still breaks (A1111 multiplies its marker and loses it), and fragments with
    no text are dropped. A weight that is not a number, or products that overflow, raise PromptError.
    """
    # Each entry is [text, weight, is_break]; round/square hold the index where an open bracket started.
    res: list[list[Any]] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def multiply(start: int, factor: float, position: int) -> None:
        for item in res[start:]:
            if item[2]:
                continue
            new = item[1] * factor
            if not math.isfinite(new) or (new == 0.0 and factor != 0.0 and item[1] != 0.0):
                raise PromptError("attention weight out of range (too many nested brackets)", text, position)
            item[1] = new

    for m in _ATTENTION_TOKEN.finditer(text):
        token = m.group(0)
        if token.startswith("\\"):
            res.append([token[1:], 1.0, False])
        elif token == "(":
            round_open.append(len(res))
        elif token == "[":
            square_open.append(len(res))
        elif m.group(1) is not None and round_open:
            weight = _parse_number(m.group(1), text, m.start(1), "attention weight")
            multiply(round_open.pop(), weight, m.start())
        elif token == ")" and round_open:
            multiply(round_open.pop(), ROUND_MULTIPLIER, m.start())
        elif token == "]" and square_open:
            multiply(square_open.pop(), SQUARE_MULTIPLIER, m.start())
        else:
            for i, part in enumerate(_BREAK.split(token)):
                if i > 0:
                    res.append([BREAK_MARKER[0], BREAK_MARKER[1], True])
                res.append([part, 1.0, False])

    # Unclosed brackets apply to everything after them, outermost first (A1111's order, for equal floats).
    for start in round_open:
        multiply(start, ROUND_MULTIPLIER, len(text))
    for start in square_open:
        multiply(start, SQUARE_MULTIPLIER, len(text))

    merged: list[list[Any]] = []
    for item in res:
        if not item[2] and item[0] == "":
            continue
        if merged and not item[2] and not merged[-1][2] and merged[-1][1] == item[1]:
            merged[-1][0] += item[0]
        else:
            merged.append(item)
    if not merged:
        return [("", 1.0)]
    return [(item[0], float(item[1])) for item in merged]


def is_break(fragment: tuple[str, float]) -> bool:
    """True for the BREAK marker in parse_prompt_attention's output."""
    return fragment[0] == BREAK_MARKER[0] and fragment[1] == BREAK_MARKER[1]


# ---------------------------------------------------------------------------------------------------------
# 4. chunks of 75 tokens, and textual inversion
# ---------------------------------------------------------------------------------------------------------


class TokenizerLike(Protocol):
    """What the chunker needs from a tokenizer (sdxl.tokenizer.CLIPTokenizer provides it)."""

    bos_id: int
    eos_id: int
    pad_token: int

    def encode(self, text: str) -> list[int]: ...


@dataclass(frozen=True)
class EmbeddingOverride:
    """Textual-inversion vectors to write into the tower's input embeddings.

    The vectors of embedding `name` replace positions `offset .. offset + length - 1` of chunk `chunk`
    (positions count BOS as 0, so offset >= 1). The ids there are PLACEHOLDER_ID.
    """

    chunk: int
    offset: int
    name: str
    length: int


@dataclass
class PromptChunks:
    """A prompt as k chunks of 77 token ids with one weight per token.

    Each chunk is BOS, up to 75 prompt tokens, EOS, then padding with `pad_id` (49407 for CLIP-L, 0 for
    OpenCLIP bigG: build one PromptChunks per tokenizer). BOS, EOS and padding have weight 1.0. The text
    towers encode each chunk separately; the hidden states are concatenated along the sequence axis
    ([B, 77 * k, D]) and the pooled vector comes from the first chunk, as in A1111.
    """

    ids: list[list[int]]
    weights: list[list[float]]
    overrides: list[EmbeddingOverride]
    token_count: int  # prompt tokens, embedding vectors included, BOS/EOS/padding excluded
    bos_id: int
    eos_id: int
    pad_id: int

    @property
    def num_chunks(self) -> int:
        return len(self.ids)

    def __len__(self) -> int:
        return len(self.ids)

    def __iter__(self) -> Iterator[tuple[list[int], list[float]]]:
        """(ids, weights) of each chunk, in order."""
        return iter(zip(self.ids, self.weights, strict=True))

    @property
    def flat_weights(self) -> list[float]:
        """All weights in sequence order, the layout `apply_weights` takes for one prompt."""
        return [w for chunk in self.weights for w in chunk]

    def empty_chunk(self) -> tuple[list[int], list[float]]:
        ids = [self.bos_id, self.eos_id] + [self.pad_id] * CHUNK_TOKENS
        return ids, [1.0] * CHUNK_LENGTH

    def padded_to(self, num_chunks: int) -> PromptChunks:
        """Append empty chunks up to `num_chunks`. Conditional and unconditional batches, and the two
        tokenizers of SDXL, must have the same number of chunks; ComfyUI and A1111 pad like this."""
        if num_chunks < self.num_chunks:
            raise ValueError(f"cannot pad {self.num_chunks} chunks down to {num_chunks}")
        ids, weights = list(self.ids), list(self.weights)
        for _ in range(num_chunks - self.num_chunks):
            empty_ids, empty_weights = self.empty_chunk()
            ids.append(empty_ids)
            weights.append(empty_weights)
        return PromptChunks(
            ids, weights, list(self.overrides), self.token_count, self.bos_id, self.eos_id, self.pad_id
        )

    @classmethod
    def build(
        cls,
        fragments: Iterable[tuple[str, float]],
        tokenizer: TokenizerLike,
        *,
        comma_padding_backtrack: int = 20,
        embeddings: EmbeddingLibrary | None = None,
    ) -> PromptChunks:
        """Tokenise weighted fragments (from parse_prompt_attention) into chunks, the way A1111 does.

        - Each fragment is tokenised on its own; its weight goes to each of its tokens.
        - A BREAK marker closes the current chunk (even an empty one) and pads it.
        - When a chunk is full and the last comma lies within `comma_padding_backtrack` tokens of its end,
          the words after that comma move to the next chunk, so a phrase is not cut in half (A1111's
          "comma padding backtrack", default 20; 0 turns it off).
        - Embedding names from `embeddings` (matched token by token) become `length` placeholder tokens
          with the fragment's weight, recorded in `overrides`; an embedding never straddles two chunks.
        """
        comma = tokenizer.encode(",")
        comma_id = comma[0] if len(comma) == 1 else None

        done_ids: list[list[int]] = []
        done_weights: list[list[float]] = []
        overrides: list[EmbeddingOverride] = []
        tokens: list[int] = []  # the current chunk's prompt tokens (no BOS/EOS)
        weights: list[float] = []
        fixes: list[tuple[int, str, int]] = []  # (offset in tokens, name, length) of the current chunk
        last_comma = -1
        token_count = 0

        def close_chunk() -> None:
            nonlocal tokens, weights, fixes, last_comma
            pad = CHUNK_TOKENS - len(tokens)
            done_ids.append([tokenizer.bos_id, *tokens, tokenizer.eos_id] + [tokenizer.pad_token] * pad)
            done_weights.append([1.0, *weights] + [1.0] * (pad + 1))
            index = len(done_ids) - 1
            for offset, name, length in fixes:
                overrides.append(EmbeddingOverride(index, offset + 1, name, length))
            tokens, weights, fixes, last_comma = [], [], [], -1

        for text, weight in fragments:
            if is_break((text, weight)):
                close_chunk()
                continue
            ids = tokenizer.encode(text)
            position = 0
            while position < len(ids):
                token = ids[position]
                if token == comma_id:
                    last_comma = len(tokens)
                elif (
                    comma_padding_backtrack
                    and len(tokens) == CHUNK_TOKENS
                    and last_comma != -1
                    and len(tokens) - last_comma <= comma_padding_backtrack
                ):
                    cut = last_comma + 1
                    moved_tokens, moved_weights = tokens[cut:], weights[cut:]
                    moved_fixes = [(o - cut, name, n) for o, name, n in fixes if o >= cut]
                    tokens, weights = tokens[:cut], weights[:cut]
                    fixes = [f for f in fixes if f[0] < cut]
                    close_chunk()
                    tokens, weights, fixes = moved_tokens, moved_weights, moved_fixes
                if len(tokens) == CHUNK_TOKENS:
                    close_chunk()

                match = embeddings.find_at(tokenizer, ids, position) if embeddings is not None else None
                if match is None:
                    tokens.append(token)
                    weights.append(weight)
                    token_count += 1
                    position += 1
                    continue
                embedding, name_length = match
                length = embedding.num_vectors
                if len(tokens) + length > CHUNK_TOKENS:
                    close_chunk()
                fixes.append((len(tokens), embedding.name, length))
                tokens.extend([PLACEHOLDER_ID] * length)
                weights.extend([weight] * length)
                token_count += length
                position += name_length

        if tokens or not done_ids:
            close_chunk()
        return cls(
            done_ids,
            done_weights,
            overrides,
            token_count,
            tokenizer.bos_id,
            tokenizer.eos_id,
            tokenizer.pad_token,
        )

    @classmethod
    def from_text(
        cls,
        text: str,
        tokenizer: TokenizerLike,
        *,
        comma_padding_backtrack: int = 20,
        embeddings: EmbeddingLibrary | None = None,
        emphasis: bool = True,
    ) -> PromptChunks:
        """parse_prompt_attention + build. `emphasis=False` is A1111's emphasis "None": brackets are text."""
        fragments = parse_prompt_attention(text) if emphasis else [(text, 1.0)]
        return cls.build(
            fragments, tokenizer, comma_padding_backtrack=comma_padding_backtrack, embeddings=embeddings
        )


def align_chunks(*chunked: PromptChunks) -> list[PromptChunks]:
    """Pad every PromptChunks to the largest chunk count (for batching cond/uncond, or CLIP-L with bigG)."""
    most = max(c.num_chunks for c in chunked)
    return [c.padded_to(most) for c in chunked]


@dataclass
class TextualInversion:
    """One SDXL textual-inversion embedding: vectors "clip_l" [n, 768] and "clip_g" [n, 1280]."""

    name: str
    vectors: dict[str, Any]  # tower key -> torch.Tensor [n, width]
    path: Path | None = None

    @property
    def num_vectors(self) -> int:
        return int(next(iter(self.vectors.values())).shape[0])


class EmbeddingLibrary:
    """SDXL textual-inversion embeddings by name, found in prompts by their file stem.

    Files are safetensors (never pickles) holding `clip_l` [n, 768] and `clip_g` [n, 1280], the format
    A1111, ComfyUI and kohya use for SDXL. A name is matched on the tokenizer's ids, like A1111, so
    "myStyle," and "(myStyle:1.2)" both find `myStyle.safetensors`, longest name first.

    Using it in the pipeline, per tower (key "clip_l" for CLIP-L, "clip_g" for bigG):

        chunks = PromptChunks.from_text(text, tokenizer_l, embeddings=library)
        embeds = build_input_embeddings(chunks, tower_l.embeddings.token_embedding, library, "clip_l")
        hidden, pooled = tower_l.forward_embeddings(embeds, ids, skip)   # ids = chunks.ids as a tensor

    i.e. the tower runs on token embeddings in which the PLACEHOLDER_ID positions were overwritten.
    """

    def __init__(self, embeddings: Iterable[TextualInversion] = (), *, widths: dict[str, int] | None = None):
        # widths: the expected vector width per tower key; None skips the check (tiny test models).
        self.widths = {"clip_l": 768, "clip_g": 1280} if widths is None else dict(widths)
        self._by_name: dict[str, TextualInversion] = {}
        self._index: dict[int, tuple[Any, dict[int, list[tuple[list[int], TextualInversion]]]]] = {}
        for embedding in embeddings:
            self._add(embedding)

    def __len__(self) -> int:
        return len(self._by_name)

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def __getitem__(self, name: str) -> TextualInversion:
        return self._by_name[name]

    @property
    def names(self) -> list[str]:
        return sorted(self._by_name)

    def add(self, name: str, clip_l: Any, clip_g: Any, path: Path | None = None) -> TextualInversion:
        """Register vectors directly (training, tests). Tensors are [n, width]."""
        embedding = TextualInversion(name, {"clip_l": clip_l, "clip_g": clip_g}, path)
        self._check(embedding)
        return self._add(embedding)

    def load(self, path: str | Path, name: str | None = None) -> TextualInversion:
        """Load one `.safetensors` embedding; its name is the file stem unless given."""
        path = Path(path)
        if path.suffix.lower() != ".safetensors":
            raise ValueError(f"{path}: textual-inversion embeddings are read from .safetensors files only")
        from safetensors import SafetensorError, safe_open  # lazy: keeps `import sdxl.prompts` light

        try:
            with safe_open(str(path), framework="pt") as f:
                keys = set(f.keys())
                missing = {"clip_l", "clip_g"} - keys
                if missing:
                    raise ValueError(
                        f"{path}: not an SDXL embedding (needs tensors clip_l and clip_g; "
                        f"has {', '.join(sorted(keys)) or 'none'})"
                    )
                vectors = {key: f.get_tensor(key) for key in ("clip_l", "clip_g")}
        except SafetensorError as e:
            raise ValueError(f"{path}: unreadable safetensors file: {e}") from None
        embedding = TextualInversion(name or path.stem, vectors, path)
        self._check(embedding)
        return self._add(embedding)

    def load_dir(self, directory: str | Path) -> list[TextualInversion]:
        """Load every `*.safetensors` under `directory` (recursively, in sorted order)."""
        return [self.load(p) for p in sorted(Path(directory).rglob("*.safetensors"))]

    def _check(self, embedding: TextualInversion) -> None:
        counts = set()
        for key, tensor in embedding.vectors.items():
            shape = tuple(getattr(tensor, "shape", ()))
            if len(shape) != 2 or shape[0] < 1:
                raise ValueError(f"embedding {embedding.name!r}: {key} must be [n, width], got {list(shape)}")
            if not getattr(tensor, "is_floating_point", lambda: False)():
                raise ValueError(f"embedding {embedding.name!r}: {key} must hold floats")
            width = self.widths.get(key)
            if width is not None and shape[1] != width:
                raise ValueError(
                    f"embedding {embedding.name!r}: {key} has width {shape[1]}, expected {width}"
                )
            counts.add(shape[0])
        if len(counts) != 1:
            raise ValueError(f"embedding {embedding.name!r}: clip_l and clip_g have different vector counts")
        if embedding.num_vectors > CHUNK_TOKENS:
            raise ValueError(
                f"embedding {embedding.name!r}: {embedding.num_vectors} vectors do not fit a chunk"
            )

    def _add(self, embedding: TextualInversion) -> TextualInversion:
        if not embedding.name.strip():
            raise ValueError("an embedding needs a non-empty name")
        self._by_name[embedding.name] = embedding
        self._index.clear()
        return embedding

    def find_at(
        self, tokenizer: TokenizerLike, ids: Sequence[int], position: int
    ) -> tuple[TextualInversion, int] | None:
        """The embedding whose name's token ids start at `ids[position]`, and how many ids the name takes."""
        cached = self._index.get(id(tokenizer))
        if cached is None or cached[0] is not tokenizer:
            by_first: dict[int, list[tuple[list[int], TextualInversion]]] = {}
            for embedding in self._by_name.values():
                name_ids = tokenizer.encode(embedding.name)
                if name_ids:
                    by_first.setdefault(name_ids[0], []).append((name_ids, embedding))
            for candidates in by_first.values():
                candidates.sort(key=lambda c: len(c[0]), reverse=True)
            cached = (tokenizer, by_first)
            self._index[id(tokenizer)] = cached
        for name_ids, embedding in cached[1].get(ids[position], ()):
            if list(ids[position : position + len(name_ids)]) == name_ids:
                return embedding, len(name_ids)
        return None


def build_input_embeddings(
    chunks: PromptChunks,
    token_embedding: Callable[[torch.Tensor], torch.Tensor],
    library: EmbeddingLibrary | None,
    key: str,
) -> torch.Tensor:
    """The token embeddings [k, 77, D] of `chunks` with textual-inversion vectors written in.

    `token_embedding` is the tower's `nn.Embedding` (ids -> vectors; its weight gives device and dtype).
    `key` picks the vectors: "clip_l" for the CLIP-L tower, "clip_g" for OpenCLIP bigG. Position
    embeddings are added by the tower itself, after this.
    """
    import torch  # lazy: parsing prompts (PNG readers, request checks) needs no torch

    weight = getattr(token_embedding, "weight", None)
    device = weight.device if weight is not None else torch.device("cpu")
    ids = torch.tensor(chunks.ids, dtype=torch.long, device=device)
    embeds = token_embedding(ids)
    if chunks.overrides and library is None:
        raise ValueError("the prompt uses textual-inversion embeddings but no library was given")
    for fix in chunks.overrides:
        vectors = library[fix.name].vectors[key]
        if vectors.shape[-1] != embeds.shape[-1]:
            raise ValueError(
                f"embedding {fix.name!r}: {key} vectors have width {vectors.shape[-1]}, "
                f"the text tower expects {embeds.shape[-1]}"
            )
        embeds[fix.chunk, fix.offset : fix.offset + fix.length] = vectors.to(
            device=embeds.device, dtype=embeds.dtype
        )
    return embeds


def apply_weights(hidden: torch.Tensor, weights: Any, mode: str = "original") -> torch.Tensor:
    """Apply per-token prompt weights to a text tower's output hidden states [B, 77 * k, D].

    `weights` is [B, 77 * k] or [77 * k] (shared by the batch), e.g. `PromptChunks.flat_weights`.
    - "original" (A1111's default): multiply each token's vector by its weight, then rescale each 77-token
      chunk so its mean over tokens and channels is what it was before. A1111 takes that mean over the
      whole batch of a chunk; we take it per sample, which is the same for one prompt and does not let
      one prompt's weights change another's.
    - "no_norm": multiply only (A1111's "No norm"; often better for SDXL).
    - "ignore": return `hidden` unchanged.
    Call it per tower (CLIP-L and bigG separately), before concatenating the channels, as A1111 does.
    Math is done in float32 and the result has `hidden`'s dtype. A chunk whose mean becomes exactly 0 is
    left unrescaled instead of dividing by zero.
    """
    import torch  # lazy: parsing prompts (PNG readers, request checks) needs no torch

    if mode == "ignore":
        return hidden
    if mode not in ("original", "no_norm"):
        raise ValueError(f"emphasis mode {mode!r}: use 'original', 'no_norm' or 'ignore'")
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be [B, 77 * k, D], got {list(hidden.shape)}")
    batch, length, width = hidden.shape
    if length % CHUNK_LENGTH:
        raise ValueError(f"sequence length {length} is not a multiple of {CHUNK_LENGTH}")
    w = torch.as_tensor(weights, dtype=torch.float32, device=hidden.device)
    if w.dim() == 1:
        w = w.unsqueeze(0).expand(batch, -1)
    if tuple(w.shape) != (batch, length):
        raise ValueError(f"weights must be [{batch}, {length}] or [{length}], got {list(w.shape)}")

    z = hidden.float()
    weighted = z * w.unsqueeze(-1)
    if mode == "original":
        chunks = length // CHUNK_LENGTH
        before = z.reshape(batch, chunks, CHUNK_LENGTH * width).mean(dim=-1)
        after = weighted.reshape(batch, chunks, CHUNK_LENGTH * width).mean(dim=-1)
        scale = torch.where(after != 0, before / torch.where(after != 0, after, 1.0), 1.0)
        weighted = (weighted.reshape(batch, chunks, CHUNK_LENGTH, width) * scale[:, :, None, None]).reshape(
            batch, length, width
        )
    return weighted.to(hidden.dtype)
