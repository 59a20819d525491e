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
    # the ViT run exports with the sizes read from its own weights (it needed --img-size, --in-chans and
    # --num-classes before: a timm model's checkpoint shapes were not read)
    onnx = tmp_path / "vit.onnx"
    assert main(["export", str(out / "vit"), "-o", str(onnx)]) == 0 and onnx.stat().st_size > 0


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
    assert calls[-1] == (True, False)  # (train_vision refuses resume with overwrite)
    compare._train(dataclasses.replace(config, seed=config.seed + 1))  # another comparison's run
    assert calls[-1] == (False, True)


def test_comparison_resumes_when_only_run_free_settings_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """An interrupted comparison rerun with another --threads or --no-progress (settings that do not change
    what a run computes; ``gmlp train --resume`` accepts them) threw both runs away and started afresh."""
    from gmlp.train import compare
    from gmlp.train.vision import VisionTrainConfig

    config = VisionTrainConfig(output=str(tmp_path / "gmlp"), threads=1, progress=True)
    checkpoint = types.SimpleNamespace(state={"config": json.loads(json.dumps(dataclasses.asdict(config)))})
    calls: list[bool] = []
    monkeypatch.setattr(compare, "latest_checkpoint", lambda out: Path(out) / "checkpoints" / "step-1")
    monkeypatch.setattr(compare, "load_checkpoint", lambda out: checkpoint)
    monkeypatch.setattr(compare, "train_vision", lambda cfg, resume: calls.append(resume))
    compare._train(dataclasses.replace(config, threads=2, progress=False, workers=0))
    assert calls[-1] is True
    assert "afresh" not in capsys.readouterr().out
    compare._train(dataclasses.replace(config, threads=2, epochs=config.epochs + 1))
    assert calls[-1] is False
    assert f"epochs: {config.epochs} -> {config.epochs + 1}); starting it afresh" in capsys.readouterr().out


def test_a_gmlp_only_drop_path_schedule_is_refused_before_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """timm's ViT takes no drop_path_schedule: with 'linear' the comparison trained the gMLP to the end and
    then failed to build the ViT (TypeError)."""
    from gmlp.train import compare
    from gmlp.train.recipe import ConfigError

    monkeypatch.setattr(compare, "train_vision", lambda cfg, resume: pytest.fail("trained"))
    monkeypatch.setattr(compare, "load_data", lambda cfg: pytest.fail("loaded the data"))
    recipe = tmp_path / "r.yaml"
    recipe.write_text("drop_path_schedule: linear\ndrop_path_rate: 0.1\n")
    with pytest.raises(ConfigError, match="drop_path_schedule 'linear' is a gMLP setting"):
        compare.run_comparison(tmp_path / "cmp", config=recipe, dataset="digits")
