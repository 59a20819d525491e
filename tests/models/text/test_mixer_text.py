"""``GMLPConfig(sgu_variant="mixer")`` (Table 3's MLP-Mixer row) through the text models, save/load,
resizing and ``gmlp pretrain --sgu-variant mixer``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gmlp.models.text import GMLPConfig, GMLPForCausalLM, GMLPForMaskedLM, GMLPModel
from gmlp.train import text as pipelines
from gmlp.train.recipe import ConfigError

VOCAB, DIM, FFN, LAYERS, SEQ = 50, 16, 24, 2, 12


def mixer_config(**overrides) -> GMLPConfig:
    kwargs = dict(
        vocab_size=VOCAB, hidden_size=DIM, intermediate_size=FFN, num_hidden_layers=LAYERS,
        max_position_embeddings=SEQ, sgu_variant="mixer",
    )
    return GMLPConfig(**{**kwargs, **overrides})


def randomized(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Large random token-MLP weights (W2 starts near zero, which would hide the token mixing)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".mix" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return model.eval()


def test_config_resolves_and_checks_the_token_mlp_size() -> None:
    config = mixer_config()
    assert config.sgu_token_mlp_dim == SEQ and config.gate_dim == FFN
    assert mixer_config(sgu_token_mlp_dim=7).sgu_token_mlp_dim == 7
    assert GMLPConfig().sgu_token_mlp_dim is None
    model = GMLPModel(mixer_config(sgu_token_mlp_dim=7))
    sgu = model.blocks[0].sgu
    assert (sgu.mix1.weight.shape, sgu.mix2.weight.shape) == ((7, SEQ), (SEQ, 7))
    assert not any(".proj." in name for name, _ in model.named_parameters())


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"causal": True}, r"sgu_variant='mixer' cannot be causal"),
        ({"sgu_heads": 2}, r"sgu_heads must be 1 with sgu_variant='mixer'.*got 2"),
        ({"tiny_attn_size": 8}, r"tiny_attn_size needs a gate.*sgu_variant='mixer'"),
        ({"spatial_fft_threshold": 8}, r"spatial_fft_threshold .*'mixer'; it must be None, got 8"),
        ({"sgu_token_mlp_dim": 0}, r"sgu_token_mlp_dim must be a positive int, got 0"),
        ({"sgu_variant": "sgu", "sgu_token_mlp_dim": 8}, r"sgu_token_mlp_dim .* must be None with "
                                                          r"sgu_variant='sgu', got 8"),
    ],
)
def test_config_refuses_what_the_mixer_cannot_do(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        mixer_config(**overrides)


def test_causal_lm_refuses_the_mixer_by_name() -> None:
    with pytest.raises(ValueError, match="variant 'mixer' cannot be causal"):
        GMLPForCausalLM(mixer_config())


def test_padding_anywhere_equals_the_unpadded_sequence() -> None:
    """Real tokens' logits equal those of the sequence with its padding deleted (right, left, inside)."""
    model = randomized(GMLPForMaskedLM(mixer_config()))
    ids = torch.randint(5, VOCAB, (3, 10))
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[0, 6:] = 0  # right
    mask[1, :3] = 0  # left
    mask[2, [2, 5, 6]] = 0  # inside
    with torch.no_grad():
        padded = model(ids, attention_mask=mask).logits
        for b in range(3):
            real = mask[b].bool()
            alone = model(ids[b : b + 1, real]).logits[0]
            torch.testing.assert_close(padded[b, real], alone, atol=1e-5, rtol=1e-5)


def test_save_and_load_keep_the_token_mlp(tmp_path: Path) -> None:
    model = randomized(GMLPForMaskedLM(mixer_config(sgu_token_mlp_dim=5)))
    model.save_pretrained(tmp_path)
    loaded = GMLPForMaskedLM.from_pretrained(tmp_path).eval()
    assert loaded.config.sgu_variant == "mixer" and loaded.config.sgu_token_mlp_dim == 5
    ids = torch.randint(5, VOCAB, (2, 9))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_resize_sequence_length_keeps_outputs_and_reloads(tmp_path: Path) -> None:
    """Resizing cuts W1's columns and W2's rows; d_tok (resolved from the old length) stays, so the resized
    model saves and reloads."""
    model = randomized(GMLPForMaskedLM(mixer_config()))
    ids = torch.randint(5, VOCAB, (2, 6))
    with torch.no_grad():
        before = model(ids).logits
    model.resize_sequence_length(8)
    sgu = model.gmlp.blocks[0].sgu
    assert (sgu.mix1.weight.shape, sgu.mix2.weight.shape, sgu.mix2.bias.shape) == ((SEQ, 8), (8, SEQ), (8,))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before, atol=1e-6, rtol=1e-6)
    model.save_pretrained(tmp_path)
    loaded = GMLPForMaskedLM.from_pretrained(tmp_path).eval()
    assert loaded.config.max_position_embeddings == 8 and loaded.config.sgu_token_mlp_dim == SEQ
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_mlm_trains_from_the_documented_init() -> None:
    """From post_init's init (W2 ~ 0, b2 = 1), one backward gives the token MLP's W2 a gradient."""
    torch.manual_seed(0)
    model = GMLPForMaskedLM(mixer_config())
    sgu = model.gmlp.blocks[0].sgu
    assert torch.equal(sgu.mix2.bias, torch.ones(SEQ)) and sgu.mix2.weight.abs().max() < 1e-4
    ids = torch.randint(5, VOCAB, (2, SEQ))
    model(ids, labels=ids).loss.backward()
    assert sgu.mix2.weight.grad.abs().max() > 0


# --- gmlp pretrain --sgu-variant mixer: the config built (command line: test_text_cli_validation.py) ---


def _build(**kw: object) -> GMLPConfig:
    opts = pipelines.ModelOptions(**kw)
    pipelines._validate_model_options(opts, loaded_from=None)
    special = {"pad": 0, "cls": 1, "sep": 2, "mask": 3}
    return pipelines.build_model_config(opts, vocab_size=100, special_ids=special)


def test_pretrain_options_build_a_mixer() -> None:
    config = _build(sgu_variant="mixer", seq_len=32)  # (--toeplitz at its default True, unused: saved False)
    assert config.sgu_variant == "mixer" and config.sgu_token_mlp_dim == 32 and config.toeplitz is False
    assert _build(sgu_variant="mixer", token_mlp_dim=64).sgu_token_mlp_dim == 64
    preset = _build(preset="gmlp-ablation", sgu_variant="mixer", token_mlp_dim=16)
    assert preset.num_hidden_layers == 36 and preset.sgu_token_mlp_dim == 16 and preset.toeplitz is False
    assert _build(preset="gmlp-ablation", sgu_variant="additive").toeplitz is True
    with pytest.raises(ConfigError, match=r"--token-mlp-dim .* --sgu-variant mixer, got .*--sgu-variant sgu"):
        _build(token_mlp_dim=64)
    with pytest.raises(ConfigError, match=r"--token-mlp-dim must be >= 1, got 0"):
        _build(sgu_variant="mixer", token_mlp_dim=0)
