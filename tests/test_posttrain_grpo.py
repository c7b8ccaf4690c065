"""GRPO loss terms against hand values and float64 formulas written here (per token, in plain Python), for each
switch; one optimiser step on a tiny dsv3 model moves log-probs in the advantages' direction."""

import math

import pytest
import torch

from conftest import build, tiny_config
from dsv3.posttrain.grpo_loss import (dynamic_sampling_mask, group_advantages, kl_estimate, overlong_filter,
                                      policy_loss, sequence_logprobs)


def test_group_advantages_hand_values():
    r = torch.tensor([1.0, 0.0, 2.0, 2.0, 0.0, 3.0])
    # group 1: mean .5, unbiased std sqrt(.5); group 2: all equal -> 0; group 3: mean 1.5, std sqrt(4.5)
    a = group_advantages(r, G=2)
    s = math.sqrt(0.5)
    want = [0.5 / s, -0.5 / s, 0.0, 0.0, -1.5 / math.sqrt(4.5), 1.5 / math.sqrt(4.5)]
    assert a.tolist() == pytest.approx(want, rel=1e-5)
    # Dr. GRPO: centred only
    assert group_advantages(r, G=2, scale_std=False).tolist() == pytest.approx([0.5, -0.5, 0, 0, -1.5, 1.5])
    r4 = torch.tensor([1.0, 0.0, 0.0, 0.0])
    assert group_advantages(r4, G=4, scale_std=False).tolist() == pytest.approx([0.75, -0.25, -0.25, -0.25])
    assert group_advantages(r4, G=4).tolist() == pytest.approx([1.5, -0.5, -0.5, -0.5], rel=1e-5)  # std = 0.5


def test_dynamic_sampling_and_overlong():
    r = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0])
    assert dynamic_sampling_mask(r, G=2).tolist() == [False, False, True, True, False, False]
    mask = torch.ones(3, 4, dtype=torch.bool)
    out = overlong_filter(mask, torch.tensor([False, True, False]))
    assert out.tolist() == [[True] * 4, [False] * 4, [True] * 4]


def _reference(new, old, adv, mask, ref, eps_low, eps_high, beta, est, agg):
    """float64, one token at a time."""
    per_seq, tot, ntok, clipped, kls = [], 0.0, 0, 0, 0.0
    for i in range(len(new)):
        row = []
        for t in range(len(new[i])):
            if not mask[i][t]:
                continue
            rho = math.exp(new[i][t] - old[i][t])
            obj = min(rho * adv[i], min(max(rho, 1 - eps_low), 1 + eps_high) * adv[i])
            kl = 0.0
            if ref is not None:
                kl = (new[i][t] - ref[i][t]) if est == "k1" else \
                    math.exp(ref[i][t] - new[i][t]) - (ref[i][t] - new[i][t]) - 1
            loss = -obj + beta * kl
            row.append(loss)
            tot += loss
            ntok += 1
            kls += kl
            clipped += (rho < 1 - eps_low and adv[i] < 0) or (rho > 1 + eps_high and adv[i] > 0)
        if row:
            per_seq.append(sum(row) / len(row))
    value = tot / ntok if agg == "token" else sum(per_seq) / len(per_seq)
    return value, clipped / ntok, kls / ntok


@pytest.mark.parametrize("agg", ["token", "sequence"])
@pytest.mark.parametrize("eps_low,eps_high", [(0.2, 0.2), (0.2, 0.28), (0.1, 0.5)])
@pytest.mark.parametrize("beta,est", [(0.0, "k3"), (0.05, "k1"), (0.05, "k3")])
def test_policy_loss_matches_float64_formula(agg, eps_low, eps_high, beta, est):
    g = torch.Generator().manual_seed(0)
    N, T = 5, 7
    old = -torch.rand(N, T, generator=g, dtype=torch.float64) * 3
    new = old + torch.randn(N, T, generator=g, dtype=torch.float64) * 0.3    # ratios well outside the clip range
    ref = old + torch.randn(N, T, generator=g, dtype=torch.float64) * 0.2
    adv = torch.randn(N, generator=g, dtype=torch.float64)
    lengths = [7, 3, 5, 1, 6]            # ragged responses: the aggregations differ
    mask = torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]
    loss, stats = policy_loss(new, old, adv, mask, ref if beta else None, eps_low=eps_low, eps_high=eps_high,
                              beta=beta, kl_estimator=est, aggregation=agg)
    want, clip, kl = _reference(new.tolist(), old.tolist(), adv.tolist(), mask.tolist(),
                                ref.tolist() if beta else None, eps_low, eps_high, beta, est, agg)
    assert loss.item() == pytest.approx(want, rel=1e-12, abs=1e-12)
    assert stats["clip_fraction"].item() == pytest.approx(clip, abs=1e-12)
    assert 0 < clip < 1
    assert stats["kl"].item() == pytest.approx(kl, rel=1e-12, abs=1e-12)


