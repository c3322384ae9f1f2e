"""The Open Inference Protocol ("V2": KServe, Triton, Seldon MLServer) over REST.

Tensors in, tensors out, translated to and from the data plane:

- inputs: ``image`` BYTES ``[N]`` or ``[N, 1]``, one encoded image file per element (base64 text in
  JSON, raw bytes in the binary extension); or ``pixels`` FP32 (already normalised) or UINT8
  ``[N, 3, H, W]`` at the model's input size.
- outputs: ``scores`` FP32 ``[N, K]``; ``heatmap`` FP32 ``[N, T, H, W]``; ``heatmap_png`` BYTES
  ``[N, T]``; ``target_class`` INT64 ``[N, T]``. All of them when the request names none, as the
  protocol says.

What to explain (``targets``, ``top_k``, ``method``, ``layer``) is one choice per request, so one
Grad-CAM pass serves every output; how each heatmap output is rendered (``size``, ``output``,
``colormap``, ``alpha``) may differ per output. ``heatmap_png`` at the heatmap's size is encoded from
the same arrays; any other rendering costs a second pass.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from fastapi import APIRouter, Request
from fastapi.responses import Response

from service import __version__
from service.api import binary
from service.api.deps import DataPlaneDep, RepositoryDep, SettingsDep
from service.api.encoding import heavy
from service.api.middleware import note_request
from service.api.parsing import decode_base64, json_object
from service.api.routes import unless_disconnected
from service.dataplane import MAX_TARGETS, DataPlane, ExplainOptions, Plan
from service.errors import InvalidArgument, InvalidInput, ModelNotFound, NotReady
from service.imaging import encode_png
from service.pipeline import ImageInput
from service.repository import ModelRepository, ServedModel
from service.results import ImageResult, InferenceResult

# Not in camserve's OpenAPI document: these routes follow the protocol's own specification (KServe's
# open_inference_rest.yaml), and their errors are that dialect's, not camserve's documented ones.
router = APIRouter(tags=["open inference protocol (v2)"], include_in_schema=False)

VERSION = "1"  # every model has one version; its path form `/versions/1` is accepted too
EXTENSIONS = ["binary_tensor_data", "model_repository", "parameters", "model_configuration", "statistics"]
OUTPUTS = ("scores", "heatmap", "heatmap_png", "target_class")
INPUTS = ("image", "pixels")
# Request parameters that Triton's clients may send and that mean nothing here.
_IGNORED = {"priority", "timeout", "binary_data_output"}
_EXPLAIN_KEYS = ("targets", "top_k", "method", "layer")
_RENDER_KEYS = ("size", "output", "colormap", "alpha")
_DATATYPES = {"scores": "FP32", "heatmap": "FP32", "heatmap_png": "BYTES", "target_class": "INT64"}


# -- server and model metadata ------------------------------------------------------------------
@router.get("/v2")
async def server_metadata() -> dict[str, Any]:
    return {"name": "camserve", "version": __version__, "extensions": EXTENSIONS}


@router.get("/v2/health/live")
async def server_live() -> dict[str, bool]:
    return {"live": True}


@router.get("/v2/health/ready")
async def server_ready(repository: RepositoryDep) -> dict[str, bool]:
    reason = repository.not_ready_reason()
    if reason is not None:
        raise NotReady(reason)
    return {"ready": True}


def check_version(name: str, version: str | None) -> None:
    if version is not None and version != VERSION:
        raise ModelNotFound(f"model {name!r} has no version {version!r}; versions: {VERSION}")


def metadata(served: ServedModel) -> dict[str, Any]:
    m = served.model
    assert m is not None
    h, w = m.preprocess.input_size
    outputs = [{"name": "scores", "datatype": "FP32", "shape": [-1, m.num_classes]}]
    if m.explainable:
        outputs += [{"name": "heatmap", "datatype": "FP32", "shape": [-1, -1, -1, -1]},
                    {"name": "heatmap_png", "datatype": "BYTES", "shape": [-1, -1]},
                    {"name": "target_class", "datatype": "INT64", "shape": [-1, -1]}]
    # Triton's platform names: what runs the model.
    platform = "onnxruntime_onnx" if m.engine.runtime is not None and m.spec.kind == "onnx" else "pytorch"
    return {"name": served.name, "versions": [VERSION], "platform": platform,
            "inputs": [{"name": "image", "datatype": "BYTES", "shape": [-1]},
                       {"name": "pixels", "datatype": "FP32", "shape": [-1, 3, h, w]}],
            "outputs": outputs}


@router.get("/v2/models/{name}")
async def model_metadata(name: str, repository: RepositoryDep) -> dict[str, Any]:
    return metadata(repository.get(name))


@router.get("/v2/models/{name}/versions/{version}")
async def model_version_metadata(name: str, version: str, repository: RepositoryDep) -> dict[str, Any]:
    check_version(name, version)
    return metadata(repository.get(name))


def _model_ready(repository: ModelRepository, name: str, version: str | None) -> dict[str, Any]:
    check_version(name, version)
    served = repository.get(name)  # 404 unknown or unloaded, 503 loading, failed or draining
    return {"name": served.name, "ready": True}


@router.get("/v2/models/{name}/ready")
async def model_ready(name: str, repository: RepositoryDep) -> dict[str, Any]:
    return _model_ready(repository, name, None)


@router.get("/v2/models/{name}/versions/{version}/ready")
async def model_version_ready(name: str, version: str, repository: RepositoryDep) -> dict[str, Any]:
    return _model_ready(repository, name, version)


# -- inference ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Wanted:
    """One requested output: its name, whether it travels as binary, and its rendering options."""

    name: str
    binary: bool
    render: dict[str, Any]


def _object(value: Any, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidInput(f"{what} must be a JSON object, got {type(value).__name__}")
    return value


def _bool(value: Any, what: str) -> bool:
    if not isinstance(value, bool):
        raise InvalidInput(f"{what} must be true or false, got {value!r}")
    return value


# No input holds more elements than this (64 images of 40 MP, RGB): a shape beyond it is refused before
# anything multiplies it in fixed-width integers, where it could wrap around.
MAX_ELEMENTS = 2**40


def _shape(value: Any, name: str) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                 for d in value):
        raise InvalidInput(f"input {name!r}: `shape` must be a list of non-negative integers, got {value!r}")
    if math.prod(value) > MAX_ELEMENTS:  # Python integers: exact, whatever the size
        raise InvalidInput(f"input {name!r}: `shape` {value} holds {math.prod(value)} elements, more than any "
                           f"request may ({MAX_ELEMENTS})")
    return value


def _flatten(data: Any, name: str) -> list[Any]:
    """Row-major elements of JSON tensor data, flat or nested."""
    if not isinstance(data, list):
        raise InvalidInput(f"input {name!r}: `data` must be a list, got {type(data).__name__}")
    out: list[Any] = []
    stack = [iter(data)]
    while stack:
        item = next(stack[-1], _END)
        if item is _END:
            stack.pop()
        elif isinstance(item, list):
            if len(stack) > 8:
                raise InvalidInput(f"input {name!r}: `data` is nested too deeply")
            stack.append(iter(item))
        else:
            out.append(item)
    return out


_END = object()


def _images_input(tensor: dict[str, Any], shape: list[int], raw: bytes | None) -> list[ImageInput]:
    if tensor.get("datatype") != "BYTES":
        raise InvalidInput(f"input 'image' must have datatype BYTES (encoded image files), got "
                           f"{tensor.get('datatype')!r}")
    if len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] != 1):
        raise InvalidInput(f"input 'image' must have shape [N] or [N, 1], got {shape}")
    n = shape[0]
    if raw is not None:
        return list(binary.unpack_bytes(raw, n, "image"))
    texts = _flatten(tensor["data"], "image")
    if len(texts) != n:
        raise InvalidInput(f"input 'image': {len(texts)} elements in `data`, its shape {shape} says {n}")
    if not all(isinstance(t, str) for t in texts):
        raise InvalidInput("input 'image': in JSON, each element must be base64 text of an image file")
    return [decode_base64(t, i) for i, t in enumerate(texts)]


def _pixels_input(tensor: dict[str, Any], shape: list[int], raw: bytes | None) -> list[ImageInput]:
    datatype = tensor.get("datatype")
    if datatype not in ("FP32", "UINT8"):
        raise InvalidInput(f"input 'pixels' must have datatype FP32 (normalised) or UINT8, got {datatype!r}")
    if len(shape) != 4 or shape[1] != 3:
        raise InvalidInput(f"input 'pixels' must have shape [N, 3, H, W], got {shape}")
    if raw is not None:
        array = binary.unpack_numbers(raw, datatype, shape, "pixels")
    else:
        values = _flatten(tensor["data"], "pixels")
        if len(values) != math.prod(shape):
            raise InvalidInput(f"input 'pixels': {len(values)} elements in `data`, its shape {shape} says "
                               f"{math.prod(shape)}")
        if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
            raise InvalidInput("input 'pixels': `data` must hold numbers")
        if datatype == "UINT8" and not all(isinstance(v, int) and 0 <= v <= 255 for v in values):
            raise InvalidInput("input 'pixels': UINT8 data must be integers in 0..255")
        array = np.asarray(values, dtype=binary.NUMPY_TYPES[datatype]).reshape(shape)
    tensor_data = torch.from_numpy(np.array(array, dtype=np.uint8 if datatype == "UINT8" else np.float32))
    return list(tensor_data.unbind(0))


def parse_inputs(header: dict[str, Any], chunks: binary.Chunks) -> list[ImageInput]:
    inputs = header.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise InvalidInput(f"`inputs` must be a non-empty list of tensors; valid inputs: {', '.join(INPUTS)}")
    images: list[ImageInput] | None = None
    seen = None
    for tensor in inputs:
        if not isinstance(tensor, dict):
            raise InvalidInput("each of `inputs` must be a JSON object")
        name = tensor.get("name")
        if name not in INPUTS:
            raise InvalidInput(f"unknown input {name!r}; valid inputs: {', '.join(INPUTS)}")
        shape = _shape(tensor.get("shape"), name)
        params = _object(tensor.get("parameters"), f"input {name!r}: `parameters`")
        raw: bytes | None = None
        if "binary_data_size" in params:
            if "data" in tensor:
                raise InvalidInput(f"input {name!r} has both `data` and `binary_data_size`")
            raw = chunks.take(params["binary_data_size"], name)
        elif "data" not in tensor:
            raise InvalidInput(f"input {name!r} has neither `data` nor `parameters.binary_data_size`")
        if images is not None:
            raise InvalidInput(f"input {name!r} is given twice" if name == seen else
                               "send one input, `image` or `pixels`, not both")
        seen = name
        parsed = _images_input(tensor, shape, raw) if name == "image" else _pixels_input(tensor, shape, raw)
        images = parsed
    chunks.finish()
    assert images is not None
    if not images:
        raise InvalidInput("no image given: the input's first dimension is 0")
    return images


def _options(params: dict[str, Any], keys: Sequence[str], where: str) -> dict[str, Any]:
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
            if (not isinstance(value, list) or not value
                    or not all(isinstance(t, int | str) and not isinstance(t, bool) for t in value)):
                raise InvalidArgument("targets", f"{where}`targets` must be class indices or labels (a list or a "
                                      f"comma-separated string), got {params[key]!r}")
        elif key == "top_k":
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


def parse_outputs(header: dict[str, Any], params: dict[str, Any], explainable: bool) -> list[Wanted]:
    default_binary = _bool(params.get("binary_data_output", False), "parameter `binary_data_output`")
    requested = header.get("outputs")
    names = OUTPUTS if explainable else ("scores",)
    if requested is None:
        return [Wanted(n, default_binary, {}) for n in names]
    if not isinstance(requested, list):
        raise InvalidInput("`outputs` must be a list of requested outputs")
    wanted: list[Wanted] = []
    for item in requested:
        if not isinstance(item, dict):
            raise InvalidInput("each of `outputs` must be a JSON object")
        name = item.get("name")
        if name not in names:
            raise InvalidInput(f"unknown output {name!r}; valid outputs: {', '.join(names)}")
        if any(w.name == name for w in wanted):
            raise InvalidInput(f"output {name!r} is requested twice")
        oparams = _object(item.get("parameters"), f"output {name!r}: `parameters`")
        allowed = {"binary_data", *(_RENDER_KEYS if name == "heatmap_png" else
                                    ("size",) if name == "heatmap" else ())}
        extra = sorted(set(oparams) - allowed)
        if extra:
            explain_only = set(extra) & {*_EXPLAIN_KEYS, *_RENDER_KEYS}
            hint = (" (what to explain is chosen once per request: put it in the request's `parameters`)"
                    if explain_only else "")
            raise InvalidInput(f"output {name!r}: unknown parameter(s) {', '.join(extra)}; valid: "
                               f"{', '.join(sorted(allowed))}{hint}")
        use_binary = _bool(oparams.get("binary_data", default_binary), f"output {name!r}: `binary_data`")
        wanted.append(Wanted(str(name), use_binary, _options(oparams, _RENDER_KEYS, f"output {name!r}: ")))
    if not wanted:
        raise InvalidInput(f"`outputs` is empty; valid outputs: {', '.join(names)}")
    return wanted


@dataclass(frozen=True)
class Passes:
    """The data plane runs one request needs. ``main`` always runs (it gives the scores and the
    classes); ``png`` is where ``heatmap_png`` comes from: ``"arrays"`` (encoded from ``main``'s
    heatmap arrays), ``"main"`` (``main`` renders PNGs), or a second plan when neither can."""

    main: Plan
    png: Plan | str | None = None


def _top(plan: Plan, top: int) -> Plan:
    assert plan.query is not None
    if plan.query.classes:
        return plan
    return dataclasses.replace(plan, query=dataclasses.replace(plan.query, top=top))


def plan_passes(dataplane: DataPlane, model: str, n: int, params: dict[str, Any], wanted: list[Wanted]) -> Passes:
    by_name = {w.name: w for w in wanted}
    if not by_name.keys() & {"heatmap", "heatmap_png", "target_class"}:
        if params.keys() & {*_EXPLAIN_KEYS, *_RENDER_KEYS} - {"top_k"}:
            # Checked as if a heatmap were asked for, so a typo in an option is a 400 whatever the outputs.
            plan_passes(dataplane, model, n, params, [Wanted("heatmap", False, {})])
        return Passes(dataplane.plan(model, n))
    served = dataplane.repository.get(model)
    assert served.model is not None
    request_opts = _options(params, (*_EXPLAIN_KEYS, *_RENDER_KEYS), "")
    top = request_opts.pop("top_k", 1)
    limit = min(served.model.num_classes, MAX_TARGETS)
    if not 1 <= top <= limit:
        raise InvalidArgument("top_k", f"`top_k` (classes explained per image) must be between 1 and {limit}, "
                              f"got {top}")
    base = {"size": "input", "output": "png", **request_opts}

    def options(render: dict[str, Any], output: str) -> ExplainOptions:
        merged = {**base, **render}
        return ExplainOptions(method=merged.get("method"), layer=merged.get("layer"),
                              targets=tuple(merged.get("targets", ())), output=output,  # type: ignore[arg-type]
                              size=merged["size"], colormap=merged.get("colormap", "jet"),
                              alpha=merged.get("alpha", 0.5))

    def planned(opts: ExplainOptions) -> Plan:
        return _top(dataplane.plan(model, n, explain=opts), top)

    heat, png = by_name.get("heatmap"), by_name.get("heatmap_png")
    png_opts = None
    if png is not None:
        output = png.render.get("output", base["output"])
        if output not in ("png", "overlay"):
            raise InvalidArgument("output", f"`output` of heatmap_png must be png or overlay, got {output!r}")
        png_opts = options(png.render, output)
    if heat is None:
        # target_class alone needs no rendering worth the name: the layer's grid is the smallest.
        return Passes(planned(png_opts or options({"size": "feature"}, "array")), "main" if png else None)
    main_opts = options(heat.render, "array")
    main = planned(main_opts)
    if png_opts is None:
        return Passes(main)
    if png_opts.output == "png" and png_opts.size == main_opts.size:
        return Passes(main, "arrays")
    return Passes(main, planned(png_opts))


def _png_from_array(array: np.ndarray) -> bytes:
    # The same levels as the renderer's png output: round(value * 255) of the float32 map.
    return encode_png(np.round(array * np.float32(255)).astype(np.uint8))


def _heatmaps(results: list[ImageResult], size: str) -> np.ndarray:
    maps = [np.stack([e.heatmap.data for e in r.explanations or ()]) for r in results]
    shapes = {m.shape for m in maps}
    if len(shapes) > 1:
        raise InvalidArgument("size", f"output 'heatmap' at size {size!r} needs every image to give the same "
                              f"shape, got {sorted(shapes)}; ask for size input or feature")
    return np.stack(maps).astype(np.float32, copy=False)


def _encode(name: str, array: np.ndarray | list[bytes], shape: list[int], as_binary: bool) -> tuple[dict[str, Any],
                                                                                                 bytes | None]:
    datatype = _DATATYPES[name]
    entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": shape}
    if isinstance(array, list):  # BYTES
        if as_binary:
            raw = binary.pack_bytes(array)
            entry["parameters"] = {"binary_data_size": len(raw)}
            return entry, raw
        entry["data"] = [base64.b64encode(b).decode() for b in array]
        return entry, None
    if as_binary:
        raw = binary.pack_numbers(array, datatype)
        entry["parameters"] = {"binary_data_size": len(raw)}
        return entry, raw
    entry["data"] = array.ravel().tolist()
    return entry, None


def encode_response(header: dict[str, Any], model: str, wanted: list[Wanted], results: list[ImageResult],
                    png_results: list[ImageResult] | None, passes: Passes) -> tuple[bytes, int | None]:
    """The response body and, when some output is binary, the JSON header's length. CPU-bound: runs
    in the CPU pool."""
    outputs: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    n = len(results)
    arrays: np.ndarray | None = None
    for w in wanted:
        data: np.ndarray | list[bytes]
        if w.name == "scores":
            data = np.asarray([r.scores for r in results], dtype=np.float32)
            shape = list(data.shape)
        elif w.name == "target_class":
            data = np.asarray([[e.index for e in r.explanations or ()] for r in results], dtype=np.int64)
            shape = list(data.shape)
        elif w.name == "heatmap":
            arrays = arrays if arrays is not None else _heatmaps(results, passes.main.spec.size)  # type: ignore[union-attr]
            data, shape = arrays, list(arrays.shape)
        elif passes.png == "arrays":  # heatmap_png, encoded from the heatmap arrays
            arrays = arrays if arrays is not None else _heatmaps(results, passes.main.spec.size)  # type: ignore[union-attr]
            data = [_png_from_array(m) for image in arrays for m in image]
            shape = [n, arrays.shape[1]]
        else:  # heatmap_png, rendered by the pipeline
            per_image = [[e.heatmap.data for e in r.explanations or ()] for r in png_results or results]
            data = [b for image in per_image for b in image]  # type: ignore[misc]
            shape = [n, len(per_image[0])]
        entry, raw = _encode(w.name, data, shape, w.binary)
        outputs.append(entry)
        if raw is not None:
            blobs.append(raw)
    reply: dict[str, Any] = {"model_name": model, "model_version": VERSION, "outputs": outputs}
    if isinstance(header.get("id"), str):
        reply["id"] = header["id"]
    text = json.dumps(reply, separators=(",", ":")).encode()
    if not blobs:
        return text, None
    return b"".join([text, *blobs]), len(text)


async def read_body(request: Request, limit: int) -> bytes:
    return binary.decompress(await request.body(), request.headers.get("content-encoding"), limit)


async def _infer(request: Request, name: str, version: str | None, dataplane: DataPlane, limit: int) -> Response:
    check_version(name, version)
    body = await read_body(request, limit)
    raw_header, rest = binary.split(body, request.headers.get(binary.HEADER))
    header = json_object(raw_header, "the inference request")
    params = _object(header.get("parameters"), "`parameters`")
    unknown = sorted(set(params) - {*_EXPLAIN_KEYS, *_RENDER_KEYS, *_IGNORED})
    if unknown:
        raise InvalidInput(f"unknown parameter(s) {', '.join(unknown)}; valid: "
                           f"{', '.join((*_EXPLAIN_KEYS, *_RENDER_KEYS, 'binary_data_output'))}")
    served = dataplane.repository.get(name)  # an unknown model is a 404 before its inputs are read
    assert served.model is not None
    wanted = parse_outputs(header, params, served.model.explainable)
    images = parse_inputs(header, binary.Chunks(rest))
    passes = plan_passes(dataplane, name, len(images), params, wanted)
    note_request(request.scope, model=name, images=len(images))
    plans = [passes.main, *([passes.png] if isinstance(passes.png, Plan) else [])]

    async def run_all() -> list[InferenceResult]:
        return list(await asyncio.gather(*(dataplane.run(p, images) for p in plans)))

    done = await unless_disconnected(request, run_all())
    png_results = done[1].results if len(done) > 1 else None
    args = (header, name, wanted, done[0].results, png_results, passes)
    if passes.png == "arrays" or any(heavy(r) for r in done):
        # PNG encoding, or megabytes of floats or PNGs: on the loop it would stall every other request.
        loop = asyncio.get_running_loop()
        content, header_length = await loop.run_in_executor(dataplane.repository.cpu_pool, encode_response, *args)
    else:  # a few kilobytes: a hop to the CPU pool (queued behind decodes) would cost more than it saves
        content, header_length = encode_response(*args)
    if header_length is None:
        return Response(content, media_type="application/json")
    return Response(content, media_type="application/octet-stream",
                    headers={"Inference-Header-Content-Length": str(header_length)})


@router.post("/v2/models/{name}/infer")
async def infer(name: str, request: Request, dataplane: DataPlaneDep, settings: SettingsDep) -> Response:
    return await _infer(request, name, None, dataplane, settings.max_body_bytes)


@router.post("/v2/models/{name}/versions/{version}/infer")
async def infer_version(name: str, version: str, request: Request, dataplane: DataPlaneDep,
                        settings: SettingsDep) -> Response:
    return await _infer(request, name, version, dataplane, settings.max_body_bytes)
