"""gMLP / aMLP language models (Liu et al. 2021, sections 4-5) as Hugging Face ``transformers`` models.

Classes: :class:`GMLPModel` (embeddings, blocks, final LayerNorm), :class:`GMLPForMaskedLM`,
:class:`GMLPForSequenceClassification`, :class:`GMLPForQuestionAnswering` and :class:`GMLPForCausalLM`.
They are registered with the ``Auto*`` classes when :mod:`gmlp.models.text` is imported.

Parameter names are flat: ``gmlp.embed``, ``gmlp.token_type_embed``,
``gmlp.blocks.N.{norm,fc1,sgu.norm,sgu.proj,tiny_attn.qkv,tiny_attn.out,fc2}`` (``sgu.mix1``/``sgu.mix2``
instead of ``sgu.proj`` for ``sgu_variant="mixer"``), ``gmlp.norm``, then the head
(``decoder``, ``lm_head``, ``pooler``/``classifier``, ``qa_outputs``).

Layout: inside the stack the activations are token-major ``(seq, batch, dim)`` (see :mod:`gmlp.nn.sgu`);
the model transposes once after the embedding and once at the end, so every output is batch-major.

Padding: ``attention_mask`` (1 = real token, 0 = padding) removes the padded tokens from the sequence.
Real tokens are moved to the front (in order) before the blocks and moved back afterwards, and the blocks
zero padded positions before any token mixing. So the outputs at real tokens are exactly those of the
sequence with its padding deleted, wherever the padding is (right, left or in between) and whatever its
token ids. Outputs at padded positions are unspecified.
"""

from __future__ import annotations

import copy
import inspect
import threading
import warnings
from typing import Any

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from torch.nn import BCEWithLogitsLoss, CrossEntropyLoss, MSELoss
from transformers import PreTrainedModel
from transformers.generation import GenerationMixin
from transformers.modeling_outputs import (
    BaseModelOutput,
    CausalLMOutput,
    MaskedLMOutput,
    QuestionAnsweringModelOutput,
    SequenceClassifierOutput,
    TokenClassifierOutput,
)
from transformers.utils import logging

from ...convert import detect_format, from_g_mlp_pytorch
from ...kernels.cpu_linear import apply_linear
from ...nn import GMLPBlock, TinyAttention, TokenProjection
from ...nn._checks import as_int, capturing, host_checks_enabled
from ...nn._inplace import plain_call
from ...nn.sgu import TokenLinear
from ...utils.io import CheckpointError
from ..vision import drop_path_rates
from .configuration_gmlp import GMLPConfig, _check_problem_type

try:  # transformers 5: init functions that skip weights already loaded by from_pretrained
    from transformers import initialization as _init
except ImportError:  # transformers 4: from_pretrained skips fully loaded modules itself
    _init = nn.init

__all__ = [
    "GMLPForCausalLM",
    "GMLPForMaskedLM",
    "GMLPForQuestionAnswering",
    "GMLPForSequenceClassification",
    "GMLPForTokenClassification",
    "GMLPModel",
    "GMLPPreTrainedModel",
    "from_g_mlp_pytorch_lm",
]

logger = logging.get_logger(__name__)

# transformers 5 declares tied weights as {target: source}; 4.x as a list of the tied (target) keys and ties
# through get_output_embeddings()/get_input_embeddings().
_TRANSFORMERS_V5 = int(transformers.__version__.split(".")[0]) >= 5


# transformers >= 4.46 initialises new embedding rows from the old rows' mean (``mean_resizing``); 4.45 has
# no such argument (its new rows come from ``_init_weights``).
_MEAN_RESIZING = "mean_resizing" in inspect.signature(PreTrainedModel.resize_token_embeddings).parameters


def _tied_keys(target: str) -> dict[str, str] | list[str]:
    return {target: "gmlp.embed.weight"} if _TRANSFORMERS_V5 else [target]


def _describe(value: Any) -> str:
    """Shape and dtype of a tensor (for error messages), else the value's type."""
    return f"{tuple(value.shape)} {value.dtype}" if isinstance(value, torch.Tensor) else type(value).__name__


def _is_integer(dtype: torch.dtype) -> bool:
    """Whether ``dtype`` holds integer ids (bool does not: it holds flags)."""
    return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)


def _check_labels(
    labels: Any,
    shape: tuple[int, ...],
    device: torch.device,
    num_classes: int | None,
    *,
    name: str = "labels",
    layout: str = "(batch, seq_len)",
    classes: str = "vocab_size",
    note: str = "like the input ids (-100 = no prediction)",
) -> torch.Tensor:
    """``labels`` (token, class or position ids) as an int64 tensor of shape ``shape`` on ``device``; a
    clear ``ValueError`` naming ``name`` otherwise.

    Any integer dtype is accepted and cast to int64 (the losses need it); bool, float and complex are
    refused. Where ``shape`` is ``(batch,)``, a ``(batch, 1)`` column is accepted too. With
    ``num_classes``, every label must be in ``[0, num_classes)`` or the ignore index -100; that check reads
    the values back to the host, so (like the ``input_ids`` range check) it is skipped while torch.compile
    traces or a CUDA graph is captured. ``layout`` (``shape`` in words), ``classes`` (the name of
    ``num_classes``) and ``note`` only word the messages.
    """
    tensor = isinstance(labels, torch.Tensor)
    column = tensor and len(shape) == 1 and tuple(labels.shape) == (*shape, 1)
    if not tensor or not _is_integer(labels.dtype) or (tuple(labels.shape) != shape and not column):
        accepted = f"{layout} = {shape}" + (" or (batch, 1)" if len(shape) == 1 else "")
        raise ValueError(
            f"{name} must be an integer tensor of shape {accepted} {note}, got {_describe(labels)}"
        )
    labels = labels.reshape(shape).to(device=device, dtype=torch.long)
    if num_classes is not None and host_checks_enabled(labels):
        bad = (labels != -100) & ((labels < 0) | (labels >= num_classes))
        if bool(bad.any()):
            raise ValueError(
                f"{name} contains {int(labels[bad][0])} outside [0, {classes}={num_classes}) "
                f"(-100, the ignore index, is the only value allowed outside)"
            )
    return labels


def _labels_first(
    labels: Any,
    input_ids: Any,
    inputs_embeds: Any,
    device: torch.device,
    num_classes: int,
    classes: str = "vocab_size",
) -> Any:
    """Token ``labels`` checked (:func:`_check_labels`) before the model runs, against the shape of the
    ids or embeddings, then moved to ``device`` (left where they are if that is the meta device: a head
    whose weight an offloading hook holds elsewhere between calls). The range check runs where the labels
    are: labels still on the CPU are read there (no read-back from the GPU at all), and on a GPU the
    read-back waits for the previous step only, not for this step's forward. Returned unchanged when the
    inputs are not tensors (the model reports those). ``classes`` names ``num_classes`` in the message
    (``num_labels`` for token classification)."""
    source = input_ids if input_ids is not None else inputs_embeds
    if labels is None or not isinstance(source, torch.Tensor) or source.dim() < 2:
        return labels
    where = labels.device if isinstance(labels, torch.Tensor) else device
    checked = _check_labels(labels, tuple(source.shape[:2]), where, num_classes, classes=classes)
    # a head offloaded by accelerate (device_map with "disk" or CPU offload) keeps its weight on the meta
    # device between calls: the labels then stay where they are (the callers move them to the logits)
    return checked if device.type == "meta" else checked.to(device)


def _gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x`` token-major (seq, batch, dim); ``index`` (batch, seq): ``out[i, b] = x[index[b, i], b]``."""
    return torch.gather(x, 0, index.t().unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def _kept_first(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For a bool ``keep`` ``(batch, n)``: ``order`` ``(batch, n)``, each row's kept positions first and then
    the others, each group in its order (what a stable ``argsort(~keep)`` gives), and ``dest``, its inverse
    (where each position moves to: ``order.gather(1, dest)`` is ``arange(n)`` in every row). Made with a
    cumulative sum and one scatter, no sort: exportable to ONNX (which has no stable sort) and cheaper."""
    kept = keep.to(torch.int64)
    before = kept.cumsum(1) - kept  # kept positions before each one
    index = torch.arange(keep.shape[1], device=keep.device).expand_as(before)
    dest = torch.where(keep, before, kept.sum(1, keepdim=True) + index - before)
    return torch.empty_like(dest).scatter_(1, dest, index), dest


