"""Training checkpoints with torch.distributed.checkpoint (DCP): model, optimizer state and step, resharding on load.

`get_state_dict` names every entry by its fully qualified parameter name (optimizer state too: no param ids) and
keeps FSDP2 parameters as DTensors, so each rank writes only its own shards plus the metadata of the global
tensors; `set_state_dict` after `dcp.load` reads whatever slices the loading layout needs. The same directory
therefore loads at any world size, and in a plain single process without any process group (DCP then runs
non-distributed and the tensors are full). Replicated plain tensors (the routing biases, the step) are written
once. `tokens_per_expert` is a non-persistent buffer and is not saved (it is zeroed before every forward).

Atomic: every rank writes into `<path>.tmp`; after a barrier rank 0 renames it to `path` (an older checkpoint at
`path` is moved aside first and deleted after), and a second barrier keeps every rank from returning before the
rename. A crash mid-save leaves `path` as it was. `path` must be on a filesystem every rank sees.
"""

import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict, set_state_dict


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _barrier() -> None:
    if _distributed():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


def _state(model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> dict:
    # (an FSDP2 root left gathered by a no_grad forward is fine: FSDP2's state_dict pre-hook reshards it)
    model_sd, optim_sd = get_state_dict(model, optimizer)   # initialises an optimizer that never stepped
    return {"model": model_sd, "optim": optim_sd, "step": torch.tensor(step, dtype=torch.int64)}


def save_checkpoint(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
    """Write model, optimizer and `step` to the directory `path`, atomically. A collective: every rank calls it."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    state = _state(model, optimizer, step)
    if _rank() == 0:
        if tmp.exists():            # left by a crashed save
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    _barrier()                      # nobody writes into tmp before it is clean
    dcp.save(state, checkpoint_id=str(tmp))
    _barrier()                      # every rank's shards are in tmp
    if _rank() == 0:
        old = path.with_name(path.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        if path.exists():
            path.rename(old)
        tmp.rename(path)
        if old.exists():
            shutil.rmtree(old)
    _barrier()                      # nobody loads (or saves again) before the rename


def load_checkpoint(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Load model (parameters and persistent buffers), optimizer state and hyper-parameters from `path`, resharded
    to the current layout, in place; returns the saved step. A collective when distributed."""
    path = Path(path)
    if not (path / ".metadata").exists():
        raise FileNotFoundError(f"no DCP checkpoint at {path}")
    state = _state(model, optimizer, 0)
    dcp.load(state, checkpoint_id=str(path))    # fills the template's tensors in place, any layout
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return int(state["step"])


def load_model(path: str | Path, model: nn.Module) -> int:
    """Only the model's state from a DCP checkpoint (no optimizer), resharded to `model`'s layout, in place; returns
    the saved step. In a plain process with a full model this gathers the checkpoint whatever layout wrote it."""
    path = Path(path)
    if not (path / ".metadata").exists():
        raise FileNotFoundError(f"no DCP checkpoint at {path}")
    state = {"model": get_model_state_dict(model), "step": torch.tensor(0, dtype=torch.int64)}
    dcp.load(state, checkpoint_id=str(path))       # a subset of the saved keys: the optimizer state is not read
    model.load_state_dict(state["model"])
    return int(state["step"])


def export_hf(path: str | Path, model: nn.Module, out: str | Path, dtype: torch.dtype | None = None) -> int:
    """A DCP checkpoint written by any layout as a Hugging Face directory (`dsv3.checkpoint.save_pretrained`), through
    `model`: a full, unsharded dsv3 Transformer of the run's config (e.g. built on the CPU) in a process without a
    process group. Returns the checkpoint's step."""
    from ..checkpoint import save_pretrained
    if _distributed():
        raise RuntimeError("export_hf runs in a single process (it gathers the whole model): call it outside torchrun")
    step = load_model(path, model)
    save_pretrained(model, out, dtype=dtype)
    return step