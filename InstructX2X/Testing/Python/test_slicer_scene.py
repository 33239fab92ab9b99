"""The module's scene layer against a real MRML scene (PyPI's slicer-core)."""

import dataclasses

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
    assert [[matrix.GetElement(r, c) for c in range(3)] for r in range(3)] == [
        list(row) for row in layer.PA_DIRECTIONS
    ]


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


@pytest.mark.parametrize(
    "case,message",
    [
        ("no volume", "no scalar volume is selected"),
        ("3-D volume", "has 3 slices"),
        ("wrong grid", "does not match the radiograph's grid"),
        ("missing segment", "does not exist; paint a region first"),
    ],
)
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
    job = layer.build_job(
        source,
        "edit",
        {"instruction": "Add the finding of left pleural effusion", "region_mode": "prior", "tau": 0.2},
        tmp_path,
        edit,
        keep,
    )
    prepared = prepare(EditJob.from_dict({**job, "command": "edit"}))
    assert prepared.images[0].pixels.shape == (40, 30)
    assert np.array_equal(prepared.mask, edit) and np.array_equal(prepared.keep_mask, keep)
    # intensities keep their order through the 16-bit PNG
    order = np.argsort(layer.volume_to_array(source).ravel(), kind="stable")
    assert np.all(np.diff(prepared.images[0].pixels.ravel()[order]) >= 0)
    with pytest.raises(layer.SceneError, match="the mask is 10x10 but the radiograph is 40x30"):
        layer.build_job(
            source, "edit", {"instruction": "Add edema"}, tmp_path / "bad", np.ones((10, 10), bool)
        )


def test_a_volume_loaded_from_dicom_sends_its_file(mrml, tmp_path):
    source = layer.array_to_volume(mrml, film(), "chest")
    original = tmp_path / "source.dcm"
    original.write_bytes(b"dicom")
    source.SetAttribute("DICOM.instanceUIDs", "1.2.3.4")
    job = layer.build_job(
        source,
        "edit",
        {"instruction": "Add edema"},
        tmp_path / "job",
        dicom_file_for={"1.2.3.4": str(original)}.get,
    )
    assert job["input"] == str(original) and not (tmp_path / "job" / "input.png").exists()


def test_the_editor_node_is_a_singleton_that_closing_the_scene_keeps(mrml):
    editor = layer.segment_editor_node(mrml)
    assert layer.segment_editor_node(mrml) is editor  # found again, not added twice
    assert mrml.GetNodesByClass("vtkMRMLSegmentEditorNode").GetNumberOfItems() == 1
    source = layer.array_to_volume(mrml, film(), "chest")
    editor.SetAndObserveSourceVolumeNode(source)
    mrml.Clear(0)
    assert mrml.IsNodePresent(editor) and layer.segment_editor_node(mrml) is editor
    assert editor.GetSourceVolumeNode() is None  # reset with the scene, kept as a node
    assert mrml.GetNodesByClass("vtkMRMLSegmentEditorNode").GetNumberOfItems() == 1


def test_the_segment_events_follow_additions_renames_and_removals(mrml):
    """The never-edit list is rebuilt on these events; each change of the list fires one."""
    segmentation = mrml.AddNewNodeByClass("vtkMRMLSegmentationNode", "masks")
    fired = []
    for event in layer.SEGMENT_EVENTS:
        segmentation.AddObserver(event, lambda caller, name: fired.append(layer.segment_choices(caller)))
    assert layer.segment_choices(None) == [] and layer.segment_choices(segmentation) == []
    first = segmentation.GetSegmentation().AddEmptySegment("", "edit")
    second = segmentation.GetSegmentation().AddEmptySegment("", "keep")
    segmentation.GetSegmentation().GetSegment(second).SetName("never edit")
    segmentation.GetSegmentation().RemoveSegment(first)
    assert fired[0] == [("edit", first)]
    assert fired[1] == [("edit", first), ("keep", second)]
    assert [("edit", first), ("never edit", second)] in fired
    assert fired[-1] == [("never edit", second)]


