"""The one configuration of a training run: :class:`TrainConfig`.

A run's configuration is built once, from defaults < a ``--config`` file (YAML or TOML) <
command-line flags, validated, resolved (dataset-dependent defaults filled in), saved as
``config.yaml`` in the run directory and inside every checkpoint. Modules never read global
configuration: the loop passes each one the values it needs.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field, fields

from nbr_index.selection import SELECTION_CHOICES
from trainer.errors import TrainerError

DATASETS = ("digits", "synthetic", "cifar10", "cifar100", "svhn", "imagefolder")
ARCHS = ("smallcnn", "resnet18", "resnet50", "alexnet")
METHODS = ("and", "instance", "and-oneoff")
INDEX_MODES = ("inline", "service")
# What features/round-r holds for the index: the memory bank (the paper), or the backbone's
# features of the un-augmented training images (trainer.run_store.snapshot_rows).
NEIGHBOUR_FEATURES = ("bank", "backbone")

# Epochs per training round when --epochs-per-round is not given: the paper's 200 for the
# benchmark datasets; digits (1,500 images) and synthetic are sized so that the default
# `trainer run` finishes in a few minutes on 2 CPU cores.
DEFAULT_EPOCHS_PER_ROUND = {"digits": 30, "synthetic": 2}
PAPER_EPOCHS_PER_ROUND = 200


class ConfigError(TrainerError):
    """A bad configuration value or key."""


@dataclass
class TrainConfig:
    """Every knob of a run. Defaults are the paper's / the authors' code's unless noted."""
    # data
    dataset: str = "digits"              # digits | synthetic | cifar10 | cifar100 | svhn | imagefolder
    data_root: str | None = None         # torchvision root (cifar*, svhn) or DIR with train/ and test/
    download: bool = False               # let torchvision download cifar*/svhn (needs network)
    image_size: int | None = None        # None: native size for small sets, 224 for large image folders
    hflip: bool = False                  # RandomHorizontalFlip (off in the authors' released CIFAR configs)
    workers: int = 4                     # DataLoader workers (large-image imagefolder only)
    # model
    arch: str = "smallcnn"               # smallcnn | resnet18 | resnet50 | alexnet
    dim: int = 128                       # feature / memory-bank dimension
    precision: str = "fp32"              # fp32 | bf16 (autocast for the network; loss and bank stay fp32)
    compile: bool = False                # torch.compile the network for training (inductor)
    # method and curriculum
    method: str = "and"                  # and | instance | and-oneoff
    rounds: int = 4                      # curriculum rounds R after round 0 (R + 1 training rounds)
    k: int = 1                           # neighbours per anchor
    tau: float = 0.1                     # softmax temperature (loss and entropy)
    selection: str = "entropy"           # which rows fill the anchor places: entropy (paper) | mutual | stable | oracle (labels: a measurement)
    max_anchor_fraction: float = 1.0     # at most floor(N f) anchors in any round; 1 = the paper
    neighbour_features: str = "bank"     # what the index finds neighbours in: bank (the paper) | backbone
    eta: float = 0.5                     # memory-bank EMA rate (Eq 8)
    # optimisation (per round; the lr schedule restarts every round)
    epochs_per_round: int | None = None  # None: 200 (paper), 30 for digits, 2 for synthetic
    batch_size: int = 128                # global batch; each of W ranks takes batch_size / W
    sync_bn: bool = True                 # W > 1: batch norm over the global batch (W ranks = one process)
    lr: float = 0.03
    # x lr_gamma at these fractions of a round: the released StepPolicy (epochs 120 and 160 of 200)
    lr_milestones: list[float] = field(default_factory=lambda: [0.6, 0.8])
    lr_gamma: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    # evaluation
    knn_k: int = 200
    knn_sigma: float = 0.1               # vote weight exp(s / sigma); 0.1 in the code, 0.07 in the paper text
    eval_every: int = 1                  # kNN every N epochs inside a round (0: round ends only); the code: 1
    eval_recompute: bool = False         # kNN against recomputed (unaugmented) train features, not the bank
    # neighbourhood index
    index: str = "inline"                # inline: rebuild in-process; service: wait for `nbr-index serve`
    index_timeout: float = 3600.0        # seconds to wait for a published round (service mode)
    index_backend: str = "auto"          # nbr_index backend for inline rebuilds
    # run
    store: str | None = None             # store URL; None: <run_dir>/store
    run_dir: str | None = None           # None: runs/<method>-<dataset>-<time>
    seed: int = 0
    device: str = "cpu"
    deterministic: bool = True           # torch.use_deterministic_algorithms
    tensorboard: bool = True             # event files in <run_dir>/tensorboard when the package is installed

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def anchor_mode(self) -> str:
        """The curriculum mode nbr_index selects anchors with."""
        return "oneoff" if self.method == "and-oneoff" else "progressive"

    @property
    def uses_neighbourhoods(self) -> bool:
        return self.method in ("and", "and-oneoff")


