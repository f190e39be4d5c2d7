"""`python -m vlm.data.convert {images,llava,preference,tokenizer,synthetic} key=value ...`: see
`vlm/data/convert/__init__.py`. The command word comes first, then its options in the style of every tool (vlm.cli);
`python -m vlm.data.convert COMMAND --help` lists them."""
from __future__ import annotations

import sys

from vlm.cli import REQUIRED, parse_options

# out: output folder for the shards; prefix: shard name prefix and list file name (train, val, ...); quiet: no
# progress bar; allow_outside: copy images whose paths lead outside images= (absolute or ../ paths), default: skip them
SHARDS = {"out": REQUIRED, "prefix": "train", "samples_per_shard": 1000, "quiet": False, "allow_outside": False}
COMMANDS = {
    # a folder of images + a .csv, .tsv or .jsonl of (file name, caption); columns found by name when not given
    "images": {"images": REQUIRED, "captions": REQUIRED, "file_column": None, "caption_column": None, **SHARDS},
    # LLaVA instruction JSON (e.g. llava_v1_5_mix665k.json) + the folder its `image` paths are relative to
    "llava": {"json": REQUIRED, "images": REQUIRED, **SHARDS},
    # preference pairs for dpo: source=trl (TRL conversational) or source=rlaif-v, a .json list or .jsonl
    "preference": {"source": REQUIRED, "input": REQUIRED, "images": ".", **SHARDS},
    # a byte-level BPE tokenizer for the text in shards (what data.train takes: a .txt list, a pattern, a::b)
    "tokenizer": {"shards": REQUIRED, "vocab_size": REQUIRED, "out": REQUIRED, "max_tiles": 9,
                  "caption_field": "caption", "quiet": False},
    # the quickstart's shapes world
    "synthetic": {"root": REQUIRED, "num_train": 20000, "num_val": 500, "num_test": 1000, "image_size": 64,
                  "seed": 0, "samples_per_shard": 2000, "quiet": False},
}
USAGE = f"usage: python -m vlm.data.convert {{{','.join(COMMANDS)}}} key=value ... (COMMAND --help: its keys)"


def main(argv: list[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    if not words or words[0] not in COMMANDS:
        raise SystemExit(USAGE + (f"\nunknown command {words[0]!r}" if words and "=" not in words[0] else ""))
    command, a = words[0], parse_options(words[1:], f"vlm.data.convert {words[0]}", COMMANDS[words[0]])
    if command == "tokenizer":
        try:
            a["vocab_size"] = int(a["vocab_size"])
        except ValueError:
            raise SystemExit(f"vocab_size= takes a whole number, not {a['vocab_size']!r}") from None
    if command == "preference" and a["source"] not in ("trl", "rlaif-v"):
        raise SystemExit(f"source= is trl or rlaif-v, not {a['source']!r}")
    if command == "images":
        from vlm.data.convert.images import convert_images

        convert_images(a["images"], a["captions"], a["out"], a["prefix"], a["samples_per_shard"], a["file_column"],
                       a["caption_column"], a["quiet"], a["allow_outside"])
    elif command == "llava":
        from vlm.data.convert.llava import convert_llava

        convert_llava(a["json"], a["images"], a["out"], a["prefix"], a["samples_per_shard"], a["quiet"],
                      a["allow_outside"])
    elif command == "tokenizer":
        from vlm.data.convert.tokenizer import convert_tokenizer

        convert_tokenizer(a["shards"], a["vocab_size"], a["out"], a["max_tiles"], a["caption_field"], a["quiet"])
    elif command == "preference":
        from vlm.data.convert.preference import convert_preference

        convert_preference(a["source"], a["input"], a["images"], a["out"], a["prefix"], a["samples_per_shard"],
                           a["quiet"], a["allow_outside"])
    else:
        from vlm.data.convert.synthetic import convert_synthetic

        convert_synthetic(a["root"], a["num_train"], a["num_val"], a["num_test"], a["image_size"], a["seed"],
                          a["samples_per_shard"], a["quiet"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
