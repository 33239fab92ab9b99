"""Run a Python module or script as one process, or as several CPU processes under
``accelerate launch`` (gloo on loopback): the tests of sharded commands and of DDP training."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path


def launch(target: list[str], processes: int = 1, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``target`` (``["-m", "module", *arguments]`` or ``[script, *arguments]``) with this
    environment's Python, one thread per process: as one plain process, or as ``processes``
    CPU processes under ``accelerate launch`` on a free loopback port. Output is captured."""
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    if processes == 1:
        command = [sys.executable, *target]
    else:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        command = [
            str(Path(sys.executable).parent / "accelerate"),
            "launch",
            "--multi_gpu",
            "--num_processes",
            str(processes),
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "--main_process_ip",
            "127.0.0.1",
            "--main_process_port",
            str(port),
            *target,
        ]
        environment["ACCELERATE_USE_CPU"] = "true"
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=environment)
