"""``instructx2x-train stress-test`` on two phantoms with a large pneumothorax and a chest drain,
with the demo model and two toy TorchScript classifiers: one reads only the drain's pixels (a
shortcut), one reads the pneumothorax's lucent rim. Removing the pneumothorax with the drain kept
must flag the first and not the second; bad classifiers, edits and film folders are refused
before any model work, with nothing written. The same on stress-films phantoms with
``--counterfactuals truth`` (each film rendered again without the finding, no model), and what
the truth cannot render refused before any model or classifier work."""

import dataclasses
import json
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import torch
from launch import launch
from PIL import Image

from instructx2x.errors import ModelLoadError, OutputExistsError, ParameterError
from instructx2x.image_io import ImageReadError
from instructx2x_train.classifiers import DeviceDraw
from instructx2x_train.cli import main
from instructx2x_train.phantom import (
    DEVICES,
    Anatomy,
    DeviceState,
    FindingState,
    Pose,
    device_masks,
    finding_masks,
    form_film,
    render_attenuation,
)
from instructx2x_train.stress_test import StressConfig, StressEdit, stress_test, write_stress_films
from instructx2x_train.stress_truth import PhantomTruth

SIZE = 128  # the films, and what the toy classifiers read
REMOVE = StressEdit("Remove the finding of pneumothorax", keep="chest drain")


class RegionReader(torch.nn.Module):
    """The pneumothorax probability from the mean brightness of a region: ``sign`` +1 calls it
    when the region is bright (a drain's tube), -1 when dark (the lucent rim of a pneumothorax)."""

    def __init__(self, region: np.ndarray, threshold: float, sign: float, slope: float) -> None:
        super().__init__()
        self.register_buffer("region", torch.from_numpy(region.astype(np.float32)))
        self.threshold = threshold
        self.sign = sign
        self.slope = slope

    region: torch.Tensor

    def forward(self, films: torch.Tensor) -> torch.Tensor:
        mean = (films[:, 0] * self.region).sum(dim=(1, 2)) / self.region.sum()
        return torch.sigmoid(self.slope * self.sign * (mean - self.threshold))[:, None]


def _save(module: torch.nn.Module, folder, name: str, findings=("pneumothorax",), size=SIZE):
    path = folder / f"{name}.pt"
    torch.jit.script(module).save(str(path))
    (folder / f"{name}.json").write_text(json.dumps({"findings": list(findings), "size": size}))
    return str(path)


def _mean(film: np.ndarray, region: np.ndarray) -> float:
    return float(film[region].mean())


@pytest.fixture(scope="module")
def films(tmp_path_factory):
    """Two films of one phantom with a large left pneumothorax and a drain on its side (the
    drains' courses and the noise differ; films.csv gives them other demographics); each with its drain's
    mask, its pneumothorax's mask and its film without the pneumothorax (for the toy thresholds)."""
    root = tmp_path_factory.mktemp("stress") / "films"
    root.mkdir()
    truth = []
    for index in range(2):
        rng = np.random.default_rng([77, index])
        anatomy = Anatomy.draw(np.random.default_rng(77), 55, "F", "White")  # one body, two exposures
        drain = (DeviceState("chest drain", "left", index),)
        noise = rng.standard_normal((SIZE, SIZE)).astype(np.float32)
        pneumothorax = [FindingState("pneumothorax", "large", "left", seed=index)]
        film, without = (
            form_film(render_attenuation(SIZE, SIZE, anatomy, present, Pose(), devices=drain), noise, 0.15)
            for present in (pneumothorax, [])
        )
        Image.fromarray(np.round(film * 255).astype(np.uint8)).save(root / f"film{index}.png")
        keep = device_masks(SIZE, SIZE, anatomy, list(drain), Pose())
        np.savez_compressed(root / f"film{index}.masks.npz", **keep)  # type: ignore[arg-type]  # numpy's stub types **kwds as allow_pickle
        rim = finding_masks(film, {"pneumothorax": without})["pneumothorax"] & ~keep["chest drain"]
        truth.append((np.round(film * 255) / 255, np.round(without * 255) / 255, keep["chest drain"], rim))
    table = (
        "file,age,sex,race,findings\nfilm0.png,38,F,Asian,pneumothorax\nfilm1.png,71,M,Black,pneumothorax\n"
    )
    (root / "films.csv").write_text(table)
    return root, truth


