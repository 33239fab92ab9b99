"""The module's scene layer against a real MRML scene (PyPI's slicer-core)."""

import numpy as np
import pytest

import slicer  # PyPI slicer-core, installed by the test extra

from InstructX2XModuleLib import scene as layer


@pytest.fixture
def mrml():
    scene = slicer.vtkMRMLScene()
    layer.prepare_scene(scene)
    return scene


def film(rows=40, columns=30):
    yy, xx = np.mgrid[0:rows, 0:columns]
    return (1000 + 500 * np.sin(yy / 5.0) * np.cos(xx / 4.0)).astype(np.int16)


def test_png_radiograph_gets_the_pa_orientation_and_round_trips(mrml):
    pixels = film()
    volume = layer.array_to_volume(mrml, pixels, "chest")
    assert np.array_equal(layer.volume_to_array(volume), pixels.astype(np.float32))
    import vtk

    matrix = vtk.vtkMatrix4x4()
    volume.GetIJKToRASDirectionMatrix(matrix)
    assert [[matrix.GetElement(r, c) for c in range(3)] for r in range(3)] == \
        [list(row) for row in layer.PA_DIRECTIONS]


def test_results_keep_the_source_geometry_and_never_touch_it(mrml):
    source = layer.array_to_volume(mrml, film(), "chest")
    source.SetSpacing(0.143, 0.143, 1.0)
    source.SetOrigin(10.0, -20.0, 0.0)
    before = layer.volume_to_array(source).copy()
    edited = before + 1
    guidance = np.linspace(0, 1, before.size, dtype=np.float32).reshape(before.shape)
    mask = guidance > 0.5
    nodes = layer.import_result(mrml, source, edited, guidance, mask, "edit 1")
    for node in nodes.values():
        assert node.GetSpacing() == source.GetSpacing() and node.GetOrigin() == source.GetOrigin()
    assert np.array_equal(layer.volume_to_array(nodes["counterfactual"]), edited)
    assert np.array_equal(layer.volume_to_array(nodes["mask"]) > 0, mask)
    assert np.array_equal(layer.volume_to_array(nodes["difference"]), edited - before)
    assert nodes["mask"].IsA("vtkMRMLLabelMapVolumeNode")
    colors = mrml.GetNodeByID(nodes["guidance"].GetDisplayNode().GetColorNodeID())
    assert colors.IsA("vtkMRMLColorTableNode")
    assert "SYNTHETIC" in nodes["counterfactual"].GetName()
    assert np.array_equal(layer.volume_to_array(source), before)


def test_painted_segment_becomes_a_mask_on_the_radiograph_grid(mrml):
    source = layer.array_to_volume(mrml, film(), "chest")
    painted = np.zeros((40, 30), np.uint8)
    painted[5:20, 3:12] = 1
    labelmap = layer.array_to_volume(mrml, painted, "paint", source, labelmap=True)
    segmentation = mrml.AddNewNodeByClass("vtkMRMLSegmentationNode", "masks")
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(source)
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, segmentation)
    segment_id = segmentation.GetSegmentation().GetNthSegmentID(0)
    mask = layer.segment_to_mask(segmentation, segment_id, source)
    assert mask.shape == (40, 30) and np.array_equal(mask, painted > 0)
    assert mrml.GetFirstNodeByName("__instructx2x_export") is None  # nothing left behind


@pytest.mark.parametrize("case,message", [
    ("no volume", "no scalar volume is selected"),
    ("3-D volume", "has 3 slices"),
    ("wrong grid", "does not match the radiograph's grid"),
    ("missing segment", "does not exist; paint a region first"),
])
def test_bad_scene_input_gets_a_clear_message(mrml, case, message):
    import vtk

    source = layer.array_to_volume(mrml, film(), "chest")
    with pytest.raises(layer.SceneError, match=message):
        if case == "no volume":
            layer.volume_to_array(None)
        elif case == "3-D volume":
            image = vtk.vtkImageData()
            image.SetDimensions(4, 4, 3)
            image.AllocateScalars(vtk.VTK_SHORT, 1)
            volume = mrml.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "ct")
            volume.SetAndObserveImageData(image)
            layer.volume_to_array(volume)
        elif case == "wrong grid":
            layer.array_to_volume(mrml, np.zeros((10, 10)), "mask", source)
        else:
            segmentation = mrml.AddNewNodeByClass("vtkMRMLSegmentationNode")
            layer.segment_to_mask(segmentation, "nope", source)


def test_the_job_built_from_the_scene_is_one_the_worker_accepts(mrml, tmp_path):
    """A PNG-built radiograph with a painted edit mask and a keep mask: the job validates and
    prepares in the library (everything the worker checks before loading a model)."""
    from instructx2x.jobs import EditJob, prepare

    source = layer.array_to_volume(mrml, film(), "chest")
    edit = np.zeros((40, 30), bool)
    edit[5:20, 3:12] = True
    keep = np.zeros((40, 30), bool)
    keep[30:, :] = True
    job = layer.build_job(source, "edit", {"instruction": "Add the finding of left pleural effusion",
                                           "region_mode": "prior", "tau": 0.2}, tmp_path, edit, keep)
    prepared = prepare(EditJob.from_dict({**job, "command": "edit"}))
    assert prepared.images[0].pixels.shape == (40, 30)
    assert np.array_equal(prepared.mask, edit) and np.array_equal(prepared.keep_mask, keep)
    # intensities keep their order through the 16-bit PNG
    order = np.argsort(layer.volume_to_array(source).ravel(), kind="stable")
    assert np.all(np.diff(prepared.images[0].pixels.ravel()[order]) >= 0)
    with pytest.raises(layer.SceneError, match="the mask is 10x10 but the radiograph is 40x30"):
        layer.build_job(source, "edit", {"instruction": "Add edema"}, tmp_path / "bad", np.ones((10, 10), bool))


def test_a_volume_loaded_from_dicom_sends_its_file(mrml, tmp_path):
    source = layer.array_to_volume(mrml, film(), "chest")
    original = tmp_path / "source.dcm"
    original.write_bytes(b"dicom")
    source.SetAttribute("DICOM.instanceUIDs", "1.2.3.4")
    job = layer.build_job(source, "edit", {"instruction": "Add edema"}, tmp_path / "job",
                          dicom_file_for={"1.2.3.4": str(original)}.get)
    assert job["input"] == str(original) and not (tmp_path / "job" / "input.png").exists()
