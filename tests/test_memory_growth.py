"""What a long-lived process (a server, a notebook) accumulates from gmlp: live tensors after repeated forward
and backward calls, hooks left on the modules, objects, threads and worker processes left by repeated training
runs, torch.compile recompilations as the input's shape changes, and stale derived state after the weights
change.

Growth is measured by counts (live tensors, gc-tracked objects, compiled graphs), not by the noisy RSS,
after a warm-up that fills the allocators' and the libraries' own bounded caches.
"""

from __future__ import annotations

import copy
import gc
import multiprocessing
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from gmlp.nn import GMLPBlock, TokenProjection
from tiny_text import tiny_classification_files


def _live_objects() -> tuple[int, int]:
    """(gc-tracked objects, of which tensors) after a collection."""
    gc.collect()
    objects = gc.get_objects()
    # (type(), not isinstance: that reads __class__, which warns on torch.distributed's deprecated reduce_op)
    return len(objects), sum(1 for o in objects if issubclass(type(o), torch.Tensor))


def _live_tensors() -> int:
    return _live_objects()[1]


# --- repeated calls of the layers ------------------------------------------------------------------------

# (seq_len 260: lengths from 256 on take the diagonal-sum backward of the Toeplitz expansion)
_BLOCKS: dict[str, dict[str, Any]] = {
    "dense": {},
    "toeplitz": {"toeplitz": True},
    "fft": {"toeplitz": True, "fft_threshold": 4},
    "tiny attention": {"attn_dim": 4},
    "causal heads": {"toeplitz": True, "causal": True, "heads": 2},
    "mixer": {"variant": "mixer"},
}


