"""ModelRunner: one forward over a ragged batch of token rows against the paged latent cache.

All rows are flattened into one row of N tokens (dsv3.infer.batch), so every projection, norm and MoE layer runs
once for the whole batch. The runner calls the model's own blocks (and the MTP module) with the batch's attention
context (dsv3.model.context): MLA writes each token's latents to its slot and attends per row in the form the
context names, naive over the gathered context for prefill rows (spec 1.3), absorbed on the paged cache for one
token with context (spec 1.4; dsv3.kernels.mla_decode: Triton on GPU, the PyTorch reference on CPU). The MTP module
runs the same way on cache layer `num_hidden_layers`, so its drafts attend over its own latents (spec 1.8).

Decode-sized batches (<= MOE_DECODE_MAX_TOKENS tokens) run their routed experts through the fused MoE kernel
(dsv3.kernels.moe_decode: one launch per GEMM stage, only the selected experts' weights read) when
`EngineConfig.fused_moe` says so for the batch's token count (moe_dispatch.fused_moe_for: "auto" picks per decode-graph
bucket): the blocks' `ffn` seam. With `compile_decode`, the graph buckets' forward runs each
block through `torch.compile` (one compiled function for every layer: the layer's modules are graph inputs, one
graph per layer kind). The cache's write and decode attention are opaque to dynamo (dsv3.infer.cache), so each block
compiles into the graphs around them, and nothing else may break a graph (tests/test_infer_decode_compile.py checks
the break reasons); the CUDA graph then captures the compiled kernels.

With `compile_prefill`, steps with prefill rows (no graph: N changes every step) run through the same compiled
functions, the token dimension marked dynamic, so a new prompt length is no new compile. Why: eager, a prefill step
of 64 x 128-token prompts on lite took 148 ms on an H100, GPU-bound, 64 ms of it in 2,736 small elementwise / cast /
copy kernels (RMSNorm's fp32 upcasts, RoPE, the router's math, the MoE combine in fp32, SwiGLU, residual adds: ~100
per layer) beside 59 ms of GEMMs (issue 16); compiled, inductor fuses them into the kernels around the GEMMs. The
attention of such a step (loops over the step's row groups and rows, dsv3.model.mla `_attend_rows`) is opaque to
dynamo like the cache's methods: each block breaks its graphs there once and compiles the rest.
"""

from __future__ import annotations

import functools

import torch

from ..model import Transformer
from ..model.context import AttentionContext
from ..model.rope import rope_cos_sin
from .batch import Batch, Row, make_batch, padding_row
from .cache import PagedLatentCache
from .config import EngineConfig
from .graphs import DecodeGraphs
from .moe_dispatch import (fused_moe_available, fused_moe_ffn, fused_moe_ffn_shared_apart, fused_moe_for,
                           model_has_fp8_experts)
from .spec_step import greedy_spec_step

__all__ = ["Batch", "ModelRunner", "Row", "padding_row"]


def _prologue(model: Transformer, input_ids: torch.Tensor, positions: torch.Tensor):
    """Embeddings (1, N, D) and the RoPE cos / sin of the positions."""
    return model.embed_tokens(input_ids)[None], *rope_cos_sin(model.config, positions)


def _layer(layer, inputs: tuple, cos: torch.Tensor, sin: torch.Tensor, ctx: AttentionContext, ffn):
    """A block (inputs (x,)) or the MTP module (inputs (h, emb)), the model's own forward."""
    return layer(*inputs, cos, sin, ctx=ctx, ffn=ffn)


_EAGER = (_prologue, _layer)


def _dynamic_tokens(on: bool, *tensors: torch.Tensor, dim: int = 0) -> tuple[torch.Tensor, ...]:
    """The tensors, their token dimension `dim` marked dynamic for dynamo when `on` (a prefill step): the first
    compile of a frame is then for any N, not N's value (dynamo's default: static first, symbolic from the second
    size on). `maybe_`: a frame whose code fixes N anyway (N = 1) specialises instead of failing."""
    if on:
        for t in tensors:
            torch._dynamo.maybe_mark_dynamic(t, dim)
    return tensors


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
    return tuple(torch.compile(f) for f in _EAGER)


