"""EPLB on report-like skewed expert loads: max / mean load per GPU with the contiguous placement (no redundancy)
vs the EPLB placement, in V3's serving layouts (TR 3.4). Loads are synthetic: 58 MoE layers x 256 experts, each
expert's mean load lognormal (sigma 1.0: the busiest experts take ~4-6x the mean, the skew the report's
redundant experts answer); the placement is computed from one window's counts and scored on the next window's
(the same means, fresh Poisson noise), as a live rebalance would be.

    PYTHONPATH=src python benchmarks/eplb_balance.py
"""

import torch

from dsv3.infer.eplb import balance_ratio, identity_placement, rebalance_experts

LAYERS, E, GROUPS, TOKENS = 58, 256, 8, 8 * 4096 * 8      # tokens x top-8 routed per window


def windows(seed: int, sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mean = torch.exp(sigma * torch.randn(LAYERS, E, generator=g))
    mean = mean / mean.sum(-1, keepdim=True) * TOKENS
    return torch.poisson(mean, generator=g), torch.poisson(mean, generator=g)


def main() -> None:
    layouts = [("prefill EP32, 4 nodes x 8, +32 redundant (hierarchical)", 288, 4, 32),
               ("decode EP64, 8 nodes x 8, +64 redundant (hierarchical)", 320, 8, 64),
               ("decode EP64, 16 nodes x 4, +64 redundant (global: 16 nodes, 8 groups)", 320, 16, 64),
               ("decode EP320, 40 nodes x 8, 1 expert per GPU, +64 redundant (global)", 320, 40, 320)]
    for sigma in (0.5, 1.0):
        observed, nxt = windows(0, sigma)
        for name, slots, nodes, gpus in layouts:
            p = rebalance_experts(observed, slots, GROUPS, nodes, gpus)
            base = identity_placement(LAYERS, E)
            # before: the contiguous placement, on min(GPUs, 256) GPUs (EP320 without redundancy: 256 used)
            load_before, load_after = base.gpu_loads(nxt, min(gpus, E)), p.gpu_loads(nxt, gpus)
            before, after = balance_ratio(load_before), balance_ratio(load_after)
            peak = load_after.max(-1).values / load_before.max(-1).values
            print(f"| sigma {sigma} | {name} | {before.mean():.2f} ({before.max():.2f}) | {after.mean():.2f} "
                  f"({after.max():.2f}) | {peak.mean():.2f} |")


if __name__ == "__main__":
    main()
