"""README's "From the quickstart to your data" runs as printed: its code block is read from the README (so the test
fails when the README drifts) and each line is run as the shell would split it, with 2 steps per stage, a smaller
stand-in data set and a limit on the evaluated questions. The commands run in this process (runpy), in a temporary
working directory, to spare the ~10 s import per command."""
from __future__ import annotations

import json
import re
import runpy
import shlex
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HEADING = "## From the quickstart to your data"


def walkthrough_commands(readme: Path = REPO / "README.md") -> list[list[str]]:
    """The command lines of the first bash block after the heading, split as a shell would."""
    text = readme.read_text()
    assert HEADING in text, f"README has no {HEADING!r} section"
    block = re.search(r"```bash\n(.*?)```", text[text.index(HEADING):], re.S)
    assert block, "the walkthrough has no ```bash block"
    return [shlex.split(line) for line in block.group(1).splitlines() if line.strip()]


def shrink(argv: list[str]) -> list[str]:
    """The same command with tiny sizes: 2 steps, small batches, a small stand-in, few questions."""
    if argv[:3] == ["python", "-m", "vlm.data.synthetic.files"]:
        return [*argv, "num_train=24", "num_test=4"]
    if argv[:2] == ["python", "train.py"]:
        kept = [a for a in argv if not a.startswith("trainer.max_steps=")]
        return [*kept, "trainer.max_steps=2", "data.batch_size=4", "data.num_workers=0", "data.shuffle_buffer=0",
                "hydra/job_logging=disabled", "hydra/hydra_logging=disabled"]
    if argv[:2] == ["python", "evaluate.py"]:
        return [*argv, "task.limit=6", "task.batch_size=6", "hydra/job_logging=disabled",
                "hydra/hydra_logging=disabled"]
    return argv


def run(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """`python -m MODULE ...` or `python SCRIPT.py ...` in this process; a non-zero exit fails."""
    from hydra.core.global_hydra import GlobalHydra

    assert argv[0] == "python", f"not a python command: {argv}"
    GlobalHydra.instance().clear()
    try:
        if argv[1] == "-m":
            monkeypatch.setattr(sys, "argv", [argv[2], *argv[3:]])
            runpy.run_module(argv[2], run_name="__main__", alter_sys=True)
        else:
            monkeypatch.setattr(sys, "argv", argv[1:])
            runpy.run_path(str(REPO / argv[1]), run_name="__main__")
    except SystemExit as done:
        assert done.code in (None, 0), f"{shlex.join(argv)} exited with {done.code}"


@pytest.mark.slow
def test_readme_walkthrough_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    commands = walkthrough_commands()
    steps = [" ".join(c[:3]) for c in commands]
    assert steps[:4] == ["python -m vlm.data.synthetic.files", "python -m vlm.data.convert",
                         "python -m vlm.data.convert", "python -m vlm.data.convert"]
    assert [c[2] for c in commands[5:]] == ["stage=align", "stage=sft", "model_dir=outputs/mine/sft/model"]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("VLM_ROOT", str(tmp_path))  # nothing lands in the checkout
    for argv in commands:
        run(shrink(argv), monkeypatch)
    from vlm.models.vlm import VisionLanguageModel

    model, tokenizer = VisionLanguageModel.from_pretrained(tmp_path / "outputs/mine/sft/model")
    # tiny_tiled (2x2 tiles, 4 decoder layers), kept through init_from although the default model= is tiny (1, 3)
    assert model.config["max_tiles"] == 4 and model.decoder.config.num_hidden_layers == 4
    assert len(tokenizer) == len(VisionLanguageModel.from_pretrained(tmp_path / "outputs/mine/lm/model")[1])
    assert (tmp_path / "my_data/tokenizer/trained_on.json").is_file()
    metrics = json.loads((tmp_path / "outputs/mine/eval/metrics.json").read_text())
    assert metrics["vqa/count"] == 6 and 0.0 <= metrics["vqa/accuracy"] <= 1.0
