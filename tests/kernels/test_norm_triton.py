"""The compute-dtype LayerNorm kernels equal F.layer_norm + cast (forward and gradients).

On a machine without a GPU the kernels run in Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 before anything imports triton when CUDA is unavailable).
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gmlp.kernels import layer_norm, layer_norm_reference, triton_available

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(
    not triton_available() or (DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1"),
    reason="needs triton, and on CPU TRITON_INTERPRET=1 set before triton is imported (tests/conftest.py)",
)


@settings(max_examples=12, deadline=None)
@given(
    lead=st.sampled_from([(1,), (7,), (3, 5)]),
    dim=st.integers(1, 70),
    bf16_out=st.booleans(),
    seed=st.integers(0, 999),
)
def test_layer_norm_matches_reference(lead: tuple[int, ...], dim: int, bf16_out: bool, seed: int) -> None:
    """Output within one rounding of the cast reference; gradients of x, weight and bias (in x's dtype)."""
    torch.manual_seed(seed)
    out_dtype = torch.bfloat16 if bf16_out else torch.float32
    x = (3 * torch.randn(*lead, dim, device=DEVICE) + 1).requires_grad_()
    w = torch.randn(dim, device=DEVICE, requires_grad=True)
    b = torch.randn(dim, device=DEVICE, requires_grad=True)
    got = layer_norm(x, w, b, 1e-6, out_dtype)
    want = layer_norm_reference(x, w, b, 1e-6, out_dtype)
    assert got.dtype == want.dtype == out_dtype and got.shape == want.shape
    tol = 1e-5 if out_dtype == torch.float32 else 1e-2  # bf16: the two may round to neighbours
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    seed_grad = torch.randn(got.shape, device=DEVICE)
    grads = torch.autograd.grad((got.float() * seed_grad).sum(), [x, w, b])
    ref_grads = torch.autograd.grad((want.float() * seed_grad).sum(), [x, w, b])
    for g, r in zip(grads, ref_grads, strict=True):
        assert g.dtype == r.dtype == torch.float32
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4)


@settings(max_examples=12, deadline=None)
@given(
    lead=st.sampled_from([(1,), (5,), (3, 4)]),
    dim=st.integers(2, 40),  # at 1 the reference's x - mean is rounding noise that rstd = 1/sqrt(eps) scales
    x_dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    used=st.sampled_from(["both", "norm", "residual"]),
    seed=st.integers(0, 999),
)
def test_layer_norm_returned_residual_gradient(
    lead: tuple[int, ...], dim: int, x_dtype: torch.dtype, used: str, seed: int
) -> None:
    """``return_residual=True``: the second output is ``x``'s value, and gradients through either output or
    both (the backward kernel adds the residual's) equal those of the reference with ``x`` used twice."""
    torch.manual_seed(seed)
    x = (3 * torch.randn(*lead, dim, device=DEVICE) + 1).to(x_dtype).requires_grad_()
    w = torch.randn(dim, device=DEVICE, requires_grad=True)
    b = torch.randn(dim, device=DEVICE, requires_grad=True)
    y, r = layer_norm(x, w, b, 1e-6, torch.bfloat16, return_residual=True)
    assert r.dtype == x.dtype and r.shape == x.shape and torch.equal(r, x)
    y_ref = layer_norm_reference(x, w, b, 1e-6, torch.bfloat16)
    seed_y = torch.randn(y.shape, device=DEVICE)
    seed_r = torch.randn(r.shape, device=DEVICE)

    def loss(norm_out: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        total = (residual.float() * seed_r).sum()
        if used == "both":
            return total + (norm_out.float() * seed_y).sum()
        return total if used == "residual" else (norm_out.float() * seed_y).sum()

    grads = torch.autograd.grad(loss(y, r), [x, w, b], allow_unused=True)
    ref = torch.autograd.grad(loss(y_ref, x), [x, w, b], allow_unused=True)
    for g, c in zip(grads, ref, strict=True):
        if c is None:  # only the residual used: no weight/bias gradient
            assert g is None or not g.any()
            continue
        assert g.dtype == c.dtype
        tol = 1e-4 if x_dtype == torch.float32 else 2e-2  # bf16 x: dx is rounded to bf16 on either path
        scale = 1 + c.float().abs().max().item()
        torch.testing.assert_close(g.float(), c.float(), rtol=tol, atol=tol * scale)


def test_layer_norm_reference_path_returns_the_residual() -> None:
    x = torch.randn(3, 8, device=DEVICE)
    w, b = torch.ones(8, device=DEVICE), torch.zeros(8, device=DEVICE)
    y, r = layer_norm(x, w, b, 1e-5, use_triton=False, return_residual=True)
    assert r is x
    torch.testing.assert_close(y, layer_norm_reference(x, w, b, 1e-5, x.dtype))


def test_layer_norm_ignores_autocast_and_checks_shapes() -> None:
    x = torch.randn(4, 8, device=DEVICE)
    w, b = torch.ones(8, device=DEVICE), torch.zeros(8, device=DEVICE)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        y = layer_norm(x, w, b, 1e-5, torch.bfloat16)
    torch.testing.assert_close(y, layer_norm_reference(x, w, b, 1e-5, torch.bfloat16), rtol=1e-2, atol=1e-2)
    with pytest.raises(ValueError, match=r"weight and bias must have shape \(8,\)"):
        layer_norm(x, torch.ones(7, device=DEVICE), b, 1e-5)


@settings(max_examples=8, deadline=None)
@given(
    dim=st.integers(2, 40),
    affine=st.sampled_from(["strided", "no-bias", "none"]),
    seed=st.integers(0, 999),
)
def test_layer_norm_takes_strided_and_missing_affine_parameters(dim: int, affine: str, seed: int) -> None:
    """A weight and bias that are strided views (every other entry of a longer vector) are read as the
    vectors they are (the kernels read them as dense: a wrong output before), and None weight/bias (an
    ``nn.LayerNorm`` without ``elementwise_affine`` or ``bias``) work as in ``F.layer_norm`` (an
    AttributeError before); gradients of x and of the given parameters as the reference's."""
    torch.manual_seed(seed)
    x = (3 * torch.randn(2, 3, dim, device=DEVICE) + 1).requires_grad_()
    w_full = torch.randn(2 * dim, device=DEVICE, requires_grad=True)
    b_full = torch.randn(2 * dim, device=DEVICE, requires_grad=True)
    w = None if affine == "none" else w_full[::2]
    b = b_full[::2] if affine == "strided" else None
    leaves = [x] + [t for t, used in ((w_full, w is not None), (b_full, b is not None)) if used]
    got = layer_norm(x, w, b, 1e-6)
    want = layer_norm_reference(x, w, b, 1e-6, x.dtype)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    seed_grad = torch.randn_like(want)
    grads = torch.autograd.grad((got * seed_grad).sum(), leaves)
    for g, r in zip(grads, torch.autograd.grad((want * seed_grad).sum(), leaves), strict=True):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4)


