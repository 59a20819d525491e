"""``gmlp compare-vit``: gMLP vs a parameter-matched timm ViT, same recipe; results table and plots."""

from __future__ import annotations

import dataclasses
import json
import types
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


def test_comparison_resumes_its_own_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The settings saved in a checkpoint went through JSON (tuples became lists); they still match."""
    from gmlp.train import compare
    from gmlp.train.vision import VisionTrainConfig

    config = VisionTrainConfig(output=str(tmp_path / "gmlp"), mean=(0.5,), std=(0.25,))
    saved = json.loads(json.dumps(dataclasses.asdict(config)))
    calls: list[tuple[bool, bool]] = []
    monkeypatch.setattr(compare, "latest_checkpoint", lambda out: Path(out) / "checkpoints" / "step-1")
    checkpoint = types.SimpleNamespace(state={"config": saved})
    monkeypatch.setattr(compare, "load_checkpoint", lambda out: checkpoint)
    monkeypatch.setattr(compare, "train_vision", lambda cfg, resume: calls.append((resume, cfg.overwrite)))
    compare._train(config)
    assert calls[-1] == (True, True)
    compare._train(dataclasses.replace(config, seed=config.seed + 1))  # another comparison's run
    assert calls[-1] == (False, True)
