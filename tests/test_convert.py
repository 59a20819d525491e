"""Weight conversion from the peers (timm, g-mlp-pytorch): exact output parity on random weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
from g_mlp_pytorch import gMLP, gMLPVision
from timm.layers import GatedMlp
from timm.models.mlp_mixer import MlpMixer, SpatialGatingBlock

import gmlp
from gmlp import CheckpointError
from gmlp.convert import detect_format, from_g_mlp_pytorch, from_timm, to_gmlp
from gmlp.models import GMLPVision
from gmlp.nn import resample_spatial_bias, resample_spatial_weight


def randomize_(module: torch.nn.Module, std: float = 0.05) -> torch.nn.Module:
    """Random non-trivial weights everywhere, spatial W and biases included (eval mode)."""
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, std)
    return module.eval()


def timm_small(img_size: int = 64, in_chans: int = 3) -> MlpMixer:
    """timm's gMLP-Ti architecture with 2 blocks at 64 px (4x4 tokens), 10 classes."""
    model = MlpMixer(num_classes=10, img_size=img_size, in_chans=in_chans, patch_size=16, num_blocks=2,
                     embed_dim=128, mlp_ratio=6, block_layer=SpatialGatingBlock, mlp_layer=GatedMlp)
    return randomize_(model)


OURS_FOR_TIMM_SMALL = dict(img_size=64, depth=2, num_classes=10)


# ---------------------------------------------------------------------------------------------------
# timm (issue item 7)


def test_timm_gmlp_s16_224_parity() -> None:
    ref = randomize_(timm.create_model("gmlp_s16_224"))
    sd = ref.state_dict()
    assert len(sd) == 306
    model = gmlp.create_model("gmlp_s16_224").eval()
    model.load_state_dict(from_timm(sd), strict=True)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():  # one pass each (30 blocks at 224 px): features, then logits from them
        feats_ref, feats = ref.forward_features(x), model.forward_features(x)
        assert (feats - feats_ref).abs().max() <= 1e-5
        expected, got = ref.forward_head(feats_ref), model.forward_head(feats)
        assert expected.abs().max() > 0.1  # a non-trivial output
        assert (got - expected).abs().max() <= 1e-5


def test_timm_small_parity_forward_features_and_head() -> None:
    ref = timm_small()
    model = gmlp.create_model("gmlp_ti16_224", **OURS_FOR_TIMM_SMALL).eval()
    model.load_state_dict(from_timm(ref.state_dict()))
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        feats_ref, feats = ref.forward_features(x), model.forward_features(x)
        assert feats.shape == feats_ref.shape == (3, 16, 128)
        assert (feats - feats_ref).abs().max() <= 1e-5
        pre_ref = ref.forward_head(feats_ref, pre_logits=True)
        assert (model.forward_head(feats, pre_logits=True) - pre_ref).abs().max() <= 1e-5
        assert (model(x) - ref(x)).abs().max() <= 1e-5


def test_timm_parity_needs_timm_epsilons() -> None:
    """The converter is only faithful with timm's two epsilons; with 1e-5 everywhere outputs differ, which
    shows the parity checks are sensitive to such details."""
    ref = timm_small()
    with torch.no_grad():  # make the block norm's epsilon matter: inputs of variance ~1e-6 to the first norm
        ref.stem.proj.weight.mul_(1e-3)
        ref.stem.proj.bias.zero_()
        ref.head.weight.normal_(0.0, 1.0)
    wrong = GMLPVision(img_size=64, patch_size=16, embed_dim=128, depth=2, mlp_ratio=6, num_classes=10,
                       norm_eps=1e-5).eval()
    wrong.load_state_dict(from_timm(ref.state_dict()))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert (wrong(x) - ref(x)).abs().max() > 1e-4  # well above the 1e-5 parity tolerance


def test_timm_converted_keys_are_ours() -> None:
    out = from_timm(timm_small().state_dict())
    model = gmlp.create_model("gmlp_ti16_224", **OURS_FOR_TIMM_SMALL)
    assert set(out) == set(model.state_dict())
    assert "blocks.1.sgu.proj.weight" in out and out["blocks.1.sgu.proj.weight"].shape == (16, 16)
    assert detect_format(timm_small().state_dict()) == "timm"


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_timm_checkpoint_file_through_create_model(tmp_path: Path, suffix: str) -> None:
    ref = timm_small()
    path = tmp_path / f"timm_gmlp{suffix}"
    if suffix == ".pth":
        torch.save(ref.state_dict(), path)
    else:
        safetensors.torch.save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    model = gmlp.create_model("gmlp_ti16_224", pretrained=path, **OURS_FOR_TIMM_SMALL).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert (model(x) - ref(x)).abs().max() <= 1e-5


