"""A request as the engine tracks it: its tokens, where their latents live in the paged cache, and how far the
model has got through them."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from .sampling import SamplingParams


class Status(Enum):
    WAITING = "waiting"      # queued, or preempted (its blocks were freed; it will be recomputed)
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)      # identity: two requests with the same tokens are still two requests
class Sequence:
    seq_id: int
    prompt_ids: list[int]
    params: SamplingParams
    token_ids: list[int] = field(default_factory=list)     # prompt + generated
    status: Status = Status.WAITING
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # chained hashes of the full blocks computed so far
    num_cached_tokens: int = 0    # tokens whose latents are in the cache (a prefix of token_ids)
    finish_reason: str | None = None
    logprobs: list = field(default_factory=list)           # per generated token: (logprob, top ids, top logprobs)
    prompt_logprobs: list = field(default_factory=list)    # per prompt token after the first
    text: str = ""
    num_preemptions: int = 0
    # speculative decoding: the MTP layer's cache holds positions < mtp_cached; the main model's final hidden states
    # of positions mtp_cached .. num_cached_tokens - 1 wait in pending_hidden to be fed to it (a plain step catches it
    # up on a sequence with many of them first: Speculation.settle)
    mtp_cached: int = 0
    pending_hidden: list = field(default_factory=list)
    # the fused speculative step (dsv3.infer.spec_step): (tensor on the device, row, L, column) from the step that
    # drafted this sequence's next k tokens: its inputs [t_L, drafts] are tensor[row, column:], valid while
    # num_cached_tokens == L (a plain step in between makes them stale: the drafts are then made again)
    spec_next: tuple | None = None
    # the overlap schedule (dsv3.infer.overlap): the last num_pending entries of token_ids are placeholders for tokens
    # sampled on the device and not read yet (at most 2: the step being applied and the one launched after it);
    # `stopping`: the pending token ends the sequence whatever it is (max_tokens, the context), so it is not scheduled
    num_pending: int = 0
    stopping: bool = False
    # min_tokens: the output's characters before which no stop string may start (the text of its first min_tokens
    # tokens), once known
    stop_from: int | None = None

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_ids)

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_ids):]

    @property
    def num_output_tokens(self) -> int:
        """len(output_ids) without copying the output (read every token: a copy was quadratic in the output)."""
        return len(self.token_ids) - len(self.prompt_ids)

    @property
    def num_uncomputed(self) -> int:
        """Tokens to run through the model before the next one can be sampled (1 while decoding)."""
        return len(self.token_ids) - self.num_cached_tokens

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED
