"""The long-context demo's synthetic documents (benchmarks/long_context_demo.py), each exactly one training window.

Three kinds (MIX: half needle, a quarter copy, a quarter repeat documents), because retrieval needs in-context
copying over the fact-to-question distance, and copying is only learnt where it is the one way to cut the loss on
many tokens (induction heads: Olsson et al. 2022; associative recall: Arora et al. 2023, "Zoology"):
- **needle documents** (the passkey-retrieval recipe, in dsv3.eval.needle's own format): filler sentences ("The old
  river passes the mill.", a random cycle of 3-6 of them repeated, itself copyable) with 1-4 facts "The secret
  number of <city> is <7 digits>." inserted at sentence boundaries exactly as `needle_prompt` inserts its needle,
  then a question about each fact ("Question: What is the secret number of <city>?\nAnswer: The secret number of
  <city> is <digits>."). Several facts make it associative recall: the city picks which number to copy.
- **copy documents** (`copy_layout`): random words and numbers in which spans of 4-24 words recur at a distance
  drawn uniformly over everything before them, so copying is needed at every distance up to the window (round 3,
  with repeat documents only, copied over 30 tokens and not over 100: their previous occurrence is never further
  back than a unit, at most a quarter window).
- **repeat documents** (pure induction): a random unit of words, cities and numbers from the same vocabulary,
  8 tokens to a quarter of the window long, repeated to fill the window: ~85% of the tokens are predictable only by
  copying (induction heads form fastest on such data).
Every document is exactly seq_len - 1 tokens, so with its EOS it fills one training window (packing cuts windows at
seq_len: no question loses its fact to the previous window). Documents carry no BOS (the packer puts none), so the
needle prompts have none.
"""

from __future__ import annotations

import json
import os
import random
from multiprocessing import Pool
from pathlib import Path

import torch

from dsv3.data import Tokenizer, train_tokenizer
from dsv3.eval.needle import CITIES

ADJ = "old quiet green small bright cold dark warm long narrow".split()
NOUN = "river mill road garden bridge market tower field harbor village".split()
VERB = "passes faces crosses follows borders watches".split()
WORDS = ADJ + NOUN + VERB + CITIES + "The the secret number of is What Question Answer".split()
FACTS = (1, 4)                                 # facts (and questions) per needle document
SPAN = (4, 24)                                 # copy documents: copied spans and fresh stretches, in words
MIX = ("needle", "copy", "needle", "repeat")   # document i is of kind MIX[i % 4]
VOCAB = 512


def sentence(rng: random.Random, extra: int = 0) -> str:
    """A 7-token filler sentence, 8 or 9 with `extra` more adjectives (each one token, drawn last)."""
    adj, noun, verb, noun2 = rng.choice(ADJ), rng.choice(NOUN), rng.choice(VERB), rng.choice(NOUN)
    more = "".join(f"{rng.choice(ADJ)} " for _ in range(extra))
    return f"The {more}{adj} {noun} {verb} the {noun2}."


def cycle(rng: random.Random) -> list[float]:
    """A haystack's sentence seeds: a random cycle of 3-6 sentences, repeated (the period differs per haystack)."""
    return [rng.random() for _ in range(rng.randint(3, 6))]


def filler(rng: random.Random, n_sentences: int) -> str:
    seeds = cycle(rng)
    return " ".join(sentence(random.Random(seeds[i % len(seeds)])) for i in range(n_sentences))


def _text(sentences: list[str], facts: list[tuple[str, str]], where: list[int], order: list[int]) -> str:
    """Facts after sentence where[i] (0 = before the first), spaced as needle_prompt spaces its needle; questions."""
    parts = []
    for i, s in enumerate(sentences + [""]):
        for (city, num), w in zip(facts, where):
            if w == i:
                parts.append(f" The secret number of {city} is {num}. ")
        if s:
            parts.append(("" if i == 0 else " ") + s)
    qa = "".join(f"\nQuestion: What is the secret number of {facts[i][0]}?\nAnswer: The secret number of "
                 f"{facts[i][0]} is {facts[i][1]}." for i in order)
    return "".join(parts) + qa


