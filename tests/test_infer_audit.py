"""The inference engine and `dsv3 generate` as a demanding user drives them: bad configs, prompts and flags get one
clear error naming the field before any work; cache pressure, seeds and stop conditions behave as documented."""

import dataclasses
import json
import shutil

import pytest
import torch

from conftest import build, random_prompts, reference_greedy, tiny_config
from dsv3.infer import Engine, EngineConfig, SamplingParams


@pytest.fixture(scope="module")
def model():
    return build(tiny_config(vocab_size=96), seed=3, dtype=torch.float64)


@pytest.fixture(scope="module")
def tok_model():
    from dsv3.data import train_tokenizer
    tok = train_tokenizer(["def f(x):\n    return x + 1\n" * 20, "import os\nprint(os.sep)\n" * 20], 300)
    return tok, build(tiny_config(vocab_size=tok.vocab_size), seed=7, dtype=torch.float64)


def prompts(lengths, seed=1):
    return random_prompts(lengths, seed=seed)


def all_blocks_free(engine: Engine) -> bool:
    b = engine.blocks
    return b.num_free_blocks == b.num_blocks and not any(b.ref_count)


# ---- bad input ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw, field", [
    (dict(block_size=8.5), "block_size"), (dict(block_size="8"), "block_size"),
    (dict(max_num_seqs=True), "max_num_seqs"),
    (dict(num_blocks=2.0), "num_blocks"), (dict(max_model_len=None), "max_model_len"),
    (dict(cache_memory_gib=float("nan")), "cache_memory_gib"), (dict(cache_memory_gib="1"), "cache_memory_gib"),
    # a string is truthy: "false" switched CUDA graphs / prefix caching on
    (dict(cuda_graphs="false"), "cuda_graphs"), (dict(prefix_caching="no"), "prefix_caching"),
    (dict(compile_decode=1), "compile_decode"),
])
def test_engine_config_refuses_wrong_types_naming_the_field(kw, field):
    # before: 8.5, True and nan passed the range checks and failed (or silently worked) deep in the engine
    with pytest.raises(ValueError, match=f"EngineConfig.{field}"):
        EngineConfig(**kw)


@pytest.mark.parametrize("kw, field", [(dict(num_blocks=10**12), "num_blocks"), (dict(cache_memory_gib=1e9),
                                                                                  "cache_memory_gib")])
def test_cache_larger_than_memory_is_refused_before_allocating(model, kw, field):
    # before: a RuntimeError from inside torch's allocator (or the OOM killer for a merely too-large cache)
    with pytest.raises(ValueError, match=f"EngineConfig.{field}.*GiB"):
        Engine(model, config=EngineConfig(block_size=8, **kw))


@pytest.mark.parametrize("prompt, what", [([1.5, 2], "ints"), ([True, 3], "ints"), ([[1, 2]], "ints"),
                                          (None, "string or a list"), (torch.tensor([1.0, 2.0]), "1-D token ids"),
                                          (torch.tensor([[1, 2]]), "1-D token ids"), (b"\x01\x02", "string or a list")])
