"""`parallel.timeout_minutes` under torchrun (2 gloo ranks, tiny fp32): a bad value is refused naming the key; a
rank that stalls (a test-only hook: rank 1 waits on a file the test controls while it builds the trainer) makes the
other give up within the timeout with one line naming the setting, and the job exits non-zero instead of hanging
(gloo's default would wait 30 minutes). A sharded save's shards are hashed for the manifest by the ranks that wrote
them, not all by rank 0 while the others wait."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from test_dist_audit import ENV_SRC, TORCHRUN, _error_lines, write_config
from test_train_loop import small_run

from dsv3.config import ConfigError
from dsv3.train.checkpoint import verify_checkpoint

# rank 1 stalls, once its groups are made and before the signal handlers are installed (so the launcher's SIGTERM
# ends it at once), until STOP exists (the test creates it when done, so nothing outlives it)
STALL_RANK_1 = """
import os, sys, time
from pathlib import Path
from dsv3.train.trainer import Trainer
from dsv3.cli import main
prepare = Trainer._prepare_steps
def stalling(self):
    while os.environ["RANK"] == "1" and not Path(os.environ["STOP"]).exists():
        time.sleep(0.05)
    return prepare(self)
Trainer._prepare_steps = stalling
sys.exit(main())
"""

# every rank notes the files it hashes for a manifest
NOTE_HASHES = """
import os, sys
from pathlib import Path
from dsv3.train import checkpoint
from dsv3.cli import main
sha = checkpoint.file_sha256
def noting(path):
    with open(os.environ["NOTES"] + "." + os.environ["RANK"], "a") as f:
        f.write(Path(path).parent.name + "/" + Path(path).name + "\\n")
    return sha(path)
checkpoint.file_sha256 = noting
sys.exit(main())
"""


@pytest.mark.parametrize("value", [0, -1, "10", float("inf"), 1e300])   # 1e300: timedelta's OverflowError before
def test_a_bad_timeout_is_refused_naming_the_key(tmp_path, value):
    with pytest.raises(ConfigError, match=r"parallel\.timeout_minutes=.*must be a number in \(0, 1e\+06\]"):
        small_run(tmp_path, parallel={"timeout_minutes": value})


def test_a_stalled_rank_makes_the_other_stop_within_the_timeout_naming_the_setting(tmp_path):
    cfg = write_config(tmp_path)
    stop = tmp_path / "stop"
    script = tmp_path / "stall_rank_1.py"
    script.write_text(STALL_RANK_1)
    env = dict(ENV_SRC, STOP=str(stop))
    try:
        # 0.25 min: room for rank 0 building the token cache while rank 1 waits, far below gloo's 30 min default
        r = subprocess.run(TORCHRUN + [str(script), "train", "--quiet", "--config", str(cfg),
                                       "parallel.timeout_minutes=0.25"], check=False, env=env, cwd=tmp_path,
                           capture_output=True, text=True, timeout=120)
    finally:
        stop.touch()
    assert r.returncode != 0
    lines = [ln for ln in _error_lines(r.stderr) if "rank 0 of 2" in ln]
    assert len(lines) == 1 and "parallel.timeout_minutes" in lines[0] and "Timed out waiting 15000ms" in lines[0], \
        r.stderr[-3000:]
    assert "Traceback" not in r.stderr.split("elastic")[0], r.stderr[-3000:]   # the worker's: one line, no trace
    assert "exitcode  : 1" in r.stderr, r.stderr[-3000:]


def test_each_rank_hashes_its_share_of_a_checkpoint_when_saving_and_resuming(tmp_path):
    cfg = write_config(tmp_path)
    script = tmp_path / "note_hashes.py"
    script.write_text(NOTE_HASHES)

    def hashed(*args: str) -> dict[int, list[str]]:
        notes = tmp_path / f"hashed-{len(list(tmp_path.glob('hashed-*')))}"
        r = subprocess.run(TORCHRUN + [str(script), "train", "--quiet", *args], check=False,
                           env=dict(ENV_SRC, NOTES=str(notes)), cwd=tmp_path, capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 0, r.stderr[-3000:]
        return {rank: [ln.split("/")[1] for ln in Path(f"{notes}.{rank}").read_text().split()] for rank in (0, 1)}
    saved = hashed("--config", str(cfg), "train.steps=4")
    assert "__1_0.distcp" in saved[1] and "__1_0.distcp" not in saved[0], saved      # each its own, at once
    assert "__0_0.distcp" in saved[0] and "state.json" in saved[0], saved
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000004"
    verify_checkpoint(ckpt)                                               # the manifest covers both shards
    resumed = hashed("--resume", "--run-dir", str(tmp_path / "run"))     # nothing left to train: only the check
    listed = set(json.loads((ckpt / "manifest.json").read_text())["files"])
    assert set(resumed[0]) | set(resumed[1]) == listed and resumed[1] and not set(resumed[0]) & set(resumed[1])
