"""The engine's side of the server: the command/step loop around one Engine (`EngineLoop`), run by AsyncEngine's
thread or by EngineProcess's child process (`engine_process_main`), and what a client is told when its request
fails there: a step that raises fails the requests it ran (StepFailed, a 503 without the exception's text, which is
the server log's), and an add the engine refuses is a 400 if the request is at fault, else a 503. What they are told
is infer/requests.py's (`step_failed`, `refusal`), which a disaggregated worker (infer/disagg.py) tells too.

The event-loop side (submit, stream, abort, back-pressure, /health) is async_engine.py's; the two meet only through
the callables `emit` and `reply` and the commands handed to `EngineLoop.command`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch

from ..infer import Engine
from ..infer.requests import refusal, step_failed

log = logging.getLogger(__name__)


class EngineLoop:
    """The command/step loop around one Engine, in whichever thread or process owns it. `emit(items)` receives
    [(client request id, output or the exception it failed with)] once per step; `reply(future_id, value)` answers
    stats."""

    def __init__(self, engine: Engine, emit: Callable, reply: Callable):
        self.engine, self.emit, self.reply = engine, emit, reply
        self.by_client: dict[int, int] = {}       # client request id -> engine request id
        self.by_engine: dict[int, int] = {}
        self.stopped = False

    def command(self, cmd: tuple) -> None:
        kind = cmd[0]
        if kind == "add":
            _, cid, ids, params = cmd
            try:
                rid = self.engine.add_request(ids, params)
            except Exception as e:          # checked before submit; an engine may check more
                self.emit([(cid, refusal(e, "the engine"))])
                return
            self.by_client[cid], self.by_engine[rid] = rid, cid
        elif kind == "abort":
            rid = self.by_client.get(cmd[1])
            if rid is not None:
                self.engine.abort(rid)
        elif kind == "stats":
            self.reply(cmd[1], self.engine.stats() | {"torch_threads": torch.get_num_threads()})
        elif kind == "stop":
            self.stopped = True

    def step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as e:       # a step that fails fails its requests, not the server
            # only the requests the step ran: it leaves the engine as it was (infer/engine.py Engine.step), so the
            # others run on (they all failed here, queued ones too); every request where the engine cannot tell
            ran = [rid for rid in getattr(self.engine, "step_request_ids", ()) if rid in self.by_engine]
            items = []
            for rid in dict.fromkeys(ran or list(self.by_engine)):       # (a chained step lists a request twice)
                cid = self.by_engine.pop(rid)
                del self.by_client[cid]
                self.engine.abort(rid)   # so that the same batch does not fail again; its blocks return next step
                items.append((cid, step_failed()))
            log.exception("an engine step failed; its %d requests fail with it (503)", len(items))
            self.emit(items, error=repr(e))
            if getattr(self.engine, "broken", False):     # it cannot step again (an EP group out of step): the loop
                raise                                     # ends, and with it the server's health
            time.sleep(0.05)             # an engine that keeps failing must not spin a core
            return
        items = []
        for out in outputs:
            cid = self.by_engine.get(out.request_id)
            if cid is None:
                continue
            if out.finished:
                del self.by_engine[out.request_id], self.by_client[cid]
            items.append((cid, out))
        # an EP group's front (dsv3.infer.ep_driver): requests a rank refused when they reached it
        for rid, error in getattr(self.engine, "take_refused", list)():
            cid = self.by_engine.pop(rid, None)
            if cid is not None:
                del self.by_client[cid]
                items.append((cid, refusal(error, "the engine")))
        if items:
            self.emit(items)


def engine_process_main(factory: Callable[[], Engine], commands, outputs, threads: int) -> None:
    """Child process: build the engine, report its limits, then run the command/step loop."""
    torch.set_num_threads(threads)        # for loading, too
    try:
        engine = factory()
    except BaseException as e:
        outputs.send(("failed", repr(e)))
        return
    torch.set_num_threads(threads)        # the count asked for wins over one the factory may have set
    outputs.send(("ready", engine.limits))
    loop = EngineLoop(engine, lambda items, error=None: outputs.send(("out", items, error)),
                      lambda key, value: outputs.send(("stats", key, value)))
    while not loop.stopped:
        if engine.has_unfinished():
            while commands.poll(0):
                loop.command(commands.recv())
            if not loop.stopped:
                loop.step()
        else:
            loop.command(commands.recv())
