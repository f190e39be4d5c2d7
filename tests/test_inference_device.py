"""device= / dtype= for inference: how the strings resolve, and evaluate.py, the chat, nearest tokens and the judge
running in bf16 on the CPU (the only device these machines have)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from vlm.device import place, resolve_device

CONF = str(Path(__file__).resolve().parents[1] / "conf")


def test_auto_is_the_cpu_in_fp32_without_cuda(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device() == (torch.device("cpu"), torch.float32)
    assert resolve_device("auto", "bf16") == (torch.device("cpu"), torch.bfloat16)
    with pytest.raises(ValueError, match="CUDA is not available"):
        resolve_device("cuda")


def test_auto_is_cuda_in_bf16_when_there_is_a_gpu(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_device() == (torch.device("cuda"), torch.bfloat16)
    assert resolve_device("cuda:1", "float32") == (torch.device("cuda:1"), torch.float32)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_device("auto", None) == (torch.device("cuda"), torch.float16)


def test_bad_names_are_refused_with_the_choices() -> None:
    with pytest.raises(ValueError, match="not a torch device"):
        resolve_device("gpu0")
    with pytest.raises(ValueError, match="bfloat16"):
        resolve_device("cpu", "int8")
    assert resolve_device("cpu", "torch.float16")[1] is torch.float16


@pytest.fixture
def placed(monkeypatch) -> list[torch.nn.Module]:
    """Every model `vlm.device.place` puts somewhere, as placed."""
    import vlm.device

    models: list[torch.nn.Module] = []

    def spy(model, device="auto", dtype="auto"):
        models.append(place(model, device, dtype))
        return models[-1]

    monkeypatch.setattr(vlm.device, "place", spy)
    return models


def dtypes(model: torch.nn.Module) -> set[torch.dtype]:
    return {p.dtype for p in model.parameters()}


def test_evaluate_py_runs_in_bf16_on_the_cpu(world, tmp_path: Path, placed) -> None:
    from vlm.run import run_evaluation

    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("evaluate", overrides=[f"model_dir={world['model']}", f"run_dir={tmp_path}", "dtype=bfloat16",
                                             f"task.data={world['shapes'] / 'test.txt'}", "task.limit=4",
                                             "task.batch_size=2", "task.max_new_tokens=3"])
    assert cfg.device == "auto"
    metrics = run_evaluation(cfg)
    assert json.loads((tmp_path / "metrics.json").read_text())["vqa/count"] == metrics["vqa/count"] == 4
    assert len((tmp_path / "predictions.jsonl").read_text().splitlines()) == 4
    (model,) = placed
    assert dtypes(model) == {torch.bfloat16} and next(model.parameters()).device.type == "cpu"


def test_chat_and_nearest_tokens_take_device_and_dtype(world, tmp_path: Path, placed) -> None:
    from vlm.analysis.nearest_tokens import main as nearest
    from vlm.chat import main as chat

    lines = iter(["what colour?", "/quit"])
    replies: list[str] = []
    chat([f"model_dir={world['model']}", f"image={world['image']}", "device=cpu", "dtype=bf16",
          "max_new_tokens=2"], read=lambda _: next(lines), write=replies.append)
    assert any(r.startswith("model> ") for r in replies)
    result = nearest([f"model_dir={world['model']}", f"image={world['image']}", "dtype=bfloat16",
                      f"out={tmp_path / 'words.png'}"])
    assert len(result.tokens) == 16 and (tmp_path / "words.png").exists()
    assert [dtypes(m) for m in placed] == [{torch.bfloat16}, {torch.bfloat16}]


def test_the_judge_follows_the_evaluation_device_and_dtype(tmp_path: Path, monkeypatch) -> None:
    from test_eval_judge import save_judge

    import vlm.evaluation.judge as judge_module

    judges: list[judge_module.LLMJudge] = []

    class Recorded(judge_module.LLMJudge):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            judges.append(self)

    monkeypatch.setattr(judge_module, "LLMJudge", Recorded)
    judge_dir = save_judge(tmp_path / "judge", "3")
    preds = tmp_path / "preds.jsonl"
    preds.write_text(json.dumps({"id": 1, "question": "q", "prediction": "red", "answers": ["red"]}) + "\n")
    task = judge_module.JudgeTask(judge=str(judge_dir), judge_max_new_tokens=2)
    metrics = task.run(predictions=preds, out_dir=tmp_path / "out", device="cpu", dtype="bfloat16")
    assert metrics["judge/score"] == 1.0
    fp32 = judge_module.JudgeTask(judge=str(judge_dir), judge_max_new_tokens=2, judge_dtype="float32")
    fp32.run(predictions=preds, out_dir=tmp_path / "out32", dtype="bfloat16")  # judge_dtype wins
    assert [(j.model.dtype, j.device.type) for j in judges] == [(torch.bfloat16, "cpu"), (torch.float32, "cpu")]
