"""dsv3.eval: pass@k against its closed form and brute-force enumeration, maj@k and standard errors by hand, and
multiple choice scored through the engine against log-likelihoods from a float64 full forward of the same model."""

import itertools
import json
import math

import pytest
import torch

from conftest import build, tiny_config
from dsv3.data import train_tokenizer
from dsv3.eval import (EngineBackend, MCQuestion, TaskError, binomial_stderr, bootstrap_stderr, encode_pair,
                       majority_answer, mc_prompt, pass_at_k, read_mc, score_mc)
from dsv3.infer import Engine, EngineConfig


@pytest.mark.parametrize("n,c", [(5, 0), (5, 1), (5, 3), (6, 6), (10, 4)])
def test_pass_at_k_equals_enumeration_and_closed_form(n, c):
    for k in range(1, n + 1):
        draws = list(itertools.combinations(range(n), k))          # samples 0..c-1 are the correct ones
        enum = sum(any(i < c for i in d) for d in draws) / len(draws)
        closed = 1 - math.comb(n - c, k) / math.comb(n, k)
        assert pass_at_k(n, c, k) == pytest.approx(enum, abs=1e-12) == pytest.approx(closed, abs=1e-12)
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 1)


def test_maj_and_stderr():
    assert majority_answer(["4", "5", "4", None, None, None]) == "4" and majority_answer(["5", "4"]) == "5"
    assert majority_answer([None, None]) is None
    assert binomial_stderr(0.25, 5) == pytest.approx(math.sqrt(0.25 * 0.75 / 4))
    scores = [1.0, 0.0] * 50
    assert bootstrap_stderr(scores, resamples=2000) == pytest.approx(math.sqrt(0.25 / 100), rel=0.15)


TEXTS = ["What is the capital? A. Paris B. Rome Answer: A\n" * 10, "the quick brown fox jumps over the lazy dog " * 10]


@pytest.fixture(scope="module")
def setup():
    torch.set_num_threads(1)
    tok = train_tokenizer(TEXTS, vocab_size=320)
    model = build(tiny_config(vocab_size=tok.vocab_size, max_position_embeddings=512), seed=3, dtype=torch.float64)
    engine = Engine(model, tok, EngineConfig(block_size=8, num_blocks=400, max_num_seqs=16))
    return tok, model, engine


def _ll64(model, ctx, cont) -> float:
    """Summed log p(cont | ctx) from one full forward in float64 (no cache, no engine)."""
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        lp = torch.log_softmax(model(ids)[0].double(), -1)
    return sum(lp[len(ctx) - 1 + j, t].item() for j, t in enumerate(cont))


QUESTIONS = [MCQuestion("What is the capital of France?", ["Paris", "Rome", "Berlin", "Madrid"], 0),
             MCQuestion("Which is a fox?", ["the quick brown fox", "a dog"], 0),
             MCQuestion("Pick the lazy one.", ["fox", "dog", "cat"], 1)]


@pytest.mark.parametrize("continuation", ["letter", "text"])
@pytest.mark.parametrize("add_bos", [True, False])
def test_multiple_choice_against_a_float64_forward(setup, continuation, add_bos):
    tok, model, engine = setup
    shots = [QUESTIONS[1]]
    res, records = score_mc(EngineBackend(engine), tok, QUESTIONS, shots, add_bos=add_bos, continuation=continuation)
    correct = correct_norm = 0
    for q, r in zip(QUESTIONS, records):
        assert r["prompt"] == mc_prompt(q, shots) and r["prompt"].endswith("Answer:")
        want = []
        for c in r["choices"]:
            ctx, cont = encode_pair(tok, r["prompt"], c, add_bos)
            assert (ctx[0] == tok.bos_id) == add_bos and cont
            want.append(_ll64(model, ctx, cont))
        assert r["loglikelihoods"] == pytest.approx(want, abs=1e-5)   # the engine reports fp32 log-probs
        best = max(range(len(want)), key=lambda i: want[i])
        # lm-eval's acc_norm: divided by the choice's characters, not counting the delimiter (the leading space)
        best_norm = max(range(len(want)), key=lambda i: want[i] / len(r["choices"][i].lstrip()))
        correct += best == q.answer
        correct_norm += best_norm == q.answer
    assert res["n"] == 3 and res["acc"] == correct / 3 and res["acc_norm"] == correct_norm / 3
    assert res["acc_stderr"] == pytest.approx(binomial_stderr(correct / 3, 3))


