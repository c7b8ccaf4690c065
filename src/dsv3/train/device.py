"""The training device (train.device) and the step's compute dtype (train.dtype), for the Trainer and the teacher
of a distillation run alike."""

from __future__ import annotations

import os

import torch

from ..config import ConfigError


def resolve_device(name: str) -> torch.device:
    """train.device as a torch device that exists here (a config names CUDA on a machine without it: one line).
    Under torchrun, "auto" / "cuda" are this process's GPU (LOCAL_RANK), made the current device."""
    if "LOCAL_RANK" in os.environ and torch.cuda.is_available() and name in ("auto", "cuda"):
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))      # torchrun: one GPU per process
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return check_device(name, "train.device", "'cpu' or 'auto'")


def check_device(name: str, what: str, instead: str) -> torch.device:
    """`name` as a device this machine has (cpu, or an existing cuda[:N]); else one line naming `what` (the setting
    or flag that asked) and what to use `instead` (ConfigError, before anything is read or written)."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"{what}={name!r} is not a device (cpu, cuda or cuda:N)") from None
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"{what}={name!r}: only cpu and cuda are supported")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{what}={name!r}: this machine has no CUDA device; use {instead}")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ConfigError(f"{what}={name!r}: this machine has {torch.cuda.device_count()} CUDA devices")
    return device


def compute_dtype(name: str, device: torch.device) -> torch.dtype:
    """bf16 autocast where the device does it fast (CUDA); fp32 on the CPU unless asked."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    return {"bf16": torch.bfloat16, "bf16-params": torch.bfloat16, "fp32": torch.float32}[name]
