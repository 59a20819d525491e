"""A multi-process text run whose process 0 is refused the output folder ends in every process (twenty-sixth
session: each process raised only in process 0; the others, with no process group yet to hear of it, waited
for process 0 in the group's rendezvous until the launcher tore them down, or, launched without torchrun's
agent, for the rendezvous timeout: 30 minutes).

The two processes are started by hand with the launcher's variables (``RANK``, ``WORLD_SIZE``,
``MASTER_ADDR``, ``MASTER_PORT``), without torchrun, whose agent would stop process 1 itself once process 0
failed and so hide a process that does not end on its own.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from torchrun_helpers import kill_tree

from gmlp.train.checkpoint import run_lock

TIMEOUT = 90  # seconds; the refusal takes a few (two interpreters importing torch and accelerate)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_every_process_raises_when_process_0_is_refused_the_output(tmp_path: Path) -> None:
    """(``gmlp finetune`` takes its folder through the same wrapper, ``_holding_output``.)"""
    out = tmp_path / "run"
    port = _free_port()
    base = {**os.environ, "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1"}
    argv = [sys.executable, "-m", "gmlp", "pretrain", "--device", "cpu", "--output", str(out)]
    with run_lock(out):  # held by this process: process 0 of the job is refused
        procs = []
        for rank in (0, 1):
            env = {**base, "RANK": str(rank), "LOCAL_RANK": str(rank)}
            procs.append(subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                          text=True))
        deadline = time.monotonic() + TIMEOUT
        results = []
        for proc in procs:
            try:
                results.append(proc.communicate(timeout=max(1.0, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                for p in procs:
                    kill_tree(p.pid)
                pytest.fail(f"process {procs.index(proc)} did not end within {TIMEOUT} s after process 0 was "
                            f"refused the output folder")
    (_, err0), (_, err1) = results
    assert procs[0].returncode == 2 and "is in use by another run" in err0, err0[-3000:]
    assert procs[1].returncode == 2, err1[-3000:]
    assert f"error: process 0 could not take the output folder '{out}'" in err1, err1[-3000:]
    assert "Traceback" not in err1
