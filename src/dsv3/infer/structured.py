"""Structured outputs: a request's output constrained to a JSON schema, any JSON object, a regular expression, one of
a list of strings, or a Lark grammar (`SamplingParams.structured_output`; the server's `response_format` and vLLM's
`structured_outputs`).

The constraint is applied where tokens are sampled: before each sampling, a constrained row's logits are -inf at
every token the grammar does not allow next (a token bitmask from llguidance's matcher: Microsoft's Rust library,
the structured-output backend of vLLM and llama.cpp; an optional dependency, `pip install llguidance`; computed on
the host while the device runs the step's forward, which it does not wait for, a batch's rows in llguidance's
threads); after the token is read on the host, the matcher consumes it. When the grammar is complete the output
ends (finish reason "stop"; EOS is allowed only where the grammar may end); when the matcher fails mid-way (one of
its resource limits), the finish reason is GRAMMAR_ERROR. Log-probabilities stay the model's own (as for
logit_bias).

Each constrained sequence's mask needs its previous token on the host: such a batch does not chain under the
overlap schedule (dsv3.infer.overlap) and takes no speculative step (dsv3.infer.speculation); batches without one
are untouched (one Python check). A matcher is made at the sequence's first sampling and consumes whatever output
the sequence already has (a decode worker's handed-over first token), so preemption and disaggregation need nothing
more.
"""

from __future__ import annotations

import functools
import json
import logging

import torch

from .overlap import to_device
from .sequence import Sequence

log = logging.getLogger(__name__)

# the finish reason of an output whose grammar failed mid-way (StructuredOutputs.advance); a server answers it as a
# 400 (dsv3.infer.requests.GrammarFailed), not as a finished output
GRAMMAR_ERROR = "grammar_error"

KINDS = {"json_object": None, "json_schema": "schema", "regex": "pattern", "choice": "choices", "grammar": "lark",
         "llguidance": "grammar"}


def check_spec(spec) -> None:
    """The form of a `SamplingParams.structured_output` (ValueError otherwise): {"type": "json_object"},
    {"type": "json_schema", "schema": {...}}, {"type": "regex", "pattern": str}, {"type": "choice", "choices":
    [str, ...]}, {"type": "grammar", "lark": str} or {"type": "llguidance", "grammar": str} (a whole llguidance
    grammar, JSON); the JSON kinds take "any_whitespace" (default true). Whether it compiles is `compile_check`'s."""
    kind = spec.get("type") if isinstance(spec, dict) else None
    if kind not in KINDS:
        raise ValueError(f"structured_output must be a dict whose type is one of {sorted(KINDS)}, got {spec!r:.200}")
    if not isinstance(spec.get("any_whitespace", True), bool) or ("any_whitespace" in spec and
                                                                   not kind.startswith("json")):
        raise ValueError(f"structured_output any_whitespace is a bool of the JSON kinds, got {spec!r:.200}")
    key = KINDS[kind]
    if key is None:
        return
    value = spec.get(key)
    ok = {"schema": isinstance(value, (dict, bool)), "pattern": isinstance(value, str) and value,
          "lark": isinstance(value, str) and value, "grammar": isinstance(value, str) and value,
          "choices": isinstance(value, list) and value and all(isinstance(c, str) for c in value)}[key]
    if not ok:
        what = {"schema": "a JSON schema (an object)", "pattern": "a non-empty string", "lark": "a non-empty string",
                "grammar": "a non-empty string", "choices": "a non-empty list of strings"}[key]
        raise ValueError(f"structured_output {kind} needs {key}: {what}, got {value!r:.200}")


def _llguidance():
    try:
        import llguidance
        import llguidance.torch
    except ImportError:
        raise ValueError("structured outputs need the llguidance package (pip install llguidance)") from None
    return llguidance


