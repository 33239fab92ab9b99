"""Synthetic-cohort classifiers: training writes a set the library loads, and the bundled set
reads films it never saw."""

import dataclasses

import numpy as np
import pytest

from instructx2x.classifier_set import Predictions
from instructx2x.classifiers import COHORT_SET_NAME, PATHOLOGIES, CohortClassifiers, load_classifiers
from instructx2x.errors import OutputExistsError
from instructx2x_train.classifiers import (
    ClassifierConfig,
    DeviceDraw,
    draw_films,
    held_out_figures,
    held_out_splits,
    train_classifiers,
)


def test_films_are_the_same_bytes_with_one_or_two_workers():
    one, labels_one = draw_films(6, 64, seed=5, workers=1)
    two, labels_two = draw_films(6, 64, seed=5, workers=2)
    assert np.array_equal(one, two) and labels_one == labels_two
    assert one.shape == (6, 64, 64) and 0 <= one.min() and one.max() <= 1


def test_training_writes_a_set_the_library_loads(tmp_path):
    config = ClassifierConfig(
        films=48, held_out=16, resolution=64, steps=6, batch=8, width=8, seed=2, devices=DeviceDraw(1, 0, 0.2)
    )
    card = train_classifiers(tmp_path / "set", config, progress_bar=False)
    held_out, independent = card["held_out"], card["held_out_devices_independent"]
    assert independent["devices"] == {
        "drain_with_pneumothorax": 0.35,
        "drain_without_pneumothorax": 0.35,
        "others": 0.2,
    }
    assert independent["films"] == 16 and set(independent["finding_auroc"]) == set(PATHOLOGIES)
    assert set(held_out["finding_accuracy"]) == set(PATHOLOGIES) and held_out["films"] == 16
    assert set(held_out["finding_auroc"]) == set(PATHOLOGIES) == set(held_out["finding_auroc_95"])
    assert held_out["auroc_bootstrap"] == {"resamples": 1000, "seed": 2}
    for name, value in held_out["finding_auroc"].items():
        low, high = held_out["finding_auroc_95"][name]
        assert value is None or low is None or 0 <= low <= high <= 1
    markdown = (tmp_path / "set" / "classifiers.md").read_text()
    assert (
        "| finding | accuracy (0.5) | AUROC [95 % interval] | accuracy, devices independent | "
        "AUROC, devices independent |"
    ) in markdown
    assert "a chest drain on 35 % of all films" in markdown
    assert all(f"| {name} |" in markdown for name in PATHOLOGIES)
    loaded = load_classifiers(str(tmp_path / "set"))
    assert isinstance(loaded, CohortClassifiers)
    assert loaded.card["held_out"] == card["held_out"] and loaded.resolution == 64
    assert loaded.card["held_out_devices_independent"] == independent
    with pytest.raises(OutputExistsError):
        train_classifiers(tmp_path / "set", config)
    with pytest.raises(ValueError, match="multiple of 16"):
        ClassifierConfig(resolution=100)


def test_the_devices_independent_split_is_the_held_out_films_with_the_drain_drawn_apart_from_the_finding():
    """On a confounded split's held-out films a drain marks every pneumothorax and nothing else;
    the devices-independent split keeps every phantom and its findings and puts a drain on as
    many films, with and without a pneumothorax alike."""
    confounded = ClassifierConfig(
        held_out=40,
        resolution=64,
        render_resolution=64,
        finding_probability=0.5,
        devices=DeviceDraw(1, 0, 0.2),
    )
    splits = held_out_splits(confounded)
    (own_draw, own_films, own), (draw, films, independent) = (
        splits["held_out"],
        splits["held_out_devices_independent"],
    )
    assert own_draw == confounded.devices and draw == DeviceDraw(0.5, 0.5, 0.2)
    pneumothorax = [labels["findings"][PATHOLOGIES.index("Pneumothorax")] == 1 for labels in own]
    drain = [["chest drain" in labels["devices"] for labels in split] for split in (own, independent)]
    assert drain[0] == pneumothorax
    assert [labels["findings"] for labels in independent] == [labels["findings"] for labels in own]
    assert set(zip(pneumothorax, drain[1])) == {(True, True), (True, False), (False, True), (False, False)}
    assert not np.array_equal(films, own_films)
    clean = held_out_splits(dataclasses.replace(confounded, devices=DeviceDraw(0.3, 0.3, 0.2)))
    assert clean["held_out_devices_independent"][1] is clean["held_out"][1]  # the same films, drawn once


