"""The weight-streaming GEMV (dsv3.kernels.gemv) against a float64 matmul under TRITON_INTERPRET=1 (one row, ragged
N / K, K past one wide load), its refusal of two rows, its dispatcher and custom op on CPU, and the engine with it
switched on and off; likewise the tiled kernel for 2..64 rows (`skinny_gemm`: dense_linear_triton, split-K)."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import build, interpreter_cases, tiny_config

from dsv3.kernels.gemv import GEMV_MAX_M, gemv, gemv_reference
from dsv3.kernels.triton_setup import HAS_TRITON


def _interpreter_cases() -> dict:
    assert os.environ.get("TRITON_INTERPRET") == "1"
    from dsv3.kernels.gemv import gemv_triton
    from dsv3.kernels.triton_setup import patch_interpreter_for_numpy2
    patch_interpreter_for_numpy2()
    g = torch.Generator().manual_seed(0)
    out = {}
    for M, N, K in [(1, 40, 300), (1, 24, 2048), (1, 17, 1100), (1, 64, 128)]:
        x, w = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g)
        want = x.double() @ w.double().T
        y = gemv_triton(x, w)
        out[f"m{M}_n{N}_k{K}"] = [list(y.shape), y.dtype == x.dtype,
                                  float((y.double() - want).abs().max() / want.abs().max())]
    try:
        gemv_triton(torch.randn(2, 64), torch.randn(8, 64))
    except ValueError as e:
        out["two_rows_refused"] = str(e)
    from dsv3.kernels.fp8_weight_gemm import dense_linear_triton
    # rows across the tile heights (16 / 32 / 64), ragged N and K, forced K slices (uneven last slice) and by shape
    for M, N, K, split in [(2, 40, 300, None), (17, 24, 1100, 3), (33, 70, 256, 2), (64, 16, 130, 1)]:
        x, w = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g)
        want = x.double() @ w.double().T
        y = dense_linear_triton(x, w, split_k=split)
        out[f"skinny_m{M}_n{N}_k{K}"] = [list(y.shape), y.dtype == x.dtype,
                                         float((y.double() - want).abs().max() / want.abs().max())]
    try:
        dense_linear_triton(torch.randn(2, 64), torch.randn(8, 64, dtype=torch.float64))
    except ValueError as e:
        out["mixed_dtypes_refused"] = str(e)
    # the router's logits: bf16 x and weight read as they are, fp32 out (kernels.gemv.gate_logits' Triton path)
    from dsv3.kernels.fp8_gemv import fp8_gemv
    for K, xdt, wdt in [(300, torch.bfloat16, torch.bfloat16), (2048, torch.bfloat16, torch.float32)]:
        x, w = torch.randn(1, K, generator=g).to(xdt), torch.randn(64, K, generator=g).to(wdt)
        want = x.double() @ w.double().T
        y = fp8_gemv(x, w, None, out_dtype=torch.float32)
        out[f"gate_{K}_{str(wdt)[6:]}"] = [list(y.shape), str(y.dtype), float((y.double() - want).abs().max() /
                                                                              want.abs().max())]
    return out


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed: the interpreter test needs it "
                                           "(requirements-ci.txt pins triton, so CI runs it)")
def test_triton_interpreter_matches_float64():
    res = interpreter_cases("test_kernels_gemv")
    assert "M<=1" in res.pop("two_rows_refused") and "one dtype" in res.pop("mixed_dtypes_refused")
    gate = {k: res.pop(k) for k in [k for k in res if k.startswith("gate_")]}
    assert len(res) == 8 and len(gate) == 2, (res, gate)
    for name, (shape, dtype, err) in gate.items():    # fp32 sums of exact products: fp32 rounding only
        assert shape == [1, 64] and dtype == "torch.float32" and err < 1e-6, (name, gate)
    for name, (shape, same_dtype, err) in res.items():
        m, n = int(name.removeprefix("skinny_").split("_")[0][1:]), int(name.removeprefix("skinny_").split("_")[1][1:])
        assert shape == [m, n] and same_dtype and err < 1e-6, (name, res)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_gate_logits_are_the_gates_on_cpu(dtype):
    """The engine's router logits (decode_ops.gate_logits: the reference off CUDA) are Gate.logits' bit for bit."""
    from dsv3.kernels.decode_ops import gate_logits
    from dsv3.model.moe import Gate
    gate = Gate(tiny_config()).to(dtype)
    torch.nn.init.normal_(gate.weight)
    x = torch.randn(3, gate.weight.shape[1], dtype=dtype)
    want = gate.logits(x)
    got = gate_logits(x, gate.weight)
    assert got.dtype == want.dtype == torch.promote_types(dtype, torch.float32) and torch.equal(got, want)


def test_dispatcher_and_op_on_cpu():
    from dsv3.kernels.decode_ops import gemv as op
    x, w = torch.randn(2, 3, 64), torch.randn(24, 64)
    assert torch.equal(gemv(x, w), gemv_reference(x, w))
    assert torch.equal(op(x[0], w), gemv_reference(x[0], w))
    # more than GEMV_MAX_M rows on the CPU: the reference (on CUDA the tiled kernel, which the caller asks for)
    x = torch.randn(GEMV_MAX_M + 1, 64)
    assert torch.equal(gemv(x, w), gemv_reference(x, w))


@pytest.mark.gpu
@pytest.mark.skipif(not (HAS_TRITON and torch.cuda.is_available()),
                    reason="GPU-only: needs a CUDA GPU with triton (benchmarks/gpu_suite.sh gpu on the device)")
def test_cuda_matches_float64_and_captures():
    from dsv3.kernels.gemv import gemv_triton
    for M, N, K in [(1, 3648, 2048), (1, 2048, 2816), (1, 5632, 2048), (1, 21888, 2048)]:
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02
        want = x.double() @ w.double().T
        y = gemv_triton(x, w)
        assert float((y.double() - want).abs().max() / want.abs().max()) < 1e-2
    graph = torch.cuda.CUDAGraph()
    gemv_triton(x, w)
    with torch.cuda.graph(graph):
        out = gemv_triton(x, w)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.testing.assert_close(out, gemv_reference(x, w), atol=5e-2, rtol=2e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not (HAS_TRITON and torch.cuda.is_available()),
                    reason="GPU-only: needs a CUDA GPU with triton (benchmarks/gpu_suite.sh gpu on the device)")
def test_cuda_gate_logits_match_float64():
    from dsv3.kernels.gemv import gate_logits
    for wdt in (torch.bfloat16, torch.float32):
        x = torch.randn(1, 2048, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(64, 2048, device="cuda").to(wdt)
        want = x.double() @ w.double().T
        y = gate_logits(x, w)
        assert y.dtype == torch.float32 and (y.double() - want).abs().max() <= 1e-6 * want.abs().max(), wdt


@pytest.mark.gpu
@pytest.mark.skipif(not (HAS_TRITON and torch.cuda.is_available()),
                    reason="GPU-only: needs a CUDA GPU with triton (benchmarks/gpu_suite.sh gpu on the device)")
def test_cuda_skinny_matches_float64_and_captures():
    from dsv3.kernels.fp8_weight_gemm import dense_linear_triton
    for M, N, K in [(2, 3648, 2048), (16, 2048, 2048), (32, 3648, 2048), (33, 2048, 10944), (64, 102400, 2048)]:
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02
        want = x.double() @ w.double().T
        y = dense_linear_triton(x, w)
        # bf16 output of an fp32 sum: its rounding, 2^-8 of the largest value, with margin
        assert y.dtype == torch.bfloat16 and (y.double() - want).abs().max() <= 8e-3 * want.abs().max(), (M, N, K)
    x = torch.randn(32, 2048, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(3648, 2048, device="cuda", dtype=torch.bfloat16)
    dense_linear_triton(x, w)                          # compiled before the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = dense_linear_triton(x, w)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.testing.assert_close(out, gemv_reference(x, w), atol=5e-1, rtol=2e-2)


_CUDA = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not (HAS_TRITON and torch.cuda.is_available()),
    reason="needs a CUDA GPU with triton (run through the device tool)")])


@pytest.mark.parametrize("device", ["cpu", _CUDA])
def test_engine_with_skinny_gemm_same_tokens(device):
    """skinny_gemm: the modules take 2..64-row calls (1-row ones stay with dense_gemv); batches of 1-5 rows give the
    greedy tokens of the engine without it (on the CPU the dispatcher's reference: the plumbing; on CUDA the kernel,
    bf16)."""
    from dsv3.infer import Engine, EngineConfig, SamplingParams
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = build(tiny_config(vocab_size=96), seed=3, dtype=dtype).to(device)
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    prompts = [[5, 6, 7], [9], [11, 12], [3, 4, 5, 6], [8]]
    assert not EngineConfig().skinny_gemm      # off until measured faster than cuBLAS
    outs = []
    for skinny, gemv_on, rows in ((False, True, (1, 1)), (True, True, (1, 64)), (True, False, (2, 64))):
        engine = Engine(model, config=EngineConfig(block_size=8, num_blocks=32, dense_gemv=gemv_on,
                                                   skinny_gemm=skinny, cuda_graphs=False))
        assert model.layers[0].self_attn.gemv_rows == rows and model.lm_head.gemv_rows == rows
        outs.append([o.token_ids for o in engine.generate(prompts, params)])
    assert outs[0] == outs[1] == outs[2]
    Engine(model, config=EngineConfig(block_size=8, num_blocks=32, dense_gemv=False))
    assert type(model.lm_head).__name__ == "Linear" and "gemv_rows" not in model.lm_head.__dict__


def test_engine_with_dense_gemv_same_tokens():
    from dsv3.infer import Engine, EngineConfig, SamplingParams
    model = build(tiny_config(vocab_size=96), seed=3)
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    outs = []
    assert EngineConfig().dense_gemv          # the default since measured (RESULTS.md eighteenth session)
    for gemv_on in (False, True):
        engine = Engine(model, config=EngineConfig(block_size=8, num_blocks=32, dense_gemv=gemv_on))
        assert model.layers[0].self_attn.gemv_rows == ((1, 1) if gemv_on else (2, 0))
        assert (type(model.lm_head).__name__ == "GemvLinear") == gemv_on
        outs.append([o.token_ids for o in engine.generate([[5, 6, 7], [9]], params)])
    assert outs[0] == outs[1]
