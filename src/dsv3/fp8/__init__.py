"""FP8: the released checkpoint's 128x128 block format and the FP8 training recipe (TR 3.3).

Block quantisation has one implementation, dsv3.kernels.fp8_quant (the reference and its Triton kernel, bit-equal):
`quantize_blocks(w)` -> (e4m3 weight, fp32 scale) where the scale is the checkpoint's `weight_scale_inv`
(W = W_fp8 * scale_inv per 128x128 block, edge blocks partial; spec 2.3), `dequantize_blocks(q, scale_inv, dtype)`.
"""

from ..kernels.fp8_quant import BLOCK, FP8_MAX, dequantize_blocks, quantize_blocks

__all__ = ["BLOCK", "FP8_MAX", "dequantize_blocks", "quantize_blocks"]
