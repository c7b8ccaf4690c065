"""Audit of `dsv3 eval` as a demanding user would run it: a re-run never replaces an earlier report unless asked (and is
refused before any question is asked), results.json stays strict JSON (no NaN), an unreadable results.json is an
error before the run, a server that hangs or answers 5xx is given up on after a bounded number of requests, a
malformed server answer fails its samples instead of the run, needle lengths beyond the model's context are a clear
error, and a benchmark's name in place of a task file says how to run it."""

import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from dsv3.cli import main
from dsv3.eval import run
from dsv3.eval.backends import Failure, OpenAIBackend
from dsv3.eval.multiple_choice import TaskError, read_mc
from dsv3.eval.report import ResultsExist

sys.path.insert(0, str(Path(__file__).parent))
from posttrain_fixture import make_base  # noqa: E402


class Counting:
    """A log-likelihood backend that scores choice 0 best and counts its calls."""

    def __init__(self):
        self.calls = 0

    def loglikelihoods(self, pairs):
        self.calls += 1
        return [-float(i % 2) for i in range(len(pairs))]


class CharTokenizer:
    bos_id = 1

    def encode(self, text):
        return [ord(c) % 250 + 3 for c in text]


def _task(path: Path, n: int) -> Path:
    path.write_text("".join(json.dumps({"question": f"q{i}?", "choices": ["a", "b"], "answer": 0}) + "\n"
                            for i in range(n)))
    return path


def test_rerun_is_refused_before_any_question_unless_asked(tmp_path):
    task, out = _task(tmp_path / "t.jsonl", 3), tmp_path / "out"
    b = Counting()
    run.evaluate_mc(b, CharTokenizer(), task, out)
    first = (out / "results.json").read_text(), (out / "samples_t.jsonl").read_text()
    with pytest.raises(ResultsExist, match="already holds results for task 't'.*--overwrite"):
        run.evaluate_mc(b, CharTokenizer(), task, out)
    assert b.calls == 1                                    # refused before asking the backend anything
    assert ((out / "results.json").read_text(), (out / "samples_t.jsonl").read_text()) == first
    run.evaluate_mc(b, CharTokenizer(), _task(tmp_path / "u.jsonl", 2), out)     # another task: added beside it
    assert set(json.loads((out / "results.json").read_text())) == {"t", "u"}
    run.evaluate_mc(b, CharTokenizer(), task, out, overwrite=True)               # asked: replaced
    assert b.calls == 3


def test_results_are_strict_json_and_a_broken_results_file_stops_the_run_first(tmp_path):
    task, out = _task(tmp_path / "one.jsonl", 1), tmp_path / "out"
    run.evaluate_mc(Counting(), CharTokenizer(), task, out)        # one question: its standard error does not exist

    def no_nan(x):
        raise AssertionError(f"{x} in results.json")
    res = json.loads((out / "results.json").read_text(), parse_constant=no_nan)["one"]["metrics"]
    assert res["acc"] == 1.0 and res["acc_stderr"] is None
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "results.json").write_text("{not json")
    b = Counting()
    with pytest.raises(ResultsExist, match="is not a results file"):
        run.evaluate_mc(b, CharTokenizer(), task, tmp_path / "bad")
    assert b.calls == 0 and (tmp_path / "bad" / "results.json").read_text() == "{not json"


