"""Peak memory vs sequence length: a training step (forward + backward) and a prefill of a V3-architecture model,
with the model's attention (dsv3.model.attention: no S x S scores) and, for comparison, the exact math form that
materialises them (dsv3.model.attention.reference_attention, what MLA's unequal 192/128 head dims got from SDPA
before). Each point runs in a fresh process.

CPU (default): a small 2-layer MLA + MoE model, fp32; the number is the growth of the process's peak resident set
(ru_maxrss) over the model and inputs. Prefill is one forward over the whole prompt.

    PYTHONPATH=src python benchmarks/long_context_memory.py [--lengths 1024,2048,4096,8192,16384]

GPU (`--device cuda`, one device call): `lite-8L` training steps at 2K..32K tokens and `lite` prefill up to 128K
through the engine (dsv3.infer.Engine: chunked prefill of --chunk tokens per step into the paged latent cache, sized
for the prompt), bf16, random weights; the number is torch.cuda.max_memory_allocated over what was allocated before
the step (the weights; for prefill the cache counts, it is part of the step's memory).

    PYTHONPATH=src python benchmarks/long_context_memory.py --device cuda --out $OUT/long-context-memory-gpu.png
    PYTHONPATH=src python benchmarks/long_context_memory.py --device cpu --dry-run     # the GPU script, tiny shapes

Writes the chart (--out), the table as JSON beside it, and prints the table (MiB, KiB per token).
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
from pathlib import Path

import torch

MODEL = dict(vocab_size=512, hidden_size=128, intermediate_size=256, moe_intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=8,
             num_experts_per_tok=2, n_group=1, topk_group=1, first_k_dense_replace=1, kv_lora_rank=64,
             q_lora_rank=96, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, num_nextn_predict_layers=0,
             max_position_embeddings=65536)
GPU = dict(train_model="lite-8L", prefill_model="lite", lengths="2048,4096,8192,16384,32768",
           prefill_lengths="8192,16384,32768,65536,131072", math_max=8192)
DRY = dict(train_model="tiny", prefill_model="tiny", lengths="256,512,1024", prefill_lengths="512,1024,2048",
           math_max=512)


def model_config(name: str, max_len: int):
    """`name` = 'small' (MODEL) or a preset; positions made to reach max_len (YaRN over the preset's own length,
    as a long-context extension would have them; memory does not depend on the factor)."""
    from dsv3 import ModelConfig
    from dsv3.config import load_model_config
    if name == "small":
        return ModelConfig(**MODEL)
    cfg = load_model_config(name).replace(num_nextn_predict_layers=0)
    if max_len <= cfg.max_position_embeddings:
        return cfg
    orig = (cfg.yarn() or {}).get("original_max_position_embeddings", cfg.max_position_embeddings)
    return cfg.replace(max_position_embeddings=max_len, rope_scaling=dict(
        type="yarn", factor=max_len / orig, original_max_position_embeddings=orig, beta_fast=32, beta_slow=1,
        mscale=1.0, mscale_all_dim=1.0))


def build(name: str, max_len: int, device: torch.device, dtype: torch.dtype):
    from dsv3 import Transformer
    with torch.device("meta"):
        model = Transformer(model_config(name, max_len))
    model.to(dtype).to_empty(device=device)
    torch.manual_seed(0)
    model.init_weights()
    return model


def peak_growth(device: torch.device, step) -> int:
    """Bytes the step adds at its peak to what was allocated (CUDA) or resident (CPU) before it."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024


def one(seq_len: int, path: str, kind: str, name: str, device: str, chunk: int) -> int:
    """Peak memory growth (bytes) of one training step (kind='train') or prefill at seq_len in this process."""
    import dsv3.model.mla as mla
    from dsv3.model.attention import reference_attention
    if path == "math":
        mla.causal_attention = lambda q, k, v, scale: reference_attention(q, k, v.to(q.dtype), scale)
    dev = torch.device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    model = build(name, seq_len + 1, dev, dtype)
    ids = torch.randint(0, model.config.vocab_size, (1, seq_len), device=dev)
    if kind == "train":
        return peak_growth(dev, lambda: torch.nn.functional.cross_entropy(
            model(ids)[0, :-1].float(), ids[0, 1:]).backward())
    if name == "small":       # the CPU chart's prefill: one forward over the whole prompt
        return peak_growth(dev, lambda: _forward(model, ids))
    from dsv3.infer import Engine, EngineConfig
    from dsv3.infer.sampling import SamplingParams
    model.eval()
    cfg = EngineConfig(block_size=64, num_blocks=math.ceil((seq_len + 1) / 64) + 1, max_num_batched_tokens=chunk,
                       max_model_len=seq_len + 1, max_num_seqs=1, prefix_caching=False, cuda_graphs=False)
    return peak_growth(dev, lambda: Engine(model, None, cfg).generate(
        [ids[0].tolist()], SamplingParams(temperature=0.0, max_tokens=1)))


