"""`dsv3 plan` on the report's layout (671B on 2048 H800s: PP16 with DualPipe, EP64 over 8 nodes, ZeRO-1): the
figures derivable from the report, pinned."""

import pytest

from dsv3 import load_model_config
from dsv3.parallel.plan import Cluster, Layout, bubble, format_plan, plan, stage_layers, stage_params


@pytest.fixture(scope="module")
def v3():
    return load_model_config("v3-671b")


def test_parameter_counts_match_the_shapes(v3):
    main = sum(stage_params(v3.replace(num_nextn_predict_layers=0), 1)[0])
    assert main == 671_026_404_352                         # dsv3 info / spec 1.1: 671.03B
    assert sum(stage_params(v3, 1)[0]) - main == 11_610_067_968   # the MTP module: 11.61B
    per_stage = stage_params(v3, 16)
    assert sum(a + b for a, b in per_stage) == sum(stage_params(v3, 1)[0])   # nothing lost or double counted
    assert [len(x) for x in stage_layers(v3, 16)] == [4] * 13 + [3] * 3


def test_bubbles_of_table_2():
    # TR Table 2 with F=1, B=2, W=1 and F&B = F + B: 1F1B (PP-1)(F+B), ZB1P (PP-1)(F+B-2W), DualPipe (PP/2-1)(F&B+B-3W)
    assert bubble(16, "1f1b") == 45 and bubble(16, "zb1p") == 15 and bubble(16, "dualpipe") == 14
    assert bubble(8, "dualpipe", f=1, b=2, w=1, fb=2.5) == 3 * 1.5       # an overlapped chunk shorter than F+B
    with pytest.raises(ValueError):
        bubble(8, "gpipe")


def test_the_reports_layout_fits_and_is_pinned(v3):
    p = plan(v3, Cluster(2048, 8, 80.0), Layout(pp=16, ep=64, schedule="dualpipe", seq_len=4096, micro_batches=120))
    assert p["layout"]["dp"] == 128 and p["layout"]["ep_nodes"] == 8 and not p["problems"]
    par, mem = p["params"], p["memory_gib"]
    # rank 0 holds chunk 0 (embedding + 4 layers) and chunk 15 (3 layers, norm, head, MTP): DualPipe's 2x
    # parameters. By hand from spec 1.1's shapes: embedding and head 0.93B each, 3 dense layers 0.58B each, 7 MoE
    # blocks (layers 3, 58-60 and the MTP's) of 0.23B replicated + 11.27B / 64 = 0.18B of experts, MTP eh_proj 0.10B:
    # 1.85 + 1.75 + 7 x 0.41 + 0.10 = ~5.75B.
    assert par["on_gpu"] / 1e9 == pytest.approx(5.75, abs=0.01)
    # the memory total is the planner's own estimate (activations are a model): pinned as a regression value. With
    # the MTP block's activations on chunk 15 it is at the 80 GiB line: PP + 1 micro-batches of rank 0's larger
    # chunk is an upper bound (most of rank 0's micro-batches in flight are in chunk 0, DualPipe's forward direction)
    assert mem["total"] == pytest.approx(80.0, abs=0.1)
    one = plan(v3, Cluster(2048, 8, 80.0), Layout(pp=16, ep=64, schedule="1f1b", seq_len=4096, micro_batches=120))
    assert one["params"]["on_gpu"] < par["on_gpu"] and one["memory_gib"]["total"] < mem["total"]
    assert p["bubble_fraction"]["dualpipe"] < one["bubble_fraction"]["1f1b"]
    assert "dualpipe" in format_plan(p)


def test_layouts_that_do_not_fit_or_do_not_divide_are_flagged(v3):
    small = plan(v3, Cluster(256, 8, 80.0), Layout(pp=8, ep=32, schedule="dualpipe", micro_batches=32))
    assert any("does not fit" in x for x in small["problems"])
    assert plan(v3, Cluster(2048), Layout(pp=16, ep=64, schedule="dualpipe", micro_batches=8))["problems"]
    for cluster, layout in ((Cluster(100), Layout(pp=16)), (Cluster(2048), Layout(pp=16, ep=48)),
                            (Cluster(2048), Layout(pp=16, ep=64, schedule="gpipe"))):
        with pytest.raises(ValueError):
            plan(v3, cluster, layout)


