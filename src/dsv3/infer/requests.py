"""What a request is checked against before it is queued: the engine's fixed limits (vocabulary, context, cache) and
the prompt's token ids. A server process checks requests with a copy of the limits, off the engine's process."""

from __future__ import annotations

import logging
import numbers
from dataclasses import dataclass

import torch

from .sampling import SamplingParams

log = logging.getLogger(__name__)


class RequestRefused(ValueError):
    """An engine refused a request when it was added (what is wrong with it): the client's to fix, a server's 400.
    What a server's engine loop or a disaggregated worker hands back for the request, across a pipe if need be."""


class GrammarFailed(RequestRefused):
    """A request's structured output failed mid-way (finish reason dsv3.infer.structured.GRAMMAR_ERROR: a grammar
    past the parser's limits at run time): its output does not satisfy the constraint; a server's 400."""


class StepFailed(RuntimeError):
    """The engine step that ran a request failed (a forward out of memory, a kernel error): nothing the client did;
    a server's 503, to retry. The message says only that: the cause, with its traceback, is logged where it ran."""


# what the client of a request whose step failed is told: the cause is the server's log's (log.exception), its text
# (a CUDA error, paths, sizes) nothing for the client
# (an instance per request: one raised in many tasks would gather all their tracebacks)
STEP_FAILED = "the engine step failed: the step that ran this request did not complete; retry the request"


def step_failed(worker: str | None = None) -> StepFailed:
    """A request's StepFailed (a new one each time): STEP_FAILED, or for a disaggregated worker's engine (`worker`,
    its class name) the message that names it."""
    if worker is None:
        return StepFailed(STEP_FAILED)
    return StepFailed(f"the {worker}'s step failed: the step that ran this request did not complete; retry it")


def refusal(error: Exception, engine: str) -> Exception:
    """What the client of a request `engine` would not add is told: its ValueError is the request's fault (a 400
    with the engine's message); anything else is the engine's (logged, a 503 that says no more)."""
    if isinstance(error, ValueError):
        return RequestRefused(f"{engine} refused the request: {error}")
    log.error("%s failed to add a request", engine, exc_info=error)
    return StepFailed(f"{engine} failed to take the request; retry the request")


@dataclass(frozen=True)
class RequestLimits:
    """What a request is checked against; fixed for an engine's life (a server process can hold a copy)."""
    vocab_size: int
    max_model_len: int
    block_size: int
    num_blocks: int

    @property
    def capacity(self) -> int:
        return self.block_size * self.num_blocks


def prompt_token_ids(prompt) -> list[int]:
    """A token-id prompt as a list of ints; ValueError for anything else (1.5 or True would otherwise become a
    token silently, a nested list a TypeError from deep inside)."""
    if isinstance(prompt, torch.Tensor):
        if prompt.dim() != 1 or prompt.is_floating_point() or prompt.is_complex() or prompt.dtype == torch.bool:
            raise ValueError(f"a tensor prompt must be 1-D token ids (an integer dtype), got {prompt.dtype} "
                             f"of shape {tuple(prompt.shape)}")
        prompt = prompt.tolist()
    if isinstance(prompt, (bytes, dict)) or not hasattr(prompt, "__iter__"):
        raise ValueError(f"the prompt must be a string or a list of token ids, got {type(prompt).__name__}")
    ids = list(prompt)
    bad = [t for t in ids if not isinstance(t, numbers.Integral) or isinstance(t, bool)]
    if bad:
        raise ValueError(f"prompt token ids must be ints, got {bad[0]!r}")
    return [int(t) for t in ids]


def check_request(prompt: str | list[int], params: SamplingParams, limits: RequestLimits, tokenizer=None) -> list[int]:
    """The prompt's token ids, or ValueError naming what is wrong with the request."""
    vocab = limits.vocab_size
    params.validate(vocab)
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ValueError("a text prompt needs a tokenizer; pass token ids or give the engine one")
        ids = tokenizer.encode(prompt)
    else:
        ids = prompt_token_ids(prompt)
    if not ids:
        raise ValueError("the prompt is empty")
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
        raise ValueError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
    if params.stop and tokenizer is None:
        raise ValueError("stop strings need a tokenizer")
    if params.structured_output is not None:
        from .structured import compile_check
        compile_check(params.structured_output, tokenizer, vocab)
    if len(ids) >= limits.max_model_len:
        raise ValueError(f"the prompt has {len(ids)} tokens; the context holds {limits.max_model_len} "
                         f"(prompt + at least one generated token)")
    limit = min(len(ids) + params.max_tokens, limits.max_model_len)
    if -(-limit // limits.block_size) > limits.num_blocks:
        raise ValueError(f"prompt + max_tokens = {limit} tokens exceed the cache capacity of {limits.capacity} tokens")
    return ids
