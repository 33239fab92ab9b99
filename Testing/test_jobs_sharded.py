"""``instructx2x edit --jobs`` under ``accelerate launch``: two CPU processes over gloo share
the rows, each records its own, and the main process assembles the same ``results.csv`` and
the same edits as one process does; a rerun after an interruption resumes row by row."""

import csv
import json
import os
import subprocess
from pathlib import Path

import numpy as np
from launch import launch
from PIL import Image

ROWS = 5


def jobs_file(folder: Path) -> Path:
    yy, xx = np.mgrid[0:72, 0:60]
    for index in range(ROWS):
        pixels = (127 + 100 * np.sin(yy / (6 + index)) * np.cos(xx / 6)).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"film{index}.png")
    jobs = folder / "jobs.csv"
    findings = ["right pleural effusion", "edema", "left pneumothorax", "cardiomegaly", "atelectasis"]
    jobs.write_text(
        "image,instruction,seed\n"
        + "".join(f"film{i}.png,Add the finding of {findings[i]},{i}\n" for i in range(ROWS))
    )
    return jobs


def edit_jobs(jobs: Path, output: Path, processes: int) -> subprocess.CompletedProcess:
    arguments = ["--jobs", str(jobs), "-o", str(output), "--model", "untrained-tiny", "--steps", "2"]
    return launch(
        ["-m", "instructx2x.cli", "edit", *arguments, "--resolution", "64", "--progress", "none"], processes
    )


def rows(output: Path) -> list[dict]:
    with open(output / "results.csv", newline="") as handle:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(handle)]


def test_two_processes_share_the_rows_and_give_the_one_process_results(tmp_path):
    jobs = jobs_file(tmp_path)
    alone = edit_jobs(jobs, tmp_path / "alone", 1)
    assert alone.returncode == 0, alone.stderr[-3000:]
    sharded = edit_jobs(jobs, tmp_path / "sharded", 2)
    assert sharded.returncode == 0, sharded.stderr[-3000:]
    assert sharded.stdout.count('"event": "done"') == 1  # printed by the main process alone
    shares = {
        rank: [
            json.loads(line)["job"]
            for line in (tmp_path / "sharded" / "records" / f"rows.rank{rank}.jsonl").open()
        ]
        for rank in (0, 1)
    }
    assert shares == {0: [1, 3, 5], 1: [2, 4]}
    assert rows(tmp_path / "sharded") == rows(tmp_path / "alone")
    for row in rows(tmp_path / "alone"):
        a, b = (
            np.asarray(Image.open(tmp_path / run / row["output"] / "edited.png"))
            for run in ("alone", "sharded")
        )
        assert np.array_equal(a, b), row["output"]
    assert not (tmp_path / "sharded" / "INCOMPLETE").exists()


def test_an_interrupted_sharded_run_resumes_with_the_rows_not_recorded(tmp_path):
    jobs = jobs_file(tmp_path)
    output = tmp_path / "sharded"
    assert edit_jobs(jobs, output, 2).returncode == 0
    # as if interrupted: rank 1's last row never recorded (its folder half there), no results
    record = output / "records" / "rows.rank1.jsonl"
    lines = record.read_text().splitlines()
    record.write_text(lines[0] + "\n" + lines[1][:10])  # a line cut short
    (output / "results.csv").unlink()
    (output / "INCOMPLETE").write_text("interrupted\n")
    lost = json.loads(lines[1])["output"]
    before = {
        row: (output / row / "edited.png").stat().st_mtime_ns
        for row in os.listdir(output)
        if row[0].isdigit()
    }
    again = edit_jobs(jobs, output, 2)
    assert again.returncode == 0, again.stderr[-3000:]
    assert '"resumed_after": 4' in again.stdout
    after = {row: (output / row / "edited.png").stat().st_mtime_ns for row in before}
    assert [row for row in before if before[row] != after[row]] == [lost]  # only that row ran again
    assert len(rows(output)) == ROWS and not (output / "INCOMPLETE").exists()
