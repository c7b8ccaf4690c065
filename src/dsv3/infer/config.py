"""EngineConfig: the inference engine's knobs (cache geometry and budget, batching limits, speculation)."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field


@dataclass
class EngineConfig:
    block_size: int = 64               # tokens per cache block (FlashMLA's page size)
    num_blocks: int = 0                # 0: as many as cache_memory_gib holds
    cache_memory_gib: float = 1.0
    max_num_seqs: int = 64             # running sequences at once
    max_num_batched_tokens: int = 2048 # tokens per step: prefill chunks + decode tokens
    max_model_len: int = 0             # 0: the model's max_position_embeddings
    # ids that end a sequence besides the tokenizer's EOS, unless a request sets ignore_eos: a release's
    # generation_config.json `eos_token_id` (a chat model whose turns end with a token other than its tokenizer's
    # EOS, e.g. an <|im_end|>, ran on to max_tokens)
    eos_token_ids: list[int] = field(default_factory=list)
    prefix_caching: bool = True
    # hold newly arrived requests back while others decode, until this many steps have passed since the oldest
    # arrived or they would fill every free slot: one prefill step (eager, on CUDA) for several arrivals instead of
    # one per arrival, which keeps a server's steps pure decode (graph replays). 0: admit at once
    admission_delay: int = 0
    num_speculative_tokens: int = 0    # MTP draft tokens per step (0: off)
    speculative_max_batch: int = 8     # speculation switches off above this many running sequences
    # greedy speculative steps as one body: verify, acceptance and the next drafts on the device, one host read per
    # step, one CUDA graph per bucket (dsv3.infer.spec_step); false: draft, verify and accept as separate steps with
    # host reads between them (the path sampled requests always take)
    speculative_fused: bool = True
    cuda_graphs: bool = True           # on CUDA, decode steps replay captured graphs (dsv3.infer.graphs)
    # every decode graph bucket (batch size x table width) captured when the engine is built, instead of at its first
    # step: a server's batches change size as requests come and go, and a capture (with compile_decode, a recompile)
    # mid-traffic stalls every stream; `dsv3 serve` and `bench serve` turn it on
    capture_graphs_at_start: bool = False
    compile_decode: bool = False       # torch.compile the per-layer work of graph-bucket decode steps (inductor)
    # torch.compile the blocks of steps with prefill rows too (the token count symbolic: no recompile per step):
    # inductor fuses the norms' fp32 upcasts, RoPE, the router's math, the MoE combine, SwiGLU and the residual adds
    # around the GEMMs; attention over the step's rows stays eager (dsv3.infer.runner). Eager, they were 2,736 small
    # kernels and 64 ms of a 148 ms prefill step of 64 x 128-token prompts on lite (H100, issue 16)
    compile_prefill: bool = False
    # routed experts of decode-sized batches in one fused kernel per GEMM stage (dsv3.kernels.moe_decode): "on" (any
    # device; true), "off" (false), "auto" = on a CUDA GPU of sm_89+, for the batch sizes where it measured faster
    # (dsv3.infer.moe_dispatch.FUSED_MOE_AUTO_TOKENS)
    fused_moe: str | bool = "auto"
    # projections sharing an input run as one GEMM without autograd: MLA's q and kv_a, the MLPs' gate and up
    # (dsv3.infer.fused_proj; the weights become views into the concatenated ones, no second copy)
    fuse_projections: bool = True
    # the bf16 projections (those pairs, o_proj, the MLPs' down, lm_head) of a one-token step through the
    # weight-streaming Triton GEMV (dsv3.kernels.gemv) instead of cuBLAS: 1.08-1.50x cuBLAS per projection and +4%
    # tokens/s at lite batch 1 on an H100 (RESULTS.md seventeenth / eighteenth sessions); wider steps keep cuBLAS
    dense_gemv: bool = True
    # the bf16 projections of 2..64-row steps (batch 2-64 decode) through the tiled Triton kernel with split-K
    # (dsv3.kernels.fp8_weight_gemm.dense_linear_triton) instead of cuBLAS, whose few-row kernels read lite's
    # projections at ~0.7 TB/s (H100, batch 32: RESULTS.md). Off: at lite batch 32 on an H200 the step was 0.95x
    # cuBLAS's (3,144 vs 3,302 tok/s, twenty-second session); the H100's A/B is owed (benchmarks/engine_decode.py
    # mode `skinny`)
    skinny_gemm: bool = False
    # the shared experts of a fused-MoE step of <= 2 tokens (batch-1 decode) as one more pair per token inside the
    # fused kernel's GEMV form, their weights read where they are (dsv3.infer.moe_dispatch): 3-4 fewer launches per
    # MoE layer; off: the shared MLP runs after the routed experts and is added (the A/B's before)
    shared_pair: bool = True
    # the host schedules and launches decode step t+1 before it reads step t's sampled tokens, which then stream one
    # step late (dsv3.infer.overlap): "auto" = on when decode steps replay captured CUDA graphs, "on" (any device;
    # true), "off" (false). With MTP speculation the fused greedy steps chain so (dsv3.infer.speculation), the
    # other steps of such an engine run synchronously
    overlap_schedule: str | bool = "auto"
    # decode graphs captured with programmatic dependent launch (sm_90+): each Triton kernel of the step (ours and
    # the compiled layers') launches while the one before it finishes, instead of after (dsv3.kernels.triton_setup);
    # the batch-1 step is ~546 kernels of a few us each (issue 16). Measured on an H100 (RESULTS.md, twenty-fourth
    # session): batch 1 BF16 +5.0%, FP8 +5.7%, batches 32 / 64 unchanged; greedy outputs identical (test_infer_pdl)
    pdl: bool = True

    def __post_init__(self) -> None:
        # a float, string or bool here would pass the range checks below (8.5 >= 1, True >= 1) and fail deep in
        # the cache's allocation or the scheduler's arithmetic: refuse it naming the field
        for name in ("block_size", "num_blocks", "max_num_seqs", "max_num_batched_tokens", "max_model_len",
                     "admission_delay", "num_speculative_tokens", "speculative_max_batch"):
            value = getattr(self, name)
            if not isinstance(value, numbers.Integral) or isinstance(value, bool):
                raise ValueError(f"EngineConfig.{name} must be an integer, got {value!r}")
        # a string is truthy: "false" would switch the feature on
        for name in ("prefix_caching", "speculative_fused", "cuda_graphs", "capture_graphs_at_start",
                     "compile_decode", "compile_prefill", "fuse_projections", "dense_gemv", "skinny_gemm",
                     "shared_pair", "pdl"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"EngineConfig.{name} must be true or false, got {getattr(self, name)!r}")
        ids = self.eos_token_ids
        if not isinstance(ids, (list, tuple)) or not all(isinstance(i, numbers.Integral) and not isinstance(i, bool)
                                                         and i >= 0 for i in ids):
            raise ValueError(f"EngineConfig.eos_token_ids must be a list of token ids (integers >= 0), got {ids!r}")
        self.eos_token_ids = [int(i) for i in ids]
        gib = self.cache_memory_gib
        if not isinstance(gib, numbers.Real) or isinstance(gib, bool) or not math.isfinite(gib):
            raise ValueError(f"EngineConfig.cache_memory_gib must be a finite number, got {gib!r}")
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"EngineConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("num_blocks", "max_model_len", "num_speculative_tokens", "speculative_max_batch",
                     "admission_delay"):
            if getattr(self, name) < 0:
                raise ValueError(f"EngineConfig.{name} must be >= 0, got {getattr(self, name)}")
        # TOML and JSON spell the switch as a boolean: true / false stand for on / off
        for name in ("fused_moe", "overlap_schedule"):
            value = getattr(self, name)
            mode = {True: "on", False: "off", "true": "on", "false": "off"}.get(value, value)
            if mode not in ("auto", "on", "off"):
                raise ValueError(f"EngineConfig.{name} must be auto, on / true or off / false, got {value!r}")
            setattr(self, name, mode)
        if self.num_blocks == 0 and self.cache_memory_gib <= 0:
            raise ValueError("EngineConfig: give num_blocks or a positive cache_memory_gib")


@dataclass
class ExpertParallelConfig:
    """Serving over an EP group (dsv3.infer.ep_engine): expert placement and its live rebalancing (EPLB)."""
    redundant_experts: int = 0         # physical slots per MoE layer beyond n_routed_experts (total: multiple of ep)
    rebalance_interval: int = 0        # steps per load window; a new placement after each (0: placement fixed)
    num_nodes: int = 1                 # EPLB: nodes of the group (hierarchical policy when it divides n_group)
    two_batch_overlap: bool = False    # split each step into two micro-batches overlapping compute and all-to-all

    def __post_init__(self) -> None:
        for name in ("redundant_experts", "rebalance_interval"):
            if getattr(self, name) < 0:
                raise ValueError(f"ExpertParallelConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.num_nodes < 1:
            raise ValueError(f"ExpertParallelConfig.num_nodes must be >= 1, got {self.num_nodes}")
