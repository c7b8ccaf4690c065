"""dsv3.eval: evaluation (issue 19): scores and their uncertainty (stats), log-likelihood multiple choice scored as
lm-evaluation-harness scores it (multiple_choice), generate-extract-match (generation), code run in the sandbox
(code), needle in a haystack (needle), through a local engine or an OpenAI-compatible server (backends); results on
disk (report) and the `dsv3 eval` entry points (run)."""

from .backends import EngineBackend, Failure, OpenAIBackend
from .multiple_choice import MCQuestion, TaskError, encode_pair, mc_prompt, read_mc, score_mc
from .stats import binomial_stderr, bootstrap_stderr, majority_answer, pass_at_k

__all__ = ["EngineBackend", "Failure", "MCQuestion", "OpenAIBackend", "TaskError", "binomial_stderr",
           "bootstrap_stderr", "encode_pair", "majority_answer", "mc_prompt", "pass_at_k", "read_mc", "score_mc"]
