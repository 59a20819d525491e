"""Dtypes, devices and determinism of the layers and vision models: float64 gradients on every path, other
default dtypes, half-precision models and autocast against a float64 reference, bit-identical gradients
under ``torch.use_deterministic_algorithms``, clear errors for inputs on another device or of another dtype
than the parameters, and non-contiguous inputs."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import pytest
import torch
from fusion_switch import cpu_fusion
from hypothesis import given, settings
from hypothesis import strategies as st

from gmlp.models import create_model
from gmlp.nn import GMLPBlock, PatchEmbed, SpatialGatingUnit, TinyAttention, TokenProjection

#: Every token-mixing path of a block: dense W, Toeplitz W as a matrix and by FFT, causal, several heads,
#: aMLP's tiny attention, the non-split variants.
PATHS: dict[str, dict[str, object]] = {
    "dense": {},
    "toeplitz": {"toeplitz": True},
    "toeplitz_fft": {"toeplitz": True, "fft_threshold": 1},
    "causal": {"causal": True},
    "causal_toeplitz": {"causal": True, "toeplitz": True},
    "heads": {"heads": 2},
    "heads_fft": {"heads": 2, "toeplitz": True, "fft_threshold": 1},
    "amlp": {"attn_dim": 4},
    "amlp_causal": {"attn_dim": 4, "causal": True},
    "additive": {"variant": "additive"},
    "linear": {"variant": "linear"},
}


def _mask(batch: int, n: int) -> torch.Tensor:
    mask = torch.ones(batch, n, dtype=torch.bool)
    mask[-1, n - 2 :] = False
    return mask


@contextlib.contextmanager
def _deterministic() -> Iterator[None]:
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


# -- 1. float64 ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("path", sorted(PATHS))
def test_float64_block_passes_gradcheck_on_every_path(path: str, masked: bool) -> None:
    """``model.double()``: the input and every parameter gradient match finite differences."""
    block = GMLPBlock(4, 8, 5, init_std=0.5, **PATHS[path]).double()  # type: ignore[arg-type]
    x = torch.randn(5, 2, 4, dtype=torch.float64, requires_grad=True)
    mask = _mask(2, 5) if masked else None
    names = [n for n, _ in block.named_parameters()]

    def fn(x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(block, dict(zip(names, params, strict=True)), (x, mask))

    params = tuple(p.detach().requires_grad_() for p in block.parameters())
    assert torch.autograd.gradcheck(fn, (x, *params), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("path", sorted(p for p in PATHS if not p.startswith("amlp")))
def test_float64_block_passes_gradgradcheck(path: str) -> None:
    """Double backward (a gradient penalty) on every path without tiny attention (torch's CPU flash
    attention, which SDPA picks for it, has no double backward)."""
    block = GMLPBlock(4, 8, 5, init_std=0.5, **PATHS[path]).double()  # type: ignore[arg-type]
    x = torch.randn(5, 2, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda x: block(x, _mask(2, 5)), (x,), eps=1e-6, atol=1e-4)


def test_default_dtype_float64_builds_float64_layers_and_models() -> None:
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        for kwargs in PATHS.values():
            block = GMLPBlock(8, 16, 6, **kwargs)  # type: ignore[arg-type]
            assert {p.dtype for p in block.parameters()} == {torch.float64}
            y = block(torch.randn(6, 2, 8), _mask(2, 6))
            assert y.dtype == torch.float64
            y.sum().backward()
        model = create_model("gmlp_micro4_28", depth=1)
        assert {p.dtype for p in model.parameters()} == {torch.float64}
        assert model(torch.randn(2, 1, 28, 28)).dtype == torch.float64
    finally:
        torch.set_default_dtype(before)


# -- 2. half-precision models and autocast ---------------------------------------------------------------


def _outputs(
    block: torch.nn.Module, x: torch.Tensor, mask: torch.Tensor, autocast: torch.dtype | None = None
) -> list[torch.Tensor]:
    """Output, input gradient and parameter gradients (float64) of a weighted sum of the output."""
    block.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        y = block(x, mask)
    weights = torch.linspace(-1, 1, y.numel(), dtype=torch.float32).view(y.shape)
    (y.float() * weights).sum().backward()
    return [y.detach().double(), x.grad.double()] + [p.grad.double() for p in block.parameters()]


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


@pytest.mark.parametrize("path", ["dense", "toeplitz_fft", "causal", "amlp", "heads_fft", "additive"])
@pytest.mark.parametrize(
    ("dtype", "autocast", "tol"),
    [
        (torch.bfloat16, None, 0.08),  # model.to(bfloat16): 8 mantissa bits, ~4e-3 per rounding
        (torch.float16, None, 0.01),
        (torch.float32, torch.bfloat16, 0.08),  # fp32 model under CPU autocast
        (torch.float32, torch.float16, 0.01),
    ],
)
def test_half_precision_matches_float64_reference(
    path: str, dtype: torch.dtype, autocast: torch.dtype | None, tol: float
) -> None:
    """``model.to(bfloat16)`` / ``.half()`` and CPU autocast run and stay close to the float64 model:
    outputs and every gradient, with padding."""
    block = GMLPBlock(16, 32, 12, init_std=0.1, **PATHS[path])  # type: ignore[arg-type]
    x, mask = torch.randn(12, 3, 16), _mask(3, 12)
    reference = _outputs(copy.deepcopy(block).double(), x.double(), mask)
    got = _outputs(copy.deepcopy(block).to(dtype), x.to(dtype), mask, autocast)
    assert got[0].dtype == torch.float64  # (converted) and finite
    for a, b in zip(got, reference, strict=True):
        assert torch.isfinite(a).all()
        assert _relative(a, b) < tol


@pytest.mark.parametrize("autocast", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("train", [False, True])
def test_autocast_fast_path_agrees_with_autocast_ops(autocast: torch.dtype, train: bool) -> None:
    """Under CPU autocast the oneDNN path (bf16 operands, bias and GELU in the epilogue in inference)
    gives the dtype and, within bf16 rounding, the values of autocast's own ops."""
    block = GMLPBlock(16, 32, 12, init_std=0.1, attn_dim=8)
    x, mask = torch.randn(12, 3, 16), _mask(3, 12)
    results = []
    for fusion in (True, False):
        with cpu_fusion(fusion), torch.set_grad_enabled(train):
            if train:
                results.append(_outputs(block, x, mask, autocast))
            else:
                with torch.autocast("cpu", dtype=autocast):
                    y = block(x, mask)
                results.append([y])
    (fast, plain) = results
    assert fast[0].dtype == plain[0].dtype
    for a, b in zip(fast, plain, strict=True):
        assert _relative(a.double(), b.double()) < (0.02 if autocast is torch.bfloat16 else 1e-3)


