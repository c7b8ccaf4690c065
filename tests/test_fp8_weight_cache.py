"""FP8 weights quantised once per optimizer step (dsv3.fp8.weight_cache, issue 15): the cached path gives the same
losses and gradients as quantising in every forward (bit for bit), really uses the cache, refuses a stale one, keeps
compiled blocks to one graph each without recompiling on refresh, and the Trainer refreshes it after each step."""

from __future__ import annotations

import copy
from contextlib import nullcontext

import sys
from pathlib import Path

import pytest
import torch

from conftest import build, tiny_config
from dsv3.fp8.training import FP8TrainExperts, FP8TrainLinear, apply_fp8
from dsv3.fp8.weight_cache import cache_bytes, drop_fp8_weights, refresh_fp8_weights

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

DTYPES = {"fp32": (torch.float32, False), "bf16": (torch.bfloat16, False), "fp32+autocast": (torch.float32, True)}


def _steps(model, cached: bool, autocast: bool, steps: int = 2, micro: int = 2, seed: int = 0,
           orientations: str = "both"):
    """`steps` SGD steps of `micro` micro-batches each; with `cached`, refreshed at start and after each step (as
    the Trainer does). Returns the losses and the last step's gradients."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    if cached:
        refresh_fp8_weights(model, orientations)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        for _ in range(micro):
            ids = torch.randint(0, 128, (2, 17), generator=g)
            ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else nullcontext()
            with ctx:
                logits = model(ids[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
            (loss / micro).backward()
            losses.append(loss.item())
        grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        opt.step()
        if cached:
            refresh_fp8_weights(model, orientations)
    return losses, grads


@pytest.mark.parametrize("orientations", ["both", "backward"])
@pytest.mark.parametrize("experts", ["block", "row"])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_cached_path_is_bit_identical_to_quantising_every_forward(experts, dtype, orientations):
    """Both GEMM orientations cached, or only the input gradient's (W^T; the forward quantises W each time)."""
    weight_dtype, autocast = DTYPES[dtype]
    ref = apply_fp8(build(tiny_config(), seed=3, dtype=weight_dtype), experts=experts)
    test = copy.deepcopy(ref)
    want_losses, want_grads = _steps(ref, cached=False, autocast=autocast)
    got_losses, got_grads = _steps(test, cached=True, autocast=autocast, orientations=orientations)
    assert got_losses == want_losses
    assert len(got_grads) == len(want_grads) and all(torch.equal(a, b) for a, b in zip(got_grads, want_grads))
    modules = [m for m in test.modules() if isinstance(m, (FP8TrainLinear, FP8TrainExperts))]
    assert modules and all(m.fp8_cache is not None for m in modules)
    for a, b in zip(ref.parameters(), test.parameters()):        # the updates saw the same gradients
        assert torch.equal(a, b)


def test_the_forward_reads_the_cache_and_its_memory_is_two_bytes_per_weight():
    model = apply_fp8(build(tiny_config(), seed=0), experts="row")
    ids = torch.randint(0, 128, (2, 20))
    assert refresh_fp8_weights(model) == sum(isinstance(m, (FP8TrainLinear, FP8TrainExperts))
                                             for m in model.modules())
    with torch.no_grad():
        want = model(ids)
        expert = next(m for m in model.modules() if isinstance(m, FP8TrainExperts))
        expert.fp8_cache[0][0].zero_()                       # the cached gate codes of one MoE layer
        assert not torch.equal(model(ids), want)             # so the forward used them (no re-quantisation)
        refresh_fp8_weights(model)
        assert torch.equal(model(ids), want)
    cached = [p for m in model.modules() if isinstance(m, (FP8TrainLinear, FP8TrainExperts))
              for p in m.fp8_weights()]
    codes = 2 * sum(p.numel() for p in cached)               # 1 byte per orientation; the rest is fp32 scales
    assert codes < cache_bytes(model) < codes * 1.2
    from fp8_saved_bytes import cache_bytes_of_shapes        # the benchmark's count from the shapes agrees
    assert cache_bytes_of_shapes(model) == cache_bytes(model)
    refresh_fp8_weights(model, "backward")                   # W^T only: half the codes
    assert codes / 2 < cache_bytes(model) < codes * 0.6
    assert cache_bytes_of_shapes(model, forward_only=True) + cache_bytes(model) == cache_bytes_of_shapes(model)
    with torch.no_grad():
        assert torch.equal(model(ids), want)
    with pytest.raises(ValueError, match="orientations"):
        refresh_fp8_weights(model, "forward")
    drop_fp8_weights(model)
    assert cache_bytes(model) == 0


