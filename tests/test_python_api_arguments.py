"""No argument of the Python API of the layers, the vision models, ``create_model`` and the converters is
silently ignored: each one either has an effect (seen in the state dict, the outputs, the training-mode
outputs or the recorded config) or is refused with an error naming it, what it got and what is expected.

Table-driven: every constructor argument of :class:`GMLPVision` and of the layers has a row saying how its
effect shows (a new argument without a row fails :func:`test_every_argument_has_a_row`)."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import gmlp
from gmlp.convert import from_g_mlp_pytorch, to_gmlp
from gmlp.models import FeatureGetterNet, GMLPVision
from gmlp.models.vision import drop_path_rates
from gmlp.nn import (
    DropPath,
    GMLPBlock,
    SpatialGatingUnit,
    TinyAttention,
    TokenLinear,
    TokenProjection,
    drop_path,
)
from gmlp.utils.io import CheckpointError

# ---------------------------------------------------------------------------------------------------
# GMLPVision: every argument has an effect


BASE: dict[str, Any] = dict(img_size=12, patch_size=4, in_chans=1, num_classes=3, embed_dim=8, depth=2,
                            mlp_ratio=2)


def observe(model: nn.Module) -> dict[str, Any]:
    """What an argument can change: the state dict (names, shapes, initial values), the recorded config
    and attributes, the eval outputs with random weights, and the training-mode outputs (dropout, drop
    path) under a fixed seed."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = dict(model.pretrained_cfg)
    with torch.no_grad():
        for p in model.parameters():  # random weights: the head starts at zero, W near zero
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.3)
    x = torch.randn(2, model.in_chans, *model.img_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        evaluated = model.eval()(x)
        model.train()
        torch.manual_seed(2)
        trained = model(x)
        torch.manual_seed(2)
        pooled = model.forward_head(model.forward_features(x), pre_logits=True)
    return dict(state=state, cfg=cfg, pool=model.global_pool, eval=evaluated, train=trained, pooled=pooled)


def differs(a: dict[str, Any], b: dict[str, Any], cfg: bool = False) -> bool:
    """Whether the model differs in what it computes (or, with ``cfg``, in its recorded pretrained_cfg: the
    effect of the pretrained_cfg argument alone; the sizes' rows must change the layers, not the record)."""
    if a["state"].keys() != b["state"].keys() or (cfg and a["cfg"] != b["cfg"]) or a["pool"] != b["pool"]:
        return True
    if any(a["state"][k].shape != b["state"][k].shape or not torch.equal(a["state"][k], b["state"][k])
           for k in a["state"]):
        return True
    return any(a[k].shape != b[k].shape or not torch.equal(a[k], b[k]) for k in ("eval", "train", "pooled"))


#: (argument, value, base arguments where it must show, variants it is checked in)
VARIANTS = ("sgu", "linear", "additive", "multiplicative", "mixer", "none")
GATED = ("sgu", "linear", "additive", "multiplicative")
VISION_ROWS: list[tuple[str, Any, dict[str, Any], tuple[str, ...]]] = [
    ("img_size", 16, {}, VARIANTS),
    ("patch_size", 6, {}, VARIANTS),
    ("in_chans", 3, {}, VARIANTS),
    ("num_classes", 5, {}, VARIANTS),
    ("embed_dim", 12, {}, VARIANTS),
    ("depth", 3, {}, VARIANTS),
    ("mlp_ratio", 4, {}, VARIANTS),
    ("drop_rate", 0.5, {}, VARIANTS),
    ("proj_drop_rate", 0.5, {}, VARIANTS),
    ("drop_path_rate", 0.5, {}, VARIANTS),
    ("drop_path_schedule", "linear", {"drop_path_rate": 0.5}, VARIANTS),
    ("global_pool", "", {}, VARIANTS),
    ("attn_dim", 4, {}, GATED),
    ("heads", 2, {}, GATED),
    ("variant", "linear", {}, ("sgu",)),
    ("norm_eps", 0.5, {}, VARIANTS),
    ("sgu_norm_eps", 0.5, {}, (*GATED, "mixer")),
    ("init_std", 0.1, {}, (*GATED, "mixer")),
    ("pretrained_cfg", {"mean": (0.1,)}, {}, ("sgu",)),
]


def test_every_argument_has_a_row() -> None:
    assert {row[0] for row in VISION_ROWS} == set(inspect.signature(GMLPVision).parameters)
    for cls, rows in LAYER_ROWS.items():
        assert {row[0] for row in rows} == set(inspect.signature(cls).parameters) - LAYER_SIZES[cls], cls


@pytest.mark.parametrize(
    ("arg", "value", "base", "variant"),
    [(a, v, b, var) for a, v, b, variants in VISION_ROWS for var in variants],
    ids=lambda p: p if isinstance(p, str) else "",
)
def test_vision_argument_has_an_effect(arg: str, value: Any, base: dict, variant: str) -> None:
    kwargs = {**BASE, **base, "variant": variant}
    torch.manual_seed(0)
    plain = observe(GMLPVision(**kwargs))
    torch.manual_seed(0)
    changed = observe(GMLPVision(**{**kwargs, arg: value}))
    effect = differs(plain, changed, cfg=arg == "pretrained_cfg")
    assert effect, f"{arg}={value!r} changed nothing (variant {variant!r})"


def test_create_model_arguments_have_an_effect(tmp_path) -> None:
    """create_model's own arguments: pretrained/checkpoint_path load weights, features_only/out_indices
    pick the maps, pretrained_cfg_overlay goes over pretrained_cfg (timm's order)."""
    small = dict(depth=2, embed_dim=8)
    model = gmlp.create_model("gmlp_micro4_28", **small)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    gmlp.save_model(model, tmp_path / "m.safetensors")
    for arg in ("pretrained", "checkpoint_path"):
        loaded = gmlp.create_model("gmlp_micro4_28", **small, **{arg: tmp_path / "m.safetensors"})
        assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(),
                                                     model.state_dict().values(), strict=True))
    x = torch.randn(1, 1, 28, 28)
    feats = gmlp.create_model("gmlp_micro4_28", **small, features_only=True, out_indices=[0])
    assert isinstance(feats, FeatureGetterNet) and feats.out_indices == [0] and len(feats(x)) == 1
    over = gmlp.create_model("gmlp_micro4_28", **small, pretrained_cfg={"mean": (0.1,), "std": (0.2,)},
                             pretrained_cfg_overlay={"mean": (0.3,), "license": "x"})
    assert over.pretrained_cfg["mean"] == (0.3,) and over.pretrained_cfg["std"] == (0.2,)
    assert over.pretrained_cfg["license"] == "x" and over.pretrained_cfg["architecture"] == "gmlp_micro4_28"
    matching = gmlp.create_model("gmlp_micro4_28", **small, num_classes=4, img_size=32,
                                 pretrained_cfg={"num_classes": 4, "input_size": [1, 32, 32]},
                                 pretrained_cfg_overlay={"num_classes": 4})
    assert matching.pretrained_cfg["input_size"] == (1, 32, 32)
    assert matching.pretrained_cfg["num_classes"] == 4


