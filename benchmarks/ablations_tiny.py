"""Summarise the tiny-model ablations (issue 3): balancing strategies and MTP on/off, same data, seed and steps.

Runs (each `dsv3 train --config configs/tiny.toml --run-dir runs/<name> ...`):
  ablate-none     balance.bias_update_speed=0 balance.seq_aux_alpha=0          (a) no balancing
  ablate-auxloss  balance.bias_update_speed=0 balance.seq_aux_alpha=0.01       (b) conventional auxiliary loss only
  tiny-main       the config as is: gamma 0.01 + alpha 1e-4                    (c) aux-loss-free + small seq-wise loss
  ablate-nomtp    model.num_nextn_predict_layers=0                             (c) without MTP

    python benchmarks/ablations_tiny.py runs/ablate-none runs/ablate-auxloss runs/tiny-main runs/ablate-nomtp

MaxVio: max load / mean load - 1 per MoE layer over each 10-step logging interval (40,960 tokens), averaged over
the main model's MoE layers and over the last 20% of the run. Validation loss: the last evaluation.
"""

import sys
from pathlib import Path

from dsv3.train.metrics import read_metrics
from dsv3.train.plot import compare_runs


def summary(run: Path) -> dict:
    train = read_metrics(run, kind="train")
    val = read_metrics(run, kind="val")
    tail = train[int(len(train) * 0.8):]
    main_layers = [i for i, n in enumerate(train[-1]["moe_layers"]) if not n.startswith("mtp")]
    vio = [sum(r["max_vio"][i] for i in main_layers) / len(main_layers) for r in tail]
    early = [sum(r["max_vio"][i] for i in main_layers) / len(main_layers) for r in train[:len(train) // 5]]
    return dict(run=run.name, steps=train[-1]["step"], max_vio_last20=sum(vio) / len(vio),
                max_vio_first20=sum(early) / len(early), val_loss=val[-1]["val_loss"],
                val_mtp_acc=val[-1].get("val_mtp_acc"), val_mtp_agree=val[-1].get("val_mtp_agree"),
                train_main_last20=sum(r["main_loss"] for r in tail) / len(tail))


def main() -> None:
    runs = [Path(p) for p in sys.argv[1:]]
    rows = [summary(r) for r in runs]
    print("| run | steps | MaxVio (first 20%) | MaxVio (last 20%) | val loss | train main loss (last 20%) | "
          "MTP acc | MTP agree |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        acc = f"{r['val_mtp_acc']:.3f}" if r["val_mtp_acc"] is not None else "-"
        agree = f"{r['val_mtp_agree']:.3f}" if r["val_mtp_agree"] is not None else "-"
        print(f"| {r['run']} | {r['steps']} | {r['max_vio_first20']:.3f} | {r['max_vio_last20']:.3f} | "
              f"{r['val_loss']:.4f} | {r['train_main_last20']:.4f} | {acc} | {agree} |")
    docs = Path(__file__).resolve().parents[1] / "docs"
    labels = {"ablate-none": "(a) no balancing", "ablate-auxloss": "(b) aux loss only, alpha=0.01",
              "tiny-main": "(c) aux-loss-free gamma=0.01 + alpha=1e-4", "ablate-nomtp": "(c) without MTP"}
    named = {labels.get(r.name, r.name): r for r in runs}
    for metric in ("max_vio_mean", "val_loss"):
        print(compare_runs(named, docs / f"ablation-{metric}.png", metric=metric, logy=metric == "max_vio_mean"))


if __name__ == "__main__":
    main()
