"""DualPipeV x expert parallelism, the F/B overlap and recomputation (dsv3.parallel.pipeline / overlap, spec 5)
against the single-process run.

Four spawned gloo ranks form a (pp 2, ep 2) mesh: global rank = 2 * pp_rank + ep_rank. The tiny float64 model
(4 decoder layers, MoE layers 1-3 and an MoE MTP module) is cut into 4 chunks, pipeline rank p holding chunks p and
3 - p; every chunk's routed experts are sharded 4 + 4 over the ep pair of its pipeline position, and ep rank e feeds
rows [4e, 4e + 4) of the batch of 8 as 4 micro-batches of one sequence. In every process a reference copy of the
model trains on the whole batch. Four configurations run in the same spawn, each for 2 SGD steps with the
aux-loss-free bias update between them: plain, with the overlap handler, with `apply_recompute` (applied after
expert parallelism, as it must be), and with both.

Checked against the reference, per step: the loss (mean over the ep pair of the mean over micro-batches) and every
local gradient after `sync_gradients` over the ep group (an expert's against its slice of the reference) to 1e-9
relative (float64, only summation orders differ; measured ~3e-15), the expert loads and the routing biases after
the update exactly. The configurations must agree with each other bit for bit: they run the same kernels in the
same order per micro-batch (the overlap's worker thread takes the caller's intra-op thread count; with the default
it would not, and BLAS summation orders would differ in the last bits).

Concurrency: a probe wraps each stage's forward_one_chunk / backward_one_chunk; the two halves of every overlapped
pair meet at a two-party barrier before they compute. Only concurrent sub-actions can pass it: the sequential
runtime (the configurations without the handler, short timeout) must fail it, the overlap handler must pass it every
time, with the forward on the calling thread and the backward on another. A spy on all_to_all_single checks that
the worker's expert all-to-alls went to the backward EP group and the calling thread's to the forward one.
"""

import threading
import time

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from conftest import build, init_gloo, run_ranks, tiny_config

from dsv3.parallel.expert import all_reduce_expert_loads, apply_expert_parallel
from dsv3.parallel.grads import sync_gradients
from dsv3.parallel.mesh import ParallelMesh
from dsv3.parallel.overlap import enable_overlap
from dsv3.parallel.pipeline import build_dualpipev
from dsv3.train.balance import moe_layers, update_bias
from dsv3.parallel.recompute import apply_recompute
from dsv3.train.losses import PipelineLoss, lm_losses

PP, EP, STEPS, B, T, N_MICRO = 2, 2, 2, 8, 12, 4
WORLD, ROWS = PP * EP, B // EP
MTP_WEIGHT, LR, BIAS_SPEED = 0.3, 0.5, 0.01
TOL = 1e-9
CONFIGS = {"plain": (False, False), "overlap": (True, False), "recompute": (False, True), "both": (True, True)}
EXPERT_PARAMS = ("experts.gate_proj", "experts.up_proj", "experts.down_proj")


def _ce(logits, targets):          # float64 CE (the trainer's default casts to fp32)
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def _config():
    return tiny_config(num_hidden_layers=4, first_k_dense_replace=1)


