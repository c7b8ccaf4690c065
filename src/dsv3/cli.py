"""The `dsv3` command line: one subcommand per job, each a thin wrapper over the library (`generate`, `serve`, `eval`
and `bench` over dsv3.launch). The arguments each subcommand takes are dsv3.cli_args's; `main` parses and runs the
command."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

import torch

from .checkpoint import CheckpointError, convert_checkpoint, load_pretrained, save_pretrained
from .cli_args import DTYPES, build_parser
from .config import ConfigError, ModelConfig, load_model_config
from .model import Transformer, generate


def _fmt(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"


def _dtype(args: argparse.Namespace) -> torch.dtype | None:
    """The `--dtype` asked; None: the command's default (`dsv3 export`: as trained; a model-running command:
    dsv3.launch.loading.serving_dtype)."""
    return DTYPES[args.dtype] if args.dtype else None


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
    latent = (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * cfg.num_hidden_layers * 2
    print(f"latent cache      {latent:,} bytes/token (bf16)")
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
    print(f"forward     logits {tuple(logits.shape)}, reload max|diff| {diff:.2e}, "
          f"absorbed-MLA max|diff| {absorbed:.2e}")
    print(f"generate    {ids[0].tolist()[:6]}... -> {new}")
    print(f"done in {time.perf_counter() - t0:.1f}s")


def cmd_convert(args: argparse.Namespace) -> None:
    """Re-write a HF directory shard by shard: FP8 -> bf16 (dequantise), or bf16 -> released FP8 block format."""
    left_out = convert_checkpoint(args.src, args.dst, to=args.to, dtype=DTYPES[args.dtype])
    print(f"wrote {args.dst} ({args.to})")
    if left_out:        # said, so that nothing the user may look for in the output is missing without a word
        print(f"not copied (weight files the index does not list, hidden or linked directories): "
              f"{', '.join(left_out)}")


def cmd_tokenizer_train(args: argparse.Namespace) -> None:
    from .data import iter_documents, train_tokenizer
    t0 = time.perf_counter()
    tok = train_tokenizer((d.text for d in iter_documents(args.sources)), args.vocab_size, args.out)
    print(f"wrote {args.out}: byte-level BPE, {tok.vocab_size} tokens, in {time.perf_counter() - t0:.1f}s")


def cmd_train(args: argparse.Namespace) -> int:
    """Exit status: 0 done, 2 refused (config, run directory), 3 diverged, 128 + signal when SIGINT / SIGTERM
    stopped it after saving (130 / 143)."""
    from .train import Trainer, load_run_config
    from .train.run_dir import resume_config
    overrides = list(args.overrides) + ([f"run_dir={json.dumps(args.run_dir)}"] if args.run_dir else [])
    if args.resume:
        cfg, ignored = resume_config(args.config, args.run_dir, overrides)
        if ignored:
            print(f"dsv3 train: note: --resume continues {cfg.run_dir}/config.json (with the command line's "
                  f"overrides); not applied from {args.config}: {', '.join(ignored)} (pass section.key=value to "
                  f"change them)", file=sys.stderr)
    else:
        cfg = load_run_config(args.config, overrides)
    trainer = Trainer(cfg, resume=args.resume, progress=False if args.quiet else None, overwrite=args.overwrite)
    return _run_trainer(trainer, "train")


def _run_trainer(trainer, command: str) -> int:
    """Run a built Trainer (pre-training or SFT) under the signal handlers; the exit status of `cmd_train`."""
    import torch.distributed as dist

    from .train.signals import Aborted, StopSignals
    from .train.trainer import TrainingInterrupted
    cfg = trainer.cfg
    n = trainer.param_counts
    ranks = trainer.layout.describe()
    if trainer.layout.is_main:
        print(f"training {cfg.run_dir}: {_fmt(n['total'])} params ({_fmt(n['active'])} active) + {_fmt(n['mtp'])} "
              f"MTP, {cfg.train.steps} steps of up to {cfg.train.batch_size} x {cfg.data.seq_len} tokens on "
              f"{trainer.device}{ranks} ({str(trainer.dtype).removeprefix('torch.')}), from step {trainer.step}",
              file=sys.stderr)
    try:
        # exit_after_stop: once a signal stopped the run, a later press exits at once, not with a traceback at exit
        with StopSignals(announce=trainer.layout.is_main, exit_after_stop=True) as stop:
            summary = trainer.run(stop)
    except TrainingInterrupted as e:
        if trainer.layout.is_main:
            print(f"dsv3 {command}: {e}", file=sys.stderr)
        return 128 + e.signum
    except Aborted as e:                # a second signal: stopped mid-step, unsaved; say what stands
        if trainer.layout.is_main:
            print(f"dsv3 {command}: aborted by {signal.Signals(e.signum).name}; {trainer.abort_note()}",
                  file=sys.stderr)
        return 128 + e.signum
    finally:
        if dist.is_initialized():       # a clean exit (NCCL warns about a group left open)
            dist.destroy_process_group()
    if trainer.layout.is_main:          # one summary per run, not one per rank
        print(json.dumps(summary))
    return 0


def cmd_posttrain(args: argparse.Namespace) -> int:
    """`dsv3 sft | grpo | distill` on the pre-training Trainer (dsv3.posttrain); exit statuses as `dsv3 train`."""
    from .posttrain.distill import distill_trainer
    from .posttrain.grpo import grpo_trainer
    from .posttrain.sft import sft_trainer
    if not args.config and not (args.resume and args.run_dir):
        raise ValueError("pass --config RUN.toml (or --resume --run-dir DIR)")
    make = {"sft": sft_trainer, "grpo": grpo_trainer, "distill": distill_trainer}[args.posttrain]
    made = make(args.config, args.overrides, resume=args.resume, overwrite=args.overwrite,
                progress=False if args.quiet else None, run_dir=args.run_dir)
    trainer, lines = made if isinstance(made, tuple) else (made, [])     # grpo reports no data summary
    for line in lines:
        print(line, file=sys.stderr)
    return _run_trainer(trainer, args.posttrain)


def cmd_export(args: argparse.Namespace) -> None:
    from .train import export_run
    out = export_run(args.run_dir, args.out_dir, step=args.step, ema=args.ema,
                     dtype=_dtype(args), overwrite=args.overwrite)
    print(f"wrote {out}")


def cmd_plot(args: argparse.Namespace) -> None:
    from .train.plot import plot_run
    for path in plot_run(args.run_dir, args.out):
        print(path)


def cmd_generate(args: argparse.Namespace) -> None:
    # bad flags are refused before the model is read (minutes for a large checkpoint)
    if args.samples < 1 or args.spec < 0:
        raise ValueError(f"--samples must be >= 1 and --spec >= 0, got {args.samples} and {args.spec}")
    from .launch.generate import run_generate
    run_generate(_hub_model(args), _dtype(args))


def cmd_eval(args: argparse.Namespace) -> int:
    from .launch.evaluate import run_eval
    return run_eval(_hub_model(args), _dtype(args))


def cmd_serve(args: argparse.Namespace) -> None:
    from .launch.serve import run_serve
    return run_serve(_hub_model(args), _dtype(args))


def _hub_model(args: argparse.Namespace) -> argparse.Namespace:
    """--model as a Hugging Face Hub id where no such local path exists (dsv3.checkpoint.hub)."""
    if getattr(args, "model", None):
        from .checkpoint.hub import resolve_model
        args.model = resolve_model(args.model)
    return args


def cmd_plan(args: argparse.Namespace) -> None:
    import json

    from .parallel.plan import Cluster, Layout, format_plan, plan, training_cost
    cfg = load_model_config(args.config)
    p = plan(cfg, Cluster(args.gpus, args.gpus_per_node, args.gpu_memory, args.nvlink, args.ib),
             Layout(args.pp, args.ep, args.schedule, args.micro_batch, args.seq_len, args.micro_batches,
                    2 if args.moments == "bf16" else 4))
    batch = args.micro_batch * args.seq_len * args.micro_batches * p["layout"]["dp"]
    p["cost"] = training_cost(cfg, args.gpus, args.mfu, args.peak_tflops, args.seq_len, batch, args.price)
    print(json.dumps(p, indent=1) if args.json else format_plan(p))


def cmd_bench(args: argparse.Namespace) -> None:
    from .launch.bench import run_bench
    return run_bench(args, _dtype(args))


COMMANDS = {"info": cmd_info, "demo": cmd_demo, "convert": cmd_convert, "tokenizer train": cmd_tokenizer_train,
            "train": cmd_train, "sft": cmd_posttrain, "grpo": cmd_posttrain, "distill": cmd_posttrain,
            "export": cmd_export, "plot": cmd_plot, "generate": cmd_generate, "serve": cmd_serve, "eval": cmd_eval,
            "plan": cmd_plan, "bench": cmd_bench}     # a parse's command (and tokenizer_command) -> what runs it


def _rank_tag() -> str:
    """Under torchrun, which rank an error is from ("rank 3 of 8: "): it may be that rank's alone (its data, its
    disk), and the other ranks' lines are then only the collective they were left in."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return f"rank {os.environ.get('RANK', '0')} of {world}: " if world > 1 else ""


