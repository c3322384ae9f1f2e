"""The plain HTTP server: uvicorn with bounded request heads and a Kubernetes-friendly shutdown.

On SIGTERM, in order:

1. for ``shutdown_grace_s``, ``/readyz`` and ``/v2/health/ready`` answer 503 while the listener still
   accepts and serves every request, so endpoints controllers and load balancers, which act on a
   failed readiness probe, stop sending traffic before anything is refused;
2. then the listener closes (new connections are refused) and requests in flight finish within
   ``drain_timeout_s``; those still running just before it passes are answered 503 ``not_ready``;
3. the process exits 0.

SIGINT (Ctrl-C), or a second SIGTERM during the grace, skips the grace.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
from types import FrameType

import uvicorn
from fastapi import FastAPI

from service.api.header_limits import HeaderLimits, bounded_protocol
from service.config import Settings

log = logging.getLogger("camserve")


def header_limits(settings: Settings) -> HeaderLimits:
    return HeaderLimits(max_bytes=settings.max_header_bytes, max_line_bytes=settings.max_header_line_bytes,
                        max_count=settings.max_headers)


def server_config(app: FastAPI, settings: Settings) -> uvicorn.Config:
    return uvicorn.Config(app, host=settings.host, port=settings.port, log_config=None,
                          # uvicorn waits with asyncio.wait_for, so fractions of a second work too.
                          timeout_graceful_shutdown=settings.drain_timeout_s,  # type: ignore[arg-type]
                          access_log=False,
                          http=bounded_protocol(header_limits(settings)))


class Server(uvicorn.Server):
    """uvicorn's server with the shutdown above; ``app`` is a camserve app (``create_app``)."""

    def __init__(self, app: FastAPI, settings: Settings) -> None:
        super().__init__(server_config(app, settings))
        self.app = app
        self.settings = settings
        self._loop: asyncio.AbstractEventLoop | None = None
        self._in_grace = False
        self._grace: asyncio.TimerHandle | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        grace = self.settings.shutdown_grace_s
        if sig == signal.SIGTERM and grace > 0 and not self._in_grace and not self.should_exit \
                and self._loop is not None:
            self._in_grace = True
            self.app.state.repository.withdrawn = True
            log.info("camserve: SIGTERM; readiness is off, still serving for %.1f s before draining", grace)
            # Signal handlers run between bytecodes of the loop's thread: schedule, do not act here.
            self._loop.call_soon_threadsafe(self._start_grace, sig, grace)
            return
        if self._grace is not None:
            self._grace.cancel()
        self._stop(sig, frame)

    def _start_grace(self, sig: int, grace: float) -> None:
        if not self.should_exit:
            self._grace = asyncio.get_running_loop().call_later(grace, self._stop, sig, None)

    def _stop(self, sig: int, frame: FrameType | None) -> None:
        # Readiness stays off and new requests get 503 while in-flight work drains.
        self.app.state.repository.begin_drain(self.settings.drain_timeout_s)
        super().handle_exit(sig, frame)
        # uvicorn re-raises captured signals once shut down, so the process would die by SIGTERM;
        # a drained, orderly stop is a success for process supervisors, so exit 0 instead.
        captured = getattr(self, "_captured_signals", None)
        if sig == signal.SIGTERM and captured and captured[-1] == sig:
            captured.pop()
