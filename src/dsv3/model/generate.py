"""Reference generation straight on the model and its contiguous latent cache: no engine, no batching tricks.

Each prompt is decoded on its own (prompts may differ in length); prefill uses the naive MLA form, and decoding the
absorbed form by default. This is the baseline the inference engine is tested against.
"""

import torch

from .mla import LatentCache
from .transformer import Transformer


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (B, V) -> token ids (B,). temperature 0 is greedy."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cum - sorted_logits.softmax(dim=-1) >= top_p       # keep the smallest prefix reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model: Transformer, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, eos_id: int | None = None, absorb: bool = True,
             generator: torch.Generator | None = None) -> list[list[int]]:
    """Continue each prompt by up to max_new_tokens tokens (stopping after eos_id); returns the new tokens."""
    cfg = model.config
    param = next(model.parameters())
    outputs = []
    for prompt in prompts:
        if not prompt:
            raise ValueError("empty prompt")
        bad = [t for t in prompt if not 0 <= t < cfg.vocab_size]
        if bad:
            raise ValueError(f"token ids {bad[:5]} outside the vocabulary [0, {cfg.vocab_size})")
        total = len(prompt) + max_new_tokens
        if total > cfg.max_position_embeddings:
            raise ValueError(f"prompt ({len(prompt)}) + max_new_tokens ({max_new_tokens}) exceeds the context of "
                             f"{cfg.max_position_embeddings} tokens")
        cache = LatentCache(cfg, 1, total, cfg.num_hidden_layers, dtype=param.dtype, device=param.device)
        ids = torch.tensor([prompt], device=param.device)
        logits = model(ids, 0, cache, absorb=False)[:, -1]
        pos, new = len(prompt), []
        for _ in range(max_new_tokens):
            tok = sample_next(logits, temperature, top_k, top_p, generator)
            new.append(int(tok))
            if eos_id is not None and new[-1] == eos_id:
                break
            logits = model(tok[:, None], pos, cache, absorb=absorb)[:, -1]
            pos += 1
        outputs.append(new)
    return outputs
