"""Fuzz tests (hypothesis) for the readers of untrusted files: safetensors headers, checkpoints, PNG metadata.

The promise under test: a hostile or damaged file either reads correctly or fails with the one documented
exception (`CheckpointError` for tensor files; nothing at all for metadata, which reports problems under
"error"), never any other exception, never a hang. Every test is derandomized with a fixed example budget
so CI runs the same inputs each time; the budgets keep each test well under 20 s on one CPU core.
For a longer, randomized local run: `SDXL_FUZZ_SCALE=20 pytest tests/test_fuzz.py`.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
import tempfile
import time
import zlib
from io import BytesIO
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from sdxl.metadata import info_from_chunks, parse_a1111, read_info
from sdxl.models.config import ModelConfig, tiny_config
from sdxl.models.factory import build_modules
from sdxl.weights.checkpoint import Checkpoint, read_checkpoint, single_file_state
from sdxl.weights.io import (
    DTYPES,
    CheckpointError,
    SafetensorsFile,
    open_tensors,
    parse_header,
    save_safetensors,
)

# SDXL_FUZZ_SCALE=20 multiplies every budget and draws fresh random inputs (a longer local fuzzing run);
# unset, CI tries the same fixed inputs every time.
FUZZ_SCALE = float(os.environ.get("SDXL_FUZZ_SCALE", "0") or 0)


def fuzz_settings(n: int):
    """A fixed, reproducible budget of `n` examples; no per-example deadline (CI machines are shared)."""
    return settings(
        max_examples=int(n * FUZZ_SCALE) if FUZZ_SCALE else n,
        derandomize=not FUZZ_SCALE,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


@pytest.fixture(scope="module")
def workdir():
    with tempfile.TemporaryDirectory(prefix="sdxl_fuzz_") as d:
        yield Path(d)


# -------------------------------------------------------------------------------------------- strategies
json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=12),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
small_ints = st.integers(min_value=-3, max_value=300)
any_ints = st.one_of(small_ints, st.integers(min_value=-(2**70), max_value=2**70), st.booleans())
header_entry = st.fixed_dictionaries(
    {},
    optional={
        "dtype": st.one_of(st.sampled_from(sorted(DTYPES)), json_values),
        "shape": st.one_of(
            st.lists(st.integers(-1, 6), max_size=4), st.lists(any_ints, max_size=4), json_values
        ),
        "data_offsets": st.one_of(
            st.lists(small_ints, min_size=2, max_size=2), st.lists(any_ints, max_size=3), json_values
        ),
    },
)
headers = st.dictionaries(
    st.one_of(st.text(max_size=10), st.just("__metadata__")),
    st.one_of(header_entry, json_values, st.dictionaries(st.text(max_size=6), st.text(max_size=6))),
    max_size=5,
)


def check_entries(entries: dict, data_size: int) -> None:
    """What a successful parse promises: known dtypes, sizes that match, in range, no overlaps."""
    spans = []
    for dtype, shape, begin, end in entries.values():
        assert dtype in DTYPES
        assert all(type(s) is int and s >= 0 for s in shape)
        assert type(begin) is int and type(end) is int and 0 <= begin <= end <= data_size
        assert end - begin == math.prod(shape) * DTYPES[dtype][1]
        if end > begin:
            spans.append((begin, end))
    spans.sort()
    assert all(b1 >= e0 for (_, e0), (b1, _) in zip(spans, spans[1:]))


def safetensors_bytes(header, data: bytes) -> bytes:
    """A safetensors file: u64 header length, the header (JSON of `header`, or raw bytes), the data."""
    head = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(head)) + head + data


def read_all(f: SafetensorsFile, raw: bytes) -> None:
    """Read every tensor; each must have its declared shape and be exactly its bytes of the file."""
    for key in f:
        dtype, shape, begin, end = f.entries[key]
        t = f[key]
        assert tuple(t.shape) == shape and t.dtype == DTYPES[dtype][0]
        assert f.data_start + end <= len(raw)
        got = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        assert got == raw[f.data_start + begin : f.data_start + end]


# ------------------------------------------------------------------------------------ safetensors header
@fuzz_settings(400)
@given(header=headers, data_size=st.integers(0, 400))
def test_parse_header_jsonish_headers(header, data_size):
    try:
        entries, metadata = parse_header(json.dumps(header).encode(), data_size)
    except CheckpointError as e:
        assert "\n" not in str(e) and len(str(e)) < 400
        return
    check_entries(entries, data_size)
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())


@fuzz_settings(300)
@given(head=st.one_of(st.binary(max_size=64), st.text(max_size=64).map(str.encode)), n=st.integers(0, 64))
def test_parse_header_arbitrary_bytes(head, n):
    try:
        entries, _ = parse_header(head, n)
    except CheckpointError:
        return
    check_entries(entries, n)


def test_parse_header_hostile_json_shapes():
    """Cases the fuzzer found or that are too rare to draw: each must be a CheckpointError, not a crash."""
    cases = [
        b"[" * 100_000 + b"]" * 100_000,  # deep nesting: RecursionError inside json
        b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
        b'{"a": {"dtype": "F32", "shape": [' + b"1" * 5000 + b'], "data_offsets": [0, 4]}}',  # 5000 digits
        json.dumps({"a": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}).encode(),  # unhashable
        json.dumps({"a": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}).encode(),  # bool size
        json.dumps({"a": {"dtype": "F32", "shape": [1], "data_offsets": [False, 4]}}).encode(),
        json.dumps({"a": {"dtype": "F32", "shape": [0, 10**30], "data_offsets": [0, 0]}}).encode(),
        json.dumps({"a": {"dtype": "F32", "shape": [0, 2**62, 2**62], "data_offsets": [0, 0]}}).encode(),
        json.dumps({"a": {"dtype": "F32", "shape": [-1] * 100_000, "data_offsets": [0, 0]}}).encode(),
    ]
    for head in cases:
        with pytest.raises(CheckpointError) as info:
            parse_header(head, 4)
        assert len(str(info.value)) < 300  # one short line, even for a megabyte shape list


# ------------------------------------------------------------------------------------ safetensors files
def _valid_small_file() -> tuple[dict, bytes]:
    """A small valid file's header and data: several dtypes, a scalar and an empty tensor."""
    tensors = {
        "a": torch.arange(12, dtype=torch.float32).reshape(3, 4),
        "b": torch.arange(5, dtype=torch.int64),
        "c": torch.ones(2, 2, dtype=torch.float16),
        "d": torch.tensor(7, dtype=torch.int8),
        "e": torch.zeros(0, 3, dtype=torch.bfloat16),
        "f": torch.tensor([True, False, True]),
    }
    buf = BytesIO()
    with tempfile.TemporaryDirectory() as d:
        p = save_safetensors(tensors, Path(d) / "v.safetensors", {"k": "v"})
        buf.write(p.read_bytes())
    raw = buf.getvalue()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


