"""``trainer``: train AND (or the Instance baseline) and evaluate the result.

    trainer run                      # AND on digits with smallcnn, 5 training rounds, a few minutes on CPU
    trainer run --dataset imagefolder --data-root /data/cifar10 --arch resnet18 --device cuda
    trainer run --config run.yaml --rounds 2          # flags override the file
    trainer run --run-dir runs/x --resume             # continue a killed run
    trainer linear-probe --run-dir runs/x
    trainer export --run-dir runs/x --out resnet18.pt --format torchvision
    trainer embed --run-dir runs/x --data-root photos/ --out photos.npy
    trainer report runs/x runs/y --out report/

Bad input is reported as one line, ``error: ...`` on stderr, exit status 2.
"""
from __future__ import annotations

import dataclasses
import json
import os

import click

from nbr_index.click_errors import UserErrorGroup
from nbr_index.checks import resolve_device
from trainer.config import (ARCHS, DATASETS, FLOAT32_MAX, MAX_COUNT, MAX_IMAGE_SIZE, TrainConfig, check_bank_fits,
                            check_integer, check_real, config_from_dict, load_config_file, resolve)
from trainer.errors import TrainerError

# Help for the flag of every TrainConfig field (every field is a flag; the file keys use the same names).
FLAG_HELP = {
    "dataset": f"{' | '.join(DATASETS)}",
    "data_root": "torchvision root (cifar10/cifar100/svhn) or a folder with train/<class>/ and test/<class>/ "
                 "or val/<class>/ (imagefolder; without either it trains and skips kNN evaluation)",
    "download": "let torchvision download cifar10/cifar100/svhn (needs network)",
    "image_size": "input side in px; default: native for small sets, 224 for large image folders",
    "hflip": "random horizontal flip in the augmentation (off in the authors' released CIFAR configs)",
    "workers": "DataLoader workers for large-image folders",
    "arch": f"{' | '.join(ARCHS)}",
    "dim": "feature dimension of the head and memory bank",
    "precision": "fp32, or bf16 autocast for the network (GPU); the loss and memory bank stay fp32",
    "compile": "torch.compile the network for training (inductor; needs a C++ compiler; "
               "the first steps pay tens of seconds of compilation)",
    "method": "and: AND with the progressive curriculum; instance: Wu et al. baseline (no anchors); "
              "and-oneoff: all samples anchors from round 1 (paper Table 6)",
    "rounds": "curriculum rounds R after round 0 (R + 1 training rounds)",
    "k": "neighbours per anchor",
    "tau": "softmax temperature",
    "selection": "which rows fill a round's anchor places: entropy (the paper: lowest entropy), mutual "
                 "(rows that are a mutual nearest neighbour first, each group by entropy; same count) or "
                 "stable (rows whose nearest neighbour was also a neighbour in the previous round first); oracle: "
                 "the entropy rule's anchors with their own class's nearest rows as neighbours (uses the labels: "
                 "measures what right neighbourhoods could give, not a method)",
    "max_anchor_fraction": "at most floor(N f) anchors in any round, f in (0, 1]; 1 = the paper (every "
                           "sample an anchor in the last round)",
    "neighbour_features": "what the index finds neighbours and entropies in: bank (the paper: the memory bank) "
                          "or backbone (the backbone's L2-normalised features of the un-augmented training "
                          "images, recomputed at every round's end; the store then holds F columns, not dim)",
    "eta": "memory-bank update rate (Eq 8)",
    "epochs_per_round": "epochs per training round; default 200 (paper), 30 for digits, 2 for synthetic",
    "batch_size": "global batch (split over ranks)",
    "sync_bn": "with several ranks, batch norm over the global batch, so W ranks train what one process "
               "does; --no-sync-bn: each rank normalises its own images (no collectives inside the "
               "forward pass; what the authors' DataParallel code did)",
    "lr": "base learning rate, restarted every round",
    "lr_milestones": "comma-separated fractions of a round where the lr is multiplied by lr_gamma",
    "lr_gamma": "lr decay factor at each milestone",
    "momentum": "SGD momentum",
    "nesterov": "Nesterov momentum",
    "weight_decay": "SGD weight decay",
    "knn_k": "neighbours K of the weighted kNN evaluation",
    "knn_sigma": "kNN vote weight exp(s / sigma)",
    "eval_every": "evaluate kNN every N epochs within a round, as the authors' code does after every epoch "
                  "(0: at round ends only); summary.json keeps the last and, labelled, the best epoch",
    "eval_recompute": "evaluate kNN against recomputed train features instead of the memory bank",
    "index": "inline: rebuild neighbourhoods in-process; service: wait for `nbr-index serve` to publish them",
    "index_timeout": "seconds to wait for a published neighbourhood round (--index service)",
    "index_backend": "nbr_index backend for inline rebuilds (auto, torch, faiss)",
    "store": "store URL (local directory or fsspec URL); default <run-dir>/store",
    "run_dir": "run directory (checkpoint, config.yaml, summary.json, plots); default runs/<method>-<dataset>-<arch>-<time>",
    "seed": "random seed (model init, memory bank, data order, augmentation)",
    "device": "cpu or cuda[:N]",
    "deterministic": "torch.use_deterministic_algorithms",
    "tensorboard": "write TensorBoard event files to <run-dir>/tensorboard (needs the tensorboard extra: "
                   "pip install 'and-nbr[tensorboard]'; without it nothing is written)",
}


