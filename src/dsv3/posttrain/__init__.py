"""dsv3.posttrain: post-training (spec 7, issue 18).

Parts:
  chat_data     SFT conversations encoded as the server encodes them, loss mask on assistant turns, bad rows counted
  sft           `dsv3 sft`: the pre-training Trainer fed by ChatBatches (padded conversations, loss mask), from a base
  grpo_loss     GRPO advantages and clipped policy loss with the Dr. GRPO / DAPO switches, KL (k1/k3), per-token
                log-probs and entropy of a dsv3 model
  rollout       GRPO rollouts: the Engine on the policy's own weights, rewards, advantages, the loss mask
  grpo          `dsv3 grpo`: GRPOTrainer, the Trainer with rollouts in place of a corpus
  distill_loss  forward KL on the teacher's top-k logits
  rewards       correctness (dsv3.verify.extract), format, length penalty, language consistency, the reward-model
                hook
  tasks         seeded arithmetic and Countdown tasks, disjoint train/held-out splits, ast-walking verifiers; code
                tasks from a file, run against their tests in the sandbox
  distill       `dsv3 distill`: teacher samples + verifier rejection -> SFT data; top-k logit KD (LogitKDTrainer)
  base          the starting model: a run directory or a HF directory (weights, tokenizer, chat template)
  config        the [sft] / [grpo] tables beside the run sections, validated by the same rules
Code rewards run in dsv3.verify.sandbox (shared with evaluation's code tasks). Held-out scores come from
dsv3.eval (`dsv3 eval gen --chat`), which sits above this package.
"""

from .chat_data import ChatExample, batch_examples, encode_conversation, read_chat_rows
from .distill_loss import teacher_topk, topk_forward_kl
from .grpo_loss import (dynamic_sampling_mask, group_advantages, kl_estimate, overlong_filter, policy_loss,
                        sequence_logprobs)
from .rewards import (RewardModel, correctness_reward, format_reward, language_consistency_reward, length_penalty,
                      score_with)
from .tasks import Task, generate_tasks, read_code_tasks, split_of, verify, verify_countdown

__all__ = ["group_advantages", "policy_loss", "kl_estimate", "dynamic_sampling_mask", "overlong_filter",
           "sequence_logprobs", "teacher_topk", "topk_forward_kl",
           "correctness_reward", "format_reward",
           "length_penalty", "language_consistency_reward", "RewardModel", "score_with",
           "Task", "generate_tasks", "read_code_tasks", "split_of", "verify", "verify_countdown",
           "ChatExample", "read_chat_rows", "encode_conversation", "batch_examples"]
