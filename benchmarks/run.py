"""Side-by-side throughput benchmark: gmlp vs timm gMLP, g-mlp-pytorch, timm ViT and transformers BERT.

One process, one dtype, one thread count and one allocator setting for every model; models are timed
in interleaved rounds, each in another order (A B D C, B C A D, C D B A, ...: see :func:`round_order`), so
that drift of the machine hits all of them alike and no model always runs first or right after the same
model, and the median of the rounds is reported. FLOPs are counted once per model and mode with
``torch.utils.flop_counter`` (the forward of that mode, the CPU's fused attention included; TFLOP/s counts
backward as twice the forward).

    python benchmarks/run.py --suite cpu            # the quick CPU suite (2 cores: ~5 minutes)
    python benchmarks/run.py --suite gpu            # one GPU, bf16 autocast, sized for ~10 minutes
    python benchmarks/run.py --suite smoke          # tiny sizes, a few seconds (used by the tests)
    python benchmarks/run.py --suite host --only text --threads 1   # host time per step (48 tiny layers)

Prints a markdown table and writes ``--json`` with every number, the machine, the versions and the settings,
both after each family (``"complete": false`` until the last), so that a run cut off keeps what it measured;
each row's ``of_probe`` is its TFLOP/s over the run's best GEMM-rate probe.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from cli_args import positive_int  # noqa: E402

from gmlp.train.cuda_graph import CUDAGraphInference, CUDAGraphStep  # noqa: E402
from gmlp.train.optim import fused_adamw  # noqa: E402
from gmlp.utils.malloc import tune_malloc  # noqa: E402


@dataclass
class Case:
    """One model in one mode: ``build`` makes the model, ``inputs`` a batch, ``loss`` a training loss."""

    name: str
    family: str  # what it is compared within ("vision" or "text")
    build: Callable[[], nn.Module]
    inputs: Callable[[torch.device], tuple[Any, ...]]
    loss: Callable[[Any], torch.Tensor] = field(default=lambda out: out.float().square().mean())
    graphed: bool = False  # one CUDA graph per step (CUDAGraphStep / CUDAGraphInference)


@dataclass
class Result:
    name: str
    family: str
    mode: str
    batch: int
    samples_per_s: float
    ms_per_step: float
    gflop_per_sample: float
    achieved_tflops: float
    peak_mem_mib: float | None
    rounds: list[float]


# ----------------------------------------------------------------------------------------------------------
# Model builders. Vision: gMLP-S/16 (or B/16 on GPU), same config in every implementation.
# ----------------------------------------------------------------------------------------------------------


def timm_gmlp(dim: int, depth: int, img: int, patch: int) -> nn.Module:
    """timm's gMLP (MlpMixer with SpatialGatingBlock/GatedMlp, as its gmlp_* factories build it)."""
    from timm.layers import GatedMlp
    from timm.models.mlp_mixer import MlpMixer, SpatialGatingBlock

    return MlpMixer(
        img_size=img,
        patch_size=patch,
        num_blocks=depth,
        embed_dim=dim,
        mlp_ratio=6,
        block_layer=SpatialGatingBlock,
        mlp_layer=GatedMlp,
    )


def vision_cases(
    size: str, batch: int, img: int = 224, patch: int = 16, ablate: tuple[str, ...] = ()
) -> list[Case]:
    """gMLP vision cases (ours, its ablations, timm's, g-mlp-pytorch's) and timm's ViT. The peers are imported
    when built: a peer that is not installed is a ``FAILED`` line, not the end of the whole run."""
    from gmlp import create_model

    dims = {"ti": (128, 30), "s": (256, 30), "b": (512, 30), "smoke": (32, 2)}[size]
    dim, depth = dims
    timm_name = f"gmlp_{'s' if size == 'smoke' else size}16_224"
    vit = {
        "ti": "vit_tiny_patch16_224",
        "s": "vit_small_patch16_224",
        "b": "vit_base_patch16_224",
        "smoke": "vit_tiny_patch16_224",
    }[size]
    over = {"embed_dim": dim, "depth": depth, "img_size": img, "patch_size": patch}

    def g_mlp_pytorch_vision() -> nn.Module:
        from g_mlp_pytorch import gMLPVision

        return gMLPVision(image_size=img, patch_size=patch, num_classes=1000, dim=dim, depth=depth, ff_mult=6)

    def vit_model() -> nn.Module:
        import timm

        return timm.create_model(vit, img_size=img, **({"depth": 2} if size == "smoke" else {}))

    def images(device: torch.device) -> tuple[torch.Tensor, ...]:
        return (torch.randn(batch, 3, img, img, device=device),)

    ce = lambda out: F.cross_entropy(
        out.float(), torch.zeros(out.shape[0], dtype=torch.long, device=out.device)
    )
    ours = [Case(f"gmlp {timm_name}", "vision", lambda: create_model(timm_name, **over), images, ce)]
    ours += ablations(ours[0], ablate)
    return [
        *ours,
        Case(f"timm {timm_name}", "vision", lambda: timm_gmlp(dim, depth, img, patch), images, ce),
        Case("g-mlp-pytorch gMLPVision", "vision", g_mlp_pytorch_vision, images, ce),
        Case(f"timm {vit}", "vision", vit_model, images, ce),
    ]


