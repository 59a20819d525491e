"""Vision gMLP: exact parameter counts, timm-style model API, stochastic depth schedules, input errors."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from torch import nn

import gmlp
from gmlp.models import GMLPVision
from gmlp.models.vision import drop_path_rates


def small(**kwargs) -> GMLPVision:
    """A tiny model (4x4 = 16 tokens) with random spatial weights and a random head."""
    cfg = dict(img_size=16, patch_size=4, num_classes=7, embed_dim=16, depth=3, mlp_ratio=2)
    cfg.update(kwargs)
    model = GMLPVision(**cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "sgu.proj" in name or name.startswith("head"):
                p.normal_(0.0, 0.2)
    return model


# ---------------------------------------------------------------------------------------------------
# parameter counts (issue item 1)


@pytest.mark.parametrize(
    ("name", "count", "device"),
    [
        ("gmlp_ti16_224", 5_867_328, "cpu"),
        ("gmlp_s16_224", 19_422_656, "meta"),
        ("gmlp_b16_224", 73_075_392, "meta"),
    ],
)
def test_paper_parameter_counts_are_exact(name: str, count: int, device: str) -> None:
    with torch.device(device):
        model = gmlp.create_model(name)
    assert sum(p.numel() for p in model.parameters()) == count
    assert model.num_classes == 1000
    assert len(model.blocks) == 30


def test_parameter_count_formula() -> None:
    """Per block: 2d (LN) + d*e + e (U) + e (SGU LN) + n*n + n (W, b) + (e/2)*d + d (V)."""
    d, e, n, depth, classes = 16, 32, 16, 3, 7
    per_block = 2 * d + d * e + e + e + n * n + n + (e // 2) * d + d
    stem = 3 * 4 * 4 * d + d
    expected = stem + depth * per_block + 2 * d + d * classes + classes
    assert sum(p.numel() for p in small().parameters()) == expected


# ---------------------------------------------------------------------------------------------------
# model API (issue item 10)


def test_forward_features_and_head_shapes() -> None:
    model = small().eval()
    x = torch.randn(2, 3, 16, 16)
    feats = model.forward_features(x)
    assert feats.shape == (2, 16, 16)
    pooled = model.forward_head(feats, pre_logits=True)
    assert pooled.shape == (2, 16)
    torch.testing.assert_close(pooled, feats.mean(dim=1))
    logits = model.forward_head(feats)
    assert logits.shape == (2, 7)
    torch.testing.assert_close(model(x), logits)
    torch.testing.assert_close(logits, model.head(pooled))
    assert model.num_features == 16 and model.num_classes == 7


def test_forward_features_is_normalized_and_batch_independent() -> None:
    model = small().eval()
    x = torch.randn(3, 3, 16, 16)
    feats = model.forward_features(x)
    torch.testing.assert_close(model.forward_features(x[1:2]), feats[1:2], atol=1e-5, rtol=1e-5)
    # the final LayerNorm (weight 1, bias 0 at init) leaves each token with zero mean, unit variance
    torch.testing.assert_close(feats.mean(-1), torch.zeros(3, 16), atol=1e-5, rtol=0)


def test_reset_classifier_and_get_classifier() -> None:
    model = small().eval()
    x = torch.randn(2, 3, 16, 16)
    pooled = model.forward_head(model.forward_features(x), pre_logits=True)
    assert model.get_classifier() is model.head
    model.reset_classifier(5)
    assert model.num_classes == 5
    assert isinstance(model.get_classifier(), nn.Linear) and model.get_classifier().out_features == 5
    assert model(x).shape == (2, 5)
    assert torch.all(model.head.weight == 0)
    model.reset_classifier(0)
    assert model.num_classes == 0 and isinstance(model.get_classifier(), nn.Identity)
    torch.testing.assert_close(model(x), pooled)
    model.reset_classifier(3, global_pool="")
    assert model(x).shape == (2, 16, 3)
    with pytest.raises(ValueError, match="num_classes"):
        model.reset_classifier(-1)
    with pytest.raises(ValueError, match="'max'"):
        model.reset_classifier(3, global_pool="max")


def test_reset_classifier_keeps_dtype() -> None:
    model = small().double().eval()
    model.reset_classifier(5)
    assert model.head.weight.dtype == torch.float64
    assert model(torch.randn(1, 3, 16, 16, dtype=torch.float64)).shape == (1, 5)


def test_num_classes_zero_returns_pooled_features() -> None:
    model = GMLPVision(img_size=16, patch_size=4, num_classes=0, embed_dim=16, depth=1).eval()
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 16)


def test_grad_checkpointing_gives_same_outputs_and_gradients() -> None:
    torch.manual_seed(1)
    model = small(drop_path_rate=0.3).train()
    x = torch.randn(4, 3, 16, 16)

    def run() -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad()
        torch.manual_seed(7)  # same drop-path draws in both runs
        out = model(x)
        out.square().sum().backward()
        return out.detach(), [p.grad.clone() for p in model.parameters()]

    out_plain, grads_plain = run()
    model.set_grad_checkpointing(True)
    assert model.grad_checkpointing
    out_ckpt, grads_ckpt = run()
    torch.testing.assert_close(out_ckpt, out_plain, atol=1e-6, rtol=1e-5)
    for a, b in zip(grads_ckpt, grads_plain, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert any(g.abs().sum() > 0 for g in grads_ckpt[1:-2])
    model.set_grad_checkpointing(False)
    assert not model.grad_checkpointing


def test_group_matcher_with_timm() -> None:
    from timm.models import group_parameters

    model = small()
    matcher = model.group_matcher()
    assert re.match(matcher["stem"], "stem.proj.weight")
    groups = group_parameters(model, matcher)
    names = [n for group in groups.values() for n in group]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())
    order = {n: gid for gid, group in groups.items() for n in group}
    assert order["stem.proj.weight"] < order["blocks.0.fc1.weight"] < order["blocks.1.fc1.weight"]
    assert order["blocks.1.fc1.weight"] < order["blocks.2.fc1.weight"] <= order["norm.weight"]


def test_pretrained_cfg() -> None:
    model = gmlp.create_model("gmlp_ti16_224", depth=1)
    cfg = model.pretrained_cfg
    for key in ("input_size", "mean", "std", "interpolation", "crop_pct"):
        assert key in cfg
    assert cfg["input_size"] == (3, 224, 224)
    assert cfg["mean"] == cfg["std"] == (0.5, 0.5, 0.5)
    assert cfg["interpolation"] == "bicubic" and cfg["crop_pct"] == 0.875
    assert cfg["architecture"] == "gmlp_ti16_224"
    bigger = gmlp.create_model("gmlp_micro4_28", img_size=32)
    assert bigger.pretrained_cfg["input_size"] == (1, 32, 32)
    assert len(bigger.pretrained_cfg["mean"]) == 1


def test_list_models_and_registry() -> None:
    names = gmlp.list_models()
    assert {"gmlp_ti16_224", "gmlp_s16_224", "gmlp_b16_224"} <= set(names)
    assert gmlp.list_models("gmlp_*16_224") == ["gmlp_b16_224", "gmlp_s16_224", "gmlp_ti16_224"]
    assert names == sorted(names)


def test_non_square_images() -> None:
    model = small(img_size=(16, 24))
    assert model.grid_size == (4, 6)
    assert model.forward_features(torch.randn(1, 3, 16, 24)).shape == (1, 24, 16)


def test_model_with_heads_attention_and_variant() -> None:
    model = small(heads=2, attn_dim=8)
    assert model.blocks[0].tiny_attn is not None
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 7)
    linear = small(variant="linear")
    assert linear(torch.randn(2, 3, 16, 16)).shape == (2, 7)


def test_init() -> None:
    model = GMLPVision(img_size=16, patch_size=4, embed_dim=16, depth=2)
    assert torch.all(model.head.weight == 0)
    for block in model.blocks:
        assert torch.all(block.sgu.proj.bias == 1)
        assert block.sgu.proj.weight.abs().max() < 1e-4


# ---------------------------------------------------------------------------------------------------
# stochastic depth


def test_drop_path_schedules() -> None:
    assert drop_path_rates(0.2, 4, "uniform") == [0.2] * 4
    assert drop_path_rates(0.3, 4, "linear") == pytest.approx([0.0, 0.1, 0.2, 0.3])
    assert drop_path_rates(0.3, 1, "linear") == [0.0]
    model = small(drop_path_rate=0.3, drop_path_schedule="linear", depth=4)
    assert [b.drop_path.p for b in model.blocks] == pytest.approx([0.0, 0.1, 0.2, 0.3])
    model = small(drop_path_rate=0.05)
    assert [b.drop_path.p for b in model.blocks] == [0.05] * 3
    with pytest.raises(ValueError, match="'cosine'"):
        drop_path_rates(0.1, 3, "cosine")
    with pytest.raises(ValueError, match="drop_path_rate"):
        small(drop_path_rate=1.0)


def test_drop_path_only_in_training() -> None:
    model = small(drop_path_rate=0.5)
    x = torch.randn(8, 3, 16, 16)
    model.eval()
    torch.testing.assert_close(model(x), model(x))
    model.train()
    torch.manual_seed(0)
    a = model(x)
    torch.manual_seed(1)
    b = model(x)
    assert (a - b).abs().max() > 1e-4


# ---------------------------------------------------------------------------------------------------
# bad input (issue item 11)


def test_wrong_image_size_hints_at_resolution_change() -> None:
    model = small()
    with pytest.raises(ValueError, match=r"16x16.*got 20x20") as err:
        model(torch.randn(1, 3, 20, 20))
    assert "img_size=20," in str(err.value) and "resample" in str(err.value)
    with pytest.raises(ValueError, match=r"got 16x24.*img_size=\(16, 24\)"):
        model(torch.randn(1, 3, 16, 24))


def test_wrong_channel_count() -> None:
    with pytest.raises(ValueError, match=r"3 channels, got 1"):
        small()(torch.randn(1, 1, 16, 16))


def test_wrong_rank() -> None:
    with pytest.raises(ValueError, match=r"\(batch, 3, H, W\).*\(3, 16, 16\)"):
        small()(torch.randn(3, 16, 16))


def test_unknown_model_name_lists_known_models() -> None:
    with pytest.raises(ValueError, match="'gmlp_xl16_224'") as err:
        gmlp.create_model("gmlp_xl16_224")
    assert "gmlp_s16_224" in str(err.value) and "gmlp_ti16_224" in str(err.value)


def test_bad_constructor_arguments() -> None:
    with pytest.raises(ValueError, match=r"heads \(5\)"):
        small(heads=5)
    with pytest.raises(ValueError, match="'transformer'"):
        small(variant="transformer")
    with pytest.raises(ValueError, match="num_classes"):
        small(num_classes=-1)
    with pytest.raises(ValueError, match="global_pool"):
        small(global_pool="token")
    with pytest.raises(ValueError, match="divisible by patch_size"):
        small(img_size=18)
    with pytest.raises(ValueError, match="even"):
        small(embed_dim=5, mlp_ratio=1)


def test_create_model_passes_the_gating_variant_through() -> None:
    model = gmlp.create_model("gmlp_nano4_28", variant="linear", depth=1)
    assert model.blocks[0].sgu.variant == "linear"
    assert model.pretrained_cfg["architecture"] == "gmlp_nano4_28"
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"depth": 0}, ValueError, "depth must be an int >= 1, got 0"),
        ({"depth": -2}, ValueError, "depth must be an int >= 1, got -2"),
        ({"depth": 2.5}, ValueError, "depth must be an int >= 1, got 2.5"),
        ({"embed_dim": 16.0}, ValueError, "embed_dim must be an int >= 1, got 16.0"),
        ({"embed_dim": -8}, ValueError, "embed_dim must be an int >= 1, got -8"),
        ({"in_chans": 0}, ValueError, "in_chans must be an int >= 1, got 0"),
        ({"mlp_ratio": 0}, ValueError, r"mlp_ratio must be a number in \(0, inf\), got 0"),
        ({"drop_rate": 1.0}, ValueError, r"drop_rate must be a number in \[0, 1\), got 1.0"),
        ({"norm_eps": -1.0}, ValueError, r"norm_eps must be a number in \(0, inf\), got -1.0"),
        ({"init_std": -1.0}, ValueError, r"init_std must be a number in \[0, inf\), got -1.0"),
        ({"pretrained_cfg": 5}, TypeError, "pretrained_cfg must be a dict or None, got int"),
    ],
)
def test_bad_model_arguments_are_named(kwargs: dict, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        gmlp.create_model("gmlp_nano4_28", **kwargs)


def test_raw_uint8_images_are_refused_clearly() -> None:
    model = gmlp.create_model("gmlp_micro4_28")
    with pytest.raises(TypeError, match="images must be a floating-point tensor"):
        model(torch.zeros(2, 1, 28, 28, dtype=torch.uint8))


def test_forward_head_refuses_pooled_features() -> None:
    model = small()
    x = torch.randn(2, 3, 16, 16)
    feats = model.forward_features(x)
    assert torch.equal(model.forward_head(feats), model(x))
    with pytest.raises(ValueError, match=r"takes token features \(batch, tokens, 16\).*\(2, 16\)"):
        model.forward_head(feats.mean(1))


# ---------------------------------------------------------------------------------------------------
# timm conventions: None arguments, list_models' arguments, default_cfg, numpy sizes


def test_create_model_keeps_defaults_for_arguments_given_as_none() -> None:
    """timm's create_model drops None kwargs (unset command-line options): img_size=None failed here."""
    unset = dict(img_size=None, num_classes=None, drop_rate=None, drop_path_rate=None, global_pool=None)
    model = gmlp.create_model("gmlp_micro4_28", **unset)
    plain = gmlp.create_model("gmlp_micro4_28")
    assert model.img_size == plain.img_size == (28, 28) and model.num_classes == 10
    assert model.pretrained_cfg == plain.pretrained_cfg
    assert [b.drop_path.p for b in model.blocks] == [b.drop_path.p for b in plain.blocks]
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_list_models_takes_timm_s_arguments() -> None:
    from fnmatch import fnmatchcase

    names = gmlp.list_models()
    assert gmlp.list_models("") == gmlp.list_models("*") == names  # timm: "" is no filter
    for include, exclude in [(["gmlp_s*", "gmlp_ti*"], ""), ("gmlp_*", ["*_b*", "*28"]), ("*4_28", "*nano*")]:
        inc = [include] if isinstance(include, str) else include
        exc = [exclude] if isinstance(exclude, str) and exclude else list(exclude or [])
        expected = [n for n in names if any(fnmatchcase(n, f) for f in inc)]
        expected = [n for n in expected if not any(fnmatchcase(n, f) for f in exc)]
        assert gmlp.list_models(include, exclude_filters=exclude) == expected
        assert gmlp.list_models(filter=include, exclude_filters=exclude) == expected
    assert gmlp.list_models(["gmlp_s*", "gmlp_ti*"]) == ["gmlp_s16_224", "gmlp_ti16_224"]
    assert gmlp.list_models(pretrained=True) == []  # no hosted weights
    with pytest.raises(TypeError, match="filter must be a shell-style pattern"):
        gmlp.list_models(3)


