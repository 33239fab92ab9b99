"""The browser panel without a browser: its state machine on an offscreen slice view, with
synthetic interactor events for Paint, Erase and Scissors, and a real worker.

Runs in the web environment (``make test-web``, marker web); skipped where trame-slicer is
not installed (it pins an older slicer-core than the main environment's).
"""

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("trame_slicer")
from workers import poll_until, shared_worker

from InstructX2XModuleLib.web.panel import WebPanel
from InstructX2XModuleLib.web.uploads import UploadError, save_uploads

pytestmark = pytest.mark.web

SAMPLE = Path(__file__).resolve().parents[1] / "Resources" / "Samples" / "phantom_pa.dcm"
PNG_SAMPLE = Path(__file__).resolve().parents[1] / "Resources" / "Samples" / "chest_pa.png"
INSTRUCTION = "Add the finding of left pleural effusion"


@pytest.fixture
def panel():
    panel = WebPanel(model="untrained-tiny", device="cpu")
    yield panel
    panel.close()
    assert not panel.session.folder.exists()  # uploads, jobs and results all go with the session


def loaded(panel, path=SAMPLE):
    assert panel.loader.load([(path.name, path.read_bytes())]), panel.state.error
    view = panel.slicer_app.view_manager.get_slice_views()[0]
    view.render_window().SetSize(400, 400)
    view.reset_view()
    view.render()
    return view


def drag(view, points):
    interactor = view.interactor()
    for name, (x, y) in [
        ("MouseMoveEvent", points[0]),
        ("LeftButtonPressEvent", points[0]),
        *[("MouseMoveEvent", p) for p in points[1:]],
        ("LeftButtonReleaseEvent", points[-1]),
    ]:
        interactor.SetEventPosition(x, y)
        interactor.InvokeEvent(name)


def area(panel, segment="edit"):
    mask = panel.display.painted(segment)
    return 0 if mask is None else int(mask.sum())


def test_choosing_openvino_where_the_server_lacks_it_says_how_to_get_it(panel, tmp_path, monkeypatch):
    """The page's Backend choice starts its worker at once; a server environment without
    OpenVINO is told how to get it, in the page's words, and PyTorch stays the way to edit."""
    hidden = tmp_path / "hidden"
    (hidden / "openvino").mkdir(parents=True)
    (hidden / "openvino" / "__init__.py").write_text("raise ImportError('hidden by this test')\n")
    monkeypatch.setenv("PYTHONPATH", str(hidden))
    panel.state.backend = "OpenVINO"
    panel.jobs.on_backend(backend="OpenVINO")
    assert panel.state.worker_status == "Loading the model…"
    poll_until(panel.jobs, lambda e: panel.session.worker is None)
    assert panel.state.error == (
        "Backend: OpenVINO needs the OpenVINO runtime, which is not installed (or does not import): install it "
        "into the Python environment this server runs in (from a clone: pip install -c constraints.txt -e "
        "'./InstructX2XLib[openvino]') and start the server again (or choose Backend: PyTorch)."
    )
    assert panel.state.worker_status == "No model loaded yet: the first Preview or Apply loads it."
    monkeypatch.delenv("PYTHONPATH")
    panel.state.update({"backend": "PyTorch", "error": ""})
    panel.jobs.on_backend(backend="PyTorch")
    poll_until(panel.jobs, lambda e: any(x["event"] == "ready" for x in e))
    assert panel.state.worker_status == "Model untrained-tiny (float32) runs on PyTorch: torch as requested."
    assert panel.state.error == ""


def test_paint_erase_and_scissors_change_the_masks(panel):
    view = loaded(panel)
    assert panel.state.description.startswith("CR 512 x 512")
    panel.display.on_tool(tool="paint", segment="edit", brush_mm=30.0)
    drag(view, [(200 + 5 * i, 150) for i in range(12)])
    painted = area(panel)
    assert painted > 1000 and area(panel, "keep") == 0
    panel.display.on_tool(tool="erase", segment="edit", brush_mm=10.0)
    drag(view, [(225, 150 + 2 * i) for i in range(5)])
    erased = area(panel)
    assert 0 < erased < painted
    panel.display.on_tool(tool="scissors", segment="edit")
    drag(view, [(190, 120), (240, 120), (240, 180), (190, 180), (190, 120)])
    assert area(panel) < erased  # erase inside the outline
    panel.display.on_tool(tool="scissors", segment="keep", scissors_fill=True)
    drag(view, [(100, 300), (140, 300), (140, 340), (100, 340), (100, 300)])
    keep = panel.display.painted("keep")
    assert keep is not None and keep.sum() > 100
    rows, columns = np.nonzero(keep)
    assert rows.max() < 256 and columns.max() < 256  # upper left of the screen: upper left of the film