VALID_HEADER, VALID_DATA = _valid_small_file()


key_index = st.integers(0, 10_000)  # which key an operation applies to (modulo the key count)

# One mutation of the small valid file: (operation, key index, argument), plain data so a failing example
# prints readably. Header operations run first, then byte-level ones on the serialised file.
file_ops = st.lists(
    st.one_of(
        st.tuples(st.just("dtype"), key_index, st.one_of(st.sampled_from(sorted(DTYPES)), json_values)),
        st.tuples(
            st.just("shape"), key_index, st.one_of(st.lists(st.integers(-1, 13), max_size=4), json_values)
        ),
        st.tuples(st.just("offsets"), key_index, st.tuples(st.integers(-8, 8), st.integers(-8, 8))),
        st.tuples(st.just("drop"), key_index, st.none()),
        st.tuples(st.just("junk"), key_index, json_values),
        st.tuples(st.just("swap"), key_index, key_index),
        st.tuples(st.just("metadata"), st.none(), json_values),
        st.tuples(
            st.just("bytes"), st.none(), st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255)), max_size=4)
        ),
        st.tuples(st.just("cut"), st.none(), st.floats(0, 1)),
        st.tuples(st.just("length"), st.none(), st.integers(0, 2**64 - 1)),
    ),
    min_size=1,
    max_size=3,
)


