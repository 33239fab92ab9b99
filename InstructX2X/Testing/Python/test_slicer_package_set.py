"""The desktop module's worker package set (InstructX2XModuleLib/packages.py).

The fast tests run the install routine's refusals and failures, the torch choice and the
worker's start against real processes in this environment. ``test_the_package_set_on_slicers_python``
builds a stand-in for Slicer 5.10's Python (pyenv's 3.12.1 with the packages Slicer's SuperBuild
pins, constraints-slicer-5.10.0.txt beside it), builds the worker's package set from the package
index with the module's own install routine inside it (slicer_process.py), and runs a
preview and an edit on the demo model from that set (several minutes; needs the network).
"""

from __future__ import annotations

import ast
import functools
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from workers import poll_until

from instructx2x import __version__
from InstructX2XModuleLib import packages
from InstructX2XModuleLib.worker import WorkerClient, WorkerState

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[3]
HERE = Path(__file__).resolve().parent
MODULE = REPO / "InstructX2X"
REQUIREMENTS = MODULE / "Resources" / "requirements.txt"
SLICER_CONSTRAINTS = HERE / "constraints-slicer-5.10.0.txt"
# Slicer 5.10 ships Python 3.12.10; pyenv's 3.12.1 stands in for it
SLICER_PYTHON = Path(os.environ.get("INSTRUCTX2X_SLICER_PYTHON", "/root/.pyenv/versions/3.12.1/bin/python"))
REQUIRE_TOOLS = os.environ.get("INSTRUCTX2X_REQUIRE_SYSTEM_TOOLS") == "1"
# PyPI has only CUDA builds of torch for Linux x86-64 and Python 3.12: downloaded and installed
# beside the set's "-tmp" folder, they take about 8 GB at once (seen here).
SET_DISK_NEED = 12 * 2**30
# what Slicer 5.10's Python holds that the module's Qt-free layers (and pip) use
SLICER_PACKAGES = [
    "setuptools",
    "wheel",
    "numpy",
    "scipy",
    "pydicom",
    "pillow",
    "six",
    "retrying",
    "dicomweb-client",
    "requests",
    "packaging",
    "pyparsing",
    "slicer-core",
    "vtk",
]


def pins(path: Path) -> dict[str, str]:
    found = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            requirement = Requirement(line)
            found[requirement.name.lower()] = str(requirement.specifier).removeprefix("==")
    return found


def install(folder, python, library, requirements, **options):
    """``packages.ensure_package_set`` as the panel calls it, answering yes, recording nothing and
    taking torch from the package index; ``options`` replace any of these."""
    defaults = {
        "confirm": lambda question: True,
        "progress": lambda stage: None,
        "log": lambda line: None,
        "torch": lambda: packages.TorchBuild("index", None, "the test"),
    }
    return packages.ensure_package_set(folder, python, library, requirements, **{**defaults, **options})


# -- what the module ships ---------------------------------------------------------------------
def test_requirements_pin_every_library_dependency_inside_its_range():
    project = tomllib.loads((REPO / "InstructX2XLib" / "pyproject.toml").read_text())["project"]
    pinned = pins(REQUIREMENTS)
    for line in project["dependencies"]:
        requirement = Requirement(line)
        assert requirement.name.lower() in pinned, requirement.name
        assert requirement.specifier.contains(pinned[requirement.name.lower()]), (line, pinned)
    assert set(pinned) == {Requirement(line).name.lower() for line in project["dependencies"]}
    assert pinned["torch"] == pins(REPO / "constraints.txt")["torch"]  # the torch the suite runs


def test_the_shipped_constraints_pin_the_whole_set_as_the_requirements_do():
    """Resources/constraints.txt (scripts/lock_worker_packages.py) pins every package the set
    installs beside torch's build: the direct requirements at their versions, and what they
    need (transformers' tokenizers, huggingface-hub, ...), so two installs get the same set."""
    locked = pins(MODULE / "Resources" / "constraints.txt")
    for name, version in pins(REQUIREMENTS).items():
        if name != "torch":  # its build (CPU or CUDA) is chosen on the user's machine
            assert locked.get(name) == version, name
    assert {"tokenizers", "huggingface-hub", "urllib3", "pyjpegls"} <= set(locked)
    assert not {"torch", "setuptools"} & set(locked) and not any(n.startswith("nvidia-") for n in locked)


def test_slicer_constraints_hold_the_tag_s_pins():
    slicer = pins(SLICER_CONSTRAINTS)
    assert slicer["pydicom"] == "2.4.4" and slicer["numpy"] == "2.0.2" and slicer["pip"] == "25.1.1"
    assert "v5.10.0" in SLICER_CONSTRAINTS.read_text()


def test_supported_slicer_versions():
    assert packages.unsupported_slicer(5, 10) is None and packages.unsupported_slicer(6, 0) is None
    message = packages.unsupported_slicer(5, 8)
    assert message is not None
    assert "5.10 or later" in message and "Slicer 5.8" in message
    assert packages.unsupported_slicer(4, 13) is not None


def test_library_source_in_a_checkout_and_in_an_extension(tmp_path):
    assert packages.library_source(MODULE) == REPO / "InstructX2XLib"
    shipped = tmp_path / "qt-scripted-modules" / "Resources" / "InstructX2XLib"
    (shipped / "src" / "instructx2x").mkdir(parents=True)
    (shipped / "pyproject.toml").write_text("[project]\n")
    assert packages.library_source(tmp_path / "qt-scripted-modules") == shipped
    with pytest.raises(packages.PackageSetError, match="reinstall the InstructX2X extension"):
        packages.library_source(tmp_path / "elsewhere" / "module")


def test_the_worker_runs_only_on_slicers_python():
    assert packages.find_slicer_python(lambda name: f"/slicer/bin/{name}") == "/slicer/bin/PythonSlicer"
    with pytest.raises(packages.PackageSetError, match="PythonSlicer is not on Slicer's PATH"):
        packages.find_slicer_python(lambda name: "/usr/bin/python3" if name == "python3" else None)


# -- torch's build ---------------------------------------------------------------------------
def nvidia_smi(returncode: int, stdout: str) -> subprocess.CompletedProcess:
    """What ``nvidia-smi`` returns: its exit code and output."""
    return subprocess.CompletedProcess(["nvidia-smi"], returncode, stdout)