def grammar_of(spec: dict) -> str:
    """llguidance's grammar for a checked spec."""
    M = _llguidance().LLMatcher
    kind = spec["type"]
    # JSON with whitespace anywhere JSON allows it (llguidance's default, as vLLM's): a model writes its JSON as it
    # learned to; any_whitespace=false (vLLM's disable_any_whitespace) keeps a weak model from looping in whitespace
    options = {"whitespace_flexible": spec.get("any_whitespace", True)}
    if kind == "json_object":
        return M.grammar_from_json_schema({"type": "object"}, defaults=options)
    if kind == "json_schema":
        schema = spec["schema"]
        if schema is False:
            raise ValueError("structured_output json_schema: the schema false accepts no value")
        # true, JSON Schema's "any value", is {} to llguidance (which refuses a boolean beside its options)
        return M.grammar_from_json_schema(json.dumps({} if schema is True else schema), defaults=options)
    if kind == "regex":
        return M.grammar_from_regex(spec["pattern"])
    if kind == "choice":
        # one terminal, an alternation of string literals (JSON's escapes are Lark's): the lexer's automaton holds
        # them; as a rule of alternatives each choice was an Earley item, and a list past llguidance's 2,000 items a
        # row failed mid-output
        return M.grammar_from_lark("start: CHOICE\nCHOICE: " + " | ".join(json.dumps(c) for c in spec["choices"]))
    if kind == "llguidance":  # a whole grammar, composed (dsv3.serve.chat_grammar)
        return spec["grammar"]
    return M.grammar_from_lark(spec["lark"])


@functools.lru_cache(maxsize=8)
def ll_tokenizer(tokenizer, vocab_size: int, eos_ids: tuple[int, ...]):
    """llguidance's view of our tokenizer (its tokenizer.json), over the model's vocabulary (ids past the
    tokenizer's are never allowed). ~ms for a small vocabulary, more for V3's: made once per tokenizer.

    The special tokens' strings are renamed in llguidance's copy: it masks special tokens out of text, but tokenises
    the text a grammar forces with the tokenizer itself, which reads "<｜User｜>" as the marker; the mask then allowed
    only the marker and the matcher refused it once sampled (an output cut short as a "stop"). Renamed, forced text is
    text tokens, as chat content is (dsv3.data.chat); grammars name markers by id (`<[id]>`, dsv3.serve.chat_grammar),
    which is unchanged."""
    spec = json.loads(tokenizer.backend.to_str())
    vocab = spec.get("model", {}).get("vocab")
    for t in spec.get("added_tokens", []):
        if t.get("special"):
            name = f"\x00dsv3-special-{t['id']}\x00"
            if isinstance(vocab, dict) and vocab.get(t["content"]) == t["id"]:    # the same token, not a new one
                vocab[name] = vocab.pop(t["content"])
            elif isinstance(vocab, list) and t["id"] < len(vocab) and vocab[t["id"]][0] == t["content"]:  # unigram
                vocab[t["id"]][0] = name
            t["content"] = name
    return _llguidance().LLTokenizer(json.dumps(spec), n_vocab=vocab_size, eos_token=list(eos_ids))


class StructuredOutputError(ValueError):
    """A structured output that cannot be followed for this tokenizer (compile_check): a server names the request
    field that asked for it (dsv3.serve.validation), not the prompt."""


def compile_check(spec: dict, tokenizer, vocab_size: int) -> None:
    """StructuredOutputError with the grammar's first error line if the spec does not compile for this tokenizer,
    or no text satisfies it."""
    if tokenizer is None:
        raise StructuredOutputError("structured outputs need a tokenizer")
    try:
        grammar = grammar_of(spec)
        llt = ll_tokenizer(tokenizer, vocab_size, (tokenizer.eos_id,))
        error = _llguidance().LLMatcher.validate_grammar(grammar, llt)
        if not error:
            # the first mask: a grammar that matches no text at all ("start: start", a regex of an empty class)
            # compiles, then fails at its first token (vLLM and a JSON schema's own check refuse these up front)
            m = _llguidance().LLMatcher(llt, grammar, log_level=0)
            m.compute_bitmask()
            if m.is_error():
                error = f"no output can satisfy it ({m.get_error().strip().splitlines()[0][:200]})"
    except ValueError as e:         # grammar_of's own (schema false, llguidance missing): already named
        raise StructuredOutputError(str(e)) from None
    except Exception as e:          # llguidance's own errors (a schema that is not JSON, ...)
        error = str(e)
    if error:
        raise StructuredOutputError(f"structured_output {spec['type']}: {error.strip().splitlines()[0][:300]}")


