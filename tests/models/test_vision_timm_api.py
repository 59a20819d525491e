"""timm's modern model API on the vision gMLP: forward_intermediates, prune_intermediate_layers, feature_info,
``create_model(features_only=True)``, set_input_size, and timm's data-config and layer-decay helpers."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import gmlp
from gmlp.models import FeatureGetterNet, GMLPVision
from gmlp.models.loading import load_pretrained, save_model
from gmlp.utils.state import import_timm_optim

timm = pytest.importorskip("timm")
from timm.layers import GatedMlp  # noqa: E402
from timm.models.mlp_mixer import MlpMixer, SpatialGatingBlock  # noqa: E402

from gmlp.convert import from_timm  # noqa: E402


def randomize_(module: nn.Module, std: float = 0.1) -> nn.Module:
    """Random non-trivial weights everywhere (spatial W and b included), eval mode."""
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, std)
    return module.eval()


def small(**kwargs) -> GMLPVision:
    """A tiny model on a non-square 2x3 grid (8x12 px, patch 4), 4 blocks, random weights."""
    cfg = dict(img_size=(8, 12), patch_size=4, in_chans=3, num_classes=5, embed_dim=8, depth=4, mlp_ratio=2)
    cfg.update(kwargs)
    return randomize_(GMLPVision(**cfg))


def block_outputs(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The output of every block in a plain forward, captured by forward hooks."""
    outs: list[torch.Tensor] = []
    handles = [b.register_forward_hook(lambda m, i, o: outs.append(o.detach().clone())) for b in model.blocks]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return outs


def timm_gmlp(depth: int = 4) -> MlpMixer:
    """timm's gMLP (MlpMixer + SpatialGatingBlock): 16 px, patch 4 (4x4 tokens), d_model 8, d_ffn 32."""
    ref = MlpMixer(num_classes=5, img_size=16, in_chans=3, patch_size=4, num_blocks=depth, embed_dim=8,
                   mlp_ratio=4, block_layer=SpatialGatingBlock, mlp_layer=GatedMlp)
    return randomize_(ref)


def ours_like(ref: MlpMixer) -> GMLPVision:
    depth = len(ref.blocks)
    model = GMLPVision(img_size=16, patch_size=4, num_classes=5, embed_dim=8, depth=depth, mlp_ratio=4)
    model.load_state_dict(from_timm(ref.state_dict()), strict=True)
    return model.eval()


# ---------------------------------------------------------------------------------------------------
# forward_intermediates


def test_intermediates_equal_block_outputs_in_both_formats() -> None:
    """Every map is its block's output (hooks), NLC as (B, tokens, C) and NCHW on the row-major grid."""
    model = small()
    x = torch.randn(2, 3, 8, 12)
    hooked = block_outputs(model, x)  # token-major (tokens, batch, dim)
    with torch.no_grad():
        nlc = model.forward_intermediates(x, output_fmt="NLC", intermediates_only=True)
        nchw = model.forward_intermediates(x, intermediates_only=True)
    assert len(nlc) == len(nchw) == len(hooked) == 4
    gh, gw = model.grid_size
    assert (gh, gw) == (2, 3)
    for y_nlc, y_nchw, ref in zip(nlc, nchw, hooked, strict=True):
        assert y_nlc.shape == (2, 6, 8) and y_nchw.shape == (2, 8, 2, 3)
        assert y_nchw.is_contiguous()
        torch.testing.assert_close(y_nlc, ref.transpose(0, 1))
        for i in range(gh):
            for j in range(gw):  # token i * gw + j is the patch at row i, column j
                torch.testing.assert_close(y_nchw[:, :, i, j], ref[i * gw + j])


def test_stem_layout_matches_nchw_maps() -> None:
    """With a single block that is the identity (zero fc2), the NCHW map is the stem's conv output."""
    model = small(depth=1)
    with torch.no_grad():
        model.blocks[0].fc2.weight.zero_()
        model.blocks[0].fc2.bias.zero_()
    x = torch.randn(2, 3, 8, 12)
    with torch.no_grad():
        (y,) = model.forward_intermediates(x, intermediates_only=True)
        torch.testing.assert_close(y, model.stem.proj(x))


