"""A run directory as a user who points `dsv3 train` at the wrong place, and a machine that fails mid-save: a
directory holding someone's model (its config.json, tokenizer/) is refused by a fresh start (which overwrote them)
and by --overwrite (which deleted them and their checkpoints/); `checkpoint.keep` never deletes the checkpoint just
written because a damaged newer one (skipped by --resume) still sorts last; a disk full or a kill while saving
leaves the previous checkpoint the valid latest, and no leftovers but ours are touched."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dsv3.cli import main
from dsv3.train import checkpoint as ck
from dsv3.train.checkpoint import (checkpoint_dirs, load_checkpoint, newest_valid_checkpoint, save_checkpoint,
                                   verify_checkpoint)
from dsv3.train.run_dir import check_start, clear_run
from test_train_loop import small_run


def snapshot(path: Path) -> list:
    return sorted((str(p.relative_to(path)), p.read_bytes() if p.is_file() else None) for p in path.rglob("*"))


@pytest.fixture
def model_dir(tmp_path) -> Path:
    """Someone's Hugging Face model directory, with a checkpoints/ folder of their own."""
    d = tmp_path / "my-model"
    (d / "tokenizer").mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({"model_type": "deepseek_v3", "hidden_size": 64}))
    (d / "tokenizer" / "tokenizer.json").write_text("{}")
    (d / "checkpoints").mkdir()
    (d / "checkpoints" / "notes.txt").write_text("mine")
    (d / "README.md").write_text("mine")
    return d


@pytest.mark.parametrize("flag", [[], ["--overwrite"]])
def test_a_directory_that_is_not_a_run_is_refused_and_left_as_it_was(tmp_path, model_dir, capsys, flag):
    cfg = tmp_path / "run.json"
    cfg.write_text(json.dumps(small_run(tmp_path, "my-model").to_dict()))
    before = snapshot(model_dir)
    assert main(["train", "--config", str(cfg), "--quiet", *flag]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not a run directory but holds checkpoints, config.json, tokenizer" in err
    assert ("--overwrite would delete" if flag else "would overwrite") in err
    assert snapshot(model_dir) == before
    with pytest.raises(FileExistsError, match="not deleting"):
        clear_run(model_dir)
    assert snapshot(model_dir) == before


def test_a_run_directory_with_user_files_still_starts_and_overwrites(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.md").write_text("mine")          # files that are not RUN_FILES never stop a start
    check_start(run, resume=False, overwrite=False)
    (run / "config.json").write_text(json.dumps(small_run(tmp_path).to_dict()))
    (run / "tokenizer").mkdir()
    check_start(run, resume=False, overwrite=True)   # a run's own config.json: its directory
    assert clear_run(run) == ["config.json", "tokenizer"] and (run / "notes.md").exists()


def test_overwrite_deletes_a_runs_files_not_the_users_beside_them(tmp_path):
    """--overwrite deleted checkpoints/, tensorboard/, plots/ and tokenizer/ whole: a user's notes inside them and
    the checkpoints a resume had set aside (checkpoints/rewound/, "never deleted") went too. Now file by file; a
    step directory left holding a user's file is set aside too (the new run's save of that step replaces the
    directory whole)."""
    run = tmp_path / "run"
    save(run, 1)
    save(run, 2)
    (run / "config.json").write_text(json.dumps(small_run(tmp_path).to_dict()))
    mine = {run / "checkpoints" / "README-mine.txt": "a", ck.checkpoint_path(run, 2) / "mynote.txt": "b",
            run / "tensorboard" / "mine.txt": "c", run / "checkpoints" / "rewound" / "step_00000003-1" / "x": "d",
            run / "plots" / "my.png": "e"}
    for f, text in mine.items():
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(text)
    (run / "tensorboard" / "events.out.tfevents.1.host").write_text("run's")
    (run / "plots" / "loss.png").write_text("run's")
    gone = clear_run(run)
    assert gone[0].startswith("checkpoints (kept: checkpoints/README-mine.txt, checkpoints/rewound")
    assert "config.json" in gone and not (run / "config.json").exists()
    assert not (run / "tensorboard" / "events.out.tfevents.1.host").exists()
    assert not (run / "plots" / "loss.png").exists()
    moved = list((run / "checkpoints" / "rewound").glob("step_00000002-*"))
    assert checkpoint_dirs(run) == [] and len(moved) == 1 and (moved[0] / "mynote.txt").read_text() == "b"
    assert sorted(p.name for p in moved[0].iterdir()) == ["mynote.txt"]           # the save's files are gone
    for f, text in mine.items():
        if f.parent.name != "step_00000002":
            assert f.read_text() == text


def test_a_start_that_fails_before_writing_leaves_no_directory_or_lock(tmp_path, monkeypatch, capsys):
    """A bad data.tokenizer and data.val_fraction=0 with validation batches are refused before the run claims its
    directory; a failure after the claim (a Ctrl-C while tokenising) removes the lock file it made and the
    directory, if it made that too; a directory that was there stays, with the user's files."""
    import dsv3.train.trainer as trainer_mod
    cfg = tmp_path / "run.json"
    for name, extra, says in (("a", {"data": {"tokenizer": str(tmp_path / "nope")}}, "data.tokenizer"),
                              ("b", {"data": {"val_fraction": 0.0}}, "log.val_batches=2")):
        cfg.write_text(json.dumps(small_run(tmp_path, name, **extra).to_dict()))
        assert main(["train", "--config", str(cfg), "--quiet"]) == 2
        assert says in capsys.readouterr().err and not (tmp_path / name).exists()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(trainer_mod, "prepare_run_data", interrupted)
    cfg.write_text(json.dumps(small_run(tmp_path, "c").to_dict()))
    assert main(["train", "--config", str(cfg), "--quiet"]) == 130
    assert not (tmp_path / "c").exists()
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "notes.md").write_text("mine")
    cfg.write_text(json.dumps(small_run(tmp_path, "d").to_dict()))
    assert main(["train", "--config", str(cfg), "--quiet"]) == 130
    assert [p.name for p in (tmp_path / "d").iterdir()] == ["notes.md"]


def tiny_state(value: float) -> dict:
    return {"w": torch.full((4, 4), value)}


def save(run: Path, step: int, keep: int = 0) -> Path:
    return save_checkpoint(run, step, tiny_state(step), {"state": {}, "param_groups": []}, {"tokens": step},
                           {"run": "x"}, keep=keep)


def test_keep_never_deletes_the_checkpoint_just_written_for_a_damaged_newer_one(tmp_path):
    run = tmp_path / "run"
    for step in (100, 200, 300):
        save(run, step)
    damaged = ck.checkpoint_path(run, 300) / "model.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:50])                # resume skips it and goes back to 200
    assert newest_valid_checkpoint(run)[0].name == "step_00000200"
    save(run, 250, keep=1)                                        # the resumed run's next save, keep 1
    assert [d.name for d in checkpoint_dirs(run)] == ["step_00000250", "step_00000300"]
    assert newest_valid_checkpoint(run)[0].name == "step_00000250"
    save(run, 260, keep=2)
    assert [d.name for d in checkpoint_dirs(run)] == ["step_00000250", "step_00000260", "step_00000300"]


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), OSError(5, "Input/output error"),
                                   KeyboardInterrupt()])
