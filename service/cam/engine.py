"""The hook engine: one forward, one backward that stops at the target layers, many CAM maps.

How the backward is kept short: every parameter has ``requires_grad=False`` and the input does not
require grad, so nothing is recorded until the first target layer's forward hook replaces that
layer's output with a detached leaf that requires grad (and returns a clone of it, so an in-place op
after the layer, like DenseNet's ``F.relu(inplace=True)``, cannot touch the leaf). Gradients come
from ``torch.autograd.grad`` with respect to the captured outputs, so no parameter ``.grad`` is ever
filled, no input gradient is computed, and nothing below the earliest target layer is differentiated.
Full backward hooks are not used: they break on in-place ReLU (pytorch/pytorch#61519).

Methods (``service.cam.methods``) say what they need; the engine provides it. Work beyond the shared
pass (ScoreCAM's masked forwards, AblationCAM's replays, Guided Grad-CAM's input gradient) is held by
an :class:`ExplainJob` and runs one bounded chunk per :meth:`ExplainJob.step`, each under the engine's
lock, so a scheduler can serve the model's other batches between chunks, or cancel.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Generator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from types import TracebackType
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode
from torch.utils.hooks import RemovableHandle

from service.cam.guided import guided_gradients, has_relu_modules
from service.cam.layers import LayerInfo, find_layers, find_runtime_layers, from_nchw, to_nchw
from service.cam.methods import METHODS, CamContext, CamMethod, Cost, LinearHead, get_method
from service.cam.metrics import DEFAULT_STEPS, check_metrics, metric_forwards, metrics_work, scored_metrics_work
from service.cam.replay import linear_head, tail_module
from service.cam.runtime import Runtime
from service.cam.tasks import OBJECTIVES, Resolved, Summary, Task, TaskTarget
from service.errors import InvalidArgument

SMOOTHINGS = ("aug", "eigen")
FUSIONS = ("mean", "max", "product")
# pytorch-grad-cam's aug_smooth: horizontal flip x brightness, undone and averaged.
# Elements of the activations replayed in one chunk (64 MB of float32).
_REPLAY_ELEMENTS = 1 << 24
_AUGMENTATIONS = tuple((flip, gain) for flip in (False, True) for gain in (1.0, 0.9, 1.1))


_BUDGET_HINT = ("ask for fewer images or targets, a layer with fewer channels, fewer metric steps or a gradient "
                "method")


# The forward unit of the extra-forward budget: the multiply-accumulates of one forward of the built-in `shapes`
# classifier at 64 px (counted by torch's FlopCounterMode; a test holds it to that model).
UNIT_MACS = 39_518_528


def forward_units(macs: int) -> float:
    """What one image's forward of a model of ``macs`` multiply-accumulates costs in forward units; an image
    costs at least one unit, and a model whose work could not be counted (an ONNX graph) one per image."""
    return max(1.0, macs / UNIT_MACS)


def check_extra_forwards(images: int, units: float, limit: int) -> None:
    """Refuse a request whose extra forward images (perturbations, metrics), at ``units`` forward units each,
    exceed ``limit`` units: the budget counts work, so a detector's ScoreCAM costs what its forwards cost."""
    cost = math.ceil(images * units - 1e-9)
    if cost > limit:
        each = "" if units == 1 else f" of {units:.1f} forward units each ({cost} units)"
        raise InvalidArgument("method", f"this request needs {images} extra forward images{each}, over the limit "
                              f"of {limit} (SERVICE_MAX_EXTRA_FORWARDS, in forward units: one unit is "
                              f"{UNIT_MACS / 1e6:.1f} M multiply-accumulates, a forward of the built-in shapes "
                              f"model); {_BUDGET_HINT}")


def check_time(forwards: int, forward_s: float, timeout_s: float) -> None:
    """Refuse a request whose ``forwards`` whole-model forward images, at ``forward_s`` each (measured
    at load), would take longer than ``timeout_s``: it could only end in a timeout."""
    if forwards * forward_s > timeout_s:
        raise InvalidArgument("method", f"this request needs {forwards} extra forward images, about "
                              f"{forwards * forward_s:.0f} s at this model's measured {forward_s * 1000:.1f} ms per "
                              f"image, over the request timeout of {timeout_s:g} s (SERVICE_REQUEST_TIMEOUT_S); "
                              f"{_BUDGET_HINT}")


