"""Accuracy benchmark: AND, Instance and one-off AND at identical data, budget and seeds, the
project's trainer next to the minimal reference (bench/reference_and.py).

    .venv/bin/python bench/accuracy.py --protocol digits --seeds 0,1,2
    .venv/bin/python bench/accuracy.py --protocol cifar10-10k --seeds 0,1,2 --jobs 2
    .venv/bin/python bench/accuracy.py --protocol cifar10-gpu --methods and --seeds 0 --time-budget 540
    bash bench/gpu_accuracy.sh      # cifar10-gpu-short, AND and Instance, in one 9-minute device command

Every (implementation, method, seed) is one run in its own directory under --out-dir, run as a
subprocess with --threads torch threads (CPU). A finished run is never run again and an
interrupted project run resumes from its checkpoint, so the same command continues where the last
one stopped: --time-budget S stops the runs in flight after S seconds (their state kept) and exits,
which is how the GPU protocol is cut into pieces that fit the device's 10-minute commands.
--import-json docs/accuracy/<protocol>.json counts the runs of a published table as finished
(where --out-dir has none of its own), so that a table grows by new runs without the old ones.

Printed and written to <out-dir>/accuracy.md (with accuracy.json and accuracy.png): per
(implementation, method), mean +- sample std over seeds of kNN top-1 per round, the final kNN (last
epoch), the best-epoch kNN (labelled: what the authors' code keeps during training), the final
kNN against train features recomputed without augmentation instead of the memory bank (how the
released code evaluates a trained model: lemniscate's cifar.py after training, AND's --test-only),
a linear probe on the final backbone (project runs), anchors and anchor-neighbourhood consistency per round, wall time and
training images/s.

Protocols (see bench/README.md):
- digits: scikit-learn digits (1,500 / 297), smallcnn at 8 px, 5 rounds x 30 epochs (the default job);
- cifar10-10k: the first 1,000 training images of each CIFAR-10 class (sorted file names) from
  ../shared/data/cifar10-jpg.tar.gz, the full test set, smallcnn, 5 rounds x 10 epochs;
- cifar10-gpu: full CIFAR-10, ResNet18 (CIFAR stem), 5 rounds x 50 epochs (the paper's Nep=50),
  batch 256, bf16, channels-last, on CUDA: for a GPU of one's own (about 12.5M images a run);
- cifar10-gpu-short: the same at 5 rounds x 10 epochs (2.5M images a run), so that AND and Instance
  both fit one 9-minute device command (bench/gpu_accuracy.sh).
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field

import click

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The CIFAR-10 JPEGs: ../shared/data beside the checkout, or a copy in .data/ (how a device run
# gets them: carried, since ../shared does not travel).
TARBALLS = (os.path.join(os.path.dirname(ROOT), "shared", "data", "cifar10-jpg.tar.gz"),
            os.path.join(ROOT, ".data", "cifar10-jpg.tar.gz"))
IMPLEMENTATIONS = ("project", "reference")
# The trainer flags of each method. and-mutual and and-stable are AND with another anchor selection
# (nbr_index.selection), and-cap75 AND with at most 75% anchors in any round (the last round's
# count is round 3's), and-backbone AND with neighbourhoods found in the backbone's features of the
# un-augmented images (--neighbour-features): rules beyond the paper the minimal reference lacks.
# and-oracle is no rule: the entropy anchors with their own class's nearest rows as neighbours
# (labels), the kNN that right neighbourhoods would give at the budget, the ceiling of every rule;
# and-oneoff-oracle gives every row such a neighbourhood from round 1 on (the one-off curriculum):
# the most right pairs any selection could reach.
METHOD_FLAGS = {"and": ["--method", "and"], "instance": ["--method", "instance"],
                "and-oneoff": ["--method", "and-oneoff"], "and-mutual": ["--method", "and", "--selection", "mutual"],
                "and-stable": ["--method", "and", "--selection", "stable"],
                "and-cap75": ["--method", "and", "--max-anchor-fraction", "0.75"],
                "and-backbone": ["--method", "and", "--neighbour-features", "backbone"],
                "and-oracle": ["--method", "and", "--selection", "oracle"],
                "and-oneoff-oracle": ["--method", "and-oneoff", "--selection", "oracle"]}
METHODS = tuple(METHOD_FLAGS)
REFERENCE_METHODS = ("and", "instance", "and-oneoff")


@dataclass(frozen=True)
class Protocol:
    """One benchmark setting: the data, the backbone and the budget every run of it shares."""
    name: str
    data: str                    # "digits", or the name of a folder built by ensure_data
    arch: str = "smallcnn"
    rounds: int = 4              # curriculum rounds R (R + 1 training rounds)
    epochs: int = 30             # per training round
    batch_size: int = 128
    device: str = "cpu"
    extra_flags: tuple[str, ...] = ()   # further `trainer run` flags
    reference: bool = True       # does the minimal reference run this protocol (CPU only)


PROTOCOLS = {
    "digits": Protocol("digits", "digits", epochs=30),
    "cifar10-10k": Protocol("cifar10-10k", "cifar10-10k", epochs=10),
    "cifar10-gpu": Protocol("cifar10-gpu", "cifar10", arch="resnet18", epochs=50, batch_size=256, device="cuda",
                            extra_flags=("--precision", "bf16"), reference=False),
    "cifar10-gpu-short": Protocol("cifar10-gpu-short", "cifar10", arch="resnet18", epochs=10, batch_size=256,
                                  device="cuda", extra_flags=("--precision", "bf16"), reference=False),
}


# ----------------------------------------------------------------------------- data


def ensure_data(protocol: Protocol, data_dir: str, log) -> str | None:
    """The data argument of the protocol's runs: None for digits (built in), else an image folder
    with train/ and test/, unpacked from the shared CIFAR-10 JPEG tarball once into ``data_dir``."""
    if protocol.data == "digits":
        return None
    data_dir = os.path.abspath(data_dir)  # the subset's symlinks must resolve from any working directory
    full = os.path.join(data_dir, "cifar10")
    if not os.path.isdir(os.path.join(full, "test")):
        tarball = next((t for t in TARBALLS if os.path.isfile(t)), None)
        if tarball is None:
            raise click.ClickException(f"{protocol.name} needs the CIFAR-10 JPEGs: {' or '.join(TARBALLS)}, "
                                       f"or --data-dir holding cifar10/train and cifar10/test")
        log(f"unpacking {tarball} into {full} ...")
        partial = f"{full}.partial-{os.getpid()}"
        with tarfile.open(tarball) as tar:
            tar.extractall(partial, filter="data")
        _move_into_place(partial, full)
    if protocol.data == "cifar10":
        return full
    subset = os.path.join(data_dir, "cifar10-10k")
    if not os.path.isdir(os.path.join(subset, "test")):
        # The first 1,000 training images of each class by sorted file name; the whole test set.
        partial = f"{subset}.partial-{os.getpid()}"
        for name in sorted(os.listdir(os.path.join(full, "train"))):
            os.makedirs(os.path.join(partial, "train", name), exist_ok=True)
            for file in sorted(os.listdir(os.path.join(full, "train", name)))[:1000]:
                os.symlink(os.path.join(full, "train", name, file), os.path.join(partial, "train", name, file))
        os.symlink(os.path.join(full, "test"), os.path.join(partial, "test"))
        _move_into_place(partial, subset)
    return subset


def _move_into_place(partial: str, final: str) -> None:
    """Rename a finished folder into place; if another benchmark process got there first, keep theirs."""
    try:
        os.rename(partial, final)
    except OSError:
        if not os.path.isdir(final):
            raise
        shutil.rmtree(partial)


# ----------------------------------------------------------------------------- runs


@dataclass
class Run:
    """One (implementation, method, seed) of a protocol, in its own directory."""
    implementation: str
    method: str
    seed: int
    run_dir: str
    result: dict | None = None
    process: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def label(self) -> str:
        return f"{self.implementation} {self.method} seed {self.seed}"

    @property
    def result_path(self) -> str:
        return os.path.join(self.run_dir, "result.json")


def run_dir_name(implementation: str, method: str, seed: int) -> str:
    return f"{implementation}-{method}-seed{seed}"


def write_result(path: str, result: dict) -> None:
    """Write a run's result.json whole or not at all: a finished run is one whose file exists."""
    with open(path + ".partial", "w") as fh:
        json.dump(result, fh, indent=1)
    os.replace(path + ".partial", path)


