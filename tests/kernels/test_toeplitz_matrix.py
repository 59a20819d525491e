"""The dense Toeplitz W from its diagonals: the diagonal-sum backward equals autograd's ``unfold`` backward
and an explicit sum over each diagonal, in value, gradient, double backward and under torch.compile."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from gmlp.kernels import toeplitz
from gmlp.kernels.toeplitz import DIAGONAL_SUM_MIN_TOKENS, toeplitz_matrix, toeplitz_matrix_reference
from gmlp.nn import TokenProjection


def _weight(seq_len: int, heads: int | None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    shape = (2 * seq_len - 1,) if heads is None else (heads, 2 * seq_len - 1)
    return torch.randn(shape, dtype=dtype, requires_grad=True)


def _diagonal_oracle(grad: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Entry k: the sum of grad[..., i, j] over i - j = k - (seq_len - 1), by loops."""
    n = grad.shape[-1]
    out = torch.zeros(*grad.shape[:-2], 2 * seq_len - 1, dtype=grad.dtype)
    for i in range(n):
        for j in range(n):
            out[..., i - j + seq_len - 1] += grad[..., i, j]
    return out


@given(
    seq_len=st.integers(1, 24),
    frac=st.floats(0.0, 1.0, allow_subnormal=False),
    heads=st.sampled_from([None, 1, 3]),
    seed=st.integers(0, 2**16),
)
def test_diagonal_sums_equal_unfold_backward_and_the_loop_oracle(
    seq_len: int, frac: float, heads: int | None, seed: int
) -> None:
    torch.manual_seed(seed)
    n = max(1, round(frac * seq_len))
    weight = _weight(seq_len, heads)
    fast = toeplitz_matrix(weight, n, seq_len, diagonal_sums=True)
    ref = toeplitz_matrix_reference(weight, n, seq_len)
    torch.testing.assert_close(fast, ref, rtol=0, atol=0)
    grad = torch.randn_like(ref)
    (g_fast,) = torch.autograd.grad(fast, weight, grad)
    (g_ref,) = torch.autograd.grad(ref, weight, grad)
    torch.testing.assert_close(g_fast, g_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g_fast, _diagonal_oracle(grad, seq_len), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("heads", [None, 2])
def test_diagonal_sums_double_backward(heads: int | None) -> None:
    torch.manual_seed(0)
    weight = _weight(6, heads, torch.float64)
    assert torch.autograd.gradgradcheck(lambda w: toeplitz_matrix(w, 4, 6, diagonal_sums=True), (weight,))


def test_default_backward_switches_at_the_threshold() -> None:
    """Below DIAGONAL_SUM_MIN_TOKENS autograd's backward; from it on the diagonal sums (the path is visible
    in the graph), both equal to the reference."""
    for n in (DIAGONAL_SUM_MIN_TOKENS - 1, DIAGONAL_SUM_MIN_TOKENS):
        weight = _weight(n, None)
        w = toeplitz_matrix(weight, n, n)
        assert ("ToeplitzMatrix" in type(w.grad_fn).__name__) == (n >= DIAGONAL_SUM_MIN_TOKENS)
        grad = torch.randn(n, n)
        (g,) = torch.autograd.grad(w, weight, grad)
        (g_ref,) = torch.autograd.grad(toeplitz_matrix_reference(weight, n, n), weight, grad)
        torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-4)


def test_inference_and_tracing_keep_the_plain_view(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a backward to run (no grad, a weight that needs none) and in torch.jit.trace the default is
    the plain view (the custom function is never applied), equal in value."""
    n = DIAGONAL_SUM_MIN_TOKENS
    weight = _weight(n, None)
    ref = toeplitz_matrix_reference(weight, n, n).detach()

    def refuse(*args: object) -> torch.Tensor:
        raise AssertionError("the diagonal-sum function was applied")

    monkeypatch.setattr(toeplitz._ToeplitzMatrix, "apply", refuse)
    with pytest.raises(AssertionError, match="was applied"):  # the spy works: training takes it
        toeplitz_matrix(weight, n, n)
    with torch.no_grad():
        torch.testing.assert_close(toeplitz_matrix(weight, n, n), ref)
    torch.testing.assert_close(toeplitz_matrix(weight.detach(), n, n), ref)
    traced = torch.jit.trace(lambda w: toeplitz_matrix(w, n, n) * 2, (weight,))
    torch.testing.assert_close(traced(weight), 2 * ref)


def test_torch_func_transforms_work_at_long_lengths() -> None:
    """torch.func (grad, vmap) cannot run the diagonal-sum function (no setup_context): from
    DIAGONAL_SUM_MIN_TOKENS on it is skipped under a transform, and the gradients are autograd's."""
    n = DIAGONAL_SUM_MIN_TOKENS
    proj = TokenProjection(n, toeplitz=True).double()
    x = torch.randn(n, 2, 3, dtype=torch.float64)
    params = dict(proj.named_parameters())

    def loss(p: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.func.functional_call(proj, p, (x,)).square().sum()

    got = torch.func.grad(loss)(params)
    want = torch.autograd.grad(loss(params), list(params.values()))
    for g, w in zip(got.values(), want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_token_projection_takes_the_diagonal_sums_at_long_lengths() -> None:
    n = DIAGONAL_SUM_MIN_TOKENS
    proj = TokenProjection(n, toeplitz=True)
    torch.nn.init.normal_(proj.weight)
    z = torch.randn(n, 1, 2)
    (proj(z) ** 2).sum().backward()
    grad = proj.weight.grad.clone()
    proj.weight.grad = None
    w = toeplitz_matrix_reference(proj.weight, n, n)
    out = w @ z.view(n, -1) + proj.bias[:, None]
    (out**2).sum().backward()
    torch.testing.assert_close(grad, proj.weight.grad, rtol=1e-4, atol=1e-3)


def test_compiles_fullgraph_with_equal_gradients() -> None:
    torch.manual_seed(0)
    weight = _weight(7, 2)
    grad = torch.randn(2, 5, 5)

    def loss(w: torch.Tensor) -> torch.Tensor:
        return (toeplitz_matrix(w, 5, 7, diagonal_sums=True) * grad).sum()

    (eager,) = torch.autograd.grad(loss(weight), weight)
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    (traced,) = torch.autograd.grad(compiled(weight), weight)
    torch.testing.assert_close(traced, eager)


@pytest.mark.parametrize(
    ("shape", "n", "seq_len", "match"),
    [((9,), 3, 4, "2 \\* seq_len - 1 = 7"), ((7,), 0, 4, "n must be in"), ((7,), 5, 4, "n must be in")],
)
def test_bad_lengths_are_named(shape: tuple[int, ...], n: int, seq_len: int, match: str) -> None:
    for sums in (True, False):
        with pytest.raises(ValueError, match=match):
            toeplitz_matrix(torch.zeros(shape), n, seq_len, diagonal_sums=sums)
