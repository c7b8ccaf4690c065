"""Audit of `dsv3 train` under torchrun (2 gloo ranks, tiny fp32) as a user who makes mistakes and whose machines
fail: a bad layout is one line and every rank exits at once, writing nothing; a rank that fails alone is named and
the others do not wait in a collective; a truncated shard of one rank makes every rank resume the previous
checkpoint; SIGTERM to the launcher saves every rank's shard of one step and says how to resume.
(Resharding to other world sizes / layouts and the DP == one-process equivalence across a resume:
tests/test_train_distributed.py, test_train_sharded_checkpoint.py; a save killed before its manifest:
test_train_sharded_checkpoint.py.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_train_distributed import ENV, SECTIONS, _assert_same_tensors
from test_train_loop import small_run, train_losses

from dsv3.train.checkpoint import read_tensors, verify_checkpoint

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
ENV_SRC = dict(ENV, PYTHONPATH=os.pathsep.join(filter(None, [str(Path(__file__).parents[1] / "src"),
                                                             ENV.get("PYTHONPATH")])))

# a rank that fails alone, as bad data read by that rank only would: rank 1's third step raises
FAIL_ON_RANK_1 = """
import os, sys
from dsv3.train.trainer import Trainer
from dsv3.cli import main
step = Trainer.train_step
def failing(self):
    if os.environ["RANK"] == "1" and self.step == 2:
        raise ValueError("batch 2 holds token id 999 >= model.vocab_size=384")
    return step(self)
