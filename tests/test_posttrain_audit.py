"""Audit of `dsv3 sft | grpo | distill` as a demanding user would run them: a GRPO run stopped by SIGINT in the middle
of a batch of rollouts (updates_per_batch > 1) resumes to exactly the uninterrupted run; config values that cannot
work are one-line errors naming `section.key` before anything is written (missing files, group size vs batch,
teacher vocabulary); a reward that raises or returns NaN stops the run with a message naming it, not a traceback
deep in the trainer."""

import json
import os
import signal
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dsv3.config import ConfigError
from dsv3.posttrain.grpo import grpo_trainer
from dsv3.posttrain.sft import sft_trainer
from dsv3.train.metrics import read_metrics
from dsv3.train.signals import StopSignals
from dsv3.train.trainer import TrainingInterrupted

sys.path.insert(0, str(Path(__file__).parent))
from posttrain_fixture import conversation, make_base, write_chat  # noqa: E402


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_base(tmp_path_factory.mktemp("audit") / "base", seed=2)


class LengthMod3:
    """A model-based reward stand-in: scores that differ within groups. `interrupt_on`: the call that sends this
    process SIGINT (as a user's Ctrl-C during that step's rollouts)."""

    def __init__(self, interrupt_on: int = 0):
        self.calls, self.interrupt_on = 0, interrupt_on

    def __call__(self, prompts, responses):
        self.calls += 1
        if self.calls == self.interrupt_on:
            os.kill(os.getpid(), signal.SIGINT)
        return [float(len(r) % 3) for r in responses]


def grpo_file(tmp: Path, base: Path, name: str, grpo: dict | None = None, **sections) -> Path:
    d = {"run_dir": str(tmp / name),
         "grpo": {"init": str(base), "train_prompts": 40, "prompts_per_step": 2, "group_size": 4,
                  "max_new_tokens": 8, "overlong_filter": False, "correct_weight": 0.0, "format_weight": 0.0,
                  "updates_per_batch": 2, **(grpo or {})},
         "optim": {"lr": 3e-3}, "train": {"steps": 4, "micro_batch_size": 4, "device": "cpu", "dtype": "fp32"},
         "log": {"interval": 1, "tensorboard": False, "progress": False}, "checkpoint": {"interval": 4, "keep": 0}}
    for k, v in sections.items():
        d[k] = {**d.get(k, {}), **v}
    path = tmp / f"{name}.json"
    path.write_text(json.dumps(d))
    return path


def _losses(run):
    return {m["step"]: (m["loss"], m["reward"]) for m in read_metrics(run, kind="train")}


def same_weights(run_a, run_b, step: int) -> bool:
    """The two runs' checkpoints of `step` hold bit-identical weights."""
    a, b = (load_file(str(r / "checkpoints" / f"step_{step:08d}" / "model.safetensors")) for r in (run_a, run_b))
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_grpo_sigint_mid_batch_resumes_exactly(base, tmp_path):
    full = grpo_trainer(grpo_file(tmp_path, base, "full"), [], reward_model=LengthMod3())
    full.run()
    # the same run, Ctrl-C during step 1's rollouts: it stops after step 1, half-way through its batch (mu = 2)
    cut = grpo_trainer(grpo_file(tmp_path, base, "cut"), [], reward_model=LengthMod3(interrupt_on=1))
    with pytest.raises(TrainingInterrupted), StopSignals(announce=False) as stop:
        cut.run(stop)
    assert cut.step == 1
    resumed = grpo_trainer(None, [], resume=True, run_dir=str(tmp_path / "cut"), reward_model=LengthMod3())
    assert resumed.step == 1
    resumed.run()
    assert _losses(tmp_path / "cut") == _losses(full.run_dir)
    assert same_weights(full.run_dir, tmp_path / "cut", step=4)


@pytest.mark.parametrize("grpo,sections,match", [
    ({"task": "code", "task_file": "/nonexistent/code.jsonl"}, {}, "grpo.task_file"),
    ({"init": "/nonexistent/base"}, {}, "grpo.init"),
    ({}, {"train": {"batch_size": 6}}, "train.batch_size"),
])
def test_grpo_config_errors_name_the_key_before_writing(base, tmp_path, grpo, sections, match):
    with pytest.raises(ConfigError, match=match):
        grpo_trainer(grpo_file(tmp_path, base, "bad", grpo, **sections), [])
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("bad_reward,match", [
    (lambda prompts, responses: 1 / 0, "reward model raised ZeroDivisionError"),
    (lambda prompts, responses: [float("nan")] * len(prompts), "non-finite"),
])
def test_a_reward_that_fails_stops_the_run_with_its_reason(base, tmp_path, bad_reward, match):
    t = grpo_trainer(grpo_file(tmp_path, base, "r"), [], reward_model=bad_reward)
    with pytest.raises(ValueError, match=match):
        t.run()


