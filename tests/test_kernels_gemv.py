"""The weight-streaming GEMV (dsv3.kernels.gemv) against a float64 matmul under TRITON_INTERPRET=1 (one row, ragged
N / K, K past one wide load), its refusal of two rows, its dispatcher and custom op on CPU, and the engine with it
switched on and off."""

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
    return out


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed: the interpreter test needs it "
                                           "(requirements-ci.txt pins triton, so CI runs it)")
def test_triton_interpreter_matches_float64():
    res = interpreter_cases("test_kernels_gemv")
    assert "M<=1" in res.pop("two_rows_refused") and len(res) == 4
    for name, (shape, same_dtype, err) in res.items():
        m, n = int(name.split("_")[0][1:]), int(name.split("_")[1][1:])
        assert shape == [m, n] and same_dtype and err < 1e-6, (name, res)


def test_dispatcher_and_op_on_cpu():
    from dsv3.kernels.decode_ops import gemv as op
    x, w = torch.randn(2, 3, 64), torch.randn(24, 64)
    assert torch.equal(gemv(x, w), gemv_reference(x, w))
    assert torch.equal(op(x[0], w), gemv_reference(x[0], w))
    # more than GEMV_MAX_M rows (cuBLAS was faster there): the dispatcher's reference on any device
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


def test_engine_with_dense_gemv_same_tokens():
    from dsv3.infer import Engine, EngineConfig, SamplingParams
    model = build(tiny_config(vocab_size=96), seed=3)
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    outs = []
    assert EngineConfig().dense_gemv          # the default since measured (RESULTS.md eighteenth session)
    for gemv_on in (False, True):
        engine = Engine(model, config=EngineConfig(block_size=8, num_blocks=32, dense_gemv=gemv_on))
        assert model.layers[0].self_attn.use_gemv == gemv_on
        assert (type(model.lm_head).__name__ == "GemvLinear") == gemv_on
        outs.append([o.token_ids for o in engine.generate([[5, 6, 7], [9]], params)])
    assert outs[0] == outs[1]
