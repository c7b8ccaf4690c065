"""The model's generation_config.json as the server's sampling defaults (checkpoint/generation_config.py): a request
that leaves temperature / top_p / top_k out samples as the release says (DeepSeek-V3 / R1: 0.6, 0.95), its own values
win, a bad file is one line at start-up; through the real `openai` client, which sends none of them unless told."""

from __future__ import annotations

import json
import subprocess
import sys

import openai
import pytest

from dsv3.data import ChatTemplate, train_tokenizer
from dsv3.infer import EngineConfig, SamplingParams
from dsv3.infer.requests import RequestLimits
from dsv3.serve.protocol import ChatCompletionRequest, CompletionRequest
from dsv3.checkpoint import generation_config
from dsv3.checkpoint.generation_config import read_eos_ids, read_generation_config, read_sampling_defaults
from dsv3.serve.validation import plan_chat, plan_completion
from serve_fixture import TEXTS, start_server

LIMITS = RequestLimits(vocab_size=320, max_model_len=64, block_size=8, num_blocks=32)

V3 = {"_from_model_config": True, "bos_token_id": 0, "eos_token_id": 1, "do_sample": True, "temperature": 0.6,
      "top_p": 0.95, "transformers_version": "4.46.3"}


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(TEXTS, vocab_size=320)


def test_read_sampling_defaults(tmp_path):
    assert read_sampling_defaults(tmp_path) == {}                          # no file: OpenAI's defaults
    (tmp_path / "generation_config.json").write_text(json.dumps(V3))
    assert read_sampling_defaults(tmp_path) == {"temperature": 0.6, "top_p": 0.95}
    (tmp_path / "generation_config.json").write_text(json.dumps({"top_k": -1, "temperature": 0}))
    assert read_sampling_defaults(tmp_path) == {"temperature": 0, "top_k": 0}
    (tmp_path / "generation_config.json").write_text(json.dumps({"repetition_penalty": 1.05}))
    assert read_sampling_defaults(tmp_path) == {"repetition_penalty": 1.05}
    for bad, key in (({"temperature": 3}, "temperature"), ({"top_p": 0}, "top_p"), ({"top_k": 2.5}, "top_k"),
                     ({"temperature": True}, "temperature"), ({"top_p": "0.9"}, "top_p"),
                     ({"repetition_penalty": 0}, "repetition_penalty"),
                     ({"repetition_penalty": 3}, "repetition_penalty")):
        (tmp_path / "generation_config.json").write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=f"generation_config.json: {key}="):
            read_sampling_defaults(tmp_path)
    (tmp_path / "generation_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="generation_config.json: not a JSON object"):
        read_sampling_defaults(tmp_path)


def test_read_eos_ids(tmp_path):
    """generation_config.json's eos_token_id, an id or a list; none: []."""
    assert read_eos_ids(tmp_path) == []
    (tmp_path / "generation_config.json").write_text(json.dumps(V3))
    assert read_eos_ids(tmp_path) == [1]
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [163586, 163585]}))
    assert read_eos_ids(tmp_path) == [163586, 163585]
    (tmp_path / "generation_config.json").write_text(json.dumps({"temperature": 0.6}))
    assert read_eos_ids(tmp_path) == []
    for bad in (-1, "1", [1, None], True, 2.0):
        (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": bad}))
        with pytest.raises(ValueError, match="generation_config.json: eos_token_id="):
            read_eos_ids(tmp_path)


def test_serve_reads_the_file_once_for_both(tmp_path, monkeypatch):
    """`dsv3 serve`'s start-up: read_generation_config gives both from one read (before: the file was read and parsed
    twice); a file wrong in both is refused for its sampling key, as read_sampling_defaults then read_eos_ids were."""
    assert read_generation_config(tmp_path) == ({}, [])
    (tmp_path / "generation_config.json").write_text(json.dumps({**V3, "eos_token_id": [1, 7]}))
    reads, real = [], generation_config._read
    monkeypatch.setattr(generation_config, "_read", lambda d: reads.append(d) or real(d))
    assert read_generation_config(tmp_path) == ({"temperature": 0.6, "top_p": 0.95}, [1, 7]) and len(reads) == 1
    (tmp_path / "generation_config.json").write_text(json.dumps({"temperature": 3, "eos_token_id": "x"}))
    with pytest.raises(ValueError, match="generation_config.json: temperature=3"):
        read_generation_config(tmp_path)


def test_a_request_leaving_them_out_gets_the_defaults_and_its_own_values_win(tok):
    d = {"temperature": 0.6, "top_p": 0.95, "top_k": 20}
    got = lambda req, **kw: [p for _, p in plan_completion(req, LIMITS, tok, 64, **kw).jobs][0]  # noqa: E731
    p = got(CompletionRequest(prompt="def f(x):", max_tokens=2), defaults=d)
    assert (p.temperature, p.top_p, p.top_k) == (0.6, 0.95, 20)
    p = got(CompletionRequest(prompt="def f(x):", max_tokens=2, temperature=0, top_p=1, top_k=-1), defaults=d)
    assert (p.temperature, p.top_p, p.top_k) == (0, 1, 0)                  # 0 and -1 are values, not "left out"
    p = got(CompletionRequest(prompt="def f(x):", max_tokens=2))
    assert (p.temperature, p.top_p, p.top_k, p.repetition_penalty) == (1.0, 1.0, 0, 1.0)   # no defaults: OpenAI's
    p = got(CompletionRequest(prompt="def f(x):", max_tokens=2), defaults={"repetition_penalty": 1.1})
    assert p.repetition_penalty == 1.1
    p = got(CompletionRequest(prompt="def f(x):", max_tokens=2, repetition_penalty=1.0),
            defaults={"repetition_penalty": 1.1})
    assert p.repetition_penalty == 1.0
    chat = ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    p = plan_chat(chat, LIMITS, tok, ChatTemplate(None), 64, d).jobs[0][1]
    assert (p.temperature, p.top_p, p.top_k) == (0.6, 0.95, 20)


def test_the_openai_client_without_a_temperature_samples_as_the_model_says():
    """Defaults of temperature 0: a request without one is greedy whatever its seed (it sampled at 1.0 before)."""
    s = start_server(sampling_defaults={"temperature": 0.0})
    try:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0)
        prompt = "def read_file(path):"
        want = s.reference.generate([prompt], SamplingParams(temperature=0.0, max_tokens=12))[0].text
        texts = {client.completions.create(model="dsv3-tiny", prompt=prompt, max_tokens=12, seed=k).choices[0].text
                 for k in range(4)}
        assert texts == {want}
        hot = {client.completions.create(model="dsv3-tiny", prompt=prompt, max_tokens=12, seed=k,
                                         temperature=1.0).choices[0].text for k in range(4)}
        assert len(hot) > 1                                                 # the request's own value wins
    finally:
        s.stop()


