"""Needle in a haystack with a real model through the engine: a tiny DeepSeek-V3 model trained in the test (fp32, at
most 400 steps, ~20 s on one core) to copy the token at a fixed distance D back, on random token sequences (no
needles in its training data). D is the distance from the question's final " is" to the needle's " is" when the
needle sits at depth 0.5 of a 96-token cell. So the model retrieves the needle exactly when needle_grid put it at
depth 0.5 of a 96-token prompt, and copies haystack text (no number) at depths 0 and 1: the grid places the needle
where it says, the engine runs the prompt at its length, and the answer is extracted and scored.

D is the same for every cell of a depth because the tokenizer (trained on the needle's sentences with no digits in
them) keeps every city one token and every digit its own token; the test checks that first."""

import json
import random

import pytest
import torch

from conftest import build, tiny_config
from dsv3.data import train_tokenizer
from dsv3.eval import EngineBackend
from dsv3.eval.needle import ANSWER_TOKENS, CITIES, needle_grid, needle_prompt
from dsv3.infer import Engine, EngineConfig

FILL = "The quick brown fox jumps over the lazy dog. " * 40
LENGTH, DEPTH = 96, 0.5


def distance(tok, prompt: str) -> int:
    """Tokens from the needle's " is" to the question's final " is" (the needle's is followed by a digit)."""
    ids = tok.encode(prompt)
    digits = {tok.encode(str(k))[0] for k in range(10)}
    needle_is = max(i for i in range(len(ids) - 2) if ids[i] == ids[-1] and ids[i + 2] in digits)
    return len(ids) - 1 - needle_is


@pytest.fixture(scope="module")
def copier():
    torch.set_num_threads(1)
    rng = random.Random(0)
    corpus = [FILL[:200] + f" The secret number of {c} is 0. \nQuestion: What is the secret number of {c}?\nAnswer: "
              f"The secret number of {c} is" for c in CITIES * 40]
    tok = train_tokenizer(corpus, vocab_size=600)
    assert all(len(tok.encode(" " + c)) == 1 for c in CITIES)
    assert len(tok.encode(" 2978347.")) == 9                        # " ", 7 digits, "."
    prompt_len = LENGTH - (tok.bos_id is not None) - ANSWER_TOKENS     # what needle_grid asks a LENGTH cell with
    ds = {distance(tok, needle_prompt(tok, FILL, prompt_len, DEPTH, c, str(rng.randrange(10**6, 10**7))))
          for c in CITIES}
    assert len(ds) == 1
    d = ds.pop()
    # the tokens the prompts use, digits included: copying over this alphabet is learnt in ~150 steps
    alphabet = torch.tensor(sorted({t for c in corpus for t in tok.encode(c)} | set(tok.encode("0123456789. "))))
    # 32 rotary dims with theta 1000 resolve a distance of ~70 sharply; all layers dense, no MTP
    cfg = tiny_config(vocab_size=tok.vocab_size, num_hidden_layers=2, first_k_dense_replace=2,
                      num_nextn_predict_layers=0, max_position_embeddings=512, hidden_size=64, intermediate_size=128,
                      rope_scaling=None, qk_rope_head_dim=32, rope_theta=1000.0)
    model = build(cfg, seed=0, bias=False).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    for step in range(1500):                        # converges in ~300-900 steps; stops when it has
        x = alphabet[torch.randint(0, len(alphabet), (16, d + 30 + step % 40), generator=gen)]
        for i in range(d, x.size(1)):
            x[:, i] = x[:, i - d]                   # the second part repeats the first, d tokens later
        y = x[:, 1:].clone()
        y[:, :d - 1] = -100                         # only the copies are predictable
        logits = model(x[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < 0.01:                      # copies exactly (at 0.05 some copies still slip a token)
            break
    print(f"copy model: loss {loss.item():.3f} after {step + 1} steps")
    assert loss.item() < 0.01, loss.item()
    model.eval()
    return tok, model, Engine(model, tok, EngineConfig(block_size=8, num_blocks=200, max_num_seqs=16))


def test_needle_at_the_trained_depth_is_retrieved_and_only_there(copier):
    tok, _, engine = copier
    depths = [0.0, DEPTH, 1.0]
    scores, records = needle_grid(EngineBackend(engine), tok, FILL, [LENGTH, LENGTH], depths, seed=1)
    assert scores == [[0.0, 1.0, 0.0]] * 2, [r["output"] for r in records]
    for r in records:
        if r["depth"] == DEPTH:        # the copy: " <the needle's number>." then the haystack after it
            assert r["output"].startswith(f" {r['needle']}.") and r["extracted"] == r["needle"]
        else:                          # haystack text: no number to extract
            assert r["extracted"] is None and "quick" in r["output"]
    assert len({r["needle"] for r in records}) == 6


def test_dsv3_eval_needle_cli(copier, tmp_path):
    from dsv3 import save_pretrained
    from dsv3.cli import main
    tok, model, _ = copier
    save_pretrained(model, tmp_path / "m")
    tok.save(tmp_path / "m")
    (tmp_path / "hay.txt").write_text(FILL)
    assert main(["eval", "needle", "--task", str(tmp_path / "hay.txt"), "--model", str(tmp_path / "m"),
                 "--lengths", "96", "--depths", "0,0.5,1", "--out", str(tmp_path / "o"), "--device", "cpu",
                 "--dtype", "float32"]) == 0
    res = json.loads((tmp_path / "o" / "results.json").read_text())["needle"]
    assert res["metrics"]["retrieval"] == pytest.approx(1 / 3) and res["metrics"]["n"] == 3
    assert res["metrics"]["grid"] == {"96": {"0.0": 0.0, "0.5": 1.0, "1.0": 0.0}}
    assert res["config"]["add_bos"] is True and res["prompt_version"] == "needle-v1"
    assert (tmp_path / "o" / "needle.png").stat().st_size > 1000
    assert len((tmp_path / "o" / "samples_needle.jsonl").read_text().splitlines()) == 3
    assert main(["eval", "needle", "--task", str(tmp_path / "hay.txt"), "--model", str(tmp_path / "m"),
                 "--depths", "0,x"]) == 2


class _Chars:
    """A stand-in tokenizer: one id per character."""
    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(map(chr, ids))


def test_the_needle_goes_at_the_sentence_boundary_nearest_its_depth():
    """The boundary nearest the depth, not the last one before it: with one sentence end far before the depth and
    one just after it, the needle goes after the second (a filler with few sentences kept its depth wrong)."""
    filler = "a" * 300 + ". " + "b" * 260 + ". " + "c" * 2000
    prompt = needle_prompt(_Chars(), filler, 800, 0.8, "Lisbon", "1234567")
    hay_end = prompt.index("\nQuestion:")
    at = prompt.index(" The secret number")
    assert prompt[at - 1] == "." and prompt[:at].count(".") == 2, prompt[:at][-20:]
    assert abs(at / (hay_end - len(" The secret number of Lisbon is 1234567. ")) - 0.8) < 0.05
