"""The V3 pre-training schedules (spec 3, TR 4.2), as functions of the step and the run's length.

Learning rate: linear warm-up, constant, cosine decay to min_lr_ratio * lr, constant, then a final lower
constant. Batch size: linear ramp from batch_size_start to batch_size over the first `batch_ramp` of the run, in
whole micro-batches. MTP weight lambda: 0.3 then 0.1. Bias update speed gamma: 0.001 then 0 for the final phase.
All positions are fractions of the run, so a 200-step CPU run has the same shape as the 14.8T-token one.
"""

import math

from .config import RunConfig


def learning_rate(step: int, cfg: RunConfig) -> float:
    """The learning rate of optimizer step `step` (0-based)."""
    o, total = cfg.optim, cfg.train.steps
    warmup_steps = max(1, round(o.warmup * total)) if o.warmup > 0 else 0
    if step < warmup_steps:
        return o.lr * (step + 1) / warmup_steps
    p = step / total
    if p < o.constant_until:
        return o.lr
    if p < o.decay_until:
        t = (p - o.constant_until) / (o.decay_until - o.constant_until)
        return o.lr * (o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))
    if p < o.final_at:
        return o.lr * o.min_lr_ratio
    return o.lr * o.final_lr_ratio


def batch_size(step: int, cfg: RunConfig) -> int:
    """Sequences in optimizer step `step`: a multiple of micro_batch_size."""
    t = cfg.train
    ramp_steps = round(t.batch_ramp * t.steps)
    if not t.batch_size_start or step >= ramp_steps:
        return t.batch_size
    b = t.batch_size_start + (t.batch_size - t.batch_size_start) * step / ramp_steps
    return max(t.micro_batch_size, int(b) // t.micro_batch_size * t.micro_batch_size)


def mtp_weight(step: int, cfg: RunConfig) -> float:
    return cfg.mtp.weight if step / cfg.train.steps < cfg.mtp.switch_at else cfg.mtp.final_weight


def bias_update_speed(step: int, cfg: RunConfig) -> float:
    b = cfg.balance
    return b.bias_update_speed if step / cfg.train.steps < b.bias_freeze_at else 0.0
