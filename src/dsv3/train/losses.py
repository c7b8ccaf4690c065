"""The training objective and the validation metrics, once for every layout (one process, DP / EP / FSDP, and the
last stage of a DualPipeV pipeline): TR 2.2 / 4.2, spec 1.7-1.8.

    loss = CE(main) + lambda * mean_k CE(MTP depth k) + alpha * sum_layers L_Bal

  * `lm_losses`: a window (B, T+1) through the whole model -> main CE, the CE of every MTP depth, and the logits;
  * `output_losses`: the same CEs from a pipeline's last-stage output (logits, *mtp logits);
  * `objective`: the weighted sum (the balance term is the sequence-wise loss of the layers the caller holds:
    dsv3.train.balance.collect_balance_loss, or each pipeline chunk's own through BalanceLossGrad);
  * `token_weights`: what each micro-batch's CEs are multiplied by so that a step with a loss mask (SFT) takes every
    CE's mean over all its loss tokens, whatever the micro-batches and ranks; `positions`: a batch's trained positions;
  * `PipelineLoss`: the last stage's loss_fn for torch's pipeline schedules;
  * `ValidationSums`: main / MTP loss and the MTP head's next-next-token accuracy (against the data and against the
    main model's own greedy choice: the acceptance rate of greedy speculative decoding with the MTP head as the
    draft), summed over batches and ranks, then averaged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean token cross-entropy, computed in fp32 whatever the logits' dtype (-100 targets carry no loss)."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def lm_losses(model, window: torch.Tensor, ce=cross_entropy, targets: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor, list[torch.Tensor]]:
    """window (B, T+1) -> main CE, MTP CE per depth, main logits (B, T, V), MTP logits (B, T-k, V) per depth.
    MTP depth k at position i predicts token i+k+1 of the window (spec 1.8). `targets` (B, T): window[:, 1:] with
    -100 where a token carries no loss (SFT's mask: dsv3.posttrain.sft); the mean is then over the other tokens."""
    inputs = window[:, :-1]
    targets = window[:, 1:] if targets is None else targets
    hidden = model.hidden_states(inputs)
    logits = model.lm_head(hidden)
    main = ce(logits, targets)
    mtp_logits = model.mtp_logits(hidden, inputs) if len(model.mtp) else []
    mtp = [ce(lg, targets[:, k:]) for k, lg in enumerate(mtp_logits, start=1)]
    return main, mtp, logits, mtp_logits


def split_output(output) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A pipeline's last-stage output, logits or (logits, *mtp logits), as (logits, [mtp logits])."""
    logits, *mtp_logits = (output,) if isinstance(output, torch.Tensor) else output
    return logits, mtp_logits


def output_losses(output, window: torch.Tensor, ce=cross_entropy) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """`lm_losses`'s CEs from a last-stage output and its window: main CE, MTP CE per depth."""
    logits, mtp_logits = split_output(output)
    return ce(logits, window[:, 1:]), [ce(lg, window[:, k + 1:]) for k, lg in enumerate(mtp_logits, 1)]


def positions(window: torch.Tensor) -> int:
    """Token positions a batch of the whole step (all ranks') trains on: each row's tokens but its last, the next
    tokens being the targets (pre-training: micro_batch_size x seq_len; SFT: its rows' padded length - 1)."""
    return window.shape[0] * (window.shape[1] - 1)


def token_weights(targets: list[torch.Tensor | None], shard, replicas: int, mtp_depths: int
                  ) -> list[tuple[float, list[float]]]:
    """Per micro-batch (its whole `targets`, -100 off the loss mask), what this rank's mean CEs are multiplied by so
    that the step's gradient is that of each CE's mean over all its loss tokens in the step (every micro-batch, every
    rank), as one batch would give: c R / C for c loss tokens in the rank's rows (`shard`), C in the whole step
    (every rank reads every micro-batch whole, so C needs no collective) and R `replicas` (the gradient sync
    averages over them); for the main CE and each MTP depth k (its targets start k tokens later). Without it a
    micro-batch of few loss tokens counted as much as a full one and train.micro_batch_size, a memory setting,
    changed the gradient. Windows without a loss mask (pre-training) have equal counts: 1 / n_micro each."""
    if any(t is None for t in targets):
        return [(1 / len(targets), [1 / len(targets)] * mtp_depths)] * len(targets)

    def counts(t: torch.Tensor) -> list[int]:       # loss tokens of the main CE, then of each MTP depth
        return [int((t[:, k:] != -100).sum()) for k in range(mtp_depths + 1)]
    mine = [counts(shard(t)) for t in targets]
    total = [max(sum(c), 1) for c in zip(*(counts(t) for t in targets))]
    return [(c[0] * replicas / total[0], [n * replicas / tot for n, tot in zip(c[1:], total[1:])]) for c in mine]


def mtp_mean(mtp: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """The MTP term: the mean over depths of their CE (spec 1.8), zero without MTP."""
    return torch.stack(mtp).mean() if mtp else like.new_zeros(())


def objective(main: torch.Tensor, mtp_loss: torch.Tensor, aux: torch.Tensor | None, lam: float, alpha: float
              ) -> torch.Tensor:
    """main + lambda * MTP + alpha * balance (aux None: no MoE layer kept its routing)."""
    loss = main + lam * mtp_loss
    return loss if aux is None else loss + alpha * aux


class PipelineLoss:
    """The last stage's loss_fn(output, window): (main CE + lam * mean MTP CE) / n for the step's n micro-batches
    (lam and n set at step time; the balance loss enters each chunk's backward on its own), recording the detached
    (main, MTP) sums over the micro-batches in `sums` for logging."""

    def __init__(self, ce=cross_entropy, lam: float = 0.0, n: int = 1):
        self.ce, self.lam, self.n, self.sums = ce, lam, n, None

    def __call__(self, output, window: torch.Tensor) -> torch.Tensor:
        main, mtp = output_losses(output, window, self.ce)
        mtp_loss = mtp_mean(mtp, main)
        values = torch.stack([main.detach(), mtp_loss.detach()]).double()
        self.sums = values if self.sums is None else self.sums + values
        return objective(main, mtp_loss, None, self.lam, 0.0) / self.n


class ValidationSums:
    """Validation metrics accumulated over batches (`add`) and ranks (`tensor`, all-reduced by the caller), then
    averaged (`metrics`). Each rank's losses are means over its equal share of a batch."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.tensor = torch.zeros(5, dtype=torch.float64, device=device)    # main, mtp, hit, agree, n_mtp

    @torch.no_grad()
    def add(self, window: torch.Tensor, main: torch.Tensor, mtp: list[torch.Tensor], logits: torch.Tensor,
            mtp_logits: list[torch.Tensor]) -> None:
        self.tensor[0] += main.double()
        if mtp:
            self.tensor[1] += mtp[0].double()
            draft = mtp_logits[0].argmax(-1)                         # (B, T-1): guesses of token i+2
            self.tensor[2] += (draft == window[:, 2:]).sum()
            self.tensor[3] += (draft == logits[:, 1:].argmax(-1)).sum()
            self.tensor[4] += draft.numel()

    def metrics(self, n_batches: int, shares: int = 1) -> dict[str, float | None]:
        """val_loss, val_mtp_loss, val_mtp_acc, val_mtp_agree over `n_batches` batches, each split over `shares`
        ranks whose sums `tensor` holds (1: one process saw whole batches)."""
        main, mtp, hit, agree, n_mtp = self.tensor.tolist()
        main, mtp = main / shares, mtp / shares
        return {"val_loss": main / n_batches, "val_mtp_loss": mtp / n_batches if n_mtp else None,
                "val_mtp_acc": hit / n_mtp if n_mtp else None, "val_mtp_agree": agree / n_mtp if n_mtp else None}
