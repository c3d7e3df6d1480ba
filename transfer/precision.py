"""Which floating-point precision to compute in, decided from the hardware.

bf16 halves memory traffic and, where the hardware has bf16 dot products (AVX512-BF16 or AMX on
x86, the BF16 extension on Arm, any recent GPU), runs several times faster than fp32. Where it
has not, PyTorch falls back to slow reference kernels: on an AVX2-only x86 CPU a 1024x1024 bf16
matmul took 1.86 s against 0.0135 s in fp32 (README, "Precision and hardware"). A setting of ``auto`` therefore means bf16 only
where it is native, and fp32 everywhere else; an explicit ``bf16``/``fp32`` is always obeyed.

The capability is what torch itself will use: on a CPU, ``torch.ops.mkldnn._is_mkldnn_bf16_supported()``
(oneDNN's verdict; it also honours ``ONEDNN_MAX_CPU_ISA``, so ``ONEDNN_MAX_CPU_ISA=AVX2`` makes a
bf16 machine behave, and decide, like an AVX2-only one); on CUDA, ``torch.cuda.is_bf16_supported``
without emulation.

Used by ``transfer run`` (training precision) and by the vLLM engine of ``ensemble``/``serve`` on
a GPU (the members' dtype; on a CPU that engine's ``auto`` is float32, see
``ensemble.vllm_engine.engine_dtype``); ``transfer eval``, the ensemble build and fit and the
reference engine stay fp32.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch

log = logging.getLogger("chorus.precision")

# Every spelling a config or command line may use, to the dtype it means. "auto" is decided below.
_ALIASES = {
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
}
SPELLINGS = ("auto", *_ALIASES)


def native_bf16(device: torch.device | str = "cpu") -> bool:
    """Whether `device` runs bf16 matrix products natively (not by slow emulation)."""
    kind = torch.device(device).type
    if kind == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False))
    if kind == "cpu":
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False  # mps, xpu, ...: not measured here, fp32 is the safe side


def decide(requested: str, device: torch.device | str = "cpu", *, native: Optional[bool] = None) -> tuple[torch.dtype, str]:
    """The dtype for `requested` (``auto`` or an explicit spelling such as ``bf16``) and why.

    ``auto`` is bf16 where `device` has native bf16 (:func:`native_bf16`, or `native` when a test
    injects it) and fp32 elsewhere; any other spelling is returned as it is. Logs nothing.
    """
    key = str(requested).lower()
    if key != "auto":
        if key not in _ALIASES:
            raise ValueError(f"unknown dtype {requested!r}: use one of {', '.join(SPELLINGS)}")
        return _ALIASES[key], "set explicitly"
    kind = torch.device(device).type
    has = native_bf16(device) if native is None else native
    dtype = torch.bfloat16 if has else torch.float32
    why = (f"this {kind} has native bf16" if has
           else f"this {kind} has no native bf16: emulated bf16 would be tens of times slower than fp32")
    return dtype, f"auto: {why}"


def announce(what: str, dtype: torch.dtype, why: str) -> None:
    """Log the one line that says which precision `what` uses and why."""
    log.info("precision for %s: %s (%s)", what, _name(dtype), why)


def choose_dtype(
    requested: str,
    device: torch.device | str = "cpu",
    *,
    native: Optional[bool] = None,
    what: str = "compute",
) -> torch.dtype:
    """:func:`decide`, then :func:`announce` the choice for `what`; returns the dtype."""
    dtype, why = decide(requested, device, native=native)
    announce(what, dtype, why)
    return dtype


def short_name(dtype: torch.dtype) -> str:
    """``bf16``/``fp32``/``fp16`` for a dtype (the spelling of transfer configs)."""
    return {torch.bfloat16: "bf16", torch.float32: "fp32", torch.float16: "fp16"}[dtype]


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