def import_published(path: str, protocol: Protocol, out_dir: str, log) -> int:
    """Write each run recorded in a published accuracy.json into ``out_dir`` as a finished run
    (its result.json) where ``out_dir`` has none, so that a table can grow by new runs on another
    machine without rerunning the old ones. Returns how many were written."""
    try:
        with open(path) as fh:
            published = json.load(fh)
        recorded, groups = published["protocol"], published["groups"]
        name, rounds, epochs = recorded["name"], recorded["rounds"], recorded["epochs"]
    except (ValueError, KeyError, TypeError):
        raise click.ClickException(f"{path} is not an accuracy.json of bench/accuracy.py "
                                   f"(JSON with 'protocol' and 'groups')") from None
    if (name, rounds, epochs) != (protocol.name, protocol.rounds, protocol.epochs):
        raise click.ClickException(f"{path} holds {name} ({rounds} + 1 rounds x {epochs} epochs), "
                                   f"not this --protocol/--epochs")
    found = []   # (run directory, result), every group checked before anything is written
    for group_name, group in groups.items():
        seeds = group.get("seed_list")
        if seeds is None:   # tables written before seed_list: the values follow the seeds, when all ran
            if len(group["values"]) != len(published["seeds"]):
                raise click.ClickException(f"{path}: {group_name} has {len(group['values'])} runs for seeds "
                                           f"{published['seeds']} and no seed_list, so their seeds are unknown")
            seeds = published["seeds"]
        implementation, method = group_name.split("/")
        found += [(os.path.join(out_dir, run_dir_name(implementation, method, seed)), result)
                  for seed, result in zip(seeds, group["values"])]
    written = 0
    for run_dir, result in found:
        target = os.path.join(run_dir, "result.json")
        if os.path.exists(target):
            continue
        os.makedirs(run_dir, exist_ok=True)
        write_result(target, result)
        written += 1
    log(f"imported {written} finished run(s) from {path}")
    return written


