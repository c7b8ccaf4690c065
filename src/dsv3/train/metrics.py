"""Training observability: a JSONL metrics log (the source of truth), TensorBoard scalars and a tqdm progress bar.

metrics.jsonl holds one JSON object per line, each with "kind" ("train", "val" or "event"), "step" (the 1-based
optimizer step just completed) and "time" (unix seconds); readers must tolerate extra keys. A resume cuts the train
and val records past its checkpoint (the resumed run logs those steps again) but keeps the events, marked
`"rewound": true` (the stop, spike and NaN records that explain why the earlier run ended). Lines are flushed as
they are written, so a killed run loses at most the line being written, and readers skip such a partial line.
Non-finite floats are written as NaN/Infinity (Python's json reads them back; strict JSON tools do not).

TensorBoard and the progress bar are conveniences: plots (dsv3.train.plot) and tests read the JSONL only.
"""

import json
import math
import os
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from ..checkpoint.atomic import atomic_file

METRICS_FILE = "metrics.jsonl"

# record key -> TensorBoard tag; max_vio per layer is added separately as balance/max_vio/<layer>
TB_TAGS = {
    "train": {"loss": "train/loss", "main_loss": "train/main_loss", "mtp_loss": "train/mtp_loss",
              "aux_loss": "train/aux_loss", "lr": "train/lr", "grad_norm": "train/grad_norm",
              "tok_per_s": "train/tok_per_s", "batch_size": "train/batch_size", "max_vio_mean": "balance/max_vio_mean"},
    "val": {"val_loss": "val/loss", "val_mtp_loss": "val/mtp_loss", "val_mtp_acc": "val/mtp_acc"},
}

_tb_warned = False


def max_violation(load: Sequence[float] | np.ndarray) -> float:
    """MaxVio = max load / mean load - 1 (0 for no load): the balance measure of the aux-loss-free paper."""
    load = np.asarray(load, dtype=np.float64)
    mean = load.mean() if load.size else 0.0
    return float(load.max() / mean - 1.0) if mean > 0 else 0.0


def _jsonable(x: Any) -> Any:
    """Tensors and numpy values into plain Python, so callers can pass what they have without .item()/.tolist()."""
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (str, bool, int, float)) or x is None:
        return x
    if hasattr(x, "tolist"):  # numpy arrays/scalars and torch tensors (moved off the GPU by tolist itself)
        return x.tolist()
    return str(x)


def _metrics_path(run_dir_or_file: str | Path) -> Path:
    p = Path(run_dir_or_file)
    return p / METRICS_FILE if p.is_dir() else p


def read_metrics(run_dir_or_file: str | Path, kind: str | None = None) -> list[dict]:
    """All records of a run (optionally of one kind), in file order. A partial last line (a kill mid-write) is
    skipped silently; an unreadable line elsewhere is skipped with a warning."""
    lines = _metrics_path(run_dir_or_file).read_text().splitlines()
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if i != len(lines) - 1:
                warnings.warn(f"{run_dir_or_file}: skipping unreadable metrics line {i + 1}")
            continue
        if isinstance(rec, dict) and (kind is None or rec.get("kind") == kind):
            records.append(rec)
    return records


def _drop_partial_tail(path: Path) -> None:
    """Cut a trailing line without a newline (a kill mid-write), so the next append starts a fresh line."""
    with open(path, "rb+") as f:
        end = f.seek(0, os.SEEK_END)
        pos = end
        while pos > 0:  # scan backwards in chunks: the file can be large, the tail is short
            start = max(0, pos - 65536)
            f.seek(start)
            chunk = f.read(pos - start)
            if pos == end and chunk.endswith(b"\n"):
                return
            nl = chunk.rfind(b"\n")
            if nl >= 0:
                f.truncate(start + nl + 1)
                return
            pos = start
        f.truncate(0)


