"""``instructx2x-train evaluate`` end to end with the demo model on a small held-out split:
every table and the plot, the real-image row, resuming, and refusals that write nothing."""

import json
import re

import pandas as pd
import pytest
from launch import launch

from instructx2x import backends
from instructx2x.errors import ModelLoadError, OutputExistsError, ParameterError
from instructx2x_train.cli import main
from instructx2x_train.counterfactuals import PurePairsConfig, write_pure_pairs
from instructx2x_train.evaluation import MODES, REAL_ROW, EvaluationConfig, evaluate


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluation") / "pairs"
    write_pure_pairs(
        root,
        PurePairsConfig(
            pairs=8,
            seed=2024,
            resolution=128,
            split="test",
            findings=("pleural effusion", "cardiomegaly", "pneumothorax", "edema"),
            other_finding_probability=0.0,
        ),
    )
    return root


@pytest.fixture(scope="module")
def finished(split, tmp_path_factory):
    output = tmp_path_factory.mktemp("report") / "evaluation"
    config = EvaluationConfig(model="demo", dataset=str(split), bootstrap=40, batch_size=4)
    return output, evaluate(output, config, progress_bar=False)


def test_every_table_and_the_plot_are_written(finished):
    output, report = finished
    assert {p.name for p in output.iterdir()} >= {
        "evaluation.json",
        "evaluation.md",
        "metrics.csv",
        "pairs.csv",
        "ablation.png",
        "records",
    }
    assert not (output / "INCOMPLETE").exists()
    stored = json.loads((output / "evaluation.json").read_text())  # strict JSON
    assert list(stored["rows"]) == [REAL_ROW, *MODES]
    assert stored["model"]["source"] == "bundled" and stored["classifiers"]["name"] == "cohort-v2"
    assert stored["source_labels"] == {"truth": 8, "classifier": 0}
    table = pd.read_csv(output / "metrics.csv")
    assert list(table.row) == [REAL_ROW, *MODES]
    for mode in MODES:
        row = report["rows"][mode]
        assert 0 <= row["pathology_accuracy"] <= 100 and row["fid"] >= 0 and row["kl"] >= 0
        low, high = row["interval_95"]["pathology_accuracy"]
        assert low <= row["pathology_accuracy"] <= high
    assert "kl" not in report["rows"][REAL_ROW]
    assert len(pd.read_csv(output / "pairs.csv")) == 8 * len(MODES)
    markdown = (output / "evaluation.md").read_text()
    assert "relevance map + pseudo mask (RSE)" in markdown and "real images" in markdown


def test_real_targets_score_as_the_classifiers_read_them(finished):
    """The real-image row scores the true counterfactuals against the expected labels: with
    well-trained classifiers it is close to their held-out accuracy."""
    _, report = finished
    assert report["rows"][REAL_ROW]["pathology_accuracy"] >= 85
    assert report["rows"][REAL_ROW]["race_preservation"] >= 85


def test_an_interrupted_run_resumes_where_it_stopped(split, tmp_path, monkeypatch):
    from instructx2x.editor import InstructX2XEditor

    config = EvaluationConfig(model="demo", dataset=str(split), modes=("rse",), bootstrap=10, batch_size=2)
    calls = []
    original = InstructX2XEditor.edit_batch

    def edit_batch(self, images, parameters, *args, **kwargs):
        calls.append(len(images))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(self, images, parameters, *args, **kwargs)

    monkeypatch.setattr(InstructX2XEditor, "edit_batch", edit_batch)
    with pytest.raises(KeyboardInterrupt):
        evaluate(tmp_path / "run", config, progress_bar=False)
    assert (tmp_path / "run" / "INCOMPLETE").exists() and not (tmp_path / "run" / "evaluation.json").exists()
    assert len((tmp_path / "run" / "records" / "rse.rank0.jsonl").read_text().splitlines()) == 2
    with pytest.raises(OutputExistsError, match="other settings"):
        evaluate(tmp_path / "run", EvaluationConfig(model="demo", dataset=str(split), modes=("none",)))
    calls.clear()
    monkeypatch.setattr(InstructX2XEditor, "edit_batch", original)

    def counted(self, images, *args, **kwargs):
        calls.append(len(images))
        return original(self, images, *args, **kwargs)

    monkeypatch.setattr(InstructX2XEditor, "edit_batch", counted)
    report = evaluate(tmp_path / "run", config, progress_bar=False)
    assert sum(calls) == 6 and report["resumed"] is True  # only the pairs not yet recorded
    assert not (tmp_path / "run" / "INCOMPLETE").exists()
    with pytest.raises(OutputExistsError, match="not an unfinished evaluation"):
        evaluate(tmp_path / "run", config, progress_bar=False)


