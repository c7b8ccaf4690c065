"""Training observability: the metrics.jsonl logger (resume truncation, partial lines, TensorBoard) and the plots."""

import json

import numpy as np
import pytest

from dsv3.train.metrics import MetricsLogger, max_violation, read_metrics
from dsv3.train.plot import _pick_layers, compare_runs, plot_run

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
LAYERS = ["layers.1", "layers.2", "mtp.0"]
E = 8


def write_run(run_dir, steps=40, val_every=10, mtp=True, moe=True, val=True, start=0, tensorboard=False, seed=0):
    """A synthetic run: imbalanced expert load that evens out as training proceeds, like aux-loss-free balancing."""
    rng = np.random.default_rng(seed)
    with MetricsLogger(run_dir, total_steps=steps, tensorboard=tensorboard, progress=False, start_step=start) as log:
        if start:
            log.truncate_after(start)
            log.log_event(start, f"resumed from step {start}")
        for step in range(start + 1, steps + 1):
            main = 5.0 * np.exp(-step / 30) + 2.0 + 0.05 * rng.standard_normal()
            mtp_loss = main + 0.4 if mtp else None
            fields = dict(loss=main + 0.3 * (mtp_loss or 0) + 1e-3, main_loss=main, mtp_loss=mtp_loss, aux_loss=1e-3,
                          lr=3e-4 * min(1.0, step / 10), batch_size=8 if step < 20 else 16, tokens=step * 8 * 64,
                          grad_norm=1.0, tok_per_s=1234.5, mtp_weight=0.3 if mtp else 0.0, bias_update_speed=1e-3,
                          spikes=0)
            if moe:
                skew = 1.0 / step
                load = np.stack([rng.dirichlet(np.full(E, 1 / skew)) * E for _ in LAYERS])  # load / mean load
                fields.update(expert_load=load, moe_layers=LAYERS)  # max_vio and max_vio_mean derived
            log.log_train(step, **fields)
            if val and step % val_every == 0:
                log.log_val(step, val_loss=main + 0.1, val_mtp_loss=mtp_loss and mtp_loss + 0.1,
                            val_mtp_acc=0.2 + step / 1000 if mtp else None)
        log.log_event(steps, "checkpoint saved")
    return run_dir


def add_partial_line(run_dir):
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "step": 999, "lo')


def steps_of(records, kind="train"):
    return [r["step"] for r in records if r["kind"] == kind]


def test_logger_writes_schema(tmp_path):
    write_run(tmp_path)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert steps_of(records) == list(range(1, 41))
    assert steps_of(records, "val") == [10, 20, 30, 40]
    assert [r["message"] for r in records if r["kind"] == "event"] == ["checkpoint saved"]
    for r in records:
        assert {"kind", "step", "time"} <= r.keys() and isinstance(r["step"], int)
    train = [r for r in records if r["kind"] == "train"]
    required = {"loss", "main_loss", "mtp_loss", "aux_loss", "lr", "batch_size", "tokens", "grad_norm", "tok_per_s",
                "mtp_weight", "bias_update_speed", "spikes", "max_vio", "max_vio_mean", "expert_load", "moe_layers"}
    for r in train:
        assert required <= r.keys()
        assert len(r["max_vio"]) == len(LAYERS) and np.array(r["expert_load"]).shape == (len(LAYERS), E)
        assert r["max_vio"] == pytest.approx([max_violation(x) for x in r["expert_load"]])
        assert r["max_vio_mean"] == pytest.approx(np.mean(r["max_vio"]))
    assert {"val_loss", "val_mtp_loss", "val_mtp_acc"} <= records[next(i for i, r in enumerate(records)
                                                                         if r["kind"] == "val")].keys()


def test_no_mtp_is_null(tmp_path):
    write_run(tmp_path, mtp=False)
    rec = read_metrics(tmp_path, kind="train")[0]
    assert rec["mtp_loss"] is None and read_metrics(tmp_path, kind="val")[0]["val_mtp_acc"] is None


