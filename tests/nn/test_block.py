"""GMLPBlock and stacks of blocks: FFN at init, causality, padding, stochastic depth, errors."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from gmlp.kernels import cpu_linear
from gmlp.nn import DropPath, GMLPBlock, drop_path


def randomize_(module: nn.Module, std: float = 0.3) -> nn.Module:
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, std)
    return module


class Stack(nn.Module):
    """A plain stack of blocks sharing one padding mask (what the text models do)."""

    def __init__(self, depth: int, *args, **kwargs) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(GMLPBlock(*args, **kwargs) for _ in range(depth))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, mask)
        return x


def make(kind: str, **kwargs) -> nn.Module:
    dim, dim_ffn, seq_len = 8, 16, 10
    if kind == "block":
        return randomize_(GMLPBlock(dim, dim_ffn, seq_len, **kwargs))
    return randomize_(Stack(2, dim, dim_ffn, seq_len, **kwargs))


# ---------------------------------------------------------------------------------------------------
# block == FFN at init (issue item 2)


@pytest.mark.parametrize("toeplitz", [False, True])
@pytest.mark.parametrize("heads", [1, 4])
def test_block_at_init_is_a_plain_ffn(toeplitz: bool, heads: int) -> None:
    block = GMLPBlock(16, 64, 32, toeplitz=toeplitz, heads=heads)
    with torch.no_grad():  # non-trivial channel weights; the spatial W and b keep their init
        for name, p in block.named_parameters():
            if not name.startswith("sgu.proj"):
                p.normal_(0.0, 0.3)
    x = torch.randn(32, 3, 16)
    h = F.layer_norm(x, (16,), block.norm.weight, block.norm.bias, block.norm.eps)
    z1 = F.gelu(h @ block.fc1.weight.t() + block.fc1.bias)[..., :32]
    expected = x + (z1 * 1) @ block.fc2.weight.t() + block.fc2.bias
    out = block(x)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=0)
    # the gate is not a no-op in general: with a trained-looking W the FFN identity no longer holds
    randomize_(block.sgu.proj)
    assert (block(x) - expected).abs().max() > 1e-2


def test_block_formula_matches_hand_computation() -> None:
    """x + fc2(z1 * (W LN(z2) + b)), z = GELU(fc1(LN(x))), with random W and b."""
    block = make("block")
    x = torch.randn(6, 2, 8)
    h = F.layer_norm(x, (8,), block.norm.weight, block.norm.bias, block.norm.eps)
    z = F.gelu(h @ block.fc1.weight.t() + block.fc1.bias)
    z1, z2 = z[..., :8], z[..., 8:]
    z2 = F.layer_norm(z2, (8,), block.sgu.norm.weight, block.sgu.norm.bias, block.sgu.norm.eps)
    w, b = block.sgu.proj.weight[:6, :6], block.sgu.proj.bias[:6]
    gate = torch.einsum("ij,jbc->ibc", w, z2) + b[:, None, None]
    expected = x + (z1 * gate) @ block.fc2.weight.t() + block.fc2.bias
    torch.testing.assert_close(block(x), expected, atol=1e-5, rtol=1e-5)


@given(
    dim=st.integers(1, 12),
    half=st.integers(1, 12),
    n=st.integers(1, 7),
    batch=st.integers(1, 3),
    seed=st.integers(0, 10_000),
)
def test_split_fc1_fast_path_equals_one_gemm_and_chunk(
    dim: int, half: int, n: int, batch: int, seed: int
) -> None:
    """Off CUDA the block runs fc1 as two GEMMs on the halves of its weight: outputs and every gradient
    equal the reference ``chunk(GELU(fc1(h)))`` formulation."""
    torch.manual_seed(seed)
    block = randomize_(GMLPBlock(dim, 2 * half, n))
    x = torch.randn(n, batch, dim, requires_grad=True)

    def reference(x: torch.Tensor) -> torch.Tensor:
        h = block.norm(x)
        z1, z2 = F.gelu(block.fc1(h)).chunk(2, dim=-1)
        return x + block.fc2(block.sgu.forward_normalized(z1, block.sgu.norm(z2)))

    params = [x, *block.parameters()]
    seed_grad = torch.randn(n, batch, dim)
    fast = block(x)
    ref = reference(x)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)
    g_fast = torch.autograd.grad((fast * seed_grad).sum(), params)
    g_ref = torch.autograd.grad((ref * seed_grad).sum(), params)
    for a, b in zip(g_fast, g_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_amlp_block_adds_tiny_attention_of_normalized_input_to_gate() -> None:
    block = make("block", attn_dim=4)
    x = torch.randn(6, 2, 8)
    h = block.norm(x)
    z = F.gelu(block.fc1(h))
    gate_bias = block.tiny_attn(h)
    expected = x + block.fc2(block.sgu(z, gate_bias=gate_bias))
    torch.testing.assert_close(block(x), expected, atol=1e-6, rtol=1e-6)
    assert (block.fc2(block.sgu(z)) + x - expected).abs().max() > 1e-3  # the attention matters


def test_epsilons() -> None:
    block = GMLPBlock(8, 16, 4)
    assert block.norm.eps == 1e-6  # timm's block norm
    assert block.sgu.norm.eps == 1e-5  # timm's and g-mlp-pytorch's gate norm


# ---------------------------------------------------------------------------------------------------
# causality (issue item 3)


@given(
    kind=st.sampled_from(["block", "stack"]),
    n=st.integers(2, 6),
    batch=st.integers(1, 2),
    heads=st.sampled_from([1, 2]),
    toeplitz=st.booleans(),
    attn=st.booleans(),
    masked=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_causal_gradients_are_exactly_zero(dependence, assert_causal, kind, n, batch, heads, toeplitz, attn,
                                           masked, seed) -> None:
    torch.manual_seed(seed)
    model = make(kind, causal=True, heads=heads, toeplitz=toeplitz, attn_dim=4 if attn else None)
    mask = None
    if masked:
        mask = torch.rand(batch, n) > 0.3
        mask[:, 0] = True
    assert_causal(dependence(lambda x: model(x, mask), torch.randn(n, batch, 8)), mask)


@pytest.mark.parametrize("kind", ["block", "stack"])
def test_non_causal_depends_on_future(dependence, kind: str) -> None:
    model = make(kind, attn_dim=4)
    dep = dependence(lambda x: model(x), torch.randn(5, 1, 8))
    assert torch.all(dep[:, 0, :, 0] > 0)


# ---------------------------------------------------------------------------------------------------
# padding (issue item 4)


@given(
    kind=st.sampled_from(["block", "stack"]),
    lengths=st.lists(st.integers(1, 6), min_size=1, max_size=3),
    extra=st.integers(0, 4),
    heads=st.sampled_from([1, 2]),
    toeplitz=st.booleans(),
    causal=st.booleans(),
    attn=st.booleans(),
    pad_kind=st.sampled_from(["random", "huge", "nan"]),
    mask_dtype=st.sampled_from([torch.bool, torch.int64, torch.int32]),
    seed=st.integers(0, 2**16),
)
def test_padding_equals_unpadded_run(kind, lengths, extra, heads, toeplitz, causal, attn, pad_kind,
                                     mask_dtype, seed) -> None:
    torch.manual_seed(seed)
    model = make(kind, heads=heads, toeplitz=toeplitz, causal=causal, attn_dim=4 if attn else None)
    n = max(lengths) + extra
    mask = torch.arange(n)[None, :] < torch.tensor(lengths)[:, None]
    x = torch.randn(n, len(lengths), 8)
    garbage = {"random": torch.randn_like(x) * 100, "huge": torch.full_like(x, 3e38),
               "nan": torch.full_like(x, float("nan"))}[pad_kind]
    x = torch.where(mask.t().unsqueeze(-1), x, garbage)
    out = model(x, mask.to(mask_dtype))
    for b, m in enumerate(lengths):
        torch.testing.assert_close(out[:m, b : b + 1], model(x[:m, b : b + 1].clone()), atol=1e-5, rtol=1e-5)


@given(
    kind=st.sampled_from(["block", "stack"]),
    n=st.integers(2, 7),
    batch=st.integers(1, 3),
    toeplitz=st.booleans(),
    attn=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_pads_anywhere_do_not_leak(kind, n, batch, toeplitz, attn, seed) -> None:
    torch.manual_seed(seed)
    model = make(kind, toeplitz=toeplitz, attn_dim=4 if attn else None)
    mask = torch.rand(batch, n) > 0.4
    x = torch.randn(n, batch, 8)
    keep = mask.t().unsqueeze(-1)
    ref = model(torch.where(keep, x, torch.randn_like(x)), mask)
    for garbage in (torch.full_like(x, float("nan")), torch.full_like(x, -3e38), torch.randn_like(x) * 1e4):
        out = model(torch.where(keep, x, garbage), mask.long())
        diff = (out - ref).abs()[mask.t()]
        assert diff.numel() == 0 or diff.max() <= 1e-5


@pytest.mark.skipif(not cpu_linear._HAS_ONEDNN_BF16, reason="no oneDNN bf16 on this CPU")
@given(
    kind=st.sampled_from(["block", "stack"]),
    lengths=st.lists(st.integers(1, 6), min_size=1, max_size=3),
    extra=st.integers(1, 3),
    toeplitz=st.booleans(),
    attn=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_bf16_autocast_fast_path_keeps_causality_and_padding(
    dependence, assert_causal, onednn_products, kind, lengths, extra, toeplitz, attn, seed
) -> None:
    """Under CPU bf16 autocast the projections take the bf16 oneDNN path; a causal model still depends on
    no later and no padded token (exactly), and a padded batch (pads full of NaN) gives each sample's
    unpadded result within bf16 rounding."""
    torch.manual_seed(seed)
    n = max(lengths) + extra
    mask = torch.arange(n)[None, :] < torch.tensor(lengths)[:, None]
    x = torch.randn(n, len(lengths), 8)
    with torch.autocast("cpu", dtype=torch.bfloat16), onednn_products() as calls:
        causal = make(kind, toeplitz=toeplitz, causal=True, attn_dim=4 if attn else None)
        assert_causal(dependence(lambda v: causal(v, mask), x), mask)
        model = make(kind, toeplitz=toeplitz, attn_dim=4 if attn else None)
        out = model(torch.where(mask.t().unsqueeze(-1), x, float("nan")), mask)
        for b, m in enumerate(lengths):
            alone = model(x[:m, b : b + 1].clone())
            torch.testing.assert_close(out[:m, b : b + 1].float(), alone.float(), atol=0.05, rtol=0.05)
    if os.environ.get("GMLP_DISABLE_CPU_FUSION") == "1":  # the suite's plain-ops run: no oneDNN product
        assert not calls
    else:
        assert calls and set(calls) == {torch.bfloat16}


def test_pads_leak_without_mask() -> None:
    model = make("stack")
    x = torch.randn(6, 1, 8)
    y = x.clone()
    y[4:] = torch.randn(2, 1, 8)
    assert (model(x)[:4] - model(y)[:4]).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------------
# stochastic depth (issue item 10)


def test_drop_path_is_per_sample_in_training() -> None:
    torch.manual_seed(3)
    block = make("block", drop_path=0.5)
    x = torch.randn(4, 64, 8)
    block.eval()
    branch = block(x) - x  # the residual branch, deterministic in eval mode
    block.train()
    got = block(x) - x
    dropped = got.abs().amax(dim=(0, 2)) == 0
    assert 0 < dropped.sum() < 64, "some samples must be dropped and others kept"
    torch.testing.assert_close(got[:, ~dropped], branch[:, ~dropped] / 0.5, atol=1e-5, rtol=1e-5)


def test_drop_path_function() -> None:
    x = torch.randn(3, 1000, 2)
    assert drop_path(x, 0.3, training=False) is x
    assert drop_path(x, 0.0, training=True) is x
    y = drop_path(x, 0.3, training=True)
    kept = (y != 0).any(dim=0).any(dim=-1)
    torch.testing.assert_close(y[:, kept], x[:, kept] / 0.7)
    assert 0.6 < kept.float().mean() < 0.8
    # batch_dim=0 for batch-major tensors
    z = drop_path(torch.ones(1000, 3), 0.5, training=True, batch_dim=0)
    assert set(z.unique().tolist()) <= {0.0, 2.0}
    assert torch.all(z == z[:, :1])


@given(p=st.sampled_from([1.0, 1, np.float32(1.0)]), batch=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_drop_path_of_one_drops_every_sample_without_nan(p, batch: int, seed: int) -> None:
    """Survival probability 0 zeroes the branch of every sample (timm's drop_path); dividing by the
    survival probability gave NaN outputs and NaN gradients before."""
    torch.manual_seed(seed)
    x = torch.randn(3, batch, 4, requires_grad=True)
    y = drop_path(x, p, training=True)
    assert torch.equal(y, torch.zeros_like(x))
    y.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


@pytest.mark.parametrize("p", [-0.1, 1.5, float("nan")])
def test_drop_path_function_names_a_bad_p(p: float) -> None:
    with pytest.raises(ValueError, match=r"drop path probability p must be a number in \[0, 1\], got"):
        drop_path(torch.ones(2, 3, 4), p, training=True)
    assert drop_path(x := torch.ones(2, 3, 4), p, training=False) is x  # eval: the branch is never dropped


def test_drop_path_module_refuses_bad_p() -> None:
    for p in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match="drop path probability"):
            DropPath(p)


# ---------------------------------------------------------------------------------------------------
# bad input (issue item 11)


def test_sequence_longer_than_seq_len() -> None:
    with pytest.raises(ValueError, match=r"length 11.*seq_len=10"):
        make("block")(torch.randn(11, 1, 8))


def test_wrong_channels() -> None:
    with pytest.raises(ValueError, match=r"8 channels.*\(4, 2, 9\)"):
        make("block")(torch.randn(4, 2, 9))


def test_mask_shape_and_dtype() -> None:
    block = make("block", attn_dim=4)
    x = torch.randn(4, 2, 8)
    with pytest.raises(ValueError, match=r"\(2, 4\).*\(2, 5\)"):
        block(x, torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match="float"):
        block(x, torch.ones(2, 4, dtype=torch.float16))


def test_bad_constructor_arguments() -> None:
    with pytest.raises(ValueError, match="dim must be"):
        GMLPBlock(0, 16, 4)
    with pytest.raises(ValueError, match="dim_ffn must be"):
        GMLPBlock(8, -2, 4)
    with pytest.raises(ValueError, match="even"):
        GMLPBlock(8, 15, 4)
    with pytest.raises(ValueError, match=r"heads \(3\)"):
        GMLPBlock(8, 16, 4, heads=3)
    with pytest.raises(ValueError, match="attn_dim"):
        GMLPBlock(8, 16, 4, variant="none", attn_dim=4)
    with pytest.raises(ValueError, match="'gated'"):  # ("mixer" is a variant now: Table 3's MLP-Mixer row)
        GMLPBlock(8, 16, 4, variant="gated")


# ---------------------------------------------------------------------------------------------------
# faster must not mean different: every CPU path of a whole block against the plain ops


def _with_cpu_fusion(fusion: bool, fn):
    """``fn()`` with the oneDNN path forced on (``GMLP_DISABLE_CPU_FUSION=0``) or off (``=1``)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GMLP_DISABLE_CPU_FUSION", "0" if fusion else "1")
        return fn()


@pytest.mark.skipif(not cpu_linear._HAS_ONEDNN_LINEAR, reason="no oneDNN linear in this torch build")
@given(
    n=st.integers(1, 10),
    batch=st.integers(1, 3),
    toeplitz=st.booleans(),
    causal=st.booleans(),
    heads=st.sampled_from([1, 2]),
    attn=st.booleans(),
    masked=st.booleans(),
    fft=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_every_cpu_path_equals_the_plain_ops(onednn_products, n, batch, toeplitz, causal, heads, attn, masked,
                                             fft, seed) -> None:
    """Any mix of the options (dense or Toeplitz W, the latter by GEMM or FFT, causal, heads, tiny attention,
    a padding mask, inputs shorter than seq_len, batch 1): the oneDNN path gives the plain ops' output and
    every gradient in training; and inference (no_grad, inference_mode, eval mode: oneDNN epilogues and
    in-place ops) gives the same output on both paths, NaN in the pads reaching no real token."""
    torch.manual_seed(seed)
    model = make("stack", toeplitz=toeplitz, causal=causal, heads=heads, attn_dim=4 if attn else None,
                 fft_threshold=1 if fft and toeplitz else None)  # fmt: skip
    x = torch.randn(n, batch, 8)
    mask = None
    real = torch.ones(n, batch, dtype=torch.bool)
    if masked:
        mask = torch.rand(batch, n) > 0.3
        real = mask.t()
    seed_grad = torch.randn(n, batch, 8)
    params = [p for p in model.parameters()]

    def train_step() -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        model.train()
        xg = x.clone().requires_grad_(True)
        out = model(xg, mask)
        return out.detach(), torch.autograd.grad((out * seed_grad).sum(), [xg, *params])

    def inference() -> list[torch.Tensor]:
        nan_pads = torch.where(real.unsqueeze(-1), x, float("nan"))
        outs = []
        for mode in (torch.no_grad, torch.inference_mode):
            for train in (True, False):  # dropout and drop path are 0: train mode is no different
                model.train(train)
                with mode():
                    outs.append(model(nan_pads, mask).clone()[real])
        return outs

    with onednn_products() as calls:
        fast, g_fast = _with_cpu_fusion(True, train_step)
        fast_inference = _with_cpu_fusion(True, inference)
    assert calls, "the oneDNN path was not taken"
    with onednn_products() as calls:
        ref, g_ref = _with_cpu_fusion(False, train_step)
        ref_inference = _with_cpu_fusion(False, inference)
    assert not calls, "GMLP_DISABLE_CPU_FUSION=1 still took the oneDNN path"
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(g_fast, g_ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    for out in (*fast_inference, *ref_inference):
        torch.testing.assert_close(out, ref[real], atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not cpu_linear._HAS_ONEDNN_BF16, reason="no oneDNN bf16 on this CPU")
@given(
    n=st.integers(1, 8),
    toeplitz=st.booleans(),
    causal=st.booleans(),
    heads=st.sampled_from([1, 2]),
    attn=st.booleans(),
    masked=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_bf16_autocast_fast_path_equals_autocast_plain_ops(n, toeplitz, causal, heads, attn, masked,
                                                           seed) -> None:
    """Under CPU bf16 autocast the oneDNN bf16 path gives autocast's own ops' output (same dtype) and
    gradients (same dtypes) within bf16 rounding, in training and in inference."""
    torch.manual_seed(seed)
    model = make("stack", toeplitz=toeplitz, causal=causal, heads=heads, attn_dim=4 if attn else None)
    x = torch.randn(n, 2, 8)
    mask = None
    if masked:
        mask = torch.rand(2, n) > 0.3
        mask[:, 0] = True
    real = torch.ones(n, 2, dtype=torch.bool) if mask is None else mask.t()
    params = [p for p in model.parameters()]

    def run() -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            xg = x.clone().requires_grad_(True)
            out = model(xg, mask)
            grads = torch.autograd.grad(out.float()[real].square().sum(), [xg, *params])
            with torch.no_grad():
                inferred = model(x, mask)
        return out.detach(), inferred, grads

    fast, fast_inferred, g_fast = _with_cpu_fusion(True, run)
    ref, ref_inferred, g_ref = _with_cpu_fusion(False, run)
    assert fast.dtype == ref.dtype and fast_inferred.dtype == ref_inferred.dtype
    scale = ref[real].abs().max().item()
    for a in (fast, fast_inferred, ref_inferred):
        torch.testing.assert_close(a[real].float(), ref[real].float(), atol=0.03 * scale, rtol=0)
    for a, b in zip(g_fast, g_ref, strict=True):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a.float(), b.float(), atol=0.05 * b.abs().max().item() + 1e-3, rtol=0)


@given(
    n=st.integers(2, 8),
    batch=st.integers(1, 2),
    toeplitz=st.booleans(),
    heads=st.sampled_from([1, 2]),
    attn=st.booleans(),
    masked=st.booleans(),
    fusion=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_causal_inference_never_sees_the_future(n, batch, toeplitz, heads, attn, masked, fusion,
                                                seed) -> None:
    """Inference paths (no_grad, inference_mode: oneDNN epilogues, in-place ops) that the gradient checks
    above never run: replacing the tokens after t (real or padded) leaves outputs 0..t unchanged."""
    torch.manual_seed(seed)
    model = make("stack", causal=True, toeplitz=toeplitz, heads=heads, attn_dim=4 if attn else None).eval()
    x = torch.randn(n, batch, 8)
    mask = None
    if masked:
        mask = torch.rand(batch, n) > 0.3
        mask[:, 0] = True
    t = int(torch.randint(0, n - 1, ()))
    other = x.clone()
    other[t + 1 :] = torch.randn(n - t - 1, batch, 8) * 100

    def run() -> list[torch.Tensor]:
        outs = []
        for mode in (torch.no_grad, torch.inference_mode):
            with mode():
                outs.append((model(x, mask).clone(), model(other, mask).clone()))
        return outs

    for a, b in _with_cpu_fusion(fusion, run):
        torch.testing.assert_close(a[: t + 1], b[: t + 1], atol=1e-6, rtol=0)
        assert (a[t + 1 :] - b[t + 1 :]).abs().max() > 1e-3  # the later outputs do see the change


def test_numpy_integer_heads_and_attn_dim_are_taken() -> None:
    """A block sized with numpy ints (heads, tiny attention) builds as with Python ints."""
    block = GMLPBlock(np.int64(8), 16, np.int64(10), heads=np.int64(2), attn_dim=np.int32(4))
    ref = GMLPBlock(8, 16, 10, heads=2, attn_dim=4)
    ref.load_state_dict(randomize_(block).state_dict())
    x = torch.randn(6, 2, 8)
    torch.testing.assert_close(block(x), ref(x), atol=0, rtol=0)
