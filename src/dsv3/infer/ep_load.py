"""A serving rank's model from a Hugging Face directory, reading only what the rank holds: every tensor outside the
routed experts, and the experts of its own slots (an expert-parallel placement, dsv3.infer.ep_experts), each expert
read once into every slot that holds it. With `fp8`, the projections the release keeps in FP8 become FP8 block weights
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

from ..checkpoint.fill import fill_from_hf
from ..checkpoint.hf import CheckpointReader, hf_name_map
from ..model import Transformer
from .ep_experts import place_experts
from .eplb import Placement
from .fp8_weights import quantize_weights


def load_rank_model(path: str | Path, dtype: torch.dtype, device: torch.device | str, fp8: bool = False,
                    group: dist.ProcessGroup | None = None, placement: Placement | None = None, mtp: bool = True
                    ) -> tuple[Transformer, int]:
    """(model, bytes read from the files) for this rank: with `group` and `placement`, its experts placed (only its
    slots' experts read; EPEngine(..., placement=placement) then serves it), without them the whole model; `fp8`:
    FP8 block weights as `quantize_weights` lays them out; `mtp=False`: without the MTP module (a rank that does not
    speculate never runs it; none of its tensors is read). The filling is dsv3.checkpoint.fill's, load_pretrained's."""
    reader = CheckpointReader(path)
    cfg = reader.model_config()
    with torch.device("meta"):
        model = Transformer(cfg).to(dtype)
        reader.check_names(hf_name_map(model))  # the whole checkpoint's names, whatever this rank reads of it
        if not mtp and cfg.num_nextn_predict_layers:
            model = Transformer(cfg.replace(num_nextn_predict_layers=0)).to(dtype)
    names = hf_name_map(model)                  # of the plain model: our names before the FP8 / placed layout
    if fp8:
        quantize_weights(model)                 # on meta: the layout only
    if placement is not None:
        place_experts(model, group, placement, device=device)
    model.to_empty(device=torch.device(device))
    for b in model.buffers():                   # the routing bias and the expert counts; weights are filled below
        b.zero_()
    read = fill_from_hf(model, reader, names, dtype, cfg.ue8m0_scales)
    reader.close()
    return model.eval(), read
