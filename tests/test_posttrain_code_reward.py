"""The code reward of `dsv3 grpo` (grpo.task = "code"): a program is run against its problem's tests in
dsv3.verify.sandbox; a correct program gets reward 1, a wrong one 0, an infinite loop 0 within the time limit; the
task file and the config keys are checked when read."""

import json
import time

import pytest

from dsv3.config import ConfigError
from dsv3.posttrain.config import section_from_table
from dsv3.posttrain.rollout import task_reward
from dsv3.posttrain.tasks import program_of, read_code_tasks

ROWS = [{"prompt": "Write add(a, b) returning a + b.", "tests": "assert add(2, 3) == 5\nassert add(-1, 1) == 0"},
        {"prompt": "def double(x):\n    \"\"\"2 x\"\"\"\n", "test": "def check(f):\n    assert f(4) == 8",
         "entry_point": "double"}]


def cfg(**kw):
    """The [grpo] section with the file's values (every key through its rule)."""
    return section_from_table("grpo", {"init": "unused", "task": "code", "task_file": "t.jsonl", **kw})


@pytest.fixture
def tasks(tmp_path):
    path = tmp_path / "code.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return read_code_tasks(path)


def reward(task, response, c):
    return task_reward(task, task.prompt, response, 10, c)


def test_correct_program_gets_1_wrong_0_infinite_loop_0_within_the_limit(tasks):
    c = cfg(code_timeout_s=1.0, format_weight=0.0)
    add, double = tasks
    assert add.kind == "code" and "check(double)" in double.tests
    assert reward(add, "<think>easy</think><answer>def add(a, b):\n    return a + b</answer>", c)["correct"] == 1.0
    assert reward(add, "```python\ndef add(a, b):\n    return a + b\n```", c)["reward"] == 1.0
    assert reward(double, "```python\ndef double(x):\n    return 2 * x\n```", c)["correct"] == 1.0
    assert reward(add, "```python\ndef add(a, b):\n    return a - b\n```", c)["correct"] == 0.0       # fails a test
    assert reward(add, "```python\nimport sys\nsys.exit(0)\n```", c)["correct"] == 0.0     # exits before the tests
    t0 = time.monotonic()
    assert reward(add, "```python\ndef add(a, b):\n    while True:\n        pass\n```\n", c)["correct"] == 0.0
    assert reward(add, "```python\nwhile True:\n    pass\n```", c)["correct"] == 0.0
    assert time.monotonic() - t0 < 2 * 1.0 + 4.0         # two runs, each killed at the 1 s limit (+ start-up)


def test_program_of_a_response():
    assert program_of("text\n```python\nx = 1\n```\nmore ```python\ny = 2\n```") == "x = 1\n"
    assert program_of("<think>t</think><answer>x = 1</answer>") == "x = 1"
    assert program_of("x = 1") == "x = 1"


def test_code_config_and_task_file_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"grpo.task_file is required with grpo.task='code'"):
        section_from_table("grpo", {"init": "x", "task": "code"})
    with pytest.raises(ConfigError, match=r"grpo.task_file applies to grpo.task='code' only"):
        section_from_table("grpo", {"init": "x", "task_file": "t.jsonl"})
    with pytest.raises(ConfigError, match=r"grpo.code_timeout_s=0"):
        cfg(code_timeout_s=0)
    with pytest.raises(ConfigError, match=r"grpo.code_memory_mb=10"):
        cfg(code_memory_mb=10)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(ROWS[0]) + "\n" + json.dumps({"prompt": "no tests"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: a code task row needs"):
        read_code_tasks(bad)
    with pytest.raises(ValueError, match=r"missing.jsonl does not exist"):        # was: "must be a .jsonl file"
        read_code_tasks(tmp_path / "missing.jsonl")
    (tmp_path / "tasks.txt").write_text("x")
    with pytest.raises(ValueError, match=r"must be a .jsonl or .parquet file"):
        read_code_tasks(tmp_path / "tasks.txt")


def test_grpo_run_on_code_tasks(tmp_path, tasks):
    """The wiring: `dsv3 grpo` with grpo.task = "code" reads the file, checks the sandbox, rewards every sample by
    running it (a random tiny model writes no working program: correct 0, logged per step)."""
    from dsv3.posttrain.grpo import grpo_trainer
    from dsv3.train.metrics import read_metrics
    from posttrain_fixture import make_base
    base = make_base(tmp_path / "base")
    (tmp_path / "code.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    d = {"run_dir": str(tmp_path / "run"),
         "grpo": {"init": str(base), "task": "code", "task_file": str(tmp_path / "code.jsonl"), "code_timeout_s": 2.0,
                  "prompts_per_step": 2, "group_size": 2, "max_new_tokens": 6},
         "train": {"steps": 2, "device": "cpu", "dtype": "fp32"},
         "log": {"interval": 1, "tensorboard": False, "progress": False}, "checkpoint": {"interval": 0}}
    (tmp_path / "g.json").write_text(json.dumps(d))
    grpo_trainer(tmp_path / "g.json", []).run()
    rows = read_metrics(tmp_path / "run", kind="train")
    assert [r["step"] for r in rows] == [1, 2] and all(r["correct"] == 0.0 for r in rows)
    assert all(r["tokens_rollout"] > 0 for r in rows)
