"""Pipeline parallelism with DualPipeV (dsv3.parallel.pipeline, spec 5) against the single-process run.

Two spawned gloo ranks run ScheduleDualPipeV over the 4 chunks of a tiny float64 model (4 decoder layers, one per
chunk, MoE layers 1-3 and an MoE MTP module on the last chunk): rank 0 holds chunks 0 and 3, rank 1 chunks 1 and 2.
A batch of 8 sequences is split into 4 micro-batches of 2; in each process a reference copy of the model trains on
the whole batch. For 2 SGD steps, the pipeline's loss (rank 0, mean over micro-batches) and every local parameter's
gradient must match the reference to 1e-10 (relative; float64, only the summation order differs). The same runs
again with the F/B overlap handler (dsv3.parallel.overlap): every OVERLAP_F_B pair must go through it, and losses and
gradients must be bit-identical to the sequential runtime's (the concurrency itself is proven in
test_parallel_pipeline_ep.py). One spawn runs everything and saves what it measured; the tests assert on it.
"""

import pytest
import torch
import torch.distributed as dist
from torch.distributed.pipelining import schedules
import torch.nn.functional as F
from conftest import build, init_gloo, run_ranks, tiny_config

from dsv3.parallel.overlap import enable_overlap, missing_torch_pieces
from dsv3.parallel.pipeline import build_dualpipev, split_stages
from dsv3.train.losses import PipelineLoss, lm_losses

WORLD, STEPS, B, T, N_MICRO = 2, 2, 8, 12, 4
MODES = ("sequential", "overlap")
MTP_WEIGHT, LR = 0.3, 0.5
TOL = 1e-10


def _ce(logits, targets):          # float64 CE (the trainer's default casts to fp32)
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def _config():
    return tiny_config(num_hidden_layers=4, first_k_dense_replace=1)


def _reference(cfg, windows):
    """(loss, {name: grad}) per step of the single-process run on the whole batch."""
    ref = build(cfg, dtype=torch.float64).train()
    opt = torch.optim.SGD(ref.parameters(), lr=LR)
    steps = []
    for step in range(STEPS):
        main, mtp, _, _ = lm_losses(ref, windows[step], ce=_ce)
        loss = main + MTP_WEIGHT * torch.stack(mtp).mean()
        loss.backward()
        steps.append((loss.item(), {n: p.grad.clone() for n, p in ref.named_parameters()}))
        opt.step()
        opt.zero_grad()
    return steps


def _train(cfg, rank, windows, ref, overlap: bool) -> dict:
    pp = build(cfg, dtype=torch.float64).train()
    schedule, stages = build_dualpipev(pp, rank, WORLD, PipelineLoss(_ce, MTP_WEIGHT), N_MICRO, (B // N_MICRO, T))
    handler = enable_overlap(schedule) if overlap else None
    local = {name for s in stages for name, _ in s.submod.named_parameters()}
    opt = torch.optim.SGD(pp.parameters(), lr=LR)
    out = {"stage_index": [s.stage_index for s in stages], "local": sorted(local), "loss": [], "grad_err": [],
           "missing": [], "stray": [], "grads": [], "missing_torch": missing_torch_pieces(schedule)}
    for step in range(STEPS):
        ref_loss, ref_grads = ref[step]
        if rank == 0:          # holds chunk 0 (takes the ids) and chunk 3 (computes the loss)
            losses = []
            schedule.step(windows[step, :, :-1].contiguous(), target=windows[step], losses=losses)
            out["loss"].append((torch.stack(losses).mean().item(), ref_loss, len(losses)))
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
            g = ref_grads[name]
            errs[name] = ((p.grad - g).abs().max() / g.abs().max().clamp_min(1e-300)).item()
        out["grad_err"].append(errs)
        out["missing"].append(missing)
        out["stray"].append(stray)
        out["grads"].append({n: p.grad.clone() for n, p in pp.named_parameters() if p.grad is not None})
        opt.step()
        opt.zero_grad()
    out["n_overlapped"] = handler.n_overlapped if handler else 0
    return out


def _worker(rank, init_file, out_dir):
    init_gloo(rank, WORLD, init_file)
    try:
        cfg = _config()
        windows = torch.randint(0, cfg.vocab_size, (STEPS, B, T + 1), generator=torch.Generator().manual_seed(1))
        ref = _reference(cfg, windows)
        res = {mode: _train(cfg, rank, windows, ref, overlap=mode == "overlap") for mode in MODES}
        # the overlap runs the same kernels in the same order per micro-batch: bit-identical to the sequential run
        res["overlap_equal"] = all(torch.equal(g, base[n]) for grads, base in zip(res["overlap"].pop("grads"),
                                                                                  res["sequential"].pop("grads"))
                                   for n, g in grads.items())
        torch.save(res, out_dir / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return run_ranks(_worker, WORLD, tmp_path_factory.mktemp("pp"), "pipeline")


@pytest.mark.parametrize("mode", MODES)
def test_dualpipev_matches_the_single_process_run(ranks, mode):
    assert [res[mode]["stage_index"] for res in ranks] == [[0, 3], [1, 2]]        # the V
    for step, (pp_loss, ref_loss, n) in enumerate(ranks[0][mode]["loss"]):
        assert n == N_MICRO
        assert abs(pp_loss - ref_loss) <= TOL * abs(ref_loss), (step, pp_loss, ref_loss)
    assert len(ranks[0][mode]["loss"]) == STEPS
    for r, res in enumerate(ranks):
        res = res[mode]
        assert len(res["grad_err"]) == STEPS
        for step, (errs, missing, stray) in enumerate(zip(res["grad_err"], res["missing"], res["stray"])):
            assert not missing and not stray, (r, step, missing, stray)
            worst = max(errs, key=errs.get)
            assert errs[worst] < TOL, (r, step, worst, errs[worst])
    # together the two ranks cover every parameter of the model, each exactly once
    names = [n for n, _ in build(_config()).named_parameters()]
    assert sorted(ranks[0][mode]["local"] + ranks[1][mode]["local"]) == sorted(names)
    assert "mtp.0.eh_proj.weight" in ranks[0][mode]["local"] and "embed_tokens.weight" in ranks[0][mode]["local"]


def test_the_overlap_handler_ran_every_pair_and_changed_nothing(ranks):
    for r, res in enumerate(ranks):
        assert res["overlap"]["missing_torch"] == [], (r, res["overlap"]["missing_torch"])
        assert res["sequential"]["n_overlapped"] == 0
        assert res["overlap"]["n_overlapped"] == 3 * STEPS, r      # DualPipeV, 2 ranks, 4 micro-batches: 3 pairs
        assert res["overlap"]["loss"] == res["sequential"]["loss"], r
        assert res["overlap_equal"], r


def test_without_the_private_torch_pieces_the_overlap_falls_back(monkeypatch):
    """Where torch lacks what the handler needs, nothing is registered (torch runs each pair sequentially)."""
    class Schedule:                         # a runtime with the public hook only
        def __init__(self):
            self.registered = []

        def register_custom_function(self, kind, fn):
            self.registered.append(kind)

    schedule = Schedule()
    with pytest.warns(RuntimeWarning, match="overlapped pairs run sequentially"):
        assert enable_overlap(schedule) is None
    assert schedule.registered == []
    assert "schedule._maybe_get_loss" in missing_torch_pieces(schedule)
    monkeypatch.delattr(schedules, "_wait_batch_p2p")
    assert "schedules._wait_batch_p2p" in missing_torch_pieces(schedule)


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
        build_dualpipev(build(_config()), 0, WORLD, PipelineLoss(), 3, (2, T))
