"""Data parallelism (dsv3.parallel.data: FSDP2) and the trainer's sharded checkpoints of it
(dsv3.train.checkpoint.save_sharded / load_sharded over dsv3.parallel.dcp.owned_state) against the single-process
run.

Spawn 1, two gloo ranks: each trains the tiny float64 model (two MoE layers and an MoE MTP module) sharded over a
2-rank mesh with AdamW, rank r fed half r of every global batch (twice: blocks resharded after forward or not), and
in the same process a plain reference model on the whole batch. After STEPS - 1 steps the sharded run evaluates
(a no_grad forward), saves a checkpoint, then takes the last step.
Then the checkpoint is loaded (a) here, in the pytest process, with no process group and (b) by a second spawn of
four ranks; both take the last step and must reproduce the 2-rank run's loss and updated parameters and biases
(the updated parameters depend on AdamW's moments and step count, so the optimizer state is checked too).
The workers save what they measured; the tests assert on it.
"""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from conftest import build, init_gloo, run_ranks, tiny_config
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard

from dsv3.parallel.data import apply_data_parallel
from dsv3.parallel.dcp import init_state, owned_state
from dsv3.parallel.expert import all_reduce_expert_loads
from dsv3.train.checkpoint import checkpoint_step, load_sharded, save_sharded
from dsv3.train.balance import collect_balance_loss, moe_layers, update_bias
from dsv3.train.losses import lm_losses

STEPS, GLOBAL_B, T = 3, 4, 12
MTP_WEIGHT, ALPHA, BIAS_SPEED = 0.3, 0.01, 0.01
ADAMW = {"lr": 3e-3, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1}
LOSS_RTOL, PARAM_ATOL = 1e-10, 1e-10     # float64: only the reduction order differs


def _config():
    return tiny_config(num_hidden_layers=3, first_k_dense_replace=1)     # MoE layers 1, 2 and the MTP module


def _windows():
    return torch.randint(0, _config().vocab_size, (STEPS, GLOBAL_B, T + 1), generator=torch.Generator().manual_seed(1))


def _step(model, opt, window, mesh=None):
    """One training step as the trainer takes it: loss (main + MTP CE, mean over this rank's tokens, + sequence
    balance loss), backward, AdamW, then the bias update on the loads of the whole global batch. Returns the loss
    of the whole global batch."""
    for _, m in moe_layers(model):
        m.tokens_per_expert.zero_()
        m.keep_routing = True
    main, mtp, _, _ = lm_losses(model, window, ce=lambda lg, t: F.cross_entropy(lg.flatten(0, 1), t.flatten()))
    loss = main + MTP_WEIGHT * torch.stack(mtp).mean() + ALPHA * collect_balance_loss(moe_layers(model))
    loss.backward()
    opt.step()
    opt.zero_grad()
    if mesh is not None:
        all_reduce_expert_loads(model, mesh.get_group())
    update_bias(moe_layers(model), torch.stack([m.tokens_per_expert for _, m in moe_layers(model)]), BIAS_SPEED)
    if mesh is None:
        return loss.item()
    total = loss.detach().clone()
    dist.all_reduce(total)
    return total.item() / mesh.size()


def _full_params(model):
    return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone() for n, p in model.named_parameters()}


def _biases(model):
    return torch.stack([m.gate.e_score_correction_bias for _, m in moe_layers(model)]).clone()


def _sharded(mesh, **kwargs):
    model = apply_data_parallel(build(_config(), dtype=torch.float64).train(), mesh, **kwargs)
    return model, torch.optim.AdamW(model.parameters(), **ADAMW)


def _shard(window, mesh):
    n = GLOBAL_B // mesh.size()
    return window[mesh.get_local_rank() * n:(mesh.get_local_rank() + 1) * n]


def _train(world, ckpt):
    """The 2-rank run and its single-process reference; saves a checkpoint before the last step."""
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("dp",))
    windows = _windows()
    ref = build(_config(), dtype=torch.float64).train()
    opt_ref = torch.optim.AdamW(ref.parameters(), **ADAMW)
    model, opt = _sharded(mesh)
    keep, opt_keep = _sharded(mesh, reshard_after_forward=False)     # ZeRO-2 style: blocks stay gathered
    out = {"loss": [], "ref_loss": [], "keep_loss": [], "bias": [], "ref_bias": [],
           "dtensors": all(isinstance(p, DTensor) and p.placements == (Shard(0),) for p in model.parameters())}
    for step in range(STEPS):
        if step == STEPS - 1:
            with torch.no_grad():           # an evaluation forward leaves the root gathered
                model.hidden_states(_shard(windows[step], mesh)[:, :-1])
            model.reshard()                 # as the trainer does after validation: the sharded parameters again
            init_state(opt)
            save_sharded(ckpt, step, owned_state([model], opt), {}, {})
            out["sharded_state"] = len(opt.state) > 0 and all(    # AdamW's moments are shards too
                isinstance(s[k], DTensor) for s in opt.state.values() for k in ("exp_avg", "exp_avg_sq"))
        out["loss"].append(_step(model, opt, _shard(windows[step], mesh), mesh))
        out["ref_loss"].append(_step(ref, opt_ref, windows[step]))
        out["keep_loss"].append(_step(keep, opt_keep, _shard(windows[step], mesh), mesh))
        out["bias"].append(_biases(model))
        out["ref_bias"].append(_biases(ref))
    out["params"], out["ref_params"], out["keep_params"] = _full_params(model), _full_params(ref), _full_params(keep)
    return out


