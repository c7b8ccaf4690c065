"""`dsv3 plan`: what a parallel layout costs per GPU, before anything runs (spec section 5, TR 3.2-3.3).

Given a model config, a cluster and a layout (pipeline ranks `pp`, data-parallel ranks `dp` = GPUs / pp, expert
parallelism `ep` dividing dp, ZeRO-1 over dp) it computes, for the most loaded pipeline rank:
- parameters, counted from the config's shapes (embedding on the first stage; final norm, head and MTP on the last);
  routed experts split over ep; DualPipe keeps two chunks per rank (TR Table 2: 2x parameters), DualPipeV two
  chunks of a model cut into 2 pp chunks (so 1x of a pp-way split);
- memory: BF16 weights, FP32 gradients, ZeRO-1 optimizer state (FP32 master + two moments, BF16 or FP32) sharded
  over dp (replicated parameters) or dp / ep (experts), and activations of the micro-batches in flight (1F1B: pp,
  DualPipe: pp + 1, DualPipeV: 2 pp + 1 of its half-size chunks; TR Table 2) of the rank's larger chunk (an upper
  bound), from a per-token estimate that assumes the report's choices (FP8 caching of the inputs of linears,
  recomputation of RMSNorm and the MLA up-projections), the MTP block counted on the last chunk;
- traffic per step: expert all-to-all over InfiniBand (node-limited routing: a token reaches at most topk_group
  nodes while a group fits in a node; dispatch in FP8 with its 1x128 scales, combine in BF16, forward and
  backward), pipeline sends (BF16 hidden states, both directions), ZeRO-1 reduce-scatter of gradients and
  all-gather of weights. DualPipe sends half the micro-batches from each end, so each crosses one of a rank's two
  chunks; DualPipeV's V crosses both;
- the pipeline bubble (TR Table 2) for 1F1B, ZB1P and DualPipe in units of a chunk's forward time;
- time and cost (`training_cost`): training FLOPs per token (6 x the activated matmul parameters, MTP included, plus
  the causal attention core), then step time, GPU-hours and cost per trillion tokens at a stated MFU of a stated
  peak. The report's 180K H800-hours per trillion tokens (TR Table 1; 3.7 days on 2048 GPUs, $2 per GPU-hour) is
  what V3 gives at about 40% MFU of the H800's 989 dense BF16 TFLOPS (tests/test_parallel_plan.py): an implied
  figure, the report states no MFU.

The activation estimate is a model, not a measurement: it is written out term by term in `activation_bytes_per_token`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..config import ModelConfig

GiB = 2**30


@dataclass
class Cluster:
    gpus: int
    gpus_per_node: int = 8
    memory_gib: float = 80.0
    nvlink_gbps: float = 160.0     # GB/s per GPU, intra-node (TR 3.2.2: H800 NVLink 160 GB/s)
    ib_gbps: float = 50.0          # GB/s per GPU, inter-node (IB 50 GB/s)


@dataclass
class Layout:
    pp: int = 1
    ep: int = 1
    schedule: str = "1f1b"          # 1f1b | dualpipe | dualpipev
    micro_batch: int = 1            # sequences per micro-batch
    seq_len: int = 4096
    micro_batches: int = 8          # per pipeline per step
    moment_bytes: int = 2           # BF16 AdamW moments (TR 3.3.3); 4 for FP32


def _positive(values: dict[str, float]) -> None:
    """Refuse, naming the flag, a value that must be > 0: a zero divides by zero further on, a negative one gives a
    negative cost or memory limit."""
    for flag, v in values.items():
        if not v > 0:
            raise ValueError(f"{flag} must be > 0, got {v}")


def layer_params(cfg: ModelConfig, moe: bool) -> tuple[int, int]:
    """(replicated, routed-expert) parameter counts of one decoder layer."""
    D, H = cfg.hidden_size, cfg.num_attention_heads
    qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
    q = (D * cfg.q_lora_rank + cfg.q_lora_rank + cfg.q_lora_rank * H * qk) if cfg.q_lora_rank else D * H * qk
    kv = D * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) + cfg.kv_lora_rank \
        + cfg.kv_lora_rank * H * (cfg.qk_nope_head_dim + cfg.v_head_dim)
    attn = q + kv + H * cfg.v_head_dim * D + 2 * D                       # + input / post-attention norms
    if not moe:
        return attn + 3 * D * cfg.intermediate_size, 0
    expert = 3 * D * cfg.moe_intermediate_size
    return attn + cfg.n_routed_experts * D + cfg.n_shared_experts * expert, cfg.n_routed_experts * expert


def stage_layers(cfg: ModelConfig, stages: int) -> list[list[int]]:
    """Decoder layers of each pipeline stage: contiguous, the first `L % stages` stages one layer longer."""
    L = cfg.num_hidden_layers
    base, extra = divmod(L, stages)
    out, start = [], 0
    for s in range(stages):
        n = base + (s < extra)
        out.append(list(range(start, start + n)))
        start += n
    return out


def stage_params(cfg: ModelConfig, stages: int) -> list[tuple[int, int]]:
    """(replicated, expert) parameters per stage, embedding on the first, norm + head + MTP on the last."""
    V, D = cfg.vocab_size, cfg.hidden_size
    out = []
    for s, layers in enumerate(stage_layers(cfg, stages)):
        rep = exp = 0
        for i in layers:
            r, e = layer_params(cfg, cfg.is_moe_layer(i))
            rep, exp = rep + r, exp + e
        if s == 0:
            rep += V * D
        if s == stages - 1:
            rep += D + V * D
            for _ in range(cfg.num_nextn_predict_layers):     # MTP: 2 norms, eh_proj, a MoE block, head norm
                r, e = layer_params(cfg, True)
                rep, exp = rep + 3 * D + 2 * D * D + r, exp + e
        out.append((rep, exp))
    return out


def activation_bytes_per_token(cfg: ModelConfig, moe: bool) -> int:
    """Bytes kept for backward per token per layer under the report's choices (an estimate):
    residual input (BF16), the MLA latents c_q, c_kv, k_pe (BF16; the up-projections are recomputed), the attention
    output (FP8, o_proj's input) and softmax statistics (FP32 per head); then the FFN: inputs of the linears in FP8
    and the SwiGLU input (gate and up outputs, FP8: SwiGLU is recomputed), for a MoE layer top-k routed copies plus
    the shared expert, the router's scores (FP32) and the combine weights."""
    D, H = cfg.hidden_size, cfg.num_attention_heads
    attn = 2 * D + 2 * ((cfg.q_lora_rank or 0) + cfg.kv_lora_rank + cfg.qk_rope_head_dim) \
        + H * cfg.v_head_dim + 4 * H
    if not moe:
        return attn + D + 2 * cfg.intermediate_size + D
    k, I = cfg.num_experts_per_tok, cfg.moe_intermediate_size
    routed = k * (D + 2 * I + I)                      # dispatched input, SwiGLU input, down_proj input (FP8)
    shared = cfg.n_shared_experts * (D + 3 * I)
    return attn + D + routed + shared + 4 * cfg.n_routed_experts + 4 * k


def bubble(pp: int, schedule: str, f: float = 1.0, b: float = 2.0, w: float = 1.0, fb: float | None = None) -> float:
    """Pipeline bubble (TR Table 2) in units of F; `fb`: an overlapped forward+backward chunk (default F + B)."""
    fb = f + b if fb is None else fb
    if pp == 1 and schedule in ("1f1b", "zb1p", "dualpipe", "dualpipev"):
        return 0.0                                        # no pipeline, no bubble
    if schedule == "1f1b":
        return (pp - 1) * (f + b)
    if schedule == "zb1p":
        return (pp - 1) * (f + b - 2 * w)
    if schedule in ("dualpipe", "dualpipev"):
        return (pp / 2 - 1) * (fb + b - 3 * w)
    raise ValueError(f"unknown schedule {schedule!r}; use 1f1b, zb1p, dualpipe or dualpipev")


def flops_per_token(cfg: ModelConfig, seq_len: int) -> dict[str, float]:
    """Training FLOPs per token (forward + backward = 3 x forward): the matmuls of the activated parameters (2 per
    multiply-add, the embedding lookup excluded, the head and the MTP modules' layers, eh_proj and second head
    included) and the causal attention core (QK^T and PV over seq_len / 2 keys on average)."""
    D, V, K, E = cfg.hidden_size, cfg.vocab_size, cfg.num_experts_per_tok, cfg.n_routed_experts
    layers = list(range(cfg.num_hidden_layers)) + [cfg.num_hidden_layers - 1] * cfg.num_nextn_predict_layers
    active = 0.0
    for i in layers:                      # an MTP module is a MoE block like the last layer
        rep, exp = layer_params(cfg, cfg.is_moe_layer(i))
        active += rep + exp * K / E
    active += D * V * (1 + cfg.num_nextn_predict_layers) + 2 * D * D * cfg.num_nextn_predict_layers
    attn = 2 * cfg.num_attention_heads * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim) \
        * seq_len / 2 * len(layers)
    return {"activated_matmul_params": active, "matmul": 6 * active, "attention": 3 * attn,
            "total": 6 * active + 3 * attn}


