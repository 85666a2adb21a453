"""The one configuration of a training run: :class:`TrainConfig`.

A run's configuration is built once, from defaults < a ``--config`` file (YAML or TOML) <
command-line flags, validated, resolved (dataset-dependent defaults filled in), saved as
``config.yaml`` in the run directory and inside every checkpoint. Modules never read global
configuration: the loop passes each one the values it needs.
"""
from __future__ import annotations

import dataclasses
import math
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

# Bounds of the numeric fields (validate_numbers), each with its reason.
FLOAT32_MAX = 3.4028234663852886e38          # numpy.finfo(numpy.float32).max
MAX_SEED = 2**63 - 1                         # torch.manual_seed takes a signed 64-bit seed
MAX_COUNT = 2**62                            # counts and sizes: int64 arithmetic with room to spare
MAX_ROUNDS = 1_000_000                       # far beyond any curriculum; validate_for_data bounds it by N
MAX_DIM = 65_536                             # the memory bank is N x dim floats; the paper's 128
MAX_IMAGE_SIZE = 4096                        # a 4096-px image is 48 MiB as uint8 RGB, per image in a batch
MAX_WORKERS = 256                            # DataLoader workers are processes
MAX_TEMPERATURE = 1e6                        # above it every softmax is uniform to 1e-6: nothing to learn
MAX_SECONDS = 365 * 24 * 3600.0              # a year: finite, and any wait worth waiting


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
    """Every check that needs no data, before anything is written; each failure is one line naming
    the flag. (The device is checked beside it, by ``trainer.preflight`` with
    ``nbr_index.checks.resolve_device``.)"""
    def need(ok: bool, message: str):
        if not ok:
            raise ConfigError(message)

    need(cfg.dataset in DATASETS, f"unknown dataset {cfg.dataset!r}: choose one of {', '.join(DATASETS)}")
    need(cfg.arch in ARCHS, f"unknown arch {cfg.arch!r}: choose one of {', '.join(ARCHS)}")
    need(cfg.method in METHODS, f"unknown method {cfg.method!r}: choose one of {', '.join(METHODS)}")
    need(cfg.precision in ("fp32", "bf16"), f"unknown precision {cfg.precision!r}: choose fp32 or bf16")
    need(cfg.selection in SELECTION_CHOICES,
         f"unknown selection {cfg.selection!r}: choose one of {', '.join(SELECTION_CHOICES)}")
    need(cfg.neighbour_features in NEIGHBOUR_FEATURES,
         f"unknown neighbour features {cfg.neighbour_features!r}: choose one of {', '.join(NEIGHBOUR_FEATURES)}")
    need(cfg.index in INDEX_MODES, f"unknown index mode {cfg.index!r}: choose inline or service")
    validate_numbers(cfg)
    if cfg.dataset in ("cifar10", "cifar100", "svhn", "imagefolder"):
        need(cfg.data_root is not None, f"--dataset {cfg.dataset} needs --data-root")


