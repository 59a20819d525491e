"""``gmlp eval`` (our runs and converted timm checkpoints, timm preprocessing), ``gmlp info`` (parameters,
GMACs, throughput) and ``gmlp export`` (ONNX with a dynamic batch axis, equal to PyTorch)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from gmlp import create_model
from gmlp.cli import main
from gmlp.train.checkpoint import latest_checkpoint
from gmlp.train.vision import VisionTrainConfig, train_vision
from gmlp.train.vision_tools import evaluate_checkpoint, measure_throughput, model_info


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("eval") / "run"
    train_vision(
        VisionTrainConfig(
            model="gmlp_micro4_28",
            dataset="digits",
            batch_size=64,
            epochs=1,
            warmup_steps=2,
            progress=False,
            train_subset=320,
            threads=1,
            ema=True,
            tensorboard=False,
            plot=False,
            output=str(out),
        )
    )
    return out


def test_eval_of_a_run_reproduces_its_test_metrics(
    digits_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    last = json.loads((digits_run / "metrics.jsonl").read_text().splitlines()[-1])
    assert main(["eval", str(digits_run), "--json", str(tmp_path / "r.json")]) == 0
    assert "top-1" in capsys.readouterr().out
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["top1"] == pytest.approx(last["test_accuracy"]) and result["count"] == 297
    assert result["loss"] == pytest.approx(last["test_loss"], rel=1e-5)
    ema = evaluate_checkpoint(digits_run, ema=True)
    assert ema["top1"] == pytest.approx(last["ema_test_accuracy"])
    # a bare weights file needs --model; the shapes (8x8, 1 channel, 10 classes) come from the weights
    bare = evaluate_checkpoint(
        latest_checkpoint(digits_run) / "model.safetensors", model="gmlp_micro4_28", dataset="digits"
    )
    assert bare["top1"] == pytest.approx(last["test_accuracy"])
    with pytest.raises(ValueError, match="pass --model"):
        evaluate_checkpoint(
            _copy(digits_run / "model.safetensors", tmp_path / "w.safetensors"), dataset="digits"
        )


def test_eval_uses_the_runs_precision_unless_told(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A CPU bf16 run was evaluated in fp32 by gmlp eval (its "auto" meant fp32 on a CPU): other numbers
    than the run's own test metrics. Now the run's --precision is the default and --precision overrides it."""
    out = tmp_path / "bf16"
    train_vision(VisionTrainConfig(model="gmlp_micro4_28", dataset="digits", batch_size=64, epochs=1,
                                   warmup_steps=2, progress=False, train_subset=256, threads=1,
                                   precision="bf16", tensorboard=False, plot=False, output=str(out)))
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert main(["eval", str(out), "--workers", "0", "--json", str(tmp_path / "r.json")]) == 0
    assert "297 images, bf16)" in capsys.readouterr().out
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["precision"] == "bf16"
    assert result["top1"] == pytest.approx(last["test_accuracy"])
    assert result["loss"] == pytest.approx(last["test_loss"], rel=1e-5)
    fp32 = evaluate_checkpoint(out, workers=0, precision="fp32")
    assert fp32["precision"] == "fp32" and fp32["loss"] != result["loss"]
    assert evaluate_checkpoint(out, workers=0, precision="auto")["precision"] == "fp32"  # auto: fp32 on a CPU
    with pytest.raises(ValueError, match="precision must be one of auto, fp32, bf16, got 'fp16'"):
        evaluate_checkpoint(out, precision="fp16")
    with pytest.raises(SystemExit):
        main(["eval", str(out), "--precision", "fp16"])
    assert "argument --precision: invalid choice: 'fp16'" in capsys.readouterr().err


def _copy(src: Path, dst: Path) -> Path:
    dst.write_bytes(src.read_bytes())
    return dst


