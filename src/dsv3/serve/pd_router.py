"""The router of a prefill/decode-disaggregated deployment (`dsv3 serve --role router`): the OpenAI API in front of
prefill and decode workers (dsv3.infer.disagg), as an engine backend of the ordinary server (build_app).

    dsv3 serve --role prefill --model DIR --pd-listen 127.0.0.1:7001
    dsv3 serve --role decode  --model DIR --pd-listen 127.0.0.1:7002      # as many as wanted
    dsv3 serve --role router  --model DIR --prefill 127.0.0.1:7001 --decode 127.0.0.1:7002,127.0.0.1:7003

A request goes to the prefill worker with the fewest requests in flight; its first token streams to the client at
once, and its latent cache (a shared-memory file, KVHandle) goes with the request to the decode worker with the
fewest in flight, which produces the rest. The router moves only handles; `kv_bytes` counts what the workers hand
over. A worker whose connection drops fails the requests it held with an error naming its role (a 503, as a dead
engine process's), is skipped from then on, and every other request keeps going; a step that fails in a worker fails
the requests it ran (as the unified engine's). With no live worker left for a role, /health is 503 and so is every
request. What a client reads (a 503's message, /health's body) names a role only: a worker's address and the error
that lost it are the server log's (`logging`, this module's logger), as the unified engine's step failures are.
The workers only need the socket address and the shared key (`--pd-key`, else the DSV3_PD_KEY environment variable,
else a random per-user key in ~/.cache/dsv3/pd.key): the key is what lets a router in.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
from dataclasses import dataclass, field
from multiprocessing.connection import Client, Connection

import torch

from ..infer.disagg import PREFILLED, discard_kv, parse_address, pd_key
from ..infer.engine import RequestOutput
from .async_engine import AsyncEngineBase, EngineStopped, Writer

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Worker:
    role: str            # "prefill" or "decode"
    address: str
    conn: Connection
    stats: dict
    alive: bool = True
    in_flight: set = field(default_factory=set)
    # the router's messages, sent in order by a thread of their own (a send waits for the worker's next read)
    writer: Writer | None = None


@dataclass(eq=False)
class _Request:
    ids: list[int]
    params: object
    worker: Worker
    handle: object = None        # the KV handed to the decode worker, until it answers
    aborted: bool = False        # its client went away


class PDRouter(AsyncEngineBase):
    def __init__(self, prefill: list[str], decode: list[str], tokenizer, max_pending: int = 256,
                 key: str | None = None):
        if not prefill or not decode:
            raise ValueError("a router needs at least one --prefill and one --decode worker")
        self.workers = [self._connect(role, a, pd_key(key)) for role, addrs in (("prefill", prefill),
                                                                              ("decode", decode)) for a in addrs]
        limits = {w.stats.pop("limits") for w in self.workers}
        if len(limits) != 1:
            raise ValueError(f"the workers serve with different limits {limits}: give them the same model and flags")
        super().__init__(limits.pop(), tokenizer, max_pending)
        self.requests: dict[int, _Request] = {}
        self.kv_bytes = 0
        self.stopping = False
        self.lock = threading.Lock()
        for w in self.workers:
            w.writer = Writer(lambda message, w=w: w.conn.send(message), f"dsv3-pd-{w.role}-writer",
                              lambda e, w=w: self._lost(w, f"cannot send to it: {e!r}"))
            threading.Thread(target=self._read, args=(w,), name=f"dsv3-pd-{w.role}", daemon=True).start()

    @staticmethod
    def _connect(role: str, address: str, key: bytes) -> Worker:
        try:
            conn = Client(parse_address(address), authkey=key)
        except (OSError, EOFError) as e:
            raise ValueError(f"cannot reach the {role} worker at {address}: {e}") from None
        hello = conn.recv()
        if hello[1] != role:
            raise ValueError(f"{address} is a {hello[1]} worker, not a {role} worker")
        return Worker(role, address, conn, hello[3] | {"limits": hello[2]})

    def _pick(self, role: str) -> Worker | None:
        """The live worker of `role` with the fewest requests in flight (the router's load signal)."""
        live = [w for w in self.workers if w.role == role and w.alive]
        return min(live, key=lambda w: len(w.in_flight), default=None)

    # ---- commands from the event loop (AsyncEngineBase) -----------------------------------------------------------
    def _put(self, command: tuple) -> None:
        kind = command[0]
        if kind == "add":
            _, cid, ids, params = command
            with self.lock:
                w = self._pick("prefill")
                if w is not None:
                    self.requests[cid] = _Request(ids, params, w)
                    w.in_flight.add(cid)
            if w is None:
                self._on_step([(cid, EngineStopped("no prefill worker is alive"))])
                return
            self._to_worker(w, ("add", cid, ids, params))
        elif kind == "abort":
            with self.lock:          # with _route's hand-off: the abort goes where the request is, after it
                req = self.requests.get(command[1])
                if req is not None:
                    req.aborted = True
                    self._to_worker(req.worker, ("abort", command[1]))
        elif kind == "stats":
            self._reply(command[1], self.stats_now())

    def _to_worker(self, w: Worker, message: tuple) -> None:
        """Queued for the worker's writer, which fails the worker (`_lost`) if the send does."""
        w.writer.put(message)

    # ---- worker side ----------------------------------------------------------------------------------------------
    def _read(self, w: Worker) -> None:
        while True:
            try:
                msg = w.conn.recv()
            except (EOFError, OSError) as e:
                self._lost(w, f"connection lost: {e!r}")
                return
            except Exception as e:          # unpickling
                return self._unreadable(w, e)
            if self.stopping:
                return
            try:
                w.stats = msg[2]
                items = [item for cid, out, handle in msg[1] for item in self._route(w, cid, out, handle)]
            except Exception as e:
                return self._unreadable(w, e)
            self._on_step(items)

    def _unreadable(self, w: Worker, error: Exception) -> None:
        """A message this router cannot read (from a worker of another dsv3 version): the worker is lost, as if its
        connection dropped, and the connection closed (the worker aborts what it holds). Before, this thread died
        and the worker's requests waited forever."""
        self._lost(w, f"sent a message the router cannot read: {error!r}")
        with contextlib.suppress(OSError):
            w.conn.close()

    def _route(self, w: Worker, cid: int, out: RequestOutput | None, handle) -> list:
        """What a worker's output means for the client: [(client id, output or error)]."""
        with self.lock:
            req = self.requests.get(cid)
        if req is None:
            return []
        if out is None:                 # refused by the worker (RequestRefused), or its step failed (StepFailed)
            if not isinstance(handle, Exception):           # not a message of this version's workers: _unreadable
                raise TypeError(f"a failed request's error is a {type(handle).__name__}, not an exception")
            self._done(cid, w)
            return [(cid, handle)]
        out.request_id = cid
        if w.role == "prefill" and out.finish_reason == PREFILLED:
            with self.lock:
                # an abort the prefill worker read after the step that prefilled the request found nothing to stop
                # there: the request ends here (before, it was decoded to the end for a client that had left)
                d = None if req.aborted else self._pick("decode")
                w.in_flight.discard(cid)
                if d is not None:
                    req.worker, req.handle = d, handle
                    d.in_flight.add(cid)
                    self.kv_bytes += handle.nbytes
                    self._to_worker(d, ("decode", cid, req.ids, out, req.params, handle))
            if d is None:
                discard_kv(handle)
                self._done(cid, None)
                return [(cid, dataclasses.replace(out, finish_reason="abort") if req.aborted
                         else EngineStopped("no decode worker is alive"))]
            # the first token goes to the client now (a delta), the rest comes from the decode worker
            return [(cid, RequestOutput(cid, [], [], "", False, None, out.new_token_ids, [], out.prompt_logprobs,
                                        out.new_logprobs))]
        req.handle = None                                        # the decode worker has taken the latents
        if out.finished:
            self._done(cid, w)
        return [(cid, out)]

    def _done(self, cid: int, w: Worker | None) -> None:
        with self.lock:
            self.requests.pop(cid, None)
            if w is not None:
                w.in_flight.discard(cid)

    def _lost(self, w: Worker, why: str = "connection lost") -> None:
        """A worker's connection dropped: fail its requests (naming its role), never route to it again. Its address
        and `why` (an exception's text) go to the log only: a client learns nothing of the deployment's insides."""
        with self.lock:
            if not w.alive or self.stopping:
                return
            w.alive = False
            lost = [(cid, self.requests.pop(cid)) for cid in list(w.in_flight) if cid in self.requests]
            w.in_flight.clear()
        for _, req in lost:
            if req.handle is not None:
                discard_kv(req.handle)
        log.error("the %s worker at %s failed (%s); %d requests were lost with it", w.role, w.address, why, len(lost))
        if not self.alive:
            log.critical("no live %s worker is left (the last, at %s, was lost): every request fails with 503 from "
                         "now on", w.role, w.address)
        # EngineStopped, as for the requests of an engine process that exits: a 503 (retry); /health turns unhealthy
        # only when a role has no live worker left (and says which role, as _stopped_reason does)
        self._on_step([(cid, EngineStopped(f"the {w.role} worker serving this request was lost; retry the request"))
                       for cid, _ in lost], error=None if self.alive else f"no live {w.role} worker")

    # ---- AsyncEngineBase ------------------------------------------------------------------------------------------
    @property
    def alive(self) -> bool:
        return any(w.alive for w in self.workers if w.role == "prefill") and \
            any(w.alive for w in self.workers if w.role == "decode")

    def _stopped_reason(self) -> str:
        gone = [r for r in ("prefill", "decode") if not any(w.alive for w in self.workers if w.role == r)]
        return f"no live {' or '.join(gone)} worker" if gone else "engine stopped"

    def stats_now(self) -> dict:
        live = [w for w in self.workers if w.alive]
        decode = [w.stats for w in live if w.role == "decode"]
        blocks = sum(s["num_blocks"] for s in decode)
        free = sum(s["free_blocks"] for s in decode)
        # running totals (counters) over every worker, gone ones too (their last stats): a total that dropped when a
        # worker died would count again from zero in /metrics
        total = {k: sum(w.stats.get(k, 0) for w in self.workers) for k in ("preemptions", "spec_proposed",
                                                                            "spec_accepted")}
        return dict(running=sum(w.stats["running"] for w in live), waiting=sum(w.stats["waiting"] for w in live),
                    cache_usage=1 - free / blocks if blocks else 0.0, **total,
                    torch_threads=torch.get_num_threads(), kv_bytes=self.kv_bytes,
                    workers=[dict(role=w.role, address=w.address, alive=w.alive, in_flight=len(w.in_flight))
                             for w in self.workers])

    def _stop_backend(self) -> None:
        self.stopping = True
        for w in self.workers:
            w.writer.close()
            try:
                w.conn.close()
            except OSError:
                pass


def pd_router_from_args(args, tokenizer) -> PDRouter:
    """`dsv3 serve --role router`'s backend from its flags."""
    split = lambda v: [a for a in (v or "").split(",") if a]      # noqa: E731
    return PDRouter(split(args.prefill), split(args.decode), tokenizer, args.max_pending, args.pd_key)
