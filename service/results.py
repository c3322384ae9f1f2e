"""What inference returns, whatever the protocol: plain dataclasses the front-ends encode."""

from __future__ import annotations

from dataclasses import dataclass

from service.rendering import Heatmap


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


@dataclass(frozen=True)
class ImageResult:
    """``scores``: every class's score, in class order (for protocols that return them all)."""

    predictions: list[Prediction]
    scores: list[float]
    explanations: list[Explanation] | None = None


@dataclass(frozen=True)
class InferenceResult:
    model: str
    results: list[ImageResult]
