"""What gmlp leaves behind in the caller's process: import-time side effects, and the process-wide settings
(random generators, thread count, matplotlib backend, signal handlers, CUDA device, accelerate's state,
torch.compile's config) that a library call changes and must hand back as it found them.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from gmlp.utils.state import import_timm_optim, restoring_process_state
from tiny_text import tiny_classification_files

_ROOT = Path(__file__).resolve().parents[1]


def _draws() -> tuple[list[float], list[float], list[float]]:
    """The next numbers of the three global generators (torch's CPU one, NumPy's, Python's ``random``)."""
    return torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)]


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


@contextlib.contextmanager
def _threads(n: int):
    """Inside: torch runs ``n`` intra-op threads (the test process's own count again after)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# --- import time (a fresh interpreter) -------------------------------------------------------------------

_IMPORT_PROBE = r"""
import io, json, logging, os, sys, warnings, contextlib
import torch
env, filters = dict(os.environ), list(warnings.filters)
handlers, level = list(logging.getLogger().handlers), logging.getLogger().level
threads = torch.get_num_threads()
before = set(sys.modules)
out = io.StringIO()
with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
    import gmlp, gmlp.nn, gmlp.models
    gmlp.create_model  # the lazy names resolve
import gmlp.utils.malloc
print(json.dumps({
    "env": sorted(k for k in set(env) | set(os.environ) if env.get(k) != os.environ.get(k)),
    "filters": len(warnings.filters) - len(filters),
    "handlers": logging.getLogger().handlers != handlers or logging.getLogger().level != level,
    "threads": torch.get_num_threads() != threads,
    "printed": out.getvalue(),
    "heavy": sorted({m.split(".")[0] for m in set(sys.modules) - before}
                    & {"transformers", "timm", "datasets", "matplotlib", "accelerate", "tokenizers",
                       "sklearn", "PIL", "torchvision", "yaml", "tensorboard", "onnx", "scipy", "pandas"}
                    | ({"torch._dynamo"} & set(sys.modules))),
    "malloc_tuned": gmlp.utils.malloc._done,
}))
"""


def test_importing_gmlp_nn_and_models_changes_nothing_and_loads_torch_alone() -> None:
    """``import gmlp, gmlp.nn, gmlp.models`` (and a lazy ``gmlp.create_model``): no environment variable,
    warning filter, logging handler, thread count or allocator setting changed, nothing printed, and no
    optional package (transformers, timm, matplotlib, ...) nor torch.compile's machinery imported."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", _IMPORT_PROBE], cwd=_ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.splitlines()[-1]) == {"env": [], "filters": 0, "handlers": False,
                                                         "threads": False, "printed": "", "heavy": [],
                                                         "malloc_tuned": False}


# --- gmlp.utils.state ------------------------------------------------------------------------------------


@given(seed=st.integers(0, 2**40), inner_seed=st.integers(0, 2**40), inner_threads=st.integers(1, 3),
       raises=st.booleans())
def test_restoring_process_state_hands_back_the_callers_streams_and_threads(
    seed: int, inner_seed: int, inner_threads: int, raises: bool
) -> None:
    """Whatever the block seeds, draws or sets (and whether it raises), the caller's next random numbers are
    those it would have drawn without the block, and its thread count is unchanged."""
    with _threads(1):
        _seed_all(seed)
        expected = _draws()
        _seed_all(seed)
        with contextlib.suppress(RuntimeError), restoring_process_state():
            _seed_all(inner_seed)
            _draws()
            torch.set_num_threads(inner_threads)
            if raises:
                raise RuntimeError("the run failed")
        assert torch.get_num_threads() == 1
        assert _draws() == expected


def test_restoring_process_state_leaves_the_blocks_own_seeding_reproducible() -> None:
    """Inside, a seeded block draws the same numbers whatever the caller drew before (the block is not
    forked from the caller's stream in some other way)."""
    runs = []
    for caller_seed in (1, 2):
        _seed_all(caller_seed)
        with restoring_process_state():
            _seed_all(7)
            runs.append(_draws())
    assert runs[0] == runs[1]


