"""TinyAttention (aMLP): formula, causality, padding, errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from gmlp.nn import TinyAttention


def randomize_(module: torch.nn.Module, std: float = 0.5) -> torch.nn.Module:
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, std)
    return module


def hand_attention(attn: TinyAttention, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(attn_dim)) v, then the output projection; ``keep`` (n, n) per sample optional."""
    n, batch, _ = x.shape
    a = attn.attn_dim
    wq, wk, wv = attn.qkv.weight.split(a, dim=0)
    outs = []
    for b in range(batch):
        xb = x[:, b]
        q, k, v = xb @ wq.t(), xb @ wk.t(), xb @ wv.t()
        scores = q @ k.t() / math.sqrt(a)
        if keep is not None:
            scores = scores.masked_fill(~keep, float("-inf"))
        outs.append(scores.softmax(-1) @ v @ attn.out.weight.t() + attn.out.bias)
    return torch.stack(outs, dim=1)


def test_formula_matches_hand_computation() -> None:
    attn = randomize_(TinyAttention(12, 8, 10))
    x = torch.randn(5, 3, 12)
    torch.testing.assert_close(attn(x), hand_attention(attn, x), atol=1e-5, rtol=1e-5)


def test_causal_formula_matches_hand_computation() -> None:
    attn = randomize_(TinyAttention(12, 8, 10, causal=True))
    x = torch.randn(5, 2, 12)
    keep = torch.ones(5, 5, dtype=torch.bool).tril()
    torch.testing.assert_close(attn(x), hand_attention(attn, x, keep), atol=1e-5, rtol=1e-5)


def test_qkv_has_no_bias_and_output_has_one() -> None:
    """The wiring that reproduces the paper's Table 5 parameter counts: qkv without bias, out with bias."""
    attn = TinyAttention(512, 64, 1536)
    assert attn.qkv.bias is None
    assert attn.out.bias is not None
    assert sum(p.numel() for p in attn.parameters()) == 3 * 512 * 64 + 64 * 1536 + 1536


@given(
    n=st.integers(2, 7),
    batch=st.integers(1, 2),
    masked=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_causal_gradients_are_exactly_zero(dependence, assert_causal, n, batch, masked, seed) -> None:
    torch.manual_seed(seed)
    attn = randomize_(TinyAttention(8, 4, 6, causal=True))
    mask = None
    if masked:
        mask = torch.rand(batch, n) > 0.3
        mask[:, 0] = True
    assert_causal(dependence(lambda x: attn(x, mask), torch.randn(n, batch, 8)), mask)


def test_non_causal_attends_to_the_future(dependence) -> None:
    attn = randomize_(TinyAttention(8, 4, 6))
    dep = dependence(lambda x: attn(x), torch.randn(5, 1, 8))
    assert torch.all(dep[:, 0, :, 0] > 0)


@given(
    lengths=st.lists(st.integers(1, 6), min_size=1, max_size=3),
    extra=st.integers(0, 3),
    causal=st.booleans(),
    pad_kind=st.sampled_from(["random", "huge", "nan", "inf"]),
    mask_dtype=st.sampled_from([torch.bool, torch.int64, torch.uint8]),
    seed=st.integers(0, 2**16),
)
def test_padding_equals_unpadded_run(lengths, extra, causal, pad_kind, mask_dtype, seed) -> None:
    torch.manual_seed(seed)
    attn = randomize_(TinyAttention(8, 4, 6, causal=causal))
    n = max(lengths) + extra
    mask = torch.arange(n)[None, :] < torch.tensor(lengths)[:, None]
    x = torch.randn(n, len(lengths), 8)
    garbage = {"random": torch.randn_like(x) * 100, "huge": torch.full_like(x, 3e38),
               "nan": torch.full_like(x, float("nan")), "inf": torch.full_like(x, float("inf"))}[pad_kind]
    x = torch.where(mask.t().unsqueeze(-1), x, garbage)
    out = attn(x, mask.to(mask_dtype))
    for b, m in enumerate(lengths):
        torch.testing.assert_close(out[:m, b : b + 1], attn(x[:m, b : b + 1].clone()), atol=1e-5, rtol=1e-5)


@given(n=st.integers(2, 7), batch=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_pads_anywhere_are_ignored(n, batch, seed) -> None:
    """Attention has no notion of position: real outputs of a sequence with pads anywhere equal the run
    of the real tokens alone, whatever the pads hold."""
    torch.manual_seed(seed)
    attn = randomize_(TinyAttention(8, 4, 6))
    mask = torch.rand(batch, n) > 0.4
    x = torch.randn(n, batch, 8)
    noisy = torch.where(mask.t().unsqueeze(-1), x, torch.full_like(x, float("nan")))
    out = attn(noisy, mask.int())
    for b in range(batch):
        real = mask[b]
        if real.any():
            torch.testing.assert_close(out[real, b], attn(x[real, b : b + 1])[:, 0], atol=1e-5, rtol=1e-5)


def test_pads_leak_without_mask() -> None:
    attn = randomize_(TinyAttention(8, 4, 6))
    x = torch.randn(5, 1, 8)
    y = x.clone()
    y[3:] = torch.randn(2, 1, 8)
    assert (attn(x)[:3] - attn(y)[:3]).abs().max() > 1e-3


def test_fully_padded_sample_gives_no_nan() -> None:
    attn = randomize_(TinyAttention(8, 4, 6, causal=True))
    x = torch.randn(4, 2, 8)
    x[:, 1] = float("nan")
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    out = attn(x, mask)
    assert torch.isfinite(out).all()


def test_wrong_channel_count() -> None:
    with pytest.raises(ValueError, match=r"8 channels.*\(3, 1, 5\)"):
        TinyAttention(8, 4, 6)(torch.randn(3, 1, 5))


def test_mask_of_wrong_shape_and_dtype() -> None:
    attn = TinyAttention(8, 4, 6)
    x = torch.randn(3, 2, 8)
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(2, 4\)"):
        attn(x, torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="float64"):
        attn(x, torch.ones(2, 3, dtype=torch.float64))
    with pytest.raises(TypeError, match="list"):
        attn(x, [[1, 1, 1], [1, 1, 1]])  # type: ignore[arg-type]


@pytest.mark.parametrize("arg", ["dim", "attn_dim", "out_dim"])
def test_bad_sizes_are_named(arg: str) -> None:
    kwargs = {"dim": 8, "attn_dim": 4, "out_dim": 6, arg: 0}
    with pytest.raises(ValueError, match=arg):
        TinyAttention(**kwargs)


def test_numpy_integer_sizes_are_taken() -> None:
    """Sizes computed with numpy are ints, as for the other layers (a GMLPBlock with a numpy ``attn_dim``
    was refused with "attn_dim must be a positive int, got np.int64(4)"); they are stored as Python ints."""
    attn = TinyAttention(np.int64(8), np.int32(4), np.int64(6))
    assert (attn.dim, attn.attn_dim) == (8, 4) and type(attn.attn_dim) is int
    assert attn.qkv.weight.shape == (12, 8) and attn.out.weight.shape == (6, 4)
    x = torch.randn(5, 2, 8)
    torch.testing.assert_close(randomize_(attn)(x), hand_attention(attn, x), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="attn_dim must be a positive int, got np.int64"):
        TinyAttention(8, np.int64(0), 6)
