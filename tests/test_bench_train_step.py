"""benchmarks/train_lite8l.py's pieces that issue 17's numbers rest on: `--config` times the run a config file
describes (its model, precision, batch and recomputation untouched; only run directory, validation, checkpoints and
the batch ramp set for timing), and the MTP module's FLOPs per token (their own MFU column), counted here a second
way from the module's parameters."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from train_lite8l import config_file_run, flops_per_token, mtp_flops_per_token  # noqa: E402

from dsv3.config import load_model_config  # noqa: E402
from dsv3.model import Transformer  # noqa: E402
from dsv3.train.config import load_run_config  # noqa: E402


def test_config_run_keeps_the_file_settings_and_sets_only_timing(tmp_path):
    a = argparse.Namespace(config=str(ROOT / "configs" / "lite.toml"), set=["train.seed=3"], tag=None,
                           data_cache=str(tmp_path / "data"))
    cfg, tag = config_file_run(a, world=1)
    want = load_run_config(ROOT / "configs" / "lite.toml")
    assert tag == "config_lite"
    assert cfg.model == want.model and cfg.model.num_hidden_layers == 27
    assert (cfg.optim, cfg.balance, cfg.mtp) == (want.optim, want.balance, want.mtp)
    for key in ("dtype", "compile", "recompute", "batch_size", "micro_batch_size", "precision", "device"):
        assert getattr(cfg.train, key) == getattr(want.train, key), key
    assert cfg.train.recompute and cfg.train.seed == 3 and cfg.train.batch_size_start == 0
    assert cfg.log.val_batches == 0 and cfg.checkpoint.interval == 0 and cfg.run_dir != want.run_dir


def test_mtp_flops_count_the_module_and_the_shared_head_again():
    with torch.device("meta"):
        model = Transformer(load_model_config("lite-8L"))
    cfg, seq = model.config, 2048
    matmul = 0
    for name, p in model.mtp.named_parameters():
        if p.ndim < 2:
            continue                                           # norms: not matmuls
        routed = ".experts." in name
        matmul += p.numel() * (cfg.num_experts_per_tok / cfg.n_routed_experts if routed else 1)
    matmul += model.lm_head.weight.numel()                     # each MTP depth runs the shared head once more
    attn = 3 * cfg.num_attention_heads * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim) * seq
    assert abs(mtp_flops_per_token(model, seq) - (6 * matmul + attn)) / (6 * matmul + attn) < 1e-9
    assert 0.3 < mtp_flops_per_token(model, seq) / flops_per_token(model, seq)["flops_per_token"] < 0.37
    with torch.device("meta"):
        assert mtp_flops_per_token(Transformer(cfg.replace(num_nextn_predict_layers=0)), seq) == 0.0
