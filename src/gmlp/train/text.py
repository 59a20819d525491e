"""Text pipelines: MLM pretraining and finetuning (sentence (pair) classification, span QA).

Both loops run through :class:`accelerate.Accelerator` (device placement, DDP when launched with
``accelerate launch -m gmlp ...`` or ``torchrun``, gradient accumulation, bf16 autocast), write metrics to
``OUTPUT/metrics.jsonl`` and checkpoints through :mod:`gmlp.train.checkpoint`, and resume exactly:
the data order depends only on ``(seed, epoch)``, a sequence's MLM mask only on ``(seed, its position in the
data stream)`` and dropout only on ``(seed, step, rank, micro-batch)``, so a run stopped at any moment and
resumed with ``--resume`` from its last checkpoint ends with the same weights as an uninterrupted run, and
(without dropout) N processes with ``--batch-size B`` train as one with ``--batch-size N*B``.

Architectures (``arch``): ``gmlp`` (Toeplitz W, paper section 5), ``amlp`` (gMLP + one tiny attention head),
``bert`` (transformers' BERT, the paper's baseline) and ``bert-relpos`` (Table 3's "BERT-base + relative
position bias": transformers' MPNet, which is BERT's post-LN encoder and MLM head with a learned T5-style
bucketed relative attention bias shared by all layers, RoBERTa-style absolute positions and no token types).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import json
import math
import os
import re
import shutil
import string
import sys
import time
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data.text import TextDataError, TextSplits, load_text_splits, pack_sequences
from ..data.token_cache import (
    TokenBlocks,
    cache_key,
    corpus_fingerprint,
    encode_texts,
    entry_dir,
    load_or_build,
    read_entry,
)
from ..utils.distributed import process_zero_first
from ..utils.io import (
    CheckpointError,
    append_line,
    atomic_dir,
    atomic_write,
    read_jsonl_records,
)
from ..utils.malloc import tune_malloc
from ..utils.progress import progress_bar
from ..utils.state import restoring_process_state
from .checkpoint import latest_checkpoint, load_checkpoint, remove_run_files, save_checkpoint
from .interrupt import StopRequest
from .optim import fused_adamw
from .recipe import ConfigError, check_cuda_available

__all__ = [
    "ARCHS",
    "FinetuneConfig",
    "ModelOptions",
    "PretrainConfig",
    "build_model_config",
    "check_vocab",
    "classification_metrics",
    "finetune",
    "gmlp_available",
    "linear_schedule",
    "model_sizes",
    "mask_tokens",
    "never_masked_ids",
    "postprocess_qa",
    "pretrain",
    "regression_metrics",
    "squad_exact_match",
    "squad_f1",
    "squad_metrics",
    "squad_normalize",
    "step_seed",
]

ARCHS: tuple[str, ...] = ("gmlp", "amlp", "bert", "bert-relpos")
#: The attention baselines (transformers models sized by ``--layers/--hidden/--ffn/--heads``, no preset).
_BERT_ARCHS: tuple[str, ...] = ("bert", "bert-relpos")
_METRICS = "metrics.jsonl"


# --- options -------------------------------------------------------------------------------------------


@dataclass
class ModelOptions:
    """Architecture of a model built from scratch (refused with a pretrained folder, see ``_ARCH_ONLY``)."""

    arch: str = "gmlp"
    preset: str | None = None
    # None: left out, NEW_MODEL_SIZES for a model built without --preset (a preset has its own sizes)
    layers: int | None = None
    hidden: int | None = None
    ffn: int | None = None
    seq_len: int | None = None  # None: a loaded model's own length, NEW_MODEL_SEQ_LEN for a new one
    tiny_attn: int | None = None
    sgu_variant: str = "sgu"
    token_mlp_dim: int | None = None  # --sgu-variant mixer's token-MLP hidden size (None: the seq length)
    heads: int | None = None
    dropout: float = 0.0
    toeplitz: bool = True
    model_vocab_size: int | None = None


@dataclass
class _TrainOptions:
    output: str = "runs/text"
    batch_size: int = 32
    grad_accum: int = 1
    lr: float = 7e-4
    warmup: float = 0.06
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-6
    clip_grad: float | None = 1.0
    seed: int = 0
    precision: str = "auto"
    device: str = "auto"
    log_every: int = 20
    save_every: int = 200
    keep_last: int = 2
    resume: bool = False
    overwrite: bool = False
    stop_after_steps: int | None = None
    progress: bool = True
    tokenizer: str | None = None
    tokenizer_kind: str = "wordpiece"
    vocab_size: int = 8192
    grad_checkpointing: bool = False
    compile: bool = False
    # OUTPUT/tensorboard event files of the metrics.jsonl records: None writes them when tensorboard is
    # installed, True requires it, False writes none (gmlp train's --tensorboard / --no-tensorboard)
    tensorboard: bool | None = None
    # the --config recipe file the command line read options from (resolved path), recorded with the run's
    # options in each checkpoint's state.json; informational: setting it reads nothing
    recipe: str | None = None


@dataclass
class PretrainConfig(ModelOptions, _TrainOptions):
    """Options of :func:`pretrain` (the ``gmlp pretrain`` command)."""

    output: str = "runs/pretrain"
    corpus: list[str] = field(default_factory=lambda: ["offline"])
    text_column: str = "text"
    valid_fraction: float = 0.01
    max_documents: int | None = None
    max_chars: int | None = None
    tokenizer_sample_chars: int | None = 5_000_000
    steps: int = 2000
    mlm_probability: float = 0.15
    sparse_prediction: bool = True
    eval_every: int = 200
    eval_batches: int = 20
    init_from: str | None = None
    # the packed token blocks cached on disk (gmlp.data.token_cache): in token_cache, or OUTPUT/cache if None
    token_cache: str | None = None
    cache_tokens: bool = True

    def validate(self) -> None:
        """Raise :class:`~gmlp.train.recipe.ConfigError` (a ``ValueError``; also a ``FileNotFoundError``
        for a missing folder) naming the flag of the first bad option; :func:`pretrain` calls it before it
        creates, reads or builds anything."""
        from .tokenizer import check_corpus_options

        if self.token_cache is not None and not self.cache_tokens:
            raise ConfigError(
                f"--token-cache names a cache folder and --no-token-cache turns the cache off: give one of "
                f"them, got --token-cache {self.token_cache}"
            )
        cache = self.token_cache
        if cache is not None and (not str(cache).strip() or Path(cache).expanduser().is_file()):
            raise ConfigError(f"--token-cache must name a folder, got {self.token_cache!r}")

        _validate_train_options(self)
        # pretraining does not replace a loaded model's dropout (finetune --model does)
        _validate_model_options(
            self, loaded_from="--init-from" if self.init_from else None, loaded_ignores=("dropout",)
        )
        check_corpus_options(
            valid_fraction=self.valid_fraction, max_documents=self.max_documents, max_chars=self.max_chars
        )
        _require(self, ("steps",), lambda v: v >= 1, ">= 1")
        _require(self, ("mlm_probability",), lambda v: 0 < v < 1, "in (0, 1)")
        _require(self, ("eval_every",), lambda v: v >= 0, ">= 0 (0 = only at the end)")
        _require(self, ("eval_batches",), lambda v: v >= 0, ">= 0 (0 = no held-out evaluation)")
        _require(self, ("tokenizer_sample_chars",), lambda v: v >= 1, ">= 1", optional=True)
        if self.init_from and not self.resume:  # a resumed run reads its own config (checked again there)
            _check_model_folder("--init-from", self.init_from, hub_cache=True)
            if not self.tokenizer:
                _init_tokenizer_dir(self.init_from)
            # before the corpus is read (else checked once the config is loaded)
            _folder_max_len(self.init_from, self.seq_len)
        _validate_resumed_options(self, "pretrain")


@dataclass
class FinetuneConfig(ModelOptions, _TrainOptions):
    """Options of :func:`finetune` (the ``gmlp finetune`` command)."""

    output: str = "runs/finetune"
    task: str = "classification"
    data: str | None = None
    train_file: str | None = None
    validation_file: str | None = None
    test_file: str | None = None
    text_column: str = "sentence"
    text_pair_column: str | None = None
    label_column: str = "label"
    num_labels: int | None = None
    model: str | None = None
    epochs: float = 3.0
    steps: int | None = None
    lr: float = 1e-4
    warmup: float = 0.1
    dropout: float = 0.1
    doc_stride: int | None = None
    max_query_length: int = 64
    max_answer_length: int = 30
    n_best: int = 20
    null_threshold: float = 0.0
    eval_batch_size: int = 64
    save_every: int = 0
    max_train_examples: int | None = None
    max_eval_examples: int | None = None

    def validate(self) -> None:
        """Raise :class:`~gmlp.train.recipe.ConfigError` (a ``ValueError``; also a ``FileNotFoundError``
        for a missing folder) naming the flag of the first bad option; :func:`finetune` calls it before it
        creates, reads or builds anything.

        ``steps`` None or 0 means: train for ``epochs`` (which may be fractional)."""
        if self.task not in ("classification", "qa"):
            raise ConfigError(f"--task must be classification or qa, got {self.task!r}")
        _validate_train_options(self)
        _validate_model_options(self, loaded_from="--model" if self.model else None)
        _require(self, ("epochs",), lambda v: 0 < v < math.inf, "> 0 and finite (may be fractional)")
        _require(self, ("steps",), lambda v: v >= 0, ">= 0 (0 or unset = train for --epochs)", optional=True)
        at_least_one = ("eval_batch_size", "max_query_length", "max_answer_length", "n_best")
        _require(self, at_least_one, lambda v: v >= 1, ">= 1")
        _require(
            self,
            ("max_train_examples", "max_eval_examples", "num_labels"),
            lambda v: v >= 1,
            ">= 1",
            optional=True,
        )
        _require(self, ("doc_stride",), lambda v: v >= 0, ">= 0", optional=True)
        _require(self, ("null_threshold",), lambda v: not math.isnan(v), "a number (not NaN)")
        _validate_task_options(self)
        length = None  # the tokens per sequence, where known before anything is read
        if self.model:
            _check_model_folder("--model", self.model)
            # --seq-len up to the loaded model's length (its W's size)
            length = _folder_max_len(self.model, self.seq_len)
        elif not self.resume:  # a resumed run has its own config.json's length
            length = seq_len_of_new_model(self)
        if self.task == "qa" and (length or self.seq_len):
            n = length or int(self.seq_len)
            given = self.doc_stride is not None
            stride = self.doc_stride if given else default_doc_stride(n, self.max_query_length)
            _check_doc_stride(stride, n, self.max_query_length, given=given)
        _validate_resumed_options(self, "finetune")


class _MissingFolderError(ConfigError, FileNotFoundError):
    """A folder named by a flag (``--model``, ``--init-from``, ``--tokenizer``) is missing or incomplete."""


def _flag(name: str) -> str:
    """The command-line flag of a config field (``adam_beta1`` -> ``--adam-beta1``)."""
    return "--" + name.replace("_", "-")


def _require(
    opts: Any, names: Sequence[str], ok: Callable[[Any], bool], expected: str, *, optional: bool = False
) -> None:
    """Raise ``ConfigError`` naming the flag of the first of ``names`` whose value fails ``ok`` (NaN fails
    every comparison); with ``optional``, None (the flag left out) passes."""
    for name in names:
        value = getattr(opts, name)
        if value is None and optional:
            continue
        if value is None or not ok(value):
            raise ConfigError(f"{_flag(name)} must be {expected}, got {value}")


def _validate_train_options(opts: _TrainOptions) -> None:
    from .tokenizer import SPECIAL_TOKENS, TOKENIZER_KINDS

    _require(opts, ("batch_size", "grad_accum", "log_every", "keep_last"), lambda v: v >= 1, ">= 1")
    # (infinity passes a bare range check, then ends the run with a NaN loss or an int(inf) error)
    _require(opts, ("lr", "adam_eps"), lambda v: 0 < v < math.inf, "> 0 and finite")
    _require(opts, ("weight_decay",), lambda v: 0 <= v < math.inf, ">= 0 and finite")
    _require(opts, ("warmup",), lambda v: 0 <= v < math.inf,
             ">= 0 and finite (a fraction of the steps if < 1, else a step count)")
    _require(opts, ("save_every",), lambda v: v >= 0, ">= 0 (0 = only at the end)")
    _require(opts, ("clip_grad",), lambda v: 0 <= v < math.inf, ">= 0 and finite (0 = off)", optional=True)
    _require(opts, ("adam_beta1", "adam_beta2"), lambda v: 0 <= v < 1, "in [0, 1)")
    _require(opts, ("stop_after_steps",), lambda v: v >= 1, ">= 1", optional=True)
    specials = len(SPECIAL_TOKENS)
    _require(opts, ("vocab_size",), lambda v: v > specials, f"> {specials} (the special tokens)")
    choices = {
        "precision": ("auto", "bf16", "fp32", "no"),
        "device": ("auto", "cpu", "cuda"),
        "tokenizer_kind": TOKENIZER_KINDS,
    }
    for name, allowed in choices.items():
        value = getattr(opts, name)
        if value not in allowed:
            raise ConfigError(f"{_flag(name)} must be one of {', '.join(allowed)}, got {value!r}")
    check_cuda_available(opts.device)  # accelerate would fall back to the CPU
    if opts.tokenizer:
        folder = Path(opts.tokenizer)
        if not folder.is_dir():
            raise _MissingFolderError(
                f"--tokenizer {opts.tokenizer!r}: no such directory (expected a tokenizer saved with "
                f"save_pretrained, e.g. by gmlp tokenizer)"
            )
        if not (folder / "tokenizer.json").is_file() and not (folder / "tokenizer_config.json").is_file():
            raise _MissingFolderError(
                f"--tokenizer {opts.tokenizer!r} holds no tokenizer (expected tokenizer.json from "
                f"save_pretrained)"
            )


#: Options used only to build a new model: a model loaded from ``--model`` / ``--init-from`` keeps the
#: architecture of its config.json. (``--seq-len`` still cuts the data, ``--dropout`` still applies to
#: ``finetune --model``.)
_ARCH_ONLY = (
    "arch",
    "preset",
    "layers",
    "hidden",
    "ffn",
    "tiny_attn",
    "sgu_variant",
    "token_mlp_dim",
    "toeplitz",
    "heads",
    "model_vocab_size",
)


_NO_CHECKPOINTING = (
    "--grad-checkpointing: transformers' {name} ({arch}) has no activation checkpointing; leave "
    "--grad-checkpointing out"
)


def _validate_model_options(
    opts: ModelOptions, *, loaded_from: str | None, loaded_ignores: Sequence[str] = ()
) -> None:
    """The architecture options; their consistency only when the model is built from them. With
    ``loaded_from`` (the flag, ``--model`` / ``--init-from``, of the folder the model is loaded from) the
    architecture-only options (and ``loaded_ignores``) must keep their defaults: they would be ignored."""
    if opts.arch not in ARCHS:
        raise ConfigError(f"--arch must be one of {', '.join(ARCHS)}, got {opts.arch!r}")
    _require(opts, ("layers", "hidden", "ffn"), lambda v: v >= 1, ">= 1", optional=True)
    _require(opts, ("seq_len",), lambda v: v >= 3, ">= 3 (room for [CLS], a token and [SEP])", optional=True)
    _require(
        opts, ("tiny_attn", "heads", "model_vocab_size", "token_mlp_dim"), lambda v: v >= 1, ">= 1",
        optional=True,
    )
    _require(opts, ("dropout",), lambda v: 0 <= v < 1, "in [0, 1)")
    if loaded_from:
        defaults = {f.name: f.default for f in fields(opts)}
        for name in (*_ARCH_ONLY, *loaded_ignores):
            value = getattr(opts, name)
            if value != defaults[name]:
                flag = "--no-" + _flag(name)[2:] if value is False else _flag(name)
                raise ConfigError(
                    f"{flag} has no effect when the model is loaded from {loaded_from} (the model keeps "
                    f"the settings of that folder's config.json); leave {flag} out"
                )
        return
    if opts.arch == "amlp" and opts.sgu_variant in ("none", "mixer"):  # (else refused after the data load)
        raise ConfigError(
            f"--arch amlp adds a tiny attention to the gate, and --sgu-variant {opts.sgu_variant} has no "
            f"gate: use --arch gmlp"
        )
    if opts.arch in _BERT_ARCHS and opts.sgu_variant != "sgu":  # (it was ignored)
        raise ConfigError(f"--sgu-variant sets gMLP's gating and must be left out with --arch {opts.arch}, "
                          f"got {opts.sgu_variant}")
    if opts.arch in _BERT_ARCHS and not opts.toeplitz:  # (it was ignored)
        raise ConfigError(f"--no-toeplitz sets gMLP's spatial projection W and must be left out with --arch "
                          f"{opts.arch} (it has none), got --no-toeplitz")
    if opts.token_mlp_dim is not None and (opts.arch in _BERT_ARCHS or opts.sgu_variant != "mixer"):
        raise ConfigError(
            f"--token-mlp-dim sets the token MLP of --sgu-variant mixer: it needs --arch gmlp and "
            f"--sgu-variant mixer, got --arch {opts.arch} --sgu-variant {opts.sgu_variant}"
        )
    if opts.arch in _BERT_ARCHS:
        if opts.preset:
            raise ConfigError(
                f"--preset names a gMLP/aMLP model; for --arch {opts.arch} give --layers/--hidden/--ffn, "
                f"got --preset {opts.preset}"
            )
        if opts.tiny_attn is not None:
            raise ConfigError(
                f"--tiny-attn sets aMLP's tiny attention: it needs --arch amlp, not --arch {opts.arch} "
                f"(BERT's attention heads: --heads)"
            )
        _, hidden, _ = model_sizes(opts)
        if opts.heads is not None and hidden % opts.heads:
            raise ConfigError(f"--heads must divide --hidden {hidden}, got {opts.heads}")
        heads = opts.heads or max(1, hidden // 64)
        if hidden % heads:
            raise ConfigError(
                f"--hidden {hidden} is not divisible by the default --heads {heads} (--hidden / 64); "
                f"give --heads"
            )
        if opts.arch == "bert-relpos" and getattr(opts, "grad_checkpointing", False):
            raise ConfigError(_NO_CHECKPOINTING.format(name="MPNet", arch="--arch bert-relpos"))
        return
    if opts.heads is not None:
        raise ConfigError(
            f"--heads sets BERT's attention heads: it needs --arch bert or bert-relpos, not --arch "
            f"{opts.arch}"
        )
    if opts.preset:
        try:
            _preset_arch(opts)
        except ValueError as err:
            raise ConfigError(str(err)) from None
    elif opts.arch == "gmlp" and opts.tiny_attn:
        raise ConfigError("--tiny-attn makes an aMLP: use --arch amlp")
    if opts.sgu_variant == "sgu" and opts.ffn is not None and opts.ffn % 2:  # (a traceback after the data)
        raise ConfigError(
            f"--ffn must be even with --sgu-variant sgu (the gate splits d_ffn into two halves), got "
            f"{opts.ffn}"
        )


#: The options of one finetuning task, each with what it sets: given with the other ``--task`` they were
#: silently ignored.
_TASK_ONLY: dict[str, dict[str, str]] = {
    "qa": {
        "doc_stride": "the overlap of QA windows",
        "max_query_length": "the longest QA question",
        "max_answer_length": "the longest QA answer",
        "n_best": "the candidate starts and ends of a QA answer",
        "null_threshold": "SQuAD v2's no-answer threshold",
    },
    "classification": {
        "text_column": "the text column of classification data",
        "text_pair_column": "the second-sentence column of classification data",
        "label_column": "the label column of classification data",
        "num_labels": "the number of classification labels",
    },
}

#: The built-in classification sets (``--data`` left out is ``tweets``): they have their own columns.
_BUILTIN_CLASSIFICATION = ("tweets", "tweets-binary")


def _given(opts: Any, names: Sequence[str]) -> list[str]:
    """Those of ``names`` whose value in ``opts`` is not the field's default (the flag was given)."""
    defaults = {f.name: f.default for f in fields(opts)}
    return [name for name in names if getattr(opts, name) != defaults[name]]


