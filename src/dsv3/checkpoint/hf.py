"""Hugging Face checkpoint directories: `config.json` + sharded safetensors + `model.safetensors.index.json`
(spec 2.2, 2.3).

Choices:
- Names: ours are the checkpoint's minus the `model.` prefix, except that routed experts are stacked
  (`experts.gate_proj[e]` <-> `experts.{e}.gate_proj.weight`) and MTP module k is checkpoint layer
  `num_hidden_layers + k`, whose `embed_tokens` / `shared_head.head` copies are the main model's tensors.
- Loading streams tensor by tensor from memory-mapped shards into a model allocated once (peak host memory: the
  model plus one tensor); released FP8 weights are dequantised block by block as they arrive.
- Nothing is ignored silently: the whole name set is checked against the model before any tensor is read, and
  missing, unexpected or mis-shaped tensors raise `CheckpointError` naming them. One exception, with a warning:
  a checkpoint with *no* MTP tensors at all (what transformers writes) loads without the MTP module. Saved RoPE
  buffers (`rotary_emb.inv_freq`, NOT_WEIGHTS) are not weights: skipped, as every reader skips them.
- Saving writes per-expert names, the MTP layer with its embedding/head copies, an index, and `config.json`,
  atomically; `quantize_fp8=True` writes the released e4m3 + `weight_scale_inv` format.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..config import MODEL_TYPES, ModelConfig
from ..fp8 import BLOCK, dequantize_blocks, quantize_blocks
from ..model import Transformer
from .atomic import atomic_directory

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# every file save_pretrained writes: what an earlier save into the same directory may have left there
SAVED_FILE = re.compile(r"config\.json|model\.safetensors(\.index\.json)?|model-\d{5}-of-\d{5}\.safetensors")
EXPERT_PARAMS = ("gate_proj", "up_proj", "down_proj")
# Every Linear of attention and FFN/experts is FP8 in the release; gate, eh_proj, norms, embeddings, head are not.
FP8_WEIGHT = re.compile(r"\.(self_attn\.(q_a_proj|q_b_proj|q_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj)|"
                        r"mlp\.(experts\.\d+\.|shared_experts\.)?(gate_proj|up_proj|down_proj))\.weight$")
# Buffers some releases saved that are not weights: RoPE's inverse frequencies (Kimi-K2-Instruct has one per layer),
# recomputed from the config by every reader (the released modeling code, transformers, vLLM); skipped, not loaded.
NOT_WEIGHTS = re.compile(r"\.self_attn\.rotary_emb\.inv_freq$")
FP8_QUANT_CONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                    "weight_block_size": [128, 128]}


class CheckpointError(ValueError):
    """A checkpoint does not match its model: the message names the tensors."""


def _names(names: list[str], limit: int = 10) -> str:
    s = ", ".join(sorted(names)[:limit])
    return s + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def hf_name_map(model: Transformer) -> dict[str, tuple[str, int | None]]:
    """HF tensor name -> (our state_dict name, expert row or None), for every tensor a checkpoint holds."""
    n_layers = model.config.num_hidden_layers
    out: dict[str, tuple[str, int | None]] = {}
    for name, t in model.state_dict().items():
        m = re.match(r"(layers|mtp)\.(\d+)\.(.*)", name)
        if m is None:
            out[name if name.startswith("lm_head") else f"model.{name}"] = (name, None)
            continue
        kind, i, rest = m.group(1), int(m.group(2)), m.group(3)
        prefix = f"model.layers.{i if kind == 'layers' else n_layers + i}."
        em = re.fullmatch(r"mlp\.experts\.(gate_proj|up_proj|down_proj)", rest)
        if em:
            for e in range(t.shape[0]):
                out[f"{prefix}mlp.experts.{e}.{em.group(1)}.weight"] = (name, e)
        else:
            out[prefix + rest] = (name, None)
    for k in range(len(model.mtp)):
        out[f"model.layers.{n_layers + k}.embed_tokens.weight"] = ("embed_tokens.weight", None)
        out[f"model.layers.{n_layers + k}.shared_head.head.weight"] = ("lm_head.weight", None)
    return out


def hf_sources(names: dict) -> dict[str, dict[int | None, str]]:
    """Our full-model tensor name -> {expert row (None for a whole tensor): HF tensor name}, from `hf_name_map`;
    the MTP copies of the embedding and head are not sources (the main model's tensors are read)."""
    out: dict[str, dict[int | None, str]] = {}
    for hf, (ours, expert) in names.items():
        out.setdefault(ours, {}).setdefault(expert, hf)
    return out


def _weight_map(path: Path) -> dict[str, str]:
    index = path / INDEX_NAME
    if index.exists():
        try:
            data = json.loads(index.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index: {e}") from None
        # the names and files are used as strings and paths below: a wrong type would be a traceback there
        wm = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(wm, dict):
            raise CheckpointError(f"{index} is not a valid safetensors index: weight_map is missing or not an object "
                                  f"of tensor name -> shard file")
        # a plain name in this directory: `dsv3 convert` writes each shard under its name in the output, so an
        # absolute path or a "../" one would overwrite a file outside it (and reading would leave the directory)
        bad = next(((k, f) for k, f in wm.items() if not isinstance(f, str) or f != Path(f).name
                    or f in ("", ".", "..") or "\\" in f), None)
        if bad is not None:
            raise CheckpointError(f"{index} is not a valid safetensors index: weight_map[{bad[0]!r}]={bad[1]!r} is "
                                  f"not a shard file name in the directory")
        return wm
    single = path / SINGLE_NAME
    if single.exists():
        try:
            with safe_open(single, framework="pt") as f:
                return {k: SINGLE_NAME for k in f.keys()}
        except Exception as e:  # safetensors raises its own error types for a truncated or corrupt header
            raise CheckpointError(f"cannot read shard {single}: {e}") from None
    raise CheckpointError(f"{path} has neither {INDEX_NAME} nor {SINGLE_NAME}")


def _default_dtype(cfg: ModelConfig) -> torch.dtype:
    name = cfg.torch_dtype or cfg.hf_extra.get("dtype") or "bfloat16"
    dt = getattr(torch, str(name), None)
    return dt if isinstance(dt, torch.dtype) and dt.is_floating_point and dt.itemsize >= 2 else torch.bfloat16


def check_quantization(qc, path: Path) -> None:
    """Refuse a `quantization_config` the reader cannot honour, naming the field: only the released FP8 scheme
    (e4m3 weights with one fp32 scale per 128x128 block, activations quantised dynamically: FP8_QUANT_CONFIG) is
    read; any other (AWQ, GPTQ, another block size, static activation scales) would be loaded wrong or half-used."""
    if qc is None:
        return
    if not isinstance(qc, dict):
        raise CheckpointError(f"{path}: config.json quantization_config must be an object, got {qc!r}")
    if qc.get("scale_fmt", "ue8m0") != "ue8m0":     # V3.1's power-of-two scales (fp32 on disk) read like any other
        raise CheckpointError(f"{path}: config.json quantization_config.scale_fmt={qc['scale_fmt']!r} is not supported "
                              f"(only 'ue8m0', DeepSeek-V3.1's power-of-two block scales)")
    for key, want in FP8_QUANT_CONFIG.items():
        if (key in qc and qc[key] != want) or (key == "quant_method" and key not in qc):
            raise CheckpointError(f"{path}: config.json quantization_config.{key}={qc.get(key)!r} is not supported "
                                  f"(only {key}={want!r}: DeepSeek-V3's released block-wise FP8)")


_SAFETENSORS_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2,
                      "U16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "I8": 1, "U8": 1, "BOOL": 1}


class CheckpointReader:
    """A HF directory opened for streaming: its config, where each tensor lives, and tensor-at-a-time reads."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.config = ModelConfig.from_hf(self.path)
        check_quantization(self.config.hf_extra.get("quantization_config"), self.path)
        self.weight_map = _weight_map(self.path)
        missing_files = sorted({f for f in self.weight_map.values() if not (self.path / f).exists()})
        if missing_files:
            raise CheckpointError(f"shard files listed in the index are missing: {_names(missing_files)}")
        # released FP8: `X.weight` (e4m3) comes with `X.weight_scale_inv` (fp32, one per 128x128 block)
        self.scales = {k[: -len("_scale_inv")]: k for k in self.weight_map if k.endswith(".weight_scale_inv")}
        self._handles: dict[str, object] = {}

    def model_config(self) -> ModelConfig:
        """The config of the model the tensors describe: the file's, less the MTP module when the checkpoint has no
        MTP tensor at all (what transformers writes; a warning says so). A partial MTP layer stays an error."""
        cfg = self.config
        mtp_prefixes = tuple(f"model.layers.{cfg.num_hidden_layers + k}." for k in range(cfg.num_nextn_predict_layers))
        if mtp_prefixes and not any(k.startswith(mtp_prefixes) for k in self.weight_map):
            warnings.warn(f"{self.path} has no MTP tensors ({mtp_prefixes[0]}*): loading without the MTP module "
                          f"(num_nextn_predict_layers 0)", stacklevel=3)
            return cfg.replace(num_nextn_predict_layers=0)
        return cfg

    def check_names(self, expected: dict) -> None:
        """Raise naming every missing, unexpected or orphaned tensor, before anything is read."""
        wm = self.weight_map
        orphans = [s for w, s in self.scales.items() if w not in wm]
        missing = [k for k in expected if k not in wm]
        unexpected = [k for k in wm if k not in expected and not k.endswith(".weight_scale_inv")
                      and not NOT_WEIGHTS.search(k)]
        if missing or unexpected or orphans:
            parts = [f"{what}: {_names(v)}" for what, v in
                     (("missing tensors", missing), ("unexpected tensors", unexpected),
                      ("scales without a weight", orphans)) if v]
            raise CheckpointError(f"{self.path} does not match the model of its config.json; " + "; ".join(parts))

    def read(self, name: str, dtype: torch.dtype | None = None, shape: tuple | None = None) -> torch.Tensor:
        """One tensor; an FP8 weight is dequantised into `dtype` (default fp32) when its scale exists. `shape`: the
        model's, checked against the stored tensor (check_stored)."""
        file = self.weight_map[name]
        t = self.read_stored(name)
        check_stored(name, self.path / file, t.dtype, tuple(t.shape), shape)
        if name in self.scales:
            t = _dequantize(name, t, self.read(self.scales[name]), dtype or torch.float32)
        elif t.dtype.itemsize == 1 and t.dtype.is_floating_point:
            # an FP8 weight means nothing without its block scales: cast as is, it would be silently wrong
            raise CheckpointError(f"tensor {name} in {self.path / file} is {str(t.dtype).removeprefix('torch.')} "
                                  f"but {name}_scale_inv is missing")
        return t

    def _handle(self, name: str):
        file = self.weight_map[name]
        if file not in self._handles:
            try:
                self._handles[file] = safe_open(self.path / file, framework="pt")
            except Exception as e:  # safetensors raises its own error types for corrupt headers
                raise CheckpointError(f"cannot read shard {self.path / file}: {e}") from None
        return self._handles[file]

    def read_stored(self, name: str) -> torch.Tensor:
        """One tensor as the file stores it, unchecked."""
        handle = self._handle(name)
        try:
            return handle.get_tensor(name)
        except Exception as e:
            raise CheckpointError(f"cannot read tensor {name} from {self.path / self.weight_map[name]}: {e}") from None

    def stored_bytes(self, name: str) -> int:
        """The stored size of a tensor, from the file's header (nothing read)."""
        handle = self._handle(name)
        try:
            sl = handle.get_slice(name)
            n = 1
            for d in sl.get_shape():
                n *= d
            return n * _SAFETENSORS_BYTES.get(sl.get_dtype(), 4)
        except Exception as e:
            raise CheckpointError(f"cannot read tensor {name} from {self.path / self.weight_map[name]}: {e}") from None

    def by_file(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for k, f in self.weight_map.items():
            out.setdefault(f, []).append(k)
        return dict(sorted(out.items()))

    def close(self) -> None:
        self._handles.clear()


def load_pretrained(path: str | Path, dtype: torch.dtype | None = None,
                    device: torch.device | str | None = None) -> Transformer:
    """Load a HF-format DeepSeek-V3/V2 directory (bf16/fp32 or released FP8) into a `Transformer`."""
    ckpt = CheckpointReader(path)
    cfg = ckpt.model_config()
    mtp_prefixes = tuple(f"model.layers.{cfg.num_hidden_layers + k}." for k in range(cfg.num_nextn_predict_layers))
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to(dtype or _default_dtype(cfg)).to_empty(device=torch.device(device or "cpu"))
    for b in model.buffers():  # every weight is overwritten below; buffers (bias, expert counts) start at zero
        b.zero_()
    name_map = hf_name_map(model)
    ckpt.check_names(name_map)

    from .fill import fill_from_hf
    fill_from_hf(model, ckpt, name_map, model.embed_tokens.weight.dtype)
    state = model.state_dict()
    tied = [(hf_name, ours) for hf_name, (ours, _) in name_map.items()     # compared with the main copies read
            if hf_name.startswith(mtp_prefixes) and ours in ("embed_tokens.weight", "lm_head.weight")]
    for hf_name, ours in tied:
        if not torch.equal(ckpt.read(hf_name, shape=tuple(state[ours].shape)).to(state[ours].dtype), state[ours].cpu()):
            warnings.warn(f"{hf_name} differs from the main model's {ours}; dsv3 shares one tensor "
                          f"(spec 1.8) and uses the main model's", stacklevel=2)
    ckpt.close()
    return model


def check_stored(name: str, file: Path, dtype: torch.dtype | None, shape: tuple, expected: tuple | None) -> None:
    """Refuse a stored tensor that cannot be this model's, in one line naming tensor and file: an integer or bool
    tensor (a quantiser's packed words, a damaged file) would be cast to float silently by `copy_`, and a wrong shape
    would be written out as it is by `dsv3 convert` (its error then coming only at the next load)."""
    if dtype is not None and not dtype.is_floating_point:
        raise CheckpointError(f"tensor {name} in {file} is {str(dtype).removeprefix('torch.')}, not a "
                              f"floating-point weight")
    if expected is not None and tuple(shape) != tuple(expected):
        raise CheckpointError(f"tensor {name} has shape {tuple(shape)}, the config expects {tuple(expected)} "
                              f"(in {file})")


def expected_shapes(model: Transformer, name_map: dict) -> dict[str, tuple]:
    """HF tensor name -> the shape `model` (a meta-device one will do) gives it: a stacked expert's row for a
    per-expert name."""
    state = model.state_dict()
    return {hf: tuple(state[ours].shape[1:] if expert is not None else state[ours].shape)
            for hf, (ours, expert) in name_map.items()}


def _dequantize(name: str, w: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    expected = tuple(-(-n // BLOCK) for n in w.shape)
    if w.dim() != 2 or tuple(scale_inv.shape) != expected:
        raise CheckpointError(f"tensor {name}: scale_inv shape {tuple(scale_inv.shape)} does not match weight "
                              f"{tuple(w.shape)} (expected {expected} for {BLOCK}x{BLOCK} blocks)")
    try:
        return dequantize_blocks(w, scale_inv.float(), dtype)
    except ValueError as e:
        raise CheckpointError(f"tensor {name}: {e}") from None


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", size, re.I)
    if not m:
        raise ValueError(f"cannot parse shard size {size!r}; use bytes or e.g. '5GB'")
    unit = (m.group(2) or "B").upper()
    mult = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}[unit]
    return int(float(m.group(1)) * mult)


class ShardWriter:
    """Writes safetensors shards into a directory, then its index and the matching `config.json`."""

    def __init__(self, config: ModelConfig, dtype: torch.dtype, fp8: bool):
        self.config, self.dtype, self.fp8 = config, dtype, fp8
        self.weight_map: dict[str, str] = {}
        self.total = 0

    def write_shard(self, file: Path, tensors: dict[str, torch.Tensor]) -> None:
        for k, t in tensors.items():
            self.weight_map[k] = file.name
            self.total += t.numel() * t.element_size()
        save_file(tensors, str(file), metadata={"format": "pt"})

    def finish(self, directory: Path) -> None:
        index = {"metadata": {"total_size": self.total}, "weight_map": self.weight_map}
        (directory / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True))
        cfg = self.config.to_hf()
        cfg.setdefault("architectures", [MODEL_TYPES[self.config.model_type]])
        # under the key(s) the source used: transformers 5 writes `dtype`, and a stale one beside a new torch_dtype
        # would be what transformers 5 reads
        for key in [k for k in ("torch_dtype", "dtype") if k in cfg] or ["torch_dtype"]:
            cfg[key] = str(self.dtype).removeprefix("torch.")
        if self.fp8:
            cfg["quantization_config"] = dict(FP8_QUANT_CONFIG, **({"scale_fmt": "ue8m0"} if self.config.ue8m0_scales
                                                                   else {}))
        else:
            cfg.pop("quantization_config", None)
        (directory / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")


def check_save_destination(path: Path) -> None:
    """save_pretrained goes to a new directory, an empty one, or an earlier save_pretrained's output: the atomic
    rename replaces the whole directory, so anything else there (a tokenizer, the user's files, a home directory
    given as ".") would be deleted. FileExistsError naming what is in the way."""
    if not path.exists():
        return
    if not path.is_dir():
        raise FileExistsError(f"{path} exists and is not a directory")
    foreign = sorted(p.name for p in path.iterdir() if not (p.is_file() and SAVED_FILE.fullmatch(p.name)))
    if foreign:
        shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        raise FileExistsError(f"{path} holds files save_pretrained did not write ({shown}); save into a new or "
                              f"empty directory (the save replaces the whole directory)")


def save_pretrained(model: Transformer, path: str | Path, max_shard_size: int | str = "5GB",
                    dtype: torch.dtype | None = None, quantize_fp8: bool = False, tensors=None) -> None:
    """Write `model` as a HF directory that `load_pretrained` and transformers load; atomic. `path`: a new or empty
    directory, or an earlier save_pretrained's output (replaced whole); anything else is refused (never deleted).

    dtype: storage dtype of the non-FP8 tensors (default: each tensor's own; the routing bias stays fp32).
    quantize_fp8: store attention/FFN/expert Linear weights as e4m3 with 128x128 `weight_scale_inv` (released format).
    tensors: where the values come from, a mapping from our names read one at a time as the shards are written
    (default: model.state_dict()); with it `model` may be a meta-device model that only gives names, shapes and
    dtypes (dsv3.train.export streams a sharded checkpoint so, never holding the whole model).
    """
    limit = _parse_size(max_shard_size)
    check_save_destination(Path(path))
    state = model.state_dict()
    # plan: (hf name, ours, expert, nbytes) in checkpoint order; tensors are materialised one shard at a time
    plan = []
    for hf_name, (ours, expert) in hf_name_map(model).items():
        t = state[ours] if expert is None else state[ours][expert]
        fp8 = quantize_fp8 and FP8_WEIGHT.search(hf_name) is not None
        out_dtype = torch.float32 if hf_name.endswith("e_score_correction_bias") else (dtype or t.dtype)
        nbytes = t.numel() * (1 if fp8 else out_dtype.itemsize)
        plan.append((hf_name, ours, expert, fp8, out_dtype, nbytes))
    shards, cur, size = [], [], 0
    for item in plan:
        if cur and size + item[-1] > limit:
            shards.append(cur)
            cur, size = [], 0
        cur.append(item)
        size += item[-1]
    if cur:
        shards.append(cur)

    writer = ShardWriter(model.config, dtype or model.embed_tokens.weight.dtype, quantize_fp8)
    source = state if tensors is None else tensors
    with atomic_directory(path) as tmp:
        for i, shard in enumerate(shards, start=1):
            file = SINGLE_NAME if len(shards) == 1 else f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            tensors = {}
            for hf_name, ours, expert, fp8, out_dtype, _ in shard:
                t = (source[ours] if expert is None else source[ours][expert]).detach().to("cpu")
                if fp8:
                    q, s = quantize_blocks(t, pow2=model.config.ue8m0_scales)
                    tensors[hf_name], tensors[hf_name + "_scale_inv"] = q, s
                else:
                    tensors[hf_name] = t.to(out_dtype).clone().contiguous()  # clone: tied copies must not alias
            writer.write_shard(tmp / file, tensors)
            del tensors
        writer.finish(tmp)


__all__ = ["load_pretrained", "save_pretrained", "hf_name_map", "expected_shapes", "check_stored", "CheckpointReader",
           "ShardWriter", "CheckpointError"]
