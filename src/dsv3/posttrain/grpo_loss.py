"""GRPO's policy-gradient terms (spec 7; Shao et al. 2024, DeepSeekMath, arXiv 2402.03300), with the switches of its
successors: Dr. GRPO (Liu et al. 2025, arXiv 2503.20783: no std scaling of advantages) and DAPO (Yu et al. 2025,
arXiv 2503.14476: token-level aggregation, asymmetric "clip-higher", dynamic sampling, overlong filtering).

Shapes: N = prompts x G responses (a group's G rows are consecutive), T = tokens per row. Per-token tensors are
(N, T) and aligned with `mask` (True on the response tokens that carry loss); advantages are (N,) per response.
All functions are pure: no optimiser, no model state beyond `sequence_logprobs`' forward.

Order of use in a step: rewards -> group_advantages -> dynamic_sampling_mask / overlong_filter (shrink the mask) ->
sequence_logprobs (policy, and the reference when beta > 0) -> policy_loss.
"token" aggregation divides by the loss tokens of the call; a loop that accumulates micro-batches must rescale to
the whole batch's token count (DAPO's mean is over the batch), or use Dr. GRPO's constant normaliser.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def group_advantages(rewards: Tensor, G: int, scale_std: bool = True, eps: float = 1e-6) -> Tensor:
    """A_i = (r_i - mean(r_group)) / std(r_group) (spec 7). `scale_std=False` is Dr. GRPO: dividing by the std
    up-weights groups whose rewards barely differ (too easy / too hard questions), a difficulty bias. The std is the
    unbiased one (torch's default, as TRL's GRPOTrainer); `eps` keeps all-equal groups finite (their A is 0). With
    real-valued (reward-model) rewards a group differing by ~eps gets O(1) advantages from noise: raise eps (TRL
    uses 1e-4) or compare rewards with a tolerance in dynamic sampling."""
    assert rewards.ndim == 1 and rewards.numel() % G == 0, f"rewards {tuple(rewards.shape)} not a multiple of G={G}"
    r = rewards.view(-1, G).double()
    a = r - r.mean(dim=1, keepdim=True)                  # step 1: centre within the group (the critic-free baseline)
    if scale_std:
        a = a / (r.std(dim=1, keepdim=True) + eps)       # step 2 (GRPO, not Dr. GRPO): scale by the group's spread
    return a.flatten().to(rewards.dtype if rewards.is_floating_point() else torch.float32)


def dynamic_sampling_mask(rewards: Tensor, G: int) -> Tensor:
    """(N,) bool: keep the rows of groups whose rewards are not all equal. DAPO's dynamic sampling: such a group has
    zero advantage everywhere, so it adds no gradient but still dilutes the batch (and the token mean)."""
    r = rewards.view(-1, G)
    keep = (r != r[:, :1]).any(dim=1)
    return keep.repeat_interleave(G)


def overlong_filter(mask: Tensor, truncated: Tensor) -> Tensor:
    """DAPO's overlong filtering: a response cut at the length limit has no verdict on its answer, so its reward is
    noise; its tokens carry no loss. mask (N, T), truncated (N,) bool -> a new mask."""
    return mask & ~truncated.bool()[:, None]


def kl_estimate(logp_new: Tensor, logp_ref: Tensor, estimator: str = "k3") -> Tensor:
    """Per-token estimate of KL(pi_theta || pi_ref) from tokens sampled from pi_theta (Schulman, "Approximating KL
    divergence", 2020). k1 = log(pi_theta/pi_ref): unbiased, high variance, can be negative. k3 = ratio - log(ratio) - 1
    with ratio = pi_ref/pi_theta: unbiased and always >= 0, the estimator of the GRPO paper (spec 7)."""
    if estimator == "k1":
        return logp_new - logp_ref
    if estimator == "k3":
        log_ratio = logp_ref - logp_new
        return torch.exp(log_ratio) - log_ratio - 1
    raise ValueError(f"kl estimator must be 'k1' or 'k3', got {estimator!r}")


def _aggregate(per_token: Tensor, mask: Tensor, aggregation: str) -> Tensor:
    m = mask.to(per_token.dtype)
    if aggregation == "token":       # DAPO: every token weighs the same, so long responses are not down-weighted
        return (per_token * m).sum() / m.sum().clamp(min=1)
    if aggregation == "sequence":    # GRPO: 1/|o_i| inside, 1/G outside; rows with no loss token are left out
        n_tok = m.sum(dim=1)
        per_seq = (per_token * m).sum(dim=1) / n_tok.clamp(min=1)
        has = n_tok > 0
        return (per_seq * has).sum() / has.sum().clamp(min=1)
    raise ValueError(f"aggregation must be 'token' or 'sequence', got {aggregation!r}")


def policy_loss(logp_new: Tensor, logp_old: Tensor, advantages: Tensor, mask: Tensor, logp_ref: Tensor | None = None,
                *, eps_low: float = 0.2, eps_high: float = 0.2, beta: float = 0.0, kl_estimator: str = "k3",
                aggregation: str = "token", entropy: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """The GRPO objective (spec 7), negated to a loss, per token t of response i:
        rho = pi_theta / pi_old;  obj = min(rho A_i, clip(rho, 1 - eps_low, 1 + eps_high) A_i) - beta KL_t
    aggregated over `mask` by `aggregation`. eps_high > eps_low is DAPO's clip-higher (room for unlikely tokens to
    grow, against entropy collapse). beta = 0 needs no reference model (DAPO / Dr. GRPO drop the KL term).
    Returns (loss, stats): clip_fraction (share of loss tokens whose gradient the clip stopped), kl (mean over loss
    tokens, 0 when no reference is given), ratio_mean, and entropy (mean over loss tokens of the per-token policy
    entropy `entropy` (N, T), only logged: its fall is the entropy collapse clip-higher is there to prevent)."""
    assert logp_new.shape == logp_old.shape == mask.shape, (logp_new.shape, logp_old.shape, mask.shape)
    assert advantages.shape == logp_new.shape[:1], (advantages.shape, logp_new.shape)
    if beta and logp_ref is None:
        raise ValueError("beta > 0 needs logp_ref (the frozen reference's log-probs)")
    mask = mask.bool()
    A = advantages[:, None].to(logp_new.dtype)
    # step 1: the importance ratio against the rollout policy (exactly 1 on the first update of a batch)
    ratio = torch.exp(logp_new - logp_old)
    # step 2: the pessimistic (clipped) surrogate, as in PPO, with separate lower and upper bounds
    surrogate = torch.minimum(ratio * A, torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * A)
    per_token = -surrogate
    # step 3: the KL penalty to the frozen reference, added to the loss per token (GRPO puts it in the loss, not the
    # reward)
    kl = kl_estimate(logp_new, logp_ref, kl_estimator) if logp_ref is not None else torch.zeros_like(logp_new)
    if beta:
        per_token = per_token + beta * kl
    loss = _aggregate(per_token, mask, aggregation)
    # clipped = the min picked the clamped branch, whose gradient is 0
    clipped = ((ratio < 1 - eps_low) & (A < 0)) | ((ratio > 1 + eps_high) & (A > 0))
    n = mask.sum().clamp(min=1).to(logp_new.dtype)
    with torch.no_grad():
        stats = {"clip_fraction": (clipped & mask).sum() / n,
                 "kl": (kl.detach() * mask).sum() / n,
                 "ratio_mean": (ratio.detach() * mask).sum() / n}
        if entropy is not None:
            stats["entropy"] = (entropy.detach() * mask).sum() / n
    return loss, stats


def sequence_logprobs(model, ids: Tensor, response_mask: Tensor, temperature: float = 1.0,
                      with_entropy: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """Per-token log-probs (N, T) of `ids` (N, T) under a dsv3 Transformer: entry t is log p(ids[t] | ids[:t]) where
    response_mask[t], 0 elsewhere (so it lines up with the mask that `policy_loss` takes). The log-prob is minus the
    token cross-entropy in (at least) fp32, as the trainer's `cross_entropy` (dsv3.train.trainer) before its mean
    (that one returns only the mean, hence the one line here). `temperature` must be the rollout's, so that ratios
    compare the distribution the tokens were sampled from. `with_entropy` also returns the per-token entropy (N, T)
    of that distribution (for the log), masked the same way."""
    assert ids.shape == response_mask.shape, (ids.shape, response_mask.shape)
    assert not response_mask[:, 0].any(), "position 0 has no context: it cannot be a response token"
    logits = model(ids[:, :-1])                          # (N, T-1, V): position t-1 predicts token t
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))    # at least fp32; fp64 stays fp64
    if temperature != 1.0:
        logits = logits / temperature
    m = response_mask.to(logits.dtype)
    logp = -F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")    # (N, T-1)
    logp = F.pad(logp, (1, 0)) * m                                                      # (N, T): realign to ids
    if not with_entropy:
        return logp
    with torch.no_grad():
        lp = torch.log_softmax(logits, dim=-1)
        ent = -(lp.exp() * lp).sum(-1)                                                  # (N, T-1)
    return logp, F.pad(ent, (1, 0)) * m
