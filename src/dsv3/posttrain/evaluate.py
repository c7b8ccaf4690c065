"""Held-out evaluation of a post-trained policy on verifiable tasks (the demo's numbers): k samples per problem with
the Engine, pass@1 (the mean of the samples' correctness: the unbiased estimate with n = k), pass@k (any sample
correct) and format compliance (dsv3.posttrain.rewards.format_reward), plus greedy accuracy."""

from __future__ import annotations

import torch

from ..infer import Engine, EngineConfig, SamplingParams
from .rewards import format_reward
from .tasks import Task, verify


@torch.no_grad()
def evaluate_tasks(model, tokenizer, template, tasks: list[Task], k: int = 8, temperature: float = 1.0,
                   max_new_tokens: int = 32, seed: int = 0) -> dict[str, float]:
    prompts = [template.encode(tokenizer, [{"role": "user", "content": t.prompt}], True) for t in tasks]
    longest = max(map(len, prompts)) + max_new_tokens
    rows = len(tasks) * k
    engine = Engine(model, tokenizer, EngineConfig(block_size=16, num_blocks=min(rows, 256) * -(-longest // 16) + 1,
                                                   max_num_seqs=min(rows, 256), cuda_graphs=False))
    params = [SamplingParams(temperature=temperature, max_tokens=max_new_tokens, seed=seed * 100_003 + r)
              for r in range(rows)]
    outs = engine.generate([p for p in prompts for _ in range(k)], params)
    correct = torch.tensor([verify(t, o.text) for t, o in zip((t for t in tasks for _ in range(k)), outs)]).view(-1, k)
    fmt = sum(format_reward(o.text) for o in outs) / rows
    greedy = engine.generate(prompts, SamplingParams(temperature=0.0, max_tokens=max_new_tokens))
    greedy_acc = sum(verify(t, o.text) for t, o in zip(tasks, greedy)) / len(tasks)
    return {"pass@1": correct.mean().item(), f"pass@{k}": (correct.max(1).values > 0).float().mean().item(),
            "format": fmt, "greedy": greedy_acc, "problems": len(tasks), "samples": k}
