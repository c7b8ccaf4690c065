"""dsv3.posttrain: post-training (spec 7, issue 18), the parts that need no chat tokenisation.

Exists: GRPO's loss terms and per-token log-probs (grpo_loss); top-k logit distillation (distill_loss);
rule-based and style rewards with a reward-model hook (rewards); seeded arithmetic and Countdown tasks with
disjoint train/held-out splits and ast-walking verifiers (tasks).
To come: a code-execution sandbox; then chat data, `dsv3 sft`,
`dsv3 grpo` (rollouts with the inference Engine) and `dsv3 distill`.
"""

from .distill_loss import teacher_topk, topk_forward_kl
from .rewards import (RewardModel, answers_match, correctness_reward, extract_answer, format_reward,
                      language_consistency_reward, length_penalty, score_with, tagged_answer)
from .tasks import Task, generate_tasks, split_of, verify, verify_countdown
from .grpo_loss import (dynamic_sampling_mask, group_advantages, kl_estimate, overlong_filter, policy_loss,
                        sequence_logprobs)

__all__ = ["group_advantages", "policy_loss", "kl_estimate", "dynamic_sampling_mask", "overlong_filter",
           "sequence_logprobs", "teacher_topk", "topk_forward_kl",
           "extract_answer", "answers_match", "correctness_reward", "format_reward", "length_penalty",
           "language_consistency_reward", "RewardModel", "score_with", "tagged_answer",
           "Task", "generate_tasks", "split_of", "verify", "verify_countdown"]
