"""What a PyTorch / timm user relies on from the layers as modules: dtypes (mixed ones refused by name, never
silently wrong), forward-mode AD, meta-device construction and re-initialisation, state-dict round trips,
tracing and torch.func, grad modes, strided inputs; and constructor arguments named in their errors."""

from __future__ import annotations

import copy
import io
import pickle
import warnings

import numpy as np
import pytest
import torch
import torch.autograd.forward_ad as fwAD
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from gmlp.models.vision import GMLPVision
from gmlp.nn import DropPath, GMLPBlock, SpatialGatingUnit, TinyAttention, TokenProjection

FLOATS = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def randomize_(module: nn.Module, std: float = 0.3) -> nn.Module:
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, std)
    return module


def small_vision(**kwargs) -> GMLPVision:
    base = dict(img_size=(8, 12), patch_size=4, embed_dim=16, depth=2, num_classes=5, attn_dim=4)
    return GMLPVision(**{**base, **kwargs})


# ---------------------------------------------------------------------------------------------------
# mixed input / parameter dtypes: a TypeError naming the input, only where torch would refuse anyway


def _build(kind: str, variant: str, param: torch.dtype, norm: torch.dtype | None) -> nn.Module:
    if kind == "block":
        module: nn.Module = GMLPBlock(8, 16, 6, variant=variant)
    else:
        module = SpatialGatingUnit(16, 6, variant=variant)
    module.to(param).eval()
    if norm is not None:  # the LayerNorms kept in another dtype (float32 norms in a half model)
        for m in module.modules():
            if isinstance(m, nn.LayerNorm):
                m.to(norm)
    return module


