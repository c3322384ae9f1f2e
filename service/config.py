"""Settings: the ``[server]`` table of the config file, overridden by ``SERVICE_<NAME>`` variables.

The same file holds the models (``[models.<name>]`` tables) and ``default_model``. With no file,
the built-in ``shapes`` model is served. The whole configuration is checked before anything loads,
and every problem is reported, one line each, naming the key, the value and what was expected.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import UnionType
from typing import Any, Union, get_args, get_origin, get_type_hints

from service.modelspec import ModelSpec, SpecError

DEFAULT_MODELS = (ModelSpec(name="shapes", source="builtin:shapes"),)
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


class ConfigError(ValueError):
    """The configuration cannot be used; ``problems`` has one line each. Start-up stops with them."""

    def __init__(self, problems: str | list[str]) -> None:
        self.problems = [problems] if isinstance(problems, str) else problems
        super().__init__("\n".join(self.problems))


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8000
    # The Open Inference Protocol over gRPC, on its own port (Triton's is 8001); off unless set. 0 picks a free one.
    grpc_port: int | None = None
    max_batch_size: int = 32
    max_wait_ms: float = 5.0
    batch_policy: str = "adaptive"
    max_queue: int = 256
    request_timeout_s: float = 30.0  # 0: no limit
    max_images_per_request: int = 64
    max_body_bytes: int = 32 * 1024 * 1024
    max_image_pixels: int = 40_000_000
    # Work one request's extra forwards may cost (ScoreCAM/AblationCAM perturbations, faithfulness metrics), in
    # forward units (one: a forward of the built-in shapes model, 39.5 M multiply-accumulates): resnet50 ScoreCAM
    # at its 2048-channel layer4 is 2048 forwards of 103.5 units each per image; the default allows two images.
    max_extra_forwards: int = 524_288
    max_render_pixels: int = 100_000_000  # heatmap pixels one request renders (images x targets x size)
    api_keys: tuple[str, ...] = ()
    api_keys_file: str | None = None
    # Keys for the operator actions (the OIP model repository extension); also valid wherever a key is.
    admin_api_keys: tuple[str, ...] = ()
    enable_repository_api: bool = False  # with no admin keys, the repository extension is off unless this is true
    # Each also opens the paths below it. The page, its files and the API docs hold no data. /v2/health:
    # the Open Inference Protocol's probes, open like /healthz and /readyz (Triton's are too).
    open_paths: tuple[str, ...] = ("/healthz", "/readyz", "/metrics", "/v2/health", "/", "/ui", "/docs-assets",
                                   "/docs", "/redoc", "/openapi.json")
    cors_origins: tuple[str, ...] = ()
    log_format: str = "text"
    log_level: str = "info"
    drain_timeout_s: float = 30.0
    # On SIGTERM, readiness answers 503 for this long while requests are still accepted and served, so
    # load balancers (Kubernetes endpoints) stop routing here before the listener closes; 0: close at once.
    shutdown_grace_s: float = 5.0
    # Request head bounds (service.api.header_limits); 431 beyond them.
    max_header_bytes: int = 64 * 1024
    max_header_line_bytes: int = 16 * 1024
    max_headers: int = 100
    enable_ui: bool = True
    # Decode/render threads; None sizes them to the machine. A Ray Serve replica sets its own CPU share.
    cpu_threads: int | None = None
    default_model: str | None = None
    models: tuple[ModelSpec, ...] = field(default=DEFAULT_MODELS)

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise ConfigError(problems)

    def problems(self) -> list[str]:
        out = []
        for name in ("max_batch_size", "max_queue", "max_images_per_request", "max_body_bytes", "max_image_pixels",
                     "cpu_threads", "max_extra_forwards", "max_render_pixels", "max_header_bytes",
                     "max_header_line_bytes", "max_headers"):
            value = getattr(self, name)
            if value is not None and value < 1:
                out.append(f"setting `{name}` must be at least 1, got {value}")
        if not 0 <= self.port <= 65535:
            out.append(f"setting `port` must be in 0..65535, got {self.port}")
        if self.grpc_port is not None and not 0 <= self.grpc_port <= 65535:
            out.append(f"setting `grpc_port` must be in 0..65535, got {self.grpc_port}")
        elif self.grpc_port and self.grpc_port == self.port:
            out.append(f"setting `grpc_port` must differ from `port`, both are {self.port}")
        for name in ("max_wait_ms", "request_timeout_s", "drain_timeout_s", "shutdown_grace_s"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                out.append(f"setting `{name}` must be a finite number of at least 0, got {value}")
        if self.batch_policy not in ("adaptive", "fixed"):
            out.append(f"setting `batch_policy` must be adaptive or fixed, got {self.batch_policy!r}")
        if self.log_format not in ("text", "json"):
            out.append(f"setting `log_format` must be text or json, got {self.log_format!r}")
        if self.log_level.lower() not in LOG_LEVELS:
            out.append(f"setting `log_level` must be one of {', '.join(LOG_LEVELS)}, got {self.log_level!r}")
        for name in ("api_keys", "admin_api_keys"):
            for key in getattr(self, name):
                if not key.strip() or key != key.strip():
                    # An empty key would match a request that sends none; one with spaces at its ends can
                    # never be sent (HTTP trims header values).
                    out.append(f"setting `{name}` holds an empty key or one with spaces at its ends: {key!r}")
        if self.api_keys_file is not None:
            if not Path(self.api_keys_file).is_file():
                out.append(f"setting `api_keys_file`: no such file {self.api_keys_file!r}")
            elif not self._file_keys():
                # An operator who names a key file means to require keys: an empty one must not open the server.
                out.append(f"setting `api_keys_file`: {self.api_keys_file!r} holds no keys")
        names = [m.name for m in self.models]
        for dup in sorted({n for n in names if names.count(n) > 1}):
            out.append(f"model {dup!r} is defined twice")
        if not names:
            out.append("no models configured")
        if self.default_model is not None and self.default_model not in names:
            out.append(f"`default_model` {self.default_model!r} is not among the models: {', '.join(names)}")
        return out

    def _file_keys(self) -> list[str]:
        """The keys of ``api_keys_file``: one a line; blank lines and ``#`` comments skipped."""
        if not self.api_keys_file:
            return []
        text = Path(self.api_keys_file).read_text(encoding="utf-8")
        return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]

    def all_api_keys(self) -> tuple[str, ...]:
        """The user keys (``api_keys`` and the file's). Never an empty one: see ``problems``."""
        return tuple(k for k in (*self.api_keys, *self._file_keys()) if k.strip())


