"""End-to-end tests of ``gmlp train`` on tiny offline data (scikit-learn digits; Fashion-MNIST if there)."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch

from gmlp import create_model
from gmlp.cli import main
from gmlp.data.images import fashion_mnist_root
from gmlp.train.checkpoint import latest_checkpoint, load_checkpoint
from gmlp.train.recipe import ConfigError
from gmlp.train.vision import VisionTrainConfig, train_vision
from gmlp.utils.io import load_state_dict_file

TINY = dict(model="gmlp_micro4_28", dataset="digits", batch_size=64, epochs=2, warmup_steps=4, augment=False,
            progress=False, train_subset=320, test_subset=128, threads=1)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_state_dict_file(path)[0]


def test_cli_trains_end_to_end_and_checkpoint_loads_bit_exactly(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "run"
    rc = main(["train", "--model", "gmlp_micro4_28", "--dataset", "digits", "--epochs", "2", "--batch-size",
               "64", "--warmup-steps", "4", "--no-augment", "--no-progress", "--output", str(out),
               "--train-subset", "320"])
    assert rc == 0
    printed = capsys.readouterr().out.splitlines()
    # the first line says what the run uses; the last one the final accuracy
    params = sum(p.numel() for p in create_model("gmlp_micro4_28", img_size=8, in_chans=1).parameters())
    assert printed[0] == (f"training gmlp_micro4_28 ({params:,} parameters) on cpu x 1 process(es), fp32, "
                          "fused AdamW, 5 steps/epoch")
    assert printed[-1].startswith("done: 10 steps, test accuracy 0.")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert all(0.0 <= r["test_accuracy"] <= 1.0 for r in records)
    assert records[-1]["step"] == 2 * (320 // 64)
    ckpt_dir = latest_checkpoint(out)
    assert ckpt_dir is not None and ckpt_dir.name == f"step-{records[-1]['step']:08d}"
    final = _weights(out / "model.safetensors")
    ckpt = load_checkpoint(out)
    assert final.keys() == ckpt.model.keys()
    assert all(torch.equal(final[k], ckpt.model[k]) for k in final)
    model = create_model("gmlp_micro4_28", img_size=8, in_chans=1, num_classes=10,
                         pretrained=out / "model.safetensors")
    assert all(torch.equal(v, final[k]) for k, v in model.state_dict().items())


def test_training_learns_on_digits(tmp_path: Path) -> None:
    cfg = VisionTrainConfig(**{**TINY, "epochs": 6, "train_subset": None, "test_subset": None, "lr": 3e-3},
                            output=str(tmp_path / "run"))
    result = train_vision(cfg)
    assert result["test_accuracy"] > 0.5  # chance is 0.1


def test_bf16_training_on_the_cpu_learns_through_the_bf16_fast_path(tmp_path: Path, onednn_products) -> None:
    """``precision="bf16"`` on the CPU: autocast, the projections on oneDNN in bf16 (where the CPU has it),
    and the model still learns."""
    from gmlp.kernels import cpu_linear

    cfg = VisionTrainConfig(**{**TINY, "epochs": 6, "train_subset": None, "test_subset": None, "lr": 3e-3,
                               "precision": "bf16"}, output=str(tmp_path / "run"))  # fmt: skip
    with onednn_products() as calls:
        result = train_vision(cfg)
    assert result["test_accuracy"] > 0.5  # chance is 0.1
    assert set(calls) == ({torch.bfloat16} if cpu_linear._HAS_ONEDNN_BF16 else set())


def test_resume_after_interruption_equals_uninterrupted_run(tmp_path: Path) -> None:
    full = train_vision(VisionTrainConfig(**TINY, output=str(tmp_path / "full")))
    part = VisionTrainConfig(**{**TINY, "checkpoint_every": 3}, max_steps=7, output=str(tmp_path / "resumed"))
    train_vision(part)  # stops mid-epoch 2 (5 steps per epoch), as if killed after step 7
    assert load_checkpoint(tmp_path / "resumed").state["step"] == 7
    resumed = train_vision(
        VisionTrainConfig(**{**TINY, "checkpoint_every": 3}, output=str(tmp_path / "resumed")), resume=True
    )
    assert resumed["step"] == full["step"] == 10
    a = _weights(tmp_path / "full" / "model.safetensors")
    b = _weights(tmp_path / "resumed" / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    assert resumed["test_accuracy"] == pytest.approx(full["test_accuracy"])
    records = [json.loads(x) for x in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]


def test_a_stop_mid_epoch_saves_every_step_s_loss_when_losses_are_read_lazily(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a GPU the loop reads losses back every log_every steps only; a checkpoint (here: the --max-steps
    stop) must still hold the sum of every step it counts, or the resumed epoch's train_loss is wrong."""
    import gmlp.train.vision as vision_module

    monkeypatch.setattr(vision_module, "_flush_losses_every_step", lambda device: False)  # as on CUDA
    cfg = {**TINY, "log_every": 50}
    train_vision(VisionTrainConfig(**cfg, output=str(tmp_path / "full")))
    train_vision(VisionTrainConfig(**cfg, max_steps=7, output=str(tmp_path / "resumed")))
    train_vision(VisionTrainConfig(**cfg, output=str(tmp_path / "resumed")), resume=True)
    losses = [
        [json.loads(x)["train_loss"] for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        for run in ("full", "resumed")
    ]
    assert losses[1] == pytest.approx(losses[0], rel=1e-6)


@pytest.mark.parametrize(
    ("argv", "message"),
    [(["--batch-size", "30", "--grad-accum-steps", "4"], r"batch_size \(30, .*\) must be divisible by "
      r"processes x grad_accum_steps = 1 x 4 = 4"),
     (["--batch-size", "12", "--grad-accum-steps", "4", "--mixup", "0.8"],
      r"mixup/cutmix pair the images of a micro-batch, which must be even: .* = 3"),
     (["--batch-size", "4096"], r"batch_size \(4096\) is larger than the training set \(1500 images\)")],
)
def test_batches_that_cannot_be_split_are_usage_errors_before_anything_is_written(
    tmp_path: Path, capsys: pytest.CaptureFixture, argv: list[str], message: str
) -> None:
    """An odd micro-batch with mixup lost a sample every step (a micro-batch of 1 trained on nothing)."""
    rc = main(["train", "--dataset", "digits", "--model", "gmlp_micro4_28", *argv,
               "--output", str(tmp_path / "run")])
    assert rc == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "run").exists()


