"""`dsv3 sft` on the pre-training Trainer: the batches' targets are exactly the assistant tokens, the loss falls,
resume is exact, bad rows are counted, the [sft] table is validated, and the run exports like a pre-training run."""

import json
import shutil
import subprocess

import pytest
import torch

from dsv3.cli import main
from dsv3.config import ConfigError
from dsv3.posttrain.chat_data import encode_conversation
from dsv3.posttrain.sft import ChatBatches, sft_trainer
from dsv3.train.metrics import read_metrics
from posttrain_fixture import conversation, make_base, write_chat

ROWS = [conversation(a, b) for a in range(1, 7) for b in range(1, 7)]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sft")
    base = make_base(tmp / "base")
    bad = ['{"messages": [{"role": "bot", "content": "x"}]}', "not json", {"messages": [{"role": "user",
                                                                                         "content": "hi"}]}]
    data = write_chat(tmp / "chat.jsonl", ROWS + bad)
    return tmp, base, data


def run_file(tmp, base, data, name, **sections):
    d = {"run_dir": str(tmp / name), "sft": {"init": str(base), "train_files": [str(data)], "eval_fraction": 0.2},
         "optim": {"lr": 3e-3}, "data": {"seq_len": 64},
         "train": {"steps": 8, "batch_size": 4, "micro_batch_size": 2, "device": "cpu", "dtype": "fp32"},
         "log": {"interval": 1, "val_interval": 4, "val_batches": 2, "tensorboard": False, "progress": False},
         "checkpoint": {"interval": 4, "keep": 0}}
    for k, v in sections.items():
        d.setdefault(k, {}).update(v)
    path = tmp / f"{name}.json"
    path.write_text(json.dumps(d))
    return path


def test_batch_targets_are_exactly_the_assistant_tokens(files):
    tmp, base, _ = files
    from dsv3.data import Tokenizer
    tok = Tokenizer.load(base)
    exs = [encode_conversation(tok, r["messages"]) for r in ROWS[:5]]
    src = ChatBatches(tok, exs, [], rows=3, val_batches=0, seed=1)
    window, targets = src.next_batch(3)
    assert targets.shape == (3, window.shape[1] - 1)
    order = src.order[:3]
    for b, i in enumerate(order):
        e = exs[i]
        want = [e.ids[t + 1] if e.loss_mask[t + 1] else -100 for t in range(len(e.ids) - 1)]
        want += [-100] * (targets.shape[1] - len(want))
        assert targets[b].tolist() == want
        # independently: the loss tokens decode to the assistant content and its EOS
        loss_ids = [t for t in targets[b].tolist() if t != -100]
        assert tok.decode(loss_ids) == ROWS[i]["messages"][1]["content"] + "<｜end▁of▁sentence｜>"
        assert window[b, :len(e.ids)].tolist() == e.ids


def test_data_position_round_trips_and_epochs_reshuffle(files):
    tmp, base, _ = files
    from dsv3.data import Tokenizer
    tok = Tokenizer.load(base)
    exs = [encode_conversation(tok, r["messages"]) for r in ROWS[:5]]
    a = ChatBatches(tok, exs, [], 2, 0, seed=3)
    for _ in range(4):                       # 8 rows: into the second epoch
        a.next_batch(2)
    b = ChatBatches(tok, exs, [], 2, 0, seed=3)
    b.load_state_dict(a.state_dict())
    for _ in range(3):
        assert all(torch.equal(x, y) for x, y in zip(a.next_batch(2), b.next_batch(2)))
    with pytest.raises(ValueError, match="data files or sft.seed changed"):
        ChatBatches(tok, exs[:4], [], 2, 0, seed=3).load_state_dict(a.state_dict())


@pytest.fixture(scope="module")
def full(files):
    tmp, base, data = files
    trainer, lines = sft_trainer(run_file(tmp, base, data, "full"), [])
    trainer.run()
    return trainer.run_dir, lines


def test_bad_rows_counted_and_reported(full):
    run, lines = full
    assert "36 conversations kept, 3 dropped" in lines[0] and "unknown role" in lines[0] and "not JSON" in lines[0]
    events = [r["message"] for r in read_metrics(run, kind="event")]
    assert any("3 dropped" in e for e in events)
    assert json.loads((run / "sft_data.json").read_text())["train_dropped"] == {
        "unknown role 'bot'": 1, "not JSON": 1, "no assistant turn": 1}


