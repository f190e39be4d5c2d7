"""Parameter table of a model config, built on the meta device: nothing is downloaded and no memory is used.

    python -m vlm.summary model=llava_7b [hydra overrides ...] [json=true]

Per part (encoder, projector, decoder, total; a dual encoder such as model=clip_vit_b16: its own parts), then for
every stage preset in conf/stage/ what it trains and how large those weights are (fp32 and bf16) next to the whole
model in bf16 - the numbers that decide memory plans.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

CONF_DIR = Path(__file__).resolve().parent / "conf"  # the package's own copy of conf/ (a link in a checkout)
PARTS = ("encoder", "projector", "decoder")
MB = 1e6


def compose_model_config(overrides: Sequence[str] = (), conf_dir: Path = CONF_DIR) -> dict[str, Any]:
    """The resolved `model` config of `conf/summary.yaml` + overrides, made offline (no weights, no init_from)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
        cfg = compose("summary", overrides=list(overrides))
    model = OmegaConf.to_container(cfg.model, resolve=True)
    for part in ("encoder", "decoder", "text_encoder"):
        if model.get(part):
            model[part]["pretrained"] = False
    model["encoder"]["init_from"] = None
    return model


def count(params: Any) -> int:
    """Parameters counted once each (tied weights are one tensor)."""
    return sum(p.numel() for p in {id(p): p for p in params}.values())


def stage_presets(conf_dir: Path = CONF_DIR) -> dict[str, list[str]]:
    """name -> trainable part names, for each conf/stage/*.yaml that declares `trainable`."""
    from omegaconf import OmegaConf

    stages = {}
    for file in sorted((conf_dir / "stage").glob("*.yaml")):
        trainable = OmegaConf.load(file).get("trainable")
        if trainable is not None:
            stages[file.stem] = [str(t) for t in trainable]
    return stages


def summarize(overrides: Sequence[str] = (), conf_dir: Path = CONF_DIR) -> dict[str, Any]:
    from vlm.models.clip import ClipModel, is_clip_config
    from vlm.models.vlm import VisionLanguageModel

    model_cfg = compose_model_config(overrides, conf_dir)
    clip = is_clip_config(model_cfg)
    with torch.device("meta"):
        model = ClipModel.from_config(model_cfg) if clip else VisionLanguageModel.from_config(model_cfg)
    parts = [name for name, _ in model.named_children()] if clip else list(PARTS)
    out: dict[str, Any] = {part: count(getattr(model, part).parameters()) for part in parts}
    out["parts"] = parts
    out["total"] = count(model.parameters())
    out["total_mb_bf16"] = out["total"] * 2 / MB
    out["tokens_per_image"] = model.encoder.num_tokens if clip else model.tokens_per_image
    out["stages"] = {name: _stage(model, trainable) for name, trainable in stage_presets(conf_dir).items()}
    return out


def _stage(model: nn.Module, trainable: list[str]) -> dict[str, Any]:
    try:
        params = [p for name in trainable for p in model.get_submodule(name).parameters()]
    except AttributeError:
        return {"trainable": trainable, "error": "names a part this model does not have"}
    n = count(params)
    return {"trainable": trainable, "params": n, "mb_fp32": n * 4 / MB, "mb_bf16": n * 2 / MB}


def format_summary(s: dict[str, Any]) -> str:
    lines = [f"{'part':<12}{'parameters':>16}"]
    lines += [f"{part:<12}{s[part]:>16,}" for part in (*s.get("parts", PARTS), "total")]
    lines.append(f"tokens per image: {s['tokens_per_image']}; whole model in bf16: {s['total_mb_bf16']:,.1f} MB")
    lines.append("")
    lines.append(f"{'stage':<10}{'trainable':<32}{'parameters':>16}{'MB fp32':>12}{'MB bf16':>12}")
    for name, st in s["stages"].items():
        parts = ",".join(st["trainable"])
        if "error" in st:
            lines.append(f"{name:<10}{parts:<32}  ({st['error']})")
        else:
            lines.append(f"{name:<10}{parts:<32}{st['params']:>16,}{st['mb_fp32']:>12,.1f}{st['mb_bf16']:>12,.1f}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Hydra overrides of conf/summary.yaml (key=value, like every tool: vlm.cli), and json=true for one JSON
    object instead of tables."""
    words = list(sys.argv[1:] if argv is None else argv)
    if any(w in ("-h", "--help") for w in words):
        print("usage: python -m vlm.summary [model=NAME] [hydra overrides ...] [json=false]")
        raise SystemExit(0)
    as_json = [w.split("=", 1)[1].lower() for w in words if w.startswith("json=")]
    if any(v not in ("true", "false") for v in as_json):
        raise SystemExit(f"json= takes true or false, not {as_json[-1]!r}")
    s = summarize([w for w in words if not w.startswith("json=")])
    print(json.dumps(s) if as_json and as_json[-1] == "true" else format_summary(s))
    return s


if __name__ == "__main__":
    main()