@pytest.fixture(scope="module")
def toys(films, tmp_path_factory):
    """The drain reader calls a pneumothorax when the drains' pixels are bright; the rim reader
    when the pneumothoraces' rims are dark, and calls it gone once a quarter of the way to the
    film without the pneumothorax. Both call every source film positive."""
    _, truth = films
    folder = tmp_path_factory.mktemp("toys")
    drains = np.logical_and.reduce([drain for _, _, drain, _ in truth])
    assert drains.sum() >= 10
    bright = min(_mean(film, drains) for film, *_ in truth)
    drain = RegionReader(drains, bright - 0.05, 1.0, 100.0)
    rims = np.logical_or.reduce([rim for *_, rim in truth])
    dark = [(_mean(film, rims), _mean(without, rims)) for film, without, *_ in truth]
    threshold = min(lucent + 0.25 * (filled - lucent) for lucent, filled in dark)
    assert max(lucent for lucent, _ in dark) < threshold
    rim = RegionReader(rims, threshold, -1.0, 2.2 / (threshold - min(lucent for lucent, _ in dark)))
    return _save(drain, folder, "drain-reader"), _save(rim, folder, "rim-reader")


@pytest.fixture(scope="module")
def finished(films, toys, tmp_path_factory):
    output = tmp_path_factory.mktemp("report") / "stress"
    config = StressConfig(classifiers=toys, films=str(films[0]), edits=(REMOVE,), bootstrap=40, batch_size=2)
    return output, stress_test(output, config, progress_bar=False)


def test_devices_are_drawn_with_their_masks():
    devices = [DeviceState(name, "left", 3) for name in DEVICES]
    masks = device_masks(96, 96, Anatomy(), devices, Pose())
    assert set(masks) == set(DEVICES) and all(mask.any() and mask.mean() < 0.2 for mask in masks.values())
    drain = np.argwhere(masks["chest drain"])
    assert drain[:, 1].mean() > 48  # the patient's left is the image's right
    with pytest.raises(ValueError, match="device must be one of"):
        DeviceState("stent")
    rng = np.random.default_rng(0)
    confounded = DeviceDraw(0.9, 0.05)
    assert sum("chest drain" in [d.name for d in confounded.draw(rng, [])] for _ in range(400)) < 40


def test_the_report_flags_the_drain_reader_and_not_the_lung_reader(finished):
    output, report = finished
    assert {p.name for p in output.iterdir()} == {
        "stress-test.json",
        "stress-test.md",
        "stress-test.csv",
        "rows.csv",
        "stress-test.png",
        "stress-test-config.json",
        "records",
    }
    stored = json.loads((output / "stress-test.json").read_text(), parse_constant=pytest.fail)  # strict JSON
    assert (
        stored["seed"] == 0
        and stored["rows"] == 2
        and set(stored["classifiers"])
        == {
            "drain-reader",
            "rim-reader",
        }
    )
    verdicts = {v["classifier"]: v for v in report["verdicts"]}
    assert verdicts["drain-reader"]["verdict"] == "shortcut suspected"
    assert verdicts["drain-reader"]["still_positive"] == 1.0
    assert verdicts["drain-reader"]["mean_shift"] == pytest.approx(0.0, abs=1e-6)  # the drain kept as it was
    assert verdicts["rim-reader"]["verdict"] == "reads the finding", verdicts["rim-reader"]
    table = pd.read_csv(output / "stress-test.csv")
    assert {"mean_shift_low", "mean_shift_high", "flip_rate_low", "still_positive_high"} <= set(table.columns)
    assert "all" in set(table.subgroup) and any(group.startswith("age ") for group in table.subgroup)
    assert len(pd.read_csv(output / "rows.csv")) == 4  # 2 films x 2 classifiers
    assert "shortcut suspected" in (output / "stress-test.md").read_text()


