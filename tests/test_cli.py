"""The ``gmlp`` command line: every bad input is a one-line usage error, contradictory flags are refused,
and ``gmlp eval`` scores a run as its training did (eighteenth session: each test failed before its fix)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from gmlp.cli import main


def _usage_error(argv: list[str], capsys: pytest.CaptureFixture, message: str) -> None:
    """``gmlp ARGV`` exits with status 2 and one ``gmlp COMMAND: error: ...`` line holding ``message``."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"gmlp {argv[0]}: error: ") and "\n" not in err, err
    assert message in err, err


def _argparse_error(argv: list[str], capsys: pytest.CaptureFixture, message: str) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_no_subcommand_prints_the_help(capsys: pytest.CaptureFixture) -> None:
    assert main([]) == 2
    err = capsys.readouterr().err
    assert "usage: gmlp" in err and "compare-vit" in err and "finetune" in err


def test_missing_inputs_are_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from gmlp.train.vision_tools import evaluate_checkpoint

    nope = str(tmp_path / "nope")
    _usage_error(["eval", nope], capsys, f"checkpoint not found: {nope!r}")
    _usage_error(["export", nope], capsys, f"checkpoint not found: {nope!r}")
    _usage_error(["plot-spatial", nope], capsys, f"checkpoint not found: {nope!r}")
    _usage_error(["plot-metrics", nope], capsys, f"metrics not found: {nope!r}")
    _usage_error(["eval", str(tmp_path)], capsys, "holds neither model.safetensors nor checkpoints/")
    _usage_error(["eval", str(tmp_path), "--ema"], capsys, "holds no model_ema.safetensors")
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):  # still a FileNotFoundError
        evaluate_checkpoint(nope)


def test_eval_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"")  # never read: each error comes before the weights are loaded
    _usage_error(["eval", str(weights)], capsys, "is not a training run: pass --model NAME")
    _usage_error(["eval", str(weights), "--ema"], capsys, "--ema needs a run directory")
    model = ["--model", "gmlp_micro4_28"]
    _usage_error(["eval", str(weights), *model, "--dataset", "mnist"], capsys, "unknown dataset 'mnist'")
    _usage_error(["eval", str(weights), *model, "--dataset", "imagefolder"], capsys, "needs --data-root")
    _argparse_error(["eval", str(weights), *model, "--img-size", "0"], capsys, "--img-size: must be >= 1")
    if not torch.cuda.is_available():
        _usage_error(["eval", str(weights), *model, "--device", "cuda"], capsys, "--device cuda")


def test_info_usage_errors(capsys: pytest.CaptureFixture) -> None:
    _usage_error(["info", "gmlp_nope"], capsys, "unknown model 'gmlp_nope'")
    _usage_error(["info", "timm:nope_vit"], capsys, "unknown timm model 'nope_vit'")
    _usage_error(["info", "gmlp_micro4_28", "--img-size", "-1"], capsys, "img_size must be >= 1, got -1")
    _usage_error(["info", "gmlp_micro4_28", "--in-chans", "0"], capsys, "in_chans must be >= 1, got 0")
    _usage_error(["info", "gmlp_micro4_28", "--num-classes", "-1"], capsys, "num_classes must be >= 0")
    if not torch.cuda.is_available():
        _usage_error(["info", "gmlp_micro4_28", "--throughput", "--device", "cuda"], capsys, "--device cuda")


