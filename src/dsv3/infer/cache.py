"""The paged latent cache: per layer, blocks of `block_size` tokens holding c_kv (kv_lora_rank) and the rotated
k_pe (rope dim) of each token, the 576 values per token and layer that MLA needs (spec 1.4), not per-head K and V.

Token t of a sequence lives at slot block_table[t // block_size] * block_size + t % block_size.
"""

from __future__ import annotations

import torch

from ..config import ModelConfig


def slot(block_table: list[int], position: int, block_size: int) -> int:
    """The flat cache slot of a sequence's token at `position`."""
    return block_table[position // block_size] * block_size + position % block_size


def bytes_per_block(cfg: ModelConfig, n_layers: int, block_size: int, dtype: torch.dtype) -> int:
    return n_layers * block_size * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * dtype.itemsize


class PagedLatentCache:
    def __init__(self, cfg: ModelConfig, n_layers: int, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device | str):
        self.block_size = block_size
        self.c_kv = torch.zeros(n_layers, num_blocks, block_size, cfg.kv_lora_rank, dtype=dtype, device=device)
        self.k_pe = torch.zeros(n_layers, num_blocks, block_size, cfg.qk_rope_head_dim, dtype=dtype, device=device)

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.c_kv[i], self.k_pe[i]

    def write(self, i: int, slots: torch.Tensor, c_kv: torch.Tensor, k_pe: torch.Tensor) -> None:
        """Store the latents of tokens (N, C) / (N, R) at flat slots (N,)."""
        self.c_kv[i].view(-1, self.c_kv.shape[-1]).index_copy_(0, slots, c_kv.to(self.c_kv.dtype))
        self.k_pe[i].view(-1, self.k_pe.shape[-1]).index_copy_(0, slots, k_pe.to(self.k_pe.dtype))

    def gather(self, i: int, block_table: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first `length` tokens of one sequence, contiguous: (length, C), (length, R)."""
        c_kv, k_pe = self.layer(i)
        return (c_kv[block_table].flatten(0, 1)[:length], k_pe[block_table].flatten(0, 1)[:length])
