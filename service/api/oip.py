"""The Open Inference Protocol ("V2": KServe, Triton, Seldon MLServer) apart from its wire: what the
REST binding (``oip_v2.py``) and the gRPC binding (``oip_grpc.py``) share.

Tensors in, tensors out, translated to and from the data plane:

- inputs: ``image`` BYTES ``[N]`` or ``[N, 1]``, one encoded image file per element; or ``pixels``
  FP32 (already normalised) or UINT8 ``[N, 3, H, W]`` at the model's input size.
- outputs: ``scores`` FP32 ``[N, K]``; ``heatmap`` FP32 ``[N, T, H, W]``; ``heatmap_png`` BYTES
  ``[N, T]``; ``target_class`` INT64 ``[N, T]``. All of them when the request names none, as the
  protocol says.

What to explain (``targets``, ``top_k``, ``method``, ``layer``) is one choice per request, so one
Grad-CAM pass serves every output; how each heatmap output is rendered (``size``, ``output``,
``colormap``, ``alpha``) may differ per output. ``heatmap_png`` at the heatmap's size is encoded from
the same arrays; any other rendering costs a second pass.

Each binding turns its wire format into :class:`InputTensor` lists, parameter dicts and requested
outputs, and the :class:`OutputTensor` list back into its wire format; nothing here knows either.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch

from service import __version__
from service.api import binary, oip_tasks
from service.api.encoding import heavy
from service.dataplane import MAX_DETECTIONS, MAX_TARGETS, DataPlane, ExplainOptions, Plan
from service.errors import InvalidArgument, InvalidInput, ModelNotFound, NotReady
from service.imaging import encode_png
from service.pipeline import ImageInput
from service.registry import LoadedModel
from service.repository import ModelRepository, ServedModel
from service.results import ImageResult, InferenceResult

T = TypeVar("T")

SERVER_NAME = "camserve"
VERSION = "1"  # every model has one version
# Both bindings; REST also serves Triton's model configuration and statistics extensions (oip_model_info.py).
EXTENSIONS = ["binary_tensor_data", "model_repository", "parameters"]
OUTPUTS = ("scores", "heatmap", "heatmap_png", "target_class")
INPUTS = ("image", "pixels")
# Every input some model takes: the images, and the targets of detectors, segmenters and embedding models.
ALL_INPUTS = (*INPUTS, *(n for names in oip_tasks.INPUTS.values() for n in names))
# Request parameters that Triton's clients may send and that mean nothing here.
IGNORED = ("priority", "timeout", "binary_data_output")
EXPLAIN_KEYS = ("targets", "top_k", "method", "layer", "objective", "max_detections")
RENDER_KEYS = ("size", "output", "colormap", "alpha")
DATATYPES = {"scores": "FP32", "heatmap": "FP32", "heatmap_png": "BYTES", "target_class": "INT64",
             **oip_tasks.DATATYPES}
# Detections a detector's outputs are padded to, unless the request's `max_detections` says otherwise.
DEFAULT_DETECTIONS = 20


# -- server and model state ---------------------------------------------------------------------
def server_metadata(extensions: Sequence[str] = EXTENSIONS) -> dict[str, Any]:
    return {"name": SERVER_NAME, "version": __version__, "extensions": list(extensions)}


def check_server_ready(repository: ModelRepository) -> None:
    reason = repository.not_ready_reason()
    if reason is not None:
        raise NotReady(reason)


def check_version(name: str, version: str | None) -> None:
    """``None`` or ``""`` (gRPC's unset string) is the one version."""
    if version and version != VERSION:
        raise ModelNotFound(f"model {name!r} has no version {version!r}; versions: {VERSION}")


def ready_model(repository: ModelRepository, name: str, version: str | None) -> ServedModel:
    check_version(name, version)
    return repository.get(name)  # ModelNotFound unknown or unloaded, NotReady loading, failed or draining


def metadata(served: ServedModel) -> dict[str, Any]:
    m = served.model
    assert m is not None
    h, w = m.preprocess.input_size
    inputs = [{"name": "image", "datatype": "BYTES", "shape": [-1]},
              {"name": "pixels", "datatype": "FP32", "shape": [-1, 3, h, w]}]
    outputs = [{"name": "scores", "datatype": "FP32", "shape": [-1, m.num_classes]}]
    if m.task is not None:
        extra_in, outputs = oip_tasks.metadata(m.task.name, m.num_classes)
        inputs += extra_in
    if m.explainable:
        outputs += [{"name": "heatmap", "datatype": "FP32", "shape": [-1, -1, -1, -1]},
                    {"name": "heatmap_png", "datatype": "BYTES", "shape": [-1, -1]},
                    {"name": "target_class", "datatype": "INT64", "shape": [-1, -1]}]
    # Triton's platform names: what runs the model.
    platform = "onnxruntime_onnx" if m.engine.runtime is not None and m.spec.kind == "onnx" else "pytorch"
    return {"name": served.name, "versions": [VERSION], "platform": platform, "inputs": inputs,
            "outputs": outputs}


# -- inputs -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class InputTensor:
    """One input as the wire gave it: either ``raw`` (row-major little-endian numbers, or BYTES
    elements each with its 4-byte length) or ``data`` (the elements, flattened: ``bytes`` for BYTES,
    numbers, or an array already typed)."""

    name: str
    datatype: Any  # as sent: checked here, so that a bad one is named in the error
    shape: list[int]
    raw: bytes | None = None
    data: Sequence[Any] | np.ndarray | None = None


# No input holds more elements than this (64 images of 40 MP, RGB): a shape beyond it is refused before
# anything multiplies it in fixed-width integers, where it could wrap around.
MAX_ELEMENTS = 2**40


def check_shape(value: Any, name: str) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                 for d in value):
        raise InvalidInput(f"input {name!r}: `shape` must be a list of non-negative integers, got {value!r}")
    if math.prod(value) > MAX_ELEMENTS:  # Python integers: exact, whatever the size
        raise InvalidInput(f"input {name!r}: `shape` {value} holds {math.prod(value)} elements, more than any "
                           f"request may ({MAX_ELEMENTS})")
    return value


