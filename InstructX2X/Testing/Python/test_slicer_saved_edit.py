"""Reopening a saved edit: a result folder written by a real edit back as MRML nodes, with
pydicom alone (Slicer's DICOM browser cannot load the SEG of a radiograph)."""

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
import slicer
from workers import poll_until

from InstructX2XModuleLib import scene as layer
from InstructX2XModuleLib.saved_edit import read_saved_edit
from InstructX2XModuleLib.session import EditSession, PanelSettings, dicom_pixels

ROOT = Path(__file__).resolve().parents[3]
SAMPLE = ROOT / "Resources" / "Samples" / "phantom_pa.dcm"
SLICER_PYTHON = Path(os.environ.get("INSTRUCTX2X_SLICER_PYTHON", "/root/.pyenv/versions/3.12.1/bin/python3"))
SLICER_CONSTRAINTS = Path(__file__).resolve().with_name("constraints-slicer-5.10.0.txt")
DICOM_FILES = ("counterfactual.dcm", "guidance_overlay.dcm", "edit_region_seg.dcm")


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """The worker's output folder of an edit of the DICOM phantom (untrained-tiny, 2 steps)."""
    scene = slicer.vtkMRMLScene()
    layer.prepare_scene(scene)
    session = EditSession(scene)
    try:
        volume = layer.array_to_volume(scene, dicom_pixels(SAMPLE), "phantom")
        volume.SetAttribute("DICOM.instanceUIDs", str(pydicom.dcmread(SAMPLE).SOPInstanceUID))
        session.submit(
            "edit",
            volume,
            PanelSettings(
                instruction="Add the finding of left pleural effusion",
                model="untrained-tiny",
                device="cpu",
                steps=2,
                verify=False,
            ),
            dicom_file_for=lambda uid: str(SAMPLE),
        )
        poll_until(session, lambda e: any(x["event"] == "done" for x in e), timeout=300)
        folder = tmp_path_factory.mktemp("saved") / "edit-1"
        assert session.output_folder is not None
        shutil.copytree(session.output_folder, folder)
    finally:
        session.stop()
    return folder


@pytest.fixture
def mrml():
    scene = slicer.vtkMRMLScene()
    layer.prepare_scene(scene)
    return scene


def subset(written, target, names):
    target.mkdir()
    for name in names:
        shutil.copy(written / name, target / name)
    return target


def node_ids(scene):
    return [scene.GetNthNode(index).GetID() for index in range(scene.GetNumberOfNodes())]


def spacing(node):
    return tuple(round(value, 6) for value in node.GetSpacing())


def test_the_workers_folder_comes_back_as_counterfactual_guidance_and_edit_region(written, mrml):
    assert {*DICOM_FILES, "guidance_map.npy", "edit_mask.npy", "guidance.png"} <= {
        p.name for p in written.iterdir()
    }
    nodes = layer.import_saved_edit(mrml, written)
    assert set(nodes) == {"counterfactual", "guidance", "mask"}
    edited = layer.volume_to_array(nodes["counterfactual"])
    original = dicom_pixels(SAMPLE)
    mask = np.load(written / "edit_mask.npy")
    assert 0 < mask.mean() < 1
    assert np.array_equal(edited[~mask], original[~mask]) and not np.array_equal(edited[mask], original[mask])
    assert "SYNTHETIC" in nodes["counterfactual"].GetName() and nodes["counterfactual"].GetName().startswith(
        "edit-1"
    )
    assert np.array_equal(layer.volume_to_array(nodes["guidance"]), np.load(written / "guidance_map.npy"))
    colors = mrml.GetNodeByID(nodes["guidance"].GetDisplayNode().GetColorNodeID())
    assert colors.IsA("vtkMRMLColorTableNode") and colors.GetName() == "edit-1 guidance colors"
    assert nodes["mask"].IsA("vtkMRMLLabelMapVolumeNode")
    assert np.array_equal(layer.volume_to_array(nodes["mask"]) > 0, mask)
    pixel_spacing = [float(v) for v in pydicom.dcmread(SAMPLE).ImagerPixelSpacing]
    for node in nodes.values():
        assert spacing(node) == (pixel_spacing[1], pixel_spacing[0], 1.0)
    layers = layer.result_layers(nodes, None)
    assert layers is not None
    assert (layers.background, layers.foreground, layers.label) == (
        nodes["counterfactual"],
        nodes["guidance"],
        nodes["mask"],
    )


