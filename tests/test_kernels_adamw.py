"""The one-pass AdamW update (dsv3.kernels.adamw): the reference against torch.optim.AdamW (FP32 everything), the
clipping scale against pre-scaled gradients, the Triton kernel against the reference under TRITON_INTERPRET=1 (a
subprocess) and on CUDA, and AdamWBF16 driving it."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import interpreter_cases

from dsv3.kernels.adamw import (HAS_TRITON, adamw_update, adamw_update_reference, adamw_update_triton, join_master,
                                split_master)
from dsv3.train.adamw_bf16 import AdamWBF16

HP = dict(lr=3e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)


def _state(n: int, param_dtype: torch.dtype, state_dtype: torch.dtype, seed: int, device="cpu", split=False):
    """param, grad, m, v, master; `split`: the master as (param = its high half, master = the int16 low half)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, generator=g)
    p = w.to(param_dtype).to(device)
    master = w.clone().to(device) if param_dtype != torch.float32 else None
    if split:
        p, master = (t.to(device) for t in split_master(w))
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
    tensor's own dtype's eps (element-wise relative errors mislead where m cancels towards zero). A split master is
    compared joined (FP32)."""
    out = {}
    if a[4] is not None and a[4].dtype == torch.int16:
        a, b = (t[:4] + (join_master(t[0], t[4]),) for t in (a, b))
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
            "one_element": (1, torch.bfloat16, torch.bfloat16),
            "split_master": (3001, torch.bfloat16, torch.bfloat16, True)}


def _run_cases(device: str) -> dict:
    res = {}
    for name, (n, pd, sd, *split) in _cases().items():
        for scaled in (False, True):
            a = _state(n, pd, sd, seed=n, device=device, split=bool(split))
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
    return _run_cases("cpu") | {"split_consistent": _interpreter_split_consistency()}


def _interpreter_split_consistency() -> bool:
    """The kernel's split store: its (param, low half) are split_master of the FP32 value they join to."""
    p, grad, m, v, lo = _state(3001, torch.bfloat16, torch.bfloat16, seed=5, split=True)
    adamw_update_triton(p, grad, m, v, lo, step=2, **HP)
    hi, lo2 = split_master(join_master(p, lo))
    return torch.equal(hi.view(torch.int16), p.view(torch.int16)) and torch.equal(lo2, lo)


def _assert_close(res: dict) -> None:
    # FP32 rounding (FMA contraction, sqrt/div) in the master: a few eps; stored values: at most one rounding step
    for case, d in res.items():
        for name, ulps in d.items():
            assert ulps <= (8 if name == "master" else 2), (case, name, ulps)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (requirements-ci.txt pins it, so CI runs this)")
def test_triton_interpreter_matches_reference():
    res = interpreter_cases("test_kernels_adamw")
    assert res.pop("split_consistent") is True
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


def test_split_master_round_trips_every_bit_pattern():
    """join_master(split_master(w)) is w bit for bit for a million random FP32 bit patterns and the edge values
    (zeros, denormals, the largest finite, infinities); a NaN stays a NaN; the high half is round-to-nearest-even
    except at exact ties, which go away from zero."""
    g = torch.Generator().manual_seed(0)
    bits = torch.randint(-2 ** 31, 2 ** 31 - 1, (1_000_000,), generator=g, dtype=torch.int64).to(torch.int32)
    edges = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 3.4028234663852886e38, -3.4028234663852886e38,
                          1e-45, -1e-45, 1.1754942e-38, 1.0, -1.0, 1.00390625, -1.00390625])  # the last two: ties
    w = torch.cat([bits.view(torch.float32), edges])
    hi, lo = split_master(w)
    back = join_master(hi, lo)
    finite = ~w.isnan()
    assert torch.equal(back[finite].view(torch.int32), w[finite].view(torch.int32))
    assert back[~finite].isnan().all() and hi[~finite].isnan().all()
    tie = (w.view(torch.int32).long() & 0xFFFF) == 0x8000
    same = finite & ~tie
    assert torch.equal(hi[same].view(torch.int16), w[same].to(torch.bfloat16).view(torch.int16))
    assert (hi[tie].float().abs() > w[tie].abs()).all() and tie[-2:].all()


