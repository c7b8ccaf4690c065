"""ModelRunner: one forward over a ragged batch of token rows against the paged latent cache.

A row is a run of consecutive positions of one sequence (a prefill chunk, a decode token, or a token + its
speculative drafts). All rows are flattened into one row of N tokens, so every projection, norm and MoE layer runs
once for the whole batch. Attention depends on the row:
- several tokens, or the first of a sequence: the naive MLA form (spec 1.3) over the cached context + the row,
  causal;
- one token with context: the absorbed form (spec 1.4) straight on the paged cache (dsv3.kernels.mla_decode: Triton
  on GPU, the PyTorch reference on CPU).
The model's own modules do the math (`MLA.project`, `_attend_naive`, `absorbed_weights`, the blocks' norms and
FFNs); the runner only routes tokens and cache slots. The MTP module runs the same way on cache layer
`num_hidden_layers`, so its drafts attend over its own latents (spec 1.8).

Decode-sized batches (<= MOE_DECODE_MAX_TOKENS tokens) run their routed experts through the fused MoE kernel
(dsv3.kernels.moe_decode: one launch per GEMM stage, only the selected experts' weights read) when
`EngineConfig.fused_moe` says so. With `compile_decode`, the graph buckets' forward runs each layer's work around
the cache write and the attention kernel (norms, projections, RoPE, routing, experts, residuals) as two
`torch.compile`d functions (fullgraph; one compiled graph per layer kind, reused by every layer: the layer's
modules are graph inputs); the CUDA graph then captures the compiled kernels.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ..kernels.mla_decode import mla_decode
from ..model import Transformer
from ..model.rope import rope_cos_sin
from .cache import PagedLatentCache, slot
from .config import EngineConfig
from .graphs import DecodeGraphs
from .moe_dispatch import fused_moe_available, moe_ffn


@dataclass
class Row:
    tokens: list[int]        # input tokens of this row, at positions past .. past + len - 1
    past: int                # positions already in the cache before this row
    block_table: list[int]


@dataclass
class Batch:
    rows: list[Row]
    input_ids: torch.Tensor        # (N,)
    positions: torch.Tensor        # (N,)
    slots: torch.Tensor            # (N,) flat cache slots the new latents go to
    starts: list[int]              # where each row starts in the flat token row
    decode: list[int]              # single-token rows with context (absorbed form)
    prefill: list[int]             # the others (naive form)
    block_tables: torch.Tensor     # (n_decode, max_blocks) int32
    context_lens: torch.Tensor     # (n_decode,) int32: tokens in cache once this step has written
    decode_rows: torch.Tensor      # (n_decode,) flat index of each decode row's token
    prefill_tables: list[torch.Tensor]   # block table of each prefill row, on the device
    graph_key: tuple[int, int] | None = None   # set when the batch runs from a captured decode graph ...
    graphs: object = None                      # ... of this DecodeGraphs

def _prologue(model: Transformer, input_ids: torch.Tensor, positions: torch.Tensor):
    """Embeddings (1, N, D) and the RoPE cos / sin of the positions."""
    return model.embed_tokens(input_ids)[None], *rope_cos_sin(model.config, positions)


def _pre_attention(layer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """A block up to attention: q_nope, rotated q_pe, normalised c_kv, rotated k_pe (MLA.project)."""
    return layer.self_attn.project(layer.input_layernorm(x), cos, sin)


def _post_attention(layer, x: torch.Tensor, out: torch.Tensor, fused_moe: bool) -> torch.Tensor:
    """A block after attention: output projection and residual, then the FFN (MoE or dense) and residual."""
    x = x + layer.self_attn.o_proj(out.flatten(1).to(x.dtype))[None]
    return x + moe_ffn(layer.mlp, layer.post_attention_layernorm(x), fused_moe)


_EAGER = (_prologue, _pre_attention, _post_attention)


@functools.cache
def _compiled() -> tuple:
    """The compiled forms of _EAGER, made once per process (dynamo keys its cache on the code, not the wrapper).
    Shapes as dynamo's default: the first bucket size static, the token dimension symbolic from the second on
    (one more graph, not one per bucket: compile time is what a benchmark run pays); each layer kind (dense / MoE,
    bf16 / FP8 modules, fused or not) is its own graph, so allow more than dynamo's default 8 per function. The
    compiled code reads sizes on the host only: no sync, so the graphs capture."""
    limit = 64
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, limit)
    torch._dynamo.config.accumulated_recompile_limit = max(torch._dynamo.config.accumulated_recompile_limit, 4 * limit)
    return tuple(torch.compile(f, fullgraph=True) for f in _EAGER)


class ModelRunner:
    def __init__(self, model: Transformer, cache: PagedLatentCache, config: EngineConfig | None = None):
        self.model, self.cache, self.cfg = model, cache, model.config
        self.config = config or EngineConfig()
        self.device = next(model.parameters()).device
        self.block_size = cache.block_size
        self.graphs: DecodeGraphs | None = None       # set by the engine on CUDA: the main model's decode graphs
        self.mtp_graphs: DecodeGraphs | None = None   # and the MTP module's
        self.fused_moe = fused_moe_available(model, self.config.fused_moe)

    def use_graphs(self, max_batch: int, max_blocks: int, scratch_block: int, capture: bool) -> None:
        """Decode batches from padded buckets (dsv3.infer.graphs), their forward compiled with `compile_decode`."""
        compiled = self.config.compile_decode
        self.graphs = DecodeGraphs(self, functools.partial(self.forward_eager, compiled=compiled), max_batch,
                                   max_blocks, scratch_block, capture)
        if len(self.model.mtp):
            self.mtp_graphs = DecodeGraphs(self, functools.partial(self.mtp_forward_eager, compiled=compiled),
                                           max_batch, max_blocks, scratch_block, capture,
                                           extra_width=self.cfg.hidden_size, pool=self.graphs.pool)

    def prepare(self, rows: list[Row], graph: bool = True, mtp: bool = False,
                input_ids: torch.Tensor | None = None) -> Batch:
        """The batch's device tensors, for `forward` (or `mtp_forward` with mtp); `input_ids` (N,) on the device
        replaces the rows' tokens. A pure decode batch goes to a padded graph bucket when graphs are on (its tensors
        are then the bucket's static, padded ones: only forward / mtp_forward may use them)."""
        graphs = self.mtp_graphs if mtp else self.graphs
        if graph and graphs is not None and graphs.fits(rows):
            return graphs.prepare(rows, input_ids)
        batch = self._prepare(rows)
        if input_ids is not None:
            batch.input_ids = input_ids
        return batch

    def _prepare(self, rows: list[Row]) -> Batch:
        ids, pos, slots, starts, decode, prefill = [], [], [], [], [], []
        bs = self.block_size
        for i, row in enumerate(rows):
            n = len(row.tokens)
            starts.append(len(ids))
            ids += row.tokens
            pos += range(row.past, row.past + n)
            slots += [slot(row.block_table, p, bs) for p in range(row.past, row.past + n)]
            (decode if n == 1 and row.past > 0 else prefill).append(i)
        width = max((len(rows[i].block_table) for i in decode), default=1)
        table = [rows[i].block_table + [0] * (width - len(rows[i].block_table)) for i in decode]
        # every host -> device copy happens here, once per step, not once per layer
        t = lambda x, dtype=torch.long: torch.tensor(x, dtype=dtype, device=self.device)  # noqa: E731
        return Batch(rows, t(ids), t(pos), t(slots), starts, decode, prefill,
                     t(table, torch.int32).view(len(decode), width),
                     t([rows[i].past + 1 for i in decode], torch.int32), t([starts[i] for i in decode]),
                     [t(rows[i].block_table) for i in prefill])

    @torch.inference_mode()
    def forward(self, batch: Batch) -> torch.Tensor:
        """Final-normed hidden states (N, D) of every token of the batch; writes their latents into the cache."""
        if batch.graph_key is not None:
            return batch.graphs.run(batch)
        return self.forward_eager(batch)

    def forward_eager(self, batch: Batch, compiled: bool = False) -> torch.Tensor:
        """The forward without graphs; `compiled`: through the torch.compile'd layer functions (static shapes:
        graph buckets only)."""
        model = self.model
        fns = _compiled() if compiled else _EAGER
        x, cos, sin = fns[0](model, batch.input_ids, batch.positions)      # (1, N, D)
        for i, layer in enumerate(model.layers):
            x = self._block(i, layer, x, cos, sin, batch, fns)
        return model.norm(x)[0]

    @torch.inference_mode()
    def mtp_forward(self, batch: Batch, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The first MTP module over the batch: position i combines the main model's hidden state h_i (N, D) with
        the embedding of the row's token (t_{i+1}); returns (logits (N, V) fp32 guessing t_{i+2}, the block's output
        (N, D), which stands in for h when drafts are chained)."""
        if batch.graph_key is not None:
            return batch.graphs.run(batch, hidden)
        return self.mtp_forward_eager(batch, hidden)

    def mtp_forward_eager(self, batch: Batch, hidden: torch.Tensor, compiled: bool = False
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        model = self.model
        module = model.mtp[0]
        emb = model.embed_tokens(batch.input_ids)
        x = module.eh_proj(torch.cat([module.enorm(emb), module.hnorm(hidden.to(emb.dtype))], dim=-1))[None]
        cos, sin = rope_cos_sin(self.cfg, batch.positions)
        fns = _compiled() if compiled else _EAGER
        x = self._block(self.cfg.num_hidden_layers, module, x, cos, sin, batch, fns)[0]
        return self.logits(module.shared_head.norm(x)), x

    def _block(self, index: int, layer, x, cos, sin, batch: Batch, fns: tuple = _EAGER) -> torch.Tensor:
        q_nope, q_pe, c_kv, k_pe = fns[1](layer, x, cos, sin)
        self.cache.write(index, batch.slots, c_kv[0], k_pe[0])
        out = self._attention(index, layer.self_attn, q_nope[0], q_pe[0], batch)     # (N, H, Dv)
        return fns[2](layer, x, out, self.fused_moe)

    def _attention(self, layer: int, attn, q_nope: torch.Tensor, q_pe: torch.Tensor, batch: Batch) -> torch.Tensor:
        out = q_nope.new_empty(q_nope.shape[0], attn.n_heads, attn.v_dim)
        for i, table in zip(batch.prefill, batch.prefill_tables):
            row, s = batch.rows[i], batch.starts[i]
            n, past = len(row.tokens), row.past
            c_kv, k_pe = self.cache.gather(layer, table, past + n)
            c_kv, k_pe = c_kv.to(q_nope.dtype), k_pe.to(q_nope.dtype)
            # row token j sits at position past + j and sees positions <= its own (causal over cache + row)
            out[s:s + n] = attn._attend_naive(q_nope[None, s:s + n], q_pe[None, s:s + n], c_kv[None], k_pe[None])[0]
        if batch.decode:
            rows = batch.decode_rows
            w_uk, w_uv = attn.absorbed_weights()
            q_abs = torch.einsum("nhd,hdc->nhc", q_nope[rows], w_uk)
            c_kv, k_pe = self.cache.layer(layer)
            latent = mla_decode(q_abs, q_pe[rows].to(q_abs.dtype), c_kv, k_pe, batch.block_tables,
                                batch.context_lens, attn.softmax_scale)
            out[rows] = torch.einsum("nhc,hdc->nhd", latent.to(w_uv.dtype), w_uv).to(out.dtype)
        return out

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(hidden).float()