def test_train_refuses_resume_with_overwrite(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """train_vision resumes and ignores overwrite when given both: the command line refuses the pair."""
    from gmlp.train import vision

    calls: list[tuple[Any, bool]] = []
    monkeypatch.setattr(vision, "train_vision", lambda cfg, resume: calls.append((cfg, resume)) or {})
    out = ["--output", str(tmp_path)]
    _usage_error(["train", *out, "--resume", "--overwrite"], capsys, "--resume")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("overwrite: true\n")
    _usage_error(["train", *out, "--config", str(recipe), "--resume"], capsys, "--overwrite")
    assert calls == []
    assert main(["train", *out, "--config", str(recipe), "--resume", "--no-overwrite"]) == 0
    assert calls[-1][1] is True and calls[-1][0].overwrite is False


def test_a_resume_with_other_settings_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A resume refused because the run was made with other settings is a one-line usage error (it was a
    ValueError traceback with exit status 1)."""
    run = ["train", "--dataset", "digits", "--model", "gmlp_micro4_28", "--output", str(tmp_path / "r"),
           "--no-augment", "--no-progress", "--no-tensorboard", "--no-plot", "--threads", "1"]
    assert main([*run, "--max-steps", "1"]) == 0
    capsys.readouterr()
    message = "it was made with different settings seed=0 (now 1)"
    _usage_error([*run, "--resume", "--seed", "1"], capsys, message)


def test_an_unreachable_hub_source_is_a_usage_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """A hub dataset that cannot be reached (offline, as datasets reports it) is one line that says what to
    do, not a ConnectionError traceback."""
    import datasets

    def offline(*args: object, **kwargs: object) -> None:
        raise ConnectionError("Couldn't reach 'food101' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "get_dataset_split_names", offline)
    monkeypatch.setattr(datasets, "load_dataset", offline)
    argv = ["train", "--dataset", "hf", "--data-root", "food101", "--output", str(tmp_path / "r")]
    _usage_error(argv, capsys, "Couldn't reach 'food101' on the Hub (OfflineModeIsEnabled) (this data source "
                 "needs the Hugging Face Hub: give a local folder or file instead, or go online)")
    # an OS-level connection error (errno set: a broken pipe, a reset socket) is no hub source: raised as is
    from gmlp.cli import vision as vision_cli

    def broken_pipe(args: object) -> int:
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(vision_cli, "_info", broken_pipe)
    with pytest.raises(BrokenPipeError):
        main(["info", "gmlp_nano4_28"])


def test_print_config_refuses_settings_the_run_refuses(capsys: pytest.CaptureFixture) -> None:
    _usage_error(["train", "--epochs", "0", "--print-config"], capsys, "epochs must be >= 1, got 0")
    _usage_error(["train", "--dataset", "imagefolder", "--print-config"], capsys, "needs data_root")


@pytest.mark.parametrize("command", ["pretrain", "finetune"])
def test_text_commands_refuse_resume_with_overwrite(
    command: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """A resumed text run ignores --overwrite (it only applies to a new run): the pair is refused."""
    from gmlp.train import text

    def fail(cfg: Any) -> None:
        raise AssertionError(f"{command} ran with resume={cfg.resume}, overwrite={cfg.overwrite}")

    monkeypatch.setattr(text, command, fail)
    _argparse_error([command, "--resume", "--overwrite"], capsys, "not allowed with argument")


def test_compare_vit_sizes(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """--vit-depth 0 used to fall back to the gMLP's depth silently; --vit-heads 0 crashed deep inside."""
    from gmlp.train import compare

    seen: dict[str, Any] = {}
    monkeypatch.setattr(compare, "run_comparison", lambda output, **kw: seen.update(kw, output=output) or "t")
    _argparse_error(["compare-vit", "--vit-depth", "0"], capsys, "--vit-depth: must be >= 1, got 0")
    _argparse_error(["compare-vit", "--vit-heads", "0"], capsys, "--vit-heads: must be >= 1, got 0")
    _argparse_error(["compare-vit", "--vit-heads", "x"], capsys, "--vit-heads: expected an int >= 1")
    argv = ["compare-vit", "-o", "o", "--vit-depth", "3", "--vit-heads", "2", "--epochs", "1", "--seed", "5",
            "--batch-size", "16", "--threads", "1", "--train-subset", "7", "--test-subset", "8",
            "--no-progress", "--dataset", "digits", "--model", "gmlp_micro4_28", "--config", "c.yaml"]
    assert main(argv) == 0
    assert seen == {"output": "o", "config": "c.yaml", "dataset": "digits", "epochs": 1,
                    "gmlp_model": "gmlp_micro4_28", "vit_depth": 3, "vit_heads": 2, "train_subset": 7,
                    "test_subset": 8, "threads": 1, "progress": False, "batch_size": 16, "seed": 5}


def test_export_sizes_must_be_positive(capsys: pytest.CaptureFixture) -> None:
    """export_checkpoint reads --in-chans 0 / --num-classes 0 as "not given" and exported the checkpoint's."""
    for flag in ("--in-chans", "--num-classes", "--img-size", "--opset"):
        _argparse_error(["export", "x", flag, "0"], capsys, f"{flag}: must be >= 1, got 0")


def test_plot_spatial_rows_and_layers(capsys: pytest.CaptureFixture) -> None:
    _argparse_error(["plot-spatial", "x", "--rows", "0"], capsys, "--rows: must be >= 1, got 0")
    _argparse_error(["plot-spatial", "x", "--layers", ","], capsys, "block indices >= 0")
    _argparse_error(["plot-spatial", "x", "--layers", "0,-1"], capsys, "block indices >= 0")


def test_eval_scores_a_pil_pipeline_run_as_its_training_did(tmp_path: Path) -> None:
    """A digits run trained with --auto-augment is evaluated through timm's eval transforms (crop_pct
    0.875 here: resize 8 -> 9, centre crop 8); gmlp eval used the raw tensors and reported other numbers."""
    from gmlp.train.vision import VisionTrainConfig, train_vision
    from gmlp.train.vision_tools import evaluate_checkpoint

    out = tmp_path / "run"
    config = VisionTrainConfig(
        model="gmlp_ti16_224", model_kwargs={"patch_size": 2, "depth": 1, "embed_dim": 16}, dataset="digits",
        auto_augment="rand-m7-mstd0.5", epochs=1, train_subset=128, batch_size=64, warmup_steps=1, workers=0,
        output=str(out), progress=False, plot=False, tensorboard=False, lr=0.05,
    )
    train_vision(config)
    last = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    result = evaluate_checkpoint(out, workers=0)
    assert result["count"] == 297
    assert result["top1"] == pytest.approx(last["test_accuracy"])
    assert result["loss"] == pytest.approx(last["test_loss"], rel=1e-5)


_ROOT = Path(__file__).resolve().parents[1]


def _documented_commands() -> list[tuple[str, list[str]]]:
    """Every ``gmlp ...`` command line in the bash blocks of README.md and docs/*.md (``.venv/bin/gmlp``,
    ``torchrun ... -m gmlp`` and ``accelerate launch ... -m gmlp`` too), as ``(file, argv)``; a trailing
    ``...`` (more flags of the reader's choice) is dropped."""
    import re
    import shlex

    commands = []
    for doc in [_ROOT / "README.md", *sorted((_ROOT / "docs").glob("*.md"))]:
        for block in re.findall(r"```bash\n(.*?)```", doc.read_text(), re.S):
            for line in block.replace("\\\n", " ").splitlines():
                match = re.match(r"\s*(?:\S*/)?gmlp\s+(.*)", line) or re.search(r"\s-m gmlp\s+(.*)", line)
                if match:
                    argv = shlex.split(match.group(1), comments=True)
                    commands.append((doc.name, argv[: argv.index("...")] if "..." in argv else argv))
    return commands


def test_documented_commands_parse(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """The flags of every documented command exist with the documented spelling, and each documented ``gmlp
    train`` command (its recipe file included) resolves to settings that --print-config accepts."""
    from gmlp.cli import build_parser

    commands = _documented_commands()
    assert len(commands) >= 50, commands  # the README alone documents more than 30
    parser = build_parser()
    monkeypatch.chdir(_ROOT)  # the documented recipe paths are relative to the repository
    for doc, argv in commands:
        try:
            parser.parse_args(argv)
        except SystemExit:
            pytest.fail(f"{doc}: `gmlp {' '.join(argv)}` does not parse: {capsys.readouterr().err}")
        if argv[0] == "train":
            status = main([*argv, "--print-config"])
            assert status == 0, f"{doc}: `gmlp {' '.join(argv)}`: {capsys.readouterr().err}"


def test_plot_commands_report_bad_inputs_as_usage_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Each of these ended in a traceback (a ValueError, a CheckpointError, a JSONDecodeError) instead of a
    one-line ``gmlp COMMAND: error: ...`` with exit status 2."""
    from gmlp.utils.io import save_state_dict_file

    weights = tmp_path / "m.safetensors"
    save_state_dict_file({f"blocks.{b}.sgu.proj.weight": torch.randn(4, 4) for b in range(2)}, weights)
    _usage_error(["plot-spatial", str(weights), "--layers", "5"], capsys, "layers [5] not in the checkpoint")
    _usage_error(["plot-spatial", str(weights), "-o", str(tmp_path / "w.v2")], capsys, "not an image format")
    _usage_error(["plot-spatial", str(weights), "-o", str(tmp_path)], capsys, "is a directory")
    save_state_dict_file({"fc.weight": torch.ones(2, 2)}, tmp_path / "fc.safetensors")
    _usage_error(["plot-spatial", str(tmp_path / "fc.safetensors")], capsys, "holds no spatial gating")
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("")
    _usage_error(["plot-metrics", str(metrics)], capsys, "holds no records")
    metrics.write_text('{"epoch": 1, "note": "no numbers"}\n')
    _usage_error(["plot-metrics", str(metrics)], capsys, "holds no numeric metrics")
    assert not list(tmp_path.glob("*.png"))


def test_unreadable_checkpoints_are_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A truncated or corrupt checkpoint (gmlp.CheckpointError) is reported as such by every command that
    reads one; it was a traceback."""
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    model = ["--model", "gmlp_micro4_28"]
    for argv in (["plot-spatial", str(bad)], ["export", str(bad), *model, "-o", str(tmp_path / "m.onnx")],
                 ["eval", str(bad), *model, "--dataset", "digits", "--workers", "0"]):
        _usage_error(argv, capsys, f"cannot read safetensors checkpoint {str(bad)!r}")
    assert not (tmp_path / "m.onnx").exists()


def test_export_reports_bad_arguments_as_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Unknown models, model arguments the model refuses, a head that does not fit and an output folder were
    tracebacks (ValueError, RuntimeError, TypeError, IsADirectoryError); a --model-kwargs that does not fit
    the weights, too (CheckpointError). Each is caught before anything is written."""
    from gmlp import create_model, save_model

    weights = tmp_path / "m.safetensors"
    save_model(create_model("gmlp_micro4_28", num_classes=5), weights)
    out = ["-o", str(tmp_path / "m.onnx")]
    export = ["export", str(weights), "--model"]
    _usage_error([*export, "gmlp_nope", *out], capsys, "unknown model 'gmlp_nope'; known models: ")
    _usage_error([*export, "timm:nope_vit", *out], capsys, "unknown timm model 'nope_vit'")
    micro = [*export, "gmlp_micro4_28"]
    _usage_error([*micro, "--model-kwargs", "foo=1", *out], capsys, "unexpected argument foo=1")
    _usage_error([*micro, "--model-kwargs", "heads=3", *out], capsys, "heads (3) must be a positive divisor")
    _usage_error([*micro, "--model-kwargs", "depth=3", *out], capsys, "checkpoint does not fit the model")
    _usage_error([*micro, "--num-classes", "10", *out], capsys, "an exported model needs the checkpoint's")
    _usage_error([*micro, "-o", str(tmp_path)], capsys, "is a directory; give an .onnx file name")
    assert not (tmp_path / "m.onnx").exists()


def test_a_run_stopped_at_a_non_finite_loss_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """A training run that stops at a non-finite loss says where in one line with exit status 1 (it was a
    traceback whose last line held the same message)."""
    import gmlp.train.vision as vision

    message = "the training loss or gradient norm was not finite at step 3 (loss nan): the run stops"

    def stopped(config: Any, resume: bool = False) -> dict[str, Any]:
        raise FloatingPointError(message)

    monkeypatch.setattr(vision, "train_vision", stopped)
    assert main(["train", "--dataset", "digits", "--output", str(tmp_path / "r")]) == 1
    assert capsys.readouterr().err.strip() == f"gmlp train: error: {message}"
    argv = ["train", "--dataset", "digits", "--output", str(tmp_path / "r"), "--max-steps", "0"]
    _usage_error(argv, capsys, "max_steps must be >= 1 (None: the whole schedule), got 0")
