"""The debugging page (``/ui``) and the offline API docs (``/docs``, ``/redoc``).

The page is static HTML, CSS and JavaScript shipped in the package (``service/static/ui``); it talks
to the same public endpoints as any client. Beside it, this module serves what the page needs that
the API does not carry: a few sample scenes of the built-in shapes model and the colormap tables, so
the browser blends heatmaps with exactly the colours the server's ``output=overlay`` uses. ``/`` sends
a browser to the page and answers every other client as KServe's model server does (liveness).

Swagger UI and ReDoc normally load from a CDN and render nothing air-gapped; their scripts come from
the ``fastapi-offline`` package instead (it ships both, and is kept up to date).
"""

from __future__ import annotations

import functools
from importlib.resources import files
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import APIRouter, FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles

from service.api.negotiation import choose
from service.colormaps import COLORMAPS, lookup_table
from service.errors import InvalidArgument
from service.imaging import encode_png
from service.models.scenes import SHAPE_CLASSES, make_scene

UI_DIR = Path(str(files("service"))) / "static" / "ui"
DOCS_ASSETS = "/docs-assets"
# The scenes are drawn from this seed until each class has appeared once: fixed pictures, one per class.
_SAMPLE_SEED = 14

page = APIRouter(include_in_schema=False)


@functools.cache
def _samples() -> tuple[tuple[str, bytes], ...]:
    rng = np.random.default_rng(_SAMPLE_SEED)
    found: dict[int, np.ndarray] = {}
    while len(found) < len(SHAPE_CLASSES):
        scene = make_scene(rng)
        found.setdefault(scene.label, scene.image)
    return tuple((SHAPE_CLASSES[i], encode_png(found[i])) for i in range(len(SHAPE_CLASSES)))


@page.get("/ui")
@page.get("/ui/")
async def index() -> FileResponse:
    return FileResponse(UI_DIR / "index.html", headers={"Cache-Control": "no-cache"})


@page.get("/ui/samples")
async def samples() -> list[dict[str, Any]]:
    """Sample scenes of the built-in shapes model, with the class each one shows."""
    return [{"index": i, "label": label, "url": f"/ui/samples/{i}.png"} for i, (label, _) in enumerate(_samples())]


@page.get("/ui/samples/{index}.png")
async def sample(index: int) -> Response:
    scenes = _samples()
    if not 0 <= index < len(scenes):
        raise InvalidArgument("index", f"sample `index` must be between 0 and {len(scenes) - 1}, got {index}")
    label, png = scenes[index]
    return Response(png, media_type="image/png", headers={"Content-Disposition": f'inline; filename="{label}.png"'})


@page.get("/ui/colormaps")
async def colormaps() -> dict[str, list[list[int]]]:
    """Each colormap as 256 RGB triples, index = heatmap level."""
    return {name: lookup_table(name).tolist() for name in COLORMAPS}


def _docs(app: FastAPI) -> APIRouter:
    docs = APIRouter(include_in_schema=False)
    title = app.title

    @docs.get("/docs")
    async def swagger() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url=app.openapi_url or "/openapi.json", title=f"{title} - Swagger UI",
                                   swagger_js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js",
                                   swagger_css_url=f"{DOCS_ASSETS}/swagger-ui.css",
                                   swagger_favicon_url=f"{DOCS_ASSETS}/favicon.png")

    @docs.get("/redoc")
    async def redoc() -> HTMLResponse:
        # with_google_fonts=False: a font from the internet would stall the page offline.
        return get_redoc_html(openapi_url=app.openapi_url or "/openapi.json", title=f"{title} - ReDoc",
                              redoc_js_url=f"{DOCS_ASSETS}/redoc.standalone.js",
                              redoc_favicon_url=f"{DOCS_ASSETS}/favicon.png", with_google_fonts=False)

    return docs


def install(app: FastAPI, enable_ui: bool) -> None:
    """Serve the offline docs, and the page unless ``enable_ui`` is false. The app must be created with
    ``docs_url=None, redoc_url=None`` so FastAPI's CDN-based pages do not take these paths first."""
    app.include_router(_docs(app))
    app.mount(DOCS_ASSETS, StaticFiles(packages=[("fastapi_offline", "static")]), name="docs-assets")

    @app.get("/", include_in_schema=False, response_model=None)
    async def root(request: Request) -> RedirectResponse | dict[str, str]:
        """A browser goes to the page; any other client gets the liveness answer of KServe's model
        server, which its Python client's V1 ``is_server_live`` and some probes read at ``/``."""
        if enable_ui and choose(request.headers.get("accept"), ["application/json", "text/html"]) == "text/html":
            return RedirectResponse("/ui")
        return {"status": "alive"}

    if enable_ui:
        app.include_router(page)
        app.mount("/ui/static", StaticFiles(directory=UI_DIR), name="ui-static")