def test_default_cfg_is_pretrained_cfg() -> None:
    """timm models carry default_cfg, the older name of pretrained_cfg (scripts still read it)."""
    model = gmlp.create_model("gmlp_micro4_28")
    assert model.default_cfg is model.pretrained_cfg
    model.pretrained_cfg = {**model.pretrained_cfg, "mean": (0.1,)}
    assert model.default_cfg["mean"] == (0.1,)
    model.default_cfg = {**model.default_cfg, "std": (0.2,)}
    assert model.pretrained_cfg["std"] == (0.2,)


def test_numpy_integer_sizes_are_taken() -> None:
    """np.int64 class counts (labels.max() + 1) were refused with "must be an int >= 0, got np.int64(5)",
    although img_size/patch_size and timm take them."""
    model = small(num_classes=np.int64(5), embed_dim=np.int64(16), depth=np.int32(2), in_chans=np.int64(1))
    assert model(torch.randn(2, 1, 16, 16)).shape == (2, 5)
    assert type(model.num_classes) is int and model.pretrained_cfg["input_size"] == (1, 16, 16)
    model.reset_classifier(np.int64(3))
    assert model.num_classes == 3 and model(torch.randn(2, 1, 16, 16)).shape == (2, 3)
    with pytest.raises(ValueError, match="num_classes must be an int >= 0, got 2.0"):
        model.reset_classifier(2.0)


def test_export_onnx_names_a_bad_input_size(tmp_path) -> None:
    """An input size the model does not take gave a page of torch.export text; an int a TypeError."""
    pytest.importorskip("onnxscript")
    from gmlp.export import export_onnx

    model = gmlp.create_model("gmlp_micro4_28", depth=1)
    with pytest.raises(ValueError, match=r"input_size must be \(channels, height, width\).*got 28"):
        export_onnx(model, tmp_path / "m.onnx", 28)
    with pytest.raises(ValueError, match=r"^images must be 28x28 pixels for this model, got 32x32"):
        export_onnx(model, tmp_path / "m.onnx", (1, 32, 32))
    assert model.training and not (tmp_path / "m.onnx").exists()
