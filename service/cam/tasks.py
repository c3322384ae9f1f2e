"""What a model's output means and what a target is: classification, detection, segmentation, embedding.

The engine keeps one forward and one batched backward for every task by asking the model's :class:`Task`
for a *score matrix*: ``scores(out, resolved)`` returns ``(N, K)`` differentiable scores and, per image,
the columns to explain. For a classifier that is the logits and the target classes, exactly as before.
For the other tasks column ``t`` of row ``i`` is image ``i``'s ``t``-th target's objective, zero-padded:

- detection: the score of the detection of the target's label that overlaps the target box most, when
  the overlap passes 0.5 (plus that overlap with ``score+iou``, which equals pytorch-grad-cam's
  ``FasterRCNNBoxScoreTarget`` wherever that one scores at all); a box that is lost scores 0. Boxes are
  matched again in every pass, because indices are not stable across passes;
- segmentation: the sum of class ``c``'s logits over a region, the predicted region of ``c`` or a mask
  the client sends (``SemanticSegmentationTarget``);
- embedding: the cosine similarity of the image's embedding to a reference vector
  (the ``SimilarityToConceptTarget`` of pytorch-grad-cam's tutorial).

Everything here takes and returns tensors on the model's device; nothing knows HTTP.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import box_iou

from service.cam.roi_heads import sparse_backward
from service.cam.upsampling import matrix_backward, region_weights, resized_from
from service.errors import InvalidArgument
from service.modelspec import TASKS

OBJECTIVES = ("score", "score+iou")
# A box must overlap a detection by more than this to be that detection (pytorch-grad-cam's threshold).
MATCH_IOU = 0.5
_BACKGROUND = ("__background__", "background", "bg")


@dataclass(frozen=True)
class TaskTarget:
    """One target as the client gave it, in model-input pixels (the pipeline maps uploads to them).

    ``index``: a class (classification, segmentation) or a detection's index (detection);
    ``box``: ``(x0, y0, x1, y1)`` matched to a detection by IoU, with ``label`` if given;
    ``mask``: ``(h, w)`` bool region at the model input's size (segmentation);
    ``reference``: ``(D,)`` float vector (embedding)."""

    index: int | None = None
    box: tuple[float, float, float, float] | None = None
    label: int | None = None
    mask: Tensor | None = None
    reference: Tensor | None = None


@dataclass(frozen=True)
class Resolved:
    """A target made concrete on one image's output: what is differentiated in every pass."""

    label: int  # the class explained (-1: an embedding's similarity)
    box: Tensor | None = None  # (4,) detection box in model-input pixels
    detection: int | None = None  # the detection's index in the shared pass
    region: Tensor | None = None  # (h, w) float 0/1 at the output's resolution
    region_kind: str | None = None  # "predicted" or "mask"
    reference: Tensor | None = None  # (D,) unit vector
    iou: bool = False  # add the IoU to the detection score (score+iou)


@dataclass(frozen=True)
class Detection:
    """``box`` in model-input pixels ``(x0, y0, x1, y1)``."""

    index: int
    label: int
    score: float
    box: tuple[float, float, float, float]


@dataclass(frozen=True)
class Segment:
    """A class present in the predicted mask: its ``area`` in output pixels and mean probability there."""

    label: int
    area: int
    score: float


@dataclass(frozen=True)
class Summary:
    """One image's prediction, detached: ``detections``, ``segments`` with the ``mask`` ``(h, w)`` int64
    class map, or ``embedding`` ``(D,)``."""

    detections: tuple[Detection, ...] = ()
    segments: tuple[Segment, ...] = ()
    mask: Tensor | None = None
    embedding: Tensor | None = None


