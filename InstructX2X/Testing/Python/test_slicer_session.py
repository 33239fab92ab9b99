"""The panels' shared editing session: a real MRML scene, a real worker, the queue."""

from types import SimpleNamespace
from typing import Any, cast

import numpy as np
import pytest
import slicer
from workers import poll_until, radiograph, shared_worker

from instructx2x import backends
from instructx2x.errors import ParameterError
from InstructX2XModuleLib import scene as layer
from InstructX2XModuleLib.session import (
    Backend,
    DicomImportError,
    EditSession,
    MaskSource,
    Operation,
    PanelSettings,
    Preset,
    compose_instruction,
    describe_instruction,
    import_into_dicom_database,
)
from InstructX2XModuleLib.worker import WorkerError, WorkerState


def settings(**overrides):
    values = dict(
        instruction="Add the finding of left pleural effusion",
        model="untrained-tiny",
        device="cpu",
        scheduler="dpm++",
        precision="fp32",
        steps=2,
        verify=False,
    )
    return PanelSettings(**{**values, **overrides})


def test_preview_rethreshold_and_queued_edit_land_in_the_scene(session):
    volume = radiograph(session.scene)
    before = layer.volume_to_array(volume).copy()
    mask = np.zeros((72, 64), bool)
    mask[30:60, 34:60] = True
    preview = session.submit("preview", volume, settings())
    edit = session.submit("edit", volume, settings(mask_source=MaskSource.PAINTED), edit_mask=mask)
    assert session.queue_position(preview) == 0 and session.queue_position(edit) == 1  # worker still starting
    events = poll_until(session, lambda e: sum(x["event"] == "done" for x in e) == 2)
    assert [e["id"] for e in events if e["event"] == "done"] == ["1", "2"]
    assert session.queue_position(edit) == 0 and not session.busy
    # the edit's region is the one shown: tau re-cuts a preview only while it is the result
    assert not session.has_preview
    with pytest.raises(layer.SceneError, match="preview the guidance first"):
        session.request_rethreshold(0.5)
    edited = layer.volume_to_array(session.results["counterfactual"])
    assert np.array_equal(edited[~mask], before[~mask]) and not np.array_equal(edited[mask], before[mask])
    assert before.min() <= edited.min() and edited.max() <= before.max()  # the volume's own values
    assert np.array_equal(layer.volume_to_array(volume), before)
    assert "SYNTHETIC" in session.results["counterfactual"].GetName()

    session.submit("preview", volume, settings())
    poll_until(session, lambda e: any(x["event"] == "done" for x in e))
    assert session.has_preview and "counterfactual" not in session.results
    low = layer.volume_to_array(session.results["mask"]).mean()
    session.rethreshold(0.9)
    poll_until(session, lambda e: any(x["event"] == "done" for x in e))
    assert layer.volume_to_array(session.results["mask"]).mean() < low
    assert "tau 0.9" in session.result_text


