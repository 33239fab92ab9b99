"""Start ``instructx2x-web`` and drive it in Debian's chromium: shared by the browser tests and
the browser panel's benchmark."""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from orthanc import free_port

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "Resources" / "Samples" / "phantom_pa.dcm"
READY = "InstructX2X web panel: http://"
# Debian's chromium, headless, with no traffic of its own (this machine's network is closed)
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-sync",
    "--disable-background-networking",
    "--disable-component-update",
]


class WebServer:
    """The real command on a free loopback port, its temporary files under ``tmp``; stopped by
    its PID with SIGTERM (as a service manager stops it)."""

    def __init__(self, folder: Path, model: str = "demo", *options: str) -> None:
        self.tmp, self.log = folder / "tmp", folder / "server.log"
        self.tmp.mkdir(parents=True)
        self.port = free_port()
        # the announced address, its token and the session cookie it gives, once started
        self.url, self.token, self.cookie = f"http://127.0.0.1:{self.port}/", "", ""
        self.command = [
            sys.executable,
            "-m",
            "InstructX2XModuleLib.web.app",
            "--model",
            model,
            "--device",
            "cpu",
            "--port",
            str(self.port),
            *options,
        ]
        self.process: subprocess.Popen | None = None
        self.start_s = float("nan")

    def start(self, timeout: float = 60) -> WebServer:
        started = time.monotonic()
        self.process = subprocess.Popen(
            self.command,
            stdout=self.log.open("w"),
            stderr=subprocess.STDOUT,
            env={**os.environ, "TMPDIR": str(self.tmp), "CUDA_VISIBLE_DEVICES": "-1"},
        )
        while READY not in self.log.read_text():
            if self.process.poll() is not None:
                raise RuntimeError(self.log.read_text()[-2000:])
            if time.monotonic() - started > timeout:
                raise TimeoutError(f"the server did not start within {timeout} s")
            time.sleep(0.05)
        self.start_s = time.monotonic() - started
        found = re.search(r"InstructX2X web panel: (\S+)", self.log.read_text())
        assert found is not None, "the server printed no address"
        self.url = found[1]  # its token included
        self.token = self.url.split("token=", 1)[1]
        self.cookie = session_cookie(self.url)
        return self

    def stop(self) -> int | None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            return self.process.wait(timeout=30)
        return self.process.returncode if self.process else None

    def rss_mb(self) -> dict:
        """Resident memory of the server and of its worker (the model's process)."""
        import psutil

        assert self.process is not None, "the server is not started"
        server = psutil.Process(self.process.pid)
        workers = server.children(recursive=True)
        return {
            "server_mb": server.memory_info().rss / 2**20,
            "worker_mb": sum(child.memory_info().rss for child in workers) / 2**20,
        }


def session_cookie(url: str) -> str:
    """The session cookie the announced address sets (its redirect is not followed)."""
    import urllib.error
    import urllib.request

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args, **kwargs):
            return None

    try:
        urllib.request.build_opener(NoRedirect).open(url, timeout=10)
    except urllib.error.HTTPError as redirect:
        header = redirect.headers.get("Set-Cookie", "")
        return header.split(";", 1)[0].split("=", 1)[1] if redirect.code == 302 and "=" in header else ""
    return ""


@contextmanager
def chromium_page(url: str, chromium: str):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS)
        try:
            yield new_page(browser, url)
        finally:
            browser.close()


def new_page(browser, url: str):
    """A tab on the panel, once its controls are there."""
    page = browser.new_page(viewport={"width": 1400, "height": 900}, accept_downloads=True)
    page.set_default_timeout(60_000)
    page.goto(url)
    page.get_by_test_id("apply").wait_for()
    return page


def text(page, test_id: str) -> str:
    return page.get_by_test_id(test_id).inner_text()


def wait_text(page, test_id: str, pattern: str, timeout: float = 120, poll_s: float = 0.1) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        shown = text(page, test_id)
        if re.search(pattern, shown):
            return shown
        time.sleep(poll_s)
    raise AssertionError(f"{test_id}: {text(page, test_id)!r} never matched {pattern!r}")


def view_pixels(page) -> np.ndarray:
    """The slice view as the page shows it: an RGB screenshot, as ints."""
    from PIL import Image

    return np.asarray(
        Image.open(io.BytesIO(page.get_by_test_id("slice-view").screenshot())).convert("RGB"), dtype=int
    )


def warm_pixels(page) -> int:
    """Pixels of the slice view in the guidance overlay's colours (the grey film has none)."""
    shot = view_pixels(page)
    return int(((shot[..., 0] - shot[..., 2] > 80) & (shot[..., 0] > 150)).sum())


def segment_pixels(page) -> int:
    """Pixels of the slice view in the painted segment's green outline (the grey film has none)."""
    shot = view_pixels(page)
    return int(((shot[..., 1] - shot[..., 0] > 80) & (shot[..., 1] - shot[..., 2] > 80)).sum())


def wait_for(condition, what: str, timeout: float = 60, poll_s: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout} s"
        time.sleep(poll_s)


def open_file(page, path: Path) -> None:
    page.get_by_test_id("open-file").locator("input[type=file]").set_input_files(str(path))


def type_instruction(page, instruction: str) -> None:
    field = page.get_by_test_id("instruction").locator("input")
    field.fill(instruction)
    field.press("Tab")


def set_steps(page, steps: int) -> None:
    """Advanced > Steps (opens the panel when it is closed)."""
    field = page.get_by_label("Steps (0: default)")
    if not field.is_visible():
        page.get_by_text("Advanced").click()
    field.fill(str(steps))
    field.press("Tab")
