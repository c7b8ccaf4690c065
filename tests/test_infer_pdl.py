"""Programmatic dependent launch (`EngineConfig.pdl`, dsv3.kernels.triton_setup): the switch's scope on any machine;
on a Hopper GPU, generations whose decode graphs were captured with it equal those without, token for token (PDL
changes when a kernel launches, never what it computes, so a race would show as a changed token)."""

from __future__ import annotations

import pytest
import torch
from conftest import build, random_prompts, tiny_config

from dsv3.infer import Engine, EngineConfig, SamplingParams
from dsv3.infer.graphs import _launch_mode
from dsv3.kernels.triton_setup import _PDL, HAS_TRITON, pdl_launch, programmatic_launch


def test_programmatic_launch_is_scoped_and_never_reaches_cpu_tensors():
    x = torch.zeros(2)
    assert pdl_launch(x) == {} and not _PDL.get()
    with programmatic_launch():
        assert _PDL.get()
        assert pdl_launch(x) == {}            # a CPU tensor (the interpreter): no PDL keywords, the kernel's default
        with programmatic_launch(False):
            assert not _PDL.get()
        assert _PDL.get()
    assert not _PDL.get()


def test_graph_launch_mode_sets_both_switches_only_inside():
    import torch._inductor.config as inductor_config
    before = getattr(inductor_config.triton, "enable_pdl", None)
    with _launch_mode(True):
        assert _PDL.get()
        if before is not None:
            assert inductor_config.triton.enable_pdl is True
    assert not _PDL.get() and getattr(inductor_config.triton, "enable_pdl", None) == before
    with _launch_mode(False):
        assert not _PDL.get()


def test_engine_config_pdl_must_be_a_boolean():
    with pytest.raises(ValueError, match="EngineConfig.pdl must be true or false"):
        EngineConfig(pdl="false")
    assert EngineConfig().pdl is True   # the default since it was measured (RESULTS.md, twenty-fourth session)


@pytest.mark.gpu
@pytest.mark.skipif(not (torch.cuda.is_available() and HAS_TRITON), reason="needs a CUDA GPU with triton (run "
                    "through the device tool)")
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8-weights"])
def test_cuda_pdl_generations_equal_those_without(fp8):
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("programmatic dependent launch needs sm_90+")
    with programmatic_launch():
        assert pdl_launch(torch.zeros(1, device="cuda")) == {"PDL": True, "launch_pdl": True}
    model = build(tiny_config(vocab_size=96), seed=3, dtype=torch.bfloat16).cuda()
    if fp8:
        from dsv3.infer.fp8_weights import quantize_weights
        quantize_weights(model)
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    base = dict(block_size=16, num_blocks=64, compile_decode=True)
    for ps in (random_prompts([9], seed=5), random_prompts([5, 17, 30, 60], seed=6)):   # batch 1 (GEMV forms), 4
        # the PDL engine first: its capture compiles the layers (once per process), so inductor's kernels get PDL too
        on = Engine(model, config=EngineConfig(**base, pdl=True))
        got = on.generate(ps, params)
        want = Engine(model, config=EngineConfig(**base, pdl=False)).generate(ps, params)
        assert on.runner.graphs.pdl and on.stats()["graph_captures"] > 0
        assert [o.token_ids for o in got] == [o.token_ids for o in want]