def test_a_failed_save_leaves_the_previous_checkpoint_the_valid_latest(tmp_path, monkeypatch, error):
    run = tmp_path / "run"
    save(run, 1)
    real = torch.save

    def failing(obj, f, *a, **k):                  # the disk fills (or a signal lands) at optimizer.pt
        raise error
    monkeypatch.setattr(ck.torch, "save", failing)
    with pytest.raises(type(error)):
        save(run, 2, keep=1)
    monkeypatch.setattr(ck.torch, "save", real)
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_00000001"]    # no leftover either
    verify_checkpoint(ck.checkpoint_path(run, 1))
    holder = _Holder()
    assert load_checkpoint(ck.checkpoint_path(run, 1), holder, restore_rng=False)["step"] == 1
    assert torch.equal(holder.w, torch.ones(4, 4))


class _Holder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("w", torch.zeros(4, 4))


KILLED_SAVE = """
import os, signal, sys, torch
from dsv3.train import checkpoint as ck
run = sys.argv[1]
ck.save_checkpoint(run, 1, {"w": torch.ones(4)}, {}, {}, {})
real = ck.save_file
def save_then_die(tensors, path, *a, **k):
    real(tensors, path, *a, **k)
    os.kill(os.getpid(), signal.SIGKILL)          # killed between two files of the save
ck.save_file = save_then_die
ck.save_checkpoint(run, 2, {"w": torch.ones(4)}, {}, {}, {})
"""


