"""The worker's package set: the library, torch and their dependencies, apart from Slicer's Python.

Slicer's own Python keeps exactly what Slicer ships (its pydicom 2.4.4 for the DICOM module,
its numpy): nothing here installs into it, and Slicer's process never imports from the set.
The worker (``instructx2x serve``) runs on Slicer's Python with a folder of its own first on
``sys.path`` in place of Slicer's site-packages (the worker sees the standard library and the
set, never Slicer's numpy or scipy); that folder, the package set, is built with
``<python> -m pip install --target`` beside Slicer's revision-specific settings, one per Slicer
revision and Python minor version, and records in a marker file what it was built from (library
version and source digest, requirements digest, Python, torch build, whether OpenVINO is in it).
A set whose torch build is not the one ``choose_torch`` picks now (a driver update) is rebuilt.

OpenVINO (``--backend openvino``, about 180 MB) is in the set where the worker's ``auto``
backend takes it: the CPU build of torch (no NVIDIA GPU) on a CPU kind where OpenVINO measured
faster (``instructx2x.backends.auto_takes_openvino``: AMX). Elsewhere ``auto`` keeps PyTorch, so
the set leaves it out until the panel's backend is OpenVINO; then it is added to the set in
place (``choose_openvino``).

``ensure_package_set`` is the one install routine: the panel and the tests call it with their
own confirmation, progress and log callbacks. It builds in a staging folder beside the set and
renames it into place only once the new set imports, so an interrupted or failed install
leaves the set as it was (or absent). One install runs at a time in a process; a staging folder
carries its process's id and is removed as stale only once that process has ended. A set built from the same requirements but an older
library is updated by reinstalling the library alone into a hard-linked copy.

Slicer's process imports the library's torch-free modules (instructions, parameters, errors,
priors) straight from the library's source shipped with the module (``use_library_source``):
the panel parses and completes instructions before anything is installed.

Qt-free and Slicer-free, so it is tested outside Slicer; it imports only the standard library.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import json
import logging
import os
import platform
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from .worker import WorkerError

__all__ = [
    "SUPPORTED_SLICER",
    "PackageSetError",
    "TorchBuild",
    "OpenVINOChoice",
    "unsupported_slicer",
    "library_source",
    "use_library_source",
    "find_slicer_python",
    "package_set_folder",
    "worker_command",
    "nvidia_driver_version",
    "choose_torch",
    "choose_openvino",
    "package_set_fingerprint",
    "package_set_status",
    "ensure_package_set",
    "push_series",
]

logger = logging.getLogger(__name__)

# The first Slicer release whose Python (3.12) runs the worker: the library needs Python 3.10 or
# later, and highdicom needs pydicom 3, which needs it too. Slicer 5.6 and 5.8 ship Python 3.9.
SUPPORTED_SLICER = (5, 10)
# an install's staging folder beside the set: ".b<pid>-<random>", short because torch's deepest
# paths come close to Windows' 260 characters under Slicer's settings folder
STAGING_PREFIX = ".b"
MARKER = "instructx2x-package-set.json"
MARKER_FORMAT = 1
TORCH_INDEX = "https://download.pytorch.org/whl/{backend}"
# CUDA builds of the pinned torch on PyTorch's index, newest first, each with the oldest NVIDIA
# driver it runs on (Linux, Windows) under CUDA's minor-version compatibility (a 12.x build runs
# on any driver of 12.0's branch or later): the table the PyTorch extension's installer
# (light-the-torch) chooses by, so the newest build the driver runs is taken.
CUDA_BUILDS = (
    ("cu130", (580, 65, 6), (580, 88)),
    ("cu128", (525, 60, 13), (528, 33)),
)
NO_WINDOW = getattr(subprocess, "CREATE_NO_WINDOW", 0)  # Windows: no console window for pip
HEARTBEAT_S = 1.0  # how often a silent pip (a large download) still reports the time it has taken
CANCEL_POLL_S = 0.1  # how often a running pip asks whether the user cancelled
# The set first on sys.path in place of the working folder, and no site-packages folder (Slicer's
# numpy, scipy...) after it: the worker imports the standard library, Slicer's own paths and the set.
_ISOLATE = (
    "import sys; sys.path[:] = [sys.argv.pop(1)] + [p for p in sys.path[1:] if p.replace('\\\\', '/')"
    ".rstrip('/').rpartition('/')[2].lower() not in ('site-packages', 'dist-packages')]; "
)
# The worker's entry point: the library's CLI with the remaining arguments.
_BOOTSTRAP = (
    _ISOLATE + "import runpy; runpy.run_module('instructx2x.cli', run_name='__main__', alter_sys=True)"
)
# What a finished set must import before it replaces the one in place (``{extra}``: OpenVINO's
# import where the set holds it).
_CHECK = _ISOLATE + (
    "import torch, diffusers, transformers, pydicom, highdicom, instructx2x.cli{extra}; print(torch.__version__)"
)
# OpenVINO's packages in the set: the runtime and what it needs beside numpy (pinned in
# Resources/constraints.txt); about 180 MB installed.
OPENVINO_PACKAGES = ("openvino", "openvino-telemetry")
OPENVINO_SIZE = "about 180 MB"
_installing: list[Path] = []  # the folder an install in this process is building (one at a time)


class PackageSetError(WorkerError):
    """The worker's package set cannot be used, installed or updated; the message says what to do."""


