"""``gmlp tokenizer``, ``gmlp pretrain`` and ``gmlp finetune``: text sub-commands (parsing only).

Every option has an offline default: ``gmlp pretrain`` trains a small gMLP on the offline corpus,
``gmlp finetune`` a classifier on the offline tweet-sentiment set. The work lives in
:mod:`gmlp.train.text` and :mod:`gmlp.train.tokenizer`.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import functools
import json
from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["register"]

_B = argparse.BooleanOptionalAction


def _add_model_arguments(p: argparse.ArgumentParser, *, dropout: float) -> None:
    g = p.add_argument_group("model (when built from scratch)")
    g.add_argument(
        "--arch",
        choices=("gmlp", "amlp", "bert", "bert-relpos"),
        default="gmlp",
        help="gMLP, aMLP (gMLP + tiny attention), the BERT baseline, or BERT + relative position bias "
        "(Table 3; transformers' MPNet: BERT's encoder and MLM head with a learned bucketed relative "
        "attention bias, no token types) (default: gmlp)",
    )
    g.add_argument(
        "--preset",
        default=None,
        help="a paper size for gmlp/amlp: gmlp-base, amlp-base, gmlp-large, amlp-large, gmlp-xlarge, "
        "gmlp-ablation (sets --layers/--hidden/--ffn and the tiny attention; --sgu-variant, --no-toeplitz "
        "and --tiny-attn with --arch amlp still apply)",
    )
    g.add_argument("--layers", type=int, default=None, help="number of blocks (default: 4, or the preset's)")
    g.add_argument("--hidden", type=int, default=None, help="d_model (default: 128, or the preset's)")
    g.add_argument(
        "--ffn", type=int, default=None,
        help="d_ffn (default: 768 = 6 x d_model as in the paper, or the preset's)",
    )
    g.add_argument(
        "--seq-len",
        type=int,
        default=None,
        help="tokens per sequence = max_position_embeddings of a new model (default: 128; with --model / "
        "--init-from the loaded model's own length, and at most that)",
    )
    g.add_argument(
        "--tiny-attn",
        type=int,
        default=None,
        help="aMLP tiny-attention size (default: 64 for d_model >= 256, else d_model/4)",
    )
    g.add_argument(
        "--sgu-variant",
        default="sgu",
        choices=("sgu", "multiplicative", "additive", "linear", "none", "mixer"),
        help="gating function s(Z) (paper Table 3; mixer = MLP-Mixer's 2-layer token MLP, no gating, "
        "which ignores --toeplitz; default: sgu)",
    )
    g.add_argument(
        "--token-mlp-dim",
        type=int,
        default=None,
        help="hidden size of the --sgu-variant mixer token MLP (default: the sequence length)",
    )
    g.add_argument(
        "--toeplitz", action=_B, default=True,
        help="Toeplitz W (gmlp/amlp; --sgu-variant none has no W and mixer's token MLP is always full: both "
        "ignore it; default: on, as the paper's NLP runs)",
    )
    g.add_argument(
        "--heads", type=int, default=None, help="bert / bert-relpos attention heads (default: d_model / 64)"
    )
    g.add_argument("--dropout", type=float, default=dropout, help=f"hidden dropout (default: {dropout})")
    g.add_argument(
        "--model-vocab-size",
        type=int,
        default=None,
        help="the model's vocab_size (default: the tokenizer's size; must not be smaller)",
    )


def _add_train_arguments(
    p: argparse.ArgumentParser, *, output: str, batch: int, lr: float, warmup: float, save_every: int
) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--output", "-o", default=output, help=f"run folder (default: {output})")
    g.add_argument(
        "--batch-size", type=int, default=batch, help=f"per-process micro-batch (default: {batch})"
    )
    g.add_argument(
        "--grad-accum", type=int, default=1, help="gradient-accumulation micro-batches (default: 1)"
    )
    g.add_argument("--lr", type=float, default=lr, help=f"peak learning rate (default: {lr})")
    g.add_argument(
        "--warmup",
        type=float,
        default=warmup,
        help=f"linear warmup: a fraction of the steps if < 1, else a step count (default: {warmup})",
    )
    g.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay (default: 0.01)")
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.999)
    g.add_argument("--adam-eps", type=float, default=1e-6)
    g.add_argument("--clip-grad", type=float, default=1.0, help="gradient-norm clip, 0 = off (default: 1.0)")
    g.add_argument("--seed", type=int, default=0, help="seed of the init, data order, masks and dropout")
    g.add_argument(
        "--precision",
        choices=("auto", "bf16", "fp32"),
        default="auto",
        help="auto = bf16 autocast on a CUDA GPU that supports it, else fp32; bf16 forces it (CPU too)",
    )
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    g.add_argument(
        "--log-every", type=int, default=20, help="training-loss records every N steps (default: 20)"
    )
    g.add_argument(
        "--save-every",
        type=int,
        default=save_every,
        help=f"checkpoint every N steps, 0 = only at the end (default: {save_every})",
    )
    g.add_argument("--keep-last", type=int, default=2, help="checkpoints kept (default: 2)")
    fresh = g.add_mutually_exclusive_group()  # a resumed run would silently ignore --overwrite
    fresh.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --output from its last checkpoint, with its own model and tokenizer: the "
        "model and tokenizer flags (--init-from too; not --seq-len, nor --dropout with finetune --model) "
        "must be left out or repeat the run's values",
    )
    fresh.add_argument("--overwrite", action="store_true", help="discard a previous run in --output")
    g.add_argument(
        "--stop-after-steps",
        type=int,
        default=None,
        help="stop (with a checkpoint) after N steps of this invocation, for time-limited jobs",
    )
    g.add_argument("--progress", action=_B, default=True, help="progress bar (default: on)")
    g.add_argument(
        "--tensorboard",
        action=_B,
        default=None,
        help="the metrics.jsonl records also as TensorBoard scalars in OUTPUT/tensorboard (default: when the "
        "tensorboard package is installed; --tensorboard requires it)",
    )
    g.add_argument(
        "--grad-checkpointing",
        action="store_true",
        help="recompute each block's activations in backward: less memory, ~30%% more compute",
    )
    g.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the model (inductor; the first steps pay the compile time)",
    )
    t = p.add_argument_group("tokenizer")
    t.add_argument(
        "--tokenizer",
        default=None,
        help="a saved tokenizer folder (default: train one into OUTPUT/tokenizer)",
    )
    t.add_argument("--tokenizer-kind", choices=("wordpiece", "unigram"), default="wordpiece")
    t.add_argument("--vocab-size", type=int, default=8192, help="size of a trained tokenizer (default: 8192)")


#: The errors of a file system that cannot take a write: no permission, read-only, full, over quota.
_WRITE_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


#: Of those, the ones a read raises too: only a write error when the file is in the command's output.
_ACCESS_ERRNOS = {errno.EACCES, errno.EPERM}


@contextlib.contextmanager
def _write_errors(output: str | None, resumable: bool) -> Iterator[None]:
    """A file under ``output`` that cannot be written (a read-only folder, a full disk, no permission) as
    the one-line error ``gmlp COMMAND: error: ...`` (exit status 2) instead of a traceback. What was written
    before stays: checkpoints, ``final/`` and tokenizers are replaced atomically, so the last complete one
    is intact. A permission error on a file elsewhere (an input that cannot be read) keeps its traceback."""
    from pathlib import Path

    from ..train.recipe import ConfigError

    try:
        yield
    except OSError as err:
        if err.errno not in _WRITE_ERRNOS:
            raise
        if err.errno in _ACCESS_ERRNOS:
            inside = output is not None and err.filename is not None and Path(str(err.filename)).resolve(
            ).is_relative_to(Path(output).resolve())
            if not inside:
                raise
        where = f": {str(err.filename)!r}" if err.filename else ""
        then = "run again (--resume continues a run)" if resumable else "run again"
        raise ConfigError(
            f"{err.strerror or err}{where}; what was saved before is intact (written files are replaced "
            f"atomically): free space or fix the permissions, then {then}"
        ) from err


def _guarded(resumable: bool) -> Callable[[Callable[[argparse.Namespace], int]], Callable[..., int]]:
    """A command whose write errors under its ``--output`` are one-line errors (:func:`_write_errors`)."""

    def wrap(command: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        @functools.wraps(command)
        def run(args: argparse.Namespace) -> int:
            with _write_errors(getattr(args, "output", None), resumable):
                return command(args)

        return run

    return wrap


#: The namespace attribute that holds the built-in defaults of a text command's flags (the flags themselves
#: default to "not given", so that a ``--config`` recipe's values apply unless a flag overrides them).
_DEFAULTS = "_flag_defaults"

#: Fields of the text configs that a recipe may not set, with the reason.
_NOT_IN_RECIPES = {
    "resume": "--resume continues the run in --output, a decision of each command line (give it as a flag)",
    "recipe": "it records the --config file the options came from",
}

#: A flag given on the command line makes these recipe settings moot (they name the same thing another way):
#: they go back to their defaults instead of being refused as a contradiction that the user did not write.
_MOOT = {
    "data": ("train_file", "validation_file", "test_file"),
    "train_file": ("data",),
    "token_cache": ("cache_tokens",),
    "cache_tokens": ("token_cache",),
}


def _suppress_defaults(parser: argparse.ArgumentParser) -> None:
    """Make every option of a text command (but ``--help`` and ``--config``) default to "not given", keeping
    the built-in defaults in the namespace's :data:`_DEFAULTS` (put back by :func:`_text_config`)."""
    defaults = {}
    for action in parser._actions:
        if action.option_strings and action.dest not in ("help", "config") and action.default is not (
            argparse.SUPPRESS
        ):
            defaults[action.dest] = action.default
            action.default = argparse.SUPPRESS
    parser.set_defaults(**{_DEFAULTS: defaults})


