"""Benchmarks: the fused pass against FAISS k-NN alone, an unfused reference and a bare GEMM pass;
and peak memory of a chunked rebuild read from a real store.

Speed (``nbr-index bench``), on the same random unit vectors, in one process:
  (a) FAISS IndexFlatIP top-(k+1) alone (faiss-gpu on CUDA when importable),
  (b) the unfused reference (``reference.unfused_knn_entropy``),
  (c) our fused pass (``knn_entropy``, backend torch),
  (d) matmul only: the tiles the fused pass computes (I <= J, half the matrix) through a bare
      GEMM into a preallocated buffer, scheduled like the pass,
  (e) the full blocked matmul: every tile of the N x N matrix (the GPU target's anchor),
with peak memory per stage and a check of (c) against (b). On CUDA (c) runs the Triton tile
kernel and (c') the same pass with torch ops; (c) is checked against (c') on every row's
neighbours and entropy, and the kernel's register use (compile-only, ``triton_tile.resource_usage``)
is recorded. Timings on a shared machine are noisy: compare the ratios of one run, and use --repeat
(the minimum of each stage is reported). Nothing is timed before a warm-up pass has compiled every
kernel variant the timed stages use.

Memory (``nbr-index bench --mode memory``): writes N random unit
vectors to a store in a child process, then runs a chunked ``knn_entropy`` on the store's reader
in a fresh child and reports its peak RSS above its RSS before the pass.
"""

from __future__ import annotations

import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from .backends import knn_entropy
from .checks import resolve_device
from .errors import RebuildCancelled
from .faiss_backend import faiss_gpu_available, faiss_gpu_device, import_faiss
from .features import InMemoryFeatures
from .fused import (GemmWorker, SuperBlockPair, TileRun, WholePass, default_block_sizes, intra_op_threads,
                    plan_tiles, row_block_count, run_plan, tile_rows)
from .progress import StderrProgress
from .reference import unfused_knn_entropy


# The GPU target of the rebuild: (c) at most this many times (e), the full blocked matmul.
FUSED_OVER_FULL_MATMUL_TARGET = 1.6
# Triton against torch ops on the same GEMM tiles: maxima are exact, so the neighbours agree except
# where two similarities tie within float32 rounding; the sums differ in their order only.
TRITON_TIE_GAP = 1e-6
TRITON_ENTROPY_RELATIVE_TOLERANCE = 1e-5
# Disagreeing rows whose similarity gap is measured (evenly spaced, when more disagree).
GAP_SAMPLE_ROWS = 100_000


def random_unit_vectors(n: int, dim: int, seed: int = 0) -> torch.Tensor:
    """(n, dim) float32 rows uniform on the unit sphere."""
    generator = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, dim, generator=generator), dim=1).contiguous()


