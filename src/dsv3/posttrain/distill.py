"""`dsv3 distill`: distillation from a stronger dsv3 model (spec 7: R1's reasoning distilled into V3 by SFT data).

1. data: the teacher (a run or HF directory) answers `distill.prompts` train-split task problems, up to
   `distill.samples` tries each; the first try that the task's verifier accepts and that follows the format is kept
   (rejection sampling), as a one-turn conversation (or `distill.train_files` are used as they are);
2. sequence mode: SFT of the student on those conversations (dsv3.posttrain.sft, the pre-training Trainer);
   logit mode: the same, with the loss (1 - w) CE + w KL(teacher || student) on the teacher's top-k logits at each
   assistant token (dsv3.posttrain.distill_loss; the teacher runs alongside the student, so both must share the
   tokenizer: checked).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch

from ..checkpoint.atomic import write_whole
from ..config import ConfigError
from ..data import Tokenizer
from ..data.chat import ChatTemplate
from ..infer import Engine, EngineConfig, SamplingParams
from ..train.config import RunConfig
from ..train.data_parallel import refuse_ranks
from ..train.device import compute_dtype, resolve_device
from ..train.losses import mtp_mean, positions
from ..train.trainer import Trainer, lm_losses, split_batch
from .base import chat_template_of, load_model, tokenizer_dir
from .config import check_length, check_paths, read_posttrain_dict, section_from_table
from .distill_loss import teacher_topk, topk_forward_kl
from .pinned import pin, resolve_pin
from .rewards import format_reward
from .sft import SAVED, build_sft, resumed_checkpoint
from .tasks import generate_tasks, verify

DATA = "distill_data.jsonl"


@torch.no_grad()
def teacher_conversations(model, tokenizer, template: ChatTemplate, tasks, samples: int, temperature: float,
                          max_new_tokens: int, seed: int) -> tuple[list[dict], dict]:
    """Step 1: rejection sampling. Returns the kept conversations and {problems, kept, tries, tokens} (tokens: prompt
    + sampled tokens of every try, what the teacher's forwards cost)."""
    prompts = [template.encode(tokenizer, [{"role": "user", "content": t.prompt}], True) for t in tasks]
    rows = len(tasks) * samples
    longest = max(map(len, prompts)) + max_new_tokens
    if longest > model.config.max_position_embeddings:      # as grpo refuses it: the cache is sized from it
        raise ConfigError(f"invalid distill config: prompts of up to {longest - max_new_tokens} tokens + "
                          f"distill.max_new_tokens={max_new_tokens} exceed the teacher's context of "
                          f"{model.config.max_position_embeddings}")
    batch = min(rows, 256)
    engine = Engine(model, tokenizer, EngineConfig(block_size=16, num_blocks=batch * -(-longest // 16) + 1,
                                                   max_num_seqs=batch, cuda_graphs=False))
    params = [SamplingParams(temperature=temperature, max_tokens=max_new_tokens, seed=seed * 100_003 + r)
              for r in range(rows)]
    outs = engine.generate([p for p in prompts for _ in range(samples)], params)
    kept = []
    for i, t in enumerate(tasks):
        for o in outs[i * samples:(i + 1) * samples]:
            if o.finish_reason == "stop" and verify(t, o.text) and format_reward(o.text):
                kept.append({"messages": [{"role": "user", "content": t.prompt},
                                          {"role": "assistant", "content": o.text}]})
                break
    tokens = sum(len(p) + len(o.token_ids) for p, o in zip((p for p in prompts for _ in range(samples)), outs))
    return kept, {"problems": len(tasks), "kept": len(kept), "tries": rows, "tokens": tokens}


class LogitKDTrainer(Trainer):
    command = "distill"
    """The SFT Trainer with the logit-distillation loss added (module docstring, step 2)."""

    def __init__(self, cfg, *, teacher, teacher_pin: dict, top_k: int, kd_weight: float, kd_temperature: float,
                 **kwargs):
        """`teacher`: distill.teacher as read (on resume the pinned one: distill_trainer), `teacher_pin` its pin."""
        super().__init__(cfg, **kwargs)
        self.pins["teacher"] = teacher_pin     # in every checkpoint
        self.teacher = teacher.to(self.device).eval().requires_grad_(False)
        self.top_k, self.kd_weight, self.kd_temperature = top_k, kd_weight, kd_temperature
        self.kd_sum, self.kd_n = 0.0, 0

    def interval_metrics(self) -> dict:
        out = {"kd_loss": self.kd_sum / self.kd_n} if self.kd_n else {}
        self.kd_sum, self.kd_n = 0.0, 0
        return out

    def _forward_backward(self, n_micro: int, lam: float, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
        cfg, dev, w = self.cfg, self.device, self.kd_weight
        loads = torch.zeros(len(self.layers), cfg.model.n_routed_experts, dtype=torch.int64, device=dev)
        sums = torch.zeros(4, dtype=torch.float64, device=dev)
        batches = [split_batch(self.loader.next_batch(cfg.train.micro_batch_size)) for _ in range(n_micro)]
        for (window, targets), weight in zip(batches, self._token_weights(batches)):   # the step's token mean
            self.step_tokens += positions(window)
            window, targets = window.to(dev), targets.to(dev)
            for _, m in self.layers:
                m.tokens_per_expert.zero_()
                m.keep_routing = False
            self._new_graph_step()
            with self.autocast():
                main, mtp, logits, _ = lm_losses(self.model, window, self.ce, targets)
                with torch.no_grad():
                    values, ids = teacher_topk(self.teacher(window[:, :-1]), self.top_k)
                kd = topk_forward_kl(logits, values, ids, targets != -100, self.kd_temperature)
                w_main, w_mtp = weight          # each term at its step-wide token mean (losses.token_weights)
                main, kd = main * w_main, kd * w_main
                mtp_loss = mtp_mean([ce * wk for ce, wk in zip(mtp, w_mtp)], main)
                loss = (1 - w) * main + w * kd + lam * mtp_loss
            loss.backward()
            if self.layers:
                loads += torch.stack([m.tokens_per_expert for _, m in self.layers])
            sums += torch.stack([loss, main, mtp_loss, kd]).detach().double()
        self.kd_sum, self.kd_n = self.kd_sum + sums[3].item(), self.kd_n + 1     # the step's token mean, per step
        sums[3] = 0.0                     # the aux-loss slot: no balance loss here (kd is logged as kd_loss)
        return loads, sums


def distill_trainer(config, overrides: list[str], resume: bool | str = False, overwrite: bool = False,
                    progress: bool | None = None, run_dir: str | None = None):
    """(Trainer, lines) for a run file with a [distill] table (module docstring)."""
    from ..train.run_dir import check_start
    d = read_posttrain_dict("distill", config, overrides, resume, run_dir)
    s = section_from_table("distill", d["distill"])
    check_paths("distill", s)
    check_length("distill", d, s.epochs)
    if s.samples > 1 and s.temperature == 0:
        raise ConfigError(f"invalid distill config: distill.samples={s.samples} tries at distill.temperature=0 are "
                          f"the same greedy answer; sample (temperature > 0) or set distill.samples=1")
    if not s.teacher:
        raise ConfigError("invalid distill config: distill.teacher is required (a run directory or a HF directory)")
    # validated (one line naming run_dir) before the teacher samples into it: run_dir="" would be the cwd
    out = Path(RunConfig.from_dict({k: d[k] for k in ("run_dir",) if k in d}).run_dir)
    check_start(out, resume, overwrite)           # before the teacher spends any time
    if resume and not s.train_files and (out / DATA).exists():
        _check_data_keys(out, s)
    if s.mode == "logit":
        refuse_ranks("distill")                   # LogitKDTrainer's step: one process (before the teacher loads)
    device, dtype = teacher_placement(d)
    make_data = not s.train_files and not (resume and (out / DATA).exists())
    resumed = resumed_checkpoint(d, resume)
    # the student's base pinned as SFT's is (build_sft), checked before the teacher loads
    resolved_base = resolve_pin(resumed, "base", "distill.init", s.init, "base model")
    if s.mode == "logit" or make_data:           # else the teacher's work is done (or none): not read at all
        # on resume the teacher the run started with, pinned in its checkpoints (logit mode; dsv3.posttrain.pinned):
        # a run directory's checkpoint of then, not its latest (the teacher's run may have trained on), a Hugging
        # Face directory as it was (refused if rewritten since); else what distill.teacher holds now
        pinned, step = resolve_pin(resumed, "teacher", "distill.teacher", s.teacher, "teacher")
        teacher, teacher_checkpoint = load_model(s.teacher, dtype=dtype, device=device, step=step)
        teacher_pin = pin(s.teacher, teacher_checkpoint, pinned) if s.mode == "logit" else None   # KD's only
    if s.mode == "logit":         # before the teacher spends any time: logits are compared id by id
        _check_logit_pair(s, teacher.config.vocab_size)
    lines, files = [], list(s.train_files)
    if not files:
        files = [str(out / DATA)]
        if make_data:
            tok = Tokenizer.load(tokenizer_dir(s.teacher))
            tasks = generate_tasks(s.task, "train", s.prompts, s.seed,
                                   **({"digits": s.digits, "ops": s.ops} if s.task == "arithmetic" else {}))
            kept, stats = teacher_conversations(teacher, tok, ChatTemplate(chat_template_of(tokenizer_dir(s.teacher))),
                                                tasks, s.samples, s.temperature, s.max_new_tokens, s.seed)
            lines.append(f"teacher {s.teacher}: kept {stats['kept']} of {stats['problems']} problems "
                         f"({stats['tries']} tries)")
            if not kept:                # before the file: an empty one a --resume would take as the finished data
                raise ValueError(f"{lines[-1]}: no training conversations (no answer was verified and "
                                 f"well-formatted, <think>...</think><answer>...</answer>); use a stronger "
                                 f"teacher, more distill.samples, or distill.train_files")
            out.mkdir(parents=True, exist_ok=True)
            write_whole(out / DATA, "".join(json.dumps(r) + "\n" for r in kept))   # resume reads it as done
    sft = {k: v for k, v in d.items() if k != "distill"}
    sft["sft"] = {"init": s.init, "ema": s.ema, "train_files": files, "eval_fraction": s.eval_fraction,
                  "epochs": s.epochs, "seed": s.seed}
    make = None
    if s.mode == "logit":
        make = functools.partial(LogitKDTrainer, teacher=teacher, teacher_pin=teacher_pin, top_k=s.top_k,
                                 kd_weight=s.kd_weight, kd_temperature=s.kd_temperature)
    trainer, more = build_sft(sft, resume, overwrite, progress, saved=d, make_trainer=make, init_key="distill.init",
                              resumed=resumed, resolved_base=resolved_base)
    for line in lines:
        trainer.logger.log_event(0, line)
    return trainer, lines + more


# what the teacher's conversations were made with: a resume reuses them (distill_data.jsonl), so a change of one
# of these would be ignored, while posttrain.json, rewritten, would say it applied
DATA_KEYS = ("task", "digits", "ops", "prompts", "samples", "temperature", "max_new_tokens", "seed")


def _check_data_keys(out: Path, s) -> None:
    """--resume on the run's own distill_data.jsonl: refuse (one line, before the teacher loads) a change of what
    made it. A posttrain.json that cannot be read (an older or hand-edited run) is not compared."""
    try:
        was = section_from_table("distill", json.loads((out / SAVED).read_text())["distill"])
    except (OSError, ValueError, KeyError, TypeError):
        return
    changed = [f"distill.{k}={getattr(was, k)!r} -> {getattr(s, k)!r}" for k in DATA_KEYS
               if getattr(was, k) != getattr(s, k)]
    if changed:
        raise ConfigError(f"--resume cannot change {', '.join(changed)}: the run trains on {out / DATA}, the "
                          f"teacher's conversations made with the run's values; start a new run for new data")


def teacher_placement(d: dict) -> tuple[torch.device, torch.dtype]:
    """Where the frozen teacher lives: the student's device (train.device; under torchrun this rank's GPU), so that
    the rejection sampling runs there and not on the host, in the step's compute dtype (bf16 on CUDA: half the
    memory of fp32, and what autocast computes in anyway)."""
    train = RunConfig.from_dict({"train": d.get("train", {})}).train       # validated: one line naming the key
    device = resolve_device(train.device)                                  # the Trainer's, this rank's GPU
    return device, compute_dtype(train.dtype, device)


def _model_vocab(path: str | Path) -> int | None:
    """vocab_size from a HF directory's config.json or a run directory's (its [model] table); None if unknown."""
    f = Path(path) / "config.json"
    try:
        d = json.loads(f.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    d = d["model"] if isinstance(d.get("model"), dict) else d
    return d.get("vocab_size") if isinstance(d.get("vocab_size"), int) else None


def _check_logit_pair(s, teacher_vocab: int) -> None:
    """Logit mode compares the teacher's and the student's logits id by id: one tokenizer, one vocabulary size."""
    if (tokenizer_dir(s.init) / "tokenizer.json").read_text() != \
            (tokenizer_dir(s.teacher) / "tokenizer.json").read_text():
        raise ConfigError("distill.mode='logit' needs the teacher's tokenizer on the student (logits are compared "
                          "id by id); use mode='sequence'")
    if s.top_k > teacher_vocab:
        raise ConfigError(f"invalid distill config: distill.top_k={s.top_k} must be at most the teacher's vocab_size "
                          f"({teacher_vocab})")
    student_vocab = _model_vocab(s.init)
    if student_vocab is not None and student_vocab != teacher_vocab:
        raise ConfigError(f"distill.mode='logit': the teacher's vocab_size {teacher_vocab} != the student's "
                          f"{student_vocab} (distill.teacher / distill.init); use mode='sequence'")