@pytest.mark.parametrize("kind", ["block", "sgu"])
@pytest.mark.parametrize("variant", ["sgu", "additive"])
@pytest.mark.parametrize("x_dtype", FLOATS)
@pytest.mark.parametrize("param", FLOATS)
def test_mixed_dtypes_are_refused_by_name_or_work_unchanged(
    kind: str, variant: str, x_dtype: torch.dtype, param: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An input of another dtype than the parameters gave torch's "mixed dtype (CPU): all inputs must share
    same datatype" (or a product's error) from deep inside; now a TypeError naming the input and both dtypes.
    The check only names errors torch raises anyway: where the plain layers work (a half input with float32
    LayerNorms, which LayerNorm takes), the output is what it was without the check."""
    name = "x" if kind == "block" else "z"
    for norm in (None, torch.float32):
        module = _build(kind, variant, param, norm)
        x = torch.randn(5, 2, 8 if kind == "block" else 16).to(x_dtype)
        with monkeypatch.context() as patch:
            patch.setattr(type(module), "_check_dtype", lambda *args: None, raising=False)
            try:
                unchecked: torch.Tensor | Exception = module(x)
            except (RuntimeError, TypeError) as error:
                unchecked = error
        if isinstance(unchecked, torch.Tensor):
            assert torch.equal(module(x), unchecked)
            continue
        if kind == "block" and norm is not None and x_dtype == param:
            continue  # the block checks against fc1 only: norms in a wider dtype than the rest are torch's
        with pytest.raises(TypeError, match=rf"{name} has dtype {x_dtype} but .* parameters are "):
            module(x)


def test_mixed_dtypes_run_under_autocast_and_keep_their_check_off() -> None:
    block = randomize_(GMLPBlock(8, 16, 6, attn_dim=4)).eval()
    x = torch.randn(5, 2, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = block(x.to(torch.bfloat16))  # an earlier autocast layer's bf16 output into float32 parameters
    assert out.shape == x.shape and torch.isfinite(out.float()).all()


def test_the_dtype_check_leaves_meta_tensors_alone() -> None:
    """Meta kernels take mixed dtypes (shape inference), and autocast does not know the meta device."""
    block = GMLPBlock(8, 16, 6).to("meta")
    assert block(torch.empty(5, 2, 8, device="meta", dtype=torch.float64)).shape == (5, 2, 8)
    sgu = SpatialGatingUnit(16, 6).to("meta")
    z = torch.empty(5, 2, 16, device="meta", dtype=torch.float64)
    assert sgu(z).shape == (5, 2, 8)
    with pytest.raises(ValueError, match="gate_bias must have z's dtype torch.float64"):  # not autocast's
        sgu(z, gate_bias=torch.empty(5, 2, 8, device="meta"))


def test_the_dtype_check_leaves_a_wrapped_fc1_to_decide() -> None:
    """A wrapped fc1 (a quantized or LoRA layer) may take inputs of another dtype than its weight."""

    class CastingLinear(nn.Linear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x.to(self.weight.dtype)).to(x.dtype)

    block = randomize_(GMLPBlock(8, 16, 6)).eval()
    wrapped = CastingLinear(8, 16).to(torch.float64)
    wrapped.load_state_dict(block.fc1.state_dict())
    block.fc1 = wrapped
    assert block(torch.randn(5, 2, 8)).dtype == torch.float32


# ---------------------------------------------------------------------------------------------------
# forward-mode AD through the tiny attention


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_forward_ad_through_tiny_attention_equals_finite_differences(causal: bool, masked: bool) -> None:
    """torch's CPU flash-attention kernel has no forward derivative: forward AD (and torch.func.jvp /
    jacfwd) through an aMLP raised NotImplementedError; the math backend is taken there now."""
    block = randomize_(GMLPBlock(8, 16, 6, attn_dim=4, causal=causal), 0.2).double()
    x = torch.randn(5, 2, 8, dtype=torch.float64)
    t = torch.randn_like(x)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool) if masked else None
    with fwAD.dual_level():
        tangent = fwAD.unpack_dual(block(fwAD.make_dual(x, t), mask)).tangent
    eps = 1e-6  # central differences in float64: error ~1e-10
    expected = (block(x + eps * t, mask) - block(x - eps * t, mask)) / (2 * eps)
    torch.testing.assert_close(tangent, expected, rtol=1e-7, atol=1e-7)
    _, jvp = torch.func.jvp(lambda a: block(a, mask), (x,), (t,))
    torch.testing.assert_close(jvp, tangent, rtol=1e-12, atol=1e-12)


def test_tiny_attention_outside_forward_ad_is_unchanged() -> None:
    attn = randomize_(TinyAttention(8, 4, 6))
    x = torch.randn(5, 2, 8)
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        math = attn(x)
    torch.testing.assert_close(attn(x), math, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------
# constructor arguments named in their errors


def test_block_names_sgu_norm_eps_itself() -> None:
    """The SGU's error said "norm_eps", which is the block's other (pre-norm) epsilon."""
    for build in (lambda: GMLPBlock(8, 16, 6, sgu_norm_eps=0.0), lambda: small_vision(sgu_norm_eps=-1.0)):
        with pytest.raises(ValueError, match=r"^sgu_norm_eps must be a number in \(0, inf\)"):
            build()


@pytest.mark.parametrize("variant", [["sgu"], {"sgu": 1}, None, 3])
def test_a_variant_of_another_type_is_named(variant: object) -> None:
    """A list or dict gave "unhashable type" from the dict lookup."""
    for build in (lambda: SpatialGatingUnit(16, 6, variant=variant), lambda: small_vision(variant=variant)):
        with pytest.raises(ValueError, match=r"unknown variant .*; expected one of \['additive'"):
            build()


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (dict(causal="yes"), TypeError, "causal must be True or False, got 'yes'"),
        (dict(toeplitz=1), TypeError, "toeplitz must be True or False, got 1"),
        (dict(init_std=-1.0), ValueError, r"init_std must be a number in \[0, inf\)"),
        (dict(toeplitz=True), ValueError, "variant 'none' has no token projection.*got toeplitz=True"),
        (dict(heads=2), ValueError, "variant 'none' has no token projection.*heads=2"),
        (dict(toeplitz=True, fft_threshold=4), ValueError, "no token projection.*fft_threshold=4"),
    ],
)
def test_variant_none_still_checks_the_projection_arguments(kwargs, error, message) -> None:
    """variant='none' builds no projection; its arguments were dropped unseen, whatever they were, and
    settings of the projection it does not have (toeplitz, heads, fft_threshold) were silently ignored."""
    with pytest.raises(error, match=message):
        SpatialGatingUnit(16, 6, variant="none", **kwargs)
    with pytest.raises(ValueError, match="heads=2"):
        GMLPBlock(8, 16, 6, variant="none", heads=2)
    SpatialGatingUnit(16, 6, variant="none", causal=True, init_std=0.0)  # good ones still work


def test_drop_path_module_checks_batch_dim() -> None:
    with pytest.raises(TypeError, match="batch_dim must be an int .*, got 'x'"):
        DropPath(0.1, batch_dim="x")  # type: ignore[arg-type]
    assert DropPath(0.1, batch_dim=np.int64(0)).batch_dim == 0
    assert type(DropPath(0.1, batch_dim=np.int64(0)).batch_dim) is int


def test_block_seq_len_is_a_python_int() -> None:
    block = GMLPBlock(8, 16, np.int64(6))
    assert type(block.seq_len) is int and block.seq_len == 6


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(embed_dim=16, mlp_ratio=0.01), r"0.01 \* 16 rounds to d_ffn = 0, which must be a positive int"),
        (dict(embed_dim=15, mlp_ratio=3), r"3 \* 15 rounds to d_ffn = 45, .*even for the split SGU"),
    ],
)
def test_vision_mlp_ratio_giving_a_bad_d_ffn_is_named(kwargs, message) -> None:
    """The block's error named dim_ffn / "dim (d_ffn)", neither of which the vision model takes."""
    with pytest.raises(ValueError, match=r"mlp_ratio \* embed_dim = " + message):
        small_vision(**kwargs)
    small_vision(embed_dim=15, mlp_ratio=3, variant="additive")  # the other variants take an odd d_ffn


