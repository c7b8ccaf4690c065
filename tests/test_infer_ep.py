"""The expert-parallel engine with DP attention (dsv3.infer.ep_engine) against the single-process engine.

2 and 4 spawned gloo ranks each run an EPEngine on their own share of the prompts (uneven shares, one rank with
none), the routed experts sharded over the ranks; their greedy outputs (fp32 tiny model) must equal those of one
plain Engine serving every prompt, token for token. The same spawn checks redundant experts with a live rebalance
every 2 steps (the placement changes, the outputs do not), two-micro-batch overlap (each step's rows in two
halves run concurrently over two groups; outputs unchanged), and MTP speculation (greedy: the plain engine's tokens;
seeded sampling: the single-process speculative engine's on the same share). One spawn per group size runs every case.
"""

import pytest
import torch
import torch.distributed as dist
from conftest import build, init_gloo, run_ranks, tiny_config

from dsv3.infer import Engine, EngineConfig, SamplingParams
from dsv3.infer.bench import bench_decode
from dsv3.infer.config import ExpertParallelConfig
from dsv3.infer.ep_driver import EPFront, follow
from dsv3.infer.ep_engine import EPEngine

LENGTHS = [1, 5, 8, 9, 17, 30, 3]
GREEDY = SamplingParams(temperature=0.0, max_tokens=7, ignore_eos=True)
ENGINE = dict(block_size=4, num_blocks=48, max_num_batched_tokens=16)     # chunked prefill: ranks step unevenly
# rank of each prompt: uneven shares, and with 4 ranks rank 1 gets none
ASSIGN = {2: [0, 0, 0, 1, 0, 0, 1], 4: [0, 3, 2, 0, 3, 0, 2]}


def _cfg():
    return tiny_config(vocab_size=96)


def _prompts():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(2, 96, (n,), generator=g).tolist() for n in LENGTHS]


SPEC = dict(num_speculative_tokens=2)
SAMPLED = [SamplingParams(temperature=1.0, top_k=20, max_tokens=7, ignore_eos=True, seed=i)
           for i in range(len(LENGTHS))]


def _cases(world):
    """name -> (EP config, engine options). "spec": MTP speculation (the fused greedy step), rebalanced live."""
    rebalance = ExpertParallelConfig(redundant_experts=world, rebalance_interval=2)
    return {"plain": (ExpertParallelConfig(), {}),
            "rebalance": (rebalance, {}),
            "overlap": (ExpertParallelConfig(two_batch_overlap=True), {}),
            "spec": (rebalance, SPEC)}


