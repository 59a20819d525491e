"""Correctness of every accelerator path on one device, without pytest: run before timing anything on a GPU.

    python benchmarks/gpu_checks.py                 # CUDA (the lent H100/H200), full sizes
    TRITON_INTERPRET=1 python benchmarks/gpu_checks.py --device cpu --small   # dry run here (tests do this)
    python benchmarks/gpu_checks.py --kernels-only --triton-config "$(cat best.json)"   # after kernel_sweep

Checks, each against the plain reference path with fresh random inputs, forward and gradients:
the fused Triton GELU+split+LayerNorm kernel (fp32 and bf16), the compute-dtype LayerNorm kernels, the
fused whole-gating kernels (``spatial_gating``, fp32 and bf16, with a padding mask and a causal W), a
GMLPBlock (a dense W; and the text models' Toeplitz W) through either kernel path vs through the plain ops,
the Toeplitz W's diagonal-sum backward vs autograd's, the FFT Toeplitz path vs the dense GEMM, a
whole gMLP-S/16 training step under bf16 autocast (each kernel path vs plain ops), causality (gradients
of earlier outputs w.r.t. later tokens are exactly zero) and padding invariance of the text model on the
device, and (CUDA only) a training step captured as a CUDA graph against the same steps run eagerly (also
after warm-up batches without padding, with gradient clipping inside the graph).
Prints one line per check; exits 1 if any fails. ``--triton-config`` runs them on other launch parameters
of the fused kernels; ``--kernels-only`` runs the kernel, gating, LayerNorm and block checks only.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import gmlp.nn.block as block_module  # noqa: E402
from gmlp.kernels import (  # noqa: E402
    gelu_split_layernorm,
    gelu_split_layernorm_reference,
    layer_norm,
    layer_norm_reference,
    spatial_gating,
    spatial_gating_reference,
)
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


def check_gating(
    device: torch.device, n: int, batch: int, half: int, dtype: torch.dtype, padded: bool
) -> None:
    """Fused spatial_gating == the fp32 reference: output and the gradients of every input. ``padded``
    adds a padding mask and a causal (lower-triangular) W."""
    u = (2 * torch.randn(n, batch, 2 * half, device=device)).to(dtype).requires_grad_()
    w = 0.5 * torch.randn(n, n, device=device) / n**0.5
    mask = None
    if padded:
        w = w.tril()
        mask = torch.ones(batch, n, dtype=torch.bool, device=device)
        mask[0, n // 2 :] = False
    params = [1 + 0.1 * torch.randn(half, device=device), 0.1 * torch.randn(half, device=device), w,
              1 + 0.1 * torch.randn(n, device=device)]  # fmt: skip
    params = [p.requires_grad_() for p in params]
    fused = spatial_gating(u, params[0], params[1], 1e-5, params[2], params[3], mask, use_triton=True)
    leaves = [t.detach().float().requires_grad_() for t in (u, *params)]
    ref = spatial_gating_reference(leaves[0], leaves[1], leaves[2], 1e-5, leaves[3], leaves[4], mask)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    scale = ref.abs().max().item()
    _close(fused / scale, ref / scale, tol, tol, f"gating output ({dtype}, relative to max {scale:.3g})")
    seed = torch.randn_like(ref)
    got = torch.autograd.grad((fused.float() * seed).sum(), [u, *params])
    want = torch.autograd.grad((ref * seed).sum(), leaves)
    gtol = 1e-3 if dtype == torch.float32 else 5e-2
    for name, a, c in zip(("du", "dnorm_weight", "dnorm_bias", "dW", "db"), got, want, strict=True):
        scale = c.abs().max().item() + 1e-6
        _close(a / scale, c / scale, gtol, gtol, f"{name} ({dtype}, relative to max {scale:.3g})")


def check_norm(device: torch.device, rows: int, dim: int) -> None:
    """Compute-dtype LayerNorm (float32 in, bf16 out) == F.layer_norm + cast; gradients in float32."""
    x = (3 * torch.randn(rows, dim, device=device) + 1).requires_grad_()
    w = (1 + 0.1 * torch.randn(dim, device=device)).requires_grad_()
    b = (0.1 * torch.randn(dim, device=device)).requires_grad_()
    got = layer_norm(x, w, b, 1e-6, torch.bfloat16)
    want = layer_norm_reference(x, w, b, 1e-6, torch.float32)
    if got.dtype != torch.bfloat16:
        raise AssertionError(f"layer_norm output dtype {got.dtype}, expected bfloat16")
    _close(got, want, 1e-2, 1e-2, "layer_norm output (bf16)")
    seed = torch.randn(rows, dim, device=device).bfloat16().float()  # the bf16 output's gradient is bf16
    grads = torch.autograd.grad((got.float() * seed).sum(), [x, w, b])
    ref = torch.autograd.grad((want * seed).sum(), [x, w, b])
    for name, a, c in zip(("dx", "dweight", "dbias"), grads, ref, strict=True):
        scale = c.abs().max().item() + 1e-6
        _close(a / scale, c / scale, 1e-3, 1e-3, f"layer_norm {name} (relative to max {scale:.3g})")


PATHS = ("fused gating", "fused gating, fc1 bias folded", "fused gating, residual grad fused",
         "fused gating, token bias in GEMM", "split kernel", "split kernel, fc1 bias folded",
         "plain ops")  # fmt: skip
KERNEL_PATHS = PATHS[:-1]  # each checked against "plain ops"
_PATH_SWITCHES = {"fc1 bias folded": "GMLP_FOLD_FC1_BIAS", "residual grad fused": "GMLP_FUSE_RESIDUAL_GRAD",
                  "token bias in GEMM": "GMLP_TOKEN_BIAS_IN_GEMM"}  # fmt: skip


def _paths() -> Iterator[str]:
    """Yield each of PATHS with GMLPBlock routed through it (a suffix of :data:`_PATH_SWITCHES`: with that
    variable set to 1); restores the defaults after."""
    saved = block_module.triton_enabled, block_module.fused_gating_enabled
    saved_env = {name: os.environ.pop(name, None) for name in _PATH_SWITCHES.values()}
    try:
        for path in PATHS:
            fused = path.startswith("fused gating")
            block_module.triton_enabled = lambda x, on=path != "plain ops": on
            block_module.fused_gating_enabled = lambda *_, on=fused: on
            switches = [name for suffix, name in _PATH_SWITCHES.items() if path.endswith(suffix)]
            os.environ.update(dict.fromkeys(switches, "1"))
            yield path
            for name in switches:
                os.environ.pop(name, None)
    finally:
        block_module.triton_enabled, block_module.fused_gating_enabled = saved
        for name, value in saved_env.items():
            os.environ.pop(name, None)
            if value is not None:
                os.environ[name] = value


def check_block(device: torch.device, dim: int, ffn: int, n: int, batch: int, toeplitz: bool = False) -> None:
    """A block through either kernel path == the same block through the plain ops (fp32). ``toeplitz``: the
    text models' block (a Toeplitz W, whose gradient flows back through the matrix built from it, and no
    tiny attention), as the suite's MLM rows time it; else an aMLP block with a dense W."""
    block = GMLPBlock(dim, ffn, n, attn_dim=None if toeplitz else 32, toeplitz=toeplitz).to(device)
    torch.nn.init.normal_(block.sgu.proj.weight, std=0.05)
    x = torch.randn(n, batch, dim, device=device, requires_grad=True)
    outs, grads = {}, {}
    for path in _paths():
        outs[path] = block(x)
        grads[path] = torch.autograd.grad(outs[path].square().sum(), [x, *block.parameters()])
    for path in KERNEL_PATHS:
        _close(outs[path], outs["plain ops"], 1e-4, 1e-4, f"block output ({path})")
        for i, (a, b) in enumerate(zip(grads[path], grads["plain ops"], strict=True)):
            scale = b.abs().max().item() + 1e-6
            _close(a / scale, b / scale, 1e-3, 1e-3, f"block gradient {i} ({path})")


