"""Filling a model laid out on its device (built on meta, then `to_empty`) from a Hugging Face directory, shard
file by shard file, each tensor read at most once: the one whole-model load (`load_pretrained`) and a serving
rank's share (dsv3.infer.ep_load) both run it.

What a module holds decides what is read, so the layouts need no code here:
- a stacked experts module with `local_experts()` (an expert-parallel slice or EPLB-placed slots) reads only the
  experts it holds, each into every slot holding it; any other reads every expert;
- a tensor `X` with an `X_scale_inv` beside it (FP8 block weights, dsv3.infer.fp8_weights) takes the file's own e4m3
  codes and scales where the file stores them (no dequantise-and-requantise round trip), else the stored values
  block-quantised (power-of-two scales for a ue8m0 model);
- anything else takes the stored values in its dtype (an FP8 weight dequantised by its block scales).
The MTP layer's copies of the embedding and the head are not read (the main model's are).
"""

from __future__ import annotations

import torch
from torch import nn

from ..fp8 import BLOCK, quantize_blocks
from .hf import CheckpointError, CheckpointReader, check_stored, hf_sources


class _Files:
    """The directory's tensors as the model needs them, counting the bytes read."""

    def __init__(self, reader: CheckpointReader, pow2: bool):
        self.reader, self.pow2, self.bytes_read = reader, pow2, 0

    def _count(self, name: str) -> None:
        self.bytes_read += self.reader.stored_bytes(name)
        if name in self.reader.scales:
            self.bytes_read += self.reader.stored_bytes(self.reader.scales[name])

    def values(self, name: str, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
        """Tensor `name` in `dtype` (an FP8 one dequantised by its block scales), checked against `shape`."""
        self._count(name)
        return self.reader.read(name, dtype, shape=shape).to(dtype)     # (read casts only what it dequantises)

    def blocks(self, name: str, shape: tuple, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(e4m3 codes, fp32 block scales) of tensor `name`: the stored ones for a released FP8 weight, else its
        values in `dtype` quantised, as dsv3.infer.fp8_weights.quantize_weights does."""
        if name not in self.reader.scales:
            return quantize_blocks(self.values(name, shape, dtype), self.pow2)
        self._count(name)
        q = self.reader.read_stored(name)
        check_stored(name, self.reader.path / self.reader.weight_map[name], q.dtype, tuple(q.shape), shape)
        s = self.reader.read_stored(self.reader.scales[name])
        want = tuple(-(-n // BLOCK) for n in shape)
        if q.dtype != torch.float8_e4m3fn or tuple(s.shape) != want:
            raise CheckpointError(f"tensor {name}: {str(q.dtype).removeprefix('torch.')} codes with scales "
                                  f"{tuple(s.shape)}; FP8 serving reads e4m3 codes with {want} block scales")
        return q, s.float()


@torch.no_grad()
def fill_from_hf(model: nn.Module, reader: CheckpointReader, names: dict, dtype: torch.dtype,
                 pow2: bool = False) -> int:
    """Fill `model` (laid out on its device; `names`: hf_name_map of the plain model it was laid out from) from
    `reader`'s files, as the module docstring says; `dtype`: the serving dtype FP8 codes are quantised from where the
    file has none. Returns the bytes read. Raises if any tensor of the model was left unfilled."""
    files = _Files(reader, pow2)
    sources = {hf for per in hf_sources(names).values() for hf in per.values()}
    filled: set[str] = set()
    for file_names in reader.by_file().values():
        for hf in file_names:
            if hf not in sources:          # a scale (read with its weight), an MTP copy of the embedding / head
                continue
            ours, expert = names[hf]
            module_name, attr = ours.rsplit(".", 1)
            module = model.get_submodule(module_name)
            target = getattr(module, attr)
            scale = getattr(module, f"{attr}_scale_inv", None)
            if expert is None:
                rows, shape = None, tuple(target.shape)
            else:
                held = module.local_experts() if hasattr(module, "local_experts") else range(target.shape[0])
                rows, shape = [j for j, e in enumerate(held) if e == expert], tuple(target.shape[1:])
                if not rows:
                    continue
            if scale is None:
                values = files.values(hf, shape, target.dtype)
                pairs = [(target, values)] if rows is None else [(target[j], values) for j in rows]
            else:
                q, s = files.blocks(hf, shape, dtype)
                pairs = [(target, q), (scale, s)] if rows is None else \
                    [p for j in rows for p in ((target[j], q), (scale[j], s))]
            for t, v in pairs:
                t.copy_(v)
            filled.add(ours)
    _check_filled(model, filled)
    return files.bytes_read


def _check_filled(model: nn.Module, filled: set[str]) -> None:
    """Every parameter and persistent buffer came from the file (a layout this loader does not know would otherwise
    serve uninitialised memory)."""
    left = sorted(k for k in model.state_dict() if k not in filled
                  and not (k.endswith("_scale_inv") and k[:-len("_scale_inv")] in filled))
    if left:
        raise CheckpointError(f"{len(left)} tensors of the model were not filled from the checkpoint: {left[:5]}")