def apply_file_ops(ops: list) -> bytes:
    """The small valid file with `file_ops` applied (operations on entries already turned to junk are
    skipped, so every op list gives some file)."""
    header = json.loads(json.dumps(VALID_HEADER))
    for op, where, arg in ops:
        keys = sorted(k for k in header if k != "__metadata__")
        key = keys[where % len(keys)] if isinstance(where, int) and keys else None
        entry = header.get(key) if key is not None else None
        if op == "metadata":
            header["__metadata__"] = arg
        elif not isinstance(entry, dict):
            continue
        elif op in ("dtype", "shape"):
            entry[op] = arg
        elif op == "offsets" and isinstance(entry.get("data_offsets"), list):
            entry["data_offsets"] = [v + d for v, d in zip(entry["data_offsets"], arg)]
        elif op == "drop":
            del header[key]
        elif op == "junk":
            header[key] = arg
        elif op == "swap" and isinstance(header.get(keys[arg % len(keys)]), dict):
            other = header[keys[arg % len(keys)]]
            entry["data_offsets"], other["data_offsets"] = (
                other.get("data_offsets"),
                entry.get("data_offsets"),
            )
    raw = safetensors_bytes(header, VALID_DATA)
    for op, _, arg in ops:
        if op == "bytes":
            raw = bytearray(raw)
            for at, value in arg:
                raw[min(int(at * len(raw)), len(raw) - 1)] = value
            raw = bytes(raw)
        elif op == "cut":
            raw = raw[: int(arg * len(raw))]
        elif op == "length":
            raw = struct.pack("<Q", arg) + raw[8:]
    return raw


@fuzz_settings(300)
@given(
    raw=st.one_of(
        file_ops.map(apply_file_ops),
        st.binary(max_size=300),
        st.builds(safetensors_bytes, headers, st.binary(max_size=64)),
    )
)
def test_open_tensors_mutated_and_arbitrary_files(workdir, raw):
    p = workdir / "fuzz.safetensors"
    p.write_bytes(raw)
    try:
        f = open_tensors(p)
    except CheckpointError as e:
        assert "\n" not in str(e) and str(p) in str(e)
        return
    assert isinstance(f, SafetensorsFile)
    check_entries(f.entries, len(raw) - f.data_start)
    read_all(f, raw)


def test_open_tensors_reads_the_unmutated_file(workdir):
    """The fuzz target's baseline: without mutations every tensor reads back with its shape and bytes."""
    raw = safetensors_bytes(VALID_HEADER, VALID_DATA)
    p = workdir / "valid.safetensors"
    p.write_bytes(raw)
    f = open_tensors(p)
    assert sorted(f) == ["a", "b", "c", "d", "e", "f"] and f.metadata == {"k": "v"}
    read_all(f, raw)
    assert torch.equal(f["a"], torch.arange(12, dtype=torch.float32).reshape(3, 4))


# ---------------------------------------------------------------------------------------- checkpoints
def _official_header(config: ModelConfig, metadata: dict | None = None) -> tuple[dict, int]:
    """The safetensors header of `config`'s official single file (as `save_safetensors` lays it out) and
    its data size, computed from meta tensors: no weights are made."""
    mods = build_modules(config, device="meta")
    state = single_file_state(config, {k: m.state_dict() for k, m in mods.items()})
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for key in sorted(state):
        t = state[key]
        n = t.numel() * t.element_size()
        dtype = {torch.float32: "F32", torch.int64: "I64"}[t.dtype]
        header[key] = {"dtype": dtype, "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    return header, offset


def write_sparse(path: Path, header: dict, data_size: int, cut: int | None = None) -> Path:
    """Header, then `data_size` zero bytes as a hole (instant, no disk): detection reads only the header,
    and tensor views of zeros read fine. `cut` truncates the file there."""
    head = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head)
        f.truncate(8 + len(head) + data_size if cut is None else cut)
    return path


@pytest.fixture(scope="module")
def official() -> tuple[dict, int]:
    """tiny_config's official layout with no config metadata: detection reads every number off the
    tensor shapes, which is what the mutations below attack."""
    return _official_header(tiny_config())


def test_unmutated_official_header_is_detected(official, workdir):
    header, size = official
    ck = read_checkpoint(write_sparse(workdir / "official.safetensors", header, size))
    assert ck.config.kind == "base" and ck.config.unet.channel_mult == (1, 2, 4)
    assert ck.config.text_l.width == 32 and set(ck.parts) == {"unet", "vae", "text_l", "text_g"}


