"""torchrun entry for tests/test_two_hop_train.py: `dsv3 <args>` with the meter of tests/test_two_hop.py on every
all_to_all_single (bytes each rank sends to ranks on other nodes, nodes of $SPY_RANKS_PER_NODE consecutive ranks)
and a count of two-hop MoE forwards; each rank writes both to $SPY_DIR/rank{RANK}.json when the command returns."""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from test_two_hop import Meter  # noqa: E402

from dsv3.cli import main  # noqa: E402
from dsv3.parallel.two_hop import TwoHopExperts  # noqa: E402


def run() -> int:
    calls = [0]
    forward = TwoHopExperts.forward

    def counted(self, *args):
        calls[0] += 1
        return forward(self, *args)

    TwoHopExperts.forward = counted
    with Meter(int(os.environ["SPY_RANKS_PER_NODE"])) as meter:
        rc = main(sys.argv[1:])
    out = Path(os.environ["SPY_DIR"], f"rank{os.environ.get('RANK', '0')}.json")
    out.write_text(json.dumps({"bytes": meter.bytes, "two_hop_calls": calls[0]}))
    return rc


if __name__ == "__main__":
    sys.exit(run())
