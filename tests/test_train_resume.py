"""What a start finds in a run directory: damaged checkpoints (named, skipped by --resume for the newest intact one),
what killed saves left, an earlier start's metrics (refused; --overwrite), and, after a divergence, a last checkpoint
from before the blow-up with advice that works."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from dsv3.checkpoint import CheckpointError
from dsv3.cli import main
from dsv3.train import Trainer, TrainingDiverged, export_run
from dsv3.train.checkpoint import checkpoint_dirs
from dsv3.train.metrics import read_metrics
from test_train_loop import small_run, train_losses

SECTIONS = dict(train={"steps": 8}, checkpoint={"interval": 4, "keep": 0}, log={"val_interval": 0})


def train(tmp: Path, name: str, **sections) -> Path:
    t = Trainer(small_run(tmp, name, **{**SECTIONS, **sections}))
    t.run()
    return t.run_dir


@pytest.fixture(scope="module")
def full(tmp_path_factory) -> Path:
    return train(tmp_path_factory.mktemp("resume"), "full")


def damaged_copy(full: Path, tmp: Path, file: str, how: str) -> Path:
    run = tmp / how
    shutil.copytree(full, run)
    f = run / "checkpoints" / "step_00000008" / file
    data = bytearray(f.read_bytes())
    if how == "truncated":
        data = data[:len(data) // 2]
    else:                                               # garbled: the size is right, bytes inside are not
        data[len(data) // 2:len(data) // 2 + 64] = bytes(64)
    f.write_bytes(bytes(data))
    return run


@pytest.mark.parametrize("file,how", [("model.safetensors", "truncated"), ("optimizer.pt", "garbled")])
def test_a_damaged_latest_checkpoint_is_named_and_resume_takes_the_newest_intact_one(full, tmp_path, file, how,
                                                                                     capsys):
    run = damaged_copy(full, tmp_path, file, how)
    bad = run / "checkpoints" / "step_00000008" / file
    with pytest.raises(CheckpointError, match=f"{bad}.*(truncated|corrupted).*newest valid checkpoint is "
                                              f"step_00000004"):
        export_run(run, tmp_path / "hf")
    assert main(["train", "--resume", "--run-dir", str(run), "--quiet"]) == 0
    err = capsys.readouterr().err
    skipped = [ln for ln in err.splitlines() if "skipping checkpoint step_00000008" in ln]
    assert len(skipped) == 1 and str(bad) in skipped[0], err
    assert "resumed from" in err and "step_00000004 (the newest valid checkpoint)" in err
    assert train_losses(run) == train_losses(full)                    # steps 5-8 again, bit-identically
    from dsv3.train.checkpoint import verify_checkpoint
    verify_checkpoint(run / "checkpoints" / "step_00000008")          # step 8 written anew


def test_a_checkpoint_without_manifest_that_cannot_be_read_is_named(full, tmp_path):
    run = damaged_copy(full, tmp_path, "model.safetensors", "truncated")
    for manifest in (run / "checkpoints").glob("step_*/manifest.json"):    # a run written before manifests
        manifest.unlink()
    with pytest.raises(CheckpointError, match="step_00000008/model.safetensors cannot be read"):
        export_run(run, tmp_path / "hf", step=8)


def test_leftovers_of_killed_saves_are_removed_at_the_next_start(full, tmp_path):
    run = tmp_path / "left"
    shutil.copytree(full, run)
    shutil.rmtree(run / "checkpoints" / "step_00000008")
    tmp = run / "checkpoints" / ".step_00000008.tmp-123-abcd"         # killed while writing step 8
    tmp.mkdir()
    (tmp / "model.safetensors").write_bytes(b"partial")
    t = Trainer(small_run(tmp_path, "left", **SECTIONS), resume=True)
    t.logger.close()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000004"]
    assert any("removed 1 unfinished checkpoint saves (.step_00000008.tmp-123-abcd)" in r["message"]
               for r in read_metrics(run, kind="event"))


def test_a_fresh_start_refuses_an_earlier_starts_metrics_and_overwrite_starts_clean(full, tmp_path, capsys):
    run = tmp_path / "again"
    shutil.copytree(full, run)
    shutil.rmtree(run / "checkpoints")                 # an earlier start that stopped before its first checkpoint
    (run / "mine.txt").write_text("not the run's")
    cfg = tmp_path / "run.json"
    cfg.write_text(json.dumps(small_run(tmp_path, "again", **SECTIONS).to_dict()))
    assert main(["train", "--config", str(cfg), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "metrics.jsonl of an earlier start" in err and "--overwrite" in err
    assert main(["train", "--config", str(cfg), "train.steps=3", "--overwrite", "--quiet"]) == 0
    assert [r["step"] for r in read_metrics(run, kind="train")] == [1, 2, 3]
    assert not any("non-finite" in r["message"] for r in read_metrics(run, kind="event"))
    assert (run / "mine.txt").exists() and [d.name for d in checkpoint_dirs(run)] == ["step_00000003"]
    # --resume cuts the metrics logged past the checkpoint it resumes from (killed after step 8 was logged)
    killed = tmp_path / "killed"
    shutil.copytree(full, killed)
    shutil.rmtree(killed / "checkpoints" / "step_00000008")
    assert main(["train", "--resume", "--run-dir", str(killed), "--quiet"]) == 0
    assert [r["step"] for r in read_metrics(killed, kind="train")] == list(range(1, 9))


@pytest.mark.parametrize("update,healthy", [(5, 4), (4, 2)])
def test_a_blow_up_is_never_checkpointed_and_the_stop_names_the_last_healthy_checkpoint(tmp_path, update, healthy):
    """Update `update` blows the weights up (confident, wrong logits), step 9 ends in NaN. Checkpoints are due every
    2 steps; one is written only after the next step's loss vetted its weights, so a blow-up in update 4, the
    checkpoint's own step, keeps step 4 from being written too."""
    t = Trainer(small_run(tmp_path, "blow", train={"steps": 12}, checkpoint={"interval": 2, "keep": 2},
                          log={"val_interval": 0}))
    step = t.train_step

    def sabotaged():
        with torch.no_grad():
            if t.step == update:                       # as if update `update` had done it
                t.model.lm_head.weight.mul_(200)
            if t.step == 8:
                t.model.lm_head.weight[0, 0] = float("nan")
        return step()

    t.train_step = sabotaged
    with pytest.raises(TrainingDiverged) as e:
        t.run()
    msg = str(e.value)
    assert "step 9: non-finite" in msg and f"Last healthy checkpoint: step_{healthy:08d}" in msg
    assert f"resume from it: dsv3 train --resume --run-dir {t.run_dir} optim.lr=0.0003" in msg
    assert [d.name for d in checkpoint_dirs(t.run_dir)] == [f"step_{s:08d}" for s in (healthy - 2, healthy) if s]
    events = [r["message"] for r in read_metrics(t.run_dir, kind="event")]
    assert sum("not written: the loss spiked on its weights" in m for m in events) >= 2
    assert sum("loss spike" in m for m in events) >= 4


