"""torchxrayvision's classifiers through the real loading code, with weight files built offline.

The published weights can't be reached here, so the tests write files of the same kind and
name where torchxrayvision looks for them (``xrv_weights``). Runs in the eval environment
(``make test-eval``, marker xrv); skipped where torchxrayvision is not installed.
"""

import os
import pickle

import numpy as np
import pytest
import torch

from instructx2x.classifiers import PATHOLOGIES, load_classifiers
from instructx2x.errors import ModelLoadError

xrv = pytest.importorskip("torchxrayvision")
pytest.importorskip("torchvision")
from xrv_weights import write_digests, write_xrv_weights  # noqa: E402  (after the skips above)

from instructx2x.xrv_classifiers import (  # noqa: E402
    AGE_WEIGHTS,
    DENSENET_FILES,
    DIGESTS_ENV,
    RACE_WEIGHTS,
    TorchXRayVisionClassifiers,
)

pytestmark = pytest.mark.xrv


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv(DIGESTS_ENV, raising=False)
    (tmp_path / "home").mkdir()
    return tmp_path / "home"


class Payload:
    """Unpickling this runs code: it creates ``marker`` (what a planted weight file could do)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_missing_weights_are_listed_before_anything_is_built_or_fetched(home):
    with pytest.raises(ModelLoadError) as caught:
        load_classifiers("torchxrayvision")
    message = str(caught.value)
    assert "never downloaded" in message and RACE_WEIGHTS in message and AGE_WEIGHTS in message
    assert "densenet121" in message and ".torchxrayvision/models_data" in message
    assert list(home.iterdir()) == []  # no cache folder made, nothing fetched


def test_weights_from_the_cache_load_and_read_films(home, monkeypatch):
    cache = home / ".torchxrayvision" / "models_data"
    monkeypatch.setenv(DIGESTS_ENV, str(write_xrv_weights(cache)))
    classifiers = load_classifiers("torchxrayvision")
    assert isinstance(classifiers, TorchXRayVisionClassifiers) and "real" in classifiers.caveat
    rng = np.random.default_rng(0)
    films = [rng.random((300, 260), dtype=np.float32), rng.random((256, 256), dtype=np.float32)]
    predicted = classifiers.predict(films)
    assert predicted.findings.shape == (2, 5) and predicted.features.shape == (2, 1024)
    assert np.allclose(predicted.race.sum(1), 1, atol=1e-5) and predicted.sex_female is None
    # the five columns are the named pathologies of the DenseNet's own output, on its own preprocessing
    crop, resize = xrv.datasets.XRayCenterCrop(), xrv.datasets.XRayResizer(224)
    direct_input = torch.from_numpy(resize(crop(xrv.utils.normalize(films[0], 1.0)[None])))[None]
    with torch.no_grad():
        direct = classifiers.densenet(direct_input)[0]
    for column, name in enumerate(PATHOLOGIES):
        assert predicted.findings[0, column] == pytest.approx(
            float(direct[classifiers.densenet.pathologies.index(name)]), abs=1e-5
        )
    # the age model saw the film through the same preprocessing at 320 px
    age_input = torch.from_numpy(
        xrv.datasets.XRayResizer(320)(crop(xrv.utils.normalize(films[1], 1.0)[None]))
    )
    scaled = float(((age_input + 1024) / 2048).mean())
    means, stds = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # the AgeModel's ImageNet normalisation
    expected_age = 40 + 10 * np.mean([(scaled - m) / s for m, s in zip(means, stds)])
    assert predicted.age[1] == pytest.approx(expected_age, abs=0.05)


def test_a_weights_dir_holds_all_three_files_and_a_bad_file_is_refused(home, tmp_path, monkeypatch):
    elsewhere = tmp_path / "weights"
    digests = write_xrv_weights(elsewhere, "densenet121-res224-mimic_ch")
    monkeypatch.setenv(DIGESTS_ENV, str(digests))
    classifiers = TorchXRayVisionClassifiers.from_weights(elsewhere, densenet="densenet121-res224-mimic_ch")
    assert "mimic_ch" in classifiers.name and classifiers.predict(
        [np.full((64, 64), 0.5, np.float32)]
    ).age.shape == (1,)
    assert os.environ["HOME"] == str(home) and list(home.iterdir()) == []  # HOME back, nothing left
    assert sorted(p.name for p in elsewhere.iterdir()) == sorted(
        [AGE_WEIGHTS, RACE_WEIGHTS, "mimic_ch-densenet121-d121-tw-lr001-rot45-tr15-sc15-seed0-best.pt"]
    )
    (elsewhere / AGE_WEIGHTS).write_bytes(b"not a model")
    with pytest.raises(ModelLoadError, match=f"AgeModel: {elsewhere / AGE_WEIGHTS} has SHA-256"):
        TorchXRayVisionClassifiers.from_weights(elsewhere, densenet="densenet121-res224-mimic_ch")
    write_digests(elsewhere, digests)  # pinned as it is: it passes the check and fails to load
    with pytest.raises(ModelLoadError, match="cannot be loaded"):
        TorchXRayVisionClassifiers.from_weights(elsewhere, densenet="densenet121-res224-mimic_ch")
    assert os.environ["HOME"] == str(home)


@pytest.mark.parametrize("densenet", list(DENSENET_FILES))
def test_a_planted_pickle_is_refused_before_torchxrayvision_unpickles_it(
    home, tmp_path, monkeypatch, densenet
):
    cache = home / ".torchxrayvision" / "models_data"
    digests = write_xrv_weights(cache, densenet)
    marker = tmp_path / "code-ran"
    planted = cache / DENSENET_FILES[densenet]
    torch.save(Payload(marker), planted)
    with pytest.raises(pickle.UnpicklingError):  # the payload is real: torch's safe loader refuses it...
        torch.load(planted, weights_only=True)
    torch.load(planted, weights_only=False)  # ...and torchxrayvision's unpickling would run it
    assert marker.exists()
    marker.unlink()

    def never(*args, **kwargs):
        pytest.fail("a torchxrayvision loader ran on an unchecked file")

    monkeypatch.setattr(torch, "load", never)
    monkeypatch.setattr(torch.jit, "load", never)
    with pytest.raises(ModelLoadError) as unpinned:  # no digest file: nothing is pinned but the released -all
        TorchXRayVisionClassifiers.from_weights(densenet=densenet)
    assert "no pinned SHA-256" in str(unpinned.value) and RACE_WEIGHTS in str(unpinned.value)
    monkeypatch.setenv(DIGESTS_ENV, str(digests))  # pins the stand-ins, not the planted file
    with pytest.raises(ModelLoadError, match=f"{densenet}: {planted} has SHA-256 .* not the pinned"):
        TorchXRayVisionClassifiers.from_weights(densenet=densenet)
    assert not marker.exists() and os.environ["HOME"] == str(home)


def test_the_evaluation_runs_on_torchxrayvision(home, tmp_path, monkeypatch):
    """``instructx2x-train evaluate --classifiers torchxrayvision`` end to end (random weights:
    the figures mean nothing, the path is what is tested)."""
    from instructx2x_train.counterfactuals import PurePairsConfig, write_pure_pairs
    from instructx2x_train.evaluation import EvaluationConfig, evaluate

    monkeypatch.setenv(DIGESTS_ENV, str(write_xrv_weights(home / ".torchxrayvision" / "models_data")))
    write_pure_pairs(
        tmp_path / "pairs",
        PurePairsConfig(pairs=4, seed=7, resolution=128, split="test", other_finding_probability=0.0),
    )
    report = evaluate(
        tmp_path / "report",
        EvaluationConfig(
            model="demo",
            dataset=str(tmp_path / "pairs"),
            modes=("rse",),
            classifiers="torchxrayvision",
            bootstrap=5,
        ),
        progress_bar=False,
    )
    assert report["classifiers"]["name"] == "torchxrayvision (densenet121-res224-all)"
    assert (
        set(report["rows"]) == {"real images", "rse"}
        and 0 <= report["rows"]["rse"]["pathology_accuracy"] <= 100
    )
    assert (tmp_path / "report" / "evaluation.md").is_file()


def test_auto_verification_reads_a_real_dicom_film_with_torchxrayvision_when_its_weights_pass(
    home, monkeypatch
):
    from dicom_factory import pydicom_data_file

    from instructx2x.dicom.read import read_dicom
    from instructx2x.verification import _load_cached, _torchxrayvision_or_refusal, choose_classifiers

    class DemoCard:
        card = {"classifiers": "cohort-v2"}

    def fresh_process():
        _load_cached.cache_clear()
        _torchxrayvision_or_refusal.cache_clear()

    fresh_process()
    film = read_dicom(pydicom_data_file("RG1_UNCR.dcm"))
    assert choose_classifiers("auto", DemoCard(), film)[1] == "the model's card names it"  # no weights yet
    digests = write_xrv_weights(home / ".torchxrayvision" / "models_data")
    chosen, why = choose_classifiers("auto", DemoCard(), film)  # present, the stand-ins unpinned: refused
    assert chosen.name == "cohort-v2" and "weights are present but refused" in why and AGE_WEIGHTS in why
    fresh_process()
    monkeypatch.setenv(DIGESTS_ENV, str(digests))
    chosen, why = choose_classifiers("auto", DemoCard(), film)
    assert chosen.name.startswith("torchxrayvision") and "DICOM film" in why
    fresh_process()
