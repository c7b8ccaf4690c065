"""GRPO steps/hour and the rollout / train time split (issue 18's GPU point) on a random-init policy of the
`lite-8L` shape, through `dsv3 grpo`'s code: configs/grpo.toml read by dsv3.posttrain.config with `section.key=value`
overrides, the RunConfig made by split_config, and GRPOTrainer.train_step (Engine rollouts on the policy's own
weights, rewards, group advantages, the clipped policy loss, AdamW). Two things differ from `dsv3 grpo`, both outside
the step: the base is the random model of `dsv3 bench` held in memory (a dsv3.posttrain.base.Base, no checkpoint
read), and the steps are driven one by one (Trainer.run would also write the final checkpoint, which is not part of
a step's cost), each timed with the device synchronised, its rollout_s / train_s from GRPOTrainer's own clocks.

The task is dsv3.posttrain.tasks' arithmetic (train split), the tokenizer the real byte-level BPE of
eval_throughput.py (512 ids, with the DeepSeek chat template). A random policy never emits EOS, so every response
runs to grpo.max_new_tokens (the longest rollout a step can have) and every reward is equal: dynamic sampling and
the overlong filter are switched off so that every response token still carries loss (the same work as a learning
run, where advantages are non-zero).

GPU:  PYTHONPATH=src python benchmarks/grpo_gpu.py --json $OUT/grpo_gpu.json
CPU:  PYTHONPATH=src python benchmarks/grpo_gpu.py --config tiny --device cpu --dtype fp32 --steps 2 \
        --prompts 2 --group 4 --max-new-tokens 8
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from dsv3 import load_model_config
from dsv3.infer.bench import random_model
from dsv3.posttrain.base import Base, chat_template_of
from dsv3.posttrain.config import read_posttrain_dict, section_from_table, split_config
from dsv3.posttrain.grpo import GRPOTrainer

sys.path.insert(0, str(Path(__file__).parent))
from eval_throughput import bench_tokenizer  # noqa: E402

GRPO_TOML = Path(__file__).parents[1] / "configs" / "grpo.toml"


def build_trainer(args, work: Path) -> GRPOTrainer:
    """grpo_trainer's steps (dsv3.posttrain.grpo) with an in-memory random base in place of load_base."""
    tok_dir = Path(args.tokenizer_dir) if args.tokenizer_dir else work / "tokenizer"
    tokenizer = bench_tokenizer(str(tok_dir))
    model_cfg = load_model_config(args.config)
    if tokenizer.vocab_size > model_cfg.vocab_size:
        raise SystemExit(f"the tokenizer's {tokenizer.vocab_size} ids exceed {args.config}'s vocab")
    model = random_model(model_cfg, args.device, torch.bfloat16 if args.dtype != "fp32" else torch.float32)
    base = Base(Path(f"random:{args.config}"), model_cfg, model.state_dict(), tokenizer, chat_template_of(tok_dir))
    overrides = [f"grpo.init=random:{args.config}", f"run_dir={json.dumps(str(work / 'run'))}",
                 f"grpo.prompts_per_step={args.prompts}", f"grpo.group_size={args.group}",
                 f"grpo.max_new_tokens={args.max_new_tokens}", "grpo.dynamic_sampling=false",
                 "grpo.overlong_filter=false", f"train.device={args.device}", f"train.dtype={args.dtype}",
                 f"train.steps={args.warmup + args.steps}", f"train.micro_batch_size={args.micro}",
                 f"train.compile={str(args.compile).lower()}", f"optim.state_dtype={args.state_dtype}",
                 "log.interval=1", "log.tensorboard=false", "checkpoint.interval=0"]
    d = read_posttrain_dict("grpo", GRPO_TOML, overrides)
    section = section_from_table("grpo", d["grpo"])
    rows = section.prompts_per_step * section.group_size
    _, cfg = split_config("grpo", d, model_cfg.to_dict(),
                          train={"batch_size": rows, "batch_size_start": 0,
                                 "micro_batch_size": d["train"]["micro_batch_size"]})
    trainer = GRPOTrainer(cfg, section, base, progress=False)
    del base, model            # the trainer holds its own copy of the weights
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return trainer


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="lite-8L", help="preset or config.json of the policy")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bf16-params", help="train.dtype (configs/lite-8L.toml: bf16-params)")
    p.add_argument("--state-dtype", default="bf16", help="optim.state_dtype (configs/lite-8L.toml: bf16)")
    p.add_argument("--compile", action="store_true", help="train.compile (configs/lite-8L.toml: true)")
    p.add_argument("--prompts", type=int, default=8, help="grpo.prompts_per_step (configs/grpo.toml: 8)")
    p.add_argument("--group", type=int, default=8, help="grpo.group_size G (configs/grpo.toml: 8)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--micro", type=int, default=64, help="train.micro_batch_size (configs/grpo.toml: 64)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--tokenizer-dir", default=None, help="where the tokenizer is trained / read (default: temp)")
    p.add_argument("--json", default=None, help="write the results here (rewritten after every step)")
    p.add_argument("--deadline-s", type=float, default=0, help="> 0: no step starts later (after one timed step)")
    return p.parse_args()


