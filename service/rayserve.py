"""Scale out on Ray Serve: every replica runs the whole camserve app behind Serve's HTTP proxy.

The only module that imports ``ray``. A replica is ``create_app(settings)`` wrapped with
``serve.ingress``, so it runs the same lifespan (models, batchers, warm-up) and endpoints as a plain
server; this module adds only what a replica needs to be a good Serve citizen:

- ``max_ongoing_requests`` sized from ``max_batch_size``: Serve's default (5) would cap every batch at 5;
- torch threads and the decode pool sized from the replica's ``num_cpus``, not the node's cores, so
  replicas sharing a node do not oversubscribe it;
- ``check_health`` that fails while the replica's models are not ready;
- the model repository API read-only: a load or unload would reach one replica only;
- GPUs asked of Ray when a model wants CUDA (Ray hides the GPUs of actors that did not ask for one);
- the proxy: bounded request heads and a 503 with ``Retry-After`` when no replica can answer
  (``service.api.ray_proxy``, installed through :func:`proxy_environment`);
- a stop that deletes the application before Serve itself, so in-flight requests finish (:func:`stop`);
- the Open Inference Protocol over gRPC through Serve's gRPC proxy: the replica has a method per RPC of
  ``inference.GRPCInferenceService``, which the proxy calls with the request message (see
  :func:`grpc_options`); the answers, status codes and messages are the plain server's.

Use it as a Serve application builder::

    serve run service.rayserve:build_app config=models.toml replicas=2 num_cpus=1
    serve run service.rayserve:build_app min_replicas=1 max_replicas=4 num_gpus=0.5

or through ``camserve serve --ray`` (``serve_forever`` below).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from types import FrameType
from typing import TYPE_CHECKING, Any

from ray import serve

from service.api.ray_proxy import CALLBACK, REPLICA_HEADER
from service.config import ConfigError, Settings, load_settings

if TYPE_CHECKING:
    from fastapi import FastAPI
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

    from service.api.oip_grpc import Servicer

log = logging.getLogger("camserve.ray")

__all__ = ["APP_NAME", "GRPC_RPCS", "GRPC_SERVICER", "REPLICA_HEADER", "CamServe", "DeployFailed", "ReplicaOptions",
           "build", "build_app", "deploy", "grpc_options", "proxy_environment", "serve_forever", "stop_serving"]

APP_NAME = "camserve"
# Why the repository API's load and unload are refused on a replica (the index still answers).
REPOSITORY_FIXED = ("the model repository API cannot load or unload models under Ray Serve: each replica has its "
                    "own models and the change would reach only the replica that took this request; change the "
                    "config and redeploy (`serve deploy`, or restart `camserve serve --ray`)")


class DeployFailed(RuntimeError):
    """The Serve application did not reach RUNNING: a replica failed to start, or it timed out."""


def models_ready(app: FastAPI) -> bool:
    """Whether this replica should take traffic: every model loaded and warm, and not draining."""
    return bool(app.state.repository.ready)


def replica_threads(num_cpus: float) -> int:
    """Threads for a replica granted ``num_cpus`` (fractions allowed): at least one."""
    return max(1, math.ceil(num_cpus))


@dataclass(frozen=True)
class ReplicaOptions:
    """How many replicas and what each asks of Ray. ``min_replicas``/``max_replicas`` autoscale."""

    replicas: int = 1
    min_replicas: int | None = None
    max_replicas: int | None = None
    num_cpus: float = 1.0
    num_gpus: float | None = None  # None: one GPU if any model's device is CUDA, else none

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise ConfigError(f"`replicas` must be at least 1, got {self.replicas}")
        if (self.min_replicas is None) != (self.max_replicas is None):
            raise ConfigError("`min_replicas` and `max_replicas` go together")
        if self.min_replicas is not None and self.max_replicas is not None and (
                self.min_replicas < 0 or self.max_replicas < max(1, self.min_replicas)):
            raise ConfigError(f"autoscaling needs 0 <= min_replicas <= max_replicas and max_replicas >= 1, "
                              f"got {self.min_replicas}, {self.max_replicas}")
        if self.num_cpus <= 0:
            raise ConfigError(f"`num_cpus` must be positive, got {self.num_cpus}")
        if self.num_gpus is not None and self.num_gpus < 0:
            raise ConfigError(f"`num_gpus` must not be negative, got {self.num_gpus}")

    @property
    def autoscaling(self) -> bool:
        return self.min_replicas is not None

    @classmethod
    def from_args(cls, args: Mapping[str, Any]) -> ReplicaOptions:
        """From builder arguments, which ``serve run key=value`` passes as strings."""
        if "replicas" in args and ("min_replicas" in args or "max_replicas" in args):
            raise ConfigError("give `replicas` or `min_replicas`/`max_replicas`, not both")

        def number(name: str, kind: type[int] | type[float]) -> Any:
            value = args.get(name)
            if value is None:
                return None
            try:
                if kind is int and isinstance(value, float | bool):
                    raise ValueError
                return kind(value)
            except (TypeError, ValueError):
                raise ConfigError(f"`{name}` must be {kind.__name__}, got {value!r}") from None

        values = {name: number(name, kind) for name, kind in (
            ("replicas", int), ("min_replicas", int), ("max_replicas", int), ("num_cpus", float), ("num_gpus", float))}
        return cls(**{k: v for k, v in values.items() if v is not None})


def _wants_gpu(settings: Settings) -> bool:
    return any(m.device.startswith("cuda") for m in settings.models)


def deployment_options(settings: Settings, options: ReplicaOptions) -> dict[str, Any]:
    """The Serve deployment options for ``settings`` served as ``options``."""
    num_gpus = options.num_gpus if options.num_gpus is not None else (1.0 if _wants_gpu(settings) else 0.0)
    # One batch running while the next fills: twice the batch size in flight, but never more than the
    # replica's own queue would take (beyond it the replica answers 503 itself). Requests over this
    # wait in the proxy, at most max_queue of them, then the proxy sheds load with 503.
    ongoing = max(settings.max_batch_size, min(2 * settings.max_batch_size, settings.max_queue))
    opts: dict[str, Any] = {
        "name": "CamServe",
        "ray_actor_options": {"num_cpus": options.num_cpus, "num_gpus": num_gpus},
        "max_ongoing_requests": ongoing,
        "max_queued_requests": settings.max_queue,
        "graceful_shutdown_timeout_s": settings.drain_timeout_s,
    }
    if options.autoscaling:
        # Scale out once a replica holds about a full batch: batching makes that much concurrency cheap.
        opts["autoscaling_config"] = {"min_replicas": options.min_replicas, "max_replicas": options.max_replicas,
                                      "target_ongoing_requests": settings.max_batch_size}
    else:
        opts["num_replicas"] = options.replicas
    return opts


class _ReplicaHeaders:
    """Names the answering replica on every HTTP response, and leaves ``X-Request-ID`` to the proxy:
    Serve's proxy passes its request id in (which the app adopts) and always adds it to the response,
    so the app's copy would make the header appear twice."""

    def __init__(self, app: ASGIApp, replica: str) -> None:
        self.app = app
        self.header = (REPLICA_HEADER.encode(), replica.encode())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def tagged(message: Message) -> None:
            if message["type"] == "http.response.start":
                kept = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
                message["headers"] = [*kept, self.header]
            await send(message)

        await self.app(scope, receive, tagged)


