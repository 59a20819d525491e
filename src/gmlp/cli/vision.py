"""``gmlp train``, ``gmlp eval``, ``gmlp info``, ``gmlp export``, ``gmlp compare-vit``: vision sub-commands
(parsing only; the work lives in :mod:`gmlp.train` and :mod:`gmlp.export`)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import types
import typing
from typing import Any

__all__ = ["register"]


def _parse_kwargs(text: str) -> dict[str, Any]:
    """``'{"depth": 2}'`` (JSON) or ``depth=2,embed_dim=64`` (values parsed as JSON where possible)."""
    text = text.strip()
    if text.startswith("{"):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as err:
            raise argparse.ArgumentTypeError(f"not a JSON object: {err}") from err
        if not isinstance(value, dict):
            raise argparse.ArgumentTypeError("expected a JSON object")
        return value
    out: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, raw = part.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {part!r}")
        try:
            out[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            out[key.strip()] = raw
    return out


def _positive_int(text: str) -> int:
    """An argparse type: an int >= 1."""
    try:
        value = int(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {text!r}") from err
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


_METAVARS = {"betas": ("BETA1", "BETA2"), "crop_scale": ("MIN", "MAX")}
_HELP = {
    "strategy": "with several processes: ddp (replicate the model) or fsdp (shard it, FSDP2)",
    "grad_checkpointing": "recompute each block in backward: less activation memory, ~1/3 more compute",
    "compile": "torch.compile the model (inductor); the first steps pay the compile time",
    "precision": "auto (bf16 autocast on a CUDA GPU that has it, else fp32), fp32 or bf16",
    "device": "auto, cpu or cuda",
    "grad_accum_steps": "micro-steps per optimizer step (the global batch stays batch_size)",
    "augment": "training augmentation of the input pipeline: random shift and flip (in-memory data), or "
               "random resized crop, flip, colour jitter and --auto-augment (PIL); mixup, cutmix and random "
               "erasing are settings of their own",
    "hflip": "horizontal flip probability (with augment)",
    "crop_scale": "RandomResizedCrop area range (PIL pipeline, with augment)",
    "color_jitter": "colour jitter strength (PIL pipeline, with augment; timm turns it off with "
                    "--auto-augment, except 3a)",
    "workers": "DataLoader processes of the PIL pipeline (the in-memory pipeline has none)",
    "strict_images": "stop at a corrupt image instead of skipping it (PIL pipeline)",
    "warmup_lr": "learning rate the warmup starts from (with warmup_steps > 0; unset: lr x 1e-3)",
    "drop_path_schedule": "uniform or linear spread of drop_path_rate over the blocks (with "
                          "drop_path_rate > 0)",
    "mixup_prob": "probability of mixing a batch (with mixup or cutmix > 0)",
    "mixup_switch_prob": "probability of cutmix instead of mixup (with both mixup and cutmix > 0)",
    "mixup_mode": "batch, pair or elem (with mixup or cutmix > 0)",
    "remode": "random erasing fill: const, rand or pixel (with reprob > 0)",
    "recount": "random erasing regions per image (with reprob > 0)",
    "ema_decay": "weight average decay (with --ema)",
    "ema_warmup": "timm's EMA warmup of the decay (with --ema)",
    "progress": "progress output on stderr: a bar on a terminal, one line per --log-every steps in a log "
                "file or pipe (also off with TQDM_DISABLE=1; the epoch lines are printed either way)",
    "log_every": "steps between progress lines / TensorBoard train/loss points",
    "checkpoint_every": "also write a checkpoint every N steps (0: at epoch ends and the end only)",
    "keep_last": "checkpoints kept: older ones are deleted once a newer one is complete",
    "overwrite": "start a new run in an --output that holds one, removing the old run's checkpoints, metrics "
                 "and weights (without it, such an --output is refused unless --resume is given)",
}


def _add_config_arguments(parser: argparse.ArgumentParser, config_cls: type) -> None:
    """One ``--flag`` per field of a config dataclass. Flags default to "not given" (argparse.SUPPRESS) so
    that a recipe file's values apply unless a flag overrides them; the help shows the built-in default."""
    from ..train.recipe import setting_types

    types_ = setting_types(config_cls)
    for f in dataclasses.fields(config_cls):
        flag = "--" + f.name.replace("_", "-")
        tp = types_[f.name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        help_ = f"{_HELP[f.name]} (default: {default})" if f.name in _HELP else f"(default: {default})"
        args = typing.get_args(tp)
        optional = typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args
        if typing.get_origin(tp) in (typing.Union, types.UnionType):
            tp = next(a for a in args if a is not type(None))
            args = typing.get_args(tp)
        if tp is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                                help=help_)
        elif typing.get_origin(tp) is tuple:
            nargs = "+" if len(args) == 2 and args[1] is Ellipsis else len(args)
            metavar = _METAVARS.get(f.name, f.name.upper())
            parser.add_argument(flag, type=float, nargs=nargs, default=argparse.SUPPRESS, help=help_,
                                metavar=metavar)
        elif typing.get_origin(tp) is dict:
            parser.add_argument(flag, type=_parse_kwargs, default=argparse.SUPPRESS,
                                help=f"JSON object or KEY=VALUE,... {help_}")
        else:
            kind = tp if tp in (int, float) else str
            if optional:  # `none` unsets a recipe's value (e.g. --auto-augment none)
                kind, help_ = _or_none(kind), f"{help_}; none unsets it"
            parser.add_argument(flag, type=kind, default=argparse.SUPPRESS, help=help_)