@dataclass(frozen=True)
class CamQuery:
    """What to explain for one image: explicit ``classes`` (or, for other tasks, ``targets``), or else the
    ``top`` highest-scoring ones. ``objective``: how a detection target is scored (``score``, ``score+iou``).

    ``layer``: one layer, several (fused with ``fuse``), or ``None`` for the model's default;
    ``smooth``: ``None``, ``"aug"`` (test-time augmentation) or ``"eigen"`` (principal component of the
    weighted activations)."""

    method: str = "gradcam"
    layer: str | tuple[str, ...] | None = None
    classes: tuple[int, ...] = ()
    top: int = 1
    smooth: str | None = None
    fuse: str = "mean"
    metrics: tuple[str, ...] = ()  # faithfulness metrics of each map (service.cam.metrics.METRICS)
    metric_steps: int = DEFAULT_STEPS
    targets: tuple[TaskTarget, ...] = ()
    objective: str = "score"

    @property
    def layers(self) -> tuple[str | None, ...]:
        if self.layer is None or isinstance(self.layer, str):
            return (self.layer,)
        return self.layer


@dataclass(frozen=True)
class CamMaps:
    """The maps of one image, one per target, at the layer's resolution (the finest one when fused).

    ``maps``: ``(T, h, w)`` float32 in [0, 1], each divided by its own maximum; ``raw_max``: ``(T,)``,
    that maximum before normalisation (0 for an all-zero map, which stays zero). ``layer`` names the
    layers, joined by ``+`` when several were fused.
    """

    classes: tuple[int, ...]
    method: str
    layer: str
    maps: Tensor
    raw_max: Tensor
    metrics: dict[str, Tensor] | None = None  # figure -> (T,), when the query asked for metrics
    metric_steps: int | None = None  # the steps of the deletion/insertion curves, when computed
    resolved: tuple[Resolved, ...] = ()  # for tasks other than classification: what each map explains


@dataclass(frozen=True)
class EngineOutput:
    """``logits``: ``(N, K)`` float32; ``cams[i]`` is ``None`` for an image that was only predicted.
    ``summaries``: per image, what a model of another task than classification predicts (``logits`` is
    then the ``(N, T)`` target scores)."""

    logits: Tensor
    cams: list[CamMaps | None]
    summaries: list[Summary] | None = None