# What Serve's gRPC proxy registers: the generated servicer hook of inference.GRPCInferenceService. The
# proxy routes each RPC to the replica's method of the same name, passing the deserialised request.
GRPC_SERVICER = "service.api.grpc_gen.grpc_predict_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server"
GRPC_RPCS = ("ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer",
             "RepositoryIndex", "RepositoryModelLoad", "RepositoryModelUnload")


def grpc_options(settings: Settings) -> dict[str, Any] | None:
    """Serve's ``grpc_options`` for ``settings``: its gRPC proxy on ``grpc_port``, or none when unset."""
    if settings.grpc_port is None:
        return None
    return {"port": settings.grpc_port, "grpc_servicer_functions": [GRPC_SERVICER]}


class _Relayed(Exception):
    """Raised once the status is set on Serve's context: the proxy answers with that code and details."""


class _ServeContext:
    """What ``oip_grpc.Servicer`` asks of a ``grpc.aio`` context, over the copy of the call's context that
    Serve's proxy hands the replica (``RayServegRPCContext``): metadata in, and a status or trailing
    metadata out, relayed by the proxy to the caller."""

    def __init__(self, context: Any) -> None:
        self._context = context

    def invocation_metadata(self) -> Any:
        return self._context.invocation_metadata()

    def set_trailing_metadata(self, metadata: Any) -> None:
        self._context.set_trailing_metadata(metadata)

    async def abort(self, code: Any, details: str) -> None:
        self._context.set_code(code)
        self._context.set_details(details)
        raise _Relayed(details)


