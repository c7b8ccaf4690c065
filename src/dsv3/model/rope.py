"""Rotary embedding in DeepSeek's interleaved convention, with YaRN (spec 1.5).

Pairs (2j, 2j+1) of the 64-dim rope part rotate by frequency j (not NeoX half-split). Under YaRN the frequencies
blend between f_j (extrapolate, low j) and f_j/s (interpolate, high j) over a linear ramp between the correction
dims of beta_fast and beta_slow; cos/sin are multiplied by attention_factor = mscale(s, mscale)/mscale(s,
mscale_all_dim) (1.0 for V3), and the softmax scale by mscale(s, mscale_all_dim)^2 (see ModelConfig.softmax_scale).
Frequencies are recomputed from the config on each forward (a handful of tiny ops) so that no buffer can be cast
to bf16 or left uninitialised by meta-device construction.
"""

import math

import torch

from ..config import ModelConfig, yarn_mscale
from .layers import upcast


def rope_frequencies(cfg: ModelConfig, device: torch.device | str | None = None) -> tuple[torch.Tensor, float]:
    """(inv_freq (R/2,) fp32, attention_factor); same float32 arithmetic as DeepSeek's and HF's code."""
    dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
    pos_freqs = base ** (torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim)
    inv_freq = 1.0 / pos_freqs
    y = cfg.yarn()
    if y is None:
        return inv_freq, 1.0
    s, orig = y["factor"], y["original_max_position_embeddings"]

    def corr_dim(rotations: float) -> float:
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = corr_dim(y["beta_fast"]), corr_dim(y["beta_slow"])
    if y["truncate"]:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, device=device, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    smooth = 1 - ramp  # 1: keep f_j (extrapolation), 0: f_j / s (interpolation)
    inv_freq = (inv_freq / s) * (1 - smooth) + inv_freq * smooth
    if y["attention_factor"] is not None:
        attn = float(y["attention_factor"])
    elif y["mscale"] and y["mscale_all_dim"]:
        attn = yarn_mscale(s, y["mscale"]) / yarn_mscale(s, y["mscale_all_dim"])
    else:
        attn = yarn_mscale(s)
    return inv_freq, attn


def rope_cos_sin(cfg: ModelConfig, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape positions.shape + (R/2,), fp32."""
    inv_freq, attn = rope_frequencies(cfg, positions.device)
    angles = positions.float()[..., None] * inv_freq
    return angles.cos() * attn, angles.sin() * attn


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of x (B, T, H, R) by cos/sin (T, R/2) or (B, T, R/2); math in fp32."""
    if cos.dim() == 2:
        cos, sin = cos[None], sin[None]
    cos, sin = cos[:, :, None], sin[:, :, None]  # broadcast over heads
    xf = upcast(x).unflatten(-1, (-1, 2))
    x1, x2 = xf[..., 0], xf[..., 1]
    out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.flatten(-2).to(x.dtype)