def _worker(rank, world, init_file, tmp):
    init_gloo(rank, world, init_file)
    prompts, mine = _prompts(), [i for i, r in enumerate(ASSIGN[world]) if r == rank]
    result = {}
    for name, (ep_config, options) in _cases(world).items():
        engine = EPEngine(build(_cfg(), seed=3), config=EngineConfig(**ENGINE, **options), ep_config=ep_config)
        first = engine.placement.phy2log.clone()
        outs = engine.generate([prompts[i] for i in mine], GREEDY)
        stats = engine.stats()
        result[name] = dict(tokens={i: o.token_ids for i, o in zip(mine, outs)}, stats=stats,
                            first=first, last=engine.placement.phy2log.clone(),
                            local=engine.model.layers[1].mlp.experts.gate_proj.detach().clone(),
                            free=engine.blocks.num_free_blocks == engine.blocks.num_blocks,
                            runner_config=engine.runner.config == engine.config)
    # sampled speculation (draft, verify, rejection-sample: the unfused path), seeded requests
    engine = EPEngine(build(_cfg(), seed=3), config=EngineConfig(**ENGINE, **SPEC))
    outs = engine.generate([prompts[i] for i in mine], [SAMPLED[i] for i in mine])
    result["sampled"] = dict(tokens={i: o.token_ids for i, o in zip(mine, outs)}, stats=engine.stats(),
                             mtp=type(engine.model.mtp[0].mlp.experts).__name__)
    try:                # a speculative step's forward is not split in two, a plain one's is: refused
        EPEngine(build(_cfg(), seed=3), config=EngineConfig(**ENGINE, **SPEC),
                 ep_config=ExpertParallelConfig(two_batch_overlap=True))
    except ValueError as e:
        result["refused"] = str(e)
    if world == 2:   # `dsv3 bench decode`'s timing loop on one EPEngine per rank (serve_x2.py ep-decode)
        made = []
        bench = bench_decode(build(_cfg(), seed=3), 2, 6, 3, seed=rank, cuda_graphs=False, warmup=False,
                             make_engine=lambda m, config: made.append(EPEngine(m, config=config)) or made[-1])
        result["bench"] = dict(steps=bench["steps"], engine_steps=made[0].ep_stats["steps"], made=len(made))
    # one front end: rank 0 takes every request and spreads them over the ranks by load
    engine = EPEngine(build(_cfg(), seed=3), config=EngineConfig(**ENGINE))
    control = dist.new_group(backend="gloo")
    if rank == 0:
        front = EPFront(engine, control)
        fids = [front.add_request(p, GREEDY) for p in prompts]
        placed = [front.owner[f] for f in fids]
        final = {}
        while front.has_unfinished():
            final |= {o.request_id: o.token_ids for o in front.step() if o.finished}
        result["front"] = dict(tokens=[final[f] for f in fids], stats=front.stats(), placed=placed,
                               left=list(front.tokens))
        front.close()
    else:
        follow(engine, control)
        result["front"] = dict(served=engine.stats()["ep_steps"] - engine.stats()["ep_idle_steps"])
    dist.destroy_process_group()
    torch.save(result, tmp / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def reference():
    engine = Engine(build(_cfg(), seed=3), config=EngineConfig(**ENGINE))
    return [o.token_ids for o in engine.generate(_prompts(), GREEDY)], build(_cfg(), seed=3)


def _sampled_shares(world: int) -> dict[int, list[int]]:
    """The single-process speculative engine's seeded samples of each rank's share, run as that rank's batch (which
    steps speculate, and so each request's random stream, depends on the batch it runs in)."""
    prompts, out = _prompts(), {}
    for rank in range(world):
        mine = [i for i, r in enumerate(ASSIGN[world]) if r == rank]
        engine = Engine(build(_cfg(), seed=3), config=EngineConfig(**ENGINE, **SPEC))
        outs = engine.generate([prompts[i] for i in mine], [SAMPLED[i] for i in mine])
        out |= {i: o.token_ids for i, o in zip(mine, outs)}
    return out


@pytest.mark.parametrize("world", [2, 4])
def test_ep_engine_equals_single_process(world, reference, tmp_path):
    want, full = reference
    ranks = run_ranks(_worker, world, tmp_path, "EP engine", args=(world, str(tmp_path / "init"), tmp_path))
    full_gate = full.layers[1].mlp.experts.gate_proj.detach()
    for name in _cases(world):      # each rank serving its own share
        got = {}
        for r, res in enumerate(ranks):
            got.update(res[name]["tokens"])
            assert res[name]["free"], f"{name}: rank {r} kept cache blocks"
            assert res[name]["runner_config"], f"{name}: the runner ignores the engine's config"
            # the rank holds exactly the experts its slots name, with the checkpoint's weights
            slots = res[name]["last"][0].view(world, -1)[r]
            assert torch.equal(res[name]["local"], full_gate[slots]), f"{name}: rank {r} holds wrong weights"
        assert [got[i] for i in range(len(LENGTHS))] == want, name
    idle = [res["plain"]["stats"]["ep_idle_steps"] for res in ranks]
    assert all(res["plain"]["stats"]["ep_steps"] == ranks[0]["plain"]["stats"]["ep_steps"] for res in ranks)
    assert max(idle) > 0              # some rank padded while others worked
    if world == 4:
        assert idle[1] == ranks[1]["plain"]["stats"]["ep_steps"]       # the rank without requests only padded
    # live rebalancing: the placement changed during generation (and, above, no output did)
    st = ranks[0]["rebalance"]["stats"]
    assert st["ep_rebalances"] >= 2 and not torch.equal(ranks[0]["rebalance"]["first"], ranks[0]["rebalance"]["last"])
    assert sum(res["rebalance"]["stats"]["ep_moved_bytes"] for res in ranks) > 0
    assert len(st["expert_placement"][0]) == 8 + world and sum(st["expert_loads"][0]) > 0
    # two-micro-batch overlap: every step split (outputs equal above), the halves ran at the same time
    for res in ranks:
        st = res["overlap"]["stats"]
        assert st["ep_tbo_steps"] == st["ep_steps"] > 0
    assert max(res["overlap"]["stats"]["ep_tbo_max_concurrent"] for res in ranks) == 2
    # MTP speculation: every rank with requests speculated (the MTP module's experts whole, running alone), in
    # lockstep with ranks that ran plain, prefill and padding steps; greedy tokens equal above, seeded sampled ones
    # equal the single-process speculative engine's
    for res in ranks:
        assert res["spec"]["stats"]["ep_steps"] == ranks[0]["spec"]["stats"]["ep_steps"]
        assert res["sampled"]["mtp"] == "Experts" and "two_batch_overlap" in res["refused"]
    assert all(res["spec"]["stats"]["spec_steps"] > 0 for res in ranks if res["spec"]["tokens"])
    assert ranks[0]["spec"]["stats"]["ep_rebalances"] >= 1
    sampled = {i: t for res in ranks for i, t in res["sampled"]["tokens"].items()}
    assert sampled == _sampled_shares(world)
    assert all(res["sampled"]["stats"]["spec_steps"] > 0 for res in ranks if res["sampled"]["tokens"])
    # bench_decode timed the EPEngine it was given: prefill + 2 decode steps on every rank, in lockstep
    assert world != 2 or all(res["bench"] == dict(steps=2, engine_steps=3, made=1) for res in ranks)
    # one front end (rank 0) for the whole group: same outputs, every rank served requests, stats summed
    front = ranks[0]["front"]
    assert front["tokens"] == want
    # each request went to the rank with the fewest tokens in flight (prompt + max_tokens), none left counted
    load, expect = [0] * world, []
    for n in LENGTHS:
        expect.append(min(range(world), key=load.__getitem__))
        load[expect[-1]] += n + GREEDY.max_tokens
    assert front["placed"] == expect and front["left"] == [0] * world
    assert all(res["front"]["served"] > 0 for res in ranks[1:])
    assert len(front["stats"]["ep_ranks"]) == world and front["stats"]["running"] == 0
