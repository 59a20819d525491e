"""``gmlp train --resume`` with settings other than the saved run's: what is continued (with a warning that
says what differs), what is refused (naming the setting and both values), and what a changed setting does.

- Another number of processes or accumulation steps with the same global batch (a job preempted on 8 GPUs
  resumed on 4): the data order and each image's augmentation are the saved run's, and the random draws
  made per micro-batch are keyed by its place in the global batch, so 2 processes resumed as 1 process with
  2 accumulation steps end with the weights and metrics of an uninterrupted 1 x 2 run (up to the order of
  the gradient sums). It was refused.
- Another ``epochs`` (extending a finished run; shortening one): continued with the schedule recomputed, and
  a warning; an ``epochs`` that ends before the checkpoint's step is refused. It was refused either way.
- ``--weight-decay`` / ``--betas`` / ``--eps`` given anew: they apply (the saved optimizer state's values
  silently won, while the warning said the settings had changed).
- Other data with the same dataset kind (another ``--data-root`` whose classes differ): refused (it was a
  warning about the changed data_root, and the run went on with the classes mislabelled).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gmlp.train.checkpoint import load_checkpoint
from gmlp.train.recipe import ConfigError
from gmlp.train.vision import VisionTrainConfig, _check_fingerprint, _fingerprint, train_vision
from gmlp.utils.io import load_state_dict_file

# 5 steps per epoch (320 / 64); drop path: random draws per micro-batch that must match across the split
TINY = dict(model="gmlp_micro4_28", dataset="digits", batch_size=64, epochs=1, warmup_steps=2, augment=False,
            drop_path_rate=0.1, progress=False, train_subset=320, test_subset=64, threads=1,
            tensorboard=False, plot=False, device="cpu")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1",
       "HF_DATASETS_OFFLINE": "1"}


def _records(run: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(x).items() if k != "epoch_seconds"}
            for x in (run / "metrics.jsonl").read_text().splitlines()]


def _assert_close_runs(run: Path, reference: Path, atol: float) -> None:
    a, b = (load_state_dict_file(r / "model.safetensors")[0] for r in (run, reference))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=k)
    ra, rb = _records(run), _records(reference)
    assert [r["step"] for r in ra] == [r["step"] for r in rb]
    for x, y in zip(ra, rb, strict=True):
        for key in ("train_loss", "test_loss", "lr"):
            assert x[key] == pytest.approx(y[key], abs=atol), key


def test_two_processes_resumed_as_one_with_accumulation_continue_the_run(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Preempted on 2 processes after step 3 (mid-epoch), resumed on 1 with --grad-accum-steps 2: the
    uninterrupted 1 x 2 run's weights and epoch metrics (the epoch's train loss too, whose saved part was a
    sum over 2 processes), with a warning that names both shapes."""
    cut = tmp_path / "cut"
    args = ["--model", "gmlp_micro4_28", "--dataset", "digits", "--batch-size", "64", "--epochs", "1",
            "--warmup-steps", "2", "--no-augment", "--drop-path-rate", "0.1", "--train-subset", "320",
            "--test-subset", "64", "--no-progress", "--threads", "1", "--no-tensorboard", "--no-plot",
            "--device", "cpu", "--max-steps", "3", "--output", str(cut)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "gmlp",
           "train", *args]
    proc = subprocess.run(cmd, env=ENV, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert load_checkpoint(cut).state["fingerprint"]["world_size"] == 2
    config = VisionTrainConfig(**TINY, grad_accum_steps=2, output=str(cut))
    train_vision(config, resume=True)
    err = capsys.readouterr().err
    assert "with 1 process(es) x 2 accumulation step(s) instead of 2 x 1" in err
    assert "micro-batches hold" not in err  # the same 32-image micro-batches: the same random draws
    train_vision(dataclasses.replace(config, output=str(tmp_path / "ref")))
    _assert_close_runs(cut, tmp_path / "ref", atol=1e-5)


def test_extending_a_finished_run_and_shortening_one(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    one = VisionTrainConfig(**TINY, output=str(out))
    assert train_vision(one)["step"] == 5
    capsys.readouterr()
    two = dataclasses.replace(one, epochs=2)
    result = train_vision(two, resume=True)  # extended: epoch 2 trained on
    assert result["step"] == 10 and "test_accuracy" in result
    err = capsys.readouterr().err
    assert "with epochs 1 -> 2: the warmup + cosine learning-rate schedule is recomputed over 10 steps" in err
    assert "changed settings" not in err  # (epochs is said once, with what it changes)
    assert [r["epoch"] for r in _records(out)] == [1, 2]
    # from the resume on, the learning rate is that of an uninterrupted 2-epoch run (the 10-step schedule)
    reference = dataclasses.replace(two, output=str(tmp_path / "two"))
    train_vision(reference)
    assert _records(out)[-1]["lr"] == _records(tmp_path / "two")[-1]["lr"]
    # shortening below the checkpoint's step cannot be continued
    with pytest.raises(ConfigError, match=r"cannot resume from step 10 with epochs 1 \(5 steps\): the run "
                                          r"\(epochs 2\) is past that already; give --epochs 2"):
        train_vision(one, resume=True)


def test_shortening_a_run_in_progress_continues_with_a_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "run"
    train_vision(VisionTrainConfig(**{**TINY, "epochs": 3}, max_steps=2, output=str(out)))
    capsys.readouterr()
    assert train_vision(VisionTrainConfig(**TINY, output=str(out)), resume=True)["step"] == 5
    assert "with epochs 3 -> 1" in capsys.readouterr().err


def test_changed_optimizer_settings_apply_on_resume(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The optimizer state loaded on resume brought back the saved weight decay, betas and eps: the new
    values, named in the warning, were silently not used."""
    out = tmp_path / "run"
    cfg = VisionTrainConfig(**TINY, max_steps=2, output=str(out))
    train_vision(cfg)
    changed = dataclasses.replace(cfg, max_steps=3, weight_decay=0.5, betas=(0.8, 0.95), eps=1e-4, lr=1e-3)
    train_vision(changed, resume=True)
    assert "weight_decay: 0.05 -> 0.5" in capsys.readouterr().err
    groups = load_checkpoint(out).optimizer["optimizer"]["param_groups"]
    assert sorted(g["weight_decay"] for g in groups) == [0.0, 0.5]  # (norms and biases: no decay)
    for g in groups:
        assert tuple(g["betas"]) == (0.8, 0.95) and g["eps"] == 1e-4 and g["initial_lr"] == 1e-3


def _folder(root: Path, names: tuple[str, ...]) -> Path:
    """train/ and val/ of 12x12 colour PNGs, 4 and 1 per class."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("val", 1)):
        for name in names:
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(
                    root / split / name / f"{i}.png")
    return root


def test_resuming_on_other_classes_is_refused(tmp_path: Path) -> None:
    cfg = VisionTrainConfig(model="gmlp_micro4_28", model_kwargs={"in_chans": 3}, dataset="imagefolder",
                            data_root=str(_folder(tmp_path / "a", ("cat", "dog"))), img_size=12, batch_size=4,
                            epochs=1, warmup_steps=1, workers=0, eval_batch_size=4, progress=False, threads=1,
                            tensorboard=False, plot=False, max_steps=1, output=str(tmp_path / "run"))
    train_vision(cfg)
    moved = tmp_path / "moved"
    (tmp_path / "a").rename(moved)  # the same data elsewhere: continued
    moved_cfg = dataclasses.replace(cfg, data_root=str(moved), max_steps=None)
    assert train_vision(moved_cfg, resume=True)["step"] == 2
    other = _folder(tmp_path / "b", ("car", "ship"))
    with pytest.raises(ConfigError, match=r"classes=2 \['cat', 'dog'\] \(now 2 \['car', 'ship'\]\).*other "
                                          r"data \(check --dataset, --data-root"):
        train_vision(dataclasses.replace(cfg, data_root=str(other), max_steps=None), resume=True)


def test_fingerprint_checks() -> None:
    """Which differences :func:`_check_fingerprint` lets through (returned) and which it refuses."""
    cfg = VisionTrainConfig(**TINY)
    path = Path("run")
    # DDP (or one process) on 8 processes resumed on 4, or on 1: the same optimizer-state layout
    assert _check_fingerprint(_fingerprint(cfg, 8), _fingerprint(cfg, 4), path) == {"world_size": (8, 4)}
    assert _check_fingerprint(_fingerprint(cfg, 2), _fingerprint(cfg, 1), path) == {"world_size": (2, 1)}
    fsdp = dataclasses.replace(cfg, strategy="fsdp")
    assert _check_fingerprint(_fingerprint(fsdp, 4), _fingerprint(fsdp, 2), path) == {"world_size": (4, 2)}
    # an FSDP checkpoint (optimizer state keyed by name) cannot go into one process's plain optimizer
    with pytest.raises(ConfigError, match=r"by FSDP.*resume with --strategy fsdp on several processes"):
        _check_fingerprint(_fingerprint(fsdp, 2), _fingerprint(fsdp, 1), path)
    with pytest.raises(ConfigError, match=r"resume with --strategy ddp$"):
        _check_fingerprint(_fingerprint(cfg, 1), _fingerprint(fsdp, 2), path)
    # a checkpoint from before the data was recorded: not compared
    old = _fingerprint(cfg, 1)
    now = {**old, "num_train": 320, "classes": ["0", "1"]}
    assert _check_fingerprint(old, now, path) == {}
    with pytest.raises(ConfigError, match=r"num_train=320 \(now 300\).*other data"):
        _check_fingerprint(now, {**now, "num_train": 300}, path)
    with pytest.raises(ConfigError, match=r"seed=0 \(now 1\).*resume with --seed 0"):
        _check_fingerprint(old, _fingerprint(dataclasses.replace(cfg, seed=1), 1), path)
