"""Expert parallelism inside data parallelism (the building blocks of dsv3.parallel.parallelize, spec 5) against the
single-process run.

One spawn of four gloo ranks, mesh (dp, ep) = (2, 2): each trains the tiny float64 model (two MoE layers and an MoE
MTP module, E = 8, so 4 experts per rank) with SGD on gradients synced by dsv3.parallel.grads (the one sync and norm
of every layout) and the bias update on its summed loads, rank r = d*ep + e fed batch r (all four batches differ).
The ranks save what they
measured; the single-process reference on the concatenation of the four batches runs once, here in the pytest process
(not on every rank: four copies on few cores would only cost time), and the tests compare.
"""

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
import torch.nn.functional as F
from conftest import build, init_gloo, run_ranks, tiny_config

from dsv3.parallel.expert import ExpertParallelExperts, apply_expert_parallel
from dsv3.parallel.grads import grad_norm, sync_gradients, sync_loads
from dsv3.parallel.mesh import ParallelMesh
from dsv3.parallel.parallelize import shard_data_parallel
from dsv3.train.balance import collect_balance_loss, moe_layers, update_bias
from dsv3.train.losses import lm_losses

DP, EP, STEPS, B, T = 2, 2, 3, 2, 12
WORLD = DP * EP
MTP_WEIGHT, ALPHA, LR, BIAS_SPEED = 0.3, 0.01, 0.5, 0.01
EXPERT_SUFFIXES = ("experts.gate_proj", "experts.up_proj", "experts.down_proj")


def _config():
    return tiny_config(num_hidden_layers=3, first_k_dense_replace=1)     # MoE layers 1, 2 and the MTP module


def _windows():
    """(STEPS, WORLD, B, T + 1): batch r of each step goes to rank r; the reference sees their concatenation."""
    return torch.randint(0, _config().vocab_size, (STEPS, WORLD, B, T + 1), generator=torch.Generator().manual_seed(1))


def _loss(model, window):
    """Main + MTP cross-entropy (float64, mean over this batch's tokens) + sequence-wise balance loss."""
    for _, m in moe_layers(model):
        m.tokens_per_expert.zero_()
        m.keep_routing = True
    main, mtp, _, _ = lm_losses(model, window, ce=lambda lg, t: F.cross_entropy(lg.flatten(0, 1), t.flatten()))
    return main + MTP_WEIGHT * torch.stack(mtp).mean() + ALPHA * collect_balance_loss(moe_layers(model))


