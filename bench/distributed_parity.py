"""Same result at W ranks: kNN top-1 of `trainer run` at W = 1 and W = 2 (gloo on CPU), with the
same global batch, epochs and seed, on digits by default.

    .venv/bin/python bench/distributed_parity.py --seeds 0,1
    .venv/bin/python bench/distributed_parity.py --seeds 0 -- --dataset imagefolder --data-root /tmp/cifar10

Arguments after ``--`` go to every `trainer run`. Prints each run's final kNN, per seed the
difference W2 - W1, and the mean absolute difference. Target: within 1 point. (On CPU each rank
normalises batch norm over its own B/W images, since torch has no CPU SyncBatchNorm, so the runs
are close, not bit-identical; on CUDA batch norm is synchronised.)
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile

import click

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def final_knn(world_size: int, seed: int, extra: tuple[str, ...], out_dir: str) -> float:
    run_dir = os.path.join(out_dir, f"w{world_size}-seed{seed}")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    subprocess.run([sys.executable, "-m", "trainer.cli", "run", "--world-size", str(world_size),
                    "--seed", str(seed), "--run-dir", run_dir, *extra],
                   env=env, check=True, stdout=subprocess.DEVNULL)
    with open(os.path.join(run_dir, "summary.json")) as fh:
        return float(json.load(fh)["final_knn_top1"])


@click.command(context_settings={"ignore_unknown_options": True})
@click.option("--seeds", default="0,1", show_default=True, help="comma-separated seeds")
@click.option("--out-dir", default=None, help="where the runs go (default: a temporary folder)")
@click.argument("extra", nargs=-1, type=click.UNPROCESSED)
def main(seeds, out_dir, extra):
    out_dir = out_dir or tempfile.mkdtemp(prefix="and-parity-")
    diffs = []
    for seed in (int(s) for s in seeds.split(",")):
        one, two = final_knn(1, seed, extra, out_dir), final_knn(2, seed, extra, out_dir)
        diffs.append(two - one)
        print(f"seed {seed}: W=1 {one:.2f}%  W=2 {two:.2f}%  difference {two - one:+.2f}", flush=True)
    print(f"mean |W2 - W1| = {statistics.mean(abs(d) for d in diffs):.2f} points over {len(diffs)} seed(s) "
          f"(target <= 1); runs in {out_dir}")


if __name__ == "__main__":
    main()
