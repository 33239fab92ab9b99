"""Run a command and record its wall time (and the CPU) under a name in a JSON file.

Usage: python timed.py TIMING.json NAME -- COMMAND ...
"""

import json
import subprocess
import sys
import time
from pathlib import Path

from instructx2x.devices import cpu_description

path, name = Path(sys.argv[1]), sys.argv[2]
command = sys.argv[sys.argv.index("--") + 1 :]
started = time.perf_counter()
code = subprocess.call(command)
record = json.loads(path.read_text()) if path.is_file() else {}
record["cpu"] = cpu_description()  # every stage runs on one machine; the latest description wins
record[f"{name}_minutes"] = round((time.perf_counter() - started) / 60, 1)
path.write_text(json.dumps(record, indent=2) + "\n")
sys.exit(code)
