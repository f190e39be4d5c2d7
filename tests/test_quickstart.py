"""The quickstart recipe as a user meets it: resolution that rises from stage to stage, and a first run whose
output has each line once and ends with the summary (and `curves.png` in the run directory)."""

from __future__ import annotations

import re
import runpy
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from PIL import Image

from vlm.recipe_report import stage_resolution

ROOT = Path(__file__).resolve().parents[1]
CONF = str(ROOT / "conf")


def recipe_resolutions() -> list[tuple[str, list[int], int]]:
    """Each stage of the default recipe composed as `run_recipe` composes it: (name, encoder input sizes in order,
    tiles per side)."""
    out = []
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        for step in compose("train").recipe.stages:
            cfg = compose("train", overrides=list(step.overrides))
            config = {"data": {"resolution_schedule": OmegaConf.to_container(cfg.data).get("resolution_schedule")},
                      "model": {"encoder": {"image_size": cfg.model.encoder.image_size},
                                "max_tiles": cfg.model.get("max_tiles", 1)}}
            out.append((step.name, *stage_resolution(config)))
    return out


def test_the_recipe_resolution_never_falls_and_rises():
    """The encoder's input size never falls from stage to stage (nor within one) and rises at least once; nor does
    the resolution at which the picture is seen (input size x tiles per side) fall."""
    stages = recipe_resolutions()
    assert [name for name, *_ in stages] == ["clip", "lm", "align", "sft"]
    inputs = [size for _, sizes, _ in stages for size in sizes]
    assert all(a <= b for a, b in zip(inputs, inputs[1:])), f"the encoder's input size falls: {stages}"
    seen = [size * side for _, sizes, side in stages for size in sizes]
    assert all(a <= b for a, b in zip(seen, seen[1:])), f"the picture's resolution falls: {stages}"
    assert inputs[-1] > inputs[0] and seen[-1] > seen[0], f"the resolution never rises: {stages}"


PREFIX = re.compile(r"^\d\d:\d\d:\d\d (?:(?:DEBUG|WARNING|ERROR|CRITICAL) )?")


@pytest.mark.slow
def test_first_run_output(tmp_path: Path, monkeypatch, capfd) -> None:
    """`python train.py` (tiny step counts): no duplicated lines, no third-party tips, one summary, curves.png."""
    from vlm.data.synthetic.shapes import ensure_shapes

    sizes = dict(num_train=200, num_val=20, num_test=40, samples_per_shard=100)
    shapes = ensure_shapes(tmp_path / "data" / "shapes", **sizes)
    run_dir = tmp_path / "run"
    monkeypatch.setattr(sys, "argv", [
        "train.py", f"paths.data_dir={shapes.parent}", *(f"data.prepare.{k}={v}" for k, v in sizes.items()),
        "data.num_workers=0", "data.batch_size=4", "trainer.max_steps=4", "trainer.val_check_interval=2",
        "trainer.limit_val_batches=1", "trainer.log_every_n_steps=1", "eval_overrides=['task.limit=6']",
        f"hydra.run.dir={run_dir}"])
    runpy.run_path(str(ROOT / "train.py"), run_name="__main__")
    out = capfd.readouterr()
    text = out.out + out.err
    lines = [line.rstrip() for chunk in text.splitlines() for line in chunk.split("\r")]
    # log records (the first line of each: multi-line tables such as the parameter counts repeat across stages)
    messages = [PREFIX.sub("", line) for line in lines if PREFIX.match(line)]
    assert len(messages) > 20
    repeated = sorted({m for m in messages if messages.count(m) > 1})
    assert not repeated, f"printed more than once: {repeated}"
    assert "Tip" not in text and "LeafSpec" not in text and "INFO:" not in text
    assert "Epoch 0/-2" not in text
    summary = text[text.index("recipe quickstart finished"):]
    for stage in ("clip", "lm", "align", "sft", "eval/vqa", "eval/zeroshot"):
        assert re.search(rf"^{re.escape(stage)}\s+", summary, re.M), stage
    assert re.search(r"^vqa/count\s+6\s*$", summary, re.M)  # counts as integers, printed once
    assert re.search(r"^zeroshot/top1\s+[\d.]+\s+0\.\d+", summary, re.M)  # beside its chance
    assert str(run_dir / "metrics.json") in summary and "predictions.png" in summary
    with Image.open(run_dir / "curves.png") as curves:
        assert curves.size[0] > 400 and curves.size[1] > 200


def test_threads_leave_a_core_per_data_worker(monkeypatch):
    from vlm.threads import training_threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert training_threads("auto", num_workers=1, cores=2) == 1  # the quickstart on 2 cores
    assert training_threads("auto", num_workers=0, cores=2) == 2
    assert training_threads("auto", num_workers=4, cores=2) == 1  # never below one
    assert training_threads("auto", num_workers=1, cores=16, processes=2) == 7  # two DDP ranks share the cores
    assert training_threads(3, num_workers=1, cores=2) == 3 and training_threads(None, 1, 2) is None
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert training_threads("auto", num_workers=1, cores=2) is None  # the user's setting wins
    with pytest.raises(ValueError):
        training_threads(0, num_workers=1, cores=2)


def test_unactionable_library_warnings_are_not_shown():
    """The notices a user can do nothing about are filtered once the console is tidied; others still show."""
    import warnings

    from vlm.console import tidy_console

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tidy_console()
        warnings.warn("You have overridden `on_before_batch_transfer` in `LightningModule` but have passed in a "
                      "`LightningDataModule`. It will use the implementation from `LightningModule` instance.")
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, TreeSpec)`")
        warnings.warn("a warning the user can act on")
    assert [str(w.message) for w in caught] == ["a warning the user can act on"]
