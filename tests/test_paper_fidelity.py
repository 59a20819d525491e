"""The paper's numbers, one by one (PAPER.md): model sizes, exact parameter counts and MACs, init, the
training recipes and the documented commands that claim to run them.

Everything here builds models on the meta device or parses settings, so it stays fast.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import torch

from gmlp import create_model
from gmlp.models.text import PRESETS, GMLPConfig, GMLPForMaskedLM
from gmlp.train.recipe import RECIPE_DIR, load_recipe
from gmlp.train.vision import VisionTrainConfig

ROOT = Path(__file__).resolve().parents[1]

# PAPER.md section 4, Table 1: depth, d_model, d_ffn, exact parameters (1000 classes), GMACs, survival prob.
TABLE1 = {
    "ti": ("gmlp_ti16_224", 30, 128, 768, 5_867_328, 1.34, 1.00),
    "s": ("gmlp_s16_224", 30, 256, 1536, 19_422_656, 4.42, 0.95),
    "b": ("gmlp_b16_224", 30, 512, 3072, 73_075_392, 15.78, 0.80),
}

# PAPER.md section 5, Table 5 (+ the ablation model of Tables 3/4): layers, d_model, d_ffn, tiny attn, params.
TABLE5 = {
    "gmlp-base": (48, 512, 3072, None, 130.07e6),
    "amlp-base": (36, 512, 3072, 64, 108.78e6),
    "gmlp-large": (96, 768, 3072, None, 365.27e6),
    "amlp-large": (72, 768, 3072, 128, 315.60e6),
    "gmlp-xlarge": (144, 1024, 4096, None, 940.58e6),
    "gmlp-ablation": (36, 512, 3072, None, 101.65e6),
}


def _vision_macs_formula(d: int, e: int, tokens: int = 196, depth: int = 30, classes: int = 1000) -> int:
    """fc1 + token mixing (n^2 * d_ffn/2, PAPER.md section 1) + fc2 per block, the 16x16x3 stem, the head."""
    block = tokens * d * e + tokens * tokens * (e // 2) + tokens * (e // 2) * d
    return depth * block + tokens * 16 * 16 * 3 * d + d * classes


def _text_formula(layers: int, d: int, e: int, attn: int | None, n: int = 512, vocab: int = 32000) -> int:
    """PAPER.md section 5's count: per block 2d + d*e + e + e + (2n-1) + n + (e/2)*d + d (+ aMLP's
    3*d*a + a*e/2 + e/2), plus the tied V*d embedding."""
    block = 2 * d + d * e + e + e + (2 * n - 1) + n + (e // 2) * d + d
    if attn:
        block += 3 * d * attn + attn * (e // 2) + e // 2
    return layers * block + vocab * d


# --- vision: Table 1 -------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", sorted(TABLE1))
def test_vision_model_is_table1_exactly(size: str) -> None:
    name, depth, d, e, params, _, _ = TABLE1[size]
    with torch.device("meta"):
        model = create_model(name)
    assert (len(model.blocks), model.embed_dim, model.patch_size) == (depth, d, (16, 16))
    assert model.stem.num_patches == 196
    assert {b.fc1.out_features for b in model.blocks} == {e}
    assert sum(p.numel() for p in model.parameters()) == params
    # full (not Toeplitz) n x n W, mean pooling, no class token and no position embedding anywhere
    assert all(not b.sgu.proj.toeplitz and b.sgu.proj.weight.shape == (196, 196) for b in model.blocks)
    assert model.global_pool == "avg"
    assert not [n for n, _ in model.named_parameters() if "pos" in n or "cls" in n]


@pytest.mark.parametrize("size", sorted(TABLE1))
def test_vision_macs_are_the_analytic_count_and_within_1_percent_of_table1(size: str) -> None:
    from gmlp.train.vision_tools import count_macs

    name, _, d, e, _, paper_gmacs, _ = TABLE1[size]
    with torch.device("meta"):
        model = create_model(name)
    macs = count_macs(model, (3, 224, 224))
    assert macs == _vision_macs_formula(d, e)
    assert abs(macs / 1e9 - paper_gmacs) / paper_gmacs < 0.01  # the paper adds a little element-wise work


def test_vision_init_starts_every_block_as_an_ffn() -> None:
    """Init "critical for stability": W near zero, b = 1 in every block of a real paper-sized model."""
    torch.manual_seed(0)
    model = create_model("gmlp_ti16_224")
    for block in model.blocks:
        assert torch.equal(block.sgu.proj.bias, torch.ones(196))
        assert block.sgu.proj.weight.abs().max() < 1e-4


@pytest.mark.parametrize("size", sorted(TABLE1))
def test_imagenet_recipe_builds_the_table1_model_with_its_survival_probability(size: str) -> None:
    name, _, _, _, params, _, survival = TABLE1[size]
    cfg = VisionTrainConfig(**load_recipe(RECIPE_DIR / f"imagenet_gmlp_{size}.yaml", VisionTrainConfig))
    assert cfg.model == name and cfg.img_size == 224
    assert cfg.drop_path_rate == pytest.approx(1.0 - survival)
    with torch.device("meta"):
        model = create_model(cfg.model, img_size=cfg.img_size, drop_path_rate=cfg.drop_path_rate)
    assert sum(p.numel() for p in model.parameters()) == params
    rates = [float(getattr(b.drop_path, "p", 0.0)) for b in model.blocks]  # (no drop path: Identity)
    assert rates == pytest.approx([1.0 - survival] * 30)  # one survival probability for every block
    # the rest of PAPER.md section 4's recipe (the values tests/train/test_vision_recipes.py pins too)
    assert (cfg.epochs, cfg.batch_size, cfg.lr, cfg.warmup_steps) == (300, 4096, 1e-3, 10_000)
    assert (cfg.betas, cfg.eps, cfg.weight_decay, cfg.grad_clip) == ((0.9, 0.999), 1e-6, 0.05, 1.0)
    assert (cfg.mixup, cfg.cutmix, cfg.mixup_switch_prob, cfg.label_smoothing) == (0.8, 1.0, 0.5, 0.1)
    assert (cfg.reprob, cfg.ema, cfg.drop_rate) == (0.0, False, 0.0)
    assert cfg.auto_augment and cfg.auto_augment.startswith("rand-")


# --- language: Table 5 -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(TABLE5))
def test_text_preset_is_table5_and_follows_the_count_formula_exactly(name: str) -> None:
    layers, d, e, attn, paper = TABLE5[name]
    config = GMLPConfig.from_preset(name)
    assert (config.num_hidden_layers, config.hidden_size, config.intermediate_size) == (layers, d, e)
    assert config.tiny_attn_size == attn
    assert (config.vocab_size, config.max_position_embeddings) == (32000, 512)
    assert config.toeplitz and config.tie_word_embeddings and not config.causal
    assert config.sgu_variant == "sgu"
    with torch.device("meta"):
        model = GMLPForMaskedLM(config)
    body = model.gmlp
    counted = sum(p.numel() for p in body.blocks.parameters()) + body.embed.weight.numel()
    formula = _text_formula(layers, d, e, attn)
    assert counted == formula
    # what the formula leaves out: the token-type embedding, the final norm and the decoder bias
    assert sum(p.numel() for p in model.parameters()) == formula + 2 * d + 2 * d + 32000
    # the paper's (and PRESETS') rounded number is this formula's, to the 0.01M it is given in
    assert round(formula / 1e4) == round(paper / 1e4) == round(PRESETS[name]["params"] / 1e4)
    assert not [n for n, _ in model.named_parameters() if "position" in n]


@pytest.mark.parametrize("name", ["amlp-base", "amlp-large"])
def test_amlp_tiny_attention_wiring(name: str) -> None:
    """One head of 64 / 128 on LayerNorm(x): qkv d_model -> 3a without bias, out a -> d_ffn/2 with bias."""
    config = GMLPConfig.from_preset(name)
    with torch.device("meta"):
        model = GMLPForMaskedLM(config)
    a, d, e = config.tiny_attn_size, config.hidden_size, config.intermediate_size
    for block in model.gmlp.blocks:
        attn = block.tiny_attn
        assert attn.qkv.bias is None and attn.qkv.weight.shape == (3 * a, d)
        assert attn.out.bias is not None and attn.out.weight.shape == (e // 2, a)


def test_text_init_starts_every_block_as_an_ffn() -> None:
    config = GMLPConfig(num_hidden_layers=3, hidden_size=32, intermediate_size=192, vocab_size=64)
    model = GMLPForMaskedLM(config)
    for block in model.gmlp.blocks:
        proj = block.sgu.proj
        assert proj.toeplitz and proj.weight.shape == (2 * 512 - 1,)
        assert torch.equal(proj.bias, torch.ones(512))
        assert proj.weight.abs().max() < 1e-4


# --- language: pretraining and finetuning recipes ---------------------------------------------------------


def _documented_command(doc: Path, marker: str) -> list[str]:
    """The ``gmlp ...`` command of ``doc`` whose comment contains ``marker`` (continuation lines joined)."""
    text = doc.read_text().replace("\\\n", " ")
    for line in text.splitlines():
        if marker in line and line.lstrip().startswith("gmlp "):
            return shlex.split(line.split("#", 1)[0])[1:]
    raise AssertionError(f"{doc.name}: no documented command marked {marker!r}")


def _pretrain_config(argv: list[str]):  # -> PretrainConfig
    from gmlp.cli import build_parser
    from gmlp.train.text import PretrainConfig, config_from_namespace

    return config_from_namespace(PretrainConfig, build_parser().parse_args(argv))


def test_documented_full_pretraining_command_is_the_papers_recipe() -> None:
    """PAPER.md section 5 (full): seq 512, batch 256, 1M steps, lr 1e-4, 10k warmup, linear decay, AdamW
    (0.9, 0.999), eps 1e-6, wd 0.01, 15% masking, no dropout, 32K vocabulary; gMLP-base's sizes."""
    from gmlp.train.text import build_model_config

    argv = _documented_command(ROOT / "docs" / "text_training.md", "the paper's full recipe")
    cfg = _pretrain_config(argv)
    cfg.validate()
    assert argv[0] == "pretrain" and cfg.preset == "gmlp-base"
    assert (cfg.seq_len, cfg.batch_size * cfg.grad_accum, cfg.steps, cfg.lr, cfg.warmup) == (
        512, 256, 1_000_000, 1e-4, 10_000
    )
    assert (cfg.adam_beta1, cfg.adam_beta2, cfg.adam_eps, cfg.weight_decay) == (0.9, 0.999, 1e-6, 0.01)
    assert (cfg.mlm_probability, cfg.dropout, cfg.vocab_size) == (0.15, 0.0, 32000)
    special = {"pad": 0, "cls": 2, "sep": 3, "mask": 4}
    config = build_model_config(cfg, vocab_size=cfg.model_vocab_size or cfg.vocab_size, special_ids=special)
    paper = GMLPConfig.from_preset("gmlp-base")
    keys = ("num_hidden_layers", "hidden_size", "intermediate_size", "max_position_embeddings",
            "vocab_size", "toeplitz", "tiny_attn_size", "sgu_variant", "causal", "hidden_dropout_prob",
            "tie_word_embeddings")
    assert {k: getattr(config, k) for k in keys} == {k: getattr(paper, k) for k in keys}


