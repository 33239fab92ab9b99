import json

import numpy as np
import pytest

from instructx2x.instructions import PRIOR_CATEGORIES, parse_instruction
from instructx2x.priors import PUBLISHED_MASK_EXTENTS, PriorSet, approximate_prior, write_prior_set


@pytest.fixture(scope="module")
def default_priors():
    return PriorSet.default()


def test_shipped_priors_have_published_coverage_and_extent(default_priors):
    assert set(default_priors.masks) == set(PRIOR_CATEGORIES)
    for category, (coverage, rows, cols) in PUBLISHED_MASK_EXTENTS.items():
        mask = default_priors.masks[category]
        assert mask.shape == (512, 512)
        assert abs(mask.mean() - coverage) < 0.002, category
        row_idx, col_idx = np.where(mask.any(1))[0], np.where(mask.any(0))[0]
        assert (row_idx[0], row_idx[-1]) == rows, category
        assert (col_idx[0], col_idx[-1]) == cols, category


def test_shipped_priors_are_reproducible(default_priors):
    for category, spec in PUBLISHED_MASK_EXTENTS.items():
        assert np.array_equal(approximate_prior(*spec).astype(np.float32), default_priors.masks[category])


def test_selection_is_union_of_named_findings(default_priors):
    selection = default_priors.select(parse_instruction("Add the finding of edema and cardiomegaly"))
    expected = np.maximum(default_priors.masks["Edema"], default_priors.masks["Cardiomegaly"])
    assert np.array_equal(selection.mask, expected)
    assert selection.categories == ("Edema", "Cardiomegaly")
    assert not selection.full_image


def test_left_means_image_right_on_pa(default_priors):
    selection = default_priors.select(parse_instruction("Add the finding of left pleural effusion"))
    assert selection.mask[:, :256].sum() == 0
    assert np.array_equal(selection.mask[:, 256:], default_priors.masks["Pleural Effusion"][:, 256:])
    assert selection.laterality == "left"
    unnarrowed = default_priors.select(parse_instruction("Add left pleural effusion"), lateralize=False)
    assert np.array_equal(unnarrowed.mask, default_priors.masks["Pleural Effusion"])


def test_cardiomegaly_is_not_narrowed(default_priors):
    selection = default_priors.select(parse_instruction("Add the finding of left cardiomegaly"))
    assert np.array_equal(selection.mask, default_priors.masks["Cardiomegaly"])


@pytest.mark.parametrize(
    "text,reason",
    [("Make it brighter", "names no known finding"), ("Add the finding of scoliosis", "no prior covers")],
)
def test_full_image_fallback_says_why(default_priors, text, reason):
    selection = default_priors.select(parse_instruction(text))
    assert selection.full_image and reason in selection.reason
    assert selection.mask.min() == 1.0


def test_round_trip_and_no_overwrite(tmp_path):
    rng = np.random.default_rng(0)
    masks = {c: (rng.random((512, 512)) > 0.5).astype(np.uint8) for c in PRIOR_CATEGORIES}
    write_prior_set(tmp_path / "exact", masks, version="test-1", source="unit test")
    loaded = PriorSet.from_directory(tmp_path / "exact")
    assert loaded.version == "test-1"
    for category in PRIOR_CATEGORIES:
        assert np.array_equal(loaded.masks[category], masks[category].astype(np.float32))
    before = (tmp_path / "exact" / "priors.json").read_bytes()
    with pytest.raises(FileExistsError):
        write_prior_set(tmp_path / "exact", masks, version="test-2", source="again")
    assert (tmp_path / "exact" / "priors.json").read_bytes() == before


def test_write_rejects_bad_masks(tmp_path):
    masks = {c: np.zeros((512, 512), np.uint8) for c in PRIOR_CATEGORIES}
    with pytest.raises(ValueError, match="categories"):
        write_prior_set(tmp_path / "a", {k: v for k, v in list(masks.items())[:7]}, version="v", source="s")
    masks["Edema"] = np.zeros((256, 256), np.uint8)
    with pytest.raises(ValueError, match="shape"):
        write_prior_set(tmp_path / "b", masks, version="v", source="s")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_from_directory_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="priors.json"):
        PriorSet.from_directory(tmp_path)
    (tmp_path / "priors.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a prior manifest"):
        PriorSet.from_directory(tmp_path)
    (tmp_path / "priors.json").write_text(json.dumps({"version": "v", "files": {"Edema": "edema.png"}}))
    with pytest.raises(FileNotFoundError, match="edema.png"):
        PriorSet.from_directory(tmp_path)


def test_a_finding_without_prior_widens_the_union_to_the_full_image():
    """docs/method.md section 2, step 4: 'effusion and fracture' may change the ribs too;
    never only the effusion."""
    priors = PriorSet.default()
    mixed = priors.select(parse_instruction("Add the finding of pleural effusion and fracture"))
    assert mixed.full_image and mixed.mask.min() == 1
    assert "fracture" in mixed.reason and "pleural effusion" not in mixed.reason
    covered = priors.select(parse_instruction("Add the finding of pleural effusion and edema"))
    assert not covered.full_image and covered.categories == ("Pleural Effusion", "Edema")
