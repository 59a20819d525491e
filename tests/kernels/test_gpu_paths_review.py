"""The GPU-only paths reviewed without a GPU: what a CUDA graph's warm-up and capture launch, run in Triton's
interpreter (the capture simulated on the CPU, as in tests/train/test_cuda_graph.py).

A Triton kernel is compiled and its module loaded at the first launch of each specialisation (its
constexprs and the ints equal to 1 or divisible by 16); inside a CUDA graph capture that load is refused
("operation not permitted when stream is capturing"). So every specialisation a capture launches must
have been launched by the eager warm-up calls before it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from types import SimpleNamespace

import pytest
import torch
from device_helpers import recording_on_device

import gmlp.nn.block as block_module
from gmlp.kernels import norm_triton, sgu_triton, spatial_gating, triton_available
from gmlp.models.text import GMLPConfig, GMLPForMaskedLM, modeling_gmlp
from gmlp.nn import _checks
from gmlp.train import cuda_graph

pytestmark = pytest.mark.skipif(
    not triton_available() or (not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"),
    reason="needs triton, and on CPU TRITON_INTERPRET=1 set before triton is imported (tests/conftest.py)",
)

_KERNELS = {
    sgu_triton: ("_fwd_kernel", "_bwd_kernel", "_gate_fwd_kernel", "_gate_bwd_kernel"),
    norm_triton: ("_norm_fwd_kernel", "_norm_bwd_kernel"),
}


class _Recorder:
    """Stands for a Triton kernel: ``kernel[grid](*args, **kwargs)`` launches it and records its
    specialisation (name, keyword constexprs and launch options, and for each int argument whether it is 1
    or divisible by 16, as Triton specialises)."""

    def __init__(self, name: str, kernel: object, seen: set[tuple]) -> None:
        self.name, self.kernel, self.seen = name, kernel, seen

    def __getitem__(self, grid: tuple[int, ...]) -> Callable[..., object]:
        def launch(*args: object, **kwargs: object) -> object:
            ints = tuple((a == 1, a % 16 == 0) for a in args if type(a) is int)
            self.seen.add((self.name, ints, tuple(sorted(kwargs.items()))))
            return self.kernel[grid](*args, **kwargs)  # type: ignore[index]

        return launch


@contextlib.contextmanager
def _recording(monkeypatch: pytest.MonkeyPatch, seen: set[tuple]) -> Iterator[None]:
    with monkeypatch.context() as patch:
        for module, names in _KERNELS.items():
            for name in names:
                patch.setattr(module, name, _Recorder(name, getattr(module, name), seen))
        yield


def _capturing(monkeypatch: pytest.MonkeyPatch) -> None:
    """The models see a CUDA graph capture (their data-dependent shortcuts and host reads off)."""
    monkeypatch.setattr(_checks, "capturing", lambda t: True)
    monkeypatch.setattr(modeling_gmlp, "capturing", lambda t: True)


@pytest.mark.parametrize("padding", ["none", "right"])
@pytest.mark.parametrize("train", [True, False], ids=["step", "inference"])
def test_graph_capture_launches_no_kernel_its_warmup_did_not(
    monkeypatch: pytest.MonkeyPatch, padding: str, train: bool
) -> None:
    """An MLM step (CUDAGraphStep) or forward (CUDAGraphInference) with an attention mask: the kernel
    specialisations of the capture are among those of an eager warm-up call on a batch of the same shapes,
    also when the warm-up's mask is all real (which the eager model drops, while the capture keeps it: the
    gating kernels' masked variant was first launched inside the capture, a failed capture on a GPU)."""
    monkeypatch.setattr(block_module, "triton_enabled", lambda x: True)  # the CUDA paths, in the interpreter
    torch.manual_seed(0)
    cfg = GMLPConfig(vocab_size=20, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                     max_position_embeddings=5, hidden_dropout_prob=0.0)  # fmt: skip
    model = GMLPForMaskedLM(cfg).train(train)
    ids = torch.randint(0, 20, (2, 5))
    mask = torch.ones(2, 5, dtype=torch.long)
    if padding == "right":
        mask[1, 3:] = 0

    def call() -> torch.Tensor:
        with torch.set_grad_enabled(train):
            logits = model(input_ids=ids, attention_mask=mask).logits
            if train:
                logits.square().mean().backward()
        return logits.detach()

    warm, captured = set(), set()
    with sgu_triton.prefer_fused_gating():  # as the graphed step's warm-up calls and capture run
        with _recording(monkeypatch, warm):
            eager = call()
        _capturing(monkeypatch)
        with _recording(monkeypatch, captured):
            graphed = call()
    assert captured, "no Triton kernel launched: the test no longer reaches the kernel paths"
    assert captured <= warm, f"first launched inside the capture: {sorted(captured - warm)}"
    real = mask.bool()
    torch.testing.assert_close(graphed[real], eager[real], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("n", [8, 9])  # aligned, and padded to 16
def test_graph_path_gating_without_mask_equals_the_plain_launch(n: int) -> None:
    """In a graphed call (prefer_fused_gating) spatial_gating without a mask runs its masked kernel variant
    with an all-real mask: the same output and gradients, bit for bit, as the unmasked launch."""
    torch.manual_seed(n)
    batch, half = 1, 3
    leaves = [torch.randn(n, batch, 2 * half), torch.randn(half), torch.randn(half),
              0.3 * torch.randn(n, n), torch.randn(n)]  # fmt: skip
    results = []
    for graphed in (False, True):
        inputs = [t.clone().requires_grad_() for t in leaves]
        with sgu_triton.prefer_fused_gating() if graphed else contextlib.nullcontext():
            u, nw, nb, w, b = inputs
            out = spatial_gating(u, nw, nb, 1e-5, w, b, use_triton=True)
            results.append((out, *torch.autograd.grad((out * out.detach().sin()).sum(), inputs)))
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_a_failed_capture_names_kernels_the_warmup_did_not_launch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Triton's refusal to load a kernel inside a capture gets an error that names that cause too, not only
    host synchronisation (of which such a step has none)."""

    class Graph:
        pass

    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(torch.cuda, "graph", lambda graph, stream=None: contextlib.nullcontext())

    def body(inputs: tuple[torch.Tensor, ...]) -> None:
        raise RuntimeError("Triton Error [CUDA]: operation not permitted when stream is capturing")

    graphed = cuda_graph._Graphed(1)
    with pytest.raises(RuntimeError, match="must not synchronise with the host") as info:
        graphed._capture(body, "training step")
    assert "launch a kernel that the warm-up calls did not" in str(info.value)
    assert isinstance(info.value.__cause__, RuntimeError) and not graphed.captured


def test_kernels_switch_to_another_gpu_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Triton launches on the current device: ``_on_device`` makes a CUDA input's own device current when
    it is another one (a model on cuda:1, or split over GPUs), and does nothing otherwise."""
    switched: list[torch.device] = []
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", lambda d: switched.append(d) or contextlib.nullcontext())
    for index in (0, 1):
        device = torch.device(f"cuda:{index}")
        gpu_tensor = SimpleNamespace(is_cuda=True, get_device=lambda i=index: i, device=device)
        with sgu_triton._on_device(gpu_tensor):  # type: ignore[arg-type]
            pass
    with sgu_triton._on_device(torch.zeros(1)):
        pass
    assert switched == [torch.device("cuda", 1)]


def test_every_forward_launch_runs_on_its_input_s_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each public kernel entry point (the split kernel, the fused gating, the compute-dtype LayerNorm)
    launches its forward kernels inside ``_on_device`` of its input (the backward runs on autograd's
    thread of that device)."""
    current: list[torch.Tensor] = []

    on_device = recording_on_device(current)

    monkeypatch.setattr(sgu_triton, "_on_device", on_device)
    monkeypatch.setattr(norm_triton, "_on_device", on_device)
    launches: list[tuple[str, bool]] = []

    class Guarded:
        def __init__(self, name: str, kernel: object, inputs: list[torch.Tensor]) -> None:
            self.name, self.kernel, self.inputs = name, kernel, inputs

        def __getitem__(self, grid: tuple[int, ...]) -> Callable[..., object]:
            def launch(*args: object, **kwargs: object) -> object:
                launches.append((self.name, bool(current) and any(current[-1] is t for t in self.inputs)))
                return self.kernel[grid](*args, **kwargs)  # type: ignore[index]

            return launch

    torch.manual_seed(0)
    u, x = torch.randn(5, 2, 8), torch.randn(3, 6)
    inputs = [u, x]
    for module, names in _KERNELS.items():
        for name in names:
            monkeypatch.setattr(module, name, Guarded(name, getattr(module, name), inputs))
    with torch.no_grad():
        sgu_triton.gelu_split_layernorm(u, None, None, 1e-5, use_triton=True)
        spatial_gating(u, None, None, 1e-5, torch.randn(5, 5), torch.randn(5), use_triton=True)
        norm_triton.layer_norm(x, None, None, 1e-5, torch.bfloat16)
    assert {name for name, _ in launches} == {"_fwd_kernel", "_gate_fwd_kernel", "_norm_fwd_kernel"}
    assert all(guarded for _, guarded in launches), launches
