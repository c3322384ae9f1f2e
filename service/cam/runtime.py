"""Models the engine cannot hook: a runtime that runs the model and returns the intermediate outputs asked for.

Eager PyTorch gives the engine its target layers' outputs through forward hooks and their gradients through
autograd. A compiled or exported model (an ONNX Runtime session, say) has neither, but it can return any
named intermediate tensor beside the logits, and often run the graph from that tensor on: that is all the
gradient-free methods need (EigenCAM from the activations, ScoreCAM from masked forwards, AblationCAM from
replays of the layers after the target). :class:`Runtime` is that contract; the engine knows no more of it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

import torch
from torch import Tensor, nn


class Runtime(Protocol):
    """Runs a model outside autograd."""

    def outputs(self) -> Sequence[str]:
        """The intermediate outputs it can return, in execution order."""
        ...

    def run(self, x: Tensor, outputs: Sequence[str]) -> tuple[Tensor, list[Tensor]]:
        """``x`` ``(N, 3, H, W)`` -> logits ``(N, K)`` and the named outputs, on ``x``'s device."""
        ...

    def layout_hints(self) -> Mapping[str, str]:
        """Outputs whose layout the graph settles where their shape alone cannot (a convolution's output is
        ``nchw`` even when its channels equal its height), each -> ``nchw`` or ``nhwc``."""
        ...

    def aliases(self) -> Mapping[str, str]:
        """Other names of its outputs (the module path that produced one), each -> the output's name."""
        ...

    def replay(self, output: str, value: Tensor) -> Tensor | None:
        """Logits ``(B, K)`` of the graph run on from ``output`` set to ``value``, or ``None`` where the rest of
        the graph reads more than that output (a skip connection around it)."""
        ...


class RuntimeModule(nn.Module):
    """A runtime as a module, so that everything that predicts (the pipeline, the warm-up) calls it as usual."""

    def __init__(self, runtime: Runtime) -> None:
        super().__init__()
        self.runtime = runtime

    def forward(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            return self.runtime.run(x, ())[0]
