"""The page's routes and the offline docs, without a browser."""

from __future__ import annotations

import asyncio
import io

import numpy as np
import pytest
from PIL import Image

from service.app import create_app
from service.colormaps import COLORMAPS, lookup_table
from service.config import ConfigError, Settings, load_settings
from tests.api.conftest import make_client


def test_page_and_its_files_are_served(client):
    r = client.get("/ui")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    for hook in ("model-select", "file-input", "predictions", "method-select", "overlay", "opacity", "curl", "error"):
        assert f'data-testid="{hook}"' in r.text
    assert client.get("/ui/").text == r.text
    for name, kind in (("app.js", "javascript"), ("style.css", "text/css")):
        asset = client.get(f"/ui/static/{name}")
        assert asset.status_code == 200 and kind in asset.headers["content-type"]
    assert client.get("/ui/static/../../config.py").status_code == 404


def test_page_loads_nothing_from_elsewhere(client):
    for path in ("/ui", "/ui/static/app.js", "/ui/static/style.css", "/docs", "/redoc"):
        text = client.get(path).text
        assert "http://" not in text and "https://" not in text.replace("https://github.com", ""), path


def test_root_redirects_a_browser_to_the_page_and_tells_other_clients_it_is_alive(client):
    browser = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"
    r = client.get("/", headers={"Accept": browser}, follow_redirects=False)
    assert r.status_code in (302, 307) and r.headers["location"] == "/ui"
    for accept in ("*/*", "application/json", ""):  # curl, a KServe client, a bare probe
        r = client.get("/", headers={"Accept": accept}, follow_redirects=False)
        assert r.status_code == 200 and r.json() == {"status": "alive"}, accept


def test_samples_are_fixed_scenes_the_model_gets_right(client):
    listed = client.get("/ui/samples").json()
    assert [s["label"] for s in listed] == ["circle", "square", "triangle", "cross", "ring"]
    for s in listed:
        png = client.get(s["url"])
        assert png.status_code == 200 and png.headers["content-type"] == "image/png"
        assert Image.open(io.BytesIO(png.content)).size == (64, 64)
        assert client.get(s["url"]).content == png.content  # the same picture every time
        r = client.post("/predict", files={"image": ("s.png", png.content, "image/png")})
        assert r.json()["results"][0]["predictions"][0]["label"] == s["label"]
    assert client.get("/ui/samples/5.png").status_code == 422
    assert client.get("/ui/samples/x.png").status_code == 422


def test_colormaps_are_the_servers_tables(client):
    tables = client.get("/ui/colormaps").json()
    assert list(tables) == list(COLORMAPS)
    for name, table in tables.items():
        assert np.array_equal(np.array(table), lookup_table(name).numpy())


def test_docs_use_packaged_assets(client):
    docs = client.get("/docs").text
    assert "/docs-assets/swagger-ui-bundle.js" in docs and "/docs-assets/swagger-ui.css" in docs
    assert "/docs-assets/redoc.standalone.js" in client.get("/redoc").text
    for name in ("swagger-ui-bundle.js", "swagger-ui.css", "redoc.standalone.js"):
        r = client.get(f"/docs-assets/{name}")
        assert r.status_code == 200 and len(r.content) > 100_000
    assert "/explain" in client.get("/openapi.json").json()["paths"]
    assert not any(p.startswith("/ui") for p in client.get("/openapi.json").json()["paths"])


def test_ui_can_be_switched_off():
    with make_client(enable_ui=False) as c:
        for path in ("/ui", "/ui/static/app.js", "/ui/samples"):
            assert c.get(path).status_code == 404, path
        assert c.get("/", headers={"Accept": "text/html"}).json() == {"status": "alive"}  # no page to go to
        assert c.get("/docs").status_code == 200


def test_enable_ui_from_the_environment():
    assert load_settings(env={"SERVICE_ENABLE_UI": "false"}).enable_ui is False
    assert load_settings(env={"SERVICE_ENABLE_UI": "1"}).enable_ui is True
    assert load_settings(env={}).enable_ui is True
    with pytest.raises(ConfigError, match="enable_ui"):
        load_settings(env={"SERVICE_ENABLE_UI": "maybe"})


def test_with_keys_the_page_is_open_and_the_api_is_not():
    with make_client(api_keys=("k1",)) as c:
        for path in ("/", "/ui", "/ui/", "/ui/static/app.js", "/ui/samples", "/ui/samples/0.png", "/ui/colormaps",
                     "/docs-assets/swagger-ui.css", "/healthz", "/docs", "/openapi.json"):
            assert c.get(path, follow_redirects=False).status_code in (200, 307), path
        for path in ("/models", "/uimodels", "/docs-assetsx", "/openapi.jsonx"):
            assert c.get(path).status_code == 401, path
        png = c.get("/ui/samples/0.png").content
        assert c.post("/predict", files={"image": ("s.png", png, "image/png")}).status_code == 401
        assert c.post("/predict", files={"image": ("s.png", png, "image/png")},
                      headers={"X-API-Key": "k1"}).status_code == 200


def _raw_status(app, path: str) -> int:
    """The status for a path exactly as given (HTTP clients would remove the dot segments first)."""
    sent: list[dict] = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "", "headers": [],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
    asyncio.run(app(scope, receive, send))
    return next(m["status"] for m in sent if m["type"] == "http.response.start")


def test_dot_segments_under_an_open_prefix_need_a_key():
    app = create_app(Settings(api_keys=("k1",)))
    for path in ("/ui/../models", "/ui/static/../../models", "/docs-assets/..", "/ui/samples/../../predict"):
        assert _raw_status(app, path) == 401, path
    assert _raw_status(app, "/ui/samples") != 401