def test_the_nvidia_driver_as_nvidia_smi_reports_it():
    assert packages.nvidia_driver_version(lambda *a, **k: nvidia_smi(0, "580.95.05\n")) == (580, 95, 5)
    assert packages.nvidia_driver_version(lambda *a, **k: nvidia_smi(0, "572.16\n572.16\n")) == (572, 16)
    assert packages.nvidia_driver_version(lambda *a, **k: nvidia_smi(9, "580.95.05\n")) is None  # it failed
    assert packages.nvidia_driver_version(lambda *a, **k: nvidia_smi(0, "No devices were found\n")) is None

    def missing(*args, **kwargs):
        raise FileNotFoundError("nvidia-smi")

    assert packages.nvidia_driver_version(missing) is None


@pytest.mark.parametrize(
    "system, driver, backend",
    [
        ("Linux", None, "cpu"),
        ("Linux", (580, 95, 5), "cu130"),
        ("Linux", (575, 51, 2), "cu128"),
        ("Linux", (535, 104), "cu128"),  # Ubuntu 22.04's: CUDA 12 minor-version compatibility
        ("Linux", (525, 60, 13), "cu128"),
        ("Linux", (525, 60, 12), "cpu"),
        ("Linux", (470, 256), "cpu"),
        ("Windows", (580, 70), "cu128"),
        ("Windows", (528, 33), "cu128"),
        ("Windows", (527, 41), "cpu"),
        ("Windows", None, "cpu"),
        ("Darwin", (580, 95), "index"),
    ],
)
def test_torch_s_build_follows_the_gpu_driver(system, driver, backend):
    build = packages.choose_torch(system, lambda: driver, "arm64" if system == "Darwin" else "x86_64")
    assert build.backend == backend
    if backend == "index":
        assert build.index_url is None and build.pip_arguments("2.13.0") == []
    else:
        assert build.index_url == f"https://download.pytorch.org/whl/{backend}"
        assert build.pip_arguments("2.13.0") == [
            "--extra-index-url",
            build.index_url,
            f"torch==2.13.0+{backend}",
        ]
    assert ("older than" in build.reason) == (driver is not None and backend == "cpu")


@pytest.mark.parametrize("machine", ["x86_64", "i386"])
def test_an_intel_mac_is_told_that_torch_has_no_build_for_it(machine):
    with pytest.raises(packages.PackageSetError, match=f"no build for macOS on {machine}"):
        packages.choose_torch("Darwin", lambda: None, machine)


# -- the set's marker --------------------------------------------------------------------------
@pytest.fixture
def shipped(tmp_path):
    """A copy of the module's library and requirements, to change without touching the repo's."""
    library = tmp_path / "InstructX2XLib"
    (library / "src" / "instructx2x").mkdir(parents=True)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / "InstructX2XLib" / name, library)
    for name in ("__init__.py", "_version.py", "errors.py", "instructions.py"):
        shutil.copy(REPO / "InstructX2XLib" / "src" / "instructx2x" / name, library / "src" / "instructx2x")
    requirements = tmp_path / "requirements.txt"
    shutil.copy(REQUIREMENTS, requirements)
    return library, requirements


def test_the_marker_says_what_a_set_was_built_from(shipped, tmp_path):
    library, requirements = shipped
    folder = tmp_path / "set"
    assert packages.package_set_status(folder, library, requirements) == "missing"
    folder.mkdir()
    marker = folder / packages.MARKER
    built = packages.package_set_fingerprint(library, requirements)
    marker.write_text(json.dumps({**built, "torch": {"backend": "cpu"}}))
    assert packages.package_set_status(folder, library, requirements) == "current"
    (library / "src" / "instructx2x" / "errors.py").write_text("# another library\n")
    assert packages.package_set_status(folder, library, requirements) == "library"
    marker.write_text(json.dumps({**built, "library_version": "0.0.1"}))
    assert packages.package_set_status(folder, library, requirements) == "library"
    marker.write_text(json.dumps({**built, "python": "3.9"}))
    assert packages.package_set_status(folder, library, requirements) == "rebuild"
    marker.write_text(json.dumps(built))
    requirements.write_text(requirements.read_text().replace("highdicom==0.28.2", "highdicom==0.28.1"))
    assert packages.package_set_status(folder, library, requirements) == "rebuild"
    marker.write_text("{not json")
    assert packages.package_set_status(folder, library, requirements) == "rebuild"
    # a driver update makes a CUDA build the choice: the CPU set is rebuilt
    built = packages.package_set_fingerprint(library, requirements)
    marker.write_text(json.dumps({**built, "torch": {"backend": "cpu"}}))
    cpu, cuda = (
        lambda backend=backend: packages.TorchBuild(backend, None, "the test") for backend in ("cpu", "cu130")
    )
    assert packages.package_set_status(folder, library, requirements, torch=cpu) == "current"
    assert packages.package_set_status(folder, library, requirements, torch=cuda) == "rebuild"
    marker.write_text(json.dumps(built))
    assert packages.package_set_status(folder, library, requirements, torch=cpu) == "rebuild"


# -- OpenVINO in the set ---------------------------------------------------------------------
CPU = packages.TorchBuild("cpu", "https://download.pytorch.org/whl/cpu", "no NVIDIA GPU found")
CUDA = packages.TorchBuild("cu130", "https://download.pytorch.org/whl/cu130", "NVIDIA driver 580.95.5")
MAC = packages.TorchBuild("index", None, "macOS")


@pytest.mark.parametrize(
    "build, kind, backend, include, chosen, reason",
    [
        (CPU, "amx", "auto", True, False, "on this CPU (amx) the auto backend takes OpenVINO"),
        (
            CPU,
            "amx",
            "torch",
            True,
            False,
            "measured 1.8x less CPU time",
        ),  # the machine's rule, not the choice
        (
            CPU,
            "avx512_bf16",
            "auto",
            False,
            False,
            "on this CPU (avx512_bf16) the auto backend keeps PyTorch",
        ),
        (CPU, "avx2", "auto", False, False, "choosing Backend: OpenVINO adds it"),
        (MAC, "other", "auto", False, False, "on this CPU (other)"),  # no /proc/cpuinfo: no kind known
        (CUDA, None, "auto", False, False, "PyTorch runs the model on the NVIDIA GPU (CUDA build cu130"),
        (CUDA, None, "openvino", True, True, "the panel's backend is OpenVINO"),
        (CPU, "avx2", "openvino", True, True, "the panel's backend is OpenVINO"),
    ],
)
def test_openvino_is_in_the_set_where_auto_takes_it_or_the_panel_chooses_it(
    build, kind, backend, include, chosen, reason
):
    """The CPU's kind is injected (None: not to be asked), as ``choose_torch``'s driver is."""

    def cpu_kind() -> str:
        if kind is None:
            pytest.fail("the CPU's kind was asked")
        return kind

    choice = packages.choose_openvino(build, backend, cpu_kind)
    assert (choice.include, choice.chosen) == (include, chosen) and reason in choice.reason