class Task:
    """The part of serving a model that depends on what its output means. ``labels``: the model's classes."""

    name: ClassVar[str] = ""

    def explaining(self) -> AbstractContextManager[None]:
        """Entered around the forward pass of an explanation."""
        return nullcontext()

    def __init__(self, labels: Sequence[str] = ()) -> None:
        self.labels = list(labels)

    def width(self, out: object) -> int:
        """What the model returns per image when that is a fixed width (classes, embedding size); else 0."""
        return 0

    def is_background(self, label: int) -> bool:
        return 0 <= label < len(self.labels) and self.labels[label].lower() in _BACKGROUND

    def default_layer(self, candidates: Sequence[str]) -> str | None:
        """The layer to explain when none is named, among the traced ``candidates`` in call order; ``None``:
        the tracer's choice."""
        return None

    def check_output(self, out: object, n: int) -> None:
        """Raise ``ValueError`` unless ``out`` is this task's output for ``n`` images."""
        raise NotImplementedError

    def summarize(self, out: object) -> list[Summary]:
        """Per image, what the model predicts (detached)."""
        raise NotImplementedError

    def resolve(self, summary: Summary, targets: Sequence[TaskTarget], top: int, objective: str
                ) -> tuple[Resolved, ...]:
        """One image's targets, or its ``top`` default ones when none are given."""
        raise NotImplementedError

    def objective(self, out: object, image: int, target: Resolved) -> Tensor:
        """The differentiable scalar of ``target`` on image ``image`` of ``out``."""
        raise NotImplementedError

    def scores(self, out: object, resolved: Sequence[tuple[Resolved, ...]]) -> Tensor:
        """``(N, T_max)``: row ``i``'s targets' objectives, zero where an image has fewer."""
        t_max = max((len(r) for r in resolved), default=0)
        rows = []
        for i, targets in enumerate(resolved):
            row = [self.objective(out, i, t).reshape(()) for t in targets]
            zero = self._zero(out)
            rows.append(torch.stack([*row, *[zero] * (t_max - len(row))]) if t_max else zero.new_zeros(0))
        return torch.stack(rows)

    def _zero(self, out: object) -> Tensor:
        raise NotImplementedError

    def select(self, out: object, rows: Sequence[int]) -> object:
        """The output of images ``rows`` of ``out``, in that order (a row may repeat)."""
        raise NotImplementedError

    def rescore(self, out: object, rows: Sequence[int], targets: Sequence[tuple[Resolved, ...]]) -> Tensor:
        """``(B, T_max)`` float32: ``targets[b]`` scored on row ``rows[b]`` of ``out``, an extra pass's output
        (perturbation methods), with columns past a row's own targets repeating its last one, as the
        engine's target rows do. Boxes are matched again: a detection the perturbation lost scores 0."""
        t_max = max((len(t) for t in targets), default=0)
        padded = [(*t, *[t[-1]] * (t_max - len(t))) for t in targets]
        return self.scores(self.select(out, rows), padded).detach().float()

    def confidence(self, out: object, image: int, target: Resolved) -> Tensor:
        """What faithfulness metrics follow for ``target`` (a scalar, no gradient): its objective, except where a
        probability reads better (segmentation)."""
        return self.objective(out, image, target).detach().float()

    def confidences(self, out: object, targets: Sequence[Resolved]) -> Tensor:
        """``(B,)``: row ``b`` of ``out`` scored for ``targets[b]``."""
        return torch.stack([self.confidence(out, b, t).reshape(()) for b, t in enumerate(targets)])

    def flip(self, target: Resolved, width: int) -> Resolved:
        """``target`` on the image mirrored left to right (``width``: the model input's), for ``smooth="aug"``."""
        return target


def _float(t: Tensor) -> Tensor:
    return t if t.dtype == torch.float32 else t.float()