def _images_input(tensor: InputTensor) -> list[ImageInput]:
    shape = tensor.shape
    if tensor.datatype != "BYTES":
        raise InvalidInput(f"input 'image' must have datatype BYTES (encoded image files), got {tensor.datatype!r}")
    if len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] != 1):
        raise InvalidInput(f"input 'image' must have shape [N] or [N, 1], got {shape}")
    n = shape[0]
    if tensor.raw is not None:
        return list(binary.unpack_bytes(tensor.raw, n, "image"))
    items = list(tensor.data if tensor.data is not None else ())
    if len(items) != n:
        raise InvalidInput(f"input 'image': {len(items)} elements in `data`, its shape {shape} says {n}")
    return items


def _pixels_input(tensor: InputTensor) -> list[ImageInput]:
    datatype, shape = tensor.datatype, tensor.shape
    if datatype not in ("FP32", "UINT8"):
        raise InvalidInput(f"input 'pixels' must have datatype FP32 (normalised) or UINT8, got {datatype!r}")
    if len(shape) != 4 or shape[1] != 3:
        raise InvalidInput(f"input 'pixels' must have shape [N, 3, H, W], got {shape}")
    count = math.prod(shape)
    if tensor.raw is not None:
        array = binary.unpack_numbers(tensor.raw, datatype, shape, "pixels")
    elif isinstance(tensor.data, np.ndarray):
        if tensor.data.size != count:
            raise InvalidInput(f"input 'pixels': {tensor.data.size} elements, its shape {shape} says {count}")
        if datatype == "UINT8" and tensor.data.size and (tensor.data.min() < 0 or tensor.data.max() > 255):
            raise InvalidInput("input 'pixels': UINT8 data must be integers in 0..255")
        array = tensor.data.reshape(shape)
    else:
        values = list(tensor.data if tensor.data is not None else ())
        if len(values) != count:
            raise InvalidInput(f"input 'pixels': {len(values)} elements in `data`, its shape {shape} says {count}")
        if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
            raise InvalidInput("input 'pixels': `data` must hold numbers")
        if datatype == "UINT8" and not all(isinstance(v, int) and 0 <= v <= 255 for v in values):
            raise InvalidInput("input 'pixels': UINT8 data must be integers in 0..255")
        array = np.asarray(values, dtype=binary.NUMPY_TYPES[datatype]).reshape(shape)
    tensor_data = torch.from_numpy(np.array(array, dtype=np.uint8 if datatype == "UINT8" else np.float32))
    return list(tensor_data.unbind(0))


