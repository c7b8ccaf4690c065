"""dsv3.eval: evaluation (issue 19). So far: scores and their uncertainty (stats), log-likelihood multiple choice
scored as lm-evaluation-harness scores it (multiple_choice)."""

from .backends import EngineBackend, OpenAIBackend
from .multiple_choice import MCQuestion, TaskError, encode_pair, mc_prompt, read_mc, score_mc
from .stats import binomial_stderr, bootstrap_stderr, majority_answer, pass_at_k

__all__ = ["EngineBackend", "MCQuestion", "OpenAIBackend", "TaskError", "binomial_stderr", "bootstrap_stderr", "encode_pair",
           "majority_answer", "mc_prompt", "pass_at_k", "read_mc", "score_mc"]
