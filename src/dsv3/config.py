"""ModelConfig: the one description of a DeepSeek-V3-architecture model.

Field names are the Hugging Face `config.json` keys (spec 2.1), so `from_hf` / `to_hf` are a near-identity
map. Choices:
- Defaults are transformers' `DeepseekV3Config` defaults, so a key absent from a `config.json` reads as transformers
  (and DeepSeek's own inference code) read it: the 671B shapes, but `max_position_embeddings` 4096, plain RoPE (no
  YaRN) and no `torch_dtype`. The presets in configs/ spell out every value they need (v3-671b: YaRN, 163840).
  Keys transformers does not have take V3's values (`topk_method` noaux_tc, `scoring_func` sigmoid); in a
  `deepseek_v2` file, the values transformers' DeepseekV2 computes with (softmax, greedy).
- Validation happens in `__post_init__`: every way of building a config (presets, HF files, TOML, `replace`)
  goes through it, and an error names the field and the reason.
- `init_std` is ours (0.006, TR 4.2). The Hub's `initializer_range` (0.02) was not what DeepSeek used, so it
  is carried through untouched in `hf_extra` and never read (spec 9.8).
- `rope_scaling` is kept as the HF dict (YaRN keys, spec 1.5; `{"rope_type": "default"}` reads as None, plain RoPE,
  and is written back as read); `rope_key` remembers whether the file used the
  released `rope_scaling` key or the `rope_parameters` key that transformers 5 writes, so a round trip is exact.
- Keys we do not use (`aux_loss_alpha`, `quantization_config`, `auto_map`, ...) live in `hf_extra` verbatim;
  `hf_absent` lists our keys the source file did not have, so they are not invented on the way back out.
- `model_type` names the architecture (MODEL_TYPES): Moonshot's Kimi-K2 releases write `kimi_k2` for the DeepseekV3
  one. What would change the math if it were ignored is refused naming the key: `tie_word_embeddings: true` (no
  family release ties its head), `rope_interleave: false`, `attention_dropout` > 0, a `dtype` contradicting
  `torch_dtype`, a top-level `rope_theta` / `rope_scaling` contradicting `rope_parameters`.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
_ROPE_KEYS = {"type", "rope_type", "factor", "original_max_position_embeddings", "beta_fast", "beta_slow",
              "mscale", "mscale_all_dim", "attention_factor", "truncate"}
_TOPK_METHODS = ("noaux_tc", "greedy", "group_limited_greedy")
# model_type -> the architecture it names: Moonshot's Kimi-K2 releases write their own type for DeepseekV3ForCausalLM
MODEL_TYPES = {"deepseek_v3": "DeepseekV3ForCausalLM", "kimi_k2": "DeepseekV3ForCausalLM",
               "deepseek_v2": "DeepseekV2ForCausalLM"}
# Keys HF writes that are derived from ours: checked for consistency, then carried verbatim.
_DERIVED_KEYS = ("qk_head_dim", "head_dim")
# What a key absent from a deepseek_v2 file means, where it is not V3's: transformers' DeepseekV2 routes by softmax
# with no `scoring_func` key at all (its config.json never has one), and the rest are DeepseekV2Config's defaults
# (greedy routing with no selection bias, weights scaled by 1.0 and not renormalised, every layer MoE, no MTP
# module; n_group / topk_group null, i.e. 1). V3's values here would load a V2 file that leaves routed_scaling_factor
# out with its expert outputs scaled 2.5x: other logits than transformers', silently.
_V2_ABSENT = {"scoring_func": "softmax", "topk_method": "greedy", "routed_scaling_factor": 1.0,
              "norm_topk_prob": False, "first_k_dense_replace": 0, "n_shared_experts": 2, "n_routed_experts": 64,
              "n_group": 1, "topk_group": 1, "num_nextn_predict_layers": 0, "vocab_size": 102400, "hidden_size": 4096,
              "intermediate_size": 11008, "moe_intermediate_size": 1407, "num_hidden_layers": 32,
              "num_attention_heads": 32, "num_key_value_heads": 32, "max_position_embeddings": 2048,
              "bos_token_id": 1, "eos_token_id": 2}


class ConfigError(ValueError):
    """A model configuration is invalid; the message names the field and the reason."""


def _real(v) -> bool:
    """A finite number, not a bool."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def did_you_mean(unknown: list[str], known) -> str:
    """" (did you mean 'steps' for 'stpes'?)" for the unknown names close to a known one (a typo), else ""."""
    close = [f"{m[0]!r} for {u!r}" for u in unknown if (m := difflib.get_close_matches(u, list(known), 1, 0.7))]
    return f" (did you mean {', '.join(close)}?)" if close else ""


