"""`dsv3 train` for a run that lasts days, as the machine fails under it: a checkpoint save that hits a full disk, an
I/O error or lost permissions is one line naming the checkpoint and what to do, leaves nothing of itself and the
previous checkpoint resumable; a metrics line that cannot be written does not stop the run; two runs on one directory
at once are refused; `checkpoint.keep` never deletes a file the run did not write. (Timeouts under torchrun:
test_dist_timeout.py; a failed save at the file level: test_run_dir_audit.py.)"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from test_train_loop import dsv3_cli, small_run, train_losses

from dsv3.checkpoint import CheckpointError
from dsv3.cli import main
from dsv3.train import checkpoint as ck
from dsv3.train import metrics
from dsv3.train.checkpoint import checkpoint_dirs, verify_checkpoint

SRC = str(Path(__file__).parents[1] / "src")

# what a full disk looks like from each writer of a save (torch.save's is its zip writer's, not an OSError)
DISK_FULL = {
    "torch.save": RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"),
    "save_file": SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"),
    "permission": PermissionError(13, "Permission denied"),
}


def config(tmp_path, **sections) -> str:
    path = tmp_path / "run.json"
    path.write_text(json.dumps(small_run(tmp_path, **{"train": {"steps": 8}, **sections}).to_dict()))
    return str(path)


@pytest.mark.parametrize("what", list(DISK_FULL))
def test_a_save_that_cannot_write_is_one_line_and_the_previous_checkpoint_resumes(tmp_path, monkeypatch, capsys,
                                                                                  what):
    cfg, run = config(tmp_path), tmp_path / "run"
    name, error = ("save_file", DISK_FULL[what]) if what == "save_file" else ("torch", DISK_FULL[what])

    def fails_at_step_8(real):
        def write(obj, f, *a, **k):
            if "step_00000008" in str(f):
                raise error
            return real(obj, f, *a, **k)
        return write
    if name == "save_file":
        monkeypatch.setattr(ck, "save_file", fails_at_step_8(ck.save_file))
    else:
        monkeypatch.setattr(ck.torch, "save", fails_at_step_8(ck.torch.save))
    assert main(["train", "--config", cfg, "--quiet"]) == 1
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("dsv3 train:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert f"cannot write checkpoint {run / 'checkpoints' / 'step_00000008'}" in lines[0]
    assert str(error).split(":")[0] in lines[0] and "free there" in lines[0]
    assert f"newest step_00000004): free space (or restore write permission). Resume with: dsv3 train --resume " \
           f"--run-dir {run}" in lines[0]
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_00000004"]     # no leftover of the save
    verify_checkpoint(run / "checkpoints" / "step_00000004")
    if what != "torch.save":
        return
    monkeypatch.undo()                     # the disk has room again: the advice works
    assert main(["train", "--resume", "--run-dir", str(run), "--quiet"]) == 0
    assert [d.name for d in checkpoint_dirs(run)] == ["step_00000004", "step_00000008"]
    assert sorted(train_losses(run)) == list(range(1, 9))


class _FillsUp:
    """metrics.jsonl's file on a disk that is full while steps 5 and 6 are logged: a part of the line lands, then
    ENOSPC (what a full disk does to a buffered write)."""

    def __init__(self, f):
        self.f = f

    def write(self, text: str) -> int:
        if '"step": 5,' in text or '"step": 6,' in text:
            self.f.write(text[:7])
            raise OSError(28, "No space left on device")
        return self.f.write(text)

    def __getattr__(self, name):
        return getattr(self.f, name)


def test_a_metrics_line_that_cannot_be_written_does_not_stop_the_run(tmp_path, monkeypatch, capsys):
    cfg, run = config(tmp_path), tmp_path / "run"
    def appends(path, mode="r", *a, **k):             # the log's appends fill up; its other opens work
        f = open(path, mode, *a, **k)  # noqa: SIM115 (returned to the logger, which closes it)
        return _FillsUp(f) if mode == "a" else f
    monkeypatch.setattr(metrics, "open", appends, raising=False)
    assert main(["train", "--config", cfg, "--quiet"]) == 0
    err = capsys.readouterr().err
    assert err.count(f"warning: cannot write {run / 'metrics.jsonl'} ([Errno 28] No space left on device)") == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")            # read_metrics warns of a garbled line that is not the last
        assert sorted(train_losses(run)) == [1, 2, 3, 4, 7, 8]    # every line whole: the partial ones were cut
        events = [r["message"] for r in metrics.read_metrics(run, "event")]
    assert "2 metrics records before this one were lost to write errors" in events, events
    assert [d.name for d in checkpoint_dirs(run)] == ["step_00000004", "step_00000008"]


def test_a_resume_on_a_full_disk_keeps_the_runs_config_and_a_damaged_one_is_named(tmp_path, monkeypatch, capsys):
    cfg, run = config(tmp_path, train={"steps": 4}), tmp_path / "run"
    assert main(["train", "--config", cfg, "--quiet"]) == 0
    before = (run / "config.json").read_text()
    real = Path.write_text

    def full_disk(path, *a, **k):           # a write into the run's directory: opened (truncated), then ENOSPC
        if path.parent == run and "config.json" in path.name:
            path.open("w").close()
            raise OSError(28, "No space left on device")
        return real(path, *a, **k)
    monkeypatch.setattr(Path, "write_text", full_disk)
    assert main(["train", "--resume", "--run-dir", str(run), "--quiet", "train.steps=6"]) == 1
    monkeypatch.undo()
    assert (run / "config.json").read_text() == before and not list(run.glob(".config.json*"))
    capsys.readouterr()
    assert main(["train", "--resume", "--run-dir", str(run), "--quiet", "train.steps=6"]) == 0   # the advice works
    assert sorted(train_losses(run)) == list(range(1, 7))
    capsys.readouterr()
    (run / "config.json").write_text("")    # damaged by hand: named, with the checkpoint's copy
    assert main(["train", "--resume", "--run-dir", str(run), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--resume: {run / 'config.json'} is not a run's config" in err
    assert f"cp {run / 'checkpoints' / 'step_00000006' / 'config.json'} {run / 'config.json'}" in err


def test_a_second_run_on_a_directory_in_use_is_refused_and_deletes_nothing(tmp_path, capsys):
    cfg, run = config(tmp_path, train={"steps": 10000}, checkpoint={"interval": 2}), tmp_path / "run"
    first = subprocess.Popen(dsv3_cli("train", "--config", cfg, "--quiet"), stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": SRC})
    try:
        deadline = time.monotonic() + 120
        while not (run / "checkpoints" / "step_00000002").exists():       # the first run is under way
            assert first.poll() is None and time.monotonic() < deadline, first.stderr.read()
            time.sleep(0.1)
        for flag in ("--overwrite", "--resume"):     # without the lock: its files deleted, or its saves interleaved
            assert main(["train", "--config", cfg, "--quiet", flag]) == 2
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and f"{run} is in use by another run (pid {first.pid} on " in err, err
            assert "wait for it to end (or stop it), or choose another run_dir" in err
            assert (run / "checkpoints" / "step_00000002").is_dir() and (run / "metrics.jsonl").stat().st_size
        first.send_signal(signal.SIGTERM)                 # it stops as it would alone: saved, resumable
        assert first.wait(timeout=60) == 128 + signal.SIGTERM, first.stderr.read()
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    # the lock went with the process: another one takes it at once
    lock = f"import fcntl; fcntl.lockf(open({str(run / '.dsv3-run.lock')!r}, 'a'), fcntl.LOCK_EX | fcntl.LOCK_NB)"
    subprocess.run([sys.executable, "-c", lock], check=True)


def _save(run: Path, step: int, keep: int = 0) -> Path:
    """A small checkpoint with an EMA: every file a single-process save writes."""
    w = {"w": torch.full((4, 4), float(step))}
    return ck.save_checkpoint(run, step, w, {"state": {}, "param_groups": []}, {"tokens": step}, {"run": "x"},
                              ema_state=w, keep=keep)


def test_keep_deletes_only_what_the_run_wrote_and_a_crash_before_pruning_is_caught_up(tmp_path):
    run = tmp_path / "run"
    _save(run, 1)
    (run / "checkpoints" / "step_00000001" / "notes.txt").write_text("loss looked fine here")   # the user's
    _save(run, 2)                                  # a run killed between this save's rename and its pruning
    _save(run, 3, keep=1)                          # the next save prunes both older ones
    assert [d.name for d in checkpoint_dirs(run)] == ["step_00000001", "step_00000003"]
    assert [f.name for f in (run / "checkpoints" / "step_00000001").iterdir()] == ["notes.txt"]   # only the user's
    assert ck.newest_valid_checkpoint(run) == (ck.checkpoint_path(run, 3), [])
    _save(run, 4, keep=1)                          # the user's directory does not count against `keep`
    assert [d.name for d in checkpoint_dirs(run)] == ["step_00000001", "step_00000004"]


def _dies_after(k: int, unlink):
    """os.unlink that deletes k files, then is killed (KeyboardInterrupt, which no cleanup swallows)."""
    calls = []

    def unlink_or_die(path, *a, **kw):
        if len(calls) == k:
            raise KeyboardInterrupt
        calls.append(path)
        return unlink(path, *a, **kw)
    return unlink_or_die


def test_a_prune_killed_midway_never_leaves_a_checkpoint_that_verifies(tmp_path, monkeypatch):
    """A kill lands after any number of the pruned checkpoint's files are deleted: what is left is refused by
    verify_checkpoint (resume skips it), never taken as a checkpoint that lacks a file (its EMA, say). (shutil.rmtree
    deleted in directory order, which the file system decides: where manifest.json came early, a kill could leave a
    manifest-less directory that verify_checkpoint reads as a pre-manifest checkpoint.)"""
    run = tmp_path / "run"
    n = len(list(_save(run, 1).iterdir()))
    real = os.unlink
    for k in range(1, n):
        shutil.rmtree(run, ignore_errors=True)
        _save(run, 1)
        monkeypatch.setattr(os, "unlink", _dies_after(k, real))
        with pytest.raises(KeyboardInterrupt):
            _save(run, 2, keep=1)
        monkeypatch.setattr(os, "unlink", real)
        pruned = ck.checkpoint_path(run, 1)
        if pruned.exists():
            with pytest.raises(CheckpointError):
                verify_checkpoint(pruned)
        verify_checkpoint(ck.checkpoint_path(run, 2))
