"""Decode-speed paths of the engine against the plain engine: the fused MoE decode kernel (`fused_moe="on"`: the
PyTorch reference of dsv3.kernels.moe_decode on CPU) and the torch.compile'd decode layers (`compile_decode`, inductor
on CPU), both through the padded graph buckets run eagerly (capture=False, as test_infer_engine does)."""

import pytest
import torch

from conftest import build, random_prompts, tiny_config
from dsv3.infer import Engine, EngineConfig, SamplingParams, moe_dispatch
from dsv3.infer.graphs import BATCH_BUCKETS
from dsv3.infer.moe_dispatch import (FUSED_MOE_AUTO_TOKENS, MOE_DECODE_MAX_TOKENS, expert_tensors,
                                     fused_moe_available, fused_moe_for)
from dsv3.model.moe import MoE

PARAMS = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


prompts = random_prompts


def greedy(model, ps, padded=True, **kw):
    engine = Engine(model, config=EngineConfig(**(dict(block_size=4, num_blocks=64) | kw)))
    if padded:
        engine.use_decode_graphs(capture=False)
    return [o.token_ids for o in engine.generate(ps, PARAMS)], engine


@pytest.fixture(scope="module")
def model():
    return build(tiny_config(vocab_size=96), seed=3, dtype=torch.float32)


def test_fused_moe_engine_equals_the_module_path(model):
    """Every MoE layer of every step through the fused kernel's reference: the same greedy tokens and the same
    routing loads as the MoE module's own forward (unpadded and padded batches)."""
    ps = prompts([1, 5, 9, 17])
    want, plain = greedy(model, ps, padded=False, fused_moe="off")
    for padded in (False, True):
        got, engine = greedy(model, ps, padded=padded, fused_moe="on")
        assert engine.runner.fused_moe and got == want
    loads = lambda m: [x.tokens_per_expert.clone() for x in m.modules() if isinstance(x, MoE)]  # noqa: E731
    for m in model.modules():
        if isinstance(m, MoE):
            m.tokens_per_expert.zero_()
    greedy(model, ps, padded=False, fused_moe="off")
    off = loads(model)
    for m in model.modules():
        if isinstance(m, MoE):
            m.tokens_per_expert.zero_()
    greedy(model, ps, padded=False, fused_moe="on")
    assert all(torch.equal(a, b) for a, b in zip(off, loads(model))) and sum(int(a.sum()) for a in off) > 0


def test_fused_moe_engine_with_fp8_weights():
    from dsv3.infer.fp8_weights import FP8Experts, quantize_weights
    lm = quantize_weights(build(tiny_config(vocab_size=96), seed=5, dtype=torch.float32))
    assert any(expert_tensors(m) is not None for m in lm.modules() if isinstance(m, FP8Experts))
    ps = prompts([3, 11], seed=2)
    assert greedy(lm, ps, fused_moe="on")[0] == greedy(lm, ps, padded=False, fused_moe="off")[0]


def _fp8_aligned_config(**kw):
    # 128-wide FFN and hidden size: FP8 blocks whole (I = I_s = 128; the shared MLP's gate / up fuse)
    shape = dict(hidden_size=128, num_attention_heads=8, num_key_value_heads=8, qk_nope_head_dim=8,
                 qk_rope_head_dim=8, v_head_dim=8, intermediate_size=128, moe_intermediate_size=128, q_lora_rank=None)
    return tiny_config(**{**shape, **kw, "vocab_size": 96})


def _moe_layer(kind):
    """An MoE layer (the model's second block) whose shared MLP is of `kind`, and whether it may fold."""
    from dsv3.infer.fp8_weights import quantize_weights
    from dsv3.infer.fused_proj import fuse_projections
    fp8 = kind.startswith("fp8")
    cfg = (_fp8_aligned_config(n_shared_experts=2) if kind != "fp8_ragged" else
           _fp8_aligned_config(moe_intermediate_size=96)) if fp8 else tiny_config(vocab_size=96, n_shared_experts=2)
    dtype = torch.bfloat16 if kind in ("bf16_fused", "fp8_fused", "fp8_ragged") else torch.float32
    m = build(cfg, seed=7, dtype=dtype)
    if fp8:
        quantize_weights(m)
    if kind != "fp32_plain":
        fuse_projections(m, gemv=kind == "fp32_fused")   # GemvLinear down_proj too: still a plain linear weight
    mlp = m.layers[1].mlp
    assert isinstance(mlp, MoE)
    return mlp, kind != "fp8_ragged", dtype


