"""``gmlp.train.distributed.holding_output``: the run-folder lock that ``train_vision`` and the text commands
(``pretrain``, ``finetune``) share. In one interpreter: the collective is a stand-in callable; the
multi-process runs are in test_file_system_faults.py (vision) and test_text_output_refusal.py (text)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch.distributed as dist

from gmlp.train.checkpoint import run_lock
from gmlp.train.distributed import holding_output
from gmlp.train.recipe import ConfigError


@pytest.fixture
def destroyed(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The calls of ``torch.distributed.destroy_process_group`` (recorded, not made)."""
    calls: list[int] = []
    monkeypatch.setattr(dist, "destroy_process_group", lambda *args: calls.append(1))
    return calls


@pytest.mark.parametrize("reduced", [False, True])
def test_process_0_holds_the_folder_while_the_block_runs(tmp_path: Path, destroyed: list[int],
                                                         reduced: bool) -> None:
    out = tmp_path / "run"
    seen: list[bool] = []
    any_refused = (lambda refused: seen.append(refused) or refused) if reduced else None
    with holding_output(out, True, any_refused, destroy_group=True), \
            pytest.raises(ConfigError, match="in use by another run"), run_lock(out):
        pass
    assert seen == ([False] if reduced else [])
    assert destroyed == []
    with run_lock(out):  # released when the block ends
        pass


@pytest.mark.parametrize("destroy_group", [False, True])
def test_a_refused_process_0_raises_its_own_error_and_the_others_name_the_folder(
    tmp_path: Path, destroyed: list[int], destroy_group: bool
) -> None:
    out = str(tmp_path / "run")
    entered: list[bool] = []
    with run_lock(out):  # another run holds the folder
        with pytest.raises(ConfigError, match="in use by another run"), \
                holding_output(out, True, lambda refused: refused, destroy_group=destroy_group):
            entered.append(True)
        with pytest.raises(ConfigError, match=rf"^process 0 could not take the output folder {out!r} "), \
                holding_output(out, False, lambda refused: True, destroy_group=destroy_group):
            entered.append(True)
    assert entered == []
    assert len(destroyed) == (2 if destroy_group else 0)


def test_one_process_reduces_nothing_and_keeps_the_group(tmp_path: Path, destroyed: list[int]) -> None:
    """``any_refused=None`` (one process): the lock's own error, and no group destroyed."""
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(ConfigError, match="is a file"), holding_output(afile, True, None, destroy_group=True):
        pass
    assert destroyed == []


def test_an_unwritable_folder_is_refused_with_its_os_error(tmp_path: Path, destroyed: list[int],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """(``os.open`` refused as for a read-only folder: a test run as root writes anywhere.)"""
    out = tmp_path / "run"

    def read_only(path: str | os.PathLike[str], *args: object, **kwargs: object) -> int:
        raise PermissionError(13, "Permission denied", os.fspath(path))

    monkeypatch.setattr(os, "open", read_only)
    with pytest.raises(PermissionError, match="Permission denied"), \
            holding_output(out, True, lambda refused: refused):
        pass
    assert destroyed == []


def test_only_process_0_takes_the_lock(tmp_path: Path, destroyed: list[int]) -> None:
    """The other processes never touch the folder: held by another run, they go on if process 0 did."""
    out = tmp_path / "run"
    with run_lock(out), holding_output(out, False, lambda refused: refused, destroy_group=True):
        pass
    assert destroyed == []
