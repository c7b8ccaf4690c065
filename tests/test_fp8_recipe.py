"""FP8 training (issue 6): the FP8 linear and experts against high-precision GEMMs, apply_fp8's coverage, and the
recipe's numerics (FP8 vs BF16 training loss from the same seed, < 0.25% relative, as the report claims)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from conftest import build, tiny_config
import torch.nn.functional as F

from dsv3.fp8.experts import FP8ExpertsFunction
from dsv3.fp8.training import FP8LinearFunction, FP8TrainExperts, FP8TrainLinear, apply_fp8

SCALINGS = ["block", "row", "row-fp8-wgrad"]   # the report's block scaling; row-wise scales (+ FP8 weight gradients)

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


def _experts_problem(counts: list[int], D: int, I: int, seed: int = 0):
    """x (M, D), gate / up (E, I, D), down (E, D, I), dy (M, D) in fp64, offs, and the fp64 SwiGLU experts."""
    g = torch.Generator().manual_seed(seed)
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)
    M, E = sum(counts), len(counts)
    x = torch.randn(M, D, generator=g, dtype=torch.float64)
    ws = [torch.randn(E, I, D, generator=g, dtype=torch.float64) * 0.05,
          torch.randn(E, I, D, generator=g, dtype=torch.float64) * 0.05,
          torch.randn(E, D, I, generator=g, dtype=torch.float64) * 0.05]
    dy = torch.randn(M, D, generator=g, dtype=torch.float64)
    bounds = [0] + offs.tolist()

    def reference(x, gate, up, down):
        return torch.cat([F.linear(F.silu(F.linear(x[a:b], gate[e])) * F.linear(x[a:b], up[e]), down[e])
                          for e, (a, b) in enumerate(zip(bounds, bounds[1:]))])
    return x, ws, dy, offs, reference


@pytest.mark.parametrize("scaling", SCALINGS)
def test_fp8_experts_forward_and_gradients_against_fp64(scaling):
    """The experts' SwiGLU FFN with every GEMM in FP8 and its activations stored in FP8 (dsv3.fp8.experts) against
    fp64 autograd on the unquantised operands: within 10% relative (measured 6.3% forward, 6.7-7.1% gradients:
    E4M3's 2^-4 rounding of x, h, dy, dh and of the stored SwiGLU inputs, compounded); an expert without tokens
    gets a zero gradient."""
    x, ws, dy, offs, reference = _experts_problem([5, 0, 140, 19], 256, 384)
    x64, w64 = x.clone().requires_grad_(), [w.clone().requires_grad_() for w in ws]
    reference(x64, *w64).backward(dy)
    xf, wf = x.float().requires_grad_(), [w.float().requires_grad_() for w in ws]
    y = FP8ExpertsFunction.apply(xf, *wf, offs, scaling)
    y.backward(dy.float())
    with torch.no_grad():
        want_y = reference(x, *ws)
    assert 1e-3 < _rel(y, want_y) < 0.1                     # quantised, so close, not equal
    assert _rel(xf.grad, x64.grad) < 0.1
    for got, want in zip(wf, w64):
        assert got.grad.dtype == torch.float32
        assert _rel(got.grad[[0, 2, 3]], want.grad[[0, 2, 3]]) < 0.1
        assert got.grad[1].abs().max() == 0


def test_fp8_weight_gradients_switch_changes_only_the_weight_gradients():
    """row vs row-fp8-wgrad (one flag, dsv3.fp8.experts.RECIPES): the same output and input gradient bit for bit,
    weight gradients that differ (the FP8 GEMM really runs) by E4M3's rounding of the wgrad operands, and both
    within E4M3's error of each other's fp64 target (the bound above)."""
    x, ws, dy, offs, _ = _experts_problem([50, 0, 140, 66], 256, 384, seed=3)
    out = {}
    for recipe in ("row", "row-fp8-wgrad"):
        xf, wf = x.float().requires_grad_(), [w.float().requires_grad_() for w in ws]
        y = FP8ExpertsFunction.apply(xf, *wf, offs, recipe)
        y.backward(dy.float())
        out[recipe] = (y.detach(), xf.grad, [w.grad for w in wf])
    (y0, dx0, g0), (y1, dx1, g1) = out["row"], out["row-fp8-wgrad"]
    assert y0.equal(y1) and dx0.equal(dx1)
    for a, b in zip(g0, g1):
        assert 1e-3 < _rel(b[[0, 2, 3]], a[[0, 2, 3]]) < 0.1 and b[1].abs().max() == 0
    with pytest.raises(ValueError, match="row-fp8-wgrad"):
        apply_fp8(torch.nn.Linear(2, 2), experts="rows")


@pytest.mark.parametrize("scaling", SCALINGS)
def test_fp8_experts_save_only_fp8_activations(scaling):
    """What backward keeps (TR 3.3.4): the input's and the SwiGLU inputs' E4M3 codes with fp32 scales, the group
    ends and the weights (parameters: no copy); no tensor in the activations' precision."""
    x, ws, _, offs, _ = _experts_problem([50, 0, 140, 66], 256, 384)
    xb, wb = x.to(torch.bfloat16).requires_grad_(), [w.float().requires_grad_() for w in ws]
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        FP8ExpertsFunction.apply(xb, *wb, offs, scaling)
    params = {w.data_ptr() for w in wb}
    acts = [t for t in saved if t.data_ptr() not in params and t is not offs]
    assert {t.dtype for t in acts} == {torch.float8_e4m3fn, torch.float32}
    assert sum(t.numel() for t in acts if t.dtype == torch.float8_e4m3fn) == x.numel() + 2 * 256 * 384


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
@pytest.mark.parametrize("scaling", SCALINGS)
def test_fp8_autograd_on_cuda_matches_fp64(scaling):
    """The Triton quantisers and GEMMs (torch._scaled_grouped_mm for row-wise scales) inside the autograd functions
    (bf16 activations), forward and backward."""
    x, ws, dy, offs, reference = _experts_problem([130, 0, 300, 7], 512, 384)
    x64, w64 = x.clone().requires_grad_(), [w.clone().requires_grad_() for w in ws]
    reference(x64, *w64).backward(dy)
    xb = x.to("cuda", torch.bfloat16).requires_grad_()
    wb = [w.float().cuda().requires_grad_() for w in ws]
    y = FP8ExpertsFunction.apply(xb, *wb, offs.cuda(), scaling)
    y.backward(dy.to("cuda", torch.bfloat16))
    with torch.no_grad():
        assert _rel(y.cpu(), reference(x, *ws)) < 0.1
    assert _rel(xb.grad.cpu(), x64.grad) < 0.1
    for got, want in zip(wb, w64):
        assert _rel(got.grad.cpu()[[0, 2, 3]], want.grad[[0, 2, 3]]) < 0.1
    w, dy2 = ws[0][0], dy[:300, :384]          # (384, 512) and (300, 384)
    x2 = x[:300].to("cuda", torch.bfloat16).requires_grad_()
    w2 = w.float().cuda().requires_grad_()
    y2 = FP8LinearFunction.apply(x2, w2)
    y2.backward(dy2.to("cuda", torch.bfloat16))
    assert _rel(y2.cpu(), x[:300] @ w.t()) < 0.05
    assert _rel(x2.grad.cpu(), dy2 @ w) < 0.05 and _rel(w2.grad.cpu(), dy2.t() @ x[:300]) < 0.05


@pytest.mark.parametrize("scaling", SCALINGS)
def test_fp8_moe_layer_saves_less_for_backward_than_bf16(scaling):
    """benchmarks/fp8_saved_bytes.py's count on the tiny model: with the routed experts in FP8 (weights from the
    cache, as the Trainer runs several micro-batches) an MoE layer keeps fewer bytes for backward than in BF16, the
    dense layer the same (its GEMMs stay BF16 with linears=False)."""
    import copy

    from fp8_saved_bytes import saved_bytes_per_layer
    from dsv3.fp8.weight_cache import refresh_fp8_weights
    base = build(tiny_config(num_nextn_predict_layers=0), seed=0, dtype=torch.bfloat16)
    # seeded: the ratio depends on the routing and sits near the bound (block: 0.87-0.89 over 12 seeds); ids from
    # the global RNG made the result depend on the tests run before (it failed once in a run of the five files)
    ids = torch.randint(0, 128, (2, 64), generator=torch.Generator().manual_seed(0))
    fp8 = apply_fp8(copy.deepcopy(base), experts=scaling, linears=False)
    refresh_fp8_weights(fp8, "backward")
    bf16_bytes, fp8_bytes = saved_bytes_per_layer(base, ids), saved_bytes_per_layer(fp8, ids)
    assert fp8_bytes["layer0"] == bf16_bytes["layer0"]
    assert fp8_bytes["layer1"] < 0.9 * bf16_bytes["layer1"], (fp8_bytes, bf16_bytes)
