"""Sampling, logprobs and speculative acceptance. Statistical checks use fixed seeds and ~200k draws over small
vocabularies, with a chi-square bound (df + 6 sqrt(2 df), ~6 sigma) and a total-variation bound; each test also
checks that plausible wrong implementations land far outside its tolerance, so the test has teeth."""

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dsv3.infer.sampling import (SamplingParams, SamplingTensors, _top_k_top_p, compute_logprobs,
                                 make_generators, rejection_sample, sample)

N = 200_000
TV_TOL = 0.015   # E[TV] of 50k-200k draws over <= 36 cells is <= ~0.006
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run through the device tool)")
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, CUDA])]


def tv(a: torch.Tensor, b: torch.Tensor) -> float:
    return 0.5 * (a.double() - b.double()).abs().sum().item()


def assert_matches(samples: torch.Tensor, probs: torch.Tensor, tol: float = TV_TOL) -> None:
    """samples (n,) int in [0, len(probs)) are draws from probs (float64)."""
    n, samples = samples.numel(), samples.cpu()
    counts = torch.bincount(samples, minlength=probs.numel()).double()
    assert counts[probs == 0].sum() == 0, "sampled a token of probability 0"
    nz = probs > 0
    expected = n * probs[nz]
    chi2 = ((counts[nz] - expected) ** 2 / expected).sum().item()
    df = int(nz.sum()) - 1
    assert chi2 <= df + 6 * math.sqrt(2 * df) + 1e-6, f"chi2 {chi2:.1f} with df {df}"
    assert tv(counts / n, probs) < tol


def ref_filtered(logits: torch.Tensor, t: float, k: int, p: float) -> torch.Tensor:
    """Independent float64 reference: softmax(logits / t) restricted to the top k, renormalised, then the smallest
    prefix (by descending prob) with mass >= p, renormalised."""
    probs = (logits.double() / t).softmax(-1)
    order = probs.argsort(descending=True)
    keep = torch.zeros_like(probs, dtype=torch.bool)
    keep[order[: k or len(probs)]] = True
    probs = torch.where(keep, probs, 0.0)
    probs /= probs.sum()
    if p < 1:
        mass, keep = 0.0, torch.zeros_like(keep)
        for i in order.tolist():
            if mass >= p or probs[i] == 0:
                break
            keep[i], mass = True, mass + probs[i].item()
        probs = torch.where(keep, probs, 0.0)
        probs /= probs.sum()
    return probs


LOGITS8 = torch.tensor([0.5, -1.0, 2.0, 0.0, 1.2, -3.0, 1.5, -0.5])   # unsorted, so a scatter bug shows


@pytest.mark.parametrize("device", DEVICES)
def test_sample_matches_filtered_softmax(device):
    torch.manual_seed(0)
    configs = [(0.7, 0, 1.0), (1.5, 3, 1.0), (1.0, 0, 0.8), (2.0, 5, 0.85)]
    m = N // len(configs)
    temps = torch.tensor([c[0] for c in configs]).repeat_interleave(m)
    ks = torch.tensor([c[1] for c in configs]).repeat_interleave(m)
    ps = torch.tensor([c[2] for c in configs]).repeat_interleave(m)
    out = sample(LOGITS8.expand(len(temps), -1).to(device), temps.to(device), ks.to(device), ps.to(device))
    assert out.dtype == torch.int64 and out.shape == (len(temps),)
    for i, (t, k, p) in enumerate(configs):
        want = ref_filtered(LOGITS8, t, k, p)
        assert_matches(out[i * m:(i + 1) * m], want)
        # teeth: ignoring temperature, top-k or top-p each moves the distribution well past the tolerance
        wrong = [ref_filtered(LOGITS8, 1.0, k, p)] if t != 1 else []
        wrong += [ref_filtered(LOGITS8, t, 0, p)] if k else []
        wrong += [ref_filtered(LOGITS8, t, k, 1.0)] if p < 1 else []
        assert all(tv(w, want) > 3 * TV_TOL for w in wrong)


def test_top_k_keeps_exactly_k_and_top_p_the_minimal_nucleus():
    torch.manual_seed(1)
    logits = torch.randn(5, 50)
    kept = torch.isfinite(_top_k_top_p(logits, torch.tensor([1, 5, 17, 50, 0]), torch.ones(5)))
    assert kept.sum(-1).tolist() == [1, 5, 17, 50, 50]
    for row, k in zip(range(4), [1, 5, 17, 50]):
        assert set(kept[row].nonzero().flatten().tolist()) == set(logits[row].topk(k).indices.tolist())
    probs = torch.tensor([0.15, 0.5, 0.05, 0.3])   # sorted: 1 (0.5), 3 (0.3), 0 (0.15), 2 (0.05)
    cases = [(0, 0.45, {1}), (0, 0.79, {1, 3}), (0, 0.81, {1, 3, 0}), (0, 0.96, {0, 1, 2, 3}), (0, 1.0, {0, 1, 2, 3}),
             # top-p acts on the top-k-renormalised probs (0.625, 0.375): 0.6 keeps one token (on the raw probs,
             # whose first token has only 0.5, it would keep two)
             (2, 0.6, {1}), (2, 0.9, {1, 3})]
    got = _top_k_top_p(probs.log().expand(len(cases), -1), torch.tensor([c[0] for c in cases]),
                       torch.tensor([c[1] for c in cases]))
    for row, (_, _, want) in zip(got, cases):
        assert set(torch.isfinite(row).nonzero().flatten().tolist()) == want


