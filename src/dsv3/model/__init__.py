"""dsv3.model: the DeepSeek-V3 architecture as plain PyTorch modules (no parallelism, kernels or I/O)."""

from .generate import generate, sample_next
from .layers import MLP, RMSNorm
from .mla import MLA, LatentCache
from .moe import Experts, Gate, MoE, expert_ffn
from .rope import apply_rope, rope_cos_sin, rope_frequencies
from .transformer import Block, MTPModule, Transformer

__all__ = ["Transformer", "Block", "MTPModule", "MLA", "LatentCache", "MoE", "Gate", "Experts", "expert_ffn",
           "MLP", "RMSNorm", "apply_rope", "rope_cos_sin", "rope_frequencies", "generate", "sample_next"]
