"""The sharded checkpoint format of `dsv3 train` under torchrun (checkpoint.format=auto at world > 1): a checkpoint
written by 8 gloo ranks (dp 4 x ep 2, FSDP) holds one `.distcp` file per writing rank and no gathered weights, and
resumes at 2 ranks (ep 2) and in one plain process with the next step's loss the 8-rank run took; a half-written
save (no manifest) is never resumed; `dsv3 export` of it streams tensor by tensor and writes exactly the files a
single-process export of the same weights writes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import subprocess

import pytest
from test_train_distributed import ENV, SINGLE, _torchrun
from test_train_loop import small_run

SECTIONS = dict(train={"micro_batch_size": 8, "batch_size": 8, "batch_size_start": 8, "steps": 3, "ema_decay": 0.9},
                model={"num_hidden_layers": 2}, checkpoint={"interval": 2, "keep": 0},
                log={"val_interval": 0})


def _train(tmp: Path, name: str, nproc: int, *args: str) -> None:
    cfg = tmp / f"{name}.json"
    if not cfg.exists():
        cfg.write_text(json.dumps(dict(small_run(tmp, "x", **SECTIONS).to_dict(), run_dir=str(tmp / name))))
    launcher = SINGLE if nproc == 1 else _torchrun(nproc)
    r = subprocess.run(launcher + ["train", "--config", str(cfg), "--quiet", *args], env=ENV, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[r.stderr.find("Traceback"):][:3000] or r.stderr[-3000:]


def _losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r.get("kind", "train") == "train" and "loss" in r}


@pytest.fixture(scope="module")
def eight(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("sharded")
    _train(tmp, "w8", 8, "parallel.ep=2", "parallel.fsdp=true")
    return tmp


def test_eight_rank_checkpoint_is_sharded_and_resumes_at_two_and_one(eight):
    tmp = eight
    ckpt = tmp / "w8" / "checkpoints" / "step_00000002"
    files = sorted(p.name for p in ckpt.iterdir())
    assert ".metadata" in files and "manifest.json" in files and "model.safetensors" not in files
    assert len([f for f in files if f.endswith(".distcp")]) == 8          # every rank wrote its own shard
    want = _losses(tmp / "w8")[3]
    for name, nproc, args in (("w2", 2, ["parallel.ep=2"]), ("w1", 1, ["parallel.ep=1"])):
        shutil.copytree(tmp / "w8", tmp / name)
        shutil.rmtree(tmp / name / "checkpoints" / "step_00000003")
        _train(tmp, "w8", nproc, "--resume", "--run-dir", str(tmp / name), *args)
        got = _losses(tmp / name)[3]
        assert abs(got - want) < 1e-4 * abs(want), (name, got, want)


def test_a_save_without_its_manifest_is_never_resumed(eight):
    from dsv3.train.checkpoint import newest_valid_checkpoint
    tmp = eight
    shutil.copytree(tmp / "w8", tmp / "cut")
    (tmp / "cut" / "checkpoints" / "step_00000003" / "manifest.json").unlink()
    best, skipped = newest_valid_checkpoint(tmp / "cut")
    assert best.name == "step_00000002" and "never finished" in skipped[0]
