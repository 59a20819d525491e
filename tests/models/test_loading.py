"""Loading checkpoints into vision models: round trip, resolution change, head changes, clear errors."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

import gmlp
from gmlp import CheckpointError
from gmlp.models.loading import load_pretrained, load_state_dict_checked, save_model
from gmlp.nn import resample_spatial_bias, resample_spatial_weight

MICRO = dict(embed_dim=16, depth=2, mlp_ratio=2)  # gmlp_micro4_28 made smaller still: patch 4, 1 channel


def micro(img_size=56, **kwargs):
    """gmlp_micro4_28 at ``img_size`` (56 px -> 14x14 tokens) with random weights everywhere."""
    model = gmlp.create_model("gmlp_micro4_28", img_size=img_size, **{**MICRO, **kwargs})
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.1)
    return model.eval()


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    model = micro()
    save_model(model, tmp_path / "m.safetensors")
    path = tmp_path / "m.safetensors"
    loaded = gmlp.create_model("gmlp_micro4_28", img_size=56, pretrained=path, **MICRO).eval()
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b)
    x = torch.randn(2, 1, 56, 56)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    # a directory holding model.safetensors works too
    (tmp_path / "dir").mkdir()
    save_model(model, tmp_path / "dir" / "model.safetensors")
    load_pretrained(micro(), tmp_path / "dir")


def test_create_model_takes_timm_s_pretrained_and_checkpoint_path(tmp_path: Path) -> None:
    """pretrained=False is timm's "no weights"; checkpoint_path=PATH its local checkpoint; True (a download
    in timm), an empty path or a path given both ways are refused with a message naming them."""
    model = micro()
    save_model(model, tmp_path / "m.safetensors")
    x = torch.randn(2, 1, 56, 56)
    path = tmp_path / "m.safetensors"
    for weights in ({"pretrained": path}, {"checkpoint_path": str(path)}):
        loaded = gmlp.create_model("gmlp_micro4_28", img_size=56, **weights, **MICRO).eval()
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    fresh = gmlp.create_model("gmlp_micro4_28", pretrained=False, **MICRO)
    assert fresh.head.weight.abs().max() == 0  # timm's init: a zero head, not the checkpoint's
    for kwargs, message in (
        ({"pretrained": True}, r"pretrained=True would download hosted weights in timm"),
        ({"pretrained": ""}, r"pretrained is an empty path"),
        ({"checkpoint_path": ""}, r"checkpoint_path is an empty path"),
        ({"pretrained": 3}, r"pretrained must be a path \(str or Path\), None or False; got 3"),
        ({"pretrained": "a.pth", "checkpoint_path": "b.pth"}, r"both pretrained='a.pth' and checkpoint_"),
    ):
        with pytest.raises(ValueError, match=message):
            gmlp.create_model("gmlp_micro4_28", **kwargs, **MICRO)


def test_save_model_records_architecture_and_grid(tmp_path: Path) -> None:
    from gmlp.utils.io import load_state_dict_file

    save_model(micro(img_size=(56, 28)), tmp_path / "m.safetensors")
    _, metadata = load_state_dict_file(tmp_path / "m.safetensors")
    assert metadata["architecture"] == "gmlp_micro4_28"
    assert metadata["grid_size"] == "14,7"
    assert metadata["format"] == "gmlp"


# ---------------------------------------------------------------------------------------------------
# resolution change (issue item 9)


def test_14x14_checkpoint_loads_into_a_larger_model(tmp_path: Path) -> None:
    small = micro(img_size=56)  # 14x14 grid
    assert small.grid_size == (14, 14)
    save_model(small, tmp_path / "m14.safetensors")
    path = tmp_path / "m14.safetensors"
    big = gmlp.create_model("gmlp_micro4_28", img_size=64, pretrained=path, **MICRO).eval()
    assert big.grid_size == (16, 16)
    old = small.state_dict()
    for name, value in big.state_dict().items():
        if name.endswith("sgu.proj.weight"):
            assert value.shape == (256, 256)
            torch.testing.assert_close(value, resample_spatial_weight(old[name], 14, 16))
        elif name.endswith("sgu.proj.bias"):
            torch.testing.assert_close(value, resample_spatial_bias(old[name], 14, 16))
        else:
            assert torch.equal(value, old[name]), name
    with torch.no_grad():
        out = big(torch.randn(2, 1, 64, 64))
    assert out.shape == (2, 10) and torch.isfinite(out).all()


def test_same_size_load_does_not_resample(tmp_path: Path) -> None:
    model = micro()
    save_model(model, tmp_path / "m.safetensors")
    other = micro()
    load_pretrained(other, tmp_path / "m.safetensors")
    assert torch.equal(other.blocks[0].sgu.proj.weight, model.blocks[0].sgu.proj.weight)


def test_non_square_grid_uses_recorded_grid(tmp_path: Path) -> None:
    model = micro(img_size=(56, 28))  # 14 x 7 tokens
    save_model(model, tmp_path / "m.safetensors")
    path = tmp_path / "m.safetensors"
    big = gmlp.create_model("gmlp_micro4_28", img_size=(64, 32), pretrained=path, **MICRO)
    torch.testing.assert_close(
        big.blocks[1].sgu.proj.weight.detach(),
        resample_spatial_weight(model.blocks[1].sgu.proj.weight.detach(), (14, 7), (16, 8)),
    )
    # without the recorded grid (a bare .pth), 98 tokens is not a square grid: a clear error
    torch.save(model.state_dict(), tmp_path / "bare.pth")
    with pytest.raises(CheckpointError, match=r"98 tokens.*not a square grid"):
        gmlp.create_model("gmlp_micro4_28", img_size=(64, 32), pretrained=tmp_path / "bare.pth", **MICRO)


def test_same_token_count_other_grid_shape_is_resampled(tmp_path: Path) -> None:
    """14x7 and 7x14 grids both have 98 tokens: the recorded grid, not the count, decides."""
    model = micro(img_size=(56, 28))
    save_model(model, tmp_path / "m.safetensors")
    path = tmp_path / "m.safetensors"
    other = gmlp.create_model("gmlp_micro4_28", img_size=(28, 56), pretrained=path, **MICRO)
    torch.testing.assert_close(
        other.blocks[0].sgu.proj.weight.detach(),
        resample_spatial_weight(model.blocks[0].sgu.proj.weight.detach(), (14, 7), (7, 14)),
    )


def test_heads_checkpoint_resamples_each_head(tmp_path: Path) -> None:
    model = micro(img_size=28, heads=2)
    save_model(model, tmp_path / "m.safetensors")
    path = tmp_path / "m.safetensors"
    big = gmlp.create_model("gmlp_micro4_28", img_size=36, heads=2, pretrained=path, **MICRO)
    assert big.blocks[0].sgu.proj.weight.shape == (2, 81, 81)
    assert big.blocks[0].sgu.proj.bias.shape == (2, 81)


# ---------------------------------------------------------------------------------------------------
# heads with another number of classes


def test_other_number_of_classes_keeps_fresh_head_with_warning(tmp_path: Path) -> None:
    model = micro()
    save_model(model, tmp_path / "m.safetensors")
    with pytest.warns(UserWarning, match="10 classes.*3"):
        other = gmlp.create_model("gmlp_micro4_28", img_size=56, num_classes=3,
                                  pretrained=tmp_path / "m.safetensors", **MICRO)
    assert torch.all(other.head.weight == 0)  # fresh (zero-initialised) head
    assert torch.equal(other.blocks[1].fc2.weight, model.blocks[1].fc2.weight)


def test_headless_model_loads_checkpoint_with_head(tmp_path: Path) -> None:
    model = micro()
    save_model(model, tmp_path / "m.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        headless = gmlp.create_model("gmlp_micro4_28", img_size=56, num_classes=0,
                                     pretrained=tmp_path / "m.safetensors", **MICRO).eval()
    x = torch.randn(1, 1, 56, 56)
    with torch.no_grad():
        pooled = model.forward_head(model.forward_features(x), pre_logits=True)
        torch.testing.assert_close(headless(x), pooled)


def test_headless_checkpoint_loads_into_a_model_with_a_head_with_warning(tmp_path: Path) -> None:
    """A checkpoint saved with num_classes=0 (a feature extractor: ours or timm's) has 0 classes: the model
    keeps its fresh head, as for any other class count (it failed with "2 missing keys")."""
    features = micro(num_classes=0)
    save_model(features, tmp_path / "m.safetensors")
    torch.save(features.state_dict(), tmp_path / "m.pth")
    for path in (tmp_path / "m.safetensors", tmp_path / "m.pth"):
        with pytest.warns(UserWarning, match="has 0 classes, the model 10: keeping the model's freshly init"):
            model = gmlp.create_model("gmlp_micro4_28", img_size=56, pretrained=path, **MICRO).eval()
        assert torch.all(model.head.weight == 0)
        x = torch.randn(2, 1, 56, 56)
        with torch.no_grad():
            torch.testing.assert_close(model.forward_head(model.forward_features(x), pre_logits=True),
                                       features(x))


def test_a_failed_load_leaves_the_normalisation_as_it_was(tmp_path: Path) -> None:
    model = micro()
    model.pretrained_cfg["mean"], model.pretrained_cfg["std"] = (0.7,), (0.2,)
    save_model(model, tmp_path / "m.safetensors")
    other = micro(embed_dim=24)
    before = dict(other.pretrained_cfg)
    with pytest.raises(CheckpointError, match="shape mismatches"):
        load_pretrained(other, tmp_path / "m.safetensors")
    assert other.pretrained_cfg == before and other.pretrained_cfg["mean"] == (0.2860,)
    fits = micro()
    load_pretrained(fits, tmp_path / "m.safetensors")
    assert fits.pretrained_cfg["mean"] == (0.7,) and fits.pretrained_cfg["std"] == (0.2,)


# ---------------------------------------------------------------------------------------------------
# bad checkpoints (issue item 11)


def test_missing_keys_are_named(tmp_path: Path) -> None:
    save_model(micro(), tmp_path / "m.safetensors")
    with pytest.raises(CheckpointError, match=r"missing keys.*blocks\.2\.") as err:
        gmlp.create_model("gmlp_micro4_28", img_size=56, pretrained=tmp_path / "m.safetensors",
                          **{**MICRO, "depth": 3})
    assert "blocks.2.fc1.weight" in str(err.value) or "blocks.2.norm.weight" in str(err.value)


def test_unexpected_keys_are_named(tmp_path: Path) -> None:
    save_model(micro(), tmp_path / "m.safetensors")
    with pytest.raises(CheckpointError, match=r"unexpected keys.*blocks\.1\."):
        gmlp.create_model("gmlp_micro4_28", img_size=56, pretrained=tmp_path / "m.safetensors",
                          **{**MICRO, "depth": 1})


def test_shape_mismatches_are_named(tmp_path: Path) -> None:
    save_model(micro(), tmp_path / "m.safetensors")
    message = r"shape mismatches.*stem\.proj\.weight: checkpoint \(16, 1, 4, 4\) vs model \(24, 1, 4, 4\)"
    with pytest.raises(CheckpointError, match=message):
        gmlp.create_model("gmlp_micro4_28", img_size=56, pretrained=tmp_path / "m.safetensors",
                          **{**MICRO, "embed_dim": 24})


def test_head_of_another_width_is_a_shape_mismatch_not_a_class_change(tmp_path: Path) -> None:
    """Same number of classes, another feature width: the head is reported, not silently replaced."""
    from gmlp.utils.io import save_state_dict_file

    state = micro().state_dict()
    state["head.weight"] = torch.zeros(10, 24)
    save_state_dict_file(state, tmp_path / "m.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(CheckpointError, match=r"head\.weight: checkpoint \(10, 24\) vs model \(10, 16\)"):
            load_pretrained(micro(), tmp_path / "m.safetensors")


def test_load_state_dict_checked_leaves_model_untouched_on_error() -> None:
    model = micro()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    state["blocks.0.fc1.weight"] = torch.zeros(3, 3)
    with pytest.raises(CheckpointError, match=r"blocks\.0\.fc1\.weight"):
        load_state_dict_checked(model, state)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_missing_file() -> None:
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        gmlp.create_model("gmlp_micro4_28", pretrained="/nonexistent/nope.safetensors")


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_truncated_checkpoints(tmp_path: Path, suffix: str) -> None:
    model = micro()
    path = tmp_path / f"m{suffix}"
    if suffix == ".safetensors":
        save_model(model, path)
    else:
        torch.save(model.state_dict(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        gmlp.create_model("gmlp_micro4_28", img_size=56, pretrained=path, **MICRO)


def test_corrupt_pth(tmp_path: Path) -> None:
    path = tmp_path / "garbage.pth"
    path.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(CheckpointError, match="garbage.pth"):
        gmlp.create_model("gmlp_micro4_28", pretrained=path)


def test_a_text_checkpoint_is_named_as_such(tmp_path: Path) -> None:
    from gmlp.models.text import GMLPConfig, GMLPForMaskedLM

    config = GMLPConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                        max_position_embeddings=23)
    text = GMLPForMaskedLM(config)
    text.save_pretrained(tmp_path / "mlm")
    with pytest.raises(CheckpointError, match="holds a text model"):
        load_pretrained(micro(), tmp_path / "mlm" / "model.safetensors")


def test_a_non_square_grid_without_metadata_is_read_with_a_warning(tmp_path: Path) -> None:
    model = micro(img_size=(28, 32))  # 7 x 8 tokens
    torch.save(model.state_dict(), tmp_path / "plain.pth")  # no grid recorded
    fresh = micro(img_size=(28, 32))
    with pytest.warns(UserWarning, match="does not record the patch grid"):
        load_pretrained(fresh, tmp_path / "plain.pth")
    assert torch.equal(fresh.blocks[0].sgu.proj.weight, model.blocks[0].sgu.proj.weight)
    save_model(model, tmp_path / "ours.safetensors")  # records the grid: no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_pretrained(micro(img_size=(28, 32)), tmp_path / "ours.safetensors")
    # 64 tokens on a 16 x 4 grid: the warning names the square 8 x 8 grid a timm file would have
    model = micro(img_size=(64, 16))
    torch.save(model.state_dict(), tmp_path / "wide.pth")
    expected = r"made for 8x8 \(timm and g-mlp-pytorch make square grids only\) or 4x16"
    with pytest.warns(UserWarning, match=expected):
        load_pretrained(micro(img_size=(64, 16)), tmp_path / "wide.pth")


def test_resampling_refuses_integer_tensors_and_unknown_modes() -> None:
    with pytest.raises(TypeError, match="weight must be a floating-point tensor, got dtype torch.int64"):
        resample_spatial_weight(torch.ones(4, 4, dtype=torch.long), 2, 3)
    with pytest.raises(TypeError, match="bias must be a floating-point tensor"):
        resample_spatial_bias(torch.ones(4, dtype=torch.long), 2, 3)
    with pytest.raises(ValueError, match="mode must be 'bicubic', 'bilinear' or 'nearest', got 'area'"):
        resample_spatial_bias(torch.ones(4), 2, 3, mode="area")


def test_timm_model_weights_file_restores_its_normalisation(tmp_path: Path) -> None:
    # a compare-vit ViT saved on its own: gmlp eval of that file normalised with timm's 0.5/0.5 before
    from gmlp.train.vision import build_model, norm_stats

    kwargs = dict(img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=16, depth=1, num_heads=2)
    model = build_model("timm:vit_tiny_patch16_224", **kwargs)
    model.pretrained_cfg = {**model.pretrained_cfg, "mean": (0.286,), "std": (0.353,)}
    save_model(model, tmp_path / "vit.safetensors")
    again = build_model("timm:vit_tiny_patch16_224", pretrained=tmp_path / "vit.safetensors", **kwargs)
    assert norm_stats(again, 1) == ((0.286,), (0.353,))
    assert again.pretrained_cfg["architecture"] == "timm:vit_tiny_patch16_224"


def test_create_model_without_img_size_warns_when_it_resamples(tmp_path: Path) -> None:
    """A checkpoint trained at 8 px loaded by ``create_model(name, pretrained=path)`` was silently resampled
    to the model's default 28 px grid (other outputs than the checkpoint's); now that warns, naming the
    img_size that loads it as trained. An img_size given explicitly (the same or another) stays silent."""
    path = tmp_path / "digits.safetensors"
    trained = gmlp.create_model("gmlp_micro4_28", img_size=8, in_chans=1, num_classes=10).eval()
    save_model(trained, path)
    match = r"2x2 patch grid; .* \(a 7x7 grid\).* pass img_size=8 to create_model"
    with pytest.warns(UserWarning, match=match):
        gmlp.create_model("gmlp_micro4_28", pretrained=path, in_chans=1, num_classes=10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        same = gmlp.create_model("gmlp_micro4_28", pretrained=path, in_chans=1, num_classes=10, img_size=8)
        gmlp.create_model("gmlp_micro4_28", pretrained=path, in_chans=1, num_classes=10, img_size=28)
        load_pretrained(gmlp.create_model("gmlp_micro4_28", in_chans=1, num_classes=10), path)  # the API
    x = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(same.eval()(x), trained(x), rtol=0, atol=0)
