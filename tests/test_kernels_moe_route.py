"""The one-launch decode router (dsv3.kernels.moe_route): the PyTorch reference against the model's Gate.route
(bit-equal), the Triton kernel against it under TRITON_INTERPRET=1 (tiny / lite / V3 gate shapes, in a
subprocess), a valid top-k set on tied scores, the pair-order kernel against moe_decode.sort_pairs, the custom
op's fake, the fused MoE path through it against the MoE module's forward, and on CUDA the kernels against the
references with a graph capture."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from conftest import interpreter_cases

from dsv3.config import ModelConfig
from dsv3.kernels.moe_route import HAS_TRITON, moe_route, moe_route_reference
from dsv3.model.moe import Gate

# (E, n_group, topk_group, K): tiny (grouped and not), lite (DeepSeek-V2-Lite-shaped V3 gate), V3
GATES = {"tiny_g4": (8, 4, 2, 2), "tiny_g1": (8, 1, 1, 2), "lite": (64, 1, 1, 6), "lite_g8": (64, 8, 3, 6),
         "v3": (256, 8, 4, 8)}


def make_gate(E, G, TG, K, D=32, norm=True, seed=0) -> Gate:
    cfg = ModelConfig(hidden_size=D, n_routed_experts=E, n_group=G, topk_group=TG, num_experts_per_tok=K,
                      norm_topk_prob=norm)
    gate = Gate(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        gate.weight.copy_(torch.randn(E, D, generator=g) * D ** -0.5)
        gate.e_score_correction_bias.copy_(torch.randn(E, generator=g) * 0.05)   # large enough to change picks
    return gate


def gate_args(gate: Gate) -> tuple:
    return (gate.e_score_correction_bias, gate.top_k, gate.n_group, gate.topk_group, gate.norm_topk_prob,
            gate.route_scale)


def case(name: str, T: int, seed: int = 0) -> tuple[torch.Tensor, tuple]:
    gate = make_gate(*GATES[name], seed=seed)
    x = torch.randn(T, gate.weight.shape[1], generator=torch.Generator().manual_seed(seed + 1))
    return F.linear(x, gate.weight.detach()), gate_args(gate)


@pytest.mark.parametrize("name", list(GATES))
@pytest.mark.parametrize("norm", [True, False])
def test_reference_is_gate_route(name, norm):
    gate = make_gate(*GATES[name], norm=norm)
    x = torch.randn(37, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want_w, want_i, _ = gate.route(x)
        w, i, counts = moe_route_reference(F.linear(x, gate.weight), *gate_args(gate))
    assert torch.equal(i, want_i) and torch.equal(w, want_w)
    E = gate.weight.shape[0]
    assert counts.dtype == torch.int32 and torch.equal(counts.long(), torch.bincount(i.flatten(), minlength=E))


def test_bad_input_is_refused():
    logits, bias = torch.randn(2, 8), torch.zeros(8)
    for args, match in [((bias, 2, 3, 1), "n_group"), ((bias, 2, 4, 5), "topk_group"), ((bias, 5, 4, 2), "top_k"),
                        ((torch.zeros(7), 2, 1, 1), "bias"), ((bias, 2, 8, 2), "too small")]:
        with pytest.raises(ValueError, match=match):
            moe_route_reference(logits, *args, True, 1.0)


def test_custom_op_fake_and_dispatch():
    from dsv3.kernels.decode_ops import moe_route as op
    logits, args = case("lite_g8", 5)
    torch.library.opcheck(torch.ops.dsv3.moe_route.default, (logits, *args))
    for got, want in zip(op(logits, *args), moe_route_reference(logits, *args)):
        assert torch.equal(got, want)
    assert all(torch.equal(a, b) for a, b in zip(moe_route(logits, *args), moe_route_reference(logits, *args)))


def _check_ties(logits, args, got) -> None:
    """The kernel's picks on tied choices: K distinct experts whose choices are the reference's top-k values
    (n_group 1), or (grouped) experts of groups whose scores reach the topk_group-th best; weights and counts of
    its own picks."""
    bias, K, G, TG, norm, scale = args
    w, idx, counts = got
    choice = logits.sigmoid() + bias
    assert all(len(set(row.tolist())) == K for row in idx)
    if G == 1:
        want = choice.topk(K, dim=-1).values
        assert torch.equal(choice.gather(1, idx).sort(-1, descending=True).values, want)
    else:
        grouped = choice.unflatten(-1, (G, -1))
        gscore = grouped.topk(2, dim=-1).values.sum(-1)
        bar = gscore.topk(TG, dim=-1).values[:, -1:]
        assert (gscore.gather(1, idx // (choice.shape[1] // G)) >= bar).all()
    ref_w = logits.sigmoid().gather(1, idx)
    ref_w = ref_w / (ref_w.sum(-1, keepdim=True) + 1e-20) if norm and K > 1 else ref_w
    torch.testing.assert_close(w, ref_w * scale, rtol=1e-6, atol=1e-7)
    assert torch.equal(counts.long(), torch.bincount(idx.flatten(), minlength=choice.shape[1]))


def _run_cases(fn) -> dict:
    """Per case: whether fn's ids and counts equal the reference's, and the largest weight difference."""
    out = {}
    for name, T in [("tiny_g4", 1), ("tiny_g1", 3), ("lite", 1), ("lite", 7), ("lite_g8", 5), ("v3", 1),
                    ("v3", 256), ("lite", 64)]:
        logits, args = case(name, T, seed=T)
        w, i, c = fn(logits, *args)
        rw, ri, rc = moe_route_reference(logits, *args)
        out[f"{name}_t{T}"] = [bool(torch.equal(i, ri)), bool(torch.equal(c, rc)), float((w - rw).abs().max())]
    # ties: logits from {-1, 0, 1}, no bias (lite and V3 shapes)
    for name in ("lite", "v3"):
        logits, args = case(name, 16)
        logits = logits.sign().contiguous()
        args = (torch.zeros_like(args[0]), *args[1:])
        try:
            _check_ties(logits, args, fn(logits, *args))
            out[f"ties_{name}"] = [True, True, 0.0]
        except AssertionError as e:
            out[f"ties_{name}"] = [False, False, str(e)[:200]]
    # a NaN token: ids and counts stay in 0..E-1 (they index expert weights downstream)
    logits, args = case("lite_g8", 2)
    logits[0] = float("nan")
    w, i, c = fn(logits, *args)
    out["nan_ids_in_range"] = [bool(((i >= 0) & (i < 64)).all()), int(c.sum()) == i.numel(), 0.0]
    return out


def _pair_cases() -> dict:
    """sort_pairs_triton against moe_decode.sort_pairs (pairs, offs, tile map; equal), on distinct ids per token
    and on every token at the same experts (one long segment), with row tiles of 16 and 64."""
    from dsv3.kernels.moe_decode import sort_pairs
    from dsv3.kernels.moe_route import sort_pairs_triton
    out = {}
    for T, E, K, bm in [(1, 64, 6, 16), (7, 8, 2, 16), (100, 64, 6, 64), (256, 256, 8, 64), (33, 256, 8, 16)]:
        g = torch.Generator().manual_seed(T)
        idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
        if T == 33:
            idx = torch.arange(K).repeat(T, 1)
        idx = idx.to("cuda" if torch.cuda.is_available() else "cpu")
        got, want = sort_pairs_triton(idx, E, bm), sort_pairs(idx, E, bm)
        same = [bool(torch.equal(a, b)) for a, b in zip(got, want)]
        out[f"pairs_t{T}_e{E}"] = [same[0] and same[1], same[2] and same[3], 0.0]
    # the fused MoE with this sort as its step 1 (dsv3.kernels.decode_ops): bit-equal to its own, near the reference
    from dsv3.kernels.moe_decode import moe_decode_reference, moe_decode_triton
    g = torch.Generator().manual_seed(0)
    T, D, E, K, N = 3, 64, 8, 2, 32
    x = torch.randn(T, D, generator=g)
    gate, up, down = (torch.randn(*shape, generator=g) * 0.1 for shape in [(E, N, D), (E, N, D), (E, D, N)])
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    w = torch.rand(T, K, generator=g)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    x, w, idx, gate, up, down = (t.to(dev) for t in (x, w, idx, gate, up, down))
    got = moe_decode_triton(x, w, idx, gate, up, down, sort=sort_pairs_triton)
    own = moe_decode_triton(x, w, idx, gate, up, down)
    ref = moe_decode_reference(x, w, idx, gate, up, down)
    err = float((got - ref).abs().max() / ref.abs().max())
    # fp32 GEMM stages: exact to rounding in the interpreter, TF32 dots on a GPU
    out["moe_decode_sort"] = [bool(torch.equal(got, own)), err < (1e-6 if dev == "cpu" else 1e-2), 0.0]
    return out


def test_sort_pairs_op_fake_shapes():
    """The custom op's fake outputs (what a compiled decode layer plans with) have sort_pairs' shapes and dtypes."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    import dsv3.kernels.decode_ops  # noqa: F401  (registers the op)
    from dsv3.kernels.moe_decode import sort_pairs
    for T, E, K, bm in [(1, 64, 6, 16), (5, 8, 2, 64), (256, 256, 8, 64)]:
        idx = torch.randint(0, E, (T, K))
        want = sort_pairs(idx, E, bm)
        with FakeTensorMode() as mode:
            got = torch.ops.dsv3.moe_sort_pairs(mode.from_tensor(idx), E, bm)
        assert [(g.shape, g.dtype) for g in got] == [(w.shape, w.dtype) for w in want]


