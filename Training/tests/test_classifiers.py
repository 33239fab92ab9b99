"""Synthetic-cohort classifiers: they learn what the phantoms render, and say how well."""

import json

import numpy as np
import pytest

from instructx2x_train.classifiers import (EVALUATED_FINDINGS, ClassifierConfig, draw_films,
                                           load_classifiers, train_classifiers)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("classifiers") / "set"
    config = ClassifierConfig(films=400, held_out=200, resolution=64, steps=300, batch=32, seed=1,
                              finding_probability=0.5)
    return folder, train_classifiers(folder, config, progress_bar=False)


def test_they_learn_the_rendered_traces_on_held_out_films(trained):
    _, card = trained
    figures = card["held_out"]
    # chance: 0.5 for a finding drawn with p = 0.5, 0.5 for sex, 1/3 for race
    assert figures["finding_accuracy"]["cardiomegaly"] > 0.7
    assert figures["finding_accuracy"]["pleural effusion"] > 0.7
    assert figures["sex_accuracy"] > 0.7
    assert figures["age_pearson_r"] > 0.3


def test_saved_set_loads_and_predicts_the_same(trained):
    folder, card = trained
    model, loaded_card = load_classifiers(folder)
    assert loaded_card == json.loads(json.dumps(card))
    films, _ = draw_films(4, 64, seed=99)
    first, second = model.predict(films), model.predict(films)
    assert first["findings"].shape == (4, len(EVALUATED_FINDINGS)) and first["features"].shape[0] == 4
    assert np.array_equal(first["findings"], second["findings"])
    assert ((first["race"].sum(-1) - 1) ** 2 < 1e-10).all()


def test_missing_files_and_existing_output(tmp_path, trained):
    with pytest.raises(FileNotFoundError, match="classifiers.json is missing"):
        load_classifiers(tmp_path)
    folder, _ = trained
    with pytest.raises(FileExistsError):
        train_classifiers(folder, ClassifierConfig(films=2, held_out=2, steps=1))
    with pytest.raises(ValueError, match="multiple of 16"):
        ClassifierConfig(resolution=100)
