"""Measuring models the way papers do, and generating from them.

- `task.py` - the protocol every `evaluate.py` task follows (`run(model_dir | predictions, out_dir) -> metrics`,
  predictions.jsonl, predictions.png); `sources.py` reads items, `report.py` writes the outputs.
- tasks: `vqa.py` (VQAv2 accuracy, `vqa_metric.py`), `mcq.py` (letter and log-likelihood), `caption.py`
  (BLEU, CIDEr-D in `caption_metric.py`), `judge.py` (LAVE: an LLM rates answers); `zeroshot.py`, `retrieval.py`
  for CLIP checkpoints.
- `generation.py` - greedy, sampling and beam search over a KV cache; `answerer.py` - a model directory that
  answers conversations (used by the tasks and by `vlm.chat`).
"""