def test_an_interrupted_run_resumes_and_a_finished_one_is_kept(films, toys, finished, tmp_path):
    output, report = finished
    config = StressConfig(classifiers=toys, films=str(films[0]), edits=(REMOVE,), bootstrap=40, batch_size=2)
    with pytest.raises(OutputExistsError, match="not an unfinished stress test"):
        stress_test(output, config, progress_bar=False)
    copy = tmp_path / "resume"
    copy.mkdir()
    (copy / "records").mkdir()
    lines = (output / "records" / "rows.rank0.jsonl").read_text().splitlines()
    (copy / "records" / "rows.rank0.jsonl").write_text(lines[0] + '\n{"row": 1, "cut')
    (copy / "stress-test-config.json").write_text((output / "stress-test-config.json").read_text())
    (copy / "INCOMPLETE").write_text("")
    other = dataclasses.replace(config, bootstrap=80)
    with pytest.raises(OutputExistsError, match=r"other settings \(bootstrap\)"):
        stress_test(copy, other, progress_bar=False)
    resumed = stress_test(copy, config, progress_bar=False)
    assert resumed["resumed"] is True and len(resumed["verdicts"]) == 2
    for again, first in zip(resumed["verdicts"], report["verdicts"]):  # row 1 alone, not in a batch
        assert again["verdict"] == first["verdict"] and again["still_positive"] == first["still_positive"]
        assert again["mean_shift"] == pytest.approx(first["mean_shift"], abs=1e-3)
    assert len((copy / "records" / "rows.rank0.jsonl").read_text().splitlines()) == 3  # row 1 once more


def test_two_processes_share_the_rows_give_the_one_process_report_and_resume(films, toys, tmp_path):
    """Under ``accelerate launch`` (two CPU processes, gloo) each rank edits and records every
    other row and the main one writes the report: the same rows.csv and stress-test.csv as one
    process. A sharded run cut short in one rank's last row resumes with that row alone."""
    edits = tmp_path / "edits.json"
    declared = [
        {"instruction": REMOVE.instruction, "keep": REMOVE.keep},
        {"instruction": "Add the finding of edema"},
        {"instruction": "Change the level of pneumothorax from small to large"},
    ]
    edits.write_text(json.dumps(declared))  # 3 edits x 2 films: 6 rows

    def run(output, processes):
        completed = launch(
            [
                "-m",
                "instructx2x_train.cli",
                "stress-test",
                str(output),
                "--films",
                str(films[0]),
                "--edits",
                str(edits),
                *("--classifier", toys[0], "--classifier", toys[1]),
                *("--model", "untrained-tiny", "--steps", "2", "--resolution", "64"),
                *("--batch-size", "1", "--bootstrap", "20", "--no-progress"),
            ],
            processes,
        )
        assert completed.returncode == 0, completed.stderr[-3000:]
        assert completed.stdout.count('"verdicts"') == 1  # printed by the main process alone
        return completed

    def tables(output):
        return [(output / name).read_text() for name in ("rows.csv", "stress-test.csv")]

    alone, sharded = tmp_path / "alone", tmp_path / "sharded"
    run(alone, 1)
    run(sharded, 2)
    records = sharded / "records"
    shares = {
        rank: [json.loads(line)["row"] for line in (records / f"rows.rank{rank}.jsonl").open()]
        for rank in (0, 1)
    }
    assert shares == {0: [0, 2, 4], 1: [1, 3, 5]}
    assert tables(sharded) == tables(alone)
    # as if interrupted in rank 1's last row: its line cut short, no report yet
    first = (records / "rows.rank0.jsonl").read_text()
    lines = (records / "rows.rank1.jsonl").read_text().splitlines()
    (records / "rows.rank1.jsonl").write_text("\n".join(lines[:2]) + "\n" + lines[2][:12])
    for name in ("rows.csv", "stress-test.csv", "stress-test.json", "stress-test.md", "stress-test.png"):
        (sharded / name).unlink()
    (sharded / "INCOMPLETE").write_text("interrupted\n")
    run(sharded, 2)
    assert json.loads((sharded / "stress-test.json").read_text())["resumed"] is True
    assert (records / "rows.rank0.jsonl").read_text() == first  # rank 0 had nothing left
    again = [line for line in (records / "rows.rank1.jsonl").read_text().splitlines() if line.endswith("}")]
    assert [json.loads(line)["row"] for line in again] == [1, 3, 5]  # row 5 once more, alone
    assert tables(sharded) == tables(alone) and not (sharded / "INCOMPLETE").exists()


