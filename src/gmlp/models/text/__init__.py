"""gMLP / aMLP language models for Hugging Face ``transformers`` (paper sections 4-5).

Importing this package registers the ``"gmlp"`` model type with ``AutoConfig``, ``AutoModel``,
``AutoModelForMaskedLM``, ``AutoModelForSequenceClassification``, ``AutoModelForTokenClassification``,
``AutoModelForQuestionAnswering`` and ``AutoModelForCausalLM``, so
``AutoModelForMaskedLM.from_pretrained(path)`` works on a saved gMLP.

Needs ``transformers`` (the ``train`` extra: ``pip install "gmlp[train]"``); without it, importing this
package raises a ``ModuleNotFoundError`` that says so.
"""

try:
    import transformers  # noqa: F401  (first, alone: its absence is a missing extra, not a bug here)
except ModuleNotFoundError as _err:
    if _err.name != "transformers":  # transformers is there but broken: its own error says why
        raise
    raise ModuleNotFoundError(
        'gmlp.models.text needs the transformers package, which is not installed: pip install "gmlp[train]"',
        name=_err.name,
    ) from _err

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from .configuration_gmlp import PRESETS, GMLPConfig
from .modeling_gmlp import (
    GMLPForCausalLM,
    GMLPForMaskedLM,
    GMLPForQuestionAnswering,
    GMLPForSequenceClassification,
    GMLPForTokenClassification,
    GMLPModel,
    GMLPPreTrainedModel,
    from_g_mlp_pytorch_lm,
)

__all__ = [
    "PRESETS",
    "GMLPConfig",
    "GMLPForCausalLM",
    "GMLPForMaskedLM",
    "GMLPForQuestionAnswering",
    "GMLPForSequenceClassification",
    "GMLPForTokenClassification",
    "GMLPModel",
    "GMLPPreTrainedModel",
    "from_g_mlp_pytorch_lm",
]

AutoConfig.register(GMLPConfig.model_type, GMLPConfig, exist_ok=True)
for _auto, _model in (
    (AutoModel, GMLPModel),
    (AutoModelForMaskedLM, GMLPForMaskedLM),
    (AutoModelForSequenceClassification, GMLPForSequenceClassification),
    (AutoModelForTokenClassification, GMLPForTokenClassification),
    (AutoModelForQuestionAnswering, GMLPForQuestionAnswering),
    (AutoModelForCausalLM, GMLPForCausalLM),
):
    _auto.register(GMLPConfig, _model, exist_ok=True)

# transformers' Trainer shifts the labels of its own label-smoothed loss only for the causal LMs named in
# this table (registering with AutoModelForCausalLM does not add to it): without the entry,
# label_smoothing_factor > 0 would train GMLPForCausalLM to predict the current token
MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.setdefault(GMLPConfig.model_type, GMLPForCausalLM.__name__)
