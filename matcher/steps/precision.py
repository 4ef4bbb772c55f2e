"""The numeric precision encoders run in (extract.precision): part of every model encoder's feature version, since
features of two precisions differ slightly and must never be mixed in one table."""
from __future__ import annotations

import contextlib

import torch

from matcher.config import PRECISIONS

__all__ = ["PRECISIONS", "autocast", "cpu_has_bf16", "resolve_precision"]
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX-512 bf16 or AMX); elsewhere bf16 is emulated, slower
    than fp32."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # torch.cpu's own CPUID checks
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)


def resolve_precision(requested: str, on_gpu: bool) -> str:
    """"auto": fp16 on a GPU, bf16 on a CPU with bf16 units, else fp32. Resolved once, where the run is planned
    (the driver), and the result handed to every executor, so one night's features share one version."""
    if requested != "auto":
        return requested
    if on_gpu:
        return "fp16"
    return "bf16" if cpu_has_bf16() else "fp32"


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The context a forward pass runs under in `precision` (fp32: none). Autocast keeps reductions and norms in
    float32 where torch's op lists say so."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=_DTYPES[precision])
