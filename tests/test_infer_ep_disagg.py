"""EP groups as disaggregated prefill and decode workers (dsv3.infer.ep_disagg): 2 gloo ranks each hold an
EPPrefillEngine and an EPDecodeEngine (experts sharded over the ranks, rebalanced live); rank 0's EPFront of the
prefill group takes every prompt, spreads them over the ranks, and hands each prefilled request (its latents
written by the rank that prefilled it) to the decode group's front, which sends it to a rank of its own. Greedy
tokens equal one unified Engine's, with and without MTP speculation on the decode side; requests the front or a rank
refuses come back as refusals, their hand-offs removed. A rank lost mid-serving ends the front's loop.
"""

import os

import torch
import torch.distributed as dist
from conftest import build, init_gloo, run_ranks, tiny_config

from dsv3.infer import Engine, EngineConfig, SamplingParams
from dsv3.infer.config import ExpertParallelConfig
from dsv3.infer.disagg import KVHandle
from dsv3.infer.ep_disagg import EPDecodeEngine, EPPrefillEngine
from dsv3.infer.ep_driver import EPFront, follow

LENGTHS = [1, 5, 8, 9, 17, 30]
GREEDY = SamplingParams(temperature=0.0, max_tokens=7, ignore_eos=True)
ENGINE = dict(block_size=4, num_blocks=48, max_num_batched_tokens=16)
EP = ExpertParallelConfig(redundant_experts=2, rebalance_interval=2)


def _cfg():
    return tiny_config(vocab_size=96)


def _prompts():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(2, 96, (n,), generator=g).tolist() for n in LENGTHS]


def _prefill(front: EPFront, prompts: list) -> list:
    """(first output, hand-off) of each prompt through the prefill group's front."""
    firsts = front.generate(prompts, GREEDY)
    return [(o, front.exported.pop(o.request_id)) for o in firsts]


def _decode(front: EPFront, prompts: list, prefilled: list) -> dict:
    ids = {front.add_prefilled(p, first, GREEDY, handle): i for i, (p, (first, handle)) in
           enumerate(zip(prompts, prefilled))}
    final = {}
    while front.has_unfinished():
        final |= {ids[o.request_id]: o.token_ids for o in front.step() if o.finished}
    return final


def _worker(rank, init_file, tmp):
    init_gloo(rank, 2, init_file)
    result = {}
    for spec in (0, 2):       # the decode side speculating (the prefill side then runs the MTP module too)
        options = dict(**ENGINE, num_speculative_tokens=spec)
        pre = EPPrefillEngine(build(_cfg(), seed=3), config=EngineConfig(**options), ep_config=EP)
        dec = EPDecodeEngine(build(_cfg(), seed=3), config=EngineConfig(**options), ep_config=EP)
        control_pre, control_dec = dist.new_group(backend="gloo"), dist.new_group(backend="gloo")
        if rank == 0:
            prompts = _prompts()
            pre_front, dec_front = EPFront(pre, control_pre), EPFront(dec, control_dec)
            prefilled = _prefill(pre_front, prompts)
            extra = _prefill(pre_front, prompts[:1])[0]
            out = dict(pre=pre_front.stats())
            pre_front.close()         # (the followers hold both groups' ranks: they follow one at a time)
            final = _decode(dec_front, prompts, prefilled)
            out |= dict(tokens=[final[i] for i in range(len(prompts))], dec=dec_front.stats())
            if spec:
                # a hand-off the decode rank cannot read (its file gone): that rank refuses it, the front reports it
                first, handle = extra
                os.unlink(handle.path)
                fid = dec_front.add_prefilled(prompts[0], first, GREEDY, handle)
                dec_front.step()
                out["refused"] = [(f, type(e).__name__) for f, e in dec_front.take_refused()]
                out["fid"], out["owner_after"] = fid, dict(dec_front.owner)
                # the front refuses a request prefilled without the MTP module, naming the setting, and removes it
                plain = Engine(build(_cfg(), seed=3), config=EngineConfig(**ENGINE))   # (its cache: no MTP layer)
                shapes = dict(c_shape=(plain.cache.c_kv.shape[0], 5), r_shape=(plain.cache.k_pe.shape[0], 5))
                path = tmp / "stale-kv"
                path.write_bytes(b"")
                try:
                    dec_front.add_prefilled(prompts[1], first, GREEDY, KVHandle(str(path), dtype="float32",
                                                                                 nbytes=0, **shapes))
                except ValueError as e:
                    out["front_refusal"] = str(e)
                out["removed"] = not path.exists()
            else:
                os.unlink(extra[1].path)
            dec_front.close()
        else:
            follow(pre, control_pre)
            follow(dec, control_dec)
            out = dict(pre=pre.stats(), dec=dec.stats())
        result[spec] = out
    dist.destroy_process_group()
    torch.save(result, tmp / f"rank{rank}.pt")


