"""What inference returns, whatever the protocol: plain dataclasses the front-ends encode."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from service.rendering import Heatmap

if TYPE_CHECKING:
    from service.task_results import TaskResult


@dataclass(frozen=True)
class Prediction:
    """One class's score, as the model's ``output`` activation gives it (softmax by default)."""

    index: int
    label: str
    score: float


@dataclass(frozen=True)
class Explanation(Prediction):
    """A class's heatmap; ``score`` is the class's score, as in the predictions."""

    method: str
    layer: str
    heatmap: Heatmap
    metrics: dict[str, float] | None = None  # faithfulness figures, when asked for (service.cam.metrics)
    note: str | None = None  # why the map is what it is, when a client would otherwise wonder (all zero)
    target: dict[str, object] | None = None  # for tasks beyond classification: the detection, region or reference


@dataclass(frozen=True)
class ImageResult:
    """``scores``: every class's score, in class order (for protocols that return them all)."""

    predictions: list[Prediction]
    scores: list[float]
    explanations: list[Explanation] | None = None
    task: TaskResult | None = None  # a detector's, segmenter's or embedding model's prediction


@dataclass(frozen=True)
class InferenceResult:
    model: str
    results: list[ImageResult]
