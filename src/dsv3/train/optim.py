"""AdamW with the V3 settings (betas 0.9/0.95, weight decay 0.1; TR 4.2).

Weight decay applies to matrices only: norm gains and biases are scales and offsets that decay would pull towards
zero for no regularising benefit (the usual GPT practice). The routing bias is a buffer, not a parameter, and is
moved only by the balancing rule.
"""

import torch
from torch import nn

from .adamw_bf16 import AdamWBF16
from .config import OptimConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: OptimConfig, compiled: bool = False) -> torch.optim.Optimizer:
    """Fused AdamW on CUDA, foreach on CPU; `compiled`: foreach AdamW with a tensor learning rate, for
    torch.compile to fuse (a float lr would recompile whenever the schedule changes it)."""
    device = next(model.parameters()).device
    if cfg.state_dtype == "bf16":
        if compiled:
            raise ValueError("optim.state_dtype=bf16 does not combine with train.compile_optimizer")
        return AdamWBF16(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                         master=cfg.master)
    lr: float | torch.Tensor = cfg.lr
    if compiled:
        kwargs, lr = {"foreach": True, "capturable": True}, torch.tensor(cfg.lr, device=device)
    else:
        kwargs = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=lr, betas=tuple(cfg.betas), eps=cfg.eps,
                             **kwargs)


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr


def compiled_clip_and_step(optimizer: torch.optim.Optimizer):
    """A compiled `step(grads, clip_coef)`: the gradient scaling of clipping and the AdamW update, which Inductor
    fuses into one pass over parameters, gradients and moments."""
    @torch.compile(fullgraph=False)
    def step(grads: list[torch.Tensor], clip_coef: torch.Tensor) -> None:
        torch._foreach_mul_(grads, clip_coef)
        optimizer.step()
    return step