def test_block_pre_norm_writes_the_autocast_dtype(monkeypatch: pytest.MonkeyPatch) -> None:
    """Through the kernels, a block's pre-norm output is already in the autocast dtype, and the block's
    output and gradients match the plain path under the same autocast."""
    import gmlp.nn.block as block_module
    from gmlp.nn import GMLPBlock

    torch.manual_seed(0)
    block = GMLPBlock(16, 32, 9).to(DEVICE)
    torch.nn.init.normal_(block.sgu.proj.weight, std=0.2)
    x = torch.randn(9, 2, 16, device=DEVICE, requires_grad=True)
    monkeypatch.setenv("GMLP_FUSED_GATING_MIN_ELEMENTS", "0")  # this tiny block too
    results = []
    for through_kernels in (False, True):
        monkeypatch.setattr(block_module, "triton_enabled", lambda t, on=through_kernels: on)
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            if through_kernels:
                assert block._pre_norm(x, fused=True)[0].dtype == torch.bfloat16
            y = block(x)
        results.append((y.float(), torch.autograd.grad(y.float().square().sum(), [x, *block.parameters()])))
    (y_ref, g_ref), (y_fused, g_fused) = results
    torch.testing.assert_close(y_fused, y_ref, rtol=3e-2, atol=3e-2)
    for a, c in zip(g_fused, g_ref, strict=True):
        cos = torch.nn.functional.cosine_similarity(a.flatten().float(), c.flatten().float(), dim=0)
        assert cos > 0.99


def test_block_residual_gradient_fused(monkeypatch: pytest.MonkeyPatch) -> None:
    """``GMLP_FUSE_RESIDUAL_GRAD=1``: on the fused-gating path the block adds its branch to the ``x`` that
    :func:`layer_norm` hands back (the residual's gradient goes into the LayerNorm backward kernel, no
    separate accumulation of ``x``'s two gradients), with the same output and gradients as without."""
    import gmlp.nn.block as block_module
    from gmlp.nn import GMLPBlock

    torch.manual_seed(1)
    block = GMLPBlock(16, 32, 9).to(DEVICE)
    torch.nn.init.normal_(block.sgu.proj.weight, std=0.2)
    x = torch.randn(9, 2, 16, device=DEVICE, requires_grad=True)
    monkeypatch.setattr(block_module, "triton_enabled", lambda t: True)
    monkeypatch.setenv("GMLP_FUSED_GATING_MIN_ELEMENTS", "0")
    results = []
    for fuse in ("0", "1"):
        monkeypatch.setenv("GMLP_FUSE_RESIDUAL_GRAD", fuse)
        y = block(x)
        # the residual sum's first input: x itself (AccumulateGrad) or the LayerNorm's returned x
        residual_node = y.grad_fn.next_functions[0][0]
        assert (type(residual_node).__name__ == "_LayerNormBackward") == (fuse == "1")
        results.append((y, torch.autograd.grad(y.square().sum(), [x, *block.parameters()])))
    (y_ref, g_ref), (y_fused, g_fused) = results
    torch.testing.assert_close(y_fused, y_ref)
    for a, c in zip(g_fused, g_ref, strict=True):
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5)
