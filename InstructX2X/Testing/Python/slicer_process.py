"""What the desktop module does in Slicer's process, run on a stand-in for Slicer's Python.

Run by test_slicer_package_set.py with a venv that holds Slicer 5.10's bundled packages
(constraints-slicer-5.10.0.txt beside it): imports the module's Qt-free layers (no torch), builds
the worker's package set with the module's own install routine (``packages.ensure_package_set``,
the panel's callbacks replaced by recorders), updates it as a newer library would, starts the
worker from it and runs a preview and an edit on the demo model. Prints one JSON report.

    python slicer_process.py module_FOLDER PACKAGE_SET WORK_FOLDER [CONSTRAINTS ...]

module_FOLDER holds InstructX2X.py; the library lies beside it as in a checkout.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import sys
import sysconfig
import time
from pathlib import Path

SAMPLE = Path(__file__).resolve().parents[3] / "Resources" / "Samples" / "phantom_pa.dcm"


def installed() -> dict[str, str]:
    """What Slicer's Python has installed (its site-packages)."""
    site = sysconfig.get_paths()["purelib"]
    return {
        dist.metadata["Name"].lower(): dist.version for dist in importlib.metadata.distributions(path=[site])
    }


def wait(client, states, timeout: float = 300) -> list[dict]:
    events: list[dict] = []
    deadline = time.monotonic() + timeout
    while client.state not in states:
        if time.monotonic() > deadline:
            raise TimeoutError(f"the worker stayed {client.state.value}: {events}")
        events += client.poll()
        time.sleep(0.05)
    return events + client.poll()


def main(module: Path, folder: Path, work: Path, constraints: list[Path]) -> dict:
    constraints = [module / "Resources" / "constraints.txt", *constraints]  # as the panel pins the set
    before = installed()
    sys.path.insert(0, str(module))
    from InstructX2XModuleLib import packages

    packages.use_library_source(module)
    from InstructX2XModuleLib import scene, session, worker  # noqa: F401 - the Qt-free layers

    report = {
        "described": session.describe_instruction("Add the finding of left pleural effusion"),
        "torch_imported_by_layers": "torch" in sys.modules,
    }
    questions: list[str] = []
    stages: list = []
    lines: list[str] = []

    def confirm(question: str) -> bool:
        questions.append(question)
        return True

    def install() -> float:
        started = time.monotonic()
        packages.ensure_package_set(
            folder,
            sys.executable,
            packages.library_source(module),
            module / "Resources" / "requirements.txt",
            constraints=constraints,
            confirm=confirm,
            progress=stages.append,
            log=lines.append,
            torch=lambda: packages.TorchBuild("index", None, "the test's package index"),
        )
        return time.monotonic() - started

    report["install_s"] = install()
    marker = folder / packages.MARKER
    built = json.loads(marker.read_text())
    report["marker"] = built
    report["status_after_install"] = packages.package_set_status(
        folder, packages.library_source(module), module / "Resources" / "requirements.txt", constraints
    )
    report["questions_after_install"] = len(questions)
    report["again_s"] = install()  # current: nothing asked, nothing run
    report["questions_after_again"] = len(questions)

    # a set from an older library: the library alone is reinstalled, torch's files stay the same
    torch_init = folder / "torch" / "__init__.py"
    inode = torch_init.stat().st_ino
    marker.write_text(json.dumps({**built, "library_version": "0.0.1"}))
    os.environ["PIP_NO_INDEX"] = "1"  # offline: the library is built with Slicer's own setuptools
    try:
        report["update_s"] = install()
    finally:
        del os.environ["PIP_NO_INDEX"]
    report["update_question"] = questions[-1]
    report["torch_file_kept"] = torch_init.stat().st_ino == inode
    report["marker_after_update"] = json.loads(marker.read_text())["library_version"]
    report["left_beside_set"] = sorted(p.name for p in folder.parent.iterdir())
    report["stages"] = stages
    report["pip_lines"] = len(lines)

    client = worker.WorkerClient(
        "demo",
        device="cpu",
        executable=packages.worker_command(sys.executable, folder),
        environment={"CUDA_VISIBLE_DEVICES": "-1"},
    )
    client.start()
    try:
        wait(client, {worker.WorkerState.READY, worker.WorkerState.STOPPED})
        report["ready"] = {
            "state": client.state.value,
            "error": client.last_error,
            "model": client.info.get("model", {}).get("name"),
        }
        for kind in ("preview", "edit"):
            output = work / kind
            client.submit(
                kind,
                {
                    "input": str(SAMPLE),
                    "output": str(output),
                    "parameters": {
                        "instruction": "Add the finding of moderate left pleural effusion",
                        "num_inference_steps": 4,
                    },
                },
            )
            events = wait(client, {worker.WorkerState.READY, worker.WorkerState.STOPPED})
            report[kind] = {
                "last": events[-1].get("event") if events else None,
                "error": client.last_error,
                "files": sorted(p.name for p in output.glob("*")),
            }
    finally:
        client.shutdown()
    report["worker_command"] = client.command[:3]

    # what the panel then reads in Slicer's process, with Slicer's pydicom: the counterfactual's
    # pixels and the series' UIDs for the DICOM database
    import pydicom

    edited = session.dicom_pixels(work / "edit" / "counterfactual.dcm")
    report["counterfactual"] = [list(edited.shape), str(edited.dtype)]
    report["series_files"] = sorted(
        str(pydicom.dcmread(path, stop_before_pixels=True).Modality) for path in (work / "edit").glob("*.dcm")
    )
    report["pydicom"] = pydicom.__version__
    report["torch_imported"] = "torch" in sys.modules
    report["unchanged"] = installed() == before
    report["installed"] = {
        name: before.get(name) for name in ("numpy", "pydicom", "torch", "diffusers", "instructx2x")
    }
    return report


if __name__ == "__main__":
    print(
        json.dumps(
            main(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), [Path(p) for p in sys.argv[4:]])
        )
    )
