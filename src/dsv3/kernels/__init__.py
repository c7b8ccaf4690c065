"""Custom kernels (Triton) with plain-PyTorch references of the same signature."""

from .fp8_gemm import (fp8_gemm, fp8_gemm_reference, fp8_gemm_scaled_mm, fp8_gemm_triton, fp8_grouped_gemm,
                       fp8_grouped_gemm_reference, fp8_grouped_gemm_triton)
from .fp8_quant import (dequantize_blocks, dequantize_tiles, quantize_blocks, quantize_blocks_reference,
                        quantize_blocks_triton, quantize_tiles, quantize_tiles_reference, quantize_tiles_transposed,
                        quantize_tiles_transposed_reference, quantize_tiles_transposed_triton, quantize_tiles_triton)
from .fp8_weight_gemm import (fp8_grouped_linear, fp8_grouped_linear_reference, fp8_grouped_linear_triton,
                              fp8_linear, fp8_linear_reference, fp8_linear_triton)
from .mla_decode import (HAS_TRITON, mla_decode, mla_decode_bytes, mla_decode_num_splits, mla_decode_reference,
                         mla_decode_triton)

__all__ = ["HAS_TRITON", "dequantize_blocks", "dequantize_tiles", "fp8_gemm", "fp8_gemm_reference",
           "fp8_gemm_scaled_mm", "fp8_gemm_triton", "fp8_grouped_gemm", "fp8_grouped_gemm_reference",
           "fp8_grouped_gemm_triton", "fp8_grouped_linear", "fp8_grouped_linear_reference",
           "fp8_grouped_linear_triton", "fp8_linear", "fp8_linear_reference", "fp8_linear_triton", "mla_decode",
           "mla_decode_bytes", "mla_decode_num_splits", "mla_decode_reference", "mla_decode_triton",
           "quantize_blocks", "quantize_blocks_reference", "quantize_blocks_triton", "quantize_tiles",
           "quantize_tiles_reference", "quantize_tiles_transposed", "quantize_tiles_transposed_reference",
           "quantize_tiles_transposed_triton", "quantize_tiles_triton"]
