"""Launch-config sweep of the fused MoE decode kernel (dsv3.kernels.moe_decode) against the MoE module's path, at a
model's expert shapes (`lite`: E=64, top-6, D=2048, I=1408), BF16 and FP8 block weights, T = 1..256 tokens.

Per (weights, T), in this order (the most informative first, so that a run cut by --deadline-s keeps it):
  1. the module path as the engine runs it (counts, the expert-order permutation, three `torch._grouped_mm` or FP8
     grouped GEMMs, the weighted combine: `Experts.forward` / `FP8Experts.forward`) and the fused call with the
     launch table's current row (sort + both stages + combine: `moe_decode_triton`);
  2. each stage alone over a grid of launches per row tile block_m: gate-up (block_n, num_warps, num_stages), down
     (the same, and split-K for small T); every launch's full output checked against `moe_decode_reference`
     (max |err| / max |ref|, bf16: < 2e-2), failing ones never picked;
  3. the fused call with the best passing launch (block_m minimising the two stages' sum);
  4. at T <= ROWS_MAX_TOKENS, the GEMV form `moe_decode_triton` takes there without launch arguments (whole call,
     "rows"), then its steps 2-3 alone (`moe_decode_rows_triton`) over a grid of `rows_launch` fields: per stage
     block_n, ku (KU * 128 columns per wide load), num_warps, and gate-up's `pair` (gate's and up's loads in the
     same steps). The default launch is the grid's first entry; the best passing one is reported beside it.
Every time is a CUDA-graph replay (the engine replays graphs) of calls that alternate between --sets independent
weight sets with their own routing, so that one call's experts are not in L2 for the next (the 27 layers of a step
do not share weights). GB/s = bytes of the weights of the experts hit (+ FP8 scales) / time; `%copy` against a
copy bandwidth measured in the same run (2 x bytes / time of a 1 GiB device copy).

Writes $OUT/moe_decode_sweep.json after every (weights, T) case, a table on stdout and $OUT/moe_decode_table.py: the
`LAUNCH_TABLE = {...}` block of src/dsv3/kernels/moe_decode_launch.py with the best launch and the measured verdict
(fused faster than the module) per row (rows not measured keep their current entry): paste it over the one in the
source.
Before sweeping, a pool of processes compiles every launch once (Triton's disk cache; only a speed-up: the sweep
compiles what it misses).

GPU (one call, <= 5 min): PYTHONPATH=src python benchmarks/moe_decode_sweep.py --deadline-s 240
CPU dry run (interpreter, tiny shapes, fp32, 2 launches per stage):
     PYTHONPATH=src python benchmarks/moe_decode_sweep.py --dry-run
"""

from __future__ import annotations

import argparse
import functools
import json
import multiprocessing as mp
import os
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

STAGE_KNOBS = ((4, 3), (4, 4), (4, 5), (8, 3), (8, 4))       # (num_warps, num_stages) per N tile


def gate_up_grid(dry: bool, fmt: str, tokens: int) -> list[dict]:
    f16 = fmt == "fp8"      # FP8 weights: also the fp16 MMA (MoELaunch.f16_dot)
    if dry:
        return [dict(block_n=32, num_warps=4, num_stages=2), dict(block_n=16, num_warps=4, num_stages=2,
                                                                   gate_up_split_k=2)] + \
            [dict(block_n=32, num_warps=4, num_stages=2, f16_dot=True)] * f16
    grid = [dict(block_n=bn, num_warps=w, num_stages=s) for bn in (32, 64, 128) for w, s in STAGE_KNOBS]
    if f16:
        grid += [dict(block_n=bn, num_warps=w, num_stages=s, f16_dot=True) for bn in (32, 64)
                 for w, s in STAGE_KNOBS[:4]]
    if tokens <= 8:     # few tiles: split the D loop for more programs (timed with the down kernel's extra work)
        grid += [dict(block_n=bn, num_warps=4, num_stages=3, gate_up_split_k=sk, f16_dot=f) for bn in (32, 64)
                 for sk in (2, 4) for f in (False, True)[:1 + f16]]
    return grid