def test_read_metrics_skips_partial_last_line(tmp_path):
    write_run(tmp_path)
    add_partial_line(tmp_path)
    records = read_metrics(tmp_path)
    assert steps_of(records) == list(range(1, 41))
    assert read_metrics(tmp_path / "metrics.jsonl", kind="val") == [r for r in records if r["kind"] == "val"]


def test_truncate_after_and_resume(tmp_path):
    write_run(tmp_path)
    add_partial_line(tmp_path)
    log = MetricsLogger(tmp_path, total_steps=40, tensorboard=False, progress=False, start_step=25)
    kept = log.truncate_after(25)
    log.close()
    text = (tmp_path / "metrics.jsonl").read_text()
    assert text.endswith("\n") and '"step": 999' not in text
    records = [json.loads(line) for line in text.splitlines()]  # every line is whole JSON again
    assert kept == len(records) == 25 + 2 + 1  # 25 train + val at 10 and 20 + the event past the step
    assert max(r["step"] for r in records if r["kind"] != "event") == 25
    assert [r for r in records if r["step"] > 25] == [{**records[-1], "kind": "event", "rewound": True}]
    # resume: the appended steps continue exactly where the checkpoint was
    write_run(tmp_path, steps=40, start=25, seed=1)
    records = read_metrics(tmp_path)
    assert steps_of(records) == list(range(1, 41))
    assert steps_of(records, "val") == [10, 20, 30, 40]
    assert [(r["message"], r.get("rewound", False)) for r in records if r["kind"] == "event"] == [
        ("checkpoint saved", True), ("resumed from step 25", False), ("checkpoint saved", False)]


def test_append_after_kill_without_truncate_starts_fresh_line(tmp_path):
    write_run(tmp_path, steps=5, val=False)
    add_partial_line(tmp_path)
    with MetricsLogger(tmp_path, total_steps=10, tensorboard=False, progress=False) as log:
        log.log_val(6, val_loss=1.0)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert all(json.loads(line) for line in lines)  # the partial line was cut, not glued to the new record
    assert json.loads(lines[-1])["val_loss"] == 1.0


def test_truncate_missing_file(tmp_path):
    with MetricsLogger(tmp_path / "new", total_steps=3, tensorboard=False, progress=False) as log:
        assert log.truncate_after(3) == 0
        log.log_train(1, loss=1.0)
    assert steps_of(read_metrics(tmp_path / "new")) == [1]


def test_progress_bar_and_event_console(tmp_path, capsys):
    with MetricsLogger(tmp_path, total_steps=10, tensorboard=False, progress=True, start_step=2) as log:
        log.log_train(5, loss=2.5, lr=1e-3, tok_per_s=1000.0)
        assert log._bar.n == 5
        log.log_event(5, "loss spike")
    err = capsys.readouterr().err
    assert "[step 5] loss spike" in err and "loss=2.5" in err


def test_tensorboard_scalars(tmp_path):
    pytest.importorskip("tensorboard", reason="needs the optional `train` extra (CI pins it)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    write_run(tmp_path, steps=20, tensorboard=True)
    tb = tmp_path / "tensorboard"
    assert list(tb.glob("events.out.tfevents.*"))
    acc = EventAccumulator(str(tb))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/main_loss", "train/lr", "balance/max_vio_mean", "balance/max_vio/mtp.0",
            "val/loss", "val/mtp_acc"} <= tags
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(1, 21))
    expected = [r["loss"] for r in read_metrics(tmp_path, kind="train")]
    assert [e.value for e in acc.Scalars("train/loss")] == pytest.approx(expected, rel=1e-6)


def test_tensorboard_resume_purges_stale_steps(tmp_path):
    pytest.importorskip("tensorboard", reason="needs the optional `train` extra (CI pins it)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    write_run(tmp_path, steps=10, tensorboard=True, val=False)
    write_run(tmp_path, steps=8, start=5, tensorboard=True, val=False, seed=1)  # killed after 10, resumed from 5
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(1, 9))
    expected = [r["loss"] for r in read_metrics(tmp_path, kind="train")]
    assert [e.value for e in acc.Scalars("train/loss")] == pytest.approx(expected, rel=1e-6)


