"""`dsv3 train` with DualPipeV and FSDP2 (parallel.pp with parallel.fsdp: every chunk its own FSDP root, its blocks
units, experts sharded over their dp column, the rest over the pipeline position; dsv3.parallel.parallelize) through
torchrun (gloo, CPU) at 4 ranks (pp 2 x dp 2, with recomputation) and 8 ranks (pp 2 x dp 2 x ep 2), against one
process on the same global batches over 3 AdamW steps: per-step losses, clipping norms, validation, and the final
checkpoint (weights, AdamW moments, EMA, by parameter name); the 8-rank run's step-2 sharded checkpoint resumes at 2
ranks (pp 2) and in one process with the next step's loss equal. The per-rank memory bound of these layouts is
measured in tests/test_parallel_construct.py.

Tolerances as in test_train_pipeline (fp32, the same batches; only summation orders differ)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_train_loop import small_run, train_losses
from test_train_pipeline import ENV, SINGLE, _assert_matches_single

SECTIONS = dict(model={"num_hidden_layers": 4}, balance={"seq_aux_alpha": 0.5},
                train={"micro_batch_size": 8, "batch_size": 16, "batch_size_start": 16, "steps": 3, "ema_decay": 0.9},
                checkpoint={"interval": 2, "keep": 0}, log={"val_interval": 3})
STEPS = [1, 2, 3]


def _train(tmp: Path, name: str, nproc: int, *args: str) -> str:
    cfg = tmp / "run.json"
    if not cfg.exists():
        cfg.write_text(json.dumps(small_run(tmp, "x", **SECTIONS).to_dict()))
    launcher = SINGLE if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                          "--nproc_per_node", str(nproc), "-m", "dsv3.cli"]
    r = subprocess.run(launcher + ["train", "--config", str(cfg), "--quiet", "--run-dir", str(tmp / name), *args],
                       env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stderr


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    return tmp_path_factory.mktemp("ppfsdp")


@pytest.fixture(scope="module")
def single(tmp):
    _train(tmp, "single", 1)
    return tmp / "single"


def test_pp2_dp2_fsdp_with_recompute_matches_one_process(tmp, single):
    err = _train(tmp, "pp2dp2", 4, "parallel.pp=2", "parallel.fsdp=true", "train.recompute=true")
    assert "x 4 ranks (pp 2 x dp 2 x ep 1, DualPipeV" in err and "FSDP:" in (tmp / "pp2dp2/metrics.jsonl").read_text()
    _assert_matches_single(tmp, single, "pp2dp2", STEPS)


def test_pp2_dp2_ep2_fsdp_matches_one_process_and_resumes_at_2_ranks_and_in_one_process(tmp, single):
    err = _train(tmp, "pp2dp2ep2", 8, "parallel.pp=2", "parallel.ep=2", "parallel.fsdp=true")
    assert "x 8 ranks (pp 2 x dp 2 x ep 2, DualPipeV" in err
    _assert_matches_single(tmp, single, "pp2dp2ep2", STEPS)
    for name, nproc, layout in (("then_pp2", 2, ("parallel.pp=2", "parallel.ep=1", "parallel.fsdp=false")),
                                ("then_1", 1, ("parallel.pp=1", "parallel.ep=1", "parallel.fsdp=false"))):
        shutil.copytree(tmp / "pp2dp2ep2", tmp / name)
        for d in (tmp / name / "checkpoints").iterdir():
            if d.name != "step_00000002":
                shutil.rmtree(d)
        err = _train(tmp, name, nproc, "--resume", *layout)
        assert "from step 2" in err, err[-2000:]
        assert train_losses(tmp / name)[3] == pytest.approx(train_losses(single)[3], rel=1e-5), name