def test_a_cfg_s_sizes_are_the_defaults_of_the_arguments_left_out() -> None:
    """As timm: a pretrained_cfg (or the overlay, over it) that records num_classes / input_size sizes the
    model where the arguments are left out, given arguments win, and the model records its actual sizes.
    (Refusing a cfg whose sizes differ from the arguments broke reusing a model's cfg for finetuning, and
    features_only with a cfg that records a head.)"""
    base = gmlp.create_model("gmlp_micro4_28", depth=1, embed_dim=8)
    sized = gmlp.create_model("gmlp_micro4_28", depth=1, embed_dim=8,
                              pretrained_cfg={"num_classes": 5, "input_size": (3, 32, 32), "crop_pct": 0.9})
    assert (sized.num_classes, sized.in_chans, sized.img_size) == (5, 3, (32, 32))
    assert sized.pretrained_cfg["crop_pct"] == 0.9
    finetune = gmlp.create_model("gmlp_micro4_28", depth=1, embed_dim=8, num_classes=3, img_size=32,
                                 pretrained_cfg=base.pretrained_cfg,
                                 pretrained_cfg_overlay={"num_classes": 7})
    assert finetune.num_classes == 3 and finetune.img_size == (32, 32)
    recorded = finetune.pretrained_cfg
    assert recorded["num_classes"] == 3 and recorded["input_size"] == (1, 32, 32)
    overlay = gmlp.create_model("gmlp_micro4_28", depth=1, embed_dim=8, pretrained_cfg={"num_classes": 5},
                                pretrained_cfg_overlay={"num_classes": 7})
    assert overlay.num_classes == 7 == overlay.pretrained_cfg["num_classes"]
    features = gmlp.create_model("gmlp_micro4_28", depth=1, embed_dim=8, features_only=True,
                                 pretrained_cfg=base.pretrained_cfg)
    assert len(features(torch.randn(1, 1, 28, 28))) == 1
    # weight sources are metadata, as in timm without pretrained=True
    timm_cfg = gmlp.create_model("gmlp_micro4_28", depth=1, embed_dim=8,
                                 pretrained_cfg={"hf_hub_id": "timm/x", "url": "https://x"})
    assert timm_cfg.pretrained_cfg["hf_hub_id"] == "timm/x"


