"""Weight-only FP8 GEMMs: the PyTorch references against float64 on weights dequantised by dsv3.fp8, the
Triton kernels against the references under TRITON_INTERPRET=1 (fp32 activations, tiny shapes, in a subprocess:
the interpreter must be switched on before the kernels' @triton.jit decorators run), and on CUDA in bf16."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import interpreter_cases

from dsv3.fp8 import dequantize_blocks, quantize_blocks
from dsv3.kernels.fp8_weight_gemm import (
    HAS_TRITON,
    fp8_grouped_linear,
    fp8_grouped_linear_reference,
    fp8_grouped_linear_triton,
    fp8_linear,
    fp8_linear_reference,
    fp8_linear_triton,
    grouped_tile_map,
)
from dsv3.kernels.fp8_gemv import GEMV_MAX_M, gemv_launch
from dsv3.kernels.fp8_weight_gemm import _take_gemv


def make_weight(N, K, g):
    """Random (N, K) weight whose 128x128 blocks differ in magnitude by up to 2^8, so that a scale applied to the
    wrong block (or not at all) shows; returns the e4m3 weight and its scale_inv."""
    mag = 2.0 ** (torch.rand(-(-N // 128), -(-K // 128), generator=g) * 8 - 4)
    w = torch.randn(N, K, generator=g) * mag.repeat_interleave(128, 0)[:N].repeat_interleave(128, 1)[:, :K]
    return quantize_blocks(w)


def make_linear(M, N, K, dtype=torch.float32, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    q, s = make_weight(N, K, g)
    x = torch.randn(M, K, generator=g)
    return x.to(device=device, dtype=dtype), q.to(device), s.to(device)


def make_grouped(counts, M, N, K, dtype=torch.float32, seed=0, device="cpu"):
    """Rows sorted by group, `counts[e]` rows for group e, M >= sum(counts) (the rest belong to no group)."""
    g = torch.Generator().manual_seed(seed)
    pairs = [make_weight(N, K, g) for _ in counts]
    q, s = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
    offs = torch.tensor(counts, dtype=torch.int64).cumsum(0).to(torch.int32)
    x = torch.randn(M, K, generator=g)
    return x.to(device=device, dtype=dtype), q.to(device), s.to(device), offs.to(device)


def oracle_linear(x, q, s):
    return x.cpu().double() @ dequantize_blocks(q.cpu(), s.cpu(), torch.float64).T


def oracle_grouped(x, q, s, offs):
    out = torch.zeros(x.shape[0], q.shape[1], dtype=torch.float64)
    start = 0
    for e, end in enumerate(offs.tolist()):
        out[start:end] = oracle_linear(x[start:end], q[e], s[e])
        start = end
    return out


def assert_close_scaled(out, ref, tol):
    """|out - ref| <= tol * (|ref| + max |ref|): relative to the output's scale (sums cancel)."""
    assert out.shape == ref.shape
    if ref.numel():
        scale = ref.double().abs().max().item()
        torch.testing.assert_close(out.double().cpu(), ref.double().cpu(), atol=tol * scale, rtol=tol)


SHAPES = [(5, 200, 300), (1, 128, 128), (37, 130, 257), (0, 64, 200)]  # N, K off the 128 grid; M = 1, 37, 0
TOLS = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


@pytest.mark.parametrize("dtype", list(TOLS))
@pytest.mark.parametrize("M,N,K", SHAPES)
def test_reference_matches_float64(M, N, K, dtype):
    x, q, s = make_linear(M, N, K, dtype=dtype, seed=M + N + K)
    out = fp8_linear_reference(x, q, s)
    assert out.dtype == dtype and out.shape == (M, N)
    assert_close_scaled(out, oracle_linear(x, q, s), TOLS[dtype])


