"""dsv3.posttrain: post-training (spec 7, issue 18), the parts that need no chat tokenisation.

Exists:
  grpo_loss     GRPO advantages and clipped policy loss with the Dr. GRPO / DAPO switches, KL (k1/k3), per-token
                log-probs and entropy of a dsv3 model
  distill_loss  forward KL on the teacher's top-k logits
  rewards       answer extraction + numeric/exact match, format, length penalty, language consistency, the
                reward-model hook
  tasks         seeded arithmetic and Countdown tasks, disjoint train/held-out splits, ast-walking verifiers
  sandbox       code rewards: rlimits, a dropped uid, user/net/PID namespaces (or an audit hook), group kill
To come: chat data (rendered with the tokenizer's chat template, loss on assistant tokens), `dsv3 sft` on the
Trainer, `dsv3 grpo` (rollouts with the inference Engine, weights synced in-process), `dsv3 distill`, the demo.
"""

from .distill_loss import teacher_topk, topk_forward_kl
from .grpo_loss import (dynamic_sampling_mask, group_advantages, kl_estimate, overlong_filter, policy_loss,
                        sequence_logprobs)
from .rewards import (RewardModel, answers_match, correctness_reward, extract_answer, format_reward,
                      language_consistency_reward, length_penalty, score_with, tagged_answer)
from .sandbox import SandboxResult, SandboxUnavailable, code_reward, run_python
from .tasks import Task, generate_tasks, split_of, verify, verify_countdown

__all__ = ["group_advantages", "policy_loss", "kl_estimate", "dynamic_sampling_mask", "overlong_filter",
           "sequence_logprobs", "teacher_topk", "topk_forward_kl",
           "extract_answer", "tagged_answer", "answers_match", "correctness_reward", "format_reward",
           "length_penalty", "language_consistency_reward", "RewardModel", "score_with",
           "Task", "generate_tasks", "split_of", "verify", "verify_countdown",
           "run_python", "code_reward", "SandboxResult", "SandboxUnavailable"]
