"""Weight import from the peers: timm's gMLP and lucidrains' g-mlp-pytorch.

Both functions map the source's parameter names to ours (``blocks.N.{norm,fc1,sgu.norm,sgu.proj,
tiny_attn.qkv,tiny_attn.out,fc2}``); converted models reproduce the source's outputs exactly when built with
the source's LayerNorm epsilons (timm: 1e-6 for block/final norms and 1e-5 in the gate, which are our
defaults; g-mlp-pytorch: 1e-5 everywhere).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .nn._checks import check_int
from .utils.io import CheckpointError

__all__ = ["detect_format", "from_timm", "from_g_mlp_pytorch", "to_gmlp"]

_TIMM_BLOCK = {
    "norm": "norm",
    "mlp_channels.fc1": "fc1",
    "mlp_channels.gate.norm": "sgu.norm",
    "mlp_channels.gate.proj": "sgu.proj",
    "mlp_channels.fc2": "fc2",
}

_LUCID_BLOCK = {
    "proj_in.0": "fc1",
    "attn.to_qkv": "tiny_attn.qkv",
    "attn.to_out": "tiny_attn.out",
    "sgu.norm": "sgu.norm",
    "proj_out": "fc2",
}


def _as_state_dict(source: Any) -> Mapping[str, torch.Tensor]:
    """A state dict as given, or a module's ``state_dict()``; anything else is a TypeError."""
    if isinstance(source, nn.Module):
        return source.state_dict()
    if not isinstance(source, Mapping):
        kind = type(source).__name__
        raise TypeError(f"state_dict must be a mapping of names to tensors (or a module), got {kind}")
    return source


def detect_format(state_dict: Mapping[str, torch.Tensor] | nn.Module) -> str:
    """``"gmlp"``, ``"timm"`` or ``"g_mlp_pytorch"``, from characteristic keys (of a module's state dict, if
    given a module).

    Raises:
        CheckpointError: the keys match none of the known layouts.
    """
    keys = set(_as_state_dict(state_dict))
    if any(k.startswith("blocks.") and ".mlp_channels." in k for k in keys):
        return "timm"
    if any(re.match(r"layers\.\d+\.fn\.", k) for k in keys):
        return "g_mlp_pytorch"
    ours = any(re.match(r"blocks\.\d+\.(fc1|sgu)\.", k) for k in keys)
    if ours or any(k.startswith("gmlp.") for k in keys):
        return "gmlp"
    raise CheckpointError(f"unrecognised checkpoint layout; first keys: {sorted(keys)[:5]}")


def _unknown(keys: list[str], source: str) -> CheckpointError:
    return CheckpointError(f"{source} checkpoint has keys this converter does not know: {keys[:5]}")


def from_timm(state_dict: Mapping[str, torch.Tensor] | nn.Module) -> dict[str, torch.Tensor]:
    """Convert a timm ``gmlp_*`` state dict (``MlpMixer`` with ``SpatialGatingBlock``), or the timm model
    itself, to ours."""
    out: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, value in _as_state_dict(state_dict).items():
        m = re.fullmatch(r"blocks\.(\d+)\.(.+)\.(weight|bias)", key)
        if m and m.group(2) in _TIMM_BLOCK:
            out[f"blocks.{m.group(1)}.{_TIMM_BLOCK[m.group(2)]}.{m.group(3)}"] = value
        elif re.fullmatch(r"(stem\.proj|norm|head)\.(weight|bias)", key):
            out[key] = value
        else:
            unknown.append(key)
    if unknown:
        raise _unknown(unknown, "timm")
    return out


