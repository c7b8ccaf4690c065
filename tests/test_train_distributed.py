"""`dsv3 train` through torchrun (2 gloo ranks, plain data parallelism): the same per-step losses and final weights
as one process on the same global batches, and a checkpoint in the single-process format."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from dsv3.train import load_run_model
from test_train_loop import small_run, train_losses


def test_torchrun_data_parallel_matches_one_process(tmp_path):
    cfg = small_run(tmp_path, "x", train={"micro_batch_size": 4, "batch_size": 8, "batch_size_start": 4, "steps": 8},
                    checkpoint={"interval": 4, "keep": 0})
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    runs = {}
    for name, launcher in (("single", [sys.executable, "-c", "import sys; from dsv3.cli import main; sys.exit(main())"]),
                           ("dp2", [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                                    "2", "-m", "dsv3.cli"])):
        d = dict(cfg.to_dict(), run_dir=str(tmp_path / name))
        (tmp_path / f"{name}.json").write_text(json.dumps(d))
        r = subprocess.run(launcher + ["train", "--config", str(tmp_path / f"{name}.json"), "--quiet"], env=env,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        runs[name] = r
    assert "x 2 data-parallel ranks" in runs["dp2"].stderr and runs["dp2"].stderr.count("training ") == 1
    single, dp = train_losses(tmp_path / "single"), train_losses(tmp_path / "dp2")
    assert sorted(dp) == list(range(1, 9))
    # the same global batches; only the all-reduce's summation order differs (fp32)
    assert [dp[s] for s in sorted(dp)] == pytest.approx([single[s] for s in sorted(single)], rel=1e-5)
    a, _ = load_run_model(tmp_path / "single")
    b, _ = load_run_model(tmp_path / "dp2")        # rank 0 wrote the usual single-process checkpoint
    # Adam divides by sqrt(v): where a gradient is ~0 its rounding noise moves a weight by up to lr, so compare
    # each tensor as a whole (relative Frobenius distance), not element by element
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        if x.is_floating_point():
            assert ((x - y).norm() / x.norm().clamp_min(1e-12)).item() < 1e-3, name
