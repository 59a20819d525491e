"""Launching ``gmlp`` processes (``torchrun -m gmlp ...`` among them) from tests, and killing them."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest


def torchrun_cmd(*args: str) -> list[str]:
    """``torchrun --standalone --nproc_per_node=2 -m gmlp ARGS`` as an argument list."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "gmlp",
            *args]


def descendants(pid: int) -> list[int]:
    """All processes below ``pid`` (torchrun starts its workers in sessions of their own, so killing its
    process group would not reach them)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and everything below it, all at once (as a node failure would)."""
    for p in [pid, *descendants(pid)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)


def launch(cmd: list[str], env: dict[str, str], cwd: Path, timeout: float) -> tuple[int, str, str]:
    """Run ``cmd`` (a torchrun launch) in ``cwd``: ``(exit status, stdout, stderr)``; past ``timeout`` seconds
    its whole process tree is killed and the test fails with the tails of both outputs."""
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        out, err = proc.communicate()
        pytest.fail(f"torchrun did not finish in {timeout}s (processes out of step?)\n{out[-3000:]}"
                    f"{err[-6000:]}")
    return proc.returncode, out, err


def latest_step(run: Path) -> int:
    """The step of the run's latest complete checkpoint (``checkpoints/latest.json``), or -1."""
    try:
        return json.loads((run / "checkpoints" / "latest.json").read_text())["step"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return -1


def sigkill_after_checkpoint(
    args: list[str], run: Path, step: int, env: dict[str, str], poll: float = 0.01
) -> None:
    """Run ``python -m gmlp ARGS`` (writing to ``run``) and SIGKILL it, as a node failure would, once its
    latest checkpoint has reached ``step``; the test fails if it ends first or takes over 120 s to get
    there."""
    log = run.with_name(f"{run.name}.sigkill.log")  # a file, not a pipe nobody reads while polling
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "gmlp", *args], env=env, stdout=out,
                                stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 120
            while latest_step(run) < step and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(poll)
            assert proc.poll() is None, log.read_text()[-2000:]
            assert latest_step(run) >= step, f"no checkpoint of step {step} within 120 s"
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