# ---------------------------------------------------------------------------------------------------
# meta device and re-initialisation


def test_init_weights_reinitialises_a_subclassed_projection() -> None:
    """init_weights found the spatial projections by class name: a subclass was left as it was (after
    ``to_empty``, uninitialised memory)."""

    class LoggingProjection(TokenProjection):
        pass

    model = small_vision()
    old = model.blocks[0].sgu.proj
    model.blocks[0].sgu.proj = LoggingProjection(old.seq_len)
    with torch.no_grad():
        for p in model.blocks[0].sgu.proj.parameters():
            p.fill_(float("nan"))
    model.init_weights()
    proj = model.blocks[0].sgu.proj
    assert torch.equal(proj.bias, torch.ones_like(proj.bias))
    assert proj.weight.abs().max() < 1e-4


def _summary(model: nn.Module) -> dict[str, tuple[float, float, float]]:
    return {
        k: (v.float().mean().item(), v.float().std().item() if v.numel() > 1 else 0.0, v.abs().max().item())
        for k, v in model.state_dict().items()
    }


def test_meta_construction_then_to_empty_and_init_weights_matches_normal_construction() -> None:
    """Building on the meta device, then ``to_empty`` + ``init_weights`` (the big-model recipe) gives the
    same initialisation as building on the CPU: constants equal, random tensors of the same scale."""
    with torch.device("meta"):
        model = small_vision(embed_dim=32)
    assert all(p.is_meta for p in model.parameters())
    model.to_empty(device="cpu")
    model.init_weights()
    got, ref = _summary(model), _summary(small_vision(embed_dim=32))
    assert got.keys() == ref.keys()
    for key, (mean, std, top) in ref.items():
        g_mean, g_std, g_top = got[key]
        if std == 0.0:  # ones / zeros
            assert (g_mean, g_std) == (mean, std), key
        else:  # same distribution: scales within sampling noise
            assert 0.7 < g_std / std < 1.4 and g_top < 5 * std + abs(mean) + top, key


def test_meta_block_then_reset_parameters_per_module() -> None:
    with torch.device("meta"):
        block = GMLPBlock(8, 16, 6, attn_dim=4, toeplitz=True)
    block.to_empty(device="cpu")
    for module in block.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    assert torch.equal(block.sgu.proj.bias, torch.ones(6))
    assert block.sgu.proj.weight.abs().max() < 1e-4
    assert torch.isfinite(block(torch.randn(4, 2, 8))).all()


# ---------------------------------------------------------------------------------------------------
# state dicts, copies, tracing, torch.func, grad modes, strided inputs: outputs equal the eager ones


@pytest.fixture
def vision() -> GMLPVision:
    return randomize_(small_vision(), 0.1).eval()


