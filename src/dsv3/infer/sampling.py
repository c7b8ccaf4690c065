"""Sampling parameters, batched token sampling, logprobs and speculative-decoding acceptance.

Repetition penalties and logit_bias (the `presence_penalty` / `frequency_penalty` / `repetition_penalty` /
`logit_bias` fields) adjust the logits before any of this: dsv3.infer.penalties, whose state lives on the device too.

Everything after `SamplingTensors.from_params` runs on the device with no host synchronisation (no `.item()`,
`.tolist()`, `.cpu()`, no Python branching on tensor values), so a decode step can overlap with the host and be
captured in a CUDA graph. Per-request reproducibility comes from per-row `torch.Generator`s: a row's random draws come
only from its own generator, so a seed gives the same tokens whatever else shares the batch. Not under speculative
decoding (EngineConfig.num_speculative_tokens > 0): a step that speculates draws drafts and acceptances from the
generator, a plain step one token, and whether a step speculates depends on the batch (its size against
speculative_max_batch, a neighbour asking for logprobs or penalties: dsv3.infer.speculation.applies). The tokens
are then a correct sample of the same distribution, reproducible for the same workload, but not batch-independent.
"""

from __future__ import annotations

import copy
import math
import numbers
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import torch
from torch import Tensor

from .overlap import to_device

MAX_LOGPROBS = 20     # OpenAI's limit; keeps the per-token top-n small
MAX_LOGIT_BIAS = 300  # OpenAI's limit on logit_bias entries
GREEDY_EPS = 1e-5     # temperatures below this are greedy: logits / T would overflow and the result is argmax anyway


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


