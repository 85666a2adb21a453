"""The AND trainer: data, models, memory bank, loss, the round loop, evaluation, checkpoints.

A trained run from Python (shapes in docs/ARCHITECTURE.md)::

    import trainer
    model = trainer.load_model("runs/x", device="cpu")     # run dir, checkpoint.pt or export file
    features = trainer.embed(model, images)                 # (B, dim) L2-normalised rows

One file per concern:
    config.py        TrainConfig (the one configuration), file loading, validation, defaults
    data.py          datasets returning (image, label, index); in-memory or streamed
    augment.py       the paper's augmentation as batched, seeded tensor ops (any device)
    sharding.py      per-rank epoch shards and batches (pure functions)
    seeding.py       seeds derived from (seed, purpose, round, epoch[, rank]); determinism
    models.py        smallcnn / resnet18 / resnet50 / alexnet + 128-d L2-normalised head
    memory.py        the memory bank: init and the EMA update (Eq 8), outside autograd
    loss.py          the AND / instance losses as pure functions (Eq 2, 3, 7)
    schedule.py      SGD and the per-round lr schedule (pure functions)
    knn.py           weighted kNN evaluation, chunked; eval-mode embedding
    linear_probe.py  linear classifier on frozen features
    checkpoint.py    world-size-independent checkpoints
    loop.py          the round loop (train), read top to bottom
    report.py        round table, summary.json, plots
    run_report.py    `trainer report`: plots and a Markdown table from one or several runs' summaries
    export.py        `trainer export`: weights + config files (our layout or torchvision's)
    embedding.py     load_model / embed and `trainer embed` (datasets, folders -> .npy or a store)
    progress.py      tqdm bars on a terminal, plain log lines elsewhere
    tensorboard_log.py  TensorBoard event files of a run (with the optional tensorboard package)
    speed.py         training-step throughput (`trainer speed`)
    cli.py           the `trainer` command
    world.py, distributed.py   the process group (World) and the W-rank launcher
"""

from trainer.embedding import embed, load_model

__all__ = ["embed", "load_model"]