def test_a_series_is_one_job_whose_steps_show_one_at_a_time_over_one_region(session):
    """Levels that fill the instruction's level go to the worker as one series job; each step
    comes back as its own counterfactual, over the guidance and edit region the steps share,
    and selecting a step puts it in the results the panels show."""
    volume = radiograph(session.scene)
    before = layer.volume_to_array(volume).copy()
    session.submit("series", volume, settings(), series="small, moderate,large")
    events = poll_until(session, lambda e: any(x["event"] == "done" for x in e))
    assert [e["event"] for e in events].count("started") == 1  # one job
    done = next(e for e in events if e["event"] == "done")
    assert done["series"]["instructions"] == [
        f"Add the finding of {level} left pleural effusion" for level in ("small", "moderate", "large")
    ]
    series = session.series
    assert series is not None and series.labels == ["small", "moderate", "large"] and series.index == 0
    assert "a series of 3 steps (small, moderate, large)" in session.result_text
    region = layer.volume_to_array(session.results["mask"]) > 0
    assert region.any() and not region.all()
    shown = []
    for index, level in enumerate(series.labels):
        assert session.select_series_step(index) == f"Step {index + 1} of 3: {level}"
        counterfactual = session.results["counterfactual"]
        assert counterfactual is series.steps[index]["counterfactual"]
        assert f"step {index + 1} {level} (SYNTHETIC)" in counterfactual.GetName()
        assert session.results["guidance"] is series.shared["guidance"]  # one region for every step
        layers = layer.result_layers(session.results, volume)
        assert layers is not None and layers.background is counterfactual
        edited = layer.volume_to_array(counterfactual)
        assert np.array_equal(edited[~region], before[~region])  # the steps differ only inside it
        difference = layer.volume_to_array(session.results["difference"])
        assert np.allclose(difference, edited - before)
        shown.append(edited.copy())
    assert not np.array_equal(shown[0][region], shown[2][region])
    with pytest.raises(layer.SceneError, match="steps 1 to 3, not 4"):
        session.select_series_step(3)
    assert np.array_equal(layer.volume_to_array(volume), before)

    nodes = session.result_nodes()
    assert len(nodes) == 2 + 3 * 2  # the shared guidance and region, each step's two volumes
    session.submit("preview", volume, settings())
    poll_until(session, lambda e: any(x["event"] == "done" for x in e))
    assert session.series is None and not any(session.scene.IsNodePresent(node) for node in nodes)
    with pytest.raises(layer.SceneError, match="not a series"):
        session.select_series_step(0)


@pytest.mark.parametrize(
    "instruction, series, message",
    [
        ("Add the finding of left pleural effusion", " , ", "type the series' steps"),
        ("Add the finding of left pleural effusion", "moderate", "at least two steps"),
        ("Add the finding of left pleural effusion", "small, mild", "one grade"),
        ("Add the finding of left pleural effusion", "small, huge", "is no severity grade|is a level"),
        ("Remove the finding of edema", "mild, severe", "an instruction whose level they fill"),
        ("", "mild, severe", "type the instruction first"),
        (
            "",
            "Add the finding of mild edema; Add the finding of severe cardiomegaly",
            "has finding cardiomegaly, step 1 edema",
        ),
        ("Change the level of edema from mild to severe", "moderate, mild", "to the level they start|from"),
    ],
)
def test_a_series_the_worker_would_refuse_is_refused_before_anything_is_queued(
    session, instruction, series, message
):
    volume = radiograph(session.scene)
    with pytest.raises(ParameterError, match=message):
        session.submit("series", volume, settings(instruction=instruction), series=series)
    assert session.worker is None and session.queue == [] and list(session.folder.iterdir()) == []


def test_a_saved_result_folder_opens_again_after_the_session(session, tmp_path):
    volume = radiograph(session.scene)
    with pytest.raises(layer.SceneError, match="no result to save yet"):
        session.save_result(tmp_path)
    mask = np.zeros((72, 64), bool)
    mask[30:60, 34:60] = True
    session.submit("edit", volume, settings(mask_source=MaskSource.PAINTED), edit_mask=mask)
    poll_until(session, lambda e: any(x["event"] == "done" for x in e))
    edited = layer.volume_to_array(session.results["counterfactual"]).copy()
    edit_region = layer.volume_to_array(session.results["mask"]) > 0
    saved = session.save_result(tmp_path)
    assert saved.parent == tmp_path and saved.name.startswith("chest-edit-")
    assert [p.name for p in tmp_path.iterdir()] == [saved.name]  # no staging left
    session.stop()  # the session's own folder goes; the saved one stays
    scene = slicer.vtkMRMLScene()
    layer.prepare_scene(scene)
    nodes = layer.import_saved_edit(scene, saved)
    reopened = layer.volume_to_array(nodes["counterfactual"])  # edited.png: the same picture, its own scale
    assert reopened.shape == edited.shape and np.corrcoef(reopened.ravel(), edited.ravel())[0, 1] > 0.99
    assert np.array_equal(layer.volume_to_array(nodes["mask"]) > 0, edit_region)
    with pytest.raises(layer.SceneError, match="is not a folder"):
        session.save_result(tmp_path / "missing")