def training_cost(cfg: ModelConfig, gpus: int, mfu: float, peak_tflops: float = 989.0, seq_len: int = 4096,
                  batch_tokens: float = 15360 * 4096, price_per_gpu_hour: float = 2.0) -> dict[str, float]:
    """Step time, GPU-hours, days and cost per trillion tokens at `mfu` of `peak_tflops` per GPU (default: the
    H800's dense BF16 peak; the report's batch 15360 x 4096, $2 per GPU-hour)."""
    if not 0 < mfu <= 1:
        raise ValueError(f"mfu={mfu} must be in (0, 1]")
    _positive({"--gpus": gpus, "--peak-tflops": peak_tflops, "--seq-len": seq_len, "batch_tokens": batch_tokens})
    if not price_per_gpu_hour >= 0:
        raise ValueError(f"--price must be >= 0, got {price_per_gpu_hour}")
    f = flops_per_token(cfg, seq_len)["total"]
    per_gpu = peak_tflops * 1e12 * mfu
    hours = 1e12 * f / per_gpu / 3600
    return {"flops_per_token": f, "mfu": mfu, "peak_tflops": peak_tflops,
            "step_seconds": batch_tokens * f / (gpus * per_gpu), "gpu_hours_per_trillion_tokens": hours,
            "days_per_trillion_tokens": hours / gpus / 24, "cost_per_trillion_tokens": hours * price_per_gpu_hour}


