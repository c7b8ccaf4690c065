"""Needle in a haystack: long-context retrieval over context lengths x depths, with a heat map.

A haystack is filler text (the caller's: any long document, e.g. a book from a file) cut to a length in tokens; the
needle "The secret number of <city> is <7 digits>." goes in at a depth (0 = the start, 1 = the end), at the nearest
sentence boundary, and the question asks for it. A cell scores 1 when the extracted number equals the needle's.
Each cell uses its own city and number (seeded), so no cell can be answered from another's prompt or from the
model's prior. Token lengths are the tokenizer's, measured on the whole prompt. A cell of length L is the whole
context the model sees: BOS, prompt and the answer's ANSWER_TOKENS new tokens fit in L positions, so a cell as long
as the model's context still leaves room for the answer (an engine stops a sequence at `max_position_embeddings`; a
prompt filling it would be cut after one generated token and score 0 whatever the model knows).
"""

from __future__ import annotations

import random
from pathlib import Path

from .backends import GenerateBackend, failure
from .multiple_choice import encode_text
from ..verify.extract import extract_answer
from .report import save_figure

ANSWER_TOKENS = 12          # greedy new tokens per cell: " 1234567." is at most ~9 tokens in the tokenizers here
CITIES = ["Lisbon", "Nairobi", "Osaka", "Quito", "Tallinn", "Hobart", "Cusco", "Bergen", "Tunis", "Hanoi", "Perth",
          "Bilbao", "Kazan", "Accra", "Galway", "Mysore"]


def needle_prompt(tokenizer, filler: str, length: int, depth: float, city: str, number: str) -> str:
    """A prompt of at most `length` tokens with the needle at `depth` of the haystack."""
    needle = f" The secret number of {city} is {number}. "
    question = f"\nQuestion: What is the secret number of {city}?\nAnswer: The secret number of {city} is"
    budget = length - len(encode_text(tokenizer, needle + question)) - 2
    if budget < 16:
        raise ValueError(f"a context of {length} tokens has no room for a haystack")
    ids = encode_text(tokenizer, filler[:budget * 32])      # a book-length filler: encode only what a cell can use
    if len(ids) < budget and len(filler) > budget * 32:
        ids = encode_text(tokenizer, filler)
    if len(ids) < budget:
        raise ValueError(f"the filler text has {len(ids)} tokens, fewer than the {budget} a {length}-token cell needs")
    hay = tokenizer.decode(ids[:budget])
    cut = int(len(hay) * depth)
    if 0 < depth < 1:    # the sentence boundary nearest the depth (after its ". "), if there is one
        before, after = hay.rfind(". ", 0, cut), hay.find(". ", cut)
        ends = [i + 1 for i in (before, after) if i > 0]
        cut = min(ends, key=lambda e: abs(e - cut)) if ends else cut
    prompt = hay[:cut] + needle + hay[cut:] + question
    while len(encode_text(tokenizer, prompt)) > length:     # the join can merge tokens differently: trim the haystack
        hay = hay[:-16]
        prompt = hay[:min(cut, len(hay))] + needle + hay[min(cut, len(hay)):] + question
    return prompt


def needle_grid(backend: GenerateBackend, tokenizer, filler: str, lengths: list[int], depths: list[float],
                seed: int = 0, add_bos: bool = True) -> tuple[list[list[float]], list[dict]]:
    """scores[i][j] for lengths[i] x depths[j] (greedy, ANSWER_TOKENS new tokens), and one record per cell (a cell the
    backend failed on scores 0, its record holds the error). A cell of length L asks with a prompt of at most
    L - len(BOS) - ANSWER_TOKENS tokens, so prompt and answer fit in L positions (module docstring)."""
    rng = random.Random(seed)
    cells = [(L, d, rng.choice(CITIES), f"{rng.randrange(10**6, 10**7)}") for L in lengths for d in depths]
    bos = [tokenizer.bos_id] if add_bos and tokenizer.bos_id is not None else []
    prompts = [needle_prompt(tokenizer, filler, L - len(bos) - ANSWER_TOKENS, d, city, num)
               for L, d, city, num in cells]
    outs = backend.generate([bos + encode_text(tokenizer, p) for p in prompts], 1, 0.0, ANSWER_TOKENS, ["\n"], seed)
    records, flat = [], []
    for (L, d, city, num), texts in zip(cells, outs):
        err = failure(texts[0])
        got = None if err else extract_answer(texts[0], flexible=True)
        ok = got is not None and got.replace(",", "") == num
        flat.append(float(ok))
        records.append(dict(length=L, depth=d, city=city, needle=num, output=str(texts[0]), extracted=got, correct=ok,
                            **({"error": err} if err else {})))
    return [flat[i * len(depths):(i + 1) * len(depths)] for i in range(len(lengths))], records


def heat_map(scores: list[list[float]], lengths: list[int], depths: list[float], path: str | Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(1 + 0.8 * len(lengths), 1 + 0.5 * len(depths)))
    im = ax.imshow([[scores[i][j] for i in range(len(lengths))] for j in range(len(depths))], vmin=0, vmax=1,
                   cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(lengths)), [str(L) for L in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    save_figure(fig, Path(path))
    plt.close(fig)
