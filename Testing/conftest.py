"""Cross-package tests: make the library's test helpers importable here too."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "InstructX2XLib" / "tests"))
