"""FP8 dispatch, BF16 combine under expert parallelism (dsv3.parallel.fp8_comm; spec 4, TR 3.3.4), on two spawned
gloo ranks: rows reach the experts as E4M3 with 1x128 power-of-2 tile scales, and the activation gradients come
back to the experts the same way; the other two directions stay in the activations' dtype.

Checks: the forward output equals the unsharded experts applied to the locally quantised-dequantised tokens (the
quantisation is per row, so where it happens does not matter), to fp32 rounding; gradients within the FP8 bound of
the exact ones (and not equal to them: FP8 really ran); the bytes on the wire for the dispatch and the combine's
backward are about half of BF16's.
"""

import pytest
import torch
import torch.distributed as dist
from conftest import init_gloo, run_ranks, tiny_config

from dsv3.kernels.fp8_quant import dequantize_tiles, quantize_tiles
from dsv3.model.moe import Experts
from dsv3.parallel.expert import apply_expert_parallel

WORLD, N, K, E = 2, 24, 2, 8


def _case(rank, group, fp8, dtype, sent):
    """One forward + backward of EP experts (hand-made routing across both ranks) and of the unsharded module on
    both ranks' tokens. Returns outputs, gradients and the bytes this rank's row exchanges sent."""
    cfg = tiny_config(n_routed_experts=E)
    torch.manual_seed(0)
    ref = Experts(cfg)
    for p in ref.parameters():
        torch.nn.init.normal_(p, std=0.2)
    ep = apply_expert_parallel(Experts(cfg), group, fp8_dispatch=fp8)
    L = E // WORLD
    with torch.no_grad():
        for name, p in ep.named_parameters():
            p.copy_(getattr(ref, name)[rank * L:(rank + 1) * L])
    ref, ep = ref.to(dtype), ep.to(dtype)
    gen = torch.Generator().manual_seed(2)
    D = cfg.hidden_size
    xs = [(torch.randn(N, D, generator=gen) * torch.logspace(-2, 1, D)).to(dtype) for _ in range(WORLD)]
    ws = [torch.rand(N, K, generator=gen) for _ in range(WORLD)]
    idxs = [torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(N)]) for _ in range(WORLD)]
    gs = [torch.randn(N, D, generator=gen).to(dtype) for _ in range(WORLD)]
    x = xs[rank].clone().requires_grad_()
    before = len(sent)
    y = ep(x, ws[rank], idxs[rank], torch.bincount(idxs[rank].flatten(), minlength=E))
    fwd_bytes = sum(sent[before:])
    (y.float() * gs[rank].float()).sum().backward()
    out = {"y": y.detach().float(), "x_grad": x.grad.float(), "fwd_bytes": fwd_bytes,
           "bwd_bytes": sum(sent[before:]) - fwd_bytes,
           "w_grads": {n: p.grad.float() for n, p in ep.named_parameters()}}
    # the unsharded experts on both ranks' tokens, exact and on the tokens as the FP8 dispatch delivers them
    for key, x_all in (("ref", torch.cat(xs)), ("ref_q", dequantize_tiles(*quantize_tiles(torch.cat(xs), pow2=True),
                                                                       dtype))):
        x_all = x_all.clone().requires_grad_()
        idx = torch.cat(idxs)
        y_all = ref(x_all, torch.cat(ws), idx, torch.bincount(idx.flatten(), minlength=E))
        ref.zero_grad()
        (y_all.float() * torch.cat(gs).float()).sum().backward()
        rows = slice(rank * N, (rank + 1) * N)
        out[key] = {"y": y_all.detach().float()[rows], "x_grad": x_all.grad.float()[rows],
                    "w_grads": {n: p.grad.float()[rank * L:(rank + 1) * L] for n, p in ref.named_parameters()}}
    return out


def _worker(rank, init_file, out_dir):
    init_gloo(rank, WORLD, init_file)
    sent = []                 # bytes of every row exchange's input (the counts exchange has no split sizes)
    a2a = dist.all_to_all_single

    def spy(output, input, output_split_sizes=None, input_split_sizes=None, group=None, async_op=False):
        if input_split_sizes is not None:
            sent.append(input.numel() * input.element_size())
        return a2a(output, input, output_split_sizes, input_split_sizes, group=group, async_op=async_op)

    dist.all_to_all_single = spy
    try:
        res = {(fp8, str(dtype)): _case(rank, dist.group.WORLD, fp8, dtype, sent)
               for fp8 in (False, True) for dtype in (torch.float32, torch.bfloat16)}
        torch.save(res, out_dir / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return run_ranks(_worker, WORLD, tmp_path_factory.mktemp("fp8dispatch"), "fp8 dispatch")


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def test_fp8_dispatch_output_is_the_experts_on_the_fp8_tokens(ranks):
    for res in ranks:
        r = res[(True, "torch.float32")]
        assert _rel(r["y"], r["ref_q"]["y"]) < 1e-5               # only fp32 rounding between the two
        assert _rel(r["y"], r["ref"]["y"]) > 1e-4                  # and FP8 really ran
        plain = res[(False, "torch.float32")]
        assert _rel(plain["y"], plain["ref"]["y"]) < 1e-5          # the plain path is the exact one


def test_fp8_dispatch_gradients_within_the_fp8_bound(ranks):
    for res in ranks:
        r = res[(True, "torch.float32")]
        # E4M3 keeps 3 mantissa bits: 2^-4 relative per value; sums of products stay within a few times that
        assert 1e-4 < _rel(r["x_grad"], r["ref"]["x_grad"]) < 0.125
        for name, g in r["w_grads"].items():
            assert 1e-4 < _rel(g, r["ref"]["w_grads"][name]) < 0.125, name


def test_fp8_dispatch_halves_the_bytes_of_bf16(ranks):
    D = tiny_config().hidden_size
    for res in ranks:
        plain, fp8 = res[(False, "torch.bfloat16")], res[(True, "torch.bfloat16")]
        # each rank dispatches its N*K (token, expert) rows and returns the R rows it received; in the backward the
        # combine's gradient sends the N*K rows' gradients and the dispatch's the R rows'
        dispatch = N * K * D * 2                                  # bf16 bytes of the N*K rows
        returned = plain["fwd_bytes"] - dispatch                  # bf16 bytes of the R rows
        assert returned > 0 and plain["bwd_bytes"] == plain["fwd_bytes"]
        fp8_rows = N * K * (D + 4)                                # E4M3 values + one fp32 scale per 64-wide row
        assert fp8["fwd_bytes"] == fp8_rows + returned            # FP8 dispatch, BF16 combine
        assert fp8["bwd_bytes"] == fp8_rows + returned            # FP8 combine gradient, BF16 dispatch gradient
        assert fp8_rows / dispatch < 0.55                         # about half of BF16
