import pytest
import torch
import torch.nn.functional as F

from dsv3.model import Experts, Gate, expert_ffn

from conftest import tiny_config


def _gate_with_scores(scores, bias, **cfg_overrides):
    """A gate whose sigmoid affinities for the single token x = I are exactly `scores`."""
    E = len(scores)
    cfg = tiny_config(hidden_size=E, n_routed_experts=E, **cfg_overrides)
    gate = Gate(cfg)
    with torch.no_grad():
        gate.weight.copy_(torch.eye(E))
        gate.e_score_correction_bias.copy_(torch.tensor(bias))
    x = torch.logit(torch.tensor([scores], dtype=torch.float64)).float()
    return gate, x


def test_gate_hand_computed_group_limit_and_bias():
    scores = [0.9, 0.1, 0.5, 0.6, 0.8, 0.7, 0.2, 0.3]
    bias = [0.0, 0.0, 0.3, 0.3, -0.4, 0.0, 0.0, 0.45]
    # biased: [.9 .1 | .8 .9 | .4 .7 | .2 .75]; group = sum of top-2: 1.0, 1.7, 1.1, 0.95 -> groups 1 and 2
    # candidates 2 (.8), 3 (.9), 4 (.4), 5 (.7) -> experts 3, 2 (expert 0 at .9 is in a dropped group)
    gate, x = _gate_with_scores(scores, bias, n_group=4, topk_group=2, num_experts_per_tok=2)
    w, idx = gate(x)
    assert sorted(idx[0].tolist()) == [2, 3]
    order = idx[0].argsort()
    expected = torch.tensor([0.5, 0.6]) / 1.1 * 2.5           # unbiased affinities, normalised, x 2.5
    assert torch.allclose(w[0][order], expected, atol=1e-6)


def test_gate_without_bias_picks_other_groups():
    scores = [0.9, 0.1, 0.5, 0.6, 0.8, 0.7, 0.2, 0.3]
    # groups: 1.0, 1.1, 1.5, 0.5 -> groups 2 and 1 -> experts 4 (.8), 5 (.7)
    gate, x = _gate_with_scores(scores, [0.0] * 8, n_group=4, topk_group=2, num_experts_per_tok=2)
    w, idx = gate(x)
    assert sorted(idx[0].tolist()) == [4, 5]
    assert torch.allclose(w[0].sum(), torch.tensor(2.5))
    # without group limiting the same token goes to experts 0 and 4
    gate, x = _gate_with_scores(scores, [0.0] * 8, n_group=1, topk_group=1, num_experts_per_tok=2)
    assert sorted(gate(x)[1][0].tolist()) == [0, 4]


def test_gate_negative_biased_scores_are_never_chosen_from_dropped_groups():
    """-inf masking (spec 1.6 step 4): with 0.0 masking a dropped group would win when kept scores are negative."""
    scores = [0.05, 0.05, 0.9, 0.9, 0.06, 0.06, 0.9, 0.9]
    bias = [-0.5, -0.5, 0.0, 0.0, -0.5, -0.5, 0.0, 0.0]
    gate, x = _gate_with_scores(scores, bias, n_group=4, topk_group=2, num_experts_per_tok=4)
    # groups 1 and 3 win (1.8 each); all four chosen experts come from them
    assert sorted(gate(x)[1][0].tolist()) == [2, 3, 6, 7]
    gate, x = _gate_with_scores(scores, bias, n_group=4, topk_group=1, num_experts_per_tok=2)
    assert set(gate(x)[1][0].tolist()) <= {2, 3, 6, 7}


def test_gate_bias_stays_fp32_under_bf16():
    gate = Gate(tiny_config())
    gate.to(torch.bfloat16)
    assert gate.weight.dtype == torch.bfloat16
    assert gate.e_score_correction_bias.dtype == torch.float32


def _dense_reference(x, weights, idx, experts):
    """float64: every expert on every token, combined through a dense (N, E) weight matrix."""
    E = experts.gate_proj.shape[0]
    dense_w = torch.zeros(x.shape[0], E, dtype=torch.float64).scatter(1, idx, weights.double())
    g, u, d = (p.double() for p in (experts.gate_proj, experts.up_proj, experts.down_proj))
    h = F.silu(torch.einsum("nd,eid->eni", x.double(), g)) * torch.einsum("nd,eid->eni", x.double(), u)
    y = torch.einsum("eni,edi->end", h, d)
    return torch.einsum("ne,end->nd", dense_w, y)


