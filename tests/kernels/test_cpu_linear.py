"""The CPU inference fast path (oneDNN matmul with bias and GELU epilogues) equals F.linear (+ F.gelu), is
taken only where autograd is not recording, and never bypasses a wrapped or hooked projection."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from gmlp import create_model
from gmlp.kernels import cpu_fusion_enabled, cpu_linear, fused_linear, fused_linear_reference
from gmlp.nn import GMLPBlock

needs_onednn = pytest.mark.skipif(not cpu_linear._HAS_ONEDNN_LINEAR, reason="torch without oneDNN linear")


@needs_onednn
@settings(max_examples=25, deadline=None)
@given(
    lead=st.sampled_from([(1,), (5,), (3, 4), (2, 1, 3)]),
    fan_in=st.integers(1, 70),
    fan_out=st.integers(1, 70),
    bias=st.booleans(),
    gelu=st.booleans(),
    seed=st.integers(0, 999),
)
def test_onednn_linear_equals_the_reference(lead, fan_in, fan_out, bias, gelu, seed) -> None:
    torch.manual_seed(seed)
    x = 2 * torch.randn(*lead, fan_in)
    w = torch.randn(fan_out, fan_in) / fan_in**0.5
    b = torch.randn(fan_out) if bias else None
    act = "gelu" if gelu else None
    with torch.no_grad():
        got = fused_linear(x, w, b, act, use_onednn=True)
    want = fused_linear_reference(x.double(), w.double(), None if b is None else b.double(), act)
    assert got.shape == (*lead, fan_out) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@needs_onednn
def test_the_fast_path_is_for_inference_only(monkeypatch: pytest.MonkeyPatch) -> None:
    x, w = torch.randn(4, 8), torch.randn(6, 8)
    with torch.no_grad():
        assert cpu_fusion_enabled(x, w)
        assert not cpu_fusion_enabled(x.double(), w.double())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not cpu_fusion_enabled(x, w)
        monkeypatch.setenv("GMLP_DISABLE_CPU_FUSION", "1")
        assert not cpu_fusion_enabled(x, w)
        monkeypatch.delenv("GMLP_DISABLE_CPU_FUSION")
    assert cpu_fusion_enabled(x, w)  # nothing requires grad: nothing to record
    assert not cpu_fusion_enabled(x, w.requires_grad_())
    with torch.inference_mode():
        assert cpu_fusion_enabled(x, w)
    with pytest.raises(ValueError, match=r"use_onednn=True needs .* autograd recording True"):
        fused_linear(x, w, None, use_onednn=True)
    with pytest.raises(ValueError, match=r"activation must be None or 'gelu', got 'relu'"):
        fused_linear(x, w, None, "relu")
    w.detach_()
    assert fused_linear(x[:0], w, None).shape == (0, 6)  # empty input: the reference path


@needs_onednn
def test_model_inference_takes_the_fast_path_and_matches_plain_ops(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    model = create_model("gmlp_micro4_28", img_size=8, in_chans=1).eval()
    x = torch.randn(3, 1, 8, 8)
    monkeypatch.setenv("GMLP_DISABLE_CPU_FUSION", "1")
    with torch.no_grad():
        want = model.forward_features(x)
    monkeypatch.delenv("GMLP_DISABLE_CPU_FUSION")

    def refuse(*args, **kwargs):
        raise AssertionError("the reference ran where the oneDNN path should")

    monkeypatch.setattr(cpu_linear, "fused_linear_reference", refuse)
    with torch.no_grad():
        got = model.forward_features(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(AssertionError, match="the reference ran"):  # training records: plain ops
        model.forward_features(x)


class _Scaled(nn.Linear):
    """A stand-in for a wrapped projection (LoRA and the like): not exactly ``nn.Linear``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * super().forward(x)


@pytest.mark.parametrize("variant", ["sgu", "multiplicative"])
@pytest.mark.parametrize("grad", [False, True])
def test_wrapped_or_hooked_projections_are_not_bypassed(variant: str, grad: bool) -> None:
    """A hook on fc1/fc2 or a replaced fc2 changes the block's output exactly as it changes the modules'
    (checked against a block that computes by calling its modules)."""
    torch.manual_seed(0)
    block = GMLPBlock(16, 32, 6, variant=variant, init_std=0.5).eval()
    x = torch.randn(6, 2, 16)

    def by_modules(b: GMLPBlock) -> torch.Tensor:
        u = F.gelu(b.fc1(b.norm(x)))
        if variant == "sgu":
            z1, z2 = u.chunk(2, dim=-1)
            z = b.sgu.forward_normalized(z1, b.sgu.norm(z2))
        else:
            z = b.sgu(u)
        return x + b.fc2(z)

    with torch.set_grad_enabled(grad):
        plain = block(x)
        torch.testing.assert_close(plain, by_modules(block), rtol=1e-5, atol=1e-5)
        handle = block.fc1.register_forward_hook(lambda m, i, out: out + 1.0)
        hooked = block(x)
        torch.testing.assert_close(hooked, by_modules(block), rtol=1e-5, atol=1e-5)
        handle.remove()
        scaled = _Scaled(block.fc2.in_features, block.fc2.out_features)
        scaled.load_state_dict(block.fc2.state_dict())
        block.fc2 = scaled
        torch.testing.assert_close(block(x), by_modules(block), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(hooked, plain) and not torch.allclose(block(x), plain)


@needs_onednn
@pytest.mark.parametrize("causal", [False, True])
def test_text_inference_matches_plain_ops_with_padding(monkeypatch: pytest.MonkeyPatch, causal: bool) -> None:
    """The MLM decoder / LM head and the blocks on the fast path: logits at real tokens as with plain ops."""
    from gmlp.models.text import GMLPConfig, GMLPForCausalLM, GMLPForMaskedLM

    torch.manual_seed(0)
    cfg = GMLPConfig(vocab_size=97, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                     max_position_embeddings=10, tiny_attn_size=8, spatial_init_std=0.3)  # fmt: skip
    model = (GMLPForCausalLM if causal else GMLPForMaskedLM)(cfg).eval()
    ids = torch.randint(5, 97, (3, 10))
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[1, 6:] = 0
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask).logits
        monkeypatch.setenv("GMLP_DISABLE_CPU_FUSION", "1")
        want = model(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], rtol=1e-5, atol=1e-5)


@needs_onednn
@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore:`torch.jit.trace:FutureWarning")
def test_traced_and_exported_graphs_keep_portable_ops() -> None:
    """torch.jit.trace and torch.export (the two ONNX exporters' front ends) see F.linear, not oneDNN."""
    model = create_model("gmlp_micro4_28", img_size=8, in_chans=1).eval()
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        traced = torch.jit.trace(model, x)
        exported = torch.export.export(model, (x,))
    assert "mkldnn" not in str(traced.inlined_graph) and "linear" in str(traced.inlined_graph)
    assert "mkldnn" not in str(exported.graph) and "linear" in str(exported.graph)
