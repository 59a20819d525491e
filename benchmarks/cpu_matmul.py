"""BLAS vs oneDNN for the matrix products of one gMLP block on the CPU (what `gmlp.kernels.cpu_linear`
chooses between), forward, input gradient and weight gradient, at a model's shapes.

    python benchmarks/cpu_matmul.py                    # gMLP-S/16 at batch 16: d 256, d_ffn 1536, n 196
    python benchmarks/cpu_matmul.py --dim 512 --ffn 3072
    python benchmarks/cpu_matmul.py --small            # small projections: where oneDNN's host cost wins
    python benchmarks/cpu_matmul.py --weight-grad      # BLAS weight gradients: grad.T @ x vs (x.T @ grad).T
    python benchmarks/cpu_matmul.py --dtype bf16       # the same products in bf16 (aten's run on oneDNN too)

Prints each product's median time over ``--reps`` calls (after one warm-up) and GFLOP/s both ways (the
token mixing's oneDNN forward with the bias added after it, as the library does). With
``--small``: projections from 1e5 to 4e8 FLOPs, plain and with the GELU (which oneDNN fuses in
inference), microseconds per call both ways; this sets ``gmlp.kernels.cpu_linear.ONEDNN_MIN_FLOPS``.
With ``--weight-grad``: each projection's weight gradient as BLAS computes it with either side of the
weight as the product's rows, best of ``--reps`` interleaved rounds (the orientation rule of
``gmlp.kernels.cpu_linear._weight_grad``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from cli_args import positive_int  # noqa: E402

from gmlp.utils.malloc import tune_malloc  # noqa: E402


def _time(fn: Callable[[], torch.Tensor], reps: int, inner: int = 1) -> float:
    """Median seconds per call over ``reps`` rounds of ``inner`` calls (after one warm-up call)."""
    fn()
    rounds = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        rounds.append((time.perf_counter() - t0) / inner)
    return statistics.median(rounds)


def _onednn(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``a @ b.T + bias`` as one oneDNN matmul."""
    return torch.ops.mkldnn._linear_pointwise(a, b, bias, "none", [], "")


Row = tuple[str, Callable[[], torch.Tensor], Callable[[], torch.Tensor], int]


def _projection_rows(
    label: str, m: int, fan_in: int, fan_out: int, dtype: torch.dtype = torch.float32
) -> list[Row]:
    """Forward, input gradient and weight gradient of an ``fan_in -> fan_out`` projection of ``m`` rows:
    (name, aten call, oneDNN call, multiply-adds)."""
    x, w, b, dy = (torch.randn(*shape, dtype=dtype) for shape in ((m, fan_in), (fan_out, fan_in), (fan_out,),
                                                                  (m, fan_out)))  # fmt: skip
    macs = m * fan_in * fan_out
    return [
        (f"{label} forward", lambda: torch.addmm(b, x, w.t()), lambda: _onednn(x, w, b), macs),
        (f"{label} input gradient", lambda: dy @ w, lambda: _onednn(dy, w.t()), macs),
        (f"{label} weight gradient", lambda: dy.t() @ x, lambda: _onednn(dy.t(), x.t()), macs),
    ]


SMALL_SHAPES = (
    (32, 16, 96), (256, 16, 96), (32, 64, 384), (1024, 16, 96), (4096, 16, 96), (128, 128, 384),
    (32, 256, 768), (256, 64, 384), (128, 256, 768), (1024, 64, 384), (256, 256, 768), (1024, 256, 768),
)  # fmt: skip


def small(reps: int) -> list[tuple[str, float, float]]:
    """oneDNN vs BLAS on small projections (rows, in, out), plain and with the GELU, alternating calls
    (inference: no gradients)."""
    from gmlp.kernels.cpu_linear import fused_linear

    threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, {threads} threads, median of {reps} alternating rounds of 20 calls")
    print("| rows x in -> out | FLOPs | op | BLAS us | oneDNN us | oneDNN speed-up |")
    print("|---|---|---|---|---|---|")
    out = []
    for m, fan_in, fan_out in SMALL_SHAPES:
        x, w, b = torch.randn(m, fan_in), torch.randn(fan_out, fan_in), torch.randn(fan_out)
        flops = 2 * m * fan_in * fan_out
        for op, act in (("linear", None), ("linear + GELU", "gelu")):
            # the library's own two paths, in inference (where oneDNN also fuses the GELU)
            blas = lambda x=x, w=w, b=b, act=act: fused_linear(x, w, b, act, use_onednn=False)
            dnn = lambda x=x, w=w, b=b, act=act: fused_linear(x, w, b, act, use_onednn=True)
            t_blas, t_dnn = [], []
            for _ in range(reps):  # alternate, so that drift of the machine hits both alike
                t_blas.append(_time(blas, 1, 20))
                t_dnn.append(_time(dnn, 1, 20))
            tb, td = statistics.median(t_blas) * 1e6, statistics.median(t_dnn) * 1e6
            shape = f"{m} x {fan_in} -> {fan_out}"
            print(f"| {shape} | {flops:.1e} | {op} | {tb:.1f} | {td:.1f} | {tb / td:.2f}x |")
            out.append((f"{shape} {op}", tb, td))
    return out


