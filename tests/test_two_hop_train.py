"""`dsv3 train` with parallel.ep_dispatch = "two_hop" through torchrun (4 gloo ranks playing 2 nodes of 2,
parallel.ranks_per_node=2, dp 1 x ep 4): the single-process losses and validation losses, the two-hop MoE really
run, and fewer bytes across the node boundary than the flat dispatch on the same run (group-limited routing mapped to
the nodes: 2 expert groups of 8, one per node, top-4 within 1 group). The same runs check the sharded EMA end to end:
its streamed `dsv3 export --ema` equals the single-process run's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train_loop import small_run, train_losses
from test_two_hop import Meter  # noqa: F401 - the worker's meter, imported here so a broken import fails loudly

from dsv3.config import ConfigError
from dsv3.train.metrics import read_metrics

SECTIONS = dict(model={"n_group": 2, "topk_group": 1},
                train={"micro_batch_size": 4, "batch_size": 8, "batch_size_start": 8, "steps": 4, "ema_decay": 0.5},
                checkpoint={"interval": 4, "keep": 0})
WORKER = Path(__file__).with_name("two_hop_train_worker.py")
ENV = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")


def _train(tmp: Path, name: str, nproc: int, *args: str) -> list[dict]:
    """`dsv3 train` of the shared config into tmp/name; the ranks' meter readings."""
    cfg = tmp / f"{name}.json"
    cfg.write_text(json.dumps(dict(small_run(tmp, "x", **SECTIONS).to_dict(), run_dir=str(tmp / name))))
    spy = tmp / f"{name}-spy"
    spy.mkdir()
    env = dict(ENV, SPY_DIR=str(spy), SPY_RANKS_PER_NODE="2")
    launcher = [sys.executable] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    r = subprocess.run(launcher + [str(WORKER), "train", "--config", str(cfg), "--quiet", *args], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return [json.loads((spy / f"rank{i}.json").read_text()) for i in range(nproc)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, dict]:
    tmp = tmp_path_factory.mktemp("twohoptrain")
    spy = {"single": _train(tmp, "single", 1),
           "two_hop": _train(tmp, "two_hop", 4, "parallel.ep=4", "parallel.ep_dispatch=\"two_hop\"",
                             "parallel.ranks_per_node=2"),
           "flat": _train(tmp, "flat", 4, "parallel.ep=4", "parallel.ranks_per_node=2")}
    return tmp, spy


def _val(run_dir: Path) -> list[float]:
    return [r["val_loss"] for r in read_metrics(run_dir, kind="val")]


def test_two_hop_training_matches_one_process_and_saves_inter_node_bytes(runs):
    tmp, spy = runs
    ref = train_losses(tmp / "single")
    for name in ("two_hop", "flat"):
        got = train_losses(tmp / name)
        assert sorted(got) == [1, 2, 3, 4], name
        assert [got[s] for s in range(1, 5)] == pytest.approx([ref[s] for s in range(1, 5)], rel=1e-5), name
        assert _val(tmp / name) == pytest.approx(_val(tmp / "single"), rel=1e-5), name
    assert all(r["two_hop_calls"] > 0 for r in spy["two_hop"]) and all(r["two_hop_calls"] == 0 for r in spy["flat"])
    sent = {name: sum(r["bytes"] for r in spy[name]) for name in ("two_hop", "flat")}
    # top-4 experts inside one node: ~1 row per (token, node) instead of ~2 per (token, remote experts)
    assert 0 < sent["two_hop"] < 0.6 * sent["flat"], sent


def test_sharded_ema_exports_like_one_process(runs):
    """The 4-rank run's EMA (each rank averaging a quarter of the replicated tensors and its own experts, written as
    rows of a sharded checkpoint) exported by `dsv3 export --ema` (streamed) equals the single-process run's; and it
    is the EMA, not the weights."""
    tmp, _ = runs
    out = {}
    for name, ema in (("single", True), ("two_hop", True), ("two_hop", False)):
        d = tmp / f"export-{name}-{ema}"
        r = subprocess.run([sys.executable, "-c", "import sys; from dsv3.cli import main; sys.exit(main())", "export",
                            str(tmp / name), str(d), *(["--ema"] if ema else [])], env=ENV, capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 0, r.stderr[-2000:]
        out[name, ema] = {k: v for f in sorted(d.glob("*.safetensors")) for k, v in load_file(str(f)).items()}
    a, b, weights = out["single", True], out["two_hop", True], out["two_hop", False]
    assert a.keys() == b.keys() == weights.keys() and len(a) > 20
    for k in a:           # fp32 training noise of a different summation order only (as the checkpoint tests)
        assert ((a[k] - b[k]).norm() / a[k].norm().clamp_min(1e-12)).item() < 1e-4, k
    moved = [k for k in a if not k.endswith("e_score_correction_bias") and not torch.equal(b[k], weights[k])]
    assert len(moved) > len(a) // 2, len(moved)


def test_two_hop_config_is_validated(tmp_path):
    with pytest.raises(ConfigError, match=r"parallel.ep_dispatch='hop': must be one of 'flat', 'two_hop'"):
        small_run(tmp_path, parallel={"ep_dispatch": "hop"})
    with pytest.raises(ConfigError, match=r"parallel.ranks_per_node=3 and parallel.ep=2: one must divide the other"):
        small_run(tmp_path, parallel={"ep": 2, "ep_dispatch": "two_hop", "ranks_per_node": 3})
    with pytest.raises(ConfigError, match=r"parallel.ep_dispatch=two_hop does not combine with parallel.overlap"):
        small_run(tmp_path, model={"num_hidden_layers": 4},
                  parallel={"pp": 2, "ep": 2, "overlap": True, "ep_dispatch": "two_hop"})
    # one process: nothing to dispatch, the key is kept (a two-hop run resumes in one process with parallel.ep=1)
    cfg = small_run(tmp_path, parallel={"ep_dispatch": "two_hop", "ranks_per_node": 8})
    assert cfg.parallel.ep_dispatch == "two_hop"