def test_given_normalisation_wins_over_the_checkpoint_s(tmp_path) -> None:
    """A checkpoint's recorded mean/std go into pretrained_cfg at loading; one the caller gives in
    pretrained_cfg or pretrained_cfg_overlay was overwritten by them (silently ignored) and now wins."""
    model = gmlp.create_model("gmlp_micro4_28", depth=1)
    model.pretrained_cfg.update(mean=(0.5,), std=(0.25,))
    gmlp.save_model(model, tmp_path / "m.safetensors")
    for given in ({"pretrained_cfg": {"mean": (0.9,)}}, {"pretrained_cfg_overlay": {"mean": (0.9,)}}):
        loaded = gmlp.create_model("gmlp_micro4_28", depth=1, pretrained=tmp_path / "m.safetensors", **given)
        assert loaded.pretrained_cfg["mean"] == (0.9,) and loaded.pretrained_cfg["std"] == (0.25,), given
    plain = gmlp.create_model("gmlp_micro4_28", depth=1, pretrained=tmp_path / "m.safetensors")
    assert plain.pretrained_cfg["mean"] == (0.5,) and plain.pretrained_cfg["std"] == (0.25,)


def test_timm_layer_switches_given_as_false_change_nothing() -> None:
    """scriptable/exportable/no_jit=False ask for nothing (gmlp's layers have one implementation each)."""
    torch.manual_seed(0)
    plain = gmlp.create_model("gmlp_micro4_28", depth=1)
    torch.manual_seed(0)
    model = gmlp.create_model("gmlp_micro4_28", depth=1, scriptable=False, exportable=False, no_jit=False)
    assert not differs(observe(plain), observe(model))


def test_features_only_takes_the_head_arguments_at_their_pruned_values() -> None:
    feats = gmlp.create_model("gmlp_micro4_28", depth=1, features_only=True, num_classes=0, global_pool="",
                              drop_rate=0.0)
    assert len(feats(torch.randn(1, 1, 28, 28))) == 1


# ---------------------------------------------------------------------------------------------------
# the layers: every argument has an effect, per variant


def layer_out(module: nn.Module, *inputs: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.3)
        return module.eval()(*inputs, **kwargs)


def state_of(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a)


def seen(cls: type, args: tuple, kwargs: dict, inputs: Callable[[], tuple], how: str) -> Any:
    """What a layer built with ``kwargs`` shows: its initial state, or outputs with random weights, or
    whether its projection takes the FFT path."""
    torch.manual_seed(0)
    module = cls(*args, **kwargs)
    if how == "state":
        return state_of(module)
    if how == "fft":
        return next(m for m in module.modules() if isinstance(m, TokenProjection)).uses_fft(6)
    return layer_out(module, *inputs())


def z_for(dim: int) -> Callable[[], tuple]:
    return lambda: (torch.randn(6, 2, dim, generator=torch.Generator().manual_seed(3)),)


