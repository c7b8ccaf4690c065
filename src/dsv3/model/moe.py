"""DeepSeekMoE: sigmoid gate with bias-steered, group-limited top-k routing, shared experts, and routed experts
stacked as (E, ...) tensors computed with a grouped GEMM (spec 1.6).

Shapes: N tokens (B*T flattened), D hidden, E routed experts, K experts per token, G groups, I expert width.

Why the bias only selects: aux-loss-free balancing (TR 2.1.2) nudges `e_score_correction_bias` to change *which*
experts a token visits; the gate *weights* still come from the unbiased affinities, so the bias never enters the
gradient or the output scale. Gate math runs in fp32 (TR 3.3.1: gating stays in high precision) and the bias
stays fp32 under `.to(bf16)`.

No token is ever dropped: every (token, expert) pair is computed. Tokens are sorted by expert so each expert sees
one contiguous segment; `torch._grouped_mm` runs all segments in one call where the device supports it, and an
exact per-segment loop runs otherwise. Each forward adds its per-expert token counts to `tokens_per_expert`,
which the trainer zeroes before and reads after a forward for the bias update; with `keep_routing` set, the MoE
also keeps the step's affinities and selections in `routing` for the sequence-wise balance loss (spec 1.7).
"""

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .layers import MLP, upcast


class Gate(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.top_k, self.n_group, self.topk_group = cfg.num_experts_per_tok, cfg.n_group, cfg.topk_group
        self.scoring_func, self.topk_method = cfg.scoring_func, cfg.topk_method
        self.norm_topk_prob, self.route_scale = cfg.norm_topk_prob, cfg.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        if self.topk_method == "noaux_tc":
            self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32))
        else:
            self.e_score_correction_bias = None

    def _apply(self, fn, recurse=True):
        # keep the selection bias in fp32 under model.to(bf16): sign updates of 1e-3 vanish in bf16 (spec 9.4)
        bias = self.e_score_correction_bias
        super()._apply(fn, recurse)
        new = self.e_score_correction_bias
        if bias is not None and new.dtype != torch.float32:
            self.e_score_correction_bias = bias.to(device=new.device, dtype=torch.float32)
        return self

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (N, D) -> weights (N, K) fp32, indices (N, K) int64."""
        return self.route(x)[:2]

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The gate's logits (N, E) of x (N, D), in fp32 (or x's wider dtype) even under bf16 autocast."""
        xf = upcast(x)
        with torch.autocast(x.device.type, enabled=False):   # the gate stays fp32 under bf16 autocast
            return F.linear(xf, self.weight.to(xf.dtype))

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (N, D) -> weights (N, K), indices (N, K), and the unbiased affinities of all experts (N, E), fp32."""
        logits = self.logits(x)                                                      # (N, E)
        scores = logits.sigmoid() if self.scoring_func == "sigmoid" else logits.softmax(dim=-1)
        if self.topk_method == "greedy":
            idx = scores.topk(self.top_k, dim=-1).indices
        else:
            choice = scores + self.e_score_correction_bias if self.topk_method == "noaux_tc" else scores
            if self.n_group > 1:
                grouped = choice.unflatten(-1, (self.n_group, -1))                 # (N, G, E/G)
                # V3: a group is worth the sum of its top-2 biased scores; V2: its best score
                group_scores = (grouped.topk(2, dim=-1).values.sum(-1) if self.topk_method == "noaux_tc"
                                else grouped.amax(dim=-1))
                keep = group_scores.topk(self.topk_group, dim=-1).indices
                group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
                # -inf, not 0: a biased score can be negative (spec 1.6 step 4)
                choice = grouped.masked_fill(~group_mask[..., None], float("-inf")).flatten(1)
            idx = choice.topk(self.top_k, dim=-1).indices
        weights = scores.gather(1, idx)                                               # unbiased affinities
        if self.norm_topk_prob and self.top_k > 1:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.route_scale, idx, scores


def _grouped_mm_supported(x: torch.Tensor) -> bool:
    if not hasattr(torch, "_grouped_mm"):
        return False
    if x.device.type == "cuda":
        return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (9, 0)
    # the CPU's grouped GEMM takes fp32 eagerly, but the fake that torch.compile traces it with takes bf16 only
    return x.device.type == "cpu" and (x.dtype == torch.bfloat16 or x.dtype == torch.float32
                                       and not torch.compiler.is_compiling())


def expert_ffn(x: torch.Tensor, counts: torch.Tensor, gate_proj: torch.Tensor, up_proj: torch.Tensor,
               down_proj: torch.Tensor, use_grouped_mm: bool | None = None) -> torch.Tensor:
    """SwiGLU of each expert on its segment of x.

    x (M, D) sorted by expert, counts (E,) rows per expert; gate_proj/up_proj (E, I, D), down_proj (E, D, I).
    """
    if use_grouped_mm is None:
        use_grouped_mm = _grouped_mm_supported(x)
    if use_grouped_mm:
        offs = counts.cumsum(0).to(torch.int32)
        h = F.silu(torch._grouped_mm(x, gate_proj.transpose(-2, -1), offs=offs)) * \
            torch._grouped_mm(x, up_proj.transpose(-2, -1), offs=offs)
        return torch._grouped_mm(h, down_proj.transpose(-2, -1), offs=offs)
    return _expert_loop(x, counts, gate_proj, up_proj, down_proj)


@torch.compiler.disable   # under torch.compile: one graph break, run eagerly (not traced per pattern of counts)
def _expert_loop(x: torch.Tensor, counts: torch.Tensor, gate_proj: torch.Tensor, up_proj: torch.Tensor,
                 down_proj: torch.Tensor) -> torch.Tensor:
    """expert_ffn one expert at a time (no grouped GEMM for this device or dtype)."""
    outs, start = [], 0
    for e, n in enumerate(counts.tolist()):
        if n:
            seg = x[start:start + n]
            outs.append(F.linear(F.silu(F.linear(seg, gate_proj[e])) * F.linear(seg, up_proj[e]), down_proj[e]))
            start += n
    return torch.cat(outs) if outs else x.new_zeros(0, down_proj.shape[1])


def expert_order(flat_idx: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The stable sort of (token, k) pairs by expert: `order` (pairs in expert order) and its inverse (where each
    pair sits). Small batches (decode) count ranks with a one-hot cumsum, a few tiny kernels instead of two radix
    sorts (~26 us each per layer on an H200); large ones sort. Both give the same stable order."""
    M, E = flat_idx.numel(), counts.numel()
    if M * E > 1 << 16:
        order = flat_idx.argsort(stable=True)
        return order, order.argsort()
    onehot = F.one_hot(flat_idx, E)                                          # (M, E)
    rank = (onehot.cumsum(0) - 1).gather(1, flat_idx[:, None])[:, 0]        # earlier pairs of the same expert
    inverse = (counts.cumsum(0) - counts)[flat_idx] + rank
    order = torch.empty_like(inverse).scatter_(0, inverse, torch.arange(M, device=flat_idx.device))
    return order, inverse


