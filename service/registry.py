"""A model ready to compute: built from its source, on its device, with its hook engine, labels,
preprocessing and score activation (``LoadedModel``). Sources are in ``service.sources``; what to
load is a ``service.modelspec.ModelSpec``; which models are served, and their states, is the
``service.repository``."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn

from service.cam import CamEngine, find_layers
from service.cam.engine import preferred_layers
from service.cam.layers import find_runtime_layers
from service.cam.runtime import Runtime
from service.cam.tasks import Task, get_task
from service.errors import InvalidArgument
from service.labels import LabelsFileError, read_labels
from service.modelspec import ModelSpec
from service.preprocess import Preprocess
from service.sources import ModelLoadError, build

__all__ = ["DTYPES", "LoadedModel", "ModelLoadError", "ModelSpec", "load_model", "resolve_device", "serve_module"]

DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class LoadedModel:
    """A model on its device, its hook engine, labels, preprocessing and score activation."""

    spec: ModelSpec
    module: nn.Module
    engine: CamEngine
    labels: list[str]
    preprocess: Preprocess
    device: torch.device
    precision: torch.dtype | None = None
    # The logits did not change between two different inputs (measured with the forward time, in the
    # repository's warm-up): a zero-initialised head or a broken model. Every gradient map is then zero.
    input_independent: bool = False
    # Seconds one image's forward pass takes at a batch of chunk size, measured once the model is warm
    # (the repository's warm-up); prices perturbation methods before they run. None: not measured.
    forward_s: float | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def num_classes(self) -> int:
        """Classes (the labels) for every task but embedding, whose width is its embedding size."""
        return self.engine.num_classes if self.task is None or self.task.name == "embedding" else len(self.labels)

    @property
    def task(self) -> Task | None:
        """``None`` for a classifier; otherwise what the output means (``service.cam.tasks``)."""
        return self.engine.task

    @property
    def task_name(self) -> str:
        return self.spec.task

    @property
    def explainable(self) -> bool:
        return bool(self.engine.layers.candidates)

    @property
    def explanations(self) -> str:
        """``gradients``, ``gradient-free`` (a runtime outside autograd) or ``none``."""
        if not self.explainable:
            return "none"
        return "gradients" if self.engine.runtime is None else "gradient-free"

    @property
    def explanations_note(self) -> str | None:
        """Why the model cannot be explained, when it cannot."""
        try:
            self.engine.layers.resolve(None)
        except InvalidArgument as exc:
            return exc.message
        return None

    def scores(self, logits: Tensor) -> Tensor:
        """``(..., K)`` logits -> the scores clients see, per the spec's ``output`` activation."""
        x = logits.float()
        if self.spec.output == "sigmoid":
            return x.sigmoid()
        if self.spec.output == "none":
            return x
        return x.softmax(dim=-1)

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


def _override(base: Preprocess, table: Mapping[str, Any] | None) -> Preprocess:
    """Keys given in a ``preprocess`` table replace the source's; the others keep its values."""
    if not table:
        return base

    def size(v: Any) -> tuple[int, int]:
        return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))

    resize = table.get("resize", base.resize)
    # An exact [height, width] resize is the input size itself, so it implies no crop unless one is given.
    crop = table.get("crop", None if isinstance(resize, list) else base.crop)
    letterbox = table.get("letterbox", base.letterbox)
    if table.get("letterbox") and "resize" not in table:
        # A letterbox asked for alone fits the image inside the input size the source already had.
        resize, crop = list(base.input_size), None
    fill = table.get("fill", base.fill)
    return Preprocess(
        resize=resize if isinstance(resize, int) or resize is None else size(resize),
        crop=None if crop is False or crop is None else size(crop),
        mean=tuple(table.get("mean", base.mean)),
        std=tuple(table.get("std", base.std)),
        interpolation=table.get("interpolation", base.interpolation),
        letterbox=None if letterbox is False else letterbox,
        fill=(fill, fill, fill) if isinstance(fill, int) else (int(fill[0]), int(fill[1]), int(fill[2])),
    )


def load_model(spec: ModelSpec) -> LoadedModel:
    """Build, move to the device once, trace the layers. Raises :class:`ModelLoadError`."""
    try:
        labels = read_labels(spec.labels) if spec.labels else None
        built = build(spec, len(labels) if labels else None)
        if built.task is not None and spec.task == "classification":  # the default: the source knows better
            spec = replace(spec, task=built.task)
        preprocess = _override(built.preprocess, spec.preprocess)
        return serve_module(built.module, spec, labels or built.labels, preprocess, built.default_layer,
                            built.runtime)
    except ModelLoadError as exc:
        if str(exc).startswith(f"model {spec.name!r}"):
            raise
        raise ModelLoadError(f"model {spec.name!r}: {exc}") from None
    except LabelsFileError as exc:
        raise ModelLoadError(f"model {spec.name!r}: {exc}") from None
    except Exception as exc:
        raise ModelLoadError(f"model {spec.name!r} ({spec.source}) failed to load: {type(exc).__name__}: "
                             f"{exc}") from exc


def serve_module(module: nn.Module, spec: ModelSpec, labels: list[str] | None = None,
                 preprocess: Preprocess | None = None, default_layer: str | None = None,
                 runtime: Runtime | None = None) -> LoadedModel:
    """Wrap an already-built module (from a notebook, a test) as a servable model; ``default_layer`` is the
    source's choice of target layer, used unless the spec names one; ``runtime``: what runs ``module``
    outside autograd, when something does."""
    pre = preprocess or Preprocess()
    device = resolve_device(spec.device)
    # channels_last: faster convolutions with oneDNN on CPU (measured once on shapes at batch 32: 0.52
    # against 0.94 ms per image explained) and on tensor cores; models without convolutions are unaffected.
    module = module.to(device).eval().to(memory_format=torch.channels_last)
    for p in module.parameters():
        p.requires_grad_(False)
    h, w = pre.input_size
    example = torch.zeros(1, 3, h, w, device=device)
    layers = (find_layers(module, example, spec.layout) if runtime is None
              else find_runtime_layers(runtime, example, spec.layout))
    if spec.target_layer is not None:
        try:
            layers = layers.with_default(layers.resolve(spec.target_layer))
        except InvalidArgument as exc:
            raise ModelLoadError(f"model {spec.name!r}: `target_layer`: {exc.message}") from None
    elif default_layer in layers.candidates:
        layers = layers.with_default(default_layer)
    task = get_task(spec.task)
    if spec.target_layer is None and default_layer not in layers.candidates:
        layers = preferred_layers(layers, module, task)
    try:
        engine = CamEngine(module, example, layers, runtime=runtime, task=task)
    except ValueError as exc:
        raise ModelLoadError(f"model {spec.name!r}: {exc} (`task` is {spec.task!r})") from None
    # A detector's classes are whatever its labels index; every other task's output has a fixed width.
    fixed = spec.task != "detection" and spec.task != "embedding"
    if labels is not None and fixed and len(labels) != engine.num_classes:
        engine.close()
        where = f" in {spec.labels}" if spec.labels else ""
        raise ModelLoadError(f"model {spec.name!r}: {len(labels)} labels{where} but the model has "
                             f"{engine.num_classes} outputs")
    labels = labels or [f"class_{i}" for i in range(engine.num_classes)]
    if task is not None:
        task.labels = list(labels)
    return LoadedModel(spec, module, engine, labels, pre, device, DTYPES[spec.precision])
