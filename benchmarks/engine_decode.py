"""Decode throughput of the dsv3 inference engine on `lite` (27 layers, random bf16 weights): 128-token prompts,
greedy, against the ANCHORS decode roofline; JSON under $OUT (rewritten after every row, so a run cut short keeps
what it measured). Same as `dsv3 bench decode` (each measurement after an untimed round that compiles kernels and
captures the graphs it needs), over modes:
  eager    bf16 weights, no CUDA graphs;          graphs   bf16 weights, decode from CUDA graphs (MoE module);
  compile  graphs + torch.compile'd decode layers (EngineConfig.compile_decode);
  fused    compile + the fused MoE decode kernel (EngineConfig.fused_moe = on);
  auto     compile + fused_moe = auto (the default: the fused kernel for the buckets where it measured faster);
  fusedeager  graphs + the fused MoE kernel, no compile;
  unfused  auto without the fused projection pairs (EngineConfig.fuse_projections = false: q / kv_a and gate / up
           as two GEMMs each): the before of dsv3.infer.fused_proj in the same call;
  nogemv   overlap with the one-token steps' BF16 dense projections on cuBLAS (dense_gemv off; every other mode
           has it on, the engine's default);
  noshared overlap with the shared experts of batch-1 steps run apart after the fused MoE kernel (shared_pair off;
           every other mode folds them into its GEMV form as one more pair per token, the engine's default);
  skinny   overlap with the BF16 dense projections of 2..64-row steps through the tiled Triton kernel (skinny_gemm
           on; every other mode leaves them to cuBLAS, the engine's default)
  sync, overlap: auto with EngineConfig.overlap_schedule off / on (the A/B of dsv3.infer.overlap: whether decode
           step t+1 is launched before the host reads step t's tokens; auto = on with captured graphs);
  cprefill overlap with the blocks of prefill steps compiled too (EngineConfig.compile_prefill; the A/B of its TTFT
           against overlap, whose prefill steps run eagerly: 2,736 small kernels, 64 of 148 ms at 64 x 128 tokens);
  fp8, fp8-compile, fp8-fused, fp8-auto, fp8-fusedeager: the same with weights in the released FP8 block format
  (dsv3.infer.fp8_weights). fp8 quantises the model in place, so every bf16 mode runs first.

GPU:  PYTHONPATH=src python benchmarks/engine_decode.py --batches 1,32,64 --tokens 64 \
        --modes graphs,compile,fused,fp8,fp8-compile,fp8-fused
      the overlap A/B: ... --batches 1,32,64 --tokens 64 --modes sync,overlap --profile --ttft-batch 0 (the profile's
      replay time against the TPOT: the host gap per token that remains)
      the shared-pair A/B: ... --batches 1 --tokens 64 --modes overlap,noshared,fp8-overlap,fp8-noshared --profile
      --ttft-batch 0 (the profile's kernels per replay: the folded step has 3 fewer per MoE layer, 78 on lite)
      the compiled-prefill A/B: ... --batches 1 --tokens 8 --modes overlap,cprefill --ttft-batch 64 --ttft-profile
      (the TTFT rows and one profiled prefill step of 64 x 128 tokens each: its kernel count and GPU time by category)
CPU dry run: PYTHONPATH=src python benchmarks/engine_decode.py --tiny --device cpu --batches 1,4 --tokens 8 \
  --modes graphs,fused,fp8,fp8-fused     (on CPU the bucketed decode runs without capture; `compile` needs bf16 there:
  add --dtype bf16, since the fake grouped GEMM of the MoE module takes only bf16; `--modes sync,overlap --host-ms
  --dtype bf16`: the engine's host work per step)
"""

import argparse
import json
import os
import time
import traceback
from pathlib import Path

import torch

from dsv3 import load_model_config
from dsv3.infer import Engine, EngineConfig, SamplingParams
from dsv3.infer.bench import _sync, bench_decode, bench_ttft, random_model


