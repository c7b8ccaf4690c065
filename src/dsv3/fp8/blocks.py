"""128x128 block-scaled e4m3 weights, the released checkpoint format (spec 2.3).

`weight_scale_inv` (fp32, shape [ceil(out/128), ceil(in/128)]) is the *multiplier* that dequantises each block:
W[blk] = W_fp8[blk] * scale_inv[blk]. Edge blocks of shapes that are not multiples of 128 (kv_a_proj: 576 rows)
are zero-padded to compute their scale and the padding dropped afterwards.
"""

import torch

BLOCK = 128
FP8_MAX = 448.0  # largest finite float8_e4m3fn


def _pad_to_blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    rows, cols = x.shape
    return torch.nn.functional.pad(x, (0, -cols % block, 0, -rows % block))


def quantize_weight_blocks(w: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """w (out, in) -> (e4m3 weight (out, in), fp32 scale_inv (ceil(out/block), ceil(in/block)))."""
    if w.dim() != 2:
        raise ValueError(f"block quantisation needs a 2-D weight, got shape {tuple(w.shape)}")
    rows, cols = w.shape
    padded = _pad_to_blocks(w.float(), block)
    nr, nc = padded.shape[0] // block, padded.shape[1] // block
    blocks = padded.view(nr, block, nc, block)
    amax = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12)          # an all-zero block keeps a finite scale
    scale_inv = amax / FP8_MAX
    q = (blocks / scale_inv[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX)  # clamp explicitly: CPU casts saturate, GPU ones may not
    q = q.view_as(padded)[:rows, :cols].to(torch.float8_e4m3fn)
    return q.contiguous(), scale_inv.contiguous()


def dequantize_weight_blocks(w: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype = torch.bfloat16,
                             block: int = BLOCK) -> torch.Tensor:
    """Inverse of quantize_weight_blocks: each block times its scale_inv (in fp32, or fp64 if asked), cast to dtype."""
    rows, cols = w.shape
    expected = (-(-rows // block), -(-cols // block))
    if tuple(scale_inv.shape) != expected:
        raise ValueError(f"scale_inv shape {tuple(scale_inv.shape)} does not match weight {tuple(w.shape)} "
                         f"(expected {expected} for {block}x{block} blocks)")
    compute = torch.promote_types(dtype, torch.float32)  # the e4m3 value times its fp32 scale, exact in fp32
    s = scale_inv.to(compute).repeat_interleave(block, 0)[:rows].repeat_interleave(block, 1)[:, :cols]
    return (w.to(compute) * s).to(dtype)