# -- 3. determinism -------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(PATHS))
def test_deterministic_algorithms_give_bit_identical_gradients(path: str) -> None:
    block = GMLPBlock(16, 32, 12, init_std=0.1, **PATHS[path])  # type: ignore[arg-type]
    x, mask = torch.randn(12, 3, 16), _mask(3, 12)
    with _deterministic():
        first, second = _outputs(block, x, mask), _outputs(block, x, mask)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


def test_deterministic_algorithms_long_toeplitz_and_vision() -> None:
    """The diagonal-sum backward of a long Toeplitz W (from 256 tokens) and a vision model's stem run
    under deterministic algorithms and repeat bit for bit."""
    block = GMLPBlock(4, 8, 260, toeplitz=True, init_std=0.1)
    x, mask = torch.randn(260, 1, 4), _mask(1, 260)
    model = create_model("gmlp_micro4_28", depth=1)
    images = torch.randn(2, 1, 28, 28)
    with _deterministic():
        runs = []
        for _ in range(2):
            model.zero_grad(set_to_none=True)
            model(images).square().sum().backward()
            runs.append(_outputs(block, x, mask) + [p.grad.clone() for p in model.parameters()])
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


# -- 4. inputs on another device or of another dtype ----------------------------------------------------


def _meta_mask(batch: int, n: int) -> torch.Tensor:
    return torch.ones(batch, n, dtype=torch.bool, device="meta")


