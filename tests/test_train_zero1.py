"""`dsv3 train` with ZeRO-1 (parallel.zero1, dsv3.parallel.zero: each replicated parameter's optimizer state sharded
by rows over its replicas, the updated rows all-gathered) under DualPipeV through torchrun (gloo, CPU): pp 2 x dp 2 x
ep 2 on 8 ranks against one process over 3 AdamW steps (losses, clipping norms, validation, the final checkpoint:
weights, AdamW moments, EMA by parameter name), and its step-2 sharded checkpoint (the optimizer's rows written by
the ranks that own them) resumed at 4 ranks (pp 2 x dp 2, ZeRO-1 over other replicas) with the last step and the
final checkpoint equal to one process's. The per-rank memory of ZeRO-1 is measured in test_parallel_construct.py."""

from __future__ import annotations

import shutil

import pytest
from test_train_loop import train_losses
from test_train_pipeline_sharded import STEPS, _assert_matches_single, _train


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    return tmp_path_factory.mktemp("zero1")


@pytest.fixture(scope="module")
def single(tmp):
    _train(tmp, "single", 1)
    return tmp / "single"


def test_pp2_dp2_ep2_zero1_matches_one_process_and_resumes_at_pp2_dp2(tmp, single):
    err = _train(tmp, "zero1", 8, "parallel.pp=2", "parallel.ep=2", "parallel.zero1=true")
    assert "x 8 ranks (pp 2 x dp 2 x ep 2, DualPipeV, ZeRO-1)" in err
    _assert_matches_single(tmp, single, "zero1", STEPS)
    shutil.copytree(tmp / "zero1", tmp / "then_4")
    for d in (tmp / "then_4" / "checkpoints").iterdir():
        if d.name != "step_00000002":
            shutil.rmtree(d)
    err = _train(tmp, "then_4", 4, "--resume", "parallel.pp=2", "parallel.ep=1", "parallel.zero1=true")
    assert "x 4 ranks (pp 2 x dp 2 x ep 1, DualPipeV, ZeRO-1)" in err and "from step 2" in err
    _assert_matches_single(tmp, single, "then_4", STEPS)
    assert train_losses(tmp / "then_4")[3] == pytest.approx(train_losses(tmp / "zero1")[3], rel=1e-6)
