"""The engine benchmarks' bookkeeping on CPU (tiny model): what they count, not how fast it is."""

import torch

from conftest import build, tiny_config
from dsv3.infer.bench import bench_ttft


def test_ttft_counts_prefill_steps_and_first_tokens():
    """Every prompt in one step: one step, every request's first token at the same time. A budget of 3 prompts:
    chunked prefill in two steps, three requests served in the first one (the median), the last in the second."""
    model = build(tiny_config(vocab_size=96), seed=1, dtype=torch.float32)
    whole = bench_ttft(model, 4, 8, cuda_graphs=False)
    assert whole["steps"] == 1 and whole["budget"] == 32
    assert whole["ttft_p50_s"] == whole["ttft_max_s"] > 0
    chunked = bench_ttft(model, 4, 8, budget=24, cuda_graphs=False)
    assert chunked["steps"] == 2 and chunked["budget"] == 24
    assert 0 < chunked["ttft_p50_s"] < chunked["ttft_max_s"]
