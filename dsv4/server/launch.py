"""Start the server: ``dsv4 serve`` (foreground) and :class:`BackgroundServer` (a thread, for tests and
notebooks).

The listening socket is bound before the engine loads, so a taken port fails at once with one line
instead of after minutes of weight loading. Logging is one line per request at INFO (the handlers write
it; uvicorn's access log is off) plus one startup line with the URL.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import sys
import threading
import time
from typing import Any

import uvicorn
from fastapi import FastAPI

from dsv4.engine.engine_config import EngineConfig

log = logging.getLogger("dsv4.server")


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: any free port); ``OSError`` names the address."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _uvicorn_config(app: FastAPI, log_level: str) -> uvicorn.Config:
    # log_config=None keeps uvicorn off the root logger's configuration; access_log=False because the
    # handlers log each request themselves, once, with what matters (tokens, finish reason, time).
    return uvicorn.Config(app, log_config=None, access_log=False, log_level=log_level, timeout_graceful_shutdown=5)


def build_served_app(config: EngineConfig, api_key: str | None = None, progress: bool = False) -> FastAPI:
    """Load the engine for ``config`` and wrap it in an app that owns it."""
    from dsv4.chat.template import ChatTemplate
    from dsv4.engine.async_engine import AsyncEngine
    from dsv4.engine.engine_core import resolve_model_dir
    from dsv4.server.app import build_app

    template = ChatTemplate.from_model_dir(resolve_model_dir(config.model))  # before the engine: fail fast
    engine = AsyncEngine(config, progress=progress)
    return build_app(engine, api_key=api_key, chat_template=template, owns_engine=True)


def serve(config: EngineConfig, host: str, port: int, api_key: str | None = None, log_level: str = "info") -> None:
    """``dsv4 serve``: bind, load, serve until interrupted."""
    sock = bind_socket(host, port)  # first: a taken port is reported before anything else happens
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    t0 = time.perf_counter()
    what = config.model or "the embedded tiny model"
    log.info("loading %s (device %s, dtype %s) ...", what, config.device, config.dtype)
    app = build_served_app(config, api_key, progress=sys.stderr.isatty())
    ctx = app.state.ctx
    log.info("serving %s on %s/v1 (loaded in %.1f s, max_model_len %d%s)", ctx.model_name, url_of(sock),
             time.perf_counter() - t0, ctx.engine.max_model_len, ", API key required" if api_key else "")
    server = uvicorn.Server(_uvicorn_config(app, log_level))
    # uvicorn's own INFO lines (process started, startup complete) repeat what the startup line says
    # (set after the Config: building one resets uvicorn's log levels)
    logging.getLogger("uvicorn.error").setLevel(max(logging.WARNING, logging.getLevelName(log_level.upper())))
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C after its graceful shutdown: the user's way to stop
        pass
    log.info("stopped")


class BackgroundServer:
    """An app served by uvicorn on a thread of its own (its own event loop), on a loopback port.

    ``with BackgroundServer(app) as srv: ... srv.url ...``; leaving the block stops the server (and, for an
    app that owns its engine, the engine).
    """

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> None:
        self.sock = bind_socket(host, port)
        self.url = url_of(self.sock)
        self.server = uvicorn.Server(_uvicorn_config(app, "warning"))
        # NOTE: uvicorn installs signal handlers only on the main thread; this one must not try.
        self.server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
        self._thread = threading.Thread(target=self._run, name="dsv4-server", daemon=True)
        self._error: BaseException | None = None

    def _run(self) -> None:
        try:
            asyncio.run(self.server.serve(sockets=[self.sock]))
        except BaseException as e:  # reported by start()/stop() in the caller's thread
            self._error = e

    def start(self, timeout: float = 30.0) -> BackgroundServer:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if self._error is not None or not self._thread.is_alive():
                raise RuntimeError(f"the server failed to start: {self._error!r}")
            if time.monotonic() > deadline:
                raise TimeoutError("the server did not start in time")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self.server.should_exit = True
        self._thread.join(timeout)
        self.sock.close()

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
