"""What structured outputs cost the engine (dsv3.infer.structured): the llguidance token mask per constrained row and
step, at a small and at a DeepSeek-sized vocabulary, and whole engine steps with and without constrained rows.

    PYTHONPATH=src python benchmarks/structured_overhead.py [--vocab 128000] [--rows 1 8 32]

1. Tokenizers: byte-level BPE trained on the standard library's source at --small-vocab and --vocab ids (V3's is
   129,280), then llguidance's view of each (made once per tokenizer and engine).
2. Mask: `StructuredOutputs.mask` for R rows at a JSON-schema grammar, each row advanced by the token it allows
   first (the host work of one decode step's masks, and the device's masked fill of the scores).
3. Engine: the tiny model (CPU, fp32), R prompts x 24 tokens greedy, plain vs every row under the JSON schema with
   compact whitespace (the constrained batch also takes unchained steps), in tokens/s.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from dsv3.data import stdlib_files, train_tokenizer
from dsv3.infer import Engine, EngineConfig, SamplingParams
from dsv3.infer.sequence import Sequence
from dsv3.infer.structured import StructuredOutputs, grammar_of, ll_tokenizer

SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "tags": {"type": "array", "items": {
    "type": "string", "enum": ["a", "b", "c"]}}, "score": {"type": "number"}}, "required": ["name", "score"]}


def texts(n_files: int) -> list[str]:
    return [f.read_text(errors="ignore") for f in stdlib_files()[:n_files]]


def mask_cost(tok, vocab: int, rows: int, any_whitespace: bool, steps: int = 20) -> float:
    """Microseconds per constrained row and step of StructuredOutputs.mask (plus advancing by the first allowed)."""
    so = StructuredOutputs(tok, vocab, frozenset({tok.eos_id}))
    spec = {"type": "json_schema", "schema": SCHEMA, "any_whitespace": any_whitespace}
    seqs = [Sequence(i, [1, 2, 3], SamplingParams(max_tokens=64, structured_output=spec)) for i in range(rows)]
    scores = torch.zeros(rows, vocab)
    for i, s in enumerate(seqs):                                # matchers made, one step taken (not timed)
        so.advance(s, int(so.mask(seqs, scores)[i].argmax()))
    t0 = time.perf_counter()
    for _ in range(steps):
        masked = so.mask(seqs, scores)
        for i, s in enumerate(seqs):
            so.advance(s, int(masked[i].argmax()))
    return (time.perf_counter() - t0) / steps / rows * 1e6


def fill_cost(tok, vocab: int, rows: int, any_whitespace: bool, steps: int = 20) -> float:
    """Microseconds per row and step of llguidance's bitmask fill alone (the host part a GPU step overlaps)."""
    import llguidance
    import llguidance.torch as lt
    spec = {"type": "json_schema", "schema": SCHEMA, "any_whitespace": any_whitespace}
    grammar = grammar_of(spec)
    matchers = [llguidance.LLMatcher(ll_tokenizer(tok, vocab, (tok.eos_id,)), grammar) for _ in range(rows)]
    bits, ex = lt.allocate_token_bitmask(rows, vocab), llguidance.LLExecutor()
    first = [int(t) for t in tok.encode('{"name": "a b c", "score": 1')]
    t0 = time.perf_counter()
    for k in range(steps):
        lt.fill_next_token_bitmask_par(ex, [(m, j) for j, m in enumerate(matchers)], bits)
        for m in matchers:
            m.consume_token(first[k % len(first)]) if k < len(first) else None
    return (time.perf_counter() - t0) / steps / rows * 1e6


def engine_rate(tok, rows: int, spec: dict | None) -> float:
    from conftest import build, tiny_config
    torch.manual_seed(0)
    model = build(tiny_config(vocab_size=tok.vocab_size, max_position_embeddings=512), seed=0)
    e = Engine(model, tok, EngineConfig(block_size=8, num_blocks=512, max_num_seqs=64))
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=spec is None, structured_output=spec)
    prompts = [f"item {i}:" for i in range(rows)]
    e.generate(prompts[:2], params)                              # warm-up
    t0 = time.perf_counter()
    outs = e.generate(prompts, params)
    return sum(len(o.token_ids) for o in outs) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vocab", type=int, default=128_000)
    ap.add_argument("--small-vocab", type=int, default=320)
    ap.add_argument("--files", type=int, default=5000, help="stdlib files to train the large tokenizer on")
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32])
    args = ap.parse_args()
    torch.set_num_threads(1)
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    small = train_tokenizer(texts(60), vocab_size=args.small_vocab)
    t0 = time.perf_counter()
    large = train_tokenizer(texts(args.files), vocab_size=args.vocab)
    print(f"tokenizers: {small.vocab_size:,} and {large.vocab_size:,} ids (the large one trained in "
          f"{time.perf_counter() - t0:.1f} s)")
    for name, tok in (("small", small), ("large", large)):
        t0 = time.perf_counter()
        ll_tokenizer(tok, tok.vocab_size, (tok.eos_id,))
        made = time.perf_counter() - t0
        costs = {ws: {r: round(mask_cost(tok, tok.vocab_size, r, ws), 1) for r in args.rows} for ws in (True, False)}
        fills = {ws: {r: round(fill_cost(tok, tok.vocab_size, r, ws), 1) for r in args.rows} for ws in (True, False)}
        print(json.dumps({"vocab": tok.vocab_size, "llguidance_tokenizer_s": round(made, 3),
                          "mask_us_per_row_step_any_whitespace": costs[True],
                          "mask_us_per_row_step_compact": costs[False],
                          "llguidance_fill_us_per_row_step_any_whitespace": fills[True],
                          "llguidance_fill_us_per_row_step_compact": fills[False]}))
    spec = {"type": "json_schema", "schema": SCHEMA, "any_whitespace": False}
    for r in args.rows:
        plain, constrained = engine_rate(small, r, None), engine_rate(small, r, spec)
        print(json.dumps({"rows": r, "tiny_engine_tok_s_plain": round(plain, 1),
                          "tiny_engine_tok_s_json_schema": round(constrained, 1),
                          "ratio": round(constrained / plain, 3)}))


if __name__ == "__main__":
    main()