def test_the_cpu_kind_is_the_one_auto_reads(monkeypatch):
    """Without an injected kind the set follows the library's own reading of this CPU's flags."""
    from instructx2x import backends

    monkeypatch.setattr(backends, "cpu_vendor_and_flags", lambda: ("Intel", frozenset({"avx2", "amx_bf16"})))
    assert packages.choose_openvino(CPU).include
    monkeypatch.setattr(backends, "cpu_vendor_and_flags", lambda: ("AMD", frozenset({"avx2", "avx512_bf16"})))
    assert not packages.choose_openvino(CPU).include


def test_a_set_without_openvino_gets_it_added_only_when_it_is_chosen(shipped, tmp_path):
    library, requirements = shipped
    folder = tmp_path / "set"
    folder.mkdir()
    built = packages.package_set_fingerprint(library, requirements)
    marker = folder / packages.MARKER
    marker.write_text(json.dumps({**built, "torch": {"backend": "cpu"}}))  # an older marker: no record
    status = functools.partial(packages.package_set_status, folder, library, requirements, torch=lambda: CPU)
    on_amx = lambda build: packages.choose_openvino(build, "auto", lambda: "amx")  # noqa: E731
    chosen = lambda build: packages.choose_openvino(build, "openvino", lambda: "avx2")  # noqa: E731
    assert status(openvino=on_amx) == "current"  # auto runs PyTorch and says why: nothing to ask
    assert status(openvino=chosen) == "openvino"
    assert status() == "current"  # not compared
    marker.write_text(json.dumps({**built, "torch": {"backend": "cpu"}, "openvino": {"included": False}}))
    assert status(openvino=chosen) == "openvino"
    marker.write_text(json.dumps({**built, "torch": {"backend": "cpu"}, "openvino": {"included": True}}))
    assert status(openvino=chosen) == "current"
    (library / "src" / "instructx2x" / "errors.py").write_text("# another library\n")
    assert status(openvino=chosen) == "library"  # reinstalled, and OpenVINO added in the same copy


# A stand-in for Slicer's Python: pip and the import check, each call recorded (no download).
RECORDING_PYTHON = """#!{python}
import json, sys
from pathlib import Path
here = Path(sys.argv[0]).parent
with open(here / "calls.jsonl", "a") as calls:
    calls.write(json.dumps(sys.argv[1:]) + "\\n")
if sys.argv[1:3] == ["-m", "pip"]:
    target = Path(sys.argv[sys.argv.index("--target") + 1])
    for name in sys.argv[sys.argv.index("install") + 1 :]:
        if name in ("openvino", "openvino-telemetry"):
            (target / name.replace("-", "_")).mkdir(parents=True)
    target.mkdir(parents=True, exist_ok=True)
    print("Installing collected packages: " + " ".join(sys.argv[-2:]))
else:
    print("2.13.0+cpu")
"""


@pytest.fixture
def recording_python(tmp_path):
    python = tmp_path / "python" / "python3"
    python.parent.mkdir()
    python.write_text(RECORDING_PYTHON.format(python=sys.executable))
    python.chmod(0o755)

    def calls() -> list[list[str]]:
        return [json.loads(line) for line in (python.parent / "calls.jsonl").read_text().splitlines()]

    return python, calls


def test_choosing_openvino_adds_it_to_the_set_in_place(shipped, tmp_path, recording_python):
    library, requirements = shipped
    constraints = MODULE / "Resources" / "constraints.txt"
    python, calls = recording_python
    folder = tmp_path / "settings" / "set"
    folder.mkdir(parents=True)
    (folder / "torch").mkdir()
    built = {
        **packages.package_set_fingerprint(library, requirements, [constraints]),
        "torch": {"backend": "cpu"},
    }
    (folder / packages.MARKER).write_text(
        json.dumps({**built, "openvino": {"included": False, "reason": "avx2"}})
    )
    questions: list[str] = []
    add = functools.partial(
        install,
        folder,
        python,
        library,
        requirements,
        constraints=[constraints],
        torch=lambda: CPU,
        openvino=lambda build: packages.choose_openvino(build, "openvino"),
    )

    def decline(question: str) -> bool:
        questions.append(question)
        return False

    with pytest.raises(packages.PackageSetError) as refused:
        add(confirm=decline)
    assert str(refused.value) == (
        "Backend: OpenVINO needs the OpenVINO runtime, which InstructX2X's worker packages do not hold yet; "
        "nothing was installed. Press Preview or Apply again to add it (about 180 MB), or choose Backend: "
        "PyTorch or auto."
    )
    assert questions == [
        f"Update InstructX2X's worker packages in {folder}: add OpenVINO (about 180 MB downloaded: the "
        "panel's backend is OpenVINO)? Slicer's own Python is not changed."
    ]
    assert not (python.parent / "calls.jsonl").exists() and sorted(p.name for p in folder.iterdir()) == [
        packages.MARKER,
        "torch",
    ]
    add(confirm=lambda question: True)
    pip, check = calls()
    assert pip[:5] == ["-m", "pip", "install", "--target", pip[4]] and pip[-3:] == [
        "--no-deps",
        "openvino",
        "openvino-telemetry",
    ]
    assert ["-c", str(constraints)] == pip[pip.index("-c") : pip.index("-c") + 2]  # pinned by the lock
    assert "instructx2x.cli, openvino; print(torch.__version__)" in check[2]  # it must import
    assert sorted(p.name for p in folder.iterdir()) == [
        packages.MARKER,
        "openvino",
        "openvino_telemetry",
        "torch",
    ]
    marker = json.loads((folder / packages.MARKER).read_text())
    assert marker["openvino"] == {"included": True, "reason": "the panel's backend is OpenVINO"}
    assert marker["torch"] == {"backend": "cpu", "version": "2.13.0+cpu"}
    assert list(folder.parent.iterdir()) == [folder]  # no staging left


