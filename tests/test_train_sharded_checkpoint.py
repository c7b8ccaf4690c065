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


EXPORT_SCRIPT = """
import sys, torch
from pathlib import Path
from dsv3.train.export import export_sharded
torch.set_num_threads(1)
# the resident size now, with the peak reset to it (Linux: clear_refs 5), so that the imports' peak cannot hide
# the export's; then the peak (VmHWM) after
def rss(key):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key))
open("/proc/self/clear_refs", "w").write("5")
before = rss("VmRSS:")
if sys.argv[3] == "whole":         # the check's own control: loading the whole model must exceed the bound
    from dsv3.train.export import _load
    _load(Path(sys.argv[1]))
else:
    export_sharded(Path(sys.argv[1]), Path(sys.argv[2]), max_shard_size="4MB")
print(rss("VmHWM:") - before)
"""


def test_streamed_export_is_bit_exact_and_never_holds_the_model(tmp_path):
    """A sharded checkpoint of a ~140 MB model (written here by one process: the format is the same) exported
    streamed in a fresh process: its peak resident memory grows by less than half the model (loading the whole model
    grows it by more than the model: the measurement's control), and the files equal a
    single-process export (the whole model loaded, then save_pretrained) byte for byte."""
    from dsv3.checkpoint import save_pretrained
    from dsv3.parallel.dcp import owned_state
    from dsv3.train.checkpoint import save_sharded
    from dsv3.train.export import load_run_model
    from dsv3.train.trainer import build_model
    cfg = small_run(tmp_path, "run", model={"num_hidden_layers": 10, "hidden_size": 256, "moe_intermediate_size": 256,
                                            "n_routed_experts": 16, "vocab_size": 2048})
    model = build_model(cfg, "cpu")
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    assert total > 100e6
    ckpt = save_sharded(cfg.run_dir, 1, owned_state([model]), {}, cfg.to_dict())
    del model
    grew = {}
    for how in ("streamed", "whole"):
        r = subprocess.run(SINGLE[:1] + ["-c", EXPORT_SCRIPT, str(ckpt), str(tmp_path / "streamed"), how], env=ENV,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        grew[how] = int(r.stdout.split()[-1])
    assert grew["streamed"] < 0.5 * total < total < grew["whole"], (grew, total)
    whole, _ = load_run_model(cfg.run_dir)
    save_pretrained(whole, tmp_path / "single", max_shard_size="4MB")
    names = sorted(p.name for p in (tmp_path / "single").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "streamed").iterdir()) and len(names) > 10
    for n in names:
        assert (tmp_path / "single" / n).read_bytes() == (tmp_path / "streamed" / n).read_bytes(), n