@dataclasses.dataclass(frozen=True)
class TorchBuild:
    """Which torch build the set gets.

    Parameters
    ----------
    backend : str
        ``cpu``, a CUDA build such as ``cu130``, or ``index`` for the package index's own build.
    index_url : str | None
        PyTorch's index for the backend; None: the package index (PyPI) alone.
    reason : str
        Why this build, for the confirmation and the log.
    """

    backend: str
    index_url: str | None
    reason: str

    def pip_arguments(self, version: str) -> list[str]:
        """pip arguments that install torch ``version`` of this build beside the requirements."""
        if self.index_url is None:
            return []
        return ["--extra-index-url", self.index_url, f"torch=={version}+{self.backend}"]


@dataclasses.dataclass(frozen=True)
class OpenVINOChoice:
    """Whether the set gets OpenVINO, and why (for the confirmation and the marker)."""

    include: bool  # a set built now holds it
    reason: str
    chosen: bool = False  # the panel's backend is OpenVINO: a set without it gets it added


def unsupported_slicer(major: int, minor: int) -> str | None:
    """Why this Slicer cannot run the worker, or None when it can.

    Parameters
    ----------
    major, minor : int
        Slicer's version (``slicer.app.majorVersion``, ``slicer.app.minorVersion``).

    Returns
    -------
    str | None
        A message for the panel, or None for a supported Slicer.
    """
    if (major, minor) >= SUPPORTED_SLICER:
        return None
    return (
        f"InstructX2X needs 3D Slicer {SUPPORTED_SLICER[0]}.{SUPPORTED_SLICER[1]} or later (its worker "
        f"needs Python 3.10 or later); this is Slicer {major}.{minor}. Instructions can be typed and "
        "checked, but Preview and Apply need a newer Slicer."
    )


def library_source(module_dir: Path) -> Path:
    """The library's source tree (``pyproject.toml`` and ``src/instructx2x``) beside the module.

    Parameters
    ----------
    module_dir : Path
        The folder of ``InstructX2X.py``: in an extension, the build or install tree's
        ``qt-scripted-modules`` (the library lies in ``Resources/InstructX2XLib``); in a
        checkout, ``InstructX2X/`` (the library is ``../InstructX2XLib``).

    Returns
    -------
    Path

    Raises
    ------
    PackageSetError
        When neither place holds the library.
    """
    for candidate in (module_dir / "Resources" / "InstructX2XLib", module_dir.parent / "InstructX2XLib"):
        if (candidate / "pyproject.toml").is_file() and (candidate / "src" / "instructx2x").is_dir():
            return candidate
    raise PackageSetError(
        f"the InstructX2X library is not beside the module in {module_dir}: reinstall "
        "the InstructX2X extension."
    )


def use_library_source(module_dir: Path) -> Path:
    """Put the shipped library's ``src`` first on ``sys.path`` (once), so that Slicer's process
    imports its torch-free modules from the extension, never from the worker's package set.

    Parameters
    ----------
    module_dir : Path
        The folder of ``InstructX2X.py`` (see ``library_source``).

    Returns
    -------
    Path
        The folder put on ``sys.path``.
    """
    source = str(library_source(module_dir) / "src")
    if source not in sys.path:
        sys.path.insert(0, source)
    return Path(source)


def find_slicer_python(which: Callable[[str], str | None] = shutil.which) -> str:
    """Slicer's Python launcher (``PythonSlicer``, on Slicer's PATH), the only Python the worker
    runs on.

    Parameters
    ----------
    which : Callable[[str], str | None]
        Looks a program up on PATH.

    Returns
    -------
    str

    Raises
    ------
    PackageSetError
        When Slicer's PATH has no PythonSlicer (another Python would lack Slicer's libraries).
    """
    python = which("PythonSlicer")
    if python is None:
        raise PackageSetError(
            "PythonSlicer is not on Slicer's PATH, so the worker cannot start: run "
            "InstructX2X inside 3D Slicer (the Slicer launcher sets PATH)."
        )
    return python