@dataclass
class ModelConfig:
    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432           # dense FFN width (first_k_dense_replace layers)
    moe_intermediate_size: int = 2048        # width of each routed / shared expert
    num_hidden_layers: int = 61
    num_nextn_predict_layers: int = 1        # MTP depth D
    num_attention_heads: int = 128
    num_key_value_heads: int = 128           # carried for the file only: MLA has no K/V heads (transformers ignores it)
    n_shared_experts: int = 1
    n_routed_experts: int = 256
    num_experts_per_tok: int = 8
    routed_scaling_factor: float = 2.5
    n_group: int = 8
    topk_group: int = 4
    topk_method: str = "noaux_tc"            # V3; "greedy" / "group_limited_greedy" for V2-family
    scoring_func: str = "sigmoid"            # V3; "softmax" for V2-family
    norm_topk_prob: bool = True
    first_k_dense_replace: int = 3
    moe_layer_freq: int = 1
    kv_lora_rank: int = 512
    q_lora_rank: int | None = 1536           # None: a single q_proj (V2-Lite style)
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096     # transformers' default; V3 itself: 163840 with YaRN (configs/v3-671b)
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None         # plain RoPE; a YaRN dict (spec 1.5) extends it
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 0
    eos_token_id: int | list | None = 1
    pad_token_id: int | None = None
    torch_dtype: str | None = None           # the weights' dtype as written; None: not stated
    model_type: str = "deepseek_v3"
    init_std: float = 0.006                  # TR 4.2; not the Hub's initializer_range
    rope_key: str = "rope_scaling"           # which HF key holds RoPE settings when written back
    hf_extra: dict = field(default_factory=dict)
    hf_absent: tuple = ()

    # ---- validation -------------------------------------------------------------------------------------------
    def __post_init__(self) -> None:
        # DeepSeek's own configs write 0 for "no query compression" (false, which equals 0, is refused below)
        if self.q_lora_rank == 0 and not isinstance(self.q_lora_rank, bool):
            self.q_lora_rank = None
        # in this order: the first field that fails is the one named
        self._check_shapes()
        self._check_routing()
        self._check_values()
        self._check_rope_scaling()

    def _fail(self, name: str, why: str) -> None:
        raise ConfigError(f"invalid model config: {name}={getattr(self, name, None)!r}: {why}")

    def _check_shapes(self) -> None:
        """The integer sizes, counts and dimensions."""
        fail = self._fail
        positive = ["vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "num_key_value_heads", "n_routed_experts", "num_experts_per_tok", "n_group",
                    "topk_group", "moe_layer_freq", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                    "v_head_dim", "max_position_embeddings"]
        for name in positive:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                fail(name, "must be a positive integer")
        for name in ("num_nextn_predict_layers", "n_shared_experts", "first_k_dense_replace"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                fail(name, "must be a non-negative integer")
        q = self.q_lora_rank
        if q is not None and (not isinstance(q, int) or isinstance(q, bool) or q < 0):    # true is no rank of 1
            fail("q_lora_rank", "must be a positive integer or null")
        if self.qk_rope_head_dim % 2:
            fail("qk_rope_head_dim", "must be even (RoPE rotates pairs of dimensions)")

    def _check_routing(self) -> None:
        """The router's groups, top-k and scoring, consistent with the expert counts."""
        fail = self._fail
        if self.n_routed_experts % self.n_group:
            fail("n_routed_experts", f"must be divisible by n_group={self.n_group}")
        if self.topk_group > self.n_group:
            fail("topk_group", f"cannot exceed n_group={self.n_group}")
        if self.num_experts_per_tok > self.n_routed_experts:
            fail("num_experts_per_tok", f"cannot exceed n_routed_experts={self.n_routed_experts}")
        per_group = self.n_routed_experts // self.n_group
        if self.num_experts_per_tok > self.topk_group * per_group:
            fail("num_experts_per_tok", f"cannot exceed topk_group*experts_per_group={self.topk_group * per_group}")
        if self.topk_method not in _TOPK_METHODS:
            fail("topk_method", f"must be one of {_TOPK_METHODS}")
        if self.topk_method == "noaux_tc" and self.n_group > 1 and per_group < 2:
            fail("n_group", "noaux_tc scores a group by its top-2 experts: each group needs >= 2 experts")
        if self.scoring_func not in ("sigmoid", "softmax"):
            fail("scoring_func", "must be 'sigmoid' or 'softmax'")

    def _check_values(self) -> None:
        """The architecture, the real-valued and boolean settings, the token ids and the file's own keys."""
        fail = self._fail
        if not isinstance(self.model_type, str) or self.model_type not in MODEL_TYPES:
            fail("model_type", f"expected one of {sorted(MODEL_TYPES)} (DeepSeek-V3 / V2 architectures)")
        if self.hidden_act != "silu":
            fail("hidden_act", "only 'silu' (SwiGLU) is supported")
        if self.first_k_dense_replace > self.num_hidden_layers:
            fail("first_k_dense_replace", f"cannot exceed num_hidden_layers={self.num_hidden_layers}")
        for name in ("rms_norm_eps", "rope_theta", "init_std", "routed_scaling_factor"):
            if not (_real(getattr(self, name)) and getattr(self, name) > 0):
                fail(name, "must be a number > 0")
        for name in ("norm_topk_prob", "attention_bias", "tie_word_embeddings"):
            if not isinstance(getattr(self, name), bool):
                fail(name, "must be true or false")
        if self.tie_word_embeddings:
            # refused, not honoured: every DeepSeek-V3-family release has its own head matrix, and a tied one would
            # need sharing through loading, conversion, FP8, pipeline stages, sharded checkpoints and EMA
            fail("tie_word_embeddings", "a head tied to the embedding is not supported (lm_head is its own matrix, "
                                        "as in every DeepSeek-V3-family release); untie it: copy "
                                        "model.embed_tokens.weight to lm_head.weight and set false")
        # an id past the vocabulary is no token: a BOS prepended so fails in the embedding, an EOS never ends a reply
        token_id = lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 <= v < self.vocab_size  # noqa: E731
        for name in ("bos_token_id", "pad_token_id", "eos_token_id"):
            v = getattr(self, name)
            if v is not None and not (token_id(v) or (name == "eos_token_id" and isinstance(v, list) and v
                                                      and all(map(token_id, v)))):
                fail(name, f"must be a token id (an integer in [0, vocab_size={self.vocab_size}))" +
                     (", a list of them" if name == "eos_token_id" else "") + " or null")
        if self.torch_dtype is not None and self.torch_dtype not in TORCH_DTYPES:
            fail("torch_dtype", f"must be one of {', '.join(map(repr, TORCH_DTYPES))} or null")
        _check_hf_extra(self)
        if self.rope_key not in ("rope_scaling", "rope_parameters"):
            fail("rope_key", "must be 'rope_scaling' or 'rope_parameters'")

    def _check_rope_scaling(self) -> None:
        """rope_scaling: null, or a YaRN dict (spec 1.5) of known keys and sane values."""
        fail = self._fail
        if self.rope_scaling is not None:
            rs = self.rope_scaling
            if not isinstance(rs, dict):
                fail("rope_scaling", "must be a dict or null")
            unknown = set(rs) - _ROPE_KEYS
            if unknown:
                fail("rope_scaling", f"unknown keys {sorted(unknown)}")
            kind = rs.get("rope_type", rs.get("type"))
            if kind != "yarn":
                fail("rope_scaling", f"only YaRN scaling is supported, got type {kind!r}")
            # finite: a NaN factor passed `< 1` and every length check, and NaN / inf rotations train to a NaN loss
            if not (_real(rs.get("factor")) and rs["factor"] >= 1):
                fail("rope_scaling", "'factor' must be a number >= 1")
            orig = rs.get("original_max_position_embeddings")
            if not isinstance(orig, int) or isinstance(orig, bool) or orig <= 0:
                fail("rope_scaling", "'original_max_position_embeddings' must be a positive integer")
            for k in ("beta_fast", "beta_slow", "mscale", "mscale_all_dim", "attention_factor"):
                if rs.get(k) is not None and not (_real(rs[k]) and rs[k] >= 0):
                    fail("rope_scaling", f"'{k}' must be a number >= 0")
            # equal betas (Kimi-K2: 1.0 and 1.0) make the ramp a step, as transformers and DeepSeek compute it
            if not float(rs.get("beta_fast") or 32) >= float(rs.get("beta_slow") or 1):
                fail("rope_scaling", "'beta_fast' must be >= 'beta_slow' (rotations at the two ends of the ramp)")

    # ---- derived quantities -----------------------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def is_moe_layer(self, layer_id: int) -> bool:
        """Hub/vLLM rule (spec 1.1); MTP blocks use their checkpoint index num_hidden_layers + k."""
        return layer_id >= self.first_k_dense_replace and layer_id % self.moe_layer_freq == 0

    def yarn(self) -> dict | None:
        """YaRN parameters with the defaults HF and DeepSeek use, or None when RoPE is unscaled (spec 1.5)."""
        if self.rope_scaling is None:
            return None
        rs = self.rope_scaling
        return dict(factor=float(rs["factor"]), original_max_position_embeddings=rs["original_max_position_embeddings"],
                    beta_fast=float(rs.get("beta_fast") or 32), beta_slow=float(rs.get("beta_slow") or 1),
                    mscale=rs.get("mscale"), mscale_all_dim=rs.get("mscale_all_dim"),
                    attention_factor=rs.get("attention_factor"), truncate=rs.get("truncate", True))

    @property
    def ue8m0_scales(self) -> bool:
        """FP8 block scales are powers of two (DeepSeek-V3.1: quantization_config.scale_fmt "ue8m0"): re-quantising
        such weights rounds its scales the same way, which gives back the released codes exactly."""
        qc = self.hf_extra.get("quantization_config")
        return isinstance(qc, dict) and qc.get("scale_fmt") == "ue8m0"

    @property
    def softmax_scale(self) -> float:
        """1/sqrt(d_qk), times mscale(s, mscale_all_dim)^2 under YaRN (spec 1.3, 1.5)."""
        scale = self.qk_head_dim ** -0.5
        y = self.yarn()
        if y is not None and y["mscale_all_dim"]:
            m = yarn_mscale(y["factor"], y["mscale_all_dim"])
            scale *= m * m
        return scale

    # ---- Hugging Face config.json -----------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, source: dict | str | Path) -> "ModelConfig":
        """Read a HF `config.json` (a dict, the file, or its directory); the model types of MODEL_TYPES."""
        if not isinstance(source, dict):
            path = Path(source)
            if path.is_dir():
                path = path / "config.json"
            try:
                source = json.loads(path.read_text())
            except FileNotFoundError:
                raise ConfigError(f"no config.json at {path}") from None
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path} is not valid JSON: {e}") from None
            if not isinstance(source, dict):    # a list or a number would be a TypeError from dict() below
                raise ConfigError(f"{path} is not a JSON object of config keys (got {type(source).__name__})")
        d = copy.deepcopy(dict(source))
        names = _HF_FIELDS
        kw: dict[str, Any] = {}
        beside = _read_rope_parameters(d, kw) if "rope_parameters" in d else {}
        for k in list(d):
            if k in names:
                kw[k] = d.pop(k)
        if _no_scaling(kw.get("rope_scaling")):   # {"rope_type": "default"}: plain RoPE; the dict kept for to_hf
            d["rope_scaling"] = kw.pop("rope_scaling")
        d.update(beside)  # kept verbatim (hf_extra) for the round trip; to_hf keeps them in step
        for k in ("n_group", "topk_group"):  # V2 configs write null for "no grouping"
            if k in kw and kw[k] is None:
                kw[k] = 1
        present = set(source) | ({"rope_scaling", "rope_theta"} if "rope_parameters" in source else set())
        absent = tuple(sorted(n for n in names if n not in present))
        if kw.get("model_type") == "deepseek_v2":
            kw.update({k: v for k, v in _V2_ABSENT.items() if k in absent})
        try:
            return cls(**kw, hf_extra=d, hf_absent=absent)
        except TypeError as e:
            raise ConfigError(f"invalid model config: {e}") from None

    def to_hf(self) -> dict:
        """The HF `config.json` dict; `from_hf(d).to_hf() == d` for files we read."""
        defaults = ModelConfig()
        absent_means = {f.name: getattr(defaults, f.name) for f in dataclasses.fields(self)}
        if self.model_type == "deepseek_v2":
            absent_means.update(_V2_ABSENT)
        out: dict[str, Any] = {}
        skip = {"init_std", "rope_key", "hf_extra", "hf_absent", "rope_scaling", "rope_theta"}
        for f in dataclasses.fields(self):
            if f.name in skip:
                continue
            v = getattr(self, f.name)
            if (f.name in self.hf_absent and v == absent_means[f.name]) or (f.name == "torch_dtype" and v is None):
                continue
            out[f.name] = v
        extra = dict(self.hf_extra)
        if self.rope_key == "rope_parameters":
            rp = dict(self.rope_scaling) if self.rope_scaling is not None else {"rope_type": "default"}
            out["rope_parameters"] = {**rp, "rope_theta": self.rope_theta}
            # the copies a transformers 5 file had beside it: as read while they still say the same, else ours
            if "rope_theta" in extra:
                extra["rope_theta"] = self.rope_theta
        else:
            for k in ("rope_scaling", "rope_theta"):
                if not (k in self.hf_absent and getattr(self, k) == getattr(defaults, k)):
                    out[k] = getattr(self, k)
        # a rope_scaling kept as read (beside rope_parameters, or {"rope_type": "default"}): while it says the same
        if "rope_scaling" in extra and not _rope_agrees(extra["rope_scaling"], self.rope_scaling):
            extra["rope_scaling"] = copy.deepcopy(self.rope_scaling)
        out.update(extra)
        return copy.deepcopy(out)  # callers (transformers' config classes) mutate what they are given

    # ---- our own files (TOML [model] sections, presets) ---------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        """Build from our own field names; unknown keys are errors (no silent typos)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"invalid model config: unknown keys {unknown}{did_you_mean(unknown, names)}")
        return cls(**d)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