def test_cancel_drops_the_queue_and_stops_the_running_job(session):
    volume = radiograph(session.scene)
    session.submit("edit", volume, settings(steps=400))
    queued = session.submit("edit", volume, settings())
    poll_until(session, lambda e: any(x["event"] == "progress" for x in e))
    assert session.queue_position(queued) == 1
    session.cancel()
    events = poll_until(session, lambda e: any(x["event"] == "cancelled" for x in e))
    assert not any(x["event"] == "done" for x in events) and not session.busy
    assert session.results == {}


def test_bad_settings_are_refused_before_anything_is_queued(session):
    volume = radiograph(session.scene)
    with pytest.raises(layer.SceneError, match="paint the region"):
        session.submit("edit", volume, settings(mask_source=MaskSource.PAINTED_AND_PRIOR))
    with pytest.raises(ValueError, match="tau"):
        session.submit("edit", volume, settings(tau=1.5))
    with pytest.raises(layer.SceneError, match="does not match the radiograph's grid|the mask is"):
        session.submit(
            "edit", volume, settings(mask_source=MaskSource.PAINTED), edit_mask=np.ones((5, 5), bool)
        )
    assert session.worker is None and session.queue == [] and list(session.folder.iterdir()) == []
    unreachable = EditSession(session.scene, worker_socket=str(session.folder / "no-worker.sock"))
    with pytest.raises(WorkerError, match="cannot reach the shared worker at no-worker.sock"):
        unreachable.submit("edit", volume, settings())
    assert list(unreachable.folder.iterdir()) == []
    unreachable.stop()


def test_start_worker_waits_for_the_model_and_says_why_it_failed(session):
    with pytest.raises(WorkerError, match="model not found: no-such-model"):
        session.start_worker(settings(model="no-such-model"))
    assert session.worker is None and list(session.folder.iterdir()) == []
    model = session.start_worker(settings())
    assert model.name == "untrained-tiny"


def test_the_worker_reports_the_models_sampling_defaults(session, tmp_path):
    """The panels show the s_T / s_I an edit runs with when none are set: the model card's."""
    from instructx2x.loading import save_model
    from instructx2x.untrained import build_untrained_pipeline

    card = {
        "name": "carded",
        "trained": False,
        "few_step_solver_steps": 3,
        "guidance_scale": 3.0,
        "image_guidance_scale": 1.25,
    }
    model = save_model(build_untrained_pipeline(seed=3), tmp_path / "carded", card)
    assert session.model_defaults is None  # no worker yet
    session.start_worker(settings(model=str(model)))
    defaults = session.model_defaults
    assert defaults is not None
    assert (
        defaults.num_inference_steps,
        defaults.guidance_scale,
        defaults.image_guidance_scale,
    ) == (3, 3.0, 1.25)


def test_settings_and_instruction_helpers():
    assert settings(preset=Preset.PAPER).edit_parameters()["num_inference_steps"] == 100
    assert settings(mask_source=MaskSource.PAINTED).edit_parameters()["region_mode"] == "prior"
    assert "region_mode" not in settings(mask_source=MaskSource.PAINTED_AND_PRIOR).edit_parameters()
    # unset scales leave the choice to the worker's model (its card's s_T and s_I)
    assert not {"guidance_scale", "image_guidance_scale"} & set(settings().edit_parameters())
    assert (
        settings(guidance_scale=4.0, image_guidance_scale=0.0).edit_parameters()["image_guidance_scale"]
        == 0.0
    )
    assert (
        compose_instruction(Operation.CHANGE_LEVEL, "edema", "", "mild", "")
        == "Change the level of edema from mild to severe"
    )
    assert (
        compose_instruction(Operation.REMOVE, "pneumothorax", "right")
        == "Remove the finding of right pneumothorax"
    )
    assert (
        compose_instruction(Operation.ADD, "consolidation", "left", "", "moderate", zone="lower")
        == "Add the finding of moderate left lower zone consolidation"
    )  # cohort v2's wording
    assert (
        compose_instruction(Operation.ADD, "pleural effusion", "left", "", "moderate")
        == "Add the finding of moderate left pleural effusion"
    )
    described = describe_instruction("Add the finding of left pleural effusion")
    assert described.startswith("add: pleural effusion (left)") and "Region:" in described
    zoned = describe_instruction("Add the finding of moderate left lower zone consolidation")
    assert zoned.startswith("add: consolidation (left, lower zone)")


