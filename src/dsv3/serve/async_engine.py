"""The engine behind the server, driven from an asyncio event loop without ever blocking it.

Two backends with one interface (`check`, `submit`, `stream`, `abort`, `stats`, `shutdown`):
- `AsyncEngine(engine)`: the Engine stepped by a thread of this process. Simple, and what tests and notebooks use.
- `EngineProcess(factory)`: the Engine built and stepped in a child process, talking through pipes: one message
  per step carries every request's new output. The HTTP side (SSE, JSON, detokenising) then never competes with the
  step loop for the GIL; `dsv3 serve` uses it (vLLM's API-server / engine-core split, for the same reason).

Either way exactly one thread touches the Engine (it is not thread-safe): it takes commands (add, abort, stats),
steps while there is work (that loop, and what a failed step tells its requests' clients, are engine_loop.py's), and
the outputs reach each request's asyncio queue through one `loop.call_soon_threadsafe` per step. Requests are
validated on the event-loop side against `RequestLimits` (the same checks as Engine.add_request), so a bad one gets
its 400 before anything is queued.

Back-pressure: at most `max_pending` requests may be queued or running; `submit` raises QueueFull beyond that
(the server answers 429). `shutdown(drain=True)` stops accepting, lets running requests finish, then stops.

Threads: the engine's torch thread count is chosen, not inherited (`engine_threads`): torch's default takes every
core, and on a small machine the HTTP process and other work then fight the step loop for them (on 2 busy cores,
p99 latency 16 s against 1.5 s with one thread).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import logging
import multiprocessing
import os
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from ..infer import Engine, SamplingParams
from ..infer.engine import RequestOutput
from ..infer.requests import GrammarFailed, RequestLimits, check_request
from ..infer.structured import GRAMMAR_ERROR
from .engine_loop import EngineLoop, engine_process_main     # the engine's side: its command/step loop

log = logging.getLogger(__name__)


def engine_threads(requested: int | None = None) -> int:
    """The engine's torch threads: `requested` (dsv3 serve --threads), else OMP_NUM_THREADS, else every usable core
    but one, which is left to the HTTP process (tokenising, JSON, SSE)."""
    if requested:
        return requested
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores - 1)


class QueueFull(Exception):
    """More requests are pending than the server accepts."""


class ShuttingDown(Exception):
    """The server is draining and takes no new requests."""


class EngineStopped(Exception):
    """The engine's thread or process is gone (killed, or failed): nothing can be queued or asked of it."""


@dataclass(eq=False)
class RequestHandle:
    """One submitted request as the event loop sees it."""
    request_id: int
    outputs: asyncio.Queue = field(default_factory=asyncio.Queue)
    submitted: float = field(default_factory=time.perf_counter)
    first_token: float | None = None
    finished: bool = False


