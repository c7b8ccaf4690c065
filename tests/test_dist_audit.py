"""Audit of `dsv3 train` under torchrun (2 gloo ranks, tiny fp32) as a user who makes mistakes and whose machines
fail: a bad layout is one line and every rank exits at once, writing nothing; a rank that fails alone is named and
the others do not wait in a collective. Resume and signals: test_dist_audit_resume.py.
(Resharding to other world sizes / layouts and DP2 == one process: test_train_distributed.py,
test_train_sharded_checkpoint.py, test_train_pipeline*.py; a save killed before its manifest:
test_train_sharded_checkpoint.py.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_train_distributed import ENV, SECTIONS
from test_train_loop import small_run

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


def write_config(tmp: Path) -> Path:
    """The shared run config (tests/test_train_distributed.py's: checkpoints at steps 4 and 8), run_dir tmp/run."""
    path = tmp / "run.json"
    path.write_text(json.dumps(dict(small_run(tmp, "x", **SECTIONS).to_dict(), run_dir=str(tmp / "run"))))
    return path


@pytest.fixture(scope="module")
def cfg(tmp_path_factory) -> Path:
    return write_config(tmp_path_factory.mktemp("dist_audit"))


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
