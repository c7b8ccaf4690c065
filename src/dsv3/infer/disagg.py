"""Prefill/decode disaggregation (TR 3.4: prefill and decode run on separate machines with their own parallelism):
engines for the two roles, the latent-cache hand-off between them, and the worker loop behind a socket.

  * `PrefillEngine`: an Engine that stops each request after its first sampled token (finish reason "prefilled",
    unless the request truly finished there: a stop token, max_tokens=1) and exports the request's latent cache:
    c_kv and k_pe of every prompt position in every layer, the 576 values per token and layer of MLA (spec 1.4).
  * `DecodeEngine`: an Engine that imports such a request (blocks allocated, latents written into its paged cache,
    the first token appended) and decodes it to the end as if it had prefilled it itself.
  * the hand-off (`export_kv` / `import_kv`): one file in shared memory (/dev/shm) per request, written by the
    prefill worker and read and removed by the decode worker; only its path crosses the sockets. Bytes are counted on
    both sides. Between machines (`handoff="inline"`, `--pd-handoff inline` on a prefill worker) the bytes travel
    in the handle itself, through the router's two connections (a copy in each process on the way: NCCL or RDMA
    would move them device to device; not here).
  * `serve_worker(engine, listener)`: a worker process's loop: one router connection at a time, commands in
    ("add", "decode", "abort"), after every step one message out with the step's outputs and the engine's stats.
    An EP group serves as one worker through it too (dsv3.infer.ep_disagg: rank 0's EPFront as the engine).

What is exact: greedy requests give the unified engine's tokens (the decode worker reads the very latents the
prefill worker computed), and so do seeded sampled ones where both workers sample on the same kind of device: the
hand-off carries the request's generator state after its first token, and the decode worker's generator goes on
from it (between a CPU and a CUDA worker the decode side starts a fresh generator from the seed: the two kinds'
states do not convert).

MTP speculation (spec 1.8) on the decode side: a decode worker speculates when its prefill workers run the MTP module
too (both with `num_speculative_tokens`). Such a prefill worker never speculates itself (every request ends at its
first token: `MTPCatchUp`); before exporting a request it catches the MTP module up over the prompt, as a unified
engine's first draft would, and the hand-off carries that module's latents (one more cache layer) and the main model's
hidden state at the prompt's last position (the next draft's input). The decode worker re-runs that one position and
drafts from there. A non-speculating decode worker drops the extra layer; a speculating one refuses a request
prefilled without it (its drafts would have no MTP context), naming the setting.
"""

from __future__ import annotations

import logging
import os
import secrets
import tempfile
import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from multiprocessing import AuthenticationError
from multiprocessing.connection import Connection, Listener

import torch

from .config import EngineConfig
from .engine import Engine, RequestOutput
from .requests import refusal, step_failed
from .sampling import SamplingParams, make_generators
from .sequence import Sequence, Status
from .speculation import Speculation

log = logging.getLogger(__name__)

PREFILLED = "prefilled"


@dataclass(frozen=True)
class KVHandle:
    """A request's latent cache in a shared-memory file at `path` (or inline, in `data`): c_kv (layers, n, C) then
    k_pe (layers, n, R), then, from a prefill worker that ran the MTP module (whose latents are the last layer then),
    the main model's hidden state at the prompt's last position (D,) in `h_dtype`."""
    path: str                       # "" where the bytes are `data`'s (an inline hand-off)
    c_shape: tuple[int, ...]
    r_shape: tuple[int, ...]
    dtype: str
    nbytes: int
    h_shape: tuple[int, ...] = ()
    h_dtype: str = ""
    data: bytes | None = None
    rng: bytes | None = None        # a seeded request's generator state after its first token
    rng_device: str = ""            # ... of a generator of this device type ("cpu", "cuda")


def _shm_dir() -> str:
    return "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()


def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


HANDOFFS = ("shm", "inline")


