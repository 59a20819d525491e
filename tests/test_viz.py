"""Plots of spatial weights and metrics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gmlp import create_model, save_model
from gmlp.cli import main
from gmlp.train.checkpoint import save_checkpoint
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


@pytest.fixture
def drawn(monkeypatch: pytest.MonkeyPatch):
    """The figures the plot functions draw (recorded as ``gmlp.viz._save_figure`` writes them)."""
    from gmlp import viz

    figures: list = []
    real = viz._save_figure

    def recording(fig, output):
        figures.append(fig)
        return real(fig, output)

    monkeypatch.setattr(viz, "_save_figure", recording)
    return figures


def _series(fig) -> dict[str, tuple[list, list]]:
    """``{line label: (xs, ys)}`` of every line of a figure."""
    return {
        line.get_label(): (list(line.get_xdata()), list(line.get_ydata()))
        for ax in fig.axes
        for line in ax.get_lines()
    }


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_plot_metrics_separates_the_splits_of_a_pretrain_run(tmp_path: Path, drawn: list) -> None:
    """As ``gmlp pretrain`` writes: train and validation records share "loss" but are separate lines, and the
    validation-only metrics are drawn too."""
    records = [
        {"loss": 5.0, "lr": 1e-3, "split": "train", "step": 1, "steps_per_s": 3.0},
        {"loss": 4.9, "lr": 9e-4, "split": "train", "step": 2, "steps_per_s": 3.0},
        {"loss": 4.95, "masked_accuracy": 0.2, "perplexity": 141.0, "split": "validation", "step": 2},
        {"loss": 4.8, "lr": 8e-4, "split": "train", "step": 3, "steps_per_s": 3.0},
        {"loss": 4.85, "masked_accuracy": 0.25, "perplexity": 128.0, "split": "validation", "step": 3},
    ]
    _write_jsonl(tmp_path / "metrics.jsonl", records)
    assert main(["plot-metrics", str(tmp_path / "metrics.jsonl"), "-o", str(tmp_path / "m.png")]) == 0
    assert _is_png(tmp_path / "m.png")
    series = _series(drawn[-1])
    assert series["train loss"] == ([1, 2, 3], [5.0, 4.9, 4.8])
    assert series["validation loss"] == ([2, 3], [4.95, 4.85])
    assert series["validation perplexity"] == ([2, 3], [141.0, 128.0])
    assert series["validation masked_accuracy"] == ([2, 3], [0.2, 0.25])
    assert series["train lr"] == ([1, 2, 3], [1e-3, 9e-4, 8e-4])


def test_plot_metrics_draws_finetune_scores_and_epoch_only_splits(tmp_path: Path, drawn: list) -> None:
    """``gmlp finetune``'s validation scores (records with "epoch" and "step") and test scores are drawn; a
    split whose records have no "step" is drawn against "epoch"."""
    records = [
        {"loss": 0.7, "lr": 1e-4, "split": "train", "step": 5},
        {"accuracy": 0.5, "count": 18, "epoch": 1.0, "macro_f1": 0.3, "split": "validation", "step": 5},
        {"loss": 0.6, "lr": 5e-5, "split": "train", "step": 10},
        {"accuracy": 0.75, "count": 18, "epoch": 2.0, "macro_f1": 0.6, "split": "validation", "step": 10},
        {"accuracy": 1.0, "count": 1, "macro_f1": 1.0, "split": "test", "step": 10},
        {"epoch": 1, "loss": 0.65, "split": "extra"},
        {"epoch": 2, "loss": 0.55, "split": "extra"},
    ]
    plot_metrics(_write_jsonl(tmp_path / "metrics.jsonl", records), tmp_path / "m.png")
    series = _series(drawn[-1])
    assert series["validation accuracy"] == ([5, 10], [0.5, 0.75])
    assert series["validation macro_f1"] == ([5, 10], [0.3, 0.6])
    assert series["test accuracy"] == ([10], [1.0])
    assert series["train loss"] == ([5, 10], [0.7, 0.6])
    assert series["extra loss"] == ([1, 2], [0.65, 0.55])
    assert "validation epoch" not in series


def test_plot_metrics_accepts_a_run_folder(tmp_path: Path, drawn: list) -> None:
    """Records without "split" (the vision runs') keep one line per key; a run folder is read through its
    metrics.jsonl; a folder without one gives a clear error."""
    records = [{"epoch": e, "step": 10 * e, "train_loss": 1.0 / e, "test_accuracy": e / 4} for e in (1, 2)]
    _write_jsonl(tmp_path / "metrics.jsonl", records)
    assert _is_png(plot_metrics(tmp_path, tmp_path / "m.png"))
    series = _series(drawn[-1])
    assert series["train_loss"] == ([10, 20], [1.0, 0.5])
    assert series["test_accuracy"] == ([10, 20], [0.25, 0.5])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="folder without a metrics.jsonl"):
        plot_metrics(tmp_path / "empty", tmp_path / "x.png")


@pytest.mark.parametrize("n", [16, 64])
def test_text_checkpoint_with_a_square_length_is_drawn_as_text(
    tmp_path: Path, n: int, drawn: list, capsys: pytest.CaptureFixture
) -> None:
    """A text model's keys ("gmlp.blocks...") decide, not a square token count, even without config.json (a
    bare weights file or a run's checkpoints/step-N folder)."""
    state = {f"gmlp.blocks.{b}.sgu.proj.weight": torch.randn(2 * n - 1) for b in range(2)}
    save_state_dict_file(state, tmp_path / "model.safetensors")
    assert main(["plot-spatial", str(tmp_path / "model.safetensors"), "-o", str(tmp_path / "t.png")]) == 0
    assert "grid distance" not in capsys.readouterr().out
    assert "1-D filters" in drawn[-1]._suptitle.get_text()
    with pytest.raises(ValueError, match="grid must be"):
        spatial_locality(tmp_path / "model.safetensors")
    # the vision layout of the same weights under vision keys is unchanged
    save_state_dict_file(
        {f"blocks.{b}.sgu.proj.weight": torch.randn(n, n) for b in range(2)}, tmp_path / "v.safetensors"
    )
    plot_spatial(tmp_path / "v.safetensors", tmp_path / "v.png")
    assert "patch grid" in drawn[-1]._suptitle.get_text()


def test_causal_text_model_plots_only_the_used_lower_triangle(tmp_path: Path, drawn: list) -> None:
    n = 6
    w = torch.randn(n, n)
    save_state_dict_file({"gmlp.blocks.0.sgu.proj.weight": w}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gmlp", "causal": True}))
    assert torch.equal(spatial_weights(tmp_path)[0], w.tril())
    plot_spatial(tmp_path, tmp_path / "c.png", rows=n)
    series = _series(drawn[-1])
    for i in range(n):
        xs, ys = series[f"row {i}"]
        assert xs == list(range(-i, 1))
        assert torch.allclose(torch.tensor(ys), w[i, : i + 1])
    # not causal: every j is drawn
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gmlp", "causal": False}))
    assert torch.equal(spatial_weights(tmp_path)[0], w)
    plot_spatial(tmp_path, tmp_path / "c.png", rows=n)
    assert _series(drawn[-1])["row 0"][0] == list(range(n))


def test_vision_run_without_final_weights_is_drawn_on_its_patch_grid(tmp_path: Path) -> None:
    """A vision run folder holding only checkpoints (an interrupted or running ``gmlp train``) has a
    ``config.json`` of training settings, which is not a transformers (text) model's config."""
    model = create_model("gmlp_micro4_28")
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"model": "gmlp_micro4_28", "dataset": "fashion_mnist"}))
    save_checkpoint(run, 3, model.state_dict(), {}, {"config": {}})  # checkpoints record no grid_size
    distance, uniform = spatial_locality(run)
    assert list(distance) == [0, 1, 2, 3] and uniform > 0
    assert plot_spatial(run, tmp_path / "w.png", text=False).is_file()


