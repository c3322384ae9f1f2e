"""Auth, metrics, faults, timeouts, overload, soak: the service keeps answering, cleanly."""

from __future__ import annotations

import asyncio
import json
import logging

import httpx
import numpy as np
import pytest
import torch
from starlette.requests import Request

from service.api.middleware import ApiKeyAuth
from service.api.oip_repository import check_admin
from service.app import create_app
from service.config import ConfigError, Settings, load_settings
from service.errors import Unauthorized
from service.logs import JsonFormatter, TextFormatter
from service.registry import ModelSpec, serve_module
from tests.api.conftest import b64, png_bytes
from tests.api.hardening_helpers import tiny_client
from tests.api.models import tiny_model

RNG = np.random.default_rng(0)
IMG = png_bytes(RNG.integers(0, 255, (40, 30, 3), dtype=np.uint8))
WHITE = png_bytes(np.full((32, 32, 3), 255, np.uint8))


def test_api_keys(tmp_path):
    keyfile = tmp_path / "keys"
    keyfile.write_text("# ops keys\nfile-key\n")
    with tiny_client(api_keys=("k1", "k2"), api_keys_file=str(keyfile)) as c:
        r = c.post("/predict", json={"image": b64(IMG)})
        assert r.status_code == 401
        assert r.json()["error"]["code"] == "unauthorized"
        assert r.headers["x-request-id"]
        assert c.post("/predict", json={"image": b64(IMG)}, headers={"X-API-Key": "nope"}).status_code == 401
        assert c.post("/predict", json={"image": b64(IMG)}, headers={"Authorization": "Bearer k2"}).status_code == 200
        assert c.post("/predict", json={"image": b64(IMG)}, headers={"X-API-Key": "k1"}).status_code == 200
        assert c.post("/predict", json={"image": b64(IMG)}, headers={"X-API-Key": "file-key"}).status_code == 200
        assert c.get("/models").status_code == 401
        for path in ("/healthz", "/readyz", "/metrics"):
            assert c.get(path).status_code == 200, path


@pytest.mark.parametrize("settings", [
    {"api_keys": ("realkey",), "admin_api_keys": ("",)},
    {"api_keys": ("realkey", "  ")},
    {"api_keys": (" realkey",)},
    {"admin_api_keys": ("\t",)},
])
def test_empty_or_padded_keys_are_a_config_error(settings):
    with pytest.raises(ConfigError, match="empty key"):
        Settings(**settings)


def test_empty_keys_from_variables_and_files_are_config_errors(tmp_path):
    for value in (",", "realkey,", " "):
        with pytest.raises(ConfigError, match="admin_api_keys"):
            load_settings(env={"SERVICE_API_KEYS": "realkey", "SERVICE_ADMIN_API_KEYS": value})
    empty = tmp_path / "keys"
    empty.write_text("# no keys yet\n\n")
    with pytest.raises(ConfigError, match="holds no keys"):
        Settings(api_keys_file=str(empty))
    # An unset variable is no key list at all, not an empty key.
    assert load_settings(env={"SERVICE_ADMIN_API_KEYS": ""}).admin_api_keys == ()


def test_auth_fails_closed_whatever_the_key_list_holds():
    """Settings refuse empty keys; the middleware and the admin check must refuse a missing key even
    when a list built another way holds one."""
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient

    inner = Starlette(routes=[Route("/x", lambda r: PlainTextResponse("in"))])
    with TestClient(ApiKeyAuth(inner, keys=["realkey", "", " "], open_paths=())) as c:
        assert c.get("/x").status_code == 401
        assert c.get("/x", headers={"X-API-Key": ""}).status_code == 401
        assert c.get("/x", headers={"Authorization": "Bearer "}).status_code == 401
        assert c.get("/x", headers={"X-API-Key": "realkey"}).status_code == 200
    settings = Settings()
    object.__setattr__(settings, "admin_api_keys", ("",))  # past validation, as a buggy caller might
    request = Request({"type": "http", "method": "GET", "path": "/", "headers": []})
    with pytest.raises(Unauthorized):
        check_admin(request, settings)


def test_open_paths_are_configurable():
    with tiny_client(api_keys=("k",), open_paths=("/healthz",)) as c:
        assert c.get("/healthz").status_code == 200
        assert c.get("/metrics").status_code == 401