@dataclass
class SamplingParams:
    temperature: float = 1.0           # 0 = greedy
    top_k: int = 0                     # 0 = off
    top_p: float = 1.0                 # 1 = off
    max_tokens: int = 16
    seed: int | None = None            # per-request generator; None draws from the global one
    stop: list[str] = field(default_factory=list)           # stop strings (matched by the engine on the text)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None        # None: none; 0: the sampled token's; n > 0: also the top n alternatives
    prompt_logprobs: int | None = None  # the same for prompt tokens (echo / log-likelihood evaluation)
    # logit adjustments before temperature (dsv3.infer.penalties): OpenAI's over the generated tokens, HF's over the
    # prompt and generated tokens, and OpenAI's per-token bias
    presence_penalty: float = 0.0      # [-2, 2]: minus this from every token generated at least once
    frequency_penalty: float = 0.0     # [-2, 2]: minus this times how often the token was generated
    repetition_penalty: float = 1.0    # (0, 2]: a seen token's logit / this if > 0, * this if < 0; 1 = off
    logit_bias: dict[int, float] = field(default_factory=dict)   # token id -> [-100, 100] added to its logit
    # vLLM's: until the output has this many tokens, EOS (unless ignored) and stop_token_ids cannot be sampled (their
    # logits are -inf; logprobs stay the model's) and a stop string starting inside those tokens does not end it
    min_tokens: int = 0
    # the output constrained to a grammar (dsv3.infer.structured): {"type": "json_object"}, {"type": "json_schema",
    # "schema": {...}}, {"type": "regex", "pattern": ...}, {"type": "choice", "choices": [...]}, {"type": "grammar",
    # "lark": ...}
    structured_output: dict | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):   # a lone string is one stop string, not a list of characters
            self.stop = [self.stop]
        self.stop, self.stop_token_ids = list(self.stop), list(self.stop_token_ids)   # own copies, callers may reuse
        if isinstance(self.logit_bias, dict):
            self.logit_bias = dict(self.logit_bias)
        if isinstance(self.structured_output, dict):
            self.structured_output = copy.deepcopy(self.structured_output)
        self._check()

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_EPS

    @property
    def modifies_logits(self) -> bool:
        """Whether a penalty or a bias applies: only batches with such a request pay for them."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1
                    or self.logit_bias)

    def _check(self) -> None:
        t = self.temperature
        if not _is_real(t) or not math.isfinite(t) or t < 0:
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {t!r}")
        if not _is_real(self.top_p) or not 0 < self.top_p <= 1:   # also rejects nan: every comparison is False
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not _is_int(self.top_k) or not 0 <= self.top_k < 2**63:    # an int64 on the device
            raise ValueError(f"top_k must be an int in [0, 2**63) (0 = off), got {self.top_k!r}")
        if not _is_int(self.max_tokens) or self.max_tokens <= 0:
            raise ValueError(f"max_tokens must be an int > 0, got {self.max_tokens!r}")
        if not _is_int(self.min_tokens) or not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"min_tokens must be an int in [0, max_tokens={self.max_tokens}], got {self.min_tokens!r}")
        if self.seed is not None and not (_is_int(self.seed) and -2**63 <= self.seed < 2**64):  # torch's seed range
            raise ValueError(f"seed must be None or an int in [-2**63, 2**64), got {self.seed!r}")
        if not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop must be a list of non-empty strings, got {self.stop!r}")
        if not all(_is_int(i) for i in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be a list of ints, got {self.stop_token_ids!r}")
        if self.structured_output is not None:
            from .structured import check_spec
            check_spec(self.structured_output)
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos must be a bool, got {self.ignore_eos!r}")
        for name in ("logprobs", "prompt_logprobs"):
            n = getattr(self, name)
            if n is not None and not (_is_int(n) and 0 <= n <= MAX_LOGPROBS):
                raise ValueError(f"{name} must be None or an int in [0, {MAX_LOGPROBS}], got {n!r}")
        self._check_penalties()

    def _check_penalties(self) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            x = getattr(self, name)
            if not _is_real(x) or not -2 <= x <= 2:          # also rejects nan
                raise ValueError(f"{name} must be a number in [-2, 2], got {x!r}")
        r = self.repetition_penalty
        if not _is_real(r) or not 0 < r <= 2:
            raise ValueError(f"repetition_penalty must be a number in (0, 2] (1 = off), got {r!r}")
        bias = self.logit_bias
        if not isinstance(bias, dict) or len(bias) > MAX_LOGIT_BIAS:
            raise ValueError(f"logit_bias must be a dict of at most {MAX_LOGIT_BIAS} token ids -> numbers, got "
                             f"{type(bias).__name__} of {len(bias) if isinstance(bias, dict) else '?'} entries")
        bad = [(k, v) for k, v in bias.items() if not _is_int(k) or not _is_real(v) or not -100 <= v <= 100]
        if bad:
            raise ValueError(f"logit_bias maps token ids (ints) to numbers in [-100, 100], got {bad[0][0]!r}: "
                             f"{bad[0][1]!r}")

    def validate(self, vocab_size: int) -> None:
        """Full check against the model's vocabulary; raises ValueError naming the offending field."""
        self._check()   # again: fields may have been assigned after construction
        bad = [i for i in self.stop_token_ids if not 0 <= i < vocab_size]
        if bad:
            raise ValueError(f"stop_token_ids {bad} are outside the vocabulary [0, {vocab_size})")
        bad = [i for i in self.logit_bias if not 0 <= i < vocab_size]
        if bad:
            raise ValueError(f"logit_bias token ids {bad[:5]} are outside the vocabulary [0, {vocab_size})")
        for name in ("logprobs", "prompt_logprobs"):
            n = getattr(self, name)
            if n is not None and n > vocab_size:
                raise ValueError(f"{name}={n} exceeds the vocabulary size {vocab_size}")


class SamplingTensors(NamedTuple):
    temperatures: Tensor   # (B,) float32
    top_ks: Tensor         # (B,) int64, 0 = off
    top_ps: Tensor         # (B,) float32

    @classmethod
    def from_params(cls, params: list[SamplingParams], device: torch.device | str) -> SamplingTensors:
        """Host-side, once per sampled batch; copied without a stream sync (dsv3.infer.overlap)."""
        return cls(to_device([p.temperature for p in params], torch.float32, device),
                   to_device([p.top_k for p in params], torch.int64, device),
                   # a top_p below float32's smallest normal would round to 0 and mask every token
                   to_device([max(p.top_p, 1.2e-38) for p in params], torch.float32, device))


def make_generators(params: list[SamplingParams], device: torch.device | str) -> list[torch.Generator | None]:
    """A generator per seeded request (None for the rest). The engine keeps each for the request's lifetime so the
    stream advances step by step. The same seed gives different streams on CPU and CUDA."""
    return [None if p.seed is None else torch.Generator(device=device).manual_seed(p.seed) for p in params]