def validate_numbers(cfg: TrainConfig) -> None:
    """The range of every numeric field; NaN and infinity are refused wherever a float is taken.
    A field that defaults when not given is None then, never 0: 0 is a value, checked like any."""
    # integers
    check_integer("rounds", cfg.rounds, 1, MAX_ROUNDS, "curriculum rounds after round 0")
    if cfg.epochs_per_round is not None:
        check_integer("epochs_per_round", cfg.epochs_per_round, 1, MAX_COUNT)
    check_integer("batch_size", cfg.batch_size, 2, MAX_COUNT)
    check_integer("k", cfg.k, 1, MAX_COUNT, "neighbours per anchor")
    check_integer("dim", cfg.dim, 1, MAX_DIM, "the width of the head and the memory bank; the paper uses 128")
    check_integer("knn_k", cfg.knn_k, 1, MAX_COUNT)
    check_integer("eval_every", cfg.eval_every, 0, MAX_COUNT, "0: at round ends only")
    if cfg.image_size is not None:
        check_integer("image_size", cfg.image_size, 8, MAX_IMAGE_SIZE, "the side in pixels the network sees")
    check_integer("workers", cfg.workers, 0, MAX_WORKERS, "DataLoader worker processes")
    check_integer("seed", cfg.seed, 0, MAX_SEED, "torch.manual_seed's range")
    # fractions and rates
    check_real("max_anchor_fraction", cfg.max_anchor_fraction, 0.0, 1.0, low_open=True, why="1: no cap, the paper")
    check_real("eta", cfg.eta, 0.0, 1.0, low_open=True, why="the memory-bank update rate")
    # No upper bound of its own: the largest lr it makes is bounded with --lr below.
    check_real("lr_gamma", cfg.lr_gamma, 0.0, math.inf, low_open=True,
               why="the lr is multiplied by it at each milestone: at 0 training stops, below it the loss ascends")
    if not all(0 < m <= 1 for m in cfg.lr_milestones):
        raise ConfigError(f"--lr-milestones must be fractions of a round in (0, 1], got {cfg.lr_milestones}")
    check_real("momentum", cfg.momentum, 0.0, 1.0, high_open=True,
               why="SGD's momentum: at 1 or more it never forgets a gradient")
    if cfg.nesterov and cfg.momentum == 0:
        raise ConfigError("--nesterov needs a --momentum above 0 (Nesterov momentum without momentum is "
                          "plain SGD): give --momentum, or --no-nesterov")
    # SGD's step converts lr and weight_decay to the float32 parameters' type: beyond float32's
    # range torch fails inside the step ("value cannot be converted to type float without overflow").
    check_real("lr", cfg.lr, 0.0, FLOAT32_MAX, low_open=True, why="the parameters are float32")
    passed = len(cfg.lr_milestones)
    if math.log(cfg.lr) + passed * math.log(max(1.0, cfg.lr_gamma)) > math.log(FLOAT32_MAX):
        raise ConfigError(f"--lr {cfg.lr:g} times --lr-gamma {cfg.lr_gamma:g} at each of {passed} milestones "
                          f"exceeds {FLOAT32_MAX:g}, float32's largest number (the parameters are float32): "
                          f"lower --lr or --lr-gamma")
    check_real("weight_decay", cfg.weight_decay, 0.0, FLOAT32_MAX, why="the parameters are float32")
    # temperatures: logits s / t with s a cosine similarity in [-1, 1], computed in float32.
    check_real("tau", cfg.tau, 1.0 / FLOAT32_MAX, MAX_TEMPERATURE,
               why="the logits similarity / tau are float32: below it they overflow, above it they are all equal")
    sigma_low = min_knn_sigma(cfg.knn_k)
    check_real("knn_sigma", cfg.knn_sigma, sigma_low, MAX_TEMPERATURE,
               why=f"the kNN vote sums --knn-k {cfg.knn_k} weights exp(similarity / sigma) in float32: below "
                   f"{sigma_low:.4g} they overflow and the vote falls to chance, above 1e6 they are all equal")
    check_real("index_timeout", cfg.index_timeout, 0.0, MAX_SECONDS, low_open=True, why="seconds")


def min_knn_sigma(knn_k: int) -> float:
    """The smallest kNN temperature whose vote cannot overflow float32: the vote sums up to knn_k
    weights exp(s / sigma) with s <= 1, so knn_k exp(1 / sigma) <= FLOAT32_MAX / e (a factor e of
    headroom for rounding) needs sigma >= 1 / (ln FLOAT32_MAX - ln knn_k - 1): 0.0121 for knn_k
    = 200. exp(s / sigma) with s >= -1 then stays above float32's smallest number too, so no
    weight underflows to 0. (The paper's 0.07 and the code's 0.1 are far above.)"""
    return 1.0 / (math.log(FLOAT32_MAX) - math.log(max(1, min(int(knn_k), MAX_COUNT))) - 1.0)


def check_integer(name: str, value, low: int, high: int, why: str = "") -> None:
    """ConfigError naming the flag of ``name`` (a field, or a command's option) unless ``value`` is
    an integer in [low, high]; ``why`` says what the bound protects."""
    if isinstance(value, bool) or not isinstance(value, int):
        _out_of_range(name, "an integer", value, why)
    if value < low:
        _out_of_range(name, f"at least {low}", value, why)
    if value > high:
        _out_of_range(name, f"at most {high}", value, why)


