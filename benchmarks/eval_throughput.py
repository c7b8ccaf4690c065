"""Throughput of `dsv3 eval` with a local model (issue 19's GPU point): questions/s and tokens/s of log-likelihood
multiple choice (mc) and generate-extract-match (gen) on random weights, through the code `dsv3 eval` runs:
dsv3.eval.run.evaluate_mc / evaluate_generation over an EngineBackend on an Engine built as
dsv3.launch.evaluate.run_eval builds it (EngineConfig(cache_memory_gib=--cache-gib), the tokenizer's BOS convention);
only the model's loading is replaced by `dsv3 bench`'s random model (dsv3.infer.bench.random_model, bf16 on CUDA,
MTP dropped as `bench` does).

Throughput, not accuracy: the weights are random. The tokenizer is a real byte-level BPE trained here, offline, by
dsv3.data.train_tokenizer on the standard library (as `dsv3 bench` trains its own; 512 ids, so every id is below
any preset's vocabulary); a small vocabulary makes prompts ~2x longer in tokens than a 100k one, so tokens/s is
reported beside questions/s. A random model rarely stops early: gen samples run to --max-tokens (the worst case).

Tasks are generated (never written into the repository): mc, MMLU-style word problems with four numeric choices,
0-shot on all 240 and 5-shot on the first 120 (--mc-fewshot, --mc-fewshot-questions; the shots come from a
generated dev split, the same for every question, as `dsv3 eval` draws them; the engine computes every prompt
position of a log-likelihood request, shared prefix or not: dsv3.infer.scheduler); gen, the held-out split of
dsv3.posttrain.tasks' arithmetic, greedy, k=1. Each mode runs once untimed (CUDA graph capture, kernel autotuning:
mc on 8 questions, gen on all), then timed.

GPU:  PYTHONPATH=src python benchmarks/eval_throughput.py --config lite --json $OUT/eval_throughput.json
CPU:  PYTHONPATH=src python benchmarks/eval_throughput.py --config tiny --device cpu --mc 12 --mc-fewshot 0,1 --gen 4 \
      --max-tokens 8
"""

from __future__ import annotations

import argparse
import functools
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

from dsv3 import load_model_config
from dsv3.eval import EngineBackend, run
from dsv3.infer import Engine, EngineConfig
from dsv3.infer.bench import random_model
from dsv3.posttrain.tasks import generate_tasks

TOKENIZER_VOCAB = 512

MC_TEMPLATES = [
    "A warehouse holds {a} crates. A truck delivers {b} more crates in the morning, and in the afternoon {c} crates "
    "are shipped to customers. How many crates are in the warehouse at the end of the day?",
    "A library owned {a} books at the start of the year. It bought {b} new books and gave {c} old books to a school. "
    "How many books does the library own now?",
    "A farmer harvested {a} kilograms of apples, then picked {b} kilograms more the next week, and sold {c} "
    "kilograms at the market. How many kilograms of apples does the farmer have left?",
]


@functools.cache
def bench_tokenizer(out_dir: str):
    """A real byte-level BPE (tokenizers) trained on the standard library, saved with its tokenizer_config.json
    (add_bos_token, chat template): the directory a user's `--tokenizer` would name."""
    from dsv3.data import Tokenizer, stdlib_files, train_tokenizer
    path = Path(out_dir)
    if not (path / "tokenizer.json").exists():
        texts = [f.read_text(errors="ignore") for f in stdlib_files()[:50]]
        train_tokenizer(texts, vocab_size=TOKENIZER_VOCAB, out_dir=path)
    return Tokenizer.load(path)


def mc_rows(n: int, seed: int) -> list[dict]:
    rng, rows = random.Random(f"mc:{seed}"), []
    for i in range(n):
        a, b, c = rng.randint(100, 999), rng.randint(10, 99), rng.randint(10, 99)
        right = a + b - c
        wrong = rng.sample([right + d for d in (-20, -11, -10, -2, -1, 1, 2, 9, 10, 11, 20)], 3)
        choices = [str(x) for x in [right, *wrong]]
        order = rng.sample(range(4), 4)
        rows.append(dict(question=MC_TEMPLATES[i % len(MC_TEMPLATES)].format(a=a, b=b, c=c),
                         choices=[choices[j] for j in order], answer=order.index(0)))
    return rows


def gen_rows(n: int, seed: int) -> list[dict]:
    return [dict(question=t.prompt, answer=t.answer)
            for t in generate_tasks("arithmetic", "heldout", n, seed, digits=3, ops="+-*")]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