def test_prompt_token_ids_must_be_ints(model, prompt, what):
    # before: 1.5 became token 1 and True token 1 silently; a nested list or None was a TypeError from a list
    # comprehension
    engine = Engine(model, config=EngineConfig(block_size=8, num_blocks=8))
    with pytest.raises(ValueError, match=what):
        engine.add_request(prompt, SamplingParams(max_tokens=2))
    assert not engine.has_unfinished()
    out = engine.generate([torch.tensor([5, 6, 7])], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
    assert out[0].prompt_token_ids == [5, 6, 7]


def test_request_checks_probed_and_holding(model):
    """Probes that found no defect, kept as regression checks: each refused with the field named, nothing queued."""
    engine = Engine(model, config=EngineConfig(block_size=8, num_blocks=8))
    bad = [([], SamplingParams(), "empty"), ([-1], SamplingParams(), "vocabulary"), ([96], SamplingParams(),
           "vocabulary"), ([1], SamplingParams(stop_token_ids=[96]), "stop_token_ids"),
           ([1] * 60, SamplingParams(max_tokens=10**9), "cache capacity"),
           ([1] * engine.max_model_len, SamplingParams(), "context")]
    for prompt, params, what in bad:
        with pytest.raises(ValueError, match=what):
            engine.add_request(prompt, params)
    for kw in (dict(temperature=float("nan")), dict(top_p=0.0), dict(top_k=-1), dict(max_tokens=0),
               dict(max_tokens=-2), dict(seed=True), dict(logprobs=21)):
        with pytest.raises(ValueError, match=next(iter(kw))):
            SamplingParams(**kw)
    assert not engine.has_unfinished() and all_blocks_free(engine)


# ---- cache pressure, determinism ------------------------------------------------------------------------------------
def test_seeded_sampling_under_preemption_equals_each_request_alone(model):
    """6 sequences of up to 24 tokens in 6 blocks of 4: preempted and recomputed, yet every seeded request samples
    what it samples alone in a roomy cache (its generator advances once per token it keeps), and greedy ones equal
    the full forward; every block is free afterwards."""
    ps = prompts([3, 7, 12, 5, 9, 15])
    params = [SamplingParams(temperature=1.0, top_k=20, max_tokens=9, seed=i, ignore_eos=True) if i % 2 else
              SamplingParams(temperature=0.0, max_tokens=9, ignore_eos=True) for i in range(6)]
    tight = Engine(model, config=EngineConfig(block_size=4, num_blocks=6, max_num_seqs=6))
    outs = [o.token_ids for o in tight.generate(ps, params)]
    assert tight.scheduler.num_preemptions > 0 and all_blocks_free(tight)
    roomy = Engine(model, config=EngineConfig(block_size=4, num_blocks=64))
    alone = [roomy.generate([p], sp)[0].token_ids for p, sp in zip(ps, params)]
    assert outs == alone
    assert all(outs[i] == reference_greedy(model, ps[i], 9) for i in (0, 2, 4))


def test_blocks_come_back_after_abort_and_after_a_failed_step(model):
    ps = prompts([3, 7, 12])
    greedy = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    engine = Engine(model, config=EngineConfig(block_size=4, num_blocks=32))
    rids = [engine.add_request(p, greedy) for p in ps]
    engine.step()
    engine.abort(rids[1])
    engine.abort(rids[1])                       # twice, and an unknown id: no-ops
    engine.abort(12345)
    rid = engine.add_request(ps[0], greedy)
    engine.abort(rid)                           # still waiting
    finished = {}
    while engine.has_unfinished():
        finished.update((o.request_id, o) for o in engine.step() if o.finished)
    assert [finished[r].finish_reason for r in (*rids, rid)] == ["length", "abort", "length", "abort"]
    assert all_blocks_free(engine)
    # a step that fails (here: the forward raises) leaves the engine usable: the request can be aborted or run on
    real = engine.runner.forward
    engine.runner.forward = lambda batch: (_ for _ in ()).throw(RuntimeError("device lost"))
    rid = engine.add_request(ps[0], greedy)
    with pytest.raises(RuntimeError, match="device lost"):
        engine.step()
    engine.runner.forward = real
    engine.abort(rid)
    assert engine.step()[0].finish_reason == "abort" and all_blocks_free(engine)


# ---- stop handling --------------------------------------------------------------------------------------------------
def test_stop_token_text_is_left_out_like_a_stop_string(tok_model):
    # before: a (non-special) stop token's text stayed in `text` while a stop string's was cut: two semantics
    tok, lm = tok_model
    engine = Engine(lm, tok, EngineConfig(block_size=8, num_blocks=32))
    greedy = dict(temperature=0.0, max_tokens=12, ignore_eos=True)
    full = engine.generate(["def f(x):"], SamplingParams(**greedy))[0]
    ids = full.token_ids
    k = next(i for i in range(1, 12) if ids[i] not in ids[:i] and tok.decode([ids[i]]).strip())
    out = engine.generate(["def f(x):"], SamplingParams(**greedy, stop_token_ids=[ids[k]]))[0]
    assert out.finish_reason == "stop" and out.token_ids == ids[:k + 1]       # the ids keep the stop token
    assert out.text == tok.decode(ids[:k], skip_special_tokens=True)


def test_stop_strings_first_token_spanning_overlapping_and_at_max_tokens(tok_model):
    tok, lm = tok_model
    engine = Engine(lm, tok, EngineConfig(block_size=8, num_blocks=32))
    greedy = dict(temperature=0.0, max_tokens=12, ignore_eos=True)
    full = engine.generate(["def f(x):"], SamplingParams(**greedy))[0]
    text, ids = full.text, full.token_ids
    pieces = [tok.decode(ids[:i], skip_special_tokens=True) for i in range(13)]

    def run(stop, **kw):
        return engine.generate(["def f(x):"], SamplingParams(**{**greedy, **kw}, stop=stop))[0]
    first = run([text[0]])                                              # at the very first token
    assert (first.text, first.finish_reason, len(first.token_ids)) == ("", "stop", 1)
    # a stop string spanning tokens 2 and 3: found with token 3, cut where it starts
    i = len(pieces[2])
    span = run([text[i - 1:i + 1]])
    assert (span.text, len(span.token_ids)) == (text[:i - 1], 3)
    # overlapping stop strings: the earliest occurrence wins, whichever string it is
    over = run([text[3:8], text[5:7]])
    assert over.text == text[:3] and over.finish_reason == "stop"
    # the stop string completes exactly at max_tokens: "stop", not "length"
    j = len(pieces[3])
    last = run([text[j:len(pieces[4])]], max_tokens=4)
    assert (last.text, last.finish_reason, len(last.token_ids)) == (text[:j], "stop", 4)
    # EOS ignored vs honoured: the EOS id as a stop token id stops
    eos = engine.generate(["def f(x):"], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True,
                                                        stop_token_ids=[ids[0]]))[0]
    assert eos.token_ids == ids[:1] and eos.text == ""
    assert all_blocks_free(engine)