def test_time_and_cost_reproduce_the_reports_180k_gpu_hours_per_trillion_tokens(v3):
    """TR Table 1: 180K H800 GPU-hours per trillion tokens, 3.7 days on 2048 GPUs, $2 per GPU-hour, 2,664K hours
    for the 14.8T-token pre-training. The report states no MFU; 40% of the H800's dense BF16 peak reproduces it."""
    from dsv3.parallel.plan import flops_per_token, training_cost
    f = flops_per_token(v3, 4096)
    assert 36e9 < f["activated_matmul_params"] < 40e9          # 37B activated + MTP - embedding + head
    assert f["total"] == pytest.approx(6 * f["activated_matmul_params"] + f["attention"])
    c = training_cost(v3, 2048, mfu=0.40)
    assert c["gpu_hours_per_trillion_tokens"] == pytest.approx(180e3, rel=0.03)
    assert c["days_per_trillion_tokens"] == pytest.approx(3.7, abs=0.1)
    assert c["cost_per_trillion_tokens"] == pytest.approx(360e3, rel=0.03)
    assert 14.8 * c["gpu_hours_per_trillion_tokens"] == pytest.approx(2_664e3, rel=0.03)
    # time scales inversely with MFU; a bad MFU is one error
    assert training_cost(v3, 2048, mfu=0.20)["step_seconds"] == pytest.approx(2 * c["step_seconds"])
    with pytest.raises(ValueError, match="mfu"):
        training_cost(v3, 2048, mfu=0)


def test_one_pipeline_rank_is_no_pipeline_whatever_the_schedule():
    """pp = 1: no mirror chunk (DualPipe's rank 0 would otherwise count its own chunk twice), no bubble, no
    pipeline traffic; the same numbers as 1F1B, and the model's parameters held once (experts split over ep)."""
    cfg = load_model_config("lite-8L")
    plans = {s: plan(cfg, Cluster(2, 2, 141.0), Layout(pp=1, ep=2, schedule=s, micro_batches=2))
             for s in ("1f1b", "dualpipe", "dualpipev")}
    for p in plans.values():
        assert p["params"] == plans["1f1b"]["params"] and not p["problems"]
        assert p["traffic_gb_per_step"]["pipeline"] == 0 and all(v == 0 for v in p["bubble_in_F"].values())
    par = plans["dualpipe"]["params"]
    total = par["total_with_mtp"]
    assert abs(par["replicated_on_rank"] + 2 * par["experts_on_rank"] - total) < 1e-6 * total


# ---- audit: traffic, activations and refusals checked against numbers worked out by hand ------------------------

A2A_BYTES = 1 + 4 / 128 + 2     # FP8 dispatch (E4M3 + an FP32 scale per 1x128 tile, parallel.fp8_comm) + BF16 combine


def test_dualpipe_runs_each_micro_batch_through_one_of_a_ranks_two_chunks(v3):
    """DualPipe feeds half the micro-batches from each end (DualPipe's step: num_chunks // 2 per direction), so a
    rank runs each micro-batch through one of its two chunks: its pipeline sends are 1F1B's, and its expert
    all-to-alls are half the micro-batches through each chunk. Rank 0 holds chunk 0 (layers 0-3: one MoE layer) and
    chunk 15 (layers 58-60 and the MTP module's MoE block: four): 60 x 1 + 60 x 4 = 300 MoE layer passes per step,
    each token to 4 nodes (8 groups on 8 nodes, top-4 groups)."""
    p = plan(v3, Cluster(2048, 8, 80.0), Layout(pp=16, ep=64, schedule="dualpipe", seq_len=4096, micro_batches=120))
    tokens, D = 4096, 7168
    tr = p["traffic_gb_per_step"]
    assert tr["pipeline"] == pytest.approx(120 * tokens * D * 2 * 2 / 1e9)            # 14.09 GB, not 28.19
    assert tr["expert_all_to_all_ib"] == pytest.approx(300 * tokens * 4 * D * A2A_BYTES * 2 / 1e9)
    # DualPipeV's V runs every micro-batch through both of a rank's chunks: rank 0 holds chunk 0 (layers 0, 1) and
    # chunk 31 (layer 60 + MTP): 0 + 2 MoE layers for each of the 120 micro-batches, two pipeline hops each
    v = plan(v3, Cluster(2048, 8, 80.0), Layout(pp=16, ep=64, schedule="dualpipev", seq_len=4096, micro_batches=120))
    assert v["traffic_gb_per_step"]["pipeline"] == pytest.approx(2 * tr["pipeline"])
    assert v["traffic_gb_per_step"]["expert_all_to_all_ib"] == pytest.approx(
        240 * tokens * 4 * D * A2A_BYTES * 2 / 1e9)


