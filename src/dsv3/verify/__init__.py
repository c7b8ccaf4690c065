"""dsv3.verify: how answers and code are judged, by the GRPO rewards (dsv3.posttrain) and evaluation (dsv3.eval)
alike: answer extraction and equivalence (extract), untrusted code in a sandbox (sandbox). No torch."""

from .extract import equivalent, extract_answer, normalize
from .sandbox import SandboxResult, SandboxUnavailable, code_reward, run_python, run_tests

__all__ = ["SandboxResult", "SandboxUnavailable", "code_reward", "equivalent", "extract_answer", "normalize",
           "run_python", "run_tests"]
