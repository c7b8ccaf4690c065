"""The trainer layouts' global gradient norm (the clipping input) against the norm of the known full gradient, with
synthetic per-rank gradients in which the routed experts carry most of the norm (the tiny model's real experts carry
~1e-4 of it, so an expert shard counted twice or missed would hide inside the trainer tests' tolerances)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("layout_norm_worker.py")


@pytest.mark.parametrize("nproc, pp, ep", [(4, 1, 1), (4, 1, 2), (4, 2, 2), (4, 2, 1)])
def test_global_grad_norm_counts_every_element_once(tmp_path, nproc, pp, ep):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
                        str(WORKER), str(pp), str(ep), str(tmp_path)], env=env, capture_output=True, text=True,
                       timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads([line for line in r.stdout.splitlines() if line.startswith("{")][-1])
    assert out["norm"] == pytest.approx(out["reference"], rel=1e-9), out