@pytest.mark.parametrize("path", ["dense", "toeplitz_fft", "amlp", "heads_fft"])
def test_mask_on_another_device_is_named(path: str) -> None:
    """A mask on another device than the activations raised torch's "Tensor on device cpu is not on the
    expected device meta!", which names neither."""
    block = GMLPBlock(8, 16, 6, **PATHS[path])  # type: ignore[arg-type]
    x = torch.randn(6, 2, 8)
    with pytest.raises(ValueError, match=r"mask is on meta but x is on cpu"):
        block(x, _meta_mask(2, 6))
    if "attn_dim" not in PATHS[path]:
        sgu = block.sgu
        with pytest.raises(ValueError, match=r"mask is on meta but z is on cpu"):
            sgu(torch.randn(6, 2, 16), _meta_mask(2, 6))
        with pytest.raises(ValueError, match=r"mask is on meta but z is on cpu"):
            sgu.proj(torch.randn(6, 2, 8), _meta_mask(2, 6))
    else:
        with pytest.raises(ValueError, match=r"mask is on meta but x is on cpu"):
            block.tiny_attn(x, _meta_mask(2, 6))


def test_gate_bias_on_another_device_is_named() -> None:
    sgu = SpatialGatingUnit(16, 6)
    with pytest.raises(ValueError, match=r"gate_bias is on meta but z is on cpu"):
        sgu(torch.randn(6, 2, 16), gate_bias=torch.zeros(6, 2, 8, device="meta"))


def test_input_on_another_device_than_the_parameters_is_named() -> None:
    block = GMLPBlock(8, 16, 6, attn_dim=4)
    with pytest.raises(ValueError, match=r"x is on meta but the block's parameters are on cpu"):
        block(torch.randn(6, 2, 8, device="meta"))
    with pytest.raises(ValueError, match=r"x is on cpu but the block.s parameters are on meta, which holds"):
        copy.deepcopy(block).to("meta")(torch.randn(6, 2, 8))
    # conv2d takes CPU images with a meta weight and returns a CPU tensor of uninitialised memory
    with pytest.raises(ValueError, match=r"images is on cpu but the model's parameters are on meta"):
        PatchEmbed(8, 4, 1, 8).to("meta")(torch.randn(2, 1, 8, 8))
    assert PatchEmbed(8, 4, 1, 8).to("meta")(torch.randn(2, 1, 8, 8, device="meta")).shape == (4, 2, 8)
    # meta on both sides still infers shapes
    assert copy.deepcopy(block).to("meta")(torch.randn(6, 2, 8, device="meta")).shape == (6, 2, 8)


def test_offloaded_stem_and_gateless_variant_keep_their_behaviour() -> None:
    """A stem whose weight a pre-hook loads at call time (accelerate-style offloading: the weight is on meta
    until then) is not refused for its device; the variant without a gate keeps its own error."""
    stem = PatchEmbed(8, 4, 1, 8)
    state = {k: v.clone() for k, v in stem.proj.state_dict().items()}
    expected = stem(torch.ones(2, 1, 8, 8))
    stem.proj.to("meta")

    def load(module: torch.nn.Module, args: object) -> None:
        module.load_state_dict(state, assign=True)

    stem.proj.register_forward_pre_hook(load)
    assert torch.equal(stem(torch.ones(2, 1, 8, 8)), expected)
    with pytest.raises(ValueError, match="variant 'none' has no gate"):
        SpatialGatingUnit(16, 6, variant="none")(torch.randn(6, 2, 16), gate_bias=torch.zeros(6, 2, 16))


