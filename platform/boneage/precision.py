"""Which precision to compute in: bf16 autocast where it is measured faster than fp32, fp32 elsewhere.

Training (``train.precision``) and serving (``serve.precision``) both ask here, so a bundle trained on one
machine and served on another each use what that machine does fast. ``auto`` is decided per kind of device and
per job (training, or predicting with a trained model), from bench/results/precision.json:

- CUDA GPUs: bf16 for both.
- CPUs with AMX (Intel Sapphire Rapids and later): bf16 for both; 2.4x faster training, 3-3.4x faster predicts
  at batch 8-32 (2-core Xeon).
- CPUs with avx512_bf16 but no AMX (AMD Zen 4 and later): bf16 for both; on a 2-core EPYC 2.0x faster training
  on one thread and 2.1x on two (64 px), predicts 1.5x and 1.6x faster at batch 8 and 32; at batch 1 bf16 is 6%
  slower (10.6 against 11.4 ms), which batching under load outweighs.
- Other CPUs (AVX2 and older): fp32; bf16 is emulated there and slower.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Literal

import torch

Job = Literal["train", "predict"]
CpuKind = Literal["amx", "avx512_bf16", "fp32_only"]

# What `auto` computes in on a CPU, by kind of CPU and job (measured: bench/results/precision.json).
AUTO_ON_CPU: dict[CpuKind, dict[Job, str]] = {
    "amx": {"train": "bf16", "predict": "bf16"},
    "avx512_bf16": {"train": "bf16", "predict": "bf16"},
    "fp32_only": {"train": "fp32", "predict": "fp32"},
}


def resolve_precision(precision: str, device: torch.device, job: Job) -> str:
    """``bf16`` or ``fp32``: as asked, or for ``auto`` what is faster for ``job`` on ``device``."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16"
    return AUTO_ON_CPU[cpu_kind()][job] if device.type == "cpu" else "fp32"


def autocast_for(device: torch.device, precision: str, job: Job):
    """bf16 autocast when :func:`resolve_precision` says bf16, else full precision."""
    if resolve_precision(precision, device, job) == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def cpu_kind() -> CpuKind:
    """``amx``: AMX tiles, which oneDNN uses for bf16 matrix products; ``avx512_bf16``: bf16 dot-product
    instructions without AMX; ``fp32_only``: neither, bf16 is emulated."""
    # torch.cpu's probes are private, but the only ones torch offers
    if _probe("_is_amx_tile_supported"):
        return "amx"
    return "avx512_bf16" if _probe("_is_avx512_bf16_supported") else "fp32_only"


def _probe(name: str) -> bool:
    probe = getattr(torch.cpu, name, None)
    return bool(probe and probe())


def describe(device: torch.device, precision: str, job: Job, why: str = "") -> str:
    """How a job computes, for its log: e.g. ``precision bf16 (auto on an avx512_bf16 CPU), device cpu``; ``why``
    replaces the reason in brackets."""
    chosen = resolve_precision(precision, device, job)
    return f"precision {chosen} ({why or _reason(device, precision)}), device {device}"


def _reason(device: torch.device, precision: str) -> str:
    if precision != "auto":
        return "as configured"
    if device.type != "cpu":
        return f"auto on {device.type}"
    return f"auto on an {cpu_kind()} CPU" if cpu_kind() != "fp32_only" else "auto on a CPU without bf16 units"
