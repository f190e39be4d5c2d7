"""Stand-in "own data" as plain files, in the layouts real data sets come in, for trying the path from files to a
trained model (README: "From the quickstart to your data") without downloading anything:

    python -m vlm.data.synthetic.files out=my_data [num_train=2000] [num_test=200] [seed=1] [image_size=64]

writes shapes-world pictures (`vlm/data/synthetic/shapes.py`, another seed than the quickstart's) and
- `photos/*.png`;
- `captions.csv`: `file_name,caption` (what `python -m vlm.data.convert images` reads);
- `conversations.json`: LLaVA's instruction format, `[{id, image, conversations: [{from, value}]}]` (what
  `python -m vlm.data.convert llava` reads);
- `vqa.jsonl`: held-out questions `{id, image, question, answers, question_type}` (what `evaluate.py task=vqa
  task.data=...` reads).
"""
from __future__ import annotations

import csv
import json
import random
from pathlib import Path

from vlm.data.synthetic.shapes import caption, conversation, draw, questions, sample_scene

LLAVA_ROLES = {"user": "human", "assistant": "gpt"}


def write_example_files(out: str | Path, num_train: int = 2000, num_test: int = 200, seed: int = 1,
                        image_size: int = 64) -> Path:
    """Write the files listed in the module docstring under `out`; returns `out`."""
    out = Path(out)
    (out / "photos").mkdir(parents=True, exist_ok=True)
    captions, chats, vqa = [], [], []
    for split, count in (("train", num_train), ("test", num_test)):
        for index in range(count):
            rng = random.Random(f"files-{seed}-{split}-{index}")
            objects = sample_scene(rng)
            name = f"{split}-{index:06d}.png"
            draw(objects, image_size, rng).save(out / "photos" / name)
            qa = questions(objects)
            if split == "train":
                captions.append({"file_name": name, "caption": caption(objects)})
                turns = [{"from": LLAVA_ROLES[t["role"]], "value": t["content"]} for t in conversation(qa, rng)]
                chats.append({"id": f"{split}-{index:06d}", "image": name, "conversations": turns})
            else:
                vqa += [{"id": f"{split}-{index:06d}-{n}", "image": f"photos/{name}", "question": q["question"],
                         "answers": [q["answer"]], "question_type": q["type"]} for n, q in enumerate(qa)]
    with (out / "captions.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["file_name", "caption"])
        writer.writeheader()
        writer.writerows(captions)
    (out / "conversations.json").write_text(json.dumps(chats, indent=1))
    (out / "vqa.jsonl").write_text("".join(json.dumps(row) + "\n" for row in vqa))
    return out


def main(argv: list[str] | None = None) -> None:
    from vlm.cli import REQUIRED, parse_options

    a = parse_options(argv, "vlm.data.synthetic.files",
                      {"out": REQUIRED, "num_train": 2000, "num_test": 200, "seed": 1, "image_size": 64})
    out = write_example_files(a["out"], a["num_train"], a["num_test"], a["seed"], a["image_size"])
    print(f"{a['num_train']} training pictures (captions.csv, conversations.json) and {a['num_test']} test "
          f"pictures (vqa.jsonl) -> {out}")


if __name__ == "__main__":
    main()