_CATEGORIES = (   # kernel-name substrings -> the op categories (first match wins)
    ("attention (MLA decode)", ("mla", "flash", "attention", "sdpa")),
    ("expert GEMMs (fused MoE)", ("moe", "_gate_up_kernel", "_down_kernel", "_gate_up_rows", "_down_rows")),
    ("GEMMs", ("gemm", "cutlass", "nvjet", "xmma", "cublas", "matmul", "_mm_", "scaled_mm", "fp8_weight",
                "gemv", "fp8_linear", "fp8_grouped")),
    ("routing (sort, top-k, scatter, index)", ("sort", "topk", "scan", "cumsum", "scatter", "gather", "index",
                                               "one_hot", "arange")),
    ("compiled fusions (inductor)", ("triton_",)),
    ("sampling", ("argmax", "softmax", "multinomial", "exponential")),
    ("norms / RoPE / elementwise / casts / copies", ("",)),
)


def _categorise(events) -> list[tuple[str, int, float]]:
    """(category, kernel count, GPU ms) of a profiler's kernel events."""
    totals = {name: [0, 0.0] for name, _ in _CATEGORIES}
    for e in events:
        key = e.key.lower()
        name = next(n for n, subs in _CATEGORIES if any(s in key for s in subs))
        totals[name][0] += e.count
        totals[name][1] += e.device_time_total / 1e3
    return [(n, c, ms) for n, (c, ms) in totals.items() if c]


def _kernels(prof) -> list:
    """The GPU kernel rows of a profile (not the CPU ops whose device time is their kernels', counted twice)."""
    cuda = torch.autograd.DeviceType.CUDA
    return [e for e in prof.key_averages() if e.device_time_total > 0 and getattr(e, "device_type", cuda) == cuda]


def profile_step(model, batch: int, prompt: int, **engine_kw) -> dict:
    """Replay one decode step's graph alone (GPU time, no host work), then the kernels of that replay (CUPTI sees the
    graph's kernels) grouped by op category: where the step's time goes, against the replay time (the rest: gaps
    between kernels). Falls back to the same step run eagerly where the replay shows no kernels."""
    cfg = model.config
    engine = Engine(model, config=EngineConfig(block_size=64, max_num_seqs=batch, cache_memory_gib=4,
                                               max_num_batched_tokens=max(2048, batch * prompt), **engine_kw))
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
    source = "graph replay"
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        bucket.graph.replay()
        torch.cuda.synchronize()
    events = _kernels(prof)
    if not events:
        source = "eager step"
        with torch.inference_mode(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            engine.runner.forward_eager(bucket.batch)
            torch.cuda.synchronize()
        events = _kernels(prof)
    cats = _categorise(events)
    busy = sum(ms for _, _, ms in cats)
    lines = [f"  graph replay {replay_ms:.3f} ms/step (GPU only); kernels of one {source}: {sum(c for _, c, _ in cats)}"
             f", {busy:.3f} ms busy, gaps {max(replay_ms - busy, 0):.3f} ms"]
    lines += [f"    {n:44s} {c:5d} kernels {ms:8.3f} ms  {ms / replay_ms:6.1%}" for n, c, ms in
              sorted(cats, key=lambda t: -t[2])]
    top = sorted(events, key=lambda e: -e.device_time_total)[:12]
    lines += [f"      {e.device_time_total / 1e3:8.3f} ms {e.count:5d}x  {e.key[:90]}" for e in top]
    print("\n".join(lines), flush=True)
    return dict(replay_ms=replay_ms, source=source, categories=cats, busy_ms=busy)


def profile_prefill(model, batch: int, prompt: int, budget: int = 0, **engine_kw) -> dict:
    """The first prefill step of `batch` queued prompts (`budget` tokens per step; 0: every prompt in the step),
    after an untimed round: its wall time against its kernels' GPU time by op category and their count (a host-bound
    step launches many short kernels)."""
    cfg = model.config
    engine = Engine(model, config=EngineConfig(max_num_seqs=batch, cache_memory_gib=4,
                                               max_num_batched_tokens=budget or batch * prompt, **engine_kw))
    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)

    def queue():
        for _ in range(batch):
            engine.add_request(torch.randint(10, cfg.vocab_size, (prompt,)).tolist(), params)
    queue()
    while engine.has_unfinished():
        engine.step()
    queue()
    _sync("cuda")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        engine.step()
        _sync("cuda")
        wall_ms = (time.perf_counter() - t0) * 1e3
    while engine.has_unfinished():
        engine.step()
    events = _kernels(prof)
    cats = _categorise(events)
    busy = sum(ms for _, _, ms in cats)
    lines = [f"  prefill step of {batch} x {prompt} tokens, {budget or batch * prompt} a step: {wall_ms:.1f} ms wall "
             f"(profiled), kernels "
             f"{sum(c for _, c, _ in cats)}, {busy:.1f} ms GPU busy ({busy / wall_ms:.0%})"]
    lines += [f"    {n:44s} {c:5d} kernels {ms:8.3f} ms" for n, c, ms in sorted(cats, key=lambda t: -t[2])]
    lines += [f"      {e.device_time_total / 1e3:8.3f} ms {e.count:5d}x  {e.key[:90]}"
              for e in sorted(events, key=lambda e: -e.device_time_total)[:15]]
    print("\n".join(lines), flush=True)
    return dict(wall_ms=wall_ms, busy_ms=busy, categories=cats)


