"""Converters into webdataset shards, with a progress bar and a summary of what was written and skipped (and why).

    python -m vlm.data.convert images    images=DIR captions=captions.csv|.jsonl out=DIR
    python -m vlm.data.convert llava     json=llava_v1_5_mix665k.json images=DIR out=DIR
    python -m vlm.data.convert preference source=trl|rlaif-v input=pairs.jsonl images=DIR out=DIR
    python -m vlm.data.convert synthetic root=DIR [num_train=N ...]
    python -m vlm.data.convert tokenizer shards=DIR/train.txt vocab_size=N out=DIR/tokenizer

Shards are `{prefix}-{n:06d}.tar` plus a `{prefix}.txt` shard list (what `data.train` can point at) and a
`{prefix}.stats.json` with the counts. Keys are row numbers (`000000042`): ids and file names may hold dots or
slashes, which webdataset would read as field separators; the original id or file name is kept in the json.
Image bytes are copied as they are (no re-encoding) after a full decode check.
"""
