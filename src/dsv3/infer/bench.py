"""`dsv3 bench decode | prefill`: engine throughput on random weights of any config (no checkpoint needed).

decode: B prompts of P random tokens, greedy, T new tokens each; reports time to first token (the batch's prefill
step), time per output token (per request) and decode tokens/s, beside the weight-streaming roofline (ANCHORS: bytes
a decode step must read / the GPU's copy bandwidth, measured in the same process: 4.25e12 B/s on the H200, ~3.0e12
on an H100; elsewhere the H200's figure stands in).
prefill: B prompts of P tokens, one token generated; reports prefill tokens/s.
ttft: B prompts of P tokens arriving together, one token each, under a per-step token budget (chunked prefill when
B * P exceeds it): time to first token per request, p50 / p99 / max.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from ..model import Transformer
from .config import EngineConfig
from .engine import Engine
from .sampling import SamplingParams

COPY_BANDWIDTH = 4.25e12      # bytes/s, measured on the H200 (ANCHORS): the stand-in off the GPU


def copy_bandwidth(device: str | torch.device, gib: float = 1.0) -> float:
    """Read + write bytes / s of a `gib` GiB device copy on a CUDA device: the better of a memcpy and an elementwise
    kernel (a memcpy may run on a copy engine, slower than the SMs' loads), median of 10 after one warm-up. Off CUDA,
    COPY_BANDWIDTH. The roofline's denominator: a ratio against the H200's bandwidth on another GPU says nothing
    (an H100's is ~3.0 TB/s, RESULTS.md eighteenth session)."""
    device = torch.device(device)
    if device.type != "cuda":
        return COPY_BANDWIDTH
    src = torch.zeros(int(gib * 2 ** 29), dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    best = 0.0
    for fn in (lambda: dst.copy_(src), lambda: torch.neg(src, out=dst)):
        fn()
        times = []
        for _ in range(10):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e-3)
        best = max(best, 2 * src.numel() * src.element_size() / sorted(times)[len(times) // 2])
    return best


def random_model(cfg, device: str, dtype: torch.dtype, seed: int = 0) -> Transformer:
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to(dtype).to_empty(device=device)
    torch.manual_seed(seed)
    model.init_weights(std=0.02)
    return model.eval()


def decode_step_bytes(model: Transformer, batch: int) -> int:
    """Weights one decode step reads: every tensor but the routed experts, the MTP module and the embedding (which
    is gathered, not read), plus min(E, B*K) experts per MoE layer (an upper bound on the distinct experts hit).
    Buffers count too: FP8 weights and their scales are buffers; the state dict's, so the fused projection pairs
    (dsv3.infer.fused_proj: non-persistent buffers over the same storage) are not counted twice."""
    cfg = model.config
    tensors = dict(model.named_parameters())
    tensors.update(model.named_buffers())
    saved = model.state_dict().keys()
    tensors = {n: t for n, t in tensors.items() if n in saved}
    skip = lambda n: ".experts." in n or n.startswith("mtp.") or n == "embed_tokens.weight"  # noqa: E731
    rest = sum(t.numel() * t.element_size() for n, t in tensors.items() if not skip(n))
    n_moe = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
    expert_layer = sum(t.numel() * t.element_size() for n, t in tensors.items()
                       if ".experts." in n and not n.startswith("mtp.")) // max(n_moe, 1)
    expert = expert_layer // cfg.n_routed_experts
    return rest + n_moe * min(cfg.n_routed_experts, batch * cfg.num_experts_per_tok) * expert


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bench_decode(model: Transformer, batch: int, prompt_len: int, new_tokens: int, spec_tokens: int = 0,
                 seed: int = 0, warmup: bool = True, padded: bool = False,
                 make_engine: Callable[..., Engine] = Engine, **switches) -> dict:
    """`switches`: EngineConfig's speed switches (cuda_graphs, compile_decode, fused_moe, dense_gemv, skinny_gemm,
    overlap_schedule, ...: its defaults otherwise); `padded`: run the graph buckets eagerly where graphs cannot
    capture (CPU dry runs of the compiled decode); `make_engine(model, config=...)`: the engine to time (e.g. one
    rank's EPEngine: its has_unfinished is collective, so every rank steps in lockstep)."""
    device = str(next(model.parameters()).device)
    cfg = model.config
    engine = make_engine(model, config=EngineConfig(max_num_seqs=batch, cache_memory_gib=4,
                                                    max_num_batched_tokens=max(2048, batch * prompt_len),
                                                    num_speculative_tokens=spec_tokens, speculative_max_batch=batch,
                                                    **switches))
    if padded and engine.runner.graphs is None:
        engine.use_decode_graphs(capture=False)

    def run(seed: int) -> tuple[float, float, int]:
        g = torch.Generator().manual_seed(seed)
        for _ in range(batch):
            engine.add_request(torch.randint(10, cfg.vocab_size, (prompt_len,), generator=g).tolist(),
                               SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True))
        _sync(device)
        t0 = time.perf_counter()
        engine.step()
        _sync(device)
        t1 = time.perf_counter()
        steps = 0
        while engine.has_unfinished():
            engine.step()
            steps += 1
        _sync(device)
        return t1 - t0, time.perf_counter() - t1, steps

    if warmup:   # an untimed round with other prompts: Triton compilation, graph capture of the buckets used
        run(seed + 1)
        engine.spec_stats.update(steps=0, proposed=0, accepted=0)
        engine.step_stats.update(chained_steps=0)
    ttft, decode_s, steps = run(seed)
    decoded = batch * (new_tokens - 1)
    nbytes = decode_step_bytes(model, batch)
    copy_bw = copy_bandwidth(device)
    roof = copy_bw / nbytes * batch
    return dict(batch=batch, copy_bw=copy_bw, prompt=prompt_len, new_tokens=new_tokens, ttft_s=ttft, steps=steps,
                tpot_ms=decode_s / max(new_tokens - 1, 1) * 1e3, tok_per_s=decoded / decode_s,
                step_bytes=nbytes, roofline_tok_per_s=roof, roofline_fraction=decoded / decode_s / roof,
                spec=dict(engine.spec_stats), chained_steps=engine.step_stats["chained_steps"])


def bench_prefill(model: Transformer, batch: int, prompt_len: int, seed: int = 0,
                  compile_prefill: bool = False) -> dict:
    """One prefill of `batch` random prompts of `prompt_len` tokens, timed; with `compile_prefill` after an untimed
    one (which compiles), so that the number is the compiled steps', not torch.compile's."""
    device = str(next(model.parameters()).device)
    cfg = model.config
    engine = Engine(model, config=EngineConfig(max_num_seqs=batch, cache_memory_gib=4,
                                               max_num_batched_tokens=batch * prompt_len, prefix_caching=False,
                                               compile_prefill=compile_prefill))
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(10, cfg.vocab_size, (prompt_len,), generator=g).tolist() for _ in range(batch)]
    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    if compile_prefill:                  # (no prefix caching: the timed run prefills every token again)
        engine.generate(prompts, params)
    _sync(device)
    t0 = time.perf_counter()
    engine.generate(prompts, params)
    _sync(device)
    dt = time.perf_counter() - t0
    return dict(batch=batch, prompt=prompt_len, seconds=dt, tok_per_s=batch * prompt_len / dt)


def _percentile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


def bench_ttft(model: Transformer, batch: int, prompt_len: int, budget: int = 0, seed: int = 0,
               **engine_kw) -> dict:
    """Time to first token of `batch` prompts queued at once: `budget` tokens per step (max_num_batched_tokens; 0:
    every prompt in one step, else chunked prefill over ceil(B*P / budget) steps). After an untimed round (kernel
    compilation); `engine_kw` are EngineConfig's other fields (the decode mode's)."""
    device = str(next(model.parameters()).device)
    cfg = model.config
    budget = budget or batch * prompt_len
    engine = Engine(model, config=EngineConfig(max_num_seqs=batch, cache_memory_gib=4, max_num_batched_tokens=budget,
                                               **engine_kw))

    def run(seed: int) -> tuple[list[float], int]:
        g = torch.Generator().manual_seed(seed)
        params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
        prompts = [torch.randint(10, cfg.vocab_size, (prompt_len,), generator=g).tolist() for _ in range(batch)]
        _sync(device)
        t0 = time.perf_counter()
        for p in prompts:
            engine.add_request(p, params)
        first, steps = [], engine.step_stats["steps"]
        while engine.has_unfinished():
            # the tokens step() returns are on the host: no sync needed (with the overlap schedule they are the
            # previous step's, returned once this call has launched its own batch or found nothing to run)
            outs = engine.step()
            now = time.perf_counter()
            first += [now - t0 for o in outs if o.new_token_ids]
        return first, engine.step_stats["steps"] - steps

    run(seed + 1)
    first, steps = run(seed)
    return dict(batch=batch, prompt=prompt_len, budget=budget, steps=steps, ttft_p50_s=_percentile(first, 0.5),
                ttft_p99_s=_percentile(first, 0.99), ttft_max_s=max(first))