class _Server:
    """A local HTTP server answering every request with `reply(handler)`; counts requests."""

    def __init__(self, reply):
        self.requests = 0
        outer = self

        class H(BaseHTTPRequestHandler):
            def do_POST(self):
                outer.requests += 1
                self.rfile.read(int(self.headers.get("content-length", 0)))
                reply(self)

            def log_message(self, *a):
                pass
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def _json(handler, status, body):
    data = json.dumps(body).encode()
    handler.send_response(status)
    handler.send_header("content-type", "application/json")
    handler.send_header("content-length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)


@pytest.mark.parametrize("kind", ["hang", "500"])
def test_a_down_server_is_given_up_on_after_bounded_requests(kind):
    def reply(h):
        if kind == "hang":
            time.sleep(1.5)                 # longer than the client's timeout
        _json(h, 500, {"error": {"message": "boom"}})
    srv = _Server(reply)
    try:
        b = OpenAIBackend(srv.url, "m", timeout=0.3, max_retries=1, give_up_after=2, batch=2)
        t = time.monotonic()
        out = b.loglikelihoods([([5, 6], [7])] * 40)                     # 20 requests' worth
        gen = b.generate([[5, 6]] * 10, 2, 1.0, 4, [], 0)
        elapsed = time.monotonic() - t
    finally:
        srv.close()
    assert all(isinstance(x, Failure) for x in out) and len(out) == 40
    assert all(isinstance(x, Failure) for row in gen for x in row) and len(gen) == 10
    assert "given up after 2 failed requests in a row" in out[-1].error and "given up" in gen[0][0].error
    assert srv.requests <= 2 * 2              # give_up_after x (max_retries + 1) HTTP requests, not 30 x 2
    assert elapsed < 20


def test_a_malformed_answer_fails_its_samples_not_the_run():
    srv = _Server(lambda h: _json(h, 200, {"id": "x", "object": "text_completion", "created": 0, "model": "m",
                                            "choices": [{"index": 0, "text": "hi", "finish_reason": "stop",
                                                         "logprobs": {"token_logprobs": [None]}}]}))
    try:
        b = OpenAIBackend(srv.url, "m", timeout=5, max_retries=0, batch=2)
        lls = b.loglikelihoods([([5, 6], [7]), ([5], [8, 9])])     # 1 choice for 2 prompts
        one = b.loglikelihoods([([5, 6], [7])])                     # 1 choice, but no log-prob for the token
        gen = b.generate([[5]], 2, 1.0, 4, [], 0)                   # 1 choice for n=2
    finally:
        srv.close()
    assert all(isinstance(x, Failure) and "malformed response" in x.error for x in lls + one + gen[0])


def test_needle_beyond_the_context_is_an_error_before_anything_runs(tmp_path):
    make_base(tmp_path / "m")                                       # max_position_embeddings 512
    (tmp_path / "hay.txt").write_text("The sky was clear over the hills that day. " * 400)
    out = tmp_path / "o"
    args = ["eval", "needle", "--task", str(tmp_path / "hay.txt"), "--model", str(tmp_path / "m"), "--out", str(out),
            "--device", "cpu", "--depths", "0.5"]
    assert main(args + ["--lengths", "256,4096"]) == 2
    assert not out.exists()
    assert main(args + ["--lengths", "256"]) in (0, None)
    assert json.loads((out / "results.json").read_text())["needle"]["metrics"]["errors"] == 0
    assert main(args + ["--lengths", "256"]) == 2                   # and the re-run is refused
    assert main(args + ["--lengths", "256", "--overwrite"]) in (0, None)       # unless asked


def test_a_benchmark_name_instead_of_a_file_says_how_to_run_it(tmp_path):
    with pytest.raises(TaskError, match="lm_eval --model local-completions"):
        read_mc(tmp_path / "mmlu")


def test_task_text_is_text_not_control_tokens(tmp_path):
    """A question, a code prompt or a haystack quoting the model's special tokens gets them as ordinary tokens."""
    from dsv3.data import train_tokenizer
    from dsv3.eval.code import CodeProblem, score_code
    from dsv3.eval.generation import score_generation
    from dsv3.eval.multiple_choice import MCQuestion, encode_pair, score_mc
    from dsv3.eval.needle import needle_grid
    tok = train_tokenizer(["plain words and more plain words " * 50], vocab_size=300)
    eos = "<｜end▁of▁sentence｜>"
    control = {tok.eos_id, tok.bos_id, tok.backend.token_to_id("<｜User｜>"),
               tok.backend.token_to_id("<｜Assistant｜>")} - {None}
    assert tok.eos_id in tok.encode(f"a {eos} b")           # a plain encode reads it as the control token ...

    class Seen:
        def __init__(self):
            self.ids = []

        def loglikelihoods(self, pairs):
            self.ids += [c + x for c, x in pairs]
            return [0.0] * len(pairs)

        def generate(self, prompts, k, temperature, max_tokens, stop, seed):
            self.ids += prompts
            return [["1"] * k for _ in prompts]
    b = Seen()
    ctx, cont = encode_pair(tok, f"Which ends {eos} a text?", " <｜User｜>", add_bos=False)
    score_mc(b, tok, [MCQuestion(f"Q {eos}?", ["<｜Assistant｜>", "b"], 0)], add_bos=False)
    score_generation(b, tok, [{"question": f"2 {eos} 3?", "answer": "1", "gold": "1"}], add_bos=False)
    score_code(b, tok, [CodeProblem("t", f"# {eos}\ndef f():\n", "call", test="def check(f):\n    pass",
                                    entry_point="f")], add_bos=False, timeout_s=5.0)
    needle_grid(b, tok, f"Words here. {eos} " * 400, [400], [0.5], add_bos=False)
    assert not control & set(ctx + cont)                     # ... task text never does
    assert b.ids and all(not control & set(ids) for ids in b.ids)


@pytest.mark.parametrize("kwargs,match", [
    (dict(limit=-1), "--limit must be an integer >= 0"), (dict(fewshot=-1), "--fewshot must be"),
    (dict(k=0), "--k must be an integer >= 1"), (dict(temperature=-1.0), "--temperature must be"),
    (dict(timeout_s=0.0), "--timeout must be"), (dict(workers=0), "--workers must be"),
    (dict(depths=[0.5, 2.0]), "--depths must be fractions"), (dict(lengths=[-5]), "--lengths must be positive"),
])
def test_option_ranges_are_checked_first(kwargs, match):
    with pytest.raises(ValueError, match=match):
        run.check_options(**kwargs)


def test_a_bad_option_stops_before_the_backend_is_asked(tmp_path):
    b = Counting()
    with pytest.raises(ValueError, match="--limit"):
        run.evaluate_mc(b, CharTokenizer(), _task(tmp_path / "t.jsonl", 3), tmp_path / "o", limit=-1)
    assert b.calls == 0 and not (tmp_path / "o").exists()


def test_runs_finishing_into_one_directory_keep_every_task(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from dsv3.eval.report import write_results
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda i: write_results(tmp_path, f"task{i}", {"acc": 0.5}, [{"i": i}], "v", {}), range(12)))
    assert set(json.loads((tmp_path / "results.json").read_text())) == {f"task{i}" for i in range(12)}