class MetricsLogger:
    """Writes RUN_DIR/metrics.jsonl (+ RUN_DIR/tensorboard/) and drives a progress bar over total_steps.

    log_train moves the progress bar to `step` and shows loss, lr and tok/s; call update() for steps that are not
    logged if a smoother bar is wanted. On resume construct with start_step=<resumed step> and call
    truncate_after(start_step) before logging, so that steps replayed after the checkpoint are not duplicated.
    """

    def __init__(self, run_dir: str | Path, total_steps: int, tensorboard: bool = True, progress: bool = True,
                 start_step: int = 0):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / METRICS_FILE
        self.total_steps, self.start_step = total_steps, start_step
        self._f = None  # opened on first write, so truncate_after can rewrite the file before any append
        self._lost, self._write_failed = 0, False      # records a failed write dropped; said once
        self._tb = self._open_tensorboard() if tensorboard else None
        self._bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
                         file=sys.stderr) if progress else None

    def _open_tensorboard(self):
        global _tb_warned
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            if not _tb_warned:
                warnings.warn(f"TensorBoard unavailable ({e}); logging to {METRICS_FILE} only")
                _tb_warned = True
            return None
        # purge_step makes TensorBoard drop events the killed run wrote past the checkpoint we resume from
        purge = self.start_step + 1 if self.start_step > 0 else None
        return SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=purge)

    # ---- the JSONL file ----

    def _write(self, record: dict) -> dict:
        """Append one record. A write that fails (a full disk, an I/O error) drops the record, not the run: a
        multi-day run must not die on its log when its checkpoints may still have room (a save that has none stops
        it, in one line). The first failure is said on stderr; the file is reopened at the next record (its partial
        line cut) and an event then counts the records lost."""
        try:
            if self._f is None:
                if self.path.exists():
                    _drop_partial_tail(self.path)
                self._f = open(self.path, "a", buffering=1)  # noqa: SIM115 (held until close())
            if self._lost:
                self._f.write(json.dumps({"kind": "event", "step": record["step"], "time": time.time(),
                                          "message": f"{self._lost} metrics records before this one were lost to "
                                                     f"write errors"}) + "\n")
                self._f.flush()
                self._lost = 0
            self._f.write(json.dumps(record) + "\n")
            self._f.flush()
        except OSError as e:
            self._lost += 1
            if not self._write_failed:
                tqdm.write(f"warning: cannot write {self.path} ({e}); its records are dropped until it can be "
                           f"written, training goes on", file=sys.stderr)
                self._write_failed = True
            if self._f is not None:
                try:
                    self._f.close()
                except OSError:          # the close flushes what the failed write left buffered: lost too
                    pass
                self._f = None
        return record

    def truncate_after(self, step: int) -> int:
        """Atomically rewrite metrics.jsonl keeping records with step <= `step` (and dropping unreadable lines);
        returns how many were kept. Events past `step` stay, marked `"rewound": true`: they are no replayed data
        but the past (why the earlier run stopped: a signal, a NaN, a spike), which a resume must not erase."""
        if self._f is not None:
            self._f.close()
            self._f = None
        if not self.path.exists():
            return 0
        kept = 0
        with atomic_file(self.path) as tmp, open(self.path) as src, open(tmp, "w") as dst:
            for line in src:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if not isinstance(rec, dict):
                    continue
                past = rec.get("step", 0) > step
                if past and rec.get("kind") != "event":
                    continue
                dst.write(json.dumps({**rec, "rewound": True} if past else rec) + "\n")
                kept += 1
        return kept

    # ---- public logging API ----

    def log_train(self, step: int, **fields: Any) -> dict:
        """Log a "train" record (schema in the module docstring). max_vio is derived from expert_load and
        max_vio_mean from max_vio when not given. Returns the record as written."""
        rec = {"kind": "train", "step": int(step), "time": time.time(), **_jsonable(fields)}
        if rec.get("max_vio") is None and rec.get("expert_load"):
            rec["max_vio"] = [max_violation(load) for load in rec["expert_load"]]
        if rec.get("max_vio_mean") is None and rec.get("max_vio"):
            rec["max_vio_mean"] = float(np.mean(rec["max_vio"]))
        self._write(rec)
        self._scalars("train", rec)
        if rec.get("max_vio") and self._tb is not None:
            names = rec.get("moe_layers") or [str(i) for i in range(len(rec["max_vio"]))]
            for name, v in zip(names, rec["max_vio"]):
                self._tensorboard("add_scalar", f"balance/max_vio/{name}", v, step)
        # the bar shows the main-token loss: the total adds lambda * MTP and alpha * balance terms
        main = rec.get("main_loss")
        self.update(step, main if main is not None else rec.get("loss"), rec.get("lr"), rec.get("tok_per_s"))
        return rec

    def log_val(self, step: int, **fields: Any) -> dict:
        rec = {"kind": "val", "step": int(step), "time": time.time(), **_jsonable(fields)}
        self._write(rec)
        self._scalars("val", rec)
        return rec

    def log_event(self, step: int, message: str, echo: bool = True) -> dict:
        """Log an "event" record (spike, NaN stop, checkpoint, resume) and print it above the progress bar (not with
        `echo=False`: a message that an exception carries to the one line the CLI prints)."""
        rec = self._write({"kind": "event", "step": int(step), "time": time.time(), "message": str(message)})
        if echo:
            tqdm.write(f"[step {step}] {message}", file=sys.stderr)
        self._tensorboard("add_text", "events", str(message), step)
        return rec

    def update(self, step: int, loss: float | None = None, lr: float | None = None,
               tok_per_s: float | None = None) -> None:
        """Move the progress bar to `step` (tqdm derives rate and ETA) and refresh its postfix."""
        if self._bar is None:
            return
        post = {}
        if loss is not None:
            post["loss"] = f"{loss:.4f}"
        if lr is not None:
            post["lr"] = f"{lr:.2e}"
        if tok_per_s is not None:
            post["tok/s"] = f"{tok_per_s:,.0f}"
        if post:
            self._bar.set_postfix(post, refresh=False)
        self._bar.update(max(0, step - self._bar.n))

    def _scalars(self, kind: str, rec: dict) -> None:
        if self._tb is None:
            return
        for key, tag in TB_TAGS[kind].items():
            v = rec.get(key)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                self._tensorboard("add_scalar", tag, v, rec["step"])

    def _tensorboard(self, method: str, *args) -> None:
        """A TensorBoard call that cannot stop the run: its writer thread re-raises a full disk's OSError through
        every later call (and close), which killed the run with a traceback before its checkpoint. The first
        failure is said once and TensorBoard logging stops; metrics.jsonl (its own rule: records dropped while
        it cannot be written) goes on."""
        if self._tb is None:
            return
        try:
            getattr(self._tb, method)(*args)
        except Exception as e:  # noqa: BLE001 - anything the writer raises: this log is optional
            tqdm.write(f"warning: cannot write {self.run_dir / 'tensorboard'} ({e}); TensorBoard logging stops, "
                       f"{METRICS_FILE} goes on", file=sys.stderr)
            tb, self._tb = self._tb, None
            try:
                tb.close()
            except Exception:  # noqa: BLE001 - the same failure again
                pass

    def close(self) -> None:
        if self._f is not None:
            try:
                self._f.close()
            except OSError:             # its flush, on a full disk: those records are lost, as _write's are
                pass
            self._f = None
        self._tensorboard("close")
        self._tb = None
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
