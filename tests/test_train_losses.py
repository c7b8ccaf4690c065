"""The one objective / validation module (dsv3.train.losses) against the formulas written out here in float64: the
trainer's step loss, a pipeline's last-stage loss on the same output, and the validation metrics."""

import torch
import torch.nn.functional as F
from conftest import build, tiny_config

from dsv3.train.balance import collect_balance_loss, moe_layers
from dsv3.train.losses import PipelineLoss, ValidationSums, lm_losses, mtp_mean, objective

LAM, ALPHA = 0.3, 0.01


def _model_and_window(seed=0):
    cfg = tiny_config(num_hidden_layers=2, first_k_dense_replace=1)
    model = build(cfg, dtype=torch.float64).eval()
    window = torch.randint(0, cfg.vocab_size, (3, 9), generator=torch.Generator().manual_seed(seed))
    return model, window


def _ce(logits, targets):
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def test_objective_is_main_plus_weighted_mtp_and_balance():
    model, window = _model_and_window()
    for _, m in moe_layers(model):
        m.keep_routing = True
    main, mtp, logits, mtp_logits = lm_losses(model, window, _ce)
    aux = collect_balance_loss(moe_layers(model))
    loss = objective(main, mtp_mean(mtp, main), aux, LAM, ALPHA)
    # written out: the head on the final hidden states, MTP depth 1 predicting token i+2
    ref_main = F.cross_entropy(logits.flatten(0, 1), window[:, 1:].flatten())
    ref_mtp = F.cross_entropy(mtp_logits[0].flatten(0, 1), window[:, 2:].flatten())
    assert torch.allclose(loss, ref_main + LAM * ref_mtp + ALPHA * aux, rtol=1e-14, atol=0)
    assert aux.item() > 0 and len(mtp) == 1
    # no balance term where no layer kept its routing; no MTP term without MTP depths
    assert torch.equal(objective(main, mtp_mean([], main), None, LAM, ALPHA), main)


def test_pipeline_loss_is_the_trainer_objective_on_the_last_stage_output():
    model, window = _model_and_window(1)
    main, mtp, logits, mtp_logits = lm_losses(model, window, _ce)
    loss_fn = PipelineLoss(_ce, lam=LAM, n=4)
    got = loss_fn((logits, *mtp_logits), window)
    assert torch.allclose(got, objective(main, mtp_mean(mtp, main), None, LAM, 0.0) / 4, rtol=1e-14, atol=0)
    loss_fn((logits, *mtp_logits), window)
    assert torch.allclose(loss_fn.sums, 2 * torch.stack([main, mtp[0]]).detach(), rtol=1e-14, atol=0)
    assert torch.equal(PipelineLoss(_ce)(logits, window), main)           # logits alone: no MTP


def test_validation_sums_average_over_batches_and_shares():
    model, _ = _model_and_window()
    sums, by_hand = ValidationSums(), {"main": 0.0, "mtp": 0.0, "hit": 0, "agree": 0, "n": 0}
    for seed in range(3):
        _, window = _model_and_window(seed)
        with torch.no_grad():
            main, mtp, logits, mtp_logits = lm_losses(model, window, _ce)
        sums.add(window, main, mtp, logits, mtp_logits)
        draft = mtp_logits[0].argmax(-1)
        by_hand["main"] += main.item()
        by_hand["mtp"] += mtp[0].item()
        by_hand["hit"] += int((draft == window[:, 2:]).sum())
        by_hand["agree"] += int((draft == logits.argmax(-1)[:, 1:]).sum())
        by_hand["n"] += draft.numel()
    out = sums.metrics(3, shares=1)
    assert abs(out["val_loss"] - by_hand["main"] / 3) < 1e-12
    assert abs(out["val_mtp_loss"] - by_hand["mtp"] / 3) < 1e-12
    assert out["val_mtp_acc"] == by_hand["hit"] / by_hand["n"]
    assert out["val_mtp_agree"] == by_hand["agree"] / by_hand["n"]
    # two ranks holding the same sums (each the mean over its half of every batch) average to the same losses
    sums.tensor *= 2
    assert abs(sums.metrics(3, shares=2)["val_loss"] - by_hand["main"] / 3) < 1e-12
