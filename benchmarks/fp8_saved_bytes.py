"""What FP8 training keeps for backward, against BF16 (issue 15: FP8 peak memory no higher than BF16's), on the CPU.

Two numbers decide the peak of a step with several micro-batches (gradient accumulation): the activations one
micro-batch saves for backward (live at the end of its forward, beside the accumulated gradients) and the FP8
weight cache (dsv3.fp8.weight_cache: held for the whole step).

1. Saved-tensor bytes per token and per layer, counted with torch.autograd.graph.saved_tensors_hooks (each storage
   once, parameters and views of them not counted), for one dense and one MoE layer of lite-8L at its real widths
   (hidden 2048, FFN 10944, experts 1408 wide, MLA as lite; 8 routed experts instead of 64: the bytes per token
   do not depend on E), bf16 weights under bf16 autocast (`--dtype bf16-params`), eager (a compiled step may save
   less: inductor recomputes cheap pointwise ops), for each arm of benchmarks/train_lite8l.py --compare.
2. The weight cache of lite-8L (no MTP) per arm, from the parameter shapes (meta device): both orientations (what
   the Trainer caches today) and the forward operands only.
3. Both at lite-8L's B4 x 2048 micro-batch (8,192 tokens; 1 dense + 7 MoE layers): FP8 minus BF16.

CPU: PYTHONPATH=src python benchmarks/fp8_saved_bytes.py [--tokens 512]     (a minute; JSON in $OUT)
"""

from __future__ import annotations

import argparse
import copy
import json
import os
from pathlib import Path

import torch

from dsv3.config import load_model_config
from dsv3.fp8.training import FP8TrainExperts, FP8TrainLinear, apply_fp8
from dsv3.fp8.weight_cache import refresh_fp8_weights
from dsv3.model import Transformer

ARMS = {"bf16": None, "row-exponly": ("row", False), "row": ("row", True), "block-exponly": ("block", False),
        "block": ("block", True)}
GIB = 2 ** 30