def _fill(x: Tensor, draw: Callable, generators: list[torch.Generator | None] | None) -> Tensor:
    """Fill x (B, ...) in place with `draw` (Tensor.uniform_ / Tensor.exponential_); row i from generators[i] if set.
    The whole batch is drawn from the global generator first (one kernel), then seeded rows are redrawn: a loop over
    a host list, never over tensor values."""
    draw(x)
    if generators is not None:
        assert len(generators) == x.shape[0], f"{len(generators)} generators for {x.shape[0]} rows"
        for i, g in enumerate(generators):
            if g is not None:
                draw(x[i], generator=g)
    return x


def draw(probs: Tensor, generators: list[torch.Generator | None] | None = None) -> Tensor:
    """Sample index ~ probs (B, V) per row (unnormalised is fine) as argmax(probs / q), q ~ Exp(1) i.i.d.
    q_i / p_i ~ Exp(rate p_i), and the smallest of independent exponentials is the i-th with probability p_i / sum p:
    exactly multinomial, as one elementwise op and an argmax (the "exponential race"; gpt-fast and vLLM do the same)."""
    q = _fill(torch.empty_like(probs, dtype=torch.float32), Tensor.exponential_, generators)
    # exponential_ can return exactly 0; 0/0 = nan would win the argmax. With q >= tiny, p/q stays finite for p <= 1.
    return (probs.float() / q.clamp_min_(torch.finfo(torch.float32).tiny)).argmax(-1)


def _top_k_top_p(logits: Tensor, top_ks: Tensor, top_ps: Tensor) -> Tensor:
    """Mask (-inf) what per-row top-k and then top-p (on the top-k-renormalised probs) exclude. One sort serves both."""
    V = logits.shape[-1]
    sorted_logits, idx = logits.sort(-1, descending=True)
    rank = torch.arange(V, device=logits.device)
    k = torch.where(top_ks > 0, top_ks, V).clamp(max=V)
    sorted_logits = sorted_logits.masked_fill(rank >= k[:, None], float("-inf"))
    probs = sorted_logits.softmax(-1)
    # keep token i iff the mass strictly before it is < top_p: the smallest prefix reaching top_p (the first token is
    # always kept, its prefix mass being exactly 0). top_p = 1 is skipped: rounding could make a cumsum reach 1 early.
    before = probs.cumsum(-1) - probs
    top_ps = top_ps.float()[:, None]
    sorted_logits = sorted_logits.masked_fill((before >= top_ps) & (top_ps < 1), float("-inf"))
    return torch.empty_like(logits).scatter_(-1, idx, sorted_logits)


def sample(logits: Tensor, temperatures: Tensor, top_ks: Tensor, top_ps: Tensor,
           generators: list[torch.Generator | None] | None = None) -> Tensor:
    """Next tokens (B,) int64 from logits (B, V): an exact draw from `filtered_probs` (greedy rows are one-hot there,
    so the race returns their argmax, consuming the same random numbers as any other row)."""
    return draw(filtered_probs(logits, temperatures, top_ks, top_ps), generators)


def filtered_probs(logits: Tensor, temperatures: Tensor, top_ks: Tensor, top_ps: Tensor) -> Tensor:
    """The distribution `sample` draws from, per row (..., V) for rows (B, ..., V): one-hot argmax for greedy rows,
    else softmax of the temperature-scaled, top-k/top-p-filtered logits. Speculative decoding compares these."""
    shape = logits.shape
    n = math.prod(shape[1:-1])        # explicit: -1 is ambiguous for an empty batch
    flat = logits.float().reshape(shape[0], n, shape[-1])
    rep = lambda t: t.repeat_interleave(n)  # noqa: E731
    greedy = rep(temperatures < GREEDY_EPS)
    t = torch.where(greedy, torch.ones_like(greedy, dtype=torch.float32), rep(temperatures).float())
    rows = flat.reshape(-1, shape[-1])
    probs = _top_k_top_p(rows / t[:, None], rep(top_ks), rep(top_ps)).softmax(-1)
    one_hot = torch.zeros_like(probs).scatter_(-1, rows.argmax(-1, keepdim=True), 1.0)
    return torch.where(greedy[:, None], one_hot, probs).reshape(shape)


