"""Configuration of the gMLP / aMLP language models (Liu et al. 2021, sections 4-5), Hugging Face style.

``GMLPConfig`` is a :class:`transformers.PretrainedConfig` with ``model_type = "gmlp"``. It works with
transformers 4.45+ and 5.x (it uses the classic ``__init__`` form that both accept).
"""

from __future__ import annotations

import difflib
import functools
import inspect
import warnings
from typing import Any

from transformers import PretrainedConfig

from ...nn import VARIANTS

__all__ = ["GMLPConfig", "PRESETS"]

# The problem_type values of transformers' sequence-classification heads (None = inferred from the labels).
_PROBLEM_TYPES = ("regression", "single_label_classification", "multi_label_classification")

#: The paper's language models (Table 5; the ablation model of Tables 3/4). All: vocabulary 32,000,
#: n = 512 tokens, Toeplitz W, input embedding tied to the output layer. ``params`` is the count the spec
#: reproduces from the paper's formula (blocks + tied embedding; heads and final norm add a little).
PRESETS: dict[str, dict[str, Any]] = {
    "gmlp-base": {"num_hidden_layers": 48, "hidden_size": 512, "intermediate_size": 3072, "params": 130.07e6},
    "amlp-base": {
        "num_hidden_layers": 36, "hidden_size": 512, "intermediate_size": 3072, "tiny_attn_size": 64,
        "params": 108.78e6,
    },
    "gmlp-large": {
        "num_hidden_layers": 96, "hidden_size": 768, "intermediate_size": 3072, "params": 365.27e6,
    },
    "amlp-large": {
        "num_hidden_layers": 72, "hidden_size": 768, "intermediate_size": 3072, "tiny_attn_size": 128,
        "params": 315.60e6,
    },
    "gmlp-xlarge": {
        "num_hidden_layers": 144, "hidden_size": 1024, "intermediate_size": 4096, "params": 940.58e6,
    },
    "gmlp-ablation": {
        "num_hidden_layers": 36, "hidden_size": 512, "intermediate_size": 3072, "params": 101.65e6,
    },
}

