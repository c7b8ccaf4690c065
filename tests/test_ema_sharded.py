"""The sharded CPU EMA (dsv3.train.ema, TR 3.2.3) against the single-process EMA.

Spawned gloo ranks (2 and 4) lay out the same tiny model as `dsv3 train` does (dsv3.parallel.parallelize's steps:
plain data parallelism, dp x ep expert parallelism, and FSDP2 over dp x ep). A reference model in each process
takes three deterministic parameter updates; every rank copies its rows of them into its own tensors and folds them
into its share of the EMA, as the reference folds the whole model into a plain CPUEma. Then:
  * the ranks' `ema/` entries written with torch.distributed.checkpoint and read back whole are the reference EMA,
    bit for bit (the same elementwise fp32 lerp), every element written by exactly one rank;
  * each rank keeps about 1/world of the model's elements (the sum over ranks is the model, once);
  * the entries reload in place (dcp.load) and cut from the whole reference EMA (fill_entries: a single-process
    checkpoint resumed under torchrun) to exactly what the ranks held.
"""

import zlib

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from conftest import build, init_gloo, run_ranks, tiny_config

from dsv3.parallel.dcp import fill_entries
from dsv3.parallel.materialize import owned_parameters
from dsv3.parallel.expert import apply_expert_parallel
from dsv3.parallel.mesh import ParallelMesh
from dsv3.parallel.parallelize import shard_data_parallel
from dsv3.train.ema import CPUEma

LAYOUTS = {2: [("dp2", 1, False), ("ep2", 2, False), ("ep2-fsdp", 2, True)],
           4: [("dp4", 1, False), ("dp2xep2", 2, False), ("dp2xep2-fsdp", 2, True)]}
DECAY, STEPS = 0.7, 3


def _local(e: torch.Tensor) -> torch.Tensor:
    return e._local if hasattr(e, "_local") else e


def _layout_case(rank, out_dir, name, ep, fsdp):
    # the layouts' building blocks as dsv3.parallel.parallelize applies them (which would also materialise its own
    # seeded init; here the model is built whole first, so every rank starts from the reference's values)
    mesh = ParallelMesh(1, dist.get_world_size() // ep, ep)
    model = build(tiny_config()).train()
    if ep > 1 or fsdp:
        apply_expert_parallel(model, mesh.ep_group)
    if fsdp:
        shard_data_parallel(model, mesh)
    roots = [model]
    ref = build(tiny_config()).train()
    ema, ref_ema = CPUEma(roots, DECAY, dist.group.WORLD), CPUEma(ref, DECAY)
    full = dict(ref.named_parameters())
    for step in range(STEPS):
        with torch.no_grad():
            for n, p in full.items():
                gen = torch.Generator().manual_seed(zlib.crc32(f"{n}/{step}".encode()))
                p.add_(torch.randn(p.shape, generator=gen), alpha=0.1)
            for o in owned_parameters(roots):                    # this rank's rows of the updated model
                o.local.copy_(full[o.name][o.start:o.start + o.local.shape[0]])
        ema.update()
        ref_ema.update(ref)
    entries = ema.entries()
    held = {k: _local(e).clone() for k, e in entries.items()}
    dcp.save(entries, checkpoint_id=str(out_dir / name))
    dist.barrier()
    res = {"numel": ema.numel, "total": sum(p.numel() for p in ref.parameters())}
    if rank == 0:
        meta = dcp.FileSystemReader(str(out_dir / name)).read_metadata().state_dict_metadata
        read = {k: torch.empty(md.size, dtype=md.properties.dtype) for k, md in meta.items()}
        dcp.load(read, checkpoint_id=str(out_dir / name), no_dist=True)
        whole = {f"ema/{k}": v for k, v in ref_ema.state_dict().items()}
        res["keys_match"] = read.keys() == whole.keys()
        res["differ"] = [k for k in whole if k in read and not torch.equal(read[k], whole[k])]
        # each element written once: the stored chunks of a tensor add up to its size
        res["written"] = {k: sum(c.sizes.numel() for c in md.chunks) for k, md in meta.items()}
        res["sizes"] = {k: md.size.numel() for k, md in meta.items()}
    with torch.no_grad():
        for e in entries.values():
            _local(e).zero_()
    dcp.load(entries, checkpoint_id=str(out_dir / name))
    res["reloaded"] = [k for k, e in entries.items() if not torch.equal(_local(e), held[k])]
    with torch.no_grad():
        for e in entries.values():
            _local(e).zero_()
    fill_entries(entries, {f"ema/{k}": v for k, v in ref_ema.state_dict().items()})
    res["cut"] = [k for k, e in entries.items() if not torch.equal(_local(e), held[k])]
    return res


def _worker(rank, init_file, out_dir, world):
    init_gloo(rank, world, init_file)
    try:
        res = {name: _layout_case(rank, out_dir, name, ep, fsdp) for name, ep, fsdp in LAYOUTS[world]}
        torch.save(res, out_dir / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module", params=[2, 4], ids=["world2", "world4"])
def ranks(request, tmp_path_factory):
    world = request.param
    tmp = tmp_path_factory.mktemp(f"ema{world}")
    return world, run_ranks(_worker, world, tmp, "sharded EMA", args=(str(tmp / "init"), tmp, world))


def test_gathered_ema_is_the_single_process_ema(ranks):
    world, results = ranks
    for name, _, _ in LAYOUTS[world]:
        r0 = results[0][name]
        assert r0["keys_match"] and r0["differ"] == [], (name, r0["differ"][:5])
        assert r0["written"] == r0["sizes"], name                 # every element written exactly once


def test_each_rank_keeps_its_share_of_the_ema(ranks):
    world, results = ranks
    for name, _, _ in LAYOUTS[world]:
        per_rank = [res[name]["numel"] for res in results]
        total = results[0][name]["total"]
        assert sum(per_rank) == total, (name, per_rank, total)           # no copy anywhere: each element once
        assert max(per_rank) <= 1.1 * total / world, (name, per_rank, total)


def test_entries_reload_and_cut_from_a_whole_ema(ranks):
    world, results = ranks
    for name, _, _ in LAYOUTS[world]:
        for rank, res in enumerate(results):
            assert res[name]["reloaded"] == [] and res[name]["cut"] == [], (name, rank)


def test_one_process_ema_is_whole_and_the_exponential_average():
    model = torch.nn.Linear(3, 2)
    ema = CPUEma([model], decay=0.9)
    ref = {n: p.detach().clone() for n, p in model.named_parameters()}
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        ema.update()
        for n, p in model.named_parameters():
            ref[n] = 0.9 * ref[n] + 0.1 * p.detach()
    assert ema.numel == sum(p.numel() for p in model.parameters())
    for n, v in ema.state_dict().items():
        torch.testing.assert_close(v, ref[n])
    assert set(ema.entries()) == {"ema/weight", "ema/bias"}
    with pytest.raises(ValueError, match="EMA state of weight has shape"):
        ema.load_state_dict({"weight": torch.zeros(3, 3), "bias": torch.zeros(2)})
