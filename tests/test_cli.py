"""One command-line style (vlm/cli.py): every `python -m vlm....` tool takes `key=value` words, refuses what it does
not know with its usage line before doing anything, and `vlm.summary` reads the configs shipped in the package."""
from __future__ import annotations

from pathlib import Path

import pytest

from vlm.cli import REQUIRED, parse_options, usage_line

SPEC = {"out": REQUIRED, "num_train": 20, "quiet": False, "prefix": "train", "column": None}


def test_key_value_words_become_typed_options_over_the_defaults() -> None:
    options = parse_options(["out=2024", "num_train=24", "quiet=true"], "vlm.tool", SPEC)
    # a path YAML would read as a number stays as typed; numbers and flags get their types
    assert options == {"out": "2024", "num_train": 24, "quiet": True, "prefix": "train", "column": None}
    assert usage_line("vlm.tool", SPEC) == ("usage: python -m vlm.tool out=OUT [num_train=20] [quiet=false] "
                                            "[prefix=train] [column=null]")


@pytest.mark.parametrize(("argv", "message"), [
    (["--out", "x"], "not key=value: '--out'"),
    (["out=x", "num_trian=3"], "unknown key 'num_trian'"),
    (["num_train=3"], "out= is required"),
    (["out=x", "num_train=many"], "num_train= takes a whole number, not 'many'"),
    (["out=x", "quiet=yes please"], "quiet= takes true or false"),
    (["out=[a,b]"], "out= takes one value"),
])
def test_bad_words_stop_the_tool_with_its_usage(argv: list[str], message: str) -> None:
    with pytest.raises(SystemExit) as stopped:
        parse_options(argv, "vlm.tool", SPEC)
    assert message in str(stopped.value) and str(stopped.value).startswith("usage: python -m vlm.tool out=OUT")


def test_help_prints_the_usage(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stopped:
        parse_options(["--help"], "vlm.tool", SPEC)
    assert stopped.value.code == 0 and capsys.readouterr().out.startswith("usage: python -m vlm.tool")


def test_each_tool_refuses_the_old_argparse_style_before_any_work(tmp_path: Path) -> None:
    from vlm.data.convert.__main__ import main as convert_main
    from vlm.data.synthetic.shapes import main as shapes_main
    from vlm.model_from_checkpoint import main as checkpoint_main

    for main, argv in ((convert_main, ["images", "--images", str(tmp_path), "--out", str(tmp_path / "o")]),
                       (shapes_main, ["--root", str(tmp_path / "s")]),
                       (checkpoint_main, [str(tmp_path / "x.ckpt"), "--out", str(tmp_path / "m")])):
        with pytest.raises(SystemExit, match="not key=value"):
            main(argv)
    with pytest.raises(SystemExit, match="unknown command 'image'"):
        convert_main(["image", f"images={tmp_path}"])
    with pytest.raises(SystemExit, match="source= is trl or rlaif-v"):
        convert_main(["preference", "source=dpo", "input=x.jsonl", f"out={tmp_path / 'p'}"])
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing was written


def test_summary_takes_json_as_a_key_and_reads_the_packaged_configs(capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from vlm.summary import CONF_DIR, main

    assert CONF_DIR == Path(__file__).resolve().parents[1] / "vlm" / "conf"
    assert (CONF_DIR / "summary.yaml").is_file() and (CONF_DIR / "debug" / "tiny.yaml").is_file()
    main(["model=tiny", "json=true"])
    assert json.loads(capsys.readouterr().out)["total"] > 0
    with pytest.raises(SystemExit, match="json= takes true or false"):
        main(["model=tiny", "json=yes"])
