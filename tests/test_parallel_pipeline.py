"""Pipeline parallelism with DualPipeV (dsv3.parallel.pipeline, spec 5) against the single-process run.

Two spawned gloo ranks run ScheduleDualPipeV over the 4 chunks of a tiny float64 model (4 decoder layers, one per
chunk, MoE layers 1-3 and an MoE MTP module on the last chunk): rank 0 holds chunks 0 and 3, rank 1 chunks 1 and 2.
A batch of 8 sequences is split into 4 micro-batches of 2; in each process a reference copy of the model trains on
the whole batch. For 2 SGD steps, the pipeline's loss (rank 0, mean over micro-batches) and every local parameter's
gradient must match the reference to 1e-10 (relative; float64, only the summation order differs). One spawn runs
everything and saves what it measured; the tests assert on it.
"""

import datetime

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from conftest import build, run_ranks, tiny_config

from dsv3.parallel.pipeline import build_dualpipev, lm_loss_fn, split_stages
from dsv3.train.trainer import lm_losses

WORLD, STEPS, B, T, N_MICRO = 2, 2, 8, 12, 4
MTP_WEIGHT, LR = 0.3, 0.5
TOL = 1e-10


def _ce(logits, targets):          # float64 CE (the trainer's default casts to fp32)
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def _config():
    return tiny_config(num_hidden_layers=4, first_k_dense_replace=1)


def _worker(rank, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))   # a send/recv mismatch fails, not hangs
    try:
        cfg = _config()
        ref, pp = build(cfg, dtype=torch.float64).train(), build(cfg, dtype=torch.float64).train()
        schedule, stages = build_dualpipev(pp, rank, WORLD, lm_loss_fn(MTP_WEIGHT, _ce), N_MICRO, (B // N_MICRO, T))
        local = {name for s in stages for name, _ in s.submod.named_parameters()}
        windows = torch.randint(0, cfg.vocab_size, (STEPS, B, T + 1), generator=torch.Generator().manual_seed(1))
        opt_ref, opt_pp = torch.optim.SGD(ref.parameters(), lr=LR), torch.optim.SGD(pp.parameters(), lr=LR)
        ref_params = dict(ref.named_parameters())
        out = {"stage_index": [s.stage_index for s in stages], "local": sorted(local), "loss": [], "grad_err": [],
               "missing": [], "stray": []}
        for step in range(STEPS):
            main, mtp, _, _ = lm_losses(ref, windows[step], ce=_ce)
            ref_loss = main + MTP_WEIGHT * torch.stack(mtp).mean()
            ref_loss.backward()
            if rank == 0:          # holds chunk 0 (takes the ids) and chunk 3 (computes the loss)
                losses = []
                schedule.step(windows[step, :, :-1], target=windows[step], losses=losses)
                out["loss"].append((torch.stack(losses).mean().item(), ref_loss.item(), len(losses)))
            else:
                schedule.step()
            errs, missing, stray = {}, [], []
            for name, p in pp.named_parameters():
                if name not in local:
                    if p.grad is not None:
                        stray.append(name)          # a chunk of the other rank ran here
                    continue
                if p.grad is None:
                    missing.append(name)
                    continue
                g = ref_params[name].grad
                errs[name] = ((p.grad - g).abs().max() / g.abs().max().clamp_min(1e-300)).item()
            out["grad_err"].append(errs)
            out["missing"].append(missing)
            out["stray"].append(stray)
            opt_ref.step(), opt_pp.step()
            opt_ref.zero_grad(), opt_pp.zero_grad()
        torch.save(out, out_dir / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return run_ranks(_worker, WORLD, tmp_path_factory.mktemp("pp"), "pipeline")


def test_dualpipev_matches_the_single_process_run(ranks):
    assert [res["stage_index"] for res in ranks] == [[0, 3], [1, 2]]        # the V
    for step, (pp_loss, ref_loss, n) in enumerate(ranks[0]["loss"]):
        assert n == N_MICRO
        assert abs(pp_loss - ref_loss) <= TOL * abs(ref_loss), (step, pp_loss, ref_loss)
    assert len(ranks[0]["loss"]) == STEPS
    for r, res in enumerate(ranks):
        assert len(res["grad_err"]) == STEPS
        for step, (errs, missing, stray) in enumerate(zip(res["grad_err"], res["missing"], res["stray"])):
            assert not missing and not stray, (r, step, missing, stray)
            worst = max(errs, key=errs.get)
            assert errs[worst] < TOL, (r, step, worst, errs[worst])
    # together the two ranks cover every parameter of the model, each exactly once
    names = [n for n, _ in build(_config()).named_parameters()]
    assert sorted(ranks[0]["local"] + ranks[1]["local"]) == sorted(names)
    assert "mtp.0.eh_proj.weight" in ranks[0]["local"] and "embed_tokens.weight" in ranks[0]["local"]


def test_split_stages_shares_parameters_and_balances_layers():
    model = build(tiny_config(num_hidden_layers=5))
    chunks = split_stages(model, 4)
    assert [len(c.layers) for c in chunks] == [2, 1, 1, 1]
    assert list(chunks[0].layers) == ["0", "1"] and list(chunks[3].layers) == ["4"]
    params = dict(model.named_parameters())
    seen = []
    for c in chunks:
        for name, p in c.named_parameters():
            assert p is params[name], name         # the model's own tensors, no copies
            seen.append(name)
    assert sorted(seen) == sorted(params)          # each parameter in exactly one chunk
    # chained in one process, the chunks compute the model's logits and MTP logits
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    act = ids
    for c in chunks:
        act = c(*act) if isinstance(act, tuple) else c(act)
    hidden = model.hidden_states(ids)
    torch.testing.assert_close(act[0], model.lm_head(hidden), rtol=0, atol=0)
    torch.testing.assert_close(act[1], model.mtp_logits(hidden, ids)[0], rtol=0, atol=0)
    with pytest.raises(ValueError, match="cannot split 5 layers into 6"):
        split_stages(model, 6)


def test_too_few_microbatches_raise():
    with pytest.raises(ValueError, match="n_microbatches >= 2 \\* world = 4"):
        build_dualpipev(build(_config()), 0, WORLD, lm_loss_fn(), 3, (2, T))
