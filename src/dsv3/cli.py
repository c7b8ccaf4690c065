"""The `dsv3` command line: one subcommand per job, each a thin wrapper over the library."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from .checkpoint import CheckpointError, convert_checkpoint, load_pretrained, save_pretrained
from .config import ConfigError, ModelConfig, load_model_config
from .model import Transformer, generate

DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float32": torch.float32, "fp32": torch.float32,
          "float16": torch.float16}


def _fmt(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"


def _meta_model(cfg: ModelConfig) -> Transformer:
    with torch.device("meta"):
        return Transformer(cfg)


def cmd_info(args: argparse.Namespace) -> None:
    cfg = load_model_config(args.config)
    n = _meta_model(cfg).num_params()
    moe_layers = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
    print(f"config            {args.config}")
    print(f"layers            {cfg.num_hidden_layers} ({cfg.num_hidden_layers - moe_layers} dense, {moe_layers} MoE) "
          f"+ {cfg.num_nextn_predict_layers} MTP")
    print(f"hidden / heads    {cfg.hidden_size} / {cfg.num_attention_heads}  (q_lora {cfg.q_lora_rank}, "
          f"kv_lora {cfg.kv_lora_rank}, qk {cfg.qk_nope_head_dim}+{cfg.qk_rope_head_dim}, v {cfg.v_head_dim})")
    print(f"experts           {cfg.n_routed_experts} routed (top-{cfg.num_experts_per_tok}, {cfg.n_group} groups, "
          f"top-{cfg.topk_group} groups) + {cfg.n_shared_experts} shared, width {cfg.moe_intermediate_size}")
    print(f"latent cache      {(cfg.kv_lora_rank + cfg.qk_rope_head_dim) * cfg.num_hidden_layers * 2:,} bytes/token (bf16)")
    print(f"total params      {n['total']:,} ({_fmt(n['total'])})  main model")
    print(f"active params     {n['active']:,} ({_fmt(n['active'])})  per token, embedding and head included")
    print(f"                  {n['active_without_embedding']:,} ({_fmt(n['active_without_embedding'])})  "
          f"without the input embedding")
    print(f"MTP params        {n['mtp']:,} ({_fmt(n['mtp'])})  own; "
          f"{_fmt(n['mtp_active'])} active with the shared embedding and head")


def cmd_demo(args: argparse.Namespace) -> None:
    """Build the tiny model, save and reload it, check the reload, run a forward and a short generation."""
    torch.manual_seed(args.seed)
    cfg = load_model_config(args.config)
    t0 = time.perf_counter()
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device="cpu")
    model.init_weights()
    model.eval()
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="dsv3-demo-"))
    save_pretrained(model, out)
    reloaded = load_pretrained(out, dtype=torch.float32).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    with torch.no_grad():
        logits = model(ids)
        diff = (reloaded(ids) - logits).abs().max().item()
        absorbed = (model(ids, absorb=True) - logits).abs().max().item()
    new = generate(reloaded, [ids[0].tolist()], max_new_tokens=8)[0]
    n = model.num_params()
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"model       {args.config}: {cfg.num_hidden_layers} layers, {cfg.n_routed_experts} experts, "
          f"{_fmt(n['total'])} params ({_fmt(n['active'])} active) + {_fmt(n['mtp'])} MTP")
    print(f"checkpoint  {out} ({size / 1e6:.1f} MB, HF format)")
    print(f"forward     logits {tuple(logits.shape)}, reload max|diff| {diff:.2e}, absorbed-MLA max|diff| {absorbed:.2e}")
    print(f"generate    {ids[0].tolist()[:6]}... -> {new}")
    print(f"done in {time.perf_counter() - t0:.1f}s")


def cmd_convert(args: argparse.Namespace) -> None:
    """Re-write a HF directory shard by shard: FP8 -> bf16 (dequantise), or bf16 -> released FP8 block format."""
    convert_checkpoint(args.src, args.dst, to=args.to, dtype=DTYPES[args.dtype])
    print(f"wrote {args.dst} ({args.to})")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dsv3", description="DeepSeek-V3 in PyTorch")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("info", help="print a config's shape and parameter counts")
    s.add_argument("config", help="preset name (tiny, lite, lite-8L, v3-671b), config.json, or checkpoint directory")
    s.set_defaults(fn=cmd_info)
    s = sub.add_parser("demo", help="build, save, reload and run the tiny model")
    s.add_argument("--config", default="tiny")
    s.add_argument("--out", default=None, help="checkpoint directory (default: a temporary one)")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(fn=cmd_demo)
    s = sub.add_parser("convert", help="convert a HF checkpoint: fp8 -> bf16 or bf16 -> fp8 (released block format)")
    s.add_argument("src")
    s.add_argument("dst")
    s.add_argument("--to", choices=["bf16", "fp8"], default="bf16", help="bf16: dequantise everything; fp8: quantise")
    s.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16", help="dtype of the non-FP8 tensors")
    s.set_defaults(fn=cmd_convert)
    args = p.parse_args(argv)
    try:
        args.fn(args)
    except (ConfigError, CheckpointError, FileNotFoundError) as e:
        print(f"dsv3 {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
