"""Peak memory of a chunked k-NN + entropy rebuild read from a real store.

Writes N random unit vectors (d = 128) to a store (once; reused from --store-dir), then runs
``knn_entropy`` on the store's FeatureReader in row chunks in a fresh process and reports its peak
RSS above its RSS before the pass. Target: <= feature bytes + 1 GiB at N = 1,000,000.

    python bench/knn_entropy_memory.py --n 200000 --store-dir /tmp/nbr-membench
    python bench/knn_entropy_memory.py --n 1000000 --store-dir /tmp/nbr-membench   # ~1 h on 2 free cores
    python bench/knn_entropy_memory.py --n 1000000 --store-dir /tmp/nbr-membench --max-seconds 300

Same as ``nbr-index bench --mode memory``.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nbr_index.bench import format_memory_report, run_memory_bench  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--k", type=int, default=1)
    parser.add_argument("--store-dir", default=None, help="keep (and reuse) the generated store here")
    parser.add_argument("--chunk-read-rows", type=int, default=65536, help="rows per read (query / database block)")
    parser.add_argument("--in-memory", action="store_true", help="load the snapshot whole instead, for comparison")
    parser.add_argument("--max-seconds", type=float, default=None,
                        help="stop the pass after this long; report the peak so far and the projected full time")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    report = run_memory_bench(args.n, args.dim, args.k, store_dir=args.store_dir,
                              chunk_read_rows=args.chunk_read_rows, in_memory=args.in_memory,
                              max_seconds=args.max_seconds)
    print(json.dumps(report, sort_keys=True) if args.json else format_memory_report(report))


if __name__ == "__main__":
    main()