def test_ep_groups_as_prefill_and_decode_workers(tmp_path):
    want = [o.token_ids for o in Engine(build(_cfg(), seed=3), config=EngineConfig(**ENGINE)).generate(
        _prompts(), GREEDY)]
    ranks = run_ranks(_worker, 2, tmp_path, "EP disaggregation")
    for spec in (0, 2):
        got = ranks[0][spec]
        assert got["tokens"] == want, spec
        # both ranks of each group served requests; the prefill group exported, the decode group imported
        for role, sent in (("pre", "kv_bytes_sent"), ("dec", "kv_bytes_received")):
            per_rank = got[role]["ep_ranks"]
            assert all(s[sent] > 0 for s in per_rank) and got[role][sent] == sum(s[sent] for s in per_rank)
        assert got["pre"]["spec_steps"] == 0 and (got["dec"]["spec_steps"] > 0) == bool(spec)
        assert got["dec"]["ep_rebalances"] >= 1
    got = ranks[0][2]
    assert got["refused"] == [(got["fid"], "RuntimeError")] and got["fid"] not in got["owner_after"]
    assert "prefill workers with --spec" in got["front_refusal"] and got["removed"]


def test_the_server_loop_answers_what_a_rank_refused():
    """EngineLoop (the HTTP server's, `dsv3 serve --ep N`) over a front whose rank refused a request when it
    reached it: that request's client gets the refusal (a 400 for a ValueError), not a wait for an output that never
    comes; the others are unaffected."""
    from dsv3.infer.requests import RequestRefused
    from dsv3.serve.engine_loop import EngineLoop

    class Front:                 # the EPFront interface EngineLoop uses, the rank's refusal already gathered
        def __init__(self):
            self.ids, self.refused = iter(range(10)), []

        def add_request(self, ids, params):
            return next(self.ids)

        def step(self):
            self.refused = [(1, ValueError("a hand-off it cannot read"))] if not self.refused else []
            return []

        def take_refused(self):
            return self.refused

    emitted = []
    loop = EngineLoop(Front(), lambda items, **_: emitted.extend(items), None)
    for cid in (10, 11):
        loop.command(("add", cid, [1, 2], GREEDY))
    loop.step()
    assert [(cid, type(e)) for cid, e in emitted] == [(11, RequestRefused)] and "cannot read" in str(emitted[0][1])
    assert loop.by_client == {10: 0}


def _lost_rank_worker(rank, init_file, tmp):
    """Rank 1 follows two rounds and then is gone (os._exit: as a process killed); rank 0 serves through EngineLoop."""
    from dsv3.infer.ep_driver import _Rank, _round
    from dsv3.infer.ep_engine import EPEngine
    from dsv3.serve.engine_loop import EngineLoop
    init_gloo(rank, 2, init_file)
    engine = EPEngine(build(_cfg(), seed=3), config=EngineConfig(**ENGINE))
    control = dist.new_group(backend="gloo")
    if rank == 1:
        me = _Rank(engine, control)
        for _ in range(2):
            me.apply(_round(control, None))
        torch.save({}, tmp / "rank1.pt")
        os._exit(0)
    front, emitted = EPFront(engine, control), []
    loop = EngineLoop(front, lambda items, **_: emitted.extend(items), None)
    for cid, p in enumerate(_prompts()[:3]):
        loop.command(("add", cid, p, SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)))
    ended = None
    for _ in range(6):
        try:
            loop.step()
        except RuntimeError as e:
            ended = str(e)
            break
    try:
        front.step()
    except RuntimeError as e:
        again = str(e)
    torch.save(dict(ended=ended, broken=front.broken, again=again, stats=front.stats()["running"],
                    failed=sorted(cid for cid, out in emitted if isinstance(out, Exception))), tmp / "rank0.pt")
    os._exit(0)


def test_a_lost_rank_ends_the_fronts_loop(tmp_path):
    """A rank of an EP group gone mid-serving: rank 0's next step fails (gloo reports the closed connection), the
    requests it ran fail (503s), and the front is `broken`: the server's engine loop ends (its health with it)
    instead of failing every later step's requests, and a further step is refused at once, naming the remedy."""
    r0, _ = run_ranks(_lost_rank_worker, 2, tmp_path, "lost rank")
    assert r0["ended"] is not None and r0["broken"] and "restart the group" in r0["again"]
    assert r0["failed"] == [0, 1, 2] and r0["stats"] == 3      # (its stats: the last step's, no round with the group)