@torch.no_grad()
def _forward(model, ids) -> None:
    model.hidden_states(ids)


def plot(table: dict, out: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, points in table.items():
        xs = sorted(int(s) for s in points)
        ax.plot(xs, [points[str(s)] / 2**20 for s in xs], marker="o", ls="-" if "dsv3" in key else "--", label=key)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xlabel("sequence length (tokens)")
    ax.set_ylabel("peak memory growth (MiB)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dry-run", action="store_true", help="the --device cuda measurements with tiny shapes")
    ap.add_argument("--lengths", default=None, help="training (and CPU prefill) lengths")
    ap.add_argument("--prefill-lengths", default=None, help="engine prefill lengths (GPU / dry run)")
    ap.add_argument("--math-max", type=int, default=None, help="longest length for the S x S path")
    ap.add_argument("--chunk", type=int, default=8192, help="engine prefill chunk (tokens per step)")
    ap.add_argument("--one", nargs=4, metavar=("LEN", "PATH", "KIND", "MODEL"))
    ap.add_argument("--out", default=None, help="chart path (default docs/long-context-memory[-gpu].png)")
    a = ap.parse_args()
    if a.one:
        print(one(int(a.one[0]), a.one[1], a.one[2], a.one[3], a.device, a.chunk))
        return
    gpu = a.device != "cpu" or a.dry_run
    plan = dict(DRY if a.dry_run else GPU) if gpu else dict(
        train_model="small", prefill_model="small", lengths="1024,2048,4096,8192,16384,32768", prefill_lengths="",
        math_max=8192)
    plan.update({k: v for k, v in (("lengths", a.lengths), ("prefill_lengths", a.prefill_lengths),
                                   ("math_max", a.math_max)) if v is not None})
    chunk = min(a.chunk, 256) if a.dry_run else a.chunk
    runs = [("train", path, plan["train_model"], plan["lengths"]) for path in ("fused", "math")]
    runs += [("prefill", path, plan["prefill_model"], plan["prefill_lengths"] or plan["lengths"])
             for path in ("fused", "math")]
    table: dict = {}
    for kind, path, name, lengths in runs:
        key = f"{kind} {name}, {'no S x S (dsv3)' if path == 'fused' else 'S x S scores (before)'}"
        for s in (int(x) for x in lengths.split(",")):
            if path == "math" and s > plan["math_max"]:
                continue
            r = subprocess.run([sys.executable, __file__, "--device", a.device, "--chunk", str(chunk),
                                "--one", str(s), path, kind, name], capture_output=True, text=True)
            if r.returncode != 0:       # e.g. out of memory: the table says so, the other points still run
                print(f"{key:45s} {s:7d}  failed: {(r.stderr.strip().splitlines() or ['?'])[-1][:120]}", flush=True)
                continue
            b = table.setdefault(key, {})[str(s)] = int(r.stdout.split()[-1])
            print(f"{key:45s} {s:7d} {b / 2**20:10.1f} MiB {b / s / 1024:8.1f} KiB/token", flush=True)
    dev = "cpu" if not gpu else (torch.cuda.get_device_name() if a.device == "cuda" else f"{a.device} (dry run)")
    docs = Path("/tmp") if a.dry_run else Path(__file__).resolve().parents[1] / "docs"
    out = Path(a.out or docs / f"long-context-memory{'-gpu' if gpu else ''}{'-dry' if a.dry_run else ''}.png")
    out.parent.mkdir(parents=True, exist_ok=True)
    plot(table, out, f"peak memory vs sequence length ({dev})")
    out.with_suffix(".json").write_text(json.dumps({"device": dev, "chunk": chunk, "table": table}, indent=1))
    print(json.dumps(table))


if __name__ == "__main__":
    main()