#: constructor arguments that set sizes (their effect is the shapes: covered by the layers' own tests)
LAYER_SIZES: dict[type, set[str]] = {
    TokenProjection: {"seq_len"}, SpatialGatingUnit: {"dim", "seq_len"}, TinyAttention: {"dim", "out_dim"},
    GMLPBlock: {"dim", "dim_ffn", "seq_len"}, TokenLinear: {"in_features", "out_features"},
}
#: per layer: (argument, base kwargs, changed value, how the effect shows ("out", "state", "fft"))
LAYER_ROWS: dict[type, list[tuple[str, dict, Any, str]]] = {
    TokenProjection: [
        ("toeplitz", {}, True, "state"), ("causal", {}, True, "out"), ("heads", {}, 2, "state"),
        ("init_std", {}, 0.1, "state"), ("fft_threshold", {"toeplitz": True}, 2, "fft"),
    ],
    SpatialGatingUnit: [
        *[(arg, {"variant": v, **base}, value, how)
          for v in ("sgu", "linear", "additive", "multiplicative")
          for arg, base, value, how in [
              ("variant", {}, "mixer" if v != "sgu" else "linear", "out"), ("toeplitz", {}, True, "state"),
              ("causal", {}, True, "out"), ("heads", {}, 2, "state"), ("norm_eps", {}, 0.5, "out"),
              ("init_std", {}, 0.1, "state"),
          ]],
        ("fft_threshold", {"toeplitz": True}, 2, "fft"),
        *[(arg, {"variant": "mixer"}, value, how) for arg, value, how in [
            ("norm_eps", 0.5, "out"), ("init_std", 0.1, "state"), ("token_mlp_dim", 3, "state"),
        ]],
    ],
    TinyAttention: [("attn_dim", {"attn_dim": 2, "out_dim": 4}, 4, "state"),
                    ("causal", {"attn_dim": 2, "out_dim": 4}, True, "out")],
    TokenLinear: [("init_std", {"init_std": 0.1}, 0.5, "state"),
                  ("bias_init", {"init_std": 0.1}, 1.0, "state")],
    GMLPBlock: [
        *[(arg, {"variant": v, **base}, value, how)
          for v in ("sgu", "linear", "additive", "multiplicative")
          for arg, base, value, how in [
              ("variant", {}, "mixer", "out"), ("toeplitz", {}, True, "state"), ("causal", {}, True, "out"),
              ("causal", {"attn_dim": 4}, True, "out"), ("heads", {}, 2, "state"),
              ("attn_dim", {}, 4, "state"), ("norm_eps", {}, 0.5, "out"), ("sgu_norm_eps", {}, 0.5, "out"),
              ("init_std", {}, 0.1, "state"),
          ]],
        ("fft_threshold", {"toeplitz": True}, 2, "fft"),
        ("drop_path", {}, 0.5, "train"), ("dropout", {}, 0.5, "train"),
        ("token_mlp_dim", {"variant": "mixer"}, 3, "state"),
    ],
}
LAYER_ARGS: dict[type, tuple[tuple, Callable[[], tuple]]] = {
    TokenProjection: ((6,), z_for(4)), SpatialGatingUnit: ((8, 6), z_for(8)), TinyAttention: ((8,), z_for(8)),
    TokenLinear: ((6, 4), z_for(3)), GMLPBlock: ((8, 16, 6), z_for(8)),
}


@pytest.mark.parametrize(
    ("cls", "arg", "base", "value", "how"),
    [(cls, *row) for cls, rows in LAYER_ROWS.items() for row in rows],
    ids=lambda p: p.__name__ if isinstance(p, type) else str(p) if isinstance(p, (str, dict)) else "",
)
def test_layer_argument_has_an_effect(cls: type, arg: str, base: dict, value: Any, how: str) -> None:
    args, inputs = LAYER_ARGS[cls]
    if how == "train":  # dropout / drop path: the training outputs under one seed
        outs = []
        for kwargs in (base, {**base, arg: value}):
            torch.manual_seed(0)
            module = cls(*args, **kwargs)
            layer_out(module, *inputs())
            torch.manual_seed(1)
            with torch.no_grad():
                outs.append(module.train()(*inputs()))
        assert not torch.equal(*outs), f"{cls.__name__}({arg}={value!r}) changed nothing in training"
        return
    plain = seen(cls, args, base, inputs, how)
    changed = seen(cls, args, {**base, arg: value}, inputs, how)
    if how == "state":
        assert not same_state(plain, changed), f"{cls.__name__}({arg}={value!r}) changed no parameter"
    elif how == "fft":
        assert (plain, changed) == (False, True)
    else:
        same = plain.shape == changed.shape and torch.equal(plain, changed)
        assert not same, f"{cls.__name__}({arg}={value!r}) changed no output"