class ModelRunner:
    def __init__(self, model: Transformer, cache: PagedLatentCache, config: EngineConfig | None = None):
        self.model, self.cache, self.cfg = model, cache, model.config
        self.config = config or EngineConfig()
        self.device = next(model.parameters()).device
        self.graphs: DecodeGraphs | None = None       # set by the engine on CUDA: the main model's decode graphs
        self.mtp_graphs: DecodeGraphs | None = None   # and the MTP module's
        self.spec_graphs: DecodeGraphs | None = None  # and the fused greedy speculative step's (dsv3.infer.spec_step)
        self.fused_moe = fused_moe_available(model, self.config.fused_moe)    # for some batch sizes at least
        self.fp8_experts = model_has_fp8_experts(model)     # auto follows the launch table's FP8 rows then

    def ffn(self, tokens: int):
        """The blocks' FFN seam for a forward of `tokens` tokens: the fused MoE call (with the shared experts inside
        it at batch 1 unless `EngineConfig.shared_pair` is off), or None (the module's forward). A graph bucket's
        size is fixed, so each captured graph holds one of the two."""
        if not fused_moe_for(self.config.fused_moe, self.fused_moe, tokens, self.fp8_experts):
            return None
        return fused_moe_ffn if self.config.shared_pair else fused_moe_ffn_shared_apart

    def use_graphs(self, max_batch: int, max_blocks: int, capture: bool) -> None:
        """Decode batches from padded buckets (dsv3.infer.graphs), their forward compiled with `compile_decode`;
        with speculation, the fused greedy step's buckets too (k+1 rows per sequence, speculative_max_batch
        sequences at most)."""
        compiled, k = self.config.compile_decode, self.config.num_speculative_tokens
        pdl = self.config.pdl
        self.graphs = DecodeGraphs(self.cache, functools.partial(self.forward_eager, compiled=compiled), max_batch,
                                   max_blocks, capture, pdl=pdl)
        if len(self.model.mtp):
            self.mtp_graphs = DecodeGraphs(self.cache, functools.partial(self.mtp_forward_eager, compiled=compiled),
                                           max_batch, max_blocks, capture, extra_width=self.cfg.hidden_size,
                                           pool=self.graphs.pool, pdl=pdl)
        if k and self.config.speculative_fused and len(self.model.mtp):
            self.spec_graphs = DecodeGraphs(self.cache, functools.partial(self.spec_step_eager, compiled=compiled),
                                            max(self.config.speculative_max_batch, 1), max_blocks, capture,
                                            pool=self.graphs.pool, group=k + 1, pdl=pdl)

    def all_graphs(self) -> list[DecodeGraphs]:
        return [g for g in (self.graphs, self.mtp_graphs, self.spec_graphs) if g is not None]

    def prepare(self, rows: list[Row], graph: bool = True, mtp: bool = False,
                input_ids: torch.Tensor | None = None, spec: bool = False,
                advance: torch.Tensor | None = None) -> Batch:
        """The batch's device tensors, for `forward` (or `mtp_forward` with mtp, `spec_step` with spec); `input_ids`
        (N,) on the device replaces the rows' tokens; `advance` (N,) on the device: Batch.advance (spec_step only).
        A pure decode batch goes to a padded graph bucket when graphs are on (its tensors are then the bucket's
        static, padded ones: only forward / mtp_forward / spec_step may use them)."""
        graphs = self.spec_graphs if spec else self.mtp_graphs if mtp else self.graphs
        if graph and graphs is not None and graphs.fits(rows):
            return graphs.prepare(rows, input_ids, advance)
        batch = make_batch(rows, self.cache, self.device)
        if input_ids is not None:
            batch.input_ids = input_ids
        batch.advance = advance
        return batch

    @torch.inference_mode()
    def forward(self, batch: Batch) -> torch.Tensor:
        """Final-normed hidden states (N, D) of every token of the batch; writes their latents into the cache."""
        if batch.graph_key is not None:
            return batch.graphs.run(batch)
        return self.forward_eager(batch)

    def compiles_prefill(self, batch: Batch) -> bool:
        """Whether this batch runs through the compiled functions as a step with prefill rows (`compile_prefill`)."""
        return self.config.compile_prefill and batch.ctx.decode_rows is not None

    def forward_eager(self, batch: Batch, compiled: bool = False) -> torch.Tensor:
        """The forward without graphs; `compiled`: through the torch.compile'd functions (graph buckets), as a step
        with prefill rows is with `compile_prefill` (its token dimension dynamic)."""
        model = self.model
        prefill = self.compiles_prefill(batch)
        prologue, layer_fn = _compiled() if compiled or prefill else _EAGER
        x, cos, sin = prologue(model, *_dynamic_tokens(prefill, batch.input_ids, batch.positions))  # (1, N, D)
        cos, sin = _dynamic_tokens(prefill, cos, sin)       # the same tensors for every layer: marked once
        ffn = self.ffn(batch.input_ids.numel())
        for i, layer in enumerate(model.layers):
            x = layer_fn(layer, _dynamic_tokens(prefill, x, dim=1), cos, sin, batch.ctx.at(i), ffn)
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
        prefill = self.compiles_prefill(batch)
        prologue, layer_fn = _compiled() if compiled or prefill else _EAGER
        emb, cos, sin = prologue(model, *_dynamic_tokens(prefill, batch.input_ids, batch.positions))  # (1, N, D)
        ctx = batch.ctx.at(self.cfg.num_hidden_layers)                        # the MTP module's own latents
        inputs = _dynamic_tokens(prefill, hidden[None].to(emb.dtype), emb, dim=1)
        x = layer_fn(module, inputs, *_dynamic_tokens(prefill, cos, sin), ctx, self.ffn(batch.input_ids.numel()))[0]
        return self.logits(module.shared_head.norm(x)), x

    @torch.inference_mode()
    def spec_step(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """The fused greedy speculative step (dsv3.infer.spec_step) over B sequences' k+1 verify rows each (input ids
        [t_L, drafts]): out (B, 2k + 3) int64 (emitted tokens, accepted count, the next step's input ids) and the
        main model's hidden state at each sequence's last accepted position (B, D)."""
        if batch.graph_key is not None:
            return batch.graphs.run(batch)
        return self.spec_step_eager(batch)

    def spec_step_eager(self, batch: Batch, compiled: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        return greedy_spec_step(self, self.config.num_speculative_tokens, batch, compiled)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(hidden).float()