def _resume(ckpt, mesh=None):
    """Load the checkpoint (sharded over `mesh`, or plain without one) and take the last step."""
    if mesh is None:
        model = build(_config(), dtype=torch.float64).train()
        opt = torch.optim.AdamW(model.parameters(), **ADAMW)
    else:
        model, opt = _sharded(mesh)
    init_state(opt)
    path = next((ckpt / "checkpoints").glob("step_*"))
    load_sharded(path, lambda with_ema: owned_state([model], opt), restore_rng=False)
    step = checkpoint_step(path)
    before = _full_params(model)                 # what the checkpoint holds (the HF export is compared with it)
    window = _windows()[step]
    loss = _step(model, opt, window if mesh is None else _shard(window, mesh), mesh)
    return {"step": step, "loss": loss, "params": _full_params(model), "bias": _biases(model), "before": before}


def _worker(rank, world, init_file, out_dir, job):
    init_gloo(rank, world, init_file)
    try:
        if job == "train":
            res = _train(world, out_dir / "ckpt")
        else:
            res = _resume(out_dir / "ckpt", init_device_mesh("cpu", (world,), mesh_dim_names=("dp",)))
        torch.save(res, out_dir / f"{job}{rank}.pt")
    finally:
        dist.destroy_process_group()


def _spawn(world, tmp, job):
    return run_ranks(_worker, world, tmp, f"data-parallel ({job})", args=(world, str(tmp / f"init-{job}"), tmp, job),
                     name=job)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dp")
    train = _spawn(2, tmp, "train")
    assert not dist.is_initialized()
    single = _resume(tmp / "ckpt")            # (a): no process group at all
    four = _spawn(4, tmp, "resume")           # (b): 2 -> 4 ranks
    return {"train": train, "single": single, "four": four, "tmp": tmp}


def _max_diff(a, b):
    assert a.keys() == b.keys()
    return max(((a[n] - b[n]).abs().max().item(), n) for n in a)


def test_dp2_matches_the_single_process_run(runs):
    for r, res in enumerate(runs["train"]):
        assert res["dtensors"] and res["sharded_state"], r
        for step, (loss, ref) in enumerate(zip(res["loss"], res["ref_loss"])):
            assert abs(loss - ref) <= LOSS_RTOL * abs(ref), (r, step, loss, ref)
        assert res["keep_loss"] == res["loss"], r       # reshard_after_forward changes no arithmetic
        for params in ("params", "keep_params"):
            err, name = _max_diff(res[params], res["ref_params"])
            assert err <= PARAM_ATOL, (r, params, name, err)
        for step, (bias, ref) in enumerate(zip(res["bias"], res["ref_bias"])):
            assert torch.equal(bias, ref), (r, step)
            assert torch.equal(bias, runs["train"][0]["bias"][step]), (r, step)   # identical on both ranks
    # the steps really changed the model and the biases, so agreement means something
    b = runs["train"][0]["bias"]
    assert not torch.equal(b[0], b[-1])


@pytest.mark.parametrize("where", ["single", "four"])
def test_checkpoint_reshards(runs, where):
    """Saved at 2 ranks before the last step; loaded (a) in one process without a process group, (b) at 4 ranks:
    the last step's loss, updated parameters and biases equal the 2-rank run's."""
    train = runs["train"][0]
    results = [runs["single"]] if where == "single" else runs["four"]
    for r, res in enumerate(results):
        assert res["step"] == STEPS - 1
        assert abs(res["loss"] - train["loss"][-1]) <= LOSS_RTOL * abs(train["loss"][-1]), (where, r, res["loss"])
        err, name = _max_diff(res["params"], train["params"])
        assert err <= PARAM_ATOL, (where, r, name, err)
        assert torch.equal(res["bias"], train["bias"][-1]), (where, r)


def test_checkpoint_is_written_atomically(runs):
    """One committed checkpoint directory (DCP shards plus the manifest written last), no temporary left."""
    entries = sorted(p.name for p in (runs["tmp"] / "ckpt" / "checkpoints").iterdir())
    assert entries == [f"step_{STEPS - 1:08d}"], entries
    path = runs["tmp"] / "ckpt" / "checkpoints" / entries[0]
    assert (path / ".metadata").exists() and (path / "manifest.json").exists()
