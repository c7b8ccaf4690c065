"""Selective recomputation on vs off for the tiny recipe on the CPU: the per-step losses (must be identical) and the
activation memory, measured as the bytes autograd saves for the backward of one micro-batch (what recomputation
trades for compute; device-independent), plus the step time.

    HF_HUB_OFFLINE=1 python benchmarks/recompute_tiny.py --steps 20
"""

import argparse
import json
import tempfile
import time


from dsv3.train import Trainer, load_run_config
from dsv3.parallel.recompute import saved_activation_bytes
from dsv3.train.trainer import lm_losses


def saved_bytes(trainer: Trainer) -> int:
    window = trainer.val[0] if trainer.val else trainer.loader.next_batch(trainer.cfg.train.micro_batch_size)
    out = []
    n = saved_activation_bytes(lambda: out.extend(lm_losses(trainer.model, window)[:2]))
    main, mtp = out
    (main + sum(mtp)).backward()
    trainer.optimizer.zero_grad(set_to_none=True)
    return n


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="configs/tiny.toml")
    p.add_argument("--steps", type=int, default=20)
    a = p.parse_args()
    out = {}
    for recompute in (False, True):
        cfg = load_run_config(a.config, [f"train.recompute={str(recompute).lower()}", f"train.steps={a.steps}",
                                         f'run_dir="{tempfile.mkdtemp()}"', "log.progress=false",
                                         "log.tensorboard=false", "log.val_batches=1"])
        t = Trainer(cfg, progress=False)
        mem = saved_bytes(t)
        t0 = time.perf_counter()
        losses = [t.train_step()[0].loss for _ in range(a.steps)]
        out["on" if recompute else "off"] = dict(saved_bytes_per_micro_batch=mem, losses=losses,
                                                  seconds_per_step=(time.perf_counter() - t0) / a.steps)
        t.logger.close()
    same = out["on"]["losses"] == out["off"]["losses"]
    print(json.dumps({k: {**v, "losses": v["losses"][-3:]} for k, v in out.items()}, indent=1))
    print(f"losses identical over {a.steps} steps: {same}; activation memory "
          f"{out['off']['saved_bytes_per_micro_batch'] / 2**20:.1f} MiB -> "
          f"{out['on']['saved_bytes_per_micro_batch'] / 2**20:.1f} MiB per micro-batch "
          f"({out['on']['saved_bytes_per_micro_batch'] / out['off']['saved_bytes_per_micro_batch']:.0%}); "
          f"step {out['off']['seconds_per_step']:.3f} s -> {out['on']['seconds_per_step']:.3f} s")


if __name__ == "__main__":
    main()
