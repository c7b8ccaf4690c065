"""AdamW with BF16 moments and FP32 master weights (TR 3.3.3, "Low-Precision Optimizer States").

DeepSeek-V3 keeps AdamW's first and second moments in BF16 (half the optimizer memory) and, when the model's weights
are BF16, an FP32 master copy that the update is applied to, so that small updates are not lost to BF16 rounding.
The arithmetic of a step is FP32: moments are read up to FP32, updated, rounded back to BF16 to be stored.

    m <- b1 m + (1 - b1) g;   v <- b2 v + (1 - b2) g^2                      (FP32, stored as BF16)
    w <- w - lr (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps) - lr wd w   (FP32 master; then copied to the param)

Parameters that are already FP32 are their own master (no copy). The state dict is torch's usual per-parameter
state ({"step", "exp_avg", "exp_avg_sq", and "master" for BF16 parameters}), so checkpoints save and load it as is.
"""

from __future__ import annotations

import torch


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
                t = float(state["step"])
                master = state.get("master", p)
                g = p.grad.float()
                m = state["exp_avg"].float().lerp_(g, 1 - b1)
                v = state["exp_avg_sq"].float().mul_(b2).addcmul_(g, g, value=1 - b2)
                state["exp_avg"].copy_(m)
                state["exp_avg_sq"].copy_(v)
                if wd:
                    master.mul_(1 - lr * wd)
                denom = (v / (1 - b2 ** t)).sqrt_().add_(eps)
                master.addcdiv_(m, denom, value=-lr / (1 - b1 ** t))
                if master is not p:
                    p.copy_(master)
        return loss
