"""`python -m vlm.summary`: parameter counts on the meta device, run in-process (no subprocess import cost)."""

from __future__ import annotations

import json

import pytest

from vlm.summary import main


def test_llava_7b_totals_7_06e9(capsys: pytest.CaptureFixture[str]) -> None:
    main(["model=llava_7b", "json=true"])
    counts = json.loads(capsys.readouterr().out)
    assert counts["total"] == pytest.approx(7.06e9, rel=0.01)
    assert counts["total"] == counts["encoder"] + counts["projector"] + counts["decoder"]
    assert counts["encoder"] == pytest.approx(3.04e8, rel=0.01)  # CLIP ViT-L/14 vision tower
    assert counts["projector"] == 1024 * 4096 + 4096 + 4096 * 4096 + 4096  # mlp2x_gelu
    assert counts["tokens_per_image"] == 576  # (336 / 14)^2, CLS dropped
    align = counts["stages"]["align"]
    assert align["params"] == counts["projector"] and align["mb_bf16"] == pytest.approx(counts["projector"] * 2e-6)


def test_table_and_overrides(capsys: pytest.CaptureFixture[str]) -> None:
    summary = main(["model=tiny", "model/projector=pixel_shuffle", "model.encoder.patch_size=4"])
    out = capsys.readouterr().out
    assert summary["tokens_per_image"] == 16  # (32 px / 4 px)^2 patches, merged 2x2
    assert "projector" in out and f"{summary['total']:,}" in out and "align" in out
