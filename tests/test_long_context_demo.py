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
    assert sum("\nQuestion:" in d for d in docs) == 15         # half needle documents (MIX), the rest copy/repeat


def copy_distance(ids: list[int]) -> int:
    """The longest distance from an 8-gram back to its previous occurrence (random words: a recurring 8-gram is a
    copy), i.e. how far back copying has to look."""
    last, far = {}, 0
    for t in range(len(ids) - 8):
        g = tuple(ids[t:t + 8])
        far = max(far, t - last.get(g, t))
        last[g] = t
    return far


def test_copy_documents_recur_at_every_distance_up_to_the_window(tok):
    """Copy documents have the asked length, and the distance from a copied span back to its source covers the
    window (the needle's question sits up to a window after its fact), not just a repeat unit's length."""
    rng, far = random.Random(2), []
    for _ in range(20):
        ids = tok.encode(demo.copy_document(tok, rng, 255))
        assert len(ids) == 255
        far.append(copy_distance(ids))
    assert max(far) > 150 and sum(d > 100 for d in far) >= 5
    assert max(copy_distance(tok.encode(demo.repeat_document(tok, rng, 255))) for _ in range(20)) <= 64 + 9
    layout = demo.copy_layout(random.Random(0), 300, random.Random(1).random)
    assert len(layout) == 300 and len(set(layout)) < 200          # about half the items are copies


def test_needle_cells_leave_room_for_the_answer(tok):
    """A needle cell of length L (the demo's haystacks, through the harness the demo calls) asks with a prompt short
    enough that the answer's ANSWER_TOKENS fit in a model of L positions (at the full L the engine stopped the answer
    after 1-3 tokens: the gate could never pass)."""
    import long_context_demo as lc
    from dsv3.eval.needle import ANSWER_TOKENS, needle_grid

    class Lengths:                                  # records the prompts the demo's model would be asked
        def __init__(self):
            self.seen = []

        def generate(self, prompts, k, temperature, max_tokens, stop, seed):
            self.seen += [(len(p), max_tokens) for p in prompts]
            return [[" 0."] for _ in prompts]

    for n in (256, 1024):
        backend = Lengths()
        needle_grid(backend, tok, lc.haystack(0, (n,)), [n], [0.1, 0.9], add_bos=False)
        assert backend.seen and all(p + m <= n and m == ANSWER_TOKENS for p, m in backend.seen), backend.seen


def test_induction_batch_repeats_its_first_half(tok):
    x = demo.induction_batch(tok, 4, 30, seed=1)
    assert x.shape == (4, 60) and (x[:, :30] == x[:, 30:]).all()
    assert set(x.flatten().tolist()) <= set(demo.word_ids(tok)) and len(demo.word_ids(tok)) >= 40
    long = demo.induction_batch(tok, 2, 200, seed=1, length=256)     # a period past half the window: cut repeat
    assert long.shape == (2, 256) and (long[:, 200:] == long[:, :56]).all()


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


def test_gate_diagnostics_look_at_the_answer(tok):
    """The gate's looked-at needles on a random-init model of the demo's shape at the pre-training length: the answer
    is generated past its first token (not cut by the context), and the loss on the digits equals cross-entropy computed
    here from the model's logits on prompt + answer."""
    import torch
    import long_context_demo as lc
    from dsv3 import Transformer
    from dsv3.config import ModelConfig
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**{k: v for k, v in lc.MODEL.items() if k != "preset"},
                                    max_position_embeddings=lc.PRE_LEN)).eval()
    _, records = lc.needle(model, tok, (lc.PRE_LEN,), 1)
    r = records[0]
    assert len(tok.encode(r["output"])) > 3 or "\n" in r["output"]     # 12 tokens (byte pieces re-encode fewer)
    look = lc.answer_loss(model, tok, r, (lc.PRE_LEN,))
    prompt = needle_prompt(tok, lc.haystack(0, (lc.PRE_LEN,)), r["length"] - lc.ANSWER_TOKENS, r["depth"], r["city"],
                           r["needle"])
    ids, answer = tok.encode(prompt), tok.encode(prompt + " " + r["needle"])[len(tok.encode(prompt)):]
    with torch.no_grad():
        logits = model(torch.tensor([ids + answer[:-1]]))[0, len(ids) - 1:]
    ref = torch.nn.functional.cross_entropy(logits.double(), torch.tensor(answer)).item()
    assert look["answer_tokens"] == len(answer) and abs(look["answer_loss"] - ref) < 2e-3
    assert 0 < look["distance"] < lc.PRE_LEN and look["tail"].endswith(f"{r['city']} is")