def test_bad_input_is_refused_before_any_model_work(films, toys, tmp_path):
    def refused(error, match, **settings):
        config = {"classifiers": toys, "films": str(films[0]), "edits": (REMOVE,), **settings}
        with pytest.raises(error, match=match):
            stress_test(tmp_path / "out", StressConfig(**config), progress_bar=False)
        assert not (tmp_path / "out").exists()

    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a module")
    (tmp_path / "broken.json").write_text(json.dumps({"findings": ["pneumothorax"], "size": SIZE}))
    refused(ModelLoadError, "does not load as a TorchScript module", classifiers=(str(broken),))
    lonely = tmp_path / "lonely"
    lonely.mkdir()
    module = RegionReader(np.ones((SIZE, SIZE), bool), 0.5, 1.0, 1.0)
    torch.jit.script(module).save(str(lonely / "toy.pt"))
    refused(ModelLoadError, "toy.json is missing", classifiers=(str(lonely / "toy.pt"),))
    wrong = _save(module, tmp_path, "two", findings=("pneumothorax", "edema"))
    refused(ModelLoadError, r"wrong interface.*\(2, 2\) probabilities", classifiers=(wrong,))
    empty = tmp_path / "empty"
    empty.mkdir()
    refused(ParameterError, "no films in folder empty", films=str(empty))
    refused(
        ParameterError,
        "applies to no film",
        edits=(StressEdit("Remove the finding of edema", keep="pacemaker"),),
    )
    with pytest.raises(ParameterError, match="exactly one finding"):
        StressEdit("Make it look better")


def test_the_command_line_refuses_a_broken_classifier(films, tmp_path, capsys):
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a module")
    (tmp_path / "broken.json").write_text(json.dumps({"findings": ["pneumothorax"], "size": SIZE}))
    argv = ["stress-test", str(tmp_path / "out"), "--films", str(films[0]), "--classifier", str(broken)]
    assert main(argv) != 0
    assert "broken.pt does not load as a TorchScript module" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_sigterm_stops_a_run_as_ctrl_c_does_and_keeps_it_resumable(films, toys, tmp_path):
    """A service manager's stop (SIGTERM) once the run has begun: exit 130, the resume hint, the
    folder marked unfinished with its settings, and no report."""
    output = tmp_path / "stress"
    edits = tmp_path / "edits.json"
    edits.write_text(json.dumps([{"instruction": REMOVE.instruction, "keep": REMOVE.keep}]))
    command = [sys.executable, "-m", "instructx2x_train.cli", "stress-test", str(output)]
    command += ["--films", str(films[0]), "--edits", str(edits), "--steps", "400", "--no-progress"]
    for toy in toys:
        command += ["--classifier", toy]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (output / "records").is_dir() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1.0)  # into the model's load or its first edit
    process.send_signal(signal.SIGTERM)
    _, errors = process.communicate(timeout=120)
    assert process.returncode == 130, errors
    assert "rerun the same command to resume" in errors
    assert (output / "INCOMPLETE").is_file() and (output / "stress-test-config.json").is_file()
    assert not (output / "stress-test.md").exists()