class _Probe:
    """Wraps the stages' forward_one_chunk / backward_one_chunk: records (stage, mb, kind, thread, start, end) and
    makes the two halves of every overlapped pair meet at a barrier (both must be in progress at once)."""

    def __init__(self, schedule, stages, timeout: float):
        order = [a for a in schedule.pipeline_order[schedule.rank] if a is not None and a.sub_actions]
        self.pairs = [tuple((s.stage_index, s.microbatch_index) for s in a.sub_actions) for a in order]
        self.overlapped = {(*key, kind) for pair in self.pairs for key, kind in zip(pair, "FB")}
        self.barrier, self.timeout, self.enabled = threading.Barrier(2), timeout, True
        self.met, self.missed, self.events, self.lock = 0, [], [], threading.Lock()
        for s in stages:
            s.forward_one_chunk = self._wrap(s.stage_index, s.forward_one_chunk, "F")
            s.backward_one_chunk = self._wrap(s.stage_index, s.backward_one_chunk, "B")

    def _wrap(self, idx, fn, kind):
        def run(mb, *args, **kwargs):
            start = time.perf_counter()
            if (idx, mb, kind) in self.overlapped and self.enabled:
                try:
                    self.barrier.wait(self.timeout)
                    with self.lock:
                        self.met += 1
                except threading.BrokenBarrierError:
                    self.enabled = False              # one miss is enough; don't wait on every later pair
                    with self.lock:
                        self.missed.append((idx, mb, kind))
            out = fn(mb, *args, **kwargs)
            with self.lock:
                self.events.append(((idx, mb), kind, threading.get_ident(), start, time.perf_counter()))
            return out
        return run


def _reference(cfg, windows):
    """Per step of the single-process run: loss, gradients, per-layer loads and the biases after the update."""
    ref = build(cfg, dtype=torch.float64).train()
    opt = torch.optim.SGD(ref.parameters(), lr=LR)
    steps = []
    for step in range(STEPS):
        for _, m in moe_layers(ref):
            m.tokens_per_expert.zero_()
        main, mtp, _, _ = lm_losses(ref, windows[step], ce=_ce)
        loss = main + MTP_WEIGHT * torch.stack(mtp).mean()
        loss.backward()
        layers = moe_layers(ref)
        loads = {n: m.tokens_per_expert.clone() for n, m in layers}
        update_bias(layers, torch.stack(list(loads.values())), BIAS_SPEED)
        steps.append({"loss": loss.item(), "grads": {n: p.grad.clone() for n, p in ref.named_parameters()},
                      "loads": loads, "bias": {n: m.gate.e_score_correction_bias.clone() for n, m in layers}})
        opt.step()
        opt.zero_grad()
    return steps