def test_state_dict_round_trips(vision: GMLPVision) -> None:
    x = torch.randn(2, 3, 8, 12)
    ref = vision(x)
    buffer = io.BytesIO()
    torch.save(vision.state_dict(), buffer)
    buffer.seek(0)
    fresh = small_vision().eval()
    fresh.load_state_dict(torch.load(buffer, weights_only=True), strict=True)
    assert torch.equal(fresh(x), ref)
    assert torch.equal(copy.deepcopy(vision)(x), ref)
    assert torch.equal(pickle.loads(pickle.dumps(vision))(x), ref)
    state = vision.state_dict()
    state.pop("blocks.1.sgu.proj.bias")
    state["extra"] = torch.zeros(1)
    result = small_vision().load_state_dict(state, strict=False)
    assert result.missing_keys == ["blocks.1.sgu.proj.bias"] and result.unexpected_keys == ["extra"]


def test_grad_modes_give_the_same_outputs(vision: GMLPVision) -> None:
    x = torch.randn(2, 3, 8, 12)
    ref = vision(x)
    with torch.no_grad():
        assert torch.equal(vision(x), ref)
    with torch.inference_mode():
        assert torch.equal(vision(x), ref)
    frozen = copy.deepcopy(vision).requires_grad_(False)
    assert torch.equal(frozen(x), ref)


def test_trace_and_torch_func_equal_eager(vision: GMLPVision) -> None:
    x = torch.randn(2, 3, 8, 12)
    ref = vision(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes on the input checks' Python comparisons
        traced = torch.jit.trace(vision, (x,))
    torch.testing.assert_close(traced(x), ref, rtol=0, atol=1e-6)
    params = dict(vision.named_parameters())
    torch.testing.assert_close(torch.func.functional_call(vision, params, (x,)), ref, rtol=0, atol=1e-6)
    stacked = torch.randn(2, 2, 3, 8, 12)
    torch.testing.assert_close(
        torch.vmap(vision)(stacked), torch.stack([vision(s) for s in stacked]), rtol=1e-5, atol=1e-6
    )


@given(batch=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_strided_images_equal_contiguous_ones(batch: int, seed: int) -> None:
    torch.manual_seed(seed)
    model = randomize_(small_vision(), 0.1).eval()
    x = torch.randn(batch, 3, 8, 12)
    ref = model(x)
    torch.testing.assert_close(model(x.to(memory_format=torch.channels_last)), ref, rtol=1e-5, atol=1e-6)
    transposed = x.transpose(2, 3).contiguous().transpose(2, 3)
    torch.testing.assert_close(model(transposed), ref, rtol=1e-5, atol=1e-6)
    expanded = x[:1].expand(batch, -1, -1, -1)
    torch.testing.assert_close(model(expanded), ref[:1].expand(batch, -1), rtol=1e-5, atol=1e-6)


@given(n=st.integers(1, 6), batch=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_strided_token_inputs_equal_contiguous_ones(n: int, batch: int, seed: int) -> None:
    torch.manual_seed(seed)
    block = randomize_(GMLPBlock(8, 16, 6, attn_dim=4, heads=2)).eval()
    x = torch.randn(batch, n, 8).transpose(0, 1)  # token-major view of a batch-first tensor
    mask = torch.ones(n, batch, dtype=torch.bool).t()  # a transposed mask
    torch.testing.assert_close(block(x, mask), block(x.contiguous(), mask.contiguous()), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("heads", [1, 2])
def test_trace_of_the_fft_toeplitz_path_keeps_the_dense_product(heads: int) -> None:
    """``torch.jit.trace`` of a Toeplitz layer with ``fft_threshold`` failed inside the FFT path's slice
    assignment (the tracer's sizes are tensors); traced graphs take the dense product, equal up to
    rounding."""
    block = randomize_(GMLPBlock(8, 16, 6, toeplitz=True, fft_threshold=2, heads=heads), 0.2).eval()
    assert block.sgu.proj.uses_fft(6)
    x = torch.randn(6, 2, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(block, (x,))
    torch.testing.assert_close(traced(x), block(x), rtol=1e-5, atol=1e-5)
    assert "fft" not in str(traced.inlined_graph)
