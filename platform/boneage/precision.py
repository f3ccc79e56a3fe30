"""Which precision to compute in: bf16 autocast where the hardware has bf16 matrix units, fp32 elsewhere.

Training (``train.precision``) and serving (``serve.precision``) both ask here, so a bundle trained on one
machine and served on another each use what that machine does fast.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch


def autocast_for(device: torch.device, precision: str = "auto"):
    """bf16 autocast when :func:`computes_in_bf16`, else full precision."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if computes_in_bf16(device, precision) else nullcontext()


def computes_in_bf16(device: torch.device, precision: str = "auto") -> bool:
    """``bf16`` / ``fp32`` as asked; ``auto``: bf16 on hardware with bf16 matrix units, CUDA GPUs and CPUs with
    AMX, where it is 2-5x faster than fp32 (measured: bench/results/precision.json). Elsewhere, e.g. AVX2 CPUs,
    bf16 is emulated and slower."""
    if precision != "auto":
        return precision == "bf16"
    return device.type == "cuda" or (device.type == "cpu" and has_amx())


def has_amx() -> bool:
    """Whether this CPU has AMX tiles (Sapphire Rapids and later), which oneDNN uses for bf16 matrix products."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)  # private, but the only query torch offers
    return bool(probe and probe())
