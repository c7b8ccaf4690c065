import math

import pytest
import torch

from dsv3 import load_model_config
from dsv3.model import apply_rope, rope_frequencies

from conftest import tiny_config


def test_v3_yarn_matches_spec_numbers():
    """Spec 1.5: low = 10, high = 23 for the released config; softmax scale 0.1352338; cos/sin unscaled."""
    cfg = load_model_config("v3-671b")
    inv_freq, attn = rope_frequencies(cfg)
    base = 1.0 / (10000 ** (torch.arange(0, 64, 2, dtype=torch.float64) / 64))
    assert attn == 1.0
    assert torch.allclose(inv_freq[:11].double(), base[:11], rtol=1e-6)        # j <= 10 extrapolate
    assert torch.allclose(inv_freq[23:].double(), base[23:] / 40, rtol=1e-6)   # j >= 23 interpolate
    j = 16
    ramp = (j - 10) / (23 - 10)
    assert inv_freq[j].item() == pytest.approx(base[j].item() / 40 * ramp + base[j].item() * (1 - ramp), rel=1e-6)
    assert cfg.softmax_scale == pytest.approx(192 ** -0.5 * (0.1 * math.log(40) + 1) ** 2, rel=1e-12)
    assert cfg.softmax_scale == pytest.approx(0.1352338, abs=1e-7)


def test_interleaved_rotation_is_complex_multiplication():
    """Pairs (2j, 2j+1) rotate as the complex number x_2j + i x_2j+1 times e^{i theta_j} (DeepSeek's
    view_as_complex)."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 3, 8, dtype=torch.float64)
    theta = torch.randn(5, 4, dtype=torch.float64)
    out = apply_rope(x, theta.cos(), theta.sin())
    rotation = torch.polar(torch.ones_like(theta), theta)[None, :, None]
    ref = torch.view_as_real(torch.view_as_complex(x.view(2, 5, 3, 4, 2)) * rotation)
    assert torch.allclose(out, ref.flatten(-2), atol=1e-12)


def test_no_scaling_gives_plain_rope():
    cfg = tiny_config(rope_scaling=None)
    inv_freq, attn = rope_frequencies(cfg)
    assert attn == 1.0
    assert torch.allclose(inv_freq, 1.0 / (10000 ** (torch.arange(0, 8, 2).float() / 8)))
    assert cfg.softmax_scale == pytest.approx(24 ** -0.5)