class _DispatchRows(torch.autograd.Function):
    """x (N, D) -> x[order // K] (N*K, D): each token copied once per selected expert, in expert order. The
    backward sums each token's K copies through the inverse permutation: gathers only, no atomic scatter."""

    @staticmethod
    def forward(ctx, x, order, inverse, k):
        ctx.save_for_backward(inverse)
        ctx.k = k
        return x[order // k]

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        return grad[inverse].unflatten(0, (-1, ctx.k)).sum(1), None, None, None


class _PermuteRows(torch.autograd.Function):
    """y[perm] for a permutation perm with inverse `inverse`; the backward is the gather grad[inverse]."""

    @staticmethod
    def forward(ctx, y, perm, inverse):
        ctx.save_for_backward(inverse)
        return y[perm]

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        return grad[inverse], None, None


class Experts(nn.Module):
    """The routed experts, stacked: checkpoint `experts.{e}.gate_proj.weight` is row e of `gate_proj`."""

    recompute_region = "forward"     # what selective recomputation re-runs (dsv3.parallel.recompute)

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        E, D, I = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.gate_proj = nn.Parameter(torch.empty(E, I, D))
        self.up_proj = nn.Parameter(torch.empty(E, I, D))
        self.down_proj = nn.Parameter(torch.empty(E, D, I))

    def stacked_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """gate (E, I, D), up (E, I, D), down (E, D, I). With `ffn`, the seam where other weight storage (FP8)
        plugs in."""
        return self.gate_proj, self.up_proj, self.down_proj

    def ffn(self, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Each expert's SwiGLU on its segment of xs (M, D), rows sorted by expert, counts (E,) rows per expert."""
        weights_3d = self.stacked_weights()
        if torch.is_autocast_enabled(xs.device.type):        # autocast does not cover grouped GEMMs: cast here
            dtype = torch.get_autocast_dtype(xs.device.type)
            weights_3d = tuple(w.to(dtype) for w in weights_3d)
            xs = xs.to(dtype)
        return expert_ffn(xs, counts, *weights_3d)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x (N, D), weights/idx (N, K), counts (E,) -> (N, D) = sum_k weights[:, k] * expert_{idx[:, k]}(x)."""
        K = idx.shape[1]
        order, inverse = expert_order(idx.flatten(), counts)
        y = self.ffn(_DispatchRows.apply(x, order, inverse, K), counts)
        y = _PermuteRows.apply(y, inverse, order).unflatten(0, (-1, K))          # (N, K, D) back in token order
        return (y * weights[..., None]).sum(1).to(x.dtype)  # fp32 gate weights and sum, as HF


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_experts = cfg.n_routed_experts
        self.gate = Gate(cfg)
        self.experts = Experts(cfg)
        self.shared_experts = (MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts)
                               if cfg.n_shared_experts else None)
        self.register_buffer("tokens_per_expert", torch.zeros(cfg.n_routed_experts, dtype=torch.int64),
                             persistent=False)
        self.keep_routing = False
        self.routing: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weights, idx, scores = self.gate.route(x)
        if self.keep_routing:   # (B, T, E) affinities with grad, (B, T, K) selections
            self.routing = (scores.view(*shape[:-1], -1), idx.view(*shape[:-1], -1))
        counts = torch.zeros(self.n_experts, dtype=torch.int64, device=x.device)
        counts.scatter_add_(0, idx.flatten(), torch.ones_like(idx.flatten()))
        with torch.no_grad():
            self.tokens_per_expert += counts
        y = self.experts(x, weights, idx, counts)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        return y.view(shape)


def moe_layers(model: nn.Module) -> list[tuple[str, MoE]]:
    """(name, MoE) for every MoE layer of `model` (any module: a Transformer, a pipeline chunk), main model first,
    then the MTP modules."""
    return [(name.removesuffix(".mlp"), m) for name, m in model.named_modules() if isinstance(m, MoE)]
