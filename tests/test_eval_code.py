"""dsv3 eval code: the shipped sample tasks (HumanEval-style call-based and stdin/stdout) judged in the sandbox:
their reference solutions pass, wrong, crashing, looping, exiting-early and memory-hungry ones do not and say why;
pass@k from scripted samples against its closed form; a backend error and a random model's garbage are per-sample
verdicts, never a crash of the run."""

import json
import math
from pathlib import Path

import pytest

from dsv3.eval.backends import Failure
from dsv3.eval.code import CALL_STOP, STDIO_STOP, judge, program, read_code, score_code
from dsv3.eval.multiple_choice import TaskError

DATA = Path(__file__).parent / "data" / "eval"
CALL, STDIO = DATA / "code_call.jsonl", DATA / "code_stdio.jsonl"


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_reference_solutions_pass():
    for path, key in [(CALL, "canonical_solution"), (STDIO, "solution")]:
        problems = read_code(path)
        assert {p.kind for p in problems} == {"call" if path == CALL else "stdio"}
        for p, r in zip(problems, rows(path)):
            assert judge(p, r[key]) == ("passed", ""), p.task_id
    lcb = read_code(STDIO)[-1]          # LiveCodeBench's field names: question_content, public_test_cases as JSON
    assert lcb.task_id == "lcb/0" and lcb.io == [("4\n", "8\n"), ("-3\n", "-6\n")]


@pytest.mark.parametrize("completion,verdict,detail", [
    ("    return a - b\n", "failed", "AssertionError"),
    ("    return a +\n", "error", "SyntaxError"),
    ("    raise KeyError('boom')\n", "error", "KeyError: 'boom'"),
    ("    while True:\n        pass\n", "timeout", ""),
    ("    import sys\n    sys.exit(0)\n", "failed", "exit status 0"),      # exit 0 before the tests: not a pass
    ("    x = bytearray(1 << 32)\n", "error", "MemoryError"),
    # a chat answer: the fenced block after the prompt redefines the function
    ("Here it is:\n```python\ndef add(a, b):\n    return a + b\n```\nDone.", "passed", ""),
])
def test_call_based_verdicts(completion, verdict, detail):
    p = read_code(CALL)[0]                      # add(a, b)
    got = judge(p, completion, timeout_s=2.0, memory_mb=256)
    assert got[0] == verdict and detail in got[1], got


def test_stdio_verdicts():
    p = read_code(STDIO)[0]                     # a + b
    assert judge(p, "a, b = map(int, input().split())\nprint(a + b)   \n\n") == ("passed", "")   # trailing space/lines
    verdict, detail = judge(p, "a, b = map(int, input().split())\nprint(a * b)\n")
    assert verdict == "failed" and detail.startswith("test 0: expected '5\\n', got '6\\n'")
    assert judge(p, "print(int(input()) + 1)\n")[0] == "error"                    # ValueError on "2 3"
    assert judge(p, "import time\ntime.sleep(10)\n", timeout_s=1.0)[0] == "timeout"
    assert program(p, "print(1)\n```\nexplanation") == "print(1)\n"                # the model closed the fence
    assert judge(p, "import socket\nsocket.create_connection(('127.0.0.1', 9), timeout=1)\nprint(5)\n")[0] == "error"


class Scripted:
    def __init__(self, texts):
        self.texts, self.seen = texts, []

    def generate(self, prompts, k, temperature, max_tokens, stop, seed):
        self.seen.append((len(prompts), k, stop))
        return [self.texts[i % len(self.texts)] for i in range(len(prompts))]


class Tok:
    bos_id = 0

    def encode(self, text):
        return [1 + (ord(c) % 50) for c in text]


