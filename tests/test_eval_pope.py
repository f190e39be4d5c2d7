"""POPE: the yes/no rule, the metrics on hand-worked cases, and scoring a predictions file without a model."""

from __future__ import annotations

import json

import pytest

from vlm.evaluation.pope import POPETask, binary_metrics, score, yes_or_no

# truth Y Y Y Y N N N N, predicted Y Y Y N Y Y N N: TP 3, FN 1, FP 2, TN 2.
ROWS = [
    ("yes", "yes", "random"), ("Yes.", "yes", "adversarial"), ("there is", "yes", "random"),
    ("no", "yes", "adversarial"), ("yes", "no", "random"), ("yes, a red one", "no", "adversarial"),
    ("not at all", "no", "random"), ("There isn't.", "no", "adversarial"),
]


def test_yes_or_no_follows_popes_rule():
    assert [yes_or_no(r) for r, _, _ in ROWS] == ["yes", "yes", "yes", "no", "yes", "yes", "no", "no"]
    assert yes_or_no("Nothing") == "yes" and yes_or_no("No.") == "no"  # a word, not a prefix


def test_pope_metrics_on_a_hand_worked_case():
    predictions = [{"id": str(i), "prediction": r, "answer": t, "category": c} for i, (r, t, c) in enumerate(ROWS)]
    metrics = score(predictions)
    assert metrics["pope/accuracy"] == pytest.approx(5 / 8)
    assert metrics["pope/precision"] == pytest.approx(3 / 5)
    assert metrics["pope/recall"] == pytest.approx(3 / 4)
    assert metrics["pope/f1"] == pytest.approx(2 * 0.6 * 0.75 / 1.35)  # 2/3
    assert metrics["pope/yes_ratio"] == pytest.approx(5 / 8)
    assert metrics["pope/unclear"] == pytest.approx(1 / 8)  # "there is"
    # random: TP 2, FP 1, TN 1 -> precision 2/3, recall 1, F1 0.8; adversarial: one of each -> 0.5 everywhere
    assert metrics["pope/f1_random"] == pytest.approx(0.8) and metrics["pope/recall_random"] == 1.0
    assert metrics["pope/accuracy_adversarial"] == 0.5 and metrics["pope/f1_adversarial"] == 0.5
    assert [p["score"] for p in predictions] == [1, 1, 1, 0, 0, 0, 1, 1]


def test_pope_metrics_edge_cases():
    never = binary_metrics(["no"] * 4, ["yes", "yes", "no", "no"])
    assert never == {"accuracy": 0.5, "precision": 0.0, "recall": 0.0, "f1": 0.0, "yes_ratio": 0.0}
    always = binary_metrics(["yes"] * 4, ["yes", "yes", "no", "no"])
    assert always["recall"] == 1.0 and always["precision"] == 0.5 and always["f1"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="yes or no"):
        score([{"id": "x", "prediction": "yes", "answer": "maybe"}])


def test_pope_scores_a_predictions_file_without_a_model(tmp_path):
    path = tmp_path / "preds.jsonl"
    path.write_text("\n".join(json.dumps({"id": str(i), "question": "is there a red circle in the image?",
                                          "prediction": r, "answer": t, "category": c})
                              for i, (r, t, c) in enumerate(ROWS)))
    metrics = POPETask().run(predictions=str(path), out_dir=tmp_path / "out")
    assert metrics["pope/f1"] == pytest.approx(2 / 3)
    assert (tmp_path / "out" / "predictions.jsonl").is_file()


def test_pope_reads_the_shapes_worlds_questions(tmp_path):
    from vlm.data.synthetic.preferences import ensure_preferences
    from vlm.data.synthetic.shapes import ensure_shapes

    root = ensure_shapes(tmp_path / "shapes", num_train=20, num_val=4, num_test=10, samples_per_shard=20)
    ensure_preferences(root)
    task = POPETask(data=str(root / "dpo" / "pope" / "test.txt"))
    items = list(task.items())
    assert {i["category"] for i in items} == {"random", "popular", "adversarial"}
    for category in ("random", "popular", "adversarial"):
        answers = [i["answer"] for i in items if i["category"] == category]
        assert answers.count("yes") == answers.count("no") > 0  # balanced, as POPE
    adversarial = POPETask(data=str(root / "dpo" / "pope" / "test.txt"), categories=["adversarial"])
    assert {i["category"] for i in adversarial.items()} == {"adversarial"}
    truth = [{**i, "prediction": i["answer"]} for i in items]
    assert score(truth)["pope/f1"] == 1.0 and score(truth)["pope/yes_ratio"] == 0.5