MODES = {"eager": dict(cuda_graphs=False, fused_moe="off"), "graphs": dict(fused_moe="off"),
         "compile": dict(compile_decode=True, fused_moe="off"), "fused": dict(compile_decode=True, fused_moe="on"),
         "auto": dict(compile_decode=True, fused_moe="auto"), "fusedeager": dict(fused_moe="on"),
         "unfused": dict(compile_decode=True, fused_moe="auto", fuse_projections=False),
         "nogemv": dict(compile_decode=True, fused_moe="auto", overlap_schedule="on", dense_gemv=False),
         "noshared": dict(compile_decode=True, fused_moe="auto", overlap_schedule="on", shared_pair=False),
         "skinny": dict(compile_decode=True, fused_moe="auto", overlap_schedule="on", skinny_gemm=True),
         "sync": dict(compile_decode=True, fused_moe="auto", overlap_schedule="off"),
         "overlap": dict(compile_decode=True, fused_moe="auto", overlap_schedule="on"),
         "cprefill": dict(compile_decode=True, fused_moe="auto", overlap_schedule="on", compile_prefill=True),
         "pdl": dict(compile_decode=True, fused_moe="auto", overlap_schedule="on", pdl=True),
         "nopdl": dict(compile_decode=True, fused_moe="auto", overlap_schedule="on", pdl=False)}


def host_ms_per_step(model, batch: int, prompt: int, steps: int = 40, count: int = 6, **engine_kw) -> dict:
    """The engine's own host work per decode step: Engine.step() minus the model's forward and head (timed with a
    device sync around each, so on CUDA this is not the overlapped run). What the overlap schedule hides behind the
    device on the GPU; measurable on the CPU (`--host-ms`, with the padded buckets). With num_speculative_tokens in
    engine_kw, per speculative step (the MTP module and the fused step's body count as model time). Then
    `count_step_work` over `count` more steps (ops outside the graph bodies, replays, device -> host reads)."""
    cfg = model.config
    k = engine_kw.get("num_speculative_tokens", 0)
    engine = Engine(model, config=EngineConfig(max_num_seqs=batch, cache_memory_gib=1, speculative_max_batch=batch,
                                               max_num_batched_tokens=max(2048, batch * prompt),
                                               **{k: v for k, v in engine_kw.items() if k != "padded"}))
    if engine_kw.get("padded") and engine.runner.graphs is None:
        engine.use_decode_graphs(capture=False)
    g = torch.Generator().manual_seed(0)
    for _ in range(batch):
        engine.add_request(torch.randint(10, cfg.vocab_size, (prompt,), generator=g).tolist(),
                           SamplingParams(temperature=0.0, max_tokens=(steps + count + 8) * (k + 1), ignore_eos=True))
    for _ in range(4):     # prefill, graph capture
        engine.step()
    runner, model_s, device = engine.runner, [0.0], str(next(model.parameters()).device)

    def timed(fn):
        def call(*args, **kwargs):
            _sync(device)
            t = time.perf_counter()
            out = fn(*args, **kwargs)
            _sync(device)
            model_s[0] += time.perf_counter() - t
            return out
        return call
    names = [n for n in ("forward", "logits", "mtp_forward", "spec_step") if hasattr(runner, n)]
    for n in names:
        setattr(runner, n, timed(getattr(runner, n)))
    t0 = time.perf_counter()
    for _ in range(steps):
        engine.step()
    wall = time.perf_counter() - t0
    for n in names:
        delattr(runner, n)
    work = count_step_work(engine, count)
    return dict(host_ms=(wall - model_s[0]) / steps * 1e3, model_ms=model_s[0] / steps * 1e3, **work)


