"""The one-pass sum of squares behind the global gradient norm (dsv3.kernels.grad_norm): the reference and the
Triton kernel (under TRITON_INTERPRET=1 in a subprocess, and on CUDA) against a float64 sum, for fp32 / bf16 / fp16
tensors, many tensors of odd sizes (partial tiles, several chunks per tensor, one-element tensors), mixed dtypes;
and the trainer's norm (dsv3.parallel.grads.grad_norm) through it."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import interpreter_cases

from dsv3.kernels.grad_norm import HAS_TRITON, sum_of_squares, sum_of_squares_reference, sum_of_squares_triton

# sizes around the tile (BLOCK 256 in the interpreter cases) and chunk (1024) edges, and a few larger ones
SIZES = [1, 3, 255, 256, 257, 1023, 1024, 1025, 3000, 4097, 7, 511, 2049, 10_000]


def _tensors(dtypes: tuple[torch.dtype, ...], seed: int, device: str = "cpu", n: int = 40) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        size = SIZES[i % len(SIZES)] + 13 * (i // len(SIZES))
        scale = 10.0 ** ((i % 7) - 3)          # magnitudes from 1e-3 to 1e3, as gradients of different layers
        shape = (size,) if i % 3 else (1, size)
        out.append((torch.randn(shape, generator=g) * scale).to(dtypes[i % len(dtypes)]).to(device))
    return out


def _exact(tensors: list[torch.Tensor]) -> float:
    return sum(t.double().square().sum().item() for t in tensors)


CASES = {"fp32": (torch.float32,), "bf16": (torch.bfloat16,), "fp16": (torch.float16,),
         "mixed": (torch.float32, torch.bfloat16)}


def _run_cases(device: str, **launch) -> dict:
    """Relative error against the float64 sum, per case."""
    res = {}
    for name, dtypes in CASES.items():
        ts = _tensors(dtypes, seed=len(res), device=device)
        got = sum_of_squares_triton(ts, **launch)
        assert got.dtype == torch.float64 and got.shape == ()
        res[name] = abs(got.item() - _exact(ts)) / _exact(ts)
    one = [torch.full((5,), 2.0, device=device)]
    res["exact small"] = abs(sum_of_squares_triton(one, **launch).item() - 20.0)
    res["empty list"] = sum_of_squares_triton([], **launch).item()
    res["empty tensors"] = abs(sum_of_squares_triton([torch.zeros(0, device=device)] + one, **launch).item() - 20.0)
    # a view one element into its buffer (2 bytes: not 16-byte aligned) beside aligned tensors: the launch must
    # not promise aligned addresses (on the GPU a 16-byte vector load there would fault)
    base = torch.randn(3001, generator=torch.Generator().manual_seed(9)).to(device, torch.bfloat16)
    views = [base[1:], _tensors((torch.bfloat16,), seed=9, device=device)[5]]
    assert views[0].data_ptr() % 16
    res["misaligned view"] = abs(sum_of_squares_triton(views, **launch).item() - _exact(views)) / _exact(views)
    return res


def _interpreter_cases() -> dict:
    import os
    assert os.environ.get("TRITON_INTERPRET") == "1"
    from dsv3.kernels.triton_setup import patch_interpreter_for_numpy2
    patch_interpreter_for_numpy2()
    return _run_cases("cpu", block=256, chunk=1024)


def _assert_close(res: dict) -> None:
    for case, err in res.items():
        # FP32 accumulation within a chunk, FP64 across: ~1e-7; the inputs are exact in every dtype
        assert err < 1e-6, (case, err)


@pytest.mark.parametrize("name", list(CASES))
def test_reference_equals_float64_sum(name):
    ts = _tensors(CASES[name], seed=1)
    got = sum_of_squares_reference(ts)
    assert got.dtype == torch.float64
    assert abs(got.item() - _exact(ts)) / _exact(ts) < 1e-12
    assert sum_of_squares(ts).item() == got.item()     # the CPU dispatch is the reference


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (requirements-ci.txt pins it, so CI runs this)")
def test_triton_interpreter_matches_float64():
    res = interpreter_cases("test_kernels_grad_norm")
    assert len(res) == len(CASES) + 4
    _assert_close(res)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (requirements-ci.txt pins it, so CI runs this)")
def test_chunk_must_be_a_multiple_of_block():
    with pytest.raises(ValueError, match="multiple of block"):
        sum_of_squares_triton([torch.ones(3)], block=256, chunk=1000)


def test_trainer_norm_goes_through_it():
    """dsv3.parallel.grads.grad_norm (what clipping uses) equals the float64 norm of the model's gradients."""
    from conftest import build, tiny_config
    from dsv3.parallel.grads import grad_norm
    torch.manual_seed(0)
    model = build(tiny_config(num_hidden_layers=2))
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    model(ids).float().square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert len(grads) > 20
    assert math.isclose(grad_norm(model, None).item(), math.sqrt(_exact(grads)), rel_tol=1e-12)


@pytest.mark.skipif(not (HAS_TRITON and torch.cuda.is_available()), reason="needs CUDA and triton")
def test_triton_matches_float64_on_cuda():
    _assert_close(_run_cases("cuda"))
    _assert_close(_run_cases("cuda", block=256, chunk=1024))
    ts = _tensors((torch.bfloat16,), seed=5, device="cuda", n=220)       # lite-8L's count of gradient tensors
    assert abs(sum_of_squares(ts).item() - _exact(ts)) / _exact(ts) < 1e-6
    # a non-contiguous tensor and an fp64 one go through the reference beside the kernel's pass
    ts += [torch.randn(64, 48, device="cuda").t(), torch.randn(100, device="cuda", dtype=torch.float64)]
    got = sum_of_squares(ts)
    assert got.device.type == "cuda" and abs(got.item() - _exact(ts)) / _exact(ts) < 1e-6