def test_eval_of_a_timm_checkpoint_matches_timm(tmp_path: Path) -> None:
    import timm
    from PIL import Image
    from timm.data import create_transform, resolve_data_config

    rng = np.random.default_rng(0)
    for c in range(3):
        (tmp_path / "data" / "val" / f"k{c}").mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (40, 44, 3), dtype=np.uint8)).save(
                tmp_path / "data" / "val" / f"k{c}" / f"{i}.png"
            )
    torch.manual_seed(0)
    from timm.models.mlp_mixer import GatedMlp, MlpMixer, SpatialGatingBlock

    # timm's gmlp_ti16_224 architecture, 2 blocks deep, for 32 px images and 3 classes
    ref = MlpMixer(
        num_classes=3,
        img_size=32,
        patch_size=16,
        num_blocks=2,
        embed_dim=128,
        mlp_ratio=6,
        block_layer=SpatialGatingBlock,
        mlp_layer=GatedMlp,
    ).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.2)
    torch.save(ref.state_dict(), tmp_path / "timm_gmlp.pth")

    ours = evaluate_checkpoint(
        tmp_path / "timm_gmlp.pth",
        model="gmlp_ti16_224",
        dataset="imagefolder",
        data_root=str(tmp_path / "data"),
        model_kwargs={"depth": 2},
        workers=0,
    )
    cfg = timm.models.get_pretrained_cfg("gmlp_ti16_224").to_dict()  # bicubic, crop 0.875, mean = std = 0.5
    tf = create_transform(**resolve_data_config({"input_size": (3, 32, 32)}, pretrained_cfg=cfg))
    files = sorted((tmp_path / "data" / "val").glob("*/*.png"))
    x = torch.stack([tf(Image.open(f).convert("RGB")) for f in files])
    y = torch.tensor([int(f.parent.name[1:]) for f in files])
    with torch.no_grad():
        logits = ref(x)
    assert ours["count"] == 9
    assert ours["top1"] == pytest.approx((logits.argmax(-1) == y).float().mean().item())
    assert ours["loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, y).item(), rel=1e-4)


def test_info_counts_parameters_and_macs(capsys: pytest.CaptureFixture) -> None:
    info = model_info("gmlp_ti16_224")
    assert info["params"] == 5_867_328
    assert info["gmacs"] == pytest.approx(1.34, rel=0.02)  # paper Table 1 (matmuls and convolutions)
    assert main(["info", "gmlp_micro4_28"]) == 0
    assert "GMACs" in capsys.readouterr().out
    from gmlp import create_model

    assert measure_throughput(create_model("gmlp_micro4_28"), (1, 28, 28), batch_size=4, seconds=0.05) > 0


def test_onnx_export_matches_pytorch(digits_run: Path, tmp_path: Path) -> None:
    pytest.importorskip("onnxscript", reason="ONNX export needs onnx + onnxscript")
    ort = pytest.importorskip("onnxruntime", reason="the check needs onnxruntime")
    from gmlp import create_model

    out = tmp_path / "model.onnx"
    assert main(["export", str(digits_run), "-o", str(out)]) == 0
    model = create_model(
        "gmlp_micro4_28", img_size=8, in_chans=1, num_classes=10, pretrained=digits_run / "model.safetensors"
    ).eval()
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for batch in (1, 3):
        x = torch.randn(batch, 1, 8, 8)
        got = session.run(None, {"images": x.numpy()})[0]
        with torch.no_grad():
            expected = model(x).numpy()
        assert got.shape == (batch, 10)
        assert np.abs(got - expected).max() <= 1e-4


def test_eval_and_info_refuse_bad_sizes_as_usage_errors(
    digits_run: Path, capsys: pytest.CaptureFixture
) -> None:
    assert main(["eval", str(digits_run), "--batch-size", "0"]) == 2
    assert capsys.readouterr().err.strip() == "gmlp eval: error: batch_size must be >= 1, got 0"
    assert main(["eval", str(digits_run), "--subset", "0"]) == 2
    assert "subset must be >= 1, got 0" in capsys.readouterr().err
    assert main(["eval", str(digits_run), "--img-size", "16"]) == 2  # digits are 8x8 tensors: not resized
    assert "img_size 16: the digits images are 8x8 tensors" in capsys.readouterr().err
    assert main(["info", "gmlp_micro4_28", "--throughput", "--batch-size", "0"]) == 2
    assert "--batch-size (of the throughput measurement) must be >= 1, got 0" in capsys.readouterr().err
    assert main(["info", "gmlp_micro4_28", "--batch-size", "0"]) == 2  # refused without --throughput too
    assert "--batch-size (of the throughput measurement) must be >= 1, got 0" in capsys.readouterr().err


def test_onnx_export_refuses_an_opset_it_cannot_write(digits_run: Path, tmp_path: Path) -> None:
    pytest.importorskip("onnxscript", reason="ONNX export needs onnx + onnxscript")
    from gmlp.export import export_checkpoint

    with pytest.raises(ValueError, match="opset must be a positive int, got 0"):
        export_checkpoint(digits_run, tmp_path / "m.onnx", opset=0)
    # the exporter falls back to its own opset with only a log message; the file would be mislabelled
    with pytest.raises(ValueError, match="opset 1: the exporter could not convert the model to it"):
        export_checkpoint(digits_run, tmp_path / "m.onnx", opset=1, verify=False)
    assert not (tmp_path / "m.onnx").exists()


def test_weights_carry_the_normalisation_they_were_trained_with(tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = train_vision(VisionTrainConfig(model="gmlp_micro4_28", dataset="digits", batch_size=64, epochs=1,
                                            warmup_steps=2, augment=False, progress=False, threads=1,
                                            train_subset=256, mean=(0.2,), std=(0.1,), output=str(out)))
    for weights in (out / "model.safetensors", latest_checkpoint(out) / "model.safetensors"):
        bare = evaluate_checkpoint(_copy(weights, tmp_path / "w.safetensors"), model="gmlp_micro4_28",
                                   dataset="digits")  # no config.json beside it
        assert bare["top1"] == pytest.approx(result["test_accuracy"])
        assert bare["loss"] == pytest.approx(result["test_loss"], rel=1e-5)


@pytest.mark.parametrize("heads,channels", [(1, 3), (2, 3), (1, 1)])
def test_checkpoint_shapes_reads_g_mlp_pytorch_files_of_any_heads_and_channels(
    tmp_path: Path, heads: int, channels: int
) -> None:
    """What `gmlp eval` / `gmlp export` size the model from: a multi-head W (heads, n, n) gives the grid
    too, and a 1-channel file (its patch embedding flattened) is read, not given up on."""
    g_mlp_pytorch = pytest.importorskip("g_mlp_pytorch")
    from gmlp.train.vision_tools import checkpoint_shapes

    source = g_mlp_pytorch.gMLPVision(image_size=16, patch_size=4, num_classes=7, dim=32, depth=2,
                                      heads=heads, ff_mult=2, channels=channels)
    torch.save(source.state_dict(), tmp_path / "lucid.pth")
    shapes = checkpoint_shapes(tmp_path / "lucid.pth")
    assert shapes == {"in_chans": channels, "img_size": (16, 16), "num_classes": 7}


def test_export_refuses_a_checkpoint_whose_head_does_not_fit(tmp_path: Path) -> None:
    """A head that does not fit --num-classes would be freshly initialised (all-zero logits), and the ONNX
    check would compare the file with that same broken model: refused, as `gmlp eval` does."""
    from gmlp import create_model
    from gmlp.export import export_checkpoint
    from gmlp.models.loading import save_model

    save_model(create_model("gmlp_micro4_28", num_classes=5), tmp_path / "m.safetensors")
    with pytest.raises(ValueError, match=r"an exported model needs the checkpoint's own head"):
        export_checkpoint(tmp_path / "m.safetensors", tmp_path / "m.onnx", model="gmlp_micro4_28",
                          num_classes=10)
    assert not (tmp_path / "m.onnx").exists()


def test_export_of_a_headless_checkpoint_keeps_it_headless(tmp_path: Path) -> None:
    """Weights saved with num_classes=0 (a feature extractor) are sized as such: the export used to build the
    model with its default 1,000-class head and refuse it as a head that does not fit."""
    pytest.importorskip("onnxscript", reason="ONNX export needs onnx + onnxscript")
    ort = pytest.importorskip("onnxruntime", reason="the check needs onnxruntime")
    from gmlp.export import export_checkpoint
    from gmlp.models.loading import save_model
    from gmlp.train.vision_tools import checkpoint_shapes

    model = create_model("gmlp_micro4_28", num_classes=0).eval()
    save_model(model, tmp_path / "m.safetensors")
    assert checkpoint_shapes(tmp_path / "m.safetensors")["num_classes"] == 0
    out = export_checkpoint(tmp_path / "m.safetensors", tmp_path / "m.onnx", model="gmlp_micro4_28",
                            verify=False)
    images = torch.randn(2, 1, 28, 28)
    (features,) = ort.InferenceSession(str(out)).run(None, {"images": images.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(features, model(images).numpy(), atol=1e-4)


def test_verify_onnx_restores_training_mode(tmp_path: Path) -> None:
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    from gmlp.export import export_onnx, verify_onnx

    model = create_model("gmlp_micro4_28").train()
    path = export_onnx(model, tmp_path / "m.onnx", (1, 28, 28))
    assert verify_onnx(model, path, (1, 28, 28)) <= 1e-4
    assert model.training


def test_verify_onnx_fails_on_nan_outputs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A graph whose outputs are NaN "verified" with a difference of 0 (max() skipped the NaN)."""
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    from gmlp.export import export_onnx, verify_onnx

    model = create_model("gmlp_micro4_28")
    path = export_onnx(model, tmp_path / "m.onnx", (np.int64(1), 28, 28))  # numpy sizes taken
    real_run = ort.InferenceSession.run

    def nan_run(self, names, feeds):  # noqa: ANN001, ANN202
        return [np.full_like(out, np.nan) for out in real_run(self, names, feeds)]

    monkeypatch.setattr(ort.InferenceSession, "run", nan_run)
    with pytest.raises(RuntimeError, match="ONNX outputs are NaN at 10 places where PyTorch's are not"):
        verify_onnx(model, path, (1, 28, 28))


def test_a_failed_export_leaves_the_previous_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The ONNX file is written atomically: an export that fails while writing used to leave a partial file
    in place of the previous one, and a refused opset deleted the previous file."""
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    import types

    from gmlp.export import export_onnx

    path = tmp_path / "m.onnx"
    path.write_bytes(b"the previous export")

    def save(target: str) -> None:
        Path(target).write_bytes(b"partial")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch.onnx, "export", lambda *a, **k: types.SimpleNamespace(save=save))
    with pytest.raises(OSError, match="No space left"):
        export_onnx(create_model("gmlp_micro4_28", depth=1), path, (1, 28, 28))
    assert path.read_bytes() == b"the previous export"
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]  # no temporary file left



def test_eval_ema_of_an_unfinished_run_says_so(digits_run: Path, tmp_path: Path) -> None:
    """--ema on a run killed before its end (EMA weights only in its checkpoints) asked "was the run trained
    with --ema?"; now it says the run has not finished and how to finish it. A run trained without EMA says
    that instead."""
    import shutil

    unfinished = tmp_path / "unfinished"
    shutil.copytree(digits_run, unfinished)
    for name in ("model.safetensors", "model_ema.safetensors"):
        (unfinished / name).unlink()
    with pytest.raises(FileNotFoundError, match=r"model_ema.safetensors yet: the run has not finished"):
        evaluate_checkpoint(unfinished, ema=True)
    assert evaluate_checkpoint(unfinished)["count"] == 297  # its last checkpoint's model weights
    config = json.loads((unfinished / "config.json").read_text())
    (unfinished / "config.json").write_text(json.dumps({**config, "ema": False}))
    with pytest.raises(FileNotFoundError, match=r"\(the run was trained without --ema\)"):
        evaluate_checkpoint(unfinished, ema=True)


@pytest.mark.parametrize(
    ("data_root", "keys"),
    [(None, ("pic", "y")), ("other", (None, None)), ("./mine", ("pic", "y")), ("x/../mine", ("pic", "y"))],
)
def test_eval_passes_the_runs_columns_only_to_the_runs_hf_dataset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, data_root: str | None, keys: tuple
) -> None:
    """A run trained on one HF dataset with explicit ``--image-key``/``--label-key`` named those columns to
    any other HF dataset ``gmlp eval --data-root`` gave (which then had "no image column"); they belong to
    the run's own dataset only."""
    from gmlp.data import folders
    from gmlp.utils.io import save_state_dict_file

    run = tmp_path / "run"
    run.mkdir()
    save_state_dict_file(create_model("gmlp_micro4_28").state_dict(), run / "model.safetensors")
    config = {"model": "gmlp_micro4_28", "dataset": "hf", "data_root": str(tmp_path / "mine"),
              "image_key": "pic", "label_key": "y"}
    (run / "config.json").write_text(json.dumps(config))
    seen: dict = {}

    def hf_source(root: str, split: str | None, **kwargs: object) -> None:
        seen.update(root=root, keys=(kwargs.get("image_key"), kwargs.get("label_key")))
        raise KeyboardInterrupt  # (stop here: the columns are what the test checks)

    monkeypatch.setattr(folders, "hf_source", hf_source)
    monkeypatch.chdir(tmp_path)  # (the same folder spelled another way keeps the run's columns)
    root = str(tmp_path / "other") if data_root == "other" else data_root
    with pytest.raises(KeyboardInterrupt):
        evaluate_checkpoint(run, dataset="hf", data_root=root, workers=0)
    assert seen == {"root": root or config["data_root"], "keys": keys}