class _OpCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """ATen ops dispatched while `on` (the engine's own, outside the graph bodies)."""
    def __init__(self):
        super().__init__()
        self.on, self.ops = True, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += self.on
        return func(*args, **(kwargs or {}))


def count_step_work(engine, steps: int) -> dict:
    """Per `engine.step()` (the engine warmed up, requests decoding): ATen ops run outside the decode graphs' bodies
    (on the GPU each is a kernel launch or host op of its own, besides the replays), runs of graph bodies (replays on
    the GPU), and device -> host reads (`.tolist()` / `.item()` / `.cpu()`: each a stream sync on the GPU; a
    `torch.tensor(..., device=cuda)` from pageable memory is one more, not seen here: none is left on the step's
    path). On the CPU with padded buckets (capture=False) this is what the GPU step launches around its replays."""
    counter, reads, replays = _OpCounter(), [0], [0]
    runner = engine.runner
    bodies = [g for g in (runner.graphs, runner.mtp_graphs, getattr(runner, "spec_graphs", None)) if g is not None]

    def quiet(fn):
        def call(*args, **kwargs):
            replays[0] += 1
            counter.on = False
            try:
                return fn(*args, **kwargs)
            finally:
                counter.on = True
        return call

    def reading(fn):
        def call(self, *args, **kwargs):
            reads[0] += counter.on
            return fn(self, *args, **kwargs)
        return call
    originals = {n: getattr(torch.Tensor, n) for n in ("tolist", "item", "cpu")}
    for g in bodies:
        g._body = quiet(g._body)
    for n, f in originals.items():
        setattr(torch.Tensor, n, reading(f))
    try:
        with counter:
            for _ in range(steps):
                engine.step()
    finally:
        for n, f in originals.items():
            setattr(torch.Tensor, n, f)
        for g in bodies:
            del g._body
    return dict(ops=counter.ops / steps, replays=replays[0] / steps, reads=reads[0] / steps)


