"""Continuous batching: which sequences run in the next step, and how many of their tokens.

Each step has a token budget (max_num_batched_tokens). Running sequences go first, oldest first: a decoding one
needs 1 token, one still in its prompt takes the next chunk that fits (chunked prefill). Then waiting sequences
are admitted, oldest first, while the budget, the sequence limit and free blocks allow. When a running sequence
needs a block and none is free, the newest running sequence is preempted: its blocks are freed and it returns to
the front of the queue, to be recomputed from its tokens (prompt + what it has generated) when readmitted.

With `admission_delay` d > 0, new requests wait while others run until the oldest of them has waited d steps or
they fill every free slot (preempted ones are readmitted at once): a server whose requests arrive one by one then
prefills several in one step instead of mixing a prefill into most decode steps (RESULTS.md, issue 16).
"""

from __future__ import annotations

from collections import deque

from .block_manager import BlockManager
from .config import EngineConfig
from .sequence import Sequence, Status


class Scheduler:
    def __init__(self, config: EngineConfig, blocks: BlockManager):
        self.config, self.blocks = config, blocks
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.num_steps = 0
        self.arrived: dict[int, int] = {}        # seq_id -> the step count when it was added (until admitted)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)
        self.arrived[seq.seq_id] = self.num_steps

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free_sequence(seq)
        seq.mtp_cached, seq.pending_hidden, seq.spec_next = 0, [], None
        seq.status = Status.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def remove(self, seq: Sequence) -> None:
        """Drop a sequence from the queues and return its blocks (finished or aborted)."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.arrived.pop(seq.seq_id, None)
        self.blocks.free_sequence(seq)

    def _admission_due(self) -> bool:
        """Whether waiting sequences may start now (admission_delay)."""
        delay = self.config.admission_delay
        if not delay or not self.running:
            return True
        first = self.waiting[0].seq_id
        return (first not in self.arrived or self.num_steps - self.arrived[first] >= delay
                or len(self.waiting) >= self.config.max_num_seqs - len(self.running))

    def schedule(self) -> tuple[list[Sequence], list[int]]:
        self.num_steps += 1
        budget = self.config.max_num_batched_tokens
        seqs: list[Sequence] = []
        counts: list[int] = []
        for seq in list(self.running):
            if budget == 0:
                break
            # preempted earlier in this loop, or ended by its pending token (dsv3.infer.overlap): nothing to run
            if seq.status is not Status.RUNNING or seq.stopping:
                continue
            n = min(seq.num_uncomputed, budget)
            while not self.blocks.ensure_capacity(seq, seq.num_cached_tokens + n):
                victim = self.running[-1]
                self.preempt(victim)
                if victim is seq:
                    break
            if seq.status is Status.RUNNING:
                seqs.append(seq)
                counts.append(n)
                budget -= n
        due = bool(self.waiting) and self._admission_due()
        while due and self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            # no sharing when the prompt's own log-probabilities are wanted (every position must run), or with
            # speculation (a shared block's MTP-layer latents may be drafts' provisional ones)
            share = seq.params.prompt_logprobs is None and self.config.num_speculative_tokens == 0
            if not self.blocks.can_allocate(seq, share):
                break
            self.waiting.popleft()
            self.arrived.pop(seq.seq_id, None)
            self.blocks.allocate(seq, share)
            seq.status = Status.RUNNING
            self.running.append(seq)
            n = min(seq.num_uncomputed, budget)
            seqs.append(seq)
            counts.append(n)
            budget -= n
        return seqs, counts