def _relay(rpc: str) -> Any:
    async def method(self: CamServe, request: Any, grpc_context: Any) -> Any:
        return await getattr(self.grpc_servicer(), rpc)(request, _ServeContext(grpc_context))

    method.__name__ = method.__qualname__ = rpc
    method.__doc__ = f"``inference.GRPCInferenceService/{rpc}``, called by Serve's gRPC proxy."
    return method


def replica_settings(settings: Settings, threads: int) -> Settings:
    """A replica's settings: its CPU share, and no gRPC port (Ray Serve's proxies own the ports, and
    replicas sharing a node would each try to bind it)."""
    return dataclasses.replace(settings, cpu_threads=threads, grpc_port=None)


@serve.ingress()
class CamServe:
    """One replica: the camserve app for ``settings``, with ``threads`` CPU threads."""

    def __init__(self, settings: Settings, threads: int) -> None:
        import torch

        torch.set_num_threads(threads)
        self._settings = replica_settings(settings, threads)
        self._app: FastAPI | None = None
        self._grpc: Servicer | None = None

    def __serve_build_asgi_app__(self) -> FastAPI:
        from service.app import create_app

        app = create_app(self._settings)
        app.add_middleware(_ReplicaHeaders, replica=serve.get_replica_context().replica_id.unique_id)
        app.state.repository_fixed = REPOSITORY_FIXED
        self._app = app
        return app

    def check_health(self) -> None:
        if self._app is None or not models_ready(self._app):
            raise RuntimeError("camserve replica: models are not ready")

    def grpc_servicer(self) -> Servicer:
        """The gRPC servicer on this replica's data plane, made on the first call (after the lifespan
        has started: Serve routes no call to a replica before it is healthy)."""
        if self._grpc is None:
            from service.api.oip_grpc import Servicer

            assert self._app is not None
            state = self._app.state
            self._grpc = Servicer(self._settings, state.dataplane, state.metrics, REPOSITORY_FIXED)
        return self._grpc


# One method per RPC, named as the RPC: Serve's gRPC proxy calls replicas by the RPC's name.
for _name in GRPC_RPCS:
    setattr(CamServe, _name, _relay(_name))


def build(settings: Settings, options: ReplicaOptions) -> Any:
    """The Serve application (``serve.Application``) for already-loaded settings."""
    deployment = serve.deployment(**deployment_options(settings, options))(CamServe)
    return deployment.bind(settings, replica_threads(options.num_cpus))


def build_app(args: dict[str, Any]) -> Any:
    """Serve application builder: ``config`` (a models TOML file; default the built-in model),
    ``replicas`` or ``min_replicas``/``max_replicas``, ``num_cpus`` and ``num_gpus`` per replica."""
    unknown = set(args) - {"config", "replicas", "min_replicas", "max_replicas", "num_cpus", "num_gpus"}
    if unknown:
        raise ConfigError(f"unknown camserve arguments {sorted(unknown)}; known: config, replicas, "
                          "min_replicas, max_replicas, num_cpus, num_gpus")
    return build(load_settings(args.get("config")), ReplicaOptions.from_args(args))