def test_preview_rethreshold_apply_and_cancel(panel):
    view = loaded(panel)
    panel.state.update({"instruction": INSTRUCTION, "steps": 2, "verify": False})
    assert panel.jobs.submit("preview")
    assert panel.state.running
    poll_until(panel.jobs, lambda e: any(x["event"] == "done" for x in e))
    assert panel.state.has_preview and not panel.state.has_result and not panel.state.running
    assert view.get_foreground_volume_id() == panel.session.results["guidance"].GetID()
    before = panel.session.results["mask"]
    panel.jobs.on_tau(tau=0.9)
    poll_until(panel.jobs, lambda e: any(x["event"] == "done" for x in e))
    assert panel.session.results["mask"] is not before and "tau 0.9" in panel.state.status

    panel.display.on_tool(tool="paint", segment="edit", brush_mm=40.0)
    drag(view, [(260 + 5 * i, 140) for i in range(10)])
    painted = panel.display.painted("edit")
    panel.state.mask_source = "painted segment"
    panel.jobs.apply_or_cancel()
    events = poll_until(panel.jobs, lambda e: any(x["event"] == "done" for x in e))
    assert [e["step"] for e in events if e["event"] == "progress"][-1] == 2 and panel.state.progress == 100
    assert panel.state.has_result and panel.state.has_dicom
    counterfactual = panel.session.results["counterfactual"]
    assert view.get_background_volume_id() == counterfactual.GetID()
    panel.state.show_after = False
    panel.display.on_layers()
    assert view.get_background_volume_id() == panel.display.volume.GetID()
    from InstructX2XModuleLib import scene

    edited, original = scene.volume_to_array(counterfactual), scene.volume_to_array(panel.display.volume)
    region = (
        scene.volume_to_array(panel.session.results["mask"]) > 0
    )  # the painted region at the model's grid
    assert (painted & region).sum() / (painted | region).sum() > 0.9
    assert np.array_equal(edited[~region], original[~region]) and not np.array_equal(edited, original)
    archive = panel.exports.result_archive("dicom")
    import io
    import zipfile

    names = zipfile.ZipFile(io.BytesIO(archive)).namelist()
    assert sorted(names) == ["counterfactual.dcm", "edit_region_seg.dcm", "guidance_overlay.dcm"]
    pictures = zipfile.ZipFile(io.BytesIO(panel.exports.result_archive("png"))).namelist()
    assert {"edited.png", "guidance_overlay.png", "edit_mask.png", "manifest.json"} <= set(pictures)

    panel.state.seed = "twelve"
    assert not panel.jobs.submit("edit") and panel.state.error == "Seed must be an integer, got 'twelve'."
    panel.state.seed = 0
    panel.state.steps = 400
    panel.jobs.apply_or_cancel()
    poll_until(panel.jobs, lambda e: any(x["event"] == "progress" for x in e))
    assert panel.state.running
    assert not panel.loader.load([(SAMPLE.name, SAMPLE.read_bytes())])  # the running job's film stays
    assert panel.state.error.startswith("a job is running on this radiograph")
    panel.jobs.apply_or_cancel()  # the Apply button reads Cancel while running
    poll_until(panel.jobs, lambda e: any(x["event"] == "cancelled" for x in e))
    assert not panel.state.running and panel.state.status.startswith("Cancelled")
    assert panel.session.results["counterfactual"] is counterfactual  # the last result stays


