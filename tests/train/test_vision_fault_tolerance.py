"""A real ``gmlp train`` process SIGKILLed mid-epoch resumes to exactly the uninterrupted result; checkpoint
pruning keeps the last K and never the only good one."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from torchrun_helpers import sigkill_after_checkpoint

from gmlp.cli import main
from gmlp.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from gmlp.utils.io import load_state_dict_file

# 5 steps per epoch; 1000 epochs so that the process is surely still running when it is killed
ARGS = [
    "--model",
    "gmlp_micro4_28",
    "--dataset",
    "digits",
    "--epochs",
    "1000",
    "--batch-size",
    "64",
    "--warmup-steps",
    "3",
    "--train-subset",
    "320",
    "--test-subset",
    "64",
    "--no-progress",
    "--threads",
    "1",
    "--checkpoint-every",
    "3",
    "--keep-last",
    "2",
    "--drop-path-rate",
    "0.1",
    "--no-tensorboard",
    "--no-plot",
]


def test_sigkill_mid_epoch_then_resume_equals_uninterrupted(tmp_path: Path) -> None:
    run = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    sigkill_after_checkpoint(["train", *ARGS, "--output", str(run)], run, 7, env)
    step = load_checkpoint(run).state["step"]
    stop = step + 7  # finish mid-epoch, a few steps past the checkpoint
    assert step >= 7

    assert main(["train", *ARGS, "--output", str(run), "--resume", "--max-steps", str(stop)]) == 0
    assert main(["train", *ARGS, "--output", str(tmp_path / "straight"), "--max-steps", str(stop)]) == 0
    a = load_state_dict_file(run / "model.safetensors")[0]
    b = load_state_dict_file(tmp_path / "straight" / "model.safetensors")[0]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    # the same samples in the same order: identical per-epoch records (train loss sums every sample's loss)
    strip = lambda path: [
        {k: v for k, v in json.loads(x).items() if k != "epoch_seconds"}  # noqa: E731
        for x in path.read_text().splitlines()
    ]
    assert strip(run / "metrics.jsonl") == strip(tmp_path / "straight" / "metrics.jsonl")
    assert [r["epoch"] for r in strip(run / "metrics.jsonl")] == list(range(1, stop // 5 + 1))
    assert len(list((run / "checkpoints").glob("step-*"))) <= 2 and not list(
        (run / "checkpoints").glob(".step-*")
    )


def _save(run: Path, step: int, keep_last: int) -> Path:
    return save_checkpoint(
        run,
        step,
        {"w": torch.full((2,), float(step))},
        {"optimizer": {}},
        {"loss": step},
        keep_last=keep_last,
    )


def test_keep_last_prunes_old_checkpoints(tmp_path: Path) -> None:
    for step in range(1, 6):
        _save(tmp_path, step, keep_last=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*")) == [
        "step-00000004",
        "step-00000005",
    ]
    assert latest_checkpoint(tmp_path).name == "step-00000005"
    assert load_checkpoint(tmp_path).model["w"][0].item() == 5


def test_pruning_never_deletes_the_only_good_checkpoint(tmp_path: Path) -> None:
    # a run killed while writing step 9 leaves a temporary directory, and a newer-named stale checkpoint from
    # before a resume may exist: with keep_last=1 the one latest.json names must survive
    _save(tmp_path, 3, keep_last=1)
    (tmp_path / "checkpoints" / ".step-00000009.abc.tmp").mkdir()
    stale = tmp_path / "checkpoints" / "step-00000008"
    stale.mkdir()
    _save(tmp_path, 4, keep_last=1)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert "step-00000004" in names and not any(n.startswith(".step-") for n in names)
    assert latest_checkpoint(tmp_path).name == "step-00000004"
    assert load_checkpoint(tmp_path).model["w"][0].item() == 4
    _save(tmp_path, 4, keep_last=1)  # the same step again (a resumed run re-saving): swapped, never absent
    assert load_checkpoint(tmp_path).model["w"][0].item() == 4
    with pytest.raises(ValueError, match="keep_last"):
        _save(tmp_path, 5, keep_last=0)


def test_overwrite_removes_the_old_run_only_after_every_process_has_looked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under DDP every process reads latest.json while process 0 removes the old run for --overwrite: with
    no barrier between, another process failed with FileNotFoundError (3 times in 200 under torchrun)."""
    import gmlp.train.text as text
    import gmlp.train.vision as vision
    from gmlp.train.distributed import DistEnv

    save_checkpoint(tmp_path, 1, {"w": torch.ones(2)}, {}, {})
    calls: list[str] = []
    real_latest = vision.latest_checkpoint
    monkeypatch.setattr(vision, "latest_checkpoint", lambda out: calls.append("look") or real_latest(out))
    monkeypatch.setattr(vision, "barrier", lambda env: calls.append("barrier"))
    monkeypatch.setattr(vision, "remove_run_files", lambda out, names: calls.append("remove"))
    env = DistEnv(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"))
    vision._start_fresh(tmp_path, True, env)
    assert calls == ["look", "barrier", "remove", "barrier"]

    class Accelerator:
        is_main_process = True

        def wait_for_everyone(self) -> None:
            calls.append("barrier")

    calls.clear()
    monkeypatch.setattr(text, "latest_checkpoint", lambda out: calls.append("look") or real_latest(out))
    monkeypatch.setattr(text, "remove_run_files", lambda out, names: calls.append("remove"))
    opts = text.PretrainConfig(output=str(tmp_path), overwrite=True)
    assert text._prepare_output(tmp_path, opts, Accelerator(), "pretrain") is None
    assert calls[:3] == ["look", "barrier", "remove"]
