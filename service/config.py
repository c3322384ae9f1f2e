"""Settings: the ``[server]`` table of the config file, overridden by ``SERVICE_<NAME>`` variables.

The same file holds the models (``[models.<name>]`` tables) and ``default_model``. With no file,
the built-in ``shapes`` model is served.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import UnionType
from typing import Any, Union, get_args, get_origin, get_type_hints

from service.registry import ModelLoadError, ModelSpec

DEFAULT_MODELS = (ModelSpec(name="shapes", source="builtin:shapes"),)


class ConfigError(ValueError):
    """The configuration cannot be used; start-up stops with this message."""


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch_size: int = 32
    max_wait_ms: float = 5.0
    max_queue: int = 256
    request_timeout_s: float = 30.0
    max_images_per_request: int = 64
    max_body_bytes: int = 32 * 1024 * 1024
    max_image_pixels: int = 40_000_000
    api_keys: tuple[str, ...] = ()
    api_keys_file: str | None = None
    open_paths: tuple[str, ...] = ("/healthz", "/readyz", "/metrics")
    cors_origins: tuple[str, ...] = ()
    log_format: str = "text"
    log_level: str = "info"
    drain_timeout_s: float = 30.0
    # Decode/render threads; None sizes them to the machine. A Ray Serve replica sets its own CPU share.
    cpu_threads: int | None = None
    default_model: str | None = None
    models: tuple[ModelSpec, ...] = field(default=DEFAULT_MODELS)

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_queue", "max_images_per_request", "max_body_bytes", "max_image_pixels",
                     "cpu_threads"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"`{name}` must be at least 1, got {getattr(self, name)}")
        if self.log_format not in ("text", "json"):
            raise ConfigError(f"`log_format` must be text or json, got {self.log_format!r}")

    def all_api_keys(self) -> tuple[str, ...]:
        keys = list(self.api_keys)
        if self.api_keys_file:
            text = Path(self.api_keys_file).read_text(encoding="utf-8")
            keys += [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
        return tuple(k for k in keys if k)


_SETTABLE = [f for f in dataclasses.fields(Settings) if f.name != "models"]


def _coerce(name: str, kind: Any, value: Any) -> Any:
    """Turn a TOML value or an environment string into the field's type, naming the bad value."""
    optional = get_origin(kind) in (Union, UnionType)
    base = next(a for a in get_args(kind) if a is not type(None)) if optional else kind
    base = get_origin(base) or base
    try:
        if base is tuple:
            if isinstance(value, str):
                return tuple(v.strip() for v in value.split(",") if v.strip())
            return tuple(str(v) for v in value)
        if value == "" and optional:
            return None  # an empty variable clears an optional setting
        if base is int and not isinstance(value, float):
            return int(value)
        if base is float:
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"setting `{name}` must be {getattr(base, '__name__', base)}, got {value!r}") from None


def load_settings(config: str | Path | None = None, env: Mapping[str, str] | None = None,
                  **overrides: Any) -> Settings:
    """Read the config file (if any), then ``SERVICE_*`` variables, then explicit ``overrides``."""
    env = os.environ if env is None else env
    data: dict[str, Any] = {}
    if config is not None:
        try:
            data = tomllib.loads(Path(config).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {config}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {config} is not valid TOML: {exc}") from None
    unknown = set(data) - {"server", "models", "default_model"}
    if unknown:
        raise ConfigError(f"unknown top-level keys in {config}: {sorted(unknown)}")
    hints = get_type_hints(Settings)
    values: dict[str, Any] = {}
    server = data.get("server", {})
    known = {f.name for f in _SETTABLE}
    if set(server) - known:
        raise ConfigError(f"unknown [server] settings {sorted(set(server) - known)}; known: {sorted(known)}")
    for f in _SETTABLE:
        if f.name in server:
            values[f.name] = _coerce(f.name, hints[f.name], server[f.name])
        env_value = env.get(f"SERVICE_{f.name.upper()}")
        if env_value is not None:
            values[f.name] = _coerce(f.name, hints[f.name], env_value)
    values.update({k: v for k, v in overrides.items() if v is not None})
    if "default_model" in data:
        values.setdefault("default_model", str(data["default_model"]))
    if "models" in data:
        try:
            values["models"] = tuple(ModelSpec.from_table(n, t) for n, t in data["models"].items())
        except (ModelLoadError, TypeError) as exc:
            raise ConfigError(str(exc)) from None
    return Settings(**values)
