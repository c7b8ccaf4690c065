"""A serving rank's model read from a Hugging Face directory, only its share (dsv3.infer.ep_load), FP8 included.

One process: `load_rank_model` equals `load_pretrained` (plain) and, with `fp8`, holds a released-format
checkpoint's own e4m3 codes and block scales bit for bit (the old dequantise-in-bf16-then-requantise path moved
the scales), and equals `quantize_weights(load_pretrained(...))` on a bf16 checkpoint. Two gloo ranks with redundant
expert slots: each reads the tensors outside the routed experts and its slots' experts only, each once (bytes
counted against the file headers), its slots hold the logical experts the placement names (the same codes as one
process), and EPEngines on the two ranks, FP8 experts rebalanced live (codes and scales moved as bytes), give the
single-process FP8 engine's greedy tokens; so does an EPEngine given the whole FP8 model (a training run's path),
placing it itself.
"""

import pytest
import torch
import torch.distributed as dist
from conftest import build, init_gloo, run_ranks, tiny_config
from safetensors import safe_open

from dsv3 import load_pretrained, save_pretrained
from dsv3.checkpoint.convert import convert_checkpoint
from dsv3.checkpoint.hf import CheckpointReader
from dsv3.data import train_tokenizer
from dsv3.infer import Engine, EngineConfig, SamplingParams
from dsv3.infer.config import ExpertParallelConfig
from dsv3.infer.ep_engine import EPEngine, initial_placement
from dsv3.infer.ep_load import load_rank_model
from dsv3.infer.fp8_weights import FP8Experts, FP8Linear, quantize_weights
from dsv3.launch.loading import load_model
from dsv3.model.moe import moe_layers

ENGINE = dict(block_size=4, num_blocks=48, max_num_batched_tokens=16)
GREEDY = SamplingParams(temperature=0.0, max_tokens=7, ignore_eos=True)
LENGTHS = [1, 5, 8, 9, 17, 30]
ASSIGN = [0, 0, 1, 0, 1, 1]
EP = ExpertParallelConfig(redundant_experts=2, rebalance_interval=2)


def _prompts():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(2, 96, (n,), generator=g).tolist() for n in LENGTHS]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ep_load")
    save_pretrained(build(tiny_config(vocab_size=96), seed=3), tmp / "bf16")
    train_tokenizer(["def f(x):\n    return x\n"] * 4, vocab_size=300).save(tmp / "tok")
    convert_checkpoint(tmp / "bf16", tmp / "fp8", to="fp8")
    return tmp


