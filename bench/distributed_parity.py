"""Same result at W ranks: kNN top-1 of `trainer run` at W = 1 and W = 2 (gloo on CPU), with the
same global batch, epochs and seed, on digits by default, next to the float-rounding noise floor.

    .venv/bin/python bench/distributed_parity.py --seeds 0,1,2,3
    .venv/bin/python bench/distributed_parity.py --seeds 0 -- --dataset imagefolder --data-root /tmp/cifar10

Arguments after ``--`` go to every `trainer run`. Per seed, three runs:

- W = 1 with one thread;
- W = 2 with one thread per rank: the same computation (the same global batches, the same
  augmentation of every image, batch norm over the global batch, averaged gradients; see
  tests/test_trainer_distributed.py), summed in a different order;
- W = 1 with two threads: the same computation again, with only the float summation order of
  some kernels changed. How far this run lands from the first is the noise floor: training
  amplifies rounding differences, and no W = 2 run can be expected closer to W = 1 than W = 1
  is to itself.

Prints each run's final kNN, |W2 - W1| and |W1 (2 threads) - W1| per seed; their means over the
seeds, for the final kNN and for the kNN after every round (more pairs, a steadier estimate); and
the mean final kNN of each setting. Target: within 1 point.
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


def round_knn(name: str, world_size: int, threads: int, seed: int, extra: tuple[str, ...], out_dir: str) -> list[float]:
    """kNN top-1 after every training round of one `trainer run` (the last is the final result)."""
    run_dir = os.path.join(out_dir, f"{name}-seed{seed}")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": ROOT}
    subprocess.run([sys.executable, "-m", "trainer.cli", "run", "--world-size", str(world_size),
                    "--seed", str(seed), "--run-dir", run_dir, *extra],
                   env=env, check=True, stdout=subprocess.DEVNULL)
    with open(os.path.join(run_dir, "summary.json")) as fh:
        return [float(row["knn_top1"]) for row in json.load(fh)["rounds"]]


@click.command(context_settings={"ignore_unknown_options": True})
@click.option("--seeds", default="0,1", show_default=True, help="comma-separated seeds")
@click.option("--out-dir", default=None, help="where the runs go (default: a temporary folder)")
@click.option("--noise-floor/--no-noise-floor", default=True, show_default=True,
              help="also run W = 1 with two threads (the float-rounding noise floor)")
@click.argument("extra", nargs=-1, type=click.UNPROCESSED)
def main(seeds, out_dir, noise_floor, extra):
    out_dir = out_dir or tempfile.mkdtemp(prefix="and-parity-")
    runs = {"w1": [], "w2": [], "w1-2threads": []}        # per seed: kNN after each round
    for seed in (int(s) for s in seeds.split(",")):
        runs["w1"].append(round_knn("w1", 1, 1, seed, extra, out_dir))
        runs["w2"].append(round_knn("w2", 2, 1, seed, extra, out_dir))
        one, two = runs["w1"][-1][-1], runs["w2"][-1][-1]
        line = f"seed {seed}: W=1 {one:.2f}%  W=2 {two:.2f}%  |W2 - W1| {abs(two - one):.2f}"
        if noise_floor:
            runs["w1-2threads"].append(round_knn("w1-2threads", 1, 2, seed, extra, out_dir))
            again = runs["w1-2threads"][-1][-1]
            line += f"  W=1 2 threads {again:.2f}%  |W1' - W1| {abs(again - one):.2f}"
        print(line, flush=True)

    def mean_gap(name: str, last_round_only: bool) -> float:
        pairs = [(a, b) for other, base in zip(runs[name], runs["w1"], strict=True)
                 for a, b in zip(other[-1:] if last_round_only else other, base[-1:] if last_round_only else base,
                                 strict=True)]
        return statistics.mean(abs(a - b) for a, b in pairs)

    print(f"mean |W2 - W1| of the final kNN = {mean_gap('w2', True):.2f} points over {len(runs['w1'])} seed(s) "
          f"(target <= 1); over every round's kNN {mean_gap('w2', False):.2f}")
    if noise_floor:
        print(f"noise floor, mean |W1 (2 threads) - W1|: final {mean_gap('w1-2threads', True):.2f}, "
              f"every round {mean_gap('w1-2threads', False):.2f}")
    means = "  ".join(f"{name} {statistics.mean(r[-1] for r in v):.2f}%" for name, v in runs.items() if v)
    print(f"mean final kNN over the seeds: {means}; runs in {out_dir}")


if __name__ == "__main__":
    main()
