"""The browser panel as a user feels it, on the demo model, in Debian's chromium.

Figures: server cold start (process start to "ready": the model loads before the page is
served), memory at rest and after an edit (server and worker processes), time from Apply to
the overlay on screen (the first edit, then the median of 3), and cancel latency (Cancel click
to "Cancelled" in the page, median of 3). Baseline in the same run: the same edit through the
library's CLI (``instructx2x edit``: process start and model load included), the cost the
warm page saves per edit. The last line is one JSON
object with all figures. Usage: ``.venv-web/bin/python Testing/benchmarks/benchmark_web.py``.
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from web_driver import (
    SAMPLE,
    WebServer,
    chromium_page,
    open_file,
    set_steps,
    type_instruction,
    wait_text,
    warm_pixels,
)

INSTRUCTION = "Add the finding of moderate left pleural effusion"


def report(results: dict, key: str, value: float, unit: str) -> None:
    results[key] = round(value, 3)
    print(f"{key:<34} {value:9.3f} {unit}", flush=True)


def apply_until_overlay(page) -> float:
    """Apply click -> the page shows the result (status Done, the overlay on the view). The
    status, layers and button change in one state update; the button turning to Cancel first
    makes sure the Done seen is the new one."""
    started = time.monotonic()
    page.get_by_test_id("apply").click()
    wait_text(page, "apply", "(?i)cancel", poll_s=0.01)
    wait_text(page, "apply", "(?i)apply", poll_s=0.02)
    wait_text(page, "status", r"^Done", poll_s=0.02)
    while warm_pixels(page) < 100:
        time.sleep(0.02)
    return time.monotonic() - started


def cli_edit_seconds(folder: Path) -> float:
    started = time.monotonic()
    subprocess.run(
        [
            str(Path(sys.executable).with_name("instructx2x")),
            "edit",
            str(SAMPLE),
            "-i",
            INSTRUCTION,
            "-o",
            str(folder),
            "--model",
            "demo",
            "--device",
            "cpu",
            "--progress",
            "none",
        ],
        check=True,
        capture_output=True,
    )
    return time.monotonic() - started


def main() -> None:
    chromium = shutil.which("chromium")
    if chromium is None:
        sys.exit("chromium is not installed (Debian package chromium)")
    from instructx2x.devices import cpu_description

    results: dict = {"cpu": cpu_description()}
    print(f"CPU: {results['cpu']}")
    with tempfile.TemporaryDirectory() as scratch_name:
        scratch = Path(scratch_name)
        server = WebServer(scratch / "server").start()
        try:
            report(results, "server_ready_s", server.start_s, "s (model load included)")
            time.sleep(2)
            rest = server.rss_mb()
            report(results, "server_rss_at_rest_mb", rest["server_mb"], "MB")
            with chromium_page(server.url, chromium) as page:
                open_file(page, SAMPLE)
                page.get_by_text("CR 512 x 512").wait_for()
                type_instruction(page, INSTRUCTION)
                report(results, "first_apply_to_overlay_s", apply_until_overlay(page), "s")
                after = server.rss_mb()
                report(results, "server_rss_after_edit_mb", after["server_mb"], "MB")
                report(results, "worker_rss_after_edit_mb", after["worker_mb"], "MB")
                warm = [apply_until_overlay(page) for _ in range(3)]
                report(results, "apply_to_overlay_s", statistics.median(warm), "s (median of 3, warm model)")
                set_steps(page, 300)
                cancels = []
                for _ in range(3):
                    page.get_by_test_id("apply").click()
                    wait_text(page, "progress-text", r"Step \d+ of 300", poll_s=0.02)
                    started = time.monotonic()
                    page.get_by_test_id("apply").click()
                    wait_text(page, "status", r"^Cancelled", poll_s=0.02)
                    cancels.append(time.monotonic() - started)
                report(results, "cancel_latency_s", statistics.median(cancels), "s (median of 3)")
        finally:
            server.stop()
        baseline = statistics.median(cli_edit_seconds(scratch / f"cli-{i}") for i in range(3))
        report(results, "cli_edit_s", baseline, "s (instructx2x edit, model load included; median of 3)")
        report(results, "first_apply_vs_cli", results["first_apply_to_overlay_s"] / baseline, "x")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