@pytest.mark.parametrize("kind, included", [("amx", True), ("avx2", False)])
def test_a_new_set_holds_openvino_where_auto_takes_it_and_says_so(
    shipped, tmp_path, recording_python, kind, included
):
    library, requirements = shipped
    python, calls = recording_python
    folder = tmp_path / "settings" / "set"
    questions: list[str] = []

    def accept(question: str) -> bool:
        questions.append(question)
        return True

    install(
        folder,
        python,
        library,
        requirements,
        confirm=accept,
        torch=lambda: CPU,
        openvino=lambda build: packages.choose_openvino(build, "auto", lambda: kind),
    )
    (question,) = questions
    assert ("highdicom, OpenVINO and the InstructX2X library" in question) is included
    assert (
        f"OpenVINO is {'included' if included else 'left out'}: on this CPU ({kind}) the auto backend"
        in question
    )
    pip, check = calls()
    assert ("openvino" in pip and "openvino-telemetry" in pip) is included
    assert ("openvino;" in check[2]) is included
    marker = json.loads((folder / packages.MARKER).read_text())
    assert marker["openvino"]["included"] is included and kind in marker["openvino"]["reason"]


def test_the_set_pins_openvino_and_all_it_needs_beside_the_set():
    """Added alone (``--no-deps``), OpenVINO finds what it imports in the set: its requirements
    are its own packages or the set's, and the lock pins them at the versions the suite runs."""
    from importlib.metadata import requires

    locked = pins(MODULE / "Resources" / "constraints.txt")
    needed = {Requirement(line).name.lower() for line in requires("openvino") or [] if "extra ==" not in line}
    assert needed <= set(packages.OPENVINO_PACKAGES) | set(pins(REQUIREMENTS))
    for name in packages.OPENVINO_PACKAGES:
        assert locked[name] == pins(REPO / "constraints.txt")[name], name


def test_the_fingerprint_reads_the_library_on_python_3_10(shipped, monkeypatch):
    """Python 3.10 has no tomllib: its backport tomli (a dependency there) reads the library's
    pyproject.toml, stood in for here (from 3.11) by the standard library's module."""
    library, requirements = shipped
    built = packages.package_set_fingerprint(library, requirements)
    monkeypatch.setattr(sys, "version_info", (3, 10, 13, "final", 0))
    monkeypatch.setitem(sys.modules, "tomllib", None)  # `import tomllib` fails as on 3.10
    monkeypatch.setitem(sys.modules, "tomli", tomllib)
    assert packages.package_set_fingerprint(library, requirements) == {**built, "python": "3.10"}


# -- refusals and failures change nothing ------------------------------------------------------
def test_declining_installs_nothing_and_runs_nothing(shipped, tmp_path):
    library, requirements = shipped
    folder = tmp_path / "settings" / "InstructX2X" / "worker-packages-py3.12"
    ended = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    stale = folder.parent / f"{packages.STAGING_PREFIX}{int(ended.stdout)}-x1"  # its process has ended
    (stale / "packages" / "torch").mkdir(parents=True)
    running = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    live = folder.parent / f"{packages.STAGING_PREFIX}{running.pid}-x2"  # another Slicer's install, under way
    (live / "packages").mkdir(parents=True)
    questions: list[str] = []

    def decline(question: str) -> bool:
        questions.append(question)
        return False

    with pytest.raises(packages.PackageSetError, match="nothing was installed. Press Preview or Apply again"):
        install(
            folder,
            tmp_path / "no-such-python",
            library,
            requirements,
            confirm=decline,
            progress=lambda stage: None,
            torch=lambda: packages.TorchBuild("cpu", "https://example.invalid/cpu", "no GPU"),
        )
    assert (
        len(questions) == 1
        and "about 1 GB" in questions[0]
        and "Slicer's own Python is not changed" in questions[0]
    )
    assert "CPU build: no GPU" in questions[0] and "earlier install did not finish" in questions[0]
    running.kill()
    running.wait()
    assert sorted(p.name for p in folder.parent.iterdir()) == [
        live.name
    ]  # the interrupted build's folder is gone


SILENT_PIP = """#!/bin/sh
# pip downloading a large wheel: one line, then a long silence, then a failure
echo "Collecting torch==2.13.0"
sleep 2.5
exit 1
"""


def test_a_second_install_during_one_is_refused_and_a_silent_pip_still_reports_time(shipped, tmp_path):
    """The panel's dialog processes events while pip runs: a second Preview or Apply must not
    start an install that removes the running one's staging folder."""
    library, requirements = shipped
    folder = tmp_path / "settings" / "set"
    python = tmp_path / "silent-pip"
    python.write_text(SILENT_PIP)
    python.chmod(0o755)
    stages: list[str] = []
    nested: list[tuple[str, int, bool]] = []

    def progress(stage):
        stages.append(stage)
        if "elapsed" in stage and not nested:  # the second Apply, while pip is silent
            staging = list(folder.parent.glob(f"{packages.STAGING_PREFIX}{os.getpid()}-*"))
            try:
                install(
                    folder,
                    python,
                    library,
                    requirements,
                )
            except packages.PackageSetError as error:
                nested.append((str(error), len(staging), all(path.is_dir() for path in staging)))

    with pytest.raises(packages.PackageSetError, match="pip exit status 1"):
        install(
            folder,
            python,
            library,
            requirements,
            progress=progress,
        )
    assert nested == [
        (
            "InstructX2X's worker packages are being installed already; wait for that install to finish.",
            1,
            True,
        )
    ]
    assert (
        "Collecting torch==2.13.0 (0:01 elapsed)" in stages
        and "Collecting torch==2.13.0 (0:02 elapsed)" in stages
    )
    assert list(folder.parent.iterdir()) == []  # the failed install's staging is gone
    # the guard is released: the next install runs (and fails the same way)
    with pytest.raises(packages.PackageSetError, match="pip exit status 1"):
        install(
            folder,
            python,
            library,
            requirements,
        )


@pytest.mark.parametrize(
    "printed, advice",
    [
        ("OSError: [Errno 28] No space left on device", "The disk is full"),
        ("OSError: [WinError 206] The filename or extension is too long", "enable long paths"),
        (
            "ERROR: Could not find a version that satisfies the requirement torch==2.13.0",
            "internet connection",
        ),
    ],
)
def test_a_failed_pip_is_told_by_what_it_printed(shipped, tmp_path, printed, advice):
    library, requirements = shipped
    python = tmp_path / "failing-pip"
    python.write_text(f"#!/bin/sh\necho 'Collecting torch==2.13.0'\necho '{printed}'\nexit 1\n")
    python.chmod(0o755)
    with pytest.raises(packages.PackageSetError) as error:
        install(
            tmp_path / "settings" / "set",
            python,
            library,
            requirements,
        )
    assert advice in str(error.value) and "nothing was changed" in str(error.value)
    assert printed in str(error.value)  # pip's own words, last
    assert list((tmp_path / "settings").iterdir()) == []  # no staging left


