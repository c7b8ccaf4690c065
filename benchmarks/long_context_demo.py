"""Long-context extension (issue 21, TR 4.3 in miniature): pre-train a tiny DeepSeek-V3-architecture model at 256
tokens, check that it copies in context (an induction probe) and retrieves a needle there (the gate: nothing
downstream means anything otherwise), extend it in two phases (1K, then 4K) with YaRN (`train.init_from`), and the
same two phases with plain RoPE as the control; needle-in-a-haystack accuracy (dsv3.eval.needle) over lengths x
depths and loss by position, before and after.

    PYTHONPATH=src python benchmarks/long_context_demo.py --out /tmp/long-context [--device cuda --steps 20000,300,150
        --pre-batch 32 --gate 0.5 --workers 14]

Data (long_context_data.py): half needle documents (filler, 1-4 facts "The secret number of <city> is
<7 digits>." placed as `needle_prompt` places its needle, a question about each), a quarter copy documents (random
words and numbers whose spans recur at any distance up to the window: the needle's question is up to a window after
its fact, and round 3's repeat units, at most a quarter window, taught copying over 64 tokens and not over 100), a
quarter repeat documents (a unit repeated: induction heads form fastest on these). Every document fills exactly one
training window. A needle cell of length L asks with L - ANSWER_TOKENS prompt tokens (dsv3.eval.needle), so the
answer fits in the model's L positions. The gate prints a few needles' prompt tails, greedy answers and loss on
the digits, and the induction probe at copy distances 30 / 64 / 100 / 200 (gate.json).

The phases keep the tokens per step constant (V3: 32K x 1920 = 128K x 480) and a constant LR, as the report's
extension phases do. YaRN: factor 16 over the 256-token pre-training length (`original_max_position_embeddings`,
spec 1.5) from phase 1 on, as V3 sets s=40 over 4K in both of its phases. A stage whose run finished is kept on a
rerun. Writes results.json under --out and the charts long-context-needle.png and long-context-loss-by-position.png
under --docs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import time
from pathlib import Path

import torch

from dsv3.data import Tokenizer
from dsv3.eval.backends import EngineBackend
from dsv3.eval.needle import ANSWER_TOKENS, needle_grid, needle_prompt
from dsv3.infer import Engine, EngineConfig
from dsv3.train import Trainer
from dsv3.train.config import RunConfig
from dsv3.train.export import load_run_model
import long_context_data
from long_context_data import VOCAB, corpus, document, filler, induction_batch, make_tokenizer, word_ids

PRE_LEN, PHASES = 256, (1024, 4096)          # pre-training length, then the two extension phases' lengths
LENGTHS = (256, 512, 1024, 2048, 4096)         # needle / evaluation lengths
DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)
PRE_BATCH = 16                                 # pre-training: 16 x 256 tokens per step (--pre-batch)
PHASE_TOKENS = 4096                            # per step, constant over the two phases (4 x 1K, 1 x 4K), as V3's
YARN = dict(type="yarn", factor=PHASES[-1] / PRE_LEN, original_max_position_embeddings=PRE_LEN, beta_fast=32,
            beta_slow=1, mscale=1.0, mscale_all_dim=1.0)
# A shape that learns induction in ~450 steps of 4K tokens (the probe in RESULTS.md): 2 dense layers, 4 heads of
# 32 + 32 query/key dims (nope + rope) and 32 value dims, no query compression, a 128-wide kv latent. 8 heads of
# 16 + 16 with a 96-wide query latent stayed at the in-context-unigram plateau in the same budget.
MODEL = dict(preset="tiny", vocab_size=VOCAB, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
             first_k_dense_replace=2, n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1,
             num_attention_heads=4, kv_lora_rank=128, q_lora_rank=0, qk_nope_head_dim=32, qk_rope_head_dim=32,
             v_head_dim=32, num_nextn_predict_layers=0, init_std=0.02)
COMMON = dict(log={"interval": 25, "val_interval": 0, "tensorboard": False, "progress": False},
              checkpoint={"interval": 0, "keep": 1}, balance={"bias_update_speed": 0.0})


def run_config(out: Path, name: str, seq_len: int, steps: int, docs: Path, model: dict, optim: dict,
               batch: int = 0, **train_extra) -> RunConfig:
    batch = batch or PHASE_TOKENS // seq_len          # the phases: PHASE_TOKENS per step
    d = {"run_dir": str(out / name), "model": model,
         "data": {"sources": [str(docs)], "cache_dir": str(out / "data-cache"), "seq_len": seq_len,
                  "val_fraction": 0.002, "fim_rate": 0.0, "tokenizer": str(out / "tokenizer")},
         "train": {"steps": steps, "batch_size": batch, "micro_batch_size": batch, "device": "cpu",
                   "dtype": "fp32", **train_extra},
         "optim": optim, **COMMON}
    return RunConfig.from_dict(d)


def train(cfg: RunConfig, times: dict, name: str) -> Path:
    """Train a stage, or keep it if a run of this very config already finished (a rerun of the demo resumes after
    the last stage; a run left by another version of the script is trained again)."""
    from dsv3.train.checkpoint import newest_valid_checkpoint
    done, _ = newest_valid_checkpoint(cfg.run_dir) if Path(cfg.run_dir, "checkpoints").is_dir() else (None, [])
    same = done is not None and json.loads((done / "config.json").read_text()) == json.loads(json.dumps(cfg.to_dict()))
    if same and done.name == f"step_{cfg.train.steps:08d}":
        print(f"{name}: kept the finished run {cfg.run_dir}", flush=True)
        return Path(cfg.run_dir)
    t0 = time.perf_counter()
    result = Trainer(cfg, overwrite=True).run()
    times[name] = time.perf_counter() - t0
    print(f"{name}: {result['step']} steps in {times[name]:.0f} s", flush=True)
    return Path(cfg.run_dir)


def at_length(run_dir: Path, max_pos: int, rope: dict | None, device: str = "cpu") -> torch.nn.Module:
    """A run's model with its positions set for evaluation at `max_pos` tokens (the pre-trained one: plain RoPE
    extrapolated past its training length, i.e. "before")."""
    model, _ = load_run_model(run_dir)
    from dsv3 import Transformer
    ext = Transformer(model.config.replace(max_position_embeddings=max_pos, rope_scaling=rope)).eval()
    ext.load_state_dict(model.state_dict())
    return ext.to(device)


def haystack(seed: int, lengths: tuple) -> str:
    return filler(random.Random(1000 + seed), max(lengths) // 6)


def needle(model, tok: Tokenizer, lengths: tuple, seeds: int) -> tuple[list[list[float]], list[dict]]:
    """Accuracy per length x depth over `seeds` needles per cell (each its own city, number and haystack), and the
    cells' records (what the model answered; `seed` names the haystack). A cell of length L has a prompt of
    L - ANSWER_TOKENS tokens (the harness reserves them), so prompt and answer fit in L positions: rounds 1-3 asked
    at the full L, and the engine stops at the model's max_position_embeddings, so at the pre-training length the
    answer was cut after 1-3 tokens and the gate could not pass whatever the model knew."""
    engine = Engine(model, tok, EngineConfig(block_size=64, max_num_batched_tokens=max(lengths), cuda_graphs=False))
    total, records = [[0.0] * len(DEPTHS) for _ in lengths], []
    for seed in range(seeds):
        scores, recs = needle_grid(EngineBackend(engine), tok, haystack(seed, lengths), list(lengths),
                                   list(DEPTHS), seed=seed, add_bos=False)
        total = [[t + s / seeds for t, s in zip(tr, sr)] for tr, sr in zip(total, scores)]
        records += [{**r, "seed": seed} for r in recs]
    return total, records


@torch.no_grad()
def answer_loss(model, tok: Tokenizer, record: dict, lengths: tuple) -> dict:
    """One needle cell looked at: the prompt's tail, how far back the fact sits (tokens from the fact's first token
    to the end of the prompt), the greedy answer, and the mean loss (nats per token) on the answer " <7 digits>"
    given the prompt: ~ln(10) per digit for a model that guesses, ~0 for one that copies the fact."""
    city, num = record["city"], record["needle"]
    prompt = needle_prompt(tok, haystack(record["seed"], lengths), record["length"] - ANSWER_TOKENS, record["depth"],
                           city, num)                        # the prompt needle_grid asked (no BOS in the demo)
    ids, full = tok.encode(prompt), tok.encode(prompt + f" {num}")
    fact = len(tok.encode(prompt[:prompt.index(f" The secret number of {city} is")]))
    x = torch.tensor(full, device=next(model.parameters()).device)
    loss = torch.nn.functional.cross_entropy(model(x[None, :-1])[0, len(ids) - 1:], x[len(ids):])
    return {"depth": record["depth"], "distance": len(ids) - fact, "tail": prompt[-110:], "needle": num,
            "answer": record["output"], "answer_loss": round(loss.item(), 3), "answer_tokens": len(full) - len(ids)}


@torch.no_grad()
def loss_by_position(model, tok: Tokenizer, n_docs: int = 4, bucket: int = 256) -> list[float]:
    """Mean token loss per `bucket` positions over held-out documents of the longest length (phase 2's kind)."""
    rng, n = random.Random(12345), LENGTHS[-1]
    total = torch.zeros(n - 1, device=next(model.parameters()).device)
    for _ in range(n_docs):
        ids = torch.tensor(tok.encode(document(tok, rng, n - 1)) + [tok.eos_id], device=total.device)
        logits = model(ids[None, :-1])[0]
        total += torch.nn.functional.cross_entropy(logits, ids[1:], reduction="none")
    total = torch.cat([total, total[-1:]]) / n_docs           # n - 1 targets: repeat the last to fill the buckets
    return total.view(-1, bucket).mean(-1).cpu().tolist()


@torch.no_grad()
def induction(model, tok: Tokenizer, period: int = 100) -> dict:
    """The induction probe: mean loss on the first occurrence and on the repeat of random word sequences (64 of
    `period` tokens, repeated up to PRE_LEN tokens). Without in-context copying over `period` tokens both are
    ~ln(#words); with it the repeat is near 0."""
    x = induction_batch(tok, 64, period, seed=7, length=min(2 * period, PRE_LEN)).to(next(model.parameters()).device)
    loss = torch.nn.functional.cross_entropy(model(x[:, :-1]).transpose(1, 2), x[:, 1:], reduction="none")
    return {"first": round(loss[:, :period - 1].mean().item(), 3), "repeat": round(loss[:, period:].mean().item(), 3),
            "chance": round(math.log(len(word_ids(tok))), 3)}


def check_gate(model, tok: Tokenizer, seeds: int = 4) -> dict:
    """The gate: needle accuracy at PRE_LEN (the model must retrieve where it was trained before an extension can
    mean anything), with diagnostics: a few needles looked at (`answer_loss`: fact distance, greedy answer, loss on
    the digits) and the induction probe by copy distance (periods 30 / 64 / 100 / 200)."""
    grid, records = needle(model, tok, (PRE_LEN,), seeds)
    looked = [answer_loss(model, tok, r, (PRE_LEN,)) for r in records[:len(DEPTHS)]]   # seed 0: every depth
    gate = {"needle": sum(grid[0]) / len(grid[0]), "by_depth": dict(zip(map(str, DEPTHS), grid[0])),
            "needles": looked, "induction": {p: induction(model, tok, p) for p in (30, 64, 100, 200)}}
    for r in looked:
        print(f"gate needle at depth {r['depth']} ({r['distance']} tokens back): ...{r['tail'][-60:]!r} -> "
              f"{r['answer']!r} (needle {r['needle']}, loss {r['answer_loss']:.2f} nats/token on the answer)",
              flush=True)
    return gate


def phases(out: Path, steps: tuple[int, int, int], times: dict, args) -> tuple[dict[str, Path], dict]:
    """Pre-training at PRE_LEN; the gate (needle accuracy at PRE_LEN, the model must retrieve where it was trained
    before an extension can mean anything; the induction probe beside it); then the two PHASES with YaRN (factor
    PHASES[-1] / PRE_LEN over PRE_LEN) and, as the control, with plain RoPE. Returns the runs and the gate."""
    tok = make_tokenizer(out)
    t0 = time.perf_counter()
    version = hashlib.sha256(Path(long_context_data.__file__).read_bytes()).hexdigest()[:8]   # no stale corpus
    data = {n: corpus(out / "tokenizer", out / f"docs-{n}x{k}-{version}.jsonl", k, n, args.workers)
            for n, k in ((PRE_LEN, args.pre_batch * steps[0]), (PHASES[0], PHASE_TOKENS // PHASES[0] * steps[1]),
                         (PHASES[1], PHASE_TOKENS // PHASES[1] * steps[2]))}
    times["data"] = time.perf_counter() - t0
    dev = {"device": args.device}
    pre = train(run_config(out, "pre", PRE_LEN, steps[0], data[PRE_LEN], {**MODEL, "max_position_embeddings": PRE_LEN,
                                                                           "rope_scaling": None},
                           {"lr": args.lr, "warmup": 0.05}, args.pre_batch, **dev), times, "pre")
    runs = {"pre": pre}
    t_gate = time.perf_counter()
    gate = check_gate(at_length(pre, PRE_LEN, None, args.device), tok)
    times["gate"] = time.perf_counter() - t_gate
    print(f"gate: needle accuracy {gate['needle']:.2f} at the pre-training length {PRE_LEN}; induction probe "
          f"{gate['induction']}", flush=True)
    (out / "gate.json").write_text(json.dumps({**gate, "seconds": times}))   # kept if a later stage is cut short
    if gate["needle"] < args.gate:
        return runs, gate
    flat = {"lr": args.phase_lr, "warmup": 0.0, "constant_until": 1.0, "decay_until": 1.0, "final_at": 1.0}
    for tag, rope in (("yarn", YARN), ("plain", None)):
        src = pre
        for i, (seq, n) in enumerate(((PHASES[0], steps[1]), (PHASES[1], steps[2])), start=1):
            model = {"preset": str(src), "max_position_embeddings": LENGTHS[-1], "rope_scaling": rope}
            cfg = run_config(out, f"{tag}{i}", seq, n, data[seq], model, flat, init_from=str(src), **dev)
            src = runs[f"{tag}{i}"] = train(cfg, times, f"{tag}{i}")
    return runs, gate


def charts(results: dict, docs: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 4.2))
    for name, grid in results["needle"].items():
        ax.plot(range(len(LENGTHS)), [sum(row) / len(row) for row in grid], marker="o", label=name,
                ls="--" if "plain" in name else "-")
    ax.set_xticks(range(len(LENGTHS)), [str(n) for n in LENGTHS])
    ax.axvline(LENGTHS.index(PRE_LEN) + 0.5, color="gray", lw=0.8, ls=":")
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel(f"needle accuracy ({len(DEPTHS)} depths x {results['seeds']} needles)")
    ax.legend(fontsize=7)
    ax.set_title(f"needle in a haystack: pre-trained at {PRE_LEN}, extended to {PHASES[0]} then {PHASES[1]}")
    fig.tight_layout()
    fig.savefig(docs / "long-context-needle.png", dpi=100)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(8, 4.2))
    for name, losses in results["loss_by_position"].items():
        b = LENGTHS[-1] // len(losses)
        ax.plot([b * (i + 0.5) for i in range(len(losses))], losses, marker=".", label=name,
                ls="--" if "plain" in name else "-")
    ax.axvline(PRE_LEN, color="gray", ls=":", lw=0.8)
    ax.set_yscale("log")
    ax.set_xlabel("position (tokens)")
    ax.set_ylabel("mean token loss (nats, log scale)")
    ax.set_title(f"loss by position on held-out {LENGTHS[-1]}-token documents")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(docs / "long-context-loss-by-position.png", dpi=100)
    plt.close(fig)


def evaluate(runs: dict[str, Path], tok: Tokenizer, seeds: int, device: str, save=lambda results: None) -> dict:
    """Needle grid and loss by position of each model at the longest length: "before" = the pre-trained weights
    (plain RoPE extrapolated, or YaRN switched on without training), "after" = each phase."""
    models = {f"pre-trained at {PRE_LEN} (plain RoPE past it)": (runs["pre"], None),
              "pre-trained + YaRN, no training": (runs["pre"], YARN),
              f"YaRN phase 1 ({PHASES[0]})": (runs["yarn1"], YARN),
              f"YaRN phase 2 ({PHASES[1]})": (runs["yarn2"], YARN),
              f"control: plain RoPE phase 1 ({PHASES[0]})": (runs["plain1"], None),
              f"control: plain RoPE phase 2 ({PHASES[1]})": (runs["plain2"], None)}
    results: dict = {"needle": {}, "loss_by_position": {}}
    for name, (run, rope) in models.items():
        model = at_length(run, LENGTHS[-1], rope, device)
        results["needle"][name] = needle(model, tok, LENGTHS, seeds)[0]
        results["loss_by_position"][name] = loss_by_position(model, tok)
        print(f"{name:45s} needle " + " ".join(f"{sum(r) / len(r):.2f}" for r in results["needle"][name])
              + "  loss " + " ".join(f"{x:.3f}" for x in results["loss_by_position"][name]), flush=True)
        save(results)                                  # a call cut short keeps the models evaluated so far
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="/tmp/long-context")
    ap.add_argument("--steps", default="1200,60,30", help="pre-training, phase 1, phase 2 steps")
    ap.add_argument("--lr", type=float, default=1e-3, help="pre-training peak LR")
    ap.add_argument("--pre-batch", type=int, default=PRE_BATCH, help="pre-training sequences of 256 per step")
    ap.add_argument("--phase-lr", type=float, default=3e-4, help="the extension phases' constant LR")
    ap.add_argument("--gate", type=float, default=0.9, help="needle accuracy the pre-trained model needs at its "
                                                            "length before the phases run")
    ap.add_argument("--seeds", type=int, default=2, help="needles per length x depth cell")
    ap.add_argument("--device", default="cpu", help="cpu, or cuda (fp32 either way)")
    ap.add_argument("--docs", default=str(Path(__file__).resolve().parents[1] / "docs"))
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 on a shared, loaded machine)")
    ap.add_argument("--workers", type=int, default=0, help="processes making the documents (0: one per core)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0, times = time.perf_counter(), {}
    runs, gate = phases(out, tuple(int(s) for s in a.steps.split(",")), times, a)
    results = {"steps": a.steps, "lr": a.lr, "pre_batch": a.pre_batch, "phase_lr": a.phase_lr, "lengths": LENGTHS,
               "depths": DEPTHS, "seeds": a.seeds, "device": a.device, "gate": gate}
    if gate["needle"] >= a.gate:
        t_eval = time.perf_counter()

        def save(partial: dict) -> None:
            (out / "results.json").write_text(json.dumps({**results, **partial, "seconds": times}, indent=1))
            charts({**results, **partial}, Path(a.docs))
        results.update(evaluate(runs, make_tokenizer(out), a.seeds, a.device, save))
        times["evaluation"] = time.perf_counter() - t_eval
        charts(results, Path(a.docs))
    else:
        print(f"the pre-trained model does not retrieve at {PRE_LEN} (accuracy {gate['needle']:.2f} < --gate "
              f"{a.gate}): no extension phase can show anything; train it longer (--steps) or on a faster machine",
              flush=True)
    times["total"] = time.perf_counter() - t0
    results["seconds"] = times
    results["load_average"] = list(os.getloadavg())
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(json.dumps(times))


if __name__ == "__main__":
    main()