def _recipe_names() -> str:
    """The packaged text recipes' names, for ``--config``'s help."""
    from ..train.recipe import TEXT_RECIPE_DIR, packaged_recipes

    return ", ".join(packaged_recipes(TEXT_RECIPE_DIR)) or "none"


def _text_config(
    cls: type, args: argparse.Namespace, command: str
) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """The config of ``gmlp pretrain`` / ``finetune``: a flag given on the command line, else the ``--config``
    recipe's value, else the built-in default; ``(config, the recipe's settings, the flags given)``. The
    namespace gets every option back (the resolved value of each setting, the default of any other flag)."""
    from dataclasses import fields

    from ..train.recipe import TEXT_RECIPE_DIR, load_recipe, resolve_recipe
    from ..train.text import FinetuneConfig, PretrainConfig
    from ..train.vision_config import VisionTrainConfig

    names = {f.name for f in fields(cls)}
    defaults = getattr(args, _DEFAULTS, {})
    flags = {k: v for k, v in vars(args).items() if k in names}
    file_settings: dict[str, Any] = {}
    recipe = None
    if getattr(args, "config", None):
        path = resolve_recipe(args.config, TEXT_RECIPE_DIR)
        commands = {"gmlp pretrain": PretrainConfig, "gmlp finetune": FinetuneConfig, "gmlp train":
                    VisionTrainConfig}
        others = {name: other for name, other in commands.items() if other is not cls}
        file_settings = load_recipe(path, cls, command=command, others=others, not_settings=_NOT_IN_RECIPES,
                                    recipe_dir=TEXT_RECIPE_DIR)
        recipe = str(path.resolve())
        for name, moot in _MOOT.items():
            if name in flags:
                for other in moot:
                    if other not in flags:
                        file_settings.pop(other, None)
    merged = {**file_settings, **flags}
    if recipe is not None:
        merged["recipe"] = recipe
    cfg = cls(**merged)
    if getattr(cfg, "clip_grad", None) == 0:
        cfg.clip_grad = None
    for dest, default in defaults.items():
        setattr(args, dest, getattr(cfg, dest) if dest in names else getattr(args, dest, default))
    return cfg, file_settings, flags


