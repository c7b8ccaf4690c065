"""The training recipe's pieces against independent references: schedules, the sequence-wise balance loss (float64
loop), the bias update rule, MaxVio, recomputation (same gradients, less saved memory), run config parsing."""

import math

import pytest
import torch

from conftest import build, tiny_config
from dsv3.config import ConfigError
from dsv3.train import schedule
from dsv3.train.balance import collect_balance_loss, moe_layers, sequence_balance_loss, update_bias
from dsv3.train.metrics import max_violation
from dsv3.train.config import RunConfig, load_run_config
from dsv3.parallel.recompute import apply_recompute, saved_activation_bytes
from dsv3.train.trainer import lm_losses


def run_cfg(**train) -> RunConfig:
    return RunConfig.from_dict({"model": {"preset": "tiny"}, "train": {"steps": 1000, **train}})


def test_learning_rate_follows_the_v3_shape():
    cfg = run_cfg()
    o, lr = cfg.optim, [schedule.learning_rate(s, cfg) for s in range(1000)]
    warm = round(o.warmup * 1000)
    assert lr[0] == pytest.approx(o.lr / warm) and lr[warm - 1] == pytest.approx(o.lr)
    assert all(a < b for a, b in zip(lr[:warm - 1], lr[1:warm]))                 # linear warm-up
    assert set(lr[warm:676]) == {o.lr}                                            # constant to 10T/14.8T
    decay = lr[676:966]
    assert all(a >= b for a, b in zip(decay, decay[1:])) and decay[0] == pytest.approx(o.lr)
    mid = 676 + (966 - 676) // 2                                                  # cosine: half-way at the mean
    assert lr[mid] == pytest.approx(o.lr * (1 + o.min_lr_ratio) / 2, rel=0.02)
    assert lr[966:989] == pytest.approx([2.2e-5] * 23)
    assert lr[989:] == pytest.approx([7.3e-6] * 11, rel=1e-2)


def test_batch_ramp_mtp_weight_and_bias_speed():
    cfg = run_cfg(batch_size=64, batch_size_start=16, micro_batch_size=8, batch_ramp=0.1)
    b = [schedule.batch_size(s, cfg) for s in range(1000)]
    assert b[0] == 16 and b[100:] == [64] * 900 and all(x % 8 == 0 for x in b)
    assert all(x <= y for x, y in zip(b, b[1:]))
    assert schedule.mtp_weight(0, cfg) == 0.3 and schedule.mtp_weight(999, cfg) == 0.1
    assert schedule.bias_update_speed(965, cfg) == 0.001 and schedule.bias_update_speed(966, cfg) == 0.0


def test_sequence_balance_loss_matches_a_float64_loop():
    torch.manual_seed(0)
    B, T, E, K = 3, 7, 8, 2
    scores = torch.rand(B, T, E, dtype=torch.float64)
    idx = torch.stack([torch.randperm(E)[:K] for _ in range(B * T)]).view(B, T, K)
    ref = 0.0
    for b in range(B):
        for i in range(E):
            f = E / (K * T) * sum(int(i in idx[b, t].tolist()) for t in range(T))
            p = sum(scores[b, t, i].item() / scores[b, t].sum().item() for t in range(T)) / T
            ref += f * p / B
    assert sequence_balance_loss(scores, idx).item() == pytest.approx(ref, rel=1e-12)
    # perfectly balanced and uniform: sum_i f_i P_i = 1
    uniform = torch.ones(1, 4, 4, dtype=torch.float64)
    assert sequence_balance_loss(uniform, torch.tensor([[[0], [1], [2], [3]]])).item() == pytest.approx(1.0)


def test_balance_loss_gradient_flows_to_the_gate_only_through_scores():
    model = build(tiny_config(), seed=1).train()
    layers = moe_layers(model)
    for _, m in layers:
        m.keep_routing = True
    model(torch.randint(0, 128, (2, 9)))
    loss = collect_balance_loss(layers)
    loss.backward()
    assert all(m.routing is None for _, m in layers)
    gate = layers[0][1].gate.weight
    assert gate.grad is not None and gate.grad.abs().sum() > 0
    assert model.lm_head.weight.grad is None


def test_bias_update_moves_against_load_and_maxvio():
    model = build(tiny_config(n_routed_experts=4, num_experts_per_tok=1, n_group=1, topk_group=1), bias=False)
    layers = moe_layers(model)
    loads = torch.tensor([[10, 2, 4, 4]] * len(layers))
    update_bias(layers, loads, 0.01)
    bias = layers[0][1].gate.e_score_correction_bias
    assert bias.tolist() == pytest.approx([-0.01, 0.01, 0.01, 0.01])             # mean is 5
    update_bias(layers, loads, 0.0)
    assert bias.tolist() == pytest.approx([-0.01, 0.01, 0.01, 0.01])
    assert max_violation(loads[0].numpy()) == pytest.approx(10 / 5 - 1)
    assert max_violation([0, 0, 0, 0]) == 0.0


def test_recompute_gives_the_same_gradients_with_less_saved_memory():
    cfg = tiny_config(num_hidden_layers=2)
    window = torch.randint(0, 128, (2, 33), generator=torch.Generator().manual_seed(3))
    grads, mem = [], []
    for recompute in (False, True):
        model = build(cfg, seed=2).train()
        if recompute:
            assert apply_recompute(model) > 0 and apply_recompute(model) == 0       # idempotent
        main, mtp = None, None

        def forward():
            nonlocal main, mtp
            main, mtp, _, _ = lm_losses(model, window)
        mem.append(saved_activation_bytes(forward))
        (main + 0.3 * mtp[0]).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=0, atol=0, msg=n)
    assert mem[1] < 0.8 * mem[0]


def test_gate_stays_fp32_and_experts_run_in_autocast_dtype():
    model = build(tiny_config(), seed=4).train()
    x = torch.randint(0, 128, (2, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        moe = model.layers[1].mlp
        w, idx, scores = moe.gate.route(torch.randn(5, 64))
        logits = model(x)
    assert scores.dtype == torch.float32 and w.dtype == torch.float32
    assert logits.dtype == torch.bfloat16
    ref = model(x)
    assert (logits.float() - ref).abs().max() < 0.05 * ref.abs().max()


def test_run_config_overrides_and_errors(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('run_dir = "runs/x"\n[model]\npreset = "tiny"\nhidden_size = 96\n[train]\nsteps = 5\n')
    cfg = load_run_config(path, ["train.steps=7", "optim.lr=1e-3", 'data.sources=["stdlib", "a.txt"]',
                                 "train.recompute=true"])
    assert (cfg.train.steps, cfg.optim.lr, cfg.data.sources, cfg.train.recompute) == (7, 1e-3, ["stdlib", "a.txt"],
                                                                                       True)
    assert cfg.model.hidden_size == 96 and cfg.run_dir == "runs/x"
    assert RunConfig.from_dict(cfg.to_dict()) == cfg                              # checkpoints store to_dict
    for bad, msg in [(["train.stepz=3"], "unknown keys"), (["bogus.x=1"], "unknown sections"),
                     (["train.micro_batch_size=3"], "multiple"), (["steps=3"], "section.key"),
                     (["data.seq_len=100000"], "max_position"), (["model.hidden_size=-1"], "hidden_size")]:
        with pytest.raises(ConfigError, match=msg):
            load_run_config(path, bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_run_config(tmp_path / "missing.toml")
    assert math.isclose(RunConfig().optim.betas[1], 0.95)
