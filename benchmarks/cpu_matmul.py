"""BLAS vs oneDNN for the matrix products of one gMLP block on the CPU (what `gmlp.kernels.cpu_linear`
chooses between), forward, input gradient and weight gradient, at a model's shapes.

    python benchmarks/cpu_matmul.py                    # gMLP-S/16 at batch 16: d 256, d_ffn 1536, n 196
    python benchmarks/cpu_matmul.py --dim 512 --ffn 3072

Prints each product's median time over ``--reps`` calls (after one warm-up) and GFLOP/s both ways.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from gmlp.utils.malloc import tune_malloc  # noqa: E402


def _time(fn: Callable[[], torch.Tensor], reps: int) -> float:
    fn()
    rounds = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        rounds.append(time.perf_counter() - t0)
    return statistics.median(rounds)


def _onednn(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``a @ b.T + bias`` as one oneDNN matmul."""
    return torch.ops.mkldnn._linear_pointwise(a, b, bias, "none", [], "")


Row = tuple[str, Callable[[], torch.Tensor], Callable[[], torch.Tensor], int]


def _projection_rows(label: str, m: int, fan_in: int, fan_out: int) -> list[Row]:
    """Forward, input gradient and weight gradient of an ``fan_in -> fan_out`` projection of ``m`` rows:
    (name, BLAS call, oneDNN call, multiply-adds)."""
    x, w, b = torch.randn(m, fan_in), torch.randn(fan_out, fan_in), torch.randn(fan_out)
    dy = torch.randn(m, fan_out)
    macs = m * fan_in * fan_out
    return [
        (f"{label} forward", lambda: torch.addmm(b, x, w.t()), lambda: _onednn(x, w, b), macs),
        (f"{label} input gradient", lambda: dy @ w, lambda: _onednn(dy, w.t()), macs),
        (f"{label} weight gradient", lambda: dy.t() @ x, lambda: _onednn(dy.t(), x.t()), macs),
    ]


def main(argv: list[str] | None = None) -> list[tuple[str, float, float]]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--ffn", type=int, default=1536)
    parser.add_argument("--tokens", type=int, default=196)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--reps", type=int, default=9)
    args = parser.parse_args(argv)
    tune_malloc()
    torch.manual_seed(0)
    m, half, n = args.tokens * args.batch, args.ffn // 2, args.tokens
    rows = _projection_rows("fc1 half", m, args.dim, half) + _projection_rows("fc2", m, half, args.dim)
    cols = m * half // n
    wt, z, bt, dv = torch.randn(n, n), torch.randn(n, cols), torch.randn(n), torch.randn(n, cols)
    macs = n * n * cols
    rows += [
        ("token mixing forward", lambda: torch.addmm(bt[:, None], wt, z), lambda: _onednn(wt, z.t()), macs),
        ("token mixing input gradient", lambda: wt.t() @ dv, lambda: _onednn(wt.t().contiguous(), dv.t()),
         macs),
        ("token mixing weight gradient", lambda: dv @ z.t(), lambda: _onednn(dv, z), macs),
    ]  # fmt: skip
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {m} rows, median of {args.reps}")
    print("| product | BLAS GFLOP/s | oneDNN GFLOP/s | oneDNN speed-up |\n|---|---|---|---|")
    out = []
    for name, blas, dnn, count in rows:
        t_blas, t_dnn = _time(blas, args.reps), _time(dnn, args.reps)
        flops = 2 * count / 1e9
        print(f"| {name} | {flops / t_blas:.0f} | {flops / t_dnn:.0f} | {t_blas / t_dnn:.2f}x |")
        out.append((name, flops / t_blas, flops / t_dnn))
    return out


if __name__ == "__main__":
    main()
