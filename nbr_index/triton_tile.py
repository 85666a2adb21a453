"""One Triton kernel for the per-tile statistics of the fused pass on CUDA.

After the GEMM writes a (R, C) tile of raw dot products g, the torch-ops path runs a dozen
memory-bound passes over it (the logits, exp2, e * y, row and column sums, row and column
maxima). On a GPU those passes cost more than the GEMM itself (an fp32 16384 x 16384 x 128 GEMM
is ~1.1 ms on an H200; each 1 GiB pass over the tile is ~0.25-0.5 ms), so this kernel reads the
tile ONCE. With y = scale * g - shift it produces, per row and (off the diagonal) per column:

    exp_sum = sum 2^y          exp_dot = sum 2^y y          (self included)
    top_value, top_index = the largest g other than self, and its FIRST (lowest) column / row

Program (i, j) takes the (BM, BN) block at rows i BM.., columns j BN.. and writes its partial
statistics of each row to slot j and of each column to slot i; torch then reduces over the
slots in slot order (deterministic, no atomics): sums add, and the first slot holding the
maximum has the lowest index. On a diagonal tile the self entries g[r, r] count in the sums but
not in the maxima.

Tested on CPU with Triton's interpreter (TRITON_INTERPRET=1), see tests/test_nbr_triton_tile.py;
its register use is checked without a GPU by :func:`resource_usage` (tests and ``nbr-index bench``).
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from pathlib import Path

import torch
import triton
import triton.language as tl

NO_INDEX = 2**31 - 1

BLOCK_ROWS = BLOCK_COLUMNS = 64

# Warps per program, per variant, chosen so that neither spills. Compile-only check
# (:func:`resource_usage`) for sm_90 at BM = BN = 64: registers per thread, stack bytes,
# spill stores / loads in bytes (ptxas -v; 4 bytes a word).
#
#                              triton 3.6 (ptxas 12.8)              triton 3.8 (ptxas 12.9)
#   off-diagonal, 4 warps      255 regs, 168 B stack, 164 / 168 B   255 regs, no stack, no spills
#   off-diagonal, 8 warps      168 regs, no stack, no spills        128 regs, no stack, no spills
#   diagonal,     4 warps      198 regs, no stack, no spills        155 regs, no stack, no spills
#   diagonal,     8 warps      104 regs, no stack, no spills         80 regs, no stack, no spills
#
# The off-diagonal variant (all tiles but one per row block) spills at Triton's default 4 warps
# under triton 3.6 and sits at the 255-register cap under 3.8, so it runs 8 warps. The diagonal
# variant fits 4 warps in both, but its 155-198 registers a thread leave room for 8-12 resident
# warps per SM (64K registers); at 8 warps a program, 16-24: twice the warps in flight over the
# same tile, which a memory-bound kernel wants, so it runs 8 warps too.
TILE_WARPS = {"diagonal": 8, "off_diagonal": 8}


@triton.jit
def _tile_statistics_kernel(
    g_ptr, row_stride, n_rows, n_columns, scale, shift,
    row_sum_ptr, row_dot_ptr, row_max_ptr, row_arg_ptr,
    column_sum_ptr, column_dot_ptr, column_max_ptr, column_arg_ptr,
    DIAGONAL: tl.constexpr, COLUMNS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
):
    block_row, block_column = tl.program_id(0), tl.program_id(1)
    rows = block_row * BM + tl.arange(0, BM)
    columns = block_column * BN + tl.arange(0, BN)
    row_inside, column_inside = rows < n_rows, columns < n_columns
    inside = row_inside[:, None] & column_inside[None, :]
    g = tl.load(g_ptr + rows[:, None].to(tl.int64) * row_stride + columns[None, :], mask=inside, other=0.0)
    y = g * scale - shift
    e = tl.where(inside, tl.exp2(y), 0.0)
    ey = tl.where(inside, e * y, 0.0)
    candidate = tl.where(inside, g, float("-inf"))
    if DIAGONAL:
        candidate = tl.where(rows[:, None] == columns[None, :], float("-inf"), candidate)

    row_max = tl.max(candidate, axis=1)
    row_arg = tl.min(tl.where(candidate == row_max[:, None], columns[None, :], 2147483647), axis=1)
    row_slot = block_column * n_rows + rows
    tl.store(row_sum_ptr + row_slot, tl.sum(e, axis=1), mask=row_inside)
    tl.store(row_dot_ptr + row_slot, tl.sum(ey, axis=1), mask=row_inside)
    tl.store(row_max_ptr + row_slot, row_max, mask=row_inside)
    tl.store(row_arg_ptr + row_slot, row_arg, mask=row_inside)
    if COLUMNS:
        column_max = tl.max(candidate, axis=0)
        column_arg = tl.min(tl.where(candidate == column_max[None, :], rows[:, None], 2147483647), axis=0)
        column_slot = block_row * n_columns + columns
        tl.store(column_sum_ptr + column_slot, tl.sum(e, axis=0), mask=column_inside)
        tl.store(column_dot_ptr + column_slot, tl.sum(ey, axis=0), mask=column_inside)
        tl.store(column_max_ptr + column_slot, column_max, mask=column_inside)
        tl.store(column_arg_ptr + column_slot, column_arg, mask=column_inside)


def tile_statistics(tile: torch.Tensor, scale: float, shift: float, diagonal: bool, columns: bool,
                    block_rows: int = BLOCK_ROWS, block_columns: int = BLOCK_COLUMNS):
    """Per-row (and, with ``columns``, per-column) statistics of one (R, C) float32 tile with unit
    column stride: (row_sum, row_dot, row_max, row_arg, column_sum, column_dot, column_max,
    column_arg), float32 (R,) / (C,) and int64 local indices; the column entries are None without
    ``columns``. The same tuple as ``fused._torch_tile_statistics``.
    """
    rows, cols = tile.shape
    assert tile.stride(1) == 1 and tile.dtype == torch.float32
    grid = (triton.cdiv(rows, block_rows), triton.cdiv(cols, block_columns))

    def slots(count: int, length: int):
        return (torch.empty((count, length), dtype=torch.float32, device=tile.device),
                torch.empty((count, length), dtype=torch.float32, device=tile.device),
                torch.empty((count, length), dtype=torch.float32, device=tile.device),
                torch.empty((count, length), dtype=torch.int32, device=tile.device))

    row_slots = slots(grid[1], rows)
    column_slots = slots(grid[0], cols) if columns else row_slots  # unused without columns
    _tile_statistics_kernel[grid](
        tile, tile.stride(0), rows, cols, scale, shift, *row_slots, *column_slots,
        DIAGONAL=diagonal, COLUMNS=columns, BM=block_rows, BN=block_columns, num_warps=tile_warps(diagonal),
    )
    row_stats = _reduce_slots(*row_slots)
    column_stats = _reduce_slots(*column_slots) if columns else (None, None, None, None)
    return (*row_stats, *column_stats)


def _reduce_slots(sums: torch.Tensor, dots: torch.Tensor, maxima: torch.Tensor, arguments: torch.Tensor):
    """(slots, L) partials -> (L,) totals; the first slot holding the maximum has the lowest index."""
    maximum, slot = torch.max(maxima, dim=0)
    argument = arguments.gather(0, slot.unsqueeze(0)).squeeze(0).to(torch.int64)
    return sums.sum(dim=0), dots.sum(dim=0), maximum, argument


def tile_warps(diagonal: bool) -> int:
    """Warps per program of the diagonal or off-diagonal variant (see TILE_WARPS)."""
    return TILE_WARPS["diagonal" if diagonal else "off_diagonal"]


# The kernel's argument types for a compile without a launch (what a launch on a float32 tile infers).
_SIGNATURE = {
    "g_ptr": "*fp32", "row_stride": "i32", "n_rows": "i32", "n_columns": "i32", "scale": "fp32", "shift": "fp32",
    "row_sum_ptr": "*fp32", "row_dot_ptr": "*fp32", "row_max_ptr": "*fp32", "row_arg_ptr": "*i32",
    "column_sum_ptr": "*fp32", "column_dot_ptr": "*fp32", "column_max_ptr": "*fp32", "column_arg_ptr": "*i32",
    "DIAGONAL": "constexpr", "COLUMNS": "constexpr", "BM": "constexpr", "BN": "constexpr",
}


class ResourceUsageUnavailable(RuntimeError):
    """The compile-only check cannot run here: no NVIDIA backend, ptxas or cuobjdump in triton, or
    the kernel is interpreted (TRITON_INTERPRET=1)."""


def resource_usage(diagonal: bool, num_warps: int | None = None, arch: int = 90,
                   block_rows: int = BLOCK_ROWS, block_columns: int = BLOCK_COLUMNS) -> dict:
    """Registers and spills of one variant of the kernel, compiled for ``arch`` with no GPU needed.

    The variant the pass launches: DIAGONAL = diagonal, COLUMNS = not diagonal; num_warps
    defaults to the launched :func:`tile_warps`. Triton compiles it to PTX and a cubin as a
    launch would; the registers and stack frame are read from that cubin (cuobjdump
    --dump-resource-usage), the spill stores and loads from ``ptxas -v`` on the same PTX (the
    cubin does not record them), both with the tools shipped in triton's NVIDIA backend.

    Returns {"variant", "num_warps", "arch", "block_rows", "block_columns", "registers",
    "stack_bytes", "spill_store_bytes", "spill_load_bytes", "triton", "ptxas"}.
    Raises ResourceUsageUnavailable when it cannot run here (no NVIDIA backend or tools in
    triton, or TRITON_INTERPRET=1), RuntimeError when a tool fails.
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if os.environ.get("TRITON_INTERPRET") == "1":
        raise ResourceUsageUnavailable("TRITON_INTERPRET=1: the kernel is interpreted, not compiled")
    num_warps = tile_warps(diagonal) if num_warps is None else num_warps
    ptxas, cuobjdump, gpu_name, ptxas_version = _nvidia_tools(arch)
    source = ASTSource(fn=_tile_statistics_kernel, signature=_SIGNATURE, constexprs={
        "DIAGONAL": diagonal, "COLUMNS": not diagonal, "BM": block_rows, "BN": block_columns})
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
    with tempfile.TemporaryDirectory(prefix="nbr-index-triton-") as folder:
        ptx, cubin = Path(folder) / "kernel.ptx", Path(folder) / "kernel.cubin"
        ptx.write_text(compiled.asm["ptx"])
        cubin.write_bytes(compiled.asm["cubin"])
        ptxas_log = _run_tool([ptxas, "-lineinfo", "-v", f"--gpu-name={gpu_name}", str(ptx),
                               "-o", str(Path(folder) / "again.cubin")])
        cubin_usage = _run_tool([cuobjdump, "--dump-resource-usage", str(cubin)])
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", ptxas_log)
    registers = re.search(r"\bREG:(\d+)", cubin_usage)
    stack = re.search(r"\bSTACK:(\d+)", cubin_usage)
    if not (spills and registers and stack):
        raise RuntimeError(f"unexpected ptxas / cuobjdump output: {ptxas_log!r} {cubin_usage!r}")
    return {
        "variant": "diagonal" if diagonal else "off_diagonal", "num_warps": num_warps, "arch": arch,
        "block_rows": block_rows, "block_columns": block_columns,
        "registers": int(registers.group(1)), "stack_bytes": int(stack.group(1)),
        "spill_store_bytes": int(spills.group(1)), "spill_load_bytes": int(spills.group(2)),
        "triton": triton.__version__, "ptxas": ptxas_version,
    }


def _nvidia_tools(arch: int) -> tuple[str, str, str, str]:
    """(ptxas path, cuobjdump path, ptxas --gpu-name, ptxas version) of triton's NVIDIA backend."""
    try:
        from triton import knobs
        from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    except (ImportError, AttributeError) as error:
        raise ResourceUsageUnavailable(f"triton {triton.__version__} has no NVIDIA backend here ({error})") from None
    try:  # triton raises RuntimeError("Cannot find ptxas") when neither its own nor TRITON_PTXAS_PATH runs
        ptxas, cuobjdump = get_ptxas(arch), knobs.nvidia.cuobjdump
    except RuntimeError as error:
        raise ResourceUsageUnavailable(f"triton {triton.__version__}: {error}") from None
    return ptxas.path, cuobjdump.path, sm_arch_from_capability(arch), ptxas.version


def _run_tool(command: list[str]) -> str:
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        raise RuntimeError(f"{Path(command[0]).name} failed ({completed.returncode}): "
                                       f"{completed.stderr.strip()[-500:]}")
    return completed.stdout + completed.stderr