def test_bare_causal_gmlp_model_plots_the_lower_triangle_it_uses(tmp_path: Path) -> None:
    """A bare ``GMLPModel``'s keys have no ``gmlp.`` prefix: its config.json still makes it causal."""
    from gmlp.models.text import GMLPConfig, GMLPModel

    config = GMLPConfig(vocab_size=20, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                        max_position_embeddings=9, causal=True, type_vocab_size=0)
    model = GMLPModel(config)
    with torch.no_grad():
        model.blocks[0].sgu.proj.weight.normal_()
    model.save_pretrained(str(tmp_path))
    w = spatial_weights(tmp_path)[0]
    assert torch.equal(w, model.blocks[0].sgu.proj.matrix().detach())
    assert torch.equal(spatial_weights(tmp_path / "model.safetensors")[0], w)


def test_plot_spatial_names_bad_rows_and_layers(tmp_path: Path) -> None:
    state = {f"blocks.{b}.sgu.proj.weight": torch.randn(4, 4) for b in range(2)}
    save_state_dict_file(state, tmp_path / "m.safetensors")
    for rows in (0, -2):
        with pytest.raises(ValueError, match=f"rows must be an int >= 1, got {rows}"):
            plot_spatial(tmp_path / "m.safetensors", tmp_path / "x.png", rows=rows)
    with pytest.raises(ValueError, match="layers is empty"):
        plot_spatial(tmp_path / "m.safetensors", tmp_path / "x.png", layers=[])


def test_rows_never_repeat_a_token(tmp_path: Path, drawn: list) -> None:
    """A W with fewer output tokens than the default 6 rows draws each token once (it drew duplicates);
    more rows than tokens, asked for, is refused."""
    state = {f"blocks.{b}.sgu.proj.weight": torch.randn(4, 4) for b in range(2)}  # a 2x2 grid
    save_state_dict_file(state, tmp_path / "m.safetensors")
    plot_spatial(tmp_path / "m.safetensors", tmp_path / "x.png")
    assert len(drawn[-1].axes) == 2 * 4  # two layers, each token once
    plot_spatial(tmp_path / "m.safetensors", tmp_path / "x.png", rows=4, text=True)
    assert sorted(k for k in _series(drawn[-1]) if k.startswith("row")) == [f"row {i}" for i in range(4)]
    with pytest.raises(ValueError, match="rows must be <= 4, the output tokens of W; got 5"):
        plot_spatial(tmp_path / "m.safetensors", tmp_path / "x.png", rows=5)


