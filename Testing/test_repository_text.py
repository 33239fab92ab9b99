"""The repository cites only itself and states what is true now.

Every git-tracked text file is read: none may cite a reference file that is not in the
repository ("SPEC section 3", "SPEC 2.4", SPEC.md; the method is docs/method.md, the machine
figures docs/benchmarks.md, DICOM docs/dicom.md), and none may narrate the work's history with
issue or stop numbers. CHANGELOG.md and docs/experiments/ are records of the past by design.
"""

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HISTORY_RECORDS = ("CHANGELOG.md", "LICENSE", "docs/experiments/")
THIS_FILE = Path(__file__).resolve().relative_to(REPO).as_posix()  # its examples are hits
OUTSIDE_REFERENCE = re.compile(r"\bSPEC\b")  # upper case, a word of its own: ASPECT_MODES is not one
NARRATION = re.compile(r"\b(?:stop|issue)s?\s+#?\d+\b", re.IGNORECASE)


def tracked_text_files() -> dict[str, str]:
    """Every git-tracked file outside the history records that is text, by its path."""
    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    listed = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z"], capture_output=True, check=True)
    texts = {}
    for name in listed.stdout.decode().split("\0"):
        path = REPO / name
        if not name or name.startswith(HISTORY_RECORDS) or name == THIS_FILE or not path.is_file():
            continue
        data = path.read_bytes()
        if b"\0" in data[:8192]:
            continue  # binary
        try:
            texts[name] = data.decode("utf-8")
        except UnicodeDecodeError:
            continue  # binary
    return texts


def hits(text: str) -> list[str]:
    """``line: text`` of every line that cites the outside reference or narrates history."""
    return [
        f"{number}: {line.strip()}"
        for number, line in enumerate(text.splitlines(), 1)
        if OUTSIDE_REFERENCE.search(line) or NARRATION.search(line)
    ]


def test_the_patterns_catch_what_they_are_for():
    assert hits("R as in SPEC section 2, step 3") and hits("# SPEC 2.4: a named finding")
    assert hits("see /work/shared/SPEC.md") and hits("(SPEC §8)")
    assert hits("64 / 128 / 192 until stop 36") and hits("The demo model (issue 10)")
    assert hits("as issue #4 asked") and hits("Stop 12 made it faster")
    assert not hits("ASPECT_MODES = ('squash', 'pad')")
    assert not hits("docs/method.md section 2, step 3; docs/benchmarks.md section 1")
    assert not hits("stop the edit before any denoising; an issue with the film")


def test_no_file_cites_an_outside_reference_or_narrates_history():
    texts = tracked_text_files()
    assert "docs/method.md" in texts and "Training/configs/demo.yaml" in texts
    found = {name: lines for name, text in texts.items() if (lines := hits(text))}
    assert not found, found