def test_encode_pair_follows_lm_eval(setup):
    tok = setup[0]
    ctx, cont = encode_pair(tok, "Answer: ", "A", add_bos=False)   # the trailing space moves onto the continuation
    assert ctx == tok.encode("Answer:") and cont == tok.encode("Answer: A")[len(ctx):]


def test_task_files(tmp_path):
    good = tmp_path / "mc.jsonl"
    good.write_text(json.dumps({"question": "q?", "choices": ["a", "b"], "answer": "B"}) + "\n\n" +
                    json.dumps({"question": "r?", "choices": ["a", "b", "c"], "answer": 2}) + "\n")
    qs = read_mc(good)
    assert [q.answer for q in qs] == [1, 2]
    for row, why in [({"question": "", "choices": ["a", "b"], "answer": 0}, "question"),
                     ({"question": "q", "choices": ["a"], "answer": 0}, "choices"),
                     ({"question": "q", "choices": ["a", "b"], "answer": 5}, "answer"),
                     ({"question": "q", "choices": ["a", "b"], "answer": True}, "answer")]:
        bad = tmp_path / "bad.jsonl"
        bad.write_text(json.dumps(row) + "\n")
        with pytest.raises(TaskError, match=rf"bad.jsonl:1: '{why}'"):
            read_mc(bad)
    (tmp_path / "x.jsonl").write_text("{oops\n")
    with pytest.raises(TaskError, match="x.jsonl:1: not JSON"):
        read_mc(tmp_path / "x.jsonl")
    with pytest.raises(TaskError, match="jsonl or .parquet"):
        read_mc(tmp_path / "mc.csv")


def test_openai_backend_equals_the_engine_behind_the_server():
    """The same pairs scored through a live `dsv3 serve` (the openai client, token-id prompts, echo) and by an engine
    of its own on the same weights: equal log-likelihoods, so equal accuracy."""
    from serve_fixture import start_server
    from dsv3.eval import OpenAIBackend
    srv = start_server()
    try:
        tok = srv.tokenizer
        qs = [MCQuestion("def read_file(path):", ["with open(path) as f:", "import os", "class Point:"], 0),
              MCQuestion("The quick brown", ["fox jumps", "dog sleeps"], 0)]
        remote = score_mc(OpenAIBackend(srv.url, "dsv3-tiny", batch=3), tok, qs, continuation="text")
        local = score_mc(EngineBackend(srv.reference), tok, qs, continuation="text")
        for r, l in zip(remote[1], local[1]):
            assert r["loglikelihoods"] == pytest.approx(l["loglikelihoods"], abs=1e-5)
        assert remote[0]["acc"] == local[0]["acc"] and remote[0]["acc_norm"] == local[0]["acc_norm"]
    finally:
        srv.stop()