def weight_grad(
    m: int, projections: list[tuple[str, int, int]], reps: int, dtype: torch.dtype = torch.float32
) -> list[tuple[str, float, float]]:
    """GFLOP/s of ``dy.T @ x`` (the weight's outputs as rows) and ``(x.T @ dy).T`` (its inputs as rows) for
    each (name, fan_in, fan_out) over ``m`` rows, best of ``reps`` interleaved rounds of 3 calls."""
    threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, {threads} threads, {m} rows, {dtype}, best of {reps} rounds")
    print("| weight (out x in) | outputs as rows GFLOP/s | inputs as rows GFLOP/s | inputs as rows speed-up |"
          "\n|---|---|---|---|")  # fmt: skip
    out = []
    for name, fan_in, fan_out in projections:
        x, dy = torch.randn(m, fan_in, dtype=dtype), torch.randn(m, fan_out, dtype=dtype)
        calls = (lambda x=x, dy=dy: dy.t() @ x, lambda x=x, dy=dy: (x.t() @ dy).t())
        best = [float("inf"), float("inf")]
        for _ in range(reps):  # interleaved, so that drift of the machine hits both alike
            for i, call in enumerate(calls):
                best[i] = min(best[i], _time(call, 1, 3))
        gflop = 2 * m * fan_in * fan_out / 1e9
        print(f"| {name} ({fan_out} x {fan_in}) | {gflop / best[0]:.0f} | {gflop / best[1]:.0f} | "
              f"{best[0] / best[1]:.2f}x |")  # fmt: skip
        out.append((name, gflop / best[0], gflop / best[1]))
    return out


def main(argv: list[str] | None = None) -> list[tuple[str, float, float]]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dim", type=positive_int, default=256)
    parser.add_argument("--ffn", type=positive_int, default=1536)
    parser.add_argument("--tokens", type=positive_int, default=196)
    parser.add_argument("--batch", type=positive_int, default=16)
    parser.add_argument("--reps", type=positive_int, default=9)
    parser.add_argument("--small", action="store_true", help="small projections (the oneDNN size threshold)")
    parser.add_argument("--weight-grad", action="store_true", help="the two orientations of weight gradients")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="of the products timed")
    args = parser.parse_args(argv)
    tune_malloc()
    torch.manual_seed(0)
    if args.small:
        with torch.no_grad():
            return small(args.reps)
    m, half, n = args.tokens * args.batch, args.ffn // 2, args.tokens
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    if args.weight_grad:
        return weight_grad(m, [("fc1 half", args.dim, half), ("fc2", half, args.dim)], args.reps, dtype)
    rows = _projection_rows("fc1 half", m, args.dim, half, dtype)
    rows += _projection_rows("fc2", m, half, args.dim, dtype)
    cols = m * half // n
    wt, z, bt, dv = (torch.randn(*shape, dtype=dtype) for shape in ((n, n), (n, cols), (n,), (n, cols)))
    macs = n * n * cols
    rows += [
        ("token mixing forward", lambda: torch.addmm(bt[:, None], wt, z),
         lambda: _onednn(wt, z.t()).add_(bt[:, None]), macs),
        ("token mixing input gradient", lambda: wt.t() @ dv, lambda: _onednn(wt.t().contiguous(), dv.t()),
         macs),
        ("token mixing weight gradient", lambda: dv @ z.t(), lambda: _onednn(dv, z), macs),  # oneDNN used
    ]  # fmt: skip
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {m} rows, {args.dtype}, median of "
          f"{args.reps}; aten = BLAS in fp32, aten's own oneDNN calls in bf16")  # fmt: skip
    print("| product | aten GFLOP/s | oneDNN GFLOP/s | oneDNN speed-up |\n|---|---|---|---|")
    out = []
    for name, blas, dnn, count in rows:  # (aten's call in "blas")
        t_blas, t_dnn = _time(blas, args.reps), _time(dnn, args.reps)
        flops = 2 * count / 1e9
        print(f"| {name} | {flops / t_blas:.0f} | {flops / t_dnn:.0f} | {t_blas / t_dnn:.2f}x |")
        out.append((name, flops / t_blas, flops / t_dnn))
    return out


if __name__ == "__main__":
    main()