def from_g_mlp_pytorch(
    state_dict: Mapping[str, torch.Tensor] | nn.Module, in_chans: int = 3
) -> dict[str, torch.Tensor]:
    """Convert a g-mlp-pytorch ``gMLPVision`` or ``gMLP`` state dict (or the model itself) to ours.

    Vision: the linear patch stem ``to_patch_embed.1`` (input order ``c p1 p2``) becomes the conv stem
    ``stem.proj``; ``to_logits.0``/``.2`` become ``norm``/``head``. Language: ``to_embed`` becomes
    ``embed.weight``, ``to_logits.0``/``.1`` become ``norm``/``lm_head``. The SGU ``weight`` (heads, n, n)
    and ``bias`` (heads, n) lose their heads axis when there is one head. Circulant checkpoints
    (``circulant_pos_x``) are refused: that mode is not a Toeplitz W (see docs). ``in_chans`` gives the
    image channels of a vision checkpoint (not stored in it). Patches are taken as square (a bare state
    dict does not record their shape); a model with rectangular patches is refused when it is passed
    itself, as its flattened stem would otherwise be reshaped wrongly without an error. So are models
    made with ``shift_tokens`` or a gate ``act`` (not stored in a state dict either; gmlp has neither).

    Raises:
        ValueError: ``in_chans`` not a positive int.
        CheckpointError: a layout or a model this converter cannot convert faithfully.
    """
    in_chans = check_int(in_chans, "in_chans")
    if isinstance(state_dict, nn.Module):
        embed = getattr(state_dict, "to_patch_embed", None)
        sizes = getattr(embed[0], "axes_lengths", None) if isinstance(embed, nn.Sequential) else None
        if isinstance(sizes, dict) and sizes.get("p1", 0) != sizes.get("p2", 0):
            raise CheckpointError(
                f"g-mlp-pytorch model with rectangular patches (p1={sizes.get('p1')}, p2={sizes.get('p2')}): "
                f"gmlp's patch stem takes square patches only"
            )
        stem = embed[1] if isinstance(embed, nn.Sequential) and len(embed) > 1 else None
        patch = sizes.get("p1") if isinstance(sizes, dict) else None
        flat = getattr(stem, "in_features", None)
        if isinstance(patch, int) and patch > 0 and isinstance(flat, int) and flat != in_chans * patch**2:
            # (a bare state dict cannot tell: 12 channels of 2x2 patches read as 3 channels of 4x4 ones)
            raise CheckpointError(
                f"g-mlp-pytorch model with {patch}x{patch} patches of {flat // (patch * patch)} channels "
                f"(to_patch_embed.1 takes {flat} values), converted with in_chans={in_chans}: pass its "
                f"in_chans={flat // (patch * patch)}"
            )
        for name, module in state_dict.named_modules():
            if getattr(module, "shifts", (0,)) not in ((0,), ()):
                raise CheckpointError(
                    f"g-mlp-pytorch model with token shifting ({name}.shifts={module.shifts}, from "
                    f"shift_tokens): gmlp has no token shift, the converted model would give other outputs"
                )
            act = getattr(module, "act", None)
            if isinstance(act, nn.Module) and not isinstance(act, nn.Identity):
                raise CheckpointError(
                    f"g-mlp-pytorch model with a gate activation ({name}.act={act}): gmlp's gate has none, "
                    f"the converted model would give other outputs"
                )
    state_dict = _as_state_dict(state_dict)
    if any("circulant_pos" in k for k in state_dict):
        raise CheckpointError(
            "g-mlp-pytorch checkpoint uses circulant_matrix=True, which builds a lower-triangular (causal) "
            "matrix scaled by position vectors, not a Toeplitz W; it cannot be converted faithfully"
        )
    out: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    vision = any(k.startswith("to_patch_embed.") for k in state_dict)
    for key, value in state_dict.items():
        m = re.fullmatch(r"layers\.(\d+)\.fn\.fn\.(?:fn\.)?sgu\.(weight|bias)", key)
        if m:
            if value.dim() < (3 if m.group(2) == "weight" else 2):
                raise CheckpointError(
                    f"{key} has shape {tuple(value.shape)}; g-mlp-pytorch stores it as "
                    f"{'(heads, n, n)' if m.group(2) == 'weight' else '(heads, n)'}"
                )
            out[f"blocks.{m.group(1)}.sgu.proj.{m.group(2)}"] = value[0] if value.shape[0] == 1 else value
            continue
        m = re.fullmatch(r"layers\.(\d+)\.fn\.(norm|fn\.(?:fn\.)?(.+))\.(weight|bias)", key)
        if m:
            i, inner, param = m.group(1), m.group(3), m.group(4)
            if inner is None:
                out[f"blocks.{i}.norm.{param}"] = value
            elif inner in _LUCID_BLOCK:
                out[f"blocks.{i}.{_LUCID_BLOCK[inner]}.{param}"] = value
            else:
                unknown.append(key)
            continue
        m = re.fullmatch(r"(to_patch_embed\.1|to_logits\.\d|to_embed)\.(weight|bias)", key)
        if not m:
            unknown.append(key)
            continue
        module, param = m.groups()
        if module == "to_patch_embed.1":
            if param == "weight":
                if value.dim() != 2:  # (a corrupt file: unpacking its shape failed with a bare ValueError)
                    raise CheckpointError(
                        f"to_patch_embed.1.weight has shape {tuple(value.shape)}; g-mlp-pytorch stores it as "
                        f"(dim, in_chans * patch * patch), a linear layer's weight"
                    )
                dim, flat = value.shape
                p = round((flat / in_chans) ** 0.5)
                if p < 1 or p * p * in_chans != flat:
                    raise CheckpointError(
                        f"to_patch_embed.1.weight {tuple(value.shape)} does not fit in_chans={in_chans} "
                        f"square patches; pass the source model's in_chans"
                    )
                value = value.reshape(dim, in_chans, p, p)
            out[f"stem.proj.{param}"] = value
        elif module == "to_embed":
            out["embed.weight"] = value
        elif module == "to_logits.0":
            out[f"norm.{param}"] = value
        else:  # to_logits.1 (language head) or to_logits.2 (vision head after the mean pool)
            out[f"{'head' if vision else 'lm_head'}.{param}"] = value
    if unknown:
        raise _unknown(unknown, "g-mlp-pytorch")
    return out


def to_gmlp(state_dict: Mapping[str, torch.Tensor] | nn.Module, in_chans: int = 3) -> dict[str, torch.Tensor]:
    """Convert any supported layout (a state dict or a module) to ours (ours passes through unchanged).

    A g-mlp-pytorch module is converted with the checks that need the module itself (see
    :func:`from_g_mlp_pytorch`); ``in_chans`` is used for g-mlp-pytorch vision checkpoints only (the others
    record it in the stem's weight), and checked for all.

    Raises:
        ValueError: ``in_chans`` not a positive int.
    """
    in_chans = check_int(in_chans, "in_chans")
    source, state_dict = state_dict, _as_state_dict(state_dict)
    fmt = detect_format(state_dict)
    if fmt == "timm":
        return from_timm(state_dict)
    if fmt == "g_mlp_pytorch":
        return from_g_mlp_pytorch(source if isinstance(source, nn.Module) else state_dict, in_chans=in_chans)
    return dict(state_dict)