def test_dsv3_eval_cli_local_and_through_a_server(tmp_path):
    """`dsv3 eval mc` on a saved model and against a live server: the results files, the tokenizer's BOS
    convention (add_bos_token), and the same accuracy as score_mc on an engine of its own."""
    from serve_fixture import build_engine, start_server
    from dsv3 import save_pretrained
    from dsv3.cli import main
    engine = build_engine()
    save_pretrained(engine.model, tmp_path / "m")
    engine.tokenizer.save(tmp_path / "m")
    assert json.loads((tmp_path / "m" / "tokenizer_config.json").read_text())["add_bos_token"]
    rows = [{"question": f"Which line follows {w}?", "choices": ["import os", "class Point:", "for i in range(10):"],
             "answer": k % 3} for k, w in enumerate(["def", "The quick", "print", "total", "x"])]
    task = tmp_path / "lines.jsonl"
    task.write_text("".join(json.dumps(r) + "\n" for r in rows))
    want, _ = score_mc(EngineBackend(engine), engine.tokenizer, read_mc(task), add_bos=True)
    assert main(["eval", "mc", "--task", str(task), "--model", str(tmp_path / "m"), "--out", str(tmp_path / "a"),
                 "--device", "cpu", "--dtype", "float64"]) in (0, None)
    res = json.loads((tmp_path / "a" / "results.json").read_text())["lines"]
    assert res["config"]["add_bos"] is True and res["metrics"]["acc"] == want["acc"]
    samples = (tmp_path / "a" / "samples_lines.jsonl").read_text().splitlines()
    assert len(samples) == 5 and json.loads(samples[0])["prompt"].endswith("Answer:")
    srv = start_server()
    try:
        assert main(["eval", "mc", "--task", str(task), "--server", srv.url, "--served-model-name", "dsv3-tiny",
                     "--tokenizer", str(tmp_path / "m"), "--out", str(tmp_path / "b")]) in (0, None)
    finally:
        srv.stop()
    remote = json.loads((tmp_path / "b" / "results.json").read_text())["lines"]
    assert remote["metrics"]["acc"] == want["acc"] and remote["metrics"]["acc_norm"] == want["acc_norm"]
    assert main(["eval", "mc", "--task", str(tmp_path / "nope.jsonl"), "--model", str(tmp_path / "m")]) == 2


class Scripted:
    """Fixed completions, to check the scoring arithmetic by hand (the engine path is tested below)."""

    def __init__(self, texts):
        self.texts, self.seen = texts, []

    def generate(self, prompts, k, temperature, max_tokens, stop, seed):
        self.seen.append((prompts, k, stop))
        return self.texts


def test_generation_scoring_by_hand(setup, tmp_path):
    from dsv3.eval.generation import qa_prompt, read_qa, score_generation
    tok = setup[0]
    task = tmp_path / "gsm.jsonl"
    task.write_text(json.dumps({"question": "2+2?", "answer": "two and two #### 4"}) + "\n" +
                    json.dumps({"question": "3*3?", "answer": 9}) + "\n")
    qs = read_qa(task)
    assert [q["gold"] for q in qs] == ["4", "9"]
    backend = Scripted([["The answer is 4.", "5", "so 4"],        # 2 of 3 right; majority 4
                        ["nothing", "\\boxed{9}", "8"]])          # 1 of 3 right; 9 and 8 tie
    m, records = score_generation(backend, tok, qs, k=3)
    assert backend.seen[0][1] == 3 and backend.seen[0][2] == ["Question:"]
    assert backend.seen[0][0][0][0] == tok.bos_id and qa_prompt(qs[0]).endswith("Question: 2+2?\nAnswer:")
    assert m["pass@1"] == pytest.approx((2 / 3 + 1 / 3) / 2) and m["pass@3"] == 1.0
    # maj@3: question 1's majority is "4" (right); question 2's answers 9, 8 tie -> the first seen, "9" (right)
    assert m["maj@3"] == 1.0 and m["extraction_failures"] == 1 and m["n"] == 2
    assert records[1]["extracted"] == [None, "9", "8"] and records[1]["correct"] == [False, True, False]


def test_engine_generation_backend_is_the_engine(setup):
    from dsv3.infer import SamplingParams
    tok, _, engine = setup
    ids = tok.encode("Question: the quick\nAnswer:")
    got = EngineBackend(engine).generate([ids], 2, 1.0, 6, [], seed=7)
    want = [o.text for o in engine.generate([ids, ids], [SamplingParams(temperature=1.0, max_tokens=6, seed=7 + j)
                                                          for j in range(2)])]
    assert got == [want]


