"""CPU forward+backward time: dsv3 vs transformers' DeepseekV3ForCausalLM on the same weights.

What it measures: one training-like step, `loss = cross_entropy(logits[:, :-1], ids[:, 1:]); loss.backward()`
(grads zeroed before each step), on a tiny DeepSeek-V3 (64 routed experts, top-6, 2 shared, MLA with q/kv
LoRA) in fp32 on CPU. The dsv3 model is built with a fixed seed, written with `dsv3.save_pretrained` to a temp
dir and loaded by HF with dtype float32, so both run the same weights; the logits are compared first. HF runs
with its per-expert loop (`experts_implementation="eager"`) and, where transformers supports it, with
`"grouped_mm"`. Reports median seconds per step over `--steps` timed steps (after `--warmup`) and HF/dsv3.

Run:
    . .venv/bin/activate
    HF_HUB_OFFLINE=1 python benchmarks/cpu_fwd_bwd.py [--steps 5] [--threads 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
import transformers

import dsv3


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--intermediate", type=int, default=512)
    p.add_argument("--moe-intermediate", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--topk", type=int, default=6)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=str, default=None, help="write the results here")
    return p.parse_args()


def tiny_config(a: argparse.Namespace) -> dsv3.ModelConfig:
    return dsv3.ModelConfig(
        vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.intermediate,
        moe_intermediate_size=a.moe_intermediate, num_hidden_layers=a.layers, first_k_dense_replace=1,
        num_attention_heads=a.heads, num_key_value_heads=a.heads, kv_lora_rank=64, q_lora_rank=96,
        qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=a.experts, n_shared_experts=2,
        num_experts_per_tok=a.topk, n_group=1, topk_group=1, rope_scaling=None,
        max_position_embeddings=max(4096, a.seq), num_nextn_predict_layers=0, torch_dtype="float32")


def build_dsv3(cfg: dsv3.ModelConfig, seed: int) -> dsv3.Transformer:
    with torch.device("meta"):
        model = dsv3.Transformer(cfg)
    model.to_empty(device="cpu")
    torch.manual_seed(seed)
    model.init_weights()
    return model


def hf_experts_implementations() -> list[str]:
    """"eager" always; "grouped_mm" if this transformers has the experts interface (5.x
    `use_experts_implementation`)."""
    try:
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
    except ImportError:
        return ["eager"]
    return ["eager"] + (["grouped_mm"] if "grouped_mm" in ALL_EXPERTS_FUNCTIONS else [])


def make_step(logits_fn: Callable[[torch.Tensor], torch.Tensor], model: torch.nn.Module,
              ids: torch.Tensor) -> Callable[[], float]:
    def step() -> float:
        model.zero_grad(set_to_none=True)
        logits = logits_fn(ids)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        return loss.item()
    return step


def time_step(step: Callable[[], float], warmup: int, steps: int) -> tuple[float, float]:
    """(median seconds per step, loss of the last step)."""
    for _ in range(warmup):
        step()
    times, loss = [], float("nan")
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), loss


def main() -> None:
    a = parse_args()
    torch.set_num_threads(a.threads)
    cfg = tiny_config(a)
    ours = build_dsv3(cfg, a.seed).train()
    ids = torch.randint(0, cfg.vocab_size, (a.batch, a.seq), generator=torch.Generator().manual_seed(a.seed + 1))

    impls = hf_experts_implementations()
    with tempfile.TemporaryDirectory() as tmp:
        dsv3.save_pretrained(ours, tmp)
        hf = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp, dtype=torch.float32,
                                                                experts_implementation="eager").train()
    attn_impl = hf.config._attn_implementation

    def hf_logits(x: torch.Tensor) -> torch.Tensor:
        return hf(input_ids=x, use_cache=False).logits

    results: dict[str, object] = dict(
        config=cfg.to_hf(), batch=a.batch, seq=a.seq, threads=a.threads, warmup=a.warmup, steps=a.steps,
        torch=torch.__version__, transformers=transformers.__version__, hf_attn_implementation=attn_impl,
        max_abs_diff={}, seconds={}, loss={})
    with torch.no_grad():
        ref = ours(ids)
        for impl in impls:
            hf.set_experts_implementation(impl)
            diff = (hf_logits(ids) - ref).abs().max().item()
            results["max_abs_diff"][impl] = diff
            print(f"logits max|HF({impl}) - dsv3| = {diff:.3e}   (max|logit| {ref.abs().max().item():.3e})")

    runs: list[tuple[str, Callable[[], float]]] = [("dsv3", make_step(ours, ours, ids))]
    for impl in impls:
        def step(impl: str = impl, inner: Callable[[], float] = make_step(hf_logits, hf, ids)) -> float:
            hf.set_experts_implementation(impl)
            return inner()
        runs.append((f"HF {impl}", step))
    for name, step in runs:
        sec, loss = time_step(step, a.warmup, a.steps)
        results["seconds"][name], results["loss"][name] = sec, loss
        print(f"{name:14s} median {sec:.3f} s/step   loss {loss:.4f}")

    base = results["seconds"]["dsv3"]
    print(f"\nCPU fwd+bwd, fp32, {a.threads} threads, B={a.batch} T={a.seq}, {cfg.n_routed_experts} experts "
          f"top-{cfg.num_experts_per_tok}, HF attention {attn_impl}\n")
    print("| impl | median s/step | ratio vs dsv3 |\n|---|---|---|")
    for name, sec in results["seconds"].items():
        print(f"| {name} | {sec:.3f} | {sec / base:.2f}x |")
    results["ratio_hf_over_dsv3"] = {k: v / base for k, v in results["seconds"].items() if k != "dsv3"}
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