def run_speed_bench(
    n: int, dim: int = 128, k: int = 1, tau: float = 0.1, device: str = "cpu", repeat: int = 1,
    seed: int = 0, reference: bool = True, matmul_precision: str = "fp32",
) -> dict:
    """Time stages (a)-(d) ``repeat`` times; returns seconds (min), ratios, peaks and checks."""
    torch_device = resolve_device(device)
    features = random_unit_vectors(n, dim, seed)
    on_device = features.to(torch_device)
    stages: dict[str, list[float]] = {}
    peaks: dict[str, int] = {}
    outputs: dict[str, tuple] = {}

    def timed(name: str, run):
        _synchronize(torch_device)
        before = _current_memory(torch_device)
        _reset_peak_memory(torch_device)
        started = time.perf_counter()
        output = run()
        _synchronize(torch_device)
        stages.setdefault(name, []).append(time.perf_counter() - started)
        # Peak above what the process held before the stage: the stage's own working memory.
        peaks[name] = max(peaks.get(name, 0), _peak_memory(torch_device) - before)
        return output

    faiss_label = _faiss_label(torch_device)
    # CUDA: (c) with the one-read Triton kernel where triton is there, (c') with torch ops.
    tile_kernel = "triton" if torch_device.type == "cuda" and _triton_importable() else "auto"
    warm_up_rows = _warm_up(on_device, k, tau, device, matmul_precision, tile_kernel)
    for _ in range(repeat):
        if faiss_label is not None:
            outputs["faiss"] = timed("faiss_knn", lambda: _faiss_search(features, k, torch_device))
        fused = timed("fused", lambda: knn_entropy(on_device, k=k, tau=tau, backend="torch", device=device,
                                                     matmul_precision=matmul_precision, tile_kernel=tile_kernel))
        outputs["fused"] = (fused.neighbours, fused.entropy)
        if torch_device.type == "cuda":  # the same pass with the tile statistics as separate torch ops
            torch_ops = timed("fused_torch_ops", lambda: knn_entropy(
                on_device, k=k, tau=tau, backend="torch", device=device, matmul_precision=matmul_precision,
                tile_kernel="torch"))
            outputs["fused_torch_ops"] = (torch_ops.neighbours, torch_ops.entropy)
        timed("matmul_only", lambda: _matmul_pass(on_device, full=False))
        timed("matmul_full", lambda: _matmul_pass(on_device, full=True))
        if reference:
            outputs["reference"] = timed("unfused_reference", lambda: _unfused(on_device, k, tau))

    seconds = {name: min(times) for name, times in stages.items()}
    report = {
        "n": n, "dim": dim, "k": k, "tau": tau, "device": torch_device.type, "repeat": repeat,
        "threads": torch.get_num_threads(), "matmul_precision": matmul_precision,
        "faiss": faiss_label, "tile_kernel": fused.details["tile_kernel"], "warm_up_rows": warm_up_rows,
        "seconds": seconds, "all_seconds": stages,
        "peak_memory_bytes": peaks,
        "peak_memory_kind": (
            "cuda max_memory_allocated above allocated before the stage" if torch_device.type == "cuda"
            else "peak RSS (VmHWM) above RSS before the stage"
        ),
        "ratios": {},
    }
    fused_seconds = seconds["fused"]
    if "faiss_knn" in seconds:
        report["ratios"]["fused_over_faiss"] = fused_seconds / seconds["faiss_knn"]
    report["ratios"]["fused_over_matmul"] = fused_seconds / seconds["matmul_only"]
    report["ratios"]["fused_over_full_matmul"] = fused_seconds / seconds["matmul_full"]
    report["fused_over_full_matmul_target"] = FUSED_OVER_FULL_MATMUL_TARGET
    if reference:
        report["ratios"]["fused_over_reference"] = fused_seconds / seconds["unfused_reference"]
        ref_neighbours, ref_entropy = outputs["reference"]
        fused_neighbours, fused_entropy = outputs["fused"]
        report["check_vs_reference"] = {
            "top1_agreement": float((fused_neighbours[:, 0] == ref_neighbours[:, 0]).mean()),
            "top1_disagreement_max_similarity_gap": _similarity_gap(
                features, fused_neighbours[:, 0], ref_neighbours[:, 0]
            ),
            "max_entropy_abs_error": float(np.abs(fused_entropy - ref_entropy).max()),
            "max_entropy_rel_error": float((np.abs(fused_entropy - ref_entropy) / np.abs(ref_entropy)).max()),
        }
    if "faiss" in outputs:
        report["check_vs_faiss_top1_agreement"] = float((outputs["fused"][0][:, 0] == outputs["faiss"][:, 0]).mean())
    if "fused_torch_ops" in outputs:
        report["check_vs_torch_ops"] = check_against_torch_ops(features, outputs["fused"], outputs["fused_torch_ops"])
    if report["tile_kernel"] == "triton":
        report["triton_tile_resources"] = _triton_resources(torch_device)
    return report


def warm_up_rows(n: int, block_rows: int) -> int:
    """Rows of a warm-up pass whose tiles have every (variant, rows, columns) shape that the pass
    over N rows has: two full row blocks (a full diagonal and a full off-diagonal tile) and the
    same ragged remainder (the ragged diagonal tile and the full-by-ragged off-diagonal one)."""
    return min(n, 2 * block_rows + n % block_rows)


