"""The FP8 training recipe's host-side parts (issue 6): the BF16-moment AdamW with FP32 master weights against
torch's FP32 AdamW."""

import copy

import pytest
import torch

from conftest import build, tiny_config
from dsv3.train.adamw_bf16 import AdamWBF16


def _run(model, opt, steps: int, seed: int = 0) -> list[float]:
    g = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        ids = torch.randint(0, model.config.vocab_size, (4, 17), generator=g)
        logits = model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("state_dtype,weight_rel", [(torch.float32, 1e-4), (torch.bfloat16, 1e-2)])
def test_moments_track_fp32_adamw(state_dtype, weight_rel):
    """Same model, data and hyper-parameters for 20 steps vs torch.optim.AdamW. FP32 moments: the same arithmetic
    (weights within 1e-4 of the distance moved, i.e. rounding order only). BF16 moments (2^-9 relative rounding per
    step): within 1% (0.26% measured; a wrong bias correction or weight decay is off by far more). Losses within
    1e-4 relative. (Much longer runs at high learning rates drift apart, as any two float orders do: MoE routing
    flips amplify differences.)"""
    ref = build(tiny_config(), seed=1)
    start = copy.deepcopy(ref.state_dict())
    test = copy.deepcopy(ref)
    kw = dict(lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    want = _run(ref, torch.optim.AdamW(ref.parameters(), **kw), 20)
    opt = AdamWBF16(test.parameters(), state_dtype=state_dtype, **kw)
    got = _run(test, opt, 20)
    assert got == pytest.approx(want, rel=1e-4)
    for (name, a), b in zip(ref.named_parameters(), test.parameters()):
        moved = (a.detach() - start[name]).norm()
        assert (a.detach() - b.detach()).norm() <= weight_rel * moved, name
    s = opt.state[next(test.parameters())]
    assert s["exp_avg"].dtype == s["exp_avg_sq"].dtype == state_dtype and "master" not in s


def test_bf16_weights_keep_fp32_master_weights():
    """BF16 weights: updates of 1e-5 relative vanish in BF16 arithmetic but accumulate in the FP32 master copy."""
    w = torch.nn.Parameter(torch.ones(64, dtype=torch.bfloat16))
    opt = AdamWBF16([w], lr=1e-5, betas=(0.9, 0.95))
    for _ in range(200):
        w.grad = torch.ones_like(w)
        opt.step()
    master = opt.state[w]["master"]
    assert master.dtype == torch.float32
    assert master[0].item() == pytest.approx(1 - 200 * 1e-5, rel=1e-4)      # Adam's step is ~lr for a constant grad
    assert w[0].item() == pytest.approx(master[0].item(), abs=2 ** -8)      # the BF16 weight follows the master
    naive = torch.ones(64, dtype=torch.bfloat16)
    for _ in range(200):
        naive -= 1e-5
    assert naive[0].item() == 1.0                                            # without it, nothing moves


def test_state_dict_round_trip_resumes_exactly():
    model = build(tiny_config(), seed=2)
    opt = AdamWBF16(model.parameters(), lr=1e-3)
    _run(model, opt, 3)
    twin = copy.deepcopy(model)
    opt2 = AdamWBF16(twin.parameters(), lr=1e-3)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert _run(model, opt, 3, seed=5) == _run(twin, opt2, 3, seed=5)


@pytest.mark.parametrize("dtype", ["bf16", "bf16-params", "bf16-params-split"])
def test_fp8_bf16_state_run_resumes_exactly(tmp_path, dtype):
    """train.precision=fp8 with optim.state_dtype=bf16 through the Trainer: a run stopped after its step-4
    checkpoint and resumed gives the same losses for steps 5-8 as an uninterrupted run (exact floats): the FP8
    path is deterministic and the BF16 moments / FP32 masters come back from the checkpoint as saved.
    bf16-params: BF16 weights with FP32 masters in AdamW; -split: the masters split (optim.master = split)."""
    from dsv3.train import Trainer
    from test_train_loop import small_run, train_losses
    split = dtype.endswith("-split")
    dtype = dtype.removesuffix("-split")
    extra = dict(train={"precision": "fp8", "steps": 8, "batch_size_start": 4, "dtype": dtype},
                 optim={"state_dtype": "bf16", "master": "split" if split else "fp32"},
                 checkpoint={"interval": 4, "keep": 0})
    straight = Trainer(small_run(tmp_path, "straight", **extra), progress=False)
    straight.run()
    first = Trainer(small_run(tmp_path, "resumed", **extra), progress=False)
    for _ in range(4):
        first.train_step()
    first.save()
    Trainer(small_run(tmp_path, "resumed", **extra), resume=True, progress=False).run()
    want = train_losses(tmp_path / "straight")
    got = train_losses(tmp_path / "resumed")
    assert [got[s] for s in range(5, 9)] == [want[s] for s in range(5, 9)]
    opt = straight.optimizer
    assert type(opt).__name__ == "AdamWBF16"
    state = opt.state[next(straight.model.parameters())]
    assert state["exp_avg"].dtype == torch.bfloat16
    assert ("master" in state) == (dtype == "bf16-params" and not split)
    assert ("master_lo" in state) == split


def test_lite8l_compare_runs_each_arm_at_each_micro_batch_count_with_the_shared_flags():
    """benchmarks/train_lite8l.py --compare: the flags it sets per run (arm, micro-batches, tag) are taken out of
    the command line, values included, and every other flag is passed on unchanged."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from train_lite8l import COMPARE, _common_flags
    argv = ["--compare", "--micro-batches", "1", "4", "--arms", "bf16,row-exponly", "--compile", "--steps", "5",
            "--precision=fp8", "--fp8-experts", "row", "--fp8-experts-only", "--alpha", "0", "--tag", "x"]
    assert _common_flags(argv) == ["--compile", "--steps", "5", "--alpha", "0"]
    assert COMPARE["row-exponly"][1][-1] == "--fp8-experts-only" and "--fp8-experts-only" not in COMPARE["row"][1]
