"""Small test models, also importable by a real server as ``python:tests.api.models:<factory>``."""

from __future__ import annotations

import os
import time

import torch
from torch import nn

from service.preprocess import Preprocess
from service.registry import LoadedModel, ModelSpec, serve_module

TINY_PRE = Preprocess(resize=(32, 32), crop=None, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


class Tiny(nn.Module):
    """4 classes; raises on a near-white image (``poison``) and can sleep (``delay_s``) per batch."""

    def __init__(self, delay_s: float = 0.0, poison: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1))
        self.head = nn.Linear(8, 4)
        self.delay_s = delay_s
        self.poison = poison

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.poison and bool((x.mean(dim=(1, 2, 3)) > 1.9).any()):
            raise RuntimeError(f"poisoned input, see {os.path.abspath(__file__)}")
        return self.head(torch.relu(self.features(x)).mean(dim=(2, 3)))


def tiny_model(name: str = "tiny", **kwargs: float | bool) -> LoadedModel:
    return serve_module(Tiny(**kwargs), ModelSpec(name=name, source="python:tests.api.models:slow"),  # type: ignore[arg-type]
                        ["a", "b", "c", "d"], TINY_PRE)


def slow() -> nn.Module:
    """Factory for a real server: a model that takes ``SLOW_MODEL_S`` seconds per batch."""
    return Tiny(delay_s=float(os.environ.get("SLOW_MODEL_S", "0.5")))


class Binary(nn.Module):
    """One output logit: a binary head, meant to be scored with a sigmoid."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1))
        self.head = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.features(x)).mean(dim=(2, 3)))


def binary() -> nn.Module:
    return Binary()


def tiny() -> nn.Module:
    return Tiny()


class OutOfMemoryWhenExplaining(Tiny):
    """Predicts, but runs out of (simulated CUDA) memory explaining an image (a pass that records gradients;
    loading traces the layers on an all-zero input, which passes)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and bool(x.any()):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return super().forward(x)


def out_of_memory_when_explaining() -> nn.Module:
    return OutOfMemoryWhenExplaining()


def shapes_embedder() -> nn.Module:
    """The trained shapes network without its classifier: ``(N, 64)`` pooled features, served as an embedding
    model (``task = "embedding"``, with the shapes preprocessing)."""
    from service.models.shapes import load_shapes

    model, _ = load_shapes()
    model.classifier = nn.Identity()
    return model
