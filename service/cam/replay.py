"""Running only the layers after a target layer, for methods that perturb its activations.

Two ways, best first:

- A closed form: when the layers after the target are global average pooling then one linear layer,
  ``logits = W @ mean_hw(A) + b``, and zeroing channel ``k`` lowers class ``c`` by ``W[c, k] * mean(A_k)``.
  It is recognised numerically on the batch itself (the logits must equal that formula), so a head that
  only looks like one (a max pool, a batch norm between) is never mistaken for it.
- A tail graph: the model traced with ``torch.fx`` with the target layer kept as a leaf, cut after it.
  It exists only if nothing after the target reads an earlier value (a skip connection around the
  target layer would), so the tail is a function of the target's output alone.

Where neither exists the engine falls back to whole forwards with the layer's output replaced.
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from service.cam.methods import LinearHead

# torch.fx patches nn.Module.__call__ process-wide while it traces; one trace at a time, and tracing
# happens once per (model, layer), off the request path after the first use.
_TRACE_LOCK = threading.Lock()


def linear_head(model: nn.Module, activations: Tensor, logits: Tensor,
                precision: torch.dtype = torch.float32) -> LinearHead | None:
    """A linear layer ``W`` with ``logits == W @ mean_hw(activations) + b`` on this batch, if there is one.

    ``activations``: ``(n, C, h, w)``; ``logits``: ``(n, K)``; ``precision``: the dtype the model computed
    in (bf16 or fp16 under autocast), which sets how closely the logits must match the formula."""
    c = activations.shape[1]
    # The check runs in float32 whatever autocast is on: a bf16 matmul here would compare two roundings.
    with torch.autocast(activations.device.type, enabled=False):
        pooled = activations.float().mean(dim=(2, 3))
        scale = float(logits.abs().max()) if logits.numel() else 0.0
        eps = torch.finfo(precision).eps if precision.is_floating_point else 0.0
        for module in reversed(list(model.modules())):
            if isinstance(module, nn.Linear) and module.in_features == c and module.out_features == logits.shape[1]:
                w = module.weight.detach().float()
                b = module.bias.detach().float() if module.bias is not None else None
                expected = F.linear(pooled, w, b)
                # float32: a fixed tolerance. Reduced precision rounds the pooled input, the weights and the
                # output, each by half an eps: 2 eps times the sum of the magnitudes bounds the difference.
                tol = 1e-4 * max(1.0, scale) + 1e-4 * expected.abs()
                if eps > torch.finfo(torch.float32).eps:
                    tol = tol + 2 * eps * F.linear(pooled.abs(), w.abs(), None if b is None else b.abs())
                if bool(((expected - logits.float()).abs() <= tol).all()):
                    return LinearHead(w, b)
    return None


class _LeafTracer(fx.Tracer):
    def __init__(self, leaf: str) -> None:
        super().__init__()
        self.leaf = leaf

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return module_qualified_name == self.leaf or super().is_leaf_module(m, module_qualified_name)


def tail_module(model: nn.Module, layer: str) -> nn.Module | None:
    """The layers after ``layer`` as a module taking ``layer``'s output, or ``None`` where that cannot be cut."""
    tracer = _LeafTracer(layer)
    try:
        with _TRACE_LOCK:
            graph = tracer.trace(model)
    except Exception:
        return None
    nodes = list(graph.nodes)
    at = [n for n in nodes if n.op == "call_module" and n.target == layer]
    outputs = [n for n in nodes if n.op == "output"]
    if len(at) != 1 or len(outputs) != 1:
        return None
    cut = at[0]
    position = {n: i for i, n in enumerate(nodes)}
    needed: set[fx.Node] = set()
    stack = [outputs[0]]
    while stack:
        node = stack.pop()
        if node is cut or node in needed:
            continue
        if node.op == "placeholder" or (position[node] < position[cut] and node.op != "get_attr"):
            return None  # the tail reads the input or an earlier value: not a function of the layer alone
        needed.add(node)
        stack.extend(node.all_input_nodes)
    tail = fx.Graph()
    env: dict[fx.Node, fx.Node] = {cut: tail.placeholder("activation")}
    for node in nodes:
        if node in needed:
            env[node] = tail.node_copy(node, lambda n: env[n])
    return fx.GraphModule(tracer.root, tail)