def test_a_divergence_before_any_checkpoint_advises_a_fresh_start(tmp_path):
    t = Trainer(small_run(tmp_path, "early", **SECTIONS))
    with torch.no_grad():
        t.model.lm_head.weight[0, 0] = float("nan")
    with pytest.raises(TrainingDiverged, match=r"No checkpoint precedes it: start afresh .* dsv3 train --overwrite "
                                               r"--config \S+/early/config.json optim.lr=0.0003"):
        t.run()


def test_a_saturated_model_counts_as_a_spike_and_one_spike_barely_lifts_the_running_loss(tmp_path):
    # optim.lr=1e4 on tiny.toml: by step 2 the model outputs uniform logits with a gradient of exactly 0 at a calm
    # loss; without this the step-5 checkpoint would hold the dead model and "lower the LR, --resume" cannot work
    t = Trainer(small_run(tmp_path, "dead", **SECTIONS))
    t._watch_for_spikes(5.0, 1.0)
    assert not t.spiking and t.loss_ema == 5.0
    t._watch_for_spikes(5.0, 0.0)
    assert t.spiking
    t._watch_for_spikes(1e6, 1.0)                      # the running mean takes in the spike only up to the line
    assert t.spiking and t.loss_ema == pytest.approx(0.95 * 5.0 + 0.05 * t.cfg.train.spike_ratio * 5.0)
    events = [r["message"] for r in read_metrics(t.run_dir, kind="event")]
    assert any("gradient norm 0" in m for m in events) and any("loss spike" in m for m in events)


