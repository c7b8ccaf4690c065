"""SIGINT / SIGTERM during `dsv3 train`, on real processes: the first finishes the step, writes a checkpoint, prints
the command that resumes and exits 130 / 143; that command continues the run bit-identically to an uninterrupted
one. A second signal aborts at once. Under torchrun every rank stops after the same step and joins the save."""

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dsv3.train.checkpoint import checkpoint_dirs, latest_checkpoint
from dsv3.train.metrics import read_metrics
from test_train_loop import dsv3_cli, small_run, train_losses

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
STEPS = 16
# checkpoints only at the end: a checkpoint before it is the signal's
SECTIONS = dict(train={"steps": STEPS}, checkpoint={"interval": 0, "keep": 0}, log={"val_interval": 8})


def launch(cfg: Path, run_dir: Path, nproc: int = 1, *args: str, **popen) -> subprocess.Popen:
    launcher = dsv3_cli() if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                              "--nproc_per_node", str(nproc), "-m", "dsv3.cli"]
    return subprocess.Popen(launcher + ["train", "--config", str(cfg), f"run_dir={json.dumps(str(run_dir))}", *args,
                                        "--quiet"], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **popen)


def wait_for_step(proc: subprocess.Popen, run_dir: Path, step: int) -> None:
    """Return just after `step` is logged (log.interval=1: the next step has just begun)."""
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if (run_dir / "metrics.jsonl").exists() and max(train_losses(run_dir), default=0) >= step:
            return
        time.sleep(0.01)
    pytest.fail(f"the run ended or stalled before step {step}: {proc.communicate()[1][-2000:]}")


def read_until(proc: subprocess.Popen, prefix: str) -> str:
    """The run's stderr up to and including the first line starting with `prefix` (the rest: communicate())."""
    head = []
    for line in proc.stderr:
        head.append(line)
        if line.startswith(prefix):
            return "".join(head)
    pytest.fail(f"the run ended without printing {prefix!r}: {''.join(head)[-2000:]}")


def run_resume_command(line: str) -> None:
    """The printed command, with `dsv3 train` / torchrun replaced by this interpreter (dsv3 may not be on PATH)."""
    cmd = shlex.split(line.split("Resume with: ", 1)[1])
    if cmd[0] == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", *cmd[1:]]
    else:
        assert cmd[:2] == ["dsv3", "train"], cmd
        cmd = dsv3_cli(*cmd[1:])
    r = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.fixture(scope="module")
def cfg(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("signals")
    path = tmp / "run.json"
    path.write_text(json.dumps(small_run(tmp, "x", **SECTIONS).to_dict()))
    return path


@pytest.fixture(scope="module")
def full(cfg) -> dict[int, float]:
    proc = launch(cfg, cfg.parent / "full")
    assert proc.wait(timeout=300) == 0, proc.communicate()[1][-3000:]
    return train_losses(cfg.parent / "full")


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_saves_prints_the_resume_command_and_the_resume_is_exact(cfg, full, sig, code):
    run = cfg.parent / sig.name
    proc = launch(cfg, run)
    wait_for_step(proc, run, 3)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err[-3000:]
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    step = int(re.search(r"after step (\d+)", last).group(1))
    assert 3 < step < STEPS and last.startswith(f"dsv3 train: stopped by {sig.name} after step {step}; saved ")
    assert [d.name for d in checkpoint_dirs(run)] == [f"step_{step:08d}"]
    assert f"Resume with: dsv3 train --resume --run-dir {run}" in last
    run_resume_command(last)
    assert train_losses(run) == full                                  # bitwise: floats compared exactly
    assert [r["val_loss"] for r in read_metrics(run, kind="val")] == \
        [r["val_loss"] for r in read_metrics(cfg.parent / "full", kind="val")]


def test_a_second_sigint_aborts_at_once(cfg):
    run = cfg.parent / "abort"
    # 16 micro-batches a step: the second signal comes well before the step that the first one lets finish ends
    proc = launch(cfg, run, 1, "train.batch_size=32", "train.batch_size_start=0")
    wait_for_step(proc, run, 2)
    proc.send_signal(signal.SIGINT)
    head = read_until(proc, "SIGINT: stopping after this step")   # acknowledged: the second press comes mid-step
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    err = head + err
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and err.strip().splitlines()[-1] == \
        "dsv3 train: aborted by SIGINT; no checkpoint was written yet: nothing to resume"
    assert "SIGINT: stopping after this step" in err and latest_checkpoint(run) is None


def test_a_second_press_after_the_save_exits_quietly(cfg):
    """The press that comes once the step ended and the checkpoint is written lands in the shutdown: it exits at
    once with 130, not with a KeyboardInterrupt traceback out of an exit handler after the resume line."""
    run = cfg.parent / "late"
    proc = launch(cfg, run)
    wait_for_step(proc, run, 2)
    proc.send_signal(signal.SIGINT)
    head = read_until(proc, "dsv3 train: stopped by SIGINT after step")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in head + err, (head + err)[-3000:]
    assert len(checkpoint_dirs(run)) == 1


def test_after_a_stop_a_later_signal_exits_at_once_without_a_traceback():
    code = ("import os, signal, time\n"
            "from dsv3.train.signals import StopSignals\n"
            "with StopSignals(announce=False, exit_after_stop=True) as stop:\n"
            "    os.kill(os.getpid(), signal.SIGTERM)\n"
            "print('stopped', stop.received, flush=True)\n"
            "os.kill(os.getpid(), signal.SIGINT)\n"
            "time.sleep(30)\n"
            "print('not reached')\n")
    r = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=60)
    assert (r.returncode, r.stdout, r.stderr) == (130, "stopped 15\n", "")


