"""Repetition penalties and logit_bias: the logit adjustments of `SamplingParams`, and their per-request state on
the device.

Per row, before temperature / top-k / top-p, in vLLM's order (`apply_penalties`):
  1. logit_bias (OpenAI): logits[t] += bias[t];
  2. repetition_penalty r (HF's RepetitionPenaltyLogitsProcessor, vLLM's extra parameter), over the prompt's AND the
     generated tokens: a seen token's logit is divided by r where it is > 0 and multiplied by r where it is < 0;
  3. frequency f and presence p (OpenAI's, as vLLM), over the GENERATED tokens only:
     logits[t] -= f * count[t] + p * (count[t] > 0).
Log-probabilities stay the raw model's (dsv3.infer.sampling.compute_logprobs is given the unadjusted logits).

State (`PenaltyState`): a request that uses any of them gets a row when it is first sampled and keeps it until it
finishes (preemption keeps it: its generated tokens stay generated): its counts of generated tokens (int32), its
prompt's tokens (bool) and its bias (float32), each (V,), and its three scalars; 9 bytes x V a request (1.2 MB for
V3's 129,280). The counts grow on the device from each step's sampled tokens (a scatter_add), never from the host:
under the overlap schedule the next step launches before the host has read the last token (dsv3.infer.overlap).
Like sampling, a step's use of the state is free of host syncs; host lists are copied through pinned memory.

Cost: the tensors are allocated with the first such request and let go when the last one ends. A step whose batch
has none does exactly what it did without this module (one Python check on the host). A step with some gathers
their P rows, adjusts them and writes them into a copy of the logits: the other rows' logits are bit-identical, so
their tokens are those they would get alone. (vLLM instead rebuilds padded output-token tensors from the host
every step; that needs the last token on the host, which the overlap schedule does not have yet.)
"""

from __future__ import annotations

import torch
from torch import Tensor

from .overlap import to_device


def apply_penalties(logits: Tensor, counts: Tensor, prompt_mask: Tensor, bias: Tensor, presence: Tensor,
                    frequency: Tensor, repetition: Tensor) -> Tensor:
    """Adjusted float32 logits (P, V): logits (P, V), counts of generated tokens (P, V) int, prompt_mask (P, V)
    bool, bias (P, V), and per-row presence / frequency / repetition penalties (P,). Steps of the module docstring."""
    logits = logits.float() + bias                                                     # 1. logit_bias
    generated = counts > 0
    rep = repetition.float()[:, None]
    seen = prompt_mask | generated                                                     # 2. repetition (HF)
    logits = torch.where(seen, torch.where(logits > 0, logits / rep, logits * rep), logits)
    return logits - frequency[:, None] * counts - presence[:, None] * generated        # 3. OpenAI's


class PenaltyState:
    """The rows of the running requests that adjust their logits (module docstring), by sequence id."""

    def __init__(self, vocab_size: int, device: torch.device | str):
        self.vocab_size, self.device = vocab_size, torch.device(device)
        self.rows: dict[int, int] = {}         # seq_id -> row
        self._free: list[int] = []
        self._allocate(0)

    def _allocate(self, n: int) -> None:
        V, dev = self.vocab_size, self.device
        self.counts = torch.zeros(n, V, dtype=torch.int32, device=dev)
        self.prompt = torch.zeros(n, V, dtype=torch.bool, device=dev)
        self.bias = torch.zeros(n, V, dtype=torch.float32, device=dev)
        self.scalars = torch.zeros(n, 3, dtype=torch.float32, device=dev)       # presence, frequency, repetition

    def _grow(self) -> None:
        old = (self.counts, self.prompt, self.bias, self.scalars)
        n = len(old[0])
        self._allocate(max(4, 2 * n))
        for new, t in zip((self.counts, self.prompt, self.bias, self.scalars), old):
            new[:n] = t
        self._free = list(range(len(self.counts) - 1, n - 1, -1))      # popped from the end: lowest first

    def _row(self, seq) -> int:
        """seq's row, filled in on its first use from what the host knows: the prompt, the bias and the tokens
        generated before this engine sampled it (a prefill worker's first token, dsv3.infer.disagg)."""
        row = self.rows.get(seq.seq_id)
        if row is not None:
            return row
        if not self._free:
            self._grow()
        row = self.rows[seq.seq_id] = self._free.pop()
        p, out = seq.params, seq.output_ids
        assert all(t >= 0 for t in out), f"sequence {seq.seq_id} has pending tokens before its first sample"
        self.counts[row].zero_()
        if out:
            self.counts[row].scatter_add_(0, to_device(out, torch.long, self.device),
                                          torch.ones(len(out), dtype=torch.int32, device=self.device))
        self.prompt[row].zero_().index_fill_(0, to_device(seq.prompt_ids, torch.long, self.device), True)
        self.bias[row].zero_()
        if p.logit_bias:
            self.bias[row].index_copy_(0, to_device(list(p.logit_bias), torch.long, self.device),
                                       to_device(list(p.logit_bias.values()), torch.float32, self.device))
        self.scalars[row] = to_device([p.presence_penalty, p.frequency_penalty, p.repetition_penalty],
                                      torch.float32, self.device)
        return row

    def release(self, seq_id: int) -> None:
        """A finished request's row goes back; with the last one the tensors go too (no memory while unused).
        A chained step may still count a discarded token into the row: queued on the stream before whatever
        reuses the row writes it afresh."""
        row = self.rows.pop(seq_id, None)
        if row is None:
            return
        self._free.append(row)
        if not self.rows:
            self._free = []
            self._allocate(0)

    def apply(self, seqs: list, logits: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
        """The logits (B, V) of seqs to sample from, and what `record` needs (None: no row adjusts its logits, and
        `logits` come back as they are: the step is what it was without penalties)."""
        at = [i for i, s in enumerate(seqs) if s.params.modifies_logits]
        if not at:
            return logits, None
        index = to_device([at, [self._row(seqs[i]) for i in at]], torch.long, self.device)   # one copy
        batch_rows, rows = index[0], index[1]
        s = self.scalars[rows]
        adjusted = apply_penalties(logits[batch_rows], self.counts[rows], self.prompt[rows], self.bias[rows],
                                   s[:, 0], s[:, 1], s[:, 2]).to(logits.dtype)
        if len(at) == logits.shape[0]:
            return adjusted, (batch_rows, rows)
        return logits.index_copy(0, batch_rows, adjusted), (batch_rows, rows)

    def record(self, selected: tuple[Tensor, Tensor], tokens: Tensor) -> None:
        """Count the tokens (B,) just sampled for the rows `apply` selected, on the device."""
        batch_rows, rows = selected
        flat = rows * self.vocab_size + tokens[batch_rows].long()
        self.counts.view(-1).scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
