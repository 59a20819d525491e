"""The GPU-only paths reviewed without a GPU, second pass: what runs in autograd's device thread during a CUDA
graph's warm-up, and the device the torch.compile custom ops launch on (Triton's interpreter on the CPU,
CUDA streams and autograd's device thread simulated).

On CUDA the autograd engine runs the backward of CUDA ops in its own thread of the device, with the forward
op's stream current, not in the thread that called ``backward()``. A block under gradient checkpointing is
recomputed there, so it must see the same path choice as its forward did in the caller's thread.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from collections.abc import Callable, Iterator

import pytest
import torch
from device_helpers import recording_on_device
from torch.utils.checkpoint import checkpoint

import gmlp.nn.block as block_module
from gmlp.kernels import gelu_split_layernorm, sgu_triton, spatial_gating, triton_available
from gmlp.nn import GMLPBlock
from gmlp.train import cuda_graph

pytestmark = pytest.mark.skipif(
    not triton_available() or (not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"),
    reason="needs triton, and on CPU TRITON_INTERPRET=1 set before triton is imported (tests/conftest.py)",
)


class _Stream:
    """Stands for a ``torch.cuda.Stream`` (a handle on device 0; 0 is the default stream)."""

    def __init__(self, handle: int) -> None:
        self.device_index, self.cuda_stream = 0, handle

    def wait_stream(self, other: object) -> None:
        pass


def _simulated_streams(
    monkeypatch: pytest.MonkeyPatch,
) -> Callable[[_Stream], contextlib.AbstractContextManager]:
    """CUDA's per-thread current stream, simulated: ``torch.cuda.stream(s)`` makes ``s`` current in the
    calling thread only (as autograd's device thread sets the forward's stream for each backward op).
    Returns it."""
    local, default = threading.local(), _Stream(0)

    @contextlib.contextmanager
    def stream(s: _Stream) -> Iterator[None]:
        before = getattr(local, "stream", default)
        local.stream = s
        try:
            yield
        finally:
            local.stream = before

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: getattr(local, "stream", default))
    monkeypatch.setattr(torch.cuda, "stream", stream)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    return stream


def _in_thread(fn: Callable[[], object]) -> object:
    """``fn()`` in a new thread (autograd's device thread); its result, or its exception raised here."""
    result: list[object] = []

    def run() -> None:
        try:
            result.append(("ok", fn()))
        except BaseException as err:  # noqa: BLE001  (handed back to the test's thread)
            result.append(("err", err))

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(60)
    kind, value = result[0]  # type: ignore[misc]
    if kind == "err":
        raise value  # type: ignore[misc]
    return value


def test_a_graph_warmup_s_stream_prefers_the_fused_gating_in_every_thread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """During a warm-up call (``_Graphed._eager``) the fused gating is preferred in the caller's thread and
    in any thread whose current stream is the warm-up's (autograd's device thread); not in a thread on
    another stream (another model's eager blocks), and nowhere once the call returns."""
    stream = _simulated_streams(monkeypatch)
    monkeypatch.delenv("GMLP_DISABLE_FUSED_GATING", raising=False)
    monkeypatch.setenv("GMLP_FUSED_GATING_MIN_ELEMENTS", "100")
    side = _Stream(77)
    graphed = cuda_graph._Graphed(1)
    graphed._stream = side  # type: ignore[assignment]
    seen: dict[str, object] = {}

    def on_side() -> bool:
        with stream(side):
            return sgu_triton.fused_gating_enabled(1)

    def body(batch: tuple[torch.Tensor, ...]) -> None:
        seen["caller"] = sgu_triton.fused_gating_enabled(1)
        seen["device thread"] = _in_thread(on_side)
        seen["other stream"] = _in_thread(lambda: sgu_triton.fused_gating_enabled(1))

    graphed._eager(body, (torch.zeros(1),))
    assert seen == {"caller": True, "device thread": True, "other stream": False}
    assert not on_side() and not sgu_triton._prefer_streams  # the warm-up is over


def _routed(monkeypatch: pytest.MonkeyPatch, calls: list[str]) -> None:
    """Blocks take the CUDA paths in the interpreter (the size threshold still decides fused or split);
    each kernel entry point is recorded in ``calls``."""
    monkeypatch.setattr(block_module, "triton_enabled", lambda x: True)
    for name, fn in (("gelu_split_layernorm", gelu_split_layernorm), ("spatial_gating", spatial_gating)):
        kernel = functools.partial(fn, use_triton=True)
        monkeypatch.setattr(
            block_module, name, lambda *a, _k=kernel, _n=name, **k: calls.append(_n) or _k(*a, **k)
        )


def test_a_checkpointed_block_is_recomputed_on_its_forward_path_during_a_graph_warmup(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """CUDAGraphStep's warm-up step (prefer_fused_gating, on its side stream) of a model with gradient
    checkpointing: the forward takes the fused gating below the size threshold; the backward, run by
    autograd's device thread with the side stream current, recomputes the block on the same path (a
    per-thread preference alone sent the recomputation down the split kernel: a non-reentrant checkpoint
    then refuses the other saved tensors, a reentrant one first launches the fused backward kernels inside
    the capture). The gradients are those of the plain ops."""
    stream = _simulated_streams(monkeypatch)
    monkeypatch.delenv("GMLP_DISABLE_FUSED_GATING", raising=False)
    monkeypatch.setenv("GMLP_FUSED_GATING_MIN_ELEMENTS", str(10**12))  # only the warm-up's preference fuses
    torch.manual_seed(0)
    block = GMLPBlock(8, 16, 5)
    torch.nn.init.normal_(block.sgu.proj.weight, std=0.1)
    x = torch.randn(5, 1, 8, requires_grad=True)
    params = [x, *block.parameters()]
    want = torch.autograd.grad(block(x).square().sum(), params)  # the plain ops
    calls: list[str] = []
    _routed(monkeypatch, calls)
    side = _Stream(78)
    graphed = cuda_graph._Graphed(1)
    graphed._stream = side  # type: ignore[assignment]

    def step(batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        loss = checkpoint(block, batch[0], use_reentrant=False).square().sum()

        def backward() -> tuple[torch.Tensor, ...]:
            with stream(side):  # autograd's device thread: the forward ops' stream
                return torch.autograd.grad(loss, params)

        return _in_thread(backward)  # type: ignore[return-value]

    with sgu_triton.prefer_fused_gating():  # as CUDAGraphStep.__call__ runs its warm-up steps
        got = graphed._eager(step, (x,))
    assert calls == ["spatial_gating", "spatial_gating"], calls  # the forward, and its recomputation
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_the_compile_custom_ops_launch_on_their_input_s_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """``gmlp::spatial_gating_fwd`` / ``_bwd`` (the fused gating kept under torch.compile) launch their
    Triton kernels inside ``_on_device`` of their input, as the eager entry points do: Triton launches on
    the current device, and a compiled graph (aot_eager, or a graph over several GPUs) sets none for an
    opaque op on another GPU."""
    current: list[torch.Tensor] = []

    on_device = recording_on_device(current)

    monkeypatch.setattr(sgu_triton, "_on_device", on_device)
    launches: list[tuple[str, bool]] = []
    inputs: list[torch.Tensor] = []

    class Guarded:
        def __init__(self, name: str, kernel: object) -> None:
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid: tuple[int, ...]) -> Callable[..., object]:
            def launch(*args: object, **kwargs: object) -> object:
                launches.append((self.name, bool(current) and any(current[-1] is t for t in inputs)))
                return self.kernel[grid](*args, **kwargs)  # type: ignore[index]

            return launch

    for name in ("_fwd_kernel", "_bwd_kernel", "_gate_fwd_kernel", "_gate_bwd_kernel"):
        monkeypatch.setattr(sgu_triton, name, Guarded(name, getattr(sgu_triton, name)))
    torch.manual_seed(0)
    n, batch, half = 9, 2, 3
    u, ds = torch.randn(n, batch, 2 * half), torch.randn(n, batch, half)
    nw, nb, w, b = torch.randn(half), torch.randn(half), 0.3 * torch.randn(n, n), torch.randn(n)
    inputs += [u, ds]
    s, mean, rstd, z2n, gate = torch.ops.gmlp.spatial_gating_fwd(u, nw, nb, 1e-5, w, b, None, None)
    torch.ops.gmlp.spatial_gating_bwd(ds, u, nw, mean, rstd, None, z2n, w, b, gate)
    assert {name for name, _ in launches} == {
        "_fwd_kernel",
        "_bwd_kernel",
        "_gate_fwd_kernel",
        "_gate_bwd_kernel",
    }
    assert all(guarded for _, guarded in launches), launches
    torch.testing.assert_close(s, sgu_triton.spatial_gating_reference(u, nw, nb, 1e-5, w, b))


def test_the_compile_custom_ops_take_a_strided_view_as_u() -> None:
    """The fused gating kept under torch.compile (``gmlp::spatial_gating_fwd`` and its registered backward)
    on a ``u`` that is a strided view, such as the channel slice of a wider projection (its rows are then
    further apart than 2C): forward and gradient equal the plain ops (the backward op read its rows as if
    they were 2C apart: garbage gradients)."""
    torch.manual_seed(0)
    n, batch, half = 9, 2, 3
    wide = torch.randn(n, batch, 2 * half + 4)
    nw, nb, w, b = torch.randn(half), torch.randn(half), 0.3 * torch.randn(n, n), torch.randn(n)
    results = []
    for fused in (True, False):
        leaf = wide.clone().requires_grad_()
        u = leaf[..., : 2 * half]
        if fused:
            s = torch.ops.gmlp.spatial_gating_fwd(u, nw, nb, 1e-5, w, b, None, None)[0]
        else:
            s = sgu_triton.spatial_gating_reference(u, nw, nb, 1e-5, w, b)
        results.append((s, *torch.autograd.grad((s * s.detach().cos()).sum(), leaf)))
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
