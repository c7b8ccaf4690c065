"""RunConfig: everything a training run needs, one dataclass per TOML section, read from a file and overridden
from the command line as `section.key=value` (the value is parsed as TOML: `train.steps=200`,
`data.sources=["stdlib", "notes/"]`, `train.recompute=true`).

Every field carries a rule (its type and range, or its choices) beside its default, and RunConfig checks them all
when it is built, i.e. when a run file or config.json is read and overridden, before a directory is created or any
work is done: a wrong value is one line naming `section.key`, the value and what is allowed. Integers are integers
(`train.steps=1.5` and `train.batch_size=4.0` are errors); a real field takes an integer and stores it as a float.
Relations between fields (multiples, orderings, the layout) are checked after the fields, in `__post_init__`.

Schedule positions are fractions of the run, so the V3 recipe (spec 3) scales to any length: the report's
14.8T-token run switches at 10T (0.676), 14.3T (0.966) and 14.633T (0.989), warms up for 2K of ~235K steps and
ramps the batch over its first 469B tokens (0.032).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import ConfigError, ModelConfig, did_you_mean, model_config_from_table
# the rules of a field (what one section.key accepts); re-exported: posttrain's config and the tests take them here
from .settings import FRACTION, SEED, Flag, Int, Invalid, Items, OneOf, Real, Text, check_fields, setting  # noqa: F401

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib


# ---- the sections ---------------------------------------------------------------------------------------------------
@dataclass
class DataConfig:
    # "stdlib", files, directories or globs
    sources: list = setting(["stdlib"], Items(Text("'stdlib', a file, a directory or a glob")))
    # an existing tokenizer.json (or its directory); "" trains one on the sources
    tokenizer: str = setting("", Text("a tokenizer.json or its directory; '' trains one", nonempty=False))
    # of the trained tokenizer; 0 = model.vocab_size (a smaller one leaves ids unused)
    vocab_size: int = setting(0, Int(0))
    # tokenizers and token shards are cached here, keyed by the sources' content, vocab and seed
    cache_dir: str = setting("out/data", Text("a directory"))
    seq_len: int = setting(256, Int(2))
    val_fraction: float = setting(0.01, Real(0, 1, hi_open=True))
    fim_rate: float = setting(0.1, FRACTION)      # PSM fill-in-the-middle on code documents (TR 4.1)
    seed: int = setting(0, SEED)


@dataclass
class OptimConfig:
    lr: float = setting(2.2e-4, Real(0, lo_open=True))           # peak (TR 4.2)
    betas: list = setting([0.9, 0.95], Items(Real(0, 1, hi_open=True), n=2))
    eps: float = setting(1e-8, Real(0, lo_open=True))
    weight_decay: float = setting(0.1, Real(0))
    grad_clip: float = setting(1.0, Real(0, lo_open=True))       # the global gradient norm is clipped to this
    warmup: float = setting(0.0085, FRACTION)       # linear warm-up: 2K of ~235K steps
    constant_until: float = setting(0.676, FRACTION)
    decay_until: float = setting(0.966, FRACTION)   # cosine from lr to min_lr_ratio * lr
    min_lr_ratio: float = setting(0.1, FRACTION)    # 2.2e-5 / 2.2e-4
    final_at: float = setting(0.989, FRACTION)      # then final_lr_ratio * lr for the rest
    final_lr_ratio: float = setting(0.0332, FRACTION)   # 7.3e-6 / 2.2e-4
    # AdamW moments: fp32, or bf16 as DeepSeek-V3 (TR 3.3.3; with BF16 weights it keeps FP32 master weights too)
    state_dtype: str = setting("fp32", OneOf(("fp32", "bf16")))
    # the FP32 master of BF16 weights under state_dtype = bf16: a copy of its own (fp32, 4 B per parameter) or split,
    # the weight its high half and 2 B per parameter its low half (the same value; dsv3.train.adamw_bf16)
    master: str = setting("fp32", OneOf(("fp32", "split")))


@dataclass
class BalanceConfig:
    bias_update_speed: float = setting(0.001, Real(0))     # gamma (TR 4.2)
    bias_freeze_at: float = setting(0.966, FRACTION)       # gamma = 0 for the last 500B of 14.8T tokens
    seq_aux_alpha: float = setting(1e-4, Real(0))          # complementary sequence-wise balance loss (spec 1.7)


@dataclass
class MTPConfig:
    weight: float = setting(0.3, Real(0))          # lambda (TR 4.2)
    final_weight: float = setting(0.1, Real(0))
    switch_at: float = setting(0.676, FRACTION)    # 10T of 14.8T tokens


@dataclass
class TrainConfig:
    steps: int = setting(1000, Int(1))
    batch_size: int = setting(32, Int(1))          # sequences per optimizer step once the ramp is done
    batch_size_start: int = setting(0, Int(0))     # first step's batch; 0 = no ramp (V3: 3072 -> 15360 sequences)
    batch_ramp: float = setting(0.032, FRACTION)   # fraction of the run the ramp takes
    micro_batch_size: int = setting(8, Int(1))     # sequences per forward; batch sizes are multiples of it
    device: str = setting("auto", OneOf(("auto", "cpu", "cuda"), r"cuda:\d+", "'cuda:N'"))
    # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16: autocast over fp32 master weights and AdamW state |
    # bf16-params: weights, gradients and AdamW state all bf16 (the HF peer's setup; fastest, but small late
    # updates round away)
    dtype: str = setting("auto", OneOf(("auto", "fp32", "bf16", "bf16-params")))
    # recompute RMSNorm, MLA up-projections and SwiGLU in backward (TR 3.2.3)
    recompute: bool = setting(False, Flag())
    # > 0 keeps an EMA of the parameters on the CPU (TR 3.2.3)
    ema_decay: float = setting(0.0, Real(0, 1, hi_open=True))
    # GEMM precision of the MLA projections, dense FFNs and experts: bf16 (as `dtype`), or fp8 (E4M3, 1x128 activation
    # tiles, 128x128 weight blocks, FP32 accumulation: TR 3.3, dsv3.fp8.training)
    precision: str = setting("bf16", OneOf(("bf16", "fp8")))
    # with precision=fp8, the routed experts' scaling: block (the report's, as above) or row (one scale per token and
    # per weight row through torch._scaled_grouped_mm on sm_90: faster, coarser; dsv3.kernels.fp8_rowwise) or
    # row-fp8-wgrad (row, and the experts' weight gradients in FP8 too: dsv3.kernels.fp8_grouped_wgrad; slower than
    # row at lite's widths on an H100, 0.95x the step: the operands' column quantisation costs more than the FP8 GEMM
    # saves, benchmarks/RESULTS.md thirtieth session)
    fp8_experts: str = setting("block", OneOf(("block", "row", "row-fp8-wgrad")))
    # with precision=fp8: the MLA projections and dense / shared FFNs in FP8 too (the report's recipe); false runs
    # only the routed experts in FP8
    fp8_linears: bool = setting(True, Flag())
    # with precision=fp8 and several micro-batches per step: the weights' FP8 operands cached once per step for
    # both GEMMs that read them, or for the input gradient only ("backward": half the memory, each forward
    # quantises W again; dsv3.fp8.weight_cache)
    fp8_weight_cache: str = setting("both", OneOf(("both", "backward")))
    compile: bool = setting(False, Flag())             # torch.compile each block and the loss
    # with compile: the blocks' forward and backward replayed as CUDA graphs (torch.compile's "reduce-overhead": no
    # launch gaps between their kernels). Pays where kernels are small: small-gpu (2 x 16 x 512 tokens a step) on an
    # H100 48.1 vs 89.9 ms a step (1.87x), per-step losses equal to compiled eager's over 16 steps; lite-8L's full
    # recipe 170.1 vs 170.9 ms (no gain: its idle time is not between the blocks' kernels). benchmarks/RESULTS.md,
    # thirty-first and thirty-second sessions
    cuda_graphs: bool = setting(False, Flag())
    # one compiled kernel set for clipping + AdamW instead of fused (CUDA) / foreach (CPU) AdamW
    compile_optimizer: bool = setting(False, Flag())
    seed: int = setting(0, SEED)
    # start from this model's weights (not a resume: fresh optimizer, schedule and data position): a run directory,
    # one of its checkpoints or a Hugging Face directory; e.g. a long-context extension phase (dsv3.train.init_from)
    init_from: str = setting("", Text("a run, checkpoint or Hugging Face directory; '' starts from random weights",
                                      nonempty=False))
    # a step whose loss exceeds this multiple of the running loss is a spike: counted, and no checkpoint is written
    # until the loss is back under it (a blow-up is never saved as the run's latest state)
    spike_ratio: float = setting(1.5, Real(1, lo_open=True))


@dataclass
class LogConfig:
    interval: int = setting(10, Int(1))            # steps per train record
    val_interval: int = setting(100, Int(0))       # 0: no validation
    val_batches: int = setting(8, Int(0))          # 0: no validation
    tensorboard: bool = setting(True, Flag())
    progress: bool = setting(True, Flag())


@dataclass
class CheckpointConfig:
    interval: int = setting(500, Int(0))           # 0: only at the end (and on SIGINT / SIGTERM)
    keep: int = setting(2, Int(0))                 # most recent checkpoints kept (0 keeps all)
    # auto: the single-file format in one process, the sharded one (torch.distributed.checkpoint, every rank
    # writing its own rows; dsv3.train.checkpoint.save_sharded) under torchrun; sharded: also in one process.
    # Either loads in any layout
    format: str = setting("auto", OneOf(("auto", "sharded")))
    # sharded checkpoints only: a save returns once the tensors are copied to CPU memory, the shards written by a
    # background thread (torch.distributed.checkpoint.async_save, over a gloo group of its own) while training goes
    # on; committed (manifest, rename, `keep` pruning) at the next save, the final one or a signal's. In one process
    # it needs format = "sharded" (refused with "auto", whose single files are written synchronously)
    async_save: bool = setting(False, Flag())


@dataclass
class ParallelConfig:
    """The torchrun layout of `dsv3 train`: world = pp * dp * ep ranks, dp = WORLD_SIZE // (pp * ep) implied.
    ep > 1 shards the routed experts over groups of ep ranks (dsv3.parallel.parallelize); everything else is
    replicated and data-parallel (dsv3.train.data_parallel).
    pp > 1 pipelines the model with DualPipeV (dsv3.train.pipeline_step, dsv3.parallel.pipeline): 2 * pp chunks of
    >= 1 decoder layer, rank (p, d, e) holding chunks p and 2pp-1-p; each pipeline position is a (dp, ep) layout of
    its own. overlap runs DualPipeV's paired forward and backward concurrently (dsv3.parallel.overlap); with pp == 1 it
    is a no-op, so a PP run's checkpoint resumes in one process with parallel.pp=1 alone.
    fsdp shards parameters, gradients and optimizer state (ZeRO-3 through FSDP2: experts over their dp column, the
    rest over the pipeline position's ranks), with any ep and pp (not with overlap). In one process (world 1) it is
    a no-op, so a FSDP run's checkpoints resume in one plain process as configured. Not with
    train.compile_optimizer. zero1 shards only the optimizer state over the replicas of each parameter
    (dsv3.parallel.zero), parameters staying replicated; not with fsdp, a no-op in one process."""
    # expert-parallel degree: must divide the world size and model.n_routed_experts
    ep: int = setting(1, Int(1))
    # shard everything with FSDP2 instead of replicating the non-expert parameters
    fsdp: bool = setting(False, Flag())
    # ZeRO-1: shard the optimizer state of the replicated parameters over their replicas (dsv3.parallel.zero)
    zero1: bool = setting(False, Flag())
    # pipeline-parallel degree (DualPipeV): needs model.num_hidden_layers >= 2 * pp
    pp: int = setting(1, Int(1))
    overlap: bool = setting(False, Flag())         # DualPipe's forward/backward overlap (pp > 1)
    # how EP rows travel: "flat" (one all-to-all over the EP group, a row per (token, expert)) or "two_hop" (across
    # nodes once per (token, node), then inside the node: dsv3.parallel.two_hop); nothing to do with ep == 1
    ep_dispatch: str = setting("flat", OneOf(("flat", "two_hop")))
    # the ranks of one node, for ep_dispatch = "two_hop" (0: torchrun's LOCAL_WORLD_SIZE)
    ranks_per_node: int = setting(0, Int(0))
    # the rows sent to the experts, and in the backward the gradients sent back to them, in FP8 (E4M3 + 1x128
    # power-of-2 scales; the combine stays BF16: spec 4, dsv3.parallel.fp8_comm); a no-op with ep == 1
    fp8_dispatch: bool = setting(False, Flag())
    # how long a collective waits for the other ranks before this rank gives up with an error naming this key
    # (init_process_group's timeout, set on every process group of the job). A rank that hung or died then stops
    # the job within this time instead of leaving the others waiting (gloo's default is 30 min, NCCL's 10). 30, not
    # torchtitan's 5 min (init) / 100 s (steps): here the other ranks wait while rank 0 alone builds the token cache,
    # verifies the checkpoint a --resume takes (sha256 of every file) and commits each save; raise it for a corpus
    # or checkpoint whose rank-0 phase takes longer (a fraction of a minute is allowed, for tests)
    # (at most ~2 years: timedelta overflows past ~1e12 minutes, a traceback before any check)
    timeout_minutes: float = setting(30.0, Real(0, 1e6, lo_open=True))


SECTIONS = {"data": DataConfig, "optim": OptimConfig, "balance": BalanceConfig, "mtp": MTPConfig,
            "train": TrainConfig, "log": LogConfig, "checkpoint": CheckpointConfig, "parallel": ParallelConfig}
RUN_DIR = Text("the run's directory")


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=lambda: model_config_from_table({"preset": "tiny"}))
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    balance: BalanceConfig = field(default_factory=BalanceConfig)
    mtp: MTPConfig = field(default_factory=MTPConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    run_dir: str = "runs/run"

    def __post_init__(self) -> None:
        for name in SECTIONS:
            check_fields(name, getattr(self, name))
        try:
            RUN_DIR.clean(self.run_dir)
        except Invalid:
            raise ConfigError(f"invalid run config: run_dir={self.run_dir!r}: must be {RUN_DIR.allowed}") from None
        t = self.train
        for name in ("batch_size", "batch_size_start"):
            if getattr(t, name) % t.micro_batch_size:
                raise ConfigError(f"invalid run config: train.{name}={getattr(t, name)} is not a multiple of "
                                  f"train.micro_batch_size={t.micro_batch_size}")
        if self.data.seq_len < 2 or self.data.seq_len > self.model.max_position_embeddings:
            raise ConfigError(f"invalid run config: data.seq_len={self.data.seq_len} must be in "
                              f"[2, model.max_position_embeddings={self.model.max_position_embeddings}]")
        y = self.model.yarn()
        if y is not None and self.data.seq_len > y["factor"] * y["original_max_position_embeddings"]:
            raise ConfigError(f"invalid run config: data.seq_len={self.data.seq_len} exceeds what YaRN interpolates, "
                              f"model.rope_scaling factor x original_max_position_embeddings = "
                              f"{y['factor'] * y['original_max_position_embeddings']:g}; raise the factor")
        if self.data.vocab_size > self.model.vocab_size:
            raise ConfigError(f"invalid run config: data.vocab_size={self.data.vocab_size} exceeds "
                              f"model.vocab_size={self.model.vocab_size}")
        o = self.optim
        if o.state_dtype == "bf16" and t.compile_optimizer:
            raise ConfigError("invalid run config: optim.state_dtype=bf16 does not combine with "
                              "train.compile_optimizer")
        if o.master == "split" and o.state_dtype != "bf16":
            raise ConfigError("invalid run config: optim.master=split needs optim.state_dtype=bf16 (the optimizer "
                              "that keeps master weights)")
        if not 0 <= o.warmup <= o.constant_until <= o.decay_until <= o.final_at <= 1:
            raise ConfigError(f"invalid run config: need optim.warmup={o.warmup} <= constant_until={o.constant_until}"
                              f" <= decay_until={o.decay_until} <= final_at={o.final_at}")
        ep = self.parallel.ep
        if self.model.n_routed_experts % ep:
            raise ConfigError(f"invalid run config: parallel.ep={ep} must divide model.n_routed_experts="
                              f"{self.model.n_routed_experts} (every rank of an EP group holds E / ep experts)")
        pp = self.parallel.pp
        if self.parallel.zero1 and self.parallel.fsdp:
            raise ConfigError("invalid run config: parallel.zero1 does not combine with parallel.fsdp (FSDP shards "
                              "the optimizer state already)")
        if self.parallel.zero1 and t.compile_optimizer:
            raise ConfigError("invalid run config: parallel.zero1 does not combine with train.compile_optimizer (the "
                              "compiled step over views of the parameters is not verified)")
        if pp > 1 and self.parallel.fsdp and self.parallel.overlap:
            raise ConfigError("invalid run config: parallel.fsdp does not combine with parallel.overlap (FSDP's "
                              "hooks would run on the overlapped backward's thread)")
        if pp > 1 and self.model.num_hidden_layers < 2 * pp:
            raise ConfigError(f"invalid run config: parallel.pp={pp} cuts the model into {2 * pp} DualPipeV chunks of "
                              f">= 1 decoder layer: model.num_hidden_layers={self.model.num_hidden_layers} is too few")
        par = self.parallel
        if par.ep_dispatch == "two_hop" and pp > 1 and par.overlap:
            raise ConfigError("invalid run config: parallel.ep_dispatch=two_hop does not combine with parallel.overlap "
                              "(the overlapped backward thread has duplicates of the EP group only)")
        if par.ep_dispatch == "two_hop" and par.ranks_per_node and ep % par.ranks_per_node \
                and par.ranks_per_node % ep:
            raise ConfigError(f"invalid run config: parallel.ranks_per_node={par.ranks_per_node} and parallel.ep={ep}: "
                              f"one must divide the other (every node holds the same number of an EP group's ranks)")
        if t.cuda_graphs and not (t.compile and pp == 1 and not self.parallel.fsdp):
            # graphs replay fixed addresses: FSDP gathers each block's weights into fresh memory per use, and the
            # pipeline's schedules run other micro-batches' forwards before a backward (not verified under graphs);
            # the device is checked where it is resolved (Trainer)
            raise ConfigError("invalid run config: train.cuda_graphs needs train.compile=true, parallel.pp=1 and "
                              "parallel.fsdp=false")
        if self.parallel.fsdp and t.compile_optimizer:
            # compiled_clip_and_step scales the gradients with torch._foreach_mul_ inside a compiled graph: not
            # verified on FSDP's DTensor gradients (CUDA-only); the eager optimizer step is used under FSDP instead
            raise ConfigError("invalid run config: parallel.fsdp does not combine with train.compile_optimizer")

    def check_world(self, world: int) -> int:
        """Validate the layout against `world` processes (torchrun's WORLD_SIZE); returns dp = world // (pp * ep)."""
        ep, pp, micro = self.parallel.ep, self.parallel.pp, self.train.micro_batch_size
        if pp == 1 and world % ep:
            hint = " (resuming an expert-parallel run in one process? add parallel.ep=1)" if world == 1 else ""
            raise ConfigError(f"invalid run config: parallel.ep={ep} does not divide the world size {world}{hint}")
        if world % (pp * ep):
            hint = " (resuming a pipeline-parallel run in one process? add parallel.pp=1 parallel.ep=1)" \
                if world == 1 else ""
            raise ConfigError(f"invalid run config: parallel.pp={pp} x parallel.ep={ep} = {pp * ep} ranks does not "
                              f"divide the world size {world}{hint}")
        dp = world // (pp * ep)
        c = self.checkpoint
        if world == 1 and c.async_save and c.format == "auto":
            # auto writes single files in one process, and those only synchronously: never a silent synchronous save
            raise ConfigError("invalid run config: checkpoint.async_save=true in one process needs "
                              "checkpoint.format=sharded (auto writes the single-file format there, synchronously); "
                              "add checkpoint.format=sharded, or checkpoint.async_save=false")
        if pp == 1 and micro % world:
            raise ConfigError(f"invalid run config: train.micro_batch_size={micro} must be a multiple of the "
                              f"{world} ranks (each rank takes micro_batch_size / world rows of every micro-batch)")
        if pp > 1:
            if micro % (dp * ep):
                raise ConfigError(f"invalid run config: train.micro_batch_size={micro} must be a multiple of the "
                                  f"dp * ep = {dp * ep} ranks of a pipeline position (each takes its share of the "
                                  f"rows of every micro-batch)")
            self.pipeline_microbatch(dp)
        return dp

    def pipeline_microbatch(self, dp: int) -> int:
        """pp > 1: the rows of one DualPipeV micro-batch on each rank. Each rank's share of a trainer micro-batch
        (micro_batch_size / (dp * ep) rows) is cut into equal pipeline micro-batches, as large as possible while the
        smallest step of the run (the batch ramp's) still gives DualPipeV its 2 * pp micro-batches."""
        from .schedule import batch_size
        pp, ep, t = self.parallel.pp, self.parallel.ep, self.train
        rows = t.micro_batch_size // (dp * ep)
        fewest = min(batch_size(0, self), t.batch_size) // t.micro_batch_size    # the ramp is linear: an end
        for m in range(rows, 0, -1):
            if rows % m == 0 and fewest * (rows // m) >= 2 * pp:
                return m
        raise ConfigError(f"invalid run config: parallel.pp={pp}: DualPipeV needs >= {2 * pp} micro-batches per step, "
                          f"but the smallest step ({fewest} x train.micro_batch_size={t.micro_batch_size}) gives "
                          f"each of the dp * ep = {dp * ep} pipelines only {fewest * rows} rows; raise "
                          f"train.batch_size_start / train.micro_batch_size")

    def to_dict(self) -> dict:
        d = {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}
        return {"run_dir": self.run_dir, "model": self.model.to_dict(), **d}

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        unknown = sorted(set(d) - set(SECTIONS) - {"model", "run_dir"})
        if unknown:
            raise ConfigError(f"invalid run config: unknown sections {unknown}"
                              f"{did_you_mean(unknown, [*SECTIONS, 'model', 'run_dir'])}; known: {sorted(SECTIONS)} + "
                              f"model")
        kwargs: dict[str, Any] = {}
        for name, section in SECTIONS.items():
            table = d.get(name, {})
            if not isinstance(table, dict):
                raise ConfigError(f"invalid run config: [{name}] must be a table")
            fields = {f.name for f in dataclasses.fields(section)}
            bad = sorted(set(table) - fields)
            if bad:
                raise ConfigError(f"invalid run config: unknown keys {bad} in [{name}]{did_you_mean(bad, fields)}; "
                                  f"known: {sorted(fields)}")
            kwargs[name] = section(**table)
        if "model" in d:
            if not isinstance(d["model"], dict):
                raise ConfigError("invalid run config: [model] must be a table")
            kwargs["model"] = model_config_from_table(d["model"])
        if "run_dir" in d:
            kwargs["run_dir"] = d["run_dir"]
        return cls(**kwargs)


def parse_override(item: str) -> tuple[list[str], Any]:
    """`section.key=value` -> (["section", "key"], value parsed as TOML, or the raw string)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form section.key=value")
    key, raw = item.split("=", 1)
    path = key.strip().split(".")
    if not all(path) or (len(path) != 2 and path != ["run_dir"]):
        raise ConfigError(f"override {item!r}: the key must be section.key (or run_dir)")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return path, value


def apply_overrides(d: dict, overrides: list[str]) -> dict:
    """`d` with the overrides set; one key given twice with different values is an error (which was meant?)."""
    d = json.loads(json.dumps(d))
    seen: dict[str, Any] = {}
    for item in overrides:
        path, value = parse_override(item)
        key = ".".join(path)
        if key in seen and seen[key] != value:
            raise ConfigError(f"override {key} is given twice, as {seen[key]!r} and {value!r}: pass it once")
        seen[key] = value
        if path == ["run_dir"]:
            d["run_dir"] = value
        else:
            d.setdefault(path[0], {})[path[1]] = value
    return d


def load_run_config(path: str | Path | None = None, overrides: list[str] = ()) -> RunConfig:
    """A TOML run file (sections as above, `[model]` with an optional preset), or the `config.json` a run writes
    (the same dict), plus command-line overrides."""
    return RunConfig.from_dict(apply_overrides(read_config_file(path, "run"), list(overrides)))


def read_config_file(path: str | Path | None, what: str) -> dict:
    """A TOML file, or a JSON one a run wrote, as a dict ({} for None); a missing or malformed file is one line."""
    if path is None:
        return {}
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{what} config {path} does not exist")
    kind = "JSON" if path.suffix == ".json" else "TOML"
    try:
        text = path.read_text(encoding="utf-8")
        d = json.loads(text) if kind == "JSON" else tomllib.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid {kind}: {e}") from None
    except IsADirectoryError:
        raise ConfigError(f"{what} config {path} is a directory, not a file") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{path} is not a {what} config: its top level is a {type(d).__name__}, not a table")
    return d