class MaskedLMStep(nn.Module):
    """A masked LM as its users train it: ``forward(tokens, labels)`` is the MLM loss (cross-entropy over
    the labelled tokens, -100 = not predicted) when gradients are on, the logits under ``no_grad``
    (inference). ``internal``: the model takes ``labels`` and returns the loss itself (our
    ``sparse_prediction`` path); otherwise the loss is taken over its full ``(batch, seq, vocab)`` logits."""

    def __init__(self, model: nn.Module, internal: bool = False) -> None:
        super().__init__()
        self.model = model
        self.internal = internal

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.internal and torch.is_grad_enabled():
            return self.model(input_ids=tokens, labels=labels).loss
        out = self.model(tokens)
        logits = out.logits if hasattr(out, "logits") else out
        if not torch.is_grad_enabled():
            return logits
        return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())


def text_cases(
    layers: int,
    dim: int,
    ffn: int,
    seq: int,
    batch: int,
    vocab: int = 30522,
    ablate: tuple[str, ...] = (),
    sparse: bool = True,
    mlm_probability: float = 0.15,
    static_sparse: bool = False,
) -> list[Case]:
    """MLM cases: every model trains on the same tokens with the same 15% of them labelled; ``sparse``
    adds ours with ``sparse_prediction`` (the decoder on the labelled tokens only; train mode);
    ``static_sparse`` adds ours with ``max_predictions_per_seq`` (twice the expected number of labelled
    tokens: a fixed shape, so it also runs as a CUDA graph). The peers are imported when built (see
    :func:`vision_cases`)."""

    def tokens(device: torch.device) -> tuple[torch.Tensor, ...]:
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, vocab, (batch, seq), generator=g)
        labels = torch.where(torch.rand(batch, seq, generator=g) < mlm_probability, ids, -100)
        return ids.to(device), labels.to(device)

    loss = lambda out: out.float()
    cases = []
    try:
        from gmlp.models.text import GMLPConfig, GMLPForMaskedLM

        def ours(sparse_prediction: bool = False, per_seq: int | None = None) -> nn.Module:
            cfg = GMLPConfig(
                vocab_size=vocab,
                hidden_size=dim,
                intermediate_size=ffn,
                num_hidden_layers=layers,
                max_position_embeddings=seq,
                toeplitz=True,
                sparse_prediction=sparse_prediction,
                max_predictions_per_seq=per_seq,
            )
            return MaskedLMStep(GMLPForMaskedLM(cfg), internal=sparse_prediction)

        cases.append(Case("gmlp GMLPForMaskedLM", "text", ours, tokens, loss))
        if sparse:
            name = "gmlp GMLPForMaskedLM (sparse prediction)"
            cases.append(Case(name, "text", lambda: ours(sparse_prediction=True), tokens, loss))
        if static_sparse:
            per_seq = min(seq, math.ceil(2 * mlm_probability * seq))
            name = f"gmlp GMLPForMaskedLM (sparse prediction, static {per_seq}/seq)"
            cases.append(Case(name, "text", lambda: ours(True, per_seq), tokens, loss))
        cases += ablations(cases[0], tuple(label for label in ablate if label not in VISION_ONLY))
    except ImportError:  # the text models are optional in this benchmark
        pass

    def g_mlp_pytorch_lm() -> nn.Module:
        from g_mlp_pytorch import gMLP

        return MaskedLMStep(gMLP(num_tokens=vocab, dim=dim, depth=layers, seq_len=seq, ff_mult=ffn // dim))

    def bert_step() -> nn.Module:
        from transformers import BertConfig, BertForMaskedLM

        bert = BertConfig(
            vocab_size=vocab,
            hidden_size=max(64, dim * 3 // 2),
            num_hidden_layers=max(1, round(layers / 4)),  # BERT-base: 12 layers of 768, gMLP-base 48 of 512
            num_attention_heads=max(1, dim * 3 // 2 // 64),
            intermediate_size=dim * 6,
            max_position_embeddings=seq,
            attn_implementation="sdpa",
            hidden_dropout_prob=0.0,  # as every other model here (transformers' default 0.1 slows its step)
            attention_probs_dropout_prob=0.0,
        )
        return MaskedLMStep(BertForMaskedLM(bert))

    cases.append(Case("g-mlp-pytorch gMLP", "text", g_mlp_pytorch_lm, tokens, loss))
    cases.append(Case("transformers BertForMaskedLM", "text", bert_step, tokens, loss))
    return cases


# ----------------------------------------------------------------------------------------------------------


def count_flops(model: nn.Module, inputs: tuple[Any, ...], train: bool = False) -> float:
    """Forward FLOPs of one call (matrix products, convolutions, attention) via FlopCounterMode; ``train``:
    of the training forward (gradients on), which for an MLM with sparse prediction is less work.

    Our models are counted on their plain ops (``GMLP_DISABLE_TRITON=1`` while counting): the fused gating
    pads the token mixing to a multiple of 8 tokens (196 -> 200), and crediting that padding would lift our
    TFLOP/s by 0.46% at gMLP-B/16 over the same model's plain-ops row and the peers'."""
    from torch.utils.flop_counter import FlopCounterMode

    with environment({"GMLP_DISABLE_TRITON": "1"}), torch.set_grad_enabled(train), FlopCounterMode(
        display=False, custom_mapping=_cpu_attention_flops()
    ) as counter:
        model(*inputs)
    return float(counter.get_total_flops())


def _cpu_attention_flops() -> dict[Any, Callable[..., int]]:
    """A FLOP formula for the CPU's fused attention op, which torch's counter leaves out (it has the CUDA
    ones only): without it the attention products of BERT and ViT (``F.scaled_dot_product_attention``)
    counted 0 on the CPU, and their GFLOP/sample and TFLOP/s read low (BERT-base at 512 tokens: 111.6
    instead of 121.2 GFLOP per sequence), where ours (token mixing: a matrix product) counted whole."""
    from torch.utils.flop_counter import sdpa_flop_count

    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is None:
        return {}

    def formula(query: Any, key: Any, value: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
        return sdpa_flop_count(query, key, value)

    return {op: formula}


def resident_bytes(*objects: Any) -> int:
    """Bytes of the distinct tensors held by modules (parameters, gradients, buffers), optimizers
    (their state) and tuples of inputs: what one case keeps allocated between its steps."""
    seen: dict[int, int] = {}

    def add(t: Any) -> None:
        if isinstance(t, torch.Tensor):
            # a gradient in inductor's CUDA-graph pool (reduce-overhead) may refuse access: not counted
            with contextlib.suppress(RuntimeError):
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()

    for obj in objects:
        if isinstance(obj, nn.Module):
            for p in obj.parameters():
                add(p)
                add(p.grad)
            for b in obj.buffers():
                add(b)
        elif isinstance(obj, torch.optim.Optimizer):
            for state in obj.state.values():
                for v in state.values():
                    add(v)
        elif isinstance(obj, tuple | list):
            for t in obj:
                add(t)
    return sum(seen.values())


#: Ablations of our fast paths, each run as an extra case of the same model in the same process:
#: label -> the environment variables set to ``1`` for it.
ABLATIONS = {
    # CUDA: the fused gating at every size (the default takes it from GMLP_FUSED_GATING_MIN_ELEMENTS on)
    "fused gating": ("GMLP_FUSED_GATING_MIN_ELEMENTS",),
    "split kernel": ("GMLP_DISABLE_FUSED_GATING",),  # CUDA: GELU+split+LayerNorm kernel, gating in plain ops
    # no fast path at all: no Triton kernel (CUDA), no oneDNN epilogue fusion (CPU inference)
    "plain ops": ("GMLP_DISABLE_TRITON", "GMLP_DISABLE_CPU_FUSION"),
    # with --compile (CUDA): the fused gating kept as custom ops inside the compiled graph
    "kernels kept": ("GMLP_TRITON_UNDER_COMPILE",),
    # CUDA training: fc1's bias added and its gradient reduced inside the Triton kernels (either path)
    "fc1 bias folded": ("GMLP_FOLD_FC1_BIAS",),
    # CUDA training, fused gating: the residual's gradient added inside the pre-norm's backward kernel
    "residual grad fused": ("GMLP_FUSE_RESIDUAL_GRAD",),
    # CUDA, fused gating: the token bias in the token-mixing addmm (a broadcast copy) as before, not in the
    # gating kernels
    "token bias in GEMM": ("GMLP_TOKEN_BIAS_IN_GEMM",),
}


#: Ablations left out of the text family: the MLM's eager step is below the fused gating's size threshold
#: (the split kernel, plain gating ops, ``nn.LayerNorm`` pre-norm), so these rows would time the default
#: path again.
VISION_ONLY = ("residual grad fused", "token bias in GEMM")


@contextlib.contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    """Set the environment variables ``values`` for the duration of the block; restore them after."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


class Ablated(nn.Module):
    """Runs the wrapped gmlp model's forward with the environment variables ``switches`` set to ``1`` (the
    path choice is made in the forward; backward follows the graph it built)."""

    def __init__(self, model: nn.Module, switches: tuple[str, ...]) -> None:
        super().__init__()
        self.model = model
        self.switches = switches

    def forward(self, *args: Any) -> Any:
        with environment(dict.fromkeys(self.switches, "1")):
            return self.model(*args)


def ablations(case: Case, labels: tuple[str, ...] = tuple(ABLATIONS)) -> list[Case]:
    """One extra case per label of :data:`ABLATIONS`: ``case``'s model with that fast path switched off."""
    return [
        Case(f"{case.name} ({label})", case.family, lambda s=ABLATIONS[label]: Ablated(case.build(), s),
             case.inputs, case.loss)  # fmt: skip
        for label in labels
    ]


def graphed(cases: list[Case], names: tuple[str, ...]) -> list[Case]:
    """A "(CUDA graph)" copy of each case named in ``names`` (ours and the peers alike): its training step
    or its inference forward captured once and replayed (:mod:`gmlp.train.cuda_graph`)."""
    return [
        Case(f"{c.name} (CUDA graph)", c.family, c.build, c.inputs, c.loss, graphed=True)
        for c in cases
        if c.name in names
    ]


def ablation_labels(device: torch.device, mode: str, suite: str, compiled: bool = False) -> tuple[str, ...]:
    """The ablations worth timing. Compiled: "kernels kept" on CUDA (the smoke suite too, to test the code).
    Eager: the kernel paths on CUDA ("fc1 bias folded" and "residual grad fused" in training only); on the
    CPU "plain ops" in inference (the only place its fast path runs); the smoke suite runs them all."""
    if compiled:
        return ("kernels kept",) if device.type == "cuda" or suite == "smoke" else ()
    if device.type == "cuda" or suite == "smoke":
        train_only = ("fc1 bias folded", "residual grad fused")
        skip = ("kernels kept",) if mode == "train" else ("kernels kept", *train_only)
        return tuple(label for label in ABLATIONS if label not in skip)
    return ("plain ops",) if mode == "infer" else ()


def round_order(n: int, r: int) -> list[int]:
    """The order of ``n`` cases in timed round ``r``: a Williams design. Each round is the first one shifted
    by ``r``, so over ``n`` rounds every case takes every position once (no case always runs first); the
    first round interleaves the two ends (0, 1, n-1, 2, n-2, ...), so that over ``n`` rounds (``2n`` for an
    odd ``n``, whose rounds from ``n`` on run reversed) every case runs right after every other case equally
    often (once; twice for an odd ``n``).
    A plain rotation (A B C D, B C D A, ...) kept B right after A in every round but the one it opened: the
    cost a case leaves behind (caches, clocks, the allocator) fell on the same neighbour every time."""
    if n < 1:
        return []
    first = [0]
    low, high = 1, n - 1
    while low <= high:
        first.append(low)
        if low != high:
            first.append(high)
        low, high = low + 1, high - 1
    order = [(i + r) % n for i in first]
    return order[::-1] if n % 2 and (r // n) % 2 else order


def run_cases(
    cases: list[Case],
    mode: str,
    device: torch.device,
    dtype: str,
    rounds: int,
    steps: int,
    warmup: int,
    compile_model: bool = False,
    compile_mode: str | None = None,
) -> list[Result]:
    """Time every case in ``mode`` ("infer" or "train") in interleaved rounds, each round in an order rotated
    by one case; returns one Result each.

    A case that raises while it is built or warmed up is reported (a ``FAILED`` line) and left out, so
    that one broken path cannot cost the other cases' numbers on a scarce machine."""
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bf16" else contextlib.nullcontext()
    )
    states = []
    for case in cases:
        torch.manual_seed(0)
        try:
            model = case.build().to(device)
            inputs = case.inputs(device)
            with autocast:
                flops = count_flops(model.eval(), inputs, train=mode == "train") / inputs[0].shape[0]
        except Exception as err:  # report it and go on with the other cases
            _report_failure(case, mode, err)
            continue
        if mode == "train":
            model.train()
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused_adamw(device))
        else:
            model.eval()
            opt = None
        # ours must capture whole (no graph breaks); the peers compile as their users would. An ablation's
        # switches stay outside the compiled model: they are set while it is traced (and at every call)
        fn = model
        if compile_model:
            inner = model.model if isinstance(model, Ablated) else model
            fn = torch.compile(inner, fullgraph=case.name.startswith("gmlp"), mode=compile_mode)
            if isinstance(model, Ablated):
                fn = Ablated(fn, model.switches)

        if case.graphed:  # the warm-up calls below: eager ones, then the capture (and a replay)
            if device.type != "cuda":
                raise ValueError(f"{case.name}: CUDA graph cases run on CUDA only")

            def run(*batch: Any, fn: Callable = fn, case: Case = case, train: bool = opt is not None) -> Any:
                with autocast:
                    return case.loss(fn(*batch)) if train else fn(*batch)

            warm = max(1, warmup - 1)
            graphed_fn: Callable = CUDAGraphInference(run, warmup_steps=warm)
            if opt is not None:
                graphed_fn = CUDAGraphStep(run, opt, warmup_steps=warm)
            step = lambda graphed_fn=graphed_fn, inputs=inputs: graphed_fn(*inputs)
            states.append((case, model, inputs, step, flops, opt))
            continue

        def step(fn: Callable = fn, inputs: tuple = inputs, opt: Any = opt, case: Case = case) -> None:
            if compile_mode == "reduce-overhead":  # inductor's CUDA graphs: a new step begins
                torch.compiler.cudagraph_mark_step_begin()
            if opt is None:
                with torch.no_grad(), autocast:
                    fn(*inputs)
            else:
                with autocast:
                    loss = case.loss(fn(*inputs))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

        states.append((case, model, inputs, step, flops, opt))
    times: dict[str, list[float]] = {c.name: [] for c in cases}
    peak: dict[str, float | None] = {c.name: None for c in cases}
    failed = []
    for i, (case, _, _, step, _, _) in enumerate(states):  # warm-up (and memory peak on GPU)
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        try:
            for _ in range(warmup):
                step()
        except Exception as err:  # report it and go on with the other cases
            _report_failure(case, mode, err)
            failed.append(i)
            continue
        if device.type == "cuda":
            torch.cuda.synchronize()
            # the other cases' models, optimizer states and inputs stay allocated meanwhile: not this one's
            others = resident_bytes(*(x for j, st in enumerate(states) if j != i for x in st[1:3] + st[5:]))
            peak[case.name] = (torch.cuda.max_memory_allocated() - others) / 2**20
    states = [st for i, st in enumerate(states) if i not in failed]
    if failed and device.type == "cuda":
        torch.cuda.empty_cache()
    for r in range(rounds):
        # no case always runs first, nor always right after the same case (see round_order)
        for case, _, _, step, _, _ in (states[i] for i in round_order(len(states), r)):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(steps):
                step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[case.name].append((time.perf_counter() - t0) / steps)
    results = []
    for case, _, inputs, _, flops, _ in states:
        batch = inputs[0].shape[0]
        med = statistics.median(times[case.name])
        factor = 1.0 if mode == "infer" else 3.0  # backward ~ 2x forward
        results.append(
            Result(
                case.name,
                case.family,
                mode,
                batch,
                batch / med,
                med * 1e3,
                flops / 1e9,
                flops * factor * batch / med / 1e12,
                peak[case.name],
                times[case.name],
            )
        )
    del states
    gc.collect()
    return results


def _report_failure(case: Case, mode: str, err: BaseException) -> None:
    print(f"FAILED {case.name} ({mode}): {type(err).__name__}: {err}".splitlines()[0], flush=True)
    traceback.print_exception(err, file=sys.stderr)


def gemm_rate(
    device: torch.device, dtype: torch.dtype, n: int = 2048, reps: int = 10, onednn: bool = False
) -> float:
    """Measured dense matrix-product rate in TFLOP/s (the machine's practical peak for this dtype): ``a @ b``
    (BLAS on the CPU), or with ``onednn`` oneDNN's matmul (``torch.ops.mkldnn._linear_pointwise``, the one
    our CPU inference path runs; float32 CPU tensors only)."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)

    def product() -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "") if onednn else a @ b

    for _ in range(3):
        product()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        product()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12


def probe_rates(device: torch.device, dtype: str, n: int) -> dict[str, float]:
    """The GEMM-rate probes of a run, keyed as in its json's machine block: ``gemm_tflops_<dtype>``
    (``a @ b``) and, on a CPU with oneDNN in fp32, ``gemm_tflops_fp32_onednn`` too: our inference products
    run on oneDNN, which outran the BLAS probe on some CPUs (105% "of probe" in the fifth session), so a
    fraction of the BLAS probe alone overstated how close to the machine's peak a model ran."""
    torch_dtype = torch.float32 if dtype == "fp32" else torch.bfloat16
    rates = {f"gemm_tflops_{dtype}": gemm_rate(device, torch_dtype, n=n)}
    from gmlp.kernels import cpu_linear

    if device.type == "cpu" and dtype == "fp32" and cpu_linear._HAS_ONEDNN_LINEAR:
        rates["gemm_tflops_fp32_onednn"] = gemm_rate(device, torch_dtype, n=n, onednn=True)
    return rates


def _version(package: str) -> str | None:
    """The installed version of ``package`` (a distribution name), or None where it is not installed."""
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    """The checkout's commit (with ``+dirty`` for uncommitted changes), or None outside a git checkout."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    git = ["git", "--no-optional-locks"]  # (reads only: no index refresh written back)
    try:
        commit = subprocess.run([*git, "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()  # fmt: skip
        dirty = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10,
                               check=True).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "") if commit else None


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` says."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine_info(device: torch.device) -> dict[str, Any]:
    """The machine block of a run's json: versions (torch, timm, transformers, g-mlp-pytorch, triton, the
    checkout's commit), threads, CPU model and cores, the card with its compute capability and CUDA version,
    the load average, and every ``GMLP_*`` variable set (they switch our paths: a row run under one would
    otherwise pass for the default)."""
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": _version("timm"),
        "transformers": _version("transformers"),
        "g-mlp-pytorch": _version("g-mlp-pytorch"),
        "triton": _version("triton"),
        "gmlp_commit": _git_commit(),
        "gmlp_env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("GMLP_")},
        "threads": torch.get_num_threads(),
        "cpu": cpu_name(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    info["cores"] = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    info["loadavg_before"] = os.getloadavg()[0]
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
        info["cuda"] = torch.version.cuda
    info["cpu_capability"] = torch.backends.cpu.get_cpu_capability()  # ATen's: which CPU kernels run
    return info


def _graphed(name: str) -> bool:
    """Whether a result row ran as one CUDA graph per step (see :func:`graphed`)."""
    return name.endswith("(CUDA graph)")


def _ablation(name: str) -> bool:
    """Whether a result row is one of :data:`ABLATIONS` (our model with a fast path switched off or
    forced: a measurement of the library's choices, not a way users run it)."""
    return any(name.endswith(f"({label})") for label in ABLATIONS)


def table(results: list[Result]) -> str:
    """Markdown table; ratios are against each row of the same family and mode: ``gmlp speed-up`` is our
    default model's samples/s (the first gmlp row) over the row's, ``best gmlp speed-up`` (peers only) that
    of our fastest row run the same way (a "(CUDA graph)" peer against our graphed rows, an eager one
    against our eager rows), e.g. the MLM with ``sparse_prediction``. Ablation rows (:data:`ABLATIONS`) are
    not candidates: the best of several timings of nearly the same code would pick its luckiest noise."""
    lines = [
        "| model | mode | batch | samples/s | ms/step | GFLOP/sample (fwd) | TFLOP/s | peak MiB "
        "| gmlp speed-up | best gmlp speed-up |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        mine = [o for o in results if o.family == r.family and o.mode == r.mode and o.name.startswith("gmlp")]
        ours = mine[0] if mine else None
        ratio = f"{ours.samples_per_s / r.samples_per_s:.2f}x" if ours and ours is not r else "-"
        alike = [o for o in mine if _graphed(o.name) == _graphed(r.name) and not _ablation(o.name)]
        best = max(alike, key=lambda o: o.samples_per_s) if alike and not r.name.startswith("gmlp") else None
        best_ratio = f"{best.samples_per_s / r.samples_per_s:.2f}x" if best else "-"
        mem = f"{r.peak_mem_mib:.0f}" if r.peak_mem_mib is not None else "-"
        lines.append(
            f"| {r.name} | {r.mode} | {r.batch} | {r.samples_per_s:.1f} | {r.ms_per_step:.0f} | "
            f"{r.gflop_per_sample:.2f} | {r.achieved_tflops:.3f} | {mem} | {ratio} | {best_ratio} |"
        )
    return "\n".join(lines)


SUITES: dict[str, dict[str, Any]] = {
    # 2-core CPU, fp32: gMLP-S/16 vs peers at batch 32 (inference) / 16 (training); a small LM.
    "cpu": {
        "device": "cpu",
        "dtype": "fp32",
        "vision": ("s", 32, 16),
        "text": (6, 256, 1536, 128, 8, 8),
        "rounds": 5,
        "steps": 1,
        "warmup": 1,
    },
    # one GPU, bf16 autocast: gMLP-B/16 at batch 256 and gMLP-base-shaped MLM (48 x 512, seq 512, batch 32).
    "gpu": {
        "device": "cuda",
        "dtype": "bf16",
        # a 2048^3 product is too short to reach a card's rate (0.3 ms for ten on an H200: 610-636 TFLOP/s
        # read, where large products run faster), which overstated every row's fraction of the probe
        "probe": 8192,
        "vision": ("b", 256, 256),
        "text": (48, 512, 3072, 512, 32, 32),
        "rounds": 5,
        "steps": 5,
        "warmup": 3,
    },
    # tiny widths at gMLP-base's depth (48 layers): what is left of a step is host time (Python, dispatch,
    # autograd), the cost that bounds small-block steps on a GPU; best with --threads 1
    "host": {
        "device": "cpu",
        "dtype": "fp32",
        "vision": ("smoke", 2, 2),
        "text": (48, 16, 96, 16, 2, 2),
        "rounds": 15,
        "steps": 3,
        "warmup": 2,
    },
    "smoke": {
        "device": "cpu",
        "dtype": "fp32",
        # a small GEMM probe: in bf16 on a CPU without native bf16 (AVX2 only) the 2048^3 one took 12 minutes
        "probe": 256,
        "vision": ("smoke", 2, 2),
        "text": (2, 32, 64, 16, 2, 2),
        "rounds": 1,
        "steps": 1,
        "warmup": 1,
    },
}


def main(argv: list[str] | None = None) -> list[Result]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--suite", choices=sorted(SUITES), default="cpu")
    parser.add_argument("--only", choices=("vision", "text"), default=None, help="run one family")
    parser.add_argument("--modes", default="infer,train", help="comma-separated: infer,train")
    parser.add_argument("--compile", action="store_true", help="torch.compile every model")
    parser.add_argument(
        "--compile-mode",
        default=None,
        help="torch.compile mode, e.g. reduce-overhead (inductor's own CUDA graphs); default: the default",
    )
    parser.add_argument("--no-sparse", action="store_true", help="skip the sparse-prediction MLM case")
    parser.add_argument(
        "--dtype",
        choices=("fp32", "bf16"),
        default=None,
        help="override the suite's precision (bf16 = bf16 autocast for every model; CPUs with native bf16)",
    )
    parser.add_argument(
        "--models",
        default=None,
        help="comma-separated name fragments: time only the models whose name contains one of them",
    )
    parser.add_argument(
        "--no-ablation",
        action="store_true",
        help="skip the extra ablation cases of ours ('split kernel', CUDA: fused gating off; 'plain ops': "
        "every Triton kernel off on CUDA, the oneDNN epilogue fusion off in CPU inference)",
    )
    parser.add_argument(
        "--no-cuda-graph",
        action="store_true",
        help="skip the '(CUDA graph)' cases (on CUDA: ours and each peer, the whole training step or "
        "inference forward captured once and replayed)",
    )
    parser.add_argument(
        "--graphs-only", action="store_true", help="time only the '(CUDA graph)' cases (CUDA)"
    )
    parser.add_argument(
        "--graphs-under-compile",
        action="store_true",
        help="with --compile: also capture each compiled model's step as a CUDA graph (CUDAGraphStep)",
    )
    parser.add_argument("--threads", type=positive_int, default=None, help="torch threads (default: torch's)")
    parser.add_argument(
        "--triton-config",
        default=None,
        help="JSON launch parameters of the fused kernels (e.g. benchmarks/kernel_sweep.py's best)",
    )
    parser.add_argument("--json", default=None, help="write all numbers here")
    parser.add_argument(
        "--no-malloc-tuning", action="store_true", help="keep glibc's default allocator settings"
    )
    args = parser.parse_args(argv)
    suite = dict(SUITES[args.suite])
    if args.dtype:
        suite["dtype"] = args.dtype
    if not args.no_malloc_tuning:
        tune_malloc()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(suite["device"])
    info = machine_info(device)
    if args.triton_config:
        from gmlp.kernels import sgu_triton

        info["triton_config"] = asdict(sgu_triton.set_launch_config(**json.loads(args.triton_config)))
    info["malloc_tuned"] = not args.no_malloc_tuning
    info["gemm_probe_n"] = suite.get("probe", 2048)
    probes = probe_rates(device, suite["dtype"], info["gemm_probe_n"])
    info.update(probes)
    print(json.dumps(info))
    ablate = not args.no_ablation
    if args.compile:  # the sparse-prediction MLM selects its labelled tokens: a data-dependent shape
        torch._dynamo.config.capture_dynamic_output_shape_ops = True

    def chosen(cases: list[Case]) -> list[Case]:
        if not args.models:
            return cases
        parts = [m.strip() for m in args.models.split(",") if m.strip()]
        return [c for c in cases if any(m in c.name for m in parts)]

    # with --compile the graphed cases cost a compile each: only on request, and never inside inductor's own
    # CUDA graphs (reduce-overhead)
    graphs = device.type == "cuda" and not args.no_cuda_graph and (
        not args.compile or (args.graphs_under_compile and args.compile_mode != "reduce-overhead")
    )

    def run_family(cases: list[Case], mode: str) -> list[Result]:
        """The eager cases interleaved; then, on CUDA, each "(CUDA graph)" case on its own (a captured
        training step holds its activation memory for good: several at once would not fit)."""
        timing = (suite["rounds"], suite["steps"], suite["warmup"])
        compiled = (args.compile, args.compile_mode)
        out = []
        if not args.graphs_only:
            out = run_cases(cases, mode, device, suite["dtype"], *timing, *compiled)
        if graphs:
            peers = tuple(c.name for c in cases if not c.name.startswith("gmlp") and not c.graphed)
            ours = tuple(c.name for c in cases if c.name.startswith("gmlp"))[:1]
            ours += tuple(c.name for c in cases if "static" in c.name)  # the sparse MLM that a graph can hold
            for case in graphed(cases, ours + peers):
                out += run_cases([case], mode, device, suite["dtype"], *timing, *compiled)
                torch.cuda.empty_cache()
        return out

    results: list[Result] = []
    settings = {
        "argv": sys.argv[1:] if argv is None else list(argv),
        "suite": args.suite,
        "dtype": suite["dtype"],
        "compile": args.compile,
        "compile_mode": args.compile_mode,
        "rounds": suite["rounds"],
        "steps": suite["steps"],
        "warmup": suite["warmup"],
    }

    def report(rows: list[Result], complete: bool) -> None:
        """Print ``rows`` (one family's, as it finishes; all at the end) and write the json with every row
        so far: a run cut off by a time limit keeps what it measured."""
        if rows:
            print(table(rows), flush=True)
        if args.json:
            write_json(Path(args.json), info, settings, results, max(probes.values()), complete)

    for mode in args.modes.split(","):
        if args.only in (None, "vision"):
            size, b_inf, b_train = suite["vision"]
            cases = chosen(
                vision_cases(
                    size,
                    b_inf if mode == "infer" else b_train,
                    ablate=ablation_labels(device, mode, args.suite, args.compile) if ablate else (),
                    **({"img": 32, "patch": 8} if args.suite in ("smoke", "host") else {}),
                )
            )
            rows = run_family(cases, mode)
            results += rows
            report(rows, complete=False)
        if args.only in (None, "text"):
            layers, dim, ffn, seq, b_inf, b_train = suite["text"]
            cases = chosen(
                text_cases(
                    layers,
                    dim,
                    ffn,
                    seq,
                    b_inf if mode == "infer" else b_train,
                    vocab=1000 if args.suite in ("smoke", "host") else 30522,
                    ablate=ablation_labels(device, mode, args.suite, args.compile) if ablate else (),
                    sparse=mode == "train" and not args.no_sparse,
                    static_sparse=mode == "train" and not args.no_sparse and device.type == "cuda",
                )
            )
            rows = run_family(cases, mode)
            results += rows
            report(rows, complete=False)
    info["loadavg_after"] = os.getloadavg()[0]
    print("\nAll results:")
    report(results, complete=True)
    return results


def write_json(
    path: Path,
    machine: dict[str, Any],
    settings: dict[str, Any],
    results: list[Result],
    probe: float,
    complete: bool,
) -> None:
    """Write a run's json (atomically: a run killed while writing leaves the previous version): the machine,
    the settings, ``complete`` (False while families are still to run) and every result with ``of_probe``,
    its TFLOP/s over the run's best GEMM-rate probe (``probe``, TFLOP/s)."""
    rows = [{**asdict(r), "of_probe": r.achieved_tflops / probe if probe > 0 else None} for r in results]
    data = {"machine": machine, **settings, "complete": complete, "results": rows}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)


if __name__ == "__main__":
    main()