# ---- dsv3 generate ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from posttrain_fixture import make_base
    return make_base(tmp_path_factory.mktemp("base") / "hf")


def generate(capsys, *args):
    from dsv3.cli import main
    rc = main(["generate", *args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_generate_bad_flags_refused_before_reading_the_model(capsys, tmp_path):
    # before: --max-tokens 0 was refused only after the checkpoint (minutes for a large one) had been read
    for flags, what in ((["--max-tokens", "0"], "max_tokens"), (["--max-tokens", "-3"], "max_tokens"),
                        (["--temperature", "nan"], "temperature"), (["--top-p", "2"], "top_p"),
                        (["--samples", "0"], "--samples"), (["--spec", "-1"], "--spec"),
                        (["--repetition-penalty", "0"], "repetition_penalty")):
        rc, out, err = generate(capsys, "--model", str(tmp_path / "absent"), "--prompt", "x", *flags)
        assert rc == 2 and what in err and "absent" not in err and len(err.strip().splitlines()) == 1


def test_generate_wrong_dirs_one_line(capsys, base, tmp_path):
    rc, _, err = generate(capsys, "--model", str(tmp_path / "absent"), "--prompt", "x")
    assert rc == 2 and "is not a directory" in err
    notok = tmp_path / "notok"
    shutil.copytree(base, notok)
    (notok / "tokenizer.json").unlink()
    rc, _, err = generate(capsys, "--model", str(notok), "--prompt", "x")
    assert rc == 2 and "no tokenizer.json" in err and "--tokenizer" in err
    rc, _, err = generate(capsys, "--model", str(base), "--prompt", "x", "--ema")
    assert rc == 2 and "no EMA weights" in err
    rc, _, err = generate(capsys, "--model", str(base), "--prompt", "x", "--max-tokens", "100000")
    assert rc == 2 and "context" in err


@pytest.mark.parametrize("qc, field", [({"quant_method": "awq", "bits": 4}, "quant_method"),
                                       ({"quant_method": "fp8", "weight_block_size": [64, 64]}, "weight_block_size"),
                                       ({"quant_method": "fp8", "activation_scheme": "static"}, "activation_scheme"),
                                       ({"bits": 4}, "quant_method"), ("fp8", "quantization_config")])
def test_generate_refuses_a_quantization_config_it_cannot_honour(capsys, base, tmp_path, qc, field):
    # before: loaded silently (quantization_config went to hf_extra unread)
    d = tmp_path / "q"
    shutil.copytree(base, d)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "quantization_config": qc}))
    rc, _, err = generate(capsys, "--model", str(d), "--prompt", "x", "--max-tokens", "2")
    assert rc == 2 and f"quantization_config.{field}" in err or field == "quantization_config" and field in err
    assert len(err.strip().splitlines()) == 1


