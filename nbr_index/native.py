"""The CPU tile kernel (``tile_kernel.cpp``), compiled on first use and called through ctypes.

Why native code: after the GEMM, a torch-ops tile pass runs one memory-bound sweep per statistic
(exp2, two sums, a product, maxima; and for the symmetric pass, each again along the columns),
about as long as the GEMM itself on 2 cores (``nbr-index bench`` measures both). The kernel
does all of them in one read of the tile. It is compiled with the machine's C++ compiler
(``$CXX``, else ``c++`` / ``g++`` / ``clang++``) for the machine it runs on (``-march=native``)
into a per-user cache, keyed by the source, the compiler, the flags and the CPU, so a cache
shared between machines never hands one the binary of another. ctypes releases the GIL during
the call, so the pass's worker threads run kernels in parallel.

Without a compiler :func:`load` returns None and the pass uses torch ops (``tile_kernel="torch"``),
which computes the same statistics.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("tile_kernel.cpp")
FLAGS = ["-O3", "-march=native", "-std=c++20", "-fno-math-errno", "-ffp-contract=fast", "-shared", "-fPIC"]
COMPILERS = ("c++", "g++", "clang++")

_lock = threading.Lock()
_loaded: dict[str, "TileKernel | None"] = {}


class TileKernel:
    """``statistics(...)``: one call of ``nbr_tile_statistics`` on torch tensors (CPU, contiguous)."""

    def __init__(self, library: ctypes.CDLL, path: Path):
        self.path = path
        function = library.nbr_tile_statistics
        i64, f32, f64, ptr = ctypes.c_int64, ctypes.c_float, ctypes.c_double, ctypes.c_void_p
        function.argtypes = [ptr, i64, i64, i64, f32, f32, ctypes.c_int32, ctypes.c_int32, f64, i64, i64,
                             ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, i64, ptr]
        function.restype = ctypes.c_int
        self._function = function

    def statistics(self, tile: torch.Tensor, scale: float, shift: float, diagonal: bool, unit: float,
                   row_base: int, col_base: int, rows_out: tuple, cols_out: tuple | None,
                   best: tuple | None, scratch: torch.Tensor) -> None:
        """Accumulate one (rows, cols) tile (row stride tile.stride(0)) into the output views.

        rows_out: (exp_sum (rows,) int64, exp_dot (rows,) int64, max (rows,) float32); cols_out:
        the same for the columns, or None (a diagonal tile). best: None, or the running top-1 to
        merge into, (row values (rows, 1) float32, row indices (rows, 1) int64, column values,
        column indices) with one stride. scratch: (>= 4 cols,) float64. See tile_kernel.cpp.
        The logits scale * g - shift are >= -2 shift; below -126 the kernel has to clamp them.
        """
        rows, cols = tile.shape
        columns = cols_out if cols_out is not None else (None, None, None)
        if best is None:
            best_pointers, stride = (None, None, None, None), 0
        else:
            best_pointers = tuple(None if t is None else t.data_ptr() for t in best)
            stride = best[0].stride(0)
        status = self._function(
            tile.data_ptr(), tile.stride(0), rows, cols, scale, shift, int(diagonal), int(2 * shift > 125), unit,
            row_base, col_base,
            *(t.data_ptr() for t in rows_out), *(None if t is None else t.data_ptr() for t in columns),
            *best_pointers, stride, scratch.data_ptr(),
        )
        if status != 0:
            raise ValueError("a diagonal tile must be square")


def load() -> TileKernel | None:
    """The compiled kernel for this machine (compiling it once), or None without a compiler."""
    compiler = _compiler()
    if compiler is None:
        return None
    if not SOURCE.exists():
        # An installation without the package data (a packaging error): slower, still correct.
        warnings.warn(f"{SOURCE} is missing from this installation: using the torch tile path "
                      f"(reinstall and-nbr to get the native kernel)", RuntimeWarning, stacklevel=2)
        return None
    with _lock:
        if compiler not in _loaded:
            _loaded[compiler] = _build_and_load(compiler)
        return _loaded[compiler]


def _compiler() -> str | None:
    candidates = [os.environ["CXX"]] if os.environ.get("CXX") else list(COMPILERS)
    for name in candidates:
        path = shutil.which(name)
        if path:
            return path
    return None


def _build_and_load(compiler: str) -> TileKernel | None:
    key = hashlib.sha256(
        b"\0".join([SOURCE.read_bytes(), compiler.encode(), _compiler_version(compiler).encode(),
                    " ".join(FLAGS).encode(), _cpu_identity().encode()])
    ).hexdigest()[:24]
    target = _cache_dir() / f"tile_kernel-{key}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        # Compile under a temporary name and rename: concurrent workers never load half a file.
        handle, partial = tempfile.mkstemp(dir=target.parent, suffix=".so.partial")
        os.close(handle)
        try:
            built = subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", partial], capture_output=True, text=True)
            if built.returncode != 0:
                return None
            os.replace(partial, target)
        finally:
            if os.path.exists(partial):
                os.unlink(partial)
    return TileKernel(ctypes.CDLL(str(target)), target)


def _compiler_version(compiler: str) -> str:
    try:
        return subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    except OSError:
        return ""


def _cpu_identity() -> str:
    """The CPU's model and feature flags (what -march=native compiles for)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return f"{platform.machine()} {platform.processor()}"
    wanted = ("model name", "flags", "Features", "CPU implementer", "CPU part")
    lines = {line.split(":")[0].strip(): line for line in text.splitlines() if ":" in line}
    return "\n".join(lines[name] for name in wanted if name in lines) + platform.machine()


def _cache_dir() -> Path:
    root = os.environ.get("NBR_INDEX_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache"), "and-nbr"
    )
    return Path(root)