class CountingEngine:
    """The engine, counting what EngineBackend submits and what it generates (for tokens/s); all else delegated."""

    def __init__(self, engine: Engine):
        self._engine = engine
        self.requests = self.prompt_tokens = self.new_tokens = 0

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def generate(self, prompts, params):
        outs = self._engine.generate(prompts, params)
        self.requests += len(prompts)
        self.prompt_tokens += sum(map(len, prompts))
        self.new_tokens += sum(len(o.token_ids) for o in outs)
        return outs

    def reset(self) -> None:
        self.requests = self.prompt_tokens = self.new_tokens = 0


def timed(fn, device: str) -> tuple[dict, float]:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def measure(name: str, fn, counter: CountingEngine, n_questions: int, device: str, warm: int) -> dict:
    """1. an untimed round on the first `warm` questions (fn(limit); 0: all); 2. the timed round on all of them."""
    counter.reset()
    _, warm_s = timed(lambda: fn(warm), device)
    counter.reset()
    metrics, wall = timed(lambda: fn(0), device)
    row = dict(mode=name, questions=n_questions, wall_s=wall, warmup_s=warm_s, questions_per_s=n_questions / wall,
               requests=counter.requests, prompt_tokens=counter.prompt_tokens, new_tokens=counter.new_tokens,
               prompt_tok_per_s=counter.prompt_tokens / wall, new_tok_per_s=counter.new_tokens / wall,
               errors=metrics.get("errors", 0))
    print(f"[eval_throughput] {name}: {n_questions} questions in {wall:.2f} s = {row['questions_per_s']:.2f} q/s; "
          f"{counter.requests} requests, {counter.prompt_tokens} prompt tokens ({row['prompt_tok_per_s']:.0f}/s), "
          f"{counter.new_tokens} new tokens ({row['new_tok_per_s']:.0f}/s); warm-up {warm_s:.1f} s", flush=True)
    return row


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="lite", help="preset or config.json")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="default: bf16 on CUDA, fp32 on the CPU")
    p.add_argument("--mc", type=int, default=240, help="multiple-choice questions")
    p.add_argument("--mc-fewshot", default="0,5", help="comma-separated: one timed mc run per shot count")
    p.add_argument("--mc-fewshot-questions", type=int, default=120,
                   help="the first N questions for the few-shot runs (their prompts are ~6x longer)")
    p.add_argument("--gen", type=int, default=64, help="generation questions")
    p.add_argument("--gen-fewshot", type=int, default=0)
    p.add_argument("--max-tokens", type=int, default=64, help="gen: new tokens per sample")
    p.add_argument("--cache-gib", type=float, default=1.0, help="as `dsv3 eval --cache-gib` (default the same)")
    p.add_argument("--max-num-seqs", type=int, default=EngineConfig.max_num_seqs)
    p.add_argument("--max-num-batched-tokens", type=int, default=EngineConfig.max_num_batched_tokens)
    p.add_argument("--modes", default="mc,gen")
    p.add_argument("--tokenizer-dir", default=None, help="where the tokenizer is trained / read (default: a temp dir)")
    p.add_argument("--json", default=None, help="write the results here (rewritten after every mode)")
    p.add_argument("--deadline-s", type=float, default=0, help="> 0: a mode that would start later is skipped")
    return p.parse_args()


def build(args, tok_dir: str) -> tuple[EngineBackend, CountingEngine, object, dict]:
    """The backend run_eval builds for a local model, on `dsv3 bench`'s random model; what was built."""
    tokenizer = bench_tokenizer(tok_dir)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or ("bf16" if args.device.startswith("cuda")
                                                                           else "fp32")]
    cfg = load_model_config(args.config).replace(num_nextn_predict_layers=0)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise SystemExit(f"the tokenizer's {tokenizer.vocab_size} ids exceed {args.config}'s vocab {cfg.vocab_size}")
    t0 = time.perf_counter()
    model = random_model(cfg, args.device, dtype)
    build_s = time.perf_counter() - t0
    econf = EngineConfig(cache_memory_gib=args.cache_gib, max_num_seqs=args.max_num_seqs,
                         max_num_batched_tokens=args.max_num_batched_tokens)
    counter = CountingEngine(Engine(model, tokenizer, econf))
    add_bos = run.tokenizer_adds_bos(tok_dir)         # `dsv3 eval --add-bos auto`
    info = dict(config=args.config, device=args.device, dtype=str(dtype).removeprefix("torch."),
                params_b=model.num_params()["total"] / 1e9, build_s=build_s, tokenizer_vocab=tokenizer.vocab_size,
                add_bos=add_bos, engine=dict(max_num_seqs=econf.max_num_seqs, cache_memory_gib=args.cache_gib,
                                             max_num_batched_tokens=econf.max_num_batched_tokens,
                                             block_size=econf.block_size, cuda_graphs=econf.cuda_graphs),
                gpu=torch.cuda.get_device_name() if args.device.startswith("cuda") else None)
    print(f"[eval_throughput] {args.config}: {info['params_b']:.2f} B params, {dtype}, {args.device}, built in "
          f"{build_s:.1f} s; tokenizer {tokenizer.vocab_size} ids, add_bos={add_bos}; engine {info['engine']}",
          flush=True)
    return EngineBackend(counter), counter, tokenizer, info


