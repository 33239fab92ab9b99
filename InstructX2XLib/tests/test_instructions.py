from typing import Any

import pytest

from instructx2x.errors import ParameterError
from instructx2x.instructions import (
    FINDINGS,
    MAX_INSTRUCTION_CHARS,
    Laterality,
    Operation,
    parse_instruction,
    parse_series,
)


def test_add_template():
    parsed = parse_instruction("Add the finding of pleural effusion")
    assert parsed.operation is Operation.ADD
    assert parsed.findings == ("pleural effusion",)
    assert parsed.prior_categories == ("Pleural Effusion",)
    assert parsed.laterality is None


def test_remove_with_several_findings_and_synonyms():
    parsed = parse_instruction("Remove the finding of effusions, atelectasis, and infection")
    assert parsed.operation is Operation.REMOVE
    assert parsed.findings == ("pleural effusion", "atelectasis", "pneumonia")
    assert parsed.prior_categories == ("Pleural Effusion", "Atelectasis", "Pneumonia")


def test_change_level_reads_from_and_to():
    parsed = parse_instruction("Change the level of edema from mild to moderate to severe")
    assert parsed.operation is Operation.CHANGE_LEVEL
    assert parsed.findings == ("edema",)
    assert parsed.levels == ("mild", "moderate to severe")


def test_level_words_longest_match_and_laterality():
    parsed = parse_instruction("Add the finding of moderate to large left pleural effusion")
    assert parsed.levels == ("moderate to large",)
    assert parsed.laterality is Laterality.LEFT


def test_both_sides_named_is_bilateral():
    assert parse_instruction("Add left and right pneumothorax").laterality is Laterality.BILATERAL


def test_every_vocabulary_finding_is_recognised():
    for finding in FINDINGS:
        assert parse_instruction(f"Add the finding of {finding}").findings == (finding,)


def test_finding_without_prior_and_unknown_text():
    assert parse_instruction("Add the finding of scoliosis").prior_categories == ()
    parsed = parse_instruction("Make it look nicer")
    assert parsed.operation is Operation.OTHER
    assert parsed.findings == ()


def test_cardiac_synonyms_map_to_cardiomegaly():
    parsed = parse_instruction("Add the finding of enlargement of the cardiac silhouette")
    assert parsed.prior_categories == ("Cardiomegaly",)


@pytest.mark.parametrize(
    "text,message", [("", "empty"), ("   \n", "empty"), ("x" * (MAX_INSTRUCTION_CHARS + 1), "characters")]
)
def test_bad_instructions(text, message):
    with pytest.raises(ValueError, match=message):
        parse_instruction(text)


def test_non_string_instruction():
    not_text: Any = None
    with pytest.raises(TypeError, match="str"):
        parse_instruction(not_text)


def test_to_dict_is_json_ready():
    data = parse_instruction("Add the finding of right pneumothorax").to_dict()
    assert data["operation"] == "add" and data["laterality"] == "right"


@pytest.mark.parametrize(
    "text,zones",
    [
        ("Add the finding of moderate left lower zone consolidation", ("lower",)),
        ("Remove the finding of right upper lobe pneumonia", ("upper",)),
        ("Add the finding of left mid zone lung opacity", ("mid",)),
        ("Add the finding of lingular opacity", ("mid",)),
        ("Add the finding of bibasilar atelectasis", ("lower",)),
        (
            "Add the finding of left apical pneumothorax and right lower lobe consolidation",
            ("upper", "lower"),
        ),
        ("Add the finding of left pleural effusion", ()),
    ],
)
def test_lung_zones_named_in_reports_are_read_top_down(text, zones):
    parsed = parse_instruction(text)
    assert parsed.zones == zones
    assert parsed.to_dict()["zones"] == list(zones)


def test_large_is_a_level_word():
    assert parse_instruction("Add the finding of large left pleural effusion").levels == ("large",)


def test_series_of_levels_fills_the_template_and_takes_its_region_from_the_largest_step():
    series = parse_series(
        ["mild", "Moderate", "severe"], "Add the finding of {level} left lower zone consolidation"
    )
    assert series.instructions == (
        "Add the finding of mild left lower zone consolidation",
        "Add the finding of moderate left lower zone consolidation",
        "Add the finding of severe left lower zone consolidation",
    )
    assert series.levels == ("mild", "moderate", "severe")
    assert (series.direction, series.region_step, series.finding) == ("increasing", 2, "consolidation")
    assert parse_series(["severe", "mild"], "Add the finding of {level} edema").region_step == 0


def test_series_of_level_changes_starts_from_one_level_and_may_decrease():
    series = parse_series(
        [
            "Change the level of edema from severe to moderate",
            "Change the level of edema from severe to mild",
            "Change the level of edema from severe to minimal",
        ]
    )
    assert (series.levels, series.direction, series.region_step) == (
        ("moderate", "mild", "minimal"),
        "decreasing",
        2,
    )
    assert series.to_dict()["region_instruction"] == "Change the level of edema from severe to minimal"
    # the farthest grade from the input's level gives the region, whichever way the steps go
    crossing = parse_series(
        [
            "Change the level of edema from moderate to mild",
            "Change the level of edema from moderate to massive",
        ]
    )
    assert crossing.region_step == 1


@pytest.mark.parametrize(
    "steps,template,message",
    [
        (["mild"], "Add the finding of {level} edema", "at least two steps, got 1"),
        ([], None, "at least two steps, got 0"),
        (
            ["mild", "severe", "moderate"],
            "Add the finding of {level} edema",
            "out of order: mild, severe, moderate",
        ),
        (["mild", "small"], "Add the finding of {level} pleural effusion", "steps 1 and 2 are one grade"),
        (["mild", "severe"], "Add the finding of edema", "holding {level} once"),
        (["mild", "acute"], "Add the finding of {level} edema", r"step 2 \('acute'\) is no severity grade"),
        (["mild", "severe"], None, r"step 1 \('mild'\) is a level, not an instruction"),
        (
            ["Add the finding of mild edema", "Add the finding of severe left pleural effusion"],
            None,
            "step 2 has finding pleural effusion, step 1 edema",
        ),
        (
            ["Add the finding of mild left pneumothorax", "Add the finding of large right pneumothorax"],
            None,
            "step 2 has side right, step 1 left",
        ),
        (
            [
                "Add the finding of mild left upper zone pneumonia",
                "Add the finding of severe left lower zone pneumonia",
            ],
            None,
            "step 2 has zone lower, step 1 upper",
        ),
        (
            ["Add the finding of mild edema", "Change the level of edema from mild to severe"],
            None,
            "step 2 has operation change_level, step 1 add",
        ),
        (["Remove the finding of edema", "Add the finding of mild edema"], None, "step 1 .* sets no level"),
        (
            ["Add the finding of edema", "Add the finding of severe edema"],
            None,
            "step 1 .* names levels: none",
        ),
        (
            ["Add the finding of mild edema and atelectasis", "Add the finding of severe edema"],
            None,
            "names edema, atelectasis",
        ),
        (
            [
                "Change the level of edema from mild to moderate",
                "Change the level of edema from moderate to severe",
            ],
            None,
            "change from different levels \\(mild, moderate\\)",
        ),
        (
            ["Change the level of edema from mild to mild", "Change the level of edema from mild to severe"],
            None,
            "step 1 changes nothing",
        ),
        (
            ["Add the finding of mild edema", "\x07"],
            None,
            "series step 2: instruction holds the control character",
        ),
    ],
)
def test_series_refusals_name_the_problem(steps, template, message):
    with pytest.raises(ParameterError, match=message):
        parse_series(steps, template)
