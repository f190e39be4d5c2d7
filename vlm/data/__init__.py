"""Data layer: shards -> records -> token ids, labels and pixel tiles -> padded batches.

tokens (special tokens, tokenizer loading), images (resize/tile, placeholders), formats (Record, converters),
processor (chat template, labels), collate (padding), pipeline (webdataset stream, skip counts),
datamodule (Lightning), synthetic.shapes (the offline shapes world). Import the submodules directly: this package
stays import-light so that `import vlm` does not pull in webdataset or Lightning.
"""
