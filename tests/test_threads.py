"""One model object called from several threads at once (a server's thread pool), and the process-wide state
that library calls change and restore while other threads run.

Every concurrent result is compared with the same call made serially, value for value. Races are not left to
chance: where an interleaving matters, a patched function waits on a ``threading.Event`` so that the other
thread runs at exactly that point. Worker threads set one intra-op thread (as the suite's main thread does),
so the serial and the concurrent calls sum in the same order.
"""

from __future__ import annotations

import contextlib
import random
import sys
import threading
import types
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
import torch

from gmlp.utils import state

_WAIT = 10.0  # seconds: only reached if a test is broken (a wait that should have been released)


def _one_thread() -> None:
    torch.set_num_threads(1)


def _serial_and_concurrent(fn: Callable[[Any], tuple[torch.Tensor, ...]], jobs: list[Any], workers: int = 6,
                           rounds: int = 2) -> None:
    """Run ``fn`` on every job serially (one worker thread), then ``rounds`` times on ``workers`` threads at
    once, in a shuffled order; every concurrent output must equal the serial one exactly."""
    with ThreadPoolExecutor(1, initializer=_one_thread) as pool:
        expected = list(pool.map(fn, jobs))
    for r in range(rounds):
        order = list(range(len(jobs)))
        random.Random(r).shuffle(order)
        with ThreadPoolExecutor(workers, initializer=_one_thread) as pool:
            futures = {i: pool.submit(fn, jobs[i]) for i in order}
            for i, future in futures.items():
                got = future.result(timeout=60)
                assert len(got) == len(expected[i])
                for a, b in zip(got, expected[i], strict=True):
                    assert torch.equal(a, b), f"job {jobs[i]!r} differs from the serial call"


# --- models called from several threads -------------------------------------------------------------------


def test_vision_fast_paths_from_threads_in_mixed_modes_match_serial_calls() -> None:
    """gMLP and aMLP vision models shared by six threads, with batch sizes and modes (inference mode, no_grad,
    a gradient, bf16 autocast, float64) mixed between threads: the in-place residual and gating, the oneDNN
    products and autocast (thread-local in torch) see different states at the same time."""
    from gmlp.models.vision import GMLPVision

    torch.manual_seed(0)
    models = {}
    for attn in (None, 4):
        m = GMLPVision(img_size=8, patch_size=2, in_chans=1, num_classes=3, embed_dim=8, depth=2, mlp_ratio=2,
                       attn_dim=attn).eval()
        for p in m.parameters():
            p.data.normal_(0, 0.3)  # (not the near-identity init: every path must change the output)
        models[attn] = (m, GMLPVision(img_size=8, patch_size=2, in_chans=1, num_classes=3, embed_dim=8,
                                      depth=2, mlp_ratio=2, attn_dim=attn).double().eval())
        models[attn][1].load_state_dict(m.state_dict())
    gen = torch.Generator().manual_seed(1)
    modes = ("inference", "no_grad", "grad", "bf16", "float64")
    jobs = [(attn, b, mode) for attn in models for b in (1, 3) for mode in modes]
    images = {job: torch.randn(job[1], 1, 8, 8, generator=gen) for job in jobs}

    def call(job: tuple[Any, int, str]) -> tuple[torch.Tensor, ...]:
        attn, _, mode = job
        model, model64 = models[attn]
        x = images[job]
        if mode == "inference":
            with torch.inference_mode():
                return (model(x),)
        if mode == "float64":
            with torch.no_grad():
                return (model64(x.double()),)
        if mode in ("no_grad", "bf16"):
            ctx = torch.autocast("cpu", torch.bfloat16) if mode == "bf16" else contextlib.nullcontext()
            with torch.no_grad(), ctx:
                return (model(x),)
        x = x.clone().requires_grad_()
        y = model(x)
        return y.detach(), torch.autograd.grad(y.square().sum(), x)[0]

    _serial_and_concurrent(call, jobs)


def _text_model(**kwargs: Any) -> Any:
    from gmlp.models.text import GMLPConfig, GMLPModel

    torch.manual_seed(0)
    config = GMLPConfig(vocab_size=40, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
                        max_position_embeddings=16, spatial_init_std=0.2, **kwargs)
    return GMLPModel(config).eval()


