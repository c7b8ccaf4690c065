"""Audit of the distributed training (parallel.*): cases the layout tests did not pin, each against the single
process as the reference."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch

from dsv3.train.metrics import read_metrics
from posttrain_fixture import conversation, make_base, write_chat

# held-out conversations whose assistant turns differ in length, so their loss tokens do too; three of them in
# batches of two rows: a full batch whose rows each hold a different number of loss tokens, then a batch of one row
LONG = {"messages": [{"role": "user", "content": "Explain 2 + 3."},
                     {"role": "assistant", "content": "<think>" + "add the two numbers, " * 2 + "</think>"
                                                      "<answer>5</answer>"}]}


def _sft_file(tmp, base, data, eval_data, name) -> str:
    d = {"run_dir": str(tmp / name), "sft": {"init": str(base), "train_files": [str(data)],
                                             "eval_files": [str(eval_data)]},
         "optim": {"lr": 3e-3}, "data": {"seq_len": 64},
         "train": {"steps": 1, "batch_size": 2, "micro_batch_size": 2, "device": "cpu", "dtype": "fp32"},
         "log": {"interval": 1, "val_interval": 1, "val_batches": 2, "tensorboard": False, "progress": False},
         "checkpoint": {"interval": 0, "keep": 0}}
    path = tmp / f"{name}.json"
    path.write_text(json.dumps(d))
    return str(path)


def test_sft_validation_under_expert_parallelism_is_the_single_process_one(tmp_path):
    """`dsv3 sft` validation at dp 1 x ep 2 and under FSDP (every rank validates its rows of every batch): the eval loss
    is the single process's, the mean over each batch's loss tokens. Before: each rank's mean over its own loss tokens
    was averaged (rows with more loss tokens counted less), and a batch of fewer rows than ranks gave a rank no rows."""
    from test_train_distributed import ENV, SINGLE, _torchrun
    base = make_base(tmp_path / "base")
    data = write_chat(tmp_path / "chat.jsonl", [conversation(a, b) for a in range(1, 5) for b in range(1, 5)])
    eval_data = write_chat(tmp_path / "eval.jsonl", [conversation(1, 2), LONG, conversation(30, 40)])
    val = {}
    runs = (("one", SINGLE, [], ""), ("ep2", _torchrun(2), ["parallel.ep=2"], "dp 1 x ep 2"),
            ("fsdp2", _torchrun(2), ["parallel.fsdp=true"], "(FSDP)"))
    for name, launcher, extra, layout in runs:
        r = subprocess.run(launcher + ["sft", "--config", _sft_file(tmp_path, base, data, eval_data, name),
                                       "--quiet", *extra], env=ENV, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        assert layout in r.stderr
        val[name] = read_metrics(tmp_path / name, kind="val")
    for name in ("ep2", "fsdp2"):
        assert len(val[name]) == len(val["one"]) == 1
        for key in ("val_loss", "val_mtp_loss", "val_mtp_acc", "val_mtp_agree"):
            assert val[name][0][key] == pytest.approx(val["one"][0][key], rel=1e-5), (name, key)


def _fp8_dispatch_worker(rank: int, init_file: str, tmp) -> None:
    import torch
    from conftest import init_gloo
    from test_parallel_construct import _cfg, _parallelized
    init_gloo(rank, 2, init_file)
    ids = torch.randint(0, 384, (2, 16), generator=torch.Generator().manual_seed(rank))
    out = {}
    for fp8 in (False, True):
        model, _, _ = _parallelized(_cfg(micro=2, fsdp=True, fp8_dispatch=fp8))
        with torch.no_grad():
            out[fp8] = model(ids)
    torch.save(out, tmp / f"rank{rank}.pt")


def test_fp8_dispatch_is_a_no_op_without_expert_parallelism_under_fsdp(tmp_path):
    """parallel.fp8_dispatch is "a no-op with ep == 1" (ParallelConfig): there is no dispatch to send in FP8. Under
    FSDP with ep = 1 the experts still become ExpertParallelExperts (over a group of one rank, for their dp-column
    sharding), and before the fix they took the flag and quantised every expert input to E4M3 with nothing sent."""
    from conftest import run_ranks
    for rank, out in enumerate(run_ranks(_fp8_dispatch_worker, 2, tmp_path, "fp8_dispatch")):
        assert torch.equal(out[True], out[False]), rank


@pytest.mark.parametrize("fmt", ["auto", "sharded"])
def test_an_ema_turned_on_at_resume_starts_from_the_resumed_weights(tmp_path, fmt):
    """A run saved without an EMA (train.ema_decay = 0) and resumed with one (a resume may change train.*): the EMA
    must start from the weights the checkpoint holds. Before, it kept the random initialisation the Trainer was
    built with (the checkpoint had no EMA to load over it), so the exported average mixed in untrained weights."""
    from dsv3.train import Trainer
    from test_train_loop import small_run
    sections = dict(checkpoint={"interval": 2, "keep": 0, "format": fmt}, log={"val_interval": 0})
    Trainer(small_run(tmp_path, "run", train={"steps": 2, "ema_decay": 0.0}, **sections)).run()
    t = Trainer(small_run(tmp_path, "run", train={"steps": 4, "ema_decay": 0.9}, **sections), resume=True)
    t.logger.close()
    assert t.step == 2
    ema = t.ema.state_dict()
    weights = dict(t.model.named_parameters())
    assert ema.keys() == weights.keys()
    for name, w in weights.items():
        assert torch.equal(ema[name], w.detach().float()), name
