"""Write a model directory as a transformers Llava directory (weights, config, processor, chat template).

    python -m vlm.export model_dir=PATH out=DIR [legacy_names=false]

The result loads offline with `LlavaForConditionalGeneration.from_pretrained(DIR)` and
`AutoProcessor.from_pretrained(DIR)` (so lmms-eval and vLLM read it). A model Llava cannot express is refused with
one message that lists every part that does not map; nothing is written then.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from vlm.cli import REQUIRED, parse_options

OPTIONS = {"model_dir": REQUIRED, "out": REQUIRED, "legacy_names": False}


def main(argv: Sequence[str] | None = None) -> Path:
    options = parse_options(argv, "vlm.export", OPTIONS)
    from vlm.interop.llava import NotMappableError, export_llava
    from vlm.models.vlm import VisionLanguageModel

    model_dir, out, legacy_names = options["model_dir"], options["out"], options["legacy_names"]
    model, tokenizer = VisionLanguageModel.from_pretrained(model_dir)
    try:
        directory = export_llava(model, tokenizer, out, legacy_names=legacy_names)
    except NotMappableError as exc:
        raise SystemExit(f"cannot export {model_dir}: {exc}") from None
    print(f"wrote {directory} (transformers LlavaForConditionalGeneration + LlavaProcessor)")
    return directory


if __name__ == "__main__":
    main()
