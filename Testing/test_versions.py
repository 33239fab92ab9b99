"""One version for the repository: InstructX2XLib/src/instructx2x/_version.py.

The library's, the training package's and the panels' metadata read it at build time, and
CITATION.cff repeats it; every one of them must say the same.
"""

import importlib.metadata
import re
from pathlib import Path

import pytest
from setuptools.config.pyprojecttoml import read_configuration

import instructx2x
import instructx2x_train

REPO = Path(__file__).resolve().parents[1]
PROJECTS = {
    "instructx2x": "InstructX2XLib",
    "instructx2x-train": "Training",
    "instructx2x-panels": "InstructX2X",
}


def test_the_version_is_written_once_as_a_release_number():
    assert re.fullmatch(r"\d+\.\d+\.\d+", instructx2x.__version__)
    assert instructx2x_train.__version__ == instructx2x.__version__


@pytest.mark.parametrize("name, folder", PROJECTS.items())
def test_each_package_s_metadata_takes_the_library_s_version(name, folder):
    project = read_configuration(REPO / folder / "pyproject.toml", expand=True)["project"]
    assert project["name"] == name
    assert project["dynamic"] == ["version"]  # never a number of its own
    assert project["version"] == instructx2x.__version__


@pytest.mark.parametrize("name", ["instructx2x", "instructx2x-train"])
def test_the_installed_metadata_is_current(name):
    assert importlib.metadata.version(name) == instructx2x.__version__, (
        f"the installed {name} has another version: reinstall it (make install)"
    )


def test_the_citation_gives_the_same_version():
    declared = re.findall(r"^version:\s*(\S+)\s*$", (REPO / "CITATION.cff").read_text(), re.MULTILINE)
    assert declared == [instructx2x.__version__]
