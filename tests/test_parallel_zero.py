"""ZeRO-1 (dsv3.parallel.zero.ZeroOne) on 4 real gloo ranks against one process's optimizer on the whole model: the
model laid out as dp 2 x ep 2 (experts sharded, their state over the dp column; everything else over the 4 ranks of
the position), the same gradients on every replica, 3 steps of AdamW (fp32 parameters) and of AdamWBF16 (bf16
parameters: BF16 moments and an FP32 master copy per row shard). AdamW is elementwise, so every rank's rows after
the steps equal one process's exactly; each rank's optimizer state covers only its rows (one in R of every
replicated parameter, empty shards included: 2 routed experts, so the router's 2 rows over 4 ranks and one expert
per ep rank over its dp column of 2), and the checkpoint entries place them in the full tensors, every row once."""

from __future__ import annotations

import os
import zlib

import pytest
import torch
from conftest import init_gloo, run_ranks

from dsv3.train.config import RunConfig

WORLD = 4
STEPS = 3


def _cfg(state_dtype: str, dtype: str) -> RunConfig:
    """state_dtype "bf16-split": BF16 moments with split masters (optim.master = split)."""
    optim = {"state_dtype": "bf16", "master": "split"} if state_dtype == "bf16-split" else {"state_dtype": state_dtype}
    return RunConfig.from_dict({
        "model": {"preset": "tiny", "num_hidden_layers": 2, "vocab_size": 384, "n_routed_experts": 2,
                  "num_experts_per_tok": 1, "n_group": 1, "topk_group": 1},
        "parallel": {"ep": 2, "zero1": True}, "optim": optim,
        "train": {"micro_batch_size": 4, "batch_size": 4, "batch_size_start": 4, "device": "cpu", "dtype": dtype}})


def _grad(name: str, shape, step: int, dtype) -> torch.Tensor:
    """The step's gradient of the full tensor `name`: the same on every rank (seeded by name and step)."""
    g = torch.Generator().manual_seed(zlib.crc32(f"{name}/{step}".encode()))
    return torch.randn(shape, generator=g).to(dtype)


def _steps(opt, params: dict, step_fn) -> None:
    for step in range(STEPS):
        for name, (p, start) in params.items():
            full = _full_shapes[name]
            p.grad = _grad(name, full, step, p.dtype)[start:start + p.shape[0]]
        step_fn(opt)


_full_shapes: dict = {}


def _worker(rank: int, init_file: str, tmp, state_dtype: str, dtype: str) -> None:
    from dsv3.parallel.dcp import init_state, owned_state
    from dsv3.parallel.materialize import owned_parameters
    from dsv3.parallel.parallelize import parallelize
    from dsv3.parallel.zero import ZeroOne
    from dsv3.train.data_parallel import Layout
    from dsv3.train.optim import build_optimizer
    from dsv3.train.trainer import build_model
    init_gloo(rank, WORLD, init_file)
    cfg = _cfg(state_dtype, dtype)
    layout = Layout(torch.device("cpu"), cfg)
    local = parallelize(build_model(cfg, "meta"), layout.mesh, cfg, "cpu")
    zero = ZeroOne(local, layout.mesh)
    opt = build_optimizer(zero, cfg.optim)
    owned = {o.name: o for o in owned_parameters(local.roots)}
    _full_shapes.update({n: o.full_shape for n, o in owned.items()})
    params = {n: (o.param, o.start) for n, o in owned.items()}

    def step(opt):
        zero.attach_grads()
        opt.step()
        zero.gather()
    _steps(opt, params, step)
    init_state(opt)
    state = sum(v.numel() for st in opt.state.values() for k, v in st.items() if k != "step")
    entries = {k: (getattr(v, "_start", 0), (getattr(v, "_local", v)).shape[0])
               for k, v in owned_state(local.roots, opt, optimized=zero.owned()).items() if k.startswith("optim/")
               and v.dim()}
    torch.save({"rows": {n: (o.start, o.local.detach().clone()) for n, o in owned.items()},
                "state": state, "held": sum(o.local.numel() for o in owned.values()),
                "keys": sorted({k for st in opt.state.values() for k in st}),
                "entries": entries}, tmp / f"rank{rank}.pt")


@pytest.mark.parametrize("state_dtype,dtype",
                         [("fp32", "fp32"), ("bf16", "bf16-params"), ("bf16-split", "bf16-params")],
                         ids=["adamw", "adamw_bf16", "adamw_bf16_split_master"])
def test_zero1_equals_the_whole_optimizer(tmp_path, state_dtype, dtype):
    from dsv3.train.optim import build_optimizer
    from dsv3.train.trainer import build_model
    os.environ.pop("WORLD_SIZE", None)
    cfg = _cfg(state_dtype, dtype)
    ranks = run_ranks(_worker, WORLD, tmp_path, "zero1", (str(tmp_path / "init"), tmp_path, state_dtype, dtype),
                      timeout_s=300)
    model = build_model(cfg, "cpu")
    _full_shapes.update({n: p.shape for n, p in model.named_parameters()})
    opt = build_optimizer(model, cfg.optim)
    _steps(opt, {n: (p, 0) for n, p in model.named_parameters()}, lambda o: o.step())
    full = dict(model.named_parameters())
    for r, res in enumerate(ranks):
        for name, (start, rows) in res["rows"].items():
            assert torch.equal(rows, full[name].detach()[start:start + rows.shape[0]]), (r, name)
    # the state: every element of every parameter once over the ranks (experts: one dp column per ep slice)
    keys = {"fp32": ["exp_avg", "exp_avg_sq", "step"], "bf16": ["exp_avg", "exp_avg_sq", "master", "step"],
            "bf16-split": ["exp_avg", "exp_avg_sq", "master_lo", "step"]}[state_dtype]
    assert all(res["keys"] == keys for res in ranks)
    per_param = 2 if state_dtype == "fp32" else 3          # moments (+ the master copy or low half of bf16 ones)
    whole = sum(p.numel() for p in model.parameters())
    assert sum(res["state"] for res in ranks) == per_param * whole
    assert all(res["state"] < per_param * res["held"] / 1.9 for res in ranks)    # ~1/R of what the rank holds
    # the checkpoint entries of each parameter's moments cover its rows once over the ranks
    for name, p in full.items():
        covered = torch.zeros(p.shape[0], dtype=torch.int64)
        for res in ranks:
            if f"optim/{name}/exp_avg" in res["entries"]:
                start, n = res["entries"][f"optim/{name}/exp_avg"]
                covered[start:start + n] += 1
        assert bool((covered == 1).all()), name
