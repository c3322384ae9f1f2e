"""``onnx:<file.onnx>``: predictions through ONNX Runtime (the ``camserve[onnx]`` extra), explanations
without autograd.

The graph's intermediate tensors are the layers, named by the ONNX node output that holds them
(``/layer4/layer4.1/relu_1/Relu_output_0`` is resnet's ``layer4`` as PyTorch's exporter names it). A
session returns a target layer's tensor beside the logits once that tensor is made a graph output; the
plain graph stays the one that predicts, so a prediction pays for no extra output. AblationCAM runs the
graph on from the layer: the part of the graph between that tensor and the logits, cut out with
``onnx.utils.Extractor``, where nothing in it reads an earlier tensor.
"""

from __future__ import annotations

import copy
import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from service.cam.runtime import RuntimeModule
from service.modelspec import ModelSpec
from service.preprocess import Preprocess
from service.sources import Built, ModelLoadError, require, source

log = logging.getLogger("camserve.registry")

_CHANNELS_FIRST_OPS = {"Conv", "ConvTranspose", "BatchNormalization", "MaxPool", "AveragePool", "LpPool",
                       "InstanceNormalization", "LRN", "GroupNormalization", "DepthToSpace", "SpaceToDepth"}
_ELEMENTWISE_OPS = {"Relu", "LeakyRelu", "PRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Clip", "Gelu",
                    "Erf", "Elu", "Selu", "Mish", "Softplus", "Add", "Sub", "Mul", "Div", "Dropout", "Identity",
                    "Cast"}
# Sessions kept per set of requested outputs; a new layer builds one (tens of milliseconds on resnet50).
_MAX_SESSIONS = 8