def test_a_series_is_one_job_and_its_slider_shows_each_step(panel):
    """Apply series sends the Series field's levels as one job (unverified, whatever the box
    says: verification checks one edit); the slider's step is the view's background, over the
    guidance map the steps share; a plain edit afterwards takes the slider away."""
    import io
    import zipfile

    view = loaded(panel)
    panel.state.update(
        {"instruction": INSTRUCTION, "series": "small, moderate, large", "steps": 2, "verify": True}
    )
    assert panel.jobs.submit("series"), panel.state.error
    assert panel.state.status == "Editing the series…"
    events = poll_until(panel.jobs, lambda e: any(x["event"] in ("done", "error") for x in e))
    assert [e["event"] for e in events].count("done") == 1, events
    assert panel.state.has_result and panel.state.series_count == 3
    assert panel.state.series_text == "Step 1 of 3: small"
    series = panel.session.series
    guidance = panel.session.results["guidance"].GetID()
    assert view.get_background_volume_id() == series.steps[0]["counterfactual"].GetID()
    for number, level in ((3, "large"), (2, "moderate")):
        panel.jobs.on_series_step(series_step=number)
        assert view.get_background_volume_id() == series.steps[number - 1]["counterfactual"].GetID()
        assert view.get_foreground_volume_id() == guidance
        assert panel.state.series_text == f"Step {number} of 3: {level}"
    names = zipfile.ZipFile(io.BytesIO(panel.exports.result_archive("dicom"))).namelist()
    assert sorted(names) == [
        "edit_region_seg.dcm",
        "guidance_overlay.dcm",
        "step-01.dcm",
        "step-02.dcm",
        "step-03.dcm",
    ]

    panel.state.series = "large"
    assert not panel.jobs.submit("series") and "at least two steps" in panel.state.error
    panel.state.verify = False
    assert panel.jobs.submit("edit")
    poll_until(panel.jobs, lambda e: any(x["event"] == "done" for x in e))
    assert panel.state.series_count == 0 and panel.session.series is None
    assert view.get_background_volume_id() == panel.session.results["counterfactual"].GetID()


def test_the_guidance_scales_are_the_models_until_the_user_sets_them(panel):
    assert panel.state.model_guidance
    assert (panel.controls.settings().guidance_scale, panel.controls.settings().image_guidance_scale) == (
        None,
        None,
    )
    panel.state.update({"model_guidance": False, "guidance_scale": 4, "image_guidance_scale": "2.5"})
    assert (panel.controls.settings().guidance_scale, panel.controls.settings().image_guidance_scale) == (
        4.0,
        2.5,
    )
    panel.state.image_guidance_scale = "lots"
    from instructx2x.errors import ParameterError

    with pytest.raises(ParameterError, match="Image guidance s_I must be a number"):
        panel.controls.settings()


def test_the_disabled_guidance_fields_show_the_models_own_scales(tmp_path):
    from instructx2x.loading import save_model
    from instructx2x.untrained import build_untrained_pipeline

    card = {"name": "carded", "trained": False, "guidance_scale": 3.0, "image_guidance_scale": 1.25}
    model = save_model(build_untrained_pipeline(seed=3), tmp_path / "carded", card)
    panel = WebPanel(model=str(model), device="cpu")
    try:
        panel.session.start_worker(panel.controls.settings())
        panel.jobs.show_model_defaults()  # what the command line does once the model is loaded
        assert (panel.state.guidance_scale, panel.state.image_guidance_scale) == (3.0, 1.25)
        panel.state.update({"model_guidance": False, "guidance_scale": 6})
        panel.jobs.show_model_defaults()  # the user's own values stay while the box is off
        assert panel.controls.settings().guidance_scale == 6.0
        panel.jobs.show_model_defaults(True)  # the box ticked again: the event carries its new value
        assert panel.state.guidance_scale == 3.0
        panel.state.update({"model_guidance": True, "guidance_scale": 6})
        panel.jobs.show_model_defaults()  # as on the worker's next ready event
        assert panel.state.guidance_scale == 3.0 and panel.controls.settings().guidance_scale is None
    finally:
        panel.close()


def test_the_structured_helper_writes_the_instruction_and_it_is_parsed_live(panel):
    panel.state.update(
        {
            "compose_operation": "Add",
            "compose_finding": "pleural effusion",
            "compose_side": "left",
            "compose_to": "moderate",
        }
    )
    panel.controls.compose()
    assert panel.state.instruction == "Add the finding of moderate left pleural effusion"
    panel.controls.on_instruction(instruction=panel.state.instruction)
    assert panel.state.parsed.startswith("add: pleural effusion (left)")
    assert "pleural effusion" in panel.state.findings and "moderate" in panel.state.levels
    panel.state.update({"compose_finding": "consolidation", "compose_zone": "lower"})
    panel.controls.compose()
    assert panel.state.instruction == "Add the finding of moderate left lower zone consolidation"
    panel.controls.on_instruction(instruction=panel.state.instruction)
    assert panel.state.parsed.startswith("add: consolidation (left, lower zone)")
    assert panel.state.zones == ["", "upper", "mid", "lower"]


def test_a_second_job_waits_with_its_position_shown(panel):
    loaded(panel)
    panel.state.update({"instruction": INSTRUCTION, "steps": 2, "verify": False})
    assert panel.jobs.submit("preview") and panel.state.queue_text == ""
    assert panel.jobs.submit("edit") and panel.state.queue_text == "Queued: 1 job(s) ahead."
    events = poll_until(panel.jobs, lambda e: sum(x["event"] == "done" for x in e) == 2)
    assert [e["id"] for e in events if e["event"] == "done"] == ["1", "2"]
    assert panel.state.queue_text == "" and panel.state.has_result and not panel.state.running


