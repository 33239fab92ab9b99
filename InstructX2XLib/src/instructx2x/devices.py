"""Device and precision choice: CUDA, then MPS, then CPU; half precision where it pays."""

from __future__ import annotations

import platform

import torch

from .backends import cpu_kind  # the CPU kind of docs/benchmarks.md section 1, from its flags
from .backends import cpu_vendor_and_flags as _cpu_vendor_and_flags
from .errors import ParameterError

__all__ = [
    "resolve_device",
    "resolve_dtype",
    "needs_attention_slicing",
    "cpu_has_native_bf16",
    "cpu_description",
    "cpu_kind",
    "DTYPES",
    "SLICING_FREE_MEMORY_BYTES",
    "CPU_BF16_MIN_PARAMETERS",
]

# Below this much free accelerator memory, attention is sliced: an SD-1.5 edit at 512 px with
# SDPA peaks near 3 GiB in half precision (benchmark target <= 4 GiB).
SLICING_FREE_MEMORY_BYTES = 4 * 2**30

# Below this many UNet parameters fp32 is as fast as bf16 on CPU (the casts dominate).
CPU_BF16_MIN_PARAMETERS = 100_000_000

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_device(device: str = "auto") -> torch.device:
    """Pick the device: ``auto`` takes CUDA, then MPS, then CPU.

    Raises
    ------
    ParameterError
        When the name is unknown or an explicitly requested accelerator is not available.
    """
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ParameterError(f"unknown device {device!r}; choose auto, cpu, cuda, cuda:N or mps.") from None
    if resolved.type not in ("cpu", "cuda", "mps"):
        raise ParameterError(f"device {device!r} is not supported; choose auto, cpu, cuda, cuda:N or mps.")
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ParameterError(f"device {device!r} requested but CUDA is not available.")
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise ParameterError(f"device {device!r} requested but MPS is not available.")
    return resolved


def cpu_has_native_bf16() -> bool:
    """True when this CPU computes bf16 in hardware (AVX-512 BF16 or AMX), from its flags.

    Without those instructions oneDNN emulates bf16, about 10x slower than fp32
    (docs/benchmarks.md section 1).
    """
    return bool(_cpu_vendor_and_flags()[1] & {"avx512_bf16", "amx_bf16"})


def cpu_description() -> str:
    """The CPU kind in a few words, printed beside every timing and stored in manifests.

    It names the vendor and the bf16 path: an Intel with AMX trained the demo model at 0.71 s
    a step, an AMD with AVX-512 BF16 alone at 1.0 s, so a timing means little without it.
    """
    vendor, flags = _cpu_vendor_and_flags()
    capability = torch.backends.cpu.get_cpu_capability()
    bf16 = " +bf16 (AMX)" if "amx_bf16" in flags else " +bf16 (AVX-512 BF16)" if cpu_has_native_bf16() else ""
    return " ".join(filter(None, (vendor, platform.machine(), capability))) + bf16


def resolve_dtype(
    dtype: str,
    device: torch.device,
    parameter_count: int | None = None,
) -> tuple[torch.dtype, str]:
    """Pick the compute precision and say why.

    ``auto``: fp16/bf16 on GPUs; on CPU, bf16 only when the CPU has bf16 instructions and
    the UNet is large enough for it to pay (``CPU_BF16_MIN_PARAMETERS``), else fp32. bf16
    runs an SD-1.5-size UNet ~3x faster than fp32 with AMX and ~2x with AVX-512 BF16; on an
    AVX2-only CPU it is emulated and ~10x slower, and on a tiny model the casts dominate.

    Parameters
    ----------
    dtype: str
        ``auto``, ``fp32``, ``bf16`` or ``fp16``.
    device: torch.device
        Where the model runs.
    parameter_count: int | None
        Parameters of the UNet (None: treated as large).

    Returns
    -------
    tuple[torch.dtype, str]
        The dtype and a sentence for manifests and ``instructx2x info``.

    Raises
    ------
    ParameterError
        When the name is unknown or the precision is not supported on the device.
    """
    if dtype not in ("auto", *DTYPES):
        raise ParameterError(f"unknown dtype {dtype!r}; choose auto, {', '.join(DTYPES)}.")
    if device.type == "cpu" and dtype == "fp16":
        raise ParameterError("dtype 'fp16' is not supported on CPU; use 'bf16' or 'fp32'.")
    if dtype != "auto":
        return DTYPES[dtype], f"{dtype} as requested"
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, "auto: bf16 on a GPU that supports it"
        return torch.float16, "auto: fp16 on a GPU without bf16"
    if device.type == "mps":
        return torch.float16, "auto: fp16 on Apple MPS"
    if not cpu_has_native_bf16():
        return torch.float32, "auto: fp32, this CPU has no bf16 instructions (bf16 would be emulated)"
    if parameter_count is not None and parameter_count < CPU_BF16_MIN_PARAMETERS:
        return torch.float32, (
            f"auto: fp32, the UNet has {parameter_count / 1e6:.1f} M parameters "
            "(bf16 pays only for large models)"
        )
    return torch.bfloat16, "auto: bf16, this CPU has bf16 instructions (AVX-512 BF16 or AMX)"


def needs_attention_slicing(device: torch.device, free_bytes: int | None = None) -> bool:
    """Slice attention only when memory demands it: on an accelerator with little free memory.

    Slicing trades speed for memory; SDPA alone is faster and fits in the memory the
    benchmark targets, so CPUs and well-equipped GPUs never slice.

    Parameters
    ----------
    device: torch.device
        Where the model runs.
    free_bytes: int | None
        Free accelerator memory; read from CUDA when None.
    """
    if device.type != "cuda":
        return False
    if free_bytes is None:
        free_bytes = torch.cuda.mem_get_info(device)[0]
    return free_bytes < SLICING_FREE_MEMORY_BYTES
