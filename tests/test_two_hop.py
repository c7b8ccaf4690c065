"""Two-hop node-limited dispatch (dsv3.parallel.two_hop) against the flat dispatch and the single-process MoE.

Spawned gloo ranks play nodes of `PER_NODE` ranks (4 ranks = 2 nodes x 2, 8 ranks = 2 nodes x 4), all one EP group.
Each rank runs the same float64 MoE layer (real gate, 16 experts, top-4) on its own tokens three ways: unsharded on
the concatenation of every rank's tokens (the reference), expert-parallel with the flat dispatch, and with the
two-hop dispatch. Loss = sum over ranks of <y, g>, so the gradients compare without scaling. A meter wrapped around
torch.distributed.all_to_all_single counts the bytes every call sends to ranks on other nodes (payloads and
metadata, forward and backward), independently of either dispatch's own bookkeeping.
"""

import copy
import math

import pytest
import torch
import torch.distributed as dist
from conftest import init_gloo, run_ranks, tiny_config

from dsv3.model.moe import MoE
from dsv3.parallel.expert import ExpertParallelExperts, apply_expert_parallel
from dsv3.parallel.two_hop import TwoHopExperts, apply_two_hop, node_layout

N_TOKENS, E, K = 12, 16, 4
# group-limited routing mapped to nodes: 2 groups of 8 experts = one group per node (2 nodes), topk_group 1: every
# token's 4 experts lie on one node; "free": no group limit, a token reaches any node; "one_node": node-limited with
# the biases of the first half of the experts raised, so every token goes to the first half of the nodes and the
# other ranks receive no rows (they must still run every exchange, forward and backward)
ROUTINGS = {"node_limited": dict(n_group=2, topk_group=1), "free": dict(n_group=1, topk_group=1),
            "one_node": dict(n_group=2, topk_group=1)}