def test_greedy_rows_are_argmax_in_a_mixed_batch():
    torch.manual_seed(2)
    logits = torch.randn(6, 100) * 3
    temps = torch.tensor([0.0, 1.0, 0.0, 0.5, 0.0, 1e-7])
    # greedy rows ignore top-k/top-p (here set to values that would exclude the argmax if misapplied to sorted order)
    out = sample(logits, temps, torch.tensor([3, 0, 0, 5, 1, 2]), torch.tensor([0.1, 1.0, 0.5, 0.9, 1.0, 0.2]))
    greedy = temps < 1e-5
    assert torch.equal(out[greedy], logits.argmax(-1)[greedy])
    assert ((out >= 0) & (out < 100)).all()
    # sampled rows really sample: at T=5 one row's 2000 draws cover many tokens
    many = sample(logits[1].expand(2000, -1), torch.full((2000,), 5.0), torch.zeros(2000, dtype=torch.long),
                  torch.ones(2000))
    assert many.unique().numel() > 50


def test_empty_batch():
    z = torch.zeros(0, dtype=torch.long)
    assert sample(torch.zeros(0, 10), torch.zeros(0), z, torch.zeros(0)).shape == (0,)
    assert sample(torch.zeros(0, 10), torch.zeros(0), z, torch.zeros(0), []).shape == (0,)
    toks, n = rejection_sample(torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2, 5), torch.zeros(0, 3, 5))
    assert toks.shape == (0, 3) and n.shape == (0,)


def test_per_request_seeds_reproducible_whatever_the_batch():
    torch.manual_seed(3)
    V, steps = 1000, 12
    mine = torch.randn(V)
    others = torch.randn(3, V)

    def run(params, logits, row):
        temps, ks, ps = SamplingTensors.from_params(params, "cpu")
        gens = make_generators(params, "cpu")
        toks = []
        for s in range(steps):
            torch.manual_seed(100 + s * len(params))   # the global generator must not matter for seeded rows
            toks.append(sample(logits, temps, ks, ps, gens)[row].item())
        return toks

    me = SamplingParams(temperature=1.2, top_k=500, top_p=0.95, seed=7)
    alone = run([me], mine[None], 0)
    batch = [SamplingParams(seed=1), SamplingParams(), me, SamplingParams(seed=7, temperature=0.5)]
    assert run(batch, torch.cat([others[:2], mine[None], others[2:]]), 2) == alone
    assert run([me, SamplingParams(temperature=0)], torch.stack([mine, others[0]]), 0) == alone
    assert run([SamplingParams(temperature=1.2, top_k=500, top_p=0.95, seed=8)], mine[None], 0) != alone
    # the same holds for rejection sampling: a row's uniforms and residual draw come from its own generator
    p = torch.randn(4, 3, 20).softmax(-1)
    q = torch.randn(4, 2, 20).softmax(-1)
    d = torch.randint(0, 20, (4, 2))
    a = rejection_sample(d[2:3], q[2:3], p[2:3], [torch.Generator().manual_seed(5)])
    b = rejection_sample(d, q, p, [None, torch.Generator().manual_seed(9), torch.Generator().manual_seed(5), None])
    assert torch.equal(a[0][0], b[0][2]) and a[1][0] == b[1][2]


class NoSync(TorchDispatchMode):
    """Fails on ops that need the host to wait for the device: .item()/.tolist()/bool(t) (_local_scalar_dense) and
    data-dependent shapes (nonzero, masked_select)."""
    banned = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default,
              torch.ops.aten.masked_select.default}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.banned:
            raise AssertionError(f"host sync: {func}")
        return func(*args, **(kwargs or {}))


def _hot_inputs(device):
    """Host-side setup (the H2D copies of from_params are once per batch composition, not in the hot path)."""
    torch.manual_seed(0)
    params = [SamplingParams(temperature=0), SamplingParams(top_k=5), SamplingParams(top_p=0.5, seed=1),
              SamplingParams()]
    ints = lambda *shape: torch.randint(0, 64, shape, device=device)
    probs = lambda *shape: torch.rand(*shape, device=device).softmax(-1)
    return (torch.randn(4, 64, device=device), SamplingTensors.from_params(params, device),
            make_generators(params, device), ints(4, 3), ints(4, 4), probs(4, 3, 64), probs(4, 4, 64))