def commands(run: Run, protocol: Protocol, data: str | None) -> list[list[str]]:
    """The subprocess command lines of one run, in order."""
    python = sys.executable
    if run.implementation == "reference":
        return [[python, os.path.join(ROOT, "bench", "reference_and.py"), "--data", data or "digits",
                 "--method", run.method, "--seed", str(run.seed), "--rounds", str(protocol.rounds + 1),
                 "--epochs", str(protocol.epochs), "--arch", protocol.arch, "--threads", "0",
                 "--out", os.path.join(run.run_dir, "reference.json")]]
    train = [python, "-m", "trainer.cli", "run", "--run-dir", run.run_dir, *METHOD_FLAGS[run.method],
             "--seed", str(run.seed), "--rounds", str(protocol.rounds), "--epochs-per-round", str(protocol.epochs),
             "--arch", protocol.arch, "--batch-size", str(protocol.batch_size), "--device", protocol.device,
             *protocol.extra_flags]
    train += ["--dataset", "digits"] if data is None else ["--dataset", "imagefolder", "--data-root", data]
    if os.path.exists(os.path.join(run.run_dir, "checkpoint.pt")):
        train.append("--resume")
    probe = [python, "-m", "trainer.cli", "linear-probe", "--run-dir", run.run_dir]
    finished = os.path.exists(os.path.join(run.run_dir, "summary.json"))
    return [probe] if finished else [train, probe]