@dataclass(frozen=True)
class Inputs:
    """A request's images, and the target tensors of a detector, segmenter or embedding model by name."""

    images: list[ImageInput]
    targets: dict[str, InputTensor]


def parse_inputs(tensors: Sequence[InputTensor]) -> Inputs:
    """The images of a request that sends exactly one of ``image`` and ``pixels``, and its target inputs."""
    if not tensors:
        raise InvalidInput(f"`inputs` must be a non-empty list of tensors; valid inputs: {', '.join(INPUTS)}")
    images: list[ImageInput] | None = None
    seen = None
    targets: dict[str, InputTensor] = {}
    for tensor in tensors:
        if tensor.name in ALL_INPUTS and tensor.name not in INPUTS:
            if tensor.name in targets:
                raise InvalidInput(f"input {tensor.name!r} is given twice")
            targets[tensor.name] = tensor
            continue
        if tensor.name not in INPUTS:
            raise InvalidInput(f"unknown input {tensor.name!r}; valid inputs: {', '.join(ALL_INPUTS)}")
        if images is not None:
            raise InvalidInput(f"input {tensor.name!r} is given twice" if tensor.name == seen else
                               "send one input, `image` or `pixels`, not both")
        seen = tensor.name
        images = _images_input(tensor) if tensor.name == "image" else _pixels_input(tensor)
    if images is None:
        raise InvalidInput(f"no image given: send the input `image` or `pixels` beside {', '.join(targets)}")
    if not images:
        raise InvalidInput("no image given: the input's first dimension is 0")
    return Inputs(images, targets)


# -- parameters and requested outputs -----------------------------------------------------------
def check_parameters(params: Mapping[str, Any]) -> None:
    unknown = sorted(set(params) - {*EXPLAIN_KEYS, *RENDER_KEYS, *IGNORED})
    if unknown:
        raise InvalidInput(f"unknown parameter(s) {', '.join(unknown)}; valid: "
                           f"{', '.join((*EXPLAIN_KEYS, *RENDER_KEYS, 'binary_data_output'))}")


def check_bool(value: Any, what: str) -> bool:
    if not isinstance(value, bool):
        raise InvalidInput(f"{what} must be true or false, got {value!r}")
    return value


def options(params: Mapping[str, Any], keys: Sequence[str], where: str) -> dict[str, Any]:
    """The explanation and rendering options among ``params``, type-checked; values are checked by
    the data plane as on ``/explain``."""
    out: dict[str, Any] = {}
    for key in keys:
        if key not in params:
            continue
        value = params[key]
        if key == "targets":
            if isinstance(value, str):
                value = [t.strip() for t in value.split(",") if t.strip()]
            elif isinstance(value, int) and not isinstance(value, bool):
                value = [value]
            if (not isinstance(value, list) or not value
                    or not all(isinstance(t, int | str) and not isinstance(t, bool) for t in value)):
                raise InvalidArgument("targets", f"{where}`targets` must be class indices or labels (a list or a "
                                      f"comma-separated string), got {params[key]!r}")
        elif key == "targets" and isinstance(value, list) and value and all(isinstance(t, dict) for t in value):
            pass  # a detector's, segmenter's or embedding model's target objects, read by the data plane
        elif key in ("top_k", "max_detections"):
            if not isinstance(value, int) or isinstance(value, bool):
                raise InvalidArgument("top_k", f"{where}`top_k` must be an integer, got {value!r}")
        elif key == "alpha":
            if not isinstance(value, int | float) or isinstance(value, bool):
                raise InvalidArgument("alpha", f"{where}`alpha` must be a number, got {value!r}")
            value = float(value)
        elif not isinstance(value, str):
            raise InvalidArgument(key, f"{where}`{key}` must be a string, got {value!r}")
        out[key] = value
    return out