def test_normalisation_of_the_wrong_length_and_a_run_shorter_than_warmup(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """--mean with 2 values on 1-channel images was averaged silently; warmup longer than the run leaves the
    learning rate below lr throughout: the first is refused, the second said."""
    base = ["train", "--dataset", "digits", "--model", "gmlp_micro4_28", "--train-subset", "128",
            "--test-subset", "64", "--batch-size", "64", "--epochs", "1", "--no-augment", "--no-progress"]
    assert main([*base, "--mean", "0.1", "0.2", "--output", str(tmp_path / "a")]) == 2
    assert "--mean has 2 values (0.1, 0.2); the images have 1 channel(s)" in capsys.readouterr().err
    assert main([*base, "--output", str(tmp_path / "b")]) == 0
    assert "warning: warmup_steps (200) >= the run's 2 optimizer steps" in capsys.readouterr().err


def test_resume_with_other_settings_is_refused(tmp_path: Path) -> None:
    train_vision(VisionTrainConfig(**{**TINY, "epochs": 1}, output=str(tmp_path / "run")))
    with pytest.raises(ValueError, match="batch_size=64 \\(now 32\\)"):
        other = VisionTrainConfig(**{**TINY, "epochs": 1, "batch_size": 32}, output=str(tmp_path / "run"))
        train_vision(other, resume=True)


def test_resume_without_checkpoint_says_so(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train_vision(VisionTrainConfig(**TINY, output=str(tmp_path / "empty")), resume=True)


@pytest.mark.parametrize(
    ("override", "message"),
    [({"model": "resnet50"}, "unknown model 'resnet50'"), ({"batch_size": 0}, "batch_size must be >= 1"),
     ({"lr": -1.0}, "lr must be > 0"), ({"label_smoothing": 1.0}, "label_smoothing"),
     ({"dataset": "cifar"}, "unknown dataset 'cifar'"),
     ({"batch_size": 4096}, "larger than the training set"),
     ({"warmup_lr": -1.0}, "warmup_lr must be >= 0"), ({"min_lr": 0.1}, r"min_lr \(0.1\) must not exceed lr"),
     ({"betas": (1.5, 0.999)}, r"betas must both be in \[0, 1\)"), ({"threads": 0}, "threads must be >= 1"),
     ({"train_subset": 0}, "train_subset must be >= 1"), ({"img_size": 0}, "img_size must be >= 1"),
     ({"img_size": 16}, "img_size 16: the digits images are 8x8 tensors"),
     ({"model_kwargs": {"num_classes": 5}}, r"model_kwargs num_classes=5 \(the data gives 10\)"),
     ({"model_kwargs": {"in_chans": 3}}, r"in_chans=3 \(the data gives 1\)"),
     ({"model_kwargs": {"depth": -3}}, "depth must be an int >= 1")],
)
def test_bad_settings_raise_clear_errors(tmp_path: Path, override: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        train_vision(VisionTrainConfig(**{**TINY, **override}, output=str(tmp_path / "run")))


@pytest.mark.parametrize(
    ("override", "message"),
    [({"model_kwargs": {"drop_path_rate": 0.3}},
      r"model_kwargs drop_path_rate=0.3: drop_path_rate is a setting of its own "
      r"\(--drop-path-rate, now 0.0\)"),
     ({"model_kwargs": {"drop_rate": 0.2}, "drop_rate": 0.1}, r"model_kwargs drop_rate=0.2: .*now 0.1"),
     ({"model_kwargs": {"drop_path_schedule": "linear"}}, "model_kwargs drop_path_schedule='linear'"),
     ({"crop_scale": (0.35, 1.0)}, r"crop_scale=\(0.35, 1.0\): a setting of timm's transforms, which the "
                                   r"digits in-memory pipeline does not run .* add --auto-augment"),
     ({"color_jitter": 0.0, "train_interpolation": "bilinear"}, "color_jitter=0.0, train_interpolation="),
     ({"val_split": "train"}, "val_split='train': dataset 'digits' does not use this setting"),
     ({"dataset": "imagefolder", "data_root": "x", "label_key": "y"},
      "label_key='y': dataset 'imagefolder'")],
)
def test_settings_the_run_would_ignore_are_refused(override: dict, message: str) -> None:
    """A model_kwargs drop_path_rate/drop_rate/drop_path_schedule was overridden by the setting of that
    name (its default), and the timm-transform and split settings did nothing on the digits/Fashion-MNIST
    tensors: all were silently ignored."""
    with pytest.raises(ValueError, match=message):
        VisionTrainConfig(**{**TINY, **override}).validate()
    same = {"model_kwargs": {"drop_path_rate": 0.1}, "drop_path_rate": 0.1}  # the same value twice: fine
    VisionTrainConfig(**{**TINY, **same}).validate()
    VisionTrainConfig(**{**TINY, "crop_scale": [0.08, 1.0]}).validate()  # the default, as a recipe gives it
    pil = {"crop_scale": (0.35, 1.0), "auto_augment": "rand-m9", "augment": True}  # PIL (which --no-augment
    VisionTrainConfig(**{**TINY, **pil}).validate()  # with an auto_augment policy is refused)


def test_matching_model_kwargs_and_img_size_are_accepted(tmp_path: Path) -> None:
    cfg = VisionTrainConfig(**{**TINY, "epochs": 1, "train_subset": 64, "test_subset": 64}, img_size=8,
                            model_kwargs={"num_classes": 10, "in_chans": 1, "img_size": [8, 8]},
                            output=str(tmp_path / "run"))
    assert train_vision(cfg)["step"] == 1


def test_cli_reports_a_bad_setting_as_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rc = main(["train", "--dataset", "digits", "--warmup-lr", "-1", "--output", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.strip() == "gmlp train: error: warmup_lr must be >= 0, got -1.0"
    assert not (tmp_path / "run").exists()  # refused before anything was written


@pytest.mark.skipif(not (fashion_mnist_root() / "train-images-idx3-ubyte.gz").is_file(),
                    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
def test_default_dataset_runs_on_a_subset(tmp_path: Path) -> None:
    cfg = VisionTrainConfig(epochs=1, train_subset=512, test_subset=500, progress=False, threads=1,
                            output=str(tmp_path / "fm"), warmup_steps=2)
    result = train_vision(cfg)
    assert result["step"] == 4 and 0.0 <= result["test_accuracy"] <= 1.0


@pytest.mark.parametrize(
    "option", ["grad_checkpointing", pytest.param("compile", marks=[pytest.mark.slow, pytest.mark.inductor])]
)
def test_memory_and_speed_options_train_like_eager(
    tmp_path: Path, option: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """grad_checkpointing (blocks recomputed in backward) and compile (inductor) reach the plain weights."""
    import gmlp.nn.block as block_module

    calls: list[int] = []
    forward = block_module.GMLPBlock.forward
    counted = lambda *a, **k: calls.append(1) or forward(*a, **k)  # noqa: E731
    monkeypatch.setattr(block_module.GMLPBlock, "forward", counted)
    settings = {**TINY, "epochs": 1, "train_subset": 192, "test_subset": 64}  # 3 steps, one evaluation
    train_vision(VisionTrainConfig(**settings, output=str(tmp_path / "plain")))
    plain_calls, calls[:] = len(calls), []
    train_vision(VisionTrainConfig(**settings, **{option: True}, output=str(tmp_path / "other")))
    if option == "grad_checkpointing":  # each of the 4 blocks ran twice in each of the 3 training steps
        assert len(calls) == plain_calls + 3 * 4
    a = _weights(tmp_path / "plain" / "model.safetensors")
    b = _weights(tmp_path / "other" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)


def test_cli_stopped_mid_epoch_says_so(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rc = main(["train", "--model", "gmlp_micro4_28", "--dataset", "digits", "--epochs", "1", "--batch-size",
               "64", "--no-augment", "--no-progress", "--output", str(tmp_path / "run"),
               "--train-subset", "320", "--max-steps", "2"])
    assert rc == 0
    last = capsys.readouterr().out.splitlines()[-1]
    assert last == f"done: 2 steps, not evaluated (stopped mid-epoch), outputs in {tmp_path / 'run'}"


def test_a_new_run_never_mixes_with_the_run_already_in_its_folder(tmp_path: Path) -> None:
    out = tmp_path / "run"
    first = VisionTrainConfig(**{**TINY, "epochs": 1}, checkpoint_every=2, output=str(out))
    train_vision(first)
    old = sorted(p.name for p in (out / "checkpoints").glob("step-*"))
    with pytest.raises(ValueError, match="already holds a run .*pass --resume to continue it or --overwrite"):
        train_vision(dataclasses.replace(first, lr=1e-3))
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == old  # untouched
    again = dataclasses.replace(first, lr=1e-3, max_steps=2, overwrite=True)
    assert train_vision(again)["step"] == 2
    assert [p.name for p in (out / "checkpoints").glob("step-*")] == ["step-00000002"]  # the old ones gone
    assert load_checkpoint(out).state["config"]["lr"] == 1e-3
    assert not (out / "model_ema.safetensors").exists()


def test_resume_keeps_ema_and_warns_of_changed_settings(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "run"
    cfg = VisionTrainConfig(**TINY, ema=True, max_steps=3, output=str(out))
    train_vision(cfg)
    with pytest.raises(ValueError, match="holds EMA weights, which would be dropped; resume with --ema"):
        train_vision(dataclasses.replace(cfg, ema=False, max_steps=None), resume=True)
    capsys.readouterr()
    result = train_vision(dataclasses.replace(cfg, max_steps=None, label_smoothing=0.2), resume=True)
    err = capsys.readouterr().err
    assert "warning: resuming" in err and "with changed settings (label_smoothing: 0.1 -> 0.2)" in err
    assert result["step"] == 10 and "test_accuracy" in result


def test_resume_with_ema_of_a_run_without_is_a_config_error(tmp_path: Path) -> None:
    """The other way round: a usage error naming the flag (a bare ValueError before: a CLI traceback)."""
    out = tmp_path / "run"
    cfg = VisionTrainConfig(**TINY, max_steps=2, output=str(out))
    train_vision(cfg)
    with pytest.raises(ConfigError, match="holds no EMA weights .*; resume without --ema"):
        train_vision(dataclasses.replace(cfg, ema=True), resume=True)


def test_the_step_reported_is_the_step_reached(tmp_path: Path) -> None:
    out = tmp_path / "run"
    cfg = VisionTrainConfig(**TINY, max_steps=7, output=str(out))  # 5 steps an epoch: stops mid-epoch 2
    result = train_vision(cfg)
    assert result["step"] == 7 and "test_accuracy" not in result  # epoch 1's accuracy is not the end's
    final = train_vision(dataclasses.replace(cfg, max_steps=None), resume=True)
    assert final["step"] == 10 and 0.0 <= final["test_accuracy"] <= 1.0
    again = train_vision(dataclasses.replace(cfg, max_steps=None), resume=True)  # already finished
    assert again["step"] == 10 and again["test_accuracy"] == final["test_accuracy"]


def test_resuming_a_folder_gmlp_train_did_not_write_is_refused(tmp_path: Path) -> None:
    from gmlp.train.checkpoint import save_checkpoint

    save_checkpoint(tmp_path / "text", 4, {"w": torch.zeros(1)}, {}, {"step": 4})  # as a text run writes it
    with pytest.raises(ValueError, match="gmlp train did not write it"):
        train_vision(VisionTrainConfig(**TINY, output=str(tmp_path / "text")), resume=True)


def test_resume_with_overwrite_is_refused_in_the_python_api(tmp_path: Path) -> None:
    """``train_vision(config(overwrite=True), resume=True)`` resumed and silently ignored the overwrite (the
    command line refused the pair; the function did not)."""
    config = VisionTrainConfig(model="gmlp_micro4_28", dataset="digits", epochs=1, overwrite=True,
                               output=str(tmp_path / "run"), progress=False, tensorboard=False, plot=False)
    with pytest.raises(ConfigError, match=r"resume=True continues .* config\.overwrite=True removes it"):
        train_vision(config, resume=True)
    assert not (tmp_path / "run").exists()


def test_a_training_set_of_unreadable_images_is_an_error_not_a_trained_model(tmp_path: Path) -> None:
    """Every training image corrupt (or unreadable for want of permission): the epoch trained on nothing,
    logged a training loss of 0 and wrote model.safetensors; now the run stops at the epoch's end."""
    from PIL import Image

    root = tmp_path / "data"
    for split in ("train", "val"):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            for i in range(4):
                path = root / split / c / f"{i}.png"
                if split == "train":
                    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"junk" * 8)
                else:
                    Image.new("RGB", (28, 28), (40 * i, 80, 120)).save(path)
    cfg = VisionTrainConfig(model="gmlp_micro4_28", dataset="imagefolder", data_root=str(root), epochs=1,
                            batch_size=4, warmup_steps=0, augment=False, progress=False, threads=1, workers=0,
                            tensorboard=False, plot=False, output=str(tmp_path / "run"))
    with pytest.raises(ConfigError, match=r"image read in epoch 1 \(since its start.*unreadable \(8 skipped"):
        train_vision(cfg)
    assert not (tmp_path / "run" / "model.safetensors").exists()