@pytest.mark.parametrize("kind", ["fp32_plain", "fp32_fused", "bf16_fused", "fp8_fused", "fp8_ragged"])
@pytest.mark.parametrize("tokens", [1, 2, 3])
def test_shared_pair_layer_equals_the_unfolded_layer(kind, tokens):
    """moe_ffn with the shared experts folded into the fused call (<= ROWS_MAX_TOKENS tokens; the CPU runs the
    kernel's reference) equals the fused call plus the shared MLP apart, and does not call the shared MLP; at 3
    tokens, or FP8 blocks that a 96-wide I would split, the shared MLP runs apart. Tolerance: fp32 sums in another
    order (1e-5 of the largest output); bf16 and FP8 (bf16 activations): the unfolded path rounds the shared MLP's
    gate / up, h and output and the routed sum to bf16 before adding, the fold rounds once after the fp32 sum of
    K + 1 rows (and h once), so they part by a few bf16 ulps (2^-8 each) of the largest term: 2e-2 of the output's
    largest magnitude."""
    from dsv3.infer.moe_dispatch import moe_ffn, shared_tensors
    mlp, foldable, dtype = _moe_layer(kind)
    calls = []
    mlp.shared_experts.register_forward_hook(lambda *a: calls.append(1))
    x = torch.randn(1, tokens, mlp.gate.weight.shape[1], generator=torch.Generator().manual_seed(tokens)).to(dtype)
    with torch.inference_mode():
        apart = moe_ffn(mlp, x, True, shared_pair=False).float()
        assert len(calls) == 1
        folded = moe_ffn(mlp, x, True).float()
        fold = foldable and tokens <= 2
        assert len(calls) == 1 + (not fold)
        assert (shared_tensors(mlp, expert_tensors(mlp.experts)) is not None) == foldable
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(folded, apart, atol=tol * apart.abs().max().item(), rtol=0)
    if fold and kind == "fp32_fused":       # the fold reads the fused gate-up buffer's views: no copy of a weight
        shared = shared_tensors(mlp, expert_tensors(mlp.experts))
        assert shared[0].data_ptr() == mlp.shared_experts.fused_weight.data_ptr()
        assert shared[1].data_ptr() == mlp.shared_experts.fused_weight[shared[0].shape[0]:].data_ptr()


def test_shared_pair_refuses_other_shared_mlps():
    """A biased linear, or weights in another dtype than the experts', keep the shared MLP apart."""
    from dsv3.infer.moe_dispatch import shared_tensors
    mlp, _, _ = _moe_layer("fp32_plain")
    tensors = expert_tensors(mlp.experts)
    assert shared_tensors(mlp, tensors) is not None
    mlp.shared_experts.down_proj.bias = torch.nn.Parameter(torch.zeros(mlp.shared_experts.down_proj.out_features))
    assert shared_tensors(mlp, tensors) is None
    mlp.shared_experts.down_proj.bias = None
    mlp.shared_experts.to(torch.bfloat16)
    assert shared_tensors(mlp, tensors) is None