def test_token_projection_refuses_an_input_on_another_device() -> None:
    """torch.addmm takes a meta ``z`` with CPU W and bias and returns a CPU tensor of uninitialised memory
    (NaN and garbage): the projection returned it, no error."""
    proj = TokenProjection(6)
    with pytest.raises(ValueError, match=r"z is on meta but the module's parameters are on cpu"):
        proj(torch.randn(6, 2, 4, device="meta"))
    meta = TokenProjection(6, toeplitz=True).to("meta")
    assert meta(torch.randn(6, 2, 4, device="meta")).shape == (6, 2, 4)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_tiny_attention_names_a_dtype_mismatch(dtype: torch.dtype) -> None:
    """Called alone, the tiny attention raised addmm's "expected m1 and m2 to have the same dtype"."""
    attention = TinyAttention(8, 4, 8)
    with pytest.raises(TypeError, match=rf"x has dtype {dtype} but the attention's parameters are"):
        attention(torch.randn(5, 2, 8, dtype=dtype))
    with pytest.raises(TypeError, match=r"x has dtype torch.float32 but the attention's parameters are"):
        copy.deepcopy(attention).to(dtype)(torch.randn(5, 2, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts: no error
        assert attention(torch.randn(5, 2, 8)).dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_vision_model_names_an_image_dtype_mismatch(dtype: torch.dtype) -> None:
    """float64 images (``torch.from_numpy`` of a float64 array) raised the conv's "Input type (double)
    and bias type (float) should be the same"."""
    model = create_model("gmlp_micro4_28", depth=1)
    with pytest.raises(TypeError, match=rf"images have dtype {dtype} but the model's parameters are"):
        model(torch.randn(2, 1, 28, 28, dtype=dtype))
    with pytest.raises(TypeError, match=r"images have dtype torch.float32 but the model's parameters are"):
        copy.deepcopy(model).to(dtype)(torch.randn(2, 1, 28, 28))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts: no error
        assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


# -- 5. non-contiguous inputs ---------------------------------------------------------------------------


@settings(max_examples=10, deadline=None)
@given(path=st.sampled_from(sorted(PATHS)), layout=st.sampled_from(["transposed", "sliced", "expanded"]))
def test_non_contiguous_inputs_give_the_contiguous_result(path: str, layout: str) -> None:
    torch.manual_seed(0)
    block = GMLPBlock(8, 16, 6, init_std=0.1, **PATHS[path])  # type: ignore[arg-type]
    if layout == "transposed":
        x = torch.randn(2, 6, 8).transpose(0, 1)
    elif layout == "sliced":
        x = torch.randn(6, 2, 16)[..., ::2]
    else:
        x = torch.randn(6, 1, 8).expand(6, 2, 8)
    mask = _mask(2, 6).t().contiguous().t()  # a transposed mask too
    assert not x.is_contiguous() and not mask.is_contiguous()
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            assert torch.equal(block(x, mask), block(x.contiguous(), mask.contiguous()))
    source = x.detach().clone().requires_grad_()
    dense = x.detach().contiguous().requires_grad_()
    block(source, mask).square().sum().backward()
    block(dense, mask).square().sum().backward()
    assert torch.equal(source.grad, dense.grad)


def test_channels_last_and_strided_images_give_the_contiguous_result() -> None:
    model = create_model("gmlp_micro4_28", depth=2, init_std=0.1, in_chans=3)
    images = torch.randn(2, 3, 28, 28)
    strided = torch.randn(2, 3, 28, 56)[..., ::2]
    assert not images.contiguous(memory_format=torch.channels_last).is_contiguous()
    with torch.no_grad():
        expected = model(images)
        assert torch.equal(model(images.contiguous(memory_format=torch.channels_last)), expected)
        assert torch.equal(model(strided), model(strided.contiguous()))
    grads = []
    for x in (images.contiguous(memory_format=torch.channels_last), images):
        x = x.clone().requires_grad_()
        model(x).square().sum().backward()
        grads.append(x.grad)
    assert torch.equal(*grads)
