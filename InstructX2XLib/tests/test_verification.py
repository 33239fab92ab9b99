"""Per-edit verification: the verdict rules, the zones, and the classifier sets' loading."""

import hashlib
import json
import os
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from instructx2x.classifiers import (
    COHORT_SET_NAME,
    PATHOLOGIES,
    RACES,
    ClassifierSet,
    CohortClassifiers,
    CohortNetwork,
    Predictions,
    load_classifiers,
    save_cohort_classifiers,
)
from instructx2x.errors import ModelLoadError, ParameterError
from instructx2x.verification import (
    _load_cached,
    _torchxrayvision_or_refusal,
    choose_classifiers,
    lung_zones,
    verify_edit,
)
from instructx2x.xrv_classifiers import AGE_WEIGHTS, DENSENET_FILES, DIGESTS_ENV, PINNED_SHA256, RACE_WEIGHTS


class RegionReader(ClassifierSet):
    """A transparent classifier for testing the rules: each finding's probability is the mean
    brightness of one region of the film (effusion: the image's lower right, the patient's
    left base on a PA film), age is 100 x the mean of the top band, race follows the left edge."""

    name, caveat = "region reader", "test double"
    regions = {
        "Atelectasis": (slice(0, 20), slice(0, 20)),
        "Cardiomegaly": (slice(30, 50), slice(25, 40)),
        "Edema": (slice(0, 20), slice(44, 64)),
        "Effusion": (slice(48, 64), slice(40, 64)),
        "Pneumothorax": (slice(20, 30), slice(0, 10)),
    }

    def predict(self, images, batch_size=32):
        images = np.stack(images)
        findings = np.stack([images[:, r, c].mean(axis=(1, 2)) for r, c in self.regions.values()], 1)
        edge = images[:, :, :4].mean(axis=(1, 2))
        race = np.stack([edge, np.full_like(edge, 0.1), 1 - edge], 1)
        return Predictions(
            findings=findings,
            age=100 * images[:, :4].mean(axis=(1, 2)),
            race=race / race.sum(1, keepdims=True),
            features=images.reshape(len(images), -1),
            sex_female=None,
        )


@pytest.fixture
def film():
    image = np.full((64, 64), 0.3, np.float32)
    image[:, :4] = 0.8  # race reading: the first class
    return image


def test_an_edit_that_adds_the_finding_where_it_belongs_passes(film):
    edited = film.copy()
    mask = np.zeros(film.shape, bool)
    mask[48:, 40:] = True
    edited[mask] = 0.9
    report = verify_edit(film, edited, mask, "Add the finding of left pleural effusion", RegionReader())
    assert report.passed and not report.failed and not report.collateral
    assert report.instructed == ("Effusion",) and report.expected["Effusion"] is True
    assert report.findings_before["Effusion"] == pytest.approx(0.3) and report.findings_after[
        "Effusion"
    ] == pytest.approx(0.9)
    assert report.max_change_outside_mask == 0
    assert max(report.zones, key=report.zones.__getitem__) == "left lower"  # image right = patient's left
    assert "PASSED" in report.summary()
    json.loads(json.dumps(report.to_dict()))  # JSON-ready


def test_an_edit_that_did_not_move_the_finding_is_flagged_failed(film):
    mask = np.zeros(film.shape, bool)
    mask[48:, 40:] = True
    report = verify_edit(film, film.copy(), mask, "Add the finding of left pleural effusion", RegionReader())
    assert not report.passed and report.failed and report.failed[0].startswith("Effusion: expected present")
    assert "FLAGGED" in report.summary() and "failed edit" in report.summary()


def test_collateral_changes_and_pixels_outside_the_mask_are_flagged(film):
    edited = film.copy()
    mask = np.zeros(film.shape, bool)
    mask[48:, 40:] = True
    edited[mask] = 0.9
    edited[30:50, 25:40] = 0.9  # cardiomegaly region, outside the mask
    edited[:4, :] = 0.9  # age band
    report = verify_edit(film, edited, mask, "Add the finding of left pleural effusion", RegionReader())
    assert not report.failed
    assert any(item.startswith("Cardiomegaly") for item in report.collateral)
    assert any(item.startswith("age") for item in report.collateral)
    assert report.max_change_outside_mask == pytest.approx(0.6)
    assert not report.passed and "outside the edit mask" in report.summary()