def test_the_mtp_block_on_the_last_chunk_has_activations(v3):
    """The MTP module (a MoE block, its eh_proj's BF16 inputs) lives on the last chunk with the head; its
    parameters are counted there, so are its activations. Rank 0 of DualPipe: chunk 15 = 3 MoE layers + MTP."""
    from dsv3.parallel.plan import activation_bytes_per_token
    p = plan(v3, Cluster(2048, 8, 80.0), Layout(pp=16, ep=64, schedule="dualpipe", seq_len=4096, micro_batches=120))
    moe = activation_bytes_per_token(v3, True)
    per_mb = 4096 * (4 * moe + 2 * 2 * 7168)
    assert p["memory_gib"]["activations_per_micro_batch"] == pytest.approx(per_mb / 2**30)
    assert p["memory_gib"]["activations"] == pytest.approx(17 * per_mb / 2**30)     # TR Table 2: PP + 1


def test_dualpipev_keeps_2pp_plus_1_chunk_micro_batches_and_allows_an_odd_pp():
    """DualPipe's README: DualPipeV runs PP stages on PP / 2 devices with PP + 1 micro-batches of one stage's
    activations per device; on pp devices that is 2 pp + 1 of its (half-size) chunks. Its code asks only
    num_chunks >= 2 num_ranks: an odd pp is no problem (spec 5)."""
    cfg = load_model_config("lite-8L")
    p = plan(cfg, Cluster(6, 2, 141.0), Layout(pp=3, ep=2, schedule="dualpipev", micro_batches=6))
    assert not p["problems"]
    mem = p["memory_gib"]
    assert mem["activations"] == pytest.approx(7 * mem["activations_per_micro_batch"])


def test_node_limited_routing_and_zero1_traffic(v3):
    """A token's top-4 groups are 4 nodes only while a group fits in a node: EP128 puts each 32-expert group on two
    nodes (16 nodes), so a token's 8 experts can sit on 8. An expert's ZeRO-1 reduce-scatter / all-gather runs over
    its dp / ep replicas, not over all dp ranks."""
    p64 = plan(v3, Cluster(2048), Layout(pp=16, ep=64, schedule="dualpipe", micro_batches=120))
    p128 = plan(v3, Cluster(2048), Layout(pp=16, ep=128, schedule="dualpipe", micro_batches=120))
    assert p128["layout"]["ep_nodes"] == 16
    assert p128["traffic_gb_per_step"]["expert_all_to_all_ib"] == pytest.approx(
        2 * p64["traffic_gb_per_step"]["expert_all_to_all_ib"])
    par = p64["params"]
    assert p64["traffic_gb_per_step"]["zero1_dp"] == pytest.approx(
        6 * (par["replicated_on_rank"] * 127 / 128 + par["experts_on_rank"] * 1 / 2) / 1e9)
    # an EP group of 32 over nodes of 6 GPUs spans 6 nodes, not 5
    assert plan(v3, Cluster(96 * 16, 6), Layout(pp=16, ep=32, micro_batches=96))["layout"]["ep_nodes"] == 6


@pytest.mark.parametrize("argv,flag", [
    (["--pp", "0"], "--pp"), (["--pp", "-1"], "--pp"), (["--ep", "0"], "--ep"), (["--gpus", "0"], "--gpus"),
    (["--gpus", "-16"], "--gpus"), (["--gpus-per-node", "0"], "--gpus-per-node"), (["--gpu-memory", "-5"],
    "--gpu-memory"), (["--nvlink", "0"], "--nvlink"), (["--ib", "0"], "--ib"), (["--micro-batches", "0"],
    "--micro-batches"), (["--micro-batch", "0"], "--micro-batch"), (["--seq-len", "0"], "--seq-len"),
    (["--peak-tflops", "0"], "--peak-tflops"), (["--price", "-1"], "--price"),
    (["--gpus", "4096", "--pp", "64"], "--pp"), (["--schedule", "dualpipev", "--pp", "32"], "--pp")])
def test_bad_plan_inputs_are_one_line_errors_naming_the_flag(argv, flag, capsys):
    """No traceback, no negative cost, no stage without a decoder layer (64 stages of 61 layers; DualPipeV's 2 pp
    chunks): exit status 2 and one line naming the flag."""
    from dsv3.cli import main
    assert main(["plan", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and flag in err, err
