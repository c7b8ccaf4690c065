"""Training checkpoints: everything `--resume` needs to continue bit-exactly, written atomically.

Layout: RUN_DIR/checkpoints/step_{N:08d}/ with
  model.safetensors   parameters and persistent buffers (the routing bias included), full precision
  optimizer.pt        AdamW state
  ema.safetensors     the CPU EMA, when enabled
  rng.pt              torch CPU (and CUDA) generator states
  state.json          step, tokens, data-loader position, loss statistics, spike count
  config.json         the RunConfig of the run
  manifest.json       size and sha256 of every file above, written last
A checkpoint directory exists only once complete (dsv3.checkpoint.atomic_directory): a run killed while saving
leaves the previous checkpoint as the latest, and `.step_N.tmp-*` leftovers that the next start removes. It is
the format of a single process; a torchrun run writes the sharded one below. Either resumes at any world size and
layout (`load_whole_into` cuts a single-process checkpoint to a rank's rows).

At world > 1 the run writes the sharded format instead (`save_sharded`, checkpoint.format=auto): the same
directory name and state.json / config.json / rng.pt, with the weights, optimizer state and EMA as a
torch.distributed.checkpoint directory (`.metadata` + one `*.distcp` file per writing rank: each rank writes only
the rows it holds, dsv3.parallel.dcp). Every rank writes into the temporary sibling; once every rank's writes went
well rank 0 writes the small files and the manifest, last, and renames the directory into place: a half-written
save is never a checkpoint. A rank whose part failed fails every rank at once (_on_every_rank), none waiting out
parallel.timeout_minutes for it. It loads at any world size and layout (`load_sharded`), also into one plain process.
With checkpoint.async_save the shards are written in the background (torch's async_save, after a copy to CPU
memory) and the commit (the small files, the manifest, the rename) waits for every rank's writes: it is
`PendingSave.commit`, which the trainer calls at the next save, at the end and before a signal's save.

Loading verifies the manifest first: a truncated or garbled file is one error naming it (garbled bytes inside a
tensor would otherwise load silently and surface steps later as a non-finite loss), and `--resume` takes the newest
checkpoint that verifies (`newest_valid_checkpoint`), saying which ones it skipped and why.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import sys
from collections.abc import Callable
from concurrent.futures import Future
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import CheckpointException
from safetensors.torch import load_file, save_file
from torch import nn

from ..checkpoint import CheckpointError, atomic_directory
from ..parallel import dcp as sharded
from .step_dirs import MANIFEST, SAVED_FILES, checkpoint_dirs, checkpoint_path, prune_checkpoints
# the rest of the step directories' API, imported from here across the trainer, its tools and the tests
from .step_dirs import (checkpoint_step, is_suspect, last_healthy, latest_checkpoint,  # noqa: F401
                        remove_unfinished_saves)


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (a full disk, an I/O error, lost permissions); nothing of it was left and
    the checkpoints already there are intact. The message is one line saying what to do."""


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):      # streamed: a checkpoint file can be larger than memory
            h.update(chunk)
    return h.hexdigest()


def file_entries(files: list[Path]) -> dict[str, dict]:
    """The manifest's entries of `files`: name -> size and sha256."""
    return {f.name: {"bytes": f.stat().st_size, "sha256": file_sha256(f)} for f in files}


def write_manifest(directory: Path, known: dict[str, dict] | None = None) -> None:
    """The manifest of every file in `directory`; `known`: entries already computed (the sharded format's shards,
    each hashed by the rank that wrote it)."""
    known = known or {}
    rest = [f for f in sorted(directory.iterdir()) if f.is_file() and f.name != MANIFEST and f.name not in known]
    files = dict(sorted({**known, **file_entries(rest)}.items()))
    (directory / MANIFEST).write_text(json.dumps({"files": files}, indent=1))