# --- gmlp.viz -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["metrics", "spatial"])
def test_plots_leave_the_matplotlib_backend_and_pyplot_figures_alone(tmp_path: Path, kind: str) -> None:
    """``plot_metrics`` / ``plot_spatial`` (and ``train_vision``'s ``metrics.png``) switched the caller's
    matplotlib backend to Agg (``matplotlib.use``): in a notebook, inline figures stopped showing."""
    import matplotlib
    import matplotlib.pyplot as plt

    from gmlp import create_model, save_model
    from gmlp.viz import plot_metrics, plot_spatial

    backend = matplotlib.get_backend()
    matplotlib.use("svg")  # a backend of the caller's other than Agg
    try:
        figure = plt.figure()
        if kind == "metrics":
            (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n"
                                                            for s in (1, 2, 3)))
            written = plot_metrics(tmp_path, tmp_path / "m.png")
        else:
            save_model(create_model("gmlp_micro4_28"), tmp_path / "model.safetensors")
            written = plot_spatial(tmp_path / "model.safetensors", tmp_path / "w.png", rows=2)
        assert written.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert matplotlib.get_backend() == "svg"
        assert plt.get_fignums() == [figure.number]  # none of gmlp's left open in pyplot, the caller's kept
        plt.close(figure)
    finally:
        matplotlib.use(backend)


# --- gmlp.train.vision_tools ------------------------------------------------------------------------------


def test_measure_throughput_keeps_the_models_mode_and_the_callers_random_stream() -> None:
    from gmlp import create_model
    from gmlp.train.vision_tools import measure_throughput

    model = create_model("gmlp_micro4_28").train()
    _seed_all(3)
    expected = _draws()
    _seed_all(3)
    assert measure_throughput(model, (1, 28, 28), batch_size=2, seconds=0.0) > 0
    assert model.training  # it was left in eval mode
    assert _draws() == expected  # its input came from the global generator


def test_count_macs_restores_the_training_mode_when_the_model_refuses_the_input() -> None:
    from gmlp import create_model
    from gmlp.train.vision_tools import count_macs

    model = create_model("gmlp_micro4_28").train()
    with pytest.raises(ValueError):
        count_macs(model, (1, 32, 32))  # built for 28 x 28
    assert model.training


# --- gmlp.train.compare -------------------------------------------------------------------------------------


