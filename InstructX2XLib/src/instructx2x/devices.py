"""Device and precision choice: CUDA, then MPS, then CPU; half precision where it pays."""

from __future__ import annotations

import torch

__all__ = ["resolve_device", "resolve_dtype", "needs_attention_slicing", "DTYPES",
           "SLICING_FREE_MEMORY_BYTES"]

# Below this much free accelerator memory, attention is sliced: an SD-1.5 edit at 512 px with
# SDPA peaks near 3 GiB in half precision (benchmark target <= 4 GiB).
SLICING_FREE_MEMORY_BYTES = 4 * 2**30

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16,
                                  "bf16": torch.bfloat16}


def resolve_device(device: str = "auto") -> torch.device:
    """Pick the device: ``auto`` takes CUDA, then MPS, then CPU.

    Raises
    ------
    ValueError
        When an explicitly requested accelerator is not available.
    """
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available.")
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r} requested but MPS is not available.")
    return resolved


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """Pick the compute precision: ``auto`` is fp16/bf16 on GPUs and bf16 on CPU.

    bf16 on CPU runs the UNet about 2x faster than fp32 with AVX-512 bf16 and about 3x with
    AMX (docs/benchmarks.md); fp16 on CPU is refused because it is slower and less stable.

    Raises
    ------
    ValueError
        When the name is unknown or the precision is not supported on the device.
    """
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if device.type == "mps":
            return torch.float16
        return torch.bfloat16
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose auto, {', '.join(DTYPES)}.")
    if device.type == "cpu" and dtype == "fp16":
        raise ValueError("dtype 'fp16' is not supported on CPU; use 'bf16' or 'fp32'.")
    return DTYPES[dtype]


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
