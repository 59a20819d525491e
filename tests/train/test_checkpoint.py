"""gmlp.train.checkpoint: what ``latest.json`` may name, the step a checkpoint is saved under, pruning."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from gmlp.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from gmlp.utils.io import CheckpointError


def _save(run: Path, step: object, keep_last: int = 2) -> Path:
    return save_checkpoint(run, step, {"w": torch.zeros(2)}, {}, {}, keep_last=keep_last)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "content",
    ["[]", "null", "3", '"step-00000003"', '{"step": 3}', '{"tag": 3}', '{"tag": null}', '{"tag": ""}',
     '{"tag": "step-3"}', '{"tag": "../outside"}', '{"tag": "step-00000003/../../outside"}'],
)  # fmt: skip
def test_a_latest_json_that_names_no_checkpoint_is_a_checkpoint_error(tmp_path: Path, content: str) -> None:
    """A corrupt or foreign ``latest.json`` raises CheckpointError naming the file and what it holds (it
    raised TypeError for a list, a null or a number), and its tag is never followed as a path: a folder
    outside the run with a ``state.json`` was resumed from."""
    run = tmp_path / "run"
    _save(run, 3)
    outside = run / "outside"  # ("../outside" from run/checkpoints)
    outside.mkdir()
    (outside / "state.json").write_text(json.dumps({"step": 99}))
    (run / "checkpoints" / "latest.json").write_text(content)
    expected = r"latest\.json is corrupt or foreign: expected .*step-NNNNNNNN"
    with pytest.raises(CheckpointError, match=expected):
        latest_checkpoint(run)
    with pytest.raises(CheckpointError, match="corrupt or foreign"):
        load_checkpoint(run)


def test_a_latest_json_of_undecodable_bytes_is_a_checkpoint_error(tmp_path: Path) -> None:
    _save(tmp_path, 1)
    (tmp_path / "checkpoints" / "latest.json").write_bytes(b"\xff\xfe{")
    with pytest.raises(CheckpointError, match="latest.json is corrupt"):
        latest_checkpoint(tmp_path)


@pytest.mark.parametrize("step", [-1, True, 2.0, "5", None])
def test_save_checkpoint_refuses_a_step_that_is_not_a_count(tmp_path: Path, step: object) -> None:
    """A negative step was saved as ``step--0000001``, True as step 1; floats and strings failed inside
    ``format`` ("Unknown format code 'd'")."""
    expected = rf"step must be an int >= 0 \(completed optimizer steps\), got {step!r}"
    with pytest.raises(ValueError, match=expected):
        _save(tmp_path, step)
    assert not (tmp_path / "checkpoints" / "latest.json").exists()


@pytest.mark.parametrize("keep_last", [0, 1.5, True])
def test_save_checkpoint_refuses_a_keep_last_that_is_not_a_count(tmp_path: Path, keep_last: object) -> None:
    with pytest.raises(ValueError, match=rf"keep_last must be an int >= 1, got {keep_last!r}"):
        _save(tmp_path, 1, keep_last=keep_last)  # type: ignore[arg-type]


def test_a_numpy_integer_step_is_saved_as_an_int(tmp_path: Path) -> None:
    """``np.int64`` steps (a count kept in NumPy) went into state.json and failed json.dumps."""
    path = _save(tmp_path, np.int64(7))
    assert path.name == "step-00000007"
    ckpt = load_checkpoint(tmp_path)
    assert ckpt.state["step"] == 7 and type(ckpt.state["step"]) is int


@pytest.mark.parametrize("keep_last", [1, 2, 3])
def test_pruning_keeps_the_newest_steps_across_a_digit_boundary(tmp_path: Path, keep_last: int) -> None:
    """``keep_last`` keeps the checkpoints of the largest steps: names compared as text put
    ``step-100000000`` before ``step-99999999``, so the older ones survived and newer ones were pruned."""
    steps = [99_999_998, 99_999_999, 100_000_000, 100_000_001]
    for step in steps:
        _save(tmp_path, step, keep_last=keep_last)
    left = sorted(int(p.name[5:]) for p in (tmp_path / "checkpoints").glob("step-*"))
    assert left == steps[-keep_last:]
    assert load_checkpoint(tmp_path).state["step"] == steps[-1]


def test_an_optimizer_file_with_python_objects_is_called_foreign_not_corrupt(tmp_path: Path) -> None:
    """A sound ``optimizer.pt`` holding objects besides tensors (another trainer's, with its argparse
    Namespace) was reported as "truncated or corrupt", with torch's ANSI-coloured advice to load it unsafely
    cut off at 200 characters; the error now names the file and why it is refused (it is never unpickled)."""
    import argparse

    path = _save(tmp_path, 1)
    torch.save({"optimizer": {}, "args": argparse.Namespace(lr=0.1)}, path / "optimizer.pt")
    with pytest.raises(CheckpointError, match=r"optimizer\.pt' safely: besides tensors it holds Python"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize(
    ("damage", "message"),
    [("no optimizer", r"is incomplete: it has no optimizer\.pt"),
     ("garbage optimizer", r"truncated or corrupt: its optimizer\.pt does not load \(\w+Error: "),
     ("garbage state", r"truncated or corrupt: its state\.json does not load \(JSONDecodeError"),
     ("binary state", r"truncated or corrupt: its state\.json does not load \(UnicodeDecodeError")],
)  # fmt: skip
def test_a_damaged_checkpoint_names_the_file_at_fault(tmp_path: Path, damage: str, message: str) -> None:
    path = _save(tmp_path, 1)
    if damage == "no optimizer":  # was "truncated or corrupt: FileNotFoundError"
        (path / "optimizer.pt").unlink()
    elif damage == "garbage optimizer":
        (path / "optimizer.pt").write_bytes(b"not a torch file" * 8)
    elif damage == "garbage state":
        (path / "state.json").write_text('{"step": 1')
    else:
        (path / "state.json").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path)