def test_generate_special_token_text_is_text_unless_asked(capsys, base):
    """The prompt's special-token text is encoded as text (greedy output = the engine's on those ids); with
    --special-tokens as the control token. Also --escapes keeps non-ASCII characters (before: UTF-8 read as
    Latin-1, "é" became "Ã©")."""
    from dsv3.posttrain.base import load_model_and_tokenizer
    lm, tok = load_model_and_tokenizer(base)
    prompt = "<｜User｜>héllo"
    # `base` is a dsv3 export (its tokenizer says documents start after EOS): the prompt follows EOS
    as_text = [tok.eos_id] + tok.encode(prompt, split_special_tokens=True)
    as_control = [tok.eos_id] + tok.encode(prompt)
    assert as_text != as_control and 6 in as_control and 6 not in as_text

    def engine_text(ids):
        engine = Engine(lm, tok, EngineConfig(block_size=16, num_blocks=8))
        return engine.generate([ids], SamplingParams(temperature=0.0, max_tokens=6))[0].text
    flags = ["--model", str(base), "--max-tokens", "6", "--temperature", "0"]
    rc, out, _ = generate(capsys, *flags, "--prompt", prompt)
    assert rc == 0 and out == prompt + engine_text(as_text) + "\n"
    rc, out, _ = generate(capsys, *flags, "--prompt", prompt, "--special-tokens")
    assert rc == 0 and out == prompt + engine_text(as_control) + "\n"
    rc, out, _ = generate(capsys, *flags, "--prompt", "héllo\\n", "--escapes")
    assert rc == 0 and out.startswith("héllo\n")


def test_generate_samples_as_the_models_generation_config_says_unless_told(capsys, base, tmp_path):
    """The flags left out come from generation_config.json (a release's own temperature / top_p), else 0.8 / 50 /
    0.95: a file that says temperature 0 makes every seed's sample the greedy one; --temperature still wins."""
    import argparse

    from dsv3.launch.generate import generate_sampling
    d = tmp_path / "g"
    shutil.copytree(base, d)

    def ns(**kw) -> argparse.Namespace:
        return argparse.Namespace(model=str(d), **{"temperature": None, "top_k": None, "top_p": None,
                                                   "repetition_penalty": None, "generation_config": "auto", **kw})
    off = {"repetition_penalty": 1.0}
    assert generate_sampling(ns())[0] == {"temperature": 0.8, "top_k": 50, "top_p": 0.95, **off}    # no file
    (d / "generation_config.json").write_text(json.dumps({"do_sample": True, "temperature": 0.6, "top_p": 0.9}))
    assert generate_sampling(ns())[0] == {"temperature": 0.6, "top_k": 50, "top_p": 0.9, **off}
    assert generate_sampling(ns(temperature=0.0, top_p=1.0))[0] == {"temperature": 0.0, "top_k": 50, "top_p": 1.0,
                                                                    **off}
    (d / "generation_config.json").write_text(json.dumps({"repetition_penalty": 1.1}))       # as vLLM reads it too
    assert generate_sampling(ns())[0]["repetition_penalty"] == 1.1
    assert generate_sampling(ns(repetition_penalty=1.0))[0]["repetition_penalty"] == 1.0
    (d / "generation_config.json").write_text(json.dumps({"temperature": 0}))
    flags = ["--model", str(d), "--prompt", "def f(x):", "--max-tokens", "8"]
    greedy = generate(capsys, *flags, "--temperature", "0")
    assert greedy[0] == 0
    assert {generate(capsys, *flags, "--seed", str(k))[1] for k in range(3)} == {greedy[1]}
    assert len({generate(capsys, *flags, "--seed", str(k), "--temperature", "1.5")[1] for k in range(4)}) > 1
    (d / "generation_config.json").write_text(json.dumps({"temperature": 9}))
    rc, _, err = generate(capsys, *flags)
    assert rc == 2 and "generation_config.json: temperature=9" in err and len(err.strip().splitlines()) == 1
    assert "--generation-config none" in err and generate(capsys, *flags, "--generation-config", "none")[0] == 0