def saved_bytes_per_layer(model: Transformer, ids: torch.Tensor) -> dict[str, int]:
    """Bytes of the tensors autograd saves during model(ids)'s forward, per decoder layer (each storage counted once,
    at the layer that first saved it; parameters, their views and the FP8 weight cache excluded: weights are counted
    in the cache, activations here)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    params |= {t.untyped_storage().data_ptr() for m in model.modules() if getattr(m, "fp8_cache", None) is not None
               for group in m.fp8_cache for t in group}
    seen: set[int] = set()
    # held until the count is done: a storage freed during the forward (a saved tensor of a subgraph that is dropped,
    # e.g. under the router's topk) would otherwise hand its address to a later one, which then went uncounted, and
    # the count depended on the allocator's history (the test of this count failed after other test files)
    held: list[torch.Tensor] = []
    per_layer: dict[str, int] = {}
    where = ["embed"]

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params and ptr not in seen:
            seen.add(ptr)
            held.append(t)
            per_layer[where[0]] = per_layer.get(where[0], 0) + t.untyped_storage().nbytes()
        return t

    hooks = [layer.register_forward_pre_hook(lambda m, a, i=i: where.__setitem__(0, f"layer{i}"))
             for i, layer in enumerate(model.layers)]
    hooks.append(model.norm.register_forward_pre_hook(lambda m, a: where.__setitem__(0, "head")))
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
                torch.autocast("cpu", dtype=torch.bfloat16):
            model(ids)
    finally:
        for h in hooks:
            h.remove()
    return per_layer


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def cache_bytes_of_shapes(model: torch.nn.Module, forward_only: bool = False) -> int:
    """What refresh_fp8_weights holds for model (any device, meta included: computed from the weights' shapes):
    per weight (N, K) or (E, N, K), 1 byte per element and orientation, and fp32 scales (128x128 blocks: as many
    in each orientation; row-wise: E x N for W, E x K for W^T); forward_only: the forward operands only."""
    total = 0
    for m in model.modules():
        if isinstance(m, (FP8TrainLinear, FP8TrainExperts)):
            for w in m.fp8_weights() or ():
                E, (N, K) = (w.shape[0] if w.dim() == 3 else 1), w.shape[-2:]
                if getattr(m, "fp8_scaling", "block") == "row":
                    fwd, bwd = E * N * (K + 4), E * K * (N + 4)
                else:
                    fwd = bwd = E * (N * K + 4 * _cdiv(N, 128) * _cdiv(K, 128))
                total += fwd if forward_only else fwd + bwd
    return total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=512, help="tokens of the measured batch (one sequence)")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--step-tokens", type=int, default=4 * 2048, help="tokens per micro-batch at lite-8L (B4 x 2048)")
    args = p.parse_args()
    lite = load_model_config("lite-8L").replace(num_nextn_predict_layers=0)
    cfg = lite.replace(num_hidden_layers=2, n_routed_experts=args.experts, vocab_size=1024)
    torch.manual_seed(0)
    with torch.device("meta"):
        base = Transformer(cfg)
    base.to(torch.bfloat16).to_empty(device="cpu")
    base.init_weights()
    ids = torch.randint(0, cfg.vocab_size, (1, args.tokens))
    moe_layers = lite.num_hidden_layers - lite.first_k_dense_replace
    rows = []
    for arm, fp8 in ARMS.items():
        model = base
        if fp8 is not None:
            model = apply_fp8(copy.deepcopy(base), experts=fp8[0], linears=fp8[1])
            refresh_fp8_weights(model)      # as the Trainer with several micro-batches: weights read from the cache
        per = saved_bytes_per_layer(model, ids)
        dense, moe = per["layer0"] / args.tokens, per["layer1"] / args.tokens       # bytes per token
        with torch.device("meta"):
            full = Transformer(lite)
        full.to(torch.bfloat16)
        if fp8 is not None:
            apply_fp8(full, experts=fp8[0], linears=fp8[1])
        row = {"arm": arm, "dense_layer_B_per_token": dense, "moe_layer_B_per_token": moe,
               "acts_GiB_per_microbatch": (dense * lite.first_k_dense_replace + moe * moe_layers)
               * args.step_tokens / GIB,
               "cache_both_GiB": cache_bytes_of_shapes(full, False) / GIB,
               "cache_forward_GiB": cache_bytes_of_shapes(full, True) / GIB}
        rows.append(row)
        if fp8 is not None:
            del model
    bf16 = rows[0]
    print(f"saved for backward per token (lite-8L widths, {args.tokens} tokens, bf16 autocast, eager) and at "
          f"B4 x 2048 ({args.step_tokens} tokens, 1 dense + {moe_layers} MoE layers); weight cache of lite-8L")
    print(f"{'arm':14s} {'dense B/tok':>11s} {'MoE B/tok':>10s} {'vs bf16':>8s} {'acts GiB':>9s} "
          f"{'cache GiB':>10s} {'fwd-only':>9s} {'FP8-BF16 GiB (both / fwd-only cache)':>37s}")
    for r in rows:
        delta = r["acts_GiB_per_microbatch"] - bf16["acts_GiB_per_microbatch"]
        print(f"{r['arm']:14s} {r['dense_layer_B_per_token']:11.0f} {r['moe_layer_B_per_token']:10.0f} "
              f"{r['moe_layer_B_per_token'] / bf16['moe_layer_B_per_token']:8.2f} "
              f"{r['acts_GiB_per_microbatch']:9.2f} {r['cache_both_GiB']:10.2f} {r['cache_forward_GiB']:9.2f} "
              f"{delta + r['cache_both_GiB']:+18.2f} / {delta + r['cache_forward_GiB']:+.2f}")
        r["fp8_minus_bf16_GiB"] = {"cache_both": delta + r["cache_both_GiB"],
                                   "cache_forward": delta + r["cache_forward_GiB"]}
    out = Path(os.environ.get("OUT", "out"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "fp8_saved_bytes.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