def spec_rows(model, a, rows: list, out: Path, t0: float) -> None:
    """MTP speculation at batch 1 with the engine settings of each `--spec-mode`: a plain step, the fused speculative
    step (dsv3.infer.spec_step) and the synchronous one (draft, verify, accept apart), each as ms per engine step and
    the ratio to the plain step (random weights: acceptance ~0, so this is the cost of a step, not its yield; with
    acceptance a the speed-up is (1 + a) / ratio at k = 1)."""
    for mode in a.spec_mode.split(","):
        kw = dict(MODES[mode])
        if a.device != "cuda":
            kw["padded"] = True
        plain_ms = None
        for name, k, extra in (("plain", 0, {}), ("fused", a.spec_k, {}),
                               ("sync", a.spec_k, dict(speculative_fused=False))):
            if a.deadline_s and time.time() - t0 > a.deadline_s:
                print(f"speculative {name} ({mode}): skipped (past --deadline-s {a.deadline_s:.0f})", flush=True)
                continue
            try:
                r = bench_decode(model, 1, a.prompt, a.tokens, spec_tokens=k, **kw, **extra)
            except Exception as e:   # a failing row must not lose the others
                traceback.print_exc()
                rows.append(dict(mode=f"spec-{name}{k}", spec_mode=mode, error=f"{type(e).__name__}: {str(e)[:2000]}"))
                print(f"speculative {name} k={k} ({mode}): FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
                continue
            ms = r["tpot_ms"] * (a.tokens - 1) / max(r["steps"], 1)
            plain_ms = plain_ms or ms
            r.update(mode=f"spec-{name}{k}", spec_mode=mode, ms_per_step=ms, step_ratio=ms / plain_ms)
            host = ""
            if a.host_ms:
                r["host"] = h = host_ms_per_step(model, 1, a.prompt, num_speculative_tokens=k, **kw, **extra)
                host = (f"; host {h['host_ms']:.3f} ms + model {h['model_ms']:.3f} ms per step, {h['ops']:.0f} ops "
                        f"outside graph bodies, {h['replays']:.0f} graph bodies, {h['reads']:.0f} host reads")
            rows.append(r)
            print(f"speculative {name:5s} k={k} batch 1 ({mode}): {ms:.2f} ms per step = {ms / plain_ms:.3f} plain "
                  f"steps, {r['tok_per_s']:.1f} tok/s, {r['spec']}{host}", flush=True)
            (out / "engine_decode.json").write_text(json.dumps(rows, indent=1))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--batches", default="1,32,64")
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--modes", default="eager,graphs,fp8")
    p.add_argument("--deadline-s", type=float, default=0, help="skip the modes that would start after this many "
                   "seconds (0: none skipped)")
    p.add_argument("--spec-k", type=int, default=0, help="also time MTP speculative decoding with k drafts at "
                   "batch 1, fused and synchronous, against a plain step (random weights: the cost of a speculative "
                   "step, not its acceptance); --modes '' for these rows alone")
    p.add_argument("--spec-mode", default="graphs", help="the engine settings of the --spec-k rows, one or more "
                   "modes (e.g. graphs,auto: auto = compiled decode layers + fused MoE)")
    p.add_argument("--ttft-batch", type=int, default=64, help="after each mode's decode rows: time to first token "
                   "of this many prompts queued at once (0: skip)")
    p.add_argument("--ttft-budgets", default="0,2048", help="tokens per step for the TTFT rows (0: every prompt in one "
                   "prefill step; 2048: EngineConfig's default budget, chunked prefill)")
    p.add_argument("--ttft-profile", action="store_true", help="after the TTFT rows (CUDA): one prefill step of "
                   "--ttft-batch prompts profiled, its wall time against its kernels' GPU time by category")
    p.add_argument("--ttft-profile-budget", type=int, default=0, help="tokens per step of the profiled prefill "
                   "step (0: every prompt in it; 2048: the first step of a chunked prefill)")
    p.add_argument("--host-ms", action="store_true", help="after each mode's rows: the engine's host work per "
                   "decode step (step() minus forward and head, timed apart; CPU dry runs: what overlap hides)")
    p.add_argument("--profile", action="store_true", help="after each mode but eager (CUDA): GPU time of one "
                   "graph replay and its kernels by op category (attention, GEMMs, experts, routing, elementwise, "
                   "gaps)")
    a = p.parse_args()
    t0 = time.time()
    modes = [m for m in a.modes.split(",") if m]
    for m in modes:
        if m.removeprefix("fp8-") not in MODES and m != "fp8":
            raise SystemExit(f"--modes: unknown mode {m!r} (one of {', '.join(MODES)}, fp8, fp8-<mode>)")
    if a.spec_k and any(m not in MODES for m in a.spec_mode.split(",")):
        raise SystemExit(f"--spec-mode: one or more of {', '.join(MODES)}, got {a.spec_mode!r}")
    is_fp8 = [m.startswith("fp8") for m in modes]
    if is_fp8 != sorted(is_fp8):
        raise SystemExit("--modes: fp8 quantises the model in place: list every bf16 mode before the fp8 ones")
    cfg = load_model_config("tiny" if a.tiny else "lite").replace(num_nextn_predict_layers=int(a.spec_k > 0))
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[a.dtype or ("bf16" if a.device == "cuda" else "fp32")]
    model = random_model(cfg, a.device, dtype)
    out = Path(os.environ.get("OUT", "out"))
    out.mkdir(parents=True, exist_ok=True)
    rows, quantized = [], False
    for mode in modes:
        if a.deadline_s and time.time() - t0 > a.deadline_s:
            print(f"{mode}: skipped (past --deadline-s {a.deadline_s:.0f})", flush=True)
            continue
        if mode.startswith("fp8") and not quantized:
            from dsv3.infer.fp8_weights import quantize_weights
            quantize_weights(model)
            quantized = True
        kw = dict(MODES[mode.removeprefix("fp8-")] if mode != "fp8" else MODES["graphs"])
        if a.device != "cuda" and kw.get("cuda_graphs", True):
            kw["padded"] = True       # CPU dry run: the graph buckets, run eagerly
        for B in map(int, a.batches.split(",")):
            t1 = time.time()
            try:
                r = bench_decode(model, B, a.prompt, a.tokens, **kw)
            except Exception as e:   # one failing mode (a compile error on a new stack) must not lose the others
                traceback.print_exc()
                rows.append(dict(mode=mode, batch=B, error=f"{type(e).__name__}: {str(e)[:2000]}"))
                print(f"{mode:14s} batch {B:3d}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
                (out / "engine_decode.json").write_text(json.dumps(rows, indent=1))
                break
            r.update(mode=mode, wall_s=time.time() - t1)
            rows.append(r)
            if a.profile and mode != "eager" and a.device == "cuda":
                r["profile"] = profile_step(model, B, a.prompt, **kw)
            if a.host_ms:
                r["host"] = host_ms_per_step(model, B, a.prompt, **kw)
            gap = f", TPOT - replay {r['tpot_ms'] - r['profile']['replay_ms']:.3f} ms" if "profile" in r else ""
            host = (f", host {r['host']['host_ms']:.3f} ms + model {r['host']['model_ms']:.3f} ms per step"
                    if "host" in r else "")
            print(f"{mode:14s} batch {B:3d}: TTFT {r['ttft_s']:.3f} s, {r['tok_per_s']:9.1f} tok/s, TPOT "
                  f"{r['tpot_ms']:.2f} ms, roofline {r['roofline_tok_per_s']:9.1f} tok/s "
                  f"({r['roofline_fraction']:.1%}, "
                  f"{r['step_bytes'] / 1e9:.2f} GB/step), {r['chained_steps']} chained steps{gap}{host}; "
                  f"{r['wall_s']:.0f} s with warm-up", flush=True)
            (out / "engine_decode.json").write_text(json.dumps(rows, indent=1))
        if a.ttft_batch:
            kw.pop("padded", None)
            for budget in map(int, a.ttft_budgets.split(",")):
                r = bench_ttft(model, a.ttft_batch, a.prompt, budget, **kw)
                r.update(mode=f"{mode}-ttft")
                rows.append(r)
                print(f"{mode:14s} TTFT of {r['batch']} x {r['prompt']}-token prompts, {r['budget']} tokens per step "
                      f"({r['steps']} steps): p50 {r['ttft_p50_s'] * 1e3:.1f} ms, p99 {r['ttft_p99_s'] * 1e3:.1f} ms, "
                      f"max {r['ttft_max_s'] * 1e3:.1f} ms", flush=True)
            if a.ttft_profile and a.device == "cuda":
                rows[-1]["prefill_profile"] = profile_prefill(model, a.ttft_batch, a.prompt, a.ttft_profile_budget,
                                                              **kw)
            (out / "engine_decode.json").write_text(json.dumps(rows, indent=1))
    if a.spec_k:
        spec_rows(model, a, rows, out, t0)
    (out / "engine_decode.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
