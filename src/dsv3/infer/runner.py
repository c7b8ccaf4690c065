"""ModelRunner: one forward over a ragged batch of sequences against the paged latent cache.

All scheduled tokens of a step (prefill chunks and single decode tokens) are flattened into one row of N tokens,
so every projection, norm and MoE layer runs once for the whole batch. Attention is per sequence kind:
- prefill chunks: the naive MLA form (spec 1.3) over the sequence's cached context + the chunk, causal;
- decode tokens: the absorbed form (spec 1.4) straight on the paged cache (dsv3.kernels.mla_decode: Triton on
  GPU, the PyTorch reference on CPU).
The model's own modules do the math (`MLA.project`, `_attend_naive`, `absorbed_weights`, the blocks' norms and
FFNs); the runner only routes tokens and cache slots.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kernels.mla_decode import mla_decode
from ..model import Transformer
from ..model.rope import rope_cos_sin
from .cache import PagedLatentCache
from .sequence import Sequence


@dataclass
class Batch:
    """Host-side description of one step: which tokens of which sequences run."""
    seqs: list[Sequence]
    n_tokens: list[int]            # tokens of each sequence in this step (a prefill chunk, or 1 when decoding)
    input_ids: torch.Tensor        # (N,)
    positions: torch.Tensor        # (N,)
    slots: torch.Tensor            # (N,) flat cache slots the new latents go to
    starts: list[int]              # where each sequence's tokens start in the flat row
    decode: list[int]              # indices into seqs of single-token rows with context (absorbed form)
    prefill: list[int]             # the others (naive form)
    block_tables: torch.Tensor     # (B, max_blocks) int32, for the decode rows
    context_lens: torch.Tensor     # (B,) int32: tokens in cache once this step has written


class ModelRunner:
    def __init__(self, model: Transformer, cache: PagedLatentCache):
        self.model, self.cache, self.cfg = model, cache, model.config
        self.device = next(model.parameters()).device
        self.block_size = cache.block_size

    def prepare(self, seqs: list[Sequence], n_tokens: list[int]) -> Batch:
        ids, pos, slots, starts, decode, prefill = [], [], [], [], [], []
        bs = self.block_size
        for i, (seq, n) in enumerate(zip(seqs, n_tokens)):
            start = seq.num_cached_tokens
            starts.append(len(ids))
            ids += seq.token_ids[start:start + n]
            pos += range(start, start + n)
            slots += [seq.block_table[p // bs] * bs + p % bs for p in range(start, start + n)]
            (decode if n == 1 and start > 0 else prefill).append(i)
        width = max((len(seqs[i].block_table) for i in decode), default=1)
        table = [seqs[i].block_table + [0] * (width - len(seqs[i].block_table)) for i in decode]
        t = lambda x, dtype=torch.long: torch.tensor(x, dtype=dtype, device=self.device)  # noqa: E731
        return Batch(seqs, n_tokens, t(ids), t(pos), t(slots), starts, decode, prefill,
                     t(table, torch.int32).view(len(decode), width),
                     t([seqs[i].num_cached_tokens + 1 for i in decode], torch.int32))

    @torch.inference_mode()
    def forward(self, batch: Batch) -> torch.Tensor:
        """Final-normed hidden states (N, D) of every token of the batch; writes their latents into the cache."""
        model, cfg = self.model, self.cfg
        x = model.embed_tokens(batch.input_ids)[None]                       # (1, N, D)
        cos, sin = rope_cos_sin(cfg, batch.positions)
        for i, layer in enumerate(model.layers):
            attn = layer.self_attn
            q_nope, q_pe, c_kv, k_pe = attn.project(layer.input_layernorm(x), cos, sin)
            self.cache.write(i, batch.slots, c_kv[0], k_pe[0])
            out = self._attention(i, attn, q_nope[0], q_pe[0], batch)       # (N, H, Dv)
            x = x + attn.o_proj(out.flatten(1).to(x.dtype))[None]
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return model.norm(x)[0]

    def _attention(self, layer: int, attn, q_nope: torch.Tensor, q_pe: torch.Tensor, batch: Batch) -> torch.Tensor:
        out = q_nope.new_empty(q_nope.shape[0], attn.n_heads, attn.v_dim)
        for i in batch.prefill:
            seq, s, n = batch.seqs[i], batch.starts[i], batch.n_tokens[i]
            past = seq.num_cached_tokens
            table = torch.tensor(seq.block_table, device=q_nope.device)
            c_kv, k_pe = self.cache.gather(layer, table, past + n)
            c_kv, k_pe = c_kv.to(q_nope.dtype), k_pe.to(q_nope.dtype)
            mask = None
            if n > 1:   # chunk token j sits at position past + j and sees positions <= its own
                keys = torch.arange(past + n, device=q_nope.device)
                mask = keys[None, :] <= torch.arange(past, past + n, device=q_nope.device)[:, None]
            out[s:s + n] = attn._attend_naive(q_nope[None, s:s + n], q_pe[None, s:s + n], c_kv[None], k_pe[None],
                                              mask)[0]
        if batch.decode:
            rows = torch.tensor([batch.starts[i] for i in batch.decode], device=q_nope.device)
            w_uk, w_uv = attn.absorbed_weights()
            q_abs = torch.einsum("nhd,hdc->nhc", q_nope[rows], w_uk)
            c_kv, k_pe = self.cache.layer(layer)
            latent = mla_decode(q_abs, q_pe[rows].to(q_abs.dtype), c_kv, k_pe, batch.block_tables,
                                batch.context_lens, attn.softmax_scale)
            out[rows] = torch.einsum("nhc,hdc->nhd", latent.to(w_uv.dtype), w_uv).to(out.dtype)
        return out

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(hidden).float()
