"""Process-wide settings a training run changes, handed back to the caller as they were.

A run seeds the global random generators (so that it is reproducible) and may set torch's intra-op thread
count (``threads``). From the command line that is the whole process; called from a user's own process or
notebook, it would change the caller's random streams and thread count for good:
:func:`restoring_process_state` puts them back when the run returns (or raises). :func:`import_timm_optim`
imports ``timm.optim`` without the torch settings its first import changes for the whole process.

Threads: the generators are the whole process's, not a thread's. Blocks of :func:`restoring_process_state`
entered from several threads take turns (a process-wide lock, held for the whole block: a run started
while another thread's run is in progress waits for it to return), so that each run's seeded streams are its
own and each caller gets its streams back. Code outside such a block (a serving thread that samples with
the global generator while another thread trains) is not held back: its draws and the run's then come from
one stream, and when the run returns that stream is rewound to where it was at the run's start. Give such
threads their own ``torch.Generator`` (and ``np.random.Generator``). Model inference in eval mode draws no
random numbers and is unaffected.
"""

from __future__ import annotations

import contextlib
import importlib
import random
import sys
import threading
from collections.abc import Iterator
from types import ModuleType

import numpy as np
import torch

__all__ = ["import_timm_optim", "restoring_process_state"]

#: Held for the whole of a :func:`restoring_process_state` block (re-entrant: a run that calls another run in
#: its own thread, as ``run_comparison`` calls ``train_vision``, does not wait for itself).
_PROCESS_STATE_LOCK = threading.RLock()
#: Held by :func:`import_timm_optim` while it imports and restores: a second thread does not save (and then
#: "restore") the settings that the first thread's import is changing.
_TIMM_IMPORT_LOCK = threading.Lock()


@contextlib.contextmanager
def restoring_process_state() -> Iterator[None]:
    """On exit (by a return or an exception), restore what was in force on entry:

    - torch's intra-op thread count (``torch.set_num_threads``);
    - the state of torch's CPU generator (``torch.manual_seed``), of the CUDA generators of the devices when
      CUDA was initialised before entry (one initialised inside keeps the state the block left), of NumPy's
      global generator (``np.random.seed``) and of Python's ``random``.

    Inside, anything may be set or seeded: the block's own random numbers do not depend on what the caller
    drew before (where the block seeds), and the caller's stream goes on after the block as if it had not run.

    Blocks entered from several threads take turns: one waits until another thread's block has exited (a
    process-wide re-entrant lock; a block nested in the same thread does not wait). Without it, two runs
    started at once seeded and drew from the same global streams (neither was reproducible), and the one
    that returned last "restored" what the other had left in the streams. Code that is not inside such a
    block is not held back: see the module docstring. A block must not wait for a block in another thread
    (that one would wait for it in turn). (torch's thread count is the calling thread's, and the default of
    threads started later, in torch's OpenMP builds: the count set inside is restored for the thread that
    set it.)
    """
    if not _PROCESS_STATE_LOCK.acquire(blocking=False):  # (not silently: say why nothing happens)
        print("[gmlp] waiting for a run in another thread of this process to return (runs in one process "
              "take turns: they share its random generators)", file=sys.stderr, flush=True)
        _PROCESS_STATE_LOCK.acquire()
    try:
        threads = torch.get_num_threads()
        py_state = random.getstate()
        np_state = np.random.get_state()
        cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
        try:
            with torch.random.fork_rng(devices=cuda):
                yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
            if torch.get_num_threads() != threads:
                torch.set_num_threads(threads)
    finally:
        _PROCESS_STATE_LOCK.release()


def import_timm_optim() -> ModuleType:
    """``timm.optim``, imported without the process-wide torch settings its first import makes.

    ``timm/optim/kron.py`` (imported with ``timm.optim``, for its Kron optimizer) sets
    ``torch._dynamo.config.cache_size_limit`` (``recompile_limit``, 8 by default) to 1,000,000, so that the
    caller's ``torch.compile``'d functions recompile for every new shape instead of falling back to eager
    after 8, and, where ``opt_einsum`` is installed, ``torch.backends.opt_einsum.strategy`` to ``"auto-hq"``.
    Both are put back as they were. (A caller who imported ``timm.optim`` before keeps what timm set.)

    Safe from several threads at once: one imports and restores while the others wait, then get the module
    (before, a second thread got the module half-imported, without ``create_optimizer_v2``, or saved the
    recompile limit that the first thread's import had just raised and "restored" it for good).
    """
    with _TIMM_IMPORT_LOCK:
        if "timm.optim" in sys.modules:  # (import_module: waits for an import another thread has begun)
            return importlib.import_module("timm.optim")
        import torch._dynamo.config as dynamo_config  # (timm.optim imports it too)
        import torch.backends.opt_einsum as opt_einsum

        limit, strategy = dynamo_config.recompile_limit, opt_einsum.strategy
        try:
            return importlib.import_module("timm.optim")
        finally:
            dynamo_config.recompile_limit = limit
            if opt_einsum.strategy != strategy:
                with contextlib.suppress(ValueError):  # (refused where opt_einsum is not available)
                    opt_einsum.strategy = strategy