def _padded(n: int, kind: str, batch: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
    ids = torch.randint(5, 40, (batch, n), generator=gen)
    if kind == "none":
        return ids, None
    mask = torch.ones(batch, n, dtype=torch.long)
    pads = min(n - 1, 2)
    if kind == "right":
        mask[:, n - pads:] = 0
    elif kind == "left":
        mask[:, :pads] = 0
    else:  # inner
        mask[:, 1:1 + pads] = 0
    return ids, mask


@pytest.mark.parametrize("kwargs", [{"toeplitz": True, "spatial_fft_threshold": 8}, {"causal": True},
                                    {"toeplitz": False, "sgu_heads": 2}], ids=["fft", "causal", "heads"])
def test_text_models_from_threads_with_every_padding_layout_match_serial_calls(
    kwargs: dict[str, Any],
) -> None:
    """Text models shared by six threads, with lengths on both sides of the FFT threshold and the mask-layout
    shortcuts (no mask, all real, right, left and inner padding: the gather to kept-first order) taken by
    different threads at the same time."""
    model = _text_model(**kwargs)
    gen = torch.Generator().manual_seed(2)
    kinds = ("none", "right", "left", "inner")
    jobs = [(n, kind, b) for n in (1, 7, 8, 9, 16) for kind in kinds for b in (1, 2)]
    inputs = {job: _padded(*job, gen) for job in jobs}

    def call(job: tuple[int, str, int]) -> tuple[torch.Tensor, ...]:
        ids, mask = inputs[job]
        with torch.inference_mode():
            h = model(ids, attention_mask=mask).last_hidden_state
        return (h if mask is None else h * mask[..., None],)  # (outputs at pads are unspecified)

    _serial_and_concurrent(call, jobs)


def _paused_map_call(model: Any, monkeypatch: pytest.MonkeyPatch, during: Callable[[], None]) -> list[Any]:
    """Call ``model`` with ``output_attentions=True`` (left padding) in a thread that pauses at its first
    attention map, with its hooks on every block's tiny attention; run ``during()`` in this thread at that
    point, then let the call finish. Returns [its maps, the same call's maps made alone]."""
    import gmlp.models.text.modeling_gmlp as modeling

    gen = torch.Generator().manual_seed(3)
    ids, mask = _padded(9, "left", 2, gen)
    with torch.inference_mode():
        alone = model(ids, attention_mask=mask, output_attentions=True).attentions
    paused, resume = threading.Event(), threading.Event()
    probs = modeling._attention_probs

    def pausing(module: Any, x: torch.Tensor, block_mask: Any) -> torch.Tensor:
        if threading.current_thread().name == "maps" and not paused.is_set():
            paused.set()
            resume.wait(_WAIT)
        return probs(module, x, block_mask)

    monkeypatch.setattr(modeling, "_attention_probs", pausing)
    result: dict[str, Any] = {}

    def maps_call() -> None:
        torch.set_num_threads(1)
        with torch.inference_mode():
            result["maps"] = model(ids, attention_mask=mask, output_attentions=True).attentions

    thread = threading.Thread(target=maps_call, name="maps")
    thread.start()
    try:
        assert paused.wait(_WAIT)
        during()
    finally:
        resume.set()
        thread.join(_WAIT)
    return [result.get("maps"), alone]


def test_plain_text_calls_beside_a_call_that_returns_attention_maps_match_serial_calls(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """While one thread's call records the aMLP attention maps (forward hooks on the shared tiny attentions),
    plain calls of other lengths and paddings in other threads ran its hooks: the plain calls failed (the
    hook gathered their maps with the first call's token order: "The expanded size of the tensor ... must
    match") or added their maps to the first call's. Each now gets exactly what it gets alone."""
    model = _text_model(tiny_attn_size=4)
    gen = torch.Generator().manual_seed(4)
    plain = [_padded(n, kind, 3, gen) for n, kind in ((5, "none"), (13, "left"), (7, "inner"))]
    with torch.inference_mode():
        expected = [model(ids, attention_mask=mask).last_hidden_state for ids, mask in plain]
    got: list[torch.Tensor] = []

    def plain_calls() -> None:
        with torch.inference_mode():
            got.extend(model(ids, attention_mask=mask).last_hidden_state for ids, mask in plain)

    maps, alone = _paused_map_call(model, monkeypatch, plain_calls)
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
    assert maps is not None and len(maps) == len(alone)
    assert all(torch.equal(a, b) for a, b in zip(maps, alone, strict=True))


def test_a_plain_call_while_torch_adds_or_removes_the_map_hooks_is_unaffected(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """torch's ``register_forward_hook(..., with_kwargs=True)`` adds the hook first and marks it as taking
    keyword arguments next (``RemovableHandle.remove`` unmarks after removing): a call of the shared module in
    another thread between the two runs the hook as ``hook(module, args, output)``. The recording hook took
    four arguments and failed such a call with a TypeError. The state between the two updates is set here
    by hand."""
    model = _text_model(tiny_attn_size=4)
    ids, mask = _padded(6, "right", 2, torch.Generator().manual_seed(5))
    with torch.inference_mode():
        expected = model(ids, attention_mask=mask).last_hidden_state
    got: list[torch.Tensor] = []

    def plain_call_between_the_two_updates() -> None:
        attns = [block.tiny_attn for block in model.blocks]
        marked = [dict(a._forward_hooks_with_kwargs) for a in attns]
        try:
            for a in attns:
                a._forward_hooks_with_kwargs.clear()
            with torch.inference_mode():
                got.append(model(ids, attention_mask=mask).last_hidden_state)
        finally:
            for a, m in zip(attns, marked, strict=True):
                a._forward_hooks_with_kwargs.update(m)

    maps, alone = _paused_map_call(model, monkeypatch, plain_call_between_the_two_updates)
    assert len(got) == 1 and torch.equal(got[0], expected)
    assert maps is not None and all(torch.equal(a, b) for a, b in zip(maps, alone, strict=True))


def test_causal_generation_from_threads_matches_serial_generation() -> None:
    """``generate()`` (greedy) of one causal model from six threads, prompts of other lengths and paddings."""
    import warnings

    from gmlp.models.text import GMLPConfig, GMLPForCausalLM

    torch.manual_seed(0)
    config = GMLPConfig(vocab_size=40, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
                        max_position_embeddings=16, causal=True, is_decoder=True, spatial_init_std=0.3,
                        pad_token_id=0, eos_token_id=None)
    model = GMLPForCausalLM(config).eval()
    gen = torch.Generator().manual_seed(6)
    jobs = [(n, kind) for n in (2, 4, 6) for kind in ("none", "left", "inner")]
    prompts = {job: _padded(job[0], job[1], 2, gen) for job in jobs}

    def call(job: tuple[int, str]) -> tuple[torch.Tensor, ...]:
        ids, mask = prompts[job]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return (model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False),)

    _serial_and_concurrent(call, jobs, rounds=1)


# --- gmlp.utils.state ------------------------------------------------------------------------------------


def _seeded_run(seed: int, entered: threading.Event | None, proceed: threading.Event | None,
                out: dict[int, Any]) -> None:
    """A training run's use of the process state: seed, draw, (wait), draw more."""
    with state.restoring_process_state():
        torch.manual_seed(seed)
        np.random.seed(seed)
        random.seed(seed)
        first = torch.rand(3)
        if entered is not None and proceed is not None:
            entered.set()
            proceed.wait(_WAIT)
        rest = (torch.rand(3), torch.from_numpy(np.random.rand(3)), torch.tensor([random.random()]))
        out[seed] = (first, *rest)


def test_restoring_process_state_blocks_from_two_threads_take_turns(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Two runs (``train_vision``, ``finetune``, ...) started from two threads at once: the second seeded the
    global generators while the first was drawing from them (neither run was reproducible), and the one that
    exited last "restored" the streams to what the other had left in them. Now the second waits until the
    first has exited, saying so: each run draws what it draws alone, and the caller's streams go on as if
    neither ran."""
    serial: dict[int, Any] = {}
    for seed in (1, 2):
        _seeded_run(seed, None, None, serial)
    torch.manual_seed(123)
    np.random.seed(123)
    random.seed(123)
    caller = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    out: dict[int, Any] = {}
    entered1, proceed1, entered2, proceed2 = (threading.Event() for _ in range(4))
    first = threading.Thread(target=_seeded_run, args=(1, entered1, proceed1, out))
    second = threading.Thread(target=_seeded_run, args=(2, entered2, proceed2, out))
    first.start()
    try:
        assert entered1.wait(_WAIT)
        second.start()
        entered2.wait(0.3)  # (the old code: the second run is inside at once; now it waits for the first)
        proceed1.set()  # the first run draws the rest, and exits, while the second (old code) is inside
        first.join(_WAIT)
    finally:
        proceed1.set()
        proceed2.set()
        first.join(_WAIT)
        if second.ident is not None:
            second.join(_WAIT)
    for seed in (1, 2):
        assert all(torch.equal(a, b) for a, b in zip(out[seed], serial[seed], strict=True)), seed
    assert torch.equal(torch.get_rng_state(), caller[0])
    assert (np.random.get_state()[1] == caller[1]).all()
    assert random.getstate() == caller[2]
    assert capsys.readouterr().err.count("waiting for a run in another thread") == 1


def test_restoring_process_state_nested_in_one_thread_does_not_wait_for_itself() -> None:
    """``run_comparison`` (a block) calls ``train_vision`` (a block) in the same thread: the lock that makes
    threads take turns is re-entrant."""
    done = threading.Event()

    def nested() -> None:
        with state.restoring_process_state(), state.restoring_process_state():
            done.set()

    thread = threading.Thread(target=nested, daemon=True)  # (a deadlock must not hang the suite)
    thread.start()
    thread.join(_WAIT)
    assert done.is_set()


@pytest.fixture
def fresh_timm_optim(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    """``timm.optim`` not imported yet, and an import of it that takes a while: it puts the module in
    ``sys.modules`` first, then raises torch.compile's recompile limit (as ``timm/optim/kron.py`` does), waits
    for ``release``, and only then defines ``create_optimizer_v2``."""
    import importlib

    import torch._dynamo.config as dynamo_config

    for name in [m for m in sys.modules if m == "timm.optim" or m.startswith("timm.optim.")]:
        monkeypatch.delitem(sys.modules, name)
    limit = dynamo_config.recompile_limit  # (put back by hand: monkeypatch's undo hides a config entry)
    dynamo_config.recompile_limit = 8
    events = {"started": threading.Event(), "release": threading.Event()}
    real_import = importlib.import_module

    def slow_import(name: str, package: str | None = None) -> Any:
        if name != "timm.optim":
            return real_import(name, package)
        if name in sys.modules:
            return sys.modules[name]
        module = types.ModuleType(name)
        sys.modules[name] = module
        dynamo_config.recompile_limit = 1_000_000
        events["started"].set()
        events["release"].wait(_WAIT)
        module.create_optimizer_v2 = lambda *a, **k: None  # type: ignore[attr-defined]
        return module

    monkeypatch.setattr(importlib, "import_module", slow_import)
    try:
        yield events
    finally:
        events["release"].set()
        dynamo_config.recompile_limit = limit
        sys.modules.pop("timm.optim", None)  # the stand-in (monkeypatch then puts back a real one)


def test_import_timm_optim_from_two_threads_gives_the_whole_module_and_restores_the_limit(
    fresh_timm_optim: dict[str, Any],
) -> None:
    """A second thread calling ``import_timm_optim`` while the first was importing got the half-imported
    module (no ``create_optimizer_v2`` yet), or saved the recompile limit the first import had just raised
    and "restored" it for good. Now it waits for the first."""
    import torch._dynamo.config as dynamo_config

    results: dict[str, bool] = {}

    def importer(name: str) -> None:
        results[name] = hasattr(state.import_timm_optim(), "create_optimizer_v2")  # (as it returns)

    first = threading.Thread(target=importer, args=("first",))
    second = threading.Thread(target=importer, args=("second",))
    first.start()
    try:
        assert fresh_timm_optim["started"].wait(_WAIT)
        second.start()
        second.join(0.3)  # (the old code: returns at once, with the half-imported module)
    finally:
        fresh_timm_optim["release"].set()
        first.join(_WAIT)
        if second.ident is not None:
            second.join(_WAIT)
    assert results == {"first": True, "second": True}
    assert dynamo_config.recompile_limit == 8
