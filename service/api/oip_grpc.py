"""The Open Inference Protocol over gRPC: ``inference.GRPCInferenceService`` as KServe and Triton define
it, on the data plane every other front-end uses. What the protocol means is in ``oip.py``, shared with
the REST binding; this module reads and writes protobuf messages (``grpc_gen/``, generated).

- Tensors travel in ``raw_input_contents`` / ``raw_output_contents`` (numbers little-endian, BYTES
  elements length-prefixed as in the REST binary extension), or as typed ``contents`` in a request.
- Parameters are the REST route's (``targets``, ``top_k``, ``method``, ``layer``, ``size``, ...); a
  list of targets is a comma-separated string, one target may be an integer.
- Keys are read from call metadata (``authorization: Bearer <key>`` or ``x-api-key``): with API keys
  configured, everything but ``ServerLive`` and ``ServerReady`` needs one; the repository RPCs need an
  admin key as their REST routes do.
- Domain errors become status codes through ``api.errors.GRPC_CODES``, with the REST messages. A call
  whose deadline passes is cancelled: its images leave the batch queue.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

import grpc
import numpy as np

from service.api import oip
from service.api.errors import grpc_code_of
from service.api.grpc_gen import grpc_predict_v2_pb2 as pb
from service.api.grpc_gen import grpc_predict_v2_pb2_grpc as pb_grpc
from service.api.oip import VERSION, InputTensor, OutputTensor
from service.api.oip_repository import check_admin_key, entry, given_key, key_matches, load_model
from service.config import Settings
from service.dataplane import DataPlane
from service.errors import CamserveError, Forbidden, InvalidInput, Overloaded, Unauthorized
from service.metrics import Metrics

log = logging.getLogger("camserve.api")

SERVICE = "inference.GRPCInferenceService"
Req = TypeVar("Req")
Resp = TypeVar("Resp")
Handler = Callable[[Any, Req, grpc.aio.ServicerContext], Awaitable[Resp]]

# Typed `contents` fields by datatype, for requests that do not use raw_input_contents.
_CONTENTS = {"BYTES": ("bytes_contents", None), "FP32": ("fp32_contents", np.float32),
             "UINT8": ("uint_contents", np.uint32)}


def _value(param: pb.InferParameter | pb.ModelRepositoryParameter, key: str) -> Any:
    kind = param.WhichOneof("parameter_choice")
    if kind is None:
        raise InvalidInput(f"parameter {key!r} has no value")
    return getattr(param, kind)


def _params(params: Mapping[str, Any]) -> dict[str, Any]:
    return {key: _value(value, key) for key, value in params.items()}


def _metadata(context: grpc.aio.ServicerContext) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in context.invocation_metadata() or ():
        if isinstance(value, str):
            out[key.lower()] = value
    return out


def _rpc(*, needs_key: bool = True) -> Callable[[Handler[Req, Resp]], Handler[Req, Resp]]:
    """Key check, domain errors to status codes, and the request metrics, around one RPC."""

    def wrap(method: Handler[Req, Resp]) -> Handler[Req, Resp]:
        endpoint = f"/{SERVICE}/{method.__name__}"

        @functools.wraps(method)
        async def rpc(self: Servicer, request: Req, context: grpc.aio.ServicerContext) -> Resp:
            started = time.perf_counter()
            model = str(getattr(request, "model_name", "") or getattr(request, "name", ""))
            code = "OK"
            try:
                if needs_key:
                    self.check_key(context)
                return await method(self, request, context)
            except CamserveError as exc:
                code = grpc_code_of(exc)
                if code == "INTERNAL":
                    log.warning("%s: %s", exc.code, exc.message, exc_info=exc.__cause__ is not None)
                if isinstance(exc, Overloaded):
                    context.set_trailing_metadata((("retry-after", str(max(1, round(exc.retry_after)))),))
                await context.abort(grpc.StatusCode[code], exc.message)
                raise  # abort raises; this line is never reached
            except asyncio.CancelledError:
                code = "CANCELLED"  # the deadline passed or the client went: nobody to answer
                raise
            except Exception as exc:
                if isinstance(exc, grpc.aio.AbortError):
                    raise
                code = "INTERNAL"
                log.exception("gRPC %s failed", endpoint)
                await context.abort(grpc.StatusCode.INTERNAL, "internal error")
                raise
            finally:
                if not any(m.name == model for m in self.repository):
                    model = ""  # label values stay the known models' names, whatever callers send
                self.metrics.requests.labels(endpoint, model, code).inc()
                self.metrics.latency.labels(endpoint, model).observe(time.perf_counter() - started)

        return rpc

    return wrap


def _input(tensor: pb.ModelInferRequest.InferInputTensor, raw: bytes | None) -> InputTensor:
    shape = oip.check_shape(list(tensor.shape), tensor.name)
    if raw is not None:
        return InputTensor(tensor.name, tensor.datatype, shape, raw=raw)
    field, dtype = _CONTENTS.get(tensor.datatype, (None, None))
    if field is None:  # a datatype no input takes: let the shared checks name it
        return InputTensor(tensor.name, tensor.datatype, shape, data=[])
    values = getattr(tensor.contents, field)
    return InputTensor(tensor.name, tensor.datatype, shape,
                       data=list(values) if dtype is None else np.asarray(values, dtype=dtype))


def _inputs(request: pb.ModelInferRequest) -> list[InputTensor]:
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise InvalidInput(f"`raw_input_contents` has {len(raw)} entries for {len(request.inputs)} inputs; "
                           "send one per input, or none and each input's `contents`")
    return [_input(t, raw[i] if raw else None) for i, t in enumerate(request.inputs)]


def _response(request: pb.ModelInferRequest, tensors: list[OutputTensor]) -> pb.ModelInferResponse:
    return pb.ModelInferResponse(
        model_name=request.model_name, model_version=VERSION, id=request.id,
        outputs=[pb.ModelInferResponse.InferOutputTensor(name=t.name, datatype=t.datatype, shape=t.shape)
                 for t in tensors],
        raw_output_contents=[t.raw() for t in tensors])


class Servicer(pb_grpc.GRPCInferenceServiceServicer):
    """``inference.GRPCInferenceService`` on a data plane; one per server."""

    def __init__(self, settings: Settings, dataplane: DataPlane, metrics: Metrics,
                 repository_fixed: str | None = None) -> None:
        self.settings = settings
        self.repository_fixed = repository_fixed  # why loads and unloads are refused (a Ray Serve replica)
        self.dataplane = dataplane
        self.repository = dataplane.repository
        self.metrics = metrics
        self.keys = settings.all_api_keys()
        self.any_keys = self.keys + settings.admin_api_keys

    def _given(self, context: grpc.aio.ServicerContext) -> str | None:
        meta = _metadata(context)
        return given_key(meta.get("authorization"), meta.get("x-api-key"))

    def check_changeable(self) -> None:
        if self.repository_fixed:
            raise Forbidden(self.repository_fixed)

    def check_key(self, context: grpc.aio.ServicerContext) -> None:
        if self.keys and not key_matches(self._given(context), self.any_keys):
            raise Unauthorized("a valid API key is required: send `authorization: Bearer <key>` or "
                               "`x-api-key: <key>` metadata")

    # -- health and metadata ----------------------------------------------------------------------
    @_rpc(needs_key=False)
    async def ServerLive(self, request: pb.ServerLiveRequest,
                         context: grpc.aio.ServicerContext) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    @_rpc(needs_key=False)
    async def ServerReady(self, request: pb.ServerReadyRequest,
                          context: grpc.aio.ServicerContext) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.repository.not_ready_reason() is None)

    @_rpc()
    async def ModelReady(self, request: pb.ModelReadyRequest,
                         context: grpc.aio.ServicerContext) -> pb.ModelReadyResponse:
        oip.check_version(request.name, request.version)
        try:
            ready = self.repository.find(request.name).ready
        except CamserveError:
            ready = False
        return pb.ModelReadyResponse(ready=ready)

    @_rpc()
    async def ServerMetadata(self, request: pb.ServerMetadataRequest,
                             context: grpc.aio.ServicerContext) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(**oip.server_metadata())

    @_rpc()
    async def ModelMetadata(self, request: pb.ModelMetadataRequest,
                            context: grpc.aio.ServicerContext) -> pb.ModelMetadataResponse:
        oip.check_version(request.name, request.version)
        meta = oip.metadata(self.repository.get(request.name))
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(name=meta["name"], versions=meta["versions"], platform=meta["platform"],
                                        inputs=[tensor(**t) for t in meta["inputs"]],
                                        outputs=[tensor(**t) for t in meta["outputs"]])

    # -- inference --------------------------------------------------------------------------------
    @_rpc()
    async def ModelInfer(self, request: pb.ModelInferRequest,
                         context: grpc.aio.ServicerContext) -> pb.ModelInferResponse:
        name = request.model_name
        oip.check_version(name, request.model_version)
        params = _params(request.parameters)
        oip.check_parameters(params)
        served = self.repository.get(name)  # an unknown model is NOT_FOUND before its inputs are read
        assert served.model is not None
        requested = [(o.name, _params(o.parameters)) for o in request.outputs] or None
        wanted = oip.parse_outputs(requested, True, served.model)
        inputs = oip.parse_inputs(_inputs(request))
        passes = oip.plan_passes(self.dataplane, name, inputs, params, wanted)
        # A call whose deadline passes or whose client goes is cancelled by grpcio: the data plane then
        # cancels its work, and its images leave the batch queue.
        return await oip.infer(self.dataplane, passes, inputs, wanted,
                               lambda tensors: _response(request, tensors))

    # -- model repository -------------------------------------------------------------------------
    @_rpc(needs_key=False)  # the admin key is checked instead
    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest,
                              context: grpc.aio.ServicerContext) -> pb.RepositoryIndexResponse:
        check_admin_key(self._given(context), self.settings)
        models = [pb.RepositoryIndexResponse.ModelIndex(**entry(m)) for m in self.repository
                  if m.ready or not request.ready]
        return pb.RepositoryIndexResponse(models=models)

    @_rpc(needs_key=False)
    async def RepositoryModelLoad(self, request: pb.RepositoryModelLoadRequest,
                                  context: grpc.aio.ServicerContext) -> pb.RepositoryModelLoadResponse:
        check_admin_key(self._given(context), self.settings)
        self.check_changeable()
        await load_model(self.repository, self.settings, request.model_name, _params(request.parameters))
        return pb.RepositoryModelLoadResponse()

    @_rpc(needs_key=False)
    async def RepositoryModelUnload(self, request: pb.RepositoryModelUnloadRequest,
                                    context: grpc.aio.ServicerContext) -> pb.RepositoryModelUnloadResponse:
        check_admin_key(self._given(context), self.settings)
        self.check_changeable()
        log.info("repository API: unloading model %r", request.model_name)
        await self.repository.unload(request.model_name)
        return pb.RepositoryModelUnloadResponse()