def package_set_folder(settings_file: Path, version: Sequence[int | str] = sys.version_info) -> Path:
    """Where the package set for this Slicer and Python lives.

    Parameters
    ----------
    settings_file : Path
        Slicer's revision-specific settings file (``slicer.app.slicerRevisionUserSettingsFilePath``:
        ``Slicer-<revision>.ini`` in the installation's own settings folder, or in the user's
        shared one when Slicer is built to keep settings there): the set lies beside it, named
        after it, so that each Slicer revision has its own. With settings disabled (``--testing``,
        ``--disable-settings``) Slicer names that file ``Slicer-tmp-<revision>-tmp.ini``; its
        ``-tmp`` marks are dropped, so that a self-test uses the revision's one set.
    version : Sequence[int | str]
        The Python that runs the worker (major, minor, ...): one set per minor version.

    Returns
    -------
    Path
    """
    settings_file = Path(settings_file)
    name = settings_file.stem.replace("-tmp", "")
    return settings_file.parent / "InstructX2X" / f"worker-packages-{name}-py{version[0]}.{version[1]}"


def worker_command(python: str | Path, folder: Path) -> list[str]:
    """The command that runs the library's CLI on ``python`` with the package set first on
    ``sys.path`` (the worker client appends ``serve --stdio ...``).

    Parameters
    ----------
    python : str | Path
        Slicer's Python (``find_slicer_python``).
    folder : Path
        The package set (``package_set_folder``).

    Returns
    -------
    list[str]
    """
    return [str(python), "-s", "-c", _BOOTSTRAP, str(folder)]


def push_series(command: Sequence[str], folder: Path, target: str, timeout: float = 600) -> str:
    """Send a written series to a PACS with C-STORE from the worker's package set (pynetdicom
    lives there, not in Slicer's Python): the library's ``push`` command run with ``command``.

    Parameters
    ----------
    command : Sequence[str]
        The command that runs the library's CLI (``worker_command``).
    folder : Path
        The folder of the series' ``.dcm`` files.
    target : str
        ``HOST:PORT:AET``.
    timeout : float
        Seconds before the push is given up.

    Returns
    -------
    str
        What the command reports (how many files went where).

    Raises
    ------
    WorkerError
        With the command's own message (a bad target, a refused association) and exit status.
    """
    try:
        result = subprocess.run(
            [*command, "push", str(folder), "--cstore", target],
            capture_output=True,
            text=True,
            encoding="utf-8",
            errors="replace",
            stdin=subprocess.DEVNULL,
            timeout=timeout,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            creationflags=NO_WINDOW,
        )
    except OSError as error:
        raise WorkerError(f"cannot run the worker's Python to send the series ({error.strerror}).") from None
    except subprocess.TimeoutExpired:
        raise WorkerError(
            f"sending the series to {target} took over {timeout:.0f} s; nothing is known stored."
        ) from None
    if result.returncode != 0:
        errors = [line[len("error: ") :] for line in result.stderr.splitlines() if line.startswith("error: ")]
        message = errors[-1] if errors else (result.stderr.strip().splitlines() or ["(no message)"])[-1]
        raise WorkerError(f"the series was not sent: {message} (exit status {result.returncode})")
    return result.stdout.strip()


def nvidia_driver_version(
    run: Callable[..., subprocess.CompletedProcess] = subprocess.run,
) -> tuple[int, ...] | None:
    """The NVIDIA driver's version as ``nvidia-smi`` reports it, or None without a usable GPU.

    Parameters
    ----------
    run : Callable[..., subprocess.CompletedProcess]
        Runs a command (``subprocess.run``'s signature).

    Returns
    -------
    tuple[int, ...] | None
    """
    try:
        result = run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
            creationflags=NO_WINDOW,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    lines = result.stdout.split() if result.returncode == 0 else []
    try:
        return tuple(int(part) for part in lines[0].split(".")) if lines else None
    except ValueError:
        return None


def choose_torch(
    system: str | None = None,
    driver: Callable[[], tuple[int, ...] | None] = nvidia_driver_version,
    machine: str | None = None,
) -> TorchBuild:
    """The torch build the PyTorch extension would choose: a CUDA build when ``nvidia-smi``
    finds a driver new enough for one, else the CPU build (macOS: the package index's own).

    Parameters
    ----------
    system : str | None
        ``platform.system()``'s answer; None: this machine's.
    driver : Callable[[], tuple[int, ...] | None]
        The NVIDIA driver's version (``nvidia_driver_version``).
    machine : str | None
        ``platform.machine()``'s answer; None: this machine's.

    Returns
    -------
    TorchBuild

    Raises
    ------
    PackageSetError
        On an Intel Mac (or an x86_64 Slicer under Rosetta): torch publishes no macOS x86_64 build
        of the version the worker needs.
    """
    system = system or platform.system()
    machine = machine or platform.machine()
    if system == "Darwin" and machine not in ("arm64", "aarch64"):
        raise PackageSetError(
            f"torch publishes no build for macOS on {machine} (Intel Macs, or Slicer under Rosetta); "
            "run the worker on another machine (Server mode in the panel's Advanced settings) or use "
            "the arm64 Slicer on an Apple silicon Mac."
        )
    if system == "Darwin":
        return TorchBuild("index", None, "macOS: the package index's build (CPU and Apple GPU)")
    version = driver()
    if version is None:
        return TorchBuild("cpu", TORCH_INDEX.format(backend="cpu"), "no NVIDIA GPU found")
    found = ".".join(map(str, version))
    for backend, linux, windows in CUDA_BUILDS:
        if version >= (windows if system == "Windows" else linux):
            return TorchBuild(backend, TORCH_INDEX.format(backend=backend), f"NVIDIA driver {found}")
    return TorchBuild(
        "cpu",
        TORCH_INDEX.format(backend="cpu"),
        f"NVIDIA driver {found} is older than any CUDA build of torch runs on (525.60 on Linux, "
        "528.33 on Windows); update the driver to use the GPU",
    )