def test_run_comparison_hands_back_the_callers_random_stream_and_threads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It seeded torch's global generator (to build the gMLP it sizes the ViT by) and, through the two
    runs, all three generators and the thread count, and left them so; also when it fails midway."""
    from gmlp.train import compare

    def failing_size_vit(*args: Any, **kwargs: Any) -> Any:
        torch.set_num_threads(2)
        raise RuntimeError("stop here")

    monkeypatch.setattr(compare, "size_vit", failing_size_vit)
    with _threads(1):
        _seed_all(11)
        expected = _draws()
        _seed_all(11)
        with pytest.raises(RuntimeError, match="stop here"):
            compare.run_comparison(tmp_path, dataset="digits", gmlp_model="gmlp_micro4_28", train_subset=64,
                                   test_subset=32, epochs=1)
        assert torch.get_num_threads() == 1
    assert _draws() == expected


# --- gmlp.train.distributed -------------------------------------------------------------------------------


@pytest.mark.parametrize("current", [0, 1])
def test_a_single_process_cuda_run_hands_back_the_callers_current_cuda_device(
    monkeypatch: pytest.MonkeyPatch, current: int
) -> None:
    """``init_distributed`` makes ``cuda:LOCAL_RANK`` current (``cuda:0`` in one process); ``shutdown`` made
    no other device current again: a caller on ``cuda:1`` found itself on ``cuda:0`` after training."""
    from gmlp.train import distributed

    calls: list[Any] = []
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current)
    monkeypatch.setattr(torch.cuda, "set_device", calls.append)
    env = distributed.init_distributed("cuda")
    assert env.device == torch.device("cuda", 0) and calls == [torch.device("cuda", 0)]
    distributed.shutdown(env)
    assert calls == [torch.device("cuda", 0)] + ([current] if current != 0 else [])


# --- gmlp.train.vision.train_vision -----------------------------------------------------------------------


# A subnormal double and one, as names (a product of literals is folded at compile time): their product is
# 0 only while the thread flushes subnormals (the FTZ/DAZ bits `torch.set_flush_denormal` sets; no getter)
_SUBNORMAL, _ONE = 5e-324, 1.0


def _state() -> dict[str, Any]:
    sig = (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM))
    return {"threads": torch.get_num_threads(), "grad": torch.is_grad_enabled(), "signals": sig,
            "dtype": torch.get_default_dtype(), "cwd": os.getcwd(), "path": list(sys.path),
            "env": dict(os.environ), "deterministic": torch.are_deterministic_algorithms_enabled(),
            "flush_denormal": _SUBNORMAL * _ONE == 0.0,
            "matmul_precision": torch.get_float32_matmul_precision()}


@pytest.fixture(scope="module")
def vision_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One tiny ``train_vision`` (``threads=2``) called with one thread: the state and next random numbers of
    the caller before and after it. ``timm.optim`` is imported afresh by the run (as in a new process, where
    the first import is the one that changes torch.compile's config), with the caller's recompile limit 8."""
    import sklearn.datasets  # noqa: F401  (its import sets KMP_* variables: not gmlp's doing)
    # (imports torch._inductor, which sets TORCHINDUCTOR_CACHE_DIR; a plain first `import timm.optim` here
    # would also set the recompile limit to 1,000,000 for good: the `limit` read below)
    import_timm_optim()
    import torch._dynamo.config as dynamo_config

    from gmlp.train.vision import VisionTrainConfig, train_vision

    config = VisionTrainConfig(model="gmlp_micro4_28", dataset="digits", batch_size=32, epochs=1,
                               warmup_steps=0, augment=False, progress=False, train_subset=32, test_subset=32,
                               threads=2, plot=False, output=str(tmp_path_factory.mktemp("vision") / "run"))
    limit = dynamo_config.recompile_limit
    with _threads(1), pytest.MonkeyPatch.context() as mp:
        for name in [m for m in sys.modules if m == "timm.optim" or m.startswith("timm.optim.")]:
            mp.delitem(sys.modules, name)  # (put back on exit)
        # the fresh import rebinds the package's attribute too: put back on exit, else a later test's
        # `import timm.optim` (the attribute) and the run's (sys.modules) are two modules
        mp.setattr(sys.modules["timm"], "optim", sys.modules["timm"].optim)
        dynamo_config.recompile_limit = 8
        _seed_all(5)
        expected = _draws()
        _seed_all(5)
        before = _state()
        try:
            train_vision(config)
            after = _state()
            after["recompile_limit"] = dynamo_config.recompile_limit
        finally:
            dynamo_config.recompile_limit = limit
        after["draws"], before["draws"], before["recompile_limit"] = _draws(), expected, 8
    return {"before": before, "after": after}


@pytest.mark.parametrize("what", ["grad", "signals", "dtype", "cwd", "path", "env", "deterministic",
                                  "flush_denormal", "matmul_precision"])
def test_train_vision_leaves_the_process_settings_alone(vision_run: dict[str, Any], what: str) -> None:
    assert vision_run["after"][what] == vision_run["before"][what]


def test_train_vision_hands_back_the_callers_thread_count(vision_run: dict[str, Any]) -> None:
    """``threads=2`` called ``torch.set_num_threads(2)`` and left it so for the rest of the caller's
    process."""
    assert vision_run["after"]["threads"] == vision_run["before"]["threads"] == 1