def _or_none(kind: type) -> Any:
    """An argparse ``type`` that reads ``none`` / ``null`` (any case) as None, anything else as ``kind``."""

    def convert(text: str) -> Any:
        return None if text.strip().lower() in ("none", "null") else kind(text)

    convert.__name__ = kind.__name__  # argparse names the type in its "invalid int value" message
    return convert


def _train_config(args: argparse.Namespace) -> Any:
    from ..train.recipe import ConfigError, load_recipe, merge_settings
    from ..train.vision_config import VisionTrainConfig

    names = {f.name for f in dataclasses.fields(VisionTrainConfig)}
    flags = {k: v for k, v in vars(args).items() if k in names}
    file_settings = load_recipe(args.config, VisionTrainConfig) if args.config else {}
    config = merge_settings(VisionTrainConfig, file_settings, flags)
    if file_settings and flags:
        # a recipe's setting of a part that a command-line flag switches off (its warmup_lr with
        # --warmup-steps 0) is moot: back to its default, not refused as inert (a recipe's own
        # contradictions, and a flag's, still are)
        try:
            recipe_only = merge_settings(VisionTrainConfig, file_settings, {})
            recipe_inert = {n for n, _ in recipe_only.inert_settings()}
        except (ConfigError, TypeError, ValueError):
            recipe_inert = set()
        moot = {n for n, _ in config.inert_settings()
                if n in file_settings and n not in flags and n not in recipe_inert}
        if moot:
            defaults = {f.name: f.default for f in dataclasses.fields(VisionTrainConfig)}
            config = dataclasses.replace(config, **{n: defaults[n] for n in moot})
    return config


def _train(args: argparse.Namespace) -> int:
    from ..train.recipe import ConfigError
    from ..train.vision import train_vision

    config = _train_config(args)
    if args.resume and config.overwrite:  # train_vision would resume and silently ignore overwrite
        raise ConfigError(
            "--resume continues the run in --output, --overwrite removes it: give one of them (a recipe's "
            "overwrite: true is undone by --no-overwrite)"
        )
    config.validate()  # --print-config too: printed settings are settings the run accepts
    if args.print_config:
        import yaml

        print(yaml.safe_dump(json.loads(json.dumps(dataclasses.asdict(config))), sort_keys=False), end="")
        return 0
    from .text import _write_errors

    with _write_errors(config.output, resumable=True):  # a full disk, a read-only folder: one line
        result = train_vision(config, resume=args.resume)
    if int(os.environ.get("RANK", "0")) == 0:
        accuracy = result.get("test_accuracy")
        scored = "not evaluated (stopped mid-epoch)" if accuracy is None else f"test accuracy {accuracy:.4f}"
        print(f"done: {result.get('step')} steps, {scored}, outputs in {config.output}")
    return 0