def _hot_path(logits, st, gens, draft, target_argmax, q, p):
    tokens = sample(logits, *st, gens)
    compute_logprobs(logits, tokens, 5)
    rejection_sample(draft, q, p, gens)


def test_no_host_sync_cpu():
    inputs = _hot_inputs("cpu")
    with NoSync():
        _hot_path(*inputs)
        with pytest.raises(AssertionError, match="host sync"):   # the mode does catch a sync
            torch.ones(2).sum().item()


@pytest.mark.gpu
@CUDA
def test_no_host_sync_cuda():
    inputs = _hot_inputs("cuda")
    _hot_path(*inputs)   # warm up (lazy init may sync)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _hot_path(*inputs)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_compute_logprobs_matches_float64():
    torch.manual_seed(4)
    logits = torch.randn(5, 300) * 6
    tokens = torch.randint(0, 300, (5,))
    ref = logits.double().log_softmax(-1)
    lp, ids, top = compute_logprobs(logits, tokens, 4)
    assert torch.allclose(lp.double(), ref[torch.arange(5), tokens], atol=1e-5)
    assert torch.equal(ids, ref.topk(4).indices)
    assert torch.allclose(top.double(), ref.topk(4).values, atol=1e-5)
    lp16, _, _ = compute_logprobs(logits.bfloat16(), tokens, 2)   # low-precision logits are upcast first
    assert torch.allclose(lp16.double(), logits.bfloat16().double().log_softmax(-1)[torch.arange(5), tokens], atol=1e-5)
    lp0, ids0, top0 = compute_logprobs(logits, tokens, 0)
    assert ids0.shape == (5, 0) and top0.shape == (5, 0) and torch.equal(lp0, lp)


def test_rejection_sample_with_one_hot_target_is_greedy_verification():
    """A greedy request's target is one-hot: keep the longest prefix of drafts equal to the target's argmax, then
    the argmax at the first mismatch (or the bonus token), then -1. Expected values written out by hand."""
    draft = torch.tensor([[1, 2, 3], [1, 2, 3], [1, 9, 3], [7, 2, 3]])
    target = torch.tensor([[1, 2, 3, 4], [1, 2, 5, 6], [1, 2, 3, 4], [1, 2, 3, 4]])
    one_hot = lambda t: torch.nn.functional.one_hot(t, 10).double()  # noqa: E731
    tokens, n = rejection_sample(draft, one_hot(draft), one_hot(target))
    assert n.tolist() == [3, 2, 1, 0]   # all accepted (+ bonus 4); mismatch at 2; at 1; at 0
    assert tokens.tolist() == [[1, 2, 3, 4], [1, 2, 5, -1], [1, 2, -1, -1], [1, -1, -1, -1]]
    tokens, n = rejection_sample(torch.zeros(2, 0, dtype=torch.long), torch.zeros(2, 0, 10),
                                 one_hot(torch.tensor([[5], [6]])))                      # k = 0
    assert tokens.tolist() == [[5], [6]] and n.tolist() == [0, 0]


P0 = torch.tensor([0.30, 0.05, 0.25, 0.02, 0.28, 0.10], dtype=torch.float64)   # target
Q0 = torch.tensor([0.10, 0.30, 0.20, 0.15, 0.05, 0.20], dtype=torch.float64)   # draft
P1 = torch.tensor([0.05, 0.40, 0.05, 0.30, 0.10, 0.10], dtype=torch.float64)   # target's bonus distribution


@pytest.mark.parametrize("device", DEVICES)
def test_rejection_sample_k1_emits_target_distribution(device):
    torch.manual_seed(5)
    x = torch.multinomial(Q0.float(), N, replacement=True)[:, None]
    tokens, n = rejection_sample(x.to(device), Q0.float().expand(N, 1, -1).to(device),
                                 torch.stack([P0, P1]).float().expand(N, -1, -1).to(device))
    tokens, n = tokens.cpu(), n.cpu()
    assert_matches(tokens[:, 0], P0)
    beta = torch.minimum(P0, Q0).sum().item()   # 0.62: expected acceptance rate
    assert abs((n == 1).double().mean().item() - beta) < 0.005   # 5 sigma of a 200k-draw Bernoulli mean is 0.0054
    assert_matches(tokens[n == 1, 1], P1)       # bonus token after an acceptance
    assert (tokens[n == 0, 1] == -1).all()
    # teeth: always accepting emits Q0; drawing the replacement from p instead of max(0, p - q) emits
    # min(p, q) + (1 - beta) p. Both are far outside the tolerance.
    assert tv(Q0, P0) > 0.3 and tv(torch.minimum(P0, Q0) + (1 - beta) * P0, P0) > 0.1