@dataclass(frozen=True)
class Wanted:
    """One requested output: its name, whether it travels as binary (REST only), and its rendering
    options."""

    name: str
    binary: bool
    render: dict[str, Any]


def output_names(model: LoadedModel) -> tuple[str, ...]:
    heat = OUTPUTS[1:] if model.explainable else ()
    if model.task is None:
        return ("scores", *heat)
    return (*oip_tasks.OUTPUTS[model.task.name], *heat)


def _default_outputs(model: LoadedModel) -> tuple[str, ...]:
    """What a request that names no output gets: everything, but an output that needs an input it lacks."""
    return tuple(n for n in output_names(model) if n != "similarity")


def parse_outputs(requested: Sequence[tuple[Any, Mapping[str, Any]]] | None, default_binary: bool,
                  model: LoadedModel) -> list[Wanted]:
    """``requested``: (name, parameters) per requested output, or ``None`` for all of them."""
    names = output_names(model)
    if requested is None:
        return [Wanted(n, default_binary, {}) for n in _default_outputs(model)]
    wanted: list[Wanted] = []
    for name, oparams in requested:
        if name not in names:
            raise InvalidInput(f"unknown output {name!r}; valid outputs: {', '.join(names)}")
        if any(w.name == name for w in wanted):
            raise InvalidInput(f"output {name!r} is requested twice")
        allowed = {"binary_data", *(RENDER_KEYS if name == "heatmap_png" else
                                    ("size",) if name == "heatmap" else ())}
        extra = sorted(set(oparams) - allowed)
        if extra:
            explain_only = set(extra) & {*EXPLAIN_KEYS, *RENDER_KEYS}
            hint = (" (what to explain is chosen once per request: put it in the request's `parameters`)"
                    if explain_only else "")
            raise InvalidInput(f"output {name!r}: unknown parameter(s) {', '.join(extra)}; valid: "
                               f"{', '.join(sorted(allowed))}{hint}")
        use_binary = check_bool(oparams.get("binary_data", default_binary), f"output {name!r}: `binary_data`")
        wanted.append(Wanted(str(name), use_binary, options(oparams, RENDER_KEYS, f"output {name!r}: ")))
    if not wanted:
        raise InvalidInput(f"`outputs` is empty; valid outputs: {', '.join(names)}")
    return wanted


# -- passes -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Passes:
    """The data plane runs one request needs. ``main`` always runs (it gives the scores and the
    classes); ``png`` is where ``heatmap_png`` comes from: ``"arrays"`` (encoded from ``main``'s
    heatmap arrays), ``"main"`` (``main`` renders PNGs), or a second plan when neither can."""

    main: Plan
    png: Plan | str | None = None

    @property
    def plans(self) -> list[Plan]:
        return [self.main, *([self.png] if isinstance(self.png, Plan) else [])]


def _top(plan: Plan, top: int) -> Plan:
    assert plan.query is not None
    if plan.query.classes:
        return plan
    return dataclasses.replace(plan, query=dataclasses.replace(plan.query, top=top))