# ---------------------------------------------------------------------------------------------------
# refused: each error names the argument, what it got and what is expected


def _micro(**kwargs: Any) -> nn.Module:
    return gmlp.create_model("gmlp_micro4_28", depth=1, embed_dim=8, **kwargs)


def _features() -> torch.Tensor:
    model = _micro()
    return model.forward_features(torch.randn(1, 1, 28, 28))


def _lucid(channels: int) -> nn.Module:
    gMLPVision = pytest.importorskip("g_mlp_pytorch").gMLPVision  # (a skip, not the error expected)
    return gMLPVision(image_size=8, patch_size=2, num_classes=3, dim=8, depth=1, channels=channels)


_Z = torch.randn(4, 2, 3)
_LUCID_STEM = {"to_patch_embed.1.weight": torch.randn(8, 48), "to_patch_embed.1.bias": torch.zeros(8)}

REFUSED: list[tuple[str, Callable[[], Any], type[Exception], str]] = [
    # the layers
    ("TokenLinear out float", lambda: TokenLinear(4, 3, init_std=0.1)(torch.randn(4, 2), 2.0), ValueError,
     r"out must be an int in \[1, out_features=3\], got 2.0"),
    ("TokenLinear out bool", lambda: TokenLinear(4, 3, init_std=0.1)(torch.randn(4, 2), True), ValueError,
     r"out must be an int in \[1, out_features=3\], got True"),
    ("TokenLinear out str", lambda: TokenLinear(4, 3, init_std=0.1)(torch.randn(4, 2), "2"), ValueError,
     r"out must be an int in \[1, out_features=3\], got '2'"),
    ("TokenLinear int z", lambda: TokenLinear(4, 3, init_std=0.1)(torch.ones(4, 2, dtype=torch.long)),
     TypeError, "z must be a floating-point tensor, got dtype torch.int64"),
    ("drop_path p str", lambda: drop_path(_Z, "0.5", True), ValueError,
     r"drop path probability p must be a number in \[0, 1\], got '0.5'"),
    ("drop_path p bool", lambda: drop_path(_Z, True, True), ValueError,
     r"drop path probability p must be a number in \[0, 1\], got True"),
    ("drop_path training str", lambda: drop_path(_Z, 0.5, "no"), TypeError,
     "training must be True or False, got 'no'"),
    ("DropPath batch_dim", lambda: DropPath(0.5, batch_dim=3).train()(_Z), ValueError,
     r"batch_dim must be an axis of x \(shape \(4, 2, 3\)\), got 3"),
    # the vision model's methods
    ("set_grad_checkpointing str", lambda: _micro().set_grad_checkpointing("no"), TypeError,
     "enable must be True or False, got 'no'"),
    ("forward_head pre_logits str", lambda: _micro().forward_head(_features(), pre_logits="no"), TypeError,
     "pre_logits must be True or False, got 'no'"),
    ("group_matcher coarse str", lambda: _micro().group_matcher(coarse="yes"), TypeError,
     "coarse must be True or False, got 'yes'"),
    ("drop_path_rates depth", lambda: drop_path_rates(0.1, 2.5), ValueError,
     "depth must be an int >= 1, got 2.5"),
    # create_model: timm's arguments gmlp's models do not take
    *[(f"create_model {name}", (lambda name=name: _micro(**{name: True})), TypeError,
       rf"gmlp_micro4_28 got an unexpected argument {name}=True \(timm's layer-config switch.*; it takes "
       r"attn_dim, depth, ")
      for name in ("scriptable", "exportable", "no_jit")],
    ("create_model cache_dir", lambda: _micro(cache_dir="/tmp"), TypeError,
     r"unexpected argument cache_dir='/tmp' \(gmlp downloads no weights"),
    ("create_model pretrained_strict", lambda: _micro(pretrained_strict=False), TypeError,
     r"unexpected argument pretrained_strict=False \(gmlp loads checkpoints strictly"),
    ("create_model feature_cls", lambda: _micro(features_only=True, feature_cls="getter"), TypeError,
     r"unexpected argument feature_cls='getter' \(features_only always builds"),
    ("create_model output_fmt", lambda: _micro(features_only=True, output_fmt="NLC"), TypeError,
     r"unexpected argument output_fmt='NLC' \(for a features_only model wrap it yourself: "
     r"gmlp.models.FeatureGetterNet"),
    ("create_model unknown", lambda: _micro(dropout=0.1), TypeError,
     r"gmlp_micro4_28 got an unexpected argument dropout=0.1; it takes attn_dim, .*pretrained_cfg_overlay"),
    # create_model: head arguments with features_only (the head is pruned)
    *[(f"features_only {arg}", (lambda arg=arg, value=value: _micro(features_only=True, **{arg: value})),
       ValueError,
       rf"{arg}={value!r} has no effect with features_only=True: .*head .* is pruned; leave {arg} out")
      for arg, value in (("num_classes", 5), ("global_pool", "avg"), ("drop_rate", 0.5))],
    # pretrained_cfg / pretrained_cfg_overlay
    ("pretrained_cfg input_size", lambda: _micro(pretrained_cfg={"input_size": 32}), ValueError,
     r"pretrained_cfg's input_size must be \(in_chans, height, width\), three ints >= 1, got 32"),
    ("overlay input_size", lambda: _micro(pretrained_cfg_overlay={"input_size": (1, 0, 28)}), ValueError,
     r"input_size must be \(in_chans, height, width\), three ints >= 1, got \(1, 0, 28\)"),
    ("overlay not a dict", lambda: _micro(pretrained_cfg_overlay=[("mean", 0.1)]), TypeError,
     "pretrained_cfg_overlay must be a dict or None, got list"),
    ("list_models pretrained str", lambda: gmlp.list_models(pretrained="no"), TypeError,
     "pretrained must be True or False, got 'no'"),
    # the converters
    *[(f"from_g_mlp_pytorch in_chans={v!r}", (lambda v=v: from_g_mlp_pytorch(_LUCID_STEM, in_chans=v)),
       ValueError, rf"in_chans must be an int >= 1, got {v!r}") for v in (0, -3, 3.0, None, "3")],
    ("to_gmlp in_chans", lambda: to_gmlp({"blocks.0.fc1.weight": torch.zeros(2, 2)}, in_chans=True),
     ValueError, "in_chans must be an int >= 1, got True"),
    ("from_g_mlp_pytorch module channels", lambda: from_g_mlp_pytorch(_lucid(12)), CheckpointError,
     r"2x2 patches of 12 channels .*converted with in_chans=3: pass its in_chans=12"),
]


