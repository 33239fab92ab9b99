"""Locate the installed console scripts the way a user of this environment runs them."""

import shutil
import sys
from pathlib import Path


def console_script(name: str) -> str:
    """The script beside the running interpreter (a venv need not be activated), else PATH."""
    beside = Path(sys.executable).parent / name
    if beside.is_file():
        return str(beside)
    found = shutil.which(name)
    assert found, f"the {name} console script is not installed"
    return found