@pytest.mark.parametrize("device", DEVICES)
def test_rejection_sample_k2_emits_target_joint(device):
    """Two drafts with context-dependent tables: the emitted (first, second) pair, where the second comes from the
    next target step when the first draft was rejected, is distributed as p0(a) p1(b | a)."""
    torch.manual_seed(6)
    V = 6
    p0, q0 = P0, Q0
    p1 = (torch.randn(V, V, dtype=torch.float64) * 1.5).softmax(-1)       # p1[a] = target given first token a
    q1 = (torch.randn(V, V, dtype=torch.float64) * 1.5).softmax(-1)
    p2 = (torch.randn(V, V, V, dtype=torch.float64) * 1.5).softmax(-1)    # bonus given (a, b)
    x0 = torch.multinomial(q0, N, replacement=True)
    x1 = torch.multinomial(q1[x0], 1).squeeze(1)
    draft_probs = torch.stack([q0.expand(N, V), q1[x0]], 1).float()
    target_probs = torch.stack([p0.expand(N, V), p1[x0], p2[x0, x1]], 1).float()
    tokens, n = rejection_sample(torch.stack([x0, x1], 1).to(device), draft_probs.to(device), target_probs.to(device))
    tokens, n = tokens.cpu(), n.cpu()
    first = tokens[:, 0]
    second = torch.where(n >= 1, tokens[:, 1], torch.multinomial(p1[first], 1).squeeze(1))
    joint = (p0[:, None] * p1).flatten()
    assert_matches(first * V + second, joint)
    assert ((tokens >= 0).sum(1) == n + 1).all() and (n <= 2).all()
    acc = (n == 2)   # all accepted: the bonus follows p2 given the two drafts; check its marginal
    assert_matches(tokens[acc, 2], (p2[x0[acc], x1[acc]]).mean(0))
    # teeth: always accepting would emit q0(a) q1(b | a)
    assert tv((q0[:, None] * q1).flatten(), joint) > 0.3


def test_rejection_sample_zero_draft_prob_is_safe():
    p = torch.tensor([[[0.5, 0.5, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25]]]).expand(1000, -1, -1)
    # q(x) = 0 and p(x) = 0 with p == q: rejected, and the all-zero residual falls back to p
    tokens, n = rejection_sample(torch.full((1000, 1), 2), p[:, :1], p)
    assert (n == 0).all() and set(tokens[:, 0].tolist()) == {0, 1}
    # q(x) = 0 but p(x) > 0: accepted (the limit p/q -> inf), no nan anywhere
    q = torch.tensor([[[0.0, 0.0, 1.0, 0.0]]]).expand(1000, -1, -1)
    tokens, n = rejection_sample(torch.full((1000, 1), 1), q, p)
    assert (n == 1).all() and (tokens[:, 0] == 1).all() and ((tokens[:, 1] >= 0) & (tokens[:, 1] < 4)).all()


@pytest.mark.parametrize("kwargs, field", [
    (dict(temperature=-0.1), "temperature"), (dict(temperature=float("nan")), "temperature"),
    (dict(temperature=float("inf")), "temperature"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(top_p=float("nan")), "top_p"), (dict(top_k=-1), "top_k"), (dict(top_k=2.5), "top_k"),
    (dict(max_tokens=0), "max_tokens"), (dict(seed="1"), "seed"), (dict(seed=1.0), "seed"),
    (dict(logprobs=-1), "logprobs"), (dict(logprobs=21), "logprobs"), (dict(prompt_logprobs=-1), "prompt_logprobs"),
    (dict(prompt_logprobs=100), "prompt_logprobs"), (dict(stop=[""]), "stop"), (dict(stop=[1]), "stop"),
    (dict(stop_token_ids=["a"]), "stop_token_ids"), (dict(ignore_eos=1), "ignore_eos")])
def test_sampling_params_errors_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"^{field}\b"):
        SamplingParams(**kwargs)


def test_sampling_params_validate():
    sp = SamplingParams(temperature=0, top_k=3, seed=2**64 - 1, stop="###", stop_token_ids=[0, 99], logprobs=5)
    assert sp.stop == ["###"] and sp.greedy and not SamplingParams().greedy
    sp.validate(100)
    with pytest.raises(ValueError, match="stop_token_ids"):
        sp.validate(99)
    with pytest.raises(ValueError, match="logprobs"):
        SamplingParams(logprobs=5).validate(4)
    sp.top_p = 2.0   # assigned after construction: validate re-checks
    with pytest.raises(ValueError, match="top_p"):
        sp.validate(100)