_CONFIG_DICT = tiny_config().to_dict()
_SAME_ITEM_SIZE = {"F32": "I32", "I32": "F32", "F16": "BF16", "BF16": "F16", "I64": "F64", "F64": "I64"}
_PREFIXES = [
    "model.diffusion_model.",
    "first_stage_model.",
    "conditioner.embedders.0.model.",
    "conditioner.embedders.1.model.",
    "conditioner.embedders.0.transformer.text_model.",
    "",
]

# One mutation of a checkpoint header: (operation, key index, argument). Kept as plain data so that a
# failing example prints a few tuples, not a 100 KB header.
new_names = st.tuples(st.sampled_from(_PREFIXES), st.text(max_size=12))
config_parts = st.sampled_from(["unet", "vae", "text_l", "text_g", ""])
predictions = st.sampled_from(["v", "epsilon", "v_prediction", ""])
checkpoint_ops = st.lists(
    st.one_of(
        st.tuples(st.just("reshape"), key_index, st.integers(0, 5)),
        st.tuples(st.just("swap"), key_index, key_index),
        st.tuples(st.just("drop"), key_index, st.none()),
        st.tuples(st.just("renumber"), key_index, st.integers(0, 12)),
        st.tuples(st.just("rename"), key_index, new_names),
        st.tuples(st.just("retype"), key_index, st.none()),
        st.tuples(st.just("config"), config_parts, st.one_of(json_values, st.integers(-2, 3))),
        st.tuples(st.just("config_text"), st.none(), st.text(max_size=20)),
        st.tuples(st.just("prediction"), st.none(), predictions),
    ),
    min_size=1,
    max_size=3,
)


def _reshapes(shape: list[int]) -> list[list[int]]:
    """Other shapes with the same number of elements (so the header stays self-consistent)."""
    n = math.prod(shape)
    out = [[n], [1, n], list(reversed(shape)), [*shape, 1], [n, 1, 1, 1]]
    if len(shape) >= 2:
        out.append([shape[0] * shape[1], *shape[2:]])
    return out


def apply_checkpoint_ops(header: dict, ops: list) -> dict:
    """Apply `checkpoint_ops` to a copy of `header`. All of them keep parse_header happy (sizes match,
    nothing overlaps), so they reach architecture detection and layout conversion."""
    header = json.loads(json.dumps(header))
    for op, where, arg in ops:
        keys = sorted(k for k in header if k != "__metadata__")
        key = keys[where % len(keys)] if isinstance(where, int) and keys else None
        if op == "reshape":
            options = _reshapes(header[key]["shape"])
            header[key]["shape"] = options[arg % len(options)]
        elif op == "swap":  # two tensors trade places: both entries stay valid
            a, b = header[key], header[keys[arg % len(keys)]]
            for field in ("shape", "data_offsets", "dtype"):
                a[field], b[field] = b[field], a[field]
        elif op == "drop":
            del header[key]
        elif op in ("renumber", "rename"):
            if op == "renumber":
                new = re.sub(r"\d+", str(arg), key, count=1)
            else:
                new = arg[0] + arg[1]
            if new not in header:
                header[new] = header.pop(key)
        elif op == "retype":  # same item size, different meaning
            header[key]["dtype"] = _SAME_ITEM_SIZE.get(header[key]["dtype"], header[key]["dtype"])
        elif op == "config":  # the recorded config with one field replaced by arbitrary JSON
            config = json.loads(json.dumps(_CONFIG_DICT))
            target = config if where == "" else config[where]
            target[sorted(target)[len(str(arg)) % len(target)]] = arg
            header.setdefault("__metadata__", {})["sdxl.config"] = json.dumps(config)
        elif op == "config_text":
            header.setdefault("__metadata__", {})["sdxl.config"] = arg
        elif op == "prediction":
            header.setdefault("__metadata__", {})["modelspec.prediction_type"] = arg
    return header


def check_checkpoint_or_error(path: Path) -> Checkpoint | None:
    """read_checkpoint either succeeds with readable tensors or raises a one-line CheckpointError."""
    try:
        ck = read_checkpoint(path)
    except CheckpointError as e:
        assert "\n" not in str(e)
        return None
    assert isinstance(ck, Checkpoint) and isinstance(ck.config, ModelConfig)
    for part in ck.parts.values():
        for t in part.values():
            assert isinstance(t, torch.Tensor)
            t.reshape(-1)[:1].clone()  # touch the memory map: every view lies inside the file
    return ck


