"""Decoders: built from inline configs or local paths, rebuilt offline from their export config."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vlm.models.decoders import build_decoder, decoder_export_config
from vlm.models.registry import build

TINY = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 2, "vocab_size": 40, "tie_word_embeddings": True}


def test_build_from_config_is_float32_and_sdpa() -> None:
    decoder = build_decoder(config=dict(TINY), pretrained=False)
    assert decoder.dtype == torch.float32 and decoder.config._attn_implementation == "sdpa"
    assert decoder.get_input_embeddings().weight.shape == (40, 32)
    assert build_decoder(config=dict(TINY), pretrained=False, dtype="bfloat16").dtype == torch.bfloat16


def test_pretrained_by_local_path(tmp_path: Path) -> None:
    torch.manual_seed(0)
    original = build_decoder(config=dict(TINY), pretrained=False).eval()
    original.save_pretrained(tmp_path / "lm")
    loaded = build_decoder(str(tmp_path / "lm")).eval()
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, original(ids).logits)
    shapes_only = build_decoder(str(tmp_path / "lm"), pretrained=False)  # config from the path, random weights
    assert shapes_only.config.hidden_size == 32
    assert not torch.equal(shapes_only.get_input_embeddings().weight, original.get_input_embeddings().weight)


def test_export_config_rebuilds_resized_decoder() -> None:
    decoder = build_decoder(config=dict(TINY), pretrained=False)
    decoder.resize_token_embeddings(45, mean_resizing=False)
    spec = decoder_export_config(decoder)
    assert spec["pretrained"] is False and spec["config"]["vocab_size"] == 45
    assert spec["type"] == "hf_causal_lm"
    rebuilt = build("decoder", spec, "decoder")
    shapes = {k: v.shape for k, v in decoder.state_dict().items()}
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == shapes


def test_missing_source_and_lora_errors() -> None:
    with pytest.raises(ValueError, match="name_or_path"):
        build_decoder(pretrained=True)
    with pytest.raises(ValueError, match="model_type"):
        build_decoder(config={"hidden_size": 8}, pretrained=False)
    from peft import LoraConfig, get_peft_model

    lora = get_peft_model(build_decoder(config=dict(TINY), pretrained=False), LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="merge"):
        decoder_export_config(lora)
