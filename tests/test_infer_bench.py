"""The engine benchmarks' bookkeeping on CPU (tiny model): what they count, not how fast it is."""

import os
import subprocess
import sys
from pathlib import Path

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


def test_bench_serve_runs_every_request_through_the_server(tmp_path):
    """`dsv3 bench serve` end to end on the CPU (configs/tiny.toml, engine in a thread): every request completes, none
    refused. Its prompts once drew ids from the model's vocabulary, past the bench tokenizer's 512, and the server
    refused all of them (0 tok/s, found on the GPU)."""
    import json

    from pathlib import Path

    from dsv3.cli import main
    out, config = tmp_path / "serve.json", Path(__file__).parents[1] / "configs" / "tiny.toml"   # vocabulary 2048
    assert main(["bench", "serve", "--config", str(config), "--device", "cpu", "--engine-thread", "--concurrency", "2",
                 "--requests", "4", "--prompt", "16", "--tokens", "4", "--cache-gib", "0.05", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["errors"] == [] and r["completed"] == r["requests"] == 4
    assert r["output_tok_per_s"] > 0 and r["engine_output_tok_per_s"] > 0


def test_bench_decode_runs_without_the_serve_extra():
    """`dsv3 bench decode` on an install without the `serve` extra (fastapi, uvicorn): the server's modules are
    imported by `bench serve` only (they were imported at the top of dsv3.launch.bench, so bench decode failed with
    ModuleNotFoundError: fastapi, as it did on the GPU image without the extra's wheels)."""
    code = ("import sys; sys.modules['fastapi'] = None; sys.modules['uvicorn'] = None\n"
            "from dsv3.cli import main\n"
            "main(['bench', 'decode', '--config', 'tiny', '--batches', '1', '--tokens', '2', '--prompt', '4', "
            "'--device', 'cpu'])\n")
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=str(root / "src")),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "decode  batch    1" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]