@fuzz_settings(150)
@given(ops=checkpoint_ops)
def test_read_checkpoint_mutated_headers(official, workdir, ops):
    header, size = official
    check_checkpoint_or_error(
        write_sparse(workdir / "mutated.safetensors", apply_checkpoint_ops(header, ops), size)
    )


@fuzz_settings(80)
@given(
    cut=st.one_of(st.none(), st.floats(0, 1)),
    flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), max_size=4),
)
def test_read_checkpoint_truncated_and_flipped(official, workdir, cut, flips):
    """Truncated anywhere (header or data), or bytes of the header overwritten."""
    header, size = official
    path = write_sparse(workdir / "damaged.safetensors", header, size)
    total = path.stat().st_size
    head_end = 8 + len(json.dumps(header).encode())
    with open(path, "r+b") as f:
        for at, value in flips:
            f.seek(int(at * head_end))
            f.write(bytes([value]))
        if cut is not None:
            f.truncate(int(cut * total))
    check_checkpoint_or_error(path)


def test_header_length_with_pickle_like_first_byte(workdir):
    """A header length whose low byte is 0x80 (one file in 32, as headers are padded to 8 bytes) made
    the pickle sniff refuse a valid safetensors file. Both sides of the sniff are checked here."""
    opened = 0
    for n in range(50, 100):  # header lengths 104..152: 128 = 0x80 is among them
        path = save_safetensors({"k" * n: torch.zeros(1)}, workdir / "sniff.safetensors")
        first = path.read_bytes()[0]
        assert sorted(open_tensors(path)) == ["k" * n]
        opened += first == 0x80
    assert opened >= 1  # the loop did meet the case
    pickled = workdir / "really_a_pickle.safetensors"
    torch.save({"a": torch.zeros(1)}, pickled)
    with pytest.raises(CheckpointError, match="pickle"):
        open_tensors(pickled)


def test_random_tensors_are_not_an_sdxl_checkpoint(workdir):
    """A perfectly valid safetensors file that is not a model: one clear error, not a half-loaded model."""
    g = torch.Generator().manual_seed(0)
    tensors = {f"layer{i}.weight": torch.randn(8, 8, generator=g) for i in range(5)}
    path = save_safetensors(tensors, workdir / "random.safetensors")
    with pytest.raises(CheckpointError, match="not an SDXL checkpoint"):
        read_checkpoint(path)


@pytest.mark.parametrize(
    "config_json",
    [
        "[1, 2]",  # a list where an object belongs (was AttributeError)
        '{"unet": {"model_channels": "wide"}}',  # a string where a size belongs
        '{"unet": {"head_dim": 0}}',
        '{"text_l": {"width": -32}}',
        '{"vae": {"scale_factor": "NaN"}}',
        '{"kind": "video"}',
        "[" * 100_000,
    ],
)
def test_lying_config_metadata_is_refused(workdir, config_json):
    path = save_safetensors(
        {"x": torch.zeros(1)}, workdir / "lying.safetensors", {"sdxl.config": config_json}
    )
    with pytest.raises(CheckpointError, match="sdxl.config"):
        read_checkpoint(path)


def test_detection_of_one_dimensional_unet_weights(workdir):
    """Shapes with fewer dimensions than detection unpacks (was ValueError from tuple unpacking)."""
    tensors = {
        "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4),
        "model.diffusion_model.label_emb.0.0.weight": torch.zeros(4),
    }
    path = save_safetensors(tensors, workdir / "flat.safetensors")
    with pytest.raises(CheckpointError, match="inconsistent tensors|missing"):
        read_checkpoint(path)


# ------------------------------------------------------------------------------------------ PNG metadata
def _chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _base_png() -> tuple[bytes, bytes, bytes]:
    """(signature + IHDR, IDAT chunks, IEND) of a small RGB PNG."""
    buf = BytesIO()
    Image.new("RGB", (4, 3), (200, 10, 30)).save(buf, format="PNG")
    raw = buf.getvalue()
    pos, head, idat = 8, raw[:8], b""
    while pos < len(raw):
        (n,) = struct.unpack(">I", raw[pos : pos + 4])
        kind, whole = raw[pos + 4 : pos + 8], raw[pos : pos + 12 + n]
        if kind == b"IHDR":
            head += whole
        elif kind == b"IDAT":
            idat += whole
        pos += 12 + n
    return head, idat, _chunk(b"IEND", b"")