def choose_openvino(
    build: TorchBuild, backend: str = "auto", cpu_kind: Callable[[], str] | None = None
) -> OpenVINOChoice:
    """Whether the set holds OpenVINO: where the panel's backend is OpenVINO (a set without it
    gets it added), and where ``auto`` takes it (torch's CPU build, no NVIDIA GPU, on a CPU kind
    where OpenVINO measured faster: a set built there holds it; one without it stays, as
    ``auto`` then runs PyTorch and says why).

    Parameters
    ----------
    build : TorchBuild
        The set's torch build (``choose_torch``).
    backend : str
        The panel's backend: ``auto``, ``torch`` or ``openvino``.
    cpu_kind : Callable[[], str] | None
        This CPU's kind (``amx``, ``avx512_bf16``, ``avx2``, ``other``); None:
        ``instructx2x.backends.cpu_kind`` (the library's source is on ``sys.path`` by then).

    Returns
    -------
    OpenVINOChoice
    """
    from instructx2x.backends import MEASURED_SPEEDUP, auto_takes_openvino

    if backend == "openvino":
        return OpenVINOChoice(True, "the panel's backend is OpenVINO", chosen=True)
    if build.backend.startswith("cu"):
        return OpenVINOChoice(False, f"PyTorch runs the model on the NVIDIA GPU ({_describe(build)})")
    if cpu_kind is None:
        from instructx2x.backends import cpu_kind as library_cpu_kind

        cpu_kind = library_cpu_kind
    kind = cpu_kind()
    if auto_takes_openvino(kind):
        return OpenVINOChoice(
            True,
            f"on this CPU ({kind}) the auto backend takes OpenVINO for a full-size model: it "
            f"{MEASURED_SPEEDUP[kind]}",
        )
    return OpenVINOChoice(
        False,
        f"on this CPU ({kind}) the auto backend keeps PyTorch, as OpenVINO has not measured faster "
        "there; choosing Backend: OpenVINO adds it",
    )


def _library_version(library: Path) -> str:
    """The library's version as ``src/instructx2x/_version.py`` writes it (its one place; the
    library's pyproject.toml reads it from there), read without importing the library."""
    for line in (library / "src" / "instructx2x" / "_version.py").read_text(encoding="utf-8").splitlines():
        if line.startswith("__version__ = "):
            return line.split("=", 1)[1].strip().strip("\"'")
    raise PackageSetError(f"the library in {library} states no version; reinstall the InstructX2X extension.")


