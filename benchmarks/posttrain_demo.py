"""The post-training demo on the CPU (issue 18): procedurally generated arithmetic -> tiny base -> SFT -> GRPO ->
held-out pass@1 / pass@8 / format compliance, over several seeds.

Per seed:
1. base: a byte-level BPE tokenizer trained on task text and a randomly initialised tiny V3-architecture model
   (MLA, 8 routed experts top-2 + 1 shared, a dense first layer, one MTP module), saved as a Hugging Face directory;
2. `dsv3 sft` (dsv3.posttrain.sft) on train-split problems rendered as one-turn chats whose assistant turn is
   `<think>a op b</think><answer>value</answer>`: format and a first grasp of the arithmetic;
3. `dsv3 grpo` (dsv3.posttrain.grpo) from the SFT run directory, on other train-split problems, correctness + format
   rewards, DAPO switches (token aggregation, clip-higher, dynamic sampling), no KL;
4. evaluation on held-out problems (split by a hash of the problem: never seen in training): k samples at
   temperature 1 (pass@1, pass@k), greedy accuracy, format compliance; after SFT and after GRPO.

    PYTHONPATH=src python benchmarks/posttrain_demo.py --seeds 0 1 2 --out out/posttrain_demo
writes results.json there and docs/posttrain_demo.png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time
from pathlib import Path

import torch

from dsv3 import ModelConfig, Transformer
from dsv3.checkpoint import save_pretrained
from dsv3.data import train_tokenizer
from dsv3.data.chat import ChatTemplate
from dsv3.posttrain.base import load_model_and_tokenizer
from dsv3.posttrain.evaluate import evaluate_tasks
from dsv3.posttrain.grpo import grpo_trainer
from dsv3.posttrain.sft import sft_trainer
from dsv3.posttrain.tasks import generate_tasks
from dsv3.train.metrics import read_metrics


def column_trace(a: int, op: str, b: int) -> str:
    """Digit-by-digit working, units first (carries / borrows written out): the answer can then be read off it."""
    if op == "-" and a < b:
        return f"{b} - {a} then negate: " + column_trace(b, "-", a)
    xs, ys, steps, c = str(a)[::-1], str(b)[::-1].ljust(len(str(a)), "0"), [], 0
    for i, (x, y) in enumerate(zip(xs, ys)):
        x, y = int(x), int(y)
        last = i == len(xs) - 1
        if op == "+":
            v = x + y + c
            steps.append(f"{x}+{y}+{c}={v}" if last else f"{x}+{y}+{c}={v % 10} c{v // 10}")
            c = v // 10
        else:
            v = x - y - c
            if last:
                steps.append(f"{x}-{y}-{c}={v}")
            else:
                borrow = int(v < 0)
                steps.append(f"{x + 10 * borrow}-{y}-{c}={v + 10 * borrow} b{borrow}")
                c = borrow
    return ", ".join(steps)


def answer(task, cot: bool = False) -> str:
    a, b = task.numbers
    op = task.prompt.split()[2]
    if cot and op in "+-":
        return f"<think>{column_trace(a, op, b)}</think><answer>{task.answer}</answer>"
    return f"<think>{a} {op} {b}</think><answer>{task.answer}</answer>"


def make_base(out: Path, seed: int, args) -> Path:
    # digits removed from the tokenizer's corpus: no multi-digit tokens, so numbers are read and written digit by
    # digit (a 2-digit sum is then carries over digits, not a lookup in a table of 2-digit tokens)
    texts = [re.sub(r"[0-9]", " ", t.prompt + " " + answer(t, args.cot))
             for t in generate_tasks("arithmetic", "train", 3000, 10_000 + seed, digits=args.digits, ops=args.ops)]
    tok = train_tokenizer(texts, vocab_size=args.vocab)
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                      moe_intermediate_size=args.hidden // 2, num_hidden_layers=args.layers, num_attention_heads=4,
                      num_key_value_heads=4, n_shared_experts=1, n_routed_experts=8, num_experts_per_tok=2,
                      n_group=4, topk_group=2, first_k_dense_replace=1, kv_lora_rank=64, q_lora_rank=96,
                      qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, max_position_embeddings=256,
                      num_nextn_predict_layers=1, rope_scaling=None, torch_dtype="float32")
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device="cpu")
    model.init_weights()
    save_pretrained(model, out)
    tok.save(out)
    return out


def run(seed: int, root: Path, args) -> dict:
    d, t0, times = root / f"seed{seed}", time.perf_counter(), {}
    d.mkdir(parents=True, exist_ok=True)
    if args.reuse_sft and (d / "sft" / "checkpoints").is_dir():     # an earlier invocation's base and SFT
        return finish(seed, d, root, args, t0, {"sft_s": None})
    base = make_base(d / "base", seed, args)
    # step 2: SFT
    train = generate_tasks("arithmetic", "train", args.sft_problems, seed, digits=args.digits, ops=args.ops)
    with (d / "sft.jsonl").open("w") as f:
        for t in train:
            f.write(json.dumps({"messages": [{"role": "user", "content": t.prompt},
                                             {"role": "assistant", "content": answer(t, args.cot)}]}) + "\n")
    common = {"train": {"device": "cpu", "dtype": "fp32", "seed": seed},
              "log": {"interval": 10, "tensorboard": False, "progress": False},
              "checkpoint": {"interval": 0, "keep": 1}}
    sft = {"run_dir": str(d / "sft"), "sft": {"init": str(base), "train_files": [str(d / "sft.jsonl")],
                                               "eval_fraction": 0.02, "seed": seed},
           "optim": {"lr": args.sft_lr}, "data": {"seq_len": 128},
           **common, "train": {**common["train"], "steps": args.sft_steps, "batch_size": args.sft_batch,
                     "micro_batch_size": args.sft_batch},
           "log": {**common["log"], "val_interval": args.sft_steps, "val_batches": 2}}
    (d / "sft.json").write_text(json.dumps(sft))
    trainer, _ = sft_trainer(d / "sft.json", [], overwrite=True)
    trainer.run()
    times["sft_s"] = time.perf_counter() - t0
    return finish(seed, d, root, args, t0, times)


def finish(seed: int, d: Path, root: Path, args, t0: float, times: dict) -> dict:
    common = {"train": {"device": "cpu", "dtype": "fp32", "seed": seed},
              "log": {"interval": 10, "tensorboard": False, "progress": False},
              "checkpoint": {"interval": 0, "keep": 1}}
    # step 3: GRPO from the SFT run
    grpo = {"run_dir": str(d / "grpo"),
            "grpo": {"init": str(d / "sft"), "task": "arithmetic", "digits": args.digits, "ops": args.ops,
                     "train_prompts": 2000,
                     "prompts_per_step": args.prompts, "group_size": args.group, "max_new_tokens": args.max_new,
                     "seed": seed + 1000, "format_weight": 0.1, "scale_std": not args.dr_grpo},
            "optim": {"lr": args.grpo_lr}, **common,
            "train": {**common["train"], "steps": args.grpo_steps, "micro_batch_size": args.prompts * args.group}}
    (d / "grpo.json").write_text(json.dumps(grpo))
    t1 = time.perf_counter()
    grpo_trainer(d / "grpo.json", [], overwrite=True).run()
    times["grpo_s"] = time.perf_counter() - t1
    # step 4: held-out evaluation of both
    held = generate_tasks("arithmetic", "heldout", args.eval_problems, 7, digits=args.digits, ops=args.ops)
    out = {"seed": seed}
    t2 = time.perf_counter()
    for name in ("sft", "grpo"):
        model, tok = load_model_and_tokenizer(d / name)
        out[name] = evaluate_tasks(model, tok, ChatTemplate(), held, k=args.k, max_new_tokens=args.max_new,
                                   seed=seed)
        print(f"seed {seed} {name}: {out[name]}", file=sys.stderr)
    times["eval_s"] = time.perf_counter() - t2
    out["grpo_curve"] = [{k: r.get(k) for k in ("step", "reward", "correct", "format", "zero_std_groups",
                                                  "response_length", "clip_fraction", "entropy",
                                                  "engine_logprob_gap", "rollout_s", "train_s")}
                         for r in read_metrics(d / "grpo", kind="train")]
    out["times"] = {**times, "total_s": time.perf_counter() - t0}
    return out


def chart(results: list[dict], path: Path, k: int) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    metrics = ["pass@1", f"pass@{k}", "greedy", "format"]
    for j, stage in enumerate(("sft", "grpo")):
        vals = torch.tensor([[r[stage][m] for m in metrics] for r in results])
        x = torch.arange(len(metrics)) + (j - 0.5) * 0.38
        ax.bar(x, vals.mean(0), 0.38, yerr=vals.std(0) if len(results) > 1 else None, label=stage.upper(),
               capsize=3)
        for r in vals:
            ax.scatter(x, r, color="k", s=8, zorder=3)
    ax.set_xticks(range(len(metrics)), metrics)
    ax.set_ylim(0, 1)
    ax.set_title(f"held-out arithmetic, {len(results)} seeds (mean, std, dots: seeds)")
    ax.legend()
    for r in results:
        c = r["grpo_curve"]
        ax2.plot([p["step"] for p in c], [p["correct"] for p in c], label=f"seed {r['seed']}")
    ax2.set_xlabel("GRPO step")
    ax2.set_ylabel("train rollouts: share correct")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", default="out/posttrain_demo")
    p.add_argument("--chart", default="docs/posttrain_demo.png")
    p.add_argument("--digits", type=int, default=2)
    p.add_argument("--ops", default="+-")
    p.add_argument("--reuse-sft", action="store_true", help="keep a seed's base and SFT run from an earlier call")
    p.add_argument("--dr-grpo", action="store_true", help="advantages without the std scaling (Dr. GRPO)")
    p.add_argument("--cot", action="store_true", help="SFT answers show column-wise working in <think>")
    p.add_argument("--vocab", type=int, default=400)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--sft-problems", type=int, default=4000)
    p.add_argument("--sft-steps", type=int, default=200)
    p.add_argument("--sft-batch", type=int, default=16)
    p.add_argument("--sft-lr", type=float, default=3e-3)
    p.add_argument("--grpo-steps", type=int, default=20)
    p.add_argument("--grpo-lr", type=float, default=3e-4)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--max-new", type=int, default=24)
    p.add_argument("--eval-problems", type=int, default=60)
    p.add_argument("--k", type=int, default=8)
    args = p.parse_args()
    root = Path(args.out)
    t0, load0 = time.perf_counter(), os.getloadavg()
    results = [run(s, root, args) for s in args.seeds]
    summary = {"args": vars(args), "results": results, "wall_s": time.perf_counter() - t0,
               "loadavg_start": load0, "loadavg_end": os.getloadavg(), "cpus": os.cpu_count(),
               "machine": platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads()}
    (root / "results.json").write_text(json.dumps(summary, indent=1))
    chart(results, Path(args.chart), args.k)
    for stage in ("sft", "grpo"):
        for m in ("pass@1", f"pass@{args.k}", "greedy", "format"):
            v = torch.tensor([r[stage][m] for r in results])
            print(f"{stage:5s} {m:8s} mean {v.mean():.3f} std {v.std() if len(v) > 1 else 0:.3f} seeds "
                  f"{[round(x, 3) for x in v.tolist()]}")
    print(f"wall {summary['wall_s']:.0f} s, load average {load0} -> {summary['loadavg_end']}")


if __name__ == "__main__":
    main()