LONG_PIP = """#!/bin/sh
# pip downloading a large wheel for a minute, writing as it goes
echo "Collecting torch==2.13.0"
mkdir -p "$(dirname "$0")/pip-ran"
sleep 60
exit 0
"""


def test_cancel_stops_pip_at_once_and_leaves_the_set_as_it_was(shipped, tmp_path):
    """The panel's Cancel button: pip is stopped within a poll, its staging folder removed, the
    set in place untouched, and the message says what to do."""
    library, requirements = shipped
    folder = tmp_path / "settings" / "set"
    folder.mkdir(parents=True)
    (folder / "old_package.py").write_text("VALUE = 1\n")
    python = tmp_path / "long-pip"
    python.write_text(LONG_PIP)
    python.chmod(0o755)
    asked = []

    def cancelled():
        asked.append(time.monotonic())
        return (tmp_path / "pip-ran").exists() and len(asked) > 5

    started = time.monotonic()
    with pytest.raises(
        packages.PackageSetError, match="cancelled; nothing was installed. Press Preview or Apply"
    ):
        install(
            folder,
            python,
            library,
            requirements,
            cancelled=cancelled,
        )
    assert time.monotonic() - started < 20  # not the minute pip would take
    assert sorted(p.name for p in folder.parent.iterdir()) == ["set"]  # no staging left
    assert [p.name for p in folder.iterdir()] == ["old_package.py"]


HANGING_CHECK = """#!/bin/sh
# pip installs at once; the check of the new set hangs (an import that never returns)
if [ "$2" = "pip" ]; then exit 0; fi
mkdir -p "$(dirname "$0")/check-ran"
exec sleep 60
"""


def test_cancel_stops_the_check_of_the_new_set_and_leaves_the_set_as_it_was(shipped, tmp_path):
    library, requirements = shipped
    folder = tmp_path / "settings" / "set"
    folder.mkdir(parents=True)
    (folder / packages.MARKER).write_text(json.dumps({"format": 1, "python": "2.7"}))  # rebuilt
    (folder / "old_package.py").write_text("VALUE = 1\n")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    python = tmp_path / "hanging-check"
    python.write_text(HANGING_CHECK)
    python.chmod(0o755)
    stages: list[str] = []
    started = time.monotonic()
    with pytest.raises(packages.PackageSetError, match="cancelled; nothing was installed"):
        install(
            folder,
            python,
            library,
            requirements,
            progress=stages.append,
            cancelled=lambda: (tmp_path / "check-ran").exists(),
        )
    assert time.monotonic() - started < 20  # not the minute the check would take
    assert stages[-1] == "Checking the new worker packages…"
    assert sorted(p.name for p in folder.parent.iterdir()) == ["set"]  # no staging left
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_cancel_stops_the_copy_of_the_set_in_place_and_leaves_it_as_it_was(shipped, tmp_path):
    """A newer library alone is installed into a hard-linked copy of the set: Cancel stops the
    copy between two files, before pip runs, and no file of the set keeps a second link."""
    library, requirements = shipped
    folder = tmp_path / "settings" / "set"
    for index in range(200):
        (folder / f"package{index // 20}").mkdir(parents=True, exist_ok=True)
        (folder / f"package{index // 20}" / f"module{index}.py").write_text(f"VALUE = {index}\n")
    built = packages.package_set_fingerprint(library, requirements)
    marker = {**built, "library_version": "0.0.1", "torch": {"backend": "index"}}
    (folder / packages.MARKER).write_text(json.dumps(marker))
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    python = tmp_path / "long-pip"
    python.write_text(LONG_PIP)
    python.chmod(0o755)
    asked: list[int] = []
    stages: list[str] = []

    def cancelled() -> bool:
        asked.append(1)
        return len(asked) >= 50

    with pytest.raises(packages.PackageSetError, match="cancelled; nothing was installed"):
        install(folder, python, library, requirements, progress=stages.append, cancelled=cancelled)
    assert len(asked) == 50 and stages[-1] == "Copying the worker's packages…"
    assert not (tmp_path / "pip-ran").exists()
    assert sorted(p.name for p in folder.parent.iterdir()) == ["set"]  # no staging left
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before
    assert all(p.stat().st_nlink == 1 for p in before)


def test_each_slicer_revision_has_its_own_set(tmp_path):
    first = packages.package_set_folder(tmp_path / "slicer.org" / "Slicer-33216.ini", (3, 12))
    second = packages.package_set_folder(tmp_path / "slicer.org" / "Slicer-34045.ini", (3, 12))
    assert first == tmp_path / "slicer.org" / "InstructX2X" / "worker-packages-Slicer-33216-py3.12"
    assert first != second and first.parent == second.parent
    # Slicer --testing (settings disabled) names the revision's file Slicer-tmp-<rev>-tmp.ini
    # (qSlicerCoreApplication::slicerRevisionUserSettingsFilePath): the same set, not a second one
    testing = packages.package_set_folder(tmp_path / "slicer.org" / "Slicer-tmp-33216-tmp.ini", (3, 12))
    assert testing == first


def test_an_offline_install_leaves_the_set_in_place_as_it_was(shipped, tmp_path, monkeypatch):
    library, requirements = shipped
    folder = tmp_path / "set"
    folder.mkdir()
    (folder / packages.MARKER).write_text(json.dumps({"format": 1, "python": "2.7"}))  # an old set
    (folder / "old_package.py").write_text("VALUE = 1\n")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    empty = tmp_path / "no-packages"
    empty.mkdir()
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)  # this machine's pip finds wheels on disk
    monkeypatch.setenv("PIP_FIND_LINKS", str(empty))
    stages: list[str] = []
    lines: list[str] = []
    with pytest.raises(packages.PackageSetError) as error:
        install(
            folder,
            sys.executable,
            library,
            requirements,
            progress=stages.append,
            log=lines.append,
            pip_options=["--no-index"],
        )
    message = str(error.value)
    assert "nothing was changed" in message and "Check the internet connection" in message
    assert "pip exit status 1" in message and lines and lines[-1] in message  # pip's last lines
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "InstructX2XLib",
        "no-packages",
        "requirements.txt",
        "set",
    ]


def test_a_python_that_does_not_run_is_said_and_changes_nothing(shipped, tmp_path):
    library, requirements = shipped
    folder = tmp_path / "settings" / "set"
    with pytest.raises(packages.PackageSetError, match="cannot run no-such-python .*nothing was changed"):
        install(
            folder,
            tmp_path / "no-such-python",
            library,
            requirements,
            progress=lambda stage: None,
        )
    assert list(folder.parent.iterdir()) == []


