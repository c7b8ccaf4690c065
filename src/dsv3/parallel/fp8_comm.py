"""FP8 communication for expert parallelism (spec 4, "low-precision communication"; TR 3.3.4): the activations a
rank dispatches to the experts, and in the backward the activation gradients sent back to the experts' down
projection, travel as E4M3 with one power-of-2 scale per 1x128 tile: 1 + 4/128 bytes per value instead of BF16's 2
(0.52x). Both directions of the combine stay in BF16. The receiver dequantises, so the experts see the values an
FP8 GEMM's own 1x128 quantisation of them would give (the report feeds them to the FP8 GEMM directly).

The quantisation is a straight-through estimator in autograd: the backward of an FP8 dispatch is the plain reverse
exchange of the gradient (`dsv3.parallel.expert.exchange_rows`).
"""

from collections.abc import Callable

import torch

from ..kernels.fp8_quant import dequantize_tiles, quantize_tiles


def send_fp8(x: torch.Tensor, send: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """send(rows) moves rows between ranks (an all-to-all with fixed splits): here it moves x (M, D)'s E4M3 values
    (as bytes: gloo has no fp8 type) and its (M, ceil(D/128)) fp32 tile scales, and returns the dequantised rows
    in x's dtype."""
    q, scale = quantize_tiles(x.contiguous(), pow2=True)
    q = send(q.view(torch.uint8)).view(torch.float8_e4m3fn)
    return dequantize_tiles(q, send(scale), x.dtype)
