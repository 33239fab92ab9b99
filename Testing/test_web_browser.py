"""The browser panel as a user meets it: ``instructx2x-web`` on a free loopback port, driven by
Playwright in Debian's chromium (no browser download), stopped by its PID.

One walk through the workflow on the demo model: open the sample DICOM, type an instruction,
paint, preview, move tau, apply, watch the progress reach 100 %, see the overlay, cancel a
second run, download the series and validate it with dciodvfy. Screenshots go to
``out/test-artifacts/web`` (kept by CI). Runs in the web environment (``make test-web``).
"""

import json
import os
import re
import time
import zipfile

import numpy as np
import pytest

pytest.importorskip("trame_slicer")
pytest.importorskip("playwright.sync_api")
from dicom_factory import dciodvfy_errors, require_tool
from web_driver import (
    ROOT,
    SAMPLE,
    WebServer,
    chromium_page,
    new_page,
    open_file,
    segment_pixels,
    set_steps,
    text,
    type_instruction,
    view_pixels,
    wait_for,
    wait_text,
    warm_pixels,
)

pytestmark = pytest.mark.web

ARTIFACTS = ROOT / "out" / "test-artifacts" / "web"
INSTRUCTION = "Add the finding of moderate left pleural effusion"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = WebServer(tmp_path_factory.mktemp("web")).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def page(server):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with chromium_page(server.url, require_tool("chromium", "chromium")) as page:
        yield page


def test_the_whole_workflow_in_chromium(page, server, tmp_path):
    open_file(page, SAMPLE)
    page.get_by_text("CR 512 x 512").wait_for()
    page.screenshot(path=ARTIFACTS / "1-loaded.png")
    assert warm_pixels(page) == 0

    type_instruction(page, INSTRUCTION)
    wait_text(page, "parsed", r"add: pleural effusion \(left\)")

    page.get_by_test_id("mask-source").click()
    page.get_by_role("option", name="painted segment and prior").click()
    page.get_by_test_id("tool-paint").click()
    brush = page.get_by_test_id("brush").get_by_role("slider")
    for _ in range(25):  # to the slider itself: a key that reaches the slice view moves its slice
        brush.press("ArrowRight")  # 45 mm
    box = page.get_by_test_id("slice-view").bounding_box()
    x, y = box["x"] + box["width"] * 0.68, box["y"] + box["height"] * 0.70  # towards the patient's left base
    page.mouse.move(x, y)
    page.mouse.down()
    for step in range(16):
        page.mouse.move(x + 8 * step, y + (6 * step if step < 8 else 48 - 6 * (step - 8)))
        time.sleep(0.05)
    page.mouse.up()
    page.get_by_test_id("tool-none").click()
    # the view applies a stroke as it renders, after the events that made it: Preview reads the
    # segment once the stroke shows in the view, as a reader does
    wait_for(lambda: segment_pixels(page) > 0, "the painted stroke")

    page.get_by_test_id("preview").click()
    assert "user-defined edit mask" in wait_text(page, "status", r"^Done")  # the painted region went in
    assert page.get_by_test_id("progress-text").inner_text().startswith("100 %")
    page.get_by_test_id("tau").get_by_role("slider").focus()
    for _ in range(20):
        page.keyboard.press("ArrowRight")
    wait_text(page, "status", r"Edit region at tau 0\.3")

    page.get_by_test_id("apply").click()
    wait_text(page, "apply", "(?i)cancel", timeout=30)
    progress = wait_text(page, "progress-text", r"^100 %")
    wait_text(page, "status", r"^Done")
    assert "Step" in progress
    page.get_by_test_id("synthetic-banner").wait_for()
    time.sleep(1)  # the view streams the new layers
    page.screenshot(path=ARTIFACTS / "2-edited.png")
    assert warm_pixels(page) > 200

    set_steps(page, 300)
    from playwright.sync_api import expect

    from instructx2x.loading import MODEL_CARD_NAME, demo_model_path

    card_scale = f"{json.loads((demo_model_path() / MODEL_CARD_NAME).read_text())['guidance_scale']:g}"
    text_scale = page.get_by_test_id("guidance-scale").locator("input")
    expect(text_scale).to_be_disabled()  # the model's own s_T (its card's) until the user takes over
    expect(text_scale).to_have_value(card_scale)
    page.get_by_test_id("model-guidance").locator("input").click()
    expect(text_scale).to_be_enabled()
    text_scale.fill("9")
    page.get_by_test_id("model-guidance").locator("input").click()
    expect(text_scale).to_be_disabled()
    expect(text_scale).to_have_value(card_scale)  # ticked again: the model's own s_T, not the typed 9
    page.get_by_test_id("apply").click()
    wait_text(page, "progress-text", r"Step \d+ of 300")
    page.screenshot(path=ARTIFACTS / "3-running.png")
    started = time.monotonic()
    page.get_by_test_id("apply").click()  # now reads Cancel
    wait_text(page, "status", r"^Cancelled")
    cancel_s = time.monotonic() - started
    assert cancel_s < 10 and re.search("(?i)apply", text(page, "apply"))

    with page.expect_download() as download:
        page.get_by_test_id("download-dicom").click()
    archive = tmp_path / "series.zip"
    download.value.save_as(archive)
    with zipfile.ZipFile(archive) as files:
        files.extractall(tmp_path / "series")
    written = sorted((tmp_path / "series").iterdir())
    assert [p.name for p in written] == ["counterfactual.dcm", "edit_region_seg.dcm", "guidance_overlay.dcm"]
    for path in written:
        assert dciodvfy_errors(path) == [], path.name
    import pydicom

    source = pydicom.dcmread(SAMPLE)
    for path in written:
        dataset = pydicom.dcmread(path)
        assert dataset.StudyInstanceUID == source.StudyInstanceUID  # the same study
        if dataset.Modality != "SEG":
            assert dataset.ConversionType == "SYN" and "SYNTHETIC" in str(dataset.SeriesDescription).upper()
    print(f"server ready in {server.start_s:.1f} s; cancel answered in {cancel_s:.2f} s")