def deploy(app: Any, *, name: str = APP_NAME, route_prefix: str = "/", timeout_s: float = 600.0,
           logging_config: Mapping[str, Any] | None = None) -> None:
    """Deploy ``app`` and wait, at most ``timeout_s``, until it runs. Raises :class:`DeployFailed`
    with Serve's message when a replica cannot start (Serve gives up after a few constructor
    failures) or when it is still not running by then (for example no node has the resources)."""
    target = serve.RunTarget(target=app, name=name, route_prefix=route_prefix,
                             logging_config=dict(logging_config) if logging_config else None)
    serve.run_many([target], wait_for_applications_running=False)
    deadline = time.monotonic() + timeout_s
    message = ""
    while time.monotonic() < deadline:
        status = serve.status().applications.get(name)
        if status is not None:
            # The application's message is generic; the replicas' own errors are in the deployments'.
            message = "; ".join([status.message, *(f"{name}: {d.message}" for name, d in status.deployments.items()
                                                   if d.message)])
            if status.status == "RUNNING":
                return
            if status.status == "DEPLOY_FAILED":
                raise DeployFailed(f"camserve on Ray Serve failed to start: {message}")
        time.sleep(0.5)
    raise DeployFailed(f"camserve on Ray Serve was not running after {timeout_s:.0f} s: {message}")


def proxy_environment(settings: Settings) -> dict[str, str]:
    """Environment for the Ray processes, set before Ray starts (a cluster started elsewhere needs it in
    its own environment): Serve's proxy then runs ``service.api.ray_proxy`` with these head limits.

    Serve's controller kills a proxy not ready within 5 s of its start; ours also imports the callback, and on a
    busy node (CI with three test workers) it was killed three starts in a row. 30 s is what we give it."""
    return {"RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": CALLBACK,
            "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "30",
            "SERVICE_MAX_HEADER_BYTES": str(settings.max_header_bytes),
            "SERVICE_MAX_HEADER_LINE_BYTES": str(settings.max_header_line_bytes),
            "SERVICE_MAX_HEADERS": str(settings.max_headers)}


def stop_serving(*, own_cluster: bool, name: str = APP_NAME) -> None:
    """Stop serving without dropping requests in flight: delete the application first, so its replicas
    finish what they hold (up to ``graceful_shutdown_timeout_s``, the drain timeout) while the proxy
    still relays their answers; requests arriving meanwhile get 503 with ``Retry-After`` from the
    proxy. Only then, on our own cluster, stop Serve (``serve.shutdown`` kills the proxy at once)."""
    serve.delete(name)
    if own_cluster:
        serve.shutdown()


def serve_forever(settings: Settings, options: ReplicaOptions, *, timeout_s: float = 600.0) -> int:
    """``camserve serve --ray``: start a local Ray cluster (or join ``RAY_ADDRESS``), serve through
    Serve's proxy on ``settings.host:settings.port`` until SIGTERM or Ctrl-C, then stop cleanly."""
    import ray

    address = os.environ.get("RAY_ADDRESS") or None
    if address is None:  # our own cluster: its processes inherit this environment
        for key, value in proxy_environment(settings).items():
            os.environ.setdefault(key, value)
    ray.init(address=address, logging_level=logging.WARNING)
    stop = threading.Event()

    def on_signal(sig: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        # On a joined cluster whose Serve already runs, its proxy keeps the port it was started with.
        serve.start(http_options={"host": settings.host, "port": settings.port},
                    grpc_options=grpc_options(settings))
        try:
            deploy(build(settings, options), timeout_s=timeout_s)
        except DeployFailed as exc:
            log.error("%s", exc)
            return 1
        log.info("camserve on Ray Serve: %s, %s, on http://%s:%d", ", ".join(m.name for m in settings.models),
                 f"{options.min_replicas}-{options.max_replicas} replicas" if options.autoscaling
                 else f"{options.replicas} replica(s)", settings.host, settings.port)
        if settings.grpc_port is not None:
            log.info("camserve on Ray Serve: the Open Inference Protocol over gRPC on port %d", settings.grpc_port)
        while not stop.wait(0.5):
            pass
        log.info("camserve on Ray Serve: stopping (replicas drain for up to %.0f s)", settings.drain_timeout_s)
        return 0
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        # Our own cluster: the proxy and controller stop too; someone else's: only our application goes.
        stop_serving(own_cluster=address is None)
        ray.shutdown()


def __getattr__(name: str) -> Any:
    # `serve build` wants an application object, not a builder: `serve build service.rayserve:app`
    # writes a config for the default application (built-in model, one replica), built on demand so
    # importing this module loads nothing.
    if name == "app":
        return build_app({})
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