def check_compiled_kernels(device: torch.device, dim: int, ffn: int, n: int, batch: int, small: bool) -> None:
    """A block compiled (fullgraph; inductor on CUDA, aot_eager for the dry run) with the fused gating kept
    as custom ops == the eager block, in bf16 autocast: output and every gradient."""
    from run import environment

    block = GMLPBlock(dim, ffn, n, attn_dim=32).to(device)
    torch.nn.init.normal_(block.sgu.proj.weight, std=0.05)
    x = torch.randn(n, batch, dim, device=device, requires_grad=True)
    params = [x, *block.parameters()]

    def run(fn: Callable[..., torch.Tensor]) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = fn(x)
        return out.float(), torch.autograd.grad(out.float().square().sum(), params)

    ref, g_ref = run(block)
    saved = block_module.compiled_kernels_enabled
    if small:  # no CUDA in the dry run: route the block as if it were
        block_module.compiled_kernels_enabled = lambda t: torch.compiler.is_compiling()
    try:
        torch._dynamo.reset()
        backend = "aot_eager" if small else "inductor"
        with environment({"GMLP_TRITON_UNDER_COMPILE": "1"}):
            out, grads = run(torch.compile(block, backend=backend, fullgraph=True))
    finally:
        torch._dynamo.reset()
        block_module.compiled_kernels_enabled = saved
    _close(out, ref, 2e-2, 2e-2, "compiled block output")
    for i, (a, b) in enumerate(zip(grads, g_ref, strict=True)):
        scale = b.abs().max().item() + 1e-6
        _close(a / scale, b / scale, 2e-2, 2e-2, f"compiled block gradient {i}")


