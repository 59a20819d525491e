"""gMLP / aMLP language models for Hugging Face ``transformers`` (paper sections 4-5).

Importing this package registers the ``"gmlp"`` model type with ``AutoConfig``, ``AutoModel``,
``AutoModelForMaskedLM``, ``AutoModelForSequenceClassification``, ``AutoModelForTokenClassification``,
``AutoModelForQuestionAnswering`` and ``AutoModelForCausalLM``, so
``AutoModelForMaskedLM.from_pretrained(path)`` works on a saved gMLP.
"""

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
