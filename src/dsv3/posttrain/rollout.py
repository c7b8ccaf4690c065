"""GRPO rollouts (spec 7): sample G responses per prompt with the inference Engine on the policy's own weights, score
them with the rule-based rewards, and lay them out as the (N, T) rows the policy loss takes.

The Engine runs on the trainer's model object itself (no copy, no file): `Engine.load_weights()` before each rollout
only drops the prefix cache computed by the previous step's weights. Every response is sampled with its own seed,
a function of (grpo.seed, step, row), so a resumed run draws the same rollouts as the uninterrupted one.
"""

from __future__ import annotations

import base64
import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from ..data.shards import StreamDigest
from ..infer import SamplingParams
from .grpo_loss import dynamic_sampling_mask, group_advantages, overlong_filter
from .rewards import format_reward, language_consistency_reward, length_penalty, score_with
from .tasks import Task, verify


class PromptSource:
    """The Trainer's batch source for GRPO: epochs of a seeded shuffle of the task prompts, each encoded once as a
    one-turn chat with the generation prompt; `state_dict` is the position (checkpointed for exact resume)."""

    def __init__(self, tokenizer, template, tasks: list[Task], seed: int):
        if not tasks:
            raise ValueError("GRPO has no prompts")
        self.tokenizer, self.tasks, self.seed = tokenizer, tasks, seed
        self.prompt_ids = [template.encode(tokenizer, [{"role": "user", "content": t.prompt}], True) for t in tasks]
        self.val: list = []
        self.resumed_batch: dict | None = None      # a checkpoint's rollouts still in use (GRPOTrainer)
        self.epoch, self.cursor = 0, 0
        self.order = self._order(0)
        digest = StreamDigest()
        for ids in self.prompt_ids:
            digest.add_ids(ids)
        self.digest = digest.hexdigest()

    def _order(self, epoch: int) -> list[int]:
        order = list(range(len(self.tasks)))
        random.Random(f"grpo:{self.seed}:{epoch}").shuffle(order)
        return order

    def next_prompts(self, n: int) -> list[int]:
        out = []
        while len(out) < n:
            if self.cursor == len(self.order):
                self.epoch, self.cursor = self.epoch + 1, 0
                self.order = self._order(self.epoch)
            out.append(self.order[self.cursor])
            self.cursor += 1
        return out

    def next_batch(self, rows: int):
        raise RuntimeError("GRPO batches are rollouts (GRPOTrainer._forward_backward), not read from a source")

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed, "n": len(self.tasks),
                "digest": self.digest}

    def load_state_dict(self, state: dict) -> None:
        if state.get("n") != len(self.tasks) or state.get("seed") != self.seed:
            raise ValueError("the checkpoint's prompt position is for another task set (grpo.task / train_prompts / "
                             "seed changed)")
        # as many prompts, other ones (grpo.task, digits, ops, an edited task_file, another tokenizer or template):
        # the position would be a place in other prompts. States from before the digest load as before
        if "digest" in state and state["digest"] != self.digest:
            raise ValueError(f"the checkpoint's prompt position is for other prompts (digest {state['digest']}, now "
                             f"{self.digest}): grpo.task, digits, ops, task_file's content, or the tokenizer or "
                             f"chat template changed since; restore them, or start a new run from the checkpoint's "
                             f"weights (grpo.init=RUN_DIR)")
        self.epoch, self.cursor = state["epoch"], state["cursor"]
        self.order = self._order(self.epoch)
        self.resumed_batch = state.get("batch")


def task_reward(task: Task, prompt: str, text: str, n_tokens: int, cfg) -> dict[str, float]:
    """The reward terms of one response (grpo.*_weight): correctness by the task's verifier (code: run in the
    sandbox within grpo.code_timeout_s / code_memory_mb), format (think/answer tags), DAPO's soft length penalty,
    language consistency; `reward` is their weighted sum."""
    limits = {"timeout_s": cfg.code_timeout_s, "memory_mb": cfg.code_memory_mb} if task.kind == "code" else {}
    parts = {"correct": verify(task, text, **limits), "format": format_reward(text)}
    parts["length"] = length_penalty(n_tokens, cfg.max_new_tokens, min(cfg.length_cache, cfg.max_new_tokens))
    parts["language"] = language_consistency_reward(prompt, text) if cfg.language_weight else 0.0
    parts["reward"] = (cfg.correct_weight * parts["correct"] + cfg.format_weight * parts["format"]
                       + cfg.length_weight * parts["length"] + cfg.language_weight * parts["language"])
    return parts


@dataclass
class Rollouts:
    ids: torch.Tensor            # (N, T) prompt + response, right-padded
    response: torch.Tensor       # (N, T) bool: the response tokens (sampled by the engine)
    mask: torch.Tensor           # (N, T) bool: those that carry loss (after dynamic sampling / overlong filtering)
    advantages: torch.Tensor     # (N,)
    engine_logp: torch.Tensor    # (N, T) the engine's log-probs of the sampled tokens (raw logits), 0 elsewhere
    logp_old: torch.Tensor | None = None      # (N, T) the rollout policy's, at the sampling temperature (mu > 1)
    stats: dict = field(default_factory=dict)