def test_remove_expects_absence_and_shapes_are_checked_first(film):
    bright = film.copy()
    bright[48:, 40:] = 0.9
    mask = np.zeros(film.shape, bool)
    mask[48:, 40:] = True
    report = verify_edit(bright, film, mask, "Remove the finding of pleural effusion", RegionReader())
    assert report.expected["Effusion"] is False and not report.failed
    with pytest.raises(ParameterError, match="one 2-D grid"):
        verify_edit(film, film[:10], mask, "Remove the finding of pleural effusion", RegionReader())


def test_a_finding_the_classifiers_do_not_read_is_said_so(film):
    mask = np.zeros(film.shape, bool)
    mask[48:, 40:] = True
    report = verify_edit(film, film.copy(), mask, "Add the finding of left consolidation", RegionReader())
    assert report.instructed == () and report.passed
    assert "not one of the five the classifiers read" in report.summary()


def test_lung_zones_follow_the_pa_convention():
    mask = np.zeros((90, 60), bool)
    mask[5:20, 5:20] = True  # image upper left: the patient's right upper zone
    zones = lung_zones(mask)
    assert zones["right upper"] == pytest.approx(1.0) and sum(zones.values()) == pytest.approx(1.0)


def test_bundled_cohort_set_loads_offline_and_reads_any_film_size():
    classifiers = load_classifiers(COHORT_SET_NAME)
    assert isinstance(classifiers, CohortClassifiers) and "phantoms" in classifiers.caveat
    held_out = classifiers.card["held_out"]
    assert set(held_out["finding_accuracy"]) == set(PATHOLOGIES)
    films = [np.random.default_rng(0).random((100, 80), dtype=np.float32), np.zeros((256, 256), np.float32)]
    predicted = classifiers.predict(films)
    assert predicted.findings.shape == (2, len(PATHOLOGIES)) and predicted.race.shape == (2, len(RACES))
    assert predicted.sex_female is not None and predicted.sex_female.shape == (2,)
    assert np.allclose(predicted.race.sum(1), 1, atol=1e-5)


def test_auto_picks_the_set_that_fits_the_input_and_says_why(png):
    from pathlib import Path

    from instructx2x.dicom.read import read_dicom
    from instructx2x.image_io import read_image

    class DemoCard:
        card = {"classifiers": COHORT_SET_NAME}

    phantom = read_dicom(Path(__file__).resolve().parents[2] / "Resources" / "Samples" / "phantom_pa.dcm")
    chosen, why = choose_classifiers("auto", None, phantom)
    assert chosen.name == COHORT_SET_NAME and why == "the input is a synthetic-cohort phantom"
    chosen, why = choose_classifiers("auto", DemoCard(), read_image(png))
    assert chosen.name == COHORT_SET_NAME and why == "the model's card names it"
    assert choose_classifiers(COHORT_SET_NAME, None)[1] == "asked for"


