"""MTP speculative decoding on a trained tiny model (issues 4, 16): acceptance rate and speed-up at batch 1, greedy,
with the output checked identical to plain decoding. Prompts are the starts of validation documents. Each row also
gives ms per engine step and its ratio to a plain step (prefill steps included in both: one per prompt): the
speed-up is tokens per step / that ratio. Speculative rows take the fused step (dsv3.infer.spec_step), chained under
the overlap schedule where decode graphs are captured (a discarded step after each prompt's end counts as a step);
`--unchained` adds it with the schedule off, `--sync` the synchronous path (draft, verify, accept as separate steps).

    HF_HUB_OFFLINE=1 python benchmarks/spec_decode_tiny.py runs/tiny --prompts 8 --tokens 64 --k 1,2 --sync
GPU (bf16, decode and speculative steps from CUDA graphs; each engine first runs one untimed prompt that captures
them; --compile: the compiled decode layers of `dsv3 bench decode`'s auto mode):
    python benchmarks/spec_decode_tiny.py runs/small-gpu --device cuda --dtype bf16 --k 1,2,3 --sync
"""

import argparse
import json
import time

import torch

from dsv3.data import Tokenizer
from dsv3.infer import Engine, EngineConfig, SamplingParams
from dsv3.train import load_run_model
from dsv3.train.config import DataConfig
from dsv3.train.dataset import prepare_dataset


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("run_dir")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=48)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--k", default="1,2")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--sync", action="store_true", help="also the synchronous speculative path at each k")
    p.add_argument("--unchained", action="store_true",
                   help="also the fused step with the overlap schedule off (each step read before the next launches)")
    p.add_argument("--compile", action="store_true", help="EngineConfig.compile_decode for every engine")
    p.add_argument("--profile", action="store_true", help="CUDA: after each row, the kernels of one more prompt "
                   "per engine step (GPU busy time and count by op category, the top kernels) against the step's wall "
                   "time: whether the speculative step is bound by the GPU's work or by gaps and the host")
    a = p.parse_args()
    if a.device == "cpu":
        torch.set_num_threads(2)
    model, ckpt = load_run_model(a.run_dir)
    model.to(a.device, torch.bfloat16 if a.dtype == "bf16" else torch.float32)
    cfg = json.loads((ckpt / "config.json").read_text())
    tok = Tokenizer.load(f"{a.run_dir}/tokenizer")
    data = DataConfig(**cfg["data"])
    _, shards, _ = prepare_dataset(data, data.vocab_size or cfg["model"]["vocab_size"], progress=False)
    docs = [shards.doc("val", i) for i in range(shards.n_docs("val"))]
    # prompt i: the (i // n_docs)-th prompt-length slice of validation document i % n_docs
    prompts = [[tok.eos_id] + docs[i % len(docs)][(i // len(docs)) * a.prompt_len:][:a.prompt_len].tolist()
               for i in range(a.prompts + 1)]
    warm, prompts = prompts[-1], prompts[:-1]
    params = SamplingParams(temperature=0.0, max_tokens=a.tokens, ignore_eos=True)
    paths = ["fused"] + ["unchained"] * a.unchained + ["sync"] * a.sync
    runs = [(0, "plain")] + [(int(x), path) for x in a.k.split(",") for path in paths]
    results = {}
    for k, path in runs:
        engine = Engine(model, tok, EngineConfig(block_size=16, num_blocks=64, num_speculative_tokens=k,
                                                 speculative_fused=path != "sync", compile_decode=a.compile,
                                                 overlap_schedule="off" if path == "unchained" else "auto"))
        engine.generate([warm], params)
        engine.spec_stats.update(steps=0, proposed=0, accepted=0)
        steps0 = engine.step_stats["steps"]
        t0 = time.perf_counter()
        outs = [engine.generate([pr], params)[0].token_ids for pr in prompts]      # batch 1, one after another
        dt = time.perf_counter() - t0
        s = engine.spec_stats
        results[k, path] = dict(seconds=dt, tok_per_s=a.prompts * a.tokens / dt, outputs=outs,
                                 ms_per_step=dt / (engine.step_stats["steps"] - steps0) * 1e3,
                                 acceptance=s["accepted"] / s["proposed"] if s["proposed"] else None,
                                 tokens_per_step=(s["steps"] + s["accepted"]) / s["steps"] if s["steps"] else 1.0)
        if a.profile and a.device != "cpu":
            profile_row(engine, prompts[0], params, f"k={k} {path}" if k else "k=0")
    base = results[0, "plain"]
    for (k, path), r in results.items():
        same = r["outputs"] == base["outputs"]
        acc = f"{r['acceptance']:.1%}" if r["acceptance"] is not None else "-"
        name = f"k={k} {path}" if k else "k=0"
        print(f"{name}: {r['tok_per_s']:.1f} tok/s ({r['tok_per_s'] / base['tok_per_s']:.2f}x), acceptance {acc}, "
              f"{r['tokens_per_step']:.2f} tokens per verify step, {r['ms_per_step']:.2f} ms per step = "
              f"{r['ms_per_step'] / base['ms_per_step']:.3f} plain steps, output identical to plain: {same}",
              flush=True)


def profile_row(engine: Engine, prompt: list[int], params: SamplingParams, name: str) -> None:
    """One more prompt under the profiler (engine_decode's kernel rows and categories): per engine step, the GPU's
    busy time and kernel count against the wall time."""
    from engine_decode import _categorise, _kernels          # benchmarks/: the script's directory
    steps0, stats0 = engine.step_stats["steps"], dict(engine.spec_stats)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        engine.generate([prompt], params)
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    n = max(engine.step_stats["steps"] - steps0, 1)
    events = _kernels(prof)
    cats = _categorise(events)
    busy = sum(ms for _, _, ms in cats)
    print(f"[profile {name}] {n} steps: wall {wall * 1e3 / n:.3f} ms/step, GPU busy {busy / n:.3f} ms/step, "
          f"{sum(c for _, c, _ in cats) / n:.0f} kernels/step", flush=True)
    for cat, c, ms in sorted(cats, key=lambda t: -t[2]):
        print(f"    {cat:44s} {c / n:6.1f} kernels {ms / n:7.3f} ms/step", flush=True)
    for e in sorted(events, key=lambda e: -e.device_time_total)[:10]:
        print(f"      {e.device_time_total / 1e3 / n:7.3f} ms/step {e.count / n:5.1f}x  {e.key[:90]}", flush=True)
    engine.spec_stats.update(stats0)


if __name__ == "__main__":
    main()
