"""Summarise the tiny-model ablations (issue 3): balancing strategies and MTP on/off, same data and steps, several
initialisation seeds (train.seed) per configuration.

Runs (each `dsv3 train --config configs/tiny.toml --run-dir runs/abl-<cfg>-s<seed> train.seed=<seed> ...`):
  abl-a-sN   balance.bias_update_speed=0 balance.seq_aux_alpha=0          (a) no balancing
  abl-b-sN   balance.bias_update_speed=0 balance.seq_aux_alpha=0.01       (b) conventional auxiliary loss only
  abl-c-sN   the config as is: gamma 0.01 + alpha 1e-4                    (c) aux-loss-free + small seq-wise loss
  abl-d-sN   model.num_nextn_predict_layers=0                             (c) without MTP

    python benchmarks/ablations_tiny.py runs/abl-*

MaxVio: max load / mean load - 1 per MoE layer over each 10-step logging interval (40,960 tokens), averaged over
the main model's MoE layers and over the last 20% of the run. Validation loss: the last evaluation.
"""

import json
import re
import statistics
import sys
from collections import defaultdict
from pathlib import Path

from dsv3.train.metrics import read_metrics
from dsv3.train.plot import compare_runs

LABELS = {"a": "(a) no balancing", "b": "(b) aux loss only, alpha=0.01",
          "c": "(c) aux-loss-free gamma=0.01 + alpha=1e-4", "d": "(c) without MTP"}


def summary(run: Path) -> dict:
    train = read_metrics(run, kind="train")
    val = read_metrics(run, kind="val")
    tail = train[int(len(train) * 0.8):]
    main_layers = [i for i, n in enumerate(train[-1]["moe_layers"]) if not n.startswith("mtp")]
    vio = [sum(r["max_vio"][i] for i in main_layers) / len(main_layers) for r in tail]
    return dict(steps=train[-1]["step"], max_vio=sum(vio) / len(vio), val_loss=val[-1]["val_loss"],
                mtp_acc=val[-1].get("val_mtp_acc"), mtp_agree=val[-1].get("val_mtp_agree"))


def fmt(values: list) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ({min(values):.3f}-{max(values):.3f})"


def main() -> None:
    groups: dict[str, dict[str, Path]] = defaultdict(dict)
    for p in map(Path, sys.argv[1:]):
        m = re.fullmatch(r"abl-(\w)-s(\d+)", p.name)
        if m and (p / "config.json").exists() and (p / "metrics.jsonl").exists():
            steps = json.loads((p / "config.json").read_text())["train"]["steps"]
            train = read_metrics(p, kind="train")
            if train and train[-1]["step"] == steps and read_metrics(p, kind="val"):   # finished runs only
                groups[m[1]][m[2]] = p
    print("| configuration | seeds | MaxVio, last 20% | val loss | MTP next-next acc | MTP agrees with main |")
    print("|---|---|---|---|---|---|")
    for key in sorted(groups):
        rows = [summary(p) for p in groups[key].values()]
        print(f"| {LABELS.get(key, key)} | {len(rows)} | {fmt([r['max_vio'] for r in rows])} | "
              f"{fmt([r['val_loss'] for r in rows])} | {fmt([r['mtp_acc'] for r in rows])} | "
              f"{fmt([r['mtp_agree'] for r in rows])} |")
    docs = Path(__file__).resolve().parents[1] / "docs"
    seed0 = {LABELS.get(k, k): runs.get("0") for k, runs in sorted(groups.items()) if "0" in runs}
    for metric in ("max_vio_mean", "val_loss"):
        print(compare_runs(seed0, docs / f"ablation-{metric}.png", metric=metric, logy=metric == "max_vio_mean"))


if __name__ == "__main__":
    main()