def _next_token_targets(labels: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The causal LM's targets ``(batch, seq_len)`` for a padded batch, each row taken with its padding
    deleted, as the model sees it: a real token's target is the label of the next real token (-100 after
    the last one), padded positions get -100 (their outputs are unspecified) and labels at padded positions
    are never targets. So a padded row (right, left or inner padding) has exactly the loss of the same row
    unpadded.
    """
    ignore = torch.full_like(labels[:, :1], -100)
    keep = (attention_mask != 0).to(labels.device)
    order, _ = _kept_first(keep)  # real tokens first, in order
    compact = labels.gather(1, order).masked_fill(~keep.gather(1, order), -100)
    return torch.empty_like(labels).scatter_(1, order, torch.cat([compact[:, 1:], ignore], dim=1))


def _select_predictions(
    hidden: torch.Tensor, labels: torch.Tensor, per_seq: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The static-shape sparse prediction of ``GMLPConfig.max_predictions_per_seq``: from ``hidden``
    ``(batch, seq, dim)`` and ``labels`` ``(batch, seq)``, ``k = min(per_seq, seq)`` rows per sequence, its
    labelled tokens first in order and then unlabelled ones (label -100, ignored by the loss), as
    ``(batch * k, dim)`` and ``(batch * k,)``.

    The third value is None where the labelled counts were checked on the host (a ``ValueError`` if a
    sequence has more than ``per_seq``); during a CUDA graph capture or under torch.compile, where no value
    may be read back, it is a bool tensor that is True if labelled tokens were left out.
    """
    k = min(per_seq, labels.shape[1])
    keep = labels != -100
    order = _kept_first(keep)[0][:, :k]  # each row's labelled positions first, in order
    picked = hidden.gather(1, order.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
    picked_labels = labels.gather(1, order)
    counts = keep.sum(dim=1)
    overflow = None
    if host_checks_enabled(labels):
        worst, most = torch.stack([counts.argmax(), counts.max()]).tolist()  # (one host read-back)
        if most > k:
            raise ValueError(
                f"labels: sequence {worst} has {most} labelled tokens (labels != -100), more "
                f"than max_predictions_per_seq={per_seq} of the config allows; raise it or label fewer tokens"
            )
    else:
        overflow = (counts > k).any()
    return picked.reshape(-1, hidden.shape[-1]), picked_labels.reshape(-1), overflow


def _attention_probs(module: TinyAttention, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The attention probabilities ``(batch, 1, seq, seq)`` that ``module`` (a block's tiny attention) uses
    on its input ``x`` (token-major ``(seq, batch, dim)``) and ``mask`` (``(batch, seq)`` bool or None):
    ``softmax(q k^T / sqrt(attn_dim))`` with the masks of :class:`gmlp.nn.TinyAttention` (padded keys never
    attended to, no later key when causal, every query always attends to itself)."""
    n = x.shape[0]
    if mask is not None:
        x = x.masked_fill(~mask.t().unsqueeze(-1), 0.0)
    # apply_linear: the product TinyAttention computes; a wrapped or hooked qkv (a LoRA layer, accelerate's
    # offloading hook, whose weight is on the meta device between calls) is called, not read
    q, k, _ = apply_linear(module.qkv, x).transpose(0, 1).chunk(3, dim=-1)  # each (batch, seq, attn)
    scores = (q @ k.transpose(1, 2)) / module.attn_dim**0.5
    allowed = torch.ones(n, n, dtype=torch.bool, device=x.device)
    if module.causal:
        allowed = allowed.tril()
    if mask is not None:
        i = torch.arange(n, device=x.device)  # (not a bool torch.eye: onnxruntime has no bool EyeLike)
        allowed = (allowed & mask[:, None, :]) | (i[:, None] == i[None, :])
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores.float(), dim=-1).to(scores.dtype).unsqueeze(1)


def _check_position_ids(position_ids: Any, attention_mask: Any, shape: tuple[int, int]) -> None:
    """Accept ``position_ids`` only where they say what the model does anyway; a ``ValueError`` otherwise.

    gMLP has no position embeddings: a token's position is its place in its row with the padding deleted
    (``attention_mask.cumsum(-1) - 1`` at real tokens, as ``generate()`` computes them; ``0 .. seq_len - 1``
    without a mask). Other positions, such as packed rows whose positions restart inside a row
    (``DataCollatorWithFlattening``), cannot be honoured and would otherwise be mixed silently into one
    sequence. ``shape`` is the input's ``(batch, seq_len)``; ``(1, seq_len)`` position ids are broadcast.
    The values are not read while torch.compile traces or a CUDA graph is captured.
    """
    if position_ids is None:
        return
    batch, n = shape
    try:
        fits = isinstance(position_ids, torch.Tensor) and torch.broadcast_shapes(
            position_ids.shape, (batch, n)
        ) == (batch, n)
    except RuntimeError:
        fits = False
    if not fits or not _is_integer(position_ids.dtype) or position_ids.dim() != 2:
        raise ValueError(
            f"position_ids must be an integer tensor of shape (batch, seq_len) = ({batch}, {n}) or "
            f"(1, {n}), got {_describe(position_ids)}"
        )
    if not host_checks_enabled(position_ids):
        return
    positions = position_ids.expand(batch, n)
    if attention_mask is None:
        real = torch.ones(batch, n, dtype=torch.bool, device=positions.device)
    else:
        real = (attention_mask != 0).to(positions.device)
    implied = real.long().cumsum(dim=1) - 1
    wrong = (positions != implied) & real
    if bool(wrong.any()):
        row, col = (int(i) for i in wrong.nonzero()[0])
        raise ValueError(
            f"position_ids[{row}, {col}] is {int(positions[row, col])}, but that token is at position "
            f"{int(implied[row, col])} of its sequence (padding deleted). gMLP has no position embeddings (a "
            f"token's position is its place in the row), so position_ids can only repeat those positions; "
            f"packed sequences (positions restarting inside a row, as DataCollatorWithFlattening makes) "
            f"are not supported: pad the batch and pass attention_mask instead"
        )


def _check_no_cache(
    past_key_values: Any, cache_position: Any, n: int, *, name: str = "past_key_values"
) -> None:
    """Accept the cache arguments of transformers' causal LMs only where they change nothing; a
    ``ValueError`` otherwise.

    :class:`GMLPForCausalLM` has no key/value cache: it always reads the whole sequence in ``input_ids``. A
    ``past_key_values`` that holds tokens (a cache of an earlier call, with ``input_ids`` the new tokens only)
    would be dropped silently and the new tokens read as a sequence of their own; so only None or an empty
    cache (``get_seq_length() == 0``, or an empty tuple) is accepted. ``cache_position`` likewise: only the
    positions of a cache-free call, ``0 .. seq_len - 1`` (``n`` = seq_len), are accepted; the values are not
    read while torch.compile traces or a CUDA graph is captured. ``name`` words the message (``cache``: the
    same argument under another name).
    """
    if past_key_values is not None:
        what = type(past_key_values).__name__
        if hasattr(past_key_values, "get_seq_length"):
            held = int(past_key_values.get_seq_length())
            what += f" holding {held} tokens"
        elif isinstance(past_key_values, (tuple, list)):  # (the legacy form: one entry per layer)
            held = len(past_key_values)
            what += f" of {held} layers"
        else:
            held = -1
        if held != 0:
            raise ValueError(
                f"{name} must be None (or an empty cache): GMLPForCausalLM has no key/value cache and "
                f"always reads the whole sequence, so pass every token so far as input_ids instead; got "
                f"{what}"
            )
    if cache_position is None:
        return
    expected = f"the positions 0 .. seq_len - 1 = 0 .. {n - 1} of a call without a cache"
    if (
        not isinstance(cache_position, torch.Tensor) or cache_position.dim() != 1
        or not _is_integer(cache_position.dtype) or cache_position.shape[0] != n
    ):
        raise ValueError(f"cache_position must be None or {expected}, got {_describe(cache_position)}")
    if host_checks_enabled(cache_position):
        arange = torch.arange(n, device=cache_position.device)
        if not torch.equal(cache_position.to(arange.dtype), arange):
            raise ValueError(
                f"cache_position must be None or {expected} (GMLPForCausalLM has no key/value cache: pass "
                f"every token so far as input_ids), got {cache_position.tolist()}"
            )


def _keep_positions(logits: torch.Tensor, logits_to_keep: Any) -> torch.Tensor:
    """transformers' ``logits_to_keep`` applied to ``logits`` (or hidden states) ``(batch, seq_len, ...)``:
    0 = every position, an int k = the last k positions, a 1-D integer tensor = those positions."""
    if isinstance(logits_to_keep, torch.Tensor) and logits_to_keep.dim() == 1 and _is_integer(
        logits_to_keep.dtype
    ):
        return logits[:, logits_to_keep.to(logits.device)]
    keep = None if isinstance(logits_to_keep, torch.Tensor) else as_int(logits_to_keep)  # numpy ints too
    if keep is None or keep < 0:
        raise ValueError(
            "logits_to_keep must be an int >= 0 (0 = all positions, k = the last k) or a 1-D integer tensor "
            f"of positions, got {logits_to_keep!r}"
        )
    return logits if keep == 0 else logits[:, -keep:]


def _token_loss(logits: torch.Tensor, targets: torch.Tensor, num_items_in_batch: Any) -> torch.Tensor:
    """Cross-entropy of ``logits`` ``(N, classes)`` against ``targets`` ``(N,)`` (-100 = ignored): the mean
    over the targets, or with ``num_items_in_batch`` (what ``Trainer`` counts over all the micro-batches of
    one optimizer step, as for transformers' own language models) their sum divided by it, so that
    gradient accumulation gives the gradient of the whole batch however the targets fall in micro-batches.

    Raises:
        ValueError: ``num_items_in_batch`` is neither None, a positive number nor a tensor.
    """
    if num_items_in_batch is None:
        return F.cross_entropy(logits, targets)
    if isinstance(num_items_in_batch, torch.Tensor):
        num_items_in_batch = num_items_in_batch.to(logits.device)
    elif isinstance(num_items_in_batch, bool) or not isinstance(num_items_in_batch, (int, float)) or (
        num_items_in_batch <= 0
    ):
        raise ValueError(
            "num_items_in_batch must be None, a positive number or a tensor (Trainer's count of the targets "
            f"of one optimizer step), got {num_items_in_batch!r}"
        )
    return F.cross_entropy(logits, targets, reduction="sum") / num_items_in_batch


def _head_dropout(config: GMLPConfig) -> nn.Dropout:
    """The dropout of a classification head: ``config.classifier_dropout``, else ``hidden_dropout_prob``
    (as BERT's heads)."""
    p = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
    return nn.Dropout(p)


class GMLPPreTrainedModel(PreTrainedModel):
    """Base class of the gMLP text models: config class, weight init, sequence-length resizing."""

    config_class = GMLPConfig
    base_model_prefix = "gmlp"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["GMLPBlock"]
    # The per-example losses (sequence classification, QA) are means over the batch, which Trainer scales for
    # gradient accumulation itself. The per-token heads (masked LM, causal LM, token classification) set
    # this to True: they take Trainer's num_items_in_batch, as transformers' own language models do.
    accepts_loss_kwargs = False

    def _init_weights(self, module: nn.Module) -> None:
        """Linear/Embedding weights ~ N(0, initializer_range), biases 0; LayerNorm 1/0; spatial W ~
        N(0, spatial_init_std) and b = 1 (:meth:`gmlp.nn.TokenProjection.reset_parameters`); the
        ``"mixer"`` token MLP's layers as :class:`gmlp.nn.SpatialGatingUnit` documents."""
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            _init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                _init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            _init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.LayerNorm):
            _init.ones_(module.weight)
            _init.zeros_(module.bias)
        elif isinstance(module, (TokenProjection, TokenLinear)):
            # Under from_pretrained (transformers 5) torch's init functions are guarded, so this re-draws
            # only weights that were missing from the checkpoint.
            module.reset_parameters()

    def _set_gradient_checkpointing(self, *args: Any, **kwargs: Any) -> None:
        """transformers' switch, plus its ``every_n_layers`` (transformers 5's
        ``activation_checkpointing_enable(every_n_layers=k)``): only blocks 0, k, 2k, ... are checkpointed,
        as transformers does for its own decoder layers (the blocks of :class:`GMLPModel` are not
        transformers layers, so without this the setting would be ignored and every block checkpointed).

        Raises:
            ValueError: ``every_n_layers`` is not a positive int.
        """
        every = kwargs.get("every_n_layers", 1)
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every_n_layers must be a positive int, got {every!r}")
        super()._set_gradient_checkpointing(*args, **kwargs)
        for module in self.modules():
            if isinstance(module, GMLPModel):
                module.checkpoint_every_n_layers = every

    def resize_token_embeddings(
        self,
        new_num_tokens: int | None = None,
        pad_to_multiple_of: int | None = None,
        mean_resizing: bool = True,
    ) -> nn.Embedding:
        """transformers' ``resize_token_embeddings`` (the input embedding, the tied or untied output layer and
        its bias, ``config.vocab_size``), refusing a vocabulary that would leave one of the config's special
        token ids outside it: the saved config would then fail to load (and ``generate``, pipelines and
        collators would use an id the model cannot embed). ``mean_resizing`` is ignored on transformers
        4.45, which has no such option.

        Raises:
            ValueError: ``pad_token_id``, ``cls_token_id``, ``sep_token_id``, ``mask_token_id``,
                ``bos_token_id`` or an ``eos_token_id`` is >= the new size; set it first (to None or a
                smaller id).
        """
        size = as_int(new_num_tokens) if new_num_tokens is not None else None
        multiple = as_int(pad_to_multiple_of) if pad_to_multiple_of is not None else None
        if size is not None and size > 0 and (pad_to_multiple_of is None or (multiple and multiple > 0)):
            if multiple:
                size = -(-size // multiple) * multiple
            for name in ("pad_token_id", "cls_token_id", "sep_token_id", "mask_token_id", "bos_token_id",
                         "eos_token_id"):  # fmt: skip
                value = getattr(self.config, name, None)
                for token in value if isinstance(value, (list, tuple)) else [value]:
                    if isinstance(token, int) and token >= size:
                        raise ValueError(
                            f"resize_token_embeddings to {size} tokens would leave config.{name}={value!r} "
                            f"outside the vocabulary [0, {size}); set config.{name} to None or a smaller id "
                            f"first"
                        )
        extra = {"mean_resizing": mean_resizing} if _MEAN_RESIZING else {}  # (transformers 4.45: none)
        return super().resize_token_embeddings(new_num_tokens, pad_to_multiple_of, **extra)

    def resize_sequence_length(self, new_len: int) -> None:
        """Cut a model built for ``n = max_position_embeddings`` tokens to ``new_len = m <= n`` tokens.

        Each spatial projection keeps exactly what an ``m``-token input uses: a Toeplitz W keeps the
        offsets ``-(m-1) .. m-1`` (its central ``2m - 1`` entries), a full W its leading ``m x m`` block,
        and b keeps ``b[:m]``; the ``"mixer"`` token MLP keeps ``W1[:, :m]``, ``W2[:m]`` and ``b2[:m]`` (its
        hidden size ``sgu_token_mlp_dim`` is unchanged). So the resized model gives the same outputs as the
        original on every input of at most ``m`` tokens, with a smaller W (``2m - 1`` instead of ``2n - 1``
        entries, or ``m x m`` instead of ``n x n``). ``config.max_position_embeddings`` becomes ``m``.

        The parameters are replaced by new tensors: build the optimizer after resizing.

        Raises:
            ValueError: ``new_len`` is not an int in ``[1, max_position_embeddings]``.
        """
        n = self.config.max_position_embeddings
        if isinstance(new_len, bool) or not isinstance(new_len, int) or not 1 <= new_len <= n:
            raise ValueError(
                f"new_len must be an int in [1, max_position_embeddings={n}] (only shortening is supported), "
                f"got {new_len!r}"
            )
        base = getattr(self, self.base_model_prefix, self)
        m = new_len
        for block in base.blocks:
            proj = block.sgu.proj
            mix1, mix2 = getattr(block.sgu, "mix1", None), getattr(block.sgu, "mix2", None)
            if mix1 is not None and mix2 is not None:  # (sgu_variant "mixer")
                with torch.no_grad():
                    cuts = ((mix1, mix1.weight[:, :m], mix1.bias), (mix2, mix2.weight[:m], mix2.bias[:m]))
                    for layer, w, b in cuts:
                        grad_w, grad_b = layer.weight.requires_grad, layer.bias.requires_grad
                        layer.weight = nn.Parameter(w.contiguous().clone(), requires_grad=grad_w)
                        layer.bias = nn.Parameter(b.contiguous().clone(), requires_grad=grad_b)
                mix1.in_features = mix2.out_features = m
            if proj is not None:
                with torch.no_grad():
                    w = proj.weight[..., n - m : n + m - 1] if proj.toeplitz else proj.weight[..., :m, :m]
                    b = proj.bias[..., :m]
                    grad_w, grad_b = proj.weight.requires_grad, proj.bias.requires_grad
                    proj.weight = nn.Parameter(w.contiguous().clone(), requires_grad=grad_w)
                    proj.bias = nn.Parameter(b.contiguous().clone(), requires_grad=grad_b)
                proj.seq_len = m
            block.sgu.seq_len = m
            block.seq_len = m
        self.config.max_position_embeddings = m


class GMLPModel(GMLPPreTrainedModel):
    """The bare gMLP encoder (or causal decoder): embeddings, gMLP blocks, final LayerNorm.

    Word embedding ``embed`` plus an optional token-type embedding ``token_type_embed`` (no position
    embeddings: position is carried by the spatial W), dropout, ``num_hidden_layers``
    :class:`gmlp.nn.GMLPBlock` and a final LayerNorm. See the module docstring for how ``attention_mask``
    is applied.
    """

    def __init__(self, config: GMLPConfig) -> None:
        super().__init__(config)
        d = config.hidden_size
        self.embed = nn.Embedding(config.vocab_size, d)
        types = config.type_vocab_size
        self.token_type_embed = nn.Embedding(types, d) if types > 0 else None
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.blocks = nn.ModuleList(
            GMLPBlock(
                d, config.intermediate_size, config.max_position_embeddings,
                variant=config.sgu_variant, causal=config.causal,
                # (toeplitz concerns the single projection W: "mixer" has none)
                toeplitz=config.toeplitz and config.sgu_variant not in ("mixer", "none"),
                token_mlp_dim=getattr(config, "sgu_token_mlp_dim", None),
                heads=config.sgu_heads, attn_dim=config.tiny_attn_size, drop_path=p,
                dropout=config.hidden_dropout_prob, norm_eps=config.layer_norm_eps,
                sgu_norm_eps=config.sgu_norm_eps, init_std=config.spatial_init_std,
                fft_threshold=getattr(config, "spatial_fft_threshold", None),
            )
            for p in drop_path_rates(
                config.drop_path_rate, config.num_hidden_layers, config.drop_path_schedule
            )
        )
        self.norm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.gradient_checkpointing = False
        self.checkpoint_every_n_layers = 1  # checkpoint blocks 0, k, 2k, ... (transformers 5)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed = value

    # -- input checks --------------------------------------------------------------------------------
    def _check_inputs(
        self,
        input_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        token_type_ids: torch.Tensor | None,
        inputs_embeds: torch.Tensor | None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, tuple[bool, bool] | None]:
        """Validate the inputs; return ``(input_ids, token_type_ids, mask, layout)``: the ids of an integer
        dtype that ``nn.Embedding`` does not take (uint8, int8, int16, ...) or bool token types cast to
        int64, ``mask`` bool or None, and ``layout`` ``(all real, a real token after a pad)`` of ``mask``,
        read back with the value checks (one host read-back for all of them), or None where it was not
        read (no mask, or the values may not be read: torch.compile, CUDA graph capture)."""
        cfg = self.config
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if input_ids is not None:
            if (
                not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2
                or not _is_integer(input_ids.dtype)
            ):
                raise ValueError(
                    "input_ids must be an integer tensor of shape (batch, seq_len), "
                    f"got {_describe(input_ids)}"
                )
            if input_ids.dtype not in (torch.int32, torch.int64):
                input_ids = input_ids.long()
            batch, n = input_ids.shape
        else:
            if not isinstance(inputs_embeds, torch.Tensor) or inputs_embeds.dim() != 3 or (
                inputs_embeds.shape[-1] != cfg.hidden_size
            ):
                raise ValueError(
                    f"inputs_embeds must have shape (batch, seq_len, hidden_size={cfg.hidden_size}), "
                    f"got {_describe(inputs_embeds)}"
                )
            dtype, kind = self.embed.weight.dtype, inputs_embeds.device.type
            if inputs_embeds.dtype != dtype and not (  # under autocast its dtype is fine too
                torch.amp.is_autocast_available(kind) and torch.is_autocast_enabled(kind)
                and inputs_embeds.dtype == torch.get_autocast_dtype(kind)
            ):
                raise ValueError(
                    f"inputs_embeds has dtype {inputs_embeds.dtype}, but the model's parameters are {dtype}; "
                    f"convert one of them (inputs_embeds.to({dtype}) or model.to({inputs_embeds.dtype}))"
                )
            batch, n = inputs_embeds.shape[:2]
        if n == 0:
            raise ValueError("the input has sequence length 0; at least one token is needed")
        if n > cfg.max_position_embeddings:
            raise ValueError(
                f"the input has sequence length {n}, longer than max_position_embeddings="
                f"{cfg.max_position_embeddings} (the size of the spatial W); truncate the input "
                f"(tokenizer(..., truncation=True, max_length={cfg.max_position_embeddings}))"
            )
        checking = host_checks_enabled(input_ids if input_ids is not None else inputs_embeds)
        if attention_mask is not None and (
            not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != (batch, n)
        ):
            raise ValueError(
                f"attention_mask must have shape (batch, seq_len) = ({batch}, {n}) like the input, "
                f"got {_describe(attention_mask)}"
            )
        mask = None if attention_mask is None else attention_mask != 0
        types_ok = token_type_ids is None or (
            isinstance(token_type_ids, torch.Tensor) and tuple(token_type_ids.shape) == (batch, n)
            and not (token_type_ids.dtype.is_floating_point or token_type_ids.dtype.is_complex)
        )
        if token_type_ids is not None and types_ok and token_type_ids.dtype not in (torch.int32, torch.int64):
            token_type_ids = token_type_ids.long()
        layout = None
        if checking:  # the value checks and the mask's layout, read back to the host once
            bad_ids = None if input_ids is None else (input_ids < 0) | (input_ids >= cfg.vocab_size)
            # (any mask value but 0 would else count as a real token: a packed batch's segment ids 1, 2, ...
            # would silently be mixed into one sequence)
            bad_mask = None
            if attention_mask is not None and attention_mask.dtype != torch.bool:
                bad_mask = (attention_mask != 0) & (attention_mask != 1)
            types = cfg.type_vocab_size
            bad_types = None
            if token_type_ids is not None and types_ok:
                bad_types = (token_type_ids < 0) | (token_type_ids >= max(types, 1))
            flags = {name: b.any() for name, b in (("ids", bad_ids), ("mask", bad_mask), ("types", bad_types))
                     if b is not None}
            if mask is not None and host_checks_enabled(mask):  # (what forward() looks at to skip work)
                flags["all_real"] = mask.all()
                flags["inner"] = (mask[:, 1:] & ~mask[:, :-1]).any()
            read = {}
            if flags:
                device = next(iter(flags.values())).device
                values = torch.stack([f.to(device) for f in flags.values()]).tolist()
                read = dict(zip(flags, values, strict=True))
            if read.get("ids"):
                raise ValueError(
                    f"input_ids contains token id {int(input_ids[bad_ids][0])} outside "
                    f"[0, vocab_size={cfg.vocab_size})"
                )
            if read.get("mask"):
                raise ValueError(
                    f"attention_mask must hold 0 (padding) and 1 (real token) only, got "
                    f"{attention_mask[bad_mask][0].item()!r}; a float mask with other values (an additive "
                    f"bias?) or the segment ids of packed sequences (1, 2, ...) are not supported"
                )
            if read.get("types"):
                raise ValueError(
                    f"token_type_ids contains type {int(token_type_ids[bad_types][0])} outside [0, "
                    f"type_vocab_size={types})" + (" (the model has no token types)" if types == 0 else "")
                )
            if "all_real" in read:
                layout = (bool(read["all_real"]), bool(read["inner"]))
        if not types_ok:
            raise ValueError(
                f"token_type_ids must be an integer or bool tensor of shape (batch, seq_len) = "
                f"({batch}, {n}), got {_describe(token_type_ids)}"
            )
        return input_ids, token_type_ids, mask, layout

    # -- forward -------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        output_attentions: bool | None = None,
    ) -> BaseModelOutput | tuple[torch.Tensor, ...]:
        """Encode a batch.

        Args:
            input_ids: ``(batch, seq_len)`` token ids in ``[0, vocab_size)``,
                ``seq_len <= max_position_embeddings``; any integer dtype (uint8, int16, ... are cast to
                int64).
            attention_mask: ``(batch, seq_len)``, 1 = real token, 0 = padding (bool, or int or float holding
                0 and 1 only: other values are refused, not read as "real token").
            token_type_ids: ``(batch, seq_len)`` segment ids in ``[0, type_vocab_size)``, of any integer
                dtype or bool; None = all 0.
            inputs_embeds: ``(batch, seq_len, hidden_size)`` instead of ``input_ids``, of the dtype of the
                model's parameters (or, under ``torch.autocast``, of the autocast dtype); no silent cast.
            output_hidden_states: also return the input of every block and the final output
                (``num_hidden_layers + 1`` tensors; the last one is ``last_hidden_state``).
            return_dict: return a :class:`~transformers.modeling_outputs.BaseModelOutput` (default) or a
                tuple ``(last_hidden_state, hidden_states, attentions)`` without the ones not asked for.
            output_attentions: also return the attention probabilities of the tiny attention of aMLP
                (``tiny_attn_size`` set): one ``(batch, 1, seq_len, seq_len)`` tensor per block (one head),
                query by key, in the input's positions. Padded keys get probability 0; rows of padded queries
                are unspecified. None = ``config.output_attentions``.

        Returns:
            ``last_hidden_state`` ``(batch, seq_len, hidden_size)`` after the final LayerNorm.

        Raises:
            ValueError: bad shapes or dtypes (float ids, ``inputs_embeds`` of another dtype than the model),
                token or type ids out of range, sequence longer than ``max_position_embeddings``, an
                ``attention_mask`` with values other than 0 and 1, ``output_attentions`` for a gMLP without
                tiny attention (it has no attention maps).
        """
        cfg = self.config
        if output_hidden_states is None:
            output_hidden_states = cfg.output_hidden_states
        return_dict = return_dict if return_dict is not None else cfg.return_dict
        def has_maps() -> bool:  # (asked only when maps are wanted: no per-call loop over the blocks)
            return any(block.tiny_attn is not None for block in self.blocks)

        if output_attentions is None:  # the config's flag: a gMLP has no maps to give (as before it was read)
            output_attentions = bool(getattr(cfg, "output_attentions", False)) and has_maps()
        attentions: list[torch.Tensor] | None = None
        if output_attentions:
            if not has_maps():
                raise ValueError(
                    "output_attentions=True needs the tiny attention of aMLP (config.tiny_attn_size set): a "
                    "gMLP without it has no attention maps to return"
                )
            attentions = []
        input_ids, token_type_ids, mask, layout = self._check_inputs(
            input_ids, attention_mask, token_type_ids, inputs_embeds
        )

        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        if self.token_type_embed is not None:
            if token_type_ids is None:  # type 0 everywhere, broadcast over (batch, seq)
                if plain_call(self.token_type_embed, nn.Embedding):
                    x = x + self.token_type_embed.weight[0]
                else:  # called, not read: accelerate's offloading hooks bring the weight in (from disk, say)
                    # for a call only, and a wrapper (a LoRA layer) acts on calls
                    zero = torch.zeros((1, 1), dtype=torch.long, device=x.device)
                    x = x + self.token_type_embed(zero).to(x.device)
            else:
                x = x + self.token_type_embed(token_type_ids)
        x = self.dropout(x)
        h = x.transpose(0, 1).contiguous()  # token-major (seq, batch, dim) through the whole stack

        inverse = None
        if mask is not None:
            # Eager mode looks at the mask (read back with the input checks) to skip work; torch.compile and
            # CUDA graph capture always take the general path, which needs no data-dependent branch.
            eager = host_checks_enabled(mask)
            all_real, inner = layout if layout is not None else (eager and bool(mask.all()), None)
            if eager and all_real:
                mask = None
            elif not eager or (inner if inner is not None else bool((mask[:, 1:] & ~mask[:, :-1]).any())):
                # A real token after a pad (left or inner padding): move the real tokens to the front, in
                # order, so that each keeps the position it has in the unpadded sequence.
                order, inverse = _kept_first(mask)
                mask = torch.gather(mask, 1, order)
                h = _gather_tokens(h, order)

        # (.to: a device_map over several GPUs leaves the last blocks' outputs on another device than the
        # embedding's, where the index is; a no-op otherwise)
        def to_batch_major(t: torch.Tensor) -> torch.Tensor:
            if inverse is not None:
                t = _gather_tokens(t, inverse.to(t.device))
            return t.transpose(0, 1).contiguous()

        def record_map(module: TinyAttention, x: torch.Tensor, block_mask: torch.Tensor | None) -> None:
            probs = _attention_probs(module, x, block_mask)
            if inverse is not None:  # back to the input's positions, queries and keys
                back = inverse.to(probs.device)[:, None, :, None].expand_as(probs)
                probs = probs.gather(2, back).gather(3, back.transpose(2, 3))
            attentions.append(probs)

        # Eager mode reads each tiny attention's input as the block passes it, with a forward hook (this call
        # only). torch.compile cannot trace a hook's registration (a graph break; an error with
        # fullgraph=True): there the maps are computed from block.norm(h), which is what the block's tiny
        # attention sees while compiling (no fused pre-norm kernel then).
        compiling = torch.compiler.is_compiling()
        hooks = []
        if attentions is not None and not compiling:
            # The modules are shared: a call in another thread (a server's thread pool, nn.DataParallel's
            # replicas) fires these hooks too, also while torch adds or removes them (then before it records
            # that they take keyword arguments: (module, args, output)): only this call's maps are kept.
            caller = threading.get_ident()

            def record(module: TinyAttention, args: tuple[Any, ...], *rest: Any) -> None:
                if threading.get_ident() == caller:  # (here always with the keyword arguments)
                    record_map(module, args[0], args[1] if len(args) > 1 else rest[0].get("mask"))

            hooks = [
                block.tiny_attn.register_forward_hook(record, with_kwargs=True)
                for block in self.blocks
                if block.tiny_attn is not None
            ]
        hidden_states: tuple[torch.Tensor, ...] | None = () if output_hidden_states else None
        checkpointing = self.gradient_checkpointing and self.training
        try:
            for index, block in enumerate(self.blocks):
                if hidden_states is not None:
                    hidden_states += (to_batch_major(h),)
                if attentions is not None and compiling and block.tiny_attn is not None:
                    record_map(block.tiny_attn, block.norm(h), mask)
                if checkpointing and index % self.checkpoint_every_n_layers == 0:
                    h = self._gradient_checkpointing_func(block.__call__, h, mask)
                else:
                    h = block(h, mask)
        finally:
            for hook in hooks:
                hook.remove()
        h = to_batch_major(self.norm(h))
        if hidden_states is not None:
            hidden_states += (h,)
        maps = tuple(attentions) if attentions is not None else None
        if not return_dict:
            return tuple(t for t in (h, hidden_states, maps) if t is not None)
        return BaseModelOutput(last_hidden_state=h, hidden_states=hidden_states, attentions=maps)


def _as_tuple(output: Any, return_dict: bool) -> Any:
    return output if return_dict else output.to_tuple()


class GMLPForMaskedLM(GMLPPreTrainedModel):
    """gMLP with the masked-language-modelling head of the paper: final hidden states -> ``decoder``
    (Linear with bias, weight tied to the input embedding when ``tie_word_embeddings``)."""

    _tied_weights_keys = _tied_keys("decoder.weight")
    accepts_loss_kwargs = True  # Trainer passes num_items_in_batch (exact gradient accumulation)

    def __init__(self, config: GMLPConfig) -> None:
        super().__init__(config)
        if config.causal:
            logger.warning("GMLPForMaskedLM built with causal=True: each token only sees earlier tokens")
        self.gmlp = GMLPModel(config)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size)
        self.post_init()

    def get_output_embeddings(self) -> nn.Linear:
        return self.decoder

    def set_output_embeddings(self, new_embeddings: nn.Linear) -> None:
        self.decoder = new_embeddings

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        output_attentions: bool | None = None,
        num_items_in_batch: int | torch.Tensor | None = None,
    ) -> MaskedLMOutput | tuple[torch.Tensor, ...]:
        """Logits ``(batch, seq_len, vocab_size)``; with ``labels`` (``(batch, seq_len)``, -100 = not
        predicted) also the mean cross-entropy over the predicted tokens. With ``config.sparse_prediction``
        and ``labels``, the logits are those of the predicted tokens only, ``(num_predicted, vocab_size)``
        in row-major ``(batch, seq)`` order (``logits_dense[labels != -100]``), the loss unchanged; while a
        CUDA graph is captured (:class:`gmlp.train.cuda_graph.CUDAGraphStep`) the logits stay dense. With
        ``config.max_predictions_per_seq`` also set, ``max_predictions_per_seq`` rows per sequence
        (``(batch * min(max_predictions_per_seq, seq_len), vocab_size)``: its labelled tokens in order,
        then filler rows), on every path, CUDA graphs included. Other arguments: :meth:`GMLPModel.forward`.

        ``labels`` of any integer dtype are cast to int64. Labels at padded positions
        (``attention_mask == 0``) are ignored, like -100: the outputs there are unspecified.
        ``num_items_in_batch`` (passed by ``Trainer``: the number of labelled tokens of all the micro-batches
        of one optimizer step) makes the loss the sum over the labelled tokens divided by it instead of their
        mean, so gradient accumulation gives the gradient of the whole batch.

        Raises:
            ValueError: ``labels`` is not an integer tensor of the input ids' shape, a label is outside
                ``[0, vocab_size)`` and not -100, a sequence has more labelled tokens than
                ``config.max_predictions_per_seq``, a bad ``num_items_in_batch``, or bad inputs.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        vocab = self.decoder.out_features
        labels = _labels_first(labels, input_ids, inputs_embeds, self.decoder.weight.device, vocab)
        out = self.gmlp(
            input_ids, attention_mask, token_type_ids, inputs_embeds, output_hidden_states, True,
            output_attentions=output_attentions,
        )
        hidden, loss = out.last_hidden_state, None
        if labels is None:
            logits = apply_linear(self.decoder, hidden)
        else:
            labels = _check_labels(labels, tuple(hidden.shape[:2]), hidden.device, None)  # range: checked
            if attention_mask is not None:  # outputs at padded positions are unspecified: never a target
                labels = labels.masked_fill(attention_mask.to(labels.device) == 0, -100)
            overflow, per_seq = None, self.config.max_predictions_per_seq
            if self.config.sparse_prediction and per_seq is not None:
                hidden, labels, overflow = _select_predictions(hidden, labels, per_seq)
            elif self.config.sparse_prediction and not capturing(labels):
                # the labelled tokens exactly (a data-dependent shape: not inside a CUDA graph), found once
                # (one host read-back; boolean indexing would read the mask back for each tensor indexed and
                # again in backward); the rows of hidden[labels != -100] in the same order
                keep = (labels != -100).flatten().nonzero().squeeze(1)
                hidden = hidden.flatten(0, 1).index_select(0, keep)
                labels = labels.flatten().index_select(0, keep)
            logits = apply_linear(self.decoder, hidden)
            loss = _token_loss(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), num_items_in_batch)
            if overflow is not None:  # labelled tokens were left out and nobody could check: no silent loss
                loss = torch.where(overflow, torch.full_like(loss, float("nan")), loss)
        output = MaskedLMOutput(
            loss=loss, logits=logits, hidden_states=out.hidden_states, attentions=out.attentions
        )
        return _as_tuple(output, return_dict)


class GMLPForSequenceClassification(GMLPPreTrainedModel):
    """Sentence (pair) classification or regression from the first real token (the ``<cls>`` token):
    ``classifier(dropout(tanh(pooler(dropout(h_cls)))))``. A causal model (``config.causal``, e.g. loaded
    from a :class:`GMLPForCausalLM` checkpoint) pools the *last* real token instead, as GPT-2's classifier
    does: there the first token sees only itself.

    The loss follows ``config.problem_type`` as in transformers:

    - ``"regression"`` (MSE): float (or integer) labels of shape ``(batch,)`` or ``(batch, 1)`` when
      ``num_labels == 1``, ``(batch, num_labels)`` otherwise.
    - ``"single_label_classification"`` (cross-entropy): class ids in ``[0, num_labels)`` of any integer
      dtype (cast to int64), shape ``(batch,)`` or ``(batch, 1)``; -100 = example ignored.
    - ``"multi_label_classification"`` (BCE with logits): targets in ``[0, 1]`` of shape
      ``(batch, num_labels)``, float, integer or bool (integer and bool ones cast to the logits' dtype).

    Float labels (regression, multi-label) are compared with the logits in the dtype torch promotes both to,
    as in BERT: float32 labels of a bf16 model, or under bf16 autocast, are not rounded to bf16. Labels are
    checked before the model runs, so a bad one costs no forward pass.

    When ``config.problem_type`` is None, the first call with labels infers it as transformers does
    (``num_labels == 1``: regression; integer labels: single-label; float or bool labels: multi-label) and
    stores it in ``config.problem_type``, so that it is saved with the model and pipelines apply the
    matching activation. A later call with the other kind of labels is then refused with a ``ValueError``
    that names ``config.problem_type`` (set it yourself to change it); it is never reinterpreted silently.
    """

    def __init__(self, config: GMLPConfig) -> None:
        super().__init__(config)
        num_labels = config.num_labels
        if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 1:
            raise ValueError(
                "GMLPForSequenceClassification needs config.num_labels >= 1 (1 = regression), "
                f"got {num_labels}"
            )
        _check_problem_type(config.problem_type)
        if config.problem_type == "single_label_classification" and num_labels == 1:
            raise ValueError(
                "config.problem_type='single_label_classification' needs num_labels >= 2, got num_labels=1 "
                "(use num_labels=2 for binary classification, or problem_type='regression')"
            )
        self.num_labels = num_labels
        self._inferred_problem_type: str | None = None  # what forward() stored in config.problem_type
        self.gmlp = GMLPModel(config)
        self.dropout = _head_dropout(config)
        self.pooler = nn.Linear(config.hidden_size, config.hidden_size)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        output_attentions: bool | None = None,
    ) -> SequenceClassifierOutput | tuple[torch.Tensor, ...]:
        """Logits ``(batch, num_labels)``; with ``labels`` also the loss (see the class docstring for the
        labels each ``problem_type`` takes). Other arguments: :meth:`GMLPModel.forward`. The pooled token
        is the first one with ``attention_mask == 1`` (the last one in a causal model).

        Raises:
            ValueError: ``labels`` of the wrong type, shape or dtype for ``config.problem_type`` (the
                message names it and where it came from), class ids outside ``[0, num_labels)`` other
                than -100, multi-label targets outside ``[0, 1]``, or bad inputs.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        # The labels are checked before the model runs (a bad label costs no forward) and where they are:
        # labels still on the CPU are read there, and on a GPU the range check's read-back waits for the
        # previous step only, not for this step's forward. (Inputs that are not tensors: the model says so.)
        source = input_ids if input_ids is not None else inputs_embeds
        checked = None
        if labels is not None and isinstance(source, torch.Tensor) and source.dim() >= 2:
            checked = self._checked_labels(labels, source.shape[0])
        out = self.gmlp(
            input_ids, attention_mask, token_type_ids, inputs_embeds, output_hidden_states, True,
            output_attentions=output_attentions,
        )
        h = out.last_hidden_state
        causal = self.config.causal  # the last real token is the one that has seen the whole text
        if attention_mask is None:
            token = h[:, -1] if causal else h[:, 0]
        else:
            real = (attention_mask != 0).to(torch.int32)  # first real token, or last (any padding)
            index = real.shape[1] - 1 - real.flip(1).argmax(dim=1) if causal else real.argmax(dim=1)
            token = h[torch.arange(h.shape[0], device=h.device), index.to(h.device)]
        pooled = torch.tanh(self.pooler(self.dropout(token)))
        logits = self.classifier(self.dropout(pooled))
        loss = None
        if labels is not None:
            if checked is None:  # (not reached: the model refused the inputs)
                checked = self._checked_labels(labels, logits.shape[0])
            loss = self._loss(logits, checked)
        return _as_tuple(
            SequenceClassifierOutput(
                loss=loss, logits=logits, hidden_states=out.hidden_states, attentions=out.attentions
            ),
            return_dict,
        )

    def _checked_labels(self, labels: Any, batch: int) -> tuple[str, torch.Tensor]:
        """``(problem_type, labels)``: ``labels`` checked against ``config.problem_type`` (inferred when None,
        see the class docstring, but not stored here) for a batch of ``batch`` examples, on their own device
        (nothing is read back from another one), reshaped to ``(batch,)`` (class ids as int64, regression
        with one label) or ``(batch, num_labels)``.

        Raises:
            ValueError: labels of the wrong type, shape or dtype for the problem type, class ids outside
                ``[0, num_labels)`` other than -100, multi-label targets outside ``[0, 1]``.
        """
        k = self.num_labels
        if not isinstance(labels, torch.Tensor):
            raise ValueError(
                "labels must be a torch.Tensor of shape (batch,) (class ids, or regression values) or "
                f"(batch, num_labels) (multi-label targets), got {_describe(labels)}"
            )
        problem_type = self.config.problem_type
        if problem_type is None:
            if k == 1:
                problem_type, why = "regression", "num_labels=1 means regression"
            elif _is_integer(labels.dtype):
                problem_type, why = "single_label_classification", "integer labels mean single-label"
            else:
                problem_type, why = "multi_label_classification", "float or bool labels mean multi-label"
            origin = f"inferred from these labels: {why}"
        elif problem_type == self._inferred_problem_type:
            origin = (
                "inferred from the labels of an earlier call and kept, as in transformers; set "
                "config.problem_type to change it"
            )
        else:
            origin = "set in the config"
        context = f"config.problem_type={problem_type!r} ({origin})"

        if problem_type == "single_label_classification":
            return problem_type, _check_labels(
                labels, (batch,), labels.device, k, layout="(batch,)", classes="num_labels",
                note=f"of class ids (-100 = example ignored) for {context}",
            )
        regression = problem_type == "regression"
        column = regression and k == 1
        shape = (batch,) if column else (batch, k)
        dtype_ok = (
            labels.dtype.is_floating_point or _is_integer(labels.dtype)
            or (labels.dtype == torch.bool and not regression)
        )
        shape_ok = tuple(labels.shape) == shape or (column and tuple(labels.shape) == (batch, 1))
        if not (dtype_ok and shape_ok):
            accepted = f"(batch,) = {shape} or (batch, 1)" if column else f"(batch, num_labels) = {shape}"
            what = "(integer labels are cast)" if regression else (
                "of 0/1 or probability targets (integer and bool labels are cast)"
            )
            raise ValueError(
                f"labels must be a float tensor of shape {accepted} {what} for {context}, "
                f"got {_describe(labels)}"
            )
        labels = labels.reshape(shape)
        if not regression and labels.dtype != torch.bool and host_checks_enabled(labels):
            bad = (labels < 0) | (labels > 1)
            if bool(bad.any()):
                raise ValueError(
                    f"labels contains {labels[bad][0].item()} outside [0, 1]: multi-label targets are 0/1 or "
                    f"probabilities ({context})"
                )
        return problem_type, labels

    def _loss(self, logits: torch.Tensor, checked: tuple[str, torch.Tensor]) -> torch.Tensor:
        """The loss of ``logits`` ``(batch, num_labels)`` for the labels :meth:`_checked_labels` returned;
        stores an inferred problem type in ``config.problem_type``. Float targets are compared in the dtype
        torch promotes the logits and labels to (as BERT's losses do): float32 labels of a bf16 model (or
        under bf16 autocast) are not rounded to bf16. Integer and bool targets take the logits' dtype."""
        problem_type, labels = checked
        if problem_type == "single_label_classification":
            loss = CrossEntropyLoss()(logits, labels.to(logits.device))
        else:
            dtype = logits.dtype
            if labels.dtype.is_floating_point:
                dtype = torch.promote_types(dtype, labels.dtype)
            target = labels.to(device=logits.device, dtype=dtype)
            loss_fct = MSELoss() if problem_type == "regression" else BCEWithLogitsLoss()
            loss = loss_fct(logits.reshape(target.shape).to(dtype), target)
        if self.config.problem_type is None:  # only once the labels passed the checks
            self.config.problem_type = self._inferred_problem_type = problem_type
        return loss


class GMLPForTokenClassification(GMLPPreTrainedModel):
    """Per-token classification (NER, POS tagging): ``classifier(dropout(h))`` at every position, as
    transformers' ``BertForTokenClassification``.

    The loss is the mean cross-entropy over the labelled real tokens: labels of -100 are ignored (as
    ``DataCollatorForTokenClassification`` pads them) and so are labels at padded positions
    (``attention_mask == 0``), whose outputs do not depend on the input and mean nothing.
    """

    accepts_loss_kwargs = True  # Trainer passes num_items_in_batch (exact gradient accumulation)

    def __init__(self, config: GMLPConfig) -> None:
        super().__init__(config)
        num_labels = config.num_labels
        if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 2:
            raise ValueError(f"GMLPForTokenClassification needs config.num_labels >= 2, got {num_labels}")
        self.num_labels = num_labels
        self.gmlp = GMLPModel(config)
        self.dropout = _head_dropout(config)
        self.classifier = nn.Linear(config.hidden_size, num_labels)
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        output_attentions: bool | None = None,
        num_items_in_batch: int | torch.Tensor | None = None,
    ) -> TokenClassifierOutput | tuple[torch.Tensor, ...]:
        """Logits ``(batch, seq_len, num_labels)``; with ``labels`` (class ids of any integer dtype, shape
        ``(batch, seq_len)``, -100 = not a target) also the loss. ``num_items_in_batch`` (passed by
        ``Trainer``) divides the summed loss by that count instead of taking the mean, as in
        :meth:`GMLPForMaskedLM.forward`. Other arguments: :meth:`GMLPModel.forward`.

        Raises:
            ValueError: ``labels`` not an integer tensor of the input's shape, or with a class id outside
                ``[0, num_labels)`` other than -100, a bad ``num_items_in_batch``, or bad inputs.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        device = self.classifier.weight.device
        labels = _labels_first(labels, input_ids, inputs_embeds, device, self.num_labels, "num_labels")
        out = self.gmlp(
            input_ids, attention_mask, token_type_ids, inputs_embeds, output_hidden_states, True,
            output_attentions=output_attentions,
        )
        logits = self.classifier(self.dropout(out.last_hidden_state))
        loss = None
        if labels is not None:
            labels = _check_labels(labels, tuple(logits.shape[:2]), logits.device, None)  # range: checked
            if attention_mask is not None:
                labels = labels.masked_fill(attention_mask.to(labels.device) == 0, -100)
            loss = _token_loss(logits.reshape(-1, self.num_labels), labels.reshape(-1), num_items_in_batch)
        return _as_tuple(
            TokenClassifierOutput(
                loss=loss, logits=logits, hidden_states=out.hidden_states, attentions=out.attentions
            ),
            return_dict,
        )


class GMLPForQuestionAnswering(GMLPPreTrainedModel):
    """Extractive question answering (SQuAD): a Linear layer maps each final hidden state to a start and
    an end logit. With ``start_positions``/``end_positions`` the loss is the mean of the two cross-entropies
    (positions past the end of the sequence are ignored, as in BERT; negative ones are refused, where BERT
    clamps them to 0)."""

    def __init__(self, config: GMLPConfig) -> None:
        super().__init__(config)
        self.gmlp = GMLPModel(config)
        self.qa_outputs = nn.Linear(config.hidden_size, 2)
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        start_positions: torch.Tensor | None = None,
        end_positions: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        output_attentions: bool | None = None,
    ) -> QuestionAnsweringModelOutput | tuple[torch.Tensor, ...]:
        """``start_logits`` and ``end_logits`` ``(batch, seq_len)``; with both position tensors (token
        indices of any integer dtype, shape ``(batch,)`` or ``(batch, 1)``; an index >= ``seq_len`` = the
        example is ignored, a negative one is refused) also the loss. Padded positions
        (``attention_mask == 0``) get the lowest logit of the dtype, so they are never an answer and take no
        part in the loss (a padded row has the loss of the unpadded one). Other arguments:
        :meth:`GMLPModel.forward`.

        Raises:
            ValueError: only one of ``start_positions`` and ``end_positions`` given, a position tensor of
                the wrong type, shape or dtype, a negative position (BERT would clamp it to 0 and train on
                the first token), a position on a padded token, or bad inputs.
        """
        if (start_positions is None) != (end_positions is None):
            given, missing = (
                ("start_positions", "end_positions") if end_positions is None
                else ("end_positions", "start_positions")
            )
            raise ValueError(f"{given} was given without {missing}; pass both to get the loss, or neither")
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        out = self.gmlp(
            input_ids, attention_mask, token_type_ids, inputs_embeds, output_hidden_states, True,
            output_attentions=output_attentions,
        )
        start_logits, end_logits = self.qa_outputs(out.last_hidden_state).unbind(dim=-1)
        padded = None
        if attention_mask is not None:  # a padded position is never an answer, nor in the loss's softmax
            padded = attention_mask.to(start_logits.device) == 0
            lowest = torch.finfo(start_logits.dtype).min
            start_logits = start_logits.masked_fill(padded, lowest)
            end_logits = end_logits.masked_fill(padded, lowest)
        start_logits, end_logits = start_logits.contiguous(), end_logits.contiguous()
        loss = None
        if start_positions is not None and end_positions is not None:
            batch, ignored = start_logits.shape
            start, end = (
                _check_labels(
                    positions, (batch,), start_logits.device, None, name=name, layout="(batch,)",
                    note="of token indices (>= seq_len = example ignored)",
                )
                for name, positions in (
                    ("start_positions", start_positions), ("end_positions", end_positions)
                )
            )
            checks = host_checks_enabled(start)
            named = (("start_positions", start), ("end_positions", end))
            start, end = start.clamp(0, ignored), end.clamp(0, ignored)
            if checks:  # both checks of both tensors, read back to the host once
                negative = [position < 0 for _, position in named]
                on_pad = []
                if padded is not None:
                    for position in (start, end):
                        inside = position.clamp(max=ignored - 1)[:, None]
                        on_pad.append((position < ignored) & padded.gather(1, inside)[:, 0])
                flags = torch.stack([f.any() for f in negative + on_pad]).tolist()
                for (name, position), bad, found in zip(named, negative, flags[:2], strict=True):
                    if found:  # BERT clamps a negative index to 0: a silent [CLS] target
                        row = int(bad.to(torch.int32).argmax())
                        raise ValueError(
                            f"{name} of example {row} is {int(position[row])}; token indices must be >= 0 "
                            f"(an index >= seq_len={ignored} means no answer and is ignored; SQuAD 2.0's "
                            f"unanswerable questions point at 0, the [CLS] token)"
                        )
                for index, bad in enumerate(on_pad):  # (none without padding)
                    if flags[2 + index]:
                        name, position = named[index][0], (start, end)[index]
                        row = int(bad.to(torch.int32).argmax())
                        raise ValueError(
                            f"{name} of example {row} is {int(position[row])}, a padded position "
                            f"(attention_mask == 0 there); an answer must lie on real tokens (an index >= "
                            f"seq_len={ignored} means no answer and is ignored)"
                        )
            loss_fct = CrossEntropyLoss(ignore_index=ignored)
            loss = (loss_fct(start_logits, start) + loss_fct(end_logits, end)) / 2
        return _as_tuple(
            QuestionAnsweringModelOutput(
                loss=loss, start_logits=start_logits, end_logits=end_logits, hidden_states=out.hidden_states,
                attentions=out.attentions,
            ),
            return_dict,
        )


# Keyword arguments that generate() (4.x or 5.x) or Trainer may pass: the cache ones, which a cache-free gMLP
# accepts where they change nothing (use_cache; past_key_values/cache None or empty; cache_position None or
# 0 .. seq_len - 1), position_ids (checked to be the positions the model uses) and Trainer's
# num_items_in_batch (honoured). (logits_to_keep and num_logits_to_keep are named arguments of forward().)
_IGNORED_GENERATION_KWARGS = frozenset(
    {"use_cache", "past_key_values", "cache", "cache_position", "position_ids", "num_items_in_batch"}
)
# The names generate() gives "compute the last position's logits only": logits_to_keep (transformers after
# 4.48) and num_logits_to_keep (4.45 - 4.48). It passes one (= 1) when forward() names it in its signature.
_KEEP_KWARGS = ("logits_to_keep", "num_logits_to_keep")


class GMLPForCausalLM(GMLPPreTrainedModel, GenerationMixin):
    """Autoregressive gMLP language model: causal blocks (W masked to its lower triangle, causal tiny
    attention), final LayerNorm and ``lm_head`` (Linear with bias; weight tied to the input embedding when
    ``tie_word_embeddings``). The model always mixes tokens causally: given a config with
    ``causal=False`` it uses a copy with ``causal=True`` (``model.config.causal`` is True, so it is saved
    that way) and leaves the caller's config unchanged.

    ``generate()`` works without a key/value cache: every step re-runs the blocks on the whole prefix (the
    token mixing of gMLP has no cache in this implementation; ``lm_head`` runs on the last position only),
    so the model reads at most ``max_position_embeddings`` tokens: a longer prompt is refused before the
    first step. Padded batches are fine, the padding on either side (see
    :meth:`prepare_inputs_for_generation`).

    Raises:
        ValueError: a config with ``sgu_variant="mixer"``, which cannot mix tokens causally.
    """

    _tied_weights_keys = _tied_keys("lm_head.weight")
    accepts_loss_kwargs = True  # Trainer passes num_items_in_batch (exact gradient accumulation)

    def __init__(self, config: GMLPConfig) -> None:
        if config.sgu_variant == "mixer":  # (else the copy with causal=True fails deep in gmlp.nn)
            raise ValueError(
                "GMLPForCausalLM needs causal token mixing, and sgu_variant 'mixer' cannot be causal (its "
                "2-layer token MLP mixes every token with every other): use a single-projection variant "
                "(sgu, linear, additive, multiplicative) or 'none' for a causal LM"
            )
        if not config.causal:
            logger.warning(
                "GMLPForCausalLM needs causal token mixing: using a copy of the config with causal=True"
            )
            config = copy.deepcopy(config)  # the caller's config (maybe shared with other models) stays as is
            config.causal = True
        super().__init__(config)
        self.gmlp = GMLPModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size)
        self.post_init()

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, new_embeddings: nn.Linear) -> None:
        self.lm_head = new_embeddings

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:  # no key/value cache: generate() must not build one
        return False

    def _assisted_decoding(self, *args: Any, **kwargs: Any) -> Any:
        """``generate()``'s assisted decoding (``assistant_model``, ``prompt_lookup_num_tokens``,
        ``assistant_early_exit``), refused the same way for every transformers version: it needs a key/value
        cache that can be cut back after the draft tokens, and gMLP has none (transformers 5 refuses it
        itself; 4.x crashed inside it with an ``AttributeError`` about ``past_key_values``, or a
        ``TypeError`` from prompt lookup without an ``eos_token_id``).

        Raises:
            RuntimeError: always.
        """
        raise RuntimeError(
            "Assisted decoding requires a cache, and GMLPForCausalLM has no key/value cache (every step "
            "re-runs the whole prefix): generate without assistant_model, prompt_lookup_num_tokens or "
            "assistant_early_exit"
        )

    def _validate_generated_length(
        self, generation_config: Any, input_ids_length: int, has_default_max_length: bool
    ) -> None:
        """``generate()``'s length check (same signature on transformers 4.45 to 5.x), with gMLP's limit: the
        spatial W covers ``max_position_embeddings`` (n) tokens and there is no cache to go beyond, so a
        prompt longer than n is refused here, before any step, naming both lengths and how to truncate. A
        ``max_length`` (prompt + ``max_new_tokens``) above n + 1 warns before the first step: the
        model reads at most n tokens (the last of n + 1 tokens is predicted from n), so unless a stop token
        or a stopping criterion ends every sequence first, generation raises when it passes n + 1 tokens.

        Raises:
            ValueError: the prompt (``input_ids``, padding included) is longer than
                ``max_position_embeddings``; or transformers' own length errors.
        """
        n = self.config.max_position_embeddings
        if input_ids_length > n:
            raise ValueError(
                f"generate() got a prompt of {input_ids_length} tokens (input_ids.shape[1], padding "
                f"included), more than max_position_embeddings={n}, the most this gMLP takes (its spatial W "
                f"covers {n} tokens and there is no key/value cache to go beyond it): keep the prompt's last "
                f"{n} + 1 - max_new_tokens tokens at most (n + 1 tokens in all: the last is predicted from "
                f"n), e.g. tokenizer(..., truncation=True, max_length=...) with truncation_side='left', or "
                f"the text-generation pipeline's handle_long_generation='hole'"
            )
        super()._validate_generated_length(generation_config, input_ids_length, has_default_max_length)
        max_length = getattr(generation_config, "max_length", None)
        if max_length is not None and max_length > n + 1:
            warnings.warn(
                f"generate() may make up to {max_length} tokens (the prompt's {input_ids_length} and up to "
                f"{max_length - input_ids_length} new ones), but this gMLP reads at most "
                f"max_position_embeddings={n} tokens (no key/value cache): unless a stop token ends every "
                f"sequence first, it raises when a sequence passes {n + 1} tokens; ask for at most {n + 1} "
                f"tokens in all, with max_length <= {n + 1} or max_new_tokens <= {n + 1 - input_ids_length}",
                UserWarning,
                stacklevel=3,
            )

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """The whole prefix at every step (no cache). Generation starts from ``input_ids`` only
        (``generate(inputs_embeds=...)`` is refused by transformers, as this method takes no embeddings).
        ``token_type_ids`` given to ``generate`` (extended by transformers with the last type at every step)
        are passed on, so ones that do not match ``input_ids`` get :meth:`forward`'s error.
        ``output_hidden_states`` and ``output_attentions`` (which transformers 5 hands over here) are passed
        on: hidden states are returned, and attention maps of aMLP's tiny attention (refused by
        :meth:`forward` for a gMLP without it). ``position_ids`` given to ``generate`` (extended by
        transformers each step) are checked as :meth:`forward` checks them: only the positions the model uses
        anyway (``0 ..`` in each row with its padding deleted) are accepted, since gMLP has no position
        embeddings to give them another meaning. Rows with padding after a real token (right- or
        inner-padded prompts) are handed to the model with their real tokens moved to the end (in order),
        so the last position, whose logits ``generate()`` reads, is the last real token: such a prompt
        generates what it generates alone, as a left-padded one does (the hidden states and attention maps
        of those rows are then in that left-padded layout).

        Raises:
            ValueError: the sequence grew past ``max_position_embeddings`` (``max_new_tokens`` or
                ``max_length`` too large for the prompt); the message says how many tokens fit. Or
                ``position_ids`` other than the positions above.
        """
        n, length = self.config.max_position_embeddings, input_ids.shape[-1]
        if length > n:  # the model's own error would advise truncating the tokenizer's input
            raise ValueError(
                f"generate() reached {length} tokens (prompt and generated tokens), more than "
                f"max_position_embeddings={n}, the most this gMLP takes (its spatial W covers {n} tokens and "
                f"there is no key/value cache to go beyond it): ask for at most {n} tokens in all, with "
                f"max_length <= {n} or max_new_tokens <= {n} - prompt length"
            )
        if position_ids is not None:  # generate(position_ids=...): not passed on, so checked here (named in
            # the signature: transformers 4.45's generate() refused it as "not used by the model")
            two_d = isinstance(position_ids, torch.Tensor) and position_ids.dim() == 2
            k = position_ids.shape[-1] if two_d else 0
            if 0 < k < length:  # (a transformers version that does not extend them: their prompt part)
                prefix = None if attention_mask is None else attention_mask[:, :k]
                _check_position_ids(position_ids, prefix, (input_ids.shape[0], k))
            else:
                _check_position_ids(position_ids, attention_mask, tuple(input_ids.shape))
        if (
            isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2
            and attention_mask.shape == input_ids.shape
        ):  # (a mask of another shape: forward() names it)
            # generate() reads the logits of the last position, which in a right- or inner-padded row is a
            # pad (an unspecified output: that row's first new token was garbage). With the real tokens
            # moved to the end of the row, in order, the last position is the last real token, and the
            # outputs at real tokens are exactly those of the row (padding is deleted wherever it is).
            # Left-padded and unpadded rows are unchanged (the pads first, then the real tokens, each in
            # order); no host read.
            order, _ = _kept_first(attention_mask == 0)
            input_ids, attention_mask = input_ids.gather(1, order), attention_mask.gather(1, order)
            if isinstance(token_type_ids, torch.Tensor) and token_type_ids.shape == order.shape:
                token_type_ids = token_type_ids.gather(1, order)
        inputs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:  # generate() extends them each step; a bad shape: forward() names it
            inputs["token_type_ids"] = token_type_ids
        for flag in ("output_hidden_states", "output_attentions", *_KEEP_KWARGS):
            if kwargs.get(flag) is not None:  # (logits_to_keep = 1: lm_head runs on the last position only)
                inputs[flag] = kwargs[flag]
        return inputs

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        output_attentions: bool | None = None,
        logits_to_keep: int | torch.Tensor | None = None,
        num_logits_to_keep: int | torch.Tensor | None = None,
        **kwargs: Any,
    ) -> CausalLMOutput | tuple[torch.Tensor, ...]:
        """Next-token logits ``(batch, seq_len, vocab_size)``; with ``labels`` (``(batch, seq_len)``, usually
        ``input_ids``; -100 = ignored) also the mean cross-entropy of predicting ``labels[:, t + 1]`` from
        position ``t``; ``labels`` of any integer dtype are cast to int64. With ``attention_mask`` every row
        is taken with its padding deleted, as the model sees it: a real token predicts the label of the
        next *real* token, labels at padded positions are never targets and padded positions predict
        nothing, so left- or inner-padded rows get exactly the loss of the unpadded rows. Other arguments:
        :meth:`GMLPModel.forward`.

        As in transformers' causal LMs, the loss of half-precision (bf16, fp16) logits is computed in float32
        (and returned as float32). Keyword arguments of transformers' causal LMs: ``logits_to_keep`` (or
        ``num_logits_to_keep``) as there: 0 or None = all positions, an int k = the logits of the last k
        positions only, a 1-D integer tensor = those positions (the loss still covers every position). Both
        are named in the signature, so ``generate()`` passes 1 and each step runs ``lm_head`` on the last
        position only, not the whole prefix. ``position_ids`` are accepted where they are the positions the
        model uses anyway (``0 .. seq_len - 1`` in each row with its padding deleted, what ``generate()``
        computes) and refused otherwise: gMLP has no position embeddings, so it cannot honour packed sequences
        (``DataCollatorWithFlattening``) or shifted positions. The cache arguments are accepted where they
        change nothing: there is no cache, and the model always reads the whole sequence in ``input_ids``.
        ``use_cache`` is ignored (no cache is returned); ``past_key_values`` must be None or an empty cache
        and ``cache_position`` None or ``0 .. seq_len - 1``: a cache holding earlier tokens (``input_ids``
        then being the new tokens only) is refused, not silently dropped. ``num_items_in_batch`` (passed by
        ``Trainer``: the number of targets of all the micro-batches of one optimizer step) makes the loss the
        sum over the targets divided by it instead of their mean, so gradient accumulation gives the gradient
        of the whole batch (Trainer counts ``labels[:, 1:] != -100``, which is exact for right-padded rows
        whose padding is labelled -100; a left-padded row counts one target more than the model predicts).

        Raises:
            TypeError: an unknown keyword argument.
            ValueError: ``output_attentions=True`` for a gMLP without tiny attention (no attention maps to
                return), ``position_ids`` other than the positions above, a non-empty ``past_key_values``, a
                ``cache_position`` other than ``0 .. seq_len - 1``, a bad ``logits_to_keep`` or
                ``num_items_in_batch``, ``labels`` not an integer tensor of the input ids' shape or with a
                label outside ``[0, vocab_size)`` other than -100, or bad inputs.
        """
        unknown = sorted(set(kwargs) - _IGNORED_GENERATION_KWARGS)
        if unknown:
            raise TypeError(f"GMLPForCausalLM.forward() got unexpected keyword arguments {unknown}")
        keep = logits_to_keep if logits_to_keep is not None else num_logits_to_keep
        keep = 0 if keep is None else keep
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        vocab = self.lm_head.out_features
        labels = _labels_first(labels, input_ids, inputs_embeds, self.lm_head.weight.device, vocab)
        source = input_ids if input_ids is not None else inputs_embeds
        if isinstance(source, torch.Tensor) and source.dim() >= 2:  # (before the model runs; bad inputs: its)
            _check_position_ids(kwargs.get("position_ids"), attention_mask, tuple(source.shape[:2]))
            for name in ("past_key_values", "cache"):  # (None or empty: they would change nothing)
                _check_no_cache(kwargs.get(name), None, source.shape[1], name=name)
            _check_no_cache(None, kwargs.get("cache_position"), source.shape[1])
        out = self.gmlp(
            input_ids, attention_mask, token_type_ids, inputs_embeds, output_hidden_states, True,
            output_attentions=output_attentions,
        )
        hidden = out.last_hidden_state
        if labels is None:  # only the kept positions go through lm_head
            hidden = _keep_positions(hidden, keep)
        logits = apply_linear(self.lm_head, hidden)
        loss = None
        if labels is not None:
            labels = _check_labels(labels, tuple(logits.shape[:2]), logits.device, None)  # range: checked
            if attention_mask is None:
                shifted = logits[:, :-1]
                shifted, targets = shifted.reshape(-1, shifted.shape[-1]), labels[:, 1:].reshape(-1)
            else:  # each row with its padding deleted (left and inner padding included)
                shifted = logits.reshape(-1, logits.shape[-1])
                targets = _next_token_targets(labels, attention_mask).reshape(-1)
            if shifted.dtype in (torch.float16, torch.bfloat16):  # the loss in float32, as transformers'
                shifted = shifted.float()  # causal LMs compute it (ForCausalLMLoss upcasts the logits)
            loss = _token_loss(shifted, targets, kwargs.get("num_items_in_batch"))
            logits = _keep_positions(logits, keep)
        output = CausalLMOutput(
            loss=loss, logits=logits, hidden_states=out.hidden_states, attentions=out.attentions
        )
        return _as_tuple(output, return_dict)

    @classmethod
    def from_g_mlp_pytorch(
        cls, source: nn.Module | dict[str, torch.Tensor], **config_overrides: Any
    ) -> GMLPForCausalLM:
        """Build a causal LM from a g-mlp-pytorch ``gMLP(num_tokens=..., causal=True)`` model or state dict.

        The config is inferred from the weight shapes (vocabulary, width, depth, ``d_ffn``, n, tiny attention,
        SGU heads) with g-mlp-pytorch's choices: full (not Toeplitz) W, LayerNorm epsilon 1e-5 everywhere,
        untied ``lm_head`` with bias, no token types. ``config_overrides`` are passed to :class:`GMLPConfig`.
        The converted model gives the source's logits.

        Raises:
            ValueError: ``source`` is a module that is not causal, shifts tokens or has a gate activation
                (none of which can be expressed here; a state dict cannot tell, so check it yourself).
            CheckpointError: the weights are not those of a g-mlp-pytorch language model.
        """
        if isinstance(source, nn.Module):
            for name, module in source.named_modules():
                if hasattr(module, "causal") and not module.causal:
                    raise ValueError(f"the g-mlp-pytorch model is not causal ({name}.causal is False)")
                if getattr(module, "shifts", (0,)) != (0,):
                    raise ValueError(f"token shifting ({name}.shifts={module.shifts}) is not supported")
                if hasattr(module, "act") and not isinstance(module.act, nn.Identity):
                    raise ValueError(f"a gate activation ({name}.act={module.act}) is not supported")
            state_dict = source.state_dict()
        else:
            state_dict = source
        sd = from_g_mlp_pytorch_lm(state_dict)
        vocab, dim = sd["gmlp.embed.weight"].shape
        depth = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("gmlp.blocks."))
        proj_w = sd["gmlp.blocks.0.sgu.proj.weight"]
        qkv = sd.get("gmlp.blocks.0.tiny_attn.qkv.weight")
        kwargs: dict[str, Any] = {
            "vocab_size": vocab, "hidden_size": dim, "num_hidden_layers": depth,
            "intermediate_size": sd["gmlp.blocks.0.fc1.weight"].shape[0],
            "max_position_embeddings": sd["gmlp.blocks.0.sgu.proj.bias"].shape[-1],
            "sgu_heads": proj_w.shape[0] if proj_w.dim() == 3 else 1,
            "tiny_attn_size": qkv.shape[0] // 3 if qkv is not None else None,
            "toeplitz": False, "causal": True, "layer_norm_eps": 1e-5, "sgu_norm_eps": 1e-5,
            "tie_word_embeddings": False, "type_vocab_size": 0,
            "pad_token_id": None, "cls_token_id": None, "sep_token_id": None, "mask_token_id": None,
        }
        kwargs.update(config_overrides)
        model = cls(GMLPConfig(**kwargs))
        model.load_state_dict(sd, strict=True)
        return model


def from_g_mlp_pytorch_lm(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map a g-mlp-pytorch ``gMLP`` language-model state dict to :class:`GMLPForCausalLM` keys.

    Accepts the raw g-mlp-pytorch state dict (``to_embed``, ``layers.N.fn...``, ``to_logits``) or the output
    of :func:`gmlp.convert.from_g_mlp_pytorch` (``embed``, ``blocks.N...``, ``norm``, ``lm_head``).
    Keys become ``gmlp.embed.weight``, ``gmlp.blocks.N...``, ``gmlp.norm.*`` and ``lm_head.*``. Load the
    result into a ``GMLPForCausalLM`` built with ``toeplitz=False, layer_norm_eps=1e-5, sgu_norm_eps=1e-5,
    tie_word_embeddings=False, type_vocab_size=0`` and the source's sizes (or use
    :meth:`GMLPForCausalLM.from_g_mlp_pytorch`, which does all of it).

    Raises:
        CheckpointError: unknown keys, or not a language model (vision checkpoint, no embedding).
    """
    if detect_format(state_dict) == "g_mlp_pytorch":
        state_dict = from_g_mlp_pytorch(state_dict)
    out: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, value in state_dict.items():
        if key.startswith(("embed.", "blocks.", "norm.")):
            out[f"gmlp.{key}"] = value
        elif key.startswith("lm_head."):
            out[key] = value
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(f"not a g-mlp-pytorch language model; keys without a place: {unknown[:5]}")
    for needed in ("gmlp.embed.weight", "lm_head.weight", "gmlp.norm.weight"):
        if needed not in out:
            raise CheckpointError(f"not a g-mlp-pytorch language model: {needed} is missing")
    return out
