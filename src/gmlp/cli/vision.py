"""``gmlp train`` and ``gmlp info``: vision sub-commands (parsing only)."""

from __future__ import annotations

import argparse
import dataclasses

__all__ = ["register"]


def _add_config_arguments(parser: argparse.ArgumentParser, config_cls: type) -> None:
    """One ``--flag`` per field of a config dataclass, typed and defaulted from it."""
    for field in dataclasses.fields(config_cls):
        flag = "--" + field.name.replace("_", "-")
        default = field.default
        if field.type in ("bool", bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
        elif field.name == "betas":
            parser.add_argument(flag, type=float, nargs=2, default=default, metavar=("BETA1", "BETA2"))
        else:
            kind = {"int": int, "float": float}.get(str(field.type).split(" ")[0], str)
            parser.add_argument(flag, type=kind, default=default, help=f"(default: {default})")


def _train(args: argparse.Namespace) -> int:
    from ..train.vision import VisionTrainConfig, train_vision

    names = {f.name for f in dataclasses.fields(VisionTrainConfig)}
    config = VisionTrainConfig(**{k: v for k, v in vars(args).items() if k in names})
    if isinstance(config.betas, list):
        config.betas = tuple(config.betas)
    result = train_vision(config, resume=args.resume)
    print(f"done: {result.get('step')} steps, test accuracy {result.get('test_accuracy', float('nan')):.4f}, "
          f"outputs in {config.output}")
    return 0


def _info(args: argparse.Namespace) -> int:
    from ..models import create_model, list_models

    if args.model is None:
        print("\n".join(list_models()))
        return 0
    model = create_model(args.model)
    params = sum(p.numel() for p in model.parameters())
    cfg = model.pretrained_cfg
    print(f"{args.model}: {params:,} parameters, input {cfg['input_size']}, {len(model.blocks)} blocks, "
          f"width {model.embed_dim}, tokens {model.stem.num_patches}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``train`` and ``info``."""
    from ..train.vision import VisionTrainConfig

    train = sub.add_parser(
        "train", help="train a vision gMLP (default: Fashion-MNIST, offline)",
        description="Train an image classifier. Defaults reach >= 89%% Fashion-MNIST test accuracy on 2 CPU cores.",
    )
    _add_config_arguments(train, VisionTrainConfig)
    train.add_argument("--resume", action="store_true", help="continue the run in --output from its last checkpoint")
    train.set_defaults(func=_train)

    info = sub.add_parser("info", help="list models, or show one model's size")
    info.add_argument("model", nargs="?", help="model name (omit to list all)")
    info.set_defaults(func=_info)