@pytest.mark.parametrize(
    "source, message",
    [
        (["--dicomweb-modality", "CR"], "--dicomweb-modality needs --dicomweb URL"),
        (["--dicomweb", "http://127.0.0.1:9/dicom-web"], "one of the three"),
        (["--dicomweb", "http://radiology:pw@pacs.example.org/dicom-web"], "carries credentials"),
    ],
)
def test_the_command_line_refuses_a_dicomweb_source_it_cannot_use(films, tmp_path, capsys, source, message):
    """Each before any request: the server at port 9 is never asked."""
    argv = ["stress-test", str(tmp_path / "out"), "--films", str(films[0]), *source]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


TRUTH_SIZE = 64


class ContrastReader(torch.nn.Module):
    """The pneumothorax probability from how much darker a region is than its mirror image
    across the film's midline (the same place in the other lung): a lucent rim without vessels."""

    def __init__(self, region: np.ndarray, threshold: float, slope: float) -> None:
        super().__init__()
        self.register_buffer("region", torch.from_numpy(region.astype(np.float32)))
        self.register_buffer("mirror", torch.from_numpy(region[:, ::-1].copy().astype(np.float32)))
        self.threshold = threshold
        self.slope = slope

    region: torch.Tensor
    mirror: torch.Tensor

    def forward(self, films: torch.Tensor) -> torch.Tensor:
        inside = (films[:, 0] * self.region).sum(dim=(1, 2)) / self.region.sum()
        across = (films[:, 0] * self.mirror).sum(dim=(1, 2)) / self.mirror.sum()
        return torch.sigmoid(self.slope * (across - inside - self.threshold))[:, None]


def _contrast(film: np.ndarray, region: np.ndarray) -> float:
    return float(film[region[:, ::-1]].mean() - film[region].mean())


@pytest.fixture(scope="module")
def phantom_films(tmp_path_factory):
    """Nine stress-films phantoms (64 px, seed 5000: two with a moderate right pneumothorax and
    its drain), and two toy readers built from their phantoms: one calls a pneumothorax where the
    drains are bright (the union of the drains' masks), one where the pneumothoraces' rims are
    dark against the other lung (the union of the rims and its mirror image)."""
    root = tmp_path_factory.mktemp("truth")
    folder = root / "films"
    summary = write_stress_films(folder, 9, 5000, resolution=TRUTH_SIZE, finding_probability=0.5)
    assert summary["with pneumothorax"] == summary["with chest drain"] == 2
    truth = PhantomTruth.load(folder, sorted(p.name for p in folder.glob("*.png")))
    drains, rims, films = [], [], []
    for name, phantom in truth.phantoms.items():
        if "pneumothorax" not in {finding.name for finding in phantom.findings}:
            continue
        with np.load(folder / name.replace(".png", ".masks.npz")) as masks:
            drains.append(masks["chest drain"])
        without = phantom.render(tuple(f for f in phantom.findings if f.name != "pneumothorax"))
        film = np.asarray(Image.open(folder / name), np.float32) / 255
        rims.append(finding_masks(phantom.render(), {"pneumothorax": without})["pneumothorax"] & ~drains[-1])
        films.append((film, np.round(without * 255) / 255))
    drain_region, rim_region = np.logical_or.reduce(drains), np.logical_or.reduce(rims)
    bright = min(_mean(film, drain_region) for film, _ in films)
    dark = [(_contrast(film, rim_region), _contrast(without, rim_region)) for film, without in films]
    threshold = min(lucent - 0.25 * (lucent - filled) for lucent, filled in dark)
    assert max(filled for _, filled in dark) < threshold
    slope = 2.2 / (min(lucent for lucent, _ in dark) - threshold)
    readers = root / "readers"
    readers.mkdir()
    toys = (
        _save(
            RegionReader(drain_region, bright - 0.05, 1.0, 100.0), readers, "drain-reader", size=TRUTH_SIZE
        ),
        _save(ContrastReader(rim_region, threshold, slope), readers, "rim-reader", size=TRUTH_SIZE),
    )
    return folder, toys


