"""The browser panel as a user meets it: ``instructx2x-web`` on a free loopback port, driven by
Playwright in Debian's chromium (no browser download), stopped by its PID.

One walk through the workflow on the demo model: open the sample DICOM, type an instruction,
paint, preview, move tau, apply, watch the progress reach 100 %, see the overlay, cancel a
second run, download the series and validate it with dciodvfy. Screenshots go to
``out/test-artifacts/web`` (kept by CI). Runs in the web environment (``make test-web``).
"""

import io
import os
import re
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("trame_slicer")
playwright = pytest.importorskip("playwright.sync_api")
from dicom_factory import dciodvfy_errors, require_tool  # noqa: E402
from orthanc import free_port  # noqa: E402

pytestmark = pytest.mark.web

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "Resources" / "Samples" / "phantom_pa.dcm"
ARTIFACTS = ROOT / "out" / "test-artifacts" / "web"
INSTRUCTION = "Add the finding of moderate left pleural effusion"
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
                  "--disable-background-networking", "--disable-component-update"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The real command on a free port; its temporary files in a folder of the test's own."""
    temporary = tmp_path_factory.mktemp("server-tmp")
    port = free_port()
    log = tmp_path_factory.mktemp("server-log") / "server.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "InstructX2XModuleLib.web.app", "--model", "demo", "--device", "cpu",
         "--port", str(port)], stdout=log.open("w"), stderr=subprocess.STDOUT,
        env={**os.environ, "TMPDIR": str(temporary), "CUDA_VISIBLE_DEVICES": "-1"})
    started = time.monotonic()
    while "InstructX2X web panel: http://127.0.0.1" not in log.read_text():
        assert process.poll() is None, log.read_text()[-2000:]
        assert time.monotonic() - started < 60, "the server did not start within 60 s"
        time.sleep(0.2)
    yield {"url": f"http://127.0.0.1:{port}/", "process": process, "tmp": temporary, "log": log,
           "start_s": time.monotonic() - started}
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)


@pytest.fixture(scope="module")
def page(server):
    chromium = require_tool("chromium", "chromium")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with playwright.sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 900}, accept_downloads=True)
        page.set_default_timeout(60_000)
        page.goto(server["url"])
        page.get_by_test_id("apply").wait_for()
        yield page
        browser.close()


def text(page, test_id):
    return page.get_by_test_id(test_id).inner_text()


def wait_text(page, test_id, pattern, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if re.search(pattern, text(page, test_id)):
            return text(page, test_id)
        time.sleep(0.1)
    raise AssertionError(f"{test_id}: {text(page, test_id)!r} never matched {pattern!r}")


def warm_pixels(page) -> int:
    """Pixels of the slice view in the guidance map's warm colours (the grey film has none)."""
    from PIL import Image

    shot = np.asarray(Image.open(io.BytesIO(page.get_by_test_id("slice-view").screenshot())).convert("RGB"),
                      dtype=int)
    return int(((shot[..., 0] - shot[..., 2] > 80) & (shot[..., 0] > 150)).sum())


def test_the_whole_workflow_in_chromium(page, server, tmp_path):
    page.get_by_test_id("open-file").locator("input[type=file]").set_input_files(str(SAMPLE))
    page.get_by_text("CR 512 x 512").wait_for()
    page.screenshot(path=ARTIFACTS / "1-loaded.png")
    assert warm_pixels(page) == 0

    instruction = page.get_by_test_id("instruction").locator("input")
    instruction.fill(INSTRUCTION)
    instruction.press("Tab")
    wait_text(page, "parsed", r"add: pleural effusion \(left\)")

    page.get_by_test_id("mask-source").click()
    page.get_by_role("option", name="painted segment and prior").click()
    page.get_by_test_id("tool-paint").click()
    page.get_by_test_id("brush").get_by_role("slider").focus()
    for _ in range(25):
        page.keyboard.press("ArrowRight")  # 45 mm
    box = page.get_by_test_id("slice-view").bounding_box()
    x, y = box["x"] + box["width"] * 0.68, box["y"] + box["height"] * 0.70  # towards the patient's left base
    page.mouse.move(x, y)
    page.mouse.down()
    for step in range(16):
        page.mouse.move(x + 8 * step, y + (6 * step if step < 8 else 48 - 6 * (step - 8)))
        time.sleep(0.05)
    page.mouse.up()
    page.get_by_test_id("tool-none").click()

    page.get_by_test_id("preview").click()
    wait_text(page, "status", r"^Done")
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

    page.get_by_text("Advanced").click()
    steps = page.get_by_label("Steps (0: default)")
    steps.fill("300")
    steps.press("Tab")
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
    print(f"server ready in {server['start_s']:.1f} s; cancel answered in {cancel_s:.2f} s")


def test_a_bad_file_gets_its_message_in_the_page(page, tmp_path):
    bad = tmp_path / "report.dcm"
    bad.write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 16)
    page.get_by_test_id("open-file").locator("input[type=file]").set_input_files(str(bad))
    assert "report.dcm: missing SOPClassUID" in wait_text(page, "error", "report.dcm")
    page.screenshot(path=ARTIFACTS / "4-bad-file.png")


def test_stopping_the_server_removes_its_files_and_keeps_no_identifiers(server, page):
    process = server["process"]
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 0
    left = [p.name for p in server["tmp"].iterdir() if not p.name.startswith("torchinductor_")]
    assert left == []  # uploads, jobs, results and trame's own files (torch's compile cache is not ours)
    log = server["log"].read_text()
    import pydicom

    source = pydicom.dcmread(SAMPLE)
    for identifier in (str(source.PatientName), str(source.PatientID), "phantom_pa.dcm"):
        assert identifier not in log
