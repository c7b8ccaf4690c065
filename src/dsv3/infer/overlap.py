"""The overlap schedule: the host prepares decode step t+1 while the device still runs step t (the idea of SGLang's
overlap scheduler and vLLM's async scheduling; written anew for this engine).

A synchronous engine reads each step's sampled tokens on the host (`.tolist()`: a device sync) before it schedules
and builds the next step, so the device idles for the host's share of every step: ~0.26 ms per token at batch 1 on
the H200, 7% of a 3.6 ms step (RESULTS.md, issue 16). With `EngineConfig.overlap_schedule`:
  1. step t samples into a device tensor, starts the tokens' copy to pinned host memory (no wait) and records an
     event (`InFlight.start`); each sampled sequence holds a placeholder token `PENDING` meanwhile, so the scheduler
     sees it decoding (one uncomputed token) without knowing the token;
  2. step t+1 is scheduled; when it is a pure decode batch of exactly such sequences it chains: its input ids are
     step t's device tensor (gathered when the rows differ), and it launches (graph replay, head, sampling) at once;
  3. only then does the host wait for step t's event and apply its tokens: log-probabilities, stop conditions,
     outputs (streamed one step late). A sequence that step t finished has also run in step t+1: that token is
     discarded, never emitted (its latent went to a slot of the sequence's own last block, which is freed with its
     other blocks; whoever writes that block next does so later on the same stream).
A step that cannot chain (prefill rows, a new or re-admitted sequence) applies the pending tokens first, exactly as
the synchronous engine would have before scheduling. A sequence whose pending token certainly ends it (max_tokens,
the context) is not scheduled again (`Sequence.stopping`): a fixed-length batch runs no extra step at its end.

Every host -> device copy of such a step goes through pinned memory without blocking (`to_device`): PyTorch
synchronises the stream after a copy from pageable memory, which would put the host behind the device again.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PENDING = -1        # a sampled token not read on the host yet (a chained step's input comes from the device)


def staged(data, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """torch.tensor(data) on the host, in pinned memory when it is bound for a CUDA device: copied from there with
    non_blocking=True it needs no stream sync (the caching host allocator keeps the buffer until the copy has run)."""
    t = torch.tensor(data, dtype=dtype)
    return t.pin_memory() if torch.device(device).type == "cuda" else t


def to_device(data, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """torch.tensor(data, device=device) without a stream sync on CUDA."""
    return staged(data, dtype, device).to(device, non_blocking=True)


@dataclass
class InFlight:
    """One step's sampled tokens (and the log-probability tensors asked for) on their way to the host."""
    seqs: list                              # the sampled sequences, in row order
    tokens: torch.Tensor                    # (n,) int64 on the device: what a chained step feeds back as input ids
    host: tuple[torch.Tensor, ...]          # tokens, then the log-probability tensors: host copies, maybe in flight
    event: torch.cuda.Event | None          # recorded after the copies (CUDA); None: they are done already
    rows: dict[int, int]                    # seq_id -> row

    @classmethod
    def start(cls, seqs: list, tokens: torch.Tensor, extra: tuple[torch.Tensor, ...] = ()) -> InFlight:
        tensors = (tokens, *extra)
        if tokens.is_cuda:
            host = tuple(torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors)
            for h, t in zip(host, tensors):
                h.copy_(t, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            host, event = tuple(t if t.device.type == "cpu" else t.cpu() for t in tensors), None
        return cls(list(seqs), tokens, host, event, {s.seq_id: i for i, s in enumerate(seqs)})

    def input_ids(self, seqs: list) -> torch.Tensor:
        """The pending tokens of `seqs` (every one sampled in this step), on the device, in their order."""
        index = [self.rows[s.seq_id] for s in seqs]
        if index == list(range(len(self.seqs))):
            return self.tokens
        return self.tokens[to_device(index, torch.long, self.tokens.device)]

    def wait(self) -> list[list]:
        """The host copies as lists, once the device has written them."""
        if self.event is not None:
            self.event.synchronize()
        return [h.tolist() for h in self.host]