def sft_file(tmp: Path, base: Path, name: str, **sft) -> Path:
    d = {"run_dir": str(tmp / name), "sft": {"init": str(base), "train_files": [str(tmp / "chat.jsonl")], **sft},
         "data": {"seq_len": 64}, "train": {"steps": 2, "batch_size": 2, "micro_batch_size": 2, "device": "cpu",
                                           "dtype": "fp32"},
         "log": {"interval": 1, "tensorboard": False, "progress": False, "val_interval": 0}}
    path = tmp / f"{name}.json"
    path.write_text(json.dumps(d))
    return path


@pytest.mark.parametrize("sft,match", [
    ({"train_files": ["/nonexistent/chat.jsonl"]}, "sft.train_files: /nonexistent/chat.jsonl does not exist"),
    ({"eval_files": ["/nonexistent/eval.jsonl"]}, "sft.eval_files: /nonexistent/eval.jsonl does not exist"),
    ({"train_files": ["chat.txt"]}, "sft.train_files: chat.txt is not a .jsonl or .parquet file"),
    ({"init": "/nonexistent/base"}, "sft.init: /nonexistent/base is not a directory"),
])
def test_sft_missing_files_name_the_key_before_writing(base, tmp_path, sft, match):
    write_chat(tmp_path / "chat.jsonl", [conversation(1, 2)] * 4)
    with pytest.raises(ConfigError, match=match):
        sft_trainer(sft_file(tmp_path, base, "bad", **sft), [])
    assert not (tmp_path / "bad").exists()


