"""train.init_from pointing at a Hugging Face directory (bf16, or the released FP8 layout with weight_scale_inv): each
rank reads only the tensors and rows it holds (dsv3.train.hf_shards.load_hf_owned), never the whole model in fp32
(`load_pretrained` / `source_tensors`, the old path: 64 GB per rank for a 16B model); a sharded checkpoint likewise
(torch.distributed.checkpoint, the model entries only; the old path read the model, EMA and optimizer state whole).
The run's starting weights equal the whole-model load's bit for bit, in one process and over 2 gloo ranks (ep 2; dp 2
with FSDP)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import build
from test_dist_audit import ENV_SRC
from test_parallel_construct import _check
from test_train_loop import small_run

import dsv3.checkpoint
from dsv3.checkpoint import save_pretrained
from dsv3.config import ConfigError
from dsv3.train.init_from import find_source, source_tensors

# each rank's Trainer from train.init_from: its rows of every tensor and the bytes it read from the files
RANK_SCRIPT = """
import os, sys, torch
import dsv3.checkpoint, dsv3.train.checkpoint, dsv3.train.init_from as fi, dsv3.train.trainer as tr
from dsv3.parallel.materialize import owned_parameters
from dsv3.train.config import RunConfig
def refuse(*a, **k):
    raise AssertionError("the whole model was loaded")
dsv3.checkpoint.load_pretrained = refuse
tr.source_tensors = refuse
dsv3.train.checkpoint.read_tensors = refuse
read, load = [], fi.load_hf_owned
fi.load_hf_owned = lambda *a: read.append(load(*a)) or read[-1]
t = tr.Trainer(RunConfig.from_dict(__import__("json").load(open(sys.argv[1]))))
rows = {o.name: (o.start, o.local.detach().clone()) for o in owned_parameters(t.local.roots, buffers=True)
        if not o.local.is_meta}
torch.save({"hf": rows, "read": read}, os.path.join(sys.argv[2], f"rank{os.environ['RANK']}.pt"))
"""


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """The run's own model saved as a Hugging Face directory, bf16 in several shards and FP8 with block scales."""
    tmp = tmp_path_factory.mktemp("init_hf")
    model = build(small_run(tmp).model, seed=5)
    save_pretrained(model, tmp / "bf16", dtype=torch.bfloat16, max_shard_size="200KB")
    save_pretrained(model, tmp / "fp8", dtype=torch.bfloat16, quantize_fp8=True)
    return {"bf16": tmp / "bf16", "fp8": tmp / "fp8"}


def _run(tmp_path, hf, parallel: dict | None = None, **train):
    return small_run(tmp_path, "run", model={"preset": str(hf)}, train={"init_from": str(hf), "steps": 2, **train},
                     log={"val_interval": 0}, parallel=parallel or {})


def _refuse_whole_model_loads(monkeypatch) -> None:
    def refuse(*a, **k):
        raise AssertionError("the whole model was loaded")
    monkeypatch.setattr(dsv3.checkpoint, "load_pretrained", refuse)
    monkeypatch.setattr("dsv3.train.trainer.source_tensors", refuse)
    monkeypatch.setattr("dsv3.train.checkpoint.read_tensors", refuse)


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory):
    """A one-process run that wrote the sharded format (checkpoint.format), EMA on: its step-2 checkpoint."""
    from dsv3.train import Trainer
    t = Trainer(small_run(tmp_path_factory.mktemp("sharded_src"), "src", train={"steps": 2, "ema_decay": 0.9},
                          checkpoint={"interval": 2, "format": "sharded"}, log={"val_interval": 0}))
    t.run()
    return t.run_dir


@pytest.mark.parametrize("kind", ["bf16", "fp8"])
def test_one_process_starts_from_the_whole_model_loads_values_without_loading_it(tmp_path, hf_dirs, kind,
                                                                                   monkeypatch):
    from dsv3.train import Trainer
    want = source_tensors(find_source(hf_dirs[kind]))        # the old path: the whole model in fp32
    _refuse_whole_model_loads(monkeypatch)                   # fails on the old code
    got = Trainer(_run(tmp_path, hf_dirs[kind])).model.state_dict()
    assert got.keys() == want.keys()
    for k, v in got.items():
        assert v.dtype == want[k].dtype and torch.equal(v, want[k]), k


def test_one_process_starts_from_a_sharded_checkpoints_model_entries_only(tmp_path, sharded_run, monkeypatch):
    from dsv3.train import Trainer
    from dsv3.train.checkpoint import read_tensors
    source = find_source(sharded_run)
    want = read_tensors(source.checkpoint)["model"]           # the old path: model, EMA and optimizer state whole
    _refuse_whole_model_loads(monkeypatch)                     # fails on the old code
    run = small_run(tmp_path, "run", model={"preset": str(sharded_run)}, log={"val_interval": 0},
                    train={"init_from": str(sharded_run), "steps": 2})
    got = Trainer(run).model.state_dict()
    assert got.keys() == want.keys()
    assert all(torch.equal(v, want[k]) for k, v in got.items())


