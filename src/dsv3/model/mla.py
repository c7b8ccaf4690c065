"""Multi-head Latent Attention (spec 1.3, 1.4) and its contiguous latent cache.

Shapes: B batch, T new tokens, S keys (cached + new), H heads, C = kv_lora_rank, R = qk_rope_head_dim,
Dn = qk_nope_head_dim, Dv = v_head_dim, D = hidden_size.

Both forms compute the same function:
- naive (training / prefill): expand c_kv through kv_b_proj into per-head K (Dn + R) and V (Dv), then causal
  attention without an S x S score matrix (dsv3.model.attention: fused SDPA, or query blocks after a cache).
- absorbed (decode): fold W_UK into the query and W_UV after the value sum, so attention runs directly on the
  cache of C + R values per token (576 for V3) shared by all heads:
      q_abs = q_nope @ W_UK[h]; score = (q_abs . c_kv + q_pe . k_pe) * scale; o = (p @ c_kv) @ W_UV[h]^T
  This is the naive form by associativity; only the order of the matmuls changes.
The cache always holds the *normalised* c_kv and the *rotated* k_pe (spec 9.3), whichever form reads it.

With an `AttentionContext` (dsv3.model.context) the latents live in a paged cache instead, and each token of a
ragged batch attends in the form the context names: naive over its row's gathered context, or absorbed on the paged
cache itself (an inference engine's decode step).
"""

import torch
from torch import nn

from ..config import ModelConfig
from .layers import RMSNorm, upcast
from .attention import causal_attention
from .context import AttentionContext, PrefillGroup
from .rope import apply_rope

LATENT_NORM_EPS = 1e-6     # q_a_layernorm / kv_a_layernorm (see MLA.__init__)