def test_the_dicom_files_alone_come_back_with_the_seg_read_by_pydicom(written, mrml, tmp_path):
    """What a PACS or Slicer's database holds: the two Secondary Captures and the SEG."""
    folder = subset(written, tmp_path / "exported", [*DICOM_FILES, "provenance.json"])
    nodes = layer.import_saved_edit(mrml, folder)
    assert set(nodes) == {"counterfactual", "guidance", "mask"}
    assert np.array_equal(layer.volume_to_array(nodes["mask"]) > 0, np.load(written / "edit_mask.npy"))
    assert np.array_equal(
        layer.volume_to_array(nodes["counterfactual"]), dicom_pixels(written / "counterfactual.dcm")
    )
    overlay = nodes["guidance"]  # only the overlay picture was saved: shown as the RGB it is
    assert overlay.IsA("vtkMRMLVectorVolumeNode") and "RGB" in overlay.GetName()
    from vtk.util import numpy_support

    rgb = numpy_support.vtk_to_numpy(overlay.GetImageData().GetPointData().GetScalars()).reshape(-1, 3)
    assert np.array_equal(rgb, pydicom.dcmread(folder / "guidance_overlay.dcm").pixel_array.reshape(-1, 3))
    assert spacing(overlay) == spacing(nodes["counterfactual"]) != (1.0, 1.0, 1.0)


def test_a_preview_folder_of_pngs_brings_back_what_it_has(written, mrml, tmp_path):
    folder = subset(written, tmp_path / "preview", ["guidance.png", "edit_mask.png", "maps.json"])
    nodes = layer.import_saved_edit(mrml, folder, name="preview")
    assert set(nodes) == {"guidance", "mask"}
    assert (
        np.abs(layer.volume_to_array(nodes["guidance"]) - np.load(written / "guidance_map.npy")).max()
        <= 1 / 255
    )
    assert np.array_equal(layer.volume_to_array(nodes["mask"]) > 0, np.load(written / "edit_mask.npy"))
    assert spacing(nodes["mask"]) == spacing(nodes["guidance"]) == (0.7, 0.7, 1.0)  # from maps.json


