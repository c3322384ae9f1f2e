"""The hook engine: one forward, one backward that stops at the target layers, many CAM maps.

How the backward is kept short: every parameter has ``requires_grad=False`` and the input does not
require grad, so nothing is recorded until the first target layer's forward hook replaces that
layer's output with a detached leaf that requires grad (and returns a clone of it, so an in-place op
after the layer, like DenseNet's ``F.relu(inplace=True)``, cannot touch the leaf). Gradients come
from ``torch.autograd.grad`` with respect to the captured outputs, so no parameter ``.grad`` is ever
filled, no input gradient is computed, and nothing below the earliest target layer is differentiated.
Full backward hooks are not used: they break on in-place ReLU (pytorch/pytorch#61519).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from service.cam.layers import LayerInfo, as_spatial, find_layers
from service.cam.methods import get_method
from service.errors import InvalidArgument


@dataclass(frozen=True)
class CamQuery:
    """What to explain for one image: explicit ``classes``, or else the ``top`` highest-scoring ones."""

    method: str = "gradcam"
    layer: str | None = None
    classes: tuple[int, ...] = ()
    top: int = 1


@dataclass(frozen=True)
class CamMaps:
    """The maps of one image, one per target, at the layer's resolution.

    ``maps``: ``(T, h, w)`` float32 in [0, 1], each divided by its own maximum; ``raw_max``: ``(T,)``,
    that maximum before normalisation (0 for an all-zero map, which stays zero).
    """

    classes: tuple[int, ...]
    method: str
    layer: str
    maps: Tensor
    raw_max: Tensor


@dataclass(frozen=True)
class EngineOutput:
    """``logits``: ``(N, K)`` float32; ``cams[i]`` is ``None`` for an image that was only predicted."""

    logits: Tensor
    cams: list[CamMaps | None]


class CamEngine:
    """Owns one model's hooks. Use as a context manager, or call :meth:`close`.

    Calls are serialised by a lock: hooks and captured activations are per-engine state, which is
    why concurrent callers share one engine through a batcher instead of each running their own.
    """

    def __init__(self, model: nn.Module, example: Tensor, layers: LayerInfo | None = None) -> None:
        """``example``: one input ``(1, 3, H, W)`` on the model's device, used to trace the layers."""
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.layers = layers or find_layers(self.model, example)
        self.num_classes = int(self._forward(example).shape[1])
        self._modules = dict(self.model.named_modules())
        self._handles: dict[str, RemovableHandle] = {}
        self._captured: dict[str, Tensor] | None = None  # layer -> output, only during an explain pass
        self._wanted: set[str] = set()  # the layers this pass explains
        self._lock = threading.Lock()
        if self.layers.candidates:
            self.register(self.layers.default)

    # -- lifecycle -------------------------------------------------------------------------------
    def register(self, layer: str) -> None:
        """Put the capture hook on ``layer`` once; it stays until :meth:`close`."""
        if layer in self._handles:
            return
        self._handles[layer] = self._modules[layer].register_forward_hook(self._make_hook(layer))

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
            # An output already in the graph means an earlier target layer started it; keep the
            # link so that layer's gradient still flows through this one.
            src = out if out.requires_grad else out.detach().requires_grad_(True)
            self._captured[layer] = src
            return src.clone()

        return hook

    # -- compute ---------------------------------------------------------------------------------
    def _forward(self, x: Tensor) -> Tensor:
        out = self.model(x)
        if not isinstance(out, Tensor) or out.dim() != 2:
            raise ValueError("the model must return logits of shape (N, num_classes)")
        return out

    def predict(self, x: Tensor) -> Tensor:
        """``x``: ``(N, 3, H, W)`` -> logits ``(N, K)`` float32, under inference mode."""
        with self._lock, torch.inference_mode():
            return self._forward(x).float()

    def explain(self, x: Tensor, queries: Sequence[CamQuery | None]) -> EngineOutput:
        """One forward for the whole batch, one backward for all targets of all images.

        ``x``: ``(N, 3, H, W)``; ``queries[i]`` says what to explain for image ``i`` (``None``:
        predict only). Images may differ in method, layer and targets.
        """
        if len(queries) != x.shape[0]:
            raise ValueError(f"{len(queries)} queries for {x.shape[0]} images")
        if all(q is None for q in queries):
            return EngineOutput(self.predict(x), [None] * len(queries))
        layers = {i: self.layers.resolve(q.layer) for i, q in enumerate(queries) if q is not None}
        methods = {i: get_method(q.method) for i, q in enumerate(queries) if q is not None}
        with self._lock:
            self._wanted = set(layers.values())
            for name in self._wanted:
                self.register(name)
            self._captured = {}
            try:
                with torch.enable_grad():
                    logits = self._forward(x)
                missing = set(layers.values()) - set(self._captured)
                if missing:
                    raise InvalidArgument("layer", f"layer {sorted(missing)[0]!r} did not run in the forward pass")
                captured = {name: self._captured[name] for name in set(layers.values())}
            finally:
                self._captured = None
            targets = self._targets(logits.detach(), queries)
            need_grad = sorted({layers[i] for i in methods if methods[i].needs_gradients})
            grads = _gradients(logits, [captured[n] for n in need_grad], targets)
            grad_of = dict(zip(need_grad, grads, strict=True))
            cams: list[CamMaps | None] = [None] * len(queries)
            groups: dict[tuple[str, str], list[int]] = {}
            for i, q in enumerate(queries):
                if q is not None:
                    groups.setdefault((layers[i], q.method), []).append(i)
            # One vectorised pass per (layer, method): a per-image loop would be hundreds of tiny ops.
            for (layer, method), idx in groups.items():
                maps, peaks = _normalized_maps(methods[idx[0]].saliency, captured[layer], grad_of.get(layer), idx,
                                               max(len(targets[i]) for i in idx))
                for j, i in enumerate(idx):
                    t = len(targets[i])
                    cams[i] = CamMaps(targets[i], method, layer, maps[:t, j], peaks[:t, j])
            return EngineOutput(logits.detach().float(), cams)

    def _targets(self, logits: Tensor, queries: Sequence[CamQuery | None]) -> list[tuple[int, ...]]:
        k = logits.shape[1]
        out: list[tuple[int, ...]] = []
        tops = max((q.top for q in queries if q is not None and not q.classes), default=0)
        ranked = logits.topk(min(tops, k), dim=1).indices.tolist() if tops else []
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


def _normalized_maps(saliency: Callable[[Tensor, Tensor | None], Tensor], captured: Tensor, grads: Tensor | None,
                     idx: list[int], t_max: int) -> tuple[Tensor, Tensor]:
    """Maps ``(T, n, h, w)`` in [0, 1] and their peaks ``(T, n)`` for images ``idx`` and ``t_max`` targets."""
    act = as_spatial(captured[idx].detach()).float()  # (n, C, h, w)
    n, c, h, w = act.shape
    if grads is None:  # gradient-free: one map per image, the same for every target
        sal = saliency(act, None)[None].expand(t_max, n, h, w)
    else:
        g = as_spatial(grads[:t_max, idx].float().flatten(0, 1))  # (T * n, C, h, w)
        sal = saliency(act.expand(t_max, n, c, h, w).reshape(t_max * n, c, h, w), g).view(t_max, n, h, w)
    return normalize_by_peak(sal.clamp(min=0))


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
    if t_max == 1:
        return [g[None] for g in torch.autograd.grad(logits, wrt, grad_outputs=onehot[0])]
    return list(torch.autograd.grad(logits, wrt, grad_outputs=onehot, is_grads_batched=True))