def _warm_up(features: torch.Tensor, k: int, tau: float, device: str, matmul_precision: str,
             tile_kernel: str) -> int:
    """Run the pass(es) of the timed stages once on the first rows, untimed; returns how many rows.

    Compiles the CPU tile kernel (first use only) or, on CUDA, every Triton specialisation the
    timed pass launches: the diagonal and off-diagonal variants on each tile shape (Triton
    specialises a tile's row and column counts by their divisibility by 16, so a ragged tile is
    another compile); see :func:`warm_up_rows`. On CUDA the torch-ops pass (c') is warmed the same way.
    """
    n = features.shape[0]
    rows = warm_up_rows(n, tile_rows(n, default_block_sizes(features.device)))
    kernels = [tile_kernel] + (["torch"] if tile_kernel == "triton" else [])  # "auto" on CUDA is torch ops
    for kernel in kernels:
        knn_entropy(features[:rows], k=min(k, rows - 1), tau=tau, backend="torch", device=device,
                    matmul_precision=matmul_precision, tile_kernel=kernel)
    return rows


def check_against_torch_ops(features: torch.Tensor, triton_output: tuple, torch_ops_output: tuple) -> dict:
    """(c) Triton against (c') torch ops, every row: neighbours (wherever the j-th neighbours differ,
    their similarities must tie within TRITON_TIE_GAP) and entropy (relative error within
    TRITON_ENTROPY_RELATIVE_TOLERANCE). features: (N, d) float32 on CPU; outputs: (neighbours
    (N, k) int64, entropy (N,) float32)."""
    (neighbours, entropy), (expected_neighbours, expected_entropy) = triton_output, torch_ops_output
    gap = max(_similarity_gap(features, neighbours[:, j], expected_neighbours[:, j]) for j in range(neighbours.shape[1]))
    relative = float((np.abs(entropy - expected_entropy) / np.abs(expected_entropy)).max())
    return {
        "rows": int(len(neighbours)),
        "neighbours_agreement": float((neighbours == expected_neighbours).mean()),
        "top1_agreement": float((neighbours[:, 0] == expected_neighbours[:, 0]).mean()),
        "disagreement_max_similarity_gap": gap,
        "max_entropy_abs_error": float(np.abs(entropy - expected_entropy).max()),
        "max_entropy_rel_error": relative,
        "passed": bool(gap <= TRITON_TIE_GAP and relative <= TRITON_ENTROPY_RELATIVE_TOLERANCE),
    }


def _triton_resources(device: torch.device) -> list[dict] | str:
    """Registers and spills of both Triton tile variants as launched, compiled for this GPU's
    architecture (``triton_tile.resource_usage``); a one-line reason when that cannot run."""
    from .triton_tile import resource_usage

    major, minor = torch.cuda.get_device_capability(device)
    try:
        return [resource_usage(diagonal, arch=10 * major + minor) for diagonal in (True, False)]
    except Exception as error:  # a diagnostic: the timings above stand without it
        return f"unavailable: {type(error).__name__}: {error}"


def _similarity_gap(features: torch.Tensor, picked: np.ndarray, expected: np.ndarray) -> float:
    """Largest float64 |m_i.m_a - m_i.m_b| over rows whose picks a and b differ (0 if none):
    a disagreement of ~1e-7 is a near-tie decided by float32 rounding, not a wrong neighbour."""
    rows = np.nonzero(picked != expected)[0]
    if rows.size == 0:
        return 0.0
    if rows.size > GAP_SAMPLE_ROWS:  # an evenly spaced sample: only the rows that differ go to float64
        rows = rows[np.linspace(0, rows.size - 1, GAP_SAMPLE_ROWS).astype(np.int64)]
    m = features.numpy()

    def similarity(columns: np.ndarray) -> np.ndarray:
        return (m[rows].astype(np.float64) * m[columns].astype(np.float64)).sum(axis=1)

    return float(np.abs(similarity(picked[rows]) - similarity(expected[rows])).max())


