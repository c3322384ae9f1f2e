"""Faithfulness metrics of saliency maps: does the model's confidence follow the map?

Each metric takes a model callable (``(B, 3, H, W)`` -> ``(B, K)`` logits), the model inputs ``x``
``(N, 3, H, W)``, one map per input ``maps`` ``(N, h, w)`` in [0, 1] (resized bilinearly to the input,
as torchcam does) and the explained class of each input ``classes`` ``(N,)``; scores are the class's
softmax probability. For other tasks (``service.cam.tasks``) a :data:`ScoreFn` re-scores the task's own
target on each perturbed input instead (:func:`scored_metrics_work`). Results are per input, ``(N,)``
tensors, so a server can report one figure per explanation and an evaluation can average them.

- ``average_drop`` / ``increase`` (Chattopadhay et al. 2018, torchcam's ``ClassificationMetric``):
  the input is multiplied by its map; drop = ``max(0, s - s_masked) / s``, increase = ``s_masked > s``.
  One extra forward per input.
- ``deletion`` / ``insertion`` (Petsiuk et al. 2018, torchcam's ``DeletionInsertionMetric``): pixels are
  ranked by the map; deletion replaces the top ones with the image's mean colour, insertion puts them
  back into a blurred copy (Gaussian, 11 px, sigma 5, as RISE), over ``steps`` intervals; the area under
  the probability curve against the perturbed fraction, by the trapezoid rule on [0, 1]. ``2 * steps``
  extra forwards per input.

Every extra forward runs under ``inference_mode`` in chunks of ``chunk_rows`` images; the generator
forms (``*_work``) yield after each chunk so a scheduler can interleave them with other work.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.transforms.v2.functional import gaussian_blur

from service.errors import InvalidArgument

ModelFn = Callable[[Tensor], Tensor]
#: ``(B, 3, H, W)`` perturbed inputs, ``(B,)`` which of the ``N`` explained inputs each row perturbs -> ``(B,)``
#: the score the metrics follow (a classifier's class probability; another task's confidence in its target).
ScoreFn = Callable[[Tensor, Tensor], Tensor]
MetricWork = Generator[None, None, dict[str, Tensor]]

METRICS = ("confidence", "deletion", "insertion")
#: the figures each requested metric adds to an explanation
FIGURES = {"confidence": ("average_drop", "increase"), "deletion": ("deletion",), "insertion": ("insertion",)}
DEFAULT_STEPS = 16
MIN_STEPS, MAX_STEPS = 4, 64
_BLUR_KERNEL, _BLUR_SIGMA = 11, 5.0


def check_metrics(names: Sequence[str], steps: int) -> tuple[str, ...]:
    """Validate metric names (each once, in the order given) and ``steps``."""
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise InvalidArgument("metrics", f"`metrics` must be among {', '.join(METRICS)}, got {unknown[0]!r}")
    if not MIN_STEPS <= steps <= MAX_STEPS:
        raise InvalidArgument("metric_steps", f"`metric_steps` must be between {MIN_STEPS} and {MAX_STEPS}, "
                              f"got {steps}")
    return tuple(dict.fromkeys(names))


def metric_forwards(names: Sequence[str], steps: int) -> int:
    """Extra forward images one explanation costs for ``names``."""
    return sum(1 if n == "confidence" else steps for n in set(names))


def class_probability(model: ModelFn, classes: Tensor) -> ScoreFn:
    """A classifier's score: the softmax probability of ``classes[which]`` for each row."""
    def score(x: Tensor, which: Tensor) -> Tensor:
        return model(x).float().softmax(dim=1).gather(1, classes[which, None])[:, 0]

    return score


def _scores(score: ScoreFn, x: Tensor, chunk_rows: int) -> Generator[None, None, Tensor]:
    out = []
    with torch.inference_mode():
        for start in range(0, x.shape[0], chunk_rows):
            which = torch.arange(start, min(x.shape[0], start + chunk_rows), device=x.device)
            out.append(score(x[start : start + chunk_rows], which))
            yield
    return torch.cat(out) if out else torch.empty(0, device=x.device)


def _upsampled(maps: Tensor, x: Tensor) -> Tensor:
    return F.interpolate(maps[:, None].float(), size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]


def confidence_work(score: ScoreFn, x: Tensor, maps: Tensor, *, base: Tensor | None = None,
                    chunk_rows: int = 32) -> MetricWork:
    """``average_drop`` and ``increase`` (as 0./1.), each ``(N,)``; ``base``: the unmasked scores if known."""
    if base is None:
        base = yield from _scores(score, x, chunk_rows)
    masked = _upsampled(maps, x)[:, None].to(x.dtype) * x
    s = yield from _scores(score, masked, chunk_rows)
    return {"average_drop": (base - s).clamp(min=0) / (base + 1e-7), "increase": (s > base).float()}


def _counts(positions: int, steps: int) -> list[int]:
    # torchcam's grid: intervals of ceil(P / steps) pixels, the last one possibly shorter.
    size = (positions + steps - 1) // steps
    return [*range(0, positions, size), positions]


def insertion_baseline(x: Tensor) -> Tensor:
    blurred: Tensor = gaussian_blur(x, kernel_size=[_BLUR_KERNEL, _BLUR_KERNEL], sigma=[_BLUR_SIGMA, _BLUR_SIGMA])
    return blurred


def deletion_baseline(x: Tensor) -> Tensor:
    return x.mean(dim=(2, 3), keepdim=True).expand_as(x)