def sample_groups(engine, source: PromptSource, picks: list[int], cfg, step: int, reward_model=None) -> Rollouts:
    """Steps 1-4 of a GRPO iteration: G samples per prompt, rewards, group-normalised advantages, the loss mask."""
    G, tok = cfg.group_size, source.tokenizer
    # step 1: rollouts, every response with its own seed
    prompts = [source.prompt_ids[i] for i in picks for _ in range(G)]
    params = [SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_new_tokens,
                             seed=(cfg.seed * 1_000_003 + step) * 4096 + r, logprobs=0) for r in range(len(prompts))]
    engine.load_weights()
    outs = engine.generate(prompts, params)
    # step 2: rewards
    texts = [o.text for o in outs]
    tasks = [source.tasks[i] for i in picks for _ in range(G)]
    # code rewards run programs in the sandbox (subprocesses): code_workers at a time
    with ThreadPoolExecutor(cfg.code_workers if tasks[0].kind == "code" else 1) as pool:
        parts = list(pool.map(lambda t, x, o: task_reward(t, t.prompt, x, len(o.token_ids), cfg), tasks, texts, outs))
    rewards = torch.tensor([p["reward"] for p in parts], dtype=torch.float64)
    if reward_model is not None:         # a model-based reward: added to the rule-based one
        rewards += torch.tensor(score_with(reward_model, [t.prompt for t in tasks], texts), dtype=torch.float64)
    # step 3: advantages within each group (GRPO; Dr. GRPO without the std)
    adv = group_advantages(rewards, G, scale_std=cfg.scale_std).float()
    # step 4: rows, and the mask of the tokens that carry loss
    N, T = len(outs), max(len(p) + len(o.token_ids) for p, o in zip(prompts, outs))
    ids = torch.full((N, T), tok.eos_id, dtype=torch.long)
    response = torch.zeros(N, T, dtype=torch.bool)
    engine_logp = torch.zeros(N, T)
    for r, (p, o) in enumerate(zip(prompts, outs)):
        n = len(p) + len(o.token_ids)
        ids[r, :n] = torch.tensor(p + o.token_ids)
        response[r, len(p):n] = True
        engine_logp[r, len(p):n] = torch.tensor([lp[0] for lp in o.logprobs])
    truncated = torch.tensor([o.finish_reason == "length" for o in outs])
    mask = response.clone()
    if cfg.overlong_filter:
        mask = overlong_filter(mask, truncated)
    keep = dynamic_sampling_mask(rewards, G)
    if cfg.dynamic_sampling:
        mask &= keep[:, None]
    lengths = torch.tensor([len(o.token_ids) for o in outs], dtype=torch.float64)
    stats = {"reward": rewards.mean().item(), "reward_std": rewards.std().item() if N > 1 else 0.0,
             "tokens_rollout": float(sum(len(p) + len(o.token_ids) for p, o in zip(prompts, outs))),
             "correct": sum(p["correct"] for p in parts) / N, "format": sum(p["format"] for p in parts) / N,
             "response_length": lengths.mean().item(), "truncated": truncated.float().mean().item(),
             "zero_std_groups": 1 - keep.view(-1, G)[:, 0].float().mean().item(),
             "loss_rows": mask.any(1).float().mean().item()}
    return Rollouts(ids, response, mask, adv, engine_logp, stats=stats)


_TENSORS = ("ids", "response", "mask", "advantages", "engine_logp", "logp_old")


def _tensor_state(t: torch.Tensor) -> dict:
    """A tensor as JSON, bit-exact (its raw bytes in base64)."""
    t = t.detach().cpu().contiguous()
    return {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape),
            "data": base64.b64encode(t.numpy().tobytes()).decode()}


def _tensor_from_state(d: dict) -> torch.Tensor:
    dtype = getattr(torch, d["dtype"])
    flat = torch.frombuffer(bytearray(base64.b64decode(d["data"])), dtype=dtype) if d["shape"] and \
        all(d["shape"]) else torch.empty(0, dtype=dtype)
    return flat.reshape(d["shape"]).clone()


def batch_state(ro: Rollouts, uses: int) -> dict:
    """A batch of rollouts and the updates that used it so far, for a checkpoint's state.json (exact resume)."""
    return {"uses": uses, "stats": ro.stats,
            **{k: _tensor_state(getattr(ro, k)) for k in _TENSORS if getattr(ro, k) is not None}}


def batch_from_state(state: dict) -> tuple[Rollouts, int]:
    tensors = {k: _tensor_from_state(state[k]) if k in state else None for k in _TENSORS}
    return Rollouts(**tensors, stats=dict(state["stats"])), int(state["uses"])