def test_final_features_equal_forward_features_and_norm_option() -> None:
    model = small()
    x = torch.randn(3, 3, 8, 12)
    with torch.no_grad():
        final, maps = model.forward_intermediates(x, indices=[-1], norm=True, output_fmt="NLC")
        assert torch.equal(final, model.forward_features(x))
        torch.testing.assert_close(maps[0], final)  # the last block's map, normalised
        torch.testing.assert_close(model.forward_head(final), model(x))
        plain = model.forward_intermediates(x, output_fmt="NLC", intermediates_only=True)
        normed = model.forward_intermediates(x, norm=True, output_fmt="NLC", intermediates_only=True)
        for a, b in zip(plain, normed, strict=True):
            torch.testing.assert_close(b, model.norm(a))


def test_stop_early_runs_no_later_block() -> None:
    model = small()
    x = torch.randn(2, 3, 8, 12)
    calls: list[int] = []
    for i, block in enumerate(model.blocks):
        block.register_forward_hook(lambda m, inp, out, i=i: calls.append(i))
    with torch.no_grad():
        final, maps = model.forward_intermediates(x, indices=[0, 1], stop_early=True, output_fmt="NLC")
    assert calls == [0, 1] and len(maps) == 2
    torch.testing.assert_close(final, model.norm(maps[1]))
    calls.clear()
    with torch.no_grad():
        model.forward_intermediates(x, indices=[0, 1])
    assert calls == [0, 1, 2, 3]


def test_intermediates_with_grad_checkpointing_match_and_backprop() -> None:
    model = small().train()
    x = torch.randn(2, 3, 8, 12)
    ref = model.forward_intermediates(x, intermediates_only=True)
    model.set_grad_checkpointing(True)
    got = model.forward_intermediates(x, intermediates_only=True)
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b)
    sum(g.square().sum() for g in got).backward()
    assert model.blocks[0].sgu.proj.weight.grad.abs().sum() > 0


INDICES = [None, 1, 2, 4, [0], [-1], [3, 1], (0, 2), [1, 1, -3], [-4, 3]]