def _dequantised(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Codes times their 128x128 block scales, written out here (an independent reference, not the loader's)."""
    n, k = q.shape
    return q.float() * s.repeat_interleave(128, 0).repeat_interleave(128, 1)[:n, :k]


def test_plain_load_equals_the_files(dirs):
    """The whole model in fp32 (also load_pretrained's path, dsv3.checkpoint.fill) against the source model's own
    weights, and against the FP8 release's codes times scales, computed here."""
    source = build(tiny_config(vocab_size=96), seed=3).state_dict()
    ours = load_rank_model(dirs / "bf16", torch.float32, "cpu")[0].state_dict()
    assert ours.keys() == source.keys() and all(torch.equal(v, source[k]) for k, v in ours.items())
    pretrained = load_pretrained(dirs / "bf16", dtype=torch.float32).state_dict()
    assert all(torch.equal(v, ours[k]) for k, v in pretrained.items())
    reader = CheckpointReader(dirs / "fp8")
    fp8 = load_rank_model(dirs / "fp8", torch.float32, "cpu")[0].state_dict()
    layer = fp8["layers.0.self_attn.q_b_proj.weight"]
    name = "model.layers.0.self_attn.q_b_proj.weight"
    assert torch.equal(layer, _dequantised(reader.read_stored(name), reader.read_stored(name + "_scale_inv")))
    expert = fp8["layers.1.mlp.experts.down_proj"][5]
    name = "model.layers.1.mlp.experts.5.down_proj.weight"
    assert torch.equal(expert, _dequantised(reader.read_stored(name), reader.read_stored(name + "_scale_inv")))
    gate = source["layers.1.mlp.gate.weight"].bfloat16().float()      # the router: stored in bf16, unquantised
    assert torch.equal(fp8["layers.1.mlp.gate.weight"], gate)


def test_fp8_holds_the_releases_own_codes_and_scales(dirs):
    model, read = load_rank_model(dirs / "fp8", torch.bfloat16, "cpu", fp8=True)
    reader = CheckpointReader(dirs / "fp8")
    stored = {}
    for f in sorted({*reader.weight_map.values()}):
        with safe_open(dirs / "fp8" / f, framework="pt") as h:
            stored |= {k: h.get_tensor(k) for k in h.keys()}
    attn = model.layers[0].self_attn.q_b_proj
    assert isinstance(attn, FP8Linear)
    name = "model.layers.0.self_attn.q_b_proj.weight"
    assert torch.equal(attn.weight.view(torch.uint8), stored[name].view(torch.uint8))
    assert torch.equal(attn.weight_scale_inv, stored[name + "_scale_inv"])
    experts = model.layers[1].mlp.experts
    assert isinstance(experts, FP8Experts)
    for e in range(experts.down_proj.shape[0]):
        name = f"model.layers.1.mlp.experts.{e}.down_proj.weight"
        assert torch.equal(experts.down_proj[e].view(torch.uint8), stored[name].view(torch.uint8))
        assert torch.equal(experts.down_proj_scale_inv[e], stored[name + "_scale_inv"])
    # `dsv3 serve --fp8` of a Hugging Face directory (one process) reads them the same way
    served, _ = load_model(str(dirs / "fp8"), str(dirs / "tok"), "cpu", torch.bfloat16, True)
    assert torch.equal(served.layers[0].self_attn.q_b_proj.weight_scale_inv, attn.weight_scale_inv)
    # the round trip through bf16 values moves the scales (by up to a bf16 rounding); reading them does not
    old = quantize_weights(load_pretrained(dirs / "fp8", dtype=torch.bfloat16))
    assert not torch.equal(old.layers[0].self_attn.q_b_proj.weight_scale_inv, attn.weight_scale_inv)
    # every stored tensor read once, except the MTP layer's copies of the embedding and the head
    mtp = f"model.layers.{model.config.num_hidden_layers}."
    skip = (mtp + "embed_tokens.weight", mtp + "shared_head.head.weight")
    assert read == sum(reader.stored_bytes(k) for k in reader.weight_map if k not in skip)


def test_serving_without_speculation_reads_no_mtp_tensor(dirs):
    """`dsv3 serve` without --spec (bf16 or FP8) loads the model without its MTP module, the rest as before."""
    from dsv3.infer import EngineConfig
    from dsv3.launch.loading import served_engine
    full = load_model(str(dirs / "bf16"), str(dirs / "tok"), "cpu", torch.float32, False)[0].state_dict()
    assert any(k.startswith("mtp.") for k in full)
    for fp8 in (False, True):
        plain = load_model(str(dirs / "bf16"), str(dirs / "tok"), "cpu", torch.float32, fp8, mtp=False)[0]
        assert plain.config.num_nextn_predict_layers == 0 and not any(k.startswith("mtp.") for k in plain.state_dict())
        if not fp8:
            assert plain.state_dict().keys() == {k for k in full if not k.startswith("mtp.")}
            assert all(torch.equal(v, full[k]) for k, v in plain.state_dict().items())
    for spec in (0, 2):
        engine = served_engine(str(dirs / "bf16"), str(dirs / "tok"), "cpu", torch.float32, False,
                               EngineConfig(**ENGINE, num_speculative_tokens=spec))
        assert engine.model.config.num_nextn_predict_layers == (1 if spec else 0)


def test_fp8_from_bf16_equals_quantize_weights(dirs):
    ours, _ = load_rank_model(dirs / "bf16", torch.bfloat16, "cpu", fp8=True)
    ref = quantize_weights(load_pretrained(dirs / "bf16", dtype=torch.bfloat16)).state_dict()
    assert ours.state_dict().keys() == ref.keys()
    assert all(torch.equal(v.view(torch.uint8) if v.dtype == torch.float8_e4m3fn else v,
                           ref[k].view(torch.uint8) if v.dtype == torch.float8_e4m3fn else ref[k])
               for k, v in ours.state_dict().items())


def _worker(rank, init_file, tmp):
    init_gloo(rank, 2, init_file)
    cfg = CheckpointReader(tmp / "fp8").model_config()
    placement = initial_placement(cfg, 2, EP)
    # a rank that does not speculate: no MTP module read
    model, read = load_rank_model(tmp / "fp8", torch.float32, "cpu", fp8=True, group=dist.group.WORLD,
                                  placement=placement, mtp=False)
    slots = [(m.experts.local_experts(), m.experts.gate_proj.clone(), m.experts.gate_proj_scale_inv.clone())
             for _, m in moe_layers(model)]
    engine = EPEngine(model, config=EngineConfig(**ENGINE), ep_config=EP, placement=placement)
    prompts, mine = _prompts(), [i for i, r in enumerate(ASSIGN) if r == rank]
    outs = engine.generate([prompts[i] for i in mine], GREEDY)
    result = dict(read=read, slots=slots, first=placement.phy2log.clone(), last=engine.placement.phy2log.clone(),
                  tokens={i: o.token_ids for i, o in zip(mine, outs)}, stats=engine.stats(), mtp=len(model.mtp))
    # one that speculates: the MTP module too, its experts whole (dsv3.infer.ep_experts.ep_moe_layers)
    model, read = load_rank_model(tmp / "fp8", torch.float32, "cpu", fp8=True, group=dist.group.WORLD,
                                  placement=placement)
    experts = model.mtp[0].mlp.experts
    engine = EPEngine(model, config=EngineConfig(**ENGINE, num_speculative_tokens=1), ep_config=EP,
                      placement=placement)
    outs = engine.generate([prompts[i] for i in mine], GREEDY)
    result["spec"] = dict(read=read, tokens={i: o.token_ids for i, o in zip(mine, outs)}, stats=engine.stats(),
                          mtp_gate=experts.gate_proj.clone(), mtp_class=type(experts).__name__)
    # a model loaded whole (as a training run is) in FP8 block weights: EPEngine places its experts itself
    whole, _ = load_rank_model(tmp / "fp8", torch.float32, "cpu", fp8=True)
    engine = EPEngine(whole, config=EngineConfig(**ENGINE), ep_config=EP)
    result["placed_here"] = {i: o.token_ids for i, o in zip(mine, engine.generate([prompts[i] for i in mine], GREEDY))}
    dist.destroy_process_group()
    torch.save(result, tmp / f"rank{rank}.pt")


def test_two_ranks_read_their_share_and_serve_the_single_process_tokens(dirs):
    ranks = run_ranks(_worker, 2, dirs, "ep load", args=(str(dirs / "init"), dirs))
    ref_model, whole = load_rank_model(dirs / "fp8", torch.float32, "cpu", fp8=True)
    want = [o.token_ids for o in Engine(ref_model, config=EngineConfig(**ENGINE)).generate(_prompts(), GREEDY)]
    ref_moes = [m.experts for _, m in moe_layers(ref_model)]
    reader = CheckpointReader(dirs / "fp8")
    expert_bytes = {}           # (layer index among MoE layers, logical expert) -> its tensors' stored bytes
    n_main = ref_model.config.num_hidden_layers          # "mtp.k" is the checkpoint's layer n_main + k
    layer_ids = [int(n.split(".")[1]) + (n_main if n.startswith("mtp") else 0) for n, _ in moe_layers(ref_model)]
    for i, layer in enumerate(layer_ids):
        for e in range(ref_moes[i].gate_proj.shape[0]):
            names = [f"model.layers.{layer}.mlp.experts.{e}.{p}.weight{s}"
                     for p in ("gate_proj", "up_proj", "down_proj") for s in ("", "_scale_inv")]
            expert_bytes[i, e] = sum(reader.stored_bytes(n) for n in names)
    n_ep = len(ranks[0]["slots"])                         # the main model's MoE layers: the MTP one is not placed
    assert layer_ids[n_ep:] == [n_main]
    outside = whole - sum(expert_bytes.values())
    # the MTP layer's tensors the whole load read (not its copies of the embedding and the head: never read)
    mtp = f"model.layers.{n_main}."
    mtp_bytes = sum(reader.stored_bytes(k) for k in reader.weight_map if k.startswith(mtp)
                    and not k.endswith(("embed_tokens.weight", "shared_head.head.weight")))
    mtp_experts = sum(v for (i, _), v in expert_bytes.items() if i >= n_ep)
    got, placed_here, spec = {}, {}, {}
    for rank, r in enumerate(ranks):
        got |= r["tokens"]
        placed_here |= r["placed_here"]
        spec |= r["spec"]["tokens"]
        assert r["first"].equal(ranks[0]["first"]) and r["mtp"] == 0
        placed = sum(expert_bytes[i, e] for i, (local, _, _) in enumerate(r["slots"])
                     for e in set(local))       # an expert in two of its slots: read once
        assert r["read"] == outside - (mtp_bytes - mtp_experts) + placed
        # speculating: the MTP module read too, its experts whole, held whole
        assert r["spec"]["read"] == outside + mtp_experts + placed < whole
        assert r["spec"]["mtp_class"] == "FP8Experts"
        assert torch.equal(r["spec"]["mtp_gate"].view(torch.uint8), ref_moes[n_ep].gate_proj.view(torch.uint8))
        assert r["spec"]["stats"]["spec_steps"] > 0 and r["spec"]["stats"]["ep_rebalances"] >= 1
        for i, (local, codes, scales) in enumerate(r["slots"]):
            assert local == r["first"][i, rank * 5:(rank + 1) * 5].tolist()
            assert torch.equal(codes.view(torch.uint8), ref_moes[i].gate_proj[local].view(torch.uint8))
            assert torch.equal(scales, ref_moes[i].gate_proj_scale_inv[local])
        assert r["stats"]["ep_rebalances"] >= 1
    for i in range(n_ep):               # 10 slots over both ranks hold all 8 experts, two of them twice
        held = ranks[0]["slots"][i][0] + ranks[1]["slots"][i][0]
        assert len(held) == 10 and set(held) == set(range(8))
    assert not ranks[0]["last"].equal(ranks[0]["first"])          # the FP8 experts moved
    assert [got[i] for i in range(len(LENGTHS))] == want
    assert [placed_here[i] for i in range(len(LENGTHS))] == want
    assert [spec[i] for i in range(len(LENGTHS))] == want        # greedy speculation: the plain engine's tokens