def test_timm_checkpoint_wrapped_in_state_dict_key(tmp_path: Path) -> None:
    ref = timm_small()
    torch.save({"state_dict": ref.state_dict(), "epoch": torch.tensor(3)}, tmp_path / "ckpt.pth")
    model = gmlp.create_model("gmlp_ti16_224", pretrained=tmp_path / "ckpt.pth", **OURS_FOR_TIMM_SMALL).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert (model(x) - ref(x)).abs().max() <= 1e-5


def test_timm_checkpoint_at_a_larger_resolution(tmp_path: Path) -> None:
    """A 64 px (4x4 grid) timm checkpoint loads into a 96 px model (6x6), W and b resampled."""
    ref = timm_small()
    torch.save(ref.state_dict(), tmp_path / "timm.pth")
    model = gmlp.create_model("gmlp_ti16_224", pretrained=tmp_path / "timm.pth", img_size=96, depth=2,
                              num_classes=10).eval()
    w = ref.state_dict()["blocks.0.mlp_channels.gate.proj.weight"]
    b = ref.state_dict()["blocks.0.mlp_channels.gate.proj.bias"]
    torch.testing.assert_close(model.blocks[0].sgu.proj.weight.detach(), resample_spatial_weight(w, 4, 6))
    torch.testing.assert_close(model.blocks[0].sgu.proj.bias.detach(), resample_spatial_bias(b, 4, 6))
    torch.testing.assert_close(model.blocks[1].fc1.weight.detach(),
                               ref.state_dict()["blocks.1.mlp_channels.fc1.weight"])
    with torch.no_grad():
        out = model(torch.randn(2, 3, 96, 96))
    assert out.shape == (2, 10) and torch.isfinite(out).all()


def test_timm_unknown_keys_are_named() -> None:
    sd = timm_small().state_dict()
    sd["blocks.0.mlp_channels.gate.scale"] = torch.ones(3)
    with pytest.raises(CheckpointError, match=r"blocks\.0\.mlp_channels\.gate\.scale"):
        from_timm(sd)


def test_unknown_layout_is_refused() -> None:
    with pytest.raises(CheckpointError, match="unrecognised.*encoder.layer"):
        to_gmlp({"encoder.layer.0.weight": torch.ones(2)})


# ---------------------------------------------------------------------------------------------------
# g-mlp-pytorch (issue item 8)


@pytest.mark.parametrize(
    "extra",
    [{}, {"attn_dim": 16}, {"heads": 2}, {"heads": 2, "attn_dim": 16}],
    ids=["gmlp", "amlp", "heads2", "heads2-amlp"],
)
def test_g_mlp_pytorch_vision_parity(extra: dict) -> None:
    ref = randomize_(gMLPVision(image_size=32, patch_size=8, num_classes=10, dim=32, depth=2, ff_mult=4,
                                channels=3, **extra))
    with torch.no_grad():
        ref.to_logits[2].weight.normal_(0.0, 1.0)  # logits of order one
    model = GMLPVision(img_size=32, patch_size=8, num_classes=10, embed_dim=32, depth=2, mlp_ratio=4,
                       norm_eps=1e-5, sgu_norm_eps=1e-5, **extra).eval()
    model.load_state_dict(from_g_mlp_pytorch(ref.state_dict()), strict=True)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = ref(x)
        assert expected.abs().max() > 0.1
        assert (model(x) - expected).abs().max() <= 1e-5


def test_g_mlp_pytorch_file_through_create_model_with_one_channel(tmp_path: Path) -> None:
    ref = randomize_(gMLPVision(image_size=16, patch_size=4, num_classes=5, dim=16, depth=2, ff_mult=2,
                                channels=1, attn_dim=8))
    torch.save(ref.state_dict(), tmp_path / "lucid.pt")
    model = gmlp.create_model("gmlp_micro4_28", pretrained=tmp_path / "lucid.pt", img_size=16, embed_dim=16,
                              depth=2, mlp_ratio=2, num_classes=5, attn_dim=8, norm_eps=1e-5,
                              sgu_norm_eps=1e-5).eval()
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        assert (model(x) - ref(x)).abs().max() <= 1e-5


def test_g_mlp_pytorch_patch_stem_needs_the_right_in_chans() -> None:
    ref = gMLPVision(image_size=16, patch_size=4, num_classes=5, dim=16, depth=1, channels=1)
    with pytest.raises(CheckpointError, match="in_chans=3"):
        from_g_mlp_pytorch(ref.state_dict())
    assert from_g_mlp_pytorch(ref.state_dict(), in_chans=1)["stem.proj.weight"].shape == (16, 1, 4, 4)