def test_generate_reads_generation_config_once(capsys, base, tmp_path, monkeypatch):
    """The sampling defaults and the eos ids come from one read of generation_config.json (one owner)."""
    import dsv3.checkpoint.generation_config as gc
    d = tmp_path / "g"
    shutil.copytree(base, d)
    (d / "generation_config.json").write_text(json.dumps({"temperature": 0, "eos_token_id": [1]}))
    reads, real = [], gc._read
    monkeypatch.setattr(gc, "_read", lambda model_dir: reads.append(model_dir) or real(model_dir))
    assert generate(capsys, "--model", str(d), "--prompt", "def f(x):", "--max-tokens", "2")[0] == 0
    assert len(reads) == 1, reads


def test_generation_config_eos_ids_end_generations_unless_ignore_eos(capsys, base, tmp_path, monkeypatch):
    """A release's generation_config.json eos_token_id ends a generation besides the tokenizer's EOS (a turn-end
    token other than the tokenizer's EOS; transformers' generate and vLLM stop there): `dsv3 generate` stops at it;
    the engine too (EngineConfig.eos_token_ids), but not for ignore_eos; ids past the vocabulary are refused."""
    from dsv3.infer import Engine, EngineConfig, SamplingParams
    seen, real = [], Engine.generate

    def spy(self, prompts, params):
        outs = real(self, prompts, params)
        seen.append((self, prompts[0], [o.token_ids for o in outs][0], outs[0].finish_reason))
        return outs
    monkeypatch.setattr(Engine, "generate", spy)
    d = tmp_path / "g"
    shutil.copytree(base, d)
    flags = ["--model", str(d), "--prompt", "def f(x):", "--max-tokens", "12", "--temperature", "0", "--device",
             "cpu"]
    assert generate(capsys, *flags)[0] == 0
    engine, ids, free, _ = seen[-1]
    stop = free[3]
    eos = engine.tokenizer.eos_id
    assert stop != eos and len(free) == 12
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [eos, stop]}))
    assert generate(capsys, *flags)[0] == 0
    engine, _, cut, reason = seen[-1]
    assert cut == free[:free.index(stop) + 1] and reason == "stop" and engine.eos_ids == {eos, stop}
    kept = real(engine, [ids], [SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)])[0]
    assert kept.token_ids == free                                           # ignore_eos: not a stop
    model = engine.model
    with pytest.raises(ValueError, match="eos_token_ids"):
        Engine(model, engine.tokenizer, EngineConfig(block_size=16, num_blocks=8,
                                                     eos_token_ids=[model.config.vocab_size]))
    with pytest.raises(ValueError, match="EngineConfig.eos_token_ids"):
        EngineConfig(eos_token_ids=[-1])


def test_generate_repetition_penalty_reaches_the_engine(capsys, base, monkeypatch):
    from dsv3.infer import Engine
    seen, real = [], Engine.generate

    def spy(self, prompts, params):
        seen.extend(params)
        return real(self, prompts, params)
    monkeypatch.setattr(Engine, "generate", spy)
    flags = ["--model", str(base), "--prompt", "x", "--max-tokens", "3", "--device", "cpu", "--samples", "2"]
    assert generate(capsys, *flags, "--repetition-penalty", "1.4")[0] == 0
    assert [p.repetition_penalty for p in seen] == [1.4, 1.4]
    assert generate(capsys, *flags)[0] == 0 and seen[-1].repetition_penalty == 1.0          # no file: off


def test_generate_runs_on_the_device_and_dtype_asked(capsys, base, monkeypatch):
    """--device / --dtype (default: cuda in bf16 where there is one): generate always ran on the CPU in fp32. The
    model the engine gets is looked at; without --spec it has no MTP module (none of its tensors read)."""
    import dsv3.launch.generate
    seen = {}
    real = dsv3.launch.generate.Engine

    def spy(model, *a, **k):
        p = next(model.parameters())
        seen.update(device=p.device.type, dtype=p.dtype, mtp=len(model.mtp))
        return real(model, *a, **k)
    monkeypatch.setattr(dsv3.launch.generate, "Engine", spy)
    rc, out, _ = generate(capsys, "--model", str(base), "--prompt", "x", "--max-tokens", "3", "--device", "cpu",
                          "--dtype", "bf16")
    assert rc == 0 and seen == dict(device="cpu", dtype=torch.bfloat16, mtp=0)
    rc, out, _ = generate(capsys, "--model", str(base), "--prompt", "x", "--max-tokens", "3", "--spec", "1",
                          "--device", "cpu")
    assert rc == 0 and seen["mtp"] == 1
    rc, out, _ = generate(capsys, "--model", str(base), "--prompt", "x", "--max-tokens", "3")
    assert rc == 0 and seen["device"] == ("cuda" if torch.cuda.is_available() else "cpu")