def verify_checkpoint(path: str | Path, share: tuple[int, int] = (0, 1)) -> None:
    """Raise CheckpointError naming the first file that is missing, truncated or garbled. A checkpoint written
    before manifests existed (no manifest.json, nor have the run's other checkpoints) passes unchecked. share =
    (i, n): of the sha256 checks (the slow part: the whole checkpoint is read) only every n-th file from the i-th,
    the ranks of a job each taking theirs (dsv3.train.run_dir.choose_checkpoint); everything else is checked
    whole."""
    path = Path(path)
    if not (path / MANIFEST).exists():
        if is_sharded(path):            # the sharded format always had one: written last, it marks the commit
            raise CheckpointError(f"{path} has no {MANIFEST}: its save never finished")
        lacking = [f for f in SAVED_FILES if f != "ema.safetensors" and not (path / f).is_file()]
        if lacking:                     # emptied by hand, or not a checkpoint at all: never a resume's choice
            raise CheckpointError(f"{path} has no {MANIFEST} and lacks {', '.join(lacking)}")
        if any((d / MANIFEST).exists() for d in path.parent.glob("step_*") if d != path):
            # the run writes manifests (its other checkpoints have theirs): this one's was deleted, and nothing
            # in the directory can be checked
            raise CheckpointError(f"{path} has no {MANIFEST}, which the run's other checkpoints have: its files "
                                  f"cannot be verified")
        return
    try:
        files = json.loads((path / MANIFEST).read_text())["files"]
        if not isinstance(files, dict) or not all(
                isinstance(w, dict) and isinstance(w.get("bytes"), int) and isinstance(w.get("sha256"), str)
                for w in files.values()):
            raise ValueError("files must map each name to its bytes and sha256")
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path / MANIFEST} is unreadable ({e})") from None
    # a file the save writes that the manifest does not list was never checked: the manifest was edited or is of
    # another save, so nothing it says about this directory can be trusted
    unlisted = sorted(f.name for f in path.iterdir() if f.is_file() and f.name not in files and
                      (f.name in SAVED_FILES or f.name == ".metadata" or f.suffix == ".distcp"))
    if unlisted:
        raise CheckpointError(f"{path / MANIFEST} does not list {', '.join(unlisted)} (edited, or of another save?)")
    for name, want in files.items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{f} is missing")
        size = f.stat().st_size
        if size != want["bytes"]:
            raise CheckpointError(f"{f} has {size} bytes, the manifest says {want['bytes']} (truncated?)")
    for name, want in list(files.items())[share[0]::share[1]]:
        if file_sha256(path / name) != want["sha256"]:
            raise CheckpointError(f"{path / name} does not match its sha256 in the manifest (corrupted)")


def newest_valid_checkpoint(run_dir: str | Path) -> tuple[Path | None, list[str]]:
    """The newest checkpoint that verifies, and one line for each newer one that does not (the file and why)."""
    skipped = []
    for d in reversed(checkpoint_dirs(run_dir)):
        try:
            verify_checkpoint(d)
            return d, skipped
        except CheckpointError as e:
            skipped.append(f"skipping checkpoint {d.name}: {e}")
    return None, skipped


def rng_state() -> dict:
    """The torch generators' states (CPU, and every CUDA device's), as a checkpoint holds them."""
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def save_checkpoint(run_dir: str | Path, step: int, model: nn.Module | dict[str, torch.Tensor],
                    optimizer: torch.optim.Optimizer | dict, state: dict, config: dict, ema_state: dict | None = None,
                    keep: int = 0, rng: dict | None = None) -> Path:
    """The single-process format. model / optimizer: the modules, or their state dicts. rng: rng_state() as of
    `step` (default: now)."""
    target = checkpoint_path(run_dir, step)
    model_state = model if isinstance(model, dict) else model.state_dict()
    optim_state = optimizer if isinstance(optimizer, dict) else optimizer.state_dict()
    with atomic_directory(target) as tmp:
        tensors = {k: v.detach().contiguous().cpu() for k, v in model_state.items()}
        save_file(tensors, str(tmp / "model.safetensors"))
        torch.save(optim_state, tmp / "optimizer.pt")
        if ema_state is not None:
            save_file({k: v.contiguous() for k, v in ema_state.items()}, str(tmp / "ema.safetensors"))
        torch.save(rng if rng is not None else rng_state(), tmp / "rng.pt")
        (tmp / "state.json").write_text(json.dumps({**state, "step": step}, indent=1))
        (tmp / "config.json").write_text(json.dumps(config, indent=1))
        write_manifest(tmp)
    prune_checkpoints(run_dir, target, keep)
    return target



