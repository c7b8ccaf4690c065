"""FP8 weights quantised once per optimizer step (dsv3.fp8.weight_cache, issue 15): the autograd functions give
exactly the composition of the reference quantisers and GEMMs with and without the cache, the cache lives only
inside its scope (a step invalidates it, even when the update does not move the weight's version), and the trainer
opens it for steps of several micro-batches with the same losses as without it."""

from __future__ import annotations

import pytest
import torch

from dsv3.fp8 import weight_cache as wc
from dsv3.fp8.training import FP8GroupedFunction, FP8LinearFunction, FP8RowwiseGroupedFunction
from dsv3.fp8.weight_cache import cached_count, weight_cache
from dsv3.kernels.fp8_gemm import fp8_gemm_reference, fp8_grouped_gemm_reference
from dsv3.kernels.fp8_quant import (quantize_blocks_reference, quantize_tiles_reference,
                                    quantize_tiles_transposed_reference)
from dsv3.kernels.fp8_rowwise import fp8_grouped_gemm_rowwise_reference, quantize_rows_reference


def _case(seed: int = 0, grouped: bool = False):
    g = torch.Generator().manual_seed(seed)
    if grouped:
        counts = torch.tensor([5, 0, 140, 19])
        x = torch.randn(int(counts.sum()), 256, generator=g)
        return x, torch.randn(4, 192, 256, generator=g) * 0.05, torch.randn(x.shape[0], 192, generator=g), \
            counts.cumsum(0).to(torch.int32)
    return torch.randn(37, 300, generator=g), torch.randn(200, 300, generator=g) * 0.05, \
        torch.randn(37, 200, generator=g), None


def _run(fn, x, w, dy, offs):
    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = fn.apply(xg, wg) if offs is None else fn.apply(xg, wg, offs)
    y.backward(dy)
    return y.detach(), xg.grad, wg.grad


def _linear_reference(x, w, dy):
    """y, dx, dw of FP8LinearFunction written with the reference kernels (TR 3.3 / module docstring)."""
    f32 = torch.float32
    y = fp8_gemm_reference(*quantize_tiles_reference(x), *quantize_blocks_reference(w), f32)
    dx = fp8_gemm_reference(*quantize_tiles_reference(dy), *quantize_blocks_reference(w.t()), f32)
    dw = fp8_gemm_reference(*quantize_tiles_transposed_reference(dy), *quantize_tiles_transposed_reference(x), f32)
    return y, dx, dw


def _rowwise_reference(x, w, dy, offs):
    f32 = torch.float32
    y = fp8_grouped_gemm_rowwise_reference(*quantize_rows_reference(x), *quantize_rows_reference(w), offs, f32)
    dx = fp8_grouped_gemm_rowwise_reference(*quantize_rows_reference(dy), *quantize_rows_reference(w.transpose(1, 2)),
                                            offs, f32)
    return y, dx


@pytest.mark.parametrize("scope", [False, True])
def test_functions_equal_the_reference_composition_with_and_without_the_cache(scope):
    x, w, dy, _ = _case(1)
    xg, wg, dyg, offs = _case(2, grouped=True)
    with weight_cache(enabled=scope):
        for _ in range(2):                       # two micro-batches: the second reads the cache when it is open
            got = _run(FP8LinearFunction, x, w, dy, None)
            for a, b in zip(got, _linear_reference(x, w, dy)):
                assert torch.equal(a, b)
            y, dx, _ = _run(FP8RowwiseGroupedFunction, xg, wg, dyg, offs)
            want_y, want_dx = _rowwise_reference(xg, wg, dyg, offs)
            assert torch.equal(y, want_y) and torch.equal(dx, want_dx)
            y, dx, _ = _run(FP8GroupedFunction, xg, wg, dyg, offs)
            blocks = [quantize_blocks_reference(we) for we in wg]
            q, s = torch.stack([b[0] for b in blocks]), torch.stack([b[1] for b in blocks])
            assert torch.equal(y, fp8_grouped_gemm_reference(*quantize_tiles_reference(xg), q, s, offs, torch.float32))
            q_t = torch.stack([quantize_blocks_reference(we.t())[0] for we in wg])
            s_t = torch.stack([quantize_blocks_reference(we.t())[1] for we in wg])
            assert torch.equal(dx, fp8_grouped_gemm_reference(*quantize_tiles_reference(dyg), q_t, s_t, offs,
                                                             torch.float32))
        # the linear's, the row-wise experts' and the block experts' weights (the parameter clones of each call are
        # new tensors, so each micro-batch adds its own entries; a module's parameter is one tensor, see below)
        assert (cached_count() > 0) == scope
    assert cached_count() == 0 and not wc.scope_open()


