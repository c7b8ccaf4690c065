"""Decode throughput of the dsv3 inference engine on `lite` (27 layers, random bf16 weights): 128-token prompts,
greedy, batch 1 / 32 / 64, against the ANCHORS decode roofline (bytes one decode step must read / 4.25e12 B/s).

Reports prefill time (time to first token for the whole batch) and decode tokens/s = batch x decoded tokens /
decode time (steps after the first token), with the engine as is (eager; CUDA graphs are the next step).

GPU:  PYTHONPATH=src python benchmarks/engine_decode.py --batches 1,32,64 --tokens 64
CPU dry run: PYTHONPATH=src python benchmarks/engine_decode.py --tiny --device cpu --batches 1,4 --tokens 8
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from dsv3 import Transformer, load_model_config
from dsv3.infer import Engine, EngineConfig, SamplingParams


def roofline_bytes(model: Transformer, batch_experts_hit: int) -> int:
    """Bytes of weights a decode step reads: every non-routed-expert weight, plus the distinct experts hit."""
    cfg = model.config
    expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size * model.embed_tokens.weight.element_size()
    routed = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                 if ".experts." in n and not n.startswith("mtp."))
    rest = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if ".experts." not in n
               and not n.startswith("mtp.") and n != "embed_tokens.weight")
    n_moe = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
    return rest + min(routed, batch_experts_hit * n_moe * expert)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--batches", default="1,32,64")
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--tokens", type=int, default=64)
    a = p.parse_args()
    cfg = load_model_config("lite")
    if a.tiny:
        cfg = cfg.replace(num_hidden_layers=2, hidden_size=128, intermediate_size=256, moe_intermediate_size=64,
                          vocab_size=512, num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=64,
                          qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32)
    cfg = cfg.replace(num_nextn_predict_layers=0)
    dtype = torch.bfloat16 if a.device == "cuda" else torch.float32
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to(dtype).to_empty(device=a.device)
    torch.manual_seed(0)
    model.init_weights(std=0.02)
    model.eval()
    out = Path(os.environ.get("OUT", "out"))
    out.mkdir(parents=True, exist_ok=True)
    sync = torch.cuda.synchronize if a.device == "cuda" else (lambda: None)
    rows = []
    for B in map(int, a.batches.split(",")):
        engine = Engine(model, config=EngineConfig(block_size=64, max_num_seqs=B, cache_memory_gib=4,
                                                   max_num_batched_tokens=max(2048, B * a.prompt)))
        g = torch.Generator().manual_seed(B)
        prompts = [torch.randint(10, cfg.vocab_size, (a.prompt,), generator=g).tolist() for _ in range(B)]
        params = SamplingParams(temperature=0.0, max_tokens=a.tokens, ignore_eos=True)
        for pr in prompts:
            engine.add_request(pr, params)
        sync()
        t0 = time.perf_counter()
        engine.step()                         # the whole batch's prefill + first token
        sync()
        t1 = time.perf_counter()
        steps = 0
        while engine.has_unfinished():
            engine.step()
            steps += 1
        sync()
        t2 = time.perf_counter()
        tok_s = B * steps / (t2 - t1)
        hit = min(cfg.n_routed_experts, B * cfg.num_experts_per_tok)
        nbytes = roofline_bytes(model, hit)
        roof = 4.25e12 / nbytes * B
        rows.append(dict(batch=B, prefill_s=t1 - t0, decode_steps=steps, decode_s=t2 - t1, tok_per_s=tok_s,
                         ms_per_step=(t2 - t1) / steps * 1e3, step_bytes=nbytes, roofline_tok_per_s=roof, fraction=tok_s / roof))
        print(f"batch {B:3d}: TTFT {t1 - t0:.3f} s, {tok_s:9.1f} tok/s, {rows[-1]['ms_per_step']:.2f} ms/step, "
              f"roofline {roof:9.1f} tok/s ({tok_s / roof:.1%}, {nbytes / 1e9:.2f} GB/step)", flush=True)
    (out / "engine_decode.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