def main(argv: list[str] | None = None) -> int:
    """Parse (dsv3.cli_args), run the command; its errors are one line and an exit status: 2 refused (bad input,
    config, checkpoint), 3 a training run diverged, 128 + the signal's number when SIGINT / SIGTERM stopped it."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # section.key=value overrides after an option (`... train.steps=2 --overwrite log.interval=1`): argparse takes
    # only one run of a positional list (and its intermixed parsing refuses subcommands)
    if extra and hasattr(args, "overrides") and all("=" in a and not a.startswith("-") for a in extra):
        args.overrides, extra = [*args.overrides, *extra], []
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if getattr(args, "resume", None) == "":
        parser.error("--resume-from needs a checkpoint: a step, step_N or its path")
    command = " ".join(filter(None, (args.command, getattr(args, "tokenizer_command", None))))
    try:
        return COMMANDS[command](args) or 0
    except ConfigError as e:            # the same on every rank: said once (rank 0), every rank exits 2
        if os.environ.get("RANK", "0") == "0":
            print(f"dsv3 {args.command}: error: {e}", file=sys.stderr)
        return 2
    except (CheckpointError, FileNotFoundError, FileExistsError, ValueError) as e:
        if os.environ.get("RANK", "0") == "0" or not getattr(e, "said_by_rank_0", False):   # a shared decision
            print(f"dsv3 {args.command}: {_rank_tag()}error: {e}", file=sys.stderr)
        return 2
    except OSError as e:                # the machine's (a full disk, permissions): one line; writes are atomic
        print(f"dsv3 {args.command}: {_rank_tag()}error: {e}", file=sys.stderr)
        return 1
    except RuntimeError as e:
        from .train.data_parallel import is_collective_timeout, timeout_message
        if is_collective_timeout(e) and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            print(f"dsv3 {args.command}: {_rank_tag()}error: {timeout_message(e)}", file=sys.stderr)
            if torch.distributed.is_initialized():    # else the gloo group's teardown at exit aborts the process
                torch.distributed.destroy_process_group()
            return 1
        if type(e).__name__ != "TrainingDiverged":
            raise
        print(f"dsv3 {args.command}: stopped: {e}", file=sys.stderr)
        return 3
    except KeyboardInterrupt as e:      # Ctrl-C outside the training loop, or a second one inside it
        signum = getattr(e, "signum", signal.SIGINT)
        print(f"dsv3 {args.command}: aborted by {signal.Signals(signum).name}", file=sys.stderr)
        return 128 + signum


if __name__ == "__main__":
    sys.exit(main())