class DetectionTask(Task):
    """torchvision's convention: ``model(x)`` returns one dict per image with ``boxes`` ``(K, 4)``,
    ``labels`` ``(K,)`` and ``scores`` ``(K,)``, sorted by score; scores and boxes differentiable."""

    name = "detection"

    def explaining(self) -> AbstractContextManager[None]:
        # torchvision's two-stage detectors pool every proposal; a score reads one (service.cam.roi_align).
        return sparse_backward()

    def default_layer(self, candidates: Sequence[str]) -> str | None:
        # torchvision's detectors: the backbone's last map; the FPN and heads run once per level, the RoI
        # heads on boxes rather than images.
        return _last_under(candidates, "backbone.body.") or _last_under(candidates, "backbone.")

    def check_output(self, out: object, n: int) -> None:
        if not (isinstance(out, list | tuple) and len(out) == n and all(
                isinstance(d, Mapping) and {"boxes", "labels", "scores"} <= set(d) for d in out)):
            raise ValueError("a detection model must return one dict with `boxes`, `labels` and `scores` per "
                             f"image (torchvision's convention), got {type(out).__name__}")

    def summarize(self, out: object) -> list[Summary]:
        assert isinstance(out, list | tuple)
        # One host read per field for the whole batch, not one per detection.
        counts = [int(d["scores"].shape[0]) for d in out]
        boxes = torch.cat([d["boxes"].detach() for d in out]).float().tolist() if out else []
        labels = torch.cat([d["labels"] for d in out]).tolist() if out else []
        scores = torch.cat([d["scores"].detach() for d in out]).float().tolist() if out else []
        summaries, start = [], 0
        for k in counts:
            summaries.append(Summary(detections=tuple(
                Detection(j, int(labels[start + j]), scores[start + j], tuple(boxes[start + j]))
                for j in range(k))))
            start += k
        return summaries

    def resolve(self, summary: Summary, targets: Sequence[TaskTarget], top: int, objective: str
                ) -> tuple[Resolved, ...]:
        found = summary.detections
        iou = objective == "score+iou"
        if not targets:
            return tuple(Resolved(d.label, torch.tensor(d.box), d.index, iou=iou) for d in found[:top])
        matches = iter(_best_overlaps(found, [t for t in targets if t.box is not None]))
        out = []
        for t in targets:
            if t.box is None:
                if t.index is None or not 0 <= t.index < len(found):
                    raise InvalidArgument("targets", f"a detection target must be a detection index in "
                                          f"0..{len(found) - 1} or a box, got {t.index!r} (this image has "
                                          f"{len(found)} detections)" if found else
                                          "a detection index was given, but this image has no detections; "
                                          "give a box instead")
                d = found[t.index]
                out.append(Resolved(d.label, torch.tensor(d.box), d.index, iou=iou))
                continue
            box = torch.tensor(t.box, dtype=torch.float32)
            label, index = t.label, None
            overlap, best = next(matches)
            if overlap > MATCH_IOU:
                label, index = found[best].label, found[best].index
            if label is None:
                raise InvalidArgument("targets", f"no detection overlaps the box {list(t.box)} by more than IoU "
                                      f"{MATCH_IOU}; give its `label` to explain it anyway")
            out.append(Resolved(label, box, index, iou=iou))
        return tuple(out)

    def objective(self, out: object, image: int, target: Resolved) -> Tensor:
        assert isinstance(out, list | tuple)
        assert target.box is not None
        d = out[image]
        boxes: Tensor = d["boxes"]
        scores: Tensor = d["scores"]
        if boxes.shape[0] == 0:
            return scores.new_zeros(()).float()
        # As FasterRCNNBoxScoreTarget: the detection that overlaps the box most counts; the overlap itself
        # is differentiable through the detection's box. Unlike it, only detections of the target's label
        # compete (as in resolve): where the reference lets a better-overlapping box of another class zero
        # the score, this scores the label's own detection. Where the reference scores, both are equal.
        ious = box_iou(target.box.to(boxes.device, torch.float32)[None], _float(boxes))[0]
        same = d["labels"] == target.label
        best = int(torch.where(same, ious.detach(), ious.detach().new_tensor(-1.0)).argmax())
        if not bool(same[best]) or float(ious[best].detach()) <= MATCH_IOU:
            return scores.new_zeros(()).float()
        score = _float(scores[best])
        return score + ious[best] if target.iou else score

    def scores(self, out: object, resolved: Sequence[tuple[Resolved, ...]]) -> Tensor:
        """:meth:`objective` of every image and target at once, equal to it one by one: the boxes of all
        targets are matched against the detections of all images in one IoU matrix, chosen on detached
        values, and only the chosen detections' scores (and overlaps) are differentiated. Per target,
        ``objective`` costs a dozen small ops and a host read, and its ``box_iou`` a dozen more autograd
        nodes in the backward: most of an explanation's time beyond the forward on a small detector."""
        assert isinstance(out, list | tuple)
        t_max = max((len(r) for r in resolved), default=0)
        flat = [(i, t, target) for i, targets in enumerate(resolved) for t, target in enumerate(targets)]
        if not out:
            return torch.zeros((0, t_max))
        scores = torch.cat([_float(d["scores"]) for d in out])
        table = scores.new_zeros((len(out), t_max))
        if not flat or scores.shape[0] == 0:  # no targets, or no detection to score: all zero
            return table
        device = scores.device
        boxes = torch.cat([_float(d["boxes"]) for d in out])  # (M, 4)
        labels = torch.cat([d["labels"] for d in out]).to(device)
        # Which image each detection and target belongs to, the targets' columns and labels: one transfer.
        owner = [i for i, d in enumerate(out) for _ in range(d["boxes"].shape[0])]
        m = len(owner)
        index = torch.tensor([*owner, *(i for i, _, _ in flat), *(t for _, t, _ in flat),
                              *(target.label for _, _, target in flat)], device=device)
        rows, cols, wanted = index[m:].view(3, -1)
        targets = torch.stack([_box(target) for _, _, target in flat]).to(device, torch.float32)  # (S, 4)
        with torch.no_grad():
            overlaps = _iou(targets[:, None], boxes.detach())  # (S, M)
            candidate = (index[:m] == rows[:, None]) & (labels == wanted[:, None])
            ranked = torch.where(candidate, overlaps, -1.0)
            best = ranked.argmax(dim=1, keepdim=True)
            # `not (x <= 0.5)` rather than `x > 0.5`, as in objective: a NaN overlap (two empty boxes) matches.
            found = candidate.gather(1, best)[:, 0] & ~(ranked.gather(1, best)[:, 0] <= MATCH_IOU)
            best = best[:, 0]
        value = scores[best]
        with_iou = [s for s, (_, _, target) in enumerate(flat) if target.iou]
        if len(with_iou) == len(flat):
            value = value + _iou(targets, boxes[best])
        elif with_iou:
            pick = torch.tensor(with_iou, device=device)
            value = value.index_add(0, pick, _iou(targets[pick], boxes[best[pick]]))
        # A lost box scores 0 (its gradient is zero too, as objective's constant zero gives).
        return table.index_put((rows, cols), torch.where(found, value, 0.0))

    def confidences(self, out: object, targets: Sequence[Resolved]) -> Tensor:
        return self.scores(out, [(t,) for t in targets])[:, 0].detach()

    def _zero(self, out: object) -> Tensor:
        assert isinstance(out, list | tuple)
        scores: Tensor = out[0]["scores"]
        return scores.new_zeros(()).float()

    def select(self, out: object, rows: Sequence[int]) -> object:
        assert isinstance(out, list | tuple)
        return [out[r] for r in rows]

    def flip(self, target: Resolved, width: int) -> Resolved:
        # The mirrored box; the detection's index belongs to the unmirrored pass, so it is matched again.
        assert target.box is not None
        x0, y0, x1, y1 = target.box.unbind()
        return replace(target, box=torch.stack([width - x1, y0, width - x0, y1]), detection=None)


