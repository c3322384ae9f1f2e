"""What to serve: ``ModelSpec``, one ``[models.<name>]`` table of the config, checked in full before
anything loads. Free of torch, so reading a config costs nothing."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

PRECISIONS = ("fp32", "bf16", "fp16")
# How logits become the scores clients see: softmax for one-of-K heads, sigmoid for multi-label or
# single-logit binary heads (softmax over one output is always 1.0), none for raw scores.
ACTIVATIONS = ("softmax", "sigmoid", "none")
# How a layer's output lies on the image grid (service.cam.layers.LAYOUTS; kept here so a config check
# imports no torch).
LAYOUTS = ("nchw", "nhwc", "tokens", "lnd")
# What a model's output means (service.cam.tasks; kept here so a config check imports no torch).
TASKS = ("classification", "detection", "segmentation", "embedding")
SOURCE_KINDS = ("builtin", "torchvision", "torchscript", "python", "timm", "hf", "onnx", "export")


class SpecError(ValueError):
    """One or more problems in a model table; ``problems`` has one line each."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


def _size(value: Any, allow_false: bool) -> bool:
    if allow_false and value is False:
        return True
    if isinstance(value, int) and not isinstance(value, bool):
        return value > 0
    return (isinstance(value, list) and len(value) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value))


def _byte(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 255


def _triple(value: Any, positive: bool) -> bool:
    return (isinstance(value, list) and len(value) == 3
            and all(isinstance(v, int | float) and not isinstance(v, bool) and (v > 0 or not positive)
                    for v in value))


_PREPROCESS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "resize": ("a positive integer (shorter side) or [height, width]", lambda v: _size(v, False)),
    "crop": ("a positive integer, [height, width], or false for no crop", lambda v: _size(v, True)),
    "mean": ("a list of 3 numbers", lambda v: _triple(v, False)),
    "std": ("a list of 3 positive numbers", lambda v: _triple(v, True)),
    "interpolation": ("bilinear, bicubic or nearest", lambda v: v in ("bilinear", "bicubic", "nearest")),
    # service.preprocess.LETTERBOX, kept here so a config check imports no torch.
    "letterbox": ("center, top-left, or false for a plain resize", lambda v: v in ("center", "top-left", False)),
    "fill": ("an integer from 0 to 255, or a list of 3", lambda v: _byte(v) or (
        isinstance(v, list) and len(v) == 3 and all(_byte(c) for c in v))),
}


@dataclass(frozen=True)
class ModelSpec:
    """One model to serve. ``preprocess`` overrides the source's own sizes and normalisation key by
    key; keys left out keep the source's values."""

    name: str
    source: str
    weights: str | None = None
    device: str = "auto"
    target_layer: str | None = None
    labels: str | None = None
    preprocess: Mapping[str, Any] | None = None
    precision: str = "fp32"
    output: str = "softmax"
    layout: str | None = None  # read layers this way where their shape allows it (nchw, nhwc, tokens, lnd)
    options: Mapping[str, Any] | None = None  # keyword arguments of the source's builder (timm, torchvision)
    task: str = "classification"  # what the output means: one of TASKS

    @property
    def kind(self) -> str:
        return self.source.partition(":")[0]

    @classmethod
    def from_table(cls, name: str, table: Any) -> ModelSpec:
        """Check a config table whole; raises :class:`SpecError` listing every problem."""
        where = f"model {name!r}"
        if not isinstance(table, Mapping):
            raise SpecError([f"{where}: must be a table ([models.{name}] with `source` = ...), got "
                             f"{type(table).__name__} {table!r}"])
        problems: list[str] = []
        known = {"source", "weights", "device", "target_layer", "labels", "preprocess", "precision", "output",
                 "layout", "options", "task"}
        for key in sorted(set(table) - known):
            problems.append(f"{where}: unknown key `{key}`; known: {', '.join(sorted(known))}")
        for key in sorted(known - {"preprocess", "options"}):
            if key in table and not isinstance(table[key], str):
                problems.append(f"{where}: `{key}` must be a string, got {table[key]!r}")
        source = table.get("source")
        if source is None:
            problems.append(f"{where}: `source` is required (builtin:shapes, torchvision:<builder>, timm:<name>, "
                            "hf:<directory>, onnx:<file>, export:<file>, torchscript:<path> or "
                            "python:<module>:<factory>)")
        elif isinstance(source, str) and source.partition(":")[0] not in SOURCE_KINDS:
            problems.append(f"{where}: `source` must start with one of {', '.join(SOURCE_KINDS)}, got {source!r}")
        if isinstance(table.get("precision"), str) and table["precision"] not in PRECISIONS:
            problems.append(f"{where}: `precision` must be one of {', '.join(PRECISIONS)}, got "
                            f"{table['precision']!r}")
        if isinstance(table.get("layout"), str) and table["layout"] not in LAYOUTS:
            problems.append(f"{where}: `layout` must be one of {', '.join(LAYOUTS)}, got {table['layout']!r}")
        if isinstance(table.get("task"), str) and table["task"] not in TASKS:
            problems.append(f"{where}: `task` must be one of {', '.join(TASKS)}, got {table['task']!r}")
        if isinstance(table.get("output"), str) and table["output"] not in ACTIVATIONS:
            problems.append(f"{where}: `output` must be one of {', '.join(ACTIVATIONS)}, got {table['output']!r}")
        if "options" in table and not isinstance(table["options"], Mapping):
            problems.append(f"{where}: `options` must be a table of the builder's keyword arguments, got "
                            f"{table['options']!r}")
        pre = table.get("preprocess")
        if pre is not None:
            if not isinstance(pre, Mapping):
                problems.append(f"{where}: `preprocess` must be a table, got {pre!r}")
            else:
                for key, value in pre.items():
                    if key not in _PREPROCESS:
                        problems.append(f"{where}: unknown key `preprocess.{key}`; known: "
                                        f"{', '.join(_PREPROCESS)}")
                    elif not _PREPROCESS[key][1](value):
                        problems.append(f"{where}: `preprocess.{key}` must be {_PREPROCESS[key][0]}, got {value!r}")
                if pre.get("letterbox") in ("center", "top-left"):
                    # The input size is the box the image is fitted into; a crop would cut it again.
                    if "resize" in pre and not isinstance(pre["resize"], list):
                        problems.append(f"{where}: `preprocess.letterbox` fits the image inside `resize` as "
                                        f"[height, width], got resize = {pre['resize']!r}")
                    if pre.get("crop", False) is not False:
                        problems.append(f"{where}: `preprocess.letterbox` takes no `crop`, got crop = "
                                        f"{pre['crop']!r}")
        if problems:
            raise SpecError(problems)
        return cls(name=name, **table)
