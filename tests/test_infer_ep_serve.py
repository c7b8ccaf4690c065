"""`dsv3 serve --ep 2` under torchrun (gloo, CPU): one HTTP front end on rank 0, requests spread over both ranks,
experts sharded with redundant slots and rebalanced while serving, plain and FP8 block weights (`--fp8`: each rank
reads its share into them; with MTP speculation). Completions equal the single-process engine's,
/metrics carries the placement and loads, and SIGTERM to rank 0 drains the server and stops
both ranks cleanly (status 0)."""

import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from dsv3 import save_pretrained
from dsv3.infer import Engine, SamplingParams
from dsv3.infer.ep_load import load_rank_model
from serve_fixture import build_engine, rank_pid, wait_healthy

PROMPTS = ["def read_file(path):", "import os", "The quick brown", "class Point:", "for i in range(", "x = 1\n"]


@pytest.mark.parametrize("fp8", [False, True])
def test_serve_ep_under_torchrun(tmp_path, fp8):
    """`fp8`: also with MTP speculation (`--spec 1`: each rank reads the MTP module too, its experts whole)."""
    engine = build_engine()
    save_pretrained(engine.model, tmp_path / "m")
    engine.tokenizer.save(tmp_path / "m")
    if fp8:     # every rank reads its share straight into FP8 block weights; one process the whole model so
        engine = Engine(load_rank_model(tmp_path / "m", torch.float64, "cpu", fp8=True)[0], engine.tokenizer,
                        engine.config)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # --device cpu: the gloo acceptance test, also on a GPU machine (where the default device would be CUDA)
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "dsv3.cli",
           "serve", "--model", str(tmp_path / "m"), "--port", str(port), "--device", "cpu", "--dtype", "float64",
           "--max-model-len", "256",
           "--cache-gib", "0.01", "--threads", "1", "--ep", "2", "--redundant-experts", "2",
           "--rebalance-interval", "3"] + (["--fp8", "--spec", "1"] if fp8 else [])
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        wait_healthy(url, proc, deadline)
        r = httpx.post(url + "/v1/completions", json={"model": "m", "prompt": PROMPTS, "max_tokens": 8,
                                                      "temperature": 0}, timeout=60).json()
        want = engine.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=8))
        assert [c["text"] for c in r["choices"]] == [w.text for w in want]
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for f in text_string_to_metric_families(httpx.get(url + "/metrics",
                                                                     timeout=60).text) for s in f.samples}
        slots = {k: v for k, v in samples.items() if k[0] == "dsv3_expert_slot_logical_expert"}
        E = engine.model.config.n_routed_experts
        assert len(slots) > 0 and len(slots) % (E + 2) == 0      # E + 2 slots per MoE layer
        assert samples[("dsv3_eplb_rebalances_total", ())] >= 1
        assert sum(v for k, v in samples.items() if k[0] == "dsv3_expert_window_load_tokens") > 0
        assert (samples[("dsv3_spec_decode_draft_tokens_total", ())] > 0) == fp8       # speculated (greedy: same text)
        os.kill(rank_pid(proc.pid, 0), signal.SIGTERM)   # (torchrun itself, signalled, exits with a traceback)
        code = proc.wait(60)
        out = proc.stdout.read()
        assert code == 0, out
        assert "Traceback" not in out and "serving 'm'" in out, out
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close()


def test_ep_on_cuda_needs_a_gpu_per_rank_and_cpu_never_touches_cuda(monkeypatch):
    """`--device cpu` serves over gloo even where CUDA is present (it took cuda:LOCAL_RANK and failed on a one-GPU
    machine with 'invalid device ordinal'); on CUDA, too few GPUs is a one-line error naming --device cpu."""
    import torch

    from dsv3.infer import ep_driver
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: pytest.fail(f"set_device({d})"))
    with pytest.raises(ValueError, match="needs one GPU per process.*has 1 .*--device cpu"):
        ep_driver.init_ep_group(2, "cuda")
    monkeypatch.setattr(ep_driver.dist, "is_initialized", lambda: True)     # the group itself: the test above
    assert ep_driver.init_ep_group(2, "cpu") == "cpu"
