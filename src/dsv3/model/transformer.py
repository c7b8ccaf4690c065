"""The DeepSeek-V3 Transformer: pre-norm blocks of MLA + (dense FFN | MoE), final norm, untied head, and the
Multi-Token Prediction modules (spec 1.2, 1.8).

Module names are the checkpoint's (`embed_tokens`, `layers.{i}.self_attn.kv_b_proj`, `mlp.gate`, ...), so the
Hugging Face mapping only prefixes `model.` and splits the stacked experts. MTP module k is stored in the
checkpoint as layer `num_hidden_layers + k`; here it lives in `mtp[k]` and shares `embed_tokens` and `lm_head`
with the main model (TR 3.2.3).

MTP input (spec 1.8): depth 1 combines the main model's final-normed hidden state h_i (as vLLM/SGLang feed it)
with the embedding of token t_{i+1}: x = eh_proj([enorm(emb) ; hnorm(h)]) (embedding first, the checkpoint's
order), then a full block, then shared_head.norm and the shared head; its logits at position i predict t_{i+2}.
Depth k+1 chains the block output of depth k.

Blocks and MTP modules take two optional seams for an inference engine: `ctx`, the attention context of a paged
cache (dsv3.model.context: which cache, which slots, naive or absorbed per row), and `ffn`, how the block's FFN
module is called (`ffn(mlp, x)`, e.g. a fused MoE kernel for decode-sized batches; None: `mlp(x)`).
"""

from typing import Callable

import torch
from torch import nn

from ..config import ModelConfig
from .context import AttentionContext
from .layers import MLP, RMSNorm
from .mla import MLA, LatentCache
from .moe import MoE
from .rope import rope_cos_sin


FFNCall = Callable[[nn.Module, torch.Tensor], torch.Tensor]


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MLA(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MoE(cfg) if cfg.is_moe_layer(layer_id) else MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x, cos, sin, cache=None, start_pos: int = 0, absorb: bool = False,
                ctx: AttentionContext | None = None, ffn: FFNCall | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, start_pos, absorb, ctx)
        h = self.post_attention_layernorm(x)
        return x + (self.mlp(h) if ffn is None else ffn(self.mlp, h))


class SharedHead(nn.Module):
    """Only the norm is the MTP module's own; the head itself is the main model's lm_head."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class MTPModule(Block):
    """A decoder block with an input projection of [embedding ; hidden] and its own head norm."""

    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__(cfg, layer_id)
        self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=False)
        self.shared_head = SharedHead(cfg)

    def forward(self, h, emb, cos, sin, cache=None, start_pos: int = 0, absorb: bool = False,
                ctx: AttentionContext | None = None, ffn: FFNCall | None = None) -> torch.Tensor:
        x = self.eh_proj(torch.cat([self.enorm(emb), self.hnorm(h)], dim=-1))
        return super().forward(x, cos, sin, cache, start_pos, absorb, ctx, ffn)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.mtp = nn.ModuleList(MTPModule(cfg, cfg.num_hidden_layers + k)
                                 for k in range(cfg.num_nextn_predict_layers))

    @torch.no_grad()
    def init_weights(self, std: float | None = None) -> None:
        """N(0, std^2) for every weight (std = config.init_std = 0.006, TR 4.2), ones for norms, zero biases and
        routing bias. Materialises a model built on the meta device after `to_empty`."""
        std = self.config.init_std if std is None else std
        for module in self.modules():
            if isinstance(module, RMSNorm):
                module.weight.fill_(1.0)
            for name, p in module.named_parameters(recurse=False):
                if isinstance(module, RMSNorm):
                    continue
                if name == "bias":
                    p.zero_()
                else:
                    nn.init.normal_(p, mean=0.0, std=std)
            for name, b in module.named_buffers(recurse=False):
                b.zero_()

    def hidden_states(self, input_ids: torch.Tensor, start_pos: int = 0, cache: LatentCache | None = None,
                      absorb: bool = False) -> torch.Tensor:
        """Final-normed hidden states (B, T, D) of input_ids (B, T) at positions start_pos.."""
        T = input_ids.shape[1]
        if start_pos + T > self.config.max_position_embeddings:
            raise ValueError(f"positions up to {start_pos + T} exceed max_position_embeddings="
                             f"{self.config.max_position_embeddings}")
        cos, sin = rope_cos_sin(self.config, torch.arange(start_pos, start_pos + T, device=input_ids.device))
        x = self.embed_tokens(input_ids)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, cache.layer(i) if cache is not None else None, start_pos, absorb)
        return self.norm(x)

    def forward(self, input_ids: torch.Tensor, start_pos: int = 0, cache: LatentCache | None = None,
                absorb: bool = False) -> torch.Tensor:
        """Logits (B, T, vocab). `absorb` selects the weight-absorbed MLA form; `cache` enables incremental decoding."""
        return self.lm_head(self.hidden_states(input_ids, start_pos, cache, absorb))

    def mtp_logits(self, hidden: torch.Tensor, input_ids: torch.Tensor) -> list[torch.Tensor]:
        """Training-time MTP: for depth k (1-based), logits (B, T-k, vocab) whose position i predicts t_{i+k+1}.

        hidden: final-normed main-model states (B, T, D) of input_ids (B, T).
        """
        T = input_ids.shape[1]
        cos, sin = rope_cos_sin(self.config, torch.arange(T, device=input_ids.device))
        out, h = [], hidden
        for k, module in enumerate(self.mtp, start=1):
            h = module(h[:, :-1], self.embed_tokens(input_ids[:, k:]), cos[:T - k], sin[:T - k])
            out.append(self.lm_head(module.shared_head.norm(h)))
        return out

    def num_params(self) -> dict[str, int]:
        """Parameter counts as the report states them (spec 1.1): main model total and activated per token,
        and the MTP modules' own parameters (their embedding and head are the main model's)."""
        cfg = self.config
        def routed_inactive(blocks) -> int:
            n = 0
            for b in blocks:
                if isinstance(b.mlp, MoE):
                    e = sum(p.numel() for p in b.mlp.experts.parameters())
                    n += e - e * cfg.num_experts_per_tok // cfg.n_routed_experts
            return n
        mtp = sum(p.numel() for p in self.mtp.parameters())
        total = sum(p.numel() for p in self.parameters()) - mtp
        active = total - routed_inactive(self.layers)
        emb = self.embed_tokens.weight.numel()
        shared = emb + self.lm_head.weight.numel()
        return dict(total=total, active=active, active_without_embedding=active - emb,
                    mtp=mtp, mtp_active=mtp - routed_inactive(self.mtp) + shared)
