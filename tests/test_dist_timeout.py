"""`parallel.timeout_minutes` under torchrun (2 gloo ranks, tiny fp32): a bad value is refused naming the key; a
rank that stalls (a test-only hook: rank 1 waits on a file the test controls while it builds the trainer) makes the
other give up within the timeout with one line naming the setting, and the job exits non-zero instead of hanging
(gloo's default would wait 30 minutes)."""

from __future__ import annotations

import subprocess

import pytest
from test_dist_audit import ENV_SRC, TORCHRUN, _error_lines, write_config
from test_train_loop import small_run

from dsv3.config import ConfigError

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


@pytest.mark.parametrize("value", [0, -1, "10", float("inf")])
def test_a_bad_timeout_is_refused_naming_the_key(tmp_path, value):
    with pytest.raises(ConfigError, match=r"parallel\.timeout_minutes=.*must be a number > 0"):
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
