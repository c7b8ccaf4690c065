"""dsv3.fp8: DeepSeek-V3's fine-grained FP8 formats (spec 2.3, 4)."""

from .blocks import BLOCK, FP8_MAX, dequantize_weight_blocks, quantize_weight_blocks

__all__ = ["BLOCK", "FP8_MAX", "quantize_weight_blocks", "dequantize_weight_blocks"]
