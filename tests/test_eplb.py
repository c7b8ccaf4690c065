"""EPLB (dsv3.infer.eplb): hand-made loads worked out by hand, deepseek-ai/EPLB's documented example and outputs of
its `rebalance_experts` on tie-heavy cases (recorded as data), the maps' invariants, and balance on skewed loads."""

import pytest
import torch

from dsv3.infer.eplb import balance_ratio, balanced_packing, identity_placement, rebalance_experts, replicate


def test_global_policy_by_hand():
    # expert 0 carries 100 of 130: both redundant slots go to it (100/1, then 100/2 > 10); 6 slots on 2 GPUs
    p = rebalance_experts(torch.tensor([[100, 10, 10, 10]]), 6, 1, 1, 2)
    assert p.logcnt.tolist() == [[3, 1, 1, 1]]
    # shares 33.3 x 3 (slots 0, 4, 5), 10 x 3: heaviest first into the lightest GPU with room
    assert p.phy2log.tolist() == [[0, 0, 3, 0, 1, 2]]
    # replica 1 of expert 0 (made first) went to GPU 1's first slot, replica 2 to GPU 0's second
    assert p.log2phy[0, 0].tolist() == [0, 3, 1] and p.log2phy[0, 3].tolist() == [2, -1, -1]
    assert torch.allclose(p.gpu_loads(torch.tensor([[100., 10, 10, 10]]), 2), torch.tensor([[230 / 3, 160 / 3]],
                                                                                            dtype=torch.float64))


def test_hierarchical_policy_by_hand():
    # groups (2 experts each) weigh 20, 2, 16, 6: nodes get {g0, g1} and {g2, g3} (22 each), then GPUs inside
    p = rebalance_experts(torch.tensor([[10, 10, 1, 1, 8, 8, 3, 3]]), 8, 4, 2, 4)
    assert p.phy2log.tolist() == [[0, 2, 1, 3, 4, 6, 5, 7]]
    assert p.logcnt.tolist() == [[1] * 8]


def test_documented_example():
    """deepseek-ai/EPLB's README: 2 layers x 12 experts, 16 replicas, 4 groups, 2 nodes, 8 GPUs."""
    weight = torch.tensor([[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
                           [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27]])
    p = rebalance_experts(weight, 16, 4, 2, 8)
    assert p.phy2log.tolist() == [[5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
                                  [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1]]


@pytest.mark.parametrize("args, phy2log, logcnt", [
    ((12, 4, 2, 4), [[2, 2, 3, 0, 0, 1, 6, 6, 4, 7, 6, 5], [0, 0, 4, 1, 1, 5, 2, 2, 6, 3, 3, 7]],
     [[2, 1, 2, 1, 1, 1, 3, 1], [2, 2, 2, 2, 1, 1, 1, 1]]),
    ((12, 4, 3, 6), [[2, 0, 6, 1, 2, 4, 6, 5, 0, 7, 3, 0], [0, 2, 1, 3, 2, 4, 3, 5, 0, 6, 1, 7]],
     [[3, 1, 2, 1, 1, 1, 2, 1], [2, 2, 2, 2, 1, 1, 1, 1]]),     # 3 nodes do not divide 4 groups: global
], ids=["hierarchical", "global"])
def test_reference_outputs_with_ties(args, phy2log, logcnt):
    """Outputs of deepseek-ai/EPLB's rebalance_experts (commit of 2025-03) on loads full of ties."""
    p = rebalance_experts(torch.tensor([[3, 0, 3, 1, 0, 0, 3, 1], [5, 5, 5, 5, 2, 2, 2, 2]]), *args)
    assert p.phy2log.tolist() == phy2log and p.logcnt.tolist() == logcnt


@pytest.mark.parametrize("E, G, nodes, gpus, slots", [(16, 4, 2, 4, 20), (16, 4, 4, 8, 24), (12, 3, 2, 4, 16),
                                                      (32, 8, 1, 4, 36)])
def test_maps_are_consistent(E, G, nodes, gpus, slots):
    loads = (torch.rand(3, E, generator=torch.Generator().manual_seed(E + slots)) ** 3 * 1000).round()
    p = rebalance_experts(loads, slots, G, nodes, gpus)
    assert p.phy2log.shape == (3, slots)
    for layer in range(3):
        assert torch.equal(torch.bincount(p.phy2log[layer], minlength=E), p.logcnt[layer])   # every expert placed
        for e in range(E):
            reps = p.log2phy[layer, e]
            reps = reps[reps >= 0]
            assert len(reps) == p.logcnt[layer, e] and (p.phy2log[layer, reps] == e).all()
        if G % nodes == 0:      # hierarchical: a node holds whole groups, groups_per_node of them
            per_node = p.phy2log[layer].view(nodes, -1) // (E // G)
            assert all(len(set(row.tolist())) == G // nodes for row in per_node)
    # balance never gets worse than the contiguous placement without redundancy
    if E % gpus == 0:
        before = balance_ratio(identity_placement(3, E).gpu_loads(loads, gpus))
        assert (balance_ratio(p.gpu_loads(loads, gpus)) <= before + 1e-9).all()


def test_parts_and_errors():
    assert balanced_packing([5.0, 1.0, 4.0, 2.0], 2) == ([0, 0, 1, 1], [0, 1, 0, 1])   # 5|4, 2 -> 4, 1 -> 5
    assert replicate([6.0, 2.0], 4) == ([0, 1, 0, 0], [0, 0, 1, 2], [3, 1])
    with pytest.raises(ValueError, match="multiple of num_gpus"):
        rebalance_experts(torch.ones(1, 8), 9, 1, 1, 2)
    with pytest.raises(ValueError, match="groups"):
        rebalance_experts(torch.ones(1, 8), 8, 3, 1, 2)