def test_dsv3_eval_gen_cli(tmp_path):
    """`dsv3 eval gen` writes pass@k / maj@k with per-sample records; a random model's outputs are scored, whatever
    they hold, and refusals are one-line errors."""
    from serve_fixture import build_engine
    from dsv3 import save_pretrained
    from dsv3.cli import main
    engine = build_engine()
    save_pretrained(engine.model, tmp_path / "m")
    engine.tokenizer.save(tmp_path / "m")
    task = tmp_path / "arith.jsonl"
    task.write_text("".join(json.dumps({"question": f"{a} + {a}?", "answer": f"#### {2 * a}"}) + "\n"
                            for a in range(4)))
    args = ["eval", "gen", "--task", str(task), "--model", str(tmp_path / "m"), "--out", str(tmp_path / "o"),
            "--device", "cpu", "--dtype", "float64", "--max-tokens", "8"]
    assert main(args + ["--k", "3", "--temperature", "1.0"]) in (0, None)
    res = json.loads((tmp_path / "o" / "results.json").read_text())["arith"]
    assert res["metrics"]["n"] == 4 and {"pass@1", "pass@3", "maj@3"} <= set(res["metrics"])
    recs = [json.loads(line) for line in (tmp_path / "o" / "samples_arith.jsonl").read_text().splitlines()]
    assert [r["gold"] for r in recs] == ["0", "2", "4", "6"] and all(len(r["outputs"]) == 3 for r in recs)
    assert main(args + ["--k", "3"]) == 2          # greedy samples are all the same
    # generation_config.json's eos_token_id ends the local engine's generations as it ends `dsv3 serve`'s (the
    # engine's stop at EngineConfig.eos_token_ids: tests/test_infer_audit.py)
    from dsv3.infer import Engine
    seen, init = [], Engine.__init__

    def spy(self, model, tokenizer=None, config=None):
        seen.append(config.eos_token_ids)
        init(self, model, tokenizer, config)
    (tmp_path / "m" / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 5]}))
    with pytest.MonkeyPatch.context() as m:
        m.setattr(Engine, "__init__", spy)
        assert main(args + ["--k", "1", "--temperature", "0", "--overwrite"]) in (0, None)
    assert seen == [[1, 5]]


class Reader:
    """A perfect retriever: reads the prompt back and answers with the needle it finds, so the grid's construction
    (lengths, depths, one needle per cell) is what is checked; a real model's retrieval is a benchmark."""

    def __init__(self, tok):
        self.tok, self.lengths, self.positions = tok, [], []

    def generate(self, prompts, k, temperature, max_tokens, stop, seed):
        import re
        out = []
        for ids in prompts:
            text = self.tok.decode(ids, skip_special_tokens=True)
            self.lengths.append(len(ids))
            m = list(re.finditer(r"The secret number of (\w+) is (\d+)\.", text))
            assert len(m) == 1                      # one needle a cell
            hay = text.index("\nQuestion:") - len(m[0].group(0))      # the haystack's characters
            self.positions.append(m[0].start() / hay)
            out.append([f" {m[0].group(2)}."])
        return out


