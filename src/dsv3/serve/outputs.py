"""A route's engine requests: submitted together, then their outputs awaited (non-streaming) or merged as they come
(streaming). A client that goes away has every one of its requests aborted, which returns their cache blocks."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from ..infer import SamplingParams
from ..infer.requests import RequestRefused, StepFailed
from .async_engine import AsyncEngineBase, EngineStopped, QueueFull, RequestHandle, ShuttingDown
from .protocol import APIError

log = logging.getLogger(__name__)


def submit_all(aengine: AsyncEngineBase, jobs: list[tuple[list[int], SamplingParams]]) -> list[RequestHandle]:
    """All of a request's jobs or none: a batch that would overflow the queue now is refused whole (429)."""
    if aengine.num_pending + len(jobs) > aengine.max_pending:
        raise APIError(f"the server is at its limit of {aengine.max_pending} pending requests; retry later",
                       429, "rate_limit_error", code="queue_full")
    handles = []
    try:
        for ids, params in jobs:
            handles.append(aengine.submit(ids, params))
        return handles
    except (ShuttingDown, EngineStopped, QueueFull) as e:
        for h in handles:            # all or none
            aengine.abort(h)
        if isinstance(e, QueueFull):
            raise APIError(str(e), 429, "rate_limit_error", code="queue_full") from None
        raise APIError(str(e), 503, "service_unavailable") from None


async def final_outputs(request: Request, aengine: AsyncEngineBase, handles: list[RequestHandle]) -> list | None:
    """Every request's last output (or the exception it failed with); None, with all of them aborted, if the client
    goes away first."""
    async def last(h):
        out = None
        try:
            async for out in aengine.stream(h):
                pass
        except Exception as e:          # an engine failure: answered as a JSON 400 or 503 by engine_failure
            return e
        return out
    task = asyncio.gather(*(last(h) for h in handles))
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.1)
            if done:
                return task.result()
            if await request.is_disconnected():
                return None
    finally:
        if not task.done():
            task.cancel()
            for h in handles:
                aengine.abort(h)
            with contextlib.suppress(BaseException):
                await task


class Merged:
    """(choice index, output or exception) from all of a request's handles as they come, to iterate once; closing
    the iteration early aborts them all. `queued()`: how many outputs wait unread where this reads them, which is
    where a stream asks whether to hold an event back (coalesced): the single choice's queue for n = 1, else the
    queue the choices' pump tasks fill (they drain each choice's queue into it at once, so those stay empty)."""

    def __init__(self, aengine: AsyncEngineBase, handles: list[RequestHandle]):
        self.aengine, self.handles = aengine, handles
        self._queue: asyncio.Queue | None = None if len(handles) == 1 else asyncio.Queue()

    def queued(self) -> int:
        return self.handles[0].outputs.qsize() if self._queue is None else self._queue.qsize()

    def __aiter__(self) -> AsyncIterator[tuple[int, object]]:
        return self._one() if self._queue is None else self._many()

    async def _one(self) -> AsyncIterator[tuple[int, object]]:
        """The common case, without the fan-in tasks."""
        try:
            async for out in self.aengine.stream(self.handles[0]):
                yield 0, out
        except Exception as e:
            yield 0, e

    async def _many(self) -> AsyncIterator[tuple[int, object]]:
        q = self._queue

        async def pump(i, h):
            try:
                async for out in self.aengine.stream(h):
                    q.put_nowait((i, out))
            except Exception as e:          # an engine failure reaches the client as an error event
                q.put_nowait((i, e))
        tasks = [asyncio.create_task(pump(i, h)) for i, h in enumerate(self.handles)]
        try:
            for _ in range(len(self.handles)):
                while True:
                    i, out = await q.get()
                    yield i, out
                    if isinstance(out, Exception) or out.finished:
                        break
        finally:
            for t in tasks:
                t.cancel()
            for h in self.handles:
                self.aengine.abort(h)


def merged(aengine: AsyncEngineBase, handles: list[RequestHandle]) -> Merged:
    """(choice index, output or exception) from all requests as they come; closing it early aborts them all."""
    return Merged(aengine, handles)


async def coalesced(events: AsyncIterator[str], outputs: Merged) -> AsyncIterator[str]:
    """A stream's SSE events, joined into one write while more outputs already wait in `outputs` (what the events
    read): a stream that lags behind the engine (the event loop serving many of them) catches up in one send through
    the ASGI stack (~0.35 ms per send on the CPU profile, RESULTS.md issue 16) instead of one per step. The bytes are
    the same; a stream that keeps up sends each event as it comes. `outputs.queued()` is one queue's size: O(1) per
    event, whatever the number of choices."""
    buffered = []
    async for event in events:
        buffered.append(event)
        if not outputs.queued():
            yield "".join(buffered)
            buffered = []
    if buffered:
        yield "".join(buffered)


def failure_error(error: Exception) -> APIError:
    """A request the engine did not finish: a 400 where the engine refused it (RequestRefused: the engine's message
    says why), else a 503 (retry): the engine is gone (as for every request after it), or the step that ran the
    request failed (StepFailed: its cause is in the server's log, not the client's answer). Never a 500."""
    if isinstance(error, RequestRefused):
        return APIError(str(error))
    if isinstance(error, EngineStopped):
        return APIError(f"the engine stopped: {error}; retry", 503, "service_unavailable")
    if not isinstance(error, StepFailed):         # (no backend gives another: its text is not the client's)
        log.error("a request failed", exc_info=error)
        error = StepFailed("the engine step failed: this request did not complete; retry it")
    return APIError(str(error), 503, "service_unavailable", code="engine_step_failed")


def engine_failure(outs: list) -> None:
    for o in outs:
        if isinstance(o, Exception):
            raise failure_error(o)


def engine_failure_event(error: Exception) -> dict:
    """A stream has sent its 200 before the engine runs: a failure shows as this error event."""
    return failure_error(error).body()


async def answer(request: Request, state, path: str, prompt_lengths: list[int], req, plan, head, events,
                 respond) -> Response:
    """A planned generation request (/v1/completions, /v1/chat/completions) from submission to its answer: an SSE
    stream of `events(tokenizer, req, plan, head, outputs, run)`, or the final outputs through `respond(tokenizer,
    req, plan, head, outs)` on a worker thread; 499 when the client left, a 400 / 503 when the engine refused or
    failed a job; the route's metrics counted."""
    handles = submit_all(state.aengine, plan.jobs)
    state.metrics.request(path, prompt_lengths)
    if req.stream:
        state.metrics.answered(path)          # the 200 goes out with the first byte
        outputs = merged(state.aengine, handles)
        stream = events(state.tokenizer, req, plan, head, outputs, state.run)
        return StreamingResponse(coalesced(stream, outputs), media_type="text/event-stream")
    outs = await final_outputs(request, state.aengine, handles)
    if outs is None:                # the client left; nobody reads this
        state.metrics.answered(path, 499)
        return Response(status_code=499)
    engine_failure(outs)                # a 400 or 503, counted by the error handler
    response = await state.respond(respond, state.tokenizer, req, plan, head, outs)
    state.metrics.answered(path)
    return response
