"""accelerate's big-model paths (``device_map`` with disk offload, sharded checkpoints, meta-device init) and
wrapped layers (peft LoRA) on the gMLP text models: every output is the one of the plain in-memory model.

With offloading, accelerate keeps a module's weights on the meta device between calls and brings them in only
for the module's own forward: a model that reads a weight directly (not through a call) reads nothing. The
same goes for a LoRA layer, whose ``weight`` is the frozen base weight without the adapter.

Everything is local (tiny models, no Hub) and CPU-only.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import transformers
from text_hf_helpers import VOCAB, randomize, tiny_config
from transformers import AutoModel

from gmlp.models.text import (
    GMLPForCausalLM,
    GMLPForMaskedLM,
    GMLPForTokenClassification,
    GMLPModel,
)


def _offload_all(folder) -> dict:
    """``from_pretrained`` options with a CPU budget below any module: accelerate puts the whole model on
    "disk" (in ``folder``), its weights on the meta device between calls."""
    return {"device_map": "auto", "max_memory": {"cpu": "1KB", "disk": "1GB"}, "offload_folder": folder}


def _model(cls: type, **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    if cls is GMLPForCausalLM:
        overrides.setdefault("causal", True)
    return randomize(cls(tiny_config(num_labels=3, **overrides)))


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Two rows: unpadded and left-padded (3 pads: the real tokens are moved, an attention map re-indexed)."""
    ids = torch.randint(5, len(VOCAB), (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    return ids, mask


def _same(a: object, b: object) -> bool:
    """Equal outputs: tensors bit for bit, tuples of them entry by entry."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.device == b.device and torch.equal(a, b)
    return isinstance(b, tuple) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))


#: transformers 4.x refuses to offload a whole model to disk through from_pretrained (it points to
#: accelerate's disk_offload) and takes no "disk" budget in max_memory
TRANSFORMERS_5 = int(transformers.__version__.split(".")[0]) >= 5
OFFLOAD_ALL = pytest.mark.skipif(not TRANSFORMERS_5, reason="whole-model disk offload needs transformers 5")


@OFFLOAD_ALL
@pytest.mark.parametrize("types", [2, 0], ids=["token_types", "no_token_types"])
@pytest.mark.parametrize("cls", [GMLPModel, GMLPForMaskedLM, GMLPForCausalLM, GMLPForTokenClassification])
def test_disk_offloaded_sharded_model_gives_the_in_memory_outputs(tmp_path, cls: type, types: int) -> None:
    """A sharded checkpoint loaded with everything offloaded to disk gives the in-memory model's outputs,
    losses, hidden states and (aMLP) attention maps exactly: with and without token types, labels and a
    left-padded row. (It used to read the token-type weight, move the labels to the offloaded head's meta
    device, and compute the maps from the meta qkv weight: an error, an error, and maps of garbage.)"""
    model = _model(cls, type_vocab_size=types)
    model.save_pretrained(tmp_path / "saved", max_shard_size="20KB")
    index = json.loads((tmp_path / "saved" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # (really sharded)
    loaded = type(model).from_pretrained(tmp_path / "saved", **_offload_all(tmp_path / "off")).eval()
    assert all(p.is_meta for p in loaded.parameters())  # (really offloaded: nothing in memory between calls)
    ids, mask = _batch()
    calls = [{}, {"attention_mask": mask}, {"attention_mask": mask, "output_hidden_states": True}]
    calls.append({"attention_mask": mask, "output_attentions": True})
    if cls is GMLPForTokenClassification:
        labels = torch.randint(0, 3, ids.shape, generator=torch.Generator().manual_seed(2))
        calls.append({"attention_mask": mask, "labels": labels})
    elif cls is not GMLPModel:
        calls.append({"attention_mask": mask, "labels": ids})
    for kwargs in calls:
        with torch.no_grad():
            expected, got = model(ids, **kwargs).to_tuple(), loaded(ids, **kwargs).to_tuple()
        assert len(got) == len(expected), kwargs
        for a, b in zip(expected, got, strict=True):
            assert _same(a, b), kwargs


@OFFLOAD_ALL
def test_generate_with_a_disk_offloaded_causal_lm(tmp_path) -> None:
    """Greedy generation of an offloaded causal LM (no token types needed) is the in-memory model's."""
    model = _model(GMLPForCausalLM)
    model.save_pretrained(tmp_path / "saved")
    loaded = GMLPForCausalLM.from_pretrained(tmp_path / "saved", **_offload_all(tmp_path / "off"))
    prompt = torch.tensor([[2, 7, 9, 11]])
    options = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
    assert torch.equal(loaded.eval().generate(prompt, **options), model.generate(prompt, **options))


def test_lora_on_token_types_and_tiny_attention_acts_as_merged() -> None:
    """peft LoRA on the token-type embedding and on the tiny attention's qkv: the adapted model's logits and
    attention maps are those of the merged model (the maps used to come from qkv's frozen base weight and the
    default token type from the embedding's, without the adapter)."""
    peft = pytest.importorskip("peft")
    model = _model(GMLPForMaskedLM)
    targets = ["qkv", "token_type_embed"]
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    adapted = peft.get_peft_model(copy.deepcopy(model), lora).eval()
    merged = copy.deepcopy(adapted).merge_and_unload().eval()
    ids, mask = _batch()
    with torch.no_grad():
        for kwargs in ({}, {"attention_mask": mask}):
            got = adapted(input_ids=ids, output_attentions=True, **kwargs)
            want = merged(input_ids=ids, output_attentions=True, **kwargs)
            torch.testing.assert_close(got.logits, want.logits, atol=1e-5, rtol=1e-5)
            for a, b in zip(got.attentions, want.attentions, strict=True):
                torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
        # (and the adapter does change the model: the test sees it)
        assert not torch.allclose(model(ids).logits, merged(ids).logits, atol=1e-4)


@pytest.mark.parametrize("variant", [{"tiny_attn_size": 8}, {"sgu_variant": "mixer", "tiny_attn_size": None},
                                     {"toeplitz": False, "sgu_heads": 2}], ids=str)  # fmt: skip
def test_missing_keys_are_initialised_as_from_config(tmp_path, variant: dict) -> None:
    """A checkpoint with fewer blocks, no token types and no head, loaded into a larger model (meta-device
    init, as from_pretrained always does in transformers 5): the loaded tensors are kept exactly and every
    missing one gets the initialisation of a model built from its config (constants exactly: LayerNorm 1/0,
    biases 0, the spatial b = 1; normal draws with the config's std)."""
    small = _model(GMLPModel, num_hidden_layers=1, type_vocab_size=0, **variant)
    small.save_pretrained(tmp_path)
    config = tiny_config(num_hidden_layers=2, type_vocab_size=2, tie_word_embeddings=False, **variant)
    loaded, info = GMLPForMaskedLM.from_pretrained(tmp_path, config=config, output_loading_info=True)
    fresh = GMLPForMaskedLM(copy.deepcopy(config)).state_dict()
    state, saved = loaded.state_dict(), small.state_dict()
    # (transformers 4.x names them without the base model's prefix)
    missing = {k if k in state else "gmlp." + k for k in info["missing_keys"]}
    assert missing == set(fresh) - {"gmlp." + k for k in saved}  # (the lacking ones, only)
    for key, value in saved.items():
        assert torch.equal(state["gmlp." + key], value), key
    for key in missing:
        got, want = state[key], fresh[key]
        assert got.shape == want.shape and bool(torch.isfinite(got).all()), key
        if bool((want == want.flatten()[0]).all()):  # a constant init
            assert torch.equal(got, want), key
        else:  # a normal draw: mean ~0, the same std
            assert abs(got.mean().item()) < 3 * want.std().item() / got.numel() ** 0.5 + 1e-12, key
            assert 0.5 < got.std().item() / want.std().item() < 2, key


@pytest.mark.skipif(not TRANSFORMERS_5, reason="transformers 4.x's init_weights skips the modules that "
                    "post_init marked initialised")
def test_meta_init_then_init_weights_initialises_everything() -> None:
    """``with torch.device("meta")``, ``to_empty`` and ``init_weights()`` give every tensor its init (no
    buffer or parameter left empty), and the tying is back."""
    config = tiny_config()
    with torch.device("meta"):
        model = GMLPForMaskedLM(config)
    model.to_empty(device="cpu")
    model.init_weights()
    assert model.decoder.weight is model.gmlp.embed.weight
    assert list(model.named_buffers()) == []  # (nothing that meta init could leave without a value)
    reference = GMLPForMaskedLM(copy.deepcopy(config)).state_dict()
    for key, value in model.state_dict().items():
        want = reference[key]
        if bool((want == want.flatten()[0]).all()):
            assert torch.equal(value, want), key
        else:
            assert 0.5 < value.std().item() / want.std().item() < 2, key


def test_attention_implementations_other_than_eager_are_refused() -> None:
    """gMLP has no attention layer that transformers could swap: ``attn_implementation="sdpa"`` (or flash)
    is refused with a ValueError naming the model, not silently ignored; ``"eager"`` is accepted."""
    config = tiny_config()
    assert AutoModel.from_config(config, attn_implementation="eager").config._attn_implementation == "eager"
    with pytest.raises(ValueError, match="GMLPModel"):
        AutoModel.from_config(copy.deepcopy(config), attn_implementation="sdpa")