def test_vision_layout_of_a_text_model_says_why(tmp_path: Path) -> None:
    n = 16  # a square token count: the refusal is not about the grid
    state = {"gmlp.blocks.0.sgu.proj.weight": torch.randn(2 * n - 1)}
    save_state_dict_file(state, tmp_path / "t.safetensors")
    with pytest.raises(ValueError, match="the checkpoint is a text model; pass text=True"):
        plot_spatial(tmp_path / "t.safetensors", tmp_path / "x.png", text=False)


def test_plot_metrics_skips_lines_that_are_not_records(tmp_path: Path, drawn: list) -> None:
    """A run killed while appending leaves a cut-short last line (the trainer itself skips such lines on
    resume); plot-metrics raised a JSONDecodeError on it, and an AttributeError on a non-object line."""
    good = [{"epoch": e, "step": 4 * e, "train_loss": 1.0 / e} for e in (1, 2, 3)]
    text = "".join(json.dumps(r) + "\n" for r in good[:2]) + "[1, 2]\n" + json.dumps(good[2]) + "\n"
    (tmp_path / "metrics.jsonl").write_text(text + '{"epoch": 4, "step": 16, "train_lo')
    with pytest.warns(UserWarning, match=r"skipped 2 line\(s\) that are not JSON records \(line 3 first\)"):
        out = plot_metrics(tmp_path, tmp_path / "m.png")
    assert _is_png(out)
    assert _series(drawn[-1])["train_loss"] == ([4, 8, 12], [1.0, 0.5, 1.0 / 3])
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1, "trai\n')
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="holds no records"):
        plot_metrics(tmp_path, tmp_path / "m.png")


def _spatial_checkpoint(path: Path) -> Path:
    save_state_dict_file({f"blocks.{b}.sgu.proj.weight": torch.randn(4, 4) for b in range(2)}, path)
    return path


@pytest.mark.parametrize("kind", ["metrics", "spatial"])
def test_plots_write_the_file_they_name_in_its_format(tmp_path: Path, kind: str) -> None:
    """A name without a suffix gets ``.png`` (matplotlib appends it): the path returned (and printed by the
    command) was the name given, a file that did not exist. A suffix names the format; one that is no image
    format is refused before any work, naming the file."""
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "train_loss": 1.0}) + "\n")
    checkpoint = _spatial_checkpoint(tmp_path / "m.safetensors")

    def plot(output: Path) -> Path:
        if kind == "metrics":
            return plot_metrics(tmp_path / "metrics.jsonl", output)
        return plot_spatial(checkpoint, output)

    assert plot(tmp_path / "curves") == tmp_path / "curves.png" and _is_png(tmp_path / "curves.png")
    assert not (tmp_path / "curves").exists()
    assert plot(tmp_path / "ü" / "曲线.pdf").read_bytes()[:5] == b"%PDF-"
    with pytest.raises(ValueError, match=r"output '.*curves.v2': '.v2' is not an image format; .*\.png"):
        plot(tmp_path / "curves.v2")
    (tmp_path / "folder").mkdir()
    with pytest.raises(ValueError, match="is a directory"):
        plot(tmp_path / "folder")
    written = {p.name for p in tmp_path.iterdir()}
    assert written == {"curves.png", "folder", "metrics.jsonl", "m.safetensors", "ü"}


def test_a_failed_plot_leaves_the_previous_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Plots are written atomically: a plot that fails while being written (disk full, a kill) used to leave
    a truncated file in place of the previous one."""
    from matplotlib.figure import Figure

    (tmp_path / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "train_loss": 1.0}) + "\n")
    checkpoint = _spatial_checkpoint(tmp_path / "m.safetensors")
    real_savefig = Figure.savefig

    def failing_savefig(self: Figure, fname: object, **kwargs: object) -> None:
        real_savefig(self, fname, **kwargs)
        with open(fname, "r+b") as f:  # type: ignore[arg-type]
            f.truncate(10)
        raise OSError("No space left on device")

    for name, plot in (("m.png", lambda out: plot_metrics(tmp_path / "metrics.jsonl", out)),
                       ("w.png", lambda out: plot_spatial(checkpoint, out))):
        previous = plot(tmp_path / name).read_bytes()
        monkeypatch.setattr(Figure, "savefig", failing_savefig)
        with pytest.raises(OSError, match="No space left"):
            plot(tmp_path / name)
        monkeypatch.setattr(Figure, "savefig", real_savefig)
        assert (tmp_path / name).read_bytes() == previous
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left