def test_policy_loss_hand_values():
    # one token each; A = +1 and -1; ratio e^0.5 = 1.6487 (clipped at 1.2 for A>0), e^-0.5 = 0.6065 (clipped at 0.8
    # for A<0) -> per-token losses -1.2 and +0.8
    new = torch.tensor([[0.5], [-0.5]], dtype=torch.float64)
    old = torch.zeros(2, 1, dtype=torch.float64)
    loss, stats = policy_loss(new, old, torch.tensor([1.0, -1.0], dtype=torch.float64), torch.ones(2, 1, dtype=bool))
    assert loss.item() == pytest.approx((-1.2 + 0.8) / 2)
    assert stats["clip_fraction"].item() == 1.0
    # unclipped side: A>0 with ratio < 1 and A<0 with ratio > 1 keep the ratio: -0.6065*1, +1.6487*1 -> not clipped
    loss, stats = policy_loss(-new, old, torch.tensor([1.0, -1.0], dtype=torch.float64), torch.ones(2, 1, dtype=bool))
    assert loss.item() == pytest.approx((-math.exp(-0.5) + math.exp(0.5)) / 2)
    assert stats["clip_fraction"].item() == 0.0
    # k1 / k3 by hand: log pi = -1, log pi_ref = -2 -> k1 = 1, k3 = e^-1 + 1 - 1 = 0.3679
    lp, lr = torch.tensor([[-1.0]]), torch.tensor([[-2.0]])
    assert kl_estimate(lp, lr, "k1").item() == pytest.approx(1.0)
    assert kl_estimate(lp, lr, "k3").item() == pytest.approx(math.exp(-1))
    # beta: ratio 1, A = 0: the loss is beta * k3
    loss, stats = policy_loss(lp, lp, torch.zeros(1), torch.ones(1, 1, dtype=bool), lr, beta=0.1)
    assert loss.item() == pytest.approx(0.1 * math.exp(-1))
    assert stats["kl"].item() == pytest.approx(math.exp(-1))
    with pytest.raises(ValueError, match="logp_ref"):
        policy_loss(lp, lp, torch.zeros(1), torch.ones(1, 1, dtype=bool), beta=0.1)


def test_token_vs_sequence_aggregation_by_hand():
    # ratio 1 everywhere, so the per-token loss is -A: row 0 (A=1) has 3 tokens, row 1 (A=-1) has 1
    z = torch.zeros(2, 3)
    mask = torch.tensor([[True, True, True], [True, False, False]])
    adv = torch.tensor([1.0, -1.0])
    assert policy_loss(z, z, adv, mask, aggregation="token")[0].item() == pytest.approx((-3 + 1) / 4)
    assert policy_loss(z, z, adv, mask, aggregation="sequence")[0].item() == pytest.approx((-1 + 1) / 2)
    # a row with no loss tokens (filtered) is left out of the sequence mean
    mask3 = torch.cat([mask, torch.zeros(1, 3, dtype=torch.bool)])
    loss = policy_loss(torch.zeros(3, 3), torch.zeros(3, 3), torch.tensor([1.0, -1.0, 5.0]), mask3,
                       aggregation="sequence")[0]
    assert loss.item() == pytest.approx(0.0)


def test_sequence_logprobs_matches_log_softmax():
    torch.manual_seed(0)
    model = build(tiny_config(num_nextn_predict_layers=0), dtype=torch.float64)
    ids = torch.randint(0, 128, (3, 10))
    resp = torch.zeros(3, 10, dtype=torch.bool)
    resp[:, 4:] = True
    lp = sequence_logprobs(model, ids, resp, temperature=0.7)
    with torch.no_grad():
        for i in range(3):   # row by row, full softmax, position by position
            logits = model(ids[i:i + 1]).double()[0] / 0.7
            for t in range(10):
                want = torch.log_softmax(logits[t - 1], -1)[ids[i, t]].item() if resp[i, t] else 0.0
                assert lp[i, t].item() == pytest.approx(want, abs=1e-9)
    lp2, ent = sequence_logprobs(model, ids, resp, temperature=0.7, with_entropy=True)
    assert torch.equal(lp2, lp)
    with torch.no_grad():
        p = torch.softmax(model(ids[:, :-1]).double() / 0.7, -1)
        want = -(p * p.log()).sum(-1)                    # entropy of the distribution at each position
    assert torch.allclose(ent[:, 1:], want * resp[:, 1:], atol=1e-9) and (ent[:, 0] == 0).all()
    z = torch.zeros(3, 10, dtype=torch.float64)
    stats = policy_loss(z, z, torch.zeros(3, dtype=torch.float64), resp, entropy=ent)[1]
    assert stats["entropy"].item() == pytest.approx(want[:, 3:].mean().item(), rel=1e-9)


def test_one_grpo_step_moves_logprobs_with_the_advantage():
    cfg = tiny_config(num_nextn_predict_layers=0)
    model = build(cfg, seed=1).train()
    torch.manual_seed(1)
    N, T, P = 4, 12, 4
    ids = torch.randint(0, cfg.vocab_size, (N, T))
    resp = torch.zeros(N, T, dtype=torch.bool)
    resp[:, P:] = True
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0])
    adv = group_advantages(rewards, G=2)
    with torch.no_grad():
        old = sequence_logprobs(model, ids, resp)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    new = sequence_logprobs(model, ids, resp)
    loss, stats = policy_loss(new, old, adv, resp)
    assert stats["clip_fraction"].item() == 0 and stats["ratio_mean"].item() == pytest.approx(1.0)
    loss.backward()
    opt.step()
    with torch.no_grad():
        after = sequence_logprobs(model, ids, resp)
    delta = (after - old).sum(dim=1)
    assert (delta[adv > 0] > 0).all() and (delta[adv < 0] < 0).all(), delta
