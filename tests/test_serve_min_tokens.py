"""`min_tokens` (vLLM's extension, as its clients send it): until a choice has that many tokens, EOS and
`stop_token_ids` cannot be sampled (their logits are -inf, as vLLM's MinTokensLogitsProcessor) and a stop string
that starts inside those first tokens does not end it. Both APIs take it, 0 <= min_tokens <= max_tokens, else a 400
naming `min_tokens`; the engine takes it as SamplingParams.min_tokens (speculative steps wait until it is reached).
Before, the field was ignored as an unknown one: a stop before min_tokens ended the output."""

from __future__ import annotations

import json

import httpx
import pytest

from dsv3.infer import Engine, EngineConfig, SamplingParams
from serve_fixture import build_engine, start_server

PROMPT = "import os"


@pytest.fixture(scope="module")
def server():
    s = start_server()
    yield s
    s.stop()


def post(server, route: str, body: dict) -> httpx.Response:
    return httpx.post(server.url + route, json=body, timeout=60)


def test_eos_and_stop_tokens_before_min_tokens_are_suppressed(server):
    eos = server.tokenizer.eos_id
    # EOS (or a stop token) is pushed to the top of every step's logits: without min_tokens it ends the output at once
    forced = {"prompt": PROMPT, "max_tokens": 20, "temperature": 0, "logit_bias": {str(eos): 100}}
    r = post(server, "/v1/completions", forced).json()
    assert r["choices"][0]["finish_reason"] == "stop" and r["usage"]["completion_tokens"] == 1, r
    r = post(server, "/v1/completions", dict(forced, min_tokens=4)).json()
    assert r["choices"][0]["finish_reason"] == "stop" and r["usage"]["completion_tokens"] == 5, r   # 4, then EOS
    stop_id = 100
    by_id = {"prompt": PROMPT, "max_tokens": 20, "temperature": 0.7, "seed": 1, "logit_bias": {str(stop_id): 100},
             "stop_token_ids": [stop_id], "min_tokens": 6}
    r = post(server, "/v1/completions", by_id).json()
    assert r["choices"][0]["finish_reason"] == "stop" and r["usage"]["completion_tokens"] == 7, r
    # the chat API likewise
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 20, "temperature": 0,
            "logit_bias": {str(eos): 100}, "min_tokens": 3}
    r = post(server, "/v1/chat/completions", chat).json()
    assert r["choices"][0]["finish_reason"] == "stop" and r["usage"]["completion_tokens"] == 4, r
    # min_tokens == max_tokens: no stop at all
    r = post(server, "/v1/completions", dict(forced, min_tokens=20)).json()
    assert r["choices"][0]["finish_reason"] == "length" and r["usage"]["completion_tokens"] == 20, r


def test_a_stop_string_inside_min_tokens_does_not_end_the_output(server):
    tok = server.tokenizer
    token = tok.encode("x")[0]
    text = tok.decode([token])
    body = {"prompt": PROMPT, "max_tokens": 20, "temperature": 0, "logit_bias": {str(token): 100}, "stop": [text]}
    r = post(server, "/v1/completions", body).json()
    assert r["choices"][0]["text"] == "" and r["usage"]["completion_tokens"] == 1, r
    r = post(server, "/v1/completions", dict(body, min_tokens=3)).json()
    # three tokens kept whole; the fourth one's text is the stop string, cut off
    assert r["choices"][0]["finish_reason"] == "stop" and r["usage"]["completion_tokens"] == 4, r
    assert r["choices"][0]["text"] == text * 3, r
    with httpx.stream("POST", server.url + "/v1/completions", json=dict(body, min_tokens=3, stream=True),
                      timeout=60) as s:
        events = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
    assert "".join(e["choices"][0]["text"] for e in events) == text * 3, events


