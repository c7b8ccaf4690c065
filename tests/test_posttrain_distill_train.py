"""`dsv3 distill` (dsv3.posttrain.distill): logit distillation on the teacher's top-k lowers the student's KL to the
teacher; a tokenizer mismatch in logit mode and a teacher whose samples all fail the verifier are clear errors."""

import json

import pytest
import torch

from dsv3.config import ConfigError
from dsv3.posttrain.distill import distill_trainer
from dsv3.train.metrics import read_metrics
from posttrain_fixture import conversation, make_base, write_chat


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("distill")
    data = write_chat(tmp / "chat.jsonl", [conversation(a, b) for a in range(1, 6) for b in range(1, 6)])
    return tmp, make_base(tmp / "teacher", seed=3), make_base(tmp / "student", seed=4), data


def run_file(tmp, name, **distill):
    d = {"run_dir": str(tmp / name), "distill": distill, "optim": {"lr": 3e-3}, "data": {"seq_len": 64},
         "train": {"steps": 12, "batch_size": 4, "micro_batch_size": 4, "device": "cpu", "dtype": "fp32"},
         "log": {"interval": 4, "val_interval": 0, "tensorboard": False, "progress": False},
         "checkpoint": {"interval": 0}}
    p = tmp / f"{name}.json"
    p.write_text(json.dumps(d))
    return p


def test_logit_kd_lowers_the_kl_to_the_teacher(bases):
    tmp, teacher, student, data = bases
    t, _ = distill_trainer(run_file(tmp, "kd", teacher=str(teacher), init=str(student), mode="logit",
                                    train_files=[str(data)], kd_weight=1.0, top_k=8), [])
    t.run()
    kd = [r["kd_loss"] for r in read_metrics(t.run_dir, kind="train")]
    assert kd[-1] < 0.5 * kd[0], kd


def test_sequence_mode_with_a_teacher_that_never_passes_the_verifier(bases):
    tmp, teacher, student, _ = bases
    with pytest.raises(ValueError, match="no training conversations"):
        distill_trainer(run_file(tmp, "seq", teacher=str(teacher), init=str(student), prompts=4, samples=2,
                                 max_new_tokens=4, digits=2), [])
    # a random teacher: nothing verified, and no empty data file that a --resume would take as the finished data
    assert not (tmp / "seq" / "distill_data.jsonl").exists()


def test_logit_mode_needs_one_tokenizer(bases, tmp_path):
    tmp, teacher, _, data = bases
    from dsv3.data import train_tokenizer
    other = make_base(tmp_path / "other")
    train_tokenizer(["a different corpus " * 50, "1 2 3 " * 50], vocab_size=300).save(other)
    with pytest.raises(ConfigError, match="needs the teacher's tokenizer"):
        distill_trainer(run_file(tmp_path, "x", teacher=str(teacher), init=str(other), mode="logit",
                                 train_files=[str(data)]), [])


def test_epochs_and_train_steps_both_set_is_refused_before_the_teacher_runs(bases):
    """distill.epochs sets train.steps: with train.steps in the file too, one would silently replace the other."""
    tmp, teacher, student, _ = bases
    with pytest.raises(ConfigError, match="train.steps=12 and distill.epochs=1"):
        distill_trainer(run_file(tmp, "both", teacher=str(teacher), init=str(student), prompts=4, epochs=1), [])
    assert not (tmp / "both").exists()          # refused before the teacher sampled (or wrote) anything


def test_the_teacher_lives_on_the_students_device_in_its_compute_dtype(monkeypatch):
    """The teacher answers (rejection sampling) and scores on train.device, in the step's compute dtype: it was
    loaded in fp32 on the host whatever the run said, so a GPU run sampled its distillation data on the CPU."""
    from dsv3.posttrain.distill import teacher_placement
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert teacher_placement({"train": {"device": "cpu"}}) == (torch.device("cpu"), torch.float32)
    assert teacher_placement({"train": {"device": "cpu", "dtype": "bf16"}}) == (torch.device("cpu"), torch.bfloat16)
    auto = teacher_placement({})
    assert auto[0].type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert auto[1] == (torch.bfloat16 if auto[0].type == "cuda" else torch.float32)
    with pytest.raises(ConfigError, match="train.device"):
        teacher_placement({"train": {"device": "gpu"}})


