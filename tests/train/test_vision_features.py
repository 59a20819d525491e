"""Paper-fidelity training features: ImageFolder + RandAugment + Mixup/CutMix + RandomErasing + EMA + gradient
accumulation, all resumed exactly; logs and plots; clear errors (OOM, resume with another model or world
size)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from gmlp.train.checkpoint import latest_checkpoint
from gmlp.train.vision import VisionTrainConfig, train_vision
from gmlp.utils.io import load_state_dict_file

DIGITS = dict(
    model="gmlp_micro4_28",
    dataset="digits",
    batch_size=64,
    epochs=1,
    warmup_steps=2,
    progress=False,
    train_subset=256,
    test_subset=64,
    threads=1,
    tensorboard=False,
    plot=False,
)


def _tree(root: Path) -> Path:
    """train/ (3 classes x 6 PNGs + 1 corrupt) and val/ (3 x 2) of 12x12 colour images."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("val", 2)):
        for c, col in enumerate(((200, 30, 30), (30, 200, 30), (30, 30, 200))):
            d = root / split / f"c{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                arr = np.clip(np.array(col)[None, None] + rng.normal(0, 30, (12, 12, 3)), 0, 255)
                Image.fromarray(arr.astype(np.uint8)).save(d / f"{i}.png")
    (root / "train" / "c1" / "zz_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    return root


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_state_dict_file(path)[0]


def _assert_same(a: Path, b: Path, atol: float = 1e-6) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=atol, msg=k)


