"""Models by name: what to load (``ModelSpec``), how to load it, and the loaded result.

Sources, as in a ``models.toml`` entry:

- ``builtin:shapes``: the demo model shipped in the package (no download);
- ``torchvision:<builder>``: any torchvision classification builder, with ``weights`` a state_dict
  file (.pth/.pt/.safetensors), a torchvision weights name such as ``IMAGENET1K_V2`` (downloaded into
  ``TORCH_HOME`` when online), or ``none`` (random init, logged as a warning);
- ``torchscript:<path>``: a scripted or traced model (predict and CAM where hooks reach its modules);
- ``python:<module>:<factory>``: a zero-argument callable returning an ``nn.Module``, with optional
  ``weights`` as a state_dict file.
"""

from __future__ import annotations

import importlib
import json
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

from service.cam import CamEngine
from service.errors import ModelNotFound
from service.preprocess import Preprocess

log = logging.getLogger("camserve.registry")

PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class ModelLoadError(Exception):
    """A model could not be loaded; start-up stops with this message."""


@dataclass(frozen=True)
class ModelSpec:
    name: str
    source: str
    weights: str | None = None
    device: str = "auto"
    target_layer: str | None = None
    labels: str | None = None
    preprocess: Mapping[str, Any] | None = None
    precision: str = "fp32"

    @classmethod
    def from_table(cls, name: str, table: Mapping[str, Any]) -> ModelSpec:
        known = {"source", "weights", "device", "target_layer", "labels", "preprocess", "precision"}
        unknown = set(table) - known
        if unknown:
            raise ModelLoadError(f"model {name!r}: unknown keys {sorted(unknown)}; known: {sorted(known)}")
        if "source" not in table:
            raise ModelLoadError(f"model {name!r}: `source` is required")
        if table.get("precision", "fp32") not in PRECISIONS:
            raise ModelLoadError(f"model {name!r}: `precision` must be one of {list(PRECISIONS)}")
        return cls(name=name, **table)


