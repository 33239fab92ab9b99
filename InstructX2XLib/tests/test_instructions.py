from typing import Any

import pytest

from instructx2x.instructions import FINDINGS, MAX_INSTRUCTION_CHARS, Laterality, Operation, parse_instruction


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
