"""An exponential moving average of the parameters, kept in CPU memory (TR 3.2.3): it costs no accelerator
memory, and the update runs on a background thread so the training step does not wait for it."""

from concurrent.futures import Future, ThreadPoolExecutor

import torch
from torch import nn


class CPUEma:
    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {n: p.detach().to("cpu", torch.float32, copy=True) for n, p in model.named_parameters()}
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ema")
        self._pending: Future | None = None

    def update(self, model: nn.Module) -> None:
        """Snapshot the parameters now; fold them into the average in the background."""
        self.wait()
        pinned = torch.cuda.is_available() and next(model.parameters()).is_cuda
        snap = {n: p.detach().to("cpu", copy=True, non_blocking=pinned) for n, p in model.named_parameters()}
        event = None
        if pinned:
            event = torch.cuda.Event()
            event.record()
        self._pending = self._pool.submit(self._fold, snap, event)

    def _fold(self, snap: dict, event) -> None:
        if event is not None:
            event.synchronize()
        for n, v in snap.items():
            self.shadow[n].lerp_(v.float(), 1 - self.decay)

    def wait(self) -> None:
        if self._pending is not None:
            self._pending.result()
            self._pending = None

    def state_dict(self) -> dict[str, torch.Tensor]:
        self.wait()
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.wait()
        missing = set(self.shadow) - set(state)
        if missing:
            raise KeyError(f"EMA state lacks {sorted(missing)[:5]}")
        for n in self.shadow:
            self.shadow[n].copy_(state[n])

    def copy_to(self, model: nn.Module) -> None:
        self.wait()
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(self.shadow[n])
