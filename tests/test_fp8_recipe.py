"""FP8 training (issue 6): the FP8 linear and experts against high-precision GEMMs, apply_fp8's coverage, and the
recipe's numerics (FP8 vs BF16 training loss from the same seed, < 0.25% relative, as the report claims)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from conftest import build, tiny_config
from dsv3.fp8.training import (FP8GroupedFunction, FP8LinearFunction, FP8RowwiseGroupedFunction, FP8TrainExperts,
                               FP8TrainLinear, apply_fp8)

GROUPED = [FP8GroupedFunction, FP8RowwiseGroupedFunction]   # the report's block scaling; row-wise scales

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("shape", [(37, 300, 200), (256, 256, 512), (1, 128, 128)])
def test_fp8_linear_forward_and_gradients_within_e4m3_error(shape):
    """All three GEMMs in E4M3 with 1x128 / 128x128 scales: relative Frobenius error against the fp64 GEMMs of the
    unquantised operands below 5% (E4M3 rounds to 2^-4 relative; ~3.7% is typical for Gaussian data), the forward
    above 1% (so the FP8 path is really taken; with M = 1 the weight gradient's token tiles hold one value each, which
    quantises exactly)."""
    M, K, N = shape
    g = torch.Generator().manual_seed(M)
    x = torch.randn(M, K, generator=g, dtype=torch.float64)
    w = torch.randn(N, K, generator=g, dtype=torch.float64) * 0.05
    dy = torch.randn(M, N, generator=g, dtype=torch.float64)
    xf, wf = x.float().requires_grad_(), w.float().requires_grad_()
    y = FP8LinearFunction.apply(xf, wf)
    y.backward(dy.float())
    for got, want in ((y, x @ w.t()), (xf.grad, dy @ w), (wf.grad, dy.t() @ x)):
        assert _rel(got, want) < 0.05
    assert _rel(y, x @ w.t()) > 0.01
    assert wf.grad.dtype == torch.float32 and xf.grad.dtype == torch.float32


@pytest.mark.parametrize("fn", GROUPED)
def test_fp8_grouped_forward_and_gradients(fn):
    g = torch.Generator().manual_seed(0)
    counts = torch.tensor([5, 0, 140, 19])
    offs = counts.cumsum(0).to(torch.int32)
    x = torch.randn(int(counts.sum()), 256, generator=g, dtype=torch.float64)
    w = torch.randn(4, 192, 256, generator=g, dtype=torch.float64) * 0.05
    dy = torch.randn(x.shape[0], 192, generator=g, dtype=torch.float64)
    xf, wf = x.float().requires_grad_(), w.float().requires_grad_()
    fn.apply(xf, wf, offs).backward(dy.float())
    bounds = [0] + offs.tolist()
    want_y = torch.cat([x[a:b] @ w[e].t() for e, (a, b) in enumerate(zip(bounds, bounds[1:]))])
    want_dx = torch.cat([dy[a:b] @ w[e] for e, (a, b) in enumerate(zip(bounds, bounds[1:]))])
    want_dw = torch.stack([dy[a:b].t() @ x[a:b] for a, b in zip(bounds, bounds[1:])])
    assert _rel(xf.grad, want_dx) < 0.05 and _rel(wf.grad[[0, 2, 3]], want_dw[[0, 2, 3]]) < 0.05
    assert wf.grad[1].abs().max() == 0                       # an expert without tokens gets no gradient
    with torch.no_grad():
        y = fn.apply(xf, wf, offs)
        assert _rel(y, want_y) < 0.05 and _rel(y, want_y) > 1e-3          # quantised, so close, not equal


@pytest.mark.parametrize("experts", ["block", "row"])
def test_apply_fp8_covers_the_reports_gemms_and_keeps_the_state_dict(experts):
    model = build(tiny_config(), seed=0)
    names = list(model.state_dict())
    apply_fp8(model, experts=experts)
    assert {m.fp8_scaling for m in model.modules() if isinstance(m, FP8TrainExperts)} == {experts}
    assert list(model.state_dict()) == names                  # optimisers, checkpoints and export are unaffected
    fp8 = {n for n, m in model.named_modules() if isinstance(m, (FP8TrainLinear, FP8TrainExperts))}
    assert any(n.endswith("self_attn.kv_b_proj") for n in fp8) and any(n.endswith("mlp.experts") for n in fp8)
    assert any(n.endswith("shared_experts.down_proj") for n in fp8) and any(n.endswith("self_attn.o_proj") for n in fp8)
    for kept in ("embed_tokens", "lm_head", "mlp.gate", "norm", "layernorm"):   # TR 3.3.1: these stay high precision
        assert not any(kept in n.split(".")[-1] or n.endswith(kept) for n in fp8), kept
    ids = torch.randint(0, 128, (2, 20))
    ref = build(tiny_config(), seed=0)
    assert _rel(model(ids), ref(ids)) < 0.1                  # same weights, FP8 GEMMs: close, not equal
    assert _rel(model(ids), ref(ids)) > 1e-4


def test_apply_fp8_experts_only_leaves_the_dense_gemms():
    """linears=False (train.fp8_linears = false): the routed experts in FP8, every nn.Linear as it was."""
    model = build(tiny_config(), seed=0)
    apply_fp8(model, experts="row", linears=False)
    assert not any(isinstance(m, FP8TrainLinear) for m in model.modules())
    assert sum(isinstance(m, FP8TrainExperts) for m in model.modules()) == 3     # MoE layers 1, 2 and the MTP's
    ids = torch.randint(0, 128, (2, 20))
    assert _rel(model(ids), build(tiny_config(), seed=0)(ids)) > 1e-4          # the experts' FP8 really runs


def test_fp8_loss_within_a_quarter_percent_of_bf16_on_trained_weights(tmp_path):
    """A 256-wide V3-shaped model (2 layers, 8 experts, MLA) trained 300 steps in BF16 on the standard library's email
    and json packages; then the same weights' loss on 16 further batches with FP8 GEMMs (reference path) vs BF16
    GEMMs, bf16 autocast: within 0.25% (the report's FP8-vs-BF16 bound); the logits differ (FP8 really ran).

    The training-curve comparison (two runs from one seed, last-50-step means) is `benchmarks/fp8_recipe_cpu.py`:
    with the per-block seeded initialisation its gap at 300 steps depends on when each run leaves the initial
    plateau (0.05% to 4.5% over seeds 0-2, RESULTS.md), which a unit test cannot pin; this one isolates the FP8
    GEMMs' own effect on the loss."""
    import copy

    from fp8_recipe_cpu import recipe_config
    from dsv3.train import Trainer
    t = Trainer(recipe_config(tmp_path / "bf16", "bf16", 300, tmp_path / "data"), progress=False)
    t.run()
    batches = [t.loader.next_batch(8) for _ in range(16)]
    fp8 = apply_fp8(copy.deepcopy(t.model))

    def loss(model) -> float:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            return sum(torch.nn.functional.cross_entropy(model(b[:, :-1]).float().flatten(0, 1),
                                                         b[:, 1:].flatten()).item() for b in batches) / len(batches)

    bf16_loss, fp8_loss = loss(t.model), loss(fp8)           # measured: 3.88460 vs 3.88446 (0.0036%)
    assert bf16_loss < 5.0                                   # it learned (6.9 at the start)
    assert abs(fp8_loss - bf16_loss) / bf16_loss < 0.0025, (bf16_loss, fp8_loss)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):    # the FP8 GEMMs really ran
        assert _rel(fp8(batches[0][:, :-1]), t.model(batches[0][:, :-1])) > 1e-3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run through the device tool)")