def test_a_bf16_run_scores_with_a_bf16_teacher(bases):
    tmp, teacher, student, data = bases
    path = run_file(tmp, "kd16", teacher=str(teacher), init=str(student), mode="logit", train_files=[str(data)],
                    kd_weight=1.0, top_k=8)
    d = json.loads(path.read_text())
    d["train"].update(dtype="bf16", steps=2)
    path.write_text(json.dumps(d))
    t, _ = distill_trainer(path, [])
    assert {p.dtype for p in t.teacher.parameters()} == {torch.bfloat16}
    t.run()
    assert all(r["kd_loss"] == r["kd_loss"] for r in read_metrics(t.run_dir, kind="train"))   # finite, not NaN


def test_logit_mode_under_torchrun_is_refused_before_the_teacher_loads(bases, monkeypatch):
    """Logit distillation's step is not split over ranks (no batch shard, no gradient sync): under torchrun it is
    refused in one line before the teacher is read (minutes for a large one)."""
    tmp, teacher, student, data = bases
    monkeypatch.setenv("WORLD_SIZE", "2")
    import dsv3.posttrain.distill as distill
    monkeypatch.setattr(distill, "load_model", lambda *a, **k: pytest.fail("the teacher was loaded"))
    with pytest.raises(ConfigError, match="dsv3 distill runs in one process"):
        distill_trainer(run_file(tmp, "ranks", teacher=str(teacher), init=str(student), mode="logit",
                                 train_files=[str(data)]), [])


def test_resume_on_the_teachers_data_refuses_a_change_of_what_made_it(bases):
    """--resume reuses the run's distill_data.jsonl (the teacher's verified samples): distill.prompts (samples,
    temperature, task, ...) changed on the command line was ignored, the run went on over the old data, and
    posttrain.json, rewritten, recorded the new value as if it had applied."""
    import shutil
    tmp, teacher, student, data = bases
    t, _ = distill_trainer(run_file(tmp, "gen", teacher=str(teacher), init=str(student), train_files=[str(data)],
                                    prompts=8), ["train.steps=1", "checkpoint.interval=1"])
    t.run()
    run = t.run_dir
    t.run_lock.close()
    # the run as one whose teacher wrote its data leaves it: the conversations in distill_data.jsonl, the file
    # saved with distill.train_files empty (a random tiny teacher verifies no answer, so it cannot write them)
    shutil.copy(data, run / "distill_data.jsonl")
    saved = json.loads((run / "posttrain.json").read_text())
    saved["distill"]["train_files"] = []
    (run / "posttrain.json").write_text(json.dumps(saved))
    with pytest.raises(ConfigError, match=r"--resume cannot change distill.prompts=8 -> 50: the run trains on"):
        distill_trainer(None, ["distill.prompts=50"], resume=True, run_dir=str(run))
    assert json.loads((run / "posttrain.json").read_text())["distill"]["prompts"] == 8
    assert distill_trainer(None, [], resume=True, run_dir=str(run))[0].step == 1


def kd_run(tmp, name, teacher, student, data):
    return run_file(tmp, name, teacher=str(teacher), init=str(student), mode="logit", train_files=[str(data)],
                    kd_weight=0.5, top_k=8)