def plan_passes(dataplane: DataPlane, model: str, inputs: Inputs, params: Mapping[str, Any],
                wanted: list[Wanted]) -> Passes:
    n = len(inputs.images)
    served = dataplane.repository.get(model)
    loaded = served.model
    assert loaded is not None
    request_opts = options(params, (*EXPLAIN_KEYS, *RENDER_KEYS), "")
    detections = _detections(request_opts.pop("max_detections", None), loaded)
    tensor_targets: list[dict[str, Any]] = []
    if loaded.task is not None:
        tensor_targets = oip_tasks.read_targets(loaded.task.name, inputs.targets, n, params)
        if tensor_targets and "targets" in params and "target_mask" not in inputs.targets:
            raise InvalidArgument("targets", "give targets as input tensors or in the `targets` parameter, not both")
    elif inputs.targets:
        raise InvalidInput(f"input {next(iter(inputs.targets))!r} is for detectors, segmenters and embedding models; "
                           f"valid inputs: {', '.join(INPUTS)}")
    by_name = {w.name: w for w in wanted}
    if not by_name.keys() & {"heatmap", "heatmap_png", "target_class", *oip_tasks.EXPLAINED}:
        if params.keys() & {*EXPLAIN_KEYS, *RENDER_KEYS} - {"top_k", "max_detections"}:
            # Checked as if a heatmap were asked for, so a typo in an option is a 400 whatever the outputs.
            plan_passes(dataplane, model, inputs, params, [Wanted("heatmap", False, {})])
        return Passes(dataplane.plan(model, n, top_k=detections))
    top = request_opts.pop("top_k", 1)
    limit = min(loaded.num_classes, MAX_TARGETS) if loaded.task is None else MAX_TARGETS
    if not 1 <= top <= limit:
        raise InvalidArgument("top_k", f"`top_k` (classes explained per image) must be between 1 and {limit}, "
                              f"got {top}")
    base = {"size": "input", "output": "png", **request_opts}

    def explain(render: dict[str, Any], output: str) -> ExplainOptions:
        merged = {**base, **render}
        targets = tensor_targets or merged.get("targets", ())
        return ExplainOptions(method=merged.get("method"), layer=merged.get("layer"),
                              targets=tuple(targets), output=output,  # type: ignore[arg-type]
                              objective=merged.get("objective", "score"),
                              size=merged["size"], colormap=merged.get("colormap", "jet"),
                              alpha=merged.get("alpha", 0.5))

    def planned(opts: ExplainOptions) -> Plan:
        return _top(dataplane.plan(model, n, top_k=detections, explain=opts), top)

    heat, png = by_name.get("heatmap"), by_name.get("heatmap_png")
    png_opts = None
    if png is not None:
        output = png.render.get("output", base["output"])
        if output not in ("png", "overlay"):
            raise InvalidArgument("output", f"`output` of heatmap_png must be png or overlay, got {output!r}")
        png_opts = explain(png.render, output)
    if heat is None:
        # target_class alone needs no rendering worth the name: the layer's grid is the smallest.
        return Passes(planned(png_opts or explain({"size": "feature"}, "array")), "main" if png else None)
    main_opts = explain(heat.render, "array")
    main = planned(main_opts)
    if png_opts is None:
        return Passes(main)
    if png_opts.output == "png" and png_opts.size == main_opts.size:
        return Passes(main, "arrays")
    return Passes(main, planned(png_opts))


def _detections(value: Any, model: LoadedModel) -> int | None:
    """The detections a detector's outputs list (``D``); ``None`` for other models, which use ``top_k``."""
    if model.task is None or model.task.name != "detection":
        if value is not None:
            raise InvalidArgument("max_detections", "`max_detections` is a detector's parameter")
        return None
    d = DEFAULT_DETECTIONS if value is None else value
    if not 1 <= d <= MAX_DETECTIONS:
        raise InvalidArgument("max_detections", f"`max_detections` must be between 1 and {MAX_DETECTIONS}, got {d}")
    return int(d)


# -- outputs ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class OutputTensor:
    name: str
    datatype: str
    shape: list[int]
    data: np.ndarray | list[bytes]  # numbers, or the BYTES elements in row-major order

    def raw(self) -> bytes:
        """As the binary extension and ``raw_output_contents`` carry it."""
        if isinstance(self.data, list):
            return binary.pack_bytes(self.data)
        return binary.pack_numbers(self.data, self.datatype)


def _png_from_array(array: np.ndarray) -> bytes:
    # The same levels as the renderer's png output: round(value * 255) of the float32 map.
    return encode_png(np.round(array * np.float32(255)).astype(np.uint8))


