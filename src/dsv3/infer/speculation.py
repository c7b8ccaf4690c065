"""MTP speculative decoding in the engine (spec 1.8 at inference): which steps speculate, and the two ways a step
does it.

- Greedy batches (`EngineConfig.speculative_fused`, default): one fused step (dsv3.infer.spec_step) verifies the
  drafts, accepts them and drafts the next ones on the device; its output, read once per step, carries the next
  step's input ids, which stay on the device. A sequence whose drafts are stale (after prefill, or after a plain step)
  is drafted first here.
- Otherwise (sampled requests in the batch): draft with the MTP module, verify with one forward of the main model,
  rejection-sample on the device, each a separate step with host reads between them; the output distribution is the
  target's (Leviathan et al. 2023).
A batch with a request asking for log-probabilities, penalties or logit_bias does not speculate (`applies`): it runs
plain steps, which apply them (dsv3.infer.penalties); drafts verified against penalised distributions would need the
counts to advance draft by draft inside the verify step, which is not built.
Both keep the sequence's MTP catch-up state (Sequence.mtp_cached / pending_hidden) so either may follow the other;
plain steps add their hidden states to it, and catch the MTP module up on the way (`settle`) so that it stays bounded.
Under the overlap schedule (EngineConfig.overlap_schedule) fused steps of an unchanged batch chain: the next one is
launched before the last one's output is read (`can_chain`, `Batch.advance`), so the host's share of a step and the
read's latency hide behind the device, as for plain steps (dsv3.infer.overlap).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from .batch import Row
from .overlap import InFlight, to_device
from .sampling import SamplingTensors, draw, filtered_probs, rejection_sample
from .sequence import Sequence


@dataclass
class SpecInFlight:
    """A fused speculative step launched and not read yet (the engine's overlap schedule)."""
    seqs: list[Sequence]
    out: torch.Tensor              # (B, 2k + 3) on the device (dsv3.infer.spec_step)
    last_hidden: torch.Tensor      # (B, D)
    host: InFlight                 # out[:, :k + 2] on its way to the host


class Speculation:
    """The engine's speculative steps; counts in `engine.spec_stats`."""

    def __init__(self, engine):
        self.engine, self.k = engine, engine.config.num_speculative_tokens
        self.runner, self.blocks, self.stats = engine.runner, engine.blocks, engine.spec_stats
        # pending positions a sequence may gather over plain steps before `settle` catches the MTP module up on them:
        # a block's worth (one eager MTP forward per block of plain steps), and more than one step's k + 1
        self.max_pending = max(engine.cache.block_size, 2 * (self.k + 1))

    def applies(self, seqs: list[Sequence], counts: list[int]) -> bool:
        """Speculate when every scheduled sequence is decoding, the batch is small enough for drafting to pay, no
        log-probabilities, penalties or logit_bias are asked for (a batch with them runs plain steps, which apply them:
        dsv3.infer.penalties), none is short of its min_tokens (a step accepting several drafts could end one below it:
        plain steps mask its stops, StopRules.suppress), none is constrained (dsv3.infer.structured), and each can
        get blocks for 2k more tokens (they are taken here: the k+1 verified positions, and the fused step's chained
        drafts up to position L + 2k - 1)."""
        e = self.engine
        if len(seqs) > e.config.speculative_max_batch or len(seqs) != len(e.scheduler.running):
            return False
        # decoding: the one token is the sequence's last (a 1-token chunk of a prompt, which a small budget or its
        # leftover at the end of a step gives, has num_cached_tokens > 0 too, and must not emit drafts mid-prompt)
        if any(n != 1 or s.num_uncomputed != 1 or s.num_cached_tokens == 0 or s.params.logprobs is not None
               or s.params.modifies_logits or s.num_output_tokens < s.params.min_tokens
               or s.params.structured_output is not None
               for s, n in zip(seqs, counts)):
            return False
        return self.reserve(seqs, max(self.k + 1, 2 * self.k))

    def reserve(self, seqs: list[Sequence], ahead: int) -> bool:
        """Blocks for positions up to num_cached_tokens + ahead of every sequence, or, where there are not enough
        for all of them, none taken: blocks taken for some before the batch is refused would sit unused."""
        b = self.blocks
        need = sum(max(0, b.blocks_needed(s.num_cached_tokens + ahead) - len(s.block_table)) for s in seqs)
        if need > b.num_free_blocks:
            return False
        return all(b.ensure_capacity(s, s.num_cached_tokens + ahead) for s in seqs)

    def step(self, seqs: list[Sequence], prev: SpecInFlight | None = None) -> tuple[list, SpecInFlight | None]:
        """Greedy batches: the fused step (dsv3.infer.spec_step), after drafting for the sequences whose drafts are
        not ready, or chained after `prev`; otherwise draft, verify and rejection-sample as separate steps. Returns
        the outputs read in this step and the fused step in flight (None: nothing left to read)."""
        if self.engine.config.speculative_fused and all(s.params.greedy for s in seqs):
            return self.fused_step(seqs, prev)
        return self.verify_step(seqs, *self.draft(seqs, greedy=False)), None

    def draft(self, seqs: list[Sequence], greedy: bool) -> tuple:
        """Draft k tokens per sequence with the MTP module (chained for k > 1) after catching it up over every
        position the main model has finished. Returns (drafts (B, k), their draft distributions (B, k, V) or None
        when greedy, and the sampling tensors and generators of the batch, or None when greedy)."""
        k, dev, runner = self.k, self.engine.device, self.runner
        sampling = None if greedy else (SamplingTensors.from_params([s.params for s in seqs], dev),
                                        [self.engine._generators.get(s.seq_id) for s in seqs])
        # first catch up over every position the main model has finished
        logits, h = self.catch_up(seqs, [s.num_cached_tokens for s in seqs])
        drafts, draft_probs = [], []
        for j in range(k):
            if greedy:
                d = logits.argmax(-1)
            else:
                q = filtered_probs(logits, *sampling[0])
                d = draw(q, sampling[1])
                draft_probs.append(q)
            drafts.append(d)
            if j + 1 < k:      # chain: the block's output stands in for the main model's next hidden state
                pos = [s.num_cached_tokens + j for s in seqs]
                batch = runner.prepare([Row([0], p, s.block_table) for s, p in zip(seqs, pos)], mtp=True, input_ids=d)
                logits, h = runner.mtp_forward(batch, h)
        # the catch-up state (mtp_cached, pending_hidden) moves on with the step that follows, once it has run
        # (verify_step, apply): if that step raises, the next one catches up again from here
        return torch.stack(drafts, 1), None if greedy else torch.stack(draft_probs, 1), sampling

    def catch_up(self, seqs: list[Sequence], ends: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the MTP module over positions mtp_cached .. end - 1 of each sequence (writing their MTP latents):
        position i pairs the main model's h_i, waiting in pending_hidden, with token i+1, known on the host.
        Returns the logits (B, V) and block output (B, D) at each sequence's last such position. The catch-up state
        (mtp_cached, pending_hidden) is the caller's to move on, once what follows has run."""
        rows = [Row(s.token_ids[s.mtp_cached + 1:e + 1], s.mtp_cached, s.block_table) for s, e in zip(seqs, ends)]
        if all(r.past > 0 and len(r.tokens) <= self.k + 1 for r in rows):
            # steady state: the a + 1 positions of the last step as one-token rows (absorbed decode, graphs)
            rows = [Row([t], r.past + j, r.block_table) for r in rows for j, t in enumerate(r.tokens)]
        lengths = [e - s.mtp_cached for s, e in zip(seqs, ends)]
        hidden = torch.cat([torch.cat(s.pending_hidden)[:n] for s, n in zip(seqs, lengths)])
        logits, h = self.runner.mtp_forward(self.runner.prepare(rows, mtp=True), hidden)
        last = to_device([n - 1 for n in itertools.accumulate(lengths)], torch.long, self.engine.device)
        return logits[last], h[last]

    def settle(self, seqs: list[Sequence]) -> None:
        """Before a plain step: catch the MTP module up on each sequence holding `max_pending` or more pending
        positions, so that the hidden states kept for it stay bounded however long speculation stays off (a large
        batch, logprobs, penalties). Each keeps its last cached position pending, re-runnable by `draft`, which
        drafts from the catch-up's last output (as after a fused step); only positions whose next token is on the
        host are caught up."""
        due = [(s, min(s.num_cached_tokens, len(s) - s.num_pending) - 1) for s in seqs
               if s.num_cached_tokens - s.mtp_cached >= self.max_pending]
        due = [(s, e) for s, e in due if e > s.mtp_cached]
        if not due:
            return
        self.catch_up([s for s, _ in due], [e for _, e in due])
        for s, e in due:   # a copy of the rows kept: a view would keep the whole concatenation alive
            s.pending_hidden = [torch.cat(s.pending_hidden)[e - s.mtp_cached:].clone()]
            s.mtp_cached = e

    def verify_step(self, seqs: list[Sequence], drafts: torch.Tensor, draft_probs: torch.Tensor,
                    sampling: tuple) -> list:
        """Verify the drafts with one forward of the main model over [last token, drafts], keep the accepted prefix
        plus one token of the target's own (rejection sampling: the output distribution is the target's; greedy
        requests keep exact matches)."""
        k, runner = self.k, self.runner
        (temps, top_ks, top_ps), gens = sampling
        draft_list = drafts.tolist()
        # verify as B*(k+1) one-token rows: token j of a sequence attends over the cache up to its own position
        # (all k+1 latents are written before attention), so the absorbed decode path, and its CUDA graphs, serve
        verify = runner.prepare([Row([tok], s.num_cached_tokens + j, s.block_table)
                                 for s, dl in zip(seqs, draft_list)
                                 for j, tok in enumerate([s.token_ids[s.num_cached_tokens]] + dl)])
        hidden = runner.forward(verify)
        target = filtered_probs(runner.logits(hidden).view(len(seqs), k + 1, -1), temps, top_ks, top_ps)
        tokens, accepted = rejection_sample(drafts, draft_probs, target, gens)
        self.stats["steps"] += 1
        outputs = []
        for b, (seq, toks, a) in enumerate(zip(seqs, tokens.tolist(), accepted.tolist())):
            seq.mtp_cached, seq.pending_hidden = seq.num_cached_tokens, [hidden[b * (k + 1):b * (k + 1) + a + 1]]
            outputs.append(self.accept(seq, toks[:a + 1]))
        return outputs

    def can_chain(self, prev: SpecInFlight) -> bool:
        """Whether the next step may launch before `prev` (a fused step in flight) is read: the same sequences
        running, in the same order, nothing waiting to be admitted (a prefill row would change the batch), none
        certain to end with prev's tokens (max_tokens), and each can get blocks now for both steps' worst case
        (k+1 positions accepted by prev, then 2k written by the next: L + k + 1 + max(k + 1, 2k)), so that the
        scheduler, which runs next, neither preempts nor admits. The blocks are taken here."""
        e, k = self.engine, self.k
        seqs = prev.seqs
        if e.scheduler.waiting or e.scheduler.running != seqs or e._aborted:
            return False
        ahead = k + 1 + max(k + 1, 2 * k)
        if any(s.finished or s.num_output_tokens + 1 >= s.params.max_tokens
               or s.num_cached_tokens + ahead > e.max_model_len for s in seqs):
            return False
        return self.reserve(seqs, ahead)

    def fused_step(self, seqs: list[Sequence], prev: SpecInFlight | None = None) -> tuple[list, SpecInFlight]:
        """One fused step (dsv3.infer.spec_step) for greedy sequences: its inputs [t_L, drafts] are the last fused
        step's output where that is current, else drafted here first (after prefill, or after a plain step).
        Chained after `prev` (a fused step of the same sequences, not read yet: `can_chain`), the inputs are prev's
        output on the device and the rows' positions move on by prev's a + 1 there (Batch.advance); prev is read
        only once this step is launched. Returns the outputs of what was read (prev's) and this step in flight."""
        k = self.k
        advance = None
        if prev is not None:
            inputs = prev.out[:, k + 2:]
            advance = (prev.out[:, k + 1:k + 2] + 1).expand(-1, k + 1).reshape(-1)   # a + 1 on each row
        else:
            stale = [s for s in seqs if s.spec_next is None or s.spec_next[2] != s.num_cached_tokens]
            if stale:
                drafts = self.draft(stale, greedy=True)[0]
                last = to_device([[s.token_ids[s.num_cached_tokens]] for s in stale], torch.long, self.engine.device)
                made = torch.cat([last, drafts], 1)
                for i, s in enumerate(stale):       # the layout of a fused step's output, for the gather below
                    s.spec_next = (made, i, s.num_cached_tokens, 0)
            sources = [s.spec_next for s in seqs]
            first = sources[0][0]
            if all(src[0] is first and src[1] == i for i, src in enumerate(sources)) and first.shape[0] == len(seqs):
                inputs = first[:, sources[0][3]:]                       # the same batch as the last step: no gather
            else:
                inputs = torch.stack([src[0][src[1], src[3]:] for src in sources])
        rows = [Row([0], s.num_cached_tokens + j, s.block_table) for s in seqs for j in range(k + 1)]
        batch = self.runner.prepare(rows, spec=True, input_ids=inputs.flatten(), advance=advance)
        out, last_hidden = self.runner.spec_step(batch)
        self.stats["steps"] += 1
        flight = SpecInFlight(list(seqs), out, last_hidden, InFlight.start(seqs, out[:, :k + 2]))
        return (self.apply(prev, chained=True) if prev is not None else []), flight

    def apply(self, flight: SpecInFlight, chained: bool = False) -> list:
        """A fused step's output read on the host (the step's one device -> host sync): each sequence's tokens
        through the stop checks. A sequence that the step before it ended ran in it too (chained): its row is
        discarded, never emitted (its latents went to its own freed blocks, at positions past its end). `chained`:
        a step launched after this one is running on the same sequences (it keeps the blocks taken for it)."""
        k = self.k
        outputs = []
        for b, (seq, row) in enumerate(zip(flight.seqs, flight.host.wait()[0])):
            if seq.finished:
                continue
            outputs.append(self.accept(seq, row[:row[k + 1] + 1], release=not chained))
            # the MTP module caught up over the accepted positions; its last one stays re-runnable for the
            # synchronous path (which drafts from the catch-up's last output)
            seq.mtp_cached, seq.pending_hidden = seq.num_cached_tokens - 1, [flight.last_hidden[b:b + 1]]
            seq.spec_next = (flight.out, b, seq.num_cached_tokens, k + 2)
        return outputs

    def accept(self, seq: Sequence, new: list[int], release: bool = True):
        """A speculative step's tokens for seq, the accepted drafts and the target's token after them (k+1 at most),
        through the engine's stop checks; the positions before the last are in the cache now. Its RequestOutput.
        `release`: the blocks taken for the step's positions past the accepted ones go back (their latents are
        rewritten before being read, wherever they live), so that between steps a sequence holds no more blocks
        than its tokens need: admission and preemption count on the free ones. Not while a later step that
        wrote into them is still to be read (chained)."""
        self.stats["proposed"] += self.k
        self.stats["accepted"] += len(new) - 1
        seq.num_cached_tokens += len(new)
        self.blocks.mark_computed(seq)
        emitted = []
        for tok in new:
            self.engine._append(seq, tok)
            emitted.append(tok)
            if seq.finished:                 # (its blocks are freed)
                break
        if release and not seq.finished:
            self.blocks.trim(seq, len(seq))
        return self.engine._output(seq, emitted)
