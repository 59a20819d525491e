"""Correctness of every accelerator path on one device, without pytest: run before timing anything on a GPU.

    python benchmarks/gpu_checks.py                 # CUDA (the lent H100/H200), full sizes
    TRITON_INTERPRET=1 python benchmarks/gpu_checks.py --device cpu --small   # dry run here (tests do this)

Checks, each against the plain reference path with fresh random inputs, forward and gradients:
the fused Triton GELU+split+LayerNorm kernel (fp32 and bf16), a GMLPBlock through the kernel vs through
the plain ops, the FFT Toeplitz path vs the dense GEMM, a whole gMLP-S/16 training step under bf16 autocast
(kernel vs plain ops), causality (gradients of earlier outputs w.r.t. later tokens are exactly zero) and
padding invariance of the text model on the device. Prints one line per check; exits 1 if any fails.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import gmlp.nn.block as block_module  # noqa: E402
from gmlp.kernels import gelu_split_layernorm, gelu_split_layernorm_reference  # noqa: E402
from gmlp.nn import GMLPBlock, TokenProjection  # noqa: E402


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float, atol: float, what: str) -> None:
    if not torch.allclose(a.float(), b.float(), rtol=rtol, atol=atol):
        err = (a.float() - b.float()).abs().max().item()
        raise AssertionError(f"{what}: max abs difference {err:.3g} (rtol {rtol}, atol {atol})")


def check_kernel(device: torch.device, rows: int, half: int, dtype: torch.dtype) -> None:
    """Fused kernel == reference for z1, LN(z2) and the gradients of u, weight, bias."""
    u = (2 * torch.randn(rows, 2 * half, device=device)).to(dtype).requires_grad_()
    w = torch.randn(half, device=device, dtype=dtype, requires_grad=True)
    b = torch.randn(half, device=device, dtype=dtype, requires_grad=True)
    fused = gelu_split_layernorm(u, w, b, 1e-5, use_triton=True)
    ref = gelu_split_layernorm_reference(u.float(), w.float(), b.float(), 1e-5)  # fp32 reference
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    for name, f, r in zip(("z1", "z2n"), fused, ref, strict=True):
        _close(f, r, tol, tol, f"{name} ({dtype})")
    seeds = [torch.randn_like(r) for r in ref]
    gf = torch.autograd.grad(sum((f.float() * s).sum() for f, s in zip(fused, seeds, strict=True)), [u, w, b])
    leaves = [t.detach().float().requires_grad_() for t in (u, w, b)]
    ref = gelu_split_layernorm_reference(*leaves, 1e-5)
    gr = torch.autograd.grad(sum((r * s).sum() for r, s in zip(ref, seeds, strict=True)), leaves)
    gtol = 1e-3 if dtype == torch.float32 else 1e-1
    for name, a, c in zip(("du", "dweight", "dbias"), gf, gr, strict=True):
        scale = c.abs().max().item() + 1e-6
        _close(a / scale, c / scale, gtol, gtol, f"{name} ({dtype}, relative to max {scale:.3g})")


def _both_paths() -> Iterator[bool]:
    """Yield True (blocks take the Triton kernel), then False (plain ops); restores the default after."""
    saved = block_module.triton_enabled
    try:
        for enabled in (True, False):
            block_module.triton_enabled = lambda x, enabled=enabled: enabled
            yield enabled
    finally:
        block_module.triton_enabled = saved


def check_block(device: torch.device, dim: int, ffn: int, n: int, batch: int) -> None:
    """A block through the Triton kernel == the same block through the plain ops (fp32)."""
    block = GMLPBlock(dim, ffn, n, attn_dim=32).to(device)
    torch.nn.init.normal_(block.sgu.proj.weight, std=0.05)
    x = torch.randn(n, batch, dim, device=device, requires_grad=True)
    outs, grads = [], []
    for _ in _both_paths():
        y = block(x)
        outs.append(y)
        grads.append(torch.autograd.grad(y.square().sum(), [x, *block.parameters()]))
    _close(outs[0], outs[1], 1e-4, 1e-4, "block output")
    for i, (a, b) in enumerate(zip(*grads, strict=True)):
        scale = b.abs().max().item() + 1e-6
        _close(a / scale, b / scale, 1e-3, 1e-3, f"block gradient {i}")


def check_fft(device: torch.device, n: int, columns: int) -> None:
    dense = TokenProjection(n, toeplitz=True).to(device)
    torch.nn.init.normal_(dense.weight, std=0.05)
    fft = TokenProjection(n, toeplitz=True, fft_threshold=1).to(device)
    fft.load_state_dict(dense.state_dict())
    z = torch.randn(n, 2, columns // 2, device=device, requires_grad=True)
    a, b = fft(z), dense(z)
    _close(a, b, 1e-4, 1e-4, "FFT mixing output")
    ga, gb = torch.autograd.grad(a.sum(), z), torch.autograd.grad(b.sum(), z)
    _close(ga[0], gb[0], 1e-3, 1e-3, "FFT mixing gradient")


def check_model_step(device: torch.device, small: bool) -> None:
    """One bf16-autocast training step of a vision gMLP: kernel path vs plain ops, loss and gradients."""
    from gmlp import create_model

    name, img, batch = ("gmlp_micro4_28", 28, 4) if small else ("gmlp_s16_224", 224, 16)
    kwargs = {"in_chans": 1} if small else {}
    torch.manual_seed(0)
    model = create_model(name, **kwargs).to(device)
    x = torch.randn(batch, kwargs.get("in_chans", 3), img, img, device=device)
    y = torch.randint(0, model.num_classes, (batch,), device=device)
    results = []
    for _ in _both_paths():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        grads = torch.autograd.grad(loss, list(model.parameters()))
        results.append((loss.detach(), torch.cat([g.float().flatten() for g in grads])))
    (la, ga), (lb, gb) = results
    _close(la, lb, 2e-2, 2e-2, "bf16 loss")
    cos = torch.nn.functional.cosine_similarity(ga, gb, dim=0).item()
    if cos < 0.99:
        raise AssertionError(f"bf16 gradients: cosine similarity {cos:.4f} < 0.99")


def check_text_properties(device: torch.device) -> None:
    """Causal LM: d out[i] / d in[j] == 0 for j > i; MLM: padded batch == unpadded run at the real tokens."""
    from gmlp.models.text import GMLPConfig, GMLPForCausalLM, GMLPForMaskedLM

    cfg = dict(
        vocab_size=101,
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        max_position_embeddings=24,
        tiny_attn_size=16,
    )
    torch.manual_seed(0)
    lm = GMLPForCausalLM(GMLPConfig(**cfg, causal=True)).to(device).eval()
    emb = lm.get_input_embeddings()(torch.randint(0, 101, (1, 24), device=device)).detach().requires_grad_()
    out = lm(inputs_embeds=emb).logits
    for i in (0, 7, 22):
        (g,) = torch.autograd.grad(out[0, i].sum(), emb, retain_graph=True)
        leak = g[0, i + 1 :].abs().max().item()
        if leak != 0.0:
            raise AssertionError(f"causal LM: output {i} depends on later tokens (gradient {leak:g})")
    mlm = GMLPForMaskedLM(GMLPConfig(**cfg)).to(device).eval()
    ids = torch.randint(1, 101, (1, 15), device=device)
    padded = torch.cat([ids, torch.zeros(1, 9, dtype=torch.long, device=device)], dim=1)
    mask = torch.cat([torch.ones(1, 15), torch.zeros(1, 9)], dim=1).to(device)
    with torch.no_grad():
        a = mlm(padded, attention_mask=mask).logits[:, :15]
        b = mlm(ids).logits
    _close(a, b, 1e-4, 1e-4, "padding invariance")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--small", action="store_true", help="tiny sizes (for the Triton interpreter on CPU)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    if args.small:
        kernel_cases = [(5, 24), (3, 40)]
        block_case, fft_case = (32, 64, 12, 2), (40, 64)
    else:
        kernel_cases = [(4096, 768), (1000, 1536), (7, 3072)]
        block_case, fft_case = (256, 1536, 196, 8), (1024, 8192)
    checks: list[tuple[str, Callable[[], None]]] = []
    for rows, half in kernel_cases:
        for dtype in (torch.float32, torch.bfloat16):
            checks.append(
                (
                    f"triton kernel rows={rows} C={half} {dtype}",
                    lambda r=rows, h=half, d=dtype: check_kernel(device, r, h, d),
                )
            )
    checks += [
        ("block: kernel path == plain ops", lambda: check_block(device, *block_case)),
        ("FFT Toeplitz == dense GEMM", lambda: check_fft(device, *fft_case)),
        ("bf16 training step: kernel path == plain ops", lambda: check_model_step(device, args.small)),
        ("text: causality and padding on device", lambda: check_text_properties(device)),
    ]
    failed = 0
    for name, fn in checks:
        try:
            fn()
            print(f"PASS  {name}", flush=True)
        except Exception:  # report every check, then fail at the end
            failed += 1
            print(f"FAIL  {name}\n{traceback.format_exc()}", flush=True)
    print(
        f"{len(checks) - failed}/{len(checks)} checks passed on {device}"
        + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
