"""The task protocol without a model: `evaluate.py task=... predictions=FILE` scores a file and writes
metrics.json, predictions.jsonl and the picture, for vqa, mcq and caption."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from PIL import Image

from vlm.evaluation.report import GREEN, RED

CONF = str(Path(__file__).resolve().parents[1] / "conf")


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def evaluate(tmp_path: Path, *overrides: str) -> tuple[dict, list[dict], Path]:
    from vlm.run import run_evaluation

    out = tmp_path / "eval"
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("evaluate", overrides=[*overrides, f"run_dir={out}", f"paths.data_dir={tmp_path}"])
    metrics = run_evaluation(cfg)
    assert json.loads((out / "metrics.json").read_text()) == pytest.approx(metrics)
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    return metrics, rows, out / "predictions.png"


def colours(png: Path) -> set[tuple[int, int, int]]:
    pixels = np.asarray(Image.open(png).convert("RGB")).reshape(-1, 3)
    return {tuple(int(v) for v in p) for p in np.unique(pixels, axis=0)}


def test_vqa_scores_a_predictions_file(tmp_path: Path) -> None:
    Image.new("RGB", (32, 32), (250, 10, 200)).save(tmp_path / "magenta.png")
    preds = write_jsonl(tmp_path / "preds.jsonl", [
        {"id": "a", "question": "how many?", "prediction": "Two.", "answers": ["2"] * 3 + ["3"] * 7,
         "question_type": "count", "image": "magenta.png"},
        {"id": "b", "question": "what colour?", "prediction": "blue", "answers": ["red"], "question_type": "color"},
    ])
    metrics, rows, png = evaluate(tmp_path, "task=vqa", f"predictions={preds}")
    # 3 of 10 annotators say "2": leaving out one of them leaves 2 matches (2/3), leaving out a "3" leaves 3 (1)
    assert metrics["vqa/accuracy"] == pytest.approx(((3 * 2 / 3 + 7 * 1) / 10 + 0.0) / 2)
    assert metrics["vqa/accuracy_count"] == pytest.approx(0.9)
    assert metrics["vqa/accuracy_color"] == 0.0
    assert metrics["vqa/count"] == 2
    assert [r["id"] for r in rows] == ["a", "b"]
    assert list(rows[0])[:5] == ["id", "question", "prediction", "references", "score"]
    assert rows[0]["score"] == pytest.approx(0.9) and rows[1]["score"] == 0.0
    assert rows[0]["image"].endswith("magenta.png")
    seen = colours(png)
    assert GREEN in seen and RED in seen and (250, 10, 200) in seen  # right, wrong, and the image itself


def test_written_predictions_can_be_scored_again(tmp_path: Path) -> None:
    preds = write_jsonl(tmp_path / "preds.jsonl", [{"id": 1, "prediction": "red", "answers": ["red"]}])
    first, _, _ = evaluate(tmp_path, "task=vqa", f"predictions={preds}")
    again = tmp_path / "again"
    again.mkdir()
    second, _, png = evaluate(again, "task=vqa", f"predictions={tmp_path / 'eval' / 'predictions.jsonl'}")
    assert first == second and first["vqa/accuracy"] == 1.0
    assert RED not in colours(png)


def test_mcq_scores_a_predictions_file(tmp_path: Path) -> None:
    preds = write_jsonl(tmp_path / "preds.jsonl", [
        {"id": 1, "question": "colour?", "prediction": "B", "answer": "B", "options": ["red", "blue"],
         "category": "colour", "option_scores": [-2.0, -1.0]},
        {"id": 2, "question": "shape?", "prediction": "A", "answer": "B", "options": ["circle", "square"],
         "category": "shape", "option_scores": [-2.0, -1.0]},
    ])
    metrics, rows, png = evaluate(tmp_path, "task=mcq", f"predictions={preds}")
    assert metrics["mcq/accuracy"] == 0.5 and metrics["mcq/loglik_accuracy"] == 1.0
    assert metrics["mcq/accuracy_colour"] == 1.0 and metrics["mcq/accuracy_shape"] == 0.0
    assert rows[1]["choice"] == "A" and rows[1]["references"] == ["B"] and rows[1]["score"] == 0.0
    assert png.exists()


def test_caption_scores_a_predictions_file(tmp_path: Path) -> None:
    preds = write_jsonl(tmp_path / "preds.jsonl", [
        {"id": 1, "prediction": "a b", "answers": ["a b"]},
        {"id": 2, "prediction": "c d", "captions": ["c e"]},
    ])
    metrics, rows, png = evaluate(tmp_path, "task=caption", f"predictions={preds}")
    assert metrics["caption/cider_d"] == pytest.approx(3.125)  # the hand-worked case of test_eval_caption_metric
    assert [r["score"] for r in rows] == pytest.approx([5.0, 1.25])
    assert set(metrics) == {"caption/bleu1", "caption/bleu2", "caption/bleu3", "caption/bleu4", "caption/cider_d",
                            "caption/count"}
    assert png.exists()


def test_neither_model_nor_predictions_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="model_dir=PATH"):
        evaluate(tmp_path, "task=caption")


# ---- with a model ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A random tiny model directory on the shapes tokenizer, and the shapes test split beside it."""
    import torch
    from test_generation import tiny_vlm

    from vlm.data.synthetic.shapes import ensure_shapes

    root = tmp_path_factory.mktemp("world")
    shapes = ensure_shapes(root / "shapes", num_train=4, num_val=2, num_test=6, samples_per_shard=4)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    model, tokenizer = tiny_vlm(shapes / "tokenizer")
    yield model.save_pretrained(root / "model", tokenizer)
    torch.set_num_threads(before)


