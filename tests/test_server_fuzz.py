"""A property-based fuzz of the served OpenAPI schema (schemathesis): generated requests, valid
and not, against the app with a real Engine behind it; nothing may answer with a 5xx. Bounded
(max_examples per operation) so CI stays short."""

import pytest

schemathesis = pytest.importorskip("schemathesis", reason="the fuzz needs schemathesis (pip install schemathesis)")
pytest.importorskip("fastapi", reason="pregated serve needs fastapi and uvicorn")

from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis.config import SchemathesisConfig  # noqa: E402

from pregated.engine import Engine  # noqa: E402
from pregated.server import create_app  # noqa: E402


@pytest.fixture(scope="module")
def api_schema(mixtral_folder):
    eng = Engine(mixtral_folder, device="cpu", quiet=True)
    app = create_app(eng, "m", max_batch=4, max_queue=16, request_timeout=5.0)
    try:
        # valid and invalid requests (negative mode), a fixed seed so a failure can be replayed
        config = SchemathesisConfig.from_dict({"generation": {"mode": "all", "max-examples": 30}, "seed": 20261202})
        yield schemathesis.openapi.from_asgi("/openapi.json", app, config=config)
    finally:
        app.state.scheduler.shutdown(drain=False, timeout=30)
        eng.close()


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(deadline=None, suppress_health_check=list(HealthCheck))
def test_no_request_gets_a_server_error(case):
    if isinstance(case.body, dict):
        # Most bodies ask for the served model, so they reach the engine, and generate little:
        # the fuzz is about the request schema, not about decoding.
        if case.body.get("model") != "m" and hash(str(case.body)) % 4:
            case.body["model"] = "m"
        for key in ("max_tokens", "max_completion_tokens"):
            if isinstance(case.body.get(key), int) and case.body[key] > 8:
                case.body[key] = 8
    response = case.call()
    assert response.status_code < 500, (case.method, case.path, case.body, response.text[:500])
