"""What each elementwise stage of a gMLP block costs inside a whole model step on the CPU.

    python benchmarks/elementwise_cost.py           # gMLP-S/16: inference (batch 32), training (batch 16)
    python benchmarks/elementwise_cost.py --modes train --rounds 9
    python benchmarks/elementwise_cost.py --dtype bf16     # under CPU bf16 autocast

The whole model is timed as it is and with one stage taken out at a time (the pre-norm, the GELU, the gate
LayerNorm, the token bias, the gating product, the residual sum), in interleaved rounds; the difference of
the medians, per layer, is that stage's marginal cost in context (cache and memory traffic of the real step
included). Outputs with a stage taken out are not the model's: this times, it computes nothing useful. The
products stay the same oneDNN/BLAS calls in every variant (the token mixing without its bias runs the same
oneDNN products; under bf16 autocast ``mm`` for autocast's ``addmm``). Under bf16 autocast, taking the
residual sum out also leaves the next block a bf16 input instead of the float32 stream. On this 2-core CPU
torch.profiler reported a training step 3x slower than it is, so these direct timings are what
benchmarks/RESULTS.md quotes. Flushing denormals is switched on for every variant (a model without its norms
can drift into them); the default model has none.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from cli_args import positive_int  # noqa: E402

import gmlp.nn.block as block_module  # noqa: E402
import gmlp.nn.sgu as sgu_module  # noqa: E402
from gmlp import create_model  # noqa: E402
from gmlp.kernels import cpu_linear  # noqa: E402
from gmlp.utils.malloc import tune_malloc  # noqa: E402

STAGES = ("pre-norm", "GELU", "gate LayerNorm", "token bias", "gating product", "residual sum")


class _MixNoBias(torch.autograd.Function):
    """The token mixing ``w @ z`` with the products of :class:`gmlp.kernels.cpu_linear._TokenMix`, no bias."""

    @staticmethod
    def forward(ctx: Any, w: torch.Tensor, z: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(w, z)
        return cpu_linear._mm(w, z.t())

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w, z = ctx.saved_tensors
        grad = grad.contiguous()
        return cpu_linear._mm(grad, z), cpu_linear._mm(w.t().contiguous(), grad.t())


def _mix_no_bias(w: torch.Tensor, z: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if torch.is_autocast_enabled("cpu") or not (
        cpu_linear._big_enough(2 * w.shape[0] * z.numel())
        and cpu_linear.cpu_fusion_enabled(w, z)
        and cpu_linear._prefers_onednn(w.shape[0])
    ):  # token_mix's own conditions: where it takes addmm (CPU autocast, small products, no AVX-512), mm
        return w @ z
    w, z = w.contiguous(), z.contiguous()
    if torch.is_grad_enabled() and (w.requires_grad or z.requires_grad):
        return _MixNoBias.apply(w, z)
    return cpu_linear._mm(w, z.t())


def _linear_no_gelu(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str | None = None
) -> torch.Tensor:
    return cpu_linear.fused_linear(x, weight, bias, None)


class _GateOnly(torch.autograd.Function):
    """Returns the gate as it is; in the backward hands the same gradient to the gate and to ``z1``, so
    ``z1``'s branch still runs its backward (same products) with no elementwise work for the product."""

    @staticmethod
    def forward(ctx: Any, gate: torch.Tensor, z1: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return gate.view_as(gate)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return grad, grad


def _gate_only(
    self: sgu_module.SpatialGatingUnit,
    z1: torch.Tensor,
    z2n: torch.Tensor,
    mask: torch.Tensor | None = None,
    gate_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    return _GateOnly.apply(self.proj(z2n, mask), z1)


def _branch_only(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    return cpu_linear.apply_linear(self.fc2, z)


@contextlib.contextmanager
def without(model: nn.Module, stage: str | None) -> Iterator[None]:
    """Take ``stage`` (one of :data:`STAGES`, or None for the model as it is) out of every block."""
    saved: list[Callable[[], None]] = []

    def swap(owner: Any, name: str, value: Any) -> None:
        old = getattr(owner, name)
        setattr(owner, name, value)
        saved.append(lambda: setattr(owner, name, old))

    blocks = [m for m in model.modules() if isinstance(m, block_module.GMLPBlock)]
    if stage == "pre-norm":
        for b in blocks:
            swap(b, "norm", nn.Identity())
    elif stage == "gate LayerNorm":
        for b in blocks:
            swap(b.sgu, "norm", nn.Identity())
    elif stage == "GELU":
        swap(block_module, "fused_linear", _linear_no_gelu)
    elif stage == "token bias":
        swap(sgu_module, "token_mix", _mix_no_bias)
    elif stage == "gating product":
        swap(sgu_module.SpatialGatingUnit, "forward_normalized", _gate_only)
    elif stage == "residual sum":
        swap(block_module.GMLPBlock, "_residual", _branch_only)
    elif stage is not None:
        raise ValueError(f"stage must be one of {STAGES} or None, got {stage!r}")
    try:
        yield
    finally:
        for restore in reversed(saved):
            restore()


def measure(model_name: str, mode: str, batch: int, rounds: int, bf16: bool = False) -> dict[str, float]:
    """Median seconds per step of the model as it is (key "none") and without each stage; ``bf16``: under
    CPU bf16 autocast."""
    model = create_model(model_name)
    size = model.pretrained_cfg["input_size"]
    x = torch.randn(batch, *size)
    y = torch.randint(0, model.num_classes, (batch,))
    if mode == "train":
        model.train()

        def step() -> None:
            model.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = F.cross_entropy(model(x), y)
            loss.backward()
    else:
        model.eval()

        def step() -> None:
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                model(x)

    variants: list[str | None] = [None, *STAGES]
    times: dict[str, list[float]] = {str(v).lower(): [] for v in variants}
    for v in variants:  # warm-up
        with without(model, v):
            step()
    for _ in range(rounds):
        for v in variants:
            with without(model, v):
                t0 = time.perf_counter()
                step()
                times[str(v).lower()].append(time.perf_counter() - t0)
    return {k: statistics.median(t) for k, t in times.items()}


def _onednn_path() -> str:
    """Whether the products of the model take the oneDNN path, as :mod:`gmlp.kernels.cpu_linear` decides."""
    if not cpu_linear.cpu_fusion_enabled(torch.ones(1)):
        return "off"
    if cpu_linear._prefers_onednn(1):
        return "on"
    return f"only into {cpu_linear.WIDE_OUTPUT_FEATURES}+ outputs (no AVX-512)"


#: Variables, not literals: a product of two literals is folded when the module is compiled.
_SUBNORMAL, _ONE = 5e-324, 1.0


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="gmlp_s16_224")
    parser.add_argument("--modes", nargs="+", default=["infer", "train"], choices=["infer", "train"])
    parser.add_argument("--infer-batch", type=positive_int, default=32)
    parser.add_argument("--train-batch", type=positive_int, default=16)
    parser.add_argument("--rounds", type=positive_int, default=5)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="bf16: CPU bf16 autocast")
    args = parser.parse_args(argv)
    tune_malloc()
    flushed_before = _SUBNORMAL * _ONE == 0.0  # (torch cannot read the setting back: a multiply can)
    torch.set_flush_denormal(True)
    try:
        torch.manual_seed(0)
        depth = len([m for m in create_model(args.model).modules() if isinstance(m, block_module.GMLPBlock)])
        print(
            f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.model} ({depth} blocks), "
            f"{args.dtype}{' autocast' if args.dtype == 'bf16' else ''}, "
            f"oneDNN path {_onednn_path()}, median of "
            f"{args.rounds} interleaved rounds"
        )
        results = {}
        for mode in args.modes:
            batch = args.infer_batch if mode == "infer" else args.train_batch
            t = measure(args.model, mode, batch, args.rounds, bf16=args.dtype == "bf16")
            base = t["none"]
            per_block = base * 1e3 / depth
            print(f"\n{mode}, batch {batch}: {base * 1e3:.1f} ms per step, {per_block:.2f} ms per block")
            print("| stage taken out | ms per step | saved per block (ms) | share of the step |")
            print("|---|---|---|---|")
            for stage in STAGES:
                took = t[stage.lower()]
                saved = base - took
                print(f"| {stage} | {took * 1e3:.1f} | {saved * 1e3 / depth:.2f} | {saved / base:.1%} |")
            results[mode] = t
        return results
    finally:  # (called from Python, e.g. a test: the caller's process keeps its subnormals)
        torch.set_flush_denormal(flushed_before)


if __name__ == "__main__":
    main()