def down_grid(dry: bool, tokens: int, fmt: str) -> list[dict]:
    f16 = fmt == "fp8"
    if dry:
        return [dict(down_block_n=32, down_num_warps=4, down_num_stages=2),
                dict(down_block_n=16, down_num_warps=4, down_num_stages=2, split_k=2)] + \
            [dict(down_block_n=32, down_num_warps=4, down_num_stages=2, down_f16_dot=True)] * f16
    grid = [dict(down_block_n=bn, down_num_warps=w, down_num_stages=s) for bn in (32, 64, 128) for w, s in STAGE_KNOBS]
    if tokens <= 8:     # few tiles: split the I loop for more programs
        grid += [dict(down_block_n=bn, down_num_warps=4, down_num_stages=4, split_k=sk) for bn in (64, 128)
                 for sk in (2, 4)]
    if f16:
        grid += [dict(down_block_n=bn, down_num_warps=w, down_num_stages=s, down_f16_dot=True) for bn in (32, 64, 128)
                 for w, s in STAGE_KNOBS[:2]]
    return grid


def rows_grid(dry: bool) -> list[dict]:
    """`moe_decode_rows_triton` launch arguments: the default first, then one stage's fields varied at a time."""
    if dry:
        return [{}, dict(pair=True, gate_up=dict(block_n=8, ku=1)), dict(down=dict(block_n=2, ku=2))]
    grid = [{}]
    for bn in (4, 8, 16):
        for ku in (4, 8, 16):
            grid += [dict(gate_up=dict(block_n=bn, ku=ku), pair=pair) for pair in (False, True)]
            if ku < 16:
                grid.append(dict(down=dict(block_n=bn, ku=ku // 2)))
    grid += [dict(gate_up=dict(num_warps=8), pair=True), dict(down=dict(num_warps=8)),
             dict(gate_up=dict(num_warps=2), pair=True), dict(down=dict(num_warps=2))]
    return grid


def block_ms(P: int, E: int, dry: bool) -> tuple[int, ...]:
    """Row tiles worth trying for P pairs over E experts: 16 while the mean rows per hit expert fit, wider after."""
    mean = -(-P // max(min(E, P), 1))
    if dry or mean <= 8:
        return (16,)
    return (16, 32) if mean <= 16 else (16, 32, 64)


# ----------------------------------------------------------------------------------------------------------------
# Timing and data
# ----------------------------------------------------------------------------------------------------------------

def time_per_call(fns: list, reps: int = 8, replays: int = 5) -> float:
    """Seconds per call of the fns (one per weight set), replayed from one CUDA graph of reps rounds; wall clock of
    one round on the CPU (the dry run: only that it runs)."""
    for f in fns:
        f()
    if not torch.cuda.is_available():
        t = time.perf_counter()
        for f in fns:
            f()
        return (time.perf_counter() - t) / len(fns)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            for f in fns:
                f()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    del graph
    return start.elapsed_time(end) * 1e-3 / (replays * reps * len(fns))


def make_experts(cfg, fmt: str, device: str, dtype: torch.dtype, seed: int):
    """An `Experts` (bf16 / fp32) or `FP8Experts` module of cfg's shapes, random N(0, 1/fan_in) weights."""
    from dsv3.infer.fp8_weights import FP8Experts
    from dsv3.model.moe import Experts
    with torch.device("meta"):
        experts = Experts(cfg)
    experts = experts.to(dtype).to_empty(device=device).requires_grad_(False)
    g = torch.Generator(device).manual_seed(seed)
    for w in (experts.gate_proj, experts.up_proj, experts.down_proj):
        w.normal_(0, w.shape[-1] ** -0.5, generator=g)
    return FP8Experts(experts) if fmt == "fp8" else experts


def make_inputs(cfg, T: int, device: str, dtype: torch.dtype, seed: int):
    """x (T, D), routed weights (T, K) fp32 summing to 1, K distinct experts per token (uniform: a random router)."""
    g = torch.Generator(device).manual_seed(seed)
    E, K = cfg.n_routed_experts, cfg.num_experts_per_tok
    x = torch.randn(T, cfg.hidden_size, device=device, generator=g).to(dtype)
    idx = torch.rand(T, E, device=device, generator=g).topk(K, dim=-1).indices
    w = torch.rand(T, K, device=device, generator=g) + 0.1
    return x, w / w.sum(-1, keepdim=True), idx


def weight_bytes(tensors: tuple, idx: torch.Tensor) -> tuple[int, int]:
    """Bytes of (gate + up, down) weights and scales of the experts idx hits."""
    hit = int(idx.unique().numel())
    per = [t[0].numel() * t.element_size() if t is not None else 0 for t in tensors]   # per expert
    return hit * (per[0] + per[1] + per[3] + per[4]), hit * (per[2] + per[5])


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-30)).item()


# ----------------------------------------------------------------------------------------------------------------
# Parallel compile warm-up (GPU): every launch compiled once in worker processes, into Triton's disk cache
# ----------------------------------------------------------------------------------------------------------------

@functools.cache
def _warm_case(config: str, fmt: str, device: str, dtype: torch.dtype):
    from dsv3 import load_model_config
    from dsv3.infer.moe_dispatch import expert_tensors
    from dsv3.kernels.moe_decode import launch_config, sort_pairs
    cfg = load_model_config(config)
    tensors = expert_tensors(make_experts(cfg, fmt, device, dtype, 0))
    x, w, idx = make_inputs(cfg, 8, device, dtype, 0)
    scales = [s.float().contiguous() if s is not None else None for s in tensors[3:]]
    return cfg, tensors, scales, x, w, idx, launch_config, sort_pairs


def _warm_one(job: tuple) -> str:
    config, fmt, launch, device, dtype = job
    from dsv3.kernels.moe_decode import MoELaunch, down_stage, gate_up_stage
    from dsv3.kernels.triton_setup import patch_interpreter_for_numpy2
    try:
        patch_interpreter_for_numpy2()          # the dry run's workers (no-op where not needed)
        cfg, (g, u, d, *_), (gs, us, ds), x, w, idx, _, sort_pairs = _warm_case(config, fmt, device,
                                                                               getattr(torch, dtype))
        launch = MoELaunch(**launch)
        pairs = sort_pairs(idx, cfg.n_routed_experts, launch.block_m)
        h = gate_up_stage(x, *pairs, g, u, gs, us, idx.shape[1], launch)
        down_stage(h, *pairs, d, ds, w.contiguous(), launch, x.dtype)
        if device == "cuda":
            torch.cuda.synchronize()
        return "ok"
    except Exception as e:      # over the shared-memory limit: the sweep skips it too
        return f"{type(e).__name__}: {str(e)[:200]}"


def warm_compile(jobs: list[tuple], seconds: float, max_workers: int) -> dict:
    """Compile the launches in a spawn pool for at most `seconds`; returns counts (ok, failed, not done)."""
    done, ok, t0 = 0, 0, time.time()
    workers = max(1, min(max_workers, (os.cpu_count() or 2) - 2, len(jobs)))
    pool = mp.get_context("spawn").Pool(workers)
    try:
        results = pool.imap_unordered(_warm_one, jobs)
        while done < len(jobs) and time.time() - t0 < seconds:
            try:
                r = results.next(timeout=max(1.0, seconds - (time.time() - t0)))
            except (mp.TimeoutError, StopIteration):
                break
            done, ok = done + 1, ok + (r == "ok")
    finally:
        pool.terminate()
        pool.join()
    return dict(jobs=len(jobs), ok=ok, failed=done - ok, not_done=len(jobs) - done, workers=workers,
                seconds=round(time.time() - t0, 1))


# ----------------------------------------------------------------------------------------------------------------
# One (weights, T) case
# ----------------------------------------------------------------------------------------------------------------

def run_case(cfg, fmt: str, T: int, sets: list, a, deadline: float, copy_bw: float) -> dict:
    from dsv3.infer.moe_dispatch import expert_tensors
    from dsv3.kernels.moe_decode import (MoELaunch, down_stage, gate_up_stage, launch_config, moe_decode_reference,
                                         moe_decode_triton, sort_pairs)
    dev, dtype = a.device, a.torch_dtype
    E, K, fp8 = cfg.n_routed_experts, cfg.num_experts_per_tok, fmt == "fp8"
    tol = 2e-2 if dtype != torch.float32 else 1e-4
    data = []
    for s, experts in enumerate(sets):
        x, w, idx = make_inputs(cfg, T, dev, dtype, seed=1000 * T + s)
        tensors = expert_tensors(experts)
        scales = [t.float().contiguous() if t is not None else None for t in tensors[3:]]
        data.append(dict(x=x, w=w, tw=w.float().contiguous(), idx=idx, experts=experts, tensors=tensors,
                         scales=scales, ref=moe_decode_reference(x, w, idx, *tensors)))
    gu_bytes, down_bytes = (sum(v) / len(data) for v in zip(*(weight_bytes(d["tensors"], d["idx"]) for d in data)))
    nbytes = gu_bytes + down_bytes
    row = dict(fmt=fmt, T=T, pairs=T * K, experts_hit=sum(int(d["idx"].unique().numel()) for d in data) / len(data),
               weight_mb=nbytes / 1e6, stages=[])
    perf = lambda sec, b=nbytes: dict(us=sec * 1e6, gbps=b / sec / 1e9, pct_copy=100 * b / sec / copy_bw)  # noqa: E731

    # 1. the module path and the table's current launch
    def module(d):
        flat = d["idx"].flatten()
        counts = torch.zeros(E, dtype=torch.int64, device=dev).scatter_add_(0, flat, torch.ones_like(flat))
        return d["experts"](d["x"], d["w"], d["idx"], counts)
    row["module_err"] = rel_err(module(data[0]), data[0]["ref"])
    row["module"] = perf(time_per_call([functools.partial(module, d) for d in data]))
    for d in data:      # its GEMMs alone (`Experts.ffn` on rows already in expert order): what compile cannot remove
        flat = d["idx"].flatten()
        d["counts"] = torch.bincount(flat, minlength=E)
        d["xs"] = d["x"][flat.argsort(stable=True) // K]
    row["module_gemms"] = perf(time_per_call([functools.partial(lambda d: d["experts"].ffn(d["xs"], d["counts"]), d)
                                              for d in data]))
    table = launch_config(T, fp8, dtype)
    fused = lambda d, launch: moe_decode_triton(d["x"], d["w"], d["idx"], *d["tensors"], **asdict(launch))  # noqa: E731
    row["table_launch"], row["table_err"] = asdict(table), rel_err(fused(data[0], table), data[0]["ref"])
    row["table"] = perf(time_per_call([functools.partial(fused, d, table) for d in data]))

    # 2. each stage alone, per row tile
    best = {}
    for bm in block_ms(T * K, E, a.dry_run):
        base = replace(table, block_m=bm, split_k=1, gate_up_split_k=1, f16_dot=False,
                       down_f16_dot=False)                                                # the knobs add these
        for d in data:
            d["pairs"] = sort_pairs(d["idx"], E, bm)
        gu = lambda d, launch: gate_up_stage(d["x"], *d["pairs"], *d["tensors"][:2], *d["scales"][:2], K,  # noqa: E731
                                             launch)
        dn = lambda d, h, launch: down_stage(h, *d["pairs"], d["tensors"][2], d["scales"][2], d["tw"],  # noqa: E731
                                             launch, dtype)
        check = lambda d, y: rel_err(y.view(T, K, -1).sum(1).to(dtype), d["ref"])  # noqa: E731
        for d in data:
            d["h"] = gu(d, base)
        base_down = time_per_call([functools.partial(dn, d, d["h"], base) for d in data])
        for stage, grid in (("gate_up", gate_up_grid(a.dry_run, fmt, T)), ("down", down_grid(a.dry_run, T, fmt))):
            for knobs in grid:
                if time.time() > deadline:
                    row["cut_by_deadline"] = True
                    break
                launch = replace(base, **knobs)
                r = dict(stage=stage, block_m=bm, **knobs)
                try:
                    if stage == "gate_up" and launch.gate_up_split_k > 1:
                        # the down kernel finishes split partials as it loads them: time both, less the down
                        # stage's own time with the base launch
                        split = replace(base, gate_up_split_k=launch.gate_up_split_k)
                        err = check(data[0], dn(data[0], gu(data[0], launch), split))
                        sec = time_per_call([functools.partial(lambda d: dn(d, gu(d, launch), split), d)
                                             for d in data]) - base_down
                        sec = max(sec, 1e-9)        # timing noise must not make it negative
                        r["timed_with_down"] = True
                    elif stage == "gate_up":
                        err = check(data[0], dn(data[0], gu(data[0], launch), base))
                        sec = time_per_call([functools.partial(gu, d, launch) for d in data])
                    else:
                        err = check(data[0], dn(data[0], data[0]["h"], launch))
                        sec = time_per_call([functools.partial(dn, d, d["h"], launch) for d in data])
                except Exception as e:      # over the shared-memory limit
                    r["error"] = f"{type(e).__name__}: {str(e)[:200]}"
                    row["stages"].append(r)
                    continue
                # fp16 operands of an fp32 dry run: fp16 rounding (the GPU's bf16 runs round coarser)
                ok = err < (5e-3 if dtype == torch.float32 and (launch.f16_dot or launch.down_f16_dot) else tol)
                r.update(err=err, ok=ok, **perf(sec, gu_bytes if stage == "gate_up" else down_bytes))
                row["stages"].append(r)
                key = (bm, stage)
                if r["ok"] and (key not in best or sec < best[key][0]):
                    best[key] = (sec, knobs)

    # 3. the best passing launch, end to end
    sums = {bm: best[(bm, "gate_up")][0] + best[(bm, "down")][0] for bm, st in best if (bm, "down") in best
            and (bm, "gate_up") in best}
    if sums:
        bm = min(sums, key=sums.get)
        launch = MoELaunch(block_m=bm, **best[(bm, "gate_up")][1], **best[(bm, "down")][1])   # each stage whole
        row["best_launch"], row["best_err"] = asdict(launch), rel_err(fused(data[0], launch), data[0]["ref"])
        row["best"] = perf(time_per_call([functools.partial(fused, d, launch) for d in data]))
        row["best_stages"] = {st: perf(best[(bm, st)][0], gu_bytes if st == "gate_up" else down_bytes)
                              for st in ("gate_up", "down")}
        if row["table"]["us"] < row["best"]["us"]:     # the stages' sum misjudged it (or noise): keep the table's
            row["best_launch"], row["best_err"], row["best"] = row["table_launch"], row["table_err"], row["table"]
        row["fused_faster"] = row["best"]["us"] < row["module"]["us"]
        row["speedup_vs_module"] = row["module"]["us"] / row["best"]["us"]
    from dsv3.kernels.moe_rows import ROWS_MAX_TOKENS
    if T <= ROWS_MAX_TOKENS:
        rows_form_sweep(row, data, T, K, dtype, tol, deadline, perf, nbytes)
    return row


def rows_form_sweep(row: dict, data: list, T: int, K: int, dtype, tol: float, deadline: float, perf,
                    nbytes: float) -> None:
    """Step 4 (module docstring): the GEMV form whole, then its steps 2-3 over `rows_grid`."""
    from dsv3.kernels.moe_decode import moe_decode_triton
    from dsv3.kernels.moe_rows import moe_decode_rows_triton
    whole = lambda d: moe_decode_triton(d["x"], d["w"], d["idx"], *d["tensors"])  # noqa: E731
    row["rows_err"] = rel_err(whole(data[0]), data[0]["ref"])
    row["rows"] = perf(time_per_call([functools.partial(whole, d) for d in data]))
    row["rows_launches"] = []
    for launch in rows_grid(dtype == torch.float32):
        if time.time() > deadline:
            row["cut_by_deadline"] = True
            break
        call = lambda d, kw=launch: moe_decode_rows_triton(d["x"], d["tw"], d["idx"], *d["tensors"][:3],  # noqa: E731
                                                          *d["scales"], **kw)
        r = dict(launch=launch, err=rel_err(call(data[0]).view(T, K, -1).sum(1).to(dtype), data[0]["ref"]))
        r.update(ok=r["err"] < tol, **perf(time_per_call([functools.partial(call, d) for d in data]), nbytes))
        row["rows_launches"].append(r)
    ok = [r for r in row["rows_launches"] if r["ok"]]
    if ok:
        row["rows_default_stages"] = row["rows_launches"][0]
        row["rows_best_stages"] = min(ok, key=lambda r: r["us"])


# ----------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------

def table_text(rows: list[dict]) -> str:
    """The LAUNCH_TABLE block for src/dsv3/kernels/moe_decode_launch.py: measured rows replace the current ones."""
    from dsv3.kernels.moe_decode import LAUNCH_TABLE, MoELaunch
    default = asdict(MoELaunch())
    measured = {(r["fmt"], r["T"]): r for r in rows if "best_launch" in r}
    lines = ["LAUNCH_TABLE: dict[str, tuple[tuple[int, MoELaunch, bool], ...]] = {"]
    for fmt, current in LAUNCH_TABLE.items():
        ts = sorted({t for t, _, _ in current} | {t for f, t in measured if f == fmt})
        cur = {t: (asdict(launch), faster) for t, launch, faster in current}
        lines.append(f'    "{fmt}": (')
        for t in ts:
            r = measured.get((fmt, t))
            launch, faster = (r["best_launch"], r["fused_faster"]) if r else cur[t]
            args = ", ".join(f"{k}={v}" for k, v in launch.items() if v != default[k] or k == "block_m")
            note = (f"  # {r['best']['us']:.0f} us fused vs {r['module']['us']:.0f} us module (GEMMs "
                    f"{r['module_gemms']['us']:.0f}), {r['best']['pct_copy']:.0f}% of copy"
                    + (", sweep cut by the deadline" if r.get("cut_by_deadline") else "")
                    if r else "  # not measured in this sweep")
            lines.append(f"        ({t}, MoELaunch({args}), {faster}),{note}")
        lines.append("    ),")
    lines.append("}")
    return "\n".join(lines)


def print_row(r: dict) -> None:
    f = lambda p: f"{p['us']:8.1f} us {p['gbps']:6.0f} GB/s {p['pct_copy']:4.0f}%" if p else "-"  # noqa: E731
    print(f"{r['fmt']:4s} T={r['T']:3d} hit {r['experts_hit']:5.1f} {r['weight_mb']:7.1f} MB | module "
          f"{f(r['module'])} (GEMMs {r['module_gemms']['us']:.1f} us) | table {f(r['table'])} | best "
          f"{f(r.get('best'))} | fused faster: "
          f"{r.get('fused_faster')} | errs module {r['module_err']:.1e} table {r['table_err']:.1e} best "
          f"{r.get('best_err', float('nan')):.1e}", flush=True)
    if "rows" in r:
        d, b = r.get("rows_default_stages"), r.get("rows_best_stages")
        print(f"          GEMV form: whole {f(r['rows'])} (err {r['rows_err']:.1e}); steps 2-3 default "
              f"{f(d) if d else '-'}, best {f(b) if b else '-'} {b['launch'] if b else ''}", flush=True)
    if "best_launch" in r:
        bs = r["best_stages"]
        print(f"          best {r['best_launch']}  gate_up {bs['gate_up']['us']:.1f} us "
              f"({bs['gate_up']['pct_copy']:.0f}%), down {bs['down']['us']:.1f} us ({bs['down']['pct_copy']:.0f}%)",
              flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--dry-run", action="store_true", help="CPU, TRITON_INTERPRET=1, tiny shapes, fp32, 2 launches "
                   "per stage: only that every path runs")
    p.add_argument("--config", default="lite")
    p.add_argument("--tokens", default=None, help="T values, in the order they are swept (default "
                   "64,128,256,32,8,1; dry run 8,1)")
    p.add_argument("--formats", default="bf16,fp8")
    p.add_argument("--sets", type=int, default=3, help="weight sets alternated per call (no L2 reuse)")
    p.add_argument("--deadline-s", type=float, default=240, help="stop sweeping after this many seconds (the JSON "
                   "is still written)")
    p.add_argument("--warm-s", type=float, default=90, help="at most this long compiling launches in parallel "
                   "first (0: off)")
    a = p.parse_args()
    t0 = time.time()
    if a.dry_run:
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            raise SystemExit("--dry-run: set TRITON_INTERPRET=1 before triton is imported")
        os.environ["TRITON_INTERPRET"] = "1"
        a.config, a.tokens, a.sets, a.warm_s = "tiny", a.tokens or "8,1", 2, min(a.warm_s, 60)
    from dsv3 import load_model_config
    from dsv3.kernels.moe_decode import MoELaunch
    from dsv3.kernels.triton_setup import patch_interpreter_for_numpy2
    if a.dry_run:
        patch_interpreter_for_numpy2()
    a.device = "cuda" if torch.cuda.is_available() and not a.dry_run else "cpu"
    a.torch_dtype = torch.float32 if a.dry_run else torch.bfloat16
    cfg = load_model_config(a.config)
    tokens, fmts = [int(t) for t in (a.tokens or "64,128,256,32,8,1").split(",")], a.formats.split(",")
    out = Path(os.environ.get("OUT", "out"))
    out.mkdir(parents=True, exist_ok=True)
    result = dict(config=a.config, shapes=dict(E=cfg.n_routed_experts, K=cfg.num_experts_per_tok,
                                               D=cfg.hidden_size, I=cfg.moe_intermediate_size),
                  device=torch.cuda.get_device_name() if a.device == "cuda" else "cpu (dry run)",
                  torch=torch.__version__, rows=[])
    if a.warm_s > 0:        # the dry run: the pool's mechanics on the interpreter, 2 workers
        jobs = []
        for fmt in fmts:
            for T in tokens:
                for bm in block_ms(T * cfg.num_experts_per_tok, cfg.n_routed_experts, a.dry_run):
                    jobs += [(a.config, fmt, asdict(MoELaunch(block_m=bm, **k)), a.device, str(a.torch_dtype)[6:])
                             for k in gate_up_grid(a.dry_run, fmt, T) + down_grid(a.dry_run, T, fmt)]
        jobs = list({json.dumps(j, sort_keys=True): j for j in jobs}.values())
        result["warm_compile"] = warm_compile(jobs, min(a.warm_s, a.deadline_s / 2), 2 if a.dry_run else 12)
        print(f"warm compile: {result['warm_compile']}", flush=True)
    from dsv3.infer.bench import copy_bandwidth
    result["copy_bw"] = copy_bandwidth(a.device)      # the H200's figure off the GPU (dry runs)
    print(f"{result['device']}: copy bandwidth {result['copy_bw'] / 1e12:.2f} TB/s; {a.config} E={cfg.n_routed_experts}"
          f" K={cfg.num_experts_per_tok} D={cfg.hidden_size} I={cfg.moe_intermediate_size}", flush=True)
    deadline = t0 + a.deadline_s
    with torch.inference_mode():
        sets = {fmt: [make_experts(cfg, fmt, a.device, a.torch_dtype, seed=s) for s in range(a.sets)]
                for fmt in fmts}
        for T in tokens:
            for fmt in fmts:
                if time.time() > deadline:
                    print(f"{fmt} T={T}: skipped (past --deadline-s {a.deadline_s:.0f})", flush=True)
                    continue
                try:
                    row = run_case(cfg, fmt, T, sets[fmt], a, deadline, result["copy_bw"])
                except Exception as e:      # one failing case must not lose the others
                    row = dict(fmt=fmt, T=T, error=f"{type(e).__name__}: {str(e)[:500]}")
                    print(f"{fmt} T={T}: FAILED {row['error']}", flush=True)
                else:
                    print_row(row)
                result["rows"].append(row)
                (out / "moe_decode_sweep.json").write_text(json.dumps(result, indent=1))
    result["launch_table"] = table_text(result["rows"])
    result["wall_s"] = time.time() - t0
    (out / "moe_decode_sweep.json").write_text(json.dumps(result, indent=1))
    (out / "moe_decode_table.py").write_text(result["launch_table"] + "\n")
    print(result["launch_table"], flush=True)
    print(f"wall {result['wall_s']:.0f} s; JSON {out / 'moe_decode_sweep.json'}", flush=True)


if __name__ == "__main__":
    main()