def test_documented_ablation_command_has_the_ablation_model_and_sequence_length() -> None:
    """Tables 3/4: the 36 x 512 x 3072 model at seq 128, lr 7e-4; the variant from --sgu-variant."""
    from gmlp.train.text import build_model_config

    argv = _documented_command(ROOT / "docs" / "text_training.md", "at the paper's size")
    cfg = _pretrain_config(argv)
    cfg.validate()
    assert cfg.lr == 7e-4 and cfg.mlm_probability == 0.15 and cfg.dropout == 0.0
    config = build_model_config(cfg, vocab_size=32000, special_ids={"pad": 0, "cls": 2, "sep": 3, "mask": 4})
    assert (config.num_hidden_layers, config.hidden_size, config.intermediate_size) == (36, 512, 3072)
    assert config.max_position_embeddings == 128 and config.toeplitz
    assert config.sgu_variant == "additive"


def test_bert_masking_is_15_percent_with_80_10_10() -> None:
    from gmlp.train.text import PretrainConfig, mask_tokens

    assert PretrainConfig().mlm_probability == 0.15
    vocab, mask_id = 1000, 4
    ids = torch.randint(5, vocab, (200, 1000), generator=torch.Generator().manual_seed(0))
    inputs, labels = mask_tokens(
        ids, mask_token_id=mask_id, vocab_size=vocab, special_ids=range(5),
        generator=torch.Generator().manual_seed(1),
    )
    selected = labels != -100
    assert torch.equal(labels[selected], ids[selected])
    assert torch.equal(inputs[~selected], ids[~selected])
    n = selected.sum().item()
    assert n / ids.numel() == pytest.approx(0.15, abs=0.003)
    masked = (inputs[selected] == mask_id).sum().item() / n
    kept = (inputs[selected] == ids[selected]).sum().item() / n
    assert masked == pytest.approx(0.8, abs=0.01)
    assert kept == pytest.approx(0.1 + 0.1 / vocab, abs=0.01)  # "unchanged" (+ random draws of the same id)
    assert 1 - masked - kept == pytest.approx(0.1, abs=0.01)


