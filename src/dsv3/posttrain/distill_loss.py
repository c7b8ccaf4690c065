"""Logit distillation: forward KL(teacher || student) on the teacher's top-k tokens (Hinton et al. 2015,
arXiv 1503.02531; spec 7 distils R1's reasoning into V3, there by sequence-level SFT data).

Only the teacher's top-k logits per position are kept (a V-wide teacher distribution per token is too large to store
or ship), so the teacher's distribution is its softmax renormalised over those k tokens. By default the student is
renormalised over the same k tokens too: the two are then distributions on one support and the loss is an exact KL,
zero iff they agree there. `renormalize_student=False` uses the student's full-vocabulary log-probs instead, which
also pushes the student's mass off tokens outside the teacher's top-k (the loss is then >= 0 but not 0 for a student
equal to the teacher unless k = V). Forward KL (teacher first) is mean-seeking: the student covers the teacher's modes.

Shapes: N rows, T positions, V vocabulary, K kept tokens; mask (N, T) True on response tokens.
"""

from __future__ import annotations

import torch
from torch import Tensor


def teacher_topk(teacher_logits: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """(N, T, V) -> the k largest logits and their token ids, each (N, T, K): what a teacher run stores."""
    values, ids = torch.topk(teacher_logits, k, dim=-1)
    return values, ids


def topk_forward_kl(student_logits: Tensor, teacher_topk_logits: Tensor, teacher_topk_ids: Tensor, mask: Tensor,
                    temperature: float = 1.0, renormalize_student: bool = True) -> Tensor:
    """Masked mean over response tokens of T^2 * sum_k p_k (log p_k - log q_k), p = softmax(teacher top-k / T) and
    q the student's distribution at temperature T (renormalised on the same k ids, or over the whole vocabulary).
    The T^2 factor (Hinton et al.) keeps the gradient's scale independent of the temperature."""
    assert student_logits.shape[:2] == teacher_topk_ids.shape[:2] == mask.shape, \
        (student_logits.shape, teacher_topk_ids.shape, mask.shape)
    dtype = torch.promote_types(student_logits.dtype, torch.float32)       # log-softmax in at least fp32
    s = student_logits.to(dtype) / temperature
    log_p = torch.log_softmax(teacher_topk_logits.to(dtype) / temperature, dim=-1)          # (N, T, K)
    if renormalize_student:
        log_q = torch.log_softmax(torch.gather(s, -1, teacher_topk_ids), dim=-1)
    else:
        log_q = torch.gather(torch.log_softmax(s, dim=-1), -1, teacher_topk_ids)
    kl = (log_p.exp() * (log_p - log_q)).sum(dim=-1) * temperature ** 2                     # (N, T)
    m = mask.to(dtype)
    return (kl * m).sum() / m.sum().clamp(min=1)