def test_max_violation():
    assert max_violation([1, 1, 1, 1]) == 0.0
    assert max_violation([2, 1, 1, 0]) == pytest.approx(1.0)
    assert max_violation(np.array([3.0, 1.0])) == pytest.approx(0.5)
    assert max_violation([8, 0, 0, 0, 0, 0, 0, 0]) == pytest.approx(7.0)
    assert max_violation([0, 0]) == 0.0 and max_violation([]) == 0.0


def check_pngs(paths, expected):
    assert sorted(p.name for p in paths) == sorted(expected)
    for p in paths:
        data = p.read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 2000


def test_plot_run_full(tmp_path):
    run = write_run(tmp_path / "run")
    (run / "baselines.json").write_text(json.dumps({"unigram entropy": 5.1}))
    add_partial_line(run)
    paths = plot_run(run, baselines={"bigram": 4.2})
    assert all(p.parent == run / "plots" for p in paths)
    check_pngs(paths, ["loss.png", "lr.png", "mtp.png", "maxvio.png", "expert_load.png"])


def test_plot_run_without_mtp_val_moe(tmp_path):
    check_pngs(plot_run(write_run(tmp_path / "a", mtp=False, val=False), tmp_path / "out"),
               ["loss.png", "lr.png", "maxvio.png", "expert_load.png"])
    check_pngs(plot_run(write_run(tmp_path / "b", mtp=False, moe=False), tmp_path / "out_b"), ["loss.png", "lr.png"])


def test_plot_run_empty_raises(tmp_path):
    with pytest.raises(ValueError, match="no metrics file"):
        plot_run(tmp_path)
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(ValueError, match="no train or val"):
        plot_run(tmp_path)
    with MetricsLogger(tmp_path, total_steps=1, tensorboard=False, progress=False) as log:
        log.log_event(0, "started")
    with pytest.raises(ValueError, match="no train or val"):
        plot_run(tmp_path)


def test_pick_layers():
    assert _pick_layers(3) == [0, 1, 2]
    picked = _pick_layers(61)
    assert len(picked) == 8 and picked[0] == 0 and picked[-1] == 60 and picked == sorted(set(picked))


def test_compare_runs(tmp_path):
    runs = {name: write_run(tmp_path / name, steps=30, seed=i) for i, name in
            enumerate(["no balancing", "aux loss", "aux-free"])}
    for metric, kw in [("val_loss", {}), ("max_vio_mean", {"logy": True}), ("main_loss", {"x": "tokens"})]:
        out = compare_runs(runs, tmp_path / f"cmp_{metric}.png", metric=metric, **kw)
        assert out.read_bytes().startswith(PNG_SIGNATURE)
    with pytest.raises(ValueError, match="nonexistent"), pytest.warns(UserWarning, match="has no"):
        compare_runs(runs, tmp_path / "x.png", metric="nonexistent")


def test_a_tensorboard_writer_that_fails_stops_tensorboard_not_the_run(tmp_path, capsys):
    """TensorBoard's writer thread re-raises a full disk's OSError through every later call and close(): the run
    died with a traceback before its checkpoint. Now the first failure is said once, TensorBoard logging stops and
    metrics.jsonl goes on."""
    pytest.importorskip("tensorboard", reason="needs the optional `train` extra (CI pins it)")

    class Full:
        calls = 0

        def __getattr__(self, name):
            def fail(*args):
                Full.calls += 1
                raise OSError(28, "No space left on device")
            return fail

    log = MetricsLogger(tmp_path, total_steps=3, tensorboard=True, progress=False)
    log._tb.close()
    log._tb = Full()
    for step in (1, 2, 3):
        log.log_train(step, loss=5.0, lr=1e-3, max_vio=[0.5], moe_layers=["1"])
        log.log_event(step, "checkpoint saved")
    log.close()
    err = capsys.readouterr().err
    assert err.count("TensorBoard logging stops") == 1 and "No space left" in err
    assert Full.calls == 2                              # the failed call, then the close that follows it
    assert [r["step"] for r in read_metrics(tmp_path, kind="train")] == [1, 2, 3]
