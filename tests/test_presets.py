"""Current model presets, counted on the meta device by `python -m vlm.summary` against published figures.

Published figures (within 1%):
- nanoVLM-222M: "SigLIP-B/16-224-85M and HuggingFaceTB/SmolLM2-135M as backbones results in a 222M nanoVLM"
  (github.com/huggingface/nanoVLM, README); the vision tower 85M, SmolLM2 135M.
- SigLIP 2: "model checkpoints at four sizes: ViT-B (86M), L (303M), So400m (400M), and g (1B)" (Tschannen et al.
  2025, arXiv:2502.14786, abstract).
- Qwen2.5-0.5B(-Instruct): "Number of Parameters: 0.49B; Number of Parameters (Non-Embedding): 0.36B" (model card).
- Llama-3.2-1B(-Instruct): 1.23B parameters (Meta's model card, "Llama 3.2 1B ... 1.23B").
"""
from __future__ import annotations

import json

import pytest

from vlm.summary import main


def summary(capsys: pytest.CaptureFixture[str], *overrides: str) -> dict:
    main([*overrides, "json=true"])
    return json.loads(capsys.readouterr().out)


def near(count: int, published: float) -> bool:
    return abs(count - published) <= 0.01 * published


def test_nanovlm_222m(capsys: pytest.CaptureFixture[str]) -> None:
    s = summary(capsys, "model=nanovlm_222m")
    assert near(s["total"], 222e6) and near(s["encoder"], 85e6) and near(s["decoder"], 135e6)
    assert s["tokens_per_image"] == 49  # 14x14 SigLIP patches, pixel shuffle 2
    assert s["projector"] == 768 * 4 * 576 + 576  # one linear layer on the shuffled tokens


def test_siglip2_qwen2_5_and_llama3_presets(capsys: pytest.CaptureFixture[str]) -> None:
    s = summary(capsys, "model=nanovlm_222m", "model/encoder=siglip2_b16_512", "model/decoder=qwen2_5_0_5b")
    assert near(s["encoder"], 86e6) and s["tokens_per_image"] == 256  # 32x32 patches at 512 px, shuffled by 2
    assert near(s["decoder"], 0.49e9)
    assert near(s["decoder"] - 151936 * 896, 0.36e9)  # without the (tied) embeddings
    s = summary(capsys, "model=nanovlm_222m", "model/decoder=llama3_2_1b")
    assert near(s["decoder"], 1.23e9)


def test_the_tokenizer_follows_the_decoder() -> None:
    from vlm.summary import compose_model_config

    assert compose_model_config(["model=nanovlm_222m"])["tokenizer"] == "HuggingFaceTB/SmolLM2-135M"
    cfg = compose_model_config(["model=nanovlm_222m", "model/decoder=llama3_2_1b"])
    assert cfg["tokenizer"] == "meta-llama/Llama-3.2-1B-Instruct"
