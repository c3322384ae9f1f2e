"""The Open Inference Protocol ("V2": KServe, Triton, Seldon MLServer) over REST: JSON tensors, or the
binary tensor data extension (``binary.py``). What the protocol means (inputs, outputs, parameters,
passes) is in ``oip.py``, shared with the gRPC binding; this module reads and writes the REST wire.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Coroutine
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from service.api import binary, oip
from service.api.deps import DataPlaneDep, RepositoryDep, SettingsDep
from service.api.middleware import note_request
from service.api.oip import VERSION, InputTensor, OutputTensor, Wanted
from service.api.parsing import decode_base64, json_object
from service.api.routes import unless_disconnected
from service.dataplane import DataPlane
from service.errors import InvalidInput
from service.registry import LoadedModel
from service.results import InferenceResult

# Not in camserve's OpenAPI document: these routes follow the protocol's own specification (KServe's
# open_inference_rest.yaml), and their errors are that dialect's, not camserve's documented ones.
router = APIRouter(tags=["open inference protocol (v2)"], include_in_schema=False)


# -- server and model metadata ------------------------------------------------------------------
# REST also serves Triton's model configuration and statistics extensions (oip_model_info.py).
EXTENSIONS = [*oip.EXTENSIONS, "model_configuration", "statistics"]


@router.get("/v2")
async def server_metadata() -> dict[str, Any]:
    return oip.server_metadata(EXTENSIONS)


@router.get("/v2/health/live")
async def server_live() -> dict[str, bool]:
    return {"live": True}


@router.get("/v2/health/ready")
async def server_ready(repository: RepositoryDep) -> dict[str, bool]:
    oip.check_server_ready(repository)
    return {"ready": True}


@router.get("/v2/models/{name}")
async def model_metadata(name: str, repository: RepositoryDep) -> dict[str, Any]:
    return oip.metadata(repository.get(name))


@router.get("/v2/models/{name}/versions/{version}")
async def model_version_metadata(name: str, version: str, repository: RepositoryDep) -> dict[str, Any]:
    oip.check_version(name, version)
    return oip.metadata(repository.get(name))


@router.get("/v2/models/{name}/ready")
async def model_ready(name: str, repository: RepositoryDep) -> dict[str, Any]:
    return {"name": oip.ready_model(repository, name, None).name, "ready": True}


@router.get("/v2/models/{name}/versions/{version}/ready")
async def model_version_ready(name: str, version: str, repository: RepositoryDep) -> dict[str, Any]:
    return {"name": oip.ready_model(repository, name, version).name, "ready": True}


# -- inference: JSON header and binary section --------------------------------------------------
def _object(value: Any, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidInput(f"{what} must be a JSON object, got {type(value).__name__}")
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


def _input(tensor: Any, chunks: binary.Chunks) -> InputTensor:
    if not isinstance(tensor, dict):
        raise InvalidInput("each of `inputs` must be a JSON object")
    name = tensor.get("name")
    if name not in oip.ALL_INPUTS:
        raise InvalidInput(f"unknown input {name!r}; valid inputs: {', '.join(oip.ALL_INPUTS)}")
    shape = oip.check_shape(tensor.get("shape"), name)
    params = _object(tensor.get("parameters"), f"input {name!r}: `parameters`")
    datatype = tensor.get("datatype")
    if "binary_data_size" in params:
        if "data" in tensor:
            raise InvalidInput(f"input {name!r} has both `data` and `binary_data_size`")
        return InputTensor(name, datatype, shape, raw=chunks.take(params["binary_data_size"], name))
    if "data" not in tensor:
        raise InvalidInput(f"input {name!r} has neither `data` nor `parameters.binary_data_size`")
    data = _flatten(tensor["data"], name)
    if name in ("image", "target_mask") and datatype == "BYTES":  # in JSON a BYTES element is base64 text
        if not all(isinstance(t, str) for t in data):
            raise InvalidInput(f"input {name!r}: in JSON, each element must be base64 text of an image file")
        data = [decode_base64(t, i) for i, t in enumerate(data)]
    return InputTensor(name, datatype, shape, data=data)


def parse_inputs(header: dict[str, Any], chunks: binary.Chunks) -> oip.Inputs:
    inputs = header.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise InvalidInput(f"`inputs` must be a non-empty list of tensors; valid inputs: {', '.join(oip.INPUTS)}")
    tensors = [_input(t, chunks) for t in inputs]
    chunks.finish()
    return oip.parse_inputs(tensors)


def parse_outputs(header: dict[str, Any], params: dict[str, Any], model: LoadedModel) -> list[Wanted]:
    default_binary = oip.check_bool(params.get("binary_data_output", False), "parameter `binary_data_output`")
    requested = header.get("outputs")
    if requested is None:
        return oip.parse_outputs(None, default_binary, model)
    if not isinstance(requested, list):
        raise InvalidInput("`outputs` must be a list of requested outputs")
    items = []
    for item in requested:
        if not isinstance(item, dict):
            raise InvalidInput("each of `outputs` must be a JSON object")
        name = item.get("name")
        if name not in oip.output_names(model):
            raise InvalidInput(f"unknown output {name!r}; valid outputs: {', '.join(oip.output_names(model))}")
        items.append((name, _object(item.get("parameters"), f"output {name!r}: `parameters`")))
    return oip.parse_outputs(items, default_binary, model)


def encode_response(header: dict[str, Any], model: str, wanted: list[Wanted],
                    tensors: list[OutputTensor]) -> tuple[bytes, int | None]:
    """The response body and, when some output is binary, the JSON header's length."""
    outputs: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for w, t in zip(wanted, tensors, strict=True):
        entry: dict[str, Any] = {"name": t.name, "datatype": t.datatype, "shape": t.shape}
        if w.binary:
            raw = t.raw()
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        elif isinstance(t.data, list):  # BYTES in JSON: base64 text
            entry["data"] = [base64.b64encode(b).decode() for b in t.data]
        else:
            entry["data"] = t.data.ravel().tolist()
        outputs.append(entry)
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
    oip.check_version(name, version)
    body = await read_body(request, limit)
    raw_header, rest = binary.split(body, request.headers.get(binary.HEADER))
    header = json_object(raw_header, "the inference request")
    params = _object(header.get("parameters"), "`parameters`")
    oip.check_parameters(params)
    served = dataplane.repository.get(name)  # an unknown model is a 404 before its inputs are read
    assert served.model is not None
    wanted = parse_outputs(header, params, served.model)
    inputs = parse_inputs(header, binary.Chunks(rest))
    passes = oip.plan_passes(dataplane, name, inputs, params, wanted)
    note_request(request.scope, model=name, images=len(inputs.images))

    def guard(work: Coroutine[Any, Any, list[InferenceResult]]) -> Coroutine[Any, Any, list[InferenceResult]]:
        return unless_disconnected(request, work)

    content, header_length = await oip.infer(
        dataplane, passes, inputs, wanted, lambda tensors: encode_response(header, name, wanted, tensors), guard)
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