@pytest.mark.parametrize("bad,what", [({"temperature": 5}, "temperature=5"), ({"eos_token_id": "x"}, "eos_token_id=")])
def test_serve_refuses_a_bad_generation_config_in_one_line_before_loading(tmp_path, bad, what):
    (tmp_path / "generation_config.json").write_text(json.dumps(bad))
    r = subprocess.run([sys.executable, "-c", "import sys; from dsv3.cli import main; sys.exit(main())", "serve",
                        "--model", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and f"generation_config.json: {what}" in err[0], r.stderr


def test_the_served_engine_stops_at_the_generation_configs_eos_ids():
    """EngineConfig.eos_token_ids (what `dsv3 serve` reads from generation_config.json's eos_token_id) end a
    completion with finish_reason stop, through the `openai` client; ignore_eos (vLLM's extra field) still runs on."""
    prompt = "def read_file(path):"
    s = start_server()
    try:
        free = s.reference.generate([prompt], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))[0]
    finally:
        s.stop()
    stop = free.token_ids[4]
    s = start_server(EngineConfig(block_size=8, num_blocks=400, max_num_seqs=32, eos_token_ids=[stop]))
    try:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0)
        r = client.completions.create(model="dsv3-tiny", prompt=prompt, max_tokens=12, temperature=0)
        cut = free.token_ids[:free.token_ids.index(stop) + 1]
        assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == len(cut)
        r = client.completions.create(model="dsv3-tiny", prompt=prompt, max_tokens=12, temperature=0,
                                      extra_body={"ignore_eos": True})
        assert r.choices[0].finish_reason == "length" and r.choices[0].text == free.text
    finally:
        s.stop()