def collect(run: Run) -> dict:
    """The run's outputs in one shape: rounds, final and best-epoch kNN, probe, seconds, images/s."""
    if run.implementation == "reference":
        with open(os.path.join(run.run_dir, "reference.json")) as fh:
            out = json.load(fh)
        return {"rounds": out["rounds"], "final_knn_top1": out["final_knn_top1"],
                "best_epoch_knn_top1": out["best_epoch"]["knn_top1"],
                "recomputed_knn_top1": out.get("final_knn_top1_recomputed"), "linear_probe_top1": None,
                "seconds": out["seconds"], "images_per_s": out["mean_images_per_s"]}
    with open(os.path.join(run.run_dir, "summary.json")) as fh:
        summary = json.load(fh)
    with open(os.path.join(run.run_dir, "linear_probe.json")) as fh:
        probe = json.load(fh)
    return {"rounds": [{k: r[k] for k in ("round", "knn_top1", "anchors", "consistency")} for r in summary["rounds"]],
            "final_knn_top1": summary["final_knn_top1"], "best_epoch_knn_top1": summary["best_epoch"]["knn_top1"],
            "recomputed_knn_top1": probe["knn_top1_recomputed"], "linear_probe_top1": probe["test_top1"],
            "seconds": round(sum(e["seconds"] for e in summary["epochs"]), 1),
            "images_per_s": summary["mean_images_per_s"]}


def run_all(runs: list[Run], protocol: Protocol, data: str | None, jobs: int, threads: int,
            deadline: float, log) -> bool:
    """Run every unfinished run, ``jobs`` at a time; True when all finished before ``deadline``."""
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    pending = [r for r in runs if r.result is None]
    active: list[tuple[Run, list[list[str]], float]] = []
    while pending or active:
        while pending and len(active) < jobs:
            run = pending.pop(0)
            os.makedirs(run.run_dir, exist_ok=True)
            steps = commands(run, protocol, data)
            active.append((run, steps, time.monotonic()))
            log(f"start {run.label}")
            _start_next(run, steps, env)
        time.sleep(1.0)
        if time.monotonic() > deadline:
            for run, _, _ in active:
                run.process.send_signal(signal.SIGTERM)
            for run, _, _ in active:
                run.process.wait()
            log(f"time budget reached: {len(active) + len(pending)} run(s) unfinished; rerun the same command to resume")
            return False
        for item in list(active):
            run, steps, started = item
            code = run.process.poll()
            if code is None:
                continue
            if code != 0:
                raise click.ClickException(f"{run.label} failed (exit {code}); see {run.run_dir}/bench.log")
            if steps:
                _start_next(run, steps, env)
                continue
            active.remove(item)
            run.result = collect(run)
            write_result(run.result_path, run.result)
            log(f"done  {run.label}: final kNN {run.result['final_knn_top1']:.2f}%  "
                f"({time.monotonic() - started:.0f}s)")
    return True


def _start_next(run: Run, steps: list[list[str]], env: dict) -> None:
    command = steps.pop(0)
    log_file = open(os.path.join(run.run_dir, "bench.log"), "a")
    log_file.write("$ " + " ".join(command) + "\n")
    log_file.flush()
    run.process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT)


# ----------------------------------------------------------------------------- report


def mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None]
    if not values:
        return float("nan"), float("nan")
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def fmt(values: list, digits: int = 2) -> str:
    """'mean ± std' over seeds; one seed has no spread, so only its value (and '-' for none).
    Where only some runs have the value (runs made before it was recorded), '(k of n)' says so."""
    m, s = mean_std(values)
    if m != m:
        return "-"
    have = sum(v is not None for v in values)
    text = f"{m:.{digits}f}" if have == 1 else f"{m:.{digits}f} ± {s:.{digits}f}"
    return text if have == len(values) else f"{text} ({have} of {len(values)})"