def _check_layout(cfg: ModelConfig, cluster: Cluster, layout: Layout) -> int:
    """Refuse, naming the flag, a layout that cannot be laid out on the cluster; returns dp (= GPUs / pp)."""
    pp, ep = layout.pp, layout.ep
    _positive({"--gpus": cluster.gpus, "--gpus-per-node": cluster.gpus_per_node, "--gpu-memory": cluster.memory_gib,
               "--nvlink": cluster.nvlink_gbps, "--ib": cluster.ib_gbps, "--pp": pp, "--ep": ep,
               "--micro-batch": layout.micro_batch, "--seq-len": layout.seq_len,
               "--micro-batches": layout.micro_batches})
    if cluster.gpus % pp:
        raise ValueError(f"{cluster.gpus} GPUs do not split into {pp} pipeline ranks")
    dp = cluster.gpus // pp
    if dp % ep:
        raise ValueError(f"ep={ep} must divide the data-parallel degree dp={dp} (= GPUs / pp)")
    if cfg.n_routed_experts % ep:
        raise ValueError(f"ep={ep} must divide the {cfg.n_routed_experts} routed experts")
    if layout.schedule not in ("1f1b", "dualpipe", "dualpipev"):
        raise ValueError(f"unknown schedule {layout.schedule!r}; use 1f1b, dualpipe or dualpipev")
    return dp


def _busiest_rank(cfg: ModelConfig, schedule: str, pp: int, ep: int, chunks: int) -> tuple[int, int, int]:
    """(rank, replicated, expert parameters) of the pipeline rank holding the most parameters per GPU."""
    per_chunk = stage_params(cfg, chunks)
    if schedule == "1f1b":
        per_rank = per_chunk
    elif schedule == "dualpipe":                   # rank r holds chunk r and its mirror pp-1-r
        per_rank = [tuple(a + b for a, b in zip(per_chunk[r], per_chunk[pp - 1 - r])) for r in range(pp)]
    else:                                                 # V shape: rank r holds chunks r and 2pp-1-r
        per_rank = [tuple(a + b for a, b in zip(per_chunk[r], per_chunk[chunks - 1 - r])) for r in range(pp)]
    rank = max(range(pp), key=lambda r: per_rank[r][0] + per_rank[r][1] / ep)
    return (rank, *per_rank[rank])