def test_finetuning_defaults_that_follow_the_paper() -> None:
    """PAPER.md section 5 finetuning: dropout 0.1, 10% warmup, seq 128, batch 32 (SST-2/MNLI). The lr and
    epochs differ on purpose (offline CPU defaults; see the report / docs)."""
    from gmlp.train.text import NEW_MODEL_SEQ_LEN, FinetuneConfig

    cfg = FinetuneConfig()
    assert (cfg.dropout, cfg.warmup, cfg.batch_size, NEW_MODEL_SEQ_LEN) == (0.1, 0.1, 32, 128)
    assert (cfg.adam_beta1, cfg.adam_beta2, cfg.adam_eps, cfg.weight_decay) == (0.9, 0.999, 1e-6, 0.01)


def test_table3_variants_are_the_papers_gating_functions() -> None:
    """Table 3's s(Z) rows that are gating functions are all there (MLP-Mixer and BERT rows are baselines)."""
    from gmlp.nn import VARIANTS

    assert {"linear", "additive", "multiplicative", "sgu"} <= set(VARIANTS)
    assert re.search(r"Z1 \* f\(Z2\)", VARIANTS["sgu"]) and VARIANTS["additive"] == "s(Z) = Z + f(Z)"


# --- recipe values ---------------------------------------------------------------------------------------