@pytest.mark.parametrize("experts", ["block", "row"])
def test_a_forward_after_an_unrefreshed_weight_change_raises(experts):
    model = apply_fp8(build(tiny_config(), seed=0), experts=experts)
    refresh_fp8_weights(model)
    ids = torch.randint(0, 128, (2, 20))
    model(ids)
    expert = next(m for m in model.modules() if isinstance(m, FP8TrainExperts))
    with torch.no_grad():
        expert.down_proj.mul_(1.5)
    with pytest.raises(RuntimeError, match="stale cache"):
        model(ids)
    refresh_fp8_weights(model)
    model(ids)
    linear = next(m for m in model.modules() if isinstance(m, FP8TrainLinear))
    model.load_state_dict(model.state_dict())                # a load rewrites every weight in place
    with pytest.raises(RuntimeError, match="FP8TrainLinear.*stale cache"):
        linear(torch.randn(3, linear.in_features))


@pytest.mark.parametrize("experts,orientations", [("block", "both"), ("row", "both"), ("row", "backward"),
                                                 ("row-fp8-wgrad", "both")])
def test_compiled_blocks_take_the_cache_as_inputs_without_graph_breaks_or_recompiles(experts, orientations):
    """Every block compiled (as parallelize does with train.compile; aot_eager on the CPU: dynamo and AOT autograd
    as on the GPU, without inductor's codegen): one graph per distinct block (the dense first layer, the MoE
    layers), none added by the refreshes, and the same losses as eager quantisation in every forward, which a
    graph that had baked the first step's codes in as constants could not give."""
    from torch._dynamo.testing import CompileCounterWithBackend
    torch._dynamo.reset()
    ref = apply_fp8(build(tiny_config(num_nextn_predict_layers=0), seed=1), experts=experts)
    test = copy.deepcopy(ref)
    counter = CompileCounterWithBackend("aot_eager")
    for block in test.layers:
        block.compile(backend=counter)
    want, _ = _steps(ref, cached=False, autocast=False, steps=3, micro=1)
    got, _ = _steps(test, cached=True, autocast=False, steps=3, micro=1,     # 2 refreshes between forwards
                    orientations=orientations)
    assert got == want
    assert counter.frame_count == 2
    torch._dynamo.reset()


@pytest.mark.parametrize("orientations", ["both", "backward"])
def test_trainer_refreshes_after_each_step_and_matches_the_uncached_run(tmp_path, orientations):
    """train.precision=fp8 with 2 micro-batches per step: the Trainer caches (made at start, refreshed after every
    optimizer step, so the eager freshness check passes every forward) and its losses equal a run whose cache is
    dropped (quantisation in every forward)."""
    from dsv3.train import Trainer
    from test_train_loop import small_run
    extra = dict(train={"precision": "fp8", "steps": 3, "batch_size_start": 0, "fp8_weight_cache": orientations},
                 log={"val_batches": 0})
    cached = Trainer(small_run(tmp_path, "cached", **extra), progress=False)
    plain = Trainer(small_run(tmp_path, "plain", **extra), progress=False)
    assert cached.fp8_cache and cache_bytes(cached.model) > 0
    expert = next(m for m in cached.model.modules() if isinstance(m, FP8TrainExperts))
    assert len(expert.fp8_cache[0]) == (4 if orientations == "both" else 2)
    plain.fp8_cache = False
    drop_fp8_weights(plain.model)
    for _ in range(3):
        a, _ = cached.train_step()
        b, _ = plain.train_step()
        assert a.loss == b.loss and a.grad_norm == b.grad_norm
    assert cache_bytes(plain.model) == 0
