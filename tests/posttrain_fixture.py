"""Shared by the post-training tests: a tiny base model as a Hugging Face directory (weights, tokenizer with its chat
template) and chat data files."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dsv3 import ModelConfig, Transformer
from dsv3.checkpoint import save_pretrained
from dsv3.data import train_tokenizer

TEXTS = ["What is 12 + 30? The answer is 42. " * 20, "the quick brown fox jumps over the lazy dog " * 20,
         "<think>add</think><answer>57</answer> compute 3 + 4 = 7 " * 20]


def tiny_model_config(vocab: int, max_positions: int = 512) -> ModelConfig:
    return ModelConfig(vocab_size=vocab, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1,
                       n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2, first_k_dense_replace=1,
                       kv_lora_rank=32, q_lora_rank=48, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                       max_position_embeddings=max_positions, num_nextn_predict_layers=1, torch_dtype="float32",
                       rope_scaling=None)


def make_base(out: Path, seed: int = 0, max_positions: int = 512) -> Path:
    tok = train_tokenizer(TEXTS, vocab_size=400)
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = Transformer(tiny_model_config(tok.vocab_size, max_positions))
    model.to_empty(device="cpu")
    model.init_weights()
    save_pretrained(model, out)
    tok.save(out)
    return out


def conversation(a: int, b: int) -> dict:
    return {"messages": [{"role": "user", "content": f"What is {a} + {b}?"},
                         {"role": "assistant", "content": f"<think>add</think><answer>{a + b}</answer>"}]}


def write_chat(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path