def check_fft(device: torch.device, n: int, columns: int) -> None:
    """The FFT Toeplitz mixing == the dense GEMM of the same W: output and the gradients of z, W and b."""
    dense = TokenProjection(n, toeplitz=True).to(device)
    torch.nn.init.normal_(dense.weight, std=0.05)
    torch.nn.init.normal_(dense.bias, std=0.05)
    fft = TokenProjection(n, toeplitz=True, fft_threshold=1).to(device)
    fft.load_state_dict(dense.state_dict())
    z = torch.randn(n, 2, columns // 2, device=device, requires_grad=True)
    a, b = fft(z), dense(z)
    _close(a, b, 1e-4, 1e-4, "FFT mixing output")
    seed = torch.randn_like(b)  # (a sum's all-ones seed would test the column sums of W only)
    names = ["z"] + [name for name, _ in fft.named_parameters()]
    got = torch.autograd.grad((a * seed).sum(), [z, *fft.parameters()])
    want = torch.autograd.grad((b * seed).sum(), [z, *dense.parameters()])
    for name, g, r in zip(names, got, want, strict=True):
        scale = r.abs().max().item() + 1e-6
        _close(g / scale, r / scale, 1e-3, 1e-3, f"FFT mixing d{name} (relative to max {scale:.3g})")


def check_model_step(device: torch.device, small: bool) -> None:
    """One bf16-autocast training step of a vision gMLP: each kernel path vs plain ops, loss and gradients."""
    from gmlp import create_model

    # small: 5 x 5 = 25 tokens (not a multiple of 8: the padded token-mixing GEMM), batch 2; the Triton
    # interpreter's time grows with the rows, and each of the seven paths runs the whole model
    name, img, batch = ("gmlp_micro4_28", 20, 2) if small else ("gmlp_s16_224", 224, 16)
    kwargs = {"in_chans": 1, "img_size": 20} if small else {}
    torch.manual_seed(0)
    model = create_model(name, **kwargs).to(device)
    x = torch.randn(batch, kwargs.get("in_chans", 3), img, img, device=device)
    y = torch.randint(0, model.num_classes, (batch,), device=device)
    results = {}
    for path in _paths():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        grads = torch.autograd.grad(loss, list(model.parameters()))
        results[path] = (loss.detach(), torch.cat([g.float().flatten() for g in grads]))
    lb, gb = results["plain ops"]
    for path in KERNEL_PATHS:
        la, ga = results[path]
        _close(la, lb, 2e-2, 2e-2, f"bf16 loss ({path})")
        cos = torch.nn.functional.cosine_similarity(ga, gb, dim=0).item()
        if cos < 0.99:
            raise AssertionError(f"bf16 gradients ({path}): cosine similarity {cos:.4f} < 0.99")


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


def check_sparse_prediction(device: torch.device) -> None:
    """MLM with ``sparse_prediction``: the dense head's loss and gradients, its logits at labelled tokens."""
    from gmlp.models.text import GMLPConfig, GMLPForMaskedLM

    cfg = dict(vocab_size=1001, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
               max_position_embeddings=32)  # fmt: skip
    ids = torch.randint(5, 1001, (4, 32), device=device)
    labels = torch.where(torch.rand(4, 32, device=device) < 0.15, ids, -100)
    labels[0, 0] = ids[0, 0]
    outs, grads = [], []
    for sparse in (False, True):
        torch.manual_seed(0)
        model = GMLPForMaskedLM(GMLPConfig(**cfg, sparse_prediction=sparse)).to(device)
        out = model(input_ids=ids, labels=labels)
        out.loss.backward()
        outs.append(out)
        grads.append([p.grad for p in model.parameters()])
    keep = labels != -100
    _close(outs[1].logits, outs[0].logits[keep], 1e-4, 1e-4, "sparse logits")
    _close(outs[1].loss, outs[0].loss, 1e-5, 1e-5, "sparse loss")
    for a, b in zip(*grads, strict=True):
        _close(b, a, 1e-4, 1e-6, "sparse gradients")


def check_cuda_graph_step(
    device: torch.device,
    per_seq: int | None = None,
    real_warmup: bool = False,
    max_grad_norm: float | None = None,
) -> None:
    """CUDAGraphStep == eager training: a padded MLM batch with sparse prediction (dense inside the graph;
    with ``per_seq``, ``max_predictions_per_seq``: sparse inside it too), bf16 autocast, a learning-rate
    schedule; per-step losses and the final parameters. Then CUDAGraphInference == eager inference of the
    trained model, batch after batch. ``real_warmup``: the warm-up batches' masks are all real, which the
    eager model drops (the unmasked kernels) while the capture keeps it: the capture must launch no kernel
    variant the warm-up did not (a Triton kernel's first launch fails inside a capture). ``max_grad_norm``:
    gradients clipped inside the graph, as eagerly."""
    from gmlp.kernels.sgu_triton import prefer_fused_gating
    from gmlp.models.text import GMLPConfig, GMLPForMaskedLM
    from gmlp.train.cuda_graph import CUDAGraphInference, CUDAGraphStep

    cfg = GMLPConfig(vocab_size=1001, hidden_size=64, intermediate_size=256, num_hidden_layers=3,
                     max_position_embeddings=32, sparse_prediction=True, hidden_dropout_prob=0.0,
                     max_predictions_per_seq=per_seq)  # fmt: skip
    batches = []
    for _ in range(7):
        ids = torch.randint(5, 1001, (4, 32), device=device)
        mask = torch.ones(4, 32, dtype=torch.long, device=device)
        if not (real_warmup and len(batches) < 2):  # (warmup_steps=2 below)
            mask[1, 20:] = 0
        labels = torch.where((torch.rand(4, 32, device=device) < 0.3) & (mask == 1), ids, -100)
        batches.append((ids, mask, labels))
    losses, params = [], []
    for graphed in (False, True):
        torch.manual_seed(0)
        model = GMLPForMaskedLM(cfg).to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.7**step)

        def loss_fn(ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, model=model) -> torch.Tensor:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return model(input_ids=ids, attention_mask=mask, labels=labels).loss

        step = CUDAGraphStep(loss_fn, opt, warmup_steps=2, max_grad_norm=max_grad_norm) if graphed else None
        run = []
        for batch in batches:
            if step is not None:
                run.append(step(*batch).float())
            else:
                with prefer_fused_gating():
                    opt.zero_grad(set_to_none=True)
                    loss = loss_fn(*batch)
                    loss.backward()
                    if max_grad_norm is not None:
                        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm, foreach=True)
                    opt.step()
                run.append(loss.detach().float())
            sched.step()
        if step is not None and not step.captured:
            raise AssertionError("CUDAGraphStep never captured")
        losses.append(torch.stack(run))
        params.append(torch.cat([p.detach().float().flatten() for p in model.parameters()]))
    _close(losses[1], losses[0], 2e-3, 2e-3, "graphed losses")
    _close(params[1], params[0], 1e-3, 1e-4, "graphed parameters after 7 steps")
    model.eval()  # the graphed model: inference replayed on new batches == eager
    forward = CUDAGraphInference(lambda ids, mask: model(input_ids=ids, attention_mask=mask).logits)
    for ids, mask, _ in batches:
        graphed_logits = forward(ids, mask).clone()
        with torch.no_grad():
            eager_logits = model(input_ids=ids, attention_mask=mask).logits
        _close(graphed_logits, eager_logits, 1e-4, 1e-4, "graphed logits")
    if not forward.captured:
        raise AssertionError("CUDAGraphInference never captured")


