"""`dsv3 grpo`: Group Relative Policy Optimization (spec 7; DeepSeekMath arXiv 2402.03300) with the Dr. GRPO and DAPO
switches, on the pre-training Trainer (checkpoints, exact resume, export, metrics, progress bar, signals, NaN stop):
`GRPOTrainer` replaces only the forward/backward of a step.

One optimizer step:
1. every `grpo.updates_per_batch` steps (mu), rollouts: `grpo.prompts_per_step` prompts x G responses sampled by
   the Engine on the policy's own weights, rewarded, group-normalised advantages, loss mask (dsv3.posttrain.rollout);
2. per micro-batch of rows: the policy's per-token log-probs (and entropy) at the sampling temperature, the frozen
   reference's when grpo.beta > 0 (beta = 0 builds no reference), the clipped loss (dsv3.posttrain.grpo_loss),
   scaled so that the micro-batches sum to the whole batch's token (or sequence) mean, backward;
3. the Trainer clips, steps AdamW, updates the routing biases from the training forwards' expert loads.
Logged with each train record: reward, correctness, format, KL, clip fraction, entropy, response length, the share
of zero-std groups, truncation, the engine-vs-trainer log-prob gap (temperature 1, first update of a batch),
rollout vs train seconds, and tokens_rollout (prompt + sampled tokens of a step's rollouts: its compute).

Resume is exact wherever the run stopped: a checkpoint taken in the middle of a batch of rollouts (mu > 1, a
checkpoint.interval that is not a multiple of mu, or SIGINT) holds that batch and how many updates used it, so the
resumed run trains its remaining updates on the same rollouts (`rollout.batch_state`).

The loss of a policy-gradient step is no quality signal (it is ~0 by construction at ratio 1), so the Trainer's spike
watch is off here; non-finite losses and gradients still stop the run.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from pathlib import Path

import torch

from ..checkpoint.atomic import write_whole
from ..config import ConfigError
from ..infer import Engine, EngineConfig
from ..train.hf_shards import load_hf_owned
from ..train.run_dir import POSTTRAIN_CONFIG
from ..train.losses import positions
from ..train.trainer import Trainer, build_model
from ..verify.sandbox import self_check
from .base import load_base
from .config import check_paths, read_posttrain_dict, section_from_table, split_config
from .grpo_loss import policy_loss, sequence_logprobs
from .pinned import pin, resolve_pin
from .rollout import PromptSource, Rollouts, batch_from_state, batch_state, sample_groups
from .sft import resumed_checkpoint
from .tasks import generate_tasks, read_code_tasks

SAVED = POSTTRAIN_CONFIG
TASK_ARGS = {"arithmetic": lambda c: {"digits": c.digits, "ops": c.ops}, "countdown": lambda c: {}}


class GRPOTrainer(Trainer):
    command = "grpo"
    def __init__(self, cfg, section, base, resume: bool | str = False, overwrite: bool = False,
                 progress: bool | None = None, reward_model=None, reference_pin: dict | None = None):
        """`base`: grpo.init as read (on resume the pinned checkpoint: grpo_trainer); `reference_pin`: its pin for
        the checkpoints (default: pin(grpo.init, base.checkpoint))."""
        from ..data.chat import ChatTemplate
        self.section, self.reward_model = section, reward_model
        if section.task == "code":
            tasks = read_code_tasks(section.task_file)
            self_check(timeout_s=section.code_timeout_s, memory_mb=section.code_memory_mb)  # not 0 for every sample
        else:
            tasks = generate_tasks(section.task, "train", section.train_prompts, section.seed,
                                   **TASK_ARGS[section.task](section))
        source = PromptSource(base.tokenizer, ChatTemplate(base.template), tasks, section.seed)
        longest = max(map(len, source.prompt_ids)) + section.max_new_tokens
        if longest > base.model_config.max_position_embeddings:
            raise ConfigError(f"invalid grpo config: prompts of up to {longest - section.max_new_tokens} tokens + "
                              f"grpo.max_new_tokens={section.max_new_tokens} exceed the model's context of "
                              f"{base.model_config.max_position_embeddings}")
        super().__init__(cfg, resume=resume, progress=progress, overwrite=overwrite, source=source,
                         init_state=base.weights)
        rows, block = section.prompts_per_step * section.group_size, 16
        self.engine = Engine(self.model, base.tokenizer, EngineConfig(
            block_size=block, num_blocks=rows * -(-longest // block) + 1, max_num_seqs=rows,
            max_num_batched_tokens=max(2048, rows), cuda_graphs=False))
        self.reference = None
        self.base_checkpoint = base.checkpoint
        if section.beta > 0:       # the frozen starting policy; beta = 0 loads none
            self.pins["reference"] = reference_pin or pin(section.init, base.checkpoint)
            # built as the policy is (build_model): its parameter dtype (bf16 with train.dtype=bf16-params, so the
            # KL starts at 0 and the copy takes half the memory), on the device; a Hugging Face base is read from
            # its files tensor by tensor (hf_shards), never whole in fp32 on the host (64 GB for a 16B model)
            self.reference = build_model(cfg, self.device)
            if base.state is None:
                load_hf_owned([self.reference], base.path, cfg.model)
            else:
                self.reference.load_state_dict(base.state)
            self.reference.eval().requires_grad_(False)
        self.rollouts: Rollouts | None = None
        self.uses = 0
        if self.loader.resumed_batch is not None:         # stopped mid-batch: its remaining updates use it
            self.rollouts, self.uses = batch_from_state(self.loader.resumed_batch)
        self.acc: dict[str, float] = defaultdict(float)            # seconds: rollout_s, train_s
        self.acc_rollout: dict[str, float] = defaultdict(float)    # of the batch each update used (Rollouts.stats)
        self.acc_update: dict[str, float] = defaultdict(float)     # per update (policy_loss stats)

    def _snapshot(self) -> dict:
        """The Trainer's checkpoint state (with the KL reference's pin: grpo_trainer), plus the batch of rollouts
        while updates remain on it (module docstring)."""
        snap = super()._snapshot()
        if self.rollouts is not None and self.uses < self.section.updates_per_batch:
            snap["state"]["loader"] = {**snap["state"]["loader"], "batch": batch_state(self.rollouts, self.uses)}
        return snap

    def _watch_for_spikes(self, total: float, grad_norm: float) -> None:
        self.spiking = False          # module docstring: no spike watch on a policy-gradient loss

    def interval_metrics(self) -> dict:
        """Statistics of the interval's updates (and of the rollouts they trained on) averaged, seconds summed."""
        out = {}
        for acc in (self.acc_rollout, self.acc_update):
            n = acc.pop("n", 0)
            out.update({k: v / n for k, v in acc.items()} if n else {})
            acc.clear()
        out.update({"rollout_s": 0.0, "train_s": 0.0, **self.acc})
        self.acc.clear()
        return out

    def _rollout(self) -> Rollouts:
        s, t0 = self.section, time.perf_counter()
        self.model.eval()
        for _, m in self.layers:
            m.keep_routing = False
        picks = self.loader.next_prompts(s.prompts_per_step)
        ro = sample_groups(self.engine, self.loader, picks, s, self.step, self.reward_model)
        if s.updates_per_batch > 1:        # mu > 1: the ratio is against the rollout policy, frozen here
            with torch.no_grad(), self.autocast():
                ro.logp_old = sequence_logprobs(self.model, ro.ids.to(self.device), ro.response.to(self.device),
                                                s.temperature).float()
        self.acc["rollout_s"] += time.perf_counter() - t0
        return ro

    def _forward_backward(self, n_micro: int, lam: float, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.section
        if self.rollouts is None or self.uses == s.updates_per_batch:
            self.rollouts, self.uses = self._rollout(), 0
        for k, v in self.rollouts.stats.items():      # the batch this update trains on (mu > 1: reused)
            self.acc_rollout[k] += v
        self.acc_rollout["n"] += 1
        self.uses += 1
        ro, t0 = self.rollouts, time.perf_counter()
        self.model.train()
        dev, N = self.device, ro.ids.shape[0]
        self.step_tokens += positions(ro.ids)        # the rollouts' prompt + response positions (padded)
        rows = N // n_micro
        # the whole batch's normaliser: tokens (DAPO's token mean) or sequences with a loss token (GRPO's 1/G sum)
        total = ro.mask.sum() if s.aggregation == "token" else ro.mask.any(1).sum()
        loads = torch.zeros(len(self.layers), self.cfg.model.n_routed_experts, dtype=torch.int64, device=dev)
        loss_sum, stats = 0.0, defaultdict(float)
        for k in range(0, N, rows):
            sl = slice(k, k + rows)
            ids, resp, mask = ro.ids[sl].to(dev), ro.response[sl].to(dev), ro.mask[sl].to(dev)
            for _, m in self.layers:
                m.tokens_per_expert.zero_()
            with self.autocast():
                logp, ent = sequence_logprobs(self.model, ids, resp, s.temperature, with_entropy=True)
                ref = None
                if self.reference is not None:
                    with torch.no_grad():
                        ref = sequence_logprobs(self.reference, ids, resp, s.temperature)
                old = ro.logp_old[sl].to(dev) if ro.logp_old is not None else logp.detach()
                loss, st = policy_loss(logp, old, ro.advantages[sl].to(dev), mask, ref, eps_low=s.eps_low,
                                       eps_high=s.eps_high, beta=s.beta, kl_estimator=s.kl_estimator,
                                       aggregation=s.aggregation, entropy=ent)
            part = (mask.sum() if s.aggregation == "token" else mask.any(1).sum()) / total.clamp(min=1)
            (loss * part).backward()
            loss_sum += (loss * part).item()
            if self.layers:
                loads += torch.stack([m.tokens_per_expert for _, m in self.layers])
            for name, v in st.items():
                stats[name] += v.item() * part.item()
            if s.temperature == 1.0 and self.uses == 1:     # the engine sampled from the trainer's distribution
                gap = ((logp.detach() - ro.engine_logp[sl].to(dev)).abs() * resp).max().item()
                stats["engine_logprob_gap"] = max(stats["engine_logprob_gap"], gap)
        for name, v in stats.items():
            self.acc_update[name] += v
        self.acc_update["n"] += 1
        self.acc["train_s"] += time.perf_counter() - t0
        sums = torch.tensor([loss_sum, loss_sum, 0.0, 0.0], dtype=torch.float64, device=dev)
        return loads, sums


def grpo_trainer(config, overrides: list[str], resume: bool | str = False, overwrite: bool = False,
                 progress: bool | None = None, run_dir: str | None = None, reward_model=None) -> GRPOTrainer:
    """A GRPOTrainer for a run file (a [grpo] table + run sections); with `resume` and no file, the run directory's
    saved posttrain.json. train.batch_size is prompts_per_step x group_size (one step's rows; another value is an
    error)."""
    d = read_posttrain_dict("grpo", config, overrides, resume, run_dir)
    section = section_from_table("grpo", d["grpo"])
    check_paths("grpo", section)
    if "model" in d:
        raise ConfigError("invalid grpo config: [model] comes from grpo.init; remove it")
    if d.get("train", {}).get("cuda_graphs") is True:     # (another value: the field's own type error, later)
        # the rollouts run the policy's blocks at every batch and length the engine forms: a graph recorded for each
        raise ConfigError("invalid grpo config: train.cuda_graphs is for dsv3 train and distill, not GRPO's rollouts")
    if resume:
        _check_reference_keys(Path(d.get("run_dir", "runs/run")), section)
    # the KL reference (and the policy's model config, tokenizer, chat template): on resume the one pinned in the
    # run's checkpoint (grpo.init's checkpoint of the start, not that run's latest, which may have moved on since;
    # a Hugging Face grpo.init as it was, refused if rewritten since), else what grpo.init holds now. beta = 0
    # pins none (no reference): grpo.init as it is now
    resumed = resumed_checkpoint(d, resume) if section.beta > 0 else None
    pinned, step = resolve_pin(resumed, "reference", "grpo.init", section.init, "KL reference (the starting policy)")
    base = load_base(section.init, section.ema, step=step)
    # before a Hugging Face base's weights are read: what it was then
    reference_pin = pin(section.init, base.checkpoint, pinned) if section.beta > 0 else None
    rows = section.prompts_per_step * section.group_size
    given = d.get("train", {}).get("batch_size")
    if given is not None and given != rows:          # set from the [grpo] table: a different value would be ignored
        raise ConfigError(f"invalid grpo config: train.batch_size={given!r}: a GRPO step's batch is "
                          f"grpo.prompts_per_step x grpo.group_size = {rows} rollouts; remove train.batch_size")
    # default: the largest divisor of the step's rows up to 8 (a batch of 9 rows is 3 micro-batches of 3)
    micro = d.get("train", {}).get("micro_batch_size", max(m for m in range(1, min(rows, 8) + 1) if rows % m == 0))
    _, cfg = split_config("grpo", d, base.model_config.to_dict(),
                          train={"batch_size": rows, "batch_size_start": 0, "micro_batch_size": micro})
    trainer = GRPOTrainer(cfg, section, base, resume, overwrite, progress, reward_model, reference_pin)
    if trainer.layout.is_main:
        write_whole(trainer.run_dir / SAVED, json.dumps(d, indent=1))
    return trainer


def _check_reference_keys(run_dir: Path, section) -> None:
    """--resume: refuse (one line, before a model loads) a change of grpo.init or grpo.ema, the KL reference (and the
    tokenizer) the run started from. A posttrain.json that cannot be read (an older or hand-edited run) is not
    compared."""
    try:
        was = section_from_table("grpo", json.loads((run_dir / SAVED).read_text())["grpo"])
    except (OSError, ValueError, KeyError, TypeError):
        return
    same_init = Path(was.init).resolve() == Path(section.init).resolve()
    changed = [f"grpo.{k}={getattr(was, k)!r} -> {getattr(section, k)!r}" for k, same in
               (("init", same_init), ("ema", was.ema == section.ema)) if not same]
    if changed:
        raise ConfigError(f"--resume cannot change {', '.join(changed)}: the run's KL reference is the policy it "
                          f"started from; start a new run to start from another")