_SETTABLE = [f for f in dataclasses.fields(Settings) if f.name != "models"]
_KEY_LISTS = ("api_keys", "admin_api_keys")


def _split(name: str, value: str) -> tuple[str, ...]:
    """A comma-separated list. Key lists keep their empty pieces (``"a,,b"``, ``" "``), so that
    ``problems`` reports them rather than a typo passing silently; other lists drop them."""
    if name in _KEY_LISTS:
        return tuple(v.strip() for v in value.split(",")) if value else ()
    return tuple(v.strip() for v in value.split(",") if v.strip())


def _coerce(name: str, kind: Any, value: Any, from_env: bool) -> Any:
    """A TOML value or an environment string as the field's type; raises ``ValueError`` with the
    line to report. TOML values must already have the right type (``4.5`` is not an integer, ``true``
    is not a number, ``"64"`` is not a size); environment strings are parsed."""
    optional = get_origin(kind) in (Union, UnionType)
    base = next(a for a in get_args(kind) if a is not type(None)) if optional else kind
    base = get_origin(base) or base
    source = f"setting `{name}` (from SERVICE_{name.upper()})" if from_env else f"setting `{name}`"
    expected = {int: "an integer", float: "a number", str: "a string", bool: "true or false",
                tuple: "a list of strings or a comma-separated string"}[base]
    bad = ValueError(f"{source} must be {expected}, got {value!r}")
    if from_env:
        if value == "" and optional:
            return None  # an empty variable clears an optional setting
        if base is tuple:
            return _split(name, value)
        if base is bool:
            if value.lower() not in _TRUE + _FALSE:
                raise bad
            return value.lower() in _TRUE
        try:
            return base(value)
        except ValueError:
            raise bad from None
    if base is tuple:
        if isinstance(value, str):
            return _split(name, value)
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return tuple(value)
        raise bad
    if base is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if base is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if base in (str, bool) and isinstance(value, base):
        return value
    raise bad


def load_settings(config: str | Path | None = None, env: Mapping[str, str] | None = None,
                  **overrides: Any) -> Settings:
    """Read the config file (if any), then ``SERVICE_*`` variables, then explicit ``overrides``.

    Raises :class:`ConfigError` listing every problem found."""
    env = os.environ if env is None else env
    data: dict[str, Any] = {}
    if config is not None:
        try:
            data = tomllib.loads(Path(config).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {config}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {config} is not valid TOML: {exc}") from None
    problems: list[str] = []
    for key in sorted(set(data) - {"server", "models", "default_model"}):
        problems.append(f"unknown top-level key `{key}` in {config}; known: server, models, default_model")
    hints = get_type_hints(Settings)
    values: dict[str, Any] = {}
    server = data.get("server", {})
    known = {f.name for f in _SETTABLE}
    if not isinstance(server, dict):
        problems.append(f"`server` must be a table ([server]), got {server!r}")
        server = {}
    for key in sorted(set(server) - known):
        problems.append(f"unknown [server] setting `{key}`; known: {', '.join(sorted(known))}")
    for f in _SETTABLE:
        for value, from_env in ((server.get(f.name), False), (env.get(f"SERVICE_{f.name.upper()}"), True)):
            if value is None:
                continue
            try:
                values[f.name] = _coerce(f.name, hints[f.name], value, from_env)
            except ValueError as exc:
                problems.append(str(exc))
    values.update({k: v for k, v in overrides.items() if v is not None})
    if "default_model" in data:
        if isinstance(data["default_model"], str):
            values.setdefault("default_model", data["default_model"])
        else:
            problems.append(f"`default_model` must be a model name, got {data['default_model']!r}")
    if "models" in data:
        if not isinstance(data["models"], dict):
            problems.append(f"`models` must hold [models.<name>] tables, got {data['models']!r}")
        else:
            specs = []
            for name, table in data["models"].items():
                try:
                    specs.append(ModelSpec.from_table(name, table))
                except SpecError as exc:
                    problems += exc.problems
            if len(specs) == len(data["models"]):
                values["models"] = tuple(specs)
            else:  # the defaults stand in for the range checks below, which must not report the models again
                values.pop("default_model", None)
    # Range checks run on every value that has the right type, so that one pass reports every problem
    # (`max_batch_size = 4.5` and `drain_timeout_s = -1` both), not the type errors first.
    try:
        settings = Settings(**values)
    except ConfigError as exc:
        problems += [p for p in exc.problems if p not in problems]
    if problems:
        raise ConfigError(problems)
    return settings