def test_cors_off_by_default_and_configurable():
    with tiny_client() as c:
        assert "access-control-allow-origin" not in c.get("/healthz", headers={"Origin": "https://a.example"}).headers
    with tiny_client(cors_origins=("https://a.example",)) as c:
        r = c.get("/healthz", headers={"Origin": "https://a.example"})
        assert r.headers["access-control-allow-origin"] == "https://a.example"


def test_metrics_count_requests_batches_and_images():
    with tiny_client() as c:
        c.post("/predict", json={"images": [b64(IMG)] * 3})
        c.post("/explain", json={"image": "@@"})
        c.get("/models/tiny")
        c.get("/models/no-such-model")
        c.get("/no/such/route")
        text = c.get("/metrics").text
    assert 'camserve_requests_total{endpoint="/predict",model="tiny",status="200"} 1.0' in text
    assert 'camserve_requests_total{endpoint="/explain",model="",status="400"} 1.0' in text
    assert 'camserve_images_total{model="tiny"} 3.0' in text  # the warm-up is not traffic
    # Labels are route templates, so arbitrary paths cannot grow the label set.
    assert 'camserve_requests_total{endpoint="/models/{name}",model="",status="200"} 1.0' in text
    assert 'camserve_requests_total{endpoint="/models/{name}",model="",status="404"} 1.0' in text
    assert 'camserve_requests_total{endpoint="other",model="",status="404"} 1.0' in text
    assert 'camserve_model_ready{model="tiny"} 1.0' in text
    assert "camserve_batch_size_bucket" in text
    assert "camserve_request_seconds_bucket" in text
    assert 'camserve_queue_depth{model="tiny"} 0.0' in text


def test_a_failing_batch_fails_only_its_requests():
    with tiny_client(models=[tiny_model(poison=True)], max_batch_size=1) as c:
        bad = c.post("/predict", json={"image": b64(WHITE)})
        assert bad.status_code == 500
        assert bad.json()["error"]["code"] == "model_error"
        assert "Traceback" not in bad.text
        # The exception's class and text, without the path it quoted.
        message = bad.json()["error"]["message"]
        assert message == "model 'tiny' failed on a batch of 1: RuntimeError: poisoned input, see <path>"
        assert c.post("/predict", json={"image": b64(IMG)}).status_code == 200
        assert c.get("/readyz").status_code == 200


@pytest.mark.slow
def test_slow_model_times_out_with_504_and_stays_ready():
    with tiny_client(models=[tiny_model(delay_s=0.6)], request_timeout_s=0.2) as c:
        r = c.post("/predict", json={"image": b64(IMG)})
        assert r.status_code == 504
        assert r.json()["error"]["code"] == "timeout"
        assert c.get("/readyz").status_code == 200


async def _burst(app, n: int, body: dict) -> list[httpx.Response]:
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=60) as client:
            responses = await asyncio.gather(*(client.post("/predict", json=body) for _ in range(n)))
            after = await client.post("/predict", json=body)
            ready = await client.get("/readyz")
    return [*responses, after, ready]


def test_overload_gets_503_with_retry_after_and_recovers():
    app = create_app(Settings(max_queue=2, max_batch_size=1), models=[tiny_model(delay_s=0.05)])
    *responses, after, ready = asyncio.run(_burst(app, 30, {"image": b64(IMG)}))
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 503}
    assert codes.count(503) > 0
    assert codes.count(200) >= 2
    for r in responses:
        if r.status_code == 503:
            assert r.json()["error"]["code"] == "overloaded"
            assert int(r.headers["retry-after"]) >= 1
    assert after.status_code == 200
    assert ready.status_code == 200


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


@pytest.mark.slow
def test_soak_mixed_requests_no_errors_and_flat_memory():
    bodies = [
        {"image": b64(IMG)},
        {"images": [b64(IMG)] * 2, "top_k": 2},
        {"image": b64(IMG), "method": "gradcam++", "output": "overlay"},
        {"image": b64(IMG), "targets": [0, 3], "output": "array", "size": "input"},
    ]

    async def soak() -> tuple[float, float, list[int]]:
        app = create_app(Settings(), models=[tiny_model()])
        codes = []
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                async def wave(k: int) -> None:
                    rs = await asyncio.gather(*(
                        client.post("/predict" if i % 4 < 2 else "/explain", json=bodies[i % 4]) for i in range(k)))
                    codes.extend(r.status_code for r in rs)

                for _ in range(5):
                    await wave(40)
                warm = _rss_mb()
                for _ in range(50):
                    await wave(40)
                return warm, _rss_mb(), codes

    warm, end, codes = asyncio.run(soak())
    assert len(codes) == 2200
    assert set(codes) == {200}
    assert end - warm < 50, f"RSS grew {end - warm:.1f} MB over 2000 requests"