def test_one_quantisation_per_weight_per_scope_and_a_step_invalidates():
    """Inside a scope the same parameter is quantised once however many micro-batches use it; an update that does
    not move `_version` (a Triton kernel, `p.data`) between two scopes is seen, because the cache does not outlive
    its scope; an in-place update inside a scope (which moves `_version`) is seen too."""
    x, w, dy, _ = _case(3)
    lin = torch.nn.Linear(300, 200, bias=False)
    with torch.no_grad():
        lin.weight.copy_(w)
    calls = []
    real = wc.cached

    def spy(kind, t, make):
        return real(kind, t, lambda u: calls.append(kind) or make(u))

    def step_outputs():
        out = FP8LinearFunction.apply(x, lin.weight)
        out.backward(dy)
        return out.detach()

    mp = pytest.MonkeyPatch()
    mp.setattr("dsv3.fp8.ops.cached", spy)
    try:
        with weight_cache():
            first = [step_outputs() for _ in range(3)]
            assert calls == ["blocks"] and cached_count() == 1      # 3 forwards + 3 backwards, one quantisation
        assert all(torch.equal(first[0], y) for y in first)
        version = lin.weight._version
        lin.weight.data.add_(0.01)                                    # an update invisible to _version
        assert lin.weight._version == version
        with weight_cache():
            after = step_outputs()
        want = _linear_reference(x, lin.weight.detach(), dy)[0]
        assert torch.equal(after, want) and not torch.equal(after, first[0])
        with weight_cache():
            step_outputs()
            with torch.no_grad():
                lin.weight.add_(0.01)                                 # in place inside the scope: _version moves
            assert torch.equal(step_outputs(), _linear_reference(x, lin.weight.detach(), dy)[0])
    finally:
        mp.undo()


def test_no_scope_caches_nothing():
    x, w, dy, _ = _case(4)
    calls = []
    mp = pytest.MonkeyPatch()
    mp.setattr("dsv3.fp8.ops.cached", lambda kind, t, make: calls.append(kind) or make(t))
    try:
        _run(FP8LinearFunction, x, w, dy, None)
    finally:
        mp.undo()
    assert calls == ["blocks"] and cached_count() == 0      # the backward's W^T only (its both-orientation kernel)


def test_trainer_opens_the_cache_for_several_micro_batches_with_the_same_losses(tmp_path, monkeypatch):
    """train.precision=fp8 with 2 micro-batches per step: the step runs inside an open cache (entries present at the
    end of the micro-batch loop) and gives exactly the losses of the same run with the cache disabled."""
    from dsv3.train import Trainer, trainer as trainer_mod
    from test_train_loop import small_run

    def run(name: str, enabled: bool) -> list[float]:
        seen = []
        real_scope = trainer_mod.weight_cache

        def scope(model, enabled_arg=True, **kw):
            return real_scope(model, enabled=enabled and kw.get("enabled", enabled_arg))
        monkeypatch.setattr(trainer_mod, "weight_cache", scope)
        t = Trainer(small_run(tmp_path, name, train={"precision": "fp8", "steps": 3, "batch_size": 4,
                                                     "micro_batch_size": 2, "batch_size_start": 4}),
                    progress=False)
        real_fb = t._forward_backward

        def fb(*a):
            out = real_fb(*a)
            seen.append(cached_count())
            return out
        t._forward_backward = fb
        losses = [t.train_step()[0].loss for _ in range(3)]
        assert (min(seen) > 0) == enabled, seen
        return losses

    assert run("cached", True) == run("plain", False)
