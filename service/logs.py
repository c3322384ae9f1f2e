"""Logging set-up: readable lines by default, one JSON object per line with ``log_format = "json"``."""

from __future__ import annotations

import json
import logging
import time

# Attributes every LogRecord has; anything else was passed with ``extra=`` and belongs in the output.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            **{k: v for k, v in vars(record).items() if k not in _STANDARD},
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup_logging(fmt: str = "text", level: str = "info") -> None:
    handler = logging.StreamHandler()
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    # camserve logs one access line per request itself, with the request id.
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
    # At debug level PIL logs every PNG chunk it reads (two lines per decoded PNG), drowning the
    # batch lines that debug level is for; its warnings still show.
    logging.getLogger("PIL").setLevel(max(logging.INFO, root.level))