def test_bad_settings_are_refused_before_anything_is_written(split, tmp_path):
    with pytest.raises(ParameterError, match="modes"):
        EvaluationConfig(model="demo", dataset=str(split), modes=("rse", "everything"))
    with pytest.raises(ValueError, match="not a MIMIC-EDIT-INSTRUCTION folder"):
        evaluate(tmp_path / "a", EvaluationConfig(model="demo", dataset=str(tmp_path)))
    with pytest.raises(ModelLoadError):
        evaluate(
            tmp_path / "b", EvaluationConfig(model="demo", dataset=str(split), classifiers="no-such-set")
        )
    with pytest.raises(ModelLoadError):
        evaluate(tmp_path / "c", EvaluationConfig(model=str(tmp_path / "no-such-model"), dataset=str(split)))
    assert list(tmp_path.iterdir()) == []


NOWHERE = "http://127.0.0.1:9/dicom-web"  # never asked: each refusal comes before any request
EDEMA = ["-i", "Add the finding of edema"]


@pytest.mark.parametrize(
    "source, message",
    [
        (["--dataset", "pairs", "--dicomweb-modality", "CR"], "--dicomweb-modality needs --dicomweb URL"),
        (["--dataset", "pairs", "--dicomweb-store"], "--dicomweb-store needs --dicomweb URL"),
        (["--dataset", "pairs", "--dicomweb", NOWHERE, *EDEMA], "one of the two"),
        ([], "one of the two"),
        (["--dicomweb", NOWHERE], "carries no instruction: give one or more with --instruction"),
        (["--dataset", "pairs", *EDEMA], "--instruction and --dicomweb-store are for a DICOMweb cohort"),
        (["--dicomweb", NOWHERE, *EDEMA, "--split", "test"], "--split names a dataset's split"),
        (["--dicomweb", "http://radiology:pw@pacs.example.org/dicom-web", *EDEMA], "carries credentials"),
        (["--dicomweb", NOWHERE, *EDEMA, "-i", "Add the finding of \x07edema"], "control character"),
    ],
)
def test_the_command_line_refuses_a_dicomweb_source_it_cannot_use(tmp_path, capsys, source, message):
    """Each before any request, dataset read or model load (the model does not exist)."""
    argv = ["evaluate", str(tmp_path / "out"), "--model", str(tmp_path / "no-model"), *source]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "no-model" not in err and "pw@" not in err
    assert list(tmp_path.iterdir()) == []


