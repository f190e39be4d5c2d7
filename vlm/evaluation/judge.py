"""The `judge` task (LAVE, Mañas et al. 2024): a language model rates each answer given the question and references.

Exact-match metrics call "a red ball" wrong against "red"; a judge LM reads the question, the reference answers
and the candidate, and gives a rating on a 1..N scale (LAVE: 1 wrong, 2 ambiguous or incomplete, 3 right), mapped to
a score by `scores` (LAVE: 0, 0.5, 1). The judge is any Hugging Face causal LM by name or path; the prompt is a
config string with `{question}`, `{references}` and `{prediction}`.

Items and predictions are VQA's (question + reference answers), so `predictions=FILE` judges any model's answers and
`model_dir=PATH` first answers with our model. Metrics: `judge/score` (unparsed ratings count as 0),
`judge/unparsed`, `judge/rating_<r>` (fraction of each rating), `judge/score_<type>` per question type.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from vlm.evaluation.vqa import VQATask

LAVE_PROMPT = (
    "You are given a question, a set of gold-standard reference answers written by experts, and a candidate "
    "answer. Please rate the accuracy of the candidate answer for the question considering the reference answers. "
    "Use a scale of 1-3, with 1 indicating an incorrect or irrelevant answer, 2 indicating an ambiguous or "
    "incomplete answer, and 3 indicating a correct answer. Give the rationale before rating, and end with "
    "\"Rating=\" and the number.\n\n"
    "Question: {question}\nReference answers: {references}\nCandidate answer: {prediction}\nOutput:"
)
RATING_PATTERN = r"(?i)rating\s*[=:]\s*(\d+)"


def parse_rating(text: str, levels: int, pattern: str = RATING_PATTERN) -> int | None:
    """The rating in a judge's reply: `pattern`'s first group if it matches, else the first standalone number
    in 1..levels; None when there is none."""
    match = re.search(pattern, text)
    if match and 1 <= int(match.group(1)) <= levels:
        return int(match.group(1))
    for number in re.findall(r"(?<![\d.])(\d+)(?!\d|\.\d)", text):
        if 1 <= int(number) <= levels:
            return int(number)
    return None


class LLMJudge:
    """A causal LM that rates answers: `prompt_for(item)` -> text, `rate(items)` -> [(reply, rating or None)]."""

    def __init__(self, name_or_path: str, prompt: str = LAVE_PROMPT, max_new_tokens: int = 64,
                 batch_size: int = 8, use_chat_template: bool = True, levels: int = 3,
                 pattern: str = RATING_PATTERN, dtype: str | None = "auto", trust_remote_code: bool = False,
                 device: str | None = "auto") -> None:
        """`device`/`dtype`: where the judge runs (vlm.device; auto: CUDA in bf16 when available, else CPU fp32)."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from vlm.device import resolve_device

        self.prompt, self.max_new_tokens, self.batch_size = prompt, int(max_new_tokens), int(batch_size)
        self.levels, self.pattern = int(levels), pattern
        from vlm.hub import named_model

        with named_model(name_or_path, "judge tokenizer", "task.judge"):
            self.tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.device, dtype = resolve_device(device, dtype)
        with named_model(name_or_path, "judge model", "task.judge"):
            self.model = AutoModelForCausalLM.from_pretrained(
                name_or_path, dtype=dtype, trust_remote_code=trust_remote_code).to(self.device).eval()
        self.use_chat_template = use_chat_template and bool(getattr(self.tokenizer, "chat_template", None))

    def prompt_for(self, item: dict[str, Any]) -> str:
        text = self.prompt.format(question=item.get("question", ""), prediction=item["prediction"],
                                  references=", ".join(item["references"]))
        if self.use_chat_template:
            text = self.tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                      add_generation_prompt=True)
        return text

    @torch.no_grad()
    def rate(self, items: Sequence[dict[str, Any]]) -> list[tuple[str, int | None]]:
        out: list[tuple[str, int | None]] = []
        for start in range(0, len(items), self.batch_size):
            prompts = [self.prompt_for(it) for it in items[start : start + self.batch_size]]
            batch = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
            tokens = self.model.generate(**batch, max_new_tokens=self.max_new_tokens, do_sample=False,
                                         pad_token_id=self.tokenizer.pad_token_id)
            for row in tokens[:, batch["input_ids"].shape[1] :]:
                reply = self.tokenizer.decode(row, skip_special_tokens=True).strip()
                out.append((reply, parse_rating(reply, self.levels, self.pattern)))
        return out


class JudgeTask(VQATask):
    """VQA items, answered by our model or read from a file, then rated by a judge LM."""

    name = "judge"
    pass_mark = 0.5

    def __init__(self, judge: str | None = None, judge_prompt: str = LAVE_PROMPT,
                 scores: Sequence[float] = (0.0, 0.5, 1.0),
                 judge_max_new_tokens: int = 64, judge_batch_size: int = 8, use_chat_template: bool = True,
                 rating_pattern: str = RATING_PATTERN, judge_dtype: str | None = None, **vqa: Any) -> None:
        super().__init__(**vqa)
        self.judge = judge
        self.judge_options = {"prompt": judge_prompt, "max_new_tokens": judge_max_new_tokens,
                              "batch_size": judge_batch_size, "use_chat_template": use_chat_template,
                              "levels": len(scores), "pattern": rating_pattern, "dtype": judge_dtype}
        self.scores = [float(s) for s in scores]
        self.runtime: dict[str, Any] = {"device": "auto", "dtype": "auto", "trust_remote_code": False}

    def run(self, model_dir: str | Path | None = None, predictions: str | Path | None = None,
            out_dir: str | Path = ".", device: str = "auto", dtype: str = "auto",
            trust_remote_code: bool = False) -> dict[str, float]:
        """As `Task.run`; the judge runs on the same `device`, in `judge_dtype` if set, else in `dtype`."""
        if not self.judge:
            raise ValueError("task.judge is not set: give the judge LM's name or path")
        self.runtime = {"device": device, "dtype": dtype, "trust_remote_code": trust_remote_code}
        return super().run(model_dir, predictions, out_dir, device, dtype, trust_remote_code)

    def score(self, predictions: list[dict[str, Any]]) -> dict[str, float]:
        options = {**self.judge_options, "device": self.runtime["device"],
                   "dtype": self.judge_options["dtype"] or self.runtime["dtype"],
                   "trust_remote_code": self.runtime["trust_remote_code"]}
        judge = LLMJudge(self.judge, **options)
        ratings = judge.rate(predictions)
        del judge
        by_type: dict[str, list[float]] = defaultdict(list)
        counts: dict[int, int] = defaultdict(int)
        for p, (reply, rating) in zip(predictions, ratings):
            p["judge_output"], p["rating"] = reply, rating
            p["score"] = self.scores[rating - 1] if rating is not None else 0.0
            counts[rating or 0] += 1
            by_type[""].append(p["score"])
            if p.get("question_type"):
                by_type[p["question_type"]].append(p["score"])
        n = len(predictions)
        metrics = {"judge/score": sum(by_type[""]) / n, "judge/unparsed": counts[0] / n, "judge/count": float(n)}
        metrics.update({f"judge/rating_{r}": counts[r] / n for r in range(1, len(self.scores) + 1)})
        metrics.update({f"judge/score_{t}": sum(v) / len(v) for t, v in sorted(by_type.items()) if t})
        return metrics