def test_scales_are_not_trivial():
    """The data must be able to catch a dropped or misplaced scale."""
    x, q, s = make_linear(4, 300, 260, seed=1)
    ref = oracle_linear(x, q, s)
    no_scale = x.double() @ q.double().T
    flipped = x.double() @ dequantize_blocks(q, s.flip(0), torch.float64).T
    for wrong in (no_scale, flipped):
        assert (wrong - ref).abs().max() > 0.1 * ref.abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_reference_matches_float64(dtype):
    counts = [3, 0, 1, 17, 0, 2]  # empty groups, a one-row group; 4 rows past offs[-1]
    x, q, s, offs = make_grouped(counts, 27, 136, 200, dtype=dtype, seed=2)
    out = fp8_grouped_linear_reference(x, q, s, offs)
    assert out.dtype == dtype and out.shape == (27, 136)
    assert (out[23:] == 0).all()
    assert_close_scaled(out, oracle_grouped(x, q, s, offs), TOLS[dtype])


@pytest.mark.parametrize("bad", [[3, 2, 5], [-1, 2, 4], [1, 2, 30]])
def test_grouped_reference_rejects_bad_offs(bad):
    x, q, s, _ = make_grouped([1, 1, 1], 10, 64, 64, seed=3)
    with pytest.raises(ValueError):
        fp8_grouped_linear_reference(x, q, s, torch.tensor(bad, dtype=torch.int32))


def _bad_linear_inputs():
    x, q, s = make_linear(3, 200, 300, seed=4)
    return {
        "x_1d": (x[0], q, s),
        "x_int": (x.long(), q, s),
        "weight_bf16": (x, q.to(torch.bfloat16), s),
        "weight_3d": (x, q[None], s),
        "k_mismatch": (x[:, :299], q, s),
        "scale_shape": (x, q, s[:1]),
        "scale_transposed": (x, q, s.T.contiguous()),
        "scale_int": (x, q, s.int()),
    }


def _bad_grouped_inputs():
    x, q, s, offs = make_grouped([2, 3], 6, 200, 150, seed=5)
    return {
        "weight_2d": (x, q[0], s[0], offs),
        "scale_e": (x, q, s[:1], offs),
        "scale_blocks": (x, q, s[:, :1], offs),
        "offs_len": (x, q, s, offs[:1]),
        "offs_float": (x, q, s, offs.float()),
        "offs_2d": (x, q, s, offs[None]),
        "k_mismatch": (x[:, :100], q, s, offs),
    }


LINEAR_FNS = [fp8_linear_reference, fp8_linear] + ([fp8_linear_triton] if HAS_TRITON else [])
GROUPED_FNS = [fp8_grouped_linear_reference, fp8_grouped_linear] + ([fp8_grouped_linear_triton] if HAS_TRITON
                                                                     else [])


@pytest.mark.parametrize("name", list(_bad_linear_inputs()))
@pytest.mark.parametrize("fn", LINEAR_FNS, ids=lambda f: f.__name__)
def test_linear_input_checks(fn, name):
    with pytest.raises(ValueError):
        fn(*_bad_linear_inputs()[name])


@pytest.mark.parametrize("name", list(_bad_grouped_inputs()))
@pytest.mark.parametrize("fn", GROUPED_FNS, ids=lambda f: f.__name__)
def test_grouped_input_checks(fn, name):
    with pytest.raises(ValueError):
        fn(*_bad_grouped_inputs()[name])


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed: nothing to check")
def test_triton_rejects_fp64_and_bad_blocks():
    x, q, s = make_linear(3, 64, 64, dtype=torch.float64, seed=10)
    xg, qg, sg, offs = make_grouped([3], 3, 64, 64, dtype=torch.float64, seed=10)
    for call in (lambda: fp8_linear_triton(x, q, s), lambda: fp8_grouped_linear_triton(xg, qg, sg, offs),
                 lambda: fp8_linear_triton(x.float(), q, s, block_n=256),
                 lambda: fp8_linear_triton(x.float(), q, s, block_m=24)):
        with pytest.raises(ValueError):
            call()


