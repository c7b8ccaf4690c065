"""Expert parallelism (dsv3.parallel.expert, spec 5) against the single-process run.

Two spawned gloo ranks each train the same tiny float64 model (two MoE layers and an MoE MTP module) with the
experts sharded 4 + 4 and rank r fed batch r; in the same process a reference model trains on the concatenation of
both batches. One spawn runs every distributed check (each spawn costs seconds) and saves what it measured; the
tests below assert on it.
"""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from conftest import build, init_gloo, run_ranks, tiny_config

from dsv3.model.moe import Experts
from dsv3.parallel.expert import ExpertParallelExperts, all_reduce_expert_loads, apply_expert_parallel
from dsv3.parallel.grads import grad_norm, sync_gradients
from dsv3.parallel.mesh import ParallelMesh
from dsv3.train.balance import collect_balance_loss, moe_layers, update_bias
from dsv3.parallel.recompute import apply_recompute
from dsv3.train.losses import lm_losses

WORLD, STEPS, B, T = 2, 3, 2, 12
MTP_WEIGHT, ALPHA, LR, BIAS_SPEED = 0.3, 0.01, 0.5, 0.01


# ---- what each rank runs --------------------------------------------------------------------------------------------
def _loss(model, window):
    """Main + MTP cross-entropy (float64, mean over this batch's tokens) + sequence-wise balance loss."""
    for _, m in moe_layers(model):
        m.tokens_per_expert.zero_()
        m.keep_routing = True
    main, mtp, _, _ = lm_losses(model, window, ce=lambda lg, t: F.cross_entropy(lg.flatten(0, 1), t.flatten()))
    return main + MTP_WEIGHT * torch.stack(mtp).mean() + ALPHA * collect_balance_loss(moe_layers(model))


def _training(rank, group):
    """STEPS of SGD on synced gradients plus the bias update on all-reduced loads, EP vs the reference (the
    layouts' one gradient sync and norm, dsv3.parallel.grads, on a (pp 1, dp 1, ep 2) mesh)."""
    mesh = ParallelMesh(1, 1, WORLD)
    cfg = tiny_config(num_hidden_layers=3, first_k_dense_replace=1)     # MoE layers 1, 2 and the MTP module
    ref = build(cfg, dtype=torch.float64).train()
    ep = apply_expert_parallel(build(cfg, dtype=torch.float64).train(), group)
    L = cfg.n_routed_experts // WORLD
    windows = torch.randint(0, cfg.vocab_size, (STEPS, WORLD, B, T + 1), generator=torch.Generator().manual_seed(1))
    opt_ref, opt_ep = torch.optim.SGD(ref.parameters(), lr=LR), torch.optim.SGD(ep.parameters(), lr=LR)
    ref_params = dict(ref.named_parameters())
    out = {"loss": [], "grad_err": [], "missing": [], "norm": [], "loads_equal": [], "bias": [], "local_to_other": 0}
    for step in range(STEPS):
        ref_loss = _loss(ref, windows[step].flatten(0, 1))              # the concatenation of both ranks' batches
        ep_loss = _loss(ep, windows[step, rank])
        ref_loss.backward()
        ep_loss.backward()
        sync_gradients(ep, mesh)
        total = ep_loss.detach().clone()
        dist.all_reduce(total, group=group)
        out["loss"].append(((total / WORLD).item(), ref_loss.item()))
        errs, missing = {}, []
        for name, p in ep.named_parameters():
            g_ref = ref_params[name].grad
            if name.endswith(("experts.gate_proj", "experts.up_proj", "experts.down_proj")):
                g_ref = g_ref[rank * L:(rank + 1) * L]
            if p.grad is None:
                missing.append(name)
                continue
            errs[name] = ((p.grad - g_ref).abs().max() / g_ref.abs().max()).item()
        out["grad_err"].append(errs)
        out["missing"].append(missing)
        out["norm"].append((grad_norm(ep, mesh).item(), torch.cat([p.grad.flatten() for p in ref.parameters()
                                                                      if p.grad is not None]).norm().item()))
        opt_ref.step(), opt_ep.step()
        opt_ref.zero_grad(), opt_ep.zero_grad()
        # the bias update (spec 1.7) on the loads of the whole batch
        out["local_to_other"] += sum(int(m.tokens_per_expert.view(WORLD, L)[1 - rank].sum()) for _, m in moe_layers(ep))
        all_reduce_expert_loads(ep, group)
        loads_ref = torch.stack([m.tokens_per_expert for _, m in moe_layers(ref)])
        loads_ep = torch.stack([m.tokens_per_expert for _, m in moe_layers(ep)])
        out["loads_equal"].append(torch.equal(loads_ref, loads_ep))
        update_bias(moe_layers(ref), loads_ref, BIAS_SPEED)
        update_bias(moe_layers(ep), loads_ep, BIAS_SPEED)
        out["bias"].append((torch.stack([m.gate.e_score_correction_bias for _, m in moe_layers(ep)]).clone(),
                            torch.stack([m.gate.e_score_correction_bias for _, m in moe_layers(ref)]).clone()))
    out["n_ep_modules"] = sum(isinstance(m, ExpertParallelExperts) for m in ep.modules())
    out["local_shape"] = tuple(ep.layers[1].mlp.experts.gate_proj.shape)
    return out


