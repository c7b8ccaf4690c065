"""Per row of `test_cuda_fast_decode_matches_plain_decode`'s flow: the eager step's routing margin (group and expert
selection, `RoutingMargin`) beside the replayed step's largest error. A row that is off only where its margin is
below ~1e-3 was routed to other experts by a tie that bf16 rounding decides, not by a kernel bug (RESULTS.md,
twenty-second session). CUDA only: `python benchmarks/decode_routing_ties.py` (`gpu_next.sh G`)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import build, random_prompts, tiny_config  # noqa: E402
from test_infer_decode_compile import RoutingMargin  # noqa: E402

from dsv3.infer import Engine, EngineConfig, SamplingParams  # noqa: E402
from dsv3.infer.fp8_weights import quantize_weights  # noqa: E402
from dsv3.infer.runner import Row  # noqa: E402


def rows_of(fp8: bool, compile_decode: bool, steps: int = 4) -> None:
    model = build(tiny_config(vocab_size=96), seed=3, dtype=torch.bfloat16).cuda()
    if fp8:
        quantize_weights(model)
    engine = Engine(model, config=EngineConfig(block_size=16, num_blocks=64, compile_decode=compile_decode,
                                               fused_moe="on", overlap_schedule="off"))
    for p in random_prompts([5, 17, 30]):
        engine.add_request(p, SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True))
    engine.step()                                                              # prefill
    for step in range(steps):
        seqs = list(engine.scheduler.running)
        assert all(engine.blocks.ensure_capacity(s, s.num_cached_tokens + 1) for s in seqs)
        rows = [Row([s.token_ids[-1]], s.num_cached_tokens, s.block_table) for s in seqs]
        with RoutingMargin(model) as margin:
            eager = engine.runner.forward(engine.runner.prepare(rows, graph=False))
        replayed = engine.runner.forward(engine.runner.prepare(rows))
        err = (replayed.float() - eager.float()).abs().amax(-1).tolist()
        print(f"fp8={fp8} compile={compile_decode} step {step}: margins [{margin}], largest error per row "
              f"[{', '.join(f'{e:.3f}' for e in err)}]")
        engine.step()


CASES = {"fp8-compile": (True, True), "fp8": (True, False), "compile": (False, True)}

if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}")
    for case in ap.parse_args().cases.split(","):
        rows_of(*CASES[case])