def test_a_series_is_applied_as_one_job_and_its_slider_steps_through_it(page, tmp_path):
    """After the workflow above (the sample open, a region painted): the Series field's levels
    as one job on the demo model; the slider puts each step's counterfactual in the view, under
    the guidance overlay the steps share; the series downloads as one DICOM series."""
    set_steps(page, 0)  # the model's own steps again
    type_instruction(page, "Add the finding of left pleural effusion")
    field = page.get_by_test_id("series").locator("input")
    field.fill("small, moderate, large")
    field.press("Tab")
    page.get_by_test_id("apply-series").click()
    wait_text(page, "status", r"^Done: a series of 3 steps \(small, moderate, large\)")
    assert text(page, "series-text") == "Step 1 of 3: small"
    time.sleep(1)  # the view streams the new layers
    shots = [view_pixels(page)]
    slider = page.get_by_test_id("series-step").get_by_role("slider")
    for number, level in ((2, "moderate"), (3, "large")):
        slider.focus()
        page.keyboard.press("ArrowRight")
        wait_text(page, "series-text", f"Step {number} of 3: {level}")
        wait_for(lambda: not np.array_equal(view_pixels(page), shots[-1]), f"step {number} in the view")
        time.sleep(1)
        shots.append(view_pixels(page))
        page.screenshot(path=ARTIFACTS / f"5-series-step-{number}.png")
        assert warm_pixels(page) > 200  # the overlay over every step
    changed = np.abs(shots[2] - shots[0]).max(axis=-1) > 8
    print(f"large against small: {changed.mean():.2%} of the view's pixels differ")
    assert changed.mean() > 0.001
    with page.expect_download() as download:
        page.get_by_test_id("download-dicom").click()
    archive = tmp_path / "series.zip"
    download.value.save_as(archive)
    with zipfile.ZipFile(archive) as files:
        names = sorted(files.namelist())
    assert names == [
        "edit_region_seg.dcm",
        "guidance_overlay.dcm",
        "step-01.dcm",
        "step-02.dcm",
        "step-03.dcm",
    ]


def test_choosing_openvino_in_the_page_starts_a_worker_on_it(page, tmp_path, monkeypatch):
    """Advanced > Backend on the tiny model, in a tab of its own on a second server: the page
    shows the worker the server started (auto keeps PyTorch for a small UNet, and says so), then
    the OpenVINO worker the choice starts, with why and where its networks came from; PyTorch
    again is one choice away."""
    monkeypatch.setenv("INSTRUCTX2X_CACHE", str(tmp_path / "cache"))  # the server's worker inherits it
    server = WebServer(tmp_path / "web", "untrained-tiny").start()
    tab = new_page(page.context.browser, server.url)
    try:
        tab.get_by_text("Advanced").click()
        wait_text(
            tab, "worker-status", r"^Model untrained-tiny \(float32\) runs on PyTorch: auto: torch, the UNet"
        )

        def choose(label: str) -> None:
            tab.get_by_test_id("backend").locator(".v-field").click()  # the field, not its hint
            tab.get_by_role("option", name=label, exact=True).click()

        choose("OpenVINO")
        shown = wait_text(tab, "worker-status", "runs on OpenVINO", timeout=300)
        assert shown == (
            "Model untrained-tiny (float32) runs on OpenVINO: openvino as requested (converted on this first use)."
        )
        tab.screenshot(path=ARTIFACTS / "6-openvino.png")
        assert list((tmp_path / "cache" / "openvino").iterdir())  # its converted networks
        choose("PyTorch")
        wait_text(tab, "worker-status", r"runs on PyTorch: torch as requested\.$")
        assert tab.get_by_test_id("error").count() == 0  # no error shown on the way
    finally:
        tab.close()
        assert server.stop() == 0


