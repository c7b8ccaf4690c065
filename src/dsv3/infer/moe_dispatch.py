"""Which FFN call a decode step makes: the fused MoE kernel (dsv3.kernels.moe_decode) for the routed experts of
decode-sized batches, the model's own MoE module otherwise.

The fused path is the MoE module's forward (spec 1.6) with its routed-expert part swapped: the same gate
(`Gate.route`; for noaux_tc sigmoid gates its math in one launch, dsv3.kernels.moe_route), the same per-expert load
counts into `tokens_per_expert`, the shared experts added after. It
applies to plain stacked experts (`Experts`) and FP8 block weights (`FP8Experts`); any other experts module
(expert-parallel slots) and batches over MOE_DECODE_MAX_TOKENS tokens take the module's forward.

`EngineConfig.fused_moe = "auto"` (the default) takes the fused path only for the batch sizes where it measured
faster (FUSED_MOE_AUTO_TOKENS): the decode graphs are captured per batch bucket, so each bucket's graph holds the
faster of the two paths.

The shared experts fold into the kernel at batch 1 (`EngineConfig.shared_pair`, on by default): batches of at most
ROWS_MAX_TOKENS tokens take the kernel's GEMV form, which then runs the shared SwiGLU as one more (token, k) pair per
token, weight 1, reading the shared MLP's own weights (their views into dsv3.infer.fused_proj's fused gate-up buffer:
no copy). That saves the shared MLP's 3-4 launches and the add per MoE layer (~100 of a `lite` step's ~625).
`shared_tensors` says which shared MLPs fold: bias-free linears in the experts' dtype (nn.Linear / GemvLinear, whose
weights FusedMLP's fusion turns into views), or FP8Linear over FP8 experts with I and I_s multiples of the 128-row
scale block; any other keeps `mlp.shared_experts(x)` and the add, as wider batches do.
"""

from __future__ import annotations

import torch
from torch import nn

from ..kernels.decode_ops import gate_logits, moe_decode, moe_route
from ..kernels.moe_decode import ROWS_MAX_TOKENS
from ..kernels.moe_decode_launch import fused_token_range
from ..kernels.triton_setup import BLOCK, HAS_TRITON, capability
from ..model.layers import MLP
from ..model.moe import Experts, MoE
from .fp8_weights import FP8Experts, FP8Linear
from .fused_proj import FusedMLP, GemvLinear

MOE_DECODE_MAX_TOKENS = 256

# `fused_moe = "auto"`: the step sizes (tokens = rows of a decode-graph bucket) whose routed experts run in the fused
# kernel, inclusive: where the fused call measured faster than the module path (grouped GEMM), read from the `faster`
# column of the kernel's launch table (dsv3.kernels.moe_decode_launch.LAUNCH_TABLE, bf16 rows; filled from
# benchmarks/moe_decode_sweep.py, checked by the engine rows of benchmarks/RESULTS.md, issue 16: `lite`, one H200,
# e.g. batch 32: 1,990 tok/s module vs 2,801 fused; batch 64 a tie before the router kernel). The upper bound sits
# halfway between the last faster and the first slower measured T.
FUSED_MOE_AUTO_TOKENS = fused_token_range(fp8=False)


def fused_moe_available(model: nn.Module, mode: str) -> bool:
    """Whether `EngineConfig.fused_moe` lets any batch take the fused kernel: on (any device: the reference on CPU),
    off, or auto = a CUDA GPU of sm_89+ (the FP8 kernels' e4m3 conversion) with triton."""
    if mode != "auto":
        return mode == "on"
    w = model.embed_tokens.weight
    return HAS_TRITON and w.is_cuda and capability(w.device) >= (8, 9)


def fused_moe_for(mode: str, available: bool, tokens: int, fp8: bool = False) -> bool:
    """Whether a forward of `tokens` tokens runs its routed experts in the fused kernel: `mode` is
    `EngineConfig.fused_moe`, `available` what fused_moe_available said for the engine's model, `fp8` whether its
    experts hold FP8 block weights (auto then follows the table's FP8 rows; `model_has_fp8_experts`)."""
    if not available or tokens > MOE_DECODE_MAX_TOKENS:
        return False
    lo, hi = fused_token_range(fp8=True) if fp8 else FUSED_MOE_AUTO_TOKENS
    return mode == "on" or lo <= tokens <= hi


def model_has_fp8_experts(model: nn.Module) -> bool:
    """Whether the model's routed experts are FP8 block weights (dsv3.infer.fp8_weights.quantize_weights)."""
    return any(type(m) is FP8Experts for m in model.modules())


