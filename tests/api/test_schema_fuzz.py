"""Schemathesis against the app's own OpenAPI schema, on a real server: no 5xx, responses match."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, settings


@pytest.fixture(scope="module")
def schema(server):
    url, _ = server
    return schemathesis.openapi.from_url(f"{url}/openapi.json")


lazy = schemathesis.pytest.from_fixture("schema")


@lazy.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_api_conforms_to_its_schema(case, server):
    url, _ = server
    case.call_and_validate(base_url=url)
