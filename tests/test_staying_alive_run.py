"""Staying alive, the run around the data (issue 17): one run per run directory, config type errors before any
model is built, our own message for a corrupt checkpoint, evaluation files checked line by line (and a missing image
costs no score), and the chat refusing a decompression bomb. (SIGTERM: tests/test_resume.py; divergence:
tests/test_guards.py; data faults: tests/test_staying_alive_data.py.)"""
from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from vlm.run_lock import RunDirLock, RunDirLocked

sys.path.insert(0, str(Path(__file__).resolve().parent / "scripts"))
sys.path.insert(0, str(Path(__file__).resolve().parent))


CONF = str(Path(__file__).resolve().parents[1] / "conf")


# ---- one run per run directory -------------------------------------------------------------------------------------
def test_a_second_run_in_a_locked_run_dir_fails_at_once_naming_the_holder(tmp_path: Path, monkeypatch) -> None:
    from resume_run import compose_config

    import vlm.loading
    from vlm.run import run_stage

    monkeypatch.setattr(vlm.loading, "load_model", lambda *a, **k: pytest.fail("built a model in a locked run_dir"))
    run_dir = tmp_path / "run"
    with RunDirLock(run_dir):
        message = f"pid {os.getpid()} on host {socket.gethostname()}"
        with pytest.raises(RunDirLocked, match=f"run_dir {run_dir} is in use by another run \\({message}"):
            RunDirLock(run_dir).acquire()
        with pytest.raises(RunDirLocked, match=message):
            run_stage(compose_config(tmp_path, ["stage=align", f"run_dir={run_dir}"]))
        assert not (run_dir / "config.yaml").exists()  # nothing of the holder's was touched
    RunDirLock(run_dir).acquire()  # released at the end of the block: free again


def test_a_stale_lock_is_taken_over_with_a_warning(tmp_path: Path, vlm_warnings) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / ".lock").write_text("pid 4194000\nhost crashed-node\nsince 2026-01-01 00:00:00\n")  # a dead holder
    with RunDirLock(run_dir) as lock:
        assert f"pid {os.getpid()}" in lock.path.read_text()
    assert "taking over the lock left by pid 4194000 on host crashed-node" in vlm_warnings.text
    assert (run_dir / ".lock").read_text() == ""  # a clean end leaves no holder behind


# ---- config type errors --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("override, key", [("trainer.max_steps=abc", "trainer.max_steps"),
                                           ("optim.lr=fast", "optim.lr"), ("data.batch_size=big", "data.batch_size"),
                                           ("guards.max_consecutive_skips=many", "guards.max_consecutive_skips")])
def test_a_wrong_typed_override_is_an_error_naming_the_key_before_any_model(tmp_path: Path, monkeypatch,
                                                                            override: str, key: str) -> None:
    from resume_run import compose_config

    import vlm.loading
    from vlm.config_check import ConfigTypeError
    from vlm.run import run_stage

    monkeypatch.setattr(vlm.loading, "load_model", lambda *a, **k: pytest.fail("built a model first"))
    cfg = compose_config(tmp_path, ["stage=sft", f"run_dir={tmp_path / 'run'}", override])
    with pytest.raises(ConfigTypeError, match=f"^{key}="):
        run_stage(cfg)


# ---- a corrupt checkpoint ------------------------------------------------------------------------------------------
def test_a_corrupt_checkpoint_gets_our_message(tmp_path: Path) -> None:
    from vlm.checkpointing import AtomicCheckpointIO, CorruptCheckpoint, load_trainable_weights

    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": {"w": torch.ones(100)}}, good)
    cut = tmp_path / "step-00000002.ckpt"
    cut.write_bytes(good.read_bytes()[:300])
    alien = tmp_path / "alien.ckpt"
    torch.save({"state_dict": {}, "thing": socket.gethostname}, alien)  # a pickled function: not weights-only
    for path in (cut, alien):
        for load in (AtomicCheckpointIO().load_checkpoint, load_trainable_weights):
            with pytest.raises(CorruptCheckpoint, match=f"checkpoint {path} cannot be read") as info:
                load(path)
            assert "weights_only=False" not in str(info.value) and info.value.__cause__ is None


