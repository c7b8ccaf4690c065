"""FP8 quantisation kernels (1x128 tiles, their transposed variant, 128x128 blocks): the references against an
independent float64 computation and E4M3's round-trip error bound, the Triton kernels against the references under
TRITON_INTERPRET=1 (in a subprocess: the interpreter must be on before the @triton.jit decorators run), and bit for
bit on CUDA sm_89+."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import interpreter_cases

import dsv3.fp8
from dsv3.kernels import fp8_quant
from dsv3.kernels.fp8_quant import (HAS_TRITON, dequantize_blocks, dequantize_tiles, quantize_blocks,
                                    quantize_blocks_both, quantize_blocks_both_reference,
                                    quantize_blocks_reference, quantize_blocks_triton, quantize_tiles,
                                    quantize_tiles_reference, quantize_tiles_transposed,
                                    quantize_tiles_transposed_reference, quantize_tiles_transposed_triton,
                                    quantize_tiles_triton)

E4M3 = torch.float8_e4m3fn
SIZES = [1, 37, 128, 200, 257]
DTYPES = [torch.float32, torch.bfloat16]
ZERO_SCALE = (torch.tensor(1e-4, dtype=torch.float32) / 448).item()  # fp32 eps / 448, as both implementations do


def make_x(M, K, dtype=torch.float32, seed=0):
    """Rows of magnitudes 2^-8..2^8; some rows with one outlier 2^8..2^16 times larger (pushing the rest of their
    tile into e4m3's subnormals); row 1 all zero, row 2 below EPS, and the second tile of row 0 zero."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g) * 2.0 ** (torch.rand(M, 1, generator=g) * 16 - 8)
    for r in range(3, M, 4):
        c = int(torch.randint(K, (1,), generator=g))
        x[r, c] = x[r].abs().max() * 2.0 ** float(torch.randint(8, 17, (1,), generator=g))
    if M > 1:
        x[1] = 0
    if M > 2:
        x[2] *= 1e-7 / x[2].abs().max().clamp_min(1e-30)
    x[0, 128:256] = 0
    if dtype == torch.float16:  # outliers past fp16's range would become inf (NaN scales): saturate them
        x = x.clamp(-60000, 60000)
    return x.to(dtype)


def oracle_scales(x64, rows, cols, pow2):
    """float64 scales for (rows x cols) tiles of x64 (zero-padded to whole tiles)."""
    M, K = x64.shape
    nr, nc = -(-M // rows), -(-K // cols)
    xp = torch.nn.functional.pad(x64, (0, nc * cols - K, 0, nr * rows - M)).view(nr, rows, nc, cols)
    s = xp.abs().amax(dim=(1, 3)).clamp_min(1e-4) / 448
    return 2.0 ** torch.ceil(torch.log2(s)) if pow2 else s


def expand(scale, rows, cols, shape):
    return scale.double().repeat_interleave(rows, 0)[:shape[0]].repeat_interleave(cols, 1)[:, :shape[1]]


def check_against_float64(x, q, scale, rows, cols, pow2):
    """Scales = float64 oracle (fp32 rounding, or exactly for pow2); |dequant - x| <= 2^-4 |x| (half an ulp of a
    normal e4m3) + 2^-10 scale (half the subnormal step), with 1e-6 slack for the fp32 division; amax maps to 448
    (to [224, 448] with pow2); all-zero tiles get EPS/448 and zeros."""
    x64 = x.double()
    want = oracle_scales(x64, rows, cols, pow2)
    assert scale.dtype == torch.float32 and scale.shape == want.shape and q.dtype == E4M3 and q.shape == x.shape
    if pow2:
        assert torch.equal(scale.double(), want)
    else:
        torch.testing.assert_close(scale.double(), want, rtol=2.5e-7, atol=0)
    s = expand(scale, rows, cols, x.shape)
    deq = q.double() * s
    bound = (2.0 ** -4 * x64.abs() + 2.0 ** -10 * s) * (1 + 1e-6)
    assert ((deq - x64).abs() <= bound).all(), ((deq - x64).abs() / bound).max()
    qmax = torch.nn.functional.pad(q.double().abs(), (0, -x.shape[1] % cols, 0, -x.shape[0] % rows))
    qmax = qmax.view(scale.shape[0], rows, scale.shape[1], cols).amax(dim=(1, 3))
    live = oracle_scales(x64, rows, cols, False) > 1e-4 / 448 * (1 + 1e-9)
    assert live.any()
    if pow2:  # amax / scale lies in (224, 448]; 224 is an e4m3 value, so it may round down onto it
        assert ((qmax[live] >= 224) & (qmax[live] <= 448)).all()
    else:
        assert (qmax[live] == 448).all()
    amax = torch.nn.functional.pad(x64.abs(), (0, -x.shape[1] % cols, 0, -x.shape[0] % rows))
    zero = amax.view(scale.shape[0], rows, scale.shape[1], cols).amax(dim=(1, 3)) == 0
    if not pow2:
        assert (scale[zero] == ZERO_SCALE).all()
    assert (q.double()[expand(zero.double(), rows, cols, x.shape) > 0] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("K", SIZES)
@pytest.mark.parametrize("M", SIZES)
def test_tiles_reference_vs_float64(M, K, dtype):
    x = make_x(M, K, dtype, seed=M * 1000 + K)
    for pow2 in (False, True):
        q, scale = quantize_tiles_reference(x, pow2)
        assert scale.shape == (M, -(-K // 128)) and q.is_contiguous()
        check_against_float64(x, q, scale, 1, 128, pow2)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("K", SIZES)
@pytest.mark.parametrize("M", SIZES)
def test_blocks_reference_vs_float64(M, K, dtype):
    w = make_x(M, K, dtype, seed=M * 1000 + K + 1)
    for pow2 in (False, True):
        q, scale = quantize_blocks_reference(w, pow2)
        assert scale.shape == (-(-M // 128), -(-K // 128))
        check_against_float64(w, q, scale, 128, 128, pow2)


def bits(q):
    return q.view(torch.uint8)


@pytest.mark.parametrize("K", SIZES)
@pytest.mark.parametrize("M", SIZES)
def test_transposed_reference_against_float64(M, K):
    x = make_x(M, K, torch.bfloat16, seed=M + 7 * K)
    for pow2 in (False, True):
        q_t, scale_t = quantize_tiles_transposed_reference(x, pow2)
        assert q_t.shape == (K, M) and scale_t.shape == (K, -(-M // 128)) and q_t.is_contiguous()
        check_against_float64(x.t(), q_t, scale_t, 1, 128, pow2)


def test_tiles_strided_input_matches_contiguous():
    x = make_x(300, 150, seed=3)
    for fn in (quantize_tiles_reference, quantize_tiles_transposed_reference, quantize_blocks_reference):
        a, b = fn(x.t().contiguous()), fn(x.t())
        assert torch.equal(bits(a[0]), bits(b[0])) and torch.equal(a[1], b[1])


def test_one_block_quantiser_for_checkpoints_and_training():
    """dsv3.fp8 (the checkpoint format) has no quantiser of its own: it is this module's, so checkpoint, serving and
    training scales agree, near-zero blocks included. Quantising w.T gives (q.T, scale.T); fp64 weights (a float64
    model saved as FP8) take the reference, through fp32."""
    assert dsv3.fp8.quantize_blocks is quantize_blocks and dsv3.fp8.dequantize_blocks is dequantize_blocks
    assert dsv3.fp8.BLOCK == fp8_quant.BLOCK == 128
    w = torch.randn(300, 200, generator=torch.Generator().manual_seed(4)) * 0.02
    for pow2 in (False, True):
        q, scale = quantize_blocks_reference(w, pow2)
        q_t, scale_t = quantize_blocks_reference(w.t().contiguous(), pow2)
        assert torch.equal(bits(q_t), bits(q.t())) and torch.equal(scale_t, scale.t())
    q, scale = quantize_blocks(w.double())
    assert torch.equal(bits(q), bits(quantize_blocks_reference(w)[0])) and scale.dtype == torch.float32
    for dtype in (torch.float64, torch.float32, torch.bfloat16):  # one rounding of the exact product, then a cast
        want = (q.double() * expand(scale, 128, 128, w.shape)).to(dtype)
        assert torch.equal(dequantize_blocks(q, scale, dtype), want)


def test_pow2_scales():
    """Powers of two, >= the plain scale and below twice it; x / scale never exceeds 448 (no saturation); amax
    exactly 448 * 2^k keeps scale 2^k, one fp32 ulp above it doubles it."""
    x = make_x(200, 257, seed=5)
    x[5, 0] = 448.0 * 2 ** -3
    x[5, 1:] = 0
    x[6, :] = 0
    x[6, 3] = torch.nextafter(torch.tensor(448.0), torch.tensor(1e9))
    plain = quantize_tiles_reference(x)[1]
    plain_b = quantize_blocks_reference(x)[1]
    q, scale = quantize_tiles_reference(x, pow2=True)
    scale_b = quantize_blocks_reference(x, pow2=True)[1]
    for s, p, rows in ((scale, plain, 1), (scale_b, plain_b, 128)):
        assert (torch.frexp(s).mantissa == 0.5).all()
        assert (s >= p).all() and (s < 2 * p).all()
        assert (x.double().abs() / expand(s, rows, 128, x.shape) <= 448).all()
        assert (x.double().abs() / expand(p, rows, 128, x.shape) <= 448 * (1 + 2 ** -22)).all()
    assert scale[5, 0] == 2 ** -3 and plain[5, 0] == 2 ** -3 and q[5, 0].float() == 448
    assert plain[6, 0] > 1 and scale[6, 0] == 2.0 and q[6, 3].float() == 224


def test_zero_and_tiny_tiles():
    x = torch.zeros(3, 300)
    x[1] = torch.linspace(-1e-6, 1e-6, 300)  # amax below EPS: the scale stays EPS/448
    for fn in (quantize_tiles_reference, quantize_blocks_reference):
        for pow2 in (False, True):
            q, scale = fn(x, pow2)
            want = ZERO_SCALE if not pow2 else 2.0 ** -22  # 1e-4 / 448 = 2^-22.09
            assert (scale == want).all()
    q, scale = quantize_tiles_reference(x)
    assert (q[0].float() == 0).all() and (q[1].float() != 0).any()


def test_blocks_both_is_both_orientations():
    """quantize_blocks_both = (quantize_blocks(w), quantize_blocks(w.T)) exactly: the transposed blocks are the
    blocks of the transpose (square blocks)."""
    w = make_x(300, 200, torch.bfloat16, seed=8)
    for pow2 in (False, True):
        q, s, q_t, s_t = quantize_blocks_both(w, pow2)
        (a, sa), (b, sb) = quantize_blocks_reference(w, pow2), quantize_blocks_reference(w.t(), pow2)
        assert torch.equal(bits(q), bits(a)) and torch.equal(s, sa)
        assert torch.equal(bits(q_t), bits(b)) and torch.equal(s_t, sb) and q_t.is_contiguous()


def test_reference_nonfinite():
    """What the Triton kernels must reproduce: a NaN makes its tile's scale NaN and the tile NaN; an inf makes
    the scale inf, the other elements (finite / inf) 0 and the inf itself NaN (inf / inf)."""
    x = nonfinite_x(130, 260)
    q, s = quantize_tiles_reference(x)
    assert s[3, 0].isnan() and q[3, :128].float().isnan().all() and not s[4].isnan().any()
    assert s[65, 2].isinf() and q[65, 259].float().isnan() and (q[65, 256:259].float() == 0).all()


@pytest.mark.parametrize("M,K", [(0, 5), (5, 0), (0, 0)])
def test_empty(M, K):
    x = torch.zeros(M, K)
    for fn in (quantize_tiles_reference, quantize_blocks_reference, quantize_tiles_transposed_reference):
        q, scale = fn(x)
        assert q.dtype == E4M3 and q.numel() == 0 and scale.dtype == torch.float32
    assert quantize_tiles_reference(x)[1].shape == (M, -(-K // 128))
    assert quantize_tiles_transposed_reference(x)[0].shape == (K, M)
    assert quantize_blocks_reference(x)[1].shape == (-(-M // 128), -(-K // 128))


def test_dequantize_helpers():
    x = make_x(37, 300, seed=6)
    q, scale = quantize_tiles_reference(x)
    out = dequantize_tiles(q, scale)
    assert out.dtype == torch.float32 and out.shape == x.shape
    # one fp32 rounding of the exact product (4 x 24 significant bits need up to 28)
    torch.testing.assert_close(out.double(), q.double() * expand(scale, 1, 128, x.shape), rtol=2 ** -24, atol=0)
    qb, sb = quantize_blocks_reference(x)
    torch.testing.assert_close(dequantize_blocks(qb, sb).double(), qb.double() * expand(sb, 128, 128, x.shape),
                               rtol=2 ** -24, atol=0)
    for call in (lambda: dequantize_tiles(q, scale[:, :2]), lambda: dequantize_tiles(q.float(), scale),
                 lambda: dequantize_tiles(q, scale.double()), lambda: dequantize_tiles(q[0], scale),
                 lambda: dequantize_blocks(qb, scale), lambda: dequantize_blocks(qb, sb.t())):
        with pytest.raises(ValueError):
            call()


BAD_INPUTS = {"1d": torch.zeros(8), "3d": torch.zeros(2, 3, 4), "int": torch.zeros(4, 4, dtype=torch.int32),
              "fp64": torch.zeros(4, 4, dtype=torch.float64), "fp8": torch.zeros(4, 4).to(E4M3),
              "list": [[1.0, 2.0]]}
QUANT_FNS = [quantize_tiles_reference, quantize_tiles, quantize_tiles_transposed_reference, quantize_tiles_transposed,
             quantize_blocks_reference, quantize_blocks]
if HAS_TRITON:
    QUANT_FNS += [quantize_tiles_triton, quantize_tiles_transposed_triton, quantize_blocks_triton]


@pytest.mark.parametrize("bad", list(BAD_INPUTS))
@pytest.mark.parametrize("fn", QUANT_FNS, ids=lambda f: f.__name__)
def test_input_checks(fn, bad):
    if bad == "fp64" and not fn.__name__.endswith("_triton"):  # the references take fp64 (through fp32)
        fn(BAD_INPUTS[bad])
        return
    with pytest.raises(ValueError):
        fn(BAD_INPUTS[bad])


def test_dispatchers_on_cpu_are_reference(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("Triton called on CPU tensors")
    for name in ("quantize_tiles_triton", "quantize_tiles_transposed_triton", "quantize_blocks_triton"):
        monkeypatch.setattr(fp8_quant, name, boom)
    x = make_x(40, 300, torch.bfloat16, seed=7)
    for disp, ref in ((quantize_tiles, quantize_tiles_reference), (quantize_blocks, quantize_blocks_reference),
                      (quantize_tiles_transposed, quantize_tiles_transposed_reference)):
        (a, sa), (b, sb) = disp(x, pow2=True), ref(x, pow2=True)
        assert torch.equal(bits(a), bits(b)) and torch.equal(sa, sb)


# ---------------------------------------------------------------------------------------------------------------
# Triton under the interpreter (subprocess)
# ---------------------------------------------------------------------------------------------------------------

def _compare(out, ref) -> dict:
    """Scale error (relative) and the e4m3 values. The interpreter's fp32 -> e4m3 conversion is not faithful: it
    drops the rounding carry into the exponent (127.9 -> 64 instead of 128), rounds ties away from zero (not to
    even) and rounds subnormals differently. So a mismatch is allowed where the reference is +-2^k and Triton gave
    half of it, or within one e4m3 ulp of the reference (2^(e-3) at [2^e, 2^(e+1)), 2^-9 below 2^-6); any other
    mismatch counts as bad. The GPU tests below check exact equality."""
    (q, s), (qr, sr) = out, ref
    assert q.shape == qr.shape and s.shape == sr.shape and q.dtype == E4M3 and s.dtype == torch.float32
    a, b = q.double(), qr.double()
    ne = a != b
    mant, exp = torch.frexp(b)
    lost_carry = ne & (mant.abs() == 0.5) & (a * 2 == b)
    ulp = torch.where(b.abs() >= 2 ** -6, torch.ldexp(torch.ones_like(b), exp - 4), torch.full_like(b, 2 ** -9))
    one_ulp = ne & ~lost_carry & ((a - b).abs() <= ulp)
    return {"lost_carry": int(lost_carry.sum()), "one_ulp": int(one_ulp.sum()),
            "bad": int((ne & ~lost_carry & ~one_ulp).sum()), "nan": int(a.isnan().sum()),
            "scale_err": ((s.double() - sr.double()).abs() / sr.double()).max().item() if s.numel() else 0.0}


def _compare_nonfinite(out, ref) -> dict:
    """_compare for inputs holding NaN / inf: whether the NaN positions of q and of the scales agree (NaN bit
    patterns may differ in sign), and _compare's numbers with the union of the NaN positions zeroed in both."""
    res = {"nan_q_agree": True, "nan_s_agree": True}
    cleaned = []
    for a, b in zip(out, ref):
        fa, fb = a.float(), b.float()
        res["nan_s_agree" if a.dtype == torch.float32 else "nan_q_agree"] &= torch.equal(fa.isnan(), fb.isnan())
        nan = fa.isnan() | fb.isnan()
        cleaned.append(tuple(torch.where(nan, 0.0, f).to(a.dtype) for f in (fa, fb)))
    sub: dict = {}
    for (q, qr), (s, sr) in zip(cleaned[::2], cleaned[1::2]):
        r = _compare((q, s), (qr, sr))
        sub = {k: max(sub.get(k, 0), v) for k, v in r.items()}
        res["scales_equal"] = res.get("scales_equal", True) and torch.equal(s, sr)   # inf included
    return {**res, **sub}


def nonfinite_x(M: int, K: int) -> torch.Tensor:
    """make_x with a NaN, +inf and -inf in separate tiles / rows / columns."""
    x = make_x(M, K, seed=M + K)
    x[3, 5], x[M // 2, K - 1], x[M - 1, K // 2] = float("nan"), float("inf"), -float("inf")
    x[M - 1, 0] = float("nan")
    return x


def _interpreter_cases() -> dict:
    """Run in a TRITON_INTERPRET=1 subprocess: per case, _compare's numbers."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    from dsv3.kernels.triton_setup import patch_interpreter_for_numpy2
    patch_interpreter_for_numpy2()
    out = {}
    wide = torch.zeros(70, 300)
    wide[:, 20:220] = make_x(70, 200, seed=12)
    cases = {"tiles_37x200": (quantize_tiles_triton, quantize_tiles_reference, make_x(37, 200, seed=10)),
             "tiles_70x257_bf16": (quantize_tiles_triton, quantize_tiles_reference,
                                   make_x(70, 257, torch.bfloat16, seed=11)),
             "tiles_strided": (quantize_tiles_triton, quantize_tiles_reference, wide[:, 20:220]),
             "tiles_k37": (quantize_tiles_triton, quantize_tiles_reference, make_x(5, 37, seed=13)),
             "tr_200x130": (quantize_tiles_transposed_triton, quantize_tiles_transposed_reference,
                            make_x(200, 130, seed=14)),
             "tr_37x70_bf16": (quantize_tiles_transposed_triton, quantize_tiles_transposed_reference,
                               make_x(37, 70, torch.bfloat16, seed=15)),
             "tr_strided": (quantize_tiles_transposed_triton, quantize_tiles_transposed_reference, wide[:, 20:220].t()),
             "blocks_200x257": (quantize_blocks_triton, quantize_blocks_reference, make_x(200, 257, seed=16)),
             "blocks_37x130_bf16": (quantize_blocks_triton, quantize_blocks_reference,
                                    make_x(37, 130, torch.bfloat16, seed=17))}
    for name, (tri, ref, x) in cases.items():
        for pow2 in (False, True):
            out[f"{name}_pow2={pow2}"] = _compare(tri(x, pow2), ref(x, pow2))
    for tri, ref in ((quantize_tiles_triton, quantize_tiles_reference),
                     (quantize_tiles_transposed_triton, quantize_tiles_transposed_reference),
                     (quantize_blocks_triton, quantize_blocks_reference)):
        out[f"empty_{tri.__name__}"] = _compare(tri(torch.zeros(0, 5)), ref(torch.zeros(0, 5)))
    # the launch variants (benchmarks/fp8_quant_sweep.py)
    x = make_x(140, 150, torch.bfloat16, seed=18)
    for chunk in (128, 32):
        out[f"blocks_chunk{chunk}"] = _compare(quantize_blocks_triton(x, True, chunk=chunk),
                                               quantize_blocks_reference(x, True))
    out["tr_bk128"] = _compare(quantize_tiles_transposed_triton(x, block_k=128, num_warps=8),
                               quantize_tiles_transposed_reference(x))
    bad = nonfinite_x(40, 130)
    for tri, ref in ((quantize_tiles_triton, quantize_tiles_reference),
                     (quantize_tiles_transposed_triton, quantize_tiles_transposed_reference),
                     (quantize_blocks_triton, quantize_blocks_reference)):
        out[f"nonfinite_{tri.__name__}"] = _compare_nonfinite(tri(bad), ref(bad))
    return out


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed: the interpreter test needs it "
                                           "(requirements-ci.txt pins triton, so CI runs it)")
def test_triton_interpreter_matches_reference():
    res = interpreter_cases("test_kernels_fp8_quant")
    assert len(res) == 27, res
    for name, r in res.items():
        if name.startswith("nonfinite"):   # NaN scales where the reference has them, nothing else off (the
            # interpreter's e4m3 conversion turns a NaN into 384, so q's NaNs are checked on the GPU only)
            assert r["nan_s_agree"] and r["scales_equal"] and r["bad"] == 0, (name, r)
            continue
        assert r["scale_err"] <= 1e-6 and r["bad"] == 0 and r["nan"] == 0, (name, r)


# ---------------------------------------------------------------------------------------------------------------
# CUDA (sm_89+): bit-exact against the reference
# ---------------------------------------------------------------------------------------------------------------

needs_cuda = pytest.mark.skipif(
    not (torch.cuda.is_available() and HAS_TRITON and torch.cuda.get_device_capability() >= (8, 9)),
    reason="the Triton kernels compile only on a CUDA GPU of sm_89+ (e4m3 conversion; run through the device tool)")

GPU_SHAPES = [(1, 200), (37, 257), (257, 37), (128, 128), (4096, 7168), (7168, 2048), (576, 7168)]


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("pow2", [False, True])
@pytest.mark.parametrize("dtype", DTYPES + [torch.float16], ids=str)
@pytest.mark.parametrize("M,K", GPU_SHAPES)
def test_triton_cuda_exact(M, K, dtype, pow2):
    x = make_x(M, K, dtype, seed=M + K).cuda()
    for k, (tri, ref) in enumerate((
                     (quantize_tiles_triton, quantize_tiles_reference),
                     (quantize_tiles_transposed_triton, quantize_tiles_transposed_reference),
                     (quantize_blocks_triton, quantize_blocks_reference),
                     (lambda t, p: quantize_tiles_transposed_triton(t, p, block_k=128, num_warps=8),
                      quantize_tiles_transposed_reference),
                     (lambda t, p: quantize_blocks_triton(t, p, chunk=32), quantize_blocks_reference),
                     (lambda t, p: quantize_blocks_both(t, p), quantize_blocks_both_reference))):
        got, want = tri(x, pow2), ref(x, pow2)
        name = getattr(tri, "__name__", "?")
        for i, ((q, s), (qr, sr)) in enumerate(zip(zip(got[::2], got[1::2]), zip(want[::2], want[1::2]))):
            where = f"variant {k} ({name}), output pair {i}"
            assert torch.equal(s, sr), where
            bad = (bits(q) != bits(qr)).nonzero()
            assert not len(bad), f"{where}: {len(bad)} codes differ, first at {bad[:3].tolist()}"


@pytest.mark.gpu
@needs_cuda
def test_triton_cuda_nonfinite_as_reference():
    x = nonfinite_x(300, 520).cuda()
    for tri, ref in ((quantize_tiles_triton, quantize_tiles_reference),
                     (quantize_tiles_transposed_triton, quantize_tiles_transposed_reference),
                     (quantize_blocks_triton, quantize_blocks_reference)):
        (q, s), (qr, sr) = tri(x), ref(x)
        assert torch.equal(s.isnan(), sr.isnan()) and torch.equal(s.nan_to_num(0), sr.nan_to_num(0)), tri.__name__
        assert torch.equal(q.float().isnan(), qr.float().isnan()), tri.__name__
        assert torch.equal(q.float().nan_to_num(0), qr.float().nan_to_num(0)), tri.__name__


@pytest.mark.gpu
@needs_cuda
def test_triton_cuda_strided_and_dispatch(monkeypatch):
    base = make_x(300, 400, torch.bfloat16, seed=31).cuda()
    for x in (base[:, 50:350], base.t()):
        for tri, ref in ((quantize_tiles_triton, quantize_tiles_reference),
                         (quantize_tiles_transposed_triton, quantize_tiles_transposed_reference),
                         (quantize_blocks_triton, quantize_blocks_reference)):
            (q, s), (qr, sr) = tri(x), ref(x)
            assert torch.equal(s, sr) and torch.equal(bits(q), bits(qr)), tri.__name__
    calls = []
    real = fp8_quant.quantize_tiles_triton
    monkeypatch.setattr(fp8_quant, "quantize_tiles_triton", lambda *a: calls.append(1) or real(*a))
    quantize_tiles(base)
    assert calls == [1]
    monkeypatch.setenv("DSV3_FP8_QUANT", "reference")
    quantize_tiles(base)
    assert calls == [1]