def _check_text_config(cfg: Any, file_settings: dict[str, Any], flags: dict[str, Any]) -> None:
    """With a ``--config`` recipe (or ``--print-config``): validate ``cfg`` up front, an error about a setting
    that the recipe gave naming the recipe; refuse the recipe's ``overwrite: true`` with ``--resume``."""
    import re

    from ..train.recipe import ConfigError

    if cfg.resume and file_settings.get("overwrite"):  # (a resumed run would silently ignore it)
        raise ConfigError(
            f"--resume continues the run in --output, the recipe {cfg.recipe}'s overwrite: true removes it: "
            f"give one of them (leave --resume out, or overwrite out of the recipe)"
        )
    try:
        cfg.validate()
    except ConfigError as err:
        named = re.match(r"--(?:no-)?([a-z0-9-]+)", str(err))
        name = named.group(1).replace("-", "_") if named else None
        if name in file_settings and name not in flags:
            given = f"{name}: {file_settings[name]!r}"
            raise type(err)(f"{err} (set by the recipe {cfg.recipe}: {given})") from err
        raise


def _note_run_recipe(cfg: Any) -> None:
    """``--resume`` without ``--config`` of a run started with one: say so (a resume takes its settings from
    the command line, so the recipe's are not applied; changed ones are warned about or refused next)."""
    import os
    import sys

    if not cfg.resume or cfg.recipe is not None or int(os.environ.get("RANK", "0")) != 0:
        return
    try:
        from ..train.checkpoint import latest_checkpoint

        checkpoint = latest_checkpoint(cfg.output)
        options = json.loads((checkpoint / "state.json").read_text()).get("options") if checkpoint else None
        recipe = options.get("recipe") if isinstance(options, dict) else None
    except Exception:  # noqa: BLE001 - an unreadable run is reported by the command itself
        return
    if isinstance(recipe, str) and recipe:
        print(f"[gmlp] note: the run in {cfg.output!r} was started with --config {recipe}; a resume takes "
              f"its settings from the command line: give --config again (with the same flags) to continue it "
              f"with them", file=sys.stderr)


