"""train.compile and train.compile_optimizer on the CPU (inductor's C++ backend): from the same seed, fp32, the
compiled trainer's losses equal eager's within compile noise. fp32 experts under compile run one at a time, eagerly
(dsv3.model.moe._expert_loop: the fake of the grouped GEMM that dynamo traces with takes bf16 only). One MoE layer
and no MTP block (whose shorter sequence recompiles every block with dynamic shapes) keep a cold compile ~30 s."""

from __future__ import annotations

import pytest
import torch

from dsv3.train import Trainer

from test_train_loop import small_run


def test_compiled_trainer_matches_eager_on_cpu(tmp_path):
    runs = {}
    for compiled in (False, True):
        torch._dynamo.reset()
        t = Trainer(small_run(tmp_path, f"compiled{compiled}",
                              model={"num_hidden_layers": 1, "first_k_dense_replace": 0, "num_nextn_predict_layers": 0},
                              train={"compile": compiled, "compile_optimizer": compiled, "batch_size_start": 0},
                              log={"val_batches": 0}, checkpoint={"interval": 0}), progress=False)
        assert (t.compiled_step is not None) == compiled
        assert (t.model.layers[0]._compiled_call_impl is not None) == compiled
        runs[compiled] = [t.train_step()[0].loss for _ in range(3)]
        t.logger.close()
    torch._dynamo.reset()
    assert runs[True] == pytest.approx(runs[False], rel=1e-5)