def test_stress_films_record_phantoms_that_render_their_films_byte_for_byte(phantom_films):
    folder, _ = phantom_films
    names = sorted(p.name for p in folder.glob("*.png"))
    truth = PhantomTruth.load(folder, names)
    for name in names:
        png = np.asarray(Image.open(folder / name))
        assert np.array_equal(
            np.round(np.clip(truth.phantoms[name].render(), 0, 1) * 255).astype(np.uint8), png
        )


def test_the_truth_removes_the_pneumothorax_and_keeps_the_drain(phantom_films, tmp_path, monkeypatch):
    """Re-rendered without the pneumothorax, the rim reader's probability falls on every film
    and the drain reader's does not (the drain's pixels are the source's): the first reads the
    finding, the second is flagged. No model loads."""
    from instructx2x.editor import InstructX2XEditor

    def no_model(*args, **kwargs):
        raise AssertionError("a truth stress test loads no model")

    monkeypatch.setattr(InstructX2XEditor, "from_model", no_model)
    folder, toys = phantom_films
    edits = (REMOVE, StressEdit("Add the finding of moderate right pneumothorax"))
    config = StressConfig(
        classifiers=toys, films=str(folder), edits=edits, bootstrap=40, counterfactuals="truth"
    )
    report = stress_test(tmp_path / "truth", config, progress_bar=False)
    assert report["counterfactuals"] == "truth" and report["model"] is None
    stored = json.loads((tmp_path / "truth" / "stress-test-config.json").read_text())
    assert stored["counterfactuals"] == "truth" and stored["model"] is None
    assert (tmp_path / "truth" / "stress-test.md").read_text().startswith("True counterfactuals")
    verdicts = {v["classifier"]: v for v in report["verdicts"]}
    assert verdicts["drain-reader"]["verdict"] == "shortcut suspected"
    assert verdicts["drain-reader"]["still_positive"] == 1.0
    assert verdicts["drain-reader"]["mean_shift"] >= -1e-6
    assert verdicts["rim-reader"]["verdict"] == "reads the finding"
    assert verdicts["rim-reader"]["still_positive"] == 0.0 and verdicts["rim-reader"]["mean_shift"] < -0.5
    rows = pd.read_csv(tmp_path / "truth" / "rows.csv")
    removed = rows[(rows.edit == REMOVE.label) & (rows.classifier == "rim-reader")]
    assert len(removed) == 2 and (removed.after_pneumothorax < removed.before_pneumothorax).all()
    added = rows[(rows.edit == edits[1].label) & (rows.classifier == "rim-reader")]
    assert len(added) == 7 and (added.after_pneumothorax >= added.before_pneumothorax).all()  # darker rim
    assert (removed.edit_fraction > 0).all() and (removed.edit_fraction < 0.5).all()


