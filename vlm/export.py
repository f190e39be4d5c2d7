"""Write a model directory as a transformers Llava directory (weights, config, processor, chat template).

    python -m vlm.export model_dir=PATH out=DIR [legacy_names=false]

The result loads offline with `LlavaForConditionalGeneration.from_pretrained(DIR)` and
`AutoProcessor.from_pretrained(DIR)` (so lmms-eval and vLLM read it). A model Llava cannot express is refused with
one message that lists every part that does not map; nothing is written then.
"""
from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

USAGE = "usage: python -m vlm.export model_dir=PATH out=DIR [legacy_names=false]"


def main(argv: Sequence[str] | None = None) -> Path:
    from omegaconf import OmegaConf

    from vlm.interop.llava import NotMappableError, export_llava
    from vlm.models.vlm import VisionLanguageModel

    options = OmegaConf.to_container(OmegaConf.from_dotlist(list(sys.argv[1:] if argv is None else argv)))
    model_dir, out = options.pop("model_dir", None), options.pop("out", None)
    legacy_names = bool(options.pop("legacy_names", False))
    if not model_dir or not out or options:
        raise SystemExit(USAGE + (f"\nunknown options: {sorted(options)}" if options else ""))
    model, tokenizer = VisionLanguageModel.from_pretrained(model_dir)
    try:
        directory = export_llava(model, tokenizer, out, legacy_names=legacy_names)
    except NotMappableError as exc:
        raise SystemExit(f"cannot export {model_dir}: {exc}") from None
    print(f"wrote {directory} (transformers LlavaForConditionalGeneration + LlavaProcessor)")
    return directory


if __name__ == "__main__":
    main()