# our fields that are config.json keys (from_hf reads them; the rest are dsv3's own)
_HF_FIELDS = frozenset(f.name for f in dataclasses.fields(ModelConfig)) - {"init_std", "rope_key", "hf_extra",
                                                                          "hf_absent"}


def _read_rope_parameters(d: dict, kw: dict) -> dict:
    """transformers 5's `rope_parameters` (rope_theta inside) into kw. Returns what some transformers 5 versions write
    beside it (a top-level rope_theta, a rope_scaling), to keep verbatim; they must say the same (transformers 5
    reads rope_parameters, older readers the others)."""
    rp = d.pop("rope_parameters") or {}
    if not isinstance(rp, dict):
        raise ConfigError(f"invalid model config: rope_parameters={rp!r}: must be an object (rope_type, rope_theta, "
                          f"YaRN keys) or null")
    rp = dict(rp)
    kw["rope_key"] = "rope_parameters"
    if "rope_theta" in rp:
        kw["rope_theta"] = rp.pop("rope_theta")
    kw["rope_scaling"] = None if _no_scaling(rp) else rp
    # a top-level rope_theta is the only one when rope_parameters lacks it: then it is read as such
    beside = {k: d.pop(k) for k in ("rope_theta", "rope_scaling") if k in d and (k != "rope_theta" or k in kw)}
    if "rope_theta" in beside and beside["rope_theta"] != kw["rope_theta"]:
        raise ConfigError(f"invalid model config: rope_theta={beside['rope_theta']!r} contradicts "
                          f"rope_parameters.rope_theta={kw['rope_theta']!r}; keep one of them")
    if "rope_scaling" in beside and not _rope_agrees(beside["rope_scaling"], kw["rope_scaling"]):
        raise ConfigError(f"invalid model config: rope_scaling={beside['rope_scaling']!r} contradicts "
                          f"rope_parameters={kw['rope_scaling']!r}; keep one of them")
    return beside