def _box(target: Resolved) -> Tensor:
    assert target.box is not None
    return target.box


def _iou(a: Tensor, b: Tensor) -> Tensor:
    """torchvision's ``box_iou`` of boxes ``(..., 4)`` paired by broadcasting, to the bit: ``a`` ``(S, 1, 4)``
    against ``b`` ``(M, 4)`` gives its ``(S, M)`` matrix, ``(S, 4)`` against ``(S, 4)`` its diagonal alone (a
    chosen detection's overlap, differentiated without the other detections' in the graph)."""
    # Few ops rather than box_iou's ~30: on a small detector each costs more than its arithmetic.
    a_lo, a_hi = torch.split(a, 2, dim=-1)
    b_lo, b_hi = torch.split(b, 2, dim=-1)
    inter = (torch.minimum(a_hi, b_hi) - torch.maximum(a_lo, b_lo)).clamp(min=0).prod(dim=-1)
    return inter / ((a_hi - a_lo).prod(dim=-1) + (b_hi - b_lo).prod(dim=-1) - inter)


def _best_overlaps(found: Sequence[Detection], targets: Sequence[TaskTarget]) -> list[tuple[float, int]]:
    """Per box target, its overlap with the detection that overlaps it most and that detection's position in
    ``found``, among the target label's detections (all of them without a label); ``(-1, 0)`` with none.
    With a label only that class's detections compete for the box: a detector proposes the same region once
    per class, and a near-identical box of another class must not take the match."""
    if not found:
        return [(-1.0, 0)] * len(targets)
    if not targets:
        return []
    overlaps = _iou_host(np.array([t.box for t in targets], dtype=np.float32)[:, None],
                         np.array([d.box for d in found], dtype=np.float32))
    allowed = np.array([[t.label is None or d.label == t.label for d in found] for t in targets])
    ranked = np.where(allowed, overlaps, np.float32(-1.0))
    best = ranked.argmax(axis=1)
    return [(float(ranked[i, j]), int(j)) for i, j in enumerate(best)]