def _routed_case(rank, group, route):
    """A bare Experts module (float32: the grouped-GEMM path) on hand-made routing, EP vs the unsharded module on
    both ranks' tokens. route(rank, gen) -> idx (N, K). Loss = sum over ranks of <y, g>, so no scaling applies."""
    cfg = tiny_config(n_routed_experts=8)
    torch.manual_seed(0)
    ref = Experts(cfg)
    for p in ref.parameters():
        torch.nn.init.normal_(p, std=0.2)
    ep = apply_expert_parallel(Experts(cfg), group)
    L = 8 // WORLD
    with torch.no_grad():
        for name, p in ep.named_parameters():
            p.copy_(getattr(ref, name)[rank * L:(rank + 1) * L])
    gen = torch.Generator().manual_seed(2)
    N, K, D = 6, 2, cfg.hidden_size
    xs = [torch.randn(N, D, generator=gen, requires_grad=True) for _ in range(WORLD)]
    ws = [torch.rand(N, K, generator=gen, requires_grad=True) for _ in range(WORLD)]
    idxs = [route(r, gen) for r in range(WORLD)]
    gs = [torch.randn(N, D, generator=gen) for _ in range(WORLD)]
    cat = lambda ts: torch.cat(ts).detach().requires_grad_(ts[0].requires_grad)
    x_ref, w_ref, idx = cat(xs), cat(ws), torch.cat(idxs)
    y_ref = ref(x_ref, w_ref, idx, torch.bincount(idx.flatten(), minlength=8))
    (y_ref * torch.cat(gs)).sum().backward()
    x, w, idx = xs[rank], ws[rank], idxs[rank]
    y = ep(x, w, idx, torch.bincount(idx.flatten(), minlength=8))
    (y * gs[rank]).sum().backward()
    rows = slice(rank * N, (rank + 1) * N)
    rel = lambda a, b: ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
    errs = {"y": rel(y, y_ref[rows]), "x_grad": rel(x.grad, x_ref.grad[rows]), "w_grad": rel(w.grad, w_ref.grad[rows])}
    for name, p in ep.named_parameters():
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        expected = getattr(ref, name).grad[rank * L:(rank + 1) * L]
        errs[name] = rel(g, expected) if expected.abs().max() > 0 else g.abs().max().item()
    return errs


def _to_own(rank, gen):      # rank 0 keeps its tokens on its own experts; rank 1 uses both ranks' experts
    return torch.randperm(4, generator=gen)[:2].repeat(6, 1) + (0 if rank == 0 else torch.tensor([0, 4]))