def _no_scaling(rope: Any) -> bool:
    """Whether a RoPE dict says plain RoPE: only its type, "default" (transformers' name for no scaling), or nothing."""
    return isinstance(rope, dict) and set(rope) <= {"rope_type", "type"} and \
        all(v == "default" for v in rope.values())


def _rope_agrees(rope_scaling: dict | None, ours: dict | None) -> bool:
    """A rope_scaling kept beside rope_parameters says nothing else: every key both have is equal (null says
    nothing; {"rope_type": "default"} says no scaling)."""
    if rope_scaling is None:
        return True
    if _no_scaling(rope_scaling):
        return ours is None
    return isinstance(rope_scaling, dict) and ours is not None and \
        all(ours[k] == v for k, v in rope_scaling.items() if k in ours)


# the names a config.json writes for the weights' dtype (torch's floating dtypes; to_hf writes them back as read)
TORCH_DTYPES = ("float32", "bfloat16", "float16", "float64", "float8_e4m3fn", "float8_e5m2")
# hf_extra keys from_hf may keep beside our own fields: a RoPE copy in transformers 5's layout (_read_rope_parameters)
_EXTRA_COPIES = ("rope_scaling", "rope_theta")


def _check_hf_extra(cfg: ModelConfig) -> None:
    """hf_extra (a file's keys dsv3 does not use, written back verbatim by to_hf, so checked whatever built the
    config: a HF file or a TOML [model] table): an object of string keys, none that is a field of ours (to_hf would
    write it over the field: a config.json contradicting the weights), the derived keys consistent, and the HF-only
    keys that would change the math."""
    extra = cfg.hf_extra
    if not isinstance(extra, dict) or not all(isinstance(k, str) for k in extra):
        raise ConfigError(f"invalid model config: hf_extra={extra!r}: must be an object of config.json keys")
    ours = sorted(k for k in extra if k in _HF_FIELDS and k not in _EXTRA_COPIES)
    if ours:
        raise ConfigError(f"invalid model config: hf_extra holds {ours}, fields of the model config: set them "
                          f"directly (model.{ours[0]}), not in hf_extra")
    if "qk_head_dim" in extra and extra["qk_head_dim"] != cfg.qk_head_dim:
        raise ConfigError(f"invalid model config: qk_head_dim={extra['qk_head_dim']}: kv dims inconsistent, "
                          f"expected qk_nope_head_dim + qk_rope_head_dim = {cfg.qk_head_dim}")
    if "head_dim" in extra and extra["head_dim"] != cfg.qk_rope_head_dim:
        raise ConfigError(f"invalid model config: head_dim={extra['head_dim']}: kv dims inconsistent, transformers "
                          f"sets head_dim = qk_rope_head_dim ({cfg.qk_rope_head_dim})")
    _check_hf_only_keys(extra, cfg.torch_dtype)


