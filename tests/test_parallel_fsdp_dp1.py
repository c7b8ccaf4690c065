"""FSDP2 with expert parallelism and one data-parallel row (dp 1 x ep 2, `parallel.ep=2 parallel.fsdp=true` on 2
ranks) against the single-process run: the experts are then FSDP-sharded over a dp column of one rank, whose
reduce-scatter is a local copy. torch 2.13 divides that copy by the divide factor and then, with the sum reduction
gloo needs, divides again: every expert gradient came out half the single process's (through `dsv3 train` the logged
losses moved by only ~6e-6 relative, the expert weights by 7% two steps later). The building blocks of
tests/test_parallel_compose.py (float64, its loss, step and reference), on 2 gloo ranks."""

import pytest
import torch
import torch.distributed as dist
from conftest import build, init_gloo, run_ranks
from test_parallel_compose import LR, STEPS, _config, _full, _local, _rel, _step, single_process_run

from dsv3.parallel.expert import apply_expert_parallel
from dsv3.parallel.mesh import ParallelMesh
from dsv3.parallel.parallelize import shard_data_parallel

EP = 2
B, T = 2, 12


def _windows():
    """(STEPS, EP, B, T + 1): batch r of each step goes to rank r; the reference sees their concatenation."""
    return torch.randint(0, _config().vocab_size, (STEPS, EP, B, T + 1), generator=torch.Generator().manual_seed(2))


def _worker(rank, init_file, out_dir):
    init_gloo(rank, EP, init_file)
    try:
        mesh = ParallelMesh(1, 1, EP)
        model = apply_expert_parallel(build(_config(), dtype=torch.float64).train(), mesh.ep_group)
        model = shard_data_parallel(model, mesh)
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        windows = _windows()
        steps = [_step(model, opt, windows[s, rank], mesh) for s in range(STEPS)]
        torch.save({"steps": steps, "params": {n: _full(p.detach()).clone() for n, p in model.named_parameters()}},
                   out_dir / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return run_ranks(_worker, EP, tmp_path_factory.mktemp("fsdp_dp1"), "dp 1 x ep 2 FSDP")


@pytest.fixture(scope="module")
def reference():
    return single_process_run(_windows())


def _mine(name, tensor, e):
    """The reference tensor as rank e holds it: its expert slice, everything else whole (FSDP's full_tensor)."""
    return _local(name, tensor, e, EP)


def test_dp1_ep2_fsdp_gradients_norm_and_weights_are_the_single_process_ones(ranks, reference):
    for e, res in enumerate(ranks):
        for s, (mine, ref) in enumerate(zip(res["steps"], reference["steps"])):
            for name, g in ref["grads"].items():
                assert _rel(mine["grads"][name], _mine(name, g, e)) < 1e-10, (e, s, name)
            assert abs(mine["norm"] - ref["norm"]) / ref["norm"] < 1e-10, (e, s)
            assert torch.equal(mine["bias"], ref["bias"]), (e, s)
        for name, p in reference["params"].items():
            assert _rel(res["params"][name], _mine(name, p, e)) < 1e-10, (e, name)
