"""Causal softmax attention without an S x S score matrix in memory, for MLA's naive form (training, prefill).

Queries q (B, H, T, Dq) are the last T of S positions; keys k (B, H, S, Dq), values v (B, H, S, Dv). Query i sits
at position S - T + i and sees the keys at positions <= its own (causal, "lower-right" aligned when T < S, as in
chunked prefill over a cache). MLA has Dq = 192 != Dv = 128 (spec 1.3): the fused kernels (flash on GPU, PyTorch's
blocked flash kernel on CPU) need equal head dims, and with unequal ones SDPA falls back to the math kernel, which
materialises (B, H, T, S) scores: 2.5 GiB for 8K tokens and 4 tiny heads. So:

1. v is zero-padded to Dq (or q and k to Dv where that is wider): the padded output columns are exactly 0 and are
   cut off again; the extra PV work is Dq / Dv = 1.5x of one of the two attention matmuls.
2. T == S (training, a whole prompt): one SDPA call with is_causal, served by a fused kernel on GPU and CPU:
   memory O(S).
3. T < S (a prefill chunk after cached tokens): query blocks of `block` rows. Block [i0, i1) needs the keys
   [0, S - T + i1) under a (i1 - i0) x (S - T + i1) mask, so memory is O(block x S): linear in S.
`query_block_attention` is also usable for T == S (the tests check both paths against the fp64 math reference).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

QUERY_BLOCK = 1024


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                     block: int = QUERY_BLOCK) -> torch.Tensor:
    """softmax(q k^T * scale + causal) v for queries at the last T of S positions: (B, H, T, Dv)."""
    T, S, dv = q.shape[-2], k.shape[-2], v.shape[-1]
    if T > S:
        raise ValueError(f"{T} queries but only {S} keys: the queries must be the last T positions")
    width = max(q.shape[-1], dv)
    q, k, v = _pad_to(q, width), _pad_to(k, width), _pad_to(v, width)   # zero columns change no q.k product
    if T == S and T > 1:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    elif T == 1:          # one query at the last position sees every key
        out = F.scaled_dot_product_attention(q, k, v, scale=scale)
    else:
        out = query_block_attention(q, k, v, scale, block)
    return out[..., :dv]


def query_block_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                          block: int = QUERY_BLOCK) -> torch.Tensor:
    """The same function in blocks of `block` queries, each over only the keys it can see (O(block x S) memory)."""
    T, S = q.shape[-2], k.shape[-2]
    past = S - T
    outs = []
    for i0 in range(0, T, block):
        i1 = min(i0 + block, T)
        end = past + i1                                    # the block's last query sees keys [0, end)
        keys = torch.arange(end, device=q.device)
        mask = keys[None, :] <= torch.arange(past + i0, end, device=q.device)[:, None]
        outs.append(F.scaled_dot_product_attention(q[..., i0:i1, :], k[..., :end, :], v[..., :end, :],
                                                   attn_mask=mask, scale=scale))
    return torch.cat(outs, dim=-2)


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """The exact math form with the full (B, H, T, S) score matrix, in the inputs' dtype (tests, fp64)."""
    T, S = q.shape[-2], k.shape[-2]
    scores = (q @ k.transpose(-1, -2)) * scale
    keys = torch.arange(S, device=q.device)
    mask = keys[None, :] <= torch.arange(S - T, S, device=q.device)[:, None]
    return scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v


def _pad_to(v: torch.Tensor, dim: int) -> torch.Tensor:
    return v if v.shape[-1] == dim else F.pad(v, (0, dim - v.shape[-1]))