def test_pass_at_k_from_scripted_samples():
    problems = read_code(CALL)[:2]
    good, bad = "    return a + b\n", "    return 0\n"
    pal_good, pal_bad = "    return s.lower() == s.lower()[::-1]\n", "    return True\n"
    backend = Scripted([[good, bad, bad, Failure("APIConnectionError: Connection error.")],   # 1 of 4 passes
                        [pal_good, pal_good, pal_good, pal_bad]])                            # 3 of 4 pass
    m, records = score_code(backend, Tok(), problems, k=4, temperature=1.0)
    assert backend.seen == [(2, 4, CALL_STOP)]
    want1 = [1 - math.comb(3, 1) / math.comb(4, 1), 1 - math.comb(1, 1) / math.comb(4, 1)]
    want2 = [1 - math.comb(3, 2) / math.comb(4, 2), 1.0]
    assert m["pass@1"] == pytest.approx(sum(want1) / 2) and m["pass@4"] == 1.0 and m["n"] == 2
    from dsv3.eval.stats import pass_at_k
    assert [pass_at_k(4, c, 2) for c in (1, 3)] == pytest.approx(want2)
    assert m["samples_passed"] == 4 and m["samples_failed"] == 3 and m["samples_backend-error"] == 1
    assert m["errors"] == 1 and m["samples"] == 8
    assert records[0]["verdicts"] == ["passed", "failed", "failed", "backend-error"]
    assert records[0]["details"][3].startswith("APIConnectionError") and records[0]["outputs"][3].startswith("<error")
    # stdin/stdout problems are prompted to open a ```python block and stop at its end
    m, _ = score_code(Scripted([["print(2 * int(input()))\n"]]), Tok(), read_code(STDIO)[-1:], k=1)
    assert m["pass@1"] == 1.0


def test_bad_task_rows_are_named(tmp_path):
    for row, why in [({"prompt": "def f():\n", "test": "x", "entry_point": "f g"}, "not a Python name"),
                     ({"prompt": "def f():\n", "entry_point": "f"}, "needs string 'prompt', 'test'"),
                     ({"question": "q", "tests": []}, "non-empty list"),
                     ({"question": "q", "tests": [{"input": "1", "output": "1", "testtype": "functional"}]},
                      "stdin tests only"),
                     ({"question_content": "q", "public_test_cases": "[oops"}, "not JSON"),
                     ({"title": "x"}, "needs 'prompt'")]:
        bad = tmp_path / "bad.jsonl"
        bad.write_text(json.dumps(row) + "\n")
        with pytest.raises(TaskError, match=f"bad.jsonl:1: .*{why}"):
            read_code(bad)


def test_dsv3_eval_code_cli_on_a_random_model(tmp_path):
    """A random tiny model writes garbage: every sample gets a verdict (failed / error), the run completes and
    writes its results; a task file that is no code task is one error line."""
    from serve_fixture import build_engine
    from dsv3 import save_pretrained
    from dsv3.cli import main
    engine = build_engine()
    save_pretrained(engine.model, tmp_path / "m")
    engine.tokenizer.save(tmp_path / "m")
    args = ["eval", "code", "--model", str(tmp_path / "m"), "--out", str(tmp_path / "o"), "--device", "cpu",
            "--dtype", "float64", "--max-tokens", "6", "--timeout", "3"]
    assert main(args + ["--task", str(CALL), "--limit", "3"]) == 0
    assert main(args + ["--task", str(STDIO), "--k", "2", "--temperature", "1.0", "--limit", "2"]) == 0
    res = json.loads((tmp_path / "o" / "results.json").read_text())
    assert set(res) == {"code_call", "code_stdio"} and res["code_call"]["prompt_version"] == "code-v1"
    m = res["code_stdio"]["metrics"]
    assert m["n"] == 2 and sum(v for k, v in m.items() if k.startswith("samples_")) == 4 and "pass@2" in m
    recs = [json.loads(line) for line in (tmp_path / "o" / "samples_code_call.jsonl").read_text().splitlines()]
    assert len(recs) == 3 and all(v in ("passed", "failed", "error", "timeout") for r in recs for v in r["verdicts"])
    assert (tmp_path / "o" / "results.png").stat().st_size > 1000
    assert main(args + ["--task", str(DATA.parent / "lm_eval_mc" / "dsv3_mc.jsonl")]) == 2
    assert STDIO_STOP == ["```"]
    from serve_fixture import start_server
    srv = start_server()                    # the same weights served: the same greedy programs and verdicts
    try:
        assert main(["eval", "code", "--server", srv.url, "--served-model-name", "dsv3-tiny", "--tokenizer",
                     str(tmp_path / "m"), "--out", str(tmp_path / "s"), "--max-tokens", "6", "--timeout", "3",
                     "--task", str(CALL), "--limit", "3"]) == 0
    finally:
        srv.stop()
    remote = [json.loads(line) for line in (tmp_path / "s" / "samples_code_call.jsonl").read_text().splitlines()]
    assert [r["outputs"] for r in remote] == [r["outputs"] for r in recs]
    assert [r["verdicts"] for r in remote] == [r["verdicts"] for r in recs]