def test_a_bad_file_gets_its_message_in_the_page(page, tmp_path):
    bad = tmp_path / "report.dcm"
    bad.write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 16)
    open_file(page, bad)
    assert "report.dcm: missing SOPClassUID" in wait_text(page, "error", "report.dcm")
    page.screenshot(path=ARTIFACTS / "4-bad-file.png")


def test_stopping_the_server_removes_its_files_and_keeps_no_identifiers(server, page):
    assert server.stop() == 0
    left = [p.name for p in server.tmp.iterdir() if not p.name.startswith("torchinductor_")]
    assert left == []  # uploads, jobs, results and trame's own files (torch's compile cache is not ours)
    log = server.log.read_text()
    import pydicom

    source = pydicom.dcmread(SAMPLE)
    for identifier in (str(source.PatientName), str(source.PatientID), "phantom_pa.dcm"):
        assert identifier not in log


def test_an_exposed_server_warns_and_a_large_upload_is_refused_in_the_page(page, tmp_path):
    """--host beyond loopback prints a warning; an upload over --max-upload-mb is refused by
    the page before a byte is sent."""
    server = WebServer(tmp_path, "untrained-tiny", "--host", "0.0.0.0", "--max-upload-mb", "1").start()
    try:
        log = server.log.read_text()
        assert "WARNING: listening on 0.0.0.0" in log and "reverse proxy with TLS and a login" in log
        assert f"InstructX2X web panel: http://127.0.0.1:{server.port}/?token={server.token}" in log
        large = tmp_path / "large.png"
        large.write_bytes(b"\x89PNG" + bytes(2 * 2**20))
        tab = new_page(page.context.browser, server.url)  # the module's browser, another server
        open_file(tab, large)
        assert wait_text(tab, "error", "limit") == "The upload is 2.0 MB; the limit is 1 MB."
        tab.close()
        assert not any(server.tmp.rglob("large.png"))  # never sent
    finally:
        assert server.stop() == 0


@pytest.mark.parametrize(
    "options,message",
    [
        (["--model", "no-such-model"], "model not found: no-such-model"),
        (["--worker-socket", "/nonexistent/worker.sock"], "cannot reach the shared worker at worker.sock"),
        (["--port", "BUSY"], "Address already in use); choose another --port"),
        (["--max-upload-mb", "0"], "must be a whole number of MB >= 1"),
        (["--token-file", "SHORT"], "the token in token.txt has 5 characters; use at least 32"),
        (["--token-file", "/nonexistent/token.txt"], "cannot read the token file token.txt"),
        (["--origin", "evil.example"], "--origin must read SCHEME://HOST[:PORT]"),
        (["--pacs", "ORTHANC@127.0.0.1:4242"], "--pacs must read NAME=AET@HOST:PORT"),
        (["--pacs", "main=ORTHANC@127.0.0.1:99999"], "C-STORE port must lie in 1-65535"),
    ],
)
def test_a_bad_start_says_why_and_leaves_nothing(tmp_path, options, message):
    """Checked before the page is served: the model (it loads first), the shared worker, the
    address, the options; exit code 2, one line, no temporary folder left."""
    import socket
    import subprocess
    import sys

    (tmp_path / "token.txt").write_text("short\n")
    with socket.create_server(("127.0.0.1", 0)) as busy:
        options = [
            str(busy.getsockname()[1]) if o == "BUSY" else str(tmp_path / "token.txt") if o == "SHORT" else o
            for o in options
        ]
        completed = subprocess.run(
            [
                sys.executable,
                "-m",
                "InstructX2XModuleLib.web.app",
                "--device",
                "cpu",
                "--port",
                "0",
                *options,
            ],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "TMPDIR": str(tmp_path)},
        )
    assert completed.returncode == 2 and message in completed.stderr, completed.stderr[-1500:]
    assert "Traceback" not in completed.stderr
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(("instructx2x-", "tmp"))]
