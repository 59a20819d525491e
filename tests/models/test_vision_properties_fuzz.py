"""Property tests of the vision gMLP over random small configurations (hypothesis).

Image and patch sizes giving 1 to 64 tokens (non-square images and patches), 1 to 4 input channels, every
gating variant, SGU heads, tiny attention, 0 to 4 classes, both pooling modes, batches of 1 to 4:

* ``forward == forward_head(forward_features)``; ``num_classes=0`` (or ``reset_classifier(0)``) gives the
  pooled features; channels_last and strided images (and a channels_last model) give the contiguous result;
  a sample's output does not depend on the others;
* state-dict round trip, deepcopy, ``torch.vmap``, gradient checkpointing, bf16 autocast (loosely);
* ``set_input_size``: the same size changes nothing; a new size equals a model built at that size from the
  resampled weights; back to the first size the model has its first shapes (not its first weights: the
  resampling is lossy); a refused call changes nothing.

Widths are at least 3 (a LayerNorm over 1 or 2 channels maps to near-constants, whose gradients are noise).
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gmlp.models import GMLPVision
from gmlp.nn import VARIANTS, TokenProjection, resample_spatial_bias, resample_spatial_weight

# a few examples in the default profile (the suite's time budget); the thorough profile's count otherwise
FEW = settings(max_examples=10) if settings.default.max_examples <= 15 else settings()


@st.composite
def vision_configs(draw, variants: list[str] | None = None) -> dict[str, Any]:
    """Keyword arguments of a random small :class:`GMLPVision` (1 to 64 tokens)."""
    ph, pw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    gh = draw(st.integers(1, 8))
    gw = draw(st.integers(1, 64 // gh))
    variant = draw(st.sampled_from(variants or sorted(VARIANTS)))
    embed = draw(st.integers(3, 7))
    ffn = 2 * draw(st.integers(3, 5)) if variant == "sgu" else draw(st.integers(3, 9))
    gate = ffn // 2 if variant == "sgu" else ffn
    cfg: dict[str, Any] = {
        "img_size": (gh * ph, gw * pw), "patch_size": (ph, pw), "in_chans": draw(st.integers(1, 4)),
        "num_classes": draw(st.integers(0, 4)), "embed_dim": embed, "depth": draw(st.integers(1, 2)),
        "mlp_ratio": ffn / embed, "variant": variant, "global_pool": draw(st.sampled_from(["avg", ""])),
    }  # fmt: skip
    if variant not in ("mixer", "none"):  # (no token projection: no heads)
        divisors = [h for h in range(1, gate + 1) if gate % h == 0 and gate // h >= 3]
        cfg["heads"] = draw(st.sampled_from(divisors))
    if variant not in ("none", "mixer") and draw(st.booleans()):
        cfg["attn_dim"] = draw(st.integers(1, 4))
    return cfg


def build(cfg: dict[str, Any], seed: int) -> GMLPVision:
    """The model of ``cfg`` with random non-trivial weights (spatial W and b, head included), eval mode."""
    torch.manual_seed(seed)
    model = GMLPVision(**cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model.eval()


def images(cfg: dict[str, Any], batch: int, seed: int, size: tuple[int, int] | None = None) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, cfg["in_chans"], *(size or cfg["img_size"]), generator=gen)


@FEW
@given(cfg=vision_configs(), seed=st.integers(0, 2**16), batch=st.integers(1, 4))
def test_head_features_pooling_layouts_and_batch_independence(cfg, seed, batch) -> None:
    model = build(cfg, seed)
    x = images(cfg, batch, seed)
    n = (cfg["img_size"][0] // cfg["patch_size"][0]) * (cfg["img_size"][1] // cfg["patch_size"][1])
    width = cfg["num_classes"] or cfg["embed_dim"]
    with torch.no_grad():
        out = model(x)
        features = model.forward_features(x)
        assert features.shape == (batch, n, cfg["embed_dim"])
        assert out.shape == ((batch, width) if cfg["global_pool"] == "avg" else (batch, n, width))
        torch.testing.assert_close(model.forward_head(features), out, rtol=0, atol=0)
        pooled = model.forward_head(features, pre_logits=True)
        if cfg["global_pool"] == "avg":
            torch.testing.assert_close(pooled, features.mean(1), rtol=0, atol=0)
        # num_classes=0: the pooled features, by reset_classifier(0) or built headless with the same weights
        headless = copy.deepcopy(model)
        headless.reset_classifier(0)
        torch.testing.assert_close(headless(x), pooled, rtol=0, atol=0)
        built = GMLPVision(**{**cfg, "num_classes": 0}).eval()
        built.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("head.")})
        torch.testing.assert_close(built(x), pooled, rtol=0, atol=0)
        # layouts: channels_last images, strided images, a channels_last model
        torch.testing.assert_close(model(x.to(memory_format=torch.channels_last)), out, rtol=1e-5, atol=1e-6)
        wide = torch.zeros(batch, cfg["in_chans"] + 1, cfg["img_size"][0], 2 * cfg["img_size"][1])
        wide[:, 1:, :, ::2] = x
        torch.testing.assert_close(model(wide[:, 1:, :, ::2]), out, rtol=1e-5, atol=1e-6)
        last = copy.deepcopy(model).to(memory_format=torch.channels_last)
        torch.testing.assert_close(last(x.to(memory_format=torch.channels_last)), out, rtol=1e-5, atol=1e-6)
        # a sample's output does not depend on the others
        for b in range(batch):
            torch.testing.assert_close(model(x[b : b + 1]), out[b : b + 1], rtol=1e-4, atol=1e-6)
        # state dict round trip and deepcopy
        fresh = GMLPVision(**cfg).eval()
        fresh.load_state_dict(model.state_dict())
        torch.testing.assert_close(fresh(x), out, rtol=0, atol=0)
        torch.testing.assert_close(copy.deepcopy(model)(x), out, rtol=0, atol=0)


@FEW
@given(cfg=vision_configs(), seed=st.integers(0, 2**16))
def test_gradients_channels_last_checkpointing_vmap_and_bf16(cfg, seed) -> None:
    """Training: channels_last images and gradient checkpointing give the same output and gradients (input
    and parameters); ``torch.vmap`` equals a loop; bf16 autocast is close to float32."""
    model = build(cfg, seed).train()
    x = images(cfg, 2, seed)

    def grads(images_: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        images_ = images_.clone().requires_grad_(True)  # (clone keeps the memory format)
        out = model(images_)
        return out, torch.autograd.grad(out.square().sum(), [images_, *model.parameters()])

    out, g = grads(x)
    for other in (lambda: grads(x.to(memory_format=torch.channels_last)), lambda: grads(x)):
        out2, g2 = other()
        torch.testing.assert_close(out2, out, rtol=1e-5, atol=1e-6)
        for a, b in zip(g2, g, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * (1 + b.abs().max().item()))
        model.set_grad_checkpointing(True)  # the second run: checkpointed
    model.eval()
    with torch.no_grad():
        stacked = torch.stack([x, images(cfg, 2, seed + 1)])
        torch.testing.assert_close(torch.vmap(model)(stacked), torch.stack([model(s) for s in stacked]),
                                   rtol=1e-4, atol=1e-5)  # fmt: skip
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x)
        ref = model(x)
        assert (low.float() - ref).norm() <= 0.05 * ref.norm() + 1e-3  # bf16 rounding, loosely


@FEW
@given(
    cfg=vision_configs(variants=["sgu", "linear", "additive", "multiplicative", "none"]),
    seed=st.integers(0, 2**16),
    grid=st.tuples(st.integers(1, 8), st.integers(1, 8)),
)
def test_set_input_size_there_and_back(cfg, seed, grid) -> None:
    """The same size changes nothing. A new size gives the outputs of a model built at that size with W and b
    resampled from the first; back at the first size the model takes the first images again, with W and b
    resampled twice (the round trip is lossy: bicubic resampling is not invertible, docs say so)."""
    model = build(cfg, seed)
    x = images(cfg, 2, seed)
    (ph, pw), first = cfg["patch_size"], cfg["img_size"]
    new = (grid[0] * ph, grid[1] * pw)
    old_grid = (first[0] // ph, first[1] // pw)
    original = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        ref = model(x)
        model.set_input_size(first)
        torch.testing.assert_close(model(x), ref, rtol=0, atol=0)
        model.set_input_size(new)
        assert model.pretrained_cfg["input_size"] == (cfg["in_chans"], *new)
        built = GMLPVision(**{**cfg, "img_size": new}).eval()
        built.load_state_dict(model.state_dict())
        y = images(cfg, 2, seed + 1, new)
        torch.testing.assert_close(model(y), built(y), rtol=0, atol=0)
        for key, value in model.state_dict().items():
            if key.endswith("sgu.proj.weight"):
                torch.testing.assert_close(value, resample_spatial_weight(original[key], old_grid, grid))
            elif key.endswith("sgu.proj.bias"):
                torch.testing.assert_close(value, resample_spatial_bias(original[key], old_grid, grid))
            else:
                torch.testing.assert_close(value, original[key], rtol=0, atol=0)
        model.set_input_size(first)
        back = model(x)
        assert back.shape == ref.shape and torch.isfinite(back).all()
        shapes = {k: v.shape for k, v in model.state_dict().items()}
        assert shapes == {k: v.shape for k, v in original.items()}
        if new == first:
            torch.testing.assert_close(back, ref, rtol=0, atol=0)


@FEW
@given(cfg=vision_configs(variants=["sgu", "linear", "additive"]), seed=st.integers(0, 2**16),
       data=st.data())  # fmt: skip
def test_a_refused_set_input_size_changes_nothing(cfg, seed, data) -> None:
    """Regression: with a block whose W cannot be resampled (here a Toeplitz projection) after others that
    can, ``set_input_size`` resampled those first blocks (their W and seq_len) before raising, and the model
    then silently ran the first size's images through the leading block of the resampled W. Now it raises
    with the model unchanged."""
    cfg = {**cfg, "depth": 2}
    model = build(cfg, seed)
    n = model.stem.num_patches
    bad = data.draw(st.integers(0, 1), "refused block")
    heads = model.blocks[bad].sgu.proj.heads
    model.blocks[bad].sgu.proj = TokenProjection(n, toeplitz=True, heads=heads, init_std=0.3)
    x = images(cfg, 2, seed)
    before = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        ref = model(x)
        grid = model.grid_size
        with pytest.raises(TypeError, match="Toeplitz"):
            model.set_input_size((cfg["img_size"][0] * 2, cfg["img_size"][1]))
        assert model.grid_size == grid and all(b.seq_len == n for b in model.blocks)
        after = model.state_dict()
        assert after.keys() == before.keys()
        for key, value in before.items():
            torch.testing.assert_close(after[key], value, rtol=0, atol=0)
        torch.testing.assert_close(model(x), ref, rtol=0, atol=0)