class Meter:
    """Bytes each all_to_all_single sends across the node boundary (nodes of `per_node` consecutive ranks)."""

    def __init__(self, per_node: int):
        self.per_node, self.bytes, self.calls = per_node, 0, 0
        self._a2a = dist.all_to_all_single

    def __enter__(self):
        def spy(output, input, output_split_sizes=None, input_split_sizes=None, group=None, async_op=False):
            ranks = dist.get_process_group_ranks(group or dist.group.WORLD)
            splits = input_split_sizes or [input.shape[0] // len(ranks)] * len(ranks)
            row = math.prod(input.shape[1:]) * input.element_size()
            me = dist.get_rank() // self.per_node
            self.bytes += sum(n * row for r, n in zip(ranks, splits) if r // self.per_node != me)
            self.calls += 1
            return self._a2a(output, input, output_split_sizes, input_split_sizes, group=group, async_op=async_op)

        dist.all_to_all_single = spy
        return self

    def __exit__(self, *exc):
        dist.all_to_all_single = self._a2a


def _moe(routing: str) -> MoE:
    cfg = tiny_config(n_routed_experts=E, num_experts_per_tok=K, **ROUTINGS[routing])
    torch.manual_seed(0)
    moe = MoE(cfg).double()
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.1)
        moe.gate.e_score_correction_bias.uniform_(-0.05, 0.05)
        if routing == "one_node":
            moe.gate.e_score_correction_bias[:E // 2] += 10.0
    return moe


def _run(model, x, g):
    x = x.detach().clone().requires_grad_(True)
    y = model(x)
    (y * g).sum().backward()
    return y.detach(), x.grad, {n: p.grad.clone() for n, p in model.named_parameters()}


def _case(rank, world, per_node, routing):
    ref = _moe(routing)
    gen = torch.Generator().manual_seed(1)
    xs = torch.randn(world, N_TOKENS, ref.gate.weight.shape[1], generator=gen, dtype=torch.float64)
    gs = torch.randn(xs.shape, generator=gen, dtype=torch.float64)
    y_ref, xg_ref, grads_ref = _run(ref, xs.flatten(0, 1), gs.flatten(0, 1))
    out = {"y_ref": y_ref.view_as(xs)[rank], "xg_ref": xg_ref.view_as(xs)[rank], "grads_ref": grads_ref}
    _, idx = ref.gate(xs[rank])
    L = E // world
    out["pairs_remote"] = int((idx // L // per_node != rank // per_node).sum())
    out["nodes_reached"] = sorted({int(n) for n in (idx // L // per_node).flatten()})
    out["tokens_nodes_remote"] = sum(len({int(n) for n in row} - {rank // per_node}) for row in idx // L // per_node)
    for name in ("flat", "two_hop"):
        moe = apply_expert_parallel(copy.deepcopy(ref), dist.group.WORLD)
        if name == "two_hop":
            apply_two_hop(moe, per_node)
        for p in moe.parameters():
            p.grad = None
        with Meter(per_node) as meter:
            y, xg, grads = _run(moe, xs[rank], gs[rank])
        out[name] = {"y": y, "xg": xg, "grads": grads, "bytes": meter.bytes, "calls": meter.calls,
                     "cls": type(moe.experts).__name__}
    return out


def _bf16_case(rank, world, per_node):
    """fp32 weights under bf16 autocast, every token on node 0: the idle ranks must send rows of the dtype the
    others send (else gloo fails or hangs); two-hop and flat agree to bf16 rounding."""
    ref = _moe("one_node").float()
    x = torch.randn(N_TOKENS, ref.gate.weight.shape[1], generator=torch.Generator().manual_seed(rank))
    out = {}
    for name in ("flat", "two_hop"):
        moe = apply_expert_parallel(copy.deepcopy(ref), dist.group.WORLD)
        if name == "two_hop":
            apply_two_hop(moe, per_node)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out[name] = _run(moe, x, torch.ones(x.shape))
    return {"y": _rel(out["two_hop"][0], out["flat"][0]), "xg": _rel(out["two_hop"][1], out["flat"][1])}


def _fp8_case(rank, world, per_node):
    """parallel.fp8_dispatch: two-hop sends FP8 rows across the nodes and again inside the node; with power-of-2
    tile scales the second quantisation of the same tiles is exact, so its forward equals the flat FP8 dispatch."""
    ref = _moe("free").float()
    gen = torch.Generator().manual_seed(rank)
    x, g = (torch.randn(N_TOKENS, ref.gate.weight.shape[1], generator=gen) for _ in range(2))
    out = {}
    for name, fp8 in (("flat", True), ("two_hop", True), ("flat_bf16", False)):
        moe = apply_expert_parallel(copy.deepcopy(ref), dist.group.WORLD, fp8_dispatch=fp8)
        if name == "two_hop":
            apply_two_hop(moe, per_node)
        out[name] = _run(moe, x, g)
    return {"y": _rel(out["two_hop"][0], out["flat"][0]), "xg": _rel(out["two_hop"][1], out["flat"][1]),
            "fp8_vs_exact": _rel(out["flat"][0], out["flat_bf16"][0])}


def _worker(rank, init_file, out_dir, world, per_node):
    init_gloo(rank, world, init_file)
    try:
        res = {r: _case(rank, world, per_node, r) for r in ROUTINGS}
        res["bf16"] = _bf16_case(rank, world, per_node)
        res["fp8"] = _fp8_case(rank, world, per_node)
        torch.save(res, out_dir / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module", params=[(4, 2), (8, 4), (4, 1)], ids=["2x2", "2x4", "4x1"])
def ranks(request, tmp_path_factory):
    world, per_node = request.param
    tmp = tmp_path_factory.mktemp(f"twohop{world}")
    return world, per_node, run_ranks(_worker, world, tmp, "two-hop", args=(str(tmp / "init"), tmp, world, per_node))


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("routing", list(ROUTINGS))
def test_outputs_and_gradients_equal_flat_and_single_process(ranks, routing):
    world, _, results = ranks
    L = E // world
    summed = {}                 # replicated parameters: each rank's gradient is that of its own tokens' loss
    for rank, res in enumerate(results):
        r = res[routing]
        assert r["two_hop"]["cls"] == "TwoHopExperts" and r["flat"]["cls"] == "ExpertParallelExperts"
        for name in ("flat", "two_hop"):
            d = r[name]
            assert _rel(d["y"], r["y_ref"]) < 1e-12, (rank, name)
            assert _rel(d["xg"], r["xg_ref"]) < 1e-12, (rank, name)
            for pname, g in d["grads"].items():
                if pname.startswith("experts."):    # the expert slice gets every rank's rows' gradients
                    assert _rel(g, r["grads_ref"][pname][rank * L:(rank + 1) * L]) < 1e-12, (rank, name, pname)
                else:
                    summed[name, pname] = summed.get((name, pname), 0) + g
    if routing == "one_node":          # the case is what it claims: the second half of the nodes gets no rows
        n_nodes = world // ranks[1]
        assert all(max(res[routing]["nodes_reached"]) < n_nodes // 2 for res in results)
    ref = results[0][routing]["grads_ref"]
    for (name, pname), g in summed.items():
        assert _rel(g, ref[pname]) < 1e-12, (name, pname)


def _traffic(results, routing):
    """Totals over the ranks (a rank's bytes include rows other ranks' tokens sent it, returned in the combine):
    remote (token, expert) pairs P, remote (token, node) pairs T, measured bytes of both dispatches."""
    rs = [res[routing] for res in results]
    return (sum(r["pairs_remote"] for r in rs), sum(r["tokens_nodes_remote"] for r in rs),
            sum(r["flat"]["bytes"] for r in rs), sum(r["two_hop"]["bytes"] for r in rs))


def test_node_limited_routing_crosses_the_node_boundary_once_per_token_and_node(ranks):
    """Every token's experts on one node: flat moves one row per remote (token, expert) pair across the boundary
    (dispatch, combine, and both again in backward), two-hop one row per remote (token, node) pair plus its K ids
    and weights; the measured bytes (everything the all-to-alls send) are below one row per remote pair."""
    world, per_node, results = ranks
    row, meta = tiny_config().hidden_size * 8, 2 * K * 8                 # float64 rows; ids + weights per row
    P, T, flat, two = _traffic(results, "node_limited")
    counts = 8 * E * world                                               # the per-expert / per-node counts
    assert 4 * P * row <= flat <= 4 * P * row + counts, (P, flat)
    assert 4 * T * row <= two <= T * (4 * row + 2 * meta) + counts, (T, two)
    assert two < 4 * P * row, (two, P)                                  # fewer than one row per (token, expert)
    if per_node * (E // world) == E // 2:       # one expert group per node: top-4 on one node, the saving is real
        assert T <= P / 2 and two < 0.5 * flat, (T, P, two, flat)
    else:                                       # 4 nodes of 1 rank: a group spans 2 nodes, a token reaches <= 2
        assert T < P and two < flat, (T, P, two, flat)


def test_free_routing_sends_one_row_per_remote_node(ranks):
    """Without group limits a token can reach both nodes; two-hop still sends one row per (token, node)."""
    _, _, results = ranks
    row, meta = tiny_config().hidden_size * 8, 2 * K * 8
    P, T, flat, two = _traffic(results, "free")
    assert 0 < T < P
    assert 4 * T * row <= two <= T * (4 * row + 2 * meta) + 8 * E * len(results) < flat, (T, P, two, flat)


def test_bf16_autocast_with_idle_ranks(ranks):
    _, _, results = ranks
    for rank, res in enumerate(results):
        assert res["bf16"]["y"] < 2e-2 and res["bf16"]["xg"] < 2e-2, (rank, res["bf16"])


@pytest.mark.parametrize("ep_ranks, per_node, want", [
    ([0, 1, 2, 3], 2, (2, [[0, 2], [1, 3]], [[0, 1], [2, 3]])),
    ([4, 5, 6, 7], 2, (2, [[4, 6], [5, 7]], [[4, 5], [6, 7]])),
    ([0, 1, 2, 3], 4, (4, [[0], [1], [2], [3]], [[0, 1, 2, 3]])),
    ([0, 1, 2, 3, 4, 5, 6, 7], 2, (2, [[0, 2, 4, 6], [1, 3, 5, 7]], [[0, 1], [2, 3], [4, 5], [6, 7]])),
])
def test_node_layout(ep_ranks, per_node, want):
    assert node_layout(ep_ranks, per_node) == want


def test_uneven_nodes_are_refused():
    with pytest.raises(ValueError, match="same number of EP ranks on every node"):
        node_layout([0, 1, 2, 3], 3)


def test_two_hop_is_an_expert_parallel_module():
    assert issubclass(TwoHopExperts, ExpertParallelExperts)


def test_fp8_dispatch_two_hop_equals_flat(ranks):
    for r in ranks[2]:
        assert r["fp8"]["y"] < 1e-5, r["fp8"]                       # the forward quantises the same tiles
        # backward: flat quantises each (token, expert) row's gradient g * w_k once; two-hop quantises g per (token,
        # node) across the nodes and then g * w_k inside the node, so the two differ within the FP8 bound
        assert r["fp8"]["xg"] < 0.125, r["fp8"]
        assert r["fp8"]["fp8_vs_exact"] > 1e-4, r["fp8"]          # FP8 really ran
