"""The `dsv3` command line's arguments: one parser per subcommand (what a user may type, its defaults and help),
in the order `dsv3 --help` lists them. Parsing only: dsv3.cli runs the command a parse names."""

from __future__ import annotations

import argparse
import os

import torch

__all__ = ["DTYPES", "build_parser"]

DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float32": torch.float32, "fp32": torch.float32,
          "float16": torch.float16, "float64": torch.float64}


class _Help(argparse.HelpFormatter):
    """Every option's default in its help line, unless the help says it itself, the default is None or False, or it is a
    key: an `--api-key` taken from the environment must not be printed by `--help`."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if ("default" in text or default is None or default is False or default == argparse.SUPPRESS
                or not action.option_strings or "key" in action.dest):
            return text
        shown = ",".join(map(str, default)) if isinstance(default, list) else "%(default)s"
        return f"{text} (default: {shown})" if text else f"default: {shown}"


def _info(sub) -> None:
    s = _add(sub, "info", help="print a config's shape and parameter counts")
    s.add_argument("config", help="preset name (tiny, lite, lite-8L, v3-671b), config.json, or checkpoint directory")


def _demo(sub) -> None:
    s = _add(sub, "demo", help="build, save, reload and run the tiny model")
    s.add_argument("--config", default="tiny", help="preset or config.json")
    s.add_argument("--out", default=None, help="checkpoint directory (default: a temporary one)")
    s.add_argument("--seed", type=int, default=0, help="torch seed of the random weights and input")


def _convert(sub) -> None:
    s = _add(sub, "convert", help="convert a HF checkpoint: fp8 -> bf16 or bf16 -> fp8 (released block format)")
    s.add_argument("src", help="HF checkpoint directory")
    s.add_argument("dst", help="a new or empty directory outside src")
    s.add_argument("--to", choices=["bf16", "fp8"], default="bf16", help="bf16: dequantise everything; fp8: quantise")
    s.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16", help="dtype of the non-FP8 tensors")


def _tokenizer(sub) -> None:
    s = _add(sub, "tokenizer", help="tokenizer tools")
    tsub = s.add_subparsers(dest="tokenizer_command", required=True)
    t = _add(tsub, "train", help="train a byte-level BPE tokenizer (tokenizer.json + tokenizer_config.json)")
    t.add_argument("--sources", nargs="+", default=["stdlib"], help="stdlib, files, directories or globs")
    t.add_argument("--vocab-size", type=int, default=2048, help="tokens, special tokens included")
    t.add_argument("--out", required=True, help="directory for tokenizer.json + tokenizer_config.json")


RESUME_FROM = ("--resume from this checkpoint of the run (a step, step_N or its path), also one saved during a loss "
               "spike (suspect)")


def _train(sub) -> None:
    s = _add(sub, "train", help="pre-train a model: dsv3 train --config configs/tiny.toml [section.key=value ...]")
    s.add_argument("--config", default=None, help="run TOML (sections model, data, optim, balance, mtp, train, "
                   "log, checkpoint, parallel)")
    s.add_argument("overrides", nargs="*", help="section.key=value, the value in TOML syntax")
    s.add_argument("--run-dir", default=None, help="overrides run_dir")
    s.add_argument("--resume", action="store_true", help="continue the run in run_dir from its newest intact "
                   "healthy checkpoint (not one saved during a loss spike)")
    s.add_argument("--resume-from", dest="resume", metavar="CHECKPOINT", help=RESUME_FROM)
    s.add_argument("--overwrite", action="store_true", help="start afresh in a run_dir that holds an earlier run "
                   "(its checkpoints, metrics, tensorboard, plots, baselines, tokenizer and config are deleted)")
    s.add_argument("--quiet", action="store_true", help="no progress bar")


def _posttrain(sub) -> None:
    for name, what in (("sft", "supervised fine-tuning on chat data"),
                       ("grpo", "GRPO with verifiable rewards, rollouts by the inference engine"),
                       ("distill", "distillation: teacher samples + verifier -> SFT, or top-k logit KD")):
        s = _add(sub, name, help=f"{what}: dsv3 {name} --config {name}.toml [section.key=value ...]")
        s.add_argument("--config", default=None, help=f"run TOML with a [{name}] table ({name}.init: the starting "
                       f"run or HF directory) and the train sections; --resume without it reads "
                       f"RUN_DIR/posttrain.json")
        s.add_argument("overrides", nargs="*", help="section.key=value, the value in TOML syntax")
        s.add_argument("--run-dir", default=None, help="overrides run_dir")
        s.add_argument("--resume", action="store_true", help="continue from the newest intact healthy checkpoint")
        s.add_argument("--resume-from", dest="resume", metavar="CHECKPOINT", help=RESUME_FROM)
        s.add_argument("--overwrite", action="store_true", help="start afresh in a run_dir that holds an earlier run")
        s.add_argument("--quiet", action="store_true", help="no progress bar")
        s.set_defaults(posttrain=name)


def _export(sub) -> None:
    s = _add(sub, "export", help="write a run's checkpoint as a Hugging Face directory")
    s.add_argument("run_dir", help="a training run directory")
    s.add_argument("out_dir", help="a new or empty directory (or, with --overwrite, an earlier export)")
    s.add_argument("--step", type=int, default=None, help="default: the latest checkpoint")
    s.add_argument("--ema", action="store_true", help="export the EMA weights")
    s.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: as trained (fp32)")
    s.add_argument("--overwrite", action="store_true", help="replace an earlier export in out_dir (only its files)")


def _plot(sub) -> None:
    s = _add(sub, "plot", help="PNG charts of a run's metrics")
    s.add_argument("run_dir", help="a training run directory")
    s.add_argument("--out", default=None, help="default: RUN_DIR/plots")


def _generate(sub) -> None:
    s = _add(sub, "generate", help="sample a completion from a trained model")
    s.add_argument("--model", required=True, help="a HF directory (dsv3 export) or a training run directory")
    s.add_argument("--prompt", required=True, help="the text to continue (after the --prefix token)")
    s.add_argument("--tokenizer", default=None, help="default: the model directory's")
    s.add_argument("--max-tokens", type=int, default=128, help="new tokens per sample")
    s.add_argument("--temperature", type=float, default=None, help="0: greedy (default: the model's "
                   "generation_config.json, else 0.8)")
    s.add_argument("--top-k", type=int, default=None, help="0: off (default: generation_config.json's, else 50)")
    s.add_argument("--top-p", type=float, default=None, help="1: off (default: generation_config.json's, else 0.95)")
    s.add_argument("--repetition-penalty", type=float, default=None, help="HF's, over the prompt and the output: "
                   "a seen token's logit / this if > 0, * this if < 0; 1: off, (0, 2] (default: "
                   "generation_config.json's, else 1)")
    s.add_argument("--generation-config", choices=["auto", "none"], default="auto", help="auto: the model's "
                   "generation_config.json gives the sampling flags left out and eos ids besides the tokenizer's; "
                   "none: the file is not read")
    s.add_argument("--samples", type=int, default=1, help="completions of the prompt")
    s.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    s.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bfloat16 on CUDA, float32 on "
                   "the CPU")
    s.add_argument("--seed", type=int, default=0, help="sample i uses seed + i")
    s.add_argument("--ema", action="store_true", help="a run directory's EMA weights")
    s.add_argument("--spec", type=int, default=0, help="MTP speculative decoding with this many draft tokens")
    s.add_argument("--escapes", action="store_true", help="interpret backslash escapes (\\n) in the prompt")
    s.add_argument("--special-tokens", action="store_true", help="read special-token text in the prompt "
                   "(<｜User｜>, <｜end▁of▁sentence｜>) as those tokens; default: as plain text")
    s.add_argument("--prefix", choices=["auto", "bos", "eos", "none"], default="auto",
                   help="the token in front of the prompt. auto: EOS for a model dsv3 pre-trained (a run directory, or "
                   "a tokenizer dsv3 wrote: documents packed as doc EOS doc EOS), BOS for a Hugging Face directory "
                   "whose tokenizer_config.json has add_bos_token (the released V3 / R1), else EOS")


def _serve(sub) -> None:
    s = _add(sub, "serve", help="OpenAI-compatible HTTP server (completions, chat, streaming, metrics)")
    s.add_argument("--model", required=True, help="a training run directory or a Hugging Face model directory")
    s.add_argument("--tokenizer", default=None, help="tokenizer.json or its directory (default: the model's)")
    s.add_argument("--served-model-name", default=None, help="the name clients pass as `model` (default: dir name)")
    s.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    s.add_argument("--port", type=int, default=8000, help="HTTP port")
    s.add_argument("--allowed-hosts", type=lambda v: [h for h in v.split(",") if h], default=None,
                   metavar="NAME[,NAME]", help="Host header names answered besides loopback ones (`*.example.com`, "
                   "`*`: any; `NAME:PORT` or `[IPv6]:PORT`: on that port only); default: loopback names only when "
                   "bound to loopback, any name otherwise")
    s.add_argument("--api-key", default=os.environ.get("DSV3_API_KEY"), help="require `Authorization: Bearer KEY` "
                   "on every route but /health (default: $DSV3_API_KEY; the environment keeps the key out of `ps`)")
    s.add_argument("--metrics-public", action="store_true", help="with --api-key: /metrics open without the key")
    s.add_argument("--max-body-bytes", type=int, default=None, help="larger request bodies get 413 (default 8 MiB)")
    s.add_argument("--max-pending", type=int, default=256, help="requests queued or running before 429")
    s.add_argument("--threads", type=int, default=None, help="the engine's torch threads (default: OMP_NUM_THREADS, "
                   "else the usable cores but one, which the HTTP process keeps)")
    s.add_argument("--max-num-seqs", type=int, default=64, help="sequences the engine runs at once")
    s.add_argument("--admission-delay", type=int, default=0, help="steps a new request may wait while others decode, "
                   "so that several are prefilled together (EngineConfig.admission_delay; 0: at once)")
    s.add_argument("--max-model-len", type=int, default=0, help="0: the model's max_position_embeddings")
    s.add_argument("--block-size", type=int, default=None, help="tokens per cache block (default: EngineConfig's)")
    s.add_argument("--compile-decode", action="store_true", help="torch.compile the layers of the graphed decode "
                   "steps (slower start, faster steps: benchmarks/RESULTS.md)")
    s.add_argument("--compile-prefill", action="store_true", help="torch.compile the layers of steps with prefill "
                   "rows, the token dimension dynamic (EngineConfig.compile_prefill; off by default: its GPU benefit "
                   "is still being measured, benchmarks/RESULTS.md)")
    s.add_argument("--fused-moe", choices=["auto", "on", "off"], default="auto", help="routed experts of decode "
                   "batches in the fused MoE kernel (auto: on CUDA, for the batch sizes where it is faster)")
    s.add_argument("--lazy-graphs", action="store_true", help="capture each decode CUDA graph at its first step "
                   "instead of all at start (a faster start; the first steps of each new batch size then stall)")
    s.add_argument("--cache-gib", type=float, default=1.0, help="latent-cache memory")
    s.add_argument("--spec", type=int, default=0, help="MTP speculative draft tokens")
    s.add_argument("--fp8", action="store_true", help="serve weights in the released FP8 block format")
    s.add_argument("--chat-template", default=None, help="a Jinja file (default: the model's chat_template.jinja, else "
                   "tokenizer_config.json's); tools "
                   "need one that renders `tools` (V3.1's does, V3's and R1's release templates do not)")
    s.add_argument("--reasoning-parser", choices=["auto", "deepseek_r1", "none"], default="auto", help="chat: the "
                   "text before </think> as message.reasoning_content; auto: on when the chat template mentions "
                   "</think> (R1, V3.1)")
    s.add_argument("--generation-config", choices=["auto", "none"], default="auto", help="auto: the temperature, "
                   "top_p and top_k of the model's generation_config.json are the defaults of a request that leaves "
                   "them out (DeepSeek-V3 / R1: 0.6, 0.95), and its eos_token_id ends generations besides the "
                   "tokenizer's EOS; none: OpenAI's (1.0, 1.0, off), the tokenizer's EOS only")
    s.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    s.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bfloat16 on CUDA, float32 on "
                   "the CPU")
    s.add_argument("--engine-thread", action="store_true", help="step the engine in a thread of the server process "
                   "(default: a process of its own)")
    s.add_argument("--ep", type=int, default=0, help="expert parallelism + DP attention over N torchrun processes "
                   "(torchrun --nproc-per-node N -m dsv3.cli serve ... --ep N); rank 0 serves HTTP, or, with --role "
                   "prefill|decode, the router's connection")
    s.add_argument("--redundant-experts", type=int, default=0, help="--ep: extra expert slots per MoE layer (EPLB)")
    s.add_argument("--rebalance-interval", type=int, default=0, help="--ep: steps between EPLB placements (0: never)")
    s.add_argument("--ep-nodes", type=int, default=1, help="--ep: nodes of the group (EPLB's hierarchical policy)")
    s.add_argument("--two-batch-overlap", action="store_true", help="--ep: two overlapping micro-batches per step")
    s.add_argument("--role", choices=["prefill", "decode", "router"], default=None, help="prefill/decode "
                   "disaggregation: a worker (listening on --pd-listen) or the HTTP router in front of workers")
    s.add_argument("--pd-listen", default="127.0.0.1:7001", help="--role prefill|decode: HOST:PORT to listen on")
    s.add_argument("--pd-handoff", choices=["shm", "inline"], default="shm", help="--role prefill: how a prefilled "
                   "request's latents reach its decode worker: a shared-memory file (decode workers on this machine) "
                   "or inline through the router's connections (any machine)")
    s.add_argument("--prefill", default=None, help="--role router: prefill workers, HOST:PORT[,HOST:PORT]")
    s.add_argument("--decode", default=None, help="--role router: decode workers, HOST:PORT[,HOST:PORT]")
    s.add_argument("--pd-key", default=None, help="the key routers and workers share (default: $DSV3_PD_KEY, else a "
                   "per-user key in ~/.cache/dsv3/pd.key; required to listen beyond loopback)")
    s.add_argument("--log-level", default="warning", help="uvicorn's log level")


def _eval(sub) -> None:
    s = _add(sub, "eval", help="evaluate a model: multiple choice (lm-eval conventions), generate-extract-match, "
                       "code with execution, needle in a haystack")
    s.add_argument("mode", choices=["mc", "gen", "code", "needle"], help="mc: log-likelihood multiple choice; gen: "
                   "generate, extract, match (pass@k, maj@k); code: run the programs against tests in the sandbox "
                   "(pass@k); needle: retrieval over --lengths x --depths (heat map)")
    s.add_argument("--task", required=True, help="jsonl / parquet of {question, choices, answer} (mc), "
                   "{question, answer} (gen), HumanEval {prompt, test, entry_point} or {question, tests} (code) rows; "
                   "needle: a text file, the haystack's filler")
    s.add_argument("--k", type=int, default=1, help="gen, code: samples per question")
    s.add_argument("--temperature", type=float, default=0.0, help="gen, code: 0 is greedy")
    s.add_argument("--max-tokens", type=int, default=256, help="gen, code: new tokens per sample")
    s.add_argument("--match", choices=["math", "text"], default="math", help="gen: math (numeric / symbolic "
                   "equivalence, GSM8K / MATH) or text (normalised exact match, SimpleQA-style factual QA)")
    s.add_argument("--chat", action="store_true", help="gen: each question as a user turn in the tokenizer's chat "
                   "template (a post-trained chat model), stopping at EOS")
    s.add_argument("--max-num-seqs", type=int, default=64, help="local engine: sequences decoded at once")
    s.add_argument("--model", default=None, help="a training run or Hugging Face directory (local engine)")
    s.add_argument("--server", default=None, help="an OpenAI-compatible server's URL instead of --model")
    s.add_argument("--served-model-name", default="default", help="--server: the model name to ask for")
    s.add_argument("--api-key", default=os.environ.get("DSV3_API_KEY"), help="--server: bearer key (default: "
                   "$DSV3_API_KEY; the environment keeps it out of the process list)")
    s.add_argument("--overwrite", action="store_true", help="replace this task's earlier results in --out (kept "
                   "otherwise: a re-run is refused before any question is asked)")
    s.add_argument("--tokenizer", default=None, help="tokenizer.json or its directory (default: the model's)")
    s.add_argument("--fewshot", type=int, default=0, help="mc, gen: examples before each question")
    s.add_argument("--fewshot-file", default=None, help="mc, gen: the dev split few-shot examples are drawn from")
    s.add_argument("--continuation", choices=["letter", "text"], default="letter", help="mc: score the answer "
                   "letter or the choice's text")
    s.add_argument("--add-bos", choices=["auto", "yes", "no"], default="auto",
                   help="auto: as the tokenizer's add_bos_token says (lm-eval's hf backend does the same)")
    s.add_argument("--limit", type=int, default=0, help="first N questions (0: all)")
    s.add_argument("--strict", action="store_true", help="a bad task row is an error (default: skipped, "
                   "counted, named in the samples file)")
    s.add_argument("--seed", type=int, default=0, help="few-shot draws, sampling, needle placement")
    s.add_argument("--out", default="out/eval", help="results.json, samples_<task>.jsonl, results.png")
    s.add_argument("--workers", type=int, default=2, help="code: sandboxed runs at a time")
    s.add_argument("--timeout", type=float, default=5.0, help="code: seconds a run (one test input)")
    s.add_argument("--memory-mb", type=int, default=512, help="code: address-space limit a run")
    s.add_argument("--lengths", default="256,512,1024", help="needle: context lengths in tokens")
    s.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="needle: needle depths, 0 = start, 1 = end")
    s.add_argument("--cache-gib", type=float, default=1.0, help="local engine: latent-cache memory")
    s.add_argument("--device", default=None, help="local engine; default: cuda if available, else cpu")
    s.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="local engine; default: bfloat16 on "
                   "CUDA, float32 on the CPU")


def _plan(sub) -> None:
    s = _add(sub, "plan", help="memory, traffic and pipeline bubble per GPU of a parallel layout")
    s.add_argument("--config", default="v3-671b", help="preset or config.json")
    s.add_argument("--gpus", type=int, default=2048, help="GPUs in all")
    s.add_argument("--gpus-per-node", type=int, default=8, help="GPUs a node (NVLink domain)")
    s.add_argument("--gpu-memory", type=float, default=80.0, help="GiB per GPU")
    s.add_argument("--nvlink", type=float, default=160.0, help="GB/s per GPU within a node")
    s.add_argument("--ib", type=float, default=50.0, help="GB/s per GPU across nodes")
    s.add_argument("--pp", type=int, default=16, help="pipeline stages")
    s.add_argument("--ep", type=int, default=64, help="expert-parallel ranks")
    s.add_argument("--schedule", default="dualpipe", choices=["1f1b", "dualpipe", "dualpipev"], help="pipeline "
                   "schedule")
    s.add_argument("--micro-batch", type=int, default=1, help="sequences per micro-batch")
    s.add_argument("--seq-len", type=int, default=4096, help="tokens per sequence")
    s.add_argument("--micro-batches", type=int, default=120, help="per pipeline per step (V3: 15360 / dp 128)")
    s.add_argument("--moments", default="bf16", choices=["bf16", "fp32"], help="AdamW moment precision")
    s.add_argument("--mfu", type=float, default=0.40, help="model FLOPs utilisation assumed for time and cost")
    s.add_argument("--peak-tflops", type=float, default=989.0, help="per GPU (H800 dense BF16: 989)")
    s.add_argument("--price", type=float, default=2.0, help="$ per GPU-hour (the report's rental price)")
    s.add_argument("--json", action="store_true", help="print the plan as JSON")


def _bench(sub) -> None:
    s = _add(sub, "bench", help="engine throughput on random weights: decode (TTFT, TPOT, tok/s), prefill, or "
                       "serve (the HTTP server vs the engine)")
    s.add_argument("what", choices=["decode", "prefill", "serve"])
    s.add_argument("--config", default="lite", help="preset or config.json")
    s.add_argument("--batches", default="1,32", help="decode, prefill: batch sizes, comma-separated")
    s.add_argument("--prompt", type=int, default=128, help="prompt tokens per request")
    s.add_argument("--tokens", type=int, default=64, help="decode, serve: new tokens per request")
    s.add_argument("--spec", type=int, default=0, help="decode: MTP draft tokens (needs --mtp)")
    s.add_argument("--mtp", action="store_true", help="keep the config's MTP module")
    s.add_argument("--fp8", action="store_true", help="weights in the released FP8 block format (weight-only FP8 "
                   "GEMMs)")
    s.add_argument("--no-cuda-graphs", action="store_true", help="decode, serve: decode eagerly on CUDA")
    s.add_argument("--compile-decode", action="store_true", help="decode, serve: torch.compile the layers of the "
                   "graphed decode steps")
    s.add_argument("--compile-prefill", action="store_true", help="decode, prefill, serve: torch.compile the layers "
                   "of steps with prefill rows, the token dimension dynamic (EngineConfig.compile_prefill; off by "
                   "default: its GPU benefit is still being measured)")
    s.add_argument("--fused-moe", choices=["auto", "on", "off"], default="auto", help="decode, serve: routed "
                   "experts of decode batches in the fused MoE kernel (auto: on CUDA, for the batch sizes where it is "
                   "faster)")
    s.add_argument("--concurrency", type=int, default=64, help="serve: streams in flight")
    s.add_argument("--admission-delay", type=int, default=0, help="serve: EngineConfig.admission_delay of the engine "
                   "(both runs)")
    s.add_argument("--requests", type=int, default=256, help="serve: requests in all")
    s.add_argument("--url", default=None, help="serve: load an already running server instead")
    s.add_argument("--served-model-name", default="bench", help="serve --url: the model name to ask for")
    s.add_argument("--api-key", default=os.environ.get("DSV3_API_KEY"), help="serve --url: bearer key (default: "
                   "$DSV3_API_KEY)")
    s.add_argument("--vocab-size", type=int, default=1000, help="serve --url: prompt ids are drawn below this")
    s.add_argument("--cache-gib", type=float, default=4.0, help="serve: latent-cache memory")
    s.add_argument("--json", default=None, help="serve: write the results here")
    s.add_argument("--engine-thread", action="store_true", help="serve: step the engine in a thread of the server "
                   "process instead of a process of its own")
    s.add_argument("--lazy-graphs", action="store_true", help="serve: capture each decode CUDA graph at its first "
                   "step instead of all at the engines' start (as `dsv3 serve --lazy-graphs`)")
    s.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    s.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bfloat16 on CUDA, float32 on "
                   "the CPU")


SUBCOMMANDS = (_info, _demo, _convert, _tokenizer, _train, _posttrain, _export, _plot, _generate, _serve, _eval,
               _plan, _bench)


def _add(sub, name: str, **kw) -> argparse.ArgumentParser:
    return sub.add_parser(name, formatter_class=_Help, **kw)


def build_parser() -> argparse.ArgumentParser:
    """The `dsv3` parser: `command` (and `tokenizer_command`) name what to run."""
    p = argparse.ArgumentParser(prog="dsv3", description="DeepSeek-V3 in PyTorch")
    sub = p.add_subparsers(dest="command", required=True)
    for add in SUBCOMMANDS:
        add(sub)
    return p