def load_checkpoint(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    restore_rng: bool = True, local: Callable[[dict, dict | None], tuple[dict, dict | None]] | None
                    = None, verify: bool = True) -> dict:
    """Restore model (strictly: every tensor present and of the right shape), optimizer and (for a resumed run)
    the RNG; return state.json with `ema` (a state dict or None, as saved) added. `local` maps the saved (model
    tensors, optimizer state dict) to what this process holds (an expert-parallel rank: its slices). `verify`
    checks the manifest first (off where the caller has just done it)."""
    path = Path(path)
    if not (path / "state.json").exists():
        raise FileNotFoundError(f"{path} is not a training checkpoint (no state.json)")
    if verify:
        verify_checkpoint(path)
    tensors = _read(path / "model.safetensors", lambda f: load_file(str(f)))
    optim_state = (_read(path / "optimizer.pt", lambda f: torch.load(f, map_location="cpu", weights_only=True))
                   if optimizer is not None else None)
    if local is not None:
        tensors, optim_state = local(tensors, optim_state)
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
    wrong = sorted(k for k in set(own) & set(tensors) if own[k].shape != tensors[k].shape)
    if missing or unexpected or wrong:
        raise ValueError(f"checkpoint {path} does not match the model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}, mis-shaped {wrong[:5]}")
    with torch.no_grad():
        for k, v in own.items():
            v.copy_(tensors[k])
    if optimizer is not None:
        optimizer.load_state_dict(optim_state)
    state = _state_and_rng(path, restore_rng)
    ema = path / "ema.safetensors"
    state["ema"] = _read(ema, lambda f: load_file(str(f))) if ema.exists() else None
    return state


def _state_and_rng(path: Path, restore_rng: bool) -> dict:
    """state.json of a checkpoint of either format; with restore_rng, its CPU (and CUDA) generator states set."""
    if restore_rng:
        rng = _read(path / "rng.pt", lambda f: torch.load(f, weights_only=True))
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
    return _read(path / "state.json", lambda f: json.loads(f.read_text()))


def _read(path: Path, load: Callable[[Path], object]):
    """load(path), any failure of the reader (a checkpoint without a manifest can still be damaged) named by the
    file."""
    try:
        return load(path)
    except Exception as e:
        first = str(e).split("\n")[0][:200]
        raise CheckpointError(f"{path} cannot be read ({type(e).__name__}: {first})") from None


def is_sharded(path: str | Path) -> bool:
    """Whether a checkpoint directory is the sharded (DCP) format."""
    return (Path(path) / ".metadata").exists()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


# the outcome exchanges made by this process (_on_every_rank): every rank makes the same ones, in the same order
_exchanges = itertools.count()


def _on_every_rank(fn: Callable[[], object] | None) -> object:
    """fn() on this rank (None: nothing to do here), then every rank's outcome on every rank, in place of a barrier
    (every rank calls it): when a rank's part failed (a full disk, a manifest that could not be written), that rank
    raises its error and every other rank a CheckpointWriteError naming it, at once, rather than waiting out
    parallel.timeout_minutes in a barrier the failed rank never reaches. Returns fn's result on this rank."""
    result, error = None, None
    try:
        if fn is not None:
            result = fn()
    except (Exception, CheckpointException) as e:  # noqa: BLE001  (DCP's CheckpointException: a BaseException)
        error = e
    if not dist.is_initialized():
        if error is not None:
            raise error
        return result
    said = "" if error is None else f"{type(error).__name__}: {str(error).strip()}".split("\n")[0][:300]
    failed = _exchange_outcomes(said)
    if error is not None:
        raise error
    if failed is not None:
        raise CheckpointWriteError(f"rank {failed[0]} failed its part of the save ({failed[1]})")
    return result


def _exchange_outcomes(said: str) -> tuple[int, str] | None:
    """Every rank's `said` ("" when its part went well) through the job's store; the first rank that failed and its
    error, or None. Not a gloo collective: gloo's worker thread drops a finished collective's tensors only after the
    caller's wait returned, and where that collective is the process's last (the final save, then exit) the drop
    can fall in interpreter shutdown, where its taking the GIL ends the thread inside the work's destructor:
    std::terminate, SIGABRT "terminate called without an active exception" (the 2-rank SFT under EP of
    test_par_audit). A store request runs in the calling thread and holds no tensor; a save's last step is this."""
    store = dist.PrefixStore("dsv3/checkpoint/", dist.distributed_c10d._get_default_store())
    seq, rank, world = next(_exchanges), dist.get_rank(), dist.get_world_size()
    keys = [f"{seq}/{r}" for r in range(world)]
    store.set(keys[rank], said)
    try:
        every = [v.decode() for v in store.multi_get(keys)]    # waits for every key, up to the store's timeout
    except RuntimeError as e:           # a rank hung or died: a timeout, as a barrier's would be (cli names it)
        silent = [r for r, k in enumerate(keys) if not store.check([k])]
        raise RuntimeError(f"checkpoint: timed out waiting for rank(s) {silent} to finish their part of the save "
                           f"({str(e).strip().splitlines()[0][:200]})") from e
    if seq > 0:     # every rank read the previous exchange's keys before it set its key of this one
        store.delete_key(f"{seq - 1}/{rank}")
    return next(((r, why) for r, why in enumerate(every) if why), None)


