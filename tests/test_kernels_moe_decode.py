"""The fused MoE decode kernel: the PyTorch reference against a float64 oracle and against the model's own MoE
experts (dsv3.model.moe.Experts), the device-side pair sort against a host enumeration, the Triton kernels against
the reference under TRITON_INTERPRET=1 (fp32, tiny shapes, in a subprocess), and on CUDA in bf16 / FP8 with a
graph capture."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import interpreter_cases

from dsv3.fp8 import dequantize_blocks, quantize_blocks
from dsv3.kernels import moe_decode as md
from dsv3.kernels.moe_decode import (HAS_TRITON, MoELaunch, fused_token_range, launch_config, moe_decode,
                                     moe_decode_reference, moe_decode_triton, sort_pairs)


def make_moe(T, K, E, D, I, dtype=torch.float32, fp8=False, seed=0, device="cpu", same_expert=False):
    """x (T, D), routed weights (T, K) fp32, distinct expert ids per token (T, K), stacked experts; with fp8 the
    weights quantised to e4m3 blocks (whose magnitudes differ, so a misplaced scale shows) and their scales."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, generator=g)
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]) if T else torch.zeros(0, K).long()
    if same_expert:             # every token on experts 0..K-1: segments longer than one row tile
        idx = torch.arange(K).repeat(T, 1)
    weights = torch.rand(T, K, generator=g) + 0.1
    ws = [torch.randn(E, I, D, generator=g) * D ** -0.5, torch.randn(E, I, D, generator=g) * D ** -0.5,
          torch.randn(E, D, I, generator=g) * I ** -0.5]
    scales = [None] * 3
    if fp8:
        mags = [2.0 ** (torch.rand(E, -(-w.shape[1] // 128), -(-w.shape[2] // 128), generator=g) * 4 - 2) for w in ws]
        ws = [w * m.repeat_interleave(128, 1)[:, :w.shape[1]].repeat_interleave(128, 2)[:, :, :w.shape[2]]
              for w, m in zip(ws, mags)]
        pairs = [[quantize_blocks(w[e]) for e in range(E)] for w in ws]
        ws = [torch.stack([q for q, _ in p]) for p in pairs]
        scales = [torch.stack([s for _, s in p]).to(device) for p in pairs]
    else:
        ws = [w.to(dtype) for w in ws]
    return (x.to(device=device, dtype=dtype), weights.to(device), idx.to(device), *[w.to(device) for w in ws],
            *scales)


def make_shared(D, I_s, dtype=torch.float32, fp8=False, seed=0, device="cpu", fused=True):
    """The shared experts' six tensors (gate, up, down, and their scales with fp8): gate / up (I_s, D) as views of one
    (2 I_s, D) buffer, as dsv3.infer.fused_proj leaves them (`fused`; else two tensors), down (D, I_s); with fp8,
    e4m3 blocks of differing magnitudes, gate's and up's scales views of one fused scale buffer (fused FP8 needs
    I_s a multiple of 128: the engine fuses only then)."""
    g = torch.Generator().manual_seed(seed + 1000)
    gu = torch.randn(2 * I_s, D, generator=g) * D ** -0.5
    down = torch.randn(D, I_s, generator=g) * I_s ** -0.5
    if not fp8:
        gu = gu.to(device=device, dtype=dtype)
        gate, up = (gu[:I_s], gu[I_s:]) if fused else (gu[:I_s].clone(), gu[I_s:].clone())
        return gate, up, down.to(device=device, dtype=dtype), None, None, None
    def blocky(w):                  # each 128x128 block scaled by 2^[-2, 2): a misplaced scale shows
        mag = 2.0 ** (torch.rand(-(-w.shape[0] // 128), -(-w.shape[1] // 128), generator=g) * 4 - 2)
        return w * mag.repeat_interleave(128, 0)[:w.shape[0]].repeat_interleave(128, 1)[:, :w.shape[1]]
    gu, down = blocky(gu), blocky(down)
    dq, ds = (t.to(device) for t in quantize_blocks(down))
    if fused:
        assert I_s % 128 == 0
        q, s = (t.to(device) for t in quantize_blocks(gu))
        return q[:I_s], q[I_s:], dq, s[:I_s // 128], s[I_s // 128:], ds
    (gq, gs), (uq, us) = ((t.to(device) for t in quantize_blocks(w)) for w in (gu[:I_s], gu[I_s:]))
    return gq, uq, dq, gs, us, ds


def oracle_shared(x, gate, up, down, gs=None, us=None, ds=None):
    """float64: the shared experts' SwiGLU of every token, (T, D)."""
    def deq(w, s):
        return w.double().cpu() if s is None else dequantize_blocks(w.cpu(), s.cpu(), torch.float64)
    xd = x.double().cpu()
    return (F.silu(xd @ deq(gate, gs).T) * (xd @ deq(up, us).T)) @ deq(down, ds).T


def oracle(x, weights, idx, gate, up, down, gs=None, us=None, ds=None, *shared):
    """float64, token by token, pair by pair; plus the shared experts' SwiGLU when their tensors are given."""
    deq = lambda w, s, e: w[e].double() if s is None else dequantize_blocks(w[e], s[e], torch.float64)  # noqa: E731
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        xt = x[t].double().cpu()
        for k in range(idx.shape[1]):
            e = int(idx[t, k])
            h = F.silu(deq(gate.cpu(), gs if gs is None else gs.cpu(), e) @ xt) * (deq(up.cpu(), us if us is None
                                                                                         else us.cpu(), e) @ xt)
            out[t] += float(weights[t, k]) * (deq(down.cpu(), ds if ds is None else ds.cpu(), e) @ h)
    return out + oracle_shared(x, *shared) if shared and shared[0] is not None else out


def assert_close_scaled(out, ref, tol):
    assert out.shape == ref.shape
    if ref.numel():
        torch.testing.assert_close(out.double().cpu(), ref.double().cpu(), atol=tol * ref.abs().max().item(), rtol=tol)


@pytest.mark.parametrize("T,K,E,D,I,fp8", [(1, 6, 64, 200, 136, False), (7, 4, 16, 64, 32, False),
                                           (5, 2, 8, 300, 260, True), (0, 2, 4, 64, 32, False)])
def test_reference_matches_float64(T, K, E, D, I, fp8):
    args = make_moe(T, K, E, D, I, fp8=fp8, seed=T + E)
    out = moe_decode_reference(*args)
    assert out.shape == (T, D) and out.dtype == torch.float32
    assert_close_scaled(out, oracle(*args), 1e-5)


@pytest.mark.parametrize("fp8", [False, True], ids=["fp32", "fp8"])
@pytest.mark.parametrize("T,widen", [(1, 1), (2, 1), (1, 2), (2, 2), (5, 2)], ids=lambda v: str(v))
def test_reference_with_shared_experts_matches_float64(T, widen, fp8):
    """The shared experts' tensors add their SwiGLU to each token's sum (weight 1): I_s = I and I_s = 2 I (lite's
    two shared experts), gate / up views of one fused buffer, at the GEMV form's T = 1, 2 and a tiled T."""
    D, I = (260, 128) if fp8 else (200, 136)
    args = make_moe(T, 4, 16, D, I, fp8=fp8, seed=T + widen)
    shared = make_shared(D, widen * I, fp8=fp8, seed=T)
    out = moe_decode_reference(*args, *shared)
    assert out.shape == (T, D) and out.dtype == torch.float32
    want = oracle(*args, *shared)
    assert_close_scaled(out, want, 1e-5)
    assert (want - oracle(*args)).abs().max() > 0.02 * want.abs().max()     # the shared part is not negligible


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_reference_matches_the_model_experts(dtype, tol):
    """The model's own routed experts (sort, grouped GEMM, weighted combine) on the same weights and routing."""
    from dsv3.config import load_model_config
    from dsv3.model.moe import Experts
    cfg = load_model_config("tiny")
    x, w, idx, gate, up, down, *_ = make_moe(9, cfg.num_experts_per_tok, cfg.n_routed_experts, cfg.hidden_size,
                                             cfg.moe_intermediate_size, dtype=dtype, seed=4)
    experts = Experts(cfg).to(dtype)
    with torch.no_grad():
        for p, v in zip((experts.gate_proj, experts.up_proj, experts.down_proj), (gate, up, down)):
            p.copy_(v)
        counts = torch.bincount(idx.flatten(), minlength=cfg.n_routed_experts)
        want = experts(x, w, idx, counts)
    assert_close_scaled(moe_decode_reference(x, w, idx, gate, up, down), want.float(), tol)


def test_input_checks():
    x, w, idx, gate, up, down, *_ = make_moe(3, 2, 4, 64, 32)
    q, s = make_moe(3, 2, 4, 64, 32, fp8=True)[3], make_moe(3, 2, 4, 64, 32, fp8=True)[6]
    bad = {"x_1d": (x[0], w, idx, gate, up, down), "idx_float": (x, w, idx.float(), gate, up, down),
           "weights_shape": (x, w[:, :1], idx, gate, up, down), "down_shape": (x, w, idx, gate, up, gate),
           "d_mismatch": (x[:, :60], w, idx, gate, up, down), "fp8_without_scales": (x, w, idx, q, q, q),
           "scales_without_fp8": (x, w, idx, gate, up, down, s, s, s)}
    # the shared experts' tensors: all three weights, (I_s, D) / (D, I_s), the experts' dtype, scales iff FP8
    sg, su, sd, *_ = make_shared(64, 48)
    fq = make_moe(3, 2, 4, 64, 32, fp8=True)
    fs = make_shared(64, 128, fp8=True)
    bad |= {"shared_without_down": (x, w, idx, gate, up, down, None, None, None, sg, su, None),
            "shared_down_shape": (x, w, idx, gate, up, down, None, None, None, sg, su, sd.T),
            "shared_d_mismatch": (x, w, idx, gate, up, down, None, None, None, sg[:, :60], su[:, :60], sd[:60]),
            "shared_dtype": (x, w, idx, gate, up, down, None, None, None, sg.double(), su.double(), sd.double()),
            "shared_scales_without_fp8": (x, w, idx, gate, up, down, None, None, None, sg, su, sd, s[0], s[0], s[0]),
            "fp8_shared_without_scales": (*fq, *fs[:3]),
            "fp8_shared_scale_shape": (*fq, *fs[:5], fs[5].repeat(1, 2))}
    fns = [moe_decode_reference, moe_decode] + ([moe_decode_triton] if HAS_TRITON else [])
    for name, args in bad.items():
        for fn in fns:
            with pytest.raises(ValueError):
                fn(*args)


@pytest.mark.parametrize("T,K,E,block_m", [(1, 6, 64, 16), (37, 4, 16, 16), (20, 3, 4, 16), (300, 4, 64, 32),
                                           (5, 2, 4, 64), (256, 8, 8, 32), (600, 4, 64, 16)])
def test_sort_pairs(T, K, E, block_m):
    """Stable expert order, cumulative ends, and the real tiles first (every expert's segment cut in block_m rows),
    within the shape-only bound; both the compare-and-count (P <= 2048: 256 x 8 is the edge) and the radix sort
    (600 x 4) paths."""
    idx = make_moe(T, K, E, 8, 8, seed=T)[2]
    pairs, offs, tile_e, tile_row = sort_pairs(idx, E, block_m)
    flat = idx.flatten().tolist()
    want = sorted(range(T * K), key=lambda p: (flat[p], p))
    assert pairs.tolist() == want and pairs.dtype == torch.int32
    counts = [flat.count(e) for e in range(E)]
    assert offs.tolist() == torch.tensor(counts).cumsum(0).tolist()
    tiles, start = [], 0
    for e, end in enumerate(offs.tolist()):
        tiles += [(e, r) for r in range(start, end, block_m)]
        start = end
    n = -(-T * K // block_m) + min(E, T * K)
    assert tile_e.shape == (n,) and len(tiles) <= n
    assert [(int(a), int(b)) for a, b in zip(tile_e[:len(tiles)], tile_row[:len(tiles)])] == tiles
    assert (tile_e[len(tiles):] == E).all()


def test_dispatcher_on_cpu_is_reference():
    args = make_moe(6, 3, 8, 64, 48, seed=9)
    assert torch.equal(moe_decode(*args), moe_decode_reference(*args))
    shared = make_shared(64, 96, seed=9)
    assert torch.equal(moe_decode(*args, *shared), moe_decode_reference(*args, *shared))


@pytest.mark.parametrize("fp8", [False, True], ids=["fp32", "fp8"])
def test_decode_op_with_shared_experts_compiles(fp8):
    """The decode layers' op (dsv3.kernels.decode_ops.moe_decode; on CPU its reference op) with the shared experts'
    optional tensors: opcheck's schema and fake-tensor checks, and under torch.compile (fullgraph, aot_eager: the
    fake implementation traced) the eager result, bit for bit."""
    from dsv3.kernels import decode_ops
    D, I = (256, 128) if fp8 else (64, 48)
    args = make_moe(2, 3, 8, D, I, fp8=fp8, seed=11)
    shared = make_shared(D, 2 * I, fp8=fp8, seed=11)
    eager = decode_ops.moe_decode(*args, *shared)
    assert_close_scaled(eager, oracle(*args, *shared), 1e-5)
    # (test_schema's mode has no CPU multiply of e4m3 tensors: the schema is the same for both formats)
    torch.library.opcheck(decode_ops._moe_decode_reference, (*args, *shared),
                          test_utils=("test_faketensor",) if fp8 else ("test_schema", "test_faketensor"))
    torch._dynamo.reset()
    compiled = torch.compile(decode_ops.moe_decode, backend="aot_eager", fullgraph=True)(*args, *shared)
    assert torch.equal(compiled, eager)


# ---------------------------------------------------------------------------------------------------------------
# The launch table
# ---------------------------------------------------------------------------------------------------------------

def test_launch_table_lookup():
    """Each weight format's rows ascend in T; a token count takes the first row at or above it, the last row past
    the table; fp32 activations narrow the tiles; overrides win; bad launches are refused."""
    for fmt, rows in md.LAUNCH_TABLE.items():
        ts = [t for t, _, _ in rows]
        assert ts == sorted(set(ts)) and ts[0] >= 1, (fmt, ts)
        for i, (t, launch, _) in enumerate(rows):
            lo = ts[i - 1] + 1 if i else 1
            assert launch_config(lo, fmt == "fp8") == launch_config(t, fmt == "fp8") == launch
        assert launch_config(10 * ts[-1], fmt == "fp8") == rows[-1][1]
    wide = MoELaunch(block_m=64, block_n=128, num_stages=4, down_block_n=128, down_num_stages=5)
    assert launch_config(1, False, torch.float32, **{k: v for k, v in vars(wide).items()}) == wide
    fp32 = launch_config(1, False, torch.float32)
    assert fp32.block_n <= 32 and fp32.down_block_n <= 32 and fp32.num_stages <= 2
    assert launch_config(1, False, block_n=None, split_k=2).split_k == 2
    for bad in (dict(block_m=24), dict(block_m=8), dict(block_n=48), dict(down_block_n=256), dict(split_k=0),
                dict(gate_up_split_k=0)):
        with pytest.raises(ValueError):
            MoELaunch(**bad)


def test_fused_token_range_follows_the_table(monkeypatch):
    """auto's fused range: the leading `faster` rows, up to halfway to the first slower row; the dispatcher's
    FUSED_MOE_AUTO_TOKENS is the bf16 rows' range."""
    from dsv3.config import load_model_config
    from dsv3.infer.fp8_weights import quantize_weights
    from dsv3.infer.moe_dispatch import FUSED_MOE_AUTO_TOKENS, fused_moe_for, model_has_fp8_experts
    from dsv3.model import Transformer
    assert FUSED_MOE_AUTO_TOKENS == fused_token_range(False)
    L = MoELaunch()
    for flags, want in (((True, True, False, False), (1, 48)), ((True, True, True, True), (1, 128)),
                        ((False, True, True, True), (1, 0)), ((True, False, True, True), (1, 16))):
        rows = tuple((t, L, f) for t, f in zip((1, 32, 64, 128), flags))
        monkeypatch.setitem(md.LAUNCH_TABLE, "fp8", rows)
        assert fused_token_range(True) == want, flags
        assert [fused_moe_for("auto", True, b, fp8=True) for b in (1, 16, 17, 48, 49, 128, 129)] == \
            [want[0] <= b <= want[1] for b in (1, 16, 17, 48, 49, 128, 129)]
    model = Transformer(load_model_config("tiny"))
    assert not model_has_fp8_experts(model) and model_has_fp8_experts(quantize_weights(model))


# ---------------------------------------------------------------------------------------------------------------
# Triton under the interpreter (subprocess)
# ---------------------------------------------------------------------------------------------------------------

def _rel(out, ref) -> float:
    assert out.shape == ref.shape and out.dtype == ref.dtype, (out.shape, ref.shape, out.dtype, ref.dtype)
    if ref.numel() == 0:
        return 0.0
    return ((out - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def _interpreter_cases() -> dict:
    """max |triton - reference| / max |reference| per case, fp32 activations (run under TRITON_INTERPRET=1)."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    from dsv3.kernels.triton_setup import patch_interpreter_for_numpy2
    patch_interpreter_for_numpy2()
    errs = {}
    cases = {"t1_k6_e64": ((1, 6, 64, 200, 136), {}, {}),
             "t19_k4_e16": ((19, 4, 16, 130, 72), {}, {}),
             "same_expert_long_segments": ((40, 2, 8, 64, 40), dict(same_expert=True), {}),
             "bm32_bn64": ((21, 3, 8, 96, 80), {}, dict(block_m=32, block_n=64)),
             "fp8": ((7, 2, 8, 260, 200), dict(fp8=True), {}),
             "fp8_one_token": ((1, 4, 16, 256, 128), dict(fp8=True), dict(block_n=64)),
             "t0": ((0, 2, 4, 64, 32), {}, {}),
             # per-stage tiles; split-K of the down GEMM: I = 260 is 3 K blocks (slices of 2 + 1, and 1 + 1 + 1),
             # one block over 4 slices (3 empty slices store zeros), FP8 scales indexed by the absolute K block
             "per_stage_tiles": ((21, 3, 8, 96, 80), {}, dict(block_m=32, block_n=16, down_block_n=64)),
             "split_k2": ((5, 3, 8, 96, 260), {}, dict(split_k=2)),
             "split_k_empty_slices": ((3, 2, 4, 64, 100), {}, dict(split_k=4)),
             "split_k3_fp8": ((4, 2, 8, 130, 300), dict(fp8=True), dict(split_k=3, down_block_n=64)),
             # the fp16 MMA of FP8 weights (fp32 activations rounded to fp16: a looser bound below); ignored for
             # weights in x's dtype (exact)
             "fp8_f16_dot": ((7, 2, 8, 260, 200), dict(fp8=True), dict(f16_dot=True, down_f16_dot=True)),
             "f16_dot_without_fp8": ((5, 2, 8, 64, 40), {}, dict(f16_dot=True, down_f16_dot=True)),
             # split-K of the gate-up GEMM (D = 260: 3 K blocks in 2 or 3 slices; D = 100: 1 block, empty slices),
             # its partials finished by the down kernel, with the down GEMM split too, and FP8
             "gate_up_split2": ((5, 3, 8, 260, 96), {}, dict(gate_up_split_k=2)),
             "gate_up_split3_down_split2": ((4, 2, 8, 260, 200), {}, dict(gate_up_split_k=3, split_k=2)),
             "gate_up_split_empty_slices": ((3, 2, 4, 100, 64), {}, dict(gate_up_split_k=4)),
             "gate_up_split2_fp8": ((1, 4, 16, 256, 128), dict(fp8=True), dict(gate_up_split_k=2, block_n=64))}
    # T <= ROWS_MAX_TOKENS take the GEMV form (kernels.moe_rows) unless a tiled launch is asked for: both forms at
    # T = 1 and 2, bf16-like and FP8 weights, D and I off the 1024-column load (masked tails) and on it
    cases |= {"rows_t1": ((1, 6, 64, 200, 136), {}, {}), "rows_t2_fp8": ((2, 4, 16, 260, 200), dict(fp8=True), {}),
              "rows_t2_fp8_even": ((2, 2, 8, 1024, 1024), dict(fp8=True), {}),
              "rows_same_expert": ((2, 2, 8, 64, 40), dict(same_expert=True), {}),
              "tiled_t1": ((1, 6, 64, 200, 136), {}, dict(max_tokens=0)),
              "tiled_t2_fp8": ((2, 4, 16, 260, 200), dict(fp8=True), dict(max_tokens=0))}
    for name, (shape, make_kw, kw) in cases.items():
        args = make_moe(*shape, seed=sum(shape), **make_kw)
        errs[name] = _rel(moe_decode_triton(*args, **kw), moe_decode_reference(*args))
    # the GEMV form's launch fields (benchmarks/moe_decode_sweep.py sweeps them): gate's and up's loads paired in one
    # loop, masked and even K, 8- and 2-row strips, one-block loads
    from dsv3.kernels.moe_rows import moe_decode_rows_triton
    for name, (shape, make_kw, launch) in {
            "rows_pair_bf16": ((2, 4, 16, 260, 200), {}, dict(pair=True)),
            "rows_unpaired_fp8": ((2, 4, 16, 260, 200), dict(fp8=True), dict(pair=False)),
            "rows_pair_even": ((1, 2, 8, 256, 256), {}, dict(pair=True, gate_up=dict(block_n=8, ku=2))),
            "rows_strips_fp8": ((2, 2, 8, 260, 200), dict(fp8=True),
                                dict(gate_up=dict(block_n=8, ku=1), down=dict(block_n=2, ku=4, num_warps=2)))}.items():
        args = make_moe(*shape, seed=sum(shape), **make_kw)
        rows = functools.partial(moe_decode_rows_triton, **launch)
        errs[name] = _rel(moe_decode_triton(*args, rows=rows), moe_decode_reference(*args))
    args = make_moe(2, 4, 16, 260, 200, fp8=True, seed=3)
    errs["rows_vs_tiled"] = _rel(moe_decode_triton(*args), moe_decode_triton(*args, max_tokens=0))
    # activations past fp16's range are clamped, never inf / NaN
    x, *rest = make_moe(3, 2, 8, 128, 128, fp8=True, seed=1)
    x[0, :7] = 1e6
    out = moe_decode_triton(x, *rest, f16_dot=True, down_f16_dot=True)
    errs["f16_dot_overflow_is_finite"] = 0.0 if bool(torch.isfinite(out).all()) else 1.0
    # the op wrapper a compiled decode layer calls (kernels.decode_ops): its Triton path (the pair sort as plain
    # tensor ops, the GEMM stages as one custom op, the combine) on CPU tensors through the interpreter, eager and
    # compiled with fullgraph
    from dsv3.kernels import decode_ops
    decode_ops.use_triton = lambda *a, **k: True
    args = make_moe(19, 4, 16, 130, 72, seed=5)
    ref = moe_decode_reference(*args)
    errs["decode_ops_split"] = _rel(decode_ops.moe_decode(*args), ref)
    errs["decode_ops_split_compiled"] = _rel(torch.compile(decode_ops.moe_decode, fullgraph=True)(*args), ref)
    args = make_moe(1, 4, 16, 130, 72, seed=6)                   # batch 1: the GEMV form's op
    ref = moe_decode_reference(*args)
    errs["decode_ops_rows"] = _rel(decode_ops.moe_decode(*args), ref)
    errs["decode_ops_rows_compiled"] = _rel(torch.compile(decode_ops.moe_decode, fullgraph=True)(*args), ref)
    return errs


def _interpreter_shared_cases() -> dict:
    """The shared experts as one more pair per token of the GEMV form (kernels.moe_rows), its own subprocess under
    TRITON_INTERPRET=1 (as `_interpreter_cases`): max |triton - reference| / max |reference| per case, and against
    float64."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    from dsv3.kernels.triton_setup import patch_interpreter_for_numpy2
    patch_interpreter_for_numpy2()
    from dsv3.kernels import decode_ops
    from dsv3.kernels.moe_rows import moe_decode_rows_triton
    errs = {}
    # the shared experts as one more pair per token (kernels.moe_rows): against the reference and a float64
    # computation of routed + shared; I_s = 2 I (lite), I_s = I, I_s < I; gate / up views of one fused buffer (FP8:
    # and their scales), and two tensors with ragged FP8 blocks (I_s = 200); even K in both stages; launch fields
    for name, (shape, I_s, make_kw, kw) in {
            "shared_t1": ((1, 6, 64, 200, 136), 272, {}, {}),
            "shared_t2_same_width": ((2, 4, 16, 200, 136), 136, {}, {}),
            "shared_t2_narrower": ((2, 2, 8, 130, 200), 72, {}, {}),
            "shared_t1_fp8": ((1, 4, 16, 260, 128), 256, dict(fp8=True), {}),
            "shared_t2_fp8_same_width": ((2, 4, 16, 260, 256), 256, dict(fp8=True), {}),
            "shared_t2_fp8_ragged": ((2, 2, 8, 260, 200), 400, dict(fp8=True, fused=False), {}),
            "shared_even_k": ((1, 2, 8, 256, 256), 512, {}, {}),
            "shared_pair_bf16_launch": ((2, 4, 16, 260, 200), 400, {}, dict(pair=True, gate_up=dict(block_n=8))),
            "shared_fp8_strips": ((2, 2, 8, 260, 128), 256, dict(fp8=True),
                                  dict(gate_up=dict(block_n=16, ku=1), down=dict(block_n=2, ku=4, num_warps=2))),
            "shared_tiled_fallback": ((2, 2, 8, 200, 136), 272, dict(fp8=True, fused=False), dict(max_tokens=0))
            }.items():
        D = shape[3]
        fp8 = make_kw.get("fp8", False)
        args = make_moe(*shape, seed=sum(shape), fp8=fp8)
        shared = make_shared(D, I_s, seed=sum(shape), **make_kw)
        launch = {k: v for k, v in kw.items() if k != "max_tokens"}
        rows = functools.partial(moe_decode_rows_triton, **launch) if launch else None
        out = moe_decode_triton(*args, *shared, rows=rows, max_tokens=kw.get("max_tokens"))
        errs[name] = _rel(out, moe_decode_reference(*args, *shared))
        errs[name + "_float64"] = _rel(out.double(), oracle(*args, *shared))
    # the GEMV form's rows: T*(K+1), each token's shared row last; the fold equals the routed call plus the shared
    # SwiGLU; two calls bit-equal (a fixed-order combine)
    args = make_moe(2, 4, 16, 200, 136, seed=7)
    shared = make_shared(200, 272, seed=7)
    y = moe_decode_rows_triton(*args, *shared)
    errs["shared_rows_shape"] = 0.0 if y.shape == (2 * 5, 200) else 1.0
    from dsv3.kernels.moe_decode import _swiglu
    errs["shared_row_is_the_mlp"] = _rel(y.view(2, 5, 200)[:, 4], _swiglu(args[0], *shared))
    folded = moe_decode_triton(*args, *shared)
    errs["shared_fold_vs_apart"] = _rel(folded, moe_decode_triton(*args) + _swiglu(args[0], *shared))
    errs["shared_repeat_bitwise"] = 0.0 if torch.equal(folded, moe_decode_triton(*args, *shared)) else 1.0
    decode_ops.use_triton = lambda *a, **k: True
    # the GEMV form's op with the shared experts (fused FP8 views): eager and compiled (aot_eager: the op's fake
    # implementation traced; inductor's side of it is the combine, which the cases above compile) against the
    # reference and each other, and its fake implementation's shape (opcheck)
    args = make_moe(1, 4, 16, 256, 128, fp8=True, seed=8)
    shared = make_shared(256, 256, fp8=True, seed=8)
    ref = moe_decode_reference(*args, *shared)
    eager = decode_ops.moe_decode(*args, *shared)
    compiled = torch.compile(decode_ops.moe_decode, backend="aot_eager", fullgraph=True)(*args, *shared)
    errs["decode_ops_rows_shared"] = _rel(eager, ref)
    errs["decode_ops_rows_shared_compiled"] = _rel(compiled, ref)
    errs["decode_ops_rows_shared_compiled_vs_eager"] = _rel(compiled, eager)
    tw = args[1].float().contiguous()
    torch.library.opcheck(decode_ops._moe_decode_rows, (args[0], tw, *args[2:], *shared),
                          test_utils=("test_faketensor",))
    return errs


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed: the interpreter test needs it "
                                           "(requirements-ci.txt pins triton, so CI runs it)")
def test_triton_interpreter_matches_reference():
    errs = interpreter_cases("test_kernels_moe_decode")
    assert len(errs) == 33, errs
    for name, err in errs.items():
        assert err < (3e-3 if name == "fp8_f16_dot" else 1e-5), (name, errs)
    assert errs["fp8_f16_dot"] > 1e-6, errs        # the fp16 path ran (fp32 activations rounded)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed: the interpreter test needs it "
                                           "(requirements-ci.txt pins triton, so CI runs it)")
def test_triton_interpreter_shared_pair_matches_reference_and_float64():
    errs = interpreter_cases("test_kernels_moe_decode", "_interpreter_shared_cases")
    assert len(errs) == 20 + 4 + 3, errs
    assert all(err < 1e-5 for err in errs.values()), errs


@pytest.mark.skipif(not HAS_TRITON, reason="the sweep's dry run runs the kernels under the Triton interpreter")
def test_sweep_dry_run(tmp_path):
    """benchmarks/moe_decode_sweep.py --dry-run (CPU, interpreter, tiny shapes) runs every path the GPU run takes
    but the graphs: module path, table launch, both stage sweeps (both split-Ks, fp16 MMA), best launch, the GEMV
    form (T = 2) whole and over its launch grid, a JSON whose launches all match the reference and a LAUNCH_TABLE
    block that evaluates to the source's structure."""
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, OUT=str(tmp_path), PYTHONPATH=str(root / "src"), TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, str(root / "benchmarks" / "moe_decode_sweep.py"), "--dry-run",
                           "--tokens", "2", "--formats", "fp8", "--warm-s", "0"], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "moe_decode_sweep.json").read_text())
    (row,) = result["rows"]
    assert row["fmt"] == "fp8" and row["T"] == 2 and isinstance(row["fused_faster"], bool)
    assert row["rows_err"] < 1e-4 and len(row["rows_launches"]) == 3 and all(r["ok"] for r in row["rows_launches"])
    assert row["rows_default_stages"]["launch"] == {} and "GEMV form: whole" in proc.stdout
    f16 = row["best_launch"]["f16_dot"] or row["best_launch"]["down_f16_dot"]    # fp32 activations rounded to fp16
    assert max(row["module_err"], row["table_err"]) < 1e-4 and row["best_err"] < (5e-3 if f16 else 1e-4)
    assert {s.get("gate_up_split_k", 1) for s in row["stages"] if s["stage"] == "gate_up"} == {1, 2}
    assert {(s["stage"], s.get("split_k", 1)) for s in row["stages"]} == {("gate_up", 1), ("down", 1), ("down", 2)}
    assert all(s["ok"] for s in row["stages"]), row["stages"]
    ns = {"MoELaunch": MoELaunch}
    exec((tmp_path / "moe_decode_table.py").read_text(), ns)
    table = ns["LAUNCH_TABLE"]
    assert table.keys() == md.LAUNCH_TABLE.keys()
    assert [t for t, _, _ in table["fp8"]] == sorted({2} | {t for t, _, _ in md.LAUNCH_TABLE["fp8"]})
    assert table["bf16"] == md.LAUNCH_TABLE["bf16"]                    # not measured: kept as it is
    assert dict((t, (launch, f)) for t, launch, f in table["fp8"])[2] == (MoELaunch(**row["best_launch"]),
                                                                          row["fused_faster"])


# ---------------------------------------------------------------------------------------------------------------
# CUDA
# ---------------------------------------------------------------------------------------------------------------

needs_cuda = pytest.mark.skipif(
    not (torch.cuda.is_available() and HAS_TRITON and torch.cuda.get_device_capability() >= (8, 9)),
    reason="the Triton kernels compile only on a CUDA GPU of sm_89+ (e4m3 conversion; run through the device tool)")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
@pytest.mark.parametrize("T", [1, 2, 7, 32, 64, 256])
def test_triton_cuda_lite_shapes(T, fp8):
    """lite's expert shapes (64 experts, top-6, D 2048, I 1408) at decode batch sizes, bf16 activations."""
    args = make_moe(T, 6, 64, 2048, 1408, dtype=torch.bfloat16, fp8=fp8, seed=T, device="cuda")
    out = moe_decode_triton(*args)
    assert out.dtype == torch.bfloat16
    assert_close_scaled(out, moe_decode_reference(*args).float(), 2e-2)
    assert torch.equal(moe_decode(*args), out)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
@pytest.mark.parametrize("launch", [dict(split_k=2, down_block_n=128, down_num_warps=8, down_num_stages=4),
                                    dict(block_m=32, block_n=128, num_warps=8, num_stages=2, split_k=4),
                                    dict(block_m=64, block_n=32, num_stages=5, down_block_n=32),
                                    dict(block_n=64, f16_dot=True, down_block_n=128, down_f16_dot=True),
                                    dict(gate_up_split_k=4, block_n=32, split_k=2, f16_dot=True)],
                         ids=["split2_bn128", "bm32_split4", "bm64_bn32", "f16_dot", "gate_up_split4"])
def test_triton_cuda_launches(launch, fp8):
    """Launches the sweep may pick (per-stage tiles, 8 warps, deep pipelines, split-K) at lite's shapes: the same
    result as the reference, and split-K bit-equal between two calls (its slices are summed in a fixed order).
    Shared memory per stage, bf16: (block_m + 2 block_n) x 128 x 2 bytes for gate-up (<= 227 KB on the H200)."""
    args = make_moe(48, 6, 64, 2048, 1408, dtype=torch.bfloat16, fp8=fp8, seed=3, device="cuda")
    out = moe_decode_triton(*args, **launch)
    assert_close_scaled(out, moe_decode_reference(*args).float(), 2e-2)
    assert torch.equal(out, moe_decode_triton(*args, **launch))


@pytest.mark.gpu
@needs_cuda
def test_triton_cuda_f16_dot_clamps():
    """FP8 weights with the fp16 MMA: bf16 activations past fp16's range are clamped (finite output), and inside it
    the result matches the reference as closely as the bf16 MMA's."""
    x, *rest = make_moe(32, 6, 64, 2048, 1408, dtype=torch.bfloat16, fp8=True, seed=7, device="cuda")
    f16 = dict(f16_dot=True, down_f16_dot=True)
    assert_close_scaled(moe_decode_triton(x, *rest, **f16), moe_decode_reference(x, *rest).float(), 2e-2)
    x[0, :7] = 1e6
    x[1, :7] = -3e38
    assert torch.isfinite(moe_decode_triton(x, *rest, **f16)).all()


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("T", [16, 1], ids=["tiled", "rows"])
def test_triton_cuda_graph_capture(T):
    """No host sync: the call captures in a CUDA graph and replays correctly with new routing and new inputs (both
    forms: batch 1 takes the GEMV one)."""
    x, w, idx, *rest = make_moe(T, 6, 64, 512, 256, dtype=torch.bfloat16, seed=1, device="cuda")
    moe_decode_triton(x, w, idx, *rest)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = moe_decode_triton(x, w, idx, *rest)
    x2, w2, idx2, *_ = make_moe(T, 6, 64, 512, 256, dtype=torch.bfloat16, seed=2, device="cuda", same_expert=True)
    for a, b in ((x, x2), (w, w2), (idx, idx2)):
        a.copy_(b)
    graph.replay()
    torch.cuda.synchronize()
    assert_close_scaled(out, moe_decode_reference(x, w, idx, *rest).float(), 2e-2)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
@pytest.mark.parametrize("T", [1, 2])
def test_triton_cuda_shared_pair_lite_shapes(T, fp8):
    """lite's shapes with its two shared experts (I_s = 2816, gate / up views of one fused buffer) folded into the
    GEMV form: the reference's result, and bit-equal between an eager call and a CUDA graph's replay."""
    args = make_moe(T, 6, 64, 2048, 1408, dtype=torch.bfloat16, fp8=fp8, seed=T, device="cuda")
    shared = make_shared(2048, 2816, dtype=torch.bfloat16, fp8=fp8, seed=T, device="cuda")
    out = moe_decode_triton(*args, *shared)
    assert out.dtype == torch.bfloat16
    assert_close_scaled(out, moe_decode_reference(*args, *shared).float(), 2e-2)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = moe_decode_triton(*args, *shared)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, out)


def test_rows_launch_defaults_and_refusals():
    """The GEMV form's launches: fp8_gemv's one-row rules (no K slices), then the measured defaults (down's 16-row
    strips for both formats, FP8 gate-up's 8-row paired strips), fields overridden per stage, a bad field refused
    naming the rule."""
    from dsv3.kernels.moe_rows import rows_launch
    gate_up, down = rows_launch(2048, 1408)
    assert gate_up == dict(block_n=4, ku=8, num_warps=4, pair=False) and down == dict(block_n=16, ku=2, num_warps=4)
    gate_up, down = rows_launch(2048, 1408, fp8=True)
    assert gate_up == dict(block_n=8, ku=4, num_warps=4, pair=True) and down == dict(block_n=16, ku=2, num_warps=4)
    gate_up, down = rows_launch(2048, 1408, dict(block_n=8), dict(ku=2, num_warps=8), pair=True)
    assert gate_up == dict(block_n=8, ku=8, num_warps=4, pair=True) and down == dict(block_n=16, ku=2, num_warps=8)
    assert rows_launch(2048, 1408, pair=False, fp8=True)[0]["pair"] is False
    for bad in (dict(block_n=3), dict(ku=3), dict(num_warps=32), dict(split=2)):
        with pytest.raises(ValueError, match="moe rows launch"):
            rows_launch(2048, 1408, bad)