PNG_HEAD, PNG_IDAT, PNG_END = _base_png()
KEYWORDS = (
    "parameters prompt workflow sdxl invokeai_metadata sd-metadata Dream fooocus_scheme Comment".split()
)
COMFY_CLASSES = (
    "KSampler KSamplerAdvanced CLIPTextEncode CLIPTextEncodeSDXL CheckpointLoaderSimple LoraLoader"
)
COMFY_INPUTS = (
    "positive negative model latent_image text text_g text_l seed steps cfg ckpt_name lora_name width height "
    "batch_size samples conditioning string denoise strength_model noise_seed sampler_name"
)
INVOKE_FIELDS = (
    "positive_prompt negative_prompt width height seed steps cfg_scale scheduler model loras clip_skip "
    "refiner_model vae strength positive_style_prompt"
)
A1111_PIECES = [
    *("Steps: ", "Sampler: ", "Size: ", "Seed: ", "CFG scale: ", "Clip skip: ", "Lora hashes: ", "Refiner: "),
    *("Hires resize: ", "Schedule type: ", "Negative prompt: ", "x", ", ", "\n", '"', "\\", ":", "[", "]"),
    *("<lora:", ">", "9" * 30, "-1", "nan", "inf", "DPM++ 2M Karras", "{", "}"),
]
links = st.tuples(st.sampled_from(["1", "2", "3", "4", 5]), st.integers(0, 2)).map(list)
comfy_nodes = st.fixed_dictionaries(
    {
        "class_type": st.sampled_from([*COMFY_CLASSES.split(), "EmptyLatentImage", "X"]),
        "inputs": st.dictionaries(
            st.sampled_from(COMFY_INPUTS.split()), st.one_of(json_values, links), max_size=8
        ),
    }
)
comfy_graphs = st.dictionaries(st.sampled_from(["1", "2", "3", "4", "5"]), comfy_nodes, max_size=5)
invoke_records = st.fixed_dictionaries({}, optional={k: json_values for k in INVOKE_FIELDS.split()})
a1111_fragments = st.lists(st.one_of(st.text(max_size=8), st.sampled_from(A1111_PIECES)), max_size=25).map(
    "".join
)
text_values = st.one_of(
    st.text(max_size=80),
    a1111_fragments,
    json_values.map(json.dumps),
    comfy_graphs.map(json.dumps),
    invoke_records.map(json.dumps),
    st.fixed_dictionaries({"request": json_values}).map(json.dumps),
)


@st.composite
def text_chunks(draw) -> bytes:
    """One well-formed tEXt, zTXt or iTXt chunk with an arbitrary keyword and value."""
    keyword = draw(st.one_of(st.sampled_from(KEYWORDS), st.binary(min_size=1, max_size=20)))
    if isinstance(keyword, str):
        keyword = keyword.encode("latin-1")
    keyword = keyword.replace(b"\0", b"_")[:79]
    value = draw(
        st.one_of(text_values.map(lambda s: s.encode("utf-8", "surrogatepass")), st.binary(max_size=60))
    )
    kind = draw(st.sampled_from([b"tEXt", b"zTXt", b"iTXt"]))
    if kind == b"tEXt":
        return _chunk(kind, keyword + b"\0" + value)
    if kind == b"zTXt":
        return _chunk(kind, keyword + b"\0\0" + zlib.compress(value))
    compressed = draw(st.booleans())
    body = zlib.compress(value) if compressed else value  # value may be invalid UTF-8
    return _chunk(kind, keyword + b"\0" + bytes([int(compressed), 0]) + b"en\0\0" + body)


@st.composite
def raw_text_chunks(draw) -> bytes:
    """A text chunk with a correct CRC but arbitrary content (no separators, bad compression, ...)."""
    return _chunk(draw(st.sampled_from([b"tEXt", b"zTXt", b"iTXt"])), draw(st.binary(max_size=40)))


SOURCES = {"sdxl", "a1111", "comfyui", "fooocus", "invokeai", "unknown"}


def _check_info(info: dict) -> None:
    assert info["source"] in SOURCES
    assert isinstance(info["parameters"], dict) and isinstance(info["raw"], dict)
    json.dumps({k: v for k, v in info.items() if k != "raw"}, default=str)  # what `sdxl info` prints


