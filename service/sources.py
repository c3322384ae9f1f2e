"""Where models come from: a name -> loader table, one entry per source kind.

A ``source`` in a model table is ``<kind>:<target>``. Each kind registers a loader with
:func:`source`, which refuses duplicates; the config check, ``/models`` and the error for an unknown
kind all read this table, so adding a kind is one decorated function.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import torch
import torchvision
from torch import nn

from service.cam.runtime import Runtime
from service.modelspec import ModelSpec
from service.preprocess import IMAGENET_MEAN, Preprocess

log = logging.getLogger("camserve.registry")


class ModelLoadError(Exception):
    """A model could not be loaded; start-up (or a load request) stops with this message."""


@dataclass(frozen=True)
class Built:
    """What a source gives: the module, the labels it brings (if any), its preprocessing and, where the
    source knows the architecture better than a trace does, its default target layer."""

    module: nn.Module
    labels: list[str] | None = None
    preprocess: Preprocess = field(default_factory=Preprocess)
    default_layer: str | None = None
    runtime: Runtime | None = None  # set when the module runs outside autograd (service.cam.runtime)
    task: str | None = None  # the task the source knows its model serves (the built-in detector, segmenter)


Loader = Callable[[ModelSpec, str, int | None], Built]


@dataclass(frozen=True)
class Source:
    kind: str
    usage: str
    load: Loader


SOURCES: dict[str, Source] = {}


def source(kind: str, usage: str) -> Callable[[Loader], Loader]:
    """Register ``fn(spec, target, num_labels)`` as the loader of ``<kind>:<target>`` sources.

    ``num_labels`` is the length of the spec's labels file, when it has one, for loaders that size
    the head from it."""
    def register(fn: Loader) -> Loader:
        if kind in SOURCES:
            raise ValueError(f"model source {kind!r} is registered twice")
        SOURCES[kind] = Source(kind, usage, fn)
        return fn

    return register


def build(spec: ModelSpec, num_labels: int | None) -> Built:
    kind, _, target = spec.source.partition(":")
    entry = SOURCES.get(kind)
    if entry is None:
        known = ", ".join(s.usage for s in SOURCES.values())
        raise ModelLoadError(f"model {spec.name!r}: unknown source {spec.source!r}; expected {known}")
    return entry.load(spec, target, num_labels)


def require(package: str, kind: str, extra: str) -> ModuleType:
    """Import a source's optional package, or say in one line which extra installs it."""
    try:
        return importlib.import_module(package)
    except ImportError:
        raise ModelLoadError(f"the {kind}: source needs the {package!r} package: pip install "
                             f"'camserve[{extra}]'") from None


# Keys under which training scripts commonly nest the state_dict in a checkpoint.
_NESTED = ("state_dict", "model_state_dict", "model", "module")


