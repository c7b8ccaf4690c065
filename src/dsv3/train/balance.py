"""Load balancing during training (spec 1.7): the aux-loss-free bias update and the complementary sequence-wise
balance loss. (MaxVio, the logged imbalance, is dsv3.train.metrics.max_violation.)

Bias update (TR 2.1.2): after each optimizer step, with the step's per-expert loads summed over all of its
micro-batches, b_i += gamma * sign(mean load - load_i): overloaded experts become less likely to be selected,
underloaded ones more. Only selection sees the bias (dsv3.model.moe), so this never touches the loss.

Sequence-wise balance loss (TR eqs. 17-20), per sequence of T tokens, averaged over the batch:
    L_Bal = alpha * sum_i f_i P_i,  f_i = E / (K T) * #{t : i in TopK_t},  P_i = mean_t s_i,t / sum_j s_j,t
Selections are the ones the model actually made (bias included; spec 1.7 notes the report does not say which).
"""

import torch

from ..model.moe import MoE, moe_layers  # noqa: F401  (moe_layers: re-exported, the trainer's entry point)


def sequence_balance_loss(scores: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """scores (B, T, E) affinities, idx (B, T, K) selections -> sum_i f_i P_i averaged over sequences (no alpha)."""
    B, T, E = scores.shape
    K = idx.shape[-1]
    counts = torch.zeros(B, E, device=scores.device, dtype=scores.dtype)
    counts.scatter_add_(1, idx.reshape(B, T * K), torch.ones(B, T * K, device=scores.device, dtype=scores.dtype))
    f = counts * (E / (K * T))
    p = (scores / scores.sum(-1, keepdim=True)).mean(1)
    return (f * p).sum(-1).mean()


def collect_balance_loss(layers: list[tuple[str, MoE]]) -> torch.Tensor | None:
    """Sum of the per-layer losses of the routing the layers kept in their last forward (then released)."""
    total = None
    for _, m in layers:
        if m.routing is not None:
            loss = sequence_balance_loss(*m.routing)
            total = loss if total is None else total + loss
            m.routing = None
    return total


@torch.no_grad()
def update_bias(layers: list[tuple[str, MoE]], loads: torch.Tensor, speed: float) -> None:
    """loads (n_layers, E): tokens routed to each expert over the whole step."""
    if speed == 0:
        return
    for (_, m), load in zip(layers, loads):
        bias = m.gate.e_score_correction_bias
        if bias is not None:
            bias += speed * torch.sign(load.float().mean() - load.float()).to(bias.device)