def _run_text(cls: type, args: argparse.Namespace, command: str) -> Any:
    """The config of a text command (:func:`_text_config`), checked; None after ``--print-config``."""
    cfg, file_settings, flags = _text_config(cls, args, command)
    if cfg.recipe is not None or getattr(args, "print_config", False):
        _check_text_config(cfg, file_settings, flags)
    if getattr(args, "print_config", False):
        import dataclasses

        import yaml

        print(yaml.safe_dump(json.loads(json.dumps(dataclasses.asdict(cfg))), sort_keys=False), end="")
        return None
    _note_run_recipe(cfg)
    return cfg


@_guarded(resumable=False)
def _tokenizer(args: argparse.Namespace) -> int:
    from ..train.tokenizer import train_tokenizer_command

    tok = train_tokenizer_command(
        args.output,
        corpus=args.corpus,
        kind=args.kind,
        vocab_size=args.vocab_size,
        lowercase=args.lowercase,
        min_frequency=args.min_frequency,
        model_max_length=args.model_max_length,
        valid_fraction=args.valid_fraction,
        max_documents=args.max_documents,
        max_chars=args.max_chars,
        text_column=args.text_column,
    )
    # (a small corpus fills fewer than --vocab-size: say so, a model's vocab_size follows the tokenizer's)
    fewer = ""
    if len(tok) < args.vocab_size:
        fewer = f" (fewer than --vocab-size {args.vocab_size}: the corpus gives no more)"
    print(f"saved a {args.kind} tokenizer with {len(tok)} tokens{fewer} to {args.output}")
    return 0


def _pretrain(args: argparse.Namespace) -> int:
    from ..train.text import PretrainConfig

    cfg = _run_text(PretrainConfig, args, "gmlp pretrain")
    if cfg is None:  # --print-config
        return 0
    from ..train.text import pretrain

    with _write_errors(cfg.output, resumable=True):
        result = pretrain(cfg)
    if not result.get("main_process", True):
        return 0
    val = result.get("validation") or {}
    ppl = f", held-out perplexity {val['perplexity']:.3f}" if "perplexity" in val else ""
    state = "done" if result["completed"] else "stopped"
    print(f"{state} at step {result['step']}{ppl}; outputs in {args.output}")
    return 0


def _finetune(args: argparse.Namespace) -> int:
    from ..train.text import FinetuneConfig

    cfg = _run_text(FinetuneConfig, args, "gmlp finetune")
    if cfg is None:  # --print-config
        return 0
    from ..train.text import finetune

    with _write_errors(cfg.output, resumable=True):
        result = finetune(cfg)
    if not result.get("main_process", True):
        return 0
    state = "done" if result["completed"] else "stopped"
    print(f"{state} at step {result['step']}; outputs in {args.output}")
    if result.get("test"):
        print("test: " + json.dumps({k: v for k, v in result["test"].items() if k != "step"}))
    return 0