class LatentCache:
    """Per-layer contiguous latent cache for the reference generate(): c_kv (L, B, S_max, C), k_pe (L, B, S_max, R).

    The inference engine replaces this with a paged cache; the model only ever sees one layer's (c_kv, k_pe) pair.
    """

    def __init__(self, cfg: ModelConfig, batch_size: int, max_seq_len: int, n_layers: int | None = None,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        n = cfg.num_hidden_layers + cfg.num_nextn_predict_layers if n_layers is None else n_layers
        self.max_seq_len = max_seq_len
        self.c_kv = torch.zeros(n, batch_size, max_seq_len, cfg.kv_lora_rank, dtype=dtype, device=device)
        self.k_pe = torch.zeros(n, batch_size, max_seq_len, cfg.qk_rope_head_dim, dtype=dtype, device=device)

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.c_kv[i], self.k_pe[i]


class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        H, D = cfg.num_attention_heads, cfg.hidden_size
        self.n_heads, self.nope_dim = H, cfg.qk_nope_head_dim
        self.rope_dim, self.v_dim = cfg.qk_rope_head_dim, cfg.v_head_dim
        self.kv_lora_rank = cfg.kv_lora_rank
        self.softmax_scale = cfg.softmax_scale
        qk_dim = cfg.qk_head_dim
        # the latent norms keep RMSNorm's default eps whatever rms_norm_eps says, as DeepSeek's reference, the released
        # modeling_deepseek.py (DeepSeek's, Moonshot's) and transformers build them (Moonlight: rms_norm_eps 1e-5)
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(D, H * qk_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(D, cfg.q_lora_rank, bias=cfg.attention_bias)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, H * qk_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(D, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=cfg.attention_bias)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, LATENT_NORM_EPS)
        self.kv_b_proj = nn.Linear(cfg.kv_lora_rank, H * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False)
        self.o_proj = nn.Linear(H * cfg.v_head_dim, D, bias=cfg.attention_bias)

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """x (B, T, D) -> q_nope (B, T, H, Dn), rotated q_pe (B, T, H, R), normalised c_kv (B, T, C) and rotated
        k_pe (B, T, R): everything a token contributes before attention (the latent pair is what a cache keeps)."""
        B, T, _ = x.shape
        q, kv = self.project_inputs(x)
        if not hasattr(self, "q_proj"):
            q = self.q_b_proj(self.q_a_layernorm(q))
        q = q.view(B, T, self.n_heads, self.nope_dim + self.rope_dim)
        q_nope, q_pe = q.split([self.nope_dim, self.rope_dim], dim=-1)
        q_pe = apply_rope(q_pe, cos, sin)
        c_kv, k_pe = kv.split([self.kv_lora_rank, self.rope_dim], dim=-1)
        c_kv = self.kv_a_layernorm(c_kv)
        k_pe = apply_rope(k_pe.unsqueeze(2), cos, sin).squeeze(2)       # one key for all heads
        return q_nope, q_pe, c_kv, k_pe

    def project_inputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The two projections of the block's normed input: q's (q_a's with a q LoRA) and kv_a's (c_kv | k_pe).
        They share x, so a decode engine may run them as one GEMM (dsv3.infer.fused_proj overrides this)."""
        first = self.q_proj if hasattr(self, "q_proj") else self.q_a_proj
        return first(x), self.kv_a_proj_with_mqa(x)

    def absorbed_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W_UK (H, Dn, C) and W_UV (H, Dv, C): kv_b_proj split per head, for the absorbed form (spec 1.4)."""
        w = self.kv_b_proj.weight.view(self.n_heads, self.nope_dim + self.v_dim, self.kv_lora_rank)
        return w[:, :self.nope_dim], w[:, self.nope_dim:]

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: tuple[torch.Tensor, torch.Tensor] | None = None, start_pos: int = 0,
                absorb: bool = False, ctx: AttentionContext | None = None) -> torch.Tensor:
        """x (B, T, D) at positions start_pos..start_pos+T-1; cache = one layer's (c_kv, k_pe) buffers, holding
        positions 0..start_pos-1 already. Without a cache, start_pos only offsets the RoPE positions.
        With `ctx`: x (1, N, D) is a ragged batch at the positions cos / sin were made for, its latents go to the
        context's paged cache, and cache / start_pos / absorb are not used."""
        B, T, _ = x.shape
        q_nope, q_pe, c_kv, k_pe = self.project(x, cos, sin)
        if ctx is not None:
            return self.o_proj(self._attend_paged(q_nope[0], q_pe[0], c_kv[0], k_pe[0], ctx).flatten(1))[None]

        if cache is not None:
            cache_c_kv, cache_k_pe = cache
            end = start_pos + T
            if end > cache_c_kv.shape[1]:
                raise ValueError(f"latent cache holds {cache_c_kv.shape[1]} positions, need {end}")
            cache_c_kv[:B, start_pos:end] = c_kv.to(cache_c_kv.dtype)
            cache_k_pe[:B, start_pos:end] = k_pe.to(cache_k_pe.dtype)
            c_kv, k_pe = cache_c_kv[:B, :end].to(x.dtype), cache_k_pe[:B, :end].to(x.dtype)

        # Query i sits at position start_pos + i and sees the keys at positions <= its own (causal; packed documents
        # are not masked from each other, TR 4.1). Without a cache the keys are just these T tokens.
        attend = self._attend_absorbed if absorb else self._attend_naive
        out = attend(q_nope, q_pe, c_kv, k_pe)                          # (B, T, H, Dv)
        return self.o_proj(out.flatten(2))

    def _attend_naive(self, q_nope, q_pe, c_kv, k_pe):
        """Queries (B, T, H, .) at the last T of the S cached positions; per-head K and V expanded from c_kv, then
        causal attention without an S x S score matrix (dsv3.model.attention)."""
        B, S, H = c_kv.shape[0], c_kv.shape[1], self.n_heads
        kv = self.kv_b_proj(c_kv).view(B, S, H, self.nope_dim + self.v_dim)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        k = torch.cat([k_nope, k_pe[:, :, None].expand(B, S, H, self.rope_dim)], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1)
        out = causal_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), self.softmax_scale)
        return out.transpose(1, 2)

    def _attend_paged(self, q_nope, q_pe, c_kv, k_pe, ctx: AttentionContext) -> torch.Tensor:
        """The N tokens of a ragged batch (N, H, .) / (N, C) / (N, R) against the context's paged cache: (N, H, Dv).

        1. every token's latents go to its slot first: a row attends over its own tokens too (a pure decode step
           hands them to the cache's decode instead, which stores them in the attention's own launch: 2 x layers
           fewer launches a step, +4% / +8% BF16 / FP8 tokens/s at lite batch 1, RESULTS.md eighteenth session);
        2. naive rows: fresh ones (no cached context) a group of similar lengths at a time over their own latents
           (dsv3.model.context.PrefillGroup); the others one by one, the row's context gathered contiguous, causal
           over cache + row (row token j sits at position past + j and sees positions <= its own);
        3. absorbed rows (one token with context): the same math as `_attend_absorbed`, with the attention itself
           run by the cache on its pages."""
        if ctx.decode_rows is None:               # a pure decode step: every token, in order
            return self._attend_absorbed_paged(q_nope, q_pe, ctx, append=(ctx.slots, c_kv, k_pe))
        return self._attend_rows(q_nope, q_pe, c_kv, k_pe, ctx)

    @torch.compiler.disable
    def _attend_rows(self, q_nope, q_pe, c_kv, k_pe, ctx: AttentionContext) -> torch.Tensor:
        """Steps 1-3 of `_attend_paged` for a step with naive rows. Opaque to dynamo, as the cache's methods are: a
        compiled block (an engine's compiled prefill) breaks its graph here once, around attention, instead of
        unrolling the loops over the step's groups and rows, whose count, lengths and index tensors change every
        step (a recompile per step); the norms, RoPE and projections before and the FFN after stay compiled."""
        ctx.cache.write(ctx.layer, ctx.slots, c_kv, k_pe)
        out = q_nope.new_empty(q_nope.shape[0], self.n_heads, self.v_dim)
        for g in ctx.groups:                     # fresh rows: their context is their own latents, no gather
            self._attend_group(g, (q_nope, q_pe, c_kv, k_pe), out)
        for row in ctx.prefill:
            s, n = row.start, row.length
            c_ctx, k_ctx = ctx.cache.gather(ctx.layer, row.block_table, row.past + n)
            c_ctx, k_ctx = c_ctx.to(q_nope.dtype), k_ctx.to(q_nope.dtype)
            out[s:s + n] = self._attend_naive(q_nope[None, s:s + n], q_pe[None, s:s + n], c_ctx[None], k_ctx[None])[0]
        rows = ctx.decode_rows
        if rows.numel():
            out[rows] = self._attend_absorbed_paged(q_nope[rows], q_pe[rows], ctx)
        return out

    def _attend_group(self, g: PrefillGroup, inputs: tuple, out: torch.Tensor) -> None:
        """Fresh rows (N, .) inputs as one (rows, length) batch in the naive form, written to their places of out."""
        if g.index is None:
            span = slice(g.start, g.start + g.rows * g.length)
            out[span] = self._attend_naive(*(t[span].unflatten(0, (g.rows, g.length)) for t in inputs)).flatten(0, 1)
        else:
            out[g.dst] = self._attend_naive(*(t[g.index] for t in inputs)).flatten(0, 1)[g.keep]

    def _attend_absorbed_paged(self, q_nope, q_pe, ctx: AttentionContext, append=None) -> torch.Tensor:
        """One query token per decode row (n, H, .) -> (n, H, Dv): q_abs = q_nope W_UK, attention on the latents,
        then W_UV (spec 1.4); `append` as the cache's decode takes it."""
        w_uk, w_uv = self.absorbed_weights()                              # (H, Dn, C), (H, Dv, C)
        # one GEMM per head on the strided views: no copy of q_nope (a slice of the q projection) first
        q_abs = torch.bmm(q_nope.transpose(0, 1), w_uk).transpose(0, 1)  # (n, H, C)
        latent = ctx.cache.decode(ctx.layer, q_abs, q_pe.to(q_abs.dtype), ctx.block_tables, ctx.context_lens,
                                  self.softmax_scale, append=append)
        return torch.einsum("nhc,hdc->nhd", latent.to(w_uv.dtype), w_uv).to(q_nope.dtype)

    def _attend_absorbed(self, q_nope, q_pe, c_kv, k_pe):
        T, S = q_nope.shape[1], c_kv.shape[1]
        w_uk, w_uv = self.absorbed_weights()                              # (H, Dn, C), (H, Dv, C)
        q_abs = torch.einsum("bthd,hdc->bthc", q_nope, w_uk)
        scores = upcast(torch.einsum("bthc,bsc->bths", q_abs, c_kv) +
                        torch.einsum("bthr,bsr->bths", q_pe, k_pe)) * self.softmax_scale
        if T > 1:   # the decode form: a (T, S) mask is fine for the few tokens of a decode or verify step
            mask = torch.arange(S, device=c_kv.device)[None, :] <= torch.arange(S - T, S, device=c_kv.device)[:, None]
            scores = scores.masked_fill(~mask[None, :, None, :], float("-inf"))
        p = scores.softmax(dim=-1).to(c_kv.dtype)
        x = torch.einsum("bths,bsc->bthc", p, c_kv)
        return torch.einsum("bthc,hdc->bthd", x, w_uv)
