"""One quantisation per shared input (dsv3.fp8.shared_input; issue 15): MLA's q / kv_a projections and an MLP's gate /
up through FP8SharedInputFunction give bit for bit the losses and gradients of separate FP8 linears (with and without
the weight cache), while saving one FP8 copy of the input less for backward per extra projection."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import build, tiny_config

from dsv3.fp8.shared_input import FP8SharedInputFunction
from dsv3.fp8.training import FP8LinearFunction, FP8TrainMLA, FP8TrainMLP, apply_fp8
from dsv3.fp8.weight_cache import refresh_fp8_weights
from dsv3.model.layers import MLP
from dsv3.model.mla import MLA


def _separate(model):
    """The same FP8 model with MLA / MLP back to their plain classes: each FP8 linear quantises its own input."""
    for m in model.modules():
        if type(m) is FP8TrainMLA:
            m.__class__ = MLA
        elif type(m) is FP8TrainMLP:
            m.__class__ = MLP
    return model


def _loss_and_grads(model, ids, cached: str | None):
    if cached:
        refresh_fp8_weights(model, cached)
    model.zero_grad()
    logits = model(ids[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten())
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("cached", [None, "both", "backward"])
def test_shared_input_is_bit_identical_to_separate_fp8_linears(cached):
    base = build(tiny_config(num_nextn_predict_layers=0), seed=0)
    shared = apply_fp8(copy.deepcopy(base), experts="row")
    assert any(type(m) is FP8TrainMLA for m in shared.modules())
    assert any(type(m) is FP8TrainMLP for m in shared.modules())
    separate = _separate(copy.deepcopy(shared))
    ids = torch.randint(0, 128, (2, 33), generator=torch.Generator().manual_seed(1))
    loss_a, grads_a = _loss_and_grads(shared, ids, cached)
    loss_b, grads_b = _loss_and_grads(separate, ids, cached)
    assert loss_a.equal(loss_b)
    assert grads_a.keys() == grads_b.keys()
    for name, g in grads_a.items():
        assert g.equal(grads_b[name]), name
    fp8_saved = []                                   # and the shared path really ran: fewer E4M3 bytes kept
    for model in (shared, separate):
        out = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: out.append(t) or t, lambda t: t):
            model(ids[:, :-1])
        fp8_saved.append(sum(t.numel() for t in out if t.dtype == torch.float8_e4m3fn))
    assert fp8_saved[0] < fp8_saved[1]


def test_shared_input_saves_one_input_copy_per_extra_projection():
    """Bytes kept for backward: two separate FP8 linears save Q(x^T) twice, the shared function once; outputs equal."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 256, generator=g)
    w1, w2 = (torch.randn(n, 256, generator=g) * 0.05 for n in (192, 320))

    def saved(fn):
        out = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: out.append(t) or t, lambda t: t):
            ys = fn()
        return ys, sum(t.numel() * t.element_size() for t in out if t.dtype == torch.float8_e4m3fn)

    xa = x.clone().requires_grad_()
    ys_sep, b_sep = saved(lambda: (FP8LinearFunction.apply(xa, w1), FP8LinearFunction.apply(xa, w2)))
    ys_sh, b_sh = saved(lambda: FP8SharedInputFunction.apply(xa, 2, 0, w1, w2))
    assert all(a.equal(b) for a, b in zip(ys_sep, ys_sh))
    assert b_sep - b_sh == x.numel()                    # one E4M3 copy of x^T less
