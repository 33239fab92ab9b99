"""Fixtures for the module's and the panels' tests."""

import pytest


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