def test_a_saved_set_round_trips_and_broken_sets_are_refused(tmp_path):
    torch.manual_seed(0)
    network = CohortNetwork(8)
    folder = tmp_path / "set"
    folder.mkdir()
    save_cohort_classifiers(network, {"resolution": 64, "width": 8}, folder)
    loaded = load_classifiers(str(folder))
    film = np.random.default_rng(1).random((64, 64), dtype=np.float32)
    with torch.no_grad():
        direct = torch.sigmoid(network.eval()(torch.from_numpy(film)[None, None])["findings"]).numpy()
    assert np.allclose(loaded.predict([film]).findings, direct, atol=1e-6)
    # weights of another width: the card's network does not take them
    other = tmp_path / "other"
    other.mkdir()
    save_cohort_classifiers(CohortNetwork(4), {"resolution": 64, "width": 4}, other)
    (other / "classifiers.safetensors").replace(folder / "classifiers.safetensors")
    fit = r"do not fit the network of width 8 its card describes: 58 tensor\(s\) of another shape"
    with pytest.raises(
        ModelLoadError, match=fit + r".*first: body.0.weight \(4, 1, 5, 5\) for \(8, 1, 5, 5\)"
    ):
        load_classifiers(str(folder))
    (folder / "classifiers.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ModelLoadError, match="classifier set set cannot be read: .*header"):
        load_classifiers(str(folder))
    (folder / "classifiers.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="classifiers.safetensors is missing"):
        load_classifiers(str(folder))
    with pytest.raises(ModelLoadError, match="unknown classifier set"):
        load_classifiers("no-such-set")


def test_torchxrayvision_without_its_packages_is_a_clear_error():
    pytest.importorskip("torch")
    try:
        import torchxrayvision  # noqa: F401
    except (ImportError, RuntimeError):
        with pytest.raises(ModelLoadError, match="install the eval extra"):
            load_classifiers("torchxrayvision")
    else:
        pytest.skip("torchxrayvision is installed here: test_xrv_classifiers covers it")


class FakeXrv:
    """torchxrayvision's interface, its loaders recording the bytes they would load."""

    def __init__(self, fail: bool = False):
        self.read: dict[str, bytes] = {}
        self.fail = fail
        fake = self

        def load(label, path):
            if fake.fail:
                pytest.fail(f"a torchxrayvision loader ran on an unchecked {label}")
            fake.read[label] = Path(path).read_bytes()
            return Loaded()

        class Loaded:
            pathologies = list(PATHOLOGIES)
            targets = list(RACES)

            def eval(self):
                return self

        class Models:
            model_urls = {
                name: {"weights_url": f"https://example.invalid/{file}"}
                for name, file in DENSENET_FILES.items()
            }

            @staticmethod
            def DenseNet(weights, cache_dir):
                fake.before_load()
                return load("DenseNet", Path(cache_dir) / DENSENET_FILES[weights])

        cache = lambda name: Path(os.environ["HOME"]) / ".torchxrayvision" / "models_data" / name  # noqa: E731
        self.models = Models
        self.baseline_models = SimpleNamespace(
            emory_hiti=SimpleNamespace(RaceModel=lambda: load("RaceModel", cache(RACE_WEIGHTS))),
            riken=SimpleNamespace(AgeModel=lambda: load("AgeModel", cache(AGE_WEIGHTS))),
        )

    def before_load(self):
        """Runs when the first loader starts (a test swaps a file here)."""


@pytest.fixture
def planted(tmp_path, monkeypatch):
    """A temporary home whose torchxrayvision cache holds tiny files in place of the weights."""
    import instructx2x.xrv_classifiers as module

    home = tmp_path / "home"
    cache = home / ".torchxrayvision" / "models_data"
    cache.mkdir(parents=True)
    for name in (DENSENET_FILES["densenet121-res224-all"], RACE_WEIGHTS, AGE_WEIGHTS):
        (cache / name).write_bytes(b"planted: " + name.encode())
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv(DIGESTS_ENV, raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # where the checked copies go
    (tmp_path / "tmp").mkdir()
    fake = FakeXrv(fail=True)
    monkeypatch.setattr(module, "_import_xrv", lambda: fake)
    _load_cached.cache_clear()
    _torchxrayvision_or_refusal.cache_clear()
    yield SimpleNamespace(home=home, cache=cache, fake=fake, tmp=tmp_path / "tmp")
    _load_cached.cache_clear()
    _torchxrayvision_or_refusal.cache_clear()


def pin(path: Path, cache: Path, **digests: str) -> Path:
    """A digest file: each file in ``cache`` pinned as it is, or as ``digests`` says."""
    lines = [
        f"{digests.get(p.name, hashlib.sha256(p.read_bytes()).hexdigest())}  {p.name}"
        for p in cache.iterdir()
    ]
    path.write_text("# pinned for the test\n" + "\n".join(lines) + "\n")
    return path


def test_unpinned_weight_files_are_refused_with_how_to_pin_them(planted):
    with pytest.raises(ModelLoadError) as caught:
        load_classifiers("torchxrayvision")
    message = str(caught.value)
    assert "no pinned SHA-256" in message and DIGESTS_ENV in message and "sha256sum" in message
    assert f"RaceModel: {planted.cache / RACE_WEIGHTS}" in message
    assert f"AgeModel: {planted.cache / AGE_WEIGHTS}" in message
    assert "densenet121" not in message  # pinned by the module itself
    assert list(planted.tmp.iterdir()) == [] and os.environ["HOME"] == str(planted.home)


def test_a_planted_file_with_another_digest_is_refused_by_name_before_any_loader_runs(
    planted, tmp_path, monkeypatch
):
    monkeypatch.setenv(
        DIGESTS_ENV, str(pin(tmp_path / "xrv.sha256", planted.cache, **{AGE_WEIGHTS: "a" * 64}))
    )
    with pytest.raises(ModelLoadError, match="never loaded") as caught:
        load_classifiers("torchxrayvision")
    message = str(caught.value)
    age = hashlib.sha256((planted.cache / AGE_WEIGHTS).read_bytes()).hexdigest()
    assert f"AgeModel: {planted.cache / AGE_WEIGHTS} has SHA-256 {age}, not the pinned {'a' * 64}" in message
    assert "RaceModel" not in message and "densenet121-res224-all" not in message  # those match their pins
    assert list(planted.tmp.iterdir()) == [] and os.environ["HOME"] == str(planted.home)


def test_the_module_pins_the_released_densenet_so_a_planted_one_is_refused(planted, tmp_path, monkeypatch):
    digests = pin(tmp_path / "xrv.sha256", planted.cache)
    text = digests.read_text().splitlines()
    digests.write_text(
        "\n".join(line for line in text if "densenet121" not in line) + "\n"
    )  # the user pins only two
    monkeypatch.setenv(DIGESTS_ENV, str(digests))
    with pytest.raises(
        ModelLoadError,
        match=f"densenet121-res224-all: {planted.cache}/nih-pc-chex.* not the pinned "
        f"{PINNED_SHA256[DENSENET_FILES['densenet121-res224-all']]}",
    ):
        load_classifiers("torchxrayvision")


def test_pinned_files_load_from_the_checked_copies_even_if_the_cache_changes_meanwhile(
    planted, tmp_path, monkeypatch
):
    monkeypatch.setenv(DIGESTS_ENV, str(pin(tmp_path / "xrv.sha256", planted.cache)))
    checked = {p.name: p.read_bytes() for p in planted.cache.iterdir()}
    planted.fake.fail = False
    planted.fake.before_load = lambda: [
        path.write_bytes(b"swapped in after the check") for path in planted.cache.iterdir()
    ]
    loaded = load_classifiers("torchxrayvision")
    assert loaded.name == "torchxrayvision (densenet121-res224-all)"
    assert planted.fake.read == {
        "DenseNet": checked[DENSENET_FILES["densenet121-res224-all"]],
        "RaceModel": checked[RACE_WEIGHTS],
        "AgeModel": checked[AGE_WEIGHTS],
    }
    assert list(planted.tmp.iterdir()) == [] and os.environ["HOME"] == str(planted.home)


def test_the_users_digest_file_must_be_well_formed_and_outside_the_weights_folder(
    planted, tmp_path, monkeypatch
):
    monkeypatch.setenv(DIGESTS_ENV, str(pin(planted.cache / "inside.sha256", planted.cache)))
    with pytest.raises(ModelLoadError, match="inside the weights folder"):
        load_classifiers("torchxrayvision")
    (planted.cache / "inside.sha256").unlink()
    (tmp_path / "bad.sha256").write_text("# comment\n\nnot-a-digest  file.pt\n")
    monkeypatch.setenv(DIGESTS_ENV, str(tmp_path / "bad.sha256"))
    with pytest.raises(ModelLoadError, match="bad.sha256 line 3"):
        load_classifiers("torchxrayvision")
    monkeypatch.setenv(DIGESTS_ENV, str(tmp_path / "missing.sha256"))
    with pytest.raises(ModelLoadError, match="not a file"):
        load_classifiers("torchxrayvision")


def test_auto_falls_back_to_the_cards_set_with_a_note_when_torchxrayvision_is_refused(planted):
    from dicom_factory import make_radiograph, write

    from instructx2x.dicom.read import read_dicom

    class DemoCard:
        card = {"classifiers": COHORT_SET_NAME}

    film = read_dicom(write(make_radiograph(), planted.home / "film.dcm"))
    chosen, why = choose_classifiers("auto", DemoCard(), film)
    assert chosen.name == COHORT_SET_NAME
    assert why.startswith("the model's card names it; torchxrayvision's weights are present but refused:")
    assert "no pinned SHA-256" in why and RACE_WEIGHTS in why
    with pytest.raises(ModelLoadError, match="no pinned SHA-256"):  # no set named: auto refuses
        choose_classifiers("auto", None, film)


def test_a_torchxrayvision_that_loads_another_densenet_file_is_refused(planted, monkeypatch):
    monkeypatch.setitem(
        planted.fake.models.model_urls,
        "densenet121-res224-all",
        {"weights_url": "https://example.invalid/other.pt"},
    )
    with pytest.raises(
        ModelLoadError, match="loads other.pt for densenet121-res224-all, not the v1 release file"
    ):
        load_classifiers("torchxrayvision")