def test_dispatchers_on_cpu_are_reference():
    x, q, s = make_linear(7, 140, 300, dtype=torch.bfloat16, seed=6)
    assert torch.equal(fp8_linear(x, q, s), fp8_linear_reference(x, q, s))
    x, q, s, offs = make_grouped([2, 0, 5], 9, 64, 130, seed=7)
    assert torch.equal(fp8_grouped_linear(x, q, s, offs), fp8_grouped_linear_reference(x, q, s, offs))


@pytest.mark.parametrize("counts,M,block_m", [([3, 0, 1, 17, 0, 2], 27, 16), ([0, 0], 4, 16), ([40], 40, 16),
                                              ([16, 16, 1, 32], 70, 16), ([5, 0, 9], 14, 64), ([], 3, 16)])
def test_grouped_tile_map(counts, M, block_m):
    """Against a host enumeration: each group's rows cut into block_m tiles, in group order, then padding tiles."""
    offs = torch.tensor(counts, dtype=torch.int64).cumsum(0).to(torch.int32)
    if not counts:
        return  # E == 0 never reaches the tile map (the launch is skipped)
    group, row = grouped_tile_map(offs, M, block_m)
    want, start = [], 0
    for e, end in enumerate(offs.tolist()):
        want += [(e, r) for r in range(start, end, block_m)]
        start = end
    T = -(-M // block_m) + len(counts)
    assert group.shape == row.shape == (T,) and group.dtype == row.dtype == torch.int32
    assert len(want) <= T
    real = [(int(g), int(r)) for g, r in zip(group, row) if g < len(counts)]
    assert real == want
    assert (group[len(want):] == len(counts)).all()


# ---------------------------------------------------------------------------------------------------------------
# Triton under the interpreter (subprocess)
# ---------------------------------------------------------------------------------------------------------------

def _patch_interpreter_for_numpy2():
    from dsv3.kernels.triton_setup import patch_interpreter_for_numpy2
    patch_interpreter_for_numpy2()


def _rel(out, ref) -> float:
    assert out.shape == ref.shape and out.dtype == ref.dtype, (out.shape, ref.shape, out.dtype, ref.dtype)
    if ref.numel() == 0:
        return 0.0
    return ((out - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def _interpreter_cases() -> dict:
    """Run in a TRITON_INTERPRET=1 subprocess: max |triton - reference| / max |reference| per case (fp32
    activations: the interpreter's bf16 tl.dot is not faithful)."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    _patch_interpreter_for_numpy2()
    errs = {}
    for name, (M, N, K, kw) in {"m1_n200_k300": (1, 200, 300, {}), "m37_n130_k257": (37, 130, 257, {}),
                                "m0": (0, 64, 200, {}), "m20_bn128_bm32": (20, 256, 128, dict(block_n=128,
                                                                                              block_m=32)),
                                # split-K: 3 K blocks over 2 slices (one partial), and more slices than K blocks
                                "m3_split2": (3, 96, 300, dict(split_k=2)),
                                "m2_split9": (2, 40, 260, dict(split_k=9))}.items():
        x, q, s = make_linear(M, N, K, seed=M + N + K)
        # M <= 16 would take the GEMV: gemv=False keeps the tiled kernel's decode-sized paths covered
        errs[name] = _rel(fp8_linear_triton(x, q, s, gemv=False, **kw), fp8_linear_reference(x, q, s))
    x, q, s = make_linear(5, 72, 300, seed=8)
    wide = torch.randn(5, 320)
    wide[:, 10:310] = x  # x as a strided view (row stride 320)
    errs["strided_x"] = _rel(fp8_linear_triton(wide[:, 10:310], q, s, gemv=False), fp8_linear_reference(x, q, s))
    errs.update(_gemv_cases())
    for name, (counts, M, kw) in {"mixed": ([3, 0, 1, 17, 0, 2], 27, {}),
                                  "mixed_bm32_bn128": ([3, 0, 1, 17, 0, 2], 27, dict(block_m=32, block_n=128)),
                                  "one_group": ([20], 20, {}), "all_empty": ([0, 0, 0], 5, {}),
                                  "m0": ([0, 0], 0, {})}.items():
        x, q, s, offs = make_grouped(counts, M, 136, 200, seed=9)
        out = fp8_grouped_linear_triton(x, q, s, offs, gemv=False, **kw)
        errs["grouped_" + name] = _rel(out, fp8_grouped_linear_reference(x, q, s, offs))
        errs["grouped_" + name + "_tail"] = out[sum(counts):].abs().max().item() if M > sum(counts) else 0.0
    return errs


def _rel64(out, ref64) -> float:
    """max |out - float64 oracle| / max |oracle|."""
    assert out.shape == ref64.shape, (out.shape, ref64.shape)
    return ((out.double() - ref64).abs().max() / ref64.abs().max().clamp_min(1e-30)).item()


def _gemv_cases() -> dict:
    """The weight-streaming GEMV (through the one entry point, default dispatch and forced launches) against the
    float64 oracle: M = 1 (the per-lane path), 2, 3, 8, 16 (tl.dot, rows past M masked), N and K off the 128 grid,
    K slices (several, one partial, more asked than K blocks), KU steps, even-K (no masks) and strided x."""
    errs = {}
    for name, (M, N, K, kw) in {"gemv_m1_n200_k300": (1, 200, 300, {}), "gemv_m3_n130_k257": (3, 130, 257, {}),
                                "gemv_m16_n72_k384_ku3": (16, 72, 384, dict(ku=3)),
                                "gemv_m16_n200_k300_split2": (16, 200, 300, dict(split_k=2)),
                                "gemv_m1_n64_k512_split2_ku1": (1, 64, 512, dict(split_k=2, ku=1)),
                                "gemv_m3_n48_k1024_split3_bn16": (3, 48, 1024, dict(split_k=3, block_n=16)),
                                "gemv_m2_n40_k260_split9": (2, 40, 260, dict(split_k=9)),
                                "gemv_m8_n130_k256_bn128": (8, 130, 256, dict(block_n=128, num_warps=8)),
                                "gemv_m1_n50_k640_bn8_split2": (1, 50, 640, dict(block_n=8, ku=4, split_k=2))}.items():
        x, q, s = make_linear(M, N, K, seed=M + N + K + 1)
        errs[name] = _rel64(fp8_linear_triton(x, q, s, **kw), oracle_linear(x, q, s))
    x, q, s = make_linear(3, 72, 300, seed=8)
    wide = torch.randn(3, 320)
    wide[:, 10:310] = x
    errs["gemv_strided_x"] = _rel64(fp8_linear_triton(wide[:, 10:310], q, s, gemv=True), oracle_linear(x, q, s))
    # grouped: a token's 6 experts of 8 (one row each: batch 1), shared experts + a row of no group, 16 rows split
    for name, (counts, M, kw) in {"ggemv_batch1": ([1, 0, 1, 1, 1, 0, 1, 1], 6, {}),
                                  "ggemv_mixed_tail": ([1, 0, 2, 3, 0], 7, dict(split_k=2)),
                                  "ggemv_m16_ku1": ([4, 4, 8], 16, dict(ku=1, split_k=3)),
                                  "ggemv_all_empty": ([0, 0], 3, {})}.items():
        x, q, s, offs = make_grouped(counts, M, 136, 200, seed=10)
        out = fp8_grouped_linear_triton(x, q, s, offs, **kw)
        errs[name] = _rel64(out, oracle_grouped(x, q, s, offs)) if sum(counts) else 0.0
        errs[name + "_tail"] = out[sum(counts):].abs().max().item() if M > sum(counts) else 0.0
    return errs


def test_gemv_dispatch_and_launch_table(monkeypatch):
    x, q, _ = make_linear(GEMV_MAX_M, 64, 64, seed=11)
    assert _take_gemv(None, GEMV_MAX_M, x, q, None, None)
    assert not _take_gemv(None, GEMV_MAX_M + 1, x, q, None, None)
    assert not _take_gemv(None, 1, x, q, 16, None) and not _take_gemv(None, 1, x, q, None, 3)  # tiled-only knobs
    assert not _take_gemv(None, 1, x.T, q, None, None)         # K not unit-stride: tiled kernel
    with pytest.raises(ValueError, match="block_n"):             # tl.dot needs 16 columns
        fp8_linear_triton(x, q, torch.ones(1, 1), gemv=True, block_n=8)
    with pytest.raises(ValueError, match="gemv=True"):
        _take_gemv(True, GEMV_MAX_M + 1, x, q, None, None)
    monkeypatch.setenv("DSV3_FP8_GEMV", "0")                   # the A/B switch
    assert not _take_gemv(None, 1, x, q, None, None) and _take_gemv(True, 1, x, q, None, None)
    with pytest.raises(ValueError, match="block_n"):             # M = 2..16 takes tl.dot: 8 columns too few
        fp8_linear_triton(x[:4], q, torch.ones(1, 1), gemv=True, block_n=8)
    # lite decode shapes on 132 SMs (the H100 sweeps' best launches, RESULTS.md fourteenth and sixteenth sessions)
    for N, K in [(3072, 2048), (576, 2048), (2048, 2048), (10944, 2048), (2048, 10944), (1408, 2048), (3648, 2048)]:
        cfg = gemv_launch(1, N, K, 132)
        strips = -(-N // 4)
        assert cfg["block_n"] == 4 and cfg["ku"] == 8 and cfg["num_warps"] == 4, (N, K, cfg)
        # the strips alone fill the SMs: no K slices (their sum is one more launch); else ~2 programs per SM
        assert cfg["split"] == 1 if strips >= 132 else strips * cfg["split"] >= 2 * 132, (N, K, cfg)
        for M in (2, 4, 16):
            cfg = gemv_launch(M, N, K, 132)
            want = 1 if -(-N // 32) >= 66 else min(4, -(-K // 128) // 2)
            assert cfg == dict(block_n=32, ku=2, split=want, num_warps=4), (M, N, K, cfg)
    assert gemv_launch(1, 256, 384, 132)["ku"] == 4                             # 3 K blocks: one load of 4
    assert gemv_launch(6, 1408, 2048, 132, programs_per_row=6)["block_n"] == 4    # grouped rows: one-row strips
    assert gemv_launch(1, 256, 2048, 132)["split"] == 2                          # 64 strips: K slices
    with pytest.raises(ValueError, match="power of two"):       # one row loads ku * 128 columns at once
        fp8_linear_triton(x[:1], q, torch.ones(1, 1), gemv=True, ku=3)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed: the interpreter test needs it "
                                           "(requirements-ci.txt pins triton, so CI runs it)")
def test_triton_interpreter_matches_reference():
    errs = interpreter_cases("test_kernels_fp8_weight_gemm")
    assert len(errs) == 17 + 18, errs
    for name, err in errs.items():
        assert err < 1e-5, (name, errs)


# ---------------------------------------------------------------------------------------------------------------
# CUDA
# ---------------------------------------------------------------------------------------------------------------

needs_cuda = pytest.mark.skipif(
    not (torch.cuda.is_available() and HAS_TRITON and torch.cuda.get_device_capability() >= (8, 9)),
    reason="the Triton kernel compiles only on a CUDA GPU of sm_89+ (e4m3 conversion; run through the device tool)")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("M", [1, 16, 37, 64, 300])
@pytest.mark.parametrize("N,K", [(2048, 7168), (576, 7168), (7168, 2048), (200, 300)])
def test_triton_cuda_bf16(M, N, K):
    x, q, s = make_linear(M, N, K, dtype=torch.bfloat16, seed=21, device="cuda")
    out = fp8_linear_triton(x, q, s)
    assert out.dtype == torch.bfloat16
    assert_close_scaled(out, fp8_linear_reference(x, q, s), 1.6e-2)
    assert_close_scaled(fp8_linear(x, q, s), fp8_linear_reference(x, q, s), 1.6e-2)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("split_k", [1, 3, 56])
@pytest.mark.parametrize("gemv", [False, True])
def test_triton_cuda_split_k(split_k, gemv):
    """Decode shapes pick split-K by themselves (M=1 above); here each count explicitly, for the tiled kernel and
    the GEMV (M = 4 would take the GEMV by default), fp32 for a tight bound."""
    x, q, s = make_linear(4, 1000, 7168, seed=24, device="cuda")
    out = fp8_linear_triton(x, q, s, split_k=split_k, gemv=gemv)
    assert_close_scaled(out, fp8_linear_reference(x, q, s), 1e-5)


@pytest.mark.gpu
@needs_cuda
def test_triton_cuda_fp32():
    x, q, s = make_linear(37, 1000, 1100, seed=22, device="cuda")
    assert_close_scaled(fp8_linear_triton(x, q, s), fp8_linear_reference(x, q, s), 1e-5)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("counts,M", [([1, 0, 70, 3, 0, 1, 200, 9], 300), ([2] * 32, 64), ([0] * 7 + [5], 5)])
def test_triton_cuda_grouped_bf16(counts, M):
    x, q, s, offs = make_grouped(counts, M, 512, 1024, dtype=torch.bfloat16, seed=23, device="cuda")
    out = fp8_grouped_linear_triton(x, q, s, offs)
    assert_close_scaled(out, fp8_grouped_linear_reference(x, q, s, offs), 1.6e-2)
    assert (out[sum(counts):] == 0).all()


@pytest.mark.gpu
@needs_cuda
def test_triton_cuda_grouped_graph_capture():
    """No host sync: the call captures in a CUDA graph and replays correctly with new group sizes."""
    x, q, s, offs = make_grouped([3, 0, 9, 1], 16, 256, 512, dtype=torch.bfloat16, seed=24, device="cuda")
    fp8_grouped_linear_triton(x, q, s, offs)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fp8_grouped_linear_triton(x, q, s, offs)
    offs.copy_(torch.tensor([0, 7, 7, 12], dtype=torch.int32))
    graph.replay()
    torch.cuda.synchronize()
    assert_close_scaled(out, fp8_grouped_linear_reference(x, q, s, offs), 1.6e-2)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("M", [1, 3, 16])
@pytest.mark.parametrize("N,K", [(3072, 2048), (576, 2048), (2048, 10944), (200, 300)])
def test_gemv_cuda_bf16(M, N, K):
    """The weight-streaming GEMV at `lite` decode shapes (the default dispatch for M <= 16) vs float64."""
    x, q, s = make_linear(M, N, K, dtype=torch.bfloat16, seed=25, device="cuda")
    assert_close_scaled(fp8_linear_triton(x, q, s), oracle_linear(x, q, s), 1.6e-2)
    assert_close_scaled(fp8_linear_triton(x.float(), q, s), oracle_linear(x, q, s), 1e-5)


@pytest.mark.gpu
@needs_cuda
def test_grouped_gemv_cuda_graph_capture():
    """A token's 6 experts in one GEMV launch, captured in a CUDA graph and replayed with other experts."""
    x, q, s, offs = make_grouped([1, 0, 1, 1, 0, 1, 1, 1], 6, 1408, 2048, dtype=torch.bfloat16, seed=26,
                                 device="cuda")
    fp8_grouped_linear_triton(x, q, s, offs)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fp8_grouped_linear_triton(x, q, s, offs)
    offs.copy_(torch.tensor([0, 1, 2, 2, 3, 4, 5, 6], dtype=torch.int32))
    graph.replay()
    torch.cuda.synchronize()
    assert_close_scaled(out, oracle_grouped(x, q, s, offs), 1.6e-2)
