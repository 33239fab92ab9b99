"""Testing/ collects on its own: the DICOM factory lives beside the library's tests."""

import sys

import pytest
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "InstructX2XLib" / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "InstructX2X"))  # the module's Lib


def pytest_configure(config):
    config.addinivalue_line("markers", "web: the browser panel (needs the web environment, make test-web)")
    config.addinivalue_line("markers", "xrv: torchxrayvision back-end (needs the eval environment, make test-eval)")


@pytest.fixture
def session():
    """A panels' editing session on a fresh MRML scene; stopped afterwards, its folder gone."""
    import slicer

    from InstructX2XModuleLib import scene as layer
    from InstructX2XModuleLib.session import EditSession

    scene = slicer.vtkMRMLScene()
    layer.prepare_scene(scene)
    session = EditSession(scene)
    yield session
    session.stop()
    assert not session.folder.exists()
