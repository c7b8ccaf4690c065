"""The paged latent cache: per layer, blocks of `block_size` tokens holding c_kv (kv_lora_rank) and the rotated
k_pe (rope dim) of each token, the 576 values per token and layer that MLA needs (spec 1.4), not per-head K and V.

Token t of a sequence lives at slot block_table[t // block_size] * block_size + t % block_size.

The cache owns the geometry: `block_size` (from EngineConfig.block_size, the only place it is set) and
`num_blocks`, the blocks a BlockManager hands out. One more block is allocated after those: `scratch_block`, which
no sequence ever owns; padding rows (CUDA-graph buckets, an idle expert-parallel rank, an empty micro-batch) write
their latents there and read nothing (context length 0), so they can never touch a sequence's latents.

It implements `dsv3.model.context.PagedLatents`, what MLA calls through its attention context. Its three methods are
opaque to torch.compile (`compile_decode` compiles the layer work around them): the write would otherwise be an
in-graph mutation of the whole cache, and the decode kernel dispatches on the host.
"""

from __future__ import annotations

import torch

from ..config import ModelConfig
from ..kernels.mla_decode import mla_decode


def bytes_per_block(cfg: ModelConfig, n_layers: int, block_size: int, dtype: torch.dtype) -> int:
    return n_layers * block_size * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * dtype.itemsize


class PagedLatentCache:
    def __init__(self, cfg: ModelConfig, n_layers: int, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device | str):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.block_size, self.num_blocks = block_size, num_blocks
        self.scratch_block = num_blocks          # the one block after those handed out (see the module docstring)
        shape = (n_layers, num_blocks + 1, block_size)
        self.c_kv = torch.zeros(*shape, cfg.kv_lora_rank, dtype=dtype, device=device)
        self.k_pe = torch.zeros(*shape, cfg.qk_rope_head_dim, dtype=dtype, device=device)

    def slot(self, block_table: list[int], position: int) -> int:
        """The flat cache slot of a sequence's token at `position`."""
        return block_table[position // self.block_size] * self.block_size + position % self.block_size

    def slots(self, block_table: list[int], start: int, n: int) -> list[int]:
        """The slots of positions start .. start + n - 1."""
        return [self.slot(block_table, p) for p in range(start, start + n)]

    @property
    def scratch_slot(self) -> int:
        return self.scratch_block * self.block_size

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.c_kv[i], self.k_pe[i]

    @torch.compiler.disable
    def write(self, i: int, slots: torch.Tensor, c_kv: torch.Tensor, k_pe: torch.Tensor) -> None:
        """Store the latents of tokens (N, C) / (N, R) at flat slots (N,)."""
        self.c_kv[i].view(-1, self.c_kv.shape[-1]).index_copy_(0, slots, c_kv.to(self.c_kv.dtype))
        self.k_pe[i].view(-1, self.k_pe.shape[-1]).index_copy_(0, slots, k_pe.to(self.k_pe.dtype))

    @torch.compiler.disable
    def gather(self, i: int, block_table: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first `length` tokens of one sequence, contiguous: (length, C), (length, R)."""
        c_kv, k_pe = self.layer(i)
        return (c_kv[block_table].flatten(0, 1)[:length], k_pe[block_table].flatten(0, 1)[:length])

    @torch.compiler.disable
    def decode(self, i: int, q_abs: torch.Tensor, q_pe: torch.Tensor, block_tables: torch.Tensor,
               context_lens: torch.Tensor, scale: float,
               append: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Absorbed paged attention of one query per row over layer i (dsv3.kernels.mla_decode: Triton on the
        GPU, the PyTorch reference elsewhere): (n, H, C). `append` (slots, c_kv, k_pe): the rows' own latents,
        written as `write` does, in the attention's launch where the kernel can."""
        c_kv, k_pe = self.layer(i)
        if append is not None:
            slots, new_c, new_k = append
            append = (slots, new_c.to(c_kv.dtype), new_k.to(k_pe.dtype))
        return mla_decode(q_abs, q_pe, c_kv, k_pe, block_tables, context_lens, scale, append=append)