class AsyncEngineBase:
    def __init__(self, limits: RequestLimits, tokenizer, max_pending: int):
        self.limits, self.tokenizer, self.max_pending = limits, tokenizer, max_pending
        self._pending = 0                                   # submitted and not yet finished (event loop only)
        self._accepting = True
        self._ids = itertools.count()
        self._handles: dict[int, RequestHandle] = {}        # request id -> handle, until finished
        self.num_aborted = 0                                # requests that ended by abort (client gone)
        self.on_output = None      # optional callback(handle, output) on the event loop (metrics)
        self.step_error: str | None = None                  # the failed step's exception (the log's, not a client's)
        self._futures: dict[int, concurrent.futures.Future] = {}    # stats requests in flight
        self._loop: asyncio.AbstractEventLoop | None = None         # the event loop outputs are delivered to
        self._exited = False                                # the engine's thread or process has ended (_gone)

    # ---- to implement -------------------------------------------------------------------------------------------
    def _put(self, command: tuple) -> None:
        """Hand a command to the engine's loop (from any thread)."""
        raise NotImplementedError

    @property
    def alive(self) -> bool:
        raise NotImplementedError

    def _stop_backend(self) -> None:
        raise NotImplementedError

    def _stopped_reason(self) -> str:
        """Why the engine is not alive, in generic words (health_reason)."""
        return "engine stopped"

    # ---- shared by the backends ---------------------------------------------------------------------------------
    def _send(self, command: tuple) -> None:
        self._loop = asyncio.get_running_loop()
        self._put_checked(command)

    def _put_checked(self, command: tuple) -> None:
        """`_put`, or EngineStopped if nothing takes commands any more (a dead process's pipe is broken; a dead
        thread's queue would take them and never answer)."""
        if not self.alive:
            raise EngineStopped("the engine is not running (see /health)")
        try:
            self._put(command)
        except (OSError, EOFError, ValueError) as e:       # BrokenPipeError; a closed Connection raises OSError
            log.warning("a command could not reach the engine: %r", e)
            raise EngineStopped("the engine is not running (see /health)") from None

    def stats_future(self) -> concurrent.futures.Future:
        fut = concurrent.futures.Future()
        self._futures[id(fut)] = fut
        try:
            self._put_checked(("stats", id(fut)))
        except EngineStopped as e:
            self._futures.pop(id(fut)).set_exception(e)
        return fut

    def _fail_futures(self, error: Exception) -> None:
        """Stats requests the engine will never answer (it is gone) fail instead of waiting forever."""
        for key in list(self._futures):
            fut = self._futures.pop(key, None)
            if fut is not None and not fut.done():
                fut.set_exception(error)

    def _gone(self, reason: str) -> None:
        """From the engine side, once its thread or process has ended: fail whatever still waits. Its requests are
        listed on the event loop, after every submit that saw the engine alive (a list taken here missed one
        registered meanwhile: it waited forever), as EngineStopped: a 503 as for every later request."""
        self._exited = True
        error = EngineStopped(reason)
        self._fail_futures(error)
        if self._loop is not None:
            with contextlib.suppress(RuntimeError):         # the loop closed (the server stopped): none waits
                self._loop.call_soon_threadsafe(lambda: self._deliver_all([(rid, error) for rid in self._handles]))

    def _reply(self, key: int, value) -> None:
        """From the engine side: the answer to a stats request."""
        self._futures.pop(key).set_result(value)

    def _on_step(self, items: list, error: str | None = None) -> None:
        """From the engine side, once per step: hand the outputs to the event loop. A failed step marks the engine
        unhealthy (/health 503 with the error); a later step that produced outputs shows it working again (a
        transient failure, e.g. one oversized batch running out of memory, fails the requests of that step, which
        EngineLoop.step aborts so that the same batch does not fail again; the others and later ones run)."""
        if error is not None:
            self.step_error = error
        elif items:
            self.step_error = None
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._deliver_all, items)

    # ---- event-loop side ------------------------------------------------------------------------------------------
    def health_reason(self) -> str | None:
        """None while the engine works; else why not, in generic words ("engine step failed", "engine process exited
        with code -9"): /health is open without the API key, and an exception's text (paths, sizes, a prompt's
        words, a key) is the server log's, logged where it was raised, never a response's."""
        if not self.alive:
            return self._stopped_reason()
        return "engine step failed" if self.step_error is not None else None

    @property
    def num_pending(self) -> int:
        return self._pending

    def check(self, prompt: str | list[int], params: SamplingParams) -> list[int]:
        """Validate a request without queueing it (ValueError names the problem)."""
        return check_request(prompt, params, self.limits, self.tokenizer)

    def submit(self, ids: list[int], params: SamplingParams) -> RequestHandle:
        if not self._accepting:
            raise ShuttingDown("the server is shutting down")
        if self._pending >= self.max_pending:
            raise QueueFull(f"{self._pending} requests are pending (limit {self.max_pending}); retry later")
        handle = RequestHandle(next(self._ids))
        self._send(("add", handle.request_id, ids, params))       # EngineStopped: nothing was queued
        self._pending += 1
        self._handles[handle.request_id] = handle
        return handle

    def abort(self, handle: RequestHandle) -> None:
        """Stop a request (a client went away); its blocks return to the pool at the engine's next step. A stopped
        engine has nothing to abort (its requests have failed)."""
        if not handle.finished:
            with contextlib.suppress(EngineStopped):
                self._send(("abort", handle.request_id))

    async def stream(self, handle: RequestHandle) -> AsyncIterator[RequestOutput]:
        """The request's outputs as the engine produces them (deltas, see RequestOutput), the last one finished and
        complete. Aborts the request if the consumer stops early (a disconnect cancels the task iterating this)."""
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

    async def stats(self) -> dict:
        return await asyncio.wrap_future(self.stats_future())

    async def shutdown(self, drain: bool = True, timeout: float = 60.0) -> None:
        self._accepting = False
        if drain:
            deadline = time.monotonic() + timeout
            while self._pending and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
        await asyncio.get_running_loop().run_in_executor(None, self._stop_backend)

    def _deliver_all(self, items: list) -> None:
        """On the event loop: [(request id, RequestOutput or the exception it failed with)] from one engine step."""
        for rid, out in items:
            handle = self._handles.get(rid)
            if handle is None:
                continue
            if isinstance(out, RequestOutput):
                if out.new_token_ids and handle.first_token is None:
                    handle.first_token = time.perf_counter()
                if out.finished:
                    self.num_aborted += out.finish_reason == "abort"
                if self.on_output is not None:
                    self.on_output(handle, out)
                if out.finished and out.finish_reason == GRAMMAR_ERROR:   # not an output that met its constraint
                    out = GrammarFailed(f"structured output failed after {len(out.token_ids)} tokens: the output "
                                        "could not be held to its grammar (a parser limit reached at run time; "
                                        "a simpler grammar may pass)")
            if not isinstance(out, RequestOutput) or out.finished:
                handle.finished = True
                self._pending -= 1
                del self._handles[rid]
            handle.outputs.put_nowait(out)


