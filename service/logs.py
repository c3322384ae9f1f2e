"""Logging set-up: readable lines by default, one JSON object per line with ``log_format = "json"``."""

from __future__ import annotations

import json
import logging
import time

# Attributes every LogRecord has; anything else was passed with ``extra=`` and belongs in the output.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}


# Every character that could end a line or steer a terminal, written as its escape: a request path or
# header that reaches a log line must not forge another line (`/healthz%0a... INFO camserve.access: ...`).
_CONTROL = {c: repr(chr(c))[1:-1] for c in (*range(32), 127, 0x85, 0x2028, 0x2029)}


def escape_controls(text: str) -> str:
    return text.translate(_CONTROL)


class TextFormatter(logging.Formatter):
    """``asctime level logger: message``, with control characters in the message escaped. A traceback
    (``exc_info``) keeps its lines."""

    def format(self, record: logging.LogRecord) -> str:
        msg, args = record.msg, record.args
        record.msg, record.args = escape_controls(record.getMessage()), None
        try:
            return super().format(record)
        finally:
            record.msg, record.args = msg, args


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
        handler.setFormatter(TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
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