def test_sft_bad_chat_rows_name_file_and_line(base, tmp_path):
    rows = [conversation(1, 2), "not json", {"messages": [{"role": "tool", "content": "x"}]},
            {"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "a"}]},
            conversation(3, 4)]
    data = write_chat(tmp_path / "chat.jsonl", rows)
    _, lines = sft_trainer(sft_file(tmp_path, base, "ok", eval_fraction=0.0), [])
    assert f"{data}:2: not JSON" in lines[0] and "2 conversations kept, 3 dropped" in lines[0]
    with pytest.raises(ValueError, match=f"{data}:2: not JSON"):
        sft_trainer(sft_file(tmp_path, base, "strict", strict=True), [])
    assert not (tmp_path / "strict").exists()


def _student_with_vocab(out: Path, like: Path, extra: int) -> Path:
    """A base with `like`'s tokenizer files and a model vocabulary `extra` ids larger (padded, as exports may be)."""
    import shutil

    from dsv3 import Transformer
    from dsv3.checkpoint import save_pretrained
    from posttrain_fixture import tiny_model_config
    vocab = json.loads((like / "config.json").read_text())["vocab_size"]
    with torch.device("meta"):
        model = Transformer(tiny_model_config(vocab + extra))
    model.to_empty(device="cpu")
    model.init_weights()
    save_pretrained(model, out)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(like / f, out / f)
    return out


def test_distill_logit_pairs_are_checked_before_the_teacher_runs(base, tmp_path):
    from dsv3.posttrain.distill import distill_trainer
    student = _student_with_vocab(tmp_path / "student", base, extra=8)
    d = {"run_dir": str(tmp_path / "kd"), "distill": {"teacher": str(base), "init": str(student), "mode": "logit",
                                                       "prompts": 4, "samples": 1, "max_new_tokens": 4},
         "train": {"steps": 1, "batch_size": 2, "micro_batch_size": 2, "device": "cpu", "dtype": "fp32"}}
    (tmp_path / "kd.json").write_text(json.dumps(d))
    with pytest.raises(ConfigError, match="vocab_size"):
        distill_trainer(tmp_path / "kd.json", [])
    assert not (tmp_path / "kd").exists()             # no teacher samples were drawn, nothing written
    with pytest.raises(ConfigError, match="distill.teacher: /nonexistent is not a directory"):
        distill_trainer(tmp_path / "kd.json", ['distill.teacher="/nonexistent"'])


@pytest.mark.parametrize("override, says", [
    (["distill.mode=\"logit\"", "distill.top_k=100000"], "distill.top_k=100000 must be at most"),   # a traceback
    (["distill.max_new_tokens=100000"], "exceed the teacher's context"),        # a cache sized past the context
    (["distill.samples=3", "distill.temperature=0"], "the same greedy answer"),
])
def test_distill_settings_the_teacher_cannot_use_are_refused_before_anything_is_written(base, tmp_path, override,
                                                                                        says):
    from dsv3.posttrain.distill import distill_trainer
    d = {"run_dir": str(tmp_path / "kd"), "distill": {"teacher": str(base), "init": str(base), "prompts": 4,
                                                       "samples": 1, "max_new_tokens": 4},
         "train": {"steps": 1, "batch_size": 2, "micro_batch_size": 2, "device": "cpu", "dtype": "fp32"}}
    (tmp_path / "kd.json").write_text(json.dumps(d))
    with pytest.raises(ConfigError, match=says):
        distill_trainer(tmp_path / "kd.json", override)
    assert not (tmp_path / "kd").exists()


@pytest.mark.parametrize("kind", ["sft", "grpo", "distill"])
def test_shipped_configs_validate(kind):
    from dsv3.posttrain.config import read_posttrain_dict, section_from_table
    d = read_posttrain_dict(kind, Path(__file__).parent.parent / "configs" / f"{kind}.toml", [])
    section = section_from_table(kind, d[kind])
    assert section.init


def test_sft_sigint_resumes_exactly(base, tmp_path):
    write_chat(tmp_path / "chat.jsonl", [conversation(a, b) for a in range(6) for b in range(3)])
    over = ["train.steps=4", "optim.lr=3e-3"]
    full, _ = sft_trainer(sft_file(tmp_path, base, "full", eval_fraction=0.0), over)
    full.run()
    cut, _ = sft_trainer(sft_file(tmp_path, base, "cut", eval_fraction=0.0), over)
    batches, calls = cut.loader.next_batch, []

    def next_batch(rows):                      # Ctrl-C while step 2's batch is read
        calls.append(rows)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return batches(rows)
    cut.loader.next_batch = next_batch
    with pytest.raises(TrainingInterrupted), StopSignals(announce=False) as stop:
        cut.run(stop)
    assert cut.step == 2
    resumed, _ = sft_trainer(None, [], resume=True, run_dir=str(tmp_path / "cut"))
    assert resumed.step == 2
    resumed.run()
    assert _losses_sft(tmp_path / "cut") == _losses_sft(full.run_dir)
    assert same_weights(full.run_dir, tmp_path / "cut", step=4)


def _losses_sft(run):
    return {m["step"]: m["loss"] for m in read_metrics(run, kind="train")}


def test_grpo_resume_on_other_prompts_is_refused(base, tmp_path):
    """grpo.digits (or task, ops, the task file's rows, the tokenizer) changed on --resume: as many prompts with the
    same seed passed the position's check, and the run went on over other prompts from the old position."""
    run = tmp_path / "run"
    grpo_trainer(grpo_file(tmp_path, base, "run", train={"steps": 1}, checkpoint={"interval": 1}), []).run()
    with pytest.raises(ValueError, match=r"prompt position is for other prompts .*grpo.task, digits"):
        grpo_trainer(None, ["grpo.digits=3"], resume=True, run_dir=str(run))
    assert grpo_trainer(None, [], resume=True, run_dir=str(run)).step == 1      # as it was: resumes


def test_sft_resume_on_other_conversations_is_refused(base, tmp_path):
    """The chat file edited between a stop and --resume (as many rows, other content): the position (epoch, cursor)
    was taken on the new conversations without a word."""
    data = write_chat(tmp_path / "chat.jsonl", [conversation(a, 1) for a in range(6)])
    sft_trainer(sft_file(tmp_path, base, "run", eval_fraction=0.0), ["train.steps=1", "checkpoint.interval=1"])[0].run()
    write_chat(data, [conversation(a, 2) for a in range(6)])
    with pytest.raises(ValueError, match=r"SFT data position is for other conversations .*sft.train_files' content"):
        sft_trainer(None, [], resume=True, run_dir=str(tmp_path / "run"))
    write_chat(data, [conversation(a, 1) for a in range(6)])
    assert sft_trainer(None, [], resume=True, run_dir=str(tmp_path / "run"))[0].step == 1


def test_sft_with_every_row_dropped_says_why(base, tmp_path):
    """Every conversation dropped (here: each longer than data.seq_len + 1, what a row of seq_len inputs holds): the
    error said only 'every row was dropped or the files are empty', not which rows or why."""
    data = write_chat(tmp_path / "chat.jsonl", [conversation(10 ** 30, b) for b in range(3)])
    with pytest.raises(ValueError, match=rf"sft.train_files: no conversation to train on: 0 conversations kept, 3 "
                                         rf"dropped \(3 longer than 17 tokens\); first: {data}:1: longer"):
        sft_trainer(sft_file(tmp_path, base, "run"), ["data.seq_len=16"])
    assert not (tmp_path / "run").exists()
