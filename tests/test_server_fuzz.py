"""A property-based fuzz of the served OpenAPI schema: schemathesis' strategies (valid and invalid
requests, driven by plain hypothesis) and its coverage cases (boundary values of every field),
against the app with a real Engine behind it; nothing may answer with a 5xx. Bounded (examples
per operation and mode) and derandomized, so CI stays short and a failure replays. (Not through
schemathesis' pytest plugin: under the full suite its failure reporting itself crashed, hiding
what failed.) With the sampling fix of this commit reverted, the coverage cases find its 500."""

import pytest

schemathesis = pytest.importorskip("schemathesis", reason="the fuzz needs schemathesis (pip install schemathesis)")
pytest.importorskip("fastapi", reason="pregated serve needs fastapi and uvicorn")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.config import GenerationConfig  # noqa: E402

from pregated.engine import Engine  # noqa: E402
from pregated.server import create_app  # noqa: E402


@pytest.fixture(scope="module")
def app(mixtral_folder):
    eng = Engine(mixtral_folder, device="cpu", quiet=True)
    app = create_app(eng, "m", max_batch=4, max_queue=16, request_timeout=5.0)
    try:
        yield app
    finally:
        app.state.scheduler.shutdown(drain=False, timeout=30)
        eng.close()


def _shorten(case) -> None:
    """Most bodies ask for the served model, so they reach the engine, and generate little: the
    fuzz is about the request schema, not about decoding."""
    if not isinstance(case.body, dict):
        return
    if case.body.get("model") != "m" and hash(str(case.body)) % 4:
        case.body["model"] = "m"
    for key in ("max_tokens", "max_completion_tokens"):
        v = case.body.get(key)
        if isinstance(v, int) and not isinstance(v, bool) and v > 8:
            case.body[key] = 8
    case.body.setdefault("max_tokens", 8)  # a chat request without it would run to the context


def test_no_request_gets_a_server_error(app):
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    failures, calls = [], 0
    for result in schema.get_all_operations():
        op = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            @settings(max_examples=30, deadline=None, derandomize=True, database=None,
                      suppress_health_check=list(HealthCheck))
            @given(case=op.as_strategy(generation_mode=mode))
            def check(case):
                nonlocal calls
                _shorten(case)
                response = case.call()
                calls += 1
                if response.status_code >= 500:
                    failures.append((op.label, mode.value, case.body, response.status_code, response.text[:300]))

            try:
                check()
            except Unsatisfiable:  # an operation without inputs has no invalid request to make
                assert mode is GenerationMode.NEGATIVE, op.label
        # schemathesis' coverage phase: boundary values of every field (the smallest positive
        # temperature found a sampling overflow once)
        for case in schema.iter_coverage_cases(op, generation_modes=list(GenerationMode),
                                               generation_config=GenerationConfig(max_examples=30)):
            _shorten(case)
            response = case.call()
            calls += 1
            if response.status_code >= 500:
                failures.append((op.label, "coverage", case.body, response.status_code, response.text[:300]))
    assert calls >= 100
    assert not failures, failures[:5]
