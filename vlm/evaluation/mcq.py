"""The `mcq` task: multiple-choice questions (ScienceQA, MMStar style), scored two ways.

1. By the letter the model generates after seeing the lettered options (`mcq/accuracy`); a reply with no
   recognisable choice counts as wrong and is counted in `mcq/unparsed`.
2. By the option whose text has the highest log-likelihood as the reply (`mcq/loglik_accuracy`): no parsing, and
   it still measures a model that has not learnt to answer with a letter. `likelihood: mean` divides by the option's
   token count (favours no length); `none` skips this pass.
Both per category (`mcq/accuracy_<category>`, `mcq/loglik_accuracy_<category>`) when items have one.

Items: JSONL rows or shard `json` with `question`, `options` (a list, or {"A": ..., "B": ...}), `answer` (a letter,
a 0-based index or the option text; `answers: ["B"]` also works), optional `category`, `image`. A predictions
file has the same fields plus `prediction`, and optionally `option_scores` (one log-likelihood per option).
"""

from __future__ import annotations

import math
import re
import string
from collections import defaultdict
from collections.abc import Iterator, Sequence
from typing import Any

from vlm.evaluation.task import Task

LETTERS = string.ascii_uppercase
DEFAULT_PROMPT = "<image>\n{question}\n{choices}\nAnswer with the option's letter from the given choices directly."
_LEADING_LETTER = re.compile(r"^\s*[\(\[]?([A-Z])(?:[\)\]\.:,]|\s*$)")
_ANSWER_IS = re.compile(r"(?i)\banswer(?:\s+is)?\s*[:\-]?\s*[\(\[]?([A-Z])\b(?![a-z'])")


def option_list(options: Sequence[str] | dict[str, str]) -> list[str]:
    """Options as a list in letter order ({"A": ..., "B": ...} dicts are sorted by letter)."""
    if isinstance(options, dict):
        return [str(options[k]) for k in sorted(options)]
    if not isinstance(options, (list, tuple)):  # a string would be split into its letters
        raise ValueError(f"`options` must be a list or a {{letter: text}} object, not {type(options).__name__}")
    return [str(o) for o in options]


def format_options(options: Sequence[str]) -> str:
    """"A. red\\nB. blue" - the lettered list the prompt shows."""
    return "\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(options))


def _norm(text: str) -> str:
    return " ".join(text.lower().strip().rstrip(".").split())


def answer_index(answer: Any, options: Sequence[str]) -> int:
    """The correct option's index from a letter ("B", "(B)"), a 0-based index, or the option's text."""
    if isinstance(answer, list):
        if len(answer) != 1:
            raise ValueError(f"an mcq item needs exactly one correct answer, got {answer!r}")
        answer = answer[0]
    if isinstance(answer, int):
        index = answer
    else:
        text = str(answer).strip()
        letter = re.fullmatch(r"[\(\[]?([A-Za-z])[\)\]\.]?", text)
        by_text = [i for i, o in enumerate(options) if _norm(o) == _norm(text)]
        if letter and LETTERS.index(letter.group(1).upper()) < len(options):
            index = LETTERS.index(letter.group(1).upper())
        elif by_text:
            index = by_text[0]
        elif text.isdigit():
            index = int(text)
        else:
            raise ValueError(f"answer {answer!r} is neither a letter, an index nor one of the options {options!r}")
    if not 0 <= index < len(options):
        raise ValueError(f"answer {answer!r} is out of range for {len(options)} options")
    return index


def parse_choice(text: str, options: Sequence[str]) -> int | None:
    """The option a generated reply picks, or None.

    In order: a leading letter ("B", "(B)", "B.", "B) blue"), "answer is B" / "Answer: B", the reply equal to one
    option's text, the reply containing exactly one option's text. Letters beyond the options do not count.
    """
    for pattern in (_LEADING_LETTER, _ANSWER_IS):
        match = pattern.search(text)
        if match and LETTERS.index(match.group(1)) < len(options):
            return LETTERS.index(match.group(1))
    reply = _norm(text)
    exact = [i for i, o in enumerate(options) if _norm(o) == reply]
    if len(exact) == 1:
        return exact[0]
    contained = [i for i, o in enumerate(options) if re.search(rf"\b{re.escape(_norm(o))}\b", reply)]
    return contained[0] if len(contained) == 1 else None


def _accuracy(correct: dict[str, list[float]], prefix: str) -> dict[str, float]:
    metrics = {}
    for category, values in sorted(correct.items()):
        if category:
            metrics[f"{prefix}_{category}"] = sum(values) / len(values)
    return metrics


