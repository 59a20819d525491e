"""Serving a vision gMLP on the CPU the way one serves a timm model: dynamic quantization, bf16/fp16 and
autocast, inference_mode, odd input layouts and batch sizes, timm's data/EMA/checkpoint helpers, and the
TorchScript paths (``torch.jit.trace`` works; ``torch.jit.script`` is refused at once, clearly).

The suite forces the CPU oneDNN fast path (``tests/conftest.py``), so every property here also checks that
the fused products never stand in for a module that was swapped (a quantized ``Linear``).
"""

from __future__ import annotations

import copy
import io
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import gmlp
from gmlp.models import GMLPVision

timm = pytest.importorskip("timm")


def _model(name: str = "gmlp_micro4_28", seed: int = 0, **kwargs: object) -> GMLPVision:
    """A small model in eval mode with non-trivial weights (the head and W start at ~0: random logits
    would all tie)."""
    torch.manual_seed(seed)
    model = gmlp.create_model(name, **kwargs).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.05)
    return model


def _reference_forward(model: GMLPVision, x: torch.Tensor) -> torch.Tensor:
    """The gMLP forward written out with plain ops, calling every module of the model (so a quantized
    ``fc1``/``fc2``/``head`` runs as swapped), for the split SGU with one head."""
    t = model.stem.proj(x).flatten(2).permute(2, 0, 1)  # (tokens, batch, dim)
    for block in model.blocks:
        u = F.gelu(block.fc1(block.norm(t)))
        z1, z2 = u.chunk(2, dim=-1)
        z2 = block.sgu.norm(z2)
        n = z2.shape[0]
        gate = (block.sgu.proj.weight @ z2.reshape(n, -1)).view_as(z2) + block.sgu.proj.bias[:, None, None]
        t = t + block.fc2(z1 * gate)
    return model.head(model.norm(t).mean(dim=0))


def _quantize(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    with warnings.catch_warnings():  # torch.ao.quantization's deprecation notices
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.qint8, torch.float16])
def test_dynamic_quantization_runs_the_quantized_linears(dtype: torch.dtype) -> None:
    """``quantize_dynamic(model, {nn.Linear})`` swaps fc1/fc2/head for quantized modules: the fast path must
    call them (not use fp32 weights it finds elsewhere), so the output equals the module-by-module
    reference of the quantized model exactly, differs from fp32, and keeps its top-1 on random images."""
    model = _model("gmlp_ti16_224", depth=2, img_size=32, num_classes=7)
    q = _quantize(model, dtype)
    assert type(q.blocks[0].fc1) is not nn.Linear and type(q.head) is not nn.Linear
    x = torch.randn(16, 3, 32, 32)
    with torch.no_grad():
        fp32 = model(x)
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            out, ref = q(x), _reference_forward(q, x)
            torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    assert not torch.equal(out, fp32)  # the quantized weights were used
    torch.testing.assert_close(out, fp32, rtol=0, atol=0.05)
    assert (out.argmax(1) == fp32.argmax(1)).float().mean() >= 0.9
    assert q(x[:0]).shape == (0, 7)


def test_half_precision_autocast_inference_mode_and_layouts_keep_the_outputs() -> None:
    """bf16 / fp16 models, CPU bf16 autocast, inference_mode, channels_last and strided views, batch sizes
    1 and 0: the same logits (to the precision's rounding; exactly for the fp32 layouts)."""
    model = _model()
    x = torch.randn(6, 1, 28, 28)
    with torch.no_grad():
        ref = model(x)
        for dtype in (torch.bfloat16, torch.float16):
            half = copy.deepcopy(model).to(dtype)
            out = half(x.to(dtype))
            assert out.dtype == dtype
            torch.testing.assert_close(out.float(), ref, rtol=0.05, atol=0.02)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            torch.testing.assert_close(model(x).float(), ref, rtol=0.05, atol=0.02)
        wide = torch.randn(6, 1, 28, 56)
        wide[..., ::2] = x
        views = [x.contiguous(memory_format=torch.channels_last), wide[..., ::2], x.transpose(2, 3).mT]
        for view in views:
            assert torch.equal(model(view), ref)
        torch.testing.assert_close(model(x[2:3]), ref[2:3], rtol=1e-5, atol=1e-6)
        assert model(x[:0]).shape == (0, 10)
    with torch.inference_mode():
        assert torch.equal(model(x), ref)
    assert torch.equal(model.train()(x), ref)  # no dropout or drop path in this model: train mode agrees


def test_inference_mode_calls_leave_trainable_parameters() -> None:
    """``set_input_size`` and ``reset_classifier`` called inside ``torch.inference_mode()`` (a server that
    adapts its model) made inference-tensor parameters: a later training step failed with "Inference
    tensors cannot be saved for backward"."""
    model = _model()
    with torch.inference_mode():
        model(torch.randn(2, 1, 28, 28))
        model.set_input_size(img_size=32)
        model.reset_classifier(5)
    assert not any(p.is_inference() for p in model.parameters())
    model.train()
    model(torch.randn(2, 1, 32, 32)).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