def export_kv(c_kv: torch.Tensor, k_pe: torch.Tensor, hidden: torch.Tensor | None = None,
              handoff: str = "shm") -> KVHandle:
    """A hand-off of the latents (and the hidden state): a shared-memory file, or with `handoff="inline"` the bytes
    in the handle."""
    parts = [c_kv.reshape(-1).view(torch.uint8), k_pe.reshape(-1).view(torch.uint8)]
    if hidden is not None:
        parts.append(hidden.reshape(-1).view(torch.uint8))
    flat = torch.cat(parts)
    h = {} if hidden is None else dict(h_shape=tuple(hidden.shape), h_dtype=_dtype_name(hidden))
    shapes = (tuple(c_kv.shape), tuple(k_pe.shape), _dtype_name(c_kv), flat.numel())
    if handoff == "inline":
        return KVHandle("", *shapes, **h, data=flat.numpy().tobytes())
    path = os.path.join(_shm_dir(), f"dsv3-kv-{uuid.uuid4().hex}")
    out = torch.from_file(path, shared=True, size=flat.numel(), dtype=torch.uint8)
    out.copy_(flat)
    return KVHandle(path, *shapes, **h)


def import_kv(handle: KVHandle) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The latents of a handle and its hidden state (None: the prefill worker ran no MTP module); the file is
    removed from shared memory."""
    if handle.data is not None:
        if len(handle.data) != handle.nbytes:
            raise ValueError(f"an inline hand-off of {len(handle.data)} bytes, not the {handle.nbytes} its shapes say")
        raw = torch.frombuffer(bytearray(handle.data), dtype=torch.uint8)
    else:
        try:
            raw = torch.from_file(handle.path, shared=False, size=handle.nbytes, dtype=torch.uint8).clone()
        finally:
            discard_kv(handle)
    dtype = getattr(torch, handle.dtype)
    sizes = [torch.Size(shape).numel() * dtype.itemsize for shape in (handle.c_shape, handle.r_shape)]
    c_kv, k_pe, rest = raw.split([*sizes, raw.numel() - sum(sizes)])
    hidden = rest.view(getattr(torch, handle.h_dtype)).view(handle.h_shape) if handle.h_dtype else None
    return c_kv.view(dtype).view(handle.c_shape), k_pe.view(dtype).view(handle.r_shape), hidden


def discard_kv(handle: KVHandle) -> None:
    if not handle.path:                 # inline: nothing outside the handle
        return
    try:
        os.unlink(handle.path)
    except FileNotFoundError:
        pass


class MTPCatchUp(Speculation):
    """A prefill worker's MTP module: it keeps up with the prompt (settle, catch_up) and never drafts (`applies`:
    every request ends at its first token)."""

    def applies(self, seqs: list[Sequence], counts: list[int]) -> bool:
        return False


class PrefillEngine(Engine):
    """Each request ends after its first token; a "prefilled" one leaves its latents in `exported[request_id]`. With
    `num_speculative_tokens` (for speculating decode workers) the MTP module's latents and the last hidden state go
    with them (module docstring). `handoff`: "shm" (a shared-memory file: decode workers on this machine) or
    "inline" (the bytes in the handle: any machine). `kwargs`: for an engine class after this one
    (dsv3.infer.ep_disagg: an EP group's prefill worker)."""

    role = "prefill"

    def __init__(self, model, tokenizer=None, config: EngineConfig | None = None, handoff: str = "shm", **kwargs):
        if handoff not in HANDOFFS:
            raise ValueError(f"handoff must be one of {HANDOFFS}, got {handoff!r}")
        super().__init__(model, tokenizer, config, **kwargs)
        self.handoff = handoff
        if self.speculation is not None:
            self.speculation = MTPCatchUp(self)
        self.exported: dict[int, KVHandle] = {}
        self.kv_bytes_sent = 0

    @property
    def overlap(self) -> bool:
        """Synchronous steps: every request ends at its first token, so a chained step (dsv3.infer.overlap) would
        only compute tokens to discard."""
        return False

    def _append(self, seq: Sequence, token: int) -> None:
        super()._append(seq, token)
        if not seq.finished:
            self._finish(seq, PREFILLED)

    def _finish(self, seq: Sequence, reason: str) -> None:
        if reason == PREFILLED:       # before the blocks go back: the prompt's latents, every layer
            n, table = seq.num_cached_tokens, torch.tensor(seq.block_table, device=self.device)
            hidden = self._catch_up_mtp(seq, n) if self.speculative else None
            c_kv = self.cache.c_kv[:, table].flatten(1, 2)[:, :n].cpu()
            k_pe = self.cache.k_pe[:, table].flatten(1, 2)[:, :n].cpu()
            handle = export_kv(c_kv, k_pe, hidden, self.handoff)
            generator = self._generators.get(seq.seq_id)      # (dropped by Engine._finish below)
            if generator is not None:
                handle = replace(handle, rng=generator.get_state().numpy().tobytes(),
                                 rng_device=generator.device.type)
            self.exported[seq.seq_id] = handle
            self.kv_bytes_sent += handle.nbytes
        super()._finish(seq, reason)

    def _catch_up_mtp(self, seq: Sequence, n: int) -> torch.Tensor:
        """The MTP module's latents of prompt positions < n - 1 written (those `settle` has not), and the main
        model's hidden state at position n - 1, which the decode worker's first draft pairs with the first token."""
        if n - 1 > seq.mtp_cached:
            self.speculation.catch_up([seq], [n - 1])
        return seq.pending_hidden[-1][-1].cpu()     # (pending rows end at position num_cached_tokens - 1 = n - 1)

    def stats(self) -> dict:
        return super().stats() | {"kv_bytes_sent": self.kv_bytes_sent}


class DecodeEngine(Engine):
    """Imports prefilled requests (`add_prefilled`) and decodes them; plain requests work as in any Engine.
    `kwargs`: as PrefillEngine's."""

    role = "decode"

    def __init__(self, model, tokenizer=None, config: EngineConfig | None = None, **kwargs):
        super().__init__(model, tokenizer, config, **kwargs)
        self.kv_bytes_received = 0
        self._imports: list[tuple[Sequence, torch.Tensor, torch.Tensor, torch.Tensor | None]] = []

    def add_prefilled(self, prompt_ids: list[int], first: RequestOutput, params: SamplingParams,
                      handle: KVHandle) -> int:
        """Queue a request whose prompt a prefill worker ran (`first`: its output there); ValueError if it can never
        fit here. The hand-off is consumed either way."""
        try:
            ids = self.check_prefilled(prompt_ids, params, handle)
        except ValueError:
            discard_kv(handle)
            raise
        c_kv, k_pe, hidden = import_kv(handle)
        if not self.speculative:         # the MTP module's share of a speculating prefill worker: not used here
            main = self.model.config.num_hidden_layers
            c_kv, k_pe, hidden = c_kv[:main], k_pe[:main], None
        self.kv_bytes_received += handle.nbytes
        rid = self._queue_imported(ids, first, params, handle)
        self._imports.append((self.seqs[rid], c_kv, k_pe, hidden))
        return rid

    def check_prefilled(self, prompt_ids: list[int], params: SamplingParams, handle: KVHandle) -> list[int]:
        """The prompt's ids if this worker can take the hand-off (its shapes, from the handle alone), else ValueError;
        the handle is the caller's to discard then."""
        ids = self.check_request(prompt_ids, params)
        cfg = self.model.config
        layers, n = handle.c_shape[:2]
        mtp = bool(handle.h_dtype)
        if self.speculative and not mtp:
            raise ValueError("this decode worker speculates (num_speculative_tokens) and the request was prefilled "
                             "without the MTP module: run the prefill workers with --spec too")
        if (layers, n) != (cfg.num_hidden_layers + mtp, len(ids)) or (mtp and handle.h_shape != (cfg.hidden_size,)):
            raise ValueError(f"latents of shape {handle.c_shape} do not fit this model / prompt")
        return ids

    def _queue_imported(self, ids: list[int], first: RequestOutput, params: SamplingParams, handle: KVHandle) -> int:
        rid = next(self._ids)
        seq = Sequence(rid, ids, params)
        seq.token_ids.extend(first.new_token_ids)
        seq.logprobs, seq.prompt_logprobs = list(first.new_logprobs), list(first.prompt_logprobs)
        self.seqs[rid] = seq
        generator = make_generators([params], self.device)[0]
        if generator is not None:
            if handle.rng is not None and handle.rng_device == generator.device.type:   # the stream goes on
                generator.set_state(torch.frombuffer(bytearray(handle.rng), dtype=torch.uint8))
            self._generators[rid] = generator
        return rid

    def has_unfinished(self) -> bool:
        return super().has_unfinished() or bool(self._imports)

    def step(self) -> list[RequestOutput]:
        self._admit_imports()
        return super().step()

    def _admit_imports(self) -> None:
        """Imported requests join the running batch, oldest first, while blocks and the sequence limit allow."""
        while self._imports and len(self.scheduler.running) < self.config.max_num_seqs:
            seq, c_kv, k_pe, hidden = self._imports[0]
            if seq.finished:                       # aborted while waiting
                self._imports.pop(0)
                continue
            if not self.blocks.can_allocate(seq, share=False):
                return
            self._imports.pop(0)
            self.blocks.allocate(seq, share=False)
            n = c_kv.shape[1]
            slots = torch.tensor(self.cache.slots(seq.block_table, 0, n), device=self.device)
            for layer in range(c_kv.shape[0]):
                self.cache.write(layer, slots, c_kv[layer].to(self.device), k_pe[layer].to(self.device))
            seq.num_cached_tokens = n
            if hidden is not None:     # the MTP module has seen positions < n - 1; the first draft re-runs n - 1
                seq.mtp_cached, seq.pending_hidden = n - 1, [hidden[None].to(self.device)]
            self.blocks.mark_computed(seq)
            seq.status = Status.RUNNING
            self.scheduler.running.append(seq)

    def abort(self, request_id: int) -> None:
        seq = self.seqs.get(request_id)
        if seq is not None and not seq.finished and any(s is seq for s, *_ in self._imports):
            self._imports = [i for i in self._imports if i[0] is not seq]
            seq.status, seq.finish_reason = Status.FINISHED, "abort"
            self._aborted.append(seq)
            return
        super().abort(request_id)

    def stats(self) -> dict:
        return super().stats() | {"kv_bytes_received": self.kv_bytes_received, "waiting": len(
            self.scheduler.waiting) + len(self._imports)}


# ---- the worker process ----------------------------------------------------------------------------------------------
def _command(engine: Engine, conn: Connection, cmd: tuple, to_client: dict[int, int]) -> None:
    kind = cmd[0]
    try:
        if kind == "add":                                  # ("add", client id, prompt ids, params)
            to_client[engine.add_request(cmd[2], cmd[3])] = cmd[1]
        elif kind == "decode":                             # ("decode", client id, prompt ids, first, params, kv)
            to_client[engine.add_prefilled(cmd[2], cmd[3], cmd[4], cmd[5])] = cmd[1]
        elif kind == "abort":
            for rid, cid in list(to_client.items()):
                if cid == cmd[1]:
                    engine.abort(rid)
    except Exception as e:          # a refused request (ValueError, the router's client gets a 400 with its message),
        error = refusal(e, f"the {engine.role} worker")      # an unreadable hand-off (logged here, a 503 there)
        conn.send(("step", [(cmd[1], None, error)], engine.stats()))


def _step(engine: Engine, conn: Connection, to_client: dict[int, int]) -> None:
    try:
        outputs = engine.step()
    except Exception:
        # as the server's own engine loop (serve/engine_loop.py EngineLoop.step): a step that fails fails the
        # requests it ran, aborted so that the same batch does not fail again; the worker and its other requests
        # go on. (Uncaught, it ended the worker process and every request it held.)
        ran = [rid for rid in engine.step_request_ids if rid in to_client]
        items = []
        for rid in dict.fromkeys(ran or list(to_client)):      # (a chained step lists a request twice)
            engine.abort(rid)
            if rid in getattr(engine, "exported", {}):      # a prefill worker's: its latents go nowhere now
                discard_kv(engine.exported.pop(rid))
            # the cause is this process's log's (traceback included), not the client's answer
            items.append((to_client.pop(rid), None, step_failed(type(engine).__name__)))
        log.exception("the %s's step failed; its %d requests fail with it", type(engine).__name__, len(items))
        conn.send(("step", items, engine.stats()))
        if getattr(engine, "broken", False):      # it cannot step again (an EP group out of step): the worker ends,
            raise                                 # and the router fails over to its other workers
        time.sleep(0.05)             # an engine that keeps failing must not spin a core
        return
    items = []
    for out in outputs:
        cid = to_client.get(out.request_id)
        if cid is None:
            continue
        if out.finished:
            del to_client[out.request_id]
        handle = engine.exported.pop(out.request_id, None) if engine.role == "prefill" else None
        items.append((cid, out, handle))
    for rid, error in getattr(engine, "take_refused", list)():    # an EP group's: refused on the rank serving it
        if rid in to_client:
            items.append((to_client.pop(rid), None, refusal(error, f"the {engine.role} worker")))
    conn.send(("step", items, engine.stats()))


def serve_worker(engine: Engine, listener: Listener) -> None:
    """Serve routers one connection at a time, forever: a closed connection aborts its requests."""
    while True:
        try:
            conn = listener.accept()
        except (EOFError, OSError, AuthenticationError) as e:     # a probe, a wrong key: not a router
            print(f"refused a connection: {e!r}", flush=True)
            continue
        to_client: dict[int, int] = {}
        try:
            conn.send(("hello", engine.role, engine.limits, engine.stats()))
            while True:
                if not engine.has_unfinished() or conn.poll(0):
                    cmd = conn.recv()
                    if cmd[0] == "stop":
                        conn.close()
                        return
                    _command(engine, conn, cmd, to_client)
                    continue
                _step(engine, conn, to_client)
        except (EOFError, OSError):      # the router went away (engine failures are caught by _command / _step)
            for rid in list(to_client):
                engine.abort(rid)
            while engine.has_unfinished():
                try:
                    engine.step()
                except Exception as e:      # every request was aborted above: nothing is left to fail but this step
                    print(f"a step failed while ending a router's requests: {e!r}", flush=True)
                    time.sleep(0.05)


def pd_key(key: str | None, key_file: str | os.PathLike | None = None) -> bytes:
    """The key routers and workers share: `--pd-key`, else DSV3_PD_KEY, else a random key kept in a file only this
    user can read (`~/.cache/dsv3/pd.key`, created on first use). Messages between them are pickles, which
    authenticated peers can make execute code, so the key is never a fixed string that any local user could know."""
    if key or os.environ.get("DSV3_PD_KEY"):
        return (key or os.environ["DSV3_PD_KEY"]).encode()
    path = Path(key_file) if key_file else Path.home() / ".cache" / "dsv3" / "pd.key"
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    except FileExistsError:
        pass
    if path.stat().st_mode & 0o077:
        raise ValueError(f"{path} is readable by other users: chmod 600 it, or pass --pd-key / set DSV3_PD_KEY")
    return path.read_text().strip().encode()


def check_listen_address(host: str, key: str | None) -> None:
    """A worker reachable from other machines needs a key chosen for it (the per-user key file is only shared by
    processes of one user on one machine)."""
    if host not in ("127.0.0.1", "localhost", "::1") and not (key or os.environ.get("DSV3_PD_KEY")):
        raise ValueError(f"--pd-listen {host}: a worker listening beyond loopback needs --pd-key (or DSV3_PD_KEY), "
                         f"the same on the router and every worker")


def parse_address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"worker address {text!r} is not HOST:PORT")
    return host, int(port)


def run_worker(role: str, model, tokenizer, config, address: str, key: str | None = None,
               threads: int | None = None, handoff: str = "shm") -> None:
    """`dsv3 serve --role prefill|decode`: the role's engine behind a socket at `address`, until a router says stop
    (with `threads` torch threads; `handoff`: a prefill worker's, PrefillEngine's)."""
    if threads:
        torch.set_num_threads(threads)
    check_listen_address(parse_address(address)[0], key)
    engine = PrefillEngine(model, tokenizer, config, handoff=handoff) if role == "prefill" else \
        DecodeEngine(model, tokenizer, config)
    with open_listener(address, key) as listener:
        print(f"{role} worker listening on {address}", flush=True)
        serve_worker(engine, listener)


def open_listener(address: str, key: str | None) -> Listener:
    """A worker's authenticated socket at `address` (HOST:PORT); ValueError naming the address where it cannot
    listen there."""
    host, port = parse_address(address)
    check_listen_address(host, key)
    try:
        return Listener((host, port), authkey=pd_key(key))
    except OSError as e:
        raise ValueError(f"cannot listen on {address}: {e}") from None