def test_generate_ctrl_c_exits_with_one_line(capsys, base, monkeypatch):
    def interrupted(self, *a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(Engine, "generate", interrupted)
    rc, out, err = generate(capsys, "--model", str(base), "--prompt", "x", "--max-tokens", "2")
    assert rc == 130 and out == "" and err.strip() == "dsv3 generate: aborted by SIGINT"


def test_max_model_len_beyond_the_models_positions_is_refused(model):
    # before: silently clamped to max_position_embeddings (a server asked for 10^6 tokens served 16384)
    n = model.config.max_position_embeddings
    with pytest.raises(ValueError, match=f"EngineConfig.max_model_len = {n + 1}.*{n}"):
        Engine(model, config=EngineConfig(block_size=8, num_blocks=8, max_model_len=n + 1))
    assert Engine(model, config=EngineConfig(block_size=8, num_blocks=8, max_model_len=n)).max_model_len == n


def test_params_changed_after_queueing_do_not_reach_the_queued_request(model):
    # before: the engine kept the caller's object, so reusing it for the next request (a loop setting max_tokens)
    # rewrote the one in flight, unvalidated (a NaN temperature was sampled with)
    engine = Engine(model, config=EngineConfig(block_size=4, num_blocks=32))
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    rid = engine.add_request([3, 4, 5], params)
    params.max_tokens, params.temperature, params.stop_token_ids = 2, float("nan"), [0]
    params.stop_token_ids.append(1)
    done = {}
    while engine.has_unfinished():
        done.update((o.request_id, o) for o in engine.step() if o.finished)
    assert done[rid].token_ids == reference_greedy(model, [3, 4, 5], 6)


def test_a_list_of_eos_ids_in_the_config_stops_at_any_of_them(model):
    # HF configs may give eos_token_id as a list (the config accepts it); before, without a tokenizer, a token was
    # compared with the list itself and generation never stopped at EOS
    ps = prompts([5])
    want = reference_greedy(model, ps[0], 6)
    lm = build(tiny_config(vocab_size=96, eos_token_id=[95, want[2]]), seed=3, dtype=torch.float64)
    engine = Engine(lm, config=EngineConfig(block_size=4, num_blocks=16))
    out = engine.generate(ps, SamplingParams(temperature=0.0, max_tokens=6))[0]
    assert (out.token_ids, out.finish_reason) == (want[:want.index(want[2]) + 1], "stop")
    out = engine.generate(ps, SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True))[0]
    assert (out.token_ids, out.finish_reason) == (want, "length")