def _float_settings() -> list[str]:
    import typing

    from gmlp.train.recipe import setting_types

    def has_float(tp: object) -> bool:
        return tp is float or any(has_float(a) for a in typing.get_args(tp))

    return sorted(name for name, tp in setting_types(VisionTrainConfig).items() if has_float(tp))


@pytest.mark.parametrize("text", [".inf", "-.inf", "inf", "-Infinity"])
def test_recipe_refuses_an_infinite_number_for_every_float_setting(tmp_path: Path, text: str) -> None:
    """An infinite lr (or eps, weight decay, ...) passed every range check (``lr > 0``) and the run died at
    its first steps with a NaN loss that blamed the learning rate and grad_clip; now it is a usage error
    naming the setting, from a recipe file and from a flag alike."""
    from gmlp.train.recipe import ConfigError, RecipeError, merge_settings

    names = _float_settings()
    assert {"lr", "min_lr", "eps", "weight_decay", "grad_clip", "warmup_lr", "betas"} <= set(names)
    for name in names:
        tp_is_tuple = name in ("betas", "crop_scale", "mean", "std")
        value = f"[{text}, 0.5]" if tp_is_tuple else text
        recipe = tmp_path / f"{name}.yaml"
        recipe.write_text(f"{name}: {value}\n")
        with pytest.raises(RecipeError, match=rf"key '{name}(\[0\])?' must be"):
            load_recipe(recipe, VisionTrainConfig)
        if not tp_is_tuple:
            with pytest.raises(ConfigError, match=rf"'{name}' must be"):
                merge_settings(VisionTrainConfig, {}, {name: float(text.replace(".inf", "inf"))})