@pytest.mark.parametrize("fn", GROUPED)
def test_fp8_autograd_on_cuda_matches_fp64(fn):
    """The Triton quantisers and GEMMs (torch._scaled_grouped_mm for row-wise scales) inside the autograd functions
    (bf16 activations), forward and backward."""
    g = torch.Generator().manual_seed(0)
    counts = torch.tensor([130, 0, 300, 7])
    offs = counts.cumsum(0).to(torch.int32).cuda()
    x = torch.randn(int(counts.sum()), 512, generator=g, dtype=torch.float64)
    w = torch.randn(4, 384, 512, generator=g, dtype=torch.float64) * 0.05
    dy = torch.randn(x.shape[0], 384, generator=g, dtype=torch.float64)
    xb = x.to("cuda", torch.bfloat16).requires_grad_()
    wb = w.float().cuda().requires_grad_()
    y = fn.apply(xb, wb, offs)
    y.backward(dy.to("cuda", torch.bfloat16))
    bounds = [0] + counts.cumsum(0).tolist()
    segs = list(zip(bounds, bounds[1:]))
    assert _rel(y.cpu(), torch.cat([x[a:b] @ w[e].t() for e, (a, b) in enumerate(segs)])) < 0.05
    assert _rel(xb.grad.cpu(), torch.cat([dy[a:b] @ w[e] for e, (a, b) in enumerate(segs)])) < 0.05
    assert _rel(wb.grad.cpu()[[0, 2, 3]], torch.stack([dy[a:b].t() @ x[a:b] for a, b in segs])[[0, 2, 3]]) < 0.05
    x2 = x[:300, :].to("cuda", torch.bfloat16).requires_grad_()
    w2 = w[0].float().cuda().requires_grad_()
    y2 = FP8LinearFunction.apply(x2, w2)
    y2.backward(dy[:300].to("cuda", torch.bfloat16))
    assert _rel(y2.cpu(), x[:300] @ w[0].t()) < 0.05
    assert _rel(x2.grad.cpu(), dy[:300] @ w[0]) < 0.05 and _rel(w2.grad.cpu(), dy[:300].t() @ x[:300]) < 0.05