def format_speed_report(report: dict) -> str:
    """Human-readable lines of :func:`run_speed_bench`'s report."""
    s, peaks = report["seconds"], report["peak_memory_bytes"]
    lines = [
        f"nbr-index bench: N={report['n']} d={report['dim']} k={report['k']} tau={report['tau']} "
        f"device={report['device']} threads={report['threads']} repeat={report['repeat']} (min of repeats) "
        f"tile kernel {report['tile_kernel']}"
    ]
    names = {
        "faiss_knn": f"(a) FAISS k-NN alone [{report['faiss']}]",
        "unfused_reference": "(b) unfused reference (matmul, topk, logsumexp, p*z)",
        "fused": "(c) fused k-NN + entropy (ours)",
        "fused_torch_ops": "(c') same, tile statistics as torch ops (no Triton)",
        "matmul_only": "(d) matmul only (blocked GEMM, the tiles of (c))",
        "matmul_full": "(e) full blocked matmul (every tile of N x N)",
    }
    for key, label in names.items():
        if key in s:
            lines.append(f"  {label:<58} {s[key]:9.3f} s   peak {peaks[key] / 2**20:9.1f} MiB")
    lines.append("  ratios: " + ", ".join(f"{name} {value:.2f}" for name, value in report["ratios"].items()))
    lines.append(f"  ratio (c)/(e) {report['ratios']['fused_over_full_matmul']:.2f} "
                 f"(GPU target <= {report['fused_over_full_matmul_target']})")
    if "check_vs_reference" in report:
        check = report["check_vs_reference"]
        lines.append(
            f"  check (c) vs (b): top-1 agreement {check['top1_agreement']:.6f} (disagreements are near-ties: "
            f"similarity gap <= {check['top1_disagreement_max_similarity_gap']:.1e}), max entropy error "
            f"{check['max_entropy_abs_error']:.2e} abs / {check['max_entropy_rel_error']:.2e} rel"
        )
    if "check_vs_faiss_top1_agreement" in report:
        lines.append(f"  check (c) vs (a): top-1 agreement {report['check_vs_faiss_top1_agreement']:.6f}")
    if "check_vs_torch_ops" in report:
        check = report["check_vs_torch_ops"]
        lines.append(
            f"  check (c) vs (c'): {'passed' if check['passed'] else 'FAILED'} on {check['rows']} rows: neighbours "
            f"agreement {check['neighbours_agreement']:.6f}, top-1 {check['top1_agreement']:.6f} (similarity gap "
            f"<= {check['disagreement_max_similarity_gap']:.1e}, allowed {TRITON_TIE_GAP:.0e}), max entropy "
            f"error {check['max_entropy_abs_error']:.2e} abs / {check['max_entropy_rel_error']:.2e} rel "
            f"(allowed {TRITON_ENTROPY_RELATIVE_TOLERANCE:.0e})"
        )
    if "triton_tile_resources" in report:
        resources = report["triton_tile_resources"]
        if isinstance(resources, str):
            lines.append(f"  triton tile kernel registers: {resources}")
        for usage in resources if isinstance(resources, list) else []:
            lines.append(
                f"  triton tile kernel {usage['variant']} (sm_{usage['arch']}, {usage['num_warps']} warps, "
                f"triton {usage['triton']}, ptxas {usage['ptxas']}): {usage['registers']} registers, stack "
                f"{usage['stack_bytes']} B, spill stores {usage['spill_store_bytes']} B, spill loads "
                f"{usage['spill_load_bytes']} B"
            )
    lines.append(f"  peak memory: {report['peak_memory_kind']}")
    return "\n".join(lines)


def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _faiss_label(device: torch.device) -> str | None:
    try:
        import_faiss()
    except Exception:
        return None
    if device.type == "cuda":
        return "faiss-gpu GpuIndexFlatIP" if faiss_gpu_available() else None
    return "faiss-cpu IndexFlatIP"


