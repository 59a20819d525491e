"""TokenProjection and SpatialGatingUnit: Toeplitz structure, causality, padding, ablation variants, errors.

Spatial weights are randomised (the near-zero init would make most of these checks pass trivially).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from gmlp.nn import VARIANTS, SpatialGatingUnit, TokenProjection


def randomize_(module: torch.nn.Module, std: float = 0.5) -> torch.nn.Module:
    """Give every parameter a random, non-trivial value (spatial biases around 1, not exactly 1)."""
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, std)
    return module


def right_padding_mask(lengths: list[int], n: int) -> torch.Tensor:
    """Right-padding mask (batch, n), True for the first ``lengths[b]`` tokens of sample b."""
    return torch.arange(n)[None, :] < torch.tensor(lengths)[:, None]


def fill_pads(x: torch.Tensor, mask: torch.Tensor, kind: str) -> torch.Tensor:
    """Copy of token-major ``x`` (n, b, c) with padded positions replaced by ``kind`` garbage."""
    pads = ~mask.t()  # (n, b)
    if kind == "random":
        garbage = torch.randn_like(x) * 10
    elif kind == "huge":
        garbage = torch.full_like(x, 3e38)
    elif kind == "nan":
        garbage = torch.full_like(x, float("nan"))
    elif kind == "inf":
        garbage = torch.full_like(x, float("-inf"))
    else:
        raise AssertionError(kind)
    return torch.where(pads.unsqueeze(-1), garbage, x)


MASK_DTYPES = [torch.bool, torch.int64, torch.int32, torch.uint8]

#: The variants built on the single token projection f (toeplitz, causal, heads apply); "mixer" (a
#: 2-layer token MLP that refuses those options) has its own tests in tests/nn/test_mixer_variant.py.
PROJECTION_VARIANTS = sorted(set(VARIANTS) - {"mixer"})


# ---------------------------------------------------------------------------------------------------
# Toeplitz structure (issue item 5)


@pytest.mark.parametrize("heads", [1, 3])
def test_toeplitz_matrix_depends_only_on_offset(heads: int) -> None:
    n = 7
    proj = randomize_(TokenProjection(n, toeplitz=True, heads=heads))
    w = proj.matrix()
    expected_shape = (n, n) if heads == 1 else (heads, n, n)
    assert tuple(w.shape) == expected_shape
    w = w.reshape(-1, n, n)
    for h in range(w.shape[0]):
        for i in range(n):
            for j in range(n):
                # W[i, j] == weight[(i - j) + n - 1], i.e. it depends only on i - j
                assert w[h, i, j] == w[h, i - min(i, j), j - min(i, j)]
                assert w[h, i, j] == proj.weight.reshape(-1, 2 * n - 1)[h, i - j + n - 1]
    # and the 2n-1 diagonals really take 2n-1 different values (the test can fail for a constant W)
    assert torch.unique(w[0]).numel() == 2 * n - 1


@given(n=st.integers(1, 9), m=st.integers(1, 9), heads=st.sampled_from([1, 3]), seed=st.integers(0, 99))
def test_toeplitz_weight_gradient_is_the_sum_of_its_diagonal(n: int, m: int, heads: int, seed: int) -> None:
    """d/d weight[k] of sum(G * W) is the sum of G over the diagonal i - j = k - (n - 1), for any length."""
    m = min(m, n)
    torch.manual_seed(seed)
    proj = TokenProjection(n, toeplitz=True, heads=heads)
    g = torch.randn(heads, m, m)
    (grad,) = torch.autograd.grad((proj.matrix(m).reshape(heads, m, m) * g).sum(), proj.weight)
    expected = torch.zeros(heads, 2 * n - 1)
    for i in range(m):
        for j in range(m):
            expected[:, i - j + n - 1] += g[:, i, j]
    torch.testing.assert_close(grad.reshape(heads, -1), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("heads", [1, 2, 4])
@pytest.mark.parametrize("n", [1, 5, 16])
def test_toeplitz_parameter_count(n: int, heads: int) -> None:
    proj = TokenProjection(n, toeplitz=True, heads=heads)
    assert proj.weight.numel() == heads * (2 * n - 1)
    assert proj.bias.numel() == heads * n
    full = TokenProjection(n, toeplitz=False, heads=heads)
    assert full.weight.numel() == heads * n * n


@given(
    n=st.integers(1, 9),
    m=st.integers(1, 9),
    heads=st.sampled_from([1, 2]),
    toeplitz=st.booleans(),
    causal=st.booleans(),
)
def test_matrix_for_shorter_input_is_leading_block(
    n: int, m: int, heads: int, toeplitz: bool, causal: bool
) -> None:
    m = min(m, n)
    torch.manual_seed(n * 100 + m)
    proj = randomize_(TokenProjection(n, toeplitz=toeplitz, causal=causal, heads=heads))
    full, short = proj.matrix(), proj.matrix(m)
    assert torch.equal(short, full[..., :m, :m])
    # and it is what forward uses: a length-m input goes through W[:m, :m] and b[:m]
    z = torch.randn(m, 2, 4)
    out = proj(z)
    w = short.reshape(heads, m, m)
    b = proj.bias.reshape(heads, n)[:, :m]
    zh = z.reshape(m, 2, heads, 4 // heads)
    ref = torch.einsum("hij,jbhc->ibhc", w, zh) + b.t()[:, None, :, None]
    torch.testing.assert_close(out, ref.reshape(m, 2, 4), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("toeplitz", [False, True])
@pytest.mark.parametrize("causal", [False, True])
def test_matrix_takes_numpy_ints_and_names_a_bad_n(toeplitz: bool, causal: bool) -> None:
    """``matrix(n)`` is public (plots, users): a float or bool ``n`` gave torch's slicing/unfold errors (or,
    for ``True``, silently the 1 x 1 matrix), now a ValueError naming ``n``; numpy ints are ints."""
    proj = randomize_(TokenProjection(6, toeplitz=toeplitz, causal=causal, heads=2))
    for n in range(1, 7):
        torch.testing.assert_close(proj.matrix(np.int64(n)), proj.matrix(n), rtol=0, atol=0)
    for bad in (2.0, True, False, "3", 2.5):
        with pytest.raises(ValueError, match=r"n must be an int in \[1, seq_len=6\], got"):
            proj.matrix(bad)  # type: ignore[arg-type]
    for bad in (0, 7, np.int64(7)):
        with pytest.raises(ValueError, match=r"n must be in \[1, seq_len=6\]"):
            proj.matrix(bad)


def test_toeplitz_matrix_refuses_too_long() -> None:
    proj = TokenProjection(4, toeplitz=True)
    with pytest.raises(ValueError, match="seq_len=4"):
        proj.matrix(5)


def test_causal_matrix_is_lower_triangular() -> None:
    for toeplitz in (False, True):
        proj = randomize_(TokenProjection(6, toeplitz=toeplitz, causal=True, heads=2))
        w = proj.matrix()
        lower = torch.ones(6, 6, dtype=torch.bool).tril()
        assert torch.all(w[..., ~lower] == 0)
        assert torch.all(w[..., lower] != 0)


@pytest.mark.parametrize("toeplitz", [False, True])
def test_heads_have_their_own_w(toeplitz: bool) -> None:
    """Perturbing one head's W changes exactly that head's channel group and no other."""
    n, heads, channels = 5, 3, 12
    group = channels // heads
    proj = randomize_(TokenProjection(n, toeplitz=toeplitz, heads=heads))
    z = torch.randn(n, 2, channels)
    before = proj(z).detach()
    with torch.no_grad():
        proj.weight[1] += torch.randn_like(proj.weight[1])
    after = proj(z).detach()
    changed = (after - before).abs().amax(dim=(0, 1))  # per channel
    assert torch.all(changed[group : 2 * group] > 1e-3)
    assert torch.all(changed[:group] == 0)
    assert torch.all(changed[2 * group :] == 0)


def test_heads_match_independent_single_head_projections() -> None:
    n, heads, channels = 6, 2, 8
    proj = randomize_(TokenProjection(n, heads=heads))
    z = torch.randn(n, 3, channels)
    out = proj(z)
    for h in range(heads):
        single = TokenProjection(n)
        with torch.no_grad():
            single.weight.copy_(proj.weight[h])
            single.bias.copy_(proj.bias[h])
        sl = slice(h * channels // heads, (h + 1) * channels // heads)
        torch.testing.assert_close(out[..., sl], single(z[..., sl].contiguous()), atol=1e-6, rtol=1e-6)


def test_token_projection_formula() -> None:
    """g[i] = sum_j W[i, j] z[j] + b[i], the same W and b for every channel."""
    n = 5
    proj = randomize_(TokenProjection(n))
    z = torch.randn(n, 2, 3)
    out = proj(z)
    w, b = proj.weight.detach(), proj.bias.detach()
    for i in range(n):
        ref = sum(w[i, j] * z[j] for j in range(n)) + b[i]
        torch.testing.assert_close(out[i], ref, atol=1e-5, rtol=1e-5)


def test_init_is_near_identity_gate() -> None:
    proj = TokenProjection(32)
    assert torch.all(proj.bias == 1)
    assert proj.weight.abs().max() < 1e-4
    assert 1e-7 < proj.weight.std() < 1e-5


# ---------------------------------------------------------------------------------------------------
# causality by gradients (issue item 3)


@given(
    n=st.integers(2, 7),
    batch=st.integers(1, 2),
    heads=st.sampled_from([1, 2]),
    toeplitz=st.booleans(),
    layer=st.sampled_from(["projection", "sgu", "linear", "additive", "multiplicative"]),
    masked=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_causal_gradients_are_exactly_zero(
    dependence, assert_causal, n, batch, heads, toeplitz, layer, masked, seed
) -> None:
    torch.manual_seed(seed)
    dim = 8
    if layer == "projection":
        module = TokenProjection(n + 2, toeplitz=toeplitz, causal=True, heads=heads)
    else:
        module = SpatialGatingUnit(dim, n + 2, variant=layer, toeplitz=toeplitz, causal=True, heads=heads)
    randomize_(module)
    mask = None
    if masked:
        mask = torch.rand(batch, n) > 0.3
        mask[:, 0] = True
    x = torch.randn(n, batch, dim)
    assert_causal(dependence(lambda z: module(z, mask), x), mask)


def test_non_causal_sgu_does_depend_on_future(dependence) -> None:
    """Sanity check that the dependence measure sees the future when causal=False."""
    sgu = randomize_(SpatialGatingUnit(8, 5, causal=False))
    dep = dependence(lambda z: sgu(z), torch.randn(5, 1, 8))
    assert torch.all(dep[:, 0, :, 0] > 0)


def test_causal_accepts_any_length_up_to_seq_len() -> None:
    sgu = randomize_(SpatialGatingUnit(8, 6, causal=True))
    x = torch.randn(6, 2, 8)
    full = sgu(x)
    for m in range(1, 7):
        torch.testing.assert_close(sgu(x[:m]), full[:m], atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------------------------------------
# padding (issue item 4)


@given(
    lengths=st.lists(st.integers(1, 6), min_size=1, max_size=3),
    extra=st.integers(0, 3),
    heads=st.sampled_from([1, 2]),
    toeplitz=st.booleans(),
    causal=st.booleans(),
    variant=st.sampled_from(PROJECTION_VARIANTS),
    pad_kind=st.sampled_from(["random", "huge", "nan", "inf"]),
    mask_dtype=st.sampled_from(MASK_DTYPES),
    seed=st.integers(0, 2**16),
)
def test_sgu_padding_equals_unpadded_run(
    lengths, extra, heads, toeplitz, causal, variant, pad_kind, mask_dtype, seed
) -> None:
    torch.manual_seed(seed)
    dim = 8
    n = max(lengths) + extra
    if variant == "none":  # no token projection to configure
        toeplitz, heads = False, 1
    sgu = SpatialGatingUnit(dim, 10, variant=variant, toeplitz=toeplitz, causal=causal, heads=heads)
    randomize_(sgu)
    mask = right_padding_mask(lengths, n)
    x = fill_pads(torch.randn(n, len(lengths), dim), mask, pad_kind)
    out = sgu(x, mask.to(mask_dtype))
    for b, m in enumerate(lengths):
        alone = sgu(x[:m, b : b + 1].clone())
        assert torch.isfinite(out[:m, b]).all()
        torch.testing.assert_close(out[:m, b : b + 1], alone, atol=1e-5, rtol=1e-5)


@given(
    n=st.integers(2, 7),
    batch=st.integers(1, 3),
    heads=st.sampled_from([1, 2]),
    toeplitz=st.booleans(),
    causal=st.booleans(),
    mask_dtype=st.sampled_from(MASK_DTYPES),
    seed=st.integers(0, 2**16),
)
def test_sgu_pads_anywhere_do_not_leak(n, batch, heads, toeplitz, causal, mask_dtype, seed) -> None:
    torch.manual_seed(seed)
    sgu = randomize_(SpatialGatingUnit(8, 8, toeplitz=toeplitz, causal=causal, heads=heads))
    mask = torch.rand(batch, n) > 0.4
    x = torch.randn(n, batch, 8)
    outs = [sgu(fill_pads(x, mask, kind), mask.to(mask_dtype)) for kind in ("random", "huge", "nan")]
    real = mask.t()
    for other in outs[1:]:
        diff = (outs[0] - other).abs()[real]
        assert diff.numel() == 0 or diff.max() <= 1e-5


def test_sgu_pads_do_leak_without_a_mask() -> None:
    """Without the mask, changing the pad contents changes real outputs (so the padding tests can fail)."""
    sgu = randomize_(SpatialGatingUnit(8, 6))
    mask = right_padding_mask([3], 6)
    x = torch.randn(6, 1, 8)
    a = sgu(fill_pads(x, mask, "random"))[:3]
    b = sgu(fill_pads(x, mask, "random"))[:3]
    assert (a - b).abs().max() > 1e-3


def test_int_and_bool_masks_agree() -> None:
    sgu = randomize_(SpatialGatingUnit(8, 6))
    mask = torch.tensor([[1, 1, 0, 1, 0, 0], [1, 1, 1, 1, 1, 0]])
    x = torch.randn(6, 2, 8)
    ref = sgu(x, mask.bool())
    for dtype in MASK_DTYPES:
        assert torch.equal(sgu(x, mask.to(dtype)), ref)
    # any non-zero integer counts as "real"
    assert torch.equal(sgu(x, mask * 7), ref)


def test_all_ones_mask_equals_no_mask() -> None:
    sgu = randomize_(SpatialGatingUnit(8, 6, heads=2))
    x = torch.randn(6, 3, 8)
    torch.testing.assert_close(sgu(x, torch.ones(3, 6, dtype=torch.bool)), sgu(x), atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------------------------------------
# ablation variants (issue item 6)


def _hand_f(sgu: SpatialGatingUnit, z: torch.Tensor) -> torch.Tensor:
    """f(Z) = W LayerNorm(Z) + b computed with explicit loops over tokens (token-major z)."""
    norm = F.layer_norm(z, (z.shape[-1],), sgu.norm.weight, sgu.norm.bias, sgu.norm.eps)
    w, b = sgu.proj.weight, sgu.proj.bias
    n = z.shape[0]
    return torch.stack([sum(w[i, j] * norm[j] for j in range(n)) + b[i] for i in range(n)])


@pytest.mark.parametrize("variant", PROJECTION_VARIANTS)
def test_variant_formulas(variant: str) -> None:
    dim, n = 8, 5
    sgu = randomize_(SpatialGatingUnit(dim, n, variant=variant))
    z = torch.randn(n, 2, dim)
    out = sgu(z)
    if variant == "none":
        expected = z
    elif variant == "linear":
        expected = _hand_f(sgu, z)
    elif variant == "additive":
        expected = z + _hand_f(sgu, z)
    elif variant == "multiplicative":
        expected = z * _hand_f(sgu, z)
    else:
        z1, z2 = z[..., : dim // 2], z[..., dim // 2 :]  # first half = bypass, second half = gate input
        expected = z1 * _hand_f(sgu, z2)
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("variant", "width"),
    [("none", 12), ("linear", 12), ("additive", 12), ("multiplicative", 12), ("sgu", 6)],
)
def test_variant_output_widths(variant: str, width: int) -> None:
    sgu = SpatialGatingUnit(12, 4, variant=variant)
    assert sgu.out_features == width
    assert sgu.gate_dim == width
    assert sgu(torch.randn(4, 2, 12)).shape == (4, 2, width)


def test_variant_none_has_no_spatial_parameters() -> None:
    assert sum(p.numel() for p in SpatialGatingUnit(12, 4, variant="none").parameters()) == 0


def test_sgu_gate_bias_is_added_to_the_gate() -> None:
    sgu = randomize_(SpatialGatingUnit(8, 4))
    z = torch.randn(4, 2, 8)
    extra = torch.randn(4, 2, 4)
    z1, z2 = z[..., :4], z[..., 4:]
    torch.testing.assert_close(sgu(z, gate_bias=extra), z1 * (_hand_f(sgu, z2) + extra), atol=1e-5, rtol=1e-5)


def test_sgu_at_init_is_identity_gate() -> None:
    sgu = SpatialGatingUnit(16, 32)
    z = torch.randn(32, 2, 16)
    torch.testing.assert_close(sgu(z), z[..., :8], atol=1e-4, rtol=0)


def test_sgu_parameter_count() -> None:
    e, n = 12, 7
    assert sum(p.numel() for p in SpatialGatingUnit(e, n).parameters()) == e + n * n + n  # LN(e/2) + W + b
    assert sum(p.numel() for p in SpatialGatingUnit(e, n, toeplitz=True).parameters()) == e + (2 * n - 1) + n


# ---------------------------------------------------------------------------------------------------
# bad input (issue item 11)


def test_unknown_variant_is_named() -> None:
    with pytest.raises(ValueError, match="'gated_linear'") as err:
        SpatialGatingUnit(8, 4, variant="gated_linear")
    assert "sgu" in str(err.value)  # and the known ones are listed


def test_odd_d_ffn_for_sgu() -> None:
    with pytest.raises(ValueError, match=r"even.*7|7.*even"):
        SpatialGatingUnit(7, 4)
    SpatialGatingUnit(7, 4, variant="linear")  # only the split variant needs an even width


def test_heads_not_dividing_width() -> None:
    with pytest.raises(ValueError, match=r"heads \(3\).*\(4\)"):
        SpatialGatingUnit(8, 4, heads=3)
    with pytest.raises(ValueError, match="heads"):
        TokenProjection(4, heads=0)
    with pytest.raises(ValueError, match=r"channels \(10\).*heads \(4\)"):
        TokenProjection(4, heads=4)(torch.randn(4, 1, 10))


@pytest.mark.parametrize("heads", [np.int64(2), np.int32(4), torch.tensor(2)])
def test_numpy_integer_heads_are_taken(heads) -> None:
    """A head count computed with numpy is an int, as every other size of the layers: it was refused with
    "heads (2) must be a positive divisor of the gate width (4)", which it is."""
    sgu = randomize_(SpatialGatingUnit(8, 4, heads=heads, toeplitz=True))
    assert type(sgu.proj.heads) is int and sgu.proj.heads == int(heads)
    assert sgu.proj.weight.shape == (int(heads), 7)
    ref = SpatialGatingUnit(8, 4, heads=int(heads), toeplitz=True)
    ref.load_state_dict(sgu.state_dict())
    z = torch.randn(4, 2, 8)
    torch.testing.assert_close(sgu(z), ref(z), atol=0, rtol=0)
    with pytest.raises(ValueError, match=r"heads \(3\)"):
        SpatialGatingUnit(8, 4, heads=np.int64(3))


def test_sequence_longer_than_seq_len() -> None:
    sgu = SpatialGatingUnit(8, 4)
    with pytest.raises(ValueError, match=r"length 5.*seq_len=4"):
        sgu(torch.randn(5, 1, 8))


def test_wrong_channel_count() -> None:
    with pytest.raises(ValueError, match=r"8 channels.*\(4, 1, 6\)"):
        SpatialGatingUnit(8, 4)(torch.randn(4, 1, 6))


def test_wrong_rank_and_empty_sequence() -> None:
    sgu = SpatialGatingUnit(8, 4)
    with pytest.raises(ValueError, match="token-major"):
        sgu(torch.randn(1, 4, 8)[0])
    with pytest.raises(ValueError, match="length 0"):
        sgu(torch.randn(0, 1, 8))


def test_mask_of_wrong_shape() -> None:
    sgu = SpatialGatingUnit(8, 4)
    with pytest.raises(ValueError, match=r"\(2, 4\).*\(4, 2\)"):
        sgu(torch.randn(4, 2, 8), torch.ones(4, 2, dtype=torch.bool))  # (seq, batch) instead of (batch, seq)


def test_float_mask_dtype() -> None:
    sgu = SpatialGatingUnit(8, 4)
    with pytest.raises(TypeError, match="float32"):
        sgu(torch.randn(4, 2, 8), torch.ones(2, 4))


def test_bad_seq_len() -> None:
    for bad in (0, -3, 2.5):
        with pytest.raises(ValueError, match="seq_len"):
            TokenProjection(bad)  # type: ignore[arg-type]


def test_gate_bias_refused_for_variant_none() -> None:
    with pytest.raises(ValueError, match="none"):
        SpatialGatingUnit(8, 4, variant="none")(torch.randn(4, 1, 8), gate_bias=torch.randn(4, 1, 8))


@pytest.mark.parametrize("heads", [1, 2])
def test_fft_toeplitz_path_ignores_pad_contents(heads: int) -> None:
    """The FFT fast path (``fft_threshold``) sees the same zeroed pads as the dense one: NaN cannot leak."""
    dense = randomize_(TokenProjection(12, toeplitz=True, heads=heads))
    fft = TokenProjection(12, toeplitz=True, heads=heads, fft_threshold=1)
    fft.load_state_dict(dense.state_dict())
    mask = torch.tensor([[1, 0, 1, 1, 0, 0, 1, 1, 1, 0], [1] * 7 + [0] * 3], dtype=torch.bool)
    x = torch.randn(10, 2, 4)
    noisy = fill_pads(x, mask, "nan")
    out = fft(noisy, mask)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, dense(fill_pads(x, mask, "random"), mask), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[:7, 1:], dense(x[:7, 1:]), atol=1e-5, rtol=1e-5)  # = unpadded run