def _validate_task_options(opts: FinetuneConfig) -> None:
    """Refuse the finetuning options the data and the task would silently ignore: those of the other
    ``--task`` (:data:`_TASK_ONLY`), ``--data`` together with ``--train-file`` (the files replace it),
    ``--validation-file`` / ``--test-file`` without ``--train-file`` (the splits come from ``--data``), and
    the column options with the built-in tweet sets (their columns are fixed)."""
    for task, names in _TASK_ONLY.items():
        given = _given(opts, list(names)) if task != opts.task else []
        if given:
            name = given[0]
            raise ConfigError(
                f"{_flag(name)} sets {names[name]} and must be left out with --task {opts.task}, got "
                f"{getattr(opts, name)}"
            )
    if opts.train_file is not None and opts.data is not None:
        raise ConfigError(
            f"--data and --train-file both name the training data: --train-file (with --validation-file / "
            f"--test-file) replaces --data, which would be ignored; give one of them, got --data {opts.data} "
            f"and --train-file {opts.train_file}"
        )
    source = opts.data or ("tweets" if opts.task == "classification" else None)
    if opts.train_file is None:
        for name in ("validation_file", "test_file"):
            if getattr(opts, name) is not None:
                where = f"--data {source}" if source else "--data"
                raise ConfigError(
                    f"{_flag(name)} needs --train-file: without it the splits come from {where} and "
                    f"{_flag(name)} would be ignored, got {_flag(name)} {getattr(opts, name)}"
                )
        if opts.task == "classification" and source in _BUILTIN_CLASSIFICATION:
            columns = _given(opts, ("text_column", "text_pair_column", "label_column"))
            if columns:
                name = columns[0]
                raise ConfigError(
                    f"{_flag(name)} names a column of a data file or an hf: dataset; the built-in --data "
                    f"{source} has its own columns and would ignore it, got {getattr(opts, name)}"
                )


#: The options that only train a tokenizer (a run that loads or reuses one does not apply them).
_TOKENIZER_TRAINING = ("vocab_size", "tokenizer_kind", "tokenizer_sample_chars")


def _kept_on_resume(opts: Any, saved: dict[str, Any]) -> dict[str, str]:
    """The options that a run resumed from a checkpoint does not apply, each with what the run keeps instead
    (``saved``: the options the run was started with, from its state.json): the architecture of a model
    built from scratch, its ``--dropout`` and ``pretrain --init-from``, since the model comes back from
    ``OUTPUT/config.json`` and the checkpoint (``finetune --model`` rebuilds it from that folder, with
    ``--dropout``); and the options that train a tokenizer, since the tokenizer comes back from
    ``OUTPUT/tokenizer`` (or ``--tokenizer`` / ``--model``)."""
    out = Path(opts.output)
    kept: dict[str, str] = {}
    loaded = getattr(opts, "model", None) or saved.get("model")
    if not loaded and (out / "config.json").is_file():  # (pretrain --init-from: only for a new run)
        names = (*_ARCH_ONLY, "dropout", *(("init_from",) if hasattr(opts, "init_from") else ()))
        kept.update(dict.fromkeys(names, f"model ({out / 'config.json'} and its checkpoint)"))
    tokenizer = opts.tokenizer or saved.get("tokenizer")
    where = (
        f"--tokenizer {tokenizer}" if tokenizer
        else f"--model {loaded}" if loaded
        else str(out / "tokenizer") if (out / "tokenizer" / "tokenizer.json").is_file()
        else None  # (none to reuse: a new one is trained, with these options)
    )
    if where:
        names = [n for n in _TOKENIZER_TRAINING if hasattr(opts, n)]
        kept.update(dict.fromkeys(names, f"tokenizer ({where})"))
    return kept


def _validate_resumed_options(opts: Any, kind: str) -> None:
    """With ``--resume`` and a checkpoint of a ``kind`` run in ``--output``: refuse the options that the
    resumed run does not apply (:func:`_kept_on_resume`) given with another value than the run was started
    with (they were ignored, while the changed-options warning said the result would differ). The same
    value, as when a run's command line is given again with ``--resume``, passes. A missing or unreadable
    checkpoint is left to :func:`_prepare_output`."""
    if not opts.resume:
        return
    try:
        checkpoint = latest_checkpoint(opts.output)
        state = json.loads((checkpoint / "state.json").read_text()) if checkpoint is not None else None
    except (CheckpointError, OSError, ValueError):
        return
    saved = state.get("options") if isinstance(state, dict) and state.get("kind") == kind else None
    if not isinstance(saved, dict):
        return
    kept = _kept_on_resume(opts, saved)
    for name in _given(opts, list(kept)):
        value = getattr(opts, name)
        if name in saved and saved[name] == value:
            continue
        flag = "--no-" + _flag(name)[2:] if value is False else _flag(name)
        got = flag if isinstance(value, bool) else value
        was = saved.get(name)
        started = (
            f"whose options do not record {_flag(name)}" if name not in saved
            else f"started with {_flag(name) if was else '--no-' + _flag(name)[2:]}" if isinstance(was, bool)
            else f"started without {_flag(name)}" if was is None
            else f"started with {_flag(name)} {was}"
        )
        raise ConfigError(
            f"{flag} has no effect with --resume: the run in {opts.output!r} ({started}) keeps its "
            f"{kept[name]}; leave {flag} out, got {got}"
        )


def _preset_arch(opts: ModelOptions) -> dict[str, Any]:
    """The ``GMLPConfig`` arguments the options give a ``--preset`` model: its tiny attention (the preset's,
    or ``--tiny-attn``), ``--sgu-variant`` and ``--no-toeplitz`` (Table 3's ablations use the
    ``gmlp-ablation`` size). A ``ValueError`` for options that contradict the preset, which were silently
    ignored before: its sizes (``--layers/--hidden/--ffn``), ``--arch amlp`` for a preset without tiny
    attention (unless ``--tiny-attn`` adds it), ``--tiny-attn`` with ``--arch gmlp``."""
    from ..models.text import PRESETS

    if opts.preset not in PRESETS:
        raise ValueError(f"--preset: unknown preset {opts.preset!r}; known: {', '.join(PRESETS)}")
    sized = [_flag(name) for name in NEW_MODEL_SIZES if getattr(opts, name) is not None]
    if sized:
        raise ValueError(
            f"--preset {opts.preset} sets the model's size: leave {', '.join(sized)} out (or give the sizes "
            f"without --preset)"
        )
    if opts.arch == "gmlp" and opts.tiny_attn:
        raise ValueError("--tiny-attn makes an aMLP: use --arch amlp")
    tiny = opts.tiny_attn or PRESETS[opts.preset].get("tiny_attn_size")
    if opts.arch == "amlp" and not tiny:
        raise ValueError(
            f"--arch amlp: --preset {opts.preset} has no tiny attention; use an amlp-* preset or add it "
            f"with --tiny-attn (64 in the paper's base models)"
        )
    return {
        "tiny_attn_size": tiny, "sgu_variant": opts.sgu_variant, "toeplitz": _toeplitz(opts),
        "sgu_token_mlp_dim": opts.token_mlp_dim,
    }


def _toeplitz(opts: ModelOptions) -> bool:
    """``--toeplitz``, or False for ``--sgu-variant mixer`` (no single projection W to constrain: its
    config.json then says so, rather than an unused True)."""
    return opts.toeplitz and opts.sgu_variant != "mixer"