def load_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Read a state_dict from .pth/.pt (weights only, never pickled code) or .safetensors; a checkpoint
    that nests it under ``state_dict``, ``model_state_dict``, ``model`` or ``module`` is unwrapped."""
    if not Path(path).is_file():
        raise ModelLoadError(f"weights file not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        loaded: dict[str, torch.Tensor] = load_file(path)
        return loaded
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict):
        nested = next((state[k] for k in _NESTED if isinstance(state.get(k), dict)), None)
        state = nested if nested is not None else state
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelLoadError(f"{Path(path).name!r} holds {describe(state)}; expected a state_dict (a mapping "
                             "of parameter names to tensors, as `torch.save(model.state_dict(), path)` writes)")
    return state


def describe(obj: object) -> str:
    """What a loaded checkpoint is, in a few words, for an error message."""
    if isinstance(obj, dict):
        keys = ", ".join(map(str, list(obj)[:5])) + (", ..." if len(obj) > 5 else "")
        return f"a dict of {len(obj)} entries ({keys})" if obj else "an empty dict"
    if isinstance(obj, torch.Tensor):
        return f"a single tensor of shape {tuple(obj.shape)}"
    return f"a {type(obj).__name__}"


def load_weights(model: nn.Module, state: Mapping[str, torch.Tensor], what: str) -> None:
    """``model.load_state_dict(state)``, with a one-line message when they do not fit."""
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        def few(keys: list[str]) -> str:
            return ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")
        raise ModelLoadError(
            f"the weights do not fit {what}: {len(result.missing_keys)} missing keys "
            f"({few(result.missing_keys)}), {len(result.unexpected_keys)} unexpected keys "
            f"({few(result.unexpected_keys)})")


def _head_size(state: Mapping[str, torch.Tensor]) -> int | None:
    """The class count of a classifier state_dict: rows of its last 2-D weight (the head)."""
    heads = [v for k, v in state.items() if k.endswith("weight") and v.dim() == 2]
    return int(heads[-1].shape[0]) if heads else None


# The built-in models, trained in the package on synthetic scenes, and the task each one serves.
BUILTIN_TASKS = {"shapes": "classification", "shapes-detect": "detection", "shapes-seg": "segmentation"}


@source("builtin", "builtin:shapes | shapes-detect | shapes-seg")
def _builtin(spec: ModelSpec, target: str, num_labels: int | None) -> Built:
    if target not in BUILTIN_TASKS:
        raise ModelLoadError(f"model {spec.name!r}: the builtin models are {', '.join(BUILTIN_TASKS)}, got "
                             f"{spec.source!r}")
    from service.models import shapes, shapes_detect, shapes_seg

    weights = Path(spec.weights) if spec.weights else None
    loaders = {"shapes": shapes.load_shapes, "shapes-detect": shapes_detect.load_shapes_detect,
               "shapes-seg": shapes_seg.load_shapes_seg}
    model, labels = loaders[target](weights)
    pre = Preprocess(resize=shapes.INPUT_SIZE, crop=(shapes.INPUT_SIZE, shapes.INPUT_SIZE),
                     mean=shapes.MEAN, std=shapes.STD)
    return Built(model, labels, pre, task=BUILTIN_TASKS[target])


# Where torchvision keeps each task's builders.
_TORCHVISION_TASKS = {"classification": torchvision.models, "detection": torchvision.models.detection,
                      "segmentation": torchvision.models.segmentation}


def _builder_options(spec: ModelSpec) -> dict[str, object]:
    """The builder's keyword arguments; ``"none"`` means None, so a table can say ``weights_backbone = "none"``.
    Detection and segmentation builders default ``weights_backbone`` to ImageNet weights, a download: here
    it is None unless asked for."""
    options = {k: None if isinstance(v, str) and v.lower() == "none" else v for k, v in (spec.options or {}).items()}
    if spec.task in ("detection", "segmentation"):
        options.setdefault("weights_backbone", None)
    return options


def _task_preprocess(spec: ModelSpec, model: nn.Module) -> Preprocess | None:
    """Detectors normalise and resize inside (``model.transform``): feed them [0, 1] pixels at their own
    minimum size, uncropped. Segmenters take ImageNet-normalised images, uncropped, at 520 as torchvision's
    weights do.

    A detector's upload is letterboxed: torchvision's own transform keeps the aspect ratio and pads the batch
    below and to the right with zeros after normalising, so its weights never saw a squashed object. The
    padding here is the pixel that normalises to zero (the model's ``image_mean``), placed the same way."""
    if spec.task == "detection":
        transform = getattr(model, "transform", None)
        sizes = getattr(transform, "min_size", (512,))
        side = int(sizes[0]) if isinstance(sizes, tuple | list) else int(sizes)
        mean = getattr(transform, "image_mean", IMAGENET_MEAN)
        fill = (round(255 * float(mean[0])), round(255 * float(mean[1])), round(255 * float(mean[2])))
        return Preprocess(resize=(side, side), crop=None, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0),
                          letterbox="top-left", fill=fill)
    if spec.task == "segmentation":
        return Preprocess(resize=(520, 520), crop=None)
    return None


def _task_labels(spec: ModelSpec, model: nn.Module) -> list[str] | None:
    """A random detector's or segmenter's classes, from the size it was built with."""
    classes = spec.options.get("num_classes") if spec.options else None
    if spec.task == "detection" and isinstance(classes, int):
        return [f"class_{i}" for i in range(classes)]
    if spec.task == "segmentation" and isinstance(classes, int) and classes > 1:
        return ["__background__", *[f"class_{i}" for i in range(1, classes)]]  # torchvision's convention
    return None


@source("torchvision", "torchvision:<builder>")
def _torchvision(spec: ModelSpec, builder: str, num_labels: int | None) -> Built:
    built = _torchvision_module(spec, builder, num_labels)
    pre = _task_preprocess(spec, built.module)
    if pre is None:
        return built
    return Built(built.module, built.labels or _task_labels(spec, built.module), pre)


