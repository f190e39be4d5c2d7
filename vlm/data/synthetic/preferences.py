"""The shapes world's preference pairs (for `dpo`) and POPE questions (for `task=pope`), from its shards' scenes.

Both read the scene metadata the shapes world writes (`json.objects`: shape, colour, position of every object), so
they stay right whatever the world's settings, and reuse its pictures as they are.

- **Preference pairs** (`preference` format): a question about the picture; chosen is the true answer; rejected is
  a hallucinated one: a colour or shape that is absent, a wrong count, a neighbour's position, or the wrong answer
  to "is there a X in the image?" (the object question POPE asks, with negatives drawn the three ways below).
- **POPE questions**: "is there a {colour} {shape} in the image?" for every object present (answer yes) and as
  many absent ones (answer no), drawn three ways, as POPE does:
  `random` (any absent object), `popular` (the absent objects that are most frequent in the training split) and
  `adversarial` (absent objects that share a colour or a shape with an object present: the binding errors a model
  that half-sees the picture makes, the shapes world's analogue of POPE's co-occurring objects).

    python -m vlm.data.synthetic.preferences root=data/shapes
"""
from __future__ import annotations

import io
import json
import os
import random
import shutil
import tarfile
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vlm.data.synthetic.shapes import COLORS, POSITIONS, SHAPES, questions

POPE_STRATEGIES = ("random", "popular", "adversarial")
FORMAT_VERSION = 1
Obj = tuple[str, str]  # (colour, shape)


def read_scenes(root: Path, split: str) -> Iterator[tuple[str, bytes, dict[str, Any]]]:
    """(key, png bytes, json) of every sample of a shapes split, in shard order (from the split's list file)."""
    for name in (root / f"{split}.txt").read_text().split():
        with tarfile.open(root / name) as tar:
            fields: dict[str, dict[str, bytes]] = {}
            for member in tar:
                key, ext = member.name.split(".", 1)
                fields.setdefault(key, {})[ext] = tar.extractfile(member).read()
            for key, sample in fields.items():
                yield key, sample["png"], json.loads(sample["json"])


def all_objects() -> list[Obj]:
    return [(c, s) for c in COLORS for s in SHAPES]


def object_question(obj: Obj) -> str:
    return f"is there {'an' if obj[0][0] in 'aeiou' else 'a'} {obj[0]} {obj[1]} in the image?"


def absent_objects(present: set[Obj], strategy: str, popularity: Counter, rng: random.Random, n: int) -> list[Obj]:
    """n absent objects drawn by `strategy` (fewer if fewer exist)."""
    absent = [o for o in all_objects() if o not in present]
    if strategy == "random":
        return rng.sample(absent, min(n, len(absent)))
    if strategy == "popular":
        rng.shuffle(absent)  # ties broken at random
        return sorted(absent, key=lambda o: -popularity[o])[:n]
    if strategy == "adversarial":
        colours, shapes = {c for c, _ in present}, {s for _, s in present}
        near = [o for o in absent if o[0] in colours or o[1] in shapes]
        far = [o for o in absent if o not in near]
        rng.shuffle(near)
        rng.shuffle(far)
        return (near + far)[:n]
    raise ValueError(f"unknown POPE strategy {strategy!r}; expected one of {POPE_STRATEGIES}")


def pope_questions(objects: list[dict[str, str]], popularity: Counter, rng: random.Random,
                   strategies: tuple[str, ...] = POPE_STRATEGIES) -> list[dict[str, str]]:
    """Balanced yes/no questions of one scene: one per present object, as many absent ones per strategy."""
    present = {(o["color"], o["shape"]) for o in objects}
    out = []
    for strategy in strategies:
        for obj in sorted(present):
            out.append({"question": object_question(obj), "answer": "yes", "category": strategy})
        for obj in absent_objects(present, strategy, popularity, rng, len(present)):
            out.append({"question": object_question(obj), "answer": "no", "category": strategy})
    return out


def hallucinated(qa: dict[str, str], objects: list[dict[str, str]], rng: random.Random) -> str:
    """A wrong answer to a shapes-world question, of the kind a hallucinating model gives."""
    kind, answer = qa["type"], qa["answer"]
    if kind == "color":
        present = {o["color"] for o in objects}
        return rng.choice([c for c in COLORS if c not in present] or [c for c in COLORS if c != answer])
    if kind == "shape":
        present = {o["shape"] for o in objects}
        return rng.choice([s for s in SHAPES if s not in present] or [s for s in SHAPES if s != answer])
    if kind == "count":
        return str(rng.choice([n for n in range(1, len(POSITIONS) + 1) if n != int(answer)]))
    if kind == "position":  # a neighbour's position when there is one, else an empty quadrant
        others = [o["position"] for o in objects if o["position"] != answer]
        return rng.choice(others or [p for p in POSITIONS if p != answer])
    raise ValueError(f"unknown question type {kind!r}")