def test_sft_loss_falls_and_eval_loss_is_logged(files):
    tmp, base, data = files
    trainer, _ = sft_trainer(run_file(tmp, base, data, "long", train={"steps": 20}, log={"val_interval": 20},
                                      checkpoint={"interval": 0}), [])
    first = trainer.evaluate()["val_loss"]
    trainer.run()
    losses = [r["main_loss"] for r in read_metrics(trainer.run_dir, kind="train")]
    val = read_metrics(trainer.run_dir, kind="val")[-1]["val_loss"]
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5, losses
    assert val < 0.7 * first, (first, val)


def test_resume_is_exact(full, files):
    run, _ = full
    tmp = files[0]
    resumed = tmp / "resumed"
    shutil.copytree(run, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_00000008")
    assert main(["sft", "--resume", "--run-dir", str(resumed), "--quiet"]) == 0
    losses = lambda r: {m["step"]: m["loss"] for m in read_metrics(r, kind="train")}  # noqa: E731
    assert losses(resumed) == losses(run) and len(losses(run)) == 8
    from safetensors.torch import load_file
    a = load_file(str(run / "checkpoints" / "step_00000008" / "model.safetensors"))
    b = load_file(str(resumed / "checkpoints" / "step_00000008" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_export_and_generate_from_the_sft_run(full, files):
    run, _ = full
    out = files[0] / "hf"
    assert main(["export", str(run), str(out)]) == 0
    from dsv3.posttrain.base import load_model_and_tokenizer
    model, tok = load_model_and_tokenizer(out)
    assert model.config.vocab_size == tok.vocab_size or model.config.vocab_size >= tok.vocab_size


@pytest.mark.parametrize("override,match", [
    ("sft.epochs=-1", "sft.epochs=-1"), ("sft.bogus=1", "unknown keys \\['bogus'\\] in \\[sft\\]"),
    ("sft.train_files=3", "sft.train_files=3"), ('sft.init=""', "sft.init"),
    ("model.hidden_size=8", "comes from sft.init"),
    # the run file sets train.steps=8: sft.epochs would replace it without a word
    ("sft.epochs=1", "train.steps=8 and sft.epochs=1")])
def test_config_errors_name_the_key(files, override, match):
    tmp, base, data = files
    with pytest.raises(ConfigError, match=match):
        sft_trainer(run_file(tmp, base, data, "bad"), [override])


def test_an_eval_file_with_no_conversation_is_refused(files):
    """sft.eval_files naming an empty file trained on without any eval loss, logging "eval data 0 conversations"."""
    tmp, base, data = files
    empty = tmp / "empty_eval.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="sft.eval_files: no conversation to evaluate on"):
        sft_trainer(run_file(tmp, base, data, "noeval"), [f"sft.eval_files={json.dumps([str(empty)])}"])
    assert not (tmp / "noeval").exists()


def test_tokens_count_the_positions_trained_on(files):
    """An SFT step's tokens are its batches' positions (rows x (padded length - 1)), not micro-batches x
    data.seq_len: short conversations padded to their batch's longest made tokens and tok/s several times too high."""
    tmp, base, data = files
    trainer, _ = sft_trainer(run_file(tmp, base, data, "count", train={"steps": 3}, checkpoint={"interval": 0}), [])
    seen, read = [], trainer.loader.next_batch
    trainer.loader.next_batch = lambda rows: seen.append(read(rows)) or seen[-1]
    trainer.run()
    want = sum(ids.shape[0] * (ids.shape[1] - 1) for ids, _ in seen)
    cfg = trainer.cfg
    assert trainer.tokens == want < 3 * cfg.train.batch_size * cfg.data.seq_len
    assert read_metrics(trainer.run_dir, kind="train")[-1]["tokens"] == want


@pytest.mark.parametrize("mbs", [1, 2])
def test_micro_batching_does_not_change_the_step(files, mbs):
    """The step's loss is the mean CE over all its loss tokens (and each MTP depth's over its own), however the
    batch is split into micro-batches: a batch of 4 rows as 4 / mbs micro-batches gives the losses and gradients of
    one micro-batch of 4 (train.micro_batch_size is a memory setting). Rows carry different numbers of loss tokens,
    so a mean of micro-batch means (the old step) differs."""
    tmp, base, data = files
    out = {}
    for m in (4, mbs):
        trainer, _ = sft_trainer(run_file(tmp, base, data, f"mb{m}_{mbs}", train={"micro_batch_size": m}), [])
        assert len(trainer.model.mtp) and trainer.cfg.train.batch_size == 4
        trainer.step_tokens = 0
        _, sums = trainer._forward_backward(4 // m, 0.3, trainer.cfg.balance.seq_aux_alpha)
        out[m] = sums, {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    (s_whole, g_whole), (s_split, g_split) = out[4], out[mbs]
    torch.testing.assert_close(s_split[:3], s_whole[:3], rtol=2e-6, atol=1e-7)     # total, main, MTP
    assert g_whole.keys() == g_split.keys()
    for name, g in g_whole.items():
        torch.testing.assert_close(g_split[name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_two_expert_parallel_ranks_take_the_single_process_steps(files):
    """`torchrun` SFT on 2 ranks (dp 1 x ep 2): each rank's rows hold a different number of assistant tokens, and
    the step is still the single process's (the CE over all the step's loss tokens; the old step averaged the two
    ranks' means, 3e-3 off after two steps)."""
    from test_train_distributed import ENV, SINGLE, _torchrun
    tmp, base, data = files
    runs = {}
    for name, launcher, extra in (("one", SINGLE, []), ("ep2", _torchrun(2), ["parallel.ep=2"])):
        r = subprocess.run(launcher + ["sft", "--config", str(run_file(tmp, base, data, f"ranks_{name}",
                                                                          train={"steps": 3},
                                                                          checkpoint={"interval": 0})),
                                       "--quiet", *extra], env=ENV, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        runs[name] = {m["step"]: m for m in read_metrics(tmp / f"ranks_{name}", kind="train")}
    assert "dp 1 x ep 2" in r.stderr
    for step, want in runs["one"].items():
        got = runs["ep2"][step]
        assert got["tokens"] == want["tokens"]
        for key in ("loss", "main_loss", "mtp_loss"):
            assert got[key] == pytest.approx(want[key], rel=1e-6), (step, key)


@pytest.mark.parametrize("log,held", [({"val_interval": 0}, 0), ({"val_interval": 4, "val_batches": 1}, 18)])
def test_no_conversation_is_held_out_for_an_eval_that_never_runs(files, log, held):
    """sft.eval_fraction held out its share of the training conversations even where no eval ran (log.val_interval
    = 0, the post-training default: 18 of 36 here): neither trained on nor scored, dropped without a word."""
    tmp, base, data = files
    name = f"held{held}"
    trainer, lines = sft_trainer(run_file(tmp, base, data, name, sft={"eval_fraction": 0.5}, log=log), [])
    assert len(trainer.loader.examples) == len(ROWS) - held and len(trainer.loader.val) == (1 if held else 0)
    assert f"eval: {held} held-out conversations" in lines
    trainer.run()
    resumed, _ = sft_trainer(None, ["train.steps=9"], resume=True, run_dir=str(tmp / name))   # the run's split
    assert len(resumed.loader.examples) == len(ROWS) - held


def test_a_conversation_of_seq_len_plus_one_tokens_is_kept(tmp_path):
    """A conversation of n tokens feeds the model n - 1 (the last is only a target), as pre-training's windows of
    seq_len + 1 do: one of data.seq_len + 1 tokens trains and evaluates, at data.seq_len = max_position_embeddings
    (the tightest the config allows); one token more is dropped."""
    from dsv3.data import Tokenizer
    tok = Tokenizer.load(make_base(tmp_path / "probe"))
    fits, longer = conversation(12, 30), conversation(12, 30)
    longer["messages"][0]["content"] += " Think."
    n = len(encode_conversation(tok, fits["messages"]).ids)
    assert len(encode_conversation(tok, longer["messages"]).ids) > n
    base = make_base(tmp_path / "base", max_positions=n - 1)
    data = write_chat(tmp_path / "chat.jsonl", [fits, longer])
    trainer, lines = sft_trainer(run_file(tmp_path, base, data, "fit", sft={"eval_files": [str(data)]},
                                          train={"steps": 1, "batch_size": 1, "micro_batch_size": 1},
                                          log={"val_interval": 1, "val_batches": 1}, checkpoint={"interval": 0}),
                                 [f"data.seq_len={n - 1}"])
    assert f"1 conversations kept, 1 dropped (1 longer than {n} tokens)" in lines[0]
    window, targets = trainer.loader.next_batch(1)
    assert window.shape == (1, n) and targets.shape == (1, n - 1)      # the model reads seq_len = n - 1 tokens
    trainer.run()
    assert read_metrics(trainer.run_dir, kind="train")[-1]["tokens"] == n - 1
    assert read_metrics(trainer.run_dir, kind="val")[-1]["val_loss"] > 0


def train_base(tmp, name: str, steps: int, **model):
    """A tiny training run as sft.init: its checkpoint at `steps`."""
    from dsv3.train import Trainer
    from test_train_loop import small_run
    run = Trainer(small_run(tmp, name, train={"steps": steps}, checkpoint={"interval": steps, "keep": 0},
                            log={"val_interval": 0}, model=model))
    run.run()
    run.run_lock.close()
    return tmp / name


def test_a_resume_reads_the_base_checkpoint_the_run_started_from(files, tmp_path):
    """sft.init a training run that saved a newer checkpoint after the SFT run started, of another shape: a resume
    read the base run's latest checkpoint again, so the model config (and tokenizer, chat template) came from
    another checkpoint than the run's (here the SFT checkpoint no longer fitted the model; with the same shape the
    data or template could change silently). The checkpoints pin the base; a resume reads that one, refuses it gone
    (one line naming sft.init, and where a resume of the base run set it aside, if it did) or saved again."""
    from dsv3.posttrain.pinned import checkpoint_fingerprint
    base, ckpts = train_base(tmp_path, "base", 2), tmp_path / "base" / "checkpoints"
    deeper = train_base(tmp_path, "deeper", 6, num_hidden_layers=3)
    t, _ = sft_trainer(run_file(tmp_path, base, files[2], "full", train={"steps": 4}, checkpoint={"interval": 2}), [])
    t.run()
    t.run_lock.close()
    resumed = tmp_path / "resumed"
    shutil.copytree(t.run_dir, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_00000004")
    shutil.copytree(deeper / "checkpoints" / "step_00000006", ckpts / "step_00000006")     # the base moves on
    r, _ = sft_trainer(None, [], resume=True, run_dir=str(resumed))
    assert r.cfg.model.num_hidden_layers == 2 and r.pins["base"] == t.pins["base"]
    assert t.pins["base"]["checkpoint"] == "step_00000002"
    r.run()
    r.run_lock.close()
    losses = lambda run: {m["step"]: m["loss"] for m in read_metrics(run, kind="train")}  # noqa: E731
    assert losses(resumed) == losses(t.run_dir) and len(losses(resumed)) == 4
    shutil.rmtree(resumed / "checkpoints" / "step_00000004")

    def refused() -> str:
        with pytest.raises(ConfigError) as e:
            sft_trainer(None, [], resume=True, run_dir=str(resumed))
        assert "\n" not in str(e.value)
        return str(e.value)
    pinned, kept = ckpts / "step_00000002", tmp_path / "kept"
    shutil.move(pinned, kept)
    assert refused() == (f"invalid config: sft.init='{base}': its checkpoint step_00000002, the run's base model, "
                         f"is gone; restore it or start a new run")
    # set aside by a resume of the base run that went back past it (dsv3.train.run_dir.set_aside_newer's names),
    # beside another history of that step, which is not the pinned one (its manifest differs)
    other, aside = ckpts / "rewound" / "step_00000002-1600000000", ckpts / "rewound" / "step_00000002-1700000000"
    shutil.copytree(deeper / "checkpoints" / "step_00000006", other)
    assert "is gone; restore it or start a new run" in refused()
    shutil.move(kept, aside)
    assert refused().endswith(f"is gone; it was set aside by a resume of that run that went back past it: move "
                              f"{aside} back to {pinned} to resume")
    shutil.copytree(other, pinned)             # that run's other history of the step in its place: saved again
    assert checkpoint_fingerprint(pinned) != t.pins["base"]["fingerprint"]
    assert f"was saved again), so the run would go on against another model than it started with; move {pinned} " \
           f"aside and {aside} back to {pinned} to resume" in refused()
    shutil.rmtree(pinned)
    shutil.move(aside, pinned)
    r, _ = sft_trainer(None, [], resume=True, run_dir=str(resumed))
    assert r.step == 2 and r.pins["base"] == t.pins["base"]
    r.run_lock.close()


def test_a_run_from_before_pins_resumes_as_it_did(full, files):
    """A run whose checkpoints pin no base (written before pins) resumes, reading sft.init as a fresh run does,
    and pins that base from then on."""
    from dsv3.posttrain.pinned import read_pin
    from dsv3.train.checkpoint import write_manifest
    run, tmp = full[0], files[0]
    old = tmp / "unpinned"
    shutil.copytree(run, old)
    shutil.rmtree(old / "checkpoints" / "step_00000008")
    ckpt = old / "checkpoints" / "step_00000004"
    state = json.loads((ckpt / "state.json").read_text())
    assert state.pop("base")["checkpoint"] is None          # a Hugging Face base: its fingerprint
    (ckpt / "state.json").write_text(json.dumps(state))
    write_manifest(ckpt)
    assert read_pin(ckpt, "base") is None
    trainer, _ = sft_trainer(None, [], resume=True, run_dir=str(old))
    trainer.run()
    trainer.run_lock.close()
    losses = lambda r: {m["step"]: m["loss"] for m in read_metrics(r, kind="train")}  # noqa: E731
    assert losses(old) == losses(run)
    assert read_pin(old / "checkpoints" / "step_00000008", "base") == read_pin(run / "checkpoints" / "step_00000008",
                                                                              "base")