def test_the_panels_process_never_imports_torch():
    """The model lives in the worker: reading, checking and describing in a panel's process
    (Slicer's, or the web server's) must not pull torch in (about 500 MB per process)."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[3]
    code = (
        "import sys\n"
        "from InstructX2XModuleLib import scene, session\n"
        "from InstructX2XModuleLib.web.uploads import read_radiograph\n"
        f"loaded = read_radiograph([__import__('pathlib').Path({str(root / 'Resources/Samples/phantom_pa.dcm')!r})])\n"
        "session.describe_instruction('Add the finding of left pleural effusion')\n"
        "session.PanelSettings(instruction='Remove the finding of pneumothorax').edit_parameters()\n"
        "from instructx2x.parameters import EditParameters\n"
        "EditParameters(**session.PanelSettings(instruction='Add the finding of edema').edit_parameters())\n"
        "import instructx2x.outputs, instructx2x.dicom.pacs\n"
        "print(loaded.description, 'torch' in sys.modules)\n"
    )
    completed = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=root / "InstructX2X"
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert completed.stdout.split()[-1] == "False", completed.stdout


def test_two_panels_share_one_warm_worker_and_the_second_waits_its_turn(tmp_path):
    """Two sessions (two readers' panels) on ``instructx2x serve --socket``: one model, one
    job at a time; the second hears its place, and runs once the first is cancelled."""
    sessions = []
    with shared_worker(tmp_path / "shared.sock") as server:
        for _ in range(2):
            scene = slicer.vtkMRMLScene()
            layer.prepare_scene(scene)
            sessions.append(EditSession(scene, worker_socket=str(tmp_path / "shared.sock")))
        first, second = sessions
        first.submit("edit", radiograph(first.scene), settings(steps=400, model="ignored: the worker's"))
        poll_until(first, lambda e: any(x["event"] == "progress" for x in e))
        second.submit("edit", radiograph(second.scene), settings())
        queued = poll_until(second, lambda e: any(x["event"] == "queued" for x in e))
        assert [e["position"] for e in queued if e["event"] == "queued"] == [1]
        first.cancel()
        poll_until(first, lambda e: any(x["event"] == "cancelled" for x in e))
        poll_until(second, lambda e: any(x["event"] == "done" for x in e))
        assert "counterfactual" in second.results and first.results == {}
        for session in sessions:
            session.stop()  # hangs up; the shared worker serves on
        assert server.poll() is None


def test_the_paper_preset_loads_ddim_whatever_the_device(session):
    """ "paper (DDIM 100 steps)": on a CPU, where "auto" means DPM-Solver++, the worker still
    samples with DDIM (its default step count says which sampler it loaded: DDIM's 100, a
    few-step solver's 3)."""
    paper = settings(preset=Preset.PAPER, scheduler="auto", steps=0)
    assert paper.sampler() == "ddim" and paper.edit_parameters()["num_inference_steps"] == 100
    assert settings(scheduler="unipc").sampler() == "unipc"  # the fast preset keeps the choice
    session.start_worker(paper)
    assert session.model_defaults.num_inference_steps == 100


def test_a_tau_asked_for_while_busy_waits_and_the_last_one_is_applied(session):
    """A slider dragged while the worker re-cuts: the values in between are dropped, the
    last is applied once the worker is idle."""
    volume = radiograph(session.scene)
    with pytest.raises(layer.SceneError, match="preview the guidance first"):
        session.request_rethreshold(0.3)
    session.submit("preview", volume, settings())
    poll_until(session, lambda e: any(x["event"] == "done" for x in e))
    assert session.request_rethreshold(0.2) is True  # sent: the worker is busy with it
    assert session.request_rethreshold(0.5) is False and session.request_rethreshold(0.9) is False
    assert session.pending_tau == 0.9
    events = poll_until(session, lambda e: sum(x["event"] == "done" for x in e) == 2 and not session.busy)
    assert [e["tau"] for e in events if e["event"] == "done"] == [0.2, 0.9]
    assert session.pending_tau is None and "tau 0.9" in session.result_text


def written_series(folder):
    """Two DICOM files (the phantom and a copy with its own SOP instance UID)."""
    from pathlib import Path

    import pydicom

    sample = Path(__file__).resolve().parents[3] / "Resources" / "Samples" / "phantom_pa.dcm"
    folder.mkdir()
    dataset = pydicom.dcmread(sample)
    dataset.save_as(folder / "a.dcm")
    dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    dataset.save_as(folder / "b.dcm")
    return [str(pydicom.dcmread(folder / name).SOPInstanceUID) for name in ("a.dcm", "b.dcm")]


class IndexingDatabase:
    """Stands in for Slicer's ctkDICOMDatabase (which needs the Slicer application): what an
    importer indexed, found by SOP instance UID as ``fileForInstance`` does."""

    def __init__(self, is_open: bool = True):
        self.files: dict[str, str] = {}
        self.isOpen = is_open

    def fileForInstance(self, uid):
        return self.files.get(uid, "")


def test_an_export_into_the_dicom_database_is_checked(tmp_path):
    """DICOMUtils.importDicom returns False on any failure: that, and a series missing from the
    database afterwards, are errors, never a reported success."""
    import pydicom

    uids = written_series(tmp_path / "series")
    database = IndexingDatabase()

    def importer(indexed: bool, result: bool):
        calls = []

        def import_dicom(folder):
            calls.append(folder)
            if indexed:
                for path in sorted((tmp_path / "series").glob("*.dcm")):
                    database.files[str(pydicom.dcmread(path).SOPInstanceUID)] = str(path)
            return result

        return import_dicom, calls

    failing, calls = importer(indexed=False, result=False)
    with pytest.raises(DicomImportError, match="did not take the series"):
        import_into_dicom_database(tmp_path / "series", database, failing)
    assert calls == [str(tmp_path / "series")]
    silent, _ = importer(indexed=False, result=True)
    with pytest.raises(DicomImportError, match="a.dcm, b.dcm not in the DICOM database"):
        import_into_dicom_database(tmp_path / "series", database, silent)
    unused, calls = importer(indexed=True, result=True)
    with pytest.raises(DicomImportError, match="Slicer has no DICOM database"):
        import_into_dicom_database(tmp_path / "series", None, unused)
    # slicer.dicomDatabase exists from the start, closed until the DICOM module opens one
    with pytest.raises(DicomImportError, match="Slicer has no DICOM database"):
        import_into_dicom_database(tmp_path / "series", IndexingDatabase(is_open=False), unused)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DicomImportError, match="empty holds no DICOM file"):
        import_into_dicom_database(tmp_path / "empty", database, unused)
    assert calls == []  # refused before anything was imported
    assert import_into_dicom_database(tmp_path / "series", database, unused) == uids


def test_a_result_for_a_radiograph_no_longer_in_the_scene_is_not_imported(session):
    """The radiograph removed while its edit runs: the edit finishes, nothing lands in the scene."""
    volume = radiograph(session.scene)
    session.submit("edit", volume, settings())
    session.scene.RemoveNode(volume)
    events = poll_until(session, lambda e: any(x["event"] == "done" for x in e))
    assert [e["event"] for e in events if e["event"] in ("done", "cancelled")] == ["done"]
    assert (
        session.results == {}
        and session.scene.GetNodesByClass("vtkMRMLScalarVolumeNode").GetNumberOfItems() == 0
    )


def test_the_backend_setting_picks_the_worker_and_a_missing_openvino_is_named(tmp_path, monkeypatch):
    """Advanced > Backend: a worker per backend (``serve --backend``), prepared with the job's
    settings; its ``ready`` says which runs the networks and why; without OpenVINO the panel
    says how it gets it, in its own words."""
    assert settings(backend=Backend.OPENVINO).worker_key() != settings().worker_key()
    scene = slicer.vtkMRMLScene()
    layer.prepare_scene(scene)
    prepared: list[Backend] = []
    session = EditSession(
        scene,
        prepare_worker=lambda chosen: prepared.append(chosen.backend),
        openvino_hint="the panel's way to OpenVINO",
    )
    try:
        assert session.worker_status == "No model loaded yet: the first Preview or Apply loads it."
        hidden = tmp_path / "hidden"
        (hidden / "openvino").mkdir(parents=True)
        (hidden / "openvino" / "__init__.py").write_text("raise ImportError('hidden by this test')\n")
        monkeypatch.setenv("PYTHONPATH", str(hidden))
        with pytest.raises(WorkerError) as refused:
            session.start_worker(settings(backend=Backend.OPENVINO))
        assert "not installed (or does not import): the panel's way to OpenVINO" in str(refused.value)
        assert "(or choose Backend: PyTorch)" in str(refused.value) and "pip" not in str(refused.value)
        monkeypatch.delenv("PYTHONPATH")
        monkeypatch.setenv("INSTRUCTX2X_CACHE", str(tmp_path / "cache"))
        assert session.start_worker(settings(backend=Backend.OPENVINO)).backend == "openvino"
        assert session.worker_status == (
            "Model untrained-tiny (float32) runs on OpenVINO: openvino as requested (converted on this first use)."
        )
        session.submit("preview", radiograph(session.scene), settings(backend=Backend.OPENVINO))
        poll_until(session, lambda e: any(x["event"] == "done" for x in e), timeout=600)
        assert session.has_preview and list((tmp_path / "cache" / "openvino").iterdir())
        model = session.start_worker(settings())  # auto: the tiny UNet runs on torch
        assert model.backend == "torch" and "1.4 M parameters" in model.backend_reason
        assert session.worker_status.startswith("Model untrained-tiny (float32) runs on PyTorch: auto: torch")
        assert prepared == [Backend.OPENVINO, Backend.OPENVINO, Backend.AUTO]
    finally:
        session.stop()


def test_the_worker_line_says_auto_s_reason_in_the_panels_words(monkeypatch):
    """Auto on an AMX CPU whose worker lacks OpenVINO runs PyTorch and says why: the panel's
    line names the panel's way to OpenVINO, not pip (the reason is the library's own)."""
    monkeypatch.setattr(backends, "cpu_kind", lambda: "amx")
    monkeypatch.setattr(backends, "openvino_available", lambda: False)
    name, reason = backends.resolve_backend("auto", "cpu", 10**9)
    assert name == "torch" and backends.OPENVINO_EXTRA in reason
    scene = slicer.vtkMRMLScene()
    session = EditSession(scene, openvino_hint="choose Backend: OpenVINO and press Preview")
    try:
        ready = {"event": "ready", "model": {"name": "big"}, "precision": {"dtype": "bfloat16"}}
        session.worker = cast(
            Any,
            SimpleNamespace(
                state=WorkerState.READY, info={**ready, "backend": {"name": name, "reason": reason}}
            ),
        )
        assert session.worker_status.startswith(
            "Model big (bfloat16) runs on PyTorch: auto: torch, OpenVINO ("
        )
        assert session.worker_status.endswith("is not installed: choose Backend: OpenVINO and press Preview.")
    finally:
        session.worker = None
        session.stop()


def test_an_unwritable_openvino_cache_is_said_and_pytorch_still_runs(session, tmp_path, monkeypatch):
    """A reading-room PC whose cache folder cannot be written: Backend: OpenVINO is refused
    before the model loads, in the panel's words; Backend: PyTorch edits as before."""
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    monkeypatch.setenv("INSTRUCTX2X_CACHE", str(blocked))
    with pytest.raises(WorkerError) as refused:
        session.start_worker(settings(backend=Backend.OPENVINO))
    assert f"the OpenVINO cache folder {blocked}/openvino is not writable" in str(refused.value)
    assert str(refused.value).endswith("set INSTRUCTX2X_CACHE to a writable folder, or use Backend: PyTorch.")
    assert session.worker is None and session.worker_status.startswith("No model loaded yet")
    assert session.start_worker(settings(backend=Backend.TORCH)).backend == "torch"
    session.submit("preview", radiograph(session.scene), settings(backend=Backend.TORCH))
    poll_until(session, lambda e: any(x["event"] == "done" for x in e))
    assert session.has_preview and blocked.read_text() == "not a folder"