def package_set_fingerprint(library: Path, requirements: Path, constraints: Sequence[Path] = ()) -> dict:
    """What a set is built from: its marker's fields, torch's build aside.

    Parameters
    ----------
    library : Path
        The library's source tree (``library_source``).
    requirements : Path
        The worker's pinned requirements.
    constraints : Sequence[Path]
        Further pip constraint files.

    Returns
    -------
    dict
        ``format``; ``python`` (this Python's major.minor); ``requirements_sha256`` (the
        requirements, the constraints and the library's declared dependencies);
        ``library_version``; ``library_sha256`` (every file of the ``instructx2x`` package).
    """
    if sys.version_info >= (3, 11):  # a supported Slicer's Python (5.10: 3.12)
        import tomllib
    else:  # Python 3.10, where the panels' layers install with tomli
        import tomli as tomllib

    project = tomllib.loads((library / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    wanted = hashlib.sha256(json.dumps(project.get("dependencies", [])).encode())
    for path in (requirements, *constraints):
        wanted.update(Path(path).read_bytes())
    source = hashlib.sha256()
    package = library / "src" / "instructx2x"
    for path in sorted(p for p in package.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        source.update(path.relative_to(package).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return {
        "format": MARKER_FORMAT,
        "python": f"{sys.version_info[0]}.{sys.version_info[1]}",
        "requirements_sha256": wanted.hexdigest(),
        "library_version": _library_version(library),
        "library_sha256": source.hexdigest(),
    }


def package_set_status(
    folder: Path,
    library: Path,
    requirements: Path,
    constraints: Sequence[Path] = (),
    torch: Callable[[], TorchBuild] | None = None,
    openvino: Callable[[TorchBuild], OpenVINOChoice] | None = None,
) -> str:
    """How the set in ``folder`` compares with what the module ships.

    Parameters
    ----------
    folder : Path
        The package set.
    library : Path
        The library's source tree (``library_source``).
    requirements : Path
        The worker's pinned requirements (the module's ``Resources/requirements.txt``).
    constraints : Sequence[Path]
        Further pip constraint files the set is built with.
    torch : Callable[[], TorchBuild] | None
        Chooses the torch build now (``choose_torch``); a set built with another is rebuilt.
        None: the torch build is not compared.
    openvino : Callable[[TorchBuild], OpenVINOChoice] | None
        Whether the set should hold OpenVINO (``choose_openvino``), compared with ``torch``'s
        build; None: not compared.

    Returns
    -------
    str
        ``current``; ``library`` (built from these requirements but another library: the
        library alone is reinstalled, and OpenVINO added where it is chosen and missing);
        ``openvino`` (current, but OpenVINO is chosen and not in it: it is added);
        ``rebuild`` (other requirements, another Python, another torch build or a damaged
        marker); ``missing``.
    """
    try:
        built = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return "missing"
    except (OSError, ValueError):
        return "rebuild"
    wanted = package_set_fingerprint(library, requirements, constraints)
    if not isinstance(built, dict) or any(
        built.get(key) != wanted[key] for key in ("format", "python", "requirements_sha256")
    ):
        return "rebuild"
    built_torch = built.get("torch")
    build = torch() if torch is not None else None
    if build is not None and (
        not isinstance(built_torch, dict) or built_torch.get("backend") != build.backend
    ):
        return "rebuild"
    if not all(built.get(key) == wanted[key] for key in ("library_version", "library_sha256")):
        return "library"
    if build is not None and openvino is not None and openvino(build).chosen and not _holds_openvino(built):
        return "openvino"
    return "current"


def _holds_openvino(built: dict) -> bool:
    """Whether a set's marker says it holds OpenVINO."""
    record = built.get("openvino")
    return isinstance(record, dict) and record.get("included") is True


def ensure_package_set(
    folder: Path,
    python: str | Path,
    library: Path,
    requirements: Path,
    *,
    confirm: Callable[[str], bool],
    progress: Callable[[str], None],
    log: Callable[[str], None],
    constraints: Sequence[Path] = (),
    torch: Callable[[], TorchBuild] = choose_torch,
    pip_options: Sequence[str] = (),
    cancelled: Callable[[], bool] = lambda: False,
    openvino: Callable[[TorchBuild], OpenVINOChoice] = choose_openvino,
) -> Path:
    """Make ``folder`` hold the worker's packages for the shipped library and requirements.

    Nothing happens when the set is current. Otherwise, after ``confirm``, the set is built
    (or, for a newer library alone, updated) in a staging folder beside it, checked by
    importing torch, diffusers and the library with ``python``, and renamed into place; on any
    failure the staging folder is removed and the set in place is left as it was.

    Parameters
    ----------
    folder : Path
        The package set (``package_set_folder``).
    python : str | Path
        The Python the worker runs on (Slicer's: ``find_slicer_python``); its pip installs.
    library : Path
        The library's source tree (``library_source``).
    requirements : Path
        The worker's pinned requirements; its ``torch==`` line gives torch's version.
    confirm : Callable[[str], bool]
        Asked, with what is about to happen, before anything is downloaded.
    progress : Callable[[str], None]
        Told each stage in a few words (a progress dialog's label).
    log : Callable[[str], None]
        Given every line pip prints.
    constraints : Sequence[Path]
        Further pip constraint files.
    torch : Callable[[], TorchBuild]
        Chooses the torch build (``choose_torch``); called only when the set is (re)built.
    pip_options : Sequence[str]
        Further pip options (an index, ``--no-index`` and ``--find-links`` for a local mirror).
    cancelled : Callable[[], bool]
        Asked every ``CANCEL_POLL_S`` while pip or the check of the new set runs, before each
        file of a set in place is copied and between stages, up to the last one (putting the
        set in place, which is never cut); True stops pip, the check or the copy, removes the
        staging folder and raises ``PackageSetError``.
    openvino : Callable[[TorchBuild], OpenVINOChoice]
        Whether the set holds OpenVINO (``choose_openvino`` with the panel's backend): a set
        built now holds it where this says so; a set in place gets it added where the panel's
        backend is OpenVINO.

    Returns
    -------
    Path
        ``folder``, ready.

    Raises
    ------
    PackageSetError
        When the user declines or cancels, pip fails (offline, no matching build) or the new set
        does not import; the message says what to do, and nothing was changed.
    """
    folder = Path(folder)
    if _installing:
        raise PackageSetError(
            "InstructX2X's worker packages are being installed already; wait for that install to finish."
        )
    _installing.append(folder)
    try:
        return _ensure(
            folder,
            python,
            library,
            requirements,
            confirm,
            progress,
            log,
            constraints,
            torch,
            pip_options,
            cancelled,
            openvino,
        )
    finally:
        _installing.clear()


def _ensure(
    folder: Path,
    python: str | Path,
    library: Path,
    requirements: Path,
    confirm: Callable[[str], bool],
    progress: Callable[[str], None],
    log: Callable[[str], None],
    constraints: Sequence[Path],
    torch: Callable[[], TorchBuild],
    pip_options: Sequence[str],
    cancelled: Callable[[], bool],
    openvino: Callable[[TorchBuild], OpenVINOChoice],
) -> Path:
    """``ensure_package_set``'s work, one install at a time."""
    build = torch()
    choice = openvino(build)
    status = package_set_status(folder, library, requirements, constraints, lambda: build, lambda _: choice)
    if status == "current":
        return folder
    torch_version = _pinned_torch(requirements)
    stale = _remove_stale_builds(folder)
    update = status in ("library", "openvino")  # the set in place, changed in a copy
    if update:
        built = json.loads((folder / MARKER).read_text(encoding="utf-8"))
        add_openvino = choice.chosen and not _holds_openvino(built)
        openvino_record = (
            {"included": True, "reason": choice.reason} if add_openvino else built.get("openvino")
        )
        version = package_set_fingerprint(library, requirements, constraints)["library_version"]
        changes = []
        if status == "library":
            changes.append(
                f"they come from another version of its library: reinstall the library ({version}), "
                "nothing downloaded"
            )
        if add_openvino:
            changes.append(f"add OpenVINO ({OPENVINO_SIZE} downloaded: {choice.reason})")
        question = (
            f"Update InstructX2X's worker packages in {folder}: {'; and '.join(changes)}? "
            "Slicer's own Python is not changed."
        )
    else:
        add_openvino = choice.include
        openvino_record = {"included": choice.include, "reason": choice.reason}
        size = "about 1 GB" if build.backend == "cpu" else "about 5 GB"
        question = (
            f"InstructX2X runs its model in a separate process with packages of its own: PyTorch "
            f"{torch_version} ({_describe(build)}), diffusers, transformers, highdicom"
            f"{', OpenVINO' if choice.include else ''} and the InstructX2X library, {size} downloaded "
            f"into {folder}. OpenVINO is {'included' if choice.include else 'left out'}: {choice.reason}. "
            "Slicer's own Python is not changed. Install now?"
        )
    if stale:
        question += " (An earlier install did not finish; it was removed.)"
    if not confirm(question):
        if status == "openvino":
            raise PackageSetError(
                "Backend: OpenVINO needs the OpenVINO runtime, which InstructX2X's worker packages do not "
                f"hold yet; nothing was installed. Press Preview or Apply again to add it ({OPENVINO_SIZE}), "
                "or choose Backend: PyTorch or auto."
            )
        raise PackageSetError(
            "InstructX2X cannot run its model without its worker packages; nothing was "
            "installed. Press Preview or Apply again to install them."
        )
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging_root = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.getpid()}-", dir=folder.parent))
    try:
        staging = staging_root / "packages"
        source = _copy_library(library, staging_root / "library")  # pip builds in it; the marker describes it
        wanted = package_set_fingerprint(source, requirements, constraints)
        common = [
            str(python),
            "-m",
            "pip",
            "install",
            "--target",
            str(staging),
            "--no-input",
            "--disable-pip-version-check",
            "--progress-bar",
            "off",
            *pip_options,
            *(option for path in constraints for option in ("-c", str(path))),
        ]
        if update:
            progress("Copying the worker's packages…")
            built_torch = built.get("torch", {})
            shutil.copytree(
                folder, staging, copy_function=functools.partial(_link_or_copy, cancelled=cancelled)
            )
            if status == "library":
                _remove_library(staging)
                progress("Installing the InstructX2X library…")
                # built with Slicer's own setuptools (no build environment to download): an update
                # of the library alone works offline
                _pip(
                    common + ["--no-deps", "--no-build-isolation", str(source)],
                    log,
                    progress,
                    "Installing the InstructX2X library…",
                    cancelled,
                )
            if add_openvino:
                stage = "Downloading and installing OpenVINO…"
                progress(stage)
                # its one dependency beside these, numpy, is in the set already
                _pip(common + ["--no-deps", *OPENVINO_PACKAGES], log, progress, stage, cancelled)
        else:
            log(f"torch {torch_version}: {_describe(build)}")
            log(f"OpenVINO {'included' if add_openvino else 'left out'}: {choice.reason}")
            stage = "Downloading and installing PyTorch, diffusers and the InstructX2X library…"
            progress(stage)
            _pip(
                common
                + [
                    "-r",
                    str(requirements),
                    *build.pip_arguments(torch_version),
                    *(OPENVINO_PACKAGES if add_openvino else ()),
                    str(source),
                ],
                log,
                progress,
                stage,
                cancelled,
            )
            built_torch = {"backend": build.backend, "index_url": build.index_url}
        progress("Checking the new worker packages…")
        holds_openvino = isinstance(openvino_record, dict) and openvino_record.get("included") is True
        built_torch["version"] = _check(python, staging, log, cancelled, holds_openvino)
        (staging / MARKER).write_text(
            json.dumps({**wanted, "torch": built_torch, "openvino": openvino_record}, indent=2),
            encoding="utf-8",
        )
        _stop_if(cancelled)
        progress("Putting the worker packages in place…")
        _replace(staging, folder, staging_root / "previous")
    finally:
        shutil.rmtree(staging_root, ignore_errors=True)
    log(f"InstructX2X worker packages ready in {folder}")
    return folder


def _describe(build: TorchBuild) -> str:
    kind = {"cpu": "CPU build", "index": "the package index's build"}.get(
        build.backend, f"CUDA build {build.backend}"
    )
    return f"{kind}: {build.reason}"


def _copy_library(library: Path, target: Path) -> Path:
    """What pip needs of the library, as the extension ships it: pyproject.toml, README.md and
    the package (caches left out)."""
    shutil.copytree(
        library / "src" / "instructx2x",
        target / "src" / "instructx2x",
        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
    )
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(library / name, target / name)
    return target


def _pinned_torch(requirements: Path) -> str:
    for line in Path(requirements).read_text(encoding="utf-8").splitlines():
        name, _, version = line.split("#")[0].strip().partition("==")
        if name.strip().lower() == "torch" and version.strip():
            return version.strip()
    raise PackageSetError(
        f"{Path(requirements).name} pins no torch version (a 'torch==X.Y.Z' line): "
        "reinstall the InstructX2X extension."
    )


def _remove_stale_builds(folder: Path) -> bool:
    """Remove the staging folders beside ``folder`` whose install's process has ended (an
    interrupted install); True if any. A folder of a running process, or one whose name carries
    no process id, is left."""
    prefix = STAGING_PREFIX
    stale = []
    for path in folder.parent.glob(prefix + "*") if folder.parent.is_dir() else ():
        pid = path.name[len(prefix) :].split("-", 1)[0]
        if pid.isdigit() and not _process_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
            stale.append(path)
    return bool(stale)


def _process_alive(pid: int) -> bool:
    """Whether a process ``pid`` runs on this machine."""
    if pid == os.getpid():
        return True
    if sys.platform == "win32":
        import ctypes

        kernel = ctypes.windll.kernel32
        handle = kernel.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
        if not handle:
            return False
        code = ctypes.c_ulong()
        try:
            return (
                bool(kernel.GetExitCodeProcess(handle, ctypes.byref(code))) and code.value == 259
            )  # STILL_ACTIVE
        finally:
            kernel.CloseHandle(handle)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _link_or_copy(source: str, target: str, cancelled: Callable[[], bool]) -> None:
    """``copytree``'s copy function for a set in place: ``cancelled`` is asked first (True stops
    the copy), then ``target`` is made a hard link of ``source`` (a copy where links fail)."""
    _stop_if(cancelled)
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _remove_library(staging: Path) -> None:
    """The installed library's own files in a copied set: its package, metadata and script."""
    for path in [staging / "instructx2x", *staging.glob("instructx2x-*.dist-info")]:
        shutil.rmtree(path, ignore_errors=True)
    for script in (staging / "bin").glob("instructx2x*") if (staging / "bin").is_dir() else ():
        script.unlink()


def _stop_if(cancelled: Callable[[], bool]) -> None:
    if cancelled():
        raise PackageSetError(
            "the install of InstructX2X's worker packages was cancelled; nothing was installed. "
            "Press Preview or Apply to install them."
        )


def _pip(
    command: list[str],
    log: Callable[[str], None],
    progress: Callable[[str], None],
    stage: str = "",
    cancelled: Callable[[], bool] = lambda: False,
) -> None:
    """Run pip, every line to ``log``; while pip prints nothing (a large download), ``progress``
    gets ``stage`` with the time taken every ``HEARTBEAT_S``; ``cancelled`` is asked every
    ``CANCEL_POLL_S`` (True kills pip). A failure says what to do, with pip's last lines."""
    tail: collections.deque = collections.deque(maxlen=15)
    try:
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            encoding="utf-8",
            errors="replace",
            creationflags=NO_WINDOW,
        )
    except OSError as error:
        raise PackageSetError(
            f"cannot run {Path(command[0]).name} to install the worker's packages "
            f"({error.strerror}); nothing was changed."
        ) from None
    lines: queue.Queue = queue.Queue()
    output = process.stdout
    assert output is not None  # stdout=PIPE

    def forward() -> None:
        for line in _lines(output):
            lines.put(line)
        lines.put(None)

    threading.Thread(target=forward, daemon=True).start()
    started, shown = time.monotonic(), stage
    heard = started
    try:
        while True:
            _stop_if(cancelled)
            try:
                line = lines.get(timeout=CANCEL_POLL_S)
            except queue.Empty:
                if time.monotonic() - heard >= HEARTBEAT_S:  # pip is silent: say that it still works
                    heard = time.monotonic()
                    elapsed = int(heard - started)
                    progress(f"{shown} ({elapsed // 60}:{elapsed % 60:02d} elapsed)")
                continue
            if line is None:
                break
            heard = time.monotonic()
            log(line)
            tail.append(line)
            if line.startswith(("Collecting ", "Installing collected packages")):
                shown = line if len(line) < 100 else line[:97] + "…"
                progress(shown)
        returncode = process.wait()
    finally:
        if process.poll() is None:  # cancelled, or a callback raised: stop pip, remove its staging
            process.kill()
            process.wait()
    if returncode != 0:
        raise PackageSetError(
            f"installing InstructX2X's worker packages failed (pip exit status {returncode}); nothing was "
            f"changed. {_pip_advice(tail)} pip's last lines:\n" + "\n".join(tail)
        )


def _pip_advice(lines: Iterable[str]) -> str:
    """What to do about a failed pip, from what it printed last."""
    text = "\n".join(lines)
    if "No space left on device" in text or "[Errno 28]" in text:
        return (
            "The disk is full: free a few GB on the disk of Slicer's settings folder (the set needs "
            "1 to 5 GB, twice that while it installs) and press Preview or Apply again."
        )
    if "[WinError 206]" in text or "[Errno 36]" in text or "File name too long" in text:
        return (
            "A path is too long for the system: on Windows, enable long paths (the LongPathsEnabled "
            "setting) or install Slicer in a shorter folder, then press Preview or Apply again."
        )
    return (
        "Check the internet connection (the Python package index, and PyTorch's index for a CPU or "
        "CUDA build) and press Preview or Apply again."
    )


def _lines(stream: Iterable[str]) -> Iterable[str]:
    for line in stream:
        line = line.rstrip()
        if line:
            yield line


def _check(
    python: str | Path,
    staging: Path,
    log: Callable[[str], None],
    cancelled: Callable[[], bool],
    openvino: bool = False,
) -> str:
    """Import what the worker needs from the new set (OpenVINO too where it holds it); returns
    torch's version. ``cancelled`` is asked every ``CANCEL_POLL_S`` (True kills the check)."""
    with subprocess.Popen(
        [str(python), "-s", "-c", _CHECK.format(extra=", openvino" if openvino else ""), str(staging)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        encoding="utf-8",
        errors="replace",
        stdin=subprocess.DEVNULL,
        creationflags=NO_WINDOW,
    ) as process:
        try:
            while True:
                _stop_if(cancelled)
                try:
                    stdout, stderr = process.communicate(timeout=CANCEL_POLL_S)
                    break
                except subprocess.TimeoutExpired:
                    continue
        finally:
            if process.poll() is None:  # cancelled, or a callback raised: the check stops
                process.kill()
    for line in (stdout + stderr).splitlines():
        log(line)
    if process.returncode != 0:
        last = (stderr.strip().splitlines() or ["(no message)"])[-1]
        raise PackageSetError(
            f"the new worker packages do not import ({last}); nothing was changed. Press "
            "Preview or Apply to try again; if this repeats, report it with Slicer's log."
        )
    return stdout.strip().splitlines()[-1]


def _replace(staging: Path, folder: Path, previous: Path) -> None:
    """Rename ``staging`` to ``folder``; a set in place moves to ``previous`` first (removed with
    the staging root) and comes back if the second rename fails."""
    if folder.exists():
        try:
            folder.rename(previous)
        except OSError as error:
            raise PackageSetError(
                f"the worker packages in {folder} are in use ({error.strerror}); nothing was "
                "changed. Restart Slicer and press Preview or Apply again."
            ) from None
    try:
        staging.rename(folder)
    except OSError as error:
        if previous.exists():
            previous.rename(folder)
        raise PackageSetError(
            f"the new worker packages could not be put in {folder} ({error.strerror}); nothing was changed."
        ) from None