def timed_step(trainer: GRPOTrainer, i: int, warmup: bool, device: str) -> dict:
    """One optimizer step, the device synchronised around it; GRPOTrainer's rollout / train clocks of it."""
    sync(device)
    t = time.perf_counter()
    trainer.train_step()
    sync(device)
    dt = time.perf_counter() - t
    m = trainer.interval_metrics()
    rec = dict(step=i + 1, warmup=warmup, step_s=dt, rollout_s=m["rollout_s"], train_s=m["train_s"],
               other_s=dt - m["rollout_s"] - m["train_s"], response_length=m.get("response_length"),
               reward=m.get("reward"), engine_logprob_gap=m.get("engine_logprob_gap"))
    print(f"[grpo_gpu] step {i + 1}{' (warm-up)' if warmup else ''}: {dt:.2f} s = rollout {rec['rollout_s']:.2f} "
          f"+ train {rec['train_s']:.2f} + optimizer/other {rec['other_s']:.2f}; mean response "
          f"{rec['response_length']} tokens, engine-trainer log-prob gap {rec['engine_logprob_gap']}", flush=True)
    return rec


def summarise(result: dict) -> None:
    """Means over the timed (non-warm-up) steps, steps/hour and shares, into `result`."""
    timed = [s for s in result["steps"] if not s["warmup"]]
    if not timed:
        return
    mean = {k: sum(s[k] for s in timed) / len(timed) for k in ("step_s", "rollout_s", "train_s", "other_s")}
    resp = sum(s["response_length"] for s in timed) / len(timed)
    result.update(timed_steps=len(timed), mean=mean, steps_per_hour=3600 / mean["step_s"],
                  rollout_share=mean["rollout_s"] / mean["step_s"], train_share=mean["train_s"] / mean["step_s"],
                  rollout_tok_per_s=result["rollouts_per_step"] * resp / mean["rollout_s"])


def main() -> int:
    start = time.perf_counter()
    args = parse_args()
    with tempfile.TemporaryDirectory(prefix="dsv3-grpo-gpu-") as tmp:    # the run directory (metrics.jsonl)
        return bench(args, start, Path(tmp))


def bench(args, start: float, work: Path) -> int:
    trainer = build_trainer(args, work)
    setup_s = time.perf_counter() - start
    n, rows, cuda = trainer.param_counts, args.prompts * args.group, args.device.startswith("cuda")
    print(f"[grpo_gpu] {args.config}: {n['total'] / 1e9:.2f} B params ({n['active'] / 1e9:.2f} B active), "
          f"{args.device} {trainer.dtype}, train.dtype={args.dtype} optim.state_dtype={args.state_dtype} "
          f"compile={args.compile}; {args.prompts} prompts x G={args.group} = {rows} rollouts/step, "
          f"max_new_tokens {args.max_new_tokens}, micro-batch {args.micro}; set up in {setup_s:.1f} s", flush=True)
    result = dict(config=args.config, device=args.device, gpu=torch.cuda.get_device_name() if cuda else None,
                  params_b=n["total"] / 1e9, active_b=n["active"] / 1e9, train_dtype=args.dtype,
                  state_dtype=args.state_dtype, compile=args.compile, prompts_per_step=args.prompts,
                  group_size=args.group, rollouts_per_step=rows, max_new_tokens=args.max_new_tokens,
                  micro_batch_size=args.micro, setup_s=setup_s, steps=[])
    for i in range(args.warmup + args.steps):
        if i > args.warmup and args.deadline_s and time.perf_counter() - start > args.deadline_s:
            print(f"[grpo_gpu] past --deadline-s {args.deadline_s:.0f}: {i - args.warmup} timed steps", flush=True)
            break
        result["steps"].append(timed_step(trainer, i, i < args.warmup, args.device))
        summarise(result)
        result["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1))
    if "mean" not in result:
        print("[grpo_gpu] no timed step", flush=True)
        return 1
    mean = result["mean"]
    print(f"{'GRPO ' + args.config:<20} {'steps/h':>8} {'step s':>7} {'rollout s':>10} {'train s':>8} "
          f"{'other s':>8} {'rollout %':>9} {'rollout tok/s':>13}")
    print(f"{f'{rows} = {args.prompts}x{args.group}, {args.max_new_tokens} tok':<20} {result['steps_per_hour']:>8.0f} "
          f"{mean['step_s']:>7.2f} {mean['rollout_s']:>10.2f} {mean['train_s']:>8.2f} {mean['other_s']:>8.2f} "
          f"{100 * result['rollout_share']:>8.1f}% {result['rollout_tok_per_s']:>13.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
