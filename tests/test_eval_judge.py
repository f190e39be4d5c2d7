"""The LAVE-style judge's plumbing with tiny random Llamas: the prompt is built, a rating is parsed from what the
judge generated, and ratings map to scores in range."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from vlm.evaluation.judge import JudgeTask, LLMJudge, parse_rating

WORDS = ["<unk>", "<pad>", "<eos>", "question", "answer", "red", "blue", "rating", "="]


def save_judge(directory: Path, says: str) -> Path:
    """A random tiny Llama whose final norm is zeroed: all logits tie, so greedy decoding always picks id 0,
    which is the word `says` in its word-level vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = [says] + [w for w in WORDS if w != says]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.model.norm.weight.zero_()
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.mark.parametrize(
    ("reply", "rating"),
    [("The answer matches. Rating=3", 3), ("rating: 2", 2), ("It is wrong, so 1.", 1), ("Rating=7, no: 2", 2),
     ("3.5 apples", None), ("no idea", None), ("10 4", None)],
)
def test_parse_rating(reply: str, rating: int | None) -> None:
    assert parse_rating(reply, levels=3) == rating


def test_prompt_holds_question_references_and_prediction(tmp_path: Path) -> None:
    judge = LLMJudge(str(save_judge(tmp_path / "judge", "3")), prompt="Q={question} R={references} P={prediction}")
    item = {"question": "what color?", "references": ["red", "dark red"], "prediction": "blue"}
    assert judge.prompt_for(item) == "Q=what color? R=red, dark red P=blue"  # no chat template: the text as is


@pytest.mark.parametrize(("says", "score"), [("3", 1.0), ("2", 0.5), ("1", 0.0)])
def test_judge_task_rates_a_predictions_file(tmp_path: Path, says: str, score: float) -> None:
    judge = save_judge(tmp_path / "judge", says)
    preds = tmp_path / "preds.jsonl"
    preds.write_text("".join(json.dumps(r) + "\n" for r in [
        {"id": 1, "question": "what color is the ball?", "prediction": "red", "answers": ["red"],
         "question_type": "color"},
        {"id": 2, "question": "what color is the sky?", "prediction": "green", "answers": ["blue", "grey"]},
        {"id": 3, "question": "what color is the cube?", "prediction": "blue", "answers": ["blue"]},
    ]))
    task = JudgeTask(judge=str(judge), judge_max_new_tokens=3, judge_batch_size=2)
    metrics = task.run(predictions=preds, out_dir=tmp_path / "out")
    rows = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert [r["judge_output"] for r in rows] == [f"{says} {says} {says}"] * 3  # what the judge generated...
    assert [r["rating"] for r in rows] == [int(says)] * 3  # ...parsed into a rating...
    assert [r["score"] for r in rows] == [score] * 3  # ...mapped to a score
    assert metrics["judge/score"] == score and metrics["judge/score_color"] == score
    assert metrics["judge/unparsed"] == 0.0 and metrics[f"judge/rating_{says}"] == 1.0
    assert all(0.0 <= r["score"] <= 1.0 for r in rows)


def test_a_judge_that_never_rates_counts_as_unparsed(tmp_path: Path) -> None:
    judge = save_judge(tmp_path / "judge", "red")
    preds = tmp_path / "preds.jsonl"
    preds.write_text(json.dumps({"id": 1, "question": "q", "prediction": "red", "answers": ["red"]}) + "\n")
    metrics = JudgeTask(judge=str(judge), judge_max_new_tokens=2).run(predictions=preds, out_dir=tmp_path)
    assert metrics["judge/unparsed"] == 1.0 and metrics["judge/score"] == 0.0


def test_judge_must_be_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="task.judge"):
        JudgeTask().run(predictions=tmp_path / "x.jsonl", out_dir=tmp_path)


def test_evaluate_py_config_runs_the_judge(tmp_path: Path) -> None:
    from hydra import compose, initialize_config_dir

    from vlm.evaluation.judge import LAVE_PROMPT
    from vlm.run import run_evaluation

    judge = save_judge(tmp_path / "judge", "3")
    preds = tmp_path / "preds.jsonl"
    preds.write_text(json.dumps({"id": 1, "question": "q", "prediction": "red", "answers": ["red"]}) + "\n")
    conf = str(Path(__file__).resolve().parents[1] / "conf")
    with initialize_config_dir(config_dir=conf, version_base="1.3"):
        cfg = compose("evaluate", overrides=["task=judge", f"task.judge={judge}", f"predictions={preds}",
                                             "task.judge_max_new_tokens=2", f"run_dir={tmp_path / 'run'}"])
    assert cfg.task.judge_prompt == LAVE_PROMPT
    assert parse_rating("so Rating=2", 3, cfg.task.rating_pattern) == 2
    metrics = run_evaluation(cfg)
    assert metrics["judge/score"] == 1.0
    assert (tmp_path / "run" / "predictions.png").exists()
