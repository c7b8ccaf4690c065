"""Top-k forward KL against a float64 formula written here (plain Python, token by token), and zero when the
student is the teacher."""

import math

import pytest
import torch

from dsv3.posttrain.distill_loss import teacher_topk, topk_forward_kl


def _reference(student, teacher, mask, k, temp, renorm):
    total, n = 0.0, 0
    for i in range(len(student)):
        for t in range(len(student[i])):
            if not mask[i][t]:
                continue
            tl = teacher[i][t]
            top = sorted(range(len(tl)), key=lambda v: -tl[v])[:k]
            zt = sum(math.exp(tl[v] / temp) for v in top)
            sl = student[i][t]
            zs = sum(math.exp(sl[v] / temp) for v in (top if renorm else range(len(sl))))
            kl = 0.0
            for v in top:
                p = math.exp(tl[v] / temp) / zt
                q = math.exp(sl[v] / temp) / zs
                kl += p * math.log(p / q)
            total += kl * temp ** 2
            n += 1
    return total / n


@pytest.mark.parametrize("k,temp,renorm", [(4, 1.0, True), (4, 2.0, True), (4, 0.7, False), (16, 1.0, False)])
def test_topk_forward_kl_matches_float64_formula(k, temp, renorm):
    g = torch.Generator().manual_seed(0)
    N, T, V = 2, 5, 16
    student = torch.randn(N, T, V, generator=g, dtype=torch.float64) * 2
    teacher = torch.randn(N, T, V, generator=g, dtype=torch.float64) * 2
    mask = torch.tensor([[False, True, True, True, True], [False, False, True, True, False]])
    vals, ids = teacher_topk(teacher, k)
    got = topk_forward_kl(student, vals, ids, mask, temperature=temp, renormalize_student=renorm)
    want = _reference(student.tolist(), teacher.tolist(), mask.tolist(), k, temp, renorm)
    assert got.item() == pytest.approx(want, rel=1e-10)
    assert got.item() > 0


def test_zero_when_student_is_teacher_and_gradient_flows():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 6, 32, generator=g)
    mask = torch.ones(3, 6, dtype=torch.bool)
    vals, ids = teacher_topk(logits, 5)
    assert topk_forward_kl(logits, vals, ids, mask, temperature=1.5).item() == pytest.approx(0.0, abs=1e-6)
    vals, ids = teacher_topk(logits, 32)     # the whole vocabulary: the unrenormalised form is the exact KL too
    assert topk_forward_kl(logits, vals, ids, mask, renormalize_student=False).item() == pytest.approx(0.0, abs=1e-6)
    # and a differing student gets a gradient that lowers the loss
    student = torch.randn(3, 6, 32, generator=g, requires_grad=True)
    vals, ids = teacher_topk(logits, 5)
    loss = topk_forward_kl(student, vals, ids, mask)
    loss.backward()
    with torch.no_grad():
        assert topk_forward_kl(student - 0.5 * student.grad, vals, ids, mask) < loss