def _run(cfg, mesh, windows, ref, overlap: bool, recompute: bool, spy: list) -> dict:
    model = apply_expert_parallel(build(cfg, dtype=torch.float64).train(), mesh.ep_group)
    n_recomputed = apply_recompute(model) if recompute else 0
    schedule, stages = build_dualpipev(model, mesh.pp_rank, PP, PipelineLoss(_ce, MTP_WEIGHT), N_MICRO,
                                       (ROWS // N_MICRO, T), group=mesh.pp_group)
    try:                       # without a backward group for the experts' EP group the handler must refuse
        enable_overlap(schedule)
        unmapped = None
    except ValueError as e:
        unmapped = str(e)
    handler = enable_overlap(schedule, {mesh.ep_group: mesh.ep_group_bwd}) if overlap else None
    probe = _Probe(schedule, stages, timeout=20.0 if overlap else 0.3)
    chunks = torch.nn.ModuleList([s.submod for s in stages])       # this rank's two chunks
    local = {n for n, _ in chunks.named_parameters()}
    local = {n.split(".", 1)[1] for n in local}                  # drop the ModuleList index
    local_moe_ids = {id(m) for _, m in moe_layers(chunks)}
    moes = [(n, m) for n, m in moe_layers(model) if id(m) in local_moe_ids]
    L = cfg.n_routed_experts // EP
    rows = slice(mesh.ep_rank * ROWS, (mesh.ep_rank + 1) * ROWS)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    out = {"loss": [], "grad_err": [], "missing": [], "stray": [], "loads_equal": [], "bias_equal": [],
           "grads": [], "main": threading.get_ident()}
    spy.clear()
    for step in range(STEPS):
        for _, m in moe_layers(model):
            m.tokens_per_expert.zero_()
        if mesh.pp_rank == 0:        # holds chunk 0 (takes the ids) and chunk 3 (computes the loss)
            losses = []
            schedule.step(windows[step, rows, :-1].contiguous(), target=windows[step, rows], losses=losses)
            loss = torch.stack(losses).mean().detach()
            dist.all_reduce(loss, group=mesh.ep_group)
            out["loss"].append(((loss / EP).item(), ref[step]["loss"], len(losses)))
        else:
            schedule.step()
        sync_gradients(chunks, mesh)
        errs, missing, stray, grads = {}, [], [], {}
        for name, p in model.named_parameters():
            if name not in local:
                if p.grad is not None:
                    stray.append(name)
                continue
            if p.grad is None:
                missing.append(name)
                continue
            g = ref[step]["grads"][name]
            if name.endswith(EXPERT_PARAMS):
                g = g[mesh.ep_rank * L:(mesh.ep_rank + 1) * L]
            errs[name] = ((p.grad - g).abs().max() / g.abs().max().clamp_min(1e-300)).item()
            grads[name] = p.grad.clone()
        out["grad_err"].append(errs)
        out["missing"].append(missing)
        out["stray"].append(stray)
        out["grads"].append(grads)
        # the bias update on the loads of the whole batch: summed over the ep pair, per local layer
        all_reduce_expert_loads(chunks, mesh.ep_group)
        out["loads_equal"].append({n: torch.equal(m.tokens_per_expert, ref[step]["loads"][n]) for n, m in moes})
        update_bias(moes, torch.stack([m.tokens_per_expert for _, m in moes]), BIAS_SPEED)
        out["bias_equal"].append({n: torch.equal(m.gate.e_score_correction_bias, ref[step]["bias"][n])
                                  for n, m in moes})
        opt.step()
        opt.zero_grad()
    out["n_overlapped"] = handler.n_overlapped if handler else 0
    out["n_recomputed"], out["unmapped"] = n_recomputed, unmapped
    out["n_pairs"] = len(probe.pairs)
    out["probe"] = {"met": probe.met, "missed": probe.missed, "events": probe.events, "pairs": probe.pairs}
    # which thread issued each expert all-to-all, on which group
    groups = {id(mesh.ep_group): "fwd", id(mesh.ep_group_bwd): "bwd"}
    out["a2a"] = sorted({(tid == out["main"], groups.get(g, "other")) for tid, g in spy})
    out["n_a2a"] = len(spy)
    out["local"] = sorted(local)
    return out


def _worker(rank, init_file, out_dir):
    init_gloo(rank, WORLD, init_file)
    spy, a2a = [], dist.all_to_all_single

    def spying(output, input, output_split_sizes=None, input_split_sizes=None, group=None, async_op=False):
        spy.append((threading.get_ident(), id(group)))
        return a2a(output, input, output_split_sizes, input_split_sizes, group=group, async_op=async_op)

    dist.all_to_all_single = spying
    try:
        mesh = ParallelMesh(PP, 1, EP, overlap=True)
        cfg = _config()
        windows = torch.randint(0, cfg.vocab_size, (STEPS, B, T + 1), generator=torch.Generator().manual_seed(1))
        ref = _reference(cfg, windows)
        res = {"mesh": (mesh.pp_rank, mesh.ep_rank), "configs": {}}
        for name, (overlap, recompute) in CONFIGS.items():
            res["configs"][name] = _run(cfg, mesh, windows, ref, overlap, recompute, spy)
        base = res["configs"]["plain"]["grads"]
        for name, r in res["configs"].items():        # the configurations against each other
            r["equal_to_plain"] = all(torch.equal(g, base[s][n]) for s, grads in enumerate(r.pop("grads"))
                                  for n, g in grads.items())
        torch.save(res, out_dir / f"rank{rank}.pt")
    finally:
        dist.all_to_all_single = a2a
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return run_ranks(_worker, WORLD, tmp_path_factory.mktemp("pp_ep"), "pipeline x expert", timeout_s=180)


def test_mesh_layout(ranks):
    assert [res["mesh"] for res in ranks] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for res in ranks:
        assert res["configs"]["plain"]["local"] == ranks[res["mesh"][0] * EP]["configs"]["plain"]["local"]
    names = {n for n, _ in build(_config()).named_parameters()}
    assert set(ranks[0]["configs"]["plain"]["local"]) | set(ranks[2]["configs"]["plain"]["local"]) == names


@pytest.mark.parametrize("config", list(CONFIGS))
def test_training_steps_match_the_single_process_run(ranks, config):
    for r, res in enumerate(ranks):
        c = res["configs"][config]
        if res["mesh"][0] == 0:
            assert len(c["loss"]) == STEPS
            for step, (loss, ref_loss, n) in enumerate(c["loss"]):
                assert n == N_MICRO
                assert abs(loss - ref_loss) <= TOL * abs(ref_loss), (r, step, loss, ref_loss)
        assert len(c["grad_err"]) == STEPS
        for step in range(STEPS):
            assert not c["missing"][step] and not c["stray"][step], (r, step, c["missing"][step], c["stray"][step])
            errs = c["grad_err"][step]
            worst = max(errs, key=errs.get)
            assert errs[worst] < TOL, (r, step, worst, errs[worst])
            assert c["loads_equal"][step] and all(c["loads_equal"][step].values()), (r, step, c["loads_equal"][step])
            assert c["bias_equal"][step] and all(c["bias_equal"][step].values()), (r, step, c["bias_equal"][step])
        # the configurations run the same kernels in the same order per micro-batch: bit-identical results
        assert c["equal_to_plain"] and c["loss"] == res["configs"]["plain"]["loss"], (r, config)
        assert c["n_a2a"] > 0
        assert (c["n_recomputed"] > 0) == CONFIGS[config][1]
        assert "no backward group" in c["unmapped"], c["unmapped"]


@pytest.mark.parametrize("config", ["overlap", "both"])
def test_overlapped_pairs_run_concurrently(ranks, config):
    for r, res in enumerate(ranks):
        c = res["configs"][config]
        assert c["n_pairs"] > 0 and c["n_overlapped"] == c["n_pairs"] * STEPS, (r, c["n_pairs"], c["n_overlapped"])
        probe = c["probe"]
        assert not probe["missed"], (r, probe["missed"])
        assert probe["met"] == 2 * c["n_pairs"] * STEPS, (r, probe["met"])
        events = {}
        for key, kind, tid, start, end in probe["events"]:
            events.setdefault((key, kind), []).append((tid, start, end))
        main = c["main"]
        for (key, kind), runs in events.items():
            if kind == "F":
                assert all(tid == main for tid, _, _ in runs), (r, key)
        # each overlapped pair: forward on the calling thread, backward on another, their intervals intersect
        for f_key, b_key in probe["pairs"]:
            for (f_tid, f0, f1), (b_tid, b0, b1) in zip(events[(f_key, "F")], events[(b_key, "B")]):
                assert f_tid == main and b_tid != main, (r, f_key, b_key)
                assert f0 < b1 and b0 < f1, (r, f_key, b_key, (f0, f1), (b0, b1))
        # the worker's all-to-alls on the backward EP group, the calling thread's on the forward one
        assert c["a2a"] == [(False, "bwd"), (True, "fwd")], (r, c["a2a"])


def test_the_probe_fails_on_the_sequential_runtime(ranks):
    """The negative control: without the handler torch runs each pair's forward, then its backward; the barrier
    times out, so passing it in the overlap configurations means something."""
    for r, res in enumerate(ranks):
        for config in ("plain", "recompute"):
            c = res["configs"][config]
            assert c["n_overlapped"] == 0
            assert len(c["probe"]["missed"]) == 1 and c["probe"]["met"] == 0, (r, config, c["probe"]["missed"])
            assert c["a2a"] == [(True, "fwd")], (r, config, c["a2a"])