def test_needle_grid_places_one_needle_per_cell_within_length(setup, tmp_path):
    from dsv3.eval.needle import ANSWER_TOKENS, heat_map, needle_grid
    tok = setup[0]
    filler = "The quick brown fox jumps over the lazy dog. " * 300
    lengths, depths = [192, 256, 512], [0.0, 0.5, 1.0]
    reader = Reader(tok)
    scores, records = needle_grid(reader, tok, filler, lengths, depths)
    assert scores == [[1.0] * 3] * 3 and len({r["needle"] for r in records}) == 9
    for L, n in zip([L for L in lengths for _ in depths], reader.lengths):
        # BOS + the prompt's tokens: with the answer's ANSWER_TOKENS, within the cell's length
        assert L - ANSWER_TOKENS - 24 <= n <= L - ANSWER_TOKENS
    pos = [reader.positions[i * 3:(i + 1) * 3] for i in range(3)]
    assert all(p[0] < 0.05 and 0.3 < p[1] < 0.7 and p[2] > 0.8 for p in pos), pos
    heat_map(scores, lengths, depths, tmp_path / "needle.png")
    assert (tmp_path / "needle.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="fewer than"):
        needle_grid(reader, tok, "short. " * 5, [512], [0.5])


def test_failed_requests_are_per_sample_errors(setup, tmp_path):
    """An unreachable server makes every sample an error (recorded, counted, scored wrong; the run completes, and the
    CLI exits 1 because nothing was measured); a prompt the engine refuses fails only its own question."""
    import socket
    from dsv3.cli import main
    from dsv3.eval import OpenAIBackend
    from dsv3.eval.generation import score_generation
    tok, _, engine = setup
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"          # closed once the block ends: nobody listens
    m, recs = score_mc(OpenAIBackend(url, "x", batch=4), tok, QUESTIONS)
    assert m["errors"] == 3 and m["acc"] == 0 and m["n"] == 3
    assert all(r["error"].startswith("APIConnectionError") and r["prediction"] is None for r in recs)
    m, recs = score_generation(OpenAIBackend(url, "x"), tok, [dict(question="1+1?", answer="2", gold="2")], k=2)
    assert m["errors"] == 2 and m["extraction_failures"] == 0 and recs[0]["errors"][0].startswith("APIConnection")
    too_long = MCQuestion("fox " * 600, ["dog", "cat"], 0)              # past the 512-token context
    m, recs = score_mc(EngineBackend(engine), tok, [QUESTIONS[0], too_long, QUESTIONS[1]])
    assert m["errors"] == 1 and recs[1]["error"].startswith("ValueError: the prompt has")
    assert recs[0]["loglikelihoods"] and recs[2]["loglikelihoods"]
    tok.save(tmp_path / "tok")
    task = tmp_path / "t.jsonl"
    task.write_text(json.dumps({"question": "q?", "choices": ["a", "b"], "answer": 0}) + "\n")
    assert main(["eval", "mc", "--task", str(task), "--server", url, "--tokenizer", str(tmp_path / "tok"),
                 "--out", str(tmp_path / "o")]) == 1
    rec = json.loads((tmp_path / "o" / "samples_t.jsonl").read_text())
    assert rec["error"].startswith("APIConnectionError") and rec["correct"] is False
    qa = tmp_path / "qa.jsonl"
    qa.write_text(json.dumps({"question": "1+1?", "answer": "2"}) + "\n")
    assert main(["eval", "gen", "--task", str(qa), "--server", url, "--tokenizer", str(tmp_path / "tok"),
                 "--k", "2", "--temperature", "1", "--out", str(tmp_path / "o")]) == 1
    m = json.loads((tmp_path / "o" / "results.json").read_text())["qa"]["metrics"]
    assert m["errors"] == m["samples"] == 2 and m["n"] == 1


def test_bad_task_rows_are_skipped_counted_and_named(setup, tmp_path):
    """`dsv3 eval`: bad rows of a task file are skipped, counted (bad_rows) and named (file:line, reason) in the
    samples file, the rest scored; --strict makes the first one the run's one-line error; no usable row is one too."""
    from dsv3.cli import main
    from dsv3 import save_pretrained
    tok, model, engine = setup
    save_pretrained(model, tmp_path / "m")
    tok.save(tmp_path / "m")
    task = tmp_path / "t.jsonl"
    good = [{"question": "Which is a fox?", "choices": ["the quick brown fox", "a dog"], "answer": 0},
            {"question": "Pick the lazy one.", "choices": ["fox", "dog"], "answer": "B"}]
    one_choice = json.dumps({"question": "q", "choices": ["a"], "answer": 0})
    task.write_text(json.dumps(good[0]) + "\n{not json\n" + one_choice + "\n" + json.dumps(good[1]) + "\n")
    args = ["eval", "mc", "--task", str(task), "--model", str(tmp_path / "m"), "--device", "cpu", "--dtype", "float64",
            "--out", str(tmp_path / "o")]
    assert main(args) == 0
    m = json.loads((tmp_path / "o" / "results.json").read_text())["t"]["metrics"]
    want, _ = score_mc(EngineBackend(engine), tok, [MCQuestion(g["question"], g["choices"], i) for i, g in
                                                    zip([0, 1], good)])
    assert m["n"] == 2 and m["bad_rows"] == 2 and m["acc"] == want["acc"]
    recs = [json.loads(line) for line in (tmp_path / "o" / "samples_t.jsonl").read_text().splitlines()]
    assert [r.get("bad_row", "").rsplit(":", 1)[-1] for r in recs] == ["", "", "2", "3"]
    assert "not JSON" in recs[2]["error"] and "'choices'" in recs[3]["error"]
    assert main(args + ["--strict"]) == 2
    (tmp_path / "bad.jsonl").write_text("{oops\n")
    assert main(args[:2] + ["--task", str(tmp_path / "bad.jsonl")] + args[4:]) == 2
    with pytest.raises(TaskError, match="no usable rows .1 bad; the first: .*not JSON"):
        read_mc(tmp_path / "bad.jsonl", [])


def test_text_match_and_other_datasets_fields(setup, tmp_path):
    """SimpleQA-style factual QA (English and Chinese) by normalised exact match; MATH's problem/solution, ARC's and
    GPQA's MC fields."""
    from dsv3.eval.generation import read_qa, score_generation, text_key
    tok = setup[0]
    assert text_key("The  Eiffel Tower!") == text_key("eiffel tower") == "eiffeltower"
    assert text_key("巴黎。") == text_key(" 巴黎 ") and text_key("Paris") != text_key("Parish")
    qs = [dict(question="Capital of France?", answer="Paris", gold="Paris"),
          dict(question="法国的首都是哪里？", answer="巴黎", gold="巴黎")]
    backend = Scripted([[" paris.\nMore text", " The answer is Lyon.", ""],     # 1 of 3; majority paris
                        [" 巴黎。", " 里昂", " 巴黎"]])                          # 2 of 3; majority 巴黎
    m, recs = score_generation(backend, tok, qs, k=3, match="text")
    assert recs[0]["extracted"] == ["paris.", "Lyon", None] and recs[0]["correct"] == [True, False, False]
    assert recs[1]["correct"] == [True, False, True]
    assert m["pass@1"] == pytest.approx((1 / 3 + 2 / 3) / 2) and m["maj@3"] == 1.0
    m, _ = score_generation(Scripted([[" paris"], [" 巴黎"]]), tok, qs, match="math")    # math mode: no number
    assert m["pass@1"] == 0.0 and m["extraction_failures"] == 2
    task = tmp_path / "math.jsonl"
    task.write_text(json.dumps({"problem": "Half of 1?", "solution": "It is $\\boxed{\\frac{1}{2}}$."}) + "\n")
    assert read_qa(task)[0]["gold"] == "\\frac{1}{2}"
    mc = tmp_path / "mc.jsonl"
    mc.write_text(json.dumps({"question": "q", "choices": {"text": ["x", "y"], "label": ["1", "2"]},
                              "answerKey": "2"}) + "\n" +
                  json.dumps({"Question": "g", "Correct Answer": "R", "Incorrect Answer 1": "w1",
                              "Incorrect Answer 2": "w2", "Incorrect Answer 3": "w3"}) + "\n")
    arc, gpqa = read_mc(mc)
    assert arc.choices == ["x", "y"] and arc.answer == 1
    assert sorted(gpqa.choices) == ["R", "w1", "w2", "w3"] and gpqa.choices[gpqa.answer] == "R"
    assert read_mc(mc)[1].choices == gpqa.choices                 # the same order every run