def expert_tensors(experts: nn.Module) -> tuple | None:
    """(gate, up, down, gate_scale, up_scale, down_scale) of experts the fused kernel reads, else None."""
    if type(experts) is Experts:
        return (*experts.stacked_weights(), None, None, None)
    if type(experts) is FP8Experts:
        names = ("gate_proj", "up_proj", "down_proj")
        return (*(getattr(experts, n) for n in names), *(getattr(experts, f"{n}_scale_inv") for n in names))
    return None


def route(mlp: MoE, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gate.route's weights and ids for flat (N, D), with the loads added to `tokens_per_expert`: noaux_tc sigmoid
    gates through the one-launch router (dsv3.kernels.moe_route) after the same fp32 gate GEMM
    (dsv3.kernels.gemv.gate_logits), others as the module routes."""
    gate = mlp.gate
    if gate.scoring_func == "sigmoid" and gate.topk_method == "noaux_tc":
        with torch.no_grad():
            logits = gate_logits(flat, gate.weight)          # Gate.logits; one launch at batch 1 on CUDA
            weights, idx, counts = moe_route(logits, gate.e_score_correction_bias.to(logits.dtype), gate.top_k,
                                             gate.n_group, gate.topk_group, gate.norm_topk_prob, gate.route_scale)
            mlp.tokens_per_expert += counts
        return weights, idx
    weights, idx, _ = gate.route(flat)
    with torch.no_grad():
        flat_idx = idx.flatten()
        mlp.tokens_per_expert.scatter_add_(0, flat_idx, torch.ones_like(flat_idx))
    return weights, idx


def shared_tensors(mlp: MoE, experts: tuple) -> tuple | None:
    """(gate, up, down, gate_scale, up_scale, down_scale) of the MoE's shared experts for the fused kernel's extra
    pair (`experts`: what expert_tensors gave), else None: the shared MLP then runs apart. Folded: a plain or fused
    SwiGLU (MLP / FusedMLP) of bias-free linears, either nn.Linear / GemvLinear weights in the experts' dtype or,
    over FP8 experts, FP8Linear blocks with both I (the experts') and I_s (the shared) multiples of 128, so that
    every 128-row scale block sits whole in one matrix (gate's and up's scale rows, views into fused_scale_inv, then
    start on a block row); the kernel itself takes ragged blocks, this stays on the tested layouts."""
    shared = mlp.shared_experts
    if type(shared) not in (MLP, FusedMLP):
        return None
    linears = (shared.gate_proj, shared.up_proj, shared.down_proj)
    if any(lin.bias is not None for lin in linears):
        return None
    weights = tuple(lin.weight for lin in linears)
    if any(w.dtype != experts[0].dtype or w.device != experts[0].device for w in weights) or \
            weights[0].stride() != weights[1].stride() or any(w.stride(1) != 1 for w in weights):
        return None
    if experts[3] is None:
        return (*weights, None, None, None) if all(type(lin) in (nn.Linear, GemvLinear) for lin in linears) else None
    I, I_s = experts[0].shape[1], weights[0].shape[0]
    if any(type(lin) is not FP8Linear for lin in linears) or I % BLOCK or I_s % BLOCK:
        return None
    return (*weights, *(lin.weight_scale_inv for lin in linears))


def moe_ffn(mlp: nn.Module, x: torch.Tensor, fused: bool, shared_pair: bool = True) -> torch.Tensor:
    """mlp(x) for x (B, T, D), through the fused kernel when `fused` and it applies; with `shared_pair`, the shared
    experts inside it where they fold (module docstring), else added after."""
    tensors = expert_tensors(mlp.experts) if fused and isinstance(mlp, MoE) and not mlp.keep_routing else None
    if tensors is None or x.numel() // x.shape[-1] > MOE_DECODE_MAX_TOKENS:
        return mlp(x)
    flat = x.reshape(-1, x.shape[-1])
    weights, idx = route(mlp, flat)
    shared = shared_tensors(mlp, tensors) if shared_pair and flat.shape[0] <= ROWS_MAX_TOKENS else None
    y = moe_decode(flat, weights, idx, *tensors, *(shared or ()))
    if mlp.shared_experts is not None and shared is None:
        y = y + mlp.shared_experts(flat)
    return y.view(x.shape)


def fused_moe_ffn(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The blocks' `ffn` seam with the fused kernel on (dsv3.model.transformer)."""
    return moe_ffn(mlp, x, True)


def fused_moe_ffn_shared_apart(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`fused_moe_ffn` with the shared experts always run apart (EngineConfig.shared_pair off: the A/B's before)."""
    return moe_ffn(mlp, x, True, shared_pair=False)