_PRESET_COMMON: dict[str, Any] = {
    "vocab_size": 32000,
    "max_position_embeddings": 512,
    "toeplitz": True,
    "tie_word_embeddings": True,
}


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _probability(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be a float in [0, 1), got {value!r}")


def _positive_float(name: str, value: Any, allow_zero: bool = False) -> None:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not number or not (value >= 0 if allow_zero else value > 0):
        kind = "non-negative" if allow_zero else "positive"
        raise ValueError(f"{name} must be a {kind} float, got {value!r}")


def _check_problem_type(problem_type: Any) -> None:
    if problem_type is not None and problem_type not in _PROBLEM_TYPES:
        raise ValueError(f"problem_type must be None or one of {list(_PROBLEM_TYPES)}, got {problem_type!r}")


def _check_mixer(
    token_mlp_dim: Any, max_position_embeddings: int, sgu_heads: int, causal: Any, fft_threshold: Any
) -> int:
    """The checks of ``sgu_variant="mixer"``; its resolved token-MLP hidden size."""
    if causal is True:
        raise ValueError(
            "sgu_variant='mixer' cannot be causal (its 2-layer token MLP mixes every token with every "
            "other): use causal=False, or a single-projection variant for a causal model"
        )
    if sgu_heads != 1:
        raise ValueError(f"sgu_heads must be 1 with sgu_variant='mixer' (one token MLP), got {sgu_heads}")
    if fft_threshold is not None:
        raise ValueError(
            f"spatial_fft_threshold (FFT Toeplitz mixing) does not apply to sgu_variant='mixer'; it must be "
            f"None, got {fft_threshold!r}"
        )
    if token_mlp_dim is None:
        return max_position_embeddings
    _positive_int("sgu_token_mlp_dim", token_mlp_dim)
    return token_mlp_dim


# Arguments of BertConfig (and similar configs) that gMLP has no counterpart for: kept as attributes by
# PretrainedConfig, with no effect, so a value that would change a BERT model gets a warning saying why.
# (is_decoder and add_cross_attention are refused instead, see _check_decoder_flags.)
_BERT_ONLY: dict[str, str] = {
    "num_attention_heads": "gMLP has no multi-head attention (aMLP adds one tiny head of tiny_attn_size)",
    "attention_probs_dropout_prob": "gMLP has no attention dropout (hidden_dropout_prob is its dropout)",
    "hidden_act": "the channel activation of a gMLP block is always GELU",
    "position_embedding_type": "gMLP has no position embeddings: position lives in the spatial W",
}
# values of those that describe what gMLP does anyway: no warning
_BERT_SAME = {("hidden_act", "gelu"), ("position_embedding_type", None)}


def _check_decoder_flags(kwargs: dict[str, Any], causal: Any) -> None:
    """Refuse BERT's decoder flags where they would ask for what gMLP does not do: ``is_decoder=True`` makes
    a BERT model causal (here that is ``causal=True``; without it the model would silently see every token),
    ``add_cross_attention=True`` adds cross-attention, which gMLP has not."""
    if kwargs.get("is_decoder") is True and causal is not True:
        raise ValueError(
            "is_decoder=True (BERT's switch to causal attention) is not read by gMLP: use causal=True for "
            "causal token mixing, got is_decoder=True with causal=False"
        )
    if kwargs.get("add_cross_attention") is True:
        raise ValueError(
            "add_cross_attention=True is not supported: gMLP has no cross-attention (it cannot be the "
            "decoder of an EncoderDecoderModel), got add_cross_attention=True"
        )


@functools.cache
def _known_arguments() -> tuple[frozenset[str], tuple[str, ...]]:
    """(the keys transformers' own ``PretrainedConfig`` knows, :class:`GMLPConfig`'s own arguments)."""
    own = tuple(p for p in inspect.signature(GMLPConfig.__init__).parameters if p not in ("self", "kwargs"))
    return frozenset(PretrainedConfig().to_dict()) | {"architectures", "auto_map"}, own


def _warn_near_misses(kwargs: dict[str, Any]) -> None:
    """Warn about a keyword argument that is no argument of :class:`GMLPConfig` nor of transformers'
    ``PretrainedConfig`` but close to one of GMLPConfig's (``hiden_size``): PretrainedConfig keeps unknown
    arguments as attributes, so the typo would silently leave the real argument at its default. Other
    unknown keys (notes, keys of newer versions) are left alone, as transformers does."""
    base, own = _known_arguments()
    for key, value in kwargs.items():
        if key in _BERT_ONLY:
            if (key, value) not in _BERT_SAME:
                warnings.warn(
                    f"GMLPConfig got {key}={value!r}, an argument of BERT that gMLP does not have: "
                    f"{_BERT_ONLY[key]}; it is kept as an attribute, with no effect",
                    UserWarning,
                    stacklevel=3,
                )
            continue
        if key in base or key.startswith("_"):
            continue
        close = difflib.get_close_matches(key, own, n=1, cutoff=0.75)
        close = close or [name for name in own if name.startswith(key + "_")][:1]  # (tiny_attn)
        if close:
            warnings.warn(
                f"GMLPConfig got an unknown argument {key!r} (kept as an attribute, with no effect); did you "
                f"mean {close[0]!r}?",
                UserWarning,
                stacklevel=3,
            )


class GMLPConfig(PretrainedConfig):
    r"""Configuration of :class:`~gmlp.models.text.GMLPModel` and its task heads.

    The defaults are gMLP-base (paper Table 5): 48 blocks, ``d_model`` 512, ``d_ffn`` 3072, n = 512,
    Toeplitz W, 32,000-token vocabulary, tied input/output embedding. Use :meth:`from_preset` for the other
    published sizes.

    Args:
        vocab_size: number of token ids.
        hidden_size: ``d_model``, the width of the residual stream.
        intermediate_size: ``d_ffn``, the width after the channel projection U (must be even for the SGU).
        num_hidden_layers: number of gMLP blocks.
        max_position_embeddings: ``n``, the largest number of tokens; the spatial W is n x n (or 2n-1
            Toeplitz entries) and b has n entries. There are no position embeddings: position lives in W.
        toeplitz: constrain W to be Toeplitz (``W[i, j] = w[i - j]``), as in all of the paper's NLP runs.
            It concerns the single token projection of the ``sgu``/``multiplicative``/``additive``/``linear``
            variants; ``sgu_variant="mixer"`` has no such W and its token MLP is always full (the setting is
            then unused, so that the default True need not be turned off).
        tiny_attn_size: size of the single tiny-attention head (aMLP: 64 for base, 128 for large);
            None = plain gMLP.
        causal: causal token mixing (W masked to its lower triangle, causal tiny attention). Forced on by
            :class:`~gmlp.models.text.GMLPForCausalLM`.
        sgu_variant: gating function, one of :data:`gmlp.nn.VARIANTS` (``"sgu"`` is the paper's choice;
            the others are its Table 3 ablations; ``"mixer"`` is the "MLP-Mixer (2-layer spatial MLP)" row,
            :class:`gmlp.nn.SpatialGatingUnit`, which cannot be causal and takes neither tiny attention,
            ``sgu_heads > 1`` nor ``spatial_fft_threshold``).
        sgu_token_mlp_dim: ``d_tok``, the hidden size of the ``"mixer"`` variant's token MLP (W1 is
            ``d_tok x n``, W2 ``n x d_tok``). None = ``max_position_embeddings`` (stored resolved, so a saved
            config keeps it even where ``max_position_embeddings`` changes, e.g. by
            ``resize_sequence_length``). Must be None for the other variants.
        sgu_heads: number of channel groups of the SGU, each with its own W and b (g-mlp-pytorch's ``heads``);
            it must divide :attr:`gate_dim`, and be 1 for ``"mixer"`` and ``"none"`` (no token mixing).
        hidden_dropout_prob: dropout on the embeddings and on each block's output.
        classifier_dropout: dropout in the sequence-classification head (None = ``hidden_dropout_prob``).
        drop_path_rate: stochastic-depth probability of the blocks.
        drop_path_schedule: ``"uniform"`` (every block) or ``"linear"`` (0 at the first block to the rate at
            the last).
        layer_norm_eps: epsilon of the block pre-norms and of the final LayerNorm.
        sgu_norm_eps: epsilon of the LayerNorm inside the SGU (1e-5 as timm and g-mlp-pytorch).
        initializer_range: std of the normal init of Linear and Embedding weights.
        spatial_init_std: std of the near-zero normal init of W (b starts at 1), see the paper's section 2.
        spatial_fft_threshold: mix tokens by FFT instead of the dense GEMM from this many tokens on
            (Toeplitz W only; causal models always stay dense). None = always dense. On the 2-core CPU it
            pays from ~2,000 tokens in training (benchmarks/RESULTS.md); equal results to float rounding.
        type_vocab_size: number of token types (segments) for sentence pairs; 0 = no token-type embedding.
        tie_word_embeddings: share the input embedding with the output layer (MLM decoder / LM head).
        sparse_prediction: :class:`~gmlp.models.text.GMLPForMaskedLM` given ``labels`` runs its decoder on
            the labelled (masked) tokens only and returns their logits, ``(num_labelled, vocab_size)`` in
            row-major ``(batch, seq)`` order, instead of ``(batch, seq_len, vocab_size)``; the loss and every
            gradient are those of the dense head. It saves most of the decoder's work and the full-vocabulary
            logits' memory in MLM pretraining (ModernBERT's option of the same name). Without ``labels`` the
            logits are always dense.
        max_predictions_per_seq: with ``sparse_prediction``, gather a fixed ``max_predictions_per_seq``
            rows per sequence instead of exactly the labelled ones (BERT's setting of the same name): the
            labelled tokens of each sequence in order, then unlabelled filler rows that the loss ignores.
            The shapes then no longer depend on the labels, so the sparse decoder also runs inside a CUDA
            graph (:class:`~gmlp.train.cuda_graph.CUDAGraphStep`) and under torch.compile without dynamic
            shapes; the logits are ``(batch * min(max_predictions_per_seq, seq_len), vocab_size)``. A
            sequence with more labelled tokens raises a ``ValueError``; where the count cannot be read
            back (during a CUDA graph capture or under torch.compile) such a batch gives a NaN loss
            instead of a silently wrong one. None (default) = the labelled tokens exactly (a
            data-dependent shape).
        pad_token_id, cls_token_id, sep_token_id, mask_token_id, bos_token_id, eos_token_id: special token
            ids, recorded for tokenizers, pipelines and ``generate``; None = not defined. ``eos_token_id``
            may also be a list of ids (several stop tokens for ``generate``), as in transformers' configs.
        **kwargs: the usual :class:`~transformers.PretrainedConfig` arguments (``num_labels``,
            ``id2label``, ``problem_type``, ...). ``num_labels``, where given, must be a positive int
            (transformers would turn ``-2`` into an empty label map); ``problem_type`` must be None or
            one of ``"regression"``, ``"single_label_classification"``, ``"multi_label_classification"``.
            BERT's ``is_decoder=True`` is refused unless ``causal=True`` (use ``causal``; alone it would
            leave the model bidirectional) and ``add_cross_attention=True`` always (gMLP has no
            cross-attention). BERT arguments gMLP has no counterpart for (``num_attention_heads``,
            ``attention_probs_dropout_prob``, ``hidden_act`` other than ``"gelu"``,
            ``position_embedding_type``) are kept as attributes with a warning that they have no effect.

    Raises:
        ValueError: an argument is out of range; the message names it, its value and what is expected.
            Overrides given to ``from_pretrained`` / ``from_dict`` (``GMLPConfig.from_pretrained(path,
            hidden_dropout_prob=0.1)``, ``AutoModel.from_pretrained(path, sgu_heads=2)``) are checked the
            same way.
    """

    model_type = "gmlp"

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 512,
        intermediate_size: int = 3072,
        num_hidden_layers: int = 48,
        max_position_embeddings: int = 512,
        toeplitz: bool = True,
        tiny_attn_size: int | None = None,
        causal: bool = False,
        sgu_variant: str = "sgu",
        sgu_heads: int = 1,
        sgu_token_mlp_dim: int | None = None,
        hidden_dropout_prob: float = 0.0,
        classifier_dropout: float | None = None,
        drop_path_rate: float = 0.0,
        drop_path_schedule: str = "uniform",
        layer_norm_eps: float = 1e-6,
        sgu_norm_eps: float = 1e-5,
        initializer_range: float = 0.02,
        spatial_init_std: float = 1e-6,
        spatial_fft_threshold: int | None = None,
        type_vocab_size: int = 2,
        tie_word_embeddings: bool = True,
        sparse_prediction: bool = False,
        max_predictions_per_seq: int | None = None,
        pad_token_id: int | None = 0,
        cls_token_id: int | None = 2,
        sep_token_id: int | None = 3,
        mask_token_id: int | None = 4,
        bos_token_id: int | None = None,
        eos_token_id: int | list[int] | None = None,
        **kwargs: Any,
    ) -> None:
        _positive_int("vocab_size", vocab_size)
        _positive_int("hidden_size", hidden_size)
        _positive_int("intermediate_size", intermediate_size)
        _positive_int("num_hidden_layers", num_hidden_layers)
        _positive_int("max_position_embeddings", max_position_embeddings)
        _positive_int("sgu_heads", sgu_heads)
        if "num_labels" in kwargs:  # PretrainedConfig derives id2label from it: check before it does
            _positive_int("num_labels", kwargs["num_labels"])
        _check_problem_type(kwargs.get("problem_type"))
        _check_decoder_flags(kwargs, causal)
        _warn_near_misses(kwargs)
        if sgu_variant not in VARIANTS:
            raise ValueError(f"sgu_variant must be one of {sorted(VARIANTS)}, got {sgu_variant!r}")
        if sgu_variant == "sgu" and intermediate_size % 2:
            raise ValueError(
                f"intermediate_size must be even with sgu_variant='sgu' (it is split into two halves), "
                f"got {intermediate_size}"
            )
        if sgu_variant == "none":  # no token mixing: a setting of it would be silently ignored
            if sgu_heads != 1:
                raise ValueError(
                    f"sgu_heads must be 1 with sgu_variant='none' (no token mixing), got {sgu_heads}"
                )
            if spatial_fft_threshold is not None:
                raise ValueError(
                    f"spatial_fft_threshold (FFT Toeplitz mixing) does not apply to sgu_variant='none' (no "
                    f"token mixing); it must be None, got {spatial_fft_threshold!r}"
                )
        gate_dim = intermediate_size // 2 if sgu_variant == "sgu" else intermediate_size
        if sgu_variant != "mixer" and gate_dim % sgu_heads:
            raise ValueError(
                f"sgu_heads must divide the gate width ({gate_dim} channels for intermediate_size="
                f"{intermediate_size}, sgu_variant={sgu_variant!r}), got {sgu_heads}"
            )
        if tiny_attn_size is not None:
            _positive_int("tiny_attn_size", tiny_attn_size)
            if sgu_variant in ("none", "mixer"):
                raise ValueError(
                    f"tiny_attn_size needs a gate to add to; it cannot be used with "
                    f"sgu_variant={sgu_variant!r}"
                )
        if sgu_variant == "mixer":
            sgu_token_mlp_dim = _check_mixer(
                sgu_token_mlp_dim, max_position_embeddings, sgu_heads, causal, spatial_fft_threshold
            )
        elif sgu_token_mlp_dim is not None:
            raise ValueError(
                f"sgu_token_mlp_dim is the hidden size of sgu_variant='mixer' only; it must be None with "
                f"sgu_variant={sgu_variant!r}, got {sgu_token_mlp_dim!r}"
            )
        flags = (
            ("toeplitz", toeplitz), ("causal", causal), ("tie_word_embeddings", tie_word_embeddings),
            ("sparse_prediction", sparse_prediction),
        )  # fmt: skip
        for name, value in flags:
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be a bool, got {value!r}")
        if max_predictions_per_seq is not None:
            _positive_int("max_predictions_per_seq", max_predictions_per_seq)
            if not sparse_prediction:
                raise ValueError(
                    f"max_predictions_per_seq needs sparse_prediction=True, got max_predictions_per_seq="
                    f"{max_predictions_per_seq} with sparse_prediction=False"
                )
        _probability("hidden_dropout_prob", hidden_dropout_prob)
        if classifier_dropout is not None:
            _probability("classifier_dropout", classifier_dropout)
        _probability("drop_path_rate", drop_path_rate)
        if drop_path_schedule not in ("uniform", "linear"):
            raise ValueError(f"drop_path_schedule must be 'uniform' or 'linear', got {drop_path_schedule!r}")
        _positive_float("layer_norm_eps", layer_norm_eps)
        _positive_float("sgu_norm_eps", sgu_norm_eps)
        _positive_float("initializer_range", initializer_range, allow_zero=True)
        _positive_float("spatial_init_std", spatial_init_std, allow_zero=True)
        if spatial_fft_threshold is not None:
            _positive_int("spatial_fft_threshold", spatial_fft_threshold)
            if not toeplitz:
                raise ValueError(
                    f"spatial_fft_threshold (FFT token mixing) needs toeplitz=True, got "
                    f"spatial_fft_threshold={spatial_fft_threshold} with toeplitz=False"
                )
        if isinstance(type_vocab_size, bool) or not isinstance(type_vocab_size, int) or type_vocab_size < 0:
            raise ValueError(
                f"type_vocab_size must be an int >= 0 (0 = no token types), got {type_vocab_size!r}"
            )
        for name, value in (
            ("pad_token_id", pad_token_id), ("cls_token_id", cls_token_id), ("sep_token_id", sep_token_id),
            ("mask_token_id", mask_token_id), ("bos_token_id", bos_token_id), ("eos_token_id", eos_token_id),
        ):
            # eos_token_id may list several stop tokens, as in every transformers config
            several = name == "eos_token_id" and isinstance(value, (list, tuple)) and len(value) > 0
            if value is not None and not all(
                isinstance(v, int) and not isinstance(v, bool) and 0 <= v < vocab_size
                for v in (value if several else [value])
            ):
                kind = "an int or a non-empty list of ints" if name == "eos_token_id" else "an int"
                raise ValueError(
                    f"{name} must be None or {kind} in [0, vocab_size={vocab_size}), got {value!r}"
                )

        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.max_position_embeddings = max_position_embeddings
        self.toeplitz = toeplitz
        self.tiny_attn_size = tiny_attn_size
        self.causal = causal
        self.sgu_variant = sgu_variant
        self.sgu_heads = sgu_heads
        self.sgu_token_mlp_dim = sgu_token_mlp_dim
        self.hidden_dropout_prob = hidden_dropout_prob
        self.classifier_dropout = classifier_dropout
        self.drop_path_rate = drop_path_rate
        self.drop_path_schedule = drop_path_schedule
        self.layer_norm_eps = layer_norm_eps
        self.sgu_norm_eps = sgu_norm_eps
        self.initializer_range = initializer_range
        self.spatial_init_std = spatial_init_std
        self.spatial_fft_threshold = spatial_fft_threshold
        self.type_vocab_size = type_vocab_size
        self.cls_token_id = cls_token_id
        self.sep_token_id = sep_token_id
        self.mask_token_id = mask_token_id
        self.sparse_prediction = sparse_prediction
        self.max_predictions_per_seq = max_predictions_per_seq
        # transformers 4.x sets these from its own keyword arguments (and would overwrite attributes set
        # here: sep_token_id with None), 5.x stores them as extra attributes: passing them on works for both.
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            sep_token_id=sep_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any) -> Any:
        """:meth:`transformers.PretrainedConfig.from_dict`, with the overrides in ``kwargs`` that are
        :class:`GMLPConfig` arguments (or ``problem_type``, ``is_decoder``, ``add_cross_attention``)
        validated like the saved values.

        transformers builds the config from ``config_dict`` and then *sets* the remaining ``kwargs`` as
        attributes, which would skip every check of ``__init__``: here those overrides join
        ``config_dict`` before the config is built (the same result for valid values). Other ``kwargs``
        (``return_unused_kwargs``, model loading options, ...) are handled by transformers as usual.
        A ``num_labels`` override is checked here but left to transformers, which (4.x and 5.x alike)
        rebuilds the label maps from it, also over the saved ones (passed into ``config_dict``, 4.x would
        keep the saved maps instead).
        """
        if "num_labels" in kwargs:  # transformers 4.x sets it as an attribute, unchecked
            _positive_int("num_labels", kwargs["num_labels"])
        own = set(inspect.signature(cls.__init__).parameters) - {"self", "kwargs"}
        own |= {"problem_type", "is_decoder", "add_cross_attention"}  # (BERT's decoder flags: refused)
        overrides = {key: kwargs.pop(key) for key in list(kwargs) if key in own}
        return super().from_dict({**config_dict, **overrides}, **kwargs)

    @property
    def gate_dim(self) -> int:
        """Width of the gate (``d_ffn / 2`` for the SGU, ``d_ffn`` for the other variants)."""
        return self.intermediate_size // 2 if self.sgu_variant == "sgu" else self.intermediate_size

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> GMLPConfig:
        """The configuration of one of the paper's models, optionally with overrides.

        Args:
            name: one of ``gmlp-base``, ``amlp-base``, ``gmlp-large``, ``amlp-large``, ``gmlp-xlarge``,
                ``gmlp-ablation`` (see :data:`PRESETS`).
            **overrides: any :class:`GMLPConfig` argument (``max_position_embeddings=128``,
                ``num_labels=3``, ...).

        Raises:
            ValueError: unknown preset name (the message lists the known ones).
        """
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
        kwargs = {**_PRESET_COMMON, **{k: v for k, v in PRESETS[name].items() if k != "params"}, **overrides}
        return cls(**kwargs)