def _torchvision_module(spec: ModelSpec, builder: str, num_labels: int | None) -> Built:
    namespace = _TORCHVISION_TASKS.get(spec.task)
    if namespace is None:
        raise ModelLoadError(f"model {spec.name!r}: torchvision has no {spec.task} builders; use a python: factory")
    available = torchvision.models.list_models(module=namespace)
    if builder not in available:
        kind = {"classification": "classifier", "detection": "detector", "segmentation": "segmenter"}[spec.task]
        raise ModelLoadError(f"model {spec.name!r}: unknown torchvision {kind} {builder!r}; known: "
                             f"{', '.join(available)}")
    weights = spec.weights
    options = _builder_options(spec)
    if weights is None or weights.lower() == "none":
        log.warning("model %r: no weights given, using random initialisation (seed 0)", spec.name)
        kwargs = {"num_classes": num_labels} if num_labels else {}
        # Seeded, in a forked generator: every replica and every restart serves the same random model,
        # so answers agree across a Ray or Kubernetes scale-out and a test's expectations hold.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return Built(torchvision.models.get_model(builder, weights=None, **{**kwargs, **options}))
    if Path(weights).suffix in (".pth", ".pt", ".safetensors"):
        state = load_state_dict(weights)
        # A classifier's head gives its class count; a detector's last 2-D weight is its box regressor.
        classes = num_labels or (_head_size(state) or 1000 if spec.task == "classification" else None)
        model = torchvision.models.get_model(builder, weights=None, **{
            **({"num_classes": classes} if classes else {}), **options})
        try:
            load_weights(model, state, f"torchvision's {builder}")
        except RuntimeError as exc:  # same names, other shapes
            raise ModelLoadError(f"the weights do not fit torchvision's {builder}: {str(exc).splitlines()[-1].strip()}"
                                 ) from None
        return Built(model)
    # A torchvision weights name: the enum brings its categories and its own preprocessing sizes.
    enum = torchvision.models.get_model_weights(builder)
    try:
        w = enum[weights]
    except KeyError:
        known = ", ".join(m.name for m in enum)
        raise ModelLoadError(f"model {spec.name!r}: unknown weights {weights!r} for {builder}; known: {known}, "
                             "a state_dict file, or none") from None
    model = torchvision.models.get_model(builder, weights=w, **options)
    tf = w.transforms()
    crop = tuple(getattr(tf, "crop_size", [224, 224]))
    resize = getattr(tf, "resize_size", [256])
    pre = Preprocess(resize=int(resize[0]), crop=(int(crop[0]), int(crop[-1])), mean=tuple(tf.mean),
                     std=tuple(tf.std))
    return Built(model, list(w.meta["categories"]), pre)


@source("torchscript", "torchscript:<path>")
def _torchscript(spec: ModelSpec, path: str, num_labels: int | None) -> Built:
    if not Path(path).is_file():
        raise ModelLoadError(f"model {spec.name!r}: TorchScript file not found: {path}")
    scripted: nn.Module = torch.jit.load(path, map_location="cpu")  # type: ignore[no-untyped-call]
    return Built(scripted)


@source("python", "python:<module>:<factory>")
def _python(spec: ModelSpec, target: str, num_labels: int | None) -> Built:
    module_name, _, attr = target.partition(":")
    if not module_name or not attr:
        raise ModelLoadError(f"model {spec.name!r}: python source must be 'python:module:factory', got "
                             f"{spec.source!r}")
    # Factories are imported from the current directory first, then the installed packages, whether
    # the server was started as `camserve` (whose sys.path lacks the cwd) or `python -m service`.
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        factory: Callable[[], nn.Module] = getattr(importlib.import_module(module_name), attr)
    except ModuleNotFoundError as exc:
        raise ModelLoadError(f"model {spec.name!r}: cannot import module {exc.name!r} for {spec.source!r} "
                             f"(looked in {cwd} and the installed packages)") from None
    except AttributeError:
        raise ModelLoadError(f"model {spec.name!r}: module {module_name!r} has no {attr!r}") from None
    model = factory()
    if not isinstance(model, nn.Module):
        raise ModelLoadError(f"model {spec.name!r}: {spec.source!r} returned {type(model).__name__}, "
                             "not a torch.nn.Module")
    if spec.weights:
        model.load_state_dict(load_state_dict(spec.weights))
    return Built(model)


# Sources whose packages are optional register themselves on import; their modules import lazily.
from service import source_export, source_hf, source_onnx, source_timm  # noqa: E402, F401