def _faiss_search(features: torch.Tensor, k: int, device: torch.device) -> np.ndarray:
    """Top-(k+1) with IndexFlatIP, self dropped: (N, k) ids. FAISS's own cost, no tie repair."""
    faiss = import_faiss()
    data = features.numpy()
    index = faiss.IndexFlatIP(data.shape[1])
    if device.type == "cuda":
        index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), faiss_gpu_device(device), index)
    index.add(data)
    _, ids = index.search(data, k + 1)
    own = ids == np.arange(len(ids))[:, None]
    # A stable argsort of the "is self" flags moves self (if returned) to the end, order kept.
    return np.take_along_axis(ids, np.argsort(own, axis=1, kind="stable"), axis=1)[:, :k]


def _unfused(features: torch.Tensor, k: int, tau: float):
    neighbours, _, entropy = unfused_knn_entropy(features, k, tau)
    return neighbours.numpy(), entropy.numpy()


def _matmul_pass(features: torch.Tensor, full: bool) -> None:
    """The GEMM of every tile the fused pass computes (or, with ``full``, of every tile of the
    N x N matrix) into a preallocated buffer, scheduled exactly like the pass (on CPU: one worker
    thread per core with single-threaded GEMMs): the floor the pass builds on."""
    device = features.device
    n = features.shape[0]
    block_rows = tile_rows(n, default_block_sizes(device))
    if full:
        blocks = row_block_count(n, block_rows)
        plan = [SuperBlockPair((0, n), (0, n), [TileRun(row, 0, blocks) for row in range(blocks)])]
    else:
        plan = plan_tiles(n, block_rows, n, WholePass())
    workers = 1 if device.type == "cuda" else torch.get_num_threads()
    with intra_op_threads(1 if workers > 1 else None):
        run_plan(InMemoryFeatures(features), plan, [GemmWorker(block_rows, n, device) for _ in range(workers)], None)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # Linux: writing 5 to clear_refs resets VmHWM (the peak RSS) of this process
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _current_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.memory_allocated(device))
    return current_rss_bytes()


