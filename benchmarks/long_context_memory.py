"""Peak memory vs sequence length on the CPU: a training step (forward + backward) and a prefill forward of a small
V3-architecture model, with the model's attention (dsv3.model.attention: no S x S scores) and, for comparison, the
exact math form that materialises them (dsv3.model.attention.reference_attention, what MLA's unequal 192/128 head
dims got from SDPA before). Each point runs in a fresh process; the number is the growth of its peak resident set
(ru_maxrss) over the model and inputs.

    PYTHONPATH=src python benchmarks/long_context_memory.py [--lengths 1024,2048,4096,8192,16384,32768]

Writes docs/long-context-memory.png and prints a table (MiB).
"""

from __future__ import annotations

import argparse
import json
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


def one(seq_len: int, path: str, kind: str) -> int:
    """Peak RSS growth (bytes) of one forward (+ backward for kind='train') at seq_len in this process."""
    from dsv3 import ModelConfig, Transformer
    import dsv3.model.mla as mla
    from dsv3.model.attention import reference_attention
    if path == "math":
        mla.causal_attention = lambda q, k, v, scale: reference_attention(q, k, v.to(q.dtype), scale)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**MODEL))
    ids = torch.randint(0, 512, (1, seq_len))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if kind == "train":
        model(ids).float().logsumexp(-1).mean().backward()
    else:
        with torch.no_grad():
            model.hidden_states(ids)
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024


def plot(table: dict, out: Path) -> None:
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
    ax.set_title("CPU peak memory vs sequence length (2-layer MLA+MoE, 4 heads)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="1024,2048,4096,8192,16384,32768")
    ap.add_argument("--math-max", type=int, default=8192, help="longest length for the S x S path")
    ap.add_argument("--one", nargs=3, metavar=("LEN", "PATH", "KIND"))
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs" / "long-context-memory.png"))
    a = ap.parse_args()
    if a.one:
        print(one(int(a.one[0]), a.one[1], a.one[2]))
        return
    table: dict = {}
    for kind in ("train", "prefill"):
        for path in ("fused", "math"):
            key = f"{kind}, {'no S x S (dsv3)' if path == 'fused' else 'S x S scores (before)'}"
            for s in (int(x) for x in a.lengths.split(",")):
                if path == "math" and s > a.math_max:
                    continue
                r = subprocess.run([sys.executable, __file__, "--one", str(s), path, kind], capture_output=True,
                                   text=True, check=True)
                table.setdefault(key, {})[str(s)] = int(r.stdout.split()[-1])
                print(f"{key:40s} {s:6d} {table[key][str(s)] / 2**20:9.1f} MiB", flush=True)
    plot(table, Path(a.out))
    print(json.dumps(table))


if __name__ == "__main__":
    main()