@fuzz_settings(250)
@given(before=st.lists(text_chunks(), max_size=3), after=st.lists(text_chunks(), max_size=2))
def test_read_info_png_with_arbitrary_text_chunks(workdir, before, after):
    png = PNG_HEAD + b"".join(before) + PNG_IDAT + b"".join(after) + PNG_END
    path = workdir / "fuzz.png"
    path.write_bytes(png)
    _check_info(read_info(path))  # never raises on a well-formed PNG
    with Image.open(BytesIO(png)) as image:
        _check_info(read_info(image))


@fuzz_settings(150)
@given(before=st.lists(raw_text_chunks(), max_size=2), after=st.lists(raw_text_chunks(), max_size=2))
def test_read_info_malformed_text_chunks(workdir, before, after):
    """Chunks broken at the byte level. After the pixels they are skipped; before them Pillow may refuse
    the whole file, which `read_info` passes on as OSError/ValueError (`sdxl info` prints one line)."""
    png = PNG_HEAD + b"".join(before) + PNG_IDAT + b"".join(after) + PNG_END
    path = workdir / "broken.png"
    path.write_bytes(png)
    try:
        info = read_info(path)
    except (OSError, ValueError):
        assert before, "chunks after the image data must never stop read_info"
        return
    _check_info(info)


@fuzz_settings(300)
@given(chunks=st.dictionaries(st.sampled_from(KEYWORDS), text_values, max_size=4))
def test_info_from_chunks_never_raises(chunks):
    _check_info(info_from_chunks(chunks))


@fuzz_settings(400)
@given(text=st.one_of(st.text(max_size=200), a1111_fragments))
def test_parse_a1111_never_raises(text):
    out = parse_a1111(text)
    assert isinstance(out["prompt"], str) and isinstance(out["negative_prompt"], str)
    for key in ("steps", "seed"):
        assert key not in out or type(out[key]) is int
    for key in ("cfg", "denoising_strength"):
        assert key not in out or (isinstance(out[key], float) and math.isfinite(out[key]))


# ----------------------------------------------------------------------------- found by review / fuzzing
def test_parse_a1111_is_linear_in_the_prompt_length():
    """A long prompt line without a colon once cost quadratic time (64 KB: 18 s) in the settings-line
    regex; one uploaded PNG could stall a server. 1 MB must now take well under a second."""
    line = "a " * 500_000
    start = time.perf_counter()
    out = parse_a1111(line)
    assert time.perf_counter() - start < 2.0
    assert out["prompt"] == line.strip()
    spaced = "Steps: 20, Sampler: Euler, Refiner: x" + " " * 200_000 + "y [12ab]"
    start = time.perf_counter()
    out = parse_a1111(spaced)
    assert time.perf_counter() - start < 2.0
    assert out["refiner_hash"] == "12ab" and out["steps"] == 20


def test_lora_tag_scan_is_linear():
    """'<a:' repeated without a closing '>': the LoRA-tag regex rescanned to the end of the text from every
    '<' (300 KB: four minutes). `read_info` reaches it through any PNG's `parameters` chunk."""
    text = "<a:" * 12_000 + "\nSteps: 1, Sampler: Euler, Seed: 1"
    start = time.perf_counter()
    info = info_from_chunks({"parameters": text})
    assert time.perf_counter() - start < 0.5
    assert info["source"] == "a1111" and info["parameters"]["steps"] == 1


def test_comfy_graph_with_fanned_out_text_links_is_fast():
    """A node whose six text inputs all link onward, chained 15 deep, made `_resolve_text` walk 6**15
    paths (hours). Each node is now visited once."""
    names = ("text", "string", "value", "prompt", "text_g", "text_l")
    graph = {
        "100": {"class_type": "KSampler", "inputs": {"positive": ["200", 0], "seed": 3}},
        "200": {"class_type": "CLIPTextEncode", "inputs": {"text": ["0", 0]}},
    }
    for i in range(15):
        graph[str(i)] = {"class_type": "X", "inputs": {name: [str(i + 1), 0] for name in names}}
    graph["15"] = {"class_type": "PrimitiveString", "inputs": {"value": "found me"}}
    start = time.perf_counter()
    info = info_from_chunks({"prompt": json.dumps(graph)})
    assert time.perf_counter() - start < 1.0
    assert info["source"] == "comfyui" and info["parameters"]["prompt"] == "found me"
    assert info["parameters"]["seed"] == 3
