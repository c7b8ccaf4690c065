"""Decode throughput of the dsv3 inference engine on `lite` (27 layers, random bf16 weights): 128-token prompts,
greedy, against the ANCHORS decode roofline; JSON under $OUT. Same as `dsv3 bench decode`, plus a warm-up run
(the first run pays Triton compilation and cuBLAS heuristics) and the JSON file.

GPU:  PYTHONPATH=src python benchmarks/engine_decode.py --batches 1,32,64 --tokens 32
CPU dry run: PYTHONPATH=src python benchmarks/engine_decode.py --tiny --device cpu --batches 1,4 --tokens 8
"""

import argparse
import json
import os
from pathlib import Path

import torch

from dsv3 import load_model_config
from dsv3.infer.bench import bench_decode, random_model


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--batches", default="1,32,64")
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--tokens", type=int, default=64)
    a = p.parse_args()
    cfg = load_model_config("tiny" if a.tiny else "lite").replace(num_nextn_predict_layers=0)
    model = random_model(cfg, a.device, torch.bfloat16 if a.device == "cuda" else torch.float32)
    bench_decode(model, 1, a.prompt, 4)                                   # warm-up
    rows = []
    for B in map(int, a.batches.split(",")):
        r = bench_decode(model, B, a.prompt, a.tokens)
        rows.append(r)
        print(f"batch {B:3d}: TTFT {r['ttft_s']:.3f} s, {r['tok_per_s']:9.1f} tok/s, TPOT {r['tpot_ms']:.2f} ms, "
              f"roofline {r['roofline_tok_per_s']:9.1f} tok/s ({r['roofline_fraction']:.1%}, "
              f"{r['step_bytes'] / 1e9:.2f} GB/step)", flush=True)
    out = Path(os.environ.get("OUT", "out"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "engine_decode.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