class AsyncEngine(AsyncEngineBase):
    """The Engine stepped by a thread of this process."""

    def __init__(self, engine: Engine, max_pending: int = 256):
        super().__init__(engine.limits, engine.tokenizer, max_pending)
        self.engine = engine
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._died = False                                  # the loop ended by an exception, not a stop
        self._thread = threading.Thread(target=self._run, name="dsv3-engine", daemon=True)
        self._thread.start()

    def _put(self, command: tuple) -> None:
        self._commands.put(command)

    @property
    def alive(self) -> bool:
        return not self._exited and self._thread.is_alive()

    def _stop_backend(self) -> None:
        self._commands.put(("stop",))
        self._thread.join(10.0)

    def _stopped_reason(self) -> str:
        return "engine thread died" if self._died else "engine stopped"

    def _run(self) -> None:
        """The loop; when it ends, by a stop or by an exception that escaped it (a failed step does not), whatever
        still waits fails as it does when an engine process exits (unwatched, it waited forever)."""
        reason = "the engine stopped"
        try:
            self._loop_commands_and_steps()
        except BaseException as e:
            self._died, reason = True, "the engine thread died"     # its exception: the log's (not a client's)
            self.step_error = repr(e)
            log.critical("the engine thread died; every request fails with 503 from now on", exc_info=e)
            raise
        finally:
            self._gone(reason)

    def _loop_commands_and_steps(self) -> None:
        loop = EngineLoop(self.engine, self._on_step, self._reply)
        while not loop.stopped:
            block = not self.engine.has_unfinished()
            try:
                while not loop.stopped:      # take every waiting command; block for one only when idle
                    loop.command(self._commands.get(block=block))
                    block = False
            except queue.Empty:
                pass
            if not loop.stopped and self.engine.has_unfinished():
                loop.step()


class Writer:
    """Messages handed to `send` by a thread of their own, in order. Connection.send blocks until the peer has read
    the bytes, and an engine reads its commands only between steps: sent from the event loop, a submit larger than the
    pipe holds (64 KiB: a batch of prompts, one long prompt, n copies of it) held the loop, /health and every open
    stream, for the rest of the engine's step. A send that fails (the peer is gone) ends the thread; `on_error` hears
    of it, and what is queued after that is dropped (the peer's reader fails the requests that wait)."""

    def __init__(self, send: Callable, name: str, on_error: Callable[[Exception], None] | None = None):
        self._send, self._on_error = send, on_error
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._run, name=name, daemon=True).start()

    def put(self, message) -> None:
        self._queue.put(message)

    def close(self) -> None:
        self._queue.put(Writer)

    def _run(self) -> None:
        while (message := self._queue.get()) is not Writer:
            try:
                self._send(message)
            except (OSError, EOFError, ValueError) as e:     # BrokenPipeError; a closed Connection raises OSError
                if self._on_error is not None:
                    self._on_error(e)
                return


class EngineProcess(AsyncEngineBase):
    """The Engine built by `factory()` (a picklable callable) in a spawned child process with `engine_threads(threads)`
    torch threads."""

    def __init__(self, factory: Callable[[], Engine], tokenizer, max_pending: int = 256, start_timeout: float = 600,
                 threads: int | None = None):
        ctx = multiprocessing.get_context("spawn")
        self._commands, child_commands = ctx.Pipe(duplex=False)[::-1]
        parent_outputs, child_outputs = ctx.Pipe(duplex=False)
        self._outputs = parent_outputs
        self._process = ctx.Process(target=engine_process_main, name="dsv3-engine", daemon=True,
                                    args=(factory, child_commands, child_outputs, engine_threads(threads)))
        self._process.start()
        if not parent_outputs.poll(start_timeout):
            raise RuntimeError("the engine process did not start")
        msg = parent_outputs.recv()
        if msg[0] != "ready":
            raise RuntimeError(f"the engine process failed to build its engine: {msg[1]}")
        super().__init__(msg[1], tokenizer, max_pending)
        self._writer = Writer(lambda command: self._commands.send(command), "dsv3-engine-writer")
        self._reader = threading.Thread(target=self._read, name="dsv3-engine-reader", daemon=True)
        self._reader.start()

    def _put(self, command: tuple) -> None:
        self._writer.put(command)

    @property
    def alive(self) -> bool:
        return not self._exited and self._process.is_alive()

    def _stopped_reason(self) -> str:
        code = self._process.exitcode
        return "engine process exited" if code is None else f"engine process exited with code {code}"

    def _read(self) -> None:
        while True:
            try:
                msg = self._outputs.recv()
            except (EOFError, OSError):
                break
            if msg[0] == "out":
                if msg[2] is not None:      # (the child's log, traceback included, goes to its stderr)
                    log.error("an engine step failed in the engine process: %s", msg[2])
                self._on_step(msg[1], msg[2])
            elif msg[0] == "stats":
                self._reply(msg[1], msg[2])
        self._process.join(5)           # its exit code, for the log and /health
        log.critical("the engine process exited (exit code %s); every request fails with 503 from now on",
                     self._process.exitcode)
        self._gone("the engine process exited")           # the child is gone
        self._writer.close()

    def _stop_backend(self) -> None:
        self._put(("stop",))            # after every command queued before it; a dead process has nothing to stop
        self._writer.close()
        self._process.join(30)
        if self._process.is_alive():
            self._process.kill()