def test_train_vision_hands_back_the_callers_random_streams(vision_run: dict[str, Any]) -> None:
    """The run seeds torch's, NumPy's and Python's global generators (``seed``) and left them at the run's
    last step: the caller's next random numbers depended on the run."""
    assert vision_run["after"]["draws"] == vision_run["before"]["draws"]


def test_train_vision_leaves_torch_compiles_recompile_limit_alone(vision_run: dict[str, Any]) -> None:
    """Importing ``timm.optim`` (for ``create_optimizer_v2``) sets ``torch._dynamo.config.cache_size_limit``
    (``recompile_limit``) to 1,000,000 for the whole process (timm/optim/kron.py): the caller's compiled
    functions then recompile for every new shape instead of falling back to eager after 8."""
    assert vision_run["after"]["recompile_limit"] == vision_run["before"]["recompile_limit"]


# --- gmlp.train.text: pretrain / finetune -----------------------------------------------------------------


@pytest.fixture(scope="module")
def finetune_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One tiny ``finetune`` in the main thread (the caller's state before and after it), then one in another
    thread; and whether the caller can then start an ``Accelerator`` of its own with other settings."""
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    import torch._inductor.config  # noqa: F401  (its import sets TORCHINDUCTOR_CACHE_DIR: not gmlp's doing)
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from gmlp.train.text import FinetuneConfig, finetune

    root = tmp_path_factory.mktemp("text")
    tok, data = tiny_classification_files(root)

    def run(name: str) -> dict[str, Any]:
        return finetune(FinetuneConfig(output=str(root / name), train_file=str(data),
                                       validation_file=str(data), steps=1, tokenizer=str(tok), layers=1,
                                       hidden=16, ffn=32, seq_len=16, batch_size=4, device="cpu",
                                       progress=False, save_every=0))

    AcceleratorState._reset_state(reset_partial_state=True)  # as in a new process (earlier tests set it)
    _seed_all(9)
    expected = _draws()
    _seed_all(9)
    before = _state()
    first = run("main")
    after = _state()
    after["draws"], before["draws"] = _draws(), expected
    try:
        Accelerator(cpu=True, mixed_precision="bf16")
        accelerator_error = None
    except ValueError as err:  # "AcceleratorState has already been initialized and cannot be changed"
        accelerator_error = str(err)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    results: dict[str, Any] = {}
    worker = threading.Thread(target=lambda: results.setdefault("thread", run("thread")))
    worker.start()
    worker.join()
    return {"before": before, "after": after, "first": first, "thread": results.get("thread"),
            "accelerator_error": accelerator_error}


@pytest.mark.parametrize(
    "what", ["threads", "grad", "signals", "dtype", "cwd", "path", "env", "deterministic", "flush_denormal",
             "matmul_precision"]
)
def test_finetune_leaves_the_process_settings_alone(finetune_run: dict[str, Any], what: str) -> None:
    """Among them the SIGINT/SIGTERM handlers it installs while it trains."""
    assert finetune_run["after"][what] == finetune_run["before"][what]


def test_finetune_runs_outside_the_main_thread_with_the_same_result(finetune_run: dict[str, Any]) -> None:
    """``signal.signal`` works in the main thread only: elsewhere the run goes without its stop-on-signal
    handlers, and computes the same thing."""
    assert finetune_run["thread"] is not None
    assert finetune_run["thread"]["test"] == finetune_run["first"]["test"]


def test_finetune_hands_back_the_callers_random_streams(finetune_run: dict[str, Any]) -> None:
    """The run seeds torch's global generator (init, dropout) and left it at its last step."""
    assert finetune_run["after"]["draws"] == finetune_run["before"]["draws"]


def test_after_finetune_the_caller_can_start_its_own_accelerator(finetune_run: dict[str, Any]) -> None:
    """accelerate's ``AcceleratorState`` is process-wide; the run left it initialised with its own settings,
    so the caller's ``Accelerator(mixed_precision="bf16")`` failed with "AcceleratorState has already been
    initialized and cannot be changed, restart your runtime completely"."""
    assert finetune_run["accelerator_error"] is None
