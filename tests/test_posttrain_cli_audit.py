"""Post-training audit: `dsv3 sft | grpo | distill` on bad input a user types, each test failing on the code before
its fix (one line naming the key, nothing written where the user did not ask)."""

from __future__ import annotations

import json

import pytest

from dsv3.cli import main
from posttrain_fixture import conversation, make_base


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_base(tmp_path_factory.mktemp("cli_audit") / "base")


def _distill_file(path, base, run_dir) -> str:
    d = {"run_dir": run_dir, "distill": {"teacher": str(base), "init": str(base), "prompts": 2, "samples": 1,
                                         "max_new_tokens": 4},
         "data": {"seq_len": 64}, "train": {"steps": 1, "batch_size": 2, "micro_batch_size": 2, "device": "cpu"},
         "log": {"progress": False}}
    path.write_text(json.dumps(d))
    return str(path)


@pytest.mark.parametrize("run_dir", [5, ""])
def test_a_bad_run_dir_is_refused_before_the_teacher_writes_anywhere(base, tmp_path, monkeypatch, capsys, run_dir):
    """distill made Path(run_dir) before run_dir was validated: run_dir=5 was a TypeError traceback, run_dir=""
    sampled the teacher and wrote distill_data.jsonl into the current directory, then was refused."""
    monkeypatch.chdir(tmp_path)
    assert main(["distill", "--config", _distill_file(tmp_path / "d.json", base, run_dir)]) == 2
    assert f"run_dir={run_dir!r}" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.json"]


@pytest.mark.parametrize("command", ["sft", "grpo", "distill"])
def test_a_run_section_that_is_not_a_table_is_one_line(base, tmp_path, capsys, command):
    """`train = 5` (or `train = "..."`) in a run file: each command read d["train"] as a dict before the run
    sections were validated, an AttributeError traceback ('int' object has no attribute 'get')."""
    table = {"init": str(base), "sft": {"train_files": [str(tmp_path / "c.jsonl")], "epochs": 1},
             "distill": {"teacher": str(base), "train_files": [str(tmp_path / "c.jsonl")]}}
    (tmp_path / "c.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                                               {"role": "assistant", "content": "yo"}]}) + "\n")
    run = {"run_dir": str(tmp_path / "run"), "train": 5,
           command: {"init": table["init"], **table.get(command, {})}}
    (tmp_path / "r.json").write_text(json.dumps(run))
    assert main([command, "--config", str(tmp_path / "r.json")]) == 2
    assert "[train] must be a table" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


if __name__ == "__main__":
    raise SystemExit(pytest.main([__file__, "-q"]))


@pytest.mark.parametrize("command", ["sft", "distill"])
def test_the_advised_restart_of_a_posttrain_run_runs(base, tmp_path, command):
    """A post-training run that diverged (or could not write its checkpoint) with no checkpoint to go back to is told
    to restart with `dsv3 COMMAND --overwrite --config RUN/config.json`: that file is the RunConfig alone, without the
    [sft] / [distill] table, so the advised command was refused ('no [sft] table'). It names posttrain.json now."""
    import shlex

    from dsv3.posttrain.distill import distill_trainer
    from dsv3.posttrain.sft import sft_trainer
    from dsv3.train.run_dir import divergence_advice
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(conversation(a, 1)) + "\n" for a in range(4)))
    table = {"init": str(base), "train_files": [str(tmp_path / "c.jsonl")], "eval_fraction": 0.0}
    if command == "distill":
        table["teacher"] = str(base)
    run = {"run_dir": str(tmp_path / "run"), command: table, "data": {"seq_len": 64},
           "train": {"steps": 1, "batch_size": 2, "micro_batch_size": 2, "device": "cpu"},
           "log": {"progress": False, "tensorboard": False, "val_interval": 0}}
    (tmp_path / "r.json").write_text(json.dumps(run))
    trainer, _ = {"sft": sft_trainer, "distill": distill_trainer}[command](str(tmp_path / "r.json"), [])
    advice = divergence_advice(trainer.run_dir, 1, 1e-3, command)
    trainer.run_lock.close()                   # the start stops here (as a diverged run does), releasing its lock
    del trainer
    argv = shlex.split(advice.split("start afresh with a lower optim.lr (now 0.001) or a longer optim.warmup: ")[1])
    assert argv[:3] == ["dsv3", command, "--overwrite"]
    assert main(argv[1:]) == 0