def check_real(name: str, value, low: float, high: float, *, low_open: bool = False,
               high_open: bool = False, why: str = "") -> None:
    """ConfigError naming the flag of ``name`` unless ``value`` is a finite number between ``low``
    and ``high`` (each included unless ``low_open`` / ``high_open``; a NaN is never in range)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        _out_of_range(name, "a finite number", value, why)
    if value < low or (low_open and value == low):
        _out_of_range(name, f"{'above' if low_open else 'at least'} {low:g}", value, why)
    if value > high or (high_open and value == high):
        _out_of_range(name, f"{'below' if high_open else 'at most'} {high:g}", value, why)


def _out_of_range(name: str, wanted: str, value, why: str):
    raise ConfigError(f"{_flag(name)} must be {wanted}{f' ({why})' if why else ''}, got {value!r}")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def validate_for_data(cfg: TrainConfig, n_train: int, world_size: int) -> None:
    """Checks against the training set size N and the world size."""
    def need(ok: bool, message: str):
        if not ok:
            raise ConfigError(message)

    need(cfg.k < n_train, f"--k {cfg.k} must be smaller than the training set size N = {n_train}")
    need(cfg.batch_size <= n_train, f"--batch-size {cfg.batch_size} is larger than the training set (N = {n_train})")
    need(cfg.knn_k <= n_train, f"knn_k {cfg.knn_k} is larger than the training set (N = {n_train})")
    need(cfg.rounds <= n_train or cfg.anchor_mode != "progressive" or not cfg.uses_neighbourhoods,
         f"--rounds {cfg.rounds} is larger than the training set (N = {n_train}): round 1 would select "
         f"floor(N / R) = 0 anchors")
    need(cfg.batch_size % world_size == 0,
         f"--batch-size {cfg.batch_size} must be a multiple of the world size {world_size}")
    need(cfg.batch_size // world_size >= 2,
         f"--batch-size {cfg.batch_size} gives {cfg.batch_size // world_size} image(s) per rank; use at least 2 per rank")
    check_bank_fits(n_train, cfg.dim)


def check_bank_fits(n: int, dim: int, fix: str = "lower --dim (the paper uses 128)") -> None:
    """The memory bank, (N, dim) float32, is drawn in host memory on every device
    (``trainer.memory.init_memory``): refuse a bank that cannot fit there, in one line saying how
    to ``fix`` it, instead of the allocator's traceback."""
    need_bytes = 4 * n * dim
    have_bytes = available_memory_bytes()
    if have_bytes is not None and need_bytes > have_bytes:
        raise ConfigError(f"the memory bank of N = {n} rows x --dim {dim} x 4 bytes needs {need_bytes / 2**30:.1f} "
                          f"GiB, more than the {have_bytes / 2**30:.1f} GiB of memory available: {fix}")


def available_memory_bytes() -> int | None:
    """Bytes of memory this process may still allocate: MemAvailable, capped by a cgroup v2 limit;
    None where neither can be read (then nothing is refused)."""
    limits = []
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    limits.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError):
        pass
    try:
        with open("/sys/fs/cgroup/memory.max") as fh:
            limit = fh.read().strip()
        with open("/sys/fs/cgroup/memory.current") as fh:
            used = int(fh.read().strip())
        if limit != "max":
            limits.append(int(limit) - used)
    except (OSError, ValueError):
        pass
    return min(limits) if limits else None


def resolve(cfg: TrainConfig, now: str | None = None) -> TrainConfig:
    """Fill in the dataset-dependent defaults: epochs per round, run dir, store URL."""
    # None is "not given"; 0 stays 0 for validate to refuse (an `or` here once turned it into 30).
    epochs = cfg.epochs_per_round
    if epochs is None:
        epochs = DEFAULT_EPOCHS_PER_ROUND.get(cfg.dataset, PAPER_EPOCHS_PER_ROUND)
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