@pytest.mark.parametrize("indices", INDICES, ids=repr)
@pytest.mark.parametrize("output_fmt", ["NCHW", "NLC"])
def test_indices_semantics_match_timm_gmlp(indices, output_fmt: str) -> None:
    """On timm's own gMLP with the same weights: the same maps, in the same order and format, the same final
    features, for every kind of ``indices``; stop_early and norm too."""
    torch.manual_seed(0)
    ref = timm_gmlp()
    model = ours_like(ref)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        for norm, stop_early in ((False, False), (True, True)):
            kw = dict(indices=indices, norm=norm, stop_early=stop_early, output_fmt=output_fmt)
            final_ref, maps_ref = ref.forward_intermediates(x, **kw)
            final, maps = model.forward_intermediates(x, **kw)
            assert len(maps) == len(maps_ref) > 0
            for a, b in zip(maps, maps_ref, strict=True):
                assert a.shape == b.shape
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(final, final_ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("indices", [1, 2, [0], [-1], [2, 0], [-3]], ids=repr)
def test_prune_intermediate_layers_matches_timm(indices) -> None:
    torch.manual_seed(0)
    ref = timm_gmlp()
    model = ours_like(ref)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        full = model.forward_intermediates(x, indices=indices, intermediates_only=True)
    kept_ref = ref.prune_intermediate_layers(indices, prune_norm=True)
    kept = model.prune_intermediate_layers(indices, prune_norm=True)
    assert (set(kept) if isinstance(kept_ref, set) else kept) == kept_ref  # (timm < 1.0.8 gave a set)
    assert len(model.blocks) == len(ref.blocks) == max(kept) + 1 == len(model.feature_info)
    assert isinstance(model.norm, nn.Identity) and isinstance(model.head, nn.Identity)
    assert model.num_classes == 0 and model.global_pool == ""
    with torch.no_grad():
        pruned = model.forward_intermediates(x, indices=kept, intermediates_only=True)
        assert all(torch.equal(a, b) for a, b in zip(pruned, full, strict=True))
        assert model(x).shape == (2, 16, 8)  # unpooled tokens, no head


def test_bad_indices_and_options_are_named() -> None:
    model = small()
    x = torch.randn(1, 3, 8, 12)
    for bad in (0, 5, -1, [4], [-5], [], "1", True, [0.5], 2.0, [True], {"a": 1}):
        with pytest.raises(ValueError, match="indices") as info:
            model.forward_intermediates(x, indices=bad)
        assert repr(bad) in str(info.value)
        with pytest.raises(ValueError, match="indices"):
            model.prune_intermediate_layers(bad)
    with pytest.raises(ValueError, match="output_fmt.*'NHWC'"):
        model.forward_intermediates(x, output_fmt="NHWC")
    for arg in ("norm", "stop_early", "intermediates_only"):
        with pytest.raises(TypeError, match=f"{arg} must be True or False, got 'yes'"):
            model.forward_intermediates(x, **{arg: "yes"})
    with pytest.raises(TypeError, match="prune_norm"):
        model.prune_intermediate_layers(1, prune_norm=1)
    assert len(model.blocks) == 4  # nothing pruned by the refused calls


def test_reset_classifier_after_norm_is_pruned() -> None:
    """reset_classifier took the head's dtype from the final norm's weight: with the norm pruned
    (nn.Identity) it failed with an AttributeError."""
    model = small().double()
    model.norm = nn.Identity()
    model.reset_classifier(3)
    assert model.head.weight.dtype == torch.float64
    assert model(torch.randn(2, 3, 8, 12, dtype=torch.float64)).shape == (2, 3)


# ---------------------------------------------------------------------------------------------------
# feature_info and features_only


def test_feature_info_describes_every_block() -> None:
    model = small(patch_size=(4, 2), img_size=(8, 12))
    assert len(model.feature_info) == 4
    for i, info in enumerate(model.feature_info):
        assert info == {"num_chs": 8, "reduction": 4, "module": f"blocks.{i}"}
        assert model.get_submodule(info["module"]) is model.blocks[i]
    ref = timm_gmlp()
    assert [{k: d[k] for k in ("num_chs", "reduction", "module")} for d in ref.feature_info] == [
        {"num_chs": 8, "reduction": 4, "module": f"blocks.{i}"} for i in range(4)
    ]


@pytest.mark.parametrize("out_indices", [None, 1, (0, 2), [-1, 0], (1,)], ids=repr)
def test_features_only_maps_equal_forward_intermediates(out_indices, tmp_path: Path) -> None:
    base = randomize_(gmlp.create_model("gmlp_micro4_28", depth=3, embed_dim=16))
    save_model(base, tmp_path / "m.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the checkpoint's head is not "dropped with a warning"
        feats = gmlp.create_model(
            "gmlp_micro4_28", depth=3, embed_dim=16, features_only=True, out_indices=out_indices,
            pretrained=tmp_path / "m.safetensors",
        ).eval()
    assert isinstance(feats, FeatureGetterNet)
    x = torch.randn(2, 1, 28, 28)
    take = 3 if out_indices is None else out_indices  # timm's Mixer/ViT default: the last 3 blocks
    with torch.no_grad():
        expected = base.forward_intermediates(x, indices=take, intermediates_only=True)
        got = feats(x)
    assert isinstance(got, list) and len(got) == len(expected)
    for a, b in zip(got, expected, strict=True):
        assert a.shape == (2, 16, 7, 7)
        assert torch.equal(a, b)
    n = len(got)
    assert feats.feature_info.channels() == [16] * n and feats.feature_info.reduction() == [4] * n
    assert feats.feature_info.module_name() == [f"blocks.{i}" for i in feats.out_indices]
    assert len(feats.model.blocks) == max(feats.out_indices) + 1
    assert isinstance(feats.model.norm, nn.Identity) and isinstance(feats.model.head, nn.Identity)
    assert "num_classes" not in feats.pretrained_cfg and feats.pretrained_cfg["input_size"] == (1, 28, 28)


def test_feature_getter_matches_timm_wrapper() -> None:
    """Ours and timm's FeatureGetterNet around the same model: the same maps and feature_info."""
    from timm.models._features import FeatureGetterNet as TimmGetter

    ref_model = small()
    model = small()
    model.load_state_dict(ref_model.state_dict())
    ours = FeatureGetterNet(model, out_indices=[-1, 1], norm=True, output_fmt="NLC")
    theirs = TimmGetter(ref_model, out_indices=[-1, 1], norm=True, output_fmt="NLC")
    x = torch.randn(2, 3, 8, 12)
    with torch.no_grad():
        for a, b in zip(ours(x), theirs(x), strict=True):
            assert torch.equal(a, b)
    assert ours.out_indices == theirs.out_indices == [3, 1]
    for key in ("channels", "reduction", "module_name"):
        assert getattr(ours.feature_info, key)() == getattr(theirs.feature_info, key)()
    unpruned = FeatureGetterNet(small(), out_indices=(0, -3), prune=False)
    assert unpruned.out_indices == [0, 1] and len(unpruned.model.blocks) == 4
    assert isinstance(unpruned.model.head, nn.Linear) and isinstance(unpruned.model.norm, nn.LayerNorm)
    with torch.no_grad():
        maps = unpruned(x)
        expected = unpruned.model.forward_intermediates(x, indices=[0, 1], intermediates_only=True)
    assert all(torch.equal(a, b) for a, b in zip(maps, expected, strict=True))


def test_features_only_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match=r"out_indices=\(1, 2\) is only used with features_only=True"):
        gmlp.create_model("gmlp_micro4_28", out_indices=(1, 2))
    with pytest.raises(TypeError, match="features_only must be True or False, got 'yes'"):
        gmlp.create_model("gmlp_micro4_28", features_only="yes")
    with pytest.raises(ValueError, match=r"out_indices as an int .*\[1, 4\], got 5"):
        gmlp.create_model("gmlp_micro4_28", features_only=True, out_indices=5)
    with pytest.raises(ValueError, match=r"out_indices must be .*\[-4, 3\].*got \[0, 4\]"):
        gmlp.create_model("gmlp_micro4_28", features_only=True, out_indices=[0, 4])
    shallow = gmlp.create_model("gmlp_micro4_28", depth=2, features_only=True)  # fewer than 3 blocks: all
    assert shallow.out_indices == [0, 1]
    with pytest.raises(ValueError, match="output_fmt"):
        FeatureGetterNet(small(), output_fmt="NHWC")
    with pytest.raises(TypeError, match="forward_intermediates"):
        FeatureGetterNet(nn.Linear(2, 2))


# ---------------------------------------------------------------------------------------------------
# set_input_size


@pytest.mark.parametrize("size", [36, (20, 32), 12, 28], ids=repr)
def test_set_input_size_equals_building_at_that_size_from_a_checkpoint(size, tmp_path: Path) -> None:
    kw = dict(depth=2, embed_dim=16)
    model = randomize_(gmlp.create_model("gmlp_micro4_28", **kw))
    save_model(model, tmp_path / "m.safetensors")
    built = gmlp.create_model("gmlp_micro4_28", img_size=size, pretrained=tmp_path / "m.safetensors", **kw)
    model.set_input_size(img_size=size)
    for (k, a), (k2, b) in zip(model.state_dict().items(), built.state_dict().items(), strict=True):
        assert k == k2 and a.shape == b.shape and torch.equal(a, b), k
    assert model.img_size == built.img_size and model.grid_size == built.grid_size
    assert model.pretrained_cfg == built.pretrained_cfg
    assert all(b.seq_len == b.sgu.proj.seq_len == built.blocks[0].seq_len for b in model.blocks)
    x = torch.randn(2, 1, *built.img_size)
    with torch.no_grad():
        assert torch.equal(model(x), built.eval()(x))
        maps = model.forward_intermediates(x, intermediates_only=True)
    assert maps[0].shape == (2, 16, *built.grid_size)
    if built.img_size != (28, 28):
        with pytest.raises(ValueError, match="28x28"):
            model(torch.randn(1, 1, 28, 28))


def test_set_input_size_heads_variants_and_training(tmp_path: Path) -> None:
    """Several SGU heads and another gating variant, against load_pretrained at the new size; the new W
    and b train, the frozen state is kept."""
    kw = dict(img_size=(8, 12), heads=2, variant="multiplicative")
    model = small(**kw)
    model.blocks[1].sgu.proj.bias.requires_grad_(False)
    save_model(model, tmp_path / "m.safetensors")
    built = GMLPVision(**{**dict(patch_size=4, num_classes=5, embed_dim=8, depth=4, mlp_ratio=2), **kw,
                          "img_size": (16, 8)})
    load_pretrained(built, tmp_path / "m.safetensors")
    model.set_input_size((16, 8))
    for (k, a), b in zip(model.state_dict().items(), built.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    assert not model.blocks[1].sgu.proj.bias.requires_grad and model.blocks[0].sgu.proj.bias.requires_grad
    model.train()(torch.randn(2, 3, 16, 8)).sum().backward()
    assert model.blocks[0].sgu.proj.weight.grad.shape == (2, 8, 8)


def test_set_input_size_same_size_or_none_changes_nothing() -> None:
    model = small()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    weight = model.blocks[0].sgu.proj.weight
    model.set_input_size((8, 12))
    model.set_input_size(None, patch_size=4)
    assert model.blocks[0].sgu.proj.weight is weight
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_set_input_size_bad_arguments_are_named() -> None:
    model = small()
    with pytest.raises(ValueError, match=r"img_size \(10, 10\) must be divisible by patch_size \(4, 4\)"):
        model.set_input_size(10)
    for bad in (0, (8,), "16", 1.5):
        with pytest.raises(ValueError, match="img_size must be a positive int"):
            model.set_input_size(bad)
    with pytest.raises(ValueError, match=r"patch_size cannot be changed.*\(4, 4\), got 8"):
        model.set_input_size(16, patch_size=8)
    assert model.grid_size == (2, 3) and model.blocks[0].sgu.proj.weight.shape == (6, 6)


# ---------------------------------------------------------------------------------------------------
# timm's helpers


def test_timm_resolve_data_config_follows_set_input_size() -> None:
    from timm.data import resolve_data_config

    model = gmlp.create_model("gmlp_micro4_28", depth=1, embed_dim=16)
    cfg = resolve_data_config(model=model)
    assert cfg["input_size"] == (1, 28, 28) and cfg["mean"] == (0.2860,)
    assert cfg["interpolation"] == "bilinear"
    model.set_input_size(32)
    assert resolve_data_config(model=model)["input_size"] == (1, 32, 32)
    feats = gmlp.create_model("gmlp_micro4_28", depth=1, embed_dim=16, features_only=True, out_indices=1)
    assert resolve_data_config(model=feats) == cfg


def test_timm_layer_decay_groups_match_timm_gmlp() -> None:
    """create_optimizer_v2(layer_decay=...) scales each block's lr as on timm's own gMLP (group_matcher):
    stem lowest, one scale per block, the final norm with the last block, the head at 1."""
    create_optimizer_v2 = import_timm_optim().create_optimizer_v2  # (timm.optim sets torch.compile's config)

    def scales(model: nn.Module) -> dict[str, float]:
        opt = create_optimizer_v2(model, opt="adamw", lr=1.0, weight_decay=0.05, layer_decay=0.7)
        names = {id(p): n for n, p in model.named_parameters()}
        out: dict[str, float] = {}
        for group in opt.param_groups:
            for p in group["params"]:
                name = names[id(p)]
                prefix = ".".join(name.split(".")[:2]) if name.startswith("blocks.") else name.split(".")[0]
                assert out.setdefault(prefix, group["lr_scale"]) == group["lr_scale"]
                decay = p.ndim > 1
                assert group["weight_decay"] == (0.05 if decay else 0.0), name
        return out

    ref = timm_gmlp(depth=3)
    ours = ours_like(ref)
    got = scales(ours)
    assert got == scales(ref)
    assert got["head"] == 1.0
    assert got["norm"] == got["blocks.2"] > got["blocks.1"] > got["blocks.0"] > got["stem"]


@pytest.mark.parametrize("layer_decay", [None, 0.7])
def test_timm_optimizer_never_decays_spatial_biases_of_several_heads(layer_decay) -> None:
    """With heads > 1 the spatial bias is (heads, tokens): timm's layer-decay grouping decays every
    parameter of 2 dims unless no_weight_decay() names it; it decayed it (without layer decay it did not)."""
    create_optimizer_v2 = import_timm_optim().create_optimizer_v2

    model = small(heads=2)
    opt = create_optimizer_v2(model, opt="adamw", lr=1.0, weight_decay=0.05, layer_decay=layer_decay)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert model.blocks[0].sgu.proj.bias.shape == (2, 6)
    assert decayed == {n for n, p in model.named_parameters() if n.endswith("weight") and p.dim() > 1}