def summarise(runs: list[Run], protocol: Protocol, seeds: list[int]) -> tuple[str, dict]:
    """The Markdown tables and the JSON of every group (implementation, method) over seeds."""
    finished: dict[tuple[str, str], list[Run]] = {}
    for run in runs:
        if run.result is not None:
            finished.setdefault((run.implementation, run.method), []).append(run)
    groups = {key: [run.result for run in group] for key, group in finished.items()}
    rounds = protocol.rounds + 1
    lines = [f"### {protocol.name}: {protocol.arch}, {rounds} rounds x {protocol.epochs} epochs, batch "
             f"{protocol.batch_size}, seeds {','.join(map(str, seeds))} (mean ± std over seeds)", "",
             "| implementation | method | seeds | final kNN | best-epoch kNN | final kNN, recomputed train features "
             "| linear probe | wall s | images/s |",
             "|---|---|---|---|---|---|---|---|---|"]
    table = {}
    for (impl, method), results in groups.items():
        lines.append(f"| {impl} | {method} | {len(results)} | {fmt([r['final_knn_top1'] for r in results])} | "
                     f"{fmt([r['best_epoch_knn_top1'] for r in results])} | "
                     f"{fmt([r.get('recomputed_knn_top1') for r in results])} | "
                     f"{fmt([r['linear_probe_top1'] for r in results])} | "
                     f"{fmt([r['seconds'] for r in results], 0)} | {fmt([r['images_per_s'] for r in results], 0)} |")
        table[f"{impl}/{method}"] = {
            "seeds": len(results),
            "seed_list": [run.seed for run in finished[(impl, method)]],   # the seed of each entry of "values"
            "final_knn_top1": mean_std([r["final_knn_top1"] for r in results]),
            "best_epoch_knn_top1": mean_std([r["best_epoch_knn_top1"] for r in results]),
            "recomputed_knn_top1": mean_std([r.get("recomputed_knn_top1") for r in results]),
            "linear_probe_top1": mean_std([r["linear_probe_top1"] for r in results]),
            "knn_per_round": [mean_std([r["rounds"][i]["knn_top1"] for r in results]) for i in range(rounds)],
            "consistency_per_round": [mean_std([r["rounds"][i]["consistency"] for r in results]) for i in range(rounds)],
            "anchors_per_round": [r_["anchors"] for r_ in results[0]["rounds"]],
            "values": results,
        }
    header = " | ".join(f"round {i}" for i in range(rounds))
    lines += ["", "kNN top-1 per round (%):", "", f"| implementation | method | {header} |",
              "|---|---|" + "---|" * rounds]
    for (impl, method), results in groups.items():
        cells = " | ".join(fmt([r["rounds"][i]["knn_top1"] for r in results]) for i in range(rounds))
        lines.append(f"| {impl} | {method} | {cells} |")
    lines += ["", "Anchors and anchor-neighbourhood class consistency per round (%; labels used for this report only):",
              "", f"| implementation | method | {header} |", "|---|---|" + "---|" * rounds]
    for (impl, method), results in groups.items():
        if method == "instance":
            continue
        cells = " | ".join(f"{results[0]['rounds'][i]['anchors']}: {fmt([r['rounds'][i]['consistency'] for r in results], 1)}"
                           if results[0]["rounds"][i]["anchors"] else "0" for i in range(rounds))
        lines.append(f"| {impl} | {method} | {cells} |")
    return "\n".join(lines) + "\n", table


