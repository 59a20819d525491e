"""Where does FFT Toeplitz mixing beat the dense GEMM? Times both paths of TokenProjection side by side.

    python benchmarks/toeplitz_crossover.py                 # CPU, fp32
    python benchmarks/toeplitz_crossover.py --device cuda   # one GPU
    python benchmarks/toeplitz_crossover.py --matrix        # the W expansion's two backwards

Prints, per sequence length, forward and forward+backward milliseconds of each path and the ratio. With
``--matrix``: the forward and backward of the dense W's expansion from its diagonals
(:func:`gmlp.kernels.toeplitz_matrix`), with the diagonal-sum backward against autograd's ``unfold``
backward (the crossover behind :data:`gmlp.kernels.toeplitz.DIAGONAL_SUM_MIN_TOKENS`); each case the best
of three interleaved rounds.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from cli_args import positive_int  # noqa: E402

from gmlp.kernels.toeplitz import toeplitz_matrix  # noqa: E402
from gmlp.nn import TokenProjection  # noqa: E402
from gmlp.utils.malloc import tune_malloc  # noqa: E402


def _time(fn, device: torch.device, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def _lengths(text: str) -> list[int]:
    """argparse type: comma-separated sequence lengths of at least 1."""
    return [positive_int(v) for v in text.split(",")]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--lengths", type=_lengths, default="64,128,256,512,1024,2048,4096")
    parser.add_argument("--columns", type=positive_int, default=4096, help="batch * channels mixed per token")
    parser.add_argument("--reps", type=positive_int, default=5)
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="activation dtype (the dense path multiplies in it; the FFT path works in float32)",
    )
    parser.add_argument("--matrix", action="store_true", help="time the W expansion's backwards instead")
    args = parser.parse_args(argv)
    tune_malloc()
    device = torch.device(args.device)
    print(
        f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"columns {args.columns}, {args.dtype}"
    )
    if args.matrix:
        _matrix_rows(args.lengths, device, args.reps)
        return
    print(
        "| n | dense fwd ms | fft fwd ms | fwd speed-up | dense fwd+bwd ms | fft fwd+bwd ms "
        "| fwd+bwd speed-up |"
    )
    print("|---|---|---|---|---|---|---|")
    for n in args.lengths:
        dense = TokenProjection(n, toeplitz=True).to(device)
        fft = TokenProjection(n, toeplitz=True, fft_threshold=1).to(device)
        fft.load_state_dict(dense.state_dict())
        z = torch.randn(n, 1, args.columns, device=device, dtype=getattr(torch, args.dtype))
        z.requires_grad_()
        rows = []
        for layer in (dense, fft):
            with torch.no_grad():
                fwd = _time(lambda layer=layer, z=z: layer(z), device, args.reps)
            both = _time(lambda layer=layer, z=z: layer(z).sum().backward(), device, args.reps)
            rows.append((fwd, both))
        (df, db), (ff, fb) = rows
        print(f"| {n} | {df:.2f} | {ff:.2f} | {df / ff:.2f}x | {db:.2f} | {fb:.2f} | {db / fb:.2f}x |")


def _matrix_rows(lengths: list[int], device: torch.device, reps: int) -> None:
    """Forward+backward of the n x n Toeplitz W from its 2n - 1 weights: diagonal sums vs ``unfold``."""
    print("| n | diagonal sums ms | unfold backward ms | speed-up |\n|---|---|---|---|")
    for n in lengths:
        weight = torch.randn(2 * n - 1, device=device, requires_grad=True)
        grad = torch.randn(n, n, device=device)
        best = {True: float("inf"), False: float("inf")}

        def step(sums: bool, weight: torch.Tensor = weight, grad: torch.Tensor = grad, n: int = n) -> None:
            torch.autograd.grad(toeplitz_matrix(weight, n, n, sums), weight, grad)

        for _ in range(3):  # interleaved rounds: both see the same machine
            for sums in best:
                best[sums] = min(best[sums], _time(lambda sums=sums: step(sums), device, reps))
        print(f"| {n} | {best[True]:.3f} | {best[False]:.3f} | {best[False] / best[True]:.2f}x |")


if __name__ == "__main__":
    main()
