"""GMLPConfig: presets reproduce the paper's parameter counts; arguments are validated with clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoConfig

from gmlp.models.text import PRESETS, GMLPConfig, GMLPForMaskedLM

# Paper, Table 5 (and the ablation model of Tables 3/4), as reproduced in PAPER.md section 5.
PAPER_PARAMS = {
    "gmlp-base": 130.07e6,
    "amlp-base": 108.78e6,
    "gmlp-large": 365.27e6,
    "amlp-large": 315.60e6,
    "gmlp-xlarge": 940.58e6,
    "gmlp-ablation": 101.65e6,
}


def _unique_parameter_count(model: torch.nn.Module) -> int:
    # model.parameters() yields each Parameter object once, so a tied embedding/decoder counts once.
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", sorted(PAPER_PARAMS))
def test_preset_parameter_count_matches_paper(name: str) -> None:
    config = GMLPConfig.from_preset(name)
    with torch.device("meta"):
        model = GMLPForMaskedLM(config)
    assert model.decoder.weight is model.gmlp.embed.weight  # tied: the vocabulary matrix counts once
    count = _unique_parameter_count(model)
    assert abs(count - PAPER_PARAMS[name]) / PAPER_PARAMS[name] < 0.005, (name, count)


def test_preset_exact_block_formula() -> None:
    # PAPER.md section 5: per block 2d + d*e + e + e + (2n-1) + n + (e/2)*d + d;
    # aMLP adds 3*d*a + a*e/2 + e/2.
    d, e, n, a = 512, 3072, 512, 64
    block = 2 * d + d * e + e + e + (2 * n - 1) + n + (e // 2) * d + d
    config = GMLPConfig.from_preset("amlp-base")
    with torch.device("meta"):
        model = GMLPForMaskedLM(config)
    got = sum(p.numel() for p in model.gmlp.blocks[0].parameters())
    assert got == block + 3 * d * a + a * (e // 2) + e // 2


def test_presets_table() -> None:
    assert set(PRESETS) == set(PAPER_PARAMS)
    for name in PRESETS:
        config = GMLPConfig.from_preset(name)
        assert (config.vocab_size, config.max_position_embeddings) == (32000, 512)
        assert config.toeplitz and config.tie_word_embeddings
    assert GMLPConfig.from_preset("amlp-large").tiny_attn_size == 128
    assert GMLPConfig.from_preset("gmlp-large").tiny_attn_size is None


def test_preset_overrides() -> None:
    config = GMLPConfig.from_preset("gmlp-base", max_position_embeddings=128, num_labels=3)
    assert config.max_position_embeddings == 128
    assert config.num_labels == 3
    assert config.num_hidden_layers == 48


def test_unknown_preset() -> None:
    with pytest.raises(ValueError, match="unknown preset 'gmlp-huge'.*gmlp-base"):
        GMLPConfig.from_preset("gmlp-huge")


def test_defaults_are_gmlp_base() -> None:
    config = GMLPConfig()
    assert config.model_type == "gmlp"
    assert (config.num_hidden_layers, config.hidden_size, config.intermediate_size) == (48, 512, 3072)
    assert config.toeplitz and not config.causal and config.tiny_attn_size is None
    assert config.gate_dim == 1536
    assert GMLPConfig(sgu_variant="additive").gate_dim == 3072


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"intermediate_size": 63, "sgu_variant": "sgu"}, r"intermediate_size must be even.*got 63"),
        ({"sgu_variant": "gated"}, r"sgu_variant must be one of .*got 'gated'"),
        ({"sgu_heads": 5, "intermediate_size": 64}, r"sgu_heads must divide the gate width \(32 .*got 5"),
        ({"sgu_heads": 0}, r"sgu_heads must be a positive int, got 0"),
        ({"tiny_attn_size": 0}, r"tiny_attn_size must be a positive int, got 0"),
        ({"tiny_attn_size": 8, "sgu_variant": "none"}, r"tiny_attn_size needs a gate"),
        ({"sgu_heads": 2, "sgu_variant": "none"}, r"sgu_heads must be 1 with sgu_variant='none'.*got 2"),
        ({"spatial_fft_threshold": 8, "sgu_variant": "none"}, r"apply to sgu_variant='none'.*got 8"),
        ({"hidden_size": 0}, r"hidden_size must be a positive int, got 0"),
        ({"vocab_size": 12.5}, r"vocab_size must be a positive int, got 12.5"),
        ({"num_hidden_layers": -1}, r"num_hidden_layers must be a positive int, got -1"),
        ({"max_position_embeddings": 0}, r"max_position_embeddings must be a positive int, got 0"),
        ({"hidden_dropout_prob": 1.0}, r"hidden_dropout_prob must be a float in \[0, 1\), got 1.0"),
        ({"classifier_dropout": -0.1}, r"classifier_dropout must be a float in \[0, 1\), got -0.1"),
        ({"drop_path_rate": 1.5}, r"drop_path_rate must be a float in \[0, 1\), got 1.5"),
        ({"drop_path_schedule": "cosine"}, r"drop_path_schedule must be 'uniform' or 'linear', got 'cosine'"),
        ({"layer_norm_eps": 0.0}, r"layer_norm_eps must be a positive float, got 0.0"),
        ({"sgu_norm_eps": -1e-5}, r"sgu_norm_eps must be a positive float"),
        ({"initializer_range": -0.02}, r"initializer_range must be a non-negative float, got -0.02"),
        ({"spatial_init_std": -1.0}, r"spatial_init_std must be a non-negative float, got -1.0"),
        ({"type_vocab_size": -1}, r"type_vocab_size must be an int >= 0 .*got -1"),
        ({"toeplitz": "yes"}, r"toeplitz must be a bool, got 'yes'"),
        ({"spatial_fft_threshold": 0}, r"spatial_fft_threshold must be a positive int, got 0"),
        ({"spatial_fft_threshold": 64, "toeplitz": False}, r"spatial_fft_threshold .*needs toeplitz=True"),
        ({"vocab_size": 10, "mask_token_id": 10},
         r"mask_token_id must be None or an int in \[0, vocab_size=10\), got 10"),
        ({"pad_token_id": -1}, r"pad_token_id must be None or an int in \[0, vocab_size=32000\), got -1"),
    ],
)
def test_config_validation(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        GMLPConfig(**kwargs)


def test_config_round_trip(tmp_path) -> None:
    import gmlp.models.text  # noqa: F401  (registers "gmlp" with AutoConfig)

    config = GMLPConfig(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, max_position_embeddings=16,
        tiny_attn_size=8, toeplitz=False, causal=True, sgu_heads=2, type_vocab_size=0,
        tie_word_embeddings=False, num_labels=5,
    )
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, GMLPConfig)
    for key in ("vocab_size", "hidden_size", "tiny_attn_size", "toeplitz", "causal", "sgu_heads",
                "type_vocab_size", "tie_word_embeddings", "num_labels", "mask_token_id"):
        assert getattr(loaded, key) == getattr(config, key), key
    assert GMLPConfig.from_dict(config.to_dict()).to_dict()["sgu_heads"] == 2


def test_eos_token_id_annotation_takes_the_list_the_config_accepts() -> None:
    """``eos_token_id`` may list several stop tokens (validated and stored as such): the annotation said
    ``int | None``, so a type checker refused ``GMLPConfig(eos_token_id=[5, 6])``."""
    import typing

    hint = typing.get_type_hints(GMLPConfig.__init__)["eos_token_id"]
    assert set(typing.get_args(hint)) == {int, list[int], type(None)}
    assert GMLPConfig(eos_token_id=[5, 6]).eos_token_id == [5, 6]


@pytest.mark.parametrize(("typo", "meant"), [("hiden_size", "hidden_size"), ("toeplitz_w", "toeplitz"),
                                             ("sgu_varient", "sgu_variant"), ("tiny_attn", "tiny_attn_size")])
def test_a_misspelt_argument_is_named_with_its_likely_meaning(typo: str, meant: str) -> None:
    """``GMLPConfig(hiden_size=64)`` kept the typo as an unused attribute and built the default width without
    a word (PretrainedConfig stores unknown keyword arguments): a near miss of an argument now warns."""
    with pytest.warns(UserWarning, match=rf"unknown argument {typo!r} .*did you mean {meant!r}"):
        GMLPConfig(**{typo: 3})


def test_saved_configs_and_transformers_own_arguments_do_not_warn(tmp_path: Path) -> None:
    """Only near misses of GMLPConfig's own arguments warn: transformers' keys (``architectures``, ...),
    other unknown keys and a saved config's round trip stay quiet."""
    import warnings

    config = GMLPConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                        max_position_embeddings=8, num_labels=3, architectures=["GMLPModel"], my_note="x")
    config.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        GMLPConfig.from_pretrained(tmp_path)
        GMLPConfig(output_hidden_states=True, problem_type="regression", id2label={0: "a"}, comment="x")