# ---- evaluation files ----------------------------------------------------------------------------------------------
def _evaluate(tmp_path: Path, task: str, rows: list, raw: bytes | None = None) -> tuple[dict, Path]:
    from hydra import compose, initialize_config_dir

    from vlm.run import run_evaluation

    preds = tmp_path / "preds.jsonl"
    preds.write_bytes(raw if raw is not None else "".join(json.dumps(r) + "\n" for r in rows).encode())
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("evaluate", overrides=[f"task={task}", f"predictions={preds}", f"run_dir={tmp_path / 'eval'}",
                                             f"paths.data_dir={tmp_path}"])
    return run_evaluation(cfg), tmp_path / "eval"


def test_a_missing_image_costs_no_score_only_a_gap_in_the_picture(tmp_path: Path) -> None:
    Image.new("RGB", (16, 16), (250, 10, 200)).save(tmp_path / "there.png")
    rows = [{"id": "a", "question": "?", "prediction": "2", "answers": ["2"], "image": "there.png"},
            {"id": "b", "question": "?", "prediction": "3", "answers": ["2"], "image": "gone.png"}]
    metrics, out = _evaluate(tmp_path, "vqa", rows)
    assert metrics["vqa/accuracy"] == pytest.approx(0.5)
    assert json.loads((out / "metrics.json").read_text())["vqa/accuracy"] == pytest.approx(0.5)
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 2 and (out / "predictions.png").is_file()


GOOD = {"id": "a", "question": "?", "prediction": "2", "answers": ["2"]}


@pytest.mark.parametrize("lines, message", [
    ([json.dumps(GOOD).encode(), b'{"id": "b", "prediction": "caf\xe9", "answers": ["x"]}'],
     r"preds.jsonl:2: not UTF-8 text"),
    ([json.dumps(GOOD).encode(), b"[1, 2]"], r"preds.jsonl:2: not a JSON object \(a list\)"),
    ([json.dumps({**GOOD, "answers": 3}).encode()], r"preds.jsonl:1: item 'a': the reference answers must be a "
                                                    r"string or a list, not int"),
    ([json.dumps({**GOOD, "prediction": None}).encode()], r"preds.jsonl:1: row 'a' has no `prediction`"),
    ([json.dumps(GOOD).encode(), b"", json.dumps(GOOD).encode()], r"preds.jsonl:3: duplicate id 'a' \(first at "
                                                                  r"line 1\)"),
])
def test_prediction_files_are_checked_line_by_line(tmp_path: Path, lines: list[bytes], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _evaluate(tmp_path, "vqa", [], raw=b"\n".join(lines) + b"\n")


@pytest.mark.parametrize("row, message", [
    ({"options": "ABCD", "answer": "A"}, r"preds.jsonl:1: `options` must be a list"),
    ({"options": ["x", "y"], "answer": "A", "option_scores": [float("nan"), 1.0]},
     r"preds.jsonl:1: `option_scores` holds NaN"),
    ({"options": ["x", "y"], "answer": "A", "option_scores": [1.0]}, r"`option_scores` must be a list of 2 numbers"),
])
def test_malformed_mcq_options_are_errors(tmp_path: Path, row: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _evaluate(tmp_path, "mcq", [{"id": "q", "question": "?", "prediction": "A", **row}])


# ---- the chat ------------------------------------------------------------------------------------------------------
def test_the_chat_refuses_a_decompression_bomb_and_goes_on(tmp_path: Path, monkeypatch, tiny_shapes: Path) -> None:
    from test_generation import tiny_vlm

    from vlm.chat import main

    model, tokenizer = tiny_vlm(tiny_shapes / "tokenizer")
    model_dir = model.save_pretrained(tmp_path / "model", tokenizer)
    Image.new("RGB", (64, 64), (30, 70, 220)).save(tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 64 x 64 is more than twice that: a bomb to Pillow
    lines = iter([f"/image {tmp_path / 'bomb.png'}", "hello", "/quit"])
    out: list[str] = []
    main([f"model_dir={model_dir}", "max_new_tokens=2"], read=lambda _: next(lines), write=out.append)
    assert any("cannot open" in o and "decompression bomb" in o.lower() for o in out), out
    assert sum(o.startswith("model> ") for o in out) == 1  # and the session went on
