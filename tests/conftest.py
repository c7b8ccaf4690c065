import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest
import torch

from dsv3 import ModelConfig, Transformer


def tiny_config(**overrides) -> ModelConfig:
    """A small V3-shaped config: groups, dense first layer, q_lora, YaRN, MTP."""
    base = dict(vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=8,
                num_experts_per_tok=2, n_group=4, topk_group=2, first_k_dense_replace=1, kv_lora_rank=32,
                q_lora_rank=48, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                max_position_embeddings=16384, routed_scaling_factor=2.5, num_nextn_predict_layers=1,
                rope_scaling=dict(type="yarn", factor=4.0, original_max_position_embeddings=4096, beta_fast=32,
                                  beta_slow=1, mscale=1.0, mscale_all_dim=1.0), torch_dtype="float32")
    base.update(overrides)
    return ModelConfig(**base)


def build(cfg: ModelConfig, seed: int = 0, dtype=torch.float32, std: float = 0.02, bias: bool = True) -> Transformer:
    """A randomly initialised model; std 0.02 so routing and attention are far from uniform. With `bias`, the
    routing biases are random too, so that selection really depends on them."""
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to(dtype).to_empty(device="cpu")
    model.init_weights(std=std)
    if bias:
        with torch.no_grad():
            for name, b in model.named_buffers():
                if name.endswith("e_score_correction_bias"):
                    b.uniform_(-0.05, 0.05)
    return model.eval()



def random_prompts(lengths, vocab: int = 96, seed: int = 0) -> list[list[int]]:
    """Prompts of the given lengths, token ids uniform in [2, vocab) (0 and 1 stay clear of BOS / EOS), seeded."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, vocab, (n,), generator=g).tolist() for n in lengths]


def reference_greedy(model, prompt: list[int], n: int) -> list[int]:
    """n greedy tokens after prompt from full forwards without any cache: the engines' reference."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids], device=model.embed_tokens.weight.device))[0, -1].argmax()))
    return ids[len(prompt):]

@pytest.fixture
def tmp_ckpt(tmp_path):
    return tmp_path / "ckpt"


def interpreter_cases(module: str, fn: str = "_interpreter_cases") -> dict:
    """Errors from `tests/<module>.py`'s `fn()` (`_interpreter_cases`), run in a subprocess under TRITON_INTERPRET=1 (it
    must be set before the @triton.jit decorators run, i.e. before dsv3.kernels is imported)."""
    here = Path(__file__).resolve().parent
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join([str(here.parent / "src"), str(here), os.environ.get("PYTHONPATH", "")]))
    code = f"import json, {module} as t; print('RESULT ' + json.dumps(t.{fn}()))"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def init_gloo(rank: int, world: int, init_file) -> None:
    """A spawned test rank: one thread, a gloo process group through `init_file`, and a timeout so that a
    collective mismatch fails the rank instead of hanging it."""
    import datetime

    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))


def _leave_after(rank: int, worker, *args) -> None:
    """Run a spawned rank's `worker`, then leave without interpreter shutdown: gloo's worker thread drops a finished
    collective's tensors after the caller's wait returned, and a drop that falls in shutdown aborts the rank
    ("terminate called without an active exception"; dsv3.train.checkpoint._exchange_outcomes). An exception
    still reaches mp.spawn's report; only a rank whose results are saved skips the shutdown."""
    worker(rank, *args)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_ranks(worker, world: int, tmp: Path, what: str, args: tuple | None = None, name: str = "rank",
              timeout_s: int = 120) -> list:
    """Spawn `world` processes running `worker(rank, *args)` (default args: an init file and `tmp`; each saves
    `tmp/{name}{rank}.pt`) and return the saved results in rank order; a hang fails the test after `timeout_s`
    instead of blocking the suite."""
    import torch.multiprocessing as mp
    ctx = mp.spawn(_leave_after, args=(worker, *(args or (str(tmp / "init"), tmp))), nprocs=world, join=False)
    for _ in range(timeout_s):
        if ctx.join(timeout=1):
            break
    else:
        for p in ctx.processes:
            p.kill()
        pytest.fail(f"{what} workers did not finish")
    return [torch.load(tmp / f"{name}{r}.pt", weights_only=False) for r in range(world)]


def expert_slices(model) -> dict[str, tuple[int, int, int]]:
    """{parameter name: (first expert, local experts, all experts)} of every expert-parallel parameter (dim 0 is
    the expert); empty for an unsharded model."""
    from dsv3.parallel.expert import ExpertParallelExperts
    out = {}
    for mname, m in model.named_modules():
        if isinstance(m, ExpertParallelExperts):
            for pname, p in m.named_parameters(recurse=False):
                out[f"{mname}.{pname}"] = (m.first_expert, p.shape[0], m.n_experts)
    return out