def _all_to_rank0(rank, gen):  # every token goes to rank 0's experts: rank 1 receives no rows at all
    return torch.stack([torch.randperm(4, generator=gen)[:2] for _ in range(6)])


def _recomputed_experts():
    m = Experts(tiny_config())
    apply_recompute(m)
    return m


def _errors(group):
    out = {}
    for name, make in [("indivisible", lambda: Experts(tiny_config(n_routed_experts=5, n_group=1, topk_group=1))),
                       ("recompute first", _recomputed_experts)]:
        try:
            apply_expert_parallel(make(), group)
            out[name] = None
        except Exception as e:    # noqa: BLE001 - the type is what the test checks
            out[name] = (type(e).__name__, str(e))
    return out


def _recompute_case(rank, group, sent):
    """One forward + backward of the EP model with and without selective recomputation: the same gradients, and the
    same number of all-to-alls (recomputation re-runs the local SwiGLU, never the dispatch or combine)."""
    cfg = tiny_config(num_hidden_layers=3, first_k_dense_replace=1)
    window = torch.randint(0, cfg.vocab_size, (WORLD, B, T + 1), generator=torch.Generator().manual_seed(2))[rank]
    grads, calls = [], []
    for recompute in (False, True):
        model = apply_expert_parallel(build(cfg, dtype=torch.float64).train(), group)
        if recompute:
            assert apply_recompute(model) > 0
        before = len(sent)
        _loss(model, window).backward()
        calls.append(len(sent) - before)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    errs = {n: ((grads[1][n] - g).norm() / g.norm().clamp_min(1e-30)).item() for n, g in grads[0].items()}
    return {"calls": calls, "errs": errs, "same_names": set(grads[0]) == set(grads[1])}