def test_generate_prefix_follows_the_model_directory(tmp_path):
    """The token in front of a `generate` prompt: EOS for a dsv3 run directory or a directory whose tokenizer dsv3
    wrote (documents packed doc EOS doc EOS), BOS for a Hugging Face directory whose tokenizer_config.json has
    add_bos_token (the released V3 / R1: before, they got EOS too), EOS for one without it; --prefix overrides, and
    bos without a BOS token is refused."""
    import argparse

    from dsv3.launch.generate import prompt_prefix

    class Tok:
        bos_id, eos_id = 0, 1
    from dsv3.data import train_tokenizer
    run, hf, plain, export = tmp_path / "run", tmp_path / "hf", tmp_path / "plain", tmp_path / "export"
    train_tokenizer(["a b c d e f"] * 20, vocab_size=300).save(export)       # as `dsv3 export` writes it
    (run / "checkpoints").mkdir(parents=True)
    (run / "tokenizer").mkdir()
    for d in (run / "tokenizer", hf, plain):
        d.mkdir(exist_ok=True)
        (d / "tokenizer.json").write_text("{}")
    for d in (run / "tokenizer", hf):
        (d / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": True}))
    (plain / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": False}))

    def args(model, prefix: str = "auto") -> argparse.Namespace:
        return argparse.Namespace(model=str(model), tokenizer=None, prefix=prefix)
    assert prompt_prefix(args(run), Tok) == [1]
    assert prompt_prefix(args(hf), Tok) == [0]
    assert prompt_prefix(args(plain), Tok) == [1]
    assert json.loads((export / "tokenizer_config.json").read_text())["add_bos_token"] is True
    assert prompt_prefix(args(export), Tok) == [1]
    assert prompt_prefix(args(hf, "eos"), Tok) == [1] and prompt_prefix(args(run, "none"), Tok) == []
    Tok.bos_id = None
    with pytest.raises(ValueError, match="no BOS"):
        prompt_prefix(args(run, "bos"), Tok)


# ---- a step that raises -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("where, arrival, cfg", [
    # the forward of a chained decode step (overlap schedule): the step in flight was dropped with it, its
    # sequences kept their PENDING placeholders as input tokens, and every later step raised an IndexError
    ("forward", False, dict(overlap_schedule="on")),
    # a step that read the last one's tokens (a prefill row joining: no chaining), then raised: those outputs
    # were lost (a stream missed tokens, `generate` never saw the request finish)
    ("forward", True, dict(overlap_schedule="on")),
    # the head after the forward: the cached counts had moved on with no token sampled, so the sequences had
    # nothing left to run (empty rows: every later step raised)
    ("logits", False, dict(overlap_schedule="off")),
    ("logits", False, dict(overlap_schedule="on")),
    # the prompt's log-probabilities (their logits: prompt tokens x vocabulary, the likeliest to run out of memory)
    ("prompt_logprobs", False, dict(overlap_schedule="off")),
    # the verify forward of a draft-verify speculative step: the drafting had already dropped the MTP module's
    # pending hidden states, so every later draft raised (torch.cat of nothing)
    ("forward", False, dict(num_speculative_tokens=2, speculative_fused=False)),
])
def test_a_step_that_raises_leaves_every_request_able_to_run_on(model, where, arrival, cfg):
    """A step that fails (a forward or a head running out of memory) raises, and the engine carries on as if it had
    not run: each request streams the cache-free forward's tokens, none lost or repeated, and finishes once, for
    the requests it held and for new ones; every block comes back. (A server aborts the requests instead,
    dsv3.serve.async_engine; an offline caller may go on.)"""
    ps = prompts([3, 7, 12, 6])
    greedy = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    engine = Engine(model, config=EngineConfig(block_size=4, num_blocks=32, **cfg))
    streams, finished = {}, {}

    def step():
        for o in engine.step():
            streams.setdefault(o.request_id, []).extend(o.new_token_ids)
            if o.finished:
                assert o.request_id not in finished
                finished[o.request_id] = o
    rids = [engine.add_request(p, greedy) for p in ps[:2]]
    if where == "prompt_logprobs":
        # the first call of the first step is request 2's prompt log-probabilities, after requests 0 and 1 went
        # through the loop that moves their counts on
        rids.append(engine.add_request(ps[2], dataclasses.replace(greedy, prompt_logprobs=1)))
        target = engine.runner, "logits"
    else:
        target = engine.runner, where
        for _ in range(3):                   # into decoding (and, with the overlap schedule, chaining)
            step()
    if arrival:
        rids.append(engine.add_request(ps[3], greedy))
    real = getattr(*target)
    calls = []

    def failing(*args, **kw):
        calls.append(1)
        raise RuntimeError("out of memory")
    setattr(*target, failing)
    with pytest.raises(RuntimeError, match="out of memory"):
        engine.step()
    assert calls
    setattr(*target, real)
    step()                                   # the held requests alone first
    rids.append(engine.add_request(ps[2][:5], greedy))
    while engine.has_unfinished():
        step()
    want = [reference_greedy(model, ps[i], 6) for i in (0, 1)]
    want += [reference_greedy(model, ps[2], 6)] * (where == "prompt_logprobs") + [reference_greedy(model, ps[3], 6)
                                                                                   ] * arrival
    want += [reference_greedy(model, ps[2][:5], 6)]
    assert [finished[r].token_ids for r in rids] == want
    assert [streams[r] for r in rids] == want
    if where == "prompt_logprobs":
        with torch.no_grad():
            lp = model(torch.tensor([ps[2]]))[0].float().log_softmax(-1)
        got = [x[0] for x in finished[rids[2]].prompt_logprobs]
        assert got == pytest.approx([float(lp[i, ps[2][i + 1]]) for i in range(len(ps[2]) - 1)], abs=1e-9)
    assert all_blocks_free(engine) and not engine.seqs