def _chunk_activation_bytes(cfg: ModelConfig, layers: list[int], last: bool, tokens: int) -> int:
    """Activations of one micro-batch of `tokens` kept by a chunk holding `layers`. The last chunk also runs the MTP
    modules (stage_params puts their parameters there): a MoE block each, plus eh_proj's BF16 inputs (embedding and
    hidden state; its norms recomputed as a layer's are)."""
    per_token = sum(activation_bytes_per_token(cfg, cfg.is_moe_layer(i)) for i in layers)
    if last:
        per_token += cfg.num_nextn_predict_layers * (activation_bytes_per_token(cfg, True) + 2 * 2 * cfg.hidden_size)
    return tokens * per_token


def plan(cfg: ModelConfig, cluster: Cluster, layout: Layout) -> dict:
    problems = []
    pp, ep = layout.pp, layout.ep
    dp = _check_layout(cfg, cluster, layout)
    # one pipeline rank is no pipeline: every schedule is then one chunk, held once (a DualPipe "mirror" of
    # rank 0 at pp 1 would be rank 0 itself, counted twice)
    schedule = layout.schedule if pp > 1 else "1f1b"
    dual = schedule in ("dualpipe", "dualpipev")
    # DualPipe's code asserts an even number of ranks and of micro-batches and micro-batches >= 2 ranks; DualPipeV's
    # only the last (spec 5)
    if dual and (layout.micro_batches < 2 * pp or
                 (schedule == "dualpipe" and (pp % 2 or layout.micro_batches % 2))):
        problems.append(f"{schedule} needs micro_batches >= 2 pp" + (" and an even pp and micro_batches"
                                                                      if schedule == "dualpipe" else ""))
    chunks = 2 * pp if schedule == "dualpipev" else pp
    if chunks > cfg.num_hidden_layers:
        raise ValueError(f"--pp {pp} cuts the {cfg.num_hidden_layers} decoder layers into {chunks} "
                         f"{schedule} chunks: some would hold no layer")
    rank, rep, exp = _busiest_rank(cfg, schedule, pp, ep, chunks)
    local = rep + exp / ep                                # parameters a GPU holds
    weights, grads = 2 * local, 4 * local
    optim = (4 + 2 * layout.moment_bytes) * (rep / dp + exp / ep / (dp // ep))
    tokens = layout.micro_batch * layout.seq_len
    layers = stage_layers(cfg, chunks)
    mine = [rank, chunks - 1 - rank] if dual else [rank]       # the chunks this rank holds
    mtp = cfg.num_nextn_predict_layers
    act_mb = max(_chunk_activation_bytes(cfg, layers[c], c == chunks - 1, tokens) for c in mine)
    # TR Table 2 / DualPipe's README count activations in micro-batches of one stage: PP (1F1B) or PP + 1
    # (DualPipe, DualPipeV) per device, PP the number of stages; DualPipeV runs PP = 2 pp stages on pp devices
    in_flight = 2 * pp + 1 if schedule == "dualpipev" else pp + 1 if dual else pp
    acts = act_mb * in_flight
    total = weights + grads + optim + acts
    if total > cluster.memory_gib * GiB:
        problems.append(f"does not fit: {total / GiB:.1f} GiB per GPU > {cluster.memory_gib} GiB")
    # traffic per step per GPU
    nodes = -(-ep // cluster.gpus_per_node)                  # an EP group of 12 on 8-GPU nodes spans 2 of them
    # node-limited routing (spec 1.6): a token's experts lie in topk_group of the n_group groups; with the groups
    # spread evenly over the EP nodes, a group spans ceil(nodes / n_group) nodes (1 while it fits in a node, as in
    # V3's 8 groups on 8 nodes: "at most 4 nodes"), and a token never reaches more nodes than it has experts
    fanout = min(nodes, cfg.num_experts_per_tok, cfg.topk_group * -(-nodes // cfg.n_group)) if nodes > 1 else 0
    moe_in = [sum(cfg.is_moe_layer(i) for i in layers[c]) + (mtp if c == chunks - 1 else 0) for c in mine]
    # chunk passes per micro-batch on this rank: DualPipe feeds half the micro-batches from each end (its step
    # splits num_chunks into two directions), so each micro-batch crosses one of the rank's two chunks; DualPipeV's
    # V crosses both, 1F1B the one
    passes = 1 if schedule != "dualpipev" else 2
    moe_layers = sum(moe_in) / len(mine) * passes
    # dispatch: E4M3 + one FP32 power-of-2 scale per 1x128 tile (TR 3.3.4; parallel.fp8_comm); combine: BF16;
    # the backward sends the same bytes the other way (gradients to the experts in FP8, back in BF16)
    a2a_ib = layout.micro_batches * moe_layers * tokens * fanout * cfg.hidden_size * (1 + 4 / 128 + 2) * 2
    pp_bytes = layout.micro_batches * tokens * cfg.hidden_size * 2 * 2 * passes if pp > 1 else 0
    # ZeRO-1: reduce-scatter FP32 gradients, all-gather BF16 weights, a replicated parameter over the dp ranks, an
    # expert slice over its dp / ep replicas (the group its optimizer state is sharded over)
    col = dp // ep
    dp_bytes = (4 + 2) * (rep * (dp - 1) / dp + exp / ep * (col - 1) / col)
    f, b, w = 1.0, 2.0, 1.0
    return {
        "layout": {**asdict(layout), "dp": dp, "nodes": -(-cluster.gpus // cluster.gpus_per_node),
                   "ep_nodes": nodes, "busiest_pipeline_rank": rank},
        "params": {"total_with_mtp": sum(stage_params(cfg, 1)[0]), "replicated_on_rank": rep,
                   "experts_on_rank": exp / ep, "on_gpu": local},
        "memory_gib": {"weights_bf16": weights / GiB, "grads_fp32": grads / GiB, "optimizer_zero1": optim / GiB,
                       "activations": acts / GiB, "activations_per_micro_batch": act_mb / GiB, "total": total / GiB},
        "traffic_gb_per_step": {"expert_all_to_all_ib": a2a_ib / 1e9, "pipeline": pp_bytes / 1e9,
                                "zero1_dp": dp_bytes / 1e9,
                                "all_to_all_seconds_at_ib": a2a_ib / (cluster.ib_gbps * 1e9)},
        "bubble_in_F": {s: bubble(pp, s, f, b, w) for s in ("1f1b", "zb1p", "dualpipe")},
        "bubble_fraction": {s: bubble(pp, s, f, b, w) / (bubble(pp, s, f, b, w) + layout.micro_batches * (f + b))
                            for s in ("1f1b", "zb1p", "dualpipe")},
        "problems": problems,
    }


def format_plan(p: dict) -> str:
    lay, par, mem, tr = p["layout"], p["params"], p["memory_gib"], p["traffic_gb_per_step"]
    lines = [f"layout   pp {lay['pp']} x dp {lay['dp']} (ep {lay['ep']} over {lay['ep_nodes']} node(s)), "
             f"{lay['schedule']}, {lay['micro_batches']} micro-batches of {lay['micro_batch']} x {lay['seq_len']}",
             f"params   {par['total_with_mtp'] / 1e9:.2f}B with MTP; busiest rank {lay['busiest_pipeline_rank']}: "
             f"{par['replicated_on_rank'] / 1e9:.2f}B replicated + {par['experts_on_rank'] / 1e9:.2f}B experts "
             f"= {par['on_gpu'] / 1e9:.2f}B per GPU",
             "memory   " + ", ".join(f"{k} {v:.1f} GiB" for k, v in mem.items()),
             "traffic  per step: " + ", ".join(f"{k} {v:.2f} {'s' if k.endswith('seconds_at_ib') else 'GB'}"
                                              for k, v in tr.items()),
             "bubble   " + ", ".join(f"{k} {v:g} F ({p['bubble_fraction'][k]:.1%})"
                                     for k, v in p["bubble_in_F"].items()) + "  (F=1, B=2, W=1, F&B=F+B)"]
    if "cost" in p:
        c = p["cost"]
        lines.append(f"cost     {c['flops_per_token'] / 1e9:.0f} GFLOPs/token; at {c['mfu']:.0%} MFU of "
                     f"{c['peak_tflops']:g} TFLOPS: step {c['step_seconds']:.1f} s, "
                     f"{c['gpu_hours_per_trillion_tokens'] / 1e3:.0f}K GPU-hours and "
                     f"${c['cost_per_trillion_tokens'] / 1e3:.0f}K per trillion tokens "
                     f"({c['days_per_trillion_tokens']:.1f} days on these GPUs)")
    lines += [f"PROBLEM  {x}" for x in p["problems"]]
    return "\n".join(lines)