@click.group(cls=UserErrorGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
def main():
    """Anchor Neighbourhood Discovery (Huang et al., ICML 2019): train and evaluate."""


def _config_options(func):
    """One option per TrainConfig field, defaulting to None (= not given: the config file's or
    the default value applies)."""
    defaults = TrainConfig()
    for f in reversed(dataclasses.fields(TrainConfig)):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        shown = ",".join(str(v) for v in default) if isinstance(default, list) else default
        help_text = FLAG_HELP.get(f.name, "") + ("" if default is None else f" [default: {shown}]")
        kind = str(f.type)
        if kind.startswith("bool"):
            option = click.option(f"{flag}/--no-{f.name.replace('_', '-')}", f.name, default=None, help=help_text)
        elif kind.startswith("int"):
            option = click.option(flag, f.name, type=int, default=None, help=help_text)
        elif kind.startswith("float"):
            option = click.option(flag, f.name, type=float, default=None, help=help_text)
        else:
            option = click.option(flag, f.name, type=str, default=None, help=help_text)
        func = option(func)
    return func


def build_config(flags: dict, config_file: str | None, resume: bool) -> TrainConfig:
    """Defaults (or, with ``resume``, the checkpoint's config) < config file < given flags, resolved
    (``trainer.preflight`` validates it, once per process)."""
    given = {k: v for k, v in flags.items() if v is not None}
    base = None
    if resume:
        if "run_dir" not in given:
            raise TrainerError("--resume needs the --run-dir of the run to continue")
        from trainer.checkpoint import checkpoint_path, load_checkpoint

        base = config_from_dict(load_checkpoint(checkpoint_path(given["run_dir"]))["config"])
    file_values = load_config_file(config_file) if config_file else {}
    return resolve(config_from_dict({**file_values, **given}, base))


@main.command()
@click.option("--config", "config_file", type=str, default=None,
              help="YAML or TOML file of config keys (the flag names with underscores); flags override it")
@click.option("--resume", is_flag=True, help="continue the run in --run-dir from its last checkpoint")
@click.option("--world-size", type=int, default=1, show_default=True,
              help="local worker processes (torch elastic agent; gloo on CPU, nccl on CUDA); "
                   "ignored under an outer torchrun, which sets the world itself")
@click.option("--max-restarts", type=int, default=0, show_default=True,
              help="restart all workers from the last checkpoint this many times when one dies")
@click.option("--master-port", type=int, default=0, show_default=True,
              help="rendezvous port on 127.0.0.1 (0: pick a free one)")
@click.option("--check-replicas", is_flag=True,
              help="debug: assert after every epoch that all ranks hold bit-identical memory banks and weights")
@_config_options
def run(config_file, resume, world_size, max_restarts, master_port, check_replicas, **flags):
    """Train with the AND curriculum (or a baseline) and report kNN accuracy per round.

    With no options: AND on scikit-learn digits with smallcnn, R = 4 curriculum rounds (5 training
    rounds), the neighbourhood rebuild done in-process, in a few minutes on 2 CPU cores. Writes
    checkpoint.pt (every epoch), config.yaml, summary.json and PNG plots to the run directory and
    feature / neighbourhood rounds to the store.
    """
    from trainer import distributed

    if distributed.launched_by_torchrun():
        # An outer torchrun (multi-node) made this process one rank: it already set the world.
        # Every rank resolves its own config, so the run dir cannot default to a timestamp.
        if flags.get("run_dir") is None and not resume:
            raise TrainerError("under torchrun every rank needs the same --run-dir: pass one")
        cfg = build_config(flags, config_file, resume)
        distributed.train_worker(cfg.to_dict(), resume, check_replicas)
        return
    cfg = build_config(flags, config_file, resume)
    distributed.check_launch(world_size, max_restarts, master_port)
    from trainer.preflight import preflight

    data = preflight(cfg, world_size, resume, local_workers=world_size)
    if world_size == 1 and max_restarts == 0:   # this process trains, on the data preflight decoded
        from trainer.loop import train
        from trainer.world import World

        train(cfg, World.single(cfg.device), resume=resume, log=distributed.run_dir_log(cfg.run_dir),
              check_replicas=check_replicas, data=data)
        return
    del data   # the workers are other processes: each decodes its own
    from trainer.run_lock import holding_run_locks

    distributed.check_port_free(master_port)   # refused before the locks create the run dir
    # The launcher is the run's one writer for all its workers and their restarts (trainer.run_lock).
    with holding_run_locks(cfg) as locks:
        click.echo(f"launching {world_size} worker(s) (max restarts {max_restarts}); run dir {cfg.run_dir}")
        distributed.launch_local(distributed.train_worker, (cfg.to_dict(), resume, check_replicas, locks.run_id),
                                 world_size, max_restarts, master_port)


@main.command("linear-probe")
@click.option("--run-dir", required=True, help="run directory holding checkpoint.pt")
@click.option("--epochs", type=int, default=100, show_default=True, help="training epochs of the linear layer")
@click.option("--lr", type=float, default=0.1, show_default=True, help="peak lr (cosine schedule)")
@click.option("--device", type=str, default=None, help="device (default: the run's)")
def linear_probe(run_dir, epochs, lr, device):
    """Train a linear classifier on the frozen backbone features of a run's checkpoint; also
    report kNN top-1 against the memory bank and against recomputed train features. Writes
    linear_probe.json into the run directory."""
    import torch

    from trainer.checkpoint import checkpoint_path, load_checkpoint
    from trainer.data import load_dataset
    from trainer.knn import embed, knn_predict
    from trainer.linear_probe import train_linear_probe
    from trainer.models import build_model

    check_integer("epochs", epochs, 1, MAX_COUNT)
    check_real("lr", lr, 0.0, FLOAT32_MAX, low_open=True, why="the linear layer is float32")
    state = load_checkpoint(checkpoint_path(run_dir))
    cfg = config_from_dict(state["config"])
    dev = resolve_device(device or cfg.device)
    data = load_dataset(cfg.dataset, cfg.data_root, cfg.download, cfg.image_size, cfg.hflip, cfg.workers)
    model = build_model(cfg.arch, data.image_size, cfg.dim)
    model.load_state_dict(state["model"])
    model.to(dev)
    batch = max(256, cfg.batch_size)
    train_f, train_y = embed(model, data.eval_batches("train", batch), dev, head=False)
    test_f, test_y = embed(model, data.eval_batches("test", batch), dev, head=False)
    result = train_linear_probe(train_f, train_y, test_f, test_y, data.num_classes, epochs=epochs, lr=lr, seed=cfg.seed)
    bank = state["memory"].to(dev)
    with torch.no_grad():   # the head on the backbone features: the model's output, without a second pass
        train_h, test_h = (torch.nn.functional.normalize(model.head(f), dim=1) for f in (train_f, test_f))
    for name, feats in (("knn_top1_memory", bank), ("knn_top1_recomputed", train_h)):
        pred = knn_predict(test_h, feats, train_y, data.num_classes, cfg.knn_k, cfg.knn_sigma)
        result[name] = round(100.0 * float((pred == test_y).float().mean()), 2)
    result.update({"round": state["round"], "epoch": state["epoch"], "features": f"backbone ({train_f.shape[1]}-d)"})
    path = os.path.join(run_dir, "linear_probe.json")
    with open(path, "w") as fh:
        json.dump(result, fh, indent=2)
    click.echo(f"linear probe top-1 {result['test_top1']:.2f}% (train {result['train_top1']:.2f}%), "
               f"kNN memory {result['knn_top1_memory']:.2f}%, kNN recomputed {result['knn_top1_recomputed']:.2f}%")
    click.echo(f"written: {path}")


@main.command()
@click.option("--run-dir", required=True, help="run directory holding checkpoint.pt")
@click.option("--out", required=True, help="file to write (torch.save of {state_dict, config})")
@click.option("--backbone-only", is_flag=True, help="only the backbone, without the dim-d head")
@click.option("--format", "layout", type=click.Choice(["and", "torchvision"]), default="and", show_default=True,
              help="and: trainer.models keys; torchvision: the keys of torchvision's resnet18/resnet50 "
                   "(the head as fc), loadable with strict=True")
def export(run_dir, out, backbone_only, layout):
    """Write the trained network of a run as a plain state_dict file with the config it needs.

    torch.load(OUT, weights_only=True) reads it: {"state_dict": ..., "config": {arch, image_size,
    dim, mean, std, ...}}. The README shows how to load the torchvision format.
    """
    from trainer.export import export_model

    config = export_model(run_dir, out, backbone_only=backbone_only, layout=layout)
    what = "backbone" if backbone_only else f"backbone + {config['dim']}-d head"
    click.echo(f"exported {config['arch']} ({what}, {config['layout']} keys, {config['image_size']}px inputs, "
               f"round {config['round']} epoch {config['epoch']}) to {out}")


@main.command("embed")
@click.option("--run-dir", default=None, help="run directory of the trained model")
@click.option("--model", "model_file", default=None, help="a checkpoint.pt or `trainer export` file instead of --run-dir")
@click.option("--dataset", type=click.Choice(DATASETS), default=None, help="embed a split of this dataset")
@click.option("--data-root", default=None,
              help="the dataset's root, or (without --dataset) a folder of images: class sub-folders, or "
                   "images directly in it (no labels)")
@click.option("--split", type=click.Choice(["train", "test"]), default=None,
              help="which split [train]; for a folder, its sub-folder train/ or test/ (or val/)")
@click.option("--out", required=True, help="FILE.npy, or a store path/URL (gets features/round-ROUND)")
@click.option("--round", "round_", type=int, default=0, show_default=True, help="feature round written into a store")
@click.option("--batch-size", type=int, default=256, show_default=True, help="images per forward pass")
@click.option("--workers", type=int, default=4, show_default=True, help="DataLoader workers decoding image files")
@click.option("--device", default=None, help="device (default: the run's, cpu for --model)")
def embed_command(run_dir, model_file, dataset, data_root, split, out, round_, batch_size, workers, device):
    """Embed a dataset split or a folder of images with a trained model: L2-normalised (N, dim)
    features in row order, in batches (bounded memory) with progress.

    Into FILE.npy (plus FILE.labels.npy where there are labels, FILE.files.txt for folders), or
    into a store as features/round-ROUND, which `nbr-index rebuild` and `nbr-index query` read.
    """
    from trainer.embedding import embed_source, load_model, write_embeddings

    if (run_dir is None) == (model_file is None):
        raise TrainerError("give one of --run-dir DIR or --model FILE: the trained model to embed with")
    if batch_size < 1 or workers < 0:
        raise TrainerError(f"--batch-size must be at least 1 and --workers 0 or more, got {batch_size} and {workers}")
    if device is None:   # the run's device; a run dir without a checkpoint is refused by load_model
        from trainer.checkpoint import checkpoint_path, load_checkpoint

        has_checkpoint = run_dir is not None and os.path.isfile(checkpoint_path(run_dir))
        device = load_checkpoint(checkpoint_path(run_dir))["config"]["device"] if has_checkpoint else "cpu"
    model = load_model(run_dir or model_file, device)
    source = embed_source(dataset, data_root, split, model.input_spec, workers)
    written = write_embeddings(model, source, out, batch_size=batch_size, round=round_, log=click.echo)
    for path in written:
        click.echo(f"written: {path}")


@main.command("report")
@click.argument("run_dirs", nargs=-1, required=True)
@click.option("--out", default=None, help="folder for the PNGs and report.md [the run dir; needed for several runs]")
def report_command(run_dirs, out):
    """Plots and a Markdown table from the summary.json of one or several runs.

    kNN top-1 per epoch and per round with the round boundaries, anchors and their class
    consistency per round (the paper's Fig 6), entropy distributions per round; several runs
    (e.g. AND and Instance) share each plot.
    """
    from trainer.run_report import write_report

    if len(run_dirs) > 1 and out is None:
        raise TrainerError("several runs need --out DIR: the folder for their shared report")
    written, table = write_report(list(run_dirs), out or run_dirs[0])
    click.echo(table)
    for path in written:
        click.echo(f"written: {path}")


@main.command()
@click.option("--arch", default="smallcnn", show_default=True, help="backbone")
@click.option("--size", default=32, show_default=True, help="image side in px")
@click.option("--batch-size", default=128, show_default=True)
@click.option("--n", "n", default=50000, show_default=True, help="memory bank rows")
@click.option("--steps", default=20, show_default=True, help="timed steps per block (3 blocks, after 3 warm-up steps)")
@click.option("--device", default="cpu", show_default=True)
@click.option("--precision", type=click.Choice(["fp32", "bf16"]), default="fp32", show_default=True,
              help="bf16: autocast the network, as trainer run --precision bf16")
@click.option("--compile/--no-compile", "compile_", default=False, show_default=True,
              help="torch.compile both networks, as trainer run --compile")
@click.option("--deterministic/--no-deterministic", default=TrainConfig().deterministic, show_default=True,
              help="torch's deterministic algorithms, as trainer run --deterministic (its default)")
def speed(arch, size, batch_size, n, steps, device, precision, compile_, deterministic):
    """Measure training images/s of AND against supervised training of the same backbone and batch.

    Both run batched augmentation on the device from uint8 images; AND adds the softmax over N
    memory rows, the AND loss and the memory update (the loop's own training step). Prints both
    rates and AND / supervised (target on a GPU: at least 0.85).
    """
    import torch

    from trainer.config import ARCHS
    from trainer.models import check_compiler
    from trainer.speed import step_speed

    if arch not in ARCHS:
        raise TrainerError(f"unknown arch {arch!r}: choose one of {', '.join(ARCHS)}")
    check_integer("size", size, 1, MAX_IMAGE_SIZE, "image side in px")
    check_integer("batch_size", batch_size, 2, MAX_COUNT)
    check_integer("n", n, 1, MAX_COUNT, "memory bank rows")
    check_integer("steps", steps, 1, MAX_COUNT)
    check_bank_fits(n, TrainConfig().dim, fix="lower --n")
    resolve_device(device)
    if compile_:
        check_compiler()
    rates = step_speed(arch, size, batch_size, n, steps, device, precision, compile_, deterministic)
    setting = (f"{arch} {size}px batch {batch_size} N={n} {precision}{' compiled' if compile_ else ''} "
               f"{'deterministic' if deterministic else 'non-deterministic'} "
               f"{device}{'' if device.startswith('cuda') else f' threads {torch.get_num_threads()}'}")
    click.echo(f"{setting}: supervised {rates['supervised']:.0f} images/s, AND {rates['AND']:.0f} images/s, "
               f"AND / supervised = {rates['ratio']:.2f}")


if __name__ == "__main__":
    main()
