"""AdamW with BF16 moments and FP32 master weights (TR 3.3.3, "Low-Precision Optimizer States").

DeepSeek-V3 keeps AdamW's first and second moments in BF16 (half the optimizer memory) and, when the model's weights
are BF16, an FP32 master copy that the update is applied to, so that small updates are not lost to BF16 rounding.
The arithmetic of a step is FP32: moments are read up to FP32, updated, rounded back to BF16 to be stored.

    m <- b1 m + (1 - b1) g;   v <- b2 v + (1 - b2) g^2                      (FP32, stored as BF16)
    w <- w - lr (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps) - lr wd w   (FP32 master; then copied to the param)

The update itself is `dsv3.kernels.adamw.adamw_update`: one Triton pass per parameter on the GPU, the PyTorch
reference elsewhere. Like torch's fused AdamW, the optimizer divides the gradients by its `grad_scale` attribute
when the trainer sets one (gradient clipping without a separate pass over the gradients).

Parameters that are already FP32 are their own master (no copy). The state dict is torch's usual per-parameter
state ({"step", "exp_avg", "exp_avg_sq", and "master" for BF16 parameters}), so checkpoints save and load it as is.
"""

from __future__ import annotations

import torch

from ..kernels.adamw import adamw_update


class AdamWBF16(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8,
                 weight_decay: float = 0.0, state_dtype: torch.dtype = torch.bfloat16):
        if not 0.0 <= lr or not 0.0 <= eps or not all(0.0 <= b < 1.0 for b in betas) or weight_decay < 0:
            raise ValueError(f"invalid AdamW hyper-parameters: lr={lr}, betas={betas}, eps={eps}, wd={weight_decay}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.state_dtype = state_dtype

    def load_state_dict(self, state_dict: dict) -> None:
        # torch casts loaded state to each parameter's dtype: that would widen the BF16 moments and round the FP32
        # master copies to BF16. Put back the tensors as saved.
        kept = {pid: {k: v for k, v in st.items() if k in ("exp_avg", "exp_avg_sq", "master")}
                for pid, st in state_dict["state"].items()}
        super().load_state_dict(state_dict)
        ids = [pid for g in state_dict["param_groups"] for pid in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for pid, p in zip(ids, params):
            for k, v in kept.get(pid, {}).items():
                self.state[p][k] = v.to(device=p.device, copy=True)

    def _init_state(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        state["step"] = torch.zeros((), dtype=torch.float32)
        state["exp_avg"] = torch.zeros_like(p, dtype=self.state_dtype, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, dtype=self.state_dtype, memory_format=torch.preserve_format)
        if p.dtype != torch.float32:
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
                adamw_update(p, p.grad, state["exp_avg"], state["exp_avg_sq"], state.get("master"), lr, b1, b2, eps,
                             wd, int(state["step"]), grad_scale)
        return loss