def damage(written, tmp_path, how):
    folder = subset(written, tmp_path / how, [*DICOM_FILES, "guidance.png", "edit_mask.png"])
    if how == "truncated":
        data = (folder / "counterfactual.dcm").read_bytes()
        (folder / "counterfactual.dcm").write_bytes(data[: len(data) // 2])
    elif how == "not-dicom":
        (folder / "edit_region_seg.dcm").write_text("not a DICOM file\n")
    elif how == "sc-as-seg":
        shutil.copy(folder / "counterfactual.dcm", folder / "edit_region_seg.dcm")
    elif how == "other-study":
        seg = pydicom.dcmread(folder / "edit_region_seg.dcm")
        seg.StudyInstanceUID = pydicom.uid.generate_uid()
        seg.save_as(folder / "edit_region_seg.dcm")
        (folder / "guidance.png").unlink()
    elif how == "other-grid":
        from PIL import Image

        Image.new("L", (64, 64)).save(folder / "guidance.png")
    elif how == "gray-overlay":
        (folder / "guidance.png").unlink()
        shutil.copy(folder / "counterfactual.dcm", folder / "guidance_overlay.dcm")
    return folder


@pytest.mark.parametrize(
    "how, message",
    [
        (
            "truncated",
            r"counterfactual.dcm: its pixel data cannot be decoded|counterfactual.dcm is not a readable DICOM",
        ),
        ("not-dicom", r"edit_region_seg.dcm is not a readable DICOM file \(InvalidDicomError\)"),
        ("sc-as-seg", r"edit_region_seg.dcm is not a DICOM Segmentation"),
        (
            "other-study",
            r"counterfactual.dcm, guidance_overlay.dcm, edit_region_seg.dcm are of different studies",
        ),
        ("other-grid", r"guidance.png is 64x64 but counterfactual.dcm is 512x512: they are not of one edit"),
        ("gray-overlay", r"guidance_overlay.dcm is not an RGB picture"),
    ],
)
def test_a_damaged_folder_is_refused_whole_and_adds_nothing(written, mrml, tmp_path, how, message):
    folder = damage(written, tmp_path, how)
    before = node_ids(mrml)
    with pytest.raises(layer.SceneError, match=message):
        layer.import_saved_edit(mrml, folder)
    assert node_ids(mrml) == before


def test_a_folder_with_no_edit_or_no_folder_is_said(mrml, tmp_path):
    before = node_ids(mrml)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("")
    with pytest.raises(
        layer.SceneError, match="empty holds no saved edit \\(none of counterfactual.dcm, edited.png"
    ):
        layer.import_saved_edit(mrml, tmp_path / "empty")
    with pytest.raises(layer.SceneError, match="notes.txt is not a folder"):
        layer.import_saved_edit(mrml, tmp_path / "empty" / "notes.txt")
    assert node_ids(mrml) == before


def test_a_failure_while_adding_nodes_removes_those_added(written, mrml, monkeypatch):
    def failing(*args, **kwargs):
        raise RuntimeError("no memory for the labelmap")

    monkeypatch.setattr(layer, "_edit_region_volume", failing)
    before = node_ids(mrml)
    with pytest.raises(RuntimeError, match="no memory"):
        layer.import_saved_edit(mrml, written)
    assert node_ids(mrml) == before


@pytest.fixture(scope="module")
def pydicom_24(tmp_path_factory):
    """Python 3.12 with Slicer 5.10's numpy, pydicom 2.4.4 and Pillow (its SuperBuild's pins)."""
    if not SLICER_PYTHON.is_file():
        pytest.skip(
            f"{SLICER_PYTHON} (Python 3.12, as in Slicer 5.10) is missing: `pyenv install 3.12.1` "
            "or point INSTRUCTX2X_SLICER_PYTHON at a Python 3.12"
        )
    venv = tmp_path_factory.mktemp("pydicom-2.4") / "venv"
    python = venv / "bin" / "python"
    for command in (
        [str(SLICER_PYTHON), "-m", "venv", str(venv)],
        [
            str(python),
            "-m",
            "pip",
            "install",
            "-q",
            "-c",
            str(SLICER_CONSTRAINTS),
            "numpy",
            "pydicom",
            "pillow",
        ],
    ):
        result = subprocess.run(command, capture_output=True, text=True)
        assert result.returncode == 0, (command, result.stderr[-3000:])
    yield python
    shutil.rmtree(venv, ignore_errors=True)


READ_WITH_SLICERS_PYDICOM = """
import sys
import numpy as np
import pydicom
from InstructX2XModuleLib.saved_edit import read_saved_edit
edit = read_saved_edit(sys.argv[1])
np.savez(sys.argv[2], counterfactual=edit.counterfactual, guidance=edit.guidance, mask=edit.mask)
print(pydicom.__version__, sorted(edit.files.values()), edit.spacing_mm)
"""


def test_slicers_pydicom_reads_the_dicom_files_as_pydicom_3_does(written, tmp_path, pydicom_24):
    folder = subset(written, tmp_path / "exported", DICOM_FILES)
    result = subprocess.run(
        [str(pydicom_24), "-c", READ_WITH_SLICERS_PYDICOM, str(folder), str(tmp_path / "24.npz")],
        capture_output=True,
        text=True,
        cwd=ROOT / "InstructX2X",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[0] == "2.4.4"
    assert "guidance_overlay.dcm" in result.stdout and "edit_region_seg.dcm" in result.stdout
    here = read_saved_edit(folder)
    with np.load(tmp_path / "24.npz") as there:
        for part in ("counterfactual", "guidance", "mask"):
            assert there[part].dtype == getattr(here, part).dtype
            assert np.array_equal(there[part], getattr(here, part)), part
    assert pydicom.__version__.startswith("3.")


def test_the_counterfactual_comes_back_in_modality_values(written, mrml, tmp_path):
    """A film stored with a rescale (CR with slope and intercept): the volume holds
    stored x slope + intercept, as Slicer's DICOM reader makes it."""
    folder = subset(written, tmp_path / "rescaled", ["counterfactual.dcm"])
    dataset = pydicom.dcmread(folder / "counterfactual.dcm")
    dataset.RescaleSlope, dataset.RescaleIntercept, dataset.RescaleType = "2", "-1024", "US"
    dataset.save_as(folder / "counterfactual.dcm")
    nodes = layer.import_saved_edit(mrml, folder)
    assert set(nodes) == {"counterfactual"}
    assert np.array_equal(
        layer.volume_to_array(nodes["counterfactual"]), dataset.pixel_array.astype(np.float32) * 2 - 1024
    )
