"""The ``"mixer"`` variant of the spatial unit (paper Table 3's "MLP-Mixer (2-layer spatial MLP)" row):
s(Z) = W2 GELU(W1 LayerNorm(Z) + b1) + b2 over the token axis, for every channel.

Checked against a reference written with plain batch-major ops, for padding (outputs at real tokens equal
those of the unpadded sequence, no gradient to padded inputs), the refused options (causal, Toeplitz,
heads, FFT, tiny attention), the documented init and parameter names, and inside a block.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from gmlp.nn import VARIANTS, GMLPBlock, SpatialGatingUnit
from gmlp.nn.sgu import TokenLinear

MASK_DTYPES = [torch.bool, torch.int64, torch.uint8]


def randomize_(module: torch.nn.Module, std: float = 0.5) -> torch.nn.Module:
    """Random, non-trivial parameters (the near-zero W2 would make most checks pass trivially)."""
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, std)
    return module


def reference(sgu: SpatialGatingUnit, z: torch.Tensor) -> torch.Tensor:
    """s(Z) from its formula, batch-major: LayerNorm over channels, then for every (sample, channel) the
    token vector t (m,) goes through ``W2[:m] GELU(W1[:, :m] t + b1) + b2[:m]``."""
    m = z.shape[0]
    norm = sgu.norm
    zn = F.layer_norm(z.permute(1, 0, 2), (z.shape[-1],), norm.weight, norm.bias, norm.eps)  # (b, m, c)
    w1, b1 = sgu.mix1.weight[:, :m], sgu.mix1.bias
    w2, b2 = sgu.mix2.weight[:m], sgu.mix2.bias[:m]
    tokens = zn.transpose(1, 2)  # (b, c, m): one token vector per channel
    hidden = F.gelu(F.linear(tokens, w1, b1))  # (b, c, d_tok)
    out = F.linear(hidden, w2, b2)  # (b, c, m)
    return out.permute(2, 0, 1)  # back to (m, b, c)


def right_padding_mask(lengths: list[int], n: int) -> torch.Tensor:
    return torch.arange(n)[None, :] < torch.tensor(lengths)[:, None]


def fill_pads(x: torch.Tensor, mask: torch.Tensor, kind: str) -> torch.Tensor:
    values = {"random": torch.randn_like(x) * 10, "huge": torch.full_like(x, 3e38),
              "nan": torch.full_like(x, float("nan")), "inf": torch.full_like(x, float("-inf"))}
    return torch.where(~mask.t().unsqueeze(-1), values[kind], x)


def test_mixer_is_a_variant() -> None:
    assert "mixer" in VARIANTS and "W2 GELU(W1 LayerNorm(Z) + b1) + b2" in VARIANTS["mixer"]


@given(
    n=st.integers(1, 7),
    extra=st.integers(0, 3),
    batch=st.integers(1, 3),
    dim=st.sampled_from([3, 8]),
    token_mlp_dim=st.sampled_from([None, 1, 5, 16]),
    seed=st.integers(0, 2**16),
)
def test_mixer_matches_its_formula(n, extra, batch, dim, token_mlp_dim, seed) -> None:
    """Any length m <= seq_len uses W1[:, :m], W2[:m], b2[:m]; any hidden size d_tok."""
    torch.manual_seed(seed)
    sgu = randomize_(SpatialGatingUnit(dim, n + extra, variant="mixer", token_mlp_dim=token_mlp_dim))
    z = torch.randn(n, batch, dim)
    out = sgu(z)
    assert out.shape == (n, batch, dim)
    torch.testing.assert_close(out, reference(sgu, z), atol=1e-5, rtol=1e-5)


@given(
    lengths=st.lists(st.integers(1, 6), min_size=1, max_size=3),
    extra=st.integers(0, 3),
    pad_kind=st.sampled_from(["random", "huge", "nan", "inf"]),
    mask_dtype=st.sampled_from(MASK_DTYPES),
    token_mlp_dim=st.sampled_from([None, 3, 12]),
    seed=st.integers(0, 2**16),
)
def test_mixer_padding_equals_unpadded_run(lengths, extra, pad_kind, mask_dtype, token_mlp_dim, seed) -> None:
    torch.manual_seed(seed)
    n = max(lengths) + extra
    sgu = randomize_(SpatialGatingUnit(8, 10, variant="mixer", token_mlp_dim=token_mlp_dim))
    mask = right_padding_mask(lengths, n)
    x = fill_pads(torch.randn(n, len(lengths), 8), mask, pad_kind)
    out = sgu(x, mask.to(mask_dtype))
    for b, m in enumerate(lengths):
        alone = sgu(x[:m, b : b + 1].clone())
        assert torch.isfinite(out[:m, b]).all()
        torch.testing.assert_close(out[:m, b : b + 1], alone, atol=1e-5, rtol=1e-5)


@given(n=st.integers(2, 6), batch=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_mixer_real_outputs_get_no_gradient_from_pads_anywhere(dependence, n, batch, seed) -> None:
    """Padding at any position: a real output's gradient w.r.t. every padded input is exactly 0, and
    w.r.t. every real input non-zero; samples never depend on each other."""
    torch.manual_seed(seed)
    sgu = randomize_(SpatialGatingUnit(8, 8, variant="mixer"))
    mask = torch.rand(batch, n) > 0.4
    mask[:, 0] = True
    dep = dependence(lambda z: sgu(z, mask), torch.randn(n, batch, 8))
    same = dep.diagonal(dim1=1, dim2=3).permute(2, 0, 1)  # (batch, t, t')
    real_on_pad = mask[:, :, None] & ~mask[:, None, :]
    assert torch.all(same[real_on_pad] == 0)
    real_on_real = mask[:, :, None] & mask[:, None, :]
    assert torch.all(same[real_on_real] > 0)  # (non-causal: the future too)
    other = ~torch.eye(batch, dtype=torch.bool)
    assert torch.all(dep.permute(1, 3, 0, 2)[other] == 0)


def test_mixer_pads_do_leak_without_a_mask() -> None:
    """The padding tests can fail: without the mask, pad contents change real outputs."""
    sgu = randomize_(SpatialGatingUnit(8, 6, variant="mixer"))
    mask = right_padding_mask([3], 6)
    x = torch.randn(6, 1, 8)
    assert (sgu(fill_pads(x, mask, "random"))[:3] - sgu(fill_pads(x, mask, "random"))[:3]).abs().max() > 1e-3


def test_mixer_parameters_are_flat_and_named() -> None:
    sgu = SpatialGatingUnit(12, 6, variant="mixer", token_mlp_dim=10)
    shapes = {k: tuple(v.shape) for k, v in sgu.named_parameters()}
    assert shapes == {
        "norm.weight": (12,), "norm.bias": (12,), "mix1.weight": (10, 6), "mix1.bias": (10,),
        "mix2.weight": (6, 10), "mix2.bias": (6,),
    }
    assert sgu.proj is None and sgu.out_features == sgu.gate_dim == 12
    assert isinstance(sgu.mix1, TokenLinear) and "token_mlp_dim=10" in repr(sgu)
    assert SpatialGatingUnit(12, 6, variant="mixer").mix1.weight.shape == (6, 6)  # default d_tok = seq_len


def test_mixer_init_is_the_documented_one_and_trains() -> None:
    """W1 ~ N(0, 1/sqrt(n)), b1 = 0, W2 ~ N(0, init_std), b2 = 1: s(Z) starts at ~1 (as the linear variant's
    f) and W2 gets a gradient at once (both layers near zero would leave every weight without one)."""
    n = 64
    sgu = SpatialGatingUnit(16, n, variant="mixer", token_mlp_dim=128, init_std=1e-6)
    assert abs(sgu.mix1.weight.std().item() - n**-0.5) < 0.1 * n**-0.5
    assert torch.equal(sgu.mix1.bias, torch.zeros(128)) and torch.equal(sgu.mix2.bias, torch.ones(n))
    assert 1e-7 < sgu.mix2.weight.std().item() < 1e-5
    z = torch.randn(n, 2, 16)
    out = sgu(z)
    torch.testing.assert_close(out, torch.ones_like(out), atol=1e-4, rtol=0)
    (out * torch.randn_like(out)).sum().backward()
    assert sgu.mix2.weight.grad.abs().max() > 1e-3
    with torch.no_grad():
        sgu.mix2.bias.zero_()
    sgu.mix2.reset_parameters()
    assert torch.equal(sgu.mix2.bias, torch.ones(n))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(causal=True), r"variant 'mixer' cannot be causal"),
        (dict(toeplitz=True), r"toeplitz=True .* variant 'mixer' .* use toeplitz=False"),
        (dict(heads=2), r"heads must be 1 for variant 'mixer'.*got 2"),
        (dict(fft_threshold=4), r"fft_threshold .* not to variant 'mixer', got 4"),
        (dict(token_mlp_dim=0), r"token_mlp_dim must be an int >= 1, got 0"),
        (dict(token_mlp_dim=2.5), r"token_mlp_dim must be an int >= 1, got 2.5"),
        (dict(init_std=-1.0), r"init_std must be a number in \[0, inf\), got -1.0"),
    ],
)
def test_mixer_refuses_what_does_not_apply_by_name(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SpatialGatingUnit(8, 6, variant="mixer", **kwargs)


@pytest.mark.parametrize("variant", ["sgu", "linear", "none"])
def test_token_mlp_dim_is_refused_for_the_other_variants(variant: str) -> None:
    match = rf"token_mlp_dim .* 'mixer' only, got token_mlp_dim=4 .*'{variant}'"
    with pytest.raises(ValueError, match=match):
        SpatialGatingUnit(8, 6, variant=variant, token_mlp_dim=4)


def test_mixer_input_checks_name_the_argument() -> None:
    sgu = SpatialGatingUnit(8, 6, variant="mixer")
    with pytest.raises(ValueError, match=r"z must have shape \(seq_len, batch, 8\)"):
        sgu(torch.randn(6, 8))
    with pytest.raises(ValueError, match="z must have 8 channels"):
        sgu(torch.randn(6, 1, 7))
    with pytest.raises(ValueError, match="z has sequence length 7, longer than the configured seq_len=6"):
        sgu(torch.randn(7, 1, 8))
    with pytest.raises(TypeError, match="z must be a floating-point tensor"):
        sgu(torch.ones(6, 1, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="mask"):
        sgu(torch.randn(6, 2, 8), torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="variant 'mixer' has no gate: gate_bias"):
        sgu(torch.randn(6, 2, 8), gate_bias=torch.zeros(6, 2, 8))
    layer = sgu.mix1
    with pytest.raises(ValueError, match=r"z must have 1 to in_features=6 rows .*got shape \(7, 3\)"):
        layer(torch.randn(7, 3))
    with pytest.raises(ValueError, match=r"out must be in \[1, out_features=6\], got 9"):
        layer(torch.randn(6, 3), 9)


def test_mixer_block_matches_its_formula_and_refuses_tiny_attention() -> None:
    """x + fc2(s(GELU(fc1(norm(x))))), with padding through the block as in the layer."""
    block = randomize_(GMLPBlock(8, 12, 6, variant="mixer", token_mlp_dim=5)).eval()
    x = torch.randn(5, 2, 8)
    h = F.gelu(block.fc1(block.norm(x)))
    expected = x + block.fc2(reference(block.sgu, h))
    torch.testing.assert_close(block(x), expected, atol=1e-5, rtol=1e-5)
    mask = right_padding_mask([3, 5], 5)
    torch.testing.assert_close(block(x, mask)[:3, :1], block(x[:3, :1]), atol=1e-5, rtol=1e-5)
    assert block.sgu.mix1.weight.shape == (5, 6)
    with pytest.raises(ValueError, match=r"attn_dim \(tiny attention\) needs a gate.*variant='mixer'"):
        GMLPBlock(8, 12, 6, variant="mixer", attn_dim=4)
    with pytest.raises(ValueError, match="cannot be causal"):
        GMLPBlock(8, 12, 6, variant="mixer", causal=True)


def test_mixer_module_protocol_state_dict_copy_and_bfloat16() -> None:
    sgu = randomize_(SpatialGatingUnit(8, 6, variant="mixer"))
    other = SpatialGatingUnit(8, 6, variant="mixer")
    other.load_state_dict(sgu.state_dict())
    z = torch.randn(4, 2, 8)
    assert torch.equal(other(z), sgu(z))
    assert torch.equal(copy.deepcopy(sgu)(z), sgu(z))
    half = copy.deepcopy(sgu).to(torch.bfloat16)
    out = half(z.bfloat16())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), sgu(z), atol=0.1, rtol=0.05)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = sgu(z)
    torch.testing.assert_close(auto.float(), sgu(z), atol=0.1, rtol=0.05)
    assert sgu(torch.randn(4, 0, 8)).shape == (4, 0, 8)  # an empty batch


def test_a_vision_model_with_the_mixer_refuses_a_new_grid_and_inits_its_token_mlp() -> None:
    """``set_input_size`` resamples W over the token grid; the token MLP's hidden rows are not a grid, so a
    mixer model refuses (it silently kept its old weights, cut to the new token count, before), and
    ``init_weights`` draws the token MLP as the layer does."""
    from gmlp.models.vision import GMLPVision

    torch.manual_seed(0)
    model = GMLPVision(img_size=16, patch_size=4, in_chans=1, num_classes=3, embed_dim=8, mlp_ratio=2.0,
                       depth=1, variant="mixer")
    with pytest.raises(TypeError, match="variant 'mixer'"):
        model.set_input_size(img_size=8)
    assert model.grid_size == (4, 4) and model.blocks[0].sgu.mix1.weight.shape == (16, 16)
    mix2 = model.blocks[0].sgu.mix2
    with torch.no_grad():
        mix2.bias.zero_()
    model.init_weights()
    assert torch.equal(mix2.bias, torch.ones_like(mix2.bias))