OLD_SLICER_PYTHON = Path("/root/.pyenv/versions/3.9.18/bin/python")  # Slicer 5.6 and 5.8 ship Python 3.9
ON_OLD_SLICER = """
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from InstructX2XModuleLib import packages
packages.use_library_source(Path(sys.argv[1]))
from instructx2x.instructions import FINDINGS, parse_instruction
print(len(FINDINGS), parse_instruction("Remove the finding of right pneumothorax").findings[0])
print(packages.unsupported_slicer(5, 8))
"""


def test_on_slicer_5_8_s_python_the_panel_parses_instructions_and_says_what_it_needs():
    if not OLD_SLICER_PYTHON.is_file():
        if REQUIRE_TOOLS:
            pytest.fail(f"{OLD_SLICER_PYTHON} (Python 3.9, as in Slicer 5.6 and 5.8) is missing")
        pytest.skip(f"{OLD_SLICER_PYTHON} is missing")
    result = subprocess.run(
        [str(OLD_SLICER_PYTHON), "-c", ON_OLD_SLICER, str(MODULE)], capture_output=True, text=True, check=True
    )
    vocabulary, needs = result.stdout.splitlines()
    assert vocabulary == "30 pneumothorax" and "needs 3D Slicer 5.10 or later" in needs


# -- the worker's start ----------------------------------------------------------------------
def test_the_worker_command_puts_the_set_first_and_not_the_working_folder(tmp_path):
    for place in ("set", "cwd"):
        package = tmp_path / place / "instructx2x"
        package.mkdir(parents=True)
        (package / "__init__.py").write_text("")
        (package / "cli.py").write_text(
            "import json, sys\nprint(json.dumps({'where': " + repr(place) + ", 'argv': sys.argv[1:], "
            "'first': sys.path[0], 'name': __name__, "
            "'site': [p for p in sys.path if 'site-packages' in p or 'dist-packages' in p]}))\n"
        )
    command = [*packages.worker_command(sys.executable, tmp_path / "set"), "serve", "--stdio"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path / "cwd", check=True)
    # the set's copy wins over this environment's installed library and over the working folder's
    # and no site-packages (Slicer's numpy, scipy...) behind it
    assert json.loads(result.stdout) == {
        "where": "set",
        "argv": ["serve", "--stdio"],
        "first": str(tmp_path / "set"),
        "name": "__main__",
        "site": [],
    }


CHATTY_WORKER = """
import json, sys
for index in range(20000):  # about 1.4 MB of log, far more than a pipe holds
    print(f"log line {index:05d} " + "x" * 50, file=sys.stderr)
print(json.dumps({"event": "ready", "model": {}}), flush=True)
sys.stdin.readline()
print("the last line", file=sys.stderr)
sys.exit(3)
"""


def test_a_worker_that_logs_a_lot_still_starts_and_its_last_lines_explain_its_exit():
    client = WorkerClient("demo", executable=[sys.executable, "-c", CHATTY_WORKER])
    client.start()
    try:
        poll_until(client, lambda events: client.state is WorkerState.READY, timeout=30)
        client._send({"type": "anything"})
        poll_until(client, lambda events: client.state is WorkerState.STOPPED, timeout=30)
    finally:
        client.kill()
    assert client.last_error is not None
    assert "exit code 3" in client.last_error and client.last_error.endswith("the last line\n")
    assert len(client.stderr_tail) == 200 and client.stderr_tail[0].startswith("log line 19801")


# -- the self-test's radiograph --------------------------------------------------------------
def self_test_writer() -> str:
    """The self-test's ``_writeTestRadiograph`` from InstructX2X.py (which imports Slicer's qt)."""
    tree = ast.parse((MODULE / "InstructX2X.py").read_text())
    function = next(
        node
        for node in tree.body
        if isinstance(node, ast.FunctionDef) and node.name == "_writeTestRadiograph"
    )
    return "from pathlib import Path\n" + ast.unparse(function)


WRITE_AND_READ = """
import sys
{writer}
_writeTestRadiograph(Path(sys.argv[1]))
import pydicom
dataset = pydicom.dcmread(sys.argv[1])
print(pydicom.__version__, dataset.Modality, dataset.pixel_array.shape, dataset.file_meta.TransferSyntaxUID)
"""