def compute_logprobs(logits: Tensor, tokens: Tensor, top_n: int) -> tuple[Tensor, Tensor, Tensor]:
    """(logprob of tokens (B,), top-n ids (B, top_n), their logprobs (B, top_n)) under log_softmax of the RAW logits:
    the model's own distribution, before penalties / logit_bias / temperature / top-k / top-p, as vLLM reports it by
    default; the engine passes the model's logits, never the adjusted ones."""
    logprobs = logits.float().log_softmax(-1)
    token_lp = logprobs.gather(-1, tokens.long()[:, None]).squeeze(-1)
    top_lp, top_ids = logprobs.topk(top_n, dim=-1)
    return token_lp, top_ids, top_lp


def _emit(drafts: Tensor, num_accepted: Tensor, next_token: Tensor) -> Tensor:
    """(B, k+1): the accepted drafts, then next_token at position num_accepted, then -1 padding."""
    B, k = drafts.shape
    pos = torch.arange(k + 1, device=drafts.device)[None]
    n = num_accepted[:, None]
    drafts = torch.cat([drafts.long(), drafts.new_full((B, 1), -1, dtype=torch.long)], 1)
    return torch.where(pos < n, drafts, torch.where(pos == n, next_token.long()[:, None], -1))


def _prefix_len(ok: Tensor) -> Tensor:
    """Length of the leading run of True per row of ok (B, k)."""
    return ((~ok).cumsum(-1) == 0).sum(-1)


def rejection_sample(draft_tokens: Tensor, draft_probs: Tensor, target_probs: Tensor,
                     generators: list[torch.Generator | None] | None = None) -> tuple[Tensor, Tensor]:
    """Speculative sampling (Leviathan et al. 2023; Chen et al. 2023). draft_tokens (B, k) were drawn from
    draft_probs q (B, k, V); target_probs p (B, k+1, V) are the target's (already temperature/top-k/top-p filtered)
    distributions. Draft x_i is accepted with probability min(1, p(x)/q(x)); at the first rejection the token is drawn
    from normalize(max(0, p - q)); if all are accepted a bonus token is drawn from p[:, k]. Each emitted token is then
    distributed exactly as a draw from the target: P(a) = min(p, q)(a) + max(0, p - q)(a) = p(a).
    Returns (tokens (B, k+1) padded with -1 after the first rejection's replacement, num_accepted (B,)). A one-hot p
    (a greedy request) is greedy verification: the draft is kept iff it is the argmax, else the argmax replaces it."""
    B, k = draft_tokens.shape
    p, q, x = target_probs.float(), draft_probs.float(), draft_tokens.long()
    p_x = p[:, :k].gather(-1, x[..., None]).squeeze(-1)
    q_x = q.gather(-1, x[..., None]).squeeze(-1)
    u = _fill(p.new_empty(B, k), Tensor.uniform_, generators)
    # u < p/q without the division: q(x) = 0 (a draft its own model called impossible, e.g. underflow) is accepted iff
    # p(x) > 0, the limit of p/q -> inf; p(x) = 0 is never accepted, so the target never emits an impossible token.
    num_accepted = _prefix_len(u * q_x < p_x)
    # distribution at the first rejection, max(0, p - q); with all accepted q counts as 0 there, which gives p[:, k].
    p_n = p.gather(1, num_accepted[:, None, None].expand(B, 1, p.shape[-1])).squeeze(1)
    if k > 0:   # a shape, not a value: no sync
        q_n = q.gather(1, num_accepted.clamp(max=k - 1)[:, None, None].expand(B, 1, q.shape[-1])).squeeze(1)
        q_n = q_n.masked_fill((num_accepted == k)[:, None], 0.0)
    else:
        q_n = torch.zeros_like(p_n)
    residual = (p_n - q_n).clamp_min(0)
    # all-zero only if p <= q everywhere, i.e. p == q, where only a q(x) = 0 draft is rejected: fall back to p.
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p_n)
    return _emit(x, num_accepted, draw(residual, generators)), num_accepted   # the race needs no normalisation
