"""Stopping the panel's worker when it does not answer, as Slicer starts it: through a launcher
(``PythonSlicer`` runs the real Python as its child), in a Python without psutil."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")

MODULE = Path(__file__).resolve().parents[2]

# PythonSlicer's part: start the real interpreter with the arguments, wait for it
LAUNCHER = "import subprocess, sys\nsys.exit(subprocess.call(sys.argv[1:]))\n"
# a worker that says it is ready, logs every request and never exits on its own
WORKER = textwrap.dedent("""\
    import json, os, sys
    log = sys.argv[1]
    with open(log + ".pid", "w") as out:
        out.write(str(os.getpid()))
    print(json.dumps({"event": "ready"}), flush=True)
    for line in sys.stdin:
        with open(log, "a") as out:
            out.write(line)
    import time
    time.sleep(600)
    """)
# Slicer's process: psutil cannot be imported, the session owns a folder and the worker
CHECK = textwrap.dedent("""\
    import json, sys, time
    sys.modules["psutil"] = None
    sys.path.insert(0, sys.argv[1])
    import slicer
    from InstructX2XModuleLib import scene as layer
    from InstructX2XModuleLib.session import EditSession
    from InstructX2XModuleLib.worker import WorkerClient, WorkerState
    launcher, worker, log = sys.argv[2:5]
    scene = slicer.vtkMRMLScene()
    layer.prepare_scene(scene)
    session = EditSession(scene)
    (session.folder / "job-001").mkdir()
    (session.folder / "job-001" / "input.dcm").write_bytes(b"pixels")
    client = WorkerClient("demo", executable=[sys.executable, launcher, sys.executable, worker, log])
    client.start()
    deadline = time.monotonic() + 60
    while client.state is not WorkerState.READY and time.monotonic() < deadline:
        client.poll()
        time.sleep(0.05)
    client.submit("edit", {"input": "x", "output": str(session.folder / "job-001" / "out")})
    session.worker = client
    session.stop()
    print(json.dumps({"launcher": client.process.pid, "folder": str(session.folder),
                      "exists": session.folder.exists(), "state": client.state.value}))
    """)


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting for its parent counts as ended)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


def test_stopping_an_unresponsive_worker_ends_launcher_and_child_and_removes_the_folder(tmp_path):
    (tmp_path / "launcher.py").write_text(LAUNCHER)
    (tmp_path / "worker.py").write_text(WORKER)
    log = tmp_path / "requests.log"
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            CHECK,
            str(MODULE),
            str(tmp_path / "launcher.py"),
            str(tmp_path / "worker.py"),
            str(log),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    child = int(Path(f"{log}.pid").read_text())
    try:
        assert result.returncode == 0, result.stderr[-2000:]
        outcome = json.loads(result.stdout.splitlines()[-1])
        assert outcome["state"] == "stopped" and not outcome["exists"]
        assert not alive(outcome["launcher"]) and not alive(child)  # the launcher's child too
        # the running job is cancelled before the worker is asked to exit
        assert [json.loads(line)["type"] for line in log.read_text().splitlines()] == [
            "edit",
            "cancel",
            "shutdown",
        ]
    finally:
        if alive(child):
            subprocess.run(["kill", "-9", str(child)])