def curve_work(score: ScoreFn, x: Tensor, maps: Tensor, *, kind: str, steps: int = DEFAULT_STEPS,
               base: Tensor | None = None, baseline: Tensor | None = None, chunk_rows: int = 32) -> MetricWork:
    """``{kind: (N,)}``, the area under the deletion or insertion curve.

    ``baseline``: what removed pixels become (deletion) or the canvas pixels are inserted into (insertion);
    by default the mean colour and the blurred image. ``base``: the unperturbed scores if known."""
    if kind not in ("deletion", "insertion"):
        raise ValueError(f"kind must be deletion or insertion, got {kind!r}")
    n, c, h, w = x.shape
    if baseline is None:
        baseline = deletion_baseline(x) if kind == "deletion" else insertion_baseline(x)
    if base is None:
        base = yield from _scores(score, x, chunk_rows)
    order = _upsampled(maps, x).flatten(1).argsort(dim=1, descending=True, stable=True)
    ranks = order.argsort(dim=1)  # (N, HW): 0 for the most salient pixel
    counts = _counts(h * w, steps)
    # The interior points and the far end: all-baseline for deletion, all-original for insertion is `base`.
    points = counts[1:] if kind == "deletion" else counts[:-1]
    total = n * len(points)
    flat_x, flat_b = x.flatten(2), baseline.flatten(2)
    count_t = torch.tensor(points, device=x.device)

    def perturbed(start: int, stop: int) -> Tensor:
        rows = torch.arange(start, stop, device=x.device)
        img, k = rows // len(points), rows % len(points)
        top = ranks[img] < count_t[k][:, None]  # (B, HW): the pixels already removed or inserted
        keep = ~top if kind == "deletion" else top
        return torch.where(keep[:, None], flat_x[img], flat_b[img]).view(-1, c, h, w)

    probs = []
    with torch.inference_mode():
        for start in range(0, total, chunk_rows):
            stop = min(total, start + chunk_rows)
            rows = torch.arange(start, stop, device=x.device)
            probs.append(score(perturbed(start, stop), rows // len(points)))
            yield
    curve = torch.cat(probs).view(n, len(points))
    curve = torch.cat([base[:, None], curve], dim=1) if kind == "deletion" else torch.cat([curve, base[:, None]], 1)
    fractions = torch.tensor(counts, device=x.device, dtype=torch.float32) / (h * w)
    return {kind: torch.trapezoid(curve, fractions, dim=1)}


def metrics_work(model: ModelFn, x: Tensor, maps: Tensor, classes: Tensor, names: Sequence[str], *,
                 steps: int = DEFAULT_STEPS, base: Tensor | None = None, chunk_rows: int = 32) -> MetricWork:
    """Every metric of ``names`` for a classifier's inputs: ``{figure: (N,)}``, in chunks."""
    return scored_metrics_work(class_probability(model, classes), x, maps, names, steps=steps, base=base,
                               chunk_rows=chunk_rows)


def scored_metrics_work(score: ScoreFn, x: Tensor, maps: Tensor, names: Sequence[str], *,
                        steps: int = DEFAULT_STEPS, base: Tensor | None = None, chunk_rows: int = 32) -> MetricWork:
    """Every metric of ``names`` for each input, re-scored by ``score``: ``{figure: (N,)}``, in chunks."""
    if base is None:
        base = yield from _scores(score, x, chunk_rows)
    out: dict[str, Tensor] = {}
    for name in check_metrics(names, steps):
        if name == "confidence":
            out.update((yield from confidence_work(score, x, maps, base=base, chunk_rows=chunk_rows)))
        else:
            out.update((yield from curve_work(score, x, maps, kind=name, steps=steps, base=base,
                                              chunk_rows=chunk_rows)))
    return out


def run(work: MetricWork) -> dict[str, Tensor]:
    """Run a metric generator to the end."""
    while True:
        try:
            next(work)
        except StopIteration as stop:
            result: dict[str, Tensor] = stop.value
            return result


def average_drop(model: ModelFn, x: Tensor, maps: Tensor, classes: Tensor, chunk_rows: int = 32) -> Tensor:
    """``(N,)`` relative drop of each class's probability when its input is multiplied by its map."""
    return run(confidence_work(class_probability(model, classes), x, maps, chunk_rows=chunk_rows))["average_drop"]


def increase(model: ModelFn, x: Tensor, maps: Tensor, classes: Tensor, chunk_rows: int = 32) -> Tensor:
    """``(N,)`` 1. where the masked input's probability is higher than the original's, else 0."""
    return run(confidence_work(class_probability(model, classes), x, maps, chunk_rows=chunk_rows))["increase"]


def deletion(model: ModelFn, x: Tensor, maps: Tensor, classes: Tensor, steps: int = DEFAULT_STEPS,
             baseline: Tensor | None = None, chunk_rows: int = 32) -> Tensor:
    """``(N,)`` deletion AUC (lower is better)."""
    return run(curve_work(class_probability(model, classes), x, maps, kind="deletion", steps=steps,
                          baseline=baseline, chunk_rows=chunk_rows))["deletion"]


def insertion(model: ModelFn, x: Tensor, maps: Tensor, classes: Tensor, steps: int = DEFAULT_STEPS,
              baseline: Tensor | None = None, chunk_rows: int = 32) -> Tensor:
    """``(N,)`` insertion AUC (higher is better)."""
    return run(curve_work(class_probability(model, classes), x, maps, kind="insertion", steps=steps,
                          baseline=baseline, chunk_rows=chunk_rows))["insertion"]
