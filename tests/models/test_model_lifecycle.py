"""A model's life outside the forward: construction on a device (meta included), loading into a meta model,
copies, dtype conversions and export paths. Outputs must equal those of the model built the usual way."""

from __future__ import annotations

import copy
import io
import pickle
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gmlp.export import export_onnx
from gmlp.models import GMLPVision, create_model
from gmlp.models.loading import load_state_dict_checked, save_model
from gmlp.utils.io import CheckpointError


def _vision(**kwargs: object) -> GMLPVision:
    args = {"img_size": 8, "patch_size": 4, "in_chans": 1, "num_classes": 3, "embed_dim": 8, "depth": 2}
    return GMLPVision(**{**args, "mlp_ratio": 2, **kwargs})


def _perturbed(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """``model`` with every parameter moved off its init (zero head, ones/zeros norms would hide mix-ups)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype) * 0.05)
    return model.eval()


# ---------------------------------------------------------------------------------------------------
# timm's device= and dtype= construction arguments


@settings(max_examples=6, deadline=None, derandomize=True)
@given(
    seed=st.integers(0, 2**16),
    kwargs=st.sampled_from([{}, {"attn_dim": 4}, {"heads": 2}, {"variant": "mixer"}, {"variant": "none"}]),
)
def test_device_and_dtype_arguments_build_the_model_torch_would_build(seed: int, kwargs: dict) -> None:
    """``device``/``dtype`` (timm's model arguments, which ``timm.create_model`` passes on) were refused as
    unexpected; now ``device="cpu"`` gives the very same model and ``dtype`` that model converted."""
    small = {"depth": 2, "embed_dim": 8, **kwargs}
    torch.manual_seed(seed)
    ref = create_model("gmlp_micro4_28", **small)
    torch.manual_seed(seed)
    on_cpu = create_model("gmlp_micro4_28", device="cpu", **small)
    torch.manual_seed(seed)
    half = create_model("gmlp_micro4_28", dtype=torch.bfloat16, **small)
    states = ref.state_dict().items(), on_cpu.state_dict().values(), half.state_dict().values()
    for (key, a), b, h in zip(*states, strict=True):
        assert torch.equal(a, b), key
        assert h.dtype == torch.bfloat16 and torch.equal(h, a.to(torch.bfloat16)), key


def test_create_model_on_the_meta_device_then_to_empty_and_init_weights() -> None:
    model = create_model("gmlp_micro4_28", depth=1, device="meta", dtype=torch.float64)
    assert all(p.is_meta and p.dtype == torch.float64 for p in model.parameters())
    model.to_empty(device="cpu")
    model.init_weights()
    assert torch.isfinite(model(torch.randn(2, 1, 28, 28, dtype=torch.float64))).all()


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"device": "nowhere"}, ValueError, r"device must be None, a torch.device or a device string.*'nowh"),
        ({"device": 1.5}, ValueError, r"device must be None.*got 1.5"),
        ({"dtype": torch.int64}, TypeError, r"dtype must be None or a floating-point torch.dtype.*int64"),
        ({"dtype": "bfloat16"}, TypeError, r"dtype must be None or a floating-point torch.dtype.*'bfloat16'"),
    ],
)
def test_bad_device_or_dtype_is_named(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        create_model("gmlp_micro4_28", **kwargs)


# ---------------------------------------------------------------------------------------------------
# loading a checkpoint into a model that has no memory yet


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, GMLPVision]:
    torch.manual_seed(0)
    model = _perturbed(create_model("gmlp_micro4_28", depth=2))
    path = tmp_path_factory.mktemp("ckpt") / "w.safetensors"
    save_model(model, path)
    return path, model


@pytest.mark.parametrize("how", ["argument", "context"])
def test_a_meta_model_takes_the_checkpoint_s_weights(saved: tuple[Path, GMLPVision], how: str) -> None:
    """Copying a checkpoint into meta parameters does nothing: ``create_model(..., pretrained=PATH)`` under
    ``torch.device("meta")`` returned a model without weights (torch warned once per key); ``device="meta"``
    was refused. Now the model takes the file's tensors, as transformers' ``from_pretrained`` does."""
    path, ref = saved
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (torch's "copying ... to a meta parameter ... is a no-op")
        if how == "argument":
            model = create_model("gmlp_micro4_28", depth=2, device="meta", pretrained=path)
        else:
            with torch.device("meta"):
                model = create_model("gmlp_micro4_28", depth=2, pretrained=path)
    assert not any(t.is_meta for t in model.state_dict().values())
    assert all(p.requires_grad for p in model.parameters())
    x = torch.randn(3, 1, 28, 28)
    assert torch.equal(model.eval()(x), ref(x))


def test_a_meta_model_loads_in_its_dtype_and_keeps_a_fresh_zero_head(saved: tuple[Path, GMLPVision]) -> None:
    path, ref = saved
    model = create_model("gmlp_micro4_28", depth=2, device="meta", dtype=torch.bfloat16, pretrained=path)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert torch.equal(model.stem.proj.weight, ref.stem.proj.weight.to(torch.bfloat16))
    with pytest.warns(UserWarning, match="checkpoint head has 10 classes, the model 4"):
        other = create_model("gmlp_micro4_28", depth=2, num_classes=4, device="meta", pretrained=path)
    with pytest.warns(UserWarning, match="checkpoint head has 10 classes, the model 4"), torch.device("meta"):
        in_context = create_model("gmlp_micro4_28", depth=2, num_classes=4, pretrained=path)
    for model in (other, in_context):
        assert not model.head.weight.is_meta and not model.head.weight.any() and not model.head.bias.any()
        assert torch.equal(model.blocks[1].sgu.proj.weight, ref.blocks[1].sgu.proj.weight)


def test_meta_tensors_are_refused_into_a_meta_model() -> None:
    model = _vision().to("meta")
    state = _vision().to("meta").state_dict()
    with pytest.raises(CheckpointError, match=r"meta device and \d+ tensors to load are meta tensors too"):
        load_state_dict_checked(model, state)


# ---------------------------------------------------------------------------------------------------
# export


@pytest.mark.parametrize(
    ("convert", "match"),
    [
        (lambda m: m.half(), r"float32 graph .*parameters are torch.float16: export model.float\(\)"),
        (lambda m: m.double(), r"float32 graph .*parameters are torch.float64: export model.float\(\)"),
        (lambda m: m.to("meta"), r"parameters are on the meta device \(built without weights\)"),
    ],
    ids=["half", "double", "meta"],
)
def test_export_onnx_names_weights_it_cannot_export(tmp_path: Path, convert, match: str) -> None:
    """The model's own error told to convert the images (``x.to(torch.float16)``), which export_onnx makes
    itself; the check runs before the exporter's imports, so it needs no onnx."""
    with pytest.raises(ValueError, match=match):
        export_onnx(convert(_vision()), tmp_path / "m.onnx", (1, 8, 8))
    assert not (tmp_path / "m.onnx").exists()


def test_scriptable_is_refused_with_what_to_use_instead() -> None:
    """torch.jit.script cannot compile the layers (try blocks): the refusal of timm's ``scriptable=True``
    says what works instead, and torch.jit.trace and torch.export give the eager outputs."""
    with pytest.raises(TypeError, match=r"scriptable=True .*jit.script cannot compile.*torch.jit.trace"):
        create_model("gmlp_micro4_28", scriptable=True)
    model = _perturbed(_vision(attn_dim=4))
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        ref = model(x)
        close = {"atol": 1e-6, "rtol": 1e-6}  # (the eager inference path may update in place: rounding)
        torch.testing.assert_close(torch.jit.trace(model, (x,))(x), ref, **close)
        torch.testing.assert_close(torch.export.export(model, (x,)).module()(x), ref, **close)


# ---------------------------------------------------------------------------------------------------
# copies and conversions of the text models (regression cover: tied weights stay tied, only in the copy)


@pytest.mark.parametrize("kind", ["deepcopy", "pickle", "torch.save"])
def test_text_model_copies_keep_their_outputs_and_their_own_tied_weights(kind: str) -> None:
    text = pytest.importorskip("gmlp.models.text")
    config = text.GMLPConfig(
        vocab_size=30, hidden_size=8, intermediate_size=16, num_hidden_layers=2, max_position_embeddings=6,
        tiny_attn_size=4,
    )  # fmt: skip
    model = _perturbed(text.GMLPForMaskedLM(config))
    ids = torch.randint(5, 30, (2, 6))
    if kind == "deepcopy":
        copied = copy.deepcopy(model)
    elif kind == "pickle":
        copied = pickle.loads(pickle.dumps(model))
    else:
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        copied = torch.load(buffer, weights_only=False)
    with torch.no_grad():
        assert torch.equal(copied(ids).logits, model(ids).logits)
    assert copied.get_output_embeddings().weight is copied.get_input_embeddings().weight
    assert copied.get_input_embeddings().weight is not model.get_input_embeddings().weight
    converted = copied.to(torch.float64)
    assert converted.get_output_embeddings().weight is converted.get_input_embeddings().weight
    with torch.no_grad():
        torch.testing.assert_close(converted(ids).logits, model(ids).logits.double(), atol=1e-5, rtol=1e-5)