class MCQTask(Task):
    """Ask with lettered options, parse the letter; optionally also rank the options by log-likelihood."""

    name = "mcq"
    pass_mark = 1.0

    def __init__(self, data: str | Sequence[str] | None = None, limit: int | None = None, batch_size: int = 32,
                 max_new_tokens: int = 8, prompt: str = DEFAULT_PROMPT, likelihood: str = "sum",
                 option_format: str = "{option}", **kwargs: Any) -> None:
        super().__init__(data, limit, batch_size, max_new_tokens, prompt, **kwargs)
        if likelihood not in ("sum", "mean", "none"):
            raise ValueError(f"likelihood must be sum, mean or none, got {likelihood!r}")
        self.likelihood = likelihood
        self.option_format = option_format

    # ---- items -------------------------------------------------------------------------------------------------
    def item_from_row(self, row: dict[str, Any]) -> dict[str, Any]:
        options = option_list(row.get("options", row.get("choices")) or [])
        if len(options) < 2:
            raise ValueError(f"mcq item {row.get('id')!r} needs at least two options")
        answer = row.get("answer", row.get("answers", row.get("references")))
        letter = LETTERS[answer_index(answer, options)]
        item = {"id": row.get("id"), "question": row.get("question", ""), "references": [letter],
                "options": options, "category": row.get("category"), "image": row.get("image")}
        if row.get("option_scores") is not None:
            scores = row["option_scores"]
            if not isinstance(scores, list) or len(scores) != len(options):
                raise ValueError(f"`option_scores` must be a list of {len(options)} numbers, one per option")
            item["option_scores"] = [float(s) for s in scores]
            if not all(math.isfinite(s) for s in item["option_scores"]):
                raise ValueError(f"`option_scores` holds NaN or infinite values: {scores}")
        return item

    def items_from_sample(self, sample: dict[str, Any]) -> Iterator[dict[str, Any]]:
        meta = sample.get("json") or {}
        yield {**self.item_from_row({"id": sample["__key__"], **meta}), "image": sample.get("image")}

    def conversation(self, item: dict[str, Any]):
        return super().conversation({**item, "choices": format_options(item["options"])})

    def answer_text(self, prediction: dict[str, Any]) -> str:
        letter = prediction["references"][0]
        return f"{letter}. {prediction['options'][LETTERS.index(letter)]}"

    # ---- asking ------------------------------------------------------------------------------------------------
    def predict_batch(self, answerer: Any, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        predictions = super().predict_batch(answerer, items)
        if self.likelihood != "none":
            for p in predictions:
                messages, images = self.conversation(p)
                options = [self.option_format.format(option=o, letter=LETTERS[i]) for i, o in enumerate(p["options"])]
                scores = answerer.loglikelihoods(messages, images, options)
                p["option_scores"] = [s / n if self.likelihood == "mean" else s for s, n in scores]
        return predictions

    # ---- scoring -----------------------------------------------------------------------------------------------
    def score(self, predictions: list[dict[str, Any]]) -> dict[str, float]:
        by_letter: dict[str, list[float]] = defaultdict(list)
        by_loglik: dict[str, list[float]] = defaultdict(list)
        unparsed = 0
        for p in predictions:
            choice = parse_choice(p["prediction"], p["options"])
            unparsed += choice is None
            p["choice"] = None if choice is None else LETTERS[choice]
            p["score"] = float(p["choice"] == p["references"][0])
            by_letter[""].append(p["score"])
            if p.get("category"):
                by_letter[p["category"]].append(p["score"])
            if p.get("option_scores") is not None:
                scores = p["option_scores"]
                p["loglik_choice"] = LETTERS[max(range(len(scores)), key=scores.__getitem__)]
                correct = float(p["loglik_choice"] == p["references"][0])
                by_loglik[""].append(correct)
                if p.get("category"):
                    by_loglik[p["category"]].append(correct)
        n = len(predictions)
        metrics = {"mcq/accuracy": sum(by_letter[""]) / n, "mcq/unparsed": unparsed / n, "mcq/count": float(n)}
        metrics.update(_accuracy(by_letter, "mcq/accuracy"))
        if by_loglik:
            if len(by_loglik[""]) != n:
                raise ValueError("option_scores are given for some predictions but not all")
            metrics["mcq/loglik_accuracy"] = sum(by_loglik[""]) / n
            metrics.update(_accuracy(by_loglik, "mcq/loglik_accuracy"))
        return metrics