@settings(max_examples=8)
@given(
    in_chans=st.integers(1, 4),
    name=st.sampled_from(["gmlp_ti16_224", "gmlp_micro4_28"]),
    mean=st.sampled_from([None, (0.485, 0.456, 0.406), (0.3,)]),
    overlay=st.booleans(),
)
def test_pretrained_cfg_mean_and_std_fit_the_input_channels(
    in_chans: int, name: str, mean: tuple[float, ...] | None, overlay: bool
) -> None:
    """The cfg's mean/std have one value or one per channel, whatever ``in_chans`` (the default RGB
    (0.5, 0.5, 0.5) with ``in_chans=1`` made timm's transform fail on every image), averaged for one
    channel; and timm's data config + transform + the model run on a PIL image."""
    from PIL import Image

    arg = "pretrained_cfg_overlay" if overlay else "pretrained_cfg"
    given_cfg = {} if mean is None else {arg: {"mean": mean}}
    model = gmlp.create_model(name, depth=1, in_chans=in_chans, img_size=32, **given_cfg).eval()
    cfg = model.pretrained_cfg
    assert cfg["input_size"] == (in_chans, 32, 32)
    for key in ("mean", "std"):
        assert len(cfg[key]) in (1, in_chans), (key, cfg[key])
    if mean is not None and len(mean) == 3 and in_chans == 1:
        assert cfg["mean"] == pytest.approx((sum(mean) / 3,))
    if mean is not None and in_chans == 3:
        assert cfg["mean"] == mean  # one per channel (or one for all) is kept as given
    data = timm.data.resolve_data_config({}, model=model)
    transform = timm.data.create_transform(**data)
    pixels = np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    if in_chans in (1, 3):  # (PIL has no 2- or 4-channel images to feed to the transform)
        image = Image.fromarray(pixels).convert("L" if in_chans == 1 else "RGB")
        batch = transform(image).unsqueeze(0)
        assert batch.shape == (1, in_chans, 32, 32)
        with torch.no_grad():
            assert model(batch).shape == (1, 1000 if name == "gmlp_ti16_224" else 10)
    mean_t = torch.tensor(cfg["mean"]).view(-1, 1, 1)  # broadcasts over the model's channels
    assert (torch.zeros(in_chans, 32, 32) - mean_t).shape == (in_chans, 32, 32)


def test_reset_classifier_keeps_pretrained_cfg_num_classes_in_step() -> None:
    """``pretrained_cfg["num_classes"]`` records the model's actual head (as ``input_size`` follows
    ``set_input_size``); it kept the old count after ``reset_classifier``, so a model rebuilt from its own
    cfg (``create_model(name, pretrained_cfg=m.pretrained_cfg)``) got the wrong head."""
    model = _model()
    for classes in (5, 0, 3):
        model.reset_classifier(classes)
        assert model.pretrained_cfg["num_classes"] == model.num_classes == classes
        rebuilt = gmlp.create_model("gmlp_micro4_28", pretrained_cfg=model.pretrained_cfg)
        assert rebuilt.num_classes == classes
        with torch.no_grad():
            assert model(torch.randn(2, 1, 28, 28)).shape == ((2, classes) if classes else (2, 64))
    pooled = model.forward_head(model.forward_features(torch.randn(2, 1, 28, 28)), pre_logits=True)
    assert pooled.shape == (2, 64)


def test_timm_ema_and_load_checkpoint_take_a_gmlp_checkpoint(tmp_path) -> None:
    """timm's ModelEmaV3 of a gmlp model, and ``timm.models.load_checkpoint`` of a gmlp checkpoint (ours, a
    plain state dict and timm's ``{"state_dict": ...}``), give the model's outputs."""
    from timm.utils import ModelEmaV3

    model = _model()
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        ref = model(x)
    ema = ModelEmaV3(model, decay=0.5)
    ema.update(model, step=1)
    with torch.no_grad():
        torch.testing.assert_close(ema.module(x), ref)
    gmlp.save_model(model, tmp_path / "ours.safetensors")
    torch.save(model.state_dict(), tmp_path / "plain.pth")
    torch.save({"state_dict": model.state_dict(), "epoch": 1}, tmp_path / "timm.pth.tar")
    for file in ("ours.safetensors", "plain.pth", "timm.pth.tar"):
        fresh = gmlp.create_model("gmlp_micro4_28").eval()
        timm.models.load_checkpoint(fresh, str(tmp_path / file))
        with torch.no_grad():
            assert torch.equal(fresh(x), ref), file


def test_jit_trace_round_trip_takes_other_batch_sizes() -> None:
    """``torch.jit.trace`` at one batch size, saved and loaded, gives the model's outputs at others (also
    quantized), and 0 images give an empty output."""
    model = _model()
    x = torch.randn(5, 1, 28, 28)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's warnings about Python booleans of shapes
        traced = torch.jit.trace(model, x[:1])
        quantized = torch.jit.trace(_quantize(model, torch.qint8), x[:2])
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    with torch.no_grad():
        ref = model(x)
        assert torch.equal(loaded(x), ref)
        assert loaded(x[:0]).shape == (0, 10)
        torch.testing.assert_close(quantized(x), _reference_forward(_quantize(model, torch.qint8), x))


def test_jit_script_is_refused_at_once_with_what_to_use_instead() -> None:
    """torch.jit.script of the model, of its stem or of a wrapper holding it failed with TorchScript's
    "try blocks aren't supported" pointing into PatchEmbed.forward; now a clear refusal naming the
    alternatives (it is a RuntimeError, as TorchScript's errors mostly are)."""
    model = _model()
    wrapper = nn.Sequential(model)
    cases = ((model, "GMLPVision"), (model.stem, "PatchEmbed"), (wrapper, "GMLPVision"),
             (model.blocks[0], "GMLPBlock"), (model.blocks[0].sgu, "SpatialGatingUnit"))
    for obj, name in cases:
        with pytest.raises(NotImplementedError, match=rf"script cannot compile .*{name}.*torch.jit.trace"):
            torch.jit.script(obj)
    with pytest.raises(RuntimeError, match="torch.export.export"):
        torch.jit.script(gmlp.create_model("gmlp_micro4_28", features_only=True))
