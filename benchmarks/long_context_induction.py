"""Induction probe (issue 21): does a model shape learn in-context copying, and after how many steps?

Pure induction task: a random sequence of `--period` 8-40 tokens over a `--vocab`-token alphabet, repeated to fill
`--seq` tokens; the loss on the repeats (targets past the first period) is ln(vocab) for a model that cannot copy,
lower for one that learnt which tokens the sequence holds (~ln(distinct tokens)), and near 0 once induction heads
(a previous-token head feeding a content-matching head, Olsson et al. 2022) have formed. Plain AdamW on the model
itself (no Trainer), fp32, one thread: a few hundred steps on the CPU say whether the shape is worth a demo.

    PYTHONPATH=src python benchmarks/long_context_induction.py --shape demo --steps 800 [--lr 1e-3]

Shapes: `demo` = long_context_demo.MODEL (4 heads of 32 + 32 qk dims, no query latent, kv latent 128), `round2` =
the round-2 demo's (8 heads of 16 + 16, query latent 96, kv latent 64).
"""

from __future__ import annotations

import argparse
import math
import random
import time

import torch

from dsv3 import Transformer
from dsv3.config import ModelConfig
from long_context_data import copy_layout
from long_context_demo import MODEL, PRE_LEN

ROUND2 = dict(num_attention_heads=8, kv_lora_rank=64, q_lora_rank=96, qk_nope_head_dim=16, qk_rope_head_dim=16,
              v_head_dim=16)


def batch(gen: torch.Generator, b: int, seq: int, vocab: int, periods: tuple[int, int]):
    """(b, seq) repeated random sequences and the (b, seq - 1) mask of the targets that are copies."""
    x, copies = torch.empty(b, seq, dtype=torch.long), torch.zeros(b, seq - 1)
    for i in range(b):
        p = int(torch.randint(periods[0], periods[1] + 1, (1,), generator=gen))
        x[i] = torch.randint(8, 8 + vocab, (p,), generator=gen).repeat(seq // p + 1)[:seq]
        copies[i, p - 1:] = 1
    return x, copies


def copy_batch(rng: random.Random, b: int, seq: int, vocab: int):
    """(b, seq) sequences laid out as the copy documents are (`copy_layout`: spans recur at any distance up to the
    window), and the mask of the targets inside copied spans (the tokens only copying predicts), approximately:
    a target equal to the token after an earlier occurrence of the same bigram."""
    x = torch.tensor([copy_layout(rng, seq, lambda: rng.randrange(8, 8 + vocab)) for _ in range(b)])
    copies = torch.zeros(b, seq - 1)
    for i, row in enumerate(x.tolist()):
        seen = set()
        for t in range(1, seq):
            copies[i, t - 1] = float((row[t - 1], row[t]) in seen) if t > 1 and (row[t - 2], row[t - 1]) in seen else 0
            seen.add((row[t - 1], row[t]))
    return x, copies


@torch.no_grad()
def probe(model, vocab: int, period: int, seq: int) -> float:
    """Loss on the repeat of a random sequence of `period` tokens, repeated up to `seq` tokens (the copy distance is
    `period`): ~ln(vocab) without copying at that distance, ~0 with it."""
    g = torch.Generator().manual_seed(7)
    first = torch.randint(8, 8 + vocab, (64, period), generator=g)
    x = torch.cat([first, first], 1)[:, :min(2 * period, seq)]
    loss = torch.nn.functional.cross_entropy(model(x[:, :-1]).transpose(1, 2), x[:, 1:], reduction="none")
    return loss[:, period:].mean().item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=("demo", "round2"), default="demo")
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=64)
    ap.add_argument("--data", choices=("repeat", "copy", "mix"), default="repeat",
                    help="repeat: units of 8-40 repeated; copy: spans recurring at any distance (copy_layout); mix: "
                         "the two on alternate steps (the demo's corpus has both)")
    ap.add_argument("--periods", default="30,64,100,200", help="probe distances, every 100 steps")
    a = ap.parse_args()
    torch.set_num_threads(1)
    shape = {k: v for k, v in MODEL.items() if k != "preset"}
    cfg = ModelConfig(**{**shape, **(ROUND2 if a.shape == "round2" else {}), "max_position_embeddings": PRE_LEN})
    torch.manual_seed(0)
    model = Transformer(cfg)
    model.init_weights(cfg.init_std)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, betas=(0.9, 0.95), weight_decay=0.1)
    gen, rng, t0 = torch.Generator().manual_seed(1), random.Random(1), time.perf_counter()
    for step in range(1, a.steps + 1):
        for group in opt.param_groups:
            group["lr"] = a.lr * min(1.0, step / 50)          # 50 steps of linear warm-up
        repeat = a.data == "repeat" or (a.data == "mix" and step % 2 == 0)
        x, copies = batch(gen, a.batch, a.seq, a.vocab, (8, 40)) if repeat else copy_batch(rng, a.batch, a.seq, a.vocab)
        losses = torch.nn.functional.cross_entropy(model(x[:, :-1]).transpose(1, 2), x[:, 1:], reduction="none")
        opt.zero_grad()
        losses.mean().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 25 == 0:
            repeat = (losses * copies).sum() / copies.sum()
            print(f"{a.shape} step {step} loss {losses.mean().item():.3f} on the repeats {repeat.item():.3f} "
                  f"(no copying: {math.log(a.vocab):.2f}) {time.perf_counter() - t0:.0f} s", flush=True)
        if step % 100 == 0:
            print(f"{a.data} step {step} probe, loss on the repeat at distance " + " ".join(
                f"{p}: {probe(model, a.vocab, p, a.seq):.2f}" for p in map(int, a.periods.split(","))), flush=True)


if __name__ == "__main__":
    main()