def test_a_damaged_hf_source_is_one_line_naming_the_key_and_the_file(tmp_path, hf_dirs):
    from dsv3.train import Trainer
    src = tmp_path / "src"
    shutil.copytree(hf_dirs["bf16"], src)
    shard = sorted(src.glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(ConfigError, match=rf"^invalid run config: train.init_from='{src}': cannot read tensor .* "
                                          rf"from {shard}") as e:
        Trainer(_run(tmp_path, src))
    assert "\n" not in str(e.value)


def test_tensors_that_do_not_match_are_refused_before_the_run_writes_a_file(tmp_path, hf_dirs):
    """The names are checked with the config (the index only), before the run directory exists: on the old path
    the whole model was read after the run's first files were written."""
    from dsv3.train import Trainer
    src = tmp_path / "src"
    shutil.copytree(hf_dirs["bf16"], src)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    gone = "model.layers.1.self_attn.o_proj.weight"
    del index["weight_map"][gone]
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ConfigError, match=rf"^invalid run config: train.init_from='{src}': .*missing tensors: "
                                          rf"{gone}.*set model.num_nextn_predict_layers=0\)$"):
        Trainer(_run(tmp_path, src))
    assert not (tmp_path / "run").exists()


def test_sft_from_a_hf_base_reads_it_rank_by_rank(tmp_path, monkeypatch):
    """Post-training's starting point (sft.init a Hugging Face directory) goes the same way: the Trainer reads each
    rank's rows; the base is never loaded whole (it was, in fp32, by dsv3.posttrain.base.load_base)."""
    from posttrain_fixture import conversation, make_base, write_chat

    from dsv3.posttrain.sft import sft_trainer
    base = make_base(tmp_path / "base")
    want = dsv3.checkpoint.load_pretrained(base, dtype=torch.float32)
    data = write_chat(tmp_path / "chat.jsonl", [conversation(a, b) for a in range(1, 5) for b in range(1, 5)])
    run = {"run_dir": str(tmp_path / "sft"), "sft": {"init": str(base), "train_files": [str(data)]},
           "data": {"seq_len": 64}, "train": {"steps": 2, "batch_size": 4, "micro_batch_size": 2, "device": "cpu",
                                              "dtype": "fp32"}, "log": {"progress": False, "tensorboard": False}}
    (tmp_path / "sft.json").write_text(json.dumps(run))
    _refuse_whole_model_loads(monkeypatch)
    monkeypatch.setattr("dsv3.posttrain.base.load_model_and_tokenizer", lambda *a, **k: pytest.fail("loaded whole"))
    trainer, _ = sft_trainer(tmp_path / "sft.json", [])
    assert trainer.cfg.model == want.config
    got = trainer.model.state_dict()
    assert got.keys() == want.state_dict().keys()
    assert all(torch.equal(v, want.state_dict()[k]) for k, v in got.items())


def _two_ranks(tmp_path, cfg) -> list[dict]:
    """Each rank's Trainer under torchrun (2 gloo ranks): its rows of every tensor, the bytes it read of a HF source."""
    (tmp_path / "run.json").write_text(json.dumps(cfg.to_dict()))
    (tmp_path / "rank.py").write_text(RANK_SCRIPT)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(tmp_path / "rank.py"), str(tmp_path / "run.json"), str(tmp_path)], env=ENV_SRC,
                       capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    return [torch.load(tmp_path / f"rank{i}.pt", weights_only=False) for i in range(2)]


BATCH = {"micro_batch_size": 4, "batch_size": 8, "batch_size_start": 8}


@pytest.mark.parametrize("kind, parallel", [("fp8", {"ep": 2}), ("bf16", {"fsdp": True})], ids=["ep2", "dp2-fsdp"])
def test_two_ranks_hold_the_whole_loads_rows_and_each_reads_a_part(tmp_path, hf_dirs, kind, parallel):
    ranks = _two_ranks(tmp_path, _run(tmp_path, hf_dirs[kind], parallel, **BATCH))
    ref = dsv3.checkpoint.load_pretrained(hf_dirs[kind], dtype=torch.float32)     # the single-process load
    _check(ranks, "hf", {**{n: p.detach() for n, p in ref.named_parameters()}, **dict(ref.named_buffers())})
    files = sum(f.stat().st_size for f in hf_dirs[kind].glob("*.safetensors"))
    assert all(len(res["read"]) == 1 and res["read"][0] < 0.7 * files for res in ranks), \
        ([res["read"] for res in ranks], files)


def test_two_ranks_start_from_a_sharded_checkpoints_rows(tmp_path, sharded_run):
    from dsv3.train.checkpoint import read_tensors
    cfg = small_run(tmp_path, "run", model={"preset": str(sharded_run)}, log={"val_interval": 0},
                    parallel={"ep": 2}, train={"init_from": str(sharded_run), "steps": 2, **BATCH})
    ranks = _two_ranks(tmp_path, cfg)
    want = read_tensors(find_source(sharded_run).checkpoint)["model"]
    _check(ranks, "hf", want)
    assert all(res["read"] == [] for res in ranks)
