from __future__ import annotations

from fastapi.testclient import TestClient

from service.app import create_app
from service.config import Settings
from tests.api.models import tiny_model


def tiny_client(models=None, **settings) -> TestClient:
    """A TestClient on an app serving the 4-class test model (fast, no weights file)."""
    return TestClient(create_app(Settings(**settings), models=models or [tiny_model()]))