@pytest.mark.parametrize(("call", "error", "message"), [r[1:] for r in REFUSED], ids=[r[0] for r in REFUSED])
def test_refused_with_the_argument_named(call: Callable[[], Any], error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        call()


def test_a_refused_flag_leaves_the_model_as_it_was() -> None:
    """A refused flag changes nothing (set_grad_checkpointing kept its old value)."""
    model = _micro()
    with pytest.raises(TypeError):
        model.set_grad_checkpointing("yes")
    assert model.grad_checkpointing is False
    model.set_grad_checkpointing()
    assert model.grad_checkpointing is True


def test_accepted_values_still_work() -> None:
    """The checks refuse only what was silently misread: ints of numpy, explicit bools, the converters'
    right in_chans, is_model of anything."""
    import numpy as np

    z = torch.randn(4, 2)
    linear = TokenLinear(4, 3, init_std=0.1)
    assert torch.equal(linear(z, np.int64(2)), linear(z, 2)) and linear(z, 2).shape == (2, 2)
    assert torch.equal(drop_path(_Z, 0.5, False), _Z) and torch.equal(drop_path(_Z, 1.0, True), _Z * 0)
    assert drop_path(_Z, 0.5, True, batch_dim=-2).shape == _Z.shape
    assert gmlp.models.is_model("gmlp_micro4_28") and not gmlp.models.is_model(["gmlp_micro4_28"])
    assert from_g_mlp_pytorch(_LUCID_STEM, in_chans=np.int64(3))["stem.proj.weight"].shape == (8, 3, 4, 4)
    assert from_g_mlp_pytorch(_lucid(12), in_chans=12)["stem.proj.weight"].shape == (8, 12, 2, 2)