def test_stop_signals_record_the_first_and_raise_on_a_later_one():
    from dsv3.train.signals import Aborted, StopSignals
    before = signal.getsignal(signal.SIGINT)     # default_int_handler, or SIG_IGN under a background launch
    with StopSignals(announce=False) as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.received == signal.SIGTERM
        with pytest.raises(Aborted) as e:
            os.kill(os.getpid(), signal.SIGINT)
        assert e.value.signum == signal.SIGINT and isinstance(e.value, KeyboardInterrupt)
    assert signal.getsignal(signal.SIGINT) is before                # restored as it was
    with StopSignals(announce=False, same_press_s=60) as stop:     # torchrun: the terminal's press, forwarded
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.received == signal.SIGINT


def test_ctrl_c_under_torchrun_stops_every_rank_after_the_same_step_and_resumes(cfg):
    run = cfg.parent / "dp2"
    # a terminal's Ctrl-C goes to the whole process group: torchrun and both workers (which torchrun forwards it to)
    proc = launch(cfg, run, 2, start_new_session=True)
    wait_for_step(proc, run, 3)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    lines = [ln for ln in err.splitlines() if ln.startswith("dsv3 train: stopped by SIGINT")]
    assert len(lines) == 1, err[-3000:]                               # rank 0 alone reports
    step = int(re.search(r"after step (\d+)", lines[0]).group(1))
    # step 3 is logged before the ranks agree on stopping at its end: a signal then stops after step 3 itself
    assert 3 <= step < STEPS and [d.name for d in checkpoint_dirs(run)] == [f"step_{step:08d}"]
    assert "Resume with: torchrun --standalone --nproc_per_node 2 -m dsv3.cli train --resume" in lines[0]
    run_resume_command(lines[0])
    ref = launch(cfg, cfg.parent / "full-dp2", 2)
    assert ref.wait(timeout=300) == 0, ref.communicate()[1][-3000:]
    assert train_losses(run) == train_losses(cfg.parent / "full-dp2")


def test_an_abort_names_the_checkpoint_that_stands_and_the_resume_command(tmp_path):
    """A second signal aborts mid-step without saving: the line names the newest checkpoint and how to resume."""
    from types import SimpleNamespace

    from dsv3.train.trainer import Trainer
    run = tmp_path / "run"
    fake = SimpleNamespace(run_dir=run, layout=SimpleNamespace(world=2), command="sft")
    assert Trainer.abort_note(fake) == "no checkpoint was written yet: nothing to resume"
    for step in (2, 4):
        (run / "checkpoints" / f"step_{step:08d}").mkdir(parents=True)
    (run / "checkpoints" / ".step_00000006.tmp-1").mkdir()          # a save the abort cut: not a checkpoint
    note = Trainer.abort_note(fake)
    assert note.startswith(f"the last checkpoint is {run / 'checkpoints' / 'step_00000004'}. Resume with: ")
    assert note.endswith(f"sft --resume --run-dir {run}") and "torchrun" in note and "2" in note
