"""Audit of `dsv3 train` under torchrun (2 gloo ranks, tiny fp32), continued from test_dist_audit.py: a truncated
shard of one rank makes every rank resume the previous checkpoint (and the resumed run ends where the uninterrupted
one did); a run whose only checkpoint lacks a shard is refused once, naming the file; SIGTERM to the launcher saves
every rank's shard of one step and says how to resume."""

from __future__ import annotations

import json
import signal
import subprocess
import time

import pytest
from test_dist_audit import ENV_SRC, TORCHRUN, _error_lines, _torchrun, write_config
from test_train_distributed import _assert_same_tensors
from test_train_loop import train_losses

from dsv3.train.checkpoint import read_tensors, verify_checkpoint


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    return write_config(tmp_path_factory.mktemp("dist_audit_resume"))

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
    # ... which rank 0 set aside first (the other rank waiting on its word), not overwrote: the damaged shard kept
    [aside] = (run_dir / "checkpoints" / "rewound").iterdir()
    assert aside.name.startswith("step_00000008-") and (aside / "__1_0.distcp").stat().st_size == 100
    assert r.stderr.count(f"step_00000008 -> {aside}") == 1, r.stderr[-3000:]
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