@pytest.mark.parametrize("overlap", ["off", "on"])
def test_an_aborted_output_carries_the_text_of_its_tokens(tok_model, overlap):
    """The final output of an aborted request: its text is its tokens' decoded (it was "", since text was decoded
    only on a stop or the length), with and without a step in flight at the abort."""
    tok, m = tok_model
    engine = Engine(m, tok, EngineConfig(block_size=4, num_blocks=64, overlap_schedule=overlap))
    rid = engine.add_request(tok.encode("def f(x):"), SamplingParams(max_tokens=30, ignore_eos=True))
    final = None
    for step in range(40):
        if step == 5:
            engine.abort(rid)
        for o in engine.step():
            if o.finished:
                final = o
        if not engine.has_unfinished():
            break
    assert final.finish_reason == "abort" and final.token_ids
    assert final.text == tok.decode(final.token_ids, skip_special_tokens=True) != ""


@pytest.mark.parametrize("overlap", ["off", "on"])
def test_request_output_text_is_the_whole_text_in_the_final_output_only(tok_model, overlap):
    """What RequestOutput holds, as the server reads it (dsv3.serve.responses: deltas from `new_token_ids`, the
    final `text` whole): an unfinished output has `text` "" and no `token_ids`, stop strings given or not (its
    comment said the text came every step with stop strings); the finished one has the whole output's text (not
    the last step's part), cut where a stop string starts."""
    tok, m = tok_model
    engine = Engine(m, tok, EngineConfig(block_size=4, num_blocks=64, overlap_schedule=overlap))
    greedy = dict(temperature=0.0, max_tokens=12, ignore_eos=True)
    full = engine.generate(["def f(x):"], SamplingParams(**greedy))[0]
    for stop in ([], ["never-there"], [full.text[4:7]]):
        rid = engine.add_request("def f(x):", SamplingParams(**greedy, stop=stop))
        streamed, final = [], None
        while engine.has_unfinished():
            for o in engine.step():
                assert o.request_id == rid
                streamed += o.new_token_ids
                if o.finished:
                    final = o
                else:
                    assert (o.text, o.token_ids) == ("", [])
        assert streamed == final.token_ids
        cut = full.text.find(stop[0]) if stop and stop[0] in full.text else len(full.text)
        assert final.text == tok.decode(final.token_ids, skip_special_tokens=True)[:cut] == full.text[:cut]
        assert final.finish_reason == ("stop" if cut < len(full.text) else "length")


def test_stop_strings_cost_the_tail_not_the_output(tok_model, monkeypatch):
    """A long generation with a stop string: each token's check reads the output's tail (the longest stop string plus
    the token), not the whole output. The engine copied the whole output (Sequence.output_ids) for the check and for
    its length every token: quadratic in the output. Counted here: ids copied and ids decoded."""
    from dsv3.infer.sequence import Sequence
    tok, lm = tok_model
    copied, decoded = [0], [0]
    output_ids = Sequence.output_ids.fget

    def counted_output_ids(seq):
        ids = output_ids(seq)
        copied[0] += len(ids)
        return ids
    monkeypatch.setattr(Sequence, "output_ids", property(counted_output_ids))
    decode = tok.decode

    def counted_decode(ids, skip_special_tokens=False):
        ids = list(ids)
        decoded[0] += len(ids)
        return decode(ids, skip_special_tokens)
    monkeypatch.setattr(tok, "decode", counted_decode)
    engine = Engine(lm, tok, EngineConfig(block_size=8, num_blocks=64))
    n, stop = 400, "never-there " * 8
    out = engine.generate(["def f(x):"], SamplingParams(temperature=1.0, seed=3, max_tokens=n, ignore_eos=True,
                                                        stop=[stop]))[0]
    assert out.finish_reason == "length" and len(out.token_ids) == n
    piece = max(len(tok.backend.id_to_token(i) or "") for i in set(out.token_ids))
    assert copied[0] <= 4 * n, copied[0]                                # the final output's, not one per token
    assert decoded[0] <= n * 8 * (len(stop) + piece + 4) + 2 * n, decoded[0]