@dataclass
class LoadedModel:
    """A model on its device, its hook engine, labels and preprocessing."""

    spec: ModelSpec
    module: nn.Module
    engine: CamEngine
    labels: list[str]
    preprocess: Preprocess
    device: torch.device
    precision: torch.dtype | None = None
    ready: bool = False

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def num_classes(self) -> int:
        return self.engine.num_classes

    def close(self) -> None:
        self.engine.close()


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ModelLoadError(f"`device` must be auto, cpu, cuda or cuda:N, got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"`device` is {name!r} but CUDA is not available on this machine")
    return device


def _read_labels(path: str) -> list[str]:
    text = Path(path).read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        labels = json.loads(text)
        if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
            raise ModelLoadError(f"labels file {path!r} must hold a JSON list of strings")
        return labels
    return [line.strip() for line in text.splitlines() if line.strip()]


def load_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Read a state_dict from .pth/.pt (weights only, never pickled code) or .safetensors."""
    if path.endswith(".safetensors"):
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise ModelLoadError("reading .safetensors needs the `safetensors` package") from None
        loaded: dict[str, torch.Tensor] = load_file(path)
        return loaded
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ModelLoadError(f"{path!r} does not hold a state_dict")
    return state


def _head_size(state: Mapping[str, torch.Tensor]) -> int | None:
    """The class count of a classifier state_dict: rows of its last 2-D weight (the head)."""
    heads = [v for k, v in state.items() if k.endswith("weight") and v.dim() == 2]
    return int(heads[-1].shape[0]) if heads else None


def _load_torchvision(spec: ModelSpec, builder: str) -> tuple[nn.Module, list[str] | None, Preprocess]:
    if builder not in torchvision.models.list_models(module=torchvision.models):
        known = ", ".join(torchvision.models.list_models(module=torchvision.models))
        raise ModelLoadError(f"model {spec.name!r}: unknown torchvision classifier {builder!r}; known: {known}")
    weights = spec.weights
    if weights is None or weights.lower() == "none":
        log.warning("model %r: no weights given, using random initialisation", spec.name)
        labels = _read_labels(spec.labels) if spec.labels else None
        kwargs = {"num_classes": len(labels)} if labels else {}
        return torchvision.models.get_model(builder, weights=None, **kwargs), labels, Preprocess()
    if Path(weights).suffix in (".pth", ".pt", ".safetensors"):
        if not Path(weights).is_file():
            raise ModelLoadError(f"model {spec.name!r}: weights file not found: {weights}")
        state = load_state_dict(weights)
        labels = _read_labels(spec.labels) if spec.labels else None
        num_classes = len(labels) if labels else _head_size(state) or 1000
        model = torchvision.models.get_model(builder, weights=None, num_classes=num_classes)
        model.load_state_dict(state)
        return model, labels, Preprocess()
    # A torchvision weights name: the enum brings its categories and its own preprocessing sizes.
    enum = torchvision.models.get_model_weights(builder)
    try:
        w = enum[weights]
    except KeyError:
        known = ", ".join(m.name for m in enum)
        raise ModelLoadError(f"model {spec.name!r}: unknown weights {weights!r} for {builder}; known: {known}, "
                             "a state_dict file, or none") from None
    model = torchvision.models.get_model(builder, weights=w)
    tf = w.transforms()
    crop = tuple(getattr(tf, "crop_size", [224, 224]))
    resize = getattr(tf, "resize_size", [256])
    pre = Preprocess(resize=int(resize[0]), crop=(int(crop[0]), int(crop[-1])),
                     mean=tuple(tf.mean), std=tuple(tf.std))
    labels = _read_labels(spec.labels) if spec.labels else list(w.meta["categories"])
    return model, labels, pre


def _load_python(spec: ModelSpec, target: str) -> nn.Module:
    module_name, _, attr = target.partition(":")
    if not attr:
        raise ModelLoadError(f"model {spec.name!r}: python source must be 'python:module:factory'")
    factory: Callable[[], nn.Module] = getattr(importlib.import_module(module_name), attr)
    model = factory()
    if spec.weights:
        model.load_state_dict(load_state_dict(spec.weights))
    return model


def build_module(spec: ModelSpec) -> tuple[nn.Module, list[str] | None, Preprocess]:
    """Build the ``nn.Module`` a spec names, with the labels and preprocessing it brings."""
    kind, _, target = spec.source.partition(":")
    if kind == "builtin" and target == "shapes":
        from service.models import shapes

        path = Path(spec.weights) if spec.weights else None
        model, labels = shapes.load_shapes(path)
        pre = Preprocess(resize=shapes.INPUT_SIZE, crop=(shapes.INPUT_SIZE, shapes.INPUT_SIZE),
                         mean=shapes.MEAN, std=shapes.STD)
        return model, labels, pre
    if kind == "torchvision":
        return _load_torchvision(spec, target)
    if kind == "torchscript":
        scripted: nn.Module = torch.jit.load(target, map_location="cpu")  # type: ignore[no-untyped-call]
        return scripted, None, Preprocess()
    if kind == "python":
        return _load_python(spec, target), None, Preprocess()
    raise ModelLoadError(f"model {spec.name!r}: unknown source {spec.source!r}; expected builtin:shapes, "
                         "torchvision:<builder>, torchscript:<path> or python:<module>:<factory>")


def _preprocess_override(base: Preprocess, table: Mapping[str, Any] | None) -> Preprocess:
    if not table:
        return base
    unknown = set(table) - {"resize", "crop", "mean", "std"}
    if unknown:
        raise ModelLoadError(f"unknown preprocess keys {sorted(unknown)}")

    def size(v: Any) -> tuple[int, int] | None:
        return None if v is None else (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))

    resize = table.get("resize", base.resize)
    return Preprocess(
        resize=resize if isinstance(resize, int) or resize is None else size(resize),
        crop=size(table.get("crop")),  # in a preprocess table, no `crop` means no center crop
        mean=tuple(table.get("mean", base.mean)),
        std=tuple(table.get("std", base.std)),
    )


def load_model(spec: ModelSpec) -> LoadedModel:
    """Build, move to the device once, trace the layers. Raises :class:`ModelLoadError`."""
    try:
        module, labels, base_pre = build_module(spec)
        return serve_module(module, spec, labels, _preprocess_override(base_pre, spec.preprocess))
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"model {spec.name!r} ({spec.source}) failed to load: {exc}") from exc


def serve_module(module: nn.Module, spec: ModelSpec, labels: list[str] | None = None,
                 preprocess: Preprocess | None = None) -> LoadedModel:
    """Wrap an already-built module (from a notebook, a test) as a servable model."""
    pre = preprocess or Preprocess()
    device = resolve_device(spec.device)
    # channels_last: faster convolutions with oneDNN on CPU (measured once on shapes at batch 32: 0.52
    # against 0.94 ms per image explained) and on tensor cores; models without convolutions are unaffected.
    module = module.to(device).eval().to(memory_format=torch.channels_last)
    h, w = pre.input_size
    engine = CamEngine(module, torch.zeros(1, 3, h, w, device=device))
    if spec.target_layer is not None:
        engine.layers = engine.layers.with_default(engine.layers.resolve(spec.target_layer))
        engine.register(engine.layers.default)
    labels = labels or [f"class_{i}" for i in range(engine.num_classes)]
    if len(labels) != engine.num_classes:
        engine.close()
        raise ModelLoadError(f"model {spec.name!r}: {len(labels)} labels for {engine.num_classes} classes")
    return LoadedModel(spec, module, engine, labels, pre, device, PRECISIONS[spec.precision])


class ModelRegistry:
    """Loaded models by name, and which one answers when a request names none."""

    def __init__(self, models: Iterable[LoadedModel], default: str | None = None) -> None:
        self._models: dict[str, LoadedModel] = {}
        for m in models:
            if m.name in self._models:
                raise ModelLoadError(f"model {m.name!r} is defined twice")
            self._models[m.name] = m
        if not self._models:
            raise ModelLoadError("no models configured")
        self.default = default or next(iter(self._models))
        if self.default not in self._models:
            raise ModelLoadError(f"default_model {self.default!r} is not among {list(self._models)}")

    def get(self, name: str | None = None) -> LoadedModel:
        key = name or self.default
        try:
            return self._models[key]
        except KeyError:
            raise ModelNotFound(f"unknown model {key!r}; available: {', '.join(self._models)}") from None

    def __iter__(self) -> Any:
        return iter(self._models.values())

    def __len__(self) -> int:
        return len(self._models)

    @property
    def ready(self) -> bool:
        return all(m.ready for m in self._models.values())

    def close(self) -> None:
        for m in self._models.values():
            m.close()