def check_toeplitz_matrix(device: torch.device, n: int) -> None:
    """The Toeplitz W's diagonal-sum backward (:func:`gmlp.kernels.toeplitz_matrix`, taken from
    ``DIAGONAL_SUM_MIN_TOKENS`` tokens on: the MLM's 512) == autograd's ``unfold`` backward, one W and per
    head, as long as its ``seq_len`` and shorter."""
    from gmlp.kernels import toeplitz_matrix

    for lead, seq_len in (((), n), ((3,), n), ((), n + 5)):
        weight = torch.randn(*lead, 2 * seq_len - 1, device=device, requires_grad=True)
        grad = torch.randn(*lead, n, n, device=device)
        got, want = (
            torch.autograd.grad(toeplitz_matrix(weight, n, seq_len, diagonal_sums=sums), weight, grad)[0]
            for sums in (True, False)
        )
        scale = want.abs().max().item() + 1e-6
        _close(got / scale, want / scale, 1e-5, 1e-5, f"Toeplitz W gradient {lead} n={n} seq_len={seq_len}")


def check_other_gpu(device: torch.device) -> None:
    """The fused kernels on a GPU other than the current one (a model on cuda:1, or the text models split
    over GPUs by ``device_map``): Triton launches on the current device, so each entry point makes its
    input's device current. The kernel, gating and LayerNorm checks on ``device`` with cuda:0 current."""
    with torch.cuda.device(0):
        check_kernel(device, 7, 40, torch.bfloat16)
        check_gating(device, 12, 2, 40, torch.float32, True)
        check_norm(device, 37, 48)