def test_vqa_answers_the_shapes_test_split_and_draws(model_dir: Path, tmp_path: Path) -> None:
    metrics, rows, png = evaluate(tmp_path, "task=vqa", f"model_dir={model_dir}", "task.limit=10",
                                  "task.batch_size=4", "task.max_new_tokens=3",
                                  f"task.data={model_dir.parent / 'shapes' / 'test.txt'}")
    assert metrics["vqa/count"] == 10 and len(rows) == 10
    assert 0.0 <= metrics["vqa/accuracy"] <= 1.0
    assert all(r["references"] and r["question"].endswith("?") for r in rows)
    assert Image.open(png).size[0] == 4 * 224  # four columns of drawn samples


def test_mcq_with_a_model_scores_letters_and_likelihoods(model_dir: Path, tmp_path: Path) -> None:
    import torch

    from vlm.evaluation.answerer import Answerer
    from vlm.evaluation.mcq import MCQTask

    Image.new("RGB", (16, 16), (220, 30, 30)).save(tmp_path / "red.png")
    questions = write_jsonl(tmp_path / "q.jsonl", [
        {"id": i, "question": "what color is the circle?", "image": "red.png", "options": ["red", "blue", "green"],
         "answer": "A", "category": "color"} for i in range(3)])
    task = MCQTask(data=str(questions), max_new_tokens=2)
    metrics = task.run(model_dir=model_dir, out_dir=tmp_path / "out")
    assert {"mcq/accuracy", "mcq/loglik_accuracy", "mcq/accuracy_color", "mcq/unparsed"} <= set(metrics)
    rows = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(len(r["option_scores"]) == 3 for r in rows)

    # the batched, embed-once log-likelihoods equal a plain forward pass over prompt + option
    answerer = Answerer.from_dir(model_dir)
    messages, images = task.conversation(task.item_from_row({**json.loads(questions.read_text().splitlines()[0]),
                                                             "image": str(tmp_path / "red.png")}))
    scores = answerer.loglikelihoods(messages, images, ["red", "blue", "green"])
    prompt = answerer.prompt(messages, images)
    for option, (total, count) in zip(["red", "blue", "green"], scores):
        option_ids = answerer.tokenizer(option, add_special_tokens=False)["input_ids"]
        ids = torch.cat([prompt["input_ids"], torch.tensor(option_ids)])[None]
        with torch.no_grad():
            logits = answerer.model(ids, torch.ones_like(ids), prompt["pixel_values"]).logits[0]
        logp = torch.log_softmax(logits[-len(option_ids) - 1 : -1], -1)
        expected = logp.gather(-1, torch.tensor(option_ids)[:, None]).sum()
        assert count == len(option_ids) and total == pytest.approx(float(expected), abs=1e-4)
    assert rows[0]["option_scores"] == pytest.approx([s for s, _ in scores], abs=1e-4)


def test_caption_with_a_model(model_dir: Path, tmp_path: Path) -> None:
    metrics, rows, png = evaluate(tmp_path, "task=caption", f"model_dir={model_dir}", "task.limit=4",
                                  "task.max_new_tokens=4", f"task.data={model_dir.parent / 'shapes' / 'test.txt'}")
    assert metrics["caption/count"] == 4 and metrics["caption/cider_d"] >= 0.0
    assert all(r["references"][0].endswith(".") for r in rows)  # the shapes captions
    assert png.exists()