@pytest.mark.parametrize("fp8", [False, True], ids=["fp32", "fp8"])
def test_shared_pair_engine_greedy_identical(fp8, monkeypatch):
    """The engine (fused_moe on: the kernel's reference on CPU) with shared_pair on and off: the same greedy tokens
    at decode batches 1 and 2 (the fold) and 3 (apart), eager and through the padded buckets; the fold did run."""
    from dsv3.infer.fp8_weights import quantize_weights
    from dsv3.infer.moe_dispatch import fused_moe_ffn, fused_moe_ffn_shared_apart
    base = build(_fp8_aligned_config() if fp8 else tiny_config(vocab_size=96, n_shared_experts=2), seed=5,
                 dtype=torch.float32)
    if fp8:
        quantize_weights(base)
    folds = []
    real = moe_dispatch.moe_decode

    def recording(*args):
        folds.append(len(args) > 9 and args[9] is not None)
        return real(*args)
    monkeypatch.setattr(moe_dispatch, "moe_decode", recording)
    for n in (1, 2, 3):
        ps = prompts([1 + 4 * i for i in range(n)], seed=n)
        outs = {}
        for on in (True, False):
            for padded in (False, True):
                folds.clear()
                got, engine = greedy(base, ps, padded=padded, fused_moe="on", shared_pair=on)
                assert engine.runner.ffn(1) is (fused_moe_ffn if on else fused_moe_ffn_shared_apart)
                assert any(folds) == (on and n <= 2), (on, n, padded)
                outs[on, padded] = got
        assert len({str(o) for o in outs.values()}) == 1, (n, outs)


def test_fused_moe_switch(model):
    assert not fused_moe_available(model, "auto")          # CPU: auto means CUDA only
    assert fused_moe_available(model, "on") and not fused_moe_available(model, "off")
    assert MOE_DECODE_MAX_TOKENS >= 256
    with pytest.raises(ValueError, match="EngineConfig.fused_moe"):
        EngineConfig(fused_moe="yes")
    assert EngineConfig().fused_moe == "auto"                                 # the default
    assert [EngineConfig(fused_moe=v).fused_moe for v in (True, False, "true", "false", "on", "off")] == \
        ["on", "off", "on", "off", "on", "off"]                               # TOML booleans spell on / off
    assert EngineConfig().shared_pair                                         # the default: folded at batch 1
    with pytest.raises(ValueError, match="EngineConfig.shared_pair"):
        EngineConfig(shared_pair="false")


def test_fused_moe_auto_picks_per_bucket():
    """auto: the fused kernel exactly for the buckets inside FUSED_MOE_AUTO_TOKENS (from the measured launch table:
    at least batch 1 to 32); on: every batch up to MOE_DECODE_MAX_TOKENS; off, or auto without the kernel: none."""
    lo, hi = FUSED_MOE_AUTO_TOKENS
    assert lo == 1 and 32 <= hi <= MOE_DECODE_MAX_TOKENS
    for b in BATCH_BUCKETS:
        assert fused_moe_for("auto", True, b) == (lo <= b <= hi), b
        assert fused_moe_for("on", True, b) == (b <= MOE_DECODE_MAX_TOKENS)
        assert not fused_moe_for("off", False, b) and not fused_moe_for("auto", False, b)