def _worker(rank, init_file, out_dir):
    init_gloo(rank, WORLD, init_file)
    group = dist.group.WORLD
    sent = []                  # the input split sizes of every all_to_all_single: do rows really move?
    a2a = dist.all_to_all_single

    def spy(output, input, output_split_sizes=None, input_split_sizes=None, group=None, async_op=False):
        if input_split_sizes is not None:
            sent.append(list(input_split_sizes))
        return a2a(output, input, output_split_sizes, input_split_sizes, group=group, async_op=async_op)

    dist.all_to_all_single = spy
    try:
        res = {"train": _training(rank, group)}
        res["sent"] = list(sent)
        res["own"] = _routed_case(rank, group, _to_own)
        res["sent_own"] = sent[len(res["sent"]):]
        res["idle"] = _routed_case(rank, group, _all_to_rank0)
        with torch.autocast("cpu", dtype=torch.bfloat16):   # the idle rank must send bf16 rows too
            res["idle_bf16"] = _routed_case(rank, group, _all_to_rank0)
        res["errors"] = _errors(group)
        res["recompute"] = _recompute_case(rank, group, sent)
        torch.save(res, out_dir / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


# ---- the tests ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return run_ranks(_worker, WORLD, tmp_path_factory.mktemp("ep"), "expert-parallel")


def test_training_steps_match_the_single_process_run(ranks):
    for r, res in enumerate(ranks):
        t = res["train"]
        assert t["n_ep_modules"] == 3 and t["local_shape"] == (4, 32, 64)
        for step, ((ep_loss, ref_loss), errs, missing) in enumerate(zip(t["loss"], t["grad_err"], t["missing"])):
            assert abs(ep_loss - ref_loss) <= 1e-10 * abs(ref_loss), (r, step, ep_loss, ref_loss)
            assert not missing, (r, step, missing)
            worst = max(errs, key=errs.get)
            assert errs[worst] < 1e-9, (r, step, worst, errs[worst])
        for step, (ep_norm, ref_norm) in enumerate(t["norm"]):
            assert abs(ep_norm - ref_norm) <= 1e-9 * ref_norm, (r, step, ep_norm, ref_norm)
        assert all(t["loads_equal"]), (r, t["loads_equal"])
        for step, (ep_bias, ref_bias) in enumerate(t["bias"]):
            assert torch.equal(ep_bias, ref_bias), (r, step)
            assert torch.equal(ep_bias, ranks[0]["train"]["bias"][step][0]), (r, step)
    # the biases really moved, so their agreement means something
    assert not torch.equal(ranks[0]["train"]["bias"][0][0], ranks[0]["train"]["bias"][-1][0])


def test_rows_cross_to_the_other_rank(ranks):
    for r, res in enumerate(ranks):
        assert res["train"]["local_to_other"] > 0, r
        assert any(s[1 - r] > 0 for s in res["sent"]), (r, res["sent"][:4])


@pytest.mark.parametrize("case", ["own", "idle", "idle_bf16"])
def test_a_rank_with_nothing_to_send_or_receive(ranks, case):
    """own: rank 0 sends nothing to rank 1; idle: rank 1 receives no rows at all (it still runs both backward
    all-to-alls, or rank 0 would wait forever), also under bf16 autocast."""
    if case == "own":
        assert all(s[1] == 0 for s in ranks[0]["sent_own"][0::2]), ranks[0]["sent_own"]   # forward dispatches
        assert any(s[0] > 0 for s in ranks[1]["sent_own"]), ranks[1]["sent_own"]
    for r, res in enumerate(ranks):
        errs = res[case]
        worst = max(errs, key=errs.get)
        assert errs[worst] < 1e-5, (case, r, worst, errs[worst])


def test_bad_layouts_raise(ranks):
    for res in ranks:
        kind, msg = res["errors"]["indivisible"]
        assert kind == "ValueError" and "5 experts" in msg and "ep=2" in msg
        assert res["errors"]["recompute first"][0] == "RuntimeError"


def test_recomputation_repeats_no_all_to_all(ranks):
    for r, res in enumerate(ranks):
        rc = res["recompute"]
        # 3 MoE modules (2 layers + MTP) x (dispatch + combine) x (forward + backward)
        assert rc["calls"] == [12, 12], (r, rc["calls"])
        assert rc["same_names"]
        worst = max(rc["errs"], key=rc["errs"].get)
        assert rc["errs"][worst] < 1e-12, (r, worst, rc["errs"][worst])


@pytest.mark.parametrize("ep, per_node, want", [(8, 2, 2), (8, 1, 4), (4, 4, 1), (8, 4, 2)])
def test_group_limited_routing_is_node_limited(ep, per_node, want):
    """The real gate on random tokens (16 experts in 4 groups, top-4 within 2 groups): with every group inside one
    node a token's experts span at most topk_group nodes, and the bound `node_limit` states is reached; with groups
    split over nodes (1 rank per node, 2 ranks per group) the bound is the top-k."""
    from dsv3.model.moe import Gate
    from dsv3.parallel.expert import expert_node, node_limit
    cfg = tiny_config(n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4)
    torch.manual_seed(0)
    gate = Gate(cfg)
    torch.nn.init.normal_(gate.weight, std=0.5)
    _, idx = gate(torch.randn(4096, cfg.hidden_size))
    nodes = expert_node(idx, cfg.n_routed_experts, ep, per_node)                       # (N, K)
    spans = torch.stack([torch.unique(row).numel() * torch.ones(()) for row in nodes]).long()
    assert node_limit(cfg, ep, per_node) == want
    assert spans.max().item() == want, (spans.max().item(), want)       # never more, and some token needs all


def test_node_limit_refuses_layouts_that_do_not_divide():
    from dsv3.parallel.expert import node_limit
    with pytest.raises(ValueError, match="divide"):
        node_limit(tiny_config(n_routed_experts=16, n_group=4, topk_group=2), 8, 3)
