"""Device choice, mixed precision and seeding: the few things every loop shares."""

from __future__ import annotations

import torch

from refilled.errors import UserError


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' takes CUDA when there is a GPU (under Ray: when Ray gave one)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("device 'cuda' asked for but no GPU is visible: use device=auto or device=cpu")
    return torch.device(name)


def autocast(device: torch.device):
    """bf16 autocast on CUDA; plain fp32 elsewhere (the CPU path tests run)."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


def prepare_model(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if device.type == "cuda" else model


def epoch_generator(seed: int, stage: int, epoch: int, device: torch.device) -> torch.Generator:
    """Randomness of one epoch from (seed, stage, epoch) alone, so a run resumed
    at an epoch boundary continues exactly as if it had never stopped."""
    key = (seed * 1_000_003 + stage * 10_007 + epoch) % (2**63)
    torch.manual_seed(key)  # dropout
    g = torch.Generator(device=device)
    g.manual_seed(key)
    return g