def test_sigkill_between_files_leaves_the_previous_checkpoint_and_only_our_leftover(tmp_path):
    run = tmp_path / "run"
    r = subprocess.run([sys.executable, "-c", KILLED_SAVE, str(run)], env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == -signal.SIGKILL
    (run / "checkpoints" / ".not-ours.tmp-1").write_text("someone's file, not a directory")
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names[0] == ".not-ours.tmp-1" and names[1].startswith(".step_00000002.tmp-") and names[2:] == \
        ["step_00000001"]
    assert newest_valid_checkpoint(run) == (ck.checkpoint_path(run, 1), [])
    assert ck.remove_unfinished_saves(run) == [names[1]]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [".not-ours.tmp-1", "step_00000001"]


def fake_run(tmp_path: Path) -> Path:
    """A run directory as a run leaves it for --resume: its config.json and a checkpoint."""
    run = tmp_path / "run"
    save(run, 4)
    (run / "config.json").write_text(json.dumps(small_run(tmp_path).to_dict()))
    return run


@pytest.mark.parametrize("override,says", [
    ("model.hidden_size=128", "model.hidden_size=64 -> 128"),
    ('data.sources=["stdlib"]', "data.sources="),
    ("data.seq_len=64", "data.seq_len=32 -> 64"),
    ("data.seed=3", "data.seed=0 -> 3")])
def test_resume_refuses_a_change_to_the_model_or_the_data_in_one_line(tmp_path, capsys, override, says):
    run = fake_run(tmp_path)
    before = snapshot(run)
    assert main(["train", "--resume", "--run-dir", str(run), override, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--resume cannot change {says}" in err and "train.init_from" in err, err
    assert snapshot(run) == before


@pytest.mark.parametrize("saved_optim,saved_dtype,override,says", [
    ({}, "fp32", 'optim.state_dtype="bf16"', "optim.state_dtype='fp32' -> 'bf16'"),
    ({"state_dtype": "bf16"}, "bf16-params", 'optim.master="split"', "optim.master='fp32' -> 'split'"),
    ({"state_dtype": "bf16", "master": "split"}, "bf16-params", 'optim.master="fp32"',
     "optim.master='split' -> 'fp32'"),
    ({"state_dtype": "bf16"}, "bf16-params", 'train.dtype="fp32"', "train.dtype='bf16-params' -> 'fp32'")])
def test_resume_refuses_a_change_to_the_optimizer_state_layout(tmp_path, capsys, saved_optim, saved_dtype, override,
                                                               says):
    """The checkpoint's optimizer state has the run's layout (BF16 moments and masters whole or split, or torch's
    AdamW; BF16 weights with a master or FP32 ones): a resume that changes it is refused before anything is read."""
    run = tmp_path / "run"
    save(run, 4)
    cfg = small_run(tmp_path, optim=saved_optim, train={"dtype": saved_dtype})
    (run / "config.json").write_text(json.dumps(cfg.to_dict()))
    before = snapshot(run)
    assert main(["train", "--resume", "--run-dir", str(run), override, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--resume cannot change {says}" in err and "optimizer state" in err, err
    assert snapshot(run) == before


def test_resume_accepts_what_may_change(tmp_path):
    run = fake_run(tmp_path)
    from dsv3.train.config import RunConfig, apply_overrides
    saved = json.loads((run / "config.json").read_text())
    cfg = RunConfig.from_dict(apply_overrides(saved, ["train.steps=50", "optim.lr=1e-4", "log.interval=5",
                                                      "checkpoint.keep=1", 'data.cache_dir="elsewhere"']))
    check_start(run, resume=True, overwrite=False, cfg=cfg)


def test_an_edited_manifest_is_caught_and_resume_falls_back_to_the_previous_checkpoint(tmp_path):
    run = tmp_path / "run"
    save(run, 1)
    newest = save(run, 2)
    manifest = json.loads((newest / "manifest.json").read_text())
    del manifest["files"]["optimizer.pt"]                 # a hand edit that hides a damaged file from the check
    (newest / "manifest.json").write_text(json.dumps(manifest))
    (newest / "optimizer.pt").write_bytes(b"garbage")
    good, skipped = newest_valid_checkpoint(run)
    assert good == ck.checkpoint_path(run, 1)
    assert len(skipped) == 1 and "does not list optimizer.pt (edited" in skipped[0]
    (newest / "optimizer.pt").unlink()                   # removed as well as unlisted: a missing file then
    manifest["files"]["optimizer.pt"] = {"bytes": 1, "sha256": "0"}
    (newest / "manifest.json").write_text(json.dumps(manifest))
    assert "optimizer.pt is missing" in newest_valid_checkpoint(run)[1][0]


def test_init_from_inside_the_run_that_overwrite_clears_is_refused(tmp_path, capsys):
    run = fake_run(tmp_path)
    before = snapshot(run)
    src = ck.checkpoint_path(run, 4)
    for flag in ([], ["--overwrite"]):
        assert main(["train", "--config", str(run / "config.json"), f"train.init_from={json.dumps(str(src))}",
                     "--quiet", *flag]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1, err
        assert ("--overwrite deletes before the weights are read" if flag else "already has checkpoints") in err
    assert snapshot(run) == before


def test_init_from_a_damaged_checkpoint_names_the_file(tmp_path):
    from dsv3.config import ConfigError
    from dsv3.train.init_from import find_source
    run = fake_run(tmp_path)
    f = ck.checkpoint_path(run, 4) / "model.safetensors"
    f.write_bytes(f.read_bytes()[:40])
    with pytest.raises(ConfigError, match=rf"train.init_from=.*{f}.*truncated"):
        find_source(ck.checkpoint_path(run, 4))


def test_init_from_a_run_whose_newest_checkpoint_is_damaged_asks_for_one_by_name(tmp_path):
    """train.init_from=<run> took an older checkpoint past a damaged newest one without a word."""
    from dsv3.config import ConfigError
    from dsv3.train.init_from import find_source
    run = fake_run(tmp_path)
    f = save(run, 6) / "model.safetensors"
    f.write_bytes(f.read_bytes()[:40])
    with pytest.raises(ConfigError, match=r"skipping checkpoint step_00000006: .*truncated.*name the checkpoint.*"
                                          r"step_00000004"):
        find_source(run)


def test_an_emptied_checkpoint_without_manifest_is_skipped_not_resumed(tmp_path):
    run = tmp_path / "run"
    save(run, 1)
    newest = save(run, 2)
    for f in newest.iterdir():                 # `rm checkpoints/step_2/*`, or a directory made by hand
        f.unlink()
    good, skipped = newest_valid_checkpoint(run)
    assert good == ck.checkpoint_path(run, 1)
    assert "has no manifest.json and lacks model.safetensors, optimizer.pt, rng.pt, state.json, config.json" \
        in skipped[0]


def test_a_checkpoint_whose_manifest_went_is_skipped_and_an_edited_manifest_is_named(tmp_path):
    """A checkpoint without manifest.json passed unchecked (the pre-manifest rule) even where the run's other
    checkpoints have theirs: resumed unverified, or its damage a failed resume with no fallback. A manifest edited
    into another shape was a KeyError / TypeError traceback."""
    run = tmp_path / "run"
    save(run, 1)
    newest = save(run, 2)
    (newest / "manifest.json").unlink()
    good, skipped = newest_valid_checkpoint(run)
    assert good == ck.checkpoint_path(run, 1) and "which the run's other checkpoints have" in skipped[0]
    newest = save(run, 3)
    manifest = json.loads((newest / "manifest.json").read_text())
    for files in ({k: {"bytes": v["bytes"]} for k, v in manifest["files"].items()}, {k: 5 for k in manifest["files"]},
                  ["model.safetensors"]):
        (newest / "manifest.json").write_text(json.dumps({**manifest, "files": files}))
        with pytest.raises(ck.CheckpointError, match="manifest.json is unreadable"):
            verify_checkpoint(newest)
    (newest / "manifest.json").write_text(json.dumps(manifest))
    (newest / "state.json").write_text("{")
    with pytest.raises(ck.CheckpointError, match="state.json"):
        verify_checkpoint(newest)


def test_resume_with_an_edited_config_file_says_what_it_does_not_apply(tmp_path):
    """`dsv3 train --config X.toml --resume` continues the run's config.json (plus the command line's overrides);
    X.toml only finds the run. Edits made to X.toml since the start are named, not applied silently."""
    from dsv3.train.run_dir import resume_config
    run = fake_run(tmp_path)
    saved = json.loads((run / "config.json").read_text())
    edited = tmp_path / "edited.json"
    edited.write_text(json.dumps({**saved, "train": {**saved["train"], "steps": saved["train"]["steps"] + 7}}))
    cfg, ignored = resume_config(edited, None, ["log.interval=3"])
    assert cfg.train.steps == saved["train"]["steps"] and cfg.log.interval == 3
    assert ignored == [f"train.steps={saved['train']['steps'] + 7!r} (run: {saved['train']['steps']!r})"]
    cfg, ignored = resume_config(edited, None, [f"train.steps={saved['train']['steps'] + 7}"])
    assert cfg.train.steps == saved["train"]["steps"] + 7 and ignored == []       # given on the command line: applied
    assert resume_config(None, run, [])[1] == []
    with pytest.raises(FileNotFoundError, match="config.json does not exist"):
        resume_config(None, tmp_path / "nowhere", [])


def test_a_corpus_that_holds_the_run_or_its_token_cache_is_refused_before_anything_is_written(tmp_path, capsys):
    """data.sources = ["."] around run_dir (or data.cache_dir): the run trained on its own config.json and cache, and
    its --resume then read metrics.jsonl as a malformed JSONL source (or found other shards): never resumable."""
    proj = tmp_path / "proj"
    (proj / "src").mkdir(parents=True)
    (proj / "src" / "a.py").write_text("x = 1\n" * 50)
    d = small_run(tmp_path, "proj/runs/run").to_dict()
    for sources, says in ([str(proj)], f"holds run_dir={str(proj / 'runs' / 'run')!r}"), \
                         ([str(proj / "src"), f"{proj}/**"], f"{proj}/**' holds run_dir="):
        cfg = tmp_path / "run.json"
        cfg.write_text(json.dumps({**d, "data": {**d["data"], "sources": sources}}))
        assert main(["train", "--config", str(cfg), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"invalid run config: data.sources entry '{sources[-1]}" in err \
            and says in err, err
        assert sorted(p.name for p in proj.iterdir()) == ["src"]               # nothing written
    from dsv3.data.corpus import reads_under
    cache = proj / "out" / "data"
    assert reads_under(str(proj), cache) and reads_under(f"{proj}/*", cache)   # a matched directory is walked
    (cache / "k").mkdir(parents=True)
    (cache / "k" / "tokenizer.json").write_text("{}")
    assert reads_under(f"{proj}/out/*/*/*.json", cache)                       # a matched file inside it
    # what the corpus never reads: a sibling directory, a file, a directory the walk skips, the standard library
    assert not reads_under(str(proj / "src"), proj / "runs" / "run")
    assert not reads_under(str(proj / "src" / "a.py"), proj / "src")
    assert not reads_under(str(proj), proj / ".runs" / "run") and not reads_under(str(proj), proj / "node_modules")
    assert not reads_under(f"{proj}/src/*.py", proj / "src" / "run") and not reads_under("stdlib", tmp_path)


def test_a_source_naming_no_files_is_refused_before_the_run_dir_is_made(tmp_path, capsys):
    """A mistyped path or a glob matching nothing: one line, and no run directory left behind holding a lock file
    (the error came from the data step, after the run had claimed its directory)."""
    d = small_run(tmp_path, "runs/run").to_dict()
    for source, says in ((str(tmp_path / "nowhere"), "does not exist"), (f"{tmp_path}/*.nothing", "matches no")):
        cfg = tmp_path / "run.json"
        cfg.write_text(json.dumps({**d, "data": {**d["data"], "sources": [source]}}))
        assert main(["train", "--config", str(cfg), "--quiet"]) != 0
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and says in err, err
        assert not (tmp_path / "runs").exists()


def test_a_run_dir_that_is_a_file_is_named_and_kept(tmp_path, capsys):
    cfg = tmp_path / "run.json"
    cfg.write_text(json.dumps(small_run(tmp_path, "notes.txt").to_dict()))
    (tmp_path / "notes.txt").write_text("mine")
    for flag in ([], ["--overwrite"]):
        assert main(["train", "--config", str(cfg), "--quiet", *flag]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "is a file, not a directory; choose another run_dir" in err, err
        assert (tmp_path / "notes.txt").read_text() == "mine"


def _step(run: Path, step: int, suspect: bool) -> None:
    d = run / "checkpoints" / f"step_{step:08d}"
    d.mkdir(parents=True)
    (d / "state.json").write_text(json.dumps({"step": step, **({"suspect": True} if suspect else {})}))


@pytest.mark.parametrize("healthy_before", [True, False])
def test_a_failed_save_after_a_suspect_one_names_the_way_to_resume_that_works(tmp_path, healthy_before):
    """A save that failed after a signal's save during a spike (suspect) advised a plain --resume "from the newest
    step_00000006": that takes the last healthy step 4 (or, with none, is refused), not the checkpoint named."""
    from dsv3.train.run_dir import write_failure
    run = tmp_path / "run"
    if healthy_before:
        _step(run, 4, suspect=False)
    _step(run, 6, suspect=True)
    line = write_failure(run / "checkpoints" / "step_00000008", OSError(28, "No space left on device"), 1)
    assert "\n" not in line and "newest step_00000006, saved during a loss spike (suspect)" in line, line
    assert f"dsv3 train --resume-from step_00000006 --run-dir {run}" in line, line
    if healthy_before:
        assert f"Resume with: dsv3 train --resume --run-dir {run} (from the last healthy checkpoint step_00000004)" \
            in line, line
    else:
        assert "No healthy checkpoint precedes it" in line and "--resume --run-dir" not in line, line