def test_paper_recipe_features_on_image_folder_resume_exactly(tmp_path: Path) -> None:
    root = _tree(tmp_path / "imgs")
    recipe = dict(
        model="gmlp_micro4_28",
        model_kwargs={"in_chans": 3},
        dataset="imagefolder",
        data_root=str(root),
        img_size=12,
        batch_size=4,  # micro-batches of 2: mixup pairs them (an odd one is refused)
        grad_accum_steps=2,
        epochs=2,
        warmup_steps=1,
        lr=3e-3,
        auto_augment="rand-m9-mstd0.5-inc1",
        mixup=0.8,
        cutmix=1.0,
        mixup_switch_prob=0.5,
        reprob=0.25,
        ema=True,
        ema_decay=0.9,
        drop_path_rate=0.1,
        progress=False,
        workers=0,
        eval_batch_size=4,
        threads=1,
        tensorboard=True,
        checkpoint_every=2,
    )
    full = train_vision(VisionTrainConfig(**recipe, output=str(tmp_path / "full")))
    assert full["step"] == 2 * (19 // 4)
    train_vision(
        VisionTrainConfig(**recipe, max_steps=5, output=str(tmp_path / "cut"))
    )  # killed after step 5, mid epoch 2
    resumed = train_vision(
        VisionTrainConfig(**{**recipe, "workers": 2}, output=str(tmp_path / "cut")), resume=True
    )
    for name in ("model.safetensors", "model_ema.safetensors"):
        _assert_same(tmp_path / "full" / name, tmp_path / "cut" / name)
    assert resumed["test_accuracy"] == pytest.approx(full["test_accuracy"])
    records = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert all("ema_test_accuracy" in r and r["skipped_images"] >= 0 for r in records)
    assert (
        sum(r["skipped_images"] for r in records) >= 1
    )  # the corrupt PNG was met (and skipped) at least once
    assert (tmp_path / "full" / "metrics.png").stat().st_size > 0
    if (tmp_path / "full" / "tensorboard").is_dir():  # tensorboard installed
        assert any((tmp_path / "full" / "tensorboard").iterdir())


def test_strict_images_fails_on_the_corrupt_file(tmp_path: Path) -> None:
    root = _tree(tmp_path / "imgs")
    cfg = VisionTrainConfig(
        model="gmlp_micro4_28",
        dataset="imagefolder",
        data_root=str(root),
        img_size=12,
        batch_size=19,
        epochs=1,
        workers=0,
        progress=False,
        strict_images=True,
        output=str(tmp_path / "run"),
        tensorboard=False,
        plot=False,
    )
    with pytest.raises(ValueError, match="zz_corrupt.png"):
        train_vision(cfg)


def test_gradient_accumulation_matches_the_full_batch(tmp_path: Path) -> None:
    train_vision(VisionTrainConfig(**DIGITS, output=str(tmp_path / "one")))
    train_vision(VisionTrainConfig(**DIGITS, grad_accum_steps=4, output=str(tmp_path / "four")))
    _assert_same(tmp_path / "one" / "model.safetensors", tmp_path / "four" / "model.safetensors", atol=1e-5)


def test_accumulation_with_a_corrupt_image_matches_the_full_batch(tmp_path: Path) -> None:
    """A skipped corrupt image leaves its micro-batch short; the step must still take the mean over the step's
    readable images (as one micro-batch of the whole global batch does), not the mean of per-micro-batch
    means, which weighed the other image of a short micro-batch twice as much."""
    root = _tree(tmp_path / "imgs")
    settings = dict(model="gmlp_micro4_28", model_kwargs={"in_chans": 3}, dataset="imagefolder",
                    data_root=str(root), img_size=12, batch_size=4, epochs=2, warmup_steps=1, lr=3e-3,
                    augment=False, progress=False, workers=0, eval_batch_size=6, threads=1, tensorboard=False,
                    plot=False)
    runs = {}
    for accum in (1, 2, 4):
        out = tmp_path / f"accum{accum}"
        runs[accum] = train_vision(VisionTrainConfig(**settings, grad_accum_steps=accum, output=str(out)))
    assert runs[1]["skipped_images"] >= 1  # the corrupt PNG was in a batch
    for accum in (2, 4):
        full, accumulated = (tmp_path / f"accum{k}" / "model.safetensors" for k in (1, accum))
        _assert_same(full, accumulated, atol=1e-5)
        assert runs[accum]["train_loss"] == pytest.approx(runs[1]["train_loss"], rel=1e-5)


def test_out_of_memory_suggests_accumulation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import gmlp.train.vision as vision

    real = vision.build_model

    def oom_model(*args, **kwargs):
        model = real(*args, **kwargs)

        def forward(x):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

        model.forward = forward
        return model

    monkeypatch.setattr(vision, "build_model", oom_model)
    with pytest.raises(torch.OutOfMemoryError, match="--grad-accum-steps 2 .*smaller --batch-size"):
        train_vision(VisionTrainConfig(**DIGITS, output=str(tmp_path / "run")))


def test_resume_with_another_model_or_seed_is_refused(tmp_path: Path) -> None:
    """(Another number of processes with the same global batch is continued since the twenty-seventh
    session: tests/train/test_resume_changes.py.)"""
    out = tmp_path / "run"
    train_vision(VisionTrainConfig(**DIGITS, output=str(out)))
    with pytest.raises(ValueError, match="holds a 'gmlp_micro4_28' model, not 'gmlp_nano4_28'"):
        train_vision(VisionTrainConfig(**{**DIGITS, "model": "gmlp_nano4_28"}, output=str(out)), resume=True)
    state_file = latest_checkpoint(out) / "state.json"
    state = json.loads(state_file.read_text())
    state["fingerprint"]["seed"] = state["fingerprint"].get("seed", 0) + 1
    state_file.write_text(json.dumps(state))
    with pytest.raises(ValueError, match="resume with --seed"):
        train_vision(VisionTrainConfig(**DIGITS, output=str(out)), resume=True)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"dataset": "imagefolder"}, "needs data_root"),
        ({"mixup_mode": "x"}, "mixup_mode must be one of"),
        ({"model": "timm:not_a_model"}, "unknown timm model"),
        ({"reprob": 2.0}, "reprob must be in"),
        ({"auto_augment": "bogus"}, "not a timm policy"),
        ({"batch_size": 60, "grad_accum_steps": 7}, "divisible"),
    ],
)
def test_new_settings_are_checked(tmp_path: Path, override: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        train_vision(VisionTrainConfig(**{**DIGITS, **override}, output=str(tmp_path / "run")))


@pytest.mark.parametrize("workers", [0, 1])
def test_strict_images_is_a_one_line_usage_error_of_gmlp_train(
    tmp_path: Path, workers: int, capsys: pytest.CaptureFixture[str]
) -> None:
    """``gmlp train --strict-images`` stopping at a corrupt image printed a traceback (with DataLoader workers
    two: the worker's, re-raised inside the main process's); now one ``gmlp train: error:`` line naming the
    file, exit status 2."""
    from gmlp.cli import main

    root = _tree(tmp_path / "imgs")
    argv = ["train", "--model", "gmlp_micro4_28", "--dataset", "imagefolder", "--data-root", str(root),
            "--img-size", "12", "--batch-size", "19", "--epochs", "1", "--workers", str(workers),
            "--no-progress", "--strict-images", "--output", str(tmp_path / "run"), "--no-plot"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("gmlp train: error: ") and "zz_corrupt.png" in err[-1], err[-3:]
    assert not any("Traceback" in line for line in err), err
