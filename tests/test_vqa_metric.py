"""The VQAv2 accuracy and its normalisation, against hand-worked cases."""

import pytest

from vlm.evaluation.vqa import score
from vlm.evaluation.vqa_metric import exact_match, normalize_answer, vqa_accuracy


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Two dogs.", "2 dogs"),
        ("The cat", "cat"),
        ("  a   red\tcircle\n", "red circle"),
        ("dont", "don't"),
        ("yes!", "yes"),
        ("top-left", "top left"),
        ("3.5", "3.5"),
        ("1,000", "1000"),
        ("none", "0"),
    ],
)
def test_normalization(raw: str, expected: str) -> None:
    assert normalize_answer(raw) == expected


def test_partial_credit_over_leave_one_out_subsets() -> None:
    refs = ["two"] * 3 + ["three"] * 7
    # leaving out one of the three "2"s leaves 2 matches (2/3); leaving out a "3" leaves 3 matches (1)
    assert vqa_accuracy("2", refs) == pytest.approx((3 * 2 / 3 + 7 * 1) / 10)
    # a single matching annotator: 9 subsets hold it once (1/3), one subset not at all
    assert vqa_accuracy("cat", ["cat"] + ["dog"] * 9) == pytest.approx(0.3)
    assert vqa_accuracy("bird", ["cat"] + ["dog"] * 9) == 0.0
    assert vqa_accuracy("Dog.", ["dog"] * 10) == 1.0


def test_single_reference_is_unanimous() -> None:
    assert vqa_accuracy("the red", ["red"]) == 1.0
    assert vqa_accuracy("blue", ["red"]) == 0.0
    assert exact_match("Red", ["blue", "red"]) == 1.0


def test_score_reports_per_type() -> None:
    preds = [
        {"prediction": "red", "answers": ["red"], "question_type": "color"},
        {"prediction": "blue", "answers": ["red"], "question_type": "color"},
        {"prediction": "3", "answers": ["three"], "question_type": "count"},
    ]
    metrics = score(preds)
    assert metrics["vqa/accuracy"] == pytest.approx(2 / 3)
    assert metrics["vqa/accuracy_color"] == pytest.approx(0.5)
    assert metrics["vqa/accuracy_count"] == 1.0
    assert [p["score"] for p in preds] == [1.0, 0.0, 1.0]


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("wouldnt've", "wouldn't've"),  # from the official list beyond the common ones
        ("oclock", "o'clock"),
        ("twas", "'twas"),
        ("Whats", "what's"),
        ("dogs.", "dogs"),  # a period not followed by a digit goes
        ("An apple; a pear", "apple pear"),  # a punctuation mark next to a space is removed, not spaced
        ("zero", "0"),
    ],
)
def test_official_normalisation_details(raw: str, expected: str) -> None:
    assert normalize_answer(raw) == expected


def test_normalised_prediction_matches_unanimous_references() -> None:
    assert vqa_accuracy("Two.", ["2"] * 10) == 1.0
    assert vqa_accuracy("It's red", ["its red"] * 10) == 0.0  # "its" is not on the list: no match
