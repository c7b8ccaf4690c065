"""Ops of one decode step, per layer: what a batch-B decode step of the engine launches (torch.profiler).

The GPU decode is launch / overhead-bound at small batches (issue 16), so the count of device kernels per layer is
what the CUDA graph replays, and the count of dispatcher calls is the host time of an eager step. This script runs
`lite`'s layer shapes (heads, latent and rope widths, 64 experts top-6 + 2 shared, no q_lora, first layer dense)
with small hidden and expert widths (op counts do not depend on widths), prefills B prompts, then profiles one
`Engine.step()` of B decode tokens and reports, per dense / MoE block and for the rest of the step:
  * `calls`: top-level aten ops (each a dispatcher call from Python: eager host cost);
  * `kernels`: leaf aten ops that compute (views, metadata ops and empty allocations left out): what becomes a
    device kernel;
  * `allocs`: aten::empty* calls (fresh buffers the step allocates), and host syncs (aten::item /
    aten::_local_scalar_dense).
The paged decode attention (`attn`) and the routed experts (`experts`) are counted apart: on CPU they run the
PyTorch references (a gather of the pages; a loop over experts with host-side counts), on the GPU one Triton kernel
(+ combine) and grouped GEMMs. CPU counts also include scalar-wrapping copies that a GPU launch does not have.
Runs on CPU (the count of ops, not their time) or on CUDA (`--device cuda`).

    PYTHONPATH=src python benchmarks/decode_step_ops.py --batch 32 [--graph-buckets] [--fused-moe] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from dsv3.config import load_model_config
from dsv3.infer import Engine, EngineConfig, SamplingParams
from dsv3.model import Transformer

ROOT = Path(__file__).resolve().parents[1]
VIEWS = {"aten::view", "aten::reshape", "aten::_reshape_alias", "aten::as_strided", "aten::t", "aten::transpose",
         "aten::expand", "aten::slice", "aten::select", "aten::unsqueeze", "aten::squeeze", "aten::permute",
         "aten::split", "aten::split_with_sizes", "aten::alias", "aten::detach", "aten::_unsafe_view",
         "aten::lift_fresh", "aten::resolve_conj", "aten::resolve_neg", "aten::unbind", "aten::flatten",
         "aten::narrow", "aten::chunk", "aten::result_type", "aten::is_nonzero", "aten::size", "aten::stride",
         "aten::numpy_T", "aten::matrix_H", "aten::view_as", "aten::expand_as", "aten::movedim", "aten::contiguous",
         "aten::to", "aten::_to_copy_noop", "aten::unflatten", "aten::dim", "aten::broadcast_tensors"}
ALLOCS = {"aten::empty", "aten::empty_like", "aten::empty_strided", "aten::new_empty", "aten::new_empty_strided"}
SYNCS = {"aten::item", "aten::_local_scalar_dense"}


def small_lite(layers: int = 3):
    return load_model_config(ROOT / "configs" / "lite.json").replace(
        hidden_size=256, intermediate_size=512, moe_intermediate_size=64, vocab_size=2048, num_hidden_layers=layers,
        torch_dtype="float32")


def _ranged(module: torch.nn.Module, name: str) -> None:
    ranges = []
    module.register_forward_pre_hook(lambda m, a, r=ranges: r.append(record_function(name).__enter__()))
    module.register_forward_hook(lambda m, a, o, r=ranges: r.pop().__exit__(None, None, None))


def _label(engine: Engine) -> None:
    """record_function ranges around each block, its routed experts and the paged decode attention (hooks and a
    wrapper, from outside the model)."""
    for i, block in enumerate(engine.model.layers):
        _ranged(block, f"block.{'moe' if hasattr(block.mlp, 'gate') else 'dense'}.{i}")
        if hasattr(block.mlp, "experts"):
            _ranged(block.mlp.experts, "part.experts")
    cache, decode = engine.cache, engine.cache.decode

    def ranged_decode(*args, **kw):
        with record_function("part.attn"):
            return decode(*args, **kw)
    cache.decode = ranged_decode


def _count(events) -> dict[str, Counter]:
    """Per range (block.kind.i, or 'step' outside every block): calls, kernels, allocs, syncs, and kernel names."""
    out: dict[str, Counter] = {}

    def owner(e) -> str:
        p, part = e.cpu_parent, None
        while p is not None:
            if p.name.startswith("part.") and part is None:
                part = p.name
            if p.name.startswith("block."):
                return p.name + (f".{part}" if part else "")
            p = p.cpu_parent
        return "step"

    def is_top(e) -> bool:
        p = e.cpu_parent
        while p is not None:
            if p.name.startswith("aten::"):
                return False
            p = p.cpu_parent
        return True

    def computes(e) -> bool:
        return e.name.startswith("aten::") and e.name not in VIEWS | ALLOCS | SYNCS

    def below(e) -> bool:
        return any(computes(ch) or below(ch) for ch in e.cpu_children)

    for e in events:
        if not e.name.startswith("aten::"):
            continue
        c = out.setdefault(owner(e), Counter())
        if is_top(e):
            c["calls"] += 1
        if e.name in ALLOCS:
            c["allocs"] += 1
        if e.name in SYNCS:
            c["syncs"] += 1
        if computes(e) and not below(e):
            c["kernels"] += 1
            c["k:" + e.name] += 1
    return out


def profile_step(batch: int, prompt: int = 40, device: str = "cpu", graph_buckets: bool = False,
                 fused_moe: str = "off", layers: int = 3) -> dict:
    torch.manual_seed(0)
    cfg = small_lite(layers)
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device=device)
    model.init_weights()
    engine = Engine(model, config=EngineConfig(num_blocks=batch * 4, max_num_seqs=batch, cuda_graphs=False,
                                               fused_moe=fused_moe, max_num_batched_tokens=batch * prompt))
    if graph_buckets:      # the padded static batches a CUDA graph captures, run eagerly
        engine.use_decode_graphs(capture=False)
    g = torch.Generator().manual_seed(0)
    for _ in range(batch):
        engine.add_request(torch.randint(10, cfg.vocab_size, (prompt,), generator=g).tolist(),
                           SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
    engine.step()                               # prefill
    engine.step()                               # one decode step untimed (lazy inits)
    _label(engine)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=acts) as prof:
        engine.step()
    counts = _count(prof.events())
    # blocks of one kind count the same: report the first of each kind, its parts apart
    per_kind: dict[str, dict] = {"step": dict(counts.get("step", {}))}
    for kind in ("dense", "moe"):
        layer = min((int(n.split(".")[2]) for n in counts if n.startswith(f"block.{kind}.")), default=None)
        if layer is None:
            continue
        per_kind[kind] = dict(counts.get(f"block.{kind}.{layer}", {}))
        for part in ("attn", "experts"):
            if f"block.{kind}.{layer}.part.{part}" in counts:
                per_kind[f"{kind}.{part}"] = dict(counts[f"block.{kind}.{layer}.part.{part}"])
    return dict(batch=batch, graph_buckets=graph_buckets, fused_moe=fused_moe, device=device, **per_kind)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--graph-buckets", action="store_true", help="the padded graph-bucket batches, run eagerly")
    ap.add_argument("--fused-moe", default="off")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    r = profile_step(args.batch, device=args.device, graph_buckets=args.graph_buckets, fused_moe=args.fused_moe)
    for kind in ("dense", "dense.attn", "moe", "moe.attn", "moe.experts", "step"):
        c = r.get(kind, {})
        top = sorted(((v, k[2:]) for k, v in c.items() if k.startswith("k:")), reverse=True)
        print(f"{kind:11s} calls {c.get('calls', 0):4d}  kernels {c.get('kernels', 0):4d}  allocs "
              f"{c.get('allocs', 0):3d}  syncs {c.get('syncs', 0):2d}   " + ", ".join(f"{k} {v}" for v, k in top))
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=1))


if __name__ == "__main__":
    main()
