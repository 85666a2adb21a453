"""``nbr-index``: rebuild, serve, inspect, query and benchmark neighbourhood rounds of an AND store.

Every user error prints ``error: <one line>`` to stderr and exits with status 2 (no traceback).
"""

from __future__ import annotations

import json
import math
import sys

import click

from storage import Store, format_description

from .backends import BACKENDS
from .click_errors import UserErrorGroup
from .curriculum import MODES
from .fused import MATMUL_PRECISIONS
from .progress import StderrProgress
from .selection import SELECTION_CHOICES

GIB = 1 << 30


@click.group(cls=UserErrorGroup, context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Anchor Neighbourhood Discovery: k-NN + entropy of the memory bank, curriculum anchors.

    Training round r (1..R) uses neighbourhoods/round-r, computed from the memory bank after round
    r-1 (features/round-(r-1)) in one blocked pass over the N x N similarities.
    """


def _compute_options(function):
    """Options shared by rebuild and serve (curriculum overrides and the compute backend)."""
    options = [
        click.option("--rounds", type=int, default=None, help="R, the number of curriculum rounds [store's curriculum, else 4]."),
        click.option("--k", "k", type=int, default=None, help="Neighbours per sample, self excluded [store's curriculum, else 1]."),
        click.option("--tau", type=float, default=None, help="Softmax temperature of the entropy [store's curriculum, else 0.1]."),
        click.option("--mode", type=click.Choice(MODES), default=None,
                     help="progressive: floor(N r/R) lowest-entropy anchors; oneoff: all N [store's curriculum]."),
        click.option("--selection", type=click.Choice(SELECTION_CHOICES), default=None,
                     help="Which rows fill the anchor places: entropy (the paper), mutual (mutual nearest "
                          "neighbours first, by entropy) or stable (rows whose nearest neighbour was a neighbour "
                          "in the previous round first); oracle uses the store's labels to give each anchor its own "
                          "class's nearest rows: a measurement of the ceiling, not a method [store's curriculum, "
                          "else entropy]."),
        click.option("--max-anchor-fraction", type=float, default=None,
                     help="At most floor(N f) anchors in any round, f in (0, 1]; 1 = the paper "
                          "[store's curriculum, else 1]."),
        click.option("--backend", type=click.Choice(BACKENDS), default="auto", show_default=True,
                     help="torch: fused k-NN + entropy (auto picks it); faiss: exact FAISS k-NN; faiss-ivf: approximate."),
        click.option("--device", default="cpu", show_default=True, help="cpu or cuda (cuda:N)."),
        click.option("--matmul-precision", type=click.Choice(MATMUL_PRECISIONS), default="fp32", show_default=True,
                     help="CUDA only: tf32/bf16 GEMM are faster but not exact."),
        click.option("--nprobe", type=int, default=32, show_default=True, help="faiss-ivf: inverted lists visited per query."),
        click.option("--nlist", type=int, default=None, help="faiss-ivf: inverted lists [about 4 sqrt(N)]."),
        click.option("--max-in-memory-gb", type=float, default=4.0, show_default=True,
                     help="Load snapshots up to this size whole; larger ones are read in row chunks."),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def _rebuild_options(rounds, k, tau, mode, selection, max_anchor_fraction, backend, device, matmul_precision,
                     nprobe, nlist, max_in_memory_gb) -> dict:
    from .errors import InvalidParameterError

    # nan would compare False everywhere and read as "no limit"; inf is a deliberate "no limit".
    if math.isnan(max_in_memory_gb) or max_in_memory_gb < 0:
        raise InvalidParameterError(f"--max-in-memory-gb must be 0 or more (inf: always whole), got {max_in_memory_gb}")
    if nprobe < 1 or (nlist is not None and nlist < 1):
        raise InvalidParameterError(f"--nprobe and --nlist must be at least 1, got {nprobe} and {nlist}")
    return dict(
        rounds=rounds, k=k, tau=tau, mode=mode, selection=selection, max_anchor_fraction=max_anchor_fraction,
        backend=backend, device=device,
        matmul_precision=matmul_precision, nprobe=nprobe, nlist=nlist,
        in_memory_bytes=int(max_in_memory_gb * GIB) if math.isfinite(max_in_memory_gb) else math.inf,
    )


def _launch_options(function):
    """Options shared by rebuild and serve: W workers under torch's elastic agent."""
    options = [
        click.option("--world-size", type=int, default=1, show_default=True,
                     help="Local workers splitting the tiles (torch elastic agent; gloo on CPU, nccl on CUDA); "
                          "ignored under an outer torchrun, which sets the world itself."),
        click.option("--max-restarts", type=int, default=0, show_default=True,
                     help="Restart all workers this many times when one dies (the round is recomputed)."),
        click.option("--master-port", type=int, default=0, show_default=True,
                     help="Rendezvous port on 127.0.0.1 (0: pick a free one)."),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def _check_launch(world_size: int, max_restarts: int, master_port: int) -> None:
    from .launch import LaunchError

    if not 0 <= master_port <= 65535:
        raise LaunchError(f"--master-port must be a TCP port, 1 to 65535 (0: pick a free one), got {master_port}")
    if world_size < 1:
        raise LaunchError(f"--world-size must be at least 1, got {world_size}")
    if max_restarts < 0:
        raise LaunchError(f"--max-restarts must be 0 or more, got {max_restarts}")


@main.command()
@click.option("--store", "store_url", required=True, help="Store path or fsspec URL.")
@click.option("--round", "round_", type=int, required=True, help="Neighbourhood round to build (1..R).")
@_compute_options
@_launch_options
@click.option("--stall-seconds", type=float, default=0.0, hidden=True,
              help="Test hook: every worker of the first attempt sleeps this long at its first progress report.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON line.")
@click.option("--quiet", is_flag=True, help="No progress lines on stderr.")
def rebuild(store_url, round_, as_json, quiet, world_size, max_restarts, master_port, stall_seconds,
            **options) -> None:
    """Build neighbourhoods/round-ROUND from features/round-(ROUND-1) and publish it.

    Idempotent: a round already published is reported, not recomputed. With --world-size W, W
    workers compute the tiles together and publish the same round one process would. Curriculum
    options that disagree with the curriculum the store records (its trainer's) are refused.
    """
    from .launch import launched_by_torchrun
    from .rebuild import check_agrees_with_curriculum, check_rebuild_arguments, rebuild as run_rebuild

    options = _rebuild_options(**options)
    store = Store.open(store_url)
    check_rebuild_arguments(store, round_, **options)  # a bad value is named first, by its own check
    check_agrees_with_curriculum(store, options)  # the round is for the store's trainer
    if launched_by_torchrun():  # an outer torchrun made this process one worker
        from .launch import leave_process_group
        from .shard import join_launcher_group, rebuild_as_worker

        shard, options["device"] = join_launcher_group(options["device"])
        try:
            result = rebuild_as_worker(store_url, round_, shard, stall_seconds=stall_seconds, quiet=quiet, **options)
        finally:
            leave_process_group()
        if not shard.is_main:
            return
    elif world_size == 1 and max_restarts == 0 and stall_seconds == 0:
        progress = None if quiet else StderrProgress(f"nbr-index rebuild round {round_}")
        result = run_rebuild(store, round_, progress=progress, **options)
    else:
        from .shard import rebuild_sharded

        _check_launch(world_size, max_restarts, master_port)
        result = rebuild_sharded(store_url, round_, world_size, max_restarts=max_restarts, master_port=master_port,
                                 stall_seconds=stall_seconds, quiet=quiet, **options)
    click.echo(json.dumps(result.to_json(), sort_keys=True) if as_json else result.summary())


@main.command()
@click.option("--store", "store_url", required=True, help="Store path or fsspec URL (may not exist yet).")
@click.option("--poll-seconds", type=float, default=5.0, show_default=True, help="How often to look for new features.")
@click.option("--once", is_flag=True, help="Rebuild what is ready now, then exit.")
@click.option("--wait-for-store/--no-wait-for-store", default=None,
              help="Wait for the trainer to create the store instead of failing [wait, unless --once].")
@click.option("--until-round", type=int, default=None, help="Exit once this round is published [R].")
@click.option("--progress-seconds", type=float, default=30.0, show_default=True, help="Seconds between progress lines.")
@click.option("--ready-file", default=None,
              help="Create this file once the store is open and watched; removed on exit (for healthchecks).")
@click.option("--stall-seconds", type=float, default=0.0, hidden=True,
              help="Test hook: sleep this long at the start of every rebuild.")
@_compute_options
@_launch_options
def serve(store_url, poll_seconds, once, wait_for_store, until_round, progress_seconds, ready_file, stall_seconds,
          world_size, max_restarts, master_port, **options) -> None:
    """Watch the store; rebuild round r as soon as features/round-(r-1) is complete.

    Never publishes a round twice or skips one, also across restarts. SIGTERM/SIGINT abandon the
    rebuild in progress (nothing half-published) and exit; exits by itself after the last round.
    With --world-size W each round is rebuilt by W workers (as rebuild --world-size W). Curriculum
    options that disagree with the curriculum the store records (its trainer's) are refused.
    """
    from .errors import InvalidParameterError
    from .serve import configure_logging, serve as run_serve

    if not (math.isfinite(poll_seconds) and poll_seconds > 0):   # nan polled at 100% CPU, inf raised in a wait
        raise InvalidParameterError(f"--poll-seconds must be a finite number of seconds above 0, got {poll_seconds}")
    if not (math.isfinite(progress_seconds) and progress_seconds > 0):
        raise InvalidParameterError(f"--progress-seconds must be a finite number of seconds above 0, got {progress_seconds}")
    _check_launch(world_size, max_restarts, master_port)
    configure_logging()
    run_serve(
        store_url, poll_seconds=poll_seconds, once=once, wait_for_store=wait_for_store, until_round=until_round,
        progress_seconds=progress_seconds, stall_seconds=stall_seconds, ready_file=ready_file, world_size=world_size,
        max_restarts=max_restarts, master_port=master_port, **_rebuild_options(**options),
    )


@main.command()
@click.option("--store", "store_url", required=True, help="Store path or fsspec URL.")
@click.option("--json", "as_json", is_flag=True, help="Print the description as JSON.")
@click.option("--verify", is_flag=True, help="Recompute every checksum and report corrupted chunks.")
def inspect(store_url, as_json, verify) -> None:
    """Describe what the store holds: feature snapshots, neighbourhood rounds, curriculum."""
    store = Store.open(store_url)
    description = store.describe()
    report = store.verify() if verify else None
    if as_json:
        if report is not None:
            description = {**description, "verify": report.to_dict()}
        click.echo(json.dumps(description, sort_keys=True))
    else:
        click.echo(format_description(description, report))
    if report is not None and not report.ok:
        sys.exit(1)


@main.command()
@click.option("--store", "store_url", required=True, help="Store path or fsspec URL.")
@click.option("--round", "round_", type=int, default=None, help="Feature snapshot to search [the latest complete one].")
@click.option("--index", "indices", type=int, multiple=True,
              help="A training sample to find the neighbours of (self excluded); repeat for several.")
@click.option("--vectors", "vectors_file", default=None,
              help="FILE.npy of query vectors, (m, d) or (d,) floats (e.g. from `trainer embed`).")
@click.option("--k", "k", type=int, default=10, show_default=True, help="Neighbours per query.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON line.")
def query(store_url, round_, indices, vectors_file, k, as_json) -> None:
    """The k nearest training samples of a sample (--index) or of new vectors (--vectors).

    Exact cosine similarities against every row of the snapshot (ties -> lower index), with the
    samples' labels where the store has them.
    """
    import numpy as np

    from .errors import InvalidFeaturesError
    from .query import check_npy_size, query_store

    store = Store.open(store_url)
    vectors = None
    if vectors_file is not None:
        try:
            check_npy_size(vectors_file)   # before np.load allocates what the header claims
            vectors = np.load(vectors_file, allow_pickle=False)
        except FileNotFoundError:
            raise InvalidFeaturesError(f"--vectors {vectors_file} does not exist") from None
        except (OSError, ValueError) as error:
            raise InvalidFeaturesError(f"--vectors {vectors_file} is not a .npy array file ({error})") from None
    result = query_store(store, indices=list(indices) if indices else None, vectors=vectors, k=k, round=round_)
    click.echo(json.dumps(result.to_json(), sort_keys=True) if as_json else result.format())


@main.command()
@click.option("--mode", type=click.Choice(["speed", "memory"]), default="speed", show_default=True,
              help="speed: FAISS vs unfused reference vs fused vs matmul; memory: peak RSS of a chunked rebuild from a store.")
@click.option("--n", "n", type=int, default=50_000, show_default=True, help="Rows (random unit vectors).")
@click.option("--dim", type=int, default=128, show_default=True)
@click.option("--k", "k", type=int, default=1, show_default=True)
@click.option("--tau", type=float, default=0.1, show_default=True)
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda.")
@click.option("--repeat", type=int, default=1, show_default=True, help="Runs of each stage; the minimum is reported.")
@click.option("--no-reference", is_flag=True, help="Skip the (slow) unfused reference.")
@click.option("--matmul-precision", type=click.Choice(MATMUL_PRECISIONS), default="fp32", show_default=True)
@click.option("--store-dir", default=None, help="memory mode: where to keep the generated store (reused).")
@click.option("--in-memory", is_flag=True, help="memory mode: load the snapshot whole instead of in chunks.")
@click.option("--max-seconds", type=float, default=None,
              help="memory mode: stop the pass after this long; report the peak so far and the projected time.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON line.")
def bench(mode, n, dim, k, tau, device, repeat, no_reference, matmul_precision, store_dir, in_memory, max_seconds,
          as_json) -> None:
    """Benchmark the rebuild compute on random unit vectors.

    \b
    --mode speed, on the same vectors in one run (compare the ratios):
      (a) FAISS IndexFlatIP k-NN alone (faiss-gpu on cuda when importable)
      (b) the unfused reference: block matmul, topk, logsumexp, sum p*z
      (c) the fused k-NN + entropy pass that rebuild runs
      (d) matmul only: the same tiles through a bare GEMM (the GPU target's baseline)
    with peak memory per stage and a check of (c) against (b).
    --mode memory: peak RSS of a chunked rebuild read from a real store.
    """
    from . import bench as benchmarks

    if n < 2 or dim < 1 or repeat < 1:
        raise click.BadParameter("need --n >= 2, --dim >= 1, --repeat >= 1")
    if mode == "speed":
        report = benchmarks.run_speed_bench(
            n, dim, k, tau, device, repeat, reference=not no_reference, matmul_precision=matmul_precision
        )
        text = benchmarks.format_speed_report(report)
    else:
        report = benchmarks.run_memory_bench(n, dim, k, tau, store_dir=store_dir, in_memory=in_memory,
                                             max_seconds=max_seconds)
        text = benchmarks.format_memory_report(report)
    click.echo(json.dumps(report, sort_keys=True) if as_json else text)


if __name__ == "__main__":
    main()