def jobs_of(args, backend, tokenizer, add_bos: bool, work: Path) -> list[tuple]:
    """(name, fn(limit), questions, warm-up limit) in the order they run: mc by shots, gen after mc 0-shot."""
    mc_task = write_jsonl(work / "mc_test.jsonl", mc_rows(args.mc, seed=0))
    mc_dev = write_jsonl(work / "mc_dev.jsonl", mc_rows(20, seed=1))
    gen_task = write_jsonl(work / "gen_test.jsonl", gen_rows(args.gen, seed=0))
    gen_dev = write_jsonl(work / "gen_dev.jsonl", gen_rows(max(args.gen_fewshot, 1) * 4, seed=1))
    modes, jobs = args.modes.split(","), []

    def mc(limit: int, shots: int) -> dict:
        if not limit and shots:
            limit = min(args.mc, args.mc_fewshot_questions)
        return run.evaluate_mc(backend, tokenizer, mc_task, work / "out", mc_dev if shots else None, shots, add_bos,
                               "letter", limit, overwrite=True)      # each job re-measures into one directory

    def gen(limit: int) -> dict:
        return run.evaluate_generation(backend, tokenizer, gen_task, work / "out", gen_dev if args.gen_fewshot
                                       else None, args.gen_fewshot, add_bos, k=1, temperature=0.0,
                                       max_tokens=args.max_tokens, limit=limit, overwrite=True)

    for shots in map(int, args.mc_fewshot.split(",") if "mc" in modes else []):
        n = min(args.mc, args.mc_fewshot_questions) if shots else args.mc
        jobs.append((shots, f"mc {shots}-shot", functools.partial(mc, shots=shots), n, min(8, n)))
    if "gen" in modes:   # warm-up on the whole set: every decode batch size it meets gets its CUDA graph captured
        jobs.append((0.5, f"gen {args.gen_fewshot}-shot k=1 greedy {args.max_tokens} tok", gen, args.gen, 0))
    return [j[1:] for j in sorted(jobs, key=lambda j: j[0])]


def main() -> int:
    start = time.perf_counter()
    args = parse_args()
    with tempfile.TemporaryDirectory(prefix="dsv3-eval-throughput-") as tmp:     # task files, results, samples
        return bench(args, start, Path(tmp))


def bench(args, start: float, work: Path) -> int:
    tok_dir = args.tokenizer_dir or str(work / "tokenizer")
    backend, counter, tokenizer, result = build(args, tok_dir)
    result.update(rows=[], skipped=[])
    for name, fn, n, warm in jobs_of(args, backend, tokenizer, result["add_bos"], work):
        if args.deadline_s and time.perf_counter() - start > args.deadline_s:
            print(f"[eval_throughput] {name}: skipped (past --deadline-s {args.deadline_s:.0f})", flush=True)
            result["skipped"].append(name)
        else:
            result["rows"].append(measure(name, fn, counter, n, args.device, warm))
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1))
    print(f"{'mode':<34} {'questions':>9} {'wall s':>8} {'q/s':>8} {'prompt tok/s':>13} {'new tok/s':>10} "
          f"{'errors':>6}")
    for r in result["rows"]:
        print(f"{r['mode']:<34} {r['questions']:>9} {r['wall_s']:>8.2f} {r['questions_per_s']:>8.2f} "
              f"{r['prompt_tok_per_s']:>13.0f} {r['new_tok_per_s']:>10.0f} {r['errors']:>6}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