@pytest.mark.parametrize("kwargs", list(_BLOCKS.values()), ids=list(_BLOCKS))
def test_repeated_calls_at_changing_lengths_keep_no_tensor_alive(kwargs: dict[str, Any]) -> None:
    """A server's loop: every call at another length (and padding), under no_grad or with a backward. Nothing
    the block makes per call (masks, Toeplitz matrices, FFT kernels, autograd graphs) outlives the call."""
    torch.manual_seed(0)
    block = GMLPBlock(8, 16, 260, **kwargs)

    def call(i: int) -> None:
        n = 1 + (i * 53) % 260
        grad = i % 2 == 1
        x = torch.randn(n, 2, 8, requires_grad=grad)
        mask = torch.ones(2, n, dtype=torch.bool)
        mask[1, n // 2 + 1 :] = False
        with torch.set_grad_enabled(grad):
            out = block(x, mask)
            if grad:
                out.sum().backward()

    for i in range(4):  # warm-up: the parameters' .grad tensors
        call(i)
    before = _live_tensors()
    for i in range(4, 40):
        call(i)
    assert _live_tensors() == before


def test_attention_map_hooks_are_removed_also_when_a_block_raises() -> None:
    """``output_attentions=True`` records the aMLP maps with forward hooks on the tiny attentions for one
    call: removed after it, also when a block raises, and the maps of earlier calls are not kept alive."""
    pytest.importorskip("transformers")
    from gmlp.models.text import GMLPConfig, GMLPModel

    config = GMLPConfig(vocab_size=30, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
                        max_position_embeddings=16, tiny_attn_size=4)
    model = GMLPModel(config).eval()

    def hooks() -> int:
        return sum(len(b.tiny_attn._forward_hooks) for b in model.blocks)

    def call(n: int) -> None:
        with torch.no_grad():
            model(input_ids=torch.randint(0, 30, (2, n)), output_attentions=True, output_hidden_states=True)

    call(3)
    before = _live_tensors()
    for n in range(4, 16):
        call(n)
    assert hooks() == 0 and _live_tensors() == before

    def boom(*args: Any, **kwargs: Any) -> torch.Tensor:
        raise RuntimeError("boom")

    model.blocks[1].forward = boom  # the second block raises: the first one's hook has fired
    with pytest.raises(RuntimeError, match="boom"):
        call(5)
    assert hooks() == 0


# --- stale derived state ----------------------------------------------------------------------------------


def _changes() -> dict[str, Callable[[nn.Module, nn.Module], None]]:
    """Ways of giving ``model`` the weights of ``other``, or of changing them, in place."""

    def load(model: nn.Module, other: nn.Module) -> None:
        model.load_state_dict(other.state_dict())

    def copy_data(model: nn.Module, other: nn.Module) -> None:
        with torch.no_grad():
            for p, q in zip(model.parameters(), other.parameters(), strict=True):
                p.data.copy_(q)

    def optimizer_step(model: nn.Module, other: nn.Module) -> None:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        optimizer.step()
        other.load_state_dict(model.state_dict())

    return {"load_state_dict": load, "param.data.copy_": copy_data, "optimizer.step": optimizer_step}


@pytest.mark.parametrize("change", list(_changes()))
@pytest.mark.parametrize("name", ["toeplitz", "fft", "causal heads", "tiny attention"])
def test_outputs_follow_a_weight_change_as_a_fresh_model(name: str, change: str) -> None:
    """After calls at several lengths (which would fill any per-length cache), the weights change in place:
    the outputs are those of a fresh block with the new weights (no stale Toeplitz matrix, FFT kernel or
    mask), and so are they after ``.double()``."""
    kwargs = _BLOCKS[name]
    torch.manual_seed(1)
    block, other = GMLPBlock(8, 16, 260, **kwargs).eval(), GMLPBlock(8, 16, 260, **kwargs).eval()
    for p in other.parameters():  # weights far from the near-identity init, so that W matters
        nn.init.normal_(p, std=0.3)
    lengths = (260, 7, 256, 31)
    with torch.no_grad():
        for n in lengths:
            block(torch.randn(n, 2, 8))
        _changes()[change](block, other)
        fresh = copy.deepcopy(other)
        for n in lengths:
            x = torch.randn(n, 2, 8)
            torch.testing.assert_close(block(x), fresh(x), rtol=0, atol=0)
        block.double()
        fresh.double()
        x = torch.randn(31, 2, 8, dtype=torch.float64)
        torch.testing.assert_close(block(x), fresh(x), rtol=0, atol=0)


# --- torch.compile ------------------------------------------------------------------------------------------


def _graphs(run: Callable[[Callable[..., Any], int], None], fn: Callable[..., Any], sizes: list[int],
            backend: str = "eager") -> int:
    """Graphs dynamo compiled for ``fn`` while ``run(compiled_fn, size)`` went through ``sizes``."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(fn, backend=backend)
    for size in sizes:
        run(compiled, size)
    graphs = counters["stats"]["unique_graphs"]
    torch._dynamo.reset()
    return graphs


_PROJECTIONS: dict[str, dict[str, Any]] = {
    "toeplitz": {"toeplitz": True},
    "toeplitz causal": {"toeplitz": True, "causal": True},
    "toeplitz heads": {"toeplitz": True, "heads": 2},
    "fft": {"toeplitz": True, "fft_threshold": 2},
    "dense": {},
}


@pytest.mark.parametrize("kwargs", list(_PROJECTIONS.values()), ids=list(_PROJECTIONS))
def test_compiled_token_mixing_does_not_recompile_for_each_sequence_length(kwargs: dict[str, Any]) -> None:
    """A compiled model served at many lengths: one graph for the first shape, one dynamic graph after. The
    Toeplitz expansion (``unfold``, whose window must be a constant) and the FFT size search specialised the
    length: a recompile for every new length, and past dynamo's recompile limit (8) the new lengths ran
    uncompiled. The values and gradients are eager's at every length."""
    torch.manual_seed(2)
    proj = TokenProjection(300, **kwargs)
    nn.init.normal_(proj.weight, std=0.2)

    def run(compiled: Callable[..., Any], n: int) -> None:
        z = torch.randn(n, 2, 4)
        for fn in (compiled, proj):
            out = fn(z)
            grad, = torch.autograd.grad(out.square().sum(), proj.weight)
            if fn is compiled:
                expected_out, expected_grad = out, grad
        # (rounding: the compiled graph may take other matrix-product kernels, and the FFT another size)
        torch.testing.assert_close(expected_out, out, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(expected_grad, grad, rtol=1e-5, atol=1e-5 * float(grad.abs().max()))

    # (from 256 tokens on the expansion takes its diagonal-sum backward: that path too)
    assert _graphs(run, proj, [12, 11, 10, 9, 8, 7]) <= 2
    assert _graphs(run, proj, [300, 290, 280, 270]) <= 2


def test_compiled_text_model_does_not_recompile_for_each_length_or_batch_size() -> None:
    """The text models' Toeplitz default: a padded-to-longest batch (finetuning with ``--compile``, a server)
    changes the length at every call."""
    pytest.importorskip("transformers")
    from gmlp.models.text import GMLPConfig, GMLPForMaskedLM

    config = GMLPConfig(vocab_size=30, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                        max_position_embeddings=16)
    model = GMLPForMaskedLM(config).eval()

    def by_length(compiled: Callable[..., Any], n: int) -> None:
        with torch.no_grad():
            ids = torch.randint(0, 30, (2, n))
            compiled(input_ids=ids, attention_mask=torch.ones_like(ids))

    def by_batch(compiled: Callable[..., Any], b: int) -> None:
        with torch.no_grad():
            compiled(input_ids=torch.randint(0, 30, (b, 8)))

    assert _graphs(by_length, model, [16, 15, 14, 13, 12]) <= 2
    assert _graphs(by_batch, model, [2, 3, 4, 5]) <= 2


# --- training helpers called again and again in one process ------------------------------------------------


def _leftovers() -> dict[str, Any]:
    objects, tensors = _live_objects()
    return {"objects": objects, "tensors": tensors,
            "threads": sorted(t.name for t in threading.enumerate()),
            "children": multiprocessing.active_children()}


def _assert_flat(calls: list[dict[str, Any]]) -> None:
    """The state after each call from the second on is that after the first (objects within noise). Fewer
    live tensors, objects or threads is no growth: in a worker process of the suite, earlier tests' leftovers
    (a cache evicted, a thread ending) may go between two calls."""
    first, *rest = calls
    for later in rest:
        assert later["tensors"] <= first["tensors"], (first["tensors"], later["tensors"])
        assert set(later["threads"]) <= set(first["threads"]) and later["children"] == []
        assert later["objects"] - first["objects"] < 200, (first["objects"], later["objects"])


def test_finetune_called_again_and_again_leaves_nothing_behind(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from gmlp.train.text import FinetuneConfig, _epoch_order, finetune
    tok, data = tiny_classification_files(tmp_path)
    calls = []
    for i in range(3):
        finetune(FinetuneConfig(output=str(tmp_path / f"run{i}"), train_file=str(data),
                                validation_file=str(data), steps=1, tokenizer=str(tok), layers=1, hidden=16,
                                ffn=32, seq_len=16, batch_size=4, device="cpu", progress=False, save_every=0))
        calls.append(_leftovers())
        # the run's data orders (8 bytes per example each) do not outlive it in a notebook's process
        assert _epoch_order.cache_info().currsize == 0
    _assert_flat(calls[1:])  # (the first call imports and fills the libraries' own caches)


def test_train_vision_called_again_and_again_leaves_nothing_behind(tmp_path: Path) -> None:
    pytest.importorskip("sklearn")
    from gmlp.train.vision import VisionTrainConfig, train_vision

    calls = []
    for i in range(3):
        train_vision(VisionTrainConfig(model="gmlp_micro4_28", dataset="digits", batch_size=32, epochs=1,
                                       warmup_steps=0, augment=False, progress=False, train_subset=32,
                                       test_subset=32, threads=1, plot=False,
                                       output=str(tmp_path / f"run{i}")))
        calls.append(_leftovers())
    _assert_flat(calls[1:])