def _check_hf_only_keys(extra: dict, torch_dtype: str | None) -> None:
    """Keys that only HF files carry (kept verbatim in hf_extra) and that would change the math if dsv3 ignored them."""
    if extra.get("rope_interleave", True) is not True:
        raise ConfigError(f"invalid model config: rope_interleave={extra['rope_interleave']!r}: only interleaved RoPE "
                          f"(true, DeepSeek's pairs (2j, 2j+1)) is supported")
    if extra.get("attention_dropout", 0) != 0:     # every release has 0.0; dsv3's attention has no dropout
        raise ConfigError(f"invalid model config: attention_dropout={extra['attention_dropout']!r}: only 0 is "
                          f"supported (no dropout on the attention probabilities)")
    if "dtype" in extra and extra["dtype"] not in TORCH_DTYPES:
        raise ConfigError(f"invalid model config: dtype={extra['dtype']!r}: must be one of "
                          f"{', '.join(map(repr, TORCH_DTYPES))}")
    if "dtype" in extra and torch_dtype is not None and extra["dtype"] != torch_dtype:
        # transformers 5 reads `dtype` first, transformers 4 `torch_dtype`: the file has two answers
        raise ConfigError(f"invalid model config: dtype={extra['dtype']!r} contradicts torch_dtype="
                          f"{torch_dtype!r}; keep one of them")


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN attention temperature sqrt(t) = 0.1 * mscale * ln(s) + 1 (TR 4.3, spec 1.5)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def load_model_config(name_or_path: str | Path) -> ModelConfig:
    """A preset name (`tiny`, `lite`, `lite-8L`, `v3-671b`), a HF `config.json`, a checkpoint directory, a training
    run (or its checkpoint) directory, or a TOML file with a `[model]` table."""
    path = Path(name_or_path)
    if not path.exists() and (CONFIG_DIR / f"{name_or_path}.json").exists():
        path = CONFIG_DIR / f"{name_or_path}.json"
    if path.is_dir() or path.suffix == ".json":
        run = _run_model_table(path)
        return ModelConfig.from_dict(run) if run is not None else ModelConfig.from_hf(path)
    if path.suffix == ".toml":
        try:
            import tomllib
        except ImportError:  # Python 3.10
            import tomli as tomllib
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path} is not valid TOML: {e}") from None
        model = data.get("model")
        if not isinstance(model, dict):
            raise ConfigError(f"{path} has no [model] table")
        return model_config_from_table(model)
    presets = sorted(p.stem for p in CONFIG_DIR.glob("*.json")) if CONFIG_DIR.exists() else []
    raise ConfigError(f"no model config found at {name_or_path!r}; presets: {presets}")


def _run_model_table(path: Path) -> dict | None:
    """The `model` of a training run's config.json (a run or checkpoint directory, or the file), else None: a run
    is a preset too, e.g. for an extension phase that starts from it (train.init_from)."""
    f = path / "config.json" if path.is_dir() else path
    try:
        d = json.loads(f.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return d["model"] if isinstance(d.get("model"), dict) and isinstance(d.get("train"), dict) else None


def model_config_from_table(table: dict) -> ModelConfig:
    """A TOML-style `[model]` table: an optional `preset` (name or path) plus field overrides."""
    table = dict(table)
    if "preset" in table:
        preset = table.pop("preset")
        if not isinstance(preset, str) or not preset:
            raise ConfigError(f"invalid model config: preset={preset!r}: must be a preset name or a path")
        base = load_model_config(preset)
        return ModelConfig.from_dict({**base.to_dict(), **table})
    return ModelConfig.from_dict(table)