def test_result_layers_show_the_chosen_view_at_the_panels_opacity(mrml):
    source = layer.array_to_volume(mrml, film(), "chest")
    before = layer.volume_to_array(source)
    nodes = layer.import_result(
        mrml,
        source,
        before + 3,
        np.full(before.shape, 0.4, np.float32),
        np.ones(before.shape, bool),
        "edit 1",
    )

    def shown(results: dict, **options) -> layer.SliceLayers:
        """The layers for a result (``result_layers`` gives None only without one)."""
        layers = layer.result_layers(results, source, **options)
        assert layers is not None
        return layers

    after = shown(nodes, after=True, difference=False, opacity=0.8)
    assert (after.background, after.foreground, after.label) == (
        nodes["counterfactual"],
        nodes["guidance"],
        nodes["mask"],
    )
    assert after.foreground_opacity == 0.8
    assert shown(nodes, after=False, opacity=0.25).background is source
    assert shown(nodes, after=False, opacity=0.25).foreground_opacity == 0.25
    assert shown(nodes, difference=True).background is nodes["difference"]
    preview = {key: nodes[key] for key in ("guidance", "mask")}  # a preview edits nothing
    assert shown(preview, after=True, difference=True).background is source
    assert layer.result_layers({}, source) is None
    with pytest.raises(ValueError, match="opacity must be within"):
        layer.result_layers(nodes, source, opacity=1.5)


def test_closing_the_scene_ends_the_edit_state_and_the_next_film_edits():
    """A film, a preview and a running edit; the scene closes (Slicer's Close Scene is
    scene.Clear(0)); then a new film is edited by the same warm worker (untrained-tiny)."""
    from workers import poll_until

    from InstructX2XModuleLib.session import EditSession, MaskSource, PanelSettings

    scene = slicer.vtkMRMLScene()
    layer.prepare_scene(scene)
    editor = layer.segment_editor_node(scene)
    session = EditSession(scene)
    settings = PanelSettings(
        instruction="Add the finding of left pleural effusion",
        model="untrained-tiny",
        device="cpu",
        scheduler="dpm++",
        precision="fp32",
        verify=False,
    )
    try:
        first = layer.array_to_volume(scene, film(72, 64).astype(np.float32), "first")
        segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "masks")
        segmentation.SetReferenceImageGeometryParameterFromVolumeNode(first)
        segmentation.GetSegmentation().AddEmptySegment("edit")
        editor.SetAndObserveSegmentationNode(segmentation)
        session.submit("preview", first, dataclasses.replace(settings, steps=2))
        poll_until(session, lambda e: any(x["event"] == "done" for x in e))
        assert session.preview_id is not None and session.results
        session.submit("edit", first, dataclasses.replace(settings, steps=400))
        poll_until(session, lambda e: any(x["event"] == "progress" for x in e))
        assert session.worker is not None and session.worker.process is not None
        worker = session.worker.process.pid

        scene.Clear(0)
        assert session.results == {} and session.preview_id is None and session.queue == []
        with pytest.raises(layer.SceneError, match="preview the guidance first"):
            session.request_rethreshold(0.5)
        events = poll_until(session, lambda e: any(x["event"] == "cancelled" for x in e))
        assert not any(x["event"] == "done" for x in events) and session.results == {}
        assert scene.GetNodesByClass("vtkMRMLScalarVolumeNode").GetNumberOfItems() == 0
        assert layer.segment_editor_node(scene) is editor and editor.GetSegmentationNode() is None

        second = layer.array_to_volume(scene, film(72, 64).astype(np.float32) + 100, "second")
        mask = np.zeros((72, 64), bool)
        mask[30:60, 34:60] = True
        session.submit(
            "edit",
            second,
            dataclasses.replace(settings, steps=2, mask_source=MaskSource.PAINTED),
            edit_mask=mask,
        )
        poll_until(session, lambda e: any(x["event"] == "done" for x in e))
        assert session.worker.process.pid == worker  # the model stayed loaded
        edited = layer.volume_to_array(session.results["counterfactual"])
        assert scene.IsNodePresent(session.results["counterfactual"])
        assert np.array_equal(edited[~mask], layer.volume_to_array(second)[~mask])
    finally:
        session.stop()
    scene.Clear(0)  # the stopped session no longer watches the scene
    assert session.results  # kept: nothing ran on the close
