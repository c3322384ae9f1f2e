"""Guided backpropagation (Springenberg et al. 2015) without touching the model's modules.

For one extra pass, a forward hook on every ``nn.ReLU`` routes its output through :class:`_GuidedReLU`,
whose backward lets through only positive gradients where the ReLU was active. The hooks are removed
in ``finally``; the modules themselves are never replaced, so other users of the model see nothing.
Functional ReLUs (``F.relu`` in a ``forward``) cannot be reached this way, hence :func:`has_relu_modules`.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import Tensor, nn


class _GuidedReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, out: Tensor) -> Tensor:
        ctx.save_for_backward(out > 0)
        # A clone: an in-place op after the ReLU (resnet's `out += identity`) must not touch the saved mask's source.
        return out.clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        (active,) = ctx.saved_tensors
        passed: Tensor = grad.clamp(min=0) * active
        return passed


def has_relu_modules(model: nn.Module) -> bool:
    return any(isinstance(m, nn.ReLU) for m in model.modules())


def guided_gradients(model: nn.Module, x: Tensor, score: Callable[[Any], Tensor], targets: int,
                     context: AbstractContextManager[Any] | None = None) -> Tensor:
    """Guided-backprop gradients of the target scores w.r.t. the input.

    ``x``: ``(n, 3, H, W)``; ``score``: the model's output -> ``(n, T)`` differentiable target scores (a
    classifier's target logits, another task's objectives); ``targets``: ``T``; ``context``: entered around the
    forward (a task's :meth:`~service.cam.tasks.Task.explaining`). -> ``(T, n, 3, H, W)`` float32. One forward
    and one backward per target; the model's parameters are not differentiated."""
    handles = [m.register_forward_hook(lambda m, a, o: _GuidedReLU.apply(o))
               for m in model.modules() if isinstance(m, nn.ReLU)]
    try:
        with torch.enable_grad():
            leaf = x.detach().float().requires_grad_(True)
            with context or nullcontext():
                scores = score(model(leaf.to(x.dtype)))
            # One backward per target: vmap (is_grads_batched) does not run through a custom Function's backward.
            # Images are independent, so one target column's sum differentiates each image's own target.
            grads = [torch.autograd.grad(scores[:, i].sum(), leaf, retain_graph=i < targets - 1)[0]
                     for i in range(targets)]
            return torch.stack(grads).float()
    finally:
        for h in handles:
            h.remove()
