"""AsyncEngine: one inference Engine driven by its own thread, fed and read from an asyncio event loop.

The Engine is not thread-safe, so exactly one thread (the engine thread) touches it: it takes commands (add,
abort) from a queue, runs `engine.step()` while there is work, and hands each request's outputs to that request's
asyncio queue through `loop.call_soon_threadsafe`. The event loop never waits on the model, so the HTTP server keeps
answering (health, metrics, new requests, disconnects) while a step runs.

Back-pressure: at most `max_pending` requests may be queued or running; `submit` raises QueueFull beyond that
(the server answers 429). `shutdown(drain=True)` stops accepting, lets running requests finish, then stops the
thread.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from ..infer import Engine, SamplingParams
from ..infer.engine import RequestOutput


class QueueFull(Exception):
    """More requests are pending than the server accepts."""


class ShuttingDown(Exception):
    """The server is draining and takes no new requests."""


@dataclass(eq=False)
class RequestHandle:
    """One submitted request as the event loop sees it."""
    ids: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    outputs: asyncio.Queue = field(default_factory=asyncio.Queue)
    request_id: int | None = None      # the engine's id, set by the engine thread
    submitted: float = field(default_factory=time.perf_counter)
    first_token: float | None = None
    finished: bool = False


class AsyncEngine:
    def __init__(self, engine: Engine, max_pending: int = 256):
        self.engine, self.max_pending = engine, max_pending
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._handles: dict[int, RequestHandle] = {}       # engine request id -> handle (engine thread only)
        self._pending = 0                                   # submitted and not yet finished (event loop only)
        self.num_aborted = 0                                # requests that ended by abort (client gone)
        self._accepting = True
        self._stop = threading.Event()
        self.on_output = None      # optional callback(handle, output) on the event loop (metrics)
        self.step_error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="dsv3-engine", daemon=True)
        self._thread.start()

    # ---- event-loop side ------------------------------------------------------------------------------------------
    @property
    def num_pending(self) -> int:
        return self._pending

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def check(self, prompt: str | list[int], params: SamplingParams) -> list[int]:
        """Validate a request without queueing it (ValueError names the problem)."""
        return self.engine.check_request(prompt, params)

    def submit(self, ids: list[int], params: SamplingParams) -> RequestHandle:
        if not self._accepting:
            raise ShuttingDown("the server is shutting down")
        if self._pending >= self.max_pending:
            raise QueueFull(f"{self._pending} requests are pending (limit {self.max_pending}); retry later")
        self._pending += 1
        handle = RequestHandle(ids, params, asyncio.get_running_loop())
        self._commands.put(("add", handle))
        return handle

    def abort(self, handle: RequestHandle) -> None:
        """Stop a request (a client went away); its blocks return to the pool at the engine's next step."""
        if not handle.finished:
            self._commands.put(("abort", handle))

    async def stream(self, handle: RequestHandle) -> AsyncIterator[RequestOutput]:
        """The request's outputs as the engine produces them, the last one finished. Aborts the request if the
        consumer stops early (a disconnect cancels the task iterating this)."""
        try:
            while True:
                out = await handle.outputs.get()
                if isinstance(out, BaseException):
                    raise out
                yield out
                if out.finished:
                    return
        finally:
            if not handle.finished:
                self.abort(handle)

    async def shutdown(self, drain: bool = True, timeout: float = 60.0) -> None:
        self._accepting = False
        if drain:
            deadline = time.monotonic() + timeout
            while self._pending and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
        self._stop.set()
        self._commands.put(("wake", None))
        await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 10.0)

    def _deliver_all(self, items: list) -> None:
        for handle, out in items:
            self._deliver(handle, out)

    def _deliver(self, handle: RequestHandle, out) -> None:
        """On the event loop: pass an output (or an error) to the request's consumer."""
        if isinstance(out, RequestOutput):
            if out.new_token_ids and handle.first_token is None:
                handle.first_token = time.perf_counter()
            if out.finished:
                handle.finished = True
                self._pending -= 1
                self.num_aborted += out.finish_reason == "abort"
            if self.on_output is not None:
                self.on_output(handle, out)
        else:
            handle.finished = True
            self._pending -= 1
        handle.outputs.put_nowait(out)

    # ---- engine thread --------------------------------------------------------------------------------------------
    def _run(self) -> None:
        engine = self.engine
        while not self._stop.is_set():
            block = not engine.has_unfinished()
            try:
                while True:      # take every command that is waiting; block for one only when idle
                    kind, handle = self._commands.get(block=block)
                    block = False
                    self._command(kind, handle)
            except queue.Empty:
                pass
            if self._stop.is_set() or not engine.has_unfinished():
                continue
            try:
                outputs = engine.step()
            except Exception as e:       # a step that fails fails its requests, not the server
                self.step_error = e
                for rid, handle in list(self._handles.items()):
                    engine.abort(rid)
                    handle.loop.call_soon_threadsafe(self._deliver, handle, RuntimeError(f"engine step failed: {e}"))
                self._handles.clear()
                engine.step()     # returns the aborted requests' blocks
                continue
            # one wake-up of each event loop per step, not one per request: at 64 streams that is the difference
            # between 1 and 64 cross-thread calls (each a self-pipe write) per step
            by_loop: dict = {}
            for out in outputs:
                handle = self._handles.get(out.request_id)
                if handle is None:
                    continue
                if out.finished:
                    del self._handles[out.request_id]
                by_loop.setdefault(handle.loop, []).append((handle, out))
            for loop, items in by_loop.items():
                loop.call_soon_threadsafe(self._deliver_all, items)

    def _command(self, kind: str, handle: RequestHandle | None) -> None:
        if kind == "add":
            try:
                handle.request_id = self.engine.add_request(handle.ids, handle.params)
                self._handles[handle.request_id] = handle
            except Exception as e:        # checked before submit; capacity can still be exceeded in a race
                handle.loop.call_soon_threadsafe(self._deliver, handle, e)
        elif kind == "abort" and handle.request_id is not None and handle.request_id in self._handles:
            self.engine.abort(handle.request_id)