def test_g_mlp_pytorch_rectangular_patches_are_refused() -> None:
    """A 2 x 8 patch flattens to 16 = 4 x 4 values: read as a square patch it converted without an error
    and gave other outputs. Given the model itself, the converter sees the patch shape and refuses."""
    ref = gMLPVision(image_size=16, patch_size=(2, 8), num_classes=3, dim=16, depth=1)
    with pytest.raises(CheckpointError, match=r"rectangular patches \(p1=2, p2=8\)"):
        from_g_mlp_pytorch(ref)
    with pytest.raises(CheckpointError, match=r"rectangular patches \(p1=2, p2=8\)"):
        to_gmlp(ref)  # converted the module's state dict, without the module's checks


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"shift_tokens": 1}, r"token shifting \(layers\.0\.fn\.fn\.shifts=\(-1, 0, 1\)"),
     ({"causal": True, "shift_tokens": 2}, r"token shifting .*shifts=\(0, 1, 2\)"),
     ({"act": torch.nn.Tanh()}, r"gate activation \(layers\.0\.fn\.fn\.fn\.sgu\.act=Tanh\(\)\)")],
    ids=["shift", "causal-shift", "tanh-gate"],
)
def test_g_mlp_pytorch_token_shift_and_gate_activation_are_refused(kwargs: dict, message: str) -> None:
    """Neither is in the state dict and gmlp has neither: the module converted silently to a model with
    other outputs. Given the module, the converter sees them and refuses (a plain or causal one converts)."""
    ref = gMLP(num_tokens=20, dim=16, depth=2, seq_len=8, **kwargs)
    with pytest.raises(CheckpointError, match=message):
        from_g_mlp_pytorch(ref)
    with pytest.raises(CheckpointError, match=message):
        to_gmlp(ref)
    plain = gMLP(num_tokens=20, dim=16, depth=2, seq_len=8, causal=kwargs.get("causal", False))
    assert from_g_mlp_pytorch(plain).keys() == from_g_mlp_pytorch(plain.state_dict()).keys()


def test_g_mlp_pytorch_circulant_checkpoint_is_refused() -> None:
    ref = gMLP(num_tokens=20, dim=16, depth=1, seq_len=8, circulant_matrix=True)
    with pytest.raises(CheckpointError, match="circulant"):
        from_g_mlp_pytorch(ref.state_dict())
    with pytest.raises(CheckpointError, match="circulant"):
        to_gmlp(ref.state_dict())


def test_g_mlp_pytorch_language_keys() -> None:
    ref = gMLP(num_tokens=20, dim=16, depth=2, seq_len=8, attn_dim=8, heads=2)
    assert detect_format(ref.state_dict()) == "g_mlp_pytorch"
    out = from_g_mlp_pytorch(ref.state_dict())
    assert out["embed.weight"].shape == (20, 16)
    assert out["lm_head.weight"].shape == (20, 16)
    assert out["blocks.1.sgu.proj.weight"].shape == (2, 8, 8)
    assert out["blocks.0.tiny_attn.qkv.weight"].shape == (24, 16)
    assert {"norm.weight", "blocks.0.norm.weight", "blocks.0.fc1.weight", "blocks.0.fc2.bias"} <= set(out)


def test_g_mlp_pytorch_single_head_loses_heads_axis() -> None:
    ref = gMLPVision(image_size=16, patch_size=4, num_classes=5, dim=16, depth=1)
    out = from_g_mlp_pytorch(ref.state_dict())
    assert out["blocks.0.sgu.proj.weight"].shape == (16, 16)
    assert out["blocks.0.sgu.proj.bias"].shape == (16,)


def test_our_format_passes_through() -> None:
    sd = GMLPVision(img_size=16, patch_size=4, embed_dim=16, depth=1).state_dict()
    assert detect_format(sd) == "gmlp"
    out = to_gmlp(sd)
    assert out.keys() == sd.keys() and all(out[k] is sd[k] for k in sd)


def test_converters_take_the_source_model_itself() -> None:
    ref = timm_small()
    assert detect_format(ref) == "timm"
    from_module, from_dict = from_timm(ref), from_timm(ref.state_dict())
    assert from_module.keys() == from_dict.keys()
    assert all(torch.equal(from_module[k], from_dict[k]) for k in from_dict)
    lucid = gMLP(num_tokens=20, dim=16, depth=1, seq_len=8)
    assert to_gmlp(lucid).keys() == from_g_mlp_pytorch(lucid.state_dict()).keys()
    with pytest.raises(TypeError, match="state_dict must be a mapping of names to tensors"):
        from_timm(5)


def test_a_malformed_g_mlp_pytorch_spatial_weight_is_named() -> None:
    state = gMLP(num_tokens=20, dim=16, depth=1, seq_len=8).state_dict()
    key = next(k for k in state if k.endswith("sgu.weight"))
    state[key] = torch.tensor(1.0)
    with pytest.raises(CheckpointError, match=r"sgu.weight has shape \(\); g-mlp-pytorch stores it as"):
        from_g_mlp_pytorch(state)
