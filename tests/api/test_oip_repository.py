"""The model repository extension: who may use it, load from a table, reload, unload with work queued."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.api.conftest import b64, make_client

INDEX = "/v2/repository/index"


def scores_request(png: bytes) -> dict:
    return {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [b64(png)]}],
            "outputs": [{"name": "scores"}]}


def test_disabled_by_default(client):
    for path in (INDEX, "/v2/repository/models/shapes/load", "/v2/repository/models/shapes/unload"):
        r = client.post(path)
        assert r.status_code == 403 and set(r.json()) == {"error"}, path
    assert client.get("/v2/models/shapes/ready").status_code == 200


def test_api_keys_without_admin_keys_refuse_even_when_enabled():
    with make_client(api_keys=("user",), enable_repository_api=True) as c:
        assert c.post(INDEX).status_code == 401
        r = c.post(INDEX, headers={"X-API-Key": "user"})
        assert r.status_code == 403 and "admin" in r.json()["error"]


def test_admin_keys():
    with make_client(api_keys=("user",), admin_api_keys=("boss",)) as c:
        assert c.post(INDEX).status_code == 401
        assert c.post(INDEX, headers={"X-API-Key": "user"}).status_code == 403
        r = c.post(INDEX, headers={"Authorization": "Bearer boss"})
        assert r.status_code == 200 and r.json() == [{"name": "shapes", "version": "1", "state": "READY"}]
        # An admin key may do whatever a user key may.
        assert c.get("/v2/models/shapes", headers={"X-API-Key": "boss"}).status_code == 200
    with make_client(admin_api_keys=("boss",)) as c:  # admin keys alone: inference stays open
        assert c.get("/v2/models/shapes").status_code == 200
        r = c.post(INDEX)
        assert r.status_code == 401 and set(r.json()) == {"error"}


def test_load_from_table_serve_unload_and_reload(circle_png):
    with make_client(enable_repository_api=True) as c:
        config = json.dumps({"source": "builtin:shapes"})  # as tritonclient's load_model(config=...) sends it
        r = c.post("/v2/repository/models/extra/load", json={"parameters": {"config": config}})
        assert r.status_code == 200 and r.json()["state"] == "READY"
        assert c.get("/v2/models/extra/ready").status_code == 200
        assert c.post("/v2/models/extra/infer", json=scores_request(circle_png)).status_code == 200
        assert c.get("/v2/models/shapes/ready").status_code == 200
        assert {m["name"]: m["state"] for m in c.post(INDEX).json()} == {"shapes": "READY", "extra": "READY"}

        r = c.post("/v2/repository/models/extra/unload", json={"parameters": {"unload_dependents": False}})
        assert r.status_code == 200 and r.json()["state"] == "UNAVAILABLE"
        assert c.post("/v2/models/extra/infer", json=scores_request(circle_png)).status_code == 404
        assert c.get("/v2/models/extra/ready").status_code == 404
        assert c.post(INDEX, json={"ready": True}).json() == [{"name": "shapes", "version": "1", "state": "READY"}]
        assert c.get("/v2/health/ready").status_code == 200  # an unloaded model does not hold readiness

        # Without a body, a model is reloaded from the table it was served with.
        assert c.post("/v2/repository/models/extra/load").json()["state"] == "READY"
        assert c.post("/v2/models/extra/infer", json=scores_request(circle_png)).status_code == 200
        # And a configured one from the config.
        assert c.post("/v2/repository/models/shapes/unload").status_code == 200
        assert c.post("/v2/repository/models/shapes/load").json()["state"] == "READY"


@pytest.mark.parametrize(("body", "status", "needle"), [
    ({"parameters": {"config": {"source": "nowhere:thing"}}}, 400, "source"),
    ({"parameters": {"config": {"source": "builtin:shapes", "colour": 1}}}, 400, "colour"),
    ({"parameters": {"config": "{not json"}}, 400, "JSON"),
    ({"parameters": "x"}, 400, "parameters"),
    ({}, 404, "not configured"),
])
def test_load_errors(body, status, needle):
    with make_client(enable_repository_api=True) as c:
        r = c.post("/v2/repository/models/fresh/load", json=body)
        assert r.status_code == status and needle in r.json()["error"], r.text
        assert c.post("/v2/repository/models/ghost/unload").status_code == 404


def test_failed_load_is_400_and_listed():
    with make_client(enable_repository_api=True) as c:
        r = c.post("/v2/repository/models/broken/load",
                   json={"parameters": {"config": {"source": "torchvision:no_such_builder"}}})
        assert r.status_code == 400 and set(r.json()) == {"error"}
        broken = [m for m in c.post(INDEX).json() if m["name"] == "broken"]
        assert broken[0]["state"] == "UNAVAILABLE" and broken[0]["reason"]
        assert c.get("/v2/models/broken/ready").status_code == 503


def test_unload_lets_queued_requests_finish(circle_png):
    # A long batching wait keeps the requests queued while the unload arrives.
    with make_client(enable_repository_api=True, max_wait_ms=4000, max_batch_size=64) as c:
        with ThreadPoolExecutor(6) as pool:
            pending = [pool.submit(c.post, "/v2/models/shapes/infer", json=scores_request(circle_png))
                       for _ in range(5)]
            time.sleep(1.5)
            started = time.perf_counter()
            unloaded = pool.submit(c.post, "/v2/repository/models/shapes/unload")
            statuses = [f.result().status_code for f in pending]
            assert unloaded.result().json()["state"] == "UNAVAILABLE"
        assert statuses == [200] * 5
        assert time.perf_counter() - started < 15
        r = c.post("/v2/models/shapes/infer", json=scores_request(circle_png))
        assert r.status_code == 404 and set(r.json()) == {"error"}


def test_a_replica_refuses_changes_but_lists():
    """A server that is one of several replicas (``repository_fixed``, set by service.rayserve) refuses
    load and unload with the reason, and still answers the index."""
    with make_client(enable_repository_api=True) as c:
        c.app.state.repository_fixed = "changes would reach one replica only"
        for path in ("/v2/repository/models/shapes/load", "/v2/repository/models/shapes/unload"):
            r = c.post(path)
            assert r.status_code == 403 and r.json() == {"error": "changes would reach one replica only"}, path
        assert c.post(INDEX).json() == [{"name": "shapes", "version": "1", "state": "READY"}]
        assert c.get("/v2/models/shapes/ready").status_code == 200