def test_the_truth_refuses_what_it_cannot_render_before_any_work(
    films, phantom_films, toys, tmp_path, capsys
):
    folder, truth_toys = phantom_films
    broken = tmp_path / "broken.pt"  # a classifier that would fail to load: the refusal comes first
    broken.write_bytes(b"not a module")
    (tmp_path / "broken.json").write_text(json.dumps({"findings": ["pneumothorax"], "size": TRUTH_SIZE}))

    def refused(match, edits=(REMOVE,), **settings):
        config = {"classifiers": (str(broken),), "films": str(folder), "counterfactuals": "truth", **settings}
        with pytest.raises(ParameterError, match=match):
            stress_test(tmp_path / "out", StressConfig(edits=edits, **config), progress_bar=False)
        assert not (tmp_path / "out").exists()

    refused(r"folder films has none \(films that are not phantoms", films=str(films[0]))
    refused("a dataset split or a DICOMweb server cannot", films=None, dataset=str(tmp_path))
    refused("loads no model", model="demo")
    refused("loads no model", steps=4)
    refused("an addition names the level", edits=(StressEdit("Add the finding of pneumothorax"),))
    refused(
        "grades pneumothorax small, moderate, large",
        edits=(StressEdit("Change the level of pneumothorax from mild to severe"),),
    )
    refused("the phantom draws", edits=(StressEdit("Remove the finding of fracture"),))
    refused("names its zone", edits=(StressEdit("Add the finding of moderate left consolidation"),))
    tampered = tmp_path / "tampered"
    shutil.copytree(folder, tampered)
    manifest = json.loads((tampered / "phantoms.json").read_text())
    manifest["films"]["5000-00003.png"]["findings"][0]["level"] = "severe"
    (tampered / "phantoms.json").write_text(json.dumps(manifest))
    refused(
        "the phantom recorded for 5000-00003.png is not what seed 5000, index 3 draws", films=str(tampered)
    )
    argv = ["stress-test", str(tmp_path / "out"), "--counterfactuals", "truth", "--films", str(films[0])]
    assert main([*argv, "--classifier", truth_toys[0]]) == 2
    assert "has none" in capsys.readouterr().err and not (tmp_path / "out").exists()
    argv = ["stress-test", str(tmp_path / "out"), "--counterfactuals", "truth"]
    assert main([*argv, "--dicomweb", "http://127.0.0.1:9/dicom-web"]) == 2
    assert "cannot be rendered again" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_dicom_films_report_the_subgroups_films_csv_or_their_dicom_states(tmp_path):
    """A folder of three DICOM films: a woman of 70 by PatientAge; a man of 35 by his birth and
    study dates whom films.csv makes 50 (films.csv wins where it states a value, the DICOM fills
    in the sex it leaves out); one that states nothing, in "all" alone. A .dcm file that is not
    DICOM is refused before any model work."""
    from dicom_factory import make_radiograph, phantom

    root = tmp_path / "films"
    root.mkdir()
    stated: dict[str, dict[str, str | None]] = {
        "woman": {"PatientAge": "070Y", "PatientSex": "F", "PatientBirthDate": None},
        "man": {"PatientBirthDate": "19900615", "StudyDate": "20250311", "PatientSex": "M"},
        "nobody": {"PatientBirthDate": None, "PatientSex": ""},
    }
    for number, (name, attributes) in enumerate(stated.items()):
        dataset = make_radiograph("DX", pixels=phantom(72, 64)[:, :: (-1) ** number])
        for keyword, value in attributes.items():
            if value is None:
                delattr(dataset, keyword)
            else:
                setattr(dataset, keyword, value)
        dataset.save_as(root / f"{name}.dcm", enforce_file_format=True)
    (root / "films.csv").write_text("file,age,sex\nman.dcm,50,\n")
    config = StressConfig(
        model="untrained-tiny",
        films=str(root),
        edits=(StressEdit("Add the finding of edema"),),
        steps=2,
        resolution=64,
        bootstrap=20,
    )
    report = stress_test(tmp_path / "stress", config, progress_bar=False)
    instructed = [row for row in report["table"] if row["role"] == "instructed"]
    assert [(row["subgroup"], row["films"]) for row in instructed] == [
        ("all", 3),
        ("age 45-64", 1),
        ("age >=65", 1),
        ("sex F", 1),
        ("sex M", 1),
    ]

    (root / "broken.dcm").write_bytes(b"not a DICOM file")
    with pytest.raises(ImageReadError, match=r"broken.dcm: not a readable DICOM file"):
        stress_test(tmp_path / "refused", StressConfig(model=str(tmp_path / "no-model"), films=str(root)))
    assert not (tmp_path / "refused").exists()
