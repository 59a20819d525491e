"""Bad constructor arguments and inputs of the layers get errors that name the argument; the checks never
cost the hot path its speed nor bypass a hook."""

from __future__ import annotations

import pytest
import torch

from gmlp.nn import GMLPBlock, PatchEmbed, SpatialGatingUnit, TokenProjection


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: TokenProjection(True), "seq_len must be an int >= 1, got True"),
        (lambda: TokenProjection(4, init_std=-1.0), r"init_std must be a number in \[0, inf\), got -1.0"),
        (lambda: TokenProjection(4, init_std=float("nan")), "init_std must be a number"),
        (lambda: TokenProjection(4, heads=0), "heads must be an int >= 1, got 0"),
        (lambda: TokenProjection(4, toeplitz=True, fft_threshold=0), "fft_threshold must be an int >= 1"),
        (lambda: TokenProjection(4, toeplitz=True, fft_threshold=2.5), "fft_threshold must be an int >= 1"),
        (lambda: SpatialGatingUnit(0, 8), "dim must be an int >= 1, got 0"),
        (lambda: SpatialGatingUnit(-4, 8), "dim must be an int >= 1, got -4"),
        (lambda: SpatialGatingUnit(4.0, 8), "dim must be an int >= 1, got 4.0"),
        (lambda: SpatialGatingUnit(4, 0), "seq_len must be an int >= 1, got 0"),
        (lambda: SpatialGatingUnit(4, 8, norm_eps=-1.0), r"norm_eps must be a number in \(0, inf\)"),
        (lambda: SpatialGatingUnit(4, 8, heads=True), r"heads \(True\) must be a positive divisor"),
        (lambda: GMLPBlock(True, 32, 8), "dim must be an int >= 1, got True"),
        (lambda: GMLPBlock(16, 0, 8), "dim_ffn must be an int >= 1, got 0"),
        (lambda: GMLPBlock(16, 32, 8, norm_eps=-1.0), r"norm_eps must be a number in \(0, inf\), got -1.0"),
        (lambda: GMLPBlock(16, 32, 8, sgu_norm_eps=0.0), r"^sgu_norm_eps must be a number in \(0, inf\)"),
        (lambda: GMLPBlock(16, 32, 8, dropout=1.0), r"dropout must be a number in \[0, 1\), got 1.0"),
        (lambda: GMLPBlock(16, 32, 8, drop_path=-0.1), r"drop path probability p must be a number in \["),
        (lambda: PatchEmbed(8, 4, in_chans=0), "in_chans must be an int >= 1, got 0"),
        (lambda: PatchEmbed(8, 4, dim=-8), "dim must be an int >= 1, got -8"),
        (lambda: PatchEmbed(True, 4), "img_size must be a positive int or a pair of positive ints"),
    ],
)
def test_bad_constructor_arguments_are_named(build, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build()


@pytest.mark.parametrize("flag", ["toeplitz", "causal"])
def test_flags_must_be_bools(flag: str) -> None:
    with pytest.raises(TypeError, match=f"{flag} must be True or False, got 'no'"):
        TokenProjection(4, **{flag: "no"})


def test_token_projection_checks_its_input_and_takes_int_masks() -> None:
    torch.manual_seed(0)
    proj = TokenProjection(6)
    torch.nn.init.normal_(proj.weight)
    z = torch.randn(6, 2, 4)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    assert torch.equal(proj(z, mask), proj(z, mask.bool()))  # the documented 1/0 mask works
    assert not torch.equal(proj(z, mask), proj(z))
    with pytest.raises(ValueError, match=r"z must have shape \(seq_len, batch, channels\).*got shape \(6, 4"):
        proj(torch.randn(6, 4))
    with pytest.raises(ValueError, match="z has sequence length 7, longer than the configured seq_len=6"):
        proj(torch.randn(7, 2, 4))
    with pytest.raises(ValueError, match=r"mask must have shape \(batch, seq_len\) = \(2, 6\), got \(1, 6\)"):
        proj(z, mask[:1])  # not broadcast over the batch
    with pytest.raises(TypeError, match="mask must be a bool or integer tensor"):
        proj(z, mask.float())
    with pytest.raises(ValueError, match=r"z's channels \(5\) must be divisible by heads \(2\)"):
        TokenProjection(6, heads=2)(torch.randn(6, 2, 5))


def test_gate_bias_must_match_the_gate() -> None:
    sgu = SpatialGatingUnit(16, 6)
    z = torch.randn(6, 2, 16)
    good = torch.randn(6, 2, 8)
    assert torch.allclose(sgu(z, gate_bias=good), z[..., :8] * (sgu.proj(sgu.norm(z[..., 8:])) + good))
    for shape in [(6, 2, 7), (8,), (6, 1, 8), (1, 2, 8)]:  # too narrow, and broadcastable ones
        with pytest.raises(ValueError, match=r"gate_bias must have shape \(seq, batch, gate_dim\) = \(6, 2"):
            sgu(z, gate_bias=torch.randn(shape))
    with pytest.raises(ValueError, match="gate_bias must have z's dtype torch.float32, got torch.float64"):
        sgu(z, gate_bias=good.double())


def test_patch_embed_refuses_raw_integer_images() -> None:
    stem = PatchEmbed(8, 4, in_chans=1, dim=16)
    with pytest.raises(TypeError, match=r"images must be a floating-point tensor.*got dtype torch.uint8"):
        stem(torch.zeros(2, 1, 8, 8, dtype=torch.uint8))


@pytest.mark.parametrize("kind", ["forward", "forward_pre", "full_backward", "subclass"])
def test_the_blocks_unchecked_token_mixing_keeps_hooks_and_subclasses(kind: str) -> None:
    """GMLPBlock runs ``TokenProjection.mix`` (no input checks) only where calling the module would run
    exactly its forward; a hook or a subclass still sees every call."""
    torch.manual_seed(0)
    block = GMLPBlock(16, 32, 6)
    calls: list[str] = []
    if kind == "subclass":

        class Counting(TokenProjection):
            def forward(self, z: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
                calls.append("forward")
                return super().forward(z, mask)

        block.sgu.proj = Counting(6)
    elif kind == "forward":
        block.sgu.proj.register_forward_hook(lambda *a: calls.append("hook"))
    elif kind == "forward_pre":
        block.sgu.proj.register_forward_pre_hook(lambda *a: calls.append("hook"))
    else:
        block.sgu.proj.register_full_backward_hook(lambda *a: calls.append("hook"))
    x = torch.randn(6, 2, 16, requires_grad=True)
    block(x).sum().backward()
    assert len(calls) == 1
