"""Plots of spatial weights and metrics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gmlp import create_model, save_model
from gmlp.cli import main
from gmlp.utils.io import CheckpointError, save_state_dict_file
from gmlp.viz import plot_metrics, plot_spatial, spatial_locality, spatial_weights


def _is_png(path: Path) -> bool:
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_vision_checkpoint_plots_and_weights_round_trip(tmp_path: Path) -> None:
    model = create_model("gmlp_micro4_28")
    for block in model.blocks:
        torch.nn.init.normal_(block.sgu.proj.weight)
    save_model(model, tmp_path / "model.safetensors")
    weights = spatial_weights(tmp_path / "model.safetensors")
    assert list(weights) == [0, 1, 2, 3]
    assert torch.equal(weights[2], model.blocks[2].sgu.proj.weight.detach())
    assert (
        main(
            [
                "plot-spatial",
                str(tmp_path / "model.safetensors"),
                "-o",
                str(tmp_path / "w.png"),
                "--layers",
                "0,3",
                "--rows",
                "3",
            ]
        )
        == 0
    )
    assert _is_png(tmp_path / "w.png")


def test_toeplitz_weights_are_expanded_for_text_plots(tmp_path: Path) -> None:
    n = 5
    w = torch.arange(2 * n - 1, dtype=torch.float32)
    save_state_dict_file(
        {"gmlp.blocks.0.sgu.proj.weight": w, "gmlp.blocks.0.sgu.proj.bias": torch.ones(n)},
        tmp_path / "model.safetensors",
    )
    (tmp_path / "config.json").write_text("{}")
    dense = spatial_weights(tmp_path)[0]
    i, j = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    assert torch.equal(dense, (i - j + n - 1).float())
    out = plot_spatial(tmp_path, tmp_path / "t.png")
    assert _is_png(out)


def test_checkpoint_without_spatial_weights_is_refused(tmp_path: Path) -> None:
    save_state_dict_file({"fc.weight": torch.ones(2, 2)}, tmp_path / "m.safetensors")
    with pytest.raises(CheckpointError, match="no spatial gating weights"):
        spatial_weights(tmp_path / "m.safetensors")


def test_unknown_layer_is_named(tmp_path: Path) -> None:
    save_model(create_model("gmlp_micro4_28"), tmp_path / "m.safetensors")
    with pytest.raises(ValueError, match=r"layers \[9\] not in the checkpoint"):
        plot_spatial(tmp_path / "m.safetensors", tmp_path / "x.png", layers=[9])


def test_plot_metrics(tmp_path: Path) -> None:
    lines = [
        {"epoch": e, "step": 10 * e, "train_loss": 1.0 / e, "test_accuracy": 0.5 + e / 10} for e in (1, 2, 3)
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert _is_png(plot_metrics(tmp_path / "metrics.jsonl", tmp_path / "m.png"))


def test_spatial_locality_by_hand(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Identity W: distance 0; uniform W: the uniform reference; nearest-neighbour W: exactly 1."""
    model = create_model("gmlp_micro4_28")  # 7 x 7 grid, 4 blocks
    n, side = 49, 7
    pos = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij"), -1).reshape(n, 2)
    manhattan = (pos[:, None] - pos[None]).abs().sum(-1)
    with torch.no_grad():
        model.blocks[0].sgu.proj.weight.copy_(torch.eye(n))
        model.blocks[1].sgu.proj.weight.fill_(-0.5)
        model.blocks[2].sgu.proj.weight.copy_((manhattan == 1).float() * torch.randn(n, n).abs().add(0.1))
    save_model(model, tmp_path / "model.safetensors")
    distance, uniform = spatial_locality(tmp_path / "model.safetensors")
    cells = pos.double()
    expected_uniform = torch.cdist(cells, cells).mean().item()  # mean distance of two random cells
    assert uniform == pytest.approx(expected_uniform) and 3.5 < uniform < 3.7
    assert distance[0] == pytest.approx(0.0)
    assert distance[1] == pytest.approx(uniform)
    assert distance[2] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="h \\* w = 49"):
        spatial_locality(tmp_path / "model.safetensors", grid=(5, 5))
    assert main(["plot-spatial", str(tmp_path / "model.safetensors"), "-o", str(tmp_path / "w.png")]) == 0
    assert "0: 0.00" in capsys.readouterr().out
