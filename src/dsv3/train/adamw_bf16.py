"""AdamW with BF16 moments and FP32 master weights (TR 3.3.3, "Low-Precision Optimizer States").

DeepSeek-V3 keeps AdamW's first and second moments in BF16 (half the optimizer memory) and, when the model's weights
are BF16, an FP32 master copy that the update is applied to, so that small updates are not lost to BF16 rounding.
The arithmetic of a step is FP32: moments are read up to FP32, updated, rounded back to BF16 to be stored.

    m <- b1 m + (1 - b1) g;   v <- b2 v + (1 - b2) g^2                      (FP32, stored as BF16)
    w <- w - lr (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps) - lr wd w   (FP32 master; then copied to the param)

The update itself is `dsv3.kernels.adamw.adamw_update`: one Triton pass per parameter on the GPU, the PyTorch
reference elsewhere. Like torch's fused AdamW, the optimizer divides the gradients by its `grad_scale` attribute
when the trainer sets one (gradient clipping without a separate pass over the gradients).

Parameters that are already FP32 are their own master (no copy). `master="split"` (`optim.master`) keeps the FP32
master of a BF16 parameter in two halves: the parameter is its high 16 bits (rounded half away from zero) and an
int16 tensor its low ones, the same FP32 value for 2 bytes per parameter instead of 4 (and 18 bytes moved per update
instead of 20; `dsv3.kernels.adamw`). The state dict is torch's usual per-parameter state ({"step", "exp_avg",
"exp_avg_sq", and "master" (FP32) or "master_lo" (int16, split) for BF16 parameters}), so checkpoints save and
load it as is.
"""

from __future__ import annotations

import torch

from ..kernels.adamw import adamw_update, join_master, split_master


class AdamWBF16(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8,
                 weight_decay: float = 0.0, state_dtype: torch.dtype = torch.bfloat16, master: str = "fp32"):
        if not 0.0 <= lr or not 0.0 <= eps or not all(0.0 <= b < 1.0 for b in betas) or weight_decay < 0:
            raise ValueError(f"invalid AdamW hyper-parameters: lr={lr}, betas={betas}, eps={eps}, wd={weight_decay}")
        if master not in ("fp32", "split"):
            raise ValueError(f"master must be 'fp32' or 'split', got {master!r}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.state_dtype, self.master = state_dtype, master

    def load_state_dict(self, state_dict: dict) -> None:
        # torch casts loaded state to each parameter's dtype: that would widen the BF16 moments and round the FP32
        # master copies to BF16. Put back the tensors as saved.
        kept = {pid: {k: v for k, v in st.items() if k in ("exp_avg", "exp_avg_sq", "master", "master_lo")}
                for pid, st in state_dict["state"].items()}
        super().load_state_dict(state_dict)
        ids = [pid for g in state_dict["param_groups"] for pid in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for pid, p in zip(ids, params):
            for k, v in kept.get(pid, {}).items():
                self.state[p][k] = v.to(device=p.device, copy=True)
            self._as_own_master(p, self.state[p])

    @torch.no_grad()
    def _as_own_master(self, p: torch.Tensor, state: dict) -> None:
        """A loaded state written with the other `master` setting, converted to this one (the same FP32 value)."""
        if p.dtype != torch.bfloat16:
            return
        if self.master == "split" and "master" in state:
            hi, state["master_lo"] = split_master(state.pop("master"))
            p.copy_(hi)
        elif self.master == "fp32" and "master_lo" in state:
            state["master"] = join_master(p, state.pop("master_lo"))

    def _init_state(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        state["step"] = torch.zeros((), dtype=torch.float32)
        state["exp_avg"] = torch.zeros_like(p, dtype=self.state_dtype, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, dtype=self.state_dtype, memory_format=torch.preserve_format)
        if p.dtype == torch.bfloat16 and self.master == "split":
            # the parameter is the master's high half as it stands (its low half zero): nothing rounds, nothing moves
            state["master_lo"] = torch.zeros_like(p, dtype=torch.int16, memory_format=torch.preserve_format)
        elif p.dtype != torch.float32:
            state["master"] = p.detach().float()
        return state

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale = getattr(self, "grad_scale", None)   # clipping folded in, as torch's fused AdamW: g / grad_scale
        for group in self.param_groups:
            lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            lr = float(lr)
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("AdamWBF16 does not support sparse gradients")
                state = self.state[p] if self.state[p] else self._init_state(p)
                state["step"] += 1
                master = state["master_lo"] if "master_lo" in state else state.get("master")
                adamw_update(p, p.grad, state["exp_avg"], state["exp_avg_sq"], master, lr, b1, b2, eps, wd,
                             int(state["step"]), grad_scale)
        return loss
