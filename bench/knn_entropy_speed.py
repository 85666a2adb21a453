"""Speed of the fused k-NN + entropy pass against FAISS k-NN alone, an unfused reference and a
bare blocked GEMM, on the same random unit vectors (one run; compare the ratios).

    python bench/knn_entropy_speed.py --n 50000            # the CPU target: fused <= 1.5x FAISS
    python bench/knn_entropy_speed.py --n 1281167 --device cuda --no-reference   # the GPU target

Same as ``nbr-index bench``.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nbr_index.bench import format_speed_report, run_speed_bench  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=50_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--k", type=int, default=1)
    parser.add_argument("--tau", type=float, default=0.1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--no-reference", action="store_true", help="skip the slow unfused reference")
    parser.add_argument("--matmul-precision", default="fp32", choices=["fp32", "tf32", "bf16"])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    report = run_speed_bench(args.n, args.dim, args.k, args.tau, args.device, args.repeat,
                             reference=not args.no_reference, matmul_precision=args.matmul_precision)
    print(json.dumps(report, sort_keys=True) if args.json else format_speed_report(report))


if __name__ == "__main__":
    main()
