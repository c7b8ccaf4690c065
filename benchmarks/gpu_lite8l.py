"""Training-step throughput and MFU of dsv3 `lite-8L` on one GPU, bf16; optional bf16-vs-fp32 parity check.

Step: h = model.hidden_states(ids); loss = CE(lm_head(h)[:, :-1], ids[:, 1:])
      + 0.3 * CE(model.mtp_logits(h, ids)[0][:, :-1], ids[:, 2:]); backward; fused AdamW (lr 1e-4); zero grads.
Logits are upcast to fp32 for the loss (as trainers do); `--bf16-loss` keeps them bf16.
The model is built on meta, cast to bf16, `to_empty` on the device and `init_weights()` (the routing bias stays
fp32). Warm-up `--warmup` steps, then `--steps` timed with CUDA events (perf_counter on CPU); reports the median
step time, tokens/s, peak memory (torch.cuda.max_memory_allocated) and MFU against `--peak` (H200 dense bf16,
989e12) with the per-token training FLOPs
    F = 6 * N_active + 3 * L * H * (d_qk + d_v) * S,
N_active = matmul weights a token touches: num_params()["active_without_embedding"] (main model only, no MTP,
lm_head included) less the RMSNorm weights. ANCHORS gives F = 5.4861 GFLOP/token for lite-8L at S=2048.

`--check`: also compares the logits of a bf16 forward on `--device` with an fp32 CPU forward of the same small
model (same weights) and reports the relative error ||a - b|| / ||b||; `--skip-bench` runs only the check.

Run (GPU; the repo's src on the path if dsv3 is not installed):
    PYTHONPATH=src python benchmarks/gpu_lite8l.py --check            # 4 x 2048, results also in $OUT/lite8l.json
CPU dry run with a tiny model:
    python benchmarks/gpu_lite8l.py --device cpu --tiny --check
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

import dsv3

MTP_WEIGHT = 0.3


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--config", default="lite-8L", help="preset name or config path")
    p.add_argument("--tiny", action="store_true", help="shrink the config (and default B x S) for a dry run")
    p.add_argument("--batch", type=int, default=None, help="default 4 (tiny: 2)")
    p.add_argument("--seq", type=int, default=None, help="default 2048 (tiny: 128)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--peak", type=float, default=989e12, help="peak bf16 FLOP/s of the device")
    p.add_argument("--bf16-loss", action="store_true", help="cross-entropy on bf16 logits (default: fp32)")
    p.add_argument("--check", action="store_true", help="bf16 (device) vs fp32 (CPU) logits parity check")
    p.add_argument("--skip-bench", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-mtp", action="store_true", help="drop the MTP module (the HF peer has none)")
    p.add_argument("--tag", default="lite8l", help="name of the JSON written under $OUT")
    return p.parse_args()


def shrink(cfg: dsv3.ModelConfig) -> dsv3.ModelConfig:
    """A small model of the same architecture (MLA, MoE with shared experts, one MTP module)."""
    return cfg.replace(vocab_size=1024, hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
                       num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=16,
                       num_experts_per_tok=4, n_group=1, topk_group=1, kv_lora_rank=64, qk_nope_head_dim=32,
                       qk_rope_head_dim=16, v_head_dim=32, max_position_embeddings=4096)


def build(cfg: dsv3.ModelConfig, device: torch.device, dtype: torch.dtype, seed: int) -> dsv3.Transformer:
    with torch.device("meta"):
        model = dsv3.Transformer(cfg)
    model.to(dtype).to_empty(device=device)
    torch.manual_seed(seed)
    model.init_weights()
    return model


def flops_per_token(model: dsv3.Transformer, seq: int) -> dict[str, float]:
    cfg = model.config
    counts = model.num_params()
    norms = sum(p.numel() for n, p in model.named_parameters() if p.ndim == 1 and not n.startswith("mtp."))
    n_active = counts["active_without_embedding"] - norms
    attn = 3 * cfg.num_hidden_layers * cfg.num_attention_heads * (
        cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim) * seq
    return dict(n_active_matmul=n_active, active_without_embedding=counts["active_without_embedding"],
                norm_params=norms, mtp_params=counts["mtp"], attn_flops=attn,
                flops_per_token=6 * n_active + attn,
                flops_per_token_incl_norms=6 * counts["active_without_embedding"] + attn)


def loss_fn(model: dsv3.Transformer, ids: torch.Tensor, fp32_loss: bool) -> torch.Tensor:
    def ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.flatten(0, 1)
        return F.cross_entropy(logits.float() if fp32_loss else logits, target.flatten())

    h = model.hidden_states(ids)
    loss = ce(model.lm_head(h)[:, :-1], ids[:, 1:])
    if model.config.num_nextn_predict_layers:
        loss = loss + MTP_WEIGHT * ce(model.mtp_logits(h, ids)[0][:, :-1], ids[:, 2:])
    return loss


def time_steps(step: Callable[[], torch.Tensor], n: int, device: torch.device) -> tuple[list[float], float]:
    """Seconds of each of n steps (CUDA events on GPU, one sync at the end) and the last loss."""
    loss = torch.tensor(float("nan"))
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
        for start, end in events:
            start.record()
            loss = step()
            end.record()
        torch.cuda.synchronize(device)
        return [s.elapsed_time(e) / 1e3 for s, e in events], loss.item()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - t0)
    return times, loss.item()


def bench(cfg: dsv3.ModelConfig, a: argparse.Namespace, device: torch.device) -> dict[str, object]:
    model = build(cfg, device, torch.bfloat16, a.seed).train()
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, fused=True)
    ids = torch.randint(0, cfg.vocab_size, (a.batch, a.seq), generator=torch.Generator().manual_seed(a.seed + 1))
    ids = ids.to(device)

    def step() -> torch.Tensor:
        loss = loss_fn(model, ids, not a.bf16_loss)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    time_steps(step, a.warmup, device)
    times, loss = time_steps(step, a.steps, device)
    sec = statistics.median(times)
    tokens = a.batch * a.seq
    fl = flops_per_token(model, a.seq)
    peak_mem = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return dict(batch=a.batch, seq=a.seq, warmup=a.warmup, steps=a.steps, step_seconds=times,
                median_step_s=sec, tokens_per_s=tokens / sec, peak_memory_bytes=peak_mem, last_loss=loss,
                mfu=fl["flops_per_token"] * tokens / sec / a.peak, peak_flops=a.peak, fp32_loss=not a.bf16_loss,
                **fl)


def check(cfg: dsv3.ModelConfig, device: torch.device, seed: int) -> dict[str, float]:
    """Logits of a bf16 forward on `device` vs an fp32 CPU forward of the same weights."""
    ref = build(cfg, torch.device("cpu"), torch.float32, seed).eval()
    low = copy.deepcopy(ref).to(device=device, dtype=torch.bfloat16)
    ids = torch.randint(0, cfg.vocab_size, (2, 64), generator=torch.Generator().manual_seed(seed + 2))
    with torch.no_grad():
        want = ref(ids)
        got = low(ids.to(device)).float().cpu()
    return dict(rel_err=((got - want).norm() / want.norm()).item(), max_abs_diff=(got - want).abs().max().item(),
                max_abs_ref=want.abs().max().item(),
                argmax_agree=(got.argmax(-1) == want.argmax(-1)).float().mean().item())


def main() -> None:
    a = parse_args()
    device = torch.device(a.device)
    cfg = dsv3.load_model_config(a.config)
    if a.tiny:
        cfg = shrink(cfg)
    if a.no_mtp:
        cfg = cfg.replace(num_nextn_predict_layers=0)
    a.batch = a.batch or (2 if a.tiny else 4)
    a.seq = a.seq or (128 if a.tiny else 2048)
    result: dict[str, object] = dict(config=a.config, tiny=a.tiny, device=str(device), torch=torch.__version__,
                                     device_name=torch.cuda.get_device_name(device) if device.type == "cuda"
                                     else "cpu")
    if a.check:
        c = check(shrink(cfg), device, a.seed)
        result["check"] = c
        print(f"check bf16({device}) vs fp32(cpu) logits: rel err {c['rel_err']:.3e}, max|diff| "
              f"{c['max_abs_diff']:.3e} (max|ref| {c['max_abs_ref']:.3e}), argmax agree {c['argmax_agree']:.4f}")
    if not a.skip_bench:
        r = bench(cfg, a, device)
        result["bench"] = r
        mem = f"{r['peak_memory_bytes'] / 2**30:.2f} GiB" if r["peak_memory_bytes"] is not None else "n/a"
        print(f"{a.config}{' (tiny)' if a.tiny else ''}{' no MTP' if a.no_mtp else ''} B={a.batch} S={a.seq}: "
              f"median step {r['median_step_s']:.4f} s, "
              f"{r['tokens_per_s']:,.0f} tok/s, peak mem {mem}, loss {r['last_loss']:.4f}")
        print(f"F = {r['flops_per_token'] / 1e9:.4f} GFLOP/token (N_active matmul {r['n_active_matmul']:,}; "
              f"with norms {r['flops_per_token_incl_norms'] / 1e9:.4f}; ANCHORS lite-8L S=2048: 5.4861), "
              f"MFU {100 * r['mfu']:.2f}% of {a.peak:.3g}")
    if os.environ.get("OUT"):
        path = Path(os.environ["OUT"]) / f"{a.tag}.json"
        path.write_text(json.dumps(result, indent=2))
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
