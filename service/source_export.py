"""``export:<file.pt2>``: a ``torch.export`` archive.

The archive is unflattened (``torch.export.unflatten``) back into its module tree, where forward hooks and
autograd work as in eager PyTorch, so every method is offered. An archive that cannot be unflattened runs as
its flat graph through :class:`GraphRuntime`, which returns any node's value beside the logits: the
gradient-free methods then explain it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, fx, nn

from service.cam.runtime import RuntimeModule
from service.modelspec import ModelSpec
from service.preprocess import Preprocess
from service.sources import Built, ModelLoadError, source

log = logging.getLogger("camserve.registry")


class _Recorder(fx.Interpreter):
    def __init__(self, module: fx.GraphModule, wanted: set[str]) -> None:
        super().__init__(module)
        self.wanted = wanted
        self.values: dict[str, Tensor] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if n.name in self.wanted and isinstance(out, Tensor):
            self.values[n.name] = out
        return out


class GraphRuntime:
    """A flat ``torch.fx`` graph as a :class:`~service.cam.runtime.Runtime`: its nodes are the layers."""

    def __init__(self, module: fx.GraphModule) -> None:
        self.module = module

    def outputs(self) -> Sequence[str]:
        names = []
        for node in self.module.graph.nodes:
            val = node.meta.get("val")
            if node.op == "call_function" and isinstance(val, Tensor) and val.dim() in (3, 4):
                names.append(node.name)
        return names

    def run(self, x: Tensor, outputs: Sequence[str]) -> tuple[Tensor, list[Tensor]]:
        with torch.no_grad():
            if not outputs:
                return self.module(x), []
            recorder = _Recorder(self.module, set(outputs))
            logits = recorder.run(x)
        return logits, [recorder.values[name] for name in outputs]

    def aliases(self) -> dict[str, str]:
        return {}

    def layout_hints(self) -> dict[str, str]:
        return {}

    def replay(self, output: str, value: Tensor) -> Tensor | None:
        return None


def _input_size(program: Any) -> tuple[int, int] | None:
    """The image input's static ``(H, W)``; parameters are placeholders too, so the signature says which is it."""
    inputs = set(program.graph_signature.user_inputs)
    for node in program.graph.nodes:
        val = node.meta.get("val")
        if node.op == "placeholder" and node.name in inputs and isinstance(val, Tensor) and val.dim() == 4:
            h, w = val.shape[2], val.shape[3]
            return (h, w) if isinstance(h, int) and isinstance(w, int) else None
    return None


@source("export", "export:<file.pt2>")
def _export(spec: ModelSpec, path: str, num_labels: int | None) -> Built:
    if not Path(path).is_file():
        raise ModelLoadError(f"model {spec.name!r}: torch.export archive not found: {path}")
    if spec.weights:
        raise ModelLoadError(f"model {spec.name!r}: a torch.export archive holds its weights; `weights` must be left "
                             f"out, got {spec.weights!r}")
    program = torch.export.load(path)
    h, w = _input_size(program) or (224, 224)
    pre = Preprocess(resize=int(min(h, w) / 0.875), crop=(h, w))
    try:
        module: nn.Module = torch.export.unflatten(program)
    except Exception as exc:  # an archive whose module calls cannot be told apart again
        log.warning("model %r: %s cannot be unflattened (%s); explaining it from its graph's values, without "
                    "gradients", spec.name, path, exc)
        runtime = GraphRuntime(program.module())
        return Built(RuntimeModule(runtime), None, pre, runtime=runtime)
    return Built(module, None, pre)
