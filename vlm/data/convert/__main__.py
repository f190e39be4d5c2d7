"""`python -m vlm.data.convert {images,llava,preference,tokenizer,synthetic} ...`: see `vlm/data/convert/__init__.py`."""
from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m vlm.data.convert",
                                     description="Convert data into webdataset shards.")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--out", required=True, help="output folder for the shards")
        p.add_argument("--prefix", default="train", help="shard name prefix and list file name (train, val, ...)")
        p.add_argument("--samples-per-shard", type=int, default=1000)
        p.add_argument("--quiet", action="store_true", help="no progress bar")
        p.add_argument("--allow-outside", action="store_true",
                       help="copy images whose paths lead outside --images (absolute or ../ paths); default: skip them")

    images = sub.add_parser("images", help="a folder of images + a CSV/TSV/JSONL of (file name, caption)")
    images.add_argument("--images", required=True, help="image folder; file names are relative to it")
    images.add_argument("--captions", required=True, help=".csv, .tsv or .jsonl with a file and a caption column")
    images.add_argument("--file-column", default=None, help="default: file_name, filename, file, image or path")
    images.add_argument("--caption-column", default=None, help="default: caption, text, txt or description")
    common(images)

    llava = sub.add_parser("llava", help="LLaVA instruction JSON + its image folder")
    llava.add_argument("--json", required=True, help="e.g. llava_v1_5_mix665k.json or blip_laion_cc_sbu_558k.json")
    llava.add_argument("--images", required=True, help="folder the entries' `image` paths are relative to")
    common(llava)

    tokenizer = sub.add_parser("tokenizer", help="a byte-level BPE tokenizer for the text in shards")
    tokenizer.add_argument("--shards", required=True, help="what data.train takes: a .txt list, a pattern, a::b")
    tokenizer.add_argument("--vocab-size", type=int, required=True, help="e.g. 8000 (special tokens included)")
    tokenizer.add_argument("--out", required=True, help="tokenizer directory to write (model.tokenizer=DIR)")
    tokenizer.add_argument("--max-tiles", type=int, default=9, help="tile markers for grids up to this many tiles")
    tokenizer.add_argument("--caption-field", default="caption", help="json field of a caption without .txt")
    tokenizer.add_argument("--quiet", action="store_true", help="no progress bar")

    preference = sub.add_parser("preference", help="preference pairs (TRL conversational or RLAIF-V) for dpo")
    preference.add_argument("source", choices=["trl", "rlaif-v"], help="the input's format")
    preference.add_argument("--input", required=True, help=".json list or .jsonl of pairs")
    preference.add_argument("--images", default=".", help="folder the rows' image paths are relative to")
    common(preference)

    synthetic = sub.add_parser("synthetic", help="the quickstart's shapes world")
    synthetic.add_argument("--root", required=True)
    synthetic.add_argument("--num-train", type=int, default=20000)
    synthetic.add_argument("--num-val", type=int, default=500)
    synthetic.add_argument("--num-test", type=int, default=1000)
    synthetic.add_argument("--image-size", type=int, default=64)
    synthetic.add_argument("--seed", type=int, default=0)
    synthetic.add_argument("--samples-per-shard", type=int, default=2000)
    synthetic.add_argument("--quiet", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "images":
        from vlm.data.convert.images import convert_images

        convert_images(args.images, args.captions, args.out, args.prefix, args.samples_per_shard,
                       args.file_column, args.caption_column, args.quiet, args.allow_outside)
    elif args.command == "llava":
        from vlm.data.convert.llava import convert_llava

        convert_llava(args.json, args.images, args.out, args.prefix, args.samples_per_shard, args.quiet,
                      args.allow_outside)
    elif args.command == "tokenizer":
        from vlm.data.convert.tokenizer import convert_tokenizer

        convert_tokenizer(args.shards, args.vocab_size, args.out, args.max_tiles, args.caption_field, args.quiet)
    elif args.command == "preference":
        from vlm.data.convert.preference import convert_preference

        convert_preference(args.source, args.input, args.images, args.out, args.prefix, args.samples_per_shard,
                           args.quiet, args.allow_outside)
    else:
        from vlm.data.convert.synthetic import convert_synthetic

        convert_synthetic(args.root, args.num_train, args.num_val, args.num_test, args.image_size, args.seed,
                          args.samples_per_shard, args.quiet)
    return 0


if __name__ == "__main__":
    sys.exit(main())