def _peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return peak_rss_bytes()


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (VmHWM, resettable), else ru_maxrss."""
    status = _proc_status()
    if "VmHWM" in status:
        return status["VmHWM"]
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss_bytes() -> int:
    return _proc_status().get("VmRSS", 0)


def _proc_status() -> dict[str, int]:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return {}
    values = {}
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        parts = rest.split()
        if len(parts) == 2 and parts[1] == "kB":
            values[name] = int(parts[0]) * 1024
    return values


# ---------------------------------------------------------------------------------------- memory


def run_memory_bench(
    n: int, dim: int = 128, k: int = 1, tau: float = 0.1, store_dir: str | None = None,
    chunk_read_rows: int = 65536, in_memory: bool = False, seed: int = 0, max_seconds: float | None = None,
) -> dict:
    """Peak RSS of a chunked (or, with in_memory, whole-snapshot) knn_entropy read from a store.

    The store is written (once; reused when ``store_dir`` already holds one of this N and dim)
    by a child process, and the pass runs in a fresh child so its peak is its own.
    max_seconds: stop the pass after this long and report the peak so far (every buffer is
    allocated by the end of the first database super-block, so the peak is reached early) with
    the fraction of tiles done and the projected full time.
    """
    own_dir = store_dir is None
    store_path = Path(store_dir or tempfile.mkdtemp(prefix="nbr-index-membench-")) / f"store-n{n}-d{dim}"
    try:
        _run_child("_write_store", {"path": str(store_path), "n": n, "dim": dim, "seed": seed})
        return _run_child("_measure_pass", {
            "path": str(store_path), "k": k, "tau": tau, "chunk_read_rows": chunk_read_rows,
            "in_memory": in_memory, "max_seconds": max_seconds,
        })
    finally:
        if own_dir:
            import shutil

            shutil.rmtree(store_path.parent, ignore_errors=True)


def format_memory_report(report: dict) -> str:
    mib = 2**20
    return "\n".join([
        f"nbr-index bench --mode memory: N={report['n']} d={report['dim']} k={report['k']} "
        f"mode={'in-memory' if report['in_memory'] else 'chunked (read rows ' + str(report['chunk_read_rows']) + ')'}",
        f"  feature bytes            {report['feature_bytes'] / mib:10.1f} MiB",
        f"  RSS before the pass      {report['rss_before_bytes'] / mib:10.1f} MiB (imports, store opened)",
        f"  peak RSS during the pass {report['peak_rss_bytes'] / mib:10.1f} MiB",
        f"  peak above before        {report['peak_above_before_bytes'] / mib:10.1f} MiB"
        f"  (target: <= feature bytes + 1024 MiB = {(report['feature_bytes'] + 2**30) / mib:.1f} MiB)",
        f"  pass seconds             {report['seconds']:10.1f} s"
        + ("" if report["completed"] else
           f"  (stopped at {100 * report['fraction_done']:.1f}% of tiles; full pass ~{report['projected_seconds']:.0f} s)"),
        f"  tile kernel {report['tile_kernel']}, {report['threads']} threads, load average at the end "
        + " / ".join(f"{load:.2f}" for load in report["load_average"]),
    ])


def _run_child(function: str, arguments: dict) -> dict:
    """Run ``function(arguments)`` in a fresh interpreter; its progress lines reach our stderr."""
    code = f"import json, sys; from nbr_index import bench; print(json.dumps(bench.{function}(json.loads(sys.argv[1]))))"
    completed = subprocess.run(
        [sys.executable, "-c", code, json.dumps(arguments)], stdout=subprocess.PIPE, text=True, check=False,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])},
    )
    if completed.returncode != 0:
        raise RuntimeError(f"memory bench child {function} failed with exit status {completed.returncode} (see above)")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def _write_store(arguments: dict) -> dict:
    from storage import Store

    n, dim = arguments["n"], arguments["dim"]
    store = Store.create_or_open(arguments["path"], n=n, dim=dim, dataset_id=f"random-unit-{n}x{dim}")
    if 0 not in store.complete_feature_rounds():
        store.write_features(0, random_unit_vectors(n, dim, arguments["seed"]).numpy())
    return {"path": arguments["path"]}


def _measure_pass(arguments: dict) -> dict:
    from storage import Store

    store = Store.open(arguments["path"])
    reader = store.feature_reader(0)
    rss_before = current_rss_bytes()
    _reset_peak_memory(torch.device("cpu"))
    feature_bytes = reader.n * reader.dim * 4
    max_seconds = arguments.get("max_seconds") or math.inf
    started = time.perf_counter()
    fraction_done = [0.0]

    report = StderrProgress(f"nbr-index bench --mode memory N={reader.n}", every_seconds=60.0)

    def stop_after_max_seconds(done: int, total: int) -> None:
        fraction_done[0] = done / total
        report(done, total)
        if time.perf_counter() - started > max_seconds:
            raise RebuildCancelled("memory bench time limit")

    tile_kernel = None
    try:
        result = knn_entropy(
            reader, k=arguments["k"], tau=arguments["tau"],
            in_memory_bytes=math.inf if arguments["in_memory"] else 0,
            chunk_read_rows=arguments["chunk_read_rows"], progress=stop_after_max_seconds,
        )
        completed, tile_kernel = True, result.details.get("tile_kernel")
    except RebuildCancelled:
        completed = False
    seconds = time.perf_counter() - started
    peak = peak_rss_bytes()
    return {
        "n": reader.n, "dim": reader.dim, "k": arguments["k"], "in_memory": arguments["in_memory"],
        "chunk_read_rows": arguments["chunk_read_rows"], "feature_bytes": feature_bytes,
        "rss_before_bytes": rss_before, "peak_rss_bytes": peak, "peak_above_before_bytes": peak - rss_before,
        "extra_over_feature_bytes": peak - rss_before - feature_bytes, "seconds": seconds,
        "completed": completed, "fraction_done": 1.0 if completed else fraction_done[0], "tile_kernel": tile_kernel,
        "threads": torch.get_num_threads(), "load_average": os.getloadavg(),
        "projected_seconds": seconds if completed else seconds / max(fraction_done[0], 1e-9),
    }
