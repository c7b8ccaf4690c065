"""The long-context demo's pieces (benchmarks/long_context_data.py, long_context_demo.py, long_context_memory.py):
documents of exactly one training window each (needle and repeat documents), facts spaced as the needle harness
spaces its needle, the corpus independent of the number of worker processes, the induction probe's batch, and the
GPU memory script's engine prefill path (dry run, tiny shapes)."""

import json
import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import long_context_data as demo  # noqa: E402
import long_context_memory as memory  # noqa: E402

from dsv3.data import ShardSet, build_shards  # noqa: E402
from dsv3.data.packing import PackedLoader  # noqa: E402
from dsv3.eval.needle import needle_prompt  # noqa: E402


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return demo.make_tokenizer(tmp_path_factory.mktemp("lc"))


@pytest.mark.parametrize("n", [255, 1023])
def test_documents_have_exactly_the_asked_length(tok, n):
    rng = random.Random(n)
    for _ in range(20):
        text = demo.document(tok, rng, n)
        assert len(tok.encode(text)) == n
        facts = text.count("The secret number of") - text.count("\nQuestion:")      # facts + answers
        assert demo.FACTS[0] <= text.count("\nQuestion:") == facts <= demo.FACTS[1]
        ids = tok.encode(demo.repeat_document(tok, rng, n))
        assert len(ids) == n
        period = next(p for p in range(1, n) if ids[p:] == ids[:-p])     # the unit: repeated, at least twice
        assert 8 <= period <= n // 4 + 9


def test_corpus_is_the_same_whatever_the_worker_count(tok, tmp_path):
    tok.save(tmp_path / "tok")
    one = demo.corpus(tmp_path / "tok", tmp_path / "a.jsonl", 30, 256, workers=1, per_job=7).read_text()
    two = demo.corpus(tmp_path / "tok", tmp_path / "b.jsonl", 30, 256, workers=2, per_job=4).read_text()
    docs = [json.loads(line)["text"] for line in one.splitlines()]
    assert one == two and len(docs) == 30
    assert all(len(tok.encode(d)) == 255 for d in docs)
    assert sum("\nQuestion:" in d for d in docs) == 8          # a quarter needle documents, the rest repeats


def test_induction_batch_repeats_its_first_half(tok):
    x = demo.induction_batch(tok, 4, 30, seed=1)
    assert x.shape == (4, 60) and (x[:, :30] == x[:, 30:]).all()
    assert set(x.flatten().tolist()) <= set(demo.word_ids(tok)) and len(demo.word_ids(tok)) >= 40


def test_every_window_is_one_document_with_its_facts(tok, tmp_path):
    """n - 1 tokens + EOS per document: the packer's seq_len windows start at document starts, so every question's
    fact is in its own window."""
    n, rng = 256, random.Random(0)
    docs = [demo.document(tok, rng, n - 1) for _ in range(12)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    build_shards(tok, [str(tmp_path / "d.jsonl")], tmp_path / "s", val_fraction=0.0, progress=False)
    loader = PackedLoader(ShardSet.open(tmp_path / "s"), "train", n, eos_id=tok.eos_id, seed=0)
    windows = {tuple(w[:-1].tolist()) for w in loader.next_batch(12)}
    assert windows == {tuple(tok.encode(t) + [tok.eos_id]) for t in docs}


def test_facts_are_spaced_as_the_needle_harness_places_its_needle(tok):
    """A one-fact training document and a needle prompt over the same haystack tokenize the fact alike."""
    hay = demo.filler(random.Random(1), 60)
    prompt = needle_prompt(tok, hay, 200, 0.5, "Lisbon", "1234567")
    fact = prompt[prompt.index(" The secret number of Lisbon is 1234567.") - 1:][:45]
    doc = demo._text(["The old river passes the mill.", "The dark road faces the tower."], [("Lisbon", "1234567")],
                     [1], [0])
    assert fact[:42] in doc and ".  The" in doc


def point(*args: str) -> int:
    import subprocess
    r = subprocess.run([sys.executable, memory.__file__, "--device", "cpu", "--chunk", "64", "--one", *args],
                       capture_output=True, text=True, check=True)
    return int(r.stdout.split()[-1])


def test_gpu_memory_script_engine_prefill_runs_on_the_cpu():
    """The `--device cuda` prefill path (engine, chunked prefill into a paged cache sized for the prompt) with the
    tiny preset on the CPU, in its own process as the script runs each point (a dry run: a few MiB of tiny-model
    growth say nothing about linearity, the chart's points do)."""
    assert point("1024", "fused", "prefill", "tiny") >= 0
    long = memory.model_config("tiny", 100_000)        # tiny is YaRN over 512 already: that stays the original
    assert long.max_position_embeddings == 100_000 and long.yarn()["original_max_position_embeddings"] == 512