def test_the_issues_lr_1e4_run_leaves_no_dead_checkpoint_and_its_advice_works(tmp_path, capsys):
    """optim.lr=1e4 (the issue's run): update 1 saturates the model; the run must not checkpoint it, and the printed
    command (start afresh with a lower LR) must train."""
    cfg = tmp_path / "run.json"
    cfg.write_text(json.dumps(small_run(tmp_path, "lr", **{**SECTIONS, "checkpoint": {"interval": 1}}).to_dict()))
    assert main(["train", "--config", str(cfg), "optim.lr=1e4", "--quiet"]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    line = err[-1]
    assert "non-finite" in line and checkpoint_dirs(tmp_path / "lr") == []
    assert sum("non-finite" in e for e in err) == 1, err      # said once (the event record keeps it too)
    cmd = line.split("start afresh with a lower optim.lr (now 10000) or a longer optim.warmup: ", 1)[1].split()
    assert cmd[:3] == ["dsv3", "train", "--overwrite"] and cmd[-1] == "optim.lr=1000"
    assert main([*cmd[1:-1], "optim.lr=3e-3", "--quiet"]) == 0           # a sane LR, as the advice says
    assert [d.name for d in checkpoint_dirs(tmp_path / "lr")][-1] == "step_00000008"


def blow_up_after(t: Trainer, update: int, then=None) -> None:
    """Update `update` blows the weights up (the next step's loss spikes); `then()` runs at that moment too."""
    step = t.train_step

    def sabotaged():
        if t.step == update:
            with torch.no_grad():
                t.model.lm_head.weight.mul_(200)
            if then is not None:
                then()
        return step()
    t.train_step = sabotaged


def test_a_final_save_during_a_spike_keeps_the_last_healthy_checkpoint_besides_keep_1(tmp_path):
    """The final save is of the state as it is: during a spike it is no healthy one, and with checkpoint.keep=1 its
    pruning deleted the last healthy checkpoint (step 4), leaving only the spike's state to resume from."""
    t = Trainer(small_run(tmp_path, "final", train={"steps": 6}, checkpoint={"interval": 2, "keep": 1},
                          log={"val_interval": 0}))
    blow_up_after(t, 5)                       # step 6, the last, spikes
    t.run()
    assert [d.name for d in checkpoint_dirs(t.run_dir)] == ["step_00000004", "step_00000006"]
    state = json.loads((t.run_dir / "checkpoints" / "step_00000006" / "state.json").read_text())
    assert state["suspect"] is True
    events = [r["message"] for r in read_metrics(t.run_dir, kind="event")]
    assert any("step_00000006 was saved during a loss spike; the last healthy checkpoint step_00000004 is kept"
               in m for m in events), events


def test_a_signal_save_during_a_spike_keeps_the_last_healthy_checkpoint_and_says_so(tmp_path):
    import signal
    from dsv3.train.trainer import TrainingInterrupted
    from dsv3.train.signals import StopSignals
    t = Trainer(small_run(tmp_path, "sig", train={"steps": 12}, checkpoint={"interval": 2, "keep": 1},
                          log={"val_interval": 0}))
    stop = StopSignals(announce=False)          # not installed: the received signal is set as its handler would
    blow_up_after(t, 5, then=lambda: setattr(stop, "received", signal.SIGINT))
    with pytest.raises(TrainingInterrupted, match="step_00000006 was saved during a loss spike; the last healthy "
                                                  "checkpoint step_00000004 is kept besides it") as e:
        t.run(stop)
    assert "\n" not in str(e.value)
    assert [d.name for d in checkpoint_dirs(t.run_dir)] == ["step_00000004", "step_00000006"]
    # a later healthy save prunes both as keep=1 says (the resume takes the healthy step 4, not the spike's state)
    r = Trainer(small_run(tmp_path, "sig", train={"steps": 12}, checkpoint={"interval": 2, "keep": 1},
                          log={"val_interval": 0}), resume=True)
    assert r.step == 4
    r.run()
    assert [d.name for d in checkpoint_dirs(r.run_dir)] == ["step_00000012"]


def spiked_run(tmp_path, name: str = "spiked", **train):
    """A run stopped by a signal during a spike: step_00000004 healthy, step_00000006 suspect (the spike's state)."""
    import signal
    from dsv3.train.signals import StopSignals
    from dsv3.train.trainer import TrainingInterrupted
    cfg = small_run(tmp_path, name, train={"steps": 12, **train}, checkpoint={"interval": 2, "keep": 2},
                    log={"val_interval": 0})
    t = Trainer(cfg)
    stop = StopSignals(announce=False)
    blow_up_after(t, 5, then=lambda: setattr(stop, "received", signal.SIGINT))
    with pytest.raises(TrainingInterrupted) as e:
        t.run(stop)
    assert [d.name for d in checkpoint_dirs(t.run_dir)] == ["step_00000004", "step_00000006"]
    return cfg, str(e.value)


def test_resume_passes_over_a_suspect_checkpoint_for_the_newest_healthy_one(tmp_path, capsys):
    """--resume took the newest checkpoint even when it was the state of a loss spike (a signal's save, marked
    suspect): the resumed run trained on from blown-up weights. It takes the newest healthy one and says, in one
    line, which it skipped and how to resume from it (--resume-from), which still reaches the suspect one."""
    cfg, stopped = spiked_run(tmp_path)
    run = Path(cfg.run_dir)
    # the signal's message says that a plain --resume takes the healthy one, and how to take this one
    assert "from the last healthy checkpoint step_00000004" in stopped and "--resume-from step_00000006" in stopped
    capsys.readouterr()
    r = Trainer(cfg, resume=True)
    r.logger.close()
    assert r.step == 4
    err = [ln for ln in capsys.readouterr().err.splitlines() if "step_00000006" in ln]
    assert len(err) == 1 and "saved during a loss spike (suspect)" in err[0] and "step_00000004" in err[0], err
    assert f"dsv3 train --resume-from step_00000006 --run-dir {run}" in err[0], err
    explicit = Trainer(cfg, resume="step_00000006")      # dsv3 train --resume-from step_00000006
    explicit.logger.close()
    assert explicit.step == 6
    for name in ("6", str(run / "checkpoints" / "step_00000006")):
        assert main(["train", "--resume-from", name, "--run-dir", str(run), "train.steps=6", "--quiet"]) == 0
    assert [d.name for d in checkpoint_dirs(run)] == ["step_00000004", "step_00000006"]
    with pytest.raises(CheckpointError, match="has no checkpoint step_00000005 .its checkpoints: step_00000004, "
                                              "step_00000006"):
        Trainer(cfg, resume="5")


def test_resume_with_only_suspect_checkpoints_is_refused_naming_them_and_the_explicit_way(tmp_path, capsys):
    cfg, _ = spiked_run(tmp_path)
    run = Path(cfg.run_dir)
    shutil.rmtree(run / "checkpoints" / "step_00000004")
    capsys.readouterr()
    assert main(["train", "--resume", "--run-dir", str(run), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no healthy intact checkpoint, only step_00000006" in err, err
    assert f"--resume-from step_00000006 --run-dir {run}" in err
    assert main(["train", "--resume-from", "step_00000006", "--run-dir", str(run), "train.steps=7", "--quiet"]) == 0


def test_a_nan_after_a_resume_past_a_suspect_checkpoint_names_the_checkpoint_resumed_from(tmp_path):
    """Resumed from step 4 past the suspect step 6, a NaN at step 5 named step 6 as the "last healthy checkpoint"
    (the newest by name): the spike's state, and not this run's past. Now the resume sets step 6 aside before its
    first step, so the advice names step 4 and a plain --resume reaches it."""
    cfg, _ = spiked_run(tmp_path)
    r = Trainer(cfg, resume=True)
    assert r.step == 4
    step = r.train_step

    def nan_at_5():
        with torch.no_grad():
            r.model.lm_head.weight[0, 0] = float("nan")
        return step()
    r.train_step = nan_at_5
    with pytest.raises(TrainingDiverged) as e:
        r.run()
    assert "Last healthy checkpoint: step_00000004" in str(e.value), e.value
    assert f"dsv3 train --resume --run-dir {r.run_dir} optim.lr=" in str(e.value)


def test_a_resume_keeps_the_record_of_why_the_earlier_run_stopped(tmp_path):
    """Update 4 blows the weights up, a NaN at step 9 stops the run; the resume goes back to step 2 (the last healthy
    checkpoint) and cuts the train records after it, which it logs again, but the NaN stop, the spikes and the
    checkpoints that waited are the past: they stay, marked rewound (before, the resume erased them, and nothing in
    the log said why the run had stopped)."""
    t = Trainer(small_run(tmp_path, "nan", train={"steps": 12}, checkpoint={"interval": 2, "keep": 0},
                          log={"val_interval": 0}))
    blow_up_after(t, 4)
    step = t.train_step

    def nan_at_9():
        if t.step == 8:
            with torch.no_grad():
                t.model.lm_head.weight[0, 0] = float("nan")
        return step()
    t.train_step = nan_at_9
    with pytest.raises(TrainingDiverged):
        t.run()
    before = [r for r in read_metrics(t.run_dir, kind="event") if r["step"] > 2]
    assert any("non-finite" in r["message"] for r in before)
    r = Trainer(small_run(tmp_path, "nan", train={"steps": 12}, checkpoint={"interval": 2, "keep": 0},
                          log={"val_interval": 0}), resume=True)
    r.logger.close()
    assert r.step == 2
    after = read_metrics(r.run_dir)
    kept = [x for x in after if x.get("rewound")]
    assert [x["message"] for x in kept] == [x["message"] for x in before]
    assert all(x["kind"] == "event" for x in kept)
    assert max(x["step"] for x in after if x["kind"] == "train") == 2


def test_a_resume_refuses_to_round_fp32_master_weights_to_bf16(full, tmp_path, capsys):
    """train.dtype=bf16-params keeps the weights themselves in bf16: a resume of an fp32 run with it rounded the
    checkpoint's master weights and AdamW moments to bf16 without a word (a resume may change train.*)."""
    run = tmp_path / "dtype"
    shutil.copytree(full, run)
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert main(["train", "--resume", "--run-dir", str(run), 'train.dtype="bf16-params"', "train.steps=10",
                 "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "train.dtype='fp32' -> 'bf16-params'" in err, err
    assert "fp32 master weights" in err and "train.init_from=" in err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before
    # the other way loses nothing and autocast choices stay free
    assert main(["train", "--resume", "--run-dir", str(run), 'train.dtype="auto"', "train.steps=9", "--quiet"]) == 0


def files_of(d: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(d.iterdir()) if f.is_file()}


def test_a_resume_past_a_suspect_checkpoint_sets_it_aside_rather_than_overwrite_or_prune_it(tmp_path, capsys):
    """Resumed from step 4 past the suspect step 6, the run's save of step 6 replaced the spike's state (atomically,
    deleting it) and checkpoint.keep pruned what was left: a checkpoint the user may still have wanted (--resume
    had named it as the way to take it) was gone. The resume now moves every newer step directory to
    checkpoints/rewound/, byte for byte, in one logged line; nothing prunes it and no --resume takes it."""
    cfg, _ = spiked_run(tmp_path)
    run = Path(cfg.run_dir)
    old = files_of(run / "checkpoints" / "step_00000006")
    capsys.readouterr()
    resumed = Trainer(small_run(tmp_path, "spiked", train={"steps": 8}, checkpoint={"interval": 2, "keep": 2},
                                log={"val_interval": 0}), resume=True)
    assert resumed.step == 4
    resumed.run()
    said = [ln for ln in capsys.readouterr().err.splitlines() if "set aside" in ln]
    assert len(said) == 1 and "step_00000006 -> " in said[0] and "newer than step_00000004" in said[0], said
    aside = list((run / "checkpoints" / "rewound").iterdir())
    assert [d.name.split("-")[0] for d in aside] == ["step_00000006"] and str(aside[0]) in said[0]
    assert files_of(aside[0]) == old                               # the spike's state, byte-identical
    assert [d.name for d in checkpoint_dirs(run)] == ["step_00000006", "step_00000008"]
    new = run / "checkpoints" / "step_00000006"                     # this run's own step 6: healthy, other weights
    assert "suspect" not in json.loads((new / "state.json").read_text())
    assert files_of(new)["model.safetensors"] != old["model.safetensors"]
    # a later --resume takes this run's newest healthy checkpoint; keep=1 prunes this run's, not the set-aside one
    again = Trainer(small_run(tmp_path, "spiked", train={"steps": 10}, checkpoint={"interval": 2, "keep": 1},
                              log={"val_interval": 0}), resume=True)
    assert again.step == 8
    again.run()
    assert [d.name for d in checkpoint_dirs(run)] == ["step_00000010"]
    assert list((run / "checkpoints" / "rewound").iterdir()) == aside and files_of(aside[0]) == old


def test_resume_from_an_older_checkpoint_sets_the_newer_healthy_ones_aside(full, tmp_path, capsys):
    """--resume-from 4 in a run whose newest is step 8 wrote its own step 8 over the first one."""
    run = tmp_path / "older"
    shutil.copytree(full, run)
    old = files_of(run / "checkpoints" / "step_00000008")
    capsys.readouterr()
    assert main(["train", "--resume-from", "4", "--run-dir", str(run), "optim.lr=1e-3", "--quiet"]) == 0
    said = [ln for ln in capsys.readouterr().err.splitlines() if "set aside" in ln]
    assert len(said) == 1 and "step_00000008 -> " in said[0], said
    [aside] = (run / "checkpoints" / "rewound").iterdir()
    assert files_of(aside) == old
    assert files_of(run / "checkpoints" / "step_00000008")["model.safetensors"] != old["model.safetensors"]
    with pytest.raises(CheckpointError, match="set aside by an earlier resume.*move it back to .*step_00000008 "):
        Trainer(small_run(tmp_path, "older"), resume=str(aside))


def test_set_aside_copies_are_ordered_by_time_then_by_the_same_seconds_number(tmp_path):
    from dsv3.train.run_dir import rewound_dir, set_aside_copies, set_aside_path
    made = []
    for now in (1700000000, 1700000000, 1700000009, *([1700000010] * 12)):
        d = set_aside_path(tmp_path, "step_000004", now)
        d.mkdir(parents=True)
        made.append(d.name)
    (rewound_dir(tmp_path) / "step_000005-1600000000").mkdir()       # another step's copy: not listed
    assert [p.name for p in set_aside_copies(tmp_path, "step_000004")] == made   # -10, -11 after -2 .. -9
