import numpy as np
import pytest

from instructx2x_train.answers import (
    AnswerParseError,
    Change,
    ChangeKind,
    format_answer,
    parse_answer,
    to_instructions,
)

ADD, REMOVE, LEVEL = ChangeKind.ADD, ChangeKind.REMOVE, ChangeKind.LEVEL


@pytest.mark.parametrize(
    "answer,expected",
    [
        (
            "the main image has an additional finding of pleural effusion than the reference image. ",
            [Change(ADD, "pleural effusion")],
        ),
        (
            "the main image has additional findings of edema, and atelectasis than the reference image. ",
            [Change(ADD, "edema"), Change(ADD, "atelectasis")],
        ),
        (
            "the main image has additional findings of edema, atelectasis, and lung opacity than the "
            "reference image. ",
            [Change(ADD, "edema"), Change(ADD, "atelectasis"), Change(ADD, "lung opacity")],
        ),
        (
            "the main image is missing the finding of pneumothorax than the reference image. ",
            [Change(REMOVE, "pneumothorax")],
        ),
        (
            "the main image is missing the findings of cardiomegaly, and hernia than the reference image. ",
            [Change(REMOVE, "cardiomegaly"), Change(REMOVE, "hernia")],
        ),
        ("the level of edema has changed from mild to severe. ", [Change(LEVEL, "edema", "mild", "severe")]),
        (
            "the level of pleural effusion has changed from moderate to large to small. ",
            [Change(LEVEL, "pleural effusion", "moderate to large", "small")],
        ),
        (
            "the level of edema has changed from mild to moderate to severe. ",
            [Change(LEVEL, "edema", "mild", "moderate to severe")],
        ),
        (
            "the level of edema has changed from mild to severe. the main image has an additional finding "
            "of pneumonia than the reference image. the main image is missing the finding of atelectasis "
            "than the reference image. ",
            [
                Change(LEVEL, "edema", "mild", "severe"),
                Change(ADD, "pneumonia"),
                Change(REMOVE, "atelectasis"),
            ],
        ),
        (
            "the main image has an additional finding of infection than the reference image. ",
            [Change(ADD, "pneumonia")],
        ),
        (
            "the main image has an additional finding of pneumonia than the reference image. the main image "
            "is missing the finding of infection than the reference image. ",
            [],
        ),
        ("nothing has changed.", []),
        ("Nothing has changed.", []),
    ],
)
def test_grammar(answer, expected):
    assert parse_answer(answer) == expected


def test_unrecognised_sentence_is_an_error_that_quotes_it():
    with pytest.raises(AnswerParseError, match="the heart looks odd"):
        parse_answer("the heart looks odd. ")


def test_format_then_parse_round_trips():
    rng = np.random.default_rng(0)
    names = ["pleural effusion", "edema", "atelectasis", "cardiomegaly", "lung opacity", "hernia"]
    for _ in range(200):
        chosen = list(rng.choice(names, size=int(rng.integers(1, 5)), replace=False))
        changes = []
        for name in chosen:
            kind = [ADD, REMOVE, LEVEL][int(rng.integers(0, 3))]
            changes.append(
                Change(kind, name, "mild", "moderate to severe") if kind is LEVEL else Change(kind, name)
            )
        parsed = parse_answer(format_answer(changes))
        assert sorted(parsed, key=repr) == sorted(changes, key=repr)


def test_instruction_modes():
    changes = [Change(ADD, "edema"), Change(LEVEL, "pleural effusion", "small", "large")]
    assert to_instructions(changes, "combined") == [
        "Add the finding of edema. Change the level of pleural effusion from small to large"
    ]
    assert to_instructions(changes, "per-finding") == [
        "Add the finding of edema",
        "Change the level of pleural effusion from small to large",
    ]
    assert to_instructions(changes, "single-only") == []
    assert to_instructions(changes[:1], "single-only") == ["Add the finding of edema"]
    assert to_instructions([Change(REMOVE, "pneumothorax")]) == ["Remove the finding of pneumothorax"]
    with pytest.raises(ValueError, match="mode"):
        to_instructions(changes, "all")