def document(tok: Tokenizer, rng: random.Random, n_tokens: int, n_facts: tuple[int, int] = FACTS) -> str:
    """A needle document of exactly `n_tokens` tokens: facts at random places in filler, then a question about each.
    n filler sentences of 7-9 tokens (0-2 extra adjectives) cover 7n..9n tokens, so any length past the facts is
    hit by moving the number of extra adjectives k (spread over the sentences) and, at the ends of that range, n."""
    facts = [(c, f"{rng.randrange(10**6, 10**7)}") for c in rng.sample(CITIES, rng.randint(*n_facts))]
    order = rng.sample(range(len(facts)), len(facts))
    n = max(1, (n_tokens - len(tok.encode(_text([], facts, [0] * len(facts), order)))) // 8)
    period = cycle(rng)
    seeds = [period[i % len(period)] for i in range(n)]   # each sentence's words, fixed whatever its extra count
    where, k = [rng.randrange(n + 1) for _ in facts], n
    for _ in range(n_tokens):
        n = len(seeds)
        text = _text([sentence(random.Random(sd), k // n + (i < k % n)) for i, sd in enumerate(seeds)], facts,
                     [min(w, n) for w in where], order)
        diff = n_tokens - len(tok.encode(text))
        if diff == 0:
            return text
        k += diff
        if k > 2 * n:                                     # every sentence at 9 tokens: one more sentence
            seeds.append(period[len(seeds) % len(period)])
            k -= 7
        elif k < 0 and n > 1:                             # every sentence at 7 tokens: one fewer
            seeds.pop()
            k += 7
        k = max(0, min(k, 2 * len(seeds)))
    raise RuntimeError(f"no synthetic document of exactly {n_tokens} tokens")


def repeat_document(tok: Tokenizer, rng: random.Random, n_tokens: int) -> str:
    """Exactly `n_tokens` tokens: a random unit of words and numbers (~8 to n_tokens / 4 tokens) repeated."""
    for _ in range(100):
        size = rng.randint(8, max(8, n_tokens // 4))
        words, n = [], 0
        while n < size:                                   # a number is ' ' + 2-5 digit tokens, a word one token
            w = str(rng.randrange(10**6, 10**7)) if rng.random() < 0.2 else rng.choice(WORDS)
            words.append(" " + w)
            n += len(tok.encode(" " + w))
        unit = tok.encode("".join(words))
        ids = (unit * (n_tokens // len(unit) + 1))[:n_tokens]
        text = tok.decode(ids)
        if tok.encode(text) == ids:                       # the cut can split a number differently: draw again
            return text
    raise RuntimeError(f"no repeat document of exactly {n_tokens} tokens")


def copy_layout(rng: random.Random, n: int, draw, span: tuple[int, int] = SPAN) -> list:
    """n items: a fresh stretch of `span` items, then, alternately, a span copied from a random earlier place
    (its distance uniform over everything already written, so copies reach back across the whole window, not only
    a repeat unit's length) and a fresh stretch drawn by `draw()`: about half the items are predictable only by
    copying, from any distance up to the window."""
    items = [draw() for _ in range(rng.randint(*span))]
    while len(items) < n:
        size = rng.randint(*span)
        start = rng.randrange(0, max(1, len(items) - size))          # any earlier place, the window's start included
        items += items[start:start + size]
        items += [draw() for _ in range(rng.randint(*span))]
    return items[:n]


def copy_document(tok: Tokenizer, rng: random.Random, n_tokens: int) -> str:
    """Exactly `n_tokens` tokens of random words and 7-digit numbers laid out by `copy_layout`: spans of them
    recur at every distance up to the window (the needle's question is up to a window after its fact)."""
    def draw() -> str:
        return " " + (str(rng.randrange(10**6, 10**7)) if rng.random() < 0.1 else rng.choice(WORDS))
    for _ in range(100):
        ids = tok.encode("".join(copy_layout(rng, n_tokens, draw)))[:n_tokens]
        text = tok.decode(ids)
        if len(ids) == n_tokens and tok.encode(text) == ids:   # a cut number can re-tokenize: draw again
            return text
    raise RuntimeError(f"no copy document of exactly {n_tokens} tokens")


def make_tokenizer(out: Path) -> Tokenizer:
    path = out / "tokenizer"
    if not (path / "tokenizer.json").exists():
        rng = random.Random(0)
        texts = (filler(rng, 30) + f" The secret number of {c} is {rng.randrange(10**6, 10**7)}. \nQuestion: What "
                 f"is the secret number of {c}?\nAnswer: The secret number of {c} is" for c in CITIES * 200)
        train_tokenizer(texts, VOCAB).save(path)
    return Tokenizer.load(path)


_TOK: Tokenizer | None = None


def _chunk(job: tuple[str, int, int, int]) -> list[str]:
    """Documents [start, start + count) of a corpus, of the kinds in MIX (half needle, a quarter copy, a quarter
    repeat), each from its own seed, so the file is the same whatever the number of worker processes."""
    global _TOK
    tok_path, start, count, seq_len = job
    _TOK = _TOK or Tokenizer.load(tok_path)
    out = []
    for i in range(start, start + count):
        rng = random.Random(seq_len * 10**9 + i)
        make = {"needle": document, "copy": copy_document, "repeat": repeat_document}[MIX[i % len(MIX)]]
        out.append(make(_TOK, rng, seq_len - 1))
    return out


def corpus(tok_dir: Path, path: Path, n_docs: int, seq_len: int, workers: int | None = None,
           per_job: int = 0) -> Path:
    """n_docs documents of seq_len - 1 tokens (+ EOS = one window) as JSONL, made by `workers` processes (all
    cores by default: the GPU run's host makes ~50K documents) in jobs of `per_job` documents (0: ~128K tokens,
    512 documents of 256, 32 of 4K); the same path, count and length write the same file."""
    if not path.exists():
        per_job = per_job or max(1, 2**17 // seq_len)
        jobs = [(str(tok_dir), s, min(per_job, n_docs - s), seq_len) for s in range(0, n_docs, per_job)]
        workers = workers or min(len(jobs), os.cpu_count() or 1)
        tmp = path.with_suffix(".tmp")
        with tmp.open("w") as f:
            if workers == 1:
                chunks = map(_chunk, jobs)
            else:
                pool = Pool(workers)
                chunks = pool.imap(_chunk, jobs)
            for docs in chunks:
                f.writelines(json.dumps({"text": t}) + "\n" for t in docs)
            if workers > 1:
                pool.close()
        tmp.rename(path)
    return path


def word_ids(tok: Tokenizer) -> list[int]:
    """The documents' words that are one token each (with their leading space)."""
    return sorted({ids[0] for w in WORDS if len(ids := tok.encode(" " + w)) == 1})


def induction_batch(tok: Tokenizer, n: int, period: int, seed: int = 0, length: int = 0) -> torch.Tensor:
    """(n, length or 2 * period) token ids: a random sequence over `word_ids`, then the same again (cut at `length`:
    a period past half the window still fits, with a shorter repeat). The loss on the repeat is
    ~ln(len(word_ids)) without in-context copying over `period` tokens and ~0 with it (an induction probe)."""
    alphabet = word_ids(tok)
    g = torch.Generator().manual_seed(seed)
    first = torch.tensor(alphabet)[torch.randint(0, len(alphabet), (n, period), generator=g)]
    return torch.cat([first, first], dim=1)[:, :length or 2 * period]
