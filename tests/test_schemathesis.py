"""Property-based API testing: schemathesis generates requests from the server's own OpenAPI schema
(`/openapi.json`) for every operation, valid and invalid, and checks each answer.

Runs in-process (ASGI) against the app built on a tiny random-weight SDXL, with small limits so the
synchronous A1111 routes that do generate stay fast. Asserted for every generated request:
  - not_a_server_error: no 5xx answer (a 500 is an unhandled exception: a bug);
  - response_schema_conformance: a documented status's body matches its documented schema;
  - content_type_conformance: the Content-Type is the documented one.
Not asserted: `status_code_conformance`: the routes answer 400/404/409/429 with a message the schema does not
list per route (documented once, in the module docstring of `sdxl.serve.app`).

The example budget is fixed and `derandomize=True`, so every CI run sends the same requests.
"""

from __future__ import annotations

import os
from collections import Counter

import pytest
import schemathesis
import torch
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import content_type_conformance, not_a_server_error, response_schema_conformance

from sdxl.models.config import tiny_config
from sdxl.models.text import TextEncoders
from sdxl.models.unet import UNet
from sdxl.models.vae import AutoencoderKL
from sdxl.pipeline import SDXL
from sdxl.request import Limits
from sdxl.serve.app import create_app
from sdxl.serve.settings import ServeSettings

# per operation and mode (valid / invalid data): 20 operations -> some 300 requests, ~10 s here
EXAMPLES = int(os.environ.get("SDXL_SCHEMATHESIS_EXAMPLES", "12"))  # deeper runs: set it to 200
# random bodies almost never fit the limits, so these valid ones go through the same checks too
VALID = {
    "POST /jobs": {"prompt": "a red circle", "width": 64, "height": 64, "steps": 2, "seed": 1},
    "POST /sdapi/v1/txt2img": {"prompt": "a red circle", "width": 64, "height": 64, "steps": 2, "seed": 1},
}

CHECKS = [not_a_server_error, response_schema_conformance, content_type_conformance]


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    torch.manual_seed(0)
    cfg = tiny_config()
    pipe = SDXL(cfg, UNet(cfg.unet).eval(), AutoencoderKL(cfg.vae).eval(),
                TextEncoders(cfg.text_l, cfg.text_g).eval())
    folders = tmp_path_factory.mktemp("schemathesis")
    (folders / "models" / "loras").mkdir(parents=True)
    settings_ = ServeSettings(
        data_dir=folders / "data", models_dir=folders / "models", queue_size=8, shutdown_grace_s=2,
        # small limits: the A1111 txt2img/img2img routes wait for their images
        limits=Limits(max_pixels=64 * 64, max_steps=3, max_batch=2, max_prompt_chars=200),
        max_body_bytes=2**20, job_timeout_s=20,
        allowed_hosts=["testserver"],  # schemathesis' ASGI client addresses `testserver`
    )
    application = create_app(settings_, pipeline=pipe)
    with TestClient(application, base_url="http://127.0.0.1"):  # runs the lifespan: the job worker
        yield application


def _check_operation(operation, mode: GenerationMode, statuses: Counter) -> None:
    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    def run(case):
        response = case.call_and_validate(
            checks=CHECKS)
        statuses[(operation.label, response.status_code)] += 1

    run()


def test_api_conforms_to_its_schema(app):
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = [result.ok() for result in schema.get_all_operations()]
    labels = sorted(op.label for op in operations)
    assert "POST /jobs" in labels and "POST /sdapi/v1/txt2img" in labels and len(labels) >= 15, labels
    failures, statuses = [], Counter()
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            try:
                _check_operation(operation, mode, statuses)
            except Unsatisfiable:  # no invalid request exists (an operation without parameters or body)
                assert mode is GenerationMode.NEGATIVE
            except Exception as e:  # noqa: BLE001 - collect every operation's failure, then report them all
                failures.append(f"{operation.label} ({mode.value}): {e}"[:3000])
        if operation.label in VALID:
            case = operation.Case(body=VALID[operation.label], media_type="application/json")
            response = case.call_and_validate(checks=CHECKS)
            statuses[(operation.label, response.status_code)] += 1
    assert not failures, "\n\n".join(failures)
    # the generated requests reached the handlers, not only the validation layer: jobs were accepted and
    # refused, A1111 generations ran, and nothing answered 5xx
    seen = {(label, code // 100) for label, code in statuses}
    assert {("POST /jobs", 2), ("POST /jobs", 4), ("POST /sdapi/v1/txt2img", 2),
            ("POST /sdapi/v1/txt2img", 4)} <= seen, sorted(statuses.items())
    assert not any(code >= 500 for _, code in statuses)
    assert sum(statuses.values()) > 200