def test_two_processes_under_accelerate_launch_share_the_pairs(split, finished, tmp_path):
    """Each rank edits its own share of the pairs and records it; the main process assembles
    the same tables as one process does (up to the last bits of batched arithmetic)."""
    output = tmp_path / "sharded"
    completed = launch(
        [
            "-m",
            "instructx2x_train.cli",
            "evaluate",
            str(output),
            "--model",
            "demo",
            "--dataset",
            str(split),
            "--bootstrap",
            "40",
            "--no-progress",
        ],
        processes=2,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert re.search(r'"report": ".*evaluation.md"', completed.stdout)  # printed once, by the main process
    records = sorted(p.name for p in (output / "records").iterdir())
    assert "rse.rank0.jsonl" in records and "rse.rank1.jsonl" in records
    shares = [len((output / "records" / f"rse.rank{k}.jsonl").read_text().splitlines()) for k in (0, 1)]
    assert shares == [4, 4]
    _, single = finished
    sharded = json.loads((output / "evaluation.json").read_text())
    one = pd.read_csv(finished[0] / "pairs.csv").sort_values(["mode", "pair"]).reset_index(drop=True)
    two = pd.read_csv(output / "pairs.csv").sort_values(["mode", "pair"]).reset_index(drop=True)
    probabilities = [c for c in one.columns if c.startswith("p_")]
    assert (one[probabilities] - two[probabilities]).abs().to_numpy().max() < 0.02
    for mode in MODES:
        assert sharded["rows"][mode]["pathology_accuracy"] == pytest.approx(
            single["rows"][mode]["pathology_accuracy"], abs=2.5
        )


needs_openvino = pytest.mark.skipif(
    not backends.openvino_available(), reason="openvino is not installed (make install puts it in .venv)"
)


@needs_openvino
def test_the_backend_option_runs_the_networks_with_openvino(split, finished, tmp_path, monkeypatch, capsys):
    """``--backend openvino`` reaches the editor: the report names the runtime, and its edits
    read as torch's do (the demo model converted into a fresh cache)."""
    monkeypatch.setenv(backends.CACHE_ENV, str(tmp_path / "cache"))
    output = tmp_path / "openvino"
    argv = ["evaluate", str(output), "--model", "demo", "--dataset", str(split), "--modes", "rse"]
    assert main([*argv, "--bootstrap", "10", "--backend", "openvino", "--no-progress"]) == 0
    report = json.loads((output / "evaluation.json").read_text())
    assert report["settings"]["backend"] == "openvino"
    assert report["backend"]["name"] == "openvino" and report["backend"]["converted_on_load"] is True
    release = report["backend"]["openvino"].split("-")[0]  # 2026.4.1-22982-...: 2026.4.1
    assert re.fullmatch(r"\d+\.\d+\.\d+", release)
    assert f"networks run by OpenVINO {release};" in (output / "evaluation.md").read_text()
    ours = pd.read_csv(output / "pairs.csv").sort_values("pair").reset_index(drop=True)
    theirs = pd.read_csv(finished[0] / "pairs.csv")
    theirs = theirs[theirs["mode"] == "rse"].sort_values("pair").reset_index(drop=True)
    probabilities = [c for c in ours.columns if c.startswith("p_")]
    assert (ours[probabilities] - theirs[probabilities]).abs().to_numpy().max() < 0.02
    assert (ours.edit_fraction - theirs.edit_fraction).abs().max() < 0.01
    assert "networks run by" not in (finished[0] / "evaluation.md").read_text()  # torch, the default


def test_a_backend_that_cannot_run_is_refused_before_any_work(split, tmp_path, monkeypatch, capsys):
    """An unknown name, and OpenVINO where it does not import: refused before the classifiers
    or the model load (neither exists here) and before anything is written."""
    with pytest.raises(ParameterError, match="unknown backend 'onnx'; choose auto, torch, openvino"):
        EvaluationConfig(model="demo", dataset=str(split), backend="onnx")
    argv = ["evaluate", str(tmp_path / "out"), "--model", str(tmp_path / "no-model"), "--dataset", str(split)]
    with pytest.raises(SystemExit):
        main([*argv, "--backend", "onnx"])
    assert "invalid choice: 'onnx'" in capsys.readouterr().err
    monkeypatch.setattr(backends, "openvino_available", lambda: False)
    with pytest.raises(ParameterError, match="--backend openvino needs the OpenVINO runtime"):
        evaluate(
            tmp_path / "out",
            EvaluationConfig(
                model=str(tmp_path / "no-model"),
                dataset=str(split),
                classifiers="no-such-set",
                backend="openvino",
            ),
        )
    assert main([*argv, "--backend", "openvino"]) == 2
    assert "needs the OpenVINO runtime" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