def _given(args: argparse.Namespace, *names: str) -> list[str]:
    """``--flag VALUE`` of each of ``names`` (attributes of ``args``) that was given (is not None / False)."""
    out = []
    for name in names:
        value = getattr(args, name)
        if value is not None and value is not False:
            flag = "--" + name.replace("_", "-")
            shown = json.dumps(value) if isinstance(value, dict) else value
            out.append(flag if value is True else f"{flag} {shown}")
    return out


def _info(args: argparse.Namespace) -> int:
    from ..models import list_models
    from ..train.recipe import ConfigError

    measure = ("batch_size", "device")
    if args.model is None:
        given = _given(args, "img_size", "in_chans", "num_classes", "model_kwargs", "throughput", *measure)
        if given:  # the list of models takes none of them
            raise ConfigError(f"{', '.join(given)}: a setting of one model, and no model was named (gmlp "
                              f"info alone lists the models); name one: gmlp info MODEL ...")
        print("\n".join(list_models()))
        return 0
    if args.batch_size is not None and args.batch_size < 1:  # a bad value first (as model_info words it)
        raise ConfigError(f"--batch-size (of the throughput measurement) must be >= 1, got {args.batch_size}")
    given = _given(args, *measure)
    if given and not args.throughput:  # the size and GMACs do not depend on them
        raise ConfigError(f"{', '.join(given)}: a setting of the throughput measurement, which runs only "
                          f"with --throughput; add --throughput or leave it out")
    from ..train.vision_tools import model_info

    info = model_info(
        args.model, img_size=args.img_size, in_chans=args.in_chans, num_classes=args.num_classes,
        throughput=args.throughput, batch_size=32 if args.batch_size is None else args.batch_size,
        device=args.device or "auto", model_kwargs=args.model_kwargs,
    )
    print(info["summary"])
    return 0


def _check_tensor_eval(args: argparse.Namespace) -> None:
    """Refuse a ``--split`` or ``--data-root`` that the in-memory datasets cannot take (Fashion-MNIST has
    the splits train and test; digits is scikit-learn's bundled copy): the loader raised a bare ValueError
    (a traceback) for them."""
    if args.split is None and args.data_root is None:
        return
    from ..train.recipe import ConfigError
    from ..train.vision_config import TENSOR_DATASETS
    from ..train.vision_tools import resolve_checkpoint

    dataset = args.dataset
    if dataset is None:  # the run's (evaluate_checkpoint reads it the same way)
        _, run = resolve_checkpoint(args.checkpoint, ema=args.ema)
        dataset = (run or {}).get("dataset") or "fashion_mnist"
    if dataset not in TENSOR_DATASETS:
        return
    if args.split is not None and args.split not in ("train", "test"):
        raise ConfigError(f"--split {args.split!r}: dataset {dataset!r} has the splits 'train' and 'test'")
    if dataset == "digits" and args.data_root is not None:
        raise ConfigError(f"--data-root {args.data_root!r}: dataset 'digits' is scikit-learn's bundled copy "
                          f"and takes no data root; leave --data-root out")


def _eval(args: argparse.Namespace) -> int:
    from ..train.vision_tools import evaluate_checkpoint

    _check_tensor_eval(args)
    result = evaluate_checkpoint(
        args.checkpoint, model=args.model, dataset=args.dataset, data_root=args.data_root, split=args.split,
        img_size=args.img_size, batch_size=args.batch_size, workers=args.workers, device=args.device,
        subset=args.subset, strict_images=args.strict_images, model_kwargs=args.model_kwargs,
        ema=args.ema, precision=args.precision,
    )
    line = (f"{result['model']} on {result['dataset']} [{result['split']}]: top-1 {result['top1']:.4f}  "
            f"top-5 {result['top5']:.4f}  loss {result['loss']:.4f}  ({result['count']} images, "
            f"{result['precision']}")
    if result.get("skipped_images"):
        line += f", {result['skipped_images']} corrupt skipped"
    print(line + ")")
    if args.json:
        from ..train.checkpoint import write_json_atomic

        write_json_atomic(args.json, result)
    return 0


