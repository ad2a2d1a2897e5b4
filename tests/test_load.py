"""A small run of bench/load_test.py: the real server process on loopback with the shipped default model,
30 submissions from 6 concurrent clients into a queue of 8, so some are refused with 429. Every accepted job
must complete exactly once (unique ids, one image each, the output folder and the SQLite store holding
exactly those)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_load_test_exactly_once_with_429s(tmp_path):
    spec = importlib.util.spec_from_file_location("load_test", ROOT / "bench" / "load_test.py")
    load_test = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(load_test)
    args = load_test.parser().parse_args(["--requests", "30", "--clients", "6", "--queue-size", "8",
                                          "--size", "64", "--steps", "2", "--timeout", "240",
                                          "--data-dir", str(tmp_path / "server")])
    r = load_test.run(args)
    assert r["exactly_once"], r["problems"]
    assert r["accepted"] + r["rejected_429"] == 30 and r["other_status"] == []
    assert r["accepted"] >= 8  # the queue's worth at least (the worker may take some off meanwhile)
    assert r["completed"] == r["accepted"]
    assert len(list((tmp_path / "server" / "outputs").glob("*.png"))) == r["accepted"]
