"""``AsyncEngine``: :class:`EngineCore` on one background thread, streamed to asyncio consumers.

The model's forward blocks, so one engine thread owns the core and nothing else touches it. asyncio code
talks to it through an inbox (new requests, aborts) under a lock plus a ``threading.Event`` that wakes the
thread; the thread sleeps on that event whenever it has no work (no busy spinning). Results go back per
request through an ``asyncio.Queue`` fed with ``loop.call_soon_threadsafe``, so each consumer may live on
its own event loop.

Failures:
* a request whose sampling or stop handling raises ends with ``finish_reason="abort"`` (and ``error``);
* a failing forward is fatal: every in-flight ``generate`` raises :class:`EngineDeadError` with the cause,
  later calls raise it at once, and :attr:`AsyncEngine.healthy` turns False;
* :meth:`AsyncEngine.shutdown` ends in-flight requests with ``finish_reason="abort"`` and stops the thread.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from dsv4.engine.engine_config import EngineConfig
from dsv4.engine.engine_core import EngineCore
from dsv4.engine.outputs import EngineStats, RequestDelta
from dsv4.engine.sampling_params import SamplingParams

log = logging.getLogger(__name__)

SHUTDOWN_ERROR = "the engine is shutting down"


class EngineDeadError(RuntimeError):
    """The engine hit a fatal error (or was shut down) and serves no more requests."""


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[RequestDelta | BaseException]


class AsyncEngine:
    """Public attributes: ``model_config``, ``tokenizer``, ``model_name``, ``max_model_len``, ``config``."""

    def __init__(self, config: EngineConfig, progress: bool = True) -> None:
        self.config = config
        self.core = EngineCore(config, progress=progress)  # only the engine thread touches it from here on
        self.model_config = self.core.model_config
        self.tokenizer = self.core.tokenizer
        self.max_model_len: int = self.core.max_model_len
        self.model_name: str = config.served_model_name or (
            self.core.model_dir.resolve().name if config.model is not None else "dsv4-embedded")
        self._lock = threading.Lock()  # guards _inbox, _streams, _stopping, _error
        self._inbox: list[tuple[Any, ...]] = []
        self._streams: dict[str, _Stream] = {}
        self._wake = threading.Event()
        self._stopping = False
        self._error: str | None = None
        self._stats = self.core.stats()
        dev = self.core.runner.device
        self._cuda_index: int | None = None
        if dev.type == "cuda":  # the engine thread must use the device this thread resolved "cuda" to
            self._cuda_index = dev.index if dev.index is not None else torch.cuda.current_device()
        self._thread = threading.Thread(target=self._run, name="dsv4-engine", daemon=True)
        self._thread.start()

    # ---- front end (any thread / event loop) ---------------------------------------------------------------
    @property
    def healthy(self) -> bool:
        """False after a fatal engine error or shutdown."""
        return self._error is None and not self._stopping and self._thread.is_alive()

    def encode(self, text: str, add_bos: bool) -> list[int]:
        return self.tokenizer.encode(text, add_bos=add_bos)

    def check_request(self, prompt_ids: Sequence[int], params: SamplingParams) -> None:
        """``ValueError`` naming the problem: empty prompt, ids out of range, longer than max_model_len (or the
        whole cache), bad params. ``generate`` runs the same check."""
        self.core.check_request(prompt_ids, params)  # reads only what never changes after start-up

    async def generate(self, prompt_ids: Sequence[int], params: SamplingParams,
                       request_id: str | None = None) -> AsyncIterator[RequestDelta]:
        """Stream one request's deltas; the last has ``finish_reason`` set.

        Bad input raises ``ValueError`` on the first iteration (``check_request`` can ask beforehand). If the
        consumer stops early (``aclose()``, cancellation, a dropped client), the request is aborted and its
        cache freed. Raises :class:`EngineDeadError` if the engine is or becomes unusable.
        """
        self.check_request(prompt_ids, params)
        rid = uuid.uuid4().hex if request_id is None else str(request_id)
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        with self._lock:
            self._raise_if_dead()
            if rid in self._streams:
                raise ValueError(f"request id {rid!r} is already in use")
            self._streams[rid] = stream
            self._inbox.append(("add", rid, list(prompt_ids), params))
        self._wake.set()
        finished = False
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    finished = True  # the engine has already dropped it
                    raise item
                finished = item.finish_reason is not None
                yield item
                if finished:
                    return
        finally:
            with self._lock:
                if self._streams.get(rid) is stream:
                    del self._streams[rid]
            if not finished:
                self.abort(rid)

    def abort(self, request_id: str) -> None:
        """Cancel a request (no-op if unknown or finished); its stream ends with ``finish_reason="abort"``."""
        with self._lock:
            self._inbox.append(("abort", str(request_id)))
        self._wake.set()

    def stats(self) -> EngineStats:
        """Counters as of the end of the engine's last step."""
        return self._stats

    async def shutdown(self) -> None:
        """Abort what is in flight, stop the engine thread and wait for it."""
        with self._lock:
            self._stopping = True
        self._wake.set()
        await asyncio.to_thread(self._thread.join)

    def _raise_if_dead(self) -> None:
        if self._error is not None:
            raise EngineDeadError(self._error)
        if self._stopping or not self._thread.is_alive():
            raise EngineDeadError(SHUTDOWN_ERROR)

    # ---- engine thread --------------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            if self._cuda_index is not None:
                torch.cuda.set_device(self._cuda_index)  # the current device is per thread
            self._loop()
            self._stop_all()
        except BaseException as e:  # a bug in the loop itself: no consumer may be left waiting on a dead thread
            log.exception("the engine thread died")
            with self._lock:
                self._error = self._error or f"the engine thread died: {type(e).__name__}: {e}"
                streams = list(self._streams)
            for rid in streams:
                self._deliver(rid, EngineDeadError(self._error))

    def _loop(self) -> None:
        while True:
            # NOTE: clear before reading the inbox: a request queued after the read sets the event again, so
            # the wait below returns at once instead of sleeping on it.
            self._wake.clear()
            with self._lock:
                inbox, self._inbox = self._inbox, []
                stopping = self._stopping
            try:
                for cmd in inbox:
                    self._apply(cmd)
                if stopping:
                    return
                if not self.core.has_unfinished():
                    self._stats = self.core.stats()
                    self._wake.wait()
                    continue
                deltas = self.core.step()
            except Exception as e:
                self._fatal(e)
                continue
            for d in deltas:
                self._deliver(d.request_id, d)
            self._stats = self.core.stats()

    def _apply(self, cmd: tuple[Any, ...]) -> None:
        if cmd[0] == "abort":
            self.core.abort(cmd[1])
            return
        _, rid, prompt_ids, params = cmd
        if self._error is not None:
            self._deliver(rid, EngineDeadError(self._error))
            return
        try:
            self.core.add_request(prompt_ids, params, request_id=rid)
        except Exception as e:  # a duplicate id, or a check that changed its mind: this request only
            self._deliver(rid, e)

    def _deliver(self, rid: str, item: RequestDelta | BaseException) -> None:
        with self._lock:
            stream = self._streams.get(rid)
        if stream is None:
            return  # its consumer has gone (its abort is in the inbox)
        try:
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, item)
        except RuntimeError:  # that consumer's event loop is closed: nobody will read this request
            self.core.abort(rid)

    def _fatal(self, e: Exception) -> None:
        log.exception("engine step failed; failing every request")
        msg = f"engine failed: {type(e).__name__}: {e}"
        with self._lock:
            self._error = msg
            streams = list(self._streams)
        try:  # a failed forward already aborted everything; anything else may not have
            self.core.abort_all(msg)
            self.core.step()  # nothing left to run: this only drains the abort deltas, which nobody needs
        except Exception:
            log.exception("engine cleanup after a fatal error failed")
        for rid in streams:
            self._deliver(rid, EngineDeadError(msg))
        self._stats = self.core.stats()

    def _stop_all(self) -> None:
        self.core.abort_all(SHUTDOWN_ERROR)
        ended = set()
        for d in self.core.step():  # nothing left to run: the abort deltas only
            self._deliver(d.request_id, d)
            ended.add(d.request_id)
        with self._lock:
            orphans = [rid for rid in self._streams if rid not in ended]
        for rid in orphans:  # queued after the engine's last look at its inbox
            self._deliver(rid, EngineDeadError(SHUTDOWN_ERROR))
        self._stats = self.core.stats()