def _add_corpus_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("corpus")
    g.add_argument(
        "--corpus",
        nargs="+",
        default=["offline"],
        help="sources: offline (= pydocs wordnet austen mobydick), books, a text file or folder, a "
        ".json/.jsonl/.csv/.parquet file, a save_to_disk folder, hf:NAME[:CONFIG] (the HF cache, else "
        "the Hub) or hf:PATH (a local data folder); of HF datasets, the train split (default: offline)",
    )
    g.add_argument("--text-column", default="text", help="text column of table / HF sources (default: text)")
    g.add_argument(
        "--valid-fraction",
        type=float,
        default=0.01,
        help="held-out fraction of documents, by text hash (default: 0.01)",
    )
    g.add_argument("--max-documents", type=int, default=None, help="read at most N >= 1 documents")
    g.add_argument("--max-chars", type=int, default=None, help="read about N >= 1 characters at most")


def _add_recipe_arguments(p: argparse.ArgumentParser, command: str) -> None:
    g = p.add_argument_group("recipe")
    g.add_argument(
        "--config",
        metavar="RECIPE",
        help=f"YAML recipe of {command} settings (keys: the flags' names, dashes or underscores): a file, or "
        f"the name of a packaged one ({_recipe_names()}); a flag given overrides the recipe's value",
    )
    g.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved settings (flags over the recipe over the defaults) and exit, each checked",
    )


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``tokenizer``, ``pretrain`` and ``finetune``."""
    tok = sub.add_parser(
        "tokenizer",
        help="train a WordPiece/Unigram tokenizer on a corpus (default: the offline corpus)",
        description="Train a tokenizer with HF tokenizers and save it (PreTrainedTokenizerFast, [CLS]/[SEP]/"
        "[MASK]/[PAD]/[UNK], BERT-style pairs) with save_pretrained.",
    )
    tok.add_argument(
        "--output", "-o", default="runs/tokenizer", help="folder to save to (default: runs/tokenizer)"
    )
    tok.add_argument("--kind", choices=("wordpiece", "unigram"), default="wordpiece")
    tok.add_argument("--vocab-size", type=int, default=8192, help="default: 8192 (the paper: 32000)")
    tok.add_argument("--lowercase", action=_B, default=True, help="lowercase and strip accents (default: on)")
    tok.add_argument(
        "--min-frequency", type=int, default=2,
        help="WordPiece: least count of a merged piece (another value than 2 is refused with --kind unigram; "
        "default: 2)",
    )
    tok.add_argument(
        "--model-max-length", type=int, default=512, help="recorded max sequence length, >= 1 (default: 512)"
    )
    _add_corpus_arguments(tok)
    tok.set_defaults(func=_tokenizer)

    pre = sub.add_parser(
        "pretrain",
        help="masked-language-model pretraining (default: small gMLP, offline corpus)",
        description="MLM pretraining (BERT masking 15% with 80/10/10, packed sequences, AdamW + warmup/"
        "linear "
        "decay, held-out perplexity, resumable checkpoints). Multi-GPU: accelerate launch -m gmlp "
        "pretrain ...",
    )
    _add_recipe_arguments(pre, "pretrain")
    _add_model_arguments(pre, dropout=0.0)
    _add_train_arguments(pre, output="runs/pretrain", batch=32, lr=7e-4, warmup=0.06, save_every=200)
    _add_corpus_arguments(pre)
    g = pre.add_argument_group("pretraining")
    g.add_argument("--steps", type=int, default=2000, help="optimizer steps (default: 2000)")
    g.add_argument("--mlm-probability", type=float, default=0.15)
    g.add_argument(
        "--sparse-prediction",
        action=_B,
        default=True,
        help="gMLP/aMLP: run the MLM decoder on the masked tokens only (same loss, much less work; the "
        "saved model still returns dense logits; default: on)",
    )
    g.add_argument(
        "--eval-every",
        type=int,
        default=200,
        help="held-out perplexity every N steps, 0 = only at the end; none with --eval-batches 0 "
        "(default: 200)",
    )
    g.add_argument(
        "--eval-batches",
        type=int,
        default=20,
        help="held-out batches per evaluation, 0 = no held-out evaluation (default: 20)",
    )
    g.add_argument(
        "--init-from", default=None, help="start from a local save_pretrained MLM folder (no download)"
    )
    g.add_argument(
        "--tokenizer-sample-chars",
        type=int,
        default=5_000_000,
        help="train a new tokenizer on an even sample of about N characters (default: 5e6)",
    )
    g.add_argument(
        "--token-cache",
        default=None,
        metavar="DIR",
        help="keep the tokenized, packed corpus in DIR, keyed by the corpus files' contents, the split "
        "options, the tokenizer and --seq-len, so a later start (--resume, another run) with the same "
        "inputs reads no corpus; a folder every process sees (default: OUTPUT/cache)",
    )
    g.add_argument(
        "--no-token-cache",
        dest="cache_tokens",
        action="store_false",
        help="tokenize the corpus at every start, in every process (no cache)",
    )
    pre.set_defaults(func=_pretrain)

    fin = sub.add_parser(
        "finetune",
        help="finetune on classification or SQuAD-format QA (default: offline tweet sentiment)",
        description="Finetune a pretrained folder (--model) or a new model on sentence (pair) "
        "classification / "
        "regression (GLUE-style files, hf:glue:NAME, offline tweets) or span QA (SQuAD JSON).",
    )
    _add_recipe_arguments(fin, "finetune")
    _add_model_arguments(fin, dropout=0.1)
    _add_train_arguments(fin, output="runs/finetune", batch=32, lr=1e-4, warmup=0.1, save_every=0)
    g = fin.add_argument_group("task")
    g.add_argument("--task", choices=("classification", "qa"), default="classification")
    g.add_argument(
        "--model", default=None, help="pretrained folder, e.g. runs/pretrain/final (default: new model)"
    )
    g.add_argument(
        "--data",
        default=None,
        help="classification: tweets (default), tweets-binary, a file, a folder with train/dev/test "
        "files, a save_to_disk folder, hf:NAME[:CONFIG] (the HF cache, else the Hub) or hf:PATH (a local "
        "data folder); qa: a SQuAD JSON file, a folder, hf:squad, a save_to_disk folder (or --train-file "
        "instead)",
    )
    g.add_argument("--train-file", default=None, help="a training file, instead of --data")
    g.add_argument("--validation-file", default=None, help="with --train-file: its dev file")
    g.add_argument("--test-file", default=None, help="with --train-file: its test file")
    g.add_argument(
        "--text-column", default="sentence",
        help="classification files / hf: datasets (not the built-in tweets): text column (default: sentence)",
    )
    g.add_argument(
        "--text-pair-column", default=None,
        help="classification files / hf: datasets: second sentence of pair tasks (e.g. hypothesis)",
    )
    g.add_argument(
        "--label-column", default="label",
        help="classification files / hf: datasets: label column (default: label)",
    )
    g.add_argument(
        "--num-labels", type=int, default=None, help="classification: default from the data; 1 = regression"
    )
    g.add_argument(
        "--epochs", type=float, default=3.0,
        help="training epochs, may be fractional; --steps N > 0 replaces it (default: 3)",
    )
    g.add_argument(
        "--steps",
        type=int,
        default=None,
        help="optimizer steps, overriding --epochs (default / 0 = train for --epochs)",
    )
    g.add_argument("--eval-batch-size", type=int, default=64, help="default: 64")
    g.add_argument("--max-train-examples", type=int, default=None, help="use the first N training examples")
    g.add_argument("--max-eval-examples", type=int, default=None, help="use the first N dev / test examples")
    g.add_argument(
        "--doc-stride", type=int, default=None,
        help="qa: window overlap in tokens (default: seq_len / 4, less where a window would hold no more "
        "context)",
    )
    g.add_argument("--max-query-length", type=int, default=64, help="qa: question tokens kept (default: 64)")
    g.add_argument(
        "--max-answer-length", type=int, default=30, help="qa: longest answer in tokens (default: 30)"
    )
    g.add_argument("--n-best", type=int, default=20, help="qa: best starts and ends searched (default: 20)")
    g.add_argument(
        "--null-threshold", type=float, default=0.0,
        help="qa, SQuAD v2: answer empty when the no-answer score minus the best span's exceeds it (BERT's "
             "null_score_diff_threshold; higher = fewer empty answers; default 0)",
    )
    fin.set_defaults(func=_finetune)
    for parser in (pre, fin):  # last: every flag of the command defaults to "not given"
        _suppress_defaults(parser)
