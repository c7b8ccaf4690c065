"""Is the engine-vs-trainer log-prob gap of GRPO bf16 noise? (issue 18: "the engine's sampled-token log-probs equal
the trainer's within bf16 noise").

One random-init model; the engine samples responses at T = 1 with `logprobs=0` (GRPO's rollout, GRPO's engine
settings: no CUDA graphs), then the same tokens are scored three more ways with the trainer's `sequence_logprobs`:
the bf16 model under autocast (what GRPO's update computes), a float64 copy (the reference), and the engine's tokens
re-scored by the float64 copy is that reference. Printed per path against the float64 reference: mean / p99 / max
absolute log-prob error over the response tokens; and engine vs trainer directly. If the engine-trainer gap is of
the size of each path's own error against float64, it is bf16 noise; if the engine's error is much larger than the
trainer's, the engine computes something else.

GPU:  PYTHONPATH=src python benchmarks/logprob_gap.py --config lite-8L --json $OUT/logprob_gap.json
CPU:  PYTHONPATH=src python benchmarks/logprob_gap.py --config tiny --device cpu --rows 4 --new 16
"""

from __future__ import annotations

import argparse
import json
import math

import torch

from dsv3 import load_model_config
from dsv3.infer.bench import random_model
from dsv3.infer.config import EngineConfig
from dsv3.infer.engine import Engine
from dsv3.infer.sampling import SamplingParams
from dsv3.posttrain.grpo_loss import sequence_logprobs


def stats(err: torch.Tensor) -> dict:
    e = err.double().abs().flatten()
    return dict(mean=e.mean().item(), p99=e.quantile(0.99).item() if e.numel() > 1 else e.item(),
                max=e.max().item())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="lite-8L")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--rows", type=int, default=32)
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--std", type=float, default=0.02, help="init std of the random weights")
    p.add_argument("--graphs", action="store_true", help="the engine with CUDA graphs (GRPO runs without)")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    cfg = load_model_config(a.config)
    model = random_model(cfg, a.device, torch.bfloat16)
    if a.std != 0.02:
        torch.manual_seed(0)
        model.init_weights(std=a.std)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, cfg.vocab_size, (a.prompt,), generator=g).tolist() for _ in range(a.rows)]
    block = 16
    longest = a.prompt + a.new
    engine = Engine(model, None, EngineConfig(block_size=block, num_blocks=a.rows * -(-longest // block) + 1,
                                              max_num_seqs=a.rows, max_num_batched_tokens=max(2048, a.rows),
                                              cuda_graphs=a.graphs))
    params = [SamplingParams(temperature=1.0, max_tokens=a.new, seed=1000 + r, logprobs=0, ignore_eos=True)
              for r in range(a.rows)]
    outs = engine.generate(prompts, params)
    T = max(len(q) + len(o.token_ids) for q, o in zip(prompts, outs))
    ids = torch.zeros(a.rows, T, dtype=torch.long)
    resp = torch.zeros(a.rows, T, dtype=torch.bool)
    eng = torch.zeros(a.rows, T, dtype=torch.float64)
    for r, (q, o) in enumerate(zip(prompts, outs)):
        n = len(q) + len(o.token_ids)
        ids[r, :n] = torch.tensor(q + o.token_ids)
        resp[r, len(q):n] = True
        eng[r, len(q):n] = torch.tensor([lp[0] for lp in o.logprobs], dtype=torch.float64)
    ids, resp = ids.to(a.device), resp.to(a.device)
    with torch.no_grad():
        with torch.autocast(torch.device(a.device).type, dtype=torch.bfloat16):
            train = sequence_logprobs(model, ids, resp).double().cpu()
        train_plain = sequence_logprobs(model, ids, resp).double().cpu()     # bf16 weights, no autocast
        ref_model = random_model(cfg, a.device, torch.float64) if a.std == 0.02 else None
        if ref_model is None:
            ref_model = model.to(torch.float64)
        else:
            ref_model.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
        ref = sequence_logprobs(ref_model, ids, resp).cpu()
    m = resp.cpu()
    res = dict(config=a.config, device=a.device, rows=a.rows, new=a.new, std=a.std, graphs=a.graphs,
               tokens=int(m.sum()), mean_logp_ref=ref[m].mean().item(), uniform=-math.log(cfg.vocab_size),
               engine_vs_ref=stats(eng[m] - ref[m]), trainer_autocast_vs_ref=stats(train[m] - ref[m]),
               trainer_bf16_vs_ref=stats(train_plain[m] - ref[m]), engine_vs_trainer=stats(eng[m] - train[m]))
    for k, v in res.items():
        print(f"[logprob_gap] {k}: {v}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