@pytest.mark.parametrize("use_grouped_mm", [True, False])
def test_grouped_experts_match_dense_reference_fwd_bwd(use_grouped_mm, monkeypatch):
    torch.manual_seed(0)
    cfg = tiny_config(n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2)
    experts = Experts(cfg)
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=0.1)
    N = 37
    x = torch.randn(N, cfg.hidden_size, requires_grad=True)
    logits = torch.randn(N, 16)
    logits[:, 5] = -1e9    # expert 5 receives no token: empty segments must work
    idx = logits.topk(4, dim=-1).indices
    weights = torch.rand(N, 4, requires_grad=True)
    counts = torch.bincount(idx.flatten(), minlength=16)
    import dsv3.model.moe as moe
    monkeypatch.setattr(moe, "_grouped_mm_supported", lambda t: use_grouped_mm)
    y = experts(x, weights, idx, counts)

    x64 = x.detach().double().requires_grad_()
    w64 = weights.detach().double().requires_grad_()
    ref_experts = Experts(cfg).double()
    ref_experts.load_state_dict({k: v.double() for k, v in experts.state_dict().items()})
    ref = _dense_reference(x64, w64, idx, ref_experts)
    rel = ((y.double() - ref).norm() / ref.norm()).item()
    assert rel < 1e-5, rel

    grad = torch.randn_like(ref)
    (y * grad.float()).sum().backward()
    (ref * grad).sum().backward()
    for ours, theirs in [(x.grad, x64.grad), (weights.grad, w64.grad),
                         (experts.gate_proj.grad, ref_experts.gate_proj.grad),
                         (experts.down_proj.grad, ref_experts.down_proj.grad)]:
        rel = ((ours.double() - theirs).norm() / theirs.norm()).item()
        assert rel < 1e-5, rel
    assert experts.gate_proj.grad[5].abs().max() == 0


def test_expert_ffn_paths_agree():
    torch.manual_seed(1)
    E, D, I = 6, 16, 8
    g, u, d = torch.randn(E, I, D), torch.randn(E, I, D), torch.randn(E, D, I)
    counts = torch.tensor([3, 0, 5, 1, 0, 7])
    x = torch.randn(int(counts.sum()), D)
    a = expert_ffn(x, counts, g, u, d, use_grouped_mm=True)
    b = expert_ffn(x, counts, g, u, d, use_grouped_mm=False)
    assert torch.allclose(a, b, atol=1e-4, rtol=1e-5)


def test_moe_counts_tokens_per_expert():
    from dsv3.model import MoE
    torch.manual_seed(0)
    cfg = tiny_config()
    moe = MoE(cfg)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.1)
    moe.tokens_per_expert.zero_()
    x = torch.randn(2, 5, cfg.hidden_size)
    moe(x)
    moe(x)
    _, idx = moe.gate(x.view(-1, cfg.hidden_size))
    assert torch.equal(moe.tokens_per_expert, 2 * torch.bincount(idx.flatten(), minlength=cfg.n_routed_experts))
    assert int(moe.tokens_per_expert.sum()) == 2 * 10 * cfg.num_experts_per_tok   # no token dropped


def test_expert_dispatch_and_combine_pass_gradcheck():
    """The gather-only dispatch/combine autograd functions against numerical derivatives (float64, loop path)."""
    cfg = tiny_config(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=3, hidden_size=5, n_group=1,
                      topk_group=1)
    experts = Experts(cfg).double()
    torch.manual_seed(0)
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=0.5)
    x = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    w = torch.rand(6, 2, dtype=torch.float64, requires_grad=True)
    idx = torch.stack([torch.randperm(4)[:2] for _ in range(6)])
    counts = torch.bincount(idx.flatten(), minlength=4)
    assert torch.autograd.gradcheck(lambda x, w, g: experts(x, w, idx, counts), (x, w, experts.gate_proj))


@pytest.mark.parametrize("M,E", [(1, 8), (7, 8), (192, 64), (300, 256)])    # the last one takes the sort path
def test_expert_order_is_the_stable_sort_by_expert(M, E):
    from dsv3.model.moe import expert_order
    g = torch.Generator().manual_seed(M)
    flat = torch.randint(0, E, (M,), generator=g)
    flat[: M // 2] = flat[0]                              # many ties: stability matters
    counts = torch.bincount(flat, minlength=E)
    order, inverse = expert_order(flat, counts)
    want = sorted(range(M), key=lambda i: (int(flat[i]), i))
    assert order.tolist() == want
    assert torch.equal(order[inverse], torch.arange(M)) and torch.equal(inverse[order], torch.arange(M))