def checkpoint_group() -> dist.ProcessGroup | None:
    """A gloo group of its own for background saves (checkpoint.async_save): the writer thread's collectives then
    never interleave with the training step's on the default group. A collective: every rank calls it; None in one
    process."""
    return dist.new_group(backend="gloo") if dist.is_initialized() else None


def save_sharded(run_dir: str | Path, step: int, entries: dict[str, torch.Tensor], state: dict, config: dict,
                 keep: int = 0, rng: dict | None = None, background: bool = False,
                 group: dist.ProcessGroup | None = None) -> Path | PendingSave:
    """The sharded checkpoint of `step`: `entries` (dsv3.parallel.dcp.owned_state of each rank) written by every
    rank into a temporary directory, then rank 0 adds state.json, config.json, rng.pt and the manifest (last) and
    renames it into place. A collective: every rank calls it; returns the checkpoint's path.
    background (checkpoint.async_save): return once `entries` are copied to CPU memory, the writes continuing in a
    thread over `group` (checkpoint_group()); the PendingSave's commit() (a collective) finishes the save."""
    target = checkpoint_path(run_dir, step)
    # 1. rank 0 makes the temporary directory (renamed into place only by commit) and tells every rank its name (or
    # that it could not)
    stack = ExitStack()
    where = [_on_every_rank((lambda: str(stack.enter_context(atomic_directory(target)))) if _rank() == 0 else None)]
    try:
        if dist.is_initialized():
            dist.broadcast_object_list(where, src=0)
        # 2. every rank writes its shards: now, or staged to CPU and written by torch's background thread
        future = None
        if background:
            future = dcp.async_save(entries, checkpoint_id=where[0], process_group=group)
        else:
            dcp.save(entries, checkpoint_id=where[0])
    except BaseException:
        stack.__exit__(*sys.exc_info())
        raise
    pending = PendingSave(Path(run_dir), target, Path(where[0]), stack, future, group, keep,
                          {**state, "step": step}, config, rng if rng is not None else rng_state())
    return pending if background else pending.commit()


@dataclass
class PendingSave:
    """A sharded save whose shards are written (or being written, `future`) into `tmp`, not yet a checkpoint."""
    run_dir: Path
    target: Path
    tmp: Path
    stack: ExitStack                  # rank 0: atomic_directory(target), entered; closing it renames tmp to target
    future: Future | None
    group: dist.ProcessGroup | None
    keep: int
    state: dict
    config: dict
    rng: dict

    def commit(self) -> Path:
        """Wait for this rank's writes, then for every rank's; rank 0 then adds the small files and the manifest
        (last) and renames the directory into place, and prunes to `keep`. A collective; returns the path. Until it
        returns there is no manifest, so a crash leaves a save that is never resumed."""
        # a rank's failure at any step fails every rank at once (_on_every_rank): none waits for it until the timeout
        try:
            _on_every_rank(self.future.result if self.future is not None else None)   # 3. every rank's written
            shards = self._gather_entries(_on_every_rank(self._hash_shards))
        except BaseException:
            self.stack.__exit__(*sys.exc_info())
            raise
        _on_every_rank((lambda: self._commit(shards)) if _rank() == 0 else None)    # 4. rank 0's commit
        return self.target

    def _commit(self, shards: dict[str, dict]) -> None:
        """Rank 0: the small files, the manifest (last), the rename into place; then `keep` pruning."""
        try:
            torch.save(self.rng, self.tmp / "rng.pt")
            (self.tmp / "state.json").write_text(json.dumps(self.state, indent=1))
            (self.tmp / "config.json").write_text(json.dumps(self.config, indent=1))
            write_manifest(self.tmp, shards)    # the commit marker: written last, over every shard's bytes
        except BaseException:
            self.stack.__exit__(*sys.exc_info())
            raise
        self.stack.close()
        prune_checkpoints(self.run_dir, self.target, self.keep)

    def _hash_shards(self) -> dict[str, dict]:
        """The entries of the shards this rank wrote (DCP names them `__RANK_N.distcp`): every rank hashes its own,
        all at once, since rank 0 alone reading every rank's shards would take hours for a 671B checkpoint
        (terabytes at ~1 GB/s) while the others wait, past any sane parallel.timeout_minutes."""
        return file_entries(sorted(self.tmp.glob(f"__{_rank()}_*.distcp")))

    def _gather_entries(self, own: dict[str, dict]) -> dict[str, dict]:
        """Every rank's shard entries on rank 0 ({} elsewhere), a collective: only rank 0 writes the manifest."""
        if not dist.is_initialized():
            return own
        gathered = [None] * dist.get_world_size(self.group) if _rank() == 0 else None
        dist.gather_object(own, gathered, dst=0, group=self.group)
        return {k: v for part in gathered for k, v in part.items()} if _rank() == 0 else {}


