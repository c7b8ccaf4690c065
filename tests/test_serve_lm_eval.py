"""lm-evaluation-harness against a live `dsv3 serve`: a local multiple-choice task scored through /v1/completions
(echo + prompt logprobs on token-id prompts) must give the same log-likelihoods, predictions and accuracy as the
reference engine scoring the same token ids itself.

The task lives in tests/data/lm_eval_mc; nothing is downloaded (the data set is a local JSON-lines file, the
tokenizer is the server's own, reached through /tokenizer_info + /tokenize, or saved to disk)."""

from __future__ import annotations

import json
from pathlib import Path

import lm_eval  # noqa: F401  (pinned in requirements-ci.txt: a missing install fails, it does not skip)
import pytest
import tenacity  # noqa: F401  lm-eval's API models refuse to start without it (the lm-eval[api] extra)
from serve_fixture import start_server

from dsv3.infer import SamplingParams

TASK_DIR = Path(__file__).parent / "data" / "lm_eval_mc"
TASK = "dsv3_mc"
LL_TOL = 1e-4       # same model on both sides, but different batch compositions


@pytest.fixture(scope="module")
def offline():
    # Set before datasets is first imported (lm_eval imports it lazily): datasets reads them at import time.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        import datasets.config
        # ...and in case another test module imported datasets before us.
        mp.setattr(datasets.config, "HF_HUB_OFFLINE", True)
        mp.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
        yield


@pytest.fixture(scope="module")
def live(offline):
    srv = start_server()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    """The task YAML with its data file made absolute: `datasets` resolves relative data_files against the
    current directory, not against the YAML. The datasets cache goes to tmp too, not ~/.cache."""
    out = tmp_path_factory.mktemp("lm_eval_task")
    text = (TASK_DIR / f"{TASK}.yaml").read_text()
    old = "  data_files:\n    test: dsv3_mc.jsonl\n"
    assert old in text, "the YAML's data_files block changed; update this fixture"
    data = (TASK_DIR / f"{TASK}.jsonl").resolve()
    text = text.replace(old, f"  cache_dir: {json.dumps(str(out / 'hf_datasets'))}\n"
                             f"  data_files:\n    test: {json.dumps(str(data))}\n")
    (out / f"{TASK}.yaml").write_text(text)
    return out


def load_docs() -> list[dict]:
    return [json.loads(line) for line in (TASK_DIR / f"{TASK}.jsonl").read_text().splitlines() if line.strip()]


def encode_pair(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's TemplateLM._encode_pair for causal models: trailing whitespace of the context moves onto the
    continuation, and the continuation's ids are the tail of the whole string's ids (not its own encoding)."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = tok.encode(context + continuation)
    ctx = tok.encode(context)
    return ctx, whole[len(ctx):]


def reference_scores(live, pairs: list[tuple[str, str]]) -> list[tuple[float, bool, bool]]:
    """(log-likelihood, is_greedy, is_greedy is within float noise of flipping) per (context, continuation),
    from the reference engine's prompt logprobs over the same ids lm-eval sends."""
    encoded = [encode_pair(live.tokenizer, c, x) for c, x in pairs]
    # top-2, so that a near-tie between the first two candidates can be recognised
    outs = live.reference.generate([c + x for c, x in encoded],
                                   SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=2))
    res = []
    for (ctx, cont), out in zip(encoded, outs):
        assert ctx and cont
        # prompt_logprobs[j] scores prompt token j + 1
        entries = out.prompt_logprobs[len(ctx) - 1:len(ctx) - 1 + len(cont)]
        assert len(entries) == len(cont)
        ll, greedy, ambiguous = 0.0, True, False
        for tid, (lp, top_ids, top_lps) in zip(cont, entries):
            ll += lp
            top = top_ids[0] == tid
            greedy &= top
            margin = (lp - top_lps[1]) if top else (top_lps[0] - lp)
            ambiguous |= margin < LL_TOL
        res.append((ll, greedy, ambiguous))
    return res


