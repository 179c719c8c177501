"""Fuzz every operation of the API's OpenAPI schema in-process (ASGI), against the real test Redis.

Schemathesis generates valid and invalid requests for each operation (`MAX_EXAMPLES` each, plus its
own boundary cases); every answer must be a non-5xx answer that the schema declares (status code,
content type, headers and body), and requests that break the schema must be refused with a 4xx.
The WebSocket and the mounts (`/rq`, `/mcp`) are not in the OpenAPI schema, so they are not fuzzed.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings
from redis import Redis
from schemathesis import checks

import app
from settings import Settings

MAX_EXAMPLES = 25
CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_headers_conformance,
    checks.response_schema_conformance,
    checks.negative_data_rejection,
]
REJECTIONS = ["400", "404", "405", "406", "409", "413", "415", "422"]
"""How invalid requests may be refused: 413 too, for a body over MAX_BODY_BYTES (below some fields' maxLength)."""
NOT_READY_IS_DOCUMENTED = {"/readyz"}
"""No worker runs here, so `/readyz` answers its documented 503 (checked against the schema all the same)."""

HEALTH_CHECKS_OFF = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.filter_too_much]
"""The test Redis (`redis`) is shared by all examples of an operation and emptied after it, on purpose; and
generating invalid data is slow and filters a lot."""

config = schemathesis.Config.from_dict({"checks": {"negative_data_rejection": {"expected-statuses": REJECTIONS}}})
schema = schemathesis.openapi.from_asgi("/openapi.json", app.app, config=config)


@pytest.fixture
def routes_on_the_test_redis(redis: Redis) -> Iterator[None]:
    """`app.app` was built at import, as uvicorn serves it; its routes get this test's settings."""
    built = app.app.state.settings
    app.app.state.settings = Settings()
    yield
    app.app.state.settings = built


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None, database=None, suppress_health_check=HEALTH_CHECKS_OFF)
def test_api_answers_as_its_schema_says(case: schemathesis.Case[Any], routes_on_the_test_redis: None) -> None:
    excluded: list[schemathesis.CheckFunction] = (
        [checks.not_a_server_error] if case.operation.path in NOT_READY_IS_DOCUMENTED else []
    )
    case.call_and_validate(checks=CHECKS, excluded_checks=excluded)


# Bugs the fuzzing found, kept as plain tests.


def test_a_delay_beyond_the_calendar_is_refused_not_a_crash(client: TestClient) -> None:
    response = client.post("/jobs", json={"task": "noop", "delay_seconds": 251606849486.0})
    assert response.status_code == 422 and "out of range" in response.text


@pytest.mark.parametrize(
    "body", ['{"task": "noop", "delay_seconds": Infinity}', '{"to": NaN, "subject": "a", "body": "b"}']
)
def test_nan_and_infinity_in_a_refused_body_do_not_break_the_answer(client: TestClient, body: str) -> None:
    path = "/jobs" if "task" in body else "/send-email"
    response = client.post(path, content=body, headers={"content-type": "application/json"})
    assert response.status_code == 422 and response.json()["detail"][0]["input"] in (
        "inf",
        "nan",
        {"task": "noop", "delay_seconds": "inf"},
    )