class OnnxRuntime:
    """An ONNX graph run by ONNX Runtime, as a :class:`~service.cam.runtime.Runtime`."""

    def __init__(self, path: str, providers: list[str]) -> None:
        onnx = require("onnx", "onnx", "onnx")
        self._ort = require("onnxruntime", "onnx", "onnx")
        self._onnx = onnx
        self.providers = providers
        model = onnx.load(path)
        self.model = onnx.shape_inference.infer_shapes(model)
        graph = self.model.graph
        initializers = {i.name for i in graph.initializer}
        inputs = [i for i in graph.input if i.name not in initializers]
        if len(inputs) != 1 or not graph.output:
            raise ModelLoadError(f"{path}: the graph must take one image input and return logits first; it takes "
                                 f"{[i.name for i in inputs]}")
        self.input = inputs[0]
        self.logits = graph.output[0].name
        self._values = {v.name: v for v in graph.value_info}
        self._lock = threading.Lock()
        self._sessions: OrderedDict[tuple[str, ...], Any] = OrderedDict()
        self._tails: dict[str, Any] = {}
        self._predict = self._session(model)
        dims = self.input.type.tensor_type.shape.dim
        # A graph exported with a fixed batch of one runs a batch one image at a time.
        self.fixed_batch = dims[0].HasField("dim_value") and dims[0].dim_value == 1

    def input_size(self) -> tuple[int, int] | None:
        dims = self.input.type.tensor_type.shape.dim
        if len(dims) == 4 and dims[2].HasField("dim_value") and dims[3].HasField("dim_value"):
            return int(dims[2].dim_value), int(dims[3].dim_value)
        return None

    def _session(self, model: Any) -> Any:
        options = self._ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        # Each session has its own thread pool, and an idle pool spins by default: with a predict session and an
        # explain session taking turns, the spinning one steals the cores the working one needs.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return self._ort.InferenceSession(model.SerializeToString(), options, providers=self.providers)

    def outputs(self) -> Sequence[str]:
        """Node outputs of rank 3 or 4 (shape inference's), in graph order."""
        names = []
        for node in self.model.graph.node:
            for out in node.output:
                value = self._values.get(out)
                if value is not None and len(value.type.tensor_type.shape.dim) in (3, 4):
                    names.append(out)
        return names

    def layout_hints(self) -> dict[str, str]:
        """Layouts the operators fix: convolutions, batch norms and pools make ``nchw``; a transpose moves the
        channels; element-wise operators keep their input's; a layer norm or matrix product over the last axis
        of a 4-D tensor reads it as channels-last."""
        hints: dict[str, str] = {self.input.name: "nchw"}
        for node in self.model.graph.node:
            if not node.output:
                continue
            out, first = node.output[0], (node.input[0] if node.input else "")
            if node.op_type in _CHANNELS_FIRST_OPS:
                hints[out] = "nchw"
            elif node.op_type == "Transpose" and first in hints:
                perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), [])
                moved = {("nchw", (0, 2, 3, 1)): "nhwc", ("nhwc", (0, 3, 1, 2)): "nchw"}
                if (hints[first], tuple(perm)) in moved:
                    hints[out] = moved[(hints[first], tuple(perm))]
            elif node.op_type in _ELEMENTWISE_OPS and first in hints:
                hints[out] = hints[first]
            elif node.op_type in ("LayerNormalization", "MatMul") and self._rank(first) == 4:
                hints[out] = "nhwc"
        return hints

    def _rank(self, name: str) -> int:
        value = self._values.get(name)
        return len(value.type.tensor_type.shape.dim) if value is not None else 0

    def aliases(self) -> dict[str, str]:
        """Each module path in the exporter's scope names -> the last rank-3/4 tensor made under it, so that
        ``layer4`` names ``/layer4/layer4.1/relu_1/Relu_output_0``. The scope ``/layer4/layer4.1/conv1/Conv``
        reads as the modules ``layer4``, ``layer4.1`` and ``layer4.1.conv1``."""
        out: dict[str, str] = {}
        for name in self.outputs():
            path = ""
            for part in name.split("/")[1:-1]:
                path = part if not path or part.startswith(path + ".") else f"{path}.{part}"
                out[path] = name  # graph order: the last tensor of a scope wins
        return out

    def _with_outputs(self, names: tuple[str, ...]) -> Any:
        if not names:
            return self._predict
        with self._lock:
            session = self._sessions.get(names)
            if session is not None:
                self._sessions.move_to_end(names)
                return session
        model = copy.deepcopy(self.model)
        for name in names:
            if name not in self._values:
                raise ValueError(f"{name!r} is not a tensor of the graph")
            model.graph.output.append(self._values[name])
        session = self._session(model)
        if len(names) <= _MAX_SESSIONS:  # the trace's all-layers session is used once
            with self._lock:
                self._sessions[names] = session
                while len(self._sessions) > _MAX_SESSIONS:
                    self._sessions.popitem(last=False)
        return session

    def run(self, x: Tensor, outputs: Sequence[str]) -> tuple[Tensor, list[Tensor]]:
        names = tuple(outputs)
        session = self._with_outputs(names)
        arrays = x.detach().float().cpu().numpy()
        batches = [arrays[i : i + 1] for i in range(len(arrays))] if self.fixed_batch else [arrays]
        results = [session.run([self.logits, *names], {self.input.name: b}) for b in batches]
        columns = [torch.cat([torch.from_numpy(r[j]) for r in results]).to(x.device) for j in range(len(names) + 1)]
        return columns[0], columns[1:]

    def replay(self, output: str, value: Tensor) -> Tensor | None:
        if output not in self._tails:
            self._tails[output] = self._tail(output)
        tail = self._tails[output]
        if tail is None:
            return None
        arrays = value.detach().float().cpu().numpy()
        batches = [arrays[i : i + 1] for i in range(len(arrays))] if self.fixed_batch else [arrays]
        return torch.cat([torch.from_numpy(tail.run([self.logits], {output: b})[0]) for b in batches]).to(value.device)

    def _tail(self, output: str) -> Any:
        try:
            tail = self._onnx.utils.Extractor(self.model).extract_model([output], [self.logits])
            needed = {i for node in tail.graph.node for i in node.input if i}
            known = ({output} | {i.name for i in tail.graph.initializer}
                     | {o for node in tail.graph.node for o in node.output})
            if needed - known:  # the rest of the graph reads the input or an earlier tensor too
                return None
            return self._session(tail)
        except Exception as exc:
            log.info("no replay from %s: %s", output, exc)
            return None


def _providers(ort: Any, device: str) -> list[str]:
    available = ort.get_available_providers()
    if device.startswith("cuda") or (device == "auto" and "CUDAExecutionProvider" in available):
        if "CUDAExecutionProvider" not in available:
            raise ModelLoadError(f"`device` is {device!r} but this onnxruntime has no CUDA provider "
                                 "(install onnxruntime-gpu)")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


@source("onnx", "onnx:<file.onnx>")
def _onnx(spec: ModelSpec, path: str, num_labels: int | None) -> Built:
    if not Path(path).is_file():
        raise ModelLoadError(f"model {spec.name!r}: ONNX file not found: {path}")
    ort = require("onnxruntime", "onnx", "onnx")
    runtime = OnnxRuntime(path, _providers(ort, spec.device))
    h, w = runtime.input_size() or (224, 224)
    pre = Preprocess(resize=int(min(h, w) / 0.875), crop=(h, w))
    return Built(RuntimeModule(runtime), None, pre, runtime=runtime)
