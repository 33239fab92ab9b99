"""What runs the pipeline's networks: torch, or OpenVINO on the CPU (``--backend``).

The choice and its checks, without torch or OpenVINO, so that the CLI refuses a backend that
cannot run before it reads any input or loads a model. ``openvino_runtime`` holds the OpenVINO
path itself.
"""

from __future__ import annotations

import functools
import os
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path

from .errors import ParameterError, ResourceError

__all__ = [
    "BACKENDS",
    "CACHE_ENV",
    "MEASURED_SPEEDUP",
    "OPENVINO_EXTRA",
    "OPENVINO_MIN_PARAMETERS",
    "auto_takes_openvino",
    "cache_folder",
    "check_backend",
    "check_cache_folder",
    "cpu_kind",
    "cpu_kind_of",
    "cpu_vendor_and_flags",
    "ISA_LIMIT_ENVS",
    "limited_flags",
    "openvino_available",
    "require_openvino",
    "resolve_backend",
]

BACKENDS = ("auto", "torch", "openvino")
OPENVINO_EXTRA = "install the extra instructx2x[openvino] (from a clone: pip install -c constraints.txt -e './InstructX2XLib[openvino]')"
CACHE_ENV = "INSTRUCTX2X_CACHE"
# The UNet size from which OpenVINO is the faster runtime (docs/benchmarks.md section 3): below
# it, torch's eager calls are as fast and a first load would pay a conversion for nothing.
OPENVINO_MIN_PARAMETERS = 100_000_000
# The warm SD-1.5-size edit, torch against OpenVINO in one run, by CPU kind (cpu_kind;
# docs/benchmarks.md section 3): where OpenVINO measured faster, ``auto`` takes it.
MEASURED_SPEEDUP: dict[str, str] = {
    "amx": "measured 1.8x less CPU time than torch for an SD-1.5-size edit (bf16, 41 s)",
}


# The variables that cap the instruction sets oneDNN (torch's and OpenVINO's copies) and
# OpenVINO's own kernels use, and the caps' order by what they allow of the flags that pick a
# CPU kind and bf16: AVX2, AVX-512 BF16, AMX. Names as oneDNN spells them (any case).
ISA_LIMIT_ENVS = ("ONEDNN_MAX_CPU_ISA", "OV_CPU_MAX_ISA")
_ISA_RANKS = {
    "SSE41": 0,
    "SSE42": 0,
    "AVX": 1,
    "AVX2": 2,
    "AVX2_VNNI": 2,
    "AVX2_VNNI_2": 2,
    "AVX512_CORE": 2,
    "AVX512_CORE_VNNI": 2,
    "AVX512_CORE_BF16": 3,
    "AVX512_CORE_FP16": 3,
}
# the flags a cap below each rank takes away
_FLAGS_ABOVE_RANK = {
    2: {"avx2"},
    3: {"avx512_bf16"},
    4: {"amx_bf16", "amx_int8", "amx_tile", "amx_fp16"},
}


def limited_flags(flags: frozenset[str], environment: Mapping[str, str]) -> frozenset[str]:
    """``flags`` less what the strictest cap of ``ISA_LIMIT_ENVS`` in ``environment`` forbids
    the kernels: under ``ONEDNN_MAX_CPU_ISA=AVX2`` an AMX CPU runs as an AVX2-only one (no bf16
    instructions), so it is that kind here too. Unknown values, ``ALL`` and ``DEFAULT`` cap
    nothing."""
    ranks = [_ISA_RANKS.get(environment.get(name, "").strip().upper(), 4) for name in ISA_LIMIT_ENVS]
    rank = min(ranks)
    removed = set().union(*(names for above, names in _FLAGS_ABOVE_RANK.items() if rank < above))
    return frozenset(flags - removed)