def _interpreter_cases() -> dict:
    assert os.environ.get("TRITON_INTERPRET") == "1"
    from dsv3.kernels.moe_route import moe_route_triton
    from dsv3.kernels.triton_setup import patch_interpreter_for_numpy2
    patch_interpreter_for_numpy2()
    return _run_cases(moe_route_triton) | _pair_cases()


def check_results(res: dict, n: int = 11) -> None:
    assert len(res) == n, res
    for name, (same_idx, same_counts, err) in res.items():
        assert same_idx and same_counts and err < 1e-6, (name, res)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed: the interpreter test needs it "
                                           "(requirements-ci.txt pins triton, so CI runs it)")
def test_triton_interpreter_matches_reference():
    check_results(interpreter_cases("test_kernels_moe_route"), 17)


def test_reference_cases_and_ties():
    """The same cases through the reference itself (the tie check must accept torch.topk's own choice)."""
    check_results(_run_cases(moe_route_reference))


def test_fused_moe_path_routes_as_the_module():
    """moe_ffn's fused path (reference kernels on CPU) through the router op: the MoE module's output and loads,
    with a bias that changes picks (V3-shaped grouped gate, and a softmax gate that keeps Gate.route)."""
    from conftest import build, tiny_config
    from dsv3.infer.moe_dispatch import moe_ffn
    from dsv3.model.moe import MoE
    for extra in ({}, dict(scoring_func="softmax", topk_method="greedy", n_group=1, topk_group=1)):
        model = build(tiny_config(vocab_size=96, **extra), seed=3, dtype=torch.float32)
        moe = next(m for m in model.modules() if isinstance(m, MoE))
        if moe.gate.e_score_correction_bias is not None:
            moe.gate.e_score_correction_bias.copy_(torch.randn(moe.n_experts) * 0.1)
        x = torch.randn(2, 9, moe.gate.weight.shape[1])
        with torch.no_grad():
            moe.tokens_per_expert.zero_()
            want = moe(x)
            want_load = moe.tokens_per_expert.clone()
            moe.tokens_per_expert.zero_()
            got = moe_ffn(moe, x, True)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        assert torch.equal(moe.tokens_per_expert, want_load) and int(want_load.sum()) == 18 * moe.gate.top_k