def preference_pairs(objects: list[dict[str, str]], popularity: Counter, rng: random.Random,
                     count: int = 2) -> list[dict[str, Any]]:
    """`count` pairs for one scene: questions of the world's own kinds and object (POPE-style) questions."""
    pairs = []
    qa = questions(objects)
    for item in rng.sample(qa, min(count, len(qa))):
        pairs.append({"question": item["question"], "chosen": item["answer"],
                      "rejected": hallucinated(item, objects, rng), "type": item["type"]})
    present = {(o["color"], o["shape"]) for o in objects}
    strategy = rng.choice(POPE_STRATEGIES)
    obj = rng.choice(sorted(present)) if rng.random() < 0.5 else next(
        iter(absent_objects(present, strategy, popularity, rng, 1)), None)
    if obj is not None:
        yes = obj in present
        pairs.append({"question": object_question(obj), "chosen": "yes" if yes else "no",
                      "rejected": "no" if yes else "yes", "type": "object"})
    return pairs


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


class _Shards:
    def __init__(self, folder: Path, prefix: str, per_shard: int):
        self.folder, self.prefix, self.per_shard = folder, prefix, per_shard
        self.names: list[str] = []
        self.count = 0
        self._tar: tarfile.TarFile | None = None

    def write(self, key: str, png: bytes, meta: dict[str, Any]) -> None:
        if self.count % self.per_shard == 0:
            self.close()
            self.names.append(f"{self.prefix}-{len(self.names):06d}.tar")
            self._tar = tarfile.open(self.folder / self.names[-1], "w", format=tarfile.USTAR_FORMAT)
        _add(self._tar, f"{key}.png", png)
        _add(self._tar, f"{key}.json", json.dumps(meta).encode())
        self.count += 1

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None


def ensure_preferences(shapes_root: str | os.PathLike, out: str | os.PathLike | None = None, seed: int = 0,
                       pairs_per_image: int = 2, samples_per_shard: int = 2000) -> Path:
    """Write `preference/{train,val}-*.tar` (+ lists) and `pope/test-*.tar` (+ `test.txt`) under `out` (default:
    `<shapes_root>/dpo`), once: a second call with the same parameters and world only checks `info.json`."""
    shapes_root = Path(shapes_root)
    out = Path(out) if out else shapes_root / "dpo"
    world = json.loads((shapes_root / "info.json").read_text())["params"]
    params = {"format_version": FORMAT_VERSION, "world": world, "seed": seed, "pairs_per_image": pairs_per_image,
              "samples_per_shard": samples_per_shard}
    try:
        if json.loads((out / "info.json").read_text()).get("params") == params:
            return out
    except (OSError, ValueError):
        pass
    out.mkdir(parents=True, exist_ok=True)
    (out / "info.json").unlink(missing_ok=True)
    popularity: Counter = Counter((o["color"], o["shape"]) for _, _, meta in read_scenes(shapes_root, "train")
                                  for o in meta["objects"])
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-dpo-", dir=out))
    counts: dict[str, int] = {}
    try:
        for folder, split in (("preference", "train"), ("preference", "val"), ("pope", "test")):
            (tmp / folder).mkdir(exist_ok=True)
            shards = _Shards(tmp / folder, split, samples_per_shard)
            for key, png, meta in read_scenes(shapes_root, split):
                rng = random.Random(f"dpo-{seed}-{key}")
                if folder == "pope":
                    shards.write(key, png, {"objects": meta["objects"],
                                            "pope": pope_questions(meta["objects"], popularity, rng)})
                    continue
                for n, pair in enumerate(preference_pairs(meta["objects"], popularity, rng, pairs_per_image)):
                    prompt = [{"role": "user", "content": pair["question"] + "\n<image>"}]
                    shards.write(f"{key}-p{n}", png, {"prompt": prompt, "chosen": pair["chosen"],
                                                      "rejected": pair["rejected"], "type": pair["type"]})
            shards.close()
            (tmp / folder / f"{split}.txt").write_text("".join(n + "\n" for n in shards.names))
            counts[f"{folder}/{split}"] = shards.count
        for folder in ("preference", "pope"):
            if (out / folder).exists():
                shutil.rmtree(out / folder)
            os.replace(tmp / folder, out / folder)
        (tmp / "info.json").write_text(json.dumps({"params": params, "counts": counts}, indent=2))
        os.replace(tmp / "info.json", out / "info.json")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def ensure_shapes_preferences(root: str | os.PathLike, preference_seed: int = 0, pairs_per_image: int = 2,
                              **shapes: Any) -> Path:
    """The shapes world (`ensure_shapes(root, **shapes)`) and then its pairs and POPE questions (`root/dpo`)."""
    from vlm.data.synthetic.shapes import ensure_shapes

    ensure_shapes(root, **shapes)
    return ensure_preferences(root, seed=preference_seed, pairs_per_image=pairs_per_image)


def main(argv: list[str] | None = None) -> None:
    from vlm.cli import REQUIRED, parse_options

    # root: a generated shapes world (python -m vlm.data.convert synthetic); out: default ROOT/dpo
    a = parse_options(argv, "vlm.data.synthetic.preferences",
                      {"root": REQUIRED, "out": None, "seed": 0, "pairs_per_image": 2})
    out = ensure_preferences(a["root"], a["out"], a["seed"], a["pairs_per_image"])
    print(json.dumps(json.loads((out / "info.json").read_text())["counts"]), "->", out)


if __name__ == "__main__":
    main()