def plot(table: dict, protocol: Protocol, path: str) -> None:
    """kNN top-1 and anchor consistency per round, mean with the std over seeds as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    colours = {method: f"C{i}" for i, method in enumerate(sorted({name.split("/")[1] for name in table}))}
    for name, row in sorted(table.items()):
        implementation, method = name.split("/")
        rounds = list(range(len(row["knn_per_round"])))
        style = dict(color=colours[method], linestyle="-" if implementation == "project" else "--",
                     marker="o" if implementation == "project" else "s", capsize=3)
        means, stds = zip(*row["knn_per_round"])
        left.errorbar(rounds, means, yerr=stds, label=f"{name} ({row['seeds']} seeds)", **style)
        cons = [(i, m, s) for i, (m, s) in enumerate(row["consistency_per_round"]) if m == m]
        if cons:
            right.errorbar([c[0] for c in cons], [c[1] for c in cons], yerr=[c[2] for c in cons], label=name, **style)
        left.set_xticks(rounds)
        right.set_xticks(rounds)
    left.set(xlabel="training round", ylabel="kNN top-1 (%)", title=f"{protocol.name}: kNN after each round")
    right.set(xlabel="training round", ylabel="anchors' neighbours of the same class (%)",
              title="anchor neighbourhood consistency")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--protocol", "protocol_name", type=click.Choice(sorted(PROTOCOLS)), default="digits", show_default=True)
@click.option("--methods", default="and,instance,and-oneoff", show_default=True)
@click.option("--implementations", default="project,reference", show_default=True)
@click.option("--seeds", default="0,1,2", show_default=True)
@click.option("--epochs", type=int, default=None, help="epochs per round (default: the protocol's)")
@click.option("--jobs", type=int, default=1, show_default=True, help="runs at once (CPU: 2 on 2 cores, 1 thread each)")
@click.option("--threads", type=int, default=1, show_default=True, help="torch threads per run (0: torch's default)")
@click.option("--time-budget", type=float, default=None, help="stop after this many seconds; rerun to resume")
@click.option("--out-dir", default=None, help="default runs/accuracy/<protocol>")
@click.option("--data-dir", default=os.path.join(ROOT, ".data"), show_default=True,
              help="where the CIFAR-10 folders are unpacked")
@click.option("--table-only", is_flag=True, help="start no run: the table, JSON and plot of the finished runs")
@click.option("--import-json", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="a published accuracy.json (docs/accuracy/): its runs count as finished where --out-dir lacks them")
def main(protocol_name, methods, implementations, seeds, epochs, jobs, threads, time_budget, out_dir, data_dir,
         table_only, import_json):
    """Train AND, Instance and one-off AND (project and minimal reference) at one budget; print the table."""
    protocol = PROTOCOLS[protocol_name]
    if epochs:
        protocol = dataclasses.replace(protocol, epochs=epochs)
    method_list = [m for m in methods.split(",") if m]
    impl_list = [i for i in implementations.split(",") if i]
    bad = sorted(set(method_list) - set(METHODS)) + sorted(set(impl_list) - set(IMPLEMENTATIONS))
    if bad:
        raise click.ClickException(f"unknown method or implementation {bad[0]!r}: methods {', '.join(METHODS)}, "
                                   f"implementations {', '.join(IMPLEMENTATIONS)}")
    if not protocol.reference:
        impl_list = [i for i in impl_list if i != "reference"]
    seed_list = [int(s) for s in seeds.split(",") if s]
    out_dir = out_dir or os.path.join("runs", "accuracy", protocol.name + (f"-e{epochs}" if epochs else ""))
    for path in import_json:
        import_published(path, protocol, out_dir, click.echo)
    data = None if table_only else ensure_data(protocol, data_dir, click.echo)
    runs = []
    for seed in seed_list:
        for method in method_list:
            for impl in impl_list:
                if impl == "reference" and method not in REFERENCE_METHODS:
                    continue
                run = Run(impl, method, seed, os.path.abspath(os.path.join(out_dir, run_dir_name(impl, method, seed))))
                if os.path.exists(run.result_path):
                    with open(run.result_path) as fh:
                        run.result = json.load(fh)
                runs.append(run)
    deadline = time.monotonic() + time_budget if time_budget else float("inf")
    if table_only:
        finished = all(run.result is not None for run in runs)
    else:
        finished = run_all(runs, protocol, data, jobs, threads, deadline, click.echo)
    text, table = summarise(runs, protocol, seed_list)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "accuracy.md"), "w") as fh:
        fh.write(text)
    with open(os.path.join(out_dir, "accuracy.json"), "w") as fh:
        json.dump({"protocol": dataclasses.asdict(protocol), "seeds": seed_list, "groups": table}, fh, indent=1)
    if table:
        plot(table, protocol, os.path.join(out_dir, "accuracy.png"))
    click.echo("\n" + text)
    click.echo(f"written: {out_dir}/accuracy.md, accuracy.json, accuracy.png" + ("" if finished else " (partial)"))


if __name__ == "__main__":
    main()