@pytest.mark.parametrize("route, body, says", [
    ("/v1/completions", {"prompt": PROMPT, "max_tokens": 4, "min_tokens": 5}, "max_tokens"),
    ("/v1/completions", {"prompt": PROMPT, "min_tokens": 17}, "max_tokens"),           # the default max_tokens, 16
    ("/v1/completions", {"prompt": PROMPT, "max_tokens": 0, "echo": True, "min_tokens": 1}, "max_tokens"),
    ("/v1/completions", {"prompt": PROMPT, "min_tokens": -1}, "min_tokens"),
    ("/v1/completions", {"prompt": PROMPT, "min_tokens": "3"}, "min_tokens"),
    ("/v1/completions", {"prompt": PROMPT, "min_tokens": 2.5}, "min_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 2,
                              "min_tokens": 3}, "max_completion_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "min_tokens": 10**6}, "min_tokens"),
])
def test_min_tokens_out_of_range_is_a_400_naming_it(server, route, body, says):
    r = post(server, route, body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "min_tokens" and says in error["message"], error


def force_eos(engine: Engine) -> None:
    """The model itself all but certain of EOS at every position: +100 on EOS's column of every logits the engine's
    runner computes (the main model's and the MTP drafts'). Unlike logit_bias (which makes a request
    `modifies_logits`, and such a batch never speculates), this leaves the speculative engine free to speculate."""
    eos, logits = engine.tokenizer.eos_id, engine.runner.logits

    def forced(hidden):
        out = logits(hidden)
        out[..., eos] += 100
        return out
    engine.runner.logits = forced


def test_engine_min_tokens_plain_and_speculative():
    """The engine's own: suppressed EOS in plain steps, with the overlap schedule, and in a speculative engine (which
    speculates only once min_tokens is reached: a step accepting several drafts could otherwise end below it)."""
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(max_tokens=3, min_tokens=4)
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(min_tokens=-1)
    plain = build_engine()
    eos = plain.tokenizer.eos_id
    spec = Engine(plain.model, plain.tokenizer, EngineConfig(block_size=8, num_blocks=200, num_speculative_tokens=2))
    # the overlap schedule samples a token while the last one is still pending (counted by num_output_tokens)
    overlap = Engine(plain.model, plain.tokenizer, EngineConfig(block_size=8, num_blocks=200, overlap_schedule=True))
    assert overlap.overlap
    for engine in (plain, spec, overlap):
        p = SamplingParams(temperature=0, max_tokens=30, logit_bias={eos: 100}, min_tokens=9)
        out = engine.generate([PROMPT, "def f"], p)
        assert [len(o.token_ids) for o in out] == [10, 10] and all(o.finish_reason == "stop" for o in out), out
        assert all(eos not in o.token_ids[:-1] and o.token_ids[-1] == eos for o in out)
    # EOS forced by the model's own logits: the speculative engine speculates (logit_bias kept it to plain steps),
    # from min_tokens on, and still stops no earlier
    for engine in (plain, spec, overlap):
        force_eos(engine)
        steps = engine.spec_stats["steps"]
        out = engine.generate([PROMPT, "def f"], SamplingParams(temperature=0, max_tokens=30, min_tokens=9))
        assert [len(o.token_ids) for o in out] == [10, 10] and all(o.finish_reason == "stop" for o in out), out
        assert all(eos not in o.token_ids[:-1] and o.token_ids[-1] == eos for o in out)
        assert (engine.spec_stats["steps"] > steps) == (engine is spec), engine.spec_stats
        # the logprobs stay the model's own, not the masked scores': before min_tokens EOS is not sampled, yet it is
        # the top entry, with its finite logprob (not the -inf that kept it from being sampled)
        lp = engine.generate([PROMPT], SamplingParams(temperature=0, max_tokens=3, min_tokens=3, logprobs=1))[0]
        assert lp.finish_reason == "length" and eos not in lp.token_ids, lp
        for token, (sampled, top_ids, top_lps) in zip(lp.token_ids, lp.logprobs):
            assert top_ids[0] == eos and float("-inf") < top_lps[0] <= 0 and top_ids[0] != token, lp.logprobs
            assert float("-inf") < sampled < top_lps[0], lp.logprobs