@pytest.mark.parametrize(
    "name,content,message",
    [
        ("notes.txt", b"hello", ".txt files are not radiographs"),
        (
            "broken.dcm",
            b"\0" * 128 + b"DICM" + b"\0" * 10,
            "broken.dcm: missing SOPClassUID is not a radiograph",
        ),
        ("empty.png", b"", "empty.png"),
    ],
)
def test_a_bad_upload_gets_its_message_and_changes_nothing(panel, name, content, message):
    view = loaded(panel)
    volume = panel.display.volume
    assert not panel.loader.load([(name, content)])
    assert message in panel.state.error and "Traceback" not in panel.state.error
    assert panel.display.volume is volume and view.get_background_volume_id() == volume.GetID()
    assert sorted(p.name for p in panel.session.folder.iterdir()) == ["upload-001"]


def test_a_png_is_shown_as_a_pa_film(panel):
    loaded(panel, PNG_SAMPLE)
    assert panel.state.description.startswith("PNG") and not panel.state.has_dicom
    from InstructX2XModuleLib import scene

    pixels = scene.volume_to_array(panel.display.volume)
    from PIL import Image

    assert np.array_equal(
        pixels, np.asarray(Image.open(PNG_SAMPLE).convert("L"), dtype=np.float32)
    ) or np.array_equal(pixels, np.asarray(Image.open(PNG_SAMPLE), dtype=np.float32))


def test_a_folder_opens_its_first_radiograph(panel):
    files = [
        ("a-report.dcm", b"\0" * 128 + b"DICM" + b"\0" * 16),
        ("notes", b"not dicom"),
        (SAMPLE.name, SAMPLE.read_bytes()),
    ]
    assert panel.loader.load(files), panel.state.error
    assert panel.state.has_dicom and panel.display.loaded.path.name == SAMPLE.name


def test_upload_limits(tmp_path):
    with pytest.raises(UploadError, match="limit is 1 MB"):
        save_uploads([("a.dcm", b"x" * (2 * 2**20))], tmp_path / "a", max_bytes=2**20)
    with pytest.raises(UploadError, match="characters"):
        save_uploads([("../../etc/passwd\x00.dcm", b"x")], tmp_path / "b")
    with pytest.raises(UploadError, match="same name"):
        save_uploads([("a/x.dcm", b"x"), ("b/x.dcm", b"y")], tmp_path / "c")
    assert list(tmp_path.iterdir()) == []


def test_test_connection_and_send_to_a_real_pacs(panel, tmp_path):
    """The PACS box: the server's named targets only; C-ECHO answers or says why not, then
    C-STORE of the series to Orthanc. An address a client writes opens no connection."""
    import asyncio
    import socket

    from orthanc import OrthancServer

    from InstructX2XModuleLib.web.pacs_targets import PacsTargets

    (tmp_path / "orthanc").mkdir()
    orthanc = OrthancServer(tmp_path / "orthanc").start()
    try:
        panel.exports.pacs_targets = PacsTargets.from_arguments(
            [
                f"main={orthanc.aet}@127.0.0.1:{orthanc.dicom_port}",
                f"wrong=WRONG@127.0.0.1:{orthanc.dicom_port}",
            ]
        )
        loaded(panel)
        panel.state.update({"instruction": INSTRUCTION, "steps": 2, "verify": False})
        panel.state.pacs_target = "main"
        asyncio.run(panel.exports.pacs("send"))
        assert panel.state.pacs_message == "Error: apply an edit to a DICOM radiograph first."
        asyncio.run(panel.exports.pacs("echo"))
        assert panel.state.pacs_message == f"{orthanc.aet} at 127.0.0.1:{orthanc.dicom_port} answers."
        panel.jobs.apply_or_cancel()
        poll_until(panel.jobs, lambda e: any(x["event"] == "done" for x in e))
        asyncio.run(panel.exports.pacs("send"))
        assert panel.state.pacs_message.startswith("Sent 3 objects") and orthanc.instance_count() == 3
        panel.state.pacs_target = "wrong"
        asyncio.run(panel.exports.pacs("echo"))
        assert "rejected or not answered" in panel.state.pacs_message
        with socket.create_server(("127.0.0.1", 0)) as listener:  # a port a client would like us to reach
            listener.settimeout(0.5)
            for typed in (f"127.0.0.1:{listener.getsockname()[1]}:ANY", "ANY@127.0.0.1:104", ""):
                panel.state.pacs_target = typed
                asyncio.run(panel.exports.pacs("send"))
                assert panel.state.pacs_message == "Error: choose one of the PACS this server names."
            with pytest.raises(TimeoutError):
                listener.accept()
        assert orthanc.instance_count() == 3
    finally:
        orthanc.stop()


