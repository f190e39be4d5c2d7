"""The language model: any Hugging Face causal LM, loaded by name/path or built from an inline config.

`config` (a dict with `model_type`) lets presets describe exact shapes, so a saved model directory and the
meta-device summary rebuild the decoder without downloading anything; real weights come only with `pretrained`.
"""

from __future__ import annotations

from typing import Any

import torch

BOOKKEEPING_KEYS = ("_name_or_path", "architectures", "transformers_version", "id2label", "label2id", "dtype")
PART_TYPE = "hf_causal_lm"  # its name in vlm.models.registry


def _dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    # None means float32, not transformers' "auto" (which would follow the checkpoint): training wants fp32 masters.
    if dtype is None:
        return torch.float32
    if isinstance(dtype, str):  # a name from a config: only ever a dtype, never another attribute of torch
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ValueError(f"decoder dtype {dtype!r} is not a torch dtype (e.g. float32, bfloat16)")
        return getattr(torch, dtype)
    return dtype


def build_decoder(
    name_or_path: str | None = None,
    config: dict[str, Any] | None = None,
    pretrained: bool = True,
    dtype: str | torch.dtype | None = None,
    attn_implementation: str = "sdpa",
    trust_remote_code: bool = False,
):
    """A `transformers` causal LM. `pretrained` loads `name_or_path`'s weights; otherwise random weights with
    the shapes of `config` (or, without one, of `name_or_path`'s config)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from vlm.hub import named_model

    kwargs = {"dtype": _dtype(dtype), "attn_implementation": attn_implementation,
              "trust_remote_code": trust_remote_code}
    if pretrained:
        if not name_or_path:
            raise ValueError("pretrained=True needs name_or_path")
        with named_model(name_or_path, "decoder", "model.decoder.name_or_path"):
            return AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)
    if config is not None:
        config = dict(config)
        if "model_type" not in config:
            raise ValueError("a decoder config needs `model_type` (e.g. llama)")
        cfg = AutoConfig.for_model(config.pop("model_type"), **{k: v for k, v in config.items()
                                                                if k not in BOOKKEEPING_KEYS})
    elif name_or_path:
        with named_model(name_or_path, "decoder config", "model.decoder.name_or_path"):
            cfg = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    else:
        raise ValueError("a decoder needs `config` or `name_or_path`")
    return AutoModelForCausalLM.from_config(cfg, **kwargs)


def decoder_export_config(decoder: Any, trust_remote_code: bool = False) -> dict[str, Any]:
    """The `vlm.yaml` spec (a registered type, plain arguments) that rebuilds `decoder` offline: its current config
    (resized vocabulary included), random weights, same dtype and attention implementation."""
    if hasattr(decoder, "merge_and_unload"):
        raise ValueError("the decoder still carries LoRA adapters: merge them (merge_and_unload) before saving")
    config = decoder.config
    return {
        "type": PART_TYPE,
        "name_or_path": getattr(config, "_name_or_path", None) or None,
        "config": {k: v for k, v in config.to_dict().items() if k not in BOOKKEEPING_KEYS},
        "pretrained": False,
        "dtype": str(decoder.dtype).removeprefix("torch."),
        "attn_implementation": getattr(config, "_attn_implementation", None) or "sdpa",
        "trust_remote_code": trust_remote_code,
    }
