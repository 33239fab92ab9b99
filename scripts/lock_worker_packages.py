"""Write InstructX2X/Resources/constraints.txt: every package the Slicer module's worker package
set installs, pinned, as pip resolves InstructX2X/Resources/requirements.txt and the library with
its OpenVINO extra (in the set where packages.choose_openvino says so) for Slicer's Python.

    python3.12 scripts/lock_worker_packages.py    # the Python Slicer 5.10 ships (pyenv: 3.12.1)

torch and the packages of its build (triton, nvidia-*, cuda-*) are left to the build the module
chooses on the user's machine (CPU or CUDA); setuptools is Slicer's own.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESOURCES = REPO / "InstructX2X" / "Resources"
BUILD_SPECIFIC = ("torch", "triton", "setuptools", "instructx2x")
BUILD_PREFIXES = ("nvidia-", "cuda-")


def resolved() -> dict[str, str]:
    with tempfile.TemporaryDirectory() as folder:
        report = Path(folder) / "report.json"
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "--dry-run",
                "--ignore-installed",
                "--quiet",
                "--report",
                str(report),
                "-r",
                str(RESOURCES / "requirements.txt"),
                f"{REPO / 'InstructX2XLib'}[openvino]",  # OpenVINO where the set holds it (packages.py)
            ],
            check=True,
        )
        items = json.loads(report.read_text())["install"]
    return {item["metadata"]["name"].lower().replace("_", "-"): item["metadata"]["version"] for item in items}


def main() -> None:
    pins = {
        name: version
        for name, version in resolved().items()
        if name not in BUILD_SPECIFIC and not name.startswith(BUILD_PREFIXES)
    }
    header = (
        "# Every package of the worker's package set, pinned (scripts/lock_worker_packages.py wrote it with\n"
        f"# Python {sys.version_info[0]}.{sys.version_info[1]}); torch's build and its own packages are chosen "
        "on the user's machine.\n"
    )
    lines = [f"{name}=={version}" for name, version in sorted(pins.items())]
    (RESOURCES / "constraints.txt").write_text(header + "\n".join(lines) + "\n", encoding="utf-8")
    print(f"{len(lines)} packages pinned in {RESOURCES / 'constraints.txt'}")


if __name__ == "__main__":
    main()