def test_text_logs_cannot_be_forged_with_control_characters(caplog):
    caplog.set_level(logging.INFO, logger="camserve.access")
    forged = "2026-12-04 14:00:00,000 INFO camserve.access: POST /admin 200 FORGED"
    with tiny_client(api_keys=("k",)) as c:
        assert c.get(f"/healthz%0a{forged}%0d%1b[2K%e2%80%a8").status_code == 401
    record = next(r for r in caplog.records if "FORGED" in r.getMessage())
    line = TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s").format(record)
    assert "\n" not in line and "\r" not in line and "\x1b" not in line and "\u2028" not in line
    assert "/healthz\\n2026-12-04" in line and "\\r\\x1b[2K\\u2028" in line
    assert record.getMessage().count("\n") == 1  # the record itself is untouched (JSON logs escape it their way)


def test_json_logs_carry_the_request_id_and_no_secrets(caplog):
    caplog.set_level(logging.INFO, logger="camserve.access")
    with tiny_client(api_keys=("sekret",)) as c:
        c.post("/predict", json={"image": b64(IMG)}, headers={"X-API-Key": "sekret", "X-Request-ID": "rid-1"})
    record = next(r for r in caplog.records if getattr(r, "request_id", None) == "rid-1")
    line = json.loads(JsonFormatter().format(record))
    assert line["request_id"] == "rid-1"
    assert line["status"] == 200
    assert line["model"] == "tiny"
    assert "sekret" not in caplog.text
    assert b64(IMG)[:40] not in caplog.text


def test_a_model_that_ignores_its_input_is_named_at_load_and_in_each_map(caplog):
    """torchvision's ViT with weights = "none" has a zero head: every gradient map is zero. Say so at
    load, and say why in each explanation, rather than return blank maps without a word."""
    from tests.api.models import TINY_PRE, Tiny

    zero = Tiny()
    torch.nn.init.zeros_(zero.head.weight)
    caplog.set_level(logging.WARNING, logger="camserve")
    model = serve_module(zero, ModelSpec(name="zero", source="python:x:y"), ["a", "b", "c", "d"], TINY_PRE)
    with tiny_client(models=[model]) as c:
        assert model.input_independent  # found by the load's timed forwards
        assert "does not depend on its input" in caplog.text
        (e,) = c.post("/explain", json={"image": b64(IMG), "output": "array"}).json()["results"][0]["explanations"]
        assert np.max(e["heatmap"]["data"]) == 0 and "does not depend on its input" in e["note"]
    with tiny_client() as c:
        assert not c.app.state.repository.get("tiny").model.input_independent
        (e,) = c.post("/explain", json={"image": b64(IMG)}).json()["results"][0]["explanations"]
        assert "note" not in e


def test_a_perturbation_request_that_cannot_finish_in_time_is_refused_up_front():
    """ScoreCAM's cost is priced at the model's forward time measured at load; a request that could
    only time out is a 422 naming the cost and the limit, before any work."""
    with tiny_client(request_timeout_s=2) as c:
        served = c.app.state.repository.get("tiny")
        assert served.model.forward_s is not None and 0 < served.model.forward_s < 1  # measured at load
        assert c.post("/explain?method=scorecam", json={"image": b64(IMG)}).status_code == 200
        served.model.forward_s = 0.5  # as a large model on a small CPU: 8 channels x 0.5 s > 2 s
        r = c.post("/explain?method=scorecam", json={"image": b64(IMG)})
        assert r.status_code == 422, r.text
        message = r.json()["error"]["message"]
        assert "8 extra forward images, about 4 s" in message and "request timeout of 2 s" in message
        # Replays and gradient methods are not priced as whole forwards.
        assert c.post("/explain?method=ablationcam", json={"image": b64(IMG)}).status_code == 200
        assert c.post("/explain", json={"image": b64(IMG)}).status_code == 200
    with tiny_client(request_timeout_s=0) as c:  # no timeout: nothing to refuse for
        c.app.state.repository.get("tiny").model.forward_s = 0.5
        assert c.post("/explain?method=scorecam", json={"image": b64(IMG)}).status_code == 200
