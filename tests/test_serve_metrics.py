"""GET /metrics (Prometheus text format, written by hand in serve/metrics.py) and GET /workers on the
one-process server (a tiny random-weight pipeline in this process).

The format is checked line by line against the exposition rules (HELP and TYPE before a family's
samples, `_total` counters, cumulative histogram buckets ending in +Inf equal to `_count`, escaped label
values), and, since prometheus_client happens to be installed here (it is no dependency of sdxl), with
its parser too when it can be imported.
"""

from __future__ import annotations

import math
import re

from fastapi.testclient import TestClient

from conftest import tiny_pipeline
from sdxl.serve.app import create_app
from sdxl.serve.metrics import Exposition, Histogram, ServeMetrics, escape_label
from sdxl.serve.settings import ServeSettings

LABEL = r'[a-zA-Z_][a-zA-Z0-9_]*="(?:\\.|[^"\\\n])*"'
SAMPLE = re.compile(rf"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{{{LABEL}(?:,{LABEL})*\}})? (?P<value>\S+)$")


def check_exposition(text: str) -> dict[str, float]:
    """Validate the text format by hand; returns {series: value}."""
    assert text.endswith("\n") and not text.endswith("\n\n")
    families: dict[str, str] = {}  # name -> type
    helped: set[str] = set()
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name = line.split(" ")[2]
            assert name not in helped, f"second HELP for {name}"
            helped.add(name)
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert name in helped and name not in families, line
            assert kind in ("counter", "gauge", "histogram"), line
            if kind == "counter":
                assert name.endswith("_total"), f"counter {name} must end in _total"
            families[name] = kind
            continue
        m = SAMPLE.match(line)
        assert m, f"not a sample line: {line!r}"
        name = m.group("name")
        family = re.sub(r"_(bucket|sum|count)$", "", name) if name not in families else name
        assert family in families, f"{name} has no TYPE before it"
        value = m.group("value")
        assert value in ("+Inf", "-Inf", "NaN") or math.isfinite(float(value)), line
        values[line.rsplit(" ", 1)[0]] = float(value)
    for name, kind in families.items():
        if kind == "histogram":
            buckets = [(k, v) for k, v in values.items() if k.startswith(f"{name}_bucket{{")]
            assert buckets and buckets[-1][0].endswith('le="+Inf"}')
            counts = [v for _, v in buckets]
            assert counts == sorted(counts), f"{name} buckets are not cumulative"
            assert counts[-1] == values[f"{name}_count"]
    return values


def test_exposition_pieces():
    h = Histogram((1.0, 5.0))
    for v in (0.5, 2.0, 7.0, float("nan")):
        h.observe(v)
    assert h.lines("x") == ['x_bucket{le="1"} 1', 'x_bucket{le="5"} 2', 'x_bucket{le="+Inf"} 3', "x_sum 9.5",
                            "x_count 3"]
    assert escape_label('a"b\\c\nd') == 'a\\"b\\\\c\\nd'
    e = Exposition()
    e.family("t_total", "counter", "line one\nline two \\", [({"k": 'q"uote'}, 2)])
    assert e.text() == ('# HELP t_total line one\\nline two \\\\\n# TYPE t_total counter\n'
                        't_total{k="q\\"uote"} 2\n')
    m = ServeMetrics()
    m.job_submitted("api")
    m.job_finished("failed", 0.3, 0.2)
    m.worker_lost()

    class Manager:
        def workers(self):
            return [{"name": 'w"0', "device": "cpu", "busy": True, "alive": True, "jobs_done": 2,
                     "jobs_failed": 1, "restarts": 1}]

        def queued_count(self):
            return 4

    values = check_exposition(m.render(Manager()))
    assert values['sdxl_errors_total{kind="job"}'] == 1
    assert values['sdxl_errors_total{kind="worker_lost"}'] == 1
    assert values['sdxl_worker_busy{worker="w\\"0",device="cpu"}'] == 1
    assert values["sdxl_queue_length"] == 4 and values["sdxl_jobs_running"] == 1
    assert values['sdxl_job_latency_seconds_bucket{le="0.25"}'] == 0
    assert values['sdxl_job_latency_seconds_bucket{le="0.5"}'] == 1


def test_metrics_and_workers_on_the_one_process_server(tmp_path):
    app = create_app(ServeSettings(data_dir=tmp_path / "data"), pipeline=tiny_pipeline())
    with TestClient(app, base_url="http://127.0.0.1") as client:
        before = check_exposition(client.get("/metrics").text)
        ok = client.post("/jobs", json={"prompt": "a", "width": 64, "height": 64, "steps": 3, "seed": 1})
        bad = client.post("/jobs", json={"prompt": "b", "width": 64, "height": 64, "steps": 2, "seed": 2,
                                         "model": "nothing-here"})
        assert ok.status_code == 202 and bad.status_code == 404  # refused before queueing: not counted
        app.state.manager.wait_idle(60)
        # a job that fails while running counts as an error
        app.state.manager.models.get = lambda name: (_ for _ in ()).throw(RuntimeError("boom"))
        client.post("/jobs", json={"prompt": "c", "width": 64, "height": 64, "steps": 2, "seed": 3})
        app.state.manager.wait_idle(60)
        response = client.get("/metrics")
        assert response.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
        after = check_exposition(response.text)
        delta = {k: after[k] - before.get(k, 0) for k in after}
        assert delta['sdxl_jobs_submitted_total{source="api"}'] == 2
        assert delta['sdxl_jobs_finished_total{status="done"}'] == 1
        assert delta['sdxl_jobs_finished_total{status="failed"}'] == 1
        assert delta['sdxl_errors_total{kind="job"}'] == 1
        assert delta['sdxl_sampler_steps_total{worker="local"}'] == 3
        assert delta["sdxl_job_latency_seconds_count"] == 2
        assert after['sdxl_steps_per_second{worker="local"}'] > 0
        assert after['sdxl_worker_up{worker="local",device="cpu"}'] == 1
        assert after["sdxl_queue_length"] == 0
        try:
            from prometheus_client.parser import text_string_to_metric_families  # not a dependency
        except ImportError:
            text_string_to_metric_families = None
        if text_string_to_metric_families is not None:
            names = {f.name: f.type for f in text_string_to_metric_families(response.text)}
            assert names["sdxl_jobs_finished"] == "counter"
            assert names["sdxl_job_latency_seconds"] == "histogram"
            assert names["sdxl_worker_busy"] == "gauge"
        workers = client.get("/workers").json()
        assert workers["queued"] == 0 and len(workers["workers"]) == 1
        w = workers["workers"][0]
        assert w["name"] == "local" and w["alive"] and w["jobs_done"] == 1 and w["jobs_failed"] == 1
        assert w["current_job"] is None and w["loaded"]["model"] == "<preset>" and w["device"] == "cpu"
