"""Loading a Hugging Face checkpoint (bf16/fp32 or the released FP8) into a laid-out model, each rank reading only
the tensors and rows it owns (dsv3.parallel.materialize.owned_parameters): an expert slice reads only its experts'
tensors, an FSDP shard only its rows (safetensors `get_slice`), a pipeline rank only its chunks' tensors. An FP8
weight's row slice is read together with its 128-row scale blocks and dequantised block-aligned, then cut: the
values equal `dsv3.checkpoint.load_pretrained`'s whole-tensor dequantisation."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from ..checkpoint import CheckpointError
from ..checkpoint.hf import CheckpointReader, _dequantize, check_stored, hf_name_map, hf_sources
from ..config import ModelConfig
from ..fp8 import BLOCK
from ..model import Transformer
from ..parallel.materialize import owned_parameters


def check_hf_names(path: str | Path, config: ModelConfig) -> tuple[CheckpointReader, dict]:
    """The directory's reader and the full model's HF names, refused (CheckpointError) unless its tensors are
    exactly the model's; reads the index only, so a run checks its source before writing a file."""
    reader = CheckpointReader(path)
    with torch.device("meta"):
        names = hf_name_map(Transformer(config))      # the full model's names, without allocating it
    reader.check_names(names)
    return reader, names


def hf_source_error(where: str, e: CheckpointError) -> str:
    """The run config's one line for a Hugging Face starting point that does not load (`where`: the key, or the
    base model)."""
    hint = " (a model without its MTP module? set model.num_nextn_predict_layers=0)" \
        if "missing tensors" in str(e) else ""
    return f"invalid run config: {where}: {e}{hint}"


class _Slices:
    """safetensors files opened once; rows [a, b) of a tensor, FP8 dequantised by whole scale blocks."""

    def __init__(self, reader: CheckpointReader):
        self.reader, self.handles, self.bytes_read = reader, {}, 0

    def _slice(self, name: str):
        file = self.reader.weight_map[name]
        try:
            if file not in self.handles:
                self.handles[file] = safe_open(self.reader.path / file, framework="pt")
            return self.handles[file].get_slice(name)
        except Exception as e:      # safetensors' own error types: a truncated or corrupt shard, a name not in it
            raise CheckpointError(f"cannot read tensor {name} from {self.reader.path / file}: {e}") from None

    def rows(self, name: str, a: int | None, b: int | None, dtype: torch.dtype, shape: tuple) -> torch.Tensor:
        """Rows [a, b) (all with a None) of tensor `name`, whose full shape must be `shape` (from the file's header:
        a slice of a tensor with extra rows, or a row broadcast into a stacked expert, would otherwise pass)."""
        sl = self._slice(name)
        file = self.reader.path / self.reader.weight_map[name]
        check_stored(name, file, None, tuple(sl.get_shape()), shape)      # from the header, before any row is read
        whole = a is None
        if name in self.reader.scales:                        # FP8: block-aligned rows, dequantised, then cut
            lo, hi = (0, sl.get_shape()[0]) if whole else (a // BLOCK * BLOCK, b)
            w = sl[lo:hi]
            s = self._slice(self.reader.scales[name])[lo // BLOCK:-(-hi // BLOCK)]
            self.bytes_read += w.numel() * w.element_size() + s.numel() * s.element_size()
            t = _dequantize(name, w, s, dtype)      # load_pretrained's: a wrong dtype or scale shape names the tensor
            return t if whole else t[a - lo:b - lo]
        t = sl[:] if whole else sl[a:b]
        check_stored(name, file, t.dtype, tuple(sl.get_shape()), None)    # an integer tensor: never cast
        if t.dtype.itemsize == 1 and t.dtype.is_floating_point:     # FP8 without its block scales: never cast
            raise CheckpointError(f"tensor {name} in {file} is {str(t.dtype).removeprefix('torch.')} but "
                                  f"{name}_scale_inv is missing")
        self.bytes_read += t.numel() * t.element_size()
        return t.to(dtype)


@torch.no_grad()
def load_hf_owned(modules: Iterable[nn.Module], path: str | Path, config: ModelConfig) -> int:
    """Fill what this rank holds of `modules` (materialised, laid out; `config` the full model's) from the HF
    directory `path`, reading only its own tensors and rows. Returns the bytes read from the files."""
    reader, names = check_hf_names(path, config)
    sources = hf_sources(names)
    files = _Slices(reader)
    for o in owned_parameters(modules, buffers=True):
        src = sources.get(o.name)
        if src is None:                                       # a non-persistent buffer (expert counts)
            continue
        n = o.local.shape[0] if o.local.dim() else 0
        if None not in src:                                   # stacked experts: one HF tensor per row
            for i in range(n):
                o.local[i].copy_(files.rows(src[o.start + i], None, None, o.local.dtype, o.full_shape[1:]))
            continue
        t = files.rows(src[None], None, None, o.local.dtype, o.full_shape) if o.whole else \
            files.rows(src[None], o.start, o.start + n, o.local.dtype, o.full_shape)
        if tuple(t.shape) != tuple(o.local.shape):
            raise CheckpointError(f"tensor {src[None]}: rows of shape {tuple(t.shape)}, this rank holds "
                                  f"{tuple(o.local.shape)} of {o.name}")
        o.local.copy_(t)
    return files.bytes_read

