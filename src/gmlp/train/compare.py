"""gMLP vs a DeiT-style ViT at equal parameter count, same recipe and epoch budget (``gmlp compare-vit``).

The small-image analogue of the paper's Table 1 comparison (gMLP vs DeiT): both models are trained by
:func:`gmlp.train.vision.train_vision` with one recipe (the ``gmlp train`` defaults unless a recipe file is
given); the ViT is timm's ``VisionTransformer`` (class token, pre-norm blocks, MLP ratio 4, the gMLP's
patch size and depth) with its width chosen so that its parameter count is closest to the gMLP's. Writes
``OUTPUT/results.md`` (a markdown table: parameters, final and best test accuracy, seconds per epoch),
``OUTPUT/{gmlp,vit}/`` (the two runs, with metrics.png) and ``OUTPUT/spatial_weights.png`` (the gMLP's
learned spatial filters). An interrupted comparison resumes each run from its last checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import platform
from pathlib import Path
from typing import Any

import torch

from ..utils.io import read_jsonl_records
from ..utils.state import restoring_process_state
from .checkpoint import latest_checkpoint, load_checkpoint
from .recipe import ConfigError, load_recipe
from .vision import _RESUME_FREE, VisionTrainConfig, build_model, load_data, train_vision

__all__ = ["run_comparison", "size_vit"]

VIT_NAME = "timm:vit_tiny_patch16_224"


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def size_vit(
    target_params: int,
    *,
    img_size: tuple[int, int],
    patch_size: int,
    in_chans: int,
    num_classes: int,
    depth: int,
    heads: int = 4,
    mlp_ratio: float = 4.0,
) -> tuple[dict[str, Any], int]:
    """ViT constructor arguments whose parameter count is closest to ``target_params``; returns
    ``(model_kwargs, params)``.

    The width is the multiple of ``heads`` closest to the target at MLP ratio ``mlp_ratio``; the MLP hidden
    size is then adjusted (by at most a few units: the ratio stays about ``mlp_ratio``) to close the gap.
    """
    base = {"patch_size": patch_size, "depth": depth, "num_heads": heads, "global_pool": "token"}

    def params(width: int, ratio: float) -> int:
        kwargs = {"num_classes": num_classes, "img_size": img_size, "in_chans": in_chans, "embed_dim": width,
                  "mlp_ratio": ratio, **base}  # fmt: skip
        try:
            with torch.device("meta"):  # no memory, no init work: only the count
                model = build_model(VIT_NAME, **kwargs)
        except RuntimeError:  # timm < 1.0.21 calls .item() in the ViT constructor: a meta tensor refuses
            model = build_model(VIT_NAME, **kwargs)
        return _count(model)

    lo, hi = 1, 1  # parameters grow monotonically with width: bracket, bisect, then take the nearer end
    while params(hi * heads, mlp_ratio) < target_params:
        hi *= 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if params(mid * heads, mlp_ratio) < target_params else (lo, mid)
    width = heads * min((lo, hi), key=lambda k: abs(params(k * heads, mlp_ratio) - target_params))
    hidden = int(width * mlp_ratio)
    per_unit = params(width, (hidden + 1.5) / width) - params(width, (hidden + 0.5) / width)
    hidden += round((target_params - params(width, (hidden + 0.5) / width)) / per_unit)
    ratio = (hidden + 0.5) / width  # timm takes int(width * mlp_ratio) hidden units
    return {**base, "embed_dim": width, "mlp_ratio": ratio}, params(width, ratio)


def _patch_size(model: torch.nn.Module) -> int:
    patch = getattr(model, "patch_size", 16)
    return int(patch[0] if isinstance(patch, (tuple, list)) else patch)


def _records(run: Path) -> list[dict[str, Any]]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    return [record for _, record in read_jsonl_records(path, stacklevel=3)]


def _train(config: VisionTrainConfig) -> None:
    """Train one side of the comparison: resume the run in ``config.output`` if it was started with the same
    settings (those that change what it computes: a rerun with another ``--threads`` or ``--no-progress``
    still resumes), else start it afresh, replacing the run that is there (another comparison's)."""
    out = Path(config.output)
    resume = latest_checkpoint(out) is not None
    if resume:
        saved = load_checkpoint(out).state.get("config") or {}
        # the saved settings went through JSON (tuples came back as lists): compare them that way
        now = json.loads(json.dumps(dataclasses.asdict(config)))
        changed = sorted(k for k in saved if k in now and k not in _RESUME_FREE and saved[k] != now[k])
        resume = not changed
        if changed:  # another comparison's run: afresh
            print(f"note: {out} holds a run with other settings ("
                  + ", ".join(f"{k}: {saved[k]!r} -> {now[k]!r}" for k in changed)
                  + "); starting it afresh", flush=True)
    # without resume: replace whatever is there (another comparison's run, or one stopped before a checkpoint)
    train_vision(dataclasses.replace(config, overwrite=not resume), resume=resume)


@restoring_process_state()  # the runs seed the global generators and may set the thread count
def run_comparison(
    output: str | Path,
    *,
    config: str | Path | None = None,
    dataset: str | None = None,
    epochs: int | None = None,
    gmlp_model: str | None = None,
    vit_depth: int | None = None,
    vit_heads: int = 4,
    train_subset: int | None = None,
    test_subset: int | None = None,
    threads: int | None = None,
    progress: bool | None = None,
    batch_size: int | None = None,
    seed: int | None = None,
) -> str:
    """Train the gMLP and the parameter-matched ViT; write ``results.md`` and plots; return the table.

    The settings come from ``config`` (a recipe), with the arguments given (not None) over it; ``progress``
    None keeps the recipe's (else on). The caller's random generators (torch, NumPy, ``random``) and thread
    count are as they were when this returns (:func:`gmlp.utils.state.restoring_process_state`)."""
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    settings = load_recipe(config, VisionTrainConfig) if config else {}
    overrides = {"dataset": dataset, "epochs": epochs, "model": gmlp_model, "train_subset": train_subset,
                 "test_subset": test_subset, "threads": threads, "batch_size": batch_size, "seed": seed,
                 "progress": progress}
    settings.update({k: v for k, v in overrides.items() if v is not None})
    base = VisionTrainConfig(**settings)
    gmlp_cfg = dataclasses.replace(base, output=str(out / "gmlp"))
    gmlp_cfg.validate()
    if gmlp_cfg.drop_path_schedule != "uniform":  # else the ViT would fail to build after the gMLP trained
        raise ConfigError(
            f"drop_path_schedule {gmlp_cfg.drop_path_schedule!r} is a gMLP setting that timm's ViT does not "
            f"take (its drop-path rate always grows linearly with depth); compare-vit runs both models with "
            f"one recipe: leave drop_path_schedule at 'uniform'"
        )

    data = load_data(gmlp_cfg)
    torch.manual_seed(0)
    size = data.size if data.size is not None else gmlp_cfg.img_size
    gmlp_net = build_model(gmlp_cfg.model, **{**gmlp_cfg.model_kwargs, "num_classes": len(data.classes),
                                              "img_size": size, "in_chans": data.chans})
    from .vision import model_input_size, norm_stats

    chans, h, w = model_input_size(gmlp_net)
    mean, std = norm_stats(gmlp_net, chans, base.mean, base.std)
    depth = vit_depth or len(getattr(gmlp_net, "blocks", [])) or 6
    vit_kwargs, vit_params = size_vit(
        _count(gmlp_net), img_size=(h, w), patch_size=_patch_size(gmlp_net), in_chans=chans,
        num_classes=len(data.classes), depth=depth, heads=vit_heads,
    )
    # the same normalisation for both (the gMLP's), and the ViT built at the gMLP's input size
    gmlp_cfg = dataclasses.replace(gmlp_cfg, mean=mean, std=std)
    vit_cfg = dataclasses.replace(gmlp_cfg, model=VIT_NAME, model_kwargs=vit_kwargs, output=str(out / "vit"),
                                  img_size=None if data.size is not None else h)
    for cfg in (gmlp_cfg, vit_cfg):
        print(f"== training {cfg.model} -> {cfg.output}", flush=True)
        _train(cfg)

    rows = []
    for label, cfg in (("gMLP", gmlp_cfg), ("ViT (DeiT-style)", vit_cfg)):
        records = _records(Path(cfg.output))
        if not records:
            raise RuntimeError(f"{cfg.output} has no metrics: did the run fail?")
        state = load_checkpoint(cfg.output)
        params = sum(v.numel() for v in state.model.values())
        accs = [r["test_accuracy"] for r in records]
        secs = [r["epoch_seconds"] for r in records]
        v = vit_kwargs
        arch = cfg.model if cfg.model != VIT_NAME else (
            f"timm vit, dim {v['embed_dim']}, depth {v['depth']}, heads {v['num_heads']}, "
            f"mlp {int(v['embed_dim'] * v['mlp_ratio'])}, patch {v['patch_size']}")
        rows.append(f"| {label} | {arch} | {params:,} | {accs[-1]:.4f} | {max(accs):.4f} | "
                    f"{records[-1]['test_loss']:.4f} | {sum(secs) / len(secs):.1f} | {sum(secs):.0f} |")

    spatial = None
    try:
        from ..viz import plot_spatial

        spatial = plot_spatial(Path(gmlp_cfg.output) / "model.safetensors", out / "spatial_weights.png")
    except (ImportError, ValueError) as err:  # matplotlib missing, or a model without spatial weights
        print(f"note: no spatial plot ({err})")
    header = ("| model | architecture | params | test acc (final) | test acc (best) | test loss | s / epoch "
              "| total s |\n|---|---|---|---|---|---|---|---|")
    table = header + "\n" + "\n".join(rows)
    recipe = {k: v for k, v in dataclasses.asdict(gmlp_cfg).items()
              if k not in ("output", "progress", "model", "model_kwargs")}
    text = (
        f"# gMLP vs ViT on {gmlp_cfg.dataset} (same recipe, {gmlp_cfg.epochs} epoch(s), seed {gmlp_cfg.seed})"
        f"\n\n{table}\n\n"
        f"ViT parameters matched to the gMLP's ({vit_params:,} vs {_count(gmlp_net):,}). "
        f"Machine: {platform.machine()}, {gmlp_cfg.threads or torch.get_num_threads()} threads, "
        f"torch {torch.__version__}.\n\n"
        + (f"![spatial weights]({spatial.name})  " if spatial else "")
        + "Curves: gmlp/metrics.png, vit/metrics.png.\n\n"
        f"Recipe:\n\n```json\n{json.dumps(recipe, indent=1, sort_keys=True)}\n```\n"
    )
    (out / "results.md").write_text(text)
    return table