Trainer.train_step = failing
sys.exit(main())
"""


@pytest.fixture(scope="module")
def cfg(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("dist_audit")
    path = tmp / "run.json"
    path.write_text(json.dumps(dict(small_run(tmp, "x", **SECTIONS).to_dict(), run_dir=str(tmp / "run"))))
    return path


def _torchrun(cfg: Path, *args: str, script: list[str] | None = None, timeout: float = 120
              ) -> subprocess.CompletedProcess:
    return subprocess.run(TORCHRUN + (script or ["-m", "dsv3.cli"]) + ["train", "--quiet", *args], env=ENV_SRC,
                          cwd=cfg.parent, capture_output=True, text=True, timeout=timeout)


def _error_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("dsv3 train:")]


@pytest.mark.parametrize("override, says", [
    ("parallel.ep=4", "parallel.ep=4 does not divide the world size 2"),
    ("train.batch_size=6", "train.batch_size=6 is not a multiple of train.micro_batch_size=4"),
    ("train.micro_batch_size=1", "must be a multiple of the 2 ranks"),
    ("parallel.pp=2", "parallel.pp=2 cuts the model into 4 DualPipeV chunks"),
    ("parallel.pp=2 model.num_hidden_layers=4 train.micro_batch_size=1 train.batch_size=2 train.batch_size_start=2",
     "DualPipeV needs >= 4 micro-batches per step"),
])
def test_a_bad_layout_is_one_line_every_rank_exits_and_nothing_is_written(cfg, override, says):
    run_dir = cfg.parent / f"bad_{override.split('=')[0]}"
    # timeout: no rank may be left waiting in a collective (gloo's default would be 30 minutes)
    r = _torchrun(cfg, "--config", str(cfg), f"run_dir={run_dir}", *override.split(), timeout=60)
    assert r.returncode != 0
    lines = _error_lines(r.stderr)
    assert len(lines) == 1 and says in lines[0], r.stderr[-3000:]      # once, not once per rank
    assert "exitcode  : 2" in r.stderr and r.stderr.count("exitcode  : 2") <= 2   # the ranks' own status
    assert not run_dir.exists()


def test_a_rank_that_fails_alone_is_named_and_the_others_do_not_hang(cfg, tmp_path):
    script = tmp_path / "fail_on_rank_1.py"
    script.write_text(FAIL_ON_RANK_1)
    run_dir = cfg.parent / "fails_alone"
    r = _torchrun(cfg, "--config", str(cfg), f"run_dir={run_dir}", script=[str(script)], timeout=60)
    assert r.returncode != 0
    assert "dsv3 train: rank 1 of 2: error: batch 2 holds token id 999" in r.stderr, r.stderr[-3000:]
    assert not list((run_dir / "checkpoints").glob("step_*"))          # no checkpoint was due before step 4


def test_a_truncated_shard_makes_every_rank_resume_the_previous_checkpoint(cfg):
    run_dir = cfg.parent / "run"
    r = _torchrun(cfg, "--config", str(cfg))
    assert r.returncode == 0, r.stderr[-3000:]
    first = train_losses(run_dir)
    whole = read_tensors(run_dir / "checkpoints" / "step_00000008")        # the uninterrupted run's final state
    shard = run_dir / "checkpoints" / "step_00000008" / "__1_0.distcp"      # rank 1's shard of the newest
    with open(shard, "r+b") as f:
        f.truncate(100)
    r = _torchrun(cfg, "--resume", "--run-dir", str(run_dir))        # the same 8 steps: the same LR schedule
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"skipping checkpoint step_00000008: {shard.relative_to(cfg.parent)} has 100 bytes" in r.stderr or \
        f"skipping checkpoint step_00000008: {shard} has 100 bytes" in r.stderr, r.stderr[-3000:]
    assert "resumed from" in r.stderr and "step_00000004" in r.stderr
    # both ranks took step 4: steps 5-8 retrace the first run's losses (a rank on other weights would not)
    again = train_losses(run_dir)
    for step in range(5, 9):
        assert again[step] == pytest.approx(first[step], rel=1e-5, abs=1e-6), step
    verify_checkpoint(run_dir / "checkpoints" / "step_00000008")   # the bad save was replaced by a whole one
    # and the resumed run ends where the uninterrupted one did: weights, EMA, AdamW moments (fp32, the same order)
    again_whole = read_tensors(run_dir / "checkpoints" / "step_00000008")
    _assert_same_tensors(whole["model"], again_whole["model"], "model", tol=1e-5)
    _assert_same_tensors(whole["ema"], again_whole["ema"], "ema", tol=1e-5)
    for name, st in whole["optim"].items():
        _assert_same_tensors(st, again_whole["optim"][name], name, tol=1e-4)


def test_a_run_whose_only_checkpoint_lacks_a_shard_is_refused_once_naming_the_file(cfg, tmp_path):
    run_dir = cfg.parent / "no_shard"
    r = _torchrun(cfg, "--config", str(cfg), f"run_dir={run_dir}", "train.steps=4", timeout=90)
    assert r.returncode == 0, r.stderr[-3000:]
    shard = run_dir / "checkpoints" / "step_00000004" / "__1_0.distcp"
    shard.unlink()
    kept = sorted(p.name for p in shard.parent.iterdir())
    r = _torchrun(cfg, "--resume", "--run-dir", str(run_dir), timeout=60)
    assert r.returncode != 0
    lines = _error_lines(r.stderr)
    assert len(lines) == 1 and "no checkpoint of" in lines[0] and "__1_0.distcp is missing" in lines[0], \
        r.stderr[-3000:]
    assert sorted(p.name for p in shard.parent.iterdir()) == kept          # nothing deleted


def test_sigterm_to_the_launcher_saves_every_rank_shard_of_one_step_and_says_how_to_resume(cfg):
    run_dir = cfg.parent / "sigterm"
    p = subprocess.Popen(TORCHRUN + ["-m", "dsv3.cli", "train", "--quiet", "--config", str(cfg),
                                     f"run_dir={run_dir}", "train.steps=400"],
                         env=ENV_SRC, cwd=cfg.parent, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 90
        while not (run_dir / "checkpoints" / "step_00000004").exists():
            assert p.poll() is None and time.monotonic() < deadline, "the run ended before its first checkpoint"
            time.sleep(0.2)
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert "SIGTERM: stopping after this step and saving a checkpoint" in err, err[-3000:]
    assert f"Resume with: torchrun --standalone --nproc_per_node 2 -m dsv3.cli train --resume --run-dir {run_dir}" \
        in err, err[-3000:]
    newest = sorted((run_dir / "checkpoints").glob("step_*"))[-1]
    assert f"saved {newest}" in err
    verify_checkpoint(newest)                     # the manifest lists both ranks' shards, intact
    assert {f.name for f in newest.glob("*.distcp")} == {"__0_0.distcp", "__1_0.distcp"}
    assert json.loads((newest / "state.json").read_text())["step"] == int(newest.name.split("_")[1])