@pytest.mark.gpu
@pytest.mark.skipif(not (HAS_TRITON and torch.cuda.is_available()),
                    reason="GPU-only: needs a CUDA GPU with triton (benchmarks/gpu_suite.sh gpu on the device)")
def test_cuda_triton_matches_reference_and_captures():
    from dsv3.kernels.moe_route import moe_route_triton

    def on_gpu(logits, *args):
        got = moe_route_triton(logits.cuda(), args[0].cuda(), *args[1:])
        return tuple(t.cpu() for t in got)
    check_results(_run_cases(on_gpu))
    check_results(_pair_cases(), 6)
    logits, args = case("v3", 32)
    logits, bias = logits.cuda(), args[0].cuda()
    (w, i, c), (wr, ir, cr) = moe_route(logits, bias, *args[1:]), moe_route_reference(logits.cpu(), *args)
    # the dispatcher takes the kernel on CUDA: the same choice and counts; weights to the sigmoid's ulps (the GPU's
    # and the CPU's sigmoid may round differently: on the H200 bit equality failed here)
    assert torch.equal(i.cpu(), ir) and torch.equal(c.cpu(), cr)
    torch.testing.assert_close(w.cpu(), wr, rtol=0, atol=1e-6)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = moe_route_triton(logits, bias, *args[1:])
    logits.copy_(torch.randn_like(logits))
    graph.replay()
    want = moe_route_reference(logits.cpu(), *args)
    assert torch.equal(out[1].cpu(), want[1]) and torch.equal(out[2].cpu(), want[2])
    torch.testing.assert_close(out[0].cpu(), want[0], rtol=1e-6, atol=1e-6)