@functools.lru_cache(maxsize=1)
def cpu_vendor_and_flags() -> tuple[str, frozenset[str]]:
    """The CPU's vendor ('Intel', 'AMD', or as /proc/cpuinfo spells it) and the flags its
    kernels may use: /proc/cpuinfo's, less those an ISA cap forbids (``limited_flags``); none
    where there is no /proc/cpuinfo (Windows, macOS)."""
    vendor = ""
    flags: frozenset[str] = frozenset()
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as handle:
            for line in handle:
                if line.startswith("vendor_id") and not vendor:
                    vendor = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = frozenset(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    return {"GenuineIntel": "Intel", "AuthenticAMD": "AMD"}.get(vendor, vendor), limited_flags(
        flags, os.environ
    )


def cpu_kind_of(flags: frozenset[str] | set[str]) -> str:
    """The CPU kind of docs/benchmarks.md section 1 from a CPU's flags: ``amx`` (AMX, which
    comes with AVX-512 BF16), ``avx512_bf16``, ``avx2`` (neither) or ``other`` (no AVX2, or no
    flags known)."""
    if "amx_bf16" in flags:
        return "amx"
    if "avx512_bf16" in flags:
        return "avx512_bf16"
    return "avx2" if "avx2" in flags else "other"


def cpu_kind() -> str:
    """This CPU's kind (``cpu_kind_of`` its flags)."""
    return cpu_kind_of(cpu_vendor_and_flags()[1])


def auto_takes_openvino(kind: str) -> bool:
    """Whether ``auto`` takes OpenVINO on a CPU of this kind (for a UNet of at least
    ``OPENVINO_MIN_PARAMETERS``): where it measured faster (``MEASURED_SPEEDUP``)."""
    return kind in MEASURED_SPEEDUP


def openvino_available() -> bool:
    """Whether the ``openvino`` package imports (a third of a second the first time)."""
    try:
        import openvino  # noqa: F401
    except (ImportError, OSError):  # not installed, or its libraries do not load
        return False
    return True


def require_openvino() -> None:
    """Refuse the OpenVINO backend where the package is missing or does not import.

    Raises
    ------
    ParameterError
        Naming the optional extra that installs it.
    """
    if not openvino_available():
        raise ParameterError(
            f"--backend openvino needs the OpenVINO runtime, which is not installed (or does not "
            f"import): {OPENVINO_EXTRA} (or choose --backend torch)."
        )


def cache_folder(folder: str | Path | None = None) -> Path:
    """Where converted models are kept: ``folder``, else ``$INSTRUCTX2X_CACHE/openvino``, else
    ``openvino`` in the user's cache folder (``$XDG_CACHE_HOME/instructx2x`` or
    ``~/.cache/instructx2x``; ``%LOCALAPPDATA%\\instructx2x\\cache`` on Windows)."""
    if folder is not None:
        return Path(folder).expanduser()
    root = os.environ.get(CACHE_ENV)
    if root:
        return Path(root).expanduser() / "openvino"
    if sys.platform == "win32" and os.environ.get("LOCALAPPDATA"):
        return Path(os.environ["LOCALAPPDATA"]) / "instructx2x" / "cache" / "openvino"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "instructx2x" / "openvino"


def check_cache_folder(folder: str | Path | None = None) -> Path:
    """Make the cache folder if needed and check that files can be written in it.

    Returns
    -------
    pathlib.Path
        The folder.

    Raises
    ------
    ResourceError
        When it cannot be made or written, with the folder, the reason and the way out.
    """
    path = cache_folder(folder)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".probe-"):
            pass
    except OSError as error:
        raise ResourceError(
            f"the OpenVINO cache folder {path} is not writable ({error.strerror or error}): set "
            f"{CACHE_ENV} to a writable folder, or use --backend torch."
        ) from None
    return path


def check_backend(backend: str, device: str = "auto", folder: str | Path | None = None) -> None:
    """Refuse a backend that cannot run here, before any model loads.

    Parameters
    ----------
    backend: str
        ``auto``, ``torch`` or ``openvino``.
    device: str
        The device asked for (``auto``, ``cpu``, ``cuda``...).
    folder: str | pathlib.Path | None
        The OpenVINO cache folder (``cache_folder``).

    Raises
    ------
    ParameterError
        An unknown backend; ``openvino`` with a GPU device or without the OpenVINO package.
    ResourceError
        ``openvino`` with a cache folder that cannot be written.
    """
    if backend not in BACKENDS:
        raise ParameterError(f"unknown backend {backend!r}; choose {', '.join(BACKENDS)}.")
    if backend != "openvino":
        return
    if device not in ("auto", "cpu"):
        raise ParameterError(
            f"the OpenVINO backend runs the model on the CPU, not on {device!r}: give --device cpu "
            "(or auto), or --backend torch."
        )
    require_openvino()
    check_cache_folder(folder)


def resolve_backend(
    backend: str,
    device_type: str,
    parameter_count: int,
    folder: str | Path | None = None,
) -> tuple[str, str]:
    """Pick the runtime of the networks and say why.

    ``auto`` takes OpenVINO on a CPU whose kind measured it faster (``MEASURED_SPEEDUP``) for
    a UNet of at least ``OPENVINO_MIN_PARAMETERS``, when it is installed and its cache folder
    is writable; torch otherwise.

    Parameters
    ----------
    backend: str
        ``auto``, ``torch`` or ``openvino``.
    device_type: str
        The resolved device's type (``cpu``, ``cuda``, ``mps``).
    parameter_count: int
        The UNet's parameters.
    folder: str | pathlib.Path | None
        The OpenVINO cache folder (``cache_folder``).

    Returns
    -------
    tuple[str, str]
        ``torch`` or ``openvino``, and a sentence for manifests and ``instructx2x info``.

    Raises
    ------
    ParameterError, ResourceError
        As ``check_backend``, for an explicit ``openvino``.
    """
    check_backend(backend, device_type, folder)
    if backend != "auto":
        return backend, f"{backend} as requested"
    if device_type != "cpu":
        return "torch", f"auto: torch on {device_type} (the OpenVINO backend runs on CPUs)"
    if parameter_count < OPENVINO_MIN_PARAMETERS:
        return "torch", (
            f"auto: torch, the UNet has {parameter_count / 1e6:.1f} M parameters (OpenVINO pays "
            f"from {OPENVINO_MIN_PARAMETERS / 1e6:.0f} M)"
        )
    kind = cpu_kind()
    if not auto_takes_openvino(kind):
        return "torch", f"auto: torch, OpenVINO has not measured faster on this CPU kind ({kind})"
    if not openvino_available():
        return "torch", (
            f"auto: torch, OpenVINO ({MEASURED_SPEEDUP[kind]} on {kind}) is not installed: {OPENVINO_EXTRA}"
        )
    try:
        check_cache_folder(folder)
    except ResourceError as error:
        return "torch", f"auto: torch; {error}"
    return "openvino", f"auto: OpenVINO, {MEASURED_SPEEDUP[kind]} on this CPU kind ({kind})"
