"""Issue 17: compiling the blocks must not drop the MoE's buffer mutation (`tokens_per_expert += counts`, inside
every compiled block), or the aux-loss-free bias update (spec 1.7) silently stops while the loss still falls. Over 5
steps from the same seed, fp32, the compiled trainer's per-expert loads (what train_step returns, summed over the
micro-batches) equal eager's exactly, and so do the routing biases they move; and the biases do move.

- CPU: the blocks compiled as parallelize compiles them (`block.compile()` on every main and MTP block), with the
  aot_eager backend: dynamo and AOT autograd's functionalisation of the buffer mutation, as on the GPU, without
  inductor's codegen (bf16, through the grouped GEMM; train.compile on the CPU: tests/test_train_compile.py);
- CUDA: train.compile=true, what `dsv3 train` runs (inductor)."""

from __future__ import annotations

import pytest
import torch

from dsv3.model.moe import moe_layers
from dsv3.train import Trainer

from test_train_loop import small_run


def _history(trainer: Trainer, steps: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """(loads, biases) after each step: (steps, MoE layers, E) each."""
    loads, biases = [], []
    for _ in range(steps):
        _, step_loads = trainer.train_step()
        loads.append(step_loads.clone())
        biases.append(torch.stack([m.gate.e_score_correction_bias.detach().clone()
                                   for _, m in moe_layers(trainer.model)]))
    trainer.logger.close()
    return torch.stack(loads).cpu(), torch.stack(biases).cpu()


def _check(eager: tuple[torch.Tensor, torch.Tensor], compiled: tuple[torch.Tensor, torch.Tensor]) -> None:
    (loads_e, bias_e), (loads_c, bias_c) = eager, compiled
    assert loads_e.sum() > 0 and not torch.equal(bias_e[-1], torch.zeros_like(bias_e[-1])), "nothing was counted"
    assert len(bias_e) == 5 and not torch.equal(bias_e[0], bias_e[-1]), "the routing biases never moved"
    assert loads_c.sum() == loads_e.sum(), "the compiled blocks lost expert counts"
    assert torch.equal(loads_c, loads_e)
    torch.testing.assert_close(bias_c, bias_e, rtol=0, atol=1e-6)


def test_compiled_blocks_keep_expert_loads_and_bias_updates_on_cpu(tmp_path):
    from torch._dynamo.testing import CompileCounterWithBackend
    torch._dynamo.reset()
    runs = {}
    for compiled in (False, True):
        # bf16 weights: dynamo traces `_grouped_mm` only in bf16 (its meta function refuses fp32)
        t = Trainer(small_run(tmp_path, f"loads{compiled}", train={"batch_size_start": 0, "dtype": "bf16-params"},
                              log={"val_batches": 0}), progress=False)
        counter = CompileCounterWithBackend("aot_eager")
        if compiled:
            for block in list(t.model.layers) + list(t.model.mtp):
                block.compile(backend=counter)
        runs[compiled] = _history(t)
        if compiled:
            assert counter.frame_count >= 2       # the blocks did run compiled
    torch._dynamo.reset()
    _check(runs[False], runs[True])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run through the device tool)")
def test_compiled_trainer_keeps_expert_loads_and_bias_updates_on_cuda(tmp_path):
    torch.backends.cuda.matmul.allow_tf32 = False
    runs = {}
    for compiled in (False, True):
        t = Trainer(small_run(tmp_path, f"loads{compiled}", train={"device": "cuda", "dtype": "fp32",
                                                                    "compile": compiled, "batch_size_start": 0},
                              log={"val_batches": 0}), progress=False)
        runs[compiled] = _history(t)
    _check(runs[False], runs[True])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run through the device tool)")
@pytest.mark.parametrize("micro", [2, 4])
def test_cuda_graph_blocks_keep_expert_loads_and_bias_updates(tmp_path, micro):
    """train.cuda_graphs: the compiled blocks replayed as CUDA graphs (the buffer mutation is on a static input,
    which graph trees keep) count what eager counts, step for step; graphs were recorded and none was skipped.
    Two micro-batches a step (gradients accumulated in the Trainer's own buffers, not in graph memory that the
    next replay overwrites: a wrong gradient moves the next step's routing) and one (gradients in graph memory,
    read before the next replay)."""
    from torch._dynamo.utils import counters
    from torch._inductor.cudagraph_trees import get_manager
    torch.backends.cuda.matmul.allow_tf32 = False
    torch._dynamo.reset()
    counters.clear()
    runs, weights = {}, {}
    for graphs in (False, True):
        train = {"device": "cuda", "dtype": "fp32", "compile": graphs, "cuda_graphs": graphs, "batch_size_start": 0,
                 "micro_batch_size": micro}
        t = Trainer(small_run(tmp_path, f"graphs{graphs}", train=train, log={"val_batches": 0}), progress=False)
        runs[graphs] = _history(t)
        weights[graphs] = {k: v.detach().clone() for k, v in t.model.state_dict().items()}
    manager = get_manager(torch.cuda.current_device(), create_if_none_exists=False)   # t (graphs) still alive
    assert manager is not None and manager.roots, "no CUDA graph was recorded"
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
    _check(runs[False], runs[True])
    for k, w in weights[False].items():      # fp32 compile changes roundings only (~1e-6); a lost gradient far more
        torch.testing.assert_close(weights[True][k], w, rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run through the device tool)")
def test_cuda_graphs_with_fp8_read_each_steps_refreshed_weight_codes(tmp_path):
    """train.cuda_graphs with train.precision=fp8 and two micro-batches a step: the FP8 weight cache is refreshed
    in place after each optimizer step (dsv3.fp8.weight_cache), so the captured graphs must read the new codes.
    Stale codes would move the losses by the update's size (lr 3e-3 on ~0.02 weights: far above 1e-4); the same
    compiled blocks without graphs are the reference, step for step."""
    from torch._dynamo.utils import counters
    torch.backends.cuda.matmul.allow_tf32 = False
    torch._dynamo.reset()
    counters.clear()
    losses = {}
    for graphs in (False, True):
        train = {"device": "cuda", "dtype": "fp32", "precision": "fp8", "compile": True, "cuda_graphs": graphs,
                 "batch_size_start": 0, "micro_batch_size": 2}
        t = Trainer(small_run(tmp_path, f"fp8graphs{graphs}", train=train, log={"val_batches": 0}), progress=False)
        assert t.fp8_cache
        losses[graphs] = []
        for _ in range(5):
            stats, _ = t.train_step()
            losses[graphs].append(stats.loss)
        t.logger.close()
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
    assert len(set(losses[False])) == 5, "the loss never moved: nothing to tell stale codes from fresh ones"
    torch.testing.assert_close(torch.tensor(losses[True]), torch.tensor(losses[False]), rtol=1e-4, atol=0)
