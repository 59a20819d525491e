"""Shared fixtures of the HF tests: an in-memory WordLevel tokenizer, tiny configs, randomised weights."""

from __future__ import annotations

import torch
import transformers
from packaging.version import Version
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from gmlp.models.text import GMLPConfig
from gmlp.nn import TokenProjection

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]  # ids 0..4, GMLPConfig's defaults
WORDS = [
    "the", "a", "cat", "dog", "sat", "on", "mat", "ran", "fast", "slow", "red", "blue", "big", "small",
    "is", "was", "who", "where", "what", "why", "how", "and", "or", "not", "paris", "london", "city",
    "capital", "of", "france", "england", "river",
]
VOCAB = {tok: i for i, tok in enumerate(SPECIALS + WORDS)}
SEQ = 32

# from_pretrained's dtype keyword: `dtype` from transformers 4.56 on (5.x warns about the old name), before
# that `torch_dtype` (4.45-4.55 hand an unknown `dtype` to the model's __init__, a TypeError).
DTYPE_KWARG = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"


def loading_options(options: dict) -> dict:
    """``from_pretrained`` keyword arguments written with ``dtype``, for the installed transformers."""
    return {DTYPE_KWARG if key == "dtype" else key: value for key, value in options.items()}


def make_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel(vocab=VOCAB, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", VOCAB["[CLS]"]), ("[SEP]", VOCAB["[SEP]"])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]", model_max_length=SEQ,
    )


def tiny_config(**overrides) -> GMLPConfig:
    kwargs = dict(
        vocab_size=len(VOCAB), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        max_position_embeddings=SEQ, tiny_attn_size=8,
    )
    kwargs.update(overrides)
    return GMLPConfig(**kwargs)


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random W, b and heads: a save/load bug or a re-initialisation on load cannot hide behind the init."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, TokenProjection):
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * 0.3)
                module.bias.copy_(1 + torch.randn(module.bias.shape, generator=gen) * 0.3)
            elif isinstance(module, torch.nn.Linear) and module.bias is not None:
                module.bias.copy_(torch.randn(module.bias.shape, generator=gen) * 0.1)
    return model.eval()
