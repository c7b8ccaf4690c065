"""`dsv3 train` through torchrun (gloo, CPU): plain data parallelism, expert parallelism inside it (parallel.ep) and
both FSDP-sharded (parallel.fsdp) give the same per-step losses, validation losses, final weights and EMA as one
process on the same global batches, and write checkpoints (the sharded format under torchrun; the single-process
one in one process) that resume at any world size and layout."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import build, expert_slices, init_gloo, run_ranks, tiny_config
from torch.distributed.tensor import distribute_tensor

from dsv3.config import ConfigError
from dsv3.train import Trainer, load_run_model
from dsv3.train.adamw_bf16 import AdamWBF16
from dsv3.train.checkpoint import read_tensors
from dsv3.train.data_parallel import Layout
from dsv3.train.ema import CPUEma
from dsv3.train.metrics import read_metrics
from test_train_loop import small_run, train_losses

# micro-batch 4 rows: 2 per rank at world 2, 1 at world 4; two checkpoints (steps 4, 8), validation at 4 and 8
SECTIONS = dict(train={"micro_batch_size": 4, "batch_size": 8, "batch_size_start": 4, "steps": 8, "ema_decay": 0.9},
                checkpoint={"interval": 4, "keep": 0})
ENV = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
SINGLE = [sys.executable, "-c", "import sys; from dsv3.cli import main; sys.exit(main())"]


def _torchrun(n: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n), "-m", "dsv3.cli"]


def _train(tmp: Path, name: str, nproc: int, *args: str) -> subprocess.CompletedProcess:
    """`dsv3 train` of the shared config into tmp/name on `nproc` processes (1: plain python)."""
    cfg = tmp / f"{name}.json"
    if not cfg.exists():
        cfg.write_text(json.dumps(dict(small_run(tmp, "x", **SECTIONS).to_dict(), run_dir=str(tmp / name))))
    launcher = SINGLE if nproc == 1 else _torchrun(nproc)
    r = subprocess.run(launcher + ["train", "--config", str(cfg), "--quiet", *args], env=ENV, capture_output=True,
                       text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def _resume_from(tmp: Path, src: str, step: int, name: str, nproc: int, ep: int, *args: str
                 ) -> subprocess.CompletedProcess:
    """Copy run `src` cut back to its checkpoint of `step` and continue it to the end in another layout."""
    shutil.copytree(tmp / src, tmp / name)
    for d in (tmp / name / "checkpoints").iterdir():
        if d.name != f"step_{step:08d}":
            shutil.rmtree(d)
    return _train(tmp, name, nproc, "--resume", "--run-dir", str(tmp / name), f"parallel.ep={ep}", *args)


def _metric(run_dir: Path, key: str) -> list[float]:
    return [r[key] for r in read_metrics(run_dir, kind="train")]


def _val_losses(run_dir: Path) -> list[float]:
    return [r["val_loss"] for r in read_metrics(run_dir, kind="val")]


def _assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str, tol: float = 1e-3) -> None:
    # Adam divides by sqrt(v): where a gradient is ~0 its rounding noise moves a weight by up to lr, so compare
    # each tensor as a whole (relative Frobenius distance), not element by element
    assert a.keys() == b.keys(), what
    for name, x in a.items():
        y = b[name]
        assert x.shape == y.shape, (what, name)
        if x.is_floating_point():
            assert ((x - y).norm() / x.norm().clamp_min(1e-12)).item() < tol, (what, name)


def _assert_same_checkpoint(a: Path, b: Path, what: str) -> None:
    """Two checkpoint directories (either format: a torchrun run writes the sharded one) hold the same weights, EMA
    and optimizer state (by parameter name)."""
    a, b = read_tensors(a), read_tensors(b)
    _assert_same_tensors(a["model"], b["model"], f"{what} model")
    _assert_same_tensors(a["ema"], b["ema"], f"{what} ema")
    assert a["optim"].keys() == b["optim"].keys(), what
    # the moments carry the same fp32 noise as the weights, squared in exp_avg_sq (the embedding's rarely seen rows:
    # up to 1.4e-3 for EP2 and 7e-4 for plain DP2 after 8 steps); a misplaced expert slice would be off by O(1)
    for n, st in a["optim"].items():
        _assert_same_tensors({k: v for k, v in st.items() if v.dim()},
                             {k: v for k, v in b["optim"][n].items() if v.dim()}, f"{what} {n}", tol=1e-2)
        assert {k: v for k, v in st.items() if not v.dim()} == \
            {k: v for k, v in b["optim"][n].items() if not v.dim()}, (what, n)       # AdamW's step


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    return tmp_path_factory.mktemp("dist")


@pytest.fixture(scope="module")
def single(tmp):
    _train(tmp, "single", 1)
    return tmp / "single"


def test_torchrun_data_parallel_matches_one_process(tmp, single):
    r = _train(tmp, "dp2", 2)
    assert "x 2 data-parallel ranks" in r.stderr and r.stderr.count("training ") == 1
    ref, dp = train_losses(single), train_losses(tmp / "dp2")
    assert sorted(dp) == list(range(1, 9))
    # the same global batches; only the all-reduce's summation order differs (fp32)
    assert [dp[s] for s in sorted(dp)] == pytest.approx([ref[s] for s in sorted(ref)], rel=1e-5)
    a, _ = load_run_model(single)
    b, _ = load_run_model(tmp / "dp2")        # the sharded checkpoint (checkpoint.format auto), read whole
    _assert_same_tensors(a.state_dict(), b.state_dict(), "dp2")


def test_torchrun_expert_parallel_matches_one_process_and_resumes_in_any_layout(tmp, single):
    """EP2 on 2 ranks for the whole run; its step-4 checkpoint (written by a gather of the expert slices) continued
    in one process and at dp 2 x ep 2 on 4 ranks (every rank loading the full checkpoint and keeping its slices).
    Tolerances as for plain DP: fp32, the same batches, only the order of summations differs (the all-reduces, and
    which rows share an expert GEMM)."""
    r = _train(tmp, "ep2", 2, "parallel.ep=2")
    assert "x 2 ranks (dp 1 x ep 2)" in r.stderr and r.stderr.count("training ") == 1
    _resume_from(tmp, "ep2", 4, "ep2_then_1", 1, ep=1)
    r = _resume_from(tmp, "ep2", 4, "ep2_then_dp2ep2", 4, ep=2)
    assert "x 4 ranks (dp 2 x ep 2)" in r.stderr
    ref = train_losses(single)
    for name in ("ep2", "ep2_then_1", "ep2_then_dp2ep2"):
        got = train_losses(tmp / name)
        assert sorted(got) == list(range(1, 9)), name
        assert [got[s] for s in range(1, 9)] == pytest.approx([ref[s] for s in range(1, 9)], rel=1e-5), name
        # validation runs on both EP ranks (each on half of every batch) and matches rank 0's whole-batch one
        assert _val_losses(tmp / name) == pytest.approx(_val_losses(single), rel=1e-5), name
        # the logged (clipping) norm is the global one. Only a coarse check: the norms (> 1, so every step clips)
        # carry up to 7e-4 of fp32 noise, also in plain DP, and this model's experts hold too little of the squared
        # norm for a local norm to stand out; dsv3.parallel.grads.grad_norm itself is pinned by test_layout_grad_norm
        norms = [_metric(tmp / name, "grad_norm") for name in (name, "single")]
        assert norms[0] == pytest.approx(norms[1], rel=5e-3), name
    # the step after the EP2 checkpoint, resumed in one process, is the step the EP2 run took
    assert train_losses(tmp / "ep2_then_1")[5] == pytest.approx(train_losses(tmp / "ep2")[5], rel=1e-6)
    # whole expert tensors, moments and EMA in every checkpoint, equal to the single-process run's
    for step in (4, 8):
        ck = f"checkpoints/step_{step:08d}"
        for name in ("ep2", "ep2_then_1", "ep2_then_dp2ep2") if step == 8 else ("ep2",):
            _assert_same_checkpoint(single / ck, tmp / name / ck, f"{name} {step}")


def _fsdp_line(run_dir: Path) -> tuple[int, int, int, int]:
    """The trainer's log line on what FSDP sharded: (DTensor parameters, parameters, elements rank 0 holds, elements
    all ranks hold), counted from the model itself after sharding."""
    lines = [r["message"] for r in read_metrics(run_dir, kind="event") if r["message"].startswith("FSDP:")]
    assert lines, f"{run_dir}: no FSDP line logged"
    m = re.fullmatch(r"FSDP: (\d+) of (\d+) parameters sharded \(DTensor\); rank 0 holds (\d+) of (\d+) "
                     r"parameter elements", lines[-1])
    assert m, lines[-1]
    return tuple(int(g) for g in m.groups())


def _assert_really_sharded(run_dir: Path, single: Path, world: int) -> None:
    model, _ = load_run_model(single)
    params = list(model.parameters())
    n_dt, n, local, total = _fsdp_line(run_dir)
    assert n_dt == n == len(params)                                   # every parameter a DTensor
    assert total == sum(p.numel() for p in params)                  # every element on exactly one rank
    assert local <= 1.1 * total / world                               # rank 0 holds its share, not the whole


def test_torchrun_fsdp_matches_one_process_and_resumes_in_one_process(tmp, single):
    """parallel.fsdp on 2 ranks (ZeRO-3 over dp 2, experts too: parallelize with ep 1): the single-process losses,
    validation and checkpoints (gathered from the shards, AdamW moments and EMA included); its step-4 checkpoint
    continued in one plain process (fsdp at world 1 is a no-op) takes the very step the FSDP run took."""
    r = _train(tmp, "fsdp2", 2, "parallel.fsdp=true")
    assert "x 2 data-parallel ranks (FSDP)" in r.stderr and r.stderr.count("training ") == 1
    _assert_really_sharded(tmp / "fsdp2", single, 2)
    r = _resume_from(tmp, "fsdp2", 4, "fsdp2_then_1", 1, ep=1)
    assert "data-parallel" not in r.stderr and "from step 4" in r.stderr
    ref = train_losses(single)
    for name in ("fsdp2", "fsdp2_then_1"):
        got = train_losses(tmp / name)
        assert sorted(got) == list(range(1, 9)), name
        assert [got[s] for s in range(1, 9)] == pytest.approx([ref[s] for s in range(1, 9)], rel=1e-5), name
        assert _val_losses(tmp / name) == pytest.approx(_val_losses(single), rel=1e-5), name
        # the clipping norm (dsv3.parallel.grads.grad_norm) is the global one; fp32 noise as in
        # test_torchrun_expert_parallel_...
        assert _metric(tmp / name, "grad_norm") == pytest.approx(_metric(single, "grad_norm"), rel=5e-3), name
    assert train_losses(tmp / "fsdp2_then_1")[5] == pytest.approx(train_losses(tmp / "fsdp2")[5], rel=1e-6)
    for step, names in ((4, ("fsdp2",)), (8, ("fsdp2", "fsdp2_then_1"))):
        ck = f"checkpoints/step_{step:08d}"
        for name in names:
            _assert_same_checkpoint(single / ck, tmp / name / ck, f"{name} {step}")


def test_torchrun_fsdp_with_one_dp_row_matches_one_process(tmp, single):
    """dp 1 x ep 2 with FSDP on 2 ranks: the experts are FSDP-sharded over a dp column of one rank, a local copy that
    torch 2.13 on gloo divided by the divide factor twice (half the expert gradients: the losses within 1e-5 and the
    clipping norm within 5e-3 all the same, but the expert weights and moments far off). The single-process
    checkpoint (building blocks: tests/test_parallel_fsdp_dp1.py)."""
    r = _train(tmp, "ep2_fsdp", 2, "parallel.ep=2", "parallel.fsdp=true")
    assert "x 2 ranks (dp 1 x ep 2, FSDP)" in r.stderr
    got, ref = train_losses(tmp / "ep2_fsdp"), train_losses(single)
    assert [got[s] for s in range(1, 9)] == pytest.approx([ref[s] for s in range(1, 9)], rel=1e-5)
    ck = "checkpoints/step_00000008"
    _assert_same_checkpoint(single / ck, tmp / "ep2_fsdp" / ck, "ep2_fsdp 8")


def test_torchrun_fsdp_with_expert_parallelism_and_recompute_resumes_a_plain_checkpoint(tmp, single):
    """The single-process run's step-4 checkpoint continued at dp 2 x ep 2 with FSDP and recomputation on 4 ranks
    (every rank cutting its expert slice, then its shard, out of the full checkpoint; at the end the shards gathered
    over each dp column, then the expert slices over row 0): the single-process steps, and those of the FSDP run
    without recomputation."""
    r = _resume_from(tmp, "single", 4, "single_then_fsdp_ep2", 4, 2, "parallel.fsdp=true", "train.recompute=true")
    assert "x 4 ranks (dp 2 x ep 2, FSDP)" in r.stderr and "from step 4" in r.stderr
    assert json.loads((tmp / "single_then_fsdp_ep2" / "config.json").read_text())["train"]["recompute"] is True
    _assert_really_sharded(tmp / "single_then_fsdp_ep2", single, 4)
    got, ref = train_losses(tmp / "single_then_fsdp_ep2"), train_losses(single)
    assert sorted(got) == list(range(1, 9))
    # the steps FSDP without recomputation takes too (test_torchrun_fsdp_matches_one_process_...): recomputation
    # repeats the forward bit for bit inside the FSDP units' backward, after their all-gathers
    assert [got[s] for s in range(5, 9)] == pytest.approx([ref[s] for s in range(5, 9)], rel=1e-5)
    assert _val_losses(tmp / "single_then_fsdp_ep2") == pytest.approx(_val_losses(single), rel=1e-5)
    ck = "checkpoints/step_00000008"
    _assert_same_checkpoint(single / ck, tmp / "single_then_fsdp_ep2" / ck, "single_then_fsdp_ep2 8")


def test_bad_parallel_layouts_are_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"parallel.ep=3 must divide model.n_routed_experts=16"):
        small_run(tmp_path, parallel={"ep": 3})
    with pytest.raises(ConfigError, match=r"parallel.ep=0: must be an integer >= 1"):
        small_run(tmp_path, parallel={"ep": 0})
    with pytest.raises(ConfigError, match=r"parallel.fsdp='yes': must be true or false"):
        small_run(tmp_path, parallel={"fsdp": "yes"})
    with pytest.raises(ConfigError, match=r"parallel.fsdp does not combine with train.compile_optimizer"):
        small_run(tmp_path, parallel={"fsdp": True}, train={"compile_optimizer": True})
    cfg = small_run(tmp_path, parallel={"ep": 2}, **SECTIONS)
    with pytest.raises(ConfigError, match=r"parallel.zero1 does not combine with parallel.fsdp"):
        small_run(tmp_path, parallel={"fsdp": True, "zero1": True})
    with pytest.raises(ConfigError, match=r"parallel.zero1 does not combine with train.compile_optimizer"):
        small_run(tmp_path, parallel={"zero1": True}, train={"compile_optimizer": True})
    assert cfg.to_dict()["parallel"] == {"ep": 2, "fsdp": False, "zero1": False, "pp": 1, "overlap": False,
                                          "ep_dispatch": "flat", "ranks_per_node": 0,
                                          "fp8_dispatch": False, "timeout_minutes": 30.0}
    assert cfg.check_world(2) == 1 and cfg.check_world(4) == 2
    with pytest.raises(ConfigError, match=r"parallel.ep=2 does not divide the world size 3"):
        cfg.check_world(3)
    with pytest.raises(ConfigError, match=r"add parallel.ep=1"):
        cfg.check_world(1)
    with pytest.raises(ConfigError, match=r"micro_batch_size=4 must be a multiple of the 8 ranks"):
        cfg.check_world(8)
    with pytest.raises(ConfigError, match=r"parallel.ep=2 does not divide the world size 1"):
        Trainer(cfg)                   # one process (no torchrun): world 1


def _roundtrip_worker(rank, init_file, out_dir, fsdp):
    """dp 1 x ep 2 (with FSDP: everything else sharded over both ranks) on 2 gloo ranks, BF16 weights with AdamWBF16
    (BF16 moments + FP32 master) and an EMA: one step on known gradients, next to a plain model taking the same step.
    The sharded state (dsv3.parallel.dcp.owned_state) is saved by both ranks; read whole it is the plain model's;
    loaded back into zeroed tensors it is what the ranks held; the plain model's whole state cut to the ranks' rows
    (fill_entries: a single-process checkpoint resumed at 2 ranks) is the same again."""
    import torch.distributed.checkpoint as dcp

    from dsv3.parallel.dcp import fill_entries, owned_state
    from dsv3.parallel.expert import apply_expert_parallel
    from dsv3.parallel.parallelize import shard_data_parallel
    from dsv3.train.config import RunConfig
    init_gloo(rank, 2, init_file)
    try:
        cfg = RunConfig.from_dict({"model": {"preset": "tiny"}, "parallel": {"ep": 2, "fsdp": fsdp},
                                   "train": {"micro_batch_size": 2, "batch_size": 2, "batch_size_start": 2}})
        layout = Layout(torch.device("cpu"), cfg)
        # the building blocks of dsv3.parallel.parallelize on a model built with the plain model's values
        model = apply_expert_parallel(build(tiny_config(), dtype=torch.bfloat16).train(), layout.mesh.ep_group)
        if fsdp:
            shard_data_parallel(model, layout.mesh)
        ref = build(tiny_config(), dtype=torch.bfloat16).train()
        opt, ref_opt = AdamWBF16(model.parameters(), lr=1e-2), AdamWBF16(ref.parameters(), lr=1e-2)
        ema, ref_ema = CPUEma([model], 0.5), CPUEma(ref, 0.5)     # this rank's rows (shards under FSDP)
        experts = expert_slices(model)
        for i, ((n, p), q) in enumerate(zip(model.named_parameters(), ref.parameters())):
            q.grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(i)).to(q.dtype)
            g = q.grad[experts[n][0]:experts[n][0] + experts[n][1]] if n in experts else q.grad
            p.grad = distribute_tensor(g, p.device_mesh, p.placements, src_data_rank=None) if fsdp else g.clone()
        opt.step()
        ref_opt.step()
        ema.update()
        ref_ema.update(ref)
        entries = owned_state([model], opt, ema.state_dict())
        held = {k: (e._local if hasattr(e, "_local") else e).clone() for k, e in entries.items()}
        dcp.save(entries, checkpoint_id=str(out_dir / "ckpt"))
        names = {id(p): n for n, p in ref.named_parameters()}
        whole = {f"model/{k}": v for k, v in ref.state_dict().items()}
        whole |= {f"ema/{k}": v for k, v in ref_ema.state_dict().items()}
        whole |= {f"optim/{names[id(p)]}/{k}": v for p, st in ref_opt.state.items() for k, v in st.items()}
        res = {"types": {type(p).__name__ for p in model.parameters()}, "keys": sorted(entries)}
        dist.barrier()
        if rank == 0:
            meta = dcp.FileSystemReader(str(out_dir / "ckpt")).read_metadata().state_dict_metadata
            read = {k: torch.empty(md.size, dtype=md.properties.dtype) for k, md in meta.items()}
            dcp.load(read, checkpoint_id=str(out_dir / "ckpt"), no_dist=True)
            res["vs_single"] = _mismatches({k: v for k, v in whole.items() if "tokens_per_expert" not in k}, read)
        with torch.no_grad():
            for e in entries.values():
                (e._local if hasattr(e, "_local") else e).zero_()
        dcp.load(entries, checkpoint_id=str(out_dir / "ckpt"))
        res["reloaded"] = _mismatches(held, {k: e._local if hasattr(e, "_local") else e for k, e in entries.items()})
        with torch.no_grad():
            for e in entries.values():
                (e._local if hasattr(e, "_local") else e).zero_()
        fill_entries(entries, whole)
        res["cut"] = _mismatches(held, {k: e._local if hasattr(e, "_local") else e for k, e in entries.items()})
        torch.save(res, out_dir / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _mismatches(a: dict, b: dict) -> list[str]:
    """Keys whose tensors differ in shape, dtype or value (exactly)."""
    if a.keys() != b.keys():
        return sorted(set(a) ^ set(b))
    return [k for k, v in a.items() if isinstance(v, torch.Tensor) and not (v.dtype == b[k].dtype and
                                                                          v.shape == b[k].shape and
                                                                          torch.equal(v, b[k]))]


@pytest.mark.parametrize("fsdp", [False, True], ids=["ep2", "ep2-fsdp"])
def test_sharded_state_saves_reloads_and_cuts_exactly(tmp_path, fsdp):
    ranks = run_ranks(_roundtrip_worker, 2, tmp_path, "sharded state round trip",
                      (str(tmp_path / "init"), tmp_path, fsdp))
    # the same elementwise AdamW/EMA arithmetic on slices and shards as on whole tensors: read whole, the written
    # state is bitwise the plain model's (weights, routing biases, BF16 moments, FP32 masters, steps, EMA)
    assert ranks[0]["vs_single"] == []
    assert any(k.endswith("/master") for k in ranks[0]["keys"]) and any(k.startswith("ema/") for k in ranks[0]["keys"])
    for r in ranks:
        assert r["types"] == ({"DTensor"} if fsdp else {"Parameter"})
        assert r["reloaded"] == r["cut"] == []