def test_files_the_report_did_not_write_are_refused_before_any_question(tmp_path):
    """A user's samples_t.jsonl or results.png in --out was replaced silently; a results.json that is JSON but not
    ours was rewritten and the chart then crashed; --out naming a file failed only after the whole evaluation."""
    task = _task(tmp_path / "t.jsonl", 2)
    for name, text, says in (("samples_t.jsonl", "mine", "holds samples_t.jsonl"),
                             ("results.png", "mine", "holds results.png"),
                             ("results.json", '{"mine": 1, "list": [1, 2]}', "is not a results file")):
        out = tmp_path / name.replace(".", "_")
        out.mkdir()
        (out / name).write_text(text)
        b = Counting()
        with pytest.raises(ResultsExist, match=says):
            run.evaluate_mc(b, CharTokenizer(), task, out)
        assert b.calls == 0 and (out / name).read_text() == text
    run.evaluate_mc(Counting(), CharTokenizer(), task, tmp_path / "samples_t_jsonl", overwrite=True)   # asked
    (tmp_path / "file").write_text("data")
    b = Counting()
    with pytest.raises(ResultsExist, match="is not a directory"):
        run.evaluate_mc(b, CharTokenizer(), task, tmp_path / "file")
    assert b.calls == 0


def test_a_non_json_body_and_nan_log_probabilities_fail_their_samples():
    """A 200 whose body is not JSON ended the run with "Expecting value: line 1 column 1"; NaN log-probabilities
    were summed, and the argmax over NaNs picked choice 0: scored right where it was the answer."""
    def html(h):
        data = b"<html>hello</html>"
        h.send_response(200)
        h.send_header("content-type", "application/json")
        h.send_header("content-length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)
    nan = '{"id": "x", "object": "text_completion", "created": 0, "model": "m", "choices": [{"index": 0, ' \
          '"text": "", "finish_reason": "length", "logprobs": {"token_logprobs": [null, NaN, NaN]}}]}'

    def nan_reply(h):
        data = nan.encode()
        h.send_response(200)
        h.send_header("content-type", "application/json")
        h.send_header("content-length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)
    for reply, says in ((html, "not JSON"), (nan_reply, "no finite log-probabilities")):
        srv = _Server(reply)
        try:
            out = OpenAIBackend(srv.url, "m", max_retries=0, batch=1).loglikelihoods([([5], [6, 7])])
        finally:
            srv.close()
        assert isinstance(out[0], Failure) and says in out[0].error, out


@pytest.mark.parametrize("flags, says", [(["gen", "--k", "0"], "--k must be"), (["mc", "--chat"], "--chat applies"),
                                         (["needle", "--depths", "2"], "--depths must be")])
def test_eval_flags_are_checked_before_the_model_is_read(tmp_path, capsys, flags, says):
    """The flags' ranges were checked only after the model had loaded (minutes for a large checkpoint)."""
    task = _task(tmp_path / "t.jsonl", 1)
    assert main(["eval", flags[0], "--task", str(task), "--model", str(tmp_path / "absent"), *flags[1:],
                 "--out", str(tmp_path / "o")]) == 2
    assert says in capsys.readouterr().err
