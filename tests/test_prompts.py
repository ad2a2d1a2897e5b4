"""The A1111 prompt language (sdxl.prompts).

The tables below are AUTOMATIC1111's own doctest examples (modules/prompt_parser.py), so a pass means we
read those prompts exactly as A1111 does. Weights are compared with `==`: the parser multiplies in A1111's
order, so the floats agree to the last bit (1.5730000000000004 and all).
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from sdxl.prompts import (
    BREAK_MARKER,
    CHUNK_LENGTH,
    PLACEHOLDER_ID,
    EmbeddingLibrary,
    LoraRef,
    PromptChunks,
    PromptError,
    align_chunks,
    apply_weights,
    build_input_embeddings,
    extract_loras,
    extract_networks,
    parse_prompt_attention,
    prepare_prompt,
    schedule_index,
    schedule_prompt,
)


class WordTokenizer:
    """A fake word-level tokenizer with the interface of sdxl.tokenizer.CLIPTokenizer (no BPE needed).

    Words are runs of non-space, non-comma characters; ',' is its own token. Ids are handed out on first
    sight, from 10 up; BOS 1, EOS 2, pad 0 (like bigG, so padding is visibly different from EOS)."""

    bos_id = 1
    eos_id = 2
    pad_token = 0
    comma_id = 3

    def __init__(self):
        self.vocab: dict[str, int] = {",": self.comma_id}

    def encode(self, text: str) -> list[int]:
        return [self.vocab.setdefault(w, len(self.vocab) + 10) for w in re.findall(r"[^\s,]+|,", text)]


# ---------------------------------------------------------------------------------------------------------
# attention
# ---------------------------------------------------------------------------------------------------------

A1111_ATTENTION_EXAMPLES = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    (
        "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
        [
            ("a ", 1.0),
            ("house", 1.5730000000000004),
            (" ", 1.1),
            ("on", 1.0),
            (" a ", 1.1),
            ("hill", 0.55),
            (", sun, ", 1.1),
            ("sky", 1.4641000000000006),
            (".", 1.1),
        ],
    ),
]


@pytest.mark.parametrize("text,expected", A1111_ATTENTION_EXAMPLES)
def test_attention_matches_a1111_docstring(text, expected):
    assert parse_prompt_attention(text) == expected


@pytest.mark.parametrize(
    "text,expected",
    [
        ("((x))", [("x", 1.1 * 1.1)]),
        ("[[x]]", [("x", (1 / 1.1) * (1 / 1.1))]),
        ("( x : 1.5 )", [(" x ", 1.5)]),  # spaces around the number (A1111 1.9+)
        ("(a:-0.5) b", [("a", -0.5), (" b", 1.0)]),  # negative weights are allowed, as in A1111
        ("a) b]", [("a) b]", 1.0)]),  # closers without an opener are text
        ("\\\\ \\: \\[", [("\\ : [", 1.0)]),
        ("a\\b", [("ab", 1.0)]),  # any other backslash is dropped
        ("x:1.2) y", [("x:1.2) y", 1.0)]),  # a weight without an open '(' is text
        ("(a\\:2)", [("a:2", 1.1)]),  # an escaped colon never starts a weight
        ("", [("", 1.0)]),
    ],
)
def test_attention_more_cases(text, expected):
    assert parse_prompt_attention(text) == expected


def test_break_marker_and_word_boundaries():
    assert parse_prompt_attention("a BREAK b") == [("a", 1.0), BREAK_MARKER, ("b", 1.0)]
    assert parse_prompt_attention("BREAKfast break") == [("BREAKfast break", 1.0)]
    # A BREAK inside brackets still breaks (A1111 multiplies its marker and loses it).
    assert parse_prompt_attention("(a BREAK b)") == [("a", 1.1), BREAK_MARKER, ("b", 1.1)]


@pytest.mark.parametrize("text,bad", [("(a:1.2.3)", "1.2.3"), ("x (b:.)", "."), ("(c: ..5 )", "..5")])
def test_attention_bad_weight_raises_with_position(text, bad):
    with pytest.raises(PromptError) as info:
        parse_prompt_attention(text)
    assert info.value.position == text.index(bad)
    assert "^" in str(info.value)


def test_attention_overflow_is_a_prompt_error():
    with pytest.raises(PromptError):
        parse_prompt_attention("(" * 3 + "a:1" + "9" * 400 + ")))")


# ---------------------------------------------------------------------------------------------------------
# prompt editing and alternation
# ---------------------------------------------------------------------------------------------------------

A1111_SCHEDULE_EXAMPLES = [  # steps = 10
    ("test", [(10, "test")]),
    ("a [b:3]", [(3, "a "), (10, "a b")]),
    ("a [b: 3]", [(3, "a "), (10, "a b")]),
    ("a [[[b]]:2]", [(2, "a "), (10, "a [[b]]")]),
    ("[(a:2):3]", [(3, ""), (10, "(a:2)")]),
    ("a [b : c : 1] d", [(1, "a b  d"), (10, "a  c  d")]),
    ("a[b:[c:d:2]:1]e", [(1, "abe"), (2, "ace"), (10, "ade")]),
    ("a [unbalanced", [(10, "a [unbalanced")]),
    ("a [b:.5] c", [(5, "a  c"), (10, "a b c")]),
    ("((a][:b:c [d:3]", [(3, "((a][:b:c "), (10, "((a][:b:c d")]),
    ("[a|(b:1.1)]", [(s, "a" if s % 2 else "(b:1.1)") for s in range(1, 11)]),
    ("[fe|]male", [(s, "female" if s % 2 else "male") for s in range(1, 11)]),
    ("[fe|||]male", [(s, "female" if s % 4 == 1 else "male") for s in range(1, 11)]),
    # A1111's doctest also lists "a [{b|d{:.5] c", marked "not handling this right now"; its own parser
    # rejects that prompt (a '|' outside an alternation) and leaves it unscheduled, as we do:
    ("a [{b|d{:.5] c", [(10, "a [{b|d{:.5] c")]),
]


@pytest.mark.parametrize("text,expected", A1111_SCHEDULE_EXAMPLES)
def test_schedule_matches_a1111_doctests(text, expected):
    assert schedule_prompt(text, 10) == expected


def test_schedule_a1111_header_example():
    text = (
        "fantasy landscape with a [mountain:lake:0.25] and [an oak:a christmas tree:0.75]"
        "[ in foreground::0.6][ in background:0.25] [shoddy:masterful:0.5]"
    )
    assert schedule_prompt(text, 100) == [
        (25, "fantasy landscape with a mountain and an oak in foreground shoddy"),
        (50, "fantasy landscape with a lake and an oak in foreground in background shoddy"),
        (60, "fantasy landscape with a lake and an oak in foreground in background masterful"),
        (75, "fantasy landscape with a lake and an oak in background masterful"),
        (100, "fantasy landscape with a lake and a christmas tree in background masterful"),
    ]


def test_when_rules():
    # default: below 1 is a fraction, otherwise a step number (fractions truncate, steps clamp)
    assert schedule_prompt("[a:b:0.25]", 10) == [(2, "a"), (10, "b")]
    assert schedule_prompt("[a:b:1.5]", 10) == [(1, "a"), (10, "b")]
    assert schedule_prompt("[a:b:40]", 10) == [(10, "a")]
    assert schedule_prompt("[a:b:0]", 10) == [(10, "b")]
    # A1111 1.6+: a number with a '.' is always a fraction, so 1.0 is the end
    assert schedule_prompt("[a:b:1.0]", 10, decimal_means_fraction=True) == [(10, "a")]
    assert schedule_prompt("[a:b:3]", 10, decimal_means_fraction=True) == [(3, "a"), (10, "b")]


@pytest.mark.parametrize("text,bad", [("x [a:b:1.2.3] y", "1.2.3"), ("[a: -2]", "-2"), ("[a:b:1e]", "1e")])
def test_bad_when_raises_with_position(text, bad):
    with pytest.raises(PromptError) as info:
        schedule_prompt(text, 10)
    assert info.value.position == text.index(bad)


def test_unschedulable_prompt_is_returned_unchanged_and_steps_checked():
    assert schedule_prompt("a | [b:c:2]", 10) == [(10, "a | [b:c:2]")]  # A1111 gives up on a stray '|'
    assert schedule_prompt("[see: this]", 10) == [(10, "[see: this]")]  # not a number: just brackets
    with pytest.raises(ValueError):
        schedule_prompt("a", 0)


def test_schedule_index_is_a1111_lookup():
    schedule = schedule_prompt("[a:b:3]", 10)
    assert [schedule[schedule_index(schedule, s)][1] for s in range(10)] == ["a"] * 4 + ["b"] * 6
    assert schedule_index(schedule, 99) == len(schedule) - 1


def test_deep_nesting_is_a_prompt_error_not_a_crash():
    for text in ("[" * 5000 + "a" + "]" * 5000, "(" * 5000):  # not a RecursionError
        with pytest.raises(PromptError, match="nested deeper"):
            schedule_prompt(text, 10)
    assert schedule_prompt("(" * 50 + "a", 10) == [(10, "(" * 50 + "a")]  # 50 levels are fine


# ---------------------------------------------------------------------------------------------------------
# LoRA tags
# ---------------------------------------------------------------------------------------------------------


def test_extract_networks():
    found = extract_networks("a <lora:film:0.8> cat <lyco:grain> <hypernet:old:1> <lora:x:0.5:0.25> end")
    assert found.text == "a  cat    end"
    assert found.loras == [LoraRef("film", 0.8), LoraRef("grain", 1.0), LoraRef("x", 0.5)]
    assert found.unet_weights == {"x": 0.25}
    assert found.other == [("hypernet", "old:1")]
    named = extract_networks("<lora:n:te=0.3:unet=0.7>")
    assert named.loras == [("n", 0.3)] and named.unet_weights == {"n": 0.7}
    text, loras = extract_loras("<LORA:Up:2>x")
    assert (text, loras) == ("x", [("Up", 2.0)])
    name, weight = loras[0]
    assert (name, weight) == ("Up", 2.0)


@pytest.mark.parametrize("text,bad", [("a <lora:film:zero>", "zero"), ("<lora::1>", ":1")])
def test_bad_lora_tag_raises(text, bad):
    with pytest.raises(PromptError) as info:
        extract_networks(text)
    assert info.value.position == text.index(bad)


def test_prepare_prompt_removes_tags_before_editing():
    plan = prepare_prompt("[cat:dog:0.5] <lora:style:0.7>", 10)
    assert plan.loras == [LoraRef("style", 0.7)]
    assert plan.schedule == [(5, "cat "), (10, "dog ")]


# ---------------------------------------------------------------------------------------------------------
# chunks
# ---------------------------------------------------------------------------------------------------------


def words(n: int, prefix: str = "w") -> str:
    return " ".join(f"{prefix}{i}" for i in range(n))


def test_short_prompt_is_one_framed_chunk():
    tok = WordTokenizer()
    chunks = PromptChunks.from_text("a (b:1.5) c", tok)
    a, b, c = tok.encode("a b c")
    assert chunks.ids == [[1, a, b, c, 2] + [0] * 72]
    assert chunks.weights == [[1.0, 1.0, 1.5, 1.0] + [1.0] * 73]
    assert chunks.token_count == 3 and chunks.overrides == []
    assert len(chunks.flat_weights) == CHUNK_LENGTH
    assert len(chunks) == 1 and list(chunks) == [(chunks.ids[0], chunks.weights[0])]


def test_plain_prompt_matches_the_real_tokenizers_framing():
    """With sdxl.tokenizer (when present): a prompt without syntax gives exactly the tokenizer's own 77 ids,
    EOS-padded for CLIP-L and zero-padded for bigG, so weighting changes nothing for plain prompts."""
    tokenizer = pytest.importorskip("sdxl.tokenizer")
    for tok in (tokenizer.CLIPTokenizer.clip_l(), tokenizer.CLIPTokenizer.bigg()):
        text = "a photo of a cat, sitting on a mat"
        assert PromptChunks.from_text(text, tok).ids == tok([text]).tolist()


def test_empty_prompt_and_breaks():
    tok = WordTokenizer()
    assert PromptChunks.from_text("", tok).ids == [[1, 2] + [0] * 75]
    two = PromptChunks.from_text("a BREAK b", tok)
    assert two.num_chunks == 2
    assert two.ids[0][:3] == [1, tok.encode("a")[0], 2] and two.ids[1][:3] == [1, tok.encode("b")[0], 2]
    assert PromptChunks.from_text("a BREAK", tok).num_chunks == 1
    assert PromptChunks.from_text("BREAK a", tok).num_chunks == 2  # A1111 keeps the empty first chunk


def test_long_prompt_splits_every_75_tokens():
    tok = WordTokenizer()
    chunks = PromptChunks.from_text(words(80), tok)
    assert chunks.num_chunks == 2
    assert chunks.ids[0][1:76] == tok.encode(words(75)) and chunks.ids[0][76] == 2
    assert chunks.ids[1][1:7] == tok.encode(words(80))[75:] + [2]
    assert all(len(c) == CHUNK_LENGTH for c in chunks.ids)


def test_comma_padding_backtrack():
    tok = WordTokenizer()
    text = words(72) + " , " + words(10, "v")  # the comma is token 72; the chunk fills at 75
    moved = PromptChunks.from_text(text, tok)
    v0, v1 = tok.encode("v0 v1")
    assert moved.ids[0][73] == WordTokenizer.comma_id and moved.ids[0][74] == 2  # chunk ends after ','
    assert moved.ids[1][1:3] == [v0, v1]  # the words after the comma moved on
    kept = PromptChunks.from_text(text, tok, comma_padding_backtrack=0)
    assert kept.ids[0][74:77] == [v0, v1, 2]
    # a comma more than 20 tokens back does not move anything
    far = PromptChunks.from_text(words(50) + " , " + words(40, "v"), tok)
    assert far.ids[0][76] == 2 and far.ids[0][75] != 2


def test_padding_and_alignment():
    tok = WordTokenizer()
    short, long = PromptChunks.from_text("a", tok), PromptChunks.from_text(words(100), tok)
    a, b = align_chunks(short, long)
    assert a.num_chunks == b.num_chunks == 2
    assert a.ids[1] == [1, 2] + [0] * 75 and a.weights[1] == [1.0] * 77
    with pytest.raises(ValueError):
        long.padded_to(1)


# ---------------------------------------------------------------------------------------------------------
# textual inversion
# ---------------------------------------------------------------------------------------------------------


def tiny_library(n: int = 3) -> EmbeddingLibrary:
    lib = EmbeddingLibrary(widths={"clip_l": 4, "clip_g": 6})
    lib.add("myemb", torch.arange(n * 4, dtype=torch.float32).reshape(n, 4), torch.ones(n, 6))
    return lib


def test_embedding_placeholders_and_overrides():
    tok = WordTokenizer()
    lib = tiny_library(3)
    chunks = PromptChunks.from_text("a (myemb:1.2), b", tok, embeddings=lib)
    a = tok.encode("a")[0]
    assert chunks.ids[0][:8] == [
        1,
        a,
        PLACEHOLDER_ID,
        PLACEHOLDER_ID,
        PLACEHOLDER_ID,
        3,
        tok.encode("b")[0],
        2,
    ]
    assert chunks.weights[0][2:5] == [1.2, 1.2, 1.2]
    assert [(o.chunk, o.offset, o.name, o.length) for o in chunks.overrides] == [(0, 2, "myemb", 3)]
    assert chunks.token_count == 6


def test_embedding_never_straddles_chunks():
    tok = WordTokenizer()
    chunks = PromptChunks.from_text(words(74) + " myemb", tok, embeddings=tiny_library(3))
    assert chunks.num_chunks == 2 and chunks.ids[0][75] == 2  # 74 words, then the chunk closes
    assert [(o.chunk, o.offset) for o in chunks.overrides] == [(1, 1)]


def test_embedding_moves_with_comma_backtrack():
    tok = WordTokenizer()
    chunks = PromptChunks.from_text(words(70) + " , myemb w", tok, embeddings=tiny_library(4))
    # tokens 0..69 words, 70 ',', 71..74 myemb; 'w' arrives with the chunk full -> myemb moves on
    assert [(o.chunk, o.offset) for o in chunks.overrides] == [(1, 1)]
    assert chunks.ids[1][1:6] == [PLACEHOLDER_ID] * 4 + [tok.encode("w")[0]]


def test_build_input_embeddings_writes_vectors():
    tok = WordTokenizer()
    lib = tiny_library(2)
    chunks = PromptChunks.from_text("x myemb y", tok, embeddings=lib)
    table = torch.nn.Embedding(200, 4)
    embeds = build_input_embeddings(chunks, table, lib, "clip_l")
    assert embeds.shape == (1, 77, 4)
    torch.testing.assert_close(embeds[0, 2:4], lib["myemb"].vectors["clip_l"], rtol=0, atol=0)
    expected = table(torch.tensor(chunks.ids))
    torch.testing.assert_close(embeds[0, 4:], expected[0, 4:], rtol=0, atol=0)
    with pytest.raises(ValueError, match="width"):
        build_input_embeddings(chunks, table, lib, "clip_g")
    with pytest.raises(ValueError, match="library"):
        build_input_embeddings(chunks, table, None, "clip_l")


def test_library_loads_sdxl_safetensors(tmp_path):
    def sdxl_file(path, n=2, g_width=1280):
        save_file({"clip_l": torch.randn(n, 768), "clip_g": torch.randn(n, g_width)}, str(path))

    sdxl_file(tmp_path / "good.safetensors")
    sdxl_file(tmp_path / "wide.safetensors", g_width=1024)
    save_file({"emb_params": torch.randn(2, 768)}, str(tmp_path / "sd1.safetensors"))
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 40)
    (tmp_path / "old.pt").write_bytes(b"pickle")
    lib = EmbeddingLibrary()
    good = lib.load(tmp_path / "good.safetensors")
    assert good.name == "good" and good.num_vectors == 2 and "good" in lib and lib.names == ["good"]
    for bad in ("sd1.safetensors", "wide.safetensors", "junk.safetensors", "old.pt"):
        with pytest.raises(ValueError):
            lib.load(tmp_path / bad)
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    sdxl_file(tree / "a.safetensors", n=1)
    sdxl_file(tree / "sub" / "b.safetensors", n=3)
    loaded = EmbeddingLibrary().load_dir(tree)
    assert [(e.name, e.num_vectors) for e in loaded] == [("a", 1), ("b", 3)]


# ---------------------------------------------------------------------------------------------------------
# weights on hidden states
# ---------------------------------------------------------------------------------------------------------


def test_apply_weights_modes():
    torch.manual_seed(0)
    hidden = torch.randn(2, 2 * 77, 8) + 0.5
    weights = torch.ones(2 * 77)
    weights[3], weights[80] = 1.5, 0.7
    no_norm = apply_weights(hidden, weights, "no_norm")
    torch.testing.assert_close(no_norm, hidden * weights[None, :, None])
    original = apply_weights(hidden, weights, "original")
    for b in range(2):
        for c in range(2):  # each 77-token chunk keeps its mean (A1111's "Original")
            part = slice(77 * c, 77 * (c + 1))
            # A1111's formula for one chunk of one prompt, written out: tolerance 1e-6 (float32)
            z, w = hidden[b, part], weights[part]
            a1111 = z * w[:, None] * (z.mean() / (z * w[:, None]).mean())
            torch.testing.assert_close(original[b, part], a1111, rtol=1e-6, atol=1e-6)
            assert abs(original[b, part].mean() - z.mean()) < 1e-6
    assert torch.equal(apply_weights(hidden, torch.ones(154), "original"), hidden)
    assert apply_weights(hidden, weights, "ignore") is hidden
    with pytest.raises(ValueError):
        apply_weights(hidden, weights, "compel")
    with pytest.raises(ValueError):
        apply_weights(hidden[:, :100], weights[:100])


def test_apply_weights_half_precision_and_zero_mean():
    hidden = torch.zeros(1, 77, 4, dtype=torch.float16)
    out = apply_weights(hidden, [2.0] * 77)
    assert out.dtype == torch.float16 and torch.isfinite(out.float()).all()


# ---------------------------------------------------------------------------------------------------------
# property-based tests
# ---------------------------------------------------------------------------------------------------------

SYNTAX = list("ab ,.()[]:|\\<>0123456789-+e\n") + ["BREAK", "lora", "1.5", ":0.5]", "<lora:", "(x:1.3)"]
any_prompt = st.one_of(st.text(max_size=60), st.lists(st.sampled_from(SYNTAX), max_size=30).map("".join))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(any_prompt)
def test_fuzz_parsers_raise_only_prompt_error(text):
    """Any string parses or raises PromptError; weights are finite, and positive unless the prompt itself
    wrote a zero or negative weight."""
    try:
        fragments = parse_prompt_attention(text)
    except PromptError:
        fragments = None
    if fragments is not None:
        assert fragments
        weights = [w for t, w in fragments if (t, w) != BREAK_MARKER]
        assert all(math.isfinite(w) for w in weights)
        explicit = re.findall(r":\s*([+-]?[.\d]+)\s*\)", text)
        if all(re.fullmatch(r"\+?\d*\.?\d*", e) and any(ch in "123456789" for ch in e) for e in explicit):
            assert all(w > 0 for w in weights)
        chunks = PromptChunks.from_text(text, WordTokenizer())
        assert all(len(ids) == CHUNK_LENGTH and ids[0] == 1 and 2 in ids for ids in chunks.ids)
    try:
        schedule = schedule_prompt(text, 7)
    except PromptError:
        schedule = None
    if schedule is not None:  # strictly increasing end steps within 1..7, the last one 7
        ends = [end for end, _ in schedule]
        assert ends == sorted(set(ends)) and ends[0] >= 1 and ends[-1] == 7
    for call in (lambda: extract_networks(text), lambda: prepare_prompt(text, 3)):
        try:
            call()
        except PromptError:
            pass


def _literal(chars: str) -> st.SearchStrategy[tuple[str, str]]:
    """(source, plain) pairs for text with no syntax in it: lowercase words, spaces and punctuation."""
    return st.text(alphabet=chars, min_size=1, max_size=6).map(lambda s: (s, s))


ESCAPES = st.sampled_from(
    [("\\(", "("), ("\\)", ")"), ("\\[", "["), ("\\]", "]"), ("\\\\", "\\"), ("\\:", ":")]
)


LEAVES = st.one_of(_literal("abc xyz,.!"), ESCAPES).map(lambda p: (p[0], [(ch, 1.0) for ch in p[1]]))


def _wrap(open_: str, close: str, factor: float):
    def build(items):
        source = open_ + "".join(s for s, _ in items) + close
        return source, [(ch, w * factor) for _, chars in items for ch, w in chars]

    return build


def _groups(children):
    """Bracket groups around `children`, as (source text, [(char, weight), ...]) built bottom-up, so the
    expected per-character weights are known without running any parser."""
    some = st.lists(children, min_size=1, max_size=3)
    return st.one_of(
        some.map(_wrap("(", ")", 1.1)),
        some.map(_wrap("[", "]", 1 / 1.1)),
        st.tuples(some, st.sampled_from([0.5, 1.3, 2.0, 0.25])).map(
            lambda t: _wrap("(", f":{t[1]})", t[1])(t[0])
        ),
    )


structured = st.lists(st.recursive(LEAVES, _groups, max_leaves=12), max_size=6).map(
    lambda items: ("".join(s for s, _ in items), [c for _, chars in items for c in chars])
)


@settings(max_examples=300, deadline=None)
@given(structured)
def test_parse_keeps_the_unescaped_text_and_nests_weights(case):
    """Concatenated fragments equal the input without its syntax, and every character carries the product
    of its brackets' factors."""
    source, expected = case
    fragments = parse_prompt_attention(source)
    got = [(ch, w) for text, w in fragments for ch in text]
    assert "".join(ch for ch, _ in got) == "".join(ch for ch, _ in expected)
    for (ch, w), (_, want) in zip(got, expected, strict=True):
        assert w == pytest.approx(want, rel=1e-12), (source, ch)
