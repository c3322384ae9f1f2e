"""The model repository extension: who may use it, load from a table, reload, unload with work queued."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from service.repository import ModelState
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


def test_a_failed_optional_load_leaves_the_server_ready(circle_png):
    """Server readiness is the configured models'; one loaded through the API has its own."""
    with make_client(api_keys=("user",), admin_api_keys=("boss",)) as c:
        admin, user = {"X-API-Key": "boss"}, {"X-API-Key": "user"}
        r = c.post("/v2/repository/models/ev/load", headers=admin, json={"parameters": {"config": {
            "source": "torchvision:resnet18", "weights": "/nonexistent/secret.pth"}}})
        assert r.status_code == 400 and r.json()["error"].count("model 'ev'") == 1, r.text
        assert "/nonexistent/secret.pth" in r.json()["error"]  # the admin is told where
        assert c.get("/readyz").status_code == 200
        assert c.get("/v2/health/ready").status_code == 200
        ev = c.get("/v2/models/ev/ready", headers=user)
        assert ev.status_code == 503 and "secret.pth" not in ev.text and "/nonexistent" not in ev.text
        r = c.post("/predict?model=ev", headers=user, json={"image": b64(circle_png)})
        assert r.status_code == 503 and "/nonexistent" not in r.text
        # A configured model that is not ready does take the server out.
        shapes = c.app.state.repository.find("shapes")
        shapes.state = ModelState.LOADING
        try:
            assert c.get("/readyz").status_code == 503
        finally:
            shapes.state = ModelState.READY


def test_a_failed_reload_keeps_the_working_model(circle_png):
    with make_client(enable_repository_api=True) as c:
        good = {"parameters": {"config": {"source": "builtin:shapes"}}}
        assert c.post("/v2/repository/models/extra/load", json=good).status_code == 200
        before = c.post("/v2/models/extra/infer", json=scores_request(circle_png)).json()
        bad = {"parameters": {"config": {"source": "builtin:shapes", "weights": "/no/such/weights.pt"}}}
        r = c.post("/v2/repository/models/extra/load", json=bad)
        assert r.status_code == 400 and "weights.pt" in r.json()["error"]
        # Still serving, from the old table, and ready.
        assert c.get("/v2/models/extra/ready").status_code == 200
        after = c.post("/v2/models/extra/infer", json=scores_request(circle_png))
        assert after.status_code == 200 and after.json()["outputs"] == before["outputs"]
        # A bodyless load reloads the last good table, not the broken one.
        assert c.post("/v2/repository/models/extra/load").json()["state"] == "READY"
        # Configured models reload the same way.
        r = c.post("/v2/repository/models/shapes/load", json={"parameters": {"config": {"source": "torchvision:nope"}}})
        assert r.status_code == 400
        assert c.get("/v2/models/shapes/ready").status_code == 200
        assert c.post("/v2/repository/models/shapes/load").json()["state"] == "READY"


def test_a_reload_under_traffic_loses_nothing(circle_png):
    with make_client(enable_repository_api=True, max_wait_ms=50) as c, ThreadPoolExecutor(4) as pool:
        pending = [pool.submit(c.post, "/v2/models/shapes/infer", json=scores_request(circle_png))
                   for _ in range(12)]
        assert c.post("/v2/repository/models/shapes/load").json()["state"] == "READY"
        assert [f.result().status_code for f in pending] == [200] * 12


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