def _export(args: argparse.Namespace) -> int:
    import importlib.util

    from ..export import export_checkpoint
    from ..train.recipe import ConfigError

    # export_checkpoint skips the check without a word when onnxruntime is missing: an explicit --verify
    # is refused before anything is written, the default says that the file was not checked
    verify = args.verify is not False
    unchecked = verify and importlib.util.find_spec("onnxruntime") is None
    if unchecked and args.verify:
        raise ConfigError('--verify runs the exported file in onnxruntime, which is not installed: pip '
                          'install "gmlp[export]" (or give --no-verify)')
    out = export_checkpoint(args.checkpoint, args.output, model=args.model, img_size=args.img_size,
                            in_chans=args.in_chans, num_classes=args.num_classes, opset=args.opset,
                            verify=verify, model_kwargs=args.model_kwargs)
    note = ' (not verified: onnxruntime is not installed; pip install "gmlp[export]")' if unchecked else ""
    print(f"wrote {out}{note}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from ..train.compare import run_comparison

    table = run_comparison(
        args.output, config=args.config, dataset=args.dataset, epochs=args.epochs, gmlp_model=args.model,
        vit_depth=args.vit_depth, vit_heads=args.vit_heads, train_subset=args.train_subset,
        test_subset=args.test_subset, threads=args.threads, progress=args.progress,
        batch_size=args.batch_size, seed=args.seed,
    )
    print(table)
    return 0


def _recipe_names() -> str:
    """The packaged recipes' names, for ``--config``'s help (``fashion_mnist, imagenet_gmlp_b, ...``)."""
    from ..train.recipe import packaged_recipes

    return ", ".join(packaged_recipes())


def _checkpoint_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="model.safetensors, a training run or checkpoint directory, or a timm "
                                      "checkpoint (.pth/.bin/.safetensors, converted on the fly)")
    p.add_argument("--model", help="model name (default: the run's config.json)")
    p.add_argument("--img-size", type=_positive_int, help="input size (default: the run's, else the model's)")
    p.add_argument("--model-kwargs", type=_parse_kwargs, default=None,
                   help="extra model constructor arguments (JSON or KEY=VALUE,...)")


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``train``, ``eval``, ``info``, ``export`` and ``compare-vit``."""
    from ..train.vision_config import VisionTrainConfig  # torch-free (gmlp --help loads no torch)

    train = sub.add_parser(
        "train", help="train a vision gMLP (default: Fashion-MNIST, offline)",
        description="Train an image classifier. Defaults reach >= 89% Fashion-MNIST test accuracy on 2 CPU "
                    "cores. Settings come from the flags, else the --config recipe file, else the defaults. "
                    "Multi-process: torchrun --nproc_per_node=N -m gmlp train ... (--batch-size is global).",
    )
    train.add_argument("--config", metavar="RECIPE",
                       help=f"YAML recipe: a file, or the name of a packaged one ({_recipe_names()})")
    _add_config_arguments(train, VisionTrainConfig)
    train.add_argument("--resume", action="store_true",
                       help="continue the run in --output from its last checkpoint")
    train.add_argument("--print-config", action="store_true",
                       help="print the resolved settings and exit (each checked, but not against the data)")
    train.set_defaults(func=_train)

    ev = sub.add_parser("eval", help="top-1/top-5 accuracy of a checkpoint on a dataset (timm preprocessing)")
    _checkpoint_args(ev)
    ev.add_argument("--dataset", help="fashion_mnist, digits, imagefolder or hf (default: the run's)")
    ev.add_argument("--data-root", help="dataset directory, or a hub name / path for hf")
    ev.add_argument("--split", help="split to evaluate (default: test / val / validation)")
    ev.add_argument("--batch-size", type=int, default=256)
    ev.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                    help="DataLoader worker processes")
    ev.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    # (--test-subset: gmlp train's name for it, which eval refused as an unrecognized argument)
    ev.add_argument("--subset", "--test-subset", dest="subset", type=int,
                    help="evaluate N images only: the first N of an in-memory dataset, N at even steps "
                         "through a folder or HF dataset (as gmlp train's --test-subset)")
    ev.add_argument("--strict-images", action="store_true",
                    help="fail on a corrupt image instead of skipping it")
    ev.add_argument("--ema", action="store_true", help="evaluate the run's model_ema.safetensors")
    ev.add_argument("--precision", choices=("auto", "fp32", "bf16"),
                    help="auto (bf16 autocast on a CUDA GPU that has it, else fp32), fp32 or bf16 "
                         "(default: the run's --precision, else auto)")
    ev.add_argument("--json", help="also write the result to this JSON file")
    ev.set_defaults(func=_eval)

    info = sub.add_parser("info", help="list models, or show one model's size, GMACs and speed")
    info.add_argument("model", nargs="?", help="model name (omit to list all; timm:NAME for a timm model)")
    info.add_argument("--img-size", type=int)
    info.add_argument("--in-chans", type=int)
    info.add_argument("--num-classes", type=int)
    info.add_argument("--model-kwargs", type=_parse_kwargs, default=None)
    info.add_argument("--throughput", action="store_true", help="also measure inference images/second")
    # None = not given: both belong to --throughput and are refused without it (they would change nothing)
    info.add_argument("--batch-size", type=int, default=None,
                      help="batch of the throughput measurement (with --throughput; default: 32)")
    info.add_argument("--device", default=None, choices=("auto", "cpu", "cuda"),
                      help="device of the throughput measurement (with --throughput; default: auto)")
    info.set_defaults(func=_info)

    ex = sub.add_parser("export", help="export a checkpoint to ONNX (dynamic batch axis)")
    _checkpoint_args(ex)
    ex.add_argument("--output", "-o", default="model.onnx", help="ONNX file to write")
    # export_checkpoint reads 0 as "not given" (the checkpoint's value): refuse it here instead
    ex.add_argument("--in-chans", type=_positive_int, help="input channels (default: the checkpoint's)")
    ex.add_argument("--num-classes", type=_positive_int, help="classes (default: the checkpoint's head)")
    ex.add_argument("--opset", type=_positive_int, default=None, help="ONNX opset (default: the exporter's)")
    ex.add_argument("--verify", action=argparse.BooleanOptionalAction, default=None,
                    help="compare onnxruntime's outputs with PyTorch's (default: if onnxruntime is "
                         "installed; --verify without it is an error)")
    ex.set_defaults(func=_export)

    cmp_ = sub.add_parser(
        "compare-vit", help="train gMLP and a parameter-matched DeiT-style ViT (one recipe); write a table",
        description="Paper-style comparison on small images: the same recipe and epoch budget for a gMLP "
                    "and a timm ViT sized to the same parameter count; writes results.md, metrics and "
                    "spatial plots.",
    )
    cmp_.add_argument("--output", "-o", default="runs/compare_vit")
    cmp_.add_argument("--config", metavar="RECIPE",
                      help=f"recipe for both runs: a YAML file, or the name of a packaged one "
                           f"({_recipe_names()}; default: the gmlp train defaults)")
    cmp_.add_argument("--dataset", default=None, help="override the recipe's dataset (e.g. digits)")
    cmp_.add_argument("--model", default=None, help="gMLP model (default: the recipe's)")
    cmp_.add_argument("--epochs", type=int, default=None)
    cmp_.add_argument("--batch-size", type=int, default=None)
    cmp_.add_argument("--vit-depth", type=_positive_int, default=None, help="ViT depth (default: the gMLP's)")
    cmp_.add_argument("--vit-heads", type=_positive_int, default=4, help="ViT attention heads (default: 4)")
    cmp_.add_argument("--train-subset", type=int, default=None)
    cmp_.add_argument("--test-subset", type=int, default=None)
    cmp_.add_argument("--threads", type=int, default=None)
    cmp_.add_argument("--seed", type=int, default=None,
                      help="seed of both runs (init, data order, augmentation; default: the recipe's)")
    cmp_.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                      help="progress bars (default: the recipe's, else on)")
    cmp_.set_defaults(func=_compare)