def _iou_host(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """:func:`_iou` of float32 arrays on the host, to the bit: resolve matches a summary's boxes, already on the
    host, where a few numpy ops cost microseconds and torch's tens each."""
    with np.errstate(divide="ignore", invalid="ignore"):  # two empty boxes: 0 / 0, NaN as box_iou gives
        inter = (np.minimum(a[..., 2:], b[..., 2:]) - np.maximum(a[..., :2], b[..., :2])).clip(min=0).prod(axis=-1)
        out: np.ndarray = inter / ((a[..., 2:] - a[..., :2]).prod(axis=-1) + (b[..., 2:] - b[..., :2]).prod(axis=-1)
                                   - inter)
    return out


class SegmentationTask(Task):
    """``model(x)`` returns ``(N, K, h, w)`` logits, or a dict whose ``out`` holds them (torchvision)."""

    name = "segmentation"

    def explaining(self) -> AbstractContextManager[None]:
        # Bilinear resizes with a backward that batches over targets, and the last one's input kept, so that
        # scores can be read before it (service.cam.upsampling).
        return matrix_backward()

    def default_layer(self, candidates: Sequence[str]) -> str | None:
        # torchvision's segmenters: the backbone's last map, not the classifier, whose K channels are the
        # logits themselves.
        return _last_under(candidates, "backbone.")

    @staticmethod
    def logits(out: object) -> Tensor:
        if isinstance(out, Mapping):
            out = out["out"]
        assert isinstance(out, Tensor)
        return out

    @classmethod
    def class_map(cls, out: object) -> Tensor:
        """``(N, h, w)`` the class of each pixel: the first of its largest logits."""
        # max's indices, not argmax: argmax along the channels of (N, K, h, w) takes a slow strided path
        # (73 ms against 3 ms for 8 x 6 x 224 x 224 on the 2-core machine); both give the first maximum.
        return cls.logits(out).max(dim=1).indices

    def width(self, out: object) -> int:
        return int(self.logits(out).shape[1])

    def check_output(self, out: object, n: int) -> None:
        t = out.get("out") if isinstance(out, Mapping) else out
        if not (isinstance(t, Tensor) and t.dim() == 4 and t.shape[0] == n):
            raise ValueError("a segmentation model must return (N, classes, h, w) logits, or a dict whose `out` "
                             "holds them (torchvision's convention)")

    def summarize(self, out: object) -> list[Summary]:
        logits = _float(self.logits(out).detach())
        n, k = logits.shape[:2]
        top, masks = logits.max(dim=1)  # masks as class_map gives them
        # A segment's score is its pixels' mean probability of their own class, the largest: softmax's value
        # there is 1 / sum_k exp(l_k - max). Every image's areas and sums come from one bincount each, keyed by
        # image and class, instead of one masked product of the whole image per class present (8 images of
        # 6 x 224 x 224: 9 ms before).
        own = (logits - top[:, None]).exp_().sum(dim=1).reciprocal_()
        keys = (masks + k * torch.arange(n, device=masks.device)[:, None, None]).flatten()
        counts = torch.bincount(keys, minlength=n * k).view(n, k)
        means = (torch.bincount(keys, weights=own.flatten(), minlength=n * k).view(n, k) / counts.clamp(min=1))
        summaries = []
        for i, (areas, scores) in enumerate(zip(counts.tolist(), means.tolist(), strict=True)):
            segments = tuple(Segment(c, area, float(scores[c])) for c, area in enumerate(areas) if area)
            summaries.append(Summary(segments=tuple(sorted(segments, key=lambda s: -s.area)), mask=masks[i]))
        return summaries

    def resolve(self, summary: Summary, targets: Sequence[TaskTarget], top: int, objective: str
                ) -> tuple[Resolved, ...]:
        assert summary.mask is not None
        mask = summary.mask
        k = len(self.labels)
        if not targets:
            shown = [s for s in summary.segments if not self.is_background(s.label)]
            return tuple(Resolved(s.label, region=(mask == s.label).float(), region_kind="predicted")
                         for s in shown[:top])
        out = []
        for t in targets:
            if t.index is None or not 0 <= t.index < k:
                raise InvalidArgument("targets", f"a segmentation target must be a class in 0..{k - 1}, got "
                                      f"{t.index!r}")
            if t.mask is not None:
                region = F.interpolate(t.mask[None, None].float(), size=tuple(mask.shape), mode="nearest")[0, 0]
                out.append(Resolved(t.index, region=region.to(mask.device), region_kind="mask"))
            else:
                out.append(Resolved(t.index, region=(mask == t.index).float(), region_kind="predicted"))
        return tuple(out)

    def objective(self, out: object, image: int, target: Resolved) -> Tensor:
        assert target.region is not None
        return (_float(self.logits(out)[image, target.label]) * target.region).sum()

    def scores(self, out: object, resolved: Sequence[tuple[Resolved, ...]]) -> Tensor:
        """The objectives of every image and target as one gather and one weighted sum, equal to
        :meth:`objective` one by one: a selection per target makes autograd fill and add a zero gradient of
        the whole ``(N, K, h, w)`` logits per target (40 of them for 8 images x 5 targets took 90% of the
        backward, measured with torch.profiler on lraspp at 224).

        Where the logits are a bilinear resize made while explaining (torchvision's segmenters end with one),
        each region is carried back through it (``sum(R * up(X)[c]) == sum(up^T(R) * X[c])``) and the scores are
        read off the resize's input: the same values up to rounding, and a backward that never makes a gradient
        of the full-resolution logits."""
        logits = self.logits(out)
        source = resized_from(logits)
        n, _, h, w = logits.shape
        t_max = max((len(r) for r in resolved), default=0)
        # Padding columns take class 0 over an empty region: they score 0, as the base class's padding does.
        classes = torch.zeros((n, t_max), dtype=torch.long)
        regions = torch.zeros((n, t_max, h, w), dtype=torch.float32, device=logits.device)
        for i, targets in enumerate(resolved):
            for t, target in enumerate(targets):
                assert target.region is not None
                classes[i, t] = target.label
                regions[i, t] = target.region
        if source is not None:
            logits, a_h, a_w = source
            regions = region_weights(regions, a_h, a_w)
            h, w = regions.shape[-2:]
        index = classes.to(logits.device)[:, :, None, None].expand(n, t_max, h, w)
        return (_float(torch.gather(logits, 1, index)) * regions).sum(dim=(-2, -1))

    def _zero(self, out: object) -> Tensor:
        return self.logits(out).new_zeros(()).float()

    def select(self, out: object, rows: Sequence[int]) -> object:
        logits = self.logits(out)
        return logits[torch.tensor(list(rows), dtype=torch.long, device=logits.device)]

    def confidence(self, out: object, image: int, target: Resolved) -> Tensor:
        # The class's mean probability over the region, as a classifier's metrics read a probability: a sum of
        # logits can be negative, and a relative drop of it means nothing.
        assert target.region is not None
        probs = _float(self.logits(out)[image].detach()).softmax(dim=0)[target.label]
        region = target.region.to(probs.device)
        return (probs * region).sum() / region.sum().clamp(min=1)

    def flip(self, target: Resolved, width: int) -> Resolved:
        assert target.region is not None
        return replace(target, region=target.region.flip(-1))


class EmbeddingTask(Task):
    """``model(x)`` returns ``(N, D)`` embeddings; a target is the cosine similarity to a reference."""

    name = "embedding"

    def width(self, out: object) -> int:
        assert isinstance(out, Tensor)
        return int(out.shape[1])

    def check_output(self, out: object, n: int) -> None:
        if not (isinstance(out, Tensor) and out.dim() == 2 and out.shape[0] == n):
            raise ValueError("an embedding model must return (N, D) embeddings")

    def summarize(self, out: object) -> list[Summary]:
        assert isinstance(out, Tensor)
        return [Summary(embedding=e) for e in _float(out.detach())]

    def resolve(self, summary: Summary, targets: Sequence[TaskTarget], top: int, objective: str
                ) -> tuple[Resolved, ...]:
        assert summary.embedding is not None
        dim = summary.embedding.shape[0]
        if not targets:
            raise InvalidArgument("targets", "an embedding model explains a similarity: give a `reference` vector "
                                  f"of {dim} numbers, or another image of the request, as the target")
        out = []
        for t in targets:
            if t.reference is None:
                raise InvalidArgument("targets", "an embedding target must be a `reference` vector or an image of "
                                      "the request")
            if t.reference.shape != (dim,):
                raise InvalidArgument("targets", f"a `reference` must have {dim} numbers (this model's embedding "
                                      f"size), got {t.reference.numel()}")
            ref = _float(t.reference).to(summary.embedding.device)
            norm = ref.norm()
            if not torch.isfinite(norm) or norm == 0:
                raise InvalidArgument("targets", "a `reference` must be finite and not all zero")
            out.append(Resolved(-1, reference=ref / norm))
        return tuple(out)

    def objective(self, out: object, image: int, target: Resolved) -> Tensor:
        assert isinstance(out, Tensor)
        assert target.reference is not None
        e = _float(out[image])
        return F.cosine_similarity(e, target.reference.to(e.device), dim=0)

    def _zero(self, out: object) -> Tensor:
        assert isinstance(out, Tensor)
        return out.new_zeros(()).float()

    def select(self, out: object, rows: Sequence[int]) -> object:
        assert isinstance(out, Tensor)
        return out[torch.tensor(list(rows), dtype=torch.long, device=out.device)]


def get_task(name: str, labels: Sequence[str] = ()) -> Task | None:
    """The task object for ``name``; ``None`` for classification, which the engine serves from its logits."""
    if name == "classification":
        return None
    table: dict[str, type[Task]] = {"detection": DetectionTask, "segmentation": SegmentationTask,
                                    "embedding": EmbeddingTask}
    if name not in table:
        raise ValueError(f"`task` must be one of {', '.join(TASKS)}, got {name!r}")
    return table[name](labels)


def _last_under(candidates: Sequence[str], prefix: str) -> str | None:
    """The last-traced of ``candidates`` (in call order) inside ``prefix``."""
    inside = [c for c in candidates if c.startswith(prefix)]
    return inside[-1] if inside else None


def describe_target(target: Resolved, labels: Sequence[str]) -> dict[str, Any]:
    """A JSON-able description of what a map explains (without tensors larger than a box)."""
    if target.reference is not None:
        return {"kind": "similarity"}
    out: dict[str, Any] = {"label": labels[target.label] if 0 <= target.label < len(labels) else target.label,
                           "index": target.label}
    if target.box is not None:
        out["kind"] = "detection"
        out["detection"] = target.detection
        out["objective"] = "score+iou" if target.iou else "score"
    elif target.region is not None:
        out["kind"] = "segment"
        out["region"] = target.region_kind
    return out
