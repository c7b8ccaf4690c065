"""Per row of `test_cuda_fast_decode_matches_plain_decode`'s flow: the eager step's routing margin (group and expert
selection, `RoutingMargin`) beside the replayed step's largest error. A row that is off only where its margin is
below ~1e-3 was routed to other experts by a tie that bf16 rounding decides, not by a kernel bug (RESULTS.md,
twenty-second session). CUDA only: `python benchmarks/decode_routing_ties.py` (`gpu_next.sh G`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_infer_decode_compile import decode_flow, replay_vs_eager  # noqa: E402

CASES = {"fp8-compile": (True, True), "fp8": (True, False), "compile": (False, True)}


def rows_of(fp8: bool, compile_decode: bool, steps: int = 4) -> None:
    model, engine, _, _ = decode_flow(fp8, compile_decode, "on")
    for step in range(steps):
        eager, replayed, margin = replay_vs_eager(engine, model)
        err = (replayed.float() - eager.float()).abs().amax(-1).tolist()
        print(f"fp8={fp8} compile={compile_decode} step {step}: margins [{margin}], largest error per row "
              f"[{', '.join(f'{e:.3f}' for e in err)}]")
        engine.step()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}")
    for case in ap.parse_args().cases.split(","):
        rows_of(*CASES[case])
