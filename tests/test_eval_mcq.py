"""MCQ scoring both ways: by the generated letter and by the highest option log-likelihood, per category."""

from __future__ import annotations

import pytest

from vlm.evaluation.mcq import MCQTask, answer_index, format_options, parse_choice

OPTIONS = ["red", "blue", "green"]


@pytest.mark.parametrize(
    ("reply", "choice"),
    [("B", 1), ("(B)", 1), ("B.", 1), ("B) blue", 1), ("C: green", 2), ("The answer is C.", 2), ("Answer: A", 0),
     ("blue", 1), ("It is blue.", 1), ("D", None), ("red or blue", None), ("", None), ("maybe", None)],
)
def test_parse_choice(reply: str, choice: int | None) -> None:
    assert parse_choice(reply, OPTIONS) == choice


@pytest.mark.parametrize(("answer", "index"), [("B", 1), ("(c)", 2), (0, 0), ("green", 2), (["A"], 0), ("2", 2)])
def test_answer_index(answer, index: int) -> None:
    assert answer_index(answer, OPTIONS) == index


def test_answer_index_rejects_what_is_not_an_option() -> None:
    with pytest.raises(ValueError):
        answer_index("purple", OPTIONS)
    with pytest.raises(ValueError):
        answer_index(5, OPTIONS)


def test_prompt_lists_lettered_options() -> None:
    task = MCQTask()
    item = task.item_from_row({"id": "q", "question": "Which colour?", "options": {"B": "blue", "A": "red"},
                               "answer": "A"})
    assert format_options(item["options"]) == "A. red\nB. blue"
    task = MCQTask(prompt="{question}\n{choices}\nAnswer with a letter.")
    messages, images = task.conversation(item)
    assert messages == [{"role": "user", "content": "Which colour?\nA. red\nB. blue\nAnswer with a letter."}]
    assert images == []


def test_score_both_ways_per_category() -> None:
    task = MCQTask()
    rows = [
        # letter right, log-likelihood right
        {"id": 1, "prediction": "A", "answer": "A", "options": OPTIONS, "category": "colour",
         "option_scores": [-1.0, -2.0, -3.0]},
        # letter wrong, log-likelihood right
        {"id": 2, "prediction": "C", "answer": "B", "options": OPTIONS, "category": "colour",
         "option_scores": [-5.0, -0.5, -3.0]},
        # no letter found, log-likelihood wrong
        {"id": 3, "prediction": "no idea", "answer": 0, "options": ["circle", "square"], "category": "shape",
         "option_scores": [-4.0, -1.0]},
        # by option text, log-likelihood wrong
        {"id": 4, "prediction": "square", "answers": ["B"], "options": ["circle", "square"], "category": "shape",
         "option_scores": [-0.1, -1.0]},
    ]
    preds = [{**task.item_from_row(r), "prediction": r["prediction"]} for r in rows]
    metrics = task.score(preds)
    assert metrics["mcq/accuracy"] == pytest.approx(2 / 4)
    assert metrics["mcq/accuracy_colour"] == pytest.approx(1 / 2)
    assert metrics["mcq/accuracy_shape"] == pytest.approx(1 / 2)
    assert metrics["mcq/unparsed"] == pytest.approx(1 / 4)
    assert metrics["mcq/loglik_accuracy"] == pytest.approx(2 / 4)
    assert metrics["mcq/loglik_accuracy_colour"] == 1.0
    assert metrics["mcq/loglik_accuracy_shape"] == 0.0
    assert [p["score"] for p in preds] == [1.0, 0.0, 0.0, 1.0]
    assert [p["choice"] for p in preds] == ["A", "C", None, "B"]
    assert [p["loglik_choice"] for p in preds] == ["A", "B", "B", "A"]


def test_without_option_scores_there_is_no_loglik_metric() -> None:
    task = MCQTask()
    preds = [{**task.item_from_row({"id": 1, "answer": "B", "options": OPTIONS}), "prediction": "B"}]
    metrics = task.score(preds)
    assert metrics["mcq/accuracy"] == 1.0 and "mcq/loglik_accuracy" not in metrics
