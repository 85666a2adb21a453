"""AND vs the Instance baseline at the same data, budget and seeds.

    .venv/bin/python bench/compare_methods.py --seeds 0,1,2
    .venv/bin/python bench/compare_methods.py --dataset imagefolder --data-root /tmp/cifar10 \\
        --set epochs_per_round=12 --set arch=resnet18 --set device=cuda --seeds 0

Every method runs the same rounds, epochs per round, lr restarts, data order and augmentation
seeds (``instance`` never selects anchors); the script prints each run's final kNN top-1 and, per
method, the mean and sample standard deviation over seeds, and writes compare.json.
On digits the spread between seeds is about a point: digits shows the pipeline works, not which
method wins.
"""
from __future__ import annotations

import dataclasses
import json
import os
import statistics
import sys
import time

import click

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from storage.errors import UserError  # noqa: E402
from trainer.config import config_from_dict, resolve  # noqa: E402


def compare(base: dict, methods: list[str], seeds: list[int], out_dir: str, log=print) -> dict:
    """Run every (method, seed); returns {"runs": [...], "methods": {method: {mean, std, values}}}."""
    import torch

    from trainer.loop import train
    from trainer.world import World

    runs = []
    for seed in seeds:
        for method in methods:
            run_dir = os.path.join(out_dir, f"{method}-seed{seed}")
            cfg = config_from_dict({**base, "method": method, "seed": seed, "run_dir": run_dir, "store": None})
            cfg = resolve(cfg)   # train checks it (trainer.preflight) before anything is written
            start = time.perf_counter()
            summary = train(cfg, World.single(cfg.device), log=lambda _: None)
            runs.append({"method": method, "seed": seed, "final_knn_top1": summary["final_knn_top1"],
                         "rounds": [r["knn_top1"] for r in summary["rounds"]],
                         "seconds": round(time.perf_counter() - start, 1)})
            log(f"{method:>10} seed {seed}: kNN top-1 {summary['final_knn_top1']:.2f}%  "
                f"(rounds {', '.join(f'{v:.1f}' for v in runs[-1]['rounds'])}; {runs[-1]['seconds']:.0f}s)")
    stats = {}
    for method in methods:
        values = [r["final_knn_top1"] for r in runs if r["method"] == method]
        stats[method] = {"mean": round(statistics.mean(values), 2),
                         "std": round(statistics.stdev(values), 2) if len(values) > 1 else 0.0,
                         "values": values}
    config = dataclasses.asdict(resolve(config_from_dict({**base, "run_dir": out_dir})))
    return {"config": {k: v for k, v in config.items() if k not in ("method", "seed", "run_dir", "store")},
            "seeds": seeds, "runs": runs, "methods": stats, "torch_threads": torch.get_num_threads()}


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--dataset", default="digits", show_default=True)
@click.option("--data-root", default=None)
@click.option("--seeds", default="0,1,2", show_default=True, help="comma-separated seeds")
@click.option("--methods", default="and,instance", show_default=True)
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="any trainer config key (repeatable)")
@click.option("--out-dir", default="runs/compare", show_default=True)
@click.option("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
def main(dataset, data_root, seeds, methods, overrides, out_dir, threads):
    """Run AND and Instance at the same budget and seeds; print kNN mean and spread."""
    if threads:
        import torch

        torch.set_num_threads(threads)
    try:
        base = {"dataset": dataset, "data_root": data_root}
        for item in overrides:
            key, sep, value = item.partition("=")
            if not sep:
                raise UserError(f"--set needs KEY=VALUE, got {item!r}")
            base[key.strip().replace("-", "_")] = value
        seed_list = [int(s) for s in seeds.split(",") if s]
        result = compare(base, [m for m in methods.split(",") if m], seed_list, out_dir)
    except UserError as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(2)
    click.echo("")
    click.echo(f"{'method':>10}  {'kNN top-1 mean':>14}  {'std':>5}  seeds")
    for method, s in result["methods"].items():
        click.echo(f"{method:>10}  {s['mean']:>13.2f}%  {s['std']:>5.2f}  {', '.join(f'{v:.2f}' for v in s['values'])}")
    methods_run = list(result["methods"])
    if len(methods_run) == 2:
        a, b = methods_run
        diffs = [x - y for x, y in zip(result["methods"][a]["values"], result["methods"][b]["values"])]
        click.echo(f"{a} - {b}: {statistics.mean(diffs):+.2f} points (per-seed: {', '.join(f'{d:+.2f}' for d in diffs)})")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "compare.json")
    with open(path, "w") as fh:
        json.dump(result, fh, indent=2)
    click.echo(f"written: {path}")


if __name__ == "__main__":
    main()
