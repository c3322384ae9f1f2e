"""Schemathesis against the app's own OpenAPI schema, on a real server: no 5xx, responses match it."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

OPERATIONS = ["GET /healthz", "GET /readyz", "GET /models", "GET /models/{name}", "POST /predict", "POST /explain",
              "GET /metrics"]


@pytest.fixture(scope="module")
def schema(server):
    url, _ = server
    return schemathesis.openapi.from_url(f"{url}/openapi.json")


def test_every_route_is_fuzzed(schema):
    found = {f"{op.ok().method.upper()} {op.ok().path}" for op in schema.get_all_operations()}
    assert found == set(OPERATIONS)


@pytest.mark.parametrize("operation", OPERATIONS)
def test_operation_conforms_to_the_schema(schema, server, operation):
    url, _ = server
    method, path = operation.split()
    op = schema[path][method]

    @given(case=op.as_strategy())
    @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def check(case: schemathesis.Case) -> None:
        # A schema-valid string is not necessarily a decodable image, so an image API rightly rejects
        # "positive" data with 400; every other check (no 5xx, documented statuses, schemas) applies.
        case.call_and_validate(base_url=url, excluded_checks=[positive_data_acceptance])

    check()