def test_the_self_tests_radiograph_on_pydicom_3(tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", WRITE_AND_READ.format(writer=self_test_writer()), str(tmp_path / "dx.dcm")],
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.split()[0].startswith("3.")
    assert result.stdout.split()[1:] == ["DX", "(96,", "88)", "1.2.840.10008.1.2.1"]


# -- the extension as built -------------------------------------------------------------------
# Slicer's CMake, reduced to what the extension's CMakeLists use: slicerMacroBuildScriptedModule
# puts each SCRIPT and RESOURCE at its relative path under the module's build tree
# (lib/Slicer-X.Y/qt-scripted-modules) and installs that tree whole (Slicer's
# SlicerMacroBuildScriptedModule.cmake through CTK's ctkMacroCompilePythonScript).
FAKE_SLICER_CONFIG = """
set(Slicer_USE_FILE ${CMAKE_CURRENT_LIST_DIR}/UseSlicer.cmake)
set(Slicer_EXTENSION_GENERATE_CONFIG ${CMAKE_CURRENT_LIST_DIR}/Nothing.cmake)
set(Slicer_EXTENSION_CPACK ${CMAKE_CURRENT_LIST_DIR}/Nothing.cmake)
"""
FAKE_SLICER_USE = """
set(Slicer_QTSCRIPTEDMODULES_LIB_DIR lib/Slicer-5.10/qt-scripted-modules)
set(Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR ${Slicer_QTSCRIPTEDMODULES_LIB_DIR})
macro(slicerMacroBuildScriptedModule)
  cmake_parse_arguments(MODULE "WITH_GENERIC_TESTS" "NAME" "SCRIPTS;RESOURCES" ${ARGN})
  foreach(module_file ${MODULE_SCRIPTS} ${MODULE_RESOURCES})
    configure_file(${CMAKE_CURRENT_SOURCE_DIR}/${module_file}
      ${CMAKE_BINARY_DIR}/${Slicer_QTSCRIPTEDMODULES_LIB_DIR}/${module_file} COPYONLY)
  endforeach()
  install(DIRECTORY ${CMAKE_BINARY_DIR}/${Slicer_QTSCRIPTEDMODULES_LIB_DIR}/
    DESTINATION ${Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR})
endmacro()
macro(slicer_add_python_unittest)
endmacro()
"""


# Slicer's and CTK's own macros, from checkouts named by these variables (neither is
# installable here, nor copied into this repository): the same extension configured, built
# (CTK byte-compiles each script) and installed by them must give the stand-in's layout.
SLICER_SOURCE = os.environ.get("INSTRUCTX2X_SLICER_SOURCE")  # a Slicer checkout, 5.6 or later
CTK_SOURCE = os.environ.get("INSTRUCTX2X_CTK_SOURCE")  # the CTK checkout Slicer builds with
REAL_SLICER_USE = """
set(CTK_CMAKE_DIR {ctk}/CMake)
include(${{CTK_CMAKE_DIR}}/ctkFunctionExtractOptimizedLibrary.cmake)
include(${{CTK_CMAKE_DIR}}/ctkMacroCompilePythonScript.cmake)
include({slicer}/CMake/SlicerMacroBuildScriptedModule.cmake)
set(Slicer_USE_PYTHONQT ON)
set(Slicer_QTSCRIPTEDMODULES_LIB_DIR lib/Slicer-5.10/qt-scripted-modules)
set(Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR ${{Slicer_QTSCRIPTEDMODULES_LIB_DIR}})
macro(slicer_add_python_unittest)
endmacro()
"""


def install_extension(root: Path, use_slicer: str, build: bool = False) -> Path:
    """Configure the extension from its own CMakeLists with ``use_slicer`` as Slicer's use
    file, optionally build it, and install it into ``root/staging``; returns the scripted
    modules folder there."""
    cmake = shutil.which("cmake")
    if cmake is None:
        if REQUIRE_TOOLS:
            pytest.fail("cmake is missing (scripts/install-system-packages.sh installs it)")
        pytest.skip("cmake is missing")
    (root / "slicer").mkdir()
    (root / "slicer" / "SlicerConfig.cmake").write_text(FAKE_SLICER_CONFIG)
    (root / "slicer" / "UseSlicer.cmake").write_text(use_slicer)
    (root / "slicer" / "Nothing.cmake").write_text("")
    subprocess.run(
        [
            cmake,
            "-S",
            str(REPO),
            "-B",
            str(root / "build"),
            f"-DSlicer_DIR={root / 'slicer'}",
            "-DBUILD_TESTING=OFF",
            f"-DPYTHON_EXECUTABLE={sys.executable}",
        ],
        check=True,
        capture_output=True,
    )
    if build:
        subprocess.run([cmake, "--build", str(root / "build")], check=True, capture_output=True)
    subprocess.run(
        [cmake, "--install", str(root / "build"), "--prefix", str(root / "staging")],
        check=True,
        capture_output=True,
    )
    return root / "staging" / "lib" / "Slicer-5.10" / "qt-scripted-modules"


@pytest.fixture(scope="module")
def installed_extension(tmp_path_factory):
    """The extension configured from its own CMakeLists and installed into a staging folder."""
    return install_extension(tmp_path_factory.mktemp("extension"), FAKE_SLICER_USE)


def files_under(folder: Path) -> set[str]:
    return {str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file()}


@pytest.mark.skipif(
    not (SLICER_SOURCE and CTK_SOURCE),
    reason="set INSTRUCTX2X_SLICER_SOURCE and INSTRUCTX2X_CTK_SOURCE to Slicer and CTK checkouts",
)
def test_slicers_own_macros_install_the_stand_ins_layout(installed_extension, tmp_path):
    real = install_extension(
        tmp_path, REAL_SLICER_USE.format(slicer=SLICER_SOURCE, ctk=CTK_SOURCE), build=True
    )
    scripts = {name for name in files_under(real) if not name.endswith(".pyc")}
    assert scripts == files_under(installed_extension)
    assert {name for name in files_under(real) if name.endswith(".pyc")} == {
        name + "c" for name in scripts if name.endswith(".py") and not name.startswith("Resources/")
    }


def imports(path: Path) -> set[tuple[str, str | None]]:
    """Every (module, name) a file imports, at the top or inside functions; name is None for
    ``import module``, relative imports resolved."""
    found: set[tuple[str, str | None]] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {(alias.name, None) for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                module = f"{path.parent.name}.{module}" if module else path.parent.name
            found |= {(module, alias.name) for alias in node.names}
    return found


def module_file(bases: list[Path], module: str) -> Path | None:
    for base in bases:
        for candidate in (
            base / (module.replace(".", "/") + ".py"),
            base / module.replace(".", "/") / "__init__.py",
        ):
            if candidate.is_file():
                return candidate
    return None


def test_the_installed_extension_holds_every_file_the_module_imports(installed_extension):
    staged = installed_extension
    assert (staged / "InstructX2X.py").is_file() and (staged / "Resources" / "requirements.txt").is_file()
    library = packages.library_source(staged)
    assert library == staged / "Resources" / "InstructX2XLib"
    shipped = {
        p.relative_to(REPO / "InstructX2XLib")
        for p in (REPO / "InstructX2XLib" / "src" / "instructx2x").rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }
    assert shipped and all((library / path).is_file() for path in shipped)
    assert (library / "pyproject.toml").is_file() and (library / "README.md").is_file()
    # every module of ours that the panel's files import, top-level or lazily, lies in the staging;
    # a name imported from a package is its submodule or defined in its __init__
    bases = [staged, library / "src"]
    ours = sorted(
        pair
        for source in [staged / "InstructX2X.py", *(staged / "InstructX2XModuleLib").glob("*.py")]
        for pair in imports(source)
        if pair[0].split(".")[0] in ("InstructX2XModuleLib", "instructx2x")
    )
    assert ("instructx2x.instructions", "FINDINGS") in ours and ("InstructX2XModuleLib", "packages") in ours
    missing = []
    for module, name in ours:
        found = module_file(bases, module)
        if found is None:
            missing.append(module)
        elif (
            name
            and found.name == "__init__.py"
            and module_file(bases, f"{module}.{name}") is None
            and name not in found.read_text()
        ):
            missing.append(f"{module}.{name}")
    assert missing == []
    assert not (staged / "InstructX2XModuleLib" / "web").exists()  # the browser panel: pip, not the extension


PANEL_IMPORTS = """
import sys
from pathlib import Path
module = Path(sys.argv[1])
sys.path.insert(0, str(module))
from InstructX2XModuleLib import packages
packages.use_library_source(module)
from InstructX2XModuleLib import scene, session, worker
import instructx2x
print(instructx2x.__file__)
print(session.describe_instruction("Remove the finding of right pneumothorax"))
print("torch" in sys.modules)
"""


def test_the_installed_extension_s_panel_layers_import_from_the_staging(installed_extension):
    result = subprocess.run(
        [sys.executable, "-c", PANEL_IMPORTS, str(installed_extension)],
        capture_output=True,
        text=True,
        check=True,
        cwd=installed_extension,
    )
    where, described, torch = result.stdout.splitlines()
    assert Path(where).is_relative_to(installed_extension / "Resources" / "InstructX2XLib" / "src")
    assert described.startswith("remove: pneumothorax (right)") and torch == "False"


# -- Slicer's Python -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def slicer_python(tmp_path_factory):
    """A venv on Python 3.12 with Slicer 5.10's bundled packages at the SuperBuild's pins."""
    if not SLICER_PYTHON.is_file():
        message = (
            f"{SLICER_PYTHON} (Python 3.12, as in Slicer 5.10) is missing: install it with "
            "`pyenv install 3.12.1` or point INSTRUCTX2X_SLICER_PYTHON at a Python 3.12"
        )
        if REQUIRE_TOOLS:
            pytest.fail(message)
        pytest.skip(message)
    venv = tmp_path_factory.mktemp("slicer-python") / "venv"
    python = venv / "bin" / "python"
    pip = [str(python), "-m", "pip", "install", "-q", "-c", str(SLICER_CONSTRAINTS)]
    # Slicer's pip (25.1.1) first: it does the installs
    for command in ([str(SLICER_PYTHON), "-m", "venv", str(venv)], [*pip, "pip"], [*pip, *SLICER_PACKAGES]):
        result = subprocess.run(command, capture_output=True, text=True)
        assert result.returncode == 0, (command, result.stderr[-3000:])
    yield python
    shutil.rmtree(venv, ignore_errors=True)


def test_the_package_set_on_slicers_python(slicer_python, tmp_path):
    """Slicer's Python keeps its pydicom 2.4.4 and never imports torch; the module's install
    routine builds, finds current, and updates the worker's set; the worker runs from it."""
    checkout = tmp_path / "checkout"  # the module and library as they are now, apart from later edits
    shutil.copytree(MODULE, checkout / "InstructX2X", ignore=shutil.ignore_patterns("__pycache__", "web"))
    shutil.copytree(
        REPO / "InstructX2XLib",
        checkout / "InstructX2XLib",
        ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "tests", "tools"),
    )
    folder = tmp_path / "settings" / "InstructX2X" / "worker-packages-py3.12"
    free = shutil.disk_usage(tmp_path).free
    if free < SET_DISK_NEED:
        message = (
            f"the worker's package set needs {SET_DISK_NEED / 2**30:.0f} GB free on the disk of "
            f"{tmp_path}; it has {free / 2**30:.1f} GB"
        )
        if REQUIRE_TOOLS:
            pytest.fail(message)
        pytest.skip(message)
    started = time.monotonic()
    try:
        result = subprocess.run(
            [
                str(slicer_python),
                str(HERE / "slicer_process.py"),
                str(checkout / "InstructX2X"),
                str(folder),
                str(tmp_path / "work"),
                str(REPO / "constraints.txt"),
            ],
            capture_output=True,
            text=True,
            timeout=1200,
            env={**os.environ, "PIP_NO_CACHE_DIR": "1"},  # no second copy of the downloads
        )
        assert result.returncode == 0, result.stderr[-3000:]
        report = json.loads(result.stdout.splitlines()[-1])
        writer = subprocess.run(
            [
                str(slicer_python),
                "-c",
                WRITE_AND_READ.format(writer=self_test_writer()),
                str(tmp_path / "dx.dcm"),
            ],
            capture_output=True,
            text=True,
        )
    finally:
        shutil.rmtree(folder.parent, ignore_errors=True)  # several GB
        shutil.rmtree(checkout, ignore_errors=True)
    print(
        f"package set: built in {report['install_s']:.0f} s, updated in {report['update_s']:.0f} s; "
        f"all in {time.monotonic() - started:.0f} s"
    )

    # Slicer's process: its own packages untouched, the Qt-free layers without torch
    assert report["pydicom"] == "2.4.4" and report["unchanged"]
    assert report["installed"] == {
        "numpy": "2.0.2",
        "pydicom": "2.4.4",
        "torch": None,
        "diffusers": None,
        "instructx2x": None,
    }
    assert not report["torch_imported_by_layers"] and not report["torch_imported"]
    assert report["described"].startswith("add: pleural effusion (left)")
    # built once (asked once), then current (nothing asked, nothing run)
    assert report["questions_after_install"] == 1 and report["status_after_install"] == "current"
    assert report["questions_after_again"] == 1 and report["again_s"] < 10
    assert report["marker"]["library_version"] == __version__ and report["marker"]["python"] == "3.12"
    assert report["marker"]["torch"]["version"].startswith("2.13.0")
    # OpenVINO in the set where auto takes it on this CPU (then imported by the check, pinned by the lock)
    on_this_cpu = packages.choose_openvino(packages.TorchBuild("index", None, "the test's package index"))
    assert report["marker"]["openvino"] == {"included": on_this_cpu.include, "reason": on_this_cpu.reason}
    assert report["stages"][0].startswith("Downloading and installing PyTorch")
    # a set from an older library: the library alone reinstalled, torch's files kept
    assert "another version of its library" in report["update_question"]
    assert report["torch_file_kept"] and report["marker_after_update"] == __version__
    assert report["left_beside_set"] == [folder.name]
    # the worker from the set: the demo model, a preview and an edit
    assert report["ready"] == {"state": "ready", "error": None, "model": "demo"}
    assert report["preview"]["last"] == "done" and "guidance_map.npy" in report["preview"]["files"]
    assert report["edit"]["last"] == "done" and "counterfactual.dcm" in report["edit"]["files"]
    assert report["worker_command"][:3] == [str(slicer_python), "-s", "-c"]
    # the panel reads the written series with Slicer's pydicom 2.4.4
    assert report["counterfactual"][1] == "float32" and len(report["counterfactual"][0]) == 2
    assert (
        len(report["series_files"]) == 3 and "SEG" in report["series_files"]
    )  # counterfactual, overlay, SEG
    # the self-test writes its radiograph with Slicer's pydicom 2.4.4
    assert writer.returncode == 0, writer.stderr[-2000:]
    assert writer.stdout.split() == ["2.4.4", "DX", "(96,", "88)", "1.2.840.10008.1.2.1"]