class StructuredOutputs:
    """The matchers of an engine's constrained sequences, by sequence id."""

    def __init__(self, tokenizer, vocab_size: int, eos_ids: frozenset[int]):
        self.tokenizer, self.vocab_size, self.eos_ids = tokenizer, vocab_size, tuple(sorted(eos_ids))
        self.matchers: dict[int, object] = {}
        self._executor = None       # llguidance's thread pool: several rows' masks at once (made when first needed)

    def _matcher(self, seq: Sequence):
        m = self.matchers.get(seq.seq_id)
        if m is None:
            g = _llguidance()
            m = g.LLMatcher(ll_tokenizer(self.tokenizer, self.vocab_size, self.eos_ids),
                            grammar_of(seq.params.structured_output))
            if seq.output_ids:
                m.consume_tokens(list(seq.output_ids))
            self.matchers[seq.seq_id] = m
        return m

    def mask(self, done: list[Sequence], scores: torch.Tensor) -> torch.Tensor:
        """`scores` with each constrained row's disallowed tokens at -inf, in a copy (the logprobs read the model's
        own logits); `scores` itself when no row is constrained."""
        rows = [i for i, s in enumerate(done) if s.params.structured_output is not None]
        if not rows:
            return scores
        g = _llguidance()
        bits = g.torch.allocate_token_bitmask(len(rows), self.vocab_size)
        if len(rows) == 1:
            g.torch.fill_next_token_bitmask(self._matcher(done[rows[0]]), bits, 0)
        else:       # in llguidance's threads, without the GIL: ~0.2 ms a row at a 100K vocabulary (RESULTS.md)
            if self._executor is None:
                self._executor = g.LLExecutor()
            g.torch.fill_next_token_bitmask_par(self._executor, [(self._matcher(done[i]), j)
                                                                  for j, i in enumerate(rows)], bits)
        if scores.is_cuda:
            bits = bits.pin_memory().to(scores.device, non_blocking=True)
        shifts = torch.arange(32, dtype=torch.int32, device=scores.device)
        allowed = ((bits.unsqueeze(-1) >> shifts) & 1).bool().flatten(1)[:, :scores.shape[1]]
        index = to_device(rows, torch.long, scores.device) if len(rows) < len(done) else None
        sub = scores if index is None else scores[index]
        sub = sub.masked_fill(~allowed, float("-inf"))
        return sub if index is None else scores.index_put((index,), sub)

    def advance(self, seq: Sequence, token: int) -> str | None:
        """The matcher of a constrained sequence consumes its new token: "stop" when the grammar is complete (the
        output ends there), GRAMMAR_ERROR when the matcher failed (a parser limit reached mid-output, or a token the
        mask allowed and the matcher refused: the output does not satisfy the constraint, and is not a "stop"),
        else None."""
        m = self.matchers.get(seq.seq_id)
        if m is None:
            return None
        m.consume_token(token)
        if m.is_error():
            log.warning("request %s: its structured output failed after %d tokens: %s", seq.seq_id,
                        seq.num_output_tokens, m.get_error().strip().splitlines()[0][:300])
            return GRAMMAR_ERROR
        return "stop" if m.is_stopped() else None

    def release(self, seq_id: int) -> None:
        self.matchers.pop(seq_id, None)