def test_pacs_targets_come_only_from_the_servers_configuration(tmp_path):
    from instructx2x.errors import ParameterError
    from InstructX2XModuleLib.web.pacs_targets import PacsTargets

    config = tmp_path / "pacs.json"
    config.write_text('{"archive": "ARCHIVE@pacs.example.org:11112"}')
    targets = PacsTargets.from_arguments(["research=RESEARCH@[::1]:4242"], str(config))
    assert targets.names == ["archive", "research"] and targets.default == "archive"
    assert (targets.get("research").host, targets.get("research").port) == ("::1", 4242)
    with pytest.raises(ParameterError, match="names no PACS"):
        PacsTargets({}).get("archive")
    for entries, message in (
        (["a=AE@host"], "must read AET@HOST:PORT"),
        (["a=AE@h:1", "a=AE@h:2"], "given twice"),
        (["../x=AE@h:1"], "PACS name"),
        (["a=THIS_TITLE_IS_TOO_LONG@h:1"], "AET@HOST:PORT"),
    ):
        with pytest.raises(ParameterError, match=message):
            PacsTargets.from_arguments(entries)
    config.write_text("[1, 2]")
    with pytest.raises(ParameterError, match="JSON object"):
        PacsTargets.from_arguments([], str(config))


def test_a_page_on_a_shared_worker_shows_its_place_in_the_queue(tmp_path):
    """``--worker-socket``: another reader's job holds the one model; this page's edit waits
    with "1 job(s) ahead" and runs when that job ends."""
    from InstructX2XModuleLib.worker import WorkerClient, WorkerState

    path = tmp_path / "shared.sock"
    with shared_worker(path):
        other = WorkerClient("the worker's", socket_path=str(path))
        other.start()
        poll_until(other, lambda e: other.state is WorkerState.READY)
        other.submit(
            "edit",
            {
                "input": str(PNG_SAMPLE),
                "output": str(tmp_path / "other"),
                "parameters": {"instruction": INSTRUCTION, "num_inference_steps": 400},
            },
        )
        poll_until(other, lambda e: any(x["event"] == "progress" for x in e))
        panel = WebPanel(worker_socket=str(path))
        try:
            loaded(panel)
            panel.state.update({"instruction": INSTRUCTION, "steps": 2, "verify": False})
            assert panel.jobs.submit("edit")
            poll_until(panel.jobs, lambda e: any(x["event"] == "queued" for x in e))
            assert panel.state.queue_text == "Queued: 1 job(s) ahead." and panel.state.running
            other.cancel()
            poll_until(panel.jobs, lambda e: any(x["event"] == "done" for x in e))
            assert panel.state.queue_text == "" and panel.state.has_result
        finally:
            panel.close()
            other.shutdown()


OUT_OF_MEMORY_WORKER = """
import sys

import torch

from instructx2x.cli import main
from instructx2x.pipeline import InstructX2XPipeline


def out_of_memory(*_args, **_kwargs):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0)")


InstructX2XPipeline.__call__ = out_of_memory
sys.exit(main(sys.argv[1:]))
"""


def test_gpu_out_of_memory_in_the_worker_is_shown_as_what_to_do(panel):
    """The page's worker is the real one over stdio, its pipeline made to fail as a full GPU does."""
    import sys

    panel.session.executable = [sys.executable, "-c", OUT_OF_MEMORY_WORKER]
    loaded(panel)
    panel.state.update({"instruction": INSTRUCTION, "steps": 2, "verify": False})
    assert panel.jobs.submit("preview")
    poll_until(panel.jobs, lambda e: any(x["event"] == "error" for x in e))
    assert panel.state.status.startswith("Failed: out of memory on the device (CUDA out of memory.")
    assert "smaller resolution" in panel.state.status and "internal error" not in panel.state.status
    assert not panel.state.running and not panel.state.has_preview


def test_memory_exhaustion_in_the_page_is_a_resource_message_not_a_defect(panel, monkeypatch):
    from InstructX2XModuleLib.web import loading

    def exhausted(_paths):
        raise MemoryError()

    monkeypatch.setattr(loading, "read_radiograph", exhausted)
    assert not panel.loader.load([(SAMPLE.name, SAMPLE.read_bytes())])
    assert panel.state.error.startswith("out of memory: use a smaller resolution")
    assert not any(panel.session.folder.iterdir())