def argmax_first(xs: list[float]) -> int:
    return max(range(len(xs)), key=lambda i: (xs[i], -i))     # np.argmax: the first of equal maxima


BACKENDS = {
    # lm-eval's default: it finds /tokenizer_info + /tokenize and tokenizes through the server
    "remote-auto-bs1": ("", 1),
    # the tokenizer saved to disk and loaded by transformers; batches of 4 token-id prompts per request
    "huggingface-bs4": ("tokenizer_backend=huggingface,tokenizer={tok_dir}", 4),
}


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_lm_eval_multiple_choice_matches_reference(live, task_dir, tmp_path, monkeypatch, backend):
    import lm_eval.tasks
    import lm_eval.utils

    extra, batch_size = BACKENDS[backend]
    if "{tok_dir}" in extra:
        extra = extra.format(tok_dir=live.tokenizer.save(tmp_path / "tokenizer"))
    remote_calls = []
    real_encode = lm_eval.utils.RemoteTokenizer.encode

    def spy(self, text):
        remote_calls.append(text)
        return real_encode(self, text)
    monkeypatch.setattr(lm_eval.utils.RemoteTokenizer, "encode", spy)

    model_args = (f"base_url={live.url}/v1/completions,model=dsv3-tiny,num_concurrent=1,max_retries=1,"
                  f"tokenized_requests=True" + (f",{extra}" if extra else ""))
    out = lm_eval.simple_evaluate(
        model="local-completions", model_args=model_args, tasks=[TASK], batch_size=batch_size,
        task_manager=lm_eval.tasks.TaskManager(include_path=str(task_dir), include_defaults=False),
        log_samples=True, bootstrap_iters=0,
        random_seed=None, numpy_random_seed=None, torch_random_seed=None)   # leave the global RNGs alone

    if backend.startswith("remote"):
        assert remote_calls, "lm-eval did not pick up the server's remote tokenizer"
    else:
        assert not remote_calls

    docs = load_docs()
    samples = sorted(out["samples"][TASK], key=lambda s: s["doc_id"])
    assert [s["doc_id"] for s in samples] == list(range(len(docs)))

    # What lm-eval asked for is what the task says: this fixes the strings the reference scores.
    pairs = []
    for s, doc in zip(samples, docs):
        assert s["doc"]["question"] == doc["question"]
        expected = [(f"Question: {doc['question']}\nAnswer: ", c) for c in doc["choices"]]
        assert [tuple(a) for a in s["arguments"]] == expected
        pairs += expected

    ref = reference_scores(live, pairs)
    k = 0
    ref_correct, lm_correct = 0, 0
    for s, doc in zip(samples, docs):
        n = len(doc["choices"])
        got, want = s["filtered_resps"], ref[k:k + n]
        k += n
        for j, ((ll, greedy), (ref_ll, ref_greedy, ambiguous)) in enumerate(zip(got, want)):
            assert ll == pytest.approx(ref_ll, abs=LL_TOL), f"doc {s['doc_id']} choice {j}: {ll} vs {ref_ll}"
            if not ambiguous:
                assert greedy == ref_greedy, f"doc {s['doc_id']} choice {j}: is_greedy {greedy} vs {ref_greedy}"
        pred = argmax_first([w[0] for w in want])
        ref_acc = float(pred == doc["answer"])
        assert s["acc"] == ref_acc, f"doc {s['doc_id']}: lm-eval acc {s['acc']}, reference predicts {pred}"
        ref_correct += int(ref_acc)
        lm_correct += int(s["acc"])

    acc = out["results"][TASK]["acc,none"]
    assert round(acc * len(docs)) == lm_correct == ref_correct, (acc, lm_correct, ref_correct)
    print(f"\n{backend}: lm-eval acc {acc:.3f} = reference {ref_correct}/{len(docs)}")
