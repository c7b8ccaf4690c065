"""The post-training demo on the CPU (issue 18): procedurally generated arithmetic -> tiny base -> SFT -> GRPO, and
sequence-level distillation from a larger teacher at the same compute, all scored by `dsv3 eval`, over seeds.

Once (shared by the seeds and by later calls):
0. teacher: a wider V3-architecture model (`--teacher-hidden`, `--teacher-layers`), SFT'd from random weights on
   train-split problems to convergence (`--teacher-steps`, cosine), kept in `--teacher-dir` (runs/, reused while its
   recipe is the same; its own training is counted in neither arm below: it stands for a given stronger model).
Per seed:
1. base: a byte-level BPE tokenizer trained on task text (digits removed: numbers are read digit by digit) and a
   randomly initialised tiny V3 model (MLA, 8 routed experts top-2 + 1 shared, a dense first layer, one MTP
   module), saved as a Hugging Face directory;
2. `dsv3 sft` (dsv3.posttrain.sft) on train-split problems as one-turn chats whose assistant turn is
   `<think>column-wise working</think><answer>value</answer>`, constant lr after a warm-up, early-stopped: from
   `--sft-min-steps` on, every `--sft-chunk` steps (exact resume) one sample at T = 1 on `--probe-problems`
   train-split problems apart from the SFT data (never held-out ones); SFT stops once that accuracy reaches
   `--sft-target`. The tiny model's accuracy jumps (~18% -> ~70% within a few hundred steps, at a step that differs
   by seed), so a fixed step count leaves the seeds far apart; stopping on the probe leaves each where GRPO's
   groups have mixed rewards;
3. `dsv3 grpo` (dsv3.posttrain.grpo) from the SFT run: correctness + 0.1 x format reward, group-normalised
   advantages, token aggregation, clip-higher, dynamic sampling, overlong filtering, no KL;
4. `dsv3 distill` (dsv3.posttrain.distill, sequence mode) from the same SFT run: the teacher answers train-split
   problems, its verified answers are SFT data; as many SFT steps as make its FLOPs (the teacher's generation
   included) equal to GRPO's (`flops`);
5. `dsv3 eval gen --chat` on held-out problems (split by a hash of the problem: never trained on) for the SFT, GRPO
   and distilled models: k samples at temperature 1 (pass@1, pass@k, maj@k), greedy accuracy; format compliance of
   the samples (dsv3.posttrain.rewards.format_reward) read from its samples file.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/posttrain_demo.py --seeds 0 1 2 --jobs 3 --out out/posttrain_demo
writes results.json there and the chart docs/posttrain_demo.png.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import multiprocessing
import os
import platform
import re
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from dsv3 import ModelConfig, Transformer
from dsv3.checkpoint import save_pretrained
from dsv3.config import load_model_config
from dsv3.cli import main as dsv3
from dsv3.data import train_tokenizer
from dsv3.parallel.plan import flops_per_token
from dsv3.posttrain.distill import distill_trainer
from dsv3.posttrain.grpo import grpo_trainer
from dsv3.posttrain.rewards import format_reward
from dsv3.posttrain.sft import sft_trainer
from dsv3.posttrain.tasks import generate_tasks
from dsv3.train.metrics import read_metrics

COMMON = {"log": {"interval": 10, "tensorboard": False, "progress": False}, "checkpoint": {"interval": 0, "keep": 1}}
STAGES = ("sft", "grpo", "distill")


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


def answer(task) -> str:
    a, b = task.numbers
    op = task.prompt.split()[2]
    return f"<think>{column_trace(a, op, b)}</think><answer>{task.answer}</answer>"


def tasks(split: str, n: int, seed: int, args) -> list:
    return generate_tasks("arithmetic", split, n, seed, digits=args.digits, ops=args.ops)


def make_base(out: Path, seed: int, args, hidden: int, layers: int) -> Path:
    # digits removed from the tokenizer's corpus: no multi-digit tokens, so numbers are read and written digit by
    # digit (a 2-digit sum is then carries over digits, not a lookup in a table of 2-digit tokens)
    texts = [re.sub(r"[0-9]", " ", t.prompt + " " + answer(t)) for t in tasks("train", 2000, 10_000 + seed, args)]
    tok = train_tokenizer(texts, vocab_size=args.vocab)
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                      moe_intermediate_size=hidden // 2, num_hidden_layers=layers, num_attention_heads=4,
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


def params(cfg: ModelConfig) -> dict:
    with torch.device("meta"):
        return Transformer(cfg).num_params()


def sft(d: Path, init: Path, seed: int, args, steps: int, lr: float, problems: int, warmup_steps: int,
        decay: bool, resume: bool = False) -> Path:
    """Step 2 (and the teacher's training): `dsv3 sft` on `problems` train-split problems with worked answers, lr
    linear warm-up over `warmup_steps`, then constant (`decay` False) or cosine to 0.2 x lr at `steps`. `resume`:
    continue the run to `steps` (exact resume; with the constant schedule the lr is the same as in one longer run)."""
    data, run_file = d.parent / f"{d.name}.jsonl", d.parent / f"{d.name}.json"
    if not resume:
        with data.open("w") as f:
            for t in tasks("train", problems, seed, args):
                f.write(json.dumps({"messages": [{"role": "user", "content": t.prompt},
                                                 {"role": "assistant", "content": answer(t)}]}) + "\n")
    warmup = min(1.0, warmup_steps / steps)
    run = {"run_dir": str(d), "sft": {"init": str(init), "train_files": [str(data)], "eval_fraction": 0.02,
                                      "seed": seed},
           "optim": {"lr": lr, "warmup": warmup, "constant_until": warmup if decay else 1.0},
           "data": {"seq_len": 128}, **COMMON,
           "train": {"device": "cpu", "dtype": "fp32", "seed": seed, "steps": steps, "batch_size": args.sft_batch,
                     "micro_batch_size": args.sft_batch},
           "log": {**COMMON["log"], "val_interval": steps, "val_batches": 2}}
    run_file.write_text(json.dumps(run))
    trainer, _ = sft_trainer(run_file, [], resume=resume, overwrite=not resume)
    trainer.run()
    return d


def probe(run: Path, seed: int, args) -> float:
    """Share of `--probe-problems` train-split problems (drawn apart from the SFT data's, never held-out ones) that
    one sample at T = 1 answers correctly in the format: the early-stopping signal of `sft_to_target`."""
    from dsv3.posttrain.base import chat_template_of, load_model_and_tokenizer, tokenizer_dir
    from dsv3.posttrain.distill import teacher_conversations
    from dsv3.data.chat import ChatTemplate
    seen = {t.key for t in tasks("train", args.sft_problems, seed, args)}
    pool = [t for t in tasks("train", args.probe_problems + len(seen), seed + 3000, args) if t.key not in seen]
    model, tok = load_model_and_tokenizer(run)
    _, stats = teacher_conversations(model, tok, ChatTemplate(chat_template_of(tokenizer_dir(run))),
                                     pool[:args.probe_problems], 1, 1.0, args.max_new, seed + 3000)
    return stats["kept"] / stats["problems"]


def sft_to_target(d: Path, init: Path, seed: int, args) -> list[dict]:
    """Step 2 with early stopping: SFT at a constant lr (after the warm-up) to `--sft-min-steps`, then
    `--sft-chunk` steps at a time (exact resume) until the probe's accuracy reaches `--sft-target` or
    `--sft-max-steps`: every seed stops where GRPO's groups have mixed rewards, whenever it crosses the jump."""
    steps, log = args.sft_min_steps, []
    while True:
        sft(d, init, seed, args, steps, args.sft_lr, args.sft_problems, args.sft_warmup_steps, decay=False,
            resume=bool(log))
        log.append({"step": steps, "probe": probe(d, seed, args)})
        print(f"seed {seed} SFT step {steps}: probe accuracy {log[-1]['probe']:.3f}", file=sys.stderr, flush=True)
        if log[-1]["probe"] >= args.sft_target or steps >= args.sft_max_steps:
            return log
        steps = min(steps + args.sft_chunk, args.sft_max_steps)


def grpo(d: Path, seed: int, args) -> Path:
    """Step 3: `dsv3 grpo` from the SFT run."""
    run = {"run_dir": str(d / "grpo"),
           "grpo": {"init": str(d / "sft"), "task": "arithmetic", "digits": args.digits, "ops": args.ops,
                    "train_prompts": 2000, "prompts_per_step": args.prompts, "group_size": args.group,
                    "max_new_tokens": args.max_new, "temperature": 1.0, "seed": seed + 1000, "format_weight": 0.1,
                    "scale_std": not args.dr_grpo, "beta": 0.0, "updates_per_batch": args.mu},
           "optim": {"lr": args.grpo_lr}, **COMMON,
           "train": {"device": "cpu", "dtype": "fp32", "seed": seed, "steps": args.grpo_steps,
                     "micro_batch_size": args.prompts * args.group}}
    (d / "grpo.json").write_text(json.dumps(run))
    grpo_trainer(d / "grpo.json", [], overwrite=True).run()
    return d / "grpo"


def flops(cfg: ModelConfig, tokens: float, train: bool, mtp: bool = False) -> float:
    """Matmul + attention FLOPs of `tokens` tokens through a model (dsv3.parallel.plan.flops_per_token: training is 3x
    the forward), with or without its MTP module (SFT trains it; rollouts and GRPO's loss do not run it)."""
    c = dataclasses.replace(cfg, num_nextn_predict_layers=cfg.num_nextn_predict_layers if mtp else 0)
    per_token = flops_per_token(c, seq_len=128)["total"]
    return tokens * (per_token if train else per_token / 3)


def grpo_flops(run: Path, cfg: ModelConfig, mu: int) -> float:
    """Per step (one policy update): forward + backward of the batch's rows; per batch of rollouts (every mu steps):
    the rollouts (a forward of every prompt and sampled token) and, when mu > 1, the rollout policy's log-probs (one
    more forward). From the run's metrics: `tokens_rollout` (real tokens of the batch, averaged over each interval)."""
    total, last = 0.0, 0
    for r in read_metrics(run, kind="train"):
        steps, last, n = r["step"] - last, r["step"], r["tokens_rollout"]
        total += steps * (flops(cfg, n, train=True) + flops(cfg, n, train=False) * (1 + (mu > 1)) / mu)
    return total


def distill(d: Path, seed: int, args, teacher: Path, budget: float) -> dict:
    """Step 4, `dsv3 distill`'s two steps (dsv3.posttrain.distill): the teacher's verified answers to train-split
    problems (rejection sampling), then SFT of the SFT model on them for as many steps as GRPO's FLOPs (`budget`)
    leave after the teacher's generation."""
    from dsv3.data.chat import ChatTemplate, encode_chat
    from dsv3.posttrain.base import chat_template_of, load_model_and_tokenizer, tokenizer_dir
    from dsv3.posttrain.distill import teacher_conversations
    model, tok = load_model_and_tokenizer(teacher)
    kept, stats = teacher_conversations(model, tok, ChatTemplate(chat_template_of(tokenizer_dir(teacher))),
                                        tasks("train", args.distill_prompts, seed + 2000, args), args.distill_samples,
                                        1.0, args.max_new, seed + 2000)
    (d / "distill.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    student = load_model_config(d / "sft")
    student_tok = load_model_and_tokenizer(d / "sft")[1]
    mean_len = sum(len(encode_chat(student_tok, r["messages"])) for r in kept) / max(1, len(kept))
    teacher_f = flops(load_model_config(teacher), stats["tokens"], train=False)
    per_step = flops(student, args.sft_batch * mean_len, train=True, mtp=True)
    steps = int((budget - teacher_f) // per_step) if kept else 0
    if steps < 1:
        return {**stats, "steps": 0, "teacher_flops": teacher_f, "note": "the teacher's generation alone spends "
                "GRPO's FLOPs (or kept nothing)"}
    run = {"run_dir": str(d / "distill"),
           "distill": {"teacher": str(teacher), "init": str(d / "sft"), "mode": "sequence",
                       "train_files": [str(d / "distill.jsonl")], "eval_fraction": 0.0, "seed": seed},
           "optim": {"lr": args.distill_lr, "warmup": 0.1, "constant_until": 0.1}, "data": {"seq_len": 128}, **COMMON,
           "train": {"device": "cpu", "dtype": "fp32", "seed": seed, "steps": steps, "batch_size": args.sft_batch,
                     "micro_batch_size": args.sft_batch}, "log": {**COMMON["log"], "val_interval": 0}}
    (d / "distill.json").write_text(json.dumps(run))
    trainer, _ = distill_trainer(d / "distill.json", [], overwrite=True)
    trainer.run()
    return {**stats, "steps": steps, "teacher_flops": teacher_f, "sft_flops": steps * per_step,
            "mean_conversation_tokens": mean_len}


def evaluate(model: Path, held: Path, out: Path, args) -> dict:
    """Step 5 through `dsv3 eval gen --chat`: sampled (pass@1, pass@k, maj@k) and greedy; format from the samples."""
    common = ["eval", "gen", "--chat", "--model", str(model), "--task", str(held), "--max-tokens", str(args.max_new),
              "--max-num-seqs", "256", "--cache-gib", "0.25", "--overwrite"]     # recomputed unless --reuse
    if not (args.reuse and (out / "sampled" / "results.json").exists() and (out / "greedy" / "results.json").exists()):
        with contextlib.redirect_stdout(io.StringIO()) as table:
            assert dsv3(common + ["--k", str(args.k), "--temperature", "1", "--out", str(out / "sampled")]) == 0
            assert dsv3(common + ["--out", str(out / "greedy")]) == 0
        print(table.getvalue(), file=sys.stderr)
    sampled = json.loads((out / "sampled" / "results.json").read_text())[held.stem]["metrics"]
    greedy = json.loads((out / "greedy" / "results.json").read_text())[held.stem]["metrics"]
    rows = [json.loads(x) for x in (out / "sampled" / f"samples_{held.stem}.jsonl").read_text().splitlines()]
    outputs = [o for r in rows for o in r["outputs"]]
    k = args.k
    return {"pass@1": sampled["pass@1"], "pass@1_stderr": sampled["pass@1_stderr"], f"pass@{k}": sampled[f"pass@{k}"],
            f"maj@{k}": sampled[f"maj@{k}"], "greedy": greedy["pass@1"],
            "format": sum(map(format_reward, outputs)) / len(outputs), "problems": sampled["n"]}


class Laps:
    """Seconds per named stage."""

    def __init__(self, times: dict):
        self.times, self.clock = times, time.perf_counter()

    def __call__(self, name: str) -> None:
        self.times[name], self.clock = time.perf_counter() - self.clock, time.perf_counter()


def run_seed(seed: int, root: Path, held: Path, args) -> dict:
    """Steps 1-3 and 5 for one seed: base, SFT, GRPO, both evaluated."""
    torch.set_num_threads(1)
    d, out = root / f"seed{seed}", {"seed": seed, "times": {}, "cpu_s": time.process_time()}
    d.mkdir(parents=True, exist_ok=True)
    lap = Laps(out["times"])
    if not (args.reuse and (d / "sft" / "checkpoints").is_dir()):
        base = make_base(d / "base", seed, args, args.hidden, args.layers)
        (d / "sft_probe.json").write_text(json.dumps(sft_to_target(d / "sft", base, seed, args)))
    out["sft_probe"] = json.loads((d / "sft_probe.json").read_text())
    lap("sft_s")
    out["sft"] = evaluate(d / "sft", held, d / "eval_sft", args)
    lap("eval_sft_s")
    if not (args.reuse and (d / "grpo" / "checkpoints").is_dir()):
        grpo(d, seed, args)
    lap("grpo_s")
    out["grpo"] = evaluate(d / "grpo", held, d / "eval_grpo", args)
    lap("eval_grpo_s")
    out["compute"] = {"grpo_flops": grpo_flops(d / "grpo", load_model_config(d / "sft"), args.mu)}
    out["grpo_curve"] = [{k: r.get(k) for k in ("step", "reward", "correct", "format", "zero_std_groups",
                                                  "response_length", "clip_fraction", "entropy", "tokens_rollout",
                                                  "engine_logprob_gap", "rollout_s", "train_s")}
                         for r in read_metrics(d / "grpo", kind="train")]
    out["cpu_s"] = time.process_time() - out["cpu_s"]
    return out


def run_distill(out: dict, root: Path, teacher: Path, held: Path, args) -> dict:
    """Step 4 and its evaluation for one seed, at the FLOPs its GRPO run spent (or `--distill-flops`, set ahead so
    the arm can run beside GRPO; the results then carry both numbers). With --reuse, a finished arm is kept."""
    torch.set_num_threads(1)
    d, cpu, lap = root / f"seed{out['seed']}", time.process_time(), Laps(out["times"])
    done = d / "distill_compute.json"
    if not (args.reuse and done.exists() and (d / "distill" / "checkpoints").is_dir()):
        budget = args.distill_flops or out["compute"]["grpo_flops"]
        done.write_text(json.dumps({**distill(d, out["seed"], args, teacher, budget), "budget_flops": budget}))
    out["compute"]["distill"] = json.loads(done.read_text())
    lap("distill_s")
    if out["compute"]["distill"]["steps"]:
        out["distill"] = evaluate(d / "distill", held, d / "eval_distill", args)
    lap("eval_distill_s")
    out["cpu_s"] += time.process_time() - cpu
    return out


def train_teacher(held: Path, args) -> tuple[Path, dict]:
    """Step 0, once: trained into `--teacher-dir` unless a teacher of the same recipe is there (then reused)."""
    torch.set_num_threads(1)
    root = Path(args.teacher_dir)
    recipe = {k: getattr(args, k) for k in ("teacher_hidden", "teacher_layers", "teacher_steps", "teacher_lr",
                                            "teacher_problems", "digits", "ops", "vocab", "teacher_extra_steps")}
    t0, cpu = time.perf_counter(), time.process_time()
    done = root / "teacher_time.json"
    before = json.loads(done.read_text()) if done.exists() else {"recipe": {}, "wall_s": 0.0, "cpu_s": 0.0}
    if before["recipe"] != recipe:
        main_phase = {**before["recipe"], "teacher_extra_steps": 0} == {**recipe, "teacher_extra_steps": 0}
        if not main_phase or before["recipe"]["teacher_extra_steps"]:
            before = {"wall_s": 0.0, "cpu_s": 0.0}
            base = make_base(root / "teacher_base", 100, args, args.teacher_hidden, args.teacher_layers)
            sft(root / "teacher", base, 100, args, args.teacher_steps, args.teacher_lr, args.teacher_problems,
                args.teacher_steps // 20, decay=True)
        if args.teacher_extra_steps:   # continued at the schedule's final lr (0.2 x), constant
            sft(root / "teacher", root / "teacher_base", 100, args, args.teacher_steps + args.teacher_extra_steps,
                0.2 * args.teacher_lr, args.teacher_problems, 0, decay=False, resume=True)
        done.write_text(json.dumps({"recipe": recipe, "wall_s": before["wall_s"] + time.perf_counter() - t0,
                                    "cpu_s": before["cpu_s"] + time.process_time() - cpu,
                                    "loadavg_end": os.getloadavg()}))
    cfg = load_model_config(root / "teacher")
    info = {"training": json.loads(done.read_text()), "hidden": cfg.hidden_size, "layers": cfg.num_hidden_layers,
            "params": params(cfg), "dir": str(root / "teacher")}
    info["eval"] = evaluate(root / "teacher", held, root / f"eval_teacher_{held.parent.name}", args)
    info["cpu_s"] = time.process_time() - cpu
    return root / "teacher", info


def chart(results: list[dict], path: Path, k: int) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax, ax3, ax2) = plt.subplots(1, 3, figsize=(16, 4))
    metrics = ["pass@1", f"pass@{k}", "greedy", "format"]
    stages = [s for s in STAGES if all(s in r for r in results)]
    w = 0.8 / len(stages)
    for j, stage in enumerate(stages):
        vals = torch.tensor([[r[stage][m] for m in metrics] for r in results])
        x = torch.arange(len(metrics)) + (j - (len(stages) - 1) / 2) * w
        ax.bar(x, vals.mean(0), w, yerr=vals.std(0) if len(results) > 1 else None, label=stage.upper(), capsize=3)
        for r in vals:
            ax.scatter(x, r, color="k", s=8, zorder=3)
    ax.set_xticks(range(len(metrics)), metrics)
    ax.set_ylim(0, 1)
    ax.set_title(f"held-out arithmetic (dsv3 eval), {len(results)} seeds: mean, std, dots = seeds", fontsize=9)
    ax.legend()
    for r in results:
        c = r["grpo_curve"]
        ax2.plot([p["step"] for p in c], [p["correct"] for p in c], label=f"seed {r['seed']}: rollouts correct")
        ax2.plot([p["step"] for p in c], [p["zero_std_groups"] for p in c], ":", label=f"seed {r['seed']}: "
                 "zero-std groups")
    for r in results:
        ax3.plot([p["step"] for p in r["sft_probe"]], [p["probe"] for p in r["sft_probe"]], "o-", ms=3,
                 label=f"seed {r['seed']}")
    ax3.set_xlabel("SFT step (early stop at the target)")
    ax3.set_title("SFT probe: train-split accuracy, 1 sample at T = 1", fontsize=9)
    ax3.set_ylim(0, 1)
    ax3.legend(fontsize=7)
    ax2.set_xlabel("GRPO step")
    ax2.set_ylim(0, 1)
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def summary_lines(results: list[dict], k: int) -> list[str]:
    lines = []
    for stage in STAGES:
        for m in ("pass@1", f"pass@{k}", f"maj@{k}", "greedy", "format"):
            v = torch.tensor([r[stage][m] for r in results if stage in r])
            if len(v):
                lines.append(f"{stage:7s} {m:7s} mean {v.mean():.3f} std {v.std() if len(v) > 1 else 0:.3f} "
                             f"seeds {[round(x, 3) for x in v.tolist()]}")
    gain = torch.tensor([r["grpo"]["pass@1"] - r["sft"]["pass@1"] for r in results])
    spread = max(torch.tensor([r[s]["pass@1"] for r in results]).std().item() if len(results) > 1 else 0.0
                 for s in ("sft", "grpo"))
    if all("distill" in r["compute"] for r in results):
        ratio = [r["compute"]["distill"].get("sft_flops", 0) + r["compute"]["distill"]["teacher_flops"]
                 for r in results]
        lines.append("distillation FLOPs / GRPO FLOPs per seed " + str([round(f / r["compute"]["grpo_flops"], 3)
                                                                       for f, r in zip(ratio, results)]))
    lines.append(f"GRPO - SFT pass@1 per seed {[round(x, 3) for x in gain.tolist()]}, mean {gain.mean():.3f}; "
                 f"seed spread (the larger std of pass@1 over seeds, SFT or GRPO) {spread:.3f}")
    return lines


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2], help="none: only the teacher")
    p.add_argument("--jobs", type=int, default=2, help="processes at once (one thread each)")
    p.add_argument("--out", default="out/posttrain_demo")
    p.add_argument("--chart", default="docs/posttrain_demo.png")
    p.add_argument("--digits", type=int, default=2)
    p.add_argument("--ops", default="+-")
    p.add_argument("--reuse", action="store_true", help="keep each seed's SFT and GRPO runs from an "
                   "earlier call with the same --out (to add or vary the later stages)")
    p.add_argument("--dr-grpo", action="store_true", help="advantages without the std scaling (Dr. GRPO)")
    p.add_argument("--vocab", type=int, default=400)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--sft-problems", type=int, default=6000)
    p.add_argument("--sft-batch", type=int, default=16)
    p.add_argument("--sft-lr", type=float, default=3e-3, help="constant after the warm-up")
    p.add_argument("--sft-warmup-steps", type=int, default=40)
    p.add_argument("--sft-target", type=float, default=0.35, help="stop SFT once the probe's accuracy reaches it")
    p.add_argument("--sft-min-steps", type=int, default=500)
    p.add_argument("--sft-chunk", type=int, default=50, help="SFT steps between probes")
    p.add_argument("--sft-max-steps", type=int, default=1500)
    p.add_argument("--probe-problems", type=int, default=200, help="train-split problems apart from the SFT data")
    p.add_argument("--grpo-steps", type=int, default=160)
    p.add_argument("--grpo-lr", type=float, default=1e-4)
    p.add_argument("--mu", type=int, default=4, help="policy updates per batch of rollouts (PPO-style, clipped)")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--max-new", type=int, default=48)
    p.add_argument("--eval-problems", type=int, default=200)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--teacher-hidden", type=int, default=256, help="0: no teacher, no distillation arm")
    p.add_argument("--teacher-layers", type=int, default=2)
    p.add_argument("--teacher-steps", type=int, default=1000, help="5%% warm-up, cosine to 0.2 x lr")
    p.add_argument("--teacher-lr", type=float, default=3e-3)
    p.add_argument("--teacher-problems", type=int, default=8000)
    p.add_argument("--teacher-extra-steps", type=int, default=300, help="then this many more at 0.2 x lr, "
                   "constant (continues a cached teacher of the same recipe)")
    p.add_argument("--teacher-dir", default="runs/posttrain_teacher", help="trained once, reused while the "
                   "--teacher-* recipe is the same")
    p.add_argument("--distill-prompts", type=int, default=1500)
    p.add_argument("--distill-samples", type=int, default=2)
    p.add_argument("--distill-lr", type=float, default=5e-4)
    p.add_argument("--distill-flops", type=float, default=0.0, help="the arm's budget; 0: what each seed's GRPO "
                   "run spent (measured)")
    p.add_argument("--distill-only", action="store_true", help="only step 4 (with --distill-flops) on the seeds' "
                   "SFT runs, e.g. while their GRPO runs; a later --reuse call keeps it")
    args = p.parse_args()
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    t0, load0 = time.perf_counter(), os.getloadavg()
    held = root / "heldout.jsonl"           # one held-out set for every model (dsv3 eval's question/answer rows)
    held.write_text("".join(json.dumps({"question": t.prompt, "answer": t.answer}) + "\n"
                            for t in tasks("heldout", args.eval_problems, 7, args)))
    # the seeds' SFT + GRPO and the teacher's training side by side (--jobs processes), then the distillation arms
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        teacher_job = pool.submit(train_teacher, held, args) if args.teacher_hidden else None
        if args.distill_only:     # the arm alone, beside a GRPO call still running (--distill-flops)
            results = [{"seed": s, "times": {}, "cpu_s": 0.0, "compute": {"grpo_flops": 0.0}} for s in args.seeds]
        else:
            results = [j.result() for j in [pool.submit(run_seed, s, root, held, args) for s in args.seeds]]
        teacher, teacher_info = teacher_job.result() if teacher_job else (None, {})
        if teacher is not None:
            results = [j.result() for j in [pool.submit(run_distill, r, root, teacher, held, args) for r in results]]
    if not results or args.distill_only:
        print(f"teacher {teacher_info}\n" + "\n".join(f"seed {r['seed']}: {r.get('distill')} {r['compute']}"
                                                       for r in results))
        return
    for r in results:
        for stage in STAGES:
            if stage in r:
                print(f"seed {r['seed']} {stage}: {r[stage]}", file=sys.stderr)
    summary = {"args": vars(args), "teacher": teacher_info, "results": results, "wall_s": time.perf_counter() - t0,
               "cpu_s": sum(r["cpu_s"] for r in results) + teacher_info.get("cpu_s", 0.0),
               "loadavg_start": load0, "loadavg_end": os.getloadavg(), "cpus": os.cpu_count(),
               "machine": platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads()}
    lines = summary_lines(results, args.k)
    summary["summary"] = lines
    (root / "results.json").write_text(json.dumps(summary, indent=1))
    chart(results, Path(args.chart), args.k)
    print("\n".join(lines))
    print(f"teacher {teacher_info.get('eval')}")
    print(f"wall {summary['wall_s']:.0f} s, CPU {summary['cpu_s']:.0f} s (the processes' own), load average "
          f"{load0} -> {summary['loadavg_end']}")


if __name__ == "__main__":
    main()
