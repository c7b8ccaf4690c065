"""The greedy MTP speculative step as one body: verify, accept and draft the next step's tokens on the device, with
no host round trip inside, so a decode-graph bucket captures all of it as one CUDA graph (issue 16). The shape of
SGLang's EAGLE worker and vLLM's EAGLE / MTP proposer under CUDA graphs: target verify, acceptance on the device, then
the draft model over all k+1 verified positions with the accepted one selected on the device (vLLM's "padded drafter
batch", which avoids the host sync that trimming the batch to the accepted positions would need); written anew for
this engine's MTP module and paged latent cache.

State between steps, per sequence at L: the main model's latents hold positions < L, the MTP module's (cache layer
num_hidden_layers) too, t_L is known (emitted by the last step), and drafts d_1..d_k guess t_{L+1}..t_{L+k}. A step:
  1. verify: the main model over [t_L, d_1..d_k] at positions L..L+k, as k+1 one-token decode rows (each writes its
     latents first, then attends over the cache up to its own position: the absorbed decode path, spec 1.4);
     final hidden states h_L..h_{L+k};
  2. accept: g_j = argmax head(h_{L+j}) is the target's greedy token at L+j+1; a = the length of the run of
     d_{j+1} == g_j; the step emits g_0..g_a (the accepted drafts are the target's own tokens, g_a the target's
     token after them): greedy verification, exactly plain greedy decoding's tokens. L' = L + a + 1;
  3. MTP over the same k+1 positions (same slots, block tables and context lengths, its own cache layer): row j
     pairs h_{L+j} with the embedding of g_j (spec 1.8: position i combines h_i with t_{i+1}). Rows j <= a are the
     catch-up of the positions just accepted (what the synchronous path runs as a separate batch); rows j > a write
     latents at positions >= L', which the next step rewrites before anything reads them (as the main model's
     rejected rows);
  4. draft: d'_1 = argmax of the MTP head at row a (position L' - 1, guessing t_{L'+1}); d'_2..d'_k chain (spec 1.8
     at inference, as the synchronous path): the MTP module at position L' + j - 2 with its own output as h and the
     previous draft as the token; their slots and context lengths come from L' on the device (padding rows of a
     bucket: the scratch slot, context 0);
  5. out (B, 2k + 3) int64: the emitted tokens (k+1, -1 after g_a), a, then the next step's inputs [g_a, d'_1..d'_k];
     and h_{L'-1} (B, D): the synchronous drafting of dsv3.infer.speculation drafts from the last position it
     catches up over, so the sequence hands it L'-1 again (rewritten with the same latents), whatever step follows.
The host reads `out` once per step (the only device -> host sync), then does the bookkeeping that depends on a: the
sequence's cached count, its stop conditions. Under the overlap schedule it reads it one step late (as vLLM's async
scheduling with speculative decoding, vllm-project/vllm#24799): step t+1 is launched first, its rows at the host's
stale positions L + j and `Batch.advance` = a + 1 from step t's output, from which step 0 below recomputes the
positions, slots and context lengths on the device (`_advanced`; advance 0 gives the host's own back, so a graph
bucket always runs it); a sequence that step t ended has its row of step t+1 discarded (dsv3.infer.speculation).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ..model.context import AttentionContext
from .batch import Batch


def _prefix_len(ok: torch.Tensor) -> torch.Tensor:
    """Length of the leading run of True per row of ok (B, k)."""
    return ((~ok).cumsum(-1) == 0).sum(-1)


def _context_at(cache, tables: torch.Tensor, real: torch.Tensor, pos: torch.Tensor) -> AttentionContext:
    """The attention context of one-token rows at positions pos (n,) with block tables (n, w): slots and context
    lengths computed on the device; a padding row (real False) writes to the scratch slot and reads nothing."""
    bs = cache.block_size
    block = tables.gather(1, (pos // bs).clamp(max=tables.shape[1] - 1)[:, None])[:, 0].long()
    slots = torch.where(real, block * bs + pos % bs, cache.scratch_slot)
    lens = torch.where(real, pos + 1, 0).to(torch.int32)
    return AttentionContext(cache, slots, (), None, tables, lens)


def _chain_context(batch: Batch, k1: int, pos: torch.Tensor, cache) -> AttentionContext:
    """The context of one draft row per sequence at positions pos (B,), from the sequence's block table (its first
    verify row's)."""
    ctx = batch.ctx
    tables = ctx.block_tables.view(-1, k1, ctx.block_tables.shape[-1])[:, 0]           # (B, w) int32
    return _context_at(cache, tables, ctx.context_lens.view(-1, k1)[:, 0] > 0, pos)


def _advanced(batch: Batch, cache) -> Batch:
    """The verify rows moved on by Batch.advance: a step launched before the host read the last one's accepted
    counts has its rows at the host's stale positions L + j, and the device adds a + 1 (the engine's overlap of
    speculative steps, dsv3.infer.speculation). Advance 0 gives the host's own slots and lengths back."""
    ctx = batch.ctx
    real = ctx.context_lens > 0
    pos = torch.where(real, batch.positions + batch.advance, batch.positions)
    return replace(batch, positions=pos, ctx=_context_at(cache, ctx.block_tables, real, pos), advance=None)


def greedy_spec_step(runner, k: int, batch: Batch, compiled: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """One speculative step of B sequences (module docstring) over `batch`: B * (k+1) one-token decode rows, sequence
    b's at rows b*(k+1) .. b*(k+1) + k, input ids [t_L, d_1..d_k]. Returns (out (B, 2k + 3) int64, h_{L'-1} (B, D))."""
    k1 = k + 1
    cache = runner.cache
    if batch.advance is not None:
        batch = _advanced(batch, cache)
    ids = batch.input_ids.view(-1, k1)
    B = ids.shape[0]
    # 1. verify
    hidden = runner.forward_eager(batch, compiled)                                     # (B*k1, D)
    # 2. accept
    g = runner.logits(hidden).argmax(-1).view(B, k1)
    a = _prefix_len(ids[:, 1:] == g[:, :k])                                            # (B,)
    j = torch.arange(k1, device=g.device)
    emitted = torch.where(j[None] <= a[:, None], g, -1)
    # 3. MTP over the verified positions, each with the target's token after it
    mtp_logits, x = runner.mtp_forward_eager(replace(batch, input_ids=g.flatten()), hidden, compiled)
    pick = torch.arange(B, device=g.device) * k1 + a
    # 4. the next drafts: the first from row a, the rest chained
    drafts = [mtp_logits[pick].argmax(-1)]
    h, last_hidden = x[pick], hidden[pick]
    start = batch.positions.view(B, k1)[:, 0] + a + 1                                  # L'
    for step in range(1, k):
        pos = start + step - 1
        ctx = _chain_context(batch, k1, pos, cache)
        chain = Batch([], drafts[-1], pos, list(range(B)), ctx)
        logits, h = runner.mtp_forward_eager(chain, h, compiled)
        drafts.append(logits.argmax(-1))
    # 5. one tensor for the host to read
    next_ids = torch.cat([g.gather(1, a[:, None]), torch.stack(drafts, 1)], 1)
    return torch.cat([emitted, a[:, None], next_ids], 1), last_hidden
