"""Post-trained chat models are scored by `dsv3 eval gen --chat` (the post-training demo's numbers): each question
is one user turn in the model's chat template, encoded exactly as GRPO's rollouts and the server encode it, and the
answer is judged by the same extraction and equivalence as the GRPO correctness reward."""

import json

import pytest

from dsv3.cli import main
from dsv3.data import Tokenizer
from dsv3.data.chat import ChatTemplate
from dsv3.eval.generation import score_generation
from dsv3.posttrain.base import chat_template_of
from dsv3.posttrain.rollout import PromptSource
from dsv3.posttrain.tasks import generate_tasks, verify
from posttrain_fixture import make_base
from test_eval import Scripted


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_base(tmp_path_factory.mktemp("evalchat") / "base")


def test_chat_prompts_are_the_rollouts_and_verdicts_the_rewards(base):
    tok = Tokenizer.load(base)
    template = ChatTemplate(chat_template_of(base))
    tasks = generate_tasks("arithmetic", "heldout", 2, 0, digits=2, ops="+")
    questions = [dict(question=t.prompt, answer=t.answer, gold=t.answer) for t in tasks]
    a, b = tasks[0].answer, tasks[1].answer
    outputs = [[f"<think>x</think><answer>{a}</answer>", f"<answer>{int(a) + 1}</answer>", f"so {a}"],
               ["<think>no answer</think>", f"<think>{b}</think><answer>{b}</answer>", "<answer>1 + 1</answer>"]]
    backend = Scripted(outputs)
    m, records = score_generation(backend, tok, questions, k=3, temperature=1.0, chat=template)
    prompts, k, stop = backend.seen[0]
    # the ids GRPO samples from (PromptSource) and no "Question:" stop: a chat model ends its turn with EOS
    assert prompts == PromptSource(tok, template, tasks, 0).prompt_ids and k == 3 and stop == []
    assert prompts[0][0] == tok.bos_id and records[0]["prompt"] == template.render(
        [{"role": "user", "content": tasks[0].prompt}])
    want = [[verify(t, o) for o in outs] for t, outs in zip(tasks, outputs)]
    assert [[float(c) for c in r["correct"]] for r in records] == want == [[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]
    assert m["pass@1"] == pytest.approx((2 / 3 + 1 / 3) / 2) and m["pass@3"] == 1.0


def test_dsv3_eval_gen_chat_end_to_end(base, tmp_path, capsys):
    task = tmp_path / "held.jsonl"
    tasks = generate_tasks("arithmetic", "heldout", 3, 0, digits=2, ops="+")
    task.write_text("".join(json.dumps({"question": t.prompt, "answer": t.answer}) + "\n" for t in tasks))
    out = tmp_path / "out"
    assert main(["eval", "gen", "--chat", "--model", str(base), "--task", str(task), "--k", "2", "--temperature",
                 "1", "--max-tokens", "4", "--max-num-seqs", "8", "--cache-gib", "0.01", "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())["held"]
    assert res["prompt_version"] == "chat-v1" and res["config"]["chat"] is True
    assert res["metrics"]["n"] == 3 and res["metrics"]["samples"] == 6
    rows = [json.loads(x) for x in (out / "samples_held.jsonl").read_text().splitlines()]
    template = ChatTemplate(chat_template_of(base))
    assert [r["prompt"] for r in rows] == [template.render([{"role": "user", "content": t.prompt}]) for t in tasks]
    assert main(["eval", "mc", "--chat", "--model", str(base), "--task", str(task)]) == 2
    assert "--chat applies to dsv3 eval gen" in capsys.readouterr().err