def sharded_keys(path: str | Path) -> set[str]:
    """The entry names a sharded checkpoint holds."""
    return set(dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata)


def load_sharded(path: str | Path, entries: Callable[[bool], dict[str, torch.Tensor]], restore_rng: bool = True
                 ) -> dict:
    """Load a sharded checkpoint into this rank's tensors, in place, whatever layout wrote it: `entries(with_ema)`
    gives them (dsv3.parallel.dcp.owned_state; the EMA's only when the checkpoint has one). Returns state.json with
    `ema` None (the EMA, if any, was loaded in place). A collective when distributed."""
    path = Path(path)
    keys = sharded_keys(path)
    want = entries(any(k.startswith("ema/") for k in keys))
    missing = sorted(k for k in want if k not in keys)
    if missing:
        raise CheckpointError(f"checkpoint {path} does not match the model: missing {missing[:5]}")
    dcp.load(want, checkpoint_id=str(path))
    state = _state_and_rng(path, restore_rng)
    state["ema"] = None
    return state


def read_tensors(path: str | Path) -> dict:
    """A checkpoint of either format as whole tensors in this process, named by parameter: {"model": {name:
    tensor}, "ema": {name: tensor} or None, "optim": {name: {key: tensor}}} (for comparing checkpoints written by
    different layouts; it holds the whole model)."""
    path = Path(path)
    if is_sharded(path):
        meta = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
        entries = {k: torch.empty(md.size, dtype=md.properties.dtype) for k, md in meta.items()}
        dcp.load(entries, checkpoint_id=str(path), no_dist=True)
        out: dict = {"model": {}, "ema": None, "optim": {}}
        for k, t in entries.items():
            kind, rest = k.split("/", 1)
            if kind == "optim":
                name, key = rest.rsplit("/", 1)
                out["optim"].setdefault(name, {})[key] = t
            elif kind == "ema":
                out["ema"] = {**(out["ema"] or {}), rest: t}
            else:
                out["model"][rest] = t
        return out
    from ..model import Transformer
    from .config import RunConfig
    from .optim import param_groups
    cfg = RunConfig.from_dict(json.loads((path / "config.json").read_text()))
    with torch.device("meta"):
        model = Transformer(cfg.model)
    name = {id(p): n for n, p in model.named_parameters()}
    order = [name[id(p)] for g in param_groups(model, 0.0) for p in g["params"]]
    optim = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)["state"]
    ema = path / "ema.safetensors"
    return {"model": load_file(str(path / "model.safetensors")),
            "ema": load_file(str(ema)) if ema.exists() else None,
            "optim": {order[i]: st for i, st in optim.items()}}


def load_whole_into(path: str | Path, entries: Callable[[bool], dict[str, torch.Tensor]], restore_rng: bool = True
                    ) -> dict:
    """A single-process checkpoint into a laid-out rank (any layout): every rank reads the whole files and keeps
    its rows (`dsv3.parallel.dcp.fill_entries`). Returns state.json with `ema` None (loaded in place)."""
    path = Path(path)
    whole = read_tensors(path)
    flat = {f"model/{k}": v for k, v in whole["model"].items()}
    flat.update({f"ema/{k}": v for k, v in (whole["ema"] or {}).items()})
    flat.update({f"optim/{n}/{k}": v for n, st in whole["optim"].items() for k, v in st.items()})
    try:
        sharded.fill_entries(entries(whole["ema"] is not None), flat)
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} does not match the model: {e}") from None
    state = _state_and_rng(path, restore_rng)
    state["ema"] = None
    return state
