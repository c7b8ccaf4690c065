"""A serving rank's model from a Hugging Face directory, reading only what the rank holds: every tensor outside the
routed experts, and the experts of its own slots (an expert-parallel placement, dsv3.infer.ep_experts), each expert
once per slot that holds it. With `fp8`, the projections the release keeps in FP8 become FP8 block weights
(dsv3.infer.fp8_weights) filled with the checkpoint's own codes and scales where it stores them (the released
format: no dequantise-and-requantise round trip, which would move every scale by up to a bf16 rounding), quantised
from the stored values otherwise.

So V3 (its FP8 release: 683B parameters, 665B of them routed experts) is served by N ranks each holding the ~20 GB
outside the routed experts plus 1/N of the experts, no process ever holding the whole model: the model is built on
the meta device, laid out (FP8 modules, placed experts), then allocated rank by rank and filled tensor by tensor.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from ..checkpoint import CheckpointError
from ..checkpoint.hf import CheckpointReader, check_stored, hf_name_map, hf_sources
from ..fp8 import BLOCK, quantize_blocks
from ..model import Transformer
from .ep_experts import PlacedExperts, place_experts
from .eplb import Placement
from .fp8_weights import FP8Experts, FP8Linear, quantize_weights


class _Files:
    """The directory's tensors as this rank needs them, in the serving `dtype`, counting the bytes read."""

    def __init__(self, reader: CheckpointReader, dtype: torch.dtype, pow2: bool):
        self.reader, self.dtype, self.pow2, self.bytes_read = reader, dtype, pow2, 0

    def _count(self, name: str) -> None:
        self.bytes_read += self.reader.stored_bytes(name)
        if name in self.reader.scales:
            self.bytes_read += self.reader.stored_bytes(self.reader.scales[name])

    def values(self, name: str, shape: tuple, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Tensor `name` (an FP8 one dequantised by its block scales), checked against `shape`."""
        self._count(name)
        return self.reader.read(name, dtype or self.dtype, shape=shape).to(dtype or self.dtype)

    def blocks(self, name: str, shape: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        """(e4m3 codes, fp32 block scales) of tensor `name`: the stored ones for a released FP8 weight, else its
        values in the serving dtype quantised (power-of-two scales for a ue8m0 model), as `quantize_weights`
        does."""
        if name not in self.reader.scales:
            return quantize_blocks(self.values(name, shape), self.pow2)
        self._count(name)
        q = self.reader.read_stored(name)
        check_stored(name, self.reader.path / self.reader.weight_map[name], q.dtype, tuple(q.shape), shape)
        s = self.reader.read_stored(self.reader.scales[name])
        want = tuple(-(-n // BLOCK) for n in shape)
        if q.dtype != torch.float8_e4m3fn or tuple(s.shape) != want:
            raise CheckpointError(f"tensor {name}: {str(q.dtype).removeprefix('torch.')} codes with scales "
                                  f"{tuple(s.shape)}; FP8 serving reads e4m3 codes with {want} block scales")
        return q, s.float()


def load_rank_model(path: str | Path, dtype: torch.dtype, device: torch.device | str, fp8: bool = False,
                    group: dist.ProcessGroup | None = None, placement: Placement | None = None
                    ) -> tuple[Transformer, int]:
    """(model, bytes read from the files) for this rank: with `group` and `placement`, its experts placed (only its
    slots' experts read; EPEngine(..., placement=placement) then serves it), without them the whole model; `fp8`:
    FP8 block weights as `quantize_weights` lays them out."""
    reader = CheckpointReader(path)
    cfg = reader.model_config()
    with torch.device("meta"):
        model = Transformer(cfg).to(dtype)
    names = hf_name_map(model)                  # of the plain model: our names before the FP8 / placed layout
    reader.check_names(names)
    if fp8:
        quantize_weights(model)                 # on meta: the layout only
    if placement is not None:
        place_experts(model, group, placement, device=device)
    model.to_empty(device=torch.device(device))
    for b in model.buffers():                   # the routing bias and the expert counts; weights are filled below
        b.zero_()
    files = _Files(reader, dtype, cfg.ue8m0_scales)
    filled = set()
    for ours, src in hf_sources(names).items():
        module_name, attr = ours.rsplit(".", 1)
        module = model.get_submodule(module_name)
        if None in src:
            _fill_whole(module, attr, src[None], files)
        else:
            _fill_experts(module, attr, src, files)
        filled.add(module_name if isinstance(module, FP8Linear) else ours)
    reader.close()
    _check_filled(model, filled)
    return model.eval(), files.bytes_read


@torch.no_grad()
def _fill_whole(module: nn.Module, attr: str, hf: str, files: _Files) -> None:
    if isinstance(module, FP8Linear):           # attr is "weight": codes and scales
        q, s = files.blocks(hf, (module.out_features, module.in_features))
        module.weight.copy_(q)
        module.weight_scale_inv.copy_(s)
        return
    target = getattr(module, attr)
    target.copy_(files.values(hf, tuple(target.shape), target.dtype))


@torch.no_grad()
def _fill_experts(module: nn.Module, attr: str, src: dict[int, str], files: _Files) -> None:
    """The stacked (slot, ...) tensor `attr` of an experts module: slot j holds logical expert local[j]."""
    target = getattr(module, attr)
    local = module.local_experts() if isinstance(module, PlacedExperts) else range(target.shape[0])
    for j, e in enumerate(local):
        if isinstance(module, FP8Experts):
            q, s = files.blocks(src[e], tuple(target.shape[1:]))
            target[j].copy_(q)
            getattr(module, f"{attr}_scale_inv")[j].copy_(s)
        else:
            target[j].copy_(files.values(src[e], tuple(target.shape[1:]), target.dtype))


def _check_filled(model: nn.Module, filled: set[str]) -> None:
    """Every parameter and persistent buffer came from the file (a layout this loader does not know would otherwise
    serve uninitialised memory)."""
    left = sorted(k for k in model.state_dict() if k not in filled and k.rsplit(".", 1)[0] not in filled
                  and not (k.endswith("_scale_inv") and k[:-len("_scale_inv")] in filled))
    if left:
        raise RuntimeError(f"load_rank_model: {len(left)} tensors not filled from the checkpoint: {left[:5]}")
