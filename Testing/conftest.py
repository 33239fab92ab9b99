"""Testing/ collects on its own: the DICOM factory lives beside the library's tests."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "InstructX2XLib" / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "InstructX2X"))  # the module's Lib


def pytest_configure(config):
    config.addinivalue_line("markers", "web: the browser panel (needs the web environment, make test-web)")
    config.addinivalue_line("markers", "xrv: torchxrayvision back-end (needs the eval environment, make test-eval)")
