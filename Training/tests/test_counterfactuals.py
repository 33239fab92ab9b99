"""Cohort v2 phantoms and pure counterfactual pairs: determinism, purity, laterality, levels,
demographic traces, insertion into a real film."""

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from instructx2x.instructions import parse_instruction
from instructx2x_train import counterfactuals
from instructx2x_train.counterfactuals import (
    PurePairsConfig,
    insert_finding,
    pairs_config,
    plausible_targets,
    write_pure_pairs,
)
from instructx2x_train.phantom import (
    LATERALISED_FINDINGS,
    LUNG_ZONES,
    RENDERED_FINDINGS,
    ZONED_FINDINGS,
    Anatomy,
    FindingState,
    Pose,
    draw_finding,
    render_attenuation,
    render_frontal,
)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pure") / "pairs"
    # 32 pairs: every finding x operation x side once
    write_pure_pairs(root, PurePairsConfig(pairs=32, seed=5, resolution=96))
    return root


def _film(root: Path, kind: str, pair_id: str) -> np.ndarray:
    return np.asarray(Image.open(root / kind / f"{pair_id}.png"))


def _tree_bytes(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_with_one_or_two_workers(pairs, tmp_path):
    again = tmp_path / "again"
    write_pure_pairs(again, PurePairsConfig(pairs=32, seed=5, resolution=96, workers=2))
    assert _tree_bytes(again) == _tree_bytes(pairs)
    other = tmp_path / "other"
    write_pure_pairs(other, PurePairsConfig(pairs=4, seed=6, resolution=96))
    assert _film(other, "past", "0006-0000000").tobytes() != _film(pairs, "past", "0005-0000000").tobytes()


def test_pairs_differ_only_inside_the_lesion_and_follow_the_operation(pairs):
    truth = pd.read_csv(pairs / "truth.csv", dtype=str, keep_default_na=False)
    assert sorted(set(truth.finding)) == sorted(RENDERED_FINDINGS)
    assert set(truth.operation) == {"add", "remove"}
    for row in truth.itertuples():
        past, current = _film(pairs, "past", row.pair_id), _film(pairs, "current", row.pair_id)
        with_finding = "current" if row.operation == "add" else "past"
        with np.load(pairs / with_finding / f"{row.pair_id}.masks.npz") as masks:
            lesion = masks[row.finding]
        with np.load(
            pairs / ("past" if with_finding == "current" else "current") / f"{row.pair_id}.masks.npz"
        ) as masks:
            assert row.finding not in masks.files
        changed = past != current
        assert changed.any(), row.pair_id
        assert not (changed & ~lesion).any(), row.pair_id
        assert row.instruction.startswith(
            "Add the finding of" if row.operation == "add" else "Remove the finding of"
        )


def test_every_lateralised_finding_is_drawn_on_the_patients_side(pairs):
    truth = pd.read_csv(pairs / "truth.csv", dtype=str, keep_default_na=False)
    checked = set()
    for row in truth[truth.side != ""].itertuples():
        kind = "current" if row.operation == "add" else "past"
        with np.load(pairs / kind / f"{row.pair_id}.masks.npz") as masks:
            columns = np.nonzero(masks[row.finding])[1]
        # PA convention: the patient's left is the image's right
        assert (columns.mean() > 48) == (row.side == "left"), (row.finding, row.side)
        assert f" {row.side} " in f" {row.instruction} "
        checked.add((row.finding, row.side))
    assert checked == {(f, s) for f in LATERALISED_FINDINGS for s in ("left", "right")}


@pytest.mark.parametrize("name", ZONED_FINDINGS)
def test_a_focal_opacity_lies_in_the_lung_zone_its_instruction_names(name, pairs):
    """Upper above mid above lower for every draw, so that 'left upper zone' tells the model
    where to paint; the pairs' instructions and truth name the zone."""
    rng = np.random.default_rng(8)
    rows: dict[str, list] = {zone: [] for zone in LUNG_ZONES}
    for index in range(24):
        finding = draw_finding(rng, name, "right")
        _, masks = render_frontal(
            96, 96, [finding], Pose(), np.random.default_rng(index), Anatomy(seed=index)
        )
        rows[finding.zone].append(np.nonzero(masks[name])[0].mean())
    assert all(rows.values()), rows
    assert max(rows["upper"]) < min(rows["mid"]) and max(rows["mid"]) < min(rows["lower"]), rows
    truth = pd.read_csv(pairs / "truth.csv", dtype=str, keep_default_na=False)
    for row in truth.itertuples():
        if row.finding in ZONED_FINDINGS:
            assert row.zone in LUNG_ZONES and f" {row.side} {row.zone} zone {row.finding}" in row.instruction
        else:
            assert row.zone == "" and "zone" not in row.instruction
        assert parse_instruction(row.instruction).zones == (
            (row.zone,) if row.zone else ()
        )  # the library reads it
    with pytest.raises(ValueError, match="zone must be one of upper, mid, lower"):
        FindingState(name, "mild", zone="apical")


def test_pure_pairs_put_a_focal_opacity_at_the_centre_of_the_zone_named():
    """The instruction names the zone and nothing finer, so the truth must not ask for more: the
    instructed finding and the other one sit at their zone's centre (the cohort's films, which
    carry no instruction, keep drawing a site anywhere in the zone)."""
    config = PurePairsConfig(pairs=64, seed=5, other_finding_probability=1.0)
    zoned = 0
    for index in range(config.pairs):
        _, target, other = counterfactuals._plan(config, index, np.random.default_rng([config.seed, index]))
        for finding in (target, other):
            if finding.name in ZONED_FINDINGS:
                zoned += 1
                assert finding.location == (0.0, 0.0), (index, finding)
    assert zoned >= 20
    assert draw_finding(np.random.default_rng(0), "consolidation", "left").location != (0.0, 0.0)


def test_plausible_targets_redraw_only_what_the_instruction_leaves_open(pairs):
    """A removal's target, an effusion's (sited by anatomy) and a ground-glass opacity's (no
    texture) are what the instruction says; consolidation and pneumonia keep their site, the
    centre of the zone named, and take other bronchograms and lobules, on the same patient,
    pose and noise."""
    config = pairs_config(pairs)
    assert config == PurePairsConfig(pairs=32, seed=5, resolution=96)
    truth = pd.read_csv(pairs / "truth.csv", dtype=str, keep_default_na=False).set_index("pair_id")
    for pair_id, row in truth.iterrows():
        current = _film(pairs, "current", pair_id)
        drawn = plausible_targets(config, pair_id, 2)
        as_written = [np.round(d * 255).astype(np.uint8) for d in drawn]
        if row.operation == "remove" or row.finding in (
            "pleural effusion",
            "cardiomegaly",
            "pneumothorax",
            "atelectasis",
            "lung opacity",
        ):
            assert all(np.array_equal(d, current) for d in as_written), (pair_id, row.finding)
        elif row.finding in ZONED_FINDINGS:
            past = _film(pairs, "past", pair_id)
            with np.load(pairs / "current" / f"{pair_id}.masks.npz") as masks:
                lesion = np.nonzero(masks[row.finding])
            for d in as_written:
                assert not np.array_equal(d, current), pair_id
                changed = np.nonzero(d != past)
                assert (changed[1].mean() > 48) == (row.side == "left"), pair_id
                # the same site: only pneumonia's lobules, drawn anew, move where it changes the film
                tolerance = 0.1 * 96 if row.finding == "pneumonia" else 0.5
                for axis in (0, 1):
                    assert abs(changed[axis].mean() - lesion[axis].mean()) < tolerance, (pair_id, axis)
            assert not np.array_equal(as_written[0], as_written[1])
    with pytest.raises(ValueError, match="not written with seed 6"):
        plausible_targets(PurePairsConfig(pairs=32, seed=6, resolution=96), "0005-0000001", 1)


@pytest.mark.parametrize("name", RENDERED_FINDINGS)
def test_level_words_change_the_extent(name):
    areas = []
    for level in ("minimal", "moderate", "severe"):
        _, masks = render_frontal(
            128,
            128,
            [FindingState(name, level, "left", (0.2, 0.1), seed=3)],
            Pose(),
            np.random.default_rng(0),
            Anatomy(seed=4),
        )
        areas.append(int(masks[name].sum()))
    assert areas[0] < areas[1] < areas[2], areas


def test_demographic_traces():
    def attenuation(**kwargs):
        return render_attenuation(128, 128, Anatomy(**{"seed": 2, **kwargs}), [], Pose())

    young, old = attenuation(age=25), attenuation(age=85)
    spine = (slice(20, 60), slice(60, 68))  # vertebral column above the heart
    assert young[spine].mean() > old[spine].mean()  # bone density falls with age
    knob = (slice(36, 46), slice(68, 76))  # the aortic knob widens with age
    assert old[knob].mean() > young[knob].mean()
    male, female = attenuation(sex="M"), attenuation(sex="F")
    lower_zone = (slice(70, 90), slice(20, 40))
    assert female[lower_zone].mean() > male[lower_zone].mean()  # breast shadows
    wall = (slice(40, 80), slice(2, 12))
    assert attenuation(race="Black")[wall].mean() > attenuation(race="White")[wall].mean()
    narrow = Anatomy.draw(np.random.default_rng(1), 50, "M", "Asian")
    wide = Anatomy.draw(np.random.default_rng(1), 50, "M", "White")
    assert narrow.habitus < wide.habitus


def test_insertion_into_a_real_film_keeps_the_rest_bit_identical(tmp_path):
    from dicom_factory import pydicom_data_file

    backgrounds = tmp_path / "normals"
    backgrounds.mkdir()
    shutil.copy(pydicom_data_file("RG1_UNCR.dcm"), backgrounds / "rg1.dcm")
    root = tmp_path / "inserted"
    write_pure_pairs(
        root,
        PurePairsConfig(
            pairs=4,
            seed=1,
            resolution=128,
            backgrounds=str(backgrounds),
            findings=("pleural effusion", "consolidation"),
        ),
    )
    truth = pd.read_csv(root / "truth.csv", dtype=str, keep_default_na=False)
    assert set(truth.background) == {"rg1.dcm"} and set(truth.age) == {""}
    for row in truth.itertuples():
        without = _film(root, "past" if row.operation == "add" else "current", row.pair_id)
        with_finding = _film(root, "current" if row.operation == "add" else "past", row.pair_id)
        with np.load(
            root / ("current" if row.operation == "add" else "past") / f"{row.pair_id}.masks.npz"
        ) as m:
            lesion = m[row.finding]
        assert lesion.any() and np.array_equal(without[~lesion], with_finding[~lesion])
        if row.finding == "pleural effusion":  # fluid is denser than aerated lung
            assert with_finding[lesion].mean() > without[lesion].mean()

    film = np.linspace(0.2, 0.8, 64 * 64, dtype=np.float32).reshape(64, 64)
    edited, lesion = insert_finding(film, FindingState("consolidation", "severe", "right", seed=1))
    assert np.array_equal(edited[~lesion], film[~lesion]) and lesion[:, :32].sum() > lesion[:, 32:].sum()


def test_bad_settings_change_nothing(tmp_path):
    with pytest.raises(ValueError, match="findings must be among"):
        PurePairsConfig(findings=("fracture",))
    with pytest.raises(ValueError, match="operations"):
        PurePairsConfig(operations=("change",))
    with pytest.raises(FileNotFoundError, match="backgrounds folder not found"):
        PurePairsConfig(backgrounds=str(tmp_path / "missing"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no DICOM/PNG/JPEG films"):
        write_pure_pairs(tmp_path / "out", PurePairsConfig(pairs=2, backgrounds=str(empty)))
    assert not (tmp_path / "out").exists()
    existing = tmp_path / "exists"
    existing.mkdir()
    with pytest.raises(FileExistsError):
        write_pure_pairs(existing, PurePairsConfig(pairs=2, resolution=64))
    assert list(existing.iterdir()) == []
