"""Paged MLA decode: the PyTorch reference against a dense float64 computation, the Triton kernel against the
reference under TRITON_INTERPRET=1 (fp32, tiny shapes, in a subprocess: the interpreter must be switched on before
the kernels' @triton.jit decorators run), and on CUDA in bf16 at lite shapes."""

from __future__ import annotations

import math
import os

import pytest
import torch
from conftest import interpreter_cases

from dsv3.kernels import (HAS_TRITON, mla_decode, mla_decode_bytes, mla_decode_num_splits, mla_decode_reference,
                          mla_decode_triton)



def make_case(lens, H=4, C=32, R=8, bs=16, dtype=torch.float32, seed=0, extra_blocks=3, pad=-1, device="cpu",
              q_strided=False):
    """Random queries and a paged cache; each sequence's blocks are a random (non-contiguous, shuffled) subset of
    the pool; block-table entries past a sequence's last block hold `pad` (garbage that must never be read)."""
    g = torch.Generator().manual_seed(seed)
    B = len(lens)
    need = [-(-n // bs) for n in lens]
    max_blocks = max(max(need), 1) + 1
    num_blocks = sum(need) + extra_blocks
    perm = torch.randperm(num_blocks, generator=g)
    bt = torch.full((B, max_blocks), pad, dtype=torch.int32)
    i = 0
    for b, n in enumerate(need):
        bt[b, :n] = perm[i:i + n].to(torch.int32)
        i += n
    c_kv = torch.randn(num_blocks, bs, C, generator=g)
    k_pe = torch.randn(num_blocks, bs, R, generator=g)
    if q_strided:  # q_abs / q_pe as views of one (B, H, C + R) tensor, as a caller that splits q would pass them
        q = torch.randn(B, H, C + R, generator=g)
        q_abs, q_pe = q[..., :C], q[..., C:]
    else:
        q_abs, q_pe = torch.randn(B, H, C, generator=g), torch.randn(B, H, R, generator=g)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    scale = 1.0 / math.sqrt(C + R) * 1.5
    cast = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    return (cast(q_abs), cast(q_pe), cast(c_kv), cast(k_pe), bt.to(device), seq_lens.to(device), scale)


def dense_oracle(q_abs, q_pe, c_kv, k_pe, bt, seq_lens, scale):
    """Float64, one sequence at a time, its tokens gathered contiguous; plain softmax."""
    B, H, C = q_abs.shape
    bs = c_kv.shape[1]
    out = torch.zeros(B, H, C, dtype=torch.float64)
    for b in range(B):
        n = int(seq_lens[b])
        if n == 0:
            continue
        blocks = bt[b, :-(-n // bs)].long().cpu()
        kv = c_kv.cpu()[blocks].reshape(-1, C)[:n].double()
        pe = k_pe.cpu()[blocks].reshape(-1, k_pe.shape[2])[:n].double()
        s = (q_abs[b].cpu().double() @ kv.T + q_pe[b].cpu().double() @ pe.T) * scale
        out[b] = torch.softmax(s, dim=-1) @ kv
    return out


def make_append_case(lens, bs=16, **kw):
    """make_case plus a decode step's `append`: each sequence's new latents at the slot of its last position
    (lens include the new token), a length-0 row's at the scratch block's first slot, as the engine's padding."""
    case = make_case(lens, bs=bs, extra_blocks=3, **kw)
    q_abs, q_pe, c_kv, k_pe, bt, seq_lens, scale = case
    owned = {int(bt[b, i]) for b, n in enumerate(lens) for i in range(-(-n // bs))}
    scratch = min(set(range(c_kv.shape[0])) - owned)          # a block no sequence owns (the extra ones)
    slots = [int(bt[b, (n - 1) // bs]) * bs + (n - 1) % bs if n else scratch * bs for b, n in enumerate(lens)]
    g = torch.Generator().manual_seed(99)
    new_c = torch.randn(len(lens), c_kv.shape[2], generator=g).to(c_kv)
    new_k = torch.randn(len(lens), k_pe.shape[2], generator=g).to(k_pe)
    return case, (torch.tensor(slots, device=c_kv.device), new_c, new_k)


def test_reference_append_stores_then_attends():
    """The reference's `append` is the cache write then the attention: every slot holds its new latents (the old
    values were different) and the output is the plain call's on the written cache."""
    (q_abs, q_pe, c_kv, k_pe, bt, lens, scale), (slots, new_c, new_k) = make_append_case([1, 16, 17, 0, 40], seed=5)
    before = c_kv.clone()
    out = mla_decode_reference(q_abs, q_pe, c_kv, k_pe, bt, lens, scale, append=(slots, new_c, new_k))
    flat_c, flat_k = c_kv.view(-1, c_kv.shape[2]), k_pe.view(-1, k_pe.shape[2])
    assert torch.equal(flat_c[slots], new_c) and torch.equal(flat_k[slots], new_k)
    assert not torch.equal(before.view(-1, c_kv.shape[2])[slots], new_c)
    torch.testing.assert_close(out, mla_decode_reference(q_abs, q_pe, c_kv, k_pe, bt, lens, scale))
    with pytest.raises(ValueError, match="append: latents in the cache's dtype"):
        mla_decode_reference(q_abs, q_pe, c_kv, k_pe, bt, lens, scale, append=(slots, new_c.double(), new_k))


LENS = [1, 16, 17, 48, 33, 5, 64]  # 1, exact multiples of the block size, one past, partial blocks


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("pad", [-1, 10**6])
def test_reference_matches_dense(dtype, tol, pad):
    case = make_case(LENS, dtype=dtype, pad=pad, seed=1)
    out = mla_decode_reference(*case)
    assert out.dtype == dtype and out.shape == (len(LENS), 4, 32)
    torch.testing.assert_close(out.double(), dense_oracle(*case), atol=tol, rtol=tol)


def test_reference_strided_q_and_wider_heads():
    case = make_case([3, 40, 31], H=20, C=64, R=16, bs=8, q_strided=True, seed=2)
    torch.testing.assert_close(mla_decode_reference(*case).double(), dense_oracle(*case), atol=1e-5, rtol=1e-5)


def test_reference_zero_length_rows_are_zero():
    case = make_case([0, 5, 0], seed=3)
    out = mla_decode_reference(*case)
    assert torch.isfinite(out).all()
    assert (out[0] == 0).all() and (out[2] == 0).all()
    torch.testing.assert_close(out.double(), dense_oracle(*case), atol=1e-5, rtol=1e-5)
    empty = make_case([0, 0], seed=3)
    assert (mla_decode_reference(*empty) == 0).all()


def test_reference_rejects_too_narrow_block_table():
    q_abs, q_pe, c_kv, k_pe, bt, lens, scale = make_case([20], seed=4)
    with pytest.raises(ValueError):
        mla_decode_reference(q_abs, q_pe, c_kv, k_pe, bt[:, :1], lens, scale)


def test_dispatcher_routes_cpu_tensors_to_the_reference(monkeypatch):
    """The dispatcher's job is routing (the maths is tested above): CPU tensors never reach the Triton kernel."""
    import importlib
    mod = importlib.import_module("dsv3.kernels.mla_decode")   # the package re-exports a function of that name
    calls = []
    monkeypatch.setattr(mod, "mla_decode_reference", lambda *a, **k: calls.append("reference") or "ref")
    monkeypatch.setattr(mod, "mla_decode_triton", lambda *a, **k: calls.append("triton") or "triton")
    assert mod.mla_decode(*make_case(LENS, seed=5)) == "ref" and calls == ["reference"]


def test_bytes_and_splits():
    lens = torch.tensor([1, 64, 100], dtype=torch.int32)
    assert mla_decode_bytes(lens, 512, 64, torch.bfloat16) == 165 * 576 * 2
    # small batch, long context: split to fill the SMs; large batch x heads: no split
    s, tps = mla_decode_num_splits(B=2, H=16, max_tokens=32768, block_h=16, block_n=32, sm_count=132)
    assert s > 1 and tps % 32 == 0 and s * tps >= 32768 and (s - 1) * tps < 32768
    assert mla_decode_num_splits(B=128, H=128, max_tokens=32768, block_h=16, block_n=32, sm_count=132)[0] == 1
    # short contexts are not cut below min_tokens_per_split
    assert mla_decode_num_splits(B=1, H=16, max_tokens=300, block_h=16, block_n=32, sm_count=132)[0] <= 2
    # a small grid (lite at batch <= 8) takes 64-token tiles and splits: a 192-token sequence in a graph bucket's
    # 4096-token block table is read by 3 programs, not one (the others return at once, the combine skips them)
    from dsv3.kernels.mla_decode import _default_config
    small = _default_config(16, 512, torch.bfloat16, B=1)
    assert small["block_n"] == 64 and small["min_tokens_per_split"] == 64 and small["num_warps"] == 8
    assert "min_tokens_per_split" not in _default_config(16, 512, torch.bfloat16, B=64)
    assert mla_decode_num_splits(1, 16, 4096, 16, 64, 132, small["min_tokens_per_split"]) == (64, 64)


@pytest.mark.parametrize("B,ctx,want", [(8, 4096, 8), (8, 16384, 8), (16, 8192, 4), (32, 4096, 2), (32, 16384, 2),
                                        (64, 4096, 1), (64, 16384, 1), (128, 8192, 1), (128, 16384, 1),
                                        (8, 600, 3), (1, 32768, 64)])
def test_seesaw_splits_one_wave(B, ctx, want):
    # the seesaw rule (two 64-head groups per sequence at 128 heads, 132 SMs): one program per SM, the best counts
    # of the H100 sweep (RESULTS.md); a short context is not cut below 256 tokens a split, nor past max_splits
    s, tps = mla_decode_num_splits(B, 128, ctx, 64, 64, 132, one_wave=True)
    assert s == want and tps % 64 == 0 and s * tps >= ctx and (s - 1) * tps < ctx


def test_tma_path_is_taken_only_where_its_rules_hold(monkeypatch):
    """`tma_supported` (the TMA kernel's gate; the gather kernel runs otherwise): the interpreter or sm_90+ only;
    C / 2 and R powers of two within a TMA box; tiles that never cross a page; caches whose blocks flatten to rows.
    And the default launch config asks for it at 64+ heads only (bf16)."""
    from dsv3.kernels.mla_decode import _default_config
    from dsv3.kernels.mla_decode_tma import tma_supported
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    q, _, c_kv, k_pe, *_ = make_case([5], H=4, C=64, R=16, bs=16)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not tma_supported(q, c_kv, k_pe, 16)                 # a CPU tensor outside the interpreter
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert tma_supported(q, c_kv, k_pe, 16) and tma_supported(q, c_kv, k_pe, 8)
    assert not tma_supported(q, c_kv, k_pe, 32)                 # a 32-token tile would cross a 16-token page
    q2, _, c2, k2, *_ = make_case([5], H=4, C=64, R=8, bs=16)
    assert not tma_supported(q2, c2, k2, 16)                    # R = 8: below the smallest rope tile
    q3, _, c3, k3, *_ = make_case([5], H=4, C=96, R=16, bs=16)
    assert not tma_supported(q3, c3, k3, 16)                    # C / 2 = 48: not a power of two
    q4, _, c4, k4, *_ = make_case([5], H=4, C=1024, R=16, bs=16)
    assert not tma_supported(q4, c4, k4, 16)                    # C / 2 = 512: wider than a TMA box
    pad = lambda t: torch.cat([t, torch.zeros_like(t)], 1)[:, :t.shape[1]]   # noqa: E731 - blocks with a gap after
    assert not tma_supported(q, pad(c_kv), pad(k_pe), 16)      # blocks that do not flatten to rows
    from dsv3.kernels.mla_decode_gluon import gluon_supported
    qg, _, cg, kg, *_ = make_case([5], H=64, C=512, R=64, bs=64, dtype=torch.bfloat16)
    assert not gluon_supported(qg, cg, kg, 64, 64)              # the Gluon body: CUDA sm_90 only, never the CPU
    cfg = _default_config(128, 512, torch.bfloat16)   # sm_90 default: seesaw, then Gluon, then TMA where they cannot
    assert cfg.get("seesaw") is True and cfg.get("gluon") is True and cfg.get("tma") is True
    assert not _default_config(16, 512, torch.bfloat16).get("tma")
    assert not _default_config(128, 512, torch.float32).get("tma")


# ---------------------------------------------------------------------------------------------------------------
# Triton under the interpreter (subprocess)
# ---------------------------------------------------------------------------------------------------------------

def _patch_interpreter_for_numpy2():
    from dsv3.kernels.triton_setup import patch_interpreter_for_numpy2
    patch_interpreter_for_numpy2()


def _interpreter_cases() -> dict:
    """Run in a TRITON_INTERPRET=1 subprocess: max |triton - reference| per case (fp32 inputs: the interpreter's
    bf16 tl.dot is not faithful)."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    _patch_interpreter_for_numpy2()
    errs = {}
    base = make_case([1, 16, 40, 0, 23], seed=11)
    ref = mla_decode_reference(*base)
    for name, kw in {"default": {}, "splits4": dict(num_splits=4), "splits2_bn32": dict(num_splits=2, block_n=32)
                     }.items():
        errs[name] = (mla_decode_triton(*base, **kw) - ref).abs().max().item()
    # two head groups with a masked tail, tiles spanning two pages, q as strided views, block_size 8
    wide = make_case([9, 30, 1], H=20, C=32, R=8, bs=8, q_strided=True, pad=10**6, seed=12)
    errs["h20_cross_page"] = (mla_decode_triton(*wide, num_splits=2, block_n=16)
                              - mla_decode_reference(*wide)).abs().max().item()
    zero = make_case([0, 0], seed=13)
    errs["all_empty"] = mla_decode_triton(*zero, num_splits=2).abs().max().item()
    # many splits over a wide table (a graph bucket's): short sequences reach a few; the combine reads only those
    wide_table = list(make_case([3, 17, 0, 9], bs=8, pad=12, seed=14))
    bt = wide_table[4]
    wide_table[4] = torch.cat([bt, torch.full((bt.shape[0], 12), 12, dtype=bt.dtype)], 1)   # 16 blocks: 8 splits
    errs["live_splits"] = (mla_decode_triton(*wide_table, num_splits=12, block_n=8)
                           - mla_decode_reference(*wide_table)).abs().max().item()
    # the step's latents stored and attended in the kernel's launch, against the reference's store then attention:
    # outputs and both caches, over several splits and head groups, a padding row (length 0) at a scratch slot
    for name, kw in {"append": dict(num_splits=3, block_n=8), "append_one_split": {}}.items():
        case = make_append_case([9, 30, 0, 17], H=20, bs=8, seed=15)
        (q_abs, q_pe, c_kv, k_pe, bt, lens, scale), append = case
        want = mla_decode_reference(q_abs, q_pe, c_kv.clone(), k_pe.clone(), bt, lens, scale, append=append)
        c_ref, k_ref = c_kv.clone(), k_pe.clone()
        mla_decode_reference(q_abs, q_pe, c_ref, k_ref, bt, lens, scale, append=append)
        got = mla_decode_triton(q_abs, q_pe, c_kv, k_pe, bt, lens, scale, append=append, **kw)
        errs[name] = max((got - want).abs().max().item(), (c_kv - c_ref).abs().max().item(),
                         (k_pe - k_ref).abs().max().item())
    errs.update(_tma_cases())
    return errs


def _tma_cases() -> dict:
    """The TMA kernel (`tma=True`) under the interpreter: C / 2 and R powers of two, tiles within a page. The gather
    kernel is replaced by None first, so a silent fall-back would fail instead of passing for the TMA path."""
    import importlib
    mod = importlib.import_module("dsv3.kernels.mla_decode")   # the package's `mla_decode` is the function
    gather, mod._mla_decode_split_kernel = mod._mla_decode_split_kernel, None
    errs = {}
    try:
        base = make_case([1, 16, 40, 0, 23], H=20, C=64, R=16, bs=16, seed=11, pad=-3)
        ref = mla_decode_reference(*base)
        for name, kw in {"tma": dict(block_h=16, block_n=16), "tma_splits4_bn8": dict(num_splits=4, block_h=16,
                         block_n=8), "tma_bh32": dict(num_splits=2, block_h=32, block_n=16)}.items():
            errs[name] = (mla_decode_triton(*base, tma=True, **kw) - ref).abs().max().item()
        (q_abs, q_pe, c_kv, k_pe, bt, lens, scale), append = make_append_case([9, 30, 0, 17], H=20, C=64, R=16,
                                                                              bs=8, seed=15)
        c_ref, k_ref = c_kv.clone(), k_pe.clone()
        want = mla_decode_reference(q_abs, q_pe, c_ref, k_ref, bt, lens, scale, append=append)
        got = mla_decode_triton(q_abs, q_pe, c_kv, k_pe, bt, lens, scale, append=append, tma=True, num_splits=3,
                                block_h=16, block_n=8)
        errs["tma_append"] = max((got - want).abs().max().item(), (c_kv - c_ref).abs().max().item(),
                                 (k_pe - k_ref).abs().max().item())
        # NaN past each sequence's end inside its last page (a reused block's stale rows) never counts
        q_abs, q_pe, c_kv, k_pe, bt, lens, scale = make_case([5, 13], H=16, C=64, R=16, bs=8, seed=3)
        ref = mla_decode_reference(q_abs, q_pe, c_kv, k_pe, bt, lens, scale)
        for b, n in enumerate([5, 13]):
            blk = int(bt[b, (n - 1) // 8])
            c_kv[blk, n % 8:], k_pe[blk, n % 8:] = float("nan"), float("nan")
        errs["tma_stale_nan"] = (mla_decode_triton(q_abs, q_pe, c_kv, k_pe, bt, lens, scale, tma=True, block_h=16,
                                                   block_n=8) - ref).abs().max().item()
    finally:
        mod._mla_decode_split_kernel = gather
    return errs


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed: the interpreter test needs it "
                                           "(requirements-ci.txt pins triton, so CI runs it)")
def test_triton_interpreter_matches_reference():
    errs = interpreter_cases("test_kernels_mla_decode")
    assert set(errs) == {"default", "splits4", "splits2_bn32", "h20_cross_page", "all_empty", "live_splits",
                         "append", "append_one_split", "tma", "tma_splits4_bn8", "tma_bh32", "tma_append",
                         "tma_stale_nan"}
    for name, err in errs.items():
        assert err < 1e-5, (name, errs)


# ---------------------------------------------------------------------------------------------------------------
# CUDA
# ---------------------------------------------------------------------------------------------------------------

needs_cuda = pytest.mark.skipif(not (torch.cuda.is_available() and HAS_TRITON),
                                reason="the Triton kernel compiles only on a CUDA GPU (run through the device tool)")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("H", [16, 32, 128])
@pytest.mark.parametrize("num_splits", [None, 1, 7])
def test_triton_cuda_bf16_lite_shapes(H, num_splits):
    lens = [1, 64, 65, 1000, 2048, 3001, 0, 127]
    case = make_case(lens, H=H, C=512, R=64, bs=64, dtype=torch.bfloat16, seed=21, pad=-7, device="cuda")
    out = mla_decode_triton(*case, num_splits=num_splits)
    ref = mla_decode_reference(*case)
    assert out.dtype == torch.bfloat16 and out.shape == ref.shape
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(mla_decode(*case).float(), ref.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("num_splits", [None, 1, 5])
def test_triton_cuda_append_equals_store_then_attend(num_splits):
    (q_abs, q_pe, c_kv, k_pe, bt, lens, scale), append = make_append_case(
        [1, 64, 65, 1000, 0, 129], H=16, C=512, R=64, bs=64, dtype=torch.bfloat16, seed=24, device="cuda")
    c_ref, k_ref = c_kv.clone(), k_pe.clone()
    want = mla_decode_reference(q_abs, q_pe, c_ref, k_ref, bt, lens, scale, append=append)
    got = mla_decode_triton(q_abs, q_pe, c_kv, k_pe, bt, lens, scale, append=append, num_splits=num_splits)
    assert torch.equal(c_kv, c_ref) and torch.equal(k_pe, k_ref)
    torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("body", [dict(tma=True, gluon=False, seesaw=False), dict(gluon=True, seesaw=False),
                                  dict(gluon=True, seesaw=False, block_n=32, num_stages=4), dict(seesaw=True)],
                         ids=["tma", "gluon", "gluon-bn32", "seesaw"])
@pytest.mark.parametrize("H", [64, 128])
@pytest.mark.parametrize("num_splits", [None, 1, 7])
def test_triton_cuda_many_heads_bodies(H, num_splits, body):
    """The many-head bodies (TMA, Gluon) at V3's head counts, bf16, against the reference; their append form against
    store-then-attend; stale NaN past the ends inside the last pages never counts. The Gluon body must be the one
    that runs (its gate holds on sm_90), not a fall-back."""
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("TMA needs sm_90+")
    body = dict(dict(block_h=64, block_n=64, num_warps=8, num_stages=2), **body)
    if body.get("gluon") or body.get("seesaw"):
        from dsv3.kernels.mla_decode_gluon import HAS_GLUON, gluon_supported
        if not HAS_GLUON or torch.cuda.get_device_capability() != (9, 0):
            pytest.skip("the Gluon body is written for sm_90 (wgmma)")
        probe = torch.zeros(2, 64, 512, device="cuda", dtype=torch.bfloat16)
        assert gluon_supported(probe, probe, probe[..., :64].contiguous(), 64, body["block_n"])
        if body.get("seesaw"):   # both forms are its own: with append, the latents are stored before its launch
            from dsv3.kernels.mla_decode_seesaw import seesaw_supported
            assert seesaw_supported(probe, probe, probe[..., :64].contiguous(), 64, body["block_n"])
    lens = [1, 64, 65, 1000, 2048, 3001, 0, 127]
    q_abs, q_pe, c_kv, k_pe, bt, seq_lens, scale = make_case(lens, H=H, C=512, R=64, bs=64, dtype=torch.bfloat16,
                                                             seed=25, pad=-7, device="cuda")
    ref = mla_decode_reference(q_abs, q_pe, c_kv, k_pe, bt, seq_lens, scale)
    for b, n in enumerate(lens):
        if n % 64:
            c_kv[int(bt[b, (n - 1) // 64]), n % 64:] = float("nan")
    out = mla_decode_triton(q_abs, q_pe, c_kv, k_pe, bt, seq_lens, scale, num_splits=num_splits, **body)
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)
    (q_abs, q_pe, c_kv, k_pe, bt, seq_lens, scale), append = make_append_case(
        [1, 64, 65, 1000, 0, 129], H=H, C=512, R=64, bs=64, dtype=torch.bfloat16, seed=26, device="cuda")
    c_ref, k_ref = c_kv.clone(), k_pe.clone()
    want = mla_decode_reference(q_abs, q_pe, c_ref, k_ref, bt, seq_lens, scale, append=append)
    got = mla_decode_triton(q_abs, q_pe, c_kv, k_pe, bt, seq_lens, scale, append=append, num_splits=num_splits,
                            **body)
    assert torch.equal(c_kv, c_ref) and torch.equal(k_pe, k_ref)
    torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
@needs_cuda
def test_triton_cuda_fp32_and_strided_q():
    case = make_case([1, 64, 700, 129], H=16, C=512, R=64, bs=64, dtype=torch.float32, seed=22, device="cuda",
                     q_strided=True)
    torch.testing.assert_close(mla_decode_triton(*case), mla_decode_reference(*case), atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@needs_cuda
def test_triton_cuda_graph_capture():
    """Split choice depends on shapes only: the call captures in a CUDA graph and replays with new lengths."""
    q_abs, q_pe, c_kv, k_pe, bt, lens, scale = make_case([5, 300, 64], H=16, C=512, R=64, bs=64,
                                                          dtype=torch.bfloat16, seed=23, device="cuda")
    mla_decode_triton(q_abs, q_pe, c_kv, k_pe, bt, lens, scale)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = mla_decode_triton(q_abs, q_pe, c_kv, k_pe, bt, lens, scale)
    lens.copy_(torch.tensor([6, 250, 1], dtype=torch.int32))
    graph.replay()
    torch.cuda.synchronize()
    ref = mla_decode_reference(q_abs, q_pe, c_kv, k_pe, bt, lens, scale)
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)