def _in_hub_cache(repo_id: str) -> bool:
    """Whether ``repo_id`` is a hub model in the local cache (``local_files_only`` can load it)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except (ImportError, ValueError):  # not a valid repo id (e.g. a path)
        return False


def _check_model_folder(flag: str, path: str, *, hub_cache: bool = False) -> None:
    """Raise a ``ConfigError`` (also a ``FileNotFoundError``) naming ``flag`` unless ``path`` is a
    ``save_pretrained`` folder (or, with ``hub_cache``, a hub model already in the local cache: nothing is
    downloaded)."""
    folder = Path(path)
    if folder.is_dir():
        if not (folder / "config.json").is_file():
            raise _MissingFolderError(f"{flag} {path!r} holds no config.json (a save_pretrained folder)")
        return
    if hub_cache and _in_hub_cache(path):
        return
    what = "a file, not a folder" if folder.exists() else "no such directory"
    raise _MissingFolderError(
        f"{flag} {path!r}: {what} (expected a save_pretrained folder; nothing is downloaded)"
    )


def _init_tokenizer_dir(init_from: str) -> Path:
    """The folder of the tokenizer saved with the ``--init-from`` model (a local folder or a hub model in
    the local cache); a ``ConfigError`` when it has none (the model's token ids need their tokenizer)."""
    folder = Path(init_from)
    if not folder.is_dir():
        with contextlib.suppress(ImportError, ValueError):
            from huggingface_hub import try_to_load_from_cache

            for name in ("tokenizer.json", "tokenizer_config.json"):
                cached = try_to_load_from_cache(init_from, name)
                if isinstance(cached, str):
                    return Path(cached).parent
    elif (folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file():
        return folder
    raise ConfigError(
        f"--init-from {init_from!r} holds no tokenizer: pass --tokenizer with the tokenizer the model was "
        f"trained with (a new one would give its embeddings other tokens)"
    )


def _folder_max_len(path: str, requested: int | None) -> int | None:
    """:func:`_max_len` for the model of the ``save_pretrained`` folder ``path`` (from its config.json:
    ``max_position_embeddings``, less MPNet's position offset for a ``bert-relpos`` model), or None where it
    cannot tell (a hub model, an unreadable file, a config without it)."""
    try:
        saved = json.loads((Path(path) / "config.json").read_text())
        value = saved.get("max_position_embeddings")
        offset = _MPNET_POSITION_OFFSET if _is_relpos(saved) else 0
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value - offset < 1:
        return None
    return _max_len_of(value - offset, requested, offset=offset)


#: The options that name where a run's tokenizer and model come from, per command: a resumed run given
#: none of them takes its own (:func:`_with_run_sources`).
_RUN_SOURCES = {"pretrain": ("tokenizer",), "finetune": ("tokenizer", "model")}


def _with_run_sources(cfg: Any, checkpoint: Path, kind: str, accelerator: Any) -> Any:
    """``cfg`` with the options of ``_RUN_SOURCES[kind]`` that a resumed run leaves out taken from the run's
    checkpoint (the options in its state.json), so that ``--resume`` without ``--tokenizer DIR`` (or
    ``finetune --model DIR``) continues with DIR, as the docs say a resumed run does: it trained a new
    tokenizer (other token ids for the restored embedding, or a vocabulary error) and built a default
    model instead. The result is validated again (the folders must still exist; architecture flags are
    refused with a loaded model)."""
    try:
        saved = json.loads((checkpoint / "state.json").read_text()).get("options")
    except (OSError, ValueError, AttributeError):
        return cfg
    if not isinstance(saved, dict):
        return cfg
    taken = {
        name: saved[name]
        for name in _RUN_SOURCES[kind]
        if getattr(cfg, name) is None and isinstance(saved.get(name), str) and saved[name]
    }
    if not taken:
        return cfg
    cfg = replace(cfg, **taken)
    given = ", ".join(f"{_flag(name)} {value}" for name, value in taken.items())
    try:
        cfg.validate()
    except _MissingFolderError as err:
        raise _MissingFolderError(
            f"the run in {cfg.output!r} was started with {err}; pass the flag with the folder's new place"
        ) from None
    except ConfigError as err:
        raise ConfigError(f"resuming the run in {cfg.output!r}, started with {given}: {err}") from None
    if accelerator.is_main_process:
        print(f"[gmlp] --resume: continuing with the run's {given}", file=sys.stderr)
    return cfg


def config_from_namespace(cls: type, ns: Any) -> Any:
    """Build a :class:`PretrainConfig` / :class:`FinetuneConfig` from an ``argparse.Namespace``
    (attributes it lacks keep their defaults)."""
    return cls(**{f.name: getattr(ns, f.name) for f in fields(cls) if hasattr(ns, f.name)})


# --- models --------------------------------------------------------------------------------------------


def gmlp_available() -> bool:
    """Whether :mod:`gmlp.models.text` (the gMLP language models) imports."""
    try:
        import gmlp.models.text  # noqa: F401
    except ImportError:
        return False
    return True


def _import_gmlp() -> Any:
    try:
        import gmlp.models.text as text_models
    except ImportError as err:  # pragma: no cover - only while the package is incomplete
        raise RuntimeError(f"--arch gmlp/amlp needs gmlp.models.text, which does not import: {err}") from err
    return text_models


def build_model_config(
    opts: ModelOptions, *, vocab_size: int, special_ids: dict[str, int], **extra: Any
) -> Any:
    """A transformers config for ``opts.arch`` (``GMLPConfig``, ``BertConfig``, or ``MPNetConfig`` for
    ``bert-relpos``: BERT's sizes with a relative attention bias, see :func:`_relpos_config`).

    Args:
        opts: the architecture options.
        vocab_size: number of token ids (``len(tokenizer)``, or ``opts.model_vocab_size``).
        special_ids: ``pad``, ``cls``, ``sep``, ``mask`` token ids.
        **extra: more config arguments (``num_labels``, ``id2label``, ``problem_type``...).

    Raises:
        ValueError: unknown architecture, or inconsistent sizes.
    """
    if opts.arch not in ARCHS:
        raise ValueError(f"unknown arch {opts.arch!r}; expected one of {', '.join(ARCHS)}")
    if opts.arch in _BERT_ARCHS:
        from transformers import BertConfig

        if opts.preset:
            raise ValueError(f"--preset names a gMLP/aMLP model; for --arch {opts.arch} give "
                             f"--layers/--hidden/--ffn")
        layers, hidden, ffn = model_sizes(opts)
        heads = opts.heads or max(1, hidden // 64)
        if hidden % heads:
            raise ValueError(f"--hidden {hidden} must be divisible by --heads {heads}")
        if opts.arch == "bert-relpos":
            return _relpos_config(
                opts, vocab_size=vocab_size, special_ids=special_ids, layers=layers, hidden=hidden, ffn=ffn,
                heads=heads, **extra,
            )
        return BertConfig(
            vocab_size=vocab_size,
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            intermediate_size=ffn,
            max_position_embeddings=seq_len_of_new_model(opts),
            hidden_dropout_prob=opts.dropout,
            attention_probs_dropout_prob=opts.dropout,
            pad_token_id=special_ids["pad"],
            type_vocab_size=2,
            **extra,
        )
    models = _import_gmlp()
    common = dict(
        vocab_size=vocab_size,
        max_position_embeddings=seq_len_of_new_model(opts),
        pad_token_id=special_ids["pad"],
        cls_token_id=special_ids["cls"],
        sep_token_id=special_ids["sep"],
        mask_token_id=special_ids["mask"],
        hidden_dropout_prob=opts.dropout,
        **extra,
    )
    if opts.preset:
        return models.GMLPConfig.from_preset(opts.preset, **_preset_arch(opts), **common)
    layers, hidden, ffn = model_sizes(opts)
    tiny = opts.tiny_attn
    if opts.arch == "amlp" and not tiny:
        tiny = 64 if hidden >= 256 else max(8, hidden // 4)
    if opts.arch == "gmlp" and tiny:
        raise ValueError("--tiny-attn makes an aMLP: use --arch amlp")
    return models.GMLPConfig(
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        toeplitz=_toeplitz(opts),
        tiny_attn_size=tiny,
        sgu_variant=opts.sgu_variant,
        sgu_token_mlp_dim=opts.token_mlp_dim,
        **common,
    )


#: MPNet's position of the first token: its ``padding_idx`` (1, fixed in transformers' MPNetEmbeddings
#: whatever ``pad_token_id`` says) + 1; pads take position ``padding_idx``. A model of ``n`` tokens needs
#: ``max_position_embeddings = n + 2`` (RoBERTa's 514 for 512).
_MPNET_POSITION_OFFSET = 2

#: MPNet's relative buckets: ``MPNetEncoder.compute_position_bias`` always uses 32 buckets (16 per
#: direction, distances 0..7 exact, then log-spaced up to 128, farther ones share the last bucket) whatever
#: ``relative_attention_num_buckets`` says; the config must say 32 (fewer index past the bias table, more
#: add unused rows).
_MPNET_BUCKETS = 32


def _relpos_config(
    opts: ModelOptions, *, vocab_size: int, special_ids: dict[str, int], layers: int, hidden: int, ffn: int,
    heads: int, **extra: Any,
) -> Any:
    """The ``MPNetConfig`` of ``--arch bert-relpos``: BERT's sizes, activation (GELU), layer-norm eps,
    init range and dropout, plus MPNet's relative attention bias (:data:`_MPNET_BUCKETS` buckets, one
    learned bias per bucket and head, shared by all layers); positions as :data:`_MPNET_POSITION_OFFSET`."""
    from transformers import MPNetConfig

    return MPNetConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=ffn,
        max_position_embeddings=seq_len_of_new_model(opts) + _MPNET_POSITION_OFFSET,
        hidden_dropout_prob=opts.dropout,
        attention_probs_dropout_prob=opts.dropout,
        relative_attention_num_buckets=_MPNET_BUCKETS,
        pad_token_id=special_ids["pad"],
        bos_token_id=special_ids["cls"],
        eos_token_id=special_ids["sep"],
        **extra,
    )


def _is_relpos(config: Any) -> bool:
    """Whether ``config`` (a transformers config, or the dict of a config.json) is a ``bert-relpos`` model's
    (transformers' MPNet)."""
    kind = config.get("model_type") if isinstance(config, dict) else getattr(config, "model_type", None)
    return kind == "mpnet"


def _position_offset(config: Any) -> int:
    """How many of ``config.max_position_embeddings`` no token can use (MPNet's padding position and the
    one below it, :data:`_MPNET_POSITION_OFFSET`; 0 for gMLP and BERT)."""
    return _MPNET_POSITION_OFFSET if _is_relpos(config) else 0


def _prepare_mpnet(model: nn.Module, pad_id: int) -> nn.Module:
    """A ``bert-relpos`` (MPNet) model made to train as BERT would with this package's tokenizers, whose
    ``[PAD]`` is 0 and ``[UNK]`` 1: transformers' MPNet fixes its word embedding's ``padding_idx`` at 1 (the
    id of RoBERTa's ``<pad>``), which gave ``[UNK]`` an embedding that never learns from its inputs.
    Here ``[PAD]``'s row is the one without a gradient, as in BERT (the forward pass is unchanged). Its
    positions come from the attention mask (:func:`_with_model_inputs`). Other models are returned as
    they are."""
    if _is_relpos(model.config):
        embeddings = model.get_input_embeddings()
        if isinstance(embeddings, nn.Embedding):
            embeddings.padding_idx = pad_id
    return model


def _mpnet_position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """MPNet's positions from the attention mask rather than from the token ids (its own rule takes id 1,
    our ``[UNK]``, as padding): real tokens count up from 2, padding sits at MPNet's padding position 1.
    So a padded sequence (left or right) gives its tokens the positions of the unpadded one."""
    mask = attention_mask.long()
    return torch.cumsum(mask, dim=1) * mask + (_MPNET_POSITION_OFFSET - 1)


def _with_model_inputs(batch: dict[str, torch.Tensor], config: Any) -> dict[str, torch.Tensor]:
    """``batch`` as the model of ``config`` takes it: an MPNet (``bert-relpos``) model gets ``position_ids``
    from the attention mask (:func:`_mpnet_position_ids`) and no ``token_type_ids`` (it has no token-type
    embedding: its forward would swallow them unused); the others get ``batch`` unchanged."""
    if not _is_relpos(config):
        return batch
    out = {k: v for k, v in batch.items() if k != "token_type_ids"}
    out["position_ids"] = _mpnet_position_ids(batch["attention_mask"])
    return out


def check_vocab(tokenizer: Any, config: Any) -> None:
    """Raise a clear ``ValueError`` when the tokenizer has more tokens than the model's ``vocab_size``."""
    if len(tokenizer) > config.vocab_size:
        raise ValueError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {config.vocab_size}: "
            f"token ids >= {config.vocab_size} would index past the embedding; use the model's own tokenizer "
            f"or a larger --model-vocab-size"
        )


def _special_ids(tokenizer: Any) -> dict[str, int]:
    return {
        "pad": tokenizer.pad_token_id,
        "cls": tokenizer.cls_token_id,
        "sep": tokenizer.sep_token_id,
        "mask": tokenizer.mask_token_id,
    }


def never_masked_ids(tokenizer: Any) -> list[int]:
    """The ids MLM pretraining never selects: every special token of ``tokenizer`` (``[PAD]``, ``[CLS]``,
    ``[SEP]``, ``[MASK]`` and ``[UNK]``, as ``DataCollatorForLanguageModeling`` skips them)."""
    ids = set(tokenizer.all_special_ids) | {i for i in _special_ids(tokenizer).values() if i is not None}
    return sorted(ids)


#: ``--seq-len`` of a model built from scratch when none is given (a loaded model keeps its own length).
NEW_MODEL_SEQ_LEN = 128

#: ``--layers`` / ``--hidden`` / ``--ffn`` of a model built without ``--preset`` when left out.
NEW_MODEL_SIZES = {"layers": 4, "hidden": 128, "ffn": 768}


def model_sizes(opts: Any) -> tuple[int, int, int]:
    """``(layers, hidden, ffn)`` of a model built from ``opts`` without a preset: each given value, else
    :data:`NEW_MODEL_SIZES`'s."""
    layers, hidden, ffn = (
        NEW_MODEL_SIZES[name] if getattr(opts, name) is None else int(getattr(opts, name))
        for name in NEW_MODEL_SIZES
    )
    return layers, hidden, ffn


def seq_len_of_new_model(opts: Any) -> int:
    """The sequence length (= ``max_position_embeddings``, but for ``bert-relpos``'s offset) of a model
    built from ``opts``."""
    return NEW_MODEL_SEQ_LEN if opts.seq_len is None else int(opts.seq_len)


def _max_len(config: Any, requested: int | None) -> int:
    """The tokens per sequence for ``config``'s model: ``--seq-len`` if given, else the model's own length.
    A gMLP's spatial W covers ``max_position_embeddings`` tokens and cannot be extended, so a longer request
    is refused (it was silently cut to the model's length). An MPNet (``bert-relpos``) model covers two
    tokens fewer (:data:`_MPNET_POSITION_OFFSET`)."""
    offset = _position_offset(config)
    return _max_len_of(int(config.max_position_embeddings) - offset, requested, offset=offset)


def _max_len_of(n: int, requested: int | None, *, offset: int = 0) -> int:
    """:func:`_max_len` for a model of ``n`` tokens (``n + offset`` position embeddings)."""
    if requested is None:
        return n
    if requested > n:
        covers = (
            f"its position embeddings cover {n} tokens" if offset
            else f"its spatial W covers {n} tokens and cannot be extended"
        )
        raise ConfigError(
            f"--seq-len {requested} is longer than the model's max_position_embeddings={n + offset} "
            f"({covers}): pass --seq-len {n} or less"
        )
    return requested


def default_doc_stride(seq_len: int, max_query_length: int) -> int:
    """The QA windows' overlap when ``--doc-stride`` is not given: a quarter of ``seq_len``, less where the
    window would not hold the question, three special tokens and more context than that."""
    room = seq_len - min(max_query_length, seq_len // 2) - 4
    return max(0, min(max(1, seq_len // 4), room))


def _check_doc_stride(
    stride: int, seq_len: int, max_query_length: int, *, given: bool = True
) -> tuple[int, int]:
    """The QA window's stride and question length for ``seq_len`` tokens, or a ConfigError naming
    ``--doc-stride`` (the window must hold the question, three special tokens and more context than the
    stride); ``given=False``: the stride is the default, and the error names ``--seq-len``."""
    max_query = min(max_query_length, seq_len // 2)
    if not given and stride >= seq_len - max_query - 3:
        raise ConfigError(
            f"a QA window of {seq_len} tokens (--seq-len, or the model's length) leaves no room for context "
            f"(question up to {max_query} tokens, 3 special tokens): give a longer --seq-len or a smaller "
            f"--max-query-length"
        )
    if stride >= seq_len - max_query - 3:
        raise ConfigError(
            f"--doc-stride {stride} is too large for --seq-len {seq_len} (question up to {max_query} tokens, "
            f"3 special tokens): it must be below {seq_len - max_query - 3}"
        )
    return stride, max_query


# --- masking, seeds, optimisation ------------------------------------------------------------------------


def step_seed(seed: int, *keys: Any) -> int:
    """A 63-bit seed derived from ``seed`` and ``keys`` (stable across processes, runs and machines)."""
    h = hashlib.blake2b(repr((int(seed), *keys)).encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") >> 1


def mask_tokens(
    input_ids: torch.Tensor,
    *,
    mask_token_id: int,
    vocab_size: int,
    special_ids: Sequence[int] = (),
    mlm_probability: float = 0.15,
    mask_replace_prob: float = 0.8,
    random_replace_prob: float = 0.1,
    generator: torch.Generator | None = None,
    seeds: Sequence[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking, as ``transformers.DataCollatorForLanguageModeling`` but with explicit randomness.

    Each non-special token is selected with probability ``mlm_probability``; a selected token becomes
    ``[MASK]`` with probability ``mask_replace_prob``, a random token with ``random_replace_prob`` and
    stays unchanged otherwise (80/10/10 by default).

    The randomness comes from ``generator`` (the global one if neither is given) or, with ``seeds`` (one
    integer per row of a 2-D ``input_ids``), from a generator of each row's own seed: then a row's masks
    depend on its seed only, not on the other rows it is batched with, and row ``i`` is masked exactly as
    ``mask_tokens(input_ids[i : i + 1], generator=torch.Generator().manual_seed(seeds[i] % 2**63))``.
    Either way the draws are made on the CPU in float32, so a seed gives the same masks whatever the
    default dtype or device.

    Returns:
        ``(inputs, labels)``: the corrupted ids and the targets (-100 where no prediction is made).

    Raises:
        ValueError: ``mlm_probability`` outside (0, 1), ``mask_replace_prob`` or ``random_replace_prob``
            outside [0, 1] or summing to more than 1, ``vocab_size`` below 1, or ``seeds`` given together
            with ``generator``, for ``input_ids`` that are not 2-D, or not one per row.
    """
    if not 0.0 < mlm_probability < 1.0:
        raise ValueError(f"mlm_probability must be in (0, 1), got {mlm_probability}")
    for name, p in (("mask_replace_prob", mask_replace_prob), ("random_replace_prob", random_replace_prob)):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {p}")
    if mask_replace_prob + random_replace_prob > 1.0:
        raise ValueError(
            f"mask_replace_prob + random_replace_prob must be <= 1, got {mask_replace_prob} + "
            f"{random_replace_prob}"
        )
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1 (random replacements are drawn from it), got {vocab_size}")
    shape = tuple(input_ids.shape)
    if seeds is not None:
        if generator is not None:
            raise ValueError("give seeds (one generator per row) or generator, not both")
        if input_ids.dim() != 2 or len(seeds) != shape[0]:
            raise ValueError(
                f"seeds must hold one seed per row of a 2-D input_ids, got {len(seeds)} seeds for "
                f"input_ids of shape {list(shape)}"
            )
        # three uniforms (select, replace by [MASK], replace by a random word) and a word per position
        draws = [_mask_draws(shape[1:], vocab_size, torch.Generator().manual_seed(int(seed) % 2**63))
                 for seed in seeds]
        if draws:
            uniform, words = torch.stack([d[0] for d in draws], dim=1), torch.stack([d[1] for d in draws])
        else:
            uniform, words = _mask_draws(shape, vocab_size, None)  # no rows: nothing drawn
    else:
        uniform, words = _mask_draws(shape, vocab_size, generator)
    ids = input_ids.cpu()
    special = torch.isin(ids, torch.tensor(list(special_ids), dtype=ids.dtype)) if len(special_ids) else None
    selected = uniform[0] < mlm_probability
    if special is not None:
        selected &= ~special
    # the probabilities in float32, as the uniforms: a ratio rounded up (0.2 / (1 - 0.8) =
    # 1.0000000000000002) still selects every remaining token
    replaced = selected & (uniform[1] < torch.tensor(mask_replace_prob, dtype=torch.float32))
    rest = random_replace_prob / (1.0 - mask_replace_prob) if mask_replace_prob < 1.0 else 0.0
    randomised = selected & ~replaced & (uniform[2] < torch.tensor(rest, dtype=torch.float32))
    labels = ids.masked_fill(~selected, -100)
    inputs = ids.masked_fill(replaced, mask_token_id)
    inputs = torch.where(randomised, words.to(ids.dtype), inputs)
    return inputs.to(input_ids.device), labels.to(input_ids.device)


def _mask_draws(
    shape: tuple[int, ...], vocab_size: int, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    uniform = torch.rand((3, *shape), dtype=torch.float32, generator=generator)
    return uniform, torch.randint(vocab_size, shape, generator=generator)


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        lname = name.lower()
        (no_decay if lname.endswith("bias") or "norm" in lname else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def linear_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int) -> Any:
    """Linear warmup over ``warmup_steps`` (step ``s`` trains at ``(s + 1) / warmup_steps`` of the lr: the
    first step at ``lr / warmup_steps``, not at 0 as transformers' schedule, whose first step is wasted),
    then linear decay to 0 at ``total_steps``."""
    from torch.optim.lr_scheduler import LambdaLR

    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return LambdaLR(optimizer, factor)


def _warmup_steps(warmup: float, total: int) -> int:
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    return int(round(warmup * total)) if warmup < 1 else int(warmup)


# --- accelerate, stopping, metrics ---------------------------------------------------------------------


def _resolve_precision(precision: str, device: str) -> str:
    if precision not in ("auto", "bf16", "fp32", "no"):
        raise ValueError(f"precision must be auto, bf16 or fp32, got {precision!r}")
    if precision == "auto":
        ok = device != "cpu" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return "bf16" if ok else "no"
    return "no" if precision in ("fp32", "no") else "bf16"


def _env_text(name: str) -> str:
    return f"environment variable {name} is {os.environ.get(name, '')!r}"


def _from_launcher(opts: _TrainOptions) -> tuple[dict[str, Any], list[str]]:
    """What ``accelerate launch``'s settings (its ``ACCELERATE_*`` variables) change in ``opts``:
    ``(changed options, lines to print)``.

    A setting whose option was left at its default is honoured, as the option it stands for (so that it is
    recorded with the run's options): ``ACCELERATE_MIXED_PRECISION=bf16`` is ``--precision bf16``,
    ``ACCELERATE_USE_CPU`` is ``--device cpu``, ``ACCELERATE_DYNAMO_BACKEND=inductor`` is ``--compile``. An
    explicit ``--precision`` wins over ``ACCELERATE_MIXED_PRECISION`` (with a warning). Before, accelerate
    read some of them behind the options' back (a compiled model saved with ``_orig_mod.`` keys, optimizer
    steps skipped for an accumulation the loop did not do) and the rest were silently ignored.

    Raises:
        ConfigError: a setting gmlp cannot honour (fp16 or fp8, another compiler back-end or mode, FSDP,
            DeepSpeed or Megatron-LM) or one that contradicts an option (``ACCELERATE_USE_CPU`` with
            ``--device cuda``, ``ACCELERATE_GRADIENT_ACCUMULATION_STEPS`` other than ``--grad-accum``).
    """
    from .distributed import _refuse_engines, accelerate_settings

    env = accelerate_settings()
    _refuse_engines(env, "gmlp pretrain / finetune", " (they train with DDP)")
    changed: dict[str, Any] = {}
    said: list[str] = []
    if env.use_cpu:
        if opts.device == "cuda":
            raise ConfigError(f"{_env_text('ACCELERATE_USE_CPU')} (accelerate launch --cpu) and --device "
                              f"cuda asks for a GPU: give one of them")
        if opts.device == "auto":
            changed["device"] = "cpu"
            said.append("ACCELERATE_USE_CPU=true: --device cpu")
    if env.grad_accum is not None and env.grad_accum != opts.grad_accum:
        raise ConfigError(
            f"{_env_text('ACCELERATE_GRADIENT_ACCUMULATION_STEPS')} but --grad-accum is {opts.grad_accum}: "
            f"give --grad-accum {env.grad_accum} (the micro-batches of each optimizer step) and leave the "
            f"variable out"
        )
    mixed = env.mixed_precision
    if mixed is not None and opts.precision == "auto":
        if mixed in ("fp16", "fp8"):
            raise ConfigError(
                f"{_env_text('ACCELERATE_MIXED_PRECISION')} (accelerate launch --mixed_precision {mixed}, or "
                f"its config file): gmlp pretrain / finetune train in bf16 or fp32 only; launch with "
                f"--mixed_precision bf16 or no, or give --precision bf16 or fp32 (which wins over it)"
            )
        if mixed == "bf16":
            changed["precision"] = "bf16"
            said.append(f"{env.precision_text()}: --precision bf16")
        elif _resolve_precision("auto", changed.get("device", opts.device)) == "bf16":
            said.append(f"{env.precision_text()} (accelerate launch's default) leaves --precision auto's "
                        f"bf16 autocast on; --precision fp32 turns it off")
    elif mixed not in (None, "no") and mixed != _resolve_precision(opts.precision, opts.device):
        # (no: accelerate launch's default, which cannot be told from an asked-for no)
        said.append(f"warning: {env.precision_text()} is ignored: --precision {opts.precision} wins")
    if env.dynamo_backend is not None:
        if env.dynamo_backend != "INDUCTOR":
            unusable = "ACCELERATE_DYNAMO_BACKEND"
        elif env.dynamo_mode not in (None, "default"):
            unusable = "ACCELERATE_DYNAMO_MODE"
        else:
            unusable = env.dynamo_options[0] if env.dynamo_options else ""
        if unusable:
            raise ConfigError(
                f"{_env_text(unusable)} (accelerate launch's --dynamo_* settings, or its config file): gmlp "
                f"pretrain / finetune compile only as --compile does (inductor, default mode, the model in "
                f"place); launch with --dynamo_backend no (or inductor alone) and give --compile"
            )
        if not opts.compile:
            changed["compile"] = True
            said.append(f"{env.dynamo_text()}: --compile")
    return changed, [line if line.startswith("warning:") else f"[gmlp] from accelerate launch: {line}"
                     for line in said]


def _make_accelerator(opts: _TrainOptions) -> Any:
    """The run's :class:`accelerate.Accelerator`, set from ``opts`` (and :func:`_from_launcher`'s changes):
    accelerate's own reading of its ``ACCELERATE_*`` variables is shut out (mixed precision, accumulation
    steps and compilation are passed explicitly).

    Raises:
        ConfigError: a launcher variable that :func:`gmlp.train.distributed.launcher_ranks` or
            :func:`_from_launcher` refuses, or ``LOCAL_RANK`` in one process without ``MASTER_ADDR``.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import GradientAccumulationPlugin

    if opts.device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {opts.device!r}")
    if opts.grad_accum < 1 or opts.batch_size < 1:
        raise ValueError("batch_size and grad_accum must be >= 1")
    from .distributed import launcher_ranks

    # the processes torchrun / accelerate launch started (accelerate defaults MASTER_PORT to 29500 for CPU
    # processes only: a GPU run needs it given)
    cpu_run = opts.device == "cpu" or (opts.device == "auto" and not torch.cuda.is_available())
    launched, _, _ = launcher_ranks(need_port=not cpu_run)
    if launched <= 1 and os.environ.get("LOCAL_RANK", "").strip() and not os.environ.get("MASTER_ADDR"):
        # (accelerate starts a process group wherever LOCAL_RANK is set, and torch failed deep inside)
        raise ConfigError(
            f"{_env_text('LOCAL_RANK')}, so accelerate starts a process group, but MASTER_ADDR is not set: "
            f"launch with torchrun or accelerate launch (which set both), or unset LOCAL_RANK for one process"
        )
    changed = _from_launcher(opts)[0]
    if changed:
        opts = replace(opts, **changed)
    if launched <= 1:
        # Several runs in one process (tests, notebooks) may ask for different precisions: start afresh.
        AcceleratorState._reset_state(reset_partial_state=True)
    # and the gradient-sync state: a Trainer (accelerate < 1.4) leaves its unfinished dataloader there, at its
    # end, so accumulate() synchronised -- and stepped the optimizer -- on every micro-batch (no accumulation)
    GradientState._reset_state()
    accelerator = Accelerator(
        # --device auto is CUDA when there is one, else the CPU (as gmlp train): accelerate only joins the
        # processes of torchrun / accelerate launch on a CPU when told cpu=True, and without it every process
        # trained alone, all writing the same files
        cpu=opts.device == "cpu" or (opts.device == "auto" and not torch.cuda.is_available()),
        mixed_precision=_resolve_precision(opts.precision, opts.device),
        # (a plugin: ACCELERATE_GRADIENT_ACCUMULATION_STEPS overrode a plain gradient_accumulation_steps)
        gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=opts.grad_accum),
        # --compile compiles the model in place; accelerate's torch.compile wrapper
        # (ACCELERATE_DYNAMO_BACKEND) saved the final model with "_orig_mod." keys, which from_pretrained
        # does not load
        dynamo_backend="no",
        step_scheduler_with_optimizer=False,
    )
    if launched > 1 and accelerator.num_processes != launched:
        raise RuntimeError(
            f"the launcher started {launched} processes (WORLD_SIZE={launched}) but accelerate joined "
            f"{accelerator.num_processes}: each process would train alone and write the same files; "
            f"give --device cpu or cuda"
        )
    return accelerator


def _holding_output(run: Callable[[Any, Any], dict[str, Any]]) -> Callable[[Any], dict[str, Any]]:
    """``run(cfg, accelerator)`` holding ``cfg.output`` (process 0 only:
    :func:`gmlp.train.distributed.holding_output`): a second run into the same folder is refused at once,
    instead of both writing it over each other.

    The accelerator (:func:`_make_accelerator`, which joins the processes of a torchrun / accelerate launch
    job into their process group) is made first, so that when process 0 cannot take the folder (in use, a
    file, not writable) every process raises: the refusal is all-reduced, as ``gmlp train`` does. Before, the
    lock came first and the other processes, with no process group yet to hear of it, went on to wait for
    process 0 in the group's rendezvous until the launcher tore them down (or, started without an elastic
    agent, until its timeout: 30 minutes)."""

    @functools.wraps(run)
    def holding(cfg: Any) -> dict[str, Any]:
        cfg.validate()  # (a bad option is refused before the folder is made)
        import transformers  # noqa: F401  (every text run needs it: a missing one is named before accelerate)

        changed, said = _from_launcher(cfg)
        if changed:
            cfg = replace(cfg, **changed)  # (recorded with the run's options)
        accelerator = _make_accelerator(cfg)
        if accelerator.is_main_process:
            for line in said:
                print(line, file=sys.stderr, flush=True)
        from .distributed import holding_output

        def any_refused(refused: bool) -> bool:
            flag = torch.tensor([float(refused)], device=accelerator.device)
            return accelerator.reduce(flag, "sum").item() > 0

        # (a refusal destroys the process group on every process before they raise)
        with holding_output(str(cfg.output), accelerator.is_main_process,
                            any_refused if accelerator.num_processes > 1 else None, destroy_group=True):
            try:
                return run(cfg, accelerator)
            finally:  # (a notebook's process: the data orders of this run, 8 bytes per example each, go)
                _epoch_order.cache_clear()

    # the public signature: (cfg), not the wrapped run's (cfg, accelerator)
    holding.__signature__ = inspect.signature(run).replace(  # type: ignore[attr-defined]
        parameters=list(inspect.signature(run).parameters.values())[:1]
    )
    return holding


def _record_step(record: dict[str, Any], missing: float) -> float:
    """The ``step`` of a metrics record; ``missing`` where it has none (or not a number)."""
    step = record.get("step")
    return step if isinstance(step, (int, float)) and not isinstance(step, bool) else missing


class _MetricsLog:
    """``metrics.jsonl`` and, with a TensorBoard ``writer``, the same records as scalars in
    ``OUTPUT/tensorboard`` (main process only). On resume, records after the checkpoint's step are dropped
    (they are recomputed), and so are test records (written after the last checkpoint, and written again
    when a finished run is resumed), so the file reads as one uninterrupted run. The event files read the
    same: TensorBoard hides their points from the checkpoint's step on (``purge_step``), and the records
    kept at that step are written again.

    A context manager: the writer (a thread and an open file) is closed however the run ends."""

    def __init__(self, path: Path, enabled: bool, resume_step: int | None, tensorboard: bool | None = False
                 ) -> None:
        self.path = path
        self.enabled = enabled
        self.writer: Any = None
        if not enabled:
            if tensorboard:  # (a missing package: every process stops, not process 0 alone)
                from .tensorboard import require_tensorboard

                require_tensorboard()
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        kept: list[tuple[str, dict[str, Any]]] = []
        if resume_step is None:
            path.write_text("")
        elif path.exists():
            kept = [  # (a line that is no record, e.g. one cut short by a kill, is dropped with a warning)
                (line, record) for line, record in read_jsonl_records(path)
                if _record_step(record, 0) <= resume_step and record.get("split") != "test"
            ]
            with atomic_write(path) as tmp:  # (synced, then replaces it; a full disk: the old stays)
                tmp.write_text("".join(k + "\n" for k, _ in kept))
        from .tensorboard import open_writer

        self.writer = open_writer(path.parent / "tensorboard", tensorboard, resume_step)
        try:
            for _, record in kept:
                if _record_step(record, -1) == resume_step:  # (hidden by the purge, and not logged again)
                    self._add(record)
            self.flush()
        except BaseException:
            self.close()
            raise

    def log(self, record: dict[str, Any]) -> None:
        if self.enabled:
            append_line(self.path, json.dumps(record, sort_keys=True))  # (whole, or not at all)
            self._add(record)
            self.flush()

    def _add(self, record: dict[str, Any]) -> None:
        step = record.get("step")
        if self.writer is not None and isinstance(step, int) and not isinstance(step, bool):
            from .tensorboard import add_record

            add_record(self.writer, record, step, str(record.get("split", "metrics")))

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()  # (a live TensorBoard shows each record as metrics.jsonl has it)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def __enter__(self) -> _MetricsLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_KINDS = {"pretrain": "a pretraining", "finetune": "a finetuning", "vision": "a vision (gmlp train)"}


def _run_kind(checkpoint: Path) -> str | None:
    """The kind of run (``pretrain``, ``finetune``, ``vision``) that wrote ``checkpoint``, from its
    state.json (None when it cannot tell)."""
    try:
        state = json.loads((checkpoint / "state.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(state, dict):
        return None
    if state.get("kind") in _KINDS:
        return str(state["kind"])
    return "vision" if "fingerprint" in state else None  # gmlp.train.vision's checkpoints


def _resume_step(checkpoint: Path) -> int:
    """The step of the checkpoint a run resumes from; a :class:`CheckpointError` when its state.json is
    unreadable or names no step."""
    try:
        step = json.loads((checkpoint / "state.json").read_text())["step"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise CheckpointError(
            f"checkpoint {str(checkpoint)!r} is truncated or corrupt: its state.json gives no step ({err!r})"
        ) from err
    if not isinstance(step, int) or step < 0:
        raise CheckpointError(f"checkpoint {str(checkpoint)!r}: its state.json gives step {step!r}")
    return step


def _prepare_output(out: Path, opts: _TrainOptions, accelerator: Any, kind: str) -> Path | None:
    """Create the run folder; return the checkpoint to resume from (or None). Refuses to mix runs, and to
    resume a run of another ``kind`` (before anything is written). A run whose latest checkpoint is
    missing or unreadable is an error that says so (``--overwrite`` discards it)."""
    try:
        ckpt = latest_checkpoint(out)
    except CheckpointError as err:
        if opts.resume or not opts.overwrite:
            raise CheckpointError(f"{err}; pass --overwrite to discard the run in {str(out)!r}") from err
        ckpt = out / "checkpoints"  # (a broken run is still a run to discard)
    # what --overwrite removes without a checkpoint: the rest of a run whose removal was cut short (its
    # latest.json goes first), or whose checkpoints were deleted (looked at before anything is removed);
    # only in a folder that shows a run (its checkpoints/ or metrics), never in one of the user's own
    leftovers = (
        opts.overwrite
        and ((out / "checkpoints").exists() or (out / _METRICS).exists())
        and any((out / name).exists() for name in _RUN_FILES)
    )
    accelerator.wait_for_everyone()  # before --overwrite removes what another process may still be reading
    if ckpt is not None and opts.resume:
        held = _run_kind(ckpt)
        if held is not None and held != kind:
            raise ConfigError(
                f"--output {str(out)!r} holds {_KINDS[held]} run, not {_KINDS[kind]} run: --resume continues "
                f"a run of the same command (give another --output)"
            )
        _resume_step(ckpt)  # an unreadable state.json: a clear error before anything is read
        _check_global_batch(ckpt, opts, accelerator.num_processes)
    if (ckpt is not None or leftovers) and not opts.resume:
        if not opts.overwrite:
            raise ConfigError(
                f"--output {str(out)!r} already holds a run (checkpoint {ckpt.name}); pass --resume to "
                f"continue it or --overwrite to start again"
            )
        _refuse_removing_inputs(out, opts)
        if accelerator.is_main_process:
            # latest.json first: a process killed while the rest goes leaves no checkpoint named
            remove_run_files(out, _RUN_FILES)
        accelerator.wait_for_everyone()
        ckpt = None
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        if ckpt is not None:  # the temporaries of a save that was killed (a finished run saves no more;
            # latest_checkpoint has put back a swapped-out checkpoint it needed)
            for stale in (*ckpt.parent.glob(".step-*.tmp"), *ckpt.parent.glob(".step-*.old"),
                          *(out / name for name in _STALE_DIRS)):
                shutil.rmtree(stale, ignore_errors=True)
            for stale in (*ckpt.parent.glob(".latest.json.*.tmp"), *out.glob(".test_metrics.json.*.tmp")):
                stale.unlink(missing_ok=True)
        if opts.resume and ckpt is None:
            print(f"[gmlp] --resume: no checkpoint in {out}, starting a new run", file=sys.stderr)
    accelerator.wait_for_everyone()
    return ckpt if opts.resume else None


#: The temporaries of a killed run's folder saves (``atomic_dir``, ``_save_config``), removed on resume.
_STALE_DIRS = (".final.tmp", ".final.old", ".tokenizer.tmp", ".tokenizer.old", ".config.tmp")


def _refuse_removing_inputs(out: Path, opts: Any) -> None:
    """Refuse an ``--overwrite`` that would remove one of the run's own inputs (``--tokenizer``,
    ``--model``, ``--init-from`` inside ``--output``'s run files)."""
    doomed = [(out / name).resolve() for name in _RUN_FILES]
    for flag in ("tokenizer", "model", "init_from"):
        given = getattr(opts, flag, None)
        if given and any(Path(given).resolve().is_relative_to(d) for d in doomed):
            raise ConfigError(
                f"--overwrite would delete --{flag.replace('_', '-')} {given!r}, which lies in the run files "
                f"of --output {str(out)!r}: copy it elsewhere or give another --output"
            )


#: What ``--overwrite`` removes of a previous run (in this order).
_RUN_FILES = ("checkpoints/latest.json", "checkpoints", "final", "tokenizer", _METRICS, "config.json",
              "test_metrics.json", "tensorboard")


#: Options that may change between a run and its resumption without changing its result.
_RESUME_FREE = {
    "recipe",  # (where the options came from: the options themselves are compared)
    "resume",
    "overwrite",
    "stop_after_steps",
    "progress",
    "tensorboard",
    "output",
    "log_every",
    "save_every",
    "keep_last",
    "device",
    "eval_batch_size",
    "token_cache",
    "cache_tokens",
}


def _global_batch(options: Mapping[str, Any], world_size: int) -> int:
    return int(options.get("batch_size", 0)) * int(options.get("grad_accum") or 1) * world_size


def _check_global_batch(checkpoint: Path, opts: Any, world_size: int) -> None:
    """Refuse to resume with another global batch (``--batch-size`` x ``--grad-accum`` x processes): step N
    of the run read examples N x G to (N + 1) x G of its data order, so another G repeats or skips examples
    (it was only the generic changed-options warning). The same G otherwise split is continued."""
    try:
        state = json.loads((checkpoint / "state.json").read_text())
    except (OSError, json.JSONDecodeError):
        return
    saved = state.get("options", {})
    if "batch_size" not in saved or "world_size" not in state:  # (a checkpoint that does not say)
        return
    old, new = _global_batch(saved, state["world_size"]), _global_batch(asdict(opts), world_size)
    if old != new:
        raise ConfigError(
            f"cannot resume {str(checkpoint)!r} with a global batch of {new} (--batch-size "
            f"{opts.batch_size} x --grad-accum {opts.grad_accum} x {world_size} process(es)): the run was "
            f"made with {old} (--batch-size {saved['batch_size']} x --grad-accum "
            f"{saved.get('grad_accum') or 1} x {state['world_size']}); step N read examples N x {old} to "
            f"(N + 1) x {old} of its data order, so another global batch would repeat or skip examples; give "
            f"--batch-size and --grad-accum whose product with the number of processes is {old}"
        )


def _warn_changed_options(checkpoint: Path, opts: Any, world_size: int | None = None) -> None:
    """Warn when a resumed run is given options other than those it was started with, or (``world_size``)
    runs on another number of processes (the global batch and the data each step reads change)."""
    try:
        state = json.loads((checkpoint / "state.json").read_text())
    except (OSError, json.JSONDecodeError):
        return
    saved = state.get("options", {})
    now = _jsonable(asdict(opts))
    kept = []
    for name in _kept_on_resume(opts, saved):  # not applied: the run's own (another value is refused)
        if name in saved:
            if now.get(name) is not None and saved[name] != now[name]:  # (a default: left out, or given so)
                kept.append(f"{_flag(name)} {saved[name]}")
            now[name] = saved[name]
    if kept:  # (a flag given at its default value cannot be told from one left out: say what runs)
        print(f"[gmlp] note: the resumed run keeps its own {', '.join(kept)} (its model and tokenizer come "
              f"back from the checkpoint)", file=sys.stderr)
    if now.get("seq_len") is None and "seq_len" in saved:  # left out: the resumed model's own length, which
        now["seq_len"] = saved["seq_len"]  # is the run's (a run saved with the old default 128 says 128)
    # a size left out is the default without a preset, and the preset's with one: runs before the twentieth
    # session saved the defaults (4 / 128 / 768) in either case
    preset = now.get("preset")
    for name, default in NEW_MODEL_SIZES.items():
        for record in (saved, now):
            if name in record and record[name] in (None, default if preset else None):
                record[name] = None if preset else default
    changed = sorted(k for k in saved if k not in _RESUME_FREE and k in now and saved[k] != now[k])
    if world_size is not None and state.get("world_size", world_size) != world_size:
        saved, now = {**saved, "processes": state["world_size"]}, {**now, "processes": world_size}
        changed.append("processes")
    shape = [k for k in ("batch_size", "grad_accum", "processes") if k in changed]
    if shape and world_size is not None and "batch_size" in saved \
            and _global_batch(saved, state.get("world_size", world_size)) == _global_batch(now, world_size):
        # the same global batch otherwise split (checked in _check_global_batch): the same data and masks
        was = " x ".join(f"{k} {saved.get(k, world_size if k == 'processes' else 1)}" for k in shape)
        print(f"[gmlp] note: resuming with {' x '.join(f'{k} {now[k]}' for k in shape)} instead of {was}: "
              f"the same global batch, data and masks; the gradients are summed in another order (last-bit "
              f"differences)", file=sys.stderr)
        changed = [k for k in changed if k not in shape]
    if changed:
        diffs = ", ".join(f"{k}: {saved[k]!r} -> {now[k]!r}" for k in changed)
        print(
            f"[gmlp] warning: resuming with changed options ({diffs}); the result will differ from an "
            f"uninterrupted run",
            file=sys.stderr,
        )


def _arch_name(config: Any) -> str:
    """"amlp" for a gMLP config with tiny attention, "bert-relpos" for an MPNet config, else the config's
    ``model_type`` ("gmlp", "bert")."""
    if _is_relpos(config):
        return "bert-relpos"
    return "amlp" if getattr(config, "tiny_attn_size", None) else config.model_type


def _save_config(config: Any, out: Path) -> None:
    """``config.save_pretrained(out)``, with ``out/config.json`` replaced atomically: a resumed run writes it
    again, and a process killed while writing it in place left an empty file that every later ``--resume``
    failed on."""
    tmp = out / ".config.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        config.save_pretrained(str(tmp))
        os.replace(tmp / "config.json", out / "config.json")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _save_final(accelerator: Any, model: nn.Module, tokenizer: Any, out: Path) -> Path:
    final = out / "final"
    state = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        with atomic_dir(final) as tmp:
            accelerator.unwrap_model(model).save_pretrained(str(tmp), state_dict=state)
            tokenizer.save_pretrained(str(tmp))
    accelerator.wait_for_everyone()
    return final


# --- the shared training loop ----------------------------------------------------------------------------


def _without_ddp(model: nn.Module) -> nn.Module:
    """The module inside a ``DistributedDataParallel`` wrapper (else ``model``), for evaluation: DDP's
    forward broadcasts the buffers (BERT's position ids) from process 0, a collective that a process with no
    evaluation batch (fewer examples than processes) never joined, so the others waited for it for good."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


#: How the commands load a model folder (``--model``, ``--init-from``, a run's own ``config.json``): from
#: the folder alone (nothing is downloaded), and without running the Python files its ``auto_map`` may name
#: (the classes come from the folder's ``model_type``, registered by gmlp or transformers).
_LOCAL_ONLY: dict[str, Any] = {"local_files_only": True, "trust_remote_code": False}


def _kept_checkpoint(step: int | None) -> str:
    """What a run stopped for a non-finite value leaves behind, for its error message."""
    if step is None:
        return "no checkpoint was written"
    return f"the last checkpoint (step {step}) is kept as it was and --resume continues from it"


@dataclass
class _LoopResult:
    model: nn.Module
    step: int
    completed: bool
    last_eval: dict[str, Any]


def _reads_each_step(device: torch.device) -> bool:
    """Whether the training loop reads its non-finite flag back to the host after every optimizer step (on
    the CPU, where that costs nothing) or only where it logs, evaluates or saves (on a GPU, where a
    read-back waits for the device)."""
    return device.type == "cpu"


def _train_loop(
    *,
    accelerator: Any,
    model: nn.Module,
    opts: _TrainOptions,
    total_steps: int,
    micro_batch: Callable[[int, int], dict[str, torch.Tensor]],
    evaluate: Callable[[nn.Module, int], dict[str, Any]],
    eval_due: Callable[[int], bool],
    resume_from: Path | None,
    run_state: dict[str, Any],
    metrics: _MetricsLog,
    desc: str,
    tokens_per_batch: Callable[[dict[str, torch.Tensor]], int] | None = None,
    targets_per_batch: Callable[[dict[str, torch.Tensor]], int] | None = None,
) -> _LoopResult:
    """Run optimizer steps ``[start, total_steps)``; ``micro_batch(step, micro)`` gives this process's
    micro-batch, ``evaluate(model, step)`` the metrics logged when ``eval_due(step)``.

    ``targets_per_batch(batch)`` counts the terms the model's (mean) loss averages over, when micro-batches
    may hold different numbers of them (MLM: the masked tokens): each micro-batch's loss is then weighted
    so that a step's gradient and logged loss are the mean over all of the step's terms (all micro-batches
    and processes), as one large batch gives, not the mean of the micro-batches' means."""
    if opts.grad_checkpointing and not getattr(model, "supports_gradient_checkpointing", True):
        # (transformers' own error came after the data was read, as a traceback)
        raise ConfigError(_NO_CHECKPOINTING.format(name=type(model).__name__, arch=_arch_name(model.config)))
    if opts.grad_checkpointing:
        # recompute each block in backward (activations of about one block); transformers >= 5.x renamed it
        enable = getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)
        enable()
    optimizer = torch.optim.AdamW(
        _param_groups(model, opts.weight_decay),
        lr=opts.lr,
        betas=(opts.adam_beta1, opts.adam_beta2),
        eps=opts.adam_eps,
        fused=fused_adamw(accelerator.device),  # one kernel for the whole update
    )
    warmup_steps = _warmup_steps(opts.warmup, total_steps)
    scheduler = linear_schedule(optimizer, warmup_steps, total_steps)
    if warmup_steps > total_steps and accelerator.is_main_process:  # (as gmlp train warns)
        print(f"warning: --warmup {opts.warmup:g} is {warmup_steps} steps, more than the run's "
              f"{total_steps}: the learning rate never reaches --lr ({opts.lr:g}) and never decays; lower "
              f"--warmup",
              file=sys.stderr, flush=True)
    start = 0
    last_eval: dict[str, Any] = {}
    restored_loss, restored_steps = 0.0, 0
    if resume_from is not None:
        if accelerator.is_main_process:
            _warn_changed_options(resume_from, opts, accelerator.num_processes)
        ckpt = load_checkpoint(resume_from)
        if not isinstance(ckpt.optimizer, dict) or not {"optimizer", "scheduler"} <= ckpt.optimizer.keys():
            raise CheckpointError(
                f"{ckpt.path / 'optimizer.pt'} holds no optimizer and scheduler state: not a checkpoint of "
                f"gmlp pretrain / finetune"
            )
        model.load_state_dict(ckpt.model)
        given = [{k: g[k] for k in ("weight_decay", "betas", "eps")} for g in optimizer.param_groups]
        optimizer.load_state_dict(ckpt.optimizer["optimizer"])
        scheduler.load_state_dict(ckpt.optimizer["scheduler"])
        # the states bring back the run's moments and step count, and also its lr, weight decay, betas and
        # eps, over which a changed --lr (...) that the warning above names was silently lost: the options
        # given now apply from the next step on (unchanged ones give the same values, bit for bit)
        scheduler.base_lrs = [opts.lr] * len(optimizer.param_groups)
        for group, hyper, factor in zip(optimizer.param_groups, given, scheduler.lr_lambdas, strict=True):
            group.update(hyper, initial_lr=opts.lr, lr=opts.lr * factor(scheduler.last_epoch))
        scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
        start = int(ckpt.state["step"])
        last_eval = dict(ckpt.state.get("last_eval", {}))
        # the training-loss window logged next began before the checkpoint (a step not a multiple of
        # --log-every): its record averages over the same steps as an uninterrupted run's
        window = ckpt.state.get("log_window") or {}
        restored_loss, restored_steps = float(window.get("loss_sum", 0.0)), int(window.get("steps", 0))
        if accelerator.is_main_process:
            print(f"[gmlp] resumed from {ckpt.path} (step {start}/{total_steps})", file=sys.stderr)
    model, optimizer = accelerator.prepare(model, optimizer)
    if opts.compile:
        model.compile()  # in place: state_dict keys and checkpoints stay those of the plain model
    model.train()

    def save(step: int) -> None:
        nonlocal last_saved
        check_finite(step)
        # a non-finite gradient in a step whose loss was finite (unclipped: no norm was looked at) leaves
        # non-finite weights that no loss has shown yet: never written over the last good checkpoint
        local = [getattr(p, "to_local", p.detach)().detach() for p in model.parameters()]  # (DTensor shards)
        bad = torch.stack([~torch.isfinite(t).all() for t in local]).any().float()
        if world > 1:
            bad = accelerator.reduce(bad, "sum")
        if bad.item():
            raise FloatingPointError(
                f"the weights are not finite after step {step}/{total_steps} (a non-finite gradient"
                f"{'' if opts.clip_grad else '; --clip-grad is off'}): the run stops without saving them; "
                f"{_kept_checkpoint(last_saved)}; lower --lr ({opts.lr:g})"
            )
        state = accelerator.get_state_dict(model)
        loss_sum = accelerator.reduce(window_loss.clone(), "mean").item()
        if accelerator.is_main_process:
            save_checkpoint(
                opts.output,
                step,
                state,
                {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
                {
                    **run_state,
                    "last_eval": last_eval,
                    "total_steps": total_steps,
                    "log_window": {"loss_sum": loss_sum, "steps": loss_steps},
                    "world_size": accelerator.num_processes,
                },
                keep_last=opts.keep_last,
            )
        accelerator.wait_for_everyone()
        last_saved = step

    def check_finite(done: int) -> None:
        """Stop at the first step whose loss or gradient norm was not finite (``bad_step``, kept on the
        device and read back only here: every step on the CPU, where that costs nothing, else where the run
        logs, evaluates or saves), before anything of that step or later is logged or saved. Once a step: a
        save right after a logged or evaluated step does not read the flag again (it cannot have changed)."""
        nonlocal checked
        if checked == done:
            return
        first = int(bad_step.item())
        if world > 1:  # every process stops together (the gradients are shared: all see it within a step)
            flag = accelerator.reduce(torch.tensor(float(first >= 0), device=accelerator.device), "sum")
            if flag.item() and first < 0:
                raise FloatingPointError(
                    f"another process's training loss or gradient norm was not finite by step {done}/"
                    f"{total_steps}: the run stops without saving; {_kept_checkpoint(last_saved)}"
                )
        if first < 0:
            checked = done
            return
        loss_value, norm_value = (float(v) for v in bad_values.tolist())
        norm = f", gradient norm {norm_value:g}" if opts.clip_grad else ""
        advice = f"lower --lr ({opts.lr:g})" + ("" if opts.clip_grad else " or set --clip-grad (now off)")
        raise FloatingPointError(
            f"the training loss or gradient norm was not finite at step {first}/{total_steps} (loss "
            f"{loss_value:g}{norm}): "
            f"the run stops without saving; {_kept_checkpoint(last_saved)}; {advice}"
        )

    # a tqdm bar on a terminal; in a log file (Slurm, nohup) a line per log interval instead of its redraws;
    # bar.write (the evaluation lines) flushes stdout either way
    bar = progress_bar(total_steps, initial=start, desc=desc,
                       enabled=opts.progress and accelerator.is_main_process)
    rank = accelerator.process_index
    window_loss = torch.full((), restored_loss, device=accelerator.device)
    loss_steps = restored_steps  # the steps in window_loss (the speed counters below: this invocation's)
    window_steps, window_tokens, t0 = 0, 0, time.perf_counter()
    world = accelerator.num_processes
    done = start
    completed = True
    last_saved: int | None = start if resume_from is not None else None
    # the first step (1-based) whose loss or gradient norm was not finite, -1 while none; its loss and norm
    bad_step = torch.full((), -1, dtype=torch.int64, device=accelerator.device)
    bad_values = torch.zeros(2, dtype=torch.float32, device=accelerator.device)
    # (several processes: at the log, evaluation and save steps only, as on a GPU; each read is a collective)
    read_each_step = _reads_each_step(accelerator.device) and accelerator.num_processes == 1
    checked: int | None = None  # the last step check_finite found finite (it reads the flag once a step)
    # Several processes agree on a stop request (a signal may reach one of them only) with an all-reduce, a
    # host sync on a GPU. Where each step all-reduces its target count first (MLM), the request travels in
    # that collective, and one seen there stops the run before the step does anything: the same step as an
    # end-of-step reduce of the step before, one collective and host read a step instead of two.
    folded = targets_per_batch is not None and world > 1
    stopped = False  # a stop request that every process has heard (one process: its own)
    with StopRequest() as stop:
        for step in range(start, total_steps):
            cpu_batches = [micro_batch(step, micro) for micro in range(opts.grad_accum)]
            weights, has_targets = [1.0] * opts.grad_accum, True
            if targets_per_batch is not None:
                counts = [targets_per_batch(b) for b in cpu_batches]
                total = float(sum(counts))
                if folded:
                    both = torch.tensor([total, float(stop.requested)], device=accelerator.device)
                    total, requests = accelerator.reduce(both, "sum").tolist()
                    # asked during step `done` (or before): stop after it, not after this one; a new run first
                    # trains a step, as one process does (no checkpoint of step 0)
                    if requests > 0 and (done > start or last_saved == done):
                        stopped, completed = True, False
                        if last_saved != done:  # (a resumed run stopped before its first step: it stands)
                            with stop.shielded():  # (a second signal: aborts once the checkpoint is written)
                                save(done)
                        break
                # backward() divides by grad_accum and DDP averages over the processes: undo both
                weights = [c * opts.grad_accum * world / total if total else 0.0 for c in counts]
                has_targets = total > 0  # else no loss to log (a mean over nothing)
            step_loss = torch.zeros((), device=accelerator.device)
            grad_norm: Any = None
            for micro, cpu_batch in enumerate(cpu_batches):
                if tokens_per_batch is not None:
                    window_tokens += tokens_per_batch(cpu_batch)
                batch = {k: v.to(accelerator.device, non_blocking=True) for k, v in cpu_batch.items()}
                # (keyed by the micro-batch's place in the global batch: 2 processes draw as 1 process x 2
                # accumulation steps, so a run resumed on another number of processes continues the draws)
                torch.manual_seed(step_seed(opts.seed, "dropout", step, 0, micro * world + rank))
                with accelerator.accumulate(model):
                    loss = model(**batch).loss
                    if weights[micro] == 0.0:  # no targets: a NaN mean, adding nothing (backward still runs)
                        loss = torch.where(torch.isfinite(loss), loss, torch.zeros_like(loss)) * 0.0
                    elif weights[micro] != 1.0:
                        loss = loss * weights[micro]
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and opts.clip_grad:
                        grad_norm = accelerator.clip_grad_norm_(model.parameters(), opts.clip_grad)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                window_loss += loss.detach().float() / opts.grad_accum
                step_loss += loss.detach().float() / opts.grad_accum
            finite = torch.isfinite(step_loss)
            norm = torch.zeros((), device=accelerator.device)
            if isinstance(grad_norm, torch.Tensor):  # (a clipped NaN norm scales every gradient to NaN)
                norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # (FSDP)
                norm = norm.detach().float().to(accelerator.device)
                finite = finite & torch.isfinite(norm)
            first = (bad_step < 0) & ~finite  # on the device: no host sync
            bad_step = torch.where(first, step + 1, bad_step)
            bad_values = torch.where(first, torch.stack([step_loss, norm]), bad_values)
            scheduler.step()
            done = step + 1
            window_steps += 1
            loss_steps += has_targets
            bar.update(1)
            log_due = done % max(1, opts.log_every) == 0 or done == total_steps
            if read_each_step or log_due or eval_due(done):
                check_finite(done)
            if log_due:
                mean_loss = math.nan  # (no step of the window had a target)
                if loss_steps:
                    mean_loss = accelerator.reduce(window_loss, "mean").item() / loss_steps
                elapsed = time.perf_counter() - t0
                record = {
                    "step": done,
                    "split": "train",
                    "loss": mean_loss,
                    "lr": scheduler.get_last_lr()[0],
                    "steps_per_s": window_steps / max(elapsed, 1e-9),
                }
                if tokens_per_batch is not None:
                    record["tokens_per_s"] = window_tokens * accelerator.num_processes / max(elapsed, 1e-9)
                metrics.log(record)
                bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{record['lr']:.2e}")
                window_loss.zero_()
                window_steps, window_tokens, t0 = 0, 0, time.perf_counter()
                loss_steps = 0
            if eval_due(done):
                model.eval()
                with torch.no_grad():
                    try:
                        last_eval = {"step": done, **evaluate(_without_ddp(model), done)}
                    except FloatingPointError as err:  # (finetuning's scores: of the outputs, not a loss)
                        raise FloatingPointError(
                            f"{err} at step {done}/{total_steps}: the run stops without saving; "
                            f"{_kept_checkpoint(last_saved)}; lower --lr ({opts.lr:g})"
                        ) from None
                model.train()
                held_out = last_eval.get("loss")  # (pretraining's; finite weights can still overflow)
                if isinstance(held_out, float) and not math.isfinite(held_out):
                    raise FloatingPointError(
                        f"the validation loss is {held_out} at step {done}/{total_steps} (the model's "
                        f"outputs are not finite): the run stops without saving; "
                        f"{_kept_checkpoint(last_saved)}; lower --lr ({opts.lr:g})"
                    )
                metrics.log(last_eval)
                if accelerator.is_main_process:
                    shown = {k: v for k, v in last_eval.items() if isinstance(v, float)}
                    text = ", ".join(f"{k} {v:.4f}" for k, v in shown.items()) or "nothing to score"
                    bar.write(f"[{desc}] step {done}: {text}")  # (held-out blocks without a masked token)
            limit = opts.stop_after_steps is not None and done - start >= opts.stop_after_steps
            limit = limit and done < total_steps  # (the end: the run finishes)
            if folded and not limit and done < total_steps:
                stop_now = False  # (heard with the next step's target counts, before that step does anything)
            else:  # (folded: a run that stops here learns now if it was also asked to, for its exit status)
                stop_now = stop.requested
                if world > 1:
                    flag = torch.tensor(float(stop_now), device=accelerator.device)
                    stop_now = bool(accelerator.reduce(flag, "sum").item() > 0)
            stopped = stop_now
            if (opts.save_every and done % opts.save_every == 0) or done == total_steps or stop_now or limit:
                with stop.shielded():  # (a second signal: aborts once the checkpoint is written)
                    save(done)
            if stop_now or limit:
                completed = False
                break
        if completed and done == total_steps:  # (a signal during the last save: heard now, on every process)
            late = stop.requested
            if world > 1:
                flag = torch.tensor(float(late), device=accelerator.device)
                late = bool(accelerator.reduce(flag, "sum").item() > 0)
            stopped, completed = late, not late
    bar.close()
    if not completed and stopped:  # (every process: also those that saw no signal)
        if accelerator.is_main_process:  # (one write: a line another process's output cannot split)
            sys.stderr.write(f"[gmlp] stopped at step {done}/{total_steps} with a checkpoint; --resume "
                             f"continues the run\n")
            sys.stderr.flush()
        raise KeyboardInterrupt
    return _LoopResult(model=model, step=done, completed=completed, last_eval=last_eval)


@functools.lru_cache(maxsize=4)
def _epoch_order(seed: int, n: int, epoch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(step_seed(seed, "order", epoch))
    return torch.randperm(n, generator=g)


def _sample_indices(seed: int, n: int, start: int, count: int) -> list[int]:
    """Positions ``start .. start+count`` of the endless stream of per-epoch permutations of ``range(n)``
    (the order of epoch e depends only on ``(seed, e)``)."""
    out: list[int] = []
    for pos in range(start, start + count):
        epoch, k = divmod(pos, n)
        out.append(int(_epoch_order(seed, n, epoch)[k]))
    return out


def _micro_offset(opts: _TrainOptions, accelerator: Any, step: int, micro: int) -> int:
    """The position in the data stream (:func:`_sample_indices`) of this process's micro-batch ``micro`` of
    ``step``: the step reads positions ``[step * G, (step + 1) * G)``, G the global batch, whatever the split
    into processes and micro-batches."""
    world = accelerator.num_processes
    per_step = opts.batch_size * opts.grad_accum * world
    return step * per_step + (micro * world + accelerator.process_index) * opts.batch_size


def _micro_indices(opts: _TrainOptions, accelerator: Any, n: int, step: int, micro: int) -> list[int]:
    offset = _micro_offset(opts, accelerator, step, micro)
    return _sample_indices(opts.seed, n, offset, opts.batch_size)


def _warn_unused_tokenizer_options(opts: _TrainOptions, source: str, accelerator: Any) -> None:
    """Warn (main process) that ``--vocab-size`` / ``--tokenizer-kind`` / ``--tokenizer-sample-chars``
    (:data:`_TOKENIZER_TRAINING`), given other than their defaults, have no effect: the tokenizer is not
    trained but comes from ``source`` (``--tokenizer``, ...)."""
    given = [_flag(n) for n in _given(opts, [n for n in _TOKENIZER_TRAINING if hasattr(opts, n)])]
    verb, pronoun = ("y", "they have") if len(given) > 1 else ("ies", "it has")
    if given and accelerator.is_main_process:
        names = " and ".join(given) if len(given) < 3 else f"{', '.join(given[:-1])} and {given[-1]}"
        print(
            f"[gmlp] warning: {names} only appl{verb} to a tokenizer the command trains; the "
            f"tokenizer comes from {source}, so {pronoun} no effect",
            file=sys.stderr,
        )


def _load_or_train_tokenizer(
    opts: _TrainOptions,
    out: Path,
    texts: Callable[[], Sequence[str]],
    accelerator: Any,
    max_len: int,
    *,
    reuse: bool,
    sample_chars: int | None = None,
    init_from: str | None = None,
) -> Any:
    """``opts.tokenizer`` if given; else ``OUTPUT/tokenizer`` when resuming (``reuse``); else the tokenizer
    of the ``init_from`` model, or one trained on ``texts()``, saved as ``OUTPUT/tokenizer`` (main process;
    the others wait and load it)."""
    from .tokenizer import load_tokenizer, save_tokenizer, train_tokenizer

    if opts.tokenizer:
        _warn_unused_tokenizer_options(opts, "--tokenizer", accelerator)
        return load_tokenizer(opts.tokenizer)
    if init_from and not reuse:
        _warn_unused_tokenizer_options(opts, "--init-from", accelerator)
    tok_dir = out / "tokenizer"

    def make() -> None:
        if reuse and (tok_dir / "tokenizer.json").is_file():
            return
        if init_from:
            tok = load_tokenizer(_init_tokenizer_dir(init_from))
        else:
            corpus = list(texts())
            if sample_chars is not None and sum(map(len, corpus)) > sample_chars:
                corpus = _even_sample(corpus, sample_chars)
            tok = train_tokenizer(
                corpus,
                kind=opts.tokenizer_kind,
                vocab_size=opts.vocab_size,
                model_max_length=max_len,
                length=len(corpus),
            )
        save_tokenizer(tok, tok_dir)

    _main_process_first(accelerator, "the tokenizer", make)
    return load_tokenizer(tok_dir)


def _main_process_first(
    accelerator: Any, what: str, work: Callable[[], Any], share: Callable[[Any], Any] = lambda result: None
) -> tuple[Any, Any]:
    """``work()`` in process 0 while the other processes wait
    (:func:`gmlp.utils.distributed.process_zero_first`, with the text commands' usage errors): ``(result,
    shared)``. ``accelerator.main_process_first()`` left
    the others waiting for process 0 in a barrier, after an error of ``work`` too, until the launcher
    stopped them; and NCCL's collectives time out after 10 minutes, which tokenizing a large corpus outlasts.
    """
    del accelerator  # (the group it started is torch.distributed's default group)
    return process_zero_first(work, what=f"prepare {what}", errors=_USAGE_ERRORS, share=share)


#: Errors of process 0 that the other processes raise as the same type (the CLI prints them as one-line
#: usage errors, exit status 2), instead of a RuntimeError naming them.
_USAGE_ERRORS: dict[str, type[Exception]] = {
    "ConfigError": ConfigError,
    "TextDataError": TextDataError,
    "FileNotFoundError": FileNotFoundError,
    "ConnectionError": ConnectionError,
}


def _even_sample(texts: Sequence[str], max_chars: int) -> list[str]:
    """Evenly spaced documents totalling about ``max_chars`` characters (deterministic)."""
    total = sum(map(len, texts))
    stride = max(1, math.ceil(total / max_chars))
    return list(texts[::stride])


_encode = encode_texts  # (token ids of each text, no special tokens; gmlp.data.token_cache)


def _rows(blocks: np.ndarray, idx: Sequence[int] | range) -> torch.Tensor:
    """Rows ``idx`` of the token blocks (an int64 array in memory, or a read-only int32 memory map of the
    token cache) as a new int64 tensor of their own: the masking writes to its input's copy, never to the
    blocks, and a memory map is read only where its rows are asked for."""
    sliced = isinstance(idx, range) and idx.step == 1  # (a slice: a view, copied below)
    picked = blocks[idx.start : idx.stop] if sliced else blocks[list(idx)]  # type: ignore[union-attr]
    return torch.from_numpy(np.array(picked, dtype=np.int64))


def _pack_blocks(tokenizer: Any, special: dict[str, int], seq_len: int, splits: TextSplits) -> TokenBlocks:
    """The corpus tokenized and packed into ``[CLS] ... [SEP]`` blocks of ``seq_len`` tokens (both splits).

    Raises:
        TextDataError: the training split gives no block.
    """
    ids = {"cls_id": special["cls"], "sep_id": special["sep"], "pad_id": special["pad"]}
    train, _ = pack_sequences(_encode(tokenizer, splits.train), seq_len, **ids)
    valid, _ = pack_sequences(_encode(tokenizer, splits.validation), seq_len, **ids)
    if len(train) == 0:
        raise TextDataError("the training split produced no token blocks (is the corpus empty?)")
    return TokenBlocks(train.numpy(), valid.numpy(), len(splits.train), len(splits.validation))


def _token_blocks(
    cfg: PretrainConfig,
    out: Path,
    tokenizer: Any,
    special: dict[str, int],
    seq_len: int,
    read_corpus: Callable[[], TextSplits],
    accelerator: Any,
) -> TokenBlocks:
    """The packed token blocks of the run, from the token cache (``--token-cache DIR``, default
    ``OUTPUT/cache``; :mod:`gmlp.data.token_cache`) when it holds them, else built (and stored there).

    Process 0 looks the entry up, or builds and writes it, while the others wait; then they map the same
    files (one copy in memory for all). An error of process 0 there is raised in every process. Without
    the cache (``--no-token-cache``, an ``hf:NAME`` hub dataset, or a folder that cannot be written) every
    process builds its own blocks from the corpus.
    """
    if not cfg.cache_tokens:
        return _pack_blocks(tokenizer, special, seq_len, read_corpus())
    cache_dir = Path(cfg.token_cache).expanduser() if cfg.token_cache else out / "cache"

    def look_up_or_build() -> tuple[TokenBlocks | None, str | None]:
        corpus = corpus_fingerprint(cfg.corpus)
        if corpus is None:
            print("[gmlp] token cache off: a corpus with an hf:NAME hub dataset is not cached (local hf: "
                  "folders are)", file=sys.stderr)
            return None, None
        key, inputs = cache_key(
            corpus=corpus, tokenizer=tokenizer, special_ids=special, seq_len=seq_len,
            valid_fraction=cfg.valid_fraction, max_documents=cfg.max_documents, max_chars=cfg.max_chars,
            text_column=cfg.text_column,
        )
        start = time.perf_counter()
        blocks, hit = load_or_build(
            cache_dir, key, lambda: _pack_blocks(tokenizer, special, seq_len, read_corpus()),
            inputs=inputs, prune=cfg.token_cache is None,
        )
        stored = isinstance(blocks.train, np.memmap)  # (else the folder could not be written)
        what = "hit" if hit else f"built in {time.perf_counter() - start:.1f} s"
        where = entry_dir(cache_dir, key)
        print(f"[gmlp] token cache {what}: {where}{'' if stored else ' (kept in memory)'}", file=sys.stderr)
        return blocks, key if stored else None

    done, key = _main_process_first(accelerator, "the token blocks", look_up_or_build, lambda r: r[1])
    if key is None:  # (not cached: every process builds its own; process 0 has them already)
        if accelerator.is_main_process and done[0] is not None:
            return done[0]
        return _pack_blocks(tokenizer, special, seq_len, read_corpus())
    found, why = (done[0] if accelerator.is_main_process else None), "it is not there"
    if found is None:
        try:
            found = read_entry(cache_dir, key, verify=False)  # (process 0 verified it just now)
        except Exception as err:  # (TokenCacheError: e.g. replaced under us)
            why = f"{err}"
    # every process hears whether every one could read it (one that raised alone left the others waiting
    # in their next collective)
    failed = found is None
    if accelerator.num_processes > 1:
        flag = torch.tensor([float(failed)], device=accelerator.device)
        failed = accelerator.reduce(flag, "sum").item() > 0
    if failed:
        who = f"process {accelerator.process_index}" if found is None else "another process"
        raise ConfigError(
            f"{who} cannot read the token cache entry process 0 wrote in {str(cache_dir)!r}"
            f"{f' ({why})' if found is None else ''}: --token-cache must be a folder every process sees (a "
            f"shared file system), or give --no-token-cache"
        )
    return found


def _set_seed_for_init(seed: int) -> None:
    torch.manual_seed(step_seed(seed, "init") % 2**63)


# --- pretraining -----------------------------------------------------------------------------------------


@contextlib.contextmanager
def _restoring_accelerate_state() -> Iterator[None]:
    """On exit, accelerate's process-wide state (``PartialState``, ``AcceleratorState``, ``GradientState``)
    as it was on entry: a run resets and sets it (:func:`_make_accelerator`), after which the caller's own
    ``Accelerator(...)`` with other settings was refused ("AcceleratorState has already been initialized")."""
    def classes() -> tuple[Any, ...]:  # (none before accelerate is imported: its state is then empty)
        module = sys.modules.get("accelerate.state")
        names = ("PartialState", "AcceleratorState", "GradientState")
        return () if module is None else tuple(getattr(module, name) for name in names)

    saved = {cls: dict(cls._shared_state) for cls in classes()}  # (not imported here: the run names a
    try:  # missing package, after its own option checks)
        yield
    finally:
        for cls in classes():
            cls._shared_state.clear()
            cls._shared_state.update(saved.get(cls, {}))


@restoring_process_state()
@_restoring_accelerate_state()
@_holding_output
def pretrain(cfg: PretrainConfig, accelerator: Any) -> dict[str, Any]:
    """Masked-language-model pretraining (BERT protocol, no NSP); see the module docstring.

    The caller's random generators (torch, NumPy, ``random``), torch's thread count and accelerate's state
    are as they were when this returns (the run seeds and sets its own); glibc's allocator stays tuned for
    the rest of the process (:func:`gmlp.utils.malloc.tune_malloc`; ``GMLP_NO_MALLOC_TUNING=1`` opts out).

    Writes ``OUTPUT/tokenizer`` (when one is trained), ``OUTPUT/config.json``, ``OUTPUT/checkpoints``,
    ``OUTPUT/metrics.jsonl`` (its records also as TensorBoard scalars in ``OUTPUT/tensorboard``, see
    ``cfg.tensorboard``) and, at the end, ``OUTPUT/final`` (model and tokenizer, ``save_pretrained``);
    the packed token blocks go to the token cache (``OUTPUT/cache`` or ``cfg.token_cache``; none with
    ``cache_tokens=False``), which a later start with the same corpus, tokenizer and settings reads instead
    of the corpus (:mod:`gmlp.data.token_cache`).

    Returns:
        ``{"step", "completed", "final" (path or None), "validation" (last held-out metrics)}``.

    Raises:
        ConfigError: a bad option (:meth:`PretrainConfig.validate`), before anything is read or written; an
            ``output`` that another run holds, or that is (or is under) a file.
        OSError: an ``output`` that cannot be written (naming it).
    """
    from transformers import AutoConfig, AutoModelForMaskedLM

    with contextlib.suppress(ImportError):
        import gmlp.models.text  # noqa: F401  (Auto-class registration)
    tune_malloc()  # the MLM's logits are far above glibc's mmap threshold (gmlp.utils.malloc)
    out = Path(cfg.output)
    resume_from = _prepare_output(out, cfg, accelerator, "pretrain")
    if resume_from is not None:
        cfg = _with_run_sources(cfg, resume_from, "pretrain", accelerator)

    # read when first needed (once): to train a tokenizer, or to build the token blocks; not at all when a
    # tokenizer is reused and the blocks come from the token cache
    read_corpus = functools.cache(lambda: load_text_splits(
        cfg.corpus,
        valid_fraction=cfg.valid_fraction,
        max_documents=cfg.max_documents,
        max_chars=cfg.max_chars,
        text_column=cfg.text_column,
    ))
    tokenizer = _load_or_train_tokenizer(
        cfg,
        out,
        lambda: read_corpus().train,
        accelerator,
        seq_len_of_new_model(cfg),
        reuse=resume_from is not None,
        sample_chars=cfg.tokenizer_sample_chars,
        init_from=cfg.init_from,
    )
    special = _special_ids(tokenizer)
    if resume_from is not None and (out / "config.json").is_file():
        config = AutoConfig.from_pretrained(str(out), **_LOCAL_ONLY)
        init_from = None
    elif cfg.init_from:
        _check_model_folder("--init-from", cfg.init_from, hub_cache=True)  # --resume without a checkpoint
        config = AutoConfig.from_pretrained(cfg.init_from, **_LOCAL_ONLY)
        init_from = cfg.init_from
    else:
        vocab = cfg.model_vocab_size or len(tokenizer)
        config = build_model_config(cfg, vocab_size=vocab, special_ids=special)
        init_from = None
    check_vocab(tokenizer, config)
    seq_len = _max_len(config, cfg.seq_len)

    blocks = _token_blocks(cfg, out, tokenizer, special, seq_len, read_corpus, accelerator)
    read_corpus.cache_clear()  # the corpus text (about its size again in memory): the run needs the blocks
    train_ids, valid_ids = blocks.train, blocks.validation  # [blocks, seq_len] arrays (maybe memory maps)
    if accelerator.is_main_process:
        print(
            f"[gmlp] pretrain {_arch_name(config)}: {blocks.train_documents} train / "
            f"{blocks.validation_documents} held-out documents -> {len(train_ids)} / {len(valid_ids)} blocks "
            f"of {seq_len} tokens; vocab {len(tokenizer)}",
            file=sys.stderr,
        )

    _set_seed_for_init(cfg.seed)
    if init_from:
        model = AutoModelForMaskedLM.from_pretrained(init_from, **_LOCAL_ONLY)
    else:
        model = AutoModelForMaskedLM.from_config(config)
    model = _prepare_mpnet(model, special["pad"])
    if accelerator.is_main_process:
        _save_config(config, out)
    # the decoder on the masked tokens only (gMLP/aMLP): same loss, most of the decoder's work saved
    sparse = cfg.sparse_prediction and hasattr(model.config, "sparse_prediction")
    if hasattr(model.config, "sparse_prediction"):
        model.config.sparse_prediction = sparse
        # the exact labelled tokens (a static count, for CUDA graphs, would add filler rows to the logits
        # that the evaluation below reads; an initial model may carry one)
        model.config.max_predictions_per_seq = None
    if accelerator.is_main_process:
        where = "the masked tokens only (sparse prediction)" if sparse else "every token"
        adamw = "fused AdamW" if fused_adamw(accelerator.device) else "AdamW"
        print(f"[gmlp] MLM decoder on {where}; {adamw}", file=sys.stderr)
    specials = never_masked_ids(tokenizer)
    vocab_size = len(tokenizer)

    def masked(ids: torch.Tensor, seeds: Sequence[int]) -> dict[str, torch.Tensor]:
        # each sequence masked with a generator of its own seed: the masks do not depend on how a step's
        # sequences are split into processes and micro-batches (2 processes train as 1 with the global batch)
        inputs, labels = mask_tokens(
            ids,
            mask_token_id=special["mask"],
            vocab_size=vocab_size,
            special_ids=specials,
            mlm_probability=cfg.mlm_probability,
            seeds=seeds,
        )
        batch = {"input_ids": inputs, "attention_mask": (ids != special["pad"]).long(), "labels": labels}
        return _with_model_inputs(batch, config)  # (bert-relpos: its positions)

    def micro_batch(step: int, micro: int) -> dict[str, torch.Tensor]:
        offset = _micro_offset(cfg, accelerator, step, micro)  # the sequences' positions in the data stream
        idx = _sample_indices(cfg.seed, len(train_ids), offset, cfg.batch_size)
        seeds = [step_seed(cfg.seed, "mask", offset + j) for j in range(len(idx))]
        return masked(_rows(train_ids, idx), seeds)

    def evaluate(model: nn.Module, step: int) -> dict[str, Any]:
        nll = torch.zeros((), device=accelerator.device, dtype=torch.float64)
        count = torch.zeros((), device=accelerator.device, dtype=torch.float64)
        correct = torch.zeros((), device=accelerator.device, dtype=torch.float64)
        bs = cfg.batch_size
        n_batches = min(cfg.eval_batches, math.ceil(len(valid_ids) / bs))
        for b in range(accelerator.process_index, n_batches, accelerator.num_processes):
            rows = range(b * bs, min((b + 1) * bs, len(valid_ids)))  # fixed masks, whatever the batch size
            batch = masked(
                _rows(valid_ids, rows), [step_seed(cfg.seed, "valid", r) for r in rows]
            )
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            labels = batch["labels"]
            with accelerator.autocast():  # sparse prediction: the logits of the masked tokens only
                logits = model(**batch).logits if sparse else model(**{**batch, "labels": None}).logits
            sel = labels != -100
            if sel.any():
                lg = (logits if sparse else logits[sel]).float()
                nll += F.cross_entropy(lg, labels[sel], reduction="sum").double()
                correct += (lg.argmax(-1) == labels[sel]).sum().double()
                count += sel.sum().double()
        nll, count, correct = (accelerator.reduce(t, "sum") for t in (nll, count, correct))
        if count.item() == 0:
            return {"split": "validation", "masked_tokens": 0}
        loss = (nll / count).item()
        return {
            "split": "validation",
            "loss": loss,
            "perplexity": math.exp(min(loss, 50.0)),
            "masked_accuracy": (correct / count).item(),
            "masked_tokens": int(count.item()),
        }

    has_valid = len(valid_ids) > 0 and cfg.eval_batches > 0
    if not has_valid and accelerator.is_main_process:
        why = "--eval-batches 0" if cfg.eval_batches == 0 else "no held-out blocks"
        print(f"[gmlp] {why}: validation perplexity is skipped", file=sys.stderr)
    metrics = _MetricsLog(
        out / _METRICS,
        accelerator.is_main_process,
        None if resume_from is None else _resume_step(resume_from),
        cfg.tensorboard,
    )
    run_state = {"kind": "pretrain", "options": _jsonable(asdict(cfg)), "model_type": config.model_type}
    with metrics:  # (its TensorBoard writer closed however the run ends: an error, a stop)
        result = _train_loop(
            accelerator=accelerator,
            model=model,
            opts=cfg,
            total_steps=cfg.steps,
            micro_batch=micro_batch,
            evaluate=evaluate,
            eval_due=lambda s: has_valid and ((cfg.eval_every and s % cfg.eval_every == 0) or s == cfg.steps),
            resume_from=resume_from,
            run_state=run_state,
            metrics=metrics,
            desc="pretrain",
            tokens_per_batch=lambda b: int(b["attention_mask"].sum().item()),
            targets_per_batch=lambda b: int((b["labels"] != -100).sum().item()),  # the loss: mean over these
        )
    if sparse:  # the saved model returns dense logits, as a masked LM is expected to
        accelerator.unwrap_model(result.model).config.sparse_prediction = False
    final = _save_final(accelerator, result.model, tokenizer, out) if result.completed else None
    if accelerator.is_main_process and final is not None:
        print(f"[gmlp] saved {final}", file=sys.stderr)
    return {
        "step": result.step,
        "completed": result.completed,
        "final": final,
        "validation": result.last_eval,
        "main_process": accelerator.is_main_process,
    }


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


# --- SQuAD metric ----------------------------------------------------------------------------------------


_PUNCTUATION = frozenset(string.punctuation)


def squad_normalize(text: str) -> str:
    """SQuAD answer normalisation: lower case, no punctuation, no articles (a, an, the), single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def squad_exact_match(prediction: str, gold: str) -> float:
    """1.0 if the normalised strings are equal, else 0.0."""
    return float(squad_normalize(prediction) == squad_normalize(gold))


def squad_f1(prediction: str, gold: str) -> float:
    """Token-level F1 of the normalised strings (an empty answer only matches an empty answer)."""
    pred, ref = squad_normalize(prediction).split(), squad_normalize(gold).split()
    if not pred or not ref:
        return float(pred == ref)
    common = Counter(pred) & Counter(ref)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def squad_metrics(predictions: dict[str, str], references: dict[str, Sequence[str]]) -> dict[str, float]:
    """SQuAD ``exact_match`` and ``f1`` (percent): each prediction scored against its best gold answer;
    a question with no gold answer (v2.0) expects the empty prediction.

    Predictions of questions without a reference are ignored (as by the official script).

    Raises:
        KeyError: a reference question has no prediction.
        TypeError: a question's gold answers are one string instead of a sequence of strings (scored
            as its characters they would give no match), or a prediction or gold answer is not a string.
    """
    if not references:
        return {"exact_match": 0.0, "f1": 0.0, "count": 0}
    em = f1 = 0.0
    for qid, golds in references.items():
        if qid not in predictions:
            raise KeyError(f"no prediction for question {qid!r}")
        if isinstance(golds, str):
            raise TypeError(
                f"the gold answers of question {qid!r} must be a list of strings, got the string {golds!r} "
                f"(pass [{golds!r}])"
            )
        prediction = predictions[qid]
        if not isinstance(prediction, str):
            raise TypeError(f"the prediction of question {qid!r} must be a string, got {prediction!r}")
        for gold in golds:
            if not isinstance(gold, str):
                raise TypeError(
                    f"the gold answers of question {qid!r} must be strings, got {gold!r} (an answer's text, "
                    f"not its (text, answer_start) pair)"
                )
        golds = [g for g in golds if squad_normalize(g)] or [""]
        em += max(squad_exact_match(predictions[qid], g) for g in golds)
        f1 += max(squad_f1(predictions[qid], g) for g in golds)
    n = len(references)
    return {"exact_match": 100.0 * em / n, "f1": 100.0 * f1 / n, "count": n}


def classification_metrics(pred: torch.Tensor, gold: torch.Tensor, num_labels: int) -> dict[str, float]:
    """Accuracy, macro-F1 and the Matthews correlation (``mcc``, GLUE's CoLA metric) of predicted class ids.

    Macro-F1 averages over the classes that occur in ``pred`` or ``gold``. ``mcc`` is Gorodkin's
    multi-class form (for two classes the usual phi coefficient), 0.0 where it is undefined (every
    prediction or every label one class), as scikit-learn reports it.

    Raises:
        ValueError: ``pred`` and ``gold`` are not 1-d of one length, or hold ids outside
            ``[0, num_labels)``.
    """
    if pred.dim() != 1 or gold.shape != pred.shape:
        raise ValueError(
            f"pred and gold must be 1-d class ids of one length, got shapes {tuple(pred.shape)} and "
            f"{tuple(gold.shape)}"
        )
    pred, gold = pred.long(), gold.long()
    for name, t in (("pred", pred), ("gold", gold)):
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= num_labels):
            raise ValueError(
                f"{name} must hold class ids in [0, {num_labels}), got {int(t.min())}..{int(t.max())}"
            )
    n = len(gold)
    if n == 0:
        return {"accuracy": 0.0, "macro_f1": 0.0, "mcc": 0.0}
    confusion = torch.zeros(num_labels, num_labels, dtype=torch.float64)
    confusion.index_put_((gold, pred), torch.ones(n, dtype=torch.float64), accumulate=True)
    tp = confusion.diagonal()
    fp, fn = confusion.sum(0) - tp, confusion.sum(1) - tp
    seen = (tp + fp + fn) > 0
    f1 = (2 * tp / (2 * tp + fp + fn).clamp(min=1))[seen]
    # Gorodkin's R_K: (c s - t.p) / sqrt((s^2 - p.p)(s^2 - t.t)), t and p the true and predicted counts
    t_k, p_k, c, s = confusion.sum(1), confusion.sum(0), float(tp.sum()), float(n)
    denominator = math.sqrt(float((s * s - p_k @ p_k) * (s * s - t_k @ t_k)))
    mcc = float(c * s - t_k @ p_k) / denominator if denominator > 0 else 0.0
    return {"accuracy": c / s, "macro_f1": float(f1.mean()) if len(f1) else 0.0, "mcc": mcc}


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks 1..n of a 1-d tensor in float64, ties given the mean of their ranks (scipy's ``rankdata``)."""
    order = torch.argsort(x, stable=True)
    ranks = torch.empty(len(x), dtype=torch.float64)
    ranks[order] = torch.arange(1, len(x) + 1, dtype=torch.float64)
    values, inverse = torch.unique(x, return_inverse=True)
    sums = torch.zeros(len(values), dtype=torch.float64).index_add_(0, inverse, ranks)
    counts = torch.zeros(len(values), dtype=torch.float64).index_add_(0, inverse, torch.ones_like(ranks))
    return (sums / counts)[inverse]


def _correlation(a: torch.Tensor, b: torch.Tensor) -> float | None:
    """Pearson's r in float64; None where it is undefined (fewer than two values, or one side constant)."""
    if len(a) < 2:
        return None
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    denominator = math.sqrt(float(a @ a) * float(b @ b))
    r = float(a @ b) / denominator if denominator > 0 else math.nan
    return max(-1.0, min(1.0, r)) if math.isfinite(r) else None


def regression_metrics(pred: torch.Tensor, gold: torch.Tensor) -> dict[str, float | None]:
    """Mean squared error and Pearson's and Spearman's correlations (GLUE's STS-B metrics) of 1-d predictions.

    A value is None (null in JSON) where it is undefined: every value without examples, a correlation
    with fewer than two examples, with constant predictions or labels, or with non-finite predictions
    (a diverged model: its ``mse`` is then NaN or inf, as its loss would be).

    Raises:
        ValueError: ``pred`` and ``gold`` are not 1-d of one length, or ``gold`` holds non-finite values.
    """
    if pred.dim() != 1 or gold.shape != pred.shape:
        raise ValueError(
            f"pred and gold must be 1-d of one length, got shapes {tuple(pred.shape)} and {tuple(gold.shape)}"
        )
    bad = int((~torch.isfinite(gold)).sum())
    if bad:
        raise ValueError(f"gold must be finite, got {bad} non-finite values")
    if len(gold) == 0:
        return {"mse": None, "pearson": None, "spearman": None}
    mse = float(((pred.double() - gold.double()) ** 2).mean())
    if not bool(torch.isfinite(pred).all()):
        return {"mse": mse, "pearson": None, "spearman": None}
    pearson, spearman = _correlation(pred, gold), _correlation(_ranks(pred), _ranks(gold))
    return {"mse": mse, "pearson": pearson, "spearman": spearman}


# --- finetuning ------------------------------------------------------------------------------------------


@dataclass
class _QAFeatures:
    """The doc-stride windows of a QA split. Token rows are compact arrays (:func:`_compact_rows`); the
    offsets (for the answers' text) only where the split is scored, not for the training split."""

    input_ids: list[np.ndarray]
    token_type_ids: list[np.ndarray]
    start: list[int]
    end: list[int]
    example_index: list[int]
    offsets: list[list[tuple[int, int] | None]]


#: Examples tokenized per call while features are built: the tokenizer's Python lists of one chunk at a
#: time, not of the whole split (about 190 bytes per token for classification, 410 for QA with offsets).
_ENCODE_CHUNK = 1000


def _compact_rows(ids: Sequence[Sequence[int]], types: Sequence[Sequence[int]] | None) -> dict[str, list]:
    """Token rows as int32 id arrays and int8 token-type arrays (zeros where the tokenizer gives none): 5
    bytes per token, against about 190 for the tokenizer's lists. No attention mask: an unpadded row is all
    real tokens (:func:`_pad_batch` makes the mask)."""
    rows = [np.asarray(r, dtype=np.int32) for r in ids]
    if types is None:
        return {"input_ids": rows, "token_type_ids": [np.zeros(len(r), np.int8) for r in rows]}
    kinds = [np.asarray(t, dtype=np.int8) for t in types]
    return {"input_ids": rows, "token_type_ids": kinds}


def _truncate_question(tokenizer: Any, question: str, max_tokens: int) -> str:
    """``question`` without leading whitespace, cut after its ``max_tokens``-th token, or earlier where the
    cut text tokenizes to more tokens than that (a SentencePiece-style lone "▁" first token spans the first
    character: a one-token cut came back as two, and a question longer than :func:`_check_doc_stride` allows
    for made the tokenizer panic on the stride)."""
    question = question.lstrip()
    enc = tokenizer(question, add_special_tokens=False, return_offsets_mapping=True)
    if len(enc["input_ids"]) <= max_tokens:
        return question
    for keep in range(max_tokens, 0, -1):
        cut = question[: enc["offset_mapping"][keep - 1][1]]
        if len(tokenizer(cut, add_special_tokens=False)["input_ids"]) <= max_tokens:
            return cut
    return ""


def _context_span(context: str, start: int, end: int) -> tuple[int, int]:
    """A context token's characters ``context[start:end]`` without the whitespace around them (a
    SentencePiece-style piece's span starts at the space before its word) and with the combining marks
    that follow them (an accent-stripping normaliser leaves them out: NFD "cafe\u0301" would decode as
    "cafe"), so that a decoded span is the context's text exactly."""
    while start < end and context[start].isspace():
        start += 1
    while end > start and context[end - 1].isspace():
        end -= 1
    while start < end < len(context) and unicodedata.combining(context[end]):
        end += 1
    return start, end


def _qa_features(
    tokenizer: Any, examples: Sequence[Any], max_len: int, stride: int, max_query: int,
    keep_offsets: bool = True,
) -> _QAFeatures:
    """The doc-stride windows of ``examples`` (tokenized :data:`_ENCODE_CHUNK` at a time), their answer
    positions and, with ``keep_offsets``, the character span of each context token."""
    feats = _QAFeatures([], [], [], [], [], [])
    for first in range(0, len(examples), _ENCODE_CHUNK):
        _add_qa_features(feats, tokenizer, examples, first, max_len, stride, max_query, keep_offsets)
    return feats


def _labelled_answer(ex: Any) -> tuple[str, int] | None:
    """The answer a training window is labelled with: the first one with text (an empty or blank answer
    text has no span: it gave a start after the end); None for none.

    Raises:
        TextDataError: its ``answer_start`` does not point at its text in the context (it labelled the tokens
            that happened to be there), naming the question.
    """
    for text, char_start in ex.answers:
        if not text.strip():
            continue
        if char_start < 0 or ex.context[char_start : char_start + len(text)] != text:
            found = ex.context.find(text)
            where = f"it occurs at offset {found}" if found >= 0 else "it does not occur in the context"
            raise TextDataError(
                f"question {ex.id!r}: answer {text!r} is not at offset {char_start} ({where}; answer_start "
                f"counts characters of the context from 0)"
            )
        return text, char_start
    return None


def _add_qa_features(
    feats: _QAFeatures, tokenizer: Any, examples: Sequence[Any], first: int, max_len: int, stride: int,
    max_query: int, keep_offsets: bool,
) -> None:
    """Append to ``feats`` the windows of ``examples[first : first + _ENCODE_CHUNK]``."""
    chunk = examples[first : first + _ENCODE_CHUNK]
    questions = [_truncate_question(tokenizer, e.question, max_query) for e in chunk]
    enc = tokenizer(
        questions,
        [e.context for e in chunk],
        truncation="only_second",
        max_length=max_len,
        stride=stride,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
        padding=False,
    )
    rows = _compact_rows(enc["input_ids"], enc.get("token_type_ids"))
    feats.input_ids += rows["input_ids"]
    feats.token_type_ids += rows["token_type_ids"]
    for i, raw in enumerate(enc["offset_mapping"]):
        ex_i = first + enc["overflow_to_sample_mapping"][i]
        ex = examples[ex_i]
        seq = enc.sequence_ids(i)
        ctx = [k for k, s in enumerate(seq) if s == 1]
        offsets = [_context_span(ex.context, *o) if s == 1 else (0, 0) for o, s in zip(raw, seq, strict=True)]
        start = end = 0  # [CLS]: no answer in this window
        answer = _labelled_answer(ex)
        if answer is not None and ctx:
            text, char_start = answer
            char_end = char_start + len(text)
            if offsets[ctx[0]][0] <= char_start and offsets[ctx[-1]][1] >= char_end:
                start = next(k for k in ctx if offsets[k][1] > char_start)
                end = next(k for k in reversed(ctx) if offsets[k][0] < char_end)
        feats.start.append(start)
        feats.end.append(end)
        feats.example_index.append(ex_i)
        if keep_offsets:
            feats.offsets.append([o if s == 1 else None for o, s in zip(offsets, seq, strict=True)])


def postprocess_qa(
    examples: Sequence[Any],
    example_index: Sequence[int],
    offsets: Sequence[Sequence[tuple[int, int] | None]],
    start_logits: Sequence[Sequence[float]],
    end_logits: Sequence[Sequence[float]],
    *,
    n_best: int = 20,
    max_answer_length: int = 30,
    version_2: bool = False,
    null_threshold: float = 0.0,
) -> dict[str, str]:
    """Answer text per question id from the start/end logits of its features (doc-stride windows).

    The best span (start <= end, length <= ``max_answer_length`` tokens, inside the context, among each
    window's ``n_best`` starts and ends) over all windows of a question is taken, its text the context's own
    characters; a token that two overlapping windows hold may win with its logits from either (as in
    transformers' ``postprocess_qa_predictions``; BERT's reference script takes a start only from the
    window where the token has the most context on both sides). With ``version_2`` the empty answer wins
    when the ``[CLS]`` score (minimum over windows) minus the best span's score exceeds ``null_threshold``:
    the sign of BERT's ``null_score_diff_threshold`` and of transformers' ``postprocess_qa_predictions``,
    so a threshold tuned with either carries over (higher = fewer empty answers).

    Raises:
        ValueError: ``n_best`` or ``max_answer_length`` below 1, a NaN ``null_threshold`` (no comparison
            with it holds: SQuAD v2 would never answer empty), or ``example_index``, ``offsets``,
            ``start_logits`` and ``end_logits`` of different lengths (one entry per feature).
    """
    for name, value in (("n_best", n_best), ("max_answer_length", max_answer_length)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if math.isnan(null_threshold):
        raise ValueError(f"null_threshold must be a number, got {null_threshold}")
    lengths = {
        "example_index": len(example_index),
        "offsets": len(offsets),
        "start_logits": len(start_logits),
        "end_logits": len(end_logits),
    }
    if len(set(lengths.values())) > 1:
        raise ValueError(f"one entry per feature expected, got lengths {lengths}")
    by_example: dict[int, list[int]] = {}
    for f, e in enumerate(example_index):
        by_example.setdefault(e, []).append(f)
    predictions: dict[str, str] = {}
    for e, ex in enumerate(examples):
        best_text, best_score = "", -math.inf
        null_score = math.inf
        for f in by_example.get(e, []):
            s_log, e_log, offs = start_logits[f], end_logits[f], offsets[f]
            null_score = min(null_score, float(s_log[0]) + float(e_log[0]))
            n = min(len(offs), len(s_log))
            starts = sorted(range(n), key=lambda k: -float(s_log[k]))[:n_best]
            ends = sorted(range(n), key=lambda k: -float(e_log[k]))[:n_best]
            for si in starts:
                for ei in ends:
                    if offs[si] is None or offs[ei] is None or ei < si or ei - si + 1 > max_answer_length:
                        continue
                    score = float(s_log[si]) + float(e_log[ei])
                    if score > best_score:
                        best_score = score
                        best_text = ex.context[offs[si][0] : offs[ei][1]]
        if version_2 and null_score - best_score > null_threshold:
            best_text = ""
        predictions[ex.id] = best_text
    return predictions


def _pad_batch(rows: dict[str, Sequence[Sequence[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded int64 tensors of the rows (lists or arrays): ``input_ids`` padded with ``pad_id``, the
    others with 0, and an ``attention_mask`` of the real tokens where ``rows`` has none."""
    lengths = torch.tensor([len(r) for r in rows["input_ids"]])
    n = int(lengths.max())
    out = {}
    for key, seqs in rows.items():
        padded = torch.full((len(seqs), n), pad_id if key == "input_ids" else 0, dtype=torch.long)
        for j, s in enumerate(seqs):
            padded[j, : len(s)] = torch.as_tensor(np.asarray(s, dtype=np.int64))
        out[key] = padded
    if "attention_mask" not in out:
        out["attention_mask"] = (torch.arange(n) < lengths[:, None]).long()
    return out


@restoring_process_state()
@_restoring_accelerate_state()
@_holding_output
def finetune(cfg: FinetuneConfig, accelerator: Any) -> dict[str, Any]:
    """Finetune on sentence (pair) classification / regression or SQuAD-format span QA.

    The model comes from ``cfg.model`` (a folder saved by ``gmlp pretrain`` or any ``save_pretrained``
    folder with its tokenizer; task heads are new) or is built from scratch from the architecture options
    (a tokenizer is then trained on the training texts unless ``cfg.tokenizer`` is given). Dev metrics are
    logged after every epoch, test metrics at the end (also written to ``OUTPUT/test_metrics.json``), to
    ``OUTPUT/metrics.jsonl`` and as TensorBoard scalars to ``OUTPUT/tensorboard`` (see ``cfg.tensorboard``).

    The caller's random generators (torch, NumPy, ``random``), torch's thread count and accelerate's state
    are as they were when this returns (the run seeds and sets its own); glibc's allocator stays tuned for
    the rest of the process (:func:`gmlp.utils.malloc.tune_malloc`; ``GMLP_NO_MALLOC_TUNING=1`` opts out).

    Returns:
        ``{"step", "completed", "final", "validation", "test"}``.

    Raises:
        ConfigError: a bad option (:meth:`FinetuneConfig.validate`), before anything is read or written; an
            ``output`` that another run holds, or that is (or is under) a file.
        OSError: an ``output`` that cannot be written (naming it).
    """
    from transformers import AutoConfig, AutoModelForQuestionAnswering, AutoModelForSequenceClassification

    from ..data.sentiment import load_classification, load_qa

    with contextlib.suppress(ImportError):
        import gmlp.models.text  # noqa: F401  (Auto-class registration)
    qa = cfg.task == "qa"
    tune_malloc()
    out = Path(cfg.output)
    resume_from = _prepare_output(out, cfg, accelerator, "finetune")
    if resume_from is not None:
        cfg = _with_run_sources(cfg, resume_from, "finetune", accelerator)

    if qa:
        data: Any = load_qa(
            cfg.data, train_file=cfg.train_file, validation_file=cfg.validation_file, test_file=cfg.test_file
        )
        train_texts = lambda: [t for e in data.train for t in (e.question, e.context)]  # noqa: E731
        extra: dict[str, Any] = {}
    else:
        data = load_classification(
            cfg.data or "tweets",
            train_file=cfg.train_file,
            validation_file=cfg.validation_file,
            test_file=cfg.test_file,
            text_column=cfg.text_column,
            text_pair_column=cfg.text_pair_column,
            label_column=cfg.label_column,
            num_labels=cfg.num_labels,
        )
        train_texts = lambda: [t for e in data.train for t in (e.text, e.text_pair) if t]  # noqa: E731
        extra = {"num_labels": data.num_labels}
        if data.num_labels == 1:
            extra["problem_type"] = "regression"
        else:
            extra["problem_type"] = "single_label_classification"
            if data.label_names:
                extra["id2label"] = dict(enumerate(data.label_names))
                extra["label2id"] = {n: i for i, n in enumerate(data.label_names)}
    auto = AutoModelForQuestionAnswering if qa else AutoModelForSequenceClassification
    for split, limit in (
        ("train", cfg.max_train_examples),
        ("validation", cfg.max_eval_examples),
        ("test", cfg.max_eval_examples),
    ):
        if limit is not None:
            setattr(data, split, getattr(data, split)[:limit])

    if cfg.model:
        model_dir = Path(cfg.model)  # a save_pretrained folder (FinetuneConfig.validate)
        from .tokenizer import load_tokenizer

        _warn_unused_tokenizer_options(cfg, "--tokenizer" if cfg.tokenizer else "--model", accelerator)
        tokenizer = load_tokenizer(cfg.tokenizer or model_dir)
        config = AutoConfig.from_pretrained(str(model_dir), **_LOCAL_ONLY, **extra)
        for name in (
            "hidden_dropout_prob",
            "attention_probs_dropout_prob",
        ):  # finetuning dropout (paper: 0.1)
            if hasattr(config, name):
                setattr(config, name, cfg.dropout)
        check_vocab(tokenizer, config)
        _set_seed_for_init(cfg.seed)
        model = auto.from_pretrained(str(model_dir), config=config, **_LOCAL_ONLY)
    else:
        tokenizer = _load_or_train_tokenizer(
            cfg, out, train_texts, accelerator, seq_len_of_new_model(cfg), reuse=resume_from is not None
        )
        if resume_from is not None and (out / "config.json").is_file():
            # the run's own model (as pretraining resumes): the size flags need not be given again
            config = AutoConfig.from_pretrained(str(out), **_LOCAL_ONLY, **extra)
        else:
            vocab = cfg.model_vocab_size or len(tokenizer)
            config = build_model_config(cfg, vocab_size=vocab, special_ids=_special_ids(tokenizer), **extra)
        check_vocab(tokenizer, config)
        _set_seed_for_init(cfg.seed)
        model = auto.from_config(config)
    max_len = _max_len(config, cfg.seq_len)
    pad_id = tokenizer.pad_token_id
    model = _prepare_mpnet(model, pad_id)

    # Features.
    if qa:
        given = cfg.doc_stride is not None
        stride = cfg.doc_stride if given else default_doc_stride(max_len, cfg.max_query_length)
        stride, max_query = _check_doc_stride(stride, max_len, cfg.max_query_length, given=given)
        feats = {
            s: _qa_features(
                tokenizer, getattr(data, s), max_len, stride, max_query, keep_offsets=s != "train"
            )
            for s in ("train", "validation", "test")
        }
        n_train = len(feats["train"].input_ids)
    else:

        is_pair = data.is_pair  # (a property that reads the whole training split)

        def encode(examples: Sequence[Any]) -> dict[str, Any]:
            rows: dict[str, list] = {"input_ids": [], "token_type_ids": []}
            for first in range(0, len(examples), _ENCODE_CHUNK):  # (the tokenizer's lists: a chunk's)
                chunk = examples[first : first + _ENCODE_CHUNK]
                pairs = [e.text_pair for e in chunk] if is_pair else None
                enc = tokenizer([e.text for e in chunk], pairs, truncation=True, max_length=max_len)
                for key, values in _compact_rows(enc["input_ids"], enc.get("token_type_ids")).items():
                    rows[key] += values
            return {"rows": rows, "labels": [e.label for e in examples]}

        feats = {s: encode(getattr(data, s)) for s in ("train", "validation", "test")}
        n_train = len(feats["train"]["labels"])
    if n_train == 0:
        raise TextDataError("the training split is empty")

    world = accelerator.num_processes
    steps_per_epoch = max(1, math.ceil(n_train / (cfg.batch_size * cfg.grad_accum * world)))
    total = cfg.steps if cfg.steps else max(1, int(round(cfg.epochs * steps_per_epoch)))
    if accelerator.is_main_process:
        _save_config(config, out)
        print(
            f"[gmlp] finetune {_arch_name(config)} ({cfg.task}): {n_train} training "
            f"{'features' if qa else 'examples'}, {steps_per_epoch} steps/epoch, {total} steps",
            file=sys.stderr,
        )

    def rows_for(split: str, idx: Sequence[int]) -> dict[str, list[np.ndarray]]:
        if qa:
            f = feats[split]
            return {
                "input_ids": [f.input_ids[i] for i in idx],
                "token_type_ids": [f.token_type_ids[i] for i in idx],
            }
        r = feats[split]["rows"]
        return {k: [v[i] for i in idx] for k, v in r.items()}

    def micro_batch(step: int, micro: int) -> dict[str, torch.Tensor]:
        idx = _micro_indices(cfg, accelerator, n_train, step, micro)
        batch = _with_model_inputs(_pad_batch(rows_for("train", idx), pad_id), config)
        if qa:
            batch["start_positions"] = torch.tensor([feats["train"].start[i] for i in idx])
            batch["end_positions"] = torch.tensor([feats["train"].end[i] for i in idx])
        else:
            labels = [feats["train"]["labels"][i] for i in idx]
            batch["labels"] = torch.tensor(labels, dtype=torch.float if data.num_labels == 1 else torch.long)
        return batch

    def predict(model: nn.Module, split: str) -> list[tuple[int, Any]]:
        n = len(feats[split].input_ids) if qa else len(feats[split]["labels"])
        mine = list(range(accelerator.process_index, n, world))
        results: list[tuple[int, Any]] = []
        for b in range(0, len(mine), cfg.eval_batch_size):
            idx = mine[b : b + cfg.eval_batch_size]
            rows = _with_model_inputs(_pad_batch(rows_for(split, idx), pad_id), config)
            batch = {k: v.to(accelerator.device) for k, v in rows.items()}
            with accelerator.autocast():
                output = model(**batch)
            if qa:
                s, e = output.start_logits.float().cpu(), output.end_logits.float().cpu()
                for j, i in enumerate(idx):
                    length = len(feats[split].input_ids[i])
                    results.append((i, (s[j, :length].tolist(), e[j, :length].tolist())))
            else:
                logits = output.logits.float().cpu()
                for j, i in enumerate(idx):
                    results.append((i, logits[j].tolist()))
        if world > 1:
            from accelerate.utils import gather_object

            results = gather_object(results)
        return sorted(results, key=lambda t: t[0])

    def score(model: nn.Module, split: str) -> dict[str, Any]:
        results = predict(model, split)  # (the same on every process)
        values = np.asarray([x for _, r in results for x in (r[0] + r[1] if qa else r)], dtype=np.float64)
        if not np.isfinite(values).all():  # (argmax of NaN logits scored as a class: a plausible accuracy)
            raise FloatingPointError(f"the model's outputs on the {split} split are not finite")
        examples = getattr(data, split)
        if qa:
            f = feats[split]
            preds = postprocess_qa(
                examples,
                f.example_index,
                f.offsets,
                [r[1][0] for r in results],
                [r[1][1] for r in results],
                n_best=cfg.n_best,
                max_answer_length=cfg.max_answer_length,
                version_2=data.version_2,
                null_threshold=cfg.null_threshold,
            )
            refs = {e.id: [a[0] for a in e.answers] for e in examples}
            return {"split": split, **squad_metrics(preds, refs)}
        logits = torch.tensor([r[1] for r in results])
        labels = feats[split]["labels"]
        if data.num_labels == 1:
            gold = torch.tensor(labels, dtype=torch.float)
            return {"split": split, **regression_metrics(logits.view(-1), gold), "count": len(gold)}
        gold = torch.tensor(labels, dtype=torch.long)
        metrics = classification_metrics(logits.argmax(-1), gold, data.num_labels)
        return {"split": split, **metrics, "count": len(gold)}

    def evaluate(model: nn.Module, step: int) -> dict[str, Any]:
        return {"epoch": step / steps_per_epoch, **score(model, "validation")}

    metrics = _MetricsLog(
        out / _METRICS,
        accelerator.is_main_process,
        None if resume_from is None else _resume_step(resume_from),
        cfg.tensorboard,
    )
    run_state = {"kind": "finetune", "options": _jsonable(asdict(cfg)), "model_type": config.model_type}
    with metrics:  # (its TensorBoard writer closed however the run ends: an error, a stop)
        result = _train_loop(
            accelerator=accelerator,
            model=model,
            opts=cfg,
            total_steps=total,
            micro_batch=micro_batch,
            evaluate=evaluate,
            eval_due=lambda s: s % steps_per_epoch == 0 or s == total,
            resume_from=resume_from,
            run_state=run_state,
            metrics=metrics,
            desc=f"finetune-{cfg.task}",
        )
        summary: dict[str, Any] = {
            "step": result.step,
            "completed": result.completed,
            "final": None,
            "validation": result.last_eval,
            "test": None,
            "main_process": accelerator.is_main_process,
        }
        if not result.completed:
            return summary
        summary["final"] = _save_final(accelerator, result.model, tokenizer, out)
        if qa or data.test_has_labels:
            model = _without_ddp(result.model)
            model.eval()
            with torch.no_grad():
                test = {"step": result.step, **score(model, "test")}
            metrics.log(test)
            summary["test"] = test
            if accelerator.is_main_process:
                from .checkpoint import write_json_atomic

                write_json_atomic(out / "test_metrics.json", test)
                shown = {k: round(v, 4) for k, v in test.items() if isinstance(v, float)}
                print(f"[gmlp] test: {shown}", file=sys.stderr)
    return summary


def iter_metrics(path: str | Path) -> Iterator[dict[str, Any]]:
    """Records of a ``metrics.jsonl`` file; a line that is not one (cut short by a killed run) is skipped
    with a warning."""
    for _, record in read_jsonl_records(path, stacklevel=3):
        yield record
