"""Long-context extension on the CPU (issue 21, TR 4.3 in miniature): pre-train a tiny DeepSeek-V3-architecture model
at 512 tokens, extend it in two phases (1K, then 2K) with YaRN (`train.init_from`), and the same two phases with
plain RoPE as the control; needle-in-a-haystack accuracy (dsv3.eval.needle) and loss by position before and after.

    PYTHONPATH=src python benchmarks/long_context_demo.py --out /tmp/long-context [--scale 1.0]

Data: synthetic documents in needle.py's own format: filler sentences with "The secret number of <city> is
<7 digits>." facts inside and questions about them at the end ("Question: What is the secret number of <city>?
Answer: The secret number of <city> is <digits>."), so retrieval is what the model must learn; documents about as
long as each phase's context. The phases keep the tokens per step constant (V3: 32K x 1920 = 128K x 480) and use
a constant LR, as the report's extension phases do (7.3e-6 there; a tiny model here). Writes results.json and the
charts docs/long-context-needle.png and docs/long-context-loss-by-position.png.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

from dsv3.data import Tokenizer
from dsv3.eval.backends import EngineBackend
from dsv3.eval.needle import CITIES, needle_grid
from dsv3.infer import Engine, EngineConfig
from dsv3.train import Trainer
from dsv3.train.config import RunConfig
from dsv3.train.export import load_run_model

ADJ = "old quiet green small bright cold dark warm long narrow".split()
NOUN = "river mill road garden bridge market tower field harbor village".split()
VERB = "passes faces crosses follows borders watches".split()
PRE_LEN, PHASES = 512, (1024, 2048)          # pre-training length, then the two extension phases' lengths
LENGTHS = (PRE_LEN, *PHASES)
DEPTHS = (0.5,)
TOKENS_PER_STEP = 4 * PRE_LEN                  # constant over the phases, as V3's
YARN = dict(type="yarn", factor=PHASES[-1] / PRE_LEN, original_max_position_embeddings=PRE_LEN, beta_fast=32,
            beta_slow=1, mscale=1.0, mscale_all_dim=1.0)


def filler(rng: random.Random, n_sentences: int) -> str:
    return " ".join(f"The {rng.choice(ADJ)} {rng.choice(NOUN)} {rng.choice(VERB)} the {rng.choice(NOUN)}."
                    for _ in range(n_sentences))


def document(rng: random.Random, n_sentences: int, n_facts: int) -> str:
    """Filler with facts at random sentence boundaries, then a question about each fact (shuffled)."""
    parts = filler(rng, n_sentences).split(". ")
    facts = [(c, f"{rng.randrange(10**6, 10**7)}") for c in rng.sample(CITIES, n_facts)]
    for city, num in facts:
        parts.insert(rng.randrange(len(parts) + 1), f"The secret number of {city} is {num}")
    rng.shuffle(facts)
    qa = "".join(f"\nQuestion: What is the secret number of {c}?\nAnswer: The secret number of {c} is {n}."
                 for c, n in facts)
    return ". ".join(parts) + "." + qa + "\n"


def corpus(path: Path, n_docs: int, tokens: int, seed: int) -> Path:
    """~`tokens`-token documents (a sentence is ~8 tokens of this tokenizer) as JSONL."""
    if path.exists():      # the same seed writes the same file: keep it (and the token cache keyed by its mtime)
        return path
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(n_docs):
            f.write(json.dumps({"text": document(rng, max(4, tokens // 9), rng.randint(1, 4))}) + "\n")
    return path


MODEL = dict(preset="tiny", vocab_size=512, hidden_size=128, intermediate_size=256, moe_intermediate_size=64,
             num_hidden_layers=3, num_attention_heads=4, kv_lora_rank=64, q_lora_rank=96, qk_nope_head_dim=32,
             qk_rope_head_dim=16, v_head_dim=32, num_nextn_predict_layers=0)
COMMON = dict(log={"interval": 25, "val_interval": 0, "tensorboard": False, "progress": False},
              checkpoint={"interval": 0, "keep": 1})


def run_config(out: Path, name: str, seq_len: int, steps: int, docs: Path, model: dict, **extra) -> RunConfig:
    batch = TOKENS_PER_STEP // seq_len
    d = {"run_dir": str(out / name), "model": model,
         "data": {"sources": [str(docs)], "cache_dir": str(out / "data-cache"), "seq_len": seq_len,
                  "val_fraction": 0.01, "fim_rate": 0.0, **extra.pop("data", {})},
         "train": {"steps": steps, "batch_size": batch, "micro_batch_size": min(batch, 8), "device": "cpu",
                   "dtype": "fp32", **extra.pop("train", {})},
         "optim": extra.pop("optim"), "balance": {"bias_update_speed": 0.01}, **COMMON}
    return RunConfig.from_dict(d)


def train(cfg: RunConfig, times: dict, name: str) -> Path:
    t0 = time.perf_counter()
    result = Trainer(cfg, overwrite=True).run()
    times[name] = time.perf_counter() - t0
    print(f"{name}: {result['step']} steps in {times[name]:.0f} s", flush=True)
    return Path(cfg.run_dir)


def at_length(run_dir: Path, max_pos: int, rope: dict | None) -> torch.nn.Module:
    """A run's model with its positions set for evaluation at `max_pos` tokens (the pre-trained one: plain RoPE
    extrapolated past its training length, i.e. "before")."""
    model, _ = load_run_model(run_dir)
    from dsv3 import Transformer
    ext = Transformer(model.config.replace(max_position_embeddings=max_pos, rope_scaling=rope)).eval()
    ext.load_state_dict(model.state_dict())
    return ext


def needle(model, tok: Tokenizer, seed: int) -> list[list[float]]:
    rng = random.Random(seed + 99)
    hay = filler(rng, LENGTHS[-1] // 4)
    engine = Engine(model, tok, EngineConfig(block_size=64, max_num_batched_tokens=LENGTHS[-1]))
    scores, _ = needle_grid(EngineBackend(engine), tok, hay, list(LENGTHS), list(DEPTHS), seed=seed)
    return scores


@torch.no_grad()
def loss_by_position(model, tok: Tokenizer, seed: int, n_docs: int = 4, bucket: int = 128) -> list[float]:
    """Mean token loss per `bucket` positions over held-out windows (the longest length) of phase-2-style documents."""
    rng = random.Random(seed + 7)
    ids: list[int] = []
    while len(ids) < n_docs * LENGTHS[-1] + 1:
        ids += tok.encode(document(rng, LENGTHS[-1] // 9, rng.randint(1, 4)))
    x = torch.tensor(ids[:n_docs * LENGTHS[-1] + 1])
    total = torch.zeros(LENGTHS[-1])
    for i in range(n_docs):
        w = x[i * LENGTHS[-1]:(i + 1) * LENGTHS[-1] + 1]
        logits = model(w[None, :-1])[0]
        total += torch.nn.functional.cross_entropy(logits, w[1:], reduction="none")
    return (total / n_docs).view(-1, bucket).mean(-1).tolist()


def phases(out: Path, steps: tuple[int, int, int], times: dict) -> dict[str, Path]:
    """Pre-training at PRE_LEN, then the two PHASES with YaRN (factor PHASES[-1] / PRE_LEN over PRE_LEN) and, as the
    control, with plain RoPE."""
    data = {n: corpus(out / f"docs-{n}.jsonl", k, n, seed=n) for n, k in ((PRE_LEN, 4000), (PHASES[0], 600),
                                                                          (PHASES[1], 300))}
    pre = train(run_config(out, "pre", PRE_LEN, steps[0], data[PRE_LEN], {**MODEL, "max_position_embeddings": PRE_LEN,
                                                                           "rope_scaling": None},
                           optim={"lr": 3e-3, "warmup": 0.05}), times, "pre")
    tok = str(pre / "tokenizer")
    flat = {"lr": 3e-4, "warmup": 0.0, "constant_until": 1.0, "decay_until": 1.0, "final_at": 1.0}
    runs = {"pre": pre}
    for tag, rope in (("yarn", YARN), ("plain", None)):
        src = pre
        for i, (seq, n) in enumerate(((PHASES[0], steps[1]), (PHASES[1], steps[2])), start=1):
            model = {"preset": str(src), "max_position_embeddings": LENGTHS[-1], "rope_scaling": rope}
            cfg = run_config(out, f"{tag}{i}", seq, n, data[seq], model, optim=flat,
                             data={"tokenizer": tok}, train={"init_from": str(src)})
            src = runs[f"{tag}{i}"] = train(cfg, times, f"{tag}{i}")
    return runs


def charts(results: dict, docs: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    names = list(results["needle"])
    width = 0.8 / len(names)
    for k, name in enumerate(names):
        acc = [sum(row) / len(row) for row in results["needle"][name]]
        ax.bar([i + k * width for i in range(len(LENGTHS))], acc, width, label=name)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(LENGTHS))], [str(n) for n in LENGTHS])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel(f"needle accuracy ({len(DEPTHS)} depths)")
    ax.axvline(0.5 + 0 * width, color="gray", lw=0.5)
    ax.legend(fontsize=8)
    ax.set_title(f"needle in a haystack: pre-trained at {PRE_LEN}, extended to {PHASES[0]} then {PHASES[1]}")
    fig.tight_layout()
    fig.savefig(docs / "long-context-needle.png", dpi=100)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, losses in results["loss_by_position"].items():
        ax.plot([128 * (i + 0.5) for i in range(len(losses))], losses, marker=".", label=name)
    ax.axvline(PRE_LEN, color="gray", ls="--", lw=0.8)
    ax.set_xlabel("position (tokens)")
    ax.set_ylabel("mean token loss (128-token buckets)")
    ax.set_title(f"loss by position on held-out {LENGTHS[-1]}-token windows")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(docs / "long-context-loss-by-position.png", dpi=100)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="/tmp/long-context")
    ap.add_argument("--steps", default="40,10,10", help="pre-training, phase 1, phase 2 steps")
    ap.add_argument("--docs", default=str(Path(__file__).resolve().parents[1] / "docs"))
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0, times = time.perf_counter(), {}
    runs = phases(out, tuple(int(s) for s in a.steps.split(",")), times)
    tok = Tokenizer.load(runs["pre"] / "tokenizer")
    models = {"pre-trained (plain RoPE past 512)": at_length(runs["pre"], LENGTHS[-1], None),
              "pre-trained + YaRN, no training": at_length(runs["pre"], LENGTHS[-1], YARN),
              f"YaRN phase 1 ({PHASES[0]})": at_length(runs["yarn1"], LENGTHS[-1], YARN),
              f"YaRN phase 2 ({PHASES[1]})": at_length(runs["yarn2"], LENGTHS[-1], YARN),
              f"control: plain RoPE phase 1 ({PHASES[0]})": at_length(runs["plain1"], LENGTHS[-1], None),
              f"control: plain RoPE phase 2 ({PHASES[1]})": at_length(runs["plain2"], LENGTHS[-1], None)}
    results = {"steps": a.steps, "lengths": LENGTHS, "depths": DEPTHS, "needle": {}, "loss_by_position": {}}
    t_eval = time.perf_counter()
    for name, model in models.items():
        results["needle"][name] = needle(model, tok, seed=0)
        results["loss_by_position"][name] = loss_by_position(model, tok, seed=0)
        print(name, [f"{sum(r) / len(r):.2f}" for r in results["needle"][name]], flush=True)
    times["evaluation"] = time.perf_counter() - t_eval
    times["total"] = time.perf_counter() - t0
    results["seconds"] = times
    (out / "results.json").write_text(json.dumps(results, indent=1))
    charts(results, Path(a.docs))
    print(json.dumps(times))


if __name__ == "__main__":
    main()