_FIELDS = {f.name: f for f in fields(TrainConfig)}


def _coerce(name: str, value):
    """Type-check one value against the dataclass default's type (YAML/TOML/click give native types)."""
    if value is None:
        return None
    kind = str(_FIELDS[name].type)
    try:
        if kind.startswith("bool"):
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
                return value.lower() in ("true", "1", "yes")
            raise ValueError
        if kind.startswith("int"):
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if kind.startswith("float"):
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if kind.startswith("list"):
            if isinstance(value, str):
                value = [v for v in value.replace(" ", "").split(",") if v]
            return [float(v) for v in value]
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"config key {name!r} needs a {kind.split(' ')[0]}, got {value!r}") from None


def config_from_dict(values: dict, base: TrainConfig | None = None) -> TrainConfig:
    """``base`` (defaults if None) with ``values`` applied; an unknown key is a one-line error."""
    unknown = sorted(set(values) - set(_FIELDS))
    if unknown:
        raise ConfigError(f"unknown config key(s): {', '.join(unknown)} "
                          f"(known: {', '.join(sorted(_FIELDS))})")
    merged = (base or TrainConfig()).to_dict()
    merged.update({k: _coerce(k, v) for k, v in values.items()})
    return TrainConfig(**merged)


def load_config_file(path: str) -> dict:
    """Read a YAML (.yaml/.yml) or TOML (.toml) file into a flat dict of config keys."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path} does not exist")
    try:
        if path.endswith(".toml"):
            import tomllib

            with open(path, "rb") as fh:
                values = tomllib.load(fh)
        else:
            import yaml

            with open(path) as fh:
                values = yaml.safe_load(fh) or {}
    except Exception as err:  # a parse error: report it in one line
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"cannot parse config file {path}: {first}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path} must hold a mapping of config keys")
    # Accept the CLI's spelling too (batch-size as well as batch_size).
    return {str(k).replace("-", "_"): v for k, v in values.items()}


def validate(cfg: TrainConfig) -> None:
    """Checks that need no data; each failure is one line naming the flag. (The device is
    checked beside it, by ``trainer.preflight`` with ``nbr_index.checks.resolve_device``.)"""
    def need(ok: bool, message: str):
        if not ok:
            raise ConfigError(message)

    need(cfg.dataset in DATASETS, f"unknown dataset {cfg.dataset!r}: choose one of {', '.join(DATASETS)}")
    need(cfg.arch in ARCHS, f"unknown arch {cfg.arch!r}: choose one of {', '.join(ARCHS)}")
    need(cfg.method in METHODS, f"unknown method {cfg.method!r}: choose one of {', '.join(METHODS)}")
    need(cfg.precision in ("fp32", "bf16"), f"unknown precision {cfg.precision!r}: choose fp32 or bf16")
    need(cfg.selection in SELECTION_CHOICES,
         f"unknown selection {cfg.selection!r}: choose one of {', '.join(SELECTION_CHOICES)}")
    need(0.0 < cfg.max_anchor_fraction <= 1.0,
         f"--max-anchor-fraction must be in (0, 1] (1: no cap, the paper), got {cfg.max_anchor_fraction}")
    need(cfg.neighbour_features in NEIGHBOUR_FEATURES,
         f"unknown neighbour features {cfg.neighbour_features!r}: choose one of {', '.join(NEIGHBOUR_FEATURES)}")
    need(cfg.index in INDEX_MODES, f"unknown index mode {cfg.index!r}: choose inline or service")
    need(cfg.rounds >= 1, f"--rounds must be at least 1 (curriculum rounds after round 0), got {cfg.rounds}")
    need(cfg.epochs_per_round is None or cfg.epochs_per_round >= 1,
         f"--epochs-per-round must be at least 1, got {cfg.epochs_per_round}")
    need(cfg.batch_size >= 2, f"--batch-size must be at least 2, got {cfg.batch_size}")
    need(cfg.k >= 1, f"--k must be at least 1, got {cfg.k}")
    need(cfg.tau > 0, f"--tau must be positive, got {cfg.tau}")
    need(0 < cfg.eta <= 1, f"eta must be in (0, 1], got {cfg.eta}")
    need(cfg.lr > 0, f"--lr must be positive, got {cfg.lr}")
    need(all(0 < m <= 1 for m in cfg.lr_milestones), f"lr_milestones must be fractions in (0, 1], got {cfg.lr_milestones}")
    need(cfg.dim >= 1, f"dim must be positive, got {cfg.dim}")
    need(cfg.knn_k >= 1, f"knn_k must be at least 1, got {cfg.knn_k}")
    need(cfg.knn_sigma > 0, f"knn_sigma must be positive, got {cfg.knn_sigma}")
    need(cfg.eval_every >= 0, f"--eval-every must be 0 or more, got {cfg.eval_every}")
    need(cfg.index_timeout > 0, f"--index-timeout must be positive, got {cfg.index_timeout}")
    need(cfg.image_size is None or cfg.image_size >= 8, f"image_size must be at least 8, got {cfg.image_size}")
    need(cfg.workers >= 0, f"workers must be 0 or more, got {cfg.workers}")
    if cfg.dataset in ("cifar10", "cifar100", "svhn", "imagefolder"):
        need(cfg.data_root is not None, f"--dataset {cfg.dataset} needs --data-root")


def validate_for_data(cfg: TrainConfig, n_train: int, world_size: int) -> None:
    """Checks against the training set size N and the world size."""
    def need(ok: bool, message: str):
        if not ok:
            raise ConfigError(message)

    need(cfg.k < n_train, f"--k {cfg.k} must be smaller than the training set size N = {n_train}")
    need(cfg.batch_size <= n_train, f"--batch-size {cfg.batch_size} is larger than the training set (N = {n_train})")
    need(cfg.knn_k <= n_train, f"knn_k {cfg.knn_k} is larger than the training set (N = {n_train})")
    need(cfg.batch_size % world_size == 0,
         f"--batch-size {cfg.batch_size} must be a multiple of the world size {world_size}")
    need(cfg.batch_size // world_size >= 2,
         f"--batch-size {cfg.batch_size} gives {cfg.batch_size // world_size} image(s) per rank; use at least 2 per rank")


def resolve(cfg: TrainConfig, now: str | None = None) -> TrainConfig:
    """Fill in the dataset-dependent defaults: epochs per round, run dir, store URL."""
    epochs = cfg.epochs_per_round or DEFAULT_EPOCHS_PER_ROUND.get(cfg.dataset, PAPER_EPOCHS_PER_ROUND)
    run_dir = cfg.run_dir
    if run_dir is None:
        import time

        stamp = now or time.strftime("%Y%m%d-%H%M%S")
        run_dir = os.path.join("runs", f"{cfg.method}-{cfg.dataset}-{cfg.arch}-{stamp}")
    store = cfg.store or os.path.join(run_dir, "store")
    return dataclasses.replace(cfg, epochs_per_round=epochs, run_dir=run_dir, store=store)


def save_config(cfg: TrainConfig, path: str) -> None:
    import yaml

    with open(path, "w") as fh:
        yaml.safe_dump(cfg.to_dict(), fh, sort_keys=False)