def test_a_logit_resume_keeps_the_teacher_checkpoint_of_the_start_when_the_teacher_run_moved_on(bases, tmp_path,
                                                                                                monkeypatch):
    """distill.teacher a training run: a resume read the teacher run's latest checkpoint again, so once that run
    had trained on, the resumed student learnt from another teacher than the uninterrupted one (as GRPO's grpo.init
    did). The checkpoints pin it; a resume reads it, refuses it gone, and refuses distill.teacher changed. The
    student's base (distill.init, a copy of the teacher's run: one tokenizer) is pinned as SFT's is. The pinned
    teacher is the only one read (not the latest, then the pinned one: two teachers resident)."""
    import shutil
    from dsv3.posttrain import distill
    from dsv3.posttrain.pinned import read_pin
    from dsv3.train import Trainer
    from test_train_loop import small_run
    data = bases[3]
    sections = dict(train={"steps": 2}, checkpoint={"interval": 2, "keep": 0}, log={"val_interval": 0})
    Trainer(small_run(tmp_path, "teacher", **sections)).run()
    teacher, student = tmp_path / "teacher", tmp_path / "student"
    shutil.copytree(teacher, student)
    over = ["train.steps=4", "checkpoint.interval=2", "log.interval=1"]
    t, _ = distill_trainer(kd_run(tmp_path, "full", teacher, student, data), over)
    t.run()
    t.run_lock.close()
    resumed = tmp_path / "resumed"
    shutil.copytree(t.run_dir, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_00000004")
    Trainer(small_run(tmp_path, "teacher", **{**sections, "train": {"steps": 4}}), resume=True).run()  # moves on
    steps, load_model = [], distill.load_model

    def counted(*a, step=None, **k):
        steps.append(step)
        return load_model(*a, step=step, **k)
    with monkeypatch.context() as m:
        m.setattr(distill, "load_model", counted)
        r, _ = distill_trainer(None, [], resume=True, run_dir=str(resumed))
    assert steps == [2] and r.pins["teacher"] == t.pins["teacher"]
    r.run()
    r.run_lock.close()
    kd = lambda run: {m["step"]: (m["loss"], m["kd_loss"]) for m in read_metrics(run, kind="train")}  # noqa: E731
    assert kd(resumed) == kd(t.run_dir)
    shutil.rmtree(resumed / "checkpoints" / "step_00000004")
    other = tmp_path / "other"
    shutil.copytree(teacher, other)
    with pytest.raises(ConfigError, match=f"--resume cannot change distill.teacher='{teacher}' -> '{other}'"):
        distill_trainer(None, [f'distill.teacher="{other}"'], resume=True, run_dir=str(resumed))
    shutil.rmtree(teacher / "checkpoints" / "step_00000002")
    with pytest.raises(ConfigError, match="distill.teacher=.*its checkpoint step_00000002, the run's teacher, is "
                                          "gone"):
        distill_trainer(None, [], resume=True, run_dir=str(resumed))
    assert read_pin(resumed / "checkpoints" / "step_00000002", "base") == read_pin(
        t.run_dir / "checkpoints" / "step_00000004", "base")
    assert read_pin(resumed / "checkpoints" / "step_00000002", "base")["checkpoint"] == "step_00000002"
    shutil.rmtree(student / "checkpoints" / "step_00000002")
    with pytest.raises(ConfigError, match="distill.init=.*its checkpoint step_00000002, the run's base model, is "
                                          "gone"):
        distill_trainer(None, [], resume=True, run_dir=str(resumed))


def test_a_logit_resume_refuses_a_hugging_face_teacher_rewritten_in_place(bases, tmp_path):
    """A Hugging Face directory as distill.teacher, rewritten in place (another model saved there) between the
    start and the resume: the resume trained against the new model without a word."""
    import shutil
    _, hf_teacher, student, data = bases
    teacher = tmp_path / "teacher"
    shutil.copytree(hf_teacher, teacher)
    t, _ = distill_trainer(kd_run(tmp_path, "hf", teacher, student, data), ["train.steps=1", "checkpoint.interval=1"])
    t.run()
    t.run_lock.close()
    r, _ = distill_trainer(None, ["train.steps=2"], resume=True, run_dir=str(t.run_dir))   # unchanged: resumes
    assert r.step == 1
    r.run_lock.close()
    shutil.rmtree(teacher)                   # another model saved there, the same way
    make_base(teacher, seed=5)
    with pytest.raises(ConfigError, match=f"distill.teacher='{teacher}' changed since the run started"):
        distill_trainer(None, ["train.steps=2"], resume=True, run_dir=str(t.run_dir))
