from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.app import create_app
from service.config import Settings
from service.models.scenes import SHAPE_CLASSES, make_scene


def png_bytes(pixels: np.ndarray, fmt: str = "PNG", **save: object) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt, **save)
    return buf.getvalue()


def scene(label: str, seed: int = 0) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """A shapes scene of the given class (drawn until one comes out)."""
    rng = np.random.default_rng(seed)
    while True:
        s = make_scene(rng)
        if SHAPE_CLASSES[s.label] == label:
            return s.image, s.bbox


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture(scope="session")
def circle_png() -> bytes:
    return png_bytes(scene("circle")[0])


@pytest.fixture(scope="session")
def client():
    with TestClient(create_app(Settings())) as c:
        yield c


def make_client(**settings: object) -> TestClient:
    return TestClient(create_app(Settings(**settings)))  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def server():
    """A real uvicorn process serving the default model: (base url, port)."""
    from tests.api.server import free_port, start_server

    port = free_port()
    proc = start_server(port)
    yield f"http://127.0.0.1:{port}", port
    proc.terminate()
    proc.wait(timeout=30)


def check_similarity(emb: np.ndarray, sim: np.ndarray, heatmap: np.ndarray) -> None:
    """Two images' embeddings ``emb``, and their ``similarity`` to the second as a reference (any protocol)."""
    assert sim.shape == (2, 1)
    assert sim[1, 0] == pytest.approx(1.0, abs=1e-5)
    expected = float(emb[0] @ emb[1] / np.linalg.norm(emb[0]) / np.linalg.norm(emb[1]))
    assert sim[0, 0] == pytest.approx(expected, abs=1e-5)
    assert heatmap.shape[:2] == (2, 1)
