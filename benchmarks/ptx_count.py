"""Instructions per thread of the fused LayerNorm kernels, compiled for a Hopper GPU (sm_90) without one.

    TRITON_INTERPRET=0 python benchmarks/ptx_count.py            # every variant at C = 1536
    TRITON_INTERPRET=0 python benchmarks/ptx_count.py --quick    # the default launch only (the tests)

It also compiles the block pre-norm's backward kernel (:mod:`gmlp.kernels.norm_triton`) at ``--d`` columns,
without and with the residual gradient added in (``return_residual``), and the two gating kernels at their
default tile without and with the token bias added on load (the default since the eleventh session), bf16
activations.

Compiles ``_fwd_kernel`` and ``_bwd_kernel`` of :mod:`gmlp.kernels.sgu_triton` to PTX with Triton's own
compiler (no GPU or driver needed) for each row layout (one power-of-two block, or two pieces with
``ln_split``), with and without the bypass half (the split kernel writes it, the fused gating does not) and
with and without the prefetching loop, and counts the PTX instructions of one thread (``mov`` left out:
most vanish in the machine code). A row's C real columns are spread over ``32 * warps`` threads, so the
count divided by ``C / (32 * warps)`` is the work per real column, padding lanes' work included. This is
the arithmetic side of the
kernels' time, which the GPU profiles suggest does not overlap with their memory time
(benchmarks/RESULTS.md, ninth session).
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
from pathlib import Path

if os.environ.get("TRITON_INTERPRET") == "1":  # the interpreter replaces the kernels: nothing to compile
    sys.exit("run with TRITON_INTERPRET=0 (the Triton interpreter has no compiler to count)")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from gmlp.kernels import norm_triton, sgu_triton  # noqa: E402

_FWD_TYPES = {"U": "*bf16", "UB": "*bf16", "Z1": "*bf16", "Z2": "*bf16", "Keep": "*bf16", "W": "*fp32",
              "B": "*fp32", "Mean": "*fp32", "Rstd": "*fp32", "R": "i32", "C": "i32", "eps": "fp32",
              "TILES_PER_PROG": "i32"}  # fmt: skip
_BWD_TYPES = {"U": "*bf16", "UB": "*bf16", "DZ1": "*bf16", "DZ2": "*bf16", "DU": "*bf16", "Keep": "*bf16",
              "W": "*fp32", "Mean": "*fp32", "Rstd": "*fp32", "DW": "*fp32", "DB": "*fp32", "DUB": "*fp32",
              "R": "i32", "C": "i32", "ROWS_PER_PROG": "i32"}  # fmt: skip
_NORM_BWD_TYPES = {"X": "*bf16", "DY": "*bf16", "DRES": "*bf16", "W": "*fp32", "Mean": "*fp32",
                   "Rstd": "*fp32", "DX": "*bf16", "DW": "*fp32", "DB": "*fp32", "R": "i32", "D": "i32",
                   "ROWS_PER_PROG": "i32"}  # fmt: skip


def instructions(kernel: object, types: dict[str, str], constexprs: dict[str, object], warps: int) -> int:
    """PTX instructions (``mov`` excluded) of ``kernel`` compiled for sm_90 with these constexprs."""
    names = kernel.arg_names  # type: ignore[attr-defined]
    signature = {n: "constexpr" if n in constexprs else types[n] for n in names}
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    ptx = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps}).asm["ptx"]
    count = 0
    for line in ptx.splitlines():
        word = line.strip().split()[0] if line.strip() else ""
        if word.startswith("@"):  # a predicated instruction: the opcode follows the predicate
            parts = line.split()
            word = parts[1] if len(parts) > 1 else ""
        if word and word[0].isalpha() and not word.endswith(":") and not word.startswith("mov"):
            count += 1
    return count


def count_variants(c: int, quick: bool, warps: int = 4) -> list[dict[str, object]]:
    """One row per variant: pass, layout, bypass half, prefetch, instructions, columns per thread."""
    saved = sgu_triton.launch_config.ln_split
    layouts = []
    try:
        for layout, split in (("one block", None), ("two pieces", 1)):
            sgu_triton.set_launch_config(ln_split=split)
            layouts.append((layout, sgu_triton._row_pieces(c)))
    finally:
        sgu_triton.set_launch_config(ln_split=saved)
    rows = []
    for (layout, (block, second)), z1, prefetch in itertools.product(
        layouts, (False,) if quick else (False, True), (False,) if quick else (False, True)
    ):
        common = {"BLOCK_C": block, "BLOCK_B": second, "WITH_Z1": z1, "HAS_KEEP": False, "HAS_UB": False,
                  "PREFETCH": prefetch}  # fmt: skip
        real = c / (32 * warps)  # real columns per thread
        for name, kernel, types, extra in (
            ("forward", sgu_triton._fwd_kernel, _FWD_TYPES, {"ROWS": 1}),
            ("backward", sgu_triton._bwd_kernel, _BWD_TYPES, {}),
        ):
            n = instructions(kernel, types, {**common, **extra}, warps)
            rows.append({"pass": name, "layout": f"{layout} ({block}+{second})", "bypass": z1,
                         "prefetch": prefetch, "instructions": n, "per_column": n / real})  # fmt: skip
    return rows


_GATE_FWD_TYPES = {"U": "*bf16", "UB": "*bf16", "G": "*bf16", "TB": "*bf16", "S": "*bf16", "R": "i32",
                   "C": "i32", "BATCH": "i32"}  # fmt: skip
_GATE_BWD_TYPES = {"U": "*bf16", "UB": "*bf16", "G": "*bf16", "TB": "*bf16", "DS": "*bf16", "DU": "*bf16",
                   "DG": "*bf16", "DGSUM": "*fp32", "DUB": "*fp32", "R": "i32", "C": "i32",
                   "BATCH": "i32"}  # fmt: skip


def count_gating(c: int) -> list[dict[str, object]]:
    """The gating kernels at ``c`` columns with their default launch (one row per program): without and with
    the token bias added on load (``HAS_TB``); one row each with its instructions per thread."""
    _, per, block_c, warps = sgu_triton._gate_grid(1, c)
    rows = []
    kernels = (("gating forward", sgu_triton._gate_fwd_kernel, _GATE_FWD_TYPES),
               ("gating backward", sgu_triton._gate_bwd_kernel, _GATE_BWD_TYPES))  # fmt: skip
    for name, kernel, types in kernels:
        for tb in (False, True):
            constexprs = {"ROWS": per, "BLOCK_C": block_c, "HAS_UB": False, "HAS_TB": tb}
            rows.append({"pass": name, "token_bias": tb, "warps": warps,
                         "instructions": instructions(kernel, types, constexprs, warps)})  # fmt: skip
    return rows


def count_pre_norm(d: int) -> list[dict[str, object]]:
    """The pre-norm backward kernel at ``d`` columns and its default warps: without and with the residual
    gradient (``HAS_RES``); one row each with its instructions per thread."""
    block = sgu_triton._block_c(d)
    warps = sgu_triton._warps(block)
    return [
        {"pass": "pre-norm backward", "residual": res, "warps": warps,
         "instructions": instructions(norm_triton._norm_bwd_kernel, _NORM_BWD_TYPES,
                                      {"BLOCK_D": block, "HAS_RES": res}, warps)}
        for res in (False, True)
    ]  # fmt: skip


def main(argv: list[str] | None = None) -> list[dict[str, object]]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--c", type=int, default=1536, help="row width (half of d_ffn)")
    parser.add_argument("--quick", action="store_true", help="default launch only (no bypass, no prefetch)")
    parser.add_argument("--d", type=int, default=512, help="row width of the pre-norm (d_model)")
    args = parser.parse_args(argv)
    rows = count_variants(args.c, args.quick)
    print(f"triton {triton.__version__}, sm_90 PTX, C = {args.c}, 4 warps")
    print("| pass | row layout | bypass half | prefetch | instructions / thread | per real column |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['pass']} | {r['layout']} | {r['bypass']} | {r['prefetch']} | {r['instructions']} | "
              f"{r['per_column']:.1f} |")  # fmt: skip
    norm_rows = count_pre_norm(args.d)
    _print_table(f"pre-norm backward, D = {args.d}, {norm_rows[0]['warps']} warps",
                 {"residual": "residual gradient added"}, norm_rows)  # fmt: skip
    gate_rows = count_gating(args.c)
    _print_table(f"gating kernels, C = {args.c}, default tile, {gate_rows[0]['warps']} warps",
                 {"pass": "pass", "token_bias": "token bias added on load"}, gate_rows)  # fmt: skip
    return rows + norm_rows + gate_rows


def _print_table(title: str, columns: dict[str, str], rows: list[dict[str, object]]) -> None:
    """A markdown table of ``rows``: ``columns`` (key: heading), then the instructions per thread."""
    print(f"\n{title}")
    print("| " + " | ".join([*columns.values(), "instructions / thread"]) + " |")
    print("|" + "---|" * (len(columns) + 1))
    for r in rows:
        print("| " + " | ".join(str(r[k]) for k in [*columns, "instructions"]) + " |")


if __name__ == "__main__":
    main()