def test_split_master_update_is_the_fp32_master_update():
    """Five updates on a split master give the FP32 master's updates bit for bit (the same arithmetic on the same
    value), the parameter its high half."""
    p, grad, m, v, master = _state(5000, torch.bfloat16, torch.bfloat16, seed=3)
    hi, lo = split_master(master)
    m2, v2 = m.clone(), v.clone()
    for step in range(1, 6):
        g = torch.randn(5000, generator=torch.Generator().manual_seed(step)).to(torch.bfloat16)
        adamw_update_reference(p, g, m, v, master, step=step, grad_scale=torch.tensor(1.5), **HP)
        adamw_update_reference(hi, g, m2, v2, lo, step=step, grad_scale=torch.tensor(1.5), **HP)
        assert torch.equal(join_master(hi, lo).view(torch.int32), master.view(torch.int32))
        assert torch.equal(hi.view(torch.int16), split_master(master)[0].view(torch.int16))
        assert torch.equal(m, m2) and torch.equal(v, v2)
    with pytest.raises(ValueError, match="split master"):
        adamw_update(p.float(), g, m, v, lo, step=6, **HP)


def _two_optimizers(master_a: str, master_b: str):
    torch.manual_seed(0)
    w = torch.randn(96, 40)
    a, b = torch.nn.Parameter(w.to(torch.bfloat16)), torch.nn.Parameter(w.to(torch.bfloat16))
    return a, b, AdamWBF16([a], lr=1e-2, weight_decay=0.1, master=master_a), AdamWBF16([b], lr=1e-2, weight_decay=0.1,
                                                                                       master=master_b)


def _step_both(a, b, oa, ob, steps: range) -> None:
    for s in steps:
        g = torch.randn(96, 40, generator=torch.Generator().manual_seed(s)).to(torch.bfloat16)
        a.grad, b.grad = g.clone(), g.clone()
        oa.step()
        ob.step()


def test_adamw_bf16_split_master_is_the_fp32_master():
    """AdamWBF16(master="split") keeps the FP32 master of the default, bit for bit, in the parameter and an int16
    low half (2 bytes per parameter, not 4); its parameter is that master's high half."""
    a, b, oa, ob = _two_optimizers("fp32", "split")
    _step_both(a, b, oa, ob, range(6))
    assert set(ob.state[b]) == {"step", "exp_avg", "exp_avg_sq", "master_lo"}
    assert ob.state[b]["master_lo"].dtype == torch.int16
    assert torch.equal(join_master(b.detach(), ob.state[b]["master_lo"]).view(torch.int32),
                       oa.state[a]["master"].view(torch.int32))
    assert torch.equal(b.detach().view(torch.int16), split_master(oa.state[a]["master"])[0].view(torch.int16))


@pytest.mark.parametrize("saved,loaded", [("fp32", "split"), ("split", "fp32"), ("split", "split")])
def test_adamw_bf16_state_dict_loads_into_either_master_layout(saved, loaded):
    """A state dict saved with one `master` setting loads into the other (converted: the same FP32 master), and
    the steps after it are those of the optimizer that never stopped."""
    a, b, oa, ob = _two_optimizers(saved, saved)
    _step_both(a, b, oa, ob, range(3))
    c = torch.nn.Parameter(b.detach().clone())
    oc = AdamWBF16([c], lr=1e-2, weight_decay=0.1, master=loaded)
    oc.load_state_dict(ob.state_dict())
    _step_both(a, c, oa, oc, range(3, 6))
    master = oa.state[a].get("master")
    master = join_master(a.detach(), oa.state[a]["master_lo"]) if master is None else master
    ours = oc.state[c].get("master")
    ours = join_master(c.detach(), oc.state[c]["master_lo"]) if ours is None else ours
    assert torch.equal(ours.view(torch.int32), master.view(torch.int32))
    assert ("master_lo" in oc.state[c]) == (loaded == "split")
