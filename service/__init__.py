"""camserve: serve image classifiers over HTTP and explain them with Grad-CAM.

The public API is loaded lazily, so ``import service`` stays cheap (no torch, no FastAPI) until a
name is used::

    from service import create_app, load_settings
    app = create_app(load_settings("models.toml"))
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "create_app": "service.app",
    "Settings": "service.config",
    "load_settings": "service.config",
    "CamEngine": "service.cam",
    "CamQuery": "service.cam",
    "ModelSpec": "service.modelspec",
    "load_model": "service.registry",
    "serve_module": "service.registry",
    "ModelRepository": "service.repository",
    "DataPlane": "service.dataplane",
    "ExplainOptions": "service.dataplane",
    "Pipeline": "service.pipeline",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'service' has no attribute {name!r}")