def test_fused_moe_auto_engine(model, monkeypatch):
    """An engine with fused_moe = auto (made available on the CPU: the kernel's reference) sends the forwards of the
    buckets inside the range, and only those, through the fused call, and its greedy tokens equal the module
    path's (fp32: the reference is exact)."""
    import dsv3.infer.runner as runner
    seen = []
    fused = runner.fused_moe_ffn

    def recording(mlp, x):
        seen.append(x.numel() // x.shape[-1])
        return fused(mlp, x)
    monkeypatch.setattr(runner, "fused_moe_available", lambda model, mode: mode != "off")
    monkeypatch.setattr(runner, "fused_moe_ffn", recording)
    # a narrow range, so that a bucket past it stays small on the CPU (the measured one reaches 256 tokens)
    monkeypatch.setattr(moe_dispatch, "FUSED_MOE_AUTO_TOKENS", (1, 4))
    lo, hi = moe_dispatch.FUSED_MOE_AUTO_TOKENS
    for n in (1, 3, hi + 1):                   # decode buckets 1 and 4 (fused), the next past hi (module)
        ps = prompts([1 + i % 3 for i in range(n)], seed=n)
        seen.clear()
        got, engine = greedy(model, ps, fused_moe="auto", num_blocks=4 * n)
        assert engine.runner.fused_moe
        buckets = {key[0] for key in engine.runner.graphs.buckets}
        assert len(buckets) == 1
        (b,) = buckets
        assert (b in seen) == (lo <= b <= hi) and all(lo <= t <= hi for t in seen), (b, seen)
        assert got == greedy(model, ps, padded=False, fused_moe="off")[0]


def test_compiled_decode_gives_the_eager_tokens(model):
    """Inductor (CPU) compiles the decode layers of the graph buckets: greedy tokens equal the eager engine's, the
    compiled functions did run (dynamo counted their frames), and the only graph breaks are the paged cache's opaque
    calls (its write and decode attention): everything else of a block is compiled."""
    from torch._dynamo.utils import counters
    ps = prompts([1, 5, 9])
    want, _ = greedy(model, ps, padded=False, fused_moe="off")
    before = counters["stats"]["unique_graphs"]
    counters["graph_break"].clear()
    # with the dense projections through the GEMV op too (dsv3.infer.fused_proj: its reference on the CPU)
    got, engine = greedy(model, ps, compile_decode=True, fused_moe="on", dense_gemv=True)
    assert got == want
    assert counters["stats"]["unique_graphs"] > before
    assert engine.runner.config.compile_decode
    breaks = list(counters["graph_break"])
    assert breaks and all("torch.compiler.disable" in b and ("PagedLatentCache.write" in b or
                                                              "PagedLatentCache.decode" in b) for b in breaks), breaks


def test_compiled_decode_with_the_shared_pair_gives_the_eager_tokens(model):
    """Batch-1 decode compiled (inductor, CPU) with the shared experts folded into the fused call (its reference op,
    the optional tensors traced through the op's fake implementation): the eager engine's tokens with the fold off,
    no graph break but the paged cache's."""
    from torch._dynamo.utils import counters
    ps = prompts([6])
    want, _ = greedy(model, ps, padded=False, fused_moe="on", shared_pair=False)
    counters["graph_break"].clear()
    got, engine = greedy(model, ps, compile_decode=True, fused_moe="on")
    assert got == want and engine.runner.config.shared_pair
    from dsv3.infer.moe_dispatch import shared_tensors
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    assert moes and all(shared_tensors(m, expert_tensors(m.experts)) is not None for m in moes)    # it did fold
    breaks = list(counters["graph_break"])
    assert all("PagedLatentCache.write" in b or "PagedLatentCache.decode" in b for b in breaks), breaks


# ---------------------------------------------------------------------------------------------------------------
# CUDA: the same paths captured in CUDA graphs, bf16 and FP8 block weights
# ---------------------------------------------------------------------------------------------------------------

class RoutingMargin:
    """Context: each row's smallest routing margin over the MoE calls inside it, i.e. the gap between the last
    group kept and the first dropped (V3's group score: the sum of a group's top-2 biased scores), and between the
    k-th and (k+1)-th biased score inside the kept groups, as `Gate.route` decides them. A row whose margin is below
    bf16's noise may be routed to other experts by a path that rounds its norms differently (inductor's fused ones).
    The twenty-first session's GPU-gate failure, one row of three off by 0.21, was such a tie: on the H200 that row's
    margin was 1.86e-4, the smallest of the twelve (RESULTS.md, twenty-second session)."""

    def __init__(self, model: torch.nn.Module):
        # the MoE's input as the norm before it writes it (a fused step calls the MoE through the runner's ffn)
        self.blocks = [m for m in model.modules() if isinstance(getattr(m, "mlp", None), MoE)]
        self.rows, self.hooks = None, []

    @staticmethod
    def margins(gate, x: torch.Tensor) -> torch.Tensor:
        """(N,) fp32: the smaller of the group-selection and expert-selection margins of each row of x (N, D)."""
        choice = torch.sigmoid(gate.logits(x).float()) + gate.e_score_correction_bias.float()
        grouped = choice.unflatten(-1, (gate.n_group, -1))                            # (N, G, E/G)
        groups = grouped.topk(2, dim=-1).values.sum(-1).topk(min(gate.topk_group + 1, gate.n_group), dim=-1)
        kept = torch.zeros(groups.values.shape[0], gate.n_group, dtype=torch.bool, device=x.device)
        kept.scatter_(1, groups.indices[:, :gate.topk_group], True)
        top = grouped.masked_fill(~kept[..., None], float("-inf")).flatten(1).topk(gate.top_k + 1, dim=-1).values
        g = gate.topk_group
        group_gap = groups.values[:, g - 1] - groups.values[:, g] if g < gate.n_group else torch.inf
        return torch.minimum(top[:, gate.top_k - 1] - top[:, gate.top_k], torch.as_tensor(group_gap))

    def _hook(self, gate, out):
        m = self.margins(gate, out.reshape(-1, out.shape[-1]))
        self.rows = m if self.rows is None else torch.minimum(self.rows, m)

    def __enter__(self):
        self.hooks = [b.post_attention_layernorm.register_forward_hook(
            lambda mod, args, out, gate=b.mlp.gate: self._hook(gate, out)) for b in self.blocks]
        return self

    def __exit__(self, *exc):
        for h in self.hooks:
            h.remove()

    def __str__(self) -> str:
        return ", ".join(f"{v:.2e}" for v in self.rows.tolist())


# a routing margin this small can flip between two correct paths: bf16 rounding moves a score by ~1e-4 here, and a
# quarter of the margin is what every score may move without a flip (test_routing_margin_bounds_what_can_flip_...)
ROUTING_TIE = 2e-3


def test_routing_margin_bounds_what_can_flip_the_routing(model):
    """The CUDA test below excuses rows by RoutingMargin: a change of every biased score by less than a quarter of a
    row's margin (a group's score sums two scores, and two groups move apart) must leave Gate.route's experts
    unchanged, and a made tie between the last kept group and the next reads as a margin of ~0."""
    gate = next(m for m in model.modules() if isinstance(m, MoE)).gate
    x = torch.randn(256, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    margin = RoutingMargin.margins(gate, x)
    assert (margin >= 0).all() and (margin > 1e-3).sum() > 200
    bias = gate.e_score_correction_bias.clone()
    want = gate.route(x)[1].sort(-1).values
    try:
        for seed in range(8):
            noise = torch.rand(bias.shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1
            for r in range(x.shape[0]):
                gate.e_score_correction_bias.copy_(bias + noise * margin[r] * 0.24)
                assert torch.equal(gate.route(x[r:r + 1])[1].sort(-1).values, want[r:r + 1]), (seed, r)
        # the tie: raise the best expert of the first dropped group until its group scores as the last kept one
        gate.e_score_correction_bias.copy_(bias)
        choice = (torch.sigmoid(gate.logits(x[:1]).float()) + bias).unflatten(-1, (gate.n_group, -1))[0]
        order = choice.topk(2, dim=-1).values.sum(-1).sort(descending=True)
        dropped = order.indices[gate.topk_group]
        best = dropped * choice.shape[1] + choice[dropped].argmax()
        gate.e_score_correction_bias[best] += order.values[gate.topk_group - 1] - order.values[gate.topk_group]
        assert RoutingMargin.margins(gate, x[:1]).item() < 1e-6
    finally:
        gate.e_score_correction_bias.copy_(bias)


def _cuda_ok() -> bool:
    from dsv3.kernels.triton_setup import HAS_TRITON
    return torch.cuda.is_available() and HAS_TRITON and torch.cuda.get_device_capability() >= (8, 9)


def replay_vs_eager(engine: Engine, model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor, RoutingMargin]:
    """One decode step of every running sequence, eager and replayed from its graph (the same rows, nothing
    advanced): (eager hidden states, replayed ones, the eager step's RoutingMargin)."""
    from dsv3.infer.runner import Row
    seqs = list(engine.scheduler.running)
    assert all(engine.blocks.ensure_capacity(s, s.num_cached_tokens + 1) for s in seqs)
    rows = [Row([s.token_ids[-1]], s.num_cached_tokens, s.block_table) for s in seqs]
    with RoutingMargin(model) as margin:
        eager = engine.runner.forward(engine.runner.prepare(rows, graph=False))
    return eager, engine.runner.forward(engine.runner.prepare(rows)), margin


def decode_flow(fp8: bool, compile_decode: bool, fused: str) -> tuple[torch.nn.Module, Engine, list, dict]:
    """The CUDA test's model (bf16, or FP8 block weights) and a synchronous engine that has prefilled its three
    prompts: (model, engine, prompts, engine config)."""
    model = build(tiny_config(vocab_size=96), seed=3, dtype=torch.bfloat16).cuda()
    if fp8:
        from dsv3.infer.fp8_weights import quantize_weights
        quantize_weights(model)
    config = dict(block_size=16, num_blocks=64, compile_decode=compile_decode, fused_moe=fused)
    # synchronous steps: the rows of replay_vs_eager read each sequence's last token on the host after step()
    engine = Engine(model, config=EngineConfig(**config, overlap_schedule="off"))
    assert engine.runner.graphs is not None and engine.runner.fused_moe == (fused == "on")
    ps = prompts([5, 17, 30])
    for p in ps:
        engine.add_request(p, SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True))
    engine.step()                                                    # prefill
    return model, engine, ps, config


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda_ok(), reason="needs a CUDA GPU of sm_89+ with triton (run through the device tool)")
@pytest.mark.parametrize("fp8,compile_decode,fused", [(False, True, "off"), (False, False, "on"), (False, True, "on"),
                                                      (True, False, "on"), (True, True, "on")],
                         ids=["compile", "fused", "compile-fused", "fp8-fused", "fp8-compile-fused"])
def test_cuda_fast_decode_matches_plain_decode(fp8, compile_decode, fused):
    """Graph replays of the compiled / fused decode step equal the eager step of the same rows (hidden states, bf16
    tolerance) while inputs change between replays, and greedy generations agree with the plain eager engine."""
    model, engine, ps, config = decode_flow(fp8, compile_decode, fused)
    compared = 0
    for _ in range(4):
        eager, replayed, margin = replay_vs_eager(engine, model)
        # rows at a routing near-tie may take other experts in the replay: compare every other row strictly
        clear = margin.rows >= ROUTING_TIE
        torch.testing.assert_close(replayed[clear].float(), eager[clear].float(), atol=3e-2, rtol=3e-2,
                                   msg=lambda m: f"{m}\nrouting margins of this eager step's rows: {margin}")
        compared += int(clear.sum())
        engine.step()
    assert compared >= 6, f"only {compared} of 12 rows routed clear of a tie: the test compares too little"
    assert all(b.graph is not None for b in engine.runner.graphs.buckets.values())
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    fast = [o.token_ids for o in Engine(model, config=EngineConfig(**config)).generate(ps, params)]
    plain = [o.token_ids for o in Engine(model, config=EngineConfig(block_size=16, num_blocks=64, cuda_graphs=False,
                                                                    fused_moe="off")).generate(ps, params)]
    # Greedy sequences of a random-weight model part at near-ties (bf16 / FP8 rounding decides them), and after the
    # first parting a positional comparison means nothing. So: where a sequence parts from the plain one, the plain
    # model's logits there must be a near-tie between the two tokens chosen.
    for p, x, y in zip(ps, fast, plain):
        i = next((j for j, (a, b) in enumerate(zip(x, y)) if a != b), None)
        if i is None:
            continue
        with torch.no_grad():
            logits = model(torch.tensor([p + y[:i]], device="cuda"))[0, -1].float()
        gap = (logits[y[i]] - logits[x[i]]).item()
        assert abs(gap) <= 0.05 * logits.abs().max().item(), (i, gap, x, y)   # either sign: the full forward rounds too