def _heatmaps(results: list[ImageResult], size: str) -> np.ndarray:
    found = [np.stack([e.heatmap.data for e in r.explanations]) if r.explanations else None for r in results]
    # A detector's image may have fewer detections to explain than the others: its maps are padded with
    # zeros, and `target_detection` says -1 there.
    t_max = max((m.shape[0] for m in found if m is not None), default=0)
    grid = next((m.shape[1:] for m in found if m is not None), (0, 0))
    maps = [np.zeros((t_max, *grid), dtype=np.float32) if m is None else
            np.concatenate([m, np.zeros((t_max - m.shape[0], *m.shape[1:]), dtype=m.dtype)]) for m in found]
    shapes = {m.shape for m in maps}
    if len(shapes) > 1:
        raise InvalidArgument("size", f"output 'heatmap' at size {size!r} needs every image to give the same "
                              f"shape, got {sorted(shapes)}; ask for size input or feature")
    return np.stack(maps).astype(np.float32, copy=False)


def output_tensors(wanted: list[Wanted], results: list[ImageResult], png_results: list[ImageResult] | None,
                   passes: Passes, refs: np.ndarray | None = None) -> list[OutputTensor]:
    """The requested outputs, in the order requested. CPU-bound when PNGs are encoded."""
    out: list[OutputTensor] = []
    n = len(results)
    arrays: np.ndarray | None = None
    size = passes.main.spec.size if passes.main.spec is not None else "input"
    for w in wanted:
        data: np.ndarray | list[bytes]
        if w.name == "scores":
            data = np.asarray([r.scores for r in results], dtype=np.float32)
            shape = list(data.shape)
        elif w.name == "target_class":
            rows = [[e.index for e in r.explanations or ()] for r in results]
            data = np.full((n, max((len(r) for r in rows), default=0)), -1, dtype=np.int64)
            for i, row in enumerate(rows):
                data[i, : len(row)] = row
            shape = list(data.shape)
        elif w.name in oip_tasks.DATATYPES:
            shape, data = oip_tasks.output(w.name, results, passes.main.top_k, refs)
        elif w.name == "heatmap":
            arrays = arrays if arrays is not None else _heatmaps(results, size)
            data, shape = arrays, list(arrays.shape)
        elif passes.png == "arrays":  # heatmap_png, encoded from the heatmap arrays
            arrays = arrays if arrays is not None else _heatmaps(results, size)
            data = [_png_from_array(m) for image in arrays for m in image]
            shape = [n, arrays.shape[1]]
        else:  # heatmap_png, rendered by the pipeline
            per_image = [[e.heatmap.data for e in r.explanations or ()] for r in png_results or results]
            width = max(len(image) for image in per_image)
            # Padded with empty elements where a detector's image has fewer maps.
            data = [b for image in per_image for b in [*image, *[b""] * (width - len(image))]]  # type: ignore[misc]
            shape = [n, width]
        out.append(OutputTensor(w.name, DATATYPES[w.name], shape, data))
    return out


Runs = Coroutine[Any, Any, list[InferenceResult]]


async def infer(dataplane: DataPlane, passes: Passes, inputs: Inputs, wanted: list[Wanted],
                encode: Callable[[list[OutputTensor]], T], guard: Callable[[Runs], Runs] | None = None) -> T:
    """Run the passes and ``encode`` their outputs in the binding's wire format. ``guard`` wraps the
    runs (REST: cancel them when the client disconnects)."""
    images = inputs.images
    refs = oip_tasks.references(inputs.targets)

    async def run_all() -> list[InferenceResult]:
        return list(await asyncio.gather(*(dataplane.run(p, images) for p in passes.plans)))

    done = await (guard(run_all()) if guard is not None else run_all())
    png_results = done[1].results if len(done) > 1 else None

    def build() -> T:
        return encode(output_tensors(wanted, done[0].results, png_results, passes, refs))

    if passes.png == "arrays" or any(heavy(r) for r in done):
        # PNG encoding, or megabytes of floats or PNGs: on the loop it would stall every other request.
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(dataplane.repository.cpu_pool, build)
    return build()  # a few kilobytes: a hop to the CPU pool (queued behind decodes) would cost more than it saves
