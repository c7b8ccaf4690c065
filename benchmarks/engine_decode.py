"""Decode throughput of the dsv3 inference engine on `lite` (27 layers, random bf16 weights): 128-token prompts,
greedy, against the ANCHORS decode roofline; JSON under $OUT. Same as `dsv3 bench decode` (each measurement after
an untimed round that compiles kernels and captures the graphs it needs), over modes:
  eager   bf16 weights, no CUDA graphs;  graphs  bf16 weights, decode from CUDA graphs;
  fp8     weights in the released FP8 block format (dsv3.infer.fp8_weights), CUDA graphs.
(fp8 quantises the model in place, so it runs last.)

GPU:  PYTHONPATH=src python benchmarks/engine_decode.py --batches 1,32,64 --tokens 64 --modes eager,graphs,fp8
CPU dry run: PYTHONPATH=src python benchmarks/engine_decode.py --tiny --device cpu --batches 1,4 --tokens 8
"""

import argparse
import json
import os
from pathlib import Path

import torch

from dsv3 import load_model_config
from dsv3.infer import Engine, EngineConfig, SamplingParams
from dsv3.infer.bench import bench_decode, random_model


def profile_step(model, batch: int, prompt: int) -> dict:
    """Replay one decode step's graph alone (GPU time, no host work) and list the kernels of its eager run."""
    cfg = model.config
    engine = Engine(model, config=EngineConfig(block_size=64, max_num_seqs=batch, cache_memory_gib=4,
                                               max_num_batched_tokens=max(2048, batch * prompt)))
    for _ in range(batch):
        engine.add_request(torch.randint(10, cfg.vocab_size, (prompt,)).tolist(),
                           SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
    for _ in range(3):
        engine.step()
    (bucket,) = [b for b in engine.runner.graphs.buckets.values() if b.graph is not None]
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(50):
        bucket.graph.replay()
    end.record()
    torch.cuda.synchronize()
    replay_ms = start.elapsed_time(end) / 50
    with torch.inference_mode(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        engine.runner.forward_eager(bucket.batch)
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=14)
    print(f"  graph replay {replay_ms:.3f} ms/step (GPU only); eager kernels:\n{table}", flush=True)
    return dict(replay_ms=replay_ms, kernels=table)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--batches", default="1,32,64")
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--modes", default="eager,graphs,fp8")
    p.add_argument("--spec-k", type=int, default=0, help="also time MTP speculative decoding with k drafts at "
                   "batch 1 (random weights: the cost of a speculative step, not its acceptance)")
    p.add_argument("--profile", action="store_true", help="after each graphs/fp8 mode: GPU time of one replay and "
                   "the top kernels of the same step run eagerly")
    a = p.parse_args()
    cfg = load_model_config("tiny" if a.tiny else "lite").replace(num_nextn_predict_layers=int(a.spec_k > 0))
    model = random_model(cfg, a.device, torch.bfloat16 if a.device == "cuda" else torch.float32)
    rows = []
    for mode in a.modes.split(","):
        if mode == "fp8":
            from dsv3.infer.fp8_weights import quantize_weights
            quantize_weights(model)
        for B in map(int, a.batches.split(",")):
            r = bench_decode(model, B, a.prompt, a.tokens, cuda_graphs=mode != "eager")
            r["mode"] = mode
            rows.append(r)
            if a.profile and mode != "eager":
                r["profile"] = profile_step(model, B, a.prompt)
            print(f"{mode:6s} batch {B:3d}: TTFT {r['ttft_s']:.3f} s, {r['tok_per_s']:9.1f} tok/s, TPOT "
                  f"{r['tpot_ms']:.2f} ms, roofline {r['roofline_tok_per_s']:9.1f} tok/s ({r['roofline_fraction']:.1%}, "
                  f"{r['step_bytes'] / 1e9:.2f} GB/step)", flush=True)
    if a.spec_k:
        for k in (0, a.spec_k):
            r = bench_decode(model, 1, a.prompt, a.tokens, spec_tokens=k)
            steps = r["spec"]["steps"] if k else r["steps"]
            r.update(mode=f"spec{k}", ms_per_step=r["tpot_ms"] * (a.tokens - 1) / max(steps, 1))
            rows.append(r)
            print(f"speculative k={k} batch 1: {r['ms_per_step']:.2f} ms per step, {r['tok_per_s']:.1f} tok/s, "
                  f"{r['spec']}", flush=True)
    out = Path(os.environ.get("OUT", "out"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "engine_decode.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