def test_held_out_auroc_ranks_the_films_by_the_classifiers_probability():
    """Films whose pneumothorax probability ranks every positive above every negative but one
    tie: AUROC from the ranking, not from the 0.5 decision (every film here is called negative)."""

    class Fixed(CohortClassifiers):
        def __init__(self, findings: np.ndarray) -> None:
            self.findings = findings

        def predict(self, images, batch_size=32):
            count = len(self.findings)
            return Predictions(
                findings=self.findings,
                age=np.linspace(40.0, 60.0, count),
                race=np.eye(3)[[0] * count],
                features=np.zeros((count, 4)),
                sex_female=np.full(count, 0.9),
            )

    labels = [
        {"findings": [0.0, 0.0, 0.0, 0.0, float(positive)], "age": 40.0 + 4 * k, "sex_female": 1.0, "race": 0}
        for k, positive in enumerate((1, 1, 1, 0, 0, 0))
    ]
    findings = np.zeros((6, 5))
    findings[:, 4] = [0.40, 0.30, 0.20, 0.20, 0.10, 0.05]  # 8 of 9 pairs won, one tie: 8.5 / 9
    figures = held_out_figures(Fixed(findings), np.zeros((6, 8, 8)), labels, seed=3)
    assert figures["finding_accuracy"]["Pneumothorax"] == pytest.approx(0.5)
    assert figures["finding_auroc"]["Pneumothorax"] == pytest.approx(8.5 / 9)
    assert figures["finding_auroc"]["Edema"] is None  # no film with edema
    low, high = figures["finding_auroc_95"]["Pneumothorax"]
    assert 0.5 <= low <= 8.5 / 9 <= high == 1.0
    again = held_out_figures(Fixed(findings), np.zeros((6, 8, 8)), labels, seed=3)
    assert again["finding_auroc_95"] == figures["finding_auroc_95"]  # seeded


def test_the_bundled_set_reads_films_it_never_saw():
    """Fresh films from a seed stream no training run uses; chance is 0.5 (findings, sex)
    and 1/3 (race)."""
    classifiers = load_classifiers(COHORT_SET_NAME)
    assert isinstance(classifiers, CohortClassifiers)
    films, labels = draw_films(160, 256, seed=424242, workers=2)
    figures = held_out_figures(classifiers, films, labels)
    assert min(figures["finding_accuracy"].values()) >= 0.95, figures
    assert figures["sex_accuracy"] >= 0.95 and figures["race_accuracy"] >= 0.85, figures
    assert figures["age_pearson_r"] >= 0.95 and figures["age_mae_years"] <= 4, figures


def test_the_bundled_set_reads_the_main_jobs_dicom_sample_through_its_display_window():
    """Resources/Samples/phantom_pa.dcm: a normal 58-year-old woman's phantom written as a
    12-bit CR without a VOI window, so the reader stretches it min-max; the classifiers
    normalise each film's window and read it as the film it was made from."""
    from pathlib import Path

    from instructx2x.dicom.read import read_dicom

    sample = Path(__file__).resolve().parents[2] / "Resources" / "Samples" / "phantom_pa.dcm"
    image = read_dicom(sample)
    assert any("window" in step for step in image.transforms)
    predicted = load_classifiers(COHORT_SET_NAME).predict([image.pixels, 0.2 + 0.6 * image.pixels])
    assert (predicted.findings < 0.5).all(), predicted.findings
    assert predicted.sex_female is not None
    assert abs(predicted.age[0] - 58) <= 6 and predicted.sex_female[0] >= 0.5
    assert np.allclose(predicted.findings[0], predicted.findings[1], atol=1e-3)
