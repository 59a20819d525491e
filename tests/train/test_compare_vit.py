"""``gmlp compare-vit``: gMLP vs a parameter-matched timm ViT, same recipe; results table and plots."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gmlp.cli import main
from gmlp.train.compare import size_vit


def test_vit_is_sized_to_the_gmlp_parameter_count() -> None:
    kwargs, params = size_vit(617_000, img_size=(28, 28), patch_size=4, in_chans=1, num_classes=10, depth=6)
    assert kwargs["embed_dim"] % 4 == 0 and kwargs["depth"] == 6 and kwargs["patch_size"] == 4
    assert 3.5 < kwargs["mlp_ratio"] < 4.5
    assert abs(params - 617_000) / 617_000 < 0.005


def test_compare_on_digits_writes_a_results_table(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "cmp"
    assert (
        main(
            [
                "compare-vit",
                "-o",
                str(out),
                "--dataset",
                "digits",
                "--model",
                "gmlp_micro4_28",
                "--epochs",
                "1",
                "--batch-size",
                "64",
                "--train-subset",
                "256",
                "--test-subset",
                "64",
                "--threads",
                "1",
                "--seed",
                "3",
                "--no-progress",
            ]
        )
        == 0
    )
    text = (out / "results.md").read_text()
    assert "seed 3" in text.splitlines()[0]
    assert all(json.loads((out / run / "config.json").read_text())["seed"] == 3 for run in ("gmlp", "vit"))
    rows = [line for line in text.splitlines() if line.startswith("| gMLP") or line.startswith("| ViT")]
    assert len(rows) == 2, text
    params = [int(row.split("|")[3].replace(",", "")) for row in rows]
    assert abs(params[0] - params[1]) / params[0] < 0.01
    assert (out / "spatial_weights.png").stat().st_size > 0
    assert (out / "gmlp" / "metrics.png").is_file() and (out / "vit" / "metrics.png").is_file()
    assert "test acc (final)" in capsys.readouterr().out