def _full(t):
    """A plain tensor from a plain tensor or an FSDP-sharded DTensor (a collective over its mesh)."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def _step(model, opt, window, mesh=None):
    """One step: loss, backward, (sync), SGD, then the bias update on the (world-summed) loads. Returns the loss, the
    gradients as the optimizer saw them, the global gradient norm and the biases after the update."""
    loss = _loss(model, window)
    loss.backward()
    local = loss.item()
    if mesh is not None:
        sync_gradients(model, mesh)                 # (nothing left to do under FSDP: reduced in backward)
        norm = grad_norm(model, mesh).item()
        total = loss.detach().clone()
        dist.all_reduce(total)                      # the world-mean loss, for comparison with the reference
        loss = total / WORLD
    else:
        norm = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]).norm().item()
    grads = {n: _full(p.grad).clone() for n, p in model.named_parameters() if p.grad is not None}
    opt.step()
    opt.zero_grad()
    loads = torch.stack([m.tokens_per_expert for _, m in moe_layers(model)])
    if mesh is not None:
        sync_loads(loads)
    update_bias(moe_layers(model), loads, BIAS_SPEED)
    bias = torch.stack([m.gate.e_score_correction_bias for _, m in moe_layers(model)]).clone()
    return {"loss": loss.item(), "local_loss": local, "grads": grads, "norm": norm, "loads": loads.clone(),
            "bias": bias}


def _worker(rank, init_file, out_dir):
    init_gloo(rank, WORLD, init_file)
    try:
        mesh = ParallelMesh(1, DP, EP)
        # the building blocks of dsv3.parallel.parallelize (which also materialises its own seeded init)
        model = apply_expert_parallel(build(_config(), dtype=torch.float64).train(), mesh.ep_group)
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        windows = _windows()
        res = {"steps": [_step(model, opt, windows[s, rank], mesh) for s in range(STEPS)],
               "coord": tuple(mesh.device_mesh.get_coordinate()[1:]),
               "dp_ranks": dist.get_process_group_ranks(mesh.dp_group),
               "ep_ranks": dist.get_process_group_ranks(mesh.ep_group),
               "first_expert": [m.first_expert for m in model.modules() if isinstance(m, ExpertParallelExperts)],
               "params": {n: p.detach().clone() for n, p in model.named_parameters()}}
        # the same run with FSDP2 over the layout: experts sharded over their dp column, the rest over the world
        model = apply_expert_parallel(build(_config(), dtype=torch.float64).train(), mesh.ep_group)
        model = shard_data_parallel(model, mesh)
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        res["fsdp_sharded"] = {n: type(p).__name__ for n, p in model.named_parameters()}
        res["fsdp_steps"] = [_step(model, opt, windows[s, rank], mesh)
                             for s in range(STEPS)]
        res["fsdp_params"] = {n: _full(p.detach()).clone() for n, p in model.named_parameters()}
        torch.save(res, out_dir / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return run_ranks(_worker, WORLD, tmp_path_factory.mktemp("dp_ep"), "dp x ep")


def single_process_run(windows: torch.Tensor) -> dict:
    """One process on every rank's batch of each step concatenated: the steps' records and the final parameters."""
    model = build(_config(), dtype=torch.float64).train()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    steps = [_step(model, opt, windows[s].flatten(0, 1)) for s in range(STEPS)]    # batches 0..3 concatenated
    return {"steps": steps, "params": {n: p.detach().clone() for n, p in model.named_parameters()}}


@pytest.fixture(scope="module")
def reference():
    return single_process_run(_windows())


def _local(name, tensor, e, ep=EP):
    """The reference tensor as rank (d, e) holds it: the expert slice of column e, everything else whole."""
    if name.endswith(EXPERT_SUFFIXES):
        L = tensor.shape[0] // ep
        return tensor[e * L:(e + 1) * L]
    return tensor


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


def test_layout(ranks):
    for r, res in enumerate(ranks):
        d, e = divmod(r, EP)
        assert res["coord"] == (d, e)
        assert res["ep_ranks"] == [d * EP + i for i in range(EP)]      # a row holds all experts
        assert res["dp_ranks"] == [i * EP + e for i in range(DP)]      # a column holds replicas of the same ones
        assert res["first_expert"] == [e * 4] * 3                      # E / ep = 4 per rank, 3 MoE modules
        assert res["params"]["layers.1.mlp.experts.gate_proj"].shape == (4, 32, 64)


@pytest.mark.parametrize("layout", ["replicated", "fsdp"])
def test_dp_ep_training_matches_the_single_process_run(ranks, reference, layout):
    """replicated: non-expert parameters replicated and all-reduced; fsdp: everything FSDP2-sharded (experts over
    their dp column, the rest over the world), gradients and parameters gathered for the comparison."""
    steps_key, params_key = ("steps", "params") if layout == "replicated" else ("fsdp_steps", "fsdp_params")
    for r, res in enumerate(ranks):
        e = r % EP
        if layout == "fsdp":      # really sharded: every parameter is a DTensor
            assert set(res["fsdp_sharded"].values()) == {"DTensor"}, res["fsdp_sharded"]
        for step, (got, ref) in enumerate(zip(res[steps_key], reference["steps"])):
            assert abs(got["loss"] - ref["loss"]) <= 1e-10 * abs(ref["loss"]), (r, step, got["loss"], ref["loss"])
            assert got["grads"].keys() == ref["grads"].keys(), (r, step)
            errs = {n: _rel(g, _local(n, ref["grads"][n], e)) for n, g in got["grads"].items()}
            worst = max(errs, key=errs.get)
            assert errs[worst] < 1e-9, (r, step, worst, errs[worst])
            assert abs(got["norm"] - ref["norm"]) <= 1e-9 * ref["norm"], (r, step, got["norm"], ref["norm"])
            assert torch.equal(got["loads"], ref["loads"]), (r, step)
            assert torch.equal(got["bias"], ref["bias"]), (r, step)
            assert torch.equal(got["bias"], ranks[0][steps_key][step]["bias"]), (r, step)   # identical everywhere
        for n, p in res[params_key].items():
            assert (p - _local(n, reference["params"][n], e)).abs().max() < 1e-10, (r, n)
    # the run really moved the biases and the loss, so agreement means something
    steps = reference["steps"]
    assert not torch.equal(steps[0]["bias"], steps[-1]["bias"])
    assert steps[0]["loss"] != steps[-1]["loss"]


def test_ranks_really_had_different_data(ranks):
    """Before the sync each rank's loss differs; the synced (world-mean) loss is the same everywhere."""
    local = [res["steps"][0]["local_loss"] for res in ranks]
    assert len(set(local)) == WORLD, local
    synced = [res["steps"][0]["loss"] for res in ranks]
    assert max(synced) - min(synced) <= 1e-12 * abs(synced[0]), synced
