"""The one-pass AdamW update (dsv3.kernels.adamw): the reference against torch.optim.AdamW (FP32 everything), the
clipping scale against pre-scaled gradients, the Triton kernel against the reference under TRITON_INTERPRET=1 (a
subprocess) and on CUDA, and AdamWBF16 driving it."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import interpreter_cases

from dsv3.kernels.adamw import HAS_TRITON, adamw_update, adamw_update_reference, adamw_update_triton
from dsv3.train.adamw_bf16 import AdamWBF16

HP = dict(lr=3e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)


def _state(n: int, param_dtype: torch.dtype, state_dtype: torch.dtype, seed: int, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, generator=g)
    p = w.to(param_dtype).to(device)
    master = w.clone().to(device) if param_dtype != torch.float32 else None
    grad = (torch.randn(n, generator=g) * 0.1).to(param_dtype).to(device)
    m = (torch.randn(n, generator=g) * 0.01).to(state_dtype).to(device)
    v = (torch.rand(n, generator=g) * 1e-3).to(state_dtype).to(device)
    return p, grad, m, v, master


def test_reference_is_torch_adamw_in_fp32():
    torch.manual_seed(0)
    w = torch.randn(257, 33)
    ours = w.clone()
    m, v = torch.zeros_like(w), torch.zeros_like(w)
    theirs = torch.nn.Parameter(w.clone())
    opt = torch.optim.AdamW([theirs], lr=HP["lr"], betas=(HP["beta1"], HP["beta2"]), eps=HP["eps"],
                            weight_decay=HP["weight_decay"], foreach=False)
    for step in range(1, 6):
        grad = torch.randn_like(w)
        adamw_update_reference(ours, grad, m, v, None, step=step, **HP)
        theirs.grad = grad.clone()
        opt.step()
    torch.testing.assert_close(ours, theirs.detach(), rtol=1e-5, atol=1e-7)


def test_grad_scale_divides_the_gradient():
    a = _state(1000, torch.bfloat16, torch.bfloat16, seed=1)
    b = tuple(t.clone() if t is not None else None for t in a)
    scale = torch.tensor(3.5)
    adamw_update_reference(*a, step=7, grad_scale=scale, **HP)
    p, grad, m, v, master = b
    adamw_update_reference(p, (grad.float() / scale), m, v, master, step=7, **HP)
    for x, y in ((a[0], p), (a[2], m), (a[3], v), (a[4], master)):      # param, moments, master
        assert torch.equal(x, y)


def test_checks_refuse_bad_inputs():
    p, grad, m, v, master = _state(10, torch.bfloat16, torch.bfloat16, seed=2)
    with pytest.raises(ValueError, match="FP32 master"):
        adamw_update(p, grad, m, v, None, step=1, **HP)
    with pytest.raises(ValueError, match="one shape"):
        adamw_update(p, grad[:5], m, v, master, step=1, **HP)


def _compare(a, b) -> dict:
    """Largest difference per tensor (param, m, v, master) relative to the tensor's largest value, in units of the
    tensor's own dtype's eps (element-wise relative errors mislead where m cancels towards zero)."""
    out = {}
    for name, x, y in zip(("param", "grad", "m", "v", "master"), a, b):
        if x is None or name == "grad":
            continue
        d = ((x.double() - y.double()).abs().max() / y.double().abs().max().clamp_min(1e-30)).item()
        out[name] = d / torch.finfo(x.dtype).eps
    return out


def _cases():
    return {"bf16_param_bf16_state": (3001, torch.bfloat16, torch.bfloat16),
            "bf16_param_fp32_state": (4096, torch.bfloat16, torch.float32),
            "fp32_param_bf16_state": (77, torch.float32, torch.bfloat16),
            "one_element": (1, torch.bfloat16, torch.bfloat16)}


def _run_cases(device: str) -> dict:
    res = {}
    for name, (n, pd, sd) in _cases().items():
        for scaled in (False, True):
            a = _state(n, pd, sd, seed=n, device=device)
            b = tuple(t.clone() if t is not None else None for t in a)
            scale = torch.tensor(2.0, device=device) if scaled else None
            adamw_update_triton(*a, step=3, grad_scale=scale, **HP)
            adamw_update_reference(*b, step=3, grad_scale=scale, **HP)
            res[f"{name}_scaled={scaled}"] = _compare(a, b)
    return res


def _interpreter_cases() -> dict:
    assert os.environ.get("TRITON_INTERPRET") == "1"
    from dsv3.kernels.triton_setup import patch_interpreter_for_numpy2
    patch_interpreter_for_numpy2()
    return _run_cases("cpu")


def _assert_close(res: dict) -> None:
    # FP32 rounding (FMA contraction, sqrt/div) in the master: a few eps; stored values: at most one rounding step
    for case, d in res.items():
        for name, ulps in d.items():
            assert ulps <= (8 if name == "master" else 2), (case, name, ulps)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (requirements-ci.txt pins it, so CI runs this)")
def test_triton_interpreter_matches_reference():
    res = interpreter_cases("test_kernels_adamw")
    assert len(res) == 2 * len(_cases())
    _assert_close(res)


@pytest.mark.skipif(not (HAS_TRITON and torch.cuda.is_available()), reason="needs CUDA and triton")
def test_triton_matches_reference_on_cuda():
    _assert_close(_run_cases("cuda"))


def test_adamw_bf16_optimizer_uses_grad_scale():
    torch.manual_seed(0)
    w = torch.randn(64, 16)
    a, b = torch.nn.Parameter(w.to(torch.bfloat16)), torch.nn.Parameter(w.to(torch.bfloat16))
    oa, ob = AdamWBF16([a], lr=1e-2, weight_decay=0.1), AdamWBF16([b], lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        g = torch.randn(64, 16).to(torch.bfloat16)
        a.grad, b.grad = g.clone() * 4, (g.float() * 4 / 4).to(torch.bfloat16)
        oa.grad_scale = torch.tensor(4.0)
        oa.step()
        ob.step()
    assert torch.equal(a, b)
    assert torch.equal(oa.state[a]["master"], ob.state[b]["master"])