def check_cuda_graph_capture_error(device: torch.device) -> None:
    """A step that reads a value back to the host cannot be captured: CUDAGraphStep says why (run last: a
    failed capture may leave the process's CUDA state unusable for later checks)."""
    from gmlp.train.cuda_graph import CUDAGraphStep

    layer = torch.nn.Linear(4, 1).to(device)
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-3, fused=True)

    def syncing(x: torch.Tensor) -> torch.Tensor:
        loss = layer(x).square().mean()
        if loss.item() < 0:  # a host read: fine eagerly, not inside a capture
            raise AssertionError("unreachable")
        return loss

    step = CUDAGraphStep(syncing, opt, warmup_steps=1)
    x = torch.randn(8, 4, device=device)
    step(x)  # eager warm-up
    try:
        step(x)
    except RuntimeError as err:
        if "must not synchronise with the host" not in str(err):
            raise AssertionError(f"unclear capture error: {err}") from err
    else:
        raise AssertionError("a step with .item() was captured without an error")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--small", action="store_true", help="tiny sizes (for the Triton interpreter on CPU)")
    parser.add_argument(
        "--triton-config", default="", help="the fused kernels' launch parameters, JSON (kernel_sweep's best)"
    )
    parser.add_argument(
        "--kernels-only", action="store_true", help="only the kernel, gating, LayerNorm and block checks"
    )
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.triton_config:
        import json

        from gmlp.kernels import sgu_triton

        print(f"launch config: {sgu_triton.set_launch_config(**json.loads(args.triton_config))}")
    torch.manual_seed(0)
    if args.small:
        kernel_cases = [(5, 24), (3, 40)]
        gating_cases = [(12, 2, 24, False), (9, 3, 40, True)]
        block_case, fft_case, norm_case = (32, 64, 12, 2), (40, 64), (37, 48)
        text_block_case, toeplitz_n = (32, 64, 13, 2), 20
    else:
        kernel_cases = [(4096, 768), (1000, 1536), (7, 3072)]
        gating_cases = [(196, 8, 1536, False), (512, 4, 1536, True)]
        block_case, fft_case, norm_case = (256, 1536, 196, 8), (1024, 8192), (50176, 512)
        text_block_case = (512, 3072, 128, 4)  # gMLP-base's width, fewer tokens (its W is 2n - 1 numbers)
        toeplitz_n = 512  # the MLM's length, past DIAGONAL_SUM_MIN_TOKENS (the check forces either way)
    checks: list[tuple[str, Callable[[], None]]] = []
    for rows, half in kernel_cases:
        for dtype in (torch.float32, torch.bfloat16):
            checks.append(
                (
                    f"triton kernel rows={rows} C={half} {dtype}",
                    lambda r=rows, h=half, d=dtype: check_kernel(device, r, h, d),
                )
            )
    for n, batch, half, padded in gating_cases:
        for dtype in (torch.float32, torch.bfloat16):
            checks.append(
                (
                    f"fused gating n={n} batch={batch} C={half} {'masked causal ' * padded}{dtype}",
                    lambda a=(n, batch, half, dtype, padded): check_gating(device, *a),
                )
            )
    checks += [
        (f"layer_norm fp32 -> bf16 {norm_case}", lambda: check_norm(device, *norm_case)),
        ("block: each kernel path == plain ops", lambda: check_block(device, *block_case)),
        (
            "block, Toeplitz W (the MLM's): each kernel path == plain ops",
            lambda: check_block(device, *text_block_case, toeplitz=True),
        ),
    ]
    if args.kernels_only:  # (after kernel_sweep.py, on its best launch parameters)
        return _run(checks, device)
    checks += [
        (f"Toeplitz W diagonal-sum backward == unfold backward, n={toeplitz_n}",
         lambda: check_toeplitz_matrix(device, toeplitz_n)),  # fmt: skip
        (
            "compiled block, kernels kept == eager",
            lambda: check_compiled_kernels(device, *block_case, args.small),
        ),
        ("FFT Toeplitz == dense GEMM", lambda: check_fft(device, *fft_case)),
        ("bf16 training step: each kernel path == plain ops", lambda: check_model_step(device, args.small)),
        ("text: causality and padding on device", lambda: check_text_properties(device)),
        ("MLM sparse prediction == dense head", lambda: check_sparse_prediction(device)),
    ]
    if device.type == "cuda" and torch.cuda.device_count() > 1:  # (the lent machines have one GPU)
        other = torch.device("cuda:1")
        checks.append(("kernels on cuda:1 with cuda:0 current", lambda: check_other_gpu(other)))
    if device.type == "cuda":  # CUDA graphs exist on CUDA only
        checks += [
            ("CUDA graph training and inference == eager", lambda: check_cuda_graph_step(device)),
            (
                "CUDA graph training, static sparse prediction == eager",
                lambda: check_cuda_graph_step(device, per_seq=24),
            ),
            (
                "CUDA graph, warm-up masks all real, gradients clipped == eager",
                lambda: check_cuda_graph_step(device, real_warmup=True, max_grad_norm=0.5),
            ),
            ("CUDA graph of a syncing step: a clear error", lambda: check_cuda_graph_capture_error(device)),
        ]
    return _run(checks, device)


def _run(checks: list[tuple[str, Callable[[], None]]], device: torch.device) -> int:
    """Run each check, print PASS or FAIL (with the traceback) and the tally; 1 if any failed."""
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
