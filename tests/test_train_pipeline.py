"""`dsv3 train` with DualPipeV pipeline parallelism (parallel.pp, dsv3.train.pipeline_step) through torchrun (gloo,
CPU) against one process on the same global batches: per-step losses (main, MTP, sequence-wise balance loss), the
clipping norm, validation and the checkpoints (weights, routing biases, AdamW moments, EMA) in the single-process
format, resumable across layouts.

The model: the tiny preset with 4 decoder layers (4 DualPipeV chunks of one layer for pp 2; layers 1-3 and the MTP
module are MoE). alpha = 0.5 (not the 1e-4 default) so that a wrong balance-loss gradient on the stages moves the
weights visibly; a ramped batch (8 -> 16 rows in micro-batches of 4) so that steps feed the pipeline different
numbers of micro-batches (one schedule each). Tolerances as in test_train_distributed: fp32, the same batches, only
summation orders differ (micro-batch splits, all-reduces), so losses agree to rel 1e-5 (measured ~1e-7); the
clipping norms to rel 1e-4 (measured ~5e-6); checkpoints by relative Frobenius distance (_assert_same_checkpoint).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_train_distributed import _assert_same_checkpoint, _metric, _val_losses
from test_train_loop import small_run, train_losses

from dsv3.config import ConfigError
from dsv3.train import Trainer

SECTIONS = dict(model={"num_hidden_layers": 4}, balance={"seq_aux_alpha": 0.5},
                train={"micro_batch_size": 4, "batch_size": 16, "batch_size_start": 8, "batch_ramp": 0.5, "steps": 6,
                       "ema_decay": 0.9},
                checkpoint={"interval": 3, "keep": 0}, log={"val_interval": 3})
ENV = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
SINGLE = [sys.executable, "-c", "import sys; from dsv3.cli import main; sys.exit(main())"]
STEPS = list(range(1, 7))


def _train(tmp: Path, name: str, nproc: int, *args: str) -> subprocess.CompletedProcess:
    cfg = tmp / f"{name}.json"
    if not cfg.exists():
        cfg.write_text(json.dumps(dict(small_run(tmp, "x", **SECTIONS).to_dict(), run_dir=str(tmp / name))))
    launcher = SINGLE if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                          "--nproc_per_node", str(nproc), "-m", "dsv3.cli"]
    r = subprocess.run(launcher + ["train", "--config", str(cfg), "--quiet", *args], env=ENV, capture_output=True,
                       text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def _resume_from(tmp: Path, src: str, step: int, name: str, nproc: int, *args: str) -> subprocess.CompletedProcess:
    """Run `src` cut back to its checkpoint of `step`, continued to the end in another layout."""
    shutil.copytree(tmp / src, tmp / name)
    for d in (tmp / name / "checkpoints").iterdir():
        if d.name != f"step_{step:08d}":
            shutil.rmtree(d)
    return _train(tmp, name, nproc, "--resume", "--run-dir", str(tmp / name), *args)


def _assert_matches_single(tmp: Path, single: Path, name: str, steps: list[int] = STEPS) -> None:
    """Run `name` logged the single-process run's `steps` (a resumed run: the source's up to its checkpoint, then its
    own), validation, and wrote the same final checkpoint (step steps[-1])."""
    got, ref = train_losses(tmp / name), train_losses(single)
    assert sorted(got) == steps, name
    assert [got[s] for s in steps] == pytest.approx([ref[s] for s in steps], rel=1e-5), name
    for key in ("main_loss", "mtp_loss", "aux_loss", "grad_norm"):
        assert _metric(tmp / name, key) == pytest.approx(_metric(single, key), rel=1e-4), (name, key)
    assert _val_losses(tmp / name) == pytest.approx(_val_losses(single), rel=1e-5), name
    ck = f"checkpoints/step_{steps[-1]:08d}"
    _assert_same_checkpoint(single / ck, tmp / name / ck, f"{name} {steps[-1]}")


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    return tmp_path_factory.mktemp("pp")


@pytest.fixture(scope="module")
def single(tmp):
    _train(tmp, "single", 1)
    assert min(_metric(tmp / "single", "aux_loss")) > 1.0      # the balance loss weighs in (alpha 0.5)
    return tmp / "single"


def test_pp2_matches_one_process_and_its_checkpoint_resumes_in_one_process(tmp, single):
    """pp 2 on 2 ranks (rank 0: chunks 0 and 3, rank 1: chunks 1 and 2), then its step-3 checkpoint (gathered from
    both pipeline ranks) continued in one plain process (parallel.pp=1)."""
    r = _train(tmp, "pp2", 2, "parallel.pp=2")
    assert "x 2 ranks (pp 2 x dp 1 x ep 1, DualPipeV)" in r.stderr and r.stderr.count("training ") == 1
    _assert_matches_single(tmp, single, "pp2")
    _assert_same_checkpoint(single / "checkpoints/step_00000003", tmp / "pp2/checkpoints/step_00000003", "pp2 3")
    r = _resume_from(tmp, "pp2", 3, "pp2_then_1", 1, "parallel.pp=1")
    assert "ranks" not in r.stderr and "from step 3" in r.stderr
    _assert_matches_single(tmp, single, "pp2_then_1")
    # the step after the PP checkpoint, taken in one process, is the step the PP run took
    assert train_losses(tmp / "pp2_then_1")[4] == pytest.approx(train_losses(tmp / "pp2")[4], rel=1e-6)


def test_pp2_ep2_with_overlap_and_recompute_matches_one_process(tmp, single):
    """pp 2 x ep 2 on 4 ranks with the F/B overlap and recomputation: every chunk's experts sharded over the ep pair
    of its pipeline position, each ep rank feeding its half of every micro-batch."""
    r = _train(tmp, "pp2ep2", 4, "parallel.pp=2", "parallel.ep=2", "parallel.overlap=true", "train.recompute=true")
    assert "x 4 ranks (pp 2 x dp 1 x ep 2, DualPipeV with F/B overlap)" in r.stderr
    _assert_matches_single(tmp, single, "pp2ep2")


def test_plain_checkpoint_resumes_at_pp2_dp2(tmp, single):
    """The single-process step-3 checkpoint continued at pp 2 x dp 2 on 4 ranks (every rank cutting its chunks out
    of the full checkpoint; the dp replicas averaging their gradients)."""
    r = _resume_from(tmp, "single", 3, "single_then_pp2dp2", 4, "parallel.pp=2")
    assert "x 4 ranks (pp 2 x dp 2 x ep 1, DualPipeV)" in r.stderr and "from step 3" in r.stderr
    _assert_matches_single(tmp, single, "single_then_pp2dp2")


def test_bad_pipeline_layouts_are_refused(tmp_path):
    for bad, match in (({"pp": 0}, r"parallel.pp=0: must be an integer >= 1"),
                       ({"pp": True}, r"parallel.pp=True: must be an integer >= 1"),
                       ({"pp": 2, "overlap": "yes"}, r"parallel.overlap='yes': must be true or false"),
                       ({"pp": 2, "fsdp": True, "overlap": True},
                        r"parallel.fsdp does not combine with parallel.overlap"),
                       ({"pp": 3}, r"parallel.pp=3 cuts the model into 6 DualPipeV chunks .*num_hidden_layers=4")):
        with pytest.raises(ConfigError, match=match):
            small_run(tmp_path, **{**SECTIONS, "parallel": bad})
    cfg = small_run(tmp_path, **{**SECTIONS, "parallel": {"pp": 2}})
    assert cfg.to_dict()["parallel"] == {"ep": 1, "fsdp": False, "zero1": False, "pp": 2, "overlap": False,
                                          "ep_dispatch": "flat", "ranks_per_node": 0,
                                          "fp8_dispatch": False, "timeout_minutes": 30.0}
    assert cfg.check_world(2) == 1 and cfg.check_world(4) == 2
    # rows per pipeline micro-batch: the smallest step (2 micro-batches) must give >= 4 micro-batches per pipeline
    assert cfg.pipeline_microbatch(1) == 2 and cfg.pipeline_microbatch(2) == 1
    with pytest.raises(ConfigError, match=r"parallel.pp=2 x parallel.ep=1 = 2 ranks does not divide the world size 3"):
        cfg.check_world(3)
    with pytest.raises(ConfigError, match=r"add parallel.pp=1"):
        cfg.check_world(1)
    with pytest.raises(ConfigError, match=r"micro_batch_size=4 must be a multiple of the dp \* ep = 8 ranks"):
        cfg.check_world(16)
    with pytest.raises(ConfigError, match=r"DualPipeV needs >= 4 micro-batches per step, .* only 2 rows"):
        cfg.check_world(8)                       # dp 4: one row per rank per micro-batch, 2 micro-batches
    ep2 = small_run(tmp_path, **{**SECTIONS, "parallel": {"pp": 2, "ep": 2}})
    assert ep2.check_world(4) == 1
    with pytest.raises(ConfigError, match=r"parallel.pp=2 x parallel.ep=2 = 4 ranks does not divide the world size 6"):
        ep2.check_world(6)
    with pytest.raises(ConfigError, match=r"add parallel.pp=1"):
        Trainer(cfg)                             # one process (no torchrun): world 1