class CamEngine:
    """Owns one model's hooks. Use as a context manager, or call :meth:`close`.

    Calls are serialised by a lock: hooks and captured activations are per-engine state, which is
    why concurrent callers share one engine through a batcher instead of each running their own.
    ``chunk_rows`` bounds the images of one extra forward (ScoreCAM, metrics).
    """

    def __init__(self, model: nn.Module, example: Tensor, layers: LayerInfo | None = None,
                 chunk_rows: int = 32, runtime: Runtime | None = None, task: Task | None = None) -> None:
        """``example``: one input ``(1, 3, H, W)`` on the model's device, used to trace the layers.

        ``runtime``: where the model runs outside autograd (``model`` is then its :class:`RuntimeModule`):
        layer outputs come from it instead of hooks, and only the gradient-free methods are offered.
        ``task``: what the output means when the model is not a classifier (``service.cam.tasks``)."""
        self.runtime = runtime
        self.task = task
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.layers = layers or (find_runtime_layers(runtime, example) if runtime is not None
                                 else find_layers(self.model, example))
        if layers is None:
            self.layers = preferred_layers(self.layers, self.model, task)
        first, macs = self._counted_forward(example)
        # What one image's forward costs, for the extra-forward budget.
        self.forward_units = forward_units(macs // max(1, example.shape[0]))
        # Classes for a classifier; for other tasks the width of what the model returns per image, when fixed.
        self.num_classes = int(first.shape[1]) if task is None else task.width(first)
        self.chunk_rows = chunk_rows
        self._modules = dict(self.model.named_modules())
        self._handles: dict[str, RemovableHandle] = {}
        self._captured: dict[str, Tensor] | None = None  # layer -> output, only during an explain pass
        self._wanted: set[str] = set()  # the layers this pass explains
        self._tails: dict[str, nn.Module | None] = {}
        self._closed_form: dict[str, bool] = {}
        # Widths of the model's linear layers: a layer feeding one may have a closed-form head.
        self._linear_inputs = {m.in_features for m in self._modules.values() if isinstance(m, nn.Linear)}
        self._lock = threading.Lock()
        self._has_relu = has_relu_modules(self.model)
        if self.layers.candidates:
            self.register(self.layers.default)

    def _counted_forward(self, example: Tensor) -> tuple[Any, int]:
        """The model's output on ``example`` and the multiply-accumulates it took (0 where they cannot be
        counted: a runtime's graph runs outside torch's dispatcher, and a model that trips the counter is
        run again without it)."""
        with torch.inference_mode():
            try:
                with FlopCounterMode(display=False) as counter:
                    out = self._forward(example)
                return out, int(counter.get_total_flops()) // 2
            except Exception:
                # Also a model whose output is wrong: the plain forward raises that again, uncounted.
                return self._forward(example), 0

    # -- lifecycle -------------------------------------------------------------------------------
    def register(self, layer: str) -> None:
        """Put the capture hook on ``layer`` once; it stays until :meth:`close`."""
        if layer in self._handles or self.runtime is not None:
            return
        self._handles[layer] = self._modules[layer].register_forward_hook(self._make_hook(layer))

    @property
    def hooked_layers(self) -> tuple[str, ...]:
        """The layers that carry a capture hook."""
        return tuple(self._handles)

    def close(self) -> None:
        handles, self._handles = self._handles, {}
        for h in handles.values():
            h.remove()

    def __enter__(self) -> CamEngine:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _make_hook(self, layer: str) -> Callable[[nn.Module, object, object], object]:
        def hook(module: nn.Module, args: object, out: object) -> object:
            # Hooks stay on every layer ever asked for; only this pass's layers capture, so the
            # backward still stops at the layers this batch wants.
            if self._captured is None or layer not in self._wanted:
                return None
            if not isinstance(out, Tensor):
                raise InvalidArgument("layer", f"layer {layer!r} does not return a single tensor")
            if layer in self._captured:
                # A head shared by the levels of a feature pyramid runs once per level: keeping the last
                # call would explain one level and call it the layer.
                raise InvalidArgument("layer", f"layer {layer!r} runs more than once in one forward pass (a "
                                      "module shared across feature-pyramid levels?); choose a layer that runs "
                                      "once")
            # An output already in the graph means an earlier target layer started it; keep the
            # link so that layer's gradient still flows through this one.
            src = out if out.requires_grad else out.detach().requires_grad_(True)
            self._captured[layer] = src
            return src.clone()

        return hook

    # -- validation and cost ---------------------------------------------------------------------
    def supports(self, method: CamMethod) -> bool:
        """Whether this model can run ``method``: a runtime gives no gradients. Every method serves every
        task: extra passes are re-scored by the task (:meth:`Task.rescore`)."""
        return self.runtime is None or not (method.needs.gradients or method.needs.input_gradients)

    @property
    def methods(self) -> list[str]:
        """The methods this model can run, when it has layers to explain."""
        if not self.layers.candidates:
            return []
        return [name for name, m in METHODS.items() if self.supports(m)]

    def check(self, query: CamQuery) -> CamQuery:
        """Validate ``query`` against this model and return it with its layers resolved."""
        method = get_method(query.method)
        if not self.supports(method):
            raise InvalidArgument("method", f"`method` {method.name!r} needs gradients, which this model's runtime "
                                  f"does not give; use one of {', '.join(self.methods)}")
        if self.task is not None and query.classes:
            raise InvalidArgument("targets", f"a {self.task.name} model's targets are not class indices alone")
        if query.objective not in OBJECTIVES:
            raise InvalidArgument("objective", f"`objective` must be one of {', '.join(OBJECTIVES)}, got "
                                  f"{query.objective!r}")
        if query.smooth is not None and query.smooth not in SMOOTHINGS:
            raise InvalidArgument("smooth", f"`smooth` must be one of {', '.join(SMOOTHINGS)}, got {query.smooth!r}")
        if query.fuse not in FUSIONS:
            raise InvalidArgument("fuse", f"`fuse` must be one of {', '.join(FUSIONS)}, got {query.fuse!r}")
        layers = tuple(dict.fromkeys(self.layers.resolve(name) for name in query.layers))
        if not layers:
            raise InvalidArgument("layer", "`layer` must name at least one layer")
        metrics = check_metrics(query.metrics, query.metric_steps) if query.metrics else ()
        if method.needs.input_gradients and not self._has_relu:
            raise InvalidArgument("method", f"`method` {method.name!r} needs the model's ReLUs to be modules "
                                  "(nn.ReLU); this model applies them as functions, so guided backpropagation "
                                  "cannot reach them")
        return replace(query, layer=layers[0] if len(layers) == 1 else layers, metrics=metrics)

    def deferred(self, query: CamQuery) -> bool:
        """Whether ``query`` has work beyond the shared pass (run in chunks by :class:`ExplainJob`)."""
        return get_method(query.method).needs.deferred or bool(query.metrics)

    def extra_forwards(self, query: CamQuery, whole_only: bool = False) -> int:
        """Extra forward (or replay) images one image of ``query`` costs beyond the shared pass. With
        ``whole_only``, only forwards of the whole model count (ScoreCAM's masked inputs, metrics):
        a replay runs just the layers after the target, a fraction of that, so it is left out of
        time estimates rather than overpriced."""
        method = get_method(query.method)
        variants = len(_AUGMENTATIONS) if query.smooth == "aug" else 1
        total = 0
        for name in query.layers:
            layer = self.layers.resolve(name)
            if whole_only and not (method.cost is Cost.FORWARDS or (method.cost is Cost.REPLAY
                                                                   and self._replays_whole(layer))):
                continue
            channels = self.layers.channels.get(layer, 0)
            closed = self._closed_form.get(layer)
            if closed is None:  # not run yet: a linear layer of this width makes a closed form possible
                closed = self.task is None and channels in self._linear_inputs
            total += method.extra_forwards(channels, closed)
        if method.needs.input_gradients:
            total += 1
        targets = max(len(query.classes), len(query.targets), query.top)
        return total * variants + targets * metric_forwards(query.metrics, query.metric_steps)

    def _replays_whole(self, layer: str) -> bool:
        """Whether a replay at ``layer`` runs the whole model: another task's model without a traced tail (a
        detector's is never traceable). Tracing is not started here, on the request path: until the first
        replay an untraced layer of such a model counts whole, which may refuse a request a tail could serve."""
        return self.task is not None and self.runtime is None and self._tails.get(layer) is None

    # -- compute ---------------------------------------------------------------------------------
    def _forward(self, x: Tensor) -> Any:
        out = self.model(x)
        if self.task is not None:
            self.task.check_output(out, x.shape[0])
            return out
        if not isinstance(out, Tensor) or out.dim() != 2:
            raise ValueError("the model must return logits of shape (N, num_classes)")
        return out

    def predict(self, x: Tensor) -> Any:
        """``x``: ``(N, 3, H, W)`` -> logits ``(N, K)`` float32, under inference mode; for a task other than
        classification, the model's own output."""
        with self._lock, torch.inference_mode():
            out = self._forward(x)
            return out if self.task is not None else out.float()

    def explain(self, x: Tensor, queries: Sequence[CamQuery | None]) -> EngineOutput:
        """One forward for the whole batch, one backward for all targets of all images, then any extra work.

        ``x``: ``(N, 3, H, W)``; ``queries[i]`` says what to explain for image ``i`` (``None``:
        predict only). Images may differ in method, layer and targets.
        """
        job = self.begin(x, queries)
        while job.step():
            pass
        return job.result()

    def begin(self, x: Tensor, queries: Sequence[CamQuery | None]) -> ExplainJob:
        """Run the shared pass and every method that needs nothing more; the rest waits in the job."""
        if len(queries) != x.shape[0]:
            raise ValueError(f"{len(queries)} queries for {x.shape[0]} images")
        if all(q is None for q in queries):
            out = self.predict(x)
            if self.task is None:
                return ExplainJob(self, out, [None] * len(queries))
            return ExplainJob(self, torch.zeros(len(queries), 0, device=x.device), [None] * len(queries),
                              summaries=self.task.summarize(out))
        checked = [None if q is None else self.check(q) for q in queries]
        rows = _expand(x, checked)
        summaries: list[Summary] | None = None
        resolved: list[tuple[Resolved, ...]] = []
        with self._lock:
            with nullcontext() if self.task is None else self.task.explaining():
                raw, captured = self._capture(rows.x, rows.layers)
            if self.task is None:
                logits = raw
                targets = self._targets(logits.detach(), rows)
            else:
                # The task's targets become the columns of a score matrix: the rest is the classifier's path.
                summaries = self.task.summarize(raw)
                resolved = self._resolve(summaries, rows)
                summaries = [summaries[r] for r in rows.identity]
                logits = self.task.scores(raw, resolved)
                targets = [tuple(range(len(r))) for r in resolved]
                for r, found in enumerate(resolved):
                    if not found:  # nothing to explain in this image (no detection): it is only predicted
                        rows.queries[r] = None
                        rows.layers[r] = ()
            grad_layers = sorted({layer for r, q in enumerate(rows.queries) if q is not None
                                  and get_method(q.method).needs.gradients for layer in rows.layers[r]})
            grads = _gradients(logits, [captured[n] for n in grad_layers], targets)
            grad_of = dict(zip(grad_layers, grads, strict=True))
            precision = compute_dtype(rows.x.device, logits.dtype)
            logits = logits.detach().float()
            job = ExplainJob(self, logits[rows.identity], [None] * len(queries), rows, targets, summaries=summaries,
                             resolved=resolved, asked=checked)
            if self.task is not None:
                for image, r in enumerate(rows.identity):
                    q = rows.queries[r]
                    if q is not None and q.metrics:  # what the metrics' curves start from, off the shared pass
                        with torch.no_grad():
                            job.confidence[image] = self.task.confidences(self.task.select(raw, [r] * len(
                                resolved[r])), resolved[r])
            groups: dict[tuple[str, str, str | None], list[int]] = {}
            for r, q in enumerate(rows.queries):
                if q is not None:
                    for layer in rows.layers[r]:
                        groups.setdefault((layer, q.method, q.smooth), []).append(r)
            # One vectorised pass per (layer, method): a per-image loop would be hundreds of tiny ops.
            for (layer, name, smooth), idx in groups.items():
                method = get_method(name)
                t_max = max(len(targets[r]) for r in idx)
                ctx = self._context(method, layer, smooth, idx, t_max, rows.x, logits, captured[layer],
                                    grad_of.get(layer), targets, precision, resolved)
                work = method.run(ctx)
                if method.needs.deferred:
                    job.pending.append(_Pending(layer, idx, work))
                else:
                    job.finish_group(layer, idx, _drain(work))
        job.finish_if_done()
        return job

    def _resolve(self, summaries: list[Summary], rows: _Rows) -> list[tuple[Resolved, ...]]:
        """Each row's targets: resolved on an image's own row, the same ones mirrored on its flipped copies
        (``smooth="aug"``), where they are matched again like any extra pass's."""
        assert self.task is not None
        resolved: list[tuple[Resolved, ...]] = []
        width = rows.x.shape[-1]
        for r, q in enumerate(rows.queries):
            source = rows.source_row[r]
            if q is None:
                resolved.append(())
            elif source == r:
                resolved.append(self.task.resolve(summaries[r], q.targets, q.top, q.objective))
            elif rows.flipped[r]:
                resolved.append(tuple(self.task.flip(t, width) for t in resolved[source]))
            else:
                resolved.append(resolved[source])
        return resolved

    def _capture(self, x: Tensor, layers: list[tuple[str, ...]]) -> tuple[Any, dict[str, Tensor]]:
        self._wanted = {name for names in layers for name in names}
        for name in self._wanted:
            self.register(name)
        if self.runtime is not None:
            names = sorted(self._wanted)
            logits, outs = self.runtime.run(x, names)
            return logits, dict(zip(names, outs, strict=True))
        self._captured = {}
        try:
            with torch.enable_grad():
                logits = self._forward(x)
            missing = self._wanted - set(self._captured)
            if missing:
                raise InvalidArgument("layer", f"layer {sorted(missing)[0]!r} did not run in the forward pass")
            return logits, dict(self._captured)
        finally:
            self._captured = None

    def _context(self, method: CamMethod, layer: str, smooth: str | None, idx: list[int], t_max: int, x: Tensor,
                 logits: Tensor, captured: Tensor, grads: Tensor | None, targets: list[tuple[int, ...]],
                 precision: torch.dtype = torch.float32, resolved: list[tuple[Resolved, ...]] | None = None
                 ) -> CamContext:
        layout = self.layers.layout(layer)
        act = _take(to_nchw(captured.detach(), layout), idx, 0).float()
        g = None
        if grads is not None and method.needs.gradients:
            g = _take(to_nchw(grads[:t_max], layout), idx, 1).float()
        target_rows = [[targets[r][min(t, len(targets[r]) - 1)] for r in idx] for t in range(t_max)]
        head: LinearHead | None = None
        replay_rows = self.chunk_rows
        if method.needs.replay:
            if from_nchw(act, layout) is None:
                raise InvalidArgument("method", f"`method` {method.name!r} needs a layer with a (N, C, H, W) or "
                                      f"(N, H, W, C) output; {layer!r} returns tokens")
            # Another task's score matrix is not logits: no linear layer can be its head.
            head = linear_head(self.model, act, logits[idx], precision) if self.runtime is None and self.task is None \
                else None
            self._closed_form[layer] = head is not None
            if head is None and self._tail(layer) is not None:
                # A tail replay costs one activation per row, far less than an input image's forward.
                replay_rows = max(self.chunk_rows, _REPLAY_ELEMENTS // max(1, act[0].numel()))
        x_rows = x[idx].detach()
        target_t = torch.tensor(target_rows, device=act.device, dtype=torch.long)  # (T, n)

        def replay(a: Tensor, rows: Tensor) -> Any:
            return self._replay(layer, a, x_rows[rows])

        task = self.task
        if task is None:
            def rescore(out: Any, images: Tensor, rows: Tensor | None) -> Tensor:
                logits: Tensor = out.float() if rows is None else out.float()[rows]
                return logits.gather(1, target_t[:, images].T)

            def score(out: Any) -> Tensor:
                out_t: Tensor = out
                return out_t.gather(1, target_t.T)
        else:
            assert resolved is not None
            # Every image's targets padded to the group's rows as the target rows are: its last one repeated.
            group = [(*resolved[r], *[resolved[r][-1]] * (t_max - len(resolved[r]))) for r in idx]

            def rescore(out: Any, images: Tensor, rows: Tensor | None) -> Tensor:
                picked = images.tolist()
                at = range(len(picked)) if rows is None else rows.tolist()
                return task.rescore(out, at, [group[i] for i in picked])

            def score(out: Any) -> Tensor:
                return task.scores(out, group)

        return CamContext(
            activations=act, gradients=g, targets=target_t,
            logits=logits[idx], inputs=x_rows, forward=self._extra_forward,
            replay=replay, rescore=rescore,
            head=head, chunk_rows=self.chunk_rows, replay_rows=replay_rows,
            smooth="eigen" if smooth == "eigen" else None,
            guided=lambda: guided_gradients(self.model, x_rows, score, t_max,
                                            nullcontext() if task is None else task.explaining()),
        )

    def _extra_forward(self, x: Tensor) -> Any:
        """The model's output on ``x`` without gradients: a classifier's logits in float32."""
        with torch.inference_mode():
            out = self._forward(x)
            return out.float() if self.task is None else out

    def _tail(self, layer: str) -> nn.Module | None:
        if layer not in self._tails:
            self._tails[layer] = tail_module(self.model, layer) if self.runtime is None else None
        return self._tails[layer]

    def _replay(self, layer: str, activations: Tensor, inputs: Tensor) -> Any:
        """The output (a classifier's logits, float32) with ``layer``'s output replaced by ``activations``
        ``(B, C, h, w)``; ``inputs`` ``(B, 3, H, W)`` are the images the rows came from, used only where the tail
        cannot be cut from the model."""
        tail = self._tail(layer)
        native = from_nchw(activations, self.layers.layout(layer))
        assert native is not None  # _context refuses layouts that cannot be replayed
        if self.runtime is not None:
            out = self.runtime.replay(layer, native)
            if out is None:
                raise InvalidArgument("method", f"layer {layer!r} cannot be replayed on its own: the layers after it "
                                      "read earlier values too; choose a later layer or another method")
            return out.float()
        # In float32 whatever the model's precision: zeroing one channel of hundreds moves a logit by less than
        # bf16 resolves (resnet18's layer4.1.conv2 in bf16: r = 0.989 against float32; in float32: 1.000).
        with torch.inference_mode(), torch.autocast(activations.device.type, enabled=False):
            if tail is not None:
                out = tail(native)
                if self.task is None and isinstance(out, Tensor):
                    return out.float()
                if self.task is not None and self._is_output(out, native.shape[0]):
                    return out
            handle = self._modules[layer].register_forward_hook(lambda m, a, o: native.to(o.dtype))
            try:
                whole = self._forward(inputs)
                return whole.float() if self.task is None else whole
            finally:
                handle.remove()

    def _is_output(self, out: object, n: int) -> bool:
        assert self.task is not None
        try:
            self.task.check_output(out, n)
        except ValueError:
            return False
        return True

    def _targets(self, logits: Tensor, rows: _Rows) -> list[tuple[int, ...]]:
        k = logits.shape[1]
        out: list[tuple[int, ...]] = []
        queries = rows.queries
        tops = max((q.top for q in queries if q is not None and not q.classes), default=0)
        # Augmented copies explain the classes of the unaugmented image.
        ranked = logits[rows.source_row].topk(min(tops, k), dim=1).indices.tolist() if tops else []
        for i, q in enumerate(queries):
            if q is None:
                out.append(())
            elif q.classes:
                for c in q.classes:
                    if not 0 <= c < k:
                        raise InvalidArgument("targets", f"target class must be in 0..{k - 1}, got {c}")
                out.append(tuple(q.classes))
            else:
                if not 1 <= q.top <= k:
                    raise InvalidArgument("top", f"number of targets must be in 1..{k}, got {q.top}")
                out.append(tuple(ranked[i][: q.top]))
        return out


@dataclass
class _Rows:
    """The batch as the pass sees it: images with ``smooth="aug"`` become one row per augmentation."""

    x: Tensor
    queries: list[CamQuery | None]
    layers: list[tuple[str, ...]]
    image: list[int]  # row -> image
    flipped: list[bool]
    source_row: list[int]  # row -> the unaugmented row of its image
    identity: list[int]  # image -> its unaugmented row


def _expand(x: Tensor, queries: list[CamQuery | None]) -> _Rows:
    picks: list[int] = []
    flips: list[bool] = []
    gains: list[float] = []
    rows = _Rows(x, [], [], [], [], [], [])
    for i, q in enumerate(queries):
        variants = _AUGMENTATIONS if q is not None and q.smooth == "aug" else ((False, 1.0),)
        rows.identity.append(len(picks))
        for flip, gain in variants:
            rows.source_row.append(rows.identity[-1])
            picks.append(i)
            flips.append(flip)
            gains.append(gain)
            rows.queries.append(q)
            rows.layers.append(tuple(name for name in q.layers if name is not None) if q is not None else ())
            rows.image.append(i)
            rows.flipped.append(flip)
    if len(picks) != len(queries):
        expanded = x[picks]
        flip_mask = torch.tensor(flips, device=x.device)[:, None, None, None]
        expanded = torch.where(flip_mask, expanded.flip(-1), expanded)
        rows.x = expanded * torch.tensor(gains, device=x.device, dtype=x.dtype)[:, None, None, None]
    return rows


@dataclass
class _Pending:
    layer: str
    rows: list[int]  # for maps; for metrics, [image]
    work: Generator[None, None, Tensor] | Generator[None, None, dict[str, Tensor]]
    metrics: bool = False


@dataclass
class ExplainJob:
    """A batch whose shared pass has run; :meth:`step` runs the remaining work one chunk at a time."""

    engine: CamEngine
    logits: Tensor
    cams: list[CamMaps | None]
    rows: _Rows | None = None
    targets: list[tuple[int, ...]] = field(default_factory=list)
    summaries: list[Summary] | None = None
    resolved: list[tuple[Resolved, ...]] = field(default_factory=list)
    asked: list[CamQuery | None] = field(default_factory=list)  # per image, the checked query
    pending: list[_Pending] = field(default_factory=list)
    _row_maps: dict[tuple[int, str], tuple[Tensor, Tensor]] = field(default_factory=dict)
    _maps_done: bool = False
    _steps: dict[int, int] = field(default_factory=dict)
    _cancelled: bool = False
    # For another task than classification: per image with metrics, its targets' confidences (T,) in the shared pass.
    confidence: dict[int, Tensor] = field(default_factory=dict)

    @property
    def done(self) -> bool:
        return not self.pending

    def step(self) -> bool:
        """Run one chunk of the remaining work; ``True`` while more remains."""
        if not self.pending:
            return False
        current = self.pending[0]
        with self.engine._lock:
            try:
                next(current.work)
            except StopIteration as stop:
                self.pending.pop(0)
                if current.metrics:
                    cam = self.cams[current.rows[0]]
                    assert cam is not None
                    steps = self._steps.get(current.rows[0])
                    self.cams[current.rows[0]] = replace(cam, metrics=stop.value, metric_steps=steps)
                else:
                    self.finish_group(current.layer, current.rows, stop.value)
        self.finish_if_done()
        return bool(self.pending)

    def cancel(self) -> None:
        """Drop the remaining chunks; :meth:`result` then raises."""
        for p in self.pending:
            p.work.close()
        self.pending.clear()
        self._cancelled = True

    def result(self) -> EngineOutput:
        if self._cancelled:
            raise RuntimeError("the explanation was cancelled")
        if self.pending:
            raise RuntimeError("the explanation has chunks left to run")
        return EngineOutput(self.logits, self.cams, self.summaries)

    def finish_group(self, layer: str, rows: list[int], maps: Tensor) -> None:
        """``maps``: ``(T, n, h, w)`` before ReLU for ``rows``."""
        normed, peaks = normalize_by_peak(maps.clamp(min=0))
        assert self.rows is not None
        for j, r in enumerate(rows):
            t = len(self.targets[r])
            m = normed[:t, j]
            self._row_maps[(r, layer)] = (m.flip(-1) if self.rows.flipped[r] else m, peaks[:t, j])

    def finish_if_done(self) -> None:
        if self.pending or self.rows is None or self._maps_done:
            return
        self._maps_done = True
        rows = self.rows
        for image, first in enumerate(rows.identity):
            q = rows.queries[first]
            if q is None:
                asked = self.asked[image] if self.asked else None
                if asked is not None:  # a task image with nothing to explain (no detection): no maps
                    self.cams[image] = CamMaps((), asked.method, "+".join(n for n in asked.layers if n),
                                               torch.zeros(0, 1, 1), torch.zeros(0))
                continue
            members = [r for r in range(len(rows.image)) if rows.image[r] == image]
            per_layer = []
            for layer in rows.layers[first]:
                if len(members) == 1:
                    per_layer.append(self._row_maps[(first, layer)])
                else:  # augmentations: average the unflipped, normalised maps
                    stacked = torch.stack([self._row_maps[(r, layer)][0] for r in members])
                    per_layer.append(normalize_by_peak(stacked.mean(dim=0)))
            maps, peaks = per_layer[0] if len(per_layer) == 1 else _fuse([m for m, _ in per_layer], q.fuse)
            resolved = self.resolved[first] if self.resolved else ()
            self.cams[image] = CamMaps(self.targets[first], q.method, "+".join(rows.layers[first]), maps, peaks,
                                       resolved=resolved)
            if q.metrics:
                self.pending.append(self._metrics(image, first, maps, q))
        self._row_maps.clear()

    def _metrics(self, image: int, row: int, maps: Tensor, q: CamQuery) -> _Pending:
        """The faithfulness metrics of one image's maps, as more chunks of this job."""
        assert self.rows is not None
        classes = torch.tensor(self.targets[row], device=maps.device, dtype=torch.long)
        x = self.rows.x[row : row + 1].expand(len(classes), *self.rows.x.shape[1:])
        if {"deletion", "insertion"} & set(q.metrics):
            self._steps[image] = q.metric_steps
        task = self.engine.task
        if task is None:
            base = self.logits[image].softmax(dim=0)[classes]
            work = metrics_work(self.engine._extra_forward, x, maps, classes, q.metrics, steps=q.metric_steps,
                                base=base, chunk_rows=self.engine.chunk_rows)
        else:
            # The task's own objective, re-scored on each perturbed copy (row i of x explains target i).
            targets = self.resolved[row]
            forward = self.engine._extra_forward

            def score(xb: Tensor, which: Tensor) -> Tensor:
                return task.confidences(forward(xb), [targets[i] for i in which.tolist()])

            work = scored_metrics_work(score, x, maps, q.metrics, steps=q.metric_steps, base=self.confidence[image],
                                       chunk_rows=self.engine.chunk_rows)
        return _Pending("", [image], work, metrics=True)


def preferred_layers(layers: LayerInfo, model: nn.Module, task: Task | None) -> LayerInfo:
    """``layers`` with the default the model declares (``camserve_default_layer``) or its task prefers."""
    if not layers.candidates:
        return layers
    ordered = [*layers.candidates[1:], layers.candidates[0]]  # call order: the tracer's default is the last map
    own = getattr(model, "camserve_default_layer", None)
    preferred = own if own in ordered else (task.default_layer(ordered) if task is not None else None)
    return layers.with_default(preferred) if preferred is not None else layers


def compute_dtype(device: torch.device, output: torch.dtype) -> torch.dtype:
    """The dtype the model computes in on ``device``: autocast's when it is on, else that of its ``output``."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return output


def _take(t: Tensor, idx: list[int], dim: int) -> Tensor:
    """Rows ``idx`` of ``t`` along ``dim``: ``t`` itself when they are all of its rows in order, the usual
    case of one group per batch (the gradients of 8 images x 5 targets at lraspp's layer are a 30 MB copy)."""
    if idx == list(range(t.shape[dim])):
        return t
    return t.index_select(dim, torch.tensor(idx, device=t.device))


def _drain(work: Generator[None, None, Tensor]) -> Tensor:
    while True:
        try:
            next(work)
        except StopIteration as stop:
            value: Tensor = stop.value
            return value


def _fuse(maps: list[Tensor], how: str) -> tuple[Tensor, Tensor]:
    """Normalised ``(T, h_i, w_i)`` maps of several layers -> one map on the finest grid, normalised."""
    size = max((m.shape[-2:] for m in maps), key=lambda s: s[0] * s[1])
    resized = torch.stack([F.interpolate(m[None], size=tuple(size), mode="bilinear", align_corners=False)[0]
                           for m in maps])
    if how == "max":
        fused = resized.amax(dim=0)
    elif how == "product":
        fused = resized.prod(dim=0)
    else:
        fused = resized.mean(dim=0)
    return normalize_by_peak(fused.clamp(min=0))


def normalize_by_peak(maps: Tensor) -> tuple[Tensor, Tensor]:
    """``(..., h, w)`` non-negative maps -> (each divided by its own maximum, those maxima ``(...)``).

    An all-zero map stays zero rather than being stretched."""
    peak = maps.amax(dim=(-2, -1))
    return maps / torch.where(peak > 0, peak, torch.ones_like(peak))[..., None, None], peak


def _gradients(logits: Tensor, wrt: list[Tensor], targets: list[tuple[int, ...]]) -> list[Tensor]:
    """Gradients of each image's target logits w.r.t. the captured outputs: ``(T_max, N, ...)`` each.

    All targets go in one batched backward (``is_grads_batched``): row ``t`` of the grad outputs
    selects image ``i``'s ``t``-th target, so ``k`` targets cost one pass, not ``k``.
    """
    if not wrt:
        return []
    t_max = max(len(t) for t in targets)
    onehot = torch.zeros((t_max, *logits.shape), dtype=logits.dtype, device=logits.device)
    for i, classes in enumerate(targets):
        for t, c in enumerate(classes):
            onehot[t, i, c] = 1
    # Zeros where no target reaches a layer: a detector's sparse backward leaves untouched branches undefined.
    if t_max == 1:
        return [g[None] for g in torch.autograd.grad(logits, wrt, grad_outputs=onehot[0], materialize_grads=True)]
    return list(torch.autograd.grad(logits, wrt, grad_outputs=onehot, is_grads_batched=True, materialize_grads=True))
